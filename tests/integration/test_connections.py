"""Migrations over several TCP connections (``MigrationParams(connections=N)``), real engines on 127.0.0.1.

The first connection carries the handshake, every control frame and pages; after SESSION_ACK
the source opens N-1 further ones, each proved by JOIN/JOINED, and stripes the pages over all
of them by GPA (stripe ``k`` of 2 MiB always on connection ``k % N``). What is checked here:

* the guest arrives intact over 1, 2 and 4 connections, plain TCP and mutual TLS, and the
  source really used that many (every connection's frame chain carried private pages);
* two ``migd serve`` daemons migrate over 4 mutual-TLS connections through REST alone;
* the MSR gate holds with 4 connections (a kexec mid-migration, or held through the
  switchover, passes through ``blackout``; a run read before the MSR dropped and written after
  it is no failure), and the unsafe-kexec guest still shows its corruption (the negative control);
* a further connection that is cut or stalls fails the migration cleanly, and a run sent on
  the wrong connection is refused by the destination;
* a JOIN from a peer that does not hold the session's key (unknown id, forged MAC, a replayed
  JOIN) is refused and creates nothing;
* a few randomized interleavings (reboot/kexec races) with 4 connections.

Helpers come from the single-connection suites (test_stream_faults, test_migration,
test_interleavings, test_attacks); where those build their migration inline, the engines they
construct are swapped for 4-connection ones through ``monkeypatch``, their bodies unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis.stateful import run_state_machine_as_test

from faultproxy import Cut, Direction, FaultProxy, Framing, OnConnection, Stall
from migd import source as source_module
from migd import wire
from migd.errors import ProtocolError
from migd.guest.host_guest import GuestState, HostGuest
from migd.guest.workload import WorkloadConfig
from migd.listener import MigrationListener, Refusal
from migd.migration_state import MigrationStatus
from migd.page_runs import STRIPE_PAGES, PageKind
from migd.source import MigrationParams, OutgoingMigration
from migd.wire import FrameType

from . import test_interleavings as interleavings
from . import test_migration as two_process
from . import test_stream_faults as stream_faults
from .hosts import closing, make_host, running_guest, wait_populated
from .serve_process import ServeProcess
from .test_attacks import ProxyThread
from .test_stream_faults import DEST_TIMEOUTS, PARAMS, Outcome, dest_saw, migrate_through

S = MigrationStatus
F = FrameType
pytestmark = pytest.mark.timeout(120)

#: 16 MiB = 8 stripes of 2 MiB: each of 4 connections owns two (the fault suite's size too).
MEMORY_MIB = stream_faults.MEMORY_MIB
NPAGES = MEMORY_MIB * 256
assert NPAGES >= 4 * 2 * STRIPE_PAGES
#: The whole data area written once after boot, then writes and conversions while migrating:
#: every stripe, and so every connection, carries private pages in every case.
POPULATED = WorkloadConfig(dirty_rate_mib_s=8, convert_rate_hz=20, seed=11, populate_fraction=1.0)
FOUR = dataclasses.replace(PARAMS, connections=4)
#: Populated too, but writing slowly: a bandwidth-limited migration of it converges at once.
LIGHT = dataclasses.replace(POPULATED, dirty_rate_mib_s=1, convert_rate_hz=5)


def assert_lanes_used(migration: OutgoingMigration, n: int) -> None:
    """The source striped its pages over ``n`` connections: the session agreed ``n``, and every
    further connection's frame chain carried page frames, private ones among them, the first
    none with several (a source that quietly fell back to one connection, or left a connection
    idle, fails here)."""
    session = migration.session
    assert session.connections == n, (session.connections, n)
    per_lane = [(chain.frames, chain.pages[PageKind.PRIVATE]) for chain in session.chain.lanes]
    carrying = per_lane[1:] if n > 1 else per_lane
    assert len(per_lane) == n and all(frames > 0 and private > 0 for frames, private in carrying), per_lane
    assert n == 1 or per_lane[0] == (0, 0), per_lane


def four_connections(made: list[OutgoingMigration]) -> Callable[..., OutgoingMigration]:
    """Stands in for ``OutgoingMigration`` in another suite's module: the same engine with
    ``connections=4`` (whatever params that suite passes), each one made kept in ``made``."""

    def make(guest: HostGuest, host: str, port: int, params: MigrationParams | None = None,
             **kw: Any) -> OutgoingMigration:
        migration = OutgoingMigration(guest, host, port, dataclasses.replace(params or MigrationParams(), connections=4),
                                      **kw)
        made.append(migration)
        return migration

    return make


# ====================================================================== 1. the guest moves intact


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "mutual-tls"])
@pytest.mark.parametrize("connections", [1, 2, 4])
def test_a_running_guest_migrates_over_n_connections(tmp_path: Path, connections: int, tls: bool) -> None:
    """A populated guest under write/convert load moves intact over ``connections`` connections:
    completed, every page verified by the arrived guest with 0 errors, the same shared-page
    bitmap on both ends, and every connection carried private pages."""

    async def main() -> None:
        a, b = make_host(tmp_path, "hostA"), make_host(tmp_path, "hostB")
        server_ctx, client_ctx = stream_faults._tls_contexts(tmp_path) if tls else (None, None)
        listener = MigrationListener(b, ssl_context=server_ctx)
        port = await listener.start("127.0.0.1", 0)
        try:
            async with closing(a, b):
                guest = await running_guest(a, memory_mib=MEMORY_MIB, workload=POPULATED)
                await wait_populated(guest)
                migration = OutgoingMigration(guest, "localhost" if tls else "127.0.0.1", port,
                                              MigrationParams(connections=connections), ssl_context=client_ctx)
                progress = await asyncio.wait_for(migration.run(), 60)
                assert progress.status is S.COMPLETED, progress.phase.error
                assert guest.state is GuestState.MIGRATED
                assert_lanes_used(migration, connections)
                arrived = b.get("g1")
                assert arrived.state is GuestState.RUNNING
                check = await arrived.wait_check(60)
                assert check.errors == 0 and check.pages_verified == NPAGES, check
                (incoming,) = b.migrations.values()
                assert incoming.status is S.COMPLETED
                assert incoming.shared_bitmap_sha256 == progress.shared_bitmap_sha256
        finally:
            await listener.close()

    asyncio.run(main())


# ====================================================================== 2. two daemons, REST only


@pytest.mark.parametrize("connections, tls", [(2, False), (2, True), (4, False), (4, True)],
                         ids=["2-tcp", "2-mutual-tls", "4-tcp", "4-mutual-tls"])
def test_rest_migration_over_several_connections(tmp_path: Path, connections: int, tls: bool) -> None:
    """Two ``migd serve`` processes, ``"connections": N`` in the REST body (one connection, TCP
    and TLS: test_rest_migration.py); the path goes through a pass-through proxy, whose
    accepted-connection count shows the daemons really opened N (TLS passes it untouched)."""
    a = b = None
    try:
        a = ServeProcess.start(tmp_path, "hostA", tls=tls)
        b = ServeProcess.start(tmp_path, "hostB", tls=tls)
        status, guest = a.request("POST", "/v1/guests", {"name": "g1", "memory_mib": MEMORY_MIB})
        assert status == 201, guest
        status, guest = a.request("POST", "/v1/guests/g1/start", {"workload": POPULATED.to_dict()})
        assert status == 200 and guest["state"] == "running", guest
        a.wait_for("GET", "/v1/guests/g1", lambda g: g["migration_control"]["ready"], timeout=20)

        framing = Framing.TLS if tls else Framing.MIGD
        with ProxyThread(FaultProxy("127.0.0.1", b.migration_port, framing=framing)) as path:
            # The certificate names the host: dial it by name (the proxy listens on 127.0.0.1).
            body = {"destination": f"{'localhost' if tls else '127.0.0.1'}:{path.port}", "connections": connections}
            status, migration = a.request("POST", "/v1/guests/g1/migrate", body)
            assert status == 202, migration
            done = a.wait_for("GET", f"/v1/migrations/{migration['id']}",
                              lambda m: m["status"] in ("completed", "failed", "cancelled"), timeout=60)
            assert done["status"] == "completed", (done, a.log(), b.log())
            assert path.proxy.connections == connections, path.proxy.connections
        assert done["error"] is None and done["bytes"]["remaining"] == 0

        arrived = b.wait_for("GET", "/v1/guests/g1", lambda g: g["check"]["pages_verified"] > 0, timeout=30)
        assert arrived["state"] == "running"
        assert arrived["check"] == {"pages_verified": NPAGES, "errors": 0, "last_error": None}, arrived
        status, incoming = b.request("GET", f"/v1/migrations/{migration['id']}")
        assert status == 200 and incoming["role"] == "destination" and incoming["status"] == "completed", incoming
        a.wait_for("GET", "/v1/guests/g1", lambda g: g["state"] == "migrated", timeout=10)
    finally:
        for daemon in (a, b):
            if daemon is not None:
                daemon.stop()


# ====================================================================== 3. the MSR gate


@pytest.mark.fault_class("MSR gate: kexec mid-migration over 4 connections")
@pytest.mark.parametrize("case", ["kexec-blackout", "unsafe-kexec-corrupts", "negative-control-gate-removed"])
def test_kexec_during_a_four_connection_migration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  case: str) -> None:
    """test_migration's kexec case, its body unchanged, with the engine it builds using 4
    connections. Safe guest: MSR 0 in the kexec window, so nothing is read for any connection
    (``blackout``) until the new kernel re-enables migration; the guest arrives intact. Every run
    the engine reads (to queue it on a connection, for its worker to seal and send) is recorded
    with the MSR as the engine saw it: none may be read while it is not READY.

    Negative controls: the unsafe guest keeps READY across kexec, so the host never blacks out,
    sends a stale bitmap and the arrived guest finds bad pages (the self-check can fail); and an
    engine whose blackout is removed reads runs while the MSR is 0 (the recorder can see it)."""
    made: list[OutgoingMigration] = []
    monkeypatch.setattr(two_process, "OutgoingMigration", four_connections(made))
    reads: list[bool] = []  # per run read for a connection: was the MSR READY (as the engine saw it)?
    queue_run = OutgoingMigration._queue_run

    def recording_queue_run(self: OutgoingMigration, send_lane: Any, kind: PageKind, gpa: int, count: int) -> None:
        if kind is not PageKind.ZERO:  # a zero run reads nothing
            reads.append(self.guest.vm.migration_ready)
        queue_run(self, send_lane, kind, gpa, count)

    monkeypatch.setattr(OutgoingMigration, "_queue_run", recording_queue_run)
    if case == "negative-control-gate-removed":
        async def no_blackout(self: OutgoingMigration) -> None:
            self._msr_dropped = False  # and go on sending

        monkeypatch.setattr(OutgoingMigration, "_blackout", no_blackout)

    async def main() -> None:
        unsafe = case == "unsafe-kexec-corrupts"
        if case == "negative-control-gate-removed":
            with contextlib.suppress(AssertionError):  # the body asserts a blackout this engine never has
                await two_process._kexec_during_migration(tmp_path, unsafe=False)
            assert reads.count(False) > 0, reads.count(True)  # runs read with the MSR at 0: caught
            return
        progress, report, guest = await two_process._kexec_during_migration(tmp_path, unsafe=unsafe)
        (migration,) = made
        assert progress.status is S.COMPLETED, progress.phase.error
        assert_lanes_used(migration, 4)
        assert reads and all(reads), f"{reads.count(False)} of {len(reads)} runs read with the MSR not READY"
        if unsafe:
            assert progress.phase.blackouts == 0  # the host never saw the MSR drop
            assert report["errors"] > 0, report
        else:
            assert progress.phase.blackouts >= 1 and S.BLACKOUT in progress.phase.entered_at
            assert report["errors"] == 0, report
            assert report["pages_verified"] == guest.definition.npages

    asyncio.run(main())


@pytest.mark.fault_class("MSR gate: kexec while runs wait for sealing")
def test_a_kexec_while_a_read_run_waits_to_be_written_passes_through_blackout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With several connections a private run is classified on the loop, under the MSR gate, and
    read and sealed later by its connection's thread. Here the first such run's SEND_UPDATE_DATA
    is held, before its read, while the guest kexecs and the source enters ``blackout``; then it
    is let go. Its read now comes after the MSR dropped: the run must be abandoned (not sent; its
    pages re-sent after READY), and the migration must ride out the blackout and complete intact,
    not fail because a frame of that connection comes late. (A frame written after the blackout
    began once failed migrations in the randomized interleavings below; this forces the case.)"""
    from migd.platform import psp

    sealing, release = threading.Event(), threading.Event()
    send = psp.PspFirmware.send_update_data

    def held_send(self: psp.PspFirmware, *args: Any, **kwargs: Any) -> tuple[bytes, memoryview]:
        if threading.current_thread() is not threading.main_thread() and not sealing.is_set():
            sealing.set()
            release.wait(20)  # bounded: the test sets it within seconds
        return send(self, *args, **kwargs)

    monkeypatch.setattr(psp.PspFirmware, "send_update_data", held_send)

    async def main() -> None:
        a, b = make_host(tmp_path, "hostA"), make_host(tmp_path, "hostB")
        listener = MigrationListener(b)
        port = await listener.start("127.0.0.1", 0)
        try:
            async with closing(a, b):
                guest = await running_guest(a, memory_mib=MEMORY_MIB, workload=POPULATED)
                await wait_populated(guest)
                channel = guest.channel
                assert channel is not None
                # Bandwidth-limited: the loop steps through round 0 for ~2 s, looking at the MSR
                # before each step, and never fills a connection's queue behind the held run.
                params = MigrationParams(connections=4, max_bandwidth_mib_s=8, blackout_timeout_s=20)
                migration = OutgoingMigration(guest, "127.0.0.1", port, params)
                task = migration.start()
                try:
                    await _until(sealing.is_set)
                    windows = channel.event_count("kexec-window")
                    await channel.kexec(hold_in_window=True)
                    await channel.wait_event("kexec-window", 20, since=windows)
                    # The source enters blackout at its next step (an engine that first waits
                    # for its queued runs stays active until the release: either is fine).
                    with contextlib.suppress(TimeoutError):
                        await _until(lambda: migration.progress.status is S.BLACKOUT, 1.0)
                finally:
                    release.set()
                await asyncio.sleep(0.3)  # the held run is sealed and its turn comes
                await channel.resume()  # the new kernel finishes its early boot: READY again
                progress = await asyncio.wait_for(task, 60)
                assert progress.status is S.COMPLETED, progress.phase.error
                assert progress.phase.blackouts >= 1
                assert_lanes_used(migration, 4)
                assert sum(lane.abandoned for lane in migration._send_lanes) >= 1  # the held run was not sent
                check = await b.get("g1").wait_check(60)
                assert check.errors == 0 and check.pages_verified == NPAGES, check
        finally:
            release.set()
            await listener.close()

    asyncio.run(main())


