"""`compress`: the command-line front end."""

from __future__ import annotations

import sys
import time

import click

from cli import prune_steps
from cli.common import (
    DATA_RUNS_CODE,
    BudgetType,
    ShapeType,
    SparsityType,
    default_output,
    emit_json,
    example_inputs,
    handle_errors,
    json_default_map,
    load,
    load_data_spec,
    method_options,
    model_options,
    task_output_option,
)
from cli.export import export
from cli.latency import latency_options, model_latency, print_model_latency
from cli.paths import check_prune_paths, check_train_paths, force_option
from cli.tables import print_stats

EPILOG = """\b
Examples:
  compress train --arch lenet5 --data digits --epochs 10 -o lenet5.pt2
  compress prune lenet5.pt2 --method magnitude-global --sparsity 0.9 --data digits
  compress info lenet5-magnitude-global.pt2
  compress eval lenet5-magnitude-global.pt2 --data digits
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option(
    "--json", "as_json", is_flag=True, help="Machine-readable output (same as a command's --json)."
)
@click.version_option(package_name="compressor")
@click.pass_context
def cli(ctx: click.Context, debug: bool, quiet: bool, as_json: bool) -> None:
    """Compress trained PyTorch models for edge deployment."""
    ctx.obj = {"debug": debug}
    if as_json:
        ctx.default_map = json_default_map(ctx)
    # compressor.train imports torch; before it is imported its bars are on by default, so
    # only --quiet (or a second run in one process, as in tests) needs it here
    if quiet or "compressor.train" in sys.modules:
        from compressor.train import set_quiet

        set_quiet(quiet)


@cli.command(
    epilog="\b\nExample:\n  compress info resnet20.pt2\n  compress info weights.pt --arch resnet20 --input-shape 3x32x32"
)
@click.argument("model", type=click.Path(dir_okay=False))
@model_options
@click.option(
    "--data", help="Data spec giving the input shape (else the recorded one)." + DATA_RUNS_CODE
)
@click.option("--input-shape", type=ShapeType(), help="Per-sample input shape, e.g. 1x28x28.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@latency_options
@handle_errors
def info(model, arch, trust_pickle, data, input_shape, as_json, latency):
    """Per-layer table: shape, params, FLOPs (MACs), activation volume, sparsity."""
    from compressor.stats import measure

    data_obj = load_data_spec(data)
    loaded = load(model, arch, trust_pickle, data_obj, input_shape)
    stats = measure(loaded.model, example_inputs(loaded, data_obj)[0][:1])
    timed = model_latency(loaded.model, example_inputs(loaded, data_obj), latency)
    if as_json:
        from compressor.pattern_layers import pattern_holds

        held = {"pattern_holds": pattern_holds(loaded.model, loaded.report)}
        emit_json(
            {"format": loaded.format, "stats": stats.to_dict(), "report": loaded.report}
            | held
            | timed
        )
        return
    print_stats(stats, loaded)
    print_model_latency(timed)


@cli.command(
    epilog="\b\nExample:\n  compress train --arch lenet5 --data digits --epochs 10 -o lenet5.pt2"
)
@click.option("--arch", required=True, help="Zoo architecture (see `compress list`).")
@click.option(
    "--data",
    required=True,
    help="Labelled data spec, e.g. digits or fashion-mnist." + DATA_RUNS_CODE,
)
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.05, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option(
    "--width",
    type=click.FloatRange(min=0, min_open=True),
    help="Width multiplier (ResNets, MobileNetV2).",
)
@click.option("--limit", type=click.IntRange(min=1), help="Use only the first N training samples.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False),
    help="Save state here every epoch; resume from it when it exists.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the .pt2.",
)
@force_option
@handle_errors
def train(arch, data, epochs, lr, batch_size, width, limit, seed, checkpoint, output, force):
    """Train a dense zoo model, to have a baseline to compress."""
    check_train_paths(data, output, checkpoint, force=force)
    import torch

    from compressor import zoo
    from compressor.errors import InputError
    from compressor.io import save_model
    from compressor.train import evaluate, train_dense

    torch.manual_seed(seed)
    data_obj = load_data_spec(data, batch_size=batch_size, seed=seed, limit=limit)
    if not data_obj.has_labels:
        raise InputError(f"data {data!r} has no labels; training needs labelled data")
    kwargs = {"width": width} if width else {}
    shape = data_obj.input_shape
    model = zoo.build(
        arch,
        in_channels=shape[0],
        num_classes=data_obj.num_classes,
        input_size=tuple(shape[1:]),
        **kwargs,
    )
    start = time.perf_counter()
    train_dense(model, data_obj.train, epochs=epochs, lr=lr, checkpoint=checkpoint)
    report = {
        "method": "dense",
        "arch": model.arch,
        "data": data,
        "epochs": epochs,
        "seconds": time.perf_counter() - start,
        "val_top1": evaluate(model, data_obj.val),
        "test_top1": evaluate(model, data_obj.test),
    }
    save_model(model, output, example_inputs=(data_obj.sample_inputs(2),), report=report)
    click.echo(
        f"trained {arch} on {data} for {epochs} epochs: val top-1 {_pct(report['val_top1'])}, "
        f"test top-1 {_pct(report['test_top1'])} -> {output}"
    )


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


PRUNE_EPILOG = """\b
Examples:
  compress prune lenet5.pt2 --method magnitude-global --sparsity 0.9 --data digits
  compress prune lenet5.pt2 --method bar --budget 4x --data digits --measure-latency
  compress prune lenet5.pt2 --method gss --variant structure --budget 4x --data digits
