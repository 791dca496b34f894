"""Migrations through the fault proxy: a broken, stalled, corrupted or tampered migration stream.

Source and destination engines run in this process (in-process hosts, real guest agents as
child processes); every byte of the migration stream goes through :mod:`faultproxy`. Each
case first asserts that the proxy really injected its fault (the negative control), then
what the engines made of it. Three groups:

* **accidents** (a bad link: cuts, stalls, flipped bits, lost/duplicated/reordered frames,
  every frame keeping the CRC32 trailer its sender wrote): each ends in ``failed`` before the
  commit, the source guest running and passing its full self-check, nothing left on the
  destination (docs/design.md §8 "Invariants", 4 and 5);
* an **attacker** on a plain-TCP path (``reseal=True``: the proxy recomputes the unkeyed
  CRC32): the ``bound`` transport still refuses every dropped, duplicated, replayed, swapped
  or moved private page; ``sev-compat`` (the firmware's MAC binds no GPA and no sequence)
  lets them in and the destination guest's self-check finds the damage, the documented
  weakness (docs/design.md §5 "SEV firmware transport"); shared pages and the handshake are
  plaintext, so without TLS such an attacker changes them at will (shown, and why ``[tls]``
  exists);
* **mutual TLS**: the same faults on TLS records fail the stream.

Cases that found engine defects say so in their docstrings; the defects are fixed and the
cases assert the invariants outright (no ``xfail``).
"""

from __future__ import annotations

import asyncio
import functools
import shutil
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import uvloop

from faultproxy import (
    Cut,
    CutBeforeFrame,
    Direction,
    DropFrame,
    DuplicateFrame,
    Fault,
    FaultProxy,
    FaultRecord,
    FlipBit,
    FlipFrameBit,
    FrameSelector,
    Framing,
    Region,
    ReplayFrame,
    RollbackFrame,
    Stall,
    StallBeforeFrame,
    SwapFrames,
)
from migd import dest as dest_module
from migd import wire
from migd.guest.channel import CheckReport
from migd.guest.host_guest import GuestState, HostGuest
from migd.host import Host
from migd.listener import MigrationListener
from migd.migration_state import MigrationStatus
from migd.platform.pki_verify import tls_client_context, tls_server_context
from migd.progress import MigrationProgress
from migd.sev_transport import TransportMode
from migd.source import MigrationParams, OutgoingMigration
from migd.wire import FrameType
from migd.guest.workload import WorkloadConfig

from .hosts import closing, make_host, running_guest

S = MigrationStatus
F = FrameType
UP, DOWN = Direction.UPSTREAM, Direction.DOWNSTREAM
BOUND, COMPAT = TransportMode.BOUND, TransportMode.SEV_COMPAT
pytestmark = pytest.mark.timeout(120)

MEMORY_MIB = 16
#: Writes and conversions while migrating, so later rounds re-send pages of both kinds.
WORKLOAD = WorkloadConfig(dirty_rate_mib_s=8, convert_rate_hz=20, seed=11)
#: Cases aimed at a *re-sent* shared run: more conversions before and during the migration, so
#: later rounds always carry shared runs (about a dozen; with WORKLOAD occasionally none).
SHARED_HEAVY = WorkloadConfig(dirty_rate_mib_s=8, convert_rate_hz=100, seed=11)
#: WORKLOAD's conversions with a sixteenth of its writes, for cases behind a 3-4 MiB/s link that
#: are not about convergence: WORKLOAD's writes outrun such a link, and auto-converge's climb to
#: a 80-90 % throttle took 20-30 s of each; this guest's dirty set fits within a few rounds.
LIGHT = WorkloadConfig(dirty_rate_mib_s=0.5, convert_rate_hz=20, seed=11)
#: Short engine timeouts, so a lost control frame ends a case in seconds, not minutes.
PARAMS = MigrationParams(handshake_timeout_s=3.0, handoff_timeout_s=5.0, stop_copy_margin_s=3.0)
DEST_TIMEOUTS = {"handshake_timeout_s": 3.0, "idle_timeout_s": 10.0, "start_timeout_s": 10.0}
#: Selectors: page frames re-sent after round 0 carry newer content than the first copy.
LATER = F.ROUND_END


@dataclass
class Outcome:
    """Everything a case asserts on, gathered while the hosts were alive."""

    progress: MigrationProgress  # the source's record
    incoming: list[MigrationProgress]  # the destination's records
    records: list[FaultRecord]
    source_state: GuestState
    source_check: CheckReport | None  # self-check of the source guest when it stayed there
    arrival: CheckReport | None  # the destination guest's arrival self-check when it moved
    dest_guests: dict[str, GuestState]
    dest_dirs: list[str]

    @property
    def status(self) -> MigrationStatus:
        return self.progress.status

    @property
    def dest_error(self) -> str:
        return " | ".join(m.phase.error or "" for m in self.incoming)

    def fired(self, action: str) -> list[FaultRecord]:
        return [r for r in self.records if r.action == action]

    def assert_rolled_back(self) -> None:
        """Invariants 4 and 5 for a migration that failed before its commit."""
        assert self.status is S.FAILED, (self.status, self.progress.phase.error)
        assert not self.progress.phase.committed
        assert self.source_state is GuestState.RUNNING
        assert self.source_check is not None and self.source_check.errors == 0, self.source_check
        assert self.source_check.pages_verified == MEMORY_MIB * 256
        assert self.dest_guests == {} and self.dest_dirs == [], (self.dest_guests, self.dest_dirs)
        assert all(m.status in (S.FAILED,) for m in self.incoming), [m.status for m in self.incoming]

    def assert_moved_intact(self) -> None:
        """Invariant 1 (and 4) for a completed migration."""
        assert self.status is S.COMPLETED, self.progress.phase.error
        assert self.source_state is GuestState.MIGRATED
        assert self.dest_guests == {"g1": GuestState.RUNNING}
        assert self.arrival is not None and self.arrival.errors == 0, self.arrival
        assert self.arrival.pages_verified == MEMORY_MIB * 256
        (incoming,) = self.incoming
        assert incoming.shared_bitmap_sha256 == self.progress.shared_bitmap_sha256

    def corrupted_on_arrival(self) -> bool:
        """The migration committed and the guest found bad pages: corruption nobody stopped."""
        return self.status is S.COMPLETED and self.arrival is not None and self.arrival.errors > 0

    def broken_after_commit(self) -> bool:
        """Committed, and the destination guest either found bad pages or could not even start
        (e.g. its kernel header page was overwritten): damage that got past the commit."""
        started = self.dest_guests.get("g1") is GuestState.RUNNING
        return self.status is S.COMPLETED and (self.corrupted_on_arrival() or not started)


