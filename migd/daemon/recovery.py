"""Restart recovery: what a daemon does with the journal it finds at start (after SIGTERM or SIGKILL).

The rules (docs/design.md §8 "Invariants", 4 and 5; the hand-off's commit record decides):

* a migration that was in flight is over: without a commit record it **failed** ("daemon
  restarted during the migration"); with one it **completed** — the hand-off had passed its
  point of no return — and the error says the daemon restarted after the commit;
* source side: no commit record → the guest stays here, intact; commit record → it is
  ``migrated`` here (RAM and key released: the destination owns it);
* a save (role ``save``) is a source whose destination is a file: no commit record → the guest
  stays here, intact, and the temporary ``.part`` file is removed; commit record → the guest is
  ``saved`` (RAM and key released) and the file is finished (its trailer MAC computed again from
  the journaled hand-off key, then its final name). A restore (role ``restore``) is a
  destination: no commit record → the partial guest is removed and the file stays restorable;
* destination side: an incoming guest without a commit record is removed with every trace
  (guest directory, firmware context, journal row); with one it stays. One that reached
  PREPARED without it (its migration was journaled ``stop-copy``: verified, RECEIVE_FINISH
  done) is **in doubt**: the source may have committed when PREPARED reached it, and then this
  is the only copy of the guest, so it is neither removed nor offered to run. Its directory,
  firmware context and journal row stay (the name stays taken), and a background task asks the
  source's listener (RESOLVE, at the address journaled at HELLO) how the migration ended, as a
  live destination does (``IncomingMigration._resolve_in_doubt``): ``committed`` → the guest is
  kept, ``stopped``, like any guest whose host restarted; ``aborted``/``unknown`` → removed;
  ``pending`` or unreachable → asked again (bounded), then left in doubt for the operator and
  asked again at the next start;
* the guest agents of the previous daemon are gone — they end when their hypercall channel
  closes (:mod:`migd.guest.agent`), and under systemd ``KillMode=mixed`` kills them with the
  daemon's cgroup anyway. A guest that was running (or paused, or had just arrived) is
  therefore reported ``stopped``, its RAM file and firmware context intact, and can be started
  again: like a QEMU process that died with its VM. An agent that somehow outlived its
  daemon (recorded pid *and* start time still match) is killed first, so exactly one copy of
  a guest ever runs.

:func:`guest_fate` and :func:`final_status` are the decision table, without I/O; :func:`recover`
applies them to a :class:`~migd.host.Host` and its :class:`~migd.journal.Journal`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import ssl
import time
from collections.abc import Iterable
from pathlib import Path
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from migd.errors import MigdError
from migd.guest.agent_launcher import process_start_ticks
from migd.guest.host_guest import INCOMING_MARKER, GuestState
from migd.journal import GuestRecord, Journal, MigrationRecord, restore_progress
from migd.migration_state import MigrationStatus
from migd.resolve import ask_source
from migd.save import finish_interrupted, part_path
from migd.dest_session import DestinationSession

if TYPE_CHECKING:
    from migd.host import Host

log = logging.getLogger(__name__)

RESTART_ERROR: Final = "daemon restarted during the migration"
STALE_AGENT_TIMEOUT_S: Final = 5.0
RESOLVE_TIMEOUT_S: Final = 300.0  # how long a restarted destination keeps asking before the operator decides
RESOLVE_INTERVAL_S: Final = 1.0


class Fate(enum.Enum):
    """What recovery does with one journaled guest."""

    KEEP = "keep"  # defined or stopped: reloaded as it was
    STOPPED = "stopped"  # its agent is gone: reloaded as stopped, memory intact
    REMOVE = "remove"  # an uncommitted incoming guest: every trace goes
    MIGRATED = "migrated"  # the source side of a committed hand-off: only the record stays
    SAVED = "saved"  # a committed save: the file holds the guest, only the record stays
    IN_DOUBT = "in-doubt"  # PREPARED, no commit record: kept unregistered until the source answers


def final_status(record: MigrationRecord) -> tuple[MigrationStatus, str]:
    """How a migration found unfinished at start ends, and why."""
    if record.committed:
        owner = {"source": "the destination owns the guest", "save": "the file holds the guest"}.get(
            record.role, "the guest was kept here")
        return MigrationStatus.COMPLETED, f"{RESTART_ERROR}, after the commit: {owner}"
    return MigrationStatus.FAILED, RESTART_ERROR


def guest_fate(state: str, latest: MigrationRecord | None, *, dir_exists: bool, marker: bool) -> Fate:
    """The fate of one guest from its journaled state and the newest migration that names it.

    ``dir_exists``/``marker``: whether its directory and the ``incoming`` marker are on disk. A
    missing marker on an existing directory means COMMIT arrived (the marker goes after the
    commit record), so the guest is kept even if the journal's commit record failed to write.
    ``latest`` must be the record as journaled before the restart ended it (``stop-copy`` tells
    a prepared incoming guest, in doubt, from a partial one).
    """
    if latest is not None and latest.committed:
        if latest.role == "source":
            return Fate.MIGRATED
        if latest.role == "save":
            return Fate.SAVED
        return Fate.KEEP if state in (GuestState.DEFINED.value, GuestState.STOPPED.value) else Fate.STOPPED
    if state == GuestState.MIGRATED.value:
        return Fate.MIGRATED
    if state == GuestState.SAVED.value:
        return Fate.SAVED
    if state == GuestState.INCOMING.value:
        if dir_exists and marker and latest is not None and latest.prepared_in_doubt:
            return Fate.IN_DOUBT
        return Fate.STOPPED if dir_exists and not marker else Fate.REMOVE
    if state in (GuestState.RUNNING.value, GuestState.PAUSED.value):
        return Fate.STOPPED
    return Fate.KEEP


# ---------------------------------------------------------------------- processes


async def kill_stale_agent(pid: int, start_ticks: int | None, timeout: float = STALE_AGENT_TIMEOUT_S) -> bool:
    """SIGKILL the previous daemon's agent if that very process still runs; True if it had to."""
    if start_ticks is None or process_start_ticks(pid) != start_ticks:
        return False
    log.warning("killing the previous daemon's guest agent pid=%d (it outlived its channel)", pid)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    async with asyncio.timeout(timeout):
        while process_start_ticks(pid) == start_ticks:
            await asyncio.sleep(0.01)
    return True


