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


class FusedProjections(nn.Module):
    """Base of a module some of whose linears read the same input and run as one GEMM.

    A subclass declares ``_fusions``: per group, the name of the fused weight, of the fused bias (or
    None) and of the linears, in order. :meth:`fuse_projections` (after the weights are bound: a
    model's ``process_weights_after_loading``) concatenates their weights (and biases) into one
    ``[sum N_i, K]`` tensor, a non-persistent buffer, and re-points each linear's parameters at its
    rows: nothing is stored twice, the checkpoint names still bind to the linears, and
    ``state_dict`` and in-place loads (``load_state_dict``) see and update the same values. Moving or
    casting the module (``.to``, ``.cuda``, ``.half``) converts each fused tensor once and re-points
    the linears again (``nn.Module`` alone would convert every view on its own: two copies).
    Replacing a linear's parameter objects after fusing detaches it.
    """

    _fusions: tuple[tuple[str, str | None, tuple[str, ...]], ...] = ()

    def __init__(self) -> None:
        super().__init__()
        for weight_name, bias_name, _ in self._fusions:
            self.register_buffer(weight_name, None, persistent=False)
            if bias_name is not None:
                self.register_buffer(bias_name, None, persistent=False)

    def fuse_projections(self) -> None:
        for group in self._fusions:
            _, bias_name, names = group
            linears = [getattr(self, name) for name in names]
            weight = torch.cat([linear.weight for linear in linears])
            bias = None if bias_name is None else torch.cat([linear.bias for linear in linears])
            self._share(group, weight, bias)

    def _share(
        self,
        group: tuple[str, str | None, tuple[str, ...]],
        weight: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> None:
        """Hold ``weight`` (and ``bias``) as ``group``'s fused tensors, its linears' parameters as
        views of their rows."""
        weight_name, bias_name, names = group
        setattr(self, weight_name, weight)
        if bias_name is not None:
            setattr(self, bias_name, bias)
        start = 0
        for name in names:
            linear = getattr(self, name)
            rows = slice(start, start + linear.out_features)
            linear.weight = nn.Parameter(weight[rows], requires_grad=False)
            if bias is not None:
                linear.bias = nn.Parameter(bias[rows], requires_grad=False)
            start = rows.stop

    def _apply(self, fn, recurse=True):
        for group in self._fusions:
            weight_name, bias_name, _ = group
            weight = getattr(self, weight_name)
            if weight is not None:
                bias = None if bias_name is None else getattr(self, bias_name)
                self._share(group, fn(weight), None if bias is None else fn(bias))
        # The linears' parameters are now views already converted: fn leaves them as they are.
        return super()._apply(fn, recurse)


def fuse_all_projections(model: nn.Module) -> None:
    """:meth:`FusedProjections.fuse_projections` on every such submodule of ``model`` (a model's
    ``process_weights_after_loading``, once its weights are bound)."""
    for module in model.modules():
        if isinstance(module, FusedProjections):
            module.fuse_projections()


def fused_linear(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x [..., K] -> [..., sum N_i]``: one GEMM with a :class:`FusedProjections` weight (and bias);
    the caller splits the last dim (``.split``: views, not copies)."""
    if weight is None:
        raise RuntimeError(
            "the model's projections are not fused: call its process_weights_after_loading() after "
            "binding the weights (kelix_fast's loaders do)"
        )
    return F.linear(x, weight, bias)


class SwiGLU(FusedProjections):
    """``w2(silu(w1 x) * w3 x)`` with bias-free projections (the LLM's and the Block Decoder's MLP).

    ``w1`` and ``w3`` run as one GEMM once :meth:`fuse_projections` has run (``gate_up``), and the
    activation reads its output in place (``ops.silu_mul``).
    """

    _fusions = (("gate_up", None, ("w1", "w3")),)
    gate_up: torch.Tensor | None

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(ops.silu_mul(fused_linear(x, self.gate_up, None)))


class Table(nn.Module):
    """A ``weight [rows, dim]`` parameter read by row (embeddings, position tables, codebook tables).

    Plain storage instead of ``nn.Embedding``, whose random init is slow on the meta device and unused.
    """

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, dim))
