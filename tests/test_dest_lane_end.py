"""The end of a further connection while the destination waits at a barrier, driven step by step.

A source that aborts writes ABORT on the first connection (behind the page frames still queued
there) and then closes the others. Whichever end the destination handles first, the source's
reason must be the migration's: the end of a further connection waits ``LANE_END_GRACE_S`` for
the ABORT (docs/protocol.md "Several connections", Failures). Found by an adversarial review:
outside a barrier the grace held, but a ROUND_END/PING barrier (``_lanes_placed``) made the
closed connection the reason at once. The first connection is driven without sockets; the
further one is a LaneReceiver on one end of a socket pair, whose end this side waits to see
before it goes on. The order is forced by loop steps (a poll interval of 0, a grace of 30 s),
never by timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest

from migd import dest, lane_receiver, wire
from migd.bitmap import PageBitmap
from migd.dest import IncomingMigration
from migd.abi import PAGE_SIZE
from migd.errors import PeerAborted, ProtocolError
from migd.lane_receiver import LaneReceiver
from migd.migration_state import MigrationPhase
from migd.progress import MigrationProgress
from migd.source_session import SourceSession
from migd.stream import FrameProtocol, StreamClosed
from session_pair import established
from test_stream import FakeTransport, _feed

MIGRATION_ID = "m-lane-end"
NPAGES = 1024  # two stripes, both on connection 2 (connection 1 carries the control frames)
STRIPE = 512
GUEST = wire.GuestSpec("g", NPAGES, 0)
WAIT = 10.0


def _connected(proto: FrameProtocol) -> FakeTransport:
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    return transport


class _Pair:
    """One authenticated 2-connection migration: the source's session and the destination's
    IncomingMigration (no guest: no page is placed here)."""

    def __init__(self) -> None:
        now = time.monotonic()
        self.host = SimpleNamespace(lane_servers={})
        self.main = FrameProtocol()
        _connected(self.main)
        self.incoming = IncomingMigration(self.host, self.main, "peer")  # type: ignore[arg-type]
        self.source = SourceSession(MIGRATION_ID, GUEST, "bound", MigrationPhase(started_at=now), now, connections=2)
        established(source=self.source, dest=self.incoming.session, now=now)
        inc = self.incoming
        inc.progress = MigrationProgress("g", "destination", "peer", NPAGES, id=MIGRATION_ID)
        inc._received = PageBitmap(NPAGES)
        inc._placed = [0] * inc.session.connections
        self.host.lane_servers[MIGRATION_ID] = inc._admit_lane
        self.main_enc = wire.FrameEncoder()  # the source's side of connection 1
        self.peer_end, ours = socket.socketpair()  # connection 2: the source's end, the destination's
        self.lane = LaneReceiver(ours, "peer")

    async def join(self) -> asyncio.Future[None]:
        """Connection 2 opens, its JOIN is admitted and JOINED comes back (returns its end)."""
        self.peer_end.sendall(wire.LANE_PREAMBLE + wire.FrameEncoder().encode_bytes(self.source.join(1)))
        join = await self.lane.open(None, WAIT)
        ended = self.incoming._admit_lane(self.lane, join)
        self.peer_end.settimeout(WAIT)
        joined = wire.FrameDecoder().feed(self.peer_end.recv(4096))
        assert 1 in self.incoming._lanes and [type(m) for m in joined] == [wire.Joined], "connection 2 did not join"
        return ended

    async def close_lane(self) -> None:
        """The source ends connection 2; returns once the destination's loop has heard of it."""
        self.peer_end.shutdown(socket.SHUT_WR)
        async with asyncio.timeout(WAIT):
            while self.lane.close_reason is None:
                await asyncio.sleep(0)

    async def end(self, ended: asyncio.Future[None]) -> None:
        self.incoming._end_lanes()
        await asyncio.wait_for(ended, WAIT)
        self.main.connection_lost(None)
        self.peer_end.close()


