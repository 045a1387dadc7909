"""The generation suite: time per image block of (a) the official-style loop, (b) kelix_fast eager and
(c) kelix_fast with CUDA graphs, at full Kelix shapes with random weights (kelix-ar.md §5.4-§5.6, §7.2).

The model is built without a checkpoint: the LLM (Qwen3-8B shapes, 217,472-row head) and the 1-layer
Block Decoder are materialised on the device in bf16 (float32 in the CPU smoke mode) with seeded values
of a trained scale (matrices N(0, 0.02), norm scales 1, biases 0); the tokenizer stays on the meta
device (decode never calls it). The output head's text rows (ids below 151,936, ``q_eos`` and
``<|im_end|>`` among them) are zero, so every slot picks a visual id: every block runs all 8 Block
Decoder steps with a visual slot 0, i.e. it is an image block under both scorings, and no request
stops early. (Left to chance, slot 0 would be a text id 70% of the time, and ``scoring="structured"``
then scores the whole vocabulary in slots 1-7 too.) Full scoring streams every head row whatever its
values, so the zeros change no cost.

Each request has a context of C prompt groups (random image blocks), prefilled once per call. Time per
block is the difference of two calls of N1 and N2 new blocks: t = (T(N2) - T(N1)) / (N2 - N1) with T
the ``decode`` stage of the call (everything after the prefill and the first block, synchronised at
both ends), so prefill, CUDA graph capture and one-off costs cancel. Each variant runs once untimed
(warm-up; its output is the one the id check reads), then ``reps`` pairs of timed calls; the median of
the per-pair block times is reported.

Then, per batch, the engine's decode step taken apart into its terms on the same model
(:mod:`benchmarks.decode_terms`). Bytes and FLOPs per block come from :mod:`benchmarks.decode_traffic`.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from benchmarks import decode_terms, timing
from benchmarks.decode_traffic import Sizes, block_traffic
from kelix_fast import ops
from kelix_fast.config import KelixARConfig
from kelix_fast.models.kelix_ar import KelixARModel
from kelix_fast.models.layers import RMSNorm
from kelix_fast.presets import release_config, tiny_config
from kelix_fast.runtime import engine_core
from kelix_fast.runtime.block_decoding import NOT_GENERATED, close_blocks
from kelix_fast.runtime.block_selection import SCORINGS
from kelix_fast.runtime.prefill import prefill
from kelix_fast.runtime.sampling import SamplingParams
from kelix_fast.runtime.timing import StageTimer

WEIGHT_STD = 0.02
VARIANTS = ("official_loop", "eager", "cuda_graphs")
CHECK_EVERY = 8
FULL_BATCHES = (1, 8, 32, 128)
QUICK_BATCHES = (1, 2)
NO_GRAPHS = "needs a CUDA device"
INIT = (
    f"random: matrices N(0, {WEIGHT_STD}), norm scales 1, biases 0; output-head text rows zero "
    "(every slot visual: image blocks of 8 Block Decoder steps, no early end)"
)


# A call's groups [B, n, G+1] and, for the official loop at batch 1, its logits per block [B, k, V].
Warm = tuple[torch.Tensor, list[torch.Tensor]]


@dataclass(frozen=True)
class Schedule:
    """One run's model and plan: context C, the two block counts, timed pairs, batch sizes."""

    config: KelixARConfig
    context: int
    n1: int
    n2: int
    reps: int
    batches: tuple[int, ...]
    terms_budget: timing.Budget = decode_terms.TERMS_BUDGET  # each term of the decode step


def make_schedule(quick: bool, batches: Sequence[int] | None = None) -> Schedule:
    """Full Kelix shapes, or (``quick``) the tiny model with a short context and few blocks."""
    if quick:
        return Schedule(tiny_config(), 8, 2, 3, 1, tuple(batches or QUICK_BATCHES), timing.QUICK)
    return Schedule(release_config(), 1024, 4, 20, 3, tuple(batches or FULL_BATCHES))


# --------------------------------------------------------------------------- model and inputs


