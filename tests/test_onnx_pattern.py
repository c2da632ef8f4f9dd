"""The pattern in the ONNX graph's metadata, per initializer, for both torch.onnx exporters."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from bench.pattern_floor import mask_to_pattern_
from compressor.patterns import holds, parse_pattern
from exporters.onnx import export_onnx
from exporters.onnx_pattern import LAYERS_KEY, PATTERN_KEY
from tests.models import ConvBnPatternNet


def _model(text: str = "2:4") -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    model = ConvBnPatternNet()
    with torch.no_grad():  # BN statistics that are not the identity, so folding changes values
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
    model.eval()
    return model, mask_to_pattern_(model, text, 0.8)


def _props(path) -> dict:
    return {e.key: e.value for e in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_metadata_names_the_pattern_per_initializer(tmp_path, exporter):
    model, report = _model()
    x = torch.randn(2, 4, 6, 6)
    export_onnx(model, tmp_path / "m.onnx", (x,), report=report, exporter=exporter)
    props = _props(tmp_path / "m.onnx")
    layers = json.loads(props[LAYERS_KEY])
    # conv1: 4*3*3 = 36 columns, conv2/3: 72, head: 8 -- all multiples of 4
    assert sorted(layers) == ["block1.0", "block2.0", "block3.0", "head"]
    assert json.loads(props[PATTERN_KEY]) == {name: "2:4" for name in layers.values()}
    arrays = {
        i.name: numpy_helper.to_array(i)
        for i in onnx.load(str(tmp_path / "m.onnx")).graph.initializer
    }
    state = model.state_dict()
    for layer, name in layers.items():
        weight = state[f"{layer}.weight"]
        assert np.array_equal(arrays[name] == 0, weight.numpy() == 0)  # that layer's zeros
        assert holds(torch.from_numpy(arrays[name].copy()), parse_pattern("2:4"))
    if exporter == "dynamo":
        assert layers == {layer: f"{layer}.weight" for layer in layers}
    else:  # BN folded into the convs: renamed, and the values changed
        assert layers["head"] == "head.weight"
        for layer in ("block1.0", "block2.0", "block3.0"):
            assert layers[layer].startswith("onnx::Conv_")
            assert not np.allclose(arrays[layers[layer]], state[f"{layer}.weight"].numpy())


def test_a_layer_that_no_longer_follows_maps_to_null(tmp_path):
    model, report = _model()
    with torch.no_grad():
        model.head.weight.fill_(1.0)  # every group dense now
    export_onnx(model, tmp_path / "m.onnx", (torch.randn(2, 4, 6, 6),), report=report)
    props = _props(tmp_path / "m.onnx")
    assert json.loads(props[LAYERS_KEY])["head"] is None
    assert "head.weight" not in json.loads(props[PATTERN_KEY])
    assert len(json.loads(props[PATTERN_KEY])) == 3


def test_block_pattern_and_no_pattern(tmp_path):
    model, report = _model("1x4")
    x = torch.randn(2, 4, 6, 6)
    export_onnx(model, tmp_path / "b.onnx", (x,), report=report, sparse_initializers=True)
    props = _props(tmp_path / "b.onnx")
    assert set(json.loads(props[PATTERN_KEY]).values()) == {"1x4"}
    assert len(json.loads(props[PATTERN_KEY])) == 4
    export_onnx(model, tmp_path / "n.onnx", (x,), report={"method": "x"})
    assert PATTERN_KEY not in _props(tmp_path / "n.onnx")
    assert LAYERS_KEY not in _props(tmp_path / "n.onnx")
