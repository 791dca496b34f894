"""``/metrics`` exposition (migd/daemon/metrics.py): parsed back by a strict reader of the text format
0.0.4 and by prometheus_client's parser, checked against Prometheus naming conventions, values
checked against the daemon state they come from, counters that survive deletion and ignore the
journal's history; and, over two real daemons, a migration counted once with the same bytes on
both ends.

The reader and the convention checker are the negative controls of the format checks: they
must reject broken expositions.
"""

from __future__ import annotations

import asyncio
import collections
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from migd import __version__, wire
from migd.abi import KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED, PAGE_SIZE
from migd.guest.host_guest import GuestDefinition
from migd.host import Host
from migd.daemon.metrics import (
    DOWNTIME_BUCKETS_S,
    DURATION_BUCKETS_S,
    Family,
    MetricsCollector,
    RunningTotals,
    escape_label_value,
    format_value,
    render_families,
)
from migd.listener import Refusal
from migd.migration_state import MigrationPhase, MigrationStatus
from migd.page_runs import PageKind
from migd.progress import MigrationProgress, page_frame_bytes
from migd.platform.psp import PspFirmware

from test_api import Api, free_port, run, serving

S = MigrationStatus

# ---------------------------------------------------------------------- a strict reader of the format

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{(.*)\}})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(,|$)')


class FormatError(ValueError):
    pass


@dataclass
class ParsedFamily:
    kind: str
    help: str
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "\\": "\\", '"': '"'}[m.group(1)], value)


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    out, pos = [], 0
    while pos < len(text):
        match = _LABEL.match(text, pos)
        if match is None:
            raise FormatError(f"bad label set at {text[pos:]!r}")
        out.append((match.group(1), _unescape(match.group(2))))
        pos = match.end()
    names = [name for name, _ in out]
    if len(set(names)) != len(names):
        raise FormatError(f"repeated label in {text!r}")
    return tuple(out)


def _value(text: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("Inf", "inf").replace("NaN", "nan"))
    if not re.fullmatch(r"-?\d+(\.\d+)?(e[+-]?\d+)?", text):
        raise FormatError(f"bad sample value {text!r}")
    return float(text)


def parse_exposition(text: str) -> dict[str, ParsedFamily]:
    """Families by name; raises FormatError on anything the 0.0.4 text format does not allow."""
    if not text.endswith("\n"):
        raise FormatError("the exposition must end with a line feed")
    families: dict[str, ParsedFamily] = {}
    helps: dict[str, str] = {}
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, doc = line[7:].partition(" ")
            if name in helps:
                raise FormatError(f"second HELP for {name}")
            helps[name] = doc
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            if kind not in ("counter", "gauge", "histogram", "summary", "untyped") or name in families:
                raise FormatError(f"bad or repeated TYPE line {line!r}")
            families[name] = ParsedFamily(kind, helps.get(name, ""))
        elif line.startswith("#") or not line:
            raise FormatError(f"unexpected line {line!r}")
        else:
            match = _SAMPLE.match(line)
            if match is None:
                raise FormatError(f"bad sample line {line!r}")
            sample, labels, value = match.group(1), _labels(match.group(2) or ""), _value(match.group(3))
            owner = next((f for f in families if sample in (f, f + "_bucket", f + "_sum", f + "_count")), None)
            if owner is None:
                raise FormatError(f"sample {sample} before its TYPE line")
            family = families[owner]
            if family.kind != "histogram" and sample != owner:
                raise FormatError(f"{sample} is not a sample name of {family.kind} {owner}")
            key = (sample, labels)
            if key in family.samples:
                raise FormatError(f"duplicate series {line!r}")
            family.samples[key] = value
    for name, family in families.items():
        if not family.help:
            raise FormatError(f"{name} has no HELP")
        if family.kind == "counter" and (
            not name.endswith("_total") or any(v < 0 or math.isnan(v) for v in family.samples.values())
        ):
            raise FormatError(f"counter {name}: name must end in _total, values must be >= 0")
        if family.kind == "histogram":
            _check_histogram(name, family)
    return families


