"""Pytest plugin: what the fault, attack and bad-input suite ran, per fault class (issue 6, item 6).

Tests of the suite carry ``@pytest.mark.fault_class("name")`` (a decorator, or a module's
``pytestmark``; the closest marker wins). The name may name the test's parameters,
``"SIGKILL: {fault}"``, so one parametrized matrix yields one class per fault. With
``--reliability-json PATH`` the plugin records, per class, every case's outcome — passed,
failed, error, skipped, xfailed (a known defect, with its reason) or xpassed — and the
inputs the cases generated: hypothesis examples (counted from hypothesis' own run
statistics) and whatever a test reports through the ``record_inputs`` fixture
(``record_inputs(110_000, "frames")``). It writes one JSON document at the end of the
session; ``scripts/reliability`` renders it as docs/reliability.md.

Without the option nothing is recorded: the marker is inert and ``record_inputs`` does
nothing, so ordinary runs are unaffected. pytest-xdist is refused with the option (the
outcomes of workers are not gathered here).
"""

from __future__ import annotations

import collections
import datetime
import enum
import json
import os
import platform
import shlex
import subprocess
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MARKER = "fault_class"
OPTION = "--reliability-json"
ENV = "MIGD_RELIABILITY_JSON"
SCHEMA = 1
#: Per-case outcomes, in pytest's own vocabulary (its terminal summary uses the same words).
OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
#: Hypothesis test-case statuses that ran the test body to the end or to a failure
#: (``invalid``/``overrun`` were rejected while drawing and never reached the assertions).
_RAN_STATUSES = frozenset({"valid", "interesting"})
_RECORDER_KEY = pytest.StashKey["Recorder"]()
HYPOTHESIS_UNIT = "hypothesis examples"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("reliability", "fault-suite reliability table")
    group.addoption(OPTION, dest="reliability_json", metavar="PATH", default=os.environ.get(ENV) or None,
                    help=f"write the per-fault-class outcomes of @pytest.mark.{MARKER} tests to PATH "
                         f"as JSON (also ${ENV})")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARKER}(name): the fault class of a fault-suite test, for the reliability table "
        "({param} in the name is filled from the test's parameters); see tests/reliability.py",
    )
    path = config.getoption("reliability_json")
    if not path:
        return
    # xdist: the controller only sees serialized reports, the workers run the hooks below
    # separately; refuse rather than write a table that silently misses cases.
    if hasattr(config, "workerinput") or (getattr(config.option, "numprocesses", None) or 0) or \
            getattr(config.option, "dist", "no") != "no":
        raise pytest.UsageError(f"{OPTION} does not support pytest-xdist: run without -n/--dist")
    recorder = Recorder(config, Path(path))
    config.stash[_RECORDER_KEY] = recorder
    config.pluginmanager.register(recorder, "reliability-recorder")


@pytest.fixture
def record_inputs(request: pytest.FixtureRequest) -> Callable[[int, str], None]:
    """``record_inputs(count, unit)``: this case generated ``count`` inputs of ``unit`` (e.g.
    frames): added to its fault class's total in the reliability table. Does nothing unless
    the run has ``--reliability-json``."""
    recorder = request.config.stash.get(_RECORDER_KEY, None)
    nodeid = request.node.nodeid

    def record(count: int, unit: str) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"record_inputs: expected a count >= 0, got {count!r}")
        if not unit.strip():
            raise ValueError("record_inputs: expected a unit name (e.g. 'frames'), got an empty one")
        if recorder is not None:
            recorder.add_inputs(nodeid, unit, count)

    return record


def fault_class_of(item: pytest.Item) -> str | None:
    """The fault class of ``item`` (its closest ``fault_class`` marker, parameters filled in),
    or None for a test outside the suite. A malformed marker is a usage error."""
    marker = item.get_closest_marker(MARKER)
    if marker is None:
        return None
    if len(marker.args) != 1 or marker.kwargs or not isinstance(marker.args[0], str) or not marker.args[0].strip():
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER} takes one non-empty name, "
                                f"got args={marker.args!r} kwargs={marker.kwargs!r}")
    template: str = marker.args[0]
    callspec = getattr(item, "callspec", None)
    # An enum parameter reads as its value ("bound"), not its repr ("TransportMode.BOUND").
    params = {name: value.value if isinstance(value, enum.Enum) else value
              for name, value in (callspec.params if callspec else {}).items()}
    try:
        return template.format(**params)
    except (KeyError, IndexError, ValueError) as exc:
        raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.{MARKER}({template!r}) cannot be filled from "
                                f"the test's parameters {sorted(params)}: {exc!r}") from exc


@dataclass
class Case:
    """One collected test of the suite and what became of it."""

    fault_class: str
    outcome: str | None = None  # None: collected, never ran (an interrupted session)
    reason: str | None = None  # the xfail/skip reason, or the first line of a failure
    inputs: collections.Counter[str] = field(default_factory=collections.Counter)


