"""SparseGPT: the layer solve against brute-force OBS and least squares, unfolded conv
inputs against the conv itself, exact targets, reproducibility, untraceable models, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.fx
from click.testing import CliRunner
from torch import nn

from cli.main import cli
from compressor import get_method, prune, zoo
from compressor.budget import parse_sparsity
from compressor.errors import CompressorError, InputError
from compressor.masks import has_machinery, prunable_layers, weight_of
from compressor.methods.magnitude import erk_counts
from compressor.methods.sparsegpt import SparseGpt, call_profile, hessians
from compressor.methods.sparsegpt.solve import (
    block_zero_counts,
    grouped_weight,
    hinv_upper,
    layer_inputs,
    obs_saliency,
    sparsegpt_solve,
)
from tests.test_fcpts import DataDependentAttention, toy_sequences

DAMP = 0.01


def _problem(rows: int = 3, columns: int = 6, samples: int = 50, seed: int = 0):
    """A weight and correlated inputs X [columns, samples] (float64)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=g, dtype=torch.float64)
    x = mixing @ torch.randn(columns, samples, generator=g, dtype=torch.float64)
    return torch.randn(rows, columns, generator=g, dtype=torch.float64), x


def _dampened(h: torch.Tensor) -> torch.Tensor:
    return h + DAMP * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)


