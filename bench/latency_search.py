"""The latency benchmark's machinery: a speed-up search, timers, and a per-cell checkpoint.

A structured method takes a FLOP budget, not a speed-up. `search_factor` finds the FLOP
reduction factor whose *measured* speed-up lands within a tolerance of the target: each probe
prunes at a factor, exports the slimmed model to ONNX and times it against the dense one.
Speed-up grows with the factor but not in proportion (onnxruntime's kernels run narrow layers
at a lower rate), so the search brackets the target and interpolates in log-log space, with a
bisection guard against noisy, non-monotone measurements.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from compressor.errors import CompressorError
from compressor.stats import measure

DENSE = (1.0, 1.0)  # (factor, speed-up) of the dense model: the search's lower anchor


@dataclass
class Search:
    """What a speed-up search found: the best probe and every probe it tried."""

    factor: float  # the knob of the best probe (a FLOP reduction factor)
    speedup: float | None  # its measured speed-up (None: every probe failed)
    met: bool  # within the tolerance of the target
    payload: object = None  # whatever the best probe returned besides its speed-up
    probes: list[dict] = field(default_factory=list)  # {"factor", "speedup"} in order


Probe = Callable[[float], tuple[float | None, object]]


def search_factor(
    probe: Probe,
    target: float,
    *,
    tolerance: float,
    steps: int,
    first: float | None = None,
    cap: float = 64.0,
) -> Search:
    """The factor whose probe's speed-up is within `tolerance` (relative) of `target`.

    Args:
        probe: factor -> (measured speed-up, payload); speed-up None when pruning to that
            factor failed (treated as overshooting).
        target: the speed-up wanted, e.g. 2.0.
        tolerance: accepted |speed-up / target - 1|.
        steps: most probes to run.
        first: the first factor tried (default: the target itself).
        cap: the largest factor tried.

    Returns:
        The first probe within tolerance, else the closest one (`met` False).
    """
    low, high = DENSE, None
    factor, best = min(cap, first or target), Search(1.0, None, False)
    for _ in range(steps):
        speedup, payload = probe(factor)
        best.probes.append({"factor": factor, "speedup": speedup})
        if speedup is not None and _closer(speedup, best.speedup, target):
            best.factor, best.speedup, best.payload = factor, speedup, payload
        if speedup is not None and abs(speedup / target - 1) <= tolerance:
            break
        if speedup is None or speedup > target:
            high = (factor, speedup)
        else:
            low = max(low, (factor, speedup))
        factor = next_factor(low, high, target, cap)
        if factor is None:
            break
    best.met = best.speedup is not None and abs(best.speedup / target - 1) <= tolerance
    return best


def next_factor(low: tuple, high: tuple | None, target: float, cap: float) -> float | None:
    """The next factor to try between `low` (too slow) and `high` (too fast or failed).

    None when the bracket has closed (or the cap is reached) and no probe can help.
    """
    if high is None:  # nothing fast enough yet: extrapolate from the dense model
        if low[0] >= cap:
            return None
        slope = 1.0  # d log speed-up / d log factor; 1 would be speed-up == FLOP cut
        if low[0] > 1.0 and low[1] > 0:
            slope = min(1.0, max(0.25, math.log(low[1]) / math.log(low[0])))
        step = (target / max(low[1], 1e-3)) ** (1.0 / slope)
        return min(cap, low[0] * min(2.0, max(1.1, step)))  # at most doubling per probe
    if high[0] / low[0] < 1.005:
        return None
    a, b = math.log(low[0]), math.log(high[0])
    if high[1] is None or high[1] <= low[1] or low[1] <= 0:  # no usable slope: bisect
        return math.exp(0.5 * (a + b))
    t = math.log(target / low[1]) / math.log(high[1] / low[1])
    t = min(0.85, max(0.15, t))  # interpolation, kept off the ends so the bracket shrinks
    return math.exp(a + t * (b - a))


def _closer(speedup: float, best: float | None, target: float) -> bool:
    return best is None or abs(math.log(speedup / target)) < abs(math.log(best / target))


# --- timers -----------------------------------------------------------------------------------


class OrtTimer:
    """Times a model against its dense baseline in onnxruntime (exporters.latency).

    The dense graph is exported once per baseline key; every call times dense and candidate
    in alternating rounds, so both see the same machine load.
    """

    def __init__(self, example: tuple[torch.Tensor, ...], threads: int = 1):
        self.example, self.threads = example, threads
        self._dense: dict[str, bytes] = {}

    def __call__(
        self, key: str, dense: nn.Module, model: nn.Module, batches, rounds: int
    ) -> dict[str, dict[str, float]]:
        """{"dense": {batch: ms}, "model": {batch: ms}} (batches as strings)."""
        from exporters.latency import measure_graphs, onnx_graph

        if key not in self._dense:
            self._dense[key] = onnx_graph(dense, self.example)
        graphs = {"dense": self._dense[key], "model": onnx_graph(model, self.example)}
        return measure_graphs(
            graphs, self.example, threads=self.threads, batches=batches, rounds=rounds
        )


class FlopTimer:
    """A deterministic stand-in for OrtTimer: ms = overhead + ms_per_mflop * MFLOPs * batch.

    The overhead per batch makes the speed-up fall short of the FLOP cut, as real runtimes
    do, so a search that assumed speed-up == FLOP cut would miss.
    """

    def __init__(self, example, overhead_ms: float = 0.5, ms_per_mflop: float = 0.1):
        self.example, self.overhead, self.rate = example, overhead_ms, ms_per_mflop
        self.calls = 0

    def __call__(self, key, dense, model, batches, rounds) -> dict[str, dict[str, float]]:
        self.calls += 1
        return {name: self.ms(m, batches) for name, m in (("dense", dense), ("model", model))}

    def ms(self, model: nn.Module, batches) -> dict[str, float]:
        mflops = measure(model, self.example).flops / 1e6
        return {str(b): self.overhead + self.rate * mflops * b for b in batches}


# --- checkpoint -------------------------------------------------------------------------------


class CellStore:
    """Finished cells of a benchmark run, one JSON file, rewritten atomically after each cell.

    A rerun with the same file skips every finished cell, so a long run resumes where it
    stopped (a crash leaves the old file or the new one, never half of one). `settings` are
    what the cells' values depend on: a file written under other settings is refused rather
    than mixed into a table with them.
    """

    def __init__(self, path: Path, settings: dict | None = None):
        self.path, self.settings = Path(path), settings or {}
        self.cells: dict[str, dict] = {}
        if self.path.exists():
            stored = json.loads(self.path.read_text())
            if stored.get("settings", {}) != json.loads(json.dumps(self.settings)):
                raise CompressorError(
                    f"{self.path} holds cells of a run with other settings "
                    f"({stored.get('settings')}); move it away to start afresh, or run "
                    "with the settings it was written with"
                )
            self.cells = stored["cells"]

    def run(self, key: str, compute: Callable[[], dict]) -> dict:
        """The stored row of `key`, or `compute()`'s, stored before it is returned."""
        if key not in self.cells:
            self.cells[key] = compute()
            self._save()
        return self.cells[key]

    def run_timed(self, key: str, job: Callable[[], dict], flags: str) -> dict:
        """`run` of `job`, whose row also records its seconds and the flags of the command
        that made it (`commands`); prints the key when done."""

        def compute() -> dict:
            start = time.perf_counter()
            return job() | {"cell s": round(time.perf_counter() - start), "run": flags}

        row = self.run(key, compute)
        print(f"{key}: done", flush=True)
        return row

    def commands(self, module: str) -> str:
        """The commands that made the stored cells (`run_timed`), in run order, as code."""
        runs = dict.fromkeys(cell["run"] for cell in self.cells.values())
        return ", ".join(f"`.venv/bin/python -m {module}{run}`" for run in runs)

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        payload = {"settings": self.settings, "cells": self.cells}
        tmp.write_text(json.dumps(payload, indent=1, default=str))
        os.replace(tmp, self.path)
