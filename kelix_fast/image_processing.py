"""Image preprocessing of the Kelix processor (kelix-ar.md §3.1 steps 1 to 4).

Computes, for one image (a PIL image, a uint8/uint16 array or tensor, or a file path), the model's
``pixel_values [h*w, 3, p, p]`` float32 and ``image_grid_thw [1, 3]`` int64: load as RGB (higher
bit depths scaled to 8 bits), two bicubic resizes to :func:`smart_resize` sizes (the demo's
``fetch_image`` bounds, then the image processor's), rescale, normalise and cut into patches. It
mirrors the release ``SiglipImageProcessor`` and the demo's ``keye_vl_utils.fetch_image``; the
settings are an :class:`ImageProcessorConfig`, read from a checkpoint's
``preprocessor_config.json``. Pillow is imported when first used.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import numpy as np
import torch

from kelix_fast.arguments import check_int, is_int
from kelix_fast.checkpoint_files import checkpoint_dir, read_optional_json

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "ImageInput",
    "ImageProcessorConfig",
    "check_pixel_bounds",
    "image_to_patches",
    "load_image",
    "preprocess_image",
    "smart_resize",
]

_LOG = logging.getLogger(__name__)

ImageInput: TypeAlias = "Image.Image | np.ndarray | torch.Tensor | str | os.PathLike[str]"

KEYE_MEAN = (0.5, 0.5, 0.5)
KEYE_STD = (0.5, 0.5, 0.5)
MAX_ASPECT_RATIO = 200


def image_to_patches(
    image: torch.Tensor,
    *,
    patch_size: int = 14,
    mean: Sequence[float] = KEYE_MEAN,
    std: Sequence[float] = KEYE_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One RGB image -> (pixel_values [h*w, 3, p, p] float32, image_grid_thw [1, 3] int64).

    The grid row is (1, h, w) with h = H / p and w = W / p.

    Args:
        image: [H, W, 3] uint8; H and W multiples of ``2 * patch_size`` (the 2x2 merge needs even
            grids).
        mean, std: per-channel normalisation after scaling to [0, 1] (the scale is computed in
            float64).

    Patches are emitted row-major over the patch grid, each as (channel, row, col).
    """
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor [H, W, 3] uint8, got {type(image).__name__}")
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(
            f"image must be uint8 of shape [H, W, 3], got {image.dtype} {list(image.shape)}"
        )
    height, width = image.shape[:2]
    step = 2 * check_int("image_to_patches: patch_size", patch_size, minimum=1)
    if height == 0 or width == 0 or height % step or width % step:
        raise ValueError(
            f"image sides must be positive multiples of {step}, got {height} x {width}"
        )
    x = (image.double() * (1.0 / 255.0)).float()
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    h, w = height // patch_size, width // patch_size
    patches = x.permute(2, 0, 1).reshape(3, h, patch_size, w, patch_size).permute(1, 3, 0, 2, 4)
    return patches.reshape(h * w, 3, patch_size, patch_size).contiguous(), torch.tensor([[1, h, w]])


