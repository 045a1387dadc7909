"""Backend selection for the ops: explicit, inspectable, never silent (STYLE.md §3).

Each op declares a table ``{backend: Impl}`` in preference order. An explicit backend runs or raises
:class:`BackendUnavailableError` with the reason; ``"auto"`` takes the first backend that can run and that
``"auto"`` may choose (``Impl.auto_can_run``: Triton on CPU tensors, its interpreter, runs only when asked
for by name).

:func:`use_backends` turns ``"auto"`` into an explicit choice per op for a scope, so a whole model can run
through one backend (e.g. the golden tests through the Triton interpreter) without threading a
``backend`` argument through every layer. An explicit ``backend=`` argument always wins.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")


_OVERRIDES: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar(
    "kelix_fast_backend_overrides", default=()
)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call here; the message says why."""


@contextlib.contextmanager
def use_backends(**choices: str) -> Iterator[None]:
    """Within this scope, ``backend="auto"`` calls of the named ops run the given backend, e.g.
    ``use_backends(attention="triton", head_select="torch")``; a call raises if that backend cannot
    run. ``kelix_fast.ops.use_backends`` also checks the op names."""
    for op, backend in choices.items():
        if backend not in BACKENDS or backend == "auto":
            raise ValueError(
                f"use_backends: {op} must name one of {list(BACKENDS[1:])}, got {backend!r}"
            )
    token = _OVERRIDES.set(tuple({**dict(_OVERRIDES.get()), **choices}.items()))
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


@dataclass(frozen=True)
class Impl:
    """One backend of an op: the function that fills the outputs, and a ``can_run`` probe.

    ``can_run(*tensors)`` returns ``None`` when the backend can run on these inputs, else the reason.
    ``auto_can_run``, when given, is an extra condition for ``backend="auto"`` only (same contract).
    """

    run: Callable[..., None]
    can_run: Callable[..., str | None]
    auto_can_run: Callable[..., str | None] | None = None


def always(*_: object) -> None:
    return None


def needs_triton(*tensors: torch.Tensor) -> str | None:
    """Probe of the ``triton`` backend: triton importable.

    CUDA tensors run the compiled kernels; CPU tensors run the same kernels under Triton's interpreter
    (``kelix_fast.triton_kernels.kernels_for``: a correctness tool at milliseconds per program, never a
    fast path, so ``"auto"`` never picks it: see :func:`on_cuda`).
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def head_dim_over(q: torch.Tensor, limit: int) -> str | None:
    """Part of an attention kernel's probe: its tiles hold a whole head, so ``q.shape[-1] <= limit``."""
    if q.shape[-1] > limit:
        return f"its kernel takes head dims up to {limit}, got d={q.shape[-1]}"
    return None


def on_cuda(*tensors: torch.Tensor) -> str | None:
    """``auto_can_run`` of a GPU backend that can also run elsewhere only as a slow test path."""
    if all(t.is_cuda for t in tensors):
        return None
    devices = sorted({str(t.device) for t in tensors if not t.is_cuda})
    return f"auto picks it for CUDA tensors only, got {', '.join(devices)} (ask for it by name)"


def pick(op: str, impls: Mapping[str, Impl], backend: str, *tensors: torch.Tensor) -> Impl:
    """The implementation of ``op`` to run for ``backend`` on ``tensors``, or raise why there is none."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {list(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        backend = dict(_OVERRIDES.get()).get(op, "auto")
    if backend == "auto":
        reasons = []
        for name, impl in impls.items():
            reason = impl.can_run(*tensors)
            if reason is None and impl.auto_can_run is not None:
                reason = impl.auto_can_run(*tensors)
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
