"""Models returning a tuple or dict of tensors (a face detector's class and box heads) work
with every method, `info`, `eval` and both exporters."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from cli.main import cli
from compressor.budget import Budget
from compressor.errors import InputError
from compressor.io import load_model, save_model
from compressor.masks import has_machinery
from compressor.methods import get_method, list_methods, prune
from compressor.outputs import distill_loss, named_outputs, select_output, task_output
from compressor.surgery import channel_groups, mask_, slim_
from compressor.train import Distill, evaluate, kd_loss, task_loss, train_dense
from tests import models as toys
from tests.conftest import exporter_for

SPARSITY = 0.9
KINDS = ("tuple", "dict")


@pytest.fixture(scope="module")
def face_models(digits):
    """FaceStage trained 4 epochs on digits through its cls head: tuple and dict variants."""
    torch.manual_seed(0)
    model = toys.FaceStage()
    train_dense(model, digits.train, epochs=4, lr=0.1)  # ~85 % top-1 in ~2 s
    as_dict = toys.FaceStage(as_dict=True)
    as_dict.load_state_dict(model.state_dict())
    return {"tuple": model.eval(), "dict": as_dict.eval()}


@pytest.fixture(scope="module")
def face_pt2(face_models, digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("face")
    paths = {}
    for kind, model in face_models.items():
        paths[kind] = folder / f"face-{kind}.pt2"
        save_model(model, paths[kind], example_inputs=(digits.sample_inputs(2),))
    return paths


def _heads(out) -> dict[str, tuple]:
    return {name: tuple(t.shape[1:]) for name, t in named_outputs(out)}


# --- picking the task output -----------------------------------------------------------


def test_select_output_by_index_key_and_default():
    cls, box = torch.randn(2, 10), torch.randn(2, 4)
    assert select_output(cls) is cls
    assert select_output((cls, box)) is cls
    assert select_output((cls, box), 1) is box
    assert select_output((cls, box), "1") is box
    assert select_output((cls, box), -1) is box
    assert select_output({"cls": cls, "box": box}) is cls
    assert select_output({"cls": cls, "box": box}, "box") is box
    assert select_output({"cls": cls, "box": box}, 1) is box
    with task_output("box"):
        assert select_output({"cls": cls, "box": box}) is box
    assert select_output({"cls": cls, "box": box}) is cls


@pytest.mark.parametrize(
    ("out", "spec", "listed"),
    [
        (
            (torch.zeros(2, 10), torch.zeros(2, 4)),
            2,
            "0 ('0', shape [2, 10]), 1 ('1', shape [2, 4])",
        ),
        ({"cls": torch.zeros(2, 10), "box": torch.zeros(2, 4)}, "boxes", "'cls'"),
        (torch.zeros(2, 10), 1, "0 ('0', shape [2, 10])"),
    ],
)
def test_wrong_output_spec_lists_the_outputs(out, spec, listed):
    with pytest.raises(InputError, match="no output") as info:
        select_output(out, spec)
    assert listed in str(info.value) and "--task-output" in str(info.value)


def test_distill_loss_is_kd_on_the_task_output_and_mse_on_the_others():
    torch.manual_seed(0)
    s_cls, t_cls, s_box, t_box = (torch.randn(4, n) for n in (10, 10, 4, 4))
    single = distill_loss(s_cls, t_cls, 4.0)
    assert torch.equal(single, kd_loss(s_cls, t_cls, 4.0))
    both = distill_loss((s_cls, s_box), [t_cls, t_box], 4.0)
    assert torch.equal(both, kd_loss(s_cls, t_cls, 4.0) + F.mse_loss(s_box, t_box))
    on_box = distill_loss({"cls": s_cls, "box": s_box}, {"cls": t_cls, "box": t_box}, 4.0, "box")
    assert torch.equal(on_box, F.mse_loss(s_cls, t_cls) + kd_loss(s_box, t_box, 4.0))
    with pytest.raises(InputError, match="2 outputs but the teacher 1"):
        distill_loss((s_cls, s_box), [t_cls], 4.0)


def test_task_loss_distils_every_output_and_trains_the_task_one(face_models):
    torch.manual_seed(0)
    teacher, student = face_models["dict"], toys.FaceStage(as_dict=True).eval()
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 9, 1])
    distill = Distill(teacher, temperature=4.0, alpha=0.9)
    out, t = student(x), teacher(x)
    kd = kd_loss(out["cls"], t["cls"], 4.0) + F.mse_loss(out["box"], t["box"])
    want = 0.9 * kd + 0.1 * F.cross_entropy(out["cls"], y)
    torch.testing.assert_close(task_loss(out, y, x, distill), want, rtol=0, atol=0)
    torch.testing.assert_close(task_loss(out, y, x, None), F.cross_entropy(out["cls"], y))


def test_evaluate_reads_the_chosen_output(face_models, digits):
    model = face_models["dict"]
    top1 = evaluate(model, digits.test)
    assert top1 > 0.5  # trained through the cls head
    assert evaluate(face_models["tuple"], digits.test, 0) == top1
    with pytest.raises(InputError, match=r"output 1 \('box'\) has shape \[.*, 4\].*class logits"):
        evaluate(model, digits.test, "box")


# --- structured surgery keeps the heads -------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_surgery_pins_heads_and_slimmed_equals_masked(kind, face_models):
    model = toys.FaceStage(as_dict=kind == "dict")
    model.load_state_dict(face_models["tuple"].state_dict())
    x = (torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),)
    groups = channel_groups(model.eval(), x)
    heads = {m.fqn for g in groups for m in g.producers if m.fqn in {"cls", "box"}}
    assert heads == {"cls", "box"}
    for group in groups:
        if any(m.fqn in heads for m in group.producers):
            assert bool(group.fixed.all()) and "model output" in group.reasons
    keep, removed = {}, {}
    for group in (g for g in groups if g.prunable):
        mask = torch.ones(group.size, dtype=torch.bool)
        mask[1::2] = False  # half of every removable group's channels
        keep[group.id] = mask
        for member in group.producers:
            removed[member.fqn] = (~mask[member.index]).nonzero().flatten()
    assert set(removed) == {"features.0", "features.3", "features.6", "trunk.1"}
    reference = toys.masked_reference(model, removed)
    mask_(model, keep, x, norms=True)
    slimmed = slim_(model, keep, x).model
    fresh = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = slimmed(fresh), reference(fresh)
    heads = {"cls": (10,), "box": (4,)} if kind == "dict" else {"0": (10,), "1": (4,)}
    assert type(got) is type(want) and _heads(got) == _heads(want) == heads
    for (name, a), (_, b) in zip(named_outputs(got), named_outputs(want), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
    assert sum(p.numel() for p in slimmed.parameters()) < sum(
        p.numel() for p in reference.parameters()
    )


# --- every method, then both exporters ----------------------------------------------------


def _budget(metric: str) -> Budget:
    return Budget("weights", 1.0 - SPARSITY) if metric == "weights" else Budget(metric, 0.5)


# every method on its own metric, and GSS's structured variant (a FLOP budget) too
CASES = [(name, get_method(name).metrics[0]) for name in list_methods()] + [("gss", "flops")]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("method", "metric"), CASES, ids=[f"{m}-{b}" for m, b in CASES])
def test_every_method_and_exporter_on_multi_output(
    method, metric, kind, face_models, small_digits, tmp_path
):
    cls = get_method(method)
    model = face_models[kind]
    x = small_digits.sample_inputs(4)
    with torch.no_grad():
        dense_heads = _heads(model(x))
    result = prune(model, method, _budget(metric), small_digits, seed=0, **cls.smoke_config)
    pruned = result.model.eval()
    assert has_machinery(pruned) == []
    with torch.no_grad():
        out = pruned(x)
    assert type(out) is type(model(x)) and _heads(out) == dense_heads  # heads never slimmed
    assert all(torch.isfinite(t).all() for _, t in named_outputs(out))
    if metric == "weights":
        achieved = 1.0 - result.report["achieved"]["sparsity"]
    else:
        achieved = result.report["achieved"]["keep"]
        dense = sum(p.numel() for p in model.parameters())
        assert sum(p.numel() for p in pruned.parameters()) < dense  # channels really removed
    assert abs(achieved - _budget(metric).keep) <= 0.005, achieved

    path = save_model(pruned, tmp_path / "p.pt2", example_inputs=(x[:2],), report=result.report)
    runner = CliRunner()
    onnx_path, csr_path = tmp_path / "p.onnx", tmp_path / "p.csr"
    args = ["export", str(path), "--format", "onnx", "-o", str(onnx_path)]
    done = runner.invoke(cli, [*args, "--exporter", exporter_for(method)])
    assert done.exit_code == 0, done.output
    assert "max abs difference" in done.output
    names = [o.name for o in onnx.load(onnx_path).graph.output]
    assert names == (["cls", "box"] if kind == "dict" else ["output_0", "output_1"])
    done = runner.invoke(cli, ["export", str(path), "--format", "csr", "-o", str(csr_path)])
    assert done.exit_code == 0, done.output
    assert "outputs identical (max abs difference 0)" in done.output


# --- the CLI: prune --task-output, eval, info ---------------------------------------------


def test_cli_prune_and_eval_with_task_output(face_pt2, tmp_path):
    runner = CliRunner()
    out = tmp_path / "gmp.pt2"
    args = ["prune", str(face_pt2["dict"]), "-m", "gmp", "--sparsity", "0.5", "--data", "digits"]
    args += ["--epochs", "1", "--finetune-epochs", "0", "--task-output", "cls", "-o", str(out)]
    done = runner.invoke(cli, [*args, "--json"])
    assert done.exit_code == 0, done.output
    report = json.loads(done.output)
    assert report["config"]["output"] == "cls" and report["top1"] > 0.5
    done = runner.invoke(
        cli, ["eval", str(out), "--data", "digits", "--task-output", "0", "--json"]
    )
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["top1"] == pytest.approx(report["top1"])
    assert load_model(out).report["config"]["output"] == "cls"


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (["eval", "--data", "digits", "--task-output", "2"], "has no output 2; its outputs are 0"),
        (
            ["eval", "--data", "digits", "--task-output", "box"],
            "output 1 ('box') has shape [",
        ),
        (
            ["prune", "-m", "gmp", "--sparsity", "0.5", "--data", "digits", "--task-output", "x"],
            "has no output 'x'",
        ),
    ],
)
def test_cli_bad_task_output_is_exit_2_naming_the_outputs(command, message, face_pt2, tmp_path):
    args = [command[0], str(face_pt2["dict"]), *command[1:]]
    args += ["-o", str(tmp_path / "o.pt2")] if command[0] == "prune" else []
    done = CliRunner().invoke(cli, args)
    assert done.exit_code == 2, done.output
    assert message in done.output and "'cls'" in done.output
    assert "internal error" not in done.output
    assert not (tmp_path / "o.pt2").exists()


@pytest.mark.parametrize("kind", KINDS)
def test_cli_info_and_eval_accept_multi_output(kind, face_pt2, face_models, digits):
    runner = CliRunner()
    done = runner.invoke(cli, ["info", str(face_pt2[kind]), "--json"])
    assert done.exit_code == 0, done.output
    layers = {row["fqn"]: row for row in json.loads(done.output)["stats"]["layers"]}
    assert layers["cls"]["flops"] == 32 * 10 and layers["box"]["flops"] == 32 * 4
    done = runner.invoke(cli, ["eval", str(face_pt2[kind]), "--data", "digits", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["top1"] == evaluate(face_models[kind], digits.test)
