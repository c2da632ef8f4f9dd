"""Magnitude channel pruning: L1 filter scores, uniform allocation, budget met, slimmed."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor import zoo
from compressor.budget import Budget
from compressor.io import load_model
from compressor.methods import prune
from compressor.methods.channel_magnitude import ChannelMagnitude, filter_l1, top_fraction
from compressor.stats import measure


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.build(arch, in_channels=1, num_classes=10, input_size=8).eval()


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _prepared(arch: str, budget: Budget, residual: str = "mixed") -> ChannelMagnitude:
    method = ChannelMagnitude(_model(arch), budget, residual=residual)
    method.prepare(_x())
    return method


def test_filter_l1_sums_each_channels_filters_over_its_producers():
    method = _prepared("resnet20", Budget("volume", 0.5), residual="tied")
    stream = next(u for u in method.units if u.name == "group 0")  # stem + layer1 conv2s
    expected = sum(
        method.model.get_submodule(fqn).weight.detach().abs().sum(dim=(1, 2, 3))
        for fqn in ("stem.0", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2")
    )
    assert torch.allclose(filter_l1(method.model, stream), expected)


def test_top_fraction_keeps_the_best_and_the_fixed():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.3])
    fixed = torch.tensor([True, False, False, False])
    assert top_fraction(scores, fixed, 0.5).tolist() == [True, True, True, False]
    assert top_fraction(scores, torch.zeros(4, dtype=torch.bool), 0.01).tolist() == [
        False,
        True,
        False,
        False,
    ]


@pytest.mark.parametrize("residual", ["mixed", "tied"])
def test_each_unit_keeps_its_best_channels_at_a_near_uniform_ratio(residual):
    method = _prepared("resnet20", Budget("flops", 0.25), residual=residual)
    ratios = []
    for unit, mask, score in zip(method.units, method.masks, method.scores):
        kept, dropped = score[mask & ~unit.fixed], score[~mask]
        if len(dropped):
            assert float(kept.min()) >= float(dropped.max())  # a top-k set in every unit
        ratios.append(float(mask.float().mean()))
    assert max(ratios) - min(ratios) <= 0.5  # one ratio, up to rounding and the budget step


@pytest.mark.parametrize("metric", ["volume", "flops"])
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_budget_met(factor, metric, small_digits):
    model = _model("resnet20")
    result = prune(
        model,
        "channel-magnitude",
        Budget(metric, 1 / factor),
        small_digits,
        finetune_epochs=0,
        bn_batches=1,
    )
    stats, dense = measure(result.model, _x()), measure(model, _x())
    achieved = (stats.volume / dense.volume) if metric == "volume" else stats.flops / dense.flops
    assert 0.99 / factor <= achieved <= 1 / factor + 1e-12
    assert result.report["achieved"]["keep"] == pytest.approx(achieved)
    assert stats.params < dense.params
    assert torch.isfinite(result.model(_x())).all()


def test_slimmed_equals_masked_model():
    method = _prepared("mobilenetv2", Budget("volume", 0.4))
    reference = _model("mobilenetv2")
    from compressor.methods.bar.cost import keep_dict
    from compressor.surgery import mask_

    keep = keep_dict(method.units, method.masks)
    mask_(reference, keep, _x(), residual="mixed", norms=True)
    result = method.finalize()
    torch.testing.assert_close(result.model.eval()(_x(8)), reference(_x(8)), rtol=1e-5, atol=1e-5)


def test_cli_prune_channel_magnitude(tmp_path, lenet5_pt2):
    out = tmp_path / "cm.pt2"
    args = ["prune", lenet5_pt2, "--method", "channel-magnitude", "--budget", "4x"]
    args += ["--data", "digits", "--finetune-epochs", "1", "-o", out]
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = load_model(out).report
    assert report["method"] == "channel-magnitude" and report["budget"]["metric"] == "flops"
    assert 0.99 * 0.25 <= report["achieved"]["keep"] <= 0.25
    assert "flops kept" in result.output
