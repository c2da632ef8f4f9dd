"""The pattern invariant and exact counts after every unstructured method (issue 19.1)."""

import pytest
import torch

from compressor.budget import Budget
from compressor.errors import InputError
from compressor.masks import prunable_layers
from compressor.methods import get_method, list_methods, prune
from compressor.methods.phases import train
from compressor.patterns import holds, parse_pattern
from tests.models import PatternNet
from tests.test_pattern_masks import PATTERNS, assert_pattern, kept_total, sparsity_for

UNSTRUCTURED = [m for m in list_methods() if get_method(m).metrics[0] == "weights"]
# one ranking over all layers: the kept count is short of the budget by less than a block
GLOBAL = {"magnitude-global", "fcpts", "gmp", "probmask", "gss"}


@pytest.mark.parametrize("text", PATTERNS)
@pytest.mark.parametrize("method", UNSTRUCTURED)
def test_every_unstructured_method_keeps_the_pattern_at_exact_counts(method, text, small_digits):
    cls = get_method(method)
    torch.manual_seed(0)
    model = PatternNet().eval()
    sparsity = sparsity_for(text)
    result = prune(model, method, sparsity, small_digits, pattern=text, **cls.smoke_config)
    assert_pattern(result.model, result.report, text)
    pattern = parse_pattern(text)
    layers = prunable_layers(model)
    if pattern.kind == "nm":  # every eligible layer, N of every M: conv1 has 9 columns
        assert result.report["pattern_layers"] == ["conv2", "fc1", "fc2", "head"]
        return
    total = sum(m.weight.numel() for m in layers.values())
    short = round((1 - sparsity) * total) - kept_total(result.model)
    per = 1 if method in GLOBAL else len(layers)
    assert 0 <= short < pattern.a * pattern.b * per, short


@pytest.mark.parametrize("text", ["1x4", "2:4"])
def test_gmp_masks_follow_the_pattern_at_every_update(text):
    """Zhu & Gupta's ramp in units of the pattern: each update's mask already obeys it."""
    torch.manual_seed(0)
    budget = Budget("weights", 1 - sparsity_for(text))
    gmp = get_method("gmp")(PatternNet(), budget, pattern=text, updates=4)
    gmp.prepare()
    pattern, previous = parse_pattern(text), -1
    for progress in (0.2, 0.35, 0.5, 0.6):
        gmp.step(progress)
        weights = [m.weight.detach() for m in gmp.layers.values()]
        zeros = sum(int((w == 0).sum()) for w in weights)
        assert zeros >= previous
        previous = zeros
        for weight in weights:
            assert holds(weight, pattern) or (pattern.kind == "nm" and bool((weight != 0).all()))
    assert zeros > 0


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("probmask", {"mask": "threshold"}, "use mask=topk"),
        ("gss", {"prune": "threshold"}, "needs prune=budget"),
    ],
)
def test_per_weight_decisions_refuse_a_pattern(method, options, message):
    with pytest.raises(InputError, match=message):
        get_method(method)(PatternNet(), Budget("weights", 0.5), pattern="2:4", **options)


@pytest.mark.parametrize("text", ["2:4", "1x4"])
def test_fcpts_obs_keeps_the_pattern_through_the_sparsegpt_solve(text, small_digits):
    """FCPTS's exact step chooses the layers and counts, SparseGPT's solve the groups."""
    torch.manual_seed(0)
    config = get_method("fcpts").smoke_config | {"reconstruct": "obs", "pattern": text}
    result = prune(PatternNet().eval(), "fcpts", sparsity_for(text), small_digits, **config)
    assert_pattern(result.model, result.report, text)
    assert result.report["offset"] is None
    assert set(result.report["obs"]["relative_error"]) == set(prunable_layers(result.model))


def test_fcpts_thresholds_act_on_blocks_while_training():
    """With RxC the reconstruction already sees block masks, at the ERK start's sparsity."""
    torch.manual_seed(0)
    fcpts = get_method("fcpts")(PatternNet(), Budget("weights", 0.2), pattern="4x1")
    fcpts.prepare()
    pattern = parse_pattern("4x1")
    for fqn, module in fcpts.layers.items():
        assert holds(module.weight, pattern), fqn
    zeros = sum(int((m.weight == 0).sum()) for m in fcpts.layers.values())
    assert abs(zeros / fcpts.total - 0.8) < 0.02
    assert abs(float(fcpts.global_sparsity().detach()) - zeros / fcpts.total) < 0.02


def test_sparsegpt_nm_layer_choice_leaves_batchnorm_statistics_alone():
    """The extra pass that ranks layers for N:M runs in eval mode, as the solve's passes."""
    from torch import nn

    from tests.models import conv_bn

    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(3, 8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 8)).train()
    stats = model[0][1].running_mean.clone()
    solver = get_method("sparsegpt")(model, Budget("weights", 0.5), pattern="2:4")
    solver.prune_(torch.randn(32, 3, 8, 8))
    assert torch.equal(model[0][1].running_mean, stats)
    assert model.training  # given back in the mode it came in
    assert holds(model[3].weight, parse_pattern("2:4"))


def test_fcpts_nm_reconstructs_under_the_masks_it_keeps(small_digits):
    """N:M FCPTS picks its groups before reconstruction and keeps them: the weights were
    trained under the final mask, not pruned to a pattern afterwards."""
    torch.manual_seed(0)
    fcpts = get_method("fcpts")
    method = fcpts(PatternNet().eval(), Budget("weights", 0.5), pattern="2:4", steps=8)
    original = {f: m.weight.detach().clone() for f, m in method.layers.items()}
    phases = method.phases(small_digits)
    reconstruct = next(phases)  # prepare() has run: the masks are fixed
    fixed = {f: m.parametrizations.weight[0].fixed.clone() for f, m in method.layers.items()}
    assert all(holds(fixed[f] * original[f], parse_pattern("2:4")) for f in ("conv2", "fc1"))
    train(reconstruct)
    for _ in phases:
        raise AssertionError("FCPTS has one phase")
    result = method.finalize()
    layers = prunable_layers(result.model)
    for fqn, module in layers.items():
        assert torch.equal(module.weight != 0, fixed[fqn] != 0), fqn
    assert any(not torch.equal(layers[f].weight, original[f] * fixed[f]) for f in fixed)
