"""FCPTS and the erk-recon baseline: exact target, the bridge's gradient, untouched dense
weights, reproducibility, untraceable models, the lifecycle and the CLI."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.fx
from click.testing import CliRunner
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import DataLoader, TensorDataset

from cli.main import cli
from compressor import build_model, get_method, load_data, prune, save_model
from compressor.budget import parse_sparsity
from compressor.data import Data
from compressor.errors import InputError
from compressor.masks import has_machinery, prunable_layers, weight_of
from compressor.methods import fcpts
from compressor.methods.fcpts import exact_masks, initial_score
from compressor.methods.fcpts import recon as fcpts_recon
from compressor.methods.fcpts.bridge import layer_sparsity
from compressor.methods.magnitude import ErkMagnitude

FAST = {"steps": 12, "calib_samples": 128, "batch_size": 32}


class SmallCnn(nn.Sequential):
    """Conv-BN-ReLU x2 and a classifier: small, with BatchNorm, for 8x8 digits."""

    def __init__(self):
        super().__init__(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64, 32),
            nn.ReLU(),
            nn.Linear(32, 10),
        )


class DataDependentAttention(nn.Module):
    """Self-attention whose depth depends on the data: torch.fx cannot trace it."""

    def __init__(self, features: int = 8, dim: int = 16, classes: int = 4):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for _ in range(3):
            scores = self.query(h) @ self.key(h).transpose(1, 2) / math.sqrt(h.shape[-1])
            update = self.out(torch.softmax(scores, dim=-1) @ self.value(h))
            h = h + update
            if update.abs().mean() < 0.05:  # data-dependent early exit
                break
        return self.head(h.mean(dim=1))


def toy_sequences(count: int = 128) -> tuple[torch.Tensor, Data]:
    """Random 6x8 sequences for DataDependentAttention, as unlabelled Data."""
    x = torch.randn(count, 6, 8)
    loader = DataLoader(TensorDataset(x, torch.full((count,), -1)), batch_size=32)
    return x, Data(loader, None, None, (6, 8), None, "toy-sequences", has_labels=False)


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    return SmallCnn()


def _prunable_total(model: nn.Module) -> int:
    return sum(weight_of(m).numel() for m in prunable_layers(model).values())


def _zeros(model: nn.Module) -> int:
    return sum(int((weight_of(m) == 0).sum()) for m in prunable_layers(model).values())


# --- the exact target -----------------------------------------------------------------


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.95])
def test_fcpts_lands_on_the_target_within_one_weight(cnn, digits, sparsity):
    result = prune(cnn, "fcpts", sparsity, digits, **FAST)
    total = _prunable_total(cnn)
    assert abs(_zeros(result.model) - round(sparsity * total)) <= 1
    report = result.report
    assert report["achieved"]["zeros"] == _zeros(result.model)
    assert set(report["allocation"]) == {"erk", "learned", "final"}
    assert set(report["allocation"]["final"]) == set(prunable_layers(cnn))
    assert report["loss"]["steps"] == FAST["steps"]


def test_exact_step_breaks_ties_by_position_to_land_exactly():
    weights = {"a": torch.ones(10), "b": torch.full((6,), 2.0)}
    thresholds = {"a": 1.0, "b": 2.0}  # every ratio |W| / t is 1: thresholds cannot separate
    masks, factor, ties = exact_masks(weights, thresholds, keep_total=7)
    assert sum(int(m.sum()) for m in masks.values()) == 7
    assert factor == 1.0
    assert ties == 16 - 7
    assert masks["a"][:7].all() and not masks["a"][7:].any() and not masks["b"].any()


def test_exact_step_scales_every_threshold_by_one_factor():
    torch.manual_seed(0)
    weights = {"a": torch.randn(1000), "b": 3 * torch.randn(500)}
    thresholds = {"a": 0.5, "b": 1.5}
    masks, factor, ties = exact_masks(weights, thresholds, keep_total=600)
    assert ties == 0 and sum(int(m.sum()) for m in masks.values()) == 600
    for fqn, weight in weights.items():
        expected = weight.abs() >= thresholds[fqn] * factor
        assert torch.equal(masks[fqn], expected)


# --- the fixed cost: selection instead of sorts, the same results ---------------------


def _sorted_initial_score(weight: torch.Tensor, zeros: int, s_min: float, s_max: float) -> float:
    """initial_score as it was before selection replaced its sort: the reference."""
    magnitudes = torch.sort(weight.detach().abs().flatten().double()).values
    below = float(magnitudes[zeros - 1]) if zeros > 0 else 0.0
    above = float(magnitudes[zeros]) if zeros < magnitudes.numel() else 2.0 * below + 1e-30
    threshold = 0.5 * (below + above)
    if threshold <= 0.0:
        return s_min
    if threshold >= 1.0:
        return s_max
    return min(s_max, max(s_min, math.log(threshold) - math.log1p(-threshold)))


@pytest.mark.parametrize("zeros", [0, 1, 250, 777, 1000])
def test_initial_score_equals_the_sorted_reference(zeros):
    weight = torch.randn(40, 25, generator=torch.Generator().manual_seed(zeros)) * 0.05
    weight[0, :10] = weight[1, :10]  # duplicated magnitudes
    for w in (weight, weight * 40.0, torch.zeros(40, 25)):  # thresholds above 1; all zero
        assert initial_score(w, zeros, -30.0, 30.0) == _sorted_initial_score(w, zeros, -30.0, 30.0)


def test_fcpts_run_is_bit_identical_to_the_sorting_grad_keeping_code_path(cnn, digits, monkeypatch):
    """The optimised fixed part (selection for the initial thresholds, BN re-estimation without
    autograd) changes no bit."""
    fast = prune(cnn, "fcpts", 0.9, digits, seed=5, **FAST)
    recalibrate = fcpts_recon.recalibrate_batchnorm_

    def recalibrate_with_grad(model, loader):
        with torch.enable_grad():
            recalibrate(model, loader)

    monkeypatch.setattr(fcpts, "initial_score", _sorted_initial_score)
    monkeypatch.setattr(fcpts_recon, "recalibrate_batchnorm_", recalibrate_with_grad)
    reference = prune(cnn, "fcpts", 0.9, digits, seed=5, **FAST)
    for (name, a), (_, b) in zip(
        fast.model.state_dict().items(), reference.model.state_dict().items()
    ):
        assert torch.equal(a, b), name
    for key in ("allocation", "thresholds", "offset", "ties_broken_by_position", "loss"):
        assert fast.report[key] == reference.report[key], key


# --- the bridge -----------------------------------------------------------------------


def _gaussian(sigma: float, n: int = 400_000) -> torch.Tensor:
    return sigma * torch.randn(n, generator=torch.Generator().manual_seed(0))


def _bridge_slope(weights: torch.Tensor, t: float, **options) -> tuple[float, float]:
    threshold = torch.tensor(t, requires_grad=True)
    r = layer_sparsity(threshold, weights, **options)
    r.backward()
    return float(r.detach()), float(threshold.grad)


def _two_sided_gaussian(t: float, sigma: float) -> float:
    """d/dt erf(t / (sigma sqrt 2)) = 2 phi(t / sigma) / sigma."""
    return 2 * math.exp(-0.5 * (t / sigma) ** 2) / (math.sqrt(2 * math.pi) * sigma)


@pytest.mark.parametrize("ratio", [0.3, 1.0, 2.0])
def test_histogram_bridge_matches_gaussian_slope_and_finite_difference(ratio):
    sigma = 0.05
    weights = _gaussian(sigma)
    t = ratio * sigma
    r, slope = _bridge_slope(weights, t, density="histogram")
    assert r == pytest.approx(math.erf(t / (sigma * math.sqrt(2))), abs=3e-3)
    # a histogram returns the mean density of the bin holding t, which lies within one bin
    # width of t: allow that width times the density's steepest slope nearby, plus noise
    width = float(weights.max() - weights.min()) / 100
    steepest = max(abs(x) / sigma**2 for x in (t - width, t + width)) * _two_sided_gaussian(
        max(0.0, t - width), sigma
    )
    tolerance = width * steepest + 0.02 * _two_sided_gaussian(t, sigma)
    assert slope == pytest.approx(_two_sided_gaussian(t, sigma), abs=tolerance)
    h = 0.05 * sigma  # central difference of the empirical sparsity itself

    def sparsity(x):
        return float((weights.abs() < x).float().mean())

    finite_difference = (sparsity(t + h) - sparsity(t - h)) / (2 * h)
    assert slope == pytest.approx(finite_difference, abs=tolerance)


@pytest.mark.parametrize("ratio", [0.3, 1.0, 2.0])
def test_kde_bridge_matches_the_kernel_smoothed_gaussian(ratio):
    # a Gaussian KDE of N(0, 1) with bandwidth h in std units is N(0, 1 + h^2)
    sigma, bandwidth = 0.05, 0.5
    weights = _gaussian(sigma)
    _, slope = _bridge_slope(weights, ratio * sigma, density="kde", kde_bandwidth=bandwidth)
    wide = sigma * math.sqrt(1 + bandwidth**2)
    assert slope == pytest.approx(_two_sided_gaussian(ratio * sigma, wide), rel=0.05)


def test_control_loss_moves_thresholds_towards_the_target(cnn):
    method = get_method("fcpts")(copy.deepcopy(cnn), parse_sparsity(0.8))
    method.prepare()
    with torch.no_grad():  # push every threshold down: sparsity below target
        for mask in method._masks().values():
            mask.score -= 0.5
    before = float(method.global_sparsity().detach())
    method.penalty().backward()
    grads = [mask.score.grad for mask in method._masks().values()]
    assert before < 0.8
    assert all(g is not None and g <= 0 for g in grads) and any(g < 0 for g in grads)


# --- dense weights, reproducibility, lifecycle ------------------------------------------


def test_dense_weights_untouched_and_steps_zero_keeps_original_values(cnn, digits):
    original = copy.deepcopy(cnn.state_dict())
    method = get_method("fcpts")(copy.deepcopy(cnn), parse_sparsity(0.9), steps=0)
    result = method.run(digits)
    for name, value in cnn.state_dict().items():  # the input model
        assert torch.equal(value, original[name]), name
    for name, value in method.teacher.state_dict().items():  # the frozen teacher
        assert torch.equal(value, original[name]), name
    for fqn, module in prunable_layers(result.model).items():
        kept = module.weight != 0
        assert torch.equal(module.weight[kept], original[f"{fqn}.weight"][kept])


def test_reconstruction_changes_only_kept_weights_and_lowers_the_loss(cnn, digits):
    result = prune(cnn, "fcpts", 0.9, digits, steps=24, calib_samples=128, batch_size=32)
    loss = result.report["loss"]
    assert loss["reconstruction_curve"][-1] < loss["reconstruction_curve"][0]
    assert loss["reconstruction_last_epoch"] < loss["reconstruction_first_epoch"]
    changed = [
        fqn
        for fqn, m in prunable_layers(result.model).items()
        if not torch.equal(
            m.weight[m.weight != 0], weight_of(dict(cnn.named_modules())[fqn])[m.weight != 0]
        )
    ]
    assert changed  # the reconstruction did train the kept weights


def test_same_seed_gives_identical_results(cnn, digits):
    first = prune(cnn, "fcpts", 0.9, digits, seed=3, **FAST)
    second = prune(cnn, "fcpts", 0.9, digits, seed=3, **FAST)
    for (name, a), (_, b) in zip(
        first.model.state_dict().items(), second.model.state_dict().items()
    ):
        assert torch.equal(a, b), name
    assert first.report["allocation"] == second.report["allocation"]


def test_finalize_leaves_a_plain_module_with_the_original_state(cnn, digits):
    result = prune(cnn, "fcpts", 0.9, digits, density="kde", **FAST)
    assert not has_machinery(result.model)
    assert list(result.model.state_dict()) == list(cnn.state_dict())
    assert sum(p.numel() for p in result.model.parameters()) == sum(
        p.numel() for p in cnn.parameters()
    )
    assert result.report["config"]["density"] == "kde"


def test_lifecycle_installs_threshold_parametrizations_at_erk(cnn):
    method = get_method("fcpts")(copy.deepcopy(cnn), parse_sparsity(0.9))
    method.prepare()
    assert all(parametrize.is_parametrized(m, "weight") for m in method.layers.values())
    assert len(method.param_groups()[1]["params"]) == len(method.layers)
    assert method.param_groups()[1]["weight_decay"] == 0.0
    assert float(method.global_sparsity().detach()) == pytest.approx(0.9, abs=1e-3)
    result = method.finalize()
    assert not has_machinery(result.model)
    assert result.report["allocation"]["learned"] == pytest.approx(method.erk, abs=1e-9)


def test_unknown_density_is_refused(cnn):
    with pytest.raises(InputError, match="density"):
        get_method("fcpts")(cnn, parse_sparsity(0.9), density="parzen")


# --- an untraceable model -------------------------------------------------------------


def test_fcpts_on_an_attention_model_torch_fx_cannot_trace():
    torch.manual_seed(0)
    model = DataDependentAttention()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    x, data = toy_sequences()
    result = prune(model, "fcpts", 0.8, data, **FAST)
    assert abs(_zeros(result.model) - round(0.8 * _prunable_total(model))) <= 1
    assert not has_machinery(result.model)
    assert result.model(x[:4]).shape == (4, 4)


# --- the erk-recon baseline -----------------------------------------------------------


def test_erk_recon_keeps_the_erk_masks_fixed(cnn, digits):
    result = prune(cnn, "erk-recon", 0.9, digits, **FAST)
    erk = ErkMagnitude(copy.deepcopy(cnn), parse_sparsity(0.9)).compute_masks()
    for fqn, module in prunable_layers(result.model).items():
        assert torch.equal(module.weight != 0, erk[fqn]), fqn
    assert result.report["loss"]["steps"] == FAST["steps"]


# --- the CLI --------------------------------------------------------------------------


def test_cli_prune_with_fcpts_reports_the_allocation(tmp_path, digits):
    torch.manual_seed(0)
    model = build_model("lenet5", in_channels=1, num_classes=10, input_size=(8, 8))
    path = tmp_path / "lenet5.pt2"
    save_model(model, path, example_inputs=(digits.sample_inputs(2),), report={"method": "dense"})
    out = tmp_path / "sparse.pt2"
    args = ["--quiet", "prune", str(path), "--method", "fcpts", "--sparsity", "0.9"]
    args += ["--data", "digits", "--steps", "20", "--calib-samples", "128", "--json"]
    args += ["-o", str(out)]
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout)
    total = report["achieved"]["total"]
    assert abs(report["achieved"]["zeros"] - round(0.9 * total)) <= 1
    assert set(report["allocation"]) == {"erk", "learned", "final"}
    assert report["config"]["steps"] == 20 and report["method"] == "fcpts"
    assert out.exists()


def test_cli_refuses_an_unknown_density(tmp_path):
    run = CliRunner().invoke(
        cli, ["prune", "x.pt2", "--method", "fcpts", "--sparsity", "0.9", "--density", "parzen"]
    )
    assert run.exit_code == 2
    assert "parzen" in run.output
