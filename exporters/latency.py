"""Latency measured on the deployment runtime: each model exported to ONNX in memory and
run in onnxruntime on the CPU.

FLOPs predict speed only roughly (a slimmed graph may add gathers; a sparse one runs dense
kernels), so `--measure-latency` times the real thing. The models are timed in rounds,
dense then pruned within each round, so drift of the machine (other load, frequency
scaling) hits both alike; the median over rounds discards a round that a burst of other
work slowed down. One intra-op thread by default: the number is then comparable between
machines and does not depend on how many cores happen to be free.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from compressor.errors import CompressorError, InputError, first_line
from exporters._common import eval_mode
from exporters.onnx import to_onnx

THREADS = 1  # intra-op threads: comparable across machines, independent of free cores
BATCHES = (1, 32)  # a single request, and a throughput batch
ROUNDS = 7  # timed rounds per batch size; the median is reported
MIN_SAMPLE_S = 0.02  # one timed sample repeats a run until it lasts this long (timer noise)
MAX_REPEATS = 1000


def time_alternating(
    runners: Mapping[str, Callable[[], object]],
    rounds: int = ROUNDS,
    repeats: Mapping[str, int] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Median milliseconds per run of each runner, timed in alternating rounds.

    Each round times every runner once, in the mapping's order; a runner's sample is the
    time of `repeats[name]` back-to-back runs divided by that count.
    """
    if rounds < 1:
        raise InputError(f"latency rounds {rounds} must be at least 1")
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            count = (repeats or {}).get(name, 1)
            start = clock()
            for _ in range(count):
                run()
            samples[name].append((clock() - start) * 1000.0 / count)
    return {name: statistics.median(values) for name, values in samples.items()}


