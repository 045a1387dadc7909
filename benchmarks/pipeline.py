"""The pipeline suite: the whole kelix_fast engine at release scale, stage by stage, each stage
beside the engine's own reference path timed in the same run, with the official code's figures of
another run.

Stages (release shapes; ``quick`` swaps in the tiny models and shapes, :func:`make_schedule`):

* ``tok``: ``KelixAR.tokenize_images`` on a 448 px and a 980 px image (patch grids 32x32 and 70x70),
  and its parts, each timed on its own by calling the tokenizer's modules in order on the previous
  part's output: ``tok.vit`` (the NaViT), ``tok.vit_attention`` (the ViT's attention cores alone,
  one per layer), ``tok.merge_encoder`` (2x2 merge projector + encoder Linear), ``tok.quantizer``
  (the 8 sub-codebook argmins);
* ``generate``: ``KelixAR.generate`` (greedy) of 64 and 324 image blocks after a 48-token prompt, at
  batch 1 and 32;
* ``dit.step`` (one DiT evaluation) and ``dit.sample`` (``sample_latents``, 50 Euler steps) at
  1024 px, 720 condition rows of which 326 valid, guidance 1.0 and 4.5;
* ``vae.decode``: ``decode_latents`` (diffusers ``AutoencoderDC``, the SANA 1.5 f32c32 DC-AE) at
  1024 px;
* ``t2i``: text to image, 324 blocks + 50 DiT steps at guidance 1.0 + decode.

Variants, on the same models and inputs: ``engine`` (kelix_fast as shipped: ``backend="auto"`` ops,
CUDA graphs on CUDA, the DiT condition prepared once per image and the null branch run only when
guidance != 1) and ``reference_path`` (the engine's PyTorch reference: every op on
``backend="torch"``, ``cuda_graphs=False``, and the DiT driven the official way,
:func:`official_style_sample`). The DC-AE is diffusers' code in both, so ``vae.decode`` has the
engine variant only.

Models: random weights (speed does not depend on their values) built on the meta device and
materialised directly on the device in the run's dtype (bf16 on CUDA, float32 on the CPU), so
nothing release-sized passes through host memory: the LLM and the Block Decoder by
:func:`benchmarks.generation.random_model` (output-head text rows zero: every block is a full image
block of 8 Block Decoder steps and no request stops early), the tokenizer, the DiT and the DC-AE by
:func:`materialise`.

Timing: ``timing.time_cuda`` (CUDA events) or ``timing.time_cpu`` (``time.perf_counter``) per point,
under a :class:`timing.Deadline` when the caller caps a point: a point whose first warm-up call
alone runs past the cap is recorded ``timeout`` and not repeated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import json
import statistics
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks import decode_traffic, environment, generation, timing
from kelix_fast import GenerationOutput, KelixAR, KelixDiT, dit_position_args, ops, presets
from kelix_fast.config import KelixARConfig, KelixDiTConfig
from kelix_fast.models.dit import DiTCondition
from kelix_fast.models.vae import decode_latents
from kelix_fast.runtime.flow import flow_schedule, sample_latents
from kelix_fast.runtime.timing import StageTimer

# The reference first, so that the engine's line can show its speedup.
VARIANTS = ("reference_path", "engine")
TOK_STAGES = ("tok", "tok.vit", "tok.vit_attention", "tok.merge_encoder", "tok.quantizer")
HEAVY_STAGES = ("generate", "dit.sample", "t2i")  # seconds per call: a few fixed repetitions
T2I_GUIDANCE = 1.0  # the demo's

INIT = (
    f"random: matrices N(0, {generation.WEIGHT_STD}), norm gains 1, biases 0; LLM output-head text "
    "rows zero (every block a full image block, no early end)"
)

OFFICIAL_SOURCE = "shared/measurements/h200-2026-12-04/official.json"
OFFICIAL_PATH = environment.REPO.parent / OFFICIAL_SOURCE

# (goal, stage, shape fields the record must have, limit in ms): engine records at release shapes.
GOALS = (
    ("tok_448px", "tok", {"grid": [32, 32]}, 5.0),
    ("tok_980px", "tok", {"grid": [70, 70]}, 16.0),
    (
        "dit_50_steps_guidance_1",
        "dit.sample",
        {"image_px": 1024, "condition_rows": 720, "steps": 50, "guidance": 1.0},
        300.0,
    ),
    (
        "dit_50_steps_guidance_4.5",
        "dit.sample",
        {"image_px": 1024, "condition_rows": 720, "steps": 50, "guidance": 4.5},
        500.0,
    ),
)

Shape = dict[str, Any]
# One call of a point; ``parts`` receives seconds per named part of the call (e.g. prefill, decode).
Call = Callable[[dict[str, float]], object]


class Unavailable(Exception):
    """The point cannot run here (e.g. diffusers is missing); the message says why."""


# --------------------------------------------------------------------------- schedule


@dataclasses.dataclass(frozen=True)
class Schedule:
    """One run's models and shapes, and the timing budgets of light and heavy points."""

    ar: KelixARConfig
    dit: KelixDiTConfig
    vae: dict[str, Any]  # AutoencoderDC arguments
    names: dict[str, str]  # where each config comes from, for the record
    grids: tuple[int, ...]  # square patch grids of the Kelix-Tok images
    prompt: int  # text tokens before the generated blocks
    blocks: tuple[int, ...]
    batches: tuple[int, ...]
    t2i_blocks: int
    image_size: int  # DiT / DC-AE output side in pixels
    condition_rows: int  # DiT condition length Lc (padded)
    steps: int
    guidances: tuple[float, ...]
    light: timing.Budget
    heavy: timing.Budget

    @property
    def valid_rows(self) -> int:
        """Valid condition rows of a text-to-image: its image blocks, <|vision_start|> and
        <|vision_end|>."""
        return self.t2i_blocks + 2


