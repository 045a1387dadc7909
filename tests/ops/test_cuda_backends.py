"""The ``"cuda"`` backend (``kelix_fast.ops._cuda`` -> ``kelix_fast._C`` -> the C API) against the references.

GPU tests call the adapters directly (with the ops' reference signatures) and through
``ops.*(backend="cuda")``. The CPU tests check the probes and that the C API's argument checks (which run before any CUDA call) surface as
``RuntimeError`` naming the ``kf_`` function; head_select's selection arithmetic (keys, hash, uniforms)
also runs on the host through a small nvcc-built harness.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kelix_fast import ops
from kelix_fast.ops import BackendUnavailableError, _cuda
from kelix_fast.ops.codebook import official_sqdist
from kelix_fast.ops.norm import rms_norm_reference
from tests.ops.test_head_select import EXACT_EPS, chi_square_p_value

TEXT_VOCAB = 1000
Q_EOS = 7


def _extension():
    reason = _cuda.extension_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    from kelix_fast import _C

    return _C


# --- CPU: probes and argument checks ---------------------------------------------------------------


def test_can_run_cuda_gives_a_reason_for_cpu_tensors():
    reason = _cuda.can_run_cuda(torch.zeros(2), torch.zeros(2, dtype=torch.int64))
    assert isinstance(reason, str) and reason
    assert _cuda.can_run_codebook_argmin(torch.zeros(1, 16), torch.zeros(1, 4, 16)) is not None
    assert _cuda.can_run_block_embed(torch.zeros(1, 1, 2, dtype=torch.int64), torch.zeros(4, 8))


def test_extension_reason_is_none_or_a_sentence():
    reason = _cuda.extension_unavailable_reason()
    assert reason is None or ("kelix_fast._C" in reason)


def _argmin_args(C, **changes):
    # Non-null fake device addresses: every call below is refused before anything touches them.
    args = {
        "z": 256, "ln_weight": 256, "ln_bias": 256, "codebooks": 256, "codebook_sqnorms": 0,
        "ids": 256, "n_rows": 4, "z_row_stride": 1024, "n_groups": 8, "n_codes": 8192, "dim": 128,
        "vocab_offset": 151936, "dtype": C.DTYPE_BFLOAT16, "mode": C.ARGMIN_REFERENCE,
        "eps": 1e-5, "stream": 0,
    }  # fmt: skip
    return {**args, **changes}


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({"dim": 100}, "unsupported"),
        ({"dim": 272}, "unsupported"),
        ({"dtype": 3}, "unsupported"),  # int64
        ({"mode": 5}, "unsupported"),
        ({"ln_weight": 0}, "invalid argument"),
        ({"ids": 0}, "invalid argument"),
        ({"n_codes": 0}, "invalid argument"),
        ({"n_rows": -1}, "invalid argument"),
        ({"ids": 260}, "invalid argument"),  # int64 output not 8-byte aligned
    ],
)
def test_codebook_argmin_binding_refuses_bad_arguments(changes, status):
    C = _extension()
    with pytest.raises(RuntimeError, match=rf"^kf_codebook_argmin: {status} \(.*\)$"):
        C.codebook_argmin(**_argmin_args(C, **changes))


def test_codebook_argmin_binding_no_rows_is_a_no_op():
    C = _extension()
    C.codebook_argmin(**_argmin_args(C, n_rows=0, z=0, ids=0))  # returns before any CUDA call


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({"dtype": 3}, "unsupported"),
        ({"table": 0}, "invalid argument"),
        ({"n_slots": 1}, "invalid argument"),
        ({"table_row_stride": 8}, "invalid argument"),
        ({"n_table_rows": 0}, "invalid argument"),
    ],
)
def test_block_embed_binding_refuses_bad_arguments(changes, status):
    C = _extension()
    args = {
        "ids": 256, "table": 256, "out": 256, "n_rows": 6, "n_slots": 9, "n_table_rows": 100,
        "dim": 16, "table_row_stride": 16, "q_eos": Q_EOS, "text_vocab": TEXT_VOCAB,
        "dtype": C.DTYPE_FLOAT32, "stream": 0,
    }  # fmt: skip
    args.update(changes)
    with pytest.raises(RuntimeError, match=rf"^kf_block_embed: {status} \(.*\)$"):
        C.block_embed(**args)


# --- GPU: codebook_argmin ------------------------------------------------------------------------------


def _codebook_inputs(n, groups, codes, dim, dtype, seed, *, raw=False):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, groups * dim, generator=gen) * 3 + 1
    weight = 1 + 0.1 * torch.randn(groups, dim, generator=gen)
    bias = 0.1 * torch.randn(groups, dim, generator=gen)
    codebooks = torch.randn(groups, codes, dim, generator=gen)
    if not raw:
        # LayerNormed codes, as the model's q_norm makes them (distances ~256, bf16 spacing 2).
        codebooks = F.layer_norm(codebooks, (dim,))
    # The LayerNorm parameters in the dtype of z, as the model holds them (ops.codebook_argmin requires it).
    return [t.to("cuda", dtype) for t in (z, weight, bias, codebooks)]


def _run_cuda_argmin(z, weight, bias, codebooks, sqnorms, mode, offset=0):
    ids = torch.full((z.shape[0], codebooks.shape[0]), -1, dtype=torch.int64, device=z.device)
    _cuda.codebook_argmin(z, weight, bias, codebooks, sqnorms, ids, offset, mode, 1e-5)
    return ids


def _run_reference_argmin(z, weight, bias, codebooks, sqnorms, mode, offset=0):
    return ops.codebook_argmin(
        z, weight, bias, codebooks, sqnorms, vocab_offset=offset, mode=mode, backend="torch"
    )


def _exact_distances(z, weight, bias, codebooks):
    """[n, G, K] float64 |c|^2 - 2 u.c with u the float32 LayerNorm: the exact mode's objective."""
    groups, _, dim = codebooks.shape
    u = torch.stack(
        [F.layer_norm(z[:, g * dim : (g + 1) * dim].float(), (dim,), weight[g].float(),
                      bias[g].float(), 1e-5) for g in range(groups)], 1,
    ).double()  # fmt: skip
    c = codebooks.double()
    return c.square().sum(-1)[None] - 2 * torch.einsum("ngd,gkd->ngk", u, c)