@pytest.mark.fault_class("MSR gate: kexec held through the switchover over 4 connections")
@pytest.mark.parametrize("unsafe", [False, True], ids=["safe-guest", "unsafe-kexec-caught"])
def test_kexec_in_the_switchover_over_four_connections(monkeypatch: pytest.MonkeyPatch, unsafe: bool) -> None:
    """test_interleavings' scripted race (a kexec held in its window while the switchover
    happens), its script unchanged, with 4 connections: the safe guest passes through blackout
    and arrives intact; the unsafe one (MSR kept READY) arrives corrupted, and the checks say so."""
    made: list[OutgoingMigration] = []
    monkeypatch.setattr(interleavings, "OutgoingMigration", four_connections(made))
    machine = interleavings.UnsafeKexecMachine() if unsafe else interleavings.InterleavingMachine()
    result = interleavings._scripted_kexec_in_the_switchover(machine)
    (migration,) = made
    assert migration.session.connections == 4
    if unsafe:
        assert result.progress.phase.blackouts == 0 and result.progress.status is S.COMPLETED
        assert result.arrival is not None and result.arrival.errors > 0, result.arrival
    else:
        assert result.progress.phase.blackouts >= 1
        interleavings.check_result(result)


# ====================================================================== 4. faults on a further connection


