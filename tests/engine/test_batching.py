"""Batch > 1 with prompts of different lengths: every request gives exactly what it gives alone."""

from __future__ import annotations

import pytest
import torch

from kelix_fast import KelixAR, presets
from kelix_fast.processor import image_to_patches

IM_START, IM_END, USER, ASSISTANT, NL = presets.IM_START, presets.IM_END, 872, 77091, 198


@pytest.fixture(scope="module")
def tiny():
    return KelixAR.tiny(seed=3, device="cpu")


def _prompts():
    return [
        [IM_START, USER, NL, 1000, 2000, 3000, IM_END, NL, IM_START, ASSISTANT, NL],
        [IM_START, USER, NL, 42, IM_END, NL, IM_START, ASSISTANT, NL],
        [IM_START, ASSISTANT, NL, presets.VISION_START],
    ]


def _alone(engine, prompt, **kwargs):
    out = engine.generate([prompt], return_hidden_states=True, **kwargs)
    n = int(out.lengths[0])
    return out.groups[0, :n], out.hidden_states[0, : n - 1], out.block_decoder_ids[0]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 1},
        {"top_k": 0, "top_p": 0.9, "temperature": 0.7, "seed": 11, "sampler": "sequential"},
        {"top_k": 20, "top_p": 0.8, "temperature": 1.3, "seed": [5, 6, 7], "sampler": "reference"},
    ],
    ids=["greedy", "sequential-sampling", "reference-sampling"],
)
def test_batched_requests_equal_single_requests(tiny, kwargs):
    prompts = _prompts()
    out = tiny.generate(prompts, max_new_blocks=6, return_hidden_states=True, **kwargs)
    for b, prompt in enumerate(prompts):
        single = dict(kwargs)
        if isinstance(single.get("seed"), list):
            single["seed"] = single["seed"][b]
        groups, hidden, chains = _alone(tiny, prompt, max_new_blocks=6, **single)
        n = int(out.lengths[b])
        assert torch.equal(out.groups[b, :n], groups), (
            f"request {b}: groups differ from its single run"
        )
        torch.testing.assert_close(out.hidden_states[b, : n - 1], hidden, rtol=0, atol=1e-5)
        assert torch.equal(out.block_decoder_ids[b, : chains.shape[0]], chains)
        assert bool((out.groups[b, n:] == presets.Q_EOS).all()), "padding past a request's length"


def test_batched_images_follow_prompt_order(tiny):
    """Placeholders of several requests are filled in order; each request equals its own single run."""
    image = (
        torch.arange(56 * 84 * 3, dtype=torch.int64)
        .reshape(56, 84, 3)
        .remainder(251)
        .to(torch.uint8)
    )
    pixels, grid = image_to_patches(image)
    n_tok = int(grid[0, 1] * grid[0, 2]) // 4
    base = [IM_START, USER, NL, presets.VISION_START]
    with_image = base + [presets.IMAGE_PAD] * n_tok + [presets.VISION_END, IM_START, ASSISTANT, NL]
    text_only = [IM_START, USER, NL, 7, IM_END, NL, IM_START, ASSISTANT, NL]
    out = tiny.generate(
        [text_only, with_image], pixel_values=pixels, image_grid_thw=grid, max_new_blocks=4
    )
    alone = tiny.generate([with_image], pixel_values=pixels, image_grid_thw=grid, max_new_blocks=4)
    assert torch.equal(out.groups[1, : int(out.lengths[1])], alone.groups[0])
    assert torch.equal(
        out.groups[0, : int(out.lengths[0])], tiny.generate([text_only], max_new_blocks=4).groups[0]
    )


def test_seeded_sampling_is_reproducible_and_seed_dependent(tiny):
    prompt = _prompts()[0]
    kwargs = {"max_new_blocks": 5, "top_k": 0, "temperature": 1.0}
    a = tiny.generate([prompt], seed=1, **kwargs).groups
    assert torch.equal(a, tiny.generate([prompt], seed=1, **kwargs).groups)
    assert not torch.equal(a, tiny.generate([prompt], seed=2, **kwargs).groups)


def test_generation_stops_at_im_end_in_slot_zero(tiny):
    """Force the stop id to win slot 0 of the first block: generation ends after it, first block included."""
    engine = KelixAR.tiny(seed=3, device="cpu")
    head = engine.model.llm.output.weight
    head[IM_END] = engine.model.llm.norm.scale.sign() * 50.0  # dominates every row's logits
    out = engine.generate([_prompts()[1]], max_new_blocks=5)
    assert out.groups.shape[1] == len(_prompts()[1]) + 1
    assert int(out.groups[0, -1, 0]) == IM_END
