"""``ops.head_select``: hand-worked cases, ties, ranges, the sampler's distribution, awkward sizes, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kelix_fast import ops, triton_kernels
from kelix_fast.ops import BackendUnavailableError
from kelix_fast.ops.selection import filter_logits

EPS = 1e-6
# eps must be > 0; this one leaves every float32 mean of squares of integer inputs (>= 1/D) unchanged,
# so the normalization, and with it the logits of integer inputs, stay exact.
EXACT_EPS = 1e-30
BACKENDS = ["torch", "triton"]


def make_head_inputs(rows: int, vocab: int, dim: int, *, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(rows, dim, generator=gen) * 2
    weight = 1 + 0.1 * torch.randn(dim, generator=gen)
    head = torch.randn(vocab, dim, generator=gen)
    return y.to(dtype), weight.to(dtype), head.to(dtype)


def official_logits(y, weight, head):
    """rms_norm (models/layers.py) then the head in float32: what greedy must take the argmax of."""
    yf = y.float()
    normed = (yf * torch.rsqrt(yf.square().mean(-1, keepdim=True) + EPS)).to(y.dtype) * weight
    return F.linear(normed.float(), head.float())


def tied_inputs():
    """y entries +-1 and eps 0 make the RMSNorm exact (rms 1), and small-integer head rows make every
    logit an exact integer in any summation order: ties are real ties on every backend."""
    gen = torch.Generator().manual_seed(1)
    y = torch.randint(0, 2, (3, 16), generator=gen).float() * 2 - 1
    head = torch.randint(-2, 3, (600, 16), generator=gen).float()
    logits = y @ head.T
    best = logits.argmax(-1)
    assert bool((best[:2] < torch.tensor([310, 599])).all()) and best[2] > 5
    head[[310, 599, 5]] = head[best]  # copies in other tiles (the interpreter's tile is 256)
    return y, torch.ones(16), head, best


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_ties_take_the_first_index(backend):
    y, weight, head, best = tied_inputs()
    want = (y @ head.T).argmax(-1)  # torch.argmax keeps the first index of equal maxima
    got = ops.head_select(y, weight, head, eps=EXACT_EPS, backend=backend)
    assert torch.equal(got, want)
    assert got[2] == 5 and bool(
        (got[:2] == best[:2]).all()
    )  # an earlier copy wins, later ones never


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top_k", [1, 0, 3])
def test_ranges_exclude_every_other_id(backend, top_k):
    y, weight, head = make_head_inputs(4, 333, 16, seed=2)
    allowed = torch.tensor([[[7, 8], [0, 0]], [[332, 333], [9, 9]]]).repeat(2, 1, 1)
    seeds = torch.arange(4, dtype=torch.int64)
    got = ops.head_select(
        y, weight, head, eps=EPS, top_k=top_k, top_p=1.0 if top_k == 0 else 0.5, seeds=seeds,
        allowed=allowed,
        backend=backend,
    )  # fmt: skip
    assert got.tolist() == [7, 332, 7, 332]


@pytest.mark.parametrize("rows, vocab, dim", [(1, 1000, 16), (33, 333, 48), (7, 1000, 48)])
def test_triton_greedy_is_the_float32_argmax(rows, vocab, dim):
    y, weight, head = make_head_inputs(rows, vocab, dim, seed=rows)
    wide = torch.cat([y, torch.full_like(y, float("nan"))], dim=1)[:, :dim]  # row stride 2 x dim
    got = ops.head_select(wide, weight, head, eps=EPS, backend="triton")
    assert torch.equal(got, official_logits(y, weight, head).argmax(-1))
    assert torch.equal(got, ops.head_select(y, weight, head, eps=EPS, backend="torch"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_greedy_low_precision_with_margins(dtype):
    # y close to a head row: the right id wins by a margin no rounding order can flip.
    y, weight, head = make_head_inputs(33, 1000, 48, seed=4)
    picks = torch.randint(0, 1000, (33,), generator=torch.Generator().manual_seed(5))
    y = (head[picks] + 0.05 * y).to(dtype)
    weight, head = torch.ones(48, dtype=dtype), head.to(dtype)
    got = ops.head_select(y, weight, head, eps=EPS, backend="triton")
    assert torch.equal(got, picks)
    assert torch.equal(got, ops.head_select(y, weight, head, eps=EPS, backend="torch"))


def test_launcher_fills_poisoned_ids():
    kernels = triton_kernels.interpreted("head_select")  # CPU tensors below

    y, weight, head = make_head_inputs(33, 333, 16, seed=6)
    seeds = torch.arange(33, dtype=torch.int64)
    for top_k, top_p in ((1, 1.0), (0, 1.0), (7, 0.9)):
        ids = torch.full((33,), -1, dtype=torch.int64)
        kernels.head_select(
            y, weight, head, None, seeds, ids, eps=EPS, temperature=0.5, top_k=top_k, top_p=top_p
        )
        assert bool(((ids >= 0) & (ids < 333)).all())
    ids = torch.full((33,), -1, dtype=torch.int64)
    kernels.head_select(y, weight, head, None, None, ids, eps=EPS, temperature=1, top_k=1, top_p=1)
    assert torch.equal(ids, official_logits(y, weight, head).argmax(-1))


def expected_probs(y, weight, head, temperature, top_k, top_p):
    logits = official_logits(y, weight, head)
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    return torch.softmax(filtered, -1)[0].double()


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test over the support; ids of probability 0 must never be drawn."""
    support = probs > 0
    assert int(counts[~support].sum()) == 0
    expected = probs[support] * counts.sum()
    statistic = ((counts[support] - expected).square() / expected).sum()
    df = int(support.sum()) - 1
    if df == 0:
        return 1.0
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), statistic / 2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(1.0, 0, 1.0), (0.7, 5, 0.8), (1.5, 40, 0.9), (0.0, 0, 1.0), (0.9, 4, 1e-6)],
)
def test_sampler_draws_the_filtered_distribution(backend, temperature, top_k, top_p):
    """4000 rows of one y with 4000 fixed seeds: independent draws; the seed set is fixed, so the test
    is deterministic (p-value threshold 1e-3)."""
    draws = 4000
    y, weight, head = make_head_inputs(1, 17, 16, seed=7)
    y, head = y * 0.3, head * 0.3  # logits of order 1: a spread of probabilities
    probs = expected_probs(y, weight, head, temperature, top_k, top_p)
    seeds = torch.arange(draws, dtype=torch.int64) * 1_000_003 - 2**40
    ids = ops.head_select(
        y.expand(draws, -1), weight, head, eps=EPS, temperature=temperature, top_k=top_k,
        top_p=top_p, seeds=seeds, backend=backend,
    )  # fmt: skip
    counts = torch.bincount(ids, minlength=17).double()
    assert chi_square_p_value(counts, probs) > 1e-3
    again = ops.head_select(
        y.expand(5, -1), weight, head, eps=EPS, temperature=temperature, top_k=top_k,
        top_p=top_p, seeds=seeds[:5], backend=backend,
    )  # fmt: skip
    assert torch.equal(again, ids[:5])  # a row's draw depends only on its seed and logits


