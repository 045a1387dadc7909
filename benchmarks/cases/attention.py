"""``attention`` over packed variable-length sequences at Kelix shapes (kelix-ar.md §4.5, §8 #5, #7) and its
official-style baselines.

Workloads (bf16; a point's sequences are ``runs`` of (count, length)):

* ``llm_causal``: LLM prefill, 32 query / 8 KV heads of 128, 1k and 4k tokens in one sequence, and 16k
  tokens as a pack of 4 x 4k documents (packed training is document-causal, §4.5; one 16k sequence
  would need 34 GB of float32 scores in the eager baseline).
* ``llm_block_causal``: the same shapes under ``mask="block_causal"`` with blocks of 9 tokens (a Kelix
  block is 8 codes + the end-of-block slot). Kelix's own LLM has no block-causal mask (a whole block
  is one position, §4.5): this is the generic block-autoregressive pattern, measured for the tile
  skipping (every query sees its own block whole and the earlier blocks).
* ``block_decoder``: the Block Decoder's teacher-forced 9-slot sequences packed together (§8 #5): 1024
  and 4096 groups of 9 tokens, 4 heads of 128, each group an independent causal sequence
  (``cu_seqlens`` per group, ``mask="causal"``).
* ``vit``: Kelix-Tok's ViT (§8 #7): 16 heads of 72, 8 images of 1024..4096 patches, bidirectional
  within each image.

FLOPs count only the visible (query, key) pairs: ``4 d H`` per pair (``q k^T`` and ``p v``); the roof
is compute. Bytes: q, k, v and the output once, plus ``cu_seqlens``.

Baselines, all timed on the same inputs: ``official_eager`` pads the pack to [B, L_max], expands the
KV heads, materialises the masked bf16 scores with an additive mask, softmax in float32, as HF's
eager attention; ``sdpa`` is ``F.scaled_dot_product_attention`` restricted to its fused backends
(flash / memory-efficient / cuDNN): ``is_causal`` or no mask on equal-length sequences as one batch,
per sequence otherwise, a boolean ``attn_mask`` (with expanded KV heads) for block-causal;
``flex_attention`` is FlexAttention compiled on CUDA (eager on the CPU) with the equivalent block mask,
built once per point outside the timed calls.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from benchmarks.cases import BaselineUnavailable, Case, Point, Tensors, within
from kelix_fast import ops

_DTYPE = "bfloat16"
_LLM = {"H": 32, "Hkv": 8, "d": 128}
_BLOCK = 9
_VIT_IMAGES = (
    (1, 1024),
    (1, 1444),
    (1, 1600),
    (1, 2048),
    (1, 2304),
    (1, 2916),
    (1, 3136),
    (1, 4096),
)
_FULL = (
    *(
        {"workload": f"llm_{mask}", "mask": mask, "runs": runs, **_LLM}
        for mask in ("causal", "block_causal")
        for runs in (((1, 1024),), ((1, 4096),), ((4, 4096),))
    ),
    *(
        {
            "workload": "block_decoder",
            "mask": "causal",
            "runs": ((groups, 9),),
            "H": 4,
            "Hkv": 4,
            "d": 128,
        }
        for groups in (1024, 4096)
    ),
    {"workload": "vit", "mask": "bidirectional", "runs": _VIT_IMAGES, "H": 16, "Hkv": 16, "d": 72},
)
_QUICK = (
    {"workload": "llm_causal", "mask": "causal", "runs": ((1, 37),), "H": 4, "Hkv": 1, "d": 128},
    {
        "workload": "llm_causal",
        "mask": "causal",
        "runs": ((2, 20), (1, 0), (1, 3)),
        "H": 4,
        "Hkv": 1,
        "d": 128,
    },
    {
        "workload": "llm_block_causal",
        "mask": "block_causal",
        "runs": ((1, 37),),
        "H": 4,
        "Hkv": 1,
        "d": 128,
    },
    {"workload": "block_decoder", "mask": "causal", "runs": ((5, 9),), "H": 4, "Hkv": 4, "d": 128},
    {
        "workload": "vit",
        "mask": "bidirectional",
        "runs": ((1, 16), (1, 25)),
        "H": 2,
        "Hkv": 2,
        "d": 72,
    },
)


def points(quick: bool) -> list[Point]:
    return [
        {
            **shape,
            "block_size": _BLOCK if shape["mask"] == "block_causal" else None,
            "T": sum(count * n for count, n in shape["runs"]),
            "dtype": _DTYPE,
        }
        for shape in (_QUICK if quick else _FULL)
    ]


def lengths(point: Point) -> list[int]:
    return [n for count, n in point["runs"] for _ in range(count)]


def visible_pairs(point: Point) -> int:
    """(query, key) pairs the mask lets through, over the pack."""
    total = 0
    for n in lengths(point):
        if point["mask"] == "bidirectional":
            total += n * n
        elif point["mask"] == "causal":
            total += n * (n + 1) // 2
        else:  # query i sees the keys up to the end of its block
            size = point["block_size"]
            total += sum(min(n, (i // size + 1) * size) for i in range(n))
    return total


def flops(point: Point) -> int:
    """``q k^T`` and ``p v`` over the visible pairs: ``4 d H`` each."""
    return 4 * point["d"] * point["H"] * visible_pairs(point)


def _element_size(point: Point) -> int:
    return torch.empty((), dtype=getattr(torch, point["dtype"])).element_size()


def nbytes(point: Point) -> int:
    """Compulsory traffic: q and the output [T, H, d], k and v [T, Hkv, d], int32 cu_seqlens."""
    size = _element_size(point)
    heads = 2 * point["H"] + 2 * point["Hkv"]
    return point["T"] * heads * point["d"] * size + 4 * (len(lengths(point)) + 1)


def make_shared(point: Point, device: torch.device) -> Tensors:
    """Only an empty tensor that carries the device and dtype: every input is per set."""
    return {"placement": torch.empty(0, dtype=getattr(torch, point["dtype"]), device=device)}


def make_inputs(point: Point, shared: Tensors, seed: int) -> Tensors:
    """q [T, H, d], k/v [T, Hkv, d] (unit normal: scores of order 1 after the d^-1/2 scale) and
    cu_seqlens [n+1] int32."""
    placement = shared["placement"]
    device = placement.device
    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {
        name: torch.randn(point["T"], heads, point["d"], generator=gen, device=device).to(
            placement.dtype
        )
        for name, heads in (("q", point["H"]), ("k", point["Hkv"]), ("v", point["Hkv"]))
    }
    bounds = [0, *itertools.accumulate(lengths(point))]
    return {**tensors, "cu_seqlens": torch.tensor(bounds, dtype=torch.int32, device=device)}


def run(point: Point, inputs: Tensors, backend: str) -> torch.Tensor:
    # Inside trusted_values, as the ViT calls it (and as the decode_attention and head_select cases
    # run): otherwise the cu_seqlens check reads it on the host in every timed call, and the host time
    # of everything launched after that synchronisation counts as device time.
    with ops.trusted_values():
        return ops.attention(
            inputs["q"],
            inputs["k"],
            inputs["v"],
            cu_seqlens=inputs["cu_seqlens"],
            max_seqlen=max(lengths(point)),  # known on the host: no cu_seqlens read
            mask=point["mask"],
            block_size=point["block_size"],
            backend=backend,
        )


def _allowed(point: Point, n: int, device: torch.device) -> torch.Tensor:
    """[n, n] bool: the point's mask inside one sequence of n tokens."""
    pos = torch.arange(n, device=device)
    if point["mask"] == "bidirectional":
        return torch.ones(n, n, dtype=torch.bool, device=device)
    if point["mask"] == "causal":
        return pos[None, :] <= pos[:, None]
    blocks = pos // point["block_size"]
    return blocks[None, :] <= blocks[:, None]


