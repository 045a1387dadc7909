"""``ops.cross_attention`` (softmax with the official -10000 key-padding bias): every backend against a
float64 reference, and the triton kernel's skipping of the keys after the last valid one.

The triton backend runs CPU tensors under Triton's interpreter (on every machine); its GPU variants are
marked ``gpu``.
"""

from __future__ import annotations

import pytest
import torch

from kelix_fast import ops
from kelix_fast.ops import dit_attention

BACKENDS = ["torch", "triton"]


def naive(q, k, v, key_mask, bias=-10000.0):
    """q [B, Lq, H, d], k/v [B, Lk, H, d], key_mask [B, Lk] -> [B, Lq, H, d] float64, additive bias."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    scores = scores + (~key_mask).double()[:, None, None, :] * bias
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v.double())


def _inputs(batch, q_len, k_len, heads=2, dim=16, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, heads, dim, generator=gen)
    k, v = (torch.randn(batch, k_len, heads, dim, generator=gen) for _ in range(2))
    return [t.to(device=device, dtype=dtype) for t in (q, k, v)]


def prefix_mask(k_len, valid, device="cpu"):
    """[B, Lk] bool, the first ``valid[b]`` keys of sample b valid (the engine's right padding)."""
    return torch.arange(k_len, device=device)[None, :] < torch.tensor(valid, device=device)[:, None]


def assert_within_rounding(out, q, k, v, key_mask):
    """At most twice the reference's own error against the exact result (FlashAttention's criterion),
    plus 1e-5 in float32. The reference's error is ~1e-7 in float32 except in samples without a valid
    key, whose scores near -10000 keep ~1e-3 of precision in float32 (the official code's too). 16-bit
    outputs on a GPU also get the rounding of the softmax weights to the value dtype that flash
    kernels apply before the second product (a relative 2^-9 per weight; the interpreter keeps them
    float32)."""
    bias = -9984.0 if q.dtype == torch.bfloat16 else -10000.0
    exact = naive(q, k, v, key_mask, bias=bias)
    reference = ops.cross_attention(q, k, v, key_mask, backend="torch")
    ref_error = (reference.double() - exact).abs().max().item()
    error = (out.double() - exact).abs().max().item()
    if out.dtype == torch.float32:
        slack = 1e-5
    else:
        slack = 2.0**-8 * v.double().abs().amax().item() if out.is_cuda else 1e-6
    bound = 2 * ref_error + slack
    assert error <= bound, f"error {error:.3g} > {bound:.3g} (the reference's is {ref_error:.3g})"


# --- the reference and every backend on hand-worked cases -------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("q_len, k_len", [(1, 1), (7, 7), (130, 13), (25, 130)])
def test_matches_naive_reference_with_padded_keys(q_len, k_len, backend):
    q, k, v = _inputs(2, q_len, k_len, seed=q_len + k_len)
    key_mask = torch.ones(2, k_len, dtype=torch.bool)
    key_mask[1, (k_len + 1) // 2 :] = False  # sample 1: right-padded condition
    out = ops.cross_attention(q, k, v, key_mask, backend=backend)
    torch.testing.assert_close(out.double(), naive(q, k, v, key_mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_keys_are_dropped_up_to_the_finite_bias(backend):
    """With -10000 the padded keys carry ~e^-10000 weight: the same as attending to the valid keys only."""
    q, k, v = _inputs(1, 7, 13, seed=4)
    key_mask = torch.zeros(1, 13, dtype=torch.bool)
    key_mask[0, [2, 5, 6]] = True
    out = ops.cross_attention(q, k, v, key_mask, backend=backend)
    keep = key_mask[0]
    want = naive(q, k[:, keep], v[:, keep], key_mask[:, keep])
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_but_one_and_all_masked(backend):
    q, k, v = _inputs(2, 7, 9, seed=5)
    key_mask = torch.zeros(2, 9, dtype=torch.bool)
    key_mask[0, 4] = True  # sample 0: only key 4 is valid -> every query returns v[4]
    out = ops.cross_attention(q, k, v, key_mask, backend=backend)
    torch.testing.assert_close(out[0], v[0, 4][None].expand(7, -1, -1), rtol=1e-5, atol=1e-5)
    # Sample 1: no valid key. The finite bias gives the softmax over all keys, not NaN; the float32
    # scores near -10000 keep only ~1e-3 of absolute precision, as in the official code.
    assert not out.isnan().any()
    want = naive(q, k, v, torch.ones_like(key_mask))[1]
    torch.testing.assert_close(out[1].double(), want, rtol=0, atol=2e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_rounds_the_bias_like_the_official_mask(backend):
    """In bf16 the official bias tensor holds -9984; visible when it is the only difference between keys."""
    q = torch.zeros(1, 1, 1, 16, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 1, 16, dtype=torch.bfloat16)
    v = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).expand(1, 2, 1, 16).to(torch.bfloat16)
    key_mask = torch.tensor([[True, False]])
    out = ops.cross_attention(q, k, v, key_mask, scale=1.0, backend=backend)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.zeros_like(out))  # e^-9984 underflows in float32
    # With no valid key both keys carry the same bias: the plain average.
    out = ops.cross_attention(q, k, v, torch.zeros_like(key_mask), scale=1.0, backend=backend)
    assert torch.equal(out, torch.full_like(out, 0.5))
    q32, k32, v32 = _inputs(1, 130, 13, seed=6, dtype=torch.bfloat16)
    mask = torch.ones(1, 13, dtype=torch.bool)
    mask[0, 10:] = False
    want = naive(q32, k32, v32, mask, bias=-9984.0).to(torch.bfloat16)
    got = ops.cross_attention(q32, k32, v32, mask, backend=backend)
    torch.testing.assert_close(got, want, rtol=0, atol=0.02)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_overwrites_a_poisoned_output(backend):
    q, k, v = _inputs(1, 7, 5, seed=7)
    key_mask = torch.tensor([[True, True, False, True, False]])
    out = torch.full_like(q, float("nan"))
    dit_attention._CROSS_IMPLS[backend].run(q, k, v, key_mask, q.shape[-1] ** -0.5, out)
    torch.testing.assert_close(out.double(), naive(q, k, v, key_mask), rtol=1e-5, atol=1e-5)


# --- the triton kernel at awkward sizes (interpreter blocks: 64 queries x 64 keys) ------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch, q_len, k_len, valid, heads, dim",
    [
        (1, 1, 1, [1], 1, 32),  # one query, one key
        (1, 7, 1, [0], 2, 32),  # the only key masked
        (2, 7, 7, [7, 3], 2, 32),
        (2, 100, 100, [0, 100], 2, 112),  # no valid key, all valid
        (2, 130, 129, [129, 65], 1, 112),  # 3 key tiles; the last valid key opens tile 2
        (1, 129, 129, [64], 2, 112),  # the valid keys end on a tile boundary
        (2, 25, 129, [1, 128], 2, 32),
    ],
)
def test_triton_matches_reference_at_awkward_sizes(batch, q_len, k_len, valid, heads, dim, dtype):
    q, k, v = _inputs(batch, q_len, k_len, heads, dim, seed=q_len + k_len + dim, dtype=dtype)
    key_mask = prefix_mask(k_len, valid)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    dit_attention._CROSS_IMPLS["triton"].run(q, k, v, key_mask, dim**-0.5, out)
    assert_within_rounding(out, q, k, v, key_mask)


def test_triton_keeps_the_reference_semantics_for_any_mask():
    """Interior holes, left padding, a lone valid key in the last tile: nothing is skipped before the
    last valid key, and masked keys there carry the bias as in the reference."""
    q, k, v = _inputs(4, 70, 129, heads=2, dim=32, seed=8)
    gen = torch.Generator().manual_seed(9)
    key_mask = torch.rand(4, 129, generator=gen) < 0.3
    key_mask[1, :100] = False  # left padding
    key_mask[2] = False
    key_mask[2, 128] = True
    key_mask[3] = torch.arange(129) % 2 == 0
    out = ops.cross_attention(q, k, v, key_mask, backend="triton")
    torch.testing.assert_close(out.double(), naive(q, k, v, key_mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_skips_the_keys_after_the_last_valid_one(dtype):
    """Right padding: the result equals, bit for bit, the kernel on the valid keys alone, and key tiles
    past the last valid key are never read (NaN there would reach every output through 0 * NaN)."""
    from kelix_fast.triton_kernels import cross_attention as kernels

    block_n = kernels.blocks(dtype, interpreter=True)[1]
    valid = [block_n - 14, 2 * block_n + 3]
    k_len = 3 * block_n + 5
    q, k, v = _inputs(2, 33, k_len, heads=2, dim=112, seed=10, dtype=dtype)
    key_mask = prefix_mask(k_len, valid)
    for b, n in enumerate(valid):  # garbage in the masked rows of the last valid key's tile ...
        k[b, n:] = 10 * torch.randn_like(k[b, n:])  # scores within the documented range
        v[b, n:] = 1e4 * torch.randn_like(v[b, n:])
        skipped = (n + block_n - 1) // block_n * block_n  # ... and NaN in the tiles after it
        k[b, skipped:], v[b, skipped:] = float("nan"), float("nan")
    out = ops.cross_attention(q, k, v, key_mask, backend="triton")
    assert not out.isnan().any()
    for b, n in enumerate(valid):
        alone = ops.cross_attention(
            q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], key_mask[b : b + 1, :n],
            backend="triton",
        )  # fmt: skip
        assert torch.equal(out[b : b + 1], alone)
        want = ops.cross_attention(
            q[b : b + 1], k[b : b + 1, :n], v[b : b + 1, :n], key_mask[b : b + 1, :n],
            backend="torch",
        )  # fmt: skip
        torch.testing.assert_close(out[b : b + 1].float(), want.float(), rtol=0, atol=2e-2)


def test_triton_takes_any_strides():
    """The model's layout (per-head views of [B, L, D] projections) and non-unit head-dim strides."""
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 9, 2 * 32, generator=gen).view(2, 9, 2, 32)
    kv = torch.randn(2, 32, 20, 2, generator=gen)  # [B, d, Lk, 2 heads]: d stride 40
    k, v = kv.permute(0, 2, 3, 1), kv.flip(-1).permute(0, 2, 3, 1)
    assert k.stride(3) == 40
    key_mask = torch.stack([prefix_mask(20, [20, 11])] * 3, dim=-1)[..., 1]  # stride 3 over keys
    assert key_mask.stride(1) == 3
    out = ops.cross_attention(q, k, v, key_mask, backend="triton")
    torch.testing.assert_close(out.double(), naive(q, k, v, key_mask), rtol=1e-5, atol=1e-5)


def test_auto_picks_triton_only_for_cuda_tensors():
    q, k, v = _inputs(1, 7, 5, seed=0)
    key_mask = torch.ones(1, 5, dtype=torch.bool)
    assert ops.resolve_backend("cross_attention", "auto", q, k, v, key_mask) == "torch"
    assert ops.resolve_backend("cross_attention", "triton", q, k, v, key_mask) == "triton"


# --- bad input --------------------------------------------------------------------------------------


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
        (
            lambda q, k, v, m: ops.cross_attention(q, k, v, m, backend="cuda"),
            ops.BackendUnavailableError,
            r"backend 'cuda' unavailable",
        ),
    ],
)
def test_bad_input_is_rejected(call, error, match):
    q, k, v = _inputs(1, 7, 5, seed=0)
    key_mask = torch.ones(1, 5, dtype=torch.bool)
    with pytest.raises(error, match=match):
        call(q, k, v, key_mask)


