"""Input validation shared by the ops. Messages follow ``"<op>: <argument> must <requirement>, got <actual>"``.

Every check runs before any kernel launch; ``ValueError`` for shape, dtype, device and range problems,
``TypeError`` for a wrong Python type (STYLE.md §7).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


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
    """Every id must lie in ``[low, high)``; the message gives the first offending value and index."""
    if ids.numel() == 0:
        return
    bad = (ids < low) | (ids >= high)
    if bool(bad.any()):
        index = tuple(int(i) for i in torch.nonzero(bad)[0])
        value = int(ids[index])
        where = ", ".join(str(i) for i in index)
        raise ValueError(
            f"{op}: {name} must lie in [{low}, {high}), got {value} at {name}[{where}]"
        )
