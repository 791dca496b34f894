"""Incoming live migration: one ``IncomingMigration`` per connection to the listener (migd/listener.py).

Per connection: HELLO (refused if the guest name or the migration id is in use, the transport
mode differs or the protocol version is unknown; nothing is recorded) → WELCOME with this
host's PDH and a fresh nonce → SESSION → RECEIVE_START (with the nonce) → the source's MAC
checked: authenticated, and only now the migration's record, journal rows and guest appear →
SESSION_ACK (key confirmation); then page runs are placed as they arrive (private runs through
RECEIVE_UPDATE_DATA into the new guest's RAM, shared runs raw, zero runs as holes); the final
shared-page bitmap and vCPU state; PREPARE → verification (its MAC, the stream it binds, every
page received, RECEIVE_FINISH) → PREPARED; a verified COMMIT → start the agent with the
migrated state (it self-checks every page first) → STARTED. The protocol's rules are
:mod:`migd.session`'s; this module does the I/O, the firmware, the guest and the journal.

Until COMMIT arrives any failure removes every trace of the partial guest (invariant 5), except
after PREPARED, when this copy may be the only one: then only the source's authenticated word
(an ABORT, or RESOLVED) removes it. After COMMIT the source has given the guest up, so it is
kept here whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import ssl
import threading
import time
from collections.abc import Coroutine
from typing import Any

from migd import failure_text, resolve, wire
from migd.abi import PAGE_SHIFT, PAGE_SIZE, GuestPolicy, MiB
from migd.bitmap import PageBitmap
from migd.errors import MigdError, PeerAborted, ProtocolError
from migd.guest.host_guest import GuestDefinition, GuestState, HostGuest, wait_until
from migd.host import Host
from migd.journal import JournalError
from migd.lane_receiver import LaneReceiver
from migd.migration_state import MigrationPhase
from migd.page_runs import PageKind
from migd.peer_text import printable
from migd.progress import MigrationProgress, page_frame_bytes
from migd.sev_transport import NONCE_SIZE
from migd.dest_session import DestinationSession
from migd.session import Phase, SessionTimeout, Timeouts
from migd.stream import FrameProtocol, StreamClosed

log = logging.getLogger(__name__)

#: How often a control frame that waits for the further connections' pages looks again.
_LANE_POLL_S = 0.002
#: How long the end of a further connection waits for the source's ABORT before it is the reason.
LANE_END_GRACE_S = 0.2
#: How long a returning guest waits for its own departure from here to finish (agent stop and
#: RAM release, normally well under a second); inside the source's handshake deadline (15 s).
DEPARTURE_WAIT_S = 10.0


class LaneLost(StreamClosed):
    """A further connection of the migration ended while its pages still mattered."""


class IncomingRefused(MigdError):
    """This host will not take the guest (name exists, size, mode): sent back as ABORT."""


class IncomingMigration:
    """The destination side of one connection to the migration listener.

    The protocol (legal messages per phase, MACs, deadlines, the REST status) is the
    :class:`~migd.session.DestinationSession`'s; this driver does the I/O, the firmware calls,
    the guest and the journal. Nothing here creates a record before the session is
    authenticated: the migration, its journal rows and the guest appear only after the
    source's SESSION verified under the hand-off key.
    """

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
        #: Why this side refused the peer before it authenticated (the listener counts it), if it did.
        self.refused_before_authentication: str | None = None
        self.start_timeout_s = start_timeout_s
        self.resolve_timeout_s = resolve_timeout_s
        self.client_ssl = client_ssl
        now = time.monotonic()
        self.session = DestinationSession(
            MigrationPhase(started_at=now), now,
            timeouts=Timeouts(handshake_s=handshake_timeout_s, stall_s=idle_timeout_s, handoff_s=start_timeout_s),
        )
        self.progress: MigrationProgress | None = None
        self.guest: HostGuest | None = None
        self._handle: int | None = None
        self._received: PageBitmap | None = None
        self._bitmap: PageBitmap | None = None
        self._vcpu_state: bytes | None = None
        self._agent_ready: asyncio.Future[None] | None = None
        self._staging: asyncio.Future[None] | None = None  # the agent loading its vCPU state before COMMIT
        self._stage_marks: list[tuple[str, float]] = []  # for the hand-off timeline log line
        self._source_says: str | None = None  # RESOLVED's verified answer after PREPARED, if not committed
        # Several connections: each further one (lane) is read and placed by its own thread.
        self._lanes: dict[int, FrameProtocol | LaneReceiver] = {0: proto}
        self._lane_ends: dict[int, asyncio.Future[None]] = {}
        self._lane_ended_at: dict[int, float] = {}  # when a further connection's peer ended it (loop time)
        self._placed = [0]  # page frames placed per connection
        self._lanes_needed = True  # until PREPARE verified: a lane that ends fails the migration
        self._count_lock = threading.Lock()  # progress counters, from several page workers

    async def run(self) -> MigrationProgress | None:
        """Receive one guest; returns its progress record (None if refused before authentication)."""
        try:
            await self._receive()
        except asyncio.CancelledError:
            self._end_lanes()  # no further connection places a page, or joins, while the guest goes
            await self._fail("destination is shutting down")
            raise
        except Exception as exc:  # any failure before COMMIT discards the partial guest
            self._end_lanes()
            await self._fail(_reason(exc, self.peer, self.session.phase))
        finally:
            self._end_lanes()
            self.proto.close()
        return self.progress

    async def _next(self, until: type[Any] | None = None) -> Any:
        """The session's result for the next control message (of type ``until``, if given).

        Waits are bounded by the session's deadline; page frames do not go through the queue,
        so the stream's last activity moves the stall deadline.
        """
        proto, session = self.proto, self.session
        while True:
            try:
                msg = await proto.receive(session.time_left(time.monotonic()))
            except TimeoutError:
                session.activity(self._last_activity())
                session.handle_timer(time.monotonic())
                continue
            except LaneLost:
                if self._lanes_needed:
                    raise
                continue  # reported after every page was placed and verified: it no longer matters
            result = session.receive(msg, time.monotonic())
            if until is None or isinstance(msg, until):
                return msg, result

    async def _receive(self) -> None:
        proto, host, session = self.proto, self.host, self.session
        first, _ = await self._next()
        if isinstance(first, wire.Resolve):
            # Not a migration: a destination in doubt asks how one of ours ended.
            reply = resolve.answer(host, first, self.peer)
            session.answered(time.monotonic())
            proto.write(reply if reply is not None else wire.Abort("RESOLVE not authenticated"))
            await proto.drain()
            return
        if isinstance(first, wire.Join):
            # A further connection opens with the lane preamble, and the listener gives it to a
            # thread of its own (migd/lane_receiver.py): this one did not.
            raise IncomingRefused("JOIN on a connection that did not open with the lane preamble")
        hello: wire.Hello = first
        definition = self._accept(hello)
        proto.write(session.welcome(host.firmware.pdh_cert_pem, time.monotonic()))
        offer, _ = await self._next(wire.Session)
        blob_nonce = bytes(offer.session_blob[:NONCE_SIZE])
        if host.session_known(blob_nonce, hello.migration_id):
            raise IncomingRefused(f"migration {hello.migration_id} or its session was seen here before "
                                  f"(a replayed stream or a reused id)")
        self._handle = host.firmware.receive_start(offer.policy, offer.pdh_cert, offer.session_blob, session.nonce)
        key = host.firmware.handoff_key(self._handle)
        ack = session.accept_session(key, time.monotonic())  # AuthenticationError: not this session's source
        # Authenticated: only now does this migration leave any trace here.
        proto.mark_authenticated()
        definition = self._accept(hello)  # again: a guest of that name may have come meanwhile
        host.accept_session(blob_nonce, hello.migration_id)  # durable: never again, across restarts
        self.progress = progress = MigrationProgress(definition.name, "destination", self.proto.local,
                                                     definition.npages, phase=session.status, id=hello.migration_id,
                                                     source=self._source_address(hello))
        host.add_migration(progress)
        host.remember_handoff_key(progress.id, key)
        self._record_resolve_address(hello)
        await self._departed(definition.name)
        self.guest = host.create_incoming(definition, self._handle)
        # The agent starts (QEMU's -incoming) while pages stream in; it must be up by COMMIT.
        self._agent_ready = asyncio.ensure_future(self.guest.prepare_incoming())
        self._received = PageBitmap(definition.npages)
        self._placed = [0] * session.connections
        proto.set_page_handler(self._place)
        if session.connections > 1:
            host.lane_servers[progress.id] = self._admit_lane
        proto.write(ack)
        log.info("incoming migration guest=%s from=%s id=%s", definition.name, self.peer, progress.id)

        while True:
            msg, result = await self._next()
            if isinstance(msg, wire.RoundEnd):
                progress.rounds = msg.round + 1
                progress.remaining_pages = msg.dirty_pages
                # What follows (the next round, or the bitmap, vCPU state and PREPARE) comes after
                # every page sent before this, on every connection.
                await self._lanes_placed(msg.lanes)
            elif isinstance(msg, wire.Ping):
                # Page frames are placed as they arrive, before any later control frame is
                # queued: by now every page sent before the PING on this connection is in guest
                # RAM; the further connections' are waited for.
                await self._lanes_placed(msg.lanes)
                proto.write(result)
            elif isinstance(msg, wire.SharedBitmap):
                self._bitmap = PageBitmap.decode(msg.payload, max_npages=definition.npages)
                if self._bitmap.npages != definition.npages:
                    raise ProtocolError(f"bitmap covers {self._bitmap.npages} pages, guest has {definition.npages}")
            elif isinstance(msg, wire.VcpuState):
                self._vcpu_state = self._install_vcpu_state(msg)
            elif isinstance(msg, wire.Prepare):
                break
        marks: list[tuple[str, float]] = [("prepare_received", time.monotonic())]
        self._prepare(msg)
        self._end_lanes()  # every page is placed and verified: the further connections go
        marks.append(("verified", time.monotonic()))
        await self._agent_ready  # a destination that cannot start the guest must not say PREPARED
        if proto.close_reason is not None:
            # The stream ended while we verified: PREPARED never left, the source cannot have
            # committed, so this is an ordinary failure (the copy goes), not doubt.
            raise StreamClosed(f"the stream ended before PREPARED could be sent: {proto.close_reason}")
        # From here the source may commit at any moment: until it says how the migration
        # ended, this copy may be the only one and nothing here may discard it (not even a
        # shutdown; a restart asks the source, migd.daemon.recovery). No await between the check above
        # and this write: the stream cannot end in between.
        proto.write(session.prepared(self._received.count(), time.monotonic()))
        marks.append(("prepared_sent", time.monotonic()))
        try:
            await self._next(wire.Commit)
        except PeerAborted:
            raise  # authenticated: the source aborted before committing, its guest runs there
        except (StreamClosed, SessionTimeout, ProtocolError) as exc:
            # In doubt: the source may have committed and lost only the COMMIT frame (or someone
            # forged an ABORT). Ask it before throwing away what may now be the only copy.
            session.stream_lost(_reason(exc, self.peer, session.phase), time.monotonic())
            outcome = await self._resolve_in_doubt(hello, key, exc)
            if outcome in ("unreachable", "unknown"):
                # Kept in doubt (not started, not discarded): a restart asks again. "unknown" under
                # the key means a source that lost its record of the migration: it may have committed.
                raise
            if outcome != "committed":
                self._source_says = outcome  # not in doubt any more: _fail removes this copy
                raise IncomingRefused(f"in doubt after PREPARED ({_reason(exc, self.peer, session.phase)}); "
                                      f"the source says: {outcome}") from exc
            session.resolved_committed(time.monotonic())
        marks.append(("commit_received", time.monotonic()))
        host.incoming_committed(progress)  # the journal's commit record, durable, before the guest starts
        marks.append(("journaled", time.monotonic()))
        assert self.guest is not None and self._vcpu_state is not None
        await self._staged()  # normally long done: it ran while the source committed
        marks.append(("staged", time.monotonic()))
        await self.guest.start_incoming(self._vcpu_state)
        marks.append(("imported", time.monotonic()))
        started = session.started(time.monotonic())
        if proto.close_reason is None:  # after a RESOLVE the source may be gone: the guest runs regardless
            proto.write(started)
        # Where the hand-off time goes (bench/downtime.py reads this line).
        log.info("incoming hand-off timeline guest=%s id=%s %s", definition.name, progress.id,
                 " ".join(f"{name}={t:.6f}" for name, t in [*marks, *self._stage_marks]))
        progress.remaining_pages = 0
        report = await self.guest.wait_check(self.start_timeout_s)
        log.info(
            "incoming migration completed guest=%s pages_verified=%d errors=%d first_error=%s",
            definition.name, report.pages_verified, report.errors, report.first_error,
        )

    async def _departed(self, name: str) -> None:
        """A guest coming back may find itself still leaving this host: wait (bounded) until it has.

        The source side marks a guest ``migrated`` on the verified STARTED, then stops its agent
        and releases its RAM; a return migration can arrive in between. A record that keeps its
        RAM (the destination never confirmed the start) is not replaced: it may be the only copy.
        """
        existing = self.host.guests.get(name)
        if existing is None or not existing.state.departed:
            return
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: not existing.has_memory, DEPARTURE_WAIT_S, interval=0.02)
        if existing.has_memory:
            raise IncomingRefused(f"guest {printable(name)} left the destination but its RAM is still there "
                                  f"(its start elsewhere was never confirmed); delete that record first")

    def _source_address(self, hello: wire.Hello) -> str:
        """The source's migration listener (its address and HELLO's resolve port), else its address.

        The connection's own port is an ephemeral one, meaningless to an operator.
        """
        source_host = self.peer.rpartition(":")[0]
        return f"{source_host}:{hello.resolve_port}" if hello.resolve_port and source_host else source_host or self.peer

    def _record_resolve_address(self, hello: wire.Hello) -> None:
        """Where a restart after PREPARED asks how the migration ended (migd.daemon.recovery)."""
        source_host = self.peer.rpartition(":")[0]
        if self.host.journal is None or not hello.resolve_port or not source_host or self.progress is None:
            return
        try:
            self.host.journal.record_resolve_address(self.progress.id, self._source_address(hello))
        except (JournalError, ValueError) as exc:
            log.error("journal: %s (a restart after PREPARED could not ask the source)", exc)

    async def _resolve_in_doubt(self, hello: wire.Hello, key: bytes, cause: BaseException) -> str:
        """Ask the source's listener whether the migration committed (bounded retries)."""
        host_part = self.peer.rpartition(":")[0] if self.peer else ""
        if not hello.resolve_port or not host_part:
            # A source that gave no address cannot be asked (an engine without a listener):
            # it keeps its paused copy, so this one goes.
            return "not askable (no resolve address)"
        address = f"{host_part}:{hello.resolve_port}"
        log.warning("migration %s in doubt after PREPARED (%s): asking %s", hello.migration_id, cause, address)
        deadline = time.monotonic() + self.resolve_timeout_s
        while time.monotonic() < deadline:
            try:
                outcome = await resolve.ask_source(address, hello.migration_id, key, client_ssl=self.client_ssl,
                                                   timeout=5.0)
            except (MigdError, OSError, TimeoutError) as exc:
                log.info("RESOLVE %s: source not reachable yet (%s)", hello.migration_id, exc)
            else:
                if outcome != "pending":
                    log.warning("migration %s resolved by the source: %s", hello.migration_id, outcome)
                    return outcome
            await asyncio.sleep(1.0)
        # No answer: the source may have committed. Keep the prepared guest (never started,
        # never discarded) for the operator rather than risk losing the only copy.
        return "unreachable"

    def _accept(self, hello: wire.Hello) -> GuestDefinition:
        if hello.version != wire.PROTOCOL_VERSION:
            raise IncomingRefused(f"protocol version mismatch: the source speaks migd protocol {hello.version}, the "
                                  f"destination {wire.PROTOCOL_VERSION}; run the same migd release on both hosts")
        mode = self.host.firmware.transport_mode.value
        if hello.transport_mode != mode:
            raise IncomingRefused(f"transport mode {printable(hello.transport_mode)!r} differs from this host's {mode!r}")
        spec = hello.guest
        if (spec.npages * PAGE_SIZE) % MiB:
            raise IncomingRefused(f"guest size of {spec.npages} pages is not a whole number of MiB")
        existing = self.host.guests.get(spec.name)
        # A guest coming back finds its own migrated record here: that record is replaced.
        if existing is not None and not existing.state.departed:
            raise IncomingRefused(f"guest {printable(spec.name)} already exists on the destination "
                                  f"({existing.state.value})")
        if hello.migration_id in self.host.migrations:
            # Never read or overwrite another migration's record: an id in use is refused.
            raise IncomingRefused(f"migration id {printable(hello.migration_id)} is in use on the destination")
        return GuestDefinition(spec.name, spec.npages * PAGE_SIZE // MiB, spec.policy, spec.efi,
                               spec.uefi_live_migration)

    def _place(self, msg: wire.PrivatePages | wire.SharedPages | wire.ZeroPages, lane: int = 0) -> None:
        """Put one run that came on connection ``lane`` into guest RAM.

        Runs in the connection's thread (the first one's page worker, see migd/stream.py, or a
        further one's receiver, migd/lane_receiver.py: one frame at a time, in stream order,
        beside the event loop and the other connections' threads), or on the loop for a zero or
        shared run of the first connection with nothing queued ahead. Touches only this
        migration's guest RAM (the connection's own stripes), firmware context (the connection's
        own transport lane), counters (under a lock) and the session's chain of that connection.
        """
        with self.session.page_frame(msg, lane) as kind:
            self._place_run(msg, kind, lane)
        self._placed[lane] += 1

    def _place_run(self, msg: wire.PrivatePages | wire.SharedPages | wire.ZeroPages, kind: PageKind,
                   lane: int = 0) -> None:
        guest, received, progress = self.guest, self._received, self.progress
        assert guest is not None and received is not None and progress is not None
        first = msg.gpa >> PAGE_SHIFT
        if first + msg.npages > guest.definition.npages:
            raise ProtocolError(
                f"run {msg.gpa:#x}+{msg.npages} pages is outside the guest's {guest.definition.npages} pages"
            )
        if isinstance(msg, wire.PrivatePages):
            guest.firmware.receive_update_data(guest.handle, guest.ram, msg.gpa, msg.npages, msg.header, msg.payload,
                                               lane=lane)
        elif isinstance(msg, wire.SharedPages):
            guest.ram.write(msg.gpa, msg.payload)
        else:
            # The new guest's RAM file starts as one hole: a run never received before reads as
            # zeros already. Only a later round's zero run over placed pages must punch them.
            if received.any_set(first, msg.npages):
                guest.ram.zero(msg.gpa, msg.npages)
        received.set_range(first, msg.npages)
        # Whole frames, as the source counts what it writes (migd/progress.py): both ends agree.
        with self._count_lock:
            progress.count_run(kind, msg.npages, page_frame_bytes(msg))

    # ------------------------------------------------------------------ further connections

    def _admit_lane(self, receiver: LaneReceiver, msg: wire.Join) -> asyncio.Future[None]:
        """Take further connection ``msg.lane``: its JOIN verified by this migration's session
        (AuthenticationError, PeerProtocolError: the listener refuses it), its thread told to
        answer JOINED and place its page frames. Returns what is done when it is no longer needed."""
        joined = self.session.accept_join(msg, time.monotonic())
        lane = msg.lane
        ended = asyncio.get_running_loop().create_future()
        # StreamClosed if its thread gave up waiting; its end reaches _lane_closed only through the
        # loop, so after the registration below.
        receiver.admit(joined, functools.partial(self._place, lane=lane), functools.partial(self._lane_closed, lane))
        self._lanes[lane], self._lane_ends[lane] = receiver, ended
        log.debug("migration %s: connection %d of %d joined from %s", msg.migration_id, lane + 1,
                  self.session.connections, receiver.peer)
        return ended

    def _lane_closed(self, lane: int, exc: BaseException) -> None:
        """A further connection ended: while its pages matter, the migration fails with the reason.

        A source that aborts writes ABORT on the first connection and then closes the others;
        the ABORT (its reason) is given a moment to arrive before the closed connection is the
        reason. A frame this side refused on it is the reason at once.
        """
        if self._lanes_needed and not self.session.finished:
            if isinstance(exc, StreamClosed):
                loop = asyncio.get_running_loop()
                self._lane_ended_at[lane] = loop.time()
                loop.call_later(LANE_END_GRACE_S, self._lane_lost, lane, exc)
            else:
                self._lane_lost(lane, exc)
        ended = self._lane_ends.get(lane)
        if ended is not None and not ended.done():
            ended.set_result(None)

    def _lane_lost(self, lane: int, exc: BaseException) -> None:
        if self._lanes_needed and not self.session.finished and self.proto.peer_abort is None:
            self.proto.interrupt(LaneLost(f"connection {lane + 1} of {self.session.connections} of the "
                                          f"migration ended before every page was placed: {exc}"))

    def _end_lanes(self) -> None:
        """Every page is placed, or the migration is over: release its further connections (their
        tasks end) and take no more (idempotent)."""
        self._lanes_needed = False
        if self.progress is not None and self.host.lane_servers.get(self.progress.id) == self._admit_lane:
            del self.host.lane_servers[self.progress.id]
        for lane, receiver in self._lanes.items():
            if isinstance(receiver, LaneReceiver):
                receiver.stop()
        for ended in self._lane_ends.values():
            if not ended.done():
                ended.set_result(None)

    def _last_activity(self) -> float:
        """When bytes last arrived on any connection of the migration."""
        return max(lane.last_activity for lane in self._lanes.values())

    async def _lanes_placed(self, counts: tuple[int, ...]) -> None:
        """Wait until each further connection has placed the page frames the source counted before
        this control frame (bounded by the session's stall deadline)."""
        session = self.session
        if len(counts) != session.connections - 1:
            raise ProtocolError(f"frame counts for {len(counts)} further connections; this migration has "
                                f"{session.connections - 1}")
        while True:
            behind = [lane for lane, count in enumerate(counts, 1) if self._placed[lane] < count]
            if not behind or self.proto.peer_abort is not None:
                return  # done, or the source's ABORT waits behind this frame: it is the reason
            now = asyncio.get_running_loop().time()
            for lane in behind:
                lane_proto = self._lanes.get(lane)
                # An end the peer made waits out the grace for the source's ABORT, as outside a
                # barrier (_lane_closed): an aborting source closes the further connections
                # right after writing ABORT behind the first one's queued pages.
                ended_at = self._lane_ended_at.get(lane)
                if (lane_proto is not None and lane_proto.close_reason is not None
                        and (ended_at is None or now >= ended_at + LANE_END_GRACE_S)):
                    raise StreamClosed(f"connection {lane + 1} of {session.connections} ended with "
                                       f"{counts[lane - 1] - self._placed[lane]} page frames still to come: "
                                       f"{lane_proto.close_reason}")
            if self.proto.close_reason is not None:
                raise StreamClosed(f"the migration stream ended: {self.proto.close_reason}")
            # Only the connections waited for count as progress (control frames do not).
            waited = [self._lanes[lane].last_activity for lane in behind if lane in self._lanes]
            if waited:
                session.activity(max(waited))
            session.handle_timer(time.monotonic())
            await asyncio.sleep(_LANE_POLL_S)

    def _install_vcpu_state(self, msg: wire.VcpuState) -> bytes:
        guest = self.guest
        assert guest is not None
        if msg.vcpu_id != 0:
            raise ProtocolError(f"vCPU {msg.vcpu_id}: guests have one vCPU")
        if guest.definition.policy & GuestPolicy.ES:
            if msg.header is None:
                raise ProtocolError("an SEV-ES guest's vCPU state must come as a VMSA transport packet")
            guest.firmware.receive_update_vmsa(guest.handle, 0, msg.header, msg.payload)
            vmsa = guest.firmware.guest_vmsa(guest.handle, 0)
            assert vmsa is not None
            state = wire.unpack_vmsa(vmsa)
        else:
            if msg.header is not None:
                raise ProtocolError("a non-ES guest's vCPU state comes in plaintext")
            state = bytes(msg.payload)
        # The vCPU state comes after the last page (stop-and-copy's order): guest RAM is final
        # now (a page frame after it fails PREPARE's frame chain), and the waiting agent can load
        # its state while PREPARE, PREPARED and the source's commit records go by. It does not
        # run before COMMIT.
        self._staging = staging = asyncio.ensure_future(self._stage(state))
        staging.add_done_callback(_retrieve)  # a failure is handled where it is awaited, or moot
        return state

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
        """Verify the guest is complete and exactly what the source sent before it may commit."""
        guest, received = self.guest, self._received
        assert guest is not None and received is not None and self.progress is not None
        # Every page frame before PREPARE has been placed (the stream delivers it only then; the
        # further connections' by the last ROUND_END's barrier): what each connection admitted
        # is what it placed.
        admitted = [chain.frames for chain in self.session.chain.lanes]
        if admitted != self._placed:
            raise ProtocolError(f"page frames admitted per connection {admitted}, placed {self._placed}")
        self.session.check_prepare(msg, guest.firmware.transport_sequence(guest.handle))
        missing = guest.definition.npages - received.count()
        if missing:
            raise ProtocolError(f"PREPARE with {missing} pages never received")
        if self._bitmap is None:
            raise ProtocolError("PREPARE before the shared-page bitmap")
        if self._vcpu_state is None:
            raise ProtocolError("PREPARE before the vCPU state")
        guest.firmware.receive_finish(guest.handle)
        guest.vm.shared_bitmap = self._bitmap
        self.progress.shared_bitmap_sha256 = hashlib.sha256(self._bitmap.to_bytes()).hexdigest()

    async def _fail(self, reason: str) -> None:
        session, progress = self.session, self.progress
        if not self.proto.authenticated.is_set():
            # An unauthenticated peer: the listener counts and logs it, rate-limited, so that a
            # flood of forged HELLOs or SESSIONs cannot flood the log (Refusal.SESSION_REFUSED).
            self.refused_before_authentication = printable(reason, 1024)
            log.debug("incoming connection from=%s refused before authentication: %s", self.peer,
                      self.refused_before_authentication)
        else:
            log.warning("incoming migration from=%s failed: %s", self.peer, printable(reason, 1024))
        if self.proto.close_reason is None:
            try:
                self.proto.write(session.abort(reason))
            except MigdError:
                pass
        if session.phase is Phase.PREPARED:
            session.stream_lost(reason, time.monotonic())
        if session.phase is Phase.IN_DOUBT and self._source_says is None:
            # Not FAILED: the journal must keep saying "prepared, no commit record", so that a
            # restart keeps the guest and asks the source again (Host.close keeps it too).
            log.error("migration %s in doubt after PREPARED (%s); guest %s kept (not started) until its source "
                      "answers", progress.id if progress else "?", printable(reason, 1024),
                      self.guest.name if self.guest else "?")
            return
        if session.committed:
            # The source has committed: the guest is ours now; keep it for the operator.
            session.fail(f"guest kept after commit: {reason}", time.monotonic())
            return
        # A cancel (daemon shutdown, listener.close) must not interrupt the discard: the guest is
        # out of host.guests once it starts, so nothing else would remove what is left. Nothing is
        # placed meanwhile (the further connections were released before).
        self.proto.drop_pages()
        await _uninterrupted(self._discard(reason))

    async def _discard(self, reason: str) -> None:
        """Before the commit: the partial guest goes with every trace (agent, RAM, context, reservation)."""
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
        self.session.fail(reason, time.monotonic())


