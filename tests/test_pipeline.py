"""``KelixPipeline.tiny()``: every public entry point runs with no files, and reports its stages."""

from __future__ import annotations

import pytest
import torch

from kelix_fast.pipeline import KelixPipeline


@pytest.fixture(scope="module")
def pipe():
    return KelixPipeline.tiny(seed=1, device="cpu")


def _image():
    return torch.arange(56 * 84 * 3).reshape(56, 84, 3).remainder(256).to(torch.uint8)


def test_tokenize_image(pipe):
    ids = pipe.tokenize_image(_image())
    assert ids.shape == (6, 8) and ids.dtype == torch.int64
    assert set(pipe.timings) == {"preprocess", "vit_vq"}


def test_chat_with_an_image_and_with_messages(pipe):
    answer = pipe.chat((_image(), "What is this?"), max_new_tokens=3)
    assert isinstance(answer, str)
    assert set(pipe.timings) == {"preprocess", "vit_vq", "prefill", "decode", "detokenize"}
    again = pipe.chat([{"role": "user", "content": "hello"}], max_new_tokens=3)
    assert isinstance(again, str)
    with pytest.raises(TypeError, match=r"\(image, question: str\)"):
        pipe.chat((_image(),), max_new_tokens=1)


def test_generate_image_is_deterministic_per_seed(pipe):
    a = pipe.generate_image("a fox", steps=2, size=64, seed=3)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert list(pipe.timings) == ["preprocess", "prefill", "decode", "dit", "vae"]
    b = pipe.generate_image("a fox", steps=2, size=64, seed=3)
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "steps must be an int >= 1"),
        # the caller's argument is size (sample_latents calls it image_size)
        ({"size": 100}, r"generate_image: size must be a positive multiple of 32"),
        ({"guidance_scale": -1.0}, "guidance_scale must be a finite number >= 0"),
        ({"noise": torch.zeros(1, 8, 3, 3)}, r"noise must have shape \[1, 8, 2, 2\]"),
    ],
)
def test_generate_image_rejects_bad_arguments(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe.generate_image("a fox", **{"size": 64, **kwargs})


def test_reconstruct_runs_the_aedit_path(pipe):
    image = pipe.reconstruct(_image(), steps=2, size=64, seed=0)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert list(pipe.timings) == ["preprocess", "vit_vq", "dit", "vae"]
    again = pipe.reconstruct(_image(), steps=2, size=64, seed=0)
    assert image.tobytes() == again.tobytes()
    with pytest.raises(ValueError, match="fusion must be 'sum' or 'mean'"):
        pipe.reconstruct(_image(), steps=1, size=64, fusion="max")


def test_mean_fusion_is_the_sum_over_the_codebook_count(pipe):
    tok = pipe.ar.model.tokenizer
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    total = tok.forward_indices(codes, fusion="sum")
    torch.testing.assert_close(tok.forward_indices(codes, fusion="mean"), total / 8)
