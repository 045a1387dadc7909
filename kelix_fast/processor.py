"""Kelix processor: text tokenizer, chat template, image preprocessing (kelix-ar.md §2.2, §3.1).

``KelixProcessor`` turns chat messages (text and images) into what the engine consumes:
``prompt_ids [1, L]`` with each image placeholder expanded to one ``<|image_pad|>`` per merged
patch, ``pixel_values [Np, 3, 14, 14]`` and ``image_grid_thw [n, 3]``. It mirrors the release
processor (``KeyeProcessor`` + ``SiglipImageProcessor``) and the demo's
``keye_vl_utils.fetch_image``. Called like a transformers processor (``processor(text=[...],
images=[...], return_tensors="pt")``) it returns ``input_ids``, ``attention_mask``, ``pixel_values``
and ``image_grid_thw``, which ``KelixAR.generate(**outputs)`` takes as they are.

Special tokens are looked up by their strings, never by hard-coded ids; the one exception is
``KelixTextTokenizer.tiny()``, the in-code tokenizer of the embedded tiny preset, which places them
at their release ids. Pillow (images) and jinja2 (a checkpoint's own jinja chat template) are
imported when first used, so text-only use needs neither.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from kelix_fast.arguments import check_bool, check_int, describe, is_int
from kelix_fast.hub import resolve_pretrained

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "ImageProcessorConfig",
    "KelixProcessor",
    "KelixTextTokenizer",
    "ProcessorOutput",
    "expand_image_placeholders",
    "image_to_patches",
    "load_image",
    "preprocess_image",
    "smart_resize",
]

_LOG = logging.getLogger(__name__)

ImageInput: TypeAlias = "Image.Image | np.ndarray | torch.Tensor | str | os.PathLike[str]"
Message: TypeAlias = Mapping[str, Any]

KEYE_MEAN = (0.5, 0.5, 0.5)
KEYE_STD = (0.5, 0.5, 0.5)
MAX_ASPECT_RATIO = 200
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Special token strings of the release (kelix-ar.md §2.2); their ids come from the tokenizer files.
ENDOFTEXT_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
VISION_START_TOKEN = "<|vision_start|>"
VISION_END_TOKEN = "<|vision_end|>"
IMAGE_PAD_TOKEN = "<|image_pad|>"

# The tiny preset's special tokens at their release ids (kelix-ar.md §2.2, presets.py). The release
# string of the end-of-block id 151681 is unknown; the paper's name "<eob>" stands in for it here.
_TINY_SPECIAL_TOKENS = {
    ENDOFTEXT_TOKEN: 151643,
    IM_START_TOKEN: 151644,
    IM_END_TOKEN: 151645,
    VISION_START_TOKEN: 151652,
    VISION_END_TOKEN: 151653,
    IMAGE_PAD_TOKEN: 151655,
    "<|video_pad|>": 151656,
    "<eob>": 151681,
}

# Pre-tokenizer split of Qwen2Tokenizer (what HF's Qwen2 slow -> fast conversion builds).
_QWEN_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_ADDED_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized", "special")
# Special-token entries of tokenizer_config.json that HF also passes to the chat template.
_TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


# --------------------------------------------------------------------------------------------------
# Image preprocessing
# --------------------------------------------------------------------------------------------------


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
        file = _checkpoint_dir(op, path) / "preprocessor_config.json"
        raw = _read_json(file)
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


def expand_image_placeholders(
    text: str,
    image_grid_thw: torch.Tensor,
    *,
    image_pad: str = IMAGE_PAD_TOKEN,
    merge_size: int = 2,
) -> str:
    """Replace the k-th ``image_pad`` of ``text`` by t*h*w / merge_size**2 copies (§3.1 step 5).

    Args:
        image_grid_thw: [n, 3] int64, one (t, h, w) row per image in order of appearance.
    Raises: ValueError when the text does not hold exactly one placeholder per image.
    """
    if image_grid_thw.dim() != 2 or image_grid_thw.shape[1] != 3:
        raise ValueError(
            "expand_image_placeholders: image_grid_thw must have shape [n, 3], "
            f"got {list(image_grid_thw.shape)}"
        )
    pieces = text.split(image_pad)
    if len(pieces) - 1 != image_grid_thw.shape[0]:
        raise ValueError(
            f"expand_image_placeholders: text must hold one {image_pad} per image, got "
            f"{len(pieces) - 1} placeholders for {image_grid_thw.shape[0]} images"
        )
    counts = (image_grid_thw.prod(dim=1) // merge_size**2).tolist()
    expanded = [pieces[0]]
    for count, piece in zip(counts, pieces[1:], strict=True):
        expanded += [image_pad * count, piece]
    return "".join(expanded)


# --------------------------------------------------------------------------------------------------
# Text tokenizer and chat template
# --------------------------------------------------------------------------------------------------


class KelixTextTokenizer:
    """Qwen byte-level BPE tokenizer with the Kelix special tokens and the release chat template.

    Wraps a ``tokenizers.Tokenizer`` (``backend``). The special ids the engine needs are looked up
    by string at construction (``endoftext_id``, ``im_start_id``, ``im_end_id``,
    ``vision_start_id``, ``vision_end_id``, ``image_pad_id``), so a tokenizer lacking one fails
    here, not mid-prompt.

    Args:
        tokenizer: the backend tokenizer; added tokens must already be registered.
        chat_template: jinja source of the release template, or None for the documented Qwen
            template (kelix-ar.md §3.1, "Chat template").
        template_tokens: extra jinja variables, e.g. ``{"eos_token": "<|im_end|>"}``.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        chat_template: str | None = None,
        template_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self.backend = tokenizer
        self.chat_template = chat_template
        self._template_tokens = dict(template_tokens or {})
        self.endoftext_id = self.token_id(ENDOFTEXT_TOKEN)
        self.im_start_id = self.token_id(IM_START_TOKEN)
        self.im_end_id = self.token_id(IM_END_TOKEN)
        self.vision_start_id = self.token_id(VISION_START_TOKEN)
        self.vision_end_id = self.token_id(VISION_END_TOKEN)
        self.image_pad_id = self.token_id(IMAGE_PAD_TOKEN)
        # Control strings user text must not produce: every special added token, plus the Kelix
        # markers even where a checkpoint registers them as non-special.
        control = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
        control |= {
            ENDOFTEXT_TOKEN,
            IM_START_TOKEN,
            IM_END_TOKEN,
            VISION_START_TOKEN,
            VISION_END_TOKEN,
            IMAGE_PAD_TOKEN,
        }
        self.control_tokens = tuple(sorted(control, key=lambda c: (-len(c), c)))
        self._control_re = re.compile("|".join(map(re.escape, self.control_tokens)))
        self._plain: Tokenizer | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str]) -> KelixTextTokenizer:
        """Load from a checkpoint directory.

        Files: ``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` (built as HF's Qwen2 converter
        does: NFC, Qwen split regex, byte-level); added tokens from ``added_tokens.json`` and
        ``tokenizer_config.json``'s ``added_tokens_decoder`` (their ids are checked); the chat
        template from ``chat_template.jinja``, else ``chat_template.json``, else
        ``tokenizer_config.json``.

        Raises: ValueError (not a directory, no tokenizer files, inconsistent added tokens, a
        missing Kelix special token).
        """
        op = "KelixTextTokenizer.from_pretrained"
        directory = _checkpoint_dir(op, path)
        config = _read_json(directory / "tokenizer_config.json") or {}
        if (directory / "tokenizer.json").is_file():
            tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            tokenizer = _qwen_bpe(directory / "vocab.json", directory / "merges.txt")
        else:
            raise ValueError(
                f"{op}: {directory} must hold tokenizer.json or vocab.json + merges.txt, "
                "found neither"
            )
        for token_id, token in _declared_added_tokens(directory, config):
            tokenizer.add_tokens([token])
            if tokenizer.token_to_id(token.content) != token_id:
                raise ValueError(
                    f"{op}: added token {token.content!r} must get its declared id {token_id}, got "
                    f"{tokenizer.token_to_id(token.content)} (added ids must follow the vocabulary "
                    "without gaps)"
                )
        template_tokens = {
            key: _token_content(config[key]) for key in _TEMPLATE_TOKEN_KEYS if config.get(key)
        }
        return cls(
            tokenizer,
            chat_template=_read_chat_template(directory, config),
            template_tokens=template_tokens,
        )

    @classmethod
    def tiny(cls) -> KelixTextTokenizer:
        """In-code tokenizer of the embedded tiny preset: bytes plus the Kelix special tokens.

        Byte-level BPE without merges: id b (0..255) is the token of byte b, so every string
        round-trips (one token per UTF-8 byte). The special tokens sit at their release ids
        (151643 ... 151681); every id is below the text vocabulary size 151936.
        """
        # Specials live in the model vocabulary so that their ids are kept exactly, also through a
        # tokenizer.json round trip; registering them as special added tokens makes them atomic.
        vocab = {symbol: byte for byte, symbol in enumerate(_byte_symbols())} | _TINY_SPECIAL_TOKENS
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens(list(_TINY_SPECIAL_TOKENS))
        return cls(tokenizer)

    def token_id(self, token: str) -> int:
        """Id of a single vocabulary or added token, e.g. ``token_id("<|im_end|>")``.

        Raises: ValueError when ``token`` is not one token of this tokenizer.
        """
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise ValueError(
                f"token_id: token must be in the tokenizer's vocabulary, got {token!r}"
            )
        return token_id

    def encode(self, text: str, *, allow_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``. Adds nothing.

        ``allow_special_tokens=True`` (this low-level method's default, for templated text): the
        special-token strings in ``text`` map to their ids. False: ``text`` is plain text, its
        control-token strings (:attr:`control_tokens`) are encoded byte by byte like any other text.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        check_bool("encode: allow_special_tokens", allow_special_tokens)
        if allow_special_tokens:
            return self.backend.encode(text, add_special_tokens=False).ids
        return self._plain_backend().encode(text, add_special_tokens=False).ids

    def _plain_backend(self) -> Tokenizer:
        """A copy of the backend that encodes control-token strings as plain text."""
        if self._plain is None:
            plain = Tokenizer.from_str(self.backend.to_str())
            plain.add_special_tokens(
                [AddedToken(c, special=True, normalized=False) for c in self.control_tokens]
            )
            plain.encode_special_tokens = True
            self._plain = plain
        return self._plain

    def escape_messages(self, messages: Sequence[Message]) -> tuple[list[Message], dict[str, str]]:
        """Messages whose text has each control-token string replaced by a one-off marker, and the
        marker -> string map: render them, then :meth:`encode_escaped` encodes the user's control
        strings as plain text while the template's own markers stay control tokens."""
        _check_messages(messages)
        nonce = secrets.token_hex(8)
        markers = {c: f"\ue000{nonce}.{i}\ue001" for i, c in enumerate(self.control_tokens)}

        def escape(text: str) -> str:
            return self._control_re.sub(lambda m: markers[m.group(0)], text)

        escaped = []
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                content = escape(content)
            else:
                content = [
                    {**item, "text": escape(item["text"])} if item["type"] == "text" else item
                    for item in content
                ]
            escaped.append({**message, "content": content})
        return escaped, {marker: c for c, marker in markers.items()}

    def encode_escaped(self, text: str, markers: Mapping[str, str]) -> list[int]:
        """Ids of ``text`` rendered from :meth:`escape_messages`: its control-token strings are
        control tokens, the stretches between them (markers restored) plain text."""
        present = [m for m in markers if m in text]
        if not present:  # no user control string: the ordinary encoding
            return self.encode(text)
        restore = re.compile("|".join(map(re.escape, present)))
        ids: list[int] = []
        start = 0
        for match in [*self._control_re.finditer(text), None]:
            end = len(text) if match is None else match.start()
            if end > start:
                plain = restore.sub(lambda m: markers[m.group(0)], text[start:end])
                ids += self.encode(plain, allow_special_tokens=False)
            if match is not None:
                ids.append(self.token_id(match.group(0)))
                start = match.end()
        return ids

    def decode(
        self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False
    ) -> str:
        """Text of ``ids`` (a sequence of ints or a 1-D integer tensor)."""
        check_bool("decode: skip_special_tokens", skip_special_tokens)
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True
    ) -> str:
        """Chat messages -> prompt text, one ``<|image_pad|>`` per image.

        Args:
            messages: ``[{"role": str, "content": str | [{"type": "text", "text": str} |
                {"type": "image", "image": ImageInput, ...}]}]``.
            add_generation_prompt: append ``<|im_start|>assistant\\n``.
        Uses the checkpoint's jinja template when it has one (rendered as HF does: sandboxed,
        trim_blocks, lstrip_blocks), else the documented Qwen template: a default system turn
        unless the first message is one, ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn,
        each image written as ``<|vision_start|><|image_pad|><|vision_end|>``.

        Raises: TypeError/ValueError (malformed messages or flag), ImportError (jinja template, no
        jinja2).
        """
        _check_messages(messages)
        check_bool("apply_chat_template: add_generation_prompt", add_generation_prompt)
        if self.chat_template is not None:
            return self._render_jinja(messages, add_generation_prompt)
        image = VISION_START_TOKEN + IMAGE_PAD_TOKEN + VISION_END_TOKEN
        turns = [] if messages[0]["role"] == "system" else [("system", DEFAULT_SYSTEM_PROMPT)]
        for message in messages:
            content = message["content"]
            if not isinstance(content, str):
                content = "".join(
                    image if item["type"] == "image" else item["text"] for item in content
                )
            turns.append((message["role"], content))
        text = "".join(f"{IM_START_TOKEN}{role}\n{body}{IM_END_TOKEN}\n" for role, body in turns)
        return text + (f"{IM_START_TOKEN}assistant\n" if add_generation_prompt else "")

    def _render_jinja(self, messages: Sequence[Message], add_generation_prompt: bool) -> str:
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:
            raise ImportError(
                "apply_chat_template: this tokenizer's chat template is a jinja template and "
                "rendering it needs the jinja2 package (pip install jinja2)"
            ) from exc
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_template_error
        # HF's tojson keeps non-ASCII text and does not HTML-escape, unlike jinja's builtin.
        env.filters["tojson"] = lambda value, indent=None: json.dumps(
            value, ensure_ascii=False, indent=indent
        )
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self._template_tokens
        )


