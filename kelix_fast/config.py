"""Typed configs parsed from the official muse ``config.json`` of Kelix (``"__class__": "KeyeARConfig"``).

The official loader is a pydantic model with ``extra=forbid``: every field it writes is known, so an unknown
field here means another model (or a newer format) and is an error. Each section declares, per official field,
whether the engine *uses* it (dataclass attribute of the same name), *requires* one of a few values (anything
else is unsupported and raises, naming the field), or *ignores* it (training-only or runtime switches whose
semantics the engine fixes; the value is kept only to write the file back). See kelix-ar.md §6.2.

Quirk (golden README 14): the official Qwen3 model reads ``rope_base`` and ``norm_eps``; the duplicate fields
``rope_theta`` and ``rms_norm_eps`` are ignored, and so are they here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = [
    "BlockDecoderConfig",
    "ConfigError",
    "KelixARConfig",
    "KelixDiTConfig",
    "LLMConfig",
    "TokenizerConfig",
    "VisionConfig",
]

_ATTENTION_FUNCTIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


class ConfigError(ValueError):
    """A config.json that is not a supported Kelix config; the message names the field."""


def _check_class(raw: object, expected: str, what: str) -> None:
    """The official file must be a JSON object whose ``__class__`` is ``expected``."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config: expected a JSON object, got {type(raw).__name__}")
    if raw.get("__class__") != expected:
        raise ConfigError(
            f"config: __class__ must be '{expected}' ({what}), got {raw.get('__class__')!r}"
        )


def _read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON of ``path``, a config.json file or a checkpoint directory holding one."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"config: no config.json at {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config: {path} is not valid JSON: {e}") from None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive_int(section: str, name: str, value: object) -> None:
    """``section.name`` must be an integer >= 1 (a width, a count, a length): raises ConfigError naming
    the field and the value (0, negatives, floats such as 64.0, booleans and strings are refused)."""
    if not _is_number(value):
        problem = "must be a number (an integer >= 1)"
    elif not isinstance(value, int):
        problem = "must be an integer >= 1"
    elif value < 1:
        problem = "must be >= 1"
    else:
        return
    raise ConfigError(f"config: {section}.{name} {problem}, got {value!r}")


def _positive_float(section: str, name: str, value: object) -> None:
    """``section.name`` must be a finite number > 0 (an epsilon, a RoPE base, a ratio): raises
    ConfigError naming the field and the value."""
    if not _is_number(value):
        problem = "must be a number (finite, > 0)"
    elif not math.isfinite(value) or value <= 0:
        problem = "must be a finite number > 0"
    else:
        return
    raise ConfigError(f"config: {section}.{name} {problem}, got {value!r}")


def _token_id(section: str, name: str, value: object) -> None:
    """``section.name`` must be a token id, an integer >= 0: raises ConfigError naming field and value."""
    if not _is_number(value):
        problem = "must be a number (a token id >= 0)"
    elif not isinstance(value, int) or value < 0:
        problem = "must be a token id (an integer >= 0)"
    else:
        return
    raise ConfigError(f"config: {section}.{name} {problem}, got {value!r}")


class _Section:
    """Mixin: parse/emit one section of the official config.

    Subclasses are frozen dataclasses whose attribute names equal the official field names they use, and
    declare ``_REQUIRED`` (field -> allowed values, the first is written back) and ``_IGNORED`` (field ->
    default written back).
    """

    _PATH: ClassVar[str]
    _REQUIRED: ClassVar[dict[str, tuple[Any, ...]]]
    _IGNORED: ClassVar[dict[str, Any]]
    _NESTED: ClassVar[dict[str, type[_Section]]] = {}
    # Integer fields that are token ids (may be 0); every other ``int`` field is a positive integer and
    # every ``float`` field a positive finite number (``int | None``: None or the same).
    _TOKEN_IDS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Any:
        if not isinstance(raw, Mapping):
            raise ConfigError(
                f"config: {cls._PATH} must be a JSON object, got {type(raw).__name__}"
            )
        used = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        known = set(used) | set(cls._REQUIRED) | set(cls._IGNORED)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"config: unknown field(s) in {cls._PATH}: {unknown}")
        for name, allowed in cls._REQUIRED.items():
            if name in raw and raw[name] not in allowed:
                expected = allowed[0] if len(allowed) == 1 else f"one of {list(allowed)}"
                raise ConfigError(
                    f"config: {cls._PATH}.{name} = {raw[name]!r} is not supported "
                    f"(kelix_fast implements {expected!r})"
                )
        missing = sorted(set(used) - set(raw))
        if missing:
            raise ConfigError(f"config: missing field(s) in {cls._PATH}: {missing}")
        values = {}
        for name in used:
            nested = cls._NESTED.get(name)
            values[name] = nested.from_dict(raw[name]) if nested else raw[name]
        config = cls(**values)
        config._validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        """The official JSON layout of this section (used + required + ignored fields)."""
        out: dict[str, Any] = {name: allowed[0] for name, allowed in self._REQUIRED.items()}
        out.update(self._IGNORED)
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            out[field.name] = value.to_dict() if isinstance(value, _Section) else value
        return out

    def _validate(self) -> None:
        """Every numeric field, before any cross-field arithmetic: ``int`` fields are positive integers
        (token ids of ``_TOKEN_IDS``: integers >= 0), ``float`` fields positive finite numbers; an
        ``int | None`` field may also be null."""
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            kind = str(field.type)
            if kind == "int | None":
                if value is None:
                    continue
                kind = "int"
            if kind == "int":
                check = _token_id if field.name in self._TOKEN_IDS else _positive_int
                check(self._PATH, field.name, value)
            elif kind == "float":
                _positive_float(self._PATH, field.name, value)

    def _check(self, condition: bool, message: str) -> None:
        if not condition:
            raise ConfigError(f"config: {self._PATH}: {message}")


