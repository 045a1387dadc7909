"""Every bad input of the public AR API raises a clear error naming the argument, before any compute."""

from __future__ import annotations

import pytest
import torch

from kelix_fast import KelixAR, presets
from kelix_fast.processor import image_to_patches

PROMPT = [presets.IM_START, 872, 198, presets.IM_END, 198, presets.IM_START, 77091, 198]


@pytest.fixture(scope="module")
def tiny():
    return KelixAR.tiny(seed=0, device="cpu")


@pytest.fixture(scope="module")
def image():
    return image_to_patches(torch.full((56, 84, 3), 128, dtype=torch.uint8))


def _with_placeholders(n: int) -> list[int]:
    return [
        presets.IM_START,
        presets.VISION_START,
        *[presets.IMAGE_PAD] * n,
        presets.VISION_END,
        198,
    ]


@pytest.mark.parametrize(
    "pixels, grid, error, match",
    [
        (
            torch.zeros(24, 3, 14),
            [[1, 4, 6]],
            ValueError,
            r"pixel_values must have shape \[N, 3, 14, 14\]",
        ),
        (torch.zeros(24, 1, 14, 14), [[1, 4, 6]], ValueError, r"pixel_values must have shape"),
        (
            torch.zeros(24, 3, 14, 14, dtype=torch.int64),
            [[1, 4, 6]],
            ValueError,
            "must be a float tensor",
        ),
        ([[0.0]], [[1, 4, 6]], TypeError, "pixel_values must be a torch.Tensor"),
        (
            torch.zeros(24, 3, 14, 14),
            [[1, 4, 4]],
            ValueError,
            "24 patches but image_grid_thw describes 16",
        ),
        (torch.zeros(15, 3, 14, 14), [[1, 3, 5]], ValueError, "h and w must be even"),
        (torch.zeros(24, 3, 14, 14), [[2, 2, 6]], ValueError, r"must have t = 1"),
        (torch.zeros(24, 3, 14, 14), torch.zeros(1, 3), ValueError, "integer tensor"),
        (
            torch.zeros(24, 3, 14, 14),
            [[1, 4]],
            ValueError,
            r"image_grid_thw must have shape \[n >= 1, 3\]",
        ),
    ],
)
def test_tokenize_images_rejects_bad_pixels_and_grids(tiny, pixels, grid, error, match):
    grid = torch.tensor(grid) if isinstance(grid, list) else grid
    with pytest.raises(error, match=match):
        tiny.tokenize_images(pixels, grid)


@pytest.mark.parametrize(
    "prompt, match",
    [
        (
            [[1, 2, -1]],
            r"prompt_ids\[0\] must hold text ids in \[0, 151936\), got -1 at position 2",
        ),
        ([[1, 151936]], r"must hold text ids in \[0, 151936\), got 151936"),
        ([[]], r"prompt_ids\[0\] is empty"),
        ([], "at least one prompt"),
        (torch.zeros(3, dtype=torch.int64), r"prompt_ids must have shape \[B, L\]"),
        (torch.tensor([[1.5, 2.0]]), "must be a 1-D integer sequence"),
    ],
)
def test_generate_rejects_bad_prompt_ids(tiny, prompt, match):
    with pytest.raises(ValueError, match=match):
        tiny.generate(prompt, max_new_blocks=1)


