"""``ops.attention`` (packed varlen, block-structured masks) and ``ops.cached_attention`` against naive
float64 references with explicit heads and masks.

Packs are prefixes of wider buffers whose rows past T hold NaN: a masked-out key still multiplies its
value by a zero weight, so only NaN (0 * NaN = NaN) shows a key or value read past the pack. Keys of a
neighbouring sequence are random, so attending to one changes the output. Under the interpreter the
kernel's query tiles are 64 rows and its key tiles 32 (``INTERPRETER_BLOCKS``): lengths 1, 7, 100, 129
cover a single row, partial tiles, several query tiles and key tiles whose edges do not line up with the
query tiles, and the block sizes 5 and 9 put block edges inside tiles.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kelix_fast import ops, triton_kernels
from kelix_fast.ops import BackendUnavailableError
from kelix_fast.ops import flash_attention as attention_op

STALE = float("nan")  # rows past the pack
PACK = [1, 7, 100, 0, 129]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# A row whose visible keys all carry the -10000 bias has float32 scores near -10000, rounded to 2^-10
# (5e-4 at most): its output is that uncertain in any float32 implementation.
BIASED_ROWS_ATOL = 5e-3
MODES = {
    "bidirectional": {"mask": "bidirectional"},
    "causal": {"mask": "causal"},
    "block9": {"mask": "block_causal", "block_size": 9},
    "block_ids": {"mask": "block_causal", "block_ids": "random"},
    "block5_causal": {"mask": "block_causal", "block_size": 5, "within_block": "causal"},
}


def packed(lengths, heads, kv_heads, dim, *, dtype=torch.float32, seed=0):
    """q [T, H, d], k/v [T, Hkv, d] (prefixes of buffers with NaN rows past T), cu_seqlens int32."""
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    tensors = []
    for h in (heads, kv_heads, kv_heads):
        wide = torch.full((tokens + 5, h, dim), STALE)
        wide[:tokens] = torch.randn(tokens, h, dim, generator=gen)
        tensors.append(wide.to(dtype)[:tokens])
    cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    return *tensors, cu


def random_block_ids(lengths, seed=0):
    """Non-decreasing ids per sequence: runs of 1..12 tokens, each sequence from its own offset."""
    gen = torch.Generator().manual_seed(seed)
    ids = []
    for n in lengths:
        runs = torch.randint(1, 13, (n,), generator=gen)
        ids.append(torch.repeat_interleave(torch.arange(n), runs)[:n] + 1000 * len(ids) - 7)
    return torch.cat(ids)


def mode_kwargs(mode, lengths, seed=0):
    kwargs = dict(MODES[mode])
    if kwargs.get("block_ids") == "random":
        kwargs["block_ids"] = random_block_ids(lengths, seed)
    return kwargs


def naive_visible(n, mask="bidirectional", block_size=None, block_ids=None, within_block="full"):
    """[n, n] bool from the docstring's definitions, one pair at a time."""
    if block_ids is None and block_size is not None:
        block_ids = [i // block_size for i in range(n)]

    def sees(i, j):
        if mask == "bidirectional":
            return True
        if mask == "causal":
            return j <= i
        bi, bj = block_ids[i], block_ids[j]
        return bj < bi or (bj == bi and (within_block == "full" or j <= i))

    return torch.tensor([[sees(i, j) for j in range(n)] for i in range(n)], dtype=torch.bool)


def naive(q, k, v, cu, *, key_mask=None, masked_bias=None, scale=None, **mask):
    """float64, heads expanded, per sequence: softmax over the visible keys (+ bias on masked keys)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    bounds = cu.tolist()
    for start, end in itertools.pairwise(bounds):
        if end == start:
            continue
        seq = slice(start, end)
        local = dict(mask)
        if local.get("block_ids") is not None:
            local["block_ids"] = local["block_ids"][seq].tolist()
        visible = naive_visible(end - start, **local)
        kk = k[seq].double().repeat_interleave(group, 1)
        vv = v[seq].double().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[seq].double(), kk) * scale
        if key_mask is not None:
            if masked_bias is None:
                visible = visible & key_mask[seq][None, :]
            else:
                scores = scores + torch.where(key_mask[seq], 0.0, masked_bias).double()
        scores = scores.masked_fill(~visible, -math.inf)
        probs = scores.softmax(-1).nan_to_num(0.0)  # rows without a visible key are zero
        out[seq] = torch.einsum("hqk,khd->qhd", probs, vv)
    return out


def assert_matches(got, want, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


# --- the reference (the spec) -------------------------------------------------------------------


def test_block_causal_masks_by_hand():
    """7 tokens, blocks of 3: [0 1 2][3 4 5][6]."""
    spec = attention_op._check_mask(
        torch.empty(7, 1, 4), "block_causal", 3, None, "full", None, None
    )
    rows = attention_op._visible(spec, 0, 7, torch.device("cpu")).int().tolist()
    assert [sum(r) for r in rows] == [3, 3, 3, 6, 6, 6, 7]
    assert rows[1] == [1, 1, 1, 0, 0, 0, 0] and rows[4] == [1, 1, 1, 1, 1, 1, 0]
    spec = attention_op._Mask("block_causal", 3, None, "causal", None, None)
    causal = attention_op._visible(spec, 0, 7, torch.device("cpu"))
    assert torch.equal(causal, torch.ones(7, 7, dtype=torch.bool).tril())


@pytest.mark.parametrize("mode", list(MODES))
def test_reference_matches_naive(mode):
    q, k, v, cu = packed(PACK, 4, 2, 16, seed=1)
    kwargs = mode_kwargs(mode, PACK)
    got = ops.attention(q, k, v, cu_seqlens=cu, **kwargs)
    torch.testing.assert_close(got.double(), naive(q, k, v, cu, **kwargs), rtol=0, atol=1e-5)


def test_block_causal_full_differs_from_causal_and_within_causal_equals_it():
    q, k, v, cu = packed([40, 23], 2, 1, 16, seed=2)
    causal = ops.attention(q, k, v, cu_seqlens=cu, mask="causal")
    full = ops.attention(q, k, v, cu_seqlens=cu, mask="block_causal", block_size=9)
    within = ops.attention(
        q, k, v, cu_seqlens=cu, mask="block_causal", block_size=9, within_block="causal"
    )
    assert torch.equal(within, causal)
    last_of_block = torch.tensor([8, 17, 26, 35, 39, 48, 57, 62])  # rows that see their whole block
    others = torch.ones(63, dtype=torch.bool)
    others[last_of_block] = False
    assert torch.equal(full[last_of_block], causal[last_of_block])
    assert float((full[others] - causal[others]).abs().amax(-1).amin()) > 1e-3  # every other row


def test_key_mask_semantics():
    q, k, v, cu = packed([30, 12], 2, 1, 16, seed=3)
    key_mask = torch.ones(42, dtype=torch.bool)
    key_mask[[0, 1, 2, 5, 17, 31, 32]] = False
    key_mask[34:42] = False  # the last 8 keys of sequence 1
    excluded = ops.attention(q, k, v, cu_seqlens=cu, mask="causal", key_mask=key_mask)
    # excluded keys: rows 0-2 see none (zeros); otherwise attention over the kept keys only
    assert torch.equal(excluded[:3], torch.zeros(3, 2, 16))
    want = naive(q, k, v, cu, mask="causal", key_mask=key_mask)
    torch.testing.assert_close(excluded.double(), want, rtol=0, atol=1e-5)
    # biased keys: a row whose visible keys are all masked averages them as if none were masked
    # (softmax is shift invariant), instead of NaN
    biased = ops.attention(
        q, k, v, cu_seqlens=cu, mask="causal", key_mask=key_mask, masked_bias=-10000.0
    )
    # (float32 scores near -10000 are rounded to 1e-3: the same in the reference and the kernels)
    plain = ops.attention(q, k, v, cu_seqlens=cu, mask="causal")
    torch.testing.assert_close(biased[:3], plain[:3], rtol=0, atol=BIASED_ROWS_ATOL)
    torch.testing.assert_close(biased[3:30], excluded[3:30], rtol=0, atol=1e-6)
    want = naive(q, k, v, cu, mask="causal", key_mask=key_mask, masked_bias=-10000.0)
    torch.testing.assert_close(biased[3:].double(), want[3:], rtol=0, atol=1e-5)
    torch.testing.assert_close(biased[:3].double(), want[:3], rtol=0, atol=BIASED_ROWS_ATOL)


def test_masked_bias_is_rounded_to_the_input_dtype():
    for dtype, want in ((torch.bfloat16, -9984.0), (torch.float16, -10000.0)):
        spec = attention_op._check_mask(
            torch.empty(3, 1, 4, dtype=dtype), "causal", None, None, "full",
            torch.ones(3, dtype=torch.bool), -10000.0,
        )  # fmt: skip
        assert spec.masked_bias == want


def test_reference_chunks_long_sequences(monkeypatch):
    q, k, v, cu = packed([70, 9], 4, 2, 16, seed=4)
    whole = ops.attention(q, k, v, cu_seqlens=cu, mask="block_causal", block_size=9)
    monkeypatch.setattr(attention_op, "_REFERENCE_SCORES", 4 * 70 * 8)  # 8 rows per chunk
    chunked = ops.attention(q, k, v, cu_seqlens=cu, mask="block_causal", block_size=9)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_auto_is_torch_on_cpu():
    q, k, v, cu = packed([3], 2, 1, 16)
    assert ops.resolve_backend("attention", "auto", q, k, v, cu) == "torch"


# --- the Triton kernel (interpreter on CPU) -----------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
def test_triton_matches_reference(mode, dtype):
    q, k, v, cu = packed(PACK, 2, 1, 64, dtype=dtype, seed=5)
    kwargs = mode_kwargs(mode, PACK, seed=5)
    got = ops.attention(q, k, v, cu_seqlens=cu, backend="triton", **kwargs)
    want = ops.attention(q, k, v, cu_seqlens=cu, backend="torch", **kwargs)
    assert got.dtype == dtype
    assert_matches(got, want, dtype)


@pytest.mark.parametrize(
    "dim, heads, kv_heads, dtype, mode",
    [
        (72, 8, 1, torch.bfloat16, "block9"),  # ViT head dim (64 + 16 columns), GQA 8
        (96, 2, 1, torch.float32, "bidirectional"),  # 64 + 32 columns, nothing padded
        (40, 2, 2, torch.float16, "causal"),  # 32 + 16 columns
        (112, 4, 4, torch.float32, "causal"),  # padded to 128, MHA
        (128, 4, 1, torch.float16, "block9"),  # GQA 4
        (64, 2, 2, torch.bfloat16, "causal"),
    ],
)
def test_triton_head_dims_and_gqa(dim, heads, kv_heads, dtype, mode):
    """Head dims of one power-of-two column block (padded or not) and of two (head_dim_blocks)."""
    q, k, v, cu = packed([7, 0, 70], heads, kv_heads, dim, dtype=dtype, seed=dim)
    kwargs = mode_kwargs(mode, [7, 0, 70])
    got = ops.attention(q, k, v, cu_seqlens=cu, backend="triton", **kwargs)
    assert_matches(got, naive(q, k, v, cu, **kwargs), dtype)


@pytest.mark.parametrize(
    "mode, masked_bias",
    [("causal", None), ("causal", -10000.0), ("bidirectional", None), ("block9", -10000.0)],
)
def test_triton_key_mask(mode, masked_bias):
    lengths = [100, 7, 0, 40]
    q, k, v, cu = packed(lengths, 2, 1, 32, seed=6)
    key_mask = torch.rand(147, generator=torch.Generator().manual_seed(6)) > 0.3
    key_mask[:20] = False  # rows 0..19 of sequence 0 see no kept key under a causal mask
    key_mask[100:107] = False  # sequence 1: every key masked
    kwargs = mode_kwargs(mode, lengths)
    got = ops.attention(
        q, k, v, cu_seqlens=cu, key_mask=key_mask, masked_bias=masked_bias, backend="triton",
        **kwargs,
    )  # fmt: skip
    want = ops.attention(
        q, k, v, cu_seqlens=cu, key_mask=key_mask, masked_bias=masked_bias, backend="torch",
        **kwargs,
    )  # fmt: skip
    if masked_bias is None:
        assert_matches(got, want, torch.float32)
        assert torch.equal(got[100:107], torch.zeros(7, 2, 32))
    else:
        all_biased = torch.zeros(147, dtype=torch.bool)
        all_biased[100:107] = True  # every key of sequence 1 is masked
        if mode == "causal":
            all_biased[:20] = True
        assert_matches(got[~all_biased], want[~all_biased], torch.float32)
        torch.testing.assert_close(got[all_biased], want[all_biased], rtol=0, atol=BIASED_ROWS_ATOL)
        assert bool(got[100:107].abs().amax() > 0.05)


@pytest.mark.parametrize("mode", ["causal", "block_ids"])
def test_triton_pack_equals_sequences_one_by_one(mode):
    lengths = [100, 7, 129]
    q, k, v, cu = packed(lengths, 2, 1, 32, seed=7)
    kwargs = mode_kwargs(mode, lengths, seed=7)
    pack = ops.attention(q, k, v, cu_seqlens=cu, backend="triton", **kwargs)
    for start, end in zip(cu.tolist(), cu[1:].tolist()):
        one = dict(kwargs)
        if "block_ids" in one:
            one["block_ids"] = one["block_ids"][start:end] + 5  # only the order within matters
        alone = ops.attention(
            q[start:end],
            k[start:end],
            v[start:end],
            cu_seqlens=torch.tensor([0, end - start]),
            max_seqlen=129,  # the pack's: tiles shrink for short packs only
            backend="triton",
            **one,
        )
        assert torch.equal(pack[start:end], alone)


@pytest.mark.parametrize("blocks", [(16, 64), (32, 16)])
def test_triton_other_tilings(monkeypatch, blocks):
    """Key tiles wider than the query tiles, and several key tiles per query tile."""
    # The copy the triton backend runs on CPU tensors (kelix_fast.triton_kernels.kernels_for).
    kernels = triton_kernels.interpreted("flash_attention")
    monkeypatch.setattr(kernels, "INTERPRETER_BLOCKS", blocks)
    lengths = [37, 70]
    q, k, v, cu = packed(lengths, 2, 1, 16, seed=8)
    for mode in ("causal", "block9", "block_ids", "bidirectional"):
        kwargs = mode_kwargs(mode, lengths, seed=8)
        got = ops.attention(q, k, v, cu_seqlens=cu, backend="triton", **kwargs)
        assert_matches(got, naive(q, k, v, cu, **kwargs), torch.float32)


@pytest.mark.parametrize("block_size", [1, 32, 130, 2**40])
def test_triton_block_sizes(block_size):
    """Blocks of ``block_size`` rows, whose key ends the kernel computes itself: one row (causal), the
    key-tile width (block edges on tile edges), and blocks longer than every sequence (each row sees
    its whole sequence; 2^40 is clamped to the longest sequence before it reaches int32 arithmetic)."""
    q, k, v, cu = packed(PACK, 2, 1, 16, seed=14)
    kwargs = {"mask": "block_causal", "block_size": block_size}
    got = ops.attention(q, k, v, cu_seqlens=cu, backend="triton", **kwargs)
    assert_matches(got, naive(q, k, v, cu, **kwargs), torch.float32)
    if block_size >= max(PACK):
        bidirectional = ops.attention(q, k, v, cu_seqlens=cu, backend="triton")
        assert torch.equal(got, bidirectional)


def test_triton_one_short_sequence_takes_small_tiles():
    """A single sequence of 9 rows: the tiles shrink to 16 x 16 instead of wasting 127 of 128 rows."""
    from kelix_fast.triton_kernels import flash_attention as kernels

    assert kernels.blocks(False, 128, 9, interpreter=False)[:2] == (16, 16)
    q, k, v, cu = packed([9], 4, 4, 128, dtype=torch.bfloat16, seed=13)
    got = ops.attention(q, k, v, cu_seqlens=cu, mask="causal", backend="triton")
    assert_matches(got, naive(q, k, v, cu, mask="causal"), torch.bfloat16)


def test_pack_key_ranges_follow_the_sequences():
    """KEY_RANGE tables: each token sees from its sequence's start to itself (causal) or to its end;
    empty sequences own no token."""
    from kelix_fast.triton_kernels import flash_attention as kernels

    cu = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)
    start, end = kernels._pack_key_ranges(cu, 6, causal=True)
    assert start.tolist() == [0, 0, 2, 2, 2, 5] and end.tolist() == [1, 2, 3, 4, 5, 6]
    start, end = kernels._pack_key_ranges(cu, 6, causal=False)
    assert start.tolist() == [0, 0, 2, 2, 2, 5] and end.tolist() == [2, 2, 5, 5, 5, 6]
    assert start.dtype == end.dtype == torch.int32


# Packed Block Decoder sequences (kelix-ar.md §8 #5): many 9-slot sequences, with a single row, an empty
# one, a short one and the longest packed length (16); 17 is not packed (one program per sequence).
SHORT_PACKS = [[9] * 13 + [3, 0, 9, 1, 16] + [9] * 5, [17, 9, 9, 2]]


@pytest.mark.parametrize("lengths", SHORT_PACKS, ids=["packed", "not-packed"])
@pytest.mark.parametrize(
    "dim, heads, kv_heads, dtype, mask",
    [
        (128, 4, 1, torch.bfloat16, "causal"),  # the Block Decoder: hd 128, GQA
        (72, 2, 2, torch.float32, "bidirectional"),  # two column blocks
        (16, 3, 1, torch.float16, "causal"),
    ],
)
def test_triton_many_short_sequences(lengths, dim, heads, kv_heads, dtype, mask):
    """Short sequences run as one KEY_RANGE pack (64-row tiles across sequences, key tiles of 32 whose
    edges fall inside sequences under the interpreter); no row may see another sequence's keys (they are
    random, so a leak changes the output) and every output row is written (NaN-poisoned)."""
    q, k, v, cu = packed(lengths, heads, kv_heads, dim, dtype=dtype, seed=len(lengths) + dim)
    got = ops.attention(q, k, v, cu_seqlens=cu, mask=mask, backend="triton")
    assert not got.isnan().any()
    assert_matches(got, naive(q, k, v, cu, mask=mask), dtype)


@pytest.mark.parametrize("masked_bias", [None, -10000.0])
def test_triton_short_sequences_with_a_key_mask(masked_bias):
    lengths = SHORT_PACKS[0]
    q, k, v, cu = packed(lengths, 2, 1, 32, seed=8)
    tokens = sum(lengths)
    key_mask = torch.rand(tokens, generator=torch.Generator().manual_seed(8)) > 0.3
    key_mask[:9] = False  # the first sequence: every key masked
    args = {"cu_seqlens": cu, "mask": "causal", "key_mask": key_mask, "masked_bias": masked_bias}
    got = ops.attention(q, k, v, **args, backend="triton")
    want = ops.attention(q, k, v, **args, backend="torch")
    assert_matches(got, want, torch.float32)


@pytest.mark.parametrize("width", [16, 19])
def test_launcher_fills_poisoned_outputs_of_strided_inputs(width):
    """Every row of every sequence is written (NaN-poisoned output, a single row, an empty member);
    q/k/v are head slices of one fused [T, H + 2 Hkv, width] projection (strided rows), cut to d = 16:
    width 16 gives strides that are multiples of 4 (STRIDE_ALIGN 4), width 19 odd ones (STRIDE_ALIGN 1)."""
    kernels = triton_kernels.interpreted("flash_attention")  # CPU tensors below

    lengths = [1, 0, 65, 7]
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(73, 4 + 2 * 2, width, generator=gen)[..., :16]
    q, k, v = qkv[:, :4], qkv[:, 4:6], qkv[:, 6:]
    cu = torch.tensor([0, *lengths]).cumsum(0)
    for causal in (False, True):
        out = torch.full((73, 4, 16), float("nan"))
        assert kernels.stride_alignment(q, k, v, out) == (4 if width == 16 else 1)
        kernels.flash_attention(
            q, k, v, cu, None, None, out, max_seqlen=65, causal=causal, scale=0.25, masked_bias=None
        )
        want = naive(q, k, v, cu, mask="causal" if causal else "bidirectional", scale=0.25)
        assert_matches(out, want, torch.float32)


def test_head_dims_split_into_column_blocks_only_when_that_saves_work():
    from kelix_fast.triton_kernels import flash_attention as kernels

    split = {d: kernels.head_dim_blocks(d) for d in (16, 40, 64, 72, 96, 112, 128, 200, 256)}
    assert split == {
        16: (16, 0), 40: (32, 16), 64: (64, 0), 72: (64, 16), 96: (64, 32),
        112: (128, 0), 128: (128, 0), 200: (256, 0), 256: (256, 0),
    }  # fmt: skip


def test_stride_alignment_is_the_vector_width_every_stride_shares():
    """STRIDE_ALIGN promises the compiler that every token and head stride is a multiple of it: too
    large a value would make misaligned vector loads on a GPU, so it is checked on the layouts that
    occur (the ViT's [T, 16, 72] bf16 views, fused projections, a transposed head dim)."""
    from kelix_fast.triton_kernels import flash_attention as kernels

    vit = torch.empty(10, 16 * 72, dtype=torch.bfloat16).view(10, 16, 72)
    assert kernels.stride_alignment(vit) == 8  # one 16-byte vector of bf16
    assert kernels.stride_alignment(vit.float()) == 4
    assert kernels.stride_alignment(vit, torch.empty(10, 16, 76, dtype=torch.bfloat16)) == 4
    assert kernels.stride_alignment(torch.empty(10, 3, 5, dtype=torch.bfloat16)) == 1
    head_dim_strided = torch.empty(72, 16, 10).transpose(0, 2)  # head-dim stride 160
    assert kernels.stride_alignment(head_dim_strided) == 1


def test_triton_largest_interpreted_size():
    """One 24 x 24-patch ViT image (576 tokens, hd 72 padded, bf16): 9 query tiles x 18 key tiles."""
    q, k, v, cu = packed([576], 1, 1, 72, dtype=torch.bfloat16, seed=10)
    got = ops.attention(q, k, v, cu_seqlens=cu, backend="triton")
    assert_matches(got, ops.attention(q, k, v, cu_seqlens=cu, backend="torch"), torch.bfloat16)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_packs(backend):
    for lengths in ([], [0], [0, 0]):
        q, k, v, cu = packed(lengths, 2, 1, 16)
        out = ops.attention(q, k, v, cu_seqlens=cu, mask="causal", backend=backend)
        assert out.shape == (0, 2, 16)


def test_trusted_values_need_max_seqlen():
    q, k, v, cu = packed([7, 100], 2, 1, 16, seed=11)
    want = ops.attention(q, k, v, cu_seqlens=cu, mask="causal")
    with ops.trusted_values():
        with pytest.raises(ValueError, match=r"max_seqlen must be given inside ops.trusted_values"):
            ops.attention(q, k, v, cu_seqlens=cu, mask="causal", backend="triton")
        got = ops.attention(
            q, k, v, cu_seqlens=cu, mask="causal", max_seqlen=200, backend="triton"
        )  # a loose bound: the extra query tiles return at once
        assert_matches(got, want, torch.float32)
        # A bound past the pack is clamped to it: 2^40 would size a grid of 2^34 idle programs (a
        # hang under the interpreter, found by the fuzz test).
        huge = ops.attention(
            q, k, v, cu_seqlens=cu, mask="causal", max_seqlen=2**40, backend="triton"
        )
    assert_matches(huge, want, torch.float32)


# --- bad input ----------------------------------------------------------------------------------


def _bad_calls():
    ids = torch.arange(7)
    keys = torch.ones(7, dtype=torch.bool)
    cu = torch.tensor([0, 7])
    return [
        ({"mask": "sliding"}, ValueError, r"mask must be one of"),
        (
            {"mask": "block_causal"},
            ValueError,
            r"mask='block_causal' needs exactly one of block_size and block_ids, got neither",
        ),
        (
            {"mask": "block_causal", "block_size": 3, "block_ids": ids},
            ValueError,
            r"mask='block_causal' needs exactly one of block_size and block_ids, got both",
        ),
        ({"mask": "causal", "block_size": 3}, ValueError, r"block_size must be None unless"),
        ({"block_ids": ids}, ValueError, r"block_ids must be None unless"),
        ({"mask": "block_causal", "block_size": 0}, ValueError, r"block_size must be >= 1, got 0"),
        ({"mask": "block_causal", "block_size": 2.0}, TypeError, r"block_size must be an int"),
        (
            {"mask": "block_causal", "block_ids": ids[:5]},
            ValueError,
            r"block_ids must have shape \[7\]",
        ),
        (
            {"mask": "block_causal", "block_ids": ids.float()},
            ValueError,
            r"block_ids must have dtype",
        ),
        (
            {"mask": "block_causal", "block_ids": torch.tensor([0, 0, 1, 0, 2, 2, 3])},
            ValueError,
            r"block_ids must be non-decreasing within each sequence, got block_ids\[3\]=0",
        ),
        ({"within_block": "causal"}, ValueError, r"within_block must be 'full' unless"),
        (
            {"mask": "block_causal", "block_size": 2, "within_block": "half"},
            ValueError,
            r"within_block must be one of",
        ),
        ({"key_mask": ids}, ValueError, r"key_mask must have dtype bool"),
        ({"key_mask": keys[:3]}, ValueError, r"key_mask must have shape \[7\]"),
        ({"masked_bias": -1e4}, ValueError, r"masked_bias must be None without a key_mask"),
        (
            {"key_mask": keys, "masked_bias": float("-inf")},
            ValueError,
            r"masked_bias must be finite",
        ),
        ({"key_mask": keys, "masked_bias": "-1e4"}, TypeError, r"masked_bias must be a number"),
        (
            {"cu_seqlens": torch.tensor([0, 5])},
            ValueError,
            r"cu_seqlens must be non-decreasing from 0 to T=7",
        ),
        (
            {"cu_seqlens": torch.tensor([0, 5, 3, 7])},
            ValueError,
            r"cu_seqlens must be non-decreasing",
        ),
        ({"cu_seqlens": cu.float()}, ValueError, r"cu_seqlens must have dtype int32, int64"),
        ({"cu_seqlens": cu[None]}, ValueError, r"cu_seqlens must have shape \[\*\]"),
        ({"cu_seqlens": torch.tensor([], dtype=torch.int64)}, ValueError, r"cu_seqlens must hold"),
        (
            {"max_seqlen": 6},
            ValueError,
            r"max_seqlen must be at least the longest sequence \(7\), got 6",
        ),
        ({"max_seqlen": 7.0}, TypeError, r"max_seqlen must be an int or None"),
        ({"max_seqlen": -1}, ValueError, r"max_seqlen must be >= 0"),
        ({"scale": "0.1"}, TypeError, r"scale must be a finite number"),
        ({"scale": float("nan")}, ValueError, r"scale must be a finite number, got nan"),
        ({"scale": True}, TypeError, r"scale must be a finite number"),
        ({"backend": "cuda"}, BackendUnavailableError, r"backend 'cuda' unavailable"),
    ]


@pytest.mark.parametrize("kwargs, error, match", _bad_calls())
def test_bad_arguments_are_rejected(kwargs, error, match):
    q, k, v, _ = packed([7], 4, 2, 16)
    call = {"cu_seqlens": torch.tensor([0, 7]), **kwargs}
    with pytest.raises(error, match=r"^attention: " + match):
        ops.attention(q, k, v, **call)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("heads, kv_heads, dim", [(0, 1, 4), (2, 0, 4), (0, 0, 4), (2, 1, 0)])
def test_empty_heads_or_head_dims_are_rejected(heads, kv_heads, dim, backend):
    """Zero heads or a zero head dim (the fuzz test found a ZeroDivisionError in the reference)."""
    q, k, v = (
        torch.zeros(5, heads, dim),
        torch.zeros(5, kv_heads, dim),
        torch.zeros(5, kv_heads, dim),
    )
    match = r"at least one head and one head dim \(H, Hkv, d >= 1\)"
    with pytest.raises(ValueError, match="^attention: q and k must have " + match):
        ops.attention(q, k, v, cu_seqlens=torch.tensor([0, 5]), backend=backend)
    lengths = torch.tensor([5])
    with pytest.raises(ValueError, match="^cached_attention: q and k must have " + match):
        ops.cached_attention(
            q[None], k[None], v[None], q_start=lengths * 0, kv_lens=lengths, backend=backend
        )


def test_triton_rejects_head_dims_above_256():
    q, k, v, cu = packed([3], 1, 1, 264)
    with pytest.raises(BackendUnavailableError, match=r"head dims up to 256, got d=264"):
        ops.attention(q, k, v, cu_seqlens=cu, backend="triton")


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda q, k, v: ops.attention(
                q, k[:, :1].expand(-1, 3, -1), v, cu_seqlens=torch.tensor([0, 7])
            ),
            r"v must have shape",
        ),
        (
            lambda q, k, v: ops.attention(q, k.double(), v, cu_seqlens=torch.tensor([0, 7])),
            r"k must have the dtype of q",
        ),
        (
            lambda q, k, v: ops.attention(q[:, :3], k, v, cu_seqlens=torch.tensor([0, 7])),
            r"the query heads \(3\) must be a multiple of the KV heads \(2\)",
        ),
        (
            lambda q, k, v: ops.cached_attention(
                q[None],
                k[None],
                v[None],
                q_start=torch.zeros(1, dtype=torch.int64),
                kv_lens=torch.tensor([8]),
            ),
            r"kv_lens must lie in \[1, 8\), got 8",
        ),
        (
            lambda q, k, v: ops.cached_attention(
                q[None],
                k[None],
                v[None],
                q_start=torch.zeros(2, dtype=torch.int64),
                kv_lens=torch.tensor([3]),
            ),
            r"q_start must have shape \[1\]",
        ),
    ],
)
def test_bad_input_is_rejected(call, match):
    q, k, v, _ = packed([7], 4, 2, 16)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)


