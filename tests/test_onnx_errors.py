"""An op torch.onnx cannot convert is reported by name, with its module path and a remedy."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor.errors import CompressorError, InputError
from compressor.io import save_model
from exporters.onnx import export_onnx
from exporters.onnx_errors import export_failure
from tests.models import CummaxNet, RunningMax

EXPECTED = (
    "ONNX export failed: op aten::cummax (in module 'body.2') has no ONNX conversion in "
    "opset {opset}; replace the op or try --exporter legacy"
)
NODE = (
    "Error when translating node %cummax : [num_users=1] = call_function[target="
    "torch.ops.aten.cummax.default](args = (%linear, 1), kwargs = {}). See the stack trace"
)


def _sample() -> tuple[torch.Tensor]:
    return (torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),)


def _chain(*messages: str) -> Exception:
    """An exception whose __cause__ chain carries `messages`, outermost first."""
    inner = None
    for message in reversed(messages):
        exc = RuntimeError(message)
        exc.__cause__ = inner
        inner = exc
    return inner


def test_cli_names_the_op_and_module_and_writes_nothing(tmp_path):
    model = tmp_path / "cummax.pt2"
    save_model(CummaxNet().eval(), model, example_inputs=_sample())
    out = tmp_path / "cummax.onnx"
    result = CliRunner().invoke(cli, ["export", str(model), "-o", str(out)])
    assert result.exit_code == 1
    opset = torch.onnx._constants.ONNX_DEFAULT_OPSET
    # auto tried the TorchScript exporter too, so the remedy no longer names it
    dynamo_part = EXPECTED.format(opset=opset).replace(" or try --exporter legacy", "")
    assert result.output.strip().startswith(f"Error: {dynamo_part}; the TorchScript exporter")
    assert "aten::cummax" in result.output.split("TorchScript exporter")[1]
    assert len(result.output.strip().splitlines()) == 1
    assert "Next steps" not in result.output and not out.exists()


def test_api_raises_with_the_requested_opset(tmp_path):
    with pytest.raises(CompressorError) as info:
        export_onnx(CummaxNet(), tmp_path / "m.onnx", _sample(), opset=18, exporter="dynamo")
    assert str(info.value) == EXPECTED.format(opset=18)
    assert not isinstance(info.value, InputError) and not (tmp_path / "m.onnx").exists()


def test_a_conversion_that_fails_inside_says_why():
    exc = _chain("Failed to convert. Next steps:", NODE, "aten_cummax needs a float input")
    message = str(export_failure(CummaxNet().eval(), _sample(), exc, None))
    assert message == (
        "ONNX export failed: op aten::cummax (in module 'body.2') could not be converted "
        "(aten_cummax needs a float input); replace the op or try --exporter legacy"
    )


def test_an_op_in_the_root_forward():
    exc = _chain("Failed. Next steps:", NODE, "no function")
    message = str(export_failure(RunningMax(), (torch.randn(2, 4),), exc, 17))
    assert "op aten::cummax (in the model's own forward) could not be converted" in message


def test_a_failure_that_is_not_an_op_gives_the_innermost_cause():
    exc = _chain("\x1b[96mStep 1/3\x1b[0m failed. Next steps:", "Dim 'batch' is specialized to 2")
    message = str(export_failure(CummaxNet(), _sample(), exc, None))
    assert message == "torch.onnx could not export CummaxNet: Dim 'batch' is specialized to 2"
