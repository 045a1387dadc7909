"""Input validation shared by the ops. Messages follow ``"<op>: <argument> must <requirement>, got <actual>"``.

Every check runs before any kernel launch; ``ValueError`` for shape, dtype, device and range problems,
``TypeError`` for a wrong Python type (STYLE.md §7).

Checks of tensor *values* (id ranges, sequence bounds) read the tensor on the host, which synchronises with
the device. The engine's decode loop feeds the ops ids it produced itself, step after step, and must not
stall inside a block nor synchronise under CUDA graph capture: it runs inside :func:`trusted_values`, which
turns the value checks off (shape, dtype, device and argument checks always run).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch

from kelix_fast.arguments import check_bool, check_finite, check_finite_number, check_int

_VALUE_CHECKS = contextvars.ContextVar("kelix_fast_value_checks", default=True)


@contextlib.contextmanager
def trusted_values() -> Iterator[None]:
    """Within this scope the ops skip the checks that read tensor values on the host (no device sync).

    For callers whose index tensors come from the engine itself (ids selected by ``head_select``, cache
    lengths it advanced). Out-of-range values are then undefined behaviour, as in any kernel library.
    """
    token = _VALUE_CHECKS.set(False)
    try:
        yield
    finally:
        _VALUE_CHECKS.reset(token)


def values_checked() -> bool:
    """Whether value checks run: outside :func:`trusted_values` and not during CUDA graph capture."""
    if not _VALUE_CHECKS.get():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def finite(op: str, name: str, t: torch.Tensor) -> None:
    """Float data ``t`` must hold no NaN or infinity (:func:`kelix_fast.arguments.check_finite`), as a
    value check: one host read, skipped inside :func:`trusted_values`. A NaN would otherwise come out
    as a valid-looking id, or fail deep inside a backend (``torch.multinomial``) with a message that
    names nothing of the caller's."""
    if values_checked():
        check_finite(f"{op}: {name}", t)


def _shape(t: torch.Tensor) -> str:
    return f"[{', '.join(str(s) for s in t.shape)}]"


def tensor(op: str, name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def shape(
    op: str, name: str, t: torch.Tensor, expected: Sequence[int | None], what: str = ""
) -> None:
    """``t.shape`` must equal ``expected`` (``None`` matches any size); ``what`` names the dims."""
    tensor(op, name, t)
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
        raise ValueError(
            f"{op}: {name} must have shape {want}{f' ({what})' if what else ''}, got {_shape(t)}"
        )


def no_empty_dim(op: str, name: str, t: torch.Tensor, what: str) -> None:
    """Every dim of ``t`` (named by ``what``) must be >= 1: an empty codebook or table has no nearest
    code or row to give, and a kernel would return its offsets as if it had found one."""
    if 0 in t.shape:
        raise ValueError(f"{op}: {name} must have no empty dim ({what}), got shape {_shape(t)}")


def number(
    op: str, name: str, value: object, *, minimum: float | None = None, strict: bool = False
) -> float:
    """A scalar argument such as ``eps``, ``scale`` or ``temperature``: a finite real number, not a
    bool, ``>= minimum`` (``> minimum`` if ``strict``) -> float. TypeError for a non-number."""
    return check_finite_number(f"{op}: {name}", value, minimum=minimum, strict=strict)


INT64_MAX = 2**63 - 1


def non_negative_int(op: str, name: str, value: object, *, maximum: int = INT64_MAX) -> int:
    """A scalar id, offset or count (``vocab_offset``, ``q_eos``, ``top_k``): an int in
    ``[0, maximum]``, not a bool -> int. TypeError for a non-integer. The default bound is int64's:
    ids are compared with, and added to, int64 tensors (2^64 would overflow inside torch)."""
    return check_int(f"{op}: {name}", value, minimum=0, maximum=maximum)


def flag(op: str, name: str, value: object) -> bool:
    """A boolean argument (``causal``): True or False only. TypeError otherwise."""
    return check_bool(f"{op}: {name}", value)


def dtype(op: str, name: str, t: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise ValueError(
            f"{op}: {name} must have dtype {names}, got {str(t.dtype).removeprefix('torch.')}"
        )


def same_dtype(op: str, **tensors: torch.Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.dtype != first.dtype:
            raise ValueError(
                f"{op}: {name} must have the dtype of {first_name} ({first.dtype}), got {t.dtype}"
            )


def same_device(op: str, **tensors: torch.Tensor) -> None:
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(
                f"{op}: {name} must be on the device of {first_name} ({first.device}), got {t.device}"
            )


def ids_in_range(op: str, name: str, ids: torch.Tensor, low: int, high: int) -> None:
    """Every id must lie in ``[low, high)``; the message gives the first offending value and index.

    Skipped inside :func:`trusted_values` (it synchronises with the device).
    """
    if ids.numel() == 0 or not values_checked():
        return
    bad = (ids < low) | (ids >= high)
    if bool(bad.any()):
        index = tuple(int(i) for i in torch.nonzero(bad)[0])
        value = int(ids[index])
        where = ", ".join(str(i) for i in index)
        raise ValueError(
            f"{op}: {name} must lie in [{low}, {high}), got {value} at {name}[{where}]"
        )
