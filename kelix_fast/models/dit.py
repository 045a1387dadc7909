"""Kelix-DiT: the customised SANA DiT that turns LLM hidden states into a flow velocity (kelix-dit.md §3).

Module paths equal the official muse ``SanaModel`` checkpoint keys. Every optional feature is read from
config.json and, where it owns weights, checked against the checkpoint keys at load: a disagreement is an
error naming both (the official loader's ``strict=False`` would drop or zero those weights, §8.4).

The work is split by what it depends on, so a sampler pays for each part once:

* per image: :meth:`KelixDiT.connect` (LLM states -> connector space) and :meth:`KelixDiT.prepare_condition`
  (caption MLP, y-norm, every block's cross-attention K/V with their norms and RoPE, the latent RoPE
  tables) -> :class:`DiTCondition`;
* per step: :meth:`KelixDiT.predict_velocity` (timestep embedding, patch embedding, blocks, final layer).

:meth:`KelixDiT.forward` runs both, as the official ``forward(..., is_y_connected=True)`` does.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kelix_fast.config import ConfigError, KelixDiTConfig
from kelix_fast.hub import resolve_pretrained
from kelix_fast.models.dit_layers import (
    CaptionEmbedder,
    DiTBlock,
    FinalLayer,
    PatchEmbed,
    RMSNorm,
    TimestepEmbedder,
)
from kelix_fast.models.dit_positions import (
    GridPositions,
    _is_int,
    _rope_tables,
    _sincos_pos_embed,
    dit_position_args,
)
from kelix_fast.models.layers import fuse_all_projections
from kelix_fast.weights import (
    SafetensorsCheckpoint,
    build_model,
    engine_placement,
    resolve_dtype,
)

__all__ = [
    "DEAD_TENSORS",
    "DiTCondition",
    "DiTIntermediates",
    "GridPositions",
    "KelixDiT",
    "dit_position_args",
]

logger = logging.getLogger(__name__)

# A buffer of the official model that the forward never reads: with use_pe off nothing uses it, and with
# use_pe on the official multi-scale model recomputes the table for the actual latent grid (§3.2, §3.7).
DEAD_TENSORS = ("pos_embed",)

_CONNECTOR_EPS = 1e-5  # diffusion_connector's RMSNorm (§3.4)


# --------------------------------------------------------------------------- condition and outputs


@dataclass(frozen=True)
class DiTCondition:
    """Everything of a batch of conditions that does not depend on the sampling step.

    Build with :meth:`KelixDiT.prepare_condition`; join branches (e.g. ``[null, cond]`` for CFG) with
    :meth:`concat`.

    Attributes:
        y_embedded: [B, L, D] caption MLP output (``y_embedder``).
        y: [B, L, D] ``attention_y_norm`` output, the source of every block's K and V.
        key_mask: [B, L] bool, True = valid condition row.
        keys, values: one [B, L, H, d] tensor per block (K normed and rotated as the block needs).
        latent_rope: the latents' cross-attention RoPE tables (cos, sin [N, 1, d/2] float32), or None
            when ``use_cross_attn_rope`` is off (then any latent size works).
    """

    y_embedded: torch.Tensor
    y: torch.Tensor
    key_mask: torch.Tensor
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    latent_rope: tuple[torch.Tensor, torch.Tensor] | None

    @property
    def batch_size(self) -> int:
        return self.key_mask.shape[0]

    @classmethod
    def concat(cls, conditions: Sequence[DiTCondition]) -> DiTCondition:
        """Stack conditions along the batch; all must have the same length L and latent RoPE tables."""
        if not conditions:
            raise ValueError("DiTCondition.concat: conditions must not be empty, got 0")
        first = conditions[0]
        for i, c in enumerate(conditions[1:], start=1):
            if c.key_mask.shape[1] != first.key_mask.shape[1]:
                raise ValueError(
                    f"DiTCondition.concat: conditions[{i}] must have length "
                    f"{first.key_mask.shape[1]} like conditions[0], got {c.key_mask.shape[1]}"
                )
            same_rope = (c.latent_rope is None) == (first.latent_rope is None) and (
                c.latent_rope is None
                or all(torch.equal(a, b) for a, b in zip(c.latent_rope, first.latent_rope))
            )
            if not same_rope:
                raise ValueError(
                    f"DiTCondition.concat: conditions[{i}] must share the latent positions of "
                    "conditions[0]"
                )

        def cat(name: str) -> torch.Tensor:
            return torch.cat([getattr(c, name) for c in conditions])

        return cls(
            y_embedded=cat("y_embedded"),
            y=cat("y"),
            key_mask=cat("key_mask"),
            keys=tuple(torch.cat(ks) for ks in zip(*(c.keys for c in conditions))),
            values=tuple(torch.cat(vs) for vs in zip(*(c.values for c in conditions))),
            latent_rope=first.latent_rope,
        )


@dataclass(frozen=True)
class DiTIntermediates:
    """The official hook captures of one forward (golden ``dit_forward``).

    Attributes:
        t_emb: [B, D] ``t_embedder`` output. t_block: [B, 6D] ``t_block`` output (t0).
        y_embedder_out, y_normed: [B, L, D] (from the condition).
        blocks: one [B, h*w, D] output per block.
    """

    t_emb: torch.Tensor
    t_block: torch.Tensor
    y_embedder_out: torch.Tensor
    y_normed: torch.Tensor
    blocks: tuple[torch.Tensor, ...]


# --------------------------------------------------------------------------- the model


class KelixDiT(nn.Module):
    """Kelix-DiT. Build with :meth:`from_pretrained` (an official checkpoint directory)."""

    def __init__(self, config: KelixDiTConfig) -> None:
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config)
        self.t_embedder = TimestepEmbedder(config)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        if config.use_connector:
            self.diffusion_connector = nn.Sequential(
                nn.Linear(config.connector_channels, config.caption_channels),
                nn.GELU(approximate="tanh"),
                nn.Linear(config.caption_channels, config.caption_channels),
                RMSNorm(config.caption_channels, _CONNECTOR_EPS),
            )
        self.y_embedder = CaptionEmbedder(config)
        if config.y_norm:
            self.attention_y_norm = RMSNorm(d, config.norm_eps)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.depth))
        self.final_layer = FinalLayer(config)
        # use_pe tables per (latent grid, device): a moved model builds its table on the new device.
        self._pos_embed: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    # ------------------------------------------------------------------ loading

    def process_weights_after_loading(self) -> None:
        """Fuse each block's self-attention q/k/v projections into one GEMM (called by the loader)."""
        fuse_all_projections(self)

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike[str],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        model_max_length: int | None = None,
        subfolder: str | None = None,
        revision: str | None = None,
        local_files_only: bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> KelixDiT:
        """Load an official Kelix-DiT (muse ``config.json`` + ``*.safetensors``).

        Args:
            path: a directory, or a Hugging Face repo id such as ``"OpenOneRec/Kelix-DiT"``;
                ``subfolder``, ``revision``, ``local_files_only`` and ``cache_dir`` as
                :func:`kelix_fast.hub.resolve_pretrained` takes them.
            device: default CUDA when available, else CPU.
            dtype: a ``torch.dtype`` or a name (``"bfloat16"``, ``"bf16"``, ``"float32"``, ...);
                ``torch_dtype`` is its diffusers alias (not both). Default bfloat16 on CUDA, float32 on
                CPU; weights are cast once at load.
            model_max_length: overrides config.json's value, which must equal the rows of
                ``y_embedder.y_embedding`` (the release says 300 but stores 720; the demo passes 720).

        Raises:
            ConfigError: unsupported config, or config and checkpoint disagree on a feature.
            WeightsMismatchError: missing, unexpected or mis-shaped tensors.
            FileNotFoundError: ``path`` is neither a directory nor a repo that could be found.
        """
        dtype = resolve_dtype(dtype, torch_dtype, owner="KelixDiT")
        directory = resolve_pretrained(
            path,
            subfolder=subfolder,
            revision=revision,
            local_files_only=local_files_only,
            cache_dir=cache_dir,
            arg="KelixDiT.from_pretrained: path",
        )
        config = KelixDiTConfig.from_json(directory)
        return cls.from_weights(
            config,
            SafetensorsCheckpoint(directory),
            device=device,
            dtype=dtype,
            model_max_length=model_max_length,
        )

    @classmethod
    def from_weights(
        cls,
        config: KelixDiTConfig,
        weights: SafetensorsCheckpoint | Mapping[str, torch.Tensor],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        model_max_length: int | None = None,
    ) -> KelixDiT:
        """Like :meth:`from_pretrained` with a parsed config and tensors under the official key names."""
        device, dtype = engine_placement(device, dtype, owner="KelixDiT")
        if model_max_length is not None:
            config = config.with_model_max_length(model_max_length)
        if isinstance(weights, SafetensorsCheckpoint):
            shapes = {key: weights.shape(key) for key in weights}
        else:
            shapes = {key: tuple(t.shape) for key, t in weights.items()}
        _check_features(config, shapes, overridden=model_max_length is not None)
        model = build_model(
            lambda: cls(config), weights, device=device, dtype=dtype, dead=DEAD_TENSORS
        )
        logger.info(
            "kelix_fast: loaded Kelix-DiT on %s in %s (depth %d, qk_norm=%s, cross_norm=%s, "
            "cross-attn RoPE=%s, position scale=%s, x-norm=%s, use_pe=%s, connector=%s, "
            "model_max_length=%d; dead tensors dropped: %s)",
            device,
            str(dtype).removeprefix("torch."),
            config.depth,
            config.qk_norm,
            config.cross_norm,
            config.use_cross_attn_rope,
            config.use_position_scale,
            config.cross_attn_x_norm,
            config.use_pe,
            config.use_connector,
            config.model_max_length,
            ", ".join(DEAD_TENSORS),
        )
        return model

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.x_embedder.proj.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    # ------------------------------------------------------------------ condition (once per image)

    @torch.inference_mode()
    def connect(self, hidden: torch.Tensor) -> torch.Tensor:
        """LLM hidden states -> connector space (§3.4), applied once, outside the sampling loop.

        ``Linear -> GELU(tanh) -> Linear -> RMSNorm(eps 1e-5)``; the identity when the checkpoint has no
        connector (``use_connector`` false).

        Args:
            hidden: [B, Lc, connector_channels] in the model dtype and device (padding rows are
                masked but must be finite: :meth:`prepare_condition` refuses NaN/Inf).

        Returns:
            [B, Lc, caption_channels].
        """
        c = self.config
        width = c.connector_channels if c.use_connector else c.caption_channels
        self._check_tensor("hidden", hidden, (None, None, width), "B, Lc, connector_channels")
        if not c.use_connector:
            return hidden
        return self.diffusion_connector(hidden)

    @torch.inference_mode()
    def null_condition(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The CFG null condition of ``length`` rows (golden README "Sampling" step 2).

        Rows ``y_embedding[:min(model_max_length, length)]``, zero padded to ``length``; the mask is 1 on
        those rows and 0 on the padding. It lives in connector space: do not :meth:`connect` it.

        A condition may be longer than ``model_max_length`` (its valid rows too), as in the official
        code, whose cross-attention takes any length: the null condition then has all
        ``model_max_length`` rows of the table and ``length - model_max_length`` masked zero rows. For
        the T2I demo this is its code (golden README "Sampling" step 2: the table cut by ``[:L]``,
        zero-padded to the condition length, mask 0 on the padding). For AEDIT, whose script was not
        available (kelix-dit.md §6: its null and conditions have equal length, all rows valid), it is a
        reading: the same ``y_embedding[:L]`` cut, padded as the T2I demo pads.

        Returns:
            (cond [1, length, caption_channels] in the model dtype, mask [1, length] bool).
        """
        if not _is_int(length) or length < 1:
            raise ValueError(f"KelixDiT: length must be an int >= 1, got {length!r}")
        table = self.y_embedder.y_embedding
        rows = min(length, table.shape[0])
        cond = torch.zeros(1, length, table.shape[1], dtype=table.dtype, device=table.device)
        cond[0, :rows] = table[:rows]
        mask = torch.zeros(1, length, dtype=torch.bool, device=table.device)
        mask[0, :rows] = True
        return cond, mask

    @torch.inference_mode()
    def prepare_condition(
        self,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        *,
        cond_positions: GridPositions | None = None,
        latent_positions: GridPositions | None = None,
    ) -> DiTCondition:
        """Everything of the forward that depends on the condition only: once per image, not per step.

        Caption MLP, ``attention_y_norm``, and per block K and V (``to_k``/``to_v``, cross_norm, RoPE),
        plus the latent RoPE tables.

        Args:
            cond: [B, L, caption_channels], already connected (:meth:`connect` or
                :meth:`null_condition`), model dtype and device.
            cond_mask: [B, L] bool or 0/1 numbers, 1 = valid row. Any number of valid rows: the
                official cross-attention has no limit (``model_max_length`` only sizes the null
                condition, see :meth:`null_condition`).
            cond_positions, latent_positions: from :func:`dit_position_args`; required when
                ``use_cross_attn_rope`` is on, ignored otherwise (the official code computes them
                anyway and never reads them).
        """
        c = self.config
        batch, length = self._check_tensor(
            "cond", cond, (None, None, c.caption_channels), "B, L, caption_channels"
        )[:2]
        key_mask = self._check_mask(cond_mask, batch, length)
        # Non-finite conditions would give a NaN image silently (checked once per condition). Every
        # row, padding included: a masked NaN row still poisons the attention output (0 * NaN).
        if not bool(torch.isfinite(cond).all()):
            raise ValueError("KelixDiT: cond must hold only finite values, got NaN or Inf")
        rope = latent_rope = None
        if c.use_cross_attn_rope:
            if cond_positions is None or latent_positions is None:
                raise ValueError(
                    "KelixDiT: cond_positions and latent_positions must be given when "
                    "use_cross_attn_rope is on (see dit_position_args), got None"
                )
            self._check_positions("cond_positions", cond_positions, length)
            self._check_positions("latent_positions", latent_positions, None)
            rows, cols = cond_positions.rows.to(self.device), cond_positions.cols.to(self.device)
            if c.use_position_scale:
                # Condition rows/cols are stretched to the latent grid, in float32 and truncated (§3.7).
                (h_x, w_x), (h_y, w_y) = latent_positions.grid, cond_positions.grid
                rows = (rows.float() * max(1.0, h_x / h_y)).long()
                cols = (cols.float() * max(1.0, w_x / w_y)).long()
            rope = _rope_tables(rows, cols, c.cross_head_dim, self.dtype)
            latent_rope = _rope_tables(
                latent_positions.rows.to(self.device),
                latent_positions.cols.to(self.device),
                c.cross_head_dim,
                self.dtype,
            )
        y_embedded = self.y_embedder(cond)
        y = self.attention_y_norm(y_embedded) if c.y_norm else y_embedded
        kv = [block.cross_attn.keys_values(y, rope) for block in self.blocks]
        return DiTCondition(
            y_embedded=y_embedded,
            y=y,
            key_mask=key_mask,
            keys=tuple(k for k, _ in kv),
            values=tuple(v for _, v in kv),
            latent_rope=latent_rope,
        )

    # ------------------------------------------------------------------ denoising (per step)

    @torch.inference_mode()
    def predict_velocity(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        condition: DiTCondition,
        *,
        return_intermediates: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, DiTIntermediates]:
        """One DiT evaluation on a prepared condition: the flow velocity ``v ~ noise - x0`` (§3.6).

        Args:
            latents: [B, in_channels, h, w], model dtype and device.
            timestep: [B] on the model device (float32 in the sampler); truncated to an integer, as the
                official ``timestep.long()`` does (937.5 -> 937).
            condition: from :meth:`prepare_condition` with batch B (and, with cross-attention RoPE,
                latent positions of h*w tokens).
            return_intermediates: also return the official hook captures.

        Returns:
            [B, in_channels, h, w] in the model dtype, or ``(velocity, DiTIntermediates)``.
        """
        c = self.config
        if not isinstance(condition, DiTCondition):
            raise TypeError(
                f"KelixDiT: condition must be a DiTCondition (see prepare_condition), "
                f"got {type(condition).__name__}"
            )
        batch, _, height, width = self._check_tensor(
            "latents", latents, (condition.batch_size, c.in_channels, None, None), "B, C, h, w"
        )
        tokens = height * width
        if condition.latent_rope is not None and condition.latent_rope[0].shape[0] != tokens:
            raise ValueError(
                f"KelixDiT: latents must have h*w = {condition.latent_rope[0].shape[0]} tokens "
                f"(the latent_positions of the condition), got {height}x{width}"
            )
        if not isinstance(timestep, torch.Tensor):
            raise TypeError(
                f"KelixDiT: timestep must be a torch.Tensor, got {type(timestep).__name__}"
            )
        if timestep.shape != (batch,) or timestep.is_complex() or timestep.dtype == torch.bool:
            raise ValueError(
                f"KelixDiT: timestep must be a real tensor of shape [{batch}], "
                f"got {timestep.dtype} {list(timestep.shape)}"
            )
        if timestep.device != self.device:
            raise ValueError(f"KelixDiT: timestep must be on {self.device}, got {timestep.device}")

        t_emb = self.t_embedder(timestep.long())
        t0 = self.t_block(t_emb)
        x = self.x_embedder(latents)
        if c.use_pe:
            x = x + self._latent_pos_embed(height, width)
        outputs = []
        for block, k, v in zip(self.blocks, condition.keys, condition.values):
            x = block(x, t0, k, v, condition.key_mask, condition.latent_rope, (height, width))
            if return_intermediates:
                outputs.append(x)
        out = self.final_layer(x, t_emb).transpose(1, 2).reshape(batch, -1, height, width)
        if not return_intermediates:
            return out
        return out, DiTIntermediates(
            t_emb=t_emb,
            t_block=t0,
            y_embedder_out=condition.y_embedded,
            y_normed=condition.y,
            blocks=tuple(outputs),
        )

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        cond: torch.Tensor,
        cond_mask: torch.Tensor,
        *,
        cond_positions: GridPositions | None = None,
        latent_positions: GridPositions | None = None,
        return_intermediates: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, DiTIntermediates]:
        """The official forward with ``is_y_connected=True``: :meth:`prepare_condition` then
        :meth:`predict_velocity`. A sampler should prepare once and call ``predict_velocity`` per step.

        Shapes as in those two methods: latents [B, C, h, w], timestep [B], cond [B, L,
        caption_channels] (connected), cond_mask [B, L] -> [B, C, h, w].
        """
        condition = self.prepare_condition(
            cond, cond_mask, cond_positions=cond_positions, latent_positions=latent_positions
        )
        return self.predict_velocity(
            latents, timestep, condition, return_intermediates=return_intermediates
        )

    # ------------------------------------------------------------------ helpers

    def _latent_pos_embed(self, height: int, width: int) -> torch.Tensor:
        """use_pe table [h*w, D] in the model dtype, built once per latent grid (§3.7)."""
        key = (height, width, self.device)
        table = self._pos_embed.get(key)
        if table is None:
            c = self.config
            table = _sincos_pos_embed(
                height, width, c.hidden_size, c.input_size, c.pe_interpolation
            ).to(device=self.device, dtype=self.dtype)
            self._pos_embed[key] = table
        return table

    def _check_tensor(
        self, name: str, t: object, expected: tuple[int | None, ...], dims: str
    ) -> tuple[int, ...]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"KelixDiT: {name} must be a torch.Tensor, got {type(t).__name__}")
        ok = t.dim() == len(expected) and all(
            e is None or e == s for e, s in zip(expected, t.shape)
        )
        if not ok:
            want = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
            raise ValueError(
                f"KelixDiT: {name} must have shape {want} ({dims}), got {list(t.shape)}"
            )
        if t.dtype != self.dtype:
            raise ValueError(
                f"KelixDiT: {name} must have the model dtype {self.dtype}, got {t.dtype}"
            )
        if t.device != self.device:
            raise ValueError(f"KelixDiT: {name} must be on {self.device}, got {t.device}")
        return tuple(t.shape)

    def _check_mask(self, mask: object, batch: int, length: int) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(
                f"KelixDiT: cond_mask must be a torch.Tensor, got {type(mask).__name__}"
            )
        if tuple(mask.shape) != (batch, length):
            raise ValueError(
                f"KelixDiT: cond_mask must have shape [{batch}, {length}] (B, L of cond), "
                f"got {list(mask.shape)}"
            )
        if mask.device != self.device:
            raise ValueError(f"KelixDiT: cond_mask must be on {self.device}, got {mask.device}")
        if mask.is_complex() or bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("KelixDiT: cond_mask must hold only 0/1 (or bool) values")
        return mask != 0

    @staticmethod
    def _check_positions(name: str, positions: object, length: int | None) -> None:
        if not isinstance(positions, GridPositions):
            raise TypeError(
                f"KelixDiT: {name} must be a GridPositions (see dit_position_args), "
                f"got {type(positions).__name__}"
            )
        rows, cols = positions.rows, positions.cols
        shape_ok = (
            isinstance(rows, torch.Tensor)
            and isinstance(cols, torch.Tensor)
            and rows.dim() == 1
            and rows.shape == cols.shape
            and rows.dtype == cols.dtype == torch.int64
        )
        if not shape_ok or (length is not None and rows.shape[0] != length):
            want = f"[{length}]" if length is not None else "[n]"
            got = [getattr(t, "shape", type(t).__name__) for t in (rows, cols)]
            raise ValueError(
                f"KelixDiT: {name}.rows and .cols must be int64 tensors of shape {want}, got {got}"
            )
        if len(positions.grid) != 2 or not all(_is_int(g) and g >= 1 for g in positions.grid):
            raise ValueError(f"KelixDiT: {name}.grid must be two ints >= 1, got {positions.grid!r}")


def _check_features(
    config: KelixDiTConfig, shapes: Mapping[str, tuple[int, ...]], *, overridden: bool
) -> None:
    """Config and checkpoint must agree on every feature that owns weights (§8.5)."""
    features = (
        ("qk_norm", config.qk_norm, "blocks.0.attn.q_norm.weight"),
        ("cross_norm", config.cross_norm, "blocks.0.cross_attn.q_norm.weight"),
        ("y_norm", config.y_norm, "attention_y_norm.weight"),
        ("use_connector", config.use_connector, "diffusion_connector.0.weight"),
    )
    for name, enabled, key in features:
        if enabled != (key in shapes):
            flag = "true" if enabled else "false"
            relation = "lacks" if enabled else "has"
            raise ConfigError(f"KelixDiT: config {name}={flag} but the checkpoint {relation} {key}")
    connector = shapes.get("diffusion_connector.0.weight")
    if connector is not None and len(connector) == 2 and connector[1] != config.connector_channels:
        raise ConfigError(
            f"KelixDiT: config connector_channels={config.connector_channels} but the checkpoint's "
            f"diffusion_connector.0.weight has {connector[1]} input columns"
        )
    table = shapes.get("y_embedder.y_embedding")
    if table is not None and len(table) == 2 and table[0] != config.model_max_length:
        source = "override" if overridden else "config.json"
        raise ConfigError(
            f"KelixDiT: model_max_length={config.model_max_length} ({source}) but the checkpoint's "
            f"y_embedder.y_embedding has {table[0]} rows; pass model_max_length={table[0]} "
            "(the official demo overrides it)"
        )
