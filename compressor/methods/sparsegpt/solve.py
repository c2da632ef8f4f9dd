"""SparseGPT's layer solve (Frantar & Alistarh 2023, Algorithm 1) and its Hessians.

A layer computes `W X` with `W` of shape [O, D] and calibration inputs `X` of shape
[D, n]: a Linear's input features, or a convolution's unfolded input patches, so that `W`
is the conv weight viewed as [O, I*kh*kw] in `F.unfold`'s order. Pruning a weight set
while keeping `||W X - W' X||^2` small is a least-squares problem per row with the shared
Hessian `H = X X^T`. SparseGPT visits the columns left to right; when it reaches column
j it zeroes the pruned weights there and moves their error onto the columns not yet
visited with the OBS update, using the inverse Hessian of those columns, whose rows are
the rows of the upper Cholesky factor `U` of `H^-1` (scaled): row j of `U` is
`[H_F^-1]_{j,:} / sqrt([H_F^-1]_jj)` for `F = {j, ..., D-1}`. Column updates are applied
lazily, `blocksize` columns at a time, and the mask of each block is chosen when the
block is reached: the weights of lowest OBS saliency `w^2 / [U]_jj^2` in the block.

Grouped convolutions are solved as one matrix per group (a leading batch dimension G):
group g's weights see only group g's input channels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compressor.errors import CompressorError
from compressor.methods.magnitude import exact_counts


def layer_inputs(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as columns per group: [G, D, n] (Linear: G = 1, D = in_features).

    Convolutions are padded as the layer pads (any `padding_mode`, string paddings too) and
    unfolded with its kernel, stride and dilation; Conv1d is a Conv2d of height 1.
    """
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1]).T.unsqueeze(0)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
    kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
    if isinstance(module, nn.Conv1d):
        x, kernel, stride, dilation = x.unsqueeze(2), (1, *kernel), (1, *stride), (1, *dilation)
    cols = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [B, C*k, L], channel-major
    groups = module.groups
    batch, features, length = cols.shape
    cols = cols.reshape(batch, groups, features // groups, length)
    return cols.permute(1, 2, 0, 3).reshape(groups, features // groups, batch * length)


def grouped_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [G, O/G, D]: per group, rows are outputs and columns unfold's order."""
    weight = module.weight.detach()
    groups = getattr(module, "groups", 1)
    return weight.reshape(groups, weight.shape[0] // groups, -1)


def hinv_upper(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The upper Cholesky factor of the dampened inverse Hessian, per group, and dead columns.

    Dead inputs (`H_jj == 0`: never nonzero on the calibration data) get `H_jj = 1`, so
    they are decoupled from every other column; then `percdamp * mean(diag H)` is added to
    the diagonal (the paper's 1 %), which keeps the Cholesky factorisation well posed.

    Raises:
        CompressorError: the dampened Hessian is still not positive definite.
    """
    hessian = hessian.clone()
    diag = torch.diagonal(hessian, dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    diag += percdamp * diag.mean(dim=-1, keepdim=True)
    factor, info = torch.linalg.cholesky_ex(hessian)
    if bool((info != 0).any()):
        raise CompressorError(
            f"the calibration Hessian is not positive definite even with percdamp={percdamp}; "
            "raise it, e.g. --set percdamp=0.1, or give more --calib-samples"
        )
    inverse = torch.cholesky_inverse(factor)
    return torch.linalg.cholesky(inverse, upper=True), dead


def obs_saliency(weight: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """OBS saliency `w_q^2 / [H^-1]_qq`: the output error of removing w_q, compensated."""
    return weight**2 / hinv_diag


def _prune_in_block(scores: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Per group, the `zeros[g]` entries of lowest score in the block (ties: lowest index).

    Args:
        scores: [G, rows, cols]; zeros: [G] counts.
    """
    flat = scores.reshape(scores.shape[0], -1)
    order = torch.sort(flat, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    positions = torch.arange(flat.shape[1], device=flat.device).expand_as(order).contiguous()
    ranks.scatter_(1, order, positions)
    return (ranks < zeros.unsqueeze(1)).reshape(scores.shape)


def sparsegpt_solve(
    weight: torch.Tensor,
    upper: torch.Tensor,
    block_zeros: torch.Tensor | None = None,
    *,
    blocksize: int = 128,
    dead: torch.Tensor | None = None,
    keep: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prunes `weight` column by column with OBS updates (Algorithm 1, lazy batches).

    Args:
        weight: [G, O, D]; not modified.
        upper: [G, D, D] upper Cholesky factor of the dampened H^-1 (`hinv_upper`).
        block_zeros: [G, ceil(D / blocksize)] weights to prune in each block of columns
            (chosen there by lowest `w^2 / [U]_jj^2`); ignored when `keep` is given.
        dead: [G, D] columns with no calibration signal: pruned first in their block.
        keep: a fixed [G, O, D] mask to apply instead of choosing one.

    Returns:
        (pruned weight, keep mask), both [G, O, D]; pruned entries are exactly 0.
    """
    weight = weight.clone()
    mask = torch.ones_like(weight, dtype=torch.bool)
    columns = weight.shape[-1]
    for b, i1 in enumerate(range(0, columns, blocksize)):
        i2 = min(i1 + blocksize, columns)
        block = weight[:, :, i1:i2].clone()
        u_block = upper[:, i1:i2, i1:i2]
        diag = torch.diagonal(u_block, dim1=-2, dim2=-1).unsqueeze(1)  # [G, 1, c]
        if keep is not None:
            pruned = ~keep[:, :, i1:i2]
        else:
            scores = obs_saliency(block, diag**2)
            if dead is not None:
                scores = torch.where(dead[:, i1:i2].unsqueeze(1), -1.0, scores)
            pruned = _prune_in_block(scores, block_zeros[:, b])
        errors = torch.zeros_like(block)
        for i in range(i2 - i1):
            w = block[:, :, i]
            q = torch.where(pruned[:, :, i], torch.zeros_like(w), w)
            err = (w - q) / diag[:, :, i]
            block[:, :, i:] -= err.unsqueeze(-1) * u_block[:, i, i:].unsqueeze(1)
            block[:, :, i] = q  # exactly 0 where pruned, not a rounding residue
            errors[:, :, i] = err
        weight[:, :, i1:i2] = block
        weight[:, :, i2:] -= errors @ upper[:, i1:i2, i2:]
        mask[:, :, i1:i2] = ~pruned
    return weight, mask


def block_zero_counts(
    groups: int, rows: int, columns: int, zeros: int, blocksize: int
) -> torch.Tensor:
    """Per (group, block of columns), how many weights to prune: exactly `zeros` in all.

    Every block gets the layer's sparsity; the fractional parts are rounded by largest
    remainder (the magnitude baselines' `exact_counts`) so the counts add up to `zeros`.
    """
    widths = [min(blocksize, columns - i) for i in range(0, columns, blocksize)]
    sizes = {(g, b): rows * w for g in range(groups) for b, w in enumerate(widths)}
    share = zeros / sum(sizes.values())
    counts = exact_counts(dict.fromkeys(sizes, share), sizes, zeros)
    return torch.tensor([counts[unit] for unit in sizes]).reshape(groups, len(widths))


def relative_error(weight: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """`||(W - W') X||^2 / ||W X||^2` on the calibration data, from the Hessian."""
    delta = weight - pruned
    num = torch.einsum("goi,gij,goj->", delta, hessian, delta)
    den = torch.einsum("goi,gij,goj->", weight, hessian, weight)
    return float(num / den) if float(den) > 0 else 0.0
