"""The decode step's terms: the traffic model split over the terms at full Kelix shapes, the account's
arithmetic, and the terms of the tiny model on CPU (L2 rotation, records that cannot be timed). The
smoke run's terms are checked in test_generation.py, from the suite's JSON."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks import decode_terms, decode_traffic, generation
from kelix_fast.presets import release_config

CPU = torch.device("cpu")


def test_terms_split_the_traffic_model_at_full_shapes():
    sizes = decode_traffic.Sizes.of(release_config(), torch.bfloat16)
    head, row = 217_472 * 4096 * 2, 4096 * 2
    for batch in (1, 32):
        for scoring in ("full", "structured"):
            terms = decode_terms.term_traffic(sizes, batch=batch, kv_len=1024, scoring=scoring)
            found = {(t["term"], t["slots"]): t for t in terms}
            assert [t["calls_per_block"] for t in terms] == [1, 8, 1, 7, 1, 7]
            llm = found["llm", "-"]["bytes_parts"]
            assert llm == {
                "llm_weights": 13_892_143_104,
                "kv_cache": batch * 1025 * 147_456,
                "embedding_rows": batch * 8 * row,
            }
            assert found["block_decoder", "0-7"]["bytes_parts"] == {
                "block_decoder_weights": (8_397_312 + 512) * 2
            }
            later = head if scoring == "full" else 8193 * 4096 * 2
            assert found["head", "0"]["bytes_parts"] == {"head": head}
            assert found["head", "1-7"]["bytes_parts"] == {"head": later}
            assert found["glue", "1-7"]["bytes_parts"] == {"embedding_rows": batch * row}
            total = decode_traffic.block_traffic(
                sizes, batch=batch, kv_len=1024, variant="eager", scoring=scoring
            )["bytes"]
            split = sum(t["calls_per_block"] * sum(t["bytes_parts"].values()) for t in terms)
            assert split == total


def term(name: str, ms: float, floor_ms: float, calls: int = 1, scoring: str = "any") -> dict:
    return {
        "shape": {"term": name, "scoring": scoring},
        "median_ms": ms,
        "floor_ms": floor_ms,
        "calls_per_block": calls,
    }


def test_account_splits_the_step_and_its_gap():
    parts = [
        term("llm", 7.0, 3.5),
        term("block_decoder", 0.05, 0.004, calls=8),
        term("head", 0.5, 0.4, scoring="full"),
        term("head", 0.25, 0.125, calls=7, scoring="full"),
        term("glue", 0.02, 0.0, scoring="full"),
        term("glue", 0.01, 0.0, calls=7, scoring="full"),
    ]
    step = term("step", 11.0, 4.807, scoring="full")
    found = decode_terms.account(step, parts)
    assert found["parts"]["llm"] == {"ms": 7.0, "floor_ms": 3.5, "gap_ms": 3.5}
    assert found["parts"]["block_decoder"]["ms"] == pytest.approx(0.4)
    assert found["parts"]["head"]["ms"] == pytest.approx(0.5 + 7 * 0.25)
    assert found["parts"]["head"]["floor_ms"] == pytest.approx(0.4 + 7 * 0.125)
    assert found["parts"]["glue"] == pytest.approx({"ms": 0.09, "floor_ms": 0.0, "gap_ms": 0.09})
    assert found["sum_ms"] == pytest.approx(7.0 + 0.4 + 2.25 + 0.09)
    assert found["residual_ms"] == pytest.approx(11.0 - 9.74)
    assert found["gap_ms"] == pytest.approx(11.0 - 4.807)
    # The parts' floors add up to the step's here, so the gap splits as the time does.
    gaps = sum(part["gap_ms"] for part in found["parts"].values())
    assert found["gap_ms"] == pytest.approx(gaps + found["residual_ms"])
    line = decode_terms.account_summary(
        [{"variant": "terms", "shape": {"batch": 1, "scoring": "full"}, "account": found}]
    )
    assert line == (
        "B=1 gap: full step 11.00 ms, floor 4.81: llm +3.500 + block_decoder +0.368 + "
        "head +0.975 + glue +0.090 + residual +1.260"
    )
    assert decode_terms.account_summary([]) == ""


@pytest.fixture(scope="module")
def tiny_terms() -> decode_terms.StepTerms:
    """The terms instrument of the suite's CPU smoke mode, as the suite's bench builds it."""
    schedule = generation.make_schedule(True, [1])
    roof = {"copy_gbps": 10.0, "matmul_tflops": {"float32": 0.1}}
    return generation._Bench(CPU, schedule, roof).terms


def test_terms_rotate_block_decoder_copies_when_l2_would_hold_it(tiny_terms):
    """The Block Decoder is called from copies in turn when its weights fit in L2 (on a GPU); forced
    here with a pretend L2 of 3 decoders."""
    decoder_bytes = tiny_terms.sizes.decoder_params * tiny_terms.sizes.elem
    terms = dataclasses.replace(tiny_terms, l2_bytes=3 * decoder_bytes)
    prompts = generation.make_prompts(terms.model.config, 1, terms.context, CPU)
    records = terms.measure(prompts, None, [])
    assert all(r["status"] == "ok" for r in records), records[0]["reason"]
    found = {(r["shape"]["term"], r["shape"]["slots"]): r["sets"] for r in records}
    assert found["block_decoder", "0-7"] == 56  # lcm(8 slots, 7 copies)
    assert found["head", "1-7"] == found["glue", "1-7"] == 7 and found["llm", "-"] == 1
    assert all(r["account"]["suite_ms_per_block"] is None for r in records if "account" in r)


def test_terms_that_cannot_run_are_recorded_without_times(tiny_terms, monkeypatch):
    prompts = generation.make_prompts(tiny_terms.model.config, 1, tiny_terms.context, CPU)
    skipped = tiny_terms.measure(prompts, "memory: needs more", [])
    assert len(skipped) == 12
    assert all(r["status"] == "skipped" and r["reason"] == "memory: needs more" for r in skipped)
    assert not any("median_ms" in r or "account" in r for r in skipped)

    def broken(*args):
        raise ValueError("no slots")

    monkeypatch.setattr(decode_terms.StepTerms, "_time", broken)
    failed = tiny_terms.measure(prompts, None, [])
    assert {r["status"] for r in failed} == {"error"}
    assert failed[0]["reason"].startswith("ValueError: no slots (test_decode_terms.py:")
    assert not any("median_ms" in r or "account" in r for r in failed)
