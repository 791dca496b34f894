"""Outgoing live migration: handshake, SEV session, pre-copy, stop-and-copy, two-phase hand-off.

The flow (QEMU's ``migration/ram.c`` pre-copy, with SEV's SEND_* commands):

1. refuse unless the guest runs and its migration-control MSR is READY (DESIGN.md §3);
2. HELLO → WELCOME (destination PDH) → SEND_START → SESSION → SESSION_ACK;
3. round 0 sends every page; later rounds send what the dirty log (guest writes plus
   MAP_GPA_RANGE state changes) reports, until the dirty bytes fit in
   ``bandwidth × downtime_limit``; auto-converge throttles a guest that out-dirties the link;
4. the MSR gate: before every chunk the MSR is checked; when it is not READY the
   migration is in ``blackout`` and sends nothing until READY returns (bounded), after which
   the dirty log (the early-boot reset marks every page whose state changed) re-sends them;
5. stop-and-copy: pause, last dirty pages, final shared-page bitmap, vCPU state (a VMSA
   transport packet for SEV-ES), PREPARE → PREPARED (destination holds a verified guest) →
   journal commit + SEND_FINISH → COMMIT → STARTED.

Before the commit every failure or cancel aborts, SEND_CANCELs and resumes the guest here;
after it the guest never runs here again.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from migd import wire
from migd.abi import PAGE_SHIFT, PAGE_SIZE, GuestPolicy
from migd.bitmap import PageBitmap
from migd.channel import GuestChannel
from migd.convergence import (
    AutoConverge,
    BandwidthMeter,
    HandoffCost,
    RateLimiter,
    expected_downtime_ms,
    page_budget_ms,
    should_switch_over,
)
from migd.errors import MigdError, ProtocolError
from migd.guest import GuestState, HostGuest
from migd.migration_state import MigrationStatus
from migd.page_runs import CHUNK_PAGES, HOLE_STEP_PAGES, PageKind, classify
from migd.progress import MigrationProgress
from migd.psp import VMSA_SIZE
from migd.send_buffers import SendRing
from migd.stream import WRITE_HIGH_WATER, FrameProtocol, StreamClosed, StreamTimeout, open_stream

log = logging.getLogger(__name__)
S = MigrationStatus
MiB = 1 << 20
#: The payload ring: what the transport may still hold (it pauses us past WRITE_HIGH_WATER,
#: and a step writes at most one chunk) plus the chunk being written.
SEND_RING_BYTES = WRITE_HIGH_WATER + 2 * CHUNK_PAGES * PAGE_SIZE


class MigrationRefused(MigdError):
    """The migration cannot start now (guest state, MSR not READY): REST 409."""


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
    handoff_timeout_s: float = 120.0  # PREPARED (destination verification) and STARTED (self-check)

    def __post_init__(self) -> None:
        if self.downtime_limit_ms <= 0:
            raise ValueError(f"downtime_limit_ms must be > 0, got {self.downtime_limit_ms}")
        if self.max_bandwidth_mib_s < 0:
            raise ValueError(f"max_bandwidth_mib_s must be >= 0, got {self.max_bandwidth_mib_s}")


#: Called once the destination holds a verified guest, before COMMIT is sent. It must be
#: synchronous and durable (the journal): once it returns, the guest belongs to the destination.
CommitHook = Callable[[MigrationProgress], None]


def pack_vmsa(state: bytes) -> bytes:
    """vCPU state in one 4 KiB VMSA page: u32 length, state, zero padding."""
    if len(state) > VMSA_SIZE - 4:
        raise MigrationFailed(f"vCPU state of {len(state)} bytes does not fit a {VMSA_SIZE}-byte VMSA")
    return len(state).to_bytes(4, "little") + state + bytes(VMSA_SIZE - 4 - len(state))


def unpack_vmsa(page: bytes) -> bytes:
    """Inverse of :func:`pack_vmsa`, checked."""
    length = int.from_bytes(page[:4], "little")
    if len(page) != VMSA_SIZE or length > VMSA_SIZE - 4:
        raise MigrationFailed(f"malformed VMSA page (length field {length})")
    return bytes(page[4 : 4 + length])


class OutgoingMigration:
    """One outgoing migration of ``guest`` to ``host:port``; ``run()`` drives it to the end."""

    def __init__(
        self,
        guest: HostGuest,
        host: str,
        port: int,
        params: MigrationParams | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        on_commit: CommitHook | None = None,
        resolve_port: int = 0,
    ) -> None:
        self.guest = guest
        self.host, self.port = host, port
        self.params = params or MigrationParams()
        self._ssl = ssl_context
        self._on_commit = on_commit
        self._resolve_port = resolve_port  # our listener: a destination in doubt asks it (RESOLVE)
        self.progress = MigrationProgress(guest.name, "source", f"{host}:{port}", guest.definition.npages)
        self._proto: FrameProtocol | None = None
        self._meter = BandwidthMeter()
        self._limiter = RateLimiter(self.params.max_bandwidth_mib_s * MiB)
        self._auto = AutoConverge(enabled=self.params.auto_converge)
        self._paused = False
        self._session_open = False
        self._cancel_requested = False
        self._task: asyncio.Task[MigrationProgress] | None = None
        self._msr_ready = asyncio.Event()
        self._pages_sent = 0
        self._running = False
        self._msr_dropped = False
        self._bytes_left = 0  # bytes that have left the transport buffer so far
        self._ping_token = 0
        self._ring: SendRing | None = None  # payload buffers, allocated at the first page frame

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
        if not self._running:
            # The task has not taken its first step: nothing to undo.
            self.progress.phase.advance(S.CANCELLED, time.monotonic(), error="cancelled by the operator")
        self._task.cancel()
        return True

    # ------------------------------------------------------------------ the run

    async def run(self) -> MigrationProgress:
        """Migrate; returns the final progress (status completed, failed or cancelled)."""
        self._running = True
        phase = self.progress.phase
        self.check_preconditions()
        self.guest.vm.on_migration_control_change = self._msr_changed
        self._msr_ready.set()
        try:
            await self._handshake()
            phase.advance(S.ACTIVE, time.monotonic())
            dirty = await self._precopy()
            await self._stop_and_copy(dirty)
        except asyncio.CancelledError:
            if phase.committed:
                raise
            await self._roll_back(S.CANCELLED, "cancelled by the operator" if self._cancel_requested else "cancelled")
            if not self._cancel_requested:
                raise
        except Exception as exc:  # every failure before the commit ends the same safe way
            if phase.committed:
                self._after_commit_failure(exc)
            else:
                peer = self._proto.peer_abort if self._proto is not None else None
                await self._roll_back(S.FAILED, f"destination aborted: {peer}" if peer else _reason(exc))
        finally:
            self.guest.vm.on_migration_control_change = None
            if self._proto is not None:
                self._proto.close()
            # The daemon keeps finished migrations (their records): not their 12 MiB of buffers.
            # Regions the transport still holds stay alive through its views until sent.
            self._ring = None
        return self.progress

    def _msr_changed(self, old: int, new: int) -> None:
        if self.guest.vm.migration_ready:
            self._msr_ready.set()
        else:
            # Remember the drop even if READY is back before the next chunk: the migration
            # must still pass through blackout (and its state changes get re-sent).
            self._msr_dropped = True
            self._msr_ready.clear()
            log.info("migration-control MSR dropped guest=%s msr=%#x: sending stops", self.guest.name, new)

    async def _handshake(self) -> None:
        p = self.params
        self._proto = proto = await open_stream(
            self.host, self.port, ssl_context=self._ssl, timeout=p.handshake_timeout_s
        )
        d = self.guest.definition
        spec = wire.GuestSpec(d.name, d.npages, d.policy, d.efi, d.uefi_live_migration)
        proto.write(wire.Hello(self.progress.id, spec, self.guest.firmware.transport_mode.value,
                               resolve_port=self._resolve_port))
        try:
            welcome: wire.Welcome = await proto.expect(wire.Welcome, p.handshake_timeout_s)
        except StreamClosed as exc:
            hint = " (mutual TLS: does the destination trust our certificate's CA?)" if self._ssl else ""
            raise MigrationFailed(f"destination closed the stream during the handshake{hint}: {exc}") from exc
        if welcome.version != wire.PROTOCOL_VERSION:
            raise MigrationFailed(f"destination speaks protocol {welcome.version}, we speak {wire.PROTOCOL_VERSION}")
        start = self.guest.firmware.send_start(self.guest.handle, welcome.pdh_cert)
        self._session_open = True
        proto.write(wire.Session(start.pdh_cert_pem, start.session_blob, start.policy))
        await proto.expect(wire.SessionAck, p.handshake_timeout_s)

    async def _precopy(self) -> PageBitmap:
        """Pre-copy rounds; returns the dirty set left for stop-and-copy."""
        channel = self._channel()
        progress, p = self.progress, self.params
        await channel.fetch_dirty()  # start the log now: round 0 covers everything before
        progress.rounds = 1
        sent = await self._send_extents(np.array([0]), np.array([self.guest.definition.npages]))
        started = time.monotonic()
        unsent: PageBitmap | None = None  # a dirty set held back by a switch-over that waited on the link
        while True:
            dirty = await channel.fetch_dirty()
            if unsent is not None:
                dirty.update(unsent)
                unsent = None
            remaining = dirty.count()
            progress.remaining_pages = remaining
            self._write(wire.RoundEnd(progress.rounds - 1, remaining))
            now = time.monotonic()
            bandwidth = self._bandwidth(now)
            # Bytes still queued behind a slow or stalled link are part of what stop-and-copy waits for.
            queued = self._stream().write_buffer_size()
            # The hand-off after the pages costs time too: the pages get what it leaves of the limit.
            fixed_ms = HandoffCost().predict_ms(self.guest.definition.npages, channel.round_trip_s("fetch_dirty"))
            progress.expected_downtime_ms = expected_downtime_ms(remaining * PAGE_SIZE + queued, bandwidth, fixed_ms)
            budget_ms = page_budget_ms(p.downtime_limit_ms, fixed_ms)
            if should_switch_over(remaining * PAGE_SIZE + queued, bandwidth, budget_ms):
                if await self._link_caught_up(started):
                    return dirty
                # The link held more than the meter saw (socket buffers, a stalled network):
                # the guest ran on meanwhile, so look at its dirty log again before pausing.
                unsent, now = dirty, time.monotonic()
                if now - started <= p.converge_timeout_s:
                    continue
            if now - started > p.converge_timeout_s:
                if p.force_switchover:
                    log.warning("forcing switchover guest=%s remaining_pages=%d", self.guest.name, remaining)
                    return dirty
                raise MigrationFailed(
                    f"did not converge within {p.converge_timeout_s:g} s: {remaining} pages still dirty, "
                    f"expected downtime {progress.expected_downtime_ms or float('inf'):.0f} ms > "
                    f"limit {p.downtime_limit_ms:g} ms (throttle {self._auto.throttle_percent} %)"
                )
            throttle = self._auto.end_of_round(sent * PAGE_SIZE, remaining * PAGE_SIZE)
            if throttle is not None:
                log.info("auto-converge guest=%s throttle=%d%%", self.guest.name, throttle)
                progress.throttle_percent = throttle
                await channel.throttle(throttle)
            progress.rounds += 1
            starts, counts = dirty.extent_arrays(True)
            sent = await self._send_extents(starts, counts)

    async def _link_caught_up(self, started: float) -> bool:
        """PING the destination; True if its PONG came within the downtime limit.

        Bytes that left our transport buffer may still sit in socket buffers or behind a
        stalled link: pausing now would turn that wait into downtime. The PONG proves that
        everything sent so far is placed; a slow one means the dirty set is stale.
        """
        p, proto = self.params, self._stream()
        self._ping_token = token = (self._ping_token + 1) & 0xFFFFFFFF
        self._write(wire.Ping(token))
        sent_at = time.monotonic()
        # A link that never catches up fails the migration like a guest that never converges.
        deadline = max(started + p.converge_timeout_s, sent_at + p.handshake_timeout_s)
        while True:
            self._check_agent()
            try:
                pong: wire.Pong = await proto.expect(wire.Pong, max(0.01, min(0.5, deadline - time.monotonic())))
                break
            except StreamTimeout:
                if time.monotonic() >= deadline:
                    raise MigrationFailed(
                        f"the destination did not confirm the pages sent within "
                        f"{time.monotonic() - sent_at:.0f} s (link stalled)"
                    ) from None
        if pong.token != token:
            raise ProtocolError(f"PONG {pong.token} answers no PING of ours (sent {token})")
        waited_ms = (time.monotonic() - sent_at) * 1000.0
        if waited_ms > p.downtime_limit_ms:
            log.info("switch-over deferred guest=%s: the destination caught up after %.0f ms",
                     self.guest.name, waited_ms)
            return False
        return True

    async def _send_extents(self, starts: np.ndarray, counts: np.ndarray) -> int:
        """Send every page of the extents, step by step; returns the pages sent.

        A step is one chunk of up to ``CHUNK_PAGES`` pages, classified and read at once, or one
        stretch of a hole of the sparse RAM file (up to ``HOLE_STEP_PAGES``), sent as zero runs
        without reading it: a 16 GiB guest with 256 MiB populated costs ~130 steps of holes
        instead of 65536 chunks scanned (and, on tmpfs, allocated by the scan).
        """
        total = 0
        guest, proto = self.guest, self._stream()
        todo = int(counts.sum()) if len(counts) else 0
        # Under a bandwidth limit every page of a step is charged before it, zero pages included
        # (as before holes were skipped), and holes go in chunk-sized steps, so no single wait
        # keeps the MSR gate from being looked at.
        max_hole = HOLE_STEP_PAGES if self._limiter.unlimited else CHUNK_PAGES
        for start, count in zip(starts.tolist(), counts.tolist(), strict=True):
            pos, end = start, start + count
            while pos < end:
                await proto.drain()
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
                pos += step
                total += step
                todo -= step
                self.progress.remaining_pages = todo
                self._pages_sent += step
        return total

    def _step_span(self, pos: int, end: int, max_hole: int) -> int:
        """How many pages the step at ``pos`` will cover, as things stand now (the limiter's charge)."""
        data = self.guest.ram.next_populated(pos << PAGE_SHIFT, end - pos) >> PAGE_SHIFT
        return min(data - pos, max_hole) if data > pos else min(CHUNK_PAGES, end - pos)

    def _send_step(self, pos: int, end: int, max_hole: int = HOLE_STEP_PAGES) -> int:
        """Send the pages from ``pos`` (one chunk, or up to ``max_hole`` pages of a hole); returns how many."""
        guest = self.guest
        data = guest.ram.next_populated(pos << PAGE_SHIFT, end - pos) >> PAGE_SHIFT
        if data > pos:
            # Never written (or punched): zero pages, known without reading a byte of them.
            count = min(data - pos, max_hole)
            for first in range(pos, pos + count, wire.MAX_RUN_PAGES):
                self._send_run(PageKind.ZERO, first, min(wire.MAX_RUN_PAGES, pos + count - first))
            return count
        count = min(CHUNK_PAGES, end - pos)
        for run in classify(guest.vm.shared_bitmap, guest.ram, pos, count):
            self._send_run(run.kind, run.first, run.count)
        return count

    def _send_run(self, kind: PageKind, first: int, count: int) -> None:
        gpa = first << PAGE_SHIFT
        if kind is PageKind.ZERO:
            self.progress.count_run(kind, count, self._write(wire.ZeroPages(gpa, count)))
            return
        guest, proto = self.guest, self._stream()
        if self._ring is None:
            self._ring = SendRing(SEND_RING_BYTES)
        # The payload goes into a ring region the transport no longer needs (None: the ring is
        # full behind a slow link, and a new buffer is allocated as before).
        out = self._ring.take(count * PAGE_SIZE, proto.bytes_consumed())
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
            else:
                header, ciphertext = guest.firmware.send_update_data(guest.handle, guest.ram, gpa, count, out)
                msg = wire.PrivatePages(gpa, count, header, ciphertext)
            nbytes = self._write(msg)
        except BaseException:
            self._ring.release()
            raise
        if out is not None:
            self._ring.placed(proto.bytes_sent)
        self.progress.count_run(kind, count, nbytes)

    def _write(self, msg: wire.Message) -> int:
        proto = self._stream()
        nbytes = proto.write(msg)
        # Measure what left for the peer, not what was queued: bytes still in the transport's
        # buffer (a stalled link) must not look like bandwidth.
        left = proto.bytes_consumed()
        now = time.monotonic()
        self._meter.record(now, max(0, left - self._bytes_left))
        self._bytes_left = max(self._bytes_left, left)
        self.progress.throughput_bps = self._meter.rate(now)
        return nbytes

    def _bandwidth(self, now: float) -> float:
        rate = self._meter.rate(now)
        if rate > 0:
            return rate
        elapsed = now - self.progress.phase.started_at
        return self._meter.total_bytes / elapsed if elapsed > 0 else 0.0

    async def _blackout(self) -> None:
        """Wait, sending nothing, until the guest's MSR is READY again (bounded)."""
        phase = self.progress.phase
        self._msr_dropped = False
        phase.advance(S.BLACKOUT, time.monotonic())
        log.info("blackout guest=%s: waiting up to %gs for READY", self.guest.name, self.params.blackout_timeout_s)
        try:
            async with asyncio.timeout(self.params.blackout_timeout_s):
                while not self.guest.vm.migration_ready:
                    self._check_agent()
                    self._msr_ready.clear()
                    try:
                        await asyncio.wait_for(self._msr_ready.wait(), 0.5)
                    except TimeoutError:
                        continue
        except TimeoutError:
            raise MigrationFailed(
                f"guest {self.guest.name} did not re-enable migration (MSR READY) within "
                f"{self.params.blackout_timeout_s:g} s after it dropped"
            ) from None
        phase.advance(S.ACTIVE, time.monotonic())
        log.info("blackout over guest=%s: state changes will be re-sent", self.guest.name)

    async def _stop_and_copy(self, dirty: PageBitmap) -> None:
        guest, channel, proto, p = self.guest, self._channel(), self._stream(), self.params
        phase, progress = self.progress.phase, self.progress
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
            await self._send_extents(*dirty.extent_arrays(True))
            dirty = await channel.fetch_dirty()
        # Where the downtime goes: one log line at the end (bench/downtime.py reads it).
        marks: list[tuple[str, float]] = [("paused", paused_at)]
        decision_pages = progress.remaining_pages  # the dirty set the switch-over was decided on
        decision_bandwidth = progress.throughput_bps  # the meter's rate at the decision (bytes/s)
        fixed_ms = HandoffCost().predict_ms(guest.definition.npages, channel.round_trip_s("fetch_dirty"))
        phase.advance(S.STOP_COPY, paused_at)
        guest.state = GuestState.PAUSED
        dirty.update(await channel.fetch_dirty())
        marks.append(("fetched", time.monotonic()))
        # The paused agent exports its vCPU state while the last pages go out: its round trip
        # is off the critical path. On any failure the task is dropped (its answer is stale).
        export = asyncio.ensure_future(channel.export_state())
        try:
            progress.rounds += 1
            final_pages = dirty.count()
            await self._send_extents(*dirty.extent_arrays(True))
            self._write(wire.RoundEnd(progress.rounds - 1, 0))
            marks.append(("pages_queued", time.monotonic()))
            final_bitmap = guest.vm.shared_bitmap.copy()
            progress.shared_bitmap_sha256 = hashlib.sha256(final_bitmap.to_bytes()).hexdigest()
            self._write(wire.SharedBitmap(final_bitmap.encode()))
            marks.append(("bitmap_queued", time.monotonic()))
            state = await export
        except BaseException:
            export.cancel()
            export.add_done_callback(_retrieve)
            raise
        marks.append(("state_exported", time.monotonic()))
        if guest.definition.policy & GuestPolicy.ES:
            header, ciphertext = guest.firmware.send_update_vmsa(guest.handle, 0, pack_vmsa(state))
            self._write(wire.VcpuState(0, header, ciphertext))
        else:
            self._write(wire.VcpuState(0, None, state))
        self._write(wire.Prepare(self._pages_sent))
        marks.append(("prepare_queued", time.monotonic()))
        await proto.expect(wire.Prepared, p.handoff_timeout_s)
        marks.append(("prepared", time.monotonic()))
        # The commit point: the journal's record, durable, then COMMIT. From here the guest is the
        # destination's, and SEND_FINISH (the firmware forgets the outgoing session, a durable file
        # removal) runs while COMMIT is on its way: after a crash the journal's record decides, not
        # the firmware's leftover context (migd/recovery.py), so it need not delay the hand-off.
        if self._on_commit is not None:
            self._on_commit(progress)
        phase.commit()
        self._write(wire.Commit())
        marks.append(("commit_sent", time.monotonic()))
        try:
            guest.firmware.send_finish(guest.handle)
        except MigdError as exc:  # the guest is the destination's either way: never resume it here
            log.error("SEND_FINISH failed after the commit guest=%s: %s", guest.name, exc)
        try:
            await proto.expect(wire.Started, p.handoff_timeout_s)
        except (MigdError, TimeoutError) as exc:
            self._after_commit_failure(exc)
            return
        started_at = time.monotonic()
        marks.append(("started", started_at))
        progress.downtime_ms = (started_at - paused_at) * 1000.0
        progress.remaining_pages = 0
        guest.state = GuestState.MIGRATED  # before "completed" is visible to any poller
        phase.advance(S.COMPLETED, time.monotonic())
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
            guest.name, progress.rounds, progress.downtime_ms, phase.total_time_ms(time.monotonic()),
        )

    def _after_commit_failure(self, exc: BaseException) -> None:
        # The destination owns the guest now; never resume here. Keep the RAM until an
        # operator confirms the destination runs it (nothing is lost either way).
        reason = f"committed, but the destination did not confirm the start: {_reason(exc)}"
        log.error("migration guest=%s: %s; the guest stays paused here", self.guest.name, reason)
        self.progress.phase.error = reason
        self.guest.state = GuestState.MIGRATED
        if not self.progress.status.finished:
            self.progress.phase.advance(S.COMPLETED, time.monotonic())

    async def _roll_back(self, status: MigrationStatus, reason: str) -> None:
        """Before the commit: tell the peer, cancel the session, resume the guest untouched."""
        log.warning("migration guest=%s %s: %s", self.guest.name, status.value, reason)
        if self._proto is not None and self._proto.close_reason is None:
            try:
                self._proto.write(wire.Abort(reason))
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
        self.progress.phase.advance(status, time.monotonic(), error=reason)

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


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, MigdError) else text
