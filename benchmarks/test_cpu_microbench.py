"""pytest-benchmark microbenchmarks of the CPU path at the ``--quick`` shapes.

Run with ``python -m pytest benchmarks/test_cpu_microbench.py --benchmark-only``; ``pytest tests`` does
not collect this file. CPU numbers only: they track the reference path and the harness, never a GPU.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import Case, all_cases

CPU = torch.device("cpu")
POINTS = [(case, point) for case in all_cases().values() for point in case.points(True)]


_ID_FIELDS = ("n", "B", "L", "dtype", "mode")


def _id(item: tuple[Case, dict]) -> str:
    case, point = item
    return "-".join([case.name, *(f"{k}={point[k]}" for k in _ID_FIELDS if k in point)])


@pytest.fixture(params=POINTS, ids=[_id(item) for item in POINTS])
def prepared(request):
    case, point = request.param
    shared = case.make_shared(point, CPU)
    return case, point, shared, case.make_inputs(point, shared, 1)


def test_reference(benchmark, prepared):
    case, point, _, inputs = prepared
    want = case.run(point, inputs, "torch")
    got = benchmark(case.run, point, inputs, "torch")
    assert case.check(point, got, want) is None


def test_official_baseline(benchmark, prepared):
    case, point, shared, inputs = prepared
    want = case.run(point, inputs, "torch")
    got = benchmark(case.baseline, point, inputs, shared)
    assert case.check(point, got, want) is None
