"""Test configuration: Triton interpreter on CPU, the self-skipping ``gpu`` marker, the golden fixture sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Triton reads this when its kernels are decorated, so it must be set before any kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny tensors on a 2-core CI machine: the intra-op thread pool costs more than it saves (a 9-element
# softmax takes ~8 ms with 2 threads, ~5 us with 1), and results do not depend on it beyond rounding.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]


def golden_root() -> Path:
    return Path(os.environ.get("KELIX_GOLDEN_DIR", REPO_ROOT.parent / "shared" / "golden"))


def golden_sets() -> list[Path]:
    """Every fixture set (a directory with meta.json) under the golden root, or the root itself."""
    root = golden_root()
    if (root / "meta.json").is_file():
        return [root]
    return sorted(p.parent for p in root.glob("*/meta.json"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(
    scope="session", params=golden_sets() or [None], ids=lambda p: p.name if p else "absent"
)
def golden_dir(request: pytest.FixtureRequest) -> Path:
    """One golden fixture set; absent fixtures fail under CI and skip elsewhere."""
    if request.param is None:
        message = f"no golden fixture set under {golden_root()} (set KELIX_GOLDEN_DIR)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return request.param
