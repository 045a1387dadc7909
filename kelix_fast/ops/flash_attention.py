"""``attention``: softmax attention over packed variable-length sequences with block-structured masks.

Backends: ``triton`` (``kelix_fast.triton_kernels.flash_attention``: flash attention, online softmax in
float32, no [T, T] scores, masked-out key tiles never read) and the PyTorch reference ``torch`` (the spec:
a dense boolean mask per sequence); ``"auto"`` prefers triton for CUDA tensors. GQA without expanding
K/V: query head ``h`` reads KV head ``h // (H / Hkv)``. The shared checks and the masked softmax
reference also serve :mod:`kelix_fast.ops.decode_attention`.

Users in Kelix (kelix-ar.md §4.5, §8): the ViT (bidirectional within each image, ``cu_seqlens`` per image),
LLM prefill and packed training (causal, document-causal), and packed Block Decoder sequences
(§8 #5: every <= 9-slot sequence is independent and causal, i.e. one ``cu_seqlens`` entry per block with
``mask="causal"``). ``mask="block_causal"`` (own block whole, earlier blocks visible) is the generic
block-causal mask of block-autoregressive models; Kelix itself has none inside its LLM (§4.5).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from kelix_fast import triton_kernels
from kelix_fast.ops import _checks, _dispatch

_OP = "attention"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MASKS = ("bidirectional", "causal", "block_causal")
WITHIN_BLOCK = ("full", "causal")
_TRITON_MAX_HEAD_DIM = 256  # triton_kernels.flash_attention.MAX_HEAD_DIM (triton may be absent)
# Scores the reference materialises at once (float32, all heads of one query chunk): 512 MiB.
_REFERENCE_SCORES = 1 << 27


@dataclass(frozen=True)
class _Mask:
    """The validated mask arguments of one call (``masked_bias`` already rounded to the input dtype)."""

    kind: str
    block_size: int | None
    block_ids: torch.Tensor | None
    within_block: str
    key_mask: torch.Tensor | None
    masked_bias: float | None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None = None,
    mask: str = "bidirectional",
    block_size: int | None = None,
    block_ids: torch.Tensor | None = None,
    within_block: str = "full",
    key_mask: torch.Tensor | None = None,
    masked_bias: float | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention within each packed sequence: ``o = softmax(q k^T * scale + bias, visible keys) v``.

    Sequence ``s`` is rows ``cu_seqlens[s]:cu_seqlens[s+1]``; nothing attends across sequences. With
    positions ``i`` (query) and ``j`` (key) counted from the start of their sequence, ``mask`` says which
    keys a query sees:

    * ``"bidirectional"``: every key of its sequence (the ViT: one sequence per image);
    * ``"causal"``: ``j <= i`` (LLM prefill; a pack of documents is document-causal);
    * ``"block_causal"``: every key of its own block and of the earlier blocks, ``block(j) <= block(i)``.
      Blocks are ``block_size`` consecutive tokens from the sequence start (the last one may be short),
      or runs of equal ``block_ids``. With ``within_block="full"`` (the default) a query also sees the
      *later* keys of its own block: this is the mode that differs from ``"causal"``. With
      ``within_block="causal"`` it sees only ``j <= i`` inside its own block, which together with the
      whole earlier blocks is exactly ``"causal"``: accepted for callers that state it that way, and run
      as ``"causal"`` by the kernel. Independent causal blocks (e.g. the Block Decoder's 9-slot
      sequences packed together) are not a block mask: give each block its own ``cu_seqlens`` entry.

    ``key_mask`` removes keys on top of that: a False key is excluded (``masked_bias=None``) or keeps
    its place with the finite additive score bias ``masked_bias`` (e.g. the official -10000.0, first
    rounded to the input dtype like an official bias tensor: -9984 in bfloat16), so a row whose
    visible keys are all masked still averages their values instead of giving NaN. A query row that
    sees no key at all (possible only with ``key_mask`` and ``masked_bias=None``) outputs zeros.
    Scores, softmax and accumulation are float32.

    Args:
        q: [T, H, d]; k, v: [T, Hkv, d]; same dtype (float32/bfloat16/float16) and device; H % Hkv == 0.
        cu_seqlens: [n+1] int32/int64 on q's device, non-decreasing from 0 to T (empty sequences
            allowed).
        max_seqlen: an upper bound of the longest sequence (flash-attn's varlen argument): it sizes the
            kernel grid without reading ``cu_seqlens`` on the host. None computes it (one host read);
            required inside :func:`kelix_fast.ops.trusted_values`, where a value below the longest
            sequence leaves rows unwritten (undefined output).
        mask: ``"bidirectional" | "causal" | "block_causal"``.
        block_size: int >= 1, blocks of ``mask="block_causal"`` (exactly one of block_size/block_ids).
        block_ids: [T] int32/int64 on q's device, non-decreasing within each sequence: token t belongs
            to block ``block_ids[t]`` (compared only within its sequence).
        within_block: ``"full" | "causal"`` (``block_causal`` only; see above).
        key_mask: [T] bool on q's device, False = masked key.
        masked_bias: finite float or None (``key_mask`` only): see above.
        scale: softmax scale, default ``d ** -0.5``.
        backend: ``"auto" | "triton" | "torch"``. ``"auto"`` picks triton for CUDA tensors with
            d <= 256, else torch; triton on CPU tensors runs only when asked for by name under
            Triton's interpreter. See :func:`kelix_fast.ops.resolve_backend`.

    Returns:
        [T, H, d] in the dtype of ``q``.

    Raises:
        ValueError (bad input, naming the argument), TypeError (a wrong Python type),
        BackendUnavailableError (the backend cannot run here).
    """
    _check_qkv(_OP, q, k, v, packed=True)
    tokens = q.shape[0]
    _checks.tensor(_OP, "cu_seqlens", cu_seqlens)
    _checks.shape(_OP, "cu_seqlens", cu_seqlens, (None,), "num_seqs + 1")
    _checks.dtype(_OP, "cu_seqlens", cu_seqlens, (torch.int32, torch.int64))
    _checks.same_device(_OP, q=q, cu_seqlens=cu_seqlens)
    if cu_seqlens.shape[0] == 0:
        raise ValueError(f"{_OP}: cu_seqlens must hold at least one entry (0), got shape [0]")
    spec = _check_mask(q, mask, block_size, block_ids, within_block, key_mask, masked_bias)
    max_seqlen = _check_max_seqlen(max_seqlen, cu_seqlens, tokens)
    if spec.block_ids is not None and _checks.values_checked():
        _check_block_ids_order(spec.block_ids, cu_seqlens)
    scale = q.shape[-1] ** -0.5 if scale is None else _checks.number(_OP, "scale", scale)
    out = torch.empty_like(q)
    impl = _dispatch.pick(_OP, _ATTENTION_IMPLS, backend, q, k, v, cu_seqlens)
    impl.run(q, k, v, cu_seqlens, max_seqlen, spec, float(scale), out)
    return out


