"""Adversarial checks of the several-connections work (issue 14), real engines on 127.0.0.1.

Each test states one guarantee a migration over several connections keeps against whoever holds
one of its further connections, and the note above it says why it matters. Every wait is
bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from migd import wire
from migd.guest.workload import WorkloadConfig
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


def _queued(proto: FrameProtocol) -> tuple[int, int]:
    """(control messages, their payload bytes) a stream holds that nobody has taken."""
    items = [m for m in proto._queue._queue if not isinstance(m, BaseException)]  # type: ignore[attr-defined]
    return len(items), sum(len(getattr(m, "payload", b"") or b"") for m in items)


# ---------------------------------------------------------------------------------------------
# A further connection carries page frames only: its control frames are refused, not hoarded.
#
# After JOIN nobody calls receive() on a further connection: on the destination
# IncomingMigration._serve_lane installs the page handler and awaits the lane's end, and the
# source reads nothing from it after JOINED (its lane's thread only writes there: what is sent to
# it stays in the kernel's receive buffer, which does not grow unread, and then with the sender).
# The destination therefore switches it to
# FrameProtocol.pages_only(): page frames go to the pipeline, and any other frame (SHARED_BITMAP
# up to 8 MiB, VCPU_STATE, PING, PREPARE, a second JOIN ...) is a ProtocolError that fails the
# migration; an ABORT there ends it with the peer's reason. Without this, those frames would be
# detached (copied) into the stream's control queue and kept, unread, until the migration ended.
# mark_authenticated() has lifted the control-frame size bound, so whoever holds a joined
# connection -- the peer daemon, or on a plain-TCP path anyone on it (the frame CRC is unkeyed;
# the sequence is a frame count) -- could make the other daemon hold any amount of memory, and
# the frames would be silently ignored instead of failing the migration (invariants 6 and 7:
# memory fixed-size; a bad frame is a clear error). As a second line, every stream's control
# queue is bounded (stream.MAX_QUEUED_CONTROL messages, MAX_QUEUED_CONTROL_BYTES) and a peer that
# sends more is refused: this also covers the first connection, whose control queue is not read
# while the destination waits at a barrier for the further connections' pages (_lanes_placed).
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
                    refused = await _until(lambda: dest_lane.close_reason is not None
                                           or _queued(dest_lane)[0] >= FLOOD_FRAMES, 10)
                    held, held_bytes = _queued(dest_lane)
                    closed = dest_lane.close_reason
                    progress = await asyncio.wait_for(task, 60)
                    assert refused
                    assert closed is not None and held == 0, (
                        f"connection 2 was not refused by the destination: it holds {held} control frames "
                        f"({held_bytes} bytes) nobody will read, and the migration went on and ended "
                        f"{progress.status.value}")
                    assert progress.status is S.FAILED, progress.status  # a bad frame ends the migration
                else:
                    for _ in range(FLOOD_FRAMES):
                        dest_lane.write(wire.SharedBitmap(bytes(FLOOD_BYTES)))
                    # The source's kernel takes its socket's receive buffer (128 KiB: not grown, as
                    # nothing reads it) and the rest stays with the sender.
                    backed_up = await _until(lambda: dest_lane.write_buffer_size() > FLOOD_FRAMES * FLOOD_BYTES // 2, 10)
                    progress = await asyncio.wait_for(task, 60)
                    assert backed_up, f"the source read {dest_lane.bytes_consumed()} bytes of the flood"
                    assert progress.status is S.COMPLETED, progress.phase.error
        finally:
            await listener.close()

    asyncio.run(main())


def _dest_lanes(host: Any) -> dict[int, FrameProtocol]:
    """The destination's connections of its one incoming migration (none before it exists)."""
    if not host.migrations:
        return {}
    (incoming,) = host.migrations.values()
    server = host.lane_servers.get(incoming.id)
    return {} if server is None else server.__self__._lanes  # type: ignore[no-any-return]
