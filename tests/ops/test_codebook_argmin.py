"""``ops.codebook_argmin``: hand-worked cases, ties, the official cdist arithmetic, awkward sizes, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kelix_fast import ops, triton_kernels
from kelix_fast.ops import BackendUnavailableError


def make_codebook_inputs(n: int, *, groups: int = 8, codes: int = 67, dim: int = 16, seed: int = 0):
    """Random queries/codebooks of awkward sizes (K not a multiple of any tile)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, groups * dim, generator=gen) * 3 + 1
    weight = 1 + 0.1 * torch.randn(groups, dim, generator=gen)
    bias = 0.1 * torch.randn(groups, dim, generator=gen)
    codebooks = torch.randn(groups, codes, dim, generator=gen)
    return z, weight, bias, codebooks


def brute_force(z, weight, bias, codebooks, offset):
    """float64 |u - c|^2 argmin: the definition of the nearest neighbour."""
    groups, codes, dim = codebooks.shape
    u = torch.stack(
        [
            F.layer_norm(z[:, g * dim : (g + 1) * dim], (dim,), weight[g], bias[g], 1e-5)
            for g in range(groups)
        ],
        1,
    )
    dist = (u.double()[:, :, None] - codebooks.double()[None]).square().sum(-1)  # [n, G, K]
    return dist.argmin(-1) + offset + codes * torch.arange(groups)


def test_hand_worked_case():
    # G=2 groups of d=2; the LayerNorm (unit weight, zero bias) maps any (a, b) with a > b to (1, -1).
    z = torch.tensor([[3.0, 1.0, -2.0, 5.0]])
    codebooks = torch.tensor(
        [[[0.0, 0.0], [1.0, -1.0], [-1.0, 1.0]], [[1.0, -1.0], [0.0, 0.0], [-1.0, 1.0]]]
    )
    ones, zeros = torch.ones(2, 2), torch.zeros(2, 2)
    for mode in ("reference", "exact"):
        ids = ops.codebook_argmin(z, ones, zeros, codebooks, vocab_offset=100, mode=mode)
        assert ids.tolist() == [
            [100 + 1, 100 + 3 + 2]
        ]  # group 0 -> code 1; group 1 -> code 2 (offset + K*g)


@pytest.mark.parametrize("n", [1, 7, 130])
def test_exact_ties_take_the_first_index(n):
    """Every nearest code gets a later exact duplicate (the tail column of a 67-wide GEMM included)."""
    z, weight, bias, codebooks = make_codebook_inputs(n, groups=2, codes=67, dim=16, seed=n)
    nearest = brute_force(z, weight, bias, codebooks, 0) - 67 * torch.arange(2)
    tied = codebooks.clone()
    for g in range(2):
        tied[g, 66] = tied[g, nearest[0, g]]
        tied[g, 33] = tied[g, nearest[-1, g]]
    ids = ops.codebook_argmin(z, weight, bias, tied, vocab_offset=0, mode="exact")
    want = brute_force(
        z, weight, bias, tied, 0
    )  # float64 argmin keeps the first of equal distances
    assert torch.equal(ids, want)


