"""The goal table: every performance goal of kelix_fast, each read off one suite's JSON record.

A :class:`Goal` has an id, its words, a target with a unit, a direction, and a reader that takes the
suite's record and returns the measured value or raises :class:`NotMeasured`. ``ratio`` is oriented
so that ``ratio >= 1`` always means met: measured / target for an "at least" goal, target / measured
for an "at most" one.

Rules of the readers:

* Only a full run counts: a ``--quick`` record (tiny shapes) measures no goal.
* Kernels: kelix_fast's figure at a point is the record of the backend ``backend="auto"`` picks there
  (``auto_choice``), i.e. what the engine runs. A goal over several points takes the worst of them,
  and is measured only when every full-shape point it names (``points(False)`` of its case) has that
  record with status ``ok``: a point that timed out, failed or never ran makes the goal "not
  measured", never a figure from the points that did run.
* Generation: the ``cuda_graphs`` variant (the engine's decode loop) at the named batch and scoring.
* Pipeline: the ``engine`` variant of the stage and shape :data:`benchmarks.pipeline.GOALS` names.

``benchmarks/README.md`` ("Goals") holds :func:`readme_table` verbatim (tests/benchmarks/test_pass.py
checks it). :func:`update_latest` keeps the table of the newest figure per goal in
``benchmarks/results/README.md``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import pipeline
from benchmarks.cases import all_cases

Report = Mapping[str, Any]
Record = dict[str, Any]


class NotMeasured(Exception):
    """Why a run holds no figure for a goal (the message)."""


@dataclass(frozen=True)
class Goal:
    """One target. ``unit`` follows the number (``"x"`` units are written without a space)."""

    id: str
    suite: str
    text: str
    target: float
    unit: str
    at_most: bool  # met when measured <= target; otherwise when measured >= target
    read: Callable[[Report], float]
    case: str | None = None  # the kernels case it reads

    @property
    def target_text(self) -> str:
        return f"{'<=' if self.at_most else '>='} {quantity(self.target, self.unit)}"

    def ratio(self, measured: float) -> float:
        """>= 1 when met."""
        return self.target / measured if self.at_most else measured / self.target


def quantity(value: float, unit: str) -> str:
    """``0.5x copy bandwidth``, ``600 TFLOP/s``: three significant digits and the unit."""
    number = f"{value:.3g}"
    return f"{number}{unit}" if unit.startswith("x") else f"{number} {unit}"


# --------------------------------------------------------------------------- readers


def _full(report: Report) -> list[Record]:
    """The records of a full run (tiny shapes measure no goal)."""
    if report.get("quick"):
        raise NotMeasured("a --quick run (tiny shapes)")
    return report["results"]


def _cut(report: Report) -> str:
    """Why a record may be missing: the run was cut before it."""
    return f"; the run was cut: {report['incomplete']}" if report.get("incomplete") else ""


def _kernel(report: Report, case: str, where: Callable[[Mapping], bool]) -> list[Record]:
    """The ``ok`` record of the auto backend at every full-shape point of ``case`` that ``where``
    picks; :class:`NotMeasured` naming the first point without one."""
    expected = [p for p in all_cases()[case].points(False) if where(p)]
    found = [r for r in _full(report) if r.get("case") == case and where(r["shape"])]
    ok = [r for r in found if r["status"] == "ok" and r["backend"] == r["auto_choice"]]
    if len(ok) == len(expected):
        return ok
    measured = {json.dumps(r["shape"], sort_keys=True) for r in ok}
    lacking = [
        r
        for r in found
        if r["status"] != "ok" and json.dumps(r["shape"], sort_keys=True) not in measured
    ]
    lacking.sort(key=lambda r: r.get("backend") != r.get("auto_choice"))  # the auto record first
    why = f"{len(ok)} of {len(expected)} {case} points measured"
    if lacking:
        why += f"; {describe(lacking[0])}: {lacking[0]['status']}: {lacking[0]['reason']}"
    raise NotMeasured(why + _cut(report))


def _other_ms(record: Record, name: str) -> float:
    """The time of an ``other_baselines`` entry (SDPA, FlexAttention) of a record."""
    other = next((o for o in record["other_baselines"] if o["name"] == name), None)
    if other is None or other["status"] != "ok":
        status = "absent" if other is None else f"{other['status']}: {other['reason']}"
        raise NotMeasured(f"{describe(record)}: {name} {status}")
    return other["median_ms"]


def _speedup(record: Record) -> float:
    if record.get("speedup") is None:
        raise NotMeasured(f"{describe(record)}: no baseline time")
    return record["speedup"]


def _worst(
    case: str, where: Callable[[Mapping], bool], value: Callable[[Record], float]
) -> Callable[[Report], float]:
    """The smallest ``value`` over the points ``where`` picks."""
    return lambda report: min(value(r) for r in _kernel(report, case, where))


def _workload(*names: str, t_min: int = 0, t_max: int = 1 << 30) -> Callable[[Mapping], bool]:
    return lambda p: p["workload"] in names and t_min <= p["T"] <= t_max


_LONG = {"t_min": 4096, "t_max": 16384}  # the "4k-16k" prefill


def _bf16_large(point: Mapping) -> bool:
    return point["dtype"] == "bfloat16" and point["n"] >= 4096


def _block_vs_causal(report: Report) -> float:
    """Block-causal TFLOP/s over causal TFLOP/s at the same packed length."""
    causal = {
        r["shape"]["T"]: r for r in _kernel(report, "attention", _workload("llm_causal", **_LONG))
    }
    block = _kernel(report, "attention", _workload("llm_block_causal", **_LONG))
    return min(r["tflops"] / causal[r["shape"]["T"]]["tflops"] for r in block)


def _dit_step(report: Report) -> float:
    """Official-style time over kelix_fast's, each summed over the DiT attention points."""
    records = _kernel(report, "dit_attention", lambda p: True)
    for r in records:
        _speedup(r)  # every baseline timed
    return sum(r["baseline"]["median_ms"] for r in records) / sum(r["median_ms"] for r in records)