def _brute_force_obs(weight: torch.Tensor, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Explicit OBS, one weight at a time, with SparseGPT's set of free weights.

    Visiting columns left to right, the weights still free to move are those of the
    columns not yet visited; a pruned weight q is removed with `delta = -w_q / [H_F^-1]_qq
    * H_F^-1[:, q]`, inverting the restricted Hessian `H_F` explicitly every time.
    """
    out = weight.clone()
    columns = weight.shape[1]
    for r in range(weight.shape[0]):
        for j in range(columns):
            free = list(range(j, columns))
            hinv = torch.linalg.inv(h[free][:, free])
            if not keep[r, j]:
                out[r, free] -= out[r, j] / hinv[0, 0] * hinv[:, 0]
    return out


def _least_squares_without(w: torch.Tensor, x: torch.Tensor, q: int) -> tuple[torch.Tensor, float]:
    """The best w' with w'_q = 0 for ||(w - w') X||^2, and that error (brute force)."""
    others = [i for i in range(len(w)) if i != q]
    target = w @ x
    solution = torch.linalg.lstsq(x[others].T, target.unsqueeze(1)).solution.squeeze(1)
    best = torch.zeros_like(w)
    best[others] = solution
    return best, float(((target - best @ x) ** 2).sum())


# --- the layer solve: oracles -----------------------------------------------------------


@pytest.mark.parametrize("blocksize", [1, 4, 128])
def test_fixed_mask_update_equals_brute_force_obs(blocksize):
    weight, x = _problem()
    h = x @ x.T
    keep = torch.ones_like(weight, dtype=torch.bool)
    keep[0, [0, 3]] = keep[1, [1, 2, 5]] = keep[2, 4] = False
    upper, _ = hinv_upper(h.unsqueeze(0), DAMP)
    pruned, mask = sparsegpt_solve(weight[None], upper, keep=keep[None], blocksize=blocksize)
    expected = _brute_force_obs(weight, _dampened(h), keep)
    torch.testing.assert_close(pruned[0], expected, rtol=0, atol=1e-5)
    assert torch.equal(mask[0], keep) and bool((pruned[0][~keep] == 0).all())


def test_obs_choice_equals_the_best_single_removal_with_least_squares_compensation():
    weight, x = _problem(rows=4)
    hinv = torch.linalg.inv(x @ x.T)
    for w in weight:
        errors = [_least_squares_without(w, x, q)[1] for q in range(len(w))]
        saliency = obs_saliency(w, torch.diagonal(hinv))
        assert int(saliency.argmin()) == min(range(len(w)), key=errors.__getitem__)
        # OBS's saliency is the compensated error itself, not only its ranking
        torch.testing.assert_close(saliency, torch.tensor(errors, dtype=saliency.dtype))


def test_pruning_the_first_column_compensates_by_least_squares():
    """With every other weight still free, the solve's update is the least-squares optimum."""
    weight, x = _problem(rows=1)
    keep = torch.ones_like(weight, dtype=torch.bool)
    keep[0, 0] = False
    upper, _ = hinv_upper((x @ x.T).unsqueeze(0), 0.0)
    pruned, _ = sparsegpt_solve(weight[None], upper, keep=keep[None], blocksize=2)
    best, _ = _least_squares_without(weight[0], x, 0)
    torch.testing.assert_close(pruned[0, 0], best, rtol=0, atol=1e-8)


def test_reconstruction_error_beats_magnitude_at_the_same_count():
    weight, x = _problem(rows=8, columns=16, samples=200)
    model = nn.Sequential(nn.Linear(16, 8, bias=False))
    model[0].weight.data = weight.float()
    inputs = x.T.float()
    magnitude = prune(model, "magnitude-uniform", 0.5).model  # a copy: before the solve
    method = SparseGpt(model, parse_sparsity(0.5), blocksize=4)
    method.prune_(inputs)

    def error(layer: nn.Linear) -> float:
        return float(((inputs @ (weight.float() - layer.weight.detach()).T) ** 2).sum())

    assert int((model[0].weight == 0).sum()) == int((magnitude[0].weight == 0).sum()) == 64
    assert error(model[0]) < 0.8 * error(magnitude[0])
    assert method.finalize().report["relative_error"]["0"] < 0.5


def test_block_counts_add_up_exactly_and_spread_evenly():
    counts = block_zero_counts(groups=3, rows=5, columns=10, zeros=101, blocksize=4)
    assert counts.shape == (3, 3) and int(counts.sum()) == 101
    share = 101 / 150
    sizes = torch.tensor([20, 20, 10] * 3).reshape(3, 3)
    assert bool(((counts - share * sizes).abs() < 1).all())


def test_dead_inputs_are_pruned_first_and_the_rest_left_alone():
    weight, x = _problem(rows=2, columns=6)
    x[2] = 0.0  # input feature 2 is never nonzero
    upper, dead = hinv_upper((x @ x.T).unsqueeze(0), DAMP)
    assert dead[0].tolist() == [False, False, True, False, False, False]
    counts = block_zero_counts(1, 2, 6, 1, 6)
    pruned, keep = sparsegpt_solve(weight[None], upper, counts, blocksize=6, dead=dead)
    assert int((~keep).sum()) == 1 and not bool(keep[0, 0, 2]) and bool(keep[0, 1, 2])
    assert float(pruned[0, 1, 2]) == float(weight[1, 2])  # decoupled: untouched


def test_an_indefinite_hessian_is_a_clear_error():
    hessian = torch.tensor([[[1.0, 2.0], [2.0, 1.0]]], dtype=torch.float64)
    with pytest.raises(CompressorError, match="percdamp"):
        hinv_upper(hessian, 0.0)


# --- unfolded conv inputs reproduce the conv ---------------------------------------------


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1),
        nn.Conv2d(4, 6, (3, 2), padding="same", dilation=2, padding_mode="reflect"),
        nn.Conv2d(4, 8, 3, padding=1, groups=2),
        nn.Conv2d(6, 6, 3, padding=1, groups=6),  # depthwise
        nn.Conv1d(4, 6, 3, stride=2, padding=2, padding_mode="circular"),
        nn.Linear(5, 3),
    ],
    ids=["conv", "same-reflect", "groups", "depthwise", "conv1d", "linear"],
)
def test_grouped_weight_times_unfolded_inputs_is_the_layer(conv):
    torch.manual_seed(0)
    if isinstance(conv, nn.Linear):
        x, expected = torch.randn(2, 4, 5), None
        expected = (conv(x) - conv.bias).reshape(-1, 3).T  # [O, n]
    else:
        spatial = (9,) if isinstance(conv, nn.Conv1d) else (9, 8)
        x = torch.randn(2, conv.in_channels, *spatial)
        out = conv(x) - conv.bias.view(-1, *[1] * len(spatial))
        expected = out.transpose(0, 1).reshape(conv.out_channels, -1)  # [O, batch * L]
    product = grouped_weight(conv) @ layer_inputs(conv, x)  # [G, O/G, n]
    torch.testing.assert_close(product.reshape(expected.shape), expected, rtol=1e-5, atol=1e-5)


# --- whole models -------------------------------------------------------------------------