def _check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, packed: bool) -> None:
    dims = "T, H, d" if packed else "B, L, H, d"
    kv_dims = "T, Hkv, d" if packed else "B, S, Hkv, d"
    rank = 3 if packed else 4
    _checks.shape(op, "q", q, (None,) * rank, dims)
    lead = (q.shape[0],) if packed else (q.shape[0], None)
    _checks.shape(op, "k", k, (*lead, None, q.shape[-1]), kv_dims)
    _checks.shape(op, "v", v, tuple(k.shape), kv_dims)
    _checks.dtype(op, "q", q, _FLOAT_DTYPES)
    _checks.same_dtype(op, q=q, k=k, v=v)
    _checks.same_device(op, q=q, k=k, v=v)
    if min(q.shape[-2], k.shape[-2], q.shape[-1]) < 1:  # tokens may be 0 (an empty pack), heads not
        raise ValueError(
            f"{op}: q and k must have at least one head and one head dim (H, Hkv, d >= 1), got q "
            f"{list(q.shape)} and k {list(k.shape)}"
        )
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(
            f"{op}: the query heads ({q.shape[-2]}) must be a multiple of the KV heads ({k.shape[-2]})"
        )


def _check_mask(q, mask, block_size, block_ids, within_block, key_mask, masked_bias) -> _Mask:
    """Argument checks of the mask parameters (no tensor values read)."""
    tokens = q.shape[0]
    if mask not in MASKS:
        raise ValueError(f"{_OP}: mask must be one of {list(MASKS)}, got {mask!r}")
    if within_block not in WITHIN_BLOCK:
        raise ValueError(
            f"{_OP}: within_block must be one of {list(WITHIN_BLOCK)}, got {within_block!r}"
        )
    if mask == "block_causal":
        if (block_size is None) == (block_ids is None):
            raise ValueError(
                f"{_OP}: mask='block_causal' needs exactly one of block_size and block_ids, got "
                f"{'both' if block_size is not None else 'neither'}"
            )
    else:
        for name, value in (("block_size", block_size), ("block_ids", block_ids)):
            if value is not None:
                raise ValueError(
                    f"{_OP}: {name} must be None unless mask='block_causal', got mask={mask!r}"
                )
        if within_block != "full":
            raise ValueError(
                f"{_OP}: within_block must be 'full' unless mask='block_causal', got {within_block!r}"
            )
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int):
            raise TypeError(f"{_OP}: block_size must be an int, got {type(block_size).__name__}")
        if block_size < 1:
            raise ValueError(f"{_OP}: block_size must be >= 1, got {block_size}")
    if block_ids is not None:
        _checks.tensor(_OP, "block_ids", block_ids)
        _checks.shape(_OP, "block_ids", block_ids, (tokens,), "T")
        _checks.dtype(_OP, "block_ids", block_ids, (torch.int32, torch.int64))
        _checks.same_device(_OP, q=q, block_ids=block_ids)
    if key_mask is not None:
        _checks.tensor(_OP, "key_mask", key_mask)
        _checks.shape(_OP, "key_mask", key_mask, (tokens,), "T")
        _checks.dtype(_OP, "key_mask", key_mask, (torch.bool,))
        _checks.same_device(_OP, q=q, key_mask=key_mask)
    if masked_bias is not None:
        if key_mask is None:
            raise ValueError(
                f"{_OP}: masked_bias must be None without a key_mask, got {masked_bias}"
            )
        if isinstance(masked_bias, bool) or not isinstance(masked_bias, (int, float)):
            raise TypeError(
                f"{_OP}: masked_bias must be a number, got {type(masked_bias).__name__}"
            )
        rounded = torch.tensor(float(masked_bias), dtype=q.dtype).item()
        if not math.isfinite(rounded):
            raise ValueError(
                f"{_OP}: masked_bias must be finite in {str(q.dtype).removeprefix('torch.')}, "
                f"got {masked_bias}"
            )
        masked_bias = rounded
    return _Mask(mask, block_size, block_ids, within_block, key_mask, masked_bias)