def _reference_distances(z, weight, bias, codebooks):
    """[n, G, K] official cdist^2 in the dtype of codebooks (float32 view)."""
    groups, _, dim = codebooks.shape
    out = []
    for g in range(groups):
        u = F.layer_norm(z[:, g * dim : (g + 1) * dim], (dim,), weight[g], bias[g], 1e-5)
        out.append(official_sqdist(u, codebooks[g]).float())
    return torch.stack(out, 1)


def _chosen(dist, ids, groups, codes, offset=0):
    local = ids - offset - codes * torch.arange(groups, device=ids.device)
    assert ((local >= 0) & (local < codes)).all(), "ids outside their sub-codebook"
    return dist.gather(-1, local[..., None])[..., 0]


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 7, 129, 1000])
@pytest.mark.parametrize("codes", [8192, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_codebook_argmin_exact_matches_reference(n, codes, dtype):
    z, weight, bias, codebooks = _codebook_inputs(n, 8, codes, 128, dtype, seed=n + codes)
    sqnorms = codebooks.float().square().sum(-1)
    for given in (sqnorms, None):
        got = _run_cuda_argmin(z, weight, bias, codebooks, given, "exact", offset=151936)
        want = _run_reference_argmin(z, weight, bias, codebooks, given, "exact", offset=151936)
        # Summation orders differ, so a near-tie may resolve either way: the chosen code must be
        # as near as the reference's up to float32 rounding of the distances (~1e-4 here).
        dist = _exact_distances(z, weight, bias, codebooks)
        gap = _chosen(dist, got, 8, codes, 151936) - _chosen(dist, want, 8, codes, 151936)
        assert gap.abs().max().item() <= 1e-3, gap.abs().max().item()
        assert (got == want).float().mean().item() >= 0.99


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 7, 129, 1000])
@pytest.mark.parametrize("codes", [8192, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("raw", [False, True])
def test_codebook_argmin_reference_mode_matches_official_arithmetic(n, codes, dtype, raw):
    z, weight, bias, codebooks = _codebook_inputs(n, 8, codes, 128, dtype, seed=n, raw=raw)
    got = _run_cuda_argmin(z, weight, bias, codebooks, None, "reference")
    want = _run_reference_argmin(z, weight, bias, codebooks, None, "reference")
    dist = _reference_distances(z, weight, bias, codebooks)
    # The official distances are rounded to the dtype, so many codes tie at the minimum; the kernel
    # pick one at the minimum up to what summation order and LayerNorm rounding can move: one
    # rounding of the GEMM sum becomes up to two ulps after sqrt and square; float32 cancels
    # ~256-sized terms, hence an absolute 1e-3.
    best = dist.min(-1).values
    relative = {torch.bfloat16: 2 * 2.0**-7, torch.float16: 2 * 2.0**-10, torch.float32: 1e-5}
    tolerance = best.abs() * relative[dtype] + 1e-3
    assert (_chosen(dist, got, 8, codes) - best <= tolerance).all()
    assert (got == want).float().mean().item() >= 0.95


# Exact duplicate codes on every backend, this one included:
# tests/ops/test_codebook_argmin.py::test_exact_duplicate_codes_give_the_first_index_on_every_backend.


@pytest.mark.gpu
@pytest.mark.parametrize("dim", [16, 48, 256])
def test_codebook_argmin_other_dims_and_strided_z(dim):
    z, weight, bias, codebooks = _codebook_inputs(70, 3, 130, dim, torch.bfloat16, seed=dim)
    wide = torch.zeros(70, z.shape[1] + 16, dtype=z.dtype, device="cuda")
    wide[:, 8 : 8 + z.shape[1]] = z
    z_view = wide[:, 8 : 8 + z.shape[1]]  # row stride != G*d, not 16-byte aligned
    for mode in ("exact", "reference"):
        got = _run_cuda_argmin(z_view, weight, bias, codebooks, None, mode)
        assert torch.equal(got, _run_cuda_argmin(z, weight, bias, codebooks, None, mode))


@pytest.mark.gpu
def test_ops_codebook_argmin_cuda_backend():
    z, weight, bias, codebooks = _codebook_inputs(129, 8, 1000, 128, torch.bfloat16, seed=1)
    got = ops.codebook_argmin(
        z, weight, bias, codebooks, vocab_offset=5, mode="exact", backend="cuda"
    )
    want = ops.codebook_argmin(
        z, weight, bias, codebooks, vocab_offset=5, mode="exact", backend="torch"
    )
    assert (got == want).float().mean().item() >= 0.999


# --- GPU: block_embed ---------------------------------------------------------------------------------


def _block_ids(batch, length, slots, vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(TEXT_VOCAB, vocab, (batch, length, slots), generator=gen)
    kind = torch.randint(0, 4, (batch, length), generator=gen)
    text = torch.randint(0, TEXT_VOCAB, (batch, length), generator=gen)
    ids[..., 0] = torch.where(kind == 0, text, ids[..., 0])  # text groups
    cut = torch.randint(0, slots, (batch, length), generator=gen)
    has_eos = kind == 1
    positions = torch.arange(slots)[None, None]
    ids = torch.where(has_eos[..., None] & (positions == cut[..., None]), Q_EOS, ids)
    ids[0, 0, 0] = Q_EOS  # a group that starts with q_eos: zeros
    return ids.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("batch", "length", "dim"), [(1, 1, 8), (2, 7, 4096), (3, 129, 100)])
def test_block_embed_matches_reference_bitwise(dtype, batch, length, dim):
    vocab = TEXT_VOCAB + 500
    table = torch.randn(vocab, dim, generator=torch.Generator().manual_seed(dim)).to(dtype).cuda()
    ids = _block_ids(batch, length, 9, vocab, seed=batch * length)
    got = torch.full((batch, length, dim), float("nan"), dtype=dtype, device="cuda")
    _cuda.block_embed(ids, table, got, Q_EOS, TEXT_VOCAB)
    want = ops.block_embed(ids, table, q_eos=Q_EOS, text_vocab=TEXT_VOCAB, backend="torch")
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_block_embed_unaligned_table_uses_element_loads():
    vocab, dim = TEXT_VOCAB + 50, 64
    base = torch.randn(vocab, dim + 1, device="cuda").to(torch.bfloat16)
    table = base[:, 1:]  # rows start 2 bytes past a 16-byte boundary
    ids = _block_ids(2, 5, 9, vocab, seed=0)
    got = torch.empty(2, 5, dim, dtype=torch.bfloat16, device="cuda")
    _cuda.block_embed(ids, table, got, Q_EOS, TEXT_VOCAB)
    want = ops.block_embed(ids, table, q_eos=Q_EOS, text_vocab=TEXT_VOCAB, backend="torch")
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_ops_block_embed_cuda_backend():
    vocab = TEXT_VOCAB + 100
    table = torch.randn(vocab, 256, device="cuda", dtype=torch.bfloat16)
    ids = _block_ids(2, 9, 9, vocab, seed=1)
    got = ops.block_embed(ids, table, q_eos=Q_EOS, text_vocab=TEXT_VOCAB, backend="cuda")
    want = ops.block_embed(ids, table, q_eos=Q_EOS, text_vocab=TEXT_VOCAB, backend="torch")
    assert torch.equal(got, want)


# --- head_select ---------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
FULL_VOCAB, FULL_DIM = 217472, 4096


def _head_select_extension():
    C = _extension()
    if not hasattr(C, "head_select"):
        pytest.skip("kelix_fast._C predates kf_head_select: rebuild it (pip install -e .)")
    return C


def _integer_head_inputs(rows, vocab, dim, dtype, seed, *, scale=1.0, device="cuda"):
    """y in {-1, 1}, weight = scale * {1, 2}, head in {-2, ..., 2}; with eps = 0 the RMSNorm is exact
    (rms 1) and, for a power-of-two scale, every logit is a multiple of it below 2^24 of them: all
    backends compute the same float32 logits in any summation order, so ties are real ties."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (rows, dim), generator=gen).float() * 2 - 1
    weight = torch.randint(1, 3, (dim,), generator=gen).float() * scale
    head = torch.randint(-2, 3, (vocab, dim), generator=gen).float()
    return tuple(t.to(device=device, dtype=dtype) for t in (y, weight, head))


def _random_head_inputs(rows, vocab, dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, dim, generator=gen) * 2
    weight = 1 + 0.1 * torch.randn(dim, generator=gen)
    head = torch.randn(vocab, dim, generator=gen)
    return tuple(t.to(device="cuda", dtype=dtype) for t in (y, weight, head))


def _cpu_reference(y, weight, head, **kwargs):
    """ops.head_select's torch reference on CPU copies (exact float32 logits for integer inputs)."""
    cpu = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    ids = ops.head_select(y.cpu(), weight.cpu(), head.cpu(), backend="torch", **cpu)
    return ids.to(y.device)


def _cuda_select(y, weight, head, *, eps, temperature=1.0, top_k=1, seeds=None, allowed=None):
    """The CUDA kernel at any row count: ``ops.head_select(backend="cuda")`` for one row (the rows
    kelix_fast offers it for), its launcher ``ops._cuda.head_select`` (what the C API serves: any M)
    for more. Arguments as ops.head_select's, valid ones only (the launcher checks nothing)."""
    if y.shape[0] == 1:
        return ops.head_select(
            y, weight, head, eps=eps, temperature=temperature, top_k=top_k, seeds=seeds,
            allowed=allowed, backend="cuda",
        )  # fmt: skip
    ids = torch.full((y.shape[0],), -1, dtype=torch.int64, device=y.device)
    _cuda.head_select(y, weight, head, allowed, seeds, ids, eps, temperature, top_k, 1.0)
    return ids


def _exact_logits(y, weight, head, allowed=None):
    """float64 logits [M, V] of integer inputs (eps = 0), -inf outside ``allowed``."""
    logits = (y.double() * weight.double()) @ head.double().T
    if allowed is not None:
        ids = torch.arange(head.shape[0], device=y.device)
        inside = (ids >= allowed[..., :1]) & (ids < allowed[..., 1:])
        logits = logits.masked_fill(~inside.any(1), float("-inf"))
    return logits


def _gumbel_expected(logits, seeds, temperature):
    """The Gumbel-max draw both kernels make, in float64 on CPU: (ids [M], gap to the runner-up [M]).

    Uniforms in float32 exactly as the kernels form them (23 hashed bits + 0.5, times 2^-23), logits
    divided in float32 by the float32 ``temperature + 1e-5``; only the logs are float64, so a draw may
    differ from a kernel's only where the gap is within float32 rounding of the scores.
    """
    from kelix_fast.triton_kernels import head_select as triton_head_select

    logits = logits.cpu()
    keys = triton_head_select.row_keys(seeds.cpu())
    ids = torch.arange(logits.shape[1], dtype=torch.int64)
    hashed = triton_head_select._mix32_torch(
        keys[:, None] ^ triton_head_select._mix32_torch(ids)[None, :]
    )
    uniform = ((hashed >> 9).float() + 0.5) * (1.0 / 8388608.0)
    scaled = logits.float()
    if temperature > 0:
        scaled = scaled / torch.tensor(temperature + 1e-5, dtype=torch.float32)
    scores = scaled.double() - torch.log(-torch.log(uniform.double()))
    top = scores.topk(2, dim=-1)
    return top.indices[:, 0], top.values[:, 0] - top.values[:, 1]


# CPU: probes, refusals, and the C API's argument checks.


def test_head_select_cuda_backend_unavailable_on_cpu():
    y, weight, head = _integer_head_inputs(3, 40, 16, torch.float32, seed=0, device="cpu")
    reason = _cuda.can_run_head_select(y, head)
    assert isinstance(reason, str) and reason
    with pytest.raises(
        BackendUnavailableError, match=r"^head_select: backend 'cuda' unavailable: "
    ):
        ops.head_select(y, weight, head, eps=EXACT_EPS, backend="cuda")
    assert ops.resolve_backend("head_select", "auto", y, head) == "torch"
    want = ops.head_select(y, weight, head, eps=EXACT_EPS, backend="torch")
    assert torch.equal(ops.head_select(y, weight, head, eps=EXACT_EPS), want)


@pytest.mark.parametrize(("top_k", "top_p"), [(5, 1.0), (0, 0.9), (50, 0.5), (39, 1.0)])
def test_head_select_cuda_refuses_filtered_sampling(top_k, top_p):
    y, weight, head = _integer_head_inputs(2, 40, 16, torch.float32, seed=0, device="cpu")
    seeds = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(BackendUnavailableError, match=r"greedy \(top_k=1\) and full-row sampling"):
        ops.head_select(
            y, weight, head, eps=EXACT_EPS, top_k=top_k, top_p=top_p, seeds=seeds, backend="cuda"
        )


@pytest.mark.parametrize("top_k", [1, 0, 40, 1000])
def test_head_select_cuda_takes_greedy_and_full_row_requests(top_k):
    """top_k = 1, 0 or >= V with top_p = 1 reach the device probe (here: refused for CPU tensors)."""
    y, weight, head = _integer_head_inputs(2, 40, 16, torch.float32, seed=0, device="cpu")
    seeds = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(BackendUnavailableError) as error:
        ops.head_select(y, weight, head, eps=EXACT_EPS, top_k=top_k, seeds=seeds, backend="cuda")
    assert "full-row sampling" not in str(error.value)
    assert _cuda.can_run_head_select(y, head) in str(error.value)


def test_head_select_cuda_is_offered_for_one_row_only():
    """Measured on the H200: the CUDA kernel wins at M = 1 only (ops._cuda._HEAD_SELECT_MAX_ROWS); a
    request for more rows is refused by name, pointing at triton, before any device check."""
    y, weight, head = _integer_head_inputs(2, 40, 16, torch.float32, seed=0, device="cpu")
    reason = _cuda.can_run_head_select(y, head)
    assert "M <= 1 row" in reason and "M=2" in reason and "backend='triton'" in reason
    with pytest.raises(BackendUnavailableError, match=r"M=2; use backend='triton'"):
        ops.head_select(y, weight, head, eps=EXACT_EPS, backend="cuda")
    # One row reaches the device probe (refused here for CPU tensors, for another reason).
    assert "M=" not in _cuda.can_run_head_select(y[:1], head)


def _head_select_args(C, **changes):
    # Non-null fake device addresses: every call below is refused before anything touches them.
    args = {
        "y": 256, "norm_weight": 256, "head": 256, "ranges": 0, "seeds": 0, "ids": 256,
        "workspace": 256, "workspace_size": 1 << 30, "n_rows": 4, "y_row_stride": FULL_DIM,
        "dim": FULL_DIM, "vocab": FULL_VOCAB, "head_row_stride": FULL_DIM, "n_ranges": 0,
        "ranges_row_stride": 0, "ranges_range_stride": 0, "dtype": C.DTYPE_BFLOAT16,
        "mode": C.HEAD_SELECT_GREEDY, "eps": 1e-6, "logit_divisor": 1.0, "stream": 0,
    }  # fmt: skip
    return {**args, **changes}


@pytest.mark.parametrize(
    ("changes", "status"),
    [
        ({"dtype": 3}, "unsupported"),  # int64
        ({"dim": 100}, "unsupported"),  # 200-byte rows: not whole 16-byte vectors
        ({"dim": 57352, "head_row_stride": 57352}, "unsupported"),  # a row above 112 KiB
        ({"head": 264}, "unsupported"),  # head not 16-byte aligned
        ({"head_row_stride": 4100}, "unsupported"),  # rows not 16-byte aligned
        ({"mode": 2}, "unsupported"),
        ({"ids": 0}, "invalid argument"),
        ({"ids": 260}, "invalid argument"),  # int64 output not 8-byte aligned
        ({"workspace": 0}, "invalid argument"),
        ({"workspace_size": 1000}, "invalid argument"),
        ({"n_rows": -1}, "invalid argument"),
        ({"vocab": 0}, "invalid argument"),
        ({"vocab": 2**31}, "invalid argument"),
        ({"y_row_stride": -1}, "invalid argument"),
        ({"eps": -1.0}, "invalid argument"),
        ({"eps": float("nan")}, "invalid argument"),
        ({"mode": 1}, "invalid argument"),  # sampling without seeds
        ({"mode": 1, "seeds": 256, "logit_divisor": 0.0}, "invalid argument"),
        ({"n_ranges": 2}, "invalid argument"),  # ranges missing
        ({"ranges": 256}, "invalid argument"),  # ranges without a count
        ({"n_ranges": -1, "ranges": 256}, "invalid argument"),
    ],
)
def test_head_select_binding_refuses_bad_arguments(changes, status):
    C = _head_select_extension()
    with pytest.raises(RuntimeError, match=rf"^kf_head_select: {status} \(.*\)$"):
        C.head_select(**_head_select_args(C, **changes))


def test_head_select_binding_no_rows_is_a_no_op():
    C = _head_select_extension()
    C.head_select(**_head_select_args(C, n_rows=0, y=0, ids=0, workspace=0, workspace_size=0))


def test_head_select_workspace_size():
    C = _head_select_extension()
    one = C.head_select_workspace_size(1, FULL_DIM, FULL_VOCAB, C.DTYPE_BFLOAT16)
    many = C.head_select_workspace_size(32, FULL_DIM, FULL_VOCAB, C.DTYPE_BFLOAT16)
    assert one >= FULL_DIM * 2 + 8 and many >= 32 * (FULL_DIM * 2 + 8) and many > one
    assert C.head_select_workspace_size(0, FULL_DIM, FULL_VOCAB, C.DTYPE_FLOAT32) == 0
    with pytest.raises(RuntimeError, match=r"^kf_head_select_workspace_size: unsupported \("):
        C.head_select_workspace_size(1, 100, FULL_VOCAB, C.DTYPE_BFLOAT16)
    with pytest.raises(RuntimeError, match=r"^kf_head_select_workspace_size: invalid argument \("):
        C.head_select_workspace_size(1, FULL_DIM, 0, C.DTYPE_BFLOAT16)


_KEY_HARNESS = r"""
#include <cstdio>
#include <cstring>

#include "head_select.cu"

// stdin: "seed S" | "uniform KEY ID" | "pack FLOAT_BITS ID" | "id KEY"; stdout: one number each.
int main() {
  using namespace kelix_fast;
  char op[16];
  while (std::scanf("%15s", op) == 1) {
    if (!std::strcmp(op, "seed")) {
      long long seed;
      if (std::scanf("%lld", &seed) != 1) return 1;
      std::printf("%u\n", row_key(seed));
    } else if (!std::strcmp(op, "uniform")) {
      unsigned key;
      long long id;
      if (std::scanf("%u %lld", &key, &id) != 2) return 1;
      const float u = gumbel_uniform(key, id);
      unsigned bits;
      std::memcpy(&bits, &u, sizeof(bits));
      std::printf("%u\n", bits);
    } else if (!std::strcmp(op, "pack")) {
      unsigned bits;
      long long id;
      if (std::scanf("%u %lld", &bits, &id) != 2) return 1;
      float score;
      std::memcpy(&score, &bits, sizeof(score));
      std::printf("%lld\n", pack_key(score, id));
    } else {
      long long key;
      if (std::scanf("%lld", &key) != 1) return 1;
      std::printf("%lld\n", static_cast<long long>(key_id(key)));
    }
  }
  return 0;
}
"""


def _run_key_harness(tmp_path: Path, lines: list[str]) -> list[int]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH")
    source = tmp_path / "key_harness.cu"
    source.write_text(_KEY_HARNESS)
    binary = tmp_path / "key_harness"
    command = [
        nvcc, "-std=c++17", "-gencode=arch=compute_90a,code=compute_90a",
        "-I", str(REPO / "csrc"), "-I", str(REPO / "csrc" / "include"),
        str(source), str(REPO / "csrc" / "status.cu"), "-o", str(binary),
    ]  # fmt: skip
    built = subprocess.run(command, capture_output=True, text=True, check=False)
    assert built.returncode == 0, f"{' '.join(command)}\n{built.stdout}{built.stderr}"
    ran = subprocess.run(
        [str(binary)], input="\n".join(lines), capture_output=True, text=True, check=True
    )
    return [int(word) for word in ran.stdout.split()]


def _unmix32(x: int) -> int:
    """Inverse of lowbias32 (``_mix32``): xorshifts undone, multipliers inverted modulo 2^32."""
    mask = 2**32 - 1
    x ^= (x >> 15) ^ (x >> 30)
    x = x * pow(0x735A2D97, -1, 2**32) & mask
    x ^= (x >> 15) ^ (x >> 30)
    x = x * pow(0x21F0AAAD, -1, 2**32) & mask
    return x ^ (x >> 16)


def test_head_select_key_arithmetic_matches_triton(tmp_path):
    """csrc/head_select.cu's host-callable selection helpers, run on the CPU, against the Triton
    kernel's formulas (its torch twins, and the kernel's float32 uniform and key packing restated in
    torch): row keys, Gumbel uniforms (including the top hash value, which must stay below 1), packed
    keys (-0.0 as 0.0, -inf, NaN, id order) and decoded ids, bit for bit."""
    from kelix_fast.triton_kernels import head_select as triton_head_select

    gen = torch.Generator().manual_seed(0)
    seeds = torch.cat(
        [
            torch.tensor([0, 1, -1, 2**63 - 1, -(2**63), 2**32, -(2**32) + 5]),
            torch.randint(-(2**62), 2**62, (64,), generator=gen),
        ]
    )
    keys = torch.cat([torch.tensor([0, 2**32 - 1]), torch.randint(0, 2**32, (62,), generator=gen)])
    ids = torch.cat(
        [torch.tensor([0, 1, 217471, 2**31 - 1]), torch.randint(0, 2**31 - 1, (60,), generator=gen)]
    )
    # The last pair hashes to the top value 2^32 - 1: its key is unmix32(2^32 - 1) ^ mix32(id).
    mixed_id = int(triton_head_select._mix32_torch(ids[-1:])[0])
    keys[-1] = _unmix32(2**32 - 1) ^ mixed_id
    scores = torch.tensor(
        [0.0, -0.0, 1.0, -1.0, float("inf"), float("-inf"), float("nan"), 1e-45, -1e-45, 3.5e38]
        + torch.randn(54, generator=gen).tolist(),
        dtype=torch.float32,
    )
    score_bits = scores.view(torch.int32).to(torch.int64) & 0xFFFFFFFF

    lines = [f"seed {int(s)}" for s in seeds]
    lines += [f"uniform {int(k)} {int(i)}" for k, i in zip(keys, ids, strict=True)]
    lines += [f"pack {int(b)} {int(i)}" for b, i in zip(score_bits, ids, strict=True)]
    out = torch.tensor(_run_key_harness(tmp_path, lines))
    n_seeds, n_pairs = len(seeds), len(ids)
    assert out.numel() == n_seeds + 2 * n_pairs
    got_row_keys = out[:n_seeds]
    got_uniform_bits = out[n_seeds : n_seeds + n_pairs]
    got_keys = out[n_seeds + n_pairs :]

    assert torch.equal(got_row_keys, triton_head_select.row_keys(seeds))

    mixed = triton_head_select._mix32_torch(keys ^ triton_head_select._mix32_torch(ids))
    uniform = ((mixed >> 9).float() + 0.5) * (1.0 / 8388608.0)  # the Triton kernel's float32 math
    want_uniform_bits = uniform.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(got_uniform_bits, want_uniform_bits)
    assert bool((uniform > 0).all() & (uniform < 1).all())  # the top hash value included

    bits = torch.where(scores == 0, torch.zeros_like(scores), scores).view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    want_keys = (ordered.to(torch.int64) << 32) | (2**31 - 1 - ids)
    assert torch.equal(got_keys, want_keys)
    assert torch.equal(triton_head_select.decode_ids(got_keys), ids)
    assert got_keys[0] >> 32 == got_keys[1] >> 32 == 0  # -0.0 packs as 0.0
    # One integer max is argmax with the first index on ties: key order = (score desc, id asc).
    real = ~scores.isnan()
    s, i, k = scores[real], ids[real], got_keys[real]
    first = (s[:, None] > s[None, :]) | ((s[:, None] == s[None, :]) & (i[:, None] < i[None, :]))
    assert torch.equal(k[:, None] > k[None, :], first)

    decoded = _run_key_harness(tmp_path, [f"id {int(k)}" for k in got_keys])
    assert decoded == ids.tolist()


# GPU: the kernel against the reference and the Triton backend.


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize(("vocab", "dim"), [(1000, 64), (333, 72), (5003, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_head_select_cuda_greedy_exact_on_integer_logits(rows, vocab, dim, dtype):
    """Integer logits, hence many exact ties: the first index must win, as in the reference. V is not
    a multiple of the 32-row tile; 33 rows make three row chunks; y is a strided view."""
    _head_select_extension()
    y, weight, head = _integer_head_inputs(rows, vocab, dim, dtype, seed=rows + vocab)
    want = _cpu_reference(y, weight, head, eps=EXACT_EPS)
    wide = torch.full((rows, dim + 8), float("nan"), dtype=dtype, device="cuda")
    wide[:, :dim] = y
    ids = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
    _cuda.head_select(wide[:, :dim], weight, head, None, None, ids, 0.0, 1.0, 1, 1.0)
    assert torch.equal(ids, want)
    assert torch.equal(_cuda_select(y, weight, head, eps=EXACT_EPS), want)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "copies",
    [(37, 38, 62, 300, 999), (999,), (0, 1, 998), (31, 32), (96, 95)],
    ids=["group-warp-slice-tail", "tail", "first", "slice-edge", "reversed"],
)
@pytest.mark.parametrize("zeros", [False, True], ids=["max", "zero"])
@pytest.mark.parametrize("rows", [1, 17])
def test_head_select_cuda_ties_take_the_first_index(copies, zeros, rows):
    """Identical winning rows placed in the same warp group, another warp, another vocabulary slice
    (32 rows each at V = 1000) and the tail: the lowest id wins. ``zeros``: the winners are all-zero
    rows scoring 0 (products of -1 and 0 included) and every other logit is negative."""
    _head_select_extension()
    vocab, dim = 1000, 16
    y, weight, head = _integer_head_inputs(1, vocab, dim, torch.float32, seed=5)
    sign = torch.sign(y[0])
    if zeros:
        head = -sign * head.abs().clamp_min(1)  # every product negative: logits <= -16
        head[list(copies)] = 0.0
    else:
        head[list(copies)] = 2 * sign  # the unique largest logit, 2 * D
    y = y.expand(rows, -1)
    want = _cpu_reference(y, weight, head, eps=EXACT_EPS)
    assert want.tolist() == [min(copies)] * rows
    assert torch.equal(_cuda_select(y, weight, head, eps=EXACT_EPS), want)


def _ranges(rows, vocab, q_eos, seed, device="cuda"):
    """[rows, 2, 2]: a random slice plus [q_eos, q_eos + 1) per row; the last row's slice is the
    vocabulary's tail; row 0 is finished (q_eos and an empty range)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randint(0, vocab - 1, (rows,), generator=gen)
    high = torch.minimum(low + torch.randint(1, 700, (rows,), generator=gen), torch.tensor(vocab))
    allowed = torch.stack(
        [torch.stack([low, high], -1), torch.tensor([q_eos, q_eos + 1]).expand(rows, 2)], 1
    )
    allowed[-1, 0] = torch.tensor([vocab - 3, vocab])
    allowed[0] = torch.tensor([[q_eos, q_eos + 1], [9, 9]])
    return allowed.to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 5, 33])
@pytest.mark.parametrize("broadcast", [False, True])
def test_head_select_cuda_greedy_ranges(rows, broadcast):
    _head_select_extension()
    vocab, dim, q_eos = 5003, 64, 4001
    y, weight, head = _integer_head_inputs(rows, vocab, dim, torch.bfloat16, seed=rows)
    allowed = _ranges(rows, vocab, q_eos, seed=rows)
    if broadcast:
        allowed = allowed[-1:].expand(rows, -1, -1)  # row stride 0
    want = _cpu_reference(y, weight, head, eps=EXACT_EPS, allowed=allowed)
    got = _cuda_select(y, weight, head, eps=EXACT_EPS, allowed=allowed)
    assert torch.equal(got, want)
    if not broadcast:
        assert got[0].item() == q_eos


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rows", "vocab", "dim"), [(1, 50_000, 512), (7, 5003, 4096), (33, 1000, 72), (32, 333, 64)]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_head_select_cuda_greedy_random_inputs(rows, vocab, dim, dtype):
    """Random inputs (a real RMSNorm): the chosen id's logit is the maximum up to what the rounding
    of the normed rows (the kernel's 1/sqrt_rn vs torch's rsqrt, summation order) can move."""
    _head_select_extension()
    y, weight, head = _random_head_inputs(rows, vocab, dim, dtype, seed=rows + dim)
    got = _cuda_select(y, weight, head, eps=1e-6)
    normed = rms_norm_reference(y, weight, 1e-6).double()
    logits = normed @ head.double().T
    best = logits.max(-1).values
    chosen = logits.gather(-1, got[:, None])[:, 0]
    assert ((best - chosen) <= 0.05 + 1e-5 * best.abs()).all(), (best - chosen).max().item()


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16, 32])
def test_head_select_cuda_production_head(rows):
    """The 217,472 x 4,096 bf16 head (hundreds of tiles per vocabulary slice): y next to random head
    rows (benchmarks/cases/head_select.py's construction), so greedy must return the picked rows, and
    so must full-row sampling at temperature 0.7, except in rows where some id's uniform rounds to 1
    (probability ~1.3% per row at this V; the Triton kernel's formula, shared on purpose): that id
    scores +inf and is drawn."""
    _head_select_extension()
    gen = torch.Generator(device="cuda").manual_seed(0)
    head = (torch.randn(FULL_VOCAB, FULL_DIM, generator=gen, device="cuda") * 0.02).bfloat16()
    weight = (1 + 0.1 * torch.rand(FULL_DIM, generator=gen, device="cuda")).bfloat16()
    picks = torch.randint(0, FULL_VOCAB, (rows,), generator=gen, device="cuda")
    noise = torch.randn(rows, FULL_DIM, generator=gen, device="cuda")
    y = (head[picks].float() / weight.float() + 0.001 * noise).bfloat16()
    seeds = torch.randint(-(2**62), 2**62, (rows,), generator=gen, device="cuda")
    assert torch.equal(_cuda_select(y, weight, head, eps=1e-6), picks)
    sampled = _cuda_select(y, weight, head, eps=1e-6, temperature=0.7, top_k=0, seeds=seeds)
    assert torch.equal(sampled, picks)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("restricted", [False, True])
def test_head_select_cuda_sampler_draws_softmax(temperature, restricted):
    """20,000 rows of one y with fixed seeds (deterministic): Pearson's test against the softmax of the
    (temperature-scaled) logits, restricted to the allowed ids when ranges are given."""
    _head_select_extension()
    draws, vocab = 20_000, 17
    y, weight, head = _random_head_inputs(1, vocab, 16, torch.float32, seed=7)
    head = head * 0.3  # logits of order 1: a spread of probabilities
    allowed = None
    if restricted:
        allowed = torch.tensor([[[2, 9], [12, 14]]], device="cuda").expand(draws, -1, -1)
    logits = rms_norm_reference(y, weight, 1e-6).double() @ head.double().T
    if restricted:
        inside = torch.zeros(vocab, dtype=torch.bool, device="cuda")
        inside[2:9] = inside[12:14] = True
        logits = logits.masked_fill(~inside, float("-inf"))
    probs = torch.softmax(logits / (temperature + 1e-5) if temperature > 0 else logits, -1)[0]
    seeds = torch.arange(draws, dtype=torch.int64, device="cuda") * 1_000_003 - 2**40
    ids = _cuda_select(
        y.expand(draws, -1), weight, head, eps=1e-6, temperature=temperature, top_k=0,
        seeds=seeds, allowed=allowed,
    )  # fmt: skip
    counts = torch.bincount(ids.cpu(), minlength=vocab).double()
    assert chi_square_p_value(counts, probs.cpu()) > 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
@pytest.mark.parametrize("with_ranges", [False, True])
def test_head_select_cuda_draws_equal_triton(dtype, temperature, with_ranges):
    """Same hash, same uniforms: on exact (integer / 8) logits, cuda and triton draw the float64
    Gumbel-max winner except where the runner-up is within float32 rounding of it."""
    _head_select_extension()
    rows, vocab, dim = 32, 5003, 64
    for seed in range(4):
        y, weight, head = _integer_head_inputs(rows, vocab, dim, dtype, seed=seed, scale=0.125)
        gen = torch.Generator().manual_seed(seed)
        seeds = torch.randint(-(2**62), 2**62, (rows,), generator=gen).cuda()
        allowed = _ranges(rows, vocab, 4001, seed=seed) if with_ranges else None
        expected, gap = _gumbel_expected(
            _exact_logits(y, weight, head, allowed), seeds, temperature
        )
        settled = (gap > 1e-4).cuda()
        assert settled.float().mean().item() >= 0.9  # the comparison below tests something
        draws = {
            "cuda": _cuda_select(
                y, weight, head, eps=EXACT_EPS, temperature=temperature, top_k=0, seeds=seeds,
                allowed=allowed,
            ),
            "triton": ops.head_select(
                y, weight, head, eps=EXACT_EPS, temperature=temperature, top_k=0, seeds=seeds,
                allowed=allowed, backend="triton",
            ),
        }  # fmt: skip
        for backend, got in draws.items():
            assert torch.equal(got[settled], expected.cuda()[settled]), backend


@pytest.mark.gpu
def test_head_select_cuda_captures_in_a_cuda_graph():
    """No host synchronisation: the op (inside ops.trusted_values) records into a CUDA graph, and
    replays follow new inputs copied into the captured buffers."""
    _head_select_extension()
    rows, vocab, dim = 1, 1000, 64  # the op offers the CUDA kernel for one row
    y, weight, head = _integer_head_inputs(rows, vocab, dim, torch.bfloat16, seed=1)
    allowed = _ranges(2, vocab, 501, seed=1)[1:]  # a real range (row 0 of _ranges is finished)
    seeds = torch.arange(rows, dtype=torch.int64, device="cuda")
    static_y = y.clone()
    with ops.trusted_values():
        for _ in range(2):  # warm-up: allocator and attribute calls outside the capture
            ops.head_select(static_y, weight, head, eps=EXACT_EPS, allowed=allowed, backend="cuda")
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            greedy = ops.head_select(
                static_y, weight, head, eps=EXACT_EPS, allowed=allowed, backend="cuda"
            )
            sampled = ops.head_select(
                static_y, weight, head, eps=EXACT_EPS, top_k=0, seeds=seeds, backend="cuda"
            )
    other, _, _ = _integer_head_inputs(rows, vocab, dim, torch.bfloat16, seed=2)
    static_y.copy_(other)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(greedy, _cpu_reference(other, weight, head, eps=EXACT_EPS, allowed=allowed))
    eager = ops.head_select(
        other, weight, head, eps=EXACT_EPS, top_k=0, seeds=seeds, backend="cuda"
    )
    assert torch.equal(sampled, eager)


@pytest.mark.gpu
def test_head_select_cuda_probe_and_auto_choice():
    """auto: cuda for one row and 16-byte aligned head rows, triton otherwise; an explicit
    cuda request on an unaligned head says why."""
    _head_select_extension()
    y, weight, head = _integer_head_inputs(33, 100, 64, torch.bfloat16, seed=3)
    assert ops.resolve_backend("head_select", "auto", y[:1], head) == "cuda"
    assert ops.resolve_backend("head_select", "auto", y[:2], head) == "triton"
    unaligned = torch.zeros(100, 65, dtype=torch.bfloat16, device="cuda")[:, 1:]
    unaligned.copy_(head)
    assert "16-byte aligned" in _cuda.can_run_head_select(y[:1], unaligned)
    assert ops.resolve_backend("head_select", "auto", y[:1], unaligned) == "triton"
    with pytest.raises(BackendUnavailableError, match="16-byte aligned head rows"):
        ops.head_select(y[:1], weight, unaligned, eps=EXACT_EPS, backend="cuda")
    odd = torch.zeros(100, 60, dtype=torch.bfloat16, device="cuda")  # 120-byte rows
    assert "multiple of 16 bytes" in _cuda.can_run_head_select(y[:, :60], odd)