def _decode(report: Report, batch: int, scoring: str) -> Record:
    """The ``ok`` CUDA-graph record of the generation suite at ``batch`` and ``scoring``."""
    for r in _full(report):
        shape = r["shape"]
        if shape.get("batch") != batch or r["variant"] not in ("cuda_graphs", "all"):
            continue
        if r["variant"] == "all":  # the batch the run was cut in
            raise NotMeasured(f"batch {batch}: {r['status']}: {r['reason']}")
        if shape["scoring"] == scoring:
            if r["status"] != "ok":
                raise NotMeasured(f"{describe(r)}: {r['status']}: {r['reason']}")
            return r
    raise NotMeasured(f"batch {batch} not in the run{_cut(report)}")


def _vs_floor(batch: int, scoring: str) -> Callable[[Report], float]:
    def read(report: Report) -> float:
        r = _decode(report, batch, scoring)
        return r["median_ms"] / r["floor_ms"]

    return read


def _over_official(batch: int) -> Callable[[Report], float]:
    return lambda report: _speedup(_decode(report, batch, "full"))


def _pipeline(stage: str, fields: Mapping[str, Any]) -> Callable[[Report], float]:
    """The engine's median time (ms) of a pipeline point."""

    def read(report: Report) -> float:
        found = [
            r
            for r in _full(report)
            if r.get("stage") == stage
            and r["variant"] == "engine"
            and fields.items() <= r["shape"].items()
        ]
        if not found:
            raise NotMeasured(f"{stage} not in the run{_cut(report)}")
        if found[0]["status"] != "ok":
            raise NotMeasured(f"{describe(found[0])}: {found[0]['status']}: {found[0]['reason']}")
        return found[0]["median_ms"]

    return read


# --------------------------------------------------------------------------- the table

_PIPELINE_TEXT = {
    "tok_448px": "Kelix-Tok (`KelixAR.tokenize_images`), one 448 px image (patch grid 32 x 32)",
    "tok_980px": "Kelix-Tok, one 980 px image (patch grid 70 x 70)",
    "dit_50_steps_guidance_1": "DiT sampling, 50 steps at 1024 px, 720 condition rows, guidance 1.0",
    "dit_50_steps_guidance_4.5": "DiT sampling, 50 steps at 1024 px, 720 condition rows, guidance 4.5",
}