def _check_histogram(name: str, family: ParsedFamily) -> None:
    """Each series (labels but ``le``) has cumulative buckets up to +Inf, a _sum, and a _count equal to +Inf."""
    series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
    for (sample, labels), v in family.samples.items():
        if sample == name + "_bucket":
            rest = tuple((k, x) for k, x in labels if k != "le")
            series.setdefault(rest, []).append((_value(dict(labels)["le"]), v))
    if not series:
        raise FormatError(f"histogram {name} lacks its +Inf bucket")
    for rest, unsorted in series.items():
        buckets = sorted(unsorted)
        if buckets[-1][0] != math.inf:
            raise FormatError(f"histogram {name} lacks its +Inf bucket")
        counts = [v for _, v in buckets]
        if counts != sorted(counts):
            raise FormatError(f"histogram {name}: buckets are not cumulative: {buckets}")
        if family.samples.get((name + "_count", rest)) != counts[-1] or (name + "_sum", rest) not in family.samples:
            raise FormatError(f"histogram {name}: _count must equal the +Inf bucket and _sum must exist")


def value_of(families: dict[str, ParsedFamily], family: str, sample: str | None = None, **labels: str) -> float:
    return families[family].samples[(sample or family, tuple(labels.items()))]


# ---------------------------------------------------------------------- Prometheus conventions

#: Units Prometheus does not use: base units only (seconds, bytes), ratios rather than percent.
_FOREIGN_UNIT = re.compile(r"_(ms|milliseconds|us|microseconds|ns|minutes|hours|kib|mib|gib|kb|mb|gb|percent)(_|$)")
_BASE_UNITS = ("seconds", "bytes")


def convention_violations(text: str) -> list[str]:
    """What in ``text`` breaks the Prometheus conventions (https://prometheus.io/docs/practices/naming/).

    Read by prometheus_client's own parser (a ValueError if it cannot), then: every family has
    HELP and TYPE and the ``migd_`` prefix; counters, and only counters, end in ``_total``; units
    are base units and come last (before ``_total``); no two families share a name once the
    client drops ``_total`` (a gauge ``x`` beside a counter ``x_total``); no sample lies outside
    its declared family (the client reads it as an untyped one); each family has one label set.
    """
    problems: list[str] = []
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", text, re.MULTILINE))
    families = list(text_string_to_metric_families(text))
    for name, kind in types.items():
        base = name.removesuffix("_total")
        if not name.startswith("migd_"):
            problems.append(f"{name}: not in the migd_ namespace")
        if not helps.get(name):
            problems.append(f"{name}: no HELP")
        if (kind == "counter") != name.endswith("_total"):
            problems.append(f"{name}: a {kind}; counters and only counters end in _total")
        if _FOREIGN_UNIT.search(base):
            problems.append(f"{name}: not a base unit (seconds, bytes)")
        for unit in _BASE_UNITS:
            if unit in base.split("_") and not base.endswith("_" + unit):
                problems.append(f"{name}: the unit {unit} must end the name (before _total)")
    names = [f.name for f in families]
    problems += [f"{name}: two families by that name" for name in sorted({n for n in names if names.count(n) > 1})]
    for family in families:
        if family.type in ("untyped", "unknown"):  # the client's name for untyped
            problems.append(f"{family.name}: samples outside any declared family")
        label_sets = {frozenset(k for k in s.labels if k != "le") for s in family.samples}
        if len(label_sets) > 1:
            problems.append(f"{family.name}: label sets differ between samples: {sorted(map(sorted, label_sets))}")
    return problems


_OK_FAMILY = '# HELP migd_ok_total OK.\n# TYPE migd_ok_total counter\nmigd_ok_total{role="source"} 1\n'


