"""Shared CLI plumbing: error mapping, parameter types, model/data loading, output."""

from __future__ import annotations

import functools
import json
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

import click

from compressor.budget import BUDGET_FORMS, Budget, parse_budget, parse_sparsity
from compressor.errors import CompressorError, InputError, first_line
from compressor.user_code import RUNS_CODE

# appended to every --data help: a MODULE:FN spec runs the user's code, as --arch does
DATA_RUNS_CODE = f" PKG.MODULE:FN {RUNS_CODE}."

if TYPE_CHECKING:  # torch is imported where a command needs it: `--help` stays fast
    import torch


class Failure(click.ClickException):
    """A failure while working: exit 1, one line."""

    exit_code = 1


class BadInput(click.ClickException):
    """Bad user input found after parsing (a file, a data spec): exit 2, one line."""

    exit_code = 2


def handle_errors(fn):
    """Turns library errors into click exceptions with the right exit code.

    Without --debug the user sees one 'Error: ...' line; with it, the traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = (click.get_current_context().find_root().obj or {}).get("debug", False)
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except InputError as exc:
            if debug:
                traceback.print_exc()
            raise BadInput(str(exc)) from exc
        except CompressorError as exc:
            if debug:
                traceback.print_exc()
            raise Failure(str(exc)) from exc
        except (KeyboardInterrupt, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            if debug:
                traceback.print_exc()
            first = first_line(exc, empty="")
            raise Failure(
                f"internal error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)"
            ) from exc

    return wrapper


class BudgetType(click.ParamType):
    """`4x`, `75%` or `0.75` -> Budget (metric filled in later by the command)."""

    name = "BUDGET"

    def convert(self, value, param, ctx):
        if isinstance(value, Budget):
            return value
        try:
            return parse_budget(value)
        except InputError as exc:
            self.fail(f"{exc}", param, ctx)


class SparsityType(click.ParamType):
    name = "SPARSITY"

    def convert(self, value, param, ctx):
        if isinstance(value, Budget):
            return value
        try:
            return parse_sparsity(value)
        except InputError as exc:
            self.fail(f"{exc}; accepted: {BUDGET_FORMS}", param, ctx)


class ShapeType(click.ParamType):
    """`1x28x28` -> (1, 28, 28)."""

    name = "CxHxW"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            shape = tuple(int(v) for v in str(value).lower().split("x"))
        except ValueError:
            shape = ()
        if not shape or any(d <= 0 for d in shape):
            self.fail(f"{value!r} is not a shape like 1x28x28", param, ctx)
        return shape


def model_options(fn):
    """--arch and --trust-pickle, the options every command that reads a model takes."""
    fn = click.option(
        "--trust-pickle",
        is_flag=True,
        help="Allow what runs code from the model file: a fully pickled module, or pickled "
        "entries in a .pt2 (refused without this flag).",
    )(fn)
    return click.option(
        "--arch",
        metavar="NAME|MODULE:FN",
        help=f"Architecture for a state_dict: a zoo name, or PKG.MODULE:FN, which {RUNS_CODE}.",
    )(fn)


def task_output_option(fn):
    """--task-output: which output of a multi-output model holds the class logits."""
    return click.option(
        "--task-output",
        metavar="INDEX|NAME",
        callback=lambda ctx, param, value: int(value) if value and value.isdigit() else value,
        help="The model output the task loss and accuracy use, by index or dict key, for "
        "models returning a tuple or dict (default: the first output).",
    )(fn)


def load(model_path: str, arch: str | None, trust_pickle: bool, data=None, input_shape=None):
    """Loads a model (sized for `data` when building from a state_dict) and checks it fits."""
    from compressor.io import load_model

    shape = input_shape or (data.input_shape if data is not None else None)
    classes = data.num_classes if data is not None else None
    loaded = load_model(
        model_path, arch=arch, trust_pickle=trust_pickle, input_shape=shape, num_classes=classes
    )
    if data is not None:
        check_fits(loaded.model, data)
    elif loaded.input_shape is None and input_shape is not None:
        loaded.input_shape = input_shape
    return loaded


def check_fits(model: torch.nn.Module, data) -> None:
    """Runs one sample of `data` through `model`; a shape mismatch is the user's input error."""
    import torch

    sample = data.sample_inputs(2)
    try:
        with torch.no_grad():
            out = model.eval()(sample)
    except Exception as exc:
        expected = getattr(model, "input_shape", None)
        want = f" but the model expects {_fmt(expected)}" if expected else ""
        first = first_line(exc, 200)
        raise InputError(
            f"data {data.name!r} gives inputs of shape {_fmt(tuple(sample.shape[1:]))}{want}: {first}"
        ) from None
    if not isinstance(out, torch.Tensor):
        return  # several outputs: prune and eval check the --task-output one
    if data.num_classes is not None and out.dim() == 2 and out.shape[1] < data.num_classes:
        raise InputError(
            f"data {data.name!r} has {data.num_classes} classes but the model outputs {out.shape[1]}"
        )


