"""How every row of a batch picks its block tokens on the device: sampling parameters, scoring, seeds.

A :class:`SelectionPlan` is fixed for one generation call. Each Block Decoder step hands it the decoder
outputs of all rows; it builds the rows' allowed id ranges on the device and calls ``ops.head_select`` once
per distinct :class:`SamplingParams` (once in total when every request samples alike), so no [M, V] logits
are ever written and nothing is read back to the host.

Allowed ranges ([n, 2, 2] half-open ``[low, high)`` pairs):

* a row whose block has already ended may pick only ``q_eos``: it keeps running with the others (no
  synchronisation to drop it) but ``head_select`` skips every vocabulary tile but that one, so it costs
  almost no bandwidth, and its id is the end-of-block filler anyway;
* ``scoring="structured"`` (opt-in, approximate; kelix-ar.md §7.2): slot t >= 1 of a visual block (slot 0
  a visual id) scores only sub-codebook t plus ``q_eos``; 8,193 head rows instead of 217,472;
* otherwise every id.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kelix_fast import ops
from kelix_fast.config import LLMConfig
from kelix_fast.ops.selection import fused_request_reason
from kelix_fast.runtime.sampling import SamplingParams

SCORINGS = ("full", "structured")
# Seeds pack (request seed, block, slot) into one int64: 31 + 28 + 4 bits, all distinct.
SEED_BITS = 31
_BLOCK_BITS = 28
_SLOT_BITS = 4


def slot_seeds(request_seeds: torch.Tensor, block: torch.Tensor, slot: int) -> torch.Tensor:
    """The seed of each row's draw at (block, slot): request_seeds [n] int64 in [0, 2^31), block [1] or
    [n] int64 (the request's new-block index) -> [n] int64.

    Every draw of a request has its own seed, a function of the request's seed and where the draw sits only,
    so a request draws the same ids whatever shares its batch and however far the others have got.
    """
    return (request_seeds << (_BLOCK_BITS + _SLOT_BITS)) | (block << _SLOT_BITS) | slot


def host_bound_reason(params: Sequence[SamplingParams], vocab: int) -> str | None:
    """Why some request's selection needs the host (head_select's torch reference: its logits are
    materialised and its seeds read on the host, so no CUDA graph can hold it), or None."""
    for p in dict.fromkeys(params):
        reason = None if p.greedy else fused_request_reason(vocab, p.top_k, p.top_p)
        if reason is not None:
            return f"top_k={p.top_k}, top_p={p.top_p}: {reason}"
    return None


class SelectionPlan:
    """The per-row selection of one generation call over n rows (requests)."""

    def __init__(
        self,
        config: LLMConfig,
        params: Sequence[SamplingParams],
        *,
        scoring: str | Sequence[str],
        device: torch.device,
    ) -> None:
        """``params``: one per row; ``scoring``: one for every row or one per row."""
        scorings = [scoring] * len(params) if isinstance(scoring, str) else list(scoring)
        if len(scorings) != len(params):
            raise ValueError(f"scoring must be one value or {len(params)}, got {len(scorings)}")
        for value in scorings:
            if value not in SCORINGS:
                raise ValueError(f"scoring must be one of {list(SCORINGS)}, got {value!r}")
        # None when no row is structured (the common case: no per-step where); else [n, 1, 1] bool.
        self._structured = (
            torch.tensor([s == "structured" for s in scorings], device=device)[:, None, None]
            if "structured" in scorings
            else None
        )
        self.q_eos = config.q_eos_token
        self.text_vocab = config.vocab_size
        self.codes = config.codebook_size // config.n_q_tokens  # ids per sub-codebook
        vocab, eos_range = config.total_vocab, [self.q_eos, self.q_eos + 1]
        # Every range tensor exists before the first step: a host-to-device copy cannot be captured.
        self._every_id = torch.tensor([[0, vocab], [0, 0]], device=device)
        self._eos_only = torch.tensor([eos_range] * 2, device=device)
        low = [self.text_vocab + self.codes * t for t in range(config.n_q_tokens)]
        self._sub_codebook = torch.tensor(
            [[[lo, lo + self.codes], eos_range] for lo in low], device=device
        )  # [n_q, 2, 2]: slot t of a visual block
        # Rows grouped by their parameters, in order of first appearance; rows=None means all rows.
        by_params: dict[SamplingParams, list[int]] = {}
        for row, p in enumerate(params):
            by_params.setdefault(p, []).append(row)
        self.samples = any(not p.greedy for p in by_params)  # else no draw needs a seed
        if len(by_params) == 1:
            self.groups = [(params[0], None)]
        else:
            self.groups = [
                (p, torch.tensor(rows, dtype=torch.int64, device=device))
                for p, rows in by_params.items()
            ]

    def allowed(self, slot: int, first: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """[n, 2, 2] int64 ranges of slot ``slot`` given slot-0 ids first [n] and ended [n] bool."""
        allowed = self._every_id.expand(first.shape[0], 2, 2)
        if self._structured is not None and slot >= 1:
            visual = (first >= self.text_vocab)[:, None, None] & self._structured
            allowed = torch.where(visual, self._sub_codebook[slot], allowed)
        return torch.where(ended[:, None, None], self._eos_only, allowed)

    def select(
        self,
        y: torch.Tensor,
        norm_weight: torch.Tensor,
        head: torch.Tensor,
        *,
        eps: float,
        allowed: torch.Tensor,
        seeds: torch.Tensor | None,
    ) -> torch.Tensor:
        """ids [n] int64 for Block Decoder outputs y [n, D] (final norm + head + selection, fused).

        ``seeds`` [n] int64 (:func:`slot_seeds`) is required when :attr:`samples`, unused otherwise.
        """
        ids = None
        for params, rows in self.groups:
            kwargs = {
                "eps": eps,
                "temperature": params.temperature,
                "top_k": params.top_k,
                "top_p": params.top_p,
            }
            if rows is None:
                return ops.head_select(y, norm_weight, head, allowed=allowed, seeds=seeds, **kwargs)
            if ids is None:
                ids = torch.empty(y.shape[0], dtype=torch.int64, device=y.device)
            ids[rows] = ops.head_select(
                y[rows],
                norm_weight,
                head,
                allowed=allowed[rows],
                seeds=None if seeds is None else seeds[rows],
                **kwargs,
            )
        return ids
