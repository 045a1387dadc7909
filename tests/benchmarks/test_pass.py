"""``python -m benchmarks pass`` and what it is built from: the CPU smoke run end to end, the refusals,
the prerequisite check, a stage killed at its cap, a failing test, point caps and progress files, the
goal table and the latest-figures table. Every test names its device (or patches CUDA away), so none
depends on whether this machine has a GPU."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import generation, goals, passes, run, timing
from benchmarks.cases import all_cases

CPU = torch.device("cpu")
BENCHMARKS_README = run.RESULTS_DIR.parent / "README.md"
RESULTS_README = run.RESULTS_DIR / "README.md"


def pass_main(*argv: str) -> int:
    return run.main(["pass", *argv])


def printed_goal_table(printed: str) -> list[str]:
    """The last lines the pass printed: the goal table (header, rule, one row per goal)."""
    return printed.rstrip().splitlines()[-(len(goals.GOALS) + 2) :]


# --------------------------------------------------------------------------- the whole command


def test_cpu_smoke_runs_every_stage_but_the_build(tmp_path, capsys):
    readme_before = RESULTS_README.read_text()
    out = tmp_path / "smoke"
    assert pass_main("--cpu", "--quick", "--out", str(out)) == 0
    record = json.loads((out / goals.PASS_RECORD).read_text())
    assert [(s["name"], s["status"]) for s in record["stages"]] == [
        ("tests", "ok"),
        ("soak", "ok"),
        ("pipeline", "ok"),
        ("generation", "ok"),
        ("kernels", "ok"),
    ]
    assert record["stages"][0]["detail"].startswith(f"{len(passes.SMOKE_TESTS)} passed, 0 failed")
    for name in ("SUMMARY.md", "tests.junit.xml", "tests.txt", "tests.log", "soak.json"):
        assert (out / name).is_file(), name
    for suite in passes.SUITE_STAGES:
        report = json.loads((out / f"{suite}.json").read_text())
        assert (report["suite"], report["device"], report["quick"]) == (suite, "cpu", True)
        assert "incomplete" not in report and report["results"]
    assert not list(out.glob("*.progress.jsonl"))  # removed once the JSON holds it all
    summary = (out / "SUMMARY.md").read_text()
    assert "| kernels | ok |" in summary and "## Failures (0)" in summary
    table = printed_goal_table(capsys.readouterr().out)
    assert table[0] == "| goal | target | measured | ratio | met | note |"
    assert all("| not measured | - | not measured | a --quick run" in row for row in table[2:])
    assert RESULTS_README.read_text() == readme_before  # the smoke mode never writes it


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cpu"], "--cpu runs the --quick shapes only"),
        (["--cpu", "--quick", "--out", str(run.RESULTS_DIR / "smoke")], "holds GPU results only"),
        (["--quick", "--out", str(run.RESULTS_DIR / "smoke")], "holds full GPU runs"),
    ],
)
def test_refuses_to_put_cpu_or_quick_runs_under_results(argv, message, capsys):
    assert pass_main(*argv) == 2
    assert message in capsys.readouterr().err
    assert not (run.RESULTS_DIR / "smoke").exists()


def test_missing_prerequisites_are_named_before_anything_starts(tmp_path, monkeypatch, capsys):
    which, find_spec = shutil.which, importlib.util.find_spec
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "nvcc" else which("sh"))
    absent = {"diffusers", "xdist"}
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in absent else find_spec("json"),
    )
    out = tmp_path / "out"
    assert pass_main("--cpu", "--quick", "--stages", "build,tests,pipeline", "--out", str(out)) == 2
    err = capsys.readouterr().err
    named = [line.split(":")[0].strip() for line in err.splitlines()[1:]]
    assert named == ["nvcc", "diffusers", "pytest-xdist"]
    assert "diffusers: bring the wheel: see README" in err
    assert not out.exists()


def test_a_gpu_pass_without_a_cuda_device_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pass_main("--stages", "kernels", "--out", str(tmp_path / "out")) == 2
    assert "a CUDA device: torch sees no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_stage_caps_fit_nine_minutes_with_room_for_the_rest():
    assert set(passes.CAPS_S) == set(passes.STAGES)
    assert sum(passes.CAPS_S.values()) <= 9 * 60 - 20


# A stand-in for a `benchmarks run` process: writes the given lines to a file, then sleeps.
WRITE_THEN_SLEEP = """
import json, sys, time
path, lines, seconds = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
with open(path, "w") as file:
    for line in lines:
        file.write(json.dumps(line) + "\\n")
        file.flush()
