"""The generation suite on CPU: the recreated official loop against the engine, the id check, the
traffic model at full Kelix shapes, the smoke run (its decode step's terms read back from the JSON)
and the refusals. The terms on their own: test_decode_terms.py."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import decode_terms, decode_traffic, generation, run
from kelix_fast import KelixAR, presets
from kelix_fast.presets import release_config, tiny_config
from kelix_fast.runtime import engine_core
from kelix_fast.runtime.sampling import SamplingParams

CPU = torch.device("cpu")
Q_EOS, SLOTS = presets.Q_EOS, 8


def engine_groups(model, prompts, blocks: int, scoring: str = "full") -> list[torch.Tensor]:
    """The engine's greedy groups per request ([n_b, G+1], cut at its stop), eager."""
    greedy = [SamplingParams(top_k=1)] * len(prompts)
    outputs = engine_core.generate_batch(
        model,
        prompts,
        max_new_blocks=blocks,
        params=greedy,
        scoring=scoring,
        request_seeds=[0] * len(prompts),
    )
    return [out.new_groups for out in outputs]


def test_official_loop_equals_the_engine_on_the_benchmark_model():
    config = tiny_config()
    model = generation.random_model(config, CPU, torch.float32)
    prompts = generation.make_prompts(config, 2, 5, CPU)
    groups, logits = generation.official_generate(
        model, prompts, max_new_blocks=3, keep_logits=True
    )
    assert groups.shape == (2, 3, SLOTS + 1) and len(logits) == 3
    assert logits[0].shape == (2, SLOTS, config.llm.total_vocab)
    for want, got in zip(groups, engine_groups(model, prompts, 3)):
        assert torch.equal(want, got)
    # Image blocks: every slot a visual id of any sub-codebook, 8 steps, no early end.
    assert (groups[..., :SLOTS] >= config.llm.vocab_size).all()
    assert (groups[..., SLOTS] == Q_EOS).all()
    assert len(set(groups[..., :SLOTS].flatten().tolist())) > 20  # not a constant chain


def test_official_loop_equals_the_engine_when_blocks_end_early():
    """The preset's head favours q_eos, so blocks end at different slots: the stop rule and the
    closing of a block after its end-of-block are exercised too."""
    model = KelixAR.tiny(seed=5, device="cpu").model
    text = [presets.IM_START, 872, 198, 1000, 2000, presets.IM_END, 198, presets.IM_START, 77091]
    prompts = [torch.tensor([[t] + [Q_EOS] * SLOTS for t in text[: 9 - b]]) for b in range(2)]
    groups, _ = generation.official_generate(model, prompts, max_new_blocks=3)
    early = 0
    for want, got in zip(groups, engine_groups(model, prompts, 3)):
        assert torch.equal(want[: got.shape[0]], got)
        early += int((got[:, :SLOTS] == Q_EOS).any(1).sum())
    assert early > 0


def test_first_divergence_explains_rounding_ties_only():
    official = torch.tensor([[5, 6, 7, Q_EOS], [1, 2, 3, Q_EOS]])
    assert generation.first_divergence(official, [], official.clone()) is None
    engine = official.clone()
    engine[1, 2] = 4
    row = torch.zeros(3, 10)  # block 1's logits [steps, V]: slot 2 picked id 3
    row[2, 3], row[2, 4] = 4.0, 4.0  # a tie in the logits the official loop sorted
    found = generation.first_divergence(official, [row, row], engine)
    assert found == {
        "block": 1,
        "slot": 2,
        "official_id": 3,
        "engine_id": 4,
        "official_logit": 4.0,
        "engine_id_official_logit": 4.0,
        "ulp": 4.0 * torch.finfo(torch.float32).eps,
        "near_tie": True,
    }
    row[2, 4] = 3.9  # the official's pick wins clearly: an engine error
    assert generation.first_divergence(official, [row, row], engine)["near_tie"] is False
    wide = row.to(torch.bfloat16)
    wide[2, 4] = 3.984375  # one bf16 unit below 4.0
    assert generation.first_divergence(official, [wide, wide], engine)["near_tie"] is True


def test_engine_ids_that_differ_beyond_a_tie_are_a_mismatch():
    official = torch.tensor([[[5, 6, Q_EOS]]])
    logits = torch.zeros(1, 2, 8)
    logits[0, 1, 6] = 2.0
    wrong = official.clone()
    wrong[0, 0, 1] = 7
    warm = {("official_loop", "full"): (official, [logits]), ("eager", "full"): (wrong, [])}
    record = generation._Bench._ids("eager", "full", warm)
    assert record["status"] == "mismatch" and record["ids_match"] is False
    warm["eager", "full"] = (official.clone(), [])
    assert generation._Bench._ids("eager", "full", warm) == {
        "ids_compared_blocks": 1,
        "ids_match": True,
        "ids_divergence": None,
    }
    assert generation._Bench._ids("eager", "structured", warm) == {}


