"""Test configuration: the self-skipping ``gpu`` marker, the guard against the implicit default device
(and its ``default_device`` marker), the golden fixture sets, the
``forbid_models`` fixture of the bad-input tests.

Triton kernels run on CPU tensors under Triton's interpreter and on CUDA tensors compiled, in the same
process (``kelix_fast.triton_kernels.kernels_for``), so nothing here depends on whether CUDA is present.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from kelix_fast import weights

# Tiny tensors on a 2-core CI machine: the intra-op thread pool costs more than it saves (a 9-element
# softmax takes ~8 ms with 2 threads, ~5 us with 1), and results do not depend on it beyond rounding.
torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parents[1]

# The fuzz tests' hypothesis profiles, registered before hypothesis's plugin reads --hypothesis-profile
# (tests/fuzz/profiles.py). hypothesis is a test-extra dependency: without it tests/fuzz skips.
if importlib.util.find_spec("hypothesis") is not None:
    from tests.fuzz.profiles import register_profiles

    register_profiles()


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
    config.addinivalue_line(
        "markers",
        "default_device: may build models without device= (the test checks the default itself and "
        "must pass with and without CUDA)",
    )


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


# Every test states its device and dtype: a model built with the implicit default lands on CUDA in bf16
# when a GPU is present and on CPU in float32 otherwise, so the same test would check different things
# on the two machines. The guard makes that visible on CPU. It is installed for the whole session, so
# that session- and module-scoped fixtures are guarded too, and lifted per test by the marker.
_DEFAULT_DEVICE = weights.default_device


def _implicit_default_device() -> torch.device:
    raise AssertionError(
        "this test relies on the implicit default device; pass device= explicitly, "
        "or mark it @pytest.mark.default_device"
    )


@pytest.fixture(scope="session", autouse=True)
def _guard_default_device():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(weights, "default_device", _implicit_default_device)
        yield


@pytest.fixture(autouse=True)
def _allow_default_device(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("default_device") is not None:
        monkeypatch.setattr(weights, "default_device", _DEFAULT_DEVICE)


@pytest.fixture
def forbid_models(monkeypatch: pytest.MonkeyPatch):
    """``forbid_models(pipe)``: every model entry point of a :class:`KelixPipeline` then fails, so an
    argument check that comes after some compute shows (the tests of bad input call it first)."""

    def ran(*args, **kwargs):
        raise AssertionError("a model ran before the arguments were checked")

    def forbid(pipe) -> None:
        # layout_requests follows the checks of generate and add_request and precedes their compute.
        for name in ("layout_requests", "tokenize_images"):
            monkeypatch.setattr(pipe.ar, name, ran)
        for dit in (pipe.dit, pipe.aedit):
            monkeypatch.setattr(dit, "connect", ran)

    return forbid