def test_triton_refuses_more_than_64_candidates():
    y, weight, head = make_head_inputs(2, 333, 16)
    seeds = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(BackendUnavailableError, match="at most 64 candidates per row"):
        ops.head_select(y, weight, head, eps=EPS, top_k=100, seeds=seeds, backend="triton")
    with pytest.raises(BackendUnavailableError, match="at most 64 candidates per row"):
        ops.head_select(y, weight, head, eps=EPS, top_k=0, top_p=0.9, seeds=seeds, backend="triton")
    # top_k >= V with top_p = 1 filters nothing: the full-row Gumbel-max path takes it.
    ops.head_select(y, weight, head, eps=EPS, top_k=400, seeds=seeds, backend="triton")
    assert ops.resolve_backend("head_select", "auto", y, head) == "torch"


def test_non_finite_heads_and_overflowing_logits_are_refused():
    """A NaN in the head is refused before any kernel (a value check); finite inputs whose logits
    overflow float32 leave no distribution to sample: the reference says so (the fuzz test found
    torch.multinomial failing on both)."""
    y, weight, head = make_head_inputs(2, 12, 6)
    seeds = torch.tensor([0, 1])
    bad = head.clone()
    bad[3, 1] = math.nan
    for backend in ("torch", "triton"):
        with pytest.raises(
            ValueError, match="head_select: head must hold only finite values, got 1 NaN"
        ):
            ops.head_select(y, weight, bad, eps=EPS, backend=backend)
    huge = head.clone()
    huge[3] = 3e38
    with pytest.raises(ValueError, match=r"head_select: the logits of y and head overflow float32"):
        ops.head_select(y, weight, huge, eps=EPS, top_k=0, seeds=seeds, backend="torch")


