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
import socket
import time
from types import SimpleNamespace

import pytest

from migd import dest, wire
from migd.bitmap import PageBitmap
from migd.dest import IncomingMigration
from migd.errors import PeerAborted
from migd.lane_receiver import LaneReceiver
from migd.migration_state import MigrationPhase
from migd.progress import MigrationProgress
from migd.source_session import SourceSession
from migd.stream import FrameProtocol, StreamClosed
from session_pair import established
from test_stream import FakeTransport, _feed

MIGRATION_ID = "m-lane-end"
NPAGES = 1024  # two stripes: stripe 0 on connection 1, stripe 1 on connection 2
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