@pytest.mark.parametrize("broken, why", [
    ('# HELP migd_x X.\n# TYPE migd_x counter\nmigd_x 1\n', "end in _total"),
    ('# HELP migd_x_total X.\n# TYPE migd_x_total gauge\nmigd_x_total 1\n', "end in _total"),
    ('# HELP migd_downtime_ms X.\n# TYPE migd_downtime_ms gauge\nmigd_downtime_ms 1\n', "base unit"),
    ('# HELP migd_seconds_waited_total X.\n# TYPE migd_seconds_waited_total counter\nmigd_seconds_waited_total 1\n',
     "must end the name"),
    ('# HELP x_total X.\n# TYPE x_total counter\nx_total 1\n', "namespace"),
    ('# TYPE migd_x_total counter\nmigd_x_total 1\n', "no HELP"),
    # The exposition before this change: a gauge migd_migrations beside the new counter.
    ('# HELP migd_migrations M.\n# TYPE migd_migrations gauge\nmigd_migrations{role="source"} 1\n'
     '# HELP migd_migrations_total M.\n# TYPE migd_migrations_total counter\nmigd_migrations_total{role="source"} 1\n',
     "two families"),
    ('# HELP migd_a_total A.\n# TYPE migd_a_total counter\nmigd_b_total 1\n', "outside any declared family"),
    ('# HELP migd_a_total A.\n# TYPE migd_a_total counter\nmigd_a_total{role="x"} 1\nmigd_a_total{kind="y"} 1\n',
     "label sets differ"),
])
def test_the_convention_checker_rejects_what_it_must(broken: str, why: str) -> None:
    assert convention_violations(_OK_FAMILY) == []  # control: a well-named family passes
    problems = convention_violations(_OK_FAMILY + broken)
    assert any(why in p for p in problems), problems


# ---------------------------------------------------------------------- the reader can fail

GOOD = '# HELP x_total X.\n# TYPE x_total counter\nx_total{a="1"} 2\n'


@pytest.mark.parametrize("broken, why", [
    (GOOD.rstrip("\n"), "line feed"),
    ('# HELP x_total X.\n# TYPE x_total counter\nx_total{a="1"b="2"} 2\n', "bad label set"),
    ('# HELP x_total X.\n# TYPE x_total counter\nx_total{a="say "hi""} 2\n', "bad label set"),
    ('# HELP x_total X.\nx_total 2\n', "before its TYPE"),
    ('# HELP x X.\n# TYPE x counter\nx 2\n', "_total"),
    ('# HELP x_total X.\n# TYPE x_total counter\nx_total -1\n', ">= 0"),
    ('# TYPE x_total counter\nx_total 1\n', "no HELP"),
    (GOOD + 'x_total{a="1"} 3\n', "duplicate series"),
    ('# HELP x_total X.\n# TYPE x_total counter\nx_total one\n', "bad sample value"),
    ('# HELP h H.\n# TYPE h histogram\nh_bucket{le="1"} 3\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 2\n',
     "not cumulative"),
    ('# HELP h H.\n# TYPE h histogram\nh_bucket{le="1"} 1\nh_sum 1\nh_count 1\n', "+Inf"),
    ('# HELP h H.\n# TYPE h histogram\nh_bucket{le="+Inf"} 2\nh_sum 1\nh_count 1\n', "_count must equal"),
])
def test_the_reader_rejects_broken_expositions(broken: str, why: str) -> None:
    parse_exposition(GOOD)  # control: the well-formed one passes
    with pytest.raises(FormatError, match=re.escape(why)):
        parse_exposition(broken)


# ---------------------------------------------------------------------- exposition primitives


def test_label_values_are_escaped_and_read_back() -> None:
    tricky = 'say "hi"\\ back\nslash'
    assert escape_label_value(tricky) == 'say \\"hi\\"\\\\ back\\nslash'
    family = Family("migd_test_total", "counter", "Help with a \\ and a\nline feed.")
    family.add(3, kind=tricky, other="plain")
    parsed = parse_exposition(render_families([family]))
    assert value_of(parsed, "migd_test_total", kind=tricky, other="plain") == 3
    assert parsed["migd_test_total"].help == "Help with a \\\\ and a\\nline feed."
    # Negative control: without escaping the same value breaks the line.
    raw = f'# HELP y_total Y.\n# TYPE y_total counter\ny_total{{kind="{tricky}"}} 3\n'
    with pytest.raises(FormatError):
        parse_exposition(raw)


def test_values_are_formatted_as_the_format_expects() -> None:
    assert [format_value(v) for v in (0, 7, 2.0, 0.25, math.inf, -math.inf)] == ["0", "7", "2", "0.25", "+Inf", "-Inf"]
    assert format_value(math.nan) == "NaN"
    assert format_value(2.0**60) == repr(2.0**60)  # not exactly an integer in a double's eyes


# ---------------------------------------------------------------------- from daemon state