@pytest.mark.parametrize("n", [1, 7, 130])
@pytest.mark.parametrize("mode", ["reference", "exact"])
def test_float32_modes_find_the_nearest_code(n, mode):
    z, weight, bias, codebooks = make_codebook_inputs(n, seed=n)
    want = brute_force(z, weight, bias, codebooks, 151936)
    ids = ops.codebook_argmin(
        z, weight, bias, codebooks, vocab_offset=151936, mode=mode, backend="torch"
    )
    assert torch.equal(ids, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_mode_is_the_official_cdist_arithmetic(dtype):
    """``mode="reference"`` equals ``cdist(u, C).pow(2).argmin`` (the official call) in the model dtype."""
    z, weight, bias, codebooks = make_codebook_inputs(130, groups=2, codes=1000, dim=128, seed=5)
    z, weight, bias, codebooks = (t.to(dtype) for t in (z, weight, bias, codebooks))
    ids = ops.codebook_argmin(z, weight, bias, codebooks, vocab_offset=0, mode="reference")
    for g in range(2):
        u = F.layer_norm(z[:, g * 128 : (g + 1) * 128], (128,), weight[g], bias[g], 1e-5)
        official = torch.cdist(u, codebooks[g]).pow(2).argmin(-1) + 1000 * g
        assert torch.equal(ids[:, g], official)


def test_strided_rows_and_precomputed_norms():
    z, weight, bias, codebooks = make_codebook_inputs(7)
    wide = torch.cat([z, torch.full_like(z, float("nan"))], dim=1)[
        :, : z.shape[1]
    ]  # row stride 2x width
    sqnorms = codebooks.square().sum(-1)
    got = ops.codebook_argmin(wide, weight, bias, codebooks, sqnorms, vocab_offset=3, mode="exact")
    assert torch.equal(got, brute_force(z, weight, bias, codebooks, 3))


def test_empty_input_gives_empty_ids():
    z, weight, bias, codebooks = make_codebook_inputs(0)
    ids = ops.codebook_argmin(z, weight, bias, codebooks, vocab_offset=0, mode="exact")
    assert ids.shape == (0, 8) and ids.dtype == torch.int64


@pytest.mark.parametrize(
    "change, match",
    [
        (
            {"z": torch.full((3, 128), float("inf"))},
            "z must hold only finite values, got 0 NaN and 384 infinite",
        ),
        (
            {"z": torch.zeros(3, 100)},
            r"codebook_argmin: z must have shape \[\*, 128\] \(n, G\*d = 8\*16\), got \[3, 100\]",
        ),
        (
            {"z": torch.zeros(3, 128, dtype=torch.int64)},
            "z must have dtype float32, bfloat16, float16, got int64",
        ),
        ({"ln_weight": torch.zeros(8, 15)}, r"ln_weight must have shape \[8, 16\]"),
        ({"codebooks": torch.zeros(8, 67)}, r"codebooks must have shape \[\*, \*, \*\]"),
        (
            {"codebook_sqnorms": torch.zeros(8, 67, dtype=torch.float64)},
            "codebook_sqnorms must have dtype float32",
        ),
        ({"mode": "fast"}, r"mode must be one of \['reference', 'exact'\]"),
        ({"z": torch.zeros(3, 128, device="meta")}, "must be on the device of z"),
        (
            {"z": torch.zeros(3, 128, dtype=torch.bfloat16), "mode": "reference"},
            "z must have the dtype of codebooks",
        ),
        ({"z": torch.zeros(128, 3).T}, "contiguous last dim"),
        # Mixed dtypes ran on CPU (its layer_norm takes float32 weights for bf16 input) and failed
        # inside torch on CUDA: refused here, on every device, before any kernel.
        (
            {"ln_weight": torch.ones(8, 16, dtype=torch.bfloat16)},
            r"ln_weight must have the dtype of z \(torch.float32\), got torch.bfloat16",
        ),
        (
            {"ln_bias": torch.zeros(8, 16, dtype=torch.float64)},
            r"ln_bias must have the dtype of z",
        ),
    ],
)
def test_bad_input_names_the_argument(change, match):
    z, weight, bias, codebooks = make_codebook_inputs(3)
    args = {
        "z": z,
        "ln_weight": weight,
        "ln_bias": bias,
        "codebooks": codebooks,
        "codebook_sqnorms": None,
        "mode": "exact",
    }
    args.update(change)
    with pytest.raises(ValueError, match=match):
        ops.codebook_argmin(**args, vocab_offset=0)


def test_backends_are_explicit():
    z, weight, bias, codebooks = make_codebook_inputs(3)
    assert ops.resolve_backend("codebook_argmin", "auto", z, codebooks) == "torch"
    with pytest.raises(BackendUnavailableError, match="backend 'cuda' unavailable"):
        ops.codebook_argmin(
            z, weight, bias, codebooks, vocab_offset=0, mode="exact", backend="cuda"
        )
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.codebook_argmin(
            z, weight, bias, codebooks, vocab_offset=0, mode="exact", backend="fastest"
        )


# --- the triton backend (compiled on CUDA tensors, interpreted on CPU tensors) ---------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _on(device, dtype, *tensors):
    return [t.to(device, dtype) for t in tensors]


def _clear_winner(z, weight, bias, codebooks, ulps=4):
    """[n, G] bool: the official (``mode="reference"``) nearest code leads the runner-up by > ulps."""
    groups, _, dim = codebooks.shape
    clear = []
    for g in range(groups):
        u = F.layer_norm(z[:, g * dim : (g + 1) * dim], (dim,), weight[g], bias[g], 1e-5)
        two = torch.cdist(u, codebooks[g]).pow(2).float().topk(2, largest=False).values
        ulp = two[:, 0] * torch.finfo(z.dtype).eps  # at least one ulp of the winning distance
        clear.append(two[:, 1] - two[:, 0] > ulps * ulp)
    return torch.stack(clear, 1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["exact", "reference"])
@pytest.mark.parametrize("n, codes, dim", [(1, 67, 16), (7, 100, 32), (129, 300, 16)])
def test_triton_matches_reference(n, codes, dim, mode, dtype, device):
    """K is never a tile multiple; 129 rows span three row blocks with a one-row tail."""
    z, weight, bias, codebooks = _on(
        device, dtype, *make_codebook_inputs(n, groups=2, codes=codes, dim=dim, seed=n)
    )
    args = {"vocab_offset": 151936, "mode": mode}
    want = ops.codebook_argmin(z, weight, bias, codebooks, **args, backend="torch")
    got = ops.codebook_argmin(z, weight, bias, codebooks, **args, backend="triton")
    if device == "cuda" and dtype == torch.bfloat16 and mode == "reference":
        # A GEMM library accumulates in its own order; one ulp before the bf16 rounding can flip a
        # near-tie (docstring of ops.codebook_argmin). Rows whose official winner leads by 4 ulps agree.
        clear = _clear_winner(z, weight, bias, codebooks)
        assert clear.float().mean() >= 0.5
        assert torch.equal(got[clear], want[clear])
    else:
        assert torch.equal(got, want)


# Every (device, backend) that can run codebook_argmin; the GPU ones need a CUDA device.
BACKEND_DEVICES = [
    ("cpu", "torch"),
    ("cpu", "triton"),
    pytest.param("cuda", "torch", marks=pytest.mark.gpu),
    pytest.param("cuda", "triton", marks=pytest.mark.gpu),
    pytest.param("cuda", "cuda", marks=pytest.mark.gpu),
]
# Index pairs holding two identical copies of a row's nearest code, against the kernels' tiles: the same
# tile; the two halves of a CUDA epilogue tile (32 codes each); across 64- and 128-code tile edges;
# first tile vs the tail tile (K = 1000 is no multiple of 64 or 128); two middle tiles (the pair the
# first H200 run reported); both in the tail tile.
TIE_PAIRS = [(0, 1), (31, 32), (63, 64), (127, 128), (5, 999), (500, 888), (970, 998)]


def tied_codebooks(z, weight, bias, *, codes, dtype, seed):
    """[G, K, d] codebooks in which row r's nearest code in group g sits, as two identical copies, at
    the pair ``TIE_PAIRS[(r + g) % 7]``, and [n, G] the first index of each pair.

    The copies are the row's own float32 LayerNorm output rounded to ``dtype``: distance ~0, while every
    other code (LayerNormed random, |c|^2 = d) is ~2d away, so every mode and dtype has exactly that
    tie at its minimum, and the first index of the pair is the only right answer.
    """
    groups, dim = weight.shape
    gen = torch.Generator().manual_seed(seed)
    codebooks = F.layer_norm(torch.randn(groups, codes, dim, generator=gen), (dim,))
    first = torch.empty(z.shape[0], groups, dtype=torch.int64)
    for g in range(groups):
        u = F.layer_norm(z[:, g * dim : (g + 1) * dim], (dim,), weight[g], bias[g], 1e-5)
        for row in range(z.shape[0]):
            pair = TIE_PAIRS[(row + g) % len(TIE_PAIRS)]
            codebooks[g, list(pair)] = u[row].to(dtype).float()
            first[row, g] = min(pair)
    return codebooks.to(dtype), first


@pytest.mark.parametrize(("device", "backend"), BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["exact", "reference"])
def test_exact_duplicate_codes_give_the_first_index_on_every_backend(mode, dtype, device, backend):
    """8 groups x 7 rows, each with its nearest code duplicated at one of TIE_PAIRS (both orders of
    original and copy, since the copies are identical): every backend and mode returns the pair's
    first index, the torch reference's tie rule (kelix-ar.md §3.5)."""
    groups, codes, dim = 8, 1000, 128
    z, weight, bias, _ = make_codebook_inputs(len(TIE_PAIRS), groups=groups, dim=dim, seed=21)
    codebooks, first = tied_codebooks(z, weight, bias, codes=codes, dtype=dtype, seed=22)
    z, weight, bias = _on(device, dtype, z, weight, bias)
    ids = ops.codebook_argmin(
        z, weight, bias, codebooks.to(device), vocab_offset=11, mode=mode, backend=backend
    )
    assert ids.cpu().tolist() == (first + 11 + codes * torch.arange(groups)).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_official_rounding_merges_at_most_three_consecutive_values(dtype):
    """The Triton kernel's reference mode checks the two values after a tile's minimum for members of
    its class (codebook_argmin._rounded_cdist): true for every positive finite 16-bit value, clamped
    ones included (float32 spaces its values more finely than its square roots too)."""
    top = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}[dtype]  # the first non-finite bit pattern
    values = torch.arange(1, top, dtype=torch.int32).to(torch.int16).view(dtype).float()
    clamped = values.clamp_min(1e-30).to(dtype).float()
    official = clamped.sqrt().to(dtype).float().square().to(dtype).float()
    assert bool((official[1:] >= official[:-1]).all())  # non-decreasing
    starts = torch.nonzero(official[1:] != official[:-1]).flatten() + 1
    runs = torch.diff(torch.cat([starts, torch.tensor([len(official)])]))
    assert int(runs.max()) <= 3  # every class after the clamped one
    clamp_class_top = int(starts[0]) - 1  # the last value in the class of the clamp
    floor = int(torch.nonzero(values >= torch.tensor(1e-30).to(dtype).float())[0])
    assert clamp_class_top - floor <= 2