def random_model(config: KelixARConfig, device: torch.device, dtype: torch.dtype) -> KelixARModel:
    """The LLM and Block Decoder materialised on ``device`` in ``dtype`` with seeded random values of a
    trained scale (see the module docstring); the tokenizer stays on the meta device."""
    with torch.device("meta"):
        model = KelixARModel(config)
    model.requires_grad_(False)
    generator = torch.Generator(device=device).manual_seed(0)
    for part in (model.llm, model.block_decoder):
        part.to(dtype=dtype).to_empty(device=device)
        for module in part.modules():
            for name, param in module.named_parameters(recurse=False):
                if name == "bias":
                    param.zero_()
                elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, WEIGHT_STD, generator=generator)
    model.llm.output.weight[: config.llm.vocab_size] = 0.0
    with torch.inference_mode():  # RoPE tables and the fused projections (not the tokenizer's)
        model.llm.process_weights_after_loading()
        model.block_decoder.process_weights_after_loading()
    return model.eval()


def make_prompts(
    config: KelixARConfig, batch: int, context: int, device: torch.device
) -> list[torch.Tensor]:
    """``batch`` prompts of ``context`` random image blocks each: [C, G+1] int64, slot j from
    sub-codebook j, the last slot ``q_eos``."""
    llm = config.llm
    codes = llm.codebook_size // llm.n_q_tokens
    generator = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, codes, (batch, context, llm.n_q_tokens), generator=generator)
    ids += llm.vocab_size + codes * torch.arange(llm.n_q_tokens)
    eob = torch.full((batch, context, 1), llm.q_eos_token)
    return list(torch.cat([ids, eob], dim=-1).to(device))


# --------------------------------------------------------------------------- (a) the official loop


def official_block(model: KelixARModel, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official Block Decoder call (kelix-ar.md §5.4): groups [n, G+1] and stacked logits [n, k, V].

    No Block Decoder KV cache: sub-step t runs the decoder over the whole prefix [n, t+1, D] from slot 0
    with a fresh cache, unembeds every prefix row to logits in the model dtype (materialised), keeps
    the last row, sorts the whole vocabulary (as the official top-k/top-p path does even when greedy)
    and takes the first id, then reads back whether to stop (one host synchronisation per sub-step).
    The official stops when the batch's last row ends; this loop stops when every row has (the same
    single synchronisation; at batch 1 the same rule), and closes each row's block at its own end as
    the engine does, so the greedy ids equal the engine's whatever the batch.
    """
    llm, decoder = model.llm, model.block_decoder
    q_eos, n = model.config.llm.q_eos_token, hidden.shape[0]
    table = llm.tok_embeddings.embed_tokens.weight
    seq = hidden[:, None]
    ended = torch.zeros(n, dtype=torch.bool, device=hidden.device)
    chain, kept = [], []
    for _ in range(decoder.config.max_length - 1):
        prefix = decoder(seq, decoder.new_cache(n), start=0)  # [n, t+1, D]: the prefix recomputed
        last = llm.unembed(prefix)[:, -1]  # [n, t+1, V] unembedded; the last row kept
        kept.append(last)
        ids = torch.sort(last, dim=-1, descending=True, stable=True).indices[:, 0]
        chain.append(ids)
        seq = torch.cat([seq, table[ids][:, None]], dim=1)
        ended |= ids == q_eos
        if bool(ended.all()):
            break
    slots = torch.full(
        (n, model.config.llm.group_size), NOT_GENERATED, dtype=torch.int64, device=hidden.device
    )
    slots[:, : len(chain)] = torch.stack(chain, dim=1)
    return close_blocks(slots, q_eos), torch.stack(kept, dim=1)


def official_generate(
    model: KelixARModel,
    prompts: Sequence[torch.Tensor],
    *,
    max_new_blocks: int,
    timings: dict[str, float] | None = None,
    keep_logits: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The official-style generate loop over prompts [C_b, G+1]: groups [B, n, G+1] and, when
    ``keep_logits``, each block's stacked logits [B, k, V].

    Prefill, then per block one eager LLM step with the LLM KV cache and :func:`official_block`, and a
    host read of the ``<|im_end|>`` stop test after every decode block (the first block is not tested,
    as in the official loop). ``timings`` receives ``prefill`` (prefill and the first block) and
    ``decode`` seconds, as ``engine_core.generate`` reports them. It runs under
    ``ops.trusted_values()`` like the engine, so the only host synchronisations are the loop's own.
    """
    llm, eos = model.llm, model.config.llm.eos_token_id
    device = prompts[0].device
    timer = StageTimer(timings, device)
    capacity = max(p.shape[0] for p in prompts) + max_new_blocks - 1
    blocks, kept = [], []
    with torch.inference_mode(), ops.trusted_values():
        h, _, cache, lengths = prefill(model, prompts, capacity, hidden_states=False)
        hidden = h[torch.arange(len(prompts), device=device), lengths - 1]
        stopped = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        for step in range(max_new_blocks):
            if step:
                pos = lengths + step - 1  # the previous block's position in each request
                hidden = llm(llm.embed(blocks[-1][:, None]), cache, pos, pos + 1)[0][:, 0]
            groups, logits = official_block(model, hidden)
            blocks.append(groups)
            if keep_logits:
                kept.append(logits)
            if not step:
                timer.lap("prefill")
                continue
            stopped |= groups[:, 0] == eos
            if bool(stopped.all()):
                break
        timer.lap("decode")
    return torch.stack(blocks, dim=1), kept


