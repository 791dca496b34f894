"""The daemon core: one host's firmware, guests, migration listener and outgoing migrations.

REST handlers (:mod:`migd.daemon.api`) and ``migd serve`` call the operations here; each raises a
precise error the API maps to a status code: bad input → ``ConfigError`` (400), unknown
names → ``UnknownGuest``/``UnknownMigration`` (404), wrong state → ``GuestExists``,
``GuestStateError``, ``MigrationRefused``, ``CannotCancel`` (409).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from migd.platform import identity
from migd.abi import FirmwareStatus
from migd.guest.agent_launcher import DEFAULT_COMMAND
from migd.daemon.config import Config, parse_address
from migd.errors import ConfigError, FirmwareError, MigdError
from migd.fileio import open_regular
from migd.guest.host_guest import GuestDefinition, GuestState, GuestStateError, HostGuest
from migd.host import Host
from migd.journal import Journal
from migd.listener import MigrationListener
from migd.platform.pki_verify import tls_client_context, tls_server_context
from migd.progress import MigrationProgress
from migd.platform.psp import PspFirmware
from migd.daemon.recovery import RecoveryReport, recover
from migd.daemon.tls_check import check_tls_identity
from migd.source import MigrationParams, MigrationRefused, OutgoingMigration
from migd.guest.workload import WorkloadConfig
from migd.platform.pki_verify import MAX_PDH_CERT_PEM, verify_pdh_certificate
from migd.restore import GuestRestore, inspect
from migd.save import GuestSave, SaveParams, SaveRefused

log = logging.getLogger(__name__)


class UnknownMigration(MigdError):
    """No migration with that id on this host (REST 404)."""


class CannotCancel(MigdError):
    """The migration has committed or finished (REST 409)."""


def runtime_dir_for(config: Config) -> Path:
    """systemd's RuntimeDirectory= (``$RUNTIME_DIRECTORY``), else a private temporary directory.

    Unix socket paths are limited to 108 bytes, so they do not go under a deep state_dir.
    """
    env = os.environ.get("RUNTIME_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    return Path(tempfile.mkdtemp(prefix="migd-run-"))


def guests_dir_for(config: Config) -> Path:
    """Where guest RAM files live: ``guests.ram_dir``, else under ``$RUNTIME_DIRECTORY`` (tmpfs ``/run/migd`` under
    systemd, kept across restarts by RuntimeDirectoryPreserve=), else ``state_dir/guests``.

    Guest RAM belongs in memory, as a VMM's memfd or hugetlbfs backing does: on a disk file
    system every migrated gigabyte also becomes dirty page cache to write back.
    """
    if config.ram_dir is not None:
        return config.ram_dir
    env = os.environ.get("RUNTIME_DIRECTORY")
    return Path(env.split(":")[0]) / "guests" if env else config.state_dir / "guests"


class Daemon:
    """Everything ``migd serve`` runs, minus the HTTP server."""

    def __init__(self, config: Config, *, agent_command: Sequence[str] = DEFAULT_COMMAND) -> None:
        self.config = config
        self.agent_command = tuple(agent_command)
        anchors = identity.load_trust_anchors(config.trusted_roots)
        self.firmware = PspFirmware(config.state_dir, anchors, transport_mode=config.transport)
        self.journal = Journal.open(config.state_dir)
        runtime_dir = runtime_dir_for(config)
        #: A temporary runtime dir (no RUNTIME_DIRECTORY) is ours to remove at shutdown.
        self._own_runtime_dir = runtime_dir if not os.environ.get("RUNTIME_DIRECTORY") else None
        self.host = Host(config.state_dir, self.firmware, runtime_dir=runtime_dir,
                         agent_command=self.agent_command, journal=self.journal,
                         guests_dir=guests_dir_for(config))
        self.recovery: RecoveryReport | None = None
        self.outgoing: dict[str, OutgoingMigration] = {}
        #: Save and restore jobs by id (listed under /v1/migrations with the migrations).
        self.file_jobs: dict[str, GuestSave | GuestRestore] = {}
        self._server_tls = self._client_tls = None
        if config.tls is not None:
            t = config.tls
            # Before anything listens: a certificate the peers would refuse stops `migd serve` here.
            check_tls_identity(t.ca, t.cert, t.key)
            self._server_tls = tls_server_context(t.ca, t.cert, t.key)
            self._client_tls = tls_client_context(t.ca, t.cert, t.key)
        self.listener = MigrationListener(
            self.host, ssl_context=self._server_tls, client_ssl=self._client_tls,
            max_pending=config.max_pending_connections, handshake_timeout_s=config.handshake_timeout_s,
            stall_timeout_s=config.stall_timeout_s,
        )
        self.migration_port: int | None = None
        self.accepting = True
        self._pruning: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        """Reload guests and migrations from the journal (restart recovery), then start the listener."""
        self.recovery = await recover(self.host, self.journal, client_ssl=self._client_tls)
        self.prune_migrated()
        self._pruning = asyncio.get_running_loop().create_task(self._prune_periodically(), name="prune-migrated")
        addr = self.config.migration_listen
        self.migration_port = await self.listener.start(addr.host, addr.port)
        log.info("migration listener on %s:%d", addr.host, self.migration_port)

    async def shutdown(self) -> None:
        """Stop taking work; cancel migrations that have not committed, let committed ones finish."""
        self.accepting = False
        if self._pruning is not None:
            self._pruning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruning
        await self.listener.close()
        tasks = []
        for migration in [*self.outgoing.values(), *self.file_jobs.values()]:
            task = migration.task
            if task is not None and not task.done():
                migration.cancel()  # refused once committed: then the task finishes the hand-off
                if migration in self.file_jobs.values() and migration.progress.status.finished:
                    task.cancel()  # a restore done but for its guest's arrival self-check: not worth waiting for
                tasks.append(task)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await self.host.close()
        self.journal.close()
        if self._own_runtime_dir is not None:  # only channel sockets live there (guests_dir_for)
            shutil.rmtree(self._own_runtime_dir, ignore_errors=True)

    # ------------------------------------------------------------------ migrated records

    def prune_migrated(self) -> list[str]:
        """Drop ``migrated`` records past ``guests.keep_migrated_s`` / ``keep_migrated_count``."""
        return self.host.prune_migrated(time.monotonic(), keep_s=self.config.keep_migrated_s,
                                        keep_count=self.config.keep_migrated_count)

    async def _prune_periodically(self) -> None:
        # Age is checked a few times per retention period (at most once a minute); the count
        # is enforced at once, when a migration ends (migrate's done callback).
        interval = min(60.0, max(1.0, self.config.keep_migrated_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.prune_migrated()

    # ------------------------------------------------------------------ guests

    def _require_accepting(self) -> None:
        if not self.accepting:
            raise GuestStateError("the daemon is shutting down")

    def create_guest(self, definition: GuestDefinition) -> HostGuest:
        """Define a guest (RAM file and firmware launch)."""
        self._require_accepting()
        try:
            return self.host.create_guest(definition)
        except FirmwareError as exc:
            if exc.status in (FirmwareStatus.POLICY_FAILURE, FirmwareStatus.INVALID_PARAM):
                raise ConfigError(f"policy {definition.policy:#x} refused by the firmware: {exc}") from exc
            raise

    def guest(self, name: str) -> HostGuest:
        """The named guest (UnknownGuest otherwise)."""
        return self.host.get(name)

    def _not_migrating(self, guest: HostGuest) -> None:
        for migration in self.outgoing.values():
            if migration.guest is guest and not migration.progress.status.finished:
                raise GuestStateError(f"guest {guest.name} is migrating (migration {migration.progress.id})")
        for job in self.file_jobs.values():
            if isinstance(job, GuestSave) and job.guest is guest and not job.progress.status.finished:
                raise GuestStateError(f"guest {guest.name} is being saved (job {job.progress.id})")

    @contextlib.asynccontextmanager
    async def _operating(self, name: str) -> AsyncIterator[HostGuest]:
        """One lifecycle operation at a time per guest; a second one gets a 409 at once."""
        guest = self.guest(name)
        if guest.busy.locked():
            raise GuestStateError(f"guest {name} is busy with another operation; try again")
        async with guest.busy:
            self._not_migrating(guest)
            yield guest

    async def start_guest(self, name: str, workload: WorkloadConfig | None = None) -> HostGuest:
        """Launch the guest agent and wait for its boot."""
        self._require_accepting()
        async with self._operating(name) as guest:
            await guest.start(workload)
            self.host.journal_guest(guest)
        return guest

    async def stop_guest(self, name: str) -> HostGuest:
        async with self._operating(name) as guest:
            await guest.stop()
            self.host.journal_guest(guest)
        return guest

    async def reboot_guest(self, name: str) -> HostGuest:
        async with self._operating(name) as guest:
            await guest.reboot()
        return guest

    async def kexec_guest(self, name: str) -> HostGuest:
        async with self._operating(name) as guest:
            await guest.kexec()
        return guest

    async def delete_guest(self, name: str) -> None:
        async with self._operating(name):
            await self.host.delete(name)

    # ------------------------------------------------------------------ migrations

    def migrate(
        self, name: str, destination: str, *, downtime_limit_ms: float | None = None,
        max_bandwidth_mib_s: float | None = None, connections: int | None = None,
    ) -> MigrationProgress:
        """Start an outgoing migration; returns its progress record at once (REST 202).

        ``None`` for a setting means the config's (``migration.*``); ``connections``: how many TCP
        connections, 1..wire.MAX_CONNECTIONS (more than one: control on the first, pages striped
        over the others).
        """
        self._require_accepting()
        guest = self.guest(name)
        if guest.busy.locked():
            raise GuestStateError(f"guest {name} is busy with another operation; try again")
        self._not_migrating(guest)
        address = parse_address(destination, "destination")
        if address.port == 0:
            raise ConfigError(f"destination: port must be 1..65535, got {destination!r}")
        # MigrationParams takes any int, and True is one to Python; a caller that passed a bool
        # made a mistake that must not become "1 connection" silently (REST refuses it in the schema).
        if isinstance(connections, bool):
            raise ConfigError(f"connections must be an integer, got {connections!r}")
        try:
            params = MigrationParams(
                handshake_timeout_s=self.config.handshake_timeout_s, stall_timeout_s=self.config.stall_timeout_s,
                downtime_limit_ms=self.config.downtime_limit_ms if downtime_limit_ms is None else downtime_limit_ms,
                max_bandwidth_mib_s=(
                    self.config.max_bandwidth_mib_s if max_bandwidth_mib_s is None else max_bandwidth_mib_s
                ),
                connections=self.config.connections if connections is None else connections,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        # on_commit: the journal's commit record, durable before COMMIT goes out; if it cannot be
        # written the migration rolls back and the guest runs on here.
        migration = OutgoingMigration(guest, address.host, address.port, params, ssl_context=self._client_tls,
                                      on_commit=self.journal.record_commit,
                                      on_established=lambda p, key: self.host.remember_handoff_key(p.id, key),
                                      resolve_port=self.migration_port or 0)
        task = migration.start()  # raises MigrationRefused (409) with the reason
        self.outgoing[migration.progress.id] = migration
        self.host.add_migration(migration.progress)
        # After the task: the guest's final state (mark_migrated runs after the last transition).

        def settled(_: object) -> None:
            self.host.journal_guest(guest)
            self.prune_migrated()  # the count of migrated records, at once

        task.add_done_callback(settled)
        return migration.progress

    def save_guest(self, name: str, path: str, *, for_host_pdh: str | None = None,
                   live: bool = False) -> MigrationProgress:
        """Start saving a running guest to ``path``; returns the job's progress at once (REST 202).

        ``for_host_pdh``: the PDH certificate file of the host that may restore it (it must chain
        to ``sev.trusted_roots``); default this host's own.
        """
        self._require_accepting()
        guest = self.guest(name)
        if guest.busy.locked():
            raise GuestStateError(f"guest {name} is busy with another operation; try again")
        self._not_migrating(guest)
        target = self.firmware.pdh_cert_pem if for_host_pdh is None else self._target_pdh(for_host_pdh)
        job = GuestSave(guest, Path(path), target, SaveParams(live=live),
                        on_commit=self.journal.record_commit,
                        on_key=lambda p, key: self.journal.record_handoff_key(p.id, key))
        task = job.start()  # SaveRefused (409) with the reason
        self.file_jobs[job.progress.id] = job
        self.host.add_migration(job.progress)
        task.add_done_callback(lambda _: self.host.journal_guest(guest))
        return job.progress

    def _target_pdh(self, path: str) -> bytes:
        """The PDH certificate a save is for, checked like a destination's (chain to the trusted roots)."""
        pem_path = Path(path)
        if not pem_path.is_absolute():
            raise ConfigError(f"for_host_pdh must be an absolute path, got {path!r}")
        try:
            with os.fdopen(open_regular(pem_path), "rb") as f:
                pem = f.read(MAX_PDH_CERT_PEM + 1)
        except OSError as exc:
            raise SaveRefused(f"cannot read the PDH certificate {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise SaveRefused(f"the PDH certificate {exc}") from None
        if len(pem) > MAX_PDH_CERT_PEM:
            raise SaveRefused(f"{path} is larger than a PDH certificate can be ({MAX_PDH_CERT_PEM} bytes)")
        try:
            verify_pdh_certificate(pem, identity.load_trust_anchors(self.config.trusted_roots))
        except MigdError as exc:
            raise SaveRefused(f"the PDH certificate {path} is not one the save may be for: {exc}") from None
        return pem

    def restore_guest(self, path: str, *, name: str | None = None) -> MigrationProgress:
        """Start restoring a saved file; returns the job's progress at once (REST 202).

        The file is checked first (SaveFileError, GuestExists: 409): for this host, not restored
        here before, its guest's name free.
        """
        self._require_accepting()
        saved, definition = inspect(self.host, Path(path), name)
        job = GuestRestore(self.host, saved, definition,
                           on_commit=lambda p, nonce: self.journal.record_commit(p, consume_session=nonce))
        self.file_jobs[job.progress.id] = job
        self.host.add_migration(job.progress)
        task = job.start()

        def settled(_: object) -> None:
            if job.guest is not None:
                self.host.journal_guest(job.guest)

        task.add_done_callback(settled)
        return job.progress

    def migrations(self) -> list[MigrationProgress]:
        """Every migration this host knows, oldest first."""
        return list(self.host.migrations.values())

    def migration(self, migration_id: str) -> MigrationProgress:
        try:
            return self.host.migrations[migration_id]
        except KeyError:
            raise UnknownMigration(f"no migration with id {migration_id!r} on this host") from None

    def cancel_migration(self, migration_id: str) -> MigrationProgress:
        """Cancel an outgoing migration before its commit."""
        progress = self.migration(migration_id)
        migration = self.outgoing.get(migration_id) or self.file_jobs.get(migration_id)
        if migration is None:
            raise CannotCancel(f"migration {migration_id} is incoming here; cancel it on its source host")
        if not migration.cancel():
            raise CannotCancel(f"migration {migration_id} is {progress.status.value}"
                               f"{' and committed' if progress.phase.committed else ''}: too late to cancel")
        return progress

    def active_migrations(self) -> list[MigrationProgress]:
        return [m for m in self.host.migrations.values() if not m.status.finished]


__all__ = [
    "CannotCancel", "Daemon", "GuestState", "MigrationRefused", "UnknownMigration", "runtime_dir_for",
]
