"""The autoregressive engine: :class:`KelixAR` (Kelix-Tok + LLM + Block Decoder), loading and generation.

Every public method validates its inputs before any compute and raises ``ValueError``/``TypeError`` naming
the argument and the expected value.
"""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kelix_fast import presets
from kelix_fast.arguments import check_bool, check_callable, check_int, describe
from kelix_fast.config import KelixARConfig
from kelix_fast.hub import resolve_pretrained
from kelix_fast.models.kelix_ar import CHECKPOINT_RENAMES, DEAD_TENSORS, KelixARModel
from kelix_fast.options import EngineOptions
from kelix_fast.runtime import engine_core, generation, requests
from kelix_fast.runtime.block_selection import host_bound_reason
from kelix_fast.runtime.sampling import SamplingParams
from kelix_fast.runtime.timing import StageTimer
from kelix_fast.weights import (
    SafetensorsCheckpoint,
    available_device,
    build_model,
    engine_placement,
    resolve_dtype,
)

__all__ = ["GenerationOutput", "KelixAR"]

logger = logging.getLogger(__name__)

PromptIds = torch.Tensor | Sequence[torch.Tensor] | Sequence[Sequence[int]]


@dataclass
class GenerationOutput:
    """Result of :meth:`KelixAR.generate` for B requests.

    Attributes:
        groups: [B, T, G+1] int64. Request b's prompt groups followed by its new groups, valid in
            ``groups[b, :lengths[b]]`` (later rows are end-of-block padding). Prompt groups are laid out as
            the official ``generate`` returns them: image positions keep the placeholder id in their G
            slots (the image ids themselves are ``tokenize_images``' output). For B = 1, T = L + n_new.
        lengths: [B] int64, prompt length + new groups of each request.
        hidden_states: [B, T - 1, D] or None. Last-layer LLM outputs (before the final norm) at every
            position fed to the LLM (the last new group is never fed); request b valid in
            ``[:lengths[b] - 1]``, zero after.
        block_decoder_ids: [B, N, G+1] int64, the ids the Block Decoder chain chose for each new group
            (-1 = step not run; equals the group up to its first end-of-block when greedy). N is the most
            new groups of any request; rows past a request's own count are -1.
        prompt_lengths: [B] int64, each request's prompt length (without padding): its new groups are
            ``groups[b, prompt_lengths[b]:lengths[b]]``.
    """

    groups: torch.Tensor
    lengths: torch.Tensor
    hidden_states: torch.Tensor | None
    block_decoder_ids: torch.Tensor
    prompt_lengths: torch.Tensor

    def new_groups(self) -> list[torch.Tensor]:
        """Each request's generated groups, [n_b, G+1] int64 (``processor.batch_decode`` reads their
        slot 0 as text)."""
        spans = zip(self.prompt_lengths.tolist(), self.lengths.tolist())
        return [self.groups[b, start:stop] for b, (start, stop) in enumerate(spans)]