# --------------------------------------------------------------------------- the id check


def first_divergence(
    official: torch.Tensor, logits: Sequence[torch.Tensor], engine: torch.Tensor
) -> dict[str, Any] | None:
    """Where a request's blocks first differ: official/engine groups [n, G+1], the official loop's
    stacked logits per block ([k, V]); None when every id agrees.

    Only the first difference means anything (later slots are conditioned on it). ``near_tie``: the
    official logits of the two ids differ by at most one unit in the last place of their dtype, a tie
    that rounding the logits (which ``ops.head_select`` deliberately does not do) or a different GEMM
    shape of the prefix recompute can decide either way.
    """
    differ = torch.nonzero(official.cpu() != engine.cpu())
    if not differ.numel():
        return None
    block, slot = (int(i) for i in differ[0])
    want, got = int(official[block, slot]), int(engine[block, slot])
    record = {"block": block, "slot": slot, "official_id": want, "engine_id": got}
    if slot >= logits[block].shape[0] or not 0 <= got < logits[block].shape[1]:
        return record | {"near_tie": False}
    row = logits[block][slot]
    best, other = float(row[want]), float(row[got])
    ulp = torch.finfo(row.dtype).eps * 2.0 ** math.floor(math.log2(max(abs(best), 1e-30)))
    return record | {
        "official_logit": best,
        "engine_id_official_logit": other,
        "ulp": ulp,
        "near_tie": best - other <= ulp,
    }


def id_check(official: Warm, engine: torch.Tensor) -> dict[str, Any]:
    """Batch-1 agreement of an engine variant's greedy groups [1, n, G+1] with the official loop's
    (groups [1, n, G+1] and its logits per block)."""
    groups, logits = official
    divergence = first_divergence(groups[0], [b[0] for b in logits], engine[0])
    return {
        "ids_compared_blocks": int(groups.shape[1]),
        "ids_match": divergence is None,
        "ids_divergence": divergence,
    }


# --------------------------------------------------------------------------- memory


def memory_needed(
    sizes: Sizes, config: KelixARConfig, batch: int, capacity: int, context: int
) -> int:
    """A generous estimate of one call's device memory beyond the weights: the LLM KV cache, plus the
    larger of the prefill's transients (float32 norm/RoPE copies of [B C, D], the SwiGLU
    intermediates) and the official loop's logits (36 prefix rows and the sort's outputs)."""
    tokens = batch * context
    prefill_bytes = tokens * (8 * sizes.dim * 4 + 4 * config.llm.intermediate_dim * sizes.elem)
    official_bytes = 48 * batch * sizes.vocab * sizes.elem
    return batch * capacity * sizes.kv_bytes_per_position + max(prefill_bytes, official_bytes)


