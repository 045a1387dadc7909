"""Kelix-Tok (``KeyeImageTokenizer``, kelix-ar.md §3): NaViT -> 2x2 merge projector -> encoder Linear ->
8 sub-codebook quantizer -> ids.

The quantizer's codebooks ``C_g = LN_q(E_g[slice g] W_g^T + b_g)`` are constant at inference: they are built
once by :meth:`KelixTokenizer.process_weights_after_loading` and the raw tables are then freed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kelix_fast import ops
from kelix_fast.config import TokenizerConfig
from kelix_fast.models.layers import Table
from kelix_fast.models.vision import VisionTransformer

QUANTIZER_LN_EPS = 1e-5  # nn.LayerNorm default of the official q_norm/z_norm
PROJECTOR_LN_EPS = 1e-5
FUSIONS = ("sum", "mean")  # how forward_indices combines the G up-projected codes


class MergeProjector(nn.Module):
    """``mlp_AR``: concatenate each 2x2 patch square (TL, TR, BL, BR), then LN -> Linear -> GELU(erf) -> Linear."""

    def __init__(self, vision_hidden: int, llm_hidden: int) -> None:
        super().__init__()
        merged = 4 * vision_hidden
        self.pre_norm = nn.LayerNorm(merged, eps=PROJECTOR_LN_EPS)
        self.linear_1 = nn.Linear(merged, merged)
        self.linear_2 = nn.Linear(merged, llm_hidden)

    def forward(self, x: torch.Tensor, grids: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """x: [Np, C] ViT features, raster per image -> [sum(t*h*w/4), llm_hidden], raster over (R, Cc)."""
        merged = []
        for (t, h, w), patches in zip(grids, x.split([t * h * w for t, h, w in grids])):
            squares = patches.view(t, h // 2, 2, w // 2, 2, -1).permute(0, 1, 3, 2, 4, 5)
            merged.append(squares.reshape(t * (h // 2) * (w // 2), -1))
        y = self.pre_norm(torch.cat(merged))
        return self.linear_2(F.gelu(self.linear_1(y)))


class VectorQuantizer(nn.Module):
    """One SimVQ quantizer as stored in the checkpoint (only used until the codebooks are built)."""

    def __init__(self, codebook_size: int, init_dim: int, dim: int) -> None:
        super().__init__()
        self.embedding = Table(codebook_size, init_dim)  # frozen K-means table; one slice is read
        self.embedding_proj = nn.Linear(init_dim, dim)
        self.q_norm = nn.LayerNorm(dim, eps=QUANTIZER_LN_EPS)
        self.z_norm = nn.LayerNorm(dim, eps=QUANTIZER_LN_EPS)

    def build_codebook(self) -> torch.Tensor:
        """``q_norm(rows @ W^T + b)`` -> [K, d], in the weights' dtype as the official code computes it."""
        return self.q_norm(self.embedding_proj(self.embedding.weight))


class KelixTokenizer(nn.Module):
    """Pixels -> ``[n_tok, G]`` ids. Module paths equal the checkpoint keys under ``visual_tokenizer.``.

    After :meth:`process_weights_after_loading` the quantizers are replaced by the buffers
    ``codebooks [G, K, d]``, ``codebook_sqnorms [G, K]`` (float32) and ``z_norm_weight/z_norm_bias [G, d]``.
    """

    codebooks: torch.Tensor
    codebook_sqnorms: torch.Tensor
    z_norm_weight: torch.Tensor
    z_norm_bias: torch.Tensor

    def __init__(self, config: TokenizerConfig) -> None:
        super().__init__()
        self.config = config
        vision = config.vision_config
        self.visual = VisionTransformer(vision)
        self.mlp_AR = MergeProjector(vision.hidden_size, config.llm_hidden_size)
        self.encoder = nn.Linear(config.llm_hidden_size, config.n_q_tokens * config.embedding_dim)
        self.quantizer = nn.ModuleList(
            VectorQuantizer(config.codebook_size, config.init_embedding_dim, config.embedding_dim)
            for _ in range(config.n_q_tokens)
        )
        self.up_projectors = nn.ModuleList(
            nn.Linear(config.embedding_dim, config.output_dim, bias=False)
            for _ in range(config.n_q_tokens)
        )

    def quantizer_rows(self) -> dict[str, tuple[int, int]]:
        """Checkpoint rows each quantizer table actually uses (``visual_tokenizer.``-relative keys)."""
        k = self.config.codes_per_group
        return {
            f"quantizer.{g}.embedding.weight": (g * k, (g + 1) * k)
            for g in range(self.config.n_q_tokens)
        }

    @torch.no_grad()
    def process_weights_after_loading(self) -> None:
        """Build the codebooks once and free the raw tables (4.3 GB at full scale)."""
        codebooks = torch.stack([q.build_codebook() for q in self.quantizer])
        self.register_buffer("codebooks", codebooks)
        self.register_buffer("codebook_sqnorms", codebooks.float().square().sum(-1))
        self.register_buffer(
            "z_norm_weight", torch.stack([q.z_norm.weight for q in self.quantizer])
        )
        self.register_buffer("z_norm_bias", torch.stack([q.z_norm.bias for q in self.quantizer]))
        del self.quantizer

    def encode(
        self, pixel_values: torch.Tensor, grids: Sequence[tuple[int, int, int]]
    ) -> torch.Tensor:
        """Pixels -> encoder outputs z: [n_tok, G*d] (before the per-group LayerNorm)."""
        return self.encoder(self.mlp_AR(self.visual(pixel_values, grids), grids))

    def quantize(self, z: torch.Tensor, *, vq: str, vocab_offset: int) -> torch.Tensor:
        """z: [n, G*d] -> ids [n, G] int64 = ``vocab_offset + K*g + code``."""
        return ops.codebook_argmin(
            z,
            self.z_norm_weight,
            self.z_norm_bias,
            self.codebooks,
            self.codebook_sqnorms,
            vocab_offset=vocab_offset,
            mode=vq,
            eps=QUANTIZER_LN_EPS,
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        grids: Sequence[tuple[int, int, int]],
        *,
        vq: str,
        vocab_offset: int,
    ) -> torch.Tensor:
        """pixel_values: [Np, 3, p, p] -> ids [n_tok, G] int64 (images in order, merged tokens raster)."""
        return self.quantize(self.encode(pixel_values, grids), vq=vq, vocab_offset=vocab_offset)

    def forward_indices(self, codes: torch.Tensor, *, fusion: str | None = None) -> torch.Tensor:
        """Fused token embeddings of local codes: ``fuse_g up_g(C_g[codes[:, g]])``.

        codes: [n, G] int64 in [0, K) -> [n, output_dim]. ``fusion``: "sum" or "mean" (Kelix-AEDIT);
        default the config's ``fusion_type``.
        """
        fusion = fusion or self.config.fusion_type
        if fusion not in FUSIONS:
            raise ValueError(f"forward_indices: fusion must be 'sum' or 'mean', got {fusion!r}")
        fused = sum(up(self.codebooks[g][codes[:, g]]) for g, up in enumerate(self.up_projectors))
        return fused / len(self.up_projectors) if fusion == "mean" else fused
