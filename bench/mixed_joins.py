"""Mixed residual joins against tied channels at equal FLOPs, in onnxruntime.

    .venv/bin/python -m bench.mixed_joins                # ResNet-20, 3 seeds x 2 keep fractions
    .venv/bin/python -m bench.mixed_joins --rounds 31 --seeds 0 1 2 3

A *mixed* ResNet-20 (3x32x32): every producer of a residual stream keeps its own random
channels (`keep` of them), the other convs `keep` of theirs, so every residual add becomes a
ResidualJoin. The *tied* model keeps one channel set per stream (L1 norm), with the uniform
ratio whose slimmed FLOPs come closest to the mixed model's (bisection). The mixed model is
exported twice: with today's lowering (*after*: Pad + Gather + Add) and with the former one
(*before*: `index_add`, which exports as Transpose -> ScatterND -> Transpose), reproduced
here by `ScatterJoin`. The three graphs alternate in every timed round (rotating which runs
first), one intra-op thread; a row gives each graph's median ms and the median over rounds of
the per-round ratio mixed / tied, with its interquartile range as the noise.
Weights are random: latency does not depend on them.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import statistics
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from bench.common import OUT, machine, markdown_table, write_json, write_section
from bench.slim_latency import _top, example, group_keep, slimmed
from compressor.surgery.mixed import ResidualJoin
from exporters import latency
from exporters.onnx import compare_onnxruntime, to_onnx

ARCH = "resnet20"
KEEPS = (0.5, 0.25)
SEEDS = (0, 1, 2)
BATCHES = (1, 32)


class ScatterJoin(ResidualJoin):
    """The former lowering (index_add into a zero stream), kept to measure against."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        b = b * self.alpha if self.alpha != 1.0 else b
        if self.a_full and self.b_full:
            out = a + b
        elif self.a_full:
            out = a.index_add(self.dim, self.pos_b, b)
        elif self.b_full:
            out = b.index_add(self.dim, self.pos_a, a)
        else:
            shape = list(a.shape)
            shape[self.dim] = self.width
            out = a.new_zeros(shape).index_add(self.dim, self.pos_a, a)
            out = out.index_add(self.dim, self.pos_b, b)
        if self.has_const:
            shape = [1] * out.dim()
            shape[self.dim] = self.width
            out = out + self.const.view(shape)
        return out


