"""`compress export`: a verified ONNX graph or CSR weight pack from any model file."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import (
    DATA_RUNS_CODE,
    ShapeType,
    emit_json,
    example_inputs,
    handle_errors,
    load,
    load_data_spec,
    model_options,
)
from cli.paths import check_paths, data_file, force_option

SUFFIXES = {"onnx": ".onnx", "csr": ".csr.safetensors"}
# Options that mean something for one format only: option name -> that format.
ONLY_FOR = {
    "opset": "onnx",
    "exporter": "onnx",
    "sparse_initializers": "onnx",
    "sparse_threshold": "onnx",
    "allow_constant_output": "onnx",
    "values": "csr",
    "block": "csr",
    "csr_layers": "csr",
}
EPILOG = """\b
Examples:
  compress export lenet5-magnitude-global.pt2 --format onnx
  compress export lenet5-magnitude-global.pt2 --format onnx --sparse-initializers
  compress export lenet5-magnitude-global.pt2 --format onnx --opset 13
  compress export lenet5-magnitude-global.pt2 --format csr --values int8 --block 1x4
"""


def _block(ctx, param, value):
    if value is None:
        return None
    from compressor.errors import InputError
    from exporters.csr import parse_block

    try:
        return parse_block(value)
    except InputError as exc:
        raise click.BadParameter(str(exc), ctx=ctx, param=param) from None


@click.command(epilog=EPILOG)
@click.argument("model", type=click.Path(dir_okay=False))
@model_options
@click.option(
    "--format",
    "fmt",
    type=click.Choice(sorted(SUFFIXES)),
    default="onnx",
    show_default=True,
    help="onnx: a verified .onnx graph; csr: a CSR weight pack (safetensors).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Output file (default: MODEL with .onnx / .csr.safetensors).",
)
@click.option(
    "--opset",
    type=click.IntRange(min=1),
    help="ONNX opset, e.g. 11-17 for older runtimes and NPU compilers [default: 18].",
)
@click.option(
    "--exporter",
    type=click.Choice(["auto", "dynamo", "legacy"]),
    help="ONNX: torch.onnx exporter; auto uses dynamo (torch.export), else TorchScript "
    "(legacy) when torch.export cannot capture the model or the opset needs it "
    "[default: auto].",
)
@click.option("--no-verify", is_flag=True, help="Skip the check against PyTorch.")
@click.option(
    "--allow-constant-output",
    is_flag=True,
    help="ONNX: export a model whose output ignores its input (else exit 1).",
)
@click.option(
    "--sparse-initializers",
    is_flag=True,
    help="ONNX: store sparse weights as COO sparse_initializer (smaller files).",
)
@click.option(
    "--sparse-threshold",
    type=click.FloatRange(0, 1),
    help="ONNX: sparsity from which a weight is stored COO [default: 0.7].",
)
@click.option(
    "--values", type=click.Choice(["fp32", "fp16", "int8"]), help="CSR value type [default: fp32]."
)
@click.option(
    "--block",
    callback=_block,
    metavar="RxC",
    help="CSR block shape of every weight [default: the model's pattern: RxC blocks or the "
    "N:M layout; 1x1 without one].",
)
@click.option(
    "--csr-layers",
    type=click.Choice(["auto", "all"]),
    help="CSR: auto packs a weight as CSR when smaller than dense; all packs every "
    "Conv/Linear weight [default: auto].",
)
@click.option(
    "--data",
    help="Data spec for the sample inputs (else the recorded input shape)." + DATA_RUNS_CODE,
)
@click.option("--input-shape", type=ShapeType(), help="Per-sample input shape, e.g. 1x28x28.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@force_option
@handle_errors
def export(
    model, arch, trust_pickle, fmt, output, no_verify, data, input_shape, as_json, force, **opts
):
    """Export MODEL as a verified ONNX graph or a CSR weight pack."""
    _check_format_options(fmt, opts)
    output = Path(output) if output else _default_output(model, fmt)
    check_paths({"MODEL": model, "--data": data_file(data)}, {"-o/--output": output}, force=force)
    data_obj = load_data_spec(data)
    loaded = load(model, arch, trust_pickle, data_obj, input_shape)
    sample = example_inputs(loaded, data_obj)
    run = _export_onnx if fmt == "onnx" else _export_csr
    result = run(loaded, output, sample, not no_verify, opts, protect=(model,))
    if as_json:
        emit_json(result.to_dict())
    else:
        click.echo(f"{model} -> {result.path} ({result.size_bytes:,} bytes): {_summary(result)}")


def _check_format_options(fmt: str, opts: dict) -> None:
    for key, owner in ONLY_FOR.items():
        if owner != fmt and opts.get(key) not in (None, False):
            flag = "--" + key.replace("_", "-")
            raise click.UsageError(f"{flag} applies to --format {owner} only")


def _default_output(model: str, fmt: str) -> Path:
    path = Path(model)
    return path.with_name(path.stem + SUFFIXES[fmt])


def _export_onnx(loaded, output, sample, verify, opts, protect):
    from exporters.onnx import SPARSE_THRESHOLD, export_onnx

    threshold = opts["sparse_threshold"]
    return export_onnx(
        loaded.model,
        output,
        sample,
        opset=opts["opset"],
        report=loaded.report,
        verify=verify,
        sparse_initializers=opts["sparse_initializers"],
        sparse_threshold=SPARSE_THRESHOLD if threshold is None else threshold,
        protect=protect,
        exporter=opts["exporter"] or "auto",
        allow_constant=opts["allow_constant_output"],
    )


def _export_csr(loaded, output, sample, verify, opts, protect):
    from exporters.csr import export_csr

    return export_csr(
        loaded.model,
        output,
        sample,
        values=opts["values"] or "fp32",
        block=opts["block"],
        layers=opts["csr_layers"] or "auto",
        report=loaded.report,
        verify=verify,
        protect=protect,
    )


def _summary(result) -> str:
    if hasattr(result, "opset"):
        return _onnx_summary(result)
    return _csr_summary(result)


def _onnx_summary(result) -> str:
    sparse = (
        f", {result.sparse_initializers} sparse initializers" if result.sparse_initializers else ""
    )
    via = " (TorchScript exporter)" if result.exporter == "legacy" else ""
    head = f"ONNX opset {result.opset}{via}{sparse}"
    if not result.verified:
        return f"{head}; not verified (--no-verify)"
    sizes = ", ".join(map(str, result.batch_sizes))
    constant = (
        "; warning: output is constant across inputs: the model ignores its input"
        if result.constant_output
        else ""
    )
    return (
        f"{head}; onnxruntime vs PyTorch at batch sizes {sizes}: max abs difference "
        f"{result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g}){constant}"
    )


def _csr_summary(result) -> str:
    layout = f"block {'x'.join(map(str, result.block))}"
    if (
        result.pattern
        and ":" in result.pattern
        and any(t.encoding == "nm" for t in result.csr_tensors)
    ):
        layout = f"{result.pattern} layout"
    head = (
        f"CSR pack, {len(result.csr_tensors)} weights as CSR ({result.values}, {layout}), "
        f"{result.dense_tensors} tensors dense"
    )
    notes = "".join(f"; warning: {line}" for line in result.warnings)
    return _csr_check(result, head) + notes


def _csr_check(result, head: str) -> str:
    check = result.verification
    if check is None:
        return f"{head}; not verified (--no-verify)"
    if check.lossless:
        return (
            f"{head}; rebuilt weights exact, outputs identical (max abs difference "
            f"{check.max_output_diff:.3g})"
        )
    return (
        f"{head}; max weight error {check.max_weight_error:.3g}, max abs output difference "
        f"{check.max_output_diff:.3g}"
    )


def export_files(model, stem: Path, example_inputs: tuple) -> dict:
    """Writes STEM.onnx (COO sparse initializers) and STEM.csr.safetensors, both verified.

    Used by `compress demo`. Returns their sizes as {"onnx_bytes", "csr_bytes"}.
    """
    from exporters.csr import export_csr
    from exporters.onnx import export_onnx

    stem = Path(stem)
    onnx_file = export_onnx(
        model, stem.with_name(stem.name + ".onnx"), example_inputs, sparse_initializers=True
    )
    pack = export_csr(model, stem.with_name(stem.name + SUFFIXES["csr"]), example_inputs)
    return {"onnx_bytes": onnx_file.size_bytes, "csr_bytes": pack.size_bytes}