def test_on_connection_faults_only_that_connection() -> None:
    """The proxy option this group relies on: a Cut wrapped in OnConnection(…, 1) hits the second
    connection accepted and nothing else (the first, and a third, pass 1 MiB untouched)."""
    from test_faultproxy import EchoServer

    async def main() -> None:
        echo = EchoServer()
        port = await echo.start()
        payload = os.urandom(1 << 20)
        async with FaultProxy("127.0.0.1", port, [OnConnection(Cut(1000), 1)]) as proxy:
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(payload)
                writer.write_eof()
                with contextlib.suppress(ConnectionError):
                    async with asyncio.timeout(10):
                        while await reader.read(65536):
                            pass
                writer.close()
            await _until(lambda: len(echo.ended) == 3 and all(e.is_set() for e in echo.ended))
        await echo.close()
        assert [bytes(got) == payload for got in echo.received] == [True, False, True]
        assert bytes(echo.received[1]) == payload[:1000]
        (cut,) = proxy.fired("cut")
        assert cut.connection == 1 and cut.offset == 1000

    asyncio.run(main())


def _capture(into: list[tuple[OutgoingMigration, FaultProxy]]) -> stream_faults.During:
    """A ``during`` for migrate_through that keeps the engine and the proxy for the assertions."""

    async def during(migration: OutgoingMigration, guest: HostGuest, proxy: FaultProxy) -> None:
        into.append((migration, proxy))

    return during


