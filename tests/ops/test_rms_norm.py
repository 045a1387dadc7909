"""``ops.rms_norm`` (RMSNorm, optionally fused with the rotate-half RoPE): the triton kernel under the
interpreter against the reference, written-out formulas, awkward sizes, poisoned outputs, bad input."""

from __future__ import annotations

import pytest
import torch

from kelix_fast import ops
from kelix_fast.ops.norm import rms_norm_reference, rotate_half_rope

BACKENDS = ["torch", "triton"]
TOLERANCE = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _inputs(shape, dtype, *, seed=0, rope=False):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 3).to(dtype)
    weight = (1 + 0.2 * torch.randn(shape[-1], generator=gen)).to(dtype)
    if not rope:
        return x, weight, None, None
    angles = torch.rand(*shape[:-2], shape[-1] // 2, generator=gen) * 6.3
    return x, weight, angles.cos(), angles.sin()


def _written_out(x, weight, eps, cos=None, sin=None):
    """The formula spelled out in float64 and rounded where the reference rounds."""
    xd = x.double()
    normed = (xd / torch.sqrt(xd.square().mean(-1, keepdim=True) + eps)).to(x.dtype)
    normed = (normed.double() * weight.double()).to(x.dtype)
    if cos is None:
        return normed
    half = x.shape[-1] // 2
    a, b = normed.double()[..., :half], normed.double()[..., half:]
    c, s = cos.double()[..., None, :], sin.double()[..., None, :]
    return torch.cat([a * c - b * s, b * c + a * s], -1).to(x.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (3, 100), (2, 5, 4096)], ids=str)
def test_rms_norm_matches_the_formula(backend, dtype, shape):
    x, weight, _, _ = _inputs(shape, dtype)
    got = ops.rms_norm(x, weight, eps=1e-6, backend=backend)
    want = _written_out(x, weight, 1e-6)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [(1, 1, 4, 128), (2, 7, 8, 128), (3, 2, 16), (1, 33, 2, 72)],
    ids=["decode", "prefill", "tiny-heads", "hd72"],
)
def test_fused_rope_matches_the_reference(dtype, shape):
    x, weight, cos, sin = _inputs(shape, dtype, rope=True)
    want = rotate_half_rope(
        rms_norm_reference(x, weight, 1e-6), cos[..., None, :], sin[..., None, :]
    )
    for backend in BACKENDS:
        got = ops.rms_norm(x, weight, eps=1e-6, rope_cos=cos, rope_sin=sin, backend=backend)
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(
        want.float(),
        _written_out(x, weight, 1e-6, cos, sin).float(),
        rtol=TOLERANCE[dtype] * 4,
        atol=TOLERANCE[dtype] * 4,
    )


def test_triton_rounds_bf16_like_the_reference_bit_for_bit():
    """Row sums differ only in the last float32 bits, so nearly every bf16 output is identical."""
    x, weight, cos, sin = _inputs((4, 3, 8, 128), torch.bfloat16, seed=3, rope=True)
    for kwargs in ({}, {"rope_cos": cos, "rope_sin": sin}):
        got = ops.rms_norm(x, weight, eps=1e-6, backend="triton", **kwargs)
        want = ops.rms_norm(x, weight, eps=1e-6, backend="torch", **kwargs)
        assert (got != want).float().mean().item() < 0.01


def test_triton_writes_every_output_and_nothing_else():
    x, weight, cos, sin = _inputs((5, 3, 24), torch.float32, rope=True)
    out = ops.rms_norm(x, weight, eps=1e-6, rope_cos=cos, rope_sin=sin, backend="triton")
    assert bool(torch.isfinite(out).all())
    strided = torch.randn(6, 200)[:, 10:110]  # a row stride of 200, last dim contiguous
    got = ops.rms_norm(strided, torch.ones(100), eps=1e-6, backend="triton")
    torch.testing.assert_close(got, rms_norm_reference(strided, torch.ones(100), 1e-6))


@pytest.mark.parametrize("rope", [False, True], ids=["norm", "rope"])
@pytest.mark.parametrize("batch, length", [(1, 1), (3, 1), (2, 5)])
def test_heads_sliced_from_a_fused_projection_are_read_in_place(rope, batch, length):
    """q and k as the LLM slices them out of one [B, L, (H + 2 Hkv) d] projection: [B, L, H, d] views
    whose head stride (d) and position stride ((H + 2 Hkv) d) do not merge into one row stride. The
    kernel addresses them with both strides (no copy), and each head row normalises on its own: the
    values either side of the slice are NaN and must not leak in."""
    heads, kv_heads, dim = 3, 2, 24
    width = (heads + 2 * kv_heads) * dim
    fused = torch.full((batch, length, width), float("nan"))
    x, weight, cos, sin = _inputs((batch, length, kv_heads, dim), torch.float32, seed=7, rope=True)
    fused[..., heads * dim : (heads + kv_heads) * dim] = x.flatten(-2)
    k = fused[..., heads * dim : (heads + kv_heads) * dim].view(batch, length, kv_heads, dim)
    assert k.stride()[-2:] == (dim, 1) and k.is_contiguous() == (batch * length == 1)
    kwargs = {"rope_cos": cos, "rope_sin": sin} if rope else {}
    got = ops.rms_norm(k, weight, eps=1e-6, backend="triton", **kwargs)
    torch.testing.assert_close(got, ops.rms_norm(x, weight, eps=1e-6, backend="torch", **kwargs))