@dataclass(frozen=True)
class VisionConfig(_Section):
    """NaViT encoder of Kelix-Tok (kelix-ar.md §3.2)."""

    image_size: (
        int  # side of the learned position grid in pixels; grid side = image_size // patch_size
    )
    patch_size: int
    num_channels: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    layer_norm_eps: float
    rope_theta: float

    _PATH: ClassVar[str] = "tokenizer_config.vision_config"
    _REQUIRED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "model_class": ("KeyeVisionModel",),
        "hidden_act": ("gelu_pytorch_tanh",),
        "has_learnable_position_embedding": (True,),
        "use_qk_norm": (False,),
        "attention_function": _ATTENTION_FUNCTIONS,
    }
    _IGNORED: ClassVar[dict[str, Any]] = {
        "max_seq_len": 4096,
        "attention_dropout": 0.0,
        "qk_norm_eps": 1e-6,
        "output_attentions": False,
        "output_hidden_states": False,
    }

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def position_grid(self) -> int:
        """Side of the square learned position table (27 at full scale)."""
        return self.image_size // self.patch_size

    def _validate(self) -> None:
        super()._validate()
        self._check(self.num_channels == 3, f"num_channels must be 3, got {self.num_channels}")
        self._check(
            self.hidden_size % self.num_attention_heads == 0 and self.head_dim % 4 == 0,
            f"hidden_size/num_attention_heads must be a multiple of 4 (2-D RoPE), "
            f"got {self.hidden_size}/{self.num_attention_heads}",
        )


@dataclass(frozen=True)
class TokenizerConfig(_Section):
    """Kelix-Tok: projector, encoder Linear and the multi-sub-codebook quantizer (kelix-ar.md §3.3-3.6)."""

    vision_config: VisionConfig
    codebook_size: (
        int  # rows of every quantizer's table; quantizer q uses the q-th of split_voc slices
    )
    embedding_dim: int  # d: width of one sub-vector / code
    init_embedding_dim: int  # width of the raw (frozen) codebook table
    llm_hidden_size: int
    n_q_tokens: int  # G: sub-codebooks per merged patch
    split_voc: int
    output_dim: int  # up-projector width (fused embeddings, not used by the AR path)
    fusion_type: str

    _PATH: ClassVar[str] = "tokenizer_config"
    _NESTED: ClassVar[dict[str, type[_Section]]] = {"vision_config": VisionConfig}
    _REQUIRED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "model_class": ("KeyeImageTokenizer",),
        "split_dim": (False,),
        "add_voc_reducer": (False,),
        "vq_sampling_mode": ("argmin",),
        "pre_llm_align": (False,),
    }
    _IGNORED: ClassVar[dict[str, Any]] = {
        "vq_temperature": 1.0,
        "vq_temperature_decay": 0.999,
        "vq_min_temperature": 0.1,
    }

    @property
    def codes_per_group(self) -> int:
        """K: codes per sub-codebook (8192 at full scale)."""
        return self.codebook_size // self.split_voc

    def _validate(self) -> None:
        super()._validate()
        self._check(
            self.split_voc == self.n_q_tokens,
            f"split_voc ({self.split_voc}) must equal n_q_tokens ({self.n_q_tokens}): "
            "quantizer q reads slice q of its table",
        )
        self._check(
            self.codebook_size % self.split_voc == 0,
            f"codebook_size ({self.codebook_size}) must be a multiple of split_voc ({self.split_voc})",
        )
        self._check(
            self.fusion_type in ("sum", "mean"),
            f"fusion_type must be 'sum' or 'mean', got {self.fusion_type!r}",
        )


