"""The LLM and the Block Decoder against ``ar_prefill`` (two images, teacher forcing on and off)."""

from __future__ import annotations

import torch

from tests.engine.tolerances import assert_close


def _groups(golden_ar, fx):
    return golden_ar.expand_prompt(fx["prompt_ids"], fx["input_image_ids"])


def test_expand_prompt_matches_golden(golden_ar, load_fixture):
    fx = load_fixture("ar_prefill")
    assert torch.equal(_groups(golden_ar, fx), fx["expanded_ids"])


def test_pixel_path_gives_the_recorded_image_ids(golden_ar, load_fixture):
    visual = load_fixture("ar_visual")
    ids = golden_ar.tokenize_images(visual["pixel_values"], visual["image_grid_thw"])
    assert torch.equal(ids, load_fixture("ar_prefill")["input_image_ids"])


def test_teacher_forced_hidden_states_and_logits_match_golden(golden_ar, load_fixture):
    fx = load_fixture("ar_prefill")
    hidden, logits = golden_ar.forward_teacher_forced(_groups(golden_ar, fx))
    assert len(hidden) == golden_ar.config.llm.num_layers + 1
    for i, h in enumerate(hidden):
        assert_close(h, fx[f"hidden_{i}"], f"hidden_{i}")
    assert_close(logits, fx["logits"], "teacher-forced block logits")


def test_greedy_block_decoder_logits_match_golden(golden_ar, load_fixture):
    fx = load_fixture("ar_prefill")
    hidden, logits = golden_ar.forward_greedy_blocks(_groups(golden_ar, fx))
    assert_close(hidden[-1], fx[f"hidden_{len(hidden) - 1}"], "last hidden")
    assert_close(logits, fx["logits_greedy_blockdec"], "greedy block-decoder logits")
