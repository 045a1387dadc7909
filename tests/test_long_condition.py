"""Conditions longer than the DiT's ``model_max_length`` (kelix-dit.md §4.3, golden README "Sampling"
step 2): the official code attends to all their rows, and its null condition is ``y_embedding[:L]``
(all ``model_max_length`` rows) zero-padded to the condition length with mask 0 on the padding.

The oracle below builds that CFG batch by hand, as the official ``generate_image`` does, and steps it
with the official forward (``KelixDiT.forward``) and the float32 Euler update; ``sample_latents`` must
give the same latents. Then the two pipeline paths that meet such conditions: AEDIT reconstruction of an
image with more tokens than the tiny AEDIT's 64 rows, and text to image with a condition length above
the tiny DiT's 16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kelix_fast import KelixDiT, KelixPipeline, dit_position_args, presets, sample_latents
from kelix_fast.config import KelixDiTConfig
from kelix_fast.runtime.flow import flow_schedule


def _official_cfg_sample(dit, cond_hidden, cond_mask, noise, *, steps, guidance, image_size):
    """The official T2I loop for B = 1: batch [uncond, cond], uncond = y_embedding[:L] zero-padded to
    the condition length L with mask 0 on the padding."""
    length = cond_hidden.shape[1]
    table = dit.y_embedder.y_embedding
    rows = min(length, table.shape[0])
    uncond = torch.zeros(1, length, table.shape[1])
    uncond[0, :rows] = table[:rows]
    uncond_mask = torch.zeros(1, length, dtype=torch.int64)
    uncond_mask[0, :rows] = 1
    y = torch.cat([uncond, dit.connect(cond_hidden)])
    mask = torch.cat([uncond_mask, cond_mask])
    side = noise.shape[-1]
    latent_pos, cond_pos = dit_position_args(
        (side, side),
        cond_length=length,
        valid_length=int(cond_mask.sum()),
        image_size=image_size,
    )
    sigmas, timesteps = flow_schedule(steps)
    latents = noise.clone()
    for i in range(steps):
        v = dit(
            torch.cat([latents, latents]),
            timesteps[i].expand(2),
            y,
            mask,
            cond_positions=cond_pos,
            latent_positions=latent_pos,
        )
        v_uncond, v_cond = v.chunk(2)
        latents = latents + float(sigmas[i + 1] - sigmas[i]) * (
            v_uncond + guidance * (v_cond - v_uncond)
        )
    return latents


@pytest.mark.parametrize("rope", [False, True], ids=["no-rope", "cross-attn-rope"])
@pytest.mark.parametrize("valid", [20, 24], ids=["padded", "full"])
def test_sample_latents_reproduces_the_official_loop_past_model_max_length(rope, valid):
    base = presets.tiny_dit(3, device="cpu", dtype=torch.float32)
    config = KelixDiTConfig.from_dict(
        {**base.config.to_dict(), "use_cross_attn_rope": rope, "use_position_scale": rope}
    )
    dit = KelixDiT.from_weights(config, base.state_dict(), device="cpu", dtype=torch.float32)
    length = 24
    assert valid > dit.config.model_max_length == 16
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, length, dtype=torch.int64)
    mask[0, :valid] = 1
    hidden = torch.randn(1, length, dit.config.connector_channels, generator=gen) * mask[..., None]
    noise = torch.randn(1, dit.config.in_channels, 2, 2, generator=gen)
    args = {"steps": 3, "image_size": 64}
    got = sample_latents(dit, hidden, mask, guidance_scale=4.5, noise=noise, **args)
    want = _official_cfg_sample(dit, hidden, mask, noise, guidance=4.5, **args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _ConditionSpy:
    """Records the valid rows of every condition a DiT prepares: (rows, valid rows) per sample."""

    def __init__(self, dit, monkeypatch):
        self.calls = []
        prepare = dit.prepare_condition

        def spy(cond, cond_mask, **positions):
            self.calls.append((cond.shape[1], cond_mask.ne(0).sum(-1).tolist()))
            return prepare(cond, cond_mask, **positions)

        monkeypatch.setattr(dit, "prepare_condition", spy)


@pytest.fixture(scope="module")
def pipe():
    return KelixPipeline.tiny(seed=4, device="cpu", dtype=torch.float32)


def test_reconstruct_conditions_on_every_token_of_a_large_image(pipe, monkeypatch):
    image = np.random.default_rng(0).integers(0, 256, (280, 280, 3), dtype=np.uint8)
    limit = pipe.aedit.config.model_max_length
    tokens = pipe.tokenize_image(image).shape[0]
    assert tokens == 100 > limit == 64  # 280 px: a 20 x 20 patch grid, 10 x 10 merged tokens
    spy = _ConditionSpy(pipe.aedit, monkeypatch)
    result = pipe.reconstruct(image, steps=2, size=64, seed=0, guidance_scale=4.5)
    assert result.size == (64, 64)
    # The condition keeps its 100 rows; the null condition has the table's 64 rows, the rest masked.
    assert spy.calls == [(tokens, [tokens]), (tokens, [limit])]
    again = pipe.reconstruct(image, steps=2, size=64, seed=0, guidance_scale=4.5)
    assert result.tobytes() == again.tobytes()


def test_text_to_image_with_a_condition_longer_than_the_null_table(pipe, monkeypatch):
    """The official demo's MAX_CONDITION_LENGTH may exceed the DiT's y_embedding rows."""
    spy = _ConditionSpy(pipe.dit, monkeypatch)
    limit = pipe.dit.config.model_max_length
    image = pipe.generate_image(
        "a fox", steps=1, size=64, seed=0, guidance_scale=2.0, max_condition_length=limit + 8
    )
    assert image.size == (64, 64)
    # The random tiny model never closes its image: the official fallback takes all the rows.
    assert spy.calls == [(limit + 8, [limit + 8]), (limit + 8, [limit])]