def _through(tmp_path: Path, faults: list[Any], params: MigrationParams = FOUR,
             **kw: Any) -> tuple[Outcome, OutgoingMigration, FaultProxy]:
    seen: list[tuple[OutgoingMigration, FaultProxy]] = []
    outcome = migrate_through(tmp_path, faults, params=params, workload=POPULATED, during=_capture(seen), **kw)
    ((migration, proxy),) = seen
    return outcome, migration, proxy


@pytest.mark.fault_class("control: proxy without faults")
def test_four_connections_through_the_proxy_control(tmp_path: Path) -> None:
    """Control for this group: the same 4-connection migration through a proxy without faults
    completes intact, and the proxy saw the control connection and 3 further ones."""
    outcome, migration, proxy = _through(tmp_path, [])
    assert outcome.records == []
    outcome.assert_moved_intact()
    assert_lanes_used(migration, 4)
    assert proxy.connections == 4


@pytest.mark.fault_class("connection cut: a further connection")
def test_a_further_connection_cut_mid_precopy_fails_cleanly(tmp_path: Path) -> None:
    """1 MiB into the second connection accepted (a further one: it carries JOIN, then its
    stripes' pages), both of its ends are reset, in the middle of a round-0 page frame."""
    outcome, migration, _ = _through(tmp_path, [OnConnection(Cut(1 << 20), 1)])
    (cut,) = outcome.fired("cut")
    assert cut.connection == 1 and cut.offset == 1 << 20
    assert migration.session.connections == 4 and S.ACTIVE in outcome.progress.phase.entered_at
    outcome.assert_rolled_back()
    # Both ends see the reset, and whichever notices first gives the reason (the destination waits
    # LANE_END_GRACE_S for the source's ABORT before a lost connection is its own reason): on both
    # ends it names the connection that ended, a further one (numbered from 1 in messages, the
    # control one first).
    lost = r"connection [234] (of 4 ended|lost)"
    assert re.search(lost, outcome.dest_error), outcome.dest_error
    assert re.search(lost, outcome.progress.phase.error or ""), outcome.progress.phase.error


