"""The fuzz tests' oracle and their shared strategies.

Every call under test ends in one of two ways, and anything else fails the example:

* a valid result, which the test checks (shapes, dtypes, ids in range, no NaN in a float output
  computed from finite inputs);
* a refusal: an exception of a type the project documents (:data:`REFUSALS`: ``ValueError`` and
  ``TypeError``, which ``ConfigError``, ``CheckpointError`` and ``WeightsMismatchError`` extend,
  ``BackendUnavailableError``, ``StepFailed``; ``KeyError`` only where a test passes it for an API that
  documents it), whose message names something (is not empty).

An ``IndexError``, ``ZeroDivisionError``, ``OverflowError``, ``AssertionError``, a ``RuntimeError`` from
torch, a NaN output or a call still running after :data:`HANG_S` seconds is a bug.
"""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from hypothesis import event
from hypothesis import strategies as st

from kelix_fast import BackendUnavailableError
from kelix_fast.runtime.engine_core import StepFailed

REFUSALS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    BackendUnavailableError,
    StepFailed,
)
# A call of a tiny model or op takes well under a second; hypothesis's deadline reports a slow example
# after it ends, this one interrupts a call that never ends.
HANG_S = 60


class Hang(BaseException):
    """Raised into a call that ran past :data:`HANG_S` (a BaseException, so that no ``except
    Exception`` in the code under test swallows it)."""


class Refused:
    """A call that raised an allowed exception (kept for the tests that check what follows)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Refused({type(self.error).__name__}: {self.error})"


@contextlib.contextmanager
def hard_deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`Hang` in this (main) thread after ``seconds``."""

    def expire(signum: int, frame: Any) -> None:
        raise Hang(f"the call ran for more than {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def call(
    fn: Callable[..., Any],
    *args: Any,
    refusals: tuple[type[BaseException], ...] = REFUSALS,
    **kwargs: Any,
) -> Any:
    """``fn(*args, **kwargs)``: its result, or a :class:`Refused` for an allowed exception with a
    message. Any other exception propagates (the example fails with its traceback)."""
    name = getattr(fn, "__qualname__", type(fn).__name__)
    try:
        with hard_deadline(HANG_S):
            result = fn(*args, **kwargs)
    except refusals as err:
        event(f"{name}: {type(err).__name__}")
        message = str(err).strip().strip("'\"")
        if not message:
            raise AssertionError(
                f"{type(err).__name__} raised with an empty message: it names nothing"
            ) from err
        return Refused(err)
    event(f"{name}: result")  # --hypothesis-show-statistics: how often each call got through
    return result


def refused(result: Any) -> bool:
    return isinstance(result, Refused)


# --------------------------------------------------------------------------- checks of results


def check_tensor(
    name: str,
    value: Any,
    *,
    shape: tuple[int | None, ...] | None = None,
    dtype: torch.dtype | None = None,
    finite: bool = True,
    low: int | None = None,
    high: int | None = None,
) -> torch.Tensor:
    """``value`` is a tensor of ``shape`` (None: any size) and ``dtype``; float values finite when
    ``finite``; integer values in ``[low, high)`` when given."""
    assert isinstance(value, torch.Tensor), f"{name}: a {type(value).__name__}, not a tensor"
    if shape is not None:
        ok = value.dim() == len(shape) and all(
            e is None or e == s for e, s in zip(shape, value.shape)
        )
        assert ok, f"{name}: shape {list(value.shape)}, expected {list(shape)}"
    if dtype is not None:
        assert value.dtype == dtype, f"{name}: dtype {value.dtype}, expected {dtype}"
    if finite and value.is_floating_point() and value.numel():
        bad = ~torch.isfinite(value)
        assert not bool(bad.any()), (
            f"{name}: {int(bad.sum())} non-finite values from finite inputs, first at "
            f"{torch.nonzero(bad)[0].tolist()}"
        )
    if value.numel() and low is not None:
        assert int(value.min()) >= low, f"{name}: id {int(value.min())} < {low}"
    if value.numel() and high is not None:
        assert int(value.max()) < high, f"{name}: id {int(value.max())} >= {high}"
    return value


def all_finite(*values: Any) -> bool:
    """Whether every tensor's float values and every float among ``values`` are finite."""
    for v in values:
        if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
            if not bool(torch.isfinite(v).all()):
                return False
        elif isinstance(v, float) and not math.isfinite(v):
            return False
    return True


# --------------------------------------------------------------------------- strategies