class FakeClock:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def tick(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def completed_source(downtime_ms: float, clock: FakeClock) -> MigrationProgress:
    """A completed outgoing migration of 0.05 s (five 10 ms steps) on ``clock``."""
    progress = MigrationProgress("g1", "source", "127.0.0.1:4444", 4096, phase=MigrationPhase(started_at=clock.now))
    progress.count_run(PageKind.PRIVATE, 100, 100 * (PAGE_SIZE + 64))
    progress.count_run(PageKind.SHARED, 10, 10 * PAGE_SIZE)
    progress.count_run(PageKind.ZERO, 3986, 24)
    progress.rounds = 3
    phase = progress.phase
    phase.advance(S.ACTIVE, clock.tick(0.01))
    phase.advance(S.BLACKOUT, clock.tick(0.01))
    phase.advance(S.ACTIVE, clock.tick(0.01))
    phase.advance(S.STOP_COPY, clock.tick(0.01))
    phase.commit()
    progress.downtime_ms = downtime_ms
    phase.advance(S.COMPLETED, clock.tick(0.01))
    return progress


def failed_source(seconds: float, clock: FakeClock) -> MigrationProgress:
    """An outgoing migration that failed after ``seconds`` on ``clock``."""
    progress = MigrationProgress("g2", "source", "127.0.0.1:4444", 4096, phase=MigrationPhase(started_at=clock.now))
    progress.phase.advance(S.FAILED, clock.tick(seconds), error="refused")
    return progress


def guest_with_hypercalls(host: Host, name: str) -> tuple[int, int, int]:
    """A defined guest whose VM took hypercalls: (ok, einval, eperm) counts."""
    vm = host.create_guest(GuestDefinition(name, 16)).vm
    for first in range(0, 64, 8):  # 8 ok: make runs shared, then one back private
        vm.hypercall(KVM_HC_MAP_GPA_RANGE, [first * PAGE_SIZE, 4, 0])
    vm.hypercall(KVM_HC_MAP_GPA_RANGE, [0, 4, KVM_MAP_GPA_RANGE_ENCRYPTED])
    vm.hypercall(KVM_HC_MAP_GPA_RANGE, [1, 1, 0])  # unaligned gpa
    vm.hypercall(KVM_HC_MAP_GPA_RANGE, [0, 1 << 20, 0])  # beyond RAM
    vm.hypercall(KVM_HC_MAP_GPA_RANGE, [0, 1, 0], cpl=3)
    return 9, 2, 1


@pytest.fixture
def host(tmp_path: Path, make_firmware: Callable[..., PspFirmware]) -> Host:
    return Host(tmp_path / "hostA", make_firmware("hostA"), runtime_dir=tmp_path / "run")


def test_exposition_reports_the_daemon_state(host: Host) -> None:
    clock = FakeClock()
    collector = MetricsCollector()
    collector.track(host)
    ok, einval, eperm = guest_with_hypercalls(host, "g1")
    source = completed_source(42.0, clock)
    failed = failed_source(40.0, clock)
    incoming = MigrationProgress("g3", "destination", "127.0.0.1:5555", 4096)
    incoming.phase.advance(S.ACTIVE, clock.tick(0.01))
    incoming.count_run(PageKind.PRIVATE, 50, 50 * PAGE_SIZE)
    incoming.rounds = 1
    for progress in (source, failed, incoming):
        host.add_migration(progress)
    # Keys as MigrationListener.refused holds them: Refusal members, and a reason this module
    # does not know (another listener version's): exposed as it is.
    refused = collections.Counter({Refusal.CAPACITY: 3, "tls-from-the-future": 2})

    text = collector.render(host.guests.values(), host.migrations.values(), refused)
    parsed = parse_exposition(text)

    assert value_of(parsed, "migd_build_info", version=__version__) == 1
    assert value_of(parsed, "migd_guests", state="defined") == 1
    assert value_of(parsed, "migd_guests", state="running") == 0
    assert value_of(parsed, "migd_migration_records", role="source", status="completed") == 1
    assert value_of(parsed, "migd_migration_records", role="source", status="failed") == 1
    assert value_of(parsed, "migd_migration_records", role="destination", status="active") == 1
    assert sum(parsed["migd_migration_records"].samples.values()) == 3
    outcomes = {labels: v for (_, labels), v in parsed["migd_migrations_total"].samples.items()}
    assert outcomes == {
        (("role", role), ("result", result)): float((role, result) in {("source", "completed"), ("source", "failed")})
        for role in ("source", "destination", "save", "restore") for result in ("completed", "failed", "cancelled")
    }
    pages_total = "migd_migration_pages_total"
    assert value_of(parsed, pages_total, role="source", kind="private") == 100
    assert value_of(parsed, pages_total, role="source", kind="shared") == 10
    assert value_of(parsed, pages_total, role="source", kind="zero") == 3986
    assert value_of(parsed, pages_total, role="destination", kind="private") == 50
    assert value_of(parsed, pages_total, role="destination", kind="zero") == 0
    bytes_total = "migd_migration_bytes_total"
    assert value_of(parsed, bytes_total, role="source", kind="private") == 100 * (PAGE_SIZE + 64)
    assert value_of(parsed, bytes_total, role="source", kind="shared") == 10 * PAGE_SIZE
    assert value_of(parsed, bytes_total, role="source", kind="zero") == 24
    assert value_of(parsed, bytes_total, role="destination", kind="private") == 50 * PAGE_SIZE
    assert value_of(parsed, "migd_migration_rounds_total", role="source") == 3
    assert value_of(parsed, "migd_migration_rounds_total", role="destination") == 1
    assert value_of(parsed, "migd_migration_blackouts_total") == 1
    assert value_of(parsed, "migd_hypercalls_total", result="ok") == ok
    assert value_of(parsed, "migd_hypercalls_total", result="einval") == einval
    assert value_of(parsed, "migd_hypercalls_total", result="eperm") == eperm
    assert value_of(parsed, "migd_hypercalls_total", result="enosys") == 0
    refusals = {dict(labels)["reason"]: v for (_, labels), v in
                parsed["migd_incoming_connections_refused_total"].samples.items()}
    assert refusals == {**{r.value: 0 for r in Refusal}, "capacity": 3, "tls-from-the-future": 2}

    h = "migd_migration_downtime_seconds"
    for bound in DOWNTIME_BUCKETS_S:
        assert value_of(parsed, h, h + "_bucket", le=format_value(bound)) == (1 if bound >= 0.042 else 0), bound
    assert value_of(parsed, h, h + "_bucket", le="+Inf") == 1
    assert value_of(parsed, h, h + "_count") == 1
    assert value_of(parsed, h, h + "_sum") == pytest.approx(0.042)
    # Durations: the completed one took 0.05 s, the failed one 40 s; the unfinished one is not in.
    d = "migd_migration_duration_seconds"
    for bound in DURATION_BUCKETS_S:
        expected = (bound >= 0.05) + (bound >= 40.0)
        assert value_of(parsed, d, d + "_bucket", role="source", le=format_value(bound)) == expected, bound
        assert value_of(parsed, d, d + "_bucket", role="destination", le=format_value(bound)) == 0
    assert value_of(parsed, d, d + "_count", role="source") == 2
    assert value_of(parsed, d, d + "_sum", role="source") == pytest.approx(40.05)
    assert value_of(parsed, d, d + "_count", role="destination") == 0
    kinds = {name: f.kind for name, f in parsed.items()}
    assert kinds == {
        "migd_build_info": "gauge", "migd_guests": "gauge", "migd_migration_records": "gauge",
        "migd_migrations_total": "counter", "migd_migration_pages_total": "counter",
        "migd_migration_bytes_total": "counter", "migd_migration_rounds_total": "counter",
        "migd_migration_blackouts_total": "counter", "migd_migration_duration_seconds": "histogram",
        "migd_migration_downtime_seconds": "histogram", "migd_incoming_connections_refused_total": "counter",
        "migd_hypercalls_total": "counter",
    }
    assert convention_violations(text) == []
    assert {f.name for f in text_string_to_metric_families(text)} == {
        name.removesuffix("_total") if kind == "counter" else name for name, kind in kinds.items()}


def test_counters_do_not_go_backwards_when_guests_and_migrations_go(host: Host) -> None:
    clock = FakeClock()
    collector = MetricsCollector()
    ok, _, _ = guest_with_hypercalls(host, "g1")
    migrations = [completed_source(120.0, clock)]
    collector.migration_registered(migrations[0])
    before = parse_exposition(collector.render(host.guests.values(), migrations))
    assert value_of(before, "migd_hypercalls_total", result="ok") == ok
    assert value_of(before, "migd_migrations_total", role="source", result="completed") == 1

    # Hypercalls after the last scrape still count: the guest's final value is folded in.
    host.guests["g1"].vm.hypercall(KVM_HC_MAP_GPA_RANGE, [0, 1, 0])
    collector.observe(host.guests.values(), migrations)  # what DELETE does before deleting
    asyncio.run(host.delete("g1"))
    after = parse_exposition(collector.render(host.guests.values(), []))
    assert host.guests == {}
    assert value_of(after, "migd_guests", state="defined") == 0  # gauges follow the state
    assert value_of(after, "migd_migration_records", role="source", status="completed") == 0
    assert value_of(after, "migd_hypercalls_total", result="ok") == ok + 1
    for name in ("migd_migrations_total", "migd_migration_pages_total", "migd_migration_bytes_total",
                 "migd_migration_rounds_total", "migd_migration_blackouts_total", "migd_migration_duration_seconds",
                 "migd_migration_downtime_seconds"):
        assert after[name].samples == before[name].samples, name

    # Negative control: a collector that never saw them has nothing to report.
    fresh = parse_exposition(MetricsCollector().render(host.guests.values(), []))
    assert value_of(fresh, "migd_hypercalls_total", result="ok") == 0
    assert value_of(fresh, "migd_migration_rounds_total", role="source") == 0


@dataclass
class Counted:
    value: int = 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["new", "inc", "drop"]), st.integers(0, 5), st.integers(1, 9)),
                max_size=40))
