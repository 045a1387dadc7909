"""``silu_mul`` at Qwen3-8B decode shapes and its official-style baseline.

One workload per MLP and decode step, bf16: the activation of the fused gate/up projection,
``silu(gu[:, :I]) * gu[:, I:]`` on ``gu`` [B, 2I] with I = 12288 (Qwen3-8B's intermediate size; the
LLM and the Block Decoder both run it once per layer). Bandwidth-bound: one pass reads 2I and writes I
elements per row (``bytes``); about 5 FLOP per output element (negate, exp, add, divide, multiply).
At decode sizes the eager baseline's cost is its two kernel launches (``silu``, then the product)
and its second pass over the silu output, which is what fusing removes.
Baseline: the official eager arithmetic, ``F.silu(gate) * up`` on the two halves of the projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.cases import Case, Point, Tensors, within
from kelix_fast import ops

_FULL_H = 12288
_QUICK_H = 40
_FULL_B = (1, 32, 128)
_QUICK_B = (1, 3)
_DTYPE = "bfloat16"


def points(quick: bool) -> list[Point]:
    half, batches = (_QUICK_H, _QUICK_B) if quick else (_FULL_H, _FULL_B)
    return [{"B": b, "I": half, "dtype": _DTYPE} for b in batches]


def flops(point: Point) -> int:
    """About 5 per output element: negate, exp, add, divide (the sigmoid), multiply."""
    return 5 * point["B"] * point["I"]


def nbytes(point: Point) -> int:
    """The [B, 2I] projection read and the [B, I] output written, once each."""
    size = torch.empty((), dtype=getattr(torch, point["dtype"])).element_size()
    return (2 + 1) * point["B"] * point["I"] * size


def make_shared(point: Point, device: torch.device) -> Tensors:
    """Nothing is shared; an empty tensor carries the device to :func:`make_inputs`."""
    return {"anchor": torch.empty(0, device=device)}


def make_inputs(point: Point, shared: Tensors, seed: int) -> Tensors:
    """The fused gate/up projection ``x`` [B, 2I]: gate and up columns, normal with std 2 (gates
    spanning silu's curved part and its linear tail)."""
    device = shared["anchor"].device
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (point["B"], 2 * point["I"])
    x = 2 * torch.randn(shape, generator=gen, device=device)
    return {"x": x.to(getattr(torch, point["dtype"]))}


def run(point: Point, inputs: Tensors, backend: str) -> torch.Tensor:
    return ops.silu_mul(inputs["x"], backend=backend)


def baseline(point: Point, inputs: Tensors, shared: Tensors) -> torch.Tensor:
    """The official MLP's activation on the split projection: two launches."""
    gate, up = inputs["x"].chunk(2, dim=-1)
    return F.silu(gate) * up


CASE = Case(
    name="silu_mul",
    roof="bandwidth",
    points=points,
    flops=flops,
    bytes=nbytes,
    shared_key=("dtype",),
    baseline_key=("B", "I", "dtype"),
    make_shared=make_shared,
    make_inputs=make_inputs,
    run=run,
    baseline=baseline,
    # Two bf16 ulps: where the kernel's float32 exp differs from torch's in the last bit, silu may
    # round to the neighbouring bf16 value and the product moves by one or two ulps.
    check=within(rtol=1.6e-2, atol=1e-6),
    probe=lambda inputs: (inputs["x"],),
)
