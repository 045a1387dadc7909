"""The harness: ``python -m benchmarks run --suite kernels [--json PATH] [--backends ...] [--cases ...]``
and ``python -m benchmarks run --suite generation [--json PATH] [--batches ...]``.

Kernels suite: for every case, point and backend it verifies the backend's output against the
reference (``backend="torch"``) before timing, records a backend that cannot run as ``"unavailable"``
with the reason (never a substitute), times the official-style baseline in the same run, and relates
everything to the roofline measured in the same run. Generation suite (benchmarks/generation.py): time
per image block of the official-style loop, kelix_fast eager and kelix_fast with CUDA graphs, against
the same roofline. ``--cpu --quick`` is the harness's CPU smoke mode: it times the CPU path and is
marked ``"device": "cpu"``; GPU numbers only ever come from a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks import environment, generation, roofline, timing
from benchmarks.cases import BaselineUnavailable, Case, Point, Tensors, all_cases
from kelix_fast import ops

SCHEMA_VERSION = 1
RESULTS_DIR = environment.REPO / "benchmarks" / "results"
BACKENDS = ("torch", "triton", "cuda")
SUITES = ("kernels", "generation")
NO_CUDA = (
    "the {suite} suite measures GPU work and needs a CUDA device, and torch sees none here; "
    "`--cpu --quick` runs the CPU smoke mode of the harness (never GPU numbers)"
)


class Refused(Exception):
    """The run cannot be made as asked; the message says why."""


def _csv(allowed: tuple[str, ...] | list[str], what: str):
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{what} must be among {list(allowed)}, got {text!r}")
        return names

    return parse


def _batches(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--batches must be positive integers, got {text!r}")
    return sizes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a benchmark suite")
    run.add_argument("--suite", choices=SUITES, default="kernels")
    run.add_argument("--json", type=Path, help="write the run's JSON record here")
    run.add_argument(
        "--backends", type=_csv(BACKENDS, "--backends"), help="kernels suite (default: all)"
    )
    names = list(all_cases())
    run.add_argument("--cases", type=_csv(names, "--cases"), help="kernels suite (default: all)")
    run.add_argument(
        "--batches",
        type=_batches,
        help="generation suite: batch sizes (default: 1,8,32,128; --quick: 1,2)",
    )
    run.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions")
    run.add_argument(
        "--cpu", action="store_true", help="CPU smoke mode of the harness (needs --quick)"
    )
    args = parser.parse_args(argv)
    wrong = ["--batches"] if args.suite == "kernels" else ["--backends", "--cases"]
    for flag in wrong:
        if getattr(args, flag[2:]) is not None:
            parser.error(f"{flag} does not apply to the {args.suite} suite")
    return args


def pick_device(args: argparse.Namespace) -> torch.device:
    """The CUDA device, or the CPU in smoke mode; refuse anything that could pass CPU time as GPU time."""
    if args.cpu:
        if not args.quick:
            raise Refused("--cpu runs the --quick shapes only (full Kelix shapes are GPU work)")
        if args.json is not None and args.json.resolve().is_relative_to(RESULTS_DIR):
            raise Refused(
                f"{RESULTS_DIR} holds GPU results only; write the CPU smoke run elsewhere"
            )
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise Refused(NO_CUDA.format(suite=args.suite))
    return torch.device("cuda", torch.cuda.current_device())


def _auto_choice(case: Case, point: Point, inputs: Tensors) -> str:
    try:
        return ops.resolve_backend(point.get("op", case.name), "auto", *case.probe(inputs))
    except ops.BackendUnavailableError as err:
        return f"unavailable: {err}"


class _Runner:
    """Runs every point of a suite on one device, keeping one shared-tensor set alive at a time."""

    def __init__(self, device: torch.device, budget: timing.Budget, roof: dict[str, Any]):
        self.device = device
        self.budget = budget
        self.roof = roof
        self.on_gpu = device.type == "cuda"
        self.timer = timing.time_cuda if self.on_gpu else timing.time_cpu
        self.l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size if self.on_gpu else 0
        self._shared: tuple[tuple, Tensors] | None = None
        self._baselines: dict[tuple, dict[str, Any]] = {}

    def shared(self, case: Case, point: Point) -> Tensors:
        key = (case.name, *(point[k] for k in case.shared_key))
        if self._shared is None or self._shared[0] != key:
            self._shared = None  # free the previous tables before building the next ones
            self._shared = (key, case.make_shared(point, self.device))
        return self._shared[1]

    def baseline(self, case: Case, point: Point, sets: list[Tensors], shared: Tensors, want):
        key = (case.name, *(point[k] for k in case.baseline_key))
        if key not in self._baselines:
            self._baselines[key] = self._time_baseline(
                "official_eager", case.baseline, point, sets, shared, want, case
            )
        return self._baselines[key]

    def other_baselines(self, case: Case, point: Point, sets, shared, want) -> list[dict[str, Any]]:
        records = []
        for name, fn in case.other_baselines.items():
            try:
                records.append(self._time_baseline(name, fn, point, sets, shared, want, case))
            except BaselineUnavailable as err:
                records.append({"name": name, "status": "unavailable", "reason": str(err)})
        return records

    def _time_baseline(self, name, fn, point, sets, shared, want, case) -> dict[str, Any]:
        mismatch = case.check(point, fn(point, sets[0], shared), want)
        times = self.timer(lambda s: fn(point, s, shared), sets, self.budget)
        return {
            "name": name,
            "status": "ok",
            "matches_reference": mismatch is None,
            "mismatch": mismatch,
            **timing.summarize(times),
        }

    def point(self, case: Case, point: Point, backends: list[str]) -> list[dict[str, Any]]:
        shared = self.shared(case, point)
        call_bytes, call_flops = case.bytes(point), case.flops(point)
        count = timing.rotating_sets(call_bytes, self.l2_bytes) if self.on_gpu else 1
        sets = [case.make_inputs(point, shared, 1 + i) for i in range(count)]
        want = case.run(point, sets[0], "torch")
        base = self.baseline(case, point, sets, shared, want)
        roof_name = point.get("roof", case.roof)
        roof_value = (
            self.roof["matmul_tflops"][point["dtype"]]
            if roof_name == "compute"
            else self.roof["copy_gbps"]
        )
        common = {
            "case": case.name,
            "shape": point,
            "auto_choice": _auto_choice(case, point, sets[0]),
            "flop": call_flops,
            "bytes": call_bytes,
            "l2": "cold" if self.on_gpu else "n/a (cpu)",
            "rotating_sets": count,
            "cuda_graph": False,
            "roofline": roof_name,
            "roofline_value": roof_value,
            "baseline": base,
            "other_baselines": self.other_baselines(case, point, sets, shared, want),
        }
        return [self._backend(case, point, backend, sets, want, common) for backend in backends]

    def _backend(self, case, point, backend, sets, want, common) -> dict[str, Any]:
        record: dict[str, Any] = {**common, "backend": backend, "verified": False}
        if backend == "triton" and self.device.type != "cuda":
            # Triton on CPU is its interpreter: a correctness tool at milliseconds per program, whose
            # timings would mean nothing.
            reason = f"triton on {self.device.type} runs only in its interpreter (not timed)"
            return record | {"status": "unavailable", "reason": reason}
        try:
            got = case.run(point, sets[0], backend)
        except ops.BackendUnavailableError as err:
            return record | {"status": "unavailable", "reason": str(err)}
        mismatch = case.check(point, got, want)
        if mismatch is not None:
            return record | {"status": "mismatch", "reason": mismatch}
        stats = timing.summarize(
            self.timer(lambda s: case.run(point, s, backend), sets, self.budget)
        )
        seconds = stats["median_ms"] * 1e-3
        tflops = common["flop"] / seconds / 1e12
        gbps = common["bytes"] / seconds / 1e9
        achieved = tflops if common["roofline"] == "compute" else gbps
        return record | {
            "status": "ok",
            "reason": None,
            "verified": True,
            **stats,
            "tflops": tflops,
            "gbps": gbps,
            "roofline_fraction": achieved / common["roofline_value"],
            "speedup": common["baseline"]["median_ms"] / stats["median_ms"],
        }


def run_suite(
    case_names: list[str], backends: list[str], device: torch.device, *, quick: bool
) -> dict[str, Any]:
    """Measure the roofline, then every point of every case on every backend; return the JSON record."""
    budget = timing.QUICK if quick else timing.FULL
    cases = all_cases()
    report = _header("kernels", device, quick=quick)
    with torch.inference_mode():
        report["roofline"] = roofline.measure(device, budget)
        runner = _Runner(device, budget, report["roofline"])
        report["l2_bytes"] = runner.l2_bytes
        results = []
        for name in case_names:
            for point in cases[name].points(quick):
                results += runner.point(cases[name], point, backends)
                print(_line(results[-len(backends) :]), flush=True)
    report["results"] = results
    return report


def run_generation(
    device: torch.device, *, quick: bool, batches: list[int] | None
) -> dict[str, Any]:
    """Measure the roofline, then the generation suite (benchmarks/generation.py); the JSON record."""
    report = _header("generation", device, quick=quick)
    if device.type == "cpu":
        # The smoke mode's tiny tensors: the intra-op thread pool costs more than it saves (as in
        # tests/conftest.py), and on a shared machine several times more.
        torch.set_num_threads(1)
    with torch.inference_mode():
        report["roofline"] = roofline.measure(device, timing.QUICK if quick else timing.FULL)
    report.update(generation.measure(device, report["roofline"], quick=quick, batches=batches))
    return report


def _header(suite: str, device: torch.device, *, quick: bool) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "suite": suite,
        "quick": quick,
        "argv": sys.argv,
        **environment.describe(device),
    }


def _line(records: list[dict[str, Any]]) -> str:
    head = records[0]
    shape = ",".join(f"{k}={v}" for k, v in head["shape"].items())
    cells = [f"{head['case']} [{shape}] baseline {head['baseline']['median_ms']:.3f} ms"]
    for other in head["other_baselines"]:
        if other["status"] == "ok":
            cells.append(f"  {other['name']} {other['median_ms']:.3f} ms")
        else:
            cells.append(f"  {other['name']} unavailable: {other['reason']}")
    for r in records:
        if r["status"] == "ok":
            cells.append(
                f"  {r['backend']:6} {r['median_ms']:9.3f} ms  {r['tflops']:8.2f} TFLOP/s "
                f"{r['gbps']:8.1f} GB/s  {100 * r['roofline_fraction']:5.1f}% of {r['roofline']}"
                f"  x{r['speedup']:.1f}"
            )
        else:
            cells.append(f"  {r['backend']:6} {r['status']}: {r['reason']}")
    return "\n".join(cells)


def write_json(report: dict[str, Any], path: Path) -> None:
    """Write atomically (a ``.tmp`` beside it, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        device = pick_device(args)
    except Refused as err:
        print(f"benchmarks: refused: {err}", file=sys.stderr)
        return 2
    if args.suite == "generation":
        report = run_generation(device, quick=args.quick, batches=args.batches)
    else:
        cases, backends = args.cases or list(all_cases()), args.backends or list(BACKENDS)
        report = run_suite(cases, backends, device, quick=args.quick)
    if args.json is not None:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    failed = [r for r in report["results"] if r["status"] in ("mismatch", "error")]
    return 1 if failed else 0
