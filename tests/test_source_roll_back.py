"""How an outgoing migration ends when it fails or is cancelled before the commit, with the
source's further connections (migd/source.py `_roll_back`, `_open_lanes`, `run()`), driven
without a destination.

Found by an adversarial review (a helper played a hostile operator and a failing link), each test
failing on the code before its fix: a cancel that arrived during the roll-back interrupted it
and left the guest paused; SEND_CANCEL ran while a connection's thread was inside
SEND_UPDATE_DATA, whose seal then failed and left the guest's plaintext in the host's send
buffer; a connection that had joined outlived a migration cancelled twice while its other
connections were being opened; a finished migration kept its re-send bitmap. Interleavings are
forced with events, never timed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from migd.abi import PAGE_SIZE
from migd.bitmap import PageBitmap
from migd.guest.host_guest import GuestDefinition, GuestState
from migd.page_runs import PageKind
from migd.platform import identity
from migd.platform.memory import GuestRam, MemoryEncryption
from migd.platform.psp import PspFirmware
from migd.send_lane import SendLane
from migd.sev_transport import TransportMode
from migd.source import MigrationFailed, MigrationParams, OutgoingMigration
from session_pair import established

SEAL_NPAGES = 1024
RUN = 16
BIG_NPAGES = 16 << 20  # a 64 GiB guest


class Channel:
    connected = True

    def __init__(self) -> None:
        self.in_throttle = asyncio.Event()
        self.release = asyncio.Event()
        self.calls: list[str] = []

    async def throttle(self, percent: int) -> None:
        self.in_throttle.set()
        await self.release.wait()  # one round trip to the guest agent
        self.calls.append(f"throttle {percent}")

    async def resume(self) -> None:
        self.calls.append("resume")


def test_a_cancel_during_the_roll_back_still_resumes_the_guest_and_finishes() -> None:
    async def main() -> None:
        channel = Channel()
        cancelled: list[str] = []
        guest = SimpleNamespace(
            name="g", definition=GuestDefinition("g", 1, 0), handle=1, agent=object(), state=GuestState.RUNNING,
            firmware=SimpleNamespace(transport_mode=TransportMode.BOUND, send_cancel=lambda h: cancelled.append(h)),
            vm=SimpleNamespace(migration_ready=True, msr_migration_control=1, on_migration_control_change=None),
            channel=channel,
        )
        migration = OutgoingMigration(guest, "127.0.0.1", 1)  # type: ignore[arg-type]

        async def failing_handshake() -> None:
            # As a failure in stop-and-copy: auto-converge throttled the guest, then paused it.
            migration._auto.throttle_percent = 20
            migration._paused = True
            guest.state = GuestState.PAUSED
            raise MigrationFailed("injected: the destination closed the stream")

        migration._handshake = failing_handshake  # type: ignore[method-assign]
        task = migration.start()
        await asyncio.wait_for(channel.in_throttle.wait(), 5)  # _roll_back is un-throttling the guest
        assert migration.cancel(), "cancel() refused: the window is not reachable"
        channel.release.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        assert "resume" in channel.calls, f"the paused guest was never resumed (calls: {channel.calls})"
        assert guest.state is GuestState.RUNNING, f"guest left {guest.state}"
        assert migration.session.finished, f"migration never finished: phase {migration.session.phase}"

    asyncio.run(main())


class Stream:
    """What the source needs of a connection; writes are counted and dropped."""

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.close_reason = None
        self.peer_abort = None
        self.written: list[str] = []

    def write(self, msg: Any) -> int:
        self.written.append(type(msg).__name__)
        self.bytes_sent += 1
        return 1

    def bytes_consumed(self) -> int:
        return self.bytes_sent

    def write_buffer_size(self) -> int:
        return 0

    def close(self) -> None:
        pass


def test_no_plaintext_is_left_behind_when_the_migration_fails_during_a_seal() -> None:
    root = Path(tempfile.mkdtemp(prefix="migd-review-"))
    try:
        for host in ("hostA", "hostB"):
            identity.init_host(root / host, root / "ca", common_name=host)
        anchors = [root / "ca" / identity.CA_CERT]
        a = PspFirmware.from_state_dir(root / "hostA", anchors)
        b = PspFirmware.from_state_dir(root / "hostB", anchors)
        handle = a.launch(0)
        with GuestRam(root / "src.ram", SEAL_NPAGES, create=True) as ram:
            MemoryEncryption(a.guest_key(handle)).write_private(ram, 0, os.urandom(SEAL_NPAGES * PAGE_SIZE))
            secret = a.dbg_decrypt(handle, ram, 0, RUN)
            guest = SimpleNamespace(
                name="g", definition=GuestDefinition("g", SEAL_NPAGES * PAGE_SIZE >> 20, 0), ram=ram, firmware=a,
                handle=handle, agent=object(), state=GuestState.RUNNING, channel=None,
                vm=SimpleNamespace(shared_bitmap=PageBitmap(SEAL_NPAGES), migration_ready=True, msr_migration_control=1,
                                   on_migration_control_change=None),
            )
            migration = OutgoingMigration(guest, "127.0.0.1", 1, MigrationParams(connections=2))  # type: ignore[arg-type]

            # The worker: pause right after the VEK read, until SEND_CANCEL has run on the loop.
            decrypted, cancelled = threading.Event(), threading.Event()
            captured: list[memoryview] = []
            engine = a._guests[handle].engine
            real_decrypt = engine.decrypt

            def decrypt(gpa: int, raw: Any, out: Any = None) -> Any:
                plaintext = real_decrypt(gpa, raw, out)
                captured.append(plaintext)
                decrypted.set()
                cancelled.wait(5)  # until SEND_CANCEL, or until the lanes are being stopped
                return plaintext

            engine.decrypt = decrypt
            real_cancel = a.send_cancel

            def send_cancel(h: int) -> None:
                real_cancel(h)
                cancelled.set()

            a.send_cancel = send_cancel  # type: ignore[method-assign]

            async def handshake() -> None:  # as after _open_lanes with two connections
                a.send_start(handle, b.pdh_cert_pem)
                migration._session_open = True
                streams = [Stream(), Stream()]
                migration._proto = streams[0]  # type: ignore[assignment]
                migration._lanes, migration._rings = streams, [None, None]  # type: ignore[assignment]
                migration._send_lanes = [SendLane(i, functools.partial(migration._lane_written, i),
                                                  streams[i].bytes_consumed, transport_bytes=1 << 20)
                                         for i in range(2)]
                for lane in migration._send_lanes:
                    def stopping(real: Any = lane.close) -> None:
                        cancelled.set()  # a fix that stops the threads first lets the seal finish
                        real()
                    lane.close = stopping  # type: ignore[method-assign]
                migration._resend = PageBitmap(SEAL_NPAGES)

            async def precopy() -> PageBitmap:
                migration._send_run(PageKind.PRIVATE, 0, RUN)  # one private run, to connection 1's thread
                migration._send_lanes[0].submit()
                await asyncio.to_thread(decrypted.wait, 5)  # its read is done, the seal not yet
                raise MigrationFailed("injected: the destination closed connection 2")

            migration._handshake = handshake  # type: ignore[method-assign]
            migration._precopy = precopy  # type: ignore[method-assign]
            asyncio.run(asyncio.wait_for(migration.run(), 10))
            assert migration.session.finished and captured
            left = bytes(captured[0][: RUN * PAGE_SIZE])
            assert left != secret, "the guest's plaintext was left in the host's send buffer"
    finally:
        shutil.rmtree(root, ignore_errors=True)


class Lane:
    def __init__(self) -> None:
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def set_write_buffer_limits(self, high: int) -> None:
        pass


def test_a_joined_connection_is_aborted_even_if_a_second_cancel_comes_during_the_clean_up() -> None:
    async def main() -> None:
        guest = SimpleNamespace(
            name="g", definition=GuestDefinition("g", 1, 0), handle=1, agent=object(), state=GuestState.RUNNING,
            firmware=SimpleNamespace(transport_mode=TransportMode.BOUND), channel=None,
            vm=SimpleNamespace(migration_ready=True, msr_migration_control=1, on_migration_control_change=None))
        migration = OutgoingMigration(guest, "127.0.0.1", 1, MigrationParams(connections=4))  # type: ignore[arg-type]
        established(migration.session)
        assert migration.session.connections == 4
        migration._proto = Lane()  # type: ignore[assignment]
        joined, lane1 = asyncio.Event(), Lane()
        outer: list[asyncio.Task[None]] = []

        async def open_lane(index: int) -> Lane:
            if index == 1:
                joined.set()
                return lane1  # JOINED verified
            if index == 2:
                await joined.wait()
                raise MigrationFailed("connection 3 of 4 was refused: injected")
            try:
                await asyncio.Event().wait()  # connection 4: still connecting
            except asyncio.CancelledError:
                outer[0].cancel()  # a second cancel lands while _open_lanes cleans up
                raise
            raise AssertionError

        migration._open_lane = open_lane  # type: ignore[method-assign,assignment]
        task = asyncio.ensure_future(migration._open_lanes())
        outer.append(task)
        with pytest.raises((MigrationFailed, asyncio.CancelledError)):
            await asyncio.wait_for(task, 5)
        await asyncio.sleep(0)
        assert lane1 not in migration._lanes  # so run()'s finally will not close it either
        assert lane1.aborted, "connection 2 joined and outlives the failed migration (never aborted or closed)"

    asyncio.run(main())


def test_a_finished_migration_keeps_no_page_bitmap() -> None:
    guest = SimpleNamespace(
        name="g", definition=GuestDefinition("g", BIG_NPAGES >> 8, 0), handle=1, agent=object(), state=GuestState.RUNNING,
        firmware=SimpleNamespace(transport_mode=TransportMode.BOUND), channel=None,
        vm=SimpleNamespace(migration_ready=True, msr_migration_control=1, on_migration_control_change=None))
    migration = OutgoingMigration(guest, "127.0.0.1", 1, MigrationParams(connections=2))  # type: ignore[arg-type]

    async def handshake() -> None:
        migration._resend = PageBitmap(BIG_NPAGES)  # what _open_lanes allocates with two connections
        raise MigrationFailed("injected")

    migration._handshake = handshake  # type: ignore[method-assign]
    asyncio.run(migration.run())
    assert migration.session.finished
    assert migration._resend is None, f"{len(migration._resend.to_bytes()) >> 20} MiB kept by a finished migration"
