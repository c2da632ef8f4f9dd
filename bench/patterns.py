"""Pattern benchmark (issue 19): unstructured vs N:M vs RxC blocks at the same sparsity.

LeNet-5 and ResNet-20 on Fashion-MNIST (the dense baselines bench/fcpts.py and
bench/probmask.py train, shared through `dense_baseline`'s cache), pruned by
magnitude-global, FCPTS and GMP to

    50 %: unstructured, 2:4, 4:8      80 % and 90 %: unstructured, 1x4, 4x1

N:M fixes each patterned layer at 1 - N/M and leaves layers whose column count is not a
multiple of M dense, so its cell asks for the sparsity N:M reaches on every eligible
layer when that is not within the budget tolerance of 50 % (the table shows what was
achieved). Each cell reports top-1 on the 10k test split and the CSR pack's bytes
(`exporters.csr.export_csr` in the layout the report's pattern names) against the floor
(`exporters.csr_floor.pack_floor`, docs/csr-format.md section 8), for the whole file and
for its data (the file less the safetensors header of tensor names and shapes).

Every finished cell is checkpointed in bench/out/patterns/ (JSON), so a rerun resumes.

    .venv/bin/python -m bench.patterns              # the full table, both models
    .venv/bin/python -m bench.patterns --quick      # digits, LeNet-5, tiny settings
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from bench.common import OUT, dense_baseline, machine, markdown_table, write_json, write_section
from compressor.data import load_data
from compressor.masks import prunable_layers
from compressor.methods import prune
from compressor.methods.targets import TARGET_TOLERANCE
from compressor.pattern_masks import nm_reach
from compressor.patterns import parse_pattern
from compressor.train import evaluate

SPEC = "fashion-mnist"
DENSE = {  # bench/fcpts.py's and bench/probmask.py's dense baselines (the same cache keys)
    "lenet5": {"epochs": 4, "limit": None},
    "resnet20": {"epochs": 10, "limit": 20000},
}
METHODS = ("magnitude-global", "fcpts", "gmp")
CELLS = (  # (pattern, sparsity); None: unstructured
    (None, 0.5), ("2:4", 0.5), ("4:8", 0.5),
    (None, 0.8), ("1x4", 0.8), ("4x1", 0.8),
    (None, 0.9), ("1x4", 0.9), ("4x1", 0.9),
)  # fmt: skip
# GMP trains as in bench/probmask.py (epochs, fine-tuning, data subset, weight lr 0.05);
# FCPTS post-trains on 1024 images, official 1600 steps on LeNet-5, 200 on ResNet-20.
CONFIG = {
    "lenet5": {"gmp": {"epochs": 2, "finetune_epochs": 1, "lr": 0.05}, "fcpts": {}},
    "resnet20": {"gmp": {"epochs": 2, "finetune_epochs": 1, "lr": 0.05}, "fcpts": {"steps": 200}},
}
TRAIN_LIMIT = {"lenet5": None, "resnet20": 10000}
QUICK = {  # a smoke run of the script: digits, LeNet-5, every cell, nothing written
    "data": "digits",
    "dense": {"epochs": 2, "limit": None},
    "config": {"gmp": {"epochs": 1, "finetune_epochs": 1}, "fcpts": {"steps": 20}},
    "calib": 256,
}
CALIB = 1024
CHECKPOINTS = OUT / "patterns"


def requested_sparsity(model: nn.Module, pattern: str | None, sparsity: float) -> float:
    """`sparsity`, or for N:M the most it reaches when 50 % is out of the tolerance."""
    if pattern is None or parse_pattern(pattern).kind != "nm":
        return sparsity
    shapes = {f: m.weight.shape for f, m in prunable_layers(model).items()}
    _, most = nm_reach(shapes, parse_pattern(pattern), list(shapes))
    return sparsity if abs(most - sparsity) <= TARGET_TOLERANCE else most


def pack_sizes(model: nn.Module, report: dict, example: torch.Tensor) -> dict:
    """The CSR pack's bytes in the layout the report's pattern asks for, and its floor.

    `export_csr` with no block packs each pattern layer in its pattern's layout (RxC blocks,
    the N:M layout); `pack_floor` is docs/csr-format.md section 8's floor. `data` is the
    file less its safetensors header (tensor names and shapes), which the floor leaves out.
    """
    from exporters import csr
    from exporters.csr_floor import pack_floor

    with tempfile.TemporaryDirectory() as folder:
        pack = csr.export_csr(model, Path(folder) / "p.safetensors", (example,), report=report)
    floor = pack_floor(model, report, "fp32")
    data = pack.size_bytes - pack.header_bytes
    return {
        "pack_bytes": pack.size_bytes,
        "floor_bytes": floor,
        "pack_over_floor": pack.size_bytes / floor,
        "data_over_floor": data / floor,
    }


def run_cell(
    model: nn.Module, data, method: str, pattern: str | None, sparsity: float, config: dict
) -> dict:
    """Prunes `model` with `method` to `pattern` at `sparsity`; top-1, sparsity, pack sizes."""
    options = config | ({"pattern": pattern} if pattern else {})
    requested = requested_sparsity(model, pattern, sparsity)
    start = time.perf_counter()
    result = prune(model, method, requested, data, seed=0, **options)
    seconds = time.perf_counter() - start
    layers = prunable_layers(result.model).values()
    zeros = sum(int((m.weight == 0).sum()) for m in layers)
    total = sum(m.weight.numel() for m in layers)
    test = data.test or data.val
    return {
        "method": method,
        "pattern": pattern or "unstructured",
        "sparsity": sparsity,
        "requested": requested,
        "achieved": zeros / total,
        "top1": evaluate(result.model, test),
        "seconds": seconds,
        "pattern_layers": result.report.get("pattern_layers"),
    } | pack_sizes(result.model, result.report, data.sample_inputs(2))


def cached_cell(key: str, compute) -> dict:
    """The cell's checkpoint (bench/out/patterns/KEY.json), computed and written if absent."""
    path = CHECKPOINTS / f"{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    row = compute()
    CHECKPOINTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(row, indent=2))
    return row


