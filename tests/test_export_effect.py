"""ONNX verification against the inputs' effect; a constant output is refused (issue 6c)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from cli.main import cli
from compressor.errors import CompressorError
from compressor.io import save_model
from exporters import effect
from exporters.onnx import RTOL, export_onnx
from tests.models import ZeroHead

CONSTANT = "output is constant across inputs: the model ignores its input"


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(0))


def test_constant_model_is_refused_and_not_written(tmp_path):
    path = tmp_path / "zero.onnx"
    with pytest.raises(effect.ConstantOutputError, match=CONSTANT + ".*--allow-constant-output"):
        export_onnx(ZeroHead().eval(), path, (_x(),))
    assert not path.exists()
    allowed = export_onnx(ZeroHead().eval(), path, (_x(),), allow_constant=True)
    assert allowed.constant_output and allowed.input_effect == 0.0 and path.exists()


def test_cli_exits_1_on_constant_output_and_warns_when_allowed(tmp_path):
    model = tmp_path / "zero.pt2"
    save_model(ZeroHead().eval(), model, example_inputs=(_x(2),), report={"method": "t"})
    out = tmp_path / "zero.onnx"
    result = CliRunner().invoke(cli, ["export", str(model), "-o", str(out)])
    assert result.exit_code == 1 and f"Error: {CONSTANT}" in result.output
    assert not out.exists()
    args = ["export", str(model), "-o", str(out), "--allow-constant-output"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and f"warning: {CONSTANT}" in result.output and out.exists()


class _Offset(nn.Module):
    """Outputs near 1000 that the input moves by ~0.1: the old scale (1000) hid mismatches."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 3)
        with torch.no_grad():
            self.fc.weight.mul_(0.1)
            self.fc.bias.fill_(1000.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_tolerance_follows_the_inputs_effect(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = _Offset().eval()
    result = export_onnx(model, tmp_path / "a.onnx", (_x(),))
    assert 0.05 < result.input_effect < 1.0 and result.output_scale > 999
    expected = RTOL * max(result.input_effect, effect.ROUNDING_SHARE * result.output_scale)
    assert result.tolerance == pytest.approx(expected)
    assert result.tolerance <= RTOL * result.output_scale / 5  # 5x tighter than the old rule

    # a mismatch the old tolerance (RTOL x 1000 = 0.1) let through is now an error
    import exporters.onnx as onnx_export

    run = onnx_export._run
    monkeypatch.setattr(onnx_export, "_run", lambda s, b: [o + 0.05 for o in run(s, b)])
    with pytest.raises(CompressorError, match="exceeds the tolerance"):
        export_onnx(model, tmp_path / "b.onnx", (_x(),))
    assert not (tmp_path / "b.onnx").exists()


def test_effect_is_not_measured_on_identical_inputs():
    x = torch.ones(2, 1, 8, 8)
    assert effect.input_effect(ZeroHead().eval(), [(x,), (x[:1],)]) is None
    assert not effect.is_constant(None, 1.0)
    assert effect.is_constant(0.0, 1.0) and not effect.is_constant(1e-3, 1.0)
