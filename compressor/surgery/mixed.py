"""Mixed-connectivity residual joins (BAR supplement, Algorithm 1).

In a residual network with tied channels, every block on a stream keeps the same channels. In
mixed mode each producer writing into the stream keeps its own subset, so the two operands of
a residual add hold different channels. The slimmed add becomes a `ResidualJoin`: the stream
is stored compactly at the channels alive at that point (the union of its operands'), and each
operand is added into it at its own alive indices.

Algorithm 1 keeps the stream at full width and has every block gather its alive inputs
(`x[:, i_in]`) first. Storing the stream at exactly its alive channels is the same
computation without that gather: a block's first conv reads the whole compact stream,
whose channels are all alive. A projection shortcut writes into a zero tensor at its alive
indices (`pos_a` and `pos_b` both partial). Removed channels that still carry a constant in the
masked model (e.g. a BatchNorm shift through ReLU) are added back per channel (`const`).

The forward writes that scatter-add as gathers, which onnxruntime runs faster: an operand on a
subset of the output's channels gets one zero channel appended (`F.pad` -> ONNX Pad) and is
gathered to the output's width (`index_select` -> Gather on the channel axis), each output
channel reading its own channel of the operand or the zero one; the two embedded operands
meet in a dense Add. onnxruntime runs the same Pad / Gather / Add from both exporters at
opsets 11-20 (the TorchScript one computes Pad's pads with constant ops it folds away).
`index_add` exported as Transpose -> ScatterND -> Transpose (dynamo) or ScatterElements over
expanded indices (TorchScript); bench/mixed_joins.py times both lowerings against tied
channels. The sums are the same floating-point operations (`x + 0` is exact), so the
outputs are bitwise those of `index_add`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
        # Derived from pos_a / pos_b, so kept out of the state_dict (persistent=False).
        for name, pos in (("gather_a", pos_a), ("gather_b", pos_b)):
            index = empty if pos is None else embedding_index(pos, width)
            self.register_buffer(name, index, persistent=False)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.alpha != 1.0:
            b = b * self.alpha
        a = self._embed(a, self.a_full, self.gather_a)
        out = a + self._embed(b, self.b_full, self.gather_b)
        if self.has_const:
            shape = [1] * out.dim()
            shape[self.dim] = self.width
            out = out + self.const.view(shape)
        return out

    def _embed(self, x: torch.Tensor, full: bool, index: torch.Tensor) -> torch.Tensor:
        """`x` at its output positions of the full width, zeros elsewhere."""
        if full:
            return x
        dim = self.dim % x.dim()
        # F.pad lists (before, after) pairs from the last dimension backwards
        zero_channel = F.pad(x, [0, 0] * (x.dim() - 1 - dim) + [0, 1])
        return zero_channel.index_select(dim, index)

    def memory_elements(self, inputs: tuple, output: torch.Tensor) -> int:
        """Elements moved by the embedding per sample (stats count them as memory, not MACs).

        Each partial operand is copied once with its zero channel and gathered once to the
        output's width.
        """
        moved = 0
        for x, full in zip(inputs, (self.a_full, self.b_full)):
            moved += 0 if full else x[0].numel() + output[0].numel()
        return int(moved)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, width={self.width}, a={'all' if self.a_full else len(self.pos_a)}, "
            f"b={'all' if self.b_full else len(self.pos_b)}"
        )


def embedding_index(positions: torch.Tensor, width: int) -> torch.Tensor:
    """Per output channel, the operand channel it reads: its own, or the appended zero one.

    `positions[j]` is the output channel of operand channel j; the other output channels read
    channel `len(positions)`, the zero channel `ResidualJoin` appends.
    """
    index = torch.full((width,), len(positions), dtype=torch.long, device=positions.device)
    index[positions.long()] = torch.arange(len(positions), device=positions.device)
    return index
