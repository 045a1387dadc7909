"""``ops.linear_attention`` (SANA ReLU linear attention): every backend against a naive float64 reference.

The triton backend runs CPU tensors under Triton's interpreter (on every machine); its GPU variants are
marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch

from kelix_fast import ops
from kelix_fast.ops import dit_attention

BACKENDS = ["torch", "triton"]


def naive(q, k, v, eps):
    """q/k/v [B, N, H, d] -> [B, N, H, d] float64: the official padded-ones form, one query at a time."""
    q, k, v = q.double().relu(), k.double().relu(), v.double()
    batch, tokens, heads, dim = q.shape
    out = torch.empty(batch, tokens, heads, dim, dtype=torch.float64, device=q.device)
    for b in range(batch):
        for h in range(heads):
            ones = torch.ones(1, tokens, dtype=torch.float64, device=q.device)
            v_pad = torch.cat([v[b, :, h].T, ones])  # [d+1, N]
            state = v_pad @ k[b, :, h]  # [d+1, d]
            full = state @ q[b, :, h].T  # [d+1, N]
            out[b, :, h] = (full[:-1] / (full[-1:] + eps)).T
    return out


def _qkv(batch, tokens, heads, dim, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, tokens, heads, dim, generator=gen).to(device=device, dtype=dtype)
        for _ in range(3)
    ]


def assert_within_rounding(out, q, k, v, eps=1e-8):
    """float32: within 1e-5 of the exact result; 16-bit: at most twice the reference's own rounding
    error (both compute in float32 and round once; FlashAttention's criterion)."""
    exact = naive(q, k, v, eps)
    if out.dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact, rtol=1e-5, atol=1e-5)
        return
    reference = ops.linear_attention(q, k, v, eps=eps, backend="torch")
    ref_error = (reference.double() - exact).abs().max().item()
    error = (out.double() - exact).abs().max().item()
    assert error <= 2 * ref_error + 1e-6, f"error {error:.3g} vs the reference's {ref_error:.3g}"


