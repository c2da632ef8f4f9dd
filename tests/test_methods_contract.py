"""Every registered method meets the same contract on every zoo model (timm-style)."""

import pytest
import torch

from compressor import zoo
from compressor.budget import Budget
from compressor.io import load_model, save_model
from compressor.masks import has_machinery, prunable_layers
from compressor.methods import get_method, list_methods, prune

SPARSITY = 0.9


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.build(arch, in_channels=1, num_classes=10, input_size=8).eval()


def _budget(cls) -> Budget:
    return (
        Budget(cls.metrics[0], 1.0 - SPARSITY)
        if cls.metrics[0] == "weights"
        else Budget(cls.metrics[0], 0.5)
    )


@pytest.mark.parametrize("arch", zoo.list_archs())
@pytest.mark.parametrize("method", list_methods())
def test_method_contract(method, arch, small_digits, tmp_path):
    cls = get_method(method)
    model = _model(arch)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, method, _budget(cls), small_digits, seed=0, **cls.smoke_config)
    pruned = result.model

    for key, value in model.state_dict().items():
        assert torch.equal(value, original[key]), f"prune() modified the caller's model at {key}"
    assert has_machinery(pruned) == []
    assert set(pruned.state_dict()) == set(model.state_dict()) or cls.metrics[0] != "weights"
    if cls.metrics[0] == "weights":
        layers = prunable_layers(pruned)
        zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
        total = sum(m.weight.numel() for m in layers.values())
        assert abs(zeros - SPARSITY * total) <= len(layers), (zeros, SPARSITY * total)
        assert result.report["achieved"]["zeros"] == zeros
    x = small_digits.sample_inputs(4)
    out = pruned.eval()(x)
    assert torch.isfinite(out).all()

    path = save_model(pruned, tmp_path / "p.pt2", example_inputs=(x[:2],), report=result.report)
    reloaded = load_model(path)
    torch.testing.assert_close(reloaded.model(x), out, rtol=1e-5, atol=1e-5)
    assert reloaded.report["method"] == method


def test_unknown_method_lists_known():
    with pytest.raises(ValueError, match="magnitude-global"):
        get_method("magnitude-glob")


def test_unknown_option_named():
    with pytest.raises(ValueError, match="no option 'steps'"):
        prune(_model("lenet300"), "magnitude-global", "0.5", steps=3)
