"""``ops.linear_attention`` (SANA ReLU linear attention) against a naive float64 per-query reference."""

from __future__ import annotations

import importlib

import pytest
import torch

from kelix_fast import ops

linear_attention_module = importlib.import_module(
    "kelix_fast.ops.linear_attention"
)  # the package re-exports the function under the module name


def naive(q, k, v, eps):
    """q/k/v [B, N, H, d] -> [B, N, H, d] float64: the official padded-ones form, one query at a time."""
    q, k, v = q.double().relu(), k.double().relu(), v.double()
    batch, tokens, heads, dim = q.shape
    out = torch.empty(batch, tokens, heads, dim, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            v_pad = torch.cat(
                [v[b, :, h].T, torch.ones(1, tokens, dtype=torch.float64)]
            )  # [d+1, N]
            state = v_pad @ k[b, :, h]  # [d+1, d]
            full = state @ q[b, :, h].T  # [d+1, N]
            out[b, :, h] = (full[:-1] / (full[-1:] + eps)).T
    return out


def _qkv(batch, tokens, heads, dim, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, tokens, heads, dim, generator=gen).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("tokens", [1, 7, 130])
def test_matches_naive_reference(tokens):
    q, k, v = _qkv(2, tokens, 3, 8, seed=tokens)
    out = ops.linear_attention(q, k, v)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive(q, k, v, 1e-8), rtol=1e-5, atol=1e-5)


def test_strided_inputs_and_custom_eps():
    """q/k/v as per-head views of one wide projection (the model's layout), eps of the DC-AE."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 7, 3 * 2 * 8, generator=gen)
    q, k, v = (t.view(1, 7, 2, 8) for t in qkv.chunk(3, dim=-1))
    assert not q.is_contiguous()
    out = ops.linear_attention(q, k, v, eps=1e-15)
    torch.testing.assert_close(out.double(), naive(q, k, v, 1e-15), rtol=1e-5, atol=1e-5)


def test_bfloat16_inputs_are_computed_in_float32():
    q, k, v = _qkv(1, 130, 2, 32, seed=1, dtype=torch.bfloat16)
    out = ops.linear_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    want = naive(q, k, v, 1e-8).to(torch.bfloat16)  # one rounding of the exact result
    torch.testing.assert_close(out, want, rtol=0, atol=0.02)


def test_all_negative_keys_give_zero_not_nan():
    """ReLU zeroes every key: numerator and denominator vanish and eps keeps the result at 0."""
    q, k, v = _qkv(1, 7, 2, 8, seed=2)
    out = ops.linear_attention(q, -k.abs() - 1, v)
    assert torch.equal(out, torch.zeros_like(out))


def test_backend_overwrites_a_poisoned_output():
    q, k, v = _qkv(1, 7, 2, 8, seed=3)
    out = torch.full_like(q, float("nan"))
    linear_attention_module._IMPLS["torch"].run(q, k, v, 1e-8, out)
    torch.testing.assert_close(out.double(), naive(q, k, v, 1e-8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda q, k, v: ops.linear_attention(q[0], k[0], v[0]), ValueError, r"q must have shape"),
        (lambda q, k, v: ops.linear_attention(q, k[:, :3], v), ValueError, r"k must have shape"),
        (lambda q, k, v: ops.linear_attention(q, k, v[..., :4]), ValueError, r"v must have shape"),
        (
            lambda q, k, v: ops.linear_attention(q, k.double(), v),
            ValueError,
            r"k must have the dtype of q",
        ),
        (
            lambda q, k, v: ops.linear_attention(q.long(), k.long(), v.long()),
            ValueError,
            r"q must have dtype float32, bfloat16, float16, got int64",
        ),
        (
            lambda q, k, v: ops.linear_attention(q, k, v, eps=0.0),
            ValueError,
            r"eps must be a positive number, got 0.0",
        ),
        (
            lambda q, k, v: ops.linear_attention(q.tolist(), k, v),
            TypeError,
            r"q must be a torch.Tensor, got list",
        ),
        (
            lambda q, k, v: ops.linear_attention(q, k, v, backend="cuda"),
            ops.BackendUnavailableError,
            r"backend 'cuda' unavailable",
        ),
    ],
)
def test_bad_input_is_rejected(call, error, match):
    q, k, v = _qkv(1, 7, 2, 8, seed=0)
    with pytest.raises(error, match=match):
        call(q, k, v)
