"""--arch and --data MODULE:FN: one import rule for both, and --help says they run code."""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from cli.main import cli
from compressor import zoo

MODULE = "trustpt2_user_nets"
SOURCE = textwrap.dedent(
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from compressor import zoo


    def net():
        return zoo.build("lenet300", in_channels=1, num_classes=10, input_size=8)


    def data():
        x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, torch.arange(16) % 10), batch_size=8), None


    def boom():
        raise RuntimeError("nope")
    """
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder holding the user's module and matching weights; not on sys.path."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    model = zoo.build("lenet300", in_channels=1, num_classes=10, input_size=8)
    save_file(dict(model.state_dict()), tmp_path / "w.safetensors")
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    importlib.invalidate_caches()
    yield tmp_path
    sys.modules.pop(MODULE, None)


def _info(*args: str):
    return CliRunner().invoke(cli, ["info", *args, "--json"], catch_exceptions=False)


def test_both_options_find_a_module_in_the_current_directory(workdir, monkeypatch):
    monkeypatch.chdir(workdir)
    path_before = list(sys.path)
    result = _info("w.safetensors", "--arch", f"{MODULE}:net", "--data", f"{MODULE}:data")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["stats"]["params"] > 0
    assert sys.path == path_before, "the current directory must not stay on sys.path"


@pytest.mark.parametrize("option", ["--arch", "--data"])
def test_both_options_fail_alike_outside_that_directory(workdir, tmp_path_factory, option):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    spec = f"{MODULE}:{'net' if option == '--arch' else 'data'}"
    args = [str(workdir / "w.safetensors"), "--arch", "lenet300", option, spec]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(elsewhere)
        result = _info(*args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith(
        f"Error: {option} '{spec}': cannot import module '{MODULE}' (ModuleNotFoundError"
    )
    assert "looked up on PYTHONPATH, then in the current directory" in result.output


@pytest.mark.parametrize("option", ["--arch", "--data"])
def test_a_failing_function_is_bad_input_for_both(workdir, monkeypatch, option):
    monkeypatch.chdir(workdir)
    result = _info("w.safetensors", "--arch", "lenet300", option, f"{MODULE}:boom")
    assert result.exit_code == 2, result.output
    assert (
        result.output.strip()
        == f"Error: {option} '{MODULE}:boom': boom() raised RuntimeError: nope"
    )


@pytest.mark.parametrize("command", ["info", "prune", "eval", "export"])
def test_help_says_both_options_run_code(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    text = " ".join(result.output.split())
    assert result.exit_code == 0
    arch = text[text.index("--arch") : text.index("--arch") + 250]
    data = text[text.index("--data") : text.index("--data") + 250]
    for help_text in (arch, data):
        assert "running that code: use only code you trust" in help_text
        assert "looked up on PYTHONPATH, then in the current directory" in help_text


def test_api_build_arch_runs_the_factory(workdir, monkeypatch):
    from compressor.io import build_arch

    monkeypatch.chdir(workdir)
    model = build_arch(f"{MODULE}:net")
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