time.sleep(seconds)
"""


def generation_record(batch: int, scoring: str = "full", **fields) -> dict:
    """A timed CUDA-graph record of the generation suite (values chosen by the test)."""
    shape = {"batch": batch, "context": 1024, "n1": 4, "n2": 20, "scoring": scoring}
    record = {"variant": "cuda_graphs", "shape": shape, "status": "ok", "reason": None}
    return record | {"median_ms": 10.0, "floor_ms": 8.0, "speedup": 6.0} | fields


def header(suite: str, **fields) -> dict:
    return {
        "schema": 1,
        "suite": suite,
        "quick": False,
        "device": "NVIDIA H200",
        "commit": "c0ffee1",
    } | fields


def test_a_stage_killed_at_its_cap_keeps_its_records_and_the_run_goes_on(tmp_path, monkeypatch):
    def command(plan, suite, json_path):
        if suite == "generation":  # one batch done, the next one in flight, then a hang
            lines = [
                {"header": header("generation")},
                {"start": {"variant": "all", "shape": {"batch": 1}}},
                {"record": generation_record(1)},
                {"start": {"variant": "all", "shape": {"batch": 8}}},
            ]
            path, seconds = run.progress_path(json_path), 600
        else:  # a run that ends at once with its record
            lines, path, seconds = [header("kernels") | {"results": []}], json_path, 0
        return [sys.executable, "-c", WRITE_THEN_SLEEP, str(path), json.dumps(lines), str(seconds)]

    monkeypatch.setattr(passes, "suite_command", command)
    monkeypatch.setattr(passes, "SMOKE_CAPS_S", dict.fromkeys(passes.STAGES, 3))
    out = tmp_path / "out"
    assert pass_main("--cpu", "--quick", "--stages", "generation,kernels", "--out", str(out)) == 0
    stages = json.loads((out / goals.PASS_RECORD).read_text())["stages"]
    assert [(s["name"], s["status"]) for s in stages] == [
        ("generation", "timeout"),
        ("kernels", "ok"),
    ]
    assert stages[0]["seconds"] < 30
    report = json.loads((out / "generation.json").read_text())
    kept, in_flight = report["results"]
    assert kept == generation_record(1)
    assert in_flight["shape"] == {"batch": 8} and in_flight["status"] == "timeout"
    assert "killed at its 3 s cap" in in_flight["reason"] == report["incomplete"]
    assert not run.progress_path(out / "generation.json").exists()
    assert "## Timeouts (1)" in (out / "SUMMARY.md").read_text()


def test_a_failing_test_fails_the_pass_after_the_summary(tmp_path, monkeypatch, capsys):
    tests = tmp_path / "test_sample.py"
    tests.write_text(
        "def test_holds():\n    pass\n\n\n"
        "def test_breaks():\n    raise ValueError('the first line\\nthe second line')\n"
    )
    monkeypatch.setattr(passes, "SMOKE_TESTS", (str(tests),))
    out = tmp_path / "out"
    assert pass_main("--cpu", "--quick", "--stages", "tests", "--out", str(out)) == 1
    # The node id is relative to pytest's rootdir, which depends on where the repo and tmp_path lie
    # (the common ancestor of the invocation dir and the test file): any path prefix is accepted.
    failure = r"\S*test_sample\.py::test_breaks - ValueError: the first line$"
    summary = (out / "SUMMARY.md").read_text()
    assert "| tests | failed |" in summary
    assert re.search(rf"^- tests: {failure}", summary, re.MULTILINE)
    assert "the second line" not in summary
    assert re.search(rf"^FAILED {failure}", (out / "tests.txt").read_text(), re.MULTILINE)
    assert (out / "tests.junit.xml").is_file()
    assert re.search(rf"^FAILED tests: {failure}", capsys.readouterr().out, re.MULTILINE)


# --------------------------------------------------------------------------- point caps, progress


class Clock:
    """A fake ``time.monotonic`` / ``time.perf_counter``: each call of the timed function takes 1/8 s."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def call(self, _: object) -> None:
        self.now += 0.125


