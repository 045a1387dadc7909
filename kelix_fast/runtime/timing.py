"""Per-stage wall-clock timing of the engine's calls (preprocess, ViT+VQ, prefill, decode, DiT, VAE)."""

from __future__ import annotations

import time

import torch


class StageTimer:
    """Adds the seconds since the previous lap to ``timings[name]`` at each :meth:`lap`.

    On CUDA it synchronises the device first, so a stage is charged for its own kernels; with
    ``timings=None`` it does nothing (no synchronisation either).
    """

    def __init__(self, timings: dict[str, float] | None, device: torch.device) -> None:
        self.timings, self.device = timings, device
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.timings is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self._last
        self._last = now
