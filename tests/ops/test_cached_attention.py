"""``ops.cached_attention``: every backend against a float64 per-request reference with explicit heads.

Caches are slices of wider tensors whose rows past ``S`` and past each ``kv_lens[b]`` hold huge values,
so a key read beyond its range changes the output by far more than any tolerance. Under the interpreter
the kernel's key tiles are 16 wide and its query tiles 32 rows, so the sizes below (S = 9..75, Lq 1..33,
G 1/4/8) reach several key tiles, splits and query tiles, never a multiple of them. The triton tests run
on CPU tensors (the interpreter) on every machine; the ``gpu`` tests add CUDA tensors and full-size shapes.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kelix_fast import ops
from kelix_fast.ops import BackendUnavailableError

BACKENDS = ["torch", "triton"]
# Triton runs CPU tensors under its interpreter, with or without a GPU (kelix_fast.triton_kernels).
TRITON_DEVICE = torch.device("cpu")
STALE = 1.0e4  # cache rows no query may see


def make_inputs(
    batch, q_len, heads, kv_heads, dim, cache_len, kv_lens, *, dtype=torch.float32, seed=0,
    device="cpu",
):  # fmt: skip
    """q [B, Lq, H, d] and k/v caches [B, S, Hkv, d] sliced from wider tensors (batch, position and
    head strides all differ from a contiguous cache); rows past ``S`` and past ``kv_lens`` are STALE."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_len, heads, dim, generator=gen)
    caches = []
    for _ in range(2):
        wide = torch.full((batch, cache_len + 3, kv_heads + 1, dim), STALE)
        for b, n in enumerate(kv_lens):
            wide[b, :n, :kv_heads] = torch.randn(n, kv_heads, dim, generator=gen)
        caches.append(wide.to(device, dtype)[:, :cache_len, :kv_heads])
    return q.to(device, dtype), *caches


def device_of(backend):
    return TRITON_DEVICE if backend == "triton" else torch.device("cpu")


def naive(q, k, v, q_start, kv_lens, causal, scale=None):
    """Per request, heads expanded explicitly, float64 on the CPU -> [B, Lq, H, d]."""
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[2] // k.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64)
    for b in range(q.shape[0]):
        n = int(kv_lens[b])
        kb = k[b, :n].double().repeat_interleave(group, dim=1)
        vb = v[b, :n].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[b].double(), kb) * scale
        if causal:
            pos = int(q_start[b]) + torch.arange(q.shape[1])
            scores = scores.masked_fill(torch.arange(n)[None, None] > pos[None, :, None], -math.inf)
        out[b] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vb)
    return out


def eager_at_dtype(q, k, v, q_start, kv_lens, causal):
    """Plain PyTorch in the input dtype (GEMMs in bf16/fp16, softmax in float32) on the CPU: the error
    budget."""
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    group = q.shape[2] // k.shape[2]
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        n = int(kv_lens[b])
        kb = k[b, :n].repeat_interleave(group, dim=1).transpose(0, 1)  # [H, n, d]
        vb = v[b, :n].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (q[b].transpose(0, 1) @ kb.transpose(1, 2)).float() * q.shape[-1] ** -0.5
        if causal:
            pos = int(q_start[b]) + torch.arange(q.shape[1])
            scores = scores.masked_fill(torch.arange(n)[None, None] > pos[None, :, None], -math.inf)
        out[b] = (scores.softmax(-1).to(q.dtype) @ vb).transpose(0, 1)
    return out


# (batch, Lq, H, Hkv, d, S, kv_lens, q_start): decode, Block Decoder, short and long query tiles.
CASES = {
    "block_decoder": (3, 1, 4, 4, 128, 9, [1, 9, 5], [0, 8, 4]),
    "decode_gqa4": (3, 1, 8, 2, 128, 50, [1, 50, 23], [0, 49, 22]),
    "decode_gqa8_d64": (1, 1, 8, 1, 64, 37, [37], [36]),
    "lq3_gqa8_d72": (2, 3, 8, 1, 72, 41, [41, 7], [38, 4]),
    "lq9_gqa4_d112": (2, 9, 8, 2, 112, 30, [30, 9], [21, 0]),
    # request 0 is right-padded: rows 20..32 sit past its keys and still see keys 0..19
    "prefill_lq33_gqa1": (2, 33, 2, 2, 128, 40, [20, 40], [0, 7]),
    "d16": (2, 5, 4, 1, 16, 19, [19, 6], [14, 1]),
    "gqa3": (2, 11, 6, 2, 32, 23, [23, 11], [12, 0]),  # G = 3: query tiles of 5 rows, 1 spare row
}


