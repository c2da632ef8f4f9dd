"""bench/patterns.py: one cell on a tiny model (the full bench is run by hand)."""

import torch

from bench.patterns import requested_sparsity, run_cell
from tests.models import PatternNet

KEYS = {
    "method", "pattern", "sparsity", "requested", "achieved", "top1", "seconds",
    "pattern_layers", "pack_bytes", "floor_bytes", "pack_over_floor", "data_over_floor",
}  # fmt: skip


def test_cell_reports_top1_sparsity_and_pack(small_digits):
    torch.manual_seed(0)
    row = run_cell(PatternNet().eval(), small_digits, "magnitude-global", "1x4", 0.8, {})
    assert set(row) == KEYS
    assert row["pattern"] == "1x4" and row["requested"] == 0.8
    assert abs(row["achieved"] - 0.8) < 4 / 4616  # one 1x4 block of PatternNet's 4616 weights
    assert row["pattern_layers"] == ["conv1", "conv2", "fc1", "fc2", "head"]
    assert 0.0 <= row["top1"] <= 1.0
    assert isinstance(row["pack_bytes"], int) and row["pack_bytes"] > 0
    # the pack's data sits at the 1x4 floor; the file adds only the safetensors header
    assert row["floor_bytes"] > 0 and row["data_over_floor"] <= 1.02
    assert row["pack_over_floor"] > row["data_over_floor"]


def test_nm_cells_ask_for_what_whole_layers_reach():
    """PatternNet's conv1 (9 columns) takes no N:M: 2:4 reaches 2272 of 4616 zeros."""
    model = PatternNet()
    assert requested_sparsity(model, "2:4", 0.5) == 2272 / 4616
    assert requested_sparsity(model, "1x4", 0.5) == 0.5
    assert requested_sparsity(model, None, 0.9) == 0.9
