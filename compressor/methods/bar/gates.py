"""BAR's gates: Hard Concrete per channel, the barrier, the budget transition (METHODS.md §3).

The math (`hard_concrete_sample`, `hard_concrete_test`, `prob_nonzero`, `barrier`,
`transition`) is in plain functions so tests can check it against hand values. `GateUnit`
holds one log-alpha vector and the layers it gates; `Gates` installs them on a model as
forward hooks (a gate multiplies a producer's output after its norm layer), bakes the final
gate values into the norm's affine parameters (or the producer's rows when it has no norm)
and removes every hook again, so nothing of the method survives `finalize()`.
"""

from __future__ import annotations

import math
from collections.abc import Container
from dataclasses import dataclass, field

import torch
from torch import nn

from compressor.errors import InputError
from compressor.surgery import ChannelGroup, Member

BARRIER_CAP = 1e10  # METHODS.md §3: g(x) is +inf from x >= 1; "use 1e10"


# --- the math ---------------------------------------------------------------------------------


def hard_concrete_sample(
    log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float
) -> torch.Tensor:
    """A training sample z = clamp(sigmoid((log u - log(1-u) + log a)/beta)(zeta-gamma)+gamma, 0, 1)."""
    u = torch.rand_like(log_alpha).clamp_(1e-6, 1.0 - 1e-6)  # keeps log u, log(1-u) finite
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / beta)
    return (s * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def hard_concrete_test(log_alpha: torch.Tensor, gamma: float, zeta: float) -> torch.Tensor:
    """The deterministic test value z = clamp(sigmoid(log a)(zeta - gamma) + gamma, 0, 1)."""
    return (torch.sigmoid(log_alpha) * (zeta - gamma) + gamma).clamp(0.0, 1.0)


def prob_nonzero(log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float) -> torch.Tensor:
    """P(z > 0) = sigmoid(log a - beta log(-gamma / zeta)): the summand of L_S."""
    return torch.sigmoid(log_alpha - beta * math.log(-gamma / zeta))


def prob_one(log_alpha: torch.Tensor, beta: float, gamma: float, zeta: float) -> torch.Tensor:
    """P(z = 1) = sigmoid(log a - beta log((1 - gamma) / (zeta - 1))), in closed form."""
    return torch.sigmoid(log_alpha - beta * math.log((1.0 - gamma) / (zeta - 1.0)))


def barrier(x: float) -> float:
    """g(x) = x^2 / (1 - x) on [0, 1), x clamped below at 0, BARRIER_CAP from x >= 1."""
    if x >= 1.0:
        return BARRIER_CAP
    x = max(x, 0.0)
    return x * x / (1.0 - x)


def barrier_multiplier(cost: float, low: float, high: float) -> float:
    """f(V, a, b) = g((V - a) / (b - a)): 0 below a, infinite (capped) from b up."""
    return barrier((cost - low) / (high - low))


def transition(t: float, d: float) -> float:
    """T(t, d) = (sigmoid(d (t - 1/2)) - delta) / (1 - 2 delta), delta = sigmoid(-d / 2)."""
    t = min(max(t, 0.0), 1.0)
    delta = 1.0 / (1.0 + math.exp(0.5 * d))
    return (1.0 / (1.0 + math.exp(-d * (t - 0.5))) - delta) / (1.0 - 2.0 * delta)


# --- gate units ---------------------------------------------------------------------------------


@dataclass
class Target:
    """One producer a unit gates: its output slice k is multiplied by z[positions[k]]."""

    member: Member
    positions: torch.Tensor  # LongTensor [output channels of the producer]


@dataclass
class GateUnit:
    """One vector of gates: a whole channel group (tied) or one producer's own channels (mixed).

    Attributes:
        name: "group N" or the producer's module path.
        group: The channel group the unit belongs to.
        own: The producer whose channels the unit holds (mixed residual streams), else None.
        fixed: Bool [size]: channels that can never be removed; their gate is always 1.
        targets: The producers the unit gates.
        weight: Per channel, the cost the channel adds (A_l for volume, MACs for FLOPs).
        log_alpha: The learned gate parameters.
    """

    name: str
    group: ChannelGroup
    own: Member | None
    fixed: torch.Tensor
    targets: list[Target]
    weight: torch.Tensor = field(default=None)
    log_alpha: nn.Parameter = field(default=None)
    frozen: torch.Tensor | None = None  # final gate values once the decision is taken
    cache: torch.Tensor | None = None  # this forward's training sample (shared by targets)

    @property
    def size(self) -> int:
        return len(self.fixed)

    def keep_entry(self, mask: torch.Tensor) -> dict:
        """This unit's entry of a `slim_` keep dict."""
        return {self.own.fqn: mask} if self.own is not None else {self.group.id: mask}


def build_units(
    groups: list[ChannelGroup], residual: str, excluded, tied: Container[int] = ()
) -> list[GateUnit]:
    """Gate units for every prunable group.

    In tied mode (and for groups that are not residual streams) one unit gates every
    producer of the group. In mixed mode each plain producer of a residual stream gets its
    own unit. A residual stream that a depthwise conv reads is gated as one unit even in
    mixed mode: the depthwise conv follows its input's channels and has no channels of its own.
    So is a stream whose id is in `tied` (one mixed mode cannot slim exactly).
    `excluded(fqn)` says which producers the user excluded; their channels are never gated.
    """
    units = []
    for group in groups:
        if not group.prunable:
            continue
        mixed = (
            residual == "mixed"
            and group.residual
            and not group.of_kind("grouped")
            and group.id not in tied
        )
        if mixed:
            for member in group.of_kind("producer"):
                if not excluded(member.fqn):
                    fixed = group.fixed[member.index]
                    units.append(_unit(member.fqn, group, member, fixed, [member]))
        elif not any(excluded(m.fqn) for m in group.producers):
            units.append(_unit(f"group {group.id}", group, None, group.fixed, group.producers))
    return [u for u in units if not bool(u.fixed.all())]


def _unit(name, group, own, fixed, members) -> GateUnit:
    def positions(member: Member) -> torch.Tensor:
        return torch.arange(len(member.index)) if own is not None else member.index

    return GateUnit(name, group, own, fixed.clone(), [Target(m, positions(m)) for m in members])


def init_log_alpha_(units: list[GateUnit], init: float, noise: float) -> None:
    """log alpha = init + noise * U(0, 1) per channel (METHODS.md §3: 0 + 0.01 U(0,1))."""
    for unit in units:
        unit.log_alpha = nn.Parameter(init + noise * torch.rand(unit.size))


# --- installing, baking, removing ---------------------------------------------------------------


class Gates:
    """The gate units of one model, with their hooks while installed."""

    def __init__(self, units: list[GateUnit], beta: float, gamma: float, zeta: float):
        self.units = units
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        self.handles: list = []

    def parameters(self) -> list[nn.Parameter]:
        return [u.log_alpha for u in self.units]

    def to_(self, device: torch.device) -> None:
        """Moves every unit's tensors to `device` (the model's), before any optimiser holds
        the log alphas. In place; their values are drawn on the CPU, so every device starts
        from the same gates."""
        for unit in self.units:
            if unit.log_alpha.device == device:
                continue
            unit.fixed, unit.weight = unit.fixed.to(device), unit.weight.to(device)
            unit.log_alpha = nn.Parameter(unit.log_alpha.detach().to(device))
            for target in unit.targets:
                target.positions = target.positions.to(device)

    def test_values(self, unit: GateUnit) -> torch.Tensor:
        """Deterministic gates (fixed channels at 1); the frozen values once decided."""
        if unit.frozen is not None:
            return unit.frozen
        z = hard_concrete_test(unit.log_alpha, self.gamma, self.zeta)
        return torch.where(unit.fixed, torch.ones_like(z), z)

    def values(self, unit: GateUnit, training: bool) -> torch.Tensor:
        """The gates of this forward: one sample per forward in training, else test values."""
        if not training or unit.frozen is not None:
            return self.test_values(unit)
        if unit.cache is None:
            z = hard_concrete_sample(unit.log_alpha, self.beta, self.gamma, self.zeta)
            unit.cache = torch.where(unit.fixed, torch.ones_like(z), z)
        return unit.cache

    def expected_live(self, unit: GateUnit) -> torch.Tensor:
        """P(z > 0) per channel, 0 for fixed channels (they cost the same whatever happens)."""
        p = prob_nonzero(unit.log_alpha, self.beta, self.gamma, self.zeta)
        return torch.where(unit.fixed, torch.zeros_like(p), p)

    def install_(self, model: nn.Module) -> None:
        """Registers the gate hooks on `model` (and a pre-hook that starts each forward)."""
        self.handles.append(model.register_forward_pre_hook(self._new_forward))
        for unit in self.units:
            for target in unit.targets:
                module = model.get_submodule(target.member.norm or target.member.fqn)
                if target.member.norm is not None:
                    _check_affine(module, target.member.norm)
                axis = -1 if isinstance(model.get_submodule(target.member.fqn), nn.Linear) else 1
                hook = self._hook(unit, target.positions, axis)
                self.handles.append(module.register_forward_hook(hook))

    def _new_forward(self, module, inputs) -> None:
        for unit in self.units:
            unit.cache = None

    def _hook(self, unit: GateUnit, positions: torch.Tensor, axis: int):
        def hook(module, inputs, output):
            z = self.values(unit, module.training)[positions]
            shape = [1] * output.dim()
            shape[axis] = -1
            return output * z.view(shape)

        return hook

    def remove_(self) -> None:
        """Removes every hook this object installed."""
        for handle in self.handles:
            handle.remove()
        self.handles = []

    @torch.no_grad()
    def bake_(self, model: nn.Module) -> None:
        """Folds the test (or frozen) gate values into the model's parameters. In place.

        A gate after a norm scales its affine weight and bias; a gate on a producer without a
        norm scales its weight rows and bias. Either way the model computes, without hooks,
        what the gated model computes in eval mode, and removed channels are exactly zero.
        """
        for unit in self.units:
            z = self.test_values(unit).detach()
            for target in unit.targets:
                member = target.member
                scale = z[target.positions]
                if member.norm is not None:
                    _scale_norm_(model.get_submodule(member.norm), member.norm, scale)
                else:
                    _scale_rows_(model.get_submodule(member.fqn), member.dim, scale)


def _check_affine(norm: nn.Module, fqn: str) -> None:
    if getattr(norm, "weight", None) is None or getattr(norm, "bias", None) is None:
        raise InputError(
            f"norm layer {fqn!r} has no affine weight and bias, which BAR's gates are folded "
            "into; give it affine=True or exclude its producer (--exclude)"
        )


def _scale_norm_(norm: nn.Module, fqn: str, scale: torch.Tensor) -> None:
    _check_affine(norm, fqn)
    norm.weight.mul_(scale)
    norm.bias.mul_(scale)


def _scale_rows_(layer: nn.Module, dim: int, scale: torch.Tensor) -> None:
    shape = [1] * layer.weight.dim()
    shape[dim] = -1
    layer.weight.mul_(scale.view(shape))
    if getattr(layer, "bias", None) is not None:
        layer.bias.mul_(scale)