def bench_model(arch: str, methods, quick: dict) -> dict:
    """Every (method, cell) on one model; cells are checkpointed unless quick."""
    model, data = dense_baseline(arch, quick.get("data", SPEC), **quick.get("dense", DENSE[arch]))
    train = data
    if not quick and TRAIN_LIMIT[arch] is not None:  # GMP trains on a subset, as bench/probmask
        train = load_data(SPEC, limit=TRAIN_LIMIT[arch])
    dense_top1 = evaluate(model, data.test or data.val)
    print(f"{arch}: dense top-1 {dense_top1:.4f}", flush=True)
    rows = []
    for method in methods:
        config = quick.get("config", CONFIG[arch]).get(method, {})
        if method == "fcpts":
            config = config | {"calib_samples": quick.get("calib", CALIB)}
        for pattern, sparsity in CELLS:
            used = train if method == "gmp" else data
            key = f"{arch}-{method}-{pattern or 'unstructured'}-{sparsity}".replace(":", "of")

            compute = functools.partial(run_cell, model, used, method, pattern, sparsity, config)
            row = compute() if quick else cached_cell(key, compute)
            print(f"  {_line(row)}", flush=True)
            rows.append(row)
    return {"arch": arch, "dense_top1": dense_top1, "rows": rows}


def _line(row: dict) -> str:
    return (
        f"{row['method']:16s} {row['pattern']:12s} {row['sparsity']:.0%}: top-1 "
        f"{row['top1']:.4f} (achieved {row['achieved']:.4f}, {row['seconds']:.1f} s, "
        f"pack {_fmt(row['pack_bytes'])} B, floor {_fmt(row['floor_bytes'])})"
    )


