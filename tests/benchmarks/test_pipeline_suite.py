"""The pipeline suite (benchmarks/pipeline.py) on CPU: the smoke run records every stage in both
variants, a failing point and a point past its cap are recorded without stopping the suite, the
official figures map onto the release shapes, and the release models and work model have the
Kelix shapes."""

from __future__ import annotations

import json
import sys
import time

import pytest
import torch

from benchmarks import pipeline, roofline, timing
from kelix_fast import presets

CPU = torch.device("cpu")
STAGES = {*pipeline.TOK_STAGES, "generate", "dit.step", "dit.sample", "vae.decode", "t2i"}
NEEDS_DIFFUSERS = ("vae.decode", "t2i")  # unavailable, with the reason, where diffusers is missing


@pytest.fixture(scope="module")
def roof():
    with torch.inference_mode():
        return roofline.measure(CPU, timing.QUICK)


@pytest.fixture(scope="module")
def report(roof):
    return pipeline.measure(CPU, roof, quick=True)


def test_the_smoke_run_times_every_stage_in_both_variants(report):
    results = report["results"]
    quick = pipeline.make_schedule(True)
    want = [(s, shape, v) for s, shape in pipeline.plan(quick) for v in pipeline.variants(s)]
    assert [(r["stage"], r["shape"], r["variant"]) for r in results] == want
    assert {r["stage"] for r in results} == STAGES
    assert {r["variant"] for r in results if r["stage"] != "vae.decode"} == {
        "engine",
        "reference_path",
    }
    assert {tuple(r["shape"]["grid"]) for r in results if r["stage"] == "tok"} == {(4, 4), (6, 6)}
    generate = {
        (r["shape"]["blocks"], r["shape"]["batch"]) for r in results if r["stage"] == "generate"
    }
    assert generate == {(2, 1), (2, 2), (3, 1), (3, 2)}
    for r in results:
        assert "official_other_run" in r and r["official_other_run"] is None  # tiny shapes
        if r["status"] == "unavailable":
            assert r["stage"] in NEEDS_DIFFUSERS and "diffusers" in r["reason"]
            continue
        assert r["status"] == "ok", r
        assert r["reason"] is None and r["reps"] == len(r["raw_ms"]) >= 1
        assert min(r["raw_ms"]) > 0 and r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["backends"] == ("torch" if r["variant"] == "reference_path" else "auto")
        if r["variant"] == "engine" and r["stage"] != "vae.decode":
            assert r["speedup"] > 0
        if r["stage"] == "generate":
            assert set(r["parts_ms"]) == {"prefill", "decode"}
            assert len(r["parts_s"]["decode"]) == r["reps"]
            for key in ("per_block_ms", "blocks_per_s", "floor_ms", "roofline_fraction"):
                assert r[key] > 0
        if r["stage"].startswith("dit."):
            assert r["flop"] > 0 and r["tflops"] > 0 and r["compute_fraction"] > 0
        if r["stage"] == "t2i":
            assert set(r["parts_ms"]) == {"prefill", "decode", "dit", "vae"}
    json.dumps(report)  # the record is plain JSON


def test_the_smoke_run_describes_its_models_and_leaves_the_goals_unread(report):
    model = report["model"]
    assert model["dtype"] == "float32" and model["ar_config"] == "tiny_config()"
    assert model["resident_bytes"]["ar"] > 0 and model["resident_bytes"]["dit"] > 0
    assert report["schedule"]["valid_rows"] == report["schedule"]["t2i_blocks"] + 2
    # The goals are read off release shapes only.
    assert len(report["goals"]) == 2 * len(pipeline.GOALS)
    assert all(value is None for value in report["goals"].values())