def smart_resize(
    height: int, width: int, *, factor: int = 28, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor`` near the input, area in [min, max] pixels.

    kelix-ar.md §3.1 step 1: round each side to the nearest multiple (Python ``round``, so halves go
    to the even multiple: 70 -> 56), at least ``factor``; if the area exceeds ``max_pixels`` scale
    both sides down by beta = sqrt(h*w / max_pixels) and floor to multiples; else if it is below
    ``min_pixels`` scale up by beta = sqrt(min_pixels / (h*w)) and ceil to multiples; finally each
    side is at least ``factor``.

    Raises: ValueError for a side < 1, an aspect ratio above 200 or bounds that are not ints
    ``1 <= min_pixels <= max_pixels`` (TypeError for a non-integer).
    """
    factor = check_int("smart_resize: factor", factor, minimum=1)
    min_pixels, max_pixels = check_pixel_bounds("smart_resize", min_pixels, max_pixels)
    if not (is_int(height) and is_int(width)):
        raise TypeError(f"smart_resize: height and width must be ints, got {height!r} x {width!r}")
    if height < 1 or width < 1:
        raise ValueError(f"smart_resize: height and width must be >= 1, got {height} x {width}")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"smart_resize: aspect ratio must be at most {MAX_ASPECT_RATIO}, "
            f"got {height} x {width} ({max(height, width) / min(height, width):.1f})"
        )
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    # The downscale can floor a very thin side to 0.
    return max(h_bar, factor), max(w_bar, factor)


def check_pixel_bounds(
    op: str,
    min_pixels: object,
    max_pixels: object,
    names: tuple[str, str] = ("min_pixels", "max_pixels"),
    *,
    ceiling: int | None = None,
) -> tuple[int, int]:
    """An image-area range: ints with ``1 <= min_pixels <= max_pixels`` (``<= ceiling`` when given)
    -> the pair. ``names``: the caller's names of the two (``fetch_min_pixels``, ...). A zero
    ``max_pixels`` would divide by zero in :func:`smart_resize`, and an empty range resizes to a size
    outside it."""
    low, high = (
        check_int(f"{op}: {name}", value, minimum=1, maximum=ceiling)
        for name, value in zip(names, (min_pixels, max_pixels))
    )
    if low > high:
        raise ValueError(f"{op}: {names[0]} must be <= {names[1]}, got {low} > {high}")
    return low, high


@dataclass(frozen=True)
class ImageProcessorConfig:
    """Image preprocessing settings (kelix-ar.md §3.1).

    The defaults are those of the release processor's code, so they apply when a checkpoint has no
    ``preprocessor_config.json``: ``min_pixels`` 3,136 and ``max_pixels`` 1,003,520 (1280 merged
    tokens) for the image processor (step 2), 3,136 and 16,056,320 for the demo's ``fetch_image``
    (step 1, the history copy of ``keye_vl_utils``), and mean = std = 0.5 as the Keye family ships
    (the golden fixtures use it too; the code's own default would be the OpenAI-CLIP values).
    """

    patch_size: int = 14
    merge_size: int = 2
    min_pixels: int = 3136
    max_pixels: int = 1_003_520
    image_mean: tuple[float, float, float] = KEYE_MEAN
    image_std: tuple[float, float, float] = KEYE_STD
    fetch_min_pixels: int = 3136
    fetch_max_pixels: int = 16_056_320

    def __post_init__(self) -> None:
        if self.merge_size != 2:
            raise ValueError(
                f"ImageProcessorConfig: merge_size must be 2 (the projector merges 2x2 patches), "
                f"got {self.merge_size}"
            )
        check_int("ImageProcessorConfig: patch_size", self.patch_size, minimum=1)
        for names in (("min_pixels", "max_pixels"), ("fetch_min_pixels", "fetch_max_pixels")):
            check_pixel_bounds(
                "ImageProcessorConfig", *(getattr(self, name) for name in names), names=names
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError(
                f"ImageProcessorConfig: image_mean and image_std must hold 3 values, std > 0, "
                f"got {self.image_mean} and {self.image_std}"
            )

    @property
    def factor(self) -> int:
        """Side multiple of resized images: one merged token covers factor x factor pixels."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> ImageProcessorConfig:
        """Settings from ``preprocessor_config.json`` in a checkpoint directory (the HF/Keye keys).

        Reads ``min_pixels``/``max_pixels`` (or ``size.shortest_edge``/``size.longest_edge``),
        ``image_mean``, ``image_std``, ``patch_size``, ``merge_size``; refuses settings this
        processor does not implement (``temporal_patch_size`` other than 1, rescaling other than
        1/255, disabled resize/rescale/normalise) rather than ignoring them. Without the file: the
        class defaults.
        """
        op = "ImageProcessorConfig.from_pretrained"
        file = checkpoint_dir(op, path) / "preprocessor_config.json"
        raw = read_optional_json(file)
        if raw is None:
            _LOG.warning("%s: no %s; using the default image settings", op, file)
            return cls()
        unsupported = {
            "temporal_patch_size": 1,
            "do_resize": True,
            "do_rescale": True,
            "do_normalize": True,
            "do_convert_rgb": True,
        }
        for key, expected in unsupported.items():
            if raw.get(key, expected) != expected:
                raise ValueError(f"{op}: {file} must have {key} = {expected}, got {raw[key]!r}")
        if not math.isclose(raw.get("rescale_factor", 1 / 255), 1 / 255, rel_tol=1e-9):
            raise ValueError(
                f"{op}: {file} must have rescale_factor = 1/255, got {raw['rescale_factor']!r}"
            )
        size = raw.get("size") or {}
        fields = {
            "min_pixels": raw.get("min_pixels", size.get("shortest_edge")),
            "max_pixels": raw.get("max_pixels", size.get("longest_edge")),
            "image_mean": tuple(raw["image_mean"]) if "image_mean" in raw else None,
            "image_std": tuple(raw["image_std"]) if "image_std" in raw else None,
            "patch_size": raw.get("patch_size"),
            "merge_size": raw.get("merge_size"),
        }
        return cls(**{k: v for k, v in fields.items() if v is not None})


def load_image(image: ImageInput) -> Image.Image:
    """Any supported image input -> an RGB PIL image.

    Args:
        image: a PIL image (any mode); a uint8 or uint16 numpy array or torch tensor, channels last:
            [H, W] or [H, W, 1] (grey), [H, W, 3] (RGB) or [H, W, 4] (RGBA); or a file path.
    Non-RGB inputs are converted with PIL's ``convert("RGB")`` (alpha is dropped), as the demo does.

    Higher-depth inputs are first brought to 8 bits, never saturated: 16-bit data (PIL ``I;16*``
    modes, uint16 arrays/tensors) and PIL ``I`` images (32-bit ints, as Pillow opens 16-bit PNGs)
    holding values in 0..65535 are divided by 257 and rounded (65535 -> 255, as Pillow/torchvision
    scale 16 to 8 bits); an ``I`` image with values outside 0..65535 is refused. Float data (PIL
    ``F`` mode) is taken as 0..1, multiplied by 255, rounded and clamped to 0..255; NaN or infinite
    values are refused. Arrays and tensors must be uint8 or uint16 (scaled as above): float ones are
    refused, their range (0..1 or 0..255) being ambiguous, as are other dtypes.

    Raises: TypeError (unsupported type), ValueError (bad dtype or shape, empty, unreadable file).
    """
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        try:
            pil = Image.open(image)
            pil.load()
        except OSError as exc:  # missing file, unknown format, truncated data
            raise ValueError(
                f"load_image: image file {os.fspath(image)!r} could not be read: {exc}"
            ) from exc
    elif isinstance(image, Image.Image):
        pil = _to_8bit(image)
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        pil = _array_to_image(image)
    else:
        raise TypeError(
            "load_image: image must be a PIL image, a uint8 numpy array or torch tensor, or a "
            f"path, got {type(image).__name__}"
        )
    if pil.width == 0 or pil.height == 0:
        raise ValueError(f"load_image: image must be non-empty, got {pil.height} x {pil.width}")
    return pil if pil.mode == "RGB" else pil.convert("RGB")


def _scale_to_uint8(array: np.ndarray, what: str) -> np.ndarray:
    """uint8 (as is), uint16 (/257) or float 0..1 (*255, clamped) data -> uint8; see load_image."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ValueError(f"load_image: {what} must hold only finite values, got NaN or Inf")
        return np.clip(np.round(array.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    raise ValueError(
        f"load_image: {what} must be uint8, uint16 (0..65535) or float (0..1), got {array.dtype}"
    )


def _to_8bit(pil: Image.Image) -> Image.Image:
    """A PIL image of a 16-bit, 32-bit int or float mode -> mode L (see load_image)."""
    from PIL import Image

    mode = pil.mode
    if mode.startswith("I;16"):
        array = np.array(pil).astype(np.uint16)
    elif mode == "I":
        array = np.array(pil)
        if array.size and (array.min() < 0 or array.max() > 65535):
            raise ValueError(
                "load_image: a mode 'I' image must hold 16-bit values 0..65535, got "
                f"{array.min()}..{array.max()}"
            )
        array = array.astype(np.uint16)
    elif mode == "F":
        array = np.array(pil)
    else:
        return pil
    return Image.fromarray(_scale_to_uint8(array, f"a mode {mode!r} image"))


def _array_to_image(array: np.ndarray | torch.Tensor) -> Image.Image:
    from PIL import Image

    kind = type(array).__name__
    why = (
        " (or uint16, scaled by 1/257; float data is refused: its range, 0..1 or 0..255, is "
        "ambiguous; convert it to uint8, or pass a PIL mode 'F' image of 0..1 values)"
    )
    if isinstance(array, torch.Tensor):
        if array.dtype not in (torch.uint8, getattr(torch, "uint16", torch.uint8)):
            raise ValueError(f"load_image: image tensor must be uint8, got {array.dtype}{why}")
        array = array.detach().cpu().numpy()
    elif array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"load_image: image array must be uint8, got {array.dtype}{why}")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(
            f"load_image: image {kind} must be channels last, [H, W], [H, W, 1], [H, W, 3] or "
            f"[H, W, 4], got shape {list(array.shape)}"
        )
    if array.size == 0:
        raise ValueError(f"load_image: image must be non-empty, got shape {list(array.shape)}")
    array = _scale_to_uint8(array, f"image {kind}")
    return Image.fromarray(np.ascontiguousarray(array))


def _resize(image: Image.Image, height: int, width: int) -> Image.Image:
    from PIL import Image

    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.BICUBIC)


def preprocess_image(
    image: ImageInput,
    config: ImageProcessorConfig = ImageProcessorConfig(),
    *,
    fetch_min_pixels: int | None = None,
    fetch_max_pixels: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image -> (pixel_values [h*w, 3, p, p] float32, image_grid_thw [1, 3] int64 = (1, h, w)).

    kelix-ar.md §3.1: load as RGB; bicubic resize to smart_resize with the fetch bounds (step 1,
    the demo's ``fetch_image``); bicubic resize to smart_resize with the image processor's bounds
    (step 2); rescale by 1/255 in float64, normalise with mean/std, cut p x p patches in raster
    order. A resize to the current size is skipped, so images already sized by the processor pass
    through unchanged.

    Args:
        image: see ``load_image``.
        fetch_min_pixels, fetch_max_pixels: per-image step-1 bounds (a message's ``min_pixels`` and
            ``max_pixels`` keys); default ``config.fetch_min_pixels`` / ``config.fetch_max_pixels``.
    """
    if not isinstance(config, ImageProcessorConfig):
        raise TypeError(
            f"preprocess_image: config must be an ImageProcessorConfig, got {type(config).__name__}"
        )
    fetch_min, fetch_max = check_pixel_bounds(
        "preprocess_image",
        config.fetch_min_pixels if fetch_min_pixels is None else fetch_min_pixels,
        config.fetch_max_pixels if fetch_max_pixels is None else fetch_max_pixels,
        names=("fetch_min_pixels", "fetch_max_pixels"),
    )
    pil = load_image(image)
    pil = _resize(
        pil,
        *smart_resize(
            pil.height, pil.width, factor=config.factor, min_pixels=fetch_min, max_pixels=fetch_max
        ),
    )
    pil = _resize(
        pil,
        *smart_resize(
            pil.height,
            pil.width,
            factor=config.factor,
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
        ),
    )
    return image_to_patches(
        torch.from_numpy(np.array(pil)),
        patch_size=config.patch_size,
        mean=config.image_mean,
        std=config.image_std,
    )
