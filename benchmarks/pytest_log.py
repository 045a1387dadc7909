"""The test stage of ``benchmarks pass``: pytest with a plugin that logs every outcome as it arrives.

``python -m benchmarks.pytest_log LOG [pytest arguments]`` runs ``pytest.main`` with :class:`Recorder`,
which writes one JSON line per test outcome to ``LOG`` (flushed) as the controlling process receives
it (under pytest-xdist the reports of every worker pass through it), and ``{"finished": true}`` once
every test has run. The report therefore does not depend on pytest ending well: on the H200 run of
2026-12-04 the suite ran to 100% and then hung in xdist's worker teardown, which pytest runs before
it writes ``--junitxml`` or the ``-rf`` summary, so both were lost (``fullsuite.log`` of
``benchmarks/results/h200-2026-12-04-265be71-manual``).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pytest


def first_error_line(report: pytest.TestReport) -> str:
    """What ``-rf`` prints after the test's name: the first line of the exception's message."""
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message.splitlines()[0] if crash.message else ""
    lines = report.longreprtext.strip().splitlines()
    errors = [line[1:].strip() for line in lines if line.startswith("E ")]
    return (errors or lines or [""])[0]


class Recorder:
    """pytest plugin: one flushed JSON line per test outcome (``test``, ``when``, ``outcome`` and, for
    a failure, ``error``); passing setup and teardown phases are left out."""

    def __init__(self, file: IO[str]) -> None:
        self._file = file

    def _write(self, entry: dict[str, object]) -> None:
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "call" and report.passed:
            return
        entry: dict[str, object] = {
            "test": report.nodeid,
            "when": report.when,
            "outcome": report.outcome,
        }
        if report.failed:
            entry["error"] = first_error_line(report)
        self._write(entry)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtestloop(self, session: pytest.Session) -> object:
        result = yield
        self._write({"finished": True})  # before the session's teardown, which may hang
        return result


@dataclass
class Tally:
    """What a test log holds: counts, every failure as ``name - first error line``, and whether
    every test ran."""

    passed: int = 0
    failed: int = 0
    errors: int = 0  # a setup or teardown that failed
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    finished: bool = False

    def counts(self) -> str:
        return (
            f"{self.passed} passed, {self.failed} failed, {self.errors} errors, "
            f"{self.skipped} skipped"
        )


def read(path: Path) -> Tally:
    """The tally of a log :class:`Recorder` wrote (a missing file: nothing ran)."""
    tally = Tally()
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # the last line, cut by a kill
            break
        if entry.get("finished"):
            tally.finished = True
        elif entry["outcome"] == "skipped":
            tally.skipped += 1
        elif entry["outcome"] == "passed":
            tally.passed += 1
        else:
            phase = "" if entry["when"] == "call" else f" (at {entry['when']})"
            tally.failures.append(f"{entry['test']}{phase} - {entry['error']}")
            if entry["when"] == "call":
                tally.failed += 1
            else:
                tally.errors += 1
    return tally


def main(argv: list[str]) -> int:
    log, *args = argv
    with open(log, "w") as file:
        return pytest.main(args, plugins=[Recorder(file)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
