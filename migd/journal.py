"""The daemon's journal: guests and migrations in SQLite under the state directory.

What it is for: after a restart — a clean one or a SIGKILL — the daemon reloads its guests
(definition, state, firmware handle, workload, the agent it had launched) and its migration
history, and decides the fate of every migration that was in flight from one record: the
**commit record** of the two-phase hand-off. The source writes it before COMMIT goes out
(:meth:`Journal.record_commit` from ``OutgoingMigration``'s ``on_commit`` hook), the
destination when COMMIT arrives; without it the guest belongs to the source, with it to the
destination (docs/design.md §8 "Invariants", 4 and 5). One case it cannot decide alone: a destination
that journaled PREPARED (``stop-copy``) but no commit record; for it the journal keeps where
the source answers RESOLVE (``resolve_address``, written at HELLO), so a restart can ask.

Durability: WAL mode. Ordinary records use ``synchronous=NORMAL`` — a committed transaction
survives a crash of the process (it is in the WAL, in the page cache) though not a power cut.
The commit record is written with ``synchronous=FULL`` (the WAL is fsync'ed before the
transaction returns), because on the source it is the decision that the guest may never run
here again: it must survive anything the destination's copy survives.

One connection, used from the daemon's event loop thread only. Every SQLite failure is a
:class:`JournalError` naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from migd.abi import PAGE_SIZE, MiB
from migd.errors import MigdError
from migd.migration_state import MigrationPhase, MigrationStatus
from migd.page_runs import PageKind
from migd.progress import MigrationProgress

log = logging.getLogger(__name__)

JOURNAL_FILE: Final = "journal.sqlite"
#: 2: ``migrations.resolve_address`` (where a destination in doubt asks the source, RESOLVE).
#: 3: ``migrations.handoff_key`` (authenticated RESOLVE) and ``accepted_sessions`` (no replay).
#: 4: ``migrations.role`` may be ``save`` or ``restore`` (confidential save/restore jobs).
SCHEMA_VERSION: Final = 4
ROLES: Final = ("source", "destination", "save", "restore")
#: Finished migrations kept in the journal (the oldest are pruned at start).
KEEP_FINISHED: Final = 1000

_SCHEMA: Final = ("""
CREATE TABLE IF NOT EXISTS guests (
    name        TEXT PRIMARY KEY,
    memory_mib  INTEGER NOT NULL,
    policy      INTEGER NOT NULL,
    efi         INTEGER NOT NULL,
    uefi_live_migration INTEGER,          -- NULL: the UEFI variable is absent
    state       TEXT NOT NULL,
    handle      INTEGER,                  -- PSP guest context, NULL once released
    workload    TEXT NOT NULL,            -- JSON, WorkloadConfig.to_dict()
    agent_pid   INTEGER,                  -- the agent last launched, with its start time
    agent_start INTEGER,                  --   (/proc/PID/stat field 22) to tell it from a reused pid
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL
)""", """
CREATE TABLE IF NOT EXISTS migrations (
    id           TEXT PRIMARY KEY,
    guest        TEXT NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('source', 'destination', 'save', 'restore')),
    peer         TEXT NOT NULL,
    npages       INTEGER NOT NULL,
    status       TEXT NOT NULL,
    committed    INTEGER NOT NULL DEFAULT 0,
    committed_at REAL,
    error        TEXT,
    started_at   REAL NOT NULL,
    updated_at   REAL NOT NULL,
    finished_at  REAL,
    stats        TEXT NOT NULL,           -- JSON: the REST migration object plus internal counters
    resolve_address TEXT                  -- destination role: the source's listener "host:port" (RESOLVE)
)""", """
CREATE INDEX IF NOT EXISTS migrations_started ON migrations (started_at)
""", """
CREATE TABLE IF NOT EXISTS accepted_sessions (
    nonce        BLOB PRIMARY KEY,        -- the session blob's nonce (SEND_START's, fresh per session)
    migration_id TEXT NOT NULL UNIQUE,
    accepted_at  REAL NOT NULL
)""")


class JournalError(MigdError):
    """The journal cannot be opened, read or written."""


class SessionReplayed(MigdError):
    """A session nonce or migration id this host accepted before came again (a replay, or a reused id)."""


@dataclass(frozen=True)
class GuestRecord:
    """One row of ``guests``."""

    name: str
    memory_mib: int
    policy: int
    efi: bool
    uefi_live_migration: bool | None
    state: str
    handle: int | None
    workload: dict[str, Any] = field(default_factory=dict)
    agent_pid: int | None = None
    agent_start: int | None = None
    created_at: float = 0.0
    updated_at: float = 0.0


@dataclass(frozen=True)
class MigrationRecord:
    """One row of ``migrations``; ``stats`` holds what :func:`restore_progress` needs."""

    id: str
    guest: str
    role: str
    peer: str
    npages: int
    status: MigrationStatus
    committed: bool
    committed_at: float | None
    error: str | None
    started_at: float
    updated_at: float
    finished_at: float | None
    stats: dict[str, Any]
    resolve_address: str | None = None

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def prepared_in_doubt(self) -> bool:
        """An incoming migration that reached PREPARED (the destination verified the guest and ran
        RECEIVE_FINISH: status ``stop-copy``) without a commit record: the source may have
        committed, so this copy may be the only one (docs/design.md §8 "Invariants", 4)."""
        return self.role == "destination" and not self.committed and self.status is MigrationStatus.STOP_COPY


def _wall_time(phase_time: float, mono_now: float, wall_now: float) -> float:
    """A monotonic phase time as wall-clock seconds (the journal outlives the process's clock)."""
    return wall_now - (mono_now - phase_time)


def progress_stats(progress: MigrationProgress) -> dict[str, Any]:
    """What the journal keeps of a migration's counters: the REST object plus internal ones."""
    stats = progress.to_json()
    stats["bytes_by_kind"] = {k.value: v for k, v in progress.bytes_by_kind.items()}
    stats["throttle_percent"] = progress.throttle_percent
    stats["shared_bitmap_sha256"] = progress.shared_bitmap_sha256
    stats["blackouts"] = progress.phase.blackouts
    return stats


def restore_progress(record: MigrationRecord) -> MigrationProgress:
    """A MigrationProgress that renders (REST) as the journal recorded it."""
    mono_now, wall_now = time.monotonic(), time.time()
    started = mono_now - (wall_now - record.started_at)
    finished = None if record.finished_at is None else started + (record.finished_at - record.started_at)
    phase = MigrationPhase(started_at=started, status=record.status, committed=record.committed, error=record.error,
                           finished_at=finished)
    phase.blackouts = int(record.stats.get("blackouts", 0))
    progress = MigrationProgress(record.guest, record.role, record.peer, record.npages, phase=phase, id=record.id,
                                 source=record.resolve_address if record.role == "destination" else None)
    stats = record.stats
    progress.rounds = int(stats.get("rounds", 0))
    progress.bytes_transferred = int(stats.get("bytes", {}).get("transferred", 0))
    progress.remaining_pages = int(stats.get("bytes", {}).get("remaining", 0)) // PAGE_SIZE
    for kind in PageKind:
        progress.pages[kind] = int(stats.get("pages", {}).get(kind.value, 0))
        progress.bytes_by_kind[kind] = int(stats.get("bytes_by_kind", {}).get(kind.value, 0))
    progress.throughput_bps = float(stats.get("throughput_mib_s") or 0.0) * MiB
    progress.expected_downtime_ms = stats.get("expected_downtime_ms")
    progress.downtime_ms = stats.get("downtime_ms")
    progress.throttle_percent = int(stats.get("throttle_percent", 0))
    progress.shared_bitmap_sha256 = stats.get("shared_bitmap_sha256")
    return progress


class Journal:
    """The SQLite journal of one host (``state_dir/journal.sqlite``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            # Created 0600 before SQLite opens it: its -wal and -shm files copy these permissions.
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            self._db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        except (OSError, sqlite3.Error) as exc:
            raise JournalError(f"cannot open the journal {self.path}: {exc}") from None
        try:
            with self._errors("open"):
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise JournalError(
                        f"the journal {self.path} has schema version {version}; this migd knows {SCHEMA_VERSION}"
                    )
                check = self._db.execute("PRAGMA quick_check").fetchone()[0]
                if check != "ok":
                    raise JournalError(f"the journal {self.path} is corrupt: {check}")
                with self._transaction():
                    for statement in _SCHEMA:
                        self._db.execute(statement)
                    columns = {row[1] for row in self._db.execute("PRAGMA table_info(migrations)")}
                    if "resolve_address" not in columns:  # a version 1 journal
                        self._db.execute("ALTER TABLE migrations ADD COLUMN resolve_address TEXT")
                    if "handoff_key" not in columns:  # version 1 or 2
                        self._db.execute("ALTER TABLE migrations ADD COLUMN handoff_key BLOB")
                    self._allow_file_roles()
                    self._db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    def _allow_file_roles(self) -> None:
        """Version 1-3 journals: rebuild ``migrations`` so its role check admits save and restore.

        SQLite cannot change a CHECK constraint in place; the rows are copied into a table with
        the new one, inside the opening transaction (all or nothing).
        """
        (sql,) = self._db.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'migrations'").fetchone()
        if "'save'" in sql:
            return
        columns = ", ".join(row[1] for row in self._db.execute("PRAGMA table_info(migrations)"))
        self._db.execute("ALTER TABLE migrations RENAME TO migrations_v3")
        self._db.execute(_SCHEMA[1])
        self._db.execute("ALTER TABLE migrations ADD COLUMN handoff_key BLOB")
        self._db.execute(f"INSERT INTO migrations ({columns}) SELECT {columns} FROM migrations_v3")
        self._db.execute("DROP TABLE migrations_v3")
        self._db.execute(_SCHEMA[2])

    @classmethod
    def open(cls, state_dir: str | os.PathLike[str]) -> Journal:
        """The journal of the host whose state directory is ``state_dir``."""
        return cls(Path(state_dir) / JOURNAL_FILE)

    def close(self) -> None:
        """Close the connection (the WAL is checkpointed by SQLite)."""
        self._db.close()

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            raise JournalError(f"journal {self.path}: cannot {what}: {exc}") from exc

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # ------------------------------------------------------------------ guests

    def save_guest(self, record: GuestRecord) -> None:
        """Insert or replace a guest's row (``created_at`` of an existing row is kept)."""
        now = time.time()
        with self._errors(f"save guest {record.name}"), self._transaction():
            self._db.execute(
                """INSERT INTO guests (name, memory_mib, policy, efi, uefi_live_migration, state, handle, workload,
                                       agent_pid, agent_start, created_at, updated_at)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (name) DO UPDATE SET
                       memory_mib = excluded.memory_mib, policy = excluded.policy, efi = excluded.efi,
                       uefi_live_migration = excluded.uefi_live_migration, state = excluded.state,
                       handle = excluded.handle, workload = excluded.workload, agent_pid = excluded.agent_pid,
                       agent_start = excluded.agent_start, updated_at = excluded.updated_at""",
                (record.name, record.memory_mib, record.policy, int(record.efi),
                 None if record.uefi_live_migration is None else int(record.uefi_live_migration),
                 record.state, record.handle, json.dumps(record.workload, sort_keys=True),
                 record.agent_pid, record.agent_start, record.created_at or now, now),
            )

    def delete_guest(self, name: str) -> None:
        """Forget a guest (deleted, or a partial incoming one discarded)."""
        with self._errors(f"delete guest {name}"), self._transaction():
            self._db.execute("DELETE FROM guests WHERE name = ?", (name,))

    def guests(self) -> list[GuestRecord]:
        """Every guest, oldest first."""
        with self._errors("read guests"):
            rows = self._db.execute(
                """SELECT name, memory_mib, policy, efi, uefi_live_migration, state, handle, workload, agent_pid,
                          agent_start, created_at, updated_at FROM guests ORDER BY created_at, name"""
            ).fetchall()
        return [
            GuestRecord(name, memory_mib, policy, bool(efi), None if uefi is None else bool(uefi), state, handle,
                        json.loads(workload), agent_pid, agent_start, created_at, updated_at)
            for (name, memory_mib, policy, efi, uefi, state, handle, workload, agent_pid, agent_start, created_at,
                 updated_at) in rows
        ]

    # ------------------------------------------------------------------ migrations

    def save_migration(self, progress: MigrationProgress) -> None:
        """Insert or update a migration from its progress (status, error, counters, times)."""
        self._write_migration(progress, "save")

    def record_commit(self, progress: MigrationProgress, *, consume_session: bytes | None = None) -> None:
        """The hand-off's commit record, durable (fsync'ed WAL) before this returns.

        On the source it is ``OutgoingMigration``'s ``on_commit`` hook: if it raises, the
        migration has not committed and rolls back (the guest resumes here).
        ``consume_session``: a restore's session nonce, accepted in the same transaction as the
        commit (SessionReplayed, and no commit, if it was accepted before): a saved file is
        restored at most once, and a restore that never committed has not used it up.
        """
        with self._errors("set synchronous=FULL"):
            self._db.execute("PRAGMA synchronous=FULL")
        try:
            self._write_migration(progress, "record the commit of", committed_at=time.time(),
                                  consume_session=consume_session)
        finally:
            with self._errors("set synchronous=NORMAL"):
                self._db.execute("PRAGMA synchronous=NORMAL")
        log.info("journal commit record migration=%s guest=%s role=%s", progress.id, progress.guest, progress.role)

    def _write_migration(self, progress: MigrationProgress, what: str, *, committed_at: float | None = None,
                         consume_session: bytes | None = None) -> None:
        mono_now, wall_now = time.monotonic(), time.time()
        phase = progress.phase
        finished = None if phase.finished_at is None else _wall_time(phase.finished_at, mono_now, wall_now)
        committed = committed_at is not None or phase.committed
        with self._errors(f"{what} migration {progress.id}"), self._transaction():
            if consume_session is not None:
                self._insert_session(consume_session, progress.id)
            self._db.execute(
                """INSERT INTO migrations (id, guest, role, peer, npages, status, committed, committed_at, error,
                                           started_at, updated_at, finished_at, stats)
                   VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                   ON CONFLICT (id) DO UPDATE SET
                       status = excluded.status, committed = max(committed, excluded.committed),
                       committed_at = coalesce(committed_at, excluded.committed_at), error = excluded.error,
                       updated_at = excluded.updated_at, finished_at = excluded.finished_at,
                       stats = excluded.stats""",
                (progress.id, progress.guest, progress.role, progress.destination, progress.npages,
                 progress.status.value, int(committed), committed_at, phase.error,
                 _wall_time(phase.started_at, mono_now, wall_now), wall_now, finished,
                 json.dumps(progress_stats(progress), sort_keys=True)),
            )

    def record_resolve_address(self, migration_id: str, address: str) -> None:
        """Where the source of incoming migration ``migration_id`` answers RESOLVE (``host:port``).

        Written once at HELLO, after the migration's row exists: a destination that restarts
        after PREPARED without a commit record asks there whether the source committed
        (:mod:`migd.daemon.recovery`). Raises JournalError if the row is missing.
        """
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"resolve address must be host:port with a port in 1..65535, got {address!r}")
        with self._errors(f"record the resolve address of migration {migration_id}"), self._transaction():
            cursor = self._db.execute("UPDATE migrations SET resolve_address = ? WHERE id = ?", (address, migration_id))
            if cursor.rowcount != 1:
                raise JournalError(f"journal {self.path}: no migration {migration_id} to record a resolve address for")

    def record_handoff_key(self, migration_id: str, key: bytes) -> None:
        """The session's hand-off key of migration ``migration_id`` (either role), for RESOLVE.

        The source answers, and the destination checks, an authenticated RESOLVE with it, also
        after a restart. It lives where the PDH private key lives (the state directory, 0600)
        and authenticates nothing but this one migration's messages.
        """
        with self._errors(f"record the hand-off key of migration {migration_id}"), self._transaction():
            cursor = self._db.execute("UPDATE migrations SET handoff_key = ? WHERE id = ?", (key, migration_id))
            if cursor.rowcount != 1:
                raise JournalError(f"journal {self.path}: no migration {migration_id} to record a hand-off key for")

    def handoff_key(self, migration_id: str) -> bytes | None:
        """The hand-off key recorded for ``migration_id``, if any."""
        with self._errors(f"read the hand-off key of migration {migration_id}"):
            row = self._db.execute("SELECT handoff_key FROM migrations WHERE id = ?", (migration_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def accept_session(self, nonce: bytes, migration_id: str) -> None:
        """Remember, durably, that this host accepted session ``nonce`` for ``migration_id``.

        A destination never accepts either twice (a replayed stream, a reused id), across
        restarts: an existing one raises :class:`SessionReplayed`. Rows are never pruned
        (about 100 bytes per migration ever received).
        """
        with self._errors("set synchronous=FULL"):
            self._db.execute("PRAGMA synchronous=FULL")
        try:
            with self._errors(f"accept the session of migration {migration_id}"), self._transaction():
                self._insert_session(nonce, migration_id)
        finally:
            with self._errors("set synchronous=NORMAL"):
                self._db.execute("PRAGMA synchronous=NORMAL")

    def _insert_session(self, nonce: bytes, migration_id: str) -> None:
        """Inside a transaction: record an accepted session; SessionReplayed if it was accepted before."""
        if self._db.execute("SELECT 1 FROM accepted_sessions WHERE nonce = ? OR migration_id = ?",
                            (nonce, migration_id)).fetchone() is not None:
            raise SessionReplayed(f"session or migration id {migration_id} was accepted here before")
        self._db.execute("INSERT INTO accepted_sessions (nonce, migration_id, accepted_at) VALUES (?, ?, ?)",
                         (nonce, migration_id, time.time()))

    def session_known(self, nonce: bytes, migration_id: str) -> bool:
        """True if the session nonce or the migration id was accepted here, or the id is in the journal."""
        with self._errors("look up accepted sessions"):
            return self._db.execute(
                "SELECT 1 FROM accepted_sessions WHERE nonce = ? OR migration_id = ? "
                "UNION ALL SELECT 1 FROM migrations WHERE id = ? LIMIT 1", (nonce, migration_id, migration_id),
            ).fetchone() is not None

    def finish_migration(self, migration_id: str, status: MigrationStatus, error: str) -> None:
        """Mark a migration found unfinished at start as ended (status and reason)."""
        if not status.finished:
            raise ValueError(f"finish_migration needs a final status, got {status.value}")
        now = time.time()
        with self._errors(f"finish migration {migration_id}"), self._transaction():
            self._db.execute(
                "UPDATE migrations SET status = ?, error = ?, finished_at = ?, updated_at = ? WHERE id = ?",
                (status.value, error, now, now, migration_id),
            )

    def migrations(self) -> list[MigrationRecord]:
        """Every migration, oldest first."""
        with self._errors("read migrations"):
            rows = self._db.execute(
                """SELECT id, guest, role, peer, npages, status, committed, committed_at, error, started_at,
                          updated_at, finished_at, stats, resolve_address FROM migrations ORDER BY started_at, id"""
            ).fetchall()
        records = []
        for (mid, guest, role, peer, npages, status, committed, committed_at, error, started_at, updated_at,
             finished_at, stats, resolve_address) in rows:
            try:
                status_value = MigrationStatus(status)
                stats_value = json.loads(stats)
            except ValueError as exc:
                raise JournalError(f"journal {self.path}: migration {mid} has a bad record: {exc}") from None
            records.append(MigrationRecord(mid, guest, role, peer, npages, status_value, bool(committed),
                                           committed_at, error, started_at, updated_at, finished_at, stats_value,
                                           resolve_address))
        return records

    def prune(self, keep: int = KEEP_FINISHED) -> int:
        """Delete all but the newest ``keep`` finished migrations; returns how many went."""
        finished = tuple(s.value for s in MigrationStatus if s.finished)
        with self._errors("prune migrations"), self._transaction():
            cursor = self._db.execute(
                f"""DELETE FROM migrations WHERE status IN ({",".join("?" * len(finished))}) AND id NOT IN (
                        SELECT id FROM migrations WHERE status IN ({",".join("?" * len(finished))})
                        ORDER BY started_at DESC LIMIT ?)""",
                (*finished, *finished, keep),
            )
        return cursor.rowcount