def baseline(point: Point, inputs: Tensors, shared: Tensors) -> torch.Tensor:
    """HF-style eager attention on the padded batch: pad to [B, L_max], repeat the KV heads, bf16
    scores plus an additive mask (dtype minimum on padding and masked pairs), float32 softmax cast
    back, bf16 ``p v``, unpad."""
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    device, dtype = q.device, q.dtype
    sizes = [n for n in lengths(point) if n > 0]
    longest = max(sizes)
    batch = torch.repeat_interleave(
        torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)
    )
    slot = torch.cat([torch.arange(n, device=device) for n in sizes])

    def pad(x: torch.Tensor) -> torch.Tensor:  # [T, h, d] -> [B, h, L_max, d]
        padded = x.new_zeros(len(sizes), longest, *x.shape[1:])
        padded[batch, slot] = x
        return padded.transpose(1, 2)

    group = point["H"] // point["Hkv"]
    qp = pad(q)
    kp = pad(k).repeat_interleave(group, dim=1)
    vp = pad(v).repeat_interleave(group, dim=1)
    valid = (
        torch.arange(longest, device=device)[None, :] < torch.tensor(sizes, device=device)[:, None]
    )
    allowed = _allowed(point, longest, device)[None] & valid[:, None, :]  # [B, L, L]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )
    scores = (qp @ kp.transpose(-1, -2)) * point["d"] ** -0.5 + bias[:, None]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(dtype)
    out = (probs @ vp).transpose(1, 2)  # [B, L_max, H, d]
    return out[batch, slot]


