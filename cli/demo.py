"""`compress demo`: the whole job on the embedded digits data, in a few minutes."""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from cli.export import export_files
from compressor import zoo
from compressor.budget import Budget, parse_budget
from compressor.data import load_data
from compressor.io import save_model
from compressor.methods import get_method, list_methods, prune
from compressor.paths import check_folder_writable
from compressor.stats import ModelStats, measure
from compressor.train import evaluate, train_dense

DATA = "digits"
ARCH = "lenet5"


def run_demo(out: str, sparsity: Budget, epochs: int, seed: int = 0) -> list[dict]:
    """Trains LeNet-5 on digits, prunes it with every registered method, prints a table.

    Unstructured methods get `sparsity`; a structured method gets its class's
    `demo_budget` (channel removal at 10x would leave LeNet-5 too few channels to mean much).
    """
    out_dir = Path(out)
    check_folder_writable("--out", out_dir)  # before minutes of training, not after
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    data = load_data(DATA, seed=seed)
    shape = data.input_shape
    model = zoo.build(
        ARCH, in_channels=shape[0], num_classes=data.num_classes, input_size=tuple(shape[1:])
    )
    start = time.perf_counter()
    train_dense(model, data.train, epochs=epochs)
    dense_top1 = evaluate(model, data.test)
    example = (data.sample_inputs(2),)
    dense = measure(model, example[0][:1])
    save_model(
        model, out_dir / f"{ARCH}-dense.pt2", example_inputs=example, report={"method": "dense"}
    )
    rows = [row("dense", None, dense, dense, dense_top1, dense_top1)]
    rows[-1] |= {"seconds": time.perf_counter() - start}
    rows[-1] |= export_files(model, out_dir / f"{ARCH}-dense", example)
    click.echo(f"trained {ARCH} on {DATA} ({epochs} epochs): test top-1 {dense_top1:.2%}")
    for name in list_methods():
        cls = get_method(name)
        budget = _budget(cls, sparsity)
        result = prune(model, name, budget, data, seed=seed, **cls.demo_config)
        path = out_dir / f"{ARCH}-{name}.pt2"
        save_model(result.model, path, example_inputs=example, report=result.report)
        top1 = evaluate(result.model, data.test)
        stats = measure(result.model, example[0][:1])
        rows.append(row(name, budget, stats, dense, top1, dense_top1))
        rows[-1] |= {"seconds": result.report["seconds"]}
        rows[-1] |= export_files(result.model, out_dir / f"{ARCH}-{name}", example)
    _print(rows)
    return rows


def _budget(cls, sparsity: Budget) -> Budget:
    if cls.metrics[0] == "weights" or cls.demo_budget is None:
        return Budget(cls.metrics[0], sparsity.keep)
    return parse_budget(cls.demo_budget, metric=cls.metrics[0])


def row(
    method: str, budget: Budget | None, stats: ModelStats, dense: ModelStats, top1, dense_top1
) -> dict:
    """One line of the demo table: the budget, what was reached on its own metric, costs."""
    return {
        "method": method,
        "target": "-" if budget is None else budget.describe(),
        "achieved": achieved(budget, stats, dense),
        "params": stats.nonzero,
        "flops": stats.flops,
        "flops_kept": stats.flops / dense.flops,
        "top1": top1,
        "delta": top1 - dense_top1,
    }


def achieved(budget: Budget | None, stats: ModelStats, dense: ModelStats) -> str:
    """The result on the budget's own metric: "sparsity 90.00%" or "volume 4.0x"."""
    if budget is None:
        return "-"
    if budget.metric == "weights":
        return f"sparsity {stats.sparsity:.2%}"
    kept = getattr(stats, budget.metric)
    return f"{budget.metric} {getattr(dense, budget.metric) / kept:.1f}x" if kept else "-"


def cells(r: dict) -> list[str]:
    """A row's table cells, in COLUMNS order."""
    return [
        r["method"],
        r["target"],
        r["achieved"],
        f"{r['params']:,}",
        f"{r['flops']:,} ({r['flops_kept']:.0%})",
        f"{r['top1']:.2%}",
        f"{100 * r['delta']:+.2f} pt",
        f"{r['seconds']:.1f}",
        f"{r['onnx_bytes']:,}",
        f"{r['csr_bytes']:,}",
    ]


COLUMNS = ("method", "target", "achieved", "nonzero params", "FLOPs (MACs)", "top-1", "delta")
COLUMNS += ("time (s)", "ONNX bytes", "CSR bytes")


def _print(rows: list[dict]) -> None:
    from rich.table import Table

    from cli.common import console

    table = Table(title=f"compress demo: {ARCH} on {DATA}")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("method", "target") else "right")
    for r in rows:
        table.add_row(*cells(r))
    console().print(table)