def _tls_contexts(root: Path) -> tuple[Any, Any]:
    server = tls_server_context(root / "ca" / "ca.pem", root / "hostB" / "host.pem", root / "hostB" / "host.key")
    client = tls_client_context(root / "ca" / "ca.pem", root / "hostA" / "host.pem", root / "hostA" / "host.key")
    return server, client


async def _dest_settled(b: Host, timeout: float = 15.0) -> None:
    """The destination has finished with every incoming migration (bounded wait)."""
    async with asyncio.timeout(timeout):
        while any(not m.status.finished for m in b.migrations.values()) or any(
            g.state is GuestState.INCOMING and not any(m.phase.committed for m in b.migrations.values())
            for g in b.guests.values()
        ):
            await asyncio.sleep(0.02)


#: Runs beside the migration (e.g. a guest kexec, then a fault at that moment).
During = Callable[[OutgoingMigration, HostGuest, FaultProxy], Awaitable[None]]


def migrate_through(
    tmp_path: Path,
    faults: Sequence[Fault],
    *,
    mode: TransportMode = BOUND,
    tls: bool = False,
    params: MigrationParams = PARAMS,
    settle: float = 0.4,
    monkeypatch: pytest.MonkeyPatch | None = None,
    dest_timeouts: dict[str, float] | None = None,
    reseal: bool = False,
    workload: WorkloadConfig = WORKLOAD,
    use_uvloop: bool = False,
    during: During | None = None,
) -> Outcome:
    """One migration of a 16 MiB guest under write/convert load through a FaultProxy
    (``reseal``: the proxy is an attacker who recomputes the frames' CRC32)."""
    if monkeypatch is not None:
        # The listener builds IncomingMigration with its default (minutes-long) timeouts.
        monkeypatch.setattr(dest_module, "IncomingMigration",
                            functools.partial(dest_module.IncomingMigration, **(dest_timeouts or DEST_TIMEOUTS)))

    async def main() -> Outcome:
        a, b = make_host(tmp_path, "hostA", mode), make_host(tmp_path, "hostB", mode)
        server_ctx, client_ctx = _tls_contexts(tmp_path) if tls else (None, None)
        # Wired as the daemon wires them: the source's own listener answers a destination in
        # doubt (RESOLVE, not through the proxy), from the migrations registered on its host.
        handshake_s = (dest_timeouts or DEST_TIMEOUTS)["handshake_timeout_s"]
        listener = MigrationListener(b, ssl_context=server_ctx, client_ssl=client_ctx, handshake_timeout_s=handshake_s)
        source_listener = MigrationListener(a, ssl_context=server_ctx, client_ssl=client_ctx,
                                            handshake_timeout_s=handshake_s)
        port = await listener.start("127.0.0.1", 0)
        resolve_port = await source_listener.start("127.0.0.1", 0)
        framing = Framing.TLS if tls else Framing.MIGD
        try:
            async with closing(a, b), FaultProxy("127.0.0.1", port, faults, framing=framing,
                                                     reseal=reseal) as proxy:
                guest = await running_guest(a, memory_mib=MEMORY_MIB, workload=workload)
                # let the workload write and convert pages
                await asyncio.sleep(settle if workload is WORKLOAD else max(settle, 1.0))
                migration = OutgoingMigration(guest, "localhost" if tls else "127.0.0.1", proxy.port, params,
                                              ssl_context=client_ctx, resolve_port=resolve_port,
                                              on_established=lambda p, key: a.remember_handoff_key(p.id, key))
                a.add_migration(migration.progress)
                run = asyncio.ensure_future(migration.run())
                side = asyncio.ensure_future(during(migration, guest, proxy)) if during is not None else None
                progress = await asyncio.wait_for(run, 90)
                if side is not None:
                    await asyncio.wait_for(side, 30)  # its failures are the test's
                await _dest_settled(b)
                source_check = arrival = None
                if guest.state is GuestState.RUNNING:
                    source_check = await guest.check()
                if "g1" in b.guests and b.guests["g1"].state is GuestState.RUNNING:
                    arrival = await b.get("g1").wait_check(60)
                return Outcome(
                    progress=progress,
                    incoming=list(b.migrations.values()),
                    records=list(proxy.fired()),
                    source_state=guest.state,
                    source_check=source_check,
                    arrival=arrival,
                    dest_guests={name: g.state for name, g in b.guests.items()},
                    dest_dirs=sorted(p.name for p in (tmp_path / "hostB" / "guests").iterdir()),
                )
        finally:
            await listener.close()
            await source_listener.close()
            for host in (a, b):  # make_host's short socket directory under /tmp
                shutil.rmtree(host.runtime_dir, ignore_errors=True)

    return uvloop.run(main()) if use_uvloop else asyncio.run(main())


