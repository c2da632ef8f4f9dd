"""Removing model input features: groups, SelectedLinear, exactness, graph, exports."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from compressor import zoo
from compressor.errors import CompressorError, InputError
from compressor.io import load_model, save_model
from compressor.masks import WeightMask
from compressor.stats import measure
from compressor.surgery import channel_groups, slim_
from compressor.surgery.select import (
    SelectedLinear,
    input_feature_layers,
    select_inputs_,
    with_input_features,
)
from exporters.csr import export_csr
from exporters.onnx import export_onnx


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)
    )
    return model.eval()


def _x(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _keep(size: int = 64, seed: int = 3) -> torch.Tensor:
    keep = torch.rand(size, generator=torch.Generator().manual_seed(seed)) < 0.6
    keep[0] = True
    return keep


def _masked_reference(model: nn.Module, fqn: str, keep: torch.Tensor, x: torch.Tensor):
    """The model's output with the dropped columns zeroed, on a deep copy."""
    import copy

    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked.get_submodule(fqn).weight[:, ~keep] = 0.0
        return masked(x)


def test_input_group_of_a_flattened_image_becomes_one_group_per_column():
    model, x = _mlp(), _x()
    groups = channel_groups(model, x)
    split = with_input_features(model, groups)
    (original,) = [g for g in groups if "model input" in g.reasons]
    assert original.size == 1 and bool(original.fixed.all())  # one image channel, fixed
    assert original not in split
    assert [g for g in split if g.id < len(groups)] == [g for g in groups if g is not original]
    (features,) = [g for g in split if g.id >= len(groups)]
    assert features.id == len(groups) and features.size == 64
    assert not bool(features.fixed.any())
    (member,) = features.members
    assert (member.fqn, member.kind, member.dim) == ("1", "consumer", 1)
    assert torch.equal(member.index, torch.arange(64))
    assert input_feature_layers(split) == {features.id: "1"}


def test_an_input_read_by_a_conv_is_left_alone():
    model = zoo.build("lenet5", in_channels=1, num_classes=10, input_size=(28, 28))
    x = torch.randn(2, 1, 28, 28)
    groups = channel_groups(model, x)
    assert with_input_features(model, groups) == groups
    assert input_feature_layers(groups) == {}


def test_selected_model_equals_the_masked_model_on_new_inputs():
    model, keep = _mlp(), _keep()
    fresh = _x(7, seed=11)
    expected = _masked_reference(model, "1", keep, fresh)
    select_inputs_(model, {"1": keep}, _x())
    layer = model[1]
    assert isinstance(layer, SelectedLinear) and isinstance(layer, nn.Linear)
    assert layer.in_features == int(keep.sum()) == layer.weight.shape[1]
    assert torch.equal(layer.index, keep.nonzero().flatten())
    with torch.no_grad():
        torch.testing.assert_close(model(fresh), expected)
    kept = int(keep.sum())
    assert measure(model, fresh).flops == kept * 32 + 32 * 16 + 16 * 10


def test_selected_model_still_slims_its_hidden_channels():
    model, keep, x = _mlp(), _keep(), _x()
    select_inputs_(model, {"1": keep}, x)
    groups = channel_groups(model, x)
    hidden = [g for g in groups if g.prunable]
    assert [(g.size, [m.fqn for m in g.members]) for g in hidden] == [
        (32, ["1", "3"]),
        (16, ["3", "5"]),
    ]
    drop = torch.ones(32, dtype=torch.bool)
    drop[::3] = False
    fresh = _x(5, seed=4)
    with torch.no_grad():  # the masked model: the removed channels' rows and biases zero
        model[1].weight[~drop] = 0.0
        model[1].bias[~drop] = 0.0
        reference = model(fresh)
    result = slim_(model, {hidden[0].id: drop}, x)
    assert result.model[1].weight.shape == (int(drop.sum()), int(keep.sum()))
    with torch.no_grad():
        torch.testing.assert_close(result.model(fresh), reference)


def test_selected_model_round_trips_and_exports(tmp_path):
    model, keep, x = _mlp(), _keep(), _x()
    select_inputs_(model, {"1": keep}, x)
    fresh = _x(4, seed=9)
    with torch.no_grad():
        expected = model(fresh)
    save_model(model, tmp_path / "m.pt2", example_inputs=(x,), report={"method": "t"})
    loaded = load_model(tmp_path / "m.pt2").model
    with torch.no_grad():
        torch.testing.assert_close(loaded(fresh), expected)
    onnx = export_onnx(model, tmp_path / "m.onnx", (x,))
    assert onnx.verified
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: fresh.numpy()})[0]
    assert np.abs(got - expected.numpy()).max() <= 1e-5
    pack = export_csr(model, tmp_path / "m.csr", (x,))
    assert pack.verification is not None and pack.verification.max_output_diff == 0.0


def test_bad_selections_name_the_problem():
    model, x = _mlp(), _x()
    with pytest.raises(InputError, match="'2' is ReLU, not a Linear"):
        select_inputs_(model, {"2": torch.ones(64, dtype=torch.bool)}, x)
    with pytest.raises(InputError, match="'1' needs 64 entries"):
        select_inputs_(model, {"1": torch.ones(63, dtype=torch.bool)}, x)
    with pytest.raises(InputError, match="at least one True"):
        select_inputs_(model, {"1": torch.zeros(64, dtype=torch.bool)}, x)
    torch.nn.utils.parametrize.register_parametrization(
        model[3], "weight", WeightMask(torch.ones(16, 32, dtype=torch.bool))
    )
    with pytest.raises(CompressorError, match="strip the masks first"):
        select_inputs_(model, {"1": _keep()}, x)
    assert type(model[1]) is nn.Linear  # nothing changed
