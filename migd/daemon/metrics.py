"""``GET /metrics``: the daemon's state in the Prometheus text exposition format 0.0.4.

Hand-written (the format is small and this keeps the daemon free of a metrics library).
Families:

- ``migd_guests{state}`` (gauge) and ``migd_migrations{role,status}`` (gauge): how many
  guests / migrations this daemon holds in each state right now; every label value is
  always present, 0 included, so series never vanish.
- ``migd_migration_bytes_total{role,kind}``, ``migd_migration_rounds_total{role}``,
  ``migd_migration_blackouts_total``, ``migd_hypercalls_total{result}`` (counters) and
  ``migd_migration_downtime_seconds`` (histogram of completed outgoing migrations).

Counters never go backwards while the process lives: the objects they are summed over
(a guest's hypercall counts, a migration's progress) are held by :class:`MetricsCollector`
after they leave the daemon (a deleted guest) and folded into running totals at the next
observation. The REST ``DELETE`` observes right before deleting; a guest that comes and goes
between two observations without passing through it (an incoming migration that failed
before anyone looked) is not counted. A restart starts the counters again, as Prometheus
expects of any process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from migd import __version__
from migd.guest.host_guest import GuestState
from migd.migration_state import MigrationStatus
from migd.daemon.openapi import METRICS_CONTENT_TYPE
from migd.page_runs import PageKind
from migd.progress import MigrationProgress

CONTENT_TYPE = METRICS_CONTENT_TYPE
#: Downtime histogram buckets, seconds: the default limit is 300 ms (docs/design.md §9), so the
#: buckets are dense from 5 ms to 1 s and coarse above.
DOWNTIME_BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
ROLES = ("source", "destination")
#: Hypercall results, the keys of VmPlatform.hypercall_counts (migd/guest/vm.py).
HYPERCALL_RESULTS = ("ok", "enosys", "einval", "eperm")


class VmView(Protocol):
    hypercall_counts: dict[str, int]


class GuestView(Protocol):
    """What the metrics read of a guest (migd.guest.host_guest.HostGuest)."""

    @property
    def state(self) -> GuestState: ...

    @property
    def vm(self) -> VmView: ...


# ---------------------------------------------------------------------- exposition


def escape_label_value(value: str) -> str:
    """Label value escaping of the text format: backslash, double quote, line feed."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text escaping: backslash and line feed (quotes stay)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, Go-style +Inf/-Inf/NaN."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(value)


Labels = tuple[tuple[str, str], ...]


@dataclass
class Family:
    """One metric family: HELP, TYPE and its samples (name suffix, labels, value)."""

    name: str
    kind: str  # "gauge" | "counter" | "histogram"
    help: str
    samples: list[tuple[str, Labels, float]] = field(default_factory=list)

    def add(self, value: float, suffix: str = "", **labels: str) -> None:
        self.samples.append((suffix, tuple(labels.items()), value))

    def render(self) -> str:
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for suffix, labels, value in self.samples:
            text = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels)
            lines.append(f"{self.name}{suffix}{{{text}}} {format_value(value)}" if text
                         else f"{self.name}{suffix} {format_value(value)}")
        return "\n".join(lines) + "\n"


def render_families(families: Iterable[Family]) -> str:
    """The whole exposition (ends with a line feed, as the format requires)."""
    return "".join(f.render() for f in families)


# ---------------------------------------------------------------------- running totals

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)


class RunningTotals(Generic[T, K]):
    """Sum of per-object counters over the objects alive now plus every one seen before.

    An object is held from its first observation until an observation no longer finds it;
    then its counters (final by then: it left the daemon) join the retired totals. Holding it
    also keeps its ``id`` from being reused while it is tracked.
    """

    def __init__(self, extract: Callable[[T], Mapping[K, float]]) -> None:
        self._extract = extract
        self._live: dict[int, T] = {}
        self._retired: dict[K, float] = {}

    def observe(self, objects: Iterable[T]) -> None:
        current = {id(o): o for o in objects}
        for key in [k for k in self._live if k not in current]:
            for name, value in self._extract(self._live.pop(key)).items():
                self._retired[name] = self._retired.get(name, 0) + value
        self._live.update(current)

    def totals(self) -> dict[K, float]:
        total = dict(self._retired)
        for obj in self._live.values():
            for name, value in self._extract(obj).items():
                total[name] = total.get(name, 0) + value
        return total


def _hypercalls(counts: dict[str, int]) -> Mapping[str, float]:
    return counts


