"""ONNX export, checked by onnx.checker and verified against PyTorch in onnxruntime.

One self-contained `.onnx` file (weights inline; ONNX's protobuf limit makes that 2 GB at
most), a dynamic batch axis, named inputs and outputs, and the compression report in the
model's `metadata_props`. Nothing is written until the graph has been checked and, unless
told otherwise, run in onnxruntime on sample inputs at batch size 1 and above, its outputs
within `RTOL` of PyTorch's relative to the inputs' effect on the output (`exporters.effect`);
a model whose output is constant across inputs is refused.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from compressor.errors import CompressorError, InputError, first_line
from compressor.io import atomic_write
from compressor.outputs import named_outputs
from exporters import effect
from exporters._common import eval_mode, flat_outputs
from exporters.onnx_export import Exported, export_graph, opset_of
from exporters.onnx_pattern import add_pattern_props_

# Tolerance of the onnxruntime check, relative to the inputs' effect (the largest spread
# of an output across the sample inputs, `exporters.effect`): float32 kernels that sum in
# another order differ by ~1e-6 relative; 1e-4 leaves room for deep nets while catching
# any real mismatch (a wrong op is off by O(1) of the effect).
RTOL = 1e-4
# Default sparsity from which a weight becomes a COO sparse_initializer. COO costs 4 bytes
# per value plus an int64 index (ONNX requires int64), so it is smaller than the dense
# float32 tensor only above 2/3 sparsity; 0.7 keeps every converted tensor a saving.
SPARSE_THRESHOLD = 0.7
# A protobuf message cannot exceed 2 GiB, so a single-file ONNX model cannot either.
PROTOBUF_LIMIT = 2**31 - 1
METADATA_PREFIX = "compressor."


@dataclass
class OnnxExport:
    """What `export_onnx` wrote and how it checked out.

    Attributes:
        path: the `.onnx` file written.
        size_bytes: its size.
        opset: the default-domain opset of the graph.
        verified: whether onnxruntime was run against PyTorch.
        max_abs_diff: largest |onnxruntime - PyTorch| over every output and sample batch.
        tolerance: the largest difference accepted (`RTOL` x the inputs' effect).
        output_scale: max |PyTorch output| over the sample batches.
        input_effect: the largest spread of a PyTorch output across the sample inputs
            (None when they were not distinct).
        constant_output: the output did not depend on the input (exported only when
            allowed).
        sparse_initializers: how many weights were stored as COO sparse initializers.
        batch_sizes: the batch sizes the graph was run at.
        exporter: "dynamo" or "legacy" (TorchScript): the torch.onnx exporter that wrote it.
        exporter_note: why `auto` used the TorchScript exporter ('' when it did not).
    """

    path: Path
    size_bytes: int
    opset: int
    verified: bool
    max_abs_diff: float | None = None
    tolerance: float | None = None
    output_scale: float | None = None
    input_effect: float | None = None
    constant_output: bool = False
    sparse_initializers: int = 0
    batch_sizes: tuple[int, ...] = ()
    exporter: str = "dynamo"
    exporter_note: str = ""

    def to_dict(self) -> dict:
        """A JSON-ready dict (the CLI's --json output)."""
        return {
            "format": "onnx",
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "opset": self.opset,
            "verified": self.verified,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "output_scale": self.output_scale,
            "input_effect": self.input_effect,
            "constant_output": self.constant_output,
            "sparse_initializers": self.sparse_initializers,
            "batch_sizes": list(self.batch_sizes),
            "exporter": self.exporter,
            "exporter_note": self.exporter_note,
        }


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: tuple,
    *,
    opset: int | None = None,
    report: dict | None = None,
    verify: bool = True,
    sparse_initializers: bool = False,
    sparse_threshold: float = SPARSE_THRESHOLD,
    protect: tuple = (),
    exporter: str = "auto",
    allow_constant: bool = False,
) -> OnnxExport:
    """Exports `model` to one self-contained `.onnx` file, verified in onnxruntime.

    Args:
        model: any module torch.export can capture (zoo models, lifted `.pt2` graphs).
        path: the output file; written atomically, never onto a `protect`ed path.
        example_inputs: a tuple of input tensors with a batch dimension first.
        opset: the ONNX opset to emit (default: the exporter's).
        report: the compression report, stored as JSON in `metadata_props`; a pattern it
            names is also stored per initializer (`exporters.onnx_pattern`).
        verify: run onnxruntime against PyTorch and fail above tolerance.
        sparse_initializers: store weights at or above `sparse_threshold` sparsity as COO
            `sparse_initializer`s (onnxruntime densifies them when it loads the model).
        sparse_threshold: the sparsity (fraction of zeros) from which a weight is stored COO.
        protect: paths the output must not overwrite (the model's own file).
        exporter: "auto", "dynamo" or "legacy" (`exporters.onnx_export`).
        allow_constant: export a model whose output ignores its input (else an error).

    Returns:
        An `OnnxExport` with the file size and the verification's max abs difference.

    Raises:
        InputError: a bad threshold, or an opset or exporter that cannot serve this model.
        CompressorError: the export, the checker or the verification failed, or the output
            is constant across inputs (`ConstantOutputError`); nothing is written then.
    """
    if not 0.0 <= sparse_threshold <= 1.0:
        raise InputError(f"sparse threshold {sparse_threshold} must be in [0, 1]")
    example_inputs = _batched(example_inputs)
    with eval_mode(model):
        exported = to_onnx_with(model, example_inputs, opset=opset, exporter=exporter)
        proto = exported.proto
        _set_metadata(proto, report, example_inputs)
        add_pattern_props_(proto, model, report)
        dense_bytes = _serialize(proto)
        count = sparsify_initializers_(proto, sparse_threshold) if sparse_initializers else 0
        data = _serialize(proto) if count else dense_bytes
        check_graph(proto, strict=count == 0)
        result = OnnxExport(Path(path), len(data), _opset_of(proto), verified=verify)
        result.sparse_initializers = count
        result.exporter, result.exporter_note = exported.exporter, exported.note
        if verify:
            dense = dense_bytes if count else None
            _verify_into(result, data, dense, model, example_inputs, allow_constant)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), protect=protect)
    return result


