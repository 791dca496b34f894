"""Restart recovery: what a daemon does with the journal it finds at start (after SIGTERM or SIGKILL).

The rules (DESIGN.md §5, invariants 4 and 5; the hand-off's commit record decides):

* a migration that was in flight is over: without a commit record it **failed** ("daemon
  restarted during the migration"); with one it **completed** — the hand-off had passed its
  point of no return — and the error says the daemon restarted after the commit;
* source side: no commit record → the guest stays here, intact; commit record → it is
  ``migrated`` here (RAM and key released: the destination owns it);
* destination side: an incoming guest without a commit record is removed with every trace
  (guest directory, firmware context, journal row); with one it stays;
* the guest agents of the previous daemon are gone — they end when their hypercall channel
  closes (:mod:`migd.agent`), and under systemd ``KillMode=mixed`` kills them with the
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
import enum
import logging
import os
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from migd.errors import MigdError
from migd.guest import INCOMING_MARKER, GuestState
from migd.journal import Journal, MigrationRecord, restore_progress
from migd.migration_state import MigrationStatus

if TYPE_CHECKING:
    from migd.host import Host

log = logging.getLogger(__name__)

RESTART_ERROR: Final = "daemon restarted during the migration"
STALE_AGENT_TIMEOUT_S: Final = 5.0


class Fate(enum.Enum):
    """What recovery does with one journaled guest."""

    KEEP = "keep"  # defined or stopped: reloaded as it was
    STOPPED = "stopped"  # its agent is gone: reloaded as stopped, memory intact
    REMOVE = "remove"  # an uncommitted incoming guest: every trace goes
    MIGRATED = "migrated"  # the source side of a committed hand-off: only the record stays


def final_status(record: MigrationRecord) -> tuple[MigrationStatus, str]:
    """How a migration found unfinished at start ends, and why."""
    if record.committed:
        owner = "the destination owns the guest" if record.role == "source" else "the guest was kept here"
        return MigrationStatus.COMPLETED, f"{RESTART_ERROR}, after the commit: {owner}"
    return MigrationStatus.FAILED, RESTART_ERROR


def guest_fate(state: str, latest: MigrationRecord | None, *, dir_exists: bool, marker: bool) -> Fate:
    """The fate of one guest from its journaled state and the newest migration that names it.

    ``dir_exists``/``marker``: whether its directory and the ``incoming`` marker are on disk. A
    missing marker on an existing directory means COMMIT arrived (the marker goes after the
    commit record), so the guest is kept even if the journal's commit record failed to write.
    """
    if latest is not None and latest.committed:
        if latest.role == "source":
            return Fate.MIGRATED
        return Fate.KEEP if state in (GuestState.DEFINED.value, GuestState.STOPPED.value) else Fate.STOPPED
    if state == GuestState.MIGRATED.value:
        return Fate.MIGRATED
    if state == GuestState.INCOMING.value:
        return Fate.STOPPED if dir_exists and not marker else Fate.REMOVE
    if state in (GuestState.RUNNING.value, GuestState.PAUSED.value):
        return Fate.STOPPED
    return Fate.KEEP


# ---------------------------------------------------------------------- processes


def process_start_ticks(pid: int) -> int | None:
    """A live process's start time (clock ticks since boot, /proc/PID/stat field 22), else None.

    With the pid it identifies a process for good: a pid reused by another process has
    another start time. Zombies count as gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])  # field 22 overall: 3 is fields[0]
    except (IndexError, ValueError):
        return None


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


def _latest_by_guest(records: Iterable[MigrationRecord]) -> dict[str, MigrationRecord]:
    latest: dict[str, MigrationRecord] = {}
    for record in records:  # oldest first
        latest[record.guest] = record
    return latest


async def recover(host: Host, journal: Journal) -> RecoveryReport:
    """Bring ``host`` back to what ``journal`` recorded (see the module docstring); run before listening."""
    ended: list[str] = []
    records = []
    for record in journal.migrations():
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
    latest = _latest_by_guest(records)

    reloaded: list[str] = []
    stopped: list[str] = []
    removed: list[str] = []
    migrated: list[str] = []
    killed: list[int] = []
    unrecoverable: list[str] = []
    for record in journal.guests():
        try:
            if record.agent_pid is not None and await kill_stale_agent(record.agent_pid, record.agent_start):
                killed.append(record.agent_pid)
        except (OSError, TimeoutError) as exc:
            # Loading the guest could make a second copy run: leave it to the operator.
            log.error("guest %s: its previous agent pid=%d cannot be stopped (%s); not reloading it",
                      record.name, record.agent_pid, exc)
            unrecoverable.append(record.name)
            continue
        guest_dir = host.guest_dir(record.name)
        fate = guest_fate(record.state, latest.get(record.name), dir_exists=guest_dir.is_dir(),
                          marker=(guest_dir / INCOMING_MARKER).exists())
        try:
            if fate is Fate.REMOVE:
                host.remove_leftover(record.name, record.handle)
                journal.delete_guest(record.name)
                removed.append(record.name)
                continue
            state = {
                Fate.MIGRATED: GuestState.MIGRATED, Fate.STOPPED: GuestState.STOPPED,
            }.get(fate, GuestState(record.state))
            guest = host.restore_guest(record, state)
        except (MigdError, OSError, ValueError) as exc:
            log.error("guest %s cannot be reloaded from the journal: %s", record.name, exc)
            unrecoverable.append(record.name)
            continue
        reloaded.append(record.name)
        if fate is Fate.STOPPED:
            stopped.append(record.name)
        elif fate is Fate.MIGRATED and record.state != GuestState.MIGRATED.value:
            migrated.append(record.name)
        host.journal_guest(guest)
    pruned = journal.prune()
    report = RecoveryReport(tuple(reloaded), tuple(stopped), tuple(removed), tuple(migrated), tuple(ended),
                            tuple(killed), tuple(unrecoverable))
    if any((stopped, removed, migrated, ended, killed, unrecoverable)) or pruned:
        log.warning("restart recovery: %s pruned_migrations=%d", report, pruned)
    elif reloaded:
        log.info("reloaded %d guests from the journal", len(reloaded))
    return report

