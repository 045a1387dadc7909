"""The two DiT attention cores at Kelix-DiT shapes (kelix-dit.md §3.5.1, §3.5.2, §9.5) and their official-style
baselines, in one case: each point names its ``op`` (``linear_attention`` or ``cross_attention``).

* ``linear_attention``: B=2 (the CFG batch), N=1024 latent tokens, 70 heads of 32, q/k/v per-head views of
  [B, N, 2240] projections. 0.6 GFLOP against 37 MB of q, k, v and output (16 FLOP/byte):
  bandwidth-bound. Baseline: the official LiteLA arithmetic (§9.6): float32 casts, the ones row
  padded onto v, two batched float32 matmuls, a slice-divide and the cast back.
* ``cross_attention``: B=2, 1,024 queries, 20 heads of 112, a 720-row condition with 720 and/or 326
  valid rows (null and conditional branch of CFG). The FLOP and byte formulas count only the keys a
  sample attends to (its valid rows, or all rows when none is valid), the work that remains once the
  padding is skipped: 13.2 GFLOP against 31 MB (423 FLOP/byte) at 720 valid rows, 6.0 GFLOP against
  24 MB (247 FLOP/byte) at 326. Baseline: the official-style eager path, a full masked
  softmax over all 720 keys with the bf16 ``(1 - mask) * -10000`` bias; ``sdpa`` (another baseline):
  ``F.scaled_dot_product_attention`` with that bias as ``attn_mask``, the official call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.cases import BaselineUnavailable, Case, Point, Tensors, within
from kelix_fast import ops

EPS = 1e-8  # the DiT's linear-attention eps
MASK_BIAS = -10000.0
# Each point's roof is the one its arithmetic intensity (FLOP per compulsory byte) runs into on an H100
# SXM: 989 TFLOP/s dense bf16 over 3.35 TB/s. The harness then relates the run to the measured value.
_RIDGE_FLOP_PER_BYTE = 295
_DTYPE = "bfloat16"
# Every point has the same fields (the harness keys baselines on them), in the spec's letters: N latent
# tokens (the queries of both attentions), L condition rows and the valid rows per sample (None for the
# self-attention, which has no condition).
_FULL_LINEAR = ({"B": 2, "N": 1024, "H": 70, "d": 32},)
_QUICK_LINEAR = ({"B": 1, "N": 7, "H": 2, "d": 32}, {"B": 2, "N": 100, "H": 3, "d": 32})
_FULL_CROSS = tuple(
    {"B": 2, "N": 1024, "H": 20, "d": 112, "L": 720, "valid": valid}
    for valid in ((720, 720), (326, 326), (720, 326))
)
_QUICK_CROSS = (
    {"B": 2, "N": 7, "H": 2, "d": 112, "L": 13, "valid": (13, 5)},
    {"B": 2, "N": 30, "H": 2, "d": 112, "L": 40, "valid": (0, 17)},
)


def points(quick: bool) -> list[Point]:
    linear, cross = (_QUICK_LINEAR, _QUICK_CROSS) if quick else (_FULL_LINEAR, _FULL_CROSS)
    shapes = [
        *({"op": "linear_attention", **p, "L": None, "valid": None} for p in linear),
        *({"op": "cross_attention", **p} for p in cross),
    ]
    return [_with_roof(shape | {"dtype": _DTYPE}) for shape in shapes]


def _with_roof(point: Point) -> Point:
    compute = flops(point) >= _RIDGE_FLOP_PER_BYTE * nbytes(point)
    return point | {"roof": "compute" if compute else "bandwidth"}


def _element_size(point: Point) -> int:
    return torch.empty((), dtype=getattr(torch, point["dtype"])).element_size()


def _attended_keys(point: Point) -> int:
    """Keys attended over the batch: a sample's valid rows, or all of them when none is valid."""
    return sum(n if n > 0 else point["L"] for n in point["valid"])


def flops(point: Point) -> int:
    """linear: ``S = relu(k)^T v`` and ``relu(q) S``, ``4 B H N d^2`` (z and the division are lower
    order); cross: ``q k^T`` and ``p v`` over the attended keys, ``4 H N d`` per key."""
    if point["op"] == "linear_attention":
        return 4 * point["B"] * point["H"] * point["N"] * point["d"] ** 2
    return 4 * point["H"] * point["N"] * point["d"] * _attended_keys(point)


def nbytes(point: Point) -> int:
    """Compulsory traffic. linear: q, k, v and the output. cross: q and the output, the attended K/V
    rows, the bool mask."""
    size, heads, dim = _element_size(point), point["H"], point["d"]
    if point["op"] == "linear_attention":
        return 4 * point["B"] * point["N"] * heads * dim * size
    queries = 2 * point["B"] * point["N"] * heads * dim * size
    return queries + 2 * _attended_keys(point) * heads * dim * size + point["B"] * point["L"]


def make_shared(point: Point, device: torch.device) -> Tensors:
    """Only an empty tensor that carries the device and dtype: every input is per set (at full scale
    K/V of 20 layers exceed L2 anyway, and the mask is a few bytes)."""
    return {"placement": torch.empty(0, dtype=getattr(torch, point["dtype"]), device=device)}


