"""Building blocks shared by the Kelix models: RMSNorm (through ``ops.rms_norm``), SwiGLU MLP, tables,
and the fusion of projections that read the same input into one GEMM."""

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


def fuse_linears(*linears: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One ``[sum N_i, K]`` weight (and ``[sum N_i]`` bias, or None) for linears that read the same
    input, so that one GEMM computes them all (:func:`fused_linear`).

    Each linear's parameters are re-pointed at their rows of the fused tensors: nothing is stored
    twice, the checkpoint names still bind to the linears, and ``state_dict`` and in-place loads
    (``load_state_dict``) see and update the same values. Call after the weights are bound (a model's
    ``process_weights_after_loading``); replacing a linear's parameter objects afterwards detaches it.
    """
    weight = torch.cat([linear.weight for linear in linears])
    bias = None if linears[0].bias is None else torch.cat([linear.bias for linear in linears])
    start = 0
    for linear in linears:
        rows = slice(start, start + linear.out_features)
        linear.weight = nn.Parameter(weight[rows], requires_grad=False)
        if bias is not None:
            linear.bias = nn.Parameter(bias[rows], requires_grad=False)
        start = rows.stop
    return weight, bias


def fused_linear(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x [..., K] -> [..., sum N_i]``: one GEMM with a :func:`fuse_linears` weight (and bias); the
    caller splits the last dim (``.split``: views, not copies)."""
    if weight is None:
        raise RuntimeError(
            "the model's projections are not fused: call its process_weights_after_loading() after "
            "binding the weights (kelix_fast's loaders do)"
        )
    return F.linear(x, weight, bias)


class SwiGLU(nn.Module):
    """``w2(silu(w1 x) * w3 x)`` with bias-free projections (the LLM's and the Block Decoder's MLP).

    ``w1`` and ``w3`` run as one GEMM once :meth:`fuse_projections` has run (``gate_up``), and the
    activation reads its output in place (``ops.silu_mul``).
    """

    gate_up: torch.Tensor | None

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.register_buffer("gate_up", None, persistent=False)

    def fuse_projections(self) -> None:
        self.gate_up, _ = fuse_linears(self.w1, self.w3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(ops.silu_mul(fused_linear(x, self.gate_up, None)))


class Table(nn.Module):
    """A ``weight [rows, dim]`` parameter read by row (embeddings, position tables, codebook tables).

    Plain storage instead of ``nn.Embedding``, whose random init is slow on the meta device and unused.
    """

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