# --- cached_attention agrees with full causal attention -----------------------------------------


def test_incremental_cached_attention_equals_full_causal_attention():
    """Prefill of 5 + decode of 4 rows through a cache, two requests of different lengths, GQA 4/2."""
    lengths, capacity = [9, 6], 12
    cache_k = torch.zeros(2, capacity, 2, 16)
    cache_v = torch.zeros(2, capacity, 2, 16)
    qs, ks, vs, _ = zip(*(packed([n], 4, 2, 16, seed=n) for n in lengths))
    outs = [[], []]
    for start, stop in ((0, 5), (5, 6), (6, 7), (7, 8), (8, 9)):
        width = stop - start
        q = torch.zeros(2, width, 4, 16)
        for b, n in enumerate(lengths):
            hi = min(stop, n)
            if hi > start:
                q[b, : hi - start] = qs[b][start:hi]
                cache_k[b, start:hi], cache_v[b, start:hi] = ks[b][start:hi], vs[b][start:hi]
        kv_lens = torch.tensor([min(stop, n) if min(stop, n) > 0 else 1 for n in lengths])
        out = ops.cached_attention(
            q, cache_k, cache_v, q_start=torch.full((2,), start), kv_lens=kv_lens, causal=True
        )
        for b, n in enumerate(lengths):
            outs[b].append(out[b, : max(0, min(stop, n) - start)])
    for b, n in enumerate(lengths):
        cu = torch.tensor([0, n])
        want = naive(qs[b], ks[b], vs[b], cu, mask="causal")
        torch.testing.assert_close(torch.cat(outs[b]).double(), want, rtol=0, atol=1e-5)