def _check_max_seqlen(max_seqlen: int | None, cu_seqlens: torch.Tensor, tokens: int) -> int:
    """The validated grid bound; reads ``cu_seqlens`` on the host unless values are trusted."""
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int):
            raise TypeError(
                f"{_OP}: max_seqlen must be an int or None, got {type(max_seqlen).__name__}"
            )
        if max_seqlen < 0:
            raise ValueError(f"{_OP}: max_seqlen must be >= 0, got {max_seqlen}")
        # An upper bound: no sequence is longer than the pack, and the grid is sized from it (a bound
        # of 2^31 would launch that many idle programs).
        max_seqlen = min(max_seqlen, tokens)
    if not _checks.values_checked():
        if max_seqlen is None:
            raise ValueError(
                f"{_OP}: max_seqlen must be given inside ops.trusted_values() or CUDA graph capture "
                "(computing it reads cu_seqlens on the host), got None"
            )
        return max_seqlen
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != tokens or any(a > b for a, b in itertools.pairwise(bounds)):
        raise ValueError(
            f"{_OP}: cu_seqlens must be non-decreasing from 0 to T={tokens}, got {bounds[:8]}"
            f"{'...' if len(bounds) > 8 else ''}"
        )
    longest = max((b - a for a, b in itertools.pairwise(bounds)), default=0)
    if max_seqlen is None:
        return longest
    if max_seqlen < longest:
        raise ValueError(
            f"{_OP}: max_seqlen must be at least the longest sequence ({longest}), got {max_seqlen}"
        )
    return max_seqlen


