"""Gradual magnitude pruning (Zhu & Gupta 2017): the cubic schedule and the exact target."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compressor.budget import Budget
from compressor.distill import train_loader
from compressor.masks import has_machinery
from compressor.methods import prune
from compressor.methods.gmp import GradualMagnitude, zhu_gupta_sparsity


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, 2 threads make small ops ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def test_zhu_gupta_hand_values():
    # s_t = s_f + (s_i - s_f)(1 - t/n)^3
    assert zhu_gupta_sparsity(0, 4, 0.0, 0.9) == pytest.approx(0.0)
    assert zhu_gupta_sparsity(1, 4, 0.0, 0.9) == pytest.approx(0.9 - 0.9 * 0.75**3)  # 0.5203
    assert zhu_gupta_sparsity(2, 4, 0.0, 0.9) == pytest.approx(0.7875)
    assert zhu_gupta_sparsity(4, 4, 0.0, 0.9) == pytest.approx(0.9)
    assert zhu_gupta_sparsity(9, 4, 0.0, 0.9) == pytest.approx(0.9)  # flat after the ramp
    assert zhu_gupta_sparsity(2, 4, 0.5, 0.9) == pytest.approx(0.9 - 0.4 * 0.125)


def test_updates_fall_on_the_ramp():
    method = GradualMagnitude(_cnn(), Budget("weights", 0.1), start=0.2, end=0.6, updates=4)
    assert method.update_index(0.19) == -1
    assert method.update_index(0.2) == 0
    assert method.update_index(0.3) == 1  # (0.3 - 0.2) / 0.4 * 4 = 1
    assert method.update_index(0.59) == 3
    assert method.update_index(0.6) == 4
    assert method.update_index(1.0) == 4
    assert method.scheduled_keep(2) == pytest.approx(1.0 - 0.7875)
    assert method.scheduled_keep(4) == 0.1


def test_sparsity_follows_the_schedule_and_pruned_weights_stay_pruned(digits):
    method = GradualMagnitude(_cnn(), Budget("weights", 0.1), epochs=2, updates=5)
    loader = train_loader(digits, method.config.batch_size)
    seen = []
    original_step = method.step

    def checked_step(progress: float) -> None:
        original_step(progress)
        effective = torch.cat([m.weight.detach().flatten() for m in method.layers.values()])
        kept = effective != 0
        if seen:
            assert not (kept & ~seen[-1][1]).any(), "a pruned weight came back"
        if method.update >= 0:
            expected = round(method.scheduled_keep(method.update) * effective.numel())
            assert int(kept.sum()) <= expected
        seen.append((progress, kept))

    method.step = checked_step
    result = method.run(digits)
    assert len(seen) == 2 * len(loader)
    assert method.update == 5
    n = result.report["achieved"]["total"]
    assert result.report["achieved"]["zeros"] == n - round(0.1 * n)
    assert has_machinery(result.model) == []


def test_prune_is_exact_even_when_training_ends_before_the_ramp(digits):
    model = _cnn()
    result = prune(model, "gmp", 0.95, digits, epochs=0, finetune_epochs=0)
    n = result.report["achieved"]["total"]
    assert result.report["achieved"]["zeros"] == n - round(0.05 * n)
    assert result.report["method"] == "gmp"
    flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.dim() > 1])
    assert int((flat == 0).sum()) == 0  # the caller's model is untouched


def test_mask_is_global_magnitude(digits):
    model = _cnn()
    result = prune(model, "gmp", 0.8, digits, epochs=0, finetune_epochs=0)
    dense = torch.cat(
        [
            m.weight.detach().abs().flatten()
            for m in model
            if hasattr(m, "weight") and m.weight.dim() > 1
        ]
    )
    sparse = torch.cat(
        [
            m.weight.detach().flatten()
            for m in result.model
            if hasattr(m, "weight") and m.weight.dim() > 1
        ]
    )
    kept = sparse != 0
    assert float(dense[kept].min()) >= float(dense[~kept].max())