def with_scatter_joins(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` whose joins use the former (scatter) lowering."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, ResidualJoin):
            module.__class__ = ScatterJoin
    return model


def random_keep(model, groups, ratio: float, seed: int) -> dict:
    """Every residual producer keeps its own random channels; other groups random too."""
    generator = torch.Generator().manual_seed(seed)
    keep = {}
    for group in groups:
        if not group.prunable:
            continue
        members = group.of_kind("producer") if group.residual else [None]
        for member in members:
            size = group.size if member is None else len(member.index)
            fixed = group.fixed if member is None else group.fixed[member.index]
            scores = torch.rand(size, generator=generator)
            keep[group.id if member is None else member.fqn] = _top(
                scores, fixed, round(ratio * size)
            )
    return keep


def tied_at(flops: int, steps: int = 10):
    """(model, stats, ratio) of the tied slimming whose FLOPs come closest to `flops`."""
    low, high, best = 0.05, 1.0, None
    for _ in range(steps):
        ratio = (low + high) / 2
        model, stats = slimmed(ARCH, group_keep, ratio)
        if best is None or abs(stats.flops - flops) < abs(best[1].flops - flops):
            best = (model, stats, ratio)
        low, high = (ratio, high) if stats.flops < flops else (low, ratio)
    return best


def op_counts(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(collections.Counter(node.op_type for node in proto.graph.node))


CONV_KERNELS = ("Conv", "FusedConv")


def kernel_ms(data: bytes, inputs: tuple, batch: int, runs: int) -> collections.Counter:
    """Milliseconds of onnxruntime kernel time per run, by op type (its profiler, one
    intra-op thread), of the graph `data` on `inputs` expanded to `batch`."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = latency.THREADS, 3
    options.enable_profiling = True
    OUT.mkdir(exist_ok=True)
    options.profile_file_prefix = str(OUT / "mixed_joins_profile")
    session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    feed = latency._feed(session, inputs, batch)
    for _ in range(runs):
        session.run(None, feed)
    trace = Path(session.end_profiling())
    kernels = collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            kernels[event["args"]["op_name"]] += event["dur"] / runs / 1000
    trace.unlink()
    return kernels


def outside_conv_share(data: bytes, batch: int, runs: int) -> float:
    """Percent of onnxruntime's kernel time (its profiler) spent outside the convolutions.

    Tied graphs run one NCHWc conv chain with the adds fused in; what a mixed graph spends
    beyond that is its joins and the layout reorders around them. Shares within one run
    are steadier than wall time on a shared machine.
    """
    kernels = kernel_ms(data, (example(2),), batch, runs)
    total = sum(kernels.values())
    return 100.0 * (total - sum(kernels[k] for k in CONV_KERNELS)) / total


def join_ops(counts: dict[str, int]) -> str:
    """The ops a join lowers to, beside the network's own (Conv, Relu, Add, head)."""
    names = ("Transpose", "ScatterND", "ScatterElements", "Pad", "Gather", "ConstantOfShape")
    return " ".join(f"{counts[n]} {n}" for n in names if counts.get(n))


def timed_rounds(sessions: dict, batch: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Per clock ("cpu", "wall") and session, ms per run in each round.

    The first session to run rotates between rounds. "cpu" is this thread's CPU time: with one
    intra-op thread onnxruntime computes on the calling thread, so it leaves out the time other
    jobs on the shared cores take from us, which wall time includes.
    """
    x = (example(2),)
    runners = {
        n: latency._runner(s, latency._feed(s, x, batch), batch) for n, s in sessions.items()
    }
    repeats = {name: latency.repeats_for(run) for name, run in runners.items()}
    names = list(runners)
    samples = {clock: {name: [] for name in names} for clock in ("cpu", "wall")}
    for round_ in range(rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            cpu, wall = time.thread_time(), time.perf_counter()
            for _ in range(repeats[name]):
                runners[name]()
            samples["cpu"][name].append((time.thread_time() - cpu) * 1e3 / repeats[name])
            samples["wall"][name].append((time.perf_counter() - wall) * 1e3 / repeats[name])
    return samples


def ratio_stats(samples: dict, name: str) -> tuple[float, float]:
    """Median and interquartile range over rounds of samples[name] / samples['tied']."""
    ratios = [m / t for m, t in zip(samples[name], samples["tied"])]
    quartiles = statistics.quantiles(ratios, n=4)
    return statistics.median(ratios), quartiles[2] - quartiles[0]


def variants(seed: int, keep: float) -> tuple[dict, dict]:
    """The three models (tied, mixed before, mixed after) and facts about them."""
    mixed, mixed_stats = slimmed(ARCH, random_keep, keep, "mixed", seed=seed)
    tied, tied_stats, ratio = tied_at(mixed_stats.flops)
    before = with_scatter_joins(mixed)
    x = example(4)
    with torch.no_grad():
        bitwise = torch.equal(mixed(x), before(x))
    facts = {
        "MFLOPs mixed": round(mixed_stats.flops / 1e6, 2),
        "MFLOPs tied": round(tied_stats.flops / 1e6, 2),
        "tied ratio": round(ratio, 3),
        "joins": sum(isinstance(m, ResidualJoin) for m in mixed.modules()),
        "after == before (torch)": "bitwise" if bitwise else "DIFFERENT",
    }
    return {"tied": tied, "before": before, "after": mixed}, facts


def config_row(seed: int, keep: float, rounds: int) -> dict:
    """One table row: counts, verification and alternating-round latencies of one config."""
    models, facts = variants(seed, keep)
    x = (example(2),)
    graphs, sessions = {}, {}
    for name, model in models.items():
        graphs[name] = to_onnx(model.eval(), x)
        data = graphs[name].SerializeToString()
        if name != "tied":
            facts[f"ORT diff {name}"] = f"{compare_onnxruntime(data, model, x)[0]:.0e}"
        sessions[name] = latency._session(data, latency.THREADS)
    facts["join ops before"] = join_ops(op_counts(graphs["before"]))
    facts["join ops after"] = join_ops(op_counts(graphs["after"]))
    for name, graph in graphs.items():
        share = outside_conv_share(graph.SerializeToString(), 32, 10)
        facts[f"% outside conv {name}"] = round(share, 1)
    row = {"seed": seed, "keep/layer": keep, **facts}
    for batch in BATCHES:
        samples = timed_rounds(sessions, batch, rounds)
        for name in models:
            row[f"b{batch} ms {name}"] = round(statistics.median(samples["cpu"][name]), 3)
        for clock in ("cpu", "wall"):
            for name in ("before", "after"):
                median, iqr = ratio_stats(samples[clock], name)
                row[f"b{batch} {name}/tied {clock}"] = f"{median:.3f} ±{iqr / 2:.3f}"
    print(markdown_table([row], list(row)), flush=True)
    return row


COLUMNS = (
    "seed", "keep/layer", "joins", "MFLOPs mixed", "MFLOPs tied",
    "b1 ms tied", "b1 ms before", "b1 ms after", "b1 before/tied cpu", "b1 after/tied cpu",
    "b32 ms tied", "b32 ms before", "b32 ms after", "b32 before/tied cpu", "b32 after/tied cpu",
)  # fmt: skip
WALL = (
    "seed", "keep/layer", "b1 before/tied wall", "b1 after/tied wall",
    "b32 before/tied wall", "b32 after/tied wall",
)  # fmt: skip


def summary(rows: list[dict]) -> list[str]:
    """Worst and median after/tied ratio per batch size, against the 10 % goal."""
    lines = []
    for batch in BATCHES:
        for name in ("before", "after"):
            ratios = [float(row[f"b{batch} {name}/tied cpu"].split()[0]) for row in rows]
            lines.append(
                f"- batch {batch}, {name}: median {statistics.median(ratios):.3f}, worst "
                f"{max(ratios):.3f} x tied ({'within' if max(ratios) <= 1.10 else 'over'} 10 %)"
            )
    return lines


CHECKS = (
    "seed", "keep/layer", "tied ratio", "join ops before", "join ops after",
    "after == before (torch)", "ORT diff before", "ORT diff after",
    "% outside conv tied", "% outside conv before", "% outside conv after",
)  # fmt: skip


def section(rows: list[dict], command: str, rounds: int) -> str:
    return "\n".join([
        "## Mixed residual joins vs tied channels at equal FLOPs (ResNet-20, onnxruntime)",
        "",
        f"`{command}` on {machine()}, onnxruntime {ort.__version__}, 1 intra-op thread,",
        f"{rounds} alternating rounds per batch size (tied, mixed before, mixed after; the",
        "first to run rotates). *mixed*: every residual producer keeps its own random",
        "`keep/layer` of its channels (so every add is a join); *tied*: one channel set per",
        "stream by L1 norm, the uniform ratio whose FLOPs are closest to the mixed model's.",
        "*before*: joins as `index_add` (ONNX Transpose -> ScatterND -> Transpose); *after*:",
        "Pad + Gather + Add. *ms*: median CPU time of the timing thread per run (onnxruntime",
        "computes on it with one intra-op thread); the 2-core machine ran other engineers'",
        "jobs (load average 8-14), which stretch wall time 2-3x, so CPU time is the figure",
        "compared. Ratios: median over rounds of the per-round ratio to tied, ± half the",
        "interquartile range (the noise). Random weights (latency does not depend on them).",
        "",
        markdown_table(rows, list(COLUMNS)),
        "",
        *summary(rows),
        "",
        "The same rounds in wall time (noisier: it includes waiting for the shared cores):",
        "",
        markdown_table(rows, list(WALL)),
        "",
        "Graphs and checks: join ops are the exported (dynamo) graph's ops the joins lower to;",
        "both mixed graphs match PyTorch in onnxruntime (max abs diff on 5 sample batches),",
        "and the two lowerings give bitwise-equal PyTorch outputs. *% outside conv*: share",
        "of onnxruntime's kernel time (its profiler, batch 32, 10 runs) not in Conv /",
        "FusedConv kernels: the tied graphs fuse their adds into the convs, so a mixed graph's",
        "excess is what its joins and the NCHWc layout reorders around them cost.",
        "",
        markdown_table(rows, list(CHECKS)),
        "",
        *READING,
    ])  # fmt: skip


READING = [
    "Reading: the gather lowering beats the scatter one in 11 of the 12 batch cells (the",
    "twelfth, batch 1 at seed 0 keep 0.5, is noisy: ±0.14). The goal, mixed within 10 % of",
    "tied at equal FLOPs, is met at keep 0.5 at batch 32 (at most 1.06x) and within the",
    "noise at batch 1 (1.02-1.11x, ±0.06-0.09), and missed at keep 0.25 (1.16-1.44x; the",
    "scatter lowering 1.31-1.76x). Why: onnxruntime runs a tied ResNet as one NCHWc",
    "chain (channels padded to blocks of 16 on this AVX-512 machine) with every add and ReLU",
    "fused into a conv. Pad and Gather have no NCHWc kernels, so each join adds layout",
    "reorders, Pad, Gather and an unfused Add and ReLU: passes over the stream whose cost",
    "does not shrink with the branch convs; at keep 0.25 the convs (4-16 channels, all",
    "padded to 16) are small enough for them to take 25-38 % of the kernel time. Measured",
    "and rejected during the work (single runs, 15 rounds, CPU-time ratio to tied at batch",
    "1 / 32; seed 1 keep 0.25, then seed 0 keep 0.5): 1x1-conv embeddings, which keep",
    "NCHWc and get the add fused, 1.50 / 1.50 and 1.15 / 1.11 (Pad + Gather in the same",
    "rounds: 1.49 / 1.40 and 1.01 / 0.99); Gather times a 0/1 mask 1.53 / 1.43 and 1.08 /",
    "0.98; folding the branch's embedding into its last conv's weights in the ONNX graph",
    "(the stream side still gathered) 1.40 / 1.48 against 1.41 / 1.37. Closing the rest",
    "needs joins onnxruntime can fuse: the stream stored at one width per stage (zeros",
    "where no block has written yet) so every join is a plain add. That costs nominal FLOPs",
    "wherever the 16-channel padding does not absorb them, and it changes the slimming",
    "plan, not the join.",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds per batch size")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--keeps", type=float, nargs="+", default=list(KEEPS))
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite RESULTS.md from bench/out JSON"
    )
    args = parser.parse_args()
    if args.report_only:
        stored = json.loads((OUT / "mixed_joins.json").read_text())
        rounds = stored.get("rounds", 21)
        write_section("mixed_joins", section(stored["rows"], stored["command"], rounds))
        return
    torch.set_num_threads(1)
    command = ".venv/bin/python -m bench.mixed_joins"
    if args.rounds != 21 or args.seeds != list(SEEDS) or args.keeps != list(KEEPS):
        command += f" --rounds {args.rounds} --seeds {' '.join(map(str, args.seeds))}"
        command += f" --keeps {' '.join(map(str, args.keeps))}"
    OUT.mkdir(exist_ok=True)
    rows = [config_row(s, k, args.rounds) for k in args.keeps for s in args.seeds]
    print(markdown_table(rows, list(COLUMNS)))
    print("\n".join(summary(rows)))
    payload = {"machine": machine(), "command": command, "rounds": args.rounds, "rows": rows}
    write_json("mixed_joins", payload)
    write_section("mixed_joins", section(rows, command, args.rounds))


if __name__ == "__main__":
    main()
