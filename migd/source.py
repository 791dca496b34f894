"""Outgoing live migration: handshake, SEV session, pre-copy, stop-and-copy, two-phase hand-off.

The flow (QEMU's ``migration/ram.c`` pre-copy, with SEV's SEND_* commands):

1. refuse unless the guest runs and its migration-control MSR is READY (docs/protocol.md);
2. HELLO → WELCOME (destination PDH, nonce) → SEND_START → SESSION → a verified SESSION_ACK
   (key confirmation: no page goes to a destination that cannot prove it unwrapped the session);
3. round 0 sends every page; later rounds send what the dirty log (guest writes plus
   MAP_GPA_RANGE state changes) reports, until the dirty bytes fit in
   ``bandwidth × downtime_limit``; auto-converge throttles a guest that out-dirties the link;
4. the MSR gate: before every chunk the MSR is checked; when it is not READY the
   migration is in ``blackout`` and sends nothing until READY returns (bounded), after which
   the dirty log (the early-boot reset marks every page whose state changed) re-sends them;
5. stop-and-copy: pause, last dirty pages, final shared-page bitmap, vCPU state (a VMSA
   transport packet for SEV-ES), PREPARE (binding the end of the stream) → a verified PREPARED
   (destination holds exactly what was sent) → journal commit + SEND_FINISH → COMMIT → STARTED.

Which message is legal when, the MACs and every deadline are :mod:`migd.session`'s; this module
does the I/O, the firmware calls and the guest's pause and resume. Before the commit every failure or cancel aborts, SEND_CANCELs and resumes the guest here;
after it the guest never runs here again.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from migd import failure_text, wire
from migd.abi import PAGE_SHIFT, PAGE_SIZE, GuestPolicy, MiB
from migd.bitmap import PageBitmap
from migd.guest.channel import GuestChannel
from migd.convergence import AutoConverge, BandwidthMeter, Decision, HandoffCost, RateLimiter, SwitchoverPolicy
from migd.errors import MigdError, ProtocolError
from migd.guest.host_guest import GuestState, HostGuest
from migd.peer_text import printable
from migd.platform.pki_verify import TlsProblem, tls_problem
from migd.platform.psp import RunAbandoned
from migd.page_runs import CHUNK_PAGES, HOLE_STEP_PAGES, PageKind, classify, lane_of, stripe_end
from migd.lane_socket import LaneSocket
from migd.progress import MigrationProgress
from migd.send_buffers import SendRing
from migd.send_lane import RUN_BYTES, SendLane
from migd.session import Phase, Timeouts
from migd.source_session import SourceSession
from migd.stream import WRITE_HIGH_WATER, FrameProtocol, StreamClosed, StreamTimeout, open_stream

log = logging.getLogger(__name__)
#: The payload ring: what the transport may still hold (it pauses us past WRITE_HIGH_WATER,
#: and a step writes at most one chunk) plus the chunk being written.
SEND_RING_BYTES = WRITE_HIGH_WATER + 2 * CHUNK_PAGES * PAGE_SIZE
#: With several connections each one's transport pauses us past its share of WRITE_HIGH_WATER
#: (at least this), so that the rings of all of them together stay about one ring's size.
MIN_LANE_HIGH_WATER = 2 << 20


class MigrationRefused(MigdError):
    """The migration cannot start now (guest state, MSR not READY): REST 409."""


def tls_connect_failure(reason: str | None, verify_code: int | None, text: str, host: str) -> str:
    """The migration's error for a TLS handshake with the destination ``host`` that failed.

    ``reason``/``verify_code``: OpenSSL's codes (``ssl.SSLError.reason``, ``verify_code``);
    ``text``: the error as OpenSSL worded it, kept at the end for the exact detail.
    """
    problem = tls_problem(reason, verify_code)
    what = {
        TlsProblem.UNKNOWN_CA: "the destination's certificate is not signed by our tls.ca",
        TlsProblem.EXPIRED: "the destination's certificate has expired",
        TlsProblem.NOT_YET_VALID: "the destination's certificate is not valid yet (are both hosts' clocks right?)",
        TlsProblem.NAME_MISMATCH: f"the destination's certificate is not issued for {host!r}",
        TlsProblem.WRONG_PURPOSE: "the destination's certificate does not allow serverAuth",
        TlsProblem.BAD_CERTIFICATE: "the destination's certificate does not verify",
        TlsProblem.NO_CERTIFICATE: "the destination presented no certificate",
        TlsProblem.REFUSED_BY_PEER: "the destination refused our certificate (mutual TLS: is our tls.cert issued "
                                    "by the CA in its tls.ca? its log names the reason)",
        TlsProblem.VERSION: "the destination does not offer TLS 1.3",
        TlsProblem.NOT_TLS: "the destination does not speak TLS (does its config lack the [tls] table?)",
    }.get(problem, "the handshake with the destination failed")
    return f"TLS: {what}: {text}"


def closed_by_tls(exc: StreamClosed, host: str) -> str | None:
    """The migration's error when TLS ended the stream (e.g. the destination's alert refusing our
    certificate, which TLS 1.3 delivers after the handshake, at the first read), else None."""
    cause = exc.__cause__
    if not isinstance(cause, ssl.SSLError):
        return None
    return tls_connect_failure(cause.reason, getattr(cause, "verify_code", None), str(exc), host)


class MigrationFailed(MigdError):
    """The migration ended without moving the guest; the guest runs on here."""


@dataclass(frozen=True)
class MigrationParams:
    """Tunables of one outgoing migration."""

    downtime_limit_ms: float = 300.0
    max_bandwidth_mib_s: float = 0.0  # 0 = unlimited
    converge_timeout_s: float = 120.0  # pre-copy time before giving up or forcing
    force_switchover: bool = False  # past converge_timeout: switch over anyway instead of failing
    auto_converge: bool = True
    blackout_timeout_s: float = 30.0  # how long the MSR may stay 0 mid-migration
    handshake_timeout_s: float = 15.0
    handoff_timeout_s: float = 120.0  # STARTED after COMMIT (the destination's agent takes over)
    stall_timeout_s: float = 30.0  # pre-copy: no byte taken by the destination for this long
    stop_copy_margin_s: float = 10.0  # stop-and-copy: no progress for the downtime limit plus this
    connections: int = 1  # TCP connections the pages are striped over (the first also carries control)

    def __post_init__(self) -> None:
        if isinstance(self.connections, bool) or not (isinstance(self.connections, int)
                                                      and 1 <= self.connections <= wire.MAX_CONNECTIONS):
            raise ValueError(f"connections must be an integer from 1 to {wire.MAX_CONNECTIONS}, got {self.connections!r}")
        if not (self.downtime_limit_ms > 0 and math.isfinite(self.downtime_limit_ms)):
            raise ValueError(f"downtime_limit_ms must be a finite number > 0, got {self.downtime_limit_ms}")
        if not (self.max_bandwidth_mib_s >= 0 and math.isfinite(self.max_bandwidth_mib_s)):
            raise ValueError(f"max_bandwidth_mib_s must be a finite number >= 0, got {self.max_bandwidth_mib_s}")
        for name in ("converge_timeout_s", "blackout_timeout_s", "handshake_timeout_s", "handoff_timeout_s",
                     "stall_timeout_s", "stop_copy_margin_s"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")


#: Called once the destination holds a verified guest, before COMMIT is sent. It must be
#: synchronous and durable (the journal): once it returns, the guest belongs to the destination.
CommitHook = Callable[[MigrationProgress], None]
#: Called with the session's hand-off key once the destination proved it holds it (SESSION_ACK):
#: the daemon keeps it (journal) to answer an authenticated RESOLVE about this migration.
EstablishedHook = Callable[[MigrationProgress, bytes], None]


class OutgoingMigration:
    """One outgoing migration of ``guest`` to ``host:port``; ``run()`` drives it to the end.

    The protocol (which message when, the MACs, the deadlines, the REST status) is the
    :class:`~migd.session.SourceSession`'s; this driver does the I/O, the firmware calls and
    the guest's pause/resume, and reports to the session what happened.
    """

    def __init__(
        self,
        guest: HostGuest,
        host: str,
        port: int,
        params: MigrationParams | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        on_commit: CommitHook | None = None,
        on_established: EstablishedHook | None = None,
        resolve_port: int = 0,
    ) -> None:
        self.guest = guest
        self.host, self.port = host, port
        self.params = p = params or MigrationParams()
        self._ssl = ssl_context
        self._on_commit = on_commit
        self._on_established = on_established
        self.progress = MigrationProgress(guest.name, "source", f"{host}:{port}", guest.definition.npages)
        d = guest.definition
        self.session = SourceSession(
            self.progress.id, wire.GuestSpec(d.name, d.npages, d.policy, d.efi, d.uefi_live_migration),
            guest.firmware.transport_mode.value, self.progress.phase, time.monotonic(),
            timeouts=Timeouts(handshake_s=p.handshake_timeout_s, stall_s=p.stall_timeout_s,
                              blackout_s=p.blackout_timeout_s, handoff_s=p.handoff_timeout_s,
                              stop_copy_margin_s=p.stop_copy_margin_s, downtime_limit_s=p.downtime_limit_ms / 1000.0),
            resolve_port=resolve_port,  # our listener: a destination in doubt asks it (RESOLVE)
            connections=p.connections,
        )
        self._proto: FrameProtocol | None = None
        #: Every connection of the migration, the first (control) one first; pages are striped over them.
        self._lanes: list[FrameProtocol | LaneSocket] = []
        self._rings: list[SendRing | None] = []  # one payload ring per connection, allocated at its first frame
        #: With several connections: each one's ordered frame queue and SEND_UPDATE_DATA thread.
        self._send_lanes: list[SendLane] = []
        #: Counts the MSR's drops: a run read in a worker is sent only if none came between its
        #: classification and the end of its read (else its pages are re-sent: ``_resend``).
        self._msr_epoch = 0
        self._resend: PageBitmap | None = None  # pages of abandoned runs (several connections)
        self._meter = BandwidthMeter()
        self._limiter = RateLimiter(self.params.max_bandwidth_mib_s * MiB)
        self._auto = AutoConverge(enabled=self.params.auto_converge)
        self._paused = False
        self._session_open = False
        self._cancel_requested = False
        self._task: asyncio.Task[MigrationProgress] | None = None
        self._msr_ready = asyncio.Event()
        self._running = False
        self._rolling_back = False  # _roll_back is under way: a cancel must not interrupt it
        self._msr_dropped = False
        self._bytes_left = 0  # bytes that have left the transport buffers so far (every connection)

    # ------------------------------------------------------------------ control

    def check_preconditions(self) -> None:
        """Raise MigrationRefused unless the guest can be migrated right now."""
        g = self.guest
        if g.state is not GuestState.RUNNING:
            raise MigrationRefused(f"guest {g.name} is {g.state.value}; only a running guest can migrate")
        if g.definition.policy & GuestPolicy.NOSEND:
            raise MigrationRefused(f"guest {g.name} has the NOSEND policy: its firmware forbids sending it")
        if not g.vm.migration_ready:
            raise MigrationRefused(
                f"guest {g.name} has not enabled migration: MSR_KVM_MIGRATION_CONTROL = "
                f"{g.vm.msr_migration_control:#x} (needs KVM_MIGRATION_READY; the guest may be booting, "
                f"rebooting or kexec'ing, or has SevLiveMigrationEnabled unset)"
            )

    def start(self) -> asyncio.Task[MigrationProgress]:
        """Check preconditions, then run in a task (returned)."""
        self.check_preconditions()
        self._task = asyncio.get_running_loop().create_task(self.run(), name=f"migrate-{self.guest.name}")
        return self._task

    @property
    def task(self) -> asyncio.Task[MigrationProgress] | None:
        """The task running this migration, once started."""
        return self._task

    def cancel(self) -> bool:
        """Cancel before the commit; False if it is too late (committed or finished)."""
        if not self.progress.phase.can_cancel or self._task is None:
            return False
        self._cancel_requested = True
        if self._rolling_back:
            # Interrupting the roll-back would leave the guest paused: it resumes the guest and
            # ends the session by itself.
            return True
        if not self._running:
            # The task has not taken its first step: nothing to undo.
            self.session.cancel(time.monotonic())
        self._task.cancel()
        return True

    # ------------------------------------------------------------------ the run

    async def run(self) -> MigrationProgress:
        """Migrate; returns the final progress (status completed, failed or cancelled)."""
        self._running = True
        self.check_preconditions()
        self.guest.vm.on_migration_control_change = self._msr_changed
        self._msr_ready.set()
        try:
            await self._handshake()
            dirty = await self._precopy()
            await self._stop_and_copy(dirty)
        except asyncio.CancelledError:
            if self.session.committed:
                raise
            await self._roll_back("cancelled by the operator" if self._cancel_requested else "cancelled",
                                  cancelled=True)
            if not self._cancel_requested:
                raise
        except Exception as exc:  # every failure before the commit ends the same safe way
            if self.session.committed:
                self._after_commit_failure(exc)
            else:
                await self._roll_back(_reason(exc, f"{self.host}:{self.port}", self.session.phase))
        finally:
            self.guest.vm.on_migration_control_change = None
            for send_lane in self._send_lanes:
                send_lane.close()
            for lane in self._lanes[1:]:
                lane.close()
            if self._proto is not None:
                self._proto.close()
            # The daemon keeps finished migrations (their records): not their 12 MiB of buffers.
            # Regions the transport still holds stay alive through its views until sent.
            self._rings = []
            self._resend = None  # npages / 8 bytes
        return self.progress

    def _msr_changed(self, old: int, new: int) -> None:
        if self.guest.vm.migration_ready:
            self._msr_ready.set()
        else:
            # Remember the drop even if READY is back before the next chunk: the migration
            # must still pass through blackout (and its state changes get re-sent).
            self._msr_dropped = True
            self._msr_epoch += 1
            self._msr_ready.clear()
            log.info("migration-control MSR dropped guest=%s msr=%#x: sending stops", self.guest.name, new)

    async def _receive(self, until: type[Any]) -> Any:
        """Feed the session the peer's messages until one of type ``until``; returns the session's result.

        Waits are bounded by the session's deadline (SessionTimeout names the step); an illegal
        message is the session's PeerProtocolError, an ABORT its PeerAborted.
        """
        proto, session = self._stream(), self.session
        while True:
            try:
                msg = await proto.receive(session.time_left(time.monotonic()))
            except TimeoutError:
                session.handle_timer(time.monotonic())
                continue
            result = session.receive(msg, time.monotonic())
            if isinstance(msg, until):
                return result

    async def _handshake(self) -> None:
        session, p = self.session, self.params
        try:
            self._proto = proto = await open_stream(self.host, self.port, ssl_context=self._ssl,
                                                    timeout=p.handshake_timeout_s)
        except TimeoutError:
            raise MigrationFailed(f"could not connect to {self.host}:{self.port} within "
                                  f"{p.handshake_timeout_s:g} s: check the address, the route and any firewall "
                                  f"between the hosts (the limit is migration.handshake_timeout_s)") from None
        except ssl.SSLError as exc:  # our side refused the destination (its certificate, its TLS)
            raise MigrationFailed(tls_connect_failure(exc.reason, getattr(exc, "verify_code", None),
                                                      str(exc), self.host)) from exc
        try:
            # TLS 1.3: the destination checks our certificate after our side of the handshake, so
            # its refusal (an alert) ends the stream at the first write or read.
            proto.write(session.hello(time.monotonic()))
            welcome: wire.Welcome = await self._receive(wire.Welcome)
        except StreamClosed as exc:
            if self._ssl is not None and (tls_failure := closed_by_tls(exc, self.host)) is not None:
                raise MigrationFailed(tls_failure) from exc
            hint = " (mutual TLS: does the destination trust our certificate's CA?)" if self._ssl else ""
            raise MigrationFailed(f"destination closed the stream during the handshake{hint}: {exc}") from exc
        # SEND_START checks the destination's PDH chain; the nonce binds the session to this connection.
        start = self.guest.firmware.send_start(self.guest.handle, welcome.pdh_cert, welcome.nonce)
        self._session_open = True
        assert start.handoff_key is not None
        proto.write(session.session(start.pdh_cert_pem, start.session_blob, start.policy, start.handoff_key,
                                    time.monotonic()))
        await self._receive(wire.SessionAck)  # key confirmation: no page before it
        if self._on_established is not None:
            self._on_established(self.progress, start.handoff_key)
        await self._open_lanes()

    async def _open_lanes(self) -> None:
        """Open the further connections (as many as the session agreed), each proved by JOIN/JOINED.

        Each is a connection like the first (TLS with the same identity, to the address the
        first one reached), opened and then written by its lane's thread (migd/lane_socket.py),
        and carries pages only after the destination proved, in JOINED, that it holds this
        session's key. The lanes exist before any connection is opened, so whatever ends the
        opening (a refused connection, a cancel) closes them all here, and a later end in ``run()``.
        """
        proto, n = self._stream(), self.session.connections
        self._lanes, self._rings = [proto], [None]
        if n != self.params.connections:
            log.info("destination does not speak several connections: guest=%s uses one", self.guest.name)
        if n == 1:
            return
        high = max(MIN_LANE_HIGH_WATER, WRITE_HIGH_WATER // n)
        proto.set_write_buffer_limits(high)
        sockets = [LaneSocket(i) for i in range(1, n)]
        self._lanes = [proto, *sockets]
        self._rings = [None] * n
        # A further connection's thread writes its frames; only the first one's go through the loop.
        self._send_lanes = [SendLane(0, functools.partial(self._lane_written, 0), proto.bytes_consumed,
                                     transport_bytes=high)]
        self._send_lanes += [SendLane(s.index, functools.partial(self._lane_written, s.index), s.bytes_consumed,
                                      transport_bytes=RUN_BYTES, socket=s) for s in sockets]
        self._resend = PageBitmap(self.guest.definition.npages)
        try:
            await asyncio.gather(*(self._open_lane(lane) for lane in self._send_lanes[1:]))
        except BaseException:
            # One failed, or the migration was cancelled: none of the others may go on opening
            # or stay open. Shutting a lane's socket ends its thread's connect or read at once;
            # synchronous, so a second cancel cannot interrupt it.
            for send_lane in self._send_lanes:
                send_lane.close()
            raise

    async def _open_lane(self, send_lane: SendLane) -> None:
        """Open connection ``send_lane.index`` in its thread: connect, JOIN, a JOINED verified here;
        MigrationFailed says which step failed."""
        index, lane = send_lane.index, send_lane.socket
        assert lane is not None
        p, where = self.params, f"connection {index + 1} of {self.session.connections} to {self.host}:{self.port}"
        address = self._stream().peer_address
        if address is None:
            raise MigrationFailed(f"could not open {where}: the first connection's address is unknown")
        join = self.session.join(index)
        try:
            reply = await send_lane.run_in_thread(
                functools.partial(lane.open, address, join, self._ssl, self.host, p.handshake_timeout_s))
            if not isinstance(reply, wire.Joined):
                raise ProtocolError(f"expected Joined, peer sent {type(reply).__name__}")
            self.session.check_joined(reply, index)
        except StreamTimeout as exc:
            raise MigrationFailed(f"could not open {where} within {p.handshake_timeout_s:g} s "
                                  f"({exc}; the limit is migration.handshake_timeout_s)") from exc
        except ssl.SSLError as exc:
            raise MigrationFailed(f"{where}: " + tls_connect_failure(exc.reason, getattr(exc, "verify_code", None),
                                                                    str(exc), self.host)) from exc
        except (MigdError, TimeoutError) as exc:
            raise MigrationFailed(f"{where} was refused: {exc}") from exc
        except OSError as exc:
            raise MigrationFailed(f"could not open {where}: {exc.strerror or exc}") from exc

    async def _precopy(self) -> PageBitmap:
        """Pre-copy rounds; returns the dirty set left for stop-and-copy."""
        channel = self._channel()
        progress, p, guest = self.progress, self.params, self.guest
        await channel.fetch_dirty()  # start the log now: round 0 covers everything before
        progress.rounds = 1
        sent = await self._send_extents(np.array([0]), np.array([guest.definition.npages]))
        policy = SwitchoverPolicy(p.downtime_limit_ms, p.converge_timeout_s, p.force_switchover, time.monotonic())
        unsent: PageBitmap | None = None  # a dirty set held back by a switch-over that waited on the link
        while True:
            dirty = await channel.fetch_dirty()
            # ROUND_END counts every connection's frames: all written first (or abandoned, and
            # their pages added to this round).
            await self._flush_lanes()
            self._merge_resend(dirty)
            if unsent is not None:
                dirty.update(unsent)
                unsent = None
            remaining = dirty.count()
            progress.remaining_pages = remaining
            self._write(self.session.round_end(progress.rounds - 1, remaining))
            now = time.monotonic()
            # Bytes still queued behind a slow or stalled link are part of what stop-and-copy waits for.
            decision = policy.after_round(now, remaining * PAGE_SIZE, sum(p.write_buffer_size() for p in self._lanes),
                                          self._bandwidth(now), guest.definition.npages,
                                          channel.round_trip_s("fetch_dirty"))
            progress.expected_downtime_ms = policy.expected_downtime_ms
            if decision is Decision.CONFIRM_LINK:
                if await self._link_caught_up(policy):
                    return dirty
                # The link held more than the meter saw (socket buffers, a stalled network):
                # the guest ran on meanwhile, so look at its dirty log again before pausing.
                unsent = dirty
                decision = policy.out_of_time(time.monotonic()) or Decision.NEXT_ROUND
                if decision is Decision.NEXT_ROUND:
                    continue
            if decision is Decision.SWITCH_OVER:
                log.warning("forcing switchover guest=%s remaining_pages=%d", guest.name, remaining)
                return dirty
            if decision is Decision.GIVE_UP:
                raise MigrationFailed(
                    f"did not converge within {p.converge_timeout_s:g} s: {remaining} pages still dirty, "
                    f"expected downtime {progress.expected_downtime_ms or float('inf'):.0f} ms > "
                    f"limit {p.downtime_limit_ms:g} ms (throttle {self._auto.throttle_percent} %)"
                )
            throttle = self._auto.end_of_round(sent * PAGE_SIZE, remaining * PAGE_SIZE)
            if throttle is not None:
                log.info("auto-converge guest=%s throttle=%d%%", guest.name, throttle)
                progress.throttle_percent = throttle
                await channel.throttle(throttle)
            progress.rounds += 1
            starts, counts = dirty.extent_arrays(True)
            sent = await self._send_extents(starts, counts)

    async def _link_caught_up(self, policy: SwitchoverPolicy) -> bool:
        """PING the destination; True if its PONG came within the downtime limit.

        Bytes that left our transport buffer may still sit in socket buffers or behind a
        stalled link: pausing now would turn that wait into downtime. The PONG proves that
        everything sent so far is placed; a slow one means the dirty set is stale.
        """
        proto, session = self._stream(), self.session
        await self._flush_lanes()
        sent_at = time.monotonic()
        self._write(session.ping(sent_at))
        deadline = policy.confirm_deadline(sent_at, self.params.handshake_timeout_s)
        while True:
            self._check_agent()
            now = time.monotonic()
            if now >= deadline:
                raise MigrationFailed(f"the destination did not confirm the pages sent within "
                                      f"{now - sent_at:.0f} s (link stalled)")
            try:
                msg = await proto.receive(max(0.01, min(0.5, deadline - now, session.time_left(now))))
            except TimeoutError:
                self._account_link(time.monotonic())
                session.handle_timer(time.monotonic())
                continue
            waited = session.receive(msg, time.monotonic())
            break
        if not policy.link_confirmed(waited):
            log.info("switch-over deferred guest=%s: the destination caught up after %.0f ms",
                     self.guest.name, waited * 1000.0)
            return False
        return True

    async def _drain(self, proto: FrameProtocol) -> None:
        """Wait for the transport's buffer to drain, within the session's stall deadline."""
        async def drained(timeout: float) -> None:
            async with asyncio.timeout(timeout):
                await proto.drain()

        await self._within_stall_deadline(drained)

    async def _flush_lanes(self) -> None:
        """Wait until every connection has written what it queued (before a frame that counts them)."""
        for send_lane in self._send_lanes:
            await self._within_stall_deadline(send_lane.flush)

    def _merge_resend(self, dirty: PageBitmap) -> None:
        """Add the pages of abandoned runs to ``dirty`` (no job may be in flight: after _flush_lanes)."""
        if self._resend is not None and self._resend.count():
            dirty.update(self._resend)
            self._resend = PageBitmap(self.guest.definition.npages)

    async def _within_stall_deadline(self, wait: Callable[[float], Awaitable[None]]) -> None:
        """``await wait(timeout)`` until it returns: a link that still moves bytes is slow, not
        stalled; only no progress until the session's deadline ends the migration (SessionTimeout)."""
        session = self.session
        while True:
            try:
                await wait(session.time_left(time.monotonic()))
                return
            except TimeoutError:
                self._account_link(time.monotonic())
                session.handle_timer(time.monotonic())

    def _lane_written(self, lane: int, msg: wire.Message, kind: PageKind, gpa: int, npages: int,
                      header: bytes, nbytes: int | None) -> int:
        """A connection's queued frame had its turn: write it (``nbytes`` None) or take the word of
        the lane's thread that it wrote it; account for it. Returns the connection's stream
        position after a frame written here."""
        if nbytes is None:
            nbytes = self._write(msg, lane)
        else:
            self._account_link(time.monotonic())
        self.session.page_sent(kind, gpa, npages, header, lane)
        self.progress.count_run(kind, npages, nbytes)
        return self._lanes[lane].bytes_sent

    def _account_link(self, now: float) -> None:
        """Bytes that left the transport's buffer since the last look: bandwidth, and activity on the link.

        What left for the peer, not what was queued: bytes still in the transport's buffer (a
        stalled link) must not look like bandwidth, nor like a peer that reads.
        """
        left = sum(proto.bytes_consumed() for proto in self._lanes or [self._stream()])
        if left > self._bytes_left:
            self._meter.record(now, left - self._bytes_left)
            self._bytes_left = left
            self.session.activity(now)
        self.progress.throughput_bps = self._meter.rate(now)

    async def _send_extents(self, starts: np.ndarray, counts: np.ndarray) -> int:
        """Send every page of the extents, step by step; returns the pages sent.

        A step is one chunk of up to ``CHUNK_PAGES`` pages, classified and read at once, or one
        stretch of a hole of the sparse RAM file (up to ``HOLE_STEP_PAGES``), sent as zero runs
        without reading it: a 16 GiB guest with 256 MiB populated costs ~130 steps of holes
        instead of 65536 chunks scanned (and, on tmpfs, allocated by the scan).
        """
        total = 0
        guest = self.guest
        todo = int(counts.sum()) if len(counts) else 0
        # Under a bandwidth limit every page of a step is charged before it, zero pages included
        # (as before holes were skipped), and holes go in chunk-sized steps, so no single wait
        # keeps the MSR gate from being looked at.
        max_hole = HOLE_STEP_PAGES if self._limiter.unlimited else CHUNK_PAGES
        lanes = len(self._lanes)
        for start, count in zip(starts.tolist(), counts.tolist(), strict=True):
            pos, end = start, start + count
            while pos < end:
                lane = self._lanes[lane_of(pos, lanes)]
                if not isinstance(lane, LaneSocket):  # a further connection's thread waits itself
                    await self._drain(lane)
                if self._send_lanes:
                    await self._within_stall_deadline(self._send_lanes[lane_of(pos, lanes)].room)
                    # A step of holes queues zero runs on every connection, and hole steps all
                    # start on the same one (64 stripes each): the others are looked at too.
                    for send_lane in self._send_lanes:
                        if send_lane.crowded:
                            await self._within_stall_deadline(send_lane.room)
                span = 0 if self._limiter.unlimited else self._step_span(pos, end, max_hole)
                delay = self._limiter.delay(time.monotonic(), span * PAGE_SIZE)
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    await asyncio.sleep(0)  # let hypercalls and REST run between steps
                self._check_agent()
                if self._msr_dropped or not guest.vm.migration_ready:
                    await self._blackout()
                # Classify and read in one synchronous step: routing is the bitmap's at read time.
                step = self._send_step(pos, end, max_hole)
                for send_lane in self._send_lanes:
                    send_lane.submit()  # the step's private runs, to its worker at once
                    send_lane.pump()  # what its worker sealed meanwhile
                pos += step
                total += step
                todo -= step
                self.progress.remaining_pages = todo
        return total

    def _step_span(self, pos: int, end: int, max_hole: int) -> int:
        """How many pages the step at ``pos`` will cover, as things stand now (the limiter's charge)."""
        data = self.guest.ram.next_populated(pos << PAGE_SHIFT, end - pos) >> PAGE_SHIFT
        if data > pos:
            return min(data - pos, max_hole)
        return min(CHUNK_PAGES, end - pos, stripe_end(pos, len(self._lanes)) - pos)

    def _send_step(self, pos: int, end: int, max_hole: int = HOLE_STEP_PAGES) -> int:
        """Send the pages from ``pos`` (one chunk, or up to ``max_hole`` pages of a hole); returns how many.

        A chunk never crosses a stripe (:data:`~migd.page_runs.STRIPE_PAGES`): its runs all go on
        one connection. A hole's zero runs go each on its stripe's connection.
        """
        guest, lanes = self.guest, len(self._lanes)
        data = guest.ram.next_populated(pos << PAGE_SHIFT, end - pos) >> PAGE_SHIFT
        if data > pos:
            # Never written (or punched): zero pages, known without reading a byte of them.
            count = min(data - pos, max_hole)
            first, stop = pos, pos + count
            while first < stop:
                n = min(wire.MAX_RUN_PAGES, stop - first, stripe_end(first, lanes) - first)
                self._send_run(PageKind.ZERO, first, n)
                first += n
            return count
        count = min(CHUNK_PAGES, end - pos, stripe_end(pos, lanes) - pos)
        for run in classify(guest.vm.shared_bitmap, guest.ram, pos, count):
            self._send_run(run.kind, run.first, run.count)
        return count

    def _send_run(self, kind: PageKind, first: int, count: int) -> None:
        gpa, lane = first << PAGE_SHIFT, lane_of(first, len(self._lanes))
        if self._send_lanes:
            self._queue_run(self._send_lanes[lane], kind, gpa, count)
            return
        if kind is PageKind.ZERO:
            self.session.page_sent(kind, gpa, count, lane=lane)
            self.progress.count_run(kind, count, self._write(wire.ZeroPages(gpa, count), lane))
            return
        guest, proto = self.guest, self._stream()  # one connection: every run is the event loop's
        ring = self._rings[lane]
        if ring is None:
            self._rings[lane] = ring = SendRing(SEND_RING_BYTES)
        # The payload goes into a ring region the transport no longer needs (None: the ring is
        # full behind a slow link, and a new buffer is allocated as before).
        out = ring.take(count * PAGE_SIZE, proto.bytes_consumed())
        try:
            if kind is PageKind.SHARED:
                # A copy, not a view of guest RAM: the transport may send a queued view later,
                # after the guest rewrote the page, and the bytes sent must be the bytes
                # classified and checksummed now (one memcpy per run, ~0.1 ms per MiB).
                if out is None:
                    payload: bytes | memoryview = guest.ram.read(gpa, count)
                else:
                    out[:] = guest.ram.view(gpa, count)
                    payload = out
                msg: wire.Message = wire.SharedPages(gpa, count, payload)
                self.session.page_sent(kind, gpa, count, lane=lane)
            else:
                header, ciphertext = guest.firmware.send_update_data(guest.handle, guest.ram, gpa, count, out, lane)
                msg = wire.PrivatePages(gpa, count, header, ciphertext)
                self.session.page_sent(kind, gpa, count, header, lane)
            nbytes = self._write(msg, lane)
        except BaseException:
            ring.release()
            raise
        if out is not None:
            ring.placed(proto.bytes_sent)
        self.progress.count_run(kind, count, nbytes)

    def _queue_run(self, send_lane: SendLane, kind: PageKind, gpa: int, count: int) -> None:
        """Several connections: a shared run is copied now (this synchronous step), a private one
        read and sealed by the connection's thread; each written in its turn."""
        guest = self.guest
        if kind is PageKind.ZERO:
            send_lane.put_ready(wire.ZeroPages(gpa, count), kind, gpa, count)
            return
        out, in_ring = send_lane.buffer(count * PAGE_SIZE)
        if kind is PageKind.SHARED:
            # A copy, for the reason _send_run gives: the bytes sent are the bytes classified now.
            try:
                out[:] = guest.ram.view(gpa, count)
            except BaseException:
                send_lane.unused(in_ring)
                raise
            send_lane.put_ready(wire.SharedPages(gpa, count, out), kind, gpa, count, in_ring)
            return
        # The read and the sealing happen in the connection's thread, later: sent only if the MSR
        # did not drop between now (classified under the gate) and the end of the read.
        epoch, lane, resend = self._msr_epoch, send_lane.index, self._resend
        assert resend is not None

        def job() -> wire.PrivatePages | None:
            try:
                header, ciphertext = guest.firmware.send_update_data(
                    guest.handle, guest.ram, gpa, count, out, lane, still_valid=lambda: self._msr_epoch == epoch)
            except RunAbandoned:
                resend.set_range(gpa >> PAGE_SHIFT, count)
                return None
            return wire.PrivatePages(gpa, count, header, ciphertext)

        send_lane.put_private(job, gpa, count, in_ring)

    def _write(self, msg: wire.Message, lane: int = 0) -> int:
        """Write ``msg`` on connection ``lane`` (control messages: the first), one of the loop's."""
        proto = self._lanes[lane] if self._lanes else self._stream()
        assert not isinstance(proto, LaneSocket), "a further connection is written by its lane's thread"
        nbytes = proto.write(msg)
        self._account_link(time.monotonic())
        return nbytes

    def _bandwidth(self, now: float) -> float:
        rate = self._meter.rate(now)
        if rate > 0:
            return rate
        elapsed = now - self.progress.phase.started_at
        return self._meter.total_bytes / elapsed if elapsed > 0 else 0.0

    async def _blackout(self) -> None:
        """Wait, sending nothing, until the guest's MSR is READY again (the session bounds it)."""
        session = self.session
        # Runs classified while the MSR was READY and queued for their connection's thread are
        # settled first: each read that ended before the drop is sent, the others are abandoned
        # (their pages re-sent after READY). In blackout nothing is read or written.
        await self._flush_lanes()
        self._msr_dropped = False
        session.msr_dropped(time.monotonic())
        log.info("blackout guest=%s: waiting up to %gs for READY", self.guest.name, self.params.blackout_timeout_s)
        while not self.guest.vm.migration_ready:
            self._check_agent()
            self._msr_ready.clear()
            try:
                async with asyncio.timeout(min(0.5, session.time_left(time.monotonic()))):
                    await self._msr_ready.wait()
            except TimeoutError:
                session.handle_timer(time.monotonic())
        session.msr_ready(time.monotonic())
        log.info("blackout over guest=%s: state changes will be re-sent", self.guest.name)

    async def _stop_and_copy(self, dirty: PageBitmap) -> None:
        guest, channel, session = self.guest, self._channel(), self.session
        progress = self.progress
        while True:
            self._check_agent()
            self._paused = True  # before the await: a cancel during it must still resume the guest
            await channel.pause()
            paused_at = time.monotonic()
            if guest.vm.migration_ready and not self._msr_dropped:
                break
            # The MSR dropped just before the pause: the bitmap may be stale. Let it boot.
            await channel.resume()
            self._paused = False
            await self._blackout()
            dirty.update(await channel.fetch_dirty())
            self._merge_resend(dirty)
            await self._send_extents(*dirty.extent_arrays(True))
            dirty = await channel.fetch_dirty()
        # Where the downtime goes: one log line at the end (bench/downtime.py reads it).
        marks: list[tuple[str, float]] = [("paused", paused_at)]
        decision_pages = progress.remaining_pages  # the dirty set the switch-over was decided on
        decision_bandwidth = progress.throughput_bps  # the meter's rate at the decision (bytes/s)
        fixed_ms = HandoffCost().predict_ms(guest.definition.npages, channel.round_trip_s("fetch_dirty"))
        session.paused(paused_at)
        guest.state = GuestState.PAUSED
        dirty.update(await channel.fetch_dirty())
        await self._flush_lanes()  # what was queued before the pause, written or abandoned
        self._merge_resend(dirty)
        marks.append(("fetched", time.monotonic()))
        # The paused agent exports its vCPU state while the last pages go out: its round trip
        # is off the critical path. On any failure the task is dropped (its answer is stale).
        export = asyncio.ensure_future(channel.export_state())
        try:
            progress.rounds += 1
            final_pages = dirty.count()
            await self._send_extents(*dirty.extent_arrays(True))
            await self._flush_lanes()
            # Its lane counts are the destination's barrier: the bitmap, vCPU state and PREPARE
            # after it are handled once every page of every connection is placed.
            self._write(self.session.round_end(progress.rounds - 1, 0))
            marks.append(("pages_queued", time.monotonic()))
            final_bitmap = guest.vm.shared_bitmap.copy()
            progress.shared_bitmap_sha256 = hashlib.sha256(final_bitmap.to_bytes()).hexdigest()
            encoded = final_bitmap.encode()
            session.bitmap_sent(encoded)
            self._write(wire.SharedBitmap(encoded))
            marks.append(("bitmap_queued", time.monotonic()))
            state = await export
        except BaseException:
            export.cancel()
            export.add_done_callback(_retrieve)
            raise
        marks.append(("state_exported", time.monotonic()))
        if guest.definition.policy & GuestPolicy.ES:
            header, ciphertext = guest.firmware.send_update_vmsa(guest.handle, 0, wire.pack_vmsa(state))
            vcpu = wire.VcpuState(0, header, ciphertext)
        else:
            vcpu = wire.VcpuState(0, None, state)
        self._write(vcpu)
        # PREPARE binds the end of the stream: a frame dropped on the way fails it at the destination.
        self._write(session.prepare(vcpu, guest.firmware.transport_sequence(guest.handle), time.monotonic()))
        marks.append(("prepare_queued", time.monotonic()))
        await self._receive(wire.Prepared)
        marks.append(("prepared", time.monotonic()))
        # The commit point: the journal's record, durable, then COMMIT. From here the guest is the
        # destination's, and SEND_FINISH (the firmware forgets the outgoing session, a durable file
        # removal) runs while COMMIT is on its way: after a crash the journal's record decides, not
        # the firmware's leftover context (migd/daemon/recovery.py), so it need not delay the hand-off.
        if self._on_commit is not None:
            self._on_commit(progress)
        self._write(session.commit(time.monotonic()))
        marks.append(("commit_sent", time.monotonic()))
        try:
            guest.firmware.send_finish(guest.handle)
        except MigdError as exc:  # the guest is the destination's either way: never resume it here
            log.error("SEND_FINISH failed after the commit guest=%s: %s", guest.name, exc)
        try:
            await self._receive(wire.Started)
        except (MigdError, TimeoutError) as exc:
            self._after_commit_failure(exc)
            return
        started_at = time.monotonic()
        marks.append(("started", started_at))
        progress.downtime_ms = (started_at - paused_at) * 1000.0
        progress.remaining_pages = 0
        # The session completed on the verified STARTED; the guest's state follows at once, before
        # any poller can act on "completed" (the daemon's journal row is written by the transition).
        guest.state = GuestState.MIGRATED
        log.info(
            "stop-and-copy timeline guest=%s id=%s decision_pages=%d final_pages=%d decision_mib_s=%.1f "
            "expected_downtime_ms=%s fixed_cost_ms=%.1f throttle=%d %s",
            guest.name, progress.id, decision_pages, final_pages, decision_bandwidth / MiB,
            "none" if progress.expected_downtime_ms is None else f"{progress.expected_downtime_ms:.1f}",
            fixed_ms, self._auto.throttle_percent, " ".join(f"{name}={t:.6f}" for name, t in marks),
        )
        await guest.mark_migrated()
        log.info(
            "migration completed guest=%s rounds=%d downtime_ms=%.1f total_ms=%.1f",
            guest.name, progress.rounds, progress.downtime_ms, progress.phase.total_time_ms(time.monotonic()),
        )

    def _after_commit_failure(self, exc: BaseException) -> None:
        # The destination owns the guest now; never resume here. Keep the RAM until an
        # operator confirms the destination runs it (nothing is lost either way).
        reason = (f"committed, but the destination did not confirm the start: "
                  f"{_reason(exc, f'{self.host}:{self.port}', self.session.phase)}; the guest is the "
                  f"destination's now: check there that it runs")
        log.error("migration guest=%s: %s; the guest stays paused here", self.guest.name, reason)
        self.guest.state = GuestState.MIGRATED
        self.session.fail(reason, time.monotonic())
        self.progress.phase.error = reason

    async def _roll_back(self, reason: str, *, cancelled: bool = False) -> None:
        """Before the commit: tell the peer, cancel the session, resume the guest untouched."""
        session = self.session
        self._rolling_back = True
        # No connection's thread may be inside SEND_UPDATE_DATA across SEND_CANCEL, and no frame
        # of theirs may follow the ABORT (close() waits for a running job: one chunk's runs).
        for send_lane in self._send_lanes:
            send_lane.close()
        aborted = next((p.peer_abort for p in [self._proto, *self._lanes] if p is not None and p.peer_abort), None)
        if aborted is not None:
            reason = f"the destination aborted the migration: {printable(aborted)}"
        log.warning("migration guest=%s %s: %s", self.guest.name, "cancelled" if cancelled else "failed",
                    printable(reason, 1024))
        if self._proto is not None and self._proto.close_reason is None:
            try:
                self._proto.write(session.abort(reason))
            except MigdError:
                pass
        if self._session_open:
            try:
                self.guest.firmware.send_cancel(self.guest.handle)
            except MigdError as exc:
                log.error("SEND_CANCEL failed guest=%s: %s", self.guest.name, exc)
        channel = self.guest.channel
        if channel is not None and channel.connected:
            try:
                if self._auto.throttle_percent:
                    await channel.throttle(0)
                if self._paused:
                    await channel.resume()
            except (MigdError, TimeoutError) as exc:
                log.error("could not resume guest=%s after a failed migration: %s", self.guest.name, exc)
        self._paused = False
        if self.guest.state is GuestState.PAUSED:
            self.guest.state = GuestState.RUNNING
        if cancelled and not session.finished:
            session.cancel(time.monotonic())
        else:
            session.fail(reason, time.monotonic())

    def _check_agent(self) -> None:
        """A guest whose agent died (a crashed VM) cannot be migrated: fail with that reason."""
        if self.guest.agent is None or self.guest.state is GuestState.STOPPED:
            raise MigrationFailed(f"the agent of guest {self.guest.name} exited during the migration "
                                  f"(the guest crashed); nothing was committed")

    def _channel(self) -> GuestChannel:
        if self.guest.channel is None:
            raise MigrationFailed(f"guest {self.guest.name} has no running agent")
        return self.guest.channel

    def _stream(self) -> FrameProtocol:
        assert self._proto is not None
        return self._proto


