"""Soak: 1,000 mixed calls on one pipeline, watching host RSS and device memory for growth.

The calls cycle through ``KelixPipeline.chat`` (text, and one with an image), ``KelixAR.generate``
(greedy and seeded sampling, batches of 1 and 2) and, every 50th call, ``KelixPipeline.generate_image``
(one DiT step, the smallest image), every call a little different (prompt, seed) so that no cache sees only one
shape. Host RSS (/proc/self/statm) and, on CUDA, ``torch.cuda.memory_allocated`` are read before the
first call and after every :data:`CHECK_EVERY` calls.

Bound: after the warm-up (the first :data:`WARMUP_CALLS` calls, which fill the allocator's pools,
the per-shape caches and Python's own arenas), host RSS may grow by less than :data:`RSS_BOUND_MIB`
MiB to the end, and device memory by less than :data:`DEVICE_BOUND_MIB` MiB. A leak of one small
tensor per call, the kind this catches (a hidden-state row kept per request, a timings list that is
never cleared, a CUDA graph per call), costs the tiny model's 64-wide float32 rows 256 bytes each
at least and a generate call holds hundreds of them: 900 calls leak well over the bound, while the
steady-state noise of glibc's allocator and torch's CPU caching measured here is a few MiB.

Device under test: the CPU and the tiny models, unless ``KELIX_SOAK_DEVICE=cuda`` (then the
release-size AR, DiT and VAE with random weights in bfloat16, as ``benchmarks/pipeline.py`` builds
them). ``KELIX_SOAK_JSON=<path>`` writes the series there (``benchmarks pass`` does);
``KELIX_SOAK_CALLS`` changes the number of calls (at least 150; ``benchmarks pass --quick`` runs 200). The 1,000-call
CPU run took 220 s on the 2-core dev machine (RSS +5.4 MiB from call 100 to 1,000).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kelix_fast import KelixPipeline, KelixProcessor

pytestmark = pytest.mark.soak

CALLS = int(os.environ.get("KELIX_SOAK_CALLS", "1000"))  # benchmarks pass --quick: 200
CHECK_EVERY = 50
WARMUP_CALLS = 100
RSS_BOUND_MIB = 32.0
DEVICE_BOUND_MIB = 16.0
DEVICE_ENV, JSON_ENV = "KELIX_SOAK_DEVICE", "KELIX_SOAK_JSON"
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20
WORDS = ["red", "cat", "sky", "blue", "tree", "house", "river", "stone", "light", "small"]


def host_rss_mib() -> float:
    """Resident set size of this process now (statm's second field, in pages)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES / MIB


def device_mib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / MIB if device.type == "cuda" else None


def build_pipeline(device: torch.device) -> KelixPipeline:
    """The tiny pipeline on the CPU (float32); on CUDA the release sizes with random weights."""
    if device.type == "cpu":
        return KelixPipeline.tiny(device=device, dtype=torch.float32)
    from benchmarks.pipeline import random_dit, random_engine, random_vae
    from kelix_fast import presets

    dtype = torch.bfloat16
    return KelixPipeline(
        random_engine(presets.release_config(), device, dtype),
        KelixProcessor.tiny(),
        random_dit(presets.release_dit_config(), device, dtype),
        random_vae(presets.RELEASE_VAE_CONFIG, device, dtype),
        None,
    )


def mixed_call(pipe: KelixPipeline, i: int, image: np.ndarray) -> None:
    """Call ``i`` of the soak: one of five kinds, each with inputs varying with ``i``."""
    text = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 4))
    kind = i % 50
    if kind == 49:  # the costliest call (~0.7 s on the CPU): 20 of them
        pipe.generate_image(text, steps=1, size=32, seed=i, max_condition_length=1)
    elif kind % 4 == 0:
        pipe.chat([{"role": "user", "content": text}], max_new_tokens=2)
    elif kind % 4 == 1:
        pipe.chat((image, text), max_new_tokens=1, top_k=0, seed=i)
    elif kind % 4 == 2:
        pipe.ar.generate([[1 + i % 50, 2, 3]], max_new_blocks=2)
    else:
        prompts = [[5 + i % 7, 6], [7, 8, 9 + i % 3]]
        pipe.ar.generate(prompts, max_new_blocks=2, top_k=0, top_p=0.9, seed=[i, i + 1])


def test_soak_memory_stays_flat(tmp_path: Path) -> None:
    assert CALLS >= WARMUP_CALLS + CHECK_EVERY, f"KELIX_SOAK_CALLS must be >= 150, got {CALLS}"
    device = torch.device(os.environ.get(DEVICE_ENV, "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{DEVICE_ENV}=cuda but torch sees no CUDA device")
    pipe = build_pipeline(device)
    image = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    series: list[dict[str, Any]] = [
        {"call": 0, "seconds": 0.0, "rss_mib": host_rss_mib(), "device_mib": device_mib(device)}
    ]
    start = time.perf_counter()
    for i in range(CALLS):
        mixed_call(pipe, i, image)
        if (i + 1) % CHECK_EVERY == 0:
            series.append(
                {
                    "call": i + 1,
                    "seconds": round(time.perf_counter() - start, 3),
                    "rss_mib": round(host_rss_mib(), 2),
                    "device_mib": device_mib(device),
                }
            )
    warm = next(point for point in series if point["call"] == WARMUP_CALLS)
    end = series[-1]
    rss_growth = end["rss_mib"] - warm["rss_mib"]
    device_growth = None if warm["device_mib"] is None else end["device_mib"] - warm["device_mib"]
    record = {
        "device": str(device),
        "calls": CALLS,
        "check_every": CHECK_EVERY,
        "warmup_calls": WARMUP_CALLS,
        "rss_bound_mib": RSS_BOUND_MIB,
        "device_bound_mib": DEVICE_BOUND_MIB,
        "rss_growth_mib": round(rss_growth, 2),
        "device_growth_mib": device_growth,
        "seconds": round(time.perf_counter() - start, 1),
        "series": series,
    }
    if os.environ.get(JSON_ENV):
        Path(os.environ[JSON_ENV]).write_text(json.dumps(record, indent=1) + "\n")
    table = "\n".join(f"{p['call']:5d} {p['rss_mib']:9.1f} MiB {p['device_mib']}" for p in series)
    assert rss_growth < RSS_BOUND_MIB, (
        f"host RSS grew {rss_growth:.1f} MiB from call {WARMUP_CALLS} to {CALLS} "
        f"(bound {RSS_BOUND_MIB} MiB):\n{table}"
    )
    if device_growth is not None:
        assert device_growth < DEVICE_BOUND_MIB, (
            f"device memory grew {device_growth:.1f} MiB from call {WARMUP_CALLS} to {CALLS} "
            f"(bound {DEVICE_BOUND_MIB} MiB):\n{table}"
        )
