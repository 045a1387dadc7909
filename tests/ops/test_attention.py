"""``ops.attention`` (packed varlen) and ``ops.cached_attention`` against a naive expanded-heads reference."""

from __future__ import annotations

import pytest
import torch

from kelix_fast import ops


def naive(q, k, v, mask):
    """q [Lq, H, d], k/v [Lk, Hkv, d], mask [Lq, Lk] -> [Lq, H, d], heads expanded explicitly, float64."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1).double(), v.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _qkv(t, heads, kv_heads, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(t, h, dim, generator=gen) for h in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [[1], [7, 0, 13], [130, 3]])
def test_varlen_attention_stays_within_each_sequence(causal, lengths):
    q, k, v = _qkv(sum(lengths), 4, 2, 16, seed=len(lengths))
    cu = torch.tensor([0, *lengths]).cumsum(0)
    out = ops.attention(q, k, v, cu_seqlens=cu, causal=causal)
    for start, end in zip(cu.tolist(), cu[1:].tolist()):
        n = end - start
        mask = torch.ones(n, n, dtype=torch.bool)
        mask = mask.tril() if causal else mask
        want = naive(q[start:end], k[start:end], v[start:end], mask)
        torch.testing.assert_close(out[start:end].double(), want, rtol=0, atol=1e-5)


def test_incremental_cached_attention_equals_full_causal_attention():
    """Prefill of 5 + decode of 4 rows through a cache, two requests of different lengths, GQA 4/2."""
    lengths, capacity = [9, 6], 12
    cache_k = torch.zeros(2, capacity, 2, 16)
    cache_v = torch.zeros(2, capacity, 2, 16)
    qs, ks, vs = zip(*(_qkv(n, 4, 2, 16, seed=n) for n in lengths))
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
        want = naive(qs[b], ks[b], vs[b], torch.ones(n, n, dtype=torch.bool).tril())
        torch.testing.assert_close(torch.cat(outs[b]).double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda q, k, v: ops.attention(
                q, k[:, :1].expand(-1, 3, -1), v, cu_seqlens=torch.tensor([0, 7]), causal=True
            ),
            r"v must have shape",
        ),
        (
            lambda q, k, v: ops.attention(q, k, v, cu_seqlens=torch.tensor([0, 5]), causal=True),
            r"cu_seqlens must be non-decreasing from 0 to T=7",
        ),
        (
            lambda q, k, v: ops.attention(
                q, k.double(), v, cu_seqlens=torch.tensor([0, 7]), causal=True
            ),
            r"k must have the dtype of q",
        ),
        (
            lambda q, k, v: ops.attention(
                q[:, :3], k, v, cu_seqlens=torch.tensor([0, 7]), causal=True
            ),
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
    q, k, v = _qkv(7, 4, 2, 16, seed=0)
    with pytest.raises(ValueError, match=match):
        call(q, k, v)
