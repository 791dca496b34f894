"""The destination's end of a further connection (migd/lane_receiver.py), on 127.0.0.1.

What the destination relies on when a further connection is read and placed by its own thread:
the source's own end (migd/lane_socket.py) gets JOINED and its frames are placed intact, in
order, by that thread and not the event loop, plain and over mutual TLS; before the peer is
authenticated the opening is bounded like any connection the listener takes (the preamble, the
frame size, one frame, the deadline); after it, only page frames are taken; the end of the
connection reaches the loop with its reason; and :meth:`LaneReceiver.stop` ends a blocked read
at once, after which no frame is placed (each with its control).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

from migd import lane_receiver, wire
from migd.abi import PAGE_SIZE
from migd.errors import PeerAborted, ProtocolError
from migd.lane_receiver import PLACER_THREAD_NAME, THREAD_NAME, LaneReceiver
from migd.lane_socket import LaneSocket
from migd.stream import MAX_FRAME_BEFORE_AUTHENTICATION, StreamClosed, StreamTimeout
from test_lane_socket import tls  # noqa: F401  (the fixture: one owner CA, both ends' contexts)

JOIN = wire.Join("m-test", 1, bytes(wire.MAC_SIZE))
JOINED = wire.Joined(1, bytes(wire.MAC_SIZE))
RUN = wire.MAX_RUN_PAGES
WAIT = 10.0
PageFrame = wire.PrivatePages | wire.SharedPages | wire.ZeroPages


class Placed:
    """The page handler: each frame (copied: its payload points into the receiver's buffer) and
    the thread that placed it; ``block`` holds the handler until set."""

    def __init__(self) -> None:
        self.frames: list[wire.Message] = []
        self.threads: set[str] = set()
        self.block = threading.Event()
        self.block.set()
        self.entered = threading.Event()

    def __call__(self, msg: PageFrame) -> None:
        self.entered.set()
        self.block.wait(WAIT)
        self.threads.add(threading.current_thread().name)
        self.frames.append(wire.detached(msg))


class Ends:
    """on_end: the reasons, as the loop received them, and the thread they were received on."""

    def __init__(self) -> None:
        self.reasons: list[BaseException] = []
        self.threads: list[str] = []

    def __call__(self, reason: BaseException) -> None:
        self.reasons.append(reason)
        self.threads.append(threading.current_thread().name)

    async def first(self) -> BaseException:
        async with asyncio.timeout(WAIT):
            while not self.reasons:
                await asyncio.sleep(0.005)
        return self.reasons[0]


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


async def _accepted(server: socket.socket) -> socket.socket:
    loop = asyncio.get_running_loop()
    sock, _ = await asyncio.wait_for(loop.sock_accept(server), WAIT)
    return sock


async def _source_end(server: socket.socket, client: ssl.SSLContext | None, timeout: float = WAIT,
                      ) -> tuple[LaneSocket, asyncio.Future[wire.Message]]:
    """The source's own end of connection 2, opening in a thread (it waits for JOINED)."""
    lane = LaneSocket(1)
    opening = asyncio.get_running_loop().run_in_executor(
        None, lane.open, server.getsockname(), JOIN, client, "hostA", timeout)
    return lane, opening


@contextlib.asynccontextmanager
async def _admitted(server_ctx: ssl.SSLContext | None, client: ssl.SSLContext | None, placed: Placed | None = None,
                    ) -> AsyncIterator[tuple[LaneSocket, LaneReceiver, Placed, Ends]]:
    """The source's own end and the receiver, opened (TLS if the contexts say so) and admitted:
    (the source's end, the receiver, its handler, its ends); both stopped on the way out."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        lane, opening = await _source_end(server, client)
        receiver = LaneReceiver(await _accepted(server), "peer")
        try:
            assert await receiver.open(server_ctx, WAIT) == JOIN
            assert receiver.tls_established is (server_ctx is not None)
            placed, ends = placed or Placed(), Ends()
            receiver.admit(JOINED, placed, ends)
            assert await asyncio.wait_for(opening, WAIT) == JOINED
            yield lane, receiver, placed, ends
        finally:
            receiver.stop()
            lane.close()


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "mutual-tls"])
def test_frames_are_placed_intact_in_order_by_the_connections_thread(
        tls: tuple[ssl.SSLContext, ssl.SSLContext], secure: bool) -> None:
    """JOIN comes out of the opening, JOINED goes back, and the page frames LaneSocket writes are
    placed in order by the receiver's thread; the loop hears of the end once, with the reason."""
    server_ctx, client = tls if secure else (None, None)

    async def main() -> None:
        async with _admitted(server_ctx, client) as (lane, receiver, placed, ends):
            frames: list[wire.Message] = [
                wire.SharedPages(0, RUN, bytes(range(256)) * (RUN * PAGE_SIZE // 256)),
                wire.ZeroPages(RUN * PAGE_SIZE, 7),
                wire.PrivatePages(2 * RUN * PAGE_SIZE, 3, bytes(52), b"\x5a" * (3 * PAGE_SIZE)),
                wire.SharedPages(3 * RUN * PAGE_SIZE, 1, b"\x01" * PAGE_SIZE),
            ] * 4
            await asyncio.get_running_loop().run_in_executor(None, lambda: [lane.write(m) for m in frames])
            lane.shutdown()  # FIN after the frames
            reason = await ends.first()
            assert placed.frames == frames
            # Not the loop: the private runs by the placing thread, the others inline or there.
            assert PLACER_THREAD_NAME in placed.threads and "MainThread" not in placed.threads, placed.threads
            assert isinstance(reason, StreamClosed) and receiver.closed_by_peer, reason
            assert ends.threads == ["MainThread"] and receiver.close_reason is reason
            await asyncio.sleep(0.05)
            assert len(ends.reasons) == 1

    run(main)


async def _opening_of(data: bytes, *, timeout: float = WAIT, then_close: bool = False,
                      ssl_context: ssl.SSLContext | None = None) -> tuple[BaseException | wire.Join, bytes, float]:
    """A raw peer sends ``data`` (and closes, if ``then_close``); returns what the receiver's
    opening gave, what the peer got back before the end, and how long the opening took."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        peer = socket.create_connection(server.getsockname())
        receiver = LaneReceiver(await _accepted(server), "peer")
        try:
            peer.sendall(data)
            if then_close:
                peer.shutdown(socket.SHUT_WR)
            started = time.monotonic()
            try:
                result: BaseException | wire.Join = await receiver.open(ssl_context, timeout)
            except (ProtocolError, StreamClosed, StreamTimeout, OSError) as exc:
                result = exc
            took = time.monotonic() - started
            peer.settimeout(WAIT)
            answer = b""
            if not isinstance(result, wire.Join):
                while chunk := peer.recv(65536):
                    answer += chunk
            return result, answer, took
        finally:
            receiver.stop()
            peer.close()


def test_the_opening_takes_join_and_nothing_else() -> None:
    """Before the peer is authenticated: the preamble exactly, then one control frame, a JOIN.
    Each refusal is a ProtocolError and the peer is told why (ABORT, no MAC). Control: the same
    opening with a JOIN alone succeeds."""
    join = wire.encode_bytes(JOIN)
    huge = struct.pack(">IBH", 1 + 2 + 16 + RUN * PAGE_SIZE + 4, wire.FrameType.SHARED_PAGES, 16) + bytes(64)
    cases = {
        "not the preamble": (b"MIGDLAN\x00" + join, "does not start with the lane preamble"),
        "a page frame before authentication": (wire.LANE_PREAMBLE + huge, f"at most {MAX_FRAME_BEFORE_AUTHENTICATION}"),
        "another frame than JOIN": (wire.LANE_PREAMBLE + wire.encode_bytes(wire.Abort("x")), "where JOIN was due"),
        "a frame behind JOIN before JOINED": (wire.LANE_PREAMBLE + join + bytes(3), "more than one frame"),
        "a corrupted JOIN": (wire.LANE_PREAMBLE + join[:-1] + bytes([join[-1] ^ 1]), "failed its CRC32"),
    }

    async def main() -> None:
        result, _, _ = await _opening_of(wire.LANE_PREAMBLE + join)
        assert result == JOIN, "the control: a JOIN alone opens the connection"
        for case, (data, why) in cases.items():
            result, answer, _ = await _opening_of(data)
            assert isinstance(result, ProtocolError) and why in str(result), (case, result)
            told = wire.FrameDecoder().feed(answer)
            assert [type(m) for m in told] == [wire.Abort] and why in told[0].reason, (case, told)  # type: ignore[union-attr]

    run(main)


def test_the_opening_has_the_handshake_deadline() -> None:
    """A peer that sends the preamble and then nothing, or part of a JOIN, is timed out by the
    deadline; one that closes first ends the opening at once."""

    async def main() -> None:
        for data in (wire.LANE_PREAMBLE, wire.LANE_PREAMBLE + wire.encode_bytes(JOIN)[:10], wire.LANE_PREAMBLE[:3]):
            result, _, took = await _opening_of(data, timeout=0.4)
            assert isinstance(result, StreamTimeout) and 0.3 < took < 3, (data, result, took)
        result, _, took = await _opening_of(wire.LANE_PREAMBLE, timeout=WAIT, then_close=True)
        assert isinstance(result, StreamClosed) and took < 3, (result, took)

    run(main)


def test_a_refused_join_gets_the_reason_and_the_end() -> None:
    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.setblocking(False)
            lane, opening = await _source_end(server, None)
            receiver = LaneReceiver(await _accepted(server), "peer")
            try:
                await receiver.open(None, WAIT)
                receiver.refuse("no such migration here")
                with pytest.raises(PeerAborted, match="no such migration here"):
                    await asyncio.wait_for(opening, WAIT)
            finally:
                receiver.stop()
                lane.close()

    run(main)


async def _joined(server: socket.socket, placed: Placed | None = None,
                  ) -> tuple[socket.socket, LaneReceiver, Placed, Ends, wire.FrameEncoder]:
    """A raw source end that has joined: (its socket, the receiver, its handler, its ends, the
    encoder that continues the source's frame sequence)."""
    peer = socket.create_connection(server.getsockname())
    receiver = LaneReceiver(await _accepted(server), "peer")
    encoder = wire.FrameEncoder()
    peer.sendall(wire.LANE_PREAMBLE + encoder.encode_bytes(JOIN))
    await receiver.open(None, WAIT)
    placed, ends = placed or Placed(), Ends()
    receiver.admit(JOINED, placed, ends)
    peer.settimeout(WAIT)
    assert wire.FrameDecoder().feed(peer.recv(4096)) == [JOINED]
    return peer, receiver, placed, ends, encoder


def test_after_joined_only_page_frames_are_taken() -> None:
    """A control frame is a ProtocolError, an ABORT the peer's reason, a reset a lost stream, and
    a handler that fails unexpectedly ends it as an internal error; each reaches the loop as the
    connection's end, and nothing after the bad frame is placed."""
    page = wire.ZeroPages(0, 1)

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.setblocking(False)
            for bad, expected, why in [
                (wire.SharedBitmap(bytes(4096)), ProtocolError, "carries page frames only"),
                (wire.Ping(1), ProtocolError, "carries page frames only"),
                (wire.Abort("the operator cancelled"), PeerAborted, "the operator cancelled"),
            ]:
                peer, receiver, placed, ends, encoder = await _joined(server)
                try:
                    peer.sendall(encoder.encode_bytes(page) + encoder.encode_bytes(bad) + encoder.encode_bytes(page))
                    reason = await ends.first()
                    assert isinstance(reason, expected) and why in str(reason), (bad, reason)
                    assert placed.frames == [page], (bad, placed.frames)
                finally:
                    receiver.stop()
                    peer.close()
            peer, receiver, placed, ends, encoder = await _joined(server)
            try:
                peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                peer.close()  # a reset
                reason = await ends.first()
                assert isinstance(reason, StreamClosed) and "lost" in str(reason) and receiver.closed_by_peer, reason
            finally:
                receiver.stop()

            class Failing(Placed):
                def __call__(self, msg: PageFrame) -> None:
                    raise KeyError("a bug")

            peer, receiver, _, ends, encoder = await _joined(server, Failing())
            try:
                peer.sendall(encoder.encode_bytes(page))
                reason = await ends.first()
                assert isinstance(reason, ProtocolError) and "internal error" in str(reason), reason
            finally:
                receiver.stop()
                peer.close()

    run(main)


def _private(i: int, npages: int = 3) -> wire.PrivatePages:
    return wire.PrivatePages(i * RUN * PAGE_SIZE, npages, bytes(52), bytes([i + 1]) * (npages * PAGE_SIZE))


async def _until(done: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not done():
            await asyncio.sleep(0.005)


@pytest.mark.parametrize("depth", [lane_receiver.PLACE_DEPTH, 4])
def test_the_next_frames_are_read_while_one_is_placed_and_no_more_than_the_depth(
        monkeypatch: pytest.MonkeyPatch, depth: int) -> None:
    """Receiving and placing overlap: while the placing thread is held on a private frame, the
    reading thread takes frames with a payload off the connection up to ``depth``, and no more
    (the rest wait in the socket: that bounds the connection's memory); once released every frame
    is placed, in order, a zero and a shared run behind queued frames in their turn. The second
    depth is the control: the bound is PLACE_DEPTH's, not the handler's or the socket's."""
    monkeypatch.setattr(lane_receiver, "PLACE_DEPTH", depth)

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.setblocking(False)
            placed = Placed()
            placed.block.clear()
            peer, receiver, placed, ends, encoder = await _joined(server, placed)
            try:
                frames: list[wire.Message] = [_private(i) for i in range(8)]
                frames[3:3] = [wire.ZeroPages(20 * RUN * PAGE_SIZE, 5),
                               wire.SharedPages(21 * RUN * PAGE_SIZE, 1, b"\x07" * PAGE_SIZE)]
                peer.sendall(b"".join(encoder.encode_bytes(m) for m in frames))
                assert await asyncio.get_running_loop().run_in_executor(None, placed.entered.wait, WAIT)
                # The frame being placed counts; with the larger depth the zero run queued too.
                taken = depth + (depth >= 4)
                await _until(lambda: receiver.queued >= taken)
                await asyncio.sleep(0.2)  # the reading thread waits: no frame more is taken
                assert receiver.queued == taken, receiver.queued
                assert not placed.frames
                placed.block.set()
                await _until(lambda: len(placed.frames) == len(frames))
                assert placed.frames == frames and receiver.queued == 0 and not ends.reasons
            finally:
                receiver.stop()
                peer.close()

    run(main)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "mutual-tls"])
def test_a_frame_is_placed_without_waiting_for_the_bytes_behind_it(
        tls: tuple[ssl.SSLContext, ssl.SSLContext], secure: bool) -> None:
    """Over TLS the reading thread reads on, record after record, to the end of the frame under
    way, and stops there: the last frame before the source waits (at a barrier) is placed, not
    held back for bytes that do not come. Plain TCP as the control."""
    server_ctx, client = tls if secure else (None, None)

    async def main() -> None:
        async with _admitted(server_ctx, client) as (lane, receiver, placed, ends):
            frames = [_private(0, wire.MAX_RUN_PAGES), wire.ZeroPages(RUN * PAGE_SIZE, 1), _private(2, 1)]
            for msg in frames:
                lane.write(msg)
                await _until(lambda: len(placed.frames) == frames.index(msg) + 1)
            assert placed.frames == frames and not ends.reasons

    run(main)


def test_bytes_arriving_slowly_over_tls_count_as_activity(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> None:
    """The reading thread reads on to the frame's end over TLS: a frame that trickles in (a slow
    link) must still move the connection's last activity as its records arrive, or a barrier
    waiting for it would see a stall. Control: while nothing arrives, nothing moves."""
    server_ctx, client = tls

    async def main() -> None:
        async with _admitted(server_ctx, client) as (lane, receiver, placed, ends):
            data = lane._encoder.encode_bytes(_private(0, wire.MAX_RUN_PAGES))
            tls_socket = lane._sock
            assert tls_socket is not None
            # The frame's first records: its prefix is known, the rest of its first MiB is awaited.
            tls_socket.sendall(data[:32 << 10])
            await asyncio.sleep(0.2)
            mark = time.monotonic()
            assert receiver.last_activity < mark and not placed.frames
            for offset in range(32 << 10, 256 << 10, 16 << 10):  # more of it, 16 KiB at a time
                tls_socket.sendall(data[offset:offset + (16 << 10)])
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            assert receiver.last_activity > mark, mark - receiver.last_activity
            tls_socket.sendall(data[256 << 10:])
            await _until(lambda: len(placed.frames) == 1)

    run(main)


@pytest.mark.parametrize("refuse", [True, False], ids=["refused", "control"])
def test_a_frame_the_placing_thread_refuses_ends_the_connection_at_once(refuse: bool) -> None:
    """The source has sent all it had (it waits at a barrier; the reading thread waits for bytes):
    a frame the placing thread refuses reaches the loop as the connection's end all the same,
    and nothing that arrives behind it is placed. Control: a handler that takes every frame
    places them all and the connection stays up."""

    class Refusing(Placed):
        def __call__(self, msg: PageFrame) -> None:
            if refuse and msg.gpa == _private(1).gpa:
                raise ProtocolError("RECEIVE_UPDATE_DATA: the packet failed its integrity check")
            super().__call__(msg)

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.setblocking(False)
            peer, receiver, placed, ends, encoder = await _joined(server, Refusing())
            try:
                frames = [_private(i) for i in range(3)]
                peer.sendall(b"".join(encoder.encode_bytes(m) for m in frames[:2]))
                if refuse:
                    reason = await ends.first()
                    assert isinstance(reason, ProtocolError) and "integrity" in str(reason), reason
                    peer.sendall(encoder.encode_bytes(frames[2]))
                    await asyncio.sleep(0.2)
                    assert placed.frames == frames[:1] and len(ends.reasons) == 1, placed.frames
                else:
                    peer.sendall(encoder.encode_bytes(frames[2]))
                    await _until(lambda: len(placed.frames) == 3)
                    await asyncio.sleep(0.2)
                    assert placed.frames == frames and not ends.reasons
            finally:
                receiver.stop()
                peer.close()

    run(main)


@pytest.mark.parametrize("kind", ["zero", "private"])
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "mutual-tls"])
def test_stop_ends_a_blocked_read_at_once_and_places_nothing_more(
        tls: tuple[ssl.SSLContext, ssl.SSLContext], secure: bool, kind: str) -> None:
    """The migration no longer needs the connection (every page verified, or it failed): stop()
    from the loop ends the thread's read at once, and on_end is not called (the migration
    ended it). A frame already being placed finishes; the frames behind it are not placed,
    whether the reading thread had queued them for the placing thread (private runs) or not
    (zero runs, placed by the reading thread when nothing is queued). Controls: before stop()
    the threads wait, reading and for frames; without stop() every frame is placed."""
    server_ctx, client = tls if secure else (None, None)

    async def one(stop: bool) -> tuple[Placed, Ends, LaneReceiver, float]:
        held = Placed()
        held.block.clear()
        async with _admitted(server_ctx, client, held) as (lane, receiver, placed, ends):
            frames: list[wire.Message] = (
                [wire.ZeroPages(i * PAGE_SIZE, 1) for i in range(3)] if kind == "zero" else [_private(i) for i in range(3)])
            for msg in frames:
                lane.write(msg)
            assert await asyncio.get_running_loop().run_in_executor(None, placed.entered.wait, WAIT)
            if kind == "private":  # the second frame waits for the placing thread
                await _until(lambda: receiver.queued == 2)
            if stop:
                receiver.stop()
            placed.block.set()  # the frame under way finishes
            if stop:
                await asyncio.sleep(0.3)
                assert placed.frames == frames[:1], placed.frames
                await _until(lambda: receiver.queued == 0)  # what was queued is let go
                return placed, ends, receiver, 0.0
            async with asyncio.timeout(WAIT):
                while len(placed.frames) < 3:
                    await asyncio.sleep(0.01)
            # Blocked in its read now: stop() ends it at once.
            await asyncio.sleep(0.2)
            assert not ends.reasons, "the control: the thread still waits in its read"
            shut_at = time.monotonic()
            receiver.stop()
            async with asyncio.timeout(WAIT):
                while not receiver.shut or any(t.name in (THREAD_NAME, PLACER_THREAD_NAME)
                                               for t in threading.enumerate()):
                    await asyncio.sleep(0.005)
            return placed, ends, receiver, time.monotonic() - shut_at

    async def main() -> None:
        placed, ends, _, took = await one(stop=False)
        assert len(placed.frames) == 3 and took < 1.0, (placed.frames, took)
        await asyncio.sleep(0.1)
        assert not ends.reasons, ends.reasons
        placed, ends, _, _ = await one(stop=True)
        assert len(placed.frames) == 1 and not ends.reasons, (placed.frames, ends.reasons)

    run(main)


def test_no_thread_to_be_had_ends_the_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The process cannot start another thread (a limit): the opening fails at once with the
    reason, and the accepted socket is closed (the peer sees its end), not left to the garbage
    collector (found by an adversarial review). Control: the peer's connection was open before."""
    real_start = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name == THREAD_NAME:
            raise RuntimeError("can't start new thread")
        real_start(self)

    async def main() -> None:
        with socket.create_server(("127.0.0.1", 0)) as server:
            server.setblocking(False)
            peer = socket.create_connection(server.getsockname())
            receiver = LaneReceiver(await _accepted(server), "peer")
            peer.settimeout(0.2)
            with pytest.raises(TimeoutError):
                peer.recv(1)  # the control: open, nothing to read
            monkeypatch.setattr(threading.Thread, "start", start)
            with pytest.raises(StreamClosed, match="no thread to receive it"):
                await receiver.open(None, WAIT)
            peer.settimeout(WAIT)
            assert peer.recv(1) == b"", "the socket is closed"
            peer.close()

    run(main)
