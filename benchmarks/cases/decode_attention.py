"""``cached_attention`` at Qwen3 decode shapes (kelix-ar.md §4, §7.1) and its official-style baseline.

One decode step (Lq = 1 per request) of one layer: H = 32 query heads over Hkv = 8 KV heads, d = 128,
bf16, every request's cache holding ``context`` keys (equal lengths: ``kv_lens = S``). The op reads each
K/V tile once per KV head (GQA), so it is bandwidth-bound: bytes are the K/V rows actually read plus q,
the output and the two [B] int64 length vectors. The op runs inside ``ops.trusted_values()``, as in the
engine's decode loop (no host-side value checks).

Baseline (official-style eager): K/V ``repeat_interleave``d to all 32 heads, ``q @ k^T`` in bf16, an
additive mask from ``kv_lens``, float32 softmax cast back to bf16, ``@ v``. Other baseline: PyTorch SDPA on
the same expanded heads without a mask (valid here because every request sees its whole cache).
Points whose memory (the cache plus the baseline's 4x expanded copy) would exceed ~40 GB are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.cases import Case, Point, Tensors
from kelix_fast import ops

_FULL = {"heads": 32, "kv_heads": 8, "dim": 128}
_QUICK = {"heads": 4, "kv_heads": 2, "dim": 16}
_FULL_SIZES = [(b, s) for b in (1, 8, 32, 128) for s in (1024, 4096, 16384, 32768)]
_QUICK_SIZES = [(1, 40), (3, 100)]
_MAX_BYTES = 40e9  # the cache plus the baseline's expanded K/V


def element_size(point: Point) -> int:
    return torch.empty((), dtype=getattr(torch, point["dtype"])).element_size()


def cache_bytes(point: Point) -> int:
    """The K and V caches of one layer: ``2 B S Hkv d`` elements."""
    return (
        2
        * point["batch"]
        * point["context"]
        * point["kv_heads"]
        * point["dim"]
        * element_size(point)
    )


def points(quick: bool) -> list[Point]:
    constants, sizes = (_QUICK, _QUICK_SIZES) if quick else (_FULL, _FULL_SIZES)
    candidates = [
        {
            "op": "cached_attention",
            "batch": b,
            "context": s,
            "q_len": 1,
            **constants,
            "dtype": "bfloat16",
        }
        for b, s in sizes
    ]
    group = constants["heads"] // constants["kv_heads"]
    return [p for p in candidates if (1 + group) * cache_bytes(p) <= _MAX_BYTES]


def flops(point: Point) -> int:
    """``q k^T`` and ``p v``: ``4 B Lq H S d``."""
    return 4 * point["batch"] * point["q_len"] * point["heads"] * point["context"] * point["dim"]


def nbytes(point: Point) -> int:
    """K/V rows read (all ``kv_lens = S`` of them, once per KV head), q and the output, two [B] int64."""
    rows = point["batch"] * point["q_len"] * point["heads"] * point["dim"]
    return cache_bytes(point) + 2 * rows * element_size(point) + 2 * 8 * point["batch"]


def make_shared(point: Point, device: torch.device) -> Tensors:
    """The length vectors: every request sees its whole cache (``kv_lens = S``, ``q_start = S - Lq``)."""
    kv_lens = torch.full((point["batch"],), point["context"], dtype=torch.int64, device=device)
    return {"kv_lens": kv_lens, "q_start": kv_lens - point["q_len"]}


def make_inputs(point: Point, shared: Tensors, seed: int) -> Tensors:
    """q [B, Lq, H, d] and fresh caches [B, S, Hkv, d] (standard normal), plus the shared lengths."""
    device = shared["kv_lens"].device
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, point["dtype"])
    q_shape = (point["batch"], point["q_len"], point["heads"], point["dim"])
    kv_shape = (point["batch"], point["context"], point["kv_heads"], point["dim"])
    q, k, v = (
        torch.randn(shape, generator=gen, device=device, dtype=dtype)
        for shape in (q_shape, kv_shape, kv_shape)
    )
    return {"q": q, "k_cache": k, "v_cache": v, **shared}


def run(point: Point, inputs: Tensors, backend: str) -> torch.Tensor:
    with ops.trusted_values():
        return ops.cached_attention(
            inputs["q"],
            inputs["k_cache"],
            inputs["v_cache"],
            q_start=inputs["q_start"],
            kv_lens=inputs["kv_lens"],
            causal=True,
            backend=backend,
        )


def _expanded(inputs: Tensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as [B, H, L, d] with K/V repeated to every query head (the official GQA path)."""
    q, k, v = inputs["q"], inputs["k_cache"], inputs["v_cache"]
    group = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(group, dim=2) for t in (k, v))
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def baseline(point: Point, inputs: Tensors, shared: Tensors) -> torch.Tensor:
    """Official-style eager attention: expanded heads, bf16 scores, additive length mask, float32 softmax."""
    q, k, v = _expanded(inputs)
    scores = (q @ k.transpose(-1, -2)) * point["dim"] ** -0.5  # [B, H, Lq, S]
    keys = torch.arange(point["context"], device=q.device)
    hidden = keys[None, :] >= inputs["kv_lens"][:, None]  # [B, S]
    scores = scores.masked_fill(hidden[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ v).transpose(1, 2)


def sdpa(point: Point, inputs: Tensors, shared: Tensors) -> torch.Tensor:
    """PyTorch SDPA on expanded heads, no mask (equal lengths: each request sees its whole cache)."""
    q, k, v = _expanded(inputs)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def check(point: Point, got: torch.Tensor, want: torch.Tensor) -> str | None:
    """Within bf16 rounding of the float32-softmax reference: |got - want| <= 2% of max|want| + 1e-3."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"output {tuple(got.shape)} {got.dtype}, reference {tuple(want.shape)} {want.dtype}"
    error = (got.float() - want.float()).abs().max().item()
    bound = 0.02 * want.float().abs().max().item() + 1e-3
    return None if error <= bound else f"max abs error {error:.3g} > {bound:.3g}"


CASE = Case(
    name="decode_attention",
    roof="bandwidth",
    points=points,
    flops=flops,
    bytes=nbytes,
    shared_key=("batch", "context", "q_len"),
    baseline_key=("batch", "context", "q_len", "heads", "kv_heads", "dim", "dtype"),
    make_shared=make_shared,
    make_inputs=make_inputs,
    run=run,
    baseline=baseline,
    check=check,
    probe=lambda inputs: (inputs["q"], inputs["k_cache"], inputs["v_cache"]),
    other_baselines={"torch_sdpa_expanded_nomask": sdpa},
)
