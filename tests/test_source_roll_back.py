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
import re
import socket
import shutil
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from migd import wire
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
                migration._send_run(PageKind.PRIVATE, 0, RUN)  # one private run: stripe 0, the second connection's
                migration._send_lanes[1].submit()
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
    """The first connection: only what opening the further ones asks of it."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.peer_address = address

    def set_write_buffer_limits(self, high: int) -> None:
        pass

    def bytes_consumed(self) -> int:
        return 0


class FurtherListener:
    """A destination's listener for further connections, in a thread: connection 2's JOIN is
    answered with a genuine JOINED, connection 3's with an ABORT (``refuse``), connection 4's
    never. It then watches every connection it accepted until the source ends it."""

    def __init__(self, dest: Any, refuse: bool) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()
        self.dest, self.refuse = dest, refuse
        self.joined = threading.Event()
        self.ended: dict[int, float] = {}  # lane: when the source ended it (EOF or reset)
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.server.settimeout(10)
        watchers = []
        for _ in range(3):
            conn, _ = self.server.accept()
            self.conns.append(conn)
            watchers.append(threading.Thread(target=self._lane, args=(conn,), daemon=True))
            watchers[-1].start()
        for watcher in watchers:
            watcher.join(20)

    def _lane(self, conn: socket.socket) -> None:
        conn.settimeout(15)
        assert conn.recv(len(wire.LANE_PREAMBLE), socket.MSG_WAITALL) == wire.LANE_PREAMBLE
        decoder, messages = wire.FrameDecoder(), []
        while not messages:
            messages = decoder.feed(conn.recv(4096))
        (join,) = messages
        if join.lane == 1:
            conn.sendall(wire.encode_bytes(self.dest.accept_join(join, 0.0)))
            self.joined.set()
        elif join.lane == 2 and self.refuse:
            assert self.joined.wait(10)
            conn.sendall(wire.encode_bytes(wire.Abort("injected: connection 3 refused")))
        try:
            while conn.recv(4096):  # nothing more comes before the source ends the connection
                pass
        except OSError:
            pass
        self.ended[join.lane] = time.monotonic()

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.server.close()


@pytest.mark.parametrize("how", ["refused", "cancelled", "negative-control-lanes-left-open"])
def test_no_further_connection_outlives_a_failed_opening(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """Connection 2 of 4 has joined, 3 is refused (or the migration is cancelled), 4 waits for an
    answer that never comes: every one of them is ended at once, the joined one included, and
    4's thread is not left waiting out the handshake timeout (30 s here). Seen from the
    destination's side of the sockets. Before the further connections were threads of their
    own, a joined connection outlived a migration cancelled twice while the others were opened
    (found by an adversarial review). Negative control: lanes whose close() does nothing leave
    every connection open, and the check fails."""
    if how.startswith("negative"):
        monkeypatch.setattr(SendLane, "close", lambda self: None)

    async def main() -> FurtherListener:
        guest = SimpleNamespace(
            name="g", definition=GuestDefinition("g", 1, 0), handle=1, agent=object(), state=GuestState.RUNNING,
            firmware=SimpleNamespace(transport_mode=TransportMode.BOUND), channel=None,
            vm=SimpleNamespace(migration_ready=True, msr_migration_control=1, on_migration_control_change=None))
        migration = OutgoingMigration(guest, "127.0.0.1", 1,  # type: ignore[arg-type]
                                      MigrationParams(connections=4, handshake_timeout_s=30.0))
        _, dest = established(migration.session)
        listener = FurtherListener(dest, refuse=how != "cancelled")
        migration._proto = Lane(listener.address)  # type: ignore[assignment]
        task = asyncio.ensure_future(migration._open_lanes())
        if how == "cancelled":
            await asyncio.to_thread(listener.joined.wait, 10)
            task.cancel()
        with pytest.raises((MigrationFailed, asyncio.CancelledError)) as failure:
            await asyncio.wait_for(task, 10)
        if how == "refused":
            assert re.search(r"connection 3 of 4 .* was refused: injected", str(failure.value)), failure.value
        return listener

    started = time.monotonic()
    listener = asyncio.run(main())
    try:
        deadline = time.monotonic() + 3
        while len(listener.ended) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        if how.startswith("negative"):  # the refused one ends itself; the joined and the waiting stay
            assert {1, 3}.isdisjoint(listener.ended), listener.ended
            return
        assert sorted(listener.ended) == [1, 2, 3], f"still open: {sorted({1, 2, 3} - set(listener.ended))}"
        assert max(listener.ended.values()) - started < 5
    finally:
        listener.close()


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
