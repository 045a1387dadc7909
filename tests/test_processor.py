"""Image patchify against the recorded pixel values of every golden image."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file

from kelix_fast.processor import image_to_patches


def test_patches_match_the_recorded_pixel_values(golden_dir):
    fx = load_file(golden_dir / "ar_visual.safetensors")
    for i in itertools.takewhile(lambda i: f"img{i}_rgb_u8" in fx, itertools.count()):
        pixels, grid = image_to_patches(fx[f"img{i}_rgb_u8"])
        assert torch.equal(grid, fx[f"img{i}_grid_thw"])
        assert torch.equal(pixels, fx[f"img{i}_pixel_values"])


@pytest.mark.parametrize(
    "image, error, match",
    [
        (torch.zeros(56, 84, 3), ValueError, r"image must be uint8 of shape \[H, W, 3\]"),
        (
            torch.zeros(56, 84, dtype=torch.uint8),
            ValueError,
            r"image must be uint8 of shape \[H, W, 3\]",
        ),
        (torch.zeros(56, 70, 3, dtype=torch.uint8), ValueError, "multiples of 28, got 56 x 70"),
        (torch.zeros(0, 28, 3, dtype=torch.uint8), ValueError, "multiples of 28"),
        ([[0]], TypeError, "image must be a torch.Tensor"),
    ],
)
def test_bad_images_are_rejected(image, error, match):
    with pytest.raises(error, match=match):
        image_to_patches(image)
