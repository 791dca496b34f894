"""One outgoing connection's ordered frame queue (migd/send_lane.py), without a socket or firmware.

Frames must leave in the order they were queued whatever order their sealing finishes in (a
page's versions must never overtake each other on a connection), the queue must stay bounded,
and a failed seal must end the migration at the loop's next wait.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from migd import wire
from migd.abi import PAGE_SIZE
from migd.page_runs import PageKind
from migd.send_lane import MAX_PENDING, RUN_BYTES, SendLane, SendLaneError


class _Packet:
    """What SendLane needs of a DeferredPacket: its run, and a seal() that may be held or fail."""

    def __init__(self, gpa: int, npages: int, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.gpa, self.npages, self._gate, self._fail = gpa, npages, gate, fail

    def seal(self) -> tuple[bytes, memoryview]:
        if self._gate is not None:
            assert self._gate.wait(5)
        if self._fail:
            raise RuntimeError("injected: sealing failed")
        return bytes(52), memoryview(bytes(self.npages * PAGE_SIZE))


class _Connection:
    """Records what the lane writes, as the source's write callback does."""

    def __init__(self) -> None:
        self.written: list[tuple[PageKind, int]] = []
        self.position = 0

    def write(self, msg: wire.Message, kind: PageKind, gpa: int, npages: int, header: bytes) -> int:
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
            lane.put_private(_Packet(0, 1, gate=held), in_ring=False)  # its MAC takes a while
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
                lane.put_private(_Packet(i * RUN_BYTES, RUN_BYTES // PAGE_SIZE, gate=held), in_ring=False)
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
            lane.put_private(_Packet(0, 1, fail=True), in_ring=False)
            lane.put_private(_Packet(PAGE_SIZE, 1), in_ring=False)
            with pytest.raises(SendLaneError, match="connection 2: injected"):
                await lane.flush(5)
            assert connection.written == []  # not even the run behind it
        finally:
            lane.close()

    _run(main)
