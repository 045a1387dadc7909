"""``rms_norm`` at Qwen3 decode shapes (kelix-ar.md §4.2, §4.3) and its official-style baseline.

Three workloads per LLM layer and decode step, bf16: ``residual`` normalises the [B, 4096] residual stream
(``sa_norm`` / ``mlp_norm``); ``add_residual`` is the same norm with the residual add before it fused
in (``ops.add_rms_norm``: what the LLM runs, twice per layer, except the first layer's first norm);
``qk_rope`` normalises the [B, 1, 32, 128] queries per head and rotates them (QK-norm + RoPE in one pass;
the keys are the same with 8 heads). Tiny and bandwidth-bound: at decode
sizes the eager baseline's cost is its kernel launches (about 6 for the norm, 8 more for the rotation),
which is what fusing removes. Baseline: the official eager arithmetic (float32 upcast, ``pow``, ``mean``,
``rsqrt``, cast, weight; then ``rotate_half`` by ``cat`` in float32).
"""

from __future__ import annotations

import torch

from benchmarks.cases import Case, Point, Tensors, within
from kelix_fast import ops

_FULL = {"dim": 4096, "heads": 32, "head_dim": 128}
_QUICK = {"dim": 64, "heads": 4, "head_dim": 16}
_FULL_B = (1, 32, 128)
_QUICK_B = (1, 3)
_DTYPE = "bfloat16"
_EPS = 1e-6


def points(quick: bool) -> list[Point]:
    constants, batches = (_QUICK, _QUICK_B) if quick else (_FULL, _FULL_B)
    return [
        {"workload": workload, "B": b, **constants, "dtype": _DTYPE}
        | ({"op": "add_rms_norm"} if workload == "add_residual" else {})
        for workload in ("residual", "add_residual", "qk_rope")
        for b in batches
    ]


def _shape(point: Point) -> tuple[int, ...]:
    if point["workload"] != "qk_rope":
        return (point["B"], point["dim"])
    return (point["B"], 1, point["heads"], point["head_dim"])


def flops(point: Point) -> int:
    """About 4 per element for the norm (square, sum, scale, weight), 3 more for the rotation."""
    elements = torch.Size(_shape(point)).numel()
    return elements * {"residual": 4, "add_residual": 5, "qk_rope": 7}[point["workload"]]


def nbytes(point: Point) -> int:
    """x read and the output written (bf16), the weight; add_residual: the residual read and the sum
    written too; qk_rope: the float32 cos/sin rows."""
    shape = _shape(point)
    size = torch.empty((), dtype=getattr(torch, point["dtype"])).element_size()
    rows = 4 if point["workload"] == "add_residual" else 2
    total = rows * torch.Size(shape).numel() * size + shape[-1] * size
    if point["workload"] == "qk_rope":
        total += 2 * point["B"] * (point["head_dim"] // 2) * 4
    return total


def make_shared(point: Point, device: torch.device) -> Tensors:
    """Nothing is shared; an empty tensor carries the device to :func:`make_inputs`."""
    return {"anchor": torch.empty(0, device=device)}


def make_inputs(point: Point, shared: Tensors, seed: int) -> Tensors:
    """x (unit normal), a weight near 1 and, for add_residual, a residual stream (unit normal); for
    qk_rope, one position's cos/sin per request."""
    device = shared["anchor"].device
    gen = torch.Generator(device=device).manual_seed(seed)
    shape, dtype = _shape(point), getattr(torch, point["dtype"])
    inputs = {
        "x": torch.randn(shape, generator=gen, device=device).to(dtype),
        "weight": (1 + 0.1 * torch.randn(shape[-1], generator=gen, device=device)).to(dtype),
    }
    if point["workload"] == "add_residual":
        inputs["residual"] = torch.randn(shape, generator=gen, device=device).to(dtype)
    if point["workload"] == "qk_rope":
        half = point["head_dim"] // 2
        angles = torch.rand(point["B"], 1, half, generator=gen, device=device) * 6.3
        inputs |= {"cos": angles.cos(), "sin": angles.sin()}
    return inputs


def run(point: Point, inputs: Tensors, backend: str) -> torch.Tensor:
    """The normalised rows (add_residual: the sum is checked by tests/ops, not here)."""
    if "residual" in inputs:
        return ops.add_rms_norm(
            inputs["x"], inputs["residual"], inputs["weight"], eps=_EPS, backend=backend
        )[0]
    rope = {}
    if "cos" in inputs:
        rope = {"rope_cos": inputs["cos"], "rope_sin": inputs["sin"]}
    return ops.rms_norm(inputs["x"], inputs["weight"], eps=_EPS, backend=backend, **rope)


def baseline(point: Point, inputs: Tensors, shared: Tensors) -> torch.Tensor:
    """The residual add (add_residual), the official RMSNorm module, then (qk_rope) the official
    ``rotate_half`` RoPE."""
    x = inputs["x"] + inputs["residual"] if "residual" in inputs else inputs["x"]
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _EPS)).to(x.dtype)
    normed = normed * inputs["weight"]
    if "cos" not in inputs:
        return normed
    cos = torch.cat([inputs["cos"], inputs["cos"]], -1)[..., None, :]
    sin = torch.cat([inputs["sin"], inputs["sin"]], -1)[..., None, :]
    nf = normed.float()
    half = nf.shape[-1] // 2
    rotated = torch.cat([-nf[..., half:], nf[..., :half]], -1)
    return (nf * cos + rotated * sin).to(x.dtype)


CASE = Case(
    name="rms_norm",
    roof="bandwidth",
    points=points,
    flops=flops,
    bytes=nbytes,
    shared_key=("dtype",),
    baseline_key=("workload", "B", "dim", "heads", "head_dim", "dtype"),
    make_shared=make_shared,
    make_inputs=make_inputs,
    run=run,
    baseline=baseline,
    # One bf16 ulp: the kernel sums the squares in another order than torch.
    check=within(rtol=1.6e-2, atol=1e-2),
    probe=lambda inputs: (inputs["x"], inputs["weight"]),
)
