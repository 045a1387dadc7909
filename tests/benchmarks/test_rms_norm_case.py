"""The ``rms_norm`` benchmark case on its quick points: the official-style baseline and the triton
kernel (interpreter) both pass the case's check against the reference, so a GPU run compares like with
like."""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import rms_norm

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "point", rms_norm.points(quick=True), ids=lambda p: f"{p['workload']}-B{p['B']}"
)
def test_baseline_and_triton_match_the_reference(point):
    shared = rms_norm.make_shared(point, CPU)
    inputs = rms_norm.make_inputs(point, shared, seed=1)
    want = rms_norm.run(point, inputs, "torch")
    assert rms_norm.CASE.check(point, rms_norm.baseline(point, inputs, shared), want) is None
    assert rms_norm.CASE.check(point, rms_norm.run(point, inputs, "triton"), want) is None
    # The check is not vacuous: an unnormalised output fails it.
    assert rms_norm.CASE.check(point, inputs["x"], want) is not None
