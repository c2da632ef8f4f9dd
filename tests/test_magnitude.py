import pytest
import torch

from compressor import zoo
from compressor.masks import prunable_layers
from compressor.methods import prune
from compressor.methods.magnitude import erk_densities


def _resnet():
    torch.manual_seed(0)
    return zoo.build("resnet20", in_channels=3, num_classes=10, input_size=32)


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.95])
def test_uniform_exact_per_layer(sparsity):
    pruned = prune(_resnet(), "magnitude-uniform", sparsity).model
    for fqn, layer in prunable_layers(pruned).items():
        zeros = int((layer.weight == 0).sum())
        assert abs(zeros - sparsity * layer.weight.numel()) <= 0.5 + 1e-9, fqn


@pytest.mark.parametrize("method", ["magnitude-global", "magnitude-erk"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.95])
def test_global_methods_exact_total(method, sparsity):
    result = prune(_resnet(), method, sparsity)
    achieved = result.report["achieved"]
    assert abs(achieved["zeros"] - sparsity * achieved["total"]) <= 1.0


def test_global_keeps_largest_magnitudes():
    model = _resnet()
    weights = torch.cat(
        [m.weight.detach().abs().flatten() for m in prunable_layers(model).values()]
    )
    pruned = prune(model, "magnitude-global", 0.8).model
    kept = torch.cat([m.weight.detach().abs().flatten() for m in prunable_layers(pruned).values()])
    assert kept[kept > 0].min() >= torch.quantile(weights, 0.8) - 1e-6


def test_erk_densities_weighted_mean_and_cap():
    layers = prunable_layers(_resnet())
    densities = erk_densities(layers, 0.9)
    sizes = {f: m.weight.numel() for f, m in layers.items()}
    mean = sum(densities[f] * sizes[f] for f in layers) / sum(sizes.values())
    assert mean == pytest.approx(0.1, rel=1e-9)
    assert all(0 < d <= 1 for d in densities.values())
    # ERK favours small layers: fc (640 weights) > stem conv (432, but 3x3 kernels) > 64x64x3x3
    assert densities["fc"] > densities["stem.0"] > densities["layer3.2.conv2"]


def test_erk_caps_layers_at_density_one():
    layers = prunable_layers(_resnet())
    densities = erk_densities(layers, 0.3)
    assert max(densities.values()) == 1.0
    sizes = {f: m.weight.numel() for f, m in layers.items()}
    assert sum(densities[f] * sizes[f] for f in layers) / sum(sizes.values()) == pytest.approx(0.7)