def test_running_totals_are_monotone_and_exact(ops: list[tuple[str, int, int]]) -> None:
    """Observed after every step, the total is every increment ever made, dropped objects included."""
    totals: RunningTotals[Counted, str] = RunningTotals(lambda c: {"n": c.value})
    live: list[Counted] = []
    made = 0
    last = 0.0
    for op, index, amount in ops:
        if op == "new":
            live.append(Counted())
        elif op == "inc" and live:
            live[index % len(live)].value += amount
            made += amount
        elif op == "drop" and live:
            live.pop(index % len(live))
        totals.observe(live)
        now = totals.totals().get("n", 0)
        assert now >= last, "a counter went backwards"
        assert now == made
        last = now


# ---------------------------------------------------------------------- outcomes: this process only


def test_each_finished_migration_is_counted_once_and_journal_history_never(host: Host) -> None:
    clock = FakeClock()
    collector = MetricsCollector()
    collector.track(host)
    running = MigrationProgress("g1", "source", "127.0.0.1:4444", 4096, phase=MigrationPhase(started_at=clock.now))
    host.add_migration(running)
    running.phase.advance(S.ACTIVE, clock.tick(0.01))

    def outcome(text: str, result: str, role: str = "source") -> float:
        return value_of(parse_exposition(text), "migd_migrations_total", role=role, result=result)

    assert outcome(collector.render([], host.migrations.values()), "completed") == 0  # not finished yet
    running.phase.advance(S.STOP_COPY, clock.tick(1.0))
    running.phase.commit()
    running.phase.advance(S.COMPLETED, clock.tick(1.0))
    for _ in range(3):  # every scrape sees it; none counts it again
        assert outcome(collector.render([], host.migrations.values()), "completed") == 1

    # What recovery does with the journal's history: straight into the registry, not registered.
    history = completed_source(10.0, clock)
    host.migrations[history.id] = history
    text = collector.render([], host.migrations.values())
    assert outcome(text, "completed") == 1
    assert value_of(parse_exposition(text), "migd_migration_records", role="source", status="completed") == 2
    assert value_of(parse_exposition(text), "migd_migration_downtime_seconds",
                    "migd_migration_downtime_seconds_count") == 0  # its downtime is history too
    # Negative control: counting what the host holds (the former gauge's way) counts the history.
    assert sum(1 for m in host.migrations.values() if m.status is S.COMPLETED) == 2
    # ... and the registration is what tells them apart: registered, the same record counts.
    collector.migration_registered(history)
    assert outcome(collector.render([], host.migrations.values()), "completed") == 2