# ---------------------------------------------------------------------- the procedure


def _finish_save(journal: Journal, record: MigrationRecord) -> bool:
    """A save the daemon died in: its temporary file goes, or (committed) the file is finished.

    False if a committed save's file could not be finished: no restore accepts it then, so the
    guest's memory here is its only copy and must be kept.
    """
    path = Path(record.peer)
    try:
        done = finish_interrupted(path, record.id, committed=record.committed, finished=record.finished,
                                  key=journal.handoff_key(record.id) if record.committed else None)
    except (MigdError, OSError) as exc:
        log.error("save %s of guest %s to %s could not be finished: %s; the guest's memory is kept here (and "
                  "the unfinished file removed: once this guest runs again, no later restart may finish it)",
                  record.id, record.guest, record.peer, exc)
        with contextlib.suppress(OSError):
            os.unlink(part_path(path, record.id))
        return False
    if done is not None:
        log.warning("save %s of guest %s, interrupted: %s", record.id, record.guest, done)
    return True


@dataclass(frozen=True)
class RecoveryReport:
    """What :func:`recover` did (logged, and kept on the daemon for diagnosis)."""

    guests: tuple[str, ...]  # reloaded (any state)
    stopped: tuple[str, ...]  # had an agent: now stopped, memory intact
    removed: tuple[str, ...]  # uncommitted incoming guests removed
    migrated: tuple[str, ...]  # committed source guests released
    ended_migrations: tuple[str, ...]  # in flight at the restart: marked failed / completed
    killed_agents: tuple[int, ...]
    unrecoverable: tuple[str, ...]  # journaled but could not be reloaded (see the log)
    in_doubt: tuple[str, ...] = ()  # prepared incoming guests kept until their source answers
    #: The background task asking their sources (None if there are none). The daemon keeps the
    #: report, so the task lives as long as the loop (``asyncio.run`` cancels it at shutdown).
    resolving: asyncio.Task[dict[str, str]] | None = None


def _latest_by_guest(records: Iterable[MigrationRecord]) -> dict[str, MigrationRecord]:
    latest: dict[str, MigrationRecord] = {}
    for record in records:  # oldest first
        latest[record.guest] = record
    return latest


def _about(migration: MigrationRecord | None, guest: GuestRecord) -> MigrationRecord | None:
    """``migration`` if it can be about this guest row, else None.

    Migrations are matched by name. A guest migrates out only after its row exists, so an
    outgoing migration that started before the row was created was another guest's of the same
    name (one that left, whose record was then deleted or expired): taken for this one, it would
    release a guest that runs only here. An incoming migration creates its row, so it is kept.
    """
    if migration is not None and migration.role in ("source", "save") and migration.started_at < guest.created_at:
        return None
    return migration


