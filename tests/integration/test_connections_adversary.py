"""Adversarial checks of the several-connections work (issue 14), real engines on 127.0.0.1.

Each test states one guarantee a migration over several connections keeps against whoever holds
one of its further connections, and the note above it says why it matters. Every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from migd import wire
from migd.errors import ProtocolError
from migd.guest.workload import WorkloadConfig
from migd.lane_receiver import LaneReceiver
from migd.listener import MigrationListener
from migd.migration_state import MigrationStatus
from migd.source import OutgoingMigration
from migd.stream import FrameProtocol, StreamClosed

from .hosts import closing, make_host, running_guest, wait_populated
from .test_stream_faults import MEMORY_MIB, PARAMS

S = MigrationStatus
pytestmark = pytest.mark.timeout(120)

#: Populated, writing slowly: behind an 8 MiB/s limit round 0 of 16 MiB lasts ~2 s, time enough
#: to act on a joined further connection while pages still flow.
LIGHT = WorkloadConfig(dirty_rate_mib_s=1, convert_rate_hz=5, seed=11, populate_fraction=1.0)
SLOW_TWO = dataclasses.replace(PARAMS, connections=2, max_bandwidth_mib_s=8.0)
#: What a holder of connection 2 sends on it: control frames of the largest kind a stream takes
#: after authentication (SHARED_BITMAP, up to wire.MAX_BITMAP_BYTES each). 16 x 1 MiB here.
FLOOD_FRAMES, FLOOD_BYTES = 16, 1 << 20


async def _until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` until true (True) or ``timeout`` s (False)."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# A further connection carries page frames only: its control frames are refused, not hoarded.
#
# After JOIN nobody reads a further connection's control frames: on the destination its thread
# (migd/lane_receiver.py) places page frames and takes nothing else, and the source reads nothing
# from it after JOINED (its lane's thread only writes there: what is sent to it stays in the
# kernel's receive buffer, which does not grow unread, and then with the sender). On the
# destination any other frame than a page frame (SHARED_BITMAP up to 8 MiB, VCPU_STATE, PING,
# PREPARE, a second JOIN ...) is a ProtocolError that fails the migration; an ABORT there ends it
# with the peer's reason. Were those frames kept for a reader that never comes, whoever holds a
# joined connection -- the peer daemon, or on a plain-TCP path anyone on it (the frame CRC is
# unkeyed; the sequence is a frame count) -- could make the other daemon hold any amount of
# memory, and the frames would be silently ignored instead of failing the migration (invariants 6
# and 7: memory fixed-size; a bad frame is a clear error). As a second line, every event-loop
# stream's control queue is bounded (stream.MAX_QUEUED_CONTROL messages, MAX_QUEUED_CONTROL_BYTES)
# and a peer that sends more is refused: this covers the first connection, whose control queue is
# not read while the destination waits at a barrier for the further connections' pages
# (_lanes_placed).
#
# Controls: each test first checks that connection 2 joined and, on the destination side, that
# the migration is still ACTIVE, so the frames arrive mid-migration while pages flow; the bounded
# wait also ends when the frames sit queued, so a connection that hoards them is seen as such,
# not as a timeout.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["destination", "source"])
def test_control_frames_on_a_further_connection_are_refused_not_hoarded(tmp_path: Path, to: str) -> None:
    """Control frames sent on connection 2, to the destination (by the source, or anyone on a
    plain-TCP path) or to the source (by the destination's side of it), are refused by the side
    that receives them, which reads nothing but page frames (or nothing at all) there, instead of
    being queued for nobody; on the destination the refusal fails the migration. The source
    reads nothing from a further connection after JOINED (its thread only writes there): the
    flood stays with its sender, and the migration goes on."""

    async def main() -> None:
        a, b = make_host(tmp_path, "hostA"), make_host(tmp_path, "hostB")
        listener = MigrationListener(b, handshake_timeout_s=3.0)
        port = await listener.start("127.0.0.1", 0)
        try:
            async with closing(a, b):
                guest = await running_guest(a, memory_mib=MEMORY_MIB, workload=LIGHT)
                await wait_populated(guest)
                migration = OutgoingMigration(guest, "127.0.0.1", port, SLOW_TWO)
                task = migration.start()
                assert await _until(lambda: len(_dest_lanes(b)) == 2, 10), "connection 2 never joined"
                (incoming,) = b.migrations.values()
                dest_lane = _dest_lanes(b)[1]
                assert incoming.status is S.ACTIVE  # pages still flow: the frames come mid-migration
                if to == "destination":
                    src_lane = migration._send_lanes[1]
                    assert src_lane.socket is not None
                    # Written by the connection's own thread, between its page frames.
                    with contextlib.suppress(StreamClosed):
                        await src_lane.run_in_thread(lambda: [src_lane.socket.write(wire.SharedBitmap(  # type: ignore[union-attr]
                            bytes(FLOOD_BYTES))) for _ in range(FLOOD_FRAMES)])
                    refused = await _until(lambda: dest_lane.close_reason is not None, 10)
                    closed = dest_lane.close_reason
                    progress = await asyncio.wait_for(task, 60)
                    assert refused, "connection 2 took 16 MiB of control frames and went on"
                    assert isinstance(closed, ProtocolError), closed
                    assert "carries page frames only" in str(closed), closed
                    assert progress.status is S.FAILED, progress.status  # a bad frame ends the migration
                    assert "carries page frames only" in (progress.phase.error or ""), progress.phase.error
                else:
                    flood = b"".join(wire.encode_bytes(wire.SharedBitmap(bytes(FLOOD_BYTES)))
                                     for _ in range(FLOOD_FRAMES))
                    taken = await _write_what_the_kernel_takes(dest_lane, flood)
                    progress = await asyncio.wait_for(task, 60)
                    # The source's kernel takes its socket's receive buffer (not grown, as nothing
                    # reads it) and this side's send buffer; the rest stays with the sender.
                    assert taken < len(flood) // 2, f"the source's side took {taken} bytes of the flood"
                    assert progress.status is S.COMPLETED, progress.phase.error
        finally:
            await listener.close()

    asyncio.run(main())


async def _write_what_the_kernel_takes(receiver: LaneReceiver, data: bytes) -> int:
    """Write ``data`` on the destination's side of a further connection (its thread only reads
    there) without blocking, until the kernel takes no more (2 s) or the source closes it; returns
    the bytes taken."""
    with socket.socket(fileno=os.dup(receiver._sock.fileno())) as sock:  # type: ignore[union-attr]
        # MSG_DONTWAIT, not setblocking(False): O_NONBLOCK would be the receiver's too (same file).
        taken, deadline = 0, time.monotonic() + 2.0
        while taken < len(data) and time.monotonic() < deadline:
            try:
                taken += sock.send(data[taken:taken + (1 << 20)], socket.MSG_DONTWAIT)
            except BlockingIOError:
                await asyncio.sleep(0.01)
            except (BrokenPipeError, ConnectionResetError):
                break  # the migration ended and the source closed the connection, unread data and all
        return taken


def _dest_lanes(host: Any) -> dict[int, FrameProtocol | LaneReceiver]:
    """The destination's connections of its one incoming migration (none before it exists)."""
    if not host.migrations:
        return {}
    (incoming,) = host.migrations.values()
    server = host.lane_servers.get(incoming.id)
    return {} if server is None else server.__self__._lanes  # type: ignore[no-any-return]
