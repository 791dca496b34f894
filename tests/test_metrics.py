"""``/metrics`` exposition (migd/daemon/metrics.py): parsed back by a strict reader of the text format
0.0.4, values checked against the daemon state they come from, counters that survive deletion.

The reader is the negative control of the format checks: it must reject broken expositions.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migd import __version__
from migd.abi import KVM_HC_MAP_GPA_RANGE, KVM_MAP_GPA_RANGE_ENCRYPTED, PAGE_SIZE
from migd.guest.host_guest import GuestDefinition
from migd.host import Host
from migd.daemon.metrics import (
    DOWNTIME_BUCKETS_S,
    Family,
    MetricsCollector,
    RunningTotals,
    escape_label_value,
    format_value,
    render_families,
)
from migd.migration_state import MigrationStatus
from migd.page_runs import PageKind
from migd.progress import MigrationProgress
from migd.platform.psp import PspFirmware

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
    buckets = sorted(
        ((_value(dict(labels)["le"]), v) for (sample, labels), v in family.samples.items()
         if sample == name + "_bucket"),
    )
    if not buckets or buckets[-1][0] != math.inf:
        raise FormatError(f"histogram {name} lacks its +Inf bucket")
    counts = [v for _, v in buckets]
    if counts != sorted(counts):
        raise FormatError(f"histogram {name}: buckets are not cumulative: {buckets}")
    if family.samples.get((name + "_count", ())) != counts[-1] or (name + "_sum", ()) not in family.samples:
        raise FormatError(f"histogram {name}: _count must equal the +Inf bucket and _sum must exist")


def value_of(families: dict[str, ParsedFamily], family: str, sample: str | None = None, **labels: str) -> float:
    return families[family].samples[(sample or family, tuple(labels.items()))]


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
    progress = MigrationProgress("g1", "source", "127.0.0.1:4444", 4096)
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
    ok, einval, eperm = guest_with_hypercalls(host, "g1")
    source = completed_source(42.0, clock)
    failed = MigrationProgress("g2", "source", "127.0.0.1:4444", 4096)
    failed.phase.advance(S.FAILED, clock.tick(0.01), error="refused")
    incoming = MigrationProgress("g3", "destination", "127.0.0.1:5555", 4096)
    incoming.phase.advance(S.ACTIVE, clock.tick(0.01))
    incoming.count_run(PageKind.PRIVATE, 50, 50 * PAGE_SIZE)
    incoming.rounds = 1

    text = MetricsCollector().render(host.guests.values(), [source, failed, incoming])
    parsed = parse_exposition(text)

    assert value_of(parsed, "migd_build_info", version=__version__) == 1
    assert value_of(parsed, "migd_guests", state="defined") == 1
    assert value_of(parsed, "migd_guests", state="running") == 0
    assert value_of(parsed, "migd_migrations", role="source", status="completed") == 1
    assert value_of(parsed, "migd_migrations", role="source", status="failed") == 1
    assert value_of(parsed, "migd_migrations", role="destination", status="active") == 1
    assert sum(parsed["migd_migrations"].samples.values()) == 3
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

    h = "migd_migration_downtime_seconds"
    for bound in DOWNTIME_BUCKETS_S:
        assert value_of(parsed, h, h + "_bucket", le=format_value(bound)) == (1 if bound >= 0.042 else 0), bound
    assert value_of(parsed, h, h + "_bucket", le="+Inf") == 1
    assert value_of(parsed, h, h + "_count") == 1
    assert value_of(parsed, h, h + "_sum") == pytest.approx(0.042)
    kinds = {name: f.kind for name, f in parsed.items()}
    assert kinds == {
        "migd_build_info": "gauge", "migd_guests": "gauge", "migd_migrations": "gauge",
        "migd_migration_bytes_total": "counter", "migd_migration_rounds_total": "counter",
        "migd_migration_blackouts_total": "counter", "migd_migration_downtime_seconds": "histogram",
        "migd_hypercalls_total": "counter",
    }


def test_counters_do_not_go_backwards_when_guests_and_migrations_go(host: Host) -> None:
    clock = FakeClock()
    collector = MetricsCollector()
    ok, _, _ = guest_with_hypercalls(host, "g1")
    migrations = [completed_source(120.0, clock)]
    before = parse_exposition(collector.render(host.guests.values(), migrations))
    assert value_of(before, "migd_hypercalls_total", result="ok") == ok

    # Hypercalls after the last scrape still count: the guest's final value is folded in.
    host.guests["g1"].vm.hypercall(KVM_HC_MAP_GPA_RANGE, [0, 1, 0])
    collector.observe(host.guests.values(), migrations)  # what DELETE does before deleting
    asyncio.run(host.delete("g1"))
    after = parse_exposition(collector.render(host.guests.values(), []))
    assert host.guests == {}
    assert value_of(after, "migd_guests", state="defined") == 0  # gauges follow the state
    assert value_of(after, "migd_migrations", role="source", status="completed") == 0
    assert value_of(after, "migd_hypercalls_total", result="ok") == ok + 1
    for name in ("migd_migration_bytes_total", "migd_migration_rounds_total", "migd_migration_blackouts_total",
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
