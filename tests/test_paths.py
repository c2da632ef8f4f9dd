"""Outputs never clobber each other or existing files, and unwritable ones fail before work."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from cli.main import cli
from cli.paths import check_prune_paths
from compressor.errors import CompressorError, InputError
from compressor.io import atomic_write, load_model
from compressor.paths import check_distinct, check_folder_writable, check_writable
from exporters import csr
from tests.conftest import file_digest

PRUNE = ("--method", "magnitude-global", "--sparsity", "0.5")


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def model_path(tmp_path, lenet5_pt2):
    path = tmp_path / "model.pt2"
    path.write_bytes(lenet5_pt2.read_bytes())
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Makes loading data or a model, or training, record a call; returns the record."""
    calls = []

    def record(name):
        def fake(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} ran before the path checks")

        return fake

    for target in (
        "cli.main.load_data_spec",
        "cli.main.load",
        "cli.prune_steps.load_data_spec",
        "cli.prune_steps.load",
        "cli.export.load_data_spec",
    ):
        monkeypatch.setattr(target, record(target))
    monkeypatch.setattr("cli.export.load", record("cli.export.load"))
    monkeypatch.setattr("cli.demo.load_data", record("cli.demo.load_data"))
    return calls


def _blocked(tmp_path: Path) -> Path:
    """A folder no one, root included, can create: its parent is a regular file."""
    (tmp_path / "file.txt").write_text("not a folder")
    return tmp_path / "file.txt" / "sub"


# --- A: no output clobbers another ----------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--report", "{out}"], "--report and -o/--output are the same file"),
        (["--report", "{sub}/../out.pt2"], "--report and -o/--output are the same file"),
        (["--report", "{model}"], "--report '{model}' is the input model"),
        (["--checkpoint", "{out}"], "--checkpoint and -o/--output are the same file"),
        (["--resume", "{out}"], "--resume and -o/--output are the same file"),
        (["--checkpoint", "{model}"], "--checkpoint '{model}' is the input model"),
        (["--report", "r.json", "--checkpoint", "r.json"], "--checkpoint and --report"),
        (["--data", "{out_npz}", "-o", "{out_npz}"], "-o/--output and --data are the same file"),
    ],
)
def test_prune_refuses_two_roles_on_one_file(
    model_path, tmp_path, monkeypatch, no_work, extra, fragment
):
    names = {
        "out": tmp_path / "out.pt2",
        "sub": tmp_path / "sub",
        "model": model_path,
        "out_npz": tmp_path / "d.npz",
    }
    np.savez(names["out_npz"], x=np.zeros((4, 1, 8, 8), np.float32))
    npz_digest = file_digest(names["out_npz"])
    extra = [e.format(**names) for e in extra]
    monkeypatch.chdir(tmp_path)  # so "r.json" lands in tmp_path
    result = _run("prune", model_path, *PRUNE, "-o", names["out"], *extra)
    assert result.exit_code == 2, result.output
    assert fragment.format(**names) in result.output
    assert not names["out"].exists() and not (tmp_path / "r.json").exists()
    assert file_digest(names["out_npz"]) == npz_digest and no_work == []


def test_prune_refuses_an_existing_output_unless_forced(model_path, tmp_path):
    out, report = tmp_path / "out.pt2", tmp_path / "r.json"
    out.write_bytes(b"an earlier result")
    result = _run("prune", model_path, *PRUNE, "-o", out, "--report", report)
    assert result.exit_code == 2
    assert f"-o/--output '{out}' exists; pass --force to overwrite" in result.output
    assert out.read_bytes() == b"an earlier result" and not report.exists()
    result = _run("prune", model_path, *PRUNE, "-o", out, "--report", report, "--force")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() != b"an earlier result" and '"method"' in report.read_text()


def test_prune_refuses_an_existing_checkpoint_without_resume(model_path, tmp_path, no_work):
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(b"another run")
    result = _run("prune", model_path, *PRUNE, "-o", tmp_path / "o.pt2", "--checkpoint", ckpt)
    assert result.exit_code == 2
    assert f"--checkpoint '{ckpt}' exists; pass --resume {ckpt}" in result.output
    assert ckpt.read_bytes() == b"another run" and no_work == []


