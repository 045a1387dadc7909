"""Timers: CUDA events on a GPU (rotating input sets, so L2 is cold), ``time.perf_counter`` on the CPU.

Each timed call is bracketed on its own, so ``raw_ms`` holds one time per call. Inputs are built before
the timed region; the call's own output allocation is part of the op and is timed.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


def _reps(estimate_s: float, budget: Budget) -> int:
    wanted = int(budget.target_s / max(estimate_s, 1e-9))
    return max(budget.min_reps, min(budget.max_reps, wanted))


def time_cuda(fn: Callable[[Any], object], sets: Sequence[Any], budget: Budget) -> list[float]:
    """Per-call CUDA-event times (ms) of ``fn(sets[i % len(sets)])`` after ``budget.warmup`` calls."""
    count = 0

    def call() -> None:
        nonlocal count
        fn(sets[count % len(sets)])
        count += 1

    for _ in range(budget.warmup):
        call()
    torch.cuda.synchronize()
    probe_start, probe_end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    probe_start.record()
    call()
    probe_end.record()
    torch.cuda.synchronize()
    reps = _reps(probe_start.elapsed_time(probe_end) / 1e3, budget)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for start, end in zip(starts, ends):
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in zip(starts, ends)]


def time_cpu(fn: Callable[[Any], object], sets: Sequence[Any], budget: Budget) -> list[float]:
    """Per-call wall times (ms, ``time.perf_counter``) of ``fn`` on the CPU after the warm-up."""
    for i in range(budget.warmup):
        fn(sets[i % len(sets)])
    begin = time.perf_counter()
    fn(sets[0])
    reps = _reps(time.perf_counter() - begin, budget)
    raw = []
    for i in range(reps):
        begin = time.perf_counter()
        fn(sets[i % len(sets)])
        raw.append((time.perf_counter() - begin) * 1e3)
    return raw