@pytest.mark.parametrize(
    "cap_s, outcome",
    [
        (None, 10),  # the budget's min_reps
        (1.0, 5),  # 0.375 s of warm-up and probe: 0.625 s left, 5 calls fit
        (0.2, "warm-up call 2 of 2 ended 0.05 s past the point's 0.2 s cap"),
        (0.3, "no timed call fits the point's 0.3 s cap after the probe call"),
    ],
)
def test_a_point_cap_cuts_repetitions_or_times_the_point_out(monkeypatch, cap_s, outcome):
    clock = Clock()
    monkeypatch.setattr(timing.time, "monotonic", clock)
    monkeypatch.setattr(timing.time, "perf_counter", clock)
    budget = timing.Budget(warmup=2, min_reps=10, max_reps=10, target_s=1.0)
    deadline = timing.NO_DEADLINE if cap_s is None else timing.Deadline(cap_s, start=0.0)
    if isinstance(outcome, str):
        with pytest.raises(timing.PointTimeout, match=outcome):
            timing.time_cpu(clock.call, [None], budget, deadline)
    else:
        assert timing.time_cpu(clock.call, [None], budget, deadline) == [125.0] * outcome


def test_kernels_points_past_their_cap_are_recorded_as_timeout(tmp_path):
    path = tmp_path / "kernels.json"
    argv = ["run", "--suite", "kernels", "--cpu", "--quick", "--cases", "block_embed"]
    assert run.main([*argv, "--point-timeout", "1e-9", "--json", str(path)]) == 0
    records = json.loads(path.read_text())["results"]
    torch_records = [r for r in records if r["backend"] == "torch"]
    assert torch_records and all(
        r["status"] == "timeout" and r["verified"] and "median_ms" not in r for r in torch_records
    )
    assert all(r["baseline"]["status"] == "timeout" for r in records)
    assert not run.progress_path(path).exists()


def test_point_timeout_belongs_to_the_kernels_and_pipeline_suites():
    with pytest.raises(SystemExit):
        run.parse_args(["run", "--suite", "generation", "--point-timeout", "5"])
    for suite in ("kernels", "pipeline"):
        assert run.parse_args(["run", "--suite", suite, "--point-timeout", "5"]).point_timeout == 5


def test_recover_keeps_the_records_and_names_the_point_in_flight(tmp_path):
    path = tmp_path / "generation.progress.jsonl"
    with path.open("w") as file:
        report = run.run_generation(CPU, quick=True, batches=[1], progress=run.Progress(file))
        file.write('{"start": {"variant": "all", "shape": {"batch": 2}}}\n{"record": {"vari')
    recovered = run.recover(path, "timeout", "killed")
    *kept, in_flight = recovered["results"]
    assert kept == json.loads(json.dumps(report["results"]))
    assert in_flight == {
        "variant": "all",
        "shape": {"batch": 2},
        "status": "timeout",
        "reason": "killed",
    }
    assert recovered["incomplete"] == "killed" and recovered["roofline"] == report["roofline"]
    assert run.recover(tmp_path / "absent.jsonl", "timeout", "killed") is None


# --------------------------------------------------------------------------- goals


def kernels_report(**overrides) -> dict:
    """A full-shape kernels record, every point measured: the auto backend ``triton`` at 1 ms, SDPA
    at 2 ms, FlexAttention at 3 ms, the baseline at 4 ms; ``tflops`` = T / 100 for attention points."""
    results = []
    for case in all_cases().values():
        for point in case.points(False):
            shape = json.loads(json.dumps(point))
            others = [
                {"name": n, "status": "ok", "median_ms": ms}
                for n, ms in (("sdpa", 2.0), ("flex_attention", 3.0))
            ]
            results.append(
                {
                    "case": case.name,
                    "shape": shape,
                    "backend": "triton",
                    "auto_choice": "triton",
                    "status": "ok",
                    "median_ms": 1.0,
                    "tflops": shape.get("T", 0) / 100,
                    "roofline_fraction": 0.9,
                    "speedup": 4.0,
                    "baseline": {"name": "official_eager", "status": "ok", "median_ms": 4.0},
                    "other_baselines": others,
                }
            )
    return header("kernels") | {"results": results} | overrides


def outcomes(reports: dict) -> dict[str, goals.Outcome]:
    return {o.goal.id: o for o in goals.evaluate(reports)}


def test_goals_read_a_full_run():
    found = outcomes(
        {
            "kernels": kernels_report(),
            "generation": header("generation")
            | {
                "results": [
                    generation_record(1),
                    generation_record(1, "structured", median_ms=12.0),
                ]
            },
        }
    )
    assert found["attention.causal_tflops"].measured == 4096 / 100  # the worst of 4k and 16k
    assert found["attention.vs_sdpa"].measured == 2.0
    assert found["attention.block_causal_vs_flex"].measured == 3.0
    assert found["attention.block_causal_vs_causal"].measured == 1.0
    assert found["dit_attention.step_speedup"].measured == 4.0
    assert found["codebook_argmin.speedup"].ratio == 4.0 / 20
    assert found["block_embed.bandwidth"].met == "yes"
    b1 = found["generation.b1_floor"]
    assert (b1.measured, b1.ratio, b1.met) == (10.0 / 8.0, 1.15 / (10.0 / 8.0), "no")
    assert found["generation.b1_structured_floor"].measured == 12.0 / 8.0
    assert found["generation.b32_floor"].why_not == "batch 32 not in the run"


