"""The decode step taken apart into its terms, and the account of its gap to the floor
(benchmarks/README.md, "The decode step's terms").

Per batch, on one set of warmed decode slots of the generation suite's model: the LLM step, one Block
Decoder step, one head pass and the per-step glue, each timed alone (a CUDA graph of its own on a
GPU), beside the engine's whole decode step; each term's bytes come from the traffic model split over
the terms (:func:`term_traffic`, adding up to :func:`benchmarks.decode_traffic.block_traffic`), so
that the account whole = the terms per block + residual holds for the time and for the gap to the
floor alike. :class:`StepTerms` measures a batch's term records; :func:`account`,
:func:`terms_table` and :func:`account_summary` read them.
"""

from __future__ import annotations

import copy
import gc
import math
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from benchmarks import timing
from benchmarks.decode_traffic import Sizes, block_traffic, slot_head_rows
from kelix_fast import ops
from kelix_fast.models.kelix_ar import KelixARModel
from kelix_fast.runtime.block_selection import SCORINGS, SelectionPlan
from kelix_fast.runtime.device_decoding import BlockChain, DecodeSlots
from kelix_fast.runtime.graphs import capture_graph
from kelix_fast.runtime.sampling import SamplingParams

# A budget per term that keeps the dozen terms of a batch to a few seconds; the terms whose work does
# not depend on the scoring are timed once ("scoring": "any").
TERMS_BUDGET = timing.Budget(warmup=3, min_reps=10, max_reps=200, target_s=0.25)
SHARED_TERMS = ("llm", "block_decoder")