def test_empty_input_is_a_no_op():
    out = ops.rms_norm(torch.empty(0, 3, 16), torch.ones(16), eps=1e-6, backend="triton")
    assert out.shape == (0, 3, 16)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"x": torch.zeros(2, 8, dtype=torch.int64)}, "x must have dtype"),
        ({"weight": torch.ones(9)}, r"weight must have shape \[8\]"),
        ({"weight": torch.ones(8, dtype=torch.float64)}, "weight must have the dtype of x"),
        ({"eps": -1.0}, "eps must be a finite number > 0"),
        ({"rope_cos": torch.ones(2, 4)}, "rope_cos and rope_sin must be given together"),
        (
            {"rope_cos": torch.ones(2, 4), "rope_sin": torch.ones(2, 4)},
            r"rope_cos must have shape \[4\] \(x's leading dims without H, D/2\)",
        ),
        (
            {"rope_cos": torch.ones(4, dtype=torch.float64), "rope_sin": torch.ones(4)},
            "rope_cos must have dtype float32",
        ),
        (
            {
                "x": torch.zeros(2, 7),
                "weight": torch.ones(7),
                "rope_cos": torch.ones(2, 3),
                "rope_sin": torch.ones(2, 3),
            },
            "RoPE needs x of shape",
        ),
    ],
)
def test_bad_input_names_the_argument(change, match):
    kwargs = {"x": torch.zeros(2, 8), "weight": torch.ones(8), "eps": 1e-6, **change}
    with pytest.raises(ValueError, match=match):
        ops.rms_norm(kwargs.pop("x"), kwargs.pop("weight"), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 64), (3, 100), (2, 5, 4096), (4, 1, 3, 24)], ids=str)
def test_add_rms_norm_equals_the_add_then_the_norm(backend, dtype, shape):
    """The sum is the separate add bit for bit (rounded once to the dtype, on every backend); the
    normalised output matches rms_norm of that sum (bit for bit on the reference, to rounding on
    triton). Sums that round: residual values 2^9 larger than x lose x's low bits in bf16."""
    x, weight, _, _ = _inputs(shape, dtype, seed=2)
    residual = (torch.randn(shape, generator=torch.Generator().manual_seed(5)) * 512).to(dtype)
    out, summed = ops.add_rms_norm(x, residual, weight, eps=1e-6, backend=backend)
    assert torch.equal(summed, x + residual)
    want = ops.rms_norm(x + residual, weight, eps=1e-6, backend="torch")
    if backend == "torch":
        assert torch.equal(out, want)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)
    assert out.is_contiguous() and summed.is_contiguous()


def test_add_rms_norm_reads_strided_inputs():
    """Non-contiguous x and residual (column slices) give the contiguous result of the same values."""
    x = torch.randn(6, 40)[:, 3:35]
    residual = torch.randn(6, 64)[:, ::2]
    weight = torch.rand(32) + 0.5
    out, summed = ops.add_rms_norm(x, residual, weight, eps=1e-6, backend="triton")
    assert torch.equal(summed, x + residual)
    torch.testing.assert_close(out, rms_norm_reference(x + residual, weight, 1e-6))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"residual": torch.zeros(2, 9)}, r"add_rms_norm: residual must have shape \[2, 8\]"),
        ({"residual": torch.zeros(2, 8, dtype=torch.float16)}, "residual must have the dtype of x"),
        ({"residual": [0.0] * 8}, "add_rms_norm: residual must be a torch.Tensor"),
        ({"weight": torch.ones(9)}, r"add_rms_norm: weight must have shape \[8\]"),
        ({"eps": 0.0}, "add_rms_norm: eps must be a finite number > 0"),
    ],
)
def test_add_rms_norm_bad_input_names_the_argument(change, match):
    kwargs = {"x": torch.zeros(2, 8), "residual": torch.zeros(2, 8), "weight": torch.ones(8)}
    kwargs |= {"eps": 1e-6, **change}
    with pytest.raises((ValueError, TypeError), match=match):
        ops.add_rms_norm(kwargs.pop("x"), kwargs.pop("residual"), kwargs.pop("weight"), **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu_matches_the_reference(dtype):
    x, weight, cos, sin = _inputs((3, 1, 32, 128), dtype, rope=True)
    x, weight, cos, sin = (t.cuda() for t in (x, weight, cos, sin))
    for kwargs in ({}, {"rope_cos": cos, "rope_sin": sin}):
        got = ops.rms_norm(x, weight, eps=1e-6, **kwargs)
        want = ops.rms_norm(x, weight, eps=1e-6, backend="torch", **kwargs)
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert ops.resolve_backend("rms_norm", "auto", x, weight) == "triton"
    residual = torch.randn_like(x)
    out, summed = ops.add_rms_norm(x, residual, weight, eps=1e-6)
    assert torch.equal(summed, x + residual)
    want = ops.rms_norm(x + residual, weight, eps=1e-6, backend="torch")
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)
