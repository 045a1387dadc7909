"""Fixtures of the golden conformance tests: the engine loaded from a fixture set, and the fixture files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kelix_fast import KelixAR


@pytest.fixture(scope="session")
def golden_ar(golden_dir: Path) -> KelixAR:
    return KelixAR.from_pretrained(golden_dir / "kelix_ar", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def load_fixture(golden_dir: Path):
    def load(name: str) -> dict[str, torch.Tensor]:
        return load_file(golden_dir / f"{name}.safetensors")

    return load