"""


@cli.command(epilog=PRUNE_EPILOG)
@click.argument("model", type=click.Path(dir_okay=False))
@model_options
@click.option("--method", "-m", required=True, help="Method name (see `compress list`).")
@click.option("--budget", type=BudgetType(), help="Reduction of the method's cost metric, e.g. 4x.")
@click.option("--sparsity", type=SparsityType(), help="Fraction of zero weights, e.g. 0.9 or 90%.")
@click.option(
    "--budget-metric",
    type=click.Choice(["weights", "flops", "volume", "latency"]),
    help="What --budget counts (default: the method's own); latency: onnxruntime ms, "
    "measured on the exported graph (bar, channel-magnitude, gss structure).",
)
@click.option("--data", help="Data spec for calibration / training (e.g. digits)." + DATA_RUNS_CODE)
@click.option(
    "--exclude", multiple=True, metavar="GLOB", help="Module paths never pruned (repeatable)."
)
@method_options
@task_output_option
@click.option(
    "--set",
    "settings",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any field of the method's config (repeatable).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Output .pt2 (default: MODEL-METHOD.pt2).",
)
@click.option(
    "--report", type=click.Path(dir_okay=False), help="Also write the report as JSON here."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--min-accuracy",
    type=click.FloatRange(0, 1),
    help="Fail (exit 1, nothing written) below this held-out top-1, e.g. 0.9 "
    "[default: fail at chance level when the dense model was above it].",
)
@click.option(
    "--checkpoint",
    "checkpoint_path",
    type=click.Path(dir_okay=False),
    help="Write a checkpoint here at every epoch boundary of training.",
)
@click.option(
    "--resume",
    type=click.Path(dir_okay=False),
    help="Continue the run that wrote this checkpoint (same command otherwise).",
)
@click.option(
    "--nproc",
    type=click.IntRange(min=1),
    help="Train data-parallel in N local processes (torch.distributed, gloo on CPU).",
)
@click.option(
    "--check-ranks",
    is_flag=True,
    help="Data-parallel debug: compare a hash of all state across ranks every epoch.",
)
@latency_options
@force_option
@handle_errors
def prune(
    model,
    arch,
    trust_pickle,
    method,
    budget,
    sparsity,
    budget_metric,
    data,
    exclude,
    settings,
    output,
    report,
    seed,
    as_json,
    min_accuracy,
    checkpoint_path,
    resume,
    nproc,
    check_ranks,
    task_output,
    force,
    latency,
    **method_opts,
):
    """Compress MODEL with a method to a budget; write a .pt2 with the report embedded."""
    options = dict(locals())
    method_opts = options.pop("method_opts")
    output = output or str(default_output(model, method))
    # refuse now, not after hours of training
    check_prune_paths(model, data, output, report, checkpoint_path, resume, force=force)
    with prune_steps.ranks(nproc):
        cls, config, target = prune_steps.resolve(method, options, method_opts)
        job = prune_steps.validate(cls, model, output, options)
        result = prune_steps.run(job, target, config, options)
        if result is not None:  # None on the other ranks: rank 0 writes and prints
            prune_steps.write(job, result, report, as_json)


@cli.command(epilog="\b\nExample:\n  compress eval lenet5-magnitude-global.pt2 --data digits")
@click.argument("model", type=click.Path(dir_okay=False))
@model_options
@click.option("--data", required=True, help="Labelled data spec." + DATA_RUNS_CODE)
@task_output_option
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def eval(model, arch, trust_pickle, data, task_output, as_json):  # noqa: A001  (the command's name)
    """Top-1 accuracy of MODEL on the data's test split (validation split if none)."""
    from compressor.errors import InputError
    from compressor.stats import sparsity_of
    from compressor.train import evaluate

    data_obj = load_data_spec(data)
    if not data_obj.has_labels:
        raise InputError(f"data {data!r} has no labels; eval needs labelled data")
    loaded = load(model, arch, trust_pickle, data_obj)
    split = "test" if data_obj.test is not None else "val"
    top1 = evaluate(loaded.model, data_obj.test or data_obj.val, task_output)
    zeros, total = sparsity_of(loaded.model)
    result = {"model": model, "data": data, "split": split, "top1": top1, "sparsity": zeros / total}
    if as_json:
        emit_json(result)
    else:
        click.echo(f"{model}: top-1 {_pct(top1)} on {data} ({split}), sparsity {zeros / total:.2%}")


@cli.command(epilog="\b\nExample:\n  compress demo --out demo-out")
@click.option(
    "--out",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for the demo's files.",
)
@click.option("--sparsity", type=SparsityType(), default="0.9", show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True)
@handle_errors
def demo(out, sparsity, epochs):
    """End to end on the embedded digits data: train LeNet-5, prune with every method."""
    from cli.demo import run_demo

    run_demo(out, sparsity, epochs)


@cli.command(name="list", epilog="\b\nExample:\n  compress list")
@handle_errors
def list_cmd():
    """List the registered methods (with their options) and zoo architectures."""
    from compressor.catalog import catalog

    listing = catalog()  # without importing torch while the generated catalog is fresh
    click.echo("methods:")
    for name, info in listing["methods"].items():
        options = ", ".join(info["options"])
        click.echo(
            f"  {name:<20} budget on {'/'.join(info['metrics'])}; needs {info['needs']}; {options}"
        )
    click.echo("architectures: " + ", ".join(listing["archs"]))


cli.add_command(export)


def main() -> None:
    from compressor.launch_env import launched

    if not launched():
        cli(prog_name="compress")
        return
    from compressor import distributed

    try:
        cli(prog_name="compress")
    except SystemExit as exc:  # click ends every run with one
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    else:
        code = 0
    distributed.exit_worker(code)


if __name__ == "__main__":
    main()