def run_case(name, causal, backend, dtype=torch.float32):
    batch, q_len, heads, kv_heads, dim, cache_len, lens, starts = CASES[name]
    device = device_of(backend)
    q, k, v = make_inputs(
        batch, q_len, heads, kv_heads, dim, cache_len, lens, dtype=dtype, seed=dim, device=device
    )
    q_start, kv_lens = torch.tensor(starts, device=device), torch.tensor(lens, device=device)
    got = ops.cached_attention(
        q, k, v, q_start=q_start, kv_lens=kv_lens, causal=causal, backend=backend
    )
    return got.cpu(), (q, k, v, starts, lens, causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_float32_matches_naive(name, causal, backend):
    got, args = run_case(name, causal, backend)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), naive(*args), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["decode_gqa4", "lq9_gqa4_d112", "prefill_lq33_gqa1"])
def test_low_precision_error_is_within_plain_pytorch(name, dtype, backend):
    # FlashAttention's test: the error against float64 may not exceed twice plain PyTorch's at the dtype.
    got, args = run_case(name, True, backend, dtype)
    assert got.dtype == dtype
    want = naive(*args)
    budget = (eager_at_dtype(*args).double() - want).abs().max().item()
    error = (got.double() - want).abs().max().item()
    assert error <= 2 * budget + 1e-5, f"error {error:.3g}, plain PyTorch {budget:.3g}"


def triton_kernels():
    """The kernel module the triton backend runs on TRITON_DEVICE (its interpreted copy)."""
    from kelix_fast import triton_kernels as kernels

    return kernels.kernels_for("decode_attention", torch.empty(0, device=TRITON_DEVICE))


@pytest.mark.parametrize("target, splits", [(1, 1), (8, 2), (528, 5)])
def test_triton_splits_and_long_loops(monkeypatch, target, splits):
    # Five key tiles, the last one partial. One split loops over all of them (online softmax rescaling);
    # two splits of three and two tiles; five splits of one tile each. Results may not depend on it.
    kernels = triton_kernels()
    monkeypatch.setattr(kernels, "_TARGET_PROGRAMS", target)
    cache_len = 4 * kernels.plan(2, 2, 8, 2, 1, 64, torch.float32)["block_n"] + 11
    plan = kernels.plan(2, 2, 8, 2, cache_len, 64, torch.float32)
    assert plan["q_tiles"] == 1 and plan["num_splits"] == splits
    assert (splits - 1) * plan["split_size"] < cache_len <= splits * plan["split_size"]
    lens, starts = [cache_len, 20], [cache_len - 2, 18]
    q, k, v = make_inputs(2, 2, 8, 2, 64, cache_len, lens, seed=target, device=TRITON_DEVICE)
    for causal in (True, False):
        got = ops.cached_attention(
            q,
            k,
            v,
            q_start=torch.tensor(starts, device=TRITON_DEVICE),
            kv_lens=torch.tensor(lens, device=TRITON_DEVICE),
            causal=causal,
            backend="triton",
        )
        want = naive(q, k, v, starts, lens, causal)
        torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=1e-5)


