"""The reliability plugin (tests/reliability.py) and its renderer (scripts/reliability).

Synthetic test files run under pytester with the plugin; the record they produce is checked
case by case, then rendered. The guard (``--check``) is shown failing on an empty class
(the negative control) and passing on a complete record.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "reliability"

SYNTHETIC = '''
import pytest
from hypothesis import given, settings, strategies as st

pytestmark = pytest.mark.fault_class("module class")


def test_module_default_passes():
    pass


@pytest.mark.fault_class("cut")
def test_override_fails():
    assert 1 == 2, "the cut was not noticed"


@pytest.mark.fault_class("cut")
@pytest.mark.xfail(reason="DEFECT: marker xfail", strict=True)
def test_known_defect_marker():
    raise RuntimeError("still broken")


@pytest.mark.fault_class("cut")
def test_known_defect_imperative():
    pytest.xfail("KNOWN DEFECT: imperative xfail")


@pytest.mark.fault_class("cut")
@pytest.mark.xfail(reason="DEFECT: fixed meanwhile", strict=True)
def test_strict_xpass_is_a_failure():
    pass


@pytest.mark.fault_class("cut")
def test_skipped():
    pytest.skip("no TLS here")


@pytest.fixture
def broken():
    raise OSError("fixture broke")


@pytest.mark.fault_class("cut")
def test_setup_error(broken):
    pass


@pytest.mark.fault_class("SIGKILL: {fault}")
@pytest.mark.parametrize("phase", ["setup", "active"])
@pytest.mark.parametrize("fault", ["source", "dest"])
def test_matrix(fault, phase):
    pass


@pytest.mark.fault_class("fuzz")
def test_counted_loop(record_inputs):
    record_inputs(1234, "frames")
    record_inputs(6, "frames")


@pytest.mark.fault_class("fuzz")
@settings(max_examples=7, database=None, derandomize=True)
@given(st.integers(0, 10**9))
def test_hypothesis(n):
    pass
'''
#: A module without the marker: its test is no case of the suite.
OUTSIDE = "def test_outside_the_suite():\n    pass\n"


def load_script() -> ModuleType:
    """scripts/reliability as a module (it has no .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("reliability_script", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses look their module up
    loader.exec_module(module)
    return module


script = load_script()


def run_synthetic(pytester: pytest.Pytester, *extra: str) -> tuple[pytest.RunResult, Path]:
    pytester.makepyfile(test_synthetic=SYNTHETIC, test_outside=OUTSIDE)
    out = pytester.path / "build" / "reliability.json"
    result = pytester.runpytest("-p", "reliability", "-p", "no:cacheprovider", "--reliability-json", str(out),
                                *extra)
    return result, out


@pytest.fixture
def record(pytester: pytest.Pytester) -> dict[str, Any]:
    result, out = run_synthetic(pytester)
    result.assert_outcomes(passed=8, failed=2, errors=1, skipped=1, xfailed=2)
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_classes_come_from_the_closest_marker_and_the_parameters(record: dict[str, Any]) -> None:
    classes = record["classes"]
    assert sorted(classes) == ["SIGKILL: dest", "SIGKILL: source", "cut", "fuzz", "module class"]
    assert classes["module class"]["files"] == ["test_synthetic.py"]
    for fault in ("source", "dest"):
        assert classes[f"SIGKILL: {fault}"]["run"] == classes[f"SIGKILL: {fault}"]["passed"] == 2
    # The unmarked module's test is no case of the suite.
    assert record["totals"]["collected"] == 13
    assert all(case["files"] == ["test_synthetic.py"] for case in classes.values())


def test_every_outcome_is_counted_once_per_case(record: dict[str, Any]) -> None:
    cut = record["classes"]["cut"]
    assert {k: cut[k] for k in ("collected", "run", "passed", "failed", "error", "skipped", "xfailed", "xpassed")} \
        == {"collected": 6, "run": 6, "passed": 0, "failed": 2, "error": 1, "skipped": 1, "xfailed": 2, "xpassed": 0}
    reasons = {case["nodeid"].split("::")[1]: case["reason"] for case in cut["known_defects"]}
    assert reasons == {"test_known_defect_marker": "DEFECT: marker xfail",
                       "test_known_defect_imperative": "KNOWN DEFECT: imperative xfail"}
    failures = {case["nodeid"].split("::")[1]: case["reason"] for case in cut["failures"]}
    assert "the cut was not noticed" in failures["test_override_fails"]
    assert "XPASS(strict)" in failures["test_strict_xpass_is_a_failure"]  # a fixed defect is not a pass
    assert failures["test_setup_error"].startswith("setup: ") and "fixture broke" in failures["test_setup_error"]
    assert cut["skips"][0]["reason"] == "no TLS here"
    assert record["exit_status"] == 1 and record["schema"] == script.SCHEMA
    assert "--reliability-json" in record["command"]


def test_generated_inputs_from_the_fixture_and_from_hypothesis(record: dict[str, Any]) -> None:
    assert record["classes"]["fuzz"]["inputs"] == {"frames": 1240, "hypothesis examples": 7}


def test_without_the_option_nothing_is_recorded(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_synthetic=SYNTHETIC, test_outside=OUTSIDE)
    result = pytester.runpytest("-p", "reliability", "-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=8, failed=2, errors=1, skipped=1, xfailed=2)  # the marker is registered
    assert not (pytester.path / "build").exists()
    assert "reliability:" not in result.stdout.str()


def test_record_inputs_validates_its_arguments(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest

        @pytest.mark.fault_class("fuzz")
        @pytest.mark.parametrize("count, unit", [(-1, "frames"), (True, "frames"), (3, " ")])
        def test_bad(record_inputs, count, unit):
            with pytest.raises(ValueError, match="record_inputs"):
                record_inputs(count, unit)
    """)
    result = pytester.runpytest("-p", "reliability", "--reliability-json", str(pytester.path / "r.json"))
    result.assert_outcomes(passed=3)
    assert json.loads((pytester.path / "r.json").read_text())["classes"]["fuzz"]["inputs"] == {}


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ('@pytest.mark.fault_class("SIGKILL: {nope}")', "cannot be filled"),
        ("@pytest.mark.fault_class()", "takes one non-empty name"),
        ('@pytest.mark.fault_class("a", "b")', "takes one non-empty name"),
    ],
)
def test_a_malformed_marker_is_a_usage_error(pytester: pytest.Pytester, marker: str, message: str) -> None:
    pytester.makepyfile(f"""
        import pytest

        {marker}
        @pytest.mark.parametrize("fault", ["source"])
        def test_x(fault):
            pass
    """)
    result = pytester.runpytest("-p", "reliability", "--reliability-json", str(pytester.path / "r.json"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{message}*"])


def test_xdist_is_refused(pytester: pytest.Pytester) -> None:
    """Stand-in for pytest-xdist's option (not installed here): --numprocesses with the option is refused."""
    pytester.makeconftest("""
        def pytest_addoption(parser):
            parser.addoption("--numprocesses", dest="numprocesses", type=int, default=None)
    """)
    pytester.makepyfile("def test_x(): pass")
    result = pytester.runpytest("-p", "reliability", "--numprocesses", "2",
                                "--reliability-json", str(pytester.path / "r.json"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*does not support pytest-xdist*"])
    # Only with the option: a plain -n run is none of the plugin's business.
    assert pytester.runpytest("-p", "reliability", "--numprocesses", "2").ret == pytest.ExitCode.OK


# ---------------------------------------------------------------------- the renderer


def test_render_shows_known_defects_as_such_never_as_a_pass(record: dict[str, Any]) -> None:
    page = script.render(record, "build/reliability.json")
    (row,) = [line for line in page.splitlines() if line.startswith("| cut |")]
    # cases 6 | passed 0 | failed 3 (2 failed + 1 error) | known defects 2 | skipped 1
    assert row.split("|")[3:8] == [" 6 ", " 0 ", " 3 ", " 2 ", " 1 "], row
    assert "**FAIL** (3)" in row
    assert "- cut: `test_synthetic.py::test_known_defect_imperative`: KNOWN DEFECT: imperative xfail" in page
    assert "## Failures" in page and "## Skipped" in page
    (fuzz,) = [line for line in page.splitlines() if line.startswith("| fuzz |")]
    assert "1,240 frames, 7 hypothesis examples" in fuzz and fuzz.endswith("| pass |")
    # Classes issue 6 asks for and this run lacks appear, as not run.
    assert "| connection cut | 2 | 0 | 0 | 0 | 0 | 0 | — | **not run** |" in page
    assert "`python -m pytest -p reliability" in page and "pytest exit status: 1 (tests failed)" in page


def test_a_class_of_known_defects_only_is_not_a_pass() -> None:
    entry = {"collected": 1, "run": 1, "passed": 0, "failed": 0, "error": 0, "skipped": 0, "xfailed": 1,
             "xpassed": 0, "inputs": {}}
    assert script.result(entry) == "1 known defect"
    assert script.result({**entry, "passed": 3}) == "pass, 1 known defect"
    assert script.result({**entry, "xfailed": 0, "passed": 1}) == "pass"


def complete_record() -> dict[str, Any]:
    """A record in which every class issue 6 asks for ran one passing case."""
    entry = {"collected": 1, "run": 1, "passed": 1, "failed": 0, "error": 0, "skipped": 0, "xfailed": 0,
             "xpassed": 0, "inputs": {}, "known_defects": [], "failures": [], "skips": [], "files": ["t.py"]}
    classes = {req.name: json.loads(json.dumps(entry)) for req in script.REQUIRED}
    classes["bad input: stream codec fuzz"]["inputs"] = {"frames": 100_000}
    return {"schema": script.SCHEMA, "command": "python -m pytest", "started": "2026-11-25T20:00:00+00:00",
            "duration_s": 1.0, "exit_status": 0, "commit": "abc", "classes": classes}


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=30,
                          check=False)


def test_check_passes_a_complete_record_and_fails_an_empty_class(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    good = complete_record()
    path.write_text(json.dumps(good))
    ok = run_script("--check", "--json", str(path))
    assert ok.returncode == 0, ok.stderr
    # Negative controls: a class gone, a class whose every case was skipped, too few frames.
    for mutate, expected in [
        (lambda r: r["classes"].pop("access control: NOSEND policy"), "'access control: NOSEND policy' (issue 6 "
                                                                       "item 4): no case in this run"),
        (lambda r: r["classes"]["stall / slow link"].update(passed=0, skipped=1), "no case executed"),
        (lambda r: r["classes"]["bad input: stream codec fuzz"]["inputs"].update(frames=99_999),
         "99999 frames generated, expected at least 100000"),
    ]:
        bad = complete_record()
        mutate(bad)
        path.write_text(json.dumps(bad))
        failed = run_script("--check", "--json", str(path))
        assert failed.returncode == 1 and expected in failed.stderr, failed.stderr
        # The page says so too.
        assert "## Missing from this run" in script.render(bad, "r.json")
    assert "## Missing from this run" not in script.render(good, "r.json")


def test_render_writes_the_page_and_refuses_a_bad_record(tmp_path: Path) -> None:
    path, out = tmp_path / "r.json", tmp_path / "docs" / "reliability.md"
    path.write_text(json.dumps(complete_record()))
    done = run_script("--json", str(path), "--out", str(out))
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert page.startswith("# Reliability") and "| **total** | | 18 | 18 | 0 | 0 | 0 | | |" in page
    for content, message in [("{", "not readable JSON"), ('{"schema": 99, "classes": {}}', "schema 1, got 99"),
                             ('{"schema": 1, "classes": {"x": {}}}', "lacks collected")]:
        path.write_text(content)
        refused = run_script("--json", str(path), "--out", str(out))
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert run_script("--check", "--json", str(tmp_path / "absent.json")).returncode == 2


def test_the_suite_names_every_class_issue_6_asks_for(tmp_path: Path) -> None:
    """The markers in the real fault-suite files spell the classes the guard requires (collected
    only: the cases themselves run in the whole suite)."""
    out = tmp_path / "collected.json"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider",
                           "-m", "fault_class", "--reliability-json", str(out), str(ROOT / "tests")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    classes = json.loads(out.read_text())["classes"]
    assert {req.name for req in script.REQUIRED} <= {name for name, c in classes.items() if c["collected"]}, \
        sorted(classes)