def _engine_call(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a :class:`KelixAR` method that computes under ``torch.inference_mode`` and the engine's
    backend choices (``options.backends``)."""

    @functools.wraps(method)
    def call(self: KelixAR, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode(), self.options.backend_scope():
            return method(self, *args, **kwargs)

    return call


class KelixAR:
    """The Kelix AR engine: tokenize images, build group prompts, score them and generate blocks.

    Build it with :meth:`from_pretrained` (official checkpoint directory) or :meth:`tiny` (no files).
    """

    def __init__(self, model: KelixARModel, *, options: EngineOptions | None = None) -> None:
        if options is not None and not isinstance(options, EngineOptions):
            raise TypeError(f"options must be an EngineOptions, got {type(options).__name__}")
        self.model = model
        self.options = options or EngineOptions()
        # Engine cores (decode slots, KV caches, captured CUDA graphs) kept across generate calls, one
        # per (batch bucket, capacity bucket, graphs); least recently used first.
        self._cores: OrderedDict[tuple[int, int, bool], engine_core.EngineCore] = OrderedDict()

    def release_decode_graphs(self) -> None:
        """Free the decode slots, KV caches and CUDA graphs kept from earlier ``generate`` calls (they
        are rebuilt on demand; at most two shapes are kept)."""
        self._cores.clear()

    def _engine_core(self, batch: int, capacity: int, cuda_graphs: bool) -> engine_core.EngineCore:
        """An idle core for a static batch: batches padded to a power of two and capacities rounded up
        to a multiple of 512 (within ``max_seq_len``), so calls of similar sizes reuse one core and its
        captured graphs."""
        batch = 1 << (batch - 1).bit_length()
        capacity = min(-(-capacity // 512) * 512, self.config.llm.max_seq_len)
        key = (batch, capacity, cuda_graphs)
        core = self._cores.pop(key, None)
        if core is None:
            while len(self._cores) >= 2:
                self._cores.popitem(last=False)
            core = engine_core.EngineCore(
                self.model, max_batch=batch, capacity=capacity, cuda_graphs=cuda_graphs
            )
        self._cores[key] = core
        return core

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        options: EngineOptions | None = None,
        **option_fields: Any,
    ) -> KelixAR:
        """Load an official Kelix AR checkpoint (``config.json`` + ``*.safetensors``).

        Args:
            path: a directory with the muse ``config.json`` and one or many safetensors files (with or
                without ``model.safetensors.index.json``), or a Hugging Face repo id such as
                ``"OpenOneRec/Kelix-SFT"``; ``subfolder``, ``revision``, ``local_files_only`` and
                ``cache_dir`` as :func:`kelix_fast.hub.resolve_pretrained` takes them.
            device: default CUDA when available, else CPU.
            dtype: engine dtype, a ``torch.dtype`` or a name (``"bfloat16"``, ``"bf16"``,
                ``"float32"``, ...); ``torch_dtype`` is its transformers alias (not both). Default
                bfloat16 on CUDA, float32 on CPU. Weights are cast once at load.
            options: the engine's :class:`~kelix_fast.options.EngineOptions` (default: the defaults);
                ``option_fields`` (``vq="exact"``, ``scoring=...``, ...) override single fields.

        Raises:
            ConfigError: unsupported config. WeightsMismatchError: missing/unexpected/mis-shaped tensors.
            FileNotFoundError: ``path`` is neither a directory nor a repo that could be found.
        """
        dtype = resolve_dtype(dtype, torch_dtype, owner="KelixAR")
        directory = resolve_pretrained(
            path,
            subfolder=subfolder,
            revision=revision,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            arg="KelixAR.from_pretrained: path",
        )
        config = KelixARConfig.from_json(directory)
        return cls.from_weights(
            config,
            SafetensorsCheckpoint(directory),
            device=device,
            dtype=dtype,
            options=options,
            **option_fields,
        )

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        options: EngineOptions | None = None,
        **option_fields: Any,
    ) -> KelixAR:
        """The embedded tiny Kelix AR model (``presets.tiny_config()``) with the deterministic random
        weights of ``seed``: no files needed (demo, tests, examples). ``dtype``/``torch_dtype`` as in
        :meth:`from_pretrained`."""
        config = presets.tiny_config()
        return cls.from_weights(
            config,
            presets.random_weights(config, seed),
            device=device,
            dtype=resolve_dtype(dtype, torch_dtype, owner="KelixAR"),
            options=options,
            **option_fields,
        )

    @classmethod
    def from_weights(
        cls,
        config: KelixARConfig,
        weights: SafetensorsCheckpoint | Mapping[str, torch.Tensor],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        options: EngineOptions | None = None,
        **option_fields: Any,
    ) -> KelixAR:
        """Like :meth:`from_pretrained` with a parsed config and tensors under the official key names."""
        device, dtype = engine_placement(device, dtype, owner="KelixAR")
        options = (options or EngineOptions()).replace(**option_fields)  # validated before loading
        model = build_model(
            lambda: KelixARModel(config),
            weights,
            device=device,
            dtype=dtype,
            dead=DEAD_TENSORS,
            renames=CHECKPOINT_RENAMES,
            partial_rows=KelixARModel.partial_rows,
        )
        engine = cls(model, options=options)
        logger.info(
            "kelix_fast: loaded Kelix AR on %s in %s, resident %.3f GB (dead tensors dropped: %s; "
            "quantizer tables replaced by codebooks)",
            device,
            str(dtype).removeprefix("torch."),
            engine.resident_bytes() / 1e9,
            ", ".join(DEAD_TENSORS),
        )
        return engine

    # ------------------------------------------------------------------ properties

    @property
    def config(self) -> KelixARConfig:
        return self.model.config

    @property
    def vq(self) -> str:
        """Kelix-Tok's distance arithmetic (``options.vq``)."""
        return self.options.vq

    @property
    def device(self) -> torch.device:
        return self.model.llm.norm.scale.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.llm.norm.scale.dtype

    def to(self, device: torch.device | str) -> KelixAR:
        """Move the model to ``device`` (which must exist here) and return the engine. The decode
        slots, KV caches and CUDA graphs of earlier calls are freed (they live on the old device)."""
        device = available_device(device, arg="KelixAR.to: device")
        self.release_decode_graphs()
        self.model.to(device)
        return self

    def resident_bytes(self) -> int:
        """Bytes held by the engine's parameters and buffers (after dropping dead and raw tensors)."""
        tensors = {id(t): t for t in (*self.model.parameters(), *self.model.buffers())}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    # ------------------------------------------------------------------ Kelix-Tok

    @_engine_call
    def tokenize_images(
        self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor
    ) -> torch.Tensor:
        """Images -> visual ids, already offset into the LLM vocabulary.

        Args:
            pixel_values: [Np, 3, p, p] float, patches of every image in ``image_grid_thw`` order, raster.
            image_grid_thw: [n, 3] int, ``(1, h, w)`` per image in patches; h and w even, sum h*w = Np.

        Returns:
            ids: [n_tok, G] int64, ``n_tok = sum h*w/4``; images in order, merged tokens in raster order.
        """
        return self._tokenize(
            pixel_values, requests.check_images(self.config, pixel_values, image_grid_thw)
        )

    def _tokenize(
        self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]]
    ) -> torch.Tensor:
        """tokenize_images after validation (``grids`` from :meth:`_check_images`)."""
        return self.model.tokenizer(
            pixel_values.to(self.device),
            grids,
            vq=self.options.vq,
            vocab_offset=self.config.llm.vocab_size,
        )

    # ------------------------------------------------------------------ prompts

    @_engine_call
    def expand_prompt(
        self, prompt_ids: torch.Tensor, image_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """Token prompt -> groups: text id t becomes ``[t, eob, ..., eob]``; the k-th image placeholder
        (row-major over the batch) becomes ``[image_ids[k], eob]``.

        Args:
            prompt_ids: [B, L] int64 text ids in [0, vocab_size).
            image_ids: [n_tok, G] int64 visual ids (``tokenize_images`` output), one row per placeholder;
                None keeps the placeholders (``[image_token_id] * G + [eob]``, the official layout).

        Returns:
            groups: [B, L, G+1] int64 on the engine's device.
        """
        if not isinstance(prompt_ids, torch.Tensor):
            raise TypeError(
                f"prompt_ids must be a [B, L] int64 tensor, got {type(prompt_ids).__name__}"
            )
        return torch.stack(
            requests.expand_prompts(
                self.config,
                requests.check_prompts(
                    self.config, prompt_ids, arg="prompt_ids", device=self.device
                ),
                image_ids,
                self.device,
            )
        )

    # ------------------------------------------------------------------ scoring

    @_engine_call
    def forward_teacher_forced(
        self, groups: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The official teacher-forced forward (scoring, conformance).

        Args:
            groups: [B, L, G+1] int64 ids in [0, V) (e.g. ``expand_prompt`` output).

        Returns:
            hidden_states: ``num_layers + 1`` tensors [B, L, D]: the group embeddings, then each layer's
                output (the last one before the final norm).
            block_logits: [B, L, G+1, V]; row j of position i scores slot j of group i+1. The last position
                is conditioned on group 0 (the official wrap-around), so its logits are meaningless.
        """
        return generation.forward_teacher_forced(
            self.model, requests.check_groups(self.config, groups, self.device)
        )

    @_engine_call
    def forward_greedy_blocks(
        self, groups: torch.Tensor
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The official forward without teacher forcing (what its ``generate`` runs at prefill).

        Every position decodes its next block greedily; all stop when the last position of the batch emits
        end-of-block, or after ``max_length - 1`` steps. Returns (hidden_states as in
        :meth:`forward_teacher_forced`, block_logits [B, L, K, V]).
        """
        return generation.forward_greedy_blocks(
            self.model, requests.check_groups(self.config, groups, self.device)
        )

    # ------------------------------------------------------------------ generation

    def check_requests(
        self,
        prompt_ids: PromptIds,
        *,
        pixel_values: torch.Tensor | None,
        image_grid_thw: torch.Tensor | None,
        max_new_blocks: int,
        context: tuple[int, str],
        prompt_arg: str = "prompt_ids",
        blocks_arg: str = "max_new_blocks",
    ) -> tuple[list[torch.Tensor], list[tuple[int, int, int]] | None]:
        """Validate generation requests: the checks and messages that :meth:`generate` and
        :meth:`kelix_fast.Engine.add_request` share, none of which computes anything.

        ``context`` = (positions, name): the most positions a request may take (prompt + new blocks - 1)
        and the name of that limit in messages. ``prompt_arg`` and ``blocks_arg``: the caller's names of
        ``prompt_ids`` and ``max_new_blocks`` in messages (e.g. ``input_ids``, ``max_new_tokens``).
        Returns the text prompts [L_b] int64 on the engine's device and the image grids (None without
        images), for :meth:`layout_requests`.
        """
        max_new_blocks = check_int(blocks_arg, max_new_blocks, minimum=1)
        prompts = requests.check_prompts(
            self.config, prompt_ids, arg=prompt_arg, device=self.device
        )
        llm, (limit, limit_name) = self.config.llm, context
        longest = max(p.numel() for p in prompts)
        if longest + max_new_blocks - 1 > limit:
            raise ValueError(
                f"{blocks_arg} = {max_new_blocks} with a {longest}-token prompt needs "
                f"{longest + max_new_blocks - 1} positions, more than {limit_name} = {limit}"
            )
        if (pixel_values is None) != (image_grid_thw is None):
            raise ValueError("pixel_values and image_grid_thw must be given together")
        placeholders = sum(int((p == llm.image_token_id).sum()) for p in prompts)
        if pixel_values is None:
            if placeholders:
                raise ValueError(
                    f"{prompt_arg} holds {placeholders} image placeholders (id "
                    f"{llm.image_token_id}) but no pixel_values were given"
                )
            return prompts, None
        grids = requests.check_images(self.config, pixel_values, image_grid_thw)
        requests.check_placeholders(
            self.config, placeholders, sum(t * h * w // 4 for t, h, w in grids)
        )
        return prompts, grids

    def layout_requests(
        self,
        prompts: list[torch.Tensor],
        pixel_values: torch.Tensor | None,
        grids: list[tuple[int, int, int]] | None,
        timings: dict[str, float] | None = None,
    ) -> list[torch.Tensor]:
        """Checked prompts and images (:meth:`check_requests`) -> groups [L_b, G+1] int64: the images are
        tokenized (``timings["vit_vq"]``) and their ids fill the placeholders in order."""
        image_ids = None
        if grids is not None:
            timer = StageTimer(timings, self.device)
            image_ids = self._tokenize(pixel_values, grids)
            timer.lap("vit_vq")
        return requests.expand_prompts(self.config, prompts, image_ids, self.device)

    @_engine_call
    def generate(
        self,
        prompt_ids: PromptIds | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        max_new_blocks: int | None = None,
        max_new_tokens: int | None = None,
        top_k: int | Sequence[int] = 1,
        top_p: float | Sequence[float] = 1.0,
        temperature: float | Sequence[float] = 1.0,
        seed: int | Sequence[int] | None = None,
        sampler: str | None = None,
        scoring: str | None = None,
        cuda_graphs: bool | None = None,
        return_hidden_states: bool = False,
        timings: dict[str, float] | None = None,
        step_callback: Callable[[int], None] | None = None,
    ) -> GenerationOutput:
        """Generate up to ``max_new_blocks`` new groups after each prompt (Next-Block Prediction).

        Takes the outputs of a :class:`~kelix_fast.processor.KelixProcessor` call as they are, as the
        official demo passes its processor's: ``generate(**processor(text=..., images=...),
        max_new_tokens=256, top_k=1)``.

        Args:
            prompt_ids: [B, L] int64 text ids, or a list of B 1-D id sequences of different lengths. Image
                placeholders (``image_token_id``) are filled, in order, with the ids of ``pixel_values``.
            input_ids: the transformers name of ``prompt_ids`` (give one of the two).
            attention_mask: [B, L] 0/1 with a [B, L] ``prompt_ids``/``input_ids``: 1 on prompt tokens,
                0 on padding (left or right; one run of 1s per row). The padding is dropped, so each
                request is its unpadded prompt.
            pixel_values, image_grid_thw: the images, as for :meth:`tokenize_images`.
            max_new_blocks: >= 1, new groups per request (the official ``max_new_tokens=n`` gives n + 1).
            max_new_tokens: the transformers name of ``max_new_blocks`` (give one of the two), counted
                in blocks: text takes one block per token, an image one block per merged patch; n gives
                at most n new groups, one fewer than the official ``generate``.
            top_k (>= 0, 0 = off; 1 = greedy), top_p (in (0, 1]), temperature (>= 0): block sampling;
                each one value for every request or one value per request.
            seed: None (drawn from torch's global RNG), one int (every request uses it) or one int per
                request, each in [0, 2^31). A request's output never depends on its batch.
            sampler, scoring, cuda_graphs: this call's override of the engine's :attr:`options`
                (None: the engine's; defaults ``"sequential"``, ``"full"``, None).
            sampler: ``"sequential"`` (the engine: each slot conditions the next, selected on the device by
                ``ops.head_select``, no host synchronisation inside a block) or ``"reference"`` (the
                official ``_sample_group`` in the host-driven reference loop; one set of sampling
                parameters, full scoring, no CUDA graphs). Identical when greedy.
            scoring: ``"full"`` (exact: every slot scores the whole vocabulary) or ``"structured"``
                (approximate, opt-in: slot t >= 1 of a visual block scores only sub-codebook t and
                ``q_eos``, kelix-ar.md §7.2; results may differ from ``"full"``).
            cuda_graphs: capture the decode step as a CUDA graph and replay it. None: on for a model on
                CUDA with ``sampler="sequential"`` when every selection runs on the device (else a
                warning says why not); True where it cannot raises. The batch is padded to a power of
                two and the graph kept for later calls of the same bucket (the two latest;
                :meth:`release_decode_graphs` frees them).
            return_hidden_states: also return the last-layer hidden states.
            timings: when given, receives the seconds spent per stage (``vit_vq``, ``prefill``,
                ``decode``), added to what it holds.
            step_callback: called with n after the n-th new group of the batch (progress bars).

        A request stops after a generated group with ``<|im_end|>`` in slot 0 (the first one included).
        Errors name the arguments as the caller gave them (``input_ids``, ``max_new_tokens``).
        """
        options = self.options.replace(sampler=sampler, scoring=scoring, cuda_graphs=cuda_graphs)
        sampler, scoring, cuda_graphs = options.sampler, options.scoring, options.cuda_graphs
        prompt_ids, prompt_arg = requests.aliased("prompt_ids", prompt_ids, "input_ids", input_ids)
        if attention_mask is not None:
            prompt_ids = requests.unpad_prompts(prompt_ids, attention_mask, arg=prompt_arg)
        max_new_blocks, blocks_arg = requests.aliased(
            "max_new_blocks", max_new_blocks, "max_new_tokens", max_new_tokens
        )
        prompts, grids = self.check_requests(
            prompt_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            max_new_blocks=max_new_blocks,
            context=(self.config.llm.max_seq_len, "max_seq_len"),
            prompt_arg=prompt_arg,
            blocks_arg=blocks_arg,
        )
        check_bool("return_hidden_states", return_hidden_states)
        check_callable("step_callback", step_callback)
        if timings is not None and not isinstance(timings, dict):
            raise TypeError(f"timings must be a dict or None, got {describe(timings)}")
        batch, longest = len(prompts), max(p.numel() for p in prompts)
        params = requests.per_request_params(
            batch, temperature=temperature, top_k=top_k, top_p=top_p
        )
        seeds = requests.request_seeds(seed, batch)
        graphs = self._check_decode_mode(sampler, scoring, cuda_graphs, params)
        groups = self.layout_requests(prompts, pixel_values, grids, timings)
        if sampler == "reference":
            results = generation.generate_reference(
                self.model,
                groups,
                max_new_blocks=max_new_blocks,
                params=params[0],
                sampler=sampler,
                generators=[torch.Generator(device=self.device).manual_seed(s) for s in seeds],
                return_hidden_states=return_hidden_states,
                timings=timings,
                step_callback=step_callback,
            )
        else:
            core = self._engine_core(len(groups), longest + max_new_blocks - 1, graphs)
            batch_requests = [
                engine_core.Request(
                    core.new_request_id(), g, p, s, max_new_blocks, scoring, return_hidden_states
                )
                for g, p, s in zip(groups, params, seeds)
            ]
            results = engine_core.generate(
                core, batch_requests, timings=timings, step_callback=step_callback
            )
        return self._collate(
            requests.expand_prompts(self.config, prompts, None, self.device),
            results,
            return_hidden_states,
        )

    def _check_decode_mode(
        self,
        sampler: str,
        scoring: str,
        cuda_graphs: bool | None,
        params: list[SamplingParams],
    ) -> bool:
        """Whether to use CUDA graphs; raises for combinations the chosen loop cannot run."""
        if sampler == "reference":
            if len(set(params)) > 1:
                raise ValueError(
                    'sampler="reference" takes one set of sampling parameters for the whole batch, '
                    f'got {len(set(params))} different ones (use sampler="sequential")'
                )
            if scoring != "full":
                raise ValueError(
                    f'sampler="reference" scores the full vocabulary, got scoring={scoring!r}'
                )
            if cuda_graphs:
                raise ValueError('cuda_graphs=True needs sampler="sequential" (the device loop)')
            return False
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(
                f"cuda_graphs=True needs the model on a CUDA device, it is on {self.device}"
            )
        if self.device.type != "cuda" or cuda_graphs is False:
            return False
        reason = host_bound_reason(params, self.config.llm.total_vocab)
        if reason is None:
            return True
        if cuda_graphs:
            raise ValueError(f"cuda_graphs=True needs selection on the device, but {reason}")
        logger.warning(
            "kelix_fast: generate runs without CUDA graphs and selects on the host (%s)", reason
        )
        return False

    def _collate(
        self,
        prompts: list[torch.Tensor],
        results: list[generation.GeneratedRequest],
        with_hidden: bool,
    ) -> GenerationOutput:
        llm = self.config.llm
        full = [torch.cat([p, r.new_groups]) for p, r in zip(prompts, results)]
        lengths = torch.tensor([f.shape[0] for f in full], dtype=torch.int64)
        batch, longest = len(full), int(lengths.max())
        groups = torch.full(
            (batch, longest, llm.group_size), llm.q_eos_token, dtype=torch.int64, device=self.device
        )
        most_new = max(r.chains.shape[0] for r in results)
        chains = torch.full(
            (batch, most_new, llm.group_size), -1, dtype=torch.int64, device=self.device
        )
        hidden = (
            torch.zeros(batch, longest - 1, llm.embed_dim, dtype=self.dtype, device=self.device)
            if with_hidden
            else None
        )
        for b, (f, r) in enumerate(zip(full, results)):
            groups[b, : f.shape[0]] = f
            chains[b, : r.chains.shape[0]] = r.chains
            if hidden is not None:
                hidden[b, : r.hidden.shape[0]] = r.hidden
        return GenerationOutput(
            groups=groups,
            lengths=lengths,
            hidden_states=hidden,
            block_decoder_ids=chains,
            prompt_lengths=torch.tensor([p.shape[0] for p in prompts], dtype=torch.int64),
        )
