"""ProbMask (METHODS.md §2): projection oracle, constraint during training, exact target."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy import stats
from torch import nn

from cli.main import cli
from compressor.budget import Budget
from compressor.distill import train_loader
from compressor.io import save_model
from compressor.masks import has_machinery
from compressor.methods import prune
from compressor.methods.probmask import (
    ProbMask,
    keep_fraction,
    logistic_noise,
    project_scores_,
    relaxed_masked_weight,
    temperature,
)
from compressor.zoo import build

EPS = 1e-20


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, 2 threads make small ops ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sort_projection(s: np.ndarray, budget: float) -> np.ndarray:
    """Oracle: the exact projection onto {0 <= x <= 1, sum(x) <= budget} via sorted breakpoints.

    The projection is clip(s - v, 0, 1) with v >= 0 the root of f(v) = sum(clip(s - v, 0, 1))
    = budget. f is linear between consecutive breakpoints {s_i, s_i - 1}: evaluate it at
    every sorted breakpoint, find the segment that brackets the budget, interpolate.
    """
    s = s.astype(np.float64)

    def f(v: float) -> float:
        return float(np.clip(s - v, 0.0, 1.0).sum())

    if f(0.0) <= budget:
        return np.clip(s, 0.0, 1.0)
    points = np.unique(np.concatenate([s, s - 1.0, [0.0]]))
    points = points[points >= 0.0]
    values = np.array([f(p) for p in points])
    j = int(np.nonzero(values <= budget)[0][0])  # f(points[0] = 0) > budget, so j >= 1
    left, right = points[j - 1], points[j]
    v = left + (values[j - 1] - budget) * (right - left) / (values[j - 1] - values[j])
    return np.clip(s - v, 0.0, 1.0)


def _cases():
    rng = np.random.default_rng(0)
    for i in range(40):
        n = int(rng.integers(1, 400))
        yield f"random{i}", rng.normal(0.5, 0.7, n), float(rng.uniform(0.01, 1.0))
    yield "all-ones", np.ones(300), 0.1
    yield "all-ones-k1", np.ones(50), 1.0
    yield "feasible", rng.uniform(0, 1, 200) * 0.2, 0.5
    yield "outside-box-but-feasible-sum", np.concatenate([np.full(10, 1.5), np.full(90, -0.3)]), 0.5
    yield "one-kept", rng.uniform(0, 1, 100), 0.01
    yield "ties", np.repeat([0.2, 0.6, 0.9], 50), 0.3


@pytest.mark.parametrize(("scores", "keep"), [pytest.param(s, k, id=n) for n, s, k in _cases()])
def test_projection_equals_sort_oracle(scores, keep):
    # split into three "layers" of different sizes: the projection is one global problem
    flat = torch.tensor(scores, dtype=torch.float32)
    cuts = [len(flat) // 3, len(flat) // 2]
    layers = [t.clone() for t in torch.tensor_split(flat, cuts)]
    v = project_scores_(layers, keep)
    expected = sort_projection(flat.numpy(), keep * len(flat))
    got = torch.cat(layers).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    assert v >= 0.0
    assert got.sum() <= keep * len(flat) + 1e-3


def test_keep_schedule_hand_values():
    # k = 1 before 0.16 E; target + (1 - target)(1 - (p - 0.16)/0.44)^3 until 0.6 E
    assert keep_fraction(0.0, 0.1, 0.16, 0.6) == 1.0
    assert keep_fraction(0.159, 0.1, 0.16, 0.6) == 1.0
    assert keep_fraction(0.16, 0.1, 0.16, 0.6) == pytest.approx(1.0)
    assert keep_fraction(0.38, 0.1, 0.16, 0.6) == pytest.approx(0.1 + 0.9 * 0.5**3)  # 0.2125
    assert keep_fraction(0.49, 0.05, 0.16, 0.6) == pytest.approx(0.05 + 0.95 * 0.25**3)
    assert keep_fraction(0.6, 0.1, 0.16, 0.6) == 0.1
    assert keep_fraction(1.0, 0.1, 0.16, 0.6) == 0.1


def test_temperature_hand_values():
    assert temperature(0.0, 1.0, 0.03) == 1.0
    assert temperature(0.5, 1.0, 0.03) == pytest.approx(0.515)
    assert temperature(1.0, 1.0, 0.03) == pytest.approx(0.03)


def test_noise_has_the_distribution_of_the_official_gumbel_difference():
    torch.manual_seed(0)
    u0, u1 = torch.rand(200_000), torch.rand(200_000)
    official = -torch.log(torch.log(u0 + EPS) / torch.log(u1 + EPS) + EPS)
    ours = logistic_noise(torch.empty(200_000), EPS)
    result = stats.ks_2samp(official.numpy(), ours.numpy())
    assert result.pvalue > 1e-3, result
    assert stats.kstest(ours.numpy(), "logistic").pvalue > 1e-3


@pytest.mark.parametrize("s", [0.05, 0.3, 0.5, 0.8, 0.97])
def test_sampled_mask_is_bernoulli_s_as_tau_goes_to_zero(s):
    torch.manual_seed(1)
    n = 100_000
    mask = relaxed_masked_weight(torch.ones(n), torch.full((n,), s), 0.01, EPS)
    frequency = float((mask > 0.5).float().mean())
    assert abs(frequency - s) < 4.0 * math.sqrt(s * (1 - s) / n) + 1e-3
    assert float(((mask > 0.01) & (mask < 0.99)).float().mean()) < 0.05  # nearly discrete


def test_hand_written_backward_equals_autograd_of_the_official_formula():
    torch.manual_seed(2)
    scores = torch.cat([torch.rand(500), torch.tensor([0.0, 1.0, 1e-7, 1 - 1e-7])])
    weight, upstream = torch.randn_like(scores), torch.randn_like(scores)
    for tau in (1.0, 0.3, 0.03):
        s1, w1 = scores.clone().requires_grad_(), weight.clone().requires_grad_()
        s2, w2 = scores.clone().requires_grad_(), weight.clone().requires_grad_()
        torch.manual_seed(3)
        out = relaxed_masked_weight(w1, s1, tau, EPS)
        (out * upstream).sum().backward()
        torch.manual_seed(3)
        g = torch.logit(torch.rand_like(s2), eps=EPS)
        logit = torch.log(s2 + EPS) - torch.log(1.0 - s2 + EPS)
        reference = w2 * torch.sigmoid((logit + g) / tau)
        (reference * upstream).sum().backward()
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-4, atol=1e-5)


# --- the method on a small model --------------------------------------------------------


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 64, 32),
        nn.ReLU(),
        nn.Linear(32, 10),
    )


# the paper's start: this test checks its keep schedule (the warm start's is in test_probmask_warm)
FAST = {"epochs": 2, "finetune_epochs": 1, "mask_samples": 2, "from_scratch": True}


def test_constraint_holds_after_every_step_and_target_is_exact(digits):
    method = ProbMask(_cnn(), Budget("weights", 0.1), **FAST)
    loader = train_loader(digits, method.config.batch_size)
    checks = []
    original_step = method.step

    def checked_step(progress: float) -> None:
        original_step(progress)
        scores = torch.cat([s.detach().flatten() for s in method.score_parameters()])
        keep = keep_fraction(progress, 0.1, 0.16, 0.6)
        checks.append((float(scores.sum(dtype=torch.float64)), keep * scores.numel()))
        assert float(scores.min()) >= 0.0 and float(scores.max()) <= 1.0

    method.step = checked_step  # the phases take `method.step` when they are built
    result = method.run(digits)
    assert len(checks) == FAST["epochs"] * len(loader)
    for total, budget in checks:
        assert total <= budget + 1e-3
    assert checks[-1][0] == pytest.approx(checks[-1][1], abs=1e-3)  # the budget binds
    n = result.report["achieved"]["total"]
    assert abs(result.report["achieved"]["zeros"] - (n - round(0.1 * n))) <= 1


def test_scores_cost_one_float_per_prunable_weight_and_vanish_in_finalize(digits):
    model = _cnn()
    method = ProbMask(model, Budget("weights", 0.2), epochs=0, finetune_epochs=0)
    method.prepare()
    scores = method.score_parameters()
    prunable = sum(m.parametrizations.weight.original.numel() for m in method.layers.values())
    assert sum(s.numel() for s in scores) == prunable
    assert all(s.dtype == torch.float32 for s in scores)
    result = method.finalize()
    assert has_machinery(result.model) == []
    names = [n for n, _ in result.model.named_parameters()] + list(result.model.state_dict())
    assert not [n for n in names if "scores" in n or "parametrizations" in n]
    assert all(type(m).__module__.startswith("torch.nn") for m in result.model.modules())


def test_prune_reaches_target_within_one_weight_and_copies(digits):
    model = _cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = prune(model, "probmask", 0.95, digits, epochs=1, finetune_epochs=0, mask_samples=1)
    zeros, n = result.report["achieved"]["zeros"], result.report["achieved"]["total"]
    assert abs(zeros - (n - round(0.05 * n))) <= 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert result.report["probmask"]["score_sum"] == pytest.approx(0.05 * n, abs=1e-2)


def test_mask_choices(digits):
    method = ProbMask(_cnn(), Budget("weights", 0.3), epochs=0)
    method.prepare()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s in method.score_parameters():
            s.copy_(torch.rand(s.shape, generator=generator))
    scores = {f: p.scores.detach().clone() for f, p in method.probs.items()}
    n = sum(s.numel() for s in scores.values())

    threshold = ProbMask(_cnn(), Budget("weights", 0.3), mask="threshold")
    threshold.probs = method.probs
    masks, _ = threshold.choose_masks(None)
    assert all(torch.equal(masks[f], scores[f] >= 0.5) for f in scores)

    masks, _ = method.choose_masks(None)  # topk: exactly round(0.3 n), largest scores
    assert sum(int(m.sum()) for m in masks.values()) == round(0.3 * n)
    kept_min = min(float(scores[f][masks[f]].min()) for f in scores)
    dropped_max = max(float(scores[f][~masks[f]].max()) for f in scores)
    assert kept_min >= dropped_max

    best = ProbMask(_cnn(), Budget("weights", 0.3), mask="best-of-n", mask_draws=4)
    best.probs, best.model, best.layers = method.probs, method.model, method.layers
    masks, draws = best.choose_masks(train_loader(digits, 64))
    assert len(draws) == 4
    kept = sum(int(m.sum()) for m in masks.values())
    assert abs(kept - 0.5 * n) < 5 * math.sqrt(n)  # Bernoulli(s) with mean(s) ~ 0.5


def test_topk_breaks_score_ties_by_magnitude():
    method = ProbMask(_cnn(), Budget("weights", 0.25), epochs=0, from_scratch=True)
    method.prepare()  # all scores 1.0: top-k by s alone would be arbitrary
    masks, _ = method.choose_masks(None)
    flat_w = torch.cat(
        [
            m.parametrizations.weight.original.detach().abs().flatten()
            for m in method.layers.values()
        ]
    )
    flat_m = torch.cat([masks[f].flatten() for f in method.layers])
    assert float(flat_w[flat_m].min()) >= float(flat_w[~flat_m].max())


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="mask 'bogus'"):
        ProbMask(_cnn(), Budget("weights", 0.1), mask="bogus")
    with pytest.raises(ValueError, match="mask_samples"):
        ProbMask(_cnn(), Budget("weights", 0.1), mask_samples=0)


def test_cli_prune_probmask(tmp_path, digits):
    torch.manual_seed(0)
    model = build("lenet5", in_channels=1, num_classes=10, input_size=(8, 8))
    path = tmp_path / "lenet5.pt2"
    save_model(model, path, example_inputs=(digits.sample_inputs(2),), report={"method": "dense"})
    out = tmp_path / "sparse.pt2"
    args = ["--quiet", "prune", str(path), "--method", "probmask", "--sparsity", "0.9"]
    args += ["--data", "digits", "--epochs", "1", "--finetune-epochs", "0", "--mask-samples", "1"]
    args += ["-o", str(out), "--json"]
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    assert out.exists()
    assert '"method": "probmask"' in run.output and '"mask_samples": 1' in run.output

    bad = CliRunner().invoke(cli, [*args[:-3], "--set", "mask=bogus"])
    assert bad.exit_code == 2
    assert "bogus" in bad.output
