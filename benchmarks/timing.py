"""Timers: CUDA events on a GPU (rotating input sets, so L2 is cold), ``time.perf_counter`` on the CPU.

Each timed call is bracketed on its own, so ``raw_ms`` holds one time per call. Inputs are built before
the timed region; the call's own output allocation is part of the op and is timed.

A point may run under a :class:`Deadline` (``--point-timeout``). The cap is cooperative: it is checked
after each warm-up call (a call in flight is never interrupted), and the probe call's time cuts the
timed repetitions to what fits before the deadline, so a slow point ends near its cap with fewer
samples, or raises :class:`PointTimeout` when not one timed call fits.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

MAX_SETS = 2048


@dataclass(frozen=True)
class Budget:
    """Warm-up calls, then as many timed calls as fit in ``target_s`` within [min_reps, max_reps]."""

    warmup: int
    min_reps: int
    max_reps: int
    target_s: float


FULL = Budget(warmup=5, min_reps=10, max_reps=200, target_s=0.5)
QUICK = Budget(warmup=1, min_reps=3, max_reps=5, target_s=0.05)


class PointTimeout(Exception):
    """A point ran past its cap before it could be timed; the message says where. Recorded as
    ``"timeout"`` and never repeated."""


@dataclass(frozen=True)
class Deadline:
    """A point's time cap, counted from when the deadline is made (the start of the point)."""

    cap_s: float
    start: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        """Seconds left before the cap (negative once past it)."""
        return self.start + self.cap_s - time.monotonic()

    def check(self, what: str) -> None:
        """Raise :class:`PointTimeout` if the cap has passed; ``what`` names the step that just ended."""
        over = -self.remaining()
        if over > 0:
            raise PointTimeout(f"{what} ended {over:.2f} s past the point's {self.cap_s:g} s cap")


NO_DEADLINE = Deadline(math.inf)


def rotating_sets(call_bytes: int, l2_bytes: int) -> int:
    """Input sets to cycle through so that each set's data left L2 before it comes back: the other
    sets together touch at least twice the L2 size (capped at :data:`MAX_SETS`)."""
    if l2_bytes <= 0:
        return 1
    return min(MAX_SETS, 1 + math.ceil(2 * l2_bytes / max(1, call_bytes)))


def summarize(raw_ms: Sequence[float]) -> dict[str, Any]:
    """Median, p20, p80 (inclusive quantiles) and the raw times, in milliseconds."""
    ordered = sorted(raw_ms)
    if len(ordered) == 1:
        p20 = p80 = ordered[0]
    else:
        deciles = statistics.quantiles(ordered, n=10, method="inclusive")
        p20, p80 = deciles[1], deciles[7]
    return {
        "median_ms": statistics.median(ordered),
        "p20_ms": p20,
        "p80_ms": p80,
        "raw_ms": list(raw_ms),
    }


def _reps(estimate_s: float, budget: Budget, deadline: Deadline) -> int:
    """Timed calls for one call of ``estimate_s``: the budget's count, cut to what fits the deadline."""
    estimate_s = max(estimate_s, 1e-9)
    reps = max(budget.min_reps, min(budget.max_reps, int(budget.target_s / estimate_s)))
    fits = deadline.remaining() / estimate_s
    if fits < 1:
        raise PointTimeout(
            f"no timed call fits the point's {deadline.cap_s:g} s cap after the probe call "
            f"({max(deadline.remaining(), 0.0):.2f} s left, {estimate_s:.2f} s per call)"
        )
    return reps if fits >= reps else int(fits)


def time_cuda(
    fn: Callable[[Any], object],
    sets: Sequence[Any],
    budget: Budget,
    deadline: Deadline = NO_DEADLINE,
) -> list[float]:
    """Per-call CUDA-event times (ms) of ``fn(sets[i % len(sets)])`` after ``budget.warmup`` calls."""
    count = 0

    def call() -> None:
        nonlocal count
        fn(sets[count % len(sets)])
        count += 1

    for i in range(budget.warmup):
        call()
        torch.cuda.synchronize()  # the cap is checked on finished work, not on queued launches
        deadline.check(f"warm-up call {i + 1} of {budget.warmup}")
    probe_start, probe_end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    probe_start.record()
    call()
    probe_end.record()
    torch.cuda.synchronize()
    reps = _reps(probe_start.elapsed_time(probe_end) / 1e3, budget, deadline)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def time_cpu(
    fn: Callable[[Any], object],
    sets: Sequence[Any],
    budget: Budget,
    deadline: Deadline = NO_DEADLINE,
) -> list[float]:
    """Per-call wall times (ms, ``time.perf_counter``) of ``fn`` on the CPU after the warm-up."""
    for i in range(budget.warmup):
        fn(sets[i % len(sets)])
        deadline.check(f"warm-up call {i + 1} of {budget.warmup}")
    begin = time.perf_counter()
    fn(sets[0])
    reps = _reps(time.perf_counter() - begin, budget, deadline)
    raw = []
    for i in range(reps):
        begin = time.perf_counter()
        fn(sets[i % len(sets)])
        raw.append((time.perf_counter() - begin) * 1e3)
    return raw
