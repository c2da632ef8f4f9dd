"""The slimming invariant: slimmed output == masked output, with fewer params and FLOPs.

The oracle (`tests.models.masked_reference`) zeroes removed channels with forward hooks on a
copy of the model; it shares no code with `compressor.surgery` beyond the keep masks. The
zoo and topology invariants run in float64: slimming is exact, and float32 rounding through
a deep randomised network (about 1e-4 here) would otherwise hide small real errors.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from compressor import zoo
from compressor.errors import CompressorError, InputError
from compressor.masks import WeightMask
from compressor.stats import measure
from compressor.surgery import channel_groups, mask_, slim_
from tests import models as toys

RATIOS = [0.25, 0.5, 0.9]
RESIDUAL_ARCHS = ["mobilenetv2", "resnet20", "resnet32", "resnet56"]
MIXED_TOYS = ["projection_residual", "root_residual", "split_concat_residual", "shape_branch"]


def _zoo(name: str) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    width = {"width": 0.5} if name in RESIDUAL_ARCHS else {}
    model = zoo.build(name, in_channels=3, input_size=8, **width).eval().double()
    return toys.randomize_bn_(model), (torch.randn(2, 3, 8, 8, dtype=torch.float64),)


def _toy(name: str, dtype=torch.float64) -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = toys.randomize_bn_(toys.TOPOLOGIES[name]().eval().to(dtype))
    return model, tuple(t.to(dtype) for t in toys.example_inputs(model))


def _random_mask(group, index, ratio: float, generator) -> torch.Tensor:
    """Remove about `ratio` of the removable channels; every member keeps at least one."""
    mask = torch.ones(group.size, dtype=torch.bool)
    removable = (~group.fixed).nonzero().flatten()
    count = min(round(ratio * group.size), len(removable))
    mask[removable[torch.randperm(len(removable), generator=generator)[:count]]] = False
    for member in group.producers + group.consumers:
        if not mask[member.index].any():
            mask[member.index[0]] = True
    return mask


def _tied_keep(groups, ratio, seed=0):
    generator = torch.Generator().manual_seed(seed)
    keep, removed = {}, {}
    for group in groups:
        if not group.prunable:
            continue
        keep[group.id] = mask = _random_mask(group, None, ratio, generator)
        for member in group.producers:
            removed[member.fqn] = (~mask[member.index]).nonzero().flatten()
    return keep, removed


def _mixed_keep(groups, ratio, seed=0):
    """Residual groups: one random mask per producer layer; other groups: one per group."""
    generator = torch.Generator().manual_seed(seed)
    keep, removed = {}, {}
    for group in groups:
        if not group.prunable:
            continue
        if not group.residual:
            keep[group.id] = mask = _random_mask(group, None, ratio, generator)
            for member in group.producers:
                removed[member.fqn] = (~mask[member.index]).nonzero().flatten()
            continue
        for member in group.of_kind("producer"):
            mask = _random_mask(group, None, ratio, generator)[member.index]
            keep[member.fqn] = mask
            removed[member.fqn] = (~mask).nonzero().flatten()
    return keep, removed


def _close(got, expected, atol=1e-5):
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for a, b in zip(got, expected, strict=True):
        assert a.shape == b.shape
        assert (a - b).abs().max().item() <= atol * max(1.0, b.abs().max().item())


def check_invariant(model: nn.Module, x: tuple, keep: dict, removed: dict, residual: str):
    """mask_ reproduces the oracle; slim_ of the masked model matches it on fresh inputs."""
    reference = toys.masked_reference(model, removed)
    before = measure(model, x)
    mask_(model, keep, x, residual=residual, norms=True)
    with torch.no_grad():
        _close(model(*x), reference(*x))
    result = slim_(model, keep, x, residual=residual)
    generator = torch.Generator().manual_seed(7)
    fresh = tuple(torch.randn(3, *t.shape[1:], generator=generator, dtype=t.dtype) for t in x)
    with torch.no_grad():
        _close(result.model(*fresh), reference(*fresh))
    after = measure(result.model, x)
    assert after.params < before.params and after.flops < before.flops
    return result


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", zoo.list_archs())
def test_zoo_tied(name, ratio):
    model, x = _zoo(name)
    keep, removed = _tied_keep(channel_groups(model, x), ratio)
    result = check_invariant(model, x, keep, removed, "tied")
    assert result.model is model and result.report["joins"] == 0


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", RESIDUAL_ARCHS)
def test_zoo_mixed(name, ratio):
    model, x = _zoo(name)
    keep, removed = _mixed_keep(channel_groups(model, x), ratio)
    result = check_invariant(model, x, keep, removed, "mixed")
    assert result.model is model  # blocks were rewritten in place
    assert result.report["joins"] > 0 and result.report["rewritten"]


@pytest.mark.parametrize("ratio", RATIOS)
@pytest.mark.parametrize("name", sorted(toys.TOPOLOGIES))
def test_topology_tied(name, ratio):
    model, x = _toy(name)
    keep, removed = _tied_keep(channel_groups(model, x), ratio)
    check_invariant(model, x, keep, removed, "tied")


@pytest.mark.parametrize("name", MIXED_TOYS)
def test_topology_mixed(name):
    model, x = _toy(name)
    keep, removed = _mixed_keep(channel_groups(model, x), 0.5, seed=3)
    result = check_invariant(model, x, keep, removed, "mixed")
    assert result.report["joins"] > 0


def test_root_level_rewrite_returns_a_graph_module():
    model, x = _toy("flatten_linear")
    keep, removed = _tied_keep(channel_groups(model, x), 0.5)
    result = check_invariant(model, x, keep, removed, "tied")
    assert isinstance(result.model, torch.fx.GraphModule) and result.report["rewritten"] == [""]
    assert (
        result.model.fc1.in_features == 16 * result.model.get_submodule("features.0.0").out_channels
    )


def test_split_sizes_are_rewritten():
    model, x = _toy("split_concat_residual")
    groups = channel_groups(model, x)
    (stream,) = [g for g in groups if g.residual]
    keep = {stream.id: torch.tensor([1, 0, 0, 1, 1, 1, 0, 1], dtype=torch.bool)}
    mask_(model, keep, x, norms=True)
    expected = model(*x)
    result = slim_(model, keep, x)
    left, right = (result.model.get_submodule(f"{n}.0") for n in ("left", "right"))
    assert left.in_channels == 2 and right.in_channels == 3
    _close(result.model(*x), expected)


def test_constants_fold_into_linear_and_pointwise_conv():
    torch.manual_seed(0)
    model = toys.randomize_bn_(toys.BiasToLinear().eval())
    x = toys.example_inputs(model)
    keep = {"stem.0.0": torch.tensor([0, 2, 5]), "pointwise.0": torch.tensor([1, 3])}
    removed = {"stem.0.0": torch.tensor([1, 3, 4]), "pointwise.0": torch.tensor([0, 2, 4])}
    reference = toys.masked_reference(model, removed, zero_norms=False)
    result = slim_(model, keep, x)  # no mask_: the BN shifts of removed channels are constants
    assert result.report["folded"] == {"pointwise.0": 3, "fc": 3}
    fresh = toys.example_inputs(model, batch=4, seed=5)
    _close(result.model(*fresh), reference(*fresh))


def test_constant_into_padded_conv_raises_and_changes_nothing():
    torch.manual_seed(0)
    model = toys.randomize_bn_(toys.BiasToPadded().eval())
    x = toys.example_inputs(model)
    expected = model(*x)
    params = [p.clone() for p in model.parameters()]
    keep = {"stem.0.0": torch.tensor([0, 2, 5])}
    with pytest.raises(CompressorError, match="zero padding.*mask_"):
        slim_(model, keep, x)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    _close(model(*x), expected, atol=0)
    mask_(model, keep, x, norms=True)
    reference = model(*x)
    assert slim_(model, keep, x).model.mix[0].in_channels == 3
    _close(model(*x), reference)


def test_mixed_joins_carry_constants_of_removed_channels():
    torch.manual_seed(0)
    model = toys.randomize_bn_(toys.ResidualConst().eval())
    x = toys.example_inputs(model)
    keep = {
        "stem.0": torch.tensor([0, 1, 2, 3]),
        "delta1.0": torch.tensor([2, 3, 4]),
        "delta2.0": torch.tensor([0, 5]),
    }
    removed = {
        "stem.0": torch.tensor([4, 5]),
        "delta1.0": torch.tensor([0, 1, 5]),
        "delta2.0": torch.tensor([1, 2, 3, 4]),
    }
    reference = toys.masked_reference(model, removed, zero_norms=False)
    result = slim_(model, keep, x, residual="mixed")
    joins = [m for m in result.model.modules() if type(m).__name__ == "ResidualJoin"]
    assert len(joins) == 2 and all(j.has_const for j in joins)
    fresh = toys.example_inputs(model, batch=4, seed=9)
    _close(result.model(*fresh), reference(*fresh))


def test_layer_norm_renormalises_over_kept_features():
    torch.manual_seed(0)
    model = toys.LayerNormMLP().eval()
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        model.norm.bias.normal_()
    x = toys.example_inputs(model)
    kept = torch.tensor([0, 3, 4, 7, 9])
    w1, b1 = model.fc1.weight[kept].clone(), model.fc1.bias[kept].clone()
    gamma, beta = model.norm.weight[kept].clone(), model.norm.bias[kept].clone()
    w2, b2 = model.fc2.weight[:, kept].clone(), model.fc2.bias.clone()
    result = slim_(model, {"fc1": kept}, x)
    (fresh,) = toys.example_inputs(model, batch=4, seed=3)
    hidden = torch.nn.functional.layer_norm(fresh @ w1.T + b1, (5,), gamma, beta)
    _close(result.model(fresh), torch.relu(hidden) @ w2.T + b2)
    assert result.model.norm.normalized_shape == (5,)


def test_tied_layer_masks_keep_the_union_and_zero_the_rest():
    model, x = _toy("projection_residual")
    groups = channel_groups(model, x)
    (stream,) = [g for g in groups if g.residual]
    masks = {m.fqn: torch.zeros(len(m.index), dtype=torch.bool) for m in stream.producers}
    for i, fqn in enumerate(sorted(masks)):
        masks[fqn][[i, i + 3]] = True
    removed = {fqn: (~mask).nonzero().flatten() for fqn, mask in masks.items()}
    reference = toys.masked_reference(model, removed, zero_norms=False)
    mask_(model, masks, x, norms=False)
    result = slim_(model, masks, x)
    union = sum(m.long() for m in masks.values()).bool()
    assert result.model.block2.branch[0][0].in_channels == int(union.sum())
    assert set(result.report["zeroed"]) == set(masks)
    _close(result.model(*x), reference(*x))


def test_index_keep_equals_bool_keep():
    outs = []
    for keep in (
        {0: torch.tensor([True, False, True, False, True, True])},
        {0: torch.tensor([0, 2, 4, 5])},
    ):
        model, x = _toy("unused_parameter")
        mask_(model, keep, x, norms=True)
        outs.append(slim_(model, keep, x).model(*x))
    _close(outs[0], outs[1], atol=0)


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ({99: torch.ones(3, dtype=torch.bool)}, "no channel group 99"),
        ({"stem.0.1": torch.tensor([0])}, "not a layer producing removable channels"),
        ({"head.fc": torch.tensor([0])}, "cannot be removed: model output"),
        ({"nope": torch.tensor([0])}, "use a group id or one of"),
        ({0: torch.ones(5, dtype=torch.bool)}, r"shape \(5,\), expected \(6,\)"),
        ({0: torch.zeros(6, dtype=torch.bool)}, "keeps no channel"),
        ({0: torch.tensor([0.5])}, "bool mask or a 1-D index"),
        ({0: torch.tensor([0, 9])}, r"in \[0, 6\)"),
        ({(0,): torch.tensor([0])}, "group ids .* or layer paths"),
    ],
)
def test_bad_keep_is_an_input_error(keep, message):
    model, x = _toy("unused_parameter")
    with pytest.raises(InputError, match=message):
        slim_(model, keep, x)


def test_removing_output_channels_names_the_reason():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.randn(1, 3, 5, 5)
    with pytest.raises(InputError, match="cannot be removed: model output"):
        slim_(model, {"2": torch.tensor([0])}, x)


def test_group_named_twice_is_refused():
    model, x = _toy("unused_parameter")
    with pytest.raises(InputError, match="both by id and by layers"):
        slim_(model, {0: torch.tensor([0, 1]), "stem.0.0": torch.tensor([0])}, x)


def test_bad_residual_mode_and_installed_masks_are_refused():
    model, x = _toy("unused_parameter")
    with pytest.raises(InputError, match="residual must be one of"):
        slim_(model, {}, x, residual="loose")
    conv = model.stem[0][0]
    parametrize.register_parametrization(conv, "weight", WeightMask(torch.ones_like(conv.weight)))
    with pytest.raises(CompressorError, match="strip the masks first"):
        slim_(model, {0: torch.tensor([0])}, x)


def test_training_flags_are_kept_exactly():
    model, x = _toy("projection_residual")
    model.train()
    model.block1.branch[0][1].eval()  # a frozen BatchNorm inside a model in training mode
    flags = {name: m.training for name, m in model.named_modules()}
    keep, _ = _tied_keep(channel_groups(model, x), 0.5)
    assert {name: m.training for name, m in model.named_modules()} == flags
    mask_(model, keep, x, norms=True)
    result = slim_(model, keep, x)
    assert {name: m.training for name, m in result.model.named_modules()} == flags


def test_loaded_pt2_is_slimmed_in_place_and_saves_again(tmp_path):
    from compressor.io import load_model, save_model

    model, x = _toy("projection_residual", dtype=torch.float32)
    save_model(model, tmp_path / "dense.pt2", example_inputs=x)
    lifted = load_model(tmp_path / "dense.pt2").model
    keep, removed = _mixed_keep(channel_groups(lifted, x), 0.5, seed=1)
    reference = toys.masked_reference(lifted, removed)
    mask_(lifted, keep, x, residual="mixed", norms=True)
    result = slim_(lifted, keep, x, residual="mixed")
    assert result.model is lifted and result.report["trace"] == "graph"
    assert result.report["joins"] > 0
    _close(result.model(*x), reference(*x))
    save_model(result.model, tmp_path / "slim.pt2", example_inputs=x)
    again = load_model(tmp_path / "slim.pt2").model
    _close(again(*x), reference(*x))
