"""The GSS regularisers (METHODS.md §4): the general norms, the Deep GSS forms, the baselines.

General two-level grouping. `groups` is a list of groups g, each a list of sub-groups g', each
sub-group a tensor (or a sequence of tensors whose union is the sub-group):

    Omega_212(w) = sqrt( sum_g ( sum_{g'} ||w_{g,g'}||_2 )^2 )        (l2 - l1 - l2, main paper)
    Omega_121(w) = sum_g sqrt( sum_{g'} ||w_{g,g'}||_1^2 )            (l1 - l2 - l1, supplement)

Both contain the classic regularisers (the supplement's Table 1), for a partition G of w:

    lasso            ||w||_1          = Omega_121(every weight its own group)  = Omega_212(one group of single weights)
    l2               ||w||_2          = Omega_212(every weight its own group)  = Omega_121(one group of single weights)
    group lasso      sum_g ||w_g||_2  = Omega_121(G, single-weight sub-groups) = Omega_212(one group, sub-groups G)
    exclusive lasso  sum_g ||w_g||_1^2 = Omega_212(G, single-weight sub-groups)^2 = Omega_121(one group, sub-groups G)^2

Deep GSS on a network: a group is one neuron / channel j, with two sub-groups, its incoming
weights W^(l)[j, ...] (producer rows) and outgoing weights W^(l+1)[:, j, ...] (consumer
columns), both taken from the dataflow graph (`compressor.surgery.channel_groups`), so residual
streams are one group with every producer and consumer. `Halves` holds, per channel group, the
per-channel sums ||incoming||_p^p and ||outgoing||_p^p that every Deep form is built from.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compressor.surgery import ChannelGroup, group_reduce
from compressor.surgery.graph import INPUT_REASON

Subgroup = torch.Tensor | Sequence[torch.Tensor]

PRODUCING = ("producer", "grouped")


# --- the general norms -------------------------------------------------------------------


def _flat(subgroup: Subgroup) -> torch.Tensor:
    if isinstance(subgroup, torch.Tensor):
        return subgroup.flatten()
    return torch.cat([t.flatten() for t in subgroup])


def omega_212(groups: Sequence[Sequence[Subgroup]], eps: float = 0.0) -> torch.Tensor:
    """Omega_212(w) = sqrt(sum_g (sum_g' ||w_gg'||_2)^2); `eps` is added inside every sqrt."""
    total = 0.0
    for group in groups:
        inner = sum(torch.sqrt(_flat(sub).pow(2).sum() + eps) for sub in group)
        total = total + inner**2
    return torch.sqrt(torch.as_tensor(total) + eps)


def omega_121(groups: Sequence[Sequence[Subgroup]], eps: float = 0.0) -> torch.Tensor:
    """Omega_121(w) = sum_g sqrt(sum_g' ||w_gg'||_1^2); `eps` is added inside every sqrt."""
    total = 0.0
    for group in groups:
        squares = sum(_flat(sub).abs().sum() ** 2 for sub in group)
        total = total + torch.sqrt(torch.as_tensor(squares) + eps)
    return torch.as_tensor(total)


# --- the classic regularisers, written directly (the oracles of Table 1) ------------------


def lasso(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum |w| over all weights."""
    return sum(w.abs().sum() for w in weights)


