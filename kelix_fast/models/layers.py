"""Building blocks shared by the Kelix models: RMSNorm (through ``ops.rms_norm``), SwiGLU MLP, tables."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kelix_fast import ops


class RMSNorm(nn.Module):
    """``y = (x * rsqrt(mean(x^2) + eps)).to(x.dtype) * scale``, normalised in float32.

    The weight is named ``scale`` as in the official checkpoints. x: [..., D] -> [..., D].
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.scale, eps=self.eps)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` with bias-free projections (the LLM's and the Block Decoder's MLP)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Table(nn.Module):
    """A ``weight [rows, dim]`` parameter read by row (embeddings, position tables, codebook tables).

    Plain storage instead of ``nn.Embedding``, whose random init is slow on the meta device and unused.
    """

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
