"""GSS's option checks: which variant a budget and config ask for, and what they refuse."""

from __future__ import annotations

from typing import TYPE_CHECKING

from compressor.errors import InputError
from compressor.surgery.fit import check_min_keep, check_round_to

if TYPE_CHECKING:
    from compressor.budget import Budget
    from compressor.methods.gss import GssConfig

VARIANTS = ("auto", "element", "structure")
REGULARISERS = ("gss", "lasso", "l2", "exclusive-lasso", "group-lasso", "none")
CHOICES = {
    "variant": VARIANTS,
    "regulariser": REGULARISERS,
    "norms": ("212", "121"),
    "prune": ("budget", "threshold"),
    "rank": ("magnitude", "std"),
    "optimiser": ("adam", "sgd"),
}


def check_config(cfg: GssConfig, budget: Budget) -> str:
    """Validates the choices; returns the variant the budget and config ask for."""
    for field, allowed in CHOICES.items():
        if getattr(cfg, field) not in allowed:
            raise InputError(
                f"gss: {field} {getattr(cfg, field)!r}; choose one of {', '.join(allowed)}"
            )
    if cfg.pattern is not None and cfg.prune == "threshold":
        raise InputError(f"gss: --pattern {cfg.pattern} needs prune=budget (the ranked cut)")
    if (cfg.p > 0) != (cfg.q > 0) or cfg.p < 0 or cfg.q < 0:
        raise InputError("gss: give both --p and --q (> 0) for the auxiliary form, or neither")
    if cfg.lambda_ < 0 or cfg.ratio <= 0 or cfg.eps < 0:
        raise InputError("gss: --lambda and eps must be >= 0 and ratio > 0")
    check_round_to(cfg.round_to)
    check_min_keep(cfg.min_keep)
    variant = cfg.variant
    if variant == "auto":
        variant = "structure" if budget.metric in ("flops", "latency") else "element"
    if variant == "element" and cfg.round_to not in (None, 1):
        raise InputError(
            f"gss: round_to {cfg.round_to} aligns channel counts, which only the structure "
            "variant removes; drop --round-to or give --budget NX (FLOPs)"
        )
    # the hints restate the user's own budget in the form the variant takes
    if variant == "element" and budget.metric != "weights":
        raise InputError(
            f"gss --variant element prunes weights, not {budget.metric}: "
            f"give --sparsity {budget.sparsity:.4g}"
        )
    if variant == "structure" and budget.metric not in ("flops", "latency"):
        raise InputError(
            f"gss --variant structure removes channels to a FLOP or latency budget, not "
            f"{budget.metric}: "
            f"give --budget {budget.factor:.4g}x (FLOPs is the default for this variant)"
        )
    return variant
