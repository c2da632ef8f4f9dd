"""CSR pack bytes against the floor (docs/csr-format.md section 8) for each sparsity pattern.

LeNet-5 (8x8 digits input, 20-50-800-500) and ResNet-20 (3x32x32) with random weights
(sizes do not depend on the values), every eligible Conv/Linear weight masked to the
pattern with `compressor.patterns` (N:M by magnitude at 50 %, RxC blocks by block
magnitude at 80 % and 90 %), the report naming the pattern and its layers as a pruned
model's does. Each model is packed without `--block` (the pattern's layout) at fp32, fp16
and int8; the table gives the floor, the pack's data section and header, and the ratios.

Run: .venv/bin/python -m bench.pattern_floor [--no-write]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from compressor import zoo
from compressor.masks import prunable_layers
from compressor.patterns import eligible, expand_units, group_sums, nm_mask, parse_pattern
from exporters.csr import export_csr
from exporters.csr_floor import floor_report

COMMAND = ".venv/bin/python -m bench.pattern_floor"
CASES = (("2:4", 0.5), ("4:8", 0.5), ("1x4", 0.8), ("4x1", 0.9), ("1x4", 0.9))
VALUES = ("fp32", "fp16", "int8")
COLUMNS = ["model", "pattern", "sparsity", "values", "floor", "data", "header"]
COLUMNS += ["data / floor", "file / floor"]


def build(arch: str, seed: int = 0) -> nn.Module:
    """A randomly initialised zoo model: LeNet-5 on 1x8x8 or ResNet-20 on 3x32x32."""
    torch.manual_seed(seed)
    if arch == "lenet5":
        return zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8).eval()
    return zoo.build(arch, in_channels=3, num_classes=10, input_size=32).eval()


def mask_to_pattern_(model: nn.Module, text: str, sparsity: float) -> dict:
    """Zeroes `model`'s weights to `text` by magnitude, in place; returns the report.

    N:M keeps the N largest of every M (`sparsity` is N:M's own); RxC keeps the blocks of
    largest |w| sum, `sparsity` of them removed per layer. Layers the pattern cannot
    cover (N:M with cols % M != 0) stay dense and out of `pattern_layers`.
    """
    pattern = parse_pattern(text)
    layers = []
    with torch.no_grad():
        for fqn, module in prunable_layers(model).items():
            weight = module.weight
            if not eligible(weight.shape, pattern):
                continue
            if pattern.kind == "nm":
                mask = nm_mask(weight.abs(), pattern.a, pattern.b)
            else:
                sums = group_sums(weight.abs(), pattern)
                keep = torch.zeros(sums.numel(), dtype=torch.bool)
                keep[sums.flatten().topk(round(sums.numel() * (1 - sparsity))).indices] = True
                mask = expand_units(keep.reshape(sums.shape), weight.shape, pattern)
            weight.mul_(mask)
            layers.append(fqn)
    return {"method": "pattern-mask", "pattern": pattern.text, "pattern_layers": layers}


def run(archs=("lenet5", "resnet20")) -> list[dict]:
    """One row per (model, pattern, sparsity, values)."""
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for arch in archs:
            for text, sparsity in CASES:
                model = build(arch)
                report = mask_to_pattern_(model, text, sparsity)
                for values in VALUES:
                    path = Path(folder) / "pack.csr"
                    pack = export_csr(model, path, values=values, report=report, verify=False)
                    sizes = floor_report(pack, model, report)
                    rows.append(_row(arch, text, sparsity, values, sizes))
    return rows


def _row(arch: str, text: str, sparsity: float, values: str, sizes: dict) -> dict:
    return {
        "model": "LeNet-5" if arch == "lenet5" else "ResNet-20",
        "pattern": text,
        "sparsity": f"{sparsity:.0%}",
        "values": values,
        "floor": sizes["floor_bytes"],
        "data": sizes["data_bytes"],
        "header": sizes["header_bytes"],
        "data / floor": f"{sizes['data_ratio']:.4f}",
        "file / floor": f"{sizes['file_ratio']:.3f}",
    }


def main(argv: list[str] | None = None) -> None:
    from bench.common import markdown_table, write_json, write_section

    rows = run()
    table = markdown_table(rows, COLUMNS)
    body = "\n\n".join(
        [
            "## Pattern packs against their floor (bench/pattern_floor.py)",
            f"Command: `{COMMAND}`. Random weights masked to each pattern; packs written "
            "without --block (the pattern's layout). floor: docs/csr-format.md section 8; "
            "data = file - header; header = 8-byte length + safetensors JSON.",
            table,
        ]
    )
    print(body)
    if "--no-write" not in (argv if argv is not None else sys.argv[1:]):
        write_section("pattern_floor", body)
        write_json("pattern_floor", rows)


if __name__ == "__main__":
    main()
