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
    columns = ["layer", "type", "shape", "params", "nonzero", "FLOPs (MACs)", "volume"]
    columns += ["sparsity", "channels"]
    pattern = pattern_cells(stats, loaded)
    if pattern:
        columns.append(f"pattern {loaded.report['pattern']}")
    for col in columns:
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
            *([pattern[layer.fqn]] if pattern else []),
        )
    out = console()
    out.print(table)
    out.print(
        f"total: params {stats.params:,} (nonzero {stats.nonzero:,}), FLOPs {stats.flops:,} MACs, "
        f"activation volume {stats.volume:,}, prunable sparsity {stats.sparsity:.2%}"
    )
    if pattern:
        _print_pattern(loaded)
    if loaded.report:
        _print_report(loaded.report)


def pattern_cells(stats, loaded) -> dict[str, str]:
    """{layer: "holds", "BROKEN" (pruned to the pattern, no longer follows it) or "-"}."""
    if not (loaded.report or {}).get("pattern"):
        return {}
    from compressor.pattern_layers import pattern_holds

    status = pattern_holds(loaded.model, loaded.report)
    cell = {True: "holds", False: "BROKEN"}
    return {layer.fqn: cell.get(status.get(layer.fqn), "-") for layer in stats.layers}


def _print_pattern(loaded) -> None:
    from compressor.pattern_layers import pattern_holds

    status = pattern_holds(loaded.model, loaded.report)
    broken = [layer for layer, ok in status.items() if not ok]
    line = f"pattern {loaded.report['pattern']}: {len(status) - len(broken)} of {len(status)} "
    line += "pattern layers follow it"
    click.echo(line + (f"; broken: {', '.join(broken)}" if broken else ""))


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
    if report.get("factors"):
        click.echo(f"  reduction: {format_factors(report['factors'])}")
    if report.get("latency_ms"):
        click.echo(f"  latency: {format_latency(report['latency_ms'])}")


def format_factors(factors: dict) -> str:
    """`FLOPs 4.02x, volume 3.10x, params 5.30x` (n/a where the pruned model has none left)."""
    names = {"flops": "FLOPs", "volume": "volume", "params": "params"}
    return ", ".join(
        f"{names.get(k, k)} {'n/a' if v is None else f'{v:.2f}x'}" for k, v in factors.items()
    )


def format_latency(latency: dict) -> str:
    """`batch 1: 0.12 -> 0.05 ms (2.40x), batch 32: ...` from a report's latency_ms."""
    parts = []
    for batch, dense in latency["dense"].items():
        pruned, speedup = latency["pruned"][batch], latency["speedup"][batch]
        parts.append(f"batch {batch}: {dense:.3g} -> {pruned:.3g} ms ({speedup:.2f}x)")
    return ", ".join(parts)


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
    """The one-line result of `compress prune` (plus latency and notes when present)."""
    achieved = report["achieved"]
    if "keep" in achieved:
        parts = [f"{report['method']}: {report['budget']['metric']} kept {achieved['keep']:.2%}"]
    else:
        parts = [f"{report['method']}: sparsity {achieved['sparsity']:.2%}"]
    if report.get("top1") is not None:
        parts.append(f"top-1 {report['dense_top1']:.2%} -> {report['top1']:.2%}")
    if report.get("labels") == "none":
        parts.append(f"labels: none; distilled {report['distilled']}")
    if report.get("factors"):
        parts.append(f"reduction {format_factors(report['factors'])}")
    parts.append(f"{report['seconds']:.1f}s")
    click.echo(", ".join(parts) + f" -> {output}")
    if report.get("latency_ms"):
        click.echo(f"latency: {format_latency(report['latency_ms'])}")
    if report.get("latency"):
        click.echo(f"latency budget: {format_latency_budget(report['latency'])}")
        if report["latency"].get("refits") and report.get("latency_refit"):
            click.echo(f"re-fits: {report['latency_refit']}")
    for line in report.get("tied_streams") or ():  # mixed mode fell back for these streams
        click.echo(f"note: {line}")


def format_latency_budget(latency: dict) -> str:
    """`requested 2x, predicted 2.05x, measured 1.93x at batch 1 (0 re-fits)`."""
    text = f"requested {latency['requested_speedup']:.3g}x, "
    text += f"predicted {latency['predicted_speedup']:.3g}x"
    measured = latency.get("measured_speedup")
    if not measured:
        return text + " (not measured)"
    batch = str(latency["checked_batch"])
    return (
        text + f", measured {measured[batch]:.3g}x at batch {batch} ({latency['refits']} re-fits)"
    )