def test_traffic_model_at_full_shapes():
    sizes = decode_traffic.Sizes.of(release_config(), torch.bfloat16)
    assert sizes.llm_layer_params * 2 == 13_892_143_104  # 36 x 192.95 M (kelix-ar.md §7.1)
    assert sizes.kv_bytes_per_position == 147_456
    assert sizes.decoder_params == 8_397_312 + 512  # all but the position table, plus one row
    head = 217_472 * 4096 * 2
    full = decode_traffic.block_traffic(
        sizes, batch=1, kv_len=1024, variant="eager", scoring="full"
    )
    parts = full["bytes_parts"]
    assert parts["head"] == 8 * head and parts["kv_cache"] == 1025 * 147_456
    assert parts["embedding_rows"] == 15 * 4096 * 2
    assert 28.1e9 < full["bytes"] - parts["kv_cache"] < 28.3e9  # §7.2: ~28.2 GB + KV
    graphs = decode_traffic.block_traffic(
        sizes, batch=1, kv_len=1024, variant="cuda_graphs", scoring="full"
    )
    assert graphs == full
    structured = decode_traffic.block_traffic(
        sizes, batch=1, kv_len=1024, variant="eager", scoring="structured"
    )
    assert structured["bytes_parts"]["head"] == (217_472 + 7 * 8193) * 4096 * 2
    # One head pass per sub-step serves the whole batch; the KV read grows with it.
    b32 = decode_traffic.block_traffic(
        sizes, batch=32, kv_len=1024, variant="eager", scoring="full"
    )
    assert b32["bytes_parts"]["head"] == parts["head"]
    assert b32["bytes_parts"]["kv_cache"] == 32 * parts["kv_cache"]
    official = decode_traffic.block_traffic(
        sizes, batch=1, kv_len=1024, variant="official_loop", scoring="full"
    )
    assert official["bytes_parts"]["logits"] == 217_472 * (36 * 2 + 8 * 2 + 8 * 10 + 16 * 2)
    head_flop = official["flop"] - full["flop"] - 2 * 28 * sizes.decoder_matrix_params
    assert head_flop == 2 * 28 * 217_472 * 4096  # 36 head rows per block instead of 8