def test_triton_refuses_head_dims_above_128():
    q, k, v = _inputs(1, 3, 4, heads=1, dim=136)
    key_mask = torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ops.BackendUnavailableError, match=r"head dims up to 128, got d=136"):
        ops.cross_attention(q, k, v, key_mask, backend="triton")
    assert ops.resolve_backend("cross_attention", "auto", q, k, v, key_mask) == "torch"


# --- the compiled kernel on a GPU -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("valid", [[720, 326], [0, 1]])
def test_compiled_kernel_on_gpu(valid, dtype):
    """Full scale: 1,024 latent queries, 20 heads of 112, the 720-row condition of a CFG batch."""
    q, k, v = _inputs(2, 1024, 720, heads=20, dim=112, seed=12, dtype=dtype, device="cuda")
    key_mask = prefix_mask(720, valid, device="cuda")
    assert ops.resolve_backend("cross_attention", "auto", q, k, v, key_mask) == "triton"
    out = ops.cross_attention(q, k, v, key_mask)
    if 0 in valid:  # scores near -10000 keep ~1e-3 of precision in every implementation
        reference = ops.cross_attention(q, k, v, key_mask, backend="torch")
        torch.testing.assert_close(out.float(), reference.float(), rtol=0, atol=2e-2)
    else:
        assert_within_rounding(out, q, k, v, key_mask)
    # The skipped padding changes nothing: the same bits as the kernel on the valid keys alone.
    n = valid[1]
    alone = ops.cross_attention(q[1:], k[1:, :n], v[1:, :n], key_mask[1:, :n])
    assert torch.equal(out[1:], alone)
