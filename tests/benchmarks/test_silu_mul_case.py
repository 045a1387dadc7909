"""The ``silu_mul`` benchmark case on its quick points: the official-style baseline and the triton
kernel (interpreter) both pass the case's check against the reference, so a GPU run compares like with
like."""

from __future__ import annotations

import pytest
import torch

from benchmarks.cases import all_cases, silu_mul

CPU = torch.device("cpu")


@pytest.mark.parametrize("point", silu_mul.points(quick=True), ids=lambda p: f"B{p['B']}")
def test_baseline_and_triton_match_the_reference(point):
    shared = silu_mul.make_shared(point, CPU)
    inputs = silu_mul.make_inputs(point, shared, seed=1)
    want = silu_mul.run(point, inputs, "torch")
    assert want.shape == (point["B"], point["I"])
    assert silu_mul.CASE.check(point, silu_mul.baseline(point, inputs, shared), want) is None
    assert silu_mul.CASE.check(point, silu_mul.run(point, inputs, "triton"), want) is None
    # The check is not vacuous: the gate half alone (no silu, no product) fails it.
    assert silu_mul.CASE.check(point, inputs["x"][:, : point["I"]], want) is not None


def test_full_points_and_formulas():
    """Qwen3-8B decode: B 1, 32, 128 at I 12288 in bf16; bytes = (2I read + I written) per row."""
    points = silu_mul.points(quick=False)
    assert [(p["B"], p["I"], p["dtype"]) for p in points] == [
        (b, 12288, "bfloat16") for b in (1, 32, 128)
    ]
    assert silu_mul.nbytes(points[0]) == 3 * 12288 * 2
    assert silu_mul.flops(points[2]) == 5 * 128 * 12288
    assert all_cases()["silu_mul"] is silu_mul.CASE