# --- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "lengths, heads, kv_heads, dim, kwargs",
    [
        ([1000, 3000, 1, 0, 129], 32, 8, 128, {"mask": "causal"}),
        ([1000, 3000, 1, 0, 129], 32, 8, 128, {"mask": "block_causal", "block_size": 9}),
        ([1024, 2000, 4096, 7], 16, 16, 72, {"mask": "bidirectional"}),
        ([900, 77], 4, 4, 112, {"mask": "block_causal", "block_ids": "random"}),
        ([2000, 5], 32, 8, 128, {"mask": "causal", "key_mask": "random", "masked_bias": -1e4}),
        ([2000, 5], 8, 1, 64, {"mask": "bidirectional", "key_mask": "random"}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_on_gpu(lengths, heads, kv_heads, dim, kwargs, dtype):
    q, k, v, cu = (t.cuda() for t in packed(lengths, heads, kv_heads, dim, dtype=dtype, seed=12))
    kwargs = dict(kwargs)
    if kwargs.get("block_ids") == "random":
        kwargs["block_ids"] = random_block_ids(lengths, seed=12).cuda()
    if kwargs.get("key_mask") == "random":
        gen = torch.Generator().manual_seed(12)
        kwargs["key_mask"] = (torch.rand(q.shape[0], generator=gen) > 0.2).cuda()
    assert ops.resolve_backend("attention", "auto", q, k, v, cu) == "triton"
    got = ops.attention(q, k, v, cu_seqlens=cu, **kwargs)
    want = ops.attention(q, k, v, cu_seqlens=cu, backend="torch", **kwargs)
    # float32 on the GPU: IEEE dots, only the summation order differs from the reference's GEMMs
    assert_matches(got, want, dtype)


# --- the benchmark case -------------------------------------------------------------------------


def test_benchmark_counts_visible_pairs_and_its_baselines_agree():
    from benchmarks.cases import attention as case

    for point in case.points(False)[:6]:  # the LLM points: causal and block-causal, 1k to 4 x 4k
        n = {length: count for count, length in point["runs"]}
        spec = attention_op._Mask(point["mask"], point["block_size"], None, "full", None, None)
        per_length = {
            length: int(attention_op._visible(spec, 0, length, torch.device("cpu")).sum())
            for length in n
        }
        assert case.visible_pairs(point) == sum(per_length[length] * n[length] for length in n)
    vit = next(p for p in case.points(False) if p["workload"] == "vit")
    assert case.flops(vit) == 4 * 72 * 16 * sum(s * s for _, s in vit["runs"])
    for point in case.points(True):
        shared = case.make_shared(point, torch.device("cpu"))
        inputs = case.make_inputs(point, shared, seed=1)
        want = case.run(point, inputs, "torch")
        assert case.check(point, case.baseline(point, inputs, shared), want) is None