@pytest.mark.parametrize("at_barrier", [True, False], ids=["at-a-barrier", "outside-a-barrier"])
def test_the_sources_abort_is_the_reason_when_a_further_connection_ends_first(
        at_barrier: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dest, "LANE_END_GRACE_S", 30.0)  # the ABORT below comes well within it
    monkeypatch.setattr(dest, "_LANE_POLL_S", 0.0)  # one barrier look per loop step

    async def main() -> None:
        pair = _Pair()
        serving = await pair.join()
        inc = pair.incoming
        # ROUND_END said: one page frame on connection 2 before it, and none has arrived.
        barrier = asyncio.ensure_future(inc._lanes_placed((1,))) if at_barrier else None
        await asyncio.sleep(0)
        await pair.close_lane()  # connection 2's end is handled first ...
        for _ in range(3):
            await asyncio.sleep(0)  # ... and the barrier looks again before the ABORT is read
        assert barrier is None or not barrier.done()
        _feed(pair.main, pair.main_enc.encode_bytes(wire.Abort("cancelled by the operator")))
        try:
            if barrier is not None:
                await asyncio.wait_for(barrier, WAIT)  # returns: the ABORT behind it is the reason
            with pytest.raises(PeerAborted, match="cancelled by the operator"):
                await inc._next()
        finally:
            await pair.end(serving)

    asyncio.run(main())


def test_a_further_connection_that_ends_for_good_fails_the_barrier_after_the_grace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The other side of the grace: with no ABORT, the closed connection is the reason."""
    monkeypatch.setattr(dest, "LANE_END_GRACE_S", 0.05)
    monkeypatch.setattr(dest, "_LANE_POLL_S", 0.001)

    async def main() -> None:
        pair = _Pair()
        serving = await pair.join()
        try:
            barrier = asyncio.ensure_future(pair.incoming._lanes_placed((1,)))
            await asyncio.sleep(0)
            await pair.close_lane()
            with pytest.raises(StreamClosed, match="connection 2 of 2 ended with 1 page frames still to come"):
                await asyncio.wait_for(barrier, WAIT)
        finally:
            await pair.end(serving)

    asyncio.run(main())


async def _failed_and_discarding(inc: IncomingMigration, cause: Exception) -> tuple[asyncio.Future[Any], asyncio.Event]:
    """Run ``inc`` until it fails with ``cause`` and is discarding its partial guest, which stands
    for the agent's shutdown and lasts until the returned event is set; returns (its run, that event)."""
    discarding, release = asyncio.Event(), asyncio.Event()

    async def receive() -> None:
        raise cause

    async def discard(reason: str) -> None:  # the partial guest goes (agent, RAM, context)
        discarding.set()
        await release.wait()
        inc.session.fail(reason, time.monotonic())

    inc._receive = receive  # type: ignore[method-assign]
    inc._discard = discard  # type: ignore[method-assign]
    running = asyncio.ensure_future(inc.run())
    await asyncio.wait_for(discarding.wait(), WAIT)
    return running, release


