"""Mixed joins lowered to Pad + Gather + Add: exact, and what both exporters write."""

from __future__ import annotations

import collections

import onnx
import onnxruntime as ort
import pytest
import torch

from compressor import zoo
from compressor.surgery import ResidualJoin, channel_groups, mask_, slim_
from compressor.surgery.mixed import embedding_index
from exporters.onnx import export_onnx
from tests.models import ImageNetResNet18, randomize_bn_

SCATTER_OPS = {"ScatterND", "ScatterElements", "Transpose"}


def _scatter_reference(join: ResidualJoin, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The former lowering: each operand index_add-ed into a zero stream, then the constants."""
    shape = list(a.shape)
    shape[join.dim] = join.width
    out = a.new_zeros(shape)
    full = torch.arange(join.width)
    out = out.index_add(join.dim, full if join.a_full else join.pos_a, a)
    out = out.index_add(join.dim, full if join.b_full else join.pos_b, b * join.alpha)
    if join.has_const:
        view = [1] * out.dim()
        view[join.dim] = join.width
        out = out + join.const.view(view)
    return out


def test_embedding_index_points_missing_channels_at_the_zero_channel():
    assert embedding_index(torch.tensor([1, 3, 4]), 6).tolist() == [3, 0, 3, 1, 2, 3]
    assert embedding_index(torch.tensor([], dtype=torch.long), 2).tolist() == [0, 0]


@pytest.mark.parametrize("dim", [1, 2])
@pytest.mark.parametrize("alpha", [1.0, -1.0])
def test_gather_lowering_is_bitwise_the_scatter_one(dim, alpha):
    """dim 2 of a (batch, tokens, channels) tensor: a Linear stream, padded on the last axis."""
    generator = torch.Generator().manual_seed(0)
    shape = (3, 4, 5) if dim == 1 else (3, 5, 4)
    for pos_a, pos_b in ((None, [0, 3]), ([1, 2, 3], None), ([0, 1], [1, 3])):
        pos_a = None if pos_a is None else torch.tensor(pos_a)
        pos_b = None if pos_b is None else torch.tensor(pos_b)
        const = torch.randn(4, generator=generator)
        join = ResidualJoin(dim, 4, pos_a, pos_b, alpha, const)
        a_shape, b_shape = list(shape), list(shape)
        a_shape[dim] = 4 if pos_a is None else len(pos_a)
        b_shape[dim] = 4 if pos_b is None else len(pos_b)
        a, b = torch.randn(a_shape, generator=generator), torch.randn(b_shape, generator=generator)
        assert torch.equal(join(a, b), _scatter_reference(join, a, b))
        # the gather indices derive from pos_a / pos_b: the state_dict keeps its old keys
        assert set(join.state_dict()) == {"pos_a", "pos_b", "const"}


def _resnet20():
    model = zoo.build("resnet20", in_channels=3, input_size=8)
    return model, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def _resnet18():
    model = randomize_bn_(ImageNetResNet18(), torch.Generator().manual_seed(1))
    return model, torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["resnet20", "resnet18"])
def mixed(request):
    """(slimmed mixed model, example batch, the masked model's output on it)."""
    torch.manual_seed(0)
    model, x = {"resnet20": _resnet20, "resnet18": _resnet18}[request.param]()
    model.eval()
    generator = torch.Generator().manual_seed(2)
    keep = {}
    for group in channel_groups(model, (x,)):
        for member in group.of_kind("producer") if group.residual else []:
            keep[member.fqn] = torch.rand(len(member.index), generator=generator) < 0.5
    mask_(model, keep, (x,), residual="mixed", norms=True)
    with torch.no_grad():
        expected = model(x)
    result = slim_(model, keep, (x,), residual="mixed")
    return result.model.eval(), x, expected


def ort_ops(path, tmp_path) -> collections.Counter:
    """Op counts of the graph onnxruntime runs: after its basic (constant-folding) passes.

    The TorchScript exporter computes Pad's pads with a dozen constant ops per Pad, which
    onnxruntime folds away; both exporters then run the same join ops.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return collections.Counter(node.op_type for node in graph.node)


def assert_join_ops(ops: collections.Counter, model: torch.nn.Module) -> None:
    """One Pad and one Gather per partial operand, one Add per join, no scatter."""
    joins = [m for m in model.modules() if isinstance(m, ResidualJoin)]
    partial = sum((not j.a_full) + (not j.b_full) for j in joins)
    assert not ops.keys() & SCATTER_OPS, ops
    assert ops["Pad"] == ops["Gather"] == partial, ops
    assert ops["Add"] == len(joins) + sum(j.has_const for j in joins), ops


def test_mixed_resnet_lowers_joins_to_pad_gather_add(mixed, tmp_path):
    model, x, expected = mixed
    with torch.no_grad():
        assert float((model(x) - expected).abs().max()) <= 1e-5
    joins = [m for m in model.modules() if isinstance(m, ResidualJoin)]
    assert len(joins) >= 4
    assert any(not (j.a_full or j.b_full) for j in joins)  # joins embedding both operands
    # the TorchScript exporter: seconds faster than dynamo; test_onnx_opsets runs both
    path = tmp_path / "mixed.onnx"
    exported = export_onnx(model, path, (x,), exporter="legacy")
    assert exported.verified and exported.max_abs_diff <= exported.tolerance
    assert_join_ops(ort_ops(path, tmp_path), model)
