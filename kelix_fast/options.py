"""``EngineOptions``: every engine-wide choice of the AR engine in one typed, validated object.

An engine (``KelixAR``, and the ``Engine`` and ``KelixPipeline`` built on it) holds one; the options that
make sense per request (``scoring``, ``sampler``, ``cuda_graphs``, and the sampling parameters, which are
no engine option) can be overridden per call. ``backends`` forces a kernel backend for every op call the
engine makes (``kelix_fast.ops.use_backends`` for the duration of each call), so a whole model can run
through one backend without a context variable set by hand.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kelix_fast import ops
from kelix_fast.ops.codebook import MODES as VQ_MODES
from kelix_fast.runtime.block_selection import SCORINGS
from kelix_fast.runtime.sampling import SAMPLERS

__all__ = ["EngineOptions"]


@dataclass(frozen=True)
class EngineOptions:
    """How the AR engine computes.

    Attributes:
        vq: Kelix-Tok's distance arithmetic, ``"reference"`` (the official bf16 ``cdist``, near-ties
            included) or ``"exact"`` (float32 nearest neighbour).
        scoring: default of every request: ``"full"`` (exact) or ``"structured"`` (approximate, opt-in:
            slot t >= 1 of a visual block scores sub-codebook t and ``q_eos`` only).
        sampler: ``"sequential"`` (the engine's device loop) or ``"reference"`` (the official
            ``_sample_group`` in the host-driven reference loop).
        cuda_graphs: capture decode steps as CUDA graphs: None = on when the model is on CUDA and every
            selection runs on the device; True where it cannot raises.
        backends: ``{op: backend}`` forced for the engine's op calls, e.g. ``{"attention": "torch"}``
            (op names: ``kelix_fast.ops.OPS``; backends: ``"cuda" | "triton" | "torch"``); stored as
            sorted pairs. Unnamed ops keep ``"auto"``.

    Raises:
        ValueError/TypeError at construction, naming the field, for any value outside these.
    """

    vq: str = "reference"
    scoring: str = "full"
    sampler: str = "sequential"
    cuda_graphs: bool | None = None
    backends: tuple[tuple[str, str], ...] | Mapping[str, str] = ()

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("vq", self.vq, VQ_MODES),
            ("scoring", self.scoring, SCORINGS),
            ("sampler", self.sampler, SAMPLERS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        if self.cuda_graphs is not None and not isinstance(self.cuda_graphs, bool):
            raise TypeError(
                f"cuda_graphs must be None or a bool, got {type(self.cuda_graphs).__name__}"
            )
        pairs = dict(self.backends).items() if self.backends else ()
        for op, backend in pairs:
            if op not in ops.OPS:
                raise ValueError(f"backends: unknown op {op!r}; ops are {list(ops.OPS)}")
            if backend not in ops.BACKENDS or backend == "auto":
                raise ValueError(
                    f"backends[{op!r}] must be one of {list(ops.BACKENDS[1:])}, got {backend!r}"
                )
        object.__setattr__(self, "backends", tuple(sorted(pairs)))

    def replace(self, **changes: Any) -> EngineOptions:
        """A copy with ``changes`` (None values are ignored: "keep the engine's"), validated again."""
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise TypeError(f"unknown engine option(s) {unknown}; options are {sorted(fields)}")
        changes = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **changes) if changes else self

    def backend_scope(self) -> contextlib.AbstractContextManager[None]:
        """The scope in which the engine's op calls run (``ops.use_backends`` of :attr:`backends`)."""
        if not self.backends:
            return contextlib.nullcontext()
        return ops.use_backends(**dict(self.backends))
