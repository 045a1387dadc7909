from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kelix_fast import KelixAR

# Float outputs of a float32 re-implementation: observed rounding noise ~1e-6 at magnitudes up to ~25
# (golden README, "recommended tolerances").
FLOAT_TOL = 1e-4


@pytest.fixture(scope="session")
def golden_ar(golden_dir: Path) -> KelixAR:
    return KelixAR.from_pretrained(golden_dir / "kelix_ar", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def load_fixture(golden_dir: Path):
    def load(name: str) -> dict[str, torch.Tensor]:
        return load_file(golden_dir / f"{name}.safetensors")

    return load


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, (
        f"{what}: shape {list(actual.shape)} != {list(expected.shape)}"
    )
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= FLOAT_TOL, f"{what}: max abs error {err:.3g} > {FLOAT_TOL}"
