"""``GET /metrics``: the daemon's state in the Prometheus text exposition format 0.0.4.

Hand-written (the format is small and this keeps the daemon free of a metrics library).
Families (docs/operations.md "Metrics" has each one's meaning and example alerts):

- gauges: ``migd_build_info{version}``; ``migd_guests{state}`` and
  ``migd_migration_records{role,status}``: the guests / migration records this daemon holds
  right now (the records include the history its journal reloaded at start);
- counters: ``migd_migrations_total{role,result}``, ``migd_migration_pages_total{role,kind}``,
  ``migd_migration_bytes_total{role,kind}``, ``migd_migration_rounds_total{role}``,
  ``migd_migration_blackouts_total``, ``migd_incoming_connections_refused_total{reason}``,
  ``migd_hypercalls_total{result}``;
- histograms: ``migd_migration_duration_seconds{role}`` (finished migrations) and
  ``migd_migration_downtime_seconds`` (completed outgoing ones).

Every label value that can occur is always present, 0 included, so series never vanish. ``role``
is one of :data:`ROLES`: ``source``, ``destination``, and the file jobs ``save`` and ``restore``
(listed with the migrations under /v1/migrations).

The migration counters and histograms count the migrations this process registered
(:meth:`MetricsCollector.track` listens to ``Host.add_migration``), never the history a restart
reloads from the journal: a restart starts every counter at 0, as Prometheus expects of a
process, whatever the journal holds. Counters never go backwards while the process lives: the
objects they are summed over (a guest's hypercall counts, a migration's progress) are held by
:class:`MetricsCollector` after they leave the daemon (a deleted guest) and folded into running
totals at the next observation. The REST ``DELETE`` observes right before deleting; a guest
that comes and goes between two observations without passing through it is not counted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from migd import __version__
from migd.guest.host_guest import GuestState
from migd.listener import Refusal
from migd.migration_state import MigrationStatus
from migd.daemon.openapi import METRICS_CONTENT_TYPE, MIGRATION_ROLES
from migd.page_runs import PageKind
from migd.progress import MigrationProgress

CONTENT_TYPE = METRICS_CONTENT_TYPE
#: Downtime histogram buckets, seconds: the default limit is 300 ms (docs/design.md §9), so the
#: buckets are dense from 5 ms to 1 s and coarse above.
DOWNTIME_BUCKETS_S: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0)
#: Duration histogram buckets, seconds: a small guest on loopback takes about a second, a large
#: one behind a rate limit or a busy link minutes; past an hour only the count matters.
DURATION_BUCKETS_S: tuple[float, ...] = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: The ``role`` label: both ends of a live migration, and the save / restore jobs, which the
#: daemon lists with the migrations (docs/design.md §7; ``Migration.role`` in the OpenAPI document).
ROLES = MIGRATION_ROLES
#: Roles that send a running guest's pages under the migration-control MSR gate (blackouts, downtime).
_SENDING_ROLES = ("source", "save")
#: The ``result`` label of ``migd_migrations_total``: the final statuses.
RESULTS: tuple[MigrationStatus, ...] = tuple(s for s in MigrationStatus if s.finished)
#: Hypercall results, the keys of VmPlatform.hypercall_counts (migd/guest/vm.py).
HYPERCALL_RESULTS = ("ok", "enosys", "einval", "eperm")


class VmView(Protocol):
    hypercall_counts: dict[str, int]


class MigrationRegistry(Protocol):
    """What the metrics need of migd.host.Host: to be told of each migration it registers."""

    migration_listeners: list[Callable[[MigrationProgress], None]]


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


def _observe(out: dict[MigrationKey, float], key: MigrationKey, value: float, buckets: tuple[float, ...]) -> None:
    """One histogram observation, as per-migration counters under ``key``."""
    out[(*key, "count")] = 1
    out[(*key, "sum")] = value
    for bound in buckets:
        out[(*key, "le", repr(bound))] = 1 if value <= bound else 0


def _migration_counters(progress: MigrationProgress) -> dict[MigrationKey, float]:
    role, status = progress.role, progress.status
    out: dict[MigrationKey, float] = {("rounds", role): progress.rounds}
    for kind in PageKind:
        out[("bytes", role, kind.value)] = progress.bytes_by_kind[kind]
        out[("pages", role, kind.value)] = progress.pages[kind]
    # A final status is final (migd/migration_state.py TRANSITIONS): each migration adds 1 once.
    if status.finished and progress.phase.finished_at is not None:
        out[("result", role, status.value)] = 1
        duration_s = progress.phase.total_time_ms(progress.phase.finished_at) / 1000.0
        _observe(out, ("duration", role), duration_s, DURATION_BUCKETS_S)
    if role in _SENDING_ROLES:  # a save stops writing pages in a blackout as a source stops sending
        out[("blackouts",)] = progress.phase.blackouts
    if role == "source":
        # Read at each observation, not at the transition: the source sets downtime_ms just
        # after "completed" (on the verified STARTED, migd/source.py), with no await between.
        if progress.downtime_ms is not None and status is MigrationStatus.COMPLETED:
            _observe(out, ("downtime",), progress.downtime_ms / 1000.0, DOWNTIME_BUCKETS_S)
    return out


def _histogram(family: Family, counters: Mapping[MigrationKey, float], key: MigrationKey,
               buckets: tuple[float, ...], **labels: str) -> None:
    """The _bucket (cumulative: each migration counted 1 in every bucket it fits), _sum and _count samples."""
    for bound in buckets:
        family.add(counters.get((*key, "le", repr(bound)), 0), "_bucket", **labels, le=format_value(bound))
    count = counters.get((*key, "count"), 0)
    family.add(count, "_bucket", **labels, le="+Inf")
    family.add(counters.get((*key, "sum"), 0.0), "_sum", **labels)
    family.add(count, "_count", **labels)


# ---------------------------------------------------------------------- the collector


class MetricsCollector:
    """The metrics of one daemon; keeps the running totals between scrapes."""

    def __init__(self) -> None:
        self._hypercalls: RunningTotals[dict[str, int], str] = RunningTotals(_hypercalls)
        self._migrations: RunningTotals[MigrationProgress, MigrationKey] = RunningTotals(_migration_counters)
        #: Ids of the migrations registered in this process (ids are unique on a host: the
        #: destination refuses one in use), the only ones the migration counters sum over.
        self._registered: set[str] = set()

    def track(self, host: MigrationRegistry) -> None:
        """Count the migrations ``host`` registers from now on (before the daemon starts: none missed)."""
        host.migration_listeners.append(self.migration_registered)

    def migration_registered(self, progress: MigrationProgress) -> None:
        """A migration of this process (not one restored from the journal): count it."""
        self._registered.add(progress.id)

    def observe(self, guests: Iterable[GuestView], migrations: Iterable[MigrationProgress]) -> None:
        """Take note of the guests and migrations alive now (call before anything is removed)."""
        self._hypercalls.observe(g.vm.hypercall_counts for g in guests)
        self._migrations.observe(m for m in migrations if m.id in self._registered)

    def families(self, guests: Iterable[GuestView], migrations: Iterable[MigrationProgress],
                 refused: Mapping[str, int] | None = None) -> list[Family]:
        """Every metric family, from the current state plus the running totals.

        ``refused``: the listener's refusals by reason (``MigrationListener.refused``); every
        :class:`~migd.listener.Refusal` is reported, 0 included, and any other key as it is.
        """
        guests, migrations = list(guests), list(migrations)
        self.observe(guests, migrations)
        hypercalls = self._hypercalls.totals()
        counters = self._migrations.totals()

        info = Family("migd_build_info", "gauge", "Always 1; the version label is the daemon's version.")
        info.add(1, version=__version__)

        by_state = Family("migd_guests", "gauge", "Guests on this host by state.")
        for state in GuestState:
            by_state.add(sum(1 for g in guests if g.state is state), state=state.value)

        records = Family("migd_migration_records", "gauge",
                         "Migration records this daemon holds now, by role and status: those it ran since it "
                         "started and the history its journal reloaded at start.")
        for role in ROLES:
            for status in MigrationStatus:
                records.add(sum(1 for m in migrations if m.role == role and m.status is status),
                            role=role, status=status.value)

        results = Family("migd_migrations_total", "counter",
                         "Migrations of this process that reached a final status, by role and result "
                         "(history reloaded from the journal not included).")
        for role in ROLES:
            for status in RESULTS:
                results.add(counters.get(("result", role, status.value), 0), role=role, result=status.value)

        pages = Family("migd_migration_pages_total", "counter",
                       "Guest pages by kind (private, shared, zero) the source sent or the destination placed "
                       "(save: wrote to its file; restore: placed from it); pages re-sent in later rounds count "
                       "again.")
        nbytes = Family("migd_migration_bytes_total", "counter",
                        "Bytes of page frames (whole frames: prefix, metadata, payload, CRC) by page kind; "
                        "source: written, destination: placed; save and restore: page slots and table entries "
                        "of the file.")
        for role in ROLES:
            for kind in PageKind:
                pages.add(counters.get(("pages", role, kind.value), 0), role=role, kind=kind.value)
                nbytes.add(counters.get(("bytes", role, kind.value), 0), role=role, kind=kind.value)

        rounds = Family("migd_migration_rounds_total", "counter", "Pre-copy and stop-and-copy rounds.")
        for role in ROLES:
            rounds.add(counters.get(("rounds", role), 0), role=role)

        blackouts = Family("migd_migration_blackouts_total", "counter",
                           "Times an outgoing migration or a save stopped sending or writing pages because the "
                           "guest's MSR dropped.")
        blackouts.add(counters.get(("blackouts",), 0))

        duration = Family("migd_migration_duration_seconds", "histogram",
                          "Total time (start to final status) of finished migrations, any result, by role.")
        for role in ROLES:
            _histogram(duration, counters, ("duration", role), DURATION_BUCKETS_S, role=role)

        downtime = Family("migd_migration_downtime_seconds", "histogram",
                          "Guest downtime (pause to destination start) of completed outgoing migrations.")
        _histogram(downtime, counters, ("downtime",), DOWNTIME_BUCKETS_S)

        reasons = {reason.value: 0 for reason in Refusal}
        for reason, count in sorted((refused or {}).items(), key=lambda item: str(item[0])):
            reasons[str(reason)] = count
        refusals = Family("migd_incoming_connections_refused_total", "counter",
                          "Incoming migration connections closed before their peer was authenticated, by reason.")
        for reason_text, count in reasons.items():
            refusals.add(count, reason=reason_text)

        calls = Family("migd_hypercalls_total", "counter",
                       "Guest hypercalls (KVM_HC_MAP_GPA_RANGE; unknown numbers: enosys) by result.")
        for result in HYPERCALL_RESULTS:
            calls.add(hypercalls.get(result, 0), result=result)

        return [info, by_state, records, results, pages, nbytes, rounds, blackouts, duration, downtime, refusals,
                calls]

    def render(self, guests: Iterable[GuestView], migrations: Iterable[MigrationProgress],
               refused: Mapping[str, int] | None = None) -> str:
        """The exposition text served at ``/metrics``."""
        return render_families(self.families(guests, migrations, refused))


__all__ = [
    "CONTENT_TYPE", "DOWNTIME_BUCKETS_S", "DURATION_BUCKETS_S", "RESULTS", "Family", "MetricsCollector",
    "MigrationRegistry", "ROLES", "RunningTotals", "escape_help", "escape_label_value", "format_value",
    "render_families",
]