def l2(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum w^2 over all weights (squared l2, the weight-decay form)."""
    return sum(w.pow(2).sum() for w in weights)


def exclusive_lasso(weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum over every row (one neuron's incoming weights) of every layer of ||row||_1^2.

    The rows are the groups of exclusive sparsity (Zhou et al. 2010; Yoon & Hwang 2017):
    weights feeding one neuron compete with each other.
    """
    return sum(w.reshape(w.shape[0], -1).abs().sum(dim=1).pow(2).sum() for w in weights)


# --- Deep GSS on channel groups ----------------------------------------------------------


@dataclass(frozen=True)
class NeuronGroup:
    """One channel group as a set of Deep GSS neurons: the channels in `channels` take part."""

    group: ChannelGroup
    channels: torch.Tensor  # bool [group.size]: channels regularised (not fixed, not excluded)


def neuron_groups(
    groups: Sequence[ChannelGroup], exclude: set[str], structured: bool, inputs: bool = True
) -> list[NeuronGroup]:
    """The Deep GSS groups of a model: channel groups with incoming and outgoing weights.

    With `inputs`, the input layer's neurons are groups too, with outgoing weights only, as
    in the authors' code, which pairs the first layer's columns with nothing (structure.py:
    `weights_in` starts as a zero tensor). The output layer's neurons have no outgoing
    weights and are not groups. Members on excluded layers are dropped. In the structured
    case only channels that can be removed take part (a fixed channel or a group touching
    an excluded layer stays as it is, so shrinking it would only cost accuracy); the
    element-wise case keeps all of them.
    """
    found = []
    for group in groups:
        members = tuple(m for m in group.members if m.fqn not in exclude)
        touched = any(m.fqn in exclude for m in group.of_kind(*PRODUCING, "consumer"))
        kept = dataclasses.replace(group, members=members)
        if not kept.of_kind("consumer"):
            continue
        if not kept.of_kind(*PRODUCING) and not (inputs and _reads_model_input(group)):
            continue
        channels = torch.ones(group.size, dtype=torch.bool)
        if structured:
            if touched or bool(group.fixed.all()):
                continue
            channels = ~group.fixed
        found.append(NeuronGroup(kept, channels))
    return found


def _reads_model_input(group: ChannelGroup) -> bool:
    return any(reason.startswith(INPUT_REASON) for reason in group.reasons)


def halves(
    model: nn.Module, groups: Sequence[NeuronGroup], p: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per neuron group: (||W^(l)[j]||_p^p, ||W^(l+1)[:, j]||_p^p) over its channels j."""
    out = []
    for ng in groups:
        incoming = group_reduce(model, ng.group, PRODUCING, p)[ng.channels]
        outgoing = group_reduce(model, ng.group, ("consumer",), p)[ng.channels]
        out.append((incoming, outgoing))
    return out


def layer_halves(
    weights: Sequence[torch.Tensor], p: float
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Halves without a dataflow graph: each layer's rows and its columns as separate groups.

    The fallback for models that cannot be traced (element-wise only): a neuron's incoming
    and outgoing weights are not paired, so the forms that couple them lose that coupling.
    """
    out = []
    for w in weights:
        rows = w.reshape(w.shape[0], -1).abs().pow(p).sum(dim=1)
        cols = w.transpose(0, 1).reshape(w.shape[1], -1).abs().pow(p).sum(dim=1)
        out += [(rows, torch.zeros_like(rows)), (torch.zeros_like(cols), cols)]
    return out


def deep_212(halves2: Sequence[tuple[torch.Tensor, torch.Tensor]], eps: float) -> torch.Tensor:
    """sum_l (sum_j sqrt(||W^(l)[j]||_2^2 + ||W^(l+1)[:, j]||_2^2))^2: Omega_212^2, layers as groups.

    The structured form of the authors' code (structure.py, reg 5); takes p = 2 halves.
    """
    return sum(torch.sqrt(i + o + eps).sum() ** 2 for i, o in halves2)


def deep_121(halves1: Sequence[tuple[torch.Tensor, torch.Tensor]], eps: float) -> torch.Tensor:
    """sum_l sum_j sqrt(||W^(l)[j]||_1^2 + ||W^(l+1)[:, j]||_1^2): Omega_121, neurons as groups."""
    return sum(torch.sqrt(i**2 + o**2 + eps).sum() for i, o in halves1)


def deep_element(halves1: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum_l sum_j (||W^(l)[j]||_1^2 + ||W^(l+1)[:, j]||_1^2): the authors' element-wise form.

    element.py, reg 5: exclusive lasso whose groups are each neuron's incoming and its
    outgoing weights, so weights compete both for a neuron's inputs and for its outputs.
    """
    return sum((i**2 + o**2).sum() for i, o in halves1)


def deep_group_lasso(
    halves2: Sequence[tuple[torch.Tensor, torch.Tensor]], eps: float
) -> torch.Tensor:
    """sum_l sum_j sqrt(||W^(l)[j]||_2^2 + ||W^(l+1)[:, j]||_2^2): group lasso over neurons.

    Omega_121 with each neuron's weights as a group of single-weight sub-groups: the same
    groups as Deep GSS, so the two differ only in the norms (takes p = 2 halves).
    """
    return sum(torch.sqrt(i + o + eps).sum() for i, o in halves2)


# --- the auxiliary (p, q) form -----------------------------------------------------------


def aux_penalty(costs: Sequence[torch.Tensor], selectors: Sequence[torch.Tensor], p: float):
    """R = sum_l sum_j c_j / a_j^p with c_j = ||W^(l)[j]||_p^p + ||W^(l+1)[:, j]||_p^p.

    `selectors` (a) are constants here: they are updated in closed form after every
    optimiser step (`aux_update`), not by gradient. A channel with a_j = 0 has c_j = 0 and
    contributes nothing.
    """
    total = 0.0
    for c, a in zip(costs, selectors, strict=True):
        safe = torch.where(a > 0, a, torch.ones_like(a))
        total = total + torch.where(a > 0, c / safe.pow(p), torch.zeros_like(c)).sum()
    return torch.as_tensor(total)


def aux_update(c: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """argmin over {a >= 0, ||a||_q = 1} of sum_j c_j / a_j^p, in closed form.

    a_j = c_j^(1/(p+q)) / (sum_k c_k^(q/(p+q)))^(1/q), and the minimum is
    (sum_k c_k^(q/(p+q)))^((p+q)/q) (Hölder); with p = q = 2 that is the squared Omega_212.
    All-zero c (a dead layer) gives a = 0.
    """
    c = c.detach().clamp_min(0)
    scale = c.pow(q / (p + q)).sum().pow(1.0 / q)
    if float(scale) == 0.0:
        return torch.zeros_like(c)
    return c.pow(1.0 / (p + q)) / scale


def aux_minimum(c: torch.Tensor, p: float, q: float) -> torch.Tensor:
    """The value of the (p, q) form at its optimal a: (sum_j c_j^(q/(p+q)))^((p+q)/q)."""
    return c.clamp_min(0).pow(q / (p + q)).sum().pow((p + q) / q)