def make_schedule(quick: bool) -> Schedule:
    """Release models and shapes, or (``quick``) the embedded tiny models and shapes (CPU smoke)."""
    if quick:
        return Schedule(
            ar=presets.tiny_config(),
            dit=presets.tiny_dit_config(),
            vae=presets.TINY_VAE_CONFIG,
            names={"ar": "tiny_config()", "dit": "tiny_dit_config()", "vae": "TINY_VAE_CONFIG"},
            grids=(4, 6),
            prompt=8,
            blocks=(2, 3),
            batches=(1, 2),
            t2i_blocks=3,
            image_size=128,
            condition_rows=presets.tiny_dit_config().model_max_length,
            steps=2,
            guidances=(1.0, 4.5),
            light=timing.Budget(warmup=1, min_reps=2, max_reps=3, target_s=0.02),
            heavy=timing.Budget(warmup=1, min_reps=1, max_reps=1, target_s=0.0),
        )
    return Schedule(
        ar=presets.release_config(),
        dit=presets.release_dit_config(),
        vae=presets.RELEASE_VAE_CONFIG,
        names={
            "ar": "release_config()",
            "dit": "Kelix-DiT release (kelix-dit.md §2), model_max_length 720",
            "vae": "DC-AE f32c32, SANA 1.5 (kelix-dit.md §7)",
        },
        grids=(32, 70),
        prompt=48,
        blocks=(64, 324),
        batches=(1, 32),
        t2i_blocks=324,
        image_size=1024,
        condition_rows=720,
        steps=50,
        guidances=(1.0, 4.5),
        light=timing.FULL,
        heavy=timing.Budget(warmup=1, min_reps=3, max_reps=3, target_s=0.0),
    )


