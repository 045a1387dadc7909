"""One function per fused operation, each with its PyTorch reference and a backend table.

Models call these; they never launch kernels themselves (ARCHITECTURE.md, "Ops").
"""

import contextlib

import torch

from kelix_fast.ops import _dispatch
from kelix_fast.ops import attention as _attention
from kelix_fast.ops import block_embed as _block_embed
from kelix_fast.ops import cached_attention as _cached_attention
from kelix_fast.ops import codebook_argmin as _codebook_argmin
from kelix_fast.ops import cross_attention as _cross_attention
from kelix_fast.ops import head_select as _head_select
from kelix_fast.ops import linear_attention as _linear_attention
from kelix_fast.ops import rms_norm as _rms_norm
from kelix_fast.ops._checks import trusted_values
from kelix_fast.ops._dispatch import BACKENDS, BackendUnavailableError
from kelix_fast.ops.attention import attention
from kelix_fast.ops.block_embed import block_embed
from kelix_fast.ops.cached_attention import cached_attention
from kelix_fast.ops.codebook_argmin import codebook_argmin
from kelix_fast.ops.cross_attention import cross_attention
from kelix_fast.ops.head_select import head_select
from kelix_fast.ops.linear_attention import linear_attention
from kelix_fast.ops.rms_norm import rms_norm, rotate_half_rope

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
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
    "trusted_values",
    "use_backends",
]

_TABLES = {
    "attention": _attention._ATTENTION_IMPLS,
    "cached_attention": _cached_attention._IMPLS,
    "block_embed": _block_embed._IMPLS,
    "codebook_argmin": _codebook_argmin._IMPLS,
    "cross_attention": _cross_attention._IMPLS,
    "head_select": _head_select._IMPLS,
    "linear_attention": _linear_attention._IMPLS,
    "rms_norm": _rms_norm._IMPLS,
}


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
