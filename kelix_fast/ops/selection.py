"""``head_select``: final RMSNorm + output head + token selection of the Block Decoder (kelix-ar.md §4.6,
§5.4-§5.6, §8 #3), without materialising the [M, V] logits in the fused backend.

Backends: ``cuda`` (``csrc/head_select.cu`` through ``kelix_fast._C``: one row, greedy and full-row
Gumbel-max sampling, the same keys and hash as triton), ``triton``
(``kelix_fast.triton_kernels.head_select``: vocabulary split across programs, per-split keys, a torch
merge of the tiny candidate set) and the PyTorch reference ``torch``; ``"auto"`` prefers cuda, then
triton, for CUDA tensors when they support the request (see ``backend`` below).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kelix_fast import triton_kernels
from kelix_fast.ops import _checks, _cuda, _dispatch
from kelix_fast.ops.norm import rms_norm_reference

_OP = "head_select"
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MAX_VOCAB = 2**31 - 1  # the triton backend packs ids into 31 bits
_TRITON_MAX_KEEP = 64  # triton_kernels.head_select.MAX_KEEP (not imported: triton may be absent)
# Head rows per float32 GEMM in the reference: bounds the upcast copy of the head.
_VOCAB_CHUNK = 8192


def head_select(
    y: torch.Tensor,
    norm_weight: torch.Tensor,
    head: torch.Tensor,
    *,
    eps: float,
    temperature: float = 1.0,
    top_k: int = 1,
    top_p: float = 1.0,
    seeds: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One id per row: ``select(filter(RMSNorm(y) @ head^T))``, greedy or sampled.

    ``logits[m] = rms_norm(y[m]) @ head^T`` with ``ops.rms_norm`` (normalise in float32,
    cast to y's dtype, times ``norm_weight`` in that dtype) and a float32 accumulation. The logits stay
    float32: unlike the official bf16 ``F.linear``, they are not rounded to the model dtype, so ties
    that only that rounding creates are not reproduced. Ids outside every ``allowed`` range score -inf.

    ``top_k == 1``: greedy, ``argmax`` with the first index on ties; no randomness, ``seeds`` unused.
    Otherwise one draw per row from ``softmax(filter_logits(logits))``, the official filters (divide by
    ``temperature + 1e-5`` when ``temperature > 0``; keep the top-k, ties to the lower id; the stricter
    top-p rule). The reference draws with ``torch.multinomial`` and a
    ``torch.Generator`` seeded by (a mix of all 64 bits of) the row's seed; triton draws by Gumbel-max with a counter-based hash
    of (seed, id). Both sample the same distribution, not the same draws; within one backend a row's
    draw depends only on its seed and its logits.

    Args:
        y: [M, D] float32/bfloat16/float16, last dim contiguous, row stride free. Block Decoder outputs.
        norm_weight: [D], dtype of ``y``. The final RMSNorm weight, epsilon ``eps`` (finite, > 0).
        head: [V, D], dtype of ``y``, last dim contiguous. The output head (``model.model.output``).
        temperature: finite, >= 0 (0: no scaling, and not greedy).
        top_k: >= 0; 1 is greedy, 0 or >= V disables the top-k filter.
        top_p: in (0, 1]; 1 disables the top-p filter.
        seeds: [M] int64, same device; required when ``top_k != 1``.
        allowed: [M, R, 2] int64 half-open id ranges ``[low, high)`` per row, same device, with
            ``0 <= low <= high <= V`` and at least one id per row; None allows every id. For
            ``scoring="structured"`` a visual slot passes R = 2: its sub-codebook slice and
            ``[q_eos, q_eos + 1)``. Checking the ranges reads them on the host (one synchronisation,
            skipped inside ``ops.trusted_values()``).
        backend: ``"auto" | "cuda" | "triton" | "torch"``. See
            :func:`kelix_fast.ops.resolve_backend`. cuda runs for CUDA tensors when kelix_fast._C is
            built, M == 1 (it scores on CUDA cores: measured slower than triton's tensor cores from
            M = 8 on, see ``ops._cuda``; M > 1 is refused), the request is greedy or full-row
            sampling (``top_p == 1``, no top-k filter) and the head's rows are 16-byte aligned;
            ``"auto"`` picks it then, else triton when the
            request is supported (greedy; full-row sampling; or at most 64 candidates:
            ``0 < top_k <= 64``, or V <= 64); else torch. cuda and triton draw the same ids up to
            float32 rounding of the scores. triton on CPU tensors runs only when asked for by name
            under Triton's interpreter. ``resolve_backend`` decides on the tensors only (a greedy
            request).

    Returns:
        ids: [M] int64 vocabulary ids.

    Raises:
        ValueError / TypeError: bad shapes, dtypes, devices, ranges or sampling parameters.
        BackendUnavailableError: the backend cannot run here or cannot honour the request.
    """
    _checks.tensor(_OP, "y", y)
    _checks.shape(_OP, "y", y, (None, None), "M, D")
    n_rows, dim = y.shape
    _checks.dtype(_OP, "y", y, _FLOAT_DTYPES)
    _checks.shape(_OP, "head", head, (None, dim), "V, D")
    _checks.shape(_OP, "norm_weight", norm_weight, (dim,), "D")
    _checks.same_dtype(_OP, y=y, norm_weight=norm_weight, head=head)
    _checks.same_device(_OP, y=y, norm_weight=norm_weight, head=head)
    _checks.finite(_OP, "y", y)
    # A pass over the head: skipped in trusted_values, where the engine calls it.
    _checks.finite(_OP, "head", head)
    vocab = head.shape[0]
    if not 0 < vocab <= _MAX_VOCAB:
        raise ValueError(f"{_OP}: head must have 1 to {_MAX_VOCAB} rows, got {vocab}")
    for name, t in (("y", y), ("head", head)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(
                f"{_OP}: {name} must have a contiguous last dim, got strides {tuple(t.stride())}"
            )
    # > 0: the final RMSNorm of an all-zero row would divide 0 by 0 (NaN) with eps = 0.
    eps = _checks.number(_OP, "eps", eps, minimum=0, strict=True)
    temperature = _checks.number(_OP, "temperature", temperature, minimum=0)
    top_k = _checks.non_negative_int(_OP, "top_k", top_k)
    top_p = _checks.number(_OP, "top_p", top_p)
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"{_OP}: top_p must lie in (0, 1], got {top_p}")
    if top_k != 1 and seeds is None:
        raise ValueError(f"{_OP}: seeds must be given when sampling (top_k != 1), got None")
    if seeds is not None:
        _checks.shape(_OP, "seeds", seeds, (n_rows,), "M")
        _checks.dtype(_OP, "seeds", seeds, (torch.int64,))
        _checks.same_device(_OP, y=y, seeds=seeds)
    if allowed is not None:
        _check_allowed(allowed, y, vocab)

    ids = torch.empty(n_rows, dtype=torch.int64, device=y.device)
    impl = _dispatch.pick(_OP, _request_impls(vocab, top_k, top_p), backend, y, head)
    impl.run(y, norm_weight, head, allowed, seeds, ids, eps, temperature, top_k, top_p)
    return ids


