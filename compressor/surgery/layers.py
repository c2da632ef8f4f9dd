"""The layers surgery puts into a model (the bottom layer of surgery: imports none of it).

`SelectedLinear` is an `nn.Linear` that reads a subset of its input features (`select`
creates it). Tracing keeps it whole (`trace`), and its channel rule lives in `ops`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelectedLinear(nn.Linear):
    """y = x[..., index] @ W.T + b: a Linear reading only the input features `index`."""

    def __init__(self, index: torch.Tensor, out_features: int, bias: bool = True, **kwargs):
        super().__init__(len(index), out_features, bias=bias, **kwargs)
        self.register_buffer("index", index.clone().long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.index_select(-1, self.index), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, reads {self.in_features} selected input features"
