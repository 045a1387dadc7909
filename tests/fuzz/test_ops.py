"""Fuzz of the ops (kelix_fast.ops) with ``backend="torch"`` and ``backend="triton"`` on CPU tensors
(Triton's interpreter: milliseconds per program, so its examples are few and tiny).

Each op's strategy draws tiny valid arguments and then, most of the time, spoils one of them (a
wrong shape, dtype, type, a non-finite or out-of-range scalar). The oracle is oracle.py's: a result of
the documented shape and dtype, ids in range, and no NaN from finite inputs; or a documented refusal.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kelix_fast import ops
from tests.fuzz.oracle import (
    HOSTILE,
    HOSTILE_FLOATS,
    HOSTILE_INTS,
    all_finite,
    arguments,
    call,
    check_tensor,
    refused,
    shapes_near,
    tensors,
)
from tests.fuzz.profiles import budget

FLOATS = (torch.float32, torch.bfloat16, torch.float16)
BAD_DTYPES = (torch.float64, torch.int64, torch.bool)


def spoiled(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> st.SearchStrategy[Any]:
    """A bad tensor in place of one of ``shape``/``dtype``: near-miss shape, bad dtype or no tensor."""
    return st.one_of(
        shapes_near(shape).flatmap(lambda s: tensors(s, dtype)),
        tensors(shape, dtype, dtypes=BAD_DTYPES),
        HOSTILE,
    )


# Each case: (op, valid arguments, spoilers, check(result, kwargs)). Sizes are tiny on purpose.


def check_codebook(ids: torch.Tensor, kw: dict[str, Any]) -> None:
    n, (groups, codes, _) = kw["z"].shape[0], kw["codebooks"].shape
    offset = kw["vocab_offset"]
    check_tensor("ids", ids, shape=(n, groups), dtype=torch.int64)
    for g in range(groups):  # sub-codebook g's ids lie in its own slice of the vocabulary
        check_tensor(
            f"ids[:, {g}]", ids[:, g], low=offset + g * codes, high=offset + (g + 1) * codes
        )


CODEBOOK = (
    ops.codebook_argmin,
    {
        "z": tensors((3, 2 * 4)),
        "ln_weight": tensors((2, 4), fills=("ones", "randn")),
        "ln_bias": tensors((2, 4), fills=("zeros", "randn")),
        "codebooks": tensors((2, 5, 4), fills=("randn", "zeros", "large")),
        "vocab_offset": st.integers(0, 1000),
        "mode": st.sampled_from(["exact", "reference"]),
        "eps": st.sampled_from([1e-5, 1e-6]),
    },
    {
        "z": spoiled((3, 8)),
        "ln_weight": spoiled((2, 4)),
        "ln_bias": spoiled((2, 4)),
        "codebooks": st.one_of(spoiled((2, 5, 4)), st.just(torch.zeros(2, 0, 4))),
        "codebook_sqnorms": st.one_of(tensors((2, 5)), spoiled((2, 5))),
        "vocab_offset": st.one_of(HOSTILE_INTS, st.just(2**62)),
        "mode": st.sampled_from(["fast", "", None, 1]),
        "eps": HOSTILE_FLOATS,
    },
    check_codebook,
)

V, D = 12, 6  # block_embed / head_select vocabulary and width


def check_embed(out: torch.Tensor, kw: dict[str, Any]) -> None:
    b, l_, _ = kw["ids"].shape
    width = kw["table"].shape[1]  # any table width is valid, not only D
    check_tensor(
        "out", out, shape=(b, l_, width), dtype=kw["table"].dtype, finite=all_finite(kw["table"])
    )


EMBED = (
    ops.block_embed,
    {
        "ids": st.integers(0, 2**16).map(
            lambda s: torch.randint(0, V, (2, 3, 5), generator=torch.Generator().manual_seed(s))
        ),
        "table": tensors((V, D), dtypes=FLOATS),
        "q_eos": st.integers(0, V - 1),
        "text_vocab": st.integers(0, V),
    },
    {
        "ids": st.one_of(spoiled((2, 3, 5), torch.int64), tensors((2, 3, 1), torch.int64)),
        "table": spoiled((V, D)),
        "q_eos": HOSTILE_INTS,
        "text_vocab": HOSTILE_INTS,
    },
    check_embed,
)


def check_select(ids: torch.Tensor, kw: dict[str, Any]) -> None:
    check_tensor("ids", ids, shape=(kw["y"].shape[0],), dtype=torch.int64, low=0, high=V)
    allowed = kw.get("allowed")
    if isinstance(allowed, torch.Tensor):
        for m, i in enumerate(ids.tolist()):
            assert any(lo <= i < hi for lo, hi in allowed[m].tolist()), f"row {m}: {i} not allowed"


SELECT = (
    ops.head_select,
    {
        "y": tensors((2, D)),
        "norm_weight": tensors((D,), fills=("ones", "randn")),
        "head": tensors((V, D), fills=("randn", "zeros", "large")),
        "eps": st.sampled_from([1e-6, 1e-5]),
        "temperature": st.floats(0.0, 2.0),
        "top_k": st.integers(0, V + 1),
        "top_p": st.floats(0.05, 1.0),
        "seeds": st.just(torch.tensor([0, 2**40])),
        "allowed": st.sampled_from([None, torch.tensor([[[0, 3], [5, 6]], [[11, 12], [0, 0]]])]),
    },
    {
        "y": spoiled((2, D)),
        "norm_weight": spoiled((D,)),
        "head": st.one_of(spoiled((V, D)), st.just(torch.zeros(0, D))),
        "eps": HOSTILE_FLOATS,
        "temperature": HOSTILE_FLOATS,
        "top_k": HOSTILE_INTS,
        "top_p": HOSTILE_FLOATS,
        "seeds": st.one_of(spoiled((2,), torch.int64), st.just(None)),
        "allowed": st.one_of(
            st.sampled_from(
                [
                    torch.tensor([[[3, 0]], [[0, 1]]]),
                    torch.tensor([[[0, 0]], [[0, 1]]]),
                    torch.tensor([[[0, V + 5]], [[0, 1]]]),
                    torch.tensor([[[-1, 2]], [[0, 1]]]),
                    torch.zeros(2, 0, 2, dtype=torch.int64),
                ]
            ),
            spoiled((2, 1, 2), torch.int64),
        ),
    },
    check_select,
)


def check_like_q(out: torch.Tensor, kw: dict[str, Any]) -> None:
    q = kw["q"]
    finite = all_finite(*kw.values())
    check_tensor("out", out, shape=tuple(q.shape), dtype=q.dtype, finite=finite)


T, H, HKV, DH = 5, 2, 1, 4  # tokens, heads, kv heads, head dim of the attention cases
ATTENTION = (
    ops.attention,
    {
        "q": tensors((T, H, DH), fills=("randn", "zeros", "large")),
        "k": tensors((T, HKV, DH), fills=("randn", "zeros", "large")),
        "v": tensors((T, HKV, DH)),
        "cu_seqlens": st.sampled_from(
            [
                torch.tensor([0, 5]),
                torch.tensor([0, 2, 5], dtype=torch.int32),
                torch.tensor([0, 0, 5]),
            ]
        ),
        "mask": st.sampled_from(["bidirectional", "causal"]),
        "scale": st.sampled_from([None, 0.5, 2]),
    },
    {
        "q": spoiled((T, H, DH)),
        "k": spoiled((T, HKV, DH)),
        "v": spoiled((T, HKV, DH)),
        "cu_seqlens": st.one_of(
            st.sampled_from(
                [
                    torch.tensor([0, 6]),
                    torch.tensor([0, 3, 2, 5]),
                    torch.tensor([1, 5]),
                    torch.tensor([0, -1, 5]),
                    torch.tensor([], dtype=torch.int64),
                    torch.tensor([0, 5], dtype=torch.float32),
                ]
            ),
            HOSTILE,
        ),
        "max_seqlen": st.one_of(HOSTILE_INTS, st.sampled_from([1, 5, 10**9])),
        "mask": st.sampled_from(["block_causal", "sliding", None, 1]),
        "block_size": st.one_of(st.integers(1, 3), HOSTILE_INTS),
        "block_ids": st.one_of(
            st.sampled_from([torch.tensor([0, 0, 1, 1, 2]), torch.tensor([0, 1, 0, 1, 0])]),
            HOSTILE,
        ),
        "key_mask": st.one_of(tensors((T,), torch.bool), spoiled((T,), torch.bool)),
        "masked_bias": st.one_of(st.just(-10000.0), HOSTILE_FLOATS),
        "scale": HOSTILE_FLOATS,
    },
    check_like_q,
)

B, S = 2, 6  # batch, cache length of cached_attention
CACHED = (
    ops.cached_attention,
    {
        "q": tensors((B, 2, H, DH)),
        "k_cache": tensors((B, S, HKV, DH)),
        "v_cache": tensors((B, S, HKV, DH)),
        "q_start": st.sampled_from([torch.tensor([0, 3]), torch.tensor([4, 0])]),
        "kv_lens": st.sampled_from([torch.tensor([2, 5]), torch.tensor([6, 1])]),
        "causal": st.booleans(),
        "scale": st.sampled_from([None, 0.5]),
    },
    {
        "q": spoiled((B, 2, H, DH)),
        "k_cache": spoiled((B, S, HKV, DH)),
        "v_cache": spoiled((B, S, HKV, DH)),
        "q_start": st.one_of(
            st.sampled_from([torch.tensor([-1, 0]), torch.tensor([2**40, 0])]),
            spoiled((B,), torch.int64),
        ),
        "kv_lens": st.one_of(
            st.sampled_from([torch.tensor([0, 1]), torch.tensor([S + 1, 1])]),
            spoiled((B,), torch.int64),
        ),
        "causal": st.sampled_from([None, "yes", 2]),
        "scale": HOSTILE_FLOATS,
    },
    check_like_q,
)


def check_norm(out: torch.Tensor, kw: dict[str, Any]) -> None:
    x = kw["x"]
    finite = all_finite(*kw.values())
    check_tensor("out", out, shape=tuple(x.shape), dtype=x.dtype, finite=finite)


NORM = (
    ops.rms_norm,
    {
        "x": tensors((3, 2, 8), dtypes=FLOATS[1:]),
        "weight": tensors((8,), fills=("ones", "randn")),
        "eps": st.sampled_from([1e-6, 1e-5, 0.1]),
    },
    {
        "x": st.one_of(spoiled((3, 2, 8)), st.just(torch.zeros(3, 0))),
        "weight": spoiled((8,)),
        "eps": st.one_of(HOSTILE_FLOATS, st.just(0.0)),
        "rope_cos": st.one_of(tensors((3, 4)), spoiled((3, 4))),
        "rope_sin": st.one_of(tensors((3, 4)), spoiled((3, 4))),
    },
    check_norm,
)
ROPE = (
    ops.rms_norm,
    {
        "x": tensors((3, 2, 8)),
        "weight": tensors((8,), fills=("ones", "randn")),
        "eps": st.just(1e-6),
        "rope_cos": tensors((3, 4), fills=("randn", "ones")),
        "rope_sin": tensors((3, 4), fills=("randn", "zeros")),
    },
    {
        "x": spoiled((3, 2, 8)),
        "rope_cos": spoiled((3, 4)),
        "rope_sin": st.one_of(spoiled((3, 4)), st.just(None)),
    },
    check_norm,
)
LINEAR = (
    ops.linear_attention,
    {
        "q": tensors((1, 4, 2, 4)),
        "k": tensors((1, 4, 2, 4)),
        "v": tensors((1, 4, 2, 4)),
        "eps": st.sampled_from([1e-8, 1e-15, 1.0]),
    },
    {
        "q": spoiled((1, 4, 2, 4)),
        "k": spoiled((1, 4, 2, 4)),
        "v": spoiled((1, 4, 2, 4)),
        "eps": st.one_of(HOSTILE_FLOATS, st.just(0.0)),
    },
    check_like_q,
)
CROSS = (
    ops.cross_attention,
    {
        "q": tensors((2, 3, 2, 4), dtypes=FLOATS[1:]),
        "k": tensors((2, 5, 2, 4)),
        "v": tensors((2, 5, 2, 4)),
        "key_mask": st.sampled_from(
            [
                torch.ones(2, 5, dtype=torch.bool),
                torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool),
            ]
        ),
        "scale": st.sampled_from([None, 0.25]),
    },
    {
        "q": spoiled((2, 3, 2, 4)),
        "k": st.one_of(spoiled((2, 5, 2, 4)), st.just(torch.zeros(2, 0, 2, 4))),
        "v": spoiled((2, 5, 2, 4)),
        "key_mask": spoiled((2, 5), torch.bool),
        "scale": HOSTILE_FLOATS,
    },
    check_like_q,
)

CASES: dict[str, tuple[Callable[..., Any], dict[str, Any], dict[str, Any], Callable]] = {
    "codebook_argmin": CODEBOOK,
    "block_embed": EMBED,
    "head_select": SELECT,
    "attention": ATTENTION,
    "cached_attention": CACHED,
    "rms_norm": NORM,
    "rms_norm_rope": ROPE,
    "linear_attention": LINEAR,
    "cross_attention": CROSS,
}


def same_dtypes(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Float tensors that should share the first float tensor's dtype get it (a dtype mismatch is
    then a deliberate spoiler, not the common case); ``rope_*`` stay float32, as documented."""
    first = next(
        (v.dtype for v in kwargs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()),
        None,
    )
    return {
        k: v.to(first)
        if isinstance(v, torch.Tensor) and v.dtype == torch.float32 and not k.startswith("rope")
        else v
        for k, v in kwargs.items()
    }


def run_case(name: str, backend: str, data: st.DataObject) -> None:
    op, valid, spoilers, check = CASES[name]
    kwargs = same_dtypes(data.draw(st.fixed_dictionaries(valid)))
    spoil = data.draw(arguments({}, spoilers))
    kwargs.update(spoil)
    out = call(op, **kwargs, backend=backend)
    if not refused(out):
        check(out, kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=budget(40))
@given(data=st.data())
def test_op_torch(name, data):
    run_case(name, "torch", data)


@pytest.mark.parametrize("name", sorted(CASES))
@settings(max_examples=budget(6), deadline=None)  # the interpreter's first launch of a kernel
@given(data=st.data())
def test_op_triton_interpreter(name, data):
    run_case(name, "triton", data)