def _fmt(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "?"


def load_data_spec(spec: str | None, **kwargs):
    if spec is None:
        return None
    from compressor.data import load_data

    return load_data(spec, **kwargs)


def example_inputs(loaded, data) -> tuple[torch.Tensor]:
    """A batch-2 sample for export/stats: from the data, else zeros of the recorded shape."""
    import torch

    if data is not None:
        return (data.sample_inputs(2),)
    if loaded.input_shape:
        return (torch.zeros(2, *loaded.input_shape),)
    raise InputError("the model's input shape is unknown; pass --data SPEC or --input-shape CxHxW")


def json_default_map(ctx: click.Context) -> dict:
    """`compress --json CMD`: a default map that turns on the --json of every command having one.

    Merged over any default map already given, so an explicit `--json` or a caller's
    defaults still apply.
    """
    defaults = dict(ctx.default_map or {})
    for name, command in getattr(ctx.command, "commands", {}).items():
        if any(param.name == "as_json" for param in command.params):
            defaults[name] = {**defaults.get(name, {}), "as_json": True}
    return defaults


def emit_json(obj) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


def console():
    from rich.console import Console

    # in pipes and tests rich would assume 80 columns and truncate layer names
    width = None if sys.stdout.isatty() else 200
    return Console(file=sys.stdout, width=width, highlight=False)


def default_output(model_path: str, suffix: str) -> Path:
    path = Path(model_path)
    return path.with_name(f"{path.stem}-{suffix}.pt2")


# Flags shared by several methods; each maps onto the config field of the same name and is
# refused for a method whose config has no such field.
METHOD_FLAGS = (
    click.option(
        "--epochs", type=click.IntRange(min=0), help="Training epochs (training-time methods)."
    ),
    click.option(
        "--finetune-epochs", type=click.IntRange(min=0), help="Fine-tuning epochs after pruning."
    ),
    click.option("--steps", type=click.IntRange(min=1), help="Optimisation steps (FCPTS)."),
    click.option(
        "--calib-samples",
        type=click.IntRange(min=1),
        help="Calibration samples (post-training methods).",
    ),
    click.option(
        "--density", type=click.Choice(["histogram", "kde"]), help="FCPTS density estimate."
    ),
    click.option(
        "--mask-samples", type=click.IntRange(min=1), help="Masks sampled per batch (ProbMask)."
    ),
    click.option(
        "--from-scratch",
        is_flag=True,
        default=None,
        help="ProbMask: the paper's start (scores 1, keep from 1) for an untrained model; "
        "default: start from the trained weights' magnitudes.",
    ),
    click.option(
        "--residual",
        type=click.Choice(["mixed", "tied"]),
        help="Residual block style (bar, channel-magnitude) [default: tied under "
        "--budget-metric latency, else mixed].",
    ),
    click.option(
        "--round-to",
        type=int,
        metavar="N",
        help="Structured methods: every slimmed layer keeps a multiple of N channels "
        "(or all of them); default 1 (free), under --budget-metric latency the multiple "
        "where the measured kernel rate steps up.",
    ),
    click.option("--variant", type=click.Choice(["element", "structure"]), help="GSS variant."),
    click.option("--norms", type=click.Choice(["212", "121"]), help="GSS norm order."),
    click.option("--p", "p", type=click.FloatRange(min=0, min_open=True), help="GSS p."),
    click.option("--q", "q", type=click.FloatRange(min=0, min_open=True), help="GSS q."),
    click.option("--lambda", "lambda_", type=click.FloatRange(min=0), help="Regulariser weight."),
    click.option("--lr", type=click.FloatRange(min=0, min_open=True), help="Weight learning rate."),
    click.option("--batch-size", type=click.IntRange(min=1), help="Batch size."),
    click.option(
        "--pattern",
        callback=lambda ctx, param, value: _check_pattern(value),
        help="Sparsity pattern: N:M (e.g. 2:4) or RxC blocks (e.g. 1x4); unstructured methods.",
    ),
    click.option(
        "--allow-layer-collapse",
        is_flag=True,
        default=None,
        help="Accept layers left with no weight (by default every layer keeps a few).",
    ),
)


def _check_pattern(value: str | None) -> str | None:
    """--pattern refused before any loading when malformed (exit 2, the parser's message)."""
    if value is not None:
        from compressor.errors import InputError
        from compressor.patterns import parse_pattern

        try:
            parse_pattern(value)
        except InputError as exc:
            raise click.BadParameter(str(exc), param_hint="--pattern") from None
    return value


def method_options(fn):
    for option in reversed(METHOD_FLAGS):
        fn = option(fn)
    return fn
