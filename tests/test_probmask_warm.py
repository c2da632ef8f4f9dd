"""ProbMask from a trained model: the warm start, its constraint, count and accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from cli.main import cli
from compressor.budget import Budget
from compressor.distill import train_loader
from compressor.errors import InputError
from compressor.lift import clone_model
from compressor.masks import apply_masks_, prunable_layers, strip_
from compressor.methods import prune
from compressor.methods.phases import masked_finetune_phase, train
from compressor.methods.probmask import ProbMask
from compressor.methods.probmask.warm import magnitude_scores
from compressor.train import evaluate


def _flat_scores(method: ProbMask) -> torch.Tensor:
    return torch.cat([s.detach().flatten() for s in method.score_parameters()])


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.05, 0.01])
def test_magnitude_scores_rank_as_magnitude_and_meet_the_budget(keep):
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(40, 30, generator=generator), 3 * torch.randn(7, 5, generator=generator)]
    weights[0][0, :5] = 0.0  # exact zeros score (near) 0, not NaN
    scores = magnitude_scores(weights, keep, sharpness=4.0)
    flat_s = torch.cat([s.flatten() for s in scores]).double()
    flat_w = torch.cat([w.abs().flatten() for w in weights])
    assert [s.shape for s in scores] == [w.shape for w in weights]
    assert float(flat_s.sum()) == pytest.approx(keep * flat_s.numel(), rel=1e-5)
    assert float(flat_s.min()) >= 0.0 and float(flat_s.max()) <= 1.0
    order = torch.argsort(flat_w)
    assert bool((flat_s[order].diff() >= 0).all())  # monotone in |w| across both layers


def test_warm_start_keeps_the_global_constraint_and_is_magnitude_global(lenet5_digits):
    model = clone_model(lenet5_digits)
    method = ProbMask(model, Budget("weights", 0.1), epochs=0, finetune_epochs=0)
    method.prepare()
    scores = _flat_scores(method)
    n = scores.numel()
    assert float(scores.sum(dtype=torch.float64)) == pytest.approx(0.1 * n, rel=1e-4)
    # the first projection finds nothing to change: the warm start is already feasible
    method.step(0.0)
    assert float(_flat_scores(method).sum(dtype=torch.float64)) == pytest.approx(0.1 * n, rel=1e-4)
    # the final mask without training is exactly global magnitude's, count included
    result = method.finalize()
    expected = prune(lenet5_digits, "magnitude-global", 0.9).model
    for fqn, layer in prunable_layers(result.model).items():
        got = layer.weight != 0
        want = dict(expected.named_modules())[fqn].weight != 0
        assert torch.equal(got, want), fqn
    assert result.report["achieved"]["zeros"] == n - round(0.1 * n)


def test_from_scratch_reproduces_the_papers_start(lenet5_digits):
    method = ProbMask(clone_model(lenet5_digits), Budget("weights", 0.1), from_scratch=True)
    method.prepare()
    assert bool((_flat_scores(method) == 1.0).all())  # score_init, every weight kept
    assert method.scheduled_keep(0.1) == 1.0  # the keep schedule starts at 1 ...
    assert method.scheduled_keep(0.6) == pytest.approx(0.1)  # ... and reaches the target
    assert method.score_optimizer.param_groups[0]["lr"] == 6e-3  # the official score lr
    warm = ProbMask(clone_model(lenet5_digits), Budget("weights", 0.1))
    assert warm.scheduled_keep(0.0) == warm.scheduled_keep(0.5) == pytest.approx(0.1)
    warm.prepare()
    assert warm.score_optimizer.param_groups[0]["lr"] == warm.config.warm_score_lr == 0.05


def _magnitude_plus_finetune(model, digits, sparsity: float, seed: int) -> float:
    """Global magnitude, then ProbMask's own fine-tuning (1 epoch, mask fixed)."""
    torch.manual_seed(seed)
    pruned = prune(model, "magnitude-global", sparsity).model
    layers = prunable_layers(pruned)
    apply_masks_(layers, {f: m.weight.detach() != 0 for f, m in layers.items()})
    cfg = ProbMask.Config(finetune_epochs=1)
    loader = train_loader(digits, cfg.batch_size)
    train(masked_finetune_phase(pruned, loader, cfg, None))
    return evaluate(strip_(pruned).eval(), digits.test)


def test_one_plus_one_epochs_is_not_below_magnitude_plus_finetune(lenet5_digits, digits):
    baseline = _magnitude_plus_finetune(lenet5_digits, digits, 0.9, seed=0)
    result = prune(lenet5_digits, "probmask", 0.9, digits, epochs=1, finetune_epochs=1)
    top1 = evaluate(result.model, digits.test)
    # 2 points: the noise of 360 test images; the paper's start lost ~25 points here
    assert top1 >= baseline - 0.02, (top1, baseline)
    n = result.report["achieved"]["total"]
    assert result.report["achieved"]["zeros"] == n - round(0.1 * n)
    assert result.report["probmask"]["score_lr"] == pytest.approx(0.05)  # 18 steps: unscaled


def test_warm_score_lr_falls_with_the_run_length(lenet5_digits, digits):
    short = ProbMask(clone_model(lenet5_digits), Budget("weights", 0.1), epochs=1)
    next(short.phases(digits))  # knows its loader: the score steps
    assert short.score_steps == len(train_loader(digits, 64)) <= 200  # digits' one epoch
    assert short.score_lr() == pytest.approx(0.05)  # the lr as configured
    long = ProbMask(clone_model(lenet5_digits), Budget("weights", 0.1), warm_score_steps=10)
    long.score_steps = 40
    assert long.score_lr() == pytest.approx(0.05 * 10 / 40)
    scratch = ProbMask(clone_model(lenet5_digits), Budget("weights", 0.1), from_scratch=True)
    scratch.score_steps = 40
    assert scratch.score_lr() == pytest.approx(6e-3)  # the paper's, never scaled


def test_bad_sharpness_is_refused(lenet5_digits):
    with pytest.raises(InputError, match="warm_sharpness -1.0"):
        ProbMask(lenet5_digits, Budget("weights", 0.1), warm_sharpness=-1.0)
    with pytest.raises(InputError, match="warm_score_steps 0 must be at least 1"):
        ProbMask(lenet5_digits, Budget("weights", 0.1), warm_score_steps=0)


def test_cli_from_scratch_flag(tmp_path, lenet5_pt2):
    report = tmp_path / "report.json"
    args = ["--quiet", "prune", str(lenet5_pt2), "--sparsity", "0.9", "--data", "digits"]
    args += ["--epochs", "0", "--finetune-epochs", "0", "-o", str(tmp_path / "out.pt2")]
    run = CliRunner().invoke(
        cli, [*args, "--method", "probmask", "--from-scratch", "--report", str(report)]
    )
    assert run.exit_code == 0, run.output
    assert json.loads(report.read_text())["config"]["from_scratch"] is True
    bad = CliRunner().invoke(cli, [*args, "--method", "gmp", "--from-scratch", "--force"])
    assert bad.exit_code == 2
    assert "has no option --from-scratch" in bad.output
