"""What BAR and magnitude channel pruning share after the decision: slim, fine-tune, report."""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import TYPE_CHECKING

from torch import nn
from torch.utils.data import DataLoader

from compressor.errors import InputError
from compressor.examples import example_inputs_of
from compressor.methods.bar.gates import GateUnit
from compressor.methods.phases import Phase, finetune_phase, step_lambda
from compressor.stats import measure
from compressor.surgery import SlimResult, slim_
from compressor.surgery.cost import CostModel
from compressor.surgery.fit import Fit
from compressor.surgery.pricing import Pricer
from compressor.surgery.streams import stream_name, unmixable_streams
from compressor.train import recalibrate_batchnorm_, sgd

if TYPE_CHECKING:
    from compressor.budget import Budget

RESIDUAL_MODES = ("mixed", "tied")


def with_residual(config, metric: str):
    """`config` with its residual mode checked, or chosen by the budget's metric when None:
    tied under latency (mixed joins run slowly in onnxruntime, so mixed networks reached 1.3-
    1.6x where ResNet-20/56 asked for 2x: bench/RESULTS.md latency), else mixed (the BAR
    supplement's blocks)."""
    if config.residual is None:
        return dataclasses.replace(config, residual="tied" if metric == "latency" else "mixed")
    if config.residual not in RESIDUAL_MODES:
        modes = ", ".join(RESIDUAL_MODES)
        raise InputError(f"residual {config.residual!r}: choose one of {modes} (or none)")
    return config


def excluder(patterns: tuple[str, ...]):
    """fqn -> True when a user's --exclude glob matches it."""
    return lambda fqn: any(fnmatch.fnmatchcase(fqn, p) for p in patterns)


def example_of(model: nn.Module, example_inputs) -> tuple:
    """The example inputs given, else a seeded random batch of `model.input_shape`."""
    return example_inputs_of(model, example_inputs, "channel pruning")


def tied_fallback(model: nn.Module, costs: CostModel, example: tuple, residual: str, excluded):
    """{group id: report line} for the residual streams mixed mode must tie; {} when tied.

    Mixed mode is kept wherever it is exact; a stream it cannot slim exactly keeps one channel
    set for all its producers (tied) instead of refusing the whole model.
    """
    if residual != "mixed":
        return {}
    groups = costs.analysis.groups
    refused = unmixable_streams(model, groups, example, excluded)
    return {
        gid: f"stream {stream_name(groups[gid])} is tied: mixed channels would not be exact ({why})"
        for gid, why in refused.items()
    }


def slim_model(model: nn.Module, keep: dict, example: tuple, residual: str) -> SlimResult:
    """`surgery.slim_` with the model's input_shape carried over to the slimmed model."""
    shape = getattr(model, "input_shape", None)
    result = slim_(model, keep, example, residual=residual)
    if shape is not None and getattr(result.model, "input_shape", None) is None:
        result.model.input_shape = shape
    return result


def slimmed_finetune_phase(model: nn.Module, loader: DataLoader, cfg, distill) -> Phase:
    """BatchNorm re-estimated on the slimmed model, then its fine-tuning phase (BAR's phases
    2 and 3): a constant lr, then lr * lowlr_factor for the last lowlr_fraction of the steps.

    Shared by BAR and its magnitude baseline so both get the same training after pruning.
    Modifies `model`'s BatchNorm statistics in place.
    """
    recalibrate_batchnorm_(model, loader, max_batches=cfg.bn_batches)
    drop = round(cfg.finetune_epochs * len(loader) * (1.0 - cfg.lowlr_fraction))
    return finetune_phase(
        model,
        loader,
        epochs=cfg.finetune_epochs,
        optimizer=sgd(model.parameters(), cfg.lr, cfg.momentum, cfg.weight_decay),
        lr_factor=step_lambda(drop, cfg.lowlr_factor),
        distill=distill,
    )


def structured_report(
    name: str,
    config: dict,
    budget: Budget,
    pricer: Pricer,
    slimmed: SlimResult,
    example: tuple,
    adjustment: Fit,
    tied_equivalent: dict[str, int],
) -> dict:
    """The report of a slimmed model: requested vs achieved budget, channels per layer.

    `pricer` prices the budget's metric (its CostModel gives the rest).
    `tied_equivalent` is the predicted cost of the same decision built with tied streams
    (each keeping the union of its producers' channels): what mixed blocks save. It must
    be priced before slimming, which changes the layers the cost model's plan reads.
    """
    stats = measure(slimmed.model, example)
    costs, dense = pricer.costs, pricer.dense()
    counted = {"volume": stats.volume, "flops": stats.flops}
    # latency: the table's prediction of the decision (the exported graph is timed later)
    achieved = counted.get(budget.metric, adjustment.after)
    kept = {row.fqn: row.channels for row in stats.layers if row.fqn in costs.layers}
    dense_volume, dense_flops = costs.dense("volume"), costs.dense("flops")
    report = {
        "method": name,
        "config": config,
        "budget": budget.to_dict(),
        "requested": {"metric": budget.metric, "keep": budget.keep, "target": budget.keep * dense},
        "achieved": {
            "metric": budget.metric,
            "keep": achieved / dense,
            "volume": stats.volume,
            "flops": stats.flops,
            "volume_factor": dense_volume / stats.volume,
            "flops_factor": dense_flops / stats.flops,
            "params": stats.params,
            "memory": stats.memory,
            "sparsity": stats.sparsity,  # zero weights left in the slimmed layers
        },
        "dense": {"volume": dense_volume, "flops": dense_flops},
        "budget_step": {
            "keep_before": adjustment.before / dense,
            "removed": adjustment.removed,
            "restored": adjustment.restored,
        },
        "layers": [
            {"fqn": fqn, "channels": layer.out_channels, "kept": kept.get(fqn, layer.out_channels)}
            for fqn, layer in costs.layers.items()
        ],
        "residual": slimmed.report.get("residual"),
        "joins": slimmed.report.get("joins", 0),
        "tied_equivalent": {k: tied_equivalent[k] for k in ("volume", "flops")},
    }
    report["achieved"] |= pricer.report(adjustment.after)
    if adjustment.miss:
        report["miss"] = adjustment.miss  # check_target's message says it (no report is written)
    return report


def own_counts(units: list[GateUnit]) -> dict[int, int]:
    """Per group id, how many units hold a producer's own channels (mixed streams)."""
    counts: dict[int, int] = {}
    for unit in units:
        if unit.own is not None:
            counts[unit.group.id] = counts.get(unit.group.id, 0) + 1
    return counts


def budget_note(adj: Fit, dense_cost: float) -> str:
    """The report's word on the budget step: what the gates reached and what it moved."""
    floor = f" (every layer keeps {adj.floor:.3g} of its channels or more)" if adj.floor else ""
    if not (adj.removed or adj.restored):
        return "the gates alone met the budget" + floor
    return (
        f"the gates reached keep {adj.before / dense_cost:.4f}; the budget step removed "
        f"{adj.removed} channels with the lowest and restored {adj.restored} with the highest "
        f"log alpha{floor}"
    )