# --- the reference and every backend on hand-worked and awkward cases --------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tokens", [1, 7, 130])
def test_matches_naive_reference(tokens, backend):
    q, k, v = _qkv(2, tokens, 3, 8, seed=tokens)
    out = ops.linear_attention(q, k, v, backend=backend)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), naive(q, k, v, 1e-8), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs_and_custom_eps(backend):
    """q/k/v as per-head views of one wide projection (the model's layout), eps of the DC-AE."""
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(1, 7, 3 * 2 * 8, generator=gen)
    q, k, v = (t.view(1, 7, 2, 8) for t in qkv.chunk(3, dim=-1))
    assert not q.is_contiguous()
    out = ops.linear_attention(q, k, v, eps=1e-15, backend=backend)
    torch.testing.assert_close(out.double(), naive(q, k, v, 1e-15), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_inputs_are_computed_in_float32(backend):
    q, k, v = _qkv(1, 130, 2, 32, seed=1, dtype=torch.bfloat16)
    out = ops.linear_attention(q, k, v, backend=backend)
    assert out.dtype == torch.bfloat16
    want = naive(q, k, v, 1e-8).to(torch.bfloat16)  # one rounding of the exact result
    torch.testing.assert_close(out, want, rtol=0, atol=0.02)
    assert_within_rounding(out, q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_negative_keys_give_zero_not_nan(backend):
    """ReLU zeroes every key: numerator and denominator vanish and eps keeps the result at 0."""
    q, k, v = _qkv(1, 7, 2, 8, seed=2)
    out = ops.linear_attention(q, -k.abs() - 1, v, backend=backend)
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_overwrites_a_poisoned_output(backend):
    q, k, v = _qkv(1, 7, 2, 8, seed=3)
    out = torch.full_like(q, float("nan"))
    dit_attention._LINEAR_IMPLS[backend].run(q, k, v, 1e-8, out)
    torch.testing.assert_close(out.double(), naive(q, k, v, 1e-8), rtol=1e-5, atol=1e-5)


# --- the triton kernels at awkward sizes ------------------------------------------------------------


@pytest.mark.parametrize(
    "batch, tokens, heads, dim, dtype",
    [
        (1, 1, 1, 32, torch.float32),  # a single token
        (2, 7, 3, 32, torch.float32),
        (1, 100, 2, 20, torch.float32),  # d not a power of two: padded lanes
        (2, 129, 2, 32, torch.float32),  # 3 token tiles in 3 splits, the last with 1 token
        (2, 129, 2, 32, torch.bfloat16),
        (1, 100, 3, 32, torch.float16),
        (1, 1024, 2, 32, torch.float32),  # the full token count (N = 32 x 32 latents)
    ],
)
def test_triton_matches_reference_at_awkward_sizes(batch, tokens, heads, dim, dtype):
    q, k, v = _qkv(batch, tokens, heads, dim, seed=tokens + dim, dtype=dtype)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    dit_attention._LINEAR_IMPLS["triton"].run(q, k, v, 1e-8, out)
    assert out.dtype == dtype
    assert_within_rounding(out, q, k, v)


def test_triton_splits_the_token_reduction_at_test_sizes():
    """The partial-state sum runs in the tests above (N = 129, 1024), not only on a GPU."""
    from kelix_fast.triton_kernels import linear_attention as kernels

    assert kernels.plan(129, 4, interpreter=True) == (64, 3)
    assert kernels.plan(1024, 2, interpreter=True) == (128, 8)
    assert kernels.plan(7, 6, interpreter=True) == (64, 1)
    # Full scale on a GPU: B*H = 140 programs per split, 4 splits of 256 tokens.
    assert kernels.plan(1024, 140, interpreter=False) == (256, 4)


def test_triton_takes_any_strides():
    """Per-head views with a non-unit head-dim stride and a token stride that is not H*d."""
    gen = torch.Generator().manual_seed(4)
    base = torch.randn(3, 2, 1, 33, 9, generator=gen)  # [qkv, B, ., d+1, N+2]
    q, k, v = (t[:, 0, :32, 1:-1].permute(0, 2, 1)[:, :, None].expand(2, 7, 2, 32) for t in base)
    q = q + 0  # q contiguous, k and v broadcast views (stride 0 over heads, stride N+2 over d)
    assert k.stride(2) == 0 and k.stride(3) == 9
    out = ops.linear_attention(q, k, v, backend="triton")
    torch.testing.assert_close(out.double(), naive(q, k, v, 1e-8), rtol=1e-5, atol=1e-5)


def test_auto_picks_triton_only_for_cuda_tensors():
    q, k, v = _qkv(1, 7, 2, 8, seed=5)
    assert ops.resolve_backend("linear_attention", "auto", q, k, v) == "torch"
    assert ops.resolve_backend("linear_attention", "triton", q, k, v) == "triton"


# --- bad input --------------------------------------------------------------------------------------


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
            r"eps must be a finite number > 0, got 0.0",
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
        (
            lambda q, k, v: ops.linear_attention(q, k, v, eps=1e-8, backend="fast"),
            ValueError,
            r"backend must be one of",
        ),
    ],
)
def test_bad_input_is_rejected(call, error, match):
    q, k, v = _qkv(1, 7, 2, 8, seed=0)
    with pytest.raises(error, match=match):
        call(q, k, v)


def test_triton_refuses_head_dims_above_128():
    q, k, v = _qkv(1, 3, 1, 130, seed=0)
    with pytest.raises(ops.BackendUnavailableError, match=r"head dims up to 128, got d=130"):
        ops.linear_attention(q, k, v, backend="triton")
    assert ops.resolve_backend("linear_attention", "auto", q, k, v) == "torch"


# --- compiled kernels on a GPU ----------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch, tokens", [(2, 1024), (1, 129)])
def test_compiled_kernels_on_gpu(batch, tokens, dtype):
    """Full scale (70 heads of 32 over 1,024 tokens, CFG batch) as per-head views of one projection."""
    heads, dim = 70, 32
    gen = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(batch, tokens, 3 * heads * dim, generator=gen).to("cuda", dtype)
    q, k, v = (t.view(batch, tokens, heads, dim) for t in qkv.chunk(3, dim=-1))
    assert ops.resolve_backend("linear_attention", "auto", q, k, v) == "triton"
    out = ops.linear_attention(q, k, v)
    assert_within_rounding(out, q, k, v)