async def recover(host: Host, journal: Journal, *, client_ssl: ssl.SSLContext | None = None,
                  resolve_timeout_s: float = RESOLVE_TIMEOUT_S,
                  resolve_interval_s: float = RESOLVE_INTERVAL_S) -> RecoveryReport:
    """Bring ``host`` back to what ``journal`` recorded (see the module docstring); run before listening.

    ``client_ssl``: the TLS client context to RESOLVE in-doubt migrations with (mutual TLS).
    """
    ended: list[str] = []
    records = []
    journaled = journal.migrations()
    before = _latest_by_guest(journaled)  # as journaled: a prepared one is still stop-copy
    doubtful: dict[str, MigrationRecord] = {}
    unfinished_saves: set[str] = set()  # ids of committed saves whose file could not be finished
    for record in journaled:
        if (record.prepared_in_doubt and before[record.guest] is record
                and (host.guest_dir(record.guest) / INCOMING_MARKER).exists()):
            doubtful[record.guest] = record  # not over: only its source knows how it ended
            records.append(record)
            continue
        if record.role == "save" and (not record.finished or record.committed) and \
                not _finish_save(journal, record) and record.committed:
            unfinished_saves.add(record.id)
        if not record.finished:
            status, error = final_status(record)
            journal.finish_migration(record.id, status, error)
            log.warning("migration %s (%s of guest %s) ended by the restart: %s, %s",
                        record.id, record.role, record.guest, status.value, error)
            ended.append(record.id)
        records.append(record)
    records = journal.migrations() if ended else records
    for record in records:
        host.migrations[record.id] = restore_progress(record)
    latest = {**_latest_by_guest(records), **doubtful}

    reloaded: list[str] = []
    stopped: list[str] = []
    removed: list[str] = []
    migrated: list[str] = []
    killed: list[int] = []
    unrecoverable: list[str] = []
    in_doubt: list[MigrationRecord] = []
    for row in journal.guests():
        try:
            if row.agent_pid is not None and await kill_stale_agent(row.agent_pid, row.agent_start):
                killed.append(row.agent_pid)
        except (OSError, TimeoutError) as exc:
            # Loading the guest could make a second copy run: leave it to the operator.
            log.error("guest %s: its previous agent pid=%d cannot be stopped (%s); not reloading it",
                      row.name, row.agent_pid, exc)
            unrecoverable.append(row.name)
            continue
        guest_dir = host.guest_dir(row.name)
        fate = guest_fate(row.state, _about(latest.get(row.name), row), dir_exists=guest_dir.is_dir(),
                          marker=(guest_dir / INCOMING_MARKER).exists())
        about = _about(latest.get(row.name), row)
        if fate is Fate.SAVED and about is not None and about.id in unfinished_saves:
            fate = Fate.STOPPED  # no restore accepts its file: the memory here is the guest's only copy
        if fate is Fate.IN_DOUBT:
            migration = doubtful[row.name]
            host.migrations[migration.id].phase.error = "in doubt after a daemon restart: asking the source"
            log.warning("guest %s: prepared by migration %s without a commit record; in doubt, kept (not "
                        "started) until its source %s answers", row.name, migration.id, migration.resolve_address)
            in_doubt.append(migration)
            continue
        try:
            if fate is Fate.REMOVE:
                host.remove_leftover(row.name, row.handle)
                journal.delete_guest(row.name)
                removed.append(row.name)
                continue
            state = {
                Fate.MIGRATED: GuestState.MIGRATED, Fate.SAVED: GuestState.SAVED, Fate.STOPPED: GuestState.STOPPED,
            }.get(fate, GuestState(row.state))
            guest = host.restore_guest(row, state)
        except (MigdError, OSError, ValueError) as exc:
            log.error("guest %s cannot be reloaded from the journal: %s", row.name, exc)
            unrecoverable.append(row.name)
            continue
        reloaded.append(row.name)
        if fate is Fate.STOPPED:
            stopped.append(row.name)
        elif fate is Fate.MIGRATED and row.state != GuestState.MIGRATED.value:
            migrated.append(row.name)
        host.journal_guest(guest)
    pruned = journal.prune()
    resolving = None
    if in_doubt:
        resolving = asyncio.get_running_loop().create_task(
            resolve_in_doubt(host, journal, in_doubt, client_ssl=client_ssl, timeout_s=resolve_timeout_s,
                             interval_s=resolve_interval_s),
            name="resolve-in-doubt")
    report = RecoveryReport(tuple(reloaded), tuple(stopped), tuple(removed), tuple(migrated), tuple(ended),
                            tuple(killed), tuple(unrecoverable), tuple(r.guest for r in in_doubt), resolving)
    if any((stopped, removed, migrated, ended, killed, unrecoverable, in_doubt)) or pruned:
        log.warning("restart recovery: %s pruned_migrations=%d", report, pruned)
    elif reloaded:
        log.info("reloaded %d guests from the journal", len(reloaded))
    return report



