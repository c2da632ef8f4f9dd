"""FLOPs is the default budget metric of structured methods; every report has all three factors."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor import zoo
from compressor.io import load_model
from compressor.methods import get_method, prune
from compressor.stats import measure


@pytest.mark.parametrize(
    "method, config", [("bar", {}), ("channel-magnitude", {}), ("gss", {"variant": "structure"})]
)
def test_flops_is_the_default_metric_of_structured_methods(method, config):
    assert get_method(method).default_metric(config) == "flops"


def test_a_bare_factor_budget_counts_flops_in_the_api(small_digits):
    torch.manual_seed(0)
    model = zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8).eval()
    result = prune(model, "channel-magnitude", "4x", small_digits, finetune_epochs=0, bn_batches=2)
    assert result.report["budget"]["metric"] == "flops"
    example = (small_digits.sample_inputs(2),)
    dense, pruned = measure(model, example), measure(result.model, example)
    assert 0.99 * 0.25 <= pruned.flops / dense.flops <= 0.25  # 4x fewer MACs, from below
    assert result.report["factors"] == {
        "flops": dense.flops / pruned.flops,
        "volume": dense.volume / pruned.volume,
        "params": dense.nonzero / pruned.nonzero,
    }


def test_unstructured_report_factors_equal_measure_ratios(lenet5_digits, digits):
    result = prune(lenet5_digits, "magnitude-global", 0.9, digits)
    example = (digits.sample_inputs(2),)
    dense, pruned = measure(lenet5_digits, example), measure(result.model, example)
    factors = result.report["factors"]
    assert factors == {"flops": 1.0, "volume": 1.0, "params": dense.nonzero / pruned.nonzero}
    assert factors["params"] > 5.0  # 90 % of the weights gone (biases stay)


def test_factors_need_an_input():
    """Without data or a recorded input shape there is nothing to measure on: None."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    result = prune(model, "magnitude-global", 0.5)
    assert result.report["factors"] is None


def test_cli_summary_and_info_show_the_factors(tmp_path, lenet5_pt2, digits):
    out = tmp_path / "m.pt2"
    args = ["prune", str(lenet5_pt2), "--method", "magnitude-global", "--sparsity", "0.9"]
    result = CliRunner().invoke(cli, args + ["-o", str(out)])
    assert result.exit_code == 0, result.output
    report = load_model(out).report
    example = (torch.zeros(2, 1, 8, 8),)  # no --data: the recorded input shape
    dense = measure(load_model(lenet5_pt2).model, example)
    pruned = measure(load_model(out).model, example)
    params = dense.nonzero / pruned.nonzero
    assert report["factors"] == {"flops": 1.0, "volume": 1.0, "params": params}
    assert f"reduction FLOPs 1.00x, volume 1.00x, params {params:.2f}x" in result.output
    info = CliRunner().invoke(cli, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert f"reduction: FLOPs 1.00x, volume 1.00x, params {params:.2f}x" in info.output
    assert f"FLOPs {pruned.flops:,} MACs" in info.output  # the totals of any model
    shown = json.loads(CliRunner().invoke(cli, ["info", str(out), "--json"]).output)
    assert shown["report"]["factors"] == report["factors"]
