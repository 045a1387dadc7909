"""``KelixAR.generate`` against the official ``generate`` runs (text, image, and the t2i condition run)."""

from __future__ import annotations

import pytest
import torch

from tests.engine.tolerances import assert_close


def _generate(golden_ar, fx, prompt_key, output_key, **kwargs):
    prompt = fx[prompt_key]
    new_blocks = fx[output_key].shape[1] - prompt.shape[1]  # official max_new_tokens=n yields n + 1
    images = {}
    if "pixel_values" in fx:
        images = {"pixel_values": fx["pixel_values"], "image_grid_thw": fx["image_grid_thw"]}
    return golden_ar.generate(
        prompt, max_new_blocks=new_blocks, return_hidden_states=True, **images, **kwargs
    )


@pytest.mark.parametrize("name", ["ar_generate_text", "ar_generate_image"])
@pytest.mark.parametrize("sampler", ["sequential", "reference"])
def test_generate_matches_golden(golden_ar, load_fixture, name, sampler):
    fx = load_fixture(name)
    # The official run used temperature 0.7 and top_p 0.9 with top_k=1: greedy whatever they are.
    out = _generate(
        golden_ar,
        fx,
        "prompt_ids",
        "output_ids",
        top_k=1,
        temperature=0.7,
        top_p=0.9,
        sampler=sampler,
    )
    assert torch.equal(out.groups, fx["output_ids"])
    assert out.lengths.tolist() == [fx["output_ids"].shape[1]]
    last = max(int(k.removeprefix("hidden_")) for k in fx if k.startswith("hidden_"))
    assert_close(out.hidden_states, fx[f"hidden_{last}"], "generation hidden states")
    assert torch.equal(out.block_decoder_ids[0], fx["step_blockdec_greedy_ids"])
    lengths = (out.block_decoder_ids[0] >= 0).sum(-1)
    assert torch.equal(lengths, fx["step_blockdec_len"])


def test_t2i_condition_generation_matches_golden(golden_ar, golden_dir, load_fixture):
    """The AR half of every recorded official t2i run: greedy groups and the hidden rows from
    <|vision_start|> (the DiT condition)."""
    runs = sorted(
        p.name.removesuffix(".safetensors") for p in golden_dir.glob("dit_sampling_*.safetensors")
    )
    assert runs, f"no dit_sampling_*.safetensors in {golden_dir}"
    for name in runs:
        fx = load_fixture(name)
        out = _generate(golden_ar, fx, "ar_input_ids", "ar_output_ids")
        assert torch.equal(out.groups, fx["ar_output_ids"]), name
        start = fx["ar_input_ids"].shape[1] - 1  # the appended <|vision_start|>
        valid = int(fx["token_embed_lengths"][0])
        rows = out.hidden_states[0, start : start + valid]
        assert_close(rows, fx["cond_embeds"][0, : rows.shape[0]], f"{name} condition hidden rows")
