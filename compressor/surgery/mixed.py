"""Mixed-connectivity residual joins (BAR supplement, Algorithm 1).

In a residual network with tied channels, every block on a stream keeps the same channels. In
mixed mode each producer writing into the stream keeps its own subset, so the two operands of
a residual add hold different channels. The slimmed add becomes a `ResidualJoin`: the stream
is stored compactly at the channels alive at that point (the union of its operands'), and each
operand is scattered into it at its own alive indices with `index_add`.

Algorithm 1 keeps the stream at full width and has every block gather its alive inputs
(`x[:, i_in]`) first. Storing the stream at exactly its alive channels is the same
computation without that gather: a block's first conv reads the whole compact stream,
whose channels are all alive. A projection shortcut writes into a zero tensor at its alive
indices (`pos_a` and `pos_b` both partial). Removed channels that still carry a constant in the
masked model (e.g. a BatchNorm shift through ReLU) are added back per channel (`const`).

`ResidualJoin` exports with torch.export (index_add -> aten.index_add) and to ONNX
(ScatterND with add reduction), so the slimmed graph is genuinely smaller.
"""

from __future__ import annotations

import torch
from torch import nn


class ResidualJoin(nn.Module):
    """`a + alpha * b` where `a`, `b` hold different channel subsets of the output.

    Args:
        dim: The channel dimension.
        width: Channels of the output (the union of the operands' channels).
        pos_a: Output positions of `a`'s channels, or None when `a` holds all of them.
        pos_b: Output positions of `b`'s channels, or None when `b` holds all of them.
        alpha: Scale of `b` (-1 for a subtraction).
        const: Per output channel, constants that removed channels add, or None.
    """

    def __init__(
        self,
        dim: int,
        width: int,
        pos_a: torch.Tensor | None,
        pos_b: torch.Tensor | None,
        alpha: float = 1.0,
        const: torch.Tensor | None = None,
    ):
        super().__init__()
        self.dim, self.width, self.alpha = dim, width, float(alpha)
        self.a_full, self.b_full = pos_a is None, pos_b is None
        empty = torch.zeros(0, dtype=torch.long)
        self.register_buffer("pos_a", empty if pos_a is None else pos_a.long())
        self.register_buffer("pos_b", empty if pos_b is None else pos_b.long())
        self.has_const = const is not None
        self.register_buffer("const", torch.zeros(0) if const is None else const.clone())

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.alpha != 1.0:
            b = b * self.alpha
        if self.a_full and self.b_full:
            out = a + b
        elif self.a_full:
            out = a.index_add(self.dim, self.pos_b, b)
        elif self.b_full:
            out = b.index_add(self.dim, self.pos_a, a)
        else:
            shape = list(a.shape)
            shape[self.dim] = self.width
            out = a.new_zeros(shape).index_add(self.dim, self.pos_a, a)
            out = out.index_add(self.dim, self.pos_b, b)
        if self.has_const:
            shape = [1] * out.dim()
            shape[self.dim] = self.width
            out = out + self.const.view(shape)
        return out

    def memory_elements(self, inputs: tuple, output: torch.Tensor) -> int:
        """Elements moved by gather/scatter per sample (stats count them as memory, not MACs)."""
        a, b = inputs
        moved = 0 if self.a_full else a[0].numel()
        moved += 0 if self.b_full else b[0].numel()
        if not (self.a_full or self.b_full):
            moved += output[0].numel()  # the zero-initialised stream
        return int(moved)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, width={self.width}, a={'all' if self.a_full else len(self.pos_a)}, "
            f"b={'all' if self.b_full else len(self.pos_b)}"
        )