GOALS: tuple[Goal, ...] = (
    Goal(
        id="attention.causal_tflops",
        text="`attention` causal prefill, hd 128, 4k and 16k tokens: TFLOP/s (worst point)",
        target=600,
        unit="TFLOP/s",
        at_most=False,
        read=_worst("attention", _workload("llm_causal", **_LONG), lambda r: r["tflops"]),
        suite="kernels",
        case="attention",
    ),
    Goal(
        id="attention.vs_sdpa",
        text="`attention` causal and block-causal prefill, hd 128, 1k-16k tokens: SDPA's time / "
        "kelix_fast's (worst point)",
        target=1.0,
        unit="x",
        at_most=False,
        read=_worst(
            "attention",
            _workload("llm_causal", "llm_block_causal"),
            lambda r: _other_ms(r, "sdpa") / r["median_ms"],
        ),
        suite="kernels",
        case="attention",
    ),
    Goal(
        id="attention.block_causal_vs_causal",
        text="`attention` block-causal (blocks of 9) TFLOP/s over causal TFLOP/s at the same 4k and "
        "16k tokens (worst)",
        target=0.9,
        unit="x",
        at_most=False,
        read=_block_vs_causal,
        suite="kernels",
        case="attention",
    ),
    Goal(
        id="attention.block_causal_vs_flex",
        text="`attention` block-causal prefill, 1k-16k tokens: FlexAttention's time / kelix_fast's "
        "(worst point)",
        target=1.5,
        unit="x",
        at_most=False,
        read=_worst(
            "attention",
            _workload("llm_block_causal"),
            lambda r: _other_ms(r, "flex_attention") / r["median_ms"],
        ),
        suite="kernels",
        case="attention",
    ),
    Goal(
        id="attention.block_decoder_vs_flex",
        text="`attention` packed Block Decoder groups (1,024 and 4,096 x 9 tokens): FlexAttention's "
        "time / kelix_fast's (worst point)",
        target=1.0,
        unit="x",
        at_most=False,
        read=_worst(
            "attention",
            _workload("block_decoder"),
            lambda r: _other_ms(r, "flex_attention") / r["median_ms"],
        ),
        suite="kernels",
        case="attention",
    ),
    Goal(
        id="codebook_argmin.matmul_fraction",
        text="`codebook_argmin` bf16, n >= 4096, exact and reference modes: fraction of the "
        "measured bf16 matmul rate (worst point)",
        target=0.5,
        unit="x bf16 matmul rate",
        at_most=False,
        read=_worst("codebook_argmin", _bf16_large, lambda r: r["roofline_fraction"]),
        suite="kernels",
        case="codebook_argmin",
    ),
    Goal(
        id="codebook_argmin.speedup",
        text="`codebook_argmin` bf16, n >= 4096, both modes: speedup over the official quantizer "
        "loop (worst point)",
        target=20,
        unit="x",
        at_most=False,
        read=_worst("codebook_argmin", _bf16_large, _speedup),
        suite="kernels",
        case="codebook_argmin",
    ),
    Goal(
        id="dit_attention.step_speedup",
        text="`dit_attention` self (linear) + cross attention of a DiT step: official-style time / "
        "kelix_fast's, summed over the points",
        target=3,
        unit="x",
        at_most=False,
        read=_dit_step,
        suite="kernels",
        case="dit_attention",
    ),
    Goal(
        id="dit_attention.cross_vs_sdpa",
        text="`dit_attention` cross-attention (720 condition rows): SDPA's time / kelix_fast's "
        "(worst point)",
        target=1.0,
        unit="x",
        at_most=False,
        read=_worst(
            "dit_attention",
            lambda p: p["op"] == "cross_attention",
            lambda r: _other_ms(r, "sdpa") / r["median_ms"],
        ),
        suite="kernels",
        case="dit_attention",
    ),
    Goal(
        id="decode_attention.bandwidth",
        text="`decode_attention` (cached), context >= 4k: fraction of the measured copy bandwidth "
        "(worst point)",
        target=0.8,
        unit="x copy bandwidth",
        at_most=False,
        read=_worst(
            "decode_attention", lambda p: p["context"] >= 4096, lambda r: r["roofline_fraction"]
        ),
        suite="kernels",
        case="decode_attention",
    ),
    Goal(
        id="block_embed.bandwidth",
        text="`block_embed` B = 32, L = 4096: fraction of the measured copy bandwidth",
        target=0.8,
        unit="x copy bandwidth",
        at_most=False,
        read=_worst(
            "block_embed",
            lambda p: (p["B"], p["L"]) == (32, 4096),
            lambda r: r["roofline_fraction"],
        ),
        suite="kernels",
        case="block_embed",
    ),
    Goal(
        id="generation.b1_floor",
        text="decode, batch 1, CUDA graphs, exact scoring: time per image block / its bandwidth "
        "floor",
        target=1.15,
        unit="x floor",
        at_most=True,
        read=_vs_floor(1, "full"),
        suite="generation",
    ),
    Goal(
        id="generation.b1_structured_floor",
        text="decode, batch 1, CUDA graphs, structured scoring: time per block / its floor",
        target=1.2,
        unit="x floor",
        at_most=True,
        read=_vs_floor(1, "structured"),
        suite="generation",
    ),
    Goal(
        id="generation.b1_speedup",
        text="decode, batch 1, CUDA graphs, exact: speedup over the official-style loop",
        target=5,
        unit="x",
        at_most=False,
        read=_over_official(1),
        suite="generation",
    ),
    Goal(
        id="generation.b32_floor",
        text="decode, batch 32, CUDA graphs, exact: time per block / its floor",
        target=1.3,
        unit="x floor",
        at_most=True,
        read=_vs_floor(32, "full"),
        suite="generation",
    ),
    Goal(
        id="generation.b32_speedup",
        text="decode, batch 32, CUDA graphs, exact: blocks/s over the official-style loop's",
        target=20,
        unit="x",
        at_most=False,
        read=_over_official(32),
        suite="generation",
    ),
    Goal(
        id="generation.b128_floor",
        text="decode, batch 128, CUDA graphs, exact: time per block / its floor",
        target=1.5,
        unit="x floor",
        at_most=True,
        read=_vs_floor(128, "full"),
        suite="generation",
    ),
    *(
        Goal(
            id=f"pipeline.{name}",
            text=_PIPELINE_TEXT[name],
            target=limit_ms,
            unit="ms",
            at_most=True,
            read=_pipeline(stage, fields),
            suite="pipeline",
        )
        for name, stage, fields, limit_ms in pipeline.GOALS
    ),
)


