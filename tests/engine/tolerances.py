"""Tolerances of the golden comparisons (golden README, "recommended tolerances")."""

from __future__ import annotations

import torch

# Float outputs of a float32 re-implementation: observed rounding noise ~1e-6 at magnitudes up to ~25
# (golden README, "recommended tolerances").
FLOAT_TOL = 1e-4


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, (
        f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    )
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= FLOAT_TOL, f"{what}: max abs error {err:.3g} > {FLOAT_TOL}"