# ---------------------------------------------------------------------- bytes: one definition on both ends


#: Page-aligned runs anywhere a guest can have RAM, as large as the protocol allows (migd/frame_fields.py).
_first_page = st.integers(0, wire.MAX_GUEST_PAGES - wire.MAX_RUN_PAGES)
page_runs = st.one_of(
    st.builds(lambda first, n, hdr: wire.PrivatePages(first * PAGE_SIZE, n, hdr, bytes(n * PAGE_SIZE)),
              _first_page, st.integers(1, 8), st.binary(min_size=52, max_size=52)),
    st.builds(lambda first, n: wire.SharedPages(first * PAGE_SIZE, n, bytes(n * PAGE_SIZE)),
              _first_page, st.integers(1, 8)),
    st.builds(lambda first, n: wire.ZeroPages(first * PAGE_SIZE, n), _first_page, st.integers(1, wire.MAX_RUN_PAGES)),
)


@pytest.mark.filterwarnings("ignore:Generating overly large repr")  # page payloads in a failure report
@settings(max_examples=80, deadline=None)
@given(st.lists(page_runs, min_size=1, max_size=6))
def test_the_destination_counts_the_frames_the_source_wrote(messages: list[wire.Message]) -> None:
    """The source counts the bytes its encoder framed; the destination, page_frame_bytes of what it decoded."""
    encoder = wire.FrameEncoder()
    frames = [encoder.encode(m) for m in messages]
    written = [sum(len(part) for part in parts) for parts in frames]  # what FrameProtocol.write returns
    data = b"".join(bytes(part) for parts in frames for part in parts)
    decoded = [m for m in wire.FrameDecoder().feed(data)
               if isinstance(m, (wire.PrivatePages, wire.SharedPages, wire.ZeroPages))]
    assert len(decoded) == len(messages)
    assert [page_frame_bytes(m) for m in decoded] == written
    assert sum(written) == len(data)
    # Negative control: the destination's former count (the payload only, 0 for a zero run)
    # differs from the source's for every frame.
    old = [len(getattr(m, "payload", b"")) for m in decoded]
    assert all(o != w for o, w in zip(old, written, strict=True))