def kernel_cases() -> list[str]:
    """The kernels cases the goals read, in table order (``benchmarks pass`` runs them first)."""
    return list(dict.fromkeys(g.case for g in GOALS if g.case is not None))


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class Outcome:
    """A goal's figure in one run, or why there is none."""

    goal: Goal
    measured: float | None
    why_not: str = ""

    @property
    def ratio(self) -> float | None:
        return None if self.measured is None else self.goal.ratio(self.measured)

    @property
    def met(self) -> str:
        if self.ratio is None:
            return "not measured"
        return "yes" if self.ratio >= 1 else "no"


def evaluate(reports: Mapping[str, Report]) -> list[Outcome]:
    """Every goal against the suite records of one run (``{suite: record}``); a suite that is
    absent leaves its goals not measured."""
    outcomes = []
    for goal in GOALS:
        report = reports.get(goal.suite)
        if report is None:
            outcomes.append(Outcome(goal, None, f"the {goal.suite} suite did not run"))
            continue
        try:
            outcomes.append(Outcome(goal, goal.read(report)))
        except NotMeasured as err:
            outcomes.append(Outcome(goal, None, str(err)))
    return outcomes


def describe(record: Record) -> str:
    """A record's identity: its case, stage or variant, its shape, its backend."""
    names = [record[k] for k in ("case", "stage", "variant") if record.get(k) is not None]
    shape = ",".join(f"{k}={v}" for k, v in record.get("shape", {}).items())
    backend = [record["backend"]] if record.get("backend") else []
    return " ".join([*names, *([f"[{shape}]"] if shape else []), *backend])