def _sequence_index(cu_seqlens: torch.Tensor, tokens: int) -> torch.Tensor:
    """[T] int64: the sequence of every token (empty sequences own none), on the device, no sync."""
    positions = torch.arange(tokens, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens.long(), positions, right=True) - 1


def _check_block_ids_order(block_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """block_ids must not decrease inside a sequence (one host read)."""
    tokens = block_ids.shape[0]
    if tokens < 2:
        return
    seq = _sequence_index(cu_seqlens, tokens)
    bad = (block_ids[1:] < block_ids[:-1]) & (seq[1:] == seq[:-1])
    if bool(bad.any()):
        t = int(torch.nonzero(bad)[0]) + 1
        raise ValueError(
            f"{_OP}: block_ids must be non-decreasing within each sequence, got "
            f"block_ids[{t}]={int(block_ids[t])} after block_ids[{t - 1}]={int(block_ids[t - 1])}"
        )


def _softmax_attention(q, k, v, mask, scale, *, bias=None) -> torch.Tensor:
    """q: [B, Lq, H, d], k/v: [B, S, Hkv, d], mask: [B, Lq, S] bool (True = attend) -> [B, Lq, H, d] fp32.

    ``bias``: None or float32 broadcastable to [B, Lq, S], added to the scaled scores of visible keys.
    GQA by a [B, Hkv, G, ...] view of the queries, so K/V are broadcast, never copied per query head.
    A row without any visible key is zero.
    """
    batch, q_len, heads, dim = q.shape
    kv_heads = k.shape[2]
    qf = q.float().view(batch, q_len, kv_heads, heads // kv_heads, dim).permute(0, 2, 3, 1, 4)
    kf = k.float().permute(0, 2, 1, 3)[:, :, None]  # [B, Hkv, 1, S, d]
    vf = v.float().permute(0, 2, 1, 3)[:, :, None]
    scores = (qf @ kf.transpose(-1, -2)) * scale  # [B, Hkv, G, Lq, S]
    if bias is not None:
        scores = scores + bias[:, None, None]
    scores = scores.masked_fill(~mask[:, None, None], -math.inf)
    probs = torch.softmax(scores, dim=-1).masked_fill(~mask.any(-1)[:, None, None, :, None], 0.0)
    out = probs @ vf  # [B, Hkv, G, Lq, d]
    return out.permute(0, 3, 1, 2, 4).reshape(batch, q_len, heads, dim)


def _visible(spec: _Mask, start: int, end: int, device: torch.device) -> torch.Tensor:
    """[n, n] bool: query i sees key j, the mask definitions of :func:`attention` taken literally."""
    n = end - start
    pos = torch.arange(n, device=device)
    causal = pos[None, :] <= pos[:, None]
    if spec.kind == "bidirectional":
        return torch.ones(n, n, dtype=torch.bool, device=device)
    if spec.kind == "causal":
        return causal
    blocks = pos // spec.block_size if spec.block_ids is None else spec.block_ids[start:end]
    earlier = blocks[None, :] < blocks[:, None]
    same = blocks[None, :] == blocks[:, None]
    return earlier | (same & causal) if spec.within_block == "causal" else earlier | same


def _attention_reference(q, k, v, cu_seqlens, max_seqlen, spec: _Mask, scale, out) -> None:
    del max_seqlen  # a grid bound of the kernel; the reference walks the sequences themselves
    heads = q.shape[1]
    for start, end in itertools.pairwise(cu_seqlens.tolist()):
        if end == start:
            continue
        visible = _visible(spec, start, end, q.device)
        bias = None
        if spec.key_mask is not None:
            keys = spec.key_mask[start:end]
            if spec.masked_bias is None:
                visible = visible & keys[None, :]
            else:
                bias = torch.where(keys, 0.0, spec.masked_bias)[None, None, :]  # [1, 1, n]
        seq = slice(start, end)
        k_seq, v_seq = k[None, seq], v[None, seq]
        chunk = max(1, _REFERENCE_SCORES // (heads * (end - start)))
        for row in range(start, end, chunk):  # bounded memory for long sequences; rows independent
            rows = slice(row, min(row + chunk, end))
            local = slice(row - start, rows.stop - start)
            out[rows] = _softmax_attention(
                q[None, rows], k_seq, v_seq, visible[None, local], scale, bias=bias
            )[0]


def _block_key_ends(block_ids: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[T] int32: per query, the end of the keys it sees under ``block_causal`` by ``block_ids`` with
    ``within_block="full"`` (the end of its block, relative to its sequence start), on the device
    without a host read."""
    tokens = block_ids.shape[0]
    seq = _sequence_index(cu_seqlens, tokens)
    positions = torch.arange(tokens, device=cu_seqlens.device)
    # The last token of a block: the sequence ends or the next id differs. A reversed running minimum
    # carries the first such index at or after every token to it.
    last = torch.ones(tokens, dtype=torch.bool, device=cu_seqlens.device)
    last[:-1] = (block_ids[1:] != block_ids[:-1]) | (seq[1:] != seq[:-1])
    marks = torch.where(last, positions + 1, tokens)
    block_end = marks.flip(0).cummin(0).values.flip(0)
    return (block_end - cu_seqlens.long()[seq]).int()


def _triton(q, k, v, cu_seqlens, max_seqlen, spec: _Mask, scale, out) -> None:
    kernels = triton_kernels.kernels_for("flash_attention", q)
    if q.shape[0] == 0:
        return
    # within_block="causal" sees exactly the keys of "causal" (earlier blocks whole, j <= i inside).
    # Blocks of block_size rows: the kernel computes each row's key end itself; runs of block_ids
    # need the table (several device ops per call).
    key_end = block_size = None
    if spec.kind == "block_causal" and spec.within_block == "full":
        if spec.block_ids is None:
            block_size = spec.block_size
        else:
            key_end = _block_key_ends(spec.block_ids, cu_seqlens)
    kernels.flash_attention(
        q,
        k,
        v,
        cu_seqlens,
        key_end,
        spec.key_mask,
        out,
        max_seqlen=max_seqlen,
        causal=spec.kind != "bidirectional",
        scale=scale,
        masked_bias=spec.masked_bias,
        block_size=block_size,
    )


def _triton_can_run(q: torch.Tensor, *tensors: torch.Tensor) -> str | None:
    return _dispatch.head_dim_over(q, _TRITON_MAX_HEAD_DIM) or _dispatch.needs_triton(q, *tensors)


_ATTENTION_IMPLS = {
    "triton": _dispatch.Impl(_triton, can_run=_triton_can_run, auto_can_run=_dispatch.on_cuda),
    "torch": _dispatch.Impl(_attention_reference, can_run=_dispatch.always),
}
