import math

import pytest

from compressor.budget import Budget, parse_budget, parse_sparsity
from compressor.errors import InputError


@pytest.mark.parametrize(
    ("text", "keep"),
    [
        ("4x", 0.25),
        ("2X", 0.5),
        (" 10x ", 0.1),
        ("1.5x", 1 / 1.5),
        ("75%", 0.25),
        ("0.75", 0.25),
        ("0", 1.0),
    ],
)
def test_parse_budget_forms(text, keep):
    assert parse_budget(text).keep == pytest.approx(keep)


@pytest.mark.parametrize(
    "text",
    ["0x", "-2x", "1x", "0.5x", "4y", "150%", "1.5", "nan", "", "  ", "x", "4xx", "inf", "-0.1"],
)
def test_parse_budget_rejects(text):
    with pytest.raises(InputError) as err:
        parse_budget(text)
    assert "accepted" in str(err.value) or "factor" in str(err.value) or "outside" in str(err.value)


@pytest.mark.parametrize(("text", "sparsity"), [("0.9", 0.9), ("90%", 0.9), (0.5, 0.5), ("0", 0.0)])
def test_parse_sparsity(text, sparsity):
    budget = parse_sparsity(text)
    assert budget.metric == "weights"
    assert budget.sparsity == pytest.approx(sparsity)


@pytest.mark.parametrize("text", ["1", "1.0", "100%", "-0.1", "2", "nan", "abc", "", float("inf")])
def test_parse_sparsity_rejects(text):
    with pytest.raises(InputError, match="sparsity"):
        parse_sparsity(text)


def test_budget_properties_and_validation():
    budget = parse_budget("4x", metric="flops")
    assert (budget.metric, budget.factor, budget.sparsity) == ("flops", 4.0, 0.75)
    assert budget.to_dict() == {"metric": "flops", "keep": 0.25, "factor": 4.0}
    with pytest.raises(InputError, match="metric"):
        Budget("joules", 0.5)
    with pytest.raises(InputError):
        Budget("weights", 0.0)
    with pytest.raises(InputError):
        Budget("weights", math.nan)
