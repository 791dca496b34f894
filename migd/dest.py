"""Incoming live migration: the standing listener and one ``IncomingMigration`` per stream.

Per stream: HELLO (refused if the guest name exists, the transport mode differs or the
protocol version is unknown) → WELCOME with this host's PDH → SESSION → RECEIVE_START →
SESSION_ACK; then page runs are placed as they arrive (private runs through
RECEIVE_UPDATE_DATA into the new guest's RAM, shared runs raw, zero runs as holes); the
final shared-page bitmap and vCPU state; PREPARE → verification (every page received,
bitmap and vCPU state present, RECEIVE_FINISH) → PREPARED; COMMIT → start the agent with
the migrated state (it self-checks every page first) → STARTED.

Until COMMIT arrives any failure removes every trace of the partial guest (invariant 5).
After COMMIT the source has given the guest up, so it is kept here whatever happens.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time

from migd import wire
from migd.abi import PAGE_SHIFT, PAGE_SIZE, GuestPolicy
from migd.bitmap import PageBitmap
from migd.errors import MigdError, ProtocolError
from migd.guest import GuestDefinition, HostGuest
from migd.host import Host
from migd.journal import JournalError
from migd.migration_state import MigrationStatus
from migd.page_runs import PageKind
from migd.progress import MigrationProgress
from migd.source import unpack_vmsa
from migd.stream import FrameProtocol, PeerAborted, StreamClosed, StreamTimeout, open_stream

log = logging.getLogger(__name__)
S = MigrationStatus
MiB = 1 << 20


class IncomingRefused(MigdError):
    """This host will not take the guest (name exists, size, mode): sent back as ABORT."""


class IncomingMigration:
    """The destination side of one migration stream."""

    def __init__(
        self,
        host: Host,
        proto: FrameProtocol,
        peer: str,
        *,
        handshake_timeout_s: float = 15.0,
        idle_timeout_s: float = 120.0,
        start_timeout_s: float = 120.0,
        resolve_timeout_s: float = 60.0,
        client_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.proto = proto
        self.peer = peer
        self.handshake_timeout_s = handshake_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.start_timeout_s = start_timeout_s
        self.resolve_timeout_s = resolve_timeout_s
        self.client_ssl = client_ssl
        self._in_doubt = False
        self.progress: MigrationProgress | None = None
        self.guest: HostGuest | None = None
        self._handle: int | None = None
        self._received: PageBitmap | None = None
        self._accepting_pages = False
        self._bitmap: PageBitmap | None = None
        self._vcpu_state: bytes | None = None
        self._committed = False
        self._agent_ready: asyncio.Future[None] | None = None
        self._staging: asyncio.Future[None] | None = None  # the agent loading its vCPU state before COMMIT
        self._stage_marks: list[tuple[str, float]] = []  # for the hand-off timeline log line
        self._placed_at_state = 0  # pages placed when the vCPU state came (none may follow it)

    async def run(self) -> MigrationProgress | None:
        """Receive one guest; returns its progress record (None if refused at HELLO)."""
        try:
            await self._receive()
        except asyncio.CancelledError:
            await self._fail("destination is shutting down")
            raise
        except Exception as exc:  # any failure before COMMIT discards the partial guest
            await self._fail(str(exc) or type(exc).__name__)
        finally:
            self.proto.close()
        return self.progress

    async def _receive(self) -> None:
        proto, host = self.proto, self.host
        first = await proto.receive(self.handshake_timeout_s)
        if isinstance(first, wire.Resolve):
            # Not a migration: a destination in doubt asks how one of ours ended.
            outcome = resolution(host, first.migration_id)
            log.info("RESOLVE migration=%s from=%s: %s", first.migration_id, self.peer, outcome)
            proto.write(wire.Resolved(first.migration_id, outcome))
            await proto.drain()
            return
        if not isinstance(first, wire.Hello):
            raise ProtocolError(f"expected Hello, peer sent {type(first).__name__}")
        hello = first
        definition = self._accept(hello)
        self.progress = progress = MigrationProgress(definition.name, "destination", self.peer, definition.npages)
        progress.id = hello.migration_id
        host.add_migration(progress)
        source_host = self.peer.rpartition(":")[0]
        if host.journal is not None and hello.resolve_port and source_host:
            # Where a restart after PREPARED asks how the migration ended (migd.recovery).
            try:
                host.journal.record_resolve_address(progress.id, f"{source_host}:{hello.resolve_port}")
            except (JournalError, ValueError) as exc:
                log.error("journal: %s (a restart after PREPARED could not ask the source)", exc)
        proto.write(wire.Welcome(host.firmware.pdh_cert_pem))
        session: wire.Session = await proto.expect(wire.Session, self.handshake_timeout_s)
        if session.policy != hello.guest.policy:
            raise ProtocolError(f"SESSION policy {session.policy:#x} differs from HELLO's {hello.guest.policy:#x}")
        self._handle = host.firmware.receive_start(session.policy, session.pdh_cert, session.session_blob)
        self.guest = host.create_incoming(definition, self._handle)
        # The agent starts (QEMU's -incoming) while pages stream in; it must be up by COMMIT.
        self._agent_ready = asyncio.ensure_future(self.guest.prepare_incoming())
        self._received = PageBitmap(definition.npages)
        proto.set_page_handler(self._place)
        self._accepting_pages = True
        proto.write(wire.SessionAck())
        progress.phase.advance(S.ACTIVE, time.monotonic())
        log.info("incoming migration guest=%s from=%s id=%s", definition.name, self.peer, progress.id)

        while True:
            try:
                msg = await proto.receive(self.idle_timeout_s)
            except TimeoutError:
                # Page frames do not go through the queue: only real silence is idleness.
                idle = time.monotonic() - proto.last_activity
                if idle < self.idle_timeout_s:
                    continue
                raise IncomingRefused(f"no data from the source for {idle:.0f} s") from None
            if isinstance(msg, wire.RoundEnd):
                progress.rounds = msg.round + 1
                progress.remaining_pages = msg.dirty_pages
            elif isinstance(msg, wire.Ping):
                # Page frames are placed as they arrive, before any later control frame is
                # queued: by now every page sent before the PING is in guest RAM.
                proto.write(wire.Pong(msg.token))
            elif isinstance(msg, wire.SharedBitmap):
                self._bitmap = PageBitmap.decode(msg.payload, max_npages=definition.npages)
                if self._bitmap.npages != definition.npages:
                    raise ProtocolError(f"bitmap covers {self._bitmap.npages} pages, guest has {definition.npages}")
            elif isinstance(msg, wire.VcpuState):
                self._vcpu_state = self._install_vcpu_state(msg)
            elif isinstance(msg, wire.Prepare):
                marks: list[tuple[str, float]] = [("prepare_received", time.monotonic())]
                self._prepare(msg)
                break
            elif isinstance(msg, wire.Abort):
                raise IncomingRefused(f"source aborted: {msg.reason}")
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} during page transfer")

        marks.append(("verified", time.monotonic()))
        await self._agent_ready  # a destination that cannot start the guest must not say PREPARED
        proto.write(wire.Prepared(self._received.count()))
        # From here the source may commit at any moment: until it says how the migration
        # ended, this copy may be the only one and nothing here may discard it (not even a
        # shutdown; a restart asks the source, migd.recovery).
        self._in_doubt = True
        marks.append(("prepared_sent", time.monotonic()))
        try:
            await proto.expect(wire.Commit, self.start_timeout_s)
        except PeerAborted:
            self._in_doubt = False  # the source aborted before committing: its guest runs there
            raise
        except (StreamClosed, StreamTimeout, ProtocolError) as exc:
            # In doubt: the source may have committed and lost only the COMMIT frame. Ask it
            # before throwing away what may now be the only copy of the guest.
            if await self._resolve_in_doubt(hello, exc) != "committed":
                raise
        marks.append(("commit_received", time.monotonic()))
        self._committed, self._in_doubt = True, False
        progress.phase.commit()
        host.incoming_committed(progress)  # the journal's commit record, durable, before the guest starts
        marks.append(("journaled", time.monotonic()))
        assert self.guest is not None and self._vcpu_state is not None
        await self._staged()  # normally long done: it ran while the source committed
        marks.append(("staged", time.monotonic()))
        await self.guest.start_incoming(self._vcpu_state)
        marks.append(("imported", time.monotonic()))
        if proto.close_reason is None:  # after a RESOLVE the source may be gone: the guest runs regardless
            proto.write(wire.Started())
        # Where the hand-off time goes (bench/downtime.py reads this line).
        log.info("incoming hand-off timeline guest=%s id=%s %s", definition.name, progress.id,
                 " ".join(f"{name}={t:.6f}" for name, t in [*marks, *self._stage_marks]))
        progress.remaining_pages = 0
        progress.phase.advance(S.COMPLETED, time.monotonic())
        report = await self.guest.wait_check(self.start_timeout_s)
        log.info(
            "incoming migration completed guest=%s pages_verified=%d errors=%d first_error=%s",
            definition.name, report.pages_verified, report.errors, report.first_error,
        )

    async def _resolve_in_doubt(self, hello: wire.Hello, cause: BaseException) -> str:
        """Ask the source's listener whether the migration committed (bounded retries)."""
        host_part = self.peer.rpartition(":")[0] if self.peer else ""
        if not hello.resolve_port or not host_part:
            # A source that gave no address cannot be asked (an engine without a listener):
            # it keeps its paused copy, so this one goes.
            self._in_doubt = False
            return "unknown"
        log.warning("migration %s in doubt after PREPARED (%s): asking %s:%d",
                    hello.migration_id, cause, host_part, hello.resolve_port)
        deadline = time.monotonic() + self.resolve_timeout_s
        while time.monotonic() < deadline:
            try:
                ask = await open_stream(host_part, hello.resolve_port, ssl_context=self.client_ssl, timeout=5.0)
                try:
                    ask.write(wire.Resolve(hello.migration_id))
                    answer: wire.Resolved = await ask.expect(wire.Resolved, 10.0)
                finally:
                    ask.close()
            except (MigdError, OSError, TimeoutError) as exc:
                log.info("RESOLVE %s: source not reachable yet (%s)", hello.migration_id, exc)
            else:
                if answer.migration_id == hello.migration_id and answer.outcome != "pending":
                    log.warning("migration %s resolved by the source: %s", hello.migration_id, answer.outcome)
                    self._in_doubt = answer.outcome == "committed"  # until the commit record is written
                    return answer.outcome
            await asyncio.sleep(1.0)
        # No answer: the source may have committed. Keep the prepared guest (never started,
        # never discarded) for the operator rather than risk losing the only copy.
        return "unreachable"

    def _accept(self, hello: wire.Hello) -> GuestDefinition:
        if hello.version != wire.PROTOCOL_VERSION:
            raise IncomingRefused(f"protocol version {hello.version} not supported (this host: {wire.PROTOCOL_VERSION})")
        mode = self.host.firmware.transport_mode.value
        if hello.transport_mode != mode:
            raise IncomingRefused(f"transport mode {hello.transport_mode!r} differs from this host's {mode!r}")
        spec = hello.guest
        if (spec.npages * PAGE_SIZE) % MiB:
            raise IncomingRefused(f"guest size of {spec.npages} pages is not a whole number of MiB")
        if spec.name in self.host.guests:
            raise IncomingRefused(f"guest {spec.name} already exists on the destination")
        return GuestDefinition(spec.name, spec.npages * PAGE_SIZE // MiB, spec.policy, spec.efi,
                               spec.uefi_live_migration)

    def _place(self, msg: wire.PrivatePages | wire.SharedPages | wire.ZeroPages) -> None:
        """Put one run into guest RAM.

        Runs in the stream's page worker thread (one frame at a time, in stream order, beside
        the event loop; see migd/stream.py), or on the loop for a zero or shared run with
        nothing queued ahead. Touches only this migration's guest RAM, firmware context and counters.
        """
        if not self._accepting_pages:
            raise ProtocolError(f"{msg.TYPE.name} frame outside the page-transfer phase")
        guest, received, progress = self.guest, self._received, self.progress
        assert guest is not None and received is not None and progress is not None
        first = msg.gpa >> PAGE_SHIFT
        if first + msg.npages > guest.definition.npages:
            raise ProtocolError(
                f"run {msg.gpa:#x}+{msg.npages} pages is outside the guest's {guest.definition.npages} pages"
            )
        if isinstance(msg, wire.PrivatePages):
            guest.firmware.receive_update_data(guest.handle, guest.ram, msg.gpa, msg.npages, msg.header, msg.payload)
            kind, nbytes = PageKind.PRIVATE, len(msg.payload)
        elif isinstance(msg, wire.SharedPages):
            guest.ram.write(msg.gpa, msg.payload)
            kind, nbytes = PageKind.SHARED, len(msg.payload)
        else:
            # The new guest's RAM file starts as one hole: a run never received before reads as
            # zeros already. Only a later round's zero run over placed pages must punch them.
            if received.any_set(first, msg.npages):
                guest.ram.zero(msg.gpa, msg.npages)
            kind, nbytes = PageKind.ZERO, 0
        received.set_range(first, msg.npages)
        progress.count_run(kind, msg.npages, nbytes)

    def _install_vcpu_state(self, msg: wire.VcpuState) -> bytes:
        guest = self.guest
        assert guest is not None
        if msg.vcpu_id != 0:
            raise ProtocolError(f"vCPU {msg.vcpu_id}: guests have one vCPU")
        if self._vcpu_state is not None:
            raise ProtocolError("a second vCPU state for vCPU 0")
        if guest.definition.policy & GuestPolicy.ES:
            if msg.header is None:
                raise ProtocolError("an SEV-ES guest's vCPU state must come as a VMSA transport packet")
            guest.firmware.receive_update_vmsa(guest.handle, 0, msg.header, msg.payload)
            vmsa = guest.firmware.guest_vmsa(guest.handle, 0)
            assert vmsa is not None
            state = unpack_vmsa(vmsa)
        else:
            if msg.header is not None:
                raise ProtocolError("a non-ES guest's vCPU state comes in plaintext")
            state = bytes(msg.payload)
        # The vCPU state comes after the last page (stop-and-copy's order): guest RAM is final
        # now, so no page may follow, and the waiting agent can load its state while PREPARE,
        # PREPARED and the source's commit records go by. It does not run before COMMIT.
        self._accepting_pages = False
        self._placed_at_state = self._placed_pages()
        self._staging = staging = asyncio.ensure_future(self._stage(state))
        staging.add_done_callback(_retrieve)  # a failure is handled where it is awaited, or moot
        return state

    def _placed_pages(self) -> int:
        """Pages placed so far, every kind, repeats included."""
        assert self.progress is not None
        return sum(self.progress.pages.values())

    async def _stage(self, state: bytes) -> None:
        assert self.guest is not None and self._agent_ready is not None
        self._stage_marks.append(("stage_begin", time.monotonic()))
        await self._agent_ready
        await self.guest.stage_incoming(state)
        self._stage_marks.append(("stage_end", time.monotonic()))

    async def _staged(self) -> None:
        """Wait for the staging; a failed one is only logged (start_incoming then imports the state itself)."""
        staging = self._staging
        if staging is None:
            return
        try:
            await staging
        except Exception as exc:  # start_incoming retries with a full import: one place reports failures
            log.warning("incoming guest=%s: staging the vCPU state failed (%s); importing it at start",
                        self.guest.name if self.guest else "?", exc)

    def _prepare(self, msg: wire.Prepare) -> None:
        """Verify the guest is complete before telling the source it may commit."""
        guest, received = self.guest, self._received
        assert guest is not None and received is not None and self.progress is not None
        self._accepting_pages = False
        missing = guest.definition.npages - received.count()
        if missing:
            raise ProtocolError(f"PREPARE with {missing} pages never received")
        if self._bitmap is None:
            raise ProtocolError("PREPARE before the shared-page bitmap")
        if self._vcpu_state is None:
            raise ProtocolError("PREPARE before the vCPU state")
        # PREPARE comes after every page frame before it is placed: a page the stream carried
        # after the vCPU state shows here, whether or not it beat the state to the page worker.
        if self._placed_pages() != self._placed_at_state:
            raise ProtocolError(f"{self._placed_pages() - self._placed_at_state} pages came after the vCPU state "
                                f"(the agent loads its state from RAM as it stood then)")
        guest.firmware.receive_finish(guest.handle)
        guest.vm.shared_bitmap = self._bitmap
        self.progress.shared_bitmap_sha256 = hashlib.sha256(self._bitmap.to_bytes()).hexdigest()
        self.progress.phase.advance(S.STOP_COPY, time.monotonic())

    async def _fail(self, reason: str) -> None:
        log.warning("incoming migration from=%s failed: %s", self.peer, reason)
        if self.proto.close_reason is None:
            try:
                self.proto.write(wire.Abort(reason))
            except MigdError:
                pass
        progress = self.progress
        if self._in_doubt:
            # Not FAILED: the journal must keep saying "prepared, no commit record", so that a
            # restart keeps the guest and asks the source again (Host.close keeps it too).
            log.error("migration %s in doubt after PREPARED (%s); guest %s kept (not started) until its source "
                      "answers", progress.id if progress else "?", reason, self.guest.name if self.guest else "?")
            if progress is not None:
                progress.phase.error = f"in doubt after PREPARED, guest kept (not started): {reason}"
            return
        if self._committed:
            # The source has committed: the guest is ours now; keep it for the operator.
            if progress is not None:
                progress.phase.error = f"guest kept after commit: {reason}"
                if not progress.status.finished:
                    progress.phase.advance(S.COMPLETED, time.monotonic())
            return
        if self._staging is not None:
            self._staging.cancel()  # its done callback collects the outcome; the agent goes below
        if self._agent_ready is not None:
            self._agent_ready.cancel()  # no-op once done; gather() then collects its outcome
            await asyncio.gather(self._agent_ready, return_exceptions=True)
        if self.guest is not None:
            await self.host.discard(self.guest.name)
        elif self._handle is not None:
            try:
                self.host.firmware.decommission(self._handle)
            except MigdError:
                pass
        if progress is not None and not progress.status.finished:
            progress.phase.advance(S.FAILED, time.monotonic(), error=reason)