def _retrieve(task: asyncio.Future[bytes]) -> None:
    """Done callback of a dropped task: take its outcome so asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()


#: What the source was doing in each phase, in the words of a failure's sentence ("... during pre-copy").
_STEP = {
    Phase.CONNECTING: "the connection", Phase.AWAIT_WELCOME: "the handshake", Phase.SENDING_SESSION: "the handshake",
    Phase.AWAIT_SESSION_ACK: "the handshake", Phase.PRECOPY: "pre-copy", Phase.BLACKOUT: "blackout",
    Phase.STOP_COPY: "stop-and-copy", Phase.AWAIT_PREPARED: "stop-and-copy (waiting for PREPARED)",
    Phase.COMMITTING: "the commit", Phase.AWAIT_STARTED: "the hand-off (waiting for STARTED)",
}


def _reason(exc: BaseException, peer: str, phase: Phase) -> str:
    """The migration's ``error`` for ``exc`` (migd/failure_text.py); an internal error's traceback goes to the log."""
    step = _STEP.get(phase, phase.value)
    if failure_text.cause_of(exc) is failure_text.Cause.INTERNAL:
        log.error("internal error during %s of a migration to %s", step, peer, exc_info=exc)
    return failure_text.describe(exc, peer=peer, peer_role="destination", step=step)