def plan(schedule: Schedule) -> list[tuple[str, Shape]]:
    """Every point of the run, in order: (stage, shape)."""
    patch = schedule.ar.tokenizer.vision_config.patch_size
    side = schedule.image_size // schedule.dit.vae_downsample_rate
    image = {"image_px": schedule.image_size, "latent": [side, side]}
    condition = image | {
        "condition_rows": schedule.condition_rows,
        "valid_rows": schedule.valid_rows,
    }
    points: list[tuple[str, Shape]] = []
    for grid in schedule.grids:
        shape = {"image_px": grid * patch, "grid": [grid, grid], "tokens": grid * grid // 4}
        points += [(stage, shape) for stage in TOK_STAGES]
    for blocks in schedule.blocks:
        for batch in schedule.batches:
            points.append(
                ("generate", {"prompt": schedule.prompt, "blocks": blocks, "batch": batch})
            )
    for guidance in schedule.guidances:
        points.append(("dit.step", condition | {"guidance": guidance}))
        points.append(("dit.sample", condition | {"guidance": guidance, "steps": schedule.steps}))
    points.append(("vae.decode", image))
    t2i = {"prompt": schedule.prompt, "blocks": schedule.t2i_blocks, "steps": schedule.steps}
    points.append(("t2i", condition | t2i | {"guidance": T2I_GUIDANCE}))
    return points


def variants(stage: str) -> tuple[str, ...]:
    """The variants a stage is timed in (the DC-AE is the same diffusers code in both)."""
    return ("engine",) if stage == "vae.decode" else VARIANTS


# --------------------------------------------------------------------------- models


@torch.no_grad()
def materialise(module: nn.Module, device: torch.device, dtype: torch.dtype, seed: int) -> None:
    """Allocate ``module`` (built on the meta device) on ``device`` in ``dtype`` and fill it with
    seeded values of a trained scale: every parameter of two or more dimensions N(0, WEIGHT_STD),
    1-D gains 1, biases 0 (the values of ``generation.random_model``, chosen by shape here so that
    the rule fits any module: the tokenizer, the DiT, diffusers' DC-AE)."""
    module.requires_grad_(False)
    # nn.Module.to: diffusers' override warns on any dtype cast (about modules it would keep in
    # float32; the DC-AE has none).
    nn.Module.to(module, dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    for name, param in module.named_parameters():
        if param.dim() >= 2:
            param.normal_(0.0, generation.WEIGHT_STD, generator=generator)
        elif name.rpartition(".")[2] == "bias":
            param.zero_()
        else:
            param.fill_(1.0)


def random_engine(config: KelixARConfig, device: torch.device, dtype: torch.dtype) -> KelixAR:
    """A complete :class:`KelixAR` with random weights on ``device``: the LLM and Block Decoder of
    ``generation.random_model`` (text rows of the head zero) and a materialised tokenizer.

    The quantizer tables are allocated with only the rows the engine reads (1/8 of each, as the
    checkpoint loader does), then turned into codebooks and freed as after a real load.
    """
    model = generation.random_model(config, device, dtype)
    tokenizer = model.tokenizer
    modules = dict(tokenizer.named_modules())
    for name, (start, stop) in tokenizer.quantizer_rows().items():
        owner, _, attr = name.rpartition(".")
        full = getattr(modules[owner], attr)
        setattr(modules[owner], attr, nn.Parameter(full.new_empty(stop - start, full.shape[1])))
    materialise(tokenizer, device, dtype, seed=1)
    tokenizer.process_weights_after_loading()
    return KelixAR(model)


def random_dit(config: KelixDiTConfig, device: torch.device, dtype: torch.dtype) -> KelixDiT:
    """A :class:`KelixDiT` of ``config`` with random weights, built on the meta device, then
    materialised on ``device`` and processed as after a load (the fused projections)."""
    with torch.device("meta"):
        dit = KelixDiT(config)
    materialise(dit, device, dtype, seed=2)
    dit.process_weights_after_loading()
    return dit.eval()


def random_vae(config: dict[str, Any], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A diffusers ``AutoencoderDC(**config)`` with random weights on ``device``.

    Raises:
        Unavailable: diffusers cannot be imported here.
    """
    try:
        from diffusers import AutoencoderDC
    except ImportError as err:
        raise Unavailable(f"diffusers is not importable ({err})") from err
    with torch.device("meta"):
        vae = AutoencoderDC(**config)
    materialise(vae, device, dtype, seed=3)
    return vae.eval()


def parameter_bytes(module: nn.Module) -> int:
    """Bytes held by a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


# --------------------------------------------------------------------------- baselines


@contextlib.contextmanager
def reference_scope() -> Iterator[None]:
    """The reference path's scope: every ``backend="auto"`` op call runs its torch backend."""
    with ops.use_backends(**dict.fromkeys(ops.OPS, "torch")):  # every op on its reference
        yield


def official_style_sample(
    dit: KelixDiT,
    cond_hidden: torch.Tensor,
    cond_mask: torch.Tensor,
    *,
    steps: int,
    guidance_scale: float,
    image_size: int,
    noise: torch.Tensor,
) -> torch.Tensor:
    """The official text-to-image sampling loop (kelix-dit.md §1.1 steps 4-6, §5.2) on the
    engine's DiT.

    The connector once; then per step one batch-2 forward ``[null, cond]`` through
    ``KelixDiT.forward``, which rebuilds the condition (caption MLP, every block's K/V) as the
    official forward does, the CFG combine even at guidance 1.0, and the Euler update in float32
    rounded back to the model dtype.

    Args:
        cond_hidden: [1, Lc, D_llm] LLM states in the model dtype.
        cond_mask: [1, Lc], 1 on the valid prefix.
        noise: [1, C, h, w] initial latents on the model's device.

    Returns:
        [1, C, h, w] latents in the model dtype.
    """
    length, valid = cond_hidden.shape[1], int(cond_mask.ne(0).sum())
    side = image_size // dit.config.vae_downsample_rate
    # The official forward computes the positions once for the batch, from the condition's length.
    latent_pos, cond_pos = dit_position_args(
        (side, side), cond_length=length, valid_length=valid, image_size=image_size
    )
    null, null_mask = dit.null_condition(length)
    cond = torch.cat([null, dit.connect(cond_hidden)])
    mask = torch.cat([null_mask, cond_mask.ne(0)])
    sigmas, timesteps = flow_schedule(steps)
    timesteps = timesteps.to(dit.device)
    latents = noise.to(dit.dtype)
    for i in range(steps):
        v_null, v_cond = dit(
            latents.repeat(2, 1, 1, 1),
            timesteps[i].expand(2),
            cond,
            mask,
            cond_positions=cond_pos,
            latent_positions=latent_pos,
        ).chunk(2)
        velocity = v_null + guidance_scale * (v_cond - v_null)
        step = float(sigmas[i + 1] - sigmas[i])
        latents = (latents.float() + step * velocity.float()).to(dit.dtype)
    return latents


# --------------------------------------------------------------------------- work model


def dit_flop(config: KelixDiTConfig, tokens: int, rows: int) -> int:
    """FLOPs of one DiT evaluation of one sample on a prepared condition (kelix-dit.md §9.2): every
    latent-side weight of the blocks once per latent token (2 per MAC; a depthwise kernel's weight
    counts its MACs per token too) and the cross-attention core over ``rows`` condition rows. Left
    out: the condition-side K/V projections (once per image in the engine; the reference path redoes
    them every step, which is not useful work), the linear-attention core, the embedders and the
    final layer (together under 1% at release shapes)."""
    with torch.device("meta"):
        blocks = KelixDiT(config).blocks
    latent = sum(
        p.numel()
        for name, p in blocks.named_parameters()
        if p.dim() >= 2
        and "scale_shift_table" not in name
        and not any(f"cross_attn.{kv}." in name for kv in ("to_k", "to_v"))
    )
    cross = 4 * tokens * rows * config.hidden_size * config.depth
    return 2 * tokens * latent + cross


# --------------------------------------------------------------------------- official figures


def load_official(path: Path = OFFICIAL_PATH) -> dict[str, Any] | None:
    """The official run's JSON, or None when the shared file is absent."""
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def official_figures(
    official: dict[str, Any] | None, stage: str, shape: Shape
) -> dict[str, Any] | None:
    """What the official code measured for the same work in its own run (None: not measured, or no
    file), with that run's shape, the JSON field it came from and the file (``source``)."""
    if official is None:
        return None
    try:
        found = _official_lookup(official, stage, shape)
    except (KeyError, IndexError, TypeError):  # a file of another layout: nothing to show
        return None
    return None if found is None else found | {"source": OFFICIAL_SOURCE}


def _ms(seconds: float) -> float:
    """The official file's seconds in milliseconds, without float noise in the last digits."""
    return round(seconds * 1e3, 3)


def _official_lookup(official: dict[str, Any], stage: str, shape: Shape) -> dict[str, Any] | None:
    parts = official["parts"]
    if stage in TOK_STAGES:
        images = parts["tok"]["images"]
        i = next((i for i, im in enumerate(images) if im["grid_thw"][1:] == shape["grid"]), None)
        if i is None:
            return None
        image, field = images[i], f"parts.tok.images[{i}]"
        found = {"shape": {"grid": image["grid_thw"][1:], "tokens": image["merged_tokens"]}}
        if stage == "tok":
            median = image["forward_image_tokens_ms"]["median"]
            return found | {"median_ms": median, "field": f"{field}.forward_image_tokens_ms"}
        # The official parts are sums of hooked module spans from one run.
        pieces = {
            "tok.vit": ("vit",),
            "tok.merge_encoder": ("projector", "encoder_linear"),
            "tok.quantizer": ("vq_total",),  # with the official per-call codebook rebuild
        }.get(stage)
        if pieces is None:
            return None
        breakdown = image["breakdown_ms"]
        return found | {
            "median_ms": sum(breakdown[p] for p in pieces),
            "field": f"{field}.breakdown_ms." + "+".join(pieces),
            "note": breakdown["note"],
        }
    if stage == "generate":
        ar = parts["ar"]
        measured = (ar["prompt_len"], ar["image_blocks"], 1)  # its generate breaks at batch > 1
        if (shape["prompt"], shape["blocks"], shape["batch"]) != measured:
            return None
        return {
            "shape": {"prompt": ar["prompt_len"], "blocks": ar["image_blocks"], "batch": 1},
            "median_ms": _ms(ar["generate_total_s_median"]),
            "per_block_ms": ar["decode_group_ms_median"],
            "field": "parts.ar.generate_total_s_median, parts.ar.decode_group_ms_median",
        }
    if stage.startswith("dit."):
        dit = parts["dit"]
        if (
            shape["image_px"] != dit["image_size"]
            or shape["condition_rows"] != dit["condition_rows"]
        ):
            return None
        # The official loop always runs the batch [null, cond]; guidance only scales the combine.
        found = {
            "shape": {
                "image_px": dit["image_size"],
                "condition_rows": dit["condition_rows"],
                "valid_rows": dit["condition_valid_rows"],
                "guidance": dit["cfg_scale"],
                "batch": 2,
            }
        }
        if stage == "dit.step":
            median = dit["forward_cfg_batch2_ms"]["median"]
            return found | {"median_ms": median, "field": "parts.dit.forward_cfg_batch2_ms"}
        found["shape"]["steps"] = dit["steps"]
        return found | {
            "median_ms": _ms(dit["sampling_loop_s_median"]),
            "per_step_ms": dit["generate_image_runs"][0]["step_ms"]["median"],
            "field": "parts.dit.sampling_loop_s_median",
        }
    if stage == "vae.decode":
        vae = parts["vae"]
        if vae["output_shape"][-1] != shape["image_px"]:
            return None
        shape = {"image_px": vae["output_shape"][-1], "latent": vae["latent_shape"][-2:]}
        return {
            "shape": shape,
            "median_ms": vae["decode_ms"]["median"],
            "field": "parts.vae.decode_ms",
        }
    if stage == "t2i":
        if shape["image_px"] != official["config"]["t2i"]["image_size"]:
            return None
        estimates = official["estimates"]
        return {  # the estimate's own assumptions (its note): the demo's 50 steps at guidance 1.0
            "shape": {"image_px": shape["image_px"], "steps": 50, "guidance": 1.0},
            "median_ms": _ms(estimates["t2i_total_s"]),
            "measured": False,
            "field": "estimates.t2i_total_s",
            "note": estimates["note"],
        }
    return None


# --------------------------------------------------------------------------- measuring


class _Bench:
    """Runs every point of a schedule on one device: models built once, inputs once per shape."""

    def __init__(
        self,
        device: torch.device,
        schedule: Schedule,
        roof: dict[str, Any],
        point_timeout_s: float | None,
    ) -> None:
        self.device, self.schedule, self.roof = device, schedule, roof
        self.on_gpu = device.type == "cuda"
        self.dtype = torch.bfloat16 if self.on_gpu else torch.float32
        self.timer = timing.time_cuda if self.on_gpu else timing.time_cpu
        self.point_timeout_s = point_timeout_s
        self.official = load_official()
        self._models: dict[str, object] = {}  # a model, or the exception its build raised
        self._inputs: tuple[tuple, Any] | None = None  # one shape's inputs at a time

    # ------------------------------------------------------------------ models and inputs

    @functools.cached_property
    def sizes(self) -> decode_traffic.Sizes:
        """The AR model's shapes for the generation traffic and memory models."""
        return decode_traffic.Sizes.of(self.schedule.ar, self.dtype)

    def resident_bytes(self) -> dict[str, int]:
        """Device bytes of each model built in this run."""
        built = {n: m for n, m in self._models.items() if not isinstance(m, Exception)}
        return {
            name: model.resident_bytes() if name == "ar" else parameter_bytes(model)
            for name, model in built.items()
        }

    def model(self, name: str) -> Any:
        """The ``ar`` engine, the ``dit`` or the ``vae``, built on first use; a failed build is
        remembered and raised again for every point that needs the model."""
        if name not in self._models:
            build = {"ar": random_engine, "dit": random_dit, "vae": random_vae}[name]
            config = getattr(self.schedule, name)
            try:
                self._models[name] = build(config, self.device, self.dtype)
            except Exception as err:  # noqa: BLE001 - re-raised for each point that needs it
                self._models[name] = err
        found = self._models[name]
        if isinstance(found, Exception):
            raise found
        return found

    def inputs(self, key: tuple, make: Callable[[], Any]) -> Any:
        """``make()``'s result for ``key``, kept until another key is asked for (the previous inputs
        are freed before the next are built)."""
        if self._inputs is None or self._inputs[0] != key:
            self._inputs = None
            self._inputs = (key, make())
        return self._inputs[1]

    def _random(self, shape: tuple[int, ...], seed: int) -> torch.Tensor:
        """Seeded N(0, 1) values (drawn on the CPU, the same on every device) in the run's dtype."""
        values = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
        return values.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------------ calls

    def call(self, stage: str, shape: Shape, variant: str) -> Call:
        """One call of the point, its models and inputs built (outside the timed region)."""
        reference = variant == "reference_path"
        if stage in TOK_STAGES:
            return self._tok(stage, shape)
        if stage == "generate":
            return self._generate(shape, reference)
        if stage == "dit.step":
            return self._dit_step(shape, reference)
        if stage == "dit.sample":
            return self._dit_sample(shape, reference)
        if stage == "vae.decode":
            vae, latents = self.model("vae"), self._latents(1)
            return lambda parts: decode_latents(vae, latents)
        return self._t2i(shape, reference)

    def _tok(self, stage: str, shape: Shape) -> Call:
        """Kelix-Tok or one of its parts on one square image; the inputs are shared by every part
        and variant of the image."""
        engine = self.model("ar")
        tokenizer, vision = engine.model.tokenizer, engine.config.tokenizer.vision_config
        side, patch = shape["grid"][0], vision.patch_size
        grids = [(1, side, side)]

        def make() -> dict[str, Any]:
            """Pixels and each part's input: the previous part's output, computed once."""
            pixels = self._random((side * side, vision.num_channels, patch, patch), seed=side)
            features = tokenizer.visual(pixels, grids)
            heads = (side * side, vision.num_attention_heads, vision.head_dim)
            return {
                "pixels": pixels,
                "features": features,
                "z": tokenizer.encoder(tokenizer.mlp_AR(features, grids)),
                "qkv": [self._random(heads, seed=side + i) for i in range(3)],
                "cu_seqlens": torch.tensor([0, side * side], device=self.device),
            }

        x = self.inputs(("tok", side), make)
        grid = torch.tensor([[1, side, side]])
        if stage == "tok":
            return lambda parts: engine.tokenize_images(x["pixels"], grid)
        if stage == "tok.vit":
            return lambda parts: tokenizer.visual(x["pixels"], grids)
        if stage == "tok.vit_attention":
            q, k, v = x["qkv"]
            return lambda parts: [
                ops.attention(q, k, v, cu_seqlens=x["cu_seqlens"], mask="bidirectional")
                for _ in range(vision.num_hidden_layers)
            ]
        if stage == "tok.merge_encoder":
            return lambda parts: tokenizer.encoder(tokenizer.mlp_AR(x["features"], grids))
        vocab = engine.config.llm.vocab_size
        return lambda parts: tokenizer.quantize(x["z"], vq=engine.vq, vocab_offset=vocab)

    def _prompts(self, batch: int) -> torch.Tensor:
        """[B, prompt] ordinary text ids (the special ids start at <|endoftext|>)."""
        generator = torch.Generator().manual_seed(batch)
        ids = torch.randint(
            0, presets.ENDOFTEXT, (batch, self.schedule.prompt), generator=generator
        )
        return ids.to(self.device)

    def _generate_call(
        self,
        prompts: torch.Tensor,
        blocks: int,
        reference: bool,
        hidden: bool,
        parts: dict[str, float],
    ) -> GenerationOutput:
        """One greedy ``KelixAR.generate``; ``parts`` receives its prefill and decode seconds."""
        out = self.model("ar").generate(
            prompts,
            max_new_blocks=blocks,
            top_k=1,
            seed=0,
            cuda_graphs=False if reference else None,
            return_hidden_states=hidden,
            timings=parts,
        )
        expected = prompts.shape[1] + blocks
        # A request cannot stop early with the head's zero text rows; a model that could would make
        # the per-block times meaningless.
        if bool((out.lengths != expected).any()):
            raise RuntimeError(
                f"a request stopped early: lengths {out.lengths.tolist()}, want {expected}"
            )
        return out

    def _generate(self, shape: Shape, reference: bool) -> Call:
        prompts = self._prompts(shape["batch"])
        return lambda parts: self._generate_call(prompts, shape["blocks"], reference, False, parts)

    def _condition(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random LLM condition: hidden [1, Lc, D_llm] (zero past the valid rows), mask
        [1, Lc]."""
        config, schedule = self.schedule.dit, self.schedule
        width = config.connector_channels if config.use_connector else config.caption_channels
        hidden = self._random((1, schedule.condition_rows, width), seed=7)
        mask = torch.zeros(1, schedule.condition_rows, dtype=torch.int64, device=self.device)
        mask[:, : schedule.valid_rows] = 1
        return hidden * mask[..., None].to(self.dtype), mask

    def _latents(self, batch: int) -> torch.Tensor:
        """[batch, C, h, w] seeded noise in the run's dtype."""
        side = self.schedule.image_size // self.schedule.dit.vae_downsample_rate
        return self._random((batch, self.schedule.dit.in_channels, side, side), seed=11)

    def _positions(self, valid: int) -> dict[str, Any]:
        side = self.schedule.image_size // self.schedule.dit.vae_downsample_rate
        latent, cond = dit_position_args(
            (side, side),
            cond_length=self.schedule.condition_rows,
            valid_length=valid,
            image_size=self.schedule.image_size,
        )
        return {"cond_positions": cond, "latent_positions": latent}

    def _dit_step(self, shape: Shape, reference: bool) -> Call:
        """Engine: ``predict_velocity`` on the condition prepared once (the null branch only when
        guidance != 1). Reference: the official batch-2 ``forward``, which prepares the condition
        in every call."""
        dit = self.model("dit")
        hidden, mask = self._condition()
        positions = self._positions(shape["valid_rows"])
        timestep = flow_schedule(self.schedule.steps)[1][0].to(self.device)  # the first step's
        null, null_mask = dit.null_condition(self.schedule.condition_rows)
        connected = dit.connect(hidden)
        if reference:
            latents, t = self._latents(2), timestep.expand(2)
            cond, both = torch.cat([null, connected]), torch.cat([null_mask, mask.ne(0)])
            return lambda parts: dit(latents, t, cond, both, **positions)
        branches = [dit.prepare_condition(connected, mask, **positions)]
        if shape["guidance"] != 1.0:
            branches.insert(0, dit.prepare_condition(null, null_mask, **positions))
        condition = DiTCondition.concat(branches)
        latents, t = self._latents(len(branches)), timestep.expand(len(branches))
        return lambda parts: dit.predict_velocity(latents, t, condition)

    def _sample(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        noise: torch.Tensor,
        guidance: float,
        reference: bool,
    ) -> torch.Tensor:
        """Latents [1, C, h, w] from a condition (hidden [1, Lc, D_llm], mask [1, Lc]) and noise
        [1, C, h, w]: ``sample_latents`` (engine) or :func:`official_style_sample` (reference)."""
        sample = official_style_sample if reference else sample_latents
        return sample(
            self.model("dit"),
            hidden,
            mask,
            steps=self.schedule.steps,
            guidance_scale=guidance,
            image_size=self.schedule.image_size,
            noise=noise,
        )

    def _dit_sample(self, shape: Shape, reference: bool) -> Call:
        hidden, mask = self._condition()
        noise = self._latents(1)
        return lambda parts: self._sample(hidden, mask, noise, shape["guidance"], reference)

    def _t2i(self, shape: Shape, reference: bool) -> Call:
        """Generate the image blocks, take the last ``valid_rows`` hidden states as the condition
        (they stand in for the <|vision_start|>..<|vision_end|> span, which random blocks never
        close), sample the DiT and decode; ``parts`` gets prefill, decode, dit and vae seconds."""
        vae = self.model("vae")
        self.model("dit")  # built (or its failure raised) before the timed calls
        prompts, noise = self._prompts(1), self._latents(1)
        rows, valid = shape["condition_rows"], shape["valid_rows"]

        def call(parts: dict[str, float]) -> torch.Tensor:
            out = self._generate_call(prompts, shape["blocks"], reference, True, parts)
            timer = StageTimer(parts, self.device)
            states = out.hidden_states[:, -valid:]
            hidden = torch.cat([states, states.new_zeros(1, rows - valid, states.shape[-1])], dim=1)
            mask = torch.zeros(1, rows, dtype=torch.int64, device=self.device)
            mask[:, :valid] = 1
            latents = self._sample(hidden, mask, noise, shape["guidance"], reference)
            timer.lap("dit")
            image = decode_latents(vae, latents)
            timer.lap("vae")
            return image

        return call

    # ------------------------------------------------------------------ one point

    def memory_short(self, stage: str, shape: Shape) -> str | None:
        """Why the point would not fit in the free GPU memory (a generous estimate), or None."""
        if not self.on_gpu:
            return None
        need = self._need_bytes(stage, shape)
        free = torch.cuda.mem_get_info(self.device)[0]
        if need <= free:
            return None
        return (
            f"memory: needs about {need / 1e9:.1f} GB beyond the weights, {free / 1e9:.1f} GB free"
        )

    def _need_bytes(self, stage: str, shape: Shape) -> int:
        """Transient device memory of a point beyond the resident weights, generously: the torch
        reference's dense attention scores dominate Kelix-Tok, the KV cache and prefill transients
        generation (``generation.memory_needed``), the condition K/V of both branches the DiT, and
        about four 256-channel full-size maps the DC-AE decode (kelix-dit.md §7.2, §9.4)."""
        schedule, elem = self.schedule, torch.empty((), dtype=self.dtype).element_size()
        if stage in TOK_STAGES:
            vision = schedule.ar.tokenizer.vision_config
            patches = shape["grid"][0] * shape["grid"][1]
            scores = 2 * patches * patches * vision.num_attention_heads * 4
            return scores + 64 * patches * vision.hidden_size * elem
        dit = schedule.dit
        tokens = (schedule.image_size // dit.vae_downsample_rate) ** 2
        dit_bytes = 2 * 8 * dit.depth * (schedule.condition_rows + tokens) * dit.hidden_size * elem
        vae_bytes = 4 * 256 * schedule.image_size**2 * elem
        if stage in ("generate", "t2i"):
            batch = shape["batch"] if stage == "generate" else 1
            capacity = shape["prompt"] + shape["blocks"]
            ar = generation.memory_needed(self.sizes, schedule.ar, batch, capacity, shape["prompt"])
            return ar if stage == "generate" else ar + dit_bytes + vae_bytes
        return vae_bytes if stage == "vae.decode" else dit_bytes

    def point(
        self, stage: str, shape: Shape, variant: str, reference: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One point in one variant: its record, timed and derived (:meth:`derive`, against
        ``reference``, the reference path's record of the same point). Never raises: a failure is
        recorded with its status and reason, and no times."""
        record: dict[str, Any] = {
            "stage": stage,
            "shape": shape,
            "variant": variant,
            "backends": "torch" if variant == "reference_path" else "auto",
            "status": "ok",
            "reason": None,
        }
        try:
            timed = record | self._time(stage, shape, variant)
            self.derive(timed, reference)
        except timing.PointTimeout as err:
            return record | {"status": "timeout", "reason": str(err)}
        except Unavailable as err:
            return record | {"status": "unavailable", "reason": str(err)}
        except torch.cuda.OutOfMemoryError as err:
            return record | {"status": "skipped", "reason": f"out of memory: {err}"}
        except Exception as err:  # noqa: BLE001 - recorded: one point never stops the suite
            frame = traceback.extract_tb(err.__traceback__)[-1]
            where = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
            return record | {"status": "error", "reason": f"{type(err).__name__}: {err} ({where})"}
        finally:
            if self.on_gpu:
                gc.collect()
                torch.cuda.empty_cache()
        return timed

    def _time(self, stage: str, shape: Shape, variant: str) -> dict[str, Any]:
        """Build the call, check memory, warm up (under the cap) and time: the record's timing
        fields, or ``skipped`` with the reason."""
        call = self.call(stage, shape, variant)
        short = self.memory_short(stage, shape)
        if short:
            return {"status": "skipped", "reason": short}
        calls: list[dict[str, float]] = []  # the parts of every call, the timed ones last

        def run(_: object) -> None:
            calls.append({})
            call(calls[-1])

        budget = self.schedule.heavy if stage in HEAVY_STAGES else self.schedule.light
        cap = self.point_timeout_s
        deadline = timing.NO_DEADLINE if cap is None else timing.Deadline(cap)
        scope = reference_scope() if variant == "reference_path" else contextlib.nullcontext()
        with scope:
            raw = self.timer(run, [None], budget, deadline)
        found = timing.summarize(raw) | {"reps": len(raw)}
        timed = calls[len(calls) - len(raw) :]
        names = sorted({name for parts in timed for name in parts})
        if names:
            found["parts_s"] = {name: [parts.get(name, 0.0) for parts in timed] for name in names}
            found["parts_ms"] = {
                name: statistics.median(values) * 1e3 for name, values in found["parts_s"].items()
            }
        return found

    # ------------------------------------------------------------------ derived

    def derive(self, r: dict[str, Any], reference: dict[str, Any] | None) -> None:
        """A timed record's rates and, for the engine, its speedup over ``reference`` (the reference
        path's record of the same point, timed earlier in this run)."""
        if r["status"] != "ok":
            return
        if r["stage"] == "generate":
            self._per_block(r)
        elif r["stage"].startswith("dit."):
            self._dit_rate(r)
        if r["variant"] == "engine" and reference is not None and reference["status"] == "ok":
            r["speedup"] = reference["median_ms"] / r["median_ms"]
            if "per_block_ms" in r:
                r["speedup_per_block"] = reference["per_block_ms"] / r["per_block_ms"]

    def _per_block(self, r: dict[str, Any]) -> None:
        """Per block of the ``decode`` stage (blocks 2..n; the first comes with the prefill),
        against the bandwidth floor of an image block (``decode_traffic.block_traffic``, exact
        scoring)."""
        shape = r["shape"]
        blocks, batch = shape["blocks"], shape["batch"]
        per_block = [s * 1e3 / (blocks - 1) for s in r["parts_s"]["decode"]]
        r["per_block_ms"] = statistics.median(per_block)
        r["total_per_block_ms"] = r["median_ms"] / blocks
        r["blocks_per_s"] = batch / (r["per_block_ms"] * 1e-3)
        kv_len = shape["prompt"] + blocks / 2  # mean cached length over the decode blocks
        traffic = decode_traffic.block_traffic(
            self.sizes, batch=batch, kv_len=kv_len, variant="eager", scoring="full"
        )
        r["block_bytes"] = traffic["bytes"]
        r["floor_ms"] = traffic["bytes"] / (self.roof["copy_gbps"] * 1e9) * 1e3
        r["roofline_fraction"] = r["floor_ms"] / r["per_block_ms"]

    def _dit_rate(self, r: dict[str, Any]) -> None:
        """Useful DiT work per call (one branch at guidance 1, two otherwise) against the measured
        matmul rate of the run's dtype."""
        shape, config = r["shape"], self.schedule.dit
        branches = 1 if shape["guidance"] == 1.0 else 2
        tokens = shape["latent"][0] * shape["latent"][1]
        flop = branches * shape.get("steps", 1) * dit_flop(config, tokens, shape["condition_rows"])
        r["flop"] = flop
        r["tflops"] = flop / (r["median_ms"] * 1e-3) / 1e12
        r["compute_fraction"] = r["tflops"] / self.roof["matmul_tflops"][_dtype_name(self.dtype)]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def measure(
    device: torch.device,
    roofline: dict[str, Any],
    *,
    quick: bool,
    point_timeout_s: float | None = None,
    on_start: Callable[[dict[str, Any]], None] | None = None,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Build the models, run every point of :func:`plan` in each of its :func:`variants` (one
    printed line per point), and return the suite's record fields: ``model``, ``schedule``,
    ``results`` (one record per point and variant) and ``goals``.

    ``roofline``: as ``benchmarks.roofline.measure`` returns it (``copy_gbps``, ``matmul_tflops``).
    ``point_timeout_s``: a cooperative per-point cap (``timing.Deadline``); None: no cap.
    ``on_start(point)`` / ``on_record(record)``: called as each point starts (its ``stage``, ``shape``
    and ``variant``) and as its record is made, so that a caller killed mid-suite keeps what was
    measured (``benchmarks.run.Progress``).
    """
    schedule = make_schedule(quick)
    bench = _Bench(device, schedule, roofline, point_timeout_s)
    results = []
    with torch.inference_mode():
        for stage, shape in plan(schedule):
            reference = None
            for variant in variants(stage):
                if on_start is not None:
                    on_start({"stage": stage, "shape": shape, "variant": variant})
                record = bench.point(stage, shape, variant, reference)
                record["official_other_run"] = official_figures(bench.official, stage, shape)
                print(line(record), flush=True)
                results.append(record)
                if on_record is not None:
                    on_record(record)
                reference = record if variant == "reference_path" else reference
    return {
        "model": {
            **{f"{name}_config": label for name, label in schedule.names.items()},
            "dtype": _dtype_name(bench.dtype),
            "init": INIT,
            "resident_bytes": bench.resident_bytes(),
        },
        "schedule": {
            "grids": list(schedule.grids),
            "prompt": schedule.prompt,
            "blocks": list(schedule.blocks),
            "batches": list(schedule.batches),
            "t2i_blocks": schedule.t2i_blocks,
            "image_size": schedule.image_size,
            "condition_rows": schedule.condition_rows,
            "valid_rows": schedule.valid_rows,
            "steps": schedule.steps,
            "guidances": list(schedule.guidances),
            "light_budget": dataclasses.asdict(schedule.light),
            "heavy_budget": dataclasses.asdict(schedule.heavy),
            "point_timeout_s": point_timeout_s,
            "timed": (
                "each whole call after untimed warm-up and probe calls; generate per block: its "
                "decode stage / (blocks - 1)"
            ),
        },
        "results": results,
        "goals": goals(results),
    }


def goals(results: list[dict[str, Any]]) -> dict[str, float | bool | None]:
    """The targets of the engine at release shapes, read off this run (None: not measured here)."""
    found: dict[str, float | bool | None] = {}
    for name, stage, fields, limit in GOALS:
        record = next(
            (
                r
                for r in results
                if r["stage"] == stage
                and r["variant"] == "engine"
                and r["status"] == "ok"
                and fields.items() <= r["shape"].items()
            ),
            None,
        )
        ms = None if record is None else record["median_ms"]
        found[f"{name}_ms"] = ms
        found[f"{name}_at_most_{limit:g}ms"] = None if ms is None else ms <= limit
    return found


def line(r: dict[str, Any]) -> str:
    """One printed line per point: its time and rates, or its status and reason."""
    shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
    head = f"pipeline {r['stage']} [{shape}] {r['variant']:14}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['reason']}"
    cells = [f"{head} {r['median_ms']:10.3f} ms (p20 {r['p20_ms']:.3f}, p80 {r['p80_ms']:.3f})"]
    if "per_block_ms" in r:
        cells.append(
            f"{r['per_block_ms']:.3f} ms/block, {100 * r['roofline_fraction']:.1f}% of bandwidth"
        )
    if "tflops" in r:
        cells.append(f"{r['tflops']:.3g} TFLOP/s, {100 * r['compute_fraction']:.1f}% of matmul")
    if "speedup" in r:
        cells.append(f"x{r['speedup']:.2f} vs reference_path")
    official = r.get("official_other_run")
    if official:
        cells.append(f"official (other run) {official['median_ms']:.1f} ms")
    return "  ".join(cells)
