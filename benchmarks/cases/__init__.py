"""The benchmark cases: one module per op, each declaring a :class:`Case`.

A case owns everything op-specific: the full Kelix shapes (and tiny ``--quick`` ones), the FLOP and byte
formulas, the seeded input makers (importable by the tests), the op call for one backend, the check
against the reference, and the official-style eager baseline. The harness (``benchmarks/run.py``) owns
timing, rotation, the roofline and the JSON record.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Point = dict[str, Any]  # one benchmarked configuration: shape, dtype, mode, constants (JSON-ready)
Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Case:
    """One op under benchmark.

    ``make_shared(point, device)`` builds the large tensors every rotating set reads (the 1.78 GB
    embedding table, the raw SimVQ tables); it depends only on the fields in ``shared_key``.
    ``make_inputs(point, shared, seed)`` builds one rotating input set (fresh memory per call).
    ``run(point, inputs, backend)`` calls the op; ``baseline(point, inputs, shared)`` is the
    official-style eager path, which depends only on the fields in ``baseline_key``.
    ``check(point, got, want)`` returns ``None`` when ``got`` matches the reference output ``want``,
    else the reason. ``probe(inputs)`` are the tensors ``resolve_backend`` decides on.
    ``roof`` names the binding roofline: ``"compute"`` or ``"bandwidth"``. A case that covers
    several ops gives each point an ``"op"`` (the name ``resolve_backend`` is asked about; default the
    case name) and may give it its own ``"roof"``.
    ``other_baselines`` are further reference points timed in the same run (e.g. PyTorch SDPA,
    FlexAttention), same signature as ``baseline``; one that cannot run here raises
    :class:`BaselineUnavailable` and is recorded with the reason.
    """

    name: str
    roof: str
    points: Callable[[bool], list[Point]]
    flops: Callable[[Point], int]
    bytes: Callable[[Point], int]
    shared_key: tuple[str, ...]
    baseline_key: tuple[str, ...]
    make_shared: Callable[[Point, torch.device], Tensors]
    make_inputs: Callable[[Point, Tensors, int], Tensors]
    run: Callable[[Point, Tensors, str], torch.Tensor]
    baseline: Callable[[Point, Tensors, Tensors], torch.Tensor]
    check: Callable[[Point, torch.Tensor, torch.Tensor], str | None]
    probe: Callable[[Tensors], tuple[torch.Tensor, ...]]
    other_baselines: Mapping[str, Callable[[Point, Tensors, Tensors], torch.Tensor]] = field(
        default_factory=dict
    )


class BaselineUnavailable(Exception):
    """An ``other_baselines`` entry cannot run on this machine or shape; the message says why."""


def all_cases() -> dict[str, Case]:
    """Every case by name, in run order."""
    from benchmarks.cases import (
        attention,
        block_embed,
        codebook_argmin,
        decode_attention,
        dit_attention,
        head_select,
        rms_norm,
        silu_mul,
    )

    cases = (
        codebook_argmin.CASE,
        block_embed.CASE,
        head_select.CASE,
        dit_attention.CASE,
        decode_attention.CASE,
        attention.CASE,
        rms_norm.CASE,
        silu_mul.CASE,
    )
    return {case.name: case for case in cases}


def ids_equal(point: Point, got: torch.Tensor, want: torch.Tensor) -> str | None:
    """The check of the id-returning cases: every id equals the reference's (their inputs have wide
    margins, so a correct kernel has no near-tie to resolve differently)."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"ids {tuple(got.shape)} {got.dtype}, reference {tuple(want.shape)} {want.dtype}"
    differ = int((got != want).sum())
    return None if differ == 0 else f"{differ} of {want.numel()} ids differ from the reference"


def within(rtol: float, atol: float) -> Callable[[Point, torch.Tensor, torch.Tensor], str | None]:
    """The check of the float-returning cases: same shape, and values (as float32) within
    ``torch.testing.assert_close(rtol, atol)`` of the reference's."""

    def check(point: Point, got: torch.Tensor, want: torch.Tensor) -> str | None:
        if got.shape != want.shape:
            return f"shape {tuple(got.shape)}, reference {tuple(want.shape)}"
        try:
            torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)
        except AssertionError as err:
            return str(err).splitlines()[0]
        return None

    return check