def test_cpu_smoke_run_records_every_point(tmp_path):
    path = tmp_path / "generation.json"
    assert run.main(["run", "--suite", "generation", "--cpu", "--quick", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["suite"] == "generation" and report["device"] == "cpu"
    for key in ("schema", "argv", "versions", "commit", "dirty", "timestamp", "roofline"):
        assert key in report
    schedule = report["schedule"]
    assert (schedule["context"], schedule["n1"], schedule["n2"]) == (8, 2, 3)
    assert report["model"]["vocab"] == tiny_config().llm.total_vocab
    results = [r for r in report["results"] if r["variant"] != "terms"]
    variants = [(r["variant"], r["shape"]["scoring"]) for r in results]
    assert variants == 2 * [
        ("official_loop", "full"),
        ("eager", "full"),
        ("cuda_graphs", "full"),
        ("eager", "structured"),
        ("cuda_graphs", "structured"),
    ]
    assert [r["shape"]["batch"] for r in results] == [1] * 5 + [2] * 5
    copy_gbps = report["roofline"]["copy_gbps"]
    for r in results:
        assert r["bytes"] > 0 and r["flop"] > 0
        assert r["floor_ms"] == pytest.approx(r["bytes"] / copy_gbps / 1e6)
        if r["variant"] == "cuda_graphs":
            assert r["status"] == "unavailable" and r["reason"] == "needs a CUDA device"
            assert "median_ms" not in r
            continue
        assert r["status"] == "ok"
        seconds, batch = r["median_ms"] / 1e3, r["shape"]["batch"]
        assert seconds > 0 and len(r["raw_ms"]) == schedule["reps"]
        assert r["tokens_per_s"] == pytest.approx(8 * batch / seconds)
        assert r["blocks_per_s"] == pytest.approx(batch / seconds)
        assert r["roofline_fraction"] == pytest.approx(r["floor_ms"] / r["median_ms"])
        official = results[0 if batch == 1 else 5]
        assert r["speedup"] == pytest.approx(official["median_ms"] / r["median_ms"])
        assert len(r["decode_s"]["n1"]) == len(r["decode_s"]["n2"]) == schedule["reps"]
    assert results[1]["ids_match"] is True and results[1]["ids_divergence"] is None
    assert "speedup_vs_full" in results[3]
    assert set(report["goals"]) >= {"b1_vs_floor", "b1_speedup", "b32_speedup"}
    check_terms(report, results)


def check_terms(report: dict, variants: list[dict]) -> None:
    """The decode step's terms of the smoke run, read back from its JSON: every term timed, the
    bytes split of the traffic model, the account's arithmetic."""
    sizes = decode_traffic.Sizes.of(tiny_config(), torch.float32)
    context, copy_gbps = report["schedule"]["context"], report["roofline"]["copy_gbps"]
    terms = [r for r in report["results"] if r["variant"] == "terms"]
    assert [r["shape"]["batch"] for r in terms] == [1] * 12 + [2] * 12
    for batch in (1, 2):
        found = {
            (r["shape"]["scoring"], r["shape"]["term"], r["shape"]["slots"]): r
            for r in terms
            if r["shape"]["batch"] == batch
        }
        assert list(found) == TERM_KEYS
        for r in found.values():
            assert r["status"] == "ok" and r["reason"] is None and r["cuda_graph"] is False
            assert r["median_ms"] > 0 and len(r["raw_ms"]) >= 3
            assert r["floor_ms"] == pytest.approx(r["bytes"] / copy_gbps / 1e6)
            assert r["bytes"] == sum(r["bytes_parts"].values())
        for scoring in ("full", "structured"):
            step = found[scoring, "step", "0-7"]
            parts = [r for (s, t, _), r in found.items() if s in (scoring, "any") and t != "step"]
            want = decode_traffic.block_traffic(
                sizes, batch=batch, kv_len=context, variant="cuda_graphs", scoring=scoring
            )
            assert step["bytes_parts"] == want["bytes_parts"]
            for name, value in want["bytes_parts"].items():  # the terms' bytes add up, part by part
                assert (
                    sum(r["calls_per_block"] * r["bytes_parts"].get(name, 0) for r in parts)
                    == value
                )
            account = step["account"]
            assert account["whole_ms"] == step["median_ms"]
            per_block = sum(r["median_ms"] * r["calls_per_block"] for r in parts)
            assert account["sum_ms"] == pytest.approx(per_block)
            assert account["whole_ms"] == pytest.approx(account["sum_ms"] + account["residual_ms"])
            gaps = sum(part["gap_ms"] for part in account["parts"].values())
            assert account["gap_ms"] == pytest.approx(gaps + account["residual_ms"])
            assert account["gap_ms"] == pytest.approx(step["median_ms"] - step["floor_ms"])
            eager = next(
                r
                for r in variants
                if (r["variant"], r["shape"]["batch"], r["shape"]["scoring"])
                == ("eager", batch, scoring)
            )
            assert account["suite_ms_per_block"] == eager["median_ms"]
            # The JSON holds all the account is made of.
            again = decode_terms.account(step, parts) | {"suite_ms_per_block": eager["median_ms"]}
            assert again == account
    printed = decode_terms.terms_table([r for r in terms if r["shape"]["batch"] == 1])
    assert "account full: step" in printed and "account structured: step" in printed
    assert decode_terms.account_summary(report["results"]).startswith("B=1 gap: full step ")


TERM_KEYS = [
    ("any", "llm", "-"),
    ("any", "block_decoder", "0-7"),
    *(
        (scoring, term, slots)
        for scoring in ("full", "structured")
        for term, slots in (
            ("head", "0"),
            ("head", "1-7"),
            ("glue", "0"),
            ("glue", "1-7"),
            ("step", "0-7"),
        )
    ),
]


def test_generation_suite_refuses_without_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = tmp_path / "gpu.json"
    assert run.main(["run", "--suite", "generation", "--json", str(path)]) == 2
    assert "generation suite measures GPU work and needs a CUDA device" in capsys.readouterr().err
    assert not path.exists()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cpu"], "--cpu runs the --quick shapes only"),
        (
            ["--cpu", "--quick", "--json", str(run.RESULTS_DIR / "gen-cpu.json")],
            "holds GPU results only",
        ),
    ],
)
def test_generation_cpu_mode_never_writes_gpu_results(argv, message, capsys):
    assert run.main(["run", "--suite", "generation", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (run.RESULTS_DIR / "gen-cpu.json").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["--suite", "kernels", "--batches", "1"],
        ["--suite", "generation", "--cases", "block_embed"],
        ["--suite", "generation", "--batches", "0,8"],
    ],
)
def test_options_of_the_other_suite_are_rejected(argv):
    with pytest.raises(SystemExit) as raised:
        run.parse_args(["run", *argv])
    assert raised.value.code == 2
