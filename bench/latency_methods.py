"""The rows of the latency benchmark: our structured methods and Torch-Pruning, each pruned
at a FLOP reduction factor (the knob the speed-up search turns), on a probe schedule (just
enough training to take the decision) or the full one (the same epochs for every method).
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import nn

from compressor import budget as budget_module
from compressor import zoo
from compressor.budget import Budget
from compressor.distill import train_loader
from compressor.errors import CompressorError
from compressor.lift import clone_model
from compressor.methods import get_method, prune
from compressor.methods.bar.slim import slimmed_finetune_phase
from compressor.methods.channel_magnitude import ChannelMagnitudeConfig
from compressor.methods.phases import train
from compressor.train import Distill

# row name -> (registered method, fixed options)
OURS = {
    "BAR-mixed": ("bar", {"residual": "mixed"}),
    "BAR-tied": ("bar", {"residual": "tied"}),
    "channel-magnitude": ("channel-magnitude", {"residual": "mixed"}),
    "GSS-structured": ("gss", {"variant": "structure"}),
}
TP = "Torch-Pruning"
METHODS = (*OURS, TP)
ALIGN = 8  # channel multiple for the aligned rows (TP's round_to, ours' round_to)
TP_MAX_RATIO = 0.95  # Torch-Pruning keeps at least 5 % of each layer's channels here


class TorchPruningMissing(CompressorError):
    """torch-pruning is not installed (it is an optional extra, not a dependency)."""


def require_torch_pruning():
    """The torch_pruning module, or an error that says how to install it."""
    try:
        import torch_pruning
    except ImportError:
        raise TorchPruningMissing(
            "bench.latency compares against Torch-Pruning 1.6.1, which is not installed; "
            "pip install -e '.[bench]' (or pip install --no-deps torch-pruning==1.6.1), "
            f"or leave it out with --methods {','.join(OURS)}"
        ) from None
    return torch_pruning


def takes_latency(method: str) -> bool:
    """Whether the toolkit and `method` accept a latency budget (branch cost-engine)."""
    return "latency" in budget_module.METRICS and "latency" in get_method(method).metrics


def takes_round_to(method: str) -> bool:
    """Whether `method`'s config has a round_to field (branch cost-engine)."""
    return any(f.name == "round_to" for f in dataclasses.fields(get_method(method).Config))


def align_of(name: str, align: int) -> int | None:
    """The round_to a row runs with: `align`, 1 (off), or None when the method cannot align."""
    if align <= 1 or name == TP:
        return align
    return align if takes_round_to(OURS[name][0]) else None


def schedule(name: str, epochs: int, probe: bool) -> dict:
    """Training options: `epochs` in all after pruning starts (every method the same), or
    the probe schedule, which trains only what the decision needs (phase 1 of BAR / GSS)."""
    method = OURS[name][0] if name in OURS else "tp"
    if method in ("bar", "gss"):
        # GSS: bench.bar's 3 + 2 split. BAR, whose gates learn on fixed weights: a third for
        # the gates (1 + 2 at 3 epochs beat 2 + 1 by 2.8 / 8.2 points tied / mixed, RESULTS
        # bar_short), the rest for fine-tuning, where the points come back
        gates = round(epochs / 3) if method == "bar" else epochs - round(0.4 * epochs)
        first = 1 if probe else max(1, min(epochs - 1, gates))
        finetune = 0 if probe else epochs - first
        options = {"epochs": first, "finetune_epochs": finetune}
        return options | ({"bn_batches": 2} if probe and method == "bar" else {})
    return {"finetune_epochs": 0 if probe else epochs} | ({"bn_batches": 2} if probe else {})


def prune_ours(name: str, dense: nn.Module, data, budget: Budget, options: dict, **extra):
    """One of OURS pruned to `budget` through compressor.prune (its own schedule): the
    Result, its model in eval mode. `options` may override the row's fixed ones (e.g. a
    tied channel-magnitude row); `extra` goes to prune() (e.g. `measure_latency`)."""
    method, fixed = OURS[name]
    result = prune(dense, method, budget, data, **(fixed | options), **extra)
    result.model.eval()
    return result


def tp_ratio(factor: float) -> float:
    """Torch-Pruning's uniform pruning ratio for a nominal FLOP factor: FLOPs ~ (1 - r)^2."""
    return min(TP_MAX_RATIO, 1.0 - factor**-0.5)


def rebuild(dense: nn.Module, arch: str, shape) -> nn.Module:
    """A plain zoo model with the dense weights (Torch-Pruning traces eager modules)."""
    model = zoo.build(arch, in_channels=shape[0], input_size=tuple(shape[1:]), num_classes=10)
    model.load_state_dict(dense.state_dict())
    return model.eval()


def prune_tp(dense: nn.Module, arch: str, shape, factor: float, align: int) -> nn.Module:
    """Torch-Pruning's MagnitudePruner (L2, DepGraph) at the uniform ratio of `factor`."""
    tp = require_torch_pruning()
    model = rebuild(dense, arch, shape)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(
        model,
        torch.zeros(1, *shape),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=tp_ratio(factor),
        ignored_layers=[head],
        round_to=align if align > 1 else None,
        iterative_steps=1,
    )
    pruner.step()
    return model.eval()


def finetune_tp_(model: nn.Module, dense: nn.Module, data, epochs: int) -> None:
    """Channel-magnitude's training after pruning, on Torch-Pruning's slimmed model. In place."""
    cfg = ChannelMagnitudeConfig(finetune_epochs=epochs)
    loader = train_loader(data, cfg.batch_size)
    distill = Distill(clone_model(dense).eval(), cfg.temperature, cfg.alpha)
    train(slimmed_finetune_phase(model, loader, cfg, distill))


def build_row_model(
    name: str, dense, data, arch: str, factor: float, *, align: int, epochs: int, probe: bool
) -> tuple[nn.Module, dict]:
    """(model, info) of row `name` at FLOP factor `factor`; info says how it was made."""
    start = time.perf_counter()
    info: dict = {"flops_request": round(factor, 4)}
    if name == TP:
        model = prune_tp(dense, arch, data.input_shape, factor, align)
        info["pruning_ratio"] = round(tp_ratio(factor), 4)
        if not probe:
            finetune_tp_(model, dense, data, epochs)
    else:
        options = schedule(name, epochs, probe)
        options |= {"round_to": align} if align > 1 else {}
        model = prune_ours(name, dense, data, Budget("flops", 1.0 / factor), options).model
    info["train_s"] = round(time.perf_counter() - start, 1)
    return model, info


def build_latency_model(
    name, dense, data, target: float, *, align: int, epochs: int, measure=None, extra=None
):
    """(model, info) of row `name` pruned straight to a latency budget, checked on the
    exported graph by `measure` (exporters.latency.graph_measurer) as `compress prune` does;
    `extra`: more method options (e.g. min_keep)."""
    options = schedule(name, epochs, probe=False) | ({"round_to": align} if align > 1 else {})
    options |= extra or {}
    start = time.perf_counter()
    budget = Budget("latency", 1.0 / target)
    result = prune_ours(name, dense, data, budget, options, measure_latency=measure)
    refits = (result.report.get("latency") or {}).get("refits", 0)
    info = {"latency_request": target, "refits": refits}
    return result.model, info | {"train_s": round(time.perf_counter() - start, 1)}
