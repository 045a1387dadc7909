"""Image understanding, text to image and reconstruction with Kelix: :class:`KelixPipeline`.

The pipeline holds the processor and the models (:class:`~kelix_fast.ar.KelixAR`, Kelix-DiT, Kelix-AEDIT,
the DC-AE) and calls them in order; the rendering of a condition into an image (flow sampling + decode)
is runtime/rendering.py. Besides its own methods (``chat``, ``generate_image``, ``reconstruct``) it has
the diffusers surface: ``pipe(prompt, num_inference_steps=..., ...)`` returning ``.images``,
``pipe.to(device)`` and ``enable_model_cpu_offload()``.

Every public method checks all its arguments before any model runs, and its errors name the argument
as the caller wrote it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from kelix_fast import presets
from kelix_fast.ar import KelixAR
from kelix_fast.arguments import check_bool, check_callable, check_int, describe, is_int
from kelix_fast.engine import Engine
from kelix_fast.hub import resolve_pretrained
from kelix_fast.image_processing import ImageInput, preprocess_image
from kelix_fast.models.dit import KelixDiT
from kelix_fast.models.tokenizer import FUSIONS
from kelix_fast.models.vae import load_vae
from kelix_fast.options import EngineOptions
from kelix_fast.processor import KelixProcessor
from kelix_fast.runtime import requests
from kelix_fast.runtime.conditioning import extract_condition, text_to_image_prompt
from kelix_fast.runtime.flow import SCHEDULES, check_sampling, flow_schedule
from kelix_fast.runtime.rendering import render
from kelix_fast.runtime.timing import StageTimer
from kelix_fast.text_tokenizer import IM_START_TOKEN
from kelix_fast.weights import available_device, resolve_dtype

__all__ = ["KelixPipeline", "KelixPipelineOutput"]

logger = logging.getLogger(__name__)

# callback_on_step_end(pipe, step, timestep, callback_kwargs) -> callback_kwargs or None (diffusers').
StepEndCallback = Callable[
    ["KelixPipeline", int, torch.Tensor, dict[str, torch.Tensor]], Mapping[str, Any] | None
]
_PARTS = ("ar", "dit", "vae", "aedit")


@dataclass
class KelixPipelineOutput:
    """What :meth:`KelixPipeline.__call__` returns, as diffusers pipelines do.

    Attributes:
        images: one PIL image (RGB) per prompt, in prompt order.
        timings: the seconds this call spent per stage (``preprocess``, ``prefill``, ``decode``,
            ``dit``, ``vae``).
    """

    images: list[Any]
    timings: dict[str, float]


class KelixPipeline:
    """Image understanding, text to image and image reconstruction with Kelix: the processor and
    :class:`KelixAR`, plus Kelix-DiT (text to image), Kelix-AEDIT (reconstruction) and the DC-AE VAE.

    Every call times its stages in a record of its own: ``__call__`` returns it as the output's
    ``timings``, the other methods fill the ``timings`` dict given to them. The ``timings`` attribute
    is the record of the latest call started (with calls from several threads, not necessarily the
    caller's: read the call's own record there)."""

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
        self._offload_device: torch.device | None = None

    @classmethod
    def from_pretrained(
        cls,
        ar_path: str | os.PathLike[str],
        dit_path: str | os.PathLike[str] | None = None,
        vae_path: str | os.PathLike[str] | None = None,
        *,
        aedit_path: str | os.PathLike[str] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        model_max_length: int | None = None,
        revisions: Mapping[str, str] | None = None,
        local_files_only: bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        **engine_options: Any,
    ) -> KelixPipeline:
        """Load Kelix-SFT (``ar_path``: weights, tokenizer, processor config), and optionally Kelix-DiT,
        a diffusers DC-AE and Kelix-AEDIT.

        Each path is a directory or a Hugging Face repo id, as the official demo names them:
        ``"OpenOneRec/Kelix-SFT"``, ``"OpenOneRec/Kelix-DiT"``,
        ``"Efficient-Large-Model/SANA1.5_1.6B_1024px_diffusers/vae"`` (a repo id and a folder in it).
        Every location is resolved (and fetched) before any model is loaded. ``revisions`` pins repos by
        part, e.g. ``{"dit": "<commit>"}`` (parts: ``ar``, ``dit``, ``vae``, ``aedit``);
        ``local_files_only`` and ``cache_dir`` apply to all (see
        :func:`kelix_fast.hub.resolve_pretrained`). ``dtype`` or its alias ``torch_dtype``: a
        ``torch.dtype`` or a name (``"bfloat16"``, ``"bf16"``, ...). ``model_max_length`` overrides the
        T2I DiT config's (the release needs 720); ``engine_options`` go to
        :meth:`KelixAR.from_pretrained` (``options=`` an :class:`~kelix_fast.options.EngineOptions`, or
        single fields, e.g. ``vq="exact"``)."""
        dtype = resolve_dtype(dtype, torch_dtype, owner="KelixPipeline")
        if device is not None:
            available_device(device, arg="KelixPipeline: device")
        revisions = dict(revisions or {})
        unknown = sorted(set(revisions) - set(_PARTS))
        if unknown:
            raise ValueError(
                f"KelixPipeline: revisions keys must be in {list(_PARTS)}, got {unknown}"
            )
        paths = dict(zip(_PARTS, (ar_path, dit_path, vae_path, aedit_path)))
        dirs = {
            part: resolve_pretrained(
                path,
                revision=revisions.get(part),
                local_files_only=local_files_only,
                cache_dir=cache_dir,
                arg=f"KelixPipeline: {part}_path",
            )
            for part, path in paths.items()
            if path is not None
        }
        ar = KelixAR.from_pretrained(dirs["ar"], device=device, dtype=dtype, **engine_options)
        place = {"device": ar.device, "dtype": ar.dtype}
        dit = None
        if "dit" in dirs:
            dit = KelixDiT.from_pretrained(dirs["dit"], model_max_length=model_max_length, **place)
        vae = load_vae(dirs["vae"], **place) if "vae" in dirs else None
        aedit = KelixDiT.from_pretrained(dirs["aedit"], **place) if "aedit" in dirs else None
        return cls(ar, KelixProcessor.from_pretrained(dirs["ar"]), dit, vae, aedit)

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        options: EngineOptions | None = None,
    ) -> KelixPipeline:
        """Every model embedded and tiny, deterministic random weights: no files needed. ``options``:
        the AR engine's :class:`~kelix_fast.options.EngineOptions`; ``dtype``/``torch_dtype`` as in
        :meth:`from_pretrained`."""
        if device is not None:
            available_device(device, arg="KelixPipeline: device")
        dtype = resolve_dtype(dtype, torch_dtype, owner="KelixPipeline")
        ar = KelixAR.tiny(seed, device=device, dtype=dtype, options=options)
        place = {"device": ar.device, "dtype": ar.dtype}
        dit = presets.tiny_dit(seed, **place)
        vae = presets.tiny_vae(seed, **place)
        aedit = presets.tiny_aedit(seed, **place)
        return cls(ar, KelixProcessor.tiny(), dit, vae, aedit)

    # ------------------------------------------------------------------ placement

    @property
    def device(self) -> torch.device:
        """Where the models compute: the offload device after :meth:`enable_model_cpu_offload`, else
        the AR model's device."""
        return self._offload_device or self.ar.device

    def to(self, device: torch.device | str) -> KelixPipeline:
        """Move every model to ``device`` (which must exist here; dtypes are kept) and return the
        pipeline, as diffusers' ``pipe.to("cuda")``. Turns CPU offload off."""
        device = available_device(device, arg="KelixPipeline.to: device")
        self._offload_device = None
        for model in self._models():
            model.to(device)
        return self

    def enable_model_cpu_offload(self, device: torch.device | str = "cuda") -> None:
        """Keep the models in CPU memory and put each on ``device`` only while it runs, as diffusers'
        method of that name: the AR model (Kelix-Tok, LLM, Block Decoder), then the DiT (or AEDIT), then
        the VAE, each moved back to the CPU when its stage ends. The device then holds one model at a
        time (in bf16 at release scale: 16.4 GB AR, 3.3 GB DiT, 0.6 GB DC-AE) for one copy of its
        weights per call; ``timings`` include the copies. :meth:`to` turns it off."""
        device = available_device(device, arg="enable_model_cpu_offload: device")
        for model in self._models():
            model.to("cpu")
        self._offload_device = device

    def _models(self) -> list[Any]:
        return [m for m in (self.ar, self.dit, self.vae, self.aedit) if m is not None]

    @contextlib.contextmanager
    def _placed(self, model: Any) -> Iterator[None]:
        """``model`` on the offload device while the block runs (CPU offload on), else left as it is."""
        if self._offload_device is None:
            yield
            return
        model.to(self._offload_device)
        try:
            yield
        finally:
            model.to("cpu")
            if self._offload_device.type == "cuda":
                torch.cuda.empty_cache()

    def _timer(self, timings: dict[str, float] | None) -> StageTimer:
        """The timer of one call, adding to ``timings`` (the caller's dict, or a new one): the call's
        own record, which no other call writes to, also kept as :attr:`timings`."""
        if timings is None:
            timings = {}
        elif not isinstance(timings, dict):
            raise TypeError(f"timings must be a dict or None, got {describe(timings)}")
        self.timings = timings
        return StageTimer(timings, self.device)

    # ------------------------------------------------------------------ understanding

    def tokenize_image(
        self, image: ImageInput, *, timings: dict[str, float] | None = None
    ) -> torch.Tensor:
        """One image (PIL, uint8 array [H, W, 3], or path) -> its visual ids [n_tok, 8] int64.
        ``timings``: when given, receives the seconds spent per stage (``preprocess``, ``vit_vq``)."""
        timer = self._timer(timings)
        pixel_values, grid = preprocess_image(image, self.processor.image_config)
        timer.lap("preprocess")
        with self._placed(self.ar):
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
        stream: bool = False,
        progress: bool = False,
        timings: dict[str, float] | None = None,
    ) -> str | Iterator[str]:
        """Answer a conversation: chat ``messages`` (``[{"role": ..., "content": str | parts}]``), or an
        ``(image, question)`` pair. Greedy by default; ``max_new_tokens`` counts blocks (text: one token
        each). ``sampler``/``scoring`` override the engine's options (``ar.options``) for this call.

        Returns the decoded text up to ``<|im_end|>``; with ``stream=True``, an iterator of its text
        deltas, one per generated block that adds text (a block ending inside a UTF-8 character waits
        for the next), run through :class:`~kelix_fast.Engine` block by block (the same output as
        without streaming; ``sampler="reference"`` cannot stream). Every argument is checked when
        ``chat`` is called, also when streaming. ``progress`` shows a tqdm bar. ``timings``: when
        given, receives the seconds spent per stage: without streaming ``preprocess``, ``vit_vq``,
        ``prefill``, ``decode``, ``detokenize``; streaming, ``preprocess`` and ``generate``
        (everything after it, set when the iterator ends).
        """
        if isinstance(messages, tuple):
            if len(messages) != 2 or not isinstance(messages[1], str):
                raise TypeError("chat: a tuple must be (image, question: str)")
            image, question = messages
            content = [{"type": "image", "image": image}, {"type": "text", "text": question}]
            messages = [{"role": "user", "content": content}]
        check_bool("chat: stream", stream)
        check_bool("chat: progress", progress)
        sampler = self.ar.options.replace(sampler=sampler, scoring=scoring).sampler  # validated
        if stream and sampler == "reference":
            raise ValueError(
                'chat: stream=True runs the engine block by block, which has no sampler="reference"'
            )
        timer = self._timer(timings)
        inputs = self.processor.prepare(messages)
        images = {}
        if inputs["image_grid_thw"].shape[0]:
            images = {
                "pixel_values": inputs["pixel_values"],
                "image_grid_thw": inputs["image_grid_thw"],
            }
        # generate checks the same, but only after the CPU offload has moved the model in.
        self.ar.check_requests(
            inputs["prompt_ids"],
            pixel_values=images.get("pixel_values"),
            image_grid_thw=images.get("image_grid_thw"),
            max_new_blocks=max_new_tokens,
            context=(self.ar.config.llm.max_seq_len, "max_seq_len"),
            blocks_arg="max_new_tokens",
        )
        requests.per_request_params(1, temperature=temperature, top_k=top_k, top_p=top_p)
        if seed is not None:  # None draws a seed from the global RNG: leave that to generate
            requests.request_seeds(seed, 1)
        timer.lap("preprocess")
        sampling = {"top_k": top_k, "top_p": top_p, "temperature": temperature, "seed": seed}
        if stream:
            prompt = inputs["prompt_ids"][0]
            return self._stream_answer(
                prompt, images, max_new_tokens, sampling, scoring, progress, timer.timings
            )
        with (
            self._placed(self.ar),
            tqdm(
                total=max_new_tokens, desc="answer blocks", disable=not progress, leave=False
            ) as bar,
        ):
            out = self.ar.generate(
                inputs["prompt_ids"],
                max_new_tokens=max_new_tokens,
                sampler=sampler,
                scoring=scoring,
                timings=timer.timings,
                step_callback=lambda _: bar.update(1),
                **sampling,
                **images,
            )
        timer = StageTimer(timer.timings, self.device)
        text = self._answer_text(out.new_groups()[0][:, 0].tolist())
        timer.lap("detokenize")
        return text

    def _stream_answer(
        self,
        prompt: torch.Tensor,
        images: Mapping[str, torch.Tensor],
        max_new_tokens: int,
        sampling: Mapping[str, Any],
        scoring: str | None,
        progress: bool,
        timings: dict[str, float],
    ) -> Iterator[str]:
        """The text deltas of one checked request, generated one block per engine step; its stage is
        lapped into ``timings`` (the ``chat`` call's record)."""
        timer = StageTimer(timings, self.device)
        ids: list[int] = []
        shown = ""
        with (
            self._placed(self.ar),
            tqdm(
                total=max_new_tokens, desc="answer blocks", disable=not progress, leave=False
            ) as bar,
        ):
            engine = Engine(self.ar, max_batch=1, max_context=prompt.numel() + max_new_tokens - 1)
            engine.add_request(
                prompt, max_new_blocks=max_new_tokens, scoring=scoring, **sampling, **images
            )
            while engine.has_unfinished():
                for output in engine.step():
                    ids += output.new_groups[:, 0].tolist()
                    bar.update(output.new_groups.shape[0])
                text = self._answer_text(ids)
                # A byte-level token can end inside a UTF-8 character, which decodes to U+FFFD until
                # the rest of it arrives; the last block flushes whatever is left.
                complete = not text.endswith("\ufffd") or not engine.has_unfinished()
                if len(text) > len(shown) and complete:
                    yield text[len(shown) :]
                    shown = text
        timer.lap("generate")

    def _answer_text(self, slot0_ids: list[int]) -> str:
        """Slot 0 of the new groups -> the answer: text ids only (no visual ids, no empty groups), up
        to ``<|im_end|>``, special tokens skipped."""
        llm = self.ar.config.llm
        text_ids = [t for t in slot0_ids if t < llm.vocab_size and t != llm.q_eos_token]
        if llm.eos_token_id in text_ids:
            text_ids = text_ids[: text_ids.index(llm.eos_token_id)]
        return self.processor.tokenizer.decode(text_ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ text to image

    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        seed: int | Sequence[int] | None = None,
        latents: torch.Tensor | None = None,
        max_condition_length: int | None = None,
        callback_on_step_end: StepEndCallback | None = None,
        scoring: str | None = None,
        progress: bool = False,
    ) -> KelixPipelineOutput:
        """Text to image with diffusers' calling convention: :meth:`generate_image` for one prompt or
        a list, the list run as one batch (one ``KelixAR.generate`` call for every prompt's image
        blocks, one DiT sampling over the stacked conditions, one VAE decode).

        Args:
            prompt: a str or a list of str.
            num_inference_steps, guidance_scale: Euler steps and CFG scale (1.0: conditional branch
                only, as the official demo).
            height, width: the image side in pixels (Kelix-DiT renders square images: give one, or two
                equal values); default 1024.
            generator: a ``torch.Generator`` drawing the whole batch's noise in one call (diffusers'
                convention), or one per prompt. seed: instead, an int (prompt b gets ``seed + b``, so a
                prompt's image equals what it gets alone with that seed) or one int per prompt.
            latents: [B, C, h, w] initial noise instead of generator/seed.
            max_condition_length: the condition rows (official ``MAX_CONDITION_LENGTH``); default the
                DiT's ``model_max_length``. It may exceed ``model_max_length``.
            callback_on_step_end: called after each DiT step as ``callback(pipe, step, timestep,
                {"latents": latents})`` (``timestep`` a float32 scalar tensor, ``latents`` [B, C, h, w]
                in the model dtype); a returned dict's ``"latents"`` replaces the latents.
            scoring, progress: as :meth:`generate_image`.

        Returns:
            :class:`KelixPipelineOutput` with ``images``, one PIL image per prompt, and this call's
            ``timings``.
        """
        op = "KelixPipeline"
        prompts = [prompt] if isinstance(prompt, str) else prompt
        if (
            not isinstance(prompts, Sequence)
            or not prompts
            or not all(isinstance(p, str) for p in prompts)
        ):
            raise TypeError(
                f"{op}: prompt must be a str or a non-empty list of str, got {prompt!r:.100}"
            )
        check_callable(f"{op}: callback_on_step_end", callback_on_step_end)
        if height is not None and width is not None and height != width:
            raise ValueError(
                f"{op}: height and width must be equal (Kelix-DiT renders square images), got "
                f"{height} x {width}"
            )
        size = next((s for s in (height, width) if s is not None), 1024)
        timings: dict[str, float] = {}
        images = self._text_to_image(
            list(prompts),
            op=op,
            names={
                "prompt": "prompt",
                "steps": "num_inference_steps",
                "image_size": "height" if height is not None else "width",
                "noise": "latents",
            },
            steps=num_inference_steps,
            guidance_scale=guidance_scale,
            image_size=size,
            noise=latents,
            seed=seed,
            generator=generator,
            max_condition_length=max_condition_length,
            scoring=scoring,
            callback_on_step_end=callback_on_step_end,
            progress=progress,
            timings=timings,
        )
        return KelixPipelineOutput(images=images, timings=timings)

    def generate_image(
        self,
        prompt: str | Sequence[int],
        *,
        steps: int = 50,
        guidance_scale: float = 1.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        size: int = 1024,
        noise: torch.Tensor | None = None,
        max_condition_length: int | None = None,
        scoring: str | None = None,
        output_path: str | os.PathLike[str] | None = None,
        progress: bool = False,
        timings: dict[str, float] | None = None,
    ) -> Any:
        """Text to image, as the official demo: greedy NBP generation of the image blocks, the
        ``<|vision_start|>..<|vision_end|>`` hidden states as the condition, FlowMatch Euler sampling of
        the DiT (``steps``, shift 3, ``guidance_scale``; 1.0 runs the conditional branch only), DC-AE.

        Args:
            prompt: the user's text, or already templated prompt ids (cut after the assistant turn).
            seed: initial noise seed (CPU generator, float32), or ``generator``; ``noise``
                [1, C, h, w] instead of both.
            size: image side in pixels, a multiple of the DiT's VAE factor.
            max_condition_length: condition rows, cut or zero-padded (the official
                ``MAX_CONDITION_LENGTH``; it sets the image-block budget ``2 * L + 11``); default the
                DiT's ``model_max_length``, which it may exceed.
            scoring: the image blocks' scoring for this call (None: the engine's ``ar.options``).
            output_path: also save the image there (the file's folder must exist and be writable;
                checked before any model runs).
            progress: show tqdm bars for the image blocks and the DiT steps.
            timings: when given, receives the seconds spent per stage (``preprocess``, ``prefill``,
                ``decode``, ``dit``, ``vae``).

        Returns:
            a PIL image (RGB, ``size x size``).
        """
        if not isinstance(prompt, str) and not (
            isinstance(prompt, Sequence) and all(is_int(t) for t in prompt)
        ):
            raise TypeError(
                f"generate_image: prompt must be a str or a list of token ids, got {prompt!r:.100}"
            )
        output = (
            None if output_path is None else _writable_image_path(output_path, "generate_image")
        )
        (image,) = self._text_to_image(
            [prompt],
            op="generate_image",
            names={"prompt": "prompt", "image_size": "size"},
            steps=steps,
            guidance_scale=guidance_scale,
            image_size=size,
            noise=noise,
            seed=seed,
            generator=generator,
            max_condition_length=max_condition_length,
            scoring=scoring,
            callback_on_step_end=None,
            progress=progress,
            timings=timings,
        )
        if output is not None:
            image.save(output)
        return image

    def _text_to_image(
        self,
        prompts: list[str | Sequence[int]],
        *,
        op: str,
        names: Mapping[str, str],
        steps: int,
        guidance_scale: float,
        image_size: int,
        noise: torch.Tensor | None,
        seed: int | Sequence[int] | None,
        generator: torch.Generator | Sequence[torch.Generator] | None,
        max_condition_length: int | None,
        scoring: str | None,
        callback_on_step_end: StepEndCallback | None,
        progress: bool,
        timings: dict[str, float] | None,
    ) -> list[Any]:
        """Prompts -> PIL images, one batch through each model: every argument is checked first, then
        the AR model, the DiT and the VAE run in turn, each stage lapped into ``timings``."""
        if self.dit is None or self.vae is None:
            raise ValueError(f"{op}: this pipeline has no DiT/VAE (pass dit_path and vae_path)")
        llm = self.ar.config.llm
        timer = self._timer(timings)
        length = check_int(
            f"{op}: max_condition_length",
            self.dit.config.model_max_length
            if max_condition_length is None
            else max_condition_length,
            minimum=1,
        )
        check_bool(f"{op}: progress", progress)
        check_sampling(
            self.dit,
            batch=len(prompts),
            steps=steps,
            guidance_scale=guidance_scale,
            image_size=image_size,
            noise=noise,
            seed=seed,
            generator=generator,
            op=op,
            names=names,
        )
        self.ar.options.replace(scoring=scoring)  # validated here, used by generate
        prompt_ids = [self._image_prompt(p, f"{op}: {names['prompt']}") for p in prompts]
        # The official max_new_tokens = 2 * Lc + 10 decode steps yield one group more.
        blocks = 2 * length + 11
        self.ar.check_requests(
            prompt_ids,
            pixel_values=None,
            image_grid_thw=None,
            max_new_blocks=blocks,
            context=(llm.max_seq_len, "max_seq_len"),
            prompt_arg=f"{op}: {names['prompt']}",
            blocks_arg=f"{op}: the image blocks (2 * max_condition_length + 11)",
        )
        timer.lap("preprocess")
        with (
            self._placed(self.ar),
            tqdm(total=blocks, desc="image blocks", disable=not progress, leave=False) as bar,
        ):
            out = self.ar.generate(
                prompt_ids,
                max_new_blocks=blocks,
                scoring=scoring,
                return_hidden_states=True,
                timings=timer.timings,
                step_callback=lambda _: bar.update(1),
            )
        timer = StageTimer(timer.timings, self.device)
        conditions = [
            extract_condition(
                out.groups[b, :n],
                out.hidden_states[b, : n - 1],
                vision_start=llm.vision_start_token_id,
                vision_end=llm.vision_end_token_id,
                max_length=length,
            )
            for b, n in enumerate(out.lengths.tolist())
        ]
        pixels = render(
            self.dit,
            self.vae,
            torch.cat([c.hidden for c in conditions]),
            torch.cat([c.mask for c in conditions]),
            steps=steps,
            timer=timer,
            progress=progress,
            placement=self._placed,
            callback=self._step_end(callback_on_step_end, steps),
            guidance_scale=guidance_scale,
            image_size=image_size,
            noise=noise,
            seed=seed,
            generator=generator,
        )
        return [_to_image(p) for p in pixels]

    def _image_prompt(self, prompt: str | Sequence[int], arg: str) -> list[int]:
        """A user's text (templated as one user turn) or templated ids -> the ids the AR model
        continues with image blocks: cut after the assistant turn, ``<|vision_start|>`` appended."""
        tokenizer = self.processor.tokenizer
        if isinstance(prompt, str):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            ids, assistant_prefix = (
                tokenizer.encode(text),
                tokenizer.encode(f"{IM_START_TOKEN}assistant\n"),
            )
        else:
            ids, assistant_prefix = list(prompt), None
        return text_to_image_prompt(
            ids,
            assistant_prefix=assistant_prefix,
            vision_start=self.ar.config.llm.vision_start_token_id,
            arg=arg,
        )

    def _step_end(
        self, callback: StepEndCallback | None, steps: int
    ) -> Callable[[int, torch.Tensor], torch.Tensor | None] | None:
        """diffusers' ``callback_on_step_end`` as a ``sample_latents`` callback (``steps`` checked)."""
        if callback is None:
            return None
        # The T2I schedule that sample_latents runs (its defaults: shift 3, the demo's linspace).
        timesteps = flow_schedule(steps)[1]

        def on_step(step: int, latents: torch.Tensor) -> torch.Tensor | None:
            result = callback(self, step, timesteps[step], {"latents": latents})
            return result.get("latents") if isinstance(result, Mapping) else None

        return on_step

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
        output_path: str | os.PathLike[str] | None = None,
        progress: bool = False,
        timings: dict[str, float] | None = None,
    ) -> Any:
        """Image -> Kelix-Tok codes -> fused code features -> Kelix-AEDIT -> DC-AE (kelix-dit.md §1.2, §6).

        The AEDIT settings the spec could not confirm are arguments, with the model card's values as
        defaults: ``fusion`` of the 8 up-projected codes ("mean"), the first resize's ``max_pixels``
        (324 * 28^2: a square image gives 18 x 18 = 324 tokens), 20 Euler ``steps`` on the diffusers
        ``"default"`` schedule, ``guidance_scale`` 4.5, ``size`` 512. The condition positions use the
        real token grid; an image with more tokens than AEDIT's ``model_max_length`` is conditioned on
        all of them (see :meth:`KelixDiT.null_condition`). Whether AEDIT has a connector,
        cross-attention RoPE or x-norm is read from its checkpoint, and the run's choices are logged.
        ``output_path``: also save the image there (checked before any model runs). ``timings``: when
        given, receives the seconds spent per stage (``preprocess``, ``vit_vq``, ``dit``, ``vae``).

        Returns:
            a PIL image (RGB, ``size x size``).
        """
        op = "reconstruct"
        if self.aedit is None or self.vae is None:
            raise ValueError(f"{op}: this pipeline has no AEDIT/VAE (pass aedit_path and vae_path)")
        if fusion not in FUSIONS:
            raise ValueError(f"{op}: fusion must be 'sum' or 'mean', got {fusion!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"{op}: schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
        check_int(f"{op}: max_pixels", max_pixels, minimum=1)
        check_bool(f"{op}: progress", progress)
        check_sampling(
            self.aedit,
            batch=1,
            steps=steps,
            guidance_scale=guidance_scale,
            image_size=size,
            seed=seed,
            op=op,
            names={"image_size": "size"},
        )
        output = None if output_path is None else _writable_image_path(output_path, op)
        timer = self._timer(timings)
        pixel_values, grid = preprocess_image(
            image, self.processor.image_config, fetch_max_pixels=max_pixels
        )
        timer.lap("preprocess")
        tok, llm = self.ar.model.tokenizer, self.ar.config.llm
        with self._placed(self.ar), torch.inference_mode():
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
            "kelix_fast: AEDIT reconstruction: %d tokens (model_max_length %d), fusion=%s, "
            "connector=%s, cross-attn RoPE=%s, x-norm=%s, %d steps (%s schedule), guidance %.2f, %d px",
            features.shape[1],
            c.model_max_length,
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
            placement=self._placed,
            guidance_scale=guidance_scale,
            schedule=schedule,
            image_size=size,
            seed=seed,
            image_grid=(int(grid[0, 1]), int(grid[0, 2])),
        )
        result = _to_image(pixels[0])
        if output is not None:
            result.save(output)
        return result