async def _uninterrupted(coro: Coroutine[Any, Any, None]) -> None:
    """Run ``coro`` to its end even if the caller is cancelled meanwhile; the cancel is re-raised after."""
    task = asyncio.ensure_future(coro)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True
    task.result()
    if cancelled:
        raise asyncio.CancelledError


def _retrieve(task: asyncio.Future[None]) -> None:
    """Take a background task's outcome so asyncio does not log it as never retrieved."""
    if not task.cancelled():
        task.exception()


#: What the destination was doing in each phase, in the words of a failure's sentence.
_STEP = {
    Phase.AWAIT_HELLO: "the handshake", Phase.ACCEPTING: "the handshake", Phase.AWAIT_SESSION: "the handshake",
    Phase.OPENING_SESSION: "the handshake", Phase.RECEIVING: "pre-copy", Phase.AWAIT_PREPARE: "stop-and-copy",
    Phase.VERIFYING: "the verification of the received guest", Phase.PREPARED: "the hand-off (waiting for COMMIT)",
    Phase.IN_DOUBT: "the hand-off (in doubt)", Phase.COMMITTED: "the start of the guest",
}


def _reason(exc: BaseException, peer: str | None, phase: Phase) -> str:
    """The migration's ``error`` (and ABORT reason) for ``exc`` (migd/failure_text.py, as the source's)."""
    step = _STEP.get(phase, phase.value)
    if failure_text.cause_of(exc) is failure_text.Cause.INTERNAL:
        log.error("internal error during %s of an incoming migration from %s", step, peer, exc_info=exc)
    return failure_text.describe(exc, peer=peer or "the source", peer_role="source", step=step)