def _check_allowed(allowed: torch.Tensor, y: torch.Tensor, vocab: int) -> None:
    _checks.tensor(_OP, "allowed", allowed)
    _checks.shape(_OP, "allowed", allowed, (y.shape[0], None, 2), "M, R, [low, high)")
    _checks.dtype(_OP, "allowed", allowed, (torch.int64,))
    _checks.same_device(_OP, y=y, allowed=allowed)
    if allowed.shape[1] == 0:
        raise ValueError(
            f"{_OP}: allowed must have at least one range per row, got shape [*, 0, 2]"
        )
    if allowed.numel() == 0 or not _checks.values_checked():
        return
    _checks.ids_in_range(_OP, "allowed", allowed, 0, vocab + 1)
    low, high = allowed[..., 0], allowed[..., 1]
    if bool((low > high).any()):
        row, r = (int(i) for i in torch.nonzero(low > high)[0])
        raise ValueError(
            f"{_OP}: allowed ranges must have low <= high, got "
            f"[{int(low[row, r])}, {int(high[row, r])}) at allowed[{row}, {r}]"
        )
    empty = (high - low).sum(-1) == 0
    if bool(empty.any()):
        row = int(torch.nonzero(empty)[0])
        raise ValueError(f"{_OP}: allowed must leave at least one id per row, row {row} has none")


def filter_logits(
    logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """The official sampling filters, steps 1-3 of ``_sample_group`` (kelix-ar.md §5.6).

    ``[M, V] -> float32 [M, V]``, the filtered-out ids at -inf, then in order:

    1. ``temperature > 0``: divide by ``temperature + 1e-5``. 0 leaves the logits unscaled (and is *not*
       greedy: greedy is ``top_k == 1``).
    2. ``0 < top_k < V``: keep the ``top_k`` largest, ties to the lower id.
    3. ``top_p < 1``: in descending order, drop every id whose *inclusive* cumulative probability exceeds
       ``top_p``, except the most likely one. That is stricter than HF, which keeps the id that crosses.

    Every sampler of kelix_fast draws from these filters: ``head_select``'s torch reference and
    runtime/sampling.py sample ``softmax(filter_logits(...))``, and the triton and cuda backends of
    ``head_select`` draw from the same distribution without materialising it. Both sorts are stable, so
    every tie goes to the lower id. The parameters are not checked here: ``head_select`` and
    ``SamplingParams`` check them.

    Args:
        logits: [M, V], any float dtype; the filters run on a float32 copy.
        temperature: >= 0.
        top_k: >= 0; 0 or >= V disables the top-k filter.
        top_p: in (0, 1]; 1 disables the top-p filter.
    """
    x = logits.float()
    if temperature > 0:
        x = x / (temperature + 1e-5)
    order = None
    if 0 < top_k < x.shape[-1]:
        order = torch.sort(x, dim=-1, descending=True, stable=True).indices
        drop = torch.ones_like(x, dtype=torch.bool).scatter(-1, order[:, :top_k], False)
        x = x.masked_fill(drop, -math.inf)
    if top_p < 1.0:
        if order is None:  # after top-k the kept ids still lead ``order``, in the same order
            order = torch.sort(x, dim=-1, descending=True, stable=True).indices
        drop_sorted = torch.softmax(x.gather(-1, order), dim=-1).cumsum(-1) > top_p
        drop_sorted[:, 0] = False  # the most likely id always survives
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), -math.inf)
    return x


