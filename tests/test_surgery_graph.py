"""Channel dependency graph: groups, offsets, multipliers, fixed channels, tracing fallbacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor import zoo
from compressor.errors import CompressorError, InputError
from compressor.io import load_model, save_model
from compressor.surgery import channel_groups, group_reduce, slim_
from tests import models as toys


def _groups(model: nn.Module, **kwargs):
    torch.manual_seed(0)
    return channel_groups(model.eval(), toys.example_inputs(model, **kwargs))


def _group_of(groups, fqn: str, kind: str = "producer"):
    for group in groups:
        for member in group.members:
            if member.fqn == fqn and member.kind == kind:
                return group, member
    raise AssertionError(f"{fqn} {kind} not found")


def _members(group) -> set[tuple[str, str]]:
    return {(m.fqn, m.kind) for m in group.members}


def test_resnet_stream_groups_producers_and_consumers():
    model = zoo.build("resnet20", in_channels=3, input_size=8)
    groups = channel_groups(model, torch.randn(2, 3, 8, 8))
    stream, _ = _group_of(groups, "stem.0")
    assert stream.residual and stream.size == 16 and stream.prunable
    producers = {m.fqn for m in stream.producers}
    assert producers == {"stem.0", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    consumers = {m.fqn for m in stream.consumers}
    assert consumers == {"layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1",
                         "layer2.0.shortcut.0"}  # fmt: skip
    assert {m.fqn for m in stream.norms} == {"stem.1", *(f"layer1.{i}.bn2" for i in range(3))}
    assert {m.fqn: m.norm for m in stream.producers}["layer1.1.conv2"] == "layer1.1.bn2"
    inner, conv1 = _group_of(groups, "layer1.0.conv1")
    assert conv1.norm == "layer1.0.bn1" and not inner.residual
    assert _members(inner) == {("layer1.0.conv1", "producer"), ("layer1.0.bn1", "norm"),
                               ("layer1.0.conv2", "consumer")}  # fmt: skip
    stage2, _ = _group_of(groups, "layer2.0.shortcut.0")
    assert {"layer2.0.conv2", "layer2.1.conv2"} <= {m.fqn for m in stage2.producers}


def test_output_and_input_channels_are_fixed():
    model = zoo.build("resnet20", in_channels=3, input_size=8)
    groups = channel_groups(model, torch.randn(2, 3, 8, 8))
    logits, _ = _group_of(groups, "fc")
    assert logits.fixed.all() and not logits.prunable and "model output" in logits.reasons
    image, member = _group_of(groups, "stem.0", "consumer")
    assert image.fixed.all() and "model input" in image.reasons and member.dim == 1


def test_flatten_into_linear_repeats_each_channel_hw_times():
    groups = _groups(toys.FlattenLinear())
    group, member = _group_of(groups, "fc1", "consumer")
    assert group.size == 8 and member.dim == 1
    assert torch.equal(member.index, torch.arange(8).repeat_interleave(16))
    assert {m.fqn for m in group.producers} == {"features.0.0"}


def test_lenet5_classifier_reads_50_channels_of_16_features():
    groups = channel_groups(zoo.build("lenet5"), torch.randn(2, 1, 28, 28))
    group, member = _group_of(groups, "7", "consumer")
    assert group.size == 50 and len(member.index) == 800
    assert torch.equal(member.index, torch.arange(50).repeat_interleave(16))


def test_nested_concat_gives_offsets():
    groups = _groups(toys.NestedConcat())
    group, reader = _group_of(groups, "mix.0", "consumer")
    assert group.size == 18 and torch.equal(reader.index, torch.arange(18))
    offsets = {m.fqn: m.index.tolist() for m in group.producers}
    assert offsets == {
        "a.0": list(range(0, 3)),
        "b.0": list(range(3, 7)),
        "c.2.0": list(range(7, 12)),
        "d.1.0": list(range(12, 18)),
    }
    assert not group.residual and not group.fixed.any()


def test_split_concat_residual_ties_halves_to_the_stream():
    groups = _groups(toys.SplitConcatResidual())
    group, _ = _group_of(groups, "stem.0")
    assert group.residual and group.size == 8
    index = {(m.fqn, m.kind): m.index.tolist() for m in group.members}
    assert index[("left.0", "consumer")] == [0, 1, 2, 3]
    assert index[("right.0", "consumer")] == [4, 5, 6, 7]
    assert index[("left.0", "producer")] == [0, 1, 2, 3]
    assert index[("right.0", "producer")] == [4, 5, 6, 7]


def test_concat_on_height_ties_channels_without_offsets():
    groups = _groups(toys.ConcatNonChannel())
    group, _ = _group_of(groups, "top.0")
    assert group.size == 6  # not 12: the inputs share their channels
    index = {m.fqn: m.index.tolist() for m in group.producers}
    assert index == {"top.0": list(range(6)), "bottom.0": list(range(6))}
    reader = [m for m in group.consumers if m.fqn == "mix.0"]
    assert reader and torch.equal(reader[0].index, torch.arange(6))


def test_depthwise_conv_ties_its_input_and_output():
    groups = _groups(toys.Depthwise())
    group, member = _group_of(groups, "depthwise.0.0", "grouped")
    assert group.size == 12 and torch.equal(member.index, torch.arange(12))
    assert ("expand.0.0", "producer") in _members(group)
    assert ("project.0", "consumer") in _members(group)
    assert {m.fqn for m in group.norms} == {"expand.0.1", "depthwise.0.1"}


def test_grouped_conv_makes_whole_groups_one_unit():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 3, groups=4), nn.Conv2d(4, 2, 1))
    groups = channel_groups(model, torch.randn(2, 3, 6, 6))
    group, member = _group_of(groups, "1", "grouped")
    assert group.size == 4 and torch.equal(member.index, torch.arange(4))
    _, producer = _group_of(groups, "0")
    assert torch.equal(producer.index, torch.arange(4).repeat_interleave(2))


def test_one_output_channel_conv_is_a_plain_producer():
    groups = _groups(toys.OneChannel())
    group, member = _group_of(groups, "squeeze")
    assert group.size == 1 and member.kind == "producer"
    assert ("expand.0", "consumer") in _members(group)


def test_channel_parameters_and_prelu_are_members():
    groups = _groups(toys.ChannelScale())
    group, _ = _group_of(groups, "stem.0")
    kinds = {(m.fqn, m.kind, m.dim) for m in group.members}
    assert ("scale", "channelwise", 1) in kinds and ("act", "channelwise", 0) in kinds


def test_shared_layer_is_one_member_and_ties_its_inputs():
    groups = _groups(toys.SharedConv())
    group, _ = _group_of(groups, "shared", "consumer")
    assert {m.fqn for m in group.producers} == {"a.0.0", "b.0.0"}
    assert sum(1 for m in group.members if m.fqn == "shared") == 1


def test_unknown_op_fixes_channels_and_slim_names_it():
    model = toys.Flipped().eval()
    x = toys.example_inputs(model)
    groups = channel_groups(model, x)
    group, _ = _group_of(groups, "stem.0.0")
    assert group.fixed.all() and not group.prunable
    assert any("unsupported op" in r and "fliplr" in r for r in group.reasons)
    keep = {"stem.0.0": torch.tensor([0, 1, 2])}
    with pytest.raises(InputError, match=r"unsupported op: fliplr at node 'fliplr'"):
        slim_(model, keep, x)


def test_reduction_over_channels_fixes_them():
    groups = _groups(toys.MultiIO())
    group, _ = _group_of(groups, "mix.0.0")
    assert group.fixed.all() and any("reduction over channels" in r for r in group.reasons)


def test_multiplied_streams_share_channels():
    groups = _groups(toys.MultiIO())
    group, _ = _group_of(groups, "a.0.0")
    assert {m.fqn for m in group.producers} == {"a.0.0", "b.0.0"} and not group.residual


def test_unused_parameter_is_in_no_group():
    groups = _groups(toys.UnusedParameter())
    fqns = {m.fqn for g in groups for m in g.members}
    assert "unused_layer" not in fqns and "unused" not in fqns


def test_fx_failure_falls_back_to_export():
    model = toys.ShapeBranch().eval()
    with pytest.raises(Exception, match="control flow"):
        torch.fx.symbolic_trace(model)
    groups = channel_groups(model, toys.example_inputs(model))
    stream, _ = _group_of(groups, "stem.0.0")
    assert stream.residual and {m.fqn for m in stream.producers} == {"stem.0.0", "block.branch.2.0"}


def test_untraceable_model_names_both_tracers():
    model = toys.DataBranch().eval()
    with pytest.raises(CompressorError, match="torch.fx failed .* torch.export failed"):
        channel_groups(model, toys.example_inputs(model))


def test_lifted_pt2_has_the_same_groups(tmp_path):
    model = zoo.build("resnet20", in_channels=3, input_size=8).eval()
    x = torch.randn(2, 3, 8, 8)
    save_model(model, tmp_path / "m.pt2", example_inputs=(x,))
    lifted = load_model(tmp_path / "m.pt2").model

    def summary(groups):
        return sorted((g.size, g.residual, sorted(_members(g))) for g in groups)

    assert summary(channel_groups(lifted, x)) == summary(channel_groups(model, x))


def test_group_reduce_sums_producer_rows_and_consumer_columns():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    (group,) = [g for g in channel_groups(model, torch.randn(1, 3, 5, 5)) if g.prunable]
    rows = group_reduce(model, group, p=2)
    assert torch.allclose(rows, model[0].weight.pow(2).sum(dim=(1, 2, 3)))
    cols = group_reduce(model, group, kinds=("consumer",), p=1)
    assert torch.allclose(cols, model[2].weight.abs().sum(dim=(0, 2, 3)))
    cols.sum().backward()  # differentiable: GSS uses it as a regulariser
    assert model[2].weight.grad is not None
