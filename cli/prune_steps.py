"""The steps of `compress prune`: resolve the options, validate the inputs, run, write.

Each step refuses what it can before the next, slower one starts: nothing trains for hours
to fail on a bad option, a missing label or an unwritable output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from cli.common import emit_json, example_inputs, load, load_data_spec
from cli.tables import print_prune_summary


@dataclasses.dataclass
class PruneJob:
    """What `compress prune` works on once its options and inputs are checked."""

    source: str  # the MODEL argument, recorded in the report and never overwritten
    output: str
    loaded: Any  # compressor.io.Loaded
    data: Any  # compressor.data.Data | None
    test_loader: Any  # held-out labelled batches, or None
    task_output: Any
    min_accuracy: float | None


@contextlib.contextmanager
def ranks(nproc: int | None) -> Iterator[None]:
    """The block runs on every rank (launched here with `nproc`); the group ends after it.

    `distributed.shutdown()` runs in a finally: the process group is destroyed whether
    the run ends, fails or is refused.
    """
    from compressor import distributed

    _start_ranks(nproc)
    try:
        yield
    finally:
        distributed.shutdown()


def _start_ranks(nproc: int | None) -> None:
    """Launches `nproc` workers when asked (this process then exits), or joins their group."""
    from compressor import distributed

    if nproc is not None and nproc > 1 and not distributed.launched():
        _launch_workers(nproc)
    if nproc is not None and distributed.launched():
        size = distributed.world_size_from_env()
        if nproc != size:
            raise click.UsageError(
                f"--nproc {nproc} inside a launcher that started {size} processes; "
                "drop --nproc when torchrun starts the workers"
            )
    distributed.init_from_env()


def resolve(method: str, options: dict, method_opts: dict):
    """The method's class, its config from --set / flags / --exclude, and the budget."""
    from compressor.methods import get_method

    cls = get_method(method)
    config = parse_settings(options["settings"], cls) | _method_flags(method_opts, cls)
    config |= {"exclude": tuple(options["exclude"])} if options["exclude"] else {}
    if options["task_output"] is not None:
        config["output"] = options["task_output"]
    budget = options["budget"]
    sparsity, metric = options["sparsity"], options["budget_metric"]
    if (budget is None) == (sparsity is None):
        raise click.UsageError("give exactly one of --budget (e.g. 4x) or --sparsity (e.g. 0.9)")
    if sparsity is not None:
        return cls, config, sparsity
    from compressor.budget import Budget

    return cls, config, Budget(metric or cls.default_metric(config), budget.keep)


def validate(cls, source: str, output: str, options: dict) -> PruneJob:
    """Loads data and model and checks them (labels, accuracy floor, writable output)."""
    from cli.guard import check_min_accuracy_usable
    from compressor.errors import InputError
    from compressor.writable import check_savable

    data = load_data_spec(options["data"], seed=options["seed"])
    loaded = load(source, options["arch"], options["trust_pickle"], data)
    if cls.needs != "nothing" and data is None:
        raise InputError(f"method {options['method']!r} needs --data (it uses {cls.needs})")
    check_min_accuracy_usable(options["min_accuracy"], data)
    labelled = data is not None and data.has_labels
    check_savable(loaded.model, output, example_inputs(loaded, data), loaded.format)
    return PruneJob(
        source=source,
        output=output,
        loaded=loaded,
        data=data,
        test_loader=(data.test or data.val) if labelled else None,
        task_output=options["task_output"],
        min_accuracy=options["min_accuracy"],
    )


def run(job: PruneJob, target, config: dict, options: dict):
    """Prunes (every rank); returns the Result on rank 0 with accuracies added, else None."""
    from cli.guard import check_pruned
    from cli.latency import budget_measurer, prune_latency
    from compressor import distributed
    from compressor.methods import prune
    from compressor.train import evaluate

    main = distributed.is_main()
    dense_top1 = evaluate(job.loaded.model, job.test_loader, job.task_output) if main else None
    example = example_inputs(job.loaded, job.data)
    result = prune(
        job.loaded.model,
        options["method"],
        target,
        job.data,
        seed=options["seed"],
        checkpoint_path=options["checkpoint_path"],
        resume=options["resume"],
        check_ranks=options["check_ranks"],
        measure_latency=budget_measurer(target, example, options["latency"]),
        **config,
    )
    if not main:
        return None  # rank 0 writes the files and prints
    result.report["dense_top1"] = dense_top1
    result.report["top1"] = evaluate(result.model, job.test_loader, job.task_output)
    result.report["source"] = job.source
    check_pruned(result.report, job.data, job.min_accuracy)
    prune_latency(result.report, job.loaded.model, result.model, example, options["latency"])
    return result


def write(job: PruneJob, result, report_path: str | None, as_json: bool) -> None:
    """Writes the .pt2 (and --report), never over the input; prints the summary."""
    from compressor.io import atomic_write, save_model

    save_model(
        result.model,
        job.output,
        example_inputs=example_inputs(job.loaded, job.data),
        report=result.report,
        protect=(job.source,),
    )
    if report_path:
        text = json.dumps(result.report, indent=2, default=str)
        atomic_write(report_path, lambda tmp: Path(tmp).write_text(text), protect=(job.source,))
    if as_json:
        emit_json(result.report)
    else:
        print_prune_summary(result.report, job.output)


def _launch_workers(nproc: int) -> None:
    """Re-runs this command line (without --nproc) in `nproc` workers; exits with their code."""
    from compressor import distributed

    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    sys.exit(distributed.launch(nproc, argv))


def _method_flags(values: dict, cls) -> dict:
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    given = {k: v for k, v in values.items() if v is not None}
    for key in given:
        if key not in fields:
            flag = "--" + key.rstrip("_").replace("_", "-")
            raise click.UsageError(
                f"method {cls.name!r} has no option {flag}; its options: {', '.join(sorted(fields))}"
            )
    return given


def parse_settings(settings: tuple[str, ...], cls) -> dict:
    fields = {f.name: f for f in dataclasses.fields(cls.Config)}
    out = {}
    for item in settings:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise click.BadParameter(
                f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(sorted(fields))}",
                param_hint="--set",
            )
        optional = fields[key].default is None
        if optional and raw.strip().lower() == "none":
            out[key] = None  # an optional field back to its automatic value
        else:
            out[key] = _coerce(raw.strip(), _typed_default(fields[key]), key)
    return out


def _typed_default(field: dataclasses.Field):
    """The field's default, or for an optional field (`int | None = None`) a plain value of
    its type, so `--set round_to=8` parses as the int it names."""
    if field.default is None:
        kind = str(field.type).split("|")[0].strip()
        return {"int": 0, "float": 0.0, "bool": False}.get(kind)
    return field.default


_KINDS = {bool: "true or false", int: "a whole number", float: "a number"}


def _coerce(raw: str, default, key: str):
    try:
        if isinstance(default, bool):
            if raw.lower() not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(raw)
            return raw.lower() in {"true", "1", "yes"}
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            return tuple(v for v in raw.split(",") if v)
    except ValueError:
        raise click.BadParameter(
            f"{key}={raw!r} is not {_KINDS.get(type(default), 'valid')}", param_hint="--set"
        ) from None
    return raw