def _reference(y, norm_weight, head, allowed, seeds, ids, eps, temperature, top_k, top_p) -> None:
    normed = rms_norm_reference(y, norm_weight, eps).float()
    logits = torch.cat([F.linear(normed, chunk.float()) for chunk in head.split(_VOCAB_CHUNK)], -1)
    if allowed is not None:
        vocab_ids = torch.arange(head.shape[0], device=y.device)
        inside = (vocab_ids >= allowed[..., :1]) & (vocab_ids < allowed[..., 1:])  # [M, R, V]
        logits = logits.masked_fill(~inside.any(1), -math.inf)
    if top_k == 1:
        ids.copy_(logits.argmax(-1))  # the first index among equal maxima
        return
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    probs = torch.softmax(filtered, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # finite inputs whose logits overflow float32
        raise ValueError(
            f"{_OP}: the logits of y and head overflow float32 ({int((~logits.isfinite()).sum())} "
            "of them are not finite): there is no distribution to sample"
        )
    for m, seed in enumerate(seeds.tolist()):
        generator = torch.Generator(device=y.device).manual_seed(_generator_seed(seed))
        ids[m] = torch.multinomial(probs[m], 1, generator=generator)[0]


def _generator_seed(seed: int) -> int:
    """An int64 row seed -> a generator seed whose low 32 bits depend on all 64 (torch's CPU mt19937
    uses only the low 32 bits, so seeds differing in their high half would otherwise draw alike)."""
    seed &= 2**64 - 1
    return seed ^ ((seed >> 32) * 0x9E3779B97F4A7C15 & (2**64 - 1))


def _triton(y, norm_weight, head, allowed, seeds, ids, eps, temperature, top_k, top_p) -> None:
    kernels = triton_kernels.kernels_for("head_select", y)
    kernels.head_select(
        y,
        norm_weight,
        head,
        allowed,
        seeds,
        ids,
        eps=eps,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
    )


def fused_request_reason(vocab: int, top_k: int, top_p: float) -> str | None:
    """Why the triton kernels cannot honour this request, or None (they keep <= 64 candidates). Where
    they cannot, only the torch reference can: it materialises the logits and reads the seeds on the host."""
    keep = top_k if 0 < top_k < vocab else vocab
    if top_k == 1 or (keep == vocab and top_p == 1.0) or keep <= _TRITON_MAX_KEEP:
        return None
    return (
        f"it keeps at most {_TRITON_MAX_KEEP} candidates per row, so a top-k filter or top_p < 1 "
        f"needs 0 < top_k <= {_TRITON_MAX_KEEP} (or V <= {_TRITON_MAX_KEEP}), got top_k={top_k}, top_p={top_p}, V={vocab}"
    )


def _cuda_request(vocab: int, top_k: int, top_p: float) -> str | None:
    """Why the CUDA kernel cannot honour this request, or None (greedy or full-row Gumbel-max)."""
    if top_k == 1 or (not 0 < top_k < vocab and top_p == 1.0):
        return None
    return (
        f"it implements greedy (top_k=1) and full-row sampling (no top-k filter, top_p=1) only, "
        f"got top_k={top_k}, top_p={top_p}, V={vocab}"
    )


def _request_impls(vocab: int, top_k: int, top_p: float) -> dict[str, _dispatch.Impl]:
    """``_IMPLS``, each backend that cannot honour the request replaced by a refusal saying why."""
    reasons = {
        "cuda": _cuda_request(vocab, top_k, top_p),
        "triton": fused_request_reason(vocab, top_k, top_p),
    }
    if all(reason is None for reason in reasons.values()):
        return _IMPLS
    return {
        name: impl if reasons.get(name) is None else _refusal(impl, reasons[name])
        for name, impl in _IMPLS.items()
    }


def _refusal(impl: _dispatch.Impl, reason: str) -> _dispatch.Impl:
    return _dispatch.Impl(impl.run, can_run=lambda *_: reason)


_IMPLS = {
    "cuda": _dispatch.Impl(_cuda.head_select, can_run=_cuda.can_run_head_select),
    "triton": _dispatch.Impl(
        _triton, can_run=_dispatch.needs_triton, auto_can_run=_dispatch.on_cuda
    ),
    "torch": _dispatch.Impl(_reference, can_run=_dispatch.always),
}