def _retrieve(task: asyncio.Future[None]) -> None:
    """Take a background task's outcome so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


def resolution(host: Host, migration_id: str) -> str:
    """How an outgoing migration of this host ended, for a destination in doubt."""
    progress = host.migrations.get(migration_id)
    if progress is not None and progress.role == "source":
        if progress.phase.committed:
            return "committed"
        return "aborted" if progress.status.finished else "pending"
    if host.journal is not None:
        for record in host.journal.migrations():
            if record.id == migration_id and record.role == "source":
                return "committed" if record.committed else "aborted"
    return "unknown"


class MigrationListener:
    """The standing listener for incoming migrations (TCP, optionally mutual TLS)."""

    def __init__(
        self, host: Host, *, ssl_context: ssl.SSLContext | None = None, client_ssl: ssl.SSLContext | None = None
    ) -> None:
        self.host = host
        self._ssl = ssl_context
        self._client_ssl = client_ssl  # to RESOLVE an in-doubt migration with its source
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[MigrationProgress | None]] = set()

    async def start(self, address: str, port: int) -> int:
        """Listen; returns the bound port (pass 0 for a free one)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._connection, address, port, ssl=self._ssl)
        return int(self._server.sockets[0].getsockname()[1])

    def _connection(self) -> FrameProtocol:
        proto = FrameProtocol()
        loop = asyncio.get_running_loop()

        async def serve() -> MigrationProgress | None:
            await proto.connected.wait()
            peer = proto.peer or "unknown"
            return await IncomingMigration(self.host, proto, peer, client_ssl=self._client_ssl).run()

        task = loop.create_task(serve())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return proto

    async def close(self) -> None:
        """Stop listening and end every incoming migration still before its commit."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
