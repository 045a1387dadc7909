"""The engine in bfloat16 (the GPU default) runs end to end on CPU and stays near the float32 goldens."""

from __future__ import annotations

import torch

from kelix_fast import KelixAR


def test_bfloat16_engine_runs_and_tracks_the_float32_goldens(golden_dir, load_fixture):
    engine = KelixAR.from_pretrained(golden_dir / "kelix_ar", device="cpu", dtype=torch.bfloat16)
    visual = load_fixture("ar_visual")
    ids = engine.tokenize_images(visual["pixel_values"], visual["image_grid_thw"])
    assert ids.dtype == torch.int64 and ids.shape[1] == engine.config.llm.n_q_tokens
    prefill = load_fixture("ar_prefill")
    hidden, logits = engine.forward_teacher_forced(
        engine.expand_prompt(prefill["prompt_ids"], prefill["input_image_ids"])
    )
    assert logits.dtype == torch.bfloat16 and hidden[-1].dtype == torch.bfloat16
    # bf16 weights and activations: ~3 significant digits on logits of magnitude ~10 (measured 0.08).
    assert (logits.float() - prefill["logits"]).abs().max() < 0.5
    fx = load_fixture("ar_generate_text")
    out = engine.generate(fx["prompt_ids"], max_new_blocks=4, return_hidden_states=True)
    assert out.hidden_states.dtype == torch.bfloat16
    assert out.groups.shape == (1, fx["prompt_ids"].shape[1] + 4, engine.config.llm.group_size)
