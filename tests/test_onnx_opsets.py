"""ONNX exporter choice (dynamo / TorchScript) and older opsets (11-17) for edge toolchains."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cli.main import cli
from compressor import zoo
from compressor.errors import CompressorError, InputError
from compressor.io import load_model, save_model
from exporters.onnx import export_onnx
from tests import models as toys
from tests.test_mixed_joins import assert_join_ops, ort_ops
from tests.test_surgery_mixed import _mixed_projection_residual

DEFAULT_OPSET = 20  # what the dynamo exporter of torch 2.13 writes without --opset


@pytest.fixture(scope="module")
def mixed_slimmed():
    """A slimmed mixed-residual network: its joins export as gather / scatter."""
    result, x, _ = _mixed_projection_residual()
    return result.model.eval(), x


def _lenet5():
    torch.manual_seed(0)
    return zoo.build("lenet5", in_channels=1, num_classes=10, input_size=8).eval(), (
        torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)),
    )


def _default_opset(proto: onnx.ModelProto) -> int:
    return next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _assert_runs_like_torch(path, model, x: torch.Tensor) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("opset", [11, 13, 17, None])
@pytest.mark.parametrize("which", ["lenet5", "mixed"])
def test_opsets_export_and_verify(which, opset, mixed_slimmed, tmp_path):
    model, x = _lenet5() if which == "lenet5" else mixed_slimmed
    path = tmp_path / "m.onnx"
    result = export_onnx(model, path, x, opset=opset)
    proto = onnx.load(str(path))
    assert result.opset == _default_opset(proto) == (opset or DEFAULT_OPSET)
    assert result.verified and result.max_abs_diff <= result.tolerance
    # below 18 the TorchScript exporter writes the opset natively; else dynamo
    assert result.exporter == ("legacy" if opset is not None and opset < 18 else "dynamo")
    ops = {node.op_type for node in proto.graph.node}
    if which == "mixed":  # the joins as Pad + Gather, the same ops from both exporters
        assert {"Pad", "Gather"} <= ops and not ops & {"ScatterND", "ScatterElements"}, ops
        assert_join_ops(ort_ops(path, tmp_path), model)
    fresh = torch.randn(5, *x[0].shape[1:], generator=torch.Generator().manual_seed(9))
    _assert_runs_like_torch(path, model, fresh)


@pytest.fixture(scope="module")
def mixed_pt2(mixed_slimmed, tmp_path_factory):
    model, x = mixed_slimmed
    path = tmp_path_factory.mktemp("mixed") / "mixed.pt2"
    save_model(model, path, example_inputs=x)
    return path


@pytest.mark.parametrize("opset", [11, 17])
def test_slimmed_mixed_pt2_exports_at_old_opsets_from_the_cli(mixed_pt2, opset, tmp_path):
    """The lifted .pt2 graph reads the batch size with aten.sym_size: it must stay dynamic."""
    out = tmp_path / "m.onnx"
    done = _cli("export", mixed_pt2, "-o", out, "--opset", opset, "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert (report["opset"], report["exporter"]) == (opset, "legacy")
    assert report["max_abs_diff"] <= report["tolerance"] and 1 in report["batch_sizes"]
    assert _default_opset(onnx.load(str(out))) == opset
    fresh = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    _assert_runs_like_torch(out, load_model(mixed_pt2).model, fresh)


def test_dynamo_alone_refuses_an_old_opset_and_names_the_fix(tmp_path):
    model, x = _lenet5()
    with pytest.raises(InputError, match=r"--opset 13: the dynamo exporter produced opset 18 "):
        export_onnx(model, tmp_path / "m.onnx", x, opset=13, exporter="dynamo")
    with pytest.raises(InputError, match="use --exporter legacy"):
        export_onnx(model, tmp_path / "m.onnx", x, opset=13, exporter="dynamo")
    with pytest.raises(
        InputError, match=r"--opset 21: the TorchScript exporter writes opsets 7-20"
    ):
        export_onnx(model, tmp_path / "m.onnx", x, opset=21, exporter="legacy")
    assert not (tmp_path / "m.onnx").exists()


def _guarded():
    torch.manual_seed(0)
    return toys.GuardedMLP().eval(), (torch.randn(4, 1, 8, 8),)


def test_model_torch_export_cannot_capture_falls_back_to_torchscript(tmp_path):
    model, x = _guarded()
    for exporter in ("auto", "legacy"):
        path = tmp_path / f"{exporter}.onnx"
        result = export_onnx(model, path, x, exporter=exporter)
        assert result.exporter == "legacy" and result.verified
        assert result.opset == DEFAULT_OPSET
        _assert_runs_like_torch(path, model, torch.randn(3, 1, 8, 8))
    assert result.exporter_note == ""  # legacy was asked for
    auto = export_onnx(model, tmp_path / "a.onnx", x, opset=17)
    assert auto.exporter == "legacy" and auto.opset == 17
    with pytest.raises(InputError, match=r"could not export GuardedMLP: .*use --exporter legacy"):
        export_onnx(model, tmp_path / "d.onnx", x, exporter="dynamo")
    assert not (tmp_path / "d.onnx").exists()


def test_auto_notes_why_it_used_torchscript(tmp_path):
    model, x = _guarded()
    result = export_onnx(model, tmp_path / "m.onnx", x)
    assert result.exporter_note.startswith("torch.onnx could not export GuardedMLP")
    assert "\x1b[" not in result.exporter_note  # no terminal colour codes in messages


class _DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_a_baked_branch_is_caught_by_verification(tmp_path):
    """TorchScript traces the branch the example takes; random samples take the other."""
    with pytest.raises(CompressorError, match="onnxruntime and PyTorch disagree"):
        export_onnx(_DataDependent(), tmp_path / "m.onnx", (torch.ones(2, 3),))
    assert not (tmp_path / "m.onnx").exists()


@pytest.fixture(scope="module")
def guarded_weights(tmp_path_factory):
    model, _ = _guarded()
    path = tmp_path_factory.mktemp("guarded") / "guarded.pt"
    torch.save(model.state_dict(), path)
    return path


def _cli(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def test_cli_exporter_and_opset(guarded_weights, tmp_path):
    base = ["export", guarded_weights, "--arch", "tests.models:GuardedMLP", "--data", "digits"]
    done = _cli(*base, "-o", tmp_path / "g.onnx", "--opset", "13")
    assert done.exit_code == 0, done.output
    assert "ONNX opset 13 (TorchScript exporter)" in done.output
    assert _default_opset(onnx.load(str(tmp_path / "g.onnx"))) == 13
    refused = _cli(*base, "-o", tmp_path / "d.onnx", "--exporter", "dynamo")
    assert refused.exit_code == 2, refused.output
    assert refused.output.startswith("Error: torch.onnx could not export GuardedMLP")
    assert "use --exporter legacy" in refused.output and "Traceback" not in refused.output
    assert "data-dependent expression" in refused.output  # the cause, not torch's wrapper
    assert len(refused.output.strip().splitlines()) == 1
    assert not (tmp_path / "d.onnx").exists()


def test_prune_refuses_a_pt2_it_cannot_write_before_working(guarded_weights, tmp_path):
    base = ["prune", guarded_weights, "--arch", "tests.models:GuardedMLP", "--data", "digits"]
    base += ["--method", "magnitude-global", "--sparsity", "0.5"]
    refused = _cli(*base, "-o", tmp_path / "out.pt2")
    assert refused.exit_code == 2, refused.output
    assert refused.output.startswith(f"Error: cannot write '{tmp_path / 'out.pt2'}': torch.")
    assert f"use -o {tmp_path / 'out.safetensors'}" in refused.output
    assert not (tmp_path / "out.pt2").exists()
    done = _cli(*base, "-o", tmp_path / "out.safetensors")
    assert done.exit_code == 0, done.output
    assert (tmp_path / "out.safetensors").stat().st_size > 0