@dataclass(frozen=True)
class LLMConfig(_Section):
    """Unified Qwen3 LLM (kelix-ar.md §4.1). ``vocab_size`` is the text part; visual ids follow it."""

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_dim: int
    max_seq_len: int
    rope_base: float
    norm_eps: float
    eos_token_id: int
    image_token_id: int
    pad_token_id: int | None
    q_eos_token: int
    vision_start_token_id: int
    vision_end_token_id: int
    codebook_size: int  # S: visual ids, all sub-codebooks together
    n_q_tokens: int

    _PATH: ClassVar[str] = "qwen_config"
    _TOKEN_IDS: ClassVar[tuple[str, ...]] = (
        "eos_token_id",
        "image_token_id",
        "pad_token_id",
        "q_eos_token",
        "vision_start_token_id",
        "vision_end_token_id",
    )
    _REQUIRED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "model_class": ("UnifiedQwen3Model",),
        "tie_word_embeddings": (False,),
        "hidden_act": ("silu",),
        "q_proj_bias": (False,),
        "k_proj_bias": (False,),
        "v_proj_bias": (False,),
        "attention_bias": (False,),
        "rope_impl": ("llama",),
        "rope_scaling": (None,),
        "use_sliding_window": (False,),
        "q_norm": (True,),
        "k_norm": (True,),
        "use_multimodal_rope": (False,),
        "pre_embedding_size": (None,),
        "pre_embedding_tokens": (None,),
        "skip_output_layer": (False,),
        "attention_function": _ATTENTION_FUNCTIONS,
    }
    _IGNORED: ClassVar[dict[str, Any]] = {
        "attn_dropout": 0.0,
        "rope_theta": 10000.0,  # quirk 14: not read by the official model
        "rms_norm_eps": 1e-6,  # quirk 14
        "sliding_window": None,
        "mrope_section": None,
        "output_last_hidden_states_only": False,
        "token_decoder_with_teacher_forcing": True,
    }

    @property
    def total_vocab(self) -> int:
        """V: rows of the embedding table and of the output head (text + visual)."""
        return self.vocab_size + self.codebook_size

    @property
    def group_size(self) -> int:
        """Ids per LLM position: G visual slots + the end-of-block slot (9)."""
        return self.n_q_tokens + 1

    def _validate(self) -> None:
        super()._validate()
        self._check(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})",
        )
        self._check(self.head_dim % 2 == 0, f"head_dim must be even, got {self.head_dim}")
        for name in (
            "eos_token_id",
            "image_token_id",
            "vision_start_token_id",
            "vision_end_token_id",
        ):
            value = getattr(self, name)
            self._check(
                0 <= value < self.vocab_size,
                f"{name} ({value}) must be a text id in [0, {self.vocab_size})",
            )
        self._check(
            0 <= self.q_eos_token < self.vocab_size,
            f"q_eos_token ({self.q_eos_token}) must be a text id in [0, {self.vocab_size})",
        )


@dataclass(frozen=True)
class BlockDecoderConfig(_Section):
    """The Block Decoder / NBP head (``UnifiedTokenDecoder``, kelix-ar.md §5.1)."""

    vocab_size: int
    max_pos_length: int
    max_length: int  # the step cap: at most max_length - 1 ids per block
    d_model: int
    eos_token: int
    nhead: int
    num_layers: int
    dim_feedforward: int
    input_dim: int

    _PATH: ClassVar[str] = "token_decoder_config"
    _TOKEN_IDS: ClassVar[tuple[str, ...]] = ("eos_token",)
    _REQUIRED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "model_class": ("UnifiedTokenDecoder",),
        "reduce": (True,),
        "attention_function": _ATTENTION_FUNCTIONS,
    }
    _IGNORED: ClassVar[dict[str, Any]] = {"use_gradient_checkpointing": False}

    @property
    def head_dim(self) -> int:
        return self.d_model // self.nhead

    def _validate(self) -> None:
        super()._validate()
        self._check(
            self.d_model % self.nhead == 0,
            f"d_model ({self.d_model}) must be a multiple of nhead ({self.nhead})",
        )
        self._check(
            1 < self.max_length <= self.max_pos_length,
            f"max_length ({self.max_length}) must be in (1, max_pos_length={self.max_pos_length}]",
        )


