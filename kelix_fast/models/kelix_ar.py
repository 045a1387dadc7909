"""The Kelix AR model as one module tree: Kelix-Tok, the LLM and the Block Decoder.

Official checkpoint keys map onto it by the prefix table ``CHECKPOINT_RENAMES``; ``DEAD_TENSORS`` are in the
release but unused by the official forward, so they are accepted and never read (kelix-ar.md §6.3).
"""

from __future__ import annotations

import torch
from torch import nn

from kelix_fast.config import KelixARConfig
from kelix_fast.models.block_decoder import BlockDecoder
from kelix_fast.models.llm import KelixLLM
from kelix_fast.models.tokenizer import KelixTokenizer
from kelix_fast.weights import checkpoint_key

# First match wins: the Block Decoder lives under the LLM's prefix in the checkpoint.
CHECKPOINT_RENAMES = (
    ("model.model.token_head.", "block_decoder."),
    ("model.model.", "llm."),
    ("visual_tokenizer.", "tokenizer."),
)

DEAD_TENSORS = (
    "lm_head.weight",  # possibly stale duplicate of model.model.output.weight (kelix-ar.md §6.3)
    "model.model.token_head.final_norm.weight",
    "model.model.token_head.final_norm.bias",
    "visual_tokenizer.visual.embeddings.packing_position_embedding.weight",
)


class KelixARModel(nn.Module):
    def __init__(self, config: KelixARConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = KelixTokenizer(config.tokenizer)
        self.llm = KelixLLM(config.llm)
        self.block_decoder = BlockDecoder(config.block_decoder)

    @staticmethod
    def checkpoint_layout(config: KelixARConfig) -> dict[str, tuple[int, ...]]:
        """Official key -> shape of every tensor the engine reads (dead tensors excluded)."""
        with torch.device("meta"):
            model = KelixARModel(config)
        return {
            checkpoint_key(name, CHECKPOINT_RENAMES): tuple(p.shape)
            for name, p in model.named_parameters()
        }

    def partial_rows(self) -> dict[str, tuple[int, int]]:
        """Checkpoint keys of which only some rows are read: quantizer slices, Block Decoder positions."""
        rows = {f"visual_tokenizer.{k}": v for k, v in self.tokenizer.quantizer_rows().items()}
        rows.update(
            {
                f"model.model.token_head.{k}": v
                for k, v in self.block_decoder.used_position_rows().items()
            }
        )
        return rows

    def process_weights_after_loading(self) -> None:
        self.tokenizer.process_weights_after_loading()
        self.llm.process_weights_after_loading()
        self.block_decoder.process_weights_after_loading()