def to_onnx(
    model: nn.Module, example_inputs: tuple, *, opset: int | None = None, exporter: str = "auto"
):
    """The model as an `onnx.ModelProto` with a dynamic batch axis (see `to_onnx_with`)."""
    return to_onnx_with(model, example_inputs, opset=opset, exporter=exporter).proto


def to_onnx_with(
    model: nn.Module, example_inputs: tuple, *, opset: int | None = None, exporter: str = "auto"
) -> Exported:
    """The graph and the exporter that wrote it (`exporters.onnx_export.export_graph`).

    Raises:
        InputError: the requested opset or exporter cannot be used for this model.
        CompressorError: torch.onnx could not export the model.
    """
    names = (_names("input", len(example_inputs)), _output_names(model, example_inputs))
    return export_graph(model, example_inputs, names, opset=opset, exporter=exporter)


def sparsify_initializers_(proto: onnx.ModelProto, threshold: float) -> int:
    """Moves float initializers of rank >= 2 at or above `threshold` sparsity to COO.

    Each becomes a `SparseTensorProto` with int64 linear indices (row-major flat
    positions, ascending) and the same name. Modifies `proto` in place.

    Returns:
        How many initializers were converted.
    """
    graph = proto.graph
    converted = set()
    for init in list(graph.initializer):
        array = numpy_helper.to_array(init)
        if array.ndim < 2 or array.dtype.kind != "f" or array.size == 0:
            continue
        if np.count_nonzero(array) > (1.0 - threshold) * array.size:
            continue
        graph.sparse_initializer.append(_coo(array, init.name))
        graph.initializer.remove(init)
        converted.add(init.name)
    # The exporter records each weight's dense type in value_info; a sparse initializer's
    # type is sparse_tensor, and shape inference rejects the clash.
    for info in [v for v in graph.value_info if v.name in converted]:
        graph.value_info.remove(info)
    return len(converted)


def _coo(array: np.ndarray, name: str) -> onnx.SparseTensorProto:
    flat = array.reshape(-1)
    positions = np.flatnonzero(flat)
    values = numpy_helper.from_array(flat[positions], name)
    indices = numpy_helper.from_array(positions.astype(np.int64), "")
    return onnx.helper.make_sparse_tensor(values, indices, list(array.shape))


def check_graph(proto: onnx.ModelProto, *, strict: bool = True) -> None:
    """onnx.checker on `proto`; `strict` adds full shape inference.

    A graph with sparse initializers gets the structural check only: ONNX's type system
    does not let a Conv or Gemm take a sparse tensor, though onnxruntime (which densifies
    sparse initializers when loading) runs it.

    Raises:
        CompressorError: the checker rejected the graph.
    """
    try:
        onnx.checker.check_model(proto, full_check=strict)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise CompressorError(f"the exported graph fails onnx.checker: {first_line(exc)}") from exc


def compare_onnxruntime(
    data: bytes, model: nn.Module, example_inputs: tuple
) -> tuple[float, float, list[list[np.ndarray]]]:
    """Runs the serialized model in onnxruntime (CPU) and PyTorch on sample batches.

    The batches are the first sample alone, the whole example batch, and three seeded
    random-normal samples (float inputs only), so a graph that only works at the export's
    batch size, or only on the example data, is caught.

    Returns:
        (max abs difference, output scale, onnxruntime outputs per batch).

    Raises:
        CompressorError: onnxruntime cannot load or run the graph.
    """
    session = _session(data)
    max_diff, scale, ort_outputs = 0.0, 0.0, []
    for batch in verification_batches(example_inputs):
        expected = [o.detach().cpu().numpy() for o in flat_outputs(model, batch)]
        got = _run(session, batch)
        if [g.shape for g in got] != [e.shape for e in expected]:
            raise CompressorError(
                f"onnxruntime output shapes {[g.shape for g in got]} differ from PyTorch's "
                f"{[e.shape for e in expected]} at batch size {len(batch[0])}"
            )
        for g, e in zip(got, expected):
            max_diff = max(max_diff, float(np.max(np.abs(g - e), initial=0.0)))
            scale = max(scale, float(np.max(np.abs(e), initial=0.0)))
        ort_outputs.append(got)
    return max_diff, scale, ort_outputs


