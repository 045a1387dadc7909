"""``sample_latents``' Euler step (runtime/euler_step.py): eager on the CPU, a CUDA graph captured once and
replayed on a GPU, with the same latents either way, callbacks that keep what they are given and may
replace the latents, and the option checked."""

from __future__ import annotations

import pytest
import torch

from kelix_fast import presets, sample_latents

STEPS = 5


def _inputs(device, *, batch=2, length=7, seed=0):
    dit = presets.tiny_dit(3, device=device, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.int64)
    mask[1, 4:] = 0  # one padded condition
    hidden = (
        torch.randn(batch, length, dit.config.connector_channels, generator=gen) * mask[..., None]
    )
    noise = torch.randn(batch, dit.config.in_channels, 2, 2, generator=gen)
    return dit, hidden.to(device), mask.to(device), noise


def _count_velocity_calls(dit, monkeypatch):
    calls = []
    original = dit.predict_velocity

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(dit, "predict_velocity", counted)
    return calls


def _sample(dit, hidden, mask, noise, guidance, cuda_graph, replace_at=None):
    trajectory = []

    def callback(step, latents):
        trajectory.append(latents)
        if step == replace_at:
            return latents * 0.5  # a callback's replacement, continued from
        return None

    final = sample_latents(
        dit, hidden, mask, steps=STEPS, guidance_scale=guidance, image_size=64, noise=noise,
        callback=callback, cuda_graph=cuda_graph,
    )  # fmt: skip
    return final, trajectory


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_eager_steps_run_the_dit_once_per_step_and_callbacks_keep_their_latents(
    guidance, monkeypatch
):
    dit, hidden, mask, noise = _inputs("cpu")
    calls = _count_velocity_calls(dit, monkeypatch)
    final, trajectory = _sample(dit, hidden, mask, noise, guidance, cuda_graph=None)
    assert len(calls) == STEPS  # None is eager on the CPU
    assert len({t.data_ptr() for t in trajectory}) == STEPS  # each step's own tensor
    assert torch.equal(trajectory[-1], final) and not torch.equal(trajectory[0], final)


def test_cuda_graph_option_is_checked():
    dit, hidden, mask, noise = _inputs("cpu")
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model, got cpu"):
        _sample(dit, hidden, mask, noise, 1.0, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        _sample(dit, hidden, mask, noise, 1.0, cuda_graph="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_cuda_graph_steps_equal_eager_steps(guidance, monkeypatch):
    """Captured at the first step (a warm-up step plus the capture: two DiT calls), replayed for the
    other four; every step's latents, a mid-way replacement included, equal the eager loop's."""
    dit, hidden, mask, noise = _inputs("cuda")
    want, want_steps = _sample(dit, hidden, mask, noise, guidance, cuda_graph=False, replace_at=2)
    calls = _count_velocity_calls(dit, monkeypatch)
    got, got_steps = _sample(dit, hidden, mask, noise, guidance, cuda_graph=None, replace_at=2)
    assert len(calls) == 2
    for step, (g, w) in enumerate(zip(got_steps, want_steps)):
        assert torch.equal(g, w), step
    assert torch.equal(got, want)