MigrationKey = tuple[str, ...]


def _migration_counters(progress: MigrationProgress) -> dict[MigrationKey, float]:
    role = progress.role
    out: dict[MigrationKey, float] = {("rounds", role): progress.rounds}
    for kind in PageKind:
        out[("bytes", role, kind.value)] = progress.bytes_by_kind[kind]
    if role == "source":
        out[("blackouts",)] = progress.phase.blackouts
        if progress.downtime_ms is not None and progress.status is MigrationStatus.COMPLETED:
            seconds = progress.downtime_ms / 1000.0
            out[("downtime", "count")] = 1
            out[("downtime", "sum")] = seconds
            for bound in DOWNTIME_BUCKETS_S:
                out[("downtime", "le", repr(bound))] = 1 if seconds <= bound else 0
    return out


# ---------------------------------------------------------------------- the collector


class MetricsCollector:
    """The metrics of one daemon; keeps the running totals between scrapes."""

    def __init__(self) -> None:
        self._hypercalls: RunningTotals[dict[str, int], str] = RunningTotals(_hypercalls)
        self._migrations: RunningTotals[MigrationProgress, MigrationKey] = RunningTotals(_migration_counters)

    def observe(self, guests: Iterable[GuestView], migrations: Iterable[MigrationProgress]) -> None:
        """Take note of the guests and migrations alive now (call before anything is removed)."""
        self._hypercalls.observe(g.vm.hypercall_counts for g in guests)
        self._migrations.observe(migrations)

    def families(self, guests: Iterable[GuestView], migrations: Iterable[MigrationProgress]) -> list[Family]:
        """Every metric family, from the current state plus the running totals."""
        guests, migrations = list(guests), list(migrations)
        self.observe(guests, migrations)
        hypercalls = self._hypercalls.totals()
        counters = self._migrations.totals()

        info = Family("migd_build_info", "gauge", "Always 1; the version label is the daemon's version.")
        info.add(1, version=__version__)

        by_state = Family("migd_guests", "gauge", "Guests on this host by state.")
        for state in GuestState:
            by_state.add(sum(1 for g in guests if g.state is state), state=state.value)

        by_status = Family("migd_migrations", "gauge",
                           "Migrations this daemon knows (since it started) by role and status.")
        for role in ROLES:
            for status in MigrationStatus:
                by_status.add(sum(1 for m in migrations if m.role == role and m.status is status),
                              role=role, status=status.value)

        nbytes = Family("migd_migration_bytes_total", "counter",
                        "Bytes on the migration stream by page kind (source: sent, destination: received).")
        for role in ROLES:
            for kind in PageKind:
                nbytes.add(counters.get(("bytes", role, kind.value), 0), role=role, kind=kind.value)

        rounds = Family("migd_migration_rounds_total", "counter", "Pre-copy and stop-and-copy rounds.")
        for role in ROLES:
            rounds.add(counters.get(("rounds", role), 0), role=role)

        blackouts = Family("migd_migration_blackouts_total", "counter",
                           "Times an outgoing migration stopped sending because the guest's MSR dropped.")
        blackouts.add(counters.get(("blackouts",), 0))

        downtime = Family("migd_migration_downtime_seconds", "histogram",
                          "Guest downtime (pause to destination start) of completed outgoing migrations.")
        for bound in DOWNTIME_BUCKETS_S:
            downtime.add(counters.get(("downtime", "le", repr(bound)), 0), "_bucket", le=format_value(bound))
        count = counters.get(("downtime", "count"), 0)
        downtime.add(count, "_bucket", le="+Inf")
        downtime.add(counters.get(("downtime", "sum"), 0.0), "_sum")
        downtime.add(count, "_count")

        calls = Family("migd_hypercalls_total", "counter",
                       "Guest hypercalls (KVM_HC_MAP_GPA_RANGE; unknown numbers: enosys) by result.")
        for result in HYPERCALL_RESULTS:
            calls.add(hypercalls.get(result, 0), result=result)

        return [info, by_state, by_status, nbytes, rounds, blackouts, downtime, calls]

    def render(self, guests: Iterable[GuestView], migrations: Iterable[MigrationProgress]) -> str:
        """The exposition text served at ``/metrics``."""
        return render_families(self.families(guests, migrations))


__all__ = [
    "CONTENT_TYPE", "DOWNTIME_BUCKETS_S", "Family", "MetricsCollector", "RunningTotals", "escape_help",
    "escape_label_value", "format_value", "render_families",
]
