"""``ops.silu_mul`` (SwiGLU's ``silu(gate) * up`` on the fused [..., 2I] projection): the reference on
written-out values, the triton kernel under the interpreter against the reference on awkward sizes
and strided rows, its rounding bit for bit, poisoned outputs, empty and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kelix_fast import ops, triton_kernels

BACKENDS = ["torch", "triton"]
# Two ulps of each dtype (relative): where the float32 exp of the kernel and of torch differ in the
# last bit, silu can round to the neighbouring value, and the product then moves by one or two ulps.
# float32: a few ulps of float32 (numpy's exp, ex2.approx on the GPU, Sleef or libm in torch).
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}
ATOL = 1e-12  # outputs are products, never cancellations: the error is relative down to 0
# float32 on the GPU: ex2.approx of g * log2(e) is off by up to |g| * 2^-24 relative (about 1e-6 at the
# |g| <= 12 of these inputs) on top of torch's expf error.
GPU_TOLERANCE = {**TOLERANCE, torch.float32: 1e-5}


def _inputs(shape, dtype, *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 3).to(dtype)


def _written_out(x):
    """The formula in float64, rounded to the dtype where the reference rounds (silu, product)."""
    half = x.shape[-1] // 2
    gate, up = x.double()[..., :half], x.double()[..., half:]
    silu = (gate / (1 + torch.exp(-gate))).to(x.dtype)
    return (silu.double() * up).to(x.dtype)


def _assert_close(got, want, tolerance=TOLERANCE):
    tol = tolerance[want.dtype]
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=ATOL)


def test_reference_on_hand_worked_values():
    # silu(0) = 0, silu(1) = 1 / (1 + e^-1), silu(-1) = -1 / (1 + e), silu(40) = 40 in float32.
    x = torch.tensor([[0.0, 1.0, -1.0, 40.0, 5.0, 2.0, 3.0, 0.5]])
    want = torch.tensor([[0.0, 2 * 0.7310585786, -3 * 0.2689414214, 20.0]])
    got = ops.silu_mul(x, backend="torch")
    torch.testing.assert_close(got, want)
    assert torch.equal(got, F.silu(x[:, :4]) * x[:, 4:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "shape",
    [(2,), (1, 2), (1, 130), (7, 200), (17, 2 * 4100), (2, 3, 2 * 72), (3, 1, 2 * 12288)],
    ids=str,
)
def test_silu_mul_matches_the_reference_and_the_formula(backend, dtype, shape):
    """I = 1, a single row, I not a power of two, I = 4100 past one interpreter block of 4096
    columns, 17 rows past one block of 16 rows, [B, L, 2I], and Qwen3-8B's I = 12288 at decode."""
    x = _inputs(shape, dtype, seed=sum(shape))
    got = ops.silu_mul(x, backend=backend)
    assert got.shape == (*shape[:-1], shape[-1] // 2) and got.is_contiguous()
    want = F.silu(x[..., : shape[-1] // 2]) * x[..., shape[-1] // 2 :]
    _assert_close(got, want)
    _assert_close(got, _written_out(x))
    if backend == "torch":
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_triton_rounds_like_the_reference_bit_for_bit(dtype):
    """Both roundings happen where torch's happen (cast_rne under the interpreter, whose casts to
    bf16 truncate): only exp's last float32 bit can differ, so nearly every 16-bit output is equal.
    float32 outputs carry exp's bit (numpy's and torch's exp differ in about 40% of their results)."""
    x = _inputs((64, 2 * 1000), dtype, seed=3)
    got = ops.silu_mul(x, backend="triton")
    want = ops.silu_mul(x, backend="torch")
    differ = (got != want).float().mean().item()
    assert differ < (0.3 if dtype == torch.float32 else 0.01)
    _assert_close(got, want)


def test_triton_with_the_gpu_block_sizes(monkeypatch):
    """The interpreter normally runs 16 rows x 4096 columns per program; with the GPU's blocks (one row,
    1024 columns) I = 2500 spans three column programs, the last one partial."""
    kernels = triton_kernels.interpreted("silu_mul")
    monkeypatch.setattr(kernels, "_BLOCK_ROWS_INTERPRETER", kernels._BLOCK_ROWS)
    monkeypatch.setattr(kernels, "_BLOCK_COLS_INTERPRETER", kernels._BLOCK_COLS)
    x = _inputs((3, 2 * 2500), torch.bfloat16, seed=4)
    got = ops.silu_mul(x, backend="triton")
    assert torch.equal(got, ops.silu_mul(x, backend="torch"))


# numpy warns of exp's overflow and of -inf / inf under the interpreter: the values tested here.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")
def test_extreme_gates_round_like_the_reference():
    """exp(-g) overflows to inf below g = -88.7 (silu = -0.0, sign kept); silu(-inf) is NaN and
    silu(inf) = inf, as in torch."""
    gate = torch.tensor([-float("inf"), -100.0, -88.8, -20.0, 0.0, -0.0, 20.0, 100.0, float("inf")])
    up = torch.tensor([1.0, 2.0, 3.0, -1.0, 5.0, 1.0, 0.5, -2.0, 1.0])
    x = torch.cat([gate, up])[None]
    for dtype in (torch.float32, torch.bfloat16):
        want = ops.silu_mul(x.to(dtype), backend="torch")
        got = ops.silu_mul(x.to(dtype), backend="triton")
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(got, want, rtol=tol, atol=ATOL, equal_nan=True)
        number = ~torch.isnan(want)  # a NaN's sign bit means nothing
        assert torch.equal(torch.signbit(got)[number], torch.signbit(want)[number])


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_rows_are_read_in_place(backend):
    """A column slice of a wider tensor (row stride 2I + 13) and a [B, L, 2I] view whose leading
    strides do not merge (the launcher copies those into rows); NaN either side of the slice must not
    leak into the output."""
    half = 100
    wide = torch.full((6, 2 * half + 13), float("nan"))
    x = _inputs((6, 2 * half), torch.float32, seed=5)
    wide[:, 7 : 7 + 2 * half] = x
    view = wide[:, 7 : 7 + 2 * half]
    assert view.stride() == (2 * half + 13, 1)
    _assert_close(ops.silu_mul(view, backend=backend), ops.silu_mul(x, backend="torch"))

    batch = torch.full((2, 5, 2 * half + 8), float("nan"))
    y = _inputs((2, 4, 2 * half), torch.bfloat16, seed=6)
    batch = batch.to(torch.bfloat16)
    batch[:, :4, : 2 * half] = y
    view = batch[:, :4, : 2 * half]
    got = ops.silu_mul(view, backend=backend)
    assert got.shape == (2, 4, half)
    assert torch.equal(got, ops.silu_mul(y, backend="torch"))


def test_triton_overwrites_a_poisoned_output_and_nothing_past_it():
    """The launcher fills a NaN-filled ``out`` completely (finite input, finite output) and writes
    nothing beyond it (the interpreter does not catch out-of-bounds stores: a guard region does).
    19 rows x I = 9000: two row blocks and three column blocks of the interpreter, the last ones
    partial."""
    n, half = 19, 9000
    x = _inputs((n, 2 * half), torch.bfloat16, seed=7)
    buffer = torch.full((n * half + 4096,), float("nan"), dtype=torch.bfloat16)
    out = buffer[: n * half].view(n, half)
    triton_kernels.kernels_for("silu_mul", x).silu_mul(x, out)
    assert bool(torch.isfinite(out).all())
    assert bool(torch.isnan(buffer[n * half :]).all())
    _assert_close(out, ops.silu_mul(x, backend="torch"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0, 16), (2, 0, 16)], ids=str)
def test_empty_input_gives_an_empty_output(backend, shape):
    out = ops.silu_mul(torch.empty(shape), backend=backend)
    assert out.shape == (*shape[:-1], 8)


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        ([1.0, 2.0], TypeError, "silu_mul: x must be a torch.Tensor, got list"),
        (torch.zeros(3, 7), ValueError, r"silu_mul: x must have shape \[..., 2I\] with an even"),
        (torch.zeros(3, 0), ValueError, r"x must have shape \[..., 2I\] with an even 2I > 0"),
        (torch.tensor(1.0), ValueError, r"x must have shape \[..., 2I\]"),
        (torch.zeros(2, 8, dtype=torch.int64), ValueError, "silu_mul: x must have dtype float32"),
        (torch.zeros(2, 8, dtype=torch.float64), ValueError, "x must have dtype .* got float64"),
        (torch.zeros(2, 16)[:, ::2], ValueError, r"x must have a contiguous last dim .*\[16, 2\]"),
        (torch.zeros(8, 2).t(), ValueError, "silu_mul: x must have a contiguous last dim"),
    ],
    ids=["list", "odd", "zero", "scalar", "int64", "float64", "step", "transposed"],
)
def test_bad_input_names_the_argument(x, error, match):
    for backend in BACKENDS:
        with pytest.raises(error, match=match):
            ops.silu_mul(x, backend=backend)


