"""The harness: ``python -m benchmarks run --suite kernels [--json PATH] [--backends ...] [--cases ...]``,
``python -m benchmarks run --suite generation [--json PATH] [--batches ...]``,
``python -m benchmarks run --suite pipeline [--json PATH]``, and ``python -m benchmarks pass``
(benchmarks/passes.py: build, tests and every suite in one capped command).

Kernels suite: for every case, point and backend it verifies the backend's output against the
reference (``backend="torch"``) before timing, records a backend that cannot run as ``"unavailable"``
with the reason (never a substitute), times the official-style baseline in the same run, and relates
everything to the roofline measured in the same run. Generation suite (benchmarks/generation.py): time
per image block of the official-style loop, kelix_fast eager and kelix_fast with CUDA graphs, against
the same roofline. Pipeline suite (benchmarks/pipeline.py): the end-to-end stages (Kelix-Tok, the DiT
steps) at full scale. ``--cpu --quick`` is the harness's CPU smoke mode: it times the CPU path and is
marked ``"device": "cpu"``; GPU numbers only ever come from a CUDA device.

With ``--json PATH`` every suite also writes its progress, flushed line by line, to
:func:`progress_path` (the header, each point as it starts, each record as it ends), so that a run
killed from outside (``benchmarks pass`` kills a stage at its cap) leaves what it measured and names
the point it was in (:func:`recover`). ``--point-timeout`` caps each measurement of the kernels suite
(benchmarks/timing.py) and each point of the pipeline suite.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch

from benchmarks import environment, generation, roofline, timing
from benchmarks.cases import BaselineUnavailable, Case, Point, Tensors, all_cases
from kelix_fast import ops

SCHEMA_VERSION = 1
RESULTS_DIR = environment.REPO / "benchmarks" / "results"
BACKENDS = ("torch", "triton", "cuda")
SUITES = ("kernels", "generation", "pipeline")
# The suites each suite-specific option applies to; giving it to another suite is an error. The
# generation suite times whole generate calls (benchmarks/generation.py), which a cooperative cap
# cannot cut short: `benchmarks pass` caps its stage instead.
SUITE_OPTIONS = {
    "backends": ("kernels",),
    "cases": ("kernels",),
    "batches": ("generation",),
    "point_timeout": ("kernels", "pipeline"),
}
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


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from benchmarks import passes  # it imports this module

    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    passes.add_arguments(
        commands.add_parser(
            "pass",
            help=passes.HELP,
            description=passes.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        ),
        positive=_positive,
    )
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
    run.add_argument(
        "--point-timeout",
        type=_positive,
        metavar="SECONDS",
        help="kernels suite: cap on each measurement (a backend or baseline at one point), from "
        "its first call; pipeline suite: cap on each point. Past it the point is recorded as "
        '"timeout" (default: no cap)',
    )
    run.add_argument("--quick", action="store_true", help="tiny shapes and few repetitions")
    run.add_argument(
        "--cpu", action="store_true", help="CPU smoke mode of the harness (needs --quick)"
    )
    args = parser.parse_args(argv)
    if args.command == "run":
        for option, suites in SUITE_OPTIONS.items():
            if getattr(args, option) is not None and args.suite not in suites:
                flag = "--" + option.replace("_", "-")
                parser.error(f"{flag} does not apply to the {args.suite} suite")
    return args


def refuse_cpu_results(cpu: bool, quick: bool, path: Path | None) -> None:
    """The CPU smoke mode runs the ``--quick`` shapes only and never writes under ``results/``."""
    if not cpu:
        return
    if not quick:
        raise Refused("--cpu runs the --quick shapes only (full Kelix shapes are GPU work)")
    if path is not None and path.resolve().is_relative_to(RESULTS_DIR):
        raise Refused(f"{RESULTS_DIR} holds GPU results only; write the CPU smoke run elsewhere")


def pick_device(args: argparse.Namespace) -> torch.device:
    """The CUDA device, or the CPU in smoke mode; refuse anything that could pass CPU time as GPU time."""
    refuse_cpu_results(args.cpu, args.quick, args.json)
    if args.cpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise Refused(NO_CUDA.format(suite=args.suite))
    return torch.device("cuda", torch.cuda.current_device())


def progress_path(json_path: Path) -> Path:
    """The progress file of a run whose record goes to ``json_path``: ``<stem>.progress.jsonl`` beside it."""
    return json_path.with_name(json_path.stem + ".progress.jsonl")


class Progress:
    """Writes a run's progress file, one JSON object per line, each flushed as it is written:
    ``{"header": ...}`` (the record's header and roofline), ``{"start": point}`` when a point starts
    (its identifying fields) and ``{"record": ...}`` for each record it yields. Without a file (no
    ``--json``) it writes nothing."""

    def __init__(self, file: IO[str] | None) -> None:
        self._file = file

    def header(self, report: dict[str, Any]) -> None:
        self._write({"header": report})

    def start(self, point: dict[str, Any]) -> None:
        self._write({"start": point})

    def records(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._write({"record": record})

    def _write(self, entry: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(entry) + "\n")
            self._file.flush()  # a kill loses nothing written before it


NO_PROGRESS = Progress(None)


@contextmanager
def progress_file(path: Path | None) -> Iterator[Progress]:
    """A :class:`Progress` writing to ``path`` (none when None). The file is removed when the block
    ends normally (the final record holds all of it) and kept when it raises."""
    if path is None:
        yield NO_PROGRESS
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as file:
        yield Progress(file)
    path.unlink()


def recover(path: Path, status: str, reason: str) -> dict[str, Any] | None:
    """The record a run left in its progress file when it was cut: its header, every record it
    finished, and the point it was in (started, no record yet) as one more record with ``status``
    and ``reason``; ``"incomplete"`` says why. None when the run ended before its header."""
    report: dict[str, Any] | None = None
    results: list[dict[str, Any]] = []
    in_flight: dict[str, Any] | None = None
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # the last line, cut by the kill
            break
        if "header" in entry:
            report = entry["header"]
        elif "start" in entry:
            in_flight = entry["start"]
        elif "record" in entry:
            results.append(entry["record"])
            in_flight = None
    if report is None:
        return None
    if in_flight is not None:
        results.append(in_flight | {"status": status, "reason": reason})
    return report | {"results": results, "incomplete": reason}


def _auto_choice(case: Case, point: Point, inputs: Tensors) -> str:
    try:
        return ops.resolve_backend(point.get("op", case.name), "auto", *case.probe(inputs))
    except ops.BackendUnavailableError as err:
        return f"unavailable: {err}"


class _Runner:
    """Runs every point of a suite on one device, keeping one shared-tensor set alive at a time."""

    def __init__(
        self,
        device: torch.device,
        budget: timing.Budget,
        roof: dict[str, Any],
        point_timeout_s: float | None = None,
    ):
        self.device = device
        self.budget = budget
        self.roof = roof
        self.point_timeout_s = point_timeout_s
        self.on_gpu = device.type == "cuda"
        self.timer = timing.time_cuda if self.on_gpu else timing.time_cpu
        self.l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size if self.on_gpu else 0
        self._shared: tuple[tuple, Tensors] | None = None
        self._baselines: dict[tuple, dict[str, Any]] = {}

    def deadline(self) -> timing.Deadline:
        """The cap of one measurement, counted from now (its verification call included)."""
        if self.point_timeout_s is None:
            return timing.NO_DEADLINE
        return timing.Deadline(self.point_timeout_s)

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
        deadline = self.deadline()
        mismatch = case.check(point, fn(point, sets[0], shared), want)
        record = {"name": name, "matches_reference": mismatch is None, "mismatch": mismatch}
        try:
            deadline.check("the verification call")
            times = self.timer(lambda s: fn(point, s, shared), sets, self.budget, deadline)
        except timing.PointTimeout as err:
            return record | {"status": "timeout", "reason": str(err)}
        return record | {"status": "ok", **timing.summarize(times)}

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
        deadline = self.deadline()
        try:
            got = case.run(point, sets[0], backend)
        except ops.BackendUnavailableError as err:
            return record | {"status": "unavailable", "reason": str(err)}
        mismatch = case.check(point, got, want)
        if mismatch is not None:
            return record | {"status": "mismatch", "reason": mismatch}
        record["verified"] = True
        try:
            deadline.check("the verification call")
            raw = self.timer(lambda s: case.run(point, s, backend), sets, self.budget, deadline)
        except timing.PointTimeout as err:
            return record | {"status": "timeout", "reason": str(err)}
        stats = timing.summarize(raw)
        seconds = stats["median_ms"] * 1e-3
        tflops = common["flop"] / seconds / 1e12
        gbps = common["bytes"] / seconds / 1e9
        achieved = tflops if common["roofline"] == "compute" else gbps
        baseline = common["baseline"]
        return record | {
            "status": "ok",
            "reason": None,
            **stats,
            "tflops": tflops,
            "gbps": gbps,
            "roofline_fraction": achieved / common["roofline_value"],
            "speedup": baseline["median_ms"] / stats["median_ms"]
            if baseline["status"] == "ok"
            else None,
        }


def run_suite(
    case_names: list[str],
    backends: list[str],
    device: torch.device,
    *,
    quick: bool,
    point_timeout_s: float | None = None,
    progress: Progress = NO_PROGRESS,
) -> dict[str, Any]:
    """Measure the roofline, then every point of every case on every backend; return the JSON record.

    A point that raises is recorded as ``"error"`` (one record per backend, with the exception) and
    the suite goes on: one broken kernel must not hide the measurements of the others.
    """
    budget = timing.QUICK if quick else timing.FULL
    cases = all_cases()
    report = _header("kernels", device, quick=quick)
    with torch.inference_mode():
        report["roofline"] = roofline.measure(device, budget)
        runner = _Runner(device, budget, report["roofline"], point_timeout_s)
        report["l2_bytes"] = runner.l2_bytes
        progress.header(report)
        results = []
        for name in case_names:
            for point in cases[name].points(quick):
                identity = {"case": name, "shape": point}
                progress.start(identity)
                try:
                    records = runner.point(cases[name], point, backends)
                except Exception as err:  # noqa: BLE001 - recorded, see the docstring
                    reason = f"{type(err).__name__}: {err}"
                    records = [
                        identity | {"backend": b, "status": "error", "reason": reason}
                        for b in backends
                    ]
                progress.records(records)
                results += records
                print(_line(records), flush=True)
    report["results"] = results
    return report


def run_generation(
    device: torch.device,
    *,
    quick: bool,
    batches: list[int] | None,
    progress: Progress = NO_PROGRESS,
) -> dict[str, Any]:
    """Measure the roofline, then the generation suite (benchmarks/generation.py); the JSON record.

    One ``generation.measure`` call per batch size, so that each batch's records reach the progress
    file as soon as they exist (each call builds the same seeded model again); a run cut in a batch
    leaves it as one in-flight point (``"variant": "all"``).
    """
    report = _begin("generation", device, quick=quick)
    progress.header(report)
    results = []
    for batch in generation.make_schedule(quick, batches).batches:
        progress.start({"variant": "all", "shape": {"batch": batch}})
        part = generation.measure(device, report["roofline"], quick=quick, batches=[batch])
        progress.records(part["results"])
        results += part["results"]
        report |= {"model": part["model"], "schedule": part["schedule"]}
    return report | {"results": results, "goals": generation.goals(results)}


def run_pipeline(
    device: torch.device,
    *,
    quick: bool,
    point_timeout_s: float | None = None,
    progress: Progress = NO_PROGRESS,
) -> dict[str, Any]:
    """Measure the roofline, then the pipeline suite (benchmarks/pipeline.py); the JSON record.

    Each point's start and record reach ``progress`` as they happen, so a run cut at its cap keeps
    every finished point and names the one it was in.
    """
    from benchmarks import pipeline  # the whole Kelix pipeline and diffusers: only when asked for

    report = _begin("pipeline", device, quick=quick)
    progress.header(report)
    report |= pipeline.measure(
        device,
        report["roofline"],
        quick=quick,
        point_timeout_s=point_timeout_s,
        on_start=progress.start,
        on_record=lambda record: progress.records([record]),
    )
    return report


def _begin(suite: str, device: torch.device, *, quick: bool) -> dict[str, Any]:
    """The header of a model-level suite, with the roofline measured first."""
    report = _header(suite, device, quick=quick)
    if device.type == "cpu":
        # The smoke mode's tiny tensors: the intra-op thread pool costs more than it saves (as in
        # tests/conftest.py), and on a shared machine several times more.
        torch.set_num_threads(1)
    with torch.inference_mode():
        report["roofline"] = roofline.measure(device, timing.QUICK if quick else timing.FULL)
    return report


def _header(suite: str, device: torch.device, *, quick: bool) -> dict[str, Any]:
    return {
        "schema": SCHEMA_VERSION,
        "suite": suite,
        "quick": quick,
        "argv": sys.argv,
        **environment.describe(device),
    }


def _ms(record: dict[str, Any]) -> str:
    """A baseline's time, or its status and reason."""
    if record["status"] == "ok":
        return f"{record['median_ms']:.3f} ms"
    return f"{record['status']}: {record['reason']}"


def _line(records: list[dict[str, Any]]) -> str:
    head = records[0]
    shape = ",".join(f"{k}={v}" for k, v in head["shape"].items())
    if "baseline" not in head:  # the point raised before any record was made
        return f"{head['case']} [{shape}] {head['status']}: {head['reason']}"
    cells = [f"{head['case']} [{shape}] baseline {_ms(head['baseline'])}"]
    cells += [f"  {other['name']} {_ms(other)}" for other in head["other_baselines"]]
    for r in records:
        if r["status"] == "ok":
            speedup = "-" if r["speedup"] is None else f"x{r['speedup']:.1f}"
            cells.append(
                f"  {r['backend']:6} {r['median_ms']:9.3f} ms  {r['tflops']:8.2f} TFLOP/s "
                f"{r['gbps']:8.1f} GB/s  {100 * r['roofline_fraction']:5.1f}% of {r['roofline']}"
                f"  {speedup}"
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


def _measure(args: argparse.Namespace, device: torch.device, progress: Progress) -> dict[str, Any]:
    """The JSON record of the suite ``args`` ask for."""
    if args.suite == "generation":
        return run_generation(device, quick=args.quick, batches=args.batches, progress=progress)
    if args.suite == "pipeline":
        return run_pipeline(
            device, quick=args.quick, point_timeout_s=args.point_timeout, progress=progress
        )
    return run_suite(
        args.cases or list(all_cases()),
        args.backends or list(BACKENDS),
        device,
        quick=args.quick,
        point_timeout_s=args.point_timeout,
        progress=progress,
    )


def disagreements(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The records whose output disagreed with the reference or that failed."""
    return [r for r in report["results"] if r["status"] in ("mismatch", "error")]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "pass":
        from benchmarks import passes

        return passes.main(args)
    try:
        device = pick_device(args)
    except Refused as err:
        print(f"benchmarks: refused: {err}", file=sys.stderr)
        return 2
    progress_to = None if args.json is None else progress_path(args.json)
    with progress_file(progress_to) as progress:
        report = _measure(args, device, progress)
        if args.json is not None:
            write_json(report, args.json)
            print(f"wrote {args.json}")
    return 1 if disagreements(report) else 0
