"""`compress info` on a pattern-pruned model: per layer, whether the pattern still holds."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from bench.pattern_floor import mask_to_pattern_
from cli.main import cli
from compressor.io import save_model
from compressor.pattern_layers import pattern_holds
from tests.models import ConvBnPatternNet


@pytest.fixture(scope="module")
def broken_pt2(tmp_path_factory):
    """A 2:4 ConvBnPatternNet .pt2 whose head was edited after pruning (no longer 2:4)."""
    torch.manual_seed(0)
    model = ConvBnPatternNet().eval()
    report = mask_to_pattern_(model, "2:4", 0.5)
    with torch.no_grad():
        model.head.weight[0, :4] = 1.0  # one group of four non-zeros
    path = tmp_path_factory.mktemp("info-pattern") / "net.pt2"
    save_model(model, path, example_inputs=(torch.randn(2, 4, 6, 6),), report=report)
    return path, model, report


def test_pattern_holds_per_layer(broken_pt2):
    _, model, report = broken_pt2
    assert pattern_holds(model, report) == {
        "block1.0": True,
        "block2.0": True,
        "block3.0": True,
        "head": False,
    }
    assert pattern_holds(model, {"method": "dense"}) == {}


def test_info_table_shows_whether_the_pattern_holds(broken_pt2):
    path, _, _ = broken_pt2
    result = CliRunner().invoke(cli, ["info", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = {line.split()[1]: line for line in result.output.splitlines() if line.startswith("│")}
    assert "pattern 2:4" in result.output
    for layer in ("block1.0", "block2.0", "block3.0"):
        assert rows[layer].rstrip(" │").endswith("holds"), rows[layer]
    assert rows["head"].rstrip(" │").endswith("BROKEN"), rows["head"]
    assert "pattern 2:4: 3 of 4 pattern layers follow it; broken: head" in result.output


def test_info_json_has_pattern_holds(broken_pt2):
    path, _, _ = broken_pt2
    result = CliRunner().invoke(cli, ["info", str(path), "--json"])
    assert result.exit_code == 0, result.output
    held = json.loads(result.output)["pattern_holds"]
    assert held == {"block1.0": True, "block2.0": True, "block3.0": True, "head": False}


def test_info_without_pattern_has_no_pattern_column(lenet5_pt2):
    result = CliRunner().invoke(cli, ["info", str(lenet5_pt2)], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "pattern" not in result.output
