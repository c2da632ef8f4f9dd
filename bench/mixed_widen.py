"""Mixed joins as plain adds: producers widened to their stream's channels, against gathers.

    .venv/bin/python -m bench.mixed_widen              # ResNet-20, seeds 0-1, keep 0.25

A join of a partial operand into a residual stream costs onnxruntime a Pad, a Gather and an
unfused Add between layout reorders (bench/mixed_joins.py). The alternative measured here
keeps the stream at the union of its producers' channels and widens a producer's last conv
to that union with zero filters, so its join is a plain add onnxruntime fuses into the conv:
exact (the filters are zero in the masked model), at the cost of the wider conv. *free*
widens only producers whose count the 16-channel blocks already pad to the union's; *all*
widens every producer (a tied slim on the union). Same mixed networks as bench.mixed_joins
(random per-producer keeps), the tied network at the mixed one's FLOPs; CPU-time ratios to
tied, alternating rounds, medians. Writes the RESULTS.md section mixed_widen.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch

from bench.common import machine, markdown_table, write_section
from bench.mixed_joins import random_keep, ratio_stats, tied_at, timed_rounds
from bench.slim_latency import build, example, measure
from compressor.surgery import channel_groups
from compressor.surgery.mixed import ResidualJoin
from compressor.surgery.slim import mask_, slim_
from exporters import latency
from exporters.onnx import compare_onnxruntime, to_onnx

BLOCK = 16  # onnxruntime's NCHWc channel block on this AVX-512 machine
VARIANTS = ("gather", "free", "all")


def widened(keep: dict, groups, rule: str) -> dict:
    """`keep` with producers of residual streams widened to their stream's union."""
    out = dict(keep)
    for group in groups:
        if not (group.residual and group.prunable):
            continue
        producers = [m for m in group.of_kind("producer") if m.fqn in keep]
        union = group.fixed.clone()
        for member in producers:
            union[member.index] |= keep[member.fqn]
        width = int(union.sum())
        for member in producers:
            own = int(keep[member.fqn].sum())
            if rule == "all" or math.ceil(width / BLOCK) <= math.ceil(own / BLOCK):
                out[member.fqn] = union[member.index].clone()
    return out


def variant(seed: int, keep: float, rule: str) -> tuple[torch.nn.Module, int]:
    """(slimmed mixed model, its FLOPs): masked with the random keeps, slimmed as `rule`."""
    model, x = build("resnet20"), example()
    groups = channel_groups(model, x)
    chosen = random_keep(model, groups, keep, seed)
    mask_(model, chosen, x, residual="mixed", norms=True)
    target = chosen if rule == "gather" else widened(chosen, groups, rule)
    slimmed = slim_(model, target, x, residual="mixed").model
    return slimmed, measure(slimmed, x).flops


def config_row(seed: int, keep: float, rounds: int) -> dict:
    models, flops = {}, {}
    for rule in VARIANTS:
        models[rule], flops[rule] = variant(seed, keep, rule)
    models["tied"] = tied_at(flops["gather"])[0]
    x = (example(2),)
    sessions, row = {}, {"seed": seed, "keep/layer": keep}
    for name, model in models.items():
        data = to_onnx(model.eval(), x).SerializeToString()
        if name != "tied":
            assert compare_onnxruntime(data, model, x)[0] < 1e-4, f"{name} differs in ORT"
            row[f"MFLOPs {name}"] = round(flops[name] / 1e6, 2)
            row[f"joins {name}"] = sum(isinstance(m, ResidualJoin) for m in model.modules())
        sessions[name] = latency._session(data, latency.THREADS)
    for batch in (1, 32):
        samples = timed_rounds(sessions, batch, rounds)["cpu"]
        for name in VARIANTS:
            median, iqr = ratio_stats(samples, name)
            row[f"b{batch} {name}/tied"] = f"{median:.3f} ±{iqr / 2:.3f}"
        row[f"b{batch} tied ms"] = round(statistics.median(samples["tied"]), 3)
    print(row, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--keep", type=float, default=0.25)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [config_row(seed, args.keep, args.rounds) for seed in args.seeds]
    command = ".venv/bin/python -m bench.mixed_widen"
    if args.seeds != [0, 1] or args.keep != 0.25 or args.rounds != 15:
        command += f" --seeds {' '.join(map(str, args.seeds))} --keep {args.keep:g}"
        command += f" --rounds {args.rounds}"
    text = markdown_table(rows, list(rows[0]))
    print(text)
    write_section(
        "mixed_widen",
        "## Mixed joins as plain adds: widened producers vs gathers (ResNet-20, onnxruntime)\n\n"
        f"`{command}` on {machine()}, 1 intra-op thread, {args.rounds} alternating rounds per "
        "batch size. *gather*: today's joins (Pad + Gather + Add); *free*: producers widened "
        "to their stream's channels where the 16-channel blocks absorb it; *all*: every "
        "producer widened (no joins left). Ratios: median CPU time over rounds relative to "
        "tied channels at the gather network's FLOPs, ± half the interquartile range. Every "
        "graph matches its PyTorch model in onnxruntime.\n\n" + text,
    )


if __name__ == "__main__":
    main()