def _byte_symbols() -> list[str]:
    """GPT-2's byte -> symbol table, which the ByteLevel pre-tokenizer applies: printable Latin-1
    bytes stand for themselves, the other 68 bytes for code points 256, 257, ... in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = iter(range(256, 512))
    return [chr(byte) if byte in printable else chr(next(others)) for byte in range(256)]


def _raise_template_error(message: str) -> None:
    raise ValueError(f"apply_chat_template: the chat template refused the messages: {message}")


def _check_messages(messages: Sequence[Message]) -> None:
    op = "apply_chat_template"
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"{op}: messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError(f"{op}: messages must be non-empty, got []")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TypeError(
                f"{op}: messages[{i}] must be a dict with a str 'role', got {message!r}"
            )
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, Sequence):
            raise TypeError(
                f"{op}: messages[{i}]['content'] must be a str or a list of parts, "
                f"got {type(content).__name__}"
            )
        for j, item in enumerate(content):
            where = f"messages[{i}]['content'][{j}]"
            kind = item.get("type") if isinstance(item, Mapping) else None
            if kind == "text" and isinstance(item.get("text"), str):
                continue
            if kind == "image" and "image" in item:
                continue
            raise ValueError(
                f"{op}: {where} must be {{'type': 'text', 'text': str}} or "
                f"{{'type': 'image', 'image': ...}}, got {item!r}"
            )


def _qwen_bpe(vocab: Path, merges: Path) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _declared_added_tokens(
    directory: Path, config: Mapping[str, Any]
) -> list[tuple[int, AddedToken]]:
    """(id, token) pairs from added_tokens.json and tokenizer_config.json, sorted by id."""
    specials_map = _read_json(directory / "special_tokens_map.json") or {}
    special_strings = {
        _token_content(value)
        for source in (specials_map, config)
        for key, value in source.items()
        if key in _TEMPLATE_TOKEN_KEYS and value
    }
    special_strings |= {
        _token_content(value)
        for source in (specials_map, config)
        for value in source.get("additional_special_tokens") or ()
    }
    declared: dict[str, tuple[int, AddedToken]] = {}
    for content, token_id in (_read_json(directory / "added_tokens.json") or {}).items():
        special = content in special_strings
        declared[content] = (token_id, AddedToken(content, special=special, normalized=not special))
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = entry["content"]
        if content in declared and declared[content][0] != int(key):
            raise ValueError(
                f"KelixTextTokenizer.from_pretrained: added token {content!r} must have one id, "
                f"got {declared[content][0]} in added_tokens.json and {key} in "
                "tokenizer_config.json"
            )
        flags = {flag: bool(entry[flag]) for flag in _ADDED_TOKEN_FLAGS if flag in entry}
        declared[content] = (int(key), AddedToken(content, **flags))
    return sorted(declared.values(), key=lambda pair: pair[0])


def _token_content(value: str | Mapping[str, Any]) -> str:
    # tokenizer_config.json writes a special token as a string or as a serialised AddedToken.
    return value if isinstance(value, str) else value["content"]


def _read_chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    # Multimodal processors save their template to chat_template.json.
    processor = _read_json(directory / "chat_template.json") or {}
    template = processor.get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # HF's named form: [{"name": ..., "template": ...}]
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    return template


# --------------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------------


class ProcessorOutput(dict):
    """The tensors of :meth:`KelixProcessor.__call__` by name, like transformers' ``BatchFeature``:
    a dict (so ``generate(**outputs)`` works) with :meth:`to`."""

    def to(self, device: torch.device | str) -> ProcessorOutput:
        """A copy with every tensor on ``device``."""
        return ProcessorOutput({key: value.to(device) for key, value in self.items()})


class KelixProcessor:
    """Chat messages or templated text + images -> the engine's prompt tensors (kelix-ar.md §3.1).

    Two surfaces: :meth:`prepare` (one prompt, ``prompt_ids`` [1, L]) and the transformers-style call
    ``processor(text=..., images=..., return_tensors="pt")`` (a batch, ``input_ids`` [B, L] with
    ``attention_mask``), plus ``apply_chat_template``, ``decode`` and ``batch_decode``.

    Args:
        tokenizer: the text tokenizer (and chat template).
        image_config: image preprocessing settings.
        allow_special_tokens: whether the text of chat messages may produce control tokens. False
            (the default): a message that contains ``<|im_end|>`` (or any other of
            ``tokenizer.control_tokens``) gets it encoded as plain text, as chat servers and
            tiktoken's ``disallowed_special`` do; the template's own markers are control tokens
            either way. True restores the raw behaviour for callers who mean it; ``prepare``,
            ``__call__`` and ``apply_chat_template(tokenize=True)`` take it per call too. Templated
            ``text=`` input is the caller's own markup and always maps special-token strings.
    """

    def __init__(
        self,
        tokenizer: KelixTextTokenizer,
        image_config: ImageProcessorConfig = ImageProcessorConfig(),
        *,
        allow_special_tokens: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.allow_special_tokens = check_bool(
            "KelixProcessor: allow_special_tokens", allow_special_tokens
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        subfolder: str | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> KelixProcessor:
        """Tokenizer, chat template and image settings of a checkpoint (see the parts): a directory or
        a Hugging Face repo id such as ``"OpenOneRec/Kelix-SFT"`` (the other arguments: see
        :func:`kelix_fast.hub.resolve_pretrained`)."""
        directory = resolve_pretrained(
            path,
            subfolder=subfolder,
            revision=revision,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            arg="KelixProcessor.from_pretrained: path",
        )
        return cls(
            KelixTextTokenizer.from_pretrained(directory),
            ImageProcessorConfig.from_pretrained(directory),
        )

    @classmethod
    def tiny(cls) -> KelixProcessor:
        """Processor of the embedded tiny preset: the tiny tokenizer and default image settings."""
        return cls(KelixTextTokenizer.tiny())

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        *,
        tokenize: bool = False,
        add_generation_prompt: bool = True,
        return_dict: bool = False,
        allow_special_tokens: bool | None = None,
    ) -> str | torch.Tensor | ProcessorOutput:
        """Chat messages -> the templated prompt text (see ``KelixTextTokenizer.apply_chat_template``).

        As transformers' processors: ``tokenize=True`` runs the processor on the messages (images
        included) and returns its ``input_ids`` [1, L] int64, or every output with ``return_dict=True``.
        """
        check_bool("apply_chat_template: tokenize", tokenize)
        check_bool("apply_chat_template: return_dict", return_dict)
        check_bool("apply_chat_template: add_generation_prompt", add_generation_prompt)
        if not tokenize:
            if return_dict:
                raise ValueError("apply_chat_template: return_dict=True needs tokenize=True")
            return self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt
            )
        outputs = self(
            messages,
            add_generation_prompt=add_generation_prompt,
            allow_special_tokens=allow_special_tokens,
        )
        return outputs if return_dict else outputs["input_ids"]

    def prepare(
        self,
        messages: Sequence[Message] | None = None,
        *,
        text: str | None = None,
        images: Sequence[ImageInput] = (),
        add_generation_prompt: bool = True,
        allow_special_tokens: bool | None = None,
    ) -> dict[str, torch.Tensor]:
        """Build the model inputs from ``messages``, or from templated ``text`` plus ``images``.

        Args:
            messages: chat messages (see ``apply_chat_template``); their images are processed in
                order of appearance, an image part's ``min_pixels``/``max_pixels`` overriding the
                step-1 bounds as in ``keye_vl_utils``.
            text: already templated text with one ``<|image_pad|>`` per image (instead of messages).
            images: the images of ``text``; must be empty with ``messages``.
            allow_special_tokens: see the class; None = the processor's setting.
        Returns: ``prompt_ids`` [1, L] int64 (placeholders expanded), ``pixel_values``
            [Np, 3, p, p] float32 (Np = sum of t*h*w, [0, 3, p, p] without images) and
            ``image_grid_thw`` [n, 3] int64.
        Raises: ValueError/TypeError on bad messages, images, flags, pixel bounds, or a
            placeholder/image count mismatch.
        """
        check_bool("prepare: add_generation_prompt", add_generation_prompt)
        if allow_special_tokens is not None:
            check_bool("prepare: allow_special_tokens", allow_special_tokens)
        if (messages is None) == (text is None):
            raise ValueError(
                "prepare: exactly one of messages and text must be given, got "
                f"{'both' if messages is not None else 'neither'}"
            )
        if messages is not None:
            if images:
                raise ValueError(
                    "prepare: images must be empty when messages are given (put images in the "
                    f"messages), got {len(images)}"
                )
            if allow_special_tokens is None:
                allow_special_tokens = self.allow_special_tokens
            markers: dict[str, str] = {}
            if not allow_special_tokens:
                messages, markers = self.tokenizer.escape_messages(messages)
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt
            )
            parts = [
                item
                for message in messages
                if not isinstance(message["content"], str)
                for item in message["content"]
                if item["type"] == "image"
            ]
        elif not isinstance(text, str):
            raise TypeError(f"prepare: text must be a str, got {type(text).__name__}")
        else:
            parts = [{"image": image} for image in images]
            markers = {}
        config = self.image_config
        # Every image part's bounds are checked before the first image is decoded. A message's bounds
        # are the caller's (a client's, through the server): at most the processor's own
        # fetch_max_pixels, else one message could ask for a 2^31-pixel resize.
        bounds = [
            check_pixel_bounds(
                f"prepare: image part {i}",
                part.get("min_pixels", config.fetch_min_pixels),
                part.get("max_pixels", config.fetch_max_pixels),
                ceiling=config.fetch_max_pixels,
            )
            for i, part in enumerate(parts)
        ]
        pixel_values = [torch.zeros(0, 3, config.patch_size, config.patch_size)]
        grids = [torch.zeros(0, 3, dtype=torch.int64)]
        for part, (low, high) in zip(parts, bounds):
            pixels, grid = preprocess_image(
                part["image"], config, fetch_min_pixels=low, fetch_max_pixels=high
            )
            pixel_values.append(pixels)
            grids.append(grid)
        image_grid_thw = torch.cat(grids)
        text = expand_image_placeholders(
            text, image_grid_thw, merge_size=self.image_config.merge_size
        )
        return {
            "prompt_ids": torch.tensor(
                [self.tokenizer.encode_escaped(text, markers)], dtype=torch.int64
            ),
            "pixel_values": torch.cat(pixel_values),
            "image_grid_thw": image_grid_thw,
        }

    def __call__(
        self,
        messages: Sequence[Message] | Sequence[Sequence[Message]] | None = None,
        *,
        text: str | Sequence[str] | None = None,
        images: ImageInput | Sequence[ImageInput] | None = None,
        videos: Sequence[Any] | None = None,
        padding: bool | str = True,
        padding_side: str = "left",
        truncation: bool = False,
        return_tensors: str = "pt",
        add_generation_prompt: bool = True,
        allow_special_tokens: bool | None = None,
    ) -> ProcessorOutput:
        """The transformers-style call: a batch of prompts -> padded model inputs.

        Args:
            messages: one conversation, or a list of conversations (one prompt each), as
                :meth:`prepare` takes them; or instead:
            text: templated prompt text (``apply_chat_template(..., tokenize=False)``), one str or a
                list, each with one ``<|image_pad|>`` per image;
            images: the images of ``text``, one or a list, in order across the texts (as
                transformers' Qwen-VL processors take them).
            videos: must be None or empty (Kelix handles images only).
            padding: ``True``/``"longest"`` pads to the longest prompt; ``False``/``"do_not_pad"``
                requires equal lengths.
            padding_side: ``"left"`` (default, transformers' convention for generation) or
                ``"right"``. The pad id is ``<|endoftext|>`` (the release's dataset pad). The spec
                does not record the release processor's side; ``KelixAR.generate`` reads
                ``attention_mask`` and drops the padding, so either side gives the same output.
            truncation: must be False (cutting a prompt could cut its image placeholders).
            return_tensors: must be ``"pt"``.
            allow_special_tokens: whether message text may produce control tokens (see the class;
                None = the processor's setting).

        Returns:
            :class:`ProcessorOutput` with ``input_ids`` [B, L] int64, ``attention_mask`` [B, L] int64
            (1 on prompt tokens) and, when the prompts hold images, ``pixel_values`` [Np, 3, p, p]
            float32 (every image, in order) and ``image_grid_thw`` [n, 3] int64.
        """
        op = "KelixProcessor"
        if return_tensors != "pt":
            raise ValueError(f'{op}: return_tensors must be "pt", got {return_tensors!r}')
        if videos:
            raise ValueError(f"{op}: videos must be None or empty (Kelix handles images only)")
        if truncation not in (False, None, "do_not_truncate"):
            raise ValueError(
                f"{op}: truncation must be False (prompts are never cut), got {truncation!r}"
            )
        if not (isinstance(padding, bool) or padding in ("longest", "do_not_pad")):
            raise ValueError(
                f'{op}: padding must be True, False, "longest" or "do_not_pad", got {padding!r}'
            )
        if padding_side not in ("left", "right"):
            raise ValueError(f'{op}: padding_side must be "left" or "right", got {padding_side!r}')
        if (messages is None) == (text is None):
            raise ValueError(
                f"{op}: exactly one of messages and text must be given, got "
                f"{'both' if messages is not None else 'neither'}"
            )
        if messages is not None:
            if images:
                raise ValueError(
                    f"{op}: images must be None with messages (put them in the messages)"
                )
            conversations = (
                [messages] if messages and isinstance(messages[0], Mapping) else list(messages)
            )
            samples = [
                self.prepare(
                    c,
                    add_generation_prompt=add_generation_prompt,
                    allow_special_tokens=allow_special_tokens,
                )
                for c in conversations
            ]
        else:
            samples = [
                self.prepare(text=t, images=i) for t, i in self._split_images(op, text, images)
            ]
        rows = [sample["prompt_ids"][0] for sample in samples]
        longest = max(row.numel() for row in rows)
        if padding in (False, "do_not_pad") and any(row.numel() != longest for row in rows):
            raise ValueError(
                f"{op}: padding=False needs prompts of one length, got "
                f"{[row.numel() for row in rows]} tokens"
            )
        input_ids = torch.full((len(rows), longest), self.tokenizer.endoftext_id, dtype=torch.int64)
        attention_mask = torch.zeros(len(rows), longest, dtype=torch.int64)
        for b, row in enumerate(rows):
            if padding_side == "left":
                span = slice(longest - row.numel(), longest)
            else:
                span = slice(0, row.numel())
            input_ids[b, span] = row
            attention_mask[b, span] = 1
        outputs = ProcessorOutput(input_ids=input_ids, attention_mask=attention_mask)
        image_grid_thw = torch.cat([sample["image_grid_thw"] for sample in samples])
        if image_grid_thw.shape[0]:  # as transformers: no image tensors for text-only prompts
            outputs["pixel_values"] = torch.cat([sample["pixel_values"] for sample in samples])
            outputs["image_grid_thw"] = image_grid_thw
        return outputs

    @staticmethod
    def _split_images(
        op: str, text: str | Sequence[str], images: ImageInput | Sequence[ImageInput] | None
    ) -> list[tuple[str, list[ImageInput]]]:
        """(text, its images) per prompt: the flat ``images`` list dealt out by placeholder counts."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError(
                f"{op}: text must be a str or a non-empty list of str, got {text!r:.80}"
            )
        if images is None:
            flat = []
        elif isinstance(images, (list, tuple)):
            flat = list(images)
        else:
            flat = [images]
        counts = [t.count(IMAGE_PAD_TOKEN) for t in texts]
        if sum(counts) != len(flat):
            raise ValueError(
                f"{op}: text holds {sum(counts)} {IMAGE_PAD_TOKEN} placeholders (one per image) but "
                f"images has {len(flat)}"
            )
        starts = np.cumsum([0, *counts]).tolist()
        return [(t, flat[a:b]) for t, a, b in zip(texts, starts, starts[1:])]

    def decode(
        self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False
    ) -> str:
        """Text of one sequence: ids (ints, or a 1-D integer tensor) or groups [T, G+1] (slot 0 is
        read, as the official demo decodes ``output_ids[..., 0]``). Ids the tokenizer does not have
        (the visual ids of image blocks) carry no text and are dropped."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() == 2:
                ids = ids[:, 0]
            if ids.dim() != 1:
                raise ValueError(f"decode: ids must be [T] or [T, G+1], got {list(ids.shape)}")
            ids = ids.tolist()
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"decode: ids must be a list of ints or a tensor, got {describe(ids)}")
        check_bool("decode: skip_special_tokens", skip_special_tokens)
        # Token ids are the tokenizer's u32 (out of that range they overflow inside it); ids past its
        # vocabulary (the visual ids) are dropped below.
        ids = [
            check_int(f"decode: ids[{t}]", i, minimum=0, maximum=2**32 - 1)
            for t, i in enumerate(ids)
        ]
        known = [i for i in ids if self.tokenizer.backend.id_to_token(i) is not None]
        return self.tokenizer.decode(known, skip_special_tokens=skip_special_tokens)

    def batch_decode(
        self,
        sequences: torch.Tensor | Sequence[Sequence[int] | torch.Tensor],
        *,
        skip_special_tokens: bool = False,
    ) -> list[str]:
        """Text of each sequence: ``sequences`` is [B, T] ids, [B, T, G+1] groups, or a list of what
        :meth:`decode` takes (e.g. ``GenerationOutput.new_groups()``)."""
        if isinstance(sequences, torch.Tensor) and sequences.dim() not in (2, 3):
            raise ValueError(
                f"batch_decode: sequences must be [B, T] or [B, T, G+1], got {list(sequences.shape)}"
            )
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in sequences]


def _checkpoint_dir(op: str, path: str | os.PathLike[str]) -> Path:
    directory = Path(path)
    if not directory.is_dir():
        raise ValueError(f"{op}: path must be a checkpoint directory, got {os.fspath(path)!r}")
    return directory


def _read_json(file: Path) -> Any:
    """Parsed JSON of ``file``, or None when it does not exist."""
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} must be valid JSON: {exc}") from exc
