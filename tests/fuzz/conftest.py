"""Fixtures of the fuzz tests: the tiny models, built once per module (a KelixPipeline.tiny takes
seconds), on the CPU in float32. The hypothesis profiles live in profiles.py (see its docstring).

hypothesis is a dependency of the ``test`` extra only: without it these tests skip, and fail under CI.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if importlib.util.find_spec("hypothesis") is None:
    message = "the fuzz tests need hypothesis: pip install -e .[test]"
    if os.environ.get("CI"):
        raise ImportError(message)
    collect_ignore_glob = ["test_*.py"]
else:
    from tests.fuzz.profiles import register_profiles

    register_profiles()  # again, for a run of tests/fuzz alone with no tests/conftest.py hook

from kelix_fast import KelixAR, KelixPipeline

CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def ar() -> KelixAR:
    return KelixAR.tiny(device=CPU, dtype=F32)


@pytest.fixture(scope="module")
def pipe() -> KelixPipeline:
    return KelixPipeline.tiny(device=CPU, dtype=F32)