@pytest.mark.fault_class("stall / slow link: a further connection")
def test_a_further_connection_that_stalls_fails_within_the_stall_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A further connection stops moving 1 MiB in (for far longer than any timeout) while the
    control connection stays healthy: the source (stall_timeout_s 2 s) or the destination
    (idle timeout 2 s) gives up in bounded time, and the migration rolls back cleanly."""
    params = dataclasses.replace(FOUR, stall_timeout_s=2.0)
    timeouts = {**DEST_TIMEOUTS, "idle_timeout_s": 2.0}
    outcome, migration, _ = _through(tmp_path, [OnConnection(Stall(1 << 20, 60.0), 1)], params=params,
                                     monkeypatch=monkeypatch, dest_timeouts=timeouts)
    (stall,) = outcome.fired("stall")
    assert stall.connection == 1 and stall.direction is Direction.UPSTREAM
    assert migration.session.connections == 4
    outcome.assert_rolled_back()
    # Either end's 2 s deadline ended it (which one first is a race), not the stall's end.
    assert ("took nothing for 2 s" in (outcome.progress.phase.error or "")
            or dest_saw(outcome, "no data from the source for 2 s")), (outcome.progress.phase.error, outcome.dest_error)
    assert outcome.progress.phase.total_time_ms(0.0) < 8_000


@pytest.mark.fault_class("attacker: a run moved to another connection")
def test_a_run_on_the_wrong_connection_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One private run goes on the connection after the one its stripe belongs to (the source's
    striping patched for that single run; a proxy cannot move a frame between connections). Its
    packet is genuine and MACed for the lane it travels on, so only the destination's stripe
    check can refuse it: the migration fails before the commit and the guest runs on."""
    moved: list[tuple[int, int, int]] = []  # (first page, its connection, the one it went on)
    send_run = OutgoingMigration._send_run

    def misroute_once(self: OutgoingMigration, kind: PageKind, first: int, count: int) -> None:
        n = len(self._lanes)
        if moved or kind is not PageKind.PRIVATE or n < 2:
            return send_run(self, kind, first, count)
        right = source_module.lane_of(first, n)
        wrong = (right + 1) % n
        moved.append((first, right, wrong))
        with monkeypatch.context() as patch:
            patch.setattr(source_module, "lane_of", lambda page, connections: wrong)
            return send_run(self, kind, first, count)

    monkeypatch.setattr(OutgoingMigration, "_send_run", misroute_once)
    outcome, migration, _ = _through(tmp_path, [])
    ((first, right, wrong),) = moved  # the fault happened, once
    assert wrong != right and migration.session.connections == 4
    outcome.assert_rolled_back()
    assert dest_saw(outcome, f"came on connection {wrong}; its stripe goes on connection {right}"), outcome.dest_error


