"""The benchmark harness on CPU: formulas, the official-style baselines, the smoke run, refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks import run, timing
from benchmarks.cases import all_cases, block_embed, codebook_argmin, head_select
from kelix_fast.ops import BackendUnavailableError

CPU = torch.device("cpu")
FAKE_ROOF = {"matmul_tflops": {"bfloat16": 1.0, "float32": 1.0}, "copy_gbps": 1.0}


def full_point(case, **fields):
    return next(p for p in case.points(False) if fields.items() <= p.items())


def test_codebook_argmin_formulas_at_n_4096():
    point = full_point(codebook_argmin.CASE, n=4096, dtype="bfloat16", mode="exact")
    assert codebook_argmin.flops(point) == 2 * 4096 * 8 * 8192 * 128 == 68_719_476_736
    # z 8 MiB + codebooks 16 MiB + LayerNorm 4 KiB + int64 ids 256 KiB + float32 norms 256 KiB
    assert codebook_argmin.nbytes(point) == 8_388_608 + 16_777_216 + 4_096 + 262_144 + 262_144
    reference = dict(point, mode="reference", dtype="float32")
    assert codebook_argmin.nbytes(reference) == 16_777_216 + 33_554_432 + 8_192 + 262_144


def test_block_embed_formulas_at_b32_l4096():
    point = full_point(block_embed.CASE, B=32, L=4096)
    assert block_embed.flops(point) == 32 * 4096 * 8 * 4096
    # int64 ids [32, 4096, 9] + 8 bf16 rows of 4096 per group + bf16 output [32, 4096, 4096]
    assert block_embed.nbytes(point) == 9_437_184 + 8_589_934_592 + 1_073_741_824


def test_full_shapes_are_the_kelix_shapes():
    points = codebook_argmin.points(False)
    assert {p["n"] for p in points} == {324, 1280, 4096, 16384}
    assert {(p["groups"], p["codes"], p["dim"], p["init_dim"]) for p in points} == {
        (8, 8192, 128, 4096)
    }
    assert {(p["dtype"], p["mode"]) for p in points} == {
        (d, m) for d in ("bfloat16", "float32") for m in ("exact", "reference")
    }
    embeds = block_embed.points(False)
    assert {(p["B"], p["L"]) for p in embeds} == {(1, 1), (1, 4096), (32, 1), (32, 4096)}
    assert {(p["vocab"], p["dim"], p["dtype"]) for p in embeds} == {(217472, 4096, "bfloat16")}


def nearest_ids(point, inputs):
    """float64 brute force: the definition of the nearest code."""
    groups, codes, dim = point["groups"], point["codes"], point["dim"]
    z = inputs["z"].double()
    ids = []
    for g in range(groups):
        weight, bias = inputs["ln_weight"][g].double(), inputs["ln_bias"][g].double()
        u = F.layer_norm(z[:, g * dim : (g + 1) * dim], (dim,), weight, bias, codebook_argmin.EPS)
        dist = (u[:, None] - inputs["codebooks"][g].double()[None]).square().sum(-1)
        ids.append(dist.argmin(-1) + codebook_argmin.TEXT_VOCAB + g * codes)
    return torch.stack(ids, 1)


@pytest.mark.parametrize("mode", ["exact", "reference"])
def test_codebook_baseline_equals_the_reference_on_fp32_margins(mode):
    point = dict(codebook_argmin.points(True)[-1], dtype="float32", mode=mode, n=41)
    shared = codebook_argmin.make_shared(point, CPU)
    inputs = codebook_argmin.make_inputs(point, shared, seed=3)
    # the codebooks the op gets are exactly what the baseline rebuilds on every call
    assert torch.equal(codebook_argmin.build_codebooks(shared), inputs["codebooks"])
    want = nearest_ids(point, inputs)
    assert torch.equal(codebook_argmin.run(point, inputs, "torch"), want)
    assert torch.equal(codebook_argmin.baseline(point, inputs, shared), want)


def test_block_embed_baseline_equals_the_reference():
    point = dict(block_embed.points(True)[-1], dtype="float32")
    shared = block_embed.make_shared(point, CPU)
    inputs = block_embed.make_inputs(point, shared, seed=2)
    ids, table = inputs["ids"], shared["table"]
    assert (ids[..., -1] == point["q_eos"]).all() and (ids[..., 0] >= point["text_vocab"]).all()
    want = table[ids[..., :-1]].sum(-2)  # all-visual groups: the 8 rows, summed
    torch.testing.assert_close(block_embed.run(point, inputs, "torch"), want)
    torch.testing.assert_close(block_embed.baseline(point, inputs, shared), want)


def test_head_select_formulas_at_m_32():
    point = full_point(head_select.CASE, M=32, mode="sample")
    assert head_select.flops(point) == 2 * 32 * 217472 * 4096
    # head 1.78 GB + y 256 KiB + norm weight 8 KiB + int64 ids and seeds
    assert head_select.nbytes(point) == 1_781_530_624 + 262_144 + 8_192 + 256 + 256


@pytest.mark.parametrize("mode", ["greedy", "sample"])
def test_head_select_baseline_and_reference_find_the_picked_ids(mode):
    point = next(p for p in head_select.points(True) if p["mode"] == mode and p["M"] == 5)
    shared = head_select.make_shared(point, CPU)
    inputs = head_select.make_inputs(point, shared, seed=3)
    assert torch.equal(head_select.run(point, inputs, "torch"), inputs["picks"])
    assert torch.equal(head_select.baseline(point, inputs, shared), inputs["picks"])


def test_cpu_smoke_run_writes_valid_json(tmp_path):
    path = tmp_path / "smoke.json"
    assert run.main(["run", "--suite", "kernels", "--cpu", "--quick", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["device"] == "cpu" and report["device_type"] == "cpu"
    for key in ("versions", "commit", "dirty", "timestamp", "roofline"):
        assert key in report
    assert set(report["versions"]) == {"torch", "triton", "cuda", "driver"}
    assert report["roofline"]["copy_gbps"] > 0
    assert set(report["roofline"]["matmul_tflops"]) == {"bfloat16", "float32"}
    points = sum(len(case.points(True)) for case in all_cases().values())
    assert len(report["results"]) == 3 * points
    for record in report["results"]:
        # Every tensor is on the CPU, so with or without a GPU present auto resolves to torch, triton
        # runs only in its interpreter (never timed) and cuda refuses CPU tensors.
        assert record["auto_choice"] == "torch"
        assert record["status"] == ("ok" if record["backend"] == "torch" else "unavailable")
        assert record["baseline"]["name"] == "official_eager"
        assert record["baseline"]["matches_reference"] is True
        if record["status"] == "unavailable":
            assert record["reason"] and record["verified"] is False
            assert "median_ms" not in record
            continue
        assert record["verified"] is True
        for key in ("median_ms", "p20_ms", "p80_ms", "tflops", "gbps", "roofline_fraction"):
            assert record[key] > 0
        assert record["p20_ms"] <= record["median_ms"] <= record["p80_ms"]
        assert record["raw_ms"] and record["speedup"] > 0
    assert {r["backend"] for r in report["results"] if r["status"] == "ok"} >= {"torch"}


def test_unavailable_and_mismatching_backends_are_recorded_not_timed():
    def fake_run(point, inputs, backend):
        ids = codebook_argmin.run(point, inputs, "torch")
        return ids + 1 if backend == "cuda" else ids  # a wrong "cuda" result

    case = dataclasses.replace(codebook_argmin.CASE, run=fake_run)
    runner = run._Runner(CPU, timing.QUICK, FAKE_ROOF)
    point = codebook_argmin.points(True)[0]
    records = {r["backend"]: r for r in runner.point(case, point, ["torch", "triton", "cuda"])}
    assert records["torch"]["status"] == "ok" and records["torch"]["verified"] is True
    # Triton on CPU is its interpreter: recorded, never timed.
    assert records["triton"]["status"] == "unavailable"
    assert "interpreter" in records["triton"]["reason"]
    assert records["cuda"]["status"] == "mismatch"
    assert records["cuda"]["reason"].startswith(f"{point['n'] * 8} of {point['n'] * 8} ids")
    for backend in ("cuda", "triton"):
        assert records[backend]["verified"] is False and "median_ms" not in records[backend]


def test_backend_unavailable_errors_are_recorded_with_their_reason():
    def fake_run(point, inputs, backend):
        if backend == "cuda":
            raise BackendUnavailableError("codebook_argmin: backend 'cuda' unavailable: no GPU")
        return codebook_argmin.run(point, inputs, "torch")

    case = dataclasses.replace(codebook_argmin.CASE, run=fake_run)
    runner = run._Runner(CPU, timing.QUICK, FAKE_ROOF)
    point = codebook_argmin.points(True)[0]
    (record,) = runner.point(case, point, ["cuda"])
    assert record["status"] == "unavailable" and record["reason"].endswith("no GPU")
    assert "median_ms" not in record


def test_gpu_suite_refuses_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "gpu.json"
    assert run.main(["run", "--suite", "kernels", "--json", str(path)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    assert not path.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cpu"], "--cpu runs the --quick shapes only"),
        (
            ["--cpu", "--quick", "--json", str(run.RESULTS_DIR / "cpu.json")],
            "holds GPU results only",
        ),
    ],
)
def test_cpu_mode_never_writes_gpu_results(argv, message, capsys):
    assert run.main(["run", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (run.RESULTS_DIR / "cpu.json").exists()


def test_rotating_sets_exceed_twice_l2():
    assert timing.rotating_sets(25 << 20, 50 << 20) == 5  # 4 other sets touch 100 MiB = 2 x L2
    assert timing.rotating_sets(10 << 30, 50 << 20) == 2
    assert timing.rotating_sets(1, 50 << 20) == timing.MAX_SETS
