"""The golden AR path through the Triton kernels (the interpreter on CPU): every op the models call that
has a triton backend runs it, except ``head_select`` (its interpreter cost per call is seconds at the
tiny model's 152k-row head; tests/ops/test_head_select.py covers it), so the kernels are held to the
official outputs inside the whole model, not only against their references."""

from __future__ import annotations

import pytest
import torch

from kelix_fast import ops
from tests.engine.tolerances import assert_close

TRITON_OPS = ("attention", "cached_attention", "rms_norm", "block_embed", "codebook_argmin")


@pytest.fixture
def triton_backends():
    with ops.use_backends(**dict.fromkeys(TRITON_OPS, "triton")):
        yield


def test_tokenizer_and_teacher_forced_forward_match_golden(
    golden_ar, load_fixture, triton_backends
):
    visual, fx = load_fixture("ar_visual"), load_fixture("ar_prefill")
    ids = golden_ar.tokenize_images(visual["pixel_values"], visual["image_grid_thw"])
    assert torch.equal(ids, fx["input_image_ids"])
    hidden, logits = golden_ar.forward_teacher_forced(
        golden_ar.expand_prompt(fx["prompt_ids"], fx["input_image_ids"])
    )
    for i, h in enumerate(hidden):
        assert_close(h, fx[f"hidden_{i}"], f"hidden_{i}")
    assert_close(logits, fx["logits"], "teacher-forced block logits")


def test_text_generation_matches_golden(golden_ar, load_fixture, triton_backends):
    fx = load_fixture("ar_generate_text")
    blocks = fx["output_ids"].shape[1] - fx["prompt_ids"].shape[1]
    out = golden_ar.generate(fx["prompt_ids"], max_new_blocks=blocks, return_hidden_states=True)
    assert torch.equal(out.groups, fx["output_ids"])
    last = max(int(k.removeprefix("hidden_")) for k in fx if k.startswith("hidden_"))
    assert_close(out.hidden_states, fx[f"hidden_{last}"], "generation hidden states")