def _fmt(value, spec: str = "d") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return format(value, spec)


def table(result: dict) -> str:
    """One row per (method, cell): top-1, its change against unstructured, pack / floor."""
    base = {
        (r["method"], r["sparsity"]): r["top1"]
        for r in result["rows"]
        if r["pattern"] == "unstructured"
    }
    rows = [
        {
            "method": r["method"],
            "sparsity": f"{r['sparsity']:.0%}",
            "pattern": r["pattern"],
            "achieved": f"{100 * r['achieved']:.2f}",
            "top-1 %": f"{100 * r['top1']:.2f}",
            "vs unstructured": f"{100 * (r['top1'] - base[r['method'], r['sparsity']]):+.2f}",
            "pack bytes": _fmt(r["pack_bytes"]),
            "floor bytes": _fmt(r["floor_bytes"]),
            "pack / floor": _fmt(r["pack_over_floor"], ".3f"),
            "data / floor": _fmt(r.get("data_over_floor"), ".4f"),
        }
        for r in result["rows"]
    ]
    columns = list(rows[0]) if rows else []
    return markdown_table(rows, columns)


def goals(results: list[dict]) -> list[str]:
    """The issue's goals, each met / missed / n/a."""
    top1 = {
        (res["arch"], r["method"], r["pattern"], r["sparsity"]): r
        for res in results
        for r in res["rows"]
    }
    lines = []
    for arch, pattern, sparsity, points in (("*", "2:4", 0.5, 1.0), ("lenet5", "1x4", 0.9, 1.5)):
        for res in results:
            if arch not in ("*", res["arch"]):
                continue
            cell = top1.get((res["arch"], "fcpts", pattern, sparsity))
            dense = top1.get((res["arch"], "fcpts", "unstructured", sparsity))
            if cell is None or dense is None:
                continue
            drop = 100 * (dense["top1"] - cell["top1"])
            verdict = "met" if drop <= points else "missed"
            lines.append(
                f"{res['arch']}: {pattern} FCPTS at {sparsity:.0%} is {drop:.2f} pt below "
                f"unstructured (goal <= {points}): {verdict}"
            )
    for key, label in (("pack_over_floor", "file"), ("data_over_floor", "data (file less header)")):
        known = [
            r[key]
            for res in results
            for r in res["rows"]
            if r["pattern"] != "unstructured" and r.get(key) is not None
        ]
        if known:
            verdict = "met" if max(known) <= 1.02 else "missed"
            lines.append(
                f"{label} <= 1.02x floor: worst {max(known):.3f} over {len(known)} cells: {verdict}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help="default: lenet5,resnet20 (--quick: lenet5)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="digits, tiny settings; no writes")
    args = parser.parse_args()
    quick = QUICK if args.quick else {}
    models = (args.models or ("lenet5" if quick else "lenet5,resnet20")).split(",")
    started = time.perf_counter()
    results = [bench_model(arch, args.methods.split(","), quick) for arch in models]
    seconds = time.perf_counter() - started
    body = "\n\n".join(
        f"### {r['arch']} (dense {100 * r['dense_top1']:.2f} %)\n\n{table(r)}" for r in results
    )
    body += "\n\n" + "\n".join(f"- {line}" for line in goals(results))
    print("\n" + body)
    if quick or args.no_write:
        return
    write_json("patterns", {"machine": machine(), "seconds": seconds, "results": results})
    header = (
        "## Patterns: unstructured vs N:M vs RxC blocks (issue 19)\n\n"
        f"`python -m bench.patterns` on {machine()}, {seconds / 60:.0f} min. Fashion-MNIST, "
        "top-1 on the 10k test split; N:M leaves layers whose columns are not a multiple of M "
        'dense ("achieved" is the real sparsity).'
    )
    write_section("patterns", header + "\n\n" + body)


if __name__ == "__main__":
    main()
