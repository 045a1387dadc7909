"""Image preprocessing: RGB pixels -> normalised 14x14 patches in raster order (kelix-ar.md §3.1 steps 3-4).

The resizing steps of the release processor (smart resize) are not here yet: images must already have sides
that are multiples of ``2 * patch_size`` (28), as the release processor's output always does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

KEYE_MEAN = (0.5, 0.5, 0.5)
KEYE_STD = (0.5, 0.5, 0.5)


def image_to_patches(
    image: torch.Tensor,
    *,
    patch_size: int = 14,
    mean: Sequence[float] = KEYE_MEAN,
    std: Sequence[float] = KEYE_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One RGB image -> (pixel_values [h*w, 3, p, p] float32, image_grid_thw [1, 3] int64 = (1, h, w)).

    Args:
        image: [H, W, 3] uint8; H and W multiples of ``2 * patch_size`` (the 2x2 merge needs even grids).
        mean, std: per-channel normalisation after scaling to [0, 1] (the scale is computed in float64).

    Patches are emitted row-major over the patch grid, each as (channel, row, col).
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor [H, W, 3] uint8, got {type(image).__name__}")
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"image must be uint8 of shape [H, W, 3], got {image.dtype} {list(image.shape)}"
        )
    height, width = image.shape[:2]
    step = 2 * patch_size
    if height == 0 or width == 0 or height % step or width % step:
        raise ValueError(
            f"image sides must be positive multiples of {step}, got {height} x {width}"
        )
    x = (image.double() * (1.0 / 255.0)).float()
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    h, w = height // patch_size, width // patch_size
    patches = x.permute(2, 0, 1).reshape(3, h, patch_size, w, patch_size).permute(1, 3, 0, 2, 4)
    return patches.reshape(h * w, 3, patch_size, patch_size).contiguous(), torch.tensor([[1, h, w]])