def page_sel(*types: int, index: int = 0, later: bool = False) -> FrameSelector:
    return FrameSelector.of(*types, index=index, after_type=LATER if later else None)


def workload_for(select: FrameSelector | None) -> WorkloadConfig:
    """SHARED_HEAVY when the selector aims at a shared run re-sent after round 0."""
    if select is not None and select.after_type is not None and select.types == {F.SHARED_PAGES}:
        return SHARED_HEAVY
    return WORKLOAD


def dest_saw(outcome: Outcome, *needles: str) -> bool:
    """The destination's failure reason mentions one of ``needles``."""
    return any(needle in outcome.dest_error for needle in needles)


def one_copy_on_the_destination(outcome: Outcome) -> None:
    """The source committed and lost the hand-off's end: the guest must run there, once, intact."""
    assert outcome.progress.phase.committed and outcome.status is S.COMPLETED, outcome.progress.phase.error
    assert outcome.source_state is GuestState.MIGRATED  # never resumed on its own after the commit
    assert outcome.dest_guests == {"g1": GuestState.RUNNING}, (outcome.dest_guests, outcome.dest_error)
    assert outcome.arrival is not None and outcome.arrival.errors == 0, outcome.arrival
    (incoming,) = outcome.incoming
    assert incoming.status is S.COMPLETED and incoming.phase.committed


# ---------------------------------------------------------------------- control


@pytest.mark.fault_class("control: proxy without faults")
def test_the_proxy_alone_changes_nothing(tmp_path: Path) -> None:
    """Control: the same migration through a proxy without faults completes intact."""
    outcome = migrate_through(tmp_path, [])
    assert outcome.records == []
    outcome.assert_moved_intact()


@pytest.mark.fault_class("control: proxy without faults")
def test_a_resealing_proxy_alone_changes_nothing(tmp_path: Path) -> None:
    """Control for the attacker group: renumbering and re-checksumming untouched frames is invisible."""
    outcome = migrate_through(tmp_path, [], reseal=True)
    assert outcome.records == []
    outcome.assert_moved_intact()


# ====================================================================== accidents
# ---------------------------------------------------------------------- connection cut


@pytest.mark.fault_class("connection cut")
@pytest.mark.parametrize(
    ("fault", "phase"),
    [
        (Cut(30), S.SETUP),  # in the middle of HELLO
        (Cut(200, DOWN), S.SETUP),  # in the middle of WELCOME
        (Cut(2 << 20), S.ACTIVE),  # round 0, in the middle of a page frame
        (CutBeforeFrame(FrameSelector.of(F.ROUND_END)), S.ACTIVE),  # between rounds
        (CutBeforeFrame(FrameSelector.of(F.SHARED_BITMAP)), S.STOP_COPY),  # guest paused, last pages sent
        (CutBeforeFrame(FrameSelector.of(F.PREPARED), DOWN), S.STOP_COPY),  # destination verified, uncommitted
    ],
    ids=["hello", "welcome", "pages", "round-end", "stop-copy", "before-prepared"],
)
def test_connection_cut(tmp_path: Path, fault: Cut | CutBeforeFrame, phase: MigrationStatus) -> None:
    outcome = migrate_through(tmp_path, [fault])
    (cut,) = outcome.fired("cut")
    assert cut.direction is fault.direction
    if isinstance(fault, Cut):
        assert cut.offset == fault.after
    assert phase in outcome.progress.phase.entered_at
    outcome.assert_rolled_back()
    assert outcome.incoming == [] or dest_saw(outcome, "closed the migration stream", "stream lost")


@pytest.mark.fault_class("connection cut")
def test_connection_cut_after_commit_keeps_exactly_one_copy(tmp_path: Path) -> None:
    """Cut before STARTED: the source has committed and never resumes; the destination runs the guest."""
    outcome = migrate_through(tmp_path, [CutBeforeFrame(FrameSelector.of(F.STARTED), DOWN)])
    assert outcome.fired("cut")
    assert outcome.progress.phase.committed and outcome.status is S.COMPLETED
    assert "did not confirm the start" in (outcome.progress.phase.error or "")
    assert outcome.source_state is GuestState.MIGRATED
    assert outcome.dest_guests == {"g1": GuestState.RUNNING}
    assert outcome.arrival is not None and outcome.arrival.errors == 0


@pytest.mark.fault_class("connection cut")
def test_connection_cut_before_commit_arrives(tmp_path: Path) -> None:
    """The source has committed (journal + SEND_FINISH), the COMMIT frame never arrives: the
    destination, in doubt, asks the source's listener (RESOLVE), learns it committed and starts
    the guest. Exactly one copy runs, on the destination, intact (invariant 4)."""
    outcome = migrate_through(tmp_path, [CutBeforeFrame(FrameSelector.of(F.COMMIT))])
    assert outcome.fired("cut")
    one_copy_on_the_destination(outcome)


