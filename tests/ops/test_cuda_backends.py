"""The ``"cuda"`` backend (``kelix_fast.ops._cuda`` -> ``kelix_fast._C`` -> the C API) against the references.

GPU tests call the adapters directly (with the ops' reference signatures) and through
``ops.*(backend="cuda")``. The CPU tests check the probes and that the C API's argument checks (which run before any CUDA call) surface as
``RuntimeError`` naming the ``kf_`` function.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kelix_fast import ops
from kelix_fast.ops import _cuda
from kelix_fast.ops import block_embed as block_embed_module
from kelix_fast.ops import codebook_argmin as codebook_argmin_module

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
    tensors = [t.cuda() for t in (z, weight, bias, codebooks)]
    z, weight, bias, codebooks = tensors
    return z.to(dtype), weight, bias, codebooks.to(dtype)


def _run_cuda_argmin(z, weight, bias, codebooks, sqnorms, mode, offset=0):
    ids = torch.full((z.shape[0], codebooks.shape[0]), -1, dtype=torch.int64, device=z.device)
    _cuda.codebook_argmin(z, weight, bias, codebooks, sqnorms, ids, offset, mode, 1e-5)
    return ids


def _run_reference_argmin(z, weight, bias, codebooks, sqnorms, mode, offset=0):
    ids = torch.empty((z.shape[0], codebooks.shape[0]), dtype=torch.int64, device=z.device)
    codebook_argmin_module._reference(z, weight, bias, codebooks, sqnorms, ids, offset, mode, 1e-5)
    return ids


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
        out.append(codebook_argmin_module._official_sqdist(u, codebooks[g]).float())
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


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["exact", "reference"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_codebook_argmin_exact_ties_take_the_first_index(mode, dtype):
    """Duplicated nearest codes, one in a later tile and one in the tail tile: the first index wins."""
    n, codes = 129, 1000
    z, weight, bias, codebooks = _codebook_inputs(n, 2, codes, 128, dtype, seed=3)
    nearest = _run_reference_argmin(z, weight, bias, codebooks, None, "exact")
    nearest = nearest - codes * torch.arange(2, device="cuda")
    tied = codebooks.clone()
    for g in range(2):
        tied[g, codes - 1] = tied[g, nearest[0, g]]  # tail tile
        tied[g, 500] = tied[g, nearest[-1, g]]
    got = _run_cuda_argmin(z, weight, bias, tied, None, mode)
    local = got - codes * torch.arange(2, device="cuda")
    for g in range(2):
        # The later duplicate is never chosen over its identical earlier copy.
        assert local[0, g].item() != codes - 1 or nearest[0, g].item() == codes - 1
        assert local[-1, g].item() != 500 or nearest[-1, g].item() == 500
    if mode == "exact":
        want = _run_reference_argmin(z, weight, bias, tied, None, mode)
        assert got[0].tolist() == want[0].tolist() and got[-1].tolist() == want[-1].tolist()


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
    want = torch.empty_like(got)
    _cuda.block_embed(ids, table, got, Q_EOS, TEXT_VOCAB)
    block_embed_module._reference(ids, table, want, Q_EOS, TEXT_VOCAB)
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_block_embed_unaligned_table_uses_element_loads():
    vocab, dim = TEXT_VOCAB + 50, 64
    base = torch.randn(vocab, dim + 1, device="cuda").to(torch.bfloat16)
    table = base[:, 1:]  # rows start 2 bytes past a 16-byte boundary
    ids = _block_ids(2, 5, 9, vocab, seed=0)
    got = torch.empty(2, 5, dim, dtype=torch.bfloat16, device="cuda")
    want = torch.empty_like(got)
    _cuda.block_embed(ids, table, got, Q_EOS, TEXT_VOCAB)
    block_embed_module._reference(ids, table, want, Q_EOS, TEXT_VOCAB)
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_ops_block_embed_cuda_backend():
    vocab = TEXT_VOCAB + 100
    table = torch.randn(vocab, 256, device="cuda", dtype=torch.bfloat16)
    ids = _block_ids(2, 9, 9, vocab, seed=1)
    got = ops.block_embed(ids, table, q_eos=Q_EOS, text_vocab=TEXT_VOCAB, backend="cuda")
    want = ops.block_embed(ids, table, q_eos=Q_EOS, text_vocab=TEXT_VOCAB, backend="torch")
    assert torch.equal(got, want)
