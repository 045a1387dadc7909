"""One function per fused operation, each with its PyTorch reference and a backend table.

Models call these; they never launch kernels themselves (ARCHITECTURE.md, "Ops"). Every op takes
``backend="auto" | "cuda" | "triton" | "torch"``; ``backend="torch"`` is its reference, the readable
PyTorch code that is the op's spec, and the route by which tests and benchmarks check every kernel.

The ops live in modules named after what they compute, never after an op, so that no function shadows
a module: ``activation`` (``silu_mul``), ``codebook`` (``codebook_argmin``), ``embedding``
(``block_embed``), ``selection`` (``head_select``), ``flash_attention`` (``attention``),
``decode_attention`` (``cached_attention``), ``dit_attention`` (``linear_attention``,
``cross_attention``) and ``norm`` (``rms_norm``, ``add_rms_norm``, ``rotate_half_rope``). Each kernel
file of ``kelix_fast.triton_kernels`` and ``csrc/`` carries the name of its op, except the two attention
kernels, named like their ops modules after their algorithm: ``flash_attention`` and
``decode_attention``.
"""

import contextlib

import torch

from kelix_fast.ops import (
    _dispatch,
    activation,
    codebook,
    decode_attention,
    dit_attention,
    embedding,
    flash_attention,
    norm,
    selection,
)
from kelix_fast.ops._checks import trusted_values
from kelix_fast.ops._dispatch import BACKENDS, BackendUnavailableError
from kelix_fast.ops.activation import silu_mul
from kelix_fast.ops.codebook import codebook_argmin
from kelix_fast.ops.decode_attention import cached_attention
from kelix_fast.ops.dit_attention import cross_attention, linear_attention
from kelix_fast.ops.embedding import block_embed
from kelix_fast.ops.flash_attention import attention
from kelix_fast.ops.norm import add_rms_norm, rms_norm, rotate_half_rope
from kelix_fast.ops.selection import head_select

__all__ = [
    "BACKENDS",
    "OPS",
    "BackendUnavailableError",
    "add_rms_norm",
    "attention",
    "block_embed",
    "cached_attention",
    "codebook_argmin",
    "cross_attention",
    "head_select",
    "linear_attention",
    "resolve_backend",
    "rms_norm",
    "rotate_half_rope",
    "silu_mul",
    "trusted_values",
    "use_backends",
]

_TABLES = {
    "add_rms_norm": norm._IMPLS,  # the rms_norm kernels in their residual mode
    "attention": flash_attention._ATTENTION_IMPLS,
    "cached_attention": decode_attention._IMPLS,
    "block_embed": embedding._IMPLS,
    "codebook_argmin": codebook._IMPLS,
    "cross_attention": dit_attention._CROSS_IMPLS,
    "head_select": selection._IMPLS,
    "linear_attention": dit_attention._LINEAR_IMPLS,
    "rms_norm": norm._IMPLS,
    "silu_mul": activation._IMPLS,
}


OPS = tuple(sorted(_TABLES))  # every op's name, as resolve_backend and use_backends take it


def resolve_backend(op: str, backend: str, *tensors: torch.Tensor) -> str:
    """The backend ``op`` would run for ``backend`` (``"auto"`` or explicit) on these inputs, or raise why none."""
    if op not in _TABLES:
        raise ValueError(f"resolve_backend: op must be one of {sorted(_TABLES)}, got {op!r}")
    return _dispatch.resolve(op, _TABLES[op], backend, *tensors)


def use_backends(**choices: str) -> contextlib.AbstractContextManager[None]:
    """A scope in which ``backend="auto"`` calls of the named ops run the named backend, e.g.
    ``with ops.use_backends(attention="triton", cached_attention="triton"): model(...)``."""
    unknown = sorted(set(choices) - set(_TABLES))
    if unknown:
        raise ValueError(f"use_backends: unknown op(s) {unknown}; ops are {sorted(_TABLES)}")
    return _dispatch.use_backends(**choices)