def test_generate_rejects_a_prompt_longer_than_the_context(tiny):
    limit = tiny.config.llm.max_seq_len
    with pytest.raises(
        ValueError, match=f"longer than the model's maximum context max_seq_len = {limit}"
    ):
        tiny.generate([[1] * (limit + 1)], max_new_blocks=1)
    with pytest.raises(
        ValueError, match="max_new_blocks = 10 with a 4090-token prompt needs 4099 positions"
    ):
        tiny.generate([[1] * (limit - 6)], max_new_blocks=10)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_new_blocks": 0}, ValueError, "max_new_blocks must be an int >= 1, got 0"),
        ({"max_new_blocks": 2.0}, TypeError, "max_new_blocks must be an int"),
        ({"max_new_blocks": 1, "top_p": 0.0}, ValueError, r"top_p must lie in \(0, 1\], got 0.0"),
        ({"max_new_blocks": 1, "top_p": 1.5}, ValueError, r"top_p must lie in \(0, 1\], got 1.5"),
        (
            {"max_new_blocks": 1, "temperature": -0.1},
            ValueError,
            "temperature must be a finite number >= 0",
        ),
        ({"max_new_blocks": 1, "top_k": -1}, ValueError, "top_k must be >= 0"),
        ({"max_new_blocks": 1, "top_k": 2.5}, TypeError, "top_k must be an int"),
        ({"max_new_blocks": 1, "sampler": "beam"}, ValueError, "sampler must be one of"),
        (
            {"max_new_blocks": 1, "seed": [1, 2]},
            ValueError,
            "seed must be None, an int or a list of 1 ints",
        ),
        (
            {"max_new_blocks": 1, "seed": -1},
            ValueError,
            r"seed must be an int in \[0, 2\^31\), got -1",
        ),
        ({"max_new_blocks": 1, "seed": 2**31}, ValueError, r"seed must be an int in \[0, 2\^31\)"),
        (
            {"max_new_blocks": 1, "top_k": [1, 2]},
            ValueError,
            r"top_k must be one value or 1 values \(one per request\), got 2 values",
        ),
        ({"max_new_blocks": 1, "scoring": "fast"}, ValueError, "scoring must be one of"),
        (
            {"max_new_blocks": 1, "cuda_graphs": True},
            ValueError,
            "cuda_graphs=True needs the model on a CUDA device",
        ),
        ({"max_new_blocks": 1, "cuda_graphs": 1}, TypeError, "cuda_graphs must be None or a bool"),
        (
            {"max_new_blocks": 1, "sampler": "reference", "scoring": "structured"},
            ValueError,
            'sampler="reference" scores the full vocabulary',
        ),
    ],
)
def test_generate_rejects_bad_generation_arguments(tiny, kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny.generate([PROMPT], **kwargs)


def test_generate_rejects_placeholder_image_mismatch(tiny, image):
    pixels, grid = image  # 6 merged tokens
    with pytest.raises(
        ValueError, match="the prompt has 7 image placeholders .* the images give 6 tokens"
    ):
        tiny.generate(
            [_with_placeholders(7)], pixel_values=pixels, image_grid_thw=grid, max_new_blocks=1
        )
    with pytest.raises(
        ValueError, match="the prompt has 5 image placeholders .* the images give 6 tokens"
    ):
        tiny.generate(
            [_with_placeholders(5)], pixel_values=pixels, image_grid_thw=grid, max_new_blocks=1
        )
    with pytest.raises(ValueError, match="holds 6 image placeholders .* but no pixel_values"):
        tiny.generate([_with_placeholders(6)], max_new_blocks=1)
    with pytest.raises(ValueError, match="pixel_values and image_grid_thw must be given together"):
        tiny.generate([_with_placeholders(6)], pixel_values=pixels, max_new_blocks=1)


def test_expand_prompt_rejects_bad_image_ids(tiny):
    prompt = torch.tensor([_with_placeholders(2)])
    with pytest.raises(ValueError, match=r"image_ids must be int64 of shape \[n_tok, 8\]"):
        tiny.expand_prompt(prompt, torch.zeros(2, 7, dtype=torch.int64))
    with pytest.raises(
        ValueError, match=r"image_ids must hold visual ids in \[151936, 152448\), got 5"
    ):
        tiny.expand_prompt(prompt, torch.full((2, 8), 5))
    with pytest.raises(ValueError, match="2 image placeholders .* the images give 3 tokens"):
        tiny.expand_prompt(prompt, torch.full((3, 8), 151936))


@pytest.mark.parametrize(
    "groups, error, match",
    [
        (
            torch.zeros(1, 4, 8, dtype=torch.int64),
            ValueError,
            r"groups must be int64 of shape \[B, L, 9\]",
        ),
        (torch.zeros(1, 4, 9, dtype=torch.int32), ValueError, r"groups must be int64"),
        (
            torch.full((1, 4, 9), 152448),
            ValueError,
            r"groups must hold ids in \[0, 152448\), got 152448",
        ),
        (torch.zeros(1, 0, 9, dtype=torch.int64), ValueError, "at least one position"),
        ([[0] * 9], TypeError, "groups must be a torch.Tensor"),
    ],
)
def test_scoring_rejects_bad_groups(tiny, groups, error, match):
    with pytest.raises(error, match=match):
        tiny.forward_teacher_forced(groups)
    with pytest.raises(error, match=match):
        tiny.forward_greedy_blocks(groups)


def test_constructor_rejects_unknown_modes():
    with pytest.raises(ValueError, match=r"vq must be one of \['reference', 'exact'\], got 'fast'"):
        KelixAR.tiny(device="cpu", vq="fast")
    with pytest.raises(ValueError, match="dtype must be float32, bfloat16 or float16"):
        KelixAR.tiny(device="cpu", dtype=torch.int8)


def test_reference_sampler_takes_one_set_of_parameters(tiny):
    with pytest.raises(
        ValueError, match='sampler="reference" takes one set of sampling parameters'
    ):
        tiny.generate([PROMPT, PROMPT], max_new_blocks=1, top_k=[1, 5], sampler="reference")
