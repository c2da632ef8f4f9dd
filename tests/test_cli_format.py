"""How the CLI prints numbers: `compress info`'s report and the demo table's rows."""

from __future__ import annotations

import torch
from click.testing import CliRunner
from torch import nn

from cli.demo import COLUMNS, achieved, cells, row
from cli.main import cli
from cli.tables import format_value
from compressor.budget import Budget, parse_sparsity
from compressor.io import save_model
from compressor.stats import measure


def test_format_value_shortens_floats_everywhere():
    budget = parse_sparsity("0.9").to_dict()
    assert budget["keep"] != 0.1  # 1 - 0.9 in binary: the value a user once saw printed
    assert format_value(budget) == "metric: weights, keep: 0.1, factor: 10"
    nested = {"sparsity": 0.90001234, "zeros": 9, "per_layer": {"fc": 1 / 3}, "l": [0.1 + 0.2]}
    assert format_value(nested) == "sparsity: 0.9, zeros: 9, per_layer: {fc: 0.3333}, l: [0.3]"
    assert [format_value(v) for v in (12.3456, 123456.7, 3, True, None, "bar")] == [
        "12.35",
        "123,457",
        "3",
        "True",
        "None",
        "bar",
    ]


def test_info_prints_the_report_with_short_floats(tmp_path, lenet5_digits, digits):
    budget = parse_sparsity("0.9")
    report = {"method": "magnitude-global", "budget": budget.to_dict(), "top1": 0.98333333333}
    report["achieved"] = {"sparsity": 0.9000000000000001, "zeros": 9, "total": 10}
    path = save_model(
        lenet5_digits, tmp_path / "m.pt2", example_inputs=(digits.sample_inputs(2),), report=report
    )
    result = CliRunner().invoke(cli, ["info", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "  budget: metric: weights, keep: 0.1, factor: 10" in lines
    assert "  achieved: sparsity: 0.9, zeros: 9, total: 10" in lines
    assert "  top1: 0.9833" in lines
    assert "0.0999999" not in result.output and "10.00000" not in result.output


def _mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(16, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _stats(model: nn.Module):
    return measure(model, torch.zeros(1, 16))


def test_demo_row_shows_the_budget_metric_params_and_flops():
    dense, slim = _stats(_mlp(30)), _stats(_mlp(6))  # MACs 16*30 + 30*10 = 780 vs 156
    r = row("bar", Budget("volume", 0.4), slim, dense, 0.95, 0.97) | {"seconds": 1.0}
    r |= {"onnx_bytes": 2000, "csr_bytes": 1500}
    assert dict(zip(COLUMNS, cells(r))) == {
        "method": "bar",
        "target": "volume / 2.5",
        "achieved": "volume 2.5x",  # output sizes 30 + 10 -> 6 + 10
        "nonzero params": f"{16 * 6 + 6 + 6 * 10 + 10:,}",
        "FLOPs (MACs)": "156 (20%)",
        "top-1": "95.00%",
        "delta": "-2.00 pt",
        "time (s)": "1.0",
        "ONNX bytes": "2,000",
        "CSR bytes": "1,500",
    }
    assert achieved(Budget("flops", 0.2), slim, dense) == "flops 5.0x"
    assert achieved(None, dense, dense) == "-"


def test_demo_row_of_a_sparse_model_shows_its_sparsity():
    model = _mlp(30)
    with torch.no_grad():  # zero 90 % of the 780 prunable weights
        for layer in (model[0], model[2]):
            flat = layer.weight.view(-1)
            flat[: int(0.9 * flat.numel())] = 0
    stats, dense = _stats(model), _stats(_mlp(30))
    r = row("magnitude-global", parse_sparsity("0.9"), stats, dense, 0.9, 0.97)
    assert (r["target"], r["achieved"]) == ("sparsity 90.00%", "sparsity 90.00%")
    assert r["params"] == 78 + 30 + 10 and r["flops_kept"] == 1.0