def test_a_goal_with_a_point_missing_or_cut_is_not_measured():
    report = kernels_report()
    cut = next(
        r for r in report["results"] if r["case"] == "attention" and r["shape"]["T"] == 16384
    )
    cut |= {"status": "timeout", "reason": "past its cap"}
    report["results"] = [r for r in report["results"] if r["case"] != "codebook_argmin"]
    found = outcomes({"kernels": report})
    assert found["attention.causal_tflops"].measured is None
    assert "1 of 2 attention points measured" in found["attention.causal_tflops"].why_not
    assert "timeout: past its cap" in found["attention.causal_tflops"].why_not
    assert found["codebook_argmin.speedup"].why_not == "0 of 4 codebook_argmin points measured"
    assert found["decode_attention.bandwidth"].measured == 0.9  # other goals keep their figures


def test_the_goal_table_prints_not_measured_never_a_number():
    table = goals.outcome_table(goals.evaluate({"kernels": kernels_report(quick=True)}))
    rows = table.splitlines()[2:]
    assert len(rows) == len(goals.GOALS)
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[2:5] == ["not measured", "-", "not measured"]
        assert cells[5] in (
            "a --quick run (tiny shapes)",
            "the generation suite did not run",
            "the pipeline suite did not run",
        )


def test_benchmarks_readme_holds_the_goal_table():
    assert goals.readme_table() in BENCHMARKS_README.read_text()


def write_run(folder: Path, report: dict, by_pass: bool) -> None:
    folder.mkdir(parents=True)
    (folder / f"{report['suite']}.json").write_text(json.dumps(report))
    if by_pass:
        (folder / goals.PASS_RECORD).write_text("{}")


def test_latest_figures_keep_the_newest_per_goal(tmp_path):
    old = header("generation", timestamp="2026-12-04T18:00:00+00:00")
    write_run(
        tmp_path / "old-manual",
        old | {"results": [generation_record(1), generation_record(32)]},
        False,
    )
    new = header("generation", timestamp="2026-12-10T09:00:00+00:00", commit="abcdef1234")
    write_run(tmp_path / "new", new | {"results": [generation_record(1, median_ms=9.0)]}, True)
    hand_row = "| `attention.causal_tflops` | >= 600 TFLOP/s | 215 TFLOP/s | 0.36 | no | NVIDIA H200 | `265be71` | 2026-12-04 | from a log |"
    stale_row = "| `generation.b1_floor` | <= 1.15x floor | 1.61x floor | 0.71 | no | NVIDIA H200 | `265be71` | 2026-12-04 | from a log |"
    readme = tmp_path / "README.md"
    readme.write_text(
        f"intro\n{goals.LATEST_BEGIN}\n{hand_row}\n{stale_row}\n{goals.LATEST_END}\nend\n"
    )
    goals.update_latest(readme, tmp_path)
    text = readme.read_text()
    rows = {
        line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")
    }
    assert list(rows) == [f"`{g.id}`" for g in goals.GOALS]
    assert rows["`attention.causal_tflops`"] == hand_row  # nothing newer: kept
    assert (
        "| 1.12x floor |" in rows["`generation.b1_floor`"]
        and "[new](new/) |" in rows["`generation.b1_floor`"]
    )
    assert "`abcdef1`" in rows["`generation.b1_floor`"]
    assert "(manual run, not `benchmarks pass`)" in rows["`generation.b32_floor`"]
    assert "| not measured |" in rows["`pipeline.tok_448px`"]
    assert text.startswith("intro\n") and text.endswith(f"{goals.LATEST_END}\nend\n")


def test_the_committed_latest_figures_are_what_the_pass_would_write(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(RESULTS_README.read_text())
    goals.update_latest(readme, run.RESULTS_DIR)
    assert readme.read_text() == RESULTS_README.read_text()


def test_generation_goals_agree_with_the_suite(tmp_path):
    results = [generation_record(1), generation_record(32, speedup=25.0)]
    suite = generation.goals(results)
    found = outcomes({"generation": header("generation") | {"results": results}})
    assert found["generation.b1_floor"].measured == suite["b1_vs_floor"]
    assert found["generation.b32_speedup"].met == (
        "yes" if suite["b32_speedup_at_least_20x"] else "no"
    )