@pytest.mark.fault_class("drop / duplicate / replay / swap")
def test_lost_commit_is_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """COMMIT dropped on a live connection: the source gives up waiting for STARTED and closes;
    the destination resolves it the same way."""
    outcome = migrate_through(tmp_path, [DropFrame(FrameSelector.of(F.COMMIT))], monkeypatch=monkeypatch,
                              params=MigrationParams(handshake_timeout_s=3, handoff_timeout_s=2))
    assert outcome.fired("drop")
    one_copy_on_the_destination(outcome)


@pytest.mark.fault_class("drop / duplicate / replay / swap")
def test_lost_started_after_commit_keeps_exactly_one_copy(tmp_path: Path) -> None:
    """After the commit the source never resumes: the destination runs the guest, the source keeps it paused."""
    outcome = migrate_through(tmp_path, [DropFrame(FrameSelector.of(F.STARTED), DOWN)],
                              params=MigrationParams(handshake_timeout_s=3, handoff_timeout_s=2))
    assert outcome.fired("drop")
    assert outcome.progress.phase.committed and outcome.status is S.COMPLETED
    assert "did not confirm the start" in (outcome.progress.phase.error or "")
    assert outcome.source_state is GuestState.MIGRATED
    assert outcome.dest_guests == {"g1": GuestState.RUNNING}
    assert outcome.arrival is not None and outcome.arrival.errors == 0


# ---------------------------------------------------------------------- stall


@pytest.mark.fault_class("stall / slow link")
def test_stall_past_the_handshake_timeout(tmp_path: Path) -> None:
    outcome = migrate_through(tmp_path, [Stall(0, 5.0)], params=MigrationParams(handshake_timeout_s=1.0))
    (stall,) = outcome.fired("stall")
    assert stall.offset == 0
    assert "did not complete the handshake within 1 s (await-welcome)" in (outcome.progress.phase.error or "")
    outcome.assert_rolled_back()


@pytest.mark.fault_class("stall / slow link")
def test_stall_of_the_return_path_past_the_handshake_timeout(tmp_path: Path) -> None:
    outcome = migrate_through(tmp_path, [Stall(0, 5.0, DOWN)], params=MigrationParams(handshake_timeout_s=1.0))
    assert outcome.fired("stall")
    assert "did not complete the handshake within 1 s (await-welcome)" in (outcome.progress.phase.error or "")
    outcome.assert_rolled_back()


@pytest.mark.fault_class("stall / slow link")
def test_short_stall_while_active(tmp_path: Path) -> None:
    """A transient stall (3 s) of the page stream: the migration completes intact, and the
    stall does not become downtime. The source PINGs the destination before it pauses the
    guest: its data may still sit in socket buffers behind the stall (the bandwidth meter
    sees bytes leave the process, not arrive), and a slow PONG sends it round again."""
    outcome = migrate_through(tmp_path, [Stall(2 << 20, 3.0)])
    assert outcome.fired("stall")
    outcome.assert_moved_intact()
    assert (outcome.progress.downtime_ms or 0.0) < 3 * PARAMS.downtime_limit_ms