def repeats_for(run: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> int:
    """How many back-to-back runs last MIN_SAMPLE_S, from one warm run (at most MAX_REPEATS)."""
    run()  # the first run allocates; time the second
    start = clock()
    run()
    elapsed = clock() - start
    return max(1, min(MAX_REPEATS, int(MIN_SAMPLE_S / elapsed) if elapsed > 0 else MAX_REPEATS))


def measure_latency(
    models: Mapping[str, nn.Module],
    example: tuple[torch.Tensor, ...],
    *,
    threads: int = THREADS,
    batches: Sequence[int] = BATCHES,
    rounds: int = ROUNDS,
) -> dict[str, dict[str, float]]:
    """Median ms per forward pass of each model in onnxruntime, per batch size.

    Args:
        models: name -> model; timed in this order within each round.
        example: sample inputs (batch first); the first sample, repeated, fills each batch.
        threads: onnxruntime intra-op threads.
        batches: batch sizes to time.
        rounds: timed rounds per batch size.

    Returns:
        {name: {str(batch): ms}}, e.g. {"dense": {"1": 0.21, "32": 3.4}, ...}.

    Raises:
        InputError: threads or a batch size below 1.
        CompressorError: a model does not export to ONNX or onnxruntime cannot run it.
    """
    _check_settings(threads, batches)  # before exporting anything
    graphs = {name: onnx_graph(model, example) for name, model in models.items()}
    return measure_graphs(graphs, example, threads=threads, batches=batches, rounds=rounds)


def onnx_graph(model: nn.Module, example: tuple[torch.Tensor, ...]) -> bytes:
    """The serialised ONNX graph that `measure_latency` times (dynamic batch axis)."""
    return _graph(model, example)


def measure_graphs(
    graphs: Mapping[str, bytes],
    example: tuple[torch.Tensor, ...],
    *,
    threads: int = THREADS,
    batches: Sequence[int] = BATCHES,
    rounds: int = ROUNDS,
) -> dict[str, dict[str, float]]:
    """`measure_latency` on graphs exported once (`onnx_graph`), so a caller timing one
    baseline against many candidates exports the baseline only once."""
    _check_settings(threads, batches)
    sessions = {name: _session(graph, threads) for name, graph in graphs.items()}
    return time_sessions(sessions, example, batches, rounds)


def time_sessions(sessions: Mapping, example: tuple, batches: Sequence[int], rounds: int) -> dict:
    """`measure_latency` on onnxruntime sessions already built (name -> session)."""
    out: dict[str, dict[str, float]] = {name: {} for name in sessions}
    for batch in batches:
        feeds = {name: _feed(session, example, batch) for name, session in sessions.items()}
        runners = {name: _runner(sessions[name], feeds[name], batch) for name in sessions}
        repeats = {name: repeats_for(run) for name, run in runners.items()}
        for name, ms in time_alternating(runners, rounds, repeats).items():
            out[name][str(batch)] = ms
    return out


def speedup(dense: Mapping[str, float], pruned: Mapping[str, float]) -> dict[str, float]:
    """dense / pruned per batch size."""
    return {batch: dense[batch] / pruned[batch] for batch in dense}


def _check_settings(threads: int, batches: Sequence[int]) -> None:
    if threads < 1 or any(b < 1 for b in batches):
        raise InputError(f"latency threads {threads} and batch sizes {list(batches)} must be >= 1")


def _graph(model: nn.Module, example: tuple[torch.Tensor, ...]) -> bytes:
    if len(example[0]) < 2:  # torch.export specialises a size-1 batch; keep it dynamic
        example = tuple(torch.cat([x, x]) for x in example)
    with eval_mode(model):
        return to_onnx(model, example).SerializeToString()


def _session(graph: bytes, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    try:
        return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise CompressorError(f"onnxruntime cannot load the graph: {first_line(exc)}") from exc


def _feed(session, example: tuple[torch.Tensor, ...], batch: int) -> dict[str, np.ndarray]:
    arrays = [x[:1].expand(batch, *x.shape[1:]).contiguous().numpy() for x in example]
    return {spec.name: array for spec, array in zip(session.get_inputs(), arrays)}


def _runner(session, feed: dict[str, np.ndarray], batch: int) -> Callable[[], object]:
    def run() -> object:
        try:
            return session.run(None, feed)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise CompressorError(
                f"onnxruntime could not run the graph at batch {batch}: {first_line(exc)}; "
                "try another --latency-batch"
            ) from exc

    return run


def graph_measurer(
    example: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    threads: int = THREADS,
    batches: Sequence[int] = BATCHES,
    rounds: int = ROUNDS,
) -> Callable[[nn.Module, nn.Module], dict]:
    """The `prune(..., measure_latency=...)` check of a latency budget: (dense, slimmed)
    exported to ONNX in memory and timed by `measure_latency` (batch 1 is always timed).

    Returns:
        A callable giving {"dense": {batch: ms}, "pruned": {...}, "speedup": {...},
        "threads": threads, "runtime": "onnxruntime X (CPU)"}.
    """
    import onnxruntime

    _check_settings(threads, batches)
    batches = tuple(dict.fromkeys((1, *batches)))
    example = (example,) if isinstance(example, torch.Tensor) else tuple(example)
    dense_sessions: dict[int, object] = {}  # re-fits time the same dense model: export it once
    last: list = [None, b""]  # the slimmed model checked last and its graph (checks repeat)

    def measure(dense: nn.Module, slimmed: nn.Module) -> dict:
        if id(dense) not in dense_sessions:
            dense_sessions[id(dense)] = _session(_graph(dense, example), threads)
        if last[0] is not slimmed:
            last[:] = [slimmed, _graph(slimmed, example)]
        sessions = {"dense": dense_sessions[id(dense)]}
        sessions["pruned"] = _session(last[1], threads)  # fresh: a repeated check is its own
        timed = time_sessions(sessions, example, batches, rounds)
        extra = {"speedup": speedup(timed["dense"], timed["pruned"]), "threads": threads}
        return timed | extra | {"runtime": f"onnxruntime {onnxruntime.__version__} (CPU)"}

    return measure
