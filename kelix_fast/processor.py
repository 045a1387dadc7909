"""Kelix processor: chat messages or templated text + images -> the engine's prompt tensors
(kelix-ar.md §3.1).

``KelixProcessor`` turns chat messages (text and images) into what the engine consumes:
``prompt_ids [1, L]`` with each image placeholder expanded to one ``<|image_pad|>`` per merged
patch, ``pixel_values [Np, 3, 14, 14]`` and ``image_grid_thw [n, 3]``. It mirrors the release
processor (``KeyeProcessor`` + ``SiglipImageProcessor``) and the demo's
``keye_vl_utils.fetch_image``. Called like a transformers processor (``processor(text=[...],
images=[...], return_tensors="pt")``) it returns ``input_ids``, ``attention_mask``, ``pixel_values``
and ``image_grid_thw``, which ``KelixAR.generate(**outputs)`` takes as they are.

Its two parts live in their own modules: the text tokenizer and chat template in
:mod:`kelix_fast.text_tokenizer`, image preprocessing in :mod:`kelix_fast.image_processing`. Their
public names are re-exported here, so ``from kelix_fast.processor import KelixTextTokenizer`` (and
``preprocess_image``, ``smart_resize``, ...) keeps working.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kelix_fast.arguments import check_bool, check_int, describe
from kelix_fast.hub import resolve_pretrained
from kelix_fast.image_processing import (
    ImageInput,
    ImageProcessorConfig,
    check_pixel_bounds,
    image_to_patches,
    load_image,
    preprocess_image,
    smart_resize,
)
from kelix_fast.text_tokenizer import IM_START_TOKEN, IMAGE_PAD_TOKEN, KelixTextTokenizer, Message

__all__ = [
    "IM_START_TOKEN",
    "ImageInput",
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
        image_config: ImageProcessorConfig = ImageProcessorConfig(),  # noqa: B008 (frozen)
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