@dataclass(frozen=True)
class KelixARConfig:
    """The whole AR model: Kelix-Tok, the LLM and the Block Decoder, cross-checked against each other."""

    llm: LLMConfig
    tokenizer: TokenizerConfig
    block_decoder: BlockDecoderConfig

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> KelixARConfig:
        _check_class(raw, "KeyeARConfig", "a Kelix AR checkpoint")
        top = {
            "__class__",
            "model_class",
            "qwen_config",
            "tokenizer_config",
            "token_decoder_config",
        }
        unknown = sorted(set(raw) - top)
        if unknown:
            raise ConfigError(f"config: unknown top-level field(s): {unknown}")
        if raw.get("model_class", "KeyeARModel") != "KeyeARModel":
            raise ConfigError(
                f"config: model_class must be 'KeyeARModel', got {raw['model_class']!r}"
            )
        for name in ("qwen_config", "tokenizer_config", "token_decoder_config"):
            if name not in raw:
                raise ConfigError(f"config: missing section {name!r}")
        config = cls(
            llm=LLMConfig.from_dict(raw["qwen_config"]),
            tokenizer=TokenizerConfig.from_dict(raw["tokenizer_config"]),
            block_decoder=BlockDecoderConfig.from_dict(raw["token_decoder_config"]),
        )
        config._cross_check()
        return config

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> KelixARConfig:
        """Parse ``path`` (a config.json file or a checkpoint directory holding one)."""
        return cls.from_dict(_read_json(path))

    def to_dict(self) -> dict[str, Any]:
        """The official muse layout, loadable by the official ``KeyeARModel.from_pretrained``."""
        return {
            "model_class": "KeyeARModel",
            "qwen_config": self.llm.to_dict(),
            "tokenizer_config": self.tokenizer.to_dict(),
            "token_decoder_config": self.block_decoder.to_dict(),
            "__class__": "KeyeARConfig",
        }

    def _cross_check(self) -> None:
        llm, tok, dec = self.llm, self.tokenizer, self.block_decoder
        pairs = [
            (
                "tokenizer_config.codebook_size",
                tok.codebook_size,
                "qwen_config.codebook_size",
                llm.codebook_size,
            ),
            (
                "tokenizer_config.n_q_tokens",
                tok.n_q_tokens,
                "qwen_config.n_q_tokens",
                llm.n_q_tokens,
            ),
            (
                "tokenizer_config.llm_hidden_size",
                tok.llm_hidden_size,
                "qwen_config.embed_dim",
                llm.embed_dim,
            ),
            (
                "token_decoder_config.input_dim",
                dec.input_dim,
                "qwen_config.embed_dim",
                llm.embed_dim,
            ),
            (
                "token_decoder_config.vocab_size",
                dec.vocab_size,
                "qwen vocab_size + codebook_size",
                llm.total_vocab,
            ),
            (
                "token_decoder_config.eos_token",
                dec.eos_token,
                "qwen_config.q_eos_token",
                llm.q_eos_token,
            ),
            (
                "token_decoder_config.max_length",
                dec.max_length,
                "qwen_config.n_q_tokens + 1",
                llm.group_size,
            ),
        ]
        for name_a, a, name_b, b in pairs:
            if a != b:
                raise ConfigError(f"config: {name_a} ({a}) must equal {name_b} ({b})")


