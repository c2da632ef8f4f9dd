"""`compress export`: exit codes, messages, default paths."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor.io import save_model
from compressor.methods import prune
from exporters import csr


@pytest.fixture(scope="module")
def pruned_pt2(tmp_path_factory, lenet5_digits, digits):
    """A 90 %-sparse LeNet-5 .pt2 (report embedded) and its state_dict .pt."""
    folder = tmp_path_factory.mktemp("export-cli")
    pruned = prune(lenet5_digits, "magnitude-global", 0.9).model
    path = folder / "lenet5-mg.pt2"
    save_model(pruned, path, example_inputs=(digits.sample_inputs(2),), report={"method": "mg"})
    torch.save(pruned.state_dict(), folder / "weights.pt")
    return path, pruned


def _run(*args):
    return CliRunner().invoke(cli, ["export", *map(str, args)])


def test_onnx_default_path_and_message(pruned_pt2):
    path, _ = pruned_pt2
    result = _run(path)
    assert result.exit_code == 0, result.output
    written = path.with_name("lenet5-mg.onnx")
    assert written.exists()
    assert (
        "max abs difference" in result.output
        and f"{written.stat().st_size:,} bytes" in result.output
    )


def test_onnx_json_with_sparse_initializers(pruned_pt2, tmp_path):
    path, _ = pruned_pt2
    result = _run(
        path, "-o", tmp_path / "s.onnx", "--sparse-initializers", "--data", "digits", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["sparse_initializers"] >= 1 and report["max_abs_diff"] <= report["tolerance"]
    assert report["size_bytes"] == (tmp_path / "s.onnx").stat().st_size


def test_csr_default_path_int8_blocks(pruned_pt2):
    path, pruned = pruned_pt2
    result = _run(path, "--format", "csr", "--values", "int8", "--block", "1x4")
    assert result.exit_code == 0, result.output
    written = path.with_name("lenet5-mg.csr.safetensors")
    assert "max weight error" in result.output and "block 1x4" in result.output
    assert set(csr.load(written)) == set(pruned.state_dict())


def test_csr_fp32_from_state_dict_is_exact(pruned_pt2, tmp_path):
    path, pruned = pruned_pt2
    out = tmp_path / "w.csr"
    result = _run(
        path.with_name("weights.pt"),
        "--arch",
        "lenet5",
        "--input-shape",
        "1x8x8",
        "--format",
        "csr",
        "-o",
        out,
    )
    assert result.exit_code == 0, result.output
    assert "rebuilt weights exact, outputs identical" in result.output
    rebuilt = csr.load(out)
    assert all(torch.equal(rebuilt[k], v) for k, v in pruned.state_dict().items())


@pytest.mark.parametrize("block", ["0x4", "abc", "1x0", "4"])
def test_bad_block_exits_2_naming_it(pruned_pt2, block):
    result = _run(pruned_pt2[0], "--format", "csr", "--block", block)
    assert result.exit_code == 2
    assert f"'{block}'" in result.output and "--block" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--values", "int8"], "--values applies to --format csr only"),
        (["--block", "1x4"], "--block applies to --format csr only"),
        (
            ["--format", "csr", "--sparse-initializers"],
            "--sparse-initializers applies to --format onnx",
        ),
        (["--format", "csr", "--opset", "18"], "--opset applies to --format onnx only"),
        (["--format", "tflite"], "'tflite' is not one of"),
    ],
)
def test_options_of_the_other_format_exit_2(pruned_pt2, args, message):
    result = _run(pruned_pt2[0], *args)
    assert result.exit_code == 2 and message in result.output


def test_input_is_never_overwritten(pruned_pt2):
    path, _ = pruned_pt2
    before = path.read_bytes()
    result = _run(path, "-o", path)
    assert result.exit_code == 2 and "is the input model" in result.output
    assert path.read_bytes() == before


def test_missing_model_and_unknown_shape_exit_2(tmp_path):
    assert _run(tmp_path / "nope.pt2").exit_code == 2
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 2)), tmp_path / "module.pt")
    result = _run(tmp_path / "module.pt", "--trust-pickle")
    # a pickled module records no input shape: the message says how to give one
    assert result.exit_code == 2 and "--input-shape" in result.output
    result = _run(tmp_path / "module.pt", "--trust-pickle", "--input-shape", "4")
    assert result.exit_code == 0, result.output


def test_verification_failure_exits_1(pruned_pt2, tmp_path, monkeypatch):
    monkeypatch.setattr("exporters.onnx.RTOL", -1.0)  # every difference is now too large
    result = _run(pruned_pt2[0], "-o", tmp_path / "bad.onnx")
    assert result.exit_code == 1 and "exceeds the tolerance" in result.output
    assert not (tmp_path / "bad.onnx").exists()


def test_no_verify_says_so(pruned_pt2, tmp_path):
    result = _run(pruned_pt2[0], "--format", "csr", "--no-verify", "-o", tmp_path / "n.csr")
    assert result.exit_code == 0 and "not verified (--no-verify)" in result.output


def test_demo_export_step_writes_both_verified_files(pruned_pt2, tmp_path, digits):
    from cli.export import export_files

    sizes = export_files(pruned_pt2[1], tmp_path / "m", (digits.sample_inputs(2),))
    onnx_file, pack = tmp_path / "m.onnx", tmp_path / "m.csr.safetensors"
    assert sizes == {"onnx_bytes": onnx_file.stat().st_size, "csr_bytes": pack.stat().st_size}
    assert csr.verify(pack, pruned_pt2[1]).exact_weights
