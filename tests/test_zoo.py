"""Contract tests for the model zoo: every registered architecture meets the same checks."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from compressor import zoo
from compressor.errors import InputError

ARCH_NAMES = zoo.list_archs()


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _input(model: nn.Module, batch: int) -> torch.Tensor:
    return torch.randn(batch, *model.input_shape)


def test_registry_is_sorted_and_complete():
    expected = {"lenet300", "lenet5", "resnet20", "resnet32", "resnet56", "mobilenetv2"}
    assert set(ARCH_NAMES) == expected
    assert sorted(ARCH_NAMES) == ARCH_NAMES
    assert set(zoo.ARCHS) == expected


def test_register_duplicate_name_raises():
    with pytest.raises(ValueError, match="lenet5"):
        zoo.register_arch("lenet5")(zoo.lenet300)
    assert zoo.ARCHS["lenet5"] is zoo.lenet5


@pytest.mark.parametrize("name", ARCH_NAMES)
@pytest.mark.parametrize("size", [8, 28])
@pytest.mark.parametrize(("channels", "classes"), [(1, 10), (3, 7)])
def test_output_shape_and_finite(name, size, channels, classes):
    torch.manual_seed(0)
    model = zoo.build(name, in_channels=channels, num_classes=classes, input_size=size).eval()
    with torch.no_grad():
        out = model(torch.randn(2, channels, size, size))
    assert out.shape == (2, classes)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ARCH_NAMES)
@pytest.mark.parametrize("size", [8, 28])
def test_every_parameter_gets_a_gradient(name, size):
    torch.manual_seed(0)
    model = zoo.build(name, input_size=size).train()
    out = model(_input(model, 4))
    nn.functional.cross_entropy(out, torch.tensor([0, 1, 2, 3])).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert dead == []


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_fx_trace_matches_eager(name):
    torch.manual_seed(0)
    model = zoo.build(name, input_size=8).eval()
    traced = torch.fx.symbolic_trace(model)
    x = _input(model, 3)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


@pytest.mark.parametrize(
    ("name", "size"),
    [(name, 8) for name in ARCH_NAMES] + [("lenet5", 28), ("lenet5", 40)],
)
def test_export_with_dynamic_batch(name, size):
    torch.manual_seed(0)
    model = zoo.build(name, input_size=size).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(model, (_input(model, 2),), dynamic_shapes=({0: batch},))
    for n in (1, 5):
        x = _input(model, n)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), model(x))


def test_lenet_param_counts():
    # 784*300+300 + 300*100+100 + 100*10+10
    assert _n_params(zoo.build("lenet300")) == 266610
    # conv 20*1*25+20, conv 50*20*25+50, fc 800*500+500, fc 500*10+10
    assert _n_params(zoo.build("lenet5")) == 431080


def _conv3(c_in: int, c_out: int) -> int:
    return 9 * c_in * c_out  # bias-free: BN follows


def _bn(c: int) -> int:
    return 2 * c  # weight and bias; running stats are buffers


def _block(c_in: int, c_out: int) -> int:
    return _conv3(c_in, c_out) + _bn(c_out) + _conv3(c_out, c_out) + _bn(c_out)


def _projection(c_in: int, c_out: int) -> int:
    return c_in * c_out + _bn(c_out)  # option B shortcut: 1x1 conv + BN


def test_resnet20_param_count_by_hand():
    stem = _conv3(1, 16) + _bn(16)
    stage1 = 3 * _block(16, 16)
    stage2 = _block(16, 32) + _projection(16, 32) + 2 * _block(32, 32)
    stage3 = _block(32, 64) + _projection(32, 64) + 2 * _block(64, 64)
    fc = 64 * 10 + 10
    expected = stem + stage1 + stage2 + stage3 + fc
    # Option A (zero-padded identity, no parameters) at 3 input channels is the paper's
    # 0.27M (269,722); option B adds the two projections, 576 + 2,176 parameters.
    assert expected == 272186
    assert _n_params(zoo.build("resnet20")) == expected


def test_deeper_resnets_add_only_identity_blocks():
    # resnet32 and resnet56 add 2 and 6 identity blocks per stage to resnet20.
    extra = sum(_block(c, c) for c in (16, 32, 64))
    base = _n_params(zoo.build("resnet20"))
    assert _n_params(zoo.build("resnet32")) == base + 2 * extra
    assert _n_params(zoo.build("resnet56")) == base + 6 * extra


def test_mobilenetv2_is_small():
    assert 50_000 < _n_params(zoo.build("mobilenetv2")) < 200_000


def test_resnet_structure_and_width():
    model = zoo.build("resnet20", width=0.5)
    assert [type(m) for m in (model.layer1, model.layer2, model.layer3)] == [nn.Sequential] * 3
    assert len(model.layer1) == 3
    assert len(model.layer1[0].shortcut) == 0  # identity
    assert isinstance(model.layer2[0].shortcut[0], nn.Conv2d)
    assert model.layer2[0].shortcut[0].stride == (2, 2)
    assert model.layer3[0].conv2.out_channels == 32
    assert model.fc.in_features == 32


@pytest.mark.parametrize(
    ("size", "first", "last_feature"),
    [
        (8, nn.Upsample, nn.MaxPool2d),
        (28, nn.Conv2d, nn.MaxPool2d),
        (40, nn.Conv2d, nn.AdaptiveAvgPool2d),
    ],
)
def test_lenet5_adapts_to_input_size(size, first, last_feature):
    model = zoo.build("lenet5", input_size=size)
    assert type(model[0]) is first
    flatten = next(i for i, m in enumerate(model) if isinstance(m, nn.Flatten))
    assert type(model[flatten - 1]) is last_feature


def test_unknown_arch_raises_input_error_naming_it():
    with pytest.raises(InputError, match="'resnet21'") as info:
        zoo.build("resnet21")
    assert isinstance(info.value, ValueError)
    for name in ARCH_NAMES:
        assert name in str(info.value)


def test_unknown_option_raises_input_error():
    with pytest.raises(InputError, match="width"):
        zoo.build("lenet300", width=2.0)


def test_bad_input_size_raises_input_error():
    with pytest.raises(InputError, match="input_size"):
        zoo.build("lenet300", input_size=(8, 8, 8))


@pytest.mark.parametrize("name", ARCH_NAMES)
def test_input_shape_and_arch_record(name):
    torch.manual_seed(0)
    model = zoo.build(name, in_channels=3, num_classes=7, input_size=(8, 12))
    assert model.input_shape == (3, 8, 12)
    assert model.arch == {"name": name, "in_channels": 3, "num_classes": 7, "input_size": (8, 12)}
    assert model.eval()(torch.randn(2, 3, 8, 12)).shape == (2, 7)
    rebuilt = zoo.build(**model.arch)
    assert _n_params(rebuilt) == _n_params(model)


def test_arch_record_keeps_options():
    model = zoo.build("mobilenetv2", width=0.5)
    assert model.arch["width"] == 0.5
    assert model.input_shape == (1, 28, 28)