def _zeros_and_total(model: nn.Module) -> tuple[int, int]:
    layers = prunable_layers(model).values()
    return sum(int((weight_of(m) == 0).sum()) for m in layers), sum(
        weight_of(m).numel() for m in layers
    )


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.95])
def test_exact_target_on_lenet5(lenet5_digits, small_digits, sparsity):
    result = prune(lenet5_digits, "sparsegpt", sparsity, small_digits, calib_samples=64)
    zeros, total = _zeros_and_total(result.model)
    assert zeros == round(sparsity * total)
    method = SparseGpt(lenet5_digits, parse_sparsity(sparsity))
    for fqn, module in prunable_layers(result.model).items():
        assert int((module.weight == 0).sum()) == method.layer_zeros()[fqn], fqn
    assert result.report["uncalibrated"] == []
    assert result.report["layer_order"] == list(prunable_layers(lenet5_digits))


def test_erk_allocation_gives_each_layer_its_erk_count(lenet5_digits, small_digits):
    result = prune(
        lenet5_digits, "sparsegpt", 0.9, small_digits, calib_samples=64, allocation="erk"
    )
    keep = erk_counts(prunable_layers(lenet5_digits), 0.9, 0.1)
    for fqn, module in prunable_layers(result.model).items():
        assert int((module.weight != 0).sum()) == keep[fqn], fqn
    with pytest.raises(InputError, match="allocation 'global' is not one of uniform, erk"):
        SparseGpt(lenet5_digits, parse_sparsity(0.9), allocation="global")


def test_exact_target_on_mobilenetv2_depthwise(small_digits):
    torch.manual_seed(0)
    model = zoo.build("mobilenetv2", in_channels=1, num_classes=10, input_size=8).eval()
    result = prune(model, "sparsegpt", 0.9, small_digits, calib_samples=32)
    zeros, total = _zeros_and_total(result.model)
    assert zeros == round(0.9 * total)
    depthwise = [m for m in prunable_layers(result.model).values() if getattr(m, "groups", 1) > 1]
    assert depthwise and all(m.groups == m.in_channels for m in depthwise)


def test_conv1d_and_a_layer_never_called():
    torch.manual_seed(0)
    model = nn.Module()
    model.body = nn.Sequential(nn.Conv1d(3, 8, 5, padding=2), nn.ReLU(), nn.Flatten())
    model.head = nn.Linear(96, 4)
    model.unused = nn.Linear(7, 5)  # never called: solved with H = I (magnitude)
    model.forward = lambda x: model.head(model.body(x))
    method = SparseGpt(model, parse_sparsity(0.7), blocksize=16)
    dense_unused = model.unused.weight.detach().clone()
    method.prune_(torch.randn(40, 3, 12))
    assert method.solved["uncalibrated"] == ["unused"]
    zeros, total = _zeros_and_total(model)
    assert zeros == round(0.7 * total)
    kept = model.unused.weight != 0
    assert torch.equal(model.unused.weight[kept], dense_unused[kept])
    assert float(dense_unused[kept].abs().min()) >= float(dense_unused[~kept].abs().max())


def test_same_seed_same_model_and_nothing_left_behind(lenet5_digits, small_digits):
    first = prune(lenet5_digits, "sparsegpt", 0.9, small_digits, calib_samples=64).model
    second = prune(lenet5_digits, "sparsegpt", 0.9, small_digits, calib_samples=64).model
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    assert has_machinery(first) == []
    assert list(first.state_dict()) == list(lenet5_digits.state_dict())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in first.modules())


def test_sequential_mode_changes_the_inputs_later_layers_see(lenet5_digits, small_digits):
    one_pass = prune(
        lenet5_digits, "sparsegpt", 0.9, small_digits, calib_samples=64, sequential=False
    )
    sequential = prune(lenet5_digits, "sparsegpt", 0.9, small_digits, calib_samples=64)
    first, last = list(prunable_layers(lenet5_digits))[0], list(prunable_layers(lenet5_digits))[-1]
    assert torch.equal(
        weight_of(prunable_layers(one_pass.model)[first]),
        weight_of(prunable_layers(sequential.model)[first]),
    )
    assert not torch.equal(
        weight_of(prunable_layers(one_pass.model)[last]),
        weight_of(prunable_layers(sequential.model)[last]),
    )


def test_stopping_after_the_layer_gives_the_same_hessian(lenet5_digits, small_digits):
    inputs = small_digits.sample_inputs(64)
    layers = prunable_layers(lenet5_digits)
    order, once = call_profile(lenet5_digits, layers, inputs, 32)
    assert once and order == list(layers)
    fqn = order[1]
    full = hessians(lenet5_digits, {fqn: layers[fqn]}, inputs, 32)[fqn]
    stopped = hessians(lenet5_digits, {fqn: layers[fqn]}, inputs, 32, stop=True)[fqn]
    assert torch.equal(full, stopped)
    torch.manual_seed(0)
    repeated = DataDependentAttention()
    _, once = call_profile(repeated, prunable_layers(repeated), torch.randn(8, 6, 8), 4)
    assert not once  # its attention layers run up to three times per forward


