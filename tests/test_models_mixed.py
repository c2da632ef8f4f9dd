"""Structured methods on standard layouts: exact mask placement, per-stream tied fallback.

An ImageNet-style ResNet-18 (7x7 stem, max-pool, downsample shortcuts) and a conv -> ReLU ->
BatchNorm -> max-pool stack go through BAR (mixed and tied), channel-magnitude and
structured GSS: the slimmed model must compute what the masked model (the method's model
right before slimming) computes and meet the budget (test_models_contract exports them).
"""

from __future__ import annotations

import pytest
import torch

from compressor import zoo
from compressor.budget import Budget
from compressor.errors import InputError
from compressor.methods import get_method, gss
from compressor.methods.bar import slim as bar_slim
from compressor.surgery import channel_groups
from compressor.surgery.streams import unmixable_streams
from exporters.onnx import export_onnx
from tests.models import (
    ConvReluBnPool,
    GatedStream,
    ImageNetResNet18,
    SigmoidPadded,
    randomize_bn_,
)

MODELS = {
    "resnet18": ImageNetResNet18,
    "conv_relu_bn_pool": ConvReluBnPool,
    "gated_stream": GatedStream,
    "mobilenetv2": lambda: zoo.build("mobilenetv2", in_channels=1, input_size=16, width=0.5),
}
SHAPES = {"mobilenetv2": (1, 16, 16)}
KEEP = 0.5


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    randomize_bn_(model, torch.Generator().manual_seed(1))
    return model.eval()


def _inputs(name: str, model, batch: int, seed: int) -> torch.Tensor:
    shape = SHAPES.get(name) or model.input_shape
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def masked_outputs(monkeypatch):
    """Records, on the given inputs, the output of each model the methods hand to slim_."""
    seen: dict = {"inputs": None, "outputs": []}
    for module in (bar_slim, gss):
        real = module.slim_

        def wrapper(model, keep, example, residual="tied", real=real):
            with torch.no_grad():
                seen["outputs"].append(model.eval()(seen["inputs"]))
            return real(model, keep, example, residual=residual)

        monkeypatch.setattr(module, "slim_", wrapper)
    return seen


CASES = [
    ("bar", "volume", {"residual": "mixed"}),
    ("bar", "volume", {"residual": "tied"}),
    ("channel-magnitude", "flops", {"residual": "mixed"}),
    ("channel-magnitude", "volume", {"residual": "tied"}),
    ("gss", "flops", {"variant": "structure"}),
]


def _run(name: str, method: str, metric: str, config: dict, seen: dict):
    model = _model(name)
    seen["inputs"] = _inputs(name, model, 6, seed=5)
    instance = get_method(method)(model, Budget(metric, KEEP), **config)
    instance.prepare(_inputs(name, model, 4, seed=3))
    return instance.finalize()


def _achieved_keep(report: dict) -> float:
    return report["achieved"]["keep"]


@pytest.mark.parametrize("method,metric,config", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("name", ["resnet18", "conv_relu_bn_pool"])
def test_slimmed_equals_masked_and_exports(name, method, metric, config, masked_outputs, tmp_path):
    result = _run(name, method, metric, config, masked_outputs)
    x = masked_outputs["inputs"]
    (masked,) = masked_outputs["outputs"]
    with torch.no_grad():
        slimmed = result.model.eval()(x)
    assert float((slimmed - masked).abs().max()) <= 1e-5
    keep = _achieved_keep(result.report)
    assert KEEP - 0.0051 <= keep <= KEEP + (0.0026 if method == "gss" else 1e-9), keep
    params = sum(p.numel() for p in result.model.parameters())
    assert params < sum(p.numel() for p in _model(name).parameters())
    if method != "gss":
        assert result.report["tied_streams"] == []
        mixed = config["residual"] == "mixed" and name == "resnet18"
        assert (result.report["joins"] > 0) == mixed
    if config.get("residual") == "tied" and method == "bar" and name == "resnet18":
        # the default modes export in test_models_contract; ONNX export costs seconds
        exported = export_onnx(result.model, tmp_path / "m.onnx", (x,))
        assert exported.verified and exported.max_abs_diff <= 1e-4


@pytest.mark.parametrize("method", ["bar", "channel-magnitude"])
def test_unmixable_stream_falls_back_to_tied(method, masked_outputs):
    result = _run("gated_stream", method, "volume", {"residual": "mixed"}, masked_outputs)
    (line,) = result.report["tied_streams"]
    assert line.startswith("stream group 0 (stem.0, branch.2.0, gate.0) is tied: ")
    assert "operands of node 'mul' keep different channels" in line
    assert result.report["joins"] == 1  # the second stream is still mixed
    with torch.no_grad():
        slimmed = result.model.eval()(masked_outputs["inputs"])
    assert float((slimmed - masked_outputs["outputs"][0]).abs().max()) <= 1e-5


def test_unmixable_streams_names_only_the_gated_stream():
    for name, expected in (("gated_stream", [0]), ("resnet18", []), ("mobilenetv2", [])):
        model = _model(name)
        x = (_inputs(name, model, 2, seed=0),)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert sorted(unmixable_streams(model, channel_groups(model, x), x)) == expected
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("residual", ["mixed", "tied"])
def test_bar_on_mobilenetv2(residual, masked_outputs):
    result = _run("mobilenetv2", "bar", "flops", {"residual": residual}, masked_outputs)
    with torch.no_grad():
        slimmed = result.model.eval()(masked_outputs["inputs"])
    assert float((slimmed - masked_outputs["outputs"][0]).abs().max()) <= 1e-5
    assert KEEP - 0.0051 <= _achieved_keep(result.report) <= KEEP


def test_gate_sits_after_the_last_norm_of_the_chain():
    model = _model("conv_relu_bn_pool")
    groups = channel_groups(model, (torch.randn(2, 1, 16, 16),))
    norms = {m.fqn: m.norm for g in groups for m in g.producers}
    assert norms == {
        "features.0": "features.2",
        "features.4": "features.6",
        "features.8": "features.10",
        "fc": None,
    }


def test_bar_refuses_an_inexact_layout_before_training():
    torch.manual_seed(0)
    bar = get_method("bar")(SigmoidPadded().eval(), Budget("volume", KEEP))
    with pytest.raises(
        InputError, match="removed input channels of 'conv2' carry a nonzero.*--exclude"
    ):
        bar.prepare(torch.randn(2, 3, 8, 8))
    assert bar.gates is None  # nothing installed: refused before any training
    excluded = get_method("bar")(SigmoidPadded().eval(), Budget("volume", 0.9), exclude=("conv1",))
    excluded.prepare(torch.randn(2, 3, 8, 8))  # the fix the message names works
    assert [u.name for u in excluded.gates.units] == ["group 1"]
