"""One outgoing connection's ordered frame queue (migd/send_lane.py), without firmware; a socket
only where a further connection's thread writes its own frames.

Frames must leave in the order they were queued whatever order their sealing finishes in (a
page's versions must never overtake each other on a connection), the queue must stay bounded,
and a failed seal must end the migration at the loop's next wait.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from typing import Any

import pytest

from migd import wire
from migd.abi import PAGE_SIZE
from migd.page_runs import PageKind
from migd.lane_socket import LaneSocket
from migd.send_lane import MAX_PENDING, RUN_BYTES, SendLane, SendLaneError
from test_lane_socket import JOIN, Peer


def _put(lane: SendLane, gpa: int, npages: int, gate: threading.Event | None = None, fail: bool = False,
         abandon: bool = False) -> None:
    """A private run's job, as the source queues one: it may be held, fail, or be abandoned."""
    def job() -> wire.PrivatePages | None:
        if gate is not None:
            assert gate.wait(5)
        if fail:
            raise RuntimeError("injected: sealing failed")
        if abandon:
            return None
        return wire.PrivatePages(gpa, npages, bytes(52), bytes(npages * PAGE_SIZE))

    lane.put_private(job, gpa, npages, in_ring=False)


class _Connection:
    """Records what the lane writes, as the source's write callback does."""

    def __init__(self) -> None:
        self.written: list[tuple[PageKind, int]] = []
        self.position = 0

    def write(self, msg: wire.Message, kind: PageKind, gpa: int, npages: int, header: bytes,
              nbytes: int | None) -> int:
        assert nbytes is None  # no socket of its own: the loop writes
        self.written.append((kind, gpa))
        self.position += npages * PAGE_SIZE
        return self.position

    def consumed(self) -> int:
        return self.position  # the transport sends at once


def _lane(connection: _Connection) -> SendLane:
    return SendLane(1, connection.write, connection.consumed, transport_bytes=1 << 20)


def _run(main: Any) -> None:
    asyncio.run(asyncio.wait_for(main(), 10))


def test_frames_leave_in_queue_order_whatever_order_sealing_ends_in() -> None:
    async def main() -> None:
        connection, held = _Connection(), threading.Event()
        lane = _lane(connection)
        try:
            _put(lane, 0, 1, gate=held)  # its SEND_UPDATE_DATA takes a while
            lane.submit()
            lane.put_ready(wire.SharedPages(0, 1, bytes(PAGE_SIZE)), PageKind.SHARED, 0, 1)  # the same page, newer
            lane.put_ready(wire.ZeroPages(PAGE_SIZE, 1), PageKind.ZERO, PAGE_SIZE, 1)
            await asyncio.sleep(0.05)
            assert connection.written == []  # nothing overtakes the run still being sealed
            held.set()
            await lane.flush(5)
            assert connection.written == [(PageKind.PRIVATE, 0), (PageKind.SHARED, 0), (PageKind.ZERO, PAGE_SIZE)]
        finally:
            lane.close()

    _run(main)


def test_negative_control_without_the_gate_the_order_is_the_same() -> None:
    """The set-up above does not force the order by itself: unheld, the frames go at once."""
    async def main() -> None:
        connection = _Connection()
        lane = _lane(connection)
        try:
            lane.put_ready(wire.ZeroPages(0, 1), PageKind.ZERO, 0, 1)
            assert connection.written == [(PageKind.ZERO, 0)]  # ready and first: written on the spot
        finally:
            lane.close()

    _run(main)