# --------------------------------------------------------------------------- measuring


class _Bench:
    """Runs every (batch, scoring, variant) point of a schedule on one model and device."""

    def __init__(self, device: torch.device, schedule: Schedule, roof: dict[str, Any]) -> None:
        self.device, self.schedule, self.roof = device, schedule, roof
        self.on_gpu = device.type == "cuda"
        self.dtype = torch.bfloat16 if self.on_gpu else torch.float32
        self.sizes = Sizes.of(schedule.config, self.dtype)
        self.model = random_model(schedule.config, device, self.dtype)
        self.terms = decode_terms.StepTerms(
            self.model,
            self.sizes,
            device,
            context=schedule.context,
            copy_gbps=roof["copy_gbps"],
            l2_bytes=torch.cuda.get_device_properties(device).L2_cache_size if self.on_gpu else 0,
            budget=schedule.terms_budget,
        )

    def point(self, batch: int) -> list[dict[str, Any]]:
        """Every scoring and variant at one batch size (the official loop once: it scores fully)."""
        schedule = self.schedule
        if self.on_gpu:
            gc.collect()
            torch.cuda.empty_cache()
        prompts = make_prompts(schedule.config, batch, schedule.context, self.device)
        shape = {"batch": batch, "context": schedule.context, "n1": schedule.n1, "n2": schedule.n2}
        short = self._memory_short(batch)
        warm: dict[tuple[str, str], Warm] = {}  # the warm-up outputs the id check reads
        records = []
        for scoring in SCORINGS:
            for variant in VARIANTS:
                if variant == "official_loop" and scoring != "full":
                    continue
                record = {"variant": variant, "shape": shape | {"scoring": scoring}}
                record |= self._cost(batch, variant, scoring)
                if short:
                    record |= {"status": "skipped", "reason": short}
                elif variant == "cuda_graphs" and not self.on_gpu:
                    record |= {"status": "unavailable", "reason": NO_GRAPHS}
                else:
                    record |= self._measure(variant, scoring, prompts, warm)
                records.append(record)
        records = self._relate(records)
        return records + self.terms.measure(prompts, short, records)

    def _call(self, variant: str, scoring: str, prompts) -> Callable[..., torch.Tensor]:
        """``call(n, timings) -> groups [B, n, G+1]``: one generate call of ``n`` new blocks."""
        if variant == "official_loop":
            return lambda n, timings: official_generate(
                self.model, prompts, max_new_blocks=n, timings=timings
            )[0]
        batch = len(prompts)
        greedy = [SamplingParams(top_k=1)] * batch

        def call(n: int, timings: dict[str, float] | None) -> torch.Tensor:
            outputs = engine_core.generate_batch(
                self.model,
                prompts,
                max_new_blocks=n,
                params=greedy,
                scoring=scoring,
                request_seeds=[0] * batch,
                return_hidden_states=False,
                # Captured once per call (a fresh core): the differenced timing cancels it.
                cuda_graphs=variant == "cuda_graphs",
                check_every=CHECK_EVERY,
                timings=timings,
            )
            stops = [out.new_groups.shape[0] for out in outputs if out.new_groups.shape[0] != n]
            if stops:  # an <|im_end|> group: cannot happen with the zero text rows of the head
                raise RuntimeError(f"a request stopped after {stops[0]} of {n} blocks")
            return torch.stack([out.new_groups for out in outputs])

        return call

    def _memory_short(self, batch: int) -> str | None:
        """Why the batch cannot run here (GPU memory), or None."""
        if not self.on_gpu:
            return None
        schedule = self.schedule
        capacity = schedule.context + schedule.n2 - 1
        need = memory_needed(self.sizes, schedule.config, batch, capacity, schedule.context)
        free = torch.cuda.mem_get_info(self.device)[0]
        if need <= free:
            return None
        return (
            f"memory: needs about {need / 1e9:.1f} GB beyond the weights, {free / 1e9:.1f} GB free"
        )

    def _cost(self, batch: int, variant: str, scoring: str) -> dict[str, Any]:
        schedule = self.schedule
        kv_len = schedule.context + (schedule.n1 + schedule.n2 - 1) / 2  # mean of the timed blocks
        cost = block_traffic(
            self.sizes, batch=batch, kv_len=kv_len, variant=variant, scoring=scoring
        )
        return cost | {"floor_ms": cost["bytes"] / (self.roof["copy_gbps"] * 1e9) * 1e3}

    def _measure(self, variant: str, scoring: str, prompts, warm) -> dict[str, Any]:
        """Warm up (and check the ids), then time ``reps`` pairs of calls of n1 and n2 blocks."""
        schedule, batch = self.schedule, len(prompts)
        call = self._call(variant, scoring, prompts)
        n1, n2 = schedule.n1, schedule.n2
        decode: dict[int, list[float]] = {n1: [], n2: []}
        try:
            if variant == "official_loop":
                warm[variant, scoring] = official_generate(
                    self.model, prompts, max_new_blocks=n1, keep_logits=batch == 1
                )
            else:
                warm[variant, scoring] = call(n1, None), []
            record = self._ids(variant, scoring, warm) if batch == 1 else {}
            if record.get("status") == "mismatch":
                return record
            for _ in range(schedule.reps):
                for n in (n1, n2):
                    timings: dict[str, float] = {}
                    blocks = call(n, timings).shape[1]
                    if blocks != n:
                        raise RuntimeError(f"a request stopped after {blocks} of {n} blocks")
                    decode[n].append(timings["decode"])
        except torch.cuda.OutOfMemoryError as err:
            return {"status": "skipped", "reason": f"out of memory: {err}"}
        except RuntimeError as err:
            return {"status": "error", "reason": f"{type(err).__name__}: {err}"}
        finally:
            if self.on_gpu:
                gc.collect()
                torch.cuda.empty_cache()
        per_block = [(t2 - t1) * 1e3 / (n2 - n1) for t1, t2 in zip(decode[n1], decode[n2])]
        return record | {
            "status": "ok",
            "reason": None,
            **timing.summarize(per_block),
            "decode_s": {"n1": decode[n1], "n2": decode[n2]},
        }

    @staticmethod
    def _ids(variant: str, scoring: str, warm: dict[tuple[str, str], Warm]) -> dict[str, Any]:
        """Batch 1, full scoring: the engine's warm-up ids against the official loop's; a difference
        that is not a near tie makes the record a ``mismatch``."""
        if variant == "official_loop" or scoring != "full":
            return {}
        official = warm.get(("official_loop", "full"))
        if official is None:
            return {"ids_match": None, "ids_divergence": "the official loop did not run"}
        groups = warm[variant, scoring][0]
        check = id_check(official, groups)
        eager = warm.get(("eager", "full"))
        if variant == "cuda_graphs" and eager is not None:
            check["ids_equal_eager"] = bool(torch.equal(groups.cpu(), eager[0].cpu()))
        divergence = check["ids_divergence"]
        if divergence is not None and not divergence["near_tie"]:
            return check | {"status": "mismatch", "reason": f"ids differ: {divergence}"}
        return check

    def _relate(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rates, roofline fractions and speedups of the timed records (all from this run)."""
        copy = self.roof["copy_gbps"]
        matmul = self.roof["matmul_tflops"][str(self.dtype).removeprefix("torch.")]
        ok = {(r["variant"], r["shape"]["scoring"]): r for r in records if r["status"] == "ok"}
        official = ok.get(("official_loop", "full"))
        for (variant, scoring), r in ok.items():
            seconds, batch = r["median_ms"] * 1e-3, r["shape"]["batch"]
            r["gbps"] = r["bytes"] / seconds / 1e9
            r["tflops"] = r["flop"] / seconds / 1e12
            r["roofline_fraction"] = r["gbps"] / copy
            r["compute_fraction"] = r["tflops"] / matmul
            r["blocks_per_s"] = batch / seconds
            r["tokens_per_s"] = self.sizes.slots * batch / seconds
            r["speedup"] = official["median_ms"] / r["median_ms"] if official else None
            if scoring == "structured" and (variant, "full") in ok:
                r["speedup_vs_full"] = ok[variant, "full"]["median_ms"] / r["median_ms"]
            if variant == "cuda_graphs" and ("eager", scoring) in ok:
                r["speedup_vs_eager"] = ok["eager", scoring]["median_ms"] / r["median_ms"]
        return records


def measure(
    device: torch.device, roof: dict[str, Any], *, quick: bool, batches: Sequence[int] | None
) -> dict[str, Any]:
    """Build the model, run every point (printing one table per batch size); the suite's record
    fields: ``model``, ``schedule``, ``results`` (one per point and variant) and ``goals``."""
    schedule = make_schedule(quick, batches)
    bench = _Bench(device, schedule, roof)
    results = []
    for batch in schedule.batches:
        records = bench.point(batch)
        print(table([r for r in records if r["variant"] != "terms"]), flush=True)
        print(decode_terms.terms_table([r for r in records if r["variant"] == "terms"]), flush=True)
        results += records
    llm = schedule.config.llm
    return {
        "model": {
            "config": "tiny_config()" if quick else "release_config()",
            "dtype": str(bench.dtype).removeprefix("torch."),
            "init": INIT,
            "llm_layers": llm.num_layers,
            "dim": llm.embed_dim,
            "vocab": llm.total_vocab,
            "block_decoder_layers": schedule.config.block_decoder.num_layers,
        },
        "schedule": {
            "context": schedule.context,
            "n1": schedule.n1,
            "n2": schedule.n2,
            "reps": schedule.reps,
            "check_every": CHECK_EVERY,
            "timed": "decode stage of each call; per block (T(n2) - T(n1)) / (n2 - n1)",
        },
        "results": results,
        "goals": goals(results),
    }


def goals(results: list[dict[str, Any]]) -> dict[str, float | bool | None]:
    """The issue's targets for CUDA graphs with full scoring, read off this run (None: not measured)."""
    found = {
        r["shape"]["batch"]: r
        for r in results
        if r["variant"] == "cuda_graphs" and r["shape"]["scoring"] == "full" and r["status"] == "ok"
    }
    b1, b32 = found.get(1), found.get(32)
    vs_floor = b1["median_ms"] / b1["floor_ms"] if b1 else None
    b1_speedup = b1["speedup"] if b1 else None
    b32_speedup = b32["speedup"] if b32 else None
    return {
        "b1_vs_floor": vs_floor,
        "b1_within_1.15x_floor": None if vs_floor is None else vs_floor <= 1.15,
        "b1_speedup": b1_speedup,
        "b1_speedup_at_least_5x": None if b1_speedup is None else b1_speedup >= 5,
        "b32_speedup": b32_speedup,
        "b32_speedup_at_least_20x": None if b32_speedup is None else b32_speedup >= 20,
    }


def table(records: list[dict[str, Any]]) -> str:
    """One printed block per batch size: per variant and scoring the time per block and its rates."""
    shape = records[0]["shape"]
    blocks = f"blocks {shape['n1']} and {shape['n2']}"
    lines = [f"generation [B={shape['batch']}, C={shape['context']}, {blocks}]"]
    for r in records:
        head = f"  {r['variant']:13} {r['shape']['scoring']:10}"
        if r["status"] != "ok":
            lines.append(f"{head} {r['status']}: {r['reason']}")
            continue
        speedup = f"x{r['speedup']:.1f}" if r["speedup"] is not None else "-"
        ids = f"  ids_match={r['ids_match']}" if "ids_match" in r else ""
        lines.append(
            f"{head} {r['median_ms']:9.3f} ms/block  floor {r['floor_ms']:8.3f} ms "
            f"{r['bytes'] / 1e9:7.3f} GB  {100 * r['roofline_fraction']:5.1f}% of bandwidth "
            f"{r['tokens_per_s']:10.1f} tok/s  {speedup} vs official{ids}"
        )
    return "\n".join(lines)