def test_a_failing_point_is_an_error_and_the_suite_goes_on(roof, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(pipeline, "sample_latents", broken)  # the engine's DiT sampler
    results = pipeline.measure(CPU, roof, quick=True)["results"]
    failed = [r for r in results if r["status"] == "error"]
    assert {(r["stage"], r["variant"]) for r in failed} <= {
        ("dit.sample", "engine"),
        ("t2i", "engine"),
    }
    assert sum(r["stage"] == "dit.sample" for r in failed) == 2  # both guidance scales
    for r in failed:
        assert r["reason"].startswith("RuntimeError: injected failure")
        assert "median_ms" not in r and "speedup" not in r
    for r in results:
        if r not in failed and r["status"] != "unavailable":
            assert r["status"] == "ok", r
    assert results[-1]["stage"] == "t2i"  # every later point still ran


def test_a_point_past_its_cap_is_a_timeout_and_is_not_repeated(roof, monkeypatch):
    calls = []
    sample = pipeline.official_style_sample

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(2.0)
        return sample(*args, **kwargs)

    monkeypatch.setattr(pipeline, "official_style_sample", slow)  # the reference path's sampler
    results = pipeline.measure(CPU, roof, quick=True, point_timeout_s=1.5)["results"]
    late = [r for r in results if r["status"] == "timeout"]
    assert {(r["stage"], r["variant"]) for r in late} <= {
        ("dit.sample", "reference_path"),
        ("t2i", "reference_path"),
    }
    assert sum(r["stage"] == "dit.sample" for r in late) == 2
    assert len(calls) == len(late)  # the warm-up call only
    for r in late:
        assert "1.5 s cap" in r["reason"] and "median_ms" not in r
    engine = [r for r in results if r["stage"] == "dit.sample" and r["variant"] == "engine"]
    assert all(r["status"] == "ok" and "speedup" not in r for r in engine)
    for r in results:
        if r not in late and r["status"] != "unavailable":
            assert r["status"] == "ok", r


def test_official_figures_sit_beside_the_release_shapes():
    official = pipeline.load_official()
    if official is None:
        pytest.skip(f"no official figures at {pipeline.OFFICIAL_PATH}")
    full = pipeline.plan(pipeline.make_schedule(False))
    found = {}
    for stage, shape in full:
        figures = pipeline.official_figures(official, stage, shape)
        if figures is not None:
            assert (
                figures["source"]
                == pipeline.OFFICIAL_SOURCE
                == ("shared/measurements/h200-2026-12-04/official.json")
            )
            assert figures["median_ms"] > 0 and figures["field"]
            found[stage, json.dumps(shape, sort_keys=True)] = figures
    attached = {stage for stage, _ in found}
    assert attached == STAGES - {"tok.vit_attention"}  # the official run did not time it alone
    tok = official["parts"]["tok"]["images"]
    large = {"image_px": 980, "grid": [70, 70], "tokens": 1225}
    assert (
        pipeline.official_figures(official, "tok", large)["median_ms"]
        == (tok[1]["forward_image_tokens_ms"]["median"])
    )
    assert (
        pipeline.official_figures(official, "tok.vit", large)["median_ms"]
        == (tok[1]["breakdown_ms"]["vit"])
    )
    generate = [key for key in found if key[0] == "generate"]
    assert generate == [("generate", json.dumps({"batch": 1, "blocks": 64, "prompt": 48}))]
    t2i = next(f for (stage, _), f in found.items() if stage == "t2i")
    assert t2i["measured"] is False  # the official run derived it; it says so
    assert pipeline.official_figures(None, "tok", large) is None
    assert pipeline.official_figures({"parts": {}}, "tok", large) is None  # another layout


def test_goals_read_the_engine_at_release_shapes():
    def record(stage, ms, variant="engine", **shape):
        return {"stage": stage, "variant": variant, "status": "ok", "median_ms": ms, "shape": shape}

    dit = {"image_px": 1024, "condition_rows": 720, "steps": 50}
    results = [
        record("tok", 40.0, variant="reference_path", grid=[70, 70]),
        record("tok", 15.0, grid=[70, 70]),
        record("tok", 6.0, grid=[32, 32]),
        record("dit.sample", 290.0, guidance=1.0, **dit),
    ]
    assert pipeline.goals(results) == {
        "tok_448px_ms": 6.0,
        "tok_448px_at_most_5ms": False,
        "tok_980px_ms": 15.0,
        "tok_980px_at_most_16ms": True,
        "dit_50_steps_guidance_1_ms": 290.0,
        "dit_50_steps_guidance_1_at_most_300ms": True,
        "dit_50_steps_guidance_4.5_ms": None,
        "dit_50_steps_guidance_4.5_at_most_500ms": None,
    }


def test_release_models_and_work_have_the_kelix_shapes():
    full = pipeline.make_schedule(False)
    with torch.device("meta"):
        dit = pipeline.KelixDiT(full.dit)
    # 1,619.4 M parameters with the q/k norms plus the 720 x 2304 null condition (kelix-dit.md §9.1).
    assert sum(p.numel() for p in dit.parameters()) == 1_621_053_344
    assert dit.y_embedder.y_embedding.shape == (720, 2304)
    # 2.917 TFLOP per sample-forward at L = 720 without the condition K/V (§9.2: 3.206 - 0.289).
    assert pipeline.dit_flop(full.dit, 1024, 720) == pytest.approx(2.917e12, rel=0.01)
    assert full.valid_rows == 326 and full.condition_rows == 720 and full.steps == 50
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        vae = diffusers.AutoencoderDC(**presets.RELEASE_VAE_CONFIG)
    assert sum(p.numel() for p in vae.parameters()) == pytest.approx(312e6, rel=0.01)  # §7


def test_the_engine_builders_materialise_on_the_asked_device_and_dtype():
    quick = pipeline.make_schedule(True)
    engine = pipeline.random_engine(quick.ar, CPU, torch.bfloat16)
    tokenizer = engine.model.tokenizer
    assert engine.device == CPU and engine.dtype == torch.bfloat16
    codes = quick.ar.tokenizer.codes_per_group
    assert tokenizer.codebooks.shape[:2] == (8, codes)  # one slice of each table, as a real load
    assert not hasattr(tokenizer, "quantizer")  # the raw tables are freed
    head = engine.model.llm.output.weight
    assert not head[: quick.ar.llm.vocab_size].any() and head[quick.ar.llm.vocab_size :].any()
    params = [*tokenizer.parameters(), *engine.model.llm.parameters()]
    assert all(p.device == CPU and p.dtype == torch.bfloat16 for p in params)
    assert all(torch.isfinite(p.float()).all() for p in params)
    dit = pipeline.random_dit(quick.dit, CPU, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device == CPU for p in dit.parameters())


def test_without_diffusers_the_points_that_decode_are_unavailable(roof, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    quick = pipeline.make_schedule(True)
    bench = pipeline._Bench(CPU, quick, roof, point_timeout_s=None)
    decoding = [(s, shape) for s, shape in pipeline.plan(quick) if s in NEEDS_DIFFUSERS]
    for stage, shape in decoding:
        for variant in pipeline.variants(stage):
            record = bench.point(stage, shape, variant)
            assert record["status"] == "unavailable", record
            assert record["reason"].startswith("diffusers is not importable")