def test_a_full_queue_waits_for_room() -> None:
    async def main() -> None:
        connection, held = _Connection(), threading.Event()
        lane = _lane(connection)
        try:
            for i in range(MAX_PENDING):
                _put(lane, i * RUN_BYTES, RUN_BYTES // PAGE_SIZE, gate=held)
            with pytest.raises(TimeoutError):
                await lane.room(0.1)  # MAX_PENDING runs of 2 MiB wait: no room
            held.set()
            await lane.room(5)
            assert lane.pending == 0 and len(connection.written) == MAX_PENDING
        finally:
            lane.close()

    _run(main)


def test_a_failed_seal_ends_the_migration_at_the_next_wait() -> None:
    async def main() -> None:
        connection = _Connection()
        lane = _lane(connection)
        try:
            _put(lane, 0, 1, fail=True)
            _put(lane, PAGE_SIZE, 1)
            with pytest.raises(SendLaneError, match="connection 2: injected"):
                await lane.flush(5)
            assert connection.written == []  # not even the run behind it
        finally:
            lane.close()

    _run(main)


def test_an_abandoned_run_is_skipped_and_the_frames_behind_it_go() -> None:
    async def main() -> None:
        connection = _Connection()
        lane = _lane(connection)
        try:
            _put(lane, 0, 1, abandon=True)
            _put(lane, PAGE_SIZE, 1)
            await lane.flush(5)
            assert connection.written == [(PageKind.PRIVATE, PAGE_SIZE)] and lane.abandoned == 1
        finally:
            lane.close()

    _run(main)


def test_a_closed_lane_lets_its_ring_go() -> None:
    """The daemon keeps every finished migration (its record) and with it the SendLanes; a lane
    that kept its ring after close() held transport_bytes + 3 x 2 MiB (20 MiB with two
    connections) of written memory per finished migration. Found by an adversarial review."""

    async def main() -> tuple[SendLane, weakref.ref[Any]]:
        conn = _Connection()
        lane = SendLane(0, conn.write, conn.consumed, transport_bytes=4 << 20)
        ring = weakref.ref(lane._ring)
        out, in_ring = lane.buffer(PAGE_SIZE)
        assert in_ring
        out[:] = bytes(PAGE_SIZE)
        lane.put_ready(wire.SharedPages(0, 1, out), PageKind.SHARED, 0, 1, in_ring)
        await lane.flush(5)
        del out
        lane.close()
        lane.pump()  # a wake-up that arrives after the end touches nothing
        return lane, ring

    lane, ring = asyncio.run(main())  # the lane lives on, as in a finished migration's record
    gc.collect()
    assert ring() is None, "a closed lane still holds its payload ring"
    assert lane.pending == 0


class _Accounts:
    """The source's callback for a lane whose thread writes: records what it is told, and where."""

    def __init__(self) -> None:
        self.told: list[tuple[PageKind, int, int | None, int]] = []  # kind, gpa, nbytes, thread

    def write(self, msg: wire.Message, kind: PageKind, gpa: int, npages: int, header: bytes,
              nbytes: int | None) -> int:
        self.told.append((kind, gpa, nbytes, threading.get_ident()))
        return 0


def test_a_further_connection_is_written_by_its_thread_in_queue_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a socket of its own, the lane's thread writes every frame (shared and zero ones in
    their turn among the sealed runs), never the event loop; the loop is told each frame's bytes,
    in order, and only accounts for it. Negative control: a lane without a socket is written by
    the loop's callback, on the loop's thread."""
    writers: list[int] = []
    write = LaneSocket.write

    def recording_write(self: LaneSocket, msg: wire.Message) -> int:
        writers.append(threading.get_ident())
        return write(self, msg)

    monkeypatch.setattr(LaneSocket, "write", recording_write)
    peer = Peer()

    async def main() -> None:
        loop_thread = threading.get_ident()
        accounts, socket_ = _Accounts(), LaneSocket(1)
        lane = SendLane(1, accounts.write, socket_.bytes_consumed, transport_bytes=RUN_BYTES, socket=socket_)
        try:
            assert isinstance(await lane.run_in_thread(lambda: socket_.open(peer.address, JOIN, None, "x", 5.0)),
                              wire.Joined)
            held = threading.Event()
            _put(lane, 0, 1, gate=held)
            lane.put_ready(wire.SharedPages(0, 1, b"\x07" * PAGE_SIZE), PageKind.SHARED, 0, 1)
            lane.put_ready(wire.ZeroPages(PAGE_SIZE, 3), PageKind.ZERO, PAGE_SIZE, 3)
            lane.submit()
            _put(lane, 4 * PAGE_SIZE, 2)
            lane.submit()
            await asyncio.sleep(0.05)
            assert writers == [] and accounts.told == []  # nothing overtakes the run being sealed
            held.set()
            await lane.flush(5)
            assert len(writers) == 4 and loop_thread not in writers and len(set(writers)) == 1
            assert [(kind, gpa) for kind, gpa, _, _ in accounts.told] == [
                (PageKind.PRIVATE, 0), (PageKind.SHARED, 0), (PageKind.ZERO, PAGE_SIZE), (PageKind.PRIVATE, 4 * PAGE_SIZE)]
            assert all(nbytes is not None and thread == loop_thread for _, _, nbytes, thread in accounts.told)
            assert sum(nbytes or 0 for _, _, nbytes, _ in accounts.told) == socket_.bytes_sent
        finally:
            lane.close()
        peer.thread.join(10)
        assert [type(m) for m in peer.frames] == [wire.Join, wire.PrivatePages, wire.SharedPages, wire.ZeroPages,
                                                  wire.PrivatePages]

        # The control: no socket, the loop writes.
        connection = _Connection()
        plain = _lane(connection)
        try:
            plain.put_ready(wire.ZeroPages(0, 1), PageKind.ZERO, 0, 1)
            await plain.flush(5)
            assert connection.written == [(PageKind.ZERO, 0)] and len(writers) == 4
        finally:
            plain.close()

    try:
        _run(main)
    finally:
        peer.close()