def _row(cells: Iterable[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def outcome_table(outcomes: Iterable[Outcome]) -> str:
    """Markdown: goal, target, measured, ratio, met, and why a goal is not measured."""
    header = ["goal", "target", "measured", "ratio", "met", "note"]
    lines = [_row(header), _row(["---"] * len(header))]
    for o in outcomes:
        if o.measured is None:
            cells = ["not measured", "-", o.met, o.why_not]
        else:
            cells = [quantity(o.measured, o.goal.unit), f"{o.ratio:.2f}", o.met, ""]
        lines.append(_row([f"`{o.goal.id}`", o.goal.target_text, *cells]))
    return "\n".join(lines)


def readme_table() -> str:
    """The "Goals" table of benchmarks/README.md."""
    lines = [_row(["goal", "what is measured", "target", "suite"]), _row(["---"] * 4)]
    for g in GOALS:
        lines.append(_row([f"`{g.id}`", g.text, g.target_text, g.suite]))
    return "\n".join(lines)


# --------------------------------------------------------------------------- results/README.md

LATEST_BEGIN = "<!-- latest figures: generated by `benchmarks pass` (benchmarks/goals.py) -->"
LATEST_END = "<!-- end of latest figures -->"
LATEST_HEADER = [
    "goal",
    "target",
    "latest figure",
    "ratio",
    "met",
    "device",
    "commit",
    "date",
    "run",
]
PASS_RECORD = "pass.json"  # what `benchmarks pass` writes into each run folder


@dataclass(frozen=True)
class Figure:
    """The figure of one goal in one run folder."""

    outcome: Outcome
    device: str
    commit: str
    timestamp: str  # UTC ISO 8601
    run: str  # the folder under results/
    by_pass: bool

    def cells(self) -> list[str]:
        o = self.outcome
        source = "" if self.by_pass else " (manual run, not `benchmarks pass`)"
        return [
            f"`{o.goal.id}`",
            o.goal.target_text,
            quantity(o.measured, o.goal.unit),
            f"{o.ratio:.2f}",
            o.met,
            self.device,
            f"`{self.commit[:7]}`",
            self.timestamp[:10],
            f"[{self.run}]({self.run}/){source}",
        ]


def suite_records(folder: Path) -> dict[str, Report]:
    """The suite records (schema 1 ``benchmarks run`` JSON) in one run folder, by suite."""
    found = {}
    for path in sorted(folder.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(report, dict) and report.get("schema") == 1 and "results" in report:
            found[report["suite"]] = report
    return found


def latest_figures(results_dir: Path) -> dict[str, Figure]:
    """The newest figure of each goal over every run folder under ``results_dir`` (by the suite
    record's timestamp); goals no run measured are absent."""
    newest: dict[str, Figure] = {}
    for folder in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        for suite, report in suite_records(folder).items():
            for outcome in evaluate({suite: report}):
                if outcome.goal.suite != suite or outcome.measured is None:
                    continue
                figure = Figure(
                    outcome,
                    report["device"],
                    report.get("commit") or "unknown",
                    report["timestamp"],
                    folder.name,
                    (folder / PASS_RECORD).exists(),
                )
                held = newest.get(outcome.goal.id)
                if held is None or figure.timestamp >= held.timestamp:
                    newest[outcome.goal.id] = figure
    return newest


def _kept_rows(section: str) -> dict[str, tuple[str, list[str]]]:
    """The rows of an existing latest-figures table: goal id -> (date, cells). Rows written by hand
    (figures no suite record holds, e.g. read off a log) survive until a newer record replaces them."""
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != len(LATEST_HEADER) or not re.fullmatch(r"`[\w.]+`", cells[0]):
            continue
        date = cells[LATEST_HEADER.index("date")]
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):  # a figure, not a "not measured" row
            rows[cells[0].strip("`")] = (date, cells)
    return rows


def update_latest(readme: Path, results_dir: Path) -> None:
    """Rewrite the latest-figures table of ``readme`` (between :data:`LATEST_BEGIN` and
    :data:`LATEST_END`): per goal the newest of the suite records under ``results_dir`` and the row
    already there (a record wins a tie of dates), "not measured" when neither has one."""
    text = readme.read_text()
    head, rest = text.split(LATEST_BEGIN, 1)
    section, tail = rest.split(LATEST_END, 1)
    kept, figures = _kept_rows(section), latest_figures(results_dir)
    lines = [_row(LATEST_HEADER), _row(["---"] * len(LATEST_HEADER))]
    for goal in GOALS:
        figure, row = figures.get(goal.id), kept.get(goal.id)
        if figure is not None and (row is None or figure.timestamp[:10] >= row[0]):
            lines.append(_row(figure.cells()))
        elif row is not None:
            lines.append(_row(row[1]))
        else:
            blank = ["not measured", "-", "-", "-", "-", "-", "-"]
            lines.append(_row([f"`{goal.id}`", goal.target_text, *blank]))
    table = "\n".join(lines)
    readme.write_text(f"{head}{LATEST_BEGIN}\n{table}\n{LATEST_END}{tail}")