class Recorder:
    """The registered plugin object of a ``--reliability-json`` session."""

    def __init__(self, config: pytest.Config, path: Path) -> None:
        self.config = config
        self.path = path
        self.cases: dict[str, Case] = {}
        self.started = datetime.datetime.now(datetime.UTC)

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        # session.items: after -k/-m deselection, so "collected" is what this session meant to run.
        for item in session.items:
            name = fault_class_of(item)
            if name is not None:
                self.cases[item.nodeid] = Case(name)

    @pytest.hookimpl(hookwrapper=True, trylast=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, None, None]:
        """Count hypothesis examples. trylast: this wrapper runs inside hypothesis' own, which
        installs its statistics collector; we chain onto that collector (keeping
        ``--hypothesis-show-statistics`` working) for every ``@given`` run of the call,
        including ones a test defines and calls inside itself."""
        case = self.cases.get(item.nodeid)
        collector = _hypothesis_collector() if case is not None else None
        if collector is None:
            yield
            return
        previous = collector.value

        def note(stats: dict[str, Any]) -> None:
            self.add_inputs(item.nodeid, HYPOTHESIS_UNIT, hypothesis_examples(stats))
            if previous is not None:
                previous(stats)

        with collector.with_value(note):
            yield

    def add_inputs(self, nodeid: str, unit: str, count: int) -> None:
        case = self.cases.get(nodeid)
        if case is not None and count:
            case.inputs[unit] += count

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        case = self.cases.get(report.nodeid)
        if case is None:
            return
        outcome, reason = _outcome_of(report)
        if outcome is None:
            return
        # One outcome per case, as a reader counts: an error in teardown spoils a pass.
        if case.outcome is None or outcome == "error":
            case.outcome, case.reason = outcome, reason

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session, exitstatus: int) -> None:
        document = self.document(int(exitstatus))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")
        tmp.replace(self.path)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        terminalreporter.write_line(f"reliability: {len(self.cases)} fault-suite cases in "
                                    f"{len({c.fault_class for c in self.cases.values()})} classes -> {self.path}")

    def document(self, exitstatus: int) -> dict[str, Any]:
        """The JSON document: the run, then per fault class the counts and the cases behind them."""
        finished = datetime.datetime.now(datetime.UTC)
        classes: dict[str, dict[str, Any]] = {}
        for nodeid, case in self.cases.items():
            entry = classes.setdefault(case.fault_class, {
                "collected": 0, "run": 0, **{o: 0 for o in OUTCOMES}, "inputs": {},
                "known_defects": [], "failures": [], "skips": [], "files": [],
            })
            entry["collected"] += 1
            path = nodeid.split("::", 1)[0]
            if path not in entry["files"]:
                entry["files"].append(path)
            for unit, count in case.inputs.items():
                entry["inputs"][unit] = entry["inputs"].get(unit, 0) + count
            if case.outcome is None:
                continue
            entry["run"] += 1
            entry[case.outcome] += 1
            detail = {"nodeid": nodeid, "reason": case.reason}
            if case.outcome == "xfailed":
                entry["known_defects"].append(detail)
            elif case.outcome in ("failed", "error"):
                entry["failures"].append(detail)
            elif case.outcome == "skipped":
                entry["skips"].append(detail)
        totals = {key: sum(c[key] for c in classes.values()) for key in ("collected", "run", *OUTCOMES)}
        args = list(self.config.invocation_params.args)
        return {
            "schema": SCHEMA,
            "command": shlex.join(["python", "-m", "pytest", *args]),
            "started": self.started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "duration_s": round((finished - self.started).total_seconds(), 1),
            "exit_status": exitstatus,
            "commit": git_commit(self.config.rootpath),
            "python": platform.python_version(),
            "pytest": pytest.__version__,
            "classes": dict(sorted(classes.items())),
            "totals": totals,
        }


def _outcome_of(report: pytest.TestReport) -> tuple[str | None, str | None]:
    """A report's contribution to its case's outcome (None: nothing to say, e.g. a passed setup)."""
    wasxfail = getattr(report, "wasxfail", None)
    if report.when == "call":
        if report.passed:
            return ("xpassed", wasxfail) if wasxfail is not None else ("passed", None)
        if report.skipped:
            return ("xfailed", wasxfail) if wasxfail is not None else ("skipped", _skip_reason(report))
        return "failed", _first_line(report)
    if report.failed:
        return "error", f"{report.when}: {_first_line(report)}"
    if report.skipped and report.when == "setup":
        return ("xfailed", wasxfail) if wasxfail is not None else ("skipped", _skip_reason(report))
    return None, None


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    return (text.strip().splitlines() or [""])[0][:300]


def hypothesis_examples(stats: dict[str, Any]) -> int:
    """Examples that ran the test body in one hypothesis run, from its statistics dict (the
    ``reuse`` and ``generate`` phases; shrinking re-runs are not new inputs)."""
    total = 0
    for phase in ("reuse-phase", "generate-phase"):
        for case in stats.get(phase, {}).get("test-cases", []):
            if case.get("status") in _RAN_STATUSES:
                total += 1
    return total


def _hypothesis_collector() -> Any:
    try:
        from hypothesis.statistics import collector
    except ImportError:
        return None
    return collector


def git_commit(root: Path) -> str | None:
    """``HEAD``'s short hash, with ``+dirty`` when tracked files differ from it; None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")
