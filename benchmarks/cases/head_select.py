"""``head_select`` at Block Decoder shapes (kelix-ar.md §4.6, §5.6, §7.2, §8 #3) and its official-style baseline.

M rows (one Block Decoder sub-step of M sequences) against the 217,472 x 4,096 bf16 output head: 1.78 GB
streamed per call, so the op is bandwidth-bound until M ~ 300 (§7.2). Modes: ``greedy`` (top_k=1) and
``sample`` (the generate defaults: temperature 0.7, top_k 50, top_p 0.9). The baseline is the official
path: RMSNorm, full bf16 logits [M, V] through ``F.linear``, then ``argmax``, or the ``_sample_group``
filters (sort, softmax, cumsum) and a multinomial draw per row.

Each y sits next to a head row (``y = head[pick] + noise``), so the picked id wins by a margin far above
any rounding and, after top-p 0.9, is the only id left: greedy and sampled ids must equal ``pick`` on
every backend and in the baseline, whatever the sampler. Speed does not depend on the values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.cases import Case, Point, Tensors, ids_equal
from kelix_fast import ops
from kelix_fast.ops.selection import filter_logits

EPS = 1e-6
# head_std: the spread of the head's entries (0.02 is a trained head's order). The picked logit exceeds
# the rest by about D * head_std - 5 sqrt(D) * head_std, which the tiny quick shapes need larger.
_FULL = {"vocab": 217472, "dim": 4096, "head_std": 0.02}
_QUICK = {"vocab": 1000, "dim": 64, "head_std": 1.0}
_FULL_M = (1, 8, 32, 128)
_QUICK_M = (1, 5)
_MODES = {
    "greedy": {"temperature": 1.0, "top_k": 1, "top_p": 1.0},
    "sample": {"temperature": 0.7, "top_k": 50, "top_p": 0.9},
}
_NOISE = 0.05  # y noise relative to the head's spread


def points(quick: bool) -> list[Point]:
    constants, sizes = (_QUICK, _QUICK_M) if quick else (_FULL, _FULL_M)
    return [
        {"M": m, **constants, "dtype": "bfloat16", "mode": mode, **_MODES[mode]}
        for m in sizes
        for mode in _MODES
    ]


def flops(point: Point) -> int:
    """The head GEMM: ``2 M V D`` (RMSNorm and selection are lower order)."""
    return 2 * point["M"] * point["vocab"] * point["dim"]


def nbytes(point: Point) -> int:
    """Compulsory traffic: the head (the whole cost), y, the norm weight, int64 seeds and ids."""
    m, vocab, dim = point["M"], point["vocab"], point["dim"]
    size = torch.empty((), dtype=getattr(torch, point["dtype"])).element_size()
    total = vocab * dim * size + m * dim * size + dim * size + m * 8
    if point["mode"] == "sample":
        total += m * 8
    return total


def make_shared(point: Point, device: torch.device) -> Tensors:
    """The output head [V, D] and the final RMSNorm weight (seed 0)."""
    gen = torch.Generator(device=device).manual_seed(0)
    dtype = getattr(torch, point["dtype"])
    head = (
        torch.randn(point["vocab"], point["dim"], generator=gen, device=device) * point["head_std"]
    )
    norm_weight = 1 + 0.1 * torch.rand(point["dim"], generator=gen, device=device)
    return {"head": head.to(dtype), "norm_weight": norm_weight.to(dtype)}


def make_inputs(point: Point, shared: Tensors, seed: int) -> Tensors:
    """One input set: y [M, D] next to random head rows, seeds [M], the ids that must come out, and the
    shared head and weight (not copied: at 1.78 GB the head is far beyond L2 in every set anyway)."""
    head = shared["head"]
    gen = torch.Generator(device=head.device).manual_seed(seed)
    picks = torch.randint(0, point["vocab"], (point["M"],), generator=gen, device=head.device)
    noise = torch.randn(point["M"], point["dim"], generator=gen, device=head.device)
    y = head[picks].float() / shared["norm_weight"].float() + _NOISE * point["head_std"] * noise
    seeds = torch.randint(-(2**62), 2**62, (point["M"],), generator=gen, device=head.device)
    return {
        "y": y.to(head.dtype),
        "seeds": seeds,
        "picks": picks,
        "head": head,
        "norm_weight": shared["norm_weight"],
    }


def run(point: Point, inputs: Tensors, backend: str) -> torch.Tensor:
    # As the engine's decode step calls it: inside trusted_values, so that the value checks (finite y
    # and head: a pass over the head and a host read) are not timed as the kernel's work.
    with ops.trusted_values():
        return _select(point, inputs, backend)


def _select(point: Point, inputs: Tensors, backend: str) -> torch.Tensor:
    return ops.head_select(
        inputs["y"],
        inputs["norm_weight"],
        inputs["head"],
        eps=EPS,
        temperature=point["temperature"],
        top_k=point["top_k"],
        top_p=point["top_p"],
        seeds=inputs["seeds"],
        backend=backend,
    )


def baseline(point: Point, inputs: Tensors, shared: Tensors) -> torch.Tensor:
    """The official path: RMSNorm, bf16 logits [M, V], argmax or filters + one multinomial per row."""
    y = inputs["y"]
    yf = y.float()
    normed = (yf * torch.rsqrt(yf.square().mean(-1, keepdim=True) + EPS)).to(y.dtype)
    logits = F.linear(normed * shared["norm_weight"], shared["head"])
    if point["top_k"] == 1:
        return logits.argmax(-1)
    filtered = filter_logits(
        logits, temperature=point["temperature"], top_k=point["top_k"], top_p=point["top_p"]
    )
    probs = torch.softmax(filtered, dim=-1)
    draws = []
    for m, seed in enumerate(inputs["seeds"].tolist()):
        generator = torch.Generator(device=y.device).manual_seed(seed)
        draws.append(torch.multinomial(probs[m], 1, generator=generator))
    return torch.cat(draws)


CASE = Case(
    name="head_select",
    roof="bandwidth",
    points=points,
    flops=flops,
    bytes=nbytes,
    shared_key=("vocab", "dim", "head_std", "dtype"),
    baseline_key=("M", "vocab", "dim", "head_std", "dtype", "mode"),
    make_shared=make_shared,
    make_inputs=make_inputs,
    run=run,
    baseline=baseline,
    check=ids_equal,
    probe=lambda inputs: (inputs["y"], inputs["head"]),
)