def test_split_plan_fills_the_gpu_from_shapes_only():
    kernels = triton_kernels()
    # B=1 decode: 8 programs before splitting, so the most splits, covering the cache exactly.
    one = kernels.plan(1, 1, 32, 8, 32768, 128, torch.bfloat16)
    assert one["num_splits"] == kernels._MAX_SPLITS
    last = (one["num_splits"] - 1) * one["split_size"]
    assert last < 32768 <= last + one["split_size"] and one["split_size"] % one["block_n"] == 0
    crowded = kernels.plan(128, 1, 32, 8, 32768, 128, torch.bfloat16)  # 1024 programs already
    assert crowded["num_splits"] == 1
    assert kernels.plan(1, 2048, 32, 8, 4096, 128, torch.bfloat16)["num_splits"] == 1  # prefill
    small = kernels.plan(3, 1, 4, 4, 9, 128, torch.float32)  # Block Decoder: one key tile
    assert small["num_splits"] == 1 and small["block_m"] == 16 and small["block_d"] == 128
    gqa8 = kernels.plan(2, 9, 8, 1, 41, 72, torch.float32)  # query tiles of block_m / 8 rows
    rows = gqa8["block_m"] // 8
    assert (gqa8["q_tiles"] - 1) * rows < 9 <= gqa8["q_tiles"] * rows and gqa8["block_d"] == 128


