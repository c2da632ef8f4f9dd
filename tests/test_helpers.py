"""The shared helpers: exception text, example inputs, fine-tuning, the machinery check."""

import pytest
import torch
from torch import nn

from compressor import zoo
from compressor.budget import Budget
from compressor.errors import InputError, first_line
from compressor.examples import example_inputs_of
from compressor.masks import has_machinery, model_names
from compressor.methods import get_method
from compressor.methods.phases import finetune_phase, step_lambda, train
from compressor.train import cosine_lambda, sgd_cosine


def test_first_line_of_an_exception():
    assert first_line(ValueError("bad value\n  detail\nmore")) == "bad value"
    assert first_line(ValueError("  \n")) == "ValueError"
    assert first_line(KeyError(), empty="") == ""
    assert first_line(RuntimeError("x" * 500)) == "x" * 300
    assert first_line(RuntimeError("abcdef"), 3) == "abc"


def test_example_inputs_fallback_is_seeded_and_leaves_the_global_rng():
    model = zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = example_inputs_of(model, None, "gss")
    assert torch.equal(torch.get_rng_state(), state)
    second = example_inputs_of(model, None, "gss")
    assert len(first) == 1 and first[0].shape == (2, 1, 8, 8)
    assert torch.equal(first[0], second[0])
    given = torch.ones(3, 1, 8, 8)
    assert example_inputs_of(model, given, "gss")[0] is given
    assert example_inputs_of(model, (given,), "gss") == (given,)
    with pytest.raises(InputError, match=r"^gss traces the model .*input_shape"):
        example_inputs_of(nn.Linear(4, 2), None, "gss")


def test_gss_prepare_without_inputs_does_not_move_the_global_rng():
    model = zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8)
    method = get_method("gss")(model, Budget("flops", 0.5))
    torch.manual_seed(0)
    method.prepare()
    after = torch.rand(4)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(4))


def test_sgd_cosine_is_sgd_with_the_cosine_schedule():
    params = [nn.Parameter(torch.ones(2))]
    optimizer, scheduler = sgd_cosine(
        params, lr=0.1, momentum=0.5, weight_decay=0.0, total_steps=10, warmup_steps=2
    )
    assert optimizer.defaults["momentum"] == 0.5 and optimizer.defaults["weight_decay"] == 0.0
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == [0.1 * cosine_lambda(10, 2)(step) for step in range(10)]


def test_step_lambda_drops_once():
    factor = step_lambda(3, 0.1)
    assert [factor(step) for step in range(5)] == [1.0, 1.0, 1.0, 0.1, 0.1]


def test_finetune_with_no_epochs_changes_nothing(small_digits):
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    train(finetune_phase(model, small_digits.train, epochs=0, optimizer=optimizer))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    halved = step_lambda(0, 0.5)
    train(
        finetune_phase(model, small_digits.train, epochs=1, optimizer=optimizer, lr_factor=halved)
    )
    assert optimizer.param_groups[0]["lr"] == 0.5
    assert not torch.equal(model[1].weight, before["1.weight"])


def test_has_machinery_finds_hooks_and_added_names():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].register_forward_hook(lambda *_: None)  # the user's own, there before prepare()
    before = model_names(model)
    assert has_machinery(model, before) == []
    assert [f.rsplit(" ", 1)[0] for f in has_machinery(model)] == ["0: forward hook"]
    model[2].register_forward_pre_hook(lambda *_: None)
    model[1].register_full_backward_hook(lambda *_: None)
    model.register_buffer("gate", torch.zeros(1))
    model[2].score = nn.Parameter(torch.zeros(2))
    model.add_module("gates", nn.Identity())
    found = has_machinery(model, before)
    hooks = sorted(f.rsplit(" ", 1)[0] for f in found if "hook" in f)
    assert hooks == ["1: backward hook", "2: forward pre hook"]
    assert sorted(f for f in found if "hook" not in f) == [
        "buffer gate",
        "module gates",
        "parameter 2.score",
    ]