@pytest.mark.fault_class("stall / slow link")
def test_short_stall_becomes_downtime_without_the_ping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control for the test above: a source that trusts its bandwidth meter and pauses
    without the PING turns the same stall into seconds of downtime."""

    async def trust_the_meter(self: OutgoingMigration, started: float) -> bool:
        return True

    monkeypatch.setattr(OutgoingMigration, "_link_caught_up", trust_the_meter)
    outcome = migrate_through(tmp_path, [Stall(2 << 20, 3.0)])
    assert outcome.fired("stall")
    outcome.assert_moved_intact()
    assert (outcome.progress.downtime_ms or 0.0) > 2000


@pytest.mark.fault_class("stall / slow link")
@pytest.mark.parametrize(
    ("select", "direction"),
    [
        (FrameSelector.of(F.SHARED_BITMAP), UP),  # stop-copy: guest paused, last pages sent
        (FrameSelector.of(F.PREPARED), DOWN),  # hand-off: the destination's PREPARED held
        (FrameSelector.of(F.COMMIT), UP),  # hand-off: committed, COMMIT held
    ],
    ids=["stop-copy", "before-prepared", "before-commit"],
)
def test_stall_while_the_guest_is_paused(tmp_path: Path, select: FrameSelector, direction: Direction) -> None:
    """A 2 s stall after the pause: nothing before the switch-over can hide it, so it is
    downtime (as in QEMU), and the migration completes intact within the hand-off timeouts."""
    outcome = migrate_through(tmp_path, [StallBeforeFrame(select, 2.0, direction)])
    (stall,) = outcome.fired("stall")
    assert stall.frame is not None and select.types is not None and stall.frame.type in select.types
    outcome.assert_moved_intact()
    assert (outcome.progress.downtime_ms or 0.0) >= 2000  # the stall fell inside the pause


#: How long the destination below stops reading. Both cases last about this long (the bounded
#: one too: its ABORT waits behind the stall at the proxy), so it is only as long as a clear
#: margin over the bounded case's 1 s deadline needs.
READER_STALL_S = 4.0


@pytest.mark.fault_class("stall / slow link")
@pytest.mark.parametrize("stall_timeout_s", [1.0, 30.0], ids=["bounded", "control-longer-than-the-stall"])
def test_a_destination_that_stops_reading_ends_the_migration_in_bounded_time(tmp_path: Path,
                                                                             stall_timeout_s: float) -> None:
    """The destination takes nothing for 4 s in the middle of round 0 (its socket buffers fill,
    the source's drain waits). Past ``stall_timeout_s`` without a byte leaving, the source gives
    up and resumes the guest, instead of staying ``active`` for as long as the peer likes. The
    control, a stall shorter than the timeout, completes: the deadline is what ended the first."""
    params = MigrationParams(handshake_timeout_s=3.0, handoff_timeout_s=5.0, stall_timeout_s=stall_timeout_s)
    outcome = migrate_through(tmp_path, [Stall(2 << 20, READER_STALL_S)], params=params)
    assert outcome.fired("stall")
    if stall_timeout_s < READER_STALL_S:
        outcome.assert_rolled_back()
        assert f"took nothing for {stall_timeout_s:g} s" in (outcome.progress.phase.error or "")
        # Not held for the stall's length.
        assert outcome.progress.phase.total_time_ms(0.0) < READER_STALL_S * 1000
    else:
        outcome.assert_moved_intact()


@pytest.mark.fault_class("stall / slow link")
def test_a_link_that_never_catches_up_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every PONG comes later than the downtime limit (a round trip longer than the limit): the
    source gives up at ``converge_timeout_s`` and rolls back, rather than PINGing forever."""

    async def always_late(self: OutgoingMigration, started: float) -> bool:
        return False

    monkeypatch.setattr(OutgoingMigration, "_link_caught_up", always_late)
    params = MigrationParams(handshake_timeout_s=3.0, handoff_timeout_s=5.0, converge_timeout_s=2.0)
    outcome = migrate_through(tmp_path, [], params=params)
    outcome.assert_rolled_back()
    assert "did not converge within 2 s" in (outcome.progress.phase.error or "")


#: Round 0 of 16 MiB takes ~4 s: the guest kexecs in the middle of it.
SLOW = MigrationParams(handshake_timeout_s=3.0, handoff_timeout_s=5.0, max_bandwidth_mib_s=4.0, blackout_timeout_s=20.0)


async def _until(migration: OutgoingMigration, status: MigrationStatus, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while migration.progress.status is not status:
            await asyncio.sleep(0.01)


def kexec_in_blackout(fault: Callable[[FaultProxy], None]) -> During:
    """The guest kexecs mid-migration and is held in its kexec window (MSR 0: the source is in
    ``blackout``, sending nothing); ``fault`` strikes then, and the guest finishes booting."""

    async def during(migration: OutgoingMigration, guest: HostGuest, proxy: FaultProxy) -> None:
        await _until(migration, S.ACTIVE)
        channel = guest.channel
        assert channel is not None
        windows = channel.event_count("kexec-window")
        await channel.kexec(hold_in_window=True)
        await channel.wait_event("kexec-window", 20, since=windows)
        await _until(migration, S.BLACKOUT)
        fault(proxy)
        await asyncio.sleep(0.5)
        await channel.resume()  # let the new kernel finish its early boot

    return during


@pytest.mark.fault_class("connection cut")
def test_connection_cut_in_blackout(tmp_path: Path) -> None:
    """Cut while the source waits out a guest kexec: it notices when it may send again and rolls
    back; the guest finishes its kexec on the source, intact."""
    outcome = migrate_through(tmp_path, [], params=SLOW, during=kexec_in_blackout(FaultProxy.cut_now))
    assert outcome.fired("cut")
    assert S.BLACKOUT in outcome.progress.phase.entered_at
    outcome.assert_rolled_back()


@pytest.mark.fault_class("stall / slow link")
def test_stall_in_blackout(tmp_path: Path) -> None:
    """A 3 s stall while the source waits out a guest kexec: the migration completes intact, and
    the stall does not become downtime (the PING before the switch-over)."""
    outcome = migrate_through(tmp_path, [], params=SLOW, workload=LIGHT,
                              during=kexec_in_blackout(lambda proxy: proxy.stall_now(3.0)))
    assert outcome.fired("stall")
    assert S.BLACKOUT in outcome.progress.phase.entered_at
    outcome.assert_moved_intact()
    assert (outcome.progress.downtime_ms or 0.0) < 3 * SLOW.downtime_limit_ms


@pytest.mark.fault_class("stall / slow link")
def test_guest_writes_shared_pages_behind_a_slow_link_under_uvloop(tmp_path: Path) -> None:
    """No corruption at all: the daemon's loop (uvloop) queues page payloads zero-copy when the
    link is slow (a 1 s stall), while the guest keeps writing its shared pages.

    Was a defect: ``FrameEncoder`` computed a shared run's CRC32 over a *view of guest RAM* when
    the frame was queued; uvloop sent the view's bytes later, after the guest changed them, and
    the destination failed the stream ("frame N (SHARED_PAGES) failed its CRC32 check"). The
    source now copies a shared run before it is checksummed and queued."""
    heavy = WorkloadConfig(dirty_rate_mib_s=16, convert_rate_hz=100, seed=3)
    outcome = migrate_through(tmp_path, [Stall(1 << 20, 1.0)], workload=heavy, settle=1.0, use_uvloop=True)
    assert outcome.fired("stall")
    outcome.assert_moved_intact()


@pytest.mark.fault_class("stall / slow link")
def test_stall_past_the_destination_idle_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page stream stops for longer than the destination waits: it gives up, the source rolls back."""
    timeouts = {**DEST_TIMEOUTS, "idle_timeout_s": 1.0}
    outcome = migrate_through(tmp_path, [Stall(2 << 20, 6.0)], monkeypatch=monkeypatch, dest_timeouts=timeouts)
    assert outcome.fired("stall")
    outcome.assert_rolled_back()
    assert dest_saw(outcome, "no data from the source")


@pytest.mark.fault_class("stall / slow link")
def test_destination_idle_timeout_while_pages_flow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No fault at all: a bandwidth-limited round 0 lasts longer than the destination's idle timeout.

    Was a defect: the destination's ``idle_timeout_s`` bounded the time between *control* frames
    (ROUND_END), not silence on the stream, so a long round (a big guest, a
    ``max_bandwidth_mib_s`` limit) was killed while pages kept arriving. It now counts from the
    last bytes received (``FrameProtocol.last_activity``)."""
    timeouts = {**DEST_TIMEOUTS, "idle_timeout_s": 1.0}
    # Round 0 (16 MiB at 3 MiB/s) lasts ~5 s, five idle timeouts without a control frame.
    params = MigrationParams(handshake_timeout_s=3.0, handoff_timeout_s=5.0, max_bandwidth_mib_s=3.0)
    outcome = migrate_through(tmp_path, [], params=params, monkeypatch=monkeypatch, dest_timeouts=timeouts,
                              workload=LIGHT)
    assert outcome.records == []
    outcome.assert_moved_intact()


# ---------------------------------------------------------------------- bit flips (a bad link)


@pytest.mark.fault_class("bit flip")
@pytest.mark.parametrize(
    ("select", "region", "offset"),
    [
        (page_sel(F.SHARED_PAGES, index=2), Region.PAYLOAD, 4095),  # plaintext: no MAC covers it
        (page_sel(F.SHARED_PAGES, later=True), Region.META, 4),  # a re-sent shared run's gpa/n
        (page_sel(F.PRIVATE_PAGES, index=5), Region.PAYLOAD, 1000),  # transport ciphertext
        (page_sel(F.PRIVATE_PAGES, index=3), Region.META, -40),  # the SEV packet header (IV/MAC)
        (page_sel(F.PRIVATE_PAGES, index=5), Region.PREFIX, 0),  # length field, high byte
        (page_sel(F.PRIVATE_PAGES, index=5), Region.PREFIX, 4),  # frame type
        (page_sel(F.PRIVATE_PAGES, index=5), Region.PREFIX, 5),  # meta_len, high byte
        (page_sel(F.ZERO_PAGES, index=3), Region.META, 2),  # a zero run's address
        (page_sel(F.PRIVATE_PAGES, index=5), Region.TRAILER, 1),  # the CRC itself
        (page_sel(F.VCPU_STATE), Region.PAYLOAD, 10),  # vCPU state (plaintext for a non-ES guest)
        (page_sel(F.SHARED_BITMAP), Region.PAYLOAD, 0),
    ],
    ids=["shared-payload", "shared-meta", "private-payload", "transport-header", "length", "type",
         "meta-len", "zero-run-meta", "crc", "vcpu-state", "bitmap"],
)
def test_flipped_bit(tmp_path: Path, select: FrameSelector, region: Region, offset: int) -> None:
    outcome = migrate_through(tmp_path, [FlipFrameBit(select, region, offset, 6)], workload=workload_for(select))
    (flip,) = outcome.fired("flip")
    assert flip.old is not None and flip.old ^ flip.new == 1 << 6
    outcome.assert_rolled_back()
    # The CRC32 catches it first; a broken length field may be caught by the framing before that.
    assert dest_saw(outcome, "CRC32", "payload bytes", "unknown frame type", "shorter than its metadata")


@pytest.mark.fault_class("bit flip")
@pytest.mark.parametrize(
    ("ftype", "direction", "offset", "source_says", "dest_says"),
    [
        # The side that detects the damage sends ABORT with its reason. The destination keeps no
        # record of a connection that never authenticated (it only logs it): nothing to report.
        (F.HELLO, UP, -1, "CRC32", ""),
        (F.WELCOME, DOWN, 200, "CRC32", ""),  # the source checks WELCOME
        (F.SESSION, UP, -20, "CRC32", ""),
    ],
    ids=["hello", "welcome", "session"],
)
def test_flipped_bit_in_the_handshake(tmp_path: Path, ftype: FrameType, direction: Direction, offset: int,
                                      source_says: str, dest_says: str) -> None:
    outcome = migrate_through(tmp_path, [FlipFrameBit(FrameSelector.of(ftype), Region.META, offset, 1,
                                                      direction=direction)])
    (flip,) = outcome.fired("flip")
    assert flip.frame is not None and flip.frame.type == ftype
    assert S.ACTIVE not in outcome.progress.phase.entered_at  # no page was ever sent
    outcome.assert_rolled_back()
    assert source_says in (outcome.progress.phase.error or ""), outcome.progress.phase.error
    assert dest_says in outcome.dest_error, outcome.dest_error


@pytest.mark.fault_class("bit flip")
def test_raw_bit_flip_at_a_stream_offset(tmp_path: Path) -> None:
    """The byte-offset flavour (no framing knowledge): 1 MiB into the page stream."""
    outcome = migrate_through(tmp_path, [FlipBit(1 << 20, bit=3)])
    (flip,) = outcome.fired("flip")
    assert flip.offset == 1 << 20
    outcome.assert_rolled_back()
    assert dest_saw(outcome, "CRC32", "payload bytes", "unknown frame type", "shorter than its metadata")


@pytest.mark.fault_class("bit flip")
def test_source_reports_the_destination_reason(tmp_path: Path) -> None:
    """The operator looks at the source: it should say why the destination refused the stream.

    Was a timing-dependent defect: the destination closed with unread data in its socket, the
    kernel reset the connection and the RST could destroy the ABORT frame before the source read
    it ("connection reset"). Now a refusing side half-closes and drains (``FrameProtocol.close``)."""
    outcome = migrate_through(tmp_path, [FlipFrameBit(page_sel(F.PRIVATE_PAGES, index=5), Region.PAYLOAD, 1000, 2)])
    assert outcome.fired("flip")
    outcome.assert_rolled_back()
    assert dest_saw(outcome, "CRC32")
    source_error = outcome.progress.phase.error or ""
    assert "CRC32" in source_error, (source_error, outcome.dest_error)


# ---------------------------------------------------------------------- lost, repeated, reordered frames


@pytest.mark.fault_class("drop / duplicate / replay / swap")
@pytest.mark.parametrize(
    "fault",
    [
        DropFrame(page_sel(F.PRIVATE_PAGES, later=True)),
        DropFrame(page_sel(F.SHARED_PAGES, later=True)),
        DropFrame(page_sel(F.ROUND_END)),  # progress only, but the frame count no longer matches
        DuplicateFrame(page_sel(F.PRIVATE_PAGES, index=4)),
        DuplicateFrame(page_sel(F.SHARED_PAGES, index=1)),
        ReplayFrame(page_sel(F.PRIVATE_PAGES, index=2), after=3),
        RollbackFrame(frozenset({F.PRIVATE_PAGES, F.SHARED_PAGES})),
        SwapFrames(page_sel(F.PRIVATE_PAGES, F.SHARED_PAGES, F.ZERO_PAGES, index=3)),
    ],
    ids=["drop-private", "drop-shared", "drop-round-end", "duplicate-private", "duplicate-shared",
         "replay-private", "rollback", "swap"],
)
def test_frame_fault(tmp_path: Path, fault: Fault) -> None:
    outcome = migrate_through(tmp_path, [fault], workload=workload_for(getattr(fault, "select", None)))
    assert outcome.records and outcome.records[0].frame is not None
    outcome.assert_rolled_back()
    assert dest_saw(outcome, "CRC32")


# ====================================================================== an attacker on a plain-TCP path


@pytest.mark.fault_class("attacker: private pages")
@pytest.mark.parametrize("mode", [BOUND, COMPAT], ids=["bound", "sev-compat"])
def test_attacker_flips_private_ciphertext(tmp_path: Path, mode: TransportMode) -> None:
    """The transport MAC covers the ciphertext in both modes."""
    outcome = migrate_through(tmp_path, [FlipFrameBit(page_sel(F.PRIVATE_PAGES, index=5), Region.PAYLOAD, 1000, 2)],
                              mode=mode, reseal=True)
    (flip,) = outcome.fired("flip")
    assert flip.frame is not None and flip.frame.type == F.PRIVATE_PAGES
    outcome.assert_rolled_back()
    assert dest_saw(outcome, "MAC mismatch")


@pytest.mark.fault_class("attacker: private pages")
@pytest.mark.parametrize("mode", [BOUND, COMPAT], ids=["bound", "sev-compat"])
def test_attacker_flips_the_transport_packet_header(tmp_path: Path, mode: TransportMode) -> None:
    """A bit of the 52-byte SEV packet header (its IV) inside the frame metadata."""
    meta = msgpack.packb({"gpa": 1 << 20, "n": 256, "hdr": bytes(52)}, use_bin_type=True)
    iv_byte = meta.index(bytes(52)) + 4 + 3  # flags u32, then the IV
    outcome = migrate_through(tmp_path, [FlipFrameBit(page_sel(F.PRIVATE_PAGES, index=3), Region.META,
                                                      iv_byte - len(meta), 0)], mode=mode, reseal=True)
    assert outcome.fired("flip")
    outcome.assert_rolled_back()
    assert dest_saw(outcome, "MAC mismatch")


#: Pages rolled back after the last re-send: nothing can repair them before the commit.
LATE_ROLLBACK = {"before_type": F.SHARED_BITMAP}


@pytest.mark.fault_class("attacker: private pages")
@pytest.mark.parametrize(
    "fault",
    [
        FlipFrameBit(page_sel(F.PRIVATE_PAGES, later=True), field="gpa", bit=12),  # moved
        DropFrame(page_sel(F.PRIVATE_PAGES, later=True)),  # the older copy would stay
        RollbackFrame(frozenset({F.PRIVATE_PAGES}), **LATE_ROLLBACK),  # rolled back for good
        DuplicateFrame(page_sel(F.PRIVATE_PAGES, index=4)),  # the same bytes twice
        ReplayFrame(page_sel(F.PRIVATE_PAGES, index=2), after=3),  # within the round
        SwapFrames(page_sel(F.PRIVATE_PAGES, index=3)),  # two runs, each at its own gpa
    ],
    ids=["move", "drop", "rollback", "duplicate", "replay", "swap"],
)
@pytest.mark.parametrize("mode", [BOUND, COMPAT], ids=["bound", "sev-compat"])
def test_attacker_tampers_with_private_pages(tmp_path: Path, mode: TransportMode, fault: Fault) -> None:
    """``bound`` binds session, GPA range and sequence into each packet's MAC: refused at the page.
    ``sev-compat`` packets bind neither (the firmware's format: moved, dropped and rolled-back
    packets verify), but PREPARE binds the chain of every page frame's place and packet header
    (docs/protocol.md "Authentication"): refused before the commit. Before PREPARE bound the
    stream (protocol 2), the same moves, drops and rollbacks committed in ``sev-compat``."""
    outcome = migrate_through(tmp_path, [fault], mode=mode, reseal=True)
    assert outcome.records and outcome.records[0].frame is not None
    outcome.assert_rolled_back()
    assert dest_saw(outcome, "MAC mismatch" if mode is BOUND else "not what the source sent")


@pytest.mark.fault_class("attacker: plaintext without TLS")
@pytest.mark.parametrize(
    "fault",
    [
        FlipFrameBit(page_sel(F.SHARED_PAGES, index=2), Region.PAYLOAD, 4095, 0),
        FlipFrameBit(page_sel(F.SHARED_PAGES, later=True), field="gpa", bit=12),
        DropFrame(page_sel(F.SHARED_PAGES, later=True)),
    ],
    ids=["flip-payload", "move", "drop"],
)
def test_attacker_tampers_with_shared_pages_without_tls(tmp_path: Path, fault: Fault) -> None:
    """Shared pages are plaintext. Where they go and which frames came is bound by PREPARE's
    frame chain: a moved or dropped shared run is refused before the commit. Their *contents*
    are not (hashing every plaintext byte would cost the data path; the host may write shared
    memory at any time anyway): an attacker on a plain-TCP path who recomputes the CRC32 changes
    them undetected, and the migration commits. That is the documented limit: use mutual TLS."""
    outcome = migrate_through(tmp_path, [fault], reseal=True, workload=SHARED_HEAVY)
    assert outcome.records and outcome.records[0].frame is not None
    if isinstance(fault, FlipFrameBit) and fault.field is None:  # the contents, not the place
        assert outcome.status is S.COMPLETED and outcome.progress.phase.committed, outcome.progress.phase.error
    else:
        outcome.assert_rolled_back()
        assert dest_saw(outcome, "not what the source sent")


@pytest.mark.fault_class("attacker: plaintext without TLS")
def test_attacker_renames_the_guest_in_hello_without_tls(tmp_path: Path) -> None:
    """The handshake is plaintext too: an attacker flips the guest name in HELLO. HELLO is part
    of the authenticated transcript, so the source's SESSION MAC no longer verifies and nothing
    is created. (Protocol 2 bound nothing to HELLO: the guest arrived as "g0".)"""
    probe = wire.encode_bytes(wire.Hello("0" * 16, wire.GuestSpec("g1", MEMORY_MIB * 256, 0), BOUND.value))
    meta = probe[wire.PREFIX_SIZE : -wire.CRC_SIZE]
    at = meta.index(b"\xa2g1") + 2  # the "1" of "g1"
    outcome = migrate_through(tmp_path, [FlipFrameBit(FrameSelector.of(F.HELLO), Region.META, at, 0)], reseal=True)
    assert outcome.fired("flip")
    outcome.assert_rolled_back()
    assert "SESSION failed its MAC" in (outcome.progress.phase.error or ""), outcome.progress.phase.error


@pytest.mark.fault_class("attacker: plaintext without TLS")
@pytest.mark.parametrize(
    ("ftype", "direction", "reason"),
    [
        (F.SESSION, UP, "handshake within 3 s (await-session-ack)"),
        (F.SHARED_BITMAP, UP, "the shared-page bitmap"),
        (F.VCPU_STATE, UP, "unexpected Prepare"),
        (F.PREPARE, UP, "no PREPARED from the destination within"),
        (F.WELCOME, DOWN, "handshake within 3 s (await-welcome)"),
        (F.SESSION_ACK, DOWN, "handshake within 3 s (await-session-ack)"),
    ],
    ids=["session", "shared-bitmap", "vcpu-state", "prepare", "welcome", "session-ack"],
)
def test_attacker_drops_a_control_frame(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ftype: FrameType,
                                        direction: Direction, reason: str) -> None:
    """With the CRC out of the way, the engines' own protocol checks refuse a missing frame."""
    outcome = migrate_through(tmp_path, [DropFrame(FrameSelector.of(ftype), direction)], monkeypatch=monkeypatch,
                              reseal=True)
    (drop,) = outcome.fired("drop")
    assert drop.frame is not None and drop.frame.type == ftype
    outcome.assert_rolled_back()
    assert reason in (outcome.progress.phase.error or ""), outcome.progress.phase.error


# ====================================================================== mutual TLS


@pytest.mark.fault_class("control: proxy without faults")
def test_tls_through_the_proxy_control(tmp_path: Path) -> None:
    """Control: the proxy forwards a mutual-TLS stream untouched (it sees only TLS records)."""
    outcome = migrate_through(tmp_path, [], tls=True)
    outcome.assert_moved_intact()


TLS_RECORD = FrameSelector.of(23, index=40, min_payload=8000)  # a full application-data record in round 0


@pytest.mark.fault_class("TLS: tampered records")
@pytest.mark.parametrize(
    "fault",
    [
        FlipFrameBit(TLS_RECORD, Region.PAYLOAD, 3000, 0),
        FlipFrameBit(TLS_RECORD, Region.PREFIX, 3, 0),
        DropFrame(TLS_RECORD),
        DuplicateFrame(TLS_RECORD),
        ReplayFrame(TLS_RECORD, after=2),
        SwapFrames(TLS_RECORD),
    ],
    ids=["flip-payload", "flip-length", "drop", "duplicate", "replay", "swap"],
)
def test_tls_fails_the_stream(tmp_path: Path, fault: Fault) -> None:
    outcome = migrate_through(tmp_path, [fault], tls=True)
    assert outcome.records and outcome.records[0].frame is not None
    assert outcome.records[0].frame.payload_len >= 8000
    outcome.assert_rolled_back()
    assert dest_saw(outcome, "TLS record rejected")