@dataclass(frozen=True)
class KelixDiTConfig(_Section):
    """Kelix-DiT, the customised SANA DiT (kelix-dit.md §2), parsed from muse ``"__class__": "SanaConfig"``.

    Unlike the AR config, the official ``SanaConfig`` gives every field a code default, so an absent field
    takes that default (``_DEFAULTS``, kelix-dit.md §2 "code default"). Optional features are also checked
    against the checkpoint keys when the model is loaded (``kelix_fast.models.dit``).
    """

    input_size: int  # latent side the unused pos_embed buffer was sized for; base grid of use_pe
    in_channels: int
    hidden_size: int
    depth: int
    num_heads: int  # cross-attention heads
    linear_head_dim: int  # self-attention (LiteLA) head width
    mlp_ratio: float
    caption_channels: int  # connector output / y_embedding width
    model_max_length: int  # rows of y_embedder.y_embedding (the null condition)
    qk_norm: bool
    cross_norm: bool
    use_cross_attn_rope: bool
    use_position_scale: bool
    cross_attn_x_norm: bool
    use_pe: bool
    pe_interpolation: float
    y_norm: bool
    norm_eps: float
    use_connector: bool
    connector_channels: int | None  # LLM hidden size fed to the connector
    vae_downsample_rate: int  # pixels per latent cell (32 for the DC-AE f32c32)

    _PATH: ClassVar[str] = "SanaConfig"
    _REQUIRED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "model_class": ("SanaModel",),
        "patch_size": (1,),
        "attn_type": ("linear",),
        "ffn_type": ("glumbconv",),
        "mlp_acts": (["silu", "silu", None],),
        "pred_sigma": (False,),
        "learn_sigma": (False,),
    }
    _IGNORED: ClassVar[dict[str, Any]] = {
        "cross_attn_type": "flash",  # never read: cross-attention is always the same module (§2)
        "y_norm_scale_factor": 0.01,  # initialisation only
        "class_dropout_prob": 0.1,  # training only
        "drop_path": 0.0,  # training only
        "vae_type": "AutoencoderDC",
        "vae_pretrained": "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
        "text_encoder_name": "google/gemma-2-2b-it",
        "y_embedding_init_method": "randn",  # initialisation only
    }
    # Code defaults of the used fields (kelix-dit.md §2); required and ignored fields default to the
    # value kelix_fast implements or writes back.
    _DEFAULTS: ClassVar[dict[str, Any]] = {
        "input_size": 32,
        "in_channels": 32,
        "hidden_size": 2240,
        "depth": 20,
        "num_heads": 20,
        "linear_head_dim": 32,
        "mlp_ratio": 2.5,
        "caption_channels": 2304,
        "model_max_length": 300,
        "qk_norm": False,
        "cross_norm": False,
        "use_cross_attn_rope": False,
        "use_position_scale": False,
        "cross_attn_x_norm": False,
        "use_pe": False,
        "pe_interpolation": 1.0,
        "y_norm": True,
        "norm_eps": 1e-5,
        "use_connector": False,
        "connector_channels": None,
        "vae_downsample_rate": 32,
    }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> KelixDiTConfig:
        _check_class(raw, "SanaConfig", "a Kelix-DiT checkpoint")
        fields = {k: v for k, v in raw.items() if k != "__class__"}
        return super().from_dict({**cls._DEFAULTS, **fields})

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> KelixDiTConfig:
        """Parse ``path`` (a config.json file or a checkpoint directory holding one)."""
        return cls.from_dict(_read_json(path))

    def to_dict(self) -> dict[str, Any]:
        """The official muse layout, loadable by the official ``SanaConfig``."""
        return {**super().to_dict(), "__class__": "SanaConfig"}

    def with_model_max_length(self, model_max_length: int) -> KelixDiTConfig:
        """This config with another null-condition length (the demo overrides 300 -> 720, §2)."""
        if isinstance(model_max_length, bool) or not isinstance(model_max_length, int):
            raise TypeError(
                f"KelixDiTConfig: model_max_length must be an int, "
                f"got {type(model_max_length).__name__}"
            )
        config = dataclasses.replace(self, model_max_length=model_max_length)
        config._validate()
        return config

    @property
    def cross_head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        """Width of one GLU half of the Mix-FFN (``int(hidden_size * mlp_ratio)``)."""
        return int(self.hidden_size * self.mlp_ratio)

    def _validate(self) -> None:
        super()._validate()
        flags = (
            "qk_norm",
            "cross_norm",
            "use_cross_attn_rope",
            "use_position_scale",
            "cross_attn_x_norm",
            "use_pe",
            "y_norm",
            "use_connector",
        )
        for name in flags:
            value = getattr(self, name)
            self._check(isinstance(value, bool), f"{name} must be true or false, got {value!r}")
        self._check(
            self.hidden_size % self.num_heads == 0,
            f"hidden_size ({self.hidden_size}) must be a multiple of num_heads ({self.num_heads})",
        )
        self._check(
            self.hidden_size % self.linear_head_dim == 0,
            f"hidden_size ({self.hidden_size}) must be a multiple of linear_head_dim "
            f"({self.linear_head_dim})",
        )
        self._check(self.mlp_hidden >= 1, f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.use_cross_attn_rope:
            self._check(
                self.cross_head_dim % 4 == 0,
                f"hidden_size/num_heads must be a multiple of 4 (2-D RoPE), "
                f"got {self.hidden_size}/{self.num_heads}",
            )
        if self.use_pe:
            self._check(
                self.hidden_size % 4 == 0,
                f"hidden_size must be a multiple of 4 (2-D sin-cos embedding), got {self.hidden_size}",
            )
        if self.use_connector:
            channels = self.connector_channels
            self._check(
                isinstance(channels, int) and not isinstance(channels, bool) and channels >= 1,
                f"connector_channels must be an int >= 1 when use_connector is true, got {channels!r}",
            )
