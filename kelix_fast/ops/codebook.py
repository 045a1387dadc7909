"""``codebook_argmin``: the multi-sub-codebook nearest-neighbour lookup of Kelix-Tok (kelix-ar.md §3.5).

Backends: ``cuda`` (``kf_codebook_argmin``, csrc/codebook_argmin.cu), ``triton``
(``kelix_fast.triton_kernels.codebook_argmin``), both fused with no [n, K] matrix, and the PyTorch
reference ``torch``; ``"auto"`` prefers cuda, then triton, for CUDA tensors (see ``backend`` below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kelix_fast import triton_kernels
from kelix_fast.ops import _checks, _cuda, _dispatch

MODES = ("reference", "exact")
_OP = "codebook_argmin"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CHUNK_ELEMENTS = 1 << 25  # temporary of the exact-mode reference: 128 MiB in float32


def codebook_argmin(
    z: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    codebooks: torch.Tensor,
    codebook_sqnorms: torch.Tensor | None = None,
    *,
    vocab_offset: int,
    mode: str,
    eps: float = 1e-5,
    backend: str = "auto",
) -> torch.Tensor:
    """Nearest code per sub-codebook: ``ids[n, g] = vocab_offset + K*g + argmin_k |LN_g(z[n, g]) - C_g[k]|^2``.

    Args:
        z: [n, G*d] float32/bfloat16/float16, last dim contiguous. Encoder outputs; sub-vector g is
            ``z[:, g*d:(g+1)*d]``.
        ln_weight, ln_bias: [G, d], dtype of ``z`` (the model's ``z_norm`` in the model dtype; the
            reference LayerNorm runs in that dtype). The per-group query LayerNorm, eps ``eps``.
        codebooks: [G, K, d]. Precomputed at load as ``LN_q(E_g[slice] W_g^T + b_g)``.
        codebook_sqnorms: [G, K] float32 or None. ``|C_g[k]|^2``, used by ``mode="exact"`` (computed here
            when None).
        vocab_offset: int >= 0, id of code 0 of sub-codebook 0 in the LLM vocabulary (the text
            vocab size).
        eps: finite, > 0 (the LayerNorm of a constant row divides by sqrt(eps)).
        mode: ``"reference"`` reproduces the official distance arithmetic in the dtype of ``codebooks``
            (``cdist(u, C)**2`` through ``[-2u, |u|^2, 1] @ [c, 1, |c|^2]^T``, clamp, sqrt, square; in bf16
            this is the release's behaviour, near-ties included). ``"exact"`` is the float32 nearest
            neighbour on ``|c|^2 - 2 u.c``. Both keep the first index on ties.
        backend: ``"auto" | "cuda" | "triton" | "torch"``. See :func:`kelix_fast.ops.resolve_backend`.
            ``"auto"`` picks cuda (when kelix_fast._C is built and d is supported), then triton, for CUDA
            tensors, and torch otherwise; triton on CPU tensors runs only when asked
            for by name, under Triton's interpreter (a test path). In bf16
            ``mode="reference"`` triton emulates each rounding step but accumulates the GEMM in its own
            order, so near-ties may resolve differently from a GEMM library (kelix-ar.md §3.5).

    Returns:
        ids: [n, G] int64 global vocabulary ids.

    Raises:
        ValueError: bad shapes (an empty G, K or d included), dtypes, devices, ``mode`` or scalars
            (TypeError for a scalar of the wrong type). BackendUnavailableError: backend cannot run.
    """
    _checks.tensor(_OP, "codebooks", codebooks)
    _checks.shape(_OP, "codebooks", codebooks, (None, None, None), "G, K, d")
    _checks.no_empty_dim(_OP, "codebooks", codebooks, "G, K, d")
    num_groups, num_codes, dim = codebooks.shape
    _checks.shape(_OP, "z", z, (None, num_groups * dim), f"n, G*d = {num_groups}*{dim}")
    _checks.dtype(_OP, "z", z, _FLOAT_DTYPES)
    _checks.dtype(_OP, "codebooks", codebooks, _FLOAT_DTYPES)
    _checks.shape(_OP, "ln_weight", ln_weight, (num_groups, dim), "G, d")
    _checks.shape(_OP, "ln_bias", ln_bias, (num_groups, dim), "G, d")
    _checks.same_device(_OP, z=z, ln_weight=ln_weight, ln_bias=ln_bias, codebooks=codebooks)
    _checks.finite(_OP, "z", z)
    if codebook_sqnorms is not None:
        _checks.shape(_OP, "codebook_sqnorms", codebook_sqnorms, (num_groups, num_codes), "G, K")
        _checks.dtype(_OP, "codebook_sqnorms", codebook_sqnorms, (torch.float32,))
        _checks.same_device(_OP, z=z, codebook_sqnorms=codebook_sqnorms)
    if mode not in MODES:
        raise ValueError(f"{_OP}: mode must be one of {list(MODES)}, got {mode!r}")
    # The largest id, vocab_offset + G*K - 1, must be an int64.
    vocab_offset = _checks.non_negative_int(
        _OP, "vocab_offset", vocab_offset, maximum=_checks.INT64_MAX - num_groups * num_codes + 1
    )
    # > 0: LayerNorm divides by sqrt(var + eps), and a constant row has var = 0.
    eps = _checks.number(_OP, "eps", eps, minimum=0, strict=True)
    if mode == "reference":
        _checks.same_dtype(_OP, codebooks=codebooks, z=z)
    _checks.same_dtype(_OP, z=z, ln_weight=ln_weight, ln_bias=ln_bias)
    if z.numel() and z.stride(-1) != 1:
        raise ValueError(
            f"{_OP}: z must have a contiguous last dim, got strides {tuple(z.stride())}"
        )
    ids = torch.empty(z.shape[0], num_groups, dtype=torch.int64, device=z.device)
    impl = _dispatch.pick(_OP, _IMPLS, backend, z, codebooks)
    impl.run(z, ln_weight, ln_bias, codebooks, codebook_sqnorms, ids, vocab_offset, mode, eps)
    return ids


def official_sqdist(u: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``cdist(u, codes) ** 2`` exactly as torch's matmul formulation computes it, in the inputs' dtype.

    u: [n, d], codes: [K, d] -> [n, K]. Norms are summed and rounded in the input dtype; the GEMM rounds its
    float32 accumulation to the input dtype; then clamp, sqrt and square, each rounded (kelix-ar.md §3.5).
    """
    u_sq = u.square().sum(-1, keepdim=True)
    c_sq = codes.square().sum(-1, keepdim=True)
    u_aug = torch.cat([u * -2, u_sq, torch.ones_like(u_sq)], dim=-1)
    c_aug = torch.cat([codes, torch.ones_like(c_sq), c_sq], dim=-1)
    return (u_aug @ c_aug.T).clamp_min(1e-30).sqrt().square()


def _rowwise_dot(u: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """``u @ codes.T`` ([n, d] x [K, d] -> [n, K]) with the same reduction order for every code.

    A BLAS GEMM may round its tail columns differently, which would break exact ties between identical
    codes; an elementwise product and a last-dim sum does not. Chunked to bound the [rows, K, d] temporary.
    """
    rows = max(1, _CHUNK_ELEMENTS // max(1, codes.numel()))
    return torch.cat([(chunk[:, None, :] * codes[None]).sum(-1) for chunk in u.split(rows)])


def _reference(
    z, ln_weight, ln_bias, codebooks, codebook_sqnorms, ids, vocab_offset, mode, eps
) -> None:
    num_groups, num_codes, dim = codebooks.shape
    for g in range(num_groups):
        z_g = z[:, g * dim : (g + 1) * dim]
        if mode == "reference":
            u = F.layer_norm(z_g, (dim,), ln_weight[g], ln_bias[g], eps)
            dist = official_sqdist(u, codebooks[g])
        else:
            u = F.layer_norm(z_g.float(), (dim,), ln_weight[g].float(), ln_bias[g].float(), eps)
            codes = codebooks[g].float()
            sqnorms = codes.square().sum(-1) if codebook_sqnorms is None else codebook_sqnorms[g]
            dist = sqnorms[None, :] - 2.0 * _rowwise_dot(u, codes)
        # torch.argmin returns the first index among equal minima: the tie rule of the spec.
        ids[:, g] = dist.argmin(dim=-1) + (vocab_offset + g * num_codes)


def _triton(
    z, ln_weight, ln_bias, codebooks, codebook_sqnorms, ids, vocab_offset, mode, eps
) -> None:
    kernels = triton_kernels.kernels_for("codebook_argmin", z)
    if mode == "exact" and codebook_sqnorms is None:
        codebook_sqnorms = codebooks.float().square().sum(-1)  # what _reference computes per group
    kernels.codebook_argmin(
        z,
        ln_weight,
        ln_bias,
        codebooks,
        codebook_sqnorms,
        ids,
        vocab_offset=vocab_offset,
        mode=mode,
        eps=eps,
    )


_IMPLS = {
    "cuda": _dispatch.Impl(_cuda.codebook_argmin, can_run=_cuda.can_run_codebook_argmin),
    "triton": _dispatch.Impl(
        _triton, can_run=_dispatch.needs_triton, auto_can_run=_dispatch.on_cuda
    ),
    "torch": _dispatch.Impl(_reference, can_run=_dispatch.always),
}