# A GEMM output that the official rounding merges with 4096 (exact in every format): bf16 rounds
# sqrt(4128) = 64.25 to 64 (a tie, to even), fp16 rounds sqrt(4100) = 64.03 to 64; float32 merges neither.
MERGED_WITH_4096 = {torch.bfloat16: (64, 4, 4), torch.float16: (64, 2), torch.float32: (64, 4, 4)}


@pytest.mark.parametrize(("device", "backend"), BACKEND_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_mode_merged_distances_take_the_first_index(dtype, device, backend):
    """The official distance rounds the GEMM output, clamps, takes the root and squares, each rounded, so
    distinct GEMM outputs can give one distance, and then the first code wins. Group 0 puts a merged
    code (distance 4128 in bf16, 4100 in fp16) at index 100 and the strict minimum (4096) at 700, in
    another tile; group 1 puts them at 10 and 20, in one tile. u = 0 (zero LayerNorm weight and bias)
    and integer codes make every square, norm and sum exact in each format, so every backend sees these
    GEMM outputs. The Triton kernel finds the merged class from the tile minimum (_rounded_cdist,
    _next_up)."""
    groups, codes, dim = 2, 1000, 16
    gen = torch.Generator().manual_seed(5)
    codebooks = torch.randint(30, 40, (groups, codes, dim), generator=gen).float()  # |c|^2 > 14,000
    merged = torch.zeros(dim)
    merged[: len(MERGED_WITH_4096[dtype])] = torch.tensor(MERGED_WITH_4096[dtype]).float()
    minimum = torch.zeros(dim)
    minimum[0] = 64.0  # distance 4096
    for g, (first, second) in enumerate([(100, 700), (10, 20)]):
        codebooks[g, first], codebooks[g, second] = merged, minimum
    z = torch.randn(5, groups * dim, generator=gen)  # any values: u = 0 for every row
    weight, bias = torch.zeros(groups, dim), torch.zeros(groups, dim)
    z, weight, bias, codebooks = _on(device, dtype, z, weight, bias, codebooks)
    ids = {
        b: ops.codebook_argmin(
            z, weight, bias, codebooks, vocab_offset=0, mode="reference", backend=b
        ).cpu()
        for b in ("torch", backend)
    }
    first = torch.tensor([700, 1020]) if dtype == torch.float32 else torch.tensor([100, 1010])
    assert torch.equal(ids["torch"], first.expand(5, 2))  # the case means what it says
    assert torch.equal(ids[backend], ids["torch"])


@pytest.mark.parametrize("device", DEVICES)
def test_triton_near_ties_follow_the_float32_distance(device):
    """Copies of the nearest code moved by ~1e-3: far above float32 rounding, far below the code gaps."""
    z, weight, bias, codebooks = make_codebook_inputs(7, groups=2, codes=67, dim=16, seed=11)
    nearest = brute_force(z, weight, bias, codebooks, 0) - 67 * torch.arange(2)
    near = codebooks.clone()
    gen = torch.Generator().manual_seed(3)
    for g in range(2):
        for row, slot in ((0, 5), (3, 40), (6, 66)):
            near[g, slot] = near[g, nearest[row, g]] + 1e-3 * torch.randn(16, generator=gen)
    z, weight, bias, near = _on(device, torch.float32, z, weight, bias, near)
    for mode in ("exact", "reference"):
        got = ops.codebook_argmin(
            z, weight, bias, near, vocab_offset=0, mode=mode, backend="triton"
        )
        assert torch.equal(got.cpu(), brute_force(*(t.cpu() for t in (z, weight, bias, near)), 0))


# The parts of the float32 u that the exact mode's tensor-core path splits u into, per codebook dtype
# (triton_kernels/codebook_argmin.py, csrc/codebook_argmin.cu): the precision the tests below demand.
EXACT_SPLIT = {torch.bfloat16: 3, torch.float16: 2}


def split_remainder(u, dtype, parts):
    """float32 ``u`` minus its first ``parts`` parts in ``dtype``, each the rounded remainder of the
    previous ones (every subtraction exact): what a tile product of those parts would miss."""
    for _ in range(parts):
        u = u - u.to(dtype).float()
    return u


def _exact_launch(z, weight, bias, codebooks, *, device):
    """Exact-mode ids from the triton launcher on ``device``, written into a buffer poisoned with -1
    (row stride 2G, group stride 2), whose other entries must stay -1."""
    n, groups = z.shape[0], codebooks.shape[0]
    z, weight, bias, codebooks = (t.to(device) for t in (z, weight, bias, codebooks))
    sqnorms = codebooks.float().square().sum(-1)
    buffer = torch.full((n + 3, 2 * groups), -1, dtype=torch.int64, device=device)
    ids = buffer[:n, ::2]
    kernels = triton_kernels.kernels_for("codebook_argmin", z)
    kernels.codebook_argmin(
        z, weight, bias, codebooks, sqnorms, ids, vocab_offset=5, mode="exact", eps=1e-5
    )
    assert bool((buffer[:, 1::2] == -1).all()) and bool((buffer[n:] == -1).all())
    return ids.cpu()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, codes, dim", [(1, 67, 16), (7, 100, 72), (130, 300, 128)])
def test_triton_exact_mode_16bit_matches_reference(n, codes, dim, dtype, device):
    """The tensor-core path of ``mode="exact"`` (u split into 16-bit parts): one row; 130 rows, a tail
    row block for the GPU's 128-row and the interpreter's 64-row tiles; K no multiple of the code tile;
    d = 16, 72 (padded to a 128-wide tile) and 128. Ids are poisoned first."""
    z, weight, bias, codebooks = (
        t.to(dtype) for t in make_codebook_inputs(n, groups=2, codes=codes, dim=dim, seed=n)
    )
    want = ops.codebook_argmin(
        z, weight, bias, codebooks, vocab_offset=5, mode="exact", backend="torch"
    )
    assert torch.equal(_exact_launch(z, weight, bias, codebooks, device=device), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "z_dtype, codebook_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
def test_triton_exact_mode_mixed_dtypes(z_dtype, codebook_dtype, device):
    """Exact mode takes z and codebooks in different dtypes: float32 queries split over bf16 codes
    (tensor cores), and bf16 queries against float32 codes (the IEEE float32 product)."""
    z, weight, bias, codebooks = make_codebook_inputs(65, groups=2, codes=200, dim=32, seed=4)
    z, weight, bias = (t.to(z_dtype) for t in (z, weight, bias))
    codebooks = codebooks.to(codebook_dtype)
    want = ops.codebook_argmin(
        z, weight, bias, codebooks, vocab_offset=5, mode="exact", backend="torch"
    )
    assert torch.equal(_exact_launch(z, weight, bias, codebooks, device=device), want)


# Index pairs (winner, runner-up) of the near ties below: same tile, across the 64- and 128-code tile
# edges, the first tile against the tail tile (K = 300), in both orders.
NEAR_TIE_PAIRS = [(1, 0), (63, 64), (128, 127), (5, 299), (290, 10), (200, 250)]
NEAR_TIE_MARGIN = 2.5e-4  # ~8 float32 ulps of the terms |c|^2 and 2 u.c (~ 2.5 10^2)


def near_tie_codebooks(z, weight, bias, *, codes, dtype, seed):
    """[G, K, d] ``dtype`` codebooks in which row r's two nearest codes in group g sit at the pair
    ``NEAR_TIE_PAIRS[(r + g) % 6]``, and [n, G] the index of the nearer one.

    The two codes are ``p + s`` and ``p - s``: p is u (the reference's float32 LayerNorm output) on a
    2^-4 grid and s in {-1, 0, 1}^d, so both are exact in bf16 and fp16 and are ~|s|^2 from u, while
    the other (LayerNormed random) codes are ~|u|^2 + d away. Their distance gap is -4 s.(u - p); s
    starts as the sign of what a split with one part fewer than the kernel's misses (``split_remainder``),
    and a few entries are then zeroed or negated until that gap is at least NEAR_TIE_MARGIN while the
    truncated u sees the opposite order, also by at least the margin.
    """
    groups, dim = weight.shape
    gen = torch.Generator().manual_seed(seed)
    codebooks = F.layer_norm(torch.randn(groups, codes, dim, generator=gen), (dim,))
    codebooks = codebooks.to(dtype).float()  # the float64 checks below see the kernel's codes
    nearer = torch.empty(z.shape[0], groups, dtype=torch.int64)
    for g in range(groups):
        u = F.layer_norm(
            z[:, g * dim : (g + 1) * dim].float(),
            (dim,),
            weight[g].float(),
            bias[g].float(),
            1e-5,
        )
        missed = split_remainder(u, dtype, EXACT_SPLIT[dtype] - 1).double()
        for row in range(z.shape[0]):
            p = (u[row] * 16).round() / 16
            offset = u[row].double() - p.double()  # u - p
            s = torch.where(missed[row] < 0, -1.0, 1.0).double()
            # Gap (nearer - farther) = -4 s.offset must lie in [-(flip - margin), -margin], where
            # flip = 4 s.missed is how much the truncated u moves it.
            for _ in range(10):
                flip = 4 * float(s @ missed[row])
                gap = -4 * float(s @ offset)
                if -(flip - NEAR_TIE_MARGIN) <= gap <= -NEAR_TIE_MARGIN:
                    break
                # Apply the one or two moves (an entry of s to 0 or to its negative) that bring gap
                # closest to the middle of the window; [i, i] is move i alone, two moves of one
                # entry are excluded.
                moves = torch.cat([-s, -2 * s])  # new s_i - s_i, two per entry
                shift = -4 * moves * offset.repeat(2)
                total = shift[:, None] + shift[None, :]
                total.diagonal().copy_(shift)
                entry = torch.arange(2 * dim) % dim
                twice = (entry[:, None] == entry[None, :]) & ~torch.eye(2 * dim, dtype=torch.bool)
                total[twice] = float("inf")
                i, j = divmod(int((gap + total + flip / 2).abs().argmin()), 2 * dim)
                s[i % dim] += moves[i]
                if j != i:
                    s[j % dim] += moves[j]
            first, second = NEAR_TIE_PAIRS[(row + g) % len(NEAR_TIE_PAIRS)]
            codebooks[g, first] = (p.double() + s).float()
            codebooks[g, second] = (p.double() - s).float()
            nearer[row, g] = first
            # The case means what it says (float64 distances): p + s wins by the margin, and loses by
            # the margin when u is truncated to one part fewer.
            for query, sign in ((u[row].double(), 1), (u[row].double() - missed[row], -1)):
                dists = (codebooks[g].double() - query).square().sum(-1)
                gap = float(dists[first] - dists[second])
                assert sign * gap <= -NEAR_TIE_MARGIN, (row, g, sign, gap)
                assert int(dists.argmin()) in (first, second)
    assert torch.equal(codebooks.to(dtype).float(), codebooks)  # the near-tie codes are exact
    return codebooks.to(dtype), nearer


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_exact_mode_resolves_float32_near_ties(dtype, device):
    """Near ties 2.5e-4 apart on distances ~10^2 (~8 float32 ulps of the terms ~2.5 10^2), that a
    product with one part of u fewer than the kernel's would resolve the other way: the 16-bit tile
    products must carry u to float32 precision. The reference agrees with the float64 winner."""
    z, weight, bias, _ = make_codebook_inputs(6, groups=2, dim=128, seed=31)
    z, weight, bias = (t.to(dtype) for t in (z, weight, bias))
    codebooks, nearer = near_tie_codebooks(z, weight, bias, codes=300, dtype=dtype, seed=32)
    want = nearer + 5 + 300 * torch.arange(2)
    reference = ops.codebook_argmin(
        z, weight, bias, codebooks, vocab_offset=5, mode="exact", backend="torch"
    )
    assert torch.equal(reference, want)
    assert torch.equal(_exact_launch(z, weight, bias, codebooks, device=device), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["exact", "reference"])
def test_triton_launcher_fills_only_its_ids_and_reads_strided_rows(mode, dtype, device):
    """Direct launch: ids poisoned with -1 inside a wider buffer, z rows sliced from a NaN-padded tensor."""
    n, groups = 7, 2
    z, weight, bias, codebooks = _on(
        device, dtype, *make_codebook_inputs(n, groups=groups, codes=100, dim=32, seed=9)
    )
    wide = torch.cat([z, torch.full_like(z, float("nan"))], dim=1)[:, : z.shape[1]]
    sqnorms = codebooks.float().square().sum(-1)
    buffer = torch.full((n + 3, 2 * groups), -1, dtype=torch.int64, device=device)
    ids = buffer[:n, ::2]  # row stride 2G, group stride 2
    kernels = triton_kernels.kernels_for("codebook_argmin", z)
    kernels.codebook_argmin(
        wide, weight, bias, codebooks, sqnorms, ids, vocab_offset=7, mode=mode, eps=1e-5
    )
    want = ops.codebook_argmin(
        z, weight, bias, codebooks, sqnorms, vocab_offset=7, mode=mode, backend="torch"
    )
    assert torch.equal(ids, want)
    assert bool((buffer[:, 1::2] == -1).all()) and bool((buffer[n:] == -1).all())


def test_auto_picks_torch_for_cpu_tensors_and_triton_runs_when_named():
    z, _, _, codebooks = make_codebook_inputs(3)
    assert ops.resolve_backend("codebook_argmin", "auto", z, codebooks) == "torch"
    # Named, triton runs CPU tensors under its interpreter, whether or not CUDA is present.
    assert ops.resolve_backend("codebook_argmin", "triton", z, codebooks) == "triton"


@pytest.mark.gpu
def test_auto_picks_a_kernel_for_cuda_tensors():
    z, _, _, codebooks = (t.cuda() for t in make_codebook_inputs(3))
    assert ops.resolve_backend("codebook_argmin", "auto", z, codebooks) in ("cuda", "triton")


def test_triton_reference_mode_gives_the_golden_ids(golden_dir):
    """``mode="reference"`` through the triton backend on the golden engine's own z (ar_visual)."""
    from safetensors.torch import load_file

    from kelix_fast import KelixAR
    from kelix_fast.models.tokenizer import QUANTIZER_LN_EPS

    fx = load_file(golden_dir / "ar_visual.safetensors")
    engine = KelixAR.from_pretrained(golden_dir / "kelix_ar", device="cpu", dtype=torch.float32)
    tok = engine.model.tokenizer
    checked = 0
    for i in range(8):
        if f"img{i}_pixel_values" not in fx:
            break
        grids = [tuple(g) for g in fx[f"img{i}_grid_thw"].tolist()]
        with torch.no_grad():
            z = tok.encode(fx[f"img{i}_pixel_values"], grids)
        ids = ops.codebook_argmin(
            z,
            tok.z_norm_weight,
            tok.z_norm_bias,
            tok.codebooks,
            tok.codebook_sqnorms,
            vocab_offset=engine.config.llm.vocab_size,
            mode="reference",
            eps=QUANTIZER_LN_EPS,
            backend="triton",
        )
        assert torch.equal(ids, fx[f"img{i}_aligned_indices"]), f"img{i}"
        checked += 1
    assert checked >= 1
