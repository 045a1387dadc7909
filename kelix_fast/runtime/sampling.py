"""Selection of block tokens from logits rows: greedy, or temperature / top-k / top-p sampling.

Sampling draws from the official ``_sample_group`` filters (kelix-ar.md §5.6), whose one copy is
:func:`kelix_fast.ops.selection.filter_logits`. Ties are broken towards the lower id everywhere (stable
sorts), so ``top_k=1`` is exactly ``argmax`` with the first index and consumes no randomness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kelix_fast.ops.selection import filter_logits

SAMPLERS = ("sequential", "reference")


@dataclass(frozen=True)
class SamplingParams:
    """temperature >= 0; top_k >= 0 (0 = no top-k filter); top_p in (0, 1] (1 = no top-p filter)."""

    temperature: float = 1.0
    top_k: int = 1
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)):
            raise TypeError(f"temperature must be a number, got {type(self.temperature).__name__}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise TypeError(f"top_k must be an int, got {type(self.top_k).__name__}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)):
            raise TypeError(f"top_p must be a number, got {type(self.top_p).__name__}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.top_k == 1


def select(
    logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """One id per row of logits [M, V]: argmax (first index) if greedy, else a draw with ``generators[m]``."""
    if params.greedy:
        return logits.argmax(dim=-1)
    filtered = filter_logits(
        logits, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p
    )
    probs = torch.softmax(filtered, dim=-1)
    return torch.cat(
        [torch.multinomial(probs[m], 1, generator=generators[m]) for m in range(probs.shape[0])]
    )