@pytest.mark.parametrize("fmt", ["onnx", "csr"])
def test_export_refuses_to_overwrite_unless_forced(lenet5_pt2, tmp_path, fmt):
    out = tmp_path / f"m.{fmt}"
    out.write_bytes(b"an earlier export")
    digest = file_digest(out)
    refused = _run("export", lenet5_pt2, "--format", fmt, "-o", out)
    assert refused.exit_code == 2
    assert refused.output.strip() == f"Error: -o/--output '{out}' exists; pass --force to overwrite"
    assert file_digest(out) == digest
    forced = _run("export", lenet5_pt2, "--format", fmt, "-o", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert f"-> {out} ({out.stat().st_size:,} bytes)" in forced.output
    if fmt == "onnx":
        assert onnx.load(str(out)).graph.node  # a real graph replaced the earlier file
    else:
        assert set(csr.load(out)) == set(load_model(lenet5_pt2).model.state_dict())


def test_export_default_output_is_protected_too(lenet5_pt2, tmp_path, no_work):
    model = tmp_path / "net.pt2"
    model.write_bytes(lenet5_pt2.read_bytes())
    (tmp_path / "net.onnx").write_bytes(b"kept")
    result = _run("export", model)
    assert result.exit_code == 2 and "'" + str(tmp_path / "net.onnx") + "' exists" in result.output
    assert (tmp_path / "net.onnx").read_bytes() == b"kept" and no_work == []


def test_train_refuses_existing_output_and_output_as_checkpoint(tmp_path, no_work):
    out = tmp_path / "t.pt2"
    out.write_bytes(b"old")
    args = ("train", "--arch", "lenet5", "--data", "digits", "--epochs", "1")
    result = _run(*args, "-o", out)
    assert result.exit_code == 2 and "exists; pass --force" in result.output
    result = _run(*args, "-o", tmp_path / "n.pt2", "--checkpoint", tmp_path / "n.pt2")
    assert result.exit_code == 2
    assert "--checkpoint and -o/--output are the same file" in result.output
    assert out.read_bytes() == b"old" and no_work == []


@pytest.mark.parametrize("given", [("--resume",), ("--checkpoint", "--resume")])
def test_resuming_may_rewrite_its_checkpoint(tmp_path, given):
    ckpt = tmp_path / "run.ckpt"
    ckpt.write_bytes(b"a run")
    flags = {flag: str(ckpt) for flag in given}
    check_prune_paths(
        str(tmp_path / "m.pt2"),
        "digits",
        str(tmp_path / "o.pt2"),
        None,
        flags.get("--checkpoint"),
        flags["--resume"],
        force=False,
    )  # no error: the run continues in its own checkpoint


def test_check_distinct_allows_declared_sharing(tmp_path):
    ckpt = tmp_path / "c.ckpt"
    check_distinct(
        {"--resume": ckpt},
        {"--checkpoint": ckpt},
        may_share=(frozenset(("--checkpoint", "--resume")),),
    )
    with pytest.raises(InputError, match="--checkpoint and --resume are the same file"):
        check_distinct({"--resume": ckpt}, {"--checkpoint": ckpt})


def test_symlink_to_an_output_is_the_same_file(tmp_path):
    link = tmp_path / "link.json"
    link.symlink_to(tmp_path / "out.pt2")  # dangling: the output does not exist yet
    with pytest.raises(InputError, match="--report and -o/--output are the same file"):
        check_distinct({}, {"-o/--output": tmp_path / "out.pt2", "--report": link})


# --- B: fail before the work ----------------------------------------------------------------


@pytest.mark.parametrize("option", ["-o", "--report", "--checkpoint"])
def test_prune_unwritable_output_fails_before_loading(model_path, tmp_path, no_work, option):
    bad = _blocked(tmp_path) / "x.out"
    args = ["prune", model_path, *PRUNE, "-o", tmp_path / "o.pt2"]
    result = _run(*args, option, bad)
    assert result.exit_code == 2, result.output
    assert f"cannot write {option}" in result.output and f"'{bad}'" in result.output
    assert "internal error" not in result.output and no_work == []


@pytest.mark.parametrize("option", ["-o", "--checkpoint"])
def test_train_unwritable_output_fails_before_training(tmp_path, no_work, option):
    bad = _blocked(tmp_path) / "x.pt2"
    args = ["train", "--arch", "lenet5", "--data", "digits", "-o", tmp_path / "ok.pt2"]
    result = _run(*args, option, bad)
    assert result.exit_code == 2, result.output
    assert f"'{bad}'" in result.output and "is a file, not a folder" in result.output
    assert no_work == []


def test_export_and_demo_unwritable_outputs_fail_before_loading(lenet5_pt2, tmp_path, no_work):
    bad = _blocked(tmp_path)
    result = _run("export", lenet5_pt2, "-o", bad / "m.onnx")
    assert result.exit_code == 2 and f"cannot write -o/--output '{bad / 'm.onnx'}'" in result.output
    result = _run("demo", "--out", bad)
    assert result.exit_code == 2 and f"cannot write --out '{bad}'" in result.output
    assert no_work == []


def test_proc_is_not_writable_even_for_root(tmp_path):
    with pytest.raises(InputError, match="cannot write --report '/proc/x/r.json'"):
        check_writable("--report", "/proc/x/r.json")
    check_writable("-o", tmp_path / "missing" / "deeper" / "o.pt2")  # created on write: fine
    assert not (tmp_path / "missing").exists()
    assert os.listdir(tmp_path) == []  # the probe left nothing behind


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_folder_by_permission(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(InputError, match="cannot write --out"):
            check_folder_writable("--out", folder)
    finally:
        folder.chmod(0o700)


def test_failed_final_write_names_the_users_path(model_path, tmp_path, monkeypatch):
    def fail(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", src)

    monkeypatch.setattr("compressor.io.os.replace", fail)
    out = tmp_path / "o.pt2"
    result = _run("prune", model_path, *PRUNE, "-o", out)
    assert result.exit_code == 2
    assert result.output.strip() == (
        f"Error: could not write '{out}': Permission denied; nothing was written there"
    )
    assert os.listdir(tmp_path) == ["model.pt2"]  # and no temporary file is left


def test_full_disk_is_a_failure_while_working(tmp_path):
    def write(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CompressorError, match="could not write .*o.bin.: No space left") as info:
        atomic_write(tmp_path / "o.bin", write)
    assert not isinstance(info.value, InputError) and os.listdir(tmp_path) == []
