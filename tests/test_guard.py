"""No silent destruction: per-layer floors, the collapse postcondition (issue 6a)."""

import pytest
import torch

from compressor import zoo
from compressor.errors import InputError
from compressor.guard import LayerCollapseError, check_no_collapse, empty_layers
from compressor.masks import global_topk, layer_floors, prunable_layers, topk_mask
from compressor.methods import get_method, list_methods, prune
from compressor.methods.base import Method


def _mobilenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.build("mobilenetv2", in_channels=1, num_classes=10, input_size=8, width=0.5)


def _zeros(model: torch.nn.Module) -> tuple[int, int]:
    layers = prunable_layers(model).values()
    return sum(int((m.weight == 0).sum()) for m in layers), sum(m.weight.numel() for m in layers)


def test_global_magnitude_empties_layers_only_when_allowed():
    model = _mobilenet()
    collapsed = prune(model, "magnitude-global", 0.9, allow_layer_collapse=True).model
    assert "15" in empty_layers(collapsed)  # the reported failure: whole layers, classifier too
    assert len(empty_layers(collapsed)) >= 5

    floored = prune(model, "magnitude-global", 0.9).model
    assert empty_layers(floored) == []
    zeros, total = _zeros(floored)
    assert zeros == round(0.9 * total)  # the floor costs nothing in exactness
    assert int((floored[15].weight != 0).sum()) >= 10  # one weight per class at least
    assert bool((floored[15].weight != 0).any(dim=1).all())


def test_floor_changes_nothing_where_it_does_not_bind(lenet5_digits):
    model = lenet5_digits
    free = prune(model, "magnitude-global", 0.5, allow_layer_collapse=True).model
    floored = prune(model, "magnitude-global", 0.5).model
    for (name, a), b in zip(free.state_dict().items(), floored.state_dict().values()):
        assert torch.equal(a, b), name


def test_global_topk_keeps_floors_and_exact_count():
    scores = {"a": torch.arange(10.0), "b": torch.zeros(4), "c": torch.full((3,), -1.0)}
    masks = global_topk(scores, 5, {"a": 1, "b": 1, "c": 1})
    assert [int(m.sum()) for m in masks.values()] == [3, 1, 1]
    assert masks["a"].tolist() == [False] * 7 + [True] * 3
    assert masks["b"].tolist() == [True, False, False, False]  # ties: lowest position
    plain = global_topk(scores, 5)
    assert torch.equal(plain["a"], topk_mask(scores["a"], 5)) and not plain["b"].any()


def test_floor_is_spread_over_output_units():
    scores = {
        "w": torch.tensor([[9.0, 8.0, 7.0], [1.0, 2.0, 0.0], [0.0, 0.0, 3.0]]),
        "v": torch.full((20,), 100.0),
    }
    masks = global_topk(scores, 20, {"w": 3, "v": 1})
    # the ranking alone gives w nothing; its floor takes each row's best, not row 0's three
    assert masks["w"].tolist() == [[True, False, False], [False, True, False], [False, False, True]]
    assert int(masks["v"].sum()) == 17


def test_floors_fall_back_to_one_then_refuse():
    shapes = {
        "conv": torch.Size([8, 1, 3, 3]),
        "big": torch.Size([100, 300]),
        "fc": torch.Size([10, 100]),
    }
    # a tenth of the global density 1000 / 31072, rounded up; the last layer: one per row
    assert layer_floors(shapes, 1000) == {"conv": 1, "big": 97, "fc": 10}
    assert layer_floors(shapes, 13) == {"conv": 1, "big": 2, "fc": 10}
    assert layer_floors(shapes, 12) == {"conv": 1, "big": 1, "fc": 1}  # cannot pay: one each
    with pytest.raises(InputError, match="2 weights for 3 prunable layers.*--allow-layer-collapse"):
        layer_floors(shapes, 2)


def test_postcondition_names_the_emptied_layer(monkeypatch):
    monkeypatch.setattr(Method, "floors", lambda self, keep_total: None)
    with pytest.raises(
        LayerCollapseError, match=r"left \d+ layer\(s\).*15.*--allow-layer-collapse"
    ):
        prune(_mobilenet(), "magnitude-global", 0.9)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    check_no_collapse(model, (), "x")
    with torch.no_grad():
        model[1].weight.zero_()
    with pytest.raises(
        LayerCollapseError, match=r"x left 1 layer\(s\) with no non-zero weight \(1\)"
    ):
        check_no_collapse(model, (), "x")
    check_no_collapse(model, ("1",), "x")  # an excluded layer is the user's business
    check_no_collapse(model, (), "x", already_empty=("1",))  # zero before: not the method's


UNSTRUCTURED = [m for m in list_methods() if get_method(m).metrics[0] == "weights"]


@pytest.mark.parametrize("method", UNSTRUCTURED)
def test_every_unstructured_method_keeps_every_layer_at_99(method, lenet5_digits, small_digits):
    cls = get_method(method)
    result = prune(lenet5_digits, method, 0.99, small_digits, **cls.smoke_config)
    assert empty_layers(result.model) == []
    zeros, total = _zeros(result.model)
    if method == "magnitude-uniform":  # per-layer rounding, within the budget's tolerance
        assert abs(zeros - 0.99 * total) <= len(prunable_layers(result.model))
    else:
        assert zeros == round(0.99 * total), (zeros, round(0.99 * total))
