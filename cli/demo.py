"""`compress demo`: the whole job on the embedded digits data, in a few minutes."""

from __future__ import annotations

import time
from pathlib import Path

import click
import torch

from cli.export import export_files
from compressor import zoo
from compressor.budget import Budget
from compressor.data import load_data
from compressor.io import save_model
from compressor.methods import get_method, list_methods, prune
from compressor.stats import sparsity_of
from compressor.train import evaluate, train_dense

DATA = "digits"
ARCH = "lenet5"


def run_demo(out: str, sparsity: Budget, epochs: int, seed: int = 0) -> list[dict]:
    """Trains LeNet-5 on digits, prunes it with every registered method, prints a table."""
    out_dir = Path(out)
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
    save_model(
        model, out_dir / f"{ARCH}-dense.pt2", example_inputs=example, report={"method": "dense"}
    )
    rows = [_row("dense", 0.0, dense_top1, dense_top1, time.perf_counter() - start)]
    rows[-1] |= export_files(model, out_dir / f"{ARCH}-dense", example)
    click.echo(f"trained {ARCH} on {DATA} ({epochs} epochs): test top-1 {dense_top1:.2%}")
    for name in list_methods():
        cls = get_method(name)
        budget = Budget(cls.metrics[0], sparsity.keep)
        result = prune(model, name, budget, data, seed=seed, **cls.demo_config)
        zeros, total = sparsity_of(result.model)
        path = out_dir / f"{ARCH}-{name}.pt2"
        save_model(result.model, path, example_inputs=example, report=result.report)
        rows.append(
            _row(
                name,
                zeros / total,
                evaluate(result.model, data.test),
                dense_top1,
                result.report["seconds"],
            )
        )
        rows[-1] |= export_files(result.model, out_dir / f"{ARCH}-{name}", example)
    _print(rows)
    return rows


def _row(method: str, sparsity: float, top1: float, dense_top1: float, seconds: float) -> dict:
    return {
        "method": method,
        "sparsity": sparsity,
        "top1": top1,
        "delta": top1 - dense_top1,
        "seconds": seconds,
    }


def _print(rows: list[dict]) -> None:
    from rich.table import Table

    from cli.common import console

    table = Table(title=f"compress demo: {ARCH} on {DATA}")
    for col in ("method", "sparsity", "top-1", "delta", "time (s)", "ONNX bytes", "CSR bytes"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for r in rows:
        table.add_row(
            r["method"],
            f"{r['sparsity']:.2%}",
            f"{r['top1']:.2%}",
            f"{100 * r['delta']:+.2f} pt",
            f"{r['seconds']:.1f}",
            f"{r['onnx_bytes']:,}",
            f"{r['csr_bytes']:,}",
        )
    console().print(table)
