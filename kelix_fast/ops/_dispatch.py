"""Backend selection for the ops: explicit, inspectable, never silent (STYLE.md §3).

Each op declares a table ``{backend: Impl}`` in preference order. An explicit backend runs or raises
:class:`BackendUnavailableError` with the reason; ``"auto"`` takes the first backend that can run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call here; the message says why."""


@dataclass(frozen=True)
class Impl:
    """One backend of an op: the function that fills the outputs, and a ``can_run`` probe.

    ``can_run(*tensors)`` returns ``None`` when the backend can run on these inputs, else the reason.
    """

    run: Callable[..., None]
    can_run: Callable[..., str | None]


def always(*_: object) -> None:
    return None


def pick(op: str, impls: Mapping[str, Impl], backend: str, *tensors: torch.Tensor) -> Impl:
    """The implementation of ``op`` to run for ``backend`` on ``tensors``, or raise why there is none."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        reasons = []
        for name, impl in impls.items():
            reason = impl.can_run(*tensors)
            if reason is None:
                return impl
            reasons.append(f"{name}: {reason}")
        raise BackendUnavailableError(f"{op}: no backend can run here ({'; '.join(reasons)})")
    impl = impls.get(backend)
    if impl is None:
        raise BackendUnavailableError(
            f"{op}: backend {backend!r} unavailable: not implemented for this op "
            f"(available: {list(impls)})"
        )
    reason = impl.can_run(*tensors)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {backend!r} unavailable: {reason}")
    return impl


def resolve(op: str, impls: Mapping[str, Impl], backend: str, *tensors: torch.Tensor) -> str:
    """The backend name ``pick`` would choose (for logs and benchmark records)."""
    chosen = pick(op, impls, backend, *tensors)
    return next(name for name, impl in impls.items() if impl is chosen)
