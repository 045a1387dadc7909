"""Kelix-Tok against ``ar_visual``: every stage of every recorded image, then the packed multi-image call."""

from __future__ import annotations

import itertools

import pytest
import torch

from kelix_fast import KelixAR
from tests.engine.tolerances import assert_close


def _images(fx) -> int:
    """Number of recorded images (img0_*, img1_*, ...)."""
    return next(i for i in itertools.count() if f"img{i}_pixel_values" not in fx)


@pytest.mark.parametrize("vq", ["reference", "exact"])
def test_tokenizer_stages_match_golden(golden_dir, load_fixture, vq):
    """Both VQ modes: the recorded margins (>= 0.05) are far above float32 rounding."""
    fx = load_fixture("ar_visual")
    engine = KelixAR.from_pretrained(
        golden_dir / "kelix_ar", device="cpu", dtype=torch.float32, vq=vq
    )
    tok, llm = engine.model.tokenizer, engine.config.llm
    n_q, k = llm.n_q_tokens, engine.config.tokenizer.codes_per_group
    for i in range(_images(fx)):
        pixels, grid = fx[f"img{i}_pixel_values"], fx[f"img{i}_grid_thw"]
        grids = [tuple(g) for g in grid.tolist()]
        vit = tok.visual(pixels, grids)
        assert_close(vit, fx[f"img{i}_vit_last_hidden"], f"img{i} ViT")
        projected = tok.mlp_AR(vit, grids)
        assert_close(projected, fx[f"img{i}_projector_out"], f"img{i} projector")
        z = tok.encoder(projected)
        assert_close(z.view(z.shape[0], n_q, -1).transpose(0, 1), fx[f"img{i}_z_e"], f"img{i} z_e")
        ids = engine.tokenize_images(pixels, grid)
        assert torch.equal(ids, fx[f"img{i}_aligned_indices"]), f"img{i} ids ({vq})"
        codes = ids - llm.vocab_size - k * torch.arange(n_q)
        assert torch.equal(codes, fx[f"img{i}_indices"])
        assert_close(tok.forward_indices(codes), fx[f"img{i}_fused_embeds"], f"img{i} fused embeds")


def test_packed_images_do_not_attend_to_each_other(golden_ar, load_fixture):
    """All images in one call give each image's own ids (the release's varlen semantics, quirk 1)."""
    fx = load_fixture("ar_visual")
    want = torch.cat([fx[f"img{i}_aligned_indices"] for i in range(_images(fx))])
    assert torch.equal(golden_ar.tokenize_images(fx["pixel_values"], fx["image_grid_thw"]), want)