NAN, INF = float("nan"), float("inf")
# Values that are wrong for almost any argument: every wrong type, and the numbers that break
# arithmetic. Tests add the argument's own near misses (0, -1, one past a bound).
HOSTILE = st.sampled_from(
    [
        None,
        True,
        False,
        -1,
        0,
        2**31,
        2**63,
        -(2**63) - 1,
        10**30,
        1.5,
        -0.0,
        NAN,
        INF,
        -INF,
        "1",
        "",
        b"1",
        [1],
        (),
        {},
        {"a": 1},
        np.int64(3),
        np.float32(0.5),
        torch.tensor(1),
        torch.tensor([1.0, 2.0]),
        torch.empty(0),
    ]
)
HOSTILE_INTS = st.sampled_from(
    [-1, 0, -(2**31), 2**31, 2**63, 2**64, 10**18, True, False, 1.0, 2.5, NAN, "3"]
)
HOSTILE_FLOATS = st.sampled_from([NAN, INF, -INF, -1.0, -1e-30, 0.0, 1e30, True, "0.5", None])


def maybe(
    valid: st.SearchStrategy[Any], *hostile: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """Mostly ``valid``, else one of ``hostile`` (default :data:`HOSTILE`)."""
    return st.one_of(valid, valid, *(hostile or (HOSTILE,)))


FILLS = ("randn", "zeros", "ones", "large", "nan", "inf")


def fill_tensor(shape: tuple[int, ...], dtype: torch.dtype, fill: str, seed: int) -> torch.Tensor:
    """A CPU tensor of ``shape``/``dtype`` filled as ``fill`` says (ints: in [-2, 40))."""
    g = torch.Generator().manual_seed(seed)
    if not dtype.is_floating_point:
        if dtype == torch.bool:
            return torch.rand(shape, generator=g) < 0.7
        return torch.randint(-2, 40, shape, generator=g).to(dtype)
    x = torch.randn(shape, generator=g)
    if fill == "zeros":
        x.zero_()
    elif fill == "ones":
        x.fill_(1.0)
    elif fill == "large":
        x *= 1e3
    elif fill in ("nan", "inf") and x.numel():
        x.view(-1)[int(torch.randint(x.numel(), (1,), generator=g))] = NAN if fill == "nan" else INF
    return x.to(dtype)


@st.composite
def tensors(
    draw: st.DrawFn,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    *,
    fills: tuple[str, ...] = FILLS,
    dtypes: tuple[torch.dtype, ...] = (),
) -> torch.Tensor:
    """A tensor of ``shape``, mostly of ``dtype`` (else one of ``dtypes``), filled as one of ``fills``."""
    if dtypes:
        dtype = draw(st.one_of(st.just(dtype), st.just(dtype), st.sampled_from(dtypes)))
    return fill_tensor(shape, dtype, draw(st.sampled_from(fills)), draw(st.integers(0, 2**16)))


def shapes_near(shape: tuple[int, ...]) -> st.SearchStrategy[tuple[int, ...]]:
    """``shape`` itself, or a near miss: a dim off by one or zero, one dim more or fewer."""

    @st.composite
    def near(draw: st.DrawFn) -> tuple[int, ...]:
        dims = list(shape)
        kind = draw(st.sampled_from(["same", "same", "same", "dim", "zero", "more", "fewer"]))
        if kind == "dim" and dims:
            i = draw(st.integers(0, len(dims) - 1))
            dims[i] = max(dims[i] + draw(st.sampled_from([-1, 1])), 0)
        elif kind == "zero" and dims:
            dims[draw(st.integers(0, len(dims) - 1))] = 0
        elif kind == "more":
            dims.append(draw(st.integers(1, 2)))
        elif kind == "fewer" and dims:
            dims.pop()
        return tuple(dims)

    return near()


@st.composite
def arguments(
    draw: st.DrawFn,
    valid: dict[str, st.SearchStrategy[Any]],
    hostile: dict[str, st.SearchStrategy[Any]],
) -> dict[str, Any]:
    """Keyword arguments: every one drawn from ``valid``, then none, one (most often) or two of them
    replaced by a draw from ``hostile``. One bad argument among good ones is what reaches each check
    (and each missing check) in turn; with every argument free to be bad, the first check refuses
    nearly every example."""
    kwargs = {name: draw(strategy) for name, strategy in valid.items()}
    count = draw(st.sampled_from([0, 1, 1, 1, 2]))
    names = draw(st.permutations(sorted(hostile)))[:count]
    for name in names:
        kwargs[name] = draw(hostile[name])
    return kwargs
