"""The traffic model of an image block: the compulsory bytes and FLOPs of one block of ``batch``
requests for each generation variant and scoring (kelix-ar.md §7.2), from the model's shapes
(:class:`Sizes`), and the head rows each Block Decoder step scores (benchmarks/README.md, "Bytes and
FLOPs per block"). The generation suite, the decode step's terms and the pipeline suite read their
floors off it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kelix_fast.config import KelixARConfig
from kelix_fast.models.kelix_ar import KelixARModel


@dataclass(frozen=True)
class Sizes:
    """The shapes the traffic model needs, counted from the model's own modules (meta device)."""

    dim: int
    vocab: int
    codes: int  # ids per sub-codebook
    slots: int  # Block Decoder steps of an image block (G = 8)
    layers: int
    heads: int
    head_dim: int
    elem: int  # bytes per weight / activation element
    llm_layer_params: int  # every parameter of the decoder layers (read once per LLM step)
    llm_matrix_params: int  # their 2-D weights (the GEMM FLOPs)
    decoder_params: int  # Block Decoder parameters read per step: all but the position table
    decoder_matrix_params: int
    kv_bytes_per_position: int  # K and V of every LLM layer

    @classmethod
    def of(cls, config: KelixARConfig, dtype: torch.dtype) -> Sizes:
        with torch.device("meta"):
            model = KelixARModel(config)
        layers = list(model.llm.layers.parameters())
        decoder = [
            p
            for name, p in model.block_decoder.named_parameters()
            if not name.startswith("position_embedding.")
        ]
        llm, elem = config.llm, torch.empty((), dtype=dtype).element_size()
        return cls(
            dim=llm.embed_dim,
            vocab=llm.total_vocab,
            codes=llm.codebook_size // llm.n_q_tokens,
            slots=llm.n_q_tokens,
            layers=llm.num_layers,
            heads=llm.num_heads,
            head_dim=llm.head_dim,
            elem=elem,
            llm_layer_params=sum(p.numel() for p in layers),
            llm_matrix_params=sum(p.numel() for p in layers if p.dim() == 2),
            decoder_params=sum(p.numel() for p in decoder) + config.block_decoder.d_model,
            decoder_matrix_params=sum(p.numel() for p in decoder if p.dim() == 2),
            kv_bytes_per_position=2 * llm.num_layers * llm.num_kv_heads * llm.head_dim * elem,
        )


def block_traffic(
    sizes: Sizes, *, batch: int, kv_len: float, variant: str, scoring: str
) -> dict[str, Any]:
    """Compulsory bytes and FLOPs of one image block of ``batch`` requests (kelix-ar.md §7.2).

    Every variant: the LLM layer weights once, ``kv_len`` cached positions of K/V read per request and
    one written, 8 embedding rows per request for the block's LLM input and 7 for the sub-step inputs,
    the Block Decoder's weights once per sub-step (the 1.78 GB head streamed in between evicts them
    from L2) and one pass over the scored head rows per sub-step, which serves every request. Engine
    (``eager``/``cuda_graphs``): ``full`` scores all V rows per sub-step, ``structured`` all V in slot
    0 and ``codes + 1`` in slots 1-7; no logits in memory. ``official_loop``: full scoring, 36 rows per
    block through the decoder and the head (prefix recompute), and its logits in memory: every prefix
    row written, the kept rows read by the sort, the sort's values and int64 indices written, the
    kept rows stacked (read + write); the sort's internal passes are not counted (a lower bound).
    Lower-order terms (norm weights, activations, the Block Decoder cache, ids) are omitted.
    """
    s, d, v, g = sizes.elem, sizes.dim, sizes.vocab, sizes.slots
    rows = g * (g + 1) // 2 if variant == "official_loop" else g  # decoder/head rows per request
    head_rows = sum(slot_head_rows(sizes, scoring))
    parts = {
        "llm_weights": sizes.llm_layer_params * s,
        "kv_cache": round(batch * (kv_len + 1) * sizes.kv_bytes_per_position),
        "embedding_rows": batch * (2 * g - 1) * d * s,
        "block_decoder_weights": g * sizes.decoder_params * s,
        "head": head_rows * d * s,
    }
    if variant == "official_loop":
        parts["logits"] = batch * v * (rows * s + g * s + g * (s + 8) + 2 * g * s)
    attention = 4 * batch * sizes.layers * sizes.heads * sizes.head_dim * kv_len
    flop = (
        2 * batch * sizes.llm_matrix_params
        + round(attention)
        + 2 * batch * rows * sizes.decoder_matrix_params
        + 2 * batch * (head_rows if variant != "official_loop" else rows * v) * d
    )
    return {"bytes": sum(parts.values()), "bytes_parts": parts, "flop": flop}


def slot_head_rows(sizes: Sizes, scoring: str) -> list[int]:
    """Head rows one pass scores at each Block Decoder step of an image block: every id, or
    (``structured``) every id in slot 0 and sub-codebook t plus ``q_eos`` in slot t >= 1."""
    later = sizes.vocab if scoring == "full" else sizes.codes + 1
    return [sizes.vocab] + [later] * (sizes.slots - 1)
