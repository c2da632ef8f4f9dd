"""Method options from the Python API: types and ranges checked however a config is built
(compressor/methods/options.py), and prune()'s model and data arguments."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from compressor import zoo
from compressor.budget import parse_budget
from compressor.errors import InputError
from compressor.methods import get_method, list_methods, prune
from compressor.methods.options import RANGES, _matches


def lenet5():
    return zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8)


BAD = [
    # (method, option, value, fragment of the message)
    ("bar", "epochs", "2", "option epochs='2' must be a whole number"),
    ("bar", "epochs", 1.5, "option epochs=1.5 must be a whole number"),
    ("bar", "epochs", True, "option epochs=True must be a whole number"),
    ("bar", "freeze_weights", "no", "option freeze_weights='no' must be True or False"),
    ("bar", "fold_gates", 1, "option fold_gates=1 must be True or False or None"),
    ("gss", "lr", "0.1", "option lr='0.1' must be a number"),
    ("bar", "lr", -1.0, "option lr=-1.0 must be at least 0"),
    ("probmask", "score_lr", -0.5, "option score_lr=-0.5 must be at least 0"),
    ("gmp", "finetune_epochs", -3, "option finetune_epochs=-3 must be at least 0"),
    ("bar", "alpha", 2.0, "option alpha=2.0 must be between 0 and 1"),
    ("bar", "gate_momentum", 1.5, "option gate_momentum=1.5 must be between 0 and 1"),
    ("channel-magnitude", "temperature", 0.0, "option temperature=0.0 must be above 0"),
    ("gmp", "batch_size", 0, "option batch_size=0 must be at least 1"),
    ("fcpts", "calib_samples", -1, "option calib_samples=-1 must be at least 0"),
    ("probmask", "lr", math.nan, "option lr=nan must be a finite number"),
    ("bar", "exclude", ["fc", 3], "option exclude=['fc', 3] must be a string or a list of strings"),
    (
        "magnitude-global",
        "output",
        1.0,
        "option output=1.0 must be a whole number or a string or None",
    ),
]


@pytest.mark.parametrize(("method", "option", "value", "fragment"), BAD)
def test_a_bad_option_is_refused_naming_method_option_and_value(method, option, value, fragment):
    cls = get_method(method)
    with pytest.raises(InputError) as caught:
        cls(lenet5(), parse_budget("2x", metric=cls.default_metric({})), **{option: value})
    assert str(caught.value) == f"method {method!r}: {fragment}"
    with pytest.raises(InputError, match="must be"):  # a Config built by hand too
        cls.Config(**{option: value})


def test_prune_refuses_a_bad_option_before_training(small_digits):
    with pytest.raises(InputError, match="option epochs='2' must be a whole number"):
        prune(lenet5(), "bar", "2x", small_digits, epochs="2")


def test_values_are_normalised_to_the_field_type():
    bar = get_method("bar")
    config = bar.Config(lr=1, epochs=np.int64(3), exclude=["fc"], round_to=np.int32(8))
    assert (config.lr, type(config.lr)) == (1.0, float)
    assert (config.epochs, type(config.epochs)) == (3, int)
    assert (config.round_to, type(config.round_to)) == (8, int)
    assert config.exclude == ("fc",)
    assert bar.Config(exclude="fc").exclude == ("fc",)


@pytest.mark.parametrize("method", list_methods())
def test_every_default_config_passes_its_own_checks(method):
    config = get_method(method).Config()
    assert dataclasses.replace(config) == config


def test_every_range_rule_applies_to_some_option():
    names = {f.name for m in list_methods() for f in dataclasses.fields(get_method(m).Config)}
    for stems, *_ in RANGES:
        for stem in stems:
            assert any(_matches(name, stem) for name in names), stem
    assert not _matches("log_alpha_init", "alpha")  # BAR's gate init is any number


def test_prune_loads_a_data_spec_string():
    model = lenet5()
    result = prune(model, "magnitude-global", 0.5, "digits")
    assert result.report["achieved"]["sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("model", "data", "fragment"),
    [
        ("model.pt2", None, "model must be a torch nn.Module, got str"),
        (None, 123, "data must be a compressor.Data or a --data spec string, got int"),
        (None, torch.zeros(3), "got Tensor"),
    ],
)
def test_prune_names_a_wrong_model_or_data_argument(model, data, fragment):
    with pytest.raises(InputError, match=fragment):
        prune(model if model is not None else lenet5(), "channel-magnitude", "2x", data)
