"""Image understanding, text to image and reconstruction with Kelix: :class:`KelixPipeline`.

The pipeline holds the processor and the models (:class:`~kelix_fast.ar.KelixAR`, Kelix-DiT, Kelix-AEDIT,
the DC-AE) and calls them in order; the rendering of a condition into an image (flow sampling + decode)
is runtime/rendering.py.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from kelix_fast import presets
from kelix_fast.ar import KelixAR
from kelix_fast.models.dit import KelixDiT
from kelix_fast.models.vae import load_vae
from kelix_fast.options import EngineOptions
from kelix_fast.processor import IM_START_TOKEN, ImageInput, KelixProcessor, preprocess_image
from kelix_fast.runtime.conditioning import extract_condition, text_to_image_prompt
from kelix_fast.runtime.rendering import render
from kelix_fast.runtime.timing import StageTimer

__all__ = ["KelixPipeline"]

logger = logging.getLogger(__name__)


class KelixPipeline:
    """Image understanding, text to image and image reconstruction with Kelix: the processor and
    :class:`KelixAR`, plus Kelix-DiT (text to image), Kelix-AEDIT (reconstruction) and the DC-AE VAE.
    After each call, ``timings`` holds the seconds spent per stage."""

    def __init__(
        self,
        ar: KelixAR,
        processor: KelixProcessor,
        dit: KelixDiT | None = None,
        vae: Any | None = None,
        aedit: KelixDiT | None = None,
    ) -> None:
        self.ar, self.processor, self.dit, self.vae, self.aedit = ar, processor, dit, vae, aedit
        self.timings: dict[str, float] = {}

    @classmethod
    def from_pretrained(
        cls,
        ar_path: str | os.PathLike[str],
        dit_path: str | os.PathLike[str] | None = None,
        vae_path: str | os.PathLike[str] | None = None,
        *,
        aedit_path: str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        model_max_length: int | None = None,
        **engine_options: Any,
    ) -> KelixPipeline:
        """Load Kelix-SFT (``ar_path``: weights, tokenizer, processor config), and optionally Kelix-DiT,
        a diffusers DC-AE directory and Kelix-AEDIT. ``model_max_length`` overrides the T2I DiT config's
        (the release needs 720); ``engine_options`` go to :meth:`KelixAR.from_pretrained` (``options=`` an
        :class:`~kelix_fast.options.EngineOptions`, or single fields, e.g.
        ``vq="exact"``)."""
        paths = {
            "ar_path": ar_path,
            "dit_path": dit_path,
            "vae_path": vae_path,
            "aedit_path": aedit_path,
        }
        for name, path in paths.items():
            if path is not None and not os.path.isdir(path):
                raise FileNotFoundError(f"KelixPipeline: {name} must be a directory, got {path}")
        ar = KelixAR.from_pretrained(ar_path, device=device, dtype=dtype, **engine_options)
        dit = None
        if dit_path is not None:
            dit = KelixDiT.from_pretrained(
                dit_path, device=ar.device, dtype=ar.dtype, model_max_length=model_max_length
            )
        vae = None if vae_path is None else load_vae(vae_path, device=ar.device, dtype=ar.dtype)
        aedit = None
        if aedit_path is not None:
            aedit = KelixDiT.from_pretrained(aedit_path, device=ar.device, dtype=ar.dtype)
        return cls(ar, KelixProcessor.from_pretrained(ar_path), dit, vae, aedit)

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        *,
        device: torch.device | str | None = None,
        options: EngineOptions | None = None,
    ) -> KelixPipeline:
        """Every model embedded and tiny, deterministic random weights: no files needed. ``options``:
        the AR engine's :class:`~kelix_fast.options.EngineOptions`."""
        ar = KelixAR.tiny(seed, device=device, options=options)
        dit = presets.tiny_dit(seed, device=ar.device, dtype=ar.dtype)
        vae = presets.tiny_vae(seed, device=ar.device, dtype=ar.dtype)
        aedit = presets.tiny_aedit(seed, device=ar.device, dtype=ar.dtype)
        return cls(ar, KelixProcessor.tiny(), dit, vae, aedit)

    def _timer(self) -> StageTimer:
        """A fresh per-call timing record (``self.timings``) and its timer."""
        self.timings = {}
        return StageTimer(self.timings, self.ar.device)

    # ------------------------------------------------------------------ understanding

    def tokenize_image(self, image: ImageInput) -> torch.Tensor:
        """One image (PIL, uint8 array [H, W, 3], or path) -> its visual ids [n_tok, 8] int64."""
        timer = self._timer()
        pixel_values, grid = preprocess_image(image, self.processor.image_config)
        timer.lap("preprocess")
        ids = self.ar.tokenize_images(pixel_values, grid)
        timer.lap("vit_vq")
        return ids

    def chat(
        self,
        messages: Sequence[Mapping[str, Any]] | tuple[ImageInput, str],
        *,
        max_new_tokens: int = 256,
        top_k: int = 1,
        top_p: float = 1.0,
        temperature: float = 1.0,
        seed: int | None = None,
        sampler: str | None = None,
        scoring: str | None = None,
        progress: bool = False,
    ) -> str:
        """Answer a conversation: chat ``messages`` (``[{"role": ..., "content": str | parts}]``), or an
        ``(image, question)`` pair. Greedy by default; ``max_new_tokens`` counts blocks (text: one token
        each). ``sampler``/``scoring`` override the engine's options (``ar.options``) for this call.
        Returns the decoded text up to ``<|im_end|>``. ``progress`` shows a tqdm bar."""
        if isinstance(messages, tuple):
            if len(messages) != 2 or not isinstance(messages[1], str):
                raise TypeError("chat: a tuple must be (image, question: str)")
            image, question = messages
            content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
            messages = [{"role": "user", "content": content}]
        timer = self._timer()
        inputs = self.processor.prepare(messages)
        timer.lap("preprocess")
        images = {}
        if inputs["image_grid_thw"].shape[0]:
            images = {
                "pixel_values": inputs["pixel_values"],
                "image_grid_thw": inputs["image_grid_thw"],
            }
        with tqdm(
            total=max_new_tokens, desc="answer blocks", disable=not progress, leave=False
        ) as bar:
            out = self.ar.generate(
                inputs["prompt_ids"],
                max_new_blocks=max_new_tokens,
                top_k=top_k,
                top_p=top_p,
                temperature=temperature,
                seed=seed,
                sampler=sampler,
                scoring=scoring,
                timings=self.timings,
                step_callback=lambda _: bar.update(1),
                **images,
            )
        timer = StageTimer(self.timings, self.ar.device)
        llm = self.ar.config.llm
        new = out.groups[0, inputs["prompt_ids"].shape[1] : int(out.lengths[0]), 0].tolist()
        text_ids = [t for t in new if t < llm.vocab_size and t != llm.q_eos_token]
        if llm.eos_token_id in text_ids:
            text_ids = text_ids[: text_ids.index(llm.eos_token_id)]
        text = self.processor.tokenizer.decode(text_ids, skip_special_tokens=True)
        timer.lap("detokenize")
        return text

    # ------------------------------------------------------------------ text to image

    def generate_image(
        self,
        prompt: str | Sequence[int],
        *,
        steps: int = 50,
        guidance_scale: float = 1.0,
        seed: int | None = None,
        size: int = 1024,
        noise: torch.Tensor | None = None,
        scoring: str | None = None,
        progress: bool = False,
    ) -> Any:
        """Text to image, as the official demo: greedy NBP generation of the image blocks, the
        ``<|vision_start|>..<|vision_end|>`` hidden states as the condition, FlowMatch Euler sampling of
        the DiT (``steps``, shift 3, ``guidance_scale``; 1.0 runs the conditional branch only), DC-AE.

        Args:
            prompt: the user's text, or already templated prompt ids (cut after the assistant turn).
            seed: initial noise seed (CPU generator, float32); ``noise`` [1, C, h, w] overrides it.
            size: image side in pixels, a multiple of the DiT's VAE factor.
            scoring: the image blocks' scoring for this call (None: the engine's ``ar.options``).
            progress: show tqdm bars for the image blocks and the DiT steps.

        Returns:
            a PIL image (RGB, ``size x size``).
        """
        if self.dit is None or self.vae is None:
            raise ValueError(
                "generate_image: this pipeline has no DiT/VAE (pass dit_path and vae_path)"
            )
        tokenizer, llm = self.processor.tokenizer, self.ar.config.llm
        timer = self._timer()
        if isinstance(prompt, str):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            prompt_ids = tokenizer.encode(text)
            assistant_prefix = tokenizer.encode(f"{IM_START_TOKEN}assistant\n")
        else:
            prompt_ids, assistant_prefix = list(prompt), None
        prompt_ids = text_to_image_prompt(
            prompt_ids, assistant_prefix=assistant_prefix, vision_start=llm.vision_start_token_id
        )
        timer.lap("preprocess")
        length = self.dit.config.model_max_length
        # The official max_new_tokens = 2 * Lc + 10 decode steps yield one group more.
        blocks = 2 * length + 11
        with tqdm(total=blocks, desc="image blocks", disable=not progress, leave=False) as bar:
            out = self.ar.generate(
                [prompt_ids],
                max_new_blocks=blocks,
                scoring=scoring,
                return_hidden_states=True,
                timings=self.timings,
                step_callback=lambda _: bar.update(1),
            )
        timer = StageTimer(self.timings, self.ar.device)
        n = int(out.lengths[0])
        condition = extract_condition(
            out.groups[0, :n],
            out.hidden_states[0, : n - 1],
            vision_start=llm.vision_start_token_id,
            vision_end=llm.vision_end_token_id,
            max_length=length,
        )
        pixels = render(
            self.dit,
            self.vae,
            condition.hidden,
            condition.mask,
            steps=steps,
            timer=timer,
            progress=progress,
            guidance_scale=guidance_scale,
            image_size=size,
            noise=noise,
            seed=seed,
        )
        return _to_image(pixels)

    # ------------------------------------------------------------------ reconstruction (Kelix-AEDIT)

    def reconstruct(
        self,
        image: ImageInput,
        *,
        steps: int = 20,
        guidance_scale: float = 4.5,
        seed: int | None = None,
        size: int = 512,
        fusion: str = "mean",
        schedule: str = "default",
        max_pixels: int = 324 * 28 * 28,
        progress: bool = False,
    ) -> Any:
        """Image -> Kelix-Tok codes -> fused code features -> Kelix-AEDIT -> DC-AE (kelix-dit.md §1.2, §6).

        The AEDIT settings the spec could not confirm are arguments, with the model card's values as
        defaults: ``fusion`` of the 8 up-projected codes ("mean"), the first resize's ``max_pixels``
        (324 * 28^2: a square image gives 18 x 18 = 324 tokens), 20 Euler ``steps`` on the diffusers
        ``"default"`` schedule, ``guidance_scale`` 4.5, ``size`` 512. The condition positions use the
        real token grid. Whether AEDIT has a connector, cross-attention RoPE or x-norm is read from its
        checkpoint, and the run's choices are logged.

        Returns:
            a PIL image (RGB, ``size x size``).
        """
        if self.aedit is None or self.vae is None:
            raise ValueError(
                "reconstruct: this pipeline has no AEDIT/VAE (pass aedit_path and vae_path)"
            )
        timer = self._timer()
        pixel_values, grid = preprocess_image(
            image, self.processor.image_config, fetch_max_pixels=max_pixels
        )
        timer.lap("preprocess")
        tok, llm = self.ar.model.tokenizer, self.ar.config.llm
        with torch.inference_mode():
            ids = self.ar.tokenize_images(pixel_values, grid)
            codes = (
                ids
                - llm.vocab_size
                - tok.config.codes_per_group * torch.arange(llm.n_q_tokens, device=ids.device)
            )
            features = tok.forward_indices(codes, fusion=fusion)[None]  # [1, n, output_dim]
        timer.lap("vit_vq")
        c = self.aedit.config
        logger.info(
            "kelix_fast: AEDIT reconstruction: %d tokens, fusion=%s, connector=%s, cross-attn RoPE=%s, "
            "x-norm=%s, %d steps (%s schedule), guidance %.2f, %d px",
            features.shape[1],
            fusion,
            c.use_connector,
            c.use_cross_attn_rope,
            c.cross_attn_x_norm,
            steps,
            schedule,
            guidance_scale,
            size,
        )
        mask = torch.ones(features.shape[:2], dtype=torch.int64, device=features.device)
        pixels = render(
            self.aedit,
            self.vae,
            features,
            mask,
            steps=steps,
            timer=timer,
            progress=progress,
            progress_desc="AEDIT steps",
            guidance_scale=guidance_scale,
            schedule=schedule,
            image_size=size,
            seed=seed,
            image_grid=(int(grid[0, 1]), int(grid[0, 2])),
        )
        return _to_image(pixels)


def _to_image(pixels: torch.Tensor) -> Any:
    """pixels [1, H, W, 3] uint8 -> a PIL image (Pillow is a dependency, imported when one is made)."""
    from PIL import Image

    return Image.fromarray(pixels[0].cpu().numpy())
