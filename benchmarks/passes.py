"""``python -m benchmarks pass``: build, test and benchmark kelix_fast in one capped command.

The command a session with a lent GPU runs first, on a bare GPU machine with no network: in at most
9 minutes on one H200 it

1. checks the prerequisites of the chosen stages and names every missing one before it starts;
2. ``build``: ``pip install --no-build-isolation --no-deps -e .`` (the native part), into build.log;
3. ``tests``: the whole test suite under pytest-xdist, every failure by name and first error line
   (benchmarks/pytest_log.py);
4. ``soak``: tests/soak (1,000 mixed calls; host RSS and device memory every 50 calls) on the device
   under test, its series in ``soak.json``;
5. ``pipeline``, ``generation`` (batches 1, 8, 32, 128) and ``kernels``: ``python -m benchmarks run``,
   each suite in its own process, each point under ``--point-timeout`` where the suite has one;

every stage in its own process group under its own hard cap (:data:`CAPS_S`): a stage still running at
its cap is killed and recorded as ``timeout``, a suite keeping every record its progress file holds
(``run.recover``) and naming the point it was in. Everything goes to
``benchmarks/results/<device>-<date>-<commit>/``: one JSON per suite, the test log, the JUnit XML and a
text summary, each stage's output, ``pass.json`` and ``SUMMARY.md``; the table of every goal
(benchmarks/goals.py) is printed last, and the latest-figures table of ``benchmarks/results/README.md``
is brought up to date.

``--cpu --quick`` is the smoke mode CI runs so that the command cannot rot: tiny shapes on the CPU, no
build unless ``--stages`` names it, a small selected test run (:data:`SMOKE_TESTS`) instead of the
suite, and a temporary folder (or ``--out``) that may not lie under ``benchmarks/results/``.

Exit code: 1 when a test failed, a benchmark disagreed with its reference (``mismatch``/``error``) or
a stage failed, after everything is written; 2 when refused (bad options, missing prerequisites).
A stage or point that timed out is reported, and is not by itself a failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks import decode_terms, environment, goals, run
from benchmarks.cases import all_cases

HELP = "build, test and run every suite in one command under time caps; summary and goal table"
STAGES = ("build", "tests", "soak", "pipeline", "generation", "kernels")
SUITE_STAGES = ("pipeline", "generation", "kernels")

# Hard caps of the stages on one H200, in seconds. They add up to 520 s: the remaining 20 s of the
# 9 minutes pay for the prerequisite checks, the parent's start and the summary. Chosen from the first
# H200 run (main.log of benchmarks/results/h200-2026-12-04-265be71-manual), where the whole of each
# suite does not fit: a cap decides what a suite gets to measure, in its own order.
CAPS_S = {
    # `pip install -e .` with nvcc took 22 s.
    "build": 45,
    # `pytest -m gpu -n 8` ran its 251 tests in 39 s; the other ~825 ran to 100% under -n 14 before
    # xdist's teardown hung (their time was lost with it). Failures are logged as they happen, so a
    # cut run still names every failure it saw.
    "tests": 110,
    # Not yet run on a GPU: 1,000 calls of the release-size models at a few blocks and one DiT step
    # each may not fit (it then shows as a timeout). On the 2-core CPU the tiny models took 47 s for
    # the smoke mode's 200 calls and 220 s for 1,000. Taken from the kernels stage, whose goal cases
    # run first.
    "soak": 60,
    # No full run yet. Kelix-Tok at both sizes and two 64-block generate calls took 21 s at release
    # scale (kf_stages.json); the reference path's 324-block and text-to-image calls take tens of
    # seconds each, so the whole suite needs several minutes.
    "pipeline": 90,
    # Batches 1 and 32 took 84 s (process, roofline, model, 5 variants each); batch 8 costs about as
    # much as batch 1. Batch 128 (35 prefills of 131k tokens, ~150 s) does not fit and is recorded
    # as the point in flight when the cap kills the stage.
    "generation": 125,
    # The full suite needs over 200 s (decode_attention and 8 attention points alone took 203 s);
    # 90 s since the soak stage took 60 of its former 150 s;
    # the goals' cases run first (goals.kernel_cases) and the reference backend is not timed.
    "kernels": 90,
}
# The CPU smoke mode on a 2-core CI machine (kernels 21 s, generation 7 s, pipeline 4 s measured):
# caps that only stop a hung stage.
SMOKE_CAPS_S = dict.fromkeys(STAGES, 300)
# Per point (run --point-timeout): long enough for a Triton or FlexAttention compile in a kernels
# measurement's first call (a measurement is about 1 s: 5 warm-up calls, then 0.5 s of calls); a
# pipeline point gets its warm-up and probe calls of a few seconds each.
POINT_TIMEOUT_S = {"kernels": 20.0, "pipeline": 15.0}
# The native build, as README says: the environment's torch, pybind11 and CMake, nothing downloaded.
BUILD = ("pip", "install", "--no-build-isolation", "--no-deps", "-e", ".")
GENERATION_BATCHES = "1,8,32,128"
# On a GPU the kernels stage times the fast backends only: the torch backend is the reference every
# backend is checked against (computed anyway), and timing it costs up to 1.2 s per call.
GPU_BACKENDS = ("triton", "cuda")
# The smoke mode's test run: a few fast tests that prove the stage's plumbing (xdist, the log, the
# JUnit XML), not the suite (CI runs the suite just before).
SMOKE_TESTS = (
    "tests/benchmarks/test_harness.py::test_rotating_sets_exceed_twice_l2",
    "tests/benchmarks/test_harness.py::test_head_select_formulas_at_m_32",
)
SMOKE_WORKERS = 2
SOAK_TESTS = "tests/soak"
SOAK_QUICK_CALLS = 200


# --------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser, positive: Callable[[str], float]) -> None:
    """The ``pass`` subcommand's options (``run.parse_args`` registers it)."""
    parser.add_argument(
        "--stages",
        type=_stages,
        default=None,
        help=f"comma-separated subset of {','.join(STAGES)} (default: all; with --cpu all but build)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes (goals not measured)")
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="CPU smoke mode (needs --quick): a small test run, never writes under results/",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for the run (default: benchmarks/results/<device>-<date>-<commit>/ on a GPU, "
        "a new temporary folder with --quick)",
    )
    parser.add_argument(
        "--cap-scale",
        type=positive,
        default=1.0,
        metavar="FACTOR",
        help="multiply every stage cap (a slower GPU than the H200)",
    )