# ====================================================================== 5. JOIN without the session's key


async def _send_join(port: int, frame: bytes, timeout: float = 5.0) -> list[wire.Message]:
    """Open a raw further connection to a migration listener (the lane preamble), send one JOIN
    frame, read until the listener closes (bounded: TimeoutError); returns the messages it
    answered with."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got: list[wire.Message] = []
    try:
        writer.write(wire.LANE_PREAMBLE + frame)
        await writer.drain()
        decoder = wire.FrameDecoder()
        async with asyncio.timeout(timeout):
            while data := await reader.read(65536):
                got += decoder.feed(data)
    except (ConnectionError, ProtocolError):
        pass  # a reset or a cut frame: the listener closed it
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(2):
                await writer.wait_closed()
    return got


def _abort_reasons(answer: list[wire.Message]) -> str:
    return " | ".join(m.reason for m in answer if isinstance(m, wire.Abort))


@pytest.mark.fault_class("access control: JOIN")
def test_a_join_for_an_unknown_migration_is_refused(tmp_path: Path) -> None:
    """A JOIN for a migration that does not exist here: refused (counted as a refusal of an
    unauthenticated peer), the connection closed, nothing created on the host."""

    async def main() -> None:
        b = make_host(tmp_path, "hostB")
        listener = MigrationListener(b, handshake_timeout_s=3.0)
        port = await listener.start("127.0.0.1", 0)
        try:
            async with closing(b):
                answer = await _send_join(port, wire.encode_bytes(wire.Join("nope", 1)))
                assert not any(isinstance(m, wire.Joined) for m in answer), answer
                assert "takes no further connections" in _abort_reasons(answer), answer
                await _until(lambda: not listener.live_connections)
                assert dict(listener.refused) == {Refusal.SESSION_REFUSED: 1}, listener.refused
                assert listener.pending_connections == 0
                assert b.guests == {} and b.migrations == {} and b.lane_servers == {}
                assert list((tmp_path / "hostB" / "guests").iterdir()) == []
        finally:
            await listener.close()

    asyncio.run(main())


async def _until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


@pytest.mark.fault_class("access control: JOIN")
def test_a_replayed_or_forged_join_is_refused_and_the_migration_completes(tmp_path: Path) -> None:
    """While a 2-connection migration runs (bandwidth-limited: round 0 lasts seconds), an attacker
    sends the listener (a) the JOIN recorded from the further connection, byte for byte, and (b)
    a JOIN with the migration's id and lane but a MAC it made up. Both are refused (the lane has
    joined already; the MAC does not verify), neither gets JOINED, and the migration they aimed
    at completes intact."""

    async def main() -> None:
        a, b = make_host(tmp_path, "hostA"), make_host(tmp_path, "hostB")
        listener = MigrationListener(b, handshake_timeout_s=3.0)
        port = await listener.start("127.0.0.1", 0)
        try:
            async with closing(a, b), FaultProxy("127.0.0.1", port, record=True) as recorder:
                guest = await running_guest(a, memory_mib=MEMORY_MIB, workload=LIGHT)
                await wait_populated(guest)
                params = dataclasses.replace(PARAMS, connections=2, max_bandwidth_mib_s=8.0)
                migration = OutgoingMigration(guest, "127.0.0.1", recorder.port, params)
                task = migration.start()
                # The further connection has joined (its JOINED went back): pages flow on it.
                await _until(lambda: recorder.frames(F.JOINED, Direction.DOWNSTREAM) == 1)
                (incoming,) = b.migrations.values()
                assert incoming.id in b.lane_servers and incoming.status is S.ACTIVE
                (join,) = [f for f in recorder.recordings[1].frames if f.type == F.JOIN]
                replayed = await _send_join(port, join.data)
                forged = await _send_join(port, wire.encode_bytes(wire.Join(incoming.id, 1, os.urandom(32))))
                assert migration.progress.status is S.ACTIVE  # both came while pages were flowing
                for answer in (replayed, forged):
                    assert not any(isinstance(m, wire.Joined) for m in answer), answer
                assert "has joined already" in _abort_reasons(replayed), replayed
                assert "failed its MAC" in _abort_reasons(forged), forged
                await _until(lambda: listener.refused[Refusal.SESSION_REFUSED] == 2)
                progress = await asyncio.wait_for(task, 60)
                assert progress.status is S.COMPLETED, progress.phase.error
                assert_lanes_used(migration, 2)
                assert recorder.connections == 2  # the attacker's went to the listener, not through here
                check = await b.get("g1").wait_check(60)
                assert check.errors == 0 and check.pages_verified == NPAGES, check
                assert list(b.guests) == ["g1"] and b.lane_servers == {}
                assert dict(listener.refused) == {Refusal.SESSION_REFUSED: 2}, listener.refused
        finally:
            await listener.close()

    asyncio.run(main())


# ====================================================================== 6. randomized interleavings


@pytest.mark.fault_class("interleavings: reboot/kexec race over 4 connections")
def test_randomized_interleavings_over_four_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    """test_interleavings' state machine, a few examples, every migration it starts using 4
    connections: each completed one is checked there (arrival self-check, bitmaps, one copy)."""
    made: list[OutgoingMigration] = []
    monkeypatch.setattr(interleavings, "OutgoingMigration", four_connections(made))
    interleavings.STATS.clear()
    examples = 4
    run_state_machine_as_test(interleavings.InterleavingMachine,
                              settings=settings(interleavings.MACHINE_SETTINGS, max_examples=examples))
    stats = interleavings.STATS
    assert stats["migrations completed and checked"] >= examples, stats
    finished = [m for m in made if m.progress.status is S.COMPLETED]
    assert len(finished) == stats["migrations completed and checked"], (len(finished), stats)
    for migration in finished:
        assert migration.session.connections == 4