def _heads(gen: torch.Generator, placement: torch.Tensor, point: Point, rows: int) -> torch.Tensor:
    """A [B, rows, H*d] projection output viewed per head [B, rows, H, d] (the models' layout)."""
    shape = (point["B"], rows, point["H"] * point["d"])
    projection = torch.randn(shape, generator=gen, device=placement.device)
    return projection.to(placement.dtype).view(point["B"], rows, point["H"], point["d"])


def make_inputs(point: Point, shared: Tensors, seed: int) -> Tensors:
    """linear: q, k, v [B, N, H, d]; cross: q [B, N, H, d], k, v [B, L, H, d] and the right-padded
    key_mask [B, L] bool (the first ``valid[b]`` rows of sample b are valid)."""
    placement = shared["placement"]
    gen = torch.Generator(device=placement.device).manual_seed(seed)
    if point["op"] == "linear_attention":
        return {name: _heads(gen, placement, point, point["N"]) for name in ("q", "k", "v")}
    keys = torch.arange(point["L"], device=placement.device)
    valid = torch.tensor(point["valid"], device=placement.device)
    return {
        "q": _heads(gen, placement, point, point["N"]),
        "k": _heads(gen, placement, point, point["L"]),
        "v": _heads(gen, placement, point, point["L"]),
        "key_mask": keys[None, :] < valid[:, None],
    }


def run(point: Point, inputs: Tensors, backend: str) -> torch.Tensor:
    if point["op"] == "linear_attention":
        return ops.linear_attention(inputs["q"], inputs["k"], inputs["v"], eps=EPS, backend=backend)
    return ops.cross_attention(
        inputs["q"], inputs["k"], inputs["v"], inputs["key_mask"], backend=backend
    )


def _official_linear(inputs: Tensors) -> torch.Tensor:
    """LiteLA as the official code computes it (§3.5.1): [B, H, d, N] float32 operands, v padded with a
    row of ones so that one matmul chain yields numerator and denominator."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    qf = q.permute(0, 2, 3, 1).float().relu()  # [B, H, d, N]
    kf = k.permute(0, 2, 1, 3).float().relu()  # [B, H, N, d]
    vf = F.pad(v.permute(0, 2, 3, 1).float(), (0, 0, 0, 1), value=1.0)  # [B, H, d+1, N]
    out = (vf @ kf) @ qf  # [B, H, d+1, N]
    out = out[:, :, :-1] / (out[:, :, -1:] + EPS)
    return out.to(q.dtype).permute(0, 3, 1, 2)


def _bias_and_heads(inputs: Tensors):
    """The official [B, 1, 1, L] bias in the input dtype and q, k, v as [B, H, L, d]."""
    q = inputs["q"]
    bias = (1 - inputs["key_mask"].to(q.dtype)) * MASK_BIAS  # -9984 in bf16, as the official tensor
    heads = [inputs[name].transpose(1, 2) for name in ("q", "k", "v")]
    return bias[:, None, None, :], heads


def baseline(point: Point, inputs: Tensors, shared: Tensors) -> torch.Tensor:
    """linear: the official LiteLA arithmetic; cross: eager masked softmax over every key (bf16 GEMMs,
    float32 softmax)."""
    if point["op"] == "linear_attention":
        return _official_linear(inputs)
    bias, (q, k, v) = _bias_and_heads(inputs)
    scores = (q @ k.transpose(-1, -2)).float() * point["d"] ** -0.5 + bias.float()
    return (scores.softmax(dim=-1).to(q.dtype) @ v).transpose(1, 2)


def sdpa(point: Point, inputs: Tensors, shared: Tensors) -> torch.Tensor:
    """Cross-attention through PyTorch SDPA with the additive bias as ``attn_mask`` (the official call)."""
    if point["op"] != "cross_attention":
        raise BaselineUnavailable("SDPA has no ReLU linear attention")
    bias, (q, k, v) = _bias_and_heads(inputs)
    try:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    except RuntimeError as err:  # no SDPA kernel for this device, dtype or shape
        raise BaselineUnavailable(f"scaled_dot_product_attention failed: {err}") from err
    return out.transpose(1, 2)


# Within bf16 rounding of the float32 result: a weighted average of values of order 1, so an absolute
# 2e-2 covers the 16-bit GEMMs and weights of an eager or flash path.
check = within(rtol=2e-2, atol=2e-2)


def _probe(inputs: Tensors) -> tuple[torch.Tensor, ...]:
    mask = (inputs["key_mask"],) if "key_mask" in inputs else ()
    return inputs["q"], inputs["k"], inputs["v"], *mask


CASE = Case(
    name="dit_attention",
    roof="bandwidth",  # each point names its own roof
    points=points,
    flops=flops,
    bytes=nbytes,
    shared_key=("dtype",),
    baseline_key=("op", "B", "N", "H", "d", "L", "valid", "dtype"),
    make_shared=make_shared,
    make_inputs=make_inputs,
    run=run,
    baseline=baseline,
    check=check,
    probe=_probe,
    other_baselines={"sdpa": sdpa},
)
