"""--round-to: every slimmed layer keeps a multiple of N channels (or all), budget still met."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor import zoo
from compressor.budget import Budget
from compressor.errors import InputError, TargetNotReachedError
from compressor.methods import get_method, prune
from compressor.stats import measure


def _model(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.build(arch, in_channels=1, num_classes=10, input_size=8).eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def _aligned(arch: str, slimmed: torch.nn.Module, n: int) -> None:
    dense = {row.fqn: row.channels for row in measure(_model(arch), _x()).layers}
    rows = [row for row in measure(slimmed, _x()).layers if row.fqn in dense]
    assert any(row.channels < dense[row.fqn] for row in rows)
    for row in rows:
        assert row.channels % n == 0 or row.channels == dense[row.fqn], (row.fqn, row.channels)


def _randomize_gates_(method) -> None:
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for unit in method.gates.units:
            unit.log_alpha.copy_(torch.randn(unit.size, generator=generator) * 3 + 1)


def _slimmed(method_name: str, arch: str, metric: str, n: int, **config):
    method = get_method(method_name)(_model(arch), Budget(metric, 0.5), round_to=n, **config)
    method.prepare(_x())
    if method_name == "bar":
        _randomize_gates_(method)
    result = method.finalize()
    return result.model, result.report


@pytest.mark.parametrize("arch", zoo.list_archs())
@pytest.mark.parametrize(
    ("method", "metric", "n", "config"),
    [
        ("bar", "flops", 8, {}),
        ("channel-magnitude", "volume", 2, {"residual": "tied"}),
        ("gss", "flops", 4, {"variant": "structure", "epochs": 0}),
    ],
)
def test_slimmed_layers_keep_aligned_counts_and_the_budget(arch, method, metric, n, config):
    model, report = _slimmed(method, arch, metric, n, **config)
    _aligned(arch, model, n)
    stats, dense = measure(model, _x()), measure(_model(arch), _x())
    achieved = getattr(stats, metric) / getattr(dense, metric)
    assert 0.5 - 0.005 <= achieved <= 0.5 + 1e-12, achieved


def test_an_infeasible_alignment_fails_and_says_why(small_digits):
    # LeNet-300-100 on 8x8 digits has a volume of 300 + 100 + 10: steps of 4 outputs are
    # 1 % of it, twice the 0.5 % window, and no pair of aligned widths lands in it
    model = zoo.build("lenet300", in_channels=1, num_classes=10, input_size=8)
    budget = Budget("volume", 0.5)
    with pytest.raises(TargetNotReachedError) as info:
        prune(model, "channel-magnitude", budget, small_digits, round_to=4, finetune_epochs=0)
    message = str(info.value)
    assert "reached keep fraction 0.4927 (target 0.5000): the channel decision costs 202" in message
    assert "the finest step of 4 channels (--round-to) back adds 4" in message
    assert "or a smaller --round-to" in message


@pytest.mark.parametrize(
    ("bad", "fragment"),
    [
        (0, "round_to 0: give a whole number"),
        (-1, "round_to -1: give a whole number"),
        (2.5, "option round_to=2.5 must be a whole number or None"),  # methods/options.py
    ],
)
def test_a_bad_round_to_is_refused(bad, fragment):
    with pytest.raises(InputError, match=fragment):
        get_method("channel-magnitude")(_model("lenet5"), Budget("flops", 0.5), round_to=bad)


def test_gss_element_refuses_round_to():
    with pytest.raises(InputError, match="only the structure variant removes"):
        get_method("gss")(_model("lenet5"), Budget("weights", 0.5), round_to=8)


def test_cli_round_to(tmp_path, lenet5_pt2):
    out = tmp_path / "cm.pt2"
    args = ["prune", lenet5_pt2, "--method", "channel-magnitude", "--budget", "2x"]
    args += ["--data", "digits", "--finetune-epochs", "0", "--round-to", "8", "-o", out]
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    from compressor.io import load_model

    loaded = load_model(out)
    assert loaded.report["config"]["round_to"] == 8
    kept = {row["fqn"]: (row["kept"], row["channels"]) for row in loaded.report["layers"]}
    assert all(k % 8 == 0 or k == c for k, c in kept.values())
    assert any(k < c for k, c in kept.values())
    bad_args = [str(a) for a in args[:-4]] + ["--round-to", "0", "-o", str(tmp_path / "b.pt2")]
    bad = CliRunner().invoke(cli, bad_args)
    assert bad.exit_code == 2
    assert "Error: round_to 0: give a whole number of channels >= 1" in bad.output