@pytest.mark.parametrize("target", [1, 528])
def test_triton_launcher_fills_poisoned_outputs(monkeypatch, target):
    # Both the output and the split partials start as NaN: every element must be written, and the merge
    # may read only what the splits wrote. Three key tiles, the last one partial.
    kernels = triton_kernels()
    monkeypatch.setattr(kernels, "_TARGET_PROGRAMS", target)
    cache_len = 2 * kernels.plan(3, 4, 8, 2, 1, 72, torch.float32)["block_n"] + 15
    assert kernels.plan(3, 4, 8, 2, cache_len, 72, torch.float32)["num_splits"] == (
        1 if target == 1 else 3
    )
    empty = torch.empty

    def poisoned_empty(*args, **kwargs):
        return empty(*args, **kwargs).fill_(math.nan)

    lens, starts = [cache_len - 14, 2, cache_len], [cache_len - 17, 0, cache_len - 7]
    q, k, v = make_inputs(3, 4, 8, 2, 72, cache_len, lens, seed=7, device=TRITON_DEVICE)
    out = torch.full_like(q, math.nan)
    q_start, kv_lens = (torch.tensor(x, device=TRITON_DEVICE) for x in (starts, lens))
    with monkeypatch.context() as patch:
        patch.setattr(torch, "empty", poisoned_empty)
        kernels.decode_attention(q, k, v, q_start, kv_lens, out, causal=True, scale=72**-0.5)
    want = naive(q, k, v, starts, lens, True)
    torch.testing.assert_close(out.cpu().double(), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_incremental_cached_attention_equals_full_causal_attention(backend):
    """Prefill of 5 + decode of 4 rows through a cache, two requests of different lengths, GQA 4/2."""
    lengths, capacity = [9, 6], 12
    device = device_of(backend)
    cache_k = torch.zeros(2, capacity, 2, 16, device=device)
    cache_v = torch.zeros(2, capacity, 2, 16, device=device)
    gen = torch.Generator().manual_seed(0)
    qs = [torch.randn(n, 4, 16, generator=gen) for n in lengths]
    ks = [torch.randn(n, 2, 16, generator=gen) for n in lengths]
    vs = [torch.randn(n, 2, 16, generator=gen) for n in lengths]
    outs = [[], []]
    for start, stop in ((0, 5), (5, 6), (6, 7), (7, 8), (8, 9)):
        width = stop - start
        q = torch.zeros(2, width, 4, 16, device=device)
        for b, n in enumerate(lengths):
            hi = min(stop, n)
            if hi > start:
                q[b, : hi - start] = qs[b][start:hi]
                cache_k[b, start:hi], cache_v[b, start:hi] = ks[b][start:hi], vs[b][start:hi]
        kv_lens = torch.tensor([min(stop, n) for n in lengths], device=device)
        out = ops.cached_attention(
            q,
            cache_k,
            cache_v,
            q_start=torch.full((2,), start, device=device),
            kv_lens=kv_lens,
            causal=True,
            backend=backend,
        )
        for b, n in enumerate(lengths):
            outs[b].append(out[b, : max(0, min(stop, n) - start)].cpu())
    for b, n in enumerate(lengths):
        full = naive(qs[b][None], ks[b][None], vs[b][None], [0], [n], causal=True)[0]
        torch.testing.assert_close(torch.cat(outs[b]).double(), full, rtol=0, atol=1e-5)


class HostReads(TorchDispatchMode):
    """Records the aten ops that copy a tensor value to the host (``item``, ``int()``, ``bool()``...)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("trusted", [False, True])
def test_trusted_values_read_nothing_on_the_host(monkeypatch, backend, trusted):
    # Inside trusted_values (the decode loop) no path may read kv_lens or q_start on the host: on a GPU
    # that is a sync, and under CUDA graph capture an error. Outside, the value checks do read them,
    # which shows that the detector sees such reads.
    def refuse(self, *args, **kwargs):
        raise AssertionError("a tensor was read on the host")

    lens, starts = [3, 37], [2, 36]
    device = device_of(backend)
    q, k, v = make_inputs(2, 1, 8, 2, 32, 37, lens, seed=3, device=device)
    q_start, kv_lens = torch.tensor(starts, device=device), torch.tensor(lens, device=device)
    detector = HostReads()
    with contextlib.ExitStack() as stack:
        if trusted:
            stack.enter_context(ops.trusted_values())
            patch = stack.enter_context(monkeypatch.context())
            for name in ("tolist", "numpy", "__array__"):
                patch.setattr(torch.Tensor, name, refuse)
        stack.enter_context(detector)
        got = ops.cached_attention(
            q, k, v, q_start=q_start, kv_lens=kv_lens, causal=True, backend=backend
        )
    assert bool(detector.reads) != trusted
    want = naive(q, k, v, starts, lens, True)
    torch.testing.assert_close(got.cpu().double(), want, rtol=0, atol=1e-5)


def test_auto_picks_triton_for_cuda_tensors_only():
    q, k, v = make_inputs(1, 1, 4, 2, 16, 5, [5])
    assert ops.resolve_backend("cached_attention", "auto", q, k, v) == "torch"
    assert ops.resolve_backend("cached_attention", "triton", q, k, v) == "triton"


def test_triton_refuses_a_strided_last_dim():
    q, k, v = make_inputs(1, 1, 4, 2, 16, 5, [5], device=TRITON_DEVICE)
    k_strided = torch.stack([k, k], dim=-1)[..., 0]  # equal to k, last-dim stride 2
    args = {"q_start": torch.tensor([4]), "kv_lens": torch.tensor([5])}
    args = {name: t.to(TRITON_DEVICE) for name, t in args.items()}
    with pytest.raises(BackendUnavailableError, match=r"contiguous last dim, got strided k_cache"):
        ops.cached_attention(q, k_strided, v, backend="triton", **args)
    torch.testing.assert_close(
        ops.cached_attention(q, k_strided, v, **args).cpu().double(),  # auto: torch
        naive(q, k, v, [4], [5], True),
        rtol=0,
        atol=1e-5,
    )


def test_triton_refuses_head_dims_beyond_its_registers():
    q, k, v = make_inputs(1, 1, 2, 1, 264, 5, [5], device=TRITON_DEVICE)
    lengths = {"q_start": torch.tensor([4]), "kv_lens": torch.tensor([5])}
    args = {name: t.to(TRITON_DEVICE) for name, t in lengths.items()}
    with pytest.raises(BackendUnavailableError, match=r"head dims up to 256, got d=264"):
        ops.cached_attention(q, k, v, backend="triton", **args)


def _call(**overrides):
    q, k, v = make_inputs(1, 7, 4, 2, 16, 8, [8])
    args = {"k_cache": k, "v_cache": v, "q_start": torch.tensor([0]), "kv_lens": torch.tensor([3])}
    args.update(overrides)
    return ops.cached_attention(q, args.pop("k_cache"), args.pop("v_cache"), **args)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"kv_lens": (8,)}, None),  # valid: the whole cache
        ({"kv_lens": (9,)}, r"kv_lens must lie in \[1, 9\), got 9 at kv_lens\[0\]"),
        ({"kv_lens": (0,)}, r"kv_lens must lie in \[1, 9\), got 0"),
        ({"q_start": (-1,)}, r"q_start must be >= 0, got -1"),
        ({"q_start": (0, 0)}, r"q_start must have shape \[1\] \(B\), got \[2\]"),
        ({"kv_lens": torch.tensor([3], dtype=torch.int32)}, r"kv_lens must have dtype int64"),
        ({"q_start": [0]}, r"q_start must be a torch.Tensor, got list"),
        ({"v_cache": torch.zeros(1, 8, 2, 8)}, r"v must have shape \[1, 8, 2, 16\]"),
        (
            {"k_cache": torch.zeros(1, 8, 3, 16), "v_cache": torch.zeros(1, 8, 3, 16)},
            r"query heads \(4\) must be a multiple of the KV heads \(3\)",
        ),
        ({"k_cache": torch.zeros(1, 8, 2, 16, dtype=torch.float64)}, r"k must have the dtype of q"),
        ({"backend": "cuda"}, r"backend 'cuda' unavailable"),
        ({"backend": "fast"}, r"backend must be one of"),
    ],
)
def test_bad_input_is_rejected(overrides, match):
    for key in ("q_start", "kv_lens"):
        if isinstance(overrides.get(key), tuple):
            overrides[key] = torch.tensor(overrides[key])
    if match is None:
        assert _call(**overrides).shape == (1, 7, 4, 16)
        return
    error = (ValueError, TypeError, BackendUnavailableError)
    with pytest.raises(error, match=match):
        _call(**overrides)


def test_value_checks_are_skipped_when_trusted():
    # Out-of-range lengths are the caller's promise inside trusted_values: no check (and no sync) runs.
    with ops.trusted_values():
        assert _call(q_start=torch.tensor([-1]), kv_lens=torch.tensor([0])).shape == (1, 7, 4, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(
    "shape",
    [
        (4, 1, 32, 8, 128, 4100, [1, 4100, 777, 2049]),  # Qwen3 decode, ragged caches
        (2, 300, 32, 8, 128, 700, [300, 650]),  # Qwen3 prefill, right-padded
        (64, 1, 4, 4, 128, 9, [1 + i % 9 for i in range(64)]),  # Block Decoder step
    ],
)
def test_cuda_matches_reference(shape, dtype):
    batch, q_len, heads, kv_heads, dim, cache_len, lens = shape
    q, k, v = make_inputs(
        batch, q_len, heads, kv_heads, dim, cache_len, lens, dtype=dtype, device="cuda"
    )
    starts = [max(0, n - q_len) for n in lens]
    assert ops.resolve_backend("cached_attention", "auto", q, k, v) == "triton"
    got = ops.cached_attention(
        q,
        k,
        v,
        q_start=torch.tensor(starts, device="cuda"),
        kv_lens=torch.tensor(lens, device="cuda"),
    )
    want = naive(q, k, v, starts, lens, True)
    error = (got.cpu().double() - want).abs().max().item()
    if dtype == torch.float32:
        assert error <= 1e-5
    else:
        budget = (eager_at_dtype(q, k, v, starts, lens, True).double() - want).abs().max().item()
        assert error <= 2 * budget + 1e-5, f"error {error:.3g}, plain PyTorch {budget:.3g}"


@pytest.mark.gpu
def test_cuda_graph_replay_follows_device_lengths():
    # Captured once inside trusted_values (any host read would fail the capture), replayed for the next
    # decode step after the lengths were advanced in place on the device.
    lens = [5, 1000, 77]
    q, k, v = make_inputs(3, 1, 32, 8, 128, 1024, [1024] * 3, dtype=torch.bfloat16, device="cuda")
    kv_lens = torch.tensor(lens, device="cuda")
    q_start = kv_lens - 1
    with ops.trusted_values():
        ops.cached_attention(q, k, v, q_start=q_start, kv_lens=kv_lens)  # compile outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = ops.cached_attention(q, k, v, q_start=q_start, kv_lens=kv_lens)
    for step in range(3):
        kv_lens += 1
        q_start += 1
        graph.replay()
        want = ops.cached_attention(q, k, v, q_start=q_start, kv_lens=kv_lens, backend="torch")
        torch.testing.assert_close(out, want, rtol=0, atol=2e-2, msg=f"step {step}")