def verification_batches(example_inputs: tuple) -> list[tuple]:
    """Sample batches for verification: batch size 1, the example's, and 3 random samples."""
    batches = [tuple(x[:1] for x in example_inputs), tuple(example_inputs)]
    if all(x.is_floating_point() for x in example_inputs):
        generator = torch.Generator().manual_seed(0)
        batches.append(
            tuple(torch.randn(3, *x.shape[1:], generator=generator) for x in example_inputs)
        )
    return batches


def _verify_into(
    result: OnnxExport,
    data: bytes,
    dense_data: bytes | None,
    model: nn.Module,
    example: tuple,
    allow_constant: bool = False,
) -> None:
    max_diff, scale, outputs = compare_onnxruntime(data, model, example)
    batches = verification_batches(example)
    result.max_abs_diff, result.output_scale = max_diff, scale
    result.input_effect = effect.input_effect(model, batches)
    result.constant_output = effect.is_constant(result.input_effect, scale)
    effect.check_effect(result.input_effect, scale, allow_constant)
    result.tolerance = effect.tolerance(RTOL, result.input_effect, scale)
    result.batch_sizes = tuple(len(b[0]) for b in batches)
    if max_diff > result.tolerance or not np.isfinite(max_diff):
        raise CompressorError(
            f"onnxruntime and PyTorch disagree: max abs difference {max_diff:.3g} exceeds the "
            f"tolerance {result.tolerance:.3g} ({RTOL:g} x the inputs' effect on the output)"
        )
    if dense_data is not None:
        _, _, dense_outputs = compare_onnxruntime(dense_data, model, example)
        for sparse_batch, dense_batch in zip(outputs, dense_outputs):
            if not all(np.array_equal(s, d) for s, d in zip(sparse_batch, dense_batch)):
                raise CompressorError(
                    "the graph with sparse initializers gives different outputs in "
                    "onnxruntime from the dense graph; export without --sparse-initializers"
                )


def _session(data: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the CLI's output stays one line
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise CompressorError(f"onnxruntime cannot load the graph: {first_line(exc)}") from exc


def _run(session, batch: tuple) -> list[np.ndarray]:
    feed = {spec.name: x.detach().cpu().numpy() for spec, x in zip(session.get_inputs(), batch)}
    try:
        return session.run(None, feed)
    except Exception as exc:
        raise CompressorError(f"onnxruntime failed to run the graph: {first_line(exc)}") from exc


def _batched(example_inputs) -> tuple:
    """The example as a tuple whose batch is at least 2, so export keeps the axis dynamic."""
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not example_inputs or not all(isinstance(x, torch.Tensor) for x in example_inputs):
        raise InputError("example_inputs must be a non-empty tuple of tensors")
    if any(x.dim() == 0 or len(x) == 0 for x in example_inputs):
        raise InputError("every example input needs a batch dimension with at least one sample")
    if len(example_inputs[0]) == 1:
        # torch.export specialises a size-1 dimension; a second sample keeps batch dynamic.
        example_inputs = tuple(torch.cat([x, x]) for x in example_inputs)
    return example_inputs


def _set_metadata(proto: onnx.ModelProto, report: dict | None, example: tuple) -> None:
    from compressor import __version__

    props = {
        METADATA_PREFIX + "version": __version__,
        METADATA_PREFIX + "input_shapes": json.dumps([list(x.shape[1:]) for x in example]),
    }
    if report is not None:
        props[METADATA_PREFIX + "report"] = json.dumps(report, default=str, sort_keys=True)
    onnx.helper.set_model_props(proto, props)


def _serialize(proto: onnx.ModelProto) -> bytes:
    if proto.ByteSize() > PROTOBUF_LIMIT:
        raise CompressorError(
            f"the graph is {proto.ByteSize() / 2**30:.1f} GiB, over ONNX's 2 GiB single-file "
            "limit; compress the model further or use --sparse-initializers"
        )
    return proto.SerializeToString()


def _opset_of(proto: onnx.ModelProto) -> int:
    return opset_of(proto)


def _output_names(model: nn.Module, example_inputs: tuple) -> list[str]:
    """A dict-returning model's outputs are named by its keys, others output / output_i."""
    with torch.no_grad():
        out = model(*example_inputs)
    if isinstance(out, Mapping):
        return [name for name, _ in named_outputs(out)]
    leaves = torch.utils._pytree.tree_leaves(out)
    return _names("output", sum(isinstance(leaf, torch.Tensor) for leaf in leaves))


def _names(stem: str, count: int) -> list[str]:
    return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]


@contextlib.contextmanager
def _quiet_exporter(loggers: Sequence[str] = ("torch.onnx", "onnxscript")) -> Iterator[None]:
    """Silences the exporter's progress lines, warnings and fallback tracebacks."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    try:
        for name in loggers:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
