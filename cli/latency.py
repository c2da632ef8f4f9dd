"""`--measure-latency` for `compress prune` and `compress info` (timing in exporters.latency)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import click


@dataclass(frozen=True)
class LatencyRequest:
    """What `--measure-latency` asked for: onnxruntime threads and the batch sizes to time."""

    threads: int
    batches: tuple[int, ...]
    measure: bool = True  # --measure-latency given (a latency budget measures anyway)


def latency_options(command: Callable) -> Callable:
    """Adds --measure-latency, --latency-threads and --latency-batch to a command.

    The command receives them as one argument, `latency`: a LatencyRequest whose
    `measure` says whether --measure-latency was given.
    """

    @functools.wraps(command)
    def wrapper(*args, measure_latency, latency_threads, latency_batch, **kwargs):
        batches = (1,) if latency_batch == 1 else (1, latency_batch)
        request = LatencyRequest(latency_threads, batches, measure_latency)
        return command(*args, latency=request, **kwargs)

    options = (
        click.option(
            "--measure-latency",
            is_flag=True,
            help="Time the model in onnxruntime (CPU) at batch 1 and --latency-batch.",
        ),
        click.option(
            "--latency-threads",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="onnxruntime intra-op threads for --measure-latency and a latency budget's check.",
        ),
        click.option(
            "--latency-batch",
            type=click.IntRange(min=1),
            default=32,
            show_default=True,
            help="The second batch size --measure-latency times (besides 1).",
        ),
    )
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def prune_latency(
    report: dict, dense, pruned, example: tuple, request: LatencyRequest | None
) -> None:
    """Adds `latency_ms` (dense, pruned, speedup per batch size) to a prune report when asked.

    Modifies `report` in place; does nothing when not asked or already measured (the
    check of a latency budget measures the same).
    """
    if request is None or not request.measure or "latency_ms" in report:
        return
    from exporters.latency import measure_latency, speedup

    models = {"dense": dense, "pruned": pruned}
    timed = measure_latency(models, example, threads=request.threads, batches=request.batches)
    timed["speedup"] = speedup(timed["dense"], timed["pruned"])
    report["latency_ms"] = timed | {"threads": request.threads, "runtime": _runtime()}


def model_latency(model, example: tuple, request: LatencyRequest | None) -> dict:
    """`{"latency_ms": {"model": {batch: ms}, ...}}` for `compress info`; {} when not asked."""
    if request is None or not request.measure:
        return {}
    from exporters.latency import measure_latency

    timed = measure_latency(
        {"model": model}, example, threads=request.threads, batches=request.batches
    )
    return {"latency_ms": timed | {"threads": request.threads, "runtime": _runtime()}}


def print_model_latency(found: dict) -> None:
    """The latency line of `compress info` (nothing when it was not measured)."""
    if found:
        timed = found["latency_ms"]["model"]
        click.echo("latency: " + ", ".join(f"batch {b}: {ms:.3g} ms" for b, ms in timed.items()))


def budget_measurer(budget, example: tuple, request: LatencyRequest):
    """prune()'s `measure_latency` for a latency budget (None for any other budget)."""
    if getattr(budget, "metric", None) != "latency":
        return None
    from exporters.latency import graph_measurer

    return graph_measurer(example, threads=request.threads, batches=request.batches)


def _runtime() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__} (CPU)"
