"""Start-up: `--help`, `list` and `import compressor` load no heavy library; --json is global."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import compressor
from cli.main import cli
from compressor import _catalog, catalog

ROOT = Path(__file__).resolve().parents[1]
# seconds each: scikit-learn 2-3, torch 1-2, onnx/onnxruntime/scipy about 0.5
HEAVY = ("torch", "sklearn", "scipy", "onnx", "onnxruntime", "onnxscript", "safetensors")

PROBE = """
import json, runpy, sys
sys.argv = ["compress", *json.loads(sys.argv[1])]
try:
    runpy.run_module("cli.main", run_name="__main__")
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("\\nPROBE " + json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def _probe(args: list[str]) -> dict:
    """Runs `compress ARGS` in a fresh interpreter; its exit code and the modules it imported."""
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.rsplit("\nPROBE ", 1)[1]
    return json.loads(line) | {"stdout": proc.stdout}


def _heavy(modules: list[str]) -> list[str]:
    return sorted({m.split(".")[0] for m in modules} & set(HEAVY))


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["--help"], "Examples:"),
        (["prune", "--help"], "--budget 4x"),
        (["list"], "magnitude-global"),
        (["info", "--help"], "Example"),
        (["export", "--help"], "Example"),
    ],
)
def test_cli_starts_without_heavy_imports(args, shown):
    result = _probe(args)
    assert result["code"] in (0, None)
    assert shown in result["stdout"]
    assert _heavy(result["modules"]) == []


def test_import_compressor_is_light_and_lazy():
    code = (
        "import sys, compressor; from compressor import Budget, InputError;"
        "print(sorted(sys.modules)); print(Budget.__module__, InputError.__module__)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    light, names = proc.stdout.splitlines()
    assert _heavy(eval(light)) == []
    assert names == "compressor.budget compressor.errors"


def test_public_api_names_resolve():
    assert compressor.__all__ == sorted(compressor._EXPORTS)
    for name in compressor.__all__:
        assert getattr(compressor, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        compressor.nope  # noqa: B018


def test_catalog_is_fresh():
    """`compress list` reads the generated catalog only while it matches the sources."""
    stale = "stale catalog: run `python -m compressor.catalog` and commit compressor/_catalog.py"
    assert catalog.source_digest() == _catalog.DIGEST, stale
    assert json.loads(_catalog.CATALOG_JSON) == catalog.live(), stale


def test_stale_catalog_falls_back_to_registries(monkeypatch):
    monkeypatch.setattr(_catalog, "CATALOG_JSON", '{"methods": {}, "archs": []}')
    assert catalog.catalog() == {"methods": {}, "archs": []}  # fresh digest: trusted...
    monkeypatch.setattr(catalog, "source_digest", lambda: "edited since")
    assert catalog.catalog() == catalog.live()  # ...a changed source is not


@pytest.mark.parametrize("command", ["info", "eval"])
def test_json_is_global_and_per_command(tmp_path, lenet5_pt2, command):
    extra = ["--data", "digits"] if command == "eval" else []
    runner = CliRunner()
    plain = runner.invoke(cli, [command, str(lenet5_pt2), *extra], catch_exceptions=False)
    per_command = runner.invoke(
        cli, [command, str(lenet5_pt2), *extra, "--json"], catch_exceptions=False
    )
    global_ = runner.invoke(
        cli, ["--json", command, str(lenet5_pt2), *extra], catch_exceptions=False
    )
    assert plain.exit_code == per_command.exit_code == global_.exit_code == 0
    with pytest.raises(json.JSONDecodeError):
        json.loads(plain.stdout)
    assert json.loads(global_.stdout) == json.loads(per_command.stdout)


def test_every_command_help_shows_an_example():
    """DESIGN.md: `compress --help` and every subcommand's --help show an example."""
    runner = CliRunner()
    assert "Examples:" in runner.invoke(cli, ["--help"]).output
    for name in sorted(cli.commands):
        result = runner.invoke(cli, [name, "--help"], catch_exceptions=False)
        assert result.exit_code == 0, name
        assert re.search(rf"Examples?:\n\s+compress {name}\b", result.output), name
    assert "--budget 4x" in runner.invoke(cli, ["prune", "--help"]).output
