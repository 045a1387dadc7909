"""The text-to-image condition: which LLM hidden states the DiT attends to (kelix-ar.md §5.7,
kelix-dit.md §4, golden README "Sampling" step 1).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def text_to_image_prompt(
    prompt_ids: Sequence[int],
    *,
    assistant_prefix: Sequence[int] | None,
    vision_start: int,
    arg: str = "prompt_ids",
) -> list[int]:
    """Cut a templated prompt right after its first ``assistant_prefix`` (the ids of
    ``<|im_start|>assistant\\n``; None: the prompt is already cut there) and append
    ``<|vision_start|>`` unless it is already last.

    Raises ValueError, naming the caller's ``arg``, when the prompt is empty or has no assistant turn
    to cut at.
    """
    ids = list(prompt_ids)
    if not ids:
        raise ValueError(f"{arg} must not be empty")
    if assistant_prefix is not None:
        prefix = list(assistant_prefix)
        cut = next(
            (
                s + len(prefix)
                for s in range(len(ids) - len(prefix) + 1)
                if ids[s : s + len(prefix)] == prefix
            ),
            None,
        )
        if cut is None:
            raise ValueError(
                f"{arg} must contain the assistant turn prefix {prefix} (<|im_start|>assistant\\n); "
                "build the prompt with the chat template and add_generation_prompt=True"
            )
        ids = ids[:cut]
    return ids if ids[-1] == vision_start else [*ids, vision_start]


@dataclass
class Condition:
    """The DiT condition of one image: hidden [1, Lc, D], mask [1, Lc] (1 on the ``length`` valid rows)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    length: int
    matched: bool  # False when <|vision_start|>/<|vision_end|> did not pair up (official fallback)


def extract_condition(
    groups: torch.Tensor,
    hidden_states: torch.Tensor,
    *,
    vision_start: int,
    vision_end: int,
    max_length: int,
) -> Condition:
    """Rows of ``hidden_states`` from the first ``<|vision_start|>`` to the first ``<|vision_end|>`` after
    it, both included, zero-padded (or cut) to ``max_length``, as the official ``tokenize_images`` does.

    The official code searches both markers in every slot of the groups. When their counts differ (the
    image was never closed) it falls back to ``max_length`` rows from ``<|vision_start|>``; that is
    reproduced, and logged as a warning. Rows past the last hidden state (a closing marker that was never
    fed back to the LLM) are not available and simply end the span.

    Args:
        groups: [T, G+1] int64, one request's prompt and generated groups.
        hidden_states: [T - 1, D], the last-layer states at every position fed to the LLM.
    """
    starts = torch.nonzero((groups == vision_start).any(-1)).flatten().tolist()
    ends = torch.nonzero((groups == vision_end).any(-1)).flatten().tolist()
    if not starts:
        raise ValueError(
            "extract_condition: the groups hold no <|vision_start|>; no image was generated"
        )
    begin = starts[0]
    matched = len(starts) == len(ends) and any(e >= begin for e in ends)
    if matched:
        stop = next(e for e in ends if e >= begin) + 1
    else:
        logger.warning(
            "kelix_fast: %d <|vision_start|> but %d <|vision_end|> in the generated groups; "
            "taking %d rows from the first <|vision_start|> (the official fallback)",
            len(starts),
            len(ends),
            max_length,
        )
        stop = begin + max_length
    rows = hidden_states[begin : min(stop, begin + max_length, hidden_states.shape[0])]
    hidden = hidden_states.new_zeros(1, max_length, hidden_states.shape[-1])
    hidden[0, : rows.shape[0]] = rows
    mask = torch.zeros(1, max_length, dtype=torch.int64, device=hidden_states.device)
    mask[0, : rows.shape[0]] = 1
    return Condition(hidden=hidden, mask=mask, length=rows.shape[0], matched=matched)
