"""Sparsity patterns hardware can use: N:M groups and RxC blocks.

A weight is seen as the 2-D matrix the CSR pack stores, [O, I*kh*kw] (rows are output
channels, columns the flattened in-channel x kernel axis, C order). On that matrix:

- ``N:M``: every run of M consecutive columns in a row (columns 0..M-1, M..2M-1, ...)
  holds at most N non-zeros. A layer whose column count is not a multiple of M cannot
  carry the pattern and is left dense (``eligible`` says which).
- ``RxC``: the matrix is cut into R-row x C-column blocks from the top-left corner; each
  block is all zero or kept whole. Edge blocks of a matrix whose sides are not multiples
  of R and C are smaller (only their real elements count); every layer is eligible.

The model's report names the pattern (``report["pattern"]``, the text the user gave) and
the layers pruned to it (``report["pattern_layers"]``, layer names as in the masks).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from compressor.errors import InputError

# Past 32 an N:M group buys no runtime we know a kernel for.
MAX_GROUP = 32
# The most elements in an RxC block; also the CSR pack's block limit (exporters.csr_format).
MAX_BLOCK_ELEMENTS = 256


@dataclass(frozen=True)
class Pattern:
    """One sparsity pattern: ``kind`` "nm" (``n`` of every ``m``) or "block" (rows x cols)."""

    kind: str
    a: int
    b: int

    @property
    def text(self) -> str:
        """The pattern as the user writes it: "2:4" or "1x4"."""
        return f"{self.a}:{self.b}" if self.kind == "nm" else f"{self.a}x{self.b}"

    @property
    def group(self) -> tuple[int, int]:
        """The unit on the [O, I*k*k] matrix: (1, M) for N:M, (R, C) for blocks."""
        return (1, self.b) if self.kind == "nm" else (self.a, self.b)


def parse_pattern(text: str) -> Pattern:
    """Parses "N:M" (1 <= N < M <= 32) or "RxC" (R*C between 2 and 256)."""
    spec = str(text).strip().lower()
    nm = re.fullmatch(r"(\d+):(\d+)", spec)
    block = re.fullmatch(r"(\d+)x(\d+)", spec)
    if nm:
        n, m = int(nm[1]), int(nm[2])
        if not 1 <= n < m <= MAX_GROUP:
            raise InputError(
                f"pattern {text!r}: N:M needs 1 <= N < M <= {MAX_GROUP}, e.g. 2:4 or 4:8"
            )
        return Pattern("nm", n, m)
    if block:
        r, c = int(block[1]), int(block[2])
        if r < 1 or c < 1 or not 2 <= r * c <= MAX_BLOCK_ELEMENTS:
            raise InputError(
                f"pattern {text!r}: a block needs R, C >= 1 and 2 <= R*C <= "
                f"{MAX_BLOCK_ELEMENTS}, e.g. 1x4 or 4x1"
            )
        return Pattern("block", r, c)
    raise InputError(f"pattern {text!r} is neither N:M (e.g. 2:4) nor RxC (e.g. 1x4)")


def matrix_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """The [rows, cols] view of a weight: [O, I, kh, kw] -> [O, I*kh*kw]."""
    return int(shape[0]), math.prod(int(s) for s in shape[1:])


def eligible(shape: tuple[int, ...] | torch.Size, pattern: Pattern) -> bool:
    """Whether a weight of `shape` can carry `pattern` (N:M needs cols % M == 0)."""
    if len(shape) < 2:
        return False
    rows, cols = matrix_shape(shape)
    return pattern.kind == "block" or cols % pattern.b == 0


def group_sums(values: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Sums `values` (a weight-shaped tensor) over each pattern unit.

    For N:M the unit is an M-column group, so the result is [O, I*k*k / M]; for blocks it
    is [ceil(O / R), ceil(cols / C)], edge blocks summing only their real elements.
    """
    rows, cols = matrix_shape(values.shape)
    height, width = pattern.group
    brows, bcols = -(-rows // height), -(-cols // width)
    padded = values.new_zeros(brows * height, bcols * width)
    padded[:rows, :cols] = values.reshape(rows, cols)
    return padded.reshape(brows, height, bcols, width).sum(dim=(1, 3))


def expand_units(unit_mask: torch.Tensor, shape: torch.Size, pattern: Pattern) -> torch.Tensor:
    """Spreads a per-unit keep mask (from `group_sums`' shape) back to a weight's shape."""
    rows, cols = matrix_shape(shape)
    height, width = pattern.group
    full = unit_mask.repeat_interleave(height, 0).repeat_interleave(width, 1)
    return full[:rows, :cols].reshape(shape)


def unit_sizes(shape: torch.Size, pattern: Pattern) -> torch.Tensor:
    """How many real weight elements each unit covers (edge blocks cover fewer)."""
    return group_sums(torch.ones(shape), pattern)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keeps the `n` highest-scoring weights in every M-column group (ties: first by position)."""
    rows, cols = matrix_shape(scores.shape)
    groups = scores.reshape(rows, cols // m, m)
    # A stable descending sort ranks equal scores by position, so the mask is deterministic.
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(scores.shape)


def holds(weight: torch.Tensor, pattern: Pattern) -> bool:
    """Whether the non-zeros of `weight` follow `pattern` (every group / block)."""
    if not eligible(weight.shape, pattern):
        return False
    nonzero = (weight != 0).to(torch.float32)
    if pattern.kind == "nm":
        return bool((group_sums(nonzero, pattern) <= pattern.a).all())
    counts = group_sums(nonzero, pattern)
    return bool(((counts == 0) | (counts == unit_sizes(weight.shape, pattern))).all())
