"""Checks of arguments, one per kind of argument (scalars, and the finiteness of tensor data), shared
by every layer: the ops, the processor, the presets, the runtime and the public entry points. ``name``
is the argument as the caller's message should name it (``"seed"``, ``"rms_norm: eps"``); each check
raises ``TypeError`` for a wrong Python type and ``ValueError`` for a value out of range, naming
``name``, the expected value and the value got, and computes nothing.

Integers are Python ints or numpy integer scalars, never bools (``True`` is an ``int`` in Python, and
a flag passed where a count or an id belongs is a caller's bug, not the value 1).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

# Seeds of torch generators (initial noise, random weights): torch takes [-2^63, 2^64) and folds a
# negative seed onto 2^64 + s, so -1 would silently equal 2^64 - 1; only [0, 2^63) is accepted.
GENERATOR_SEED_BITS = 63


def describe(value: object) -> str:
    """``value`` for a message: its type and a short repr (``float 2.5``, ``str '3'``)."""
    return f"{type(value).__name__} {value!r:.60}"


def is_int(value: object) -> bool:
    """Whether ``value`` is an integer argument: a Python int or a numpy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(
    name: str, value: object, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    """An integer in ``[minimum, maximum]`` (either bound optional) -> a Python int."""
    if minimum is not None and maximum is not None:
        expected = f"an int in [{_bound(minimum)}, {_bound(maximum)}]"
    elif minimum is not None:
        expected = f"an int >= {_bound(minimum)}"
    elif maximum is not None:
        expected = f"an int <= {_bound(maximum)}"
    else:
        expected = "an int"
    if not is_int(value):
        raise TypeError(f"{name} must be {expected}, got {describe(value)}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def _bound(value: int) -> str:
    """A range bound for a message: 2^63 - 1 rather than 9223372036854775807."""
    if value >= 2**31 and value & (value + 1) == 0:
        return f"2^{value.bit_length()} - 1"
    return str(value)


def check_seed(name: str, value: object, *, bits: int = GENERATOR_SEED_BITS, count: int = 1) -> int:
    """A seed s in [0, 2^bits) -> s as a Python int. ``count`` > 1: s stands for the seeds
    s .. s + count - 1 (one per image of a batch), which must all lie in that range."""
    span = (
        f"[0, 2^{bits})"
        if count == 1
        else f"[0, 2^{bits} - {count}] (one per item: s .. s + {count - 1})"
    )
    if not is_int(value):
        raise TypeError(f"{name} must be an int in {span}, got {describe(value)}")
    if not 0 <= value <= 2**bits - count:
        raise ValueError(f"{name} must be an int in {span}, got {value!r}")
    return int(value)


def check_bool(name: str, value: object) -> bool:
    """A flag: ``True`` or ``False`` only (``1``, ``"yes"`` or ``None`` would be read as truthy or
    falsy without saying so)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {describe(value)}")
    return value


def check_callable(name: str, value: Any) -> None:
    """An optional callback: None or something callable (else it would fail only when first called,
    after the work it was meant to follow)."""
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable or None, got {describe(value)}")


def check_finite_number(
    name: str, value: object, *, minimum: float | None = None, strict: bool = False
) -> float:
    """A finite real number (an int, a float or a numpy scalar; not a bool) -> a Python float.

    ``minimum``: the smallest allowed value (``strict``: excluded). Used for the scalar sampling
    arguments (``guidance_scale``, ``shift``, ``temperature``) and the ops' ``eps`` and ``scale``: a
    NaN would flow through the arithmetic and come out as valid-looking ids or a NaN image.
    """
    bound = "" if minimum is None else f" {'>' if strict else '>='} {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number{bound}, got {describe(value)}")
    in_range = minimum is None or (value > minimum if strict else value >= minimum)
    if not math.isfinite(value) or not in_range:
        raise ValueError(f"{name} must be a finite number{bound}, got {value!r}")
    return float(value)


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise ValueError naming ``name`` when the float tensor ``value`` holds a NaN or an infinity.

    The one check of non-finite tensor data (pixel values, noise, conditions), run before any compute:
    a NaN would otherwise flow through tokenizing or sampling and come out as valid-looking ids or a
    NaN image. Integer tensors are finite by construction and pass.
    """
    floating = isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex())
    if floating and not bool(torch.isfinite(value).all()):
        nan = int(torch.isnan(value).sum())
        inf = int(torch.isinf(value).sum())
        raise ValueError(
            f"{name} must hold only finite values, got {nan} NaN and {inf} infinite of "
            f"{value.numel()}"
        )
