"""Mixed-connectivity residual joins: semantics, export (.pt2, ONNX), and accounting."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from compressor import zoo
from compressor.io import load_model, save_model
from compressor.stats import measure
from compressor.surgery import ResidualJoin, channel_groups, mask_, slim_
from tests import models as toys


def _dense(x: torch.Tensor, positions: torch.Tensor | None, width: int) -> torch.Tensor:
    """`x` written into a zero tensor of `width` channels at `positions` (None: all)."""
    if positions is None:
        return x
    out = torch.zeros(x.shape[0], width, *x.shape[2:])
    out[:, positions] = x
    return out


@pytest.mark.parametrize(
    ("pos_a", "pos_b"),
    [(None, None), (None, [0, 2]), ([1, 3], None), ([0, 1], [1, 3])],
)
@pytest.mark.parametrize("alpha", [1.0, -1.0])
def test_residual_join_scatters_each_operand_at_its_positions(pos_a, pos_b, alpha):
    width = 4
    pos_a = None if pos_a is None else torch.tensor(pos_a)
    pos_b = None if pos_b is None else torch.tensor(pos_b)
    a = torch.randn(2, width if pos_a is None else len(pos_a), 3, 3)
    b = torch.randn(2, width if pos_b is None else len(pos_b), 3, 3)
    const = torch.tensor([0.0, 0.5, -1.0, 2.0])
    join = ResidualJoin(1, width, pos_a, pos_b, alpha, const)
    expected = _dense(a, pos_a, width) + alpha * _dense(b, pos_b, width) + const.view(1, -1, 1, 1)
    assert torch.allclose(join(a, b), expected, atol=1e-6)


def test_residual_join_counts_moved_elements():
    join = ResidualJoin(1, 5, torch.tensor([0, 1, 2]), torch.tensor([2, 4]))
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 2, 4, 4)
    # each partial operand: copied once with its zero channel, gathered once to width 5
    assert join.memory_elements((a, b), join(a, b)) == ((3 + 5) + (2 + 5)) * 16
    inplace = ResidualJoin(1, 5, None, torch.tensor([2, 4]))
    stream = torch.randn(2, 5, 4, 4)
    assert inplace.memory_elements((stream, b), inplace(stream, b)) == (2 + 5) * 16


def _mixed_projection_residual():
    torch.manual_seed(0)
    model = toys.randomize_bn_(toys.ProjectionResidual().eval())
    x = toys.example_inputs(model)
    groups = channel_groups(model, x)
    generator = torch.Generator().manual_seed(4)
    keep = {}
    for group in groups:
        if not group.prunable:
            continue
        for member in group.of_kind("producer"):
            mask = torch.rand(len(member.index), generator=generator) < 0.5
            mask[0] = True
            keep[member.fqn] = mask
    mask_(model, keep, x, residual="mixed", norms=True)
    expected = model(*x)
    result = slim_(model, keep, x, residual="mixed")
    return result, x, expected


def test_mixed_blocks_are_replaced_in_place():
    result, x, expected = _mixed_projection_residual()
    assert result.report["rewritten"] == ["block1", "block2"]
    assert isinstance(result.model, toys.ProjectionResidual)
    joins = [m for m in result.model.modules() if isinstance(m, ResidualJoin)]
    assert len(joins) == 2 and joins[1].width == 7 and len(joins[1].pos_a) == 4
    assert torch.allclose(result.model(*x), expected, atol=1e-5)


def test_mixed_model_round_trips_through_pt2(tmp_path):
    result, x, _ = _mixed_projection_residual()
    save_model(result.model, tmp_path / "mixed.pt2", example_inputs=x)
    loaded = load_model(tmp_path / "mixed.pt2").model
    fresh = toys.example_inputs(result.model, batch=5, seed=1)
    assert torch.allclose(loaded(*fresh), result.model(*fresh), atol=1e-6)


def test_mixed_model_runs_in_onnxruntime(tmp_path):
    result, x, _ = _mixed_projection_residual()
    path = tmp_path / "mixed.onnx"
    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(result.model, x, str(path), dynamic_shapes=({0: batch},), verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (fresh,) = toys.example_inputs(result.model, batch=3, seed=2)
    (got,) = session.run(None, {session.get_inputs()[0].name: fresh.numpy()})
    with torch.no_grad():
        want = result.model(fresh).numpy()
    assert np.abs(got - want).max() <= 1e-5


def test_mixed_keeps_fewer_flops_than_tied_for_the_same_layer_masks():
    """Tied mode must keep the union of the layers' channels on a stream; mixed does not."""
    x = torch.randn(2, 3, 8, 8)
    stats = {}
    for residual in ("tied", "mixed"):
        torch.manual_seed(0)
        model = zoo.build("resnet20", in_channels=3, input_size=8).eval()
        generator = torch.Generator().manual_seed(0)
        keep = {}
        for group in channel_groups(model, x):
            for member in group.of_kind("producer") if group.residual else []:
                keep[member.fqn] = torch.randperm(len(member.index), generator=generator)[
                    : len(member.index) // 2
                ]
        mask_(model, keep, x, residual=residual, norms=True)
        expected = model(x)
        result = slim_(model, keep, x, residual=residual)
        assert torch.allclose(result.model(x), expected, atol=1e-4)
        stats[residual] = measure(result.model, x)
    assert stats["mixed"].flops < stats["tied"].flops
    assert stats["mixed"].volume < stats["tied"].volume
    assert stats["tied"].memory == 0 and stats["mixed"].memory > 0
    joins = [layer for layer in stats["mixed"].layers if layer.kind == "ResidualJoin"]
    assert joins and all(j.flops == 0 and j.memory > 0 for j in joins)
    assert stats["mixed"].memory == sum(j.memory for j in joins)


def test_mixed_with_group_masks_equals_tied():
    x = torch.randn(2, 3, 8, 8)
    params = {}
    for residual in ("tied", "mixed"):
        torch.manual_seed(0)
        model = zoo.build("resnet20", in_channels=3, input_size=8).eval()
        keep = {g.id: torch.arange(g.size) % 3 != 0 for g in channel_groups(model, x) if g.prunable}
        result = slim_(mask_(model, keep, x, norms=True), keep, x, residual=residual)
        assert result.report["joins"] == 0
        params[residual] = measure(result.model, x).params
    assert params["tied"] == params["mixed"]
