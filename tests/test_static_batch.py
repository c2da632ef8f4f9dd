"""A .pt2 exported at a fixed batch (no dynamic_shapes) lifts into a model for any batch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor.budget import Budget
from compressor.errors import InputError
from compressor.io import TO_PT2_HINT, load_model
from compressor.methods import get_method, list_methods, prune
from compressor.train import evaluate, train_dense
from exporters.csr import export_csr
from exporters.onnx import export_onnx
from tests.conftest import exporter_for
from tests.models import FoldedBatchNet, ViewFlattenNet


@pytest.fixture(scope="module")
def view_net(digits) -> torch.nn.Module:
    torch.manual_seed(0)
    model = ViewFlattenNet()
    train_dense(model, digits.train, epochs=1)
    return model.eval()


@pytest.fixture(scope="module", params=[1, 2], ids=["batch1", "batch2"])
def static_pt2(request, tmp_path_factory, view_net, digits) -> Path:
    """Exported the way users do: torch.export.export(model.eval(), (x,)), no dynamic shapes."""
    batch = request.param
    program = torch.export.export(view_net, (digits.sample_inputs(batch),))
    frozen = [n.args[1] for n in program.graph.nodes if n.target == torch.ops.aten.view.default]
    assert frozen == [[batch, -1]], "the export must freeze the batch, or this tests nothing"
    path = tmp_path_factory.mktemp("static") / f"view-b{batch}.pt2"
    torch.export.save(program, str(path))
    return path


def _run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_lifted_outputs_equal_the_eager_model_at_other_batches(static_pt2, view_net):
    lifted = load_model(static_pt2).model
    for batch in (5, 1, 3):
        x = torch.randn(batch, 1, 8, 8)
        torch.testing.assert_close(lifted(x), view_net(x), rtol=0, atol=1e-6)


def test_info_eval_and_prune_succeed(static_pt2, view_net, digits, tmp_path):
    info = _run("info", static_pt2, "--json")
    assert info.exit_code == 0, info.output
    params = sum(p.numel() for p in view_net.parameters())
    assert json.loads(info.output)["stats"]["params"] == params

    evaluated = _run("eval", static_pt2, "--data", "digits", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["top1"] == pytest.approx(evaluate(view_net, digits.test))

    out = tmp_path / "pruned.pt2"
    pruned = _run(
        "prune", static_pt2, "--method", "magnitude-global", "--sparsity", "0.5",
        "--data", "digits", "-o", out, "--json",
    )  # fmt: skip
    assert pruned.exit_code == 0, pruned.output
    model = load_model(out).model
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    weights = [model.get_submodule(n).weight for n in ("conv", "fc")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.5, abs=0.005)


def test_dynamic_exports_are_left_alone(tmp_path, view_net):
    x = torch.randn(2, 1, 8, 8)
    dynamic = ({0: torch.export.Dim("batch")},)
    path = tmp_path / "dyn.pt2"
    torch.export.save(torch.export.export(view_net, (x,), dynamic_shapes=dynamic), str(path))
    lifted = load_model(path).model
    sizes = [n for n in lifted.graph.nodes if n.target == torch.ops.aten.sym_size.int]
    assert len(sizes) == 1, "one sym_size from the export itself, none added"
    torch.testing.assert_close(lifted(torch.randn(7, 1, 8, 8)).shape, torch.Size([7, 10]))


def test_the_export_hint_shows_a_dynamic_batch():
    assert 'dynamic_shapes=({0: torch.export.Dim("batch")},)' in TO_PT2_HINT


@pytest.mark.parametrize("batch", [1, 2])
def test_a_batch_that_cannot_be_freed_is_bad_input_with_the_fix(tmp_path, batch):
    model = FoldedBatchNet().eval()
    path = tmp_path / "folded.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(batch, 1, 8, 8),)), str(path))
    result = _run("info", path)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"Error: '{path}' was exported with its batch fixed at {batch} and fails at batch "
    )
    assert 'dynamic_shapes=({0: torch.export.Dim("batch")},)' in lines[0]


# --- the "Users' models" contract: every method and both exporters on the lifted model ---

RUNS = [(name, {}) for name in list_methods()] + [("gss", {"variant": "structure"})]


@pytest.fixture(scope="module")
def lifted_batch1(tmp_path_factory, view_net, digits) -> torch.nn.Module:
    program = torch.export.export(view_net, (digits.sample_inputs(1),))
    path = tmp_path_factory.mktemp("static-contract") / "view-b1.pt2"
    torch.export.save(program, str(path))
    return load_model(path).model


@pytest.mark.parametrize(
    "method,config", RUNS, ids=lambda v: v if isinstance(v, str) else "-".join(v.values())
)
def test_every_method_and_exporter_on_a_batch1_export(
    method, config, lifted_batch1, small_digits, tmp_path
):
    cls = get_method(method)
    # FLOPs for structured methods: 2 of the 4 conv channels halve them exactly
    structured = config.get("variant") == "structure" or "flops" in cls.metrics
    metric = "flops" if structured else cls.metrics[0]
    try:
        result = prune(
            lifted_batch1, method, Budget(metric, 0.5), small_digits, **cls.smoke_config, **config
        )
    except InputError as exc:  # the CLI's exit 2: it must say which module and why
        assert re.search(r"'[\w.]+'", str(exc)) and "internal error" not in str(exc), str(exc)
        return
    x = small_digits.sample_inputs(5)  # neither the export batch (1) nor the probe's
    assert result.model(x).shape == (5, 10)
    onnx = export_onnx(result.model, tmp_path / "m.onnx", (x,), exporter=exporter_for(method))
    assert onnx.verified and onnx.max_abs_diff <= onnx.tolerance
    pack = export_csr(result.model, tmp_path / "m.csr.safetensors", (x,))
    assert pack.verification.exact_weights and pack.verification.max_output_diff == 0.0
