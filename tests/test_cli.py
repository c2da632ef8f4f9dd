"""CLI behaviour: exit codes 0 / 1 / 2, one-line errors naming the problem, inputs untouched."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor import zoo
from tests.conftest import file_digest


@pytest.fixture
def run():
    def invoke(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    return invoke


@pytest.fixture
def model_path(tmp_path, lenet5_pt2):
    path = tmp_path / "model.pt2"
    path.write_bytes(lenet5_pt2.read_bytes())
    return path


def _bad_files(tmp_path):
    model = zoo.build("lenet300", in_channels=1, num_classes=10, input_size=8)
    torchscript = tmp_path / "ts.pt"
    torch.jit.script(model).save(str(torchscript))
    pickled = tmp_path / "pickled.pt"
    torch.save(model, pickled)
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(b"\x00\x01garbage" * 10)
    state = tmp_path / "weights.pt"
    torch.save(model.state_dict(), state)
    return {"torchscript": torchscript, "pickle": pickled, "corrupt": corrupt, "state": state}


BAD_PRUNE = [
    # (name, extra args, expected exit code, fragment of the message)
    ("unknown method", ["--method", "magic", "--sparsity", "0.9"], 2, "unknown method 'magic'"),
    ("budget 0x", ["--method", "magnitude-global", "--budget", "0x"], 2, "'0x'"),
    ("budget -2x", ["--method", "magnitude-global", "--budget", "-2x"], 2, "'-2x'"),
    ("budget 4y", ["--method", "magnitude-global", "--budget", "4y"], 2, "'4y'"),
    ("budget 150%", ["--method", "magnitude-global", "--budget", "150%"], 2, "150%"),
    ("budget nan", ["--method", "magnitude-global", "--budget", "nan"], 2, "nan"),
    ("sparsity 1.5", ["--method", "magnitude-global", "--sparsity", "1.5"], 2, "outside [0, 1)"),
    ("sparsity 1", ["--method", "magnitude-global", "--sparsity", "1"], 2, "outside [0, 1)"),
    ("sparsity -0.1", ["--method", "magnitude-global", "--sparsity", "-0.1"], 2, "outside [0, 1)"),
    (
        "both budgets",
        ["--method", "magnitude-global", "--sparsity", "0.5", "--budget", "2x"],
        2,
        "exactly one",
    ),
    ("no budget", ["--method", "magnitude-global"], 2, "exactly one"),
    (
        "missing data",
        ["--method", "magnitude-global", "--sparsity", "0.5", "--data", "nowhere.npz"],
        2,
        "nowhere.npz",
    ),
    (
        "unknown data",
        ["--method", "magnitude-global", "--sparsity", "0.5", "--data", "imagenet"],
        2,
        "imagenet",
    ),
    (
        "bad --set",
        ["--method", "magnitude-global", "--sparsity", "0.5", "--set", "steps=3"],
        2,
        "steps=3",
    ),
    (
        "--set not a number",
        ["--method", "bar", "--budget", "2x", "--set", "round_to=eight"],
        2,
        "round_to='eight' is not a whole number",
    ),
    (
        "--set not a bool",
        ["--method", "bar", "--budget", "2x", "--set", "freeze_weights=maybe"],
        2,
        "freeze_weights='maybe' is not true or false",
    ),
    (
        "--set out of range",
        ["--method", "bar", "--budget", "2x", "--data", "digits", "--set", "lr=-1"],
        2,
        "option lr=-1.0 must be at least 0",
    ),
    (
        "foreign flag",
        ["--method", "magnitude-global", "--sparsity", "0.5", "--steps", "3"],
        2,
        "--steps",
    ),
]


@pytest.mark.parametrize(
    ("name", "args", "code", "fragment"), BAD_PRUNE, ids=[b[0] for b in BAD_PRUNE]
)
def test_prune_bad_input(run, model_path, tmp_path, name, args, code, fragment):
    digest = file_digest(model_path)
    result = run("prune", model_path, *args, "-o", tmp_path / "out.pt2")
    assert result.exit_code == code, result.output
    assert fragment in result.output
    assert "Traceback" not in result.output
    assert file_digest(model_path) == digest
    assert not (tmp_path / "out.pt2").exists()


def test_set_parses_optional_numbers_by_their_type():
    from cli.prune_steps import parse_settings
    from compressor.methods import get_method

    bar = get_method("bar")
    assert parse_settings(("round_to=8", "lr=0.02"), bar) == {"round_to": 8, "lr": 0.02}
    assert parse_settings(("round_to=none",), bar) == {"round_to": None}
    assert parse_settings(("fold_gates=false",), bar) == {"fold_gates": False}


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("torchscript", "TorchScript"),
        ("pickle", "--trust-pickle"),
        ("corrupt", "corrupt.pt2"),
        ("state", "--arch"),
    ],
)
def test_prune_bad_model_files(run, tmp_path, kind, fragment):
    path = _bad_files(tmp_path)[kind]
    digest = file_digest(path)
    result = run(
        "prune", path, "--method", "magnitude-global", "--sparsity", "0.5", "-o", tmp_path / "o.pt2"
    )
    assert result.exit_code == 2, result.output
    assert fragment in result.output
    assert file_digest(path) == digest


def test_missing_model_file(run, tmp_path):
    result = run("info", tmp_path / "absent.pt2")
    assert result.exit_code == 2
    assert "absent.pt2" in result.output and "does not exist" in result.output


def test_output_equal_to_input_refused(run, model_path):
    digest = file_digest(model_path)
    result = run(
        "prune", model_path, "--method", "magnitude-global", "--sparsity", "0.5", "-o", model_path
    )
    assert result.exit_code == 2
    assert "-o/--output" in result.output and "is the input model" in result.output
    assert file_digest(model_path) == digest


def test_data_shape_mismatch(run, model_path, tmp_path):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, x=np.zeros((16, 3, 5, 5), dtype=np.float32), y=np.zeros(16, dtype=np.int64))
    result = run("eval", model_path, "--data", wrong)
    assert result.exit_code == 2, result.output
    assert "3x5x5" in result.output and "1x8x8" in result.output


def test_unknown_arch(run, tmp_path):
    result = run("train", "--arch", "resnet21", "--data", "digits", "-o", tmp_path / "m.pt2")
    assert result.exit_code == 2
    assert "resnet21" in result.output and "resnet20" in result.output


def test_eval_needs_labels(run, model_path, tmp_path):
    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, x=np.zeros((8, 1, 8, 8), dtype=np.float32))
    result = run("eval", model_path, "--data", unlabelled)
    assert result.exit_code == 2
    assert "no labels" in result.output


def test_debug_shows_traceback(run, tmp_path):
    result = run("--debug", "info", tmp_path / "absent.pt2")
    assert result.exit_code == 2
    assert "Traceback" in result.output


def test_state_dict_with_arch_works(run, tmp_path):
    path = _bad_files(tmp_path)["state"]
    result = run("info", path, "--arch", "lenet300", "--input-shape", "1x8x8", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stats"]["flops"] == 64 * 300 + 300 * 100 + 100 * 10


def test_train_prune_info_eval(run, tmp_path):
    dense = tmp_path / "dense.pt2"
    result = run("train", "--arch", "lenet300", "--data", "digits", "--epochs", "3", "-o", dense)
    assert result.exit_code == 0, result.output
    assert "test top-1" in result.output

    out, report = tmp_path / "sparse.pt2", tmp_path / "report.json"
    result = run(
        "prune",
        dense,
        "--method",
        "magnitude-global",
        "--sparsity",
        "90%",
        "--data",
        "digits",
        "-o",
        out,
        "--report",
        report,
    )
    assert result.exit_code == 0, result.output
    written = json.loads(report.read_text())
    assert abs(written["achieved"]["sparsity"] - 0.9) < 1e-4
    assert written["top1"] > 0.5

    result = run("info", out, "--json")
    info = json.loads(result.stdout)
    assert info["report"]["method"] == "magnitude-global"
    assert abs(info["stats"]["sparsity"] - 0.9) < 1e-4

    result = run("eval", out, "--data", "digits", "--json")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["top1"] == pytest.approx(written["top1"])


def test_info_on_resnet20_flops(run, tmp_path):
    from compressor.io import save_model
    from tests.test_stats import RESNET20_MACS

    path = save_model(
        zoo.build("resnet20", in_channels=3, num_classes=10, input_size=32),
        tmp_path / "r20.pt2",
        example_inputs=(torch.zeros(2, 3, 32, 32),),
    )
    result = run("info", path)
    assert result.exit_code == 0, result.output
    assert "layer3.2.conv2" in result.output
    stats = json.loads(run("info", path, "--json").stdout)["stats"]
    assert abs(stats["flops"] - RESNET20_MACS) / RESNET20_MACS < 0.01


def test_help_shows_examples(run):
    for command in ("info", "train", "prune", "eval", "demo"):
        result = run(command, "--help")
        assert result.exit_code == 0
        assert "Example" in result.output
