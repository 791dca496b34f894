"""The source's send loop (OutgoingMigration._send_extents) over a sparse guest, without sockets.

A recording stream stands in for the connection; what it recorded is replayed into a
destination through the destination's firmware, and the two guests are compared.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from migd import source, wire
from migd.platform import identity
from migd.abi import PAGE_SIZE
from migd.bitmap import PageBitmap
from migd.guest.host_guest import GuestDefinition, GuestState
from migd.platform.memory import GuestRam, MemoryEncryption
from migd.lane_socket import LaneSocket
from migd.page_runs import CHUNK_PAGES, HOLE_STEP_PAGES, STRIPE_PAGES, PageRun, classify
from migd.errors import FirmwareError
from migd.platform.psp import PspFirmware
from migd.send_lane import MAX_QUEUED_FRAMES, RUN_BYTES, SendLane
from migd.sev_transport import TransportMode
from migd.source import MigrationParams, OutgoingMigration
from session_pair import established

NPAGES = 3 * HOLE_STEP_PAGES // 2  # 192 MiB of guest, sparse: the file holds a few MiB
PRIVATE_RUNS = [(0, 300), (20_000, 1), (40_000, 8)]  # (first page, pages); 20_000 sits deep in a hole
SHARED_RUNS = [(301, 2), (HOLE_STEP_PAGES + 5, 1)]


@dataclass
class Sent:
    kind: type
    gpa: int
    npages: int
    header: bytes | None
    payload: bytes


class RecordingStream:
    """What _send_extents needs of a FrameProtocol; frames are encoded (sizes count) and kept."""

    def __init__(self) -> None:
        self.encoder = wire.FrameEncoder()
        self.sent: list[Sent] = []
        self.bytes_sent = 0

    def write(self, msg: wire.Message) -> int:
        parts = self.encoder.encode(msg)
        nbytes = sum(len(p) for p in parts)
        self.bytes_sent += nbytes
        header = getattr(msg, "header", None)
        self.sent.append(Sent(type(msg), msg.gpa, msg.npages, None if header is None else bytes(header),
                              bytes(getattr(msg, "payload", b""))))
        return nbytes

    def write_buffer_size(self) -> int:
        return 0

    def bytes_consumed(self) -> int:
        return self.bytes_sent

    async def drain(self) -> None:
        return None


class LaggingStream(RecordingStream):
    """A transport that holds each frame's buffers (no copy) until ``lag`` later frames came.

    A payload is read only when the frame leaves, as uvloop does with a queued write: a buffer
    the source reused before that is what gets sent. ``honest=False`` reports everything
    consumed at once (the fault the source's ring must not fall for).
    """

    def __init__(self, lag: int, honest: bool = True) -> None:
        super().__init__()
        self.lag, self.honest = lag, honest
        self.queued: list[tuple[wire.Message, list[bytes | memoryview], int]] = []
        self.queued_bytes = 0

    def write(self, msg: wire.Message) -> int:
        parts = self.encoder.encode(msg)
        nbytes = sum(len(p) for p in parts)
        self.bytes_sent += nbytes
        self.queued.append((msg, parts, nbytes))
        self.queued_bytes += nbytes
        while len(self.queued) > self.lag:
            self._leave()
        return nbytes

    def _leave(self) -> None:
        msg, parts, nbytes = self.queued.pop(0)
        self.queued_bytes -= nbytes
        header = getattr(msg, "header", None)
        self.sent.append(Sent(type(msg), msg.gpa, msg.npages, None if header is None else bytes(header),
                              bytes(getattr(msg, "payload", b""))))

    def flush(self) -> None:
        while self.queued:
            self._leave()

    def write_buffer_size(self) -> int:
        return self.queued_bytes if self.honest else 0

    def bytes_consumed(self) -> int:
        return self.bytes_sent - self.write_buffer_size()


def _firmwares(root: Path) -> tuple[PspFirmware, PspFirmware]:
    for host in ("hostA", "hostB"):
        identity.init_host(root / host, root / "ca", common_name=host)
    anchors = [root / "ca" / identity.CA_CERT]
    return PspFirmware.from_state_dir(root / "hostA", anchors), PspFirmware.from_state_dir(root / "hostB", anchors)


def test_sparse_guest_sends_holes_as_zero_runs_and_every_populated_page(
        shm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = _firmwares(shm_dir)
    handle = a.launch(0)
    engine = MemoryEncryption(a.guest_key(handle))
    shared = PageBitmap(NPAGES)
    with GuestRam(shm_dir / "src.ram", NPAGES, create=True) as src, \
            GuestRam(shm_dir / "dst.ram", NPAGES, create=True) as dst:
        for first, count in PRIVATE_RUNS:
            engine.write_private(src, first * PAGE_SIZE, os.urandom(count * PAGE_SIZE))
        for first, count in SHARED_RUNS:
            shared.set_range(first, count)
            src.write(first * PAGE_SIZE, os.urandom(count * PAGE_SIZE))
        allocated = os.stat(src.path).st_blocks
        guest = SimpleNamespace(
            name="g", definition=GuestDefinition("g", NPAGES * PAGE_SIZE >> 20, 0), ram=src, firmware=a, handle=handle,
            vm=SimpleNamespace(shared_bitmap=shared, migration_ready=True), agent=object(), state=GuestState.RUNNING,
        )
        migration = OutgoingMigration(guest, "127.0.0.1", 1)  # type: ignore[arg-type]
        established(migration.session)
        stream = RecordingStream()
        migration._proto = stream  # type: ignore[assignment]
        migration._lanes, migration._rings = [stream], [None]  # type: ignore[list-item]
        start = a.send_start(handle, b.pdh_cert_pem)
        classified: list[tuple[int, int]] = []

        def counting_classify(bitmap: PageBitmap, ram: GuestRam, first: int, count: int) -> list[PageRun]:
            classified.append((first, count))
            return classify(bitmap, ram, first, count)

        monkeypatch.setattr(source, "classify", counting_classify)
        sent = asyncio.run(migration._send_extents(np.array([0]), np.array([NPAGES])))

        assert sent == NPAGES
        # Every page exactly once, in order.
        pos = 0
        for frame in stream.sent:
            assert frame.gpa == pos * PAGE_SIZE
            pos += frame.npages
        assert pos == NPAGES
        kinds = np.zeros(NPAGES, dtype=np.int8)  # 0 zero, 1 private, 2 shared
        for frame in stream.sent:
            first = frame.gpa // PAGE_SIZE
            kinds[first : first + frame.npages] = {wire.ZeroPages: 0, wire.PrivatePages: 1, wire.SharedPages: 2}[
                frame.kind]
        expected = np.zeros(NPAGES, dtype=np.int8)
        for first, count in PRIVATE_RUNS:
            expected[first : first + count] = 1
        for first, count in SHARED_RUNS:
            expected[first : first + count] = 2
        assert (kinds == expected).all()  # the lone page deep in the hole was not skipped
        # The holes went as the largest zero runs the wire allows, without classifying them ...
        zero_frames = [f for f in stream.sent if f.kind is wire.ZeroPages]
        assert max(f.npages for f in zero_frames) == wire.MAX_RUN_PAGES
        assert len(zero_frames) < NPAGES // wire.MAX_RUN_PAGES + 2 * (len(PRIVATE_RUNS) + len(SHARED_RUNS))
        assert 0 < len(classified) <= 2 * (len(PRIVATE_RUNS) + len(SHARED_RUNS)) < NPAGES // CHUNK_PAGES
        # ... and were never read: reading a tmpfs hole through the mapping allocates it.
        assert os.stat(src.path).st_blocks == allocated

        # Replayed into a destination, the guest arrives whole.
        dst_handle = b.receive_start(start.policy, start.pdh_cert_pem, start.session_blob)
        for frame in stream.sent:
            if frame.kind is wire.PrivatePages:
                assert frame.header is not None
                b.receive_update_data(dst_handle, dst, frame.gpa, frame.npages, frame.header, frame.payload)
            elif frame.kind is wire.SharedPages:
                dst.write(frame.gpa, frame.payload)
        for first, count in PRIVATE_RUNS:
            gpa = first * PAGE_SIZE
            assert b.dbg_decrypt(dst_handle, dst, gpa, count) == a.dbg_decrypt(handle, src, gpa, count)
        for first, count in SHARED_RUNS:
            assert dst.read(first * PAGE_SIZE, count) == src.read(first * PAGE_SIZE, count)
        assert not dst.nonzero_pages(0, NPAGES)[expected == 0].any()


def test_a_guest_write_into_a_hole_is_seen_by_the_next_step(shm_dir: Path) -> None:
    """Holes are looked up step by step, at send time, never planned ahead."""
    a, b = _firmwares(shm_dir)
    handle = a.launch(0)
    with GuestRam(shm_dir / "src.ram", NPAGES, create=True) as src:
        guest = SimpleNamespace(
            name="g", definition=GuestDefinition("g", NPAGES * PAGE_SIZE >> 20, 0), ram=src, firmware=a, handle=handle,
            vm=SimpleNamespace(shared_bitmap=PageBitmap(NPAGES), migration_ready=True), agent=object(),
            state=GuestState.RUNNING,
        )
        migration = OutgoingMigration(guest, "127.0.0.1", 1)  # type: ignore[arg-type]
        established(migration.session)
        stream = RecordingStream()
        late_page = NPAGES - 10
        real_write = stream.write

        def write_then_guest_writes(msg: wire.Message) -> int:
            if not any(f.gpa == 0 for f in stream.sent):  # right after the first frame goes out
                MemoryEncryption(a.guest_key(handle)).write_private(src, late_page * PAGE_SIZE, b"\x07" * PAGE_SIZE)
            return real_write(msg)

        stream.write = write_then_guest_writes  # type: ignore[method-assign]
        migration._proto = stream  # type: ignore[assignment]
        migration._lanes, migration._rings = [stream], [None]  # type: ignore[list-item]
        a.send_start(handle, b.pdh_cert_pem)
        asyncio.run(migration._send_extents(np.array([0]), np.array([NPAGES])))
        (late,) = [f for f in stream.sent if f.gpa <= late_page * PAGE_SIZE < f.gpa + f.npages * PAGE_SIZE]
        assert late.kind is wire.PrivatePages


@pytest.mark.parametrize("honest", [True, False], ids=["transport-counts-queued-bytes", "negative-control"])
def test_payload_buffers_are_reused_only_after_the_transport_sent_them(
        shm_dir: Path, monkeypatch: pytest.MonkeyPatch, honest: bool) -> None:
    """Frames wait in the transport while later runs are read: every payload must arrive intact.

    The ring is made small (1 MiB) so that it wraps many times over the 8 MiB guest of short
    alternating private and shared runs. Negative control: a transport that claims its queue
    is empty lets the ring lend a queued frame's region again, and the replay must catch it.
    """
    npages = 2048
    a, b = _firmwares(shm_dir)
    handle = a.launch(0)
    engine = MemoryEncryption(a.guest_key(handle))
    shared = PageBitmap(npages)
    monkeypatch.setattr(source, "SEND_RING_BYTES", 1 << 20)
    with GuestRam(shm_dir / "src.ram", npages, create=True) as src, \
            GuestRam(shm_dir / "dst.ram", npages, create=True) as dst:
        engine.write_private(src, 0, os.urandom(npages * PAGE_SIZE))
        for first in range(0, npages, 24):  # runs of 8 shared, 16 private pages
            shared.set_range(first, 8)
            src.write(first * PAGE_SIZE, os.urandom(8 * PAGE_SIZE))
        guest = SimpleNamespace(
            name="g", definition=GuestDefinition("g", npages * PAGE_SIZE >> 20, 0), ram=src, firmware=a, handle=handle,
            vm=SimpleNamespace(shared_bitmap=shared, migration_ready=True), agent=object(), state=GuestState.RUNNING,
        )
        migration = OutgoingMigration(guest, "127.0.0.1", 1)  # type: ignore[arg-type]
        established(migration.session)
        stream = LaggingStream(lag=5, honest=honest)
        migration._proto = stream  # type: ignore[assignment]
        migration._lanes, migration._rings = [stream], [None]  # type: ignore[list-item]
        start = a.send_start(handle, b.pdh_cert_pem)
        asyncio.run(migration._send_extents(np.array([0]), np.array([npages])))
        stream.flush()
        ring = migration._rings[0]
        assert ring is not None and ring.lent > 100 and ring.lent * 8 * PAGE_SIZE > 4 * ring.capacity

        dst_handle = b.receive_start(start.policy, start.pdh_cert_pem, start.session_blob)
        intact = True
        for frame in stream.sent:
            if frame.kind is wire.PrivatePages:
                assert frame.header is not None
                try:
                    b.receive_update_data(dst_handle, dst, frame.gpa, frame.npages, frame.header, frame.payload)
                except FirmwareError:
                    intact = False
                    break
            elif frame.kind is wire.SharedPages:
                dst.write(frame.gpa, frame.payload)
        for first in range(0, npages, 24):
            shared_gpa, private_gpa = first * PAGE_SIZE, (first + 8) * PAGE_SIZE
            intact &= dst.read(shared_gpa, 8) == src.read(shared_gpa, 8)
            if intact and first + 8 < npages:
                count = min(16, npages - first - 8)
                intact &= b.dbg_decrypt(dst_handle, dst, private_gpa, count) == a.dbg_decrypt(
                    handle, src, private_gpa, count)
        assert intact is honest, "a region reused before its frame left went unnoticed" if not honest else ""


@pytest.mark.parametrize("checked", [True, False], ids=["every-connection-checked", "negative-control-unchecked"])
def test_zero_runs_behind_a_stuck_connection_stay_bounded(shm_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                          checked: bool) -> None:
    """A sparse 4 GiB guest over 3 connections (the first for control frames, the stripes on the
    other two) whose third one does not move (its thread is busy: a peer that stopped reading).
    A step of holes queues zero runs on both page connections, and every hole step starts on the
    second (64 stripes each), so waiting for room on the step's own connection never looks at the
    third: it queued every one of its zero runs (1024 here, a Python entry each; a 1 TiB guest's
    would be 256 K). Now it holds at most MAX_QUEUED_FRAMES and a step's worth. Negative control:
    lanes that never say they are crowded let the queue take them all."""
    if not checked:
        monkeypatch.setattr(SendLane, "crowded", property(lambda self: False))
    npages = 4 << 18  # 4 GiB, all holes
    with GuestRam(shm_dir / "sparse.ram", npages, create=True) as ram:
        guest = SimpleNamespace(
            name="g", definition=GuestDefinition("g", npages * PAGE_SIZE >> 20, 0), ram=ram, handle=1,
            firmware=SimpleNamespace(transport_mode=TransportMode.BOUND),
            vm=SimpleNamespace(shared_bitmap=PageBitmap(npages), migration_ready=True), agent=object(),
            state=GuestState.RUNNING,
        )
        migration = OutgoingMigration(guest, "127.0.0.1", 1, MigrationParams(connections=3))  # type: ignore[arg-type]
        established(migration.session)
        migration.session._joined |= {1, 2}  # as after both JOINEDs
        stream, gate = RecordingStream(), threading.Event()

        async def main() -> int:
            control, first = (SendLane(i, functools.partial(migration._lane_written, i), stream.bytes_consumed,
                                       transport_bytes=RUN_BYTES) for i in (0, 1))
            stuck = SendLane(2, lambda *args: 0, lambda: 0, transport_bytes=RUN_BYTES, socket=LaneSocket(2))
            busy = stuck.run_in_thread(lambda: gate.wait(20))
            migration._proto = stream  # type: ignore[assignment]
            migration._lanes = [stream, stream, stuck.socket]  # type: ignore[list-item]
            migration._rings = [None, None, None]
            migration._send_lanes, migration._resend = [control, first, stuck], PageBitmap(npages)
            task = asyncio.ensure_future(migration._send_extents(np.array([0]), np.array([npages])))
            try:
                most, still = 0, 0
                while (still < 20 or most == 0) and not task.done():  # until the queue stops growing (0.2 s)
                    await asyncio.sleep(0.01)
                    still = still + 1 if stuck.pending == most else 0
                    most = max(most, stuck.pending)
                # Held back by the stuck connection (not ended by an error, which would also stop the queue).
                assert task.done() is not checked, task
                return most
            finally:
                task.cancel()
                gate.set()
                await busy
                for lane in migration._send_lanes:
                    lane.close()

        most = asyncio.run(asyncio.wait_for(main(), 20))
    per_lane = npages // STRIPE_PAGES // 2
    if checked:
        assert most <= MAX_QUEUED_FRAMES + HOLE_STEP_PAGES // CHUNK_PAGES, most
    else:
        assert most == per_lane, (most, per_lane)
