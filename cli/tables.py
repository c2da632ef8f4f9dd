"""Human-readable tables for the CLI (rich; plain text in pipes)."""

from __future__ import annotations

import click

from cli.common import console


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:g}"


def print_stats(stats, loaded) -> None:
    """The per-layer table of `compress info`, then totals and any embedded report."""
    from rich.table import Table

    table = Table(title=f"{loaded.format} model, input {loaded.input_shape}")
    for col in (
        "layer",
        "type",
        "shape",
        "params",
        "nonzero",
        "FLOPs (MACs)",
        "volume",
        "sparsity",
        "channels",
    ):
        table.add_column(col, justify="left" if col in ("layer", "type", "shape") else "right")
    for layer in stats.layers:
        table.add_row(
            layer.fqn,
            layer.kind,
            "x".join(map(str, layer.shape)),
            _si(layer.params),
            _si(layer.nonzero),
            _si(layer.flops),
            _si(layer.volume),
            f"{layer.sparsity:.1%}",
            f"{layer.kept_channels}/{layer.channels}",
        )
    out = console()
    out.print(table)
    out.print(
        f"total: params {stats.params:,} (nonzero {stats.nonzero:,}), FLOPs {stats.flops:,} MACs, "
        f"activation volume {stats.volume:,}, prunable sparsity {stats.sparsity:.2%}"
    )
    if loaded.report:
        _print_report(loaded.report)


def _print_report(report: dict) -> None:
    keys = (
        "method",
        "budget",
        "achieved",
        "dense_top1",
        "top1",
        "seconds",
        "val_top1",
        "test_top1",
    )
    click.echo("report:")
    for key in keys:
        if key in report and report[key] is not None:
            click.echo(f"  {key}: {format_value(report[key])}")


def format_value(value, nested: bool = False) -> str:
    """A report value for people: floats to 4 significant digits (0.1, not 0.09999999999999998).

    A dict prints as `key: value, ...` (in braces when nested), a list as `[a, b]`, their
    floats shortened alike; `--json` keeps the full precision.
    """
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, dict):
        text = ", ".join(f"{k}: {format_value(v, True)}" for k, v in value.items())
        return "{" + text + "}" if nested else text
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(v, True) for v in value) + "]"
    return str(value)


def print_prune_summary(report: dict, output: str) -> None:
    achieved = report["achieved"]
    if "keep" in achieved:
        parts = [f"{report['method']}: {report['budget']['metric']} kept {achieved['keep']:.2%}"]
    else:
        parts = [f"{report['method']}: sparsity {achieved['sparsity']:.2%}"]
    if report.get("top1") is not None:
        parts.append(f"top-1 {report['dense_top1']:.2%} -> {report['top1']:.2%}")
    if report.get("labels") == "none":
        parts.append(f"labels: none; distilled {report['distilled']}")
    parts.append(f"{report['seconds']:.1f}s")
    click.echo(", ".join(parts) + f" -> {output}")
    for line in report.get("tied_streams") or ():  # mixed mode fell back for these streams
        click.echo(f"note: {line}")
