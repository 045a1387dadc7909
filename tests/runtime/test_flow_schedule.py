"""The flow-matching schedule: the official float32 arithmetic, timestep truncation included."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from kelix_fast.runtime.flow import flow_schedule

# kelix-dit.md §5.1: integer timesteps the official 50-step demo feeds the model (shift 3).
SPEC_TIMESTEPS_50 = [
    1000, 993, 986, 979, 971, 964, 956, 948, 940, 931, 923, 914, 904, 895, 885, 874, 864, 853, 842, 830,
    818, 805, 792, 778, 764, 750, 734, 718, 702, 684, 666, 647, 627, 607, 585, 562, 538, 513, 486, 458,
    428, 397, 363, 328, 290, 250, 206, 160, 111, 57,
]  # fmt: skip


def test_fifty_step_schedule_matches_the_spec_table():
    sigmas, timesteps = flow_schedule(50, shift=3.0)
    assert timesteps.dtype == sigmas.dtype == torch.float32
    assert timesteps.long().tolist() == SPEC_TIMESTEPS_50
    assert sigmas[-1] == 0 and sigmas.shape == (51,)
    assert abs(float(sigmas[15]) - 0.8749999) < 1e-7  # truncates to 874, not 875


# kelix-dit.md §5.3: the diffusers default schedule (no explicit sigmas), N = 20, shift 3 (AEDIT).
SPEC_DEFAULT_20 = [
    (1.0, 1000), (0.981875, 981), (0.962386, 962), (0.941373, 941), (0.918652, 918), (0.894003, 894),
    (0.867172, 867), (0.837855, 837), (0.805689, 805), (0.770239, 770), (0.730974, 730),
    (0.687244, 687), (0.638240, 638), (0.582948, 582), (0.520074, 520), (0.447944, 447),
    (0.364352, 364), (0.266330, 266), (0.149787, 149), (0.008929, 8),
]  # fmt: skip


def test_default_schedule_matches_the_spec_table():
    sigmas, timesteps = flow_schedule(20, shift=3.0, schedule="default")
    assert timesteps.long().tolist() == [t for _, t in SPEC_DEFAULT_20]
    assert all(abs(float(s) - want) < 1e-6 for s, (want, _) in zip(sigmas, SPEC_DEFAULT_20))
    assert sigmas[-1] == 0


def test_schedule_matches_every_recorded_run(golden_dir):
    for path in sorted(golden_dir.glob("dit_sampling_*.safetensors")):
        fx = load_file(path)
        sigmas, timesteps = flow_schedule(fx["scheduler_timesteps"].shape[0], shift=3.0)
        assert torch.equal(sigmas, fx["scheduler_sigmas"]), path.name
        assert torch.equal(timesteps, fx["scheduler_timesteps"]), path.name


@pytest.mark.parametrize(
    "steps, shift, schedule, error",
    [(0, 3.0, "linspace", ValueError), (2.5, 3.0, "linspace", TypeError),
     (True, 3.0, "linspace", TypeError), (4, 0.0, "linspace", ValueError),
     (4, 3.0, "karras", ValueError)],
)  # fmt: skip
def test_bad_schedule_arguments(steps, shift, schedule, error):
    with pytest.raises(error, match="flow_schedule"):
        flow_schedule(steps, shift, schedule=schedule)