def term_traffic(sizes: Sizes, *, batch: int, kv_len: float, scoring: str) -> list[dict[str, Any]]:
    """:func:`block_traffic` of the engine split over the decode step's terms (README, "the decode
    step's terms"): per term ``term``, ``slots``, ``calls_per_block`` and the ``bytes_parts`` of one
    call, so that the calls' bytes add up to the block's.

    ``llm``: the layer weights, the K/V and the 8 embedding rows of the block's input; ``head``: one
    pass over the slot's head rows; ``block_decoder``: the decoder's weights once; ``glue``: the
    embedding row that forms the slot's input (slots 1-7: the gather after slot t-1 reads it; the one
    after the last slot feeds nothing and is not counted, as in the traffic model).
    """
    parts = block_traffic(
        sizes, batch=batch, kv_len=kv_len, variant="cuda_graphs", scoring=scoring
    )["bytes_parts"]
    g, row = sizes.slots, batch * sizes.dim * sizes.elem  # row: one embedding row per request
    head = [rows * sizes.dim * sizes.elem for rows in slot_head_rows(sizes, scoring)]
    later = f"1-{g - 1}"
    llm = {k: parts[k] for k in ("llm_weights", "kv_cache")} | {"embedding_rows": g * row}
    terms = [
        ("llm", "-", 1, llm),
        (
            "block_decoder",
            f"0-{g - 1}",
            g,
            {"block_decoder_weights": parts["block_decoder_weights"] // g},
        ),
        ("head", "0", 1, {"head": head[0]}),
        ("head", later, g - 1, {"head": head[1]}),
        ("glue", "0", 1, {"embedding_rows": 0}),
        ("glue", later, g - 1, {"embedding_rows": row}),
    ]
    return [
        {"term": term, "slots": slots, "calls_per_block": calls, "bytes_parts": call_parts}
        for term, slots, calls, call_parts in terms
    ]


def _glue(
    chain: BlockChain,
    plan: SelectionPlan,
    slot: int,
    seeds: torch.Tensor,
    block: torch.Tensor,
    ids: torch.Tensor,
    table: torch.Tensor,
) -> None:
    """decode_block's glue of one step: the slot's ranges and seeds, then the picks ``ids`` [n]
    recorded and the next input gathered."""
    chain.selection(plan, slot, seeds, block)
    chain.append(slot, ids, plan.q_eos, table)


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class StepTerms:
    """Times the decode step's terms of one model at any batch size: the model on ``device`` and its
    ``sizes``, the context C of the prompts, the measured copy bandwidth (the floors), the device's L2
    size (0 on the CPU) and the timing budget of each term (:data:`TERMS_BUDGET` in a full run)."""

    model: KelixARModel
    sizes: Sizes
    device: torch.device
    context: int
    copy_gbps: float
    l2_bytes: int
    budget: timing.Budget

    @property
    def on_gpu(self) -> bool:
        """Each term a CUDA graph of its own, timed with CUDA events (else eager, CPU timer)."""
        return self.device.type == "cuda"

    def measure(
        self, prompts: list[torch.Tensor], short: str | None, variants: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """The decode step's terms at this batch (README, "the decode step's terms"): one record per
        term, then the whole step per scoring, which carries the account when every term was timed;
        ``short``: why the batch cannot run here (memory), which every record then carries, or None;
        ``variants``: this batch's records, whose time per block the account quotes beside it."""
        batch, context, sizes = len(prompts), self.context, self.sizes
        shape = {"batch": batch, "context": context}
        records = []
        for scoring in SCORINGS:
            split = term_traffic(sizes, batch=batch, kv_len=context, scoring=scoring)
            whole = block_traffic(
                sizes, batch=batch, kv_len=context, variant="cuda_graphs", scoring=scoring
            )
            split.append(
                {"term": "step", "slots": f"0-{sizes.slots - 1}", "calls_per_block": 1}
                | {"bytes_parts": whole["bytes_parts"]}
            )
            for term in split:
                shared = term["term"] in SHARED_TERMS
                if shared and scoring != SCORINGS[0]:
                    continue
                bytes_ = sum(term["bytes_parts"].values())
                records.append(
                    {
                        "variant": "terms",
                        "shape": shape
                        | {"scoring": "any" if shared else scoring}
                        | {k: term[k] for k in ("term", "slots")},
                        "calls_per_block": term["calls_per_block"],
                        "bytes": bytes_,
                        "bytes_parts": term["bytes_parts"],
                        "floor_ms": bytes_ / (self.copy_gbps * 1e9) * 1e3,
                    }
                )
        try:
            timed = [{"status": "skipped", "reason": short}] * len(records) if short else None
            timed = timed or self._time(prompts, records)
        except torch.cuda.OutOfMemoryError as err:
            timed = [{"status": "skipped", "reason": f"out of memory: {err}"}] * len(records)
        except Exception as err:  # noqa: BLE001 - recorded: the instrument never stops the suite
            frame = traceback.extract_tb(err.__traceback__)[-1]
            where = f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
            reason = f"{type(err).__name__}: {err} ({where})"
            timed = [{"status": "error", "reason": reason}] * len(records)
        finally:
            if self.on_gpu:
                gc.collect()
                torch.cuda.empty_cache()
        for r, result in zip(records, timed):
            r |= result
        engine = {
            r["shape"]["scoring"]: r["median_ms"]
            for r in variants
            if r["status"] == "ok" and r["variant"] == ("cuda_graphs" if self.on_gpu else "eager")
        }
        for step in records:
            if step["shape"]["term"] != "step" or step["status"] != "ok":
                continue
            scoring = step["shape"]["scoring"]
            parts = [r for r in records if r["shape"]["scoring"] in (scoring, "any")]
            if all(r["status"] == "ok" for r in parts):
                step["account"] = account(step, [r for r in parts if r is not step])
                step["account"]["suite_ms_per_block"] = engine.get(scoring)
        return records

    def _time(
        self, prompts: list[torch.Tensor], records: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        """Every record's timing fields, on one set of warmed decode slots.

        One running step puts each request's latest block at position C; the rows are then released,
        and a released row inside the bucket is computed like a running one but keeps its position,
        so every later call recomputes position C at the same cost (README)."""
        model, batch = self.model, len(prompts)
        slots = DecodeSlots(model, batch, self.context + 1, cuda_graphs=self.on_gpu)
        greedy = [SamplingParams(top_k=1)] * batch
        plans = {
            scoring: SelectionPlan(model.config.llm, greedy, scoring=scoring, device=self.device)
            for scoring in SCORINGS
        }
        timer = timing.time_cuda if self.on_gpu else timing.time_cpu
        timed = []
        with torch.inference_mode(), ops.trusted_values():
            slots.admit(range(batch), prompts, [0] * batch, plans["full"])
            for scoring in SCORINGS:  # captures each scoring's step (its first call runs it)
                slots.advance(batch, scoring, lambda plan=plans[scoring]: plan)
                for row in range(batch):
                    slots.release(row)
            calls = self._calls(slots, plans)
            for r in records:
                shape = r["shape"]
                fns = calls[shape["scoring"], shape["term"], shape["slots"]]
                if self.on_gpu and shape["term"] != "step":  # the step replays its own graph
                    fns = [capture_graph(fn).replay for fn in fns]
                summary = timing.summarize(timer(lambda fn: fn(), fns, self.budget))
                timed.append(
                    {"status": "ok", "reason": None, "cuda_graph": self.on_gpu, "sets": len(fns)}
                    | summary
                    | {"vs_floor": summary["median_ms"] / r["floor_ms"] if r["floor_ms"] else None}
                )
        return timed

    def _calls(
        self, slots: DecodeSlots, plans: dict[str, SelectionPlan]
    ) -> dict[tuple[str, str, str], list[Callable[[], object]]]:
        """Each term's calls by (scoring, term, slots): the sets a timing cycles through."""
        model, llm = self.model, self.model.llm
        batch, g = slots.max_batch, self.sizes.slots
        table = llm.tok_embeddings.embed_tokens.weight
        hidden, cache = slots.hidden[:batch], slots.block_cache.rows(batch)
        seeds, block = slots.seeds[:batch], slots.block[:batch]
        picked = slots.chain[:batch].clone()  # a real block's ids: every slot visual, none q_eos
        chain = BlockChain(batch, picked.shape[1], self.device)
        chain.ids[:, 0] = picked[:, 0]
        later = f"1-{g - 1}"
        # The Block Decoder's weights fit in L2 at full shapes, which the head pass between two of
        # its steps flushes: copies of it rotate so that each call reads them from memory.
        copies = timing.rotating_sets(self.sizes.decoder_params * self.sizes.elem, self.l2_bytes)
        decoders = [model.block_decoder] + [
            copy.deepcopy(model.block_decoder) for _ in range(copies - 1)
        ]
        every = f"0-{g - 1}"
        calls: dict[tuple[str, str, str], list[Callable[[], object]]] = {
            ("any", "llm", "-"): [partial(slots.llm_step, batch)],
            ("any", "block_decoder", every): [
                partial(decoders[i % copies], hidden[:, None], cache, start=i % g)
                for i in range(math.lcm(g, copies))
            ],
        }
        for scoring, plan in plans.items():
            selections = [chain.selection(plan, t, seeds, block) for t in range(g)]
            norm, head = llm.norm, llm.output.weight
            heads = [
                partial(plan.select, hidden, norm.scale, head, eps=norm.eps, allowed=a, seeds=d)
                for a, d in selections
            ]
            glues = [
                partial(_glue, chain, plan, t, seeds, block, picked[:, t], table) for t in range(g)
            ]
            for term, fns in (("head", heads), ("glue", glues)):
                calls[scoring, term, "0"] = fns[:1]
                calls[scoring, term, later] = fns[1:]
            calls[scoring, "step", every] = [
                partial(slots.advance, batch, scoring, lambda plan=plan: plan)
            ]
        return calls


# --------------------------------------------------------------------------- the account


def account(step: dict[str, Any], terms: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The whole step's time and its gap to the floor, term by term: per term its time per block
    (median x calls per block), floor and gap; ``residual_ms`` = whole - the terms' sum, so that
    whole = sum + residual and, the terms' bytes adding up to the step's, gap = the terms' gaps +
    residual."""
    parts: dict[str, dict[str, float]] = {}
    for r in terms:
        part = parts.setdefault(r["shape"]["term"], {"ms": 0.0, "floor_ms": 0.0})
        part["ms"] += r["median_ms"] * r["calls_per_block"]
        part["floor_ms"] += r["floor_ms"] * r["calls_per_block"]
    for part in parts.values():
        part["gap_ms"] = part["ms"] - part["floor_ms"]
    total = sum(part["ms"] for part in parts.values())
    return {
        "whole_ms": step["median_ms"],
        "sum_ms": total,
        "residual_ms": step["median_ms"] - total,
        "floor_ms": step["floor_ms"],
        "gap_ms": step["median_ms"] - step["floor_ms"],
        "parts": parts,
    }


def _account_terms(entry: dict[str, Any], field: str, sign: str = "") -> str:
    cells = [f"{name} {part[field]:{sign}.3f}" for name, part in entry["parts"].items()]
    residual = entry["residual_ms"]
    return " + ".join([*cells, f"residual {residual:{sign}.3f}"])


def terms_table(records: list[dict[str, Any]]) -> str:
    """One printed block per batch size: each term's time per call against its floor, its time per
    block, then per scoring the account of the whole step and of its gap to the floor."""
    shape = records[0]["shape"]
    how = "CUDA graphs" if records[0].get("cuda_graph") else "eager"
    lines = [
        f"generation terms [B={shape['batch']}, C={shape['context']}] ({how}; ms)",
        (
            f"  {'term':13} {'scoring':10} {'slots':5} {'calls':>5} {'per call':>9} {'floor':>9} "
            f"{'x floor':>8} {'per block':>9}"
        ),
    ]
    for r in records:
        shape = r["shape"]
        head = f"  {shape['term']:13} {shape['scoring']:10} {shape['slots']:5} {r['calls_per_block']:5}"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}: {r['reason']}")
            continue
        vs_floor = "-" if r["vs_floor"] is None else f"{r['vs_floor']:.2f}"
        lines.append(
            f"{head} {r['median_ms']:9.3f} {r['floor_ms']:9.3f} {vs_floor:>8} "
            f"{r['median_ms'] * r['calls_per_block']:9.3f}"
        )
    for r in records:
        entry = r.get("account")
        if entry is None:
            continue
        suite = entry["suite_ms_per_block"]
        quoted = "" if suite is None else f" (suite: {suite:.3f} per block)"
        lines += [
            f"  account {r['shape']['scoring']}: step {entry['whole_ms']:.3f}{quoted} = "
            + _account_terms(entry, "ms"),
            f"    gap to the floor {entry['floor_ms']:.3f}: {entry['gap_ms']:.3f} = "
            + _account_terms(entry, "gap_ms", "+"),
        ]
    return "\n".join(lines)


def account_summary(results: Sequence[dict[str, Any]]) -> str:
    """One line for ``benchmarks pass``: the smallest batch's accounts of the gap to the floor ("" when
    no step was accounted for)."""
    steps = [r for r in results if r["variant"] == "terms" and "account" in r]
    if not steps:
        return ""
    batch = min(r["shape"]["batch"] for r in steps)
    cells = [
        f"{r['shape']['scoring']} step {r['account']['whole_ms']:.2f} ms, floor "
        f"{r['account']['floor_ms']:.2f}: " + _account_terms(r["account"], "gap_ms", "+")
        for r in steps
        if r["shape"]["batch"] == batch
    ]
    return f"B={batch} gap: " + "; ".join(cells)
