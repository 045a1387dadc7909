"""``scoring="structured"`` (kelix-ar.md §7.2) on the golden tiny model's image generation: visual slots
stay in their sub-codebook, and the agreement with exact scoring is measured and printed."""

from __future__ import annotations

import torch


def test_structured_scoring_keeps_visual_slots_in_their_sub_codebook(golden_ar, load_fixture):
    fx = load_fixture("ar_generate_image")
    llm = golden_ar.config.llm
    codes = llm.codebook_size // llm.n_q_tokens
    blocks = fx["output_ids"].shape[1] - fx["prompt_ids"].shape[1]
    images = {"pixel_values": fx["pixel_values"], "image_grid_thw": fx["image_grid_thw"]}
    full = golden_ar.generate(fx["prompt_ids"], max_new_blocks=blocks, **images)
    structured = golden_ar.generate(
        fx["prompt_ids"], max_new_blocks=blocks, scoring="structured", **images
    )
    assert torch.equal(full.groups, fx["output_ids"])
    start = fx["prompt_ids"].shape[1]
    new = structured.groups[0, start : int(structured.lengths[0])]
    visual = new[new[:, 0] >= llm.vocab_size]
    assert visual.shape[0] > 0, "the golden image run should emit visual blocks"
    for t in range(1, llm.n_q_tokens):
        low = llm.vocab_size + codes * t
        slot = visual[:, t]
        inside = ((slot >= low) & (slot < low + codes)) | (slot == llm.q_eos_token)
        assert bool(inside.all()), f"slot {t} left sub-codebook {t}: {slot[~inside].tolist()}"
    # Slot 0 is scored in full in both modes, so the first new block's slot 0 always agrees.
    assert int(new[0, 0]) == int(full.groups[0, start, 0])
    n = min(int(full.lengths[0]), int(structured.lengths[0])) - start
    same_blocks = (
        structured.groups[0, start : start + n] == full.groups[0, start : start + n]
    ).all(1)
    print(
        f"\nstructured vs full scoring (golden tiny model, greedy image run): "
        f"{int(same_blocks.sum())}/{n} new blocks identical"
    )