def _writable_image_path(path: str | os.PathLike[str], op: str) -> Path:
    """``output_path`` checked before any work: an image extension Pillow writes, an existing folder
    that can be written, and not a folder itself."""
    from PIL import Image

    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{op}: output_path must be a str or a path, got {type(path).__name__}")
    file = Path(path)
    image_format = Image.registered_extensions().get(file.suffix.lower())
    if image_format not in Image.SAVE:
        raise ValueError(
            f"{op}: output_path must end in an image extension Pillow can write (.png, .jpg, "
            f".webp, ...), got {os.fspath(path)!r}"
        )
    folder = file.parent
    if not folder.is_dir():
        raise ValueError(f"{op}: output_path's folder {os.fspath(folder)!r} does not exist")
    if file.is_dir():
        raise ValueError(f"{op}: output_path {os.fspath(path)!r} is a folder")
    if not os.access(folder, os.W_OK) or (file.exists() and not os.access(file, os.W_OK)):
        raise ValueError(f"{op}: output_path {os.fspath(path)!r} is not writable")
    return file


def _to_image(pixels: torch.Tensor) -> Any:
    """pixels [H, W, 3] uint8 -> a PIL image (Pillow is a dependency, imported when one is made)."""
    from PIL import Image

    return Image.fromarray(pixels.cpu().numpy())