def sdpa(point: Point, inputs: Tensors, shared: Tensors) -> torch.Tensor:
    """``scaled_dot_product_attention`` on its fused backends only (flash, memory-efficient, cuDNN)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (inputs[name] for name in ("q", "k", "v"))
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    sizes = lengths(point)
    causal = point["mask"] == "causal"
    try:
        with sdpa_kernel(fused):
            if point["mask"] != "block_causal" and len(set(sizes)) == 1:
                # Equal lengths: the pack is a [B, n] batch as it stands (a view, no copy).
                batch, n = len(sizes), sizes[0]
                views = [x.view(batch, n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v)]
                out = F.scaled_dot_product_attention(*views, is_causal=causal, enable_gqa=True)
                return out.transpose(1, 2).reshape(q.shape)
            out = torch.empty_like(q)
            group = point["H"] // point["Hkv"]
            bounds = [0, *itertools.accumulate(sizes)]
            for start, end in itertools.pairwise(bounds):
                if end == start:
                    continue
                qs, ks, vs = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))
                if point["mask"] == "block_causal":
                    # No fused backend takes GQA together with a mask: expand the KV heads.
                    ks, vs = ks.repeat_interleave(group, 1), vs.repeat_interleave(group, 1)
                    mask = _allowed(point, end - start, q.device)
                    seq = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask)
                else:
                    seq = F.scaled_dot_product_attention(
                        qs, ks, vs, is_causal=causal, enable_gqa=True
                    )
                out[start:end] = seq[0].transpose(0, 1)
            return out
    except RuntimeError as err:  # no fused SDPA kernel for this device, dtype, mask or head dim
        raise BaselineUnavailable(f"no fused scaled_dot_product_attention backend: {err}") from err


_FLEX: dict[tuple, tuple] = {}  # one entry: the last point's block mask and compiled function


def _flex_plan(point: Point, device: torch.device):
    """(block mask, flex function) of a point, built once outside the timed calls."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    key = (tuple(sorted((k, str(v)) for k, v in point.items())), str(device))
    if key not in _FLEX:
        _FLEX.clear()
        sizes = lengths(point)
        doc = torch.repeat_interleave(
            torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device)
        )
        starts = torch.tensor([0, *itertools.accumulate(sizes)][:-1], device=device)
        pos = torch.arange(point["T"], device=device) - starts[doc]
        block = pos // (point["block_size"] or 1)
        kind = point["mask"]

        def mask_mod(b, h, q_idx, kv_idx):
            same = doc[q_idx] == doc[kv_idx]
            if kind == "causal":
                return same & (kv_idx <= q_idx)
            if kind == "block_causal":
                return same & (block[kv_idx] <= block[q_idx])
            return same

        block_mask = create_block_mask(mask_mod, None, None, point["T"], point["T"], device=device)
        fn = (
            torch.compile(flex_attention, dynamic=False)
            if device.type == "cuda"
            else flex_attention
        )
        _FLEX[key] = (block_mask, fn)
    return _FLEX[key]


def flex(point: Point, inputs: Tensors, shared: Tensors) -> torch.Tensor:
    """FlexAttention over the whole pack as one [1, H, T, d] sequence with a document block mask."""
    q, k, v = (inputs[name].transpose(0, 1)[None] for name in ("q", "k", "v"))
    try:
        block_mask, fn = _flex_plan(point, q.device)
        out = fn(q, k, v, block_mask=block_mask, enable_gqa=True)
    except (
        Exception
    ) as err:  # compile or kernel failures of an optional rival, recorded with the reason
        raise BaselineUnavailable(f"flex_attention failed: {type(err).__name__}: {err}") from err
    return out[0].transpose(0, 1)


# Within bf16 rounding of the float32 reference: outputs are weighted averages of unit-normal values,
# so an absolute and relative 2e-2 covers 16-bit GEMMs and probabilities.
check = within(rtol=2e-2, atol=2e-2)


CASE = Case(
    name="attention",
    roof="compute",
    points=points,
    flops=flops,
    bytes=nbytes,
    shared_key=("dtype",),
    baseline_key=("workload", "mask", "runs", "H", "Hkv", "d", "block_size", "dtype"),
    make_shared=make_shared,
    make_inputs=make_inputs,
    run=run,
    baseline=baseline,
    check=check,
    probe=lambda inputs: (inputs["q"], inputs["k"], inputs["v"], inputs["cu_seqlens"]),
    other_baselines={"sdpa": sdpa, "flex_attention": flex},
)
