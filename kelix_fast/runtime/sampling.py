"""Selection of block tokens from logits rows: greedy, or temperature / top-k / top-p sampling.

The filters follow the official ``_sample_group`` (kelix-ar.md §5.6): logits are divided by
``temperature + 1e-5`` (temperature 0: no scaling, and *not* greedy), the top-k are kept, then the stricter
top-p rule drops every token whose inclusive cumulative probability exceeds ``top_p`` except the first.
Ties are broken towards the lower id everywhere (stable sorts), so ``top_k=1`` is exactly ``argmax`` with the
first index and consumes no randomness.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

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


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[M, V] -> float32 [M, V] with filtered-out entries at -inf (official ``_sample_group`` steps 1-3)."""
    x = logits.float()
    if params.temperature > 0:
        x = x / (params.temperature + 1e-5)
    vocab = x.shape[-1]
    order = None
    if 0 < params.top_k < vocab:
        order = torch.sort(x, dim=-1, descending=True, stable=True).indices
        drop = torch.ones_like(x, dtype=torch.bool).scatter(-1, order[:, : params.top_k], False)
        x = x.masked_fill(drop, -math.inf)
    if params.top_p < 1.0:
        if order is None:  # after top-k the kept ids still lead ``order``, in the same order
            order = torch.sort(x, dim=-1, descending=True, stable=True).indices
        sorted_probs = torch.softmax(x.gather(-1, order), dim=-1)
        drop_sorted = sorted_probs.cumsum(-1) > params.top_p
        drop_sorted[:, 0] = False  # the most likely token always survives
        x = x.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), -math.inf)
    return x


def select(
    logits: torch.Tensor, params: SamplingParams, generators: Sequence[torch.Generator | None]
) -> torch.Tensor:
    """One id per row of logits [M, V]: argmax (first index) if greedy, else a draw with ``generators[m]``."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filtered_logits(logits, params), dim=-1)
    return torch.cat(
        [torch.multinomial(probs[m], 1, generator=generators[m]) for m in range(probs.shape[0])]
    )