# ---------------------------------------------------------------------- in-doubt incoming guests


async def resolve_in_doubt(
    host: Host, journal: Journal, records: Iterable[MigrationRecord], *, client_ssl: ssl.SSLContext | None = None,
    timeout_s: float = RESOLVE_TIMEOUT_S, interval_s: float = RESOLVE_INTERVAL_S,
) -> dict[str, str]:
    """Ask the sources of in-doubt incoming guests how their migrations ended, and act on it.

    Returns migration id → what was done: ``kept`` (the source committed: the guest is
    registered ``stopped``), ``removed`` (it aborted or never heard of it) or ``in doubt`` (no
    answer within ``timeout_s``, or no address to ask: left for the operator, asked again at the
    next start).
    """
    pending = list(records)
    results = await asyncio.gather(*(
        _resolve_one(host, journal, record, client_ssl=client_ssl, timeout_s=timeout_s, interval_s=interval_s)
        for record in pending
    ))
    return {record.id: result for record, result in zip(pending, results)}


async def _resolve_one(host: Host, journal: Journal, record: MigrationRecord, *,
                       client_ssl: ssl.SSLContext | None, timeout_s: float, interval_s: float) -> str:
    address = record.resolve_address
    if address is None:
        log.error("guest %s: migration %s is in doubt and its source's address was never journaled; kept "
                  "(not started) for the operator", record.guest, record.id)
        return "in doubt"
    key = journal.handoff_key(record.id)
    if key is None:
        log.error("guest %s: migration %s is in doubt and its hand-off key was never journaled: the source's "
                  "answer could not be authenticated; kept (not started) for the operator", record.guest, record.id)
        return "in doubt"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            outcome = await ask_source(address, record.id, key, client_ssl=client_ssl)
        except (MigdError, OSError, TimeoutError) as exc:
            log.info("RESOLVE %s: source %s not reachable yet (%s)", record.id, address, exc)
        else:
            if outcome in ("committed", "aborted"):  # "unknown" under the key: a source that lost its record
                try:
                    if outcome == "committed":
                        return _keep_committed(host, journal, record)
                    return _remove_aborted(host, journal, record, outcome)
                except (MigdError, OSError, ValueError) as exc:
                    # Whatever was written stays consistent: a commit record makes the next start
                    # keep the guest, a deleted row or directory makes it remove the rest.
                    log.error("guest %s: cannot apply the source's answer %r to migration %s: %s; kept for "
                              "the operator", record.guest, outcome, record.id, exc)
                    return "in doubt"
            log.info("RESOLVE %s: source %s says %s", record.id, address, outcome)
        if time.monotonic() + interval_s > deadline:
            log.error("guest %s: migration %s still in doubt after %g s (source %s); kept (not started) for the "
                      "operator, asked again at the next start", record.guest, record.id, timeout_s, address)
            return "in doubt"
        await asyncio.sleep(interval_s)


def _keep_committed(host: Host, journal: Journal, record: MigrationRecord) -> str:
    """The source committed: this copy is the guest. Commit record first (durable), then the
    marker goes, then the guest is registered ``stopped`` (its agent died with the old daemon)."""
    progress = host.migrations[record.id]
    session = DestinationSession.restored_in_doubt(progress.phase, time.monotonic())
    session.resolved_committed(time.monotonic())
    session.fail(f"{RESTART_ERROR}, after PREPARED: the source confirmed the commit; the guest was kept here",
                 time.monotonic())
    journal.record_commit(progress)
    (host.guest_dir(record.guest) / INCOMING_MARKER).unlink(missing_ok=True)
    (guest_record,) = [g for g in journal.guests() if g.name == record.guest]
    guest = host.restore_guest(guest_record, GuestState.STOPPED)
    host.journal_guest(guest)
    log.warning("migration %s resolved by the source: committed; guest %s kept here (stopped)", record.id,
                record.guest)
    return "kept"


def _remove_aborted(host: Host, journal: Journal, record: MigrationRecord, outcome: str) -> str:
    """The source did not commit (its guest runs there): every trace of this copy goes."""
    progress = host.migrations[record.id]
    DestinationSession.restored_in_doubt(progress.phase, time.monotonic()).fail(
        f"{RESTART_ERROR}; the source says the migration {outcome}", time.monotonic())
    journal.save_migration(progress)
    handles = [g.handle for g in journal.guests() if g.name == record.guest]
    host.remove_leftover(record.guest, handles[0] if handles else None)
    journal.delete_guest(record.guest)
    log.warning("migration %s resolved by the source: %s; guest %s removed here", record.id, outcome, record.guest)
    return "removed"