def _stages(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--stages must be among {list(STAGES)}, got {text!r}")
    return tuple(stage for stage in STAGES if stage in names)  # always in pipeline order


@dataclass(frozen=True)
class Plan:
    """What this pass runs, where, under which caps."""

    stages: tuple[str, ...]
    cpu: bool
    quick: bool
    out: Path
    caps_s: dict[str, float]
    workers: int


def refuse(args: argparse.Namespace) -> None:
    """``run.Refused`` for options that could pass CPU or tiny-shape numbers off as GPU results."""
    run.refuse_cpu_results(args.cpu, args.quick, args.out)
    if args.quick and args.out is not None and args.out.resolve().is_relative_to(run.RESULTS_DIR):
        raise run.Refused(f"{run.RESULTS_DIR} holds full GPU runs; write a --quick run elsewhere")


def chosen_stages(args: argparse.Namespace) -> tuple[str, ...]:
    """``--stages``, or every stage (in the smoke mode every stage but the build)."""
    return args.stages or tuple(s for s in STAGES if not (args.cpu and s == "build"))


def make_plan(args: argparse.Namespace, env: dict[str, Any]) -> Plan:
    """The plan of options :func:`refuse` accepted, on the machine ``env`` describes."""
    if args.out is not None:
        out = args.out
    elif args.quick:
        out = Path(tempfile.mkdtemp(prefix="kelix-pass-"))
    else:
        out = _new_folder(run.RESULTS_DIR, run_name(env))
    caps = SMOKE_CAPS_S if args.cpu else CAPS_S
    return Plan(
        stages=chosen_stages(args),
        cpu=args.cpu,
        quick=args.quick,
        out=out,
        caps_s={stage: cap * args.cap_scale for stage, cap in caps.items()},
        workers=SMOKE_WORKERS if args.cpu else os.cpu_count() or 1,
    )


def run_name(env: dict[str, Any]) -> str:
    """``<device>-<date>-<commit>``, e.g. ``nvidia-h200-2026-12-04-265be71``; ``-dirty`` when the
    tree had uncommitted changes."""
    device = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    commit = (env["commit"] or "unknown")[:7]
    return f"{device}-{env['timestamp'][:10]}-{commit}" + ("-dirty" if env["dirty"] else "")


def _new_folder(parent: Path, name: str) -> Path:
    """``parent/name``, or ``name-2``, ``name-3``...: a run never overwrites another."""
    path, n = parent / name, 1
    while path.exists():
        n += 1
        path = parent / f"{name}-{n}"
    return path


# --------------------------------------------------------------------------- prerequisites


@dataclass(frozen=True)
class Prerequisite:
    """Something a stage needs from the machine, how to tell it is there, and what to do if not."""

    name: str
    stages: frozenset[str]
    present: Callable[[], bool]
    remedy: str


def _program(name: str) -> Callable[[], bool]:
    return lambda: shutil.which(name) is not None


def _module(name: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(name) is not None


PREREQUISITES = (
    Prerequisite(
        "nvcc",
        frozenset({"build"}),
        _program("nvcc"),
        "the native build needs the CUDA compiler on PATH (export PATH=/usr/local/cuda/bin:$PATH)",
    ),
    Prerequisite(
        "cmake",
        frozenset({"build"}),
        _program("cmake"),
        "the native build runs CMake: pip install cmake",
    ),
    Prerequisite(
        "pybind11",
        frozenset({"build"}),
        _module("pybind11"),
        "--no-build-isolation builds with this environment's pybind11: pip install pybind11",
    ),
    Prerequisite(
        "diffusers",
        frozenset({"tests", "pipeline"}),
        _module("diffusers"),
        'bring the wheel: see README ("Benchmarks on a GPU machine without network")',
    ),
    Prerequisite("pytest", frozenset({"tests"}), _module("pytest"), "pip install pytest"),
    Prerequisite(
        "pytest-xdist", frozenset({"tests"}), _module("xdist"), "pip install pytest-xdist"
    ),
)
GPU_PREREQUISITE = Prerequisite(
    "a CUDA device",
    frozenset(STAGES),
    lambda: torch.cuda.is_available(),
    "torch sees no CUDA device; a GPU pass runs on one (`--cpu --quick` is the CPU smoke mode)",
)


def missing_prerequisites(stages: tuple[str, ...], cpu: bool) -> list[str]:
    """``name: remedy`` for each prerequisite of ``stages`` that this machine lacks."""
    needed = [*PREREQUISITES, *([] if cpu else [GPU_PREREQUISITE])]
    return [
        f"{p.name}: {p.remedy}" for p in needed if p.stages.intersection(stages) and not p.present()
    ]


# --------------------------------------------------------------------------- stages


@dataclass
class StageResult:
    """What one stage did. ``failures``: a failing test or a disagreeing record, one line each;
    ``notes``: timeouts and other lines worth reading that are not failures."""

    name: str
    status: str  # ok | failed | error | timeout
    seconds: float
    cap_s: float
    detail: str
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _run_capped(
    command: list[str], log: Path, cap_s: float, env: dict[str, str] | None = None
) -> tuple[int | None, float]:
    """Run ``command`` in the repository (``env`` added to this environment), its output into
    ``log``, in a process group of its own that is killed at ``cap_s`` (xdist workers and compiler
    jobs with it): (exit code, or None when killed at the cap; seconds)."""
    start = time.monotonic()
    with log.open("w") as output:
        output.write(f"$ {shlex.join(command)}\n")
        output.flush()
        child = subprocess.Popen(
            command,
            cwd=environment.REPO,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
        try:
            code: int | None = child.wait(timeout=cap_s)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            if child.poll() is None:  # at the cap, or the pass itself was interrupted
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    return code, time.monotonic() - start


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def build_stage(plan: Plan) -> StageResult:
    """The native part: ``pip install --no-build-isolation --no-deps -e .`` (see README)."""
    log, cap = plan.out / "build.log", plan.caps_s["build"]
    code, seconds = _run_capped([sys.executable, "-m", *BUILD], log, cap)
    if code is None:
        return StageResult("build", "timeout", seconds, cap, f"killed at its cap; see {log.name}")
    if code:
        return StageResult(
            "build",
            "failed",
            seconds,
            cap,
            f"exit code {code}: {_last_line(log)}; see {log.name}",
            failures=[f"build: exit code {code}: {_last_line(log)}"],
        )
    return StageResult("build", "ok", seconds, cap, f"see {log.name}")


def tests_stage(plan: Plan) -> StageResult:
    """The test suite (a small selection in the smoke mode) under xdist, through the outcome log."""
    from benchmarks import pytest_log  # pytest: a prerequisite of this stage only

    out, cap = plan.out, plan.caps_s["tests"]
    log = out / "tests.jsonl"
    command = [sys.executable, "-m", "benchmarks.pytest_log", str(log), "-q", "-rfE"]
    command += [f"-n={plan.workers}", f"--junitxml={out / 'tests.junit.xml'}"]
    # The soak has a stage of its own (on the device under test, under its own cap).
    command += SMOKE_TESTS if plan.cpu else ("-m", "not soak", "tests")
    code, seconds = _run_capped(command, out / "tests.log", cap)
    tally = pytest_log.read(log)
    detail = tally.counts()
    if code is None:
        status = "timeout"
        detail += " when killed at its cap" + (
            " (every test had run: pytest hung at exit)" if tally.finished else ""
        )
    elif tally.failures:
        status = "failed"
    elif code:  # 2-5: interrupted, internal error, usage error, nothing collected
        status = "error"
        detail += f"; pytest exit code {code}: {_last_line(out / 'tests.log')}"
    else:
        status = "ok"
    (out / "tests.txt").write_text(
        "\n".join([f"tests: {status}, {detail}", *(f"FAILED {f}" for f in tally.failures)]) + "\n"
    )
    failures = [f"tests: {f}" for f in tally.failures]
    return StageResult("tests", status, seconds, cap, detail, failures=failures)


def soak_stage(plan: Plan) -> StageResult:
    """tests/soak on the device under test (CUDA, or the CPU in the smoke mode), its memory series
    written to ``soak.json`` for the run folder."""
    out, cap = plan.out, plan.caps_s["soak"]
    series = out / "soak.json"
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", SOAK_TESTS]
    env = {"KELIX_SOAK_JSON": str(series), "KELIX_SOAK_DEVICE": "cpu" if plan.cpu else "cuda"}
    if plan.quick:  # the smoke mode proves the plumbing: 200 calls, checked from call 100 on
        env["KELIX_SOAK_CALLS"] = str(SOAK_QUICK_CALLS)
    code, seconds = _run_capped(command, out / "soak.log", cap, env=env)
    figures = ""
    if series.exists():
        record = json.loads(series.read_text())
        figures = (
            f"RSS +{record['rss_growth_mib']:g} MiB (bound {record['rss_bound_mib']:g})"
            + (
                f", device +{record['device_growth_mib']:.1f} MiB "
                f"(bound {record['device_bound_mib']:g})"
                if record["device_growth_mib"] is not None
                else ""
            )
            + f" from call {record['warmup_calls']} to {record['calls']}; "
        )
    if code is None:
        return StageResult("soak", "timeout", seconds, cap, "killed at its cap; see soak.log")
    if code:
        line = _last_line(out / "soak.log")
        return StageResult(
            "soak", "failed", seconds, cap, f"{figures}{line}; see soak.log", [f"soak: {line}"]
        )
    return StageResult("soak", "ok", seconds, cap, f"{figures}series in soak.json")


def suite_command(plan: Plan, suite: str, json_path: Path) -> list[str]:
    """``python -m benchmarks run`` for one suite of this pass."""
    command = [sys.executable, "-m", "benchmarks", "run", f"--suite={suite}", f"--json={json_path}"]
    command += ["--cpu"] * plan.cpu + ["--quick"] * plan.quick
    if suite in POINT_TIMEOUT_S:
        command += ["--point-timeout", f"{POINT_TIMEOUT_S[suite]:g}"]
    if suite == "generation" and not plan.quick:
        command += ["--batches", GENERATION_BATCHES]
    if suite == "kernels":
        first = goals.kernel_cases()
        order = first + [case for case in all_cases() if case not in first]
        command += ["--cases", ",".join(order)]
        if not plan.cpu:
            command += ["--backends", ",".join(GPU_BACKENDS)]
    return command


def suite_stage(plan: Plan, suite: str) -> StageResult:
    """One ``benchmarks run`` suite in its own process; when it was killed or died, the record its
    progress file holds, the point it was in recorded with the stage's status."""
    json_path, log, cap = plan.out / f"{suite}.json", plan.out / f"{suite}.log", plan.caps_s[suite]
    code, seconds = _run_capped(suite_command(plan, suite, json_path), log, cap)
    if code is not None and json_path.exists():
        status, report = "ok", json.loads(json_path.read_text())
    else:
        status = "timeout" if code is None else "error"
        cause = f"killed at its {cap:g} s cap" if code is None else f"ended ({_last_line(log)})"
        progress = run.progress_path(json_path)
        report = run.recover(progress, status, f"the {suite} stage was {cause} in this point")
        if report is None:
            return StageResult(suite, status, seconds, cap, f"{cause} before its first record")
        run.write_json(report, json_path)
        progress.unlink()
    failures = [
        f"{suite}: {goals.describe(r)}: {r['status']}: {r['reason']}"
        for r in run.disagreements(report)
    ]
    notes = [
        f"{suite}: {goals.describe(r)}: timeout: {r['reason']}"
        for r in report["results"]
        if r["status"] == "timeout"
    ]
    if failures and status == "ok":
        status = "failed"
    # The generation suite's account of the decode step's gap to the floor (its smallest batch).
    account = decode_terms.account_summary(report["results"]) if suite == "generation" else ""
    detail = "; ".join(
        filter(None, [_status_counts(report["results"]), account, f"see {log.name}"])
    )
    return StageResult(suite, status, seconds, cap, detail, failures, notes)


def _status_counts(records: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no records"


def run_stage(plan: Plan, stage: str) -> StageResult:
    """Run one stage, printing a line when it starts and one when it ends."""
    print(f"== {stage} (cap {plan.caps_s[stage]:g} s)", flush=True)
    if stage == "build":
        result = build_stage(plan)
    elif stage == "tests":
        result = tests_stage(plan)
    elif stage == "soak":
        result = soak_stage(plan)
    else:
        result = suite_stage(plan, stage)
    print(f"   {result.status} in {result.seconds:.0f} s: {result.detail}", flush=True)
    return result


# --------------------------------------------------------------------------- summary


def summary(env: dict[str, Any], results: list[StageResult], outcomes: list[goals.Outcome]) -> str:
    """SUMMARY.md: the run, its stages, every failure and timeout, the goal table."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    commit = (env["commit"] or "unknown")[:7] + (" (uncommitted changes)" if env["dirty"] else "")
    total = sum(r.seconds for r in results)
    lines = [
        f"# `benchmarks pass`: {env['device']}, commit {commit}, {env['timestamp']}",
        "",
        f"`python -m benchmarks {shlex.join(sys.argv[1:])}`; {versions}; {total:.0f} s of stages.",
        "",
        "| stage | status | seconds | cap | detail |",
        "| --- | --- | --- | --- | --- |",
        *(
            f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.cap_s:g} | {r.detail} |"
            for r in results
        ),
    ]
    for title, items in (
        ("Failures", [f for r in results for f in r.failures]),
        ("Timeouts", [n for r in results for n in r.notes]),
    ):
        lines += [
            "",
            f"## {title} ({len(items)})",
            "",
            *(f"- {item}" for item in items or ["none"]),
        ]
    lines += ["", "## Goals", "", goals.outcome_table(outcomes)]
    return "\n".join(lines) + "\n"


def _pass_record(
    env: dict[str, Any], results: list[StageResult], outcomes: list[goals.Outcome]
) -> dict[str, Any]:
    """pass.json: the run's environment, its stages and the goal figures."""
    return {
        **env,
        "argv": sys.argv,
        "stages": [asdict(r) for r in results],
        "goals": [
            {
                "id": o.goal.id,
                "target": o.goal.target,
                "unit": o.goal.unit,
                "at_most": o.goal.at_most,
                "measured": o.measured,
                "ratio": o.ratio,
                "met": o.met,
                "why_not": o.why_not,
            }
            for o in outcomes
        ],
    }


# --------------------------------------------------------------------------- main


def main(args: argparse.Namespace) -> int:
    try:
        refuse(args)
    except run.Refused as err:
        print(f"benchmarks pass: refused: {err}", file=sys.stderr)
        return 2
    missing = missing_prerequisites(chosen_stages(args), args.cpu)
    if missing:
        print("benchmarks pass: missing prerequisites, nothing started:", file=sys.stderr)
        for line in missing:
            print(f"  {line}", file=sys.stderr)
        return 2
    env = environment.describe(torch.device("cpu" if args.cpu else "cuda"))
    plan = make_plan(args, env)
    plan.out.mkdir(parents=True, exist_ok=True)
    print(f"benchmarks pass: stages {','.join(plan.stages)} -> {plan.out}", flush=True)
    results = [run_stage(plan, stage) for stage in plan.stages]
    records = goals.suite_records(plan.out)
    outcomes = goals.evaluate({suite: records[suite] for suite in plan.stages if suite in records})
    (plan.out / "SUMMARY.md").write_text(summary(env, results, outcomes))
    run.write_json(_pass_record(env, results, outcomes), plan.out / goals.PASS_RECORD)
    if plan.out.resolve().is_relative_to(run.RESULTS_DIR):
        goals.update_latest(run.RESULTS_DIR / "README.md", run.RESULTS_DIR)
    failures = [f for r in results for f in r.failures]
    print("\n".join(["", f"wrote {plan.out}", *(f"FAILED {f}" for f in failures), ""]))
    print(goals.outcome_table(outcomes))
    broken = failures or any(r.status in ("failed", "error") for r in results)
    return 1 if broken else 0
