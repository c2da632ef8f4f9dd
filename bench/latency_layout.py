"""Where a slimmed network's time goes: the layer table's sum against onnxruntime's profile.

    .venv/bin/python -m bench.latency_layout     # tied ResNet-20: dense, keep 0.2, keep 0.4 / 8

ResNet-20 (zoo, untrained, 28x28 Fashion-MNIST inputs) slimmed by channel-magnitude to
latency budgets on the layer table (no measured check, so each network is the table's pick:
keep 0.2 at the table's own round-to, keep 0.4 at round-to 8, the smallest it can build),
exported to ONNX and profiled by onnxruntime at batch 1 (1 intra-op thread): kernel time per
op type beside the table's predicted sum, for the dense and the slimmed model. The profiler
adds a per-node cost, so its totals exceed a plain run's; the shares are what to read.
Writes the RESULTS.md section latency_layout.
"""

from __future__ import annotations

import argparse

import torch

from bench.common import machine, markdown_table, write_section
from bench.mixed_joins import kernel_ms
from compressor import zoo
from compressor.budget import Budget
from compressor.data import load_data
from compressor.methods import prune
from compressor.surgery.cost import CostModel
from compressor.surgery.latency import LatencyModel
from compressor.surgery.pricing import default_table
from exporters.onnx import to_onnx

RUNS = 300  # profiled runs per model
REORDERS = ("ReorderInput", "ReorderOutput")


def row(name: str, model: torch.nn.Module, x: torch.Tensor, table) -> dict:
    """The table's predicted ms and the profile's kernel ms (in all, convs, reorders)."""
    predicted = LatencyModel(CostModel(model, (x,), "tied"), model, (x,), table).dense()
    kinds = kernel_ms(to_onnx(model.eval(), (x,)).SerializeToString(), (x,), 1, RUNS)
    total = sum(kinds.values())
    reorders = sum(kinds.get(k, 0.0) for k in REORDERS)
    convs = kinds.get("Conv", 0.0) + kinds.get("FusedConv", 0.0)
    return {
        "model": name,
        "table ms": f"{predicted:.3f}",
        "profiled kernel ms": f"{total:.3f}",
        "conv ms (Conv / FusedConv)": (
            f"{convs:.3f} ({kinds.get('Conv', 0.0):.3f} / {kinds.get('FusedConv', 0.0):.3f})"
        ),
        "reorder ms": f"{reorders:.3f}",
        "reorder %": f"{100 * reorders / total:.1f}",
        "channels": " ".join(
            str(m.out_channels) for m in model.modules() if isinstance(m, torch.nn.Conv2d)
        ),
    }


CONFIGS = ((0.2, None), (0.4, 8))  # (table keep, round-to): None is the table's own


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--residual", default="tied", choices=("tied", "mixed"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_data("fashion-mnist", seed=0, limit=256)
    x = data.sample_inputs(2)
    torch.manual_seed(0)
    dense = zoo.build("resnet20", in_channels=1, num_classes=10, input_size=(28, 28)).eval()
    table = default_table()
    rows = [row("dense", dense, x, table)]
    for keep, round_to in CONFIGS:
        options = {"finetune_epochs": 0, "bn_batches": 2, "residual": args.residual}
        slim = prune(
            dense, "channel-magnitude", Budget("latency", keep), data, **options, round_to=round_to
        )
        used = slim.report["config"]["round_to"]
        rows.append(row(f"keep {keep:g}, round-to {used}", slim.model.eval(), x, table))
    command = ".venv/bin/python -m bench.latency_layout"
    command += "" if args.residual == "tied" else f" --residual {args.residual}"
    text = markdown_table(rows, list(rows[0]))
    print(text)
    write_section(
        "latency_layout",
        "## Where a slimmed network's time goes: layer table vs onnxruntime profile\n\n"
        f"`{command}` on {machine()}; ResNet-20 ({args.residual}) at 28x28, channel-magnitude "
        f"to a table latency keep, onnxruntime profiler at batch 1, {RUNS} runs, 1 intra-op "
        "thread (the profiler adds a per-node cost: read the shares). Conv is onnxruntime's "
        "blocked-layout (NCHWc) kernel where the counts allow it; reorders convert between "
        "layouts.\n\n" + text,
    )


if __name__ == "__main__":
    main()