def test_a_failed_migration_places_nothing_more_and_takes_no_join_while_it_discards(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The migration fails (here: its first connection broke) and discards the partial guest,
    which takes real time (the agent's shutdown; held open here). Meanwhile connection 2's thread
    places no more frames and no JOIN is taken for the migration: its further connections are
    released before the discard, not after (found by an adversarial review). Control: before the
    failure the same connection places the same kind of frame."""
    placed: list[int] = []
    monkeypatch.setattr(IncomingMigration, "_place_run", lambda self, msg, kind, lane=0: placed.append(msg.gpa))

    async def main() -> None:
        pair = _Pair()
        inc = pair.incoming
        await pair.join()
        enc = wire.FrameEncoder()
        enc.encode_bytes(pair.source.join(1))  # the source's frame sequence on connection 2: JOIN was frame 0
        pair.peer_end.sendall(enc.encode_bytes(wire.ZeroPages(0, 1)))
        async with asyncio.timeout(WAIT):
            while not placed:
                await asyncio.sleep(0.01)
        assert placed == [0], "the control: connection 2 places its frames"
        running, release = await _failed_and_discarding(inc, StreamClosed("the first connection broke"))
        try:
            assert MIGRATION_ID not in pair.host.lane_servers, "JOINs are still taken while the guest is discarded"
            with contextlib.suppress(OSError):  # the destination may have closed it already
                pair.peer_end.sendall(enc.encode_bytes(wire.ZeroPages(2 * STRIPE, 1)))
            await asyncio.sleep(0.3)
            assert placed == [0], f"frames placed while the failed migration discarded its guest: {placed}"
        finally:
            release.set()
            await asyncio.wait_for(running, WAIT)
            pair.peer_end.close()

    asyncio.run(main())


def test_a_join_answered_after_its_thread_gave_up_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop answers JOIN late (it lagged past the thread's wait for the verdict): the answer
    is refused (the listener counts it) and the lane is not taken, so no barrier waits for a
    connection whose thread and socket are gone (found by an adversarial review)."""
    monkeypatch.setattr(lane_receiver, "VERDICT_MARGIN_S", 0.0)

    async def main() -> None:
        pair = _Pair()
        pair.peer_end.sendall(wire.LANE_PREAMBLE + wire.FrameEncoder().encode_bytes(pair.source.join(1)))
        join = await pair.lane.open(None, 0.3)  # JOIN read; the thread waits at most 0.3 s for the answer
        async with asyncio.timeout(WAIT):
            while pair.lane.close_reason is None:  # it gave up, and the loop heard of it
                await asyncio.sleep(0.01)
        with pytest.raises(StreamClosed, match="ended before its JOIN was answered"):
            pair.incoming._admit_lane(pair.lane, join)
        assert 1 not in pair.incoming._lanes
        pair.peer_end.settimeout(WAIT)
        assert pair.peer_end.recv(4096) == b"", "no JOINED went out"
        pair.incoming._end_lanes()
        pair.main.connection_lost(None)
        pair.peer_end.close()

    asyncio.run(main())


def test_with_one_connection_a_failed_migration_places_nothing_more_while_it_discards(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The same with one connection, whose page frames the event loop hands to its page worker
    (or places inline): once the migration has failed, what still arrives is read and dropped
    while the partial guest is discarded. Control: before the failure a frame is placed."""
    placed: list[int] = []
    monkeypatch.setattr(IncomingMigration, "_place_run", lambda self, msg, kind, lane=0: placed.append(msg.gpa))

    async def main() -> None:
        now = time.monotonic()
        proto = FrameProtocol()
        _connected(proto)
        inc = IncomingMigration(SimpleNamespace(lane_servers={}), proto, "peer")  # type: ignore[arg-type]
        established(source=SourceSession(MIGRATION_ID, GUEST, "bound", MigrationPhase(started_at=now), now),
                    dest=inc.session, now=now)
        inc.progress = MigrationProgress("g", "destination", "peer", NPAGES, id=MIGRATION_ID)
        inc._received = PageBitmap(NPAGES)
        proto.set_page_handler(inc._place)
        enc = wire.FrameEncoder()
        _feed(proto, enc.encode_bytes(wire.ZeroPages(0, 1)))
        async with asyncio.timeout(WAIT):
            while not placed:
                await asyncio.sleep(0.01)
        assert placed == [0], "the control: the connection places its frames"
        running, release = await _failed_and_discarding(inc, ProtocolError("a frame was refused"))
        try:
            _feed(proto, enc.encode_bytes(wire.ZeroPages(STRIPE * PAGE_SIZE, 1))
                  + enc.encode_bytes(wire.SharedPages(2 * PAGE_SIZE, 1, bytes(PAGE_SIZE))))
            await asyncio.sleep(0.3)
            assert placed == [0], f"frames placed while the failed migration discarded its guest: {placed}"
            assert proto.close_reason is None or not isinstance(proto.close_reason, ProtocolError), \
                "frames after the failure are dropped, not refused"
        finally:
            release.set()
            await asyncio.wait_for(running, WAIT)

    asyncio.run(main())