# ---------------------------------------------------------------------- two real daemons, then a restart

#: A guest with all three kinds of page: half its data area written at boot, a third of that shared.
POPULATED = {"dirty_rate_mib_s": 2, "convert_rate_hz": 5, "seed": 5, "populate_fraction": 0.5, "shared_fraction": 0.3}
KINDS = ("private", "shared", "zero")


async def scrape(api: Api) -> tuple[str, dict[str, ParsedFamily]]:
    """GET /metrics: the text, read by the strict reader, by prometheus_client, and convention-checked."""
    answer = await api.call("GET", "/metrics")
    assert answer.status == 200
    text: str = answer.body
    assert convention_violations(text) == []
    return text, parse_exposition(text)


def by_kind(parsed: dict[str, ParsedFamily], family: str, role: str) -> dict[str, float]:
    return {kind: value_of(parsed, family, role=role, kind=kind) for kind in KINDS}


def test_two_daemons_count_one_migration_once_with_equal_bytes_and_a_restart_counts_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, "hostA") as a, serving(tmp_path, "hostB") as b:
            await a.ok("POST", "/v1/guests", {"name": "g1", "memory_mib": 16}, status=201)
            await a.ok("POST", "/v1/guests/g1/start", {"workload": POPULATED})
            await a.poll("/v1/guests/g1", lambda g: g["migration_control"]["ready"])

            # A migration that fails: nobody listens there.
            lost = await a.ok("POST", "/v1/guests/g1/migrate", {"destination": f"127.0.0.1:{free_port()}"},
                              status=202)
            await a.poll(f"/v1/migrations/{lost['id']}", lambda m: m["status"] == "failed")

            # A connection B refuses: a frame of unknown type (255) before any authentication.
            _, writer = await asyncio.open_connection("127.0.0.1", b.daemon.migration_port)
            writer.write(b"\xff" * 16)
            await writer.drain()
            async with asyncio.timeout(20):
                while not b.daemon.listener.refused:
                    await asyncio.sleep(0.05)
            writer.close()

            moved = await a.ok("POST", "/v1/guests/g1/migrate", {"destination": f"127.0.0.1:{b.daemon.migration_port}"},
                               status=202)
            done = await a.poll(f"/v1/migrations/{moved['id']}", lambda m: m["status"] in ("completed", "failed"))
            assert done["status"] == "completed", done
            arrived = await b.poll(f"/v1/migrations/{moved['id']}", lambda m: m["status"] == "completed")

            for _ in range(3):  # scraping again counts nothing again
                text_a, source = await scrape(a)
            text_b, dest = await scrape(b)
            for text in (text_a, text_b):
                families = {f.name: f.type for f in text_string_to_metric_families(text)}
                assert families["migd_migrations"] == "counter" and families["migd_migration_duration_seconds"] == "histogram"

            # Outcomes: once each, on the side that ran them; durations of both finished ones.
            assert value_of(source, "migd_migrations_total", role="source", result="completed") == 1
            assert value_of(source, "migd_migrations_total", role="source", result="failed") == 1
            assert value_of(dest, "migd_migrations_total", role="destination", result="completed") == 1
            assert sum(dest["migd_migrations_total"].samples.values()) == 1
            d = "migd_migration_duration_seconds"
            assert value_of(source, d, d + "_count", role="source") == 2
            assert value_of(dest, d, d + "_count", role="destination") == 1
            assert value_of(dest, d, d + "_sum", role="destination") == pytest.approx(
                arrived["total_time_ms"] / 1000.0, abs=1e-3)

            # The refused connection, by its reason, every other reason present at 0.
            refused = {dict(labels)["reason"]: v for (_, labels), v in
                       dest["migd_incoming_connections_refused_total"].samples.items()}
            assert refused == {**{r.value: 0 for r in Refusal}, **b.daemon.listener.refused}
            assert refused["protocol-error"] == 1 and sum(refused.values()) == 1

            # Pages by kind, zero pages included, and the same page-frame bytes on both ends.
            pages_sent = by_kind(source, "migd_migration_pages_total", "source")
            assert pages_sent == by_kind(dest, "migd_migration_pages_total", "destination")
            assert pages_sent == {kind: done["pages"][kind] for kind in KINDS}
            assert all(pages_sent[kind] > 0 for kind in KINDS), pages_sent
            sent = by_kind(source, "migd_migration_bytes_total", "source")
            placed = by_kind(dest, "migd_migration_bytes_total", "destination")
            assert sent == placed
            assert done["bytes"]["transferred"] == arrived["bytes"]["transferred"] == sum(sent.values())
            # Negative control: the destination's former count (payloads only: ciphertext and
            # plaintext of a run's pages, nothing for a zero run) differs on every kind.
            former = {"private": pages_sent["private"] * PAGE_SIZE, "shared": pages_sent["shared"] * PAGE_SIZE,
                      "zero": 0}
            assert all(former[kind] != sent[kind] for kind in KINDS), (former, sent)
            await b.ok("POST", "/v1/guests/g1/stop")

        # The same host again: its journal brings the two migrations back, the counters start at 0.
        async with serving(tmp_path, "hostA") as again:
            _, restarted = await scrape(again)
            assert value_of(restarted, "migd_migration_records", role="source", status="completed") == 1
            assert value_of(restarted, "migd_migration_records", role="source", status="failed") == 1
            for name in ("migd_migrations_total", "migd_migration_pages_total", "migd_migration_bytes_total",
                         "migd_migration_rounds_total"):
                assert set(restarted[name].samples.values()) == {0}, name
            for name in ("migd_migration_duration_seconds", "migd_migration_downtime_seconds"):
                assert set(restarted[name].samples.values()) == {0}, name
            # Negative control: the history is there to be miscounted (and was, before: the
            # former counters were sums over every migration the daemon held).
            held = [m for m in again.daemon.host.migrations.values() if m.status.finished]
            assert len(held) == 2 and sum(m.bytes_transferred for m in held) == sum(sent.values())

    run(main, timeout=120)


def metrics_section_lacks(names: set[str]) -> set[str]:
    """The family names docs/operations.md's "Metrics" section does not document (as `name`)."""
    text = (Path(__file__).parent.parent / "docs" / "operations.md").read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return {name for name in names if f"`{name}`" not in section}


def test_every_family_is_documented_for_operators() -> None:
    names = {name for name in re.findall(r"^# TYPE (\S+) ", MetricsCollector().render([], []), re.MULTILINE)}
    assert len(names) == 12
    assert metrics_section_lacks(names) == set()
    # Negative control: a family the section does not name is caught.
    assert metrics_section_lacks(names | {"migd_undocumented_total"}) == {"migd_undocumented_total"}
