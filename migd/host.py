"""This host's guests and migrations: the registry the daemon, the engine and the CLI share.

With a :class:`~migd.journal.Journal` every change of the registry is recorded as it happens
(guests created, started, stopped, deleted; migrations registered, each status transition,
the destination's commit record), so a restarted daemon can rebuild it
(:mod:`migd.daemon.recovery`). Without one (engine tests) it is memory only.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from migd.guest.agent_launcher import DEFAULT_COMMAND, process_start_ticks
from migd.errors import MigdError
from migd.guest.host_guest import INCOMING_MARKER, GuestDefinition, GuestState, GuestStateError, HostGuest
from migd.guest.ram_capacity import RamAccount
from migd.journal import GuestRecord, Journal, JournalError, MigrationRecord, SessionReplayed
from migd.migration_state import MigrationStatus
from migd.progress import MigrationProgress
from migd.platform.psp import PspFirmware
from migd.guest.record_retention import Departure, expired
from migd.guest.workload import WorkloadConfig

log = logging.getLogger(__name__)


#: Roles whose job brings a guest here (an incoming guest until its commit record).
INCOMING_ROLES = frozenset({"destination", "restore"})
#: What a committed job that takes the guest away leaves of it here.
DEPARTED_STATE = {"source": GuestState.MIGRATED, "save": GuestState.SAVED}


class GuestExists(MigdError):
    """A guest of that name already exists on this host (REST 409)."""


class UnknownGuest(MigdError):
    """No guest of that name on this host (REST 404)."""


class Host:
    """Guests live under ``guests_dir/NAME`` (default ``state_dir/guests``); channel sockets under ``runtime_dir``."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        firmware: PspFirmware,
        *,
        runtime_dir: str | os.PathLike[str] | None = None,
        agent_command: Sequence[str] = DEFAULT_COMMAND,
        journal: Journal | None = None,
        guests_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.state_dir = Path(state_dir)
        #: Guest directories (RAM file, incoming marker): best on tmpfs, like a VMM's guest RAM.
        self.guests_dir = Path(guests_dir) if guests_dir is not None else self.state_dir / "guests"
        self.runtime_dir = Path(runtime_dir) if runtime_dir is not None else self.state_dir / "run"
        self.firmware = firmware
        self.agent_command = tuple(agent_command)
        self.guests: dict[str, HostGuest] = {}
        self.migrations: dict[str, MigrationProgress] = {}
        #: Called with each migration add_migration registers, not with those a restart restores
        #: from the journal: what listens (the metrics) counts the work of this process only.
        self.migration_listeners: list[Callable[[MigrationProgress], None]] = []
        self.journal = journal
        #: Authenticated incoming migrations over several connections, by migration id: each
        #: serves a further connection (after its JOIN) until the migration no longer needs it.
        #: A JOIN finds its migration here; it never creates anything.
        self.lane_servers: dict[str, Callable[[Any, Any], Awaitable[None]]] = {}
        # Without a journal (engine tests) what the journal would remember lives here.
        self._handoff_keys: dict[str, bytes] = {}
        self._accepted: set[bytes | str] = set()
        self.guests_dir.mkdir(parents=True, exist_ok=True)
        #: Admission control: room for every running or arriving guest's whole RAM in guests_dir.
        self.ram_account = RamAccount(self.guests_dir)
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        committed, in_doubt = self._committed_incoming() if journal is not None else (frozenset(), frozenset())
        self.removed_partial = self._remove_partial_incoming(committed, in_doubt)

    def _committed_incoming(self) -> tuple[frozenset[str], frozenset[str]]:
        """Guests whose newest journaled migration is an incoming one with a commit record, and
        those whose newest one reached PREPARED without it (in doubt: recovery asks the source)."""
        assert self.journal is not None
        latest: dict[str, MigrationRecord] = {}
        for record in self.journal.migrations():  # oldest first
            latest[record.guest] = record
        incoming = {name: r for name, r in latest.items() if r.role in INCOMING_ROLES}
        return (frozenset(name for name, r in incoming.items() if r.committed),
                frozenset(name for name, r in incoming.items() if r.prepared_in_doubt))

    def _remove_partial_incoming(self, committed: frozenset[str] = frozenset(),
                                 in_doubt: frozenset[str] = frozenset()) -> list[str]:
        """Delete guests left half-received by a crash before their migration committed.

        A guest whose commit record is in the journal is kept (the crash came between the
        record and the marker's removal): the source has given it up, this copy is the guest.
        One prepared without a commit record is kept as it is, marker included: its source may
        have committed (:mod:`migd.daemon.recovery` asks it).
        """
        removed = []
        for guest_dir in sorted(self.guests_dir.iterdir()):
            marker = guest_dir / INCOMING_MARKER
            if not marker.exists() or guest_dir.name in in_doubt:
                continue
            if guest_dir.name in committed:
                log.warning("keeping incoming guest %s: its commit record is in the journal", guest_dir.name)
                marker.unlink()
                continue
            log.warning("removing partial incoming guest %s (its migration never committed)", guest_dir.name)
            shutil.rmtree(guest_dir, ignore_errors=True)
            removed.append(guest_dir.name)
        return removed

    def guest_dir(self, name: str) -> Path:
        """Where guest ``name`` keeps its RAM file (and, while incoming, its marker)."""
        return self._paths(name)[0]

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.guests_dir / name, self.runtime_dir / f"{name}.sock"

    def check_free(self, name: str, *, replace_migrated: bool = False) -> HostGuest | None:
        """Refuse a name in use; with ``replace_migrated`` a ``migrated`` or ``saved`` record (a guest that
        left) is no obstacle (returned: the arriving guest replaces it)."""
        existing = self.guests.get(name)
        if existing is not None and not (replace_migrated and existing.state.departed):
            hint = f" (it left this host; `migd guest delete {name}` removes the record)" \
                if existing.state.departed else ""
            raise GuestExists(f"guest {name} already exists on this host ({existing.state.value}){hint}")
        if self._paths(name)[0].exists():
            raise GuestExists(f"guest {name}: leftover state directory {self._paths(name)[0]} exists")
        return existing

    def create_guest(self, definition: GuestDefinition) -> HostGuest:
        """Define a new guest (RAM file + firmware launch)."""
        self.check_free(definition.name)
        guest_dir, socket_path = self._paths(definition.name)
        guest = HostGuest.create(
            definition, guest_dir=guest_dir, socket_path=socket_path, firmware=self.firmware,
            agent_command=self.agent_command, ram_account=self.ram_account,  # InsufficientRam: no room
        )
        if self.journal is not None:
            try:
                self.journal.save_guest(self._record(guest))
            except JournalError:
                # A guest the journal does not know would be an orphan after a restart.
                guest.release()
                raise
        self.guests[definition.name] = guest
        return guest

    def create_incoming(self, definition: GuestDefinition, handle: int) -> HostGuest:
        """Reserve the name and create the destination side of a migration.

        A guest coming back to a host it left replaces its own ``migrated`` record: one
        registry entry and one journal row (an upsert), so no moment shows both or neither.
        """
        replaced = self.check_free(definition.name, replace_migrated=True)
        guest_dir, socket_path = self._paths(definition.name)
        guest = HostGuest.create_incoming(
            definition, guest_dir=guest_dir, socket_path=socket_path, firmware=self.firmware, handle=handle,
            agent_command=self.agent_command, ram_account=self.ram_account,  # InsufficientRam before any file
        )
        self.guests[definition.name] = guest
        self.journal_guest(guest)  # state incoming: removed at a restart unless the commit record follows
        if replaced is not None:
            log.info("guest %s came back: its migrated record (%s) is replaced by the incoming guest",
                     definition.name, replaced.departure.migration_id if replaced.departure else "no migration")
        return guest

    def get(self, name: str) -> HostGuest:
        """The guest called ``name``."""
        try:
            return self.guests[name]
        except KeyError:
            raise UnknownGuest(f"no guest named {name!r} on this host") from None

    async def delete(self, name: str) -> None:
        """Remove a guest that is not running."""
        guest = self.get(name)
        if guest.state in (GuestState.RUNNING, GuestState.PAUSED, GuestState.INCOMING):
            raise GuestStateError(f"guest {name} is {guest.state.value}; stop it first")
        await guest.destroy()
        if self.guests.get(name) is guest:  # a prune may have dropped the record meanwhile
            del self.guests[name]
            self._forget(name)

    async def discard(self, name: str) -> None:
        """Remove every trace of a guest whatever its state (failed incoming migration)."""
        guest = self.guests.pop(name, None)
        if guest is not None:
            await guest.destroy()
            self._forget(name)

    async def close(self) -> None:
        """Stop every running guest (RAM files stay) and drop half-received ones.

        A prepared incoming guest whose source has not said how the migration ended stays on
        disk, journaled in doubt: the next start asks the source (migd.daemon.recovery). One whose
        hand-off committed but did not start (a shutdown cut it short) stays too: it is the only
        copy, and the next start keeps it, stopped.
        """
        for guest in list(self.guests.values()):
            if guest.state is GuestState.INCOMING and self._incoming_committed(guest.name):
                # COMMIT came (the commit record is journaled) but the start was cut short: the
                # source has given the guest up, this copy is the guest (a restart keeps it, stopped).
                log.warning("keeping incoming guest %s: committed, not started", guest.name)
                await guest.set_aside()
            elif guest.state is GuestState.INCOMING and self.prepared_in_doubt(guest.name):
                log.warning("keeping incoming guest %s: prepared, its source has not said whether it committed",
                            guest.name)
                await guest.set_aside()
            elif guest.state is GuestState.INCOMING:
                await self.discard(guest.name)
            elif guest.state in (GuestState.RUNNING, GuestState.PAUSED):
                await guest.stop()
                self.journal_guest(guest)

    # ------------------------------------------------------------------ migrations and the journal

    def _incoming_committed(self, name: str) -> bool:
        """The newest migration of guest ``name`` brought it here and has committed."""
        newest = [p for p in self.migrations.values() if p.guest == name]
        return bool(newest) and newest[-1].role in INCOMING_ROLES and newest[-1].phase.committed

    def prepared_in_doubt(self, name: str) -> bool:
        """Guest ``name`` arrived here and is prepared, with no commit (nor abort) from its source."""
        return any(p.guest == name and p.role == "destination" and p.status is MigrationStatus.STOP_COPY
                   and not p.phase.committed for p in self.migrations.values())

    def add_migration(self, progress: MigrationProgress) -> None:
        """Register a migration (either role); with a journal, record it and every transition."""
        self.migrations[progress.id] = progress
        for listener in list(self.migration_listeners):
            listener(progress)
        if self.journal is None:
            return
        progress.phase.listeners.append(lambda status: self._migration_changed(progress, status))
        self._save_migration(progress)

    def session_known(self, nonce: bytes, migration_id: str) -> bool:
        """True if this host accepted the session nonce or knows the migration id already (read only)."""
        if migration_id in self.migrations or nonce in self._accepted or migration_id in self._accepted:
            return True
        return self.journal is not None and self.journal.session_known(nonce, migration_id)

    def accept_session(self, nonce: bytes, migration_id: str) -> None:
        """Remember an authenticated incoming session for good; SessionReplayed if it came before."""
        if self.session_known(nonce, migration_id):
            raise SessionReplayed(f"session or migration id {migration_id} was accepted here before")
        if self.journal is not None:
            self.journal.accept_session(nonce, migration_id)
        else:
            self._accepted.update((nonce, migration_id))

    def remember_handoff_key(self, migration_id: str, key: bytes) -> None:
        """Keep a migration's hand-off key (journal too) to answer or check an authenticated RESOLVE."""
        if self.journal is None:
            self._handoff_keys[migration_id] = key
            return
        try:
            self.journal.record_handoff_key(migration_id, key)
        except JournalError as exc:
            log.error("journal: %s (a restart could not authenticate RESOLVE for it)", exc)
            self._handoff_keys[migration_id] = key  # this run can still answer

    def handoff_key(self, migration_id: str) -> bytes | None:
        """The hand-off key of a migration of this host (memory, else journal), if known."""
        key = self._handoff_keys.get(migration_id)
        if key is None and self.journal is not None:
            try:
                key = self.journal.handoff_key(migration_id)
            except JournalError as exc:
                log.error("journal: %s", exc)
        return key

    def incoming_committed(self, progress: MigrationProgress) -> None:
        """COMMIT arrived for an incoming migration: its commit record, durable, before the guest starts.

        A journal failure is logged, not raised: the source has committed already, so the guest
        is ours whatever happens (and the marker's removal still records the commit on disk).
        """
        if self.journal is None:
            return
        try:
            self.journal.record_commit(progress)
        except JournalError as exc:
            log.error("journal: %s (the guest is kept; the removed incoming marker records the commit)", exc)

    def _migration_changed(self, progress: MigrationProgress, status: MigrationStatus) -> None:
        self._save_migration(progress)
        if not status.finished:
            return
        guest = self.guests.get(progress.guest)
        if guest is not None and progress.role == "source" and progress.phase.committed:
            guest.departure = self.departure(progress.guest)
        if guest is not None and not (progress.role in INCOMING_ROLES and not progress.phase.committed):
            state = DEPARTED_STATE.get(progress.role) if progress.phase.committed else None
            self.journal_guest(guest, state=state)

    def departure(self, name: str) -> Departure | None:
        """The newest committed outgoing migration of guest ``name`` (where it went, when it left)."""
        left = [p for p in self.migrations.values()
                if p.guest == name and p.role == "source" and p.phase.committed and p.phase.finished_at is not None]
        if not left:
            return None
        newest = max(left, key=lambda p: p.phase.finished_at or 0.0)
        assert newest.phase.finished_at is not None
        return Departure(newest.id, newest.destination, newest.phase.finished_at)

    def prune_migrated(self, now: float, *, keep_s: float, keep_count: int) -> list[str]:
        """Drop ``migrated`` records past the retention (``now`` is ``time.monotonic()``); their names."""
        # Only records with nothing left here: one that keeps its RAM (the destination never
        # confirmed the start) may be the only copy, and one still leaving is being torn down.
        departures = {name: g.departure for name, g in self.guests.items()
                      if g.state is GuestState.MIGRATED and not g.has_memory and g.agent is None
                      and not g.busy.locked()}
        dropped = expired(departures, now, keep_s=keep_s, keep_count=keep_count)
        for name in dropped:
            del self.guests[name]
            self._forget(name)
        if dropped:
            log.info("dropped %d migrated guest records (retention %.0f s, %d records): %s",
                     len(dropped), keep_s, keep_count, ", ".join(dropped))
        return dropped

    def _save_migration(self, progress: MigrationProgress) -> None:
        assert self.journal is not None
        try:
            self.journal.save_migration(progress)
        except JournalError as exc:
            log.error("journal: %s", exc)

    def journal_guest(self, guest: HostGuest, *, state: GuestState | None = None) -> None:
        """Record a registered guest's current row (``state`` overrides the in-memory one)."""
        if self.journal is None or self.guests.get(guest.name) is not guest:
            return
        try:
            self.journal.save_guest(self._record(guest, state))
        except JournalError as exc:
            log.error("journal: %s", exc)

    def _forget(self, name: str) -> None:
        if self.journal is not None:
            try:
                self.journal.delete_guest(name)
            except JournalError as exc:
                log.error("journal: %s", exc)

    @staticmethod
    def _record(guest: HostGuest, state: GuestState | None = None) -> GuestRecord:
        d = guest.definition
        agent = guest.agent
        pid = agent.pid if agent is not None and agent.poll() is None else None
        return GuestRecord(
            name=d.name, memory_mib=d.memory_mib, policy=d.policy, efi=d.efi,
            uefi_live_migration=d.uefi_live_migration, state=(state or guest.state).value,
            handle=guest.handle if guest.has_memory else None, workload=guest.workload.to_dict(),
            agent_pid=pid, agent_start=None if pid is None else process_start_ticks(pid),
        )

    # ------------------------------------------------------------------ restart recovery

    def restore_guest(self, record: GuestRecord, state: GuestState) -> HostGuest:
        """Register a guest reloaded from the journal (no agent) in ``state``.

        A guest that keeps its memory needs its firmware context: the PSP store brings it back
        with the same handle. If it is missing (the store was lost) a new context is launched —
        the guest is not running, and its next boot starts from zeroed memory anyway.
        """
        definition = GuestDefinition(record.name, record.memory_mib, record.policy, record.efi,
                                     record.uefi_live_migration)
        handle = record.handle or 0
        relaunched = not state.departed and handle not in self.firmware.guest_handles()
        if relaunched:
            log.error("guest %s: firmware context %s is gone; launching a new one", record.name, record.handle)
            handle = self.firmware.launch(definition.policy)
        guest_dir, socket_path = self._paths(record.name)
        try:
            guest = HostGuest.restore(
                definition, guest_dir=guest_dir, socket_path=socket_path, firmware=self.firmware, handle=handle,
                state=state, workload=WorkloadConfig.from_dict(record.workload), agent_command=self.agent_command,
                ram_account=self.ram_account,
            )
        except BaseException:
            if relaunched:
                self.firmware.decommission(handle)
            raise
        if state is GuestState.MIGRATED:
            guest.departure = self.departure(record.name)  # recovery reloads migrations before guests
        self.guests[record.name] = guest
        return guest

    def remove_leftover(self, name: str, handle: int | None) -> None:
        """Remove what an uncommitted incoming guest left: its directory and firmware context."""
        shutil.rmtree(self._paths(name)[0], ignore_errors=True)
        if handle is not None and handle in self.firmware.guest_handles():
            # RECEIVE_FINISH (at PREPARE, before COMMIT) had made the context RUNNING, so stored.
            self.firmware.decommission(handle)
