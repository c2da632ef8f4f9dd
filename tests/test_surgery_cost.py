"""The cost engine's predictor equals `stats.measure` on the slimmed model, exactly."""

from __future__ import annotations

import pytest
import torch

from compressor import zoo
from compressor.errors import InputError
from compressor.stats import measure
from compressor.surgery import channel_groups, mask_, slim_
from compressor.surgery.cost import CostModel
from compressor.surgery.select import select_inputs_, with_input_features
from tests.conftest import DISTINCT_ARCHS


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.build(arch, in_channels=1, num_classes=10, input_size=8).eval()


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def random_keep(groups, residual: str, seed: int, rate: float = 0.5) -> dict:
    """A keep dict naming every prunable group (per producer on a mixed stream)."""
    generator = torch.Generator().manual_seed(seed)
    keep = {}
    for group in groups:
        if not group.prunable:
            continue
        by_layer = residual == "mixed" and group.residual and not group.of_kind("grouped")
        entries = [(m.fqn, len(m.index)) for m in group.of_kind("producer")]
        for key, size in entries if by_layer else [(group.id, group.size)]:
            fixed = group.fixed if not by_layer else torch.zeros(size, dtype=torch.bool)
            mask = (torch.rand(size, generator=generator) < rate) | fixed
            mask[int(torch.randint(size, (1,), generator=generator))] = True
            keep[key] = mask
    return keep


def _measured(model, keep, x, residual) -> dict[str, int]:
    mask_(model, keep, x, residual=residual, norms=True)
    stats = measure(slim_(model, keep, x, residual=residual).model, x)
    return {"params": stats.params, "flops": stats.flops, "volume": stats.volume}


@pytest.mark.parametrize("residual", ["tied", "mixed"])
@pytest.mark.parametrize("arch", DISTINCT_ARCHS)
def test_prediction_equals_measure_on_the_slimmed_model(arch, residual):
    x = _x()
    dense = _model(arch)
    costs = CostModel(dense, (x,), residual)
    stats = measure(dense, x)
    assert costs.predict({}) == {
        "params": stats.params,
        "flops": stats.flops,
        "volume": stats.volume,
    }
    groups = channel_groups(dense, x)
    for seed, rate in ((0, 0.5), (1, 0.2), (2, 0.9)):
        keep = random_keep(groups, residual, seed, rate)
        predicted = costs.predict(keep)
        assert predicted == _measured(_model(arch), keep, x, residual), (seed, rate)
        assert predicted["flops"] < costs.dense("flops")


def test_a_mixed_decision_priced_tied_equals_the_tied_build():
    x = _x()
    costs = CostModel(_model("resnet20"), (x,), "mixed")
    keep = random_keep(channel_groups(_model("resnet20"), x), "mixed", seed=4)
    tied = costs.predict(keep, "tied")  # every stream keeps its producers' union
    assert tied == _measured(_model("resnet20"), keep, x, "tied")
    assert tied["volume"] > costs.predict(keep)["volume"]


def test_input_feature_groups_are_priced():
    x = _x()
    model = _model("lenet300")
    groups = with_input_features(model, channel_groups(model, x))
    costs = CostModel(model, (x,), "tied", groups=groups)
    features = groups[-1]
    assert features.id >= len(costs.analysis.groups)
    mask = torch.rand(features.size, generator=torch.Generator().manual_seed(0)) < 0.5
    hidden = next(g for g in groups if g.prunable and g.id < features.id)
    hidden_mask = torch.arange(hidden.size) % 3 == 0
    predicted = costs.predict({features.id: mask, hidden.id: hidden_mask})
    slimmed = slim_(model, {hidden.id: hidden_mask}, x).model
    select_inputs_(slimmed, {features.members[0].fqn: mask}, x)
    stats = measure(slimmed, x)
    assert predicted == {"params": stats.params, "flops": stats.flops, "volume": stats.volume}


def test_unknown_metric_is_refused():
    costs = CostModel(_model("lenet5"), (_x(),), "tied")
    with pytest.raises(InputError, match="unknown cost metric 'latencyy'"):
        costs.cost({}, "latencyy")
