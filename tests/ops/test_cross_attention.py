"""``ops.cross_attention`` (softmax with the official -10000 key-padding bias) against a float64 reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from kelix_fast import ops

cross_attention_module = importlib.import_module(
    "kelix_fast.ops.cross_attention"
)  # the package re-exports the function under the module name


def naive(q, k, v, key_mask, bias=-10000.0):
    """q [B, Lq, H, d], k/v [B, Lk, H, d], key_mask [B, Lk] -> [B, Lq, H, d] float64, additive bias."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    scores = scores + (~key_mask).double()[:, None, None, :] * bias
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


def _inputs(batch, q_len, k_len, heads=2, dim=16, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, heads, dim, generator=gen).to(dtype)
    k, v = (torch.randn(batch, k_len, heads, dim, generator=gen).to(dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("q_len, k_len", [(1, 1), (7, 7), (130, 13), (25, 130)])
def test_matches_naive_reference_with_padded_keys(q_len, k_len):
    q, k, v = _inputs(2, q_len, k_len, seed=q_len + k_len)
    key_mask = torch.ones(2, k_len, dtype=torch.bool)
    key_mask[1, (k_len + 1) // 2 :] = False  # sample 1: right-padded condition
    out = ops.cross_attention(q, k, v, key_mask)
    torch.testing.assert_close(out.double(), naive(q, k, v, key_mask), rtol=1e-5, atol=1e-5)


def test_masked_keys_are_dropped_up_to_the_finite_bias():
    """With -10000 the padded keys carry ~e^-10000 weight: the same as attending to the valid keys only."""
    q, k, v = _inputs(1, 7, 13, seed=4)
    key_mask = torch.zeros(1, 13, dtype=torch.bool)
    key_mask[0, [2, 5, 6]] = True
    out = ops.cross_attention(q, k, v, key_mask)
    keep = key_mask[0]
    want = naive(q, k[:, keep], v[:, keep], key_mask[:, keep])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_all_masked_but_one_and_all_masked():
    q, k, v = _inputs(2, 7, 9, seed=5)
    key_mask = torch.zeros(2, 9, dtype=torch.bool)
    key_mask[0, 4] = True  # sample 0: only key 4 is valid -> every query returns v[4]
    out = ops.cross_attention(q, k, v, key_mask)
    torch.testing.assert_close(out[0], v[0, 4][None].expand(7, -1, -1), rtol=1e-5, atol=1e-5)
    # Sample 1: no valid key. The finite bias gives the softmax over all keys, not NaN; the float32
    # scores near -10000 keep only ~1e-3 of absolute precision, as in the official code.
    assert not out.isnan().any()
    want = naive(q, k, v, torch.ones_like(key_mask))[1]
    torch.testing.assert_close(out[1].double(), want, rtol=0, atol=2e-3)


def test_bfloat16_rounds_the_bias_like_the_official_mask():
    """In bf16 the official bias tensor holds -9984; visible when it is the only difference between keys."""
    q = torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 1, 16, dtype=torch.bfloat16)
    v = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 1, 16).to(torch.bfloat16)
    key_mask = torch.tensor([[True, False]])
    out = ops.cross_attention(q, k, v, key_mask, scale=1.0)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.zeros_like(out))  # e^-9984 underflows in float32
    q32, k32, v32 = _inputs(1, 130, 13, seed=6, dtype=torch.bfloat16)
    mask = torch.ones(1, 13, dtype=torch.bool)
    mask[0, 10:] = False
    want = naive(q32, k32, v32, mask, bias=-9984.0).to(torch.bfloat16)
    torch.testing.assert_close(ops.cross_attention(q32, k32, v32, mask), want, rtol=0, atol=0.02)


def test_backend_overwrites_a_poisoned_output():
    q, k, v = _inputs(1, 7, 5, seed=7)
    key_mask = torch.tensor([[True, True, False, True, False]])
    out = torch.full_like(q, float("nan"))
    cross_attention_module._IMPLS["torch"].run(q, k, v, key_mask, q.shape[-1] ** -0.5, out)
    torch.testing.assert_close(out.double(), naive(q, k, v, key_mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda q, k, v, m: ops.cross_attention(q[0], k, v, m), ValueError, r"q must have shape"),
        (
            lambda q, k, v, m: ops.cross_attention(q, k[..., :8], v, m),
            ValueError,
            r"k must have shape \[1, \*, 2, 16\]",
        ),
        (
            lambda q, k, v, m: ops.cross_attention(q, k, v[:, :3], m),
            ValueError,
            "v must have shape",
        ),
        (
            lambda q, k, v, m: ops.cross_attention(q, k, v, m[:, :3]),
            ValueError,
            r"key_mask must have shape \[1, 5\]",
        ),
        (
            lambda q, k, v, m: ops.cross_attention(q, k, v, m.float()),
            ValueError,
            r"key_mask must have dtype bool, got float32",
        ),
        (
            lambda q, k, v, m: ops.cross_attention(q, k.half(), v.half(), m),
            ValueError,
            r"k must have the dtype of q",
        ),
        (
            lambda q, k, v, m: ops.cross_attention(q, k[:, :0], v[:, :0], m[:, :0]),
            ValueError,
            r"k must hold at least one key",
        ),
        (
            lambda q, k, v, m: ops.cross_attention(q, k, v, m.tolist()),
            TypeError,
            r"key_mask must be a torch.Tensor, got list",
        ),
    ],
)
def test_bad_input_is_rejected(call, error, match):
    q, k, v = _inputs(1, 7, 5, seed=0)
    key_mask = torch.ones(1, 5, dtype=torch.bool)
    with pytest.raises(error, match=match):
        call(q, k, v, key_mask)
