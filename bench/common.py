"""Helpers shared by the benchmark scripts: timing, tables, and RESULTS.md sections."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
OUT = Path(__file__).with_name("out")


def median_time(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time of `repeats` calls of `fn`, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub markdown table of `rows` (dicts) in `columns` order."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _busy_seconds() -> float | None:
    """CPU seconds every core of the machine has spent busy since boot (Linux), else None."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    own = os.times()  # this process and the children it has waited for
    return own.user + own.system + own.children_user + own.children_system


# Where the run started: `machine()` reports how busy the other processes kept the cores since
# (timings taken beside other work are slower and noisier than on an idle machine). The
# 1-minute load average would not do: it still counts work that ended before the run.
_START = (time.monotonic(), _busy_seconds(), _own_seconds())


def background_cores() -> float | None:
    """Cores kept busy by other processes on average since this run started (None: unknown)."""
    busy = _busy_seconds()
    wall = time.monotonic() - _START[0]
    if busy is None or _START[1] is None or wall <= 0:
        return None
    return max(0.0, (busy - _START[1] - (_own_seconds() - _START[2])) / wall)


def machine(load: bool = True) -> str:
    """The machine in a RESULTS header, with the other processes' load during the run;
    `load=False` where the run spans many starts (a report rebuilt from resumed cells)."""
    cores = f"{os.cpu_count()} cores"
    other = background_cores() if load else None
    if other is not None:
        cores += f" ({other:.1f} of them busy with other processes on average during the run)"
    threads = f"{torch.get_num_threads()} torch threads"
    return f"{platform.machine()}, {cores}, {threads}, torch {torch.__version__}"


def write_section(name: str, body: str) -> None:
    """Replaces (or appends) the `name` section of bench/RESULTS.md, between markers."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text)


def write_json(name: str, payload: object) -> Path:
    OUT.mkdir(exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path


def dense_baseline(
    arch: str,
    spec: str,
    *,
    epochs: int,
    limit: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    **kwargs,
):
    """A dense zoo model trained on `spec`, cached in bench/out so benchmarks share it.

    Returns (model, data). The cache key holds every training setting, so a changed
    setting retrains instead of reusing a stale model. `val_fraction` 0 trains on the whole
    training set (a paper's protocol); `kwargs` go to the zoo builder.
    """
    from compressor import zoo
    from compressor.data import load_data
    from compressor.io import load_model, save_model
    from compressor.train import train_dense

    data = load_data(spec, seed=seed, limit=limit, val_fraction=val_fraction)
    extra = "-".join(f"{k}{v}" for k, v in sorted(kwargs.items()))
    extra += "" if val_fraction == 0.1 else f"-v{val_fraction:g}"
    key = (
        f"dense-{arch}-{spec.replace(':', '_').replace('/', '_')}-e{epochs}-n{limit}-s{seed}{extra}"
    )
    path = OUT / f"{key}.pt2"
    if path.exists():
        return load_model(path).model, data
    torch.manual_seed(seed)
    shape = data.input_shape
    model = zoo.build(
        arch,
        in_channels=shape[0],
        num_classes=data.num_classes,
        input_size=tuple(shape[1:]),
        **kwargs,
    )
    train_dense(model, data.train, epochs=epochs)
    OUT.mkdir(exist_ok=True)
    save_model(model, path, example_inputs=(data.sample_inputs(2),), report={"method": "dense"})
    return model, data