def test_bad_backend_names_the_choices():
    with pytest.raises(ValueError, match="silu_mul: backend must be one of"):
        ops.silu_mul(torch.zeros(2, 8), backend="cuda_graph")
    with pytest.raises(ops.BackendUnavailableError, match="silu_mul: backend 'cuda' unavailable"):
        ops.silu_mul(torch.zeros(2, 8), backend="cuda")


def test_auto_runs_the_reference_on_cpu():
    x = torch.zeros(2, 8)
    assert ops.resolve_backend("silu_mul", "auto", x) == "torch"
    assert ops.resolve_backend("silu_mul", "triton", x) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_on_gpu_matches_the_reference(dtype):
    for shape in [(1, 2 * 12288), (32, 2 * 12288), (3, 7, 2 * 1000), (5, 2 * 3)]:
        x = _inputs(shape, dtype, seed=8).cuda()
        got = ops.silu_mul(x)
        want = ops.silu_mul(x, backend="torch")
        _assert_close(got, want, GPU_TOLERANCE)
        if dtype != torch.float32:
            assert (got != want).float().mean().item() < 0.01
    wide = _inputs((4, 2 * 12288 + 64), dtype, seed=9).cuda()
    view = wide[:, 32 : 32 + 2 * 12288]
    want = ops.silu_mul(view.contiguous(), backend="torch")
    _assert_close(ops.silu_mul(view), want, GPU_TOLERANCE)
    assert ops.resolve_backend("silu_mul", "auto", x) == "triton"