def test_on_an_attention_model_torch_fx_cannot_trace():
    torch.manual_seed(0)
    model = DataDependentAttention()
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    x, data = toy_sequences()
    result = prune(model, "sparsegpt", 0.8, data, calib_samples=64)
    zeros, total = _zeros_and_total(result.model)
    assert zeros == round(0.8 * total)
    assert result.report["uncalibrated"] == []
    assert result.model(x[:4]).shape == (4, 4)


def test_bad_options_are_input_errors(lenet5_digits):
    with pytest.raises(InputError, match="blocksize"):
        SparseGpt(lenet5_digits, parse_sparsity(0.9), blocksize=0)
    with pytest.raises(InputError, match="percdamp"):
        SparseGpt(lenet5_digits, parse_sparsity(0.9), percdamp=-1.0)
    with pytest.raises(CompressorError, match="before finalize"):
        SparseGpt(lenet5_digits, parse_sparsity(0.9)).finalize()


# --- the CLI --------------------------------------------------------------------------------


def test_cli_prune_with_sparsegpt(tmp_path, lenet5_pt2):
    out = tmp_path / "sparse.pt2"
    args = ["--quiet", "prune", str(lenet5_pt2), "--method", "sparsegpt", "--sparsity", "0.9"]
    args += ["--data", "digits", "--calib-samples", "128", "--json", "-o", str(out)]
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 0, run.output
    report = json.loads(run.stdout)
    assert report["achieved"]["zeros"] == round(0.9 * report["achieved"]["total"])
    assert report["method"] == "sparsegpt" and report["calibration_samples"] == 128
    assert report["top1"] > 0.5 and out.exists()


def test_cli_refuses_a_negative_dampening(tmp_path, lenet5_pt2):
    args = ["prune", str(lenet5_pt2), "--method", "sparsegpt", "--sparsity", "0.9"]
    args += ["--data", "digits", "--set", "percdamp=-0.5", "-o", str(tmp_path / "o.pt2")]
    run = CliRunner().invoke(cli, args)
    assert run.exit_code == 2, run.output
    assert "percdamp -0.5 must be >= 0" in run.output


# --- FCPTS's allocation with SparseGPT's layer solve (`reconstruct="obs"`) ------------------


def test_fcpts_obs_keeps_the_learned_counts_and_solves_on_the_dense_weights(
    lenet5_digits, small_digits
):
    fast = {"steps": 8, "calib_samples": 64, "batch_size": 32}
    threshold = prune(lenet5_digits, "fcpts", 0.9, small_digits, **fast)
    obs = prune(lenet5_digits, "fcpts", 0.9, small_digits, reconstruct="obs", **fast)
    for fqn, module in prunable_layers(obs.model).items():
        other = prunable_layers(threshold.model)[fqn]
        assert int((module.weight == 0).sum()) == int((other.weight == 0).sum()), fqn
    assert obs.report["allocation"] == threshold.report["allocation"]
    assert set(obs.report["obs"]["relative_error"]) == set(prunable_layers(lenet5_digits))
    zeros, total = _zeros_and_total(obs.model)
    assert zeros == round(0.9 * total) and has_machinery(obs.model) == []
    # the solve starts from the dense weights: SparseGPT at these counts gives the same model
    solver = SparseGpt(copy.deepcopy(lenet5_digits), parse_sparsity(0.9), batch_size=32)
    inputs = torch.cat([x for x, _ in small_digits.calibration(64, 32)])
    counts = {f: int((m.weight == 0).sum()) for f, m in prunable_layers(obs.model).items()}
    solver.prune_(inputs, counts)
    for fqn, module in prunable_layers(solver.model).items():
        torch.testing.assert_close(module.weight, prunable_layers(obs.model)[fqn].weight)


def test_fcpts_refuses_an_unknown_reconstruction(lenet5_digits):
    with pytest.raises(InputError, match="reconstruct 'lbfgs' is not one of threshold, obs"):
        get_method("fcpts")(lenet5_digits, parse_sparsity(0.9), reconstruct="lbfgs")