def test_empty_input_gives_empty_ids():
    y, weight, head = make_head_inputs(0, 10, 16)
    ids = ops.head_select(y, weight, head, eps=EPS)
    assert ids.shape == (0,) and ids.dtype == torch.int64


@pytest.mark.parametrize(
    "change, match",
    [
        ({"y": torch.zeros(3, 15)}, r"head must have shape \[\*, 15\]"),
        ({"y": torch.zeros(3, 16, dtype=torch.int64)}, "y must have dtype float32"),
        ({"head": torch.zeros(10, 16, dtype=torch.bfloat16)}, "head must have the dtype of y"),
        ({"norm_weight": torch.ones(15)}, r"norm_weight must have shape \[16\]"),
        ({"y": torch.zeros(16, 3).T}, r"\[3, 16\]|contiguous last dim"),
        ({"head": torch.zeros(16, 10).T}, "head must have a contiguous last dim"),
        ({"y": torch.zeros(3, 16, device="meta")}, "must be on the device of y"),
        (
            {"y": torch.zeros(3, 16).index_fill_(1, torch.tensor([2]), math.nan)},
            "y must hold only finite values, got 3 NaN",
        ),
        ({"temperature": -1.0}, "temperature must be a finite number >= 0, got -1.0"),
        ({"temperature": math.nan}, "temperature must be a finite number"),
        ({"top_k": -1}, "top_k must be an int in \\[0, 2\\^63 - 1\\], got -1"),
        ({"top_p": 0.0}, r"top_p must lie in \(0, 1\]"),
        ({"top_k": 5, "seeds": None}, "seeds must be given when sampling"),
        ({"seeds": torch.zeros(2, dtype=torch.int64)}, r"seeds must have shape \[3\]"),
        ({"seeds": torch.zeros(3, dtype=torch.int32)}, "seeds must have dtype int64"),
        (
            {"allowed": torch.zeros(3, 2, dtype=torch.int64)},
            r"allowed must have shape \[3, \*, 2\]",
        ),
        ({"allowed": torch.tensor([[[0, 11]]] * 3)}, r"allowed must lie in \[0, 11\), got 11"),
        (
            {"allowed": torch.tensor([[[4, 2]]] * 3)},
            r"low <= high, got \[4, 2\) at allowed\[0, 0\]",
        ),
        ({"allowed": torch.tensor([[[4, 4]]] * 3)}, "at least one id per row, row 0 has none"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    y, weight, head = make_head_inputs(3, 10, 16)
    args = {"y": y, "norm_weight": weight, "head": head, "seeds": torch.zeros(3, dtype=torch.int64)}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.head_select(**args, eps=EPS)


def test_wrong_python_types():
    y, weight, head = make_head_inputs(3, 10, 16)
    with pytest.raises(TypeError, match="top_k must be an int in \\[0, 2\\^63 - 1\\], got float"):
        ops.head_select(y, weight, head, eps=EPS, top_k=1.0)
    with pytest.raises(TypeError, match="top_p must be a finite number, got str"):
        ops.head_select(y, weight, head, eps=EPS, top_p="1")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 33, 130])
def test_compiled_greedy_on_gpu(rows):
    y, weight, head = make_head_inputs(rows, 50_000, 512, seed=rows)
    y, weight, head = y.cuda(), weight.cuda(), head.cuda()
    got = ops.head_select(y, weight, head, eps=EPS, backend="triton")
    assert torch.equal(got, official_logits(y, weight, head).argmax(-1))
    picks = torch.randint(0, 50_000, (rows,), device="cuda")
    y16 = (head[picks] + 0.05 * y).bfloat16()
    got = ops.head_select(y16, weight.bfloat16(), head.bfloat16(), eps=EPS, backend="triton")
    assert torch.equal(got, picks)


@pytest.mark.gpu
@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 0.8)])
def test_compiled_sampler_on_gpu(temperature, top_k, top_p):
    draws = 20_000
    y, weight, head = (t.cuda() * 0.3 for t in make_head_inputs(1, 17, 16, seed=7))
    weight = weight / 0.3
    probs = expected_probs(y, weight, head, temperature, top_k, top_p).cpu()
    seeds = torch.arange(draws, dtype=torch.int64, device="cuda")
    ids = ops.head_select(
        y.expand(draws, -1), weight, head, eps=EPS, temperature=temperature, top_k=top_k,
        top_p=top_p, seeds=seeds, backend="triton",
    )  # fmt: skip
    counts = torch.bincount(ids.cpu(), minlength=17).double()
    assert chi_square_p_value(counts, probs) > 1e-3
