"""``ops.block_embed``: every rule of the group embedding (kelix-ar.md §4.4), quirks included."""

from __future__ import annotations

import pytest
import torch

from kelix_fast import ops, triton_kernels

TEXT_VOCAB, Q_EOS, V, D = 10, 9, 26, 5


@pytest.fixture
def table():
    return torch.randn(V, D, generator=torch.Generator().manual_seed(0))


def _embed(groups, table):
    return ops.block_embed(torch.tensor([groups]), table, q_eos=Q_EOS, text_vocab=TEXT_VOCAB)[0]


def test_group_rules(table):
    E = table
    groups = [
        [3, Q_EOS, Q_EOS, Q_EOS, Q_EOS, Q_EOS, Q_EOS, Q_EOS, Q_EOS],  # text block -> E[3]
        [10, 12, 14, 16, 18, 20, 22, 24, Q_EOS],  # visual block -> sum of the 8 rows
        [11, 13, Q_EOS, 15, 17, 19, 21, 23, Q_EOS],  # truncated visual block -> the prefix only
        [4, 7, 8, Q_EOS, 1, 1, 1, 1, Q_EOS],  # text-led, 3 leading ids -> 3 * E[4] (quirk)
        [Q_EOS, 3, 3, 3, 3, 3, 3, 3, Q_EOS],  # starts with the end-of-block -> zeros
        [
            5,
            6,
            7,
            8,
            1,
            2,
            3,
            4,
            0,
        ],  # no end-of-block: 8 slots of the text row, the last slot never counts
    ]
    want = torch.stack(
        [
            E[3],
            E[[10, 12, 14, 16, 18, 20, 22, 24]].sum(0),
            E[11] + E[13],
            3 * E[4],
            torch.zeros(D),
            8 * E[5],
        ]
    )
    torch.testing.assert_close(_embed(groups, table), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (2, 130)])
def test_awkward_shapes_match_a_per_group_loop(table, shape):
    gen = torch.Generator().manual_seed(shape[1])
    ids = torch.randint(0, V, (*shape, 9), generator=gen)
    ids[..., 0] = torch.where(torch.rand(shape, generator=gen) < 0.5, ids[..., 0], Q_EOS)
    out = ops.block_embed(ids, table, q_eos=Q_EOS, text_vocab=TEXT_VOCAB)
    for b in range(shape[0]):
        for i in range(shape[1]):
            g = ids[b, i].tolist()
            acc = torch.zeros(D)
            for j in range(8):
                if g[j] == Q_EOS:
                    break
                acc += table[g[j] if g[0] >= TEXT_VOCAB else g[0]]
            torch.testing.assert_close(out[b, i], acc, rtol=0, atol=1e-5)


def test_bfloat16_table_sums_in_float32(table):
    ids = torch.tensor([[[10, 11, 12, 13, 14, 15, 16, 17, Q_EOS]]])
    out = ops.block_embed(ids, table.bfloat16(), q_eos=Q_EOS, text_vocab=TEXT_VOCAB)
    assert out.dtype == torch.bfloat16
    want = table.bfloat16().float()[10:18].sum(0).bfloat16()
    assert torch.equal(out[0, 0], want)


@pytest.mark.parametrize(
    "ids, match",
    [
        (
            torch.full((1, 2, 9), V),
            r"block_embed: ids must lie in \[0, 26\), got 26 at ids\[0, 0, 0\]",
        ),
        (torch.tensor([[[0, 1, -3, 0, 0, 0, 0, 0, 0]]]), r"got -3 at ids\[0, 0, 2\]"),
        (
            torch.zeros(2, 9, dtype=torch.int64),
            r"ids must have shape \[\*, \*, \*\] \(B, L, G\+1\)",
        ),
        (torch.zeros(1, 2, 9, dtype=torch.int32), "ids must have dtype int64"),
    ],
)
def test_bad_ids_are_rejected(table, ids, match):
    with pytest.raises(ValueError, match=match):
        ops.block_embed(ids, table, q_eos=Q_EOS, text_vocab=TEXT_VOCAB)


# --- the triton backend (compiled on CUDA tensors, interpreted on CPU tensors) ---------------------------

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _random_groups(shape, seed):
    """Visual, text-led and q_eos-led groups, with q_eos at random places inside them."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (*shape, 9), generator=gen)
    ids[..., 0] = torch.where(torch.rand(shape, generator=gen) < 0.8, ids[..., 0], Q_EOS)
    return ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [5, 600])
@pytest.mark.parametrize("shape", [(1, 1), (2, 7), (1, 129)])
def test_triton_matches_reference(shape, dim, dtype, device):
    """D = 5 and 600 are no multiple of the 512-wide feature tile; same slot order, so bit-identical."""
    table = torch.randn(V, dim, generator=torch.Generator().manual_seed(dim)).to(device, dtype)
    ids = _random_groups(shape, seed=shape[1]).to(device)
    args = {"q_eos": Q_EOS, "text_vocab": TEXT_VOCAB}
    want = ops.block_embed(ids, table, **args, backend="torch")
    assert torch.equal(ops.block_embed(ids, table, **args, backend="triton"), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_launcher_writes_only_its_outputs(dtype, device):
    """Direct launch into a NaN-poisoned strided view; ids and table are strided views as well."""
    batch, length, dim = 2, 7, 37
    wide_table = torch.randn(V, 2 * dim, generator=torch.Generator().manual_seed(1))
    table = wide_table.to(device, dtype)[:, ::2]
    ids = _random_groups((length, batch), seed=4).to(device).transpose(0, 1)  # [B, L, 9], L-major
    poison = torch.full((batch, length + 1, dim + 3), float("nan"), dtype=dtype, device=device)
    out = poison[:, :length, :dim]
    kernels = triton_kernels.kernels_for("block_embed", table)
    kernels.block_embed(ids, table, out, q_eos=Q_EOS, text_vocab=TEXT_VOCAB)
    want = ops.block_embed(ids, table, q_eos=Q_EOS, text_vocab=TEXT_VOCAB, backend="torch")
    assert torch.equal(out, want)
    assert bool(poison[:, length:].isnan().all()) and bool(poison[..., dim:].isnan().all())


def test_triton_hand_worked_groups(table):
    """The quirks of test_group_rules, through the triton backend."""
    groups = [
        [3, Q_EOS, Q_EOS, Q_EOS, Q_EOS, Q_EOS, Q_EOS, Q_EOS, Q_EOS],
        [10, 12, 14, 16, 18, 20, 22, 24, Q_EOS],
        [11, 13, Q_EOS, 15, 17, 19, 21, 23, Q_EOS],
        [4, 7, 8, Q_EOS, 1, 1, 1, 1, Q_EOS],
        [Q_EOS, 3, 3, 3, 3, 3, 3, 3, Q_EOS],
        [5, 6, 7, 8, 1, 2, 3, 4, 0],
    ]
    ids = torch.tensor([groups])
    args = {"q_eos": Q_EOS, "text_vocab": TEXT_VOCAB}
    want = ops.block_embed(ids, table, **args, backend="torch")
    assert torch.equal(ops.block_embed(ids, table, **args, backend="triton"), want)


def test_auto_prefers_triton_only_for_cuda_tensors(table):
    ids = torch.zeros(1, 1, 9, dtype=torch.int64)
    assert ops.resolve_backend("block_embed", "auto", ids, table) == "torch"
    assert ops.resolve_backend("block_embed", "triton", ids, table) == "triton"
