"""Embedded model presets: configurations, deterministic random weights and models that need no files.

:func:`tiny_config` is a complete Kelix AR configuration with the release's token layout (text vocabulary
151,936 with the Qwen/Kelix special ids, 8 sub-codebooks after it) and small widths, for the demo, tests
and examples (``KelixAR.tiny()`` loads it with :func:`random_weights`); :func:`release_config` has the
release's shapes. The tiny DiT, AEDIT and DC-AE are built here too. This module builds models and
weights only: the engines that wrap them (``KelixAR``, ``KelixPipeline``) build on it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save_file

from kelix_fast.arguments import check_seed
from kelix_fast.config import (
    BlockDecoderConfig,
    KelixARConfig,
    KelixDiTConfig,
    LLMConfig,
    TokenizerConfig,
    VisionConfig,
)
from kelix_fast.models.dit import KelixDiT
from kelix_fast.models.kelix_ar import KelixARModel
from kelix_fast.weights import engine_placement

__all__ = [
    "RELEASE_VAE_CONFIG",
    "TINY_VAE_CONFIG",
    "random_weights",
    "release_config",
    "release_dit_config",
    "tiny_aedit",
    "tiny_aedit_config",
    "tiny_config",
    "tiny_dit",
    "tiny_dit_config",
    "tiny_vae",
    "write_checkpoint",
]

# Special ids of the release (kelix-ar.md §2.2).
TEXT_VOCAB = 151936
ENDOFTEXT, IM_START, IM_END = 151643, 151644, 151645
VISION_START, VISION_END, IMAGE_PAD = 151652, 151653, 151655
Q_EOS = 151681

# Lookup tables get N(0, 1); every other matrix (the patch-embedding conv included) N(0, 1/fan_in).
_TABLES = ("embed_tokens.weight", "position_embedding.weight", ".embedding.weight")


def tiny_config(*, codes_per_group: int = 64) -> KelixARConfig:
    """Release token layout, tiny widths: LLM 64 wide (2 layers, GQA 4/2), ViT 32 wide, codes 8 x K."""
    return _kelix_config(
        codes_per_group=codes_per_group,
        vision={"image_size": 56, "hidden_size": 32, "num_hidden_layers": 2,
                "num_attention_heads": 2, "intermediate_size": 64},
        tokenizer={"embedding_dim": 16, "init_embedding_dim": 24, "output_dim": 48},
        llm={"embed_dim": 64, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
             "intermediate_dim": 128, "max_seq_len": 4096},
        block_decoder={"vocab_size": TEXT_VOCAB + 8 * codes_per_group, "max_pos_length": 16,
                       "d_model": 32, "nhead": 2, "dim_feedforward": 64},
    )  # fmt: skip


def release_config() -> KelixARConfig:
    """The release shapes (kelix-ar.md §3.2, §3.5, §4.1, §5.1): a 27-layer 1152-wide ViT, Qwen3-8B (36
    layers, 4096 wide, GQA 32/8), 8 x 8192 codes, a 512-wide 1-layer Block Decoder. For benchmarks with
    random weights (the real checkpoint's config.json gives the same values)."""
    return _kelix_config(
        codes_per_group=8192,
        vision={"image_size": 384, "hidden_size": 1152, "num_hidden_layers": 27,
                "num_attention_heads": 16, "intermediate_size": 4304},
        tokenizer={"embedding_dim": 128, "init_embedding_dim": 4096, "output_dim": 1024},
        llm={"embed_dim": 4096, "num_layers": 36, "num_heads": 32, "num_kv_heads": 8, "head_dim": 128,
             "intermediate_dim": 12288, "max_seq_len": 40960},
        block_decoder={"vocab_size": 65536, "max_pos_length": 65537, "d_model": 512, "nhead": 4,
                       "dim_feedforward": 2048},
    )  # fmt: skip


def _kelix_config(
    *,
    codes_per_group: int,
    vision: dict[str, Any],
    tokenizer: dict[str, Any],
    llm: dict[str, Any],
    block_decoder: dict[str, Any],
) -> KelixARConfig:
    """A config with the release token layout (special ids, 8 sub-codebooks) and the given widths."""
    n_q = 8
    codebook_size = n_q * codes_per_group
    vision_config = VisionConfig(
        patch_size=14, num_channels=3, layer_norm_eps=1e-6, rope_theta=10000.0, **vision
    )
    tokenizer_config = TokenizerConfig(
        vision_config=vision_config,
        codebook_size=codebook_size,
        llm_hidden_size=llm["embed_dim"],
        n_q_tokens=n_q,
        split_voc=n_q,
        fusion_type="sum",
        **tokenizer,
    )
    llm_config = LLMConfig(
        vocab_size=TEXT_VOCAB,
        rope_base=1_000_000.0,
        norm_eps=1e-6,
        eos_token_id=IM_END,
        image_token_id=IMAGE_PAD,
        pad_token_id=ENDOFTEXT,
        q_eos_token=Q_EOS,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        codebook_size=codebook_size,
        n_q_tokens=n_q,
        **llm,
    )
    block_decoder_config = BlockDecoderConfig(
        max_length=n_q + 1,
        eos_token=Q_EOS,
        num_layers=1,
        input_dim=llm["embed_dim"],
        **block_decoder,
    )
    return KelixARConfig(
        llm=llm_config, tokenizer=tokenizer_config, block_decoder=block_decoder_config
    )


def random_weights(config: KelixARConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random float32 weights for ``config`` under the official key names.

    See :func:`_random_tensors`. As in the golden fixtures, the output row of the end-of-block id is
    scaled by 4 (so the random model closes blocks) and that of the image placeholder by 0.1 (so it is
    practically never emitted).
    """
    weights = _random_tensors(KelixARModel.checkpoint_layout(config), seed)
    head = weights["model.model.output.weight"]
    head[config.llm.q_eos_token] *= 4.0
    head[config.llm.image_token_id] *= 0.1
    return weights


def _random_tensors(layout: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """One tensor per key, each from its own generator seeded by ``sha256(f"{seed}|{key}")`` (values do not
    depend on construction order): norm weights 1 + 0.1 N, biases 0.05 N, lookup tables N(0, 1), other
    matrices N(0, 1/fan_in). ``seed`` in [0, 2^63), like every generator seed of kelix_fast."""
    seed = check_seed("seed", seed)
    weights = {}
    for key, shape in layout.items():
        digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        value = torch.randn(shape, generator=gen)
        leaf = key.rsplit(".", 2)
        is_norm = any(
            part.endswith("norm") or part in ("pre_norm", "ln_post") for part in leaf[:-1]
        )
        if is_norm and leaf[-1] in ("weight", "scale"):
            value = 1.0 + 0.1 * value
        elif leaf[-1] == "bias":
            value = 0.05 * value
        elif len(shape) >= 2 and not key.endswith(_TABLES):
            value = value / (value[0].numel() ** 0.5)
        weights[key] = value
    return weights


def tiny_dit_config() -> KelixDiTConfig:
    """A Kelix-DiT matching :func:`tiny_config` (connector from its 64-wide LLM) and :func:`tiny_vae`
    (8 latent channels, 32x): 2 blocks of width 64, conditions of up to 16 rows."""
    raw = {
        "__class__": "SanaConfig",
        "input_size": 5,
        "in_channels": 8,
        "hidden_size": 64,
        "depth": 2,
        "num_heads": 2,
        "linear_head_dim": 32,
        "caption_channels": 48,
        "model_max_length": 16,
        "qk_norm": True,
        "cross_norm": True,
        "use_connector": True,
        "connector_channels": tiny_config().llm.embed_dim,
    }
    return KelixDiTConfig.from_dict(raw)


def release_dit_config() -> KelixDiTConfig:
    """Kelix-DiT as released (kelix-dit.md §2) with the demo's ``model_max_length`` override 300 -> 720
    (the checkpoint's ``y_embedding`` has 720 rows); every other field takes its code default
    (2240 wide, 20 blocks of 20 heads, 32 latent channels). For benchmarks with random weights."""
    return KelixDiTConfig.from_dict(
        {
            "__class__": "SanaConfig",
            "model_max_length": 720,
            "qk_norm": True,
            "cross_norm": True,
            "norm_eps": 1e-6,
            "use_connector": True,
            "connector_channels": 4096,
        }
    )


def tiny_aedit_config() -> KelixDiTConfig:
    """A Kelix-AEDIT-like DiT for :func:`tiny_config`: no connector, conditioned directly on the fused
    Kelix-Tok code features (``output_dim`` = 48 wide), up to 64 condition rows."""
    raw = {**tiny_dit_config().to_dict(), "use_connector": False, "connector_channels": None}
    raw.update(caption_channels=tiny_config().tokenizer.output_dim, model_max_length=64)
    return KelixDiTConfig.from_dict(raw)


def tiny_dit(seed: int = 0, *, device=None, dtype=None) -> KelixDiT:
    """The embedded tiny Kelix-DiT (:func:`tiny_dit_config`) with deterministic random weights."""
    return _random_dit(tiny_dit_config(), seed, device=device, dtype=dtype)


def tiny_aedit(seed: int = 0, *, device=None, dtype=None) -> KelixDiT:
    """The embedded tiny Kelix-AEDIT (:func:`tiny_aedit_config`) with deterministic random weights."""
    return _random_dit(tiny_aedit_config(), seed, device=device, dtype=dtype)


def _random_dit(config: KelixDiTConfig, seed: int, *, device, dtype) -> KelixDiT:
    with torch.device("meta"):
        layout = {name: tuple(p.shape) for name, p in KelixDiT(config).named_parameters()}
    return KelixDiT.from_weights(config, _random_tensors(layout, seed), device=device, dtype=dtype)


# The SANA 1.5 f32c32 DC-AE structure (kelix-dit.md §7), diffusers AutoencoderDC arguments; the widths
# are the release's or tiny ones.
_DC_AE_STRUCTURE = {
    "in_channels": 3,
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "upsample_block_type": "interpolate",
    "downsample_block_type": "Conv",
    "decoder_norm_types": "rms_norm",
    "decoder_act_fns": "silu",
    "scaling_factor": 0.41407,
}
# The release DC-AE (SANA1.5_1.6B_1024px_diffusers/vae), for benchmarks with random weights.
RELEASE_VAE_CONFIG = {
    **_DC_AE_STRUCTURE,
    "latent_channels": 32,
    "attention_head_dim": 32,
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
}
# Tiny widths (as the golden fixtures' VAE).
TINY_VAE_CONFIG = {
    **_DC_AE_STRUCTURE,
    "latent_channels": 8,
    "attention_head_dim": 8,
    "encoder_block_out_channels": [8, 8, 16, 16, 32, 32],
    "decoder_block_out_channels": [8, 8, 16, 16, 32, 32],
    "encoder_layers_per_block": [1] * 6,
    "decoder_layers_per_block": [1] * 6,
}


def tiny_vae(seed: int = 0, *, device=None, dtype=None):
    """A tiny diffusers ``AutoencoderDC`` (:data:`TINY_VAE_CONFIG`), randomly initialised from ``seed``
    (in [0, 2^63): torch would take a negative seed as 2^64 + seed)."""
    seed = check_seed("seed", seed)
    from diffusers import AutoencoderDC

    device, dtype = engine_placement(device, dtype, owner="tiny_vae")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderDC(**TINY_VAE_CONFIG)
    vae = vae.to(device)
    # diffusers warns on any dtype cast through .to(); float32 (the CPU default) needs none
    return (vae if dtype == torch.float32 else vae.to(dtype)).eval()


def write_checkpoint(
    path: str | os.PathLike[str],
    config: KelixARConfig,
    weights: Mapping[str, torch.Tensor],
    *,
    num_shards: int = 1,
) -> None:
    """Write ``config.json`` and the weights as the release does (``model-0000k-of-0000n.safetensors`` and
    ``model.safetensors.index.json`` when sharded, else ``model.safetensors``)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_dict(), f, indent=2)
    keys = sorted(weights)
    if num_shards == 1:
        save_file(
            {k: weights[k].contiguous() for k in keys}, os.path.join(path, "model.safetensors")
        )
        return
    weight_map = {}
    for shard in range(num_shards):
        name = f"model-{shard:05d}-of-{num_shards:05d}.safetensors"
        part = keys[shard::num_shards]
        save_file({k: weights[k].contiguous() for k in part}, os.path.join(path, name))
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
