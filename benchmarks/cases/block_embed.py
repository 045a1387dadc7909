"""``block_embed`` at Kelix LLM shapes (kelix-ar.md §4.4, §8 #2) and its official-style baseline.

Every group is a full visual block ``[v0..v7, q_eos]`` with ``v_j`` drawn from sub-codebook j: all 8 slots
count, so each group reads 8 distinct table rows (the worst case; a text block reads one). The baseline
is the official eager path: gather the [B, L, 8, D] sub-embeddings, mask, sum in the table dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.cases import Case, Point, Tensors
from kelix_fast import ops

_FULL = {"vocab": 217472, "dim": 4096, "text_vocab": 151936, "q_eos": 151681, "groups": 8}
_QUICK = {"vocab": 100 + 8 * 16, "dim": 64, "text_vocab": 100, "q_eos": 90, "groups": 8}
_FULL_BL = ((1, 1), (1, 4096), (32, 1), (32, 4096))
_QUICK_BL = ((1, 1), (2, 5))
_DTYPE = "bfloat16"


def points(quick: bool) -> list[Point]:
    constants, sizes = (_QUICK, _QUICK_BL) if quick else (_FULL, _FULL_BL)
    return [{"B": b, "L": length, **constants, "dtype": _DTYPE} for b, length in sizes]


def _element_size(point: Point) -> int:
    return torch.empty((), dtype=getattr(torch, point["dtype"])).element_size()


def flops(point: Point) -> int:
    """One multiply-add per gathered element: ``B L G D`` (G = 8 slots)."""
    return point["B"] * point["L"] * point["groups"] * point["dim"]


def nbytes(point: Point) -> int:
    """Compulsory traffic: int64 ids [B, L, G+1], G table rows per group, the [B, L, D] output."""
    groups_bl = point["B"] * point["L"]
    size = _element_size(point)
    return (
        groups_bl * (point["groups"] + 1) * 8
        + groups_bl * point["groups"] * point["dim"] * size
        + groups_bl * point["dim"] * size
    )


def make_shared(point: Point, device: torch.device) -> Tensors:
    """The embedding table [V, D] (seed 0), shared by every input set."""
    gen = torch.Generator(device=device).manual_seed(0)
    table = 0.02 * torch.randn(point["vocab"], point["dim"], generator=gen, device=device)
    return {"table": table.to(getattr(torch, point["dtype"]))}


def make_inputs(point: Point, shared: Tensors, seed: int) -> Tensors:
    """Fresh ids of visual groups ``[v0..v7, q_eos]``, ``v_j = text_vocab + K j + code`` (K = codes per sub-codebook)."""
    groups, text_vocab = point["groups"], point["text_vocab"]
    codes = (point["vocab"] - text_vocab) // groups
    device = shared["table"].device
    gen = torch.Generator(device=device).manual_seed(seed)
    picks = torch.randint(0, codes, (point["B"], point["L"], groups), generator=gen, device=device)
    visual = picks + text_vocab + codes * torch.arange(groups, device=device)
    eob = torch.full((point["B"], point["L"], 1), point["q_eos"], device=device)
    return {
        "ids": torch.cat([visual, eob], dim=-1),
        "table": shared["table"],
    }  # the table is shared


def run(point: Point, inputs: Tensors, backend: str) -> torch.Tensor:
    return ops.block_embed(
        inputs["ids"],
        inputs["table"],
        q_eos=point["q_eos"],
        text_vocab=point["text_vocab"],
        backend=backend,
    )


def baseline(point: Point, inputs: Tensors, shared: Tensors) -> torch.Tensor:
    """The official ``UnifiedTokenEmbedding`` forward: gather [B, L, 8, D], mask, sum (table dtype)."""
    slots = inputs["ids"][..., : point["groups"]]
    rows = torch.where(slots[..., :1] >= point["text_vocab"], slots, slots[..., :1])
    valid = torch.cumprod(slots != point["q_eos"], dim=-1)
    embeds = F.embedding(rows, shared["table"])
    return (embeds * valid[..., None].to(embeds.dtype)).sum(dim=-2)


def check(point: Point, got: torch.Tensor, want: torch.Tensor) -> str | None:
    """Within bf16 rounding of the float32 sum (a kernel may add the 8 rows in another order)."""
    try:
        torch.testing.assert_close(got, want)
    except AssertionError as err:
        return str(err).splitlines()[0]
    return None


CASE = Case(
    name="block_embed",
    roof="bandwidth",
    points=points,
    flops=flops,
    bytes=nbytes,
    shared_key=("vocab", "dim", "dtype"),
    baseline_key=("B", "L", "vocab", "dim", "text_vocab", "q_eos", "groups", "dtype"),
    make_shared=make_shared,
    make_inputs=make_inputs,
    run=run,
    baseline=baseline,
    check=check,
    probe=lambda inputs: (inputs["ids"], inputs["table"]),
)
