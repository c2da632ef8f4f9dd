"""Latency budgets: requested against measured speed-up of the exported graph.

    .venv/bin/python -m bench.latency_budget        # ~5-10 min on 2 shared cores (first run
                                                    # also fills the latency table cache)

LeNet-5 and ResNet-20 (zoo, untrained: latency does not depend on the weights) on 28x28
Fashion-MNIST (256 images; at the 8x8 of digits onnxruntime's per-node cost outweighs the
convolutions and no table of layers predicts the graph), pruned with `--budget-metric latency` at 2x and 3x by
channel-magnitude (no fine-tuning), BAR (1 gate epoch, no fine-tuning) and structured GSS (1
regularised epoch, no fine-tuning): the decision is
fitted on the per-layer onnxruntime table, then the exported dense and slimmed graphs are
timed alternately (7 rounds, medians, 1 intra-op thread) at batch 1 and 32; a check that
misses the request by more than 10 % at batch 1 is repeated and the median of 3 read, and
when that misses too the method re-fits, up to 5 times (compressor/latency_check.py).
Writes the RESULTS.md section latency_budget and bench/out/latency_budget.json.
"""

from __future__ import annotations

import argparse
import time

import torch

from bench.common import machine, markdown_table, write_json, write_section
from compressor import zoo
from compressor.budget import Budget
from compressor.data import load_data
from compressor.errors import TargetNotReachedError
from compressor.methods import prune
from exporters.latency import graph_measurer

# ResNet-20 both ways: mixed blocks add Pad + Gather joins the layer table does not see
ARCHS = (("lenet5", {}), ("resnet20", {"residual": "mixed"}), ("resnet20", {"residual": "tied"}))
FACTORS = (2, 3)
METHODS = {
    "channel-magnitude": {"finetune_epochs": 0, "bn_batches": 2},
    "bar": {"epochs": 1, "finetune_epochs": 0, "bn_batches": 2},
    "gss": {"variant": "structure", "epochs": 1, "finetune_epochs": 0},
}
MIXABLE = ("channel-magnitude", "bar")  # methods with a `residual` option
BATCHES = (1, 32)
SPEC = "fashion-mnist"
COLUMNS = ["model", "method", "requested", "predicted", "measured b1", "measured b32"]
COLUMNS += ["dense b1 ms", "slim b1 ms", "dense b32 ms", "slim b32 ms", "re-fits", "checks"]
COLUMNS += ["round-to"]
COLUMNS += ["seconds"]


def one(arch: str, extra: dict, method: str, factor: int, data) -> dict:
    """Prunes one model to `factor`x latency; the row of the table."""
    torch.manual_seed(0)
    channels, *size = data.input_shape
    model = zoo.build(arch, in_channels=channels, num_classes=10, input_size=tuple(size)).eval()
    measurer = graph_measurer(data.sample_inputs(2), threads=1, batches=BATCHES)
    name = arch + "".join(f" ({v})" for v in extra.values())
    options = METHODS[method] | (extra if method in MIXABLE else {})  # GSS is tied anyway
    row = {"model": name, "method": method, "requested": f"{factor}x"}
    start = time.perf_counter()
    try:
        result = prune(
            model,
            method,
            Budget("latency", 1 / factor),
            data,
            measure_latency=measurer,
            **options,
        )
    except TargetNotReachedError as exc:
        seconds = round(time.perf_counter() - start, 1)
        return row | {
            "predicted": "failed",
            "measured b1": _miss_text(str(exc)),
            "seconds": seconds,
        }
    latency, timed = result.report["latency"], result.report["latency_ms"]
    return row | {
        "predicted": f"{latency['predicted_speedup']:.2f}x",
        "measured b1": f"{latency['measured_speedup']['1']:.2f}x",
        "measured b32": f"{latency['measured_speedup']['32']:.2f}x",
        "dense b1 ms": f"{timed['dense']['1']:.3f}",
        "slim b1 ms": f"{timed['pruned']['1']:.3f}",
        "dense b32 ms": f"{timed['dense']['32']:.3f}",
        "slim b32 ms": f"{timed['pruned']['32']:.3f}",
        "re-fits": latency["refits"],
        "checks": sum(r["checks"] for r in latency["rounds"]),
        "round-to": result.report["config"]["round_to"],
        "seconds": round(time.perf_counter() - start, 1),
    }


def _miss_text(message: str) -> str:
    """The check's error for the table: what was measured, and why a re-fit stopped (the
    list of tries, which the table's other columns hold for met rows, is left out)."""
    text = message.split(" (tolerance")[0]
    if "cannot be met: " in message:
        text += "; the re-fit's target cannot be met: " + message.split("cannot be met: ", 1)[1]
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data(SPEC, seed=0, limit=256)
    rows = []
    for arch, extra in ARCHS:
        for method in args.methods:
            if extra.get("residual") == "mixed" and method not in MIXABLE:
                continue  # GSS ties residual streams: its one ResNet-20 row is the tied one
            for factor in FACTORS:
                rows.append(one(arch, extra, method, factor, data))
                print(rows[-1], flush=True)
    table = markdown_table(rows, COLUMNS)
    command, name = ".venv/bin/python -m bench.latency_budget", "latency_budget"
    if args.methods != list(METHODS):  # a section of its own: the full table stays
        command += " --methods " + " ".join(args.methods)
        name += "-" + "-".join(args.methods)
    print(table)
    write_json(name, rows)
    write_section(
        name,
        "## Latency budgets: requested vs measured speed-up (bench/latency_budget.py)\n\n"
        f"`{command}` on " + machine() + "; "
        "onnxruntime CPU, 1 intra-op thread, 28x28 Fashion-MNIST inputs, untrained zoo models. "
        "predicted: the layer table's speed-up at batch 1; measured: the exported graphs, "
        "dense and slimmed alternated, 7 rounds, medians; checks: graph timings in all, a "
        "missing one repeated and the median of 3 read. The check (and re-fits) use batch 1.\n\n"
        + table,
    )


if __name__ == "__main__":
    main()
