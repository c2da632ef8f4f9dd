"""`compress prune` fails on a destroyed result and writes nothing (issue 6b)."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import compressor.methods
from cli.main import cli
from compressor.errors import InputError
from compressor.guard import AccuracyCollapseError, chance_ceiling, check_accuracy


def _prune(*args):
    return CliRunner().invoke(cli, ["prune", *map(str, args)])


def test_min_accuracy_fails_without_writing_and_reports_on_stderr(lenet5_pt2, tmp_path):
    out = tmp_path / "out.pt2"
    args = (lenet5_pt2, "-m", "magnitude-global", "--sparsity", "0.5", "--data", "digits")
    result = _prune(*args, "-o", out, "--min-accuracy", "1", "--report", tmp_path / "r.json")
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: held-out accuracy ") and "below --min-accuracy 100.00%" in line
    assert "(dense model: " in line and "the model was not written" in line
    assert not out.exists() and not (tmp_path / "r.json").exists()
    report = json.loads(result.stderr[: result.stderr.rindex("}") + 1])
    assert report["method"] == "magnitude-global" and report["top1"] < 1.0

    result = _prune(*args, "-o", out, "--min-accuracy", "0.5")
    assert result.exit_code == 0, result.output
    assert out.exists()


def _constant_output(real_prune):
    """prune() whose result ignores its input: the last layer's weights and bias zeroed."""

    def prune(*args, **kwargs):
        result = real_prune(*args, **kwargs)
        last = [m for m in result.model.modules() if isinstance(m, torch.nn.Linear)][-1]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.zero_()
        return result

    return prune


def test_chance_accuracy_fails_unless_a_floor_is_given(lenet5_pt2, tmp_path, monkeypatch):
    monkeypatch.setattr(compressor.methods, "prune", _constant_output(compressor.methods.prune))
    out = tmp_path / "out.pt2"
    args = (lenet5_pt2, "-m", "magnitude-global", "--sparsity", "0.5", "--data", "digits")
    result = _prune(*args, "-o", out)
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert "is at chance level (10.00% for 10 classes; at most 15.00% counts as chance)" in line
    assert "--min-accuracy" in line and not out.exists()
    assert '"method": "magnitude-global"' in result.stderr

    result = _prune(*args, "-o", out, "--min-accuracy", "0")
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_min_accuracy_needs_labels(lenet5_pt2, tmp_path, digits):
    x = torch.cat([x for x, _ in digits.train]).numpy()
    np.savez(tmp_path / "unlabelled.npz", x=x)
    args = ("-m", "magnitude-global", "--sparsity", "0.5", "--min-accuracy", "0.5")
    result = _prune(lenet5_pt2, *args, "--data", tmp_path / "unlabelled.npz")
    assert result.exit_code == 2 and "--min-accuracy needs labelled held-out data" in result.output


def test_chance_rule():
    assert chance_ceiling(10) == pytest.approx(0.15)
    assert chance_ceiling(2) == pytest.approx(0.55)  # a tenth of the way, not 1.5 x 50 %
    check_accuracy(0.12, 0.13, 10)  # never learned the task: nothing lost
    check_accuracy(None, 0.9, 10)  # unlabelled: nothing measured
    check_accuracy(0.16, 0.9, 10)
    with pytest.raises(AccuracyCollapseError, match="accuracy 15.00% is at chance level"):
        check_accuracy(0.15, 0.9, 10)
    check_accuracy(0.15, 0.9, 10, min_accuracy=0.1)  # the user's floor replaces the rule
    assert issubclass(AccuracyCollapseError, Exception) and not issubclass(
        AccuracyCollapseError, InputError
    )


def test_allow_layer_collapse_reaches_the_method(lenet5_pt2, tmp_path):
    args = (lenet5_pt2, "-m", "magnitude-global", "--sparsity", "0.5", "-o", tmp_path / "o.pt2")
    result = _prune(*args, "--allow-layer-collapse", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["allow_layer_collapse"] is True
