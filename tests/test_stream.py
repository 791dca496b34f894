"""The stream adapter's destination page pipeline (migd/stream.py), driven without sockets.

A fake transport stands in for the socket; frames go in through ``get_buffer`` /
``buffer_updated`` exactly as asyncio's BufferedProtocol machinery feeds them. The page
handler blocks on events the test releases, so every ordering is forced, never timed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import struct
import threading
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from migd import wire
from migd.abi import PAGE_SIZE, FirmwareStatus
from migd.errors import FirmwareError, ProtocolError
from migd import page_pipeline
from migd.page_pipeline import PIPELINE_DEPTH, RESUME_DEPTH
from migd.frame_fields import MAX_BITMAP_BYTES, MAX_VCPU_STATE
from migd.stream import (
    INITIAL_RECEIVE_BUFFER,
    MAX_FRAME_BEFORE_AUTHENTICATION,
    MAX_QUEUED_CONTROL,
    TLS_WRITE_BYTES,
    FrameProtocol,
    tls_write_batches,
)

PageMsg = wire.PrivatePages | wire.SharedPages | wire.ZeroPages
WAIT = 10.0  # bound on every wait for the worker (never reached when things work)


class FakeTransport:
    """Records what the protocol does to its transport."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.paused = False
        self.pauses = 0
        self.closed = False
        self.eof_written = False
        self.half_closable = True  # TCP; TLS transports cannot write EOF

    def can_write_eof(self) -> bool:
        return self.half_closable

    def write_eof(self) -> None:
        assert not self.eof_written, "EOF written twice"
        self.eof_written = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 4444) if name == "peername" else default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        for part in parts:
            self.written += bytes(part)

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        assert not self.paused, "paused twice"
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        assert self.paused, "resumed while not paused"
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Handler:
    """A page handler that records what it saw and waits for the test's go per frame."""

    def __init__(self, fail_at_gpa: int | None = None) -> None:
        self.seen: list[tuple[str, int, bytes, str]] = []
        self.gate = threading.Semaphore(0)
        self.fail_at_gpa = fail_at_gpa

    def __call__(self, msg: PageMsg) -> None:
        assert self.gate.acquire(timeout=WAIT), "the test never released this frame"
        payload = bytes(getattr(msg, "payload", b""))
        self.seen.append((type(msg).__name__, msg.gpa, payload, threading.current_thread().name))
        if msg.gpa == self.fail_at_gpa:
            raise FirmwareError(FirmwareStatus.BAD_MEASUREMENT, f"packet at gpa {msg.gpa:#x}: packet MAC mismatch")

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()


def _page(n: int, fill: int) -> bytes:
    return bytes([fill]) * (n * PAGE_SIZE)


def _feed(proto: FrameProtocol, data: bytes, step: int = 64 * 1024) -> None:
    """Deliver ``data`` as asyncio would, in pieces, into the protocol's own buffers."""
    view = memoryview(data)
    while len(view):
        target = proto.get_buffer(-1)
        n = min(len(target), len(view), step)
        target[:n] = view[:n]
        proto.buffer_updated(n)
        view = view[n:]


async def _until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not predicate():
            await asyncio.sleep(0.005)


def _setup(handler: Handler, *, threaded: bool = True) -> tuple[FrameProtocol, FakeTransport, wire.FrameEncoder]:
    proto = FrameProtocol()
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    proto.set_page_handler(handler, threaded=threaded)
    return proto, transport, wire.FrameEncoder()


def test_control_messages_wait_for_the_pages_before_them() -> None:
    async def main() -> None:
        handler = Handler()
        proto, _, enc = _setup(handler)
        frames = [
            wire.PrivatePages(0, 2, bytes(52), _page(2, 1)),
            wire.SharedPages(2 * PAGE_SIZE, 1, _page(1, 2)),
            wire.RoundEnd(0, 7),
            wire.ZeroPages(3 * PAGE_SIZE, 5),
            wire.Prepare(8),
        ]
        _feed(proto, b"".join(enc.encode_bytes(f) for f in frames))
        handler.release(1)  # only the first run is placed
        await _until(lambda: len(handler.seen) == 1)
        with pytest.raises(TimeoutError):
            await proto.receive(0.05)  # ROUND_END must not overtake the shared run still queued
        handler.release(1)
        assert await proto.receive(WAIT) == wire.RoundEnd(0, 7)
        assert [s[:2] for s in handler.seen] == [("PrivatePages", 0), ("SharedPages", 2 * PAGE_SIZE)]
        handler.release(1)  # the zero run queued behind the shared one, then PREPARE
        assert await proto.receive(WAIT) == wire.Prepare(8)
        assert [s[0] for s in handler.seen] == ["PrivatePages", "SharedPages", "ZeroPages"]
        assert all(s[3] != threading.current_thread().name for s in handler.seen)  # the worker ran them
        assert handler.seen[0][2] == _page(2, 1) and handler.seen[1][2] == _page(1, 2)
        proto.close()
        proto.connection_lost(None)

    asyncio.run(main())


def test_payloads_survive_the_receive_buffer_being_reused() -> None:
    """The worker gets its own copy: later frames overwrite the decoder's buffer meanwhile."""

    async def main() -> None:
        handler = Handler()
        proto, _, enc = _setup(handler)
        runs = [wire.PrivatePages(i * 8 * PAGE_SIZE, 8, bytes(52), _page(8, 10 + i)) for i in range(PIPELINE_DEPTH)]
        half = PIPELINE_DEPTH // 2
        # Two batches, none placed yet: the decoder reuses its buffer from the start for the
        # second, right where the first batch's payloads were.
        _feed(proto, b"".join(enc.encode_bytes(r) for r in runs[:half]))
        _feed(proto, b"".join(enc.encode_bytes(r) for r in runs[half:]))
        handler.release(len(runs))
        await _until(lambda: len(handler.seen) == len(runs))
        assert [s[2] for s in handler.seen] == [r.payload for r in runs]
        proto.connection_lost(None)

    asyncio.run(main())


def test_control_payloads_survive_the_receive_buffer_being_reused() -> None:
    """A bitmap held behind queued pages keeps its bytes while later frames reuse the buffer.

    Found in CI: a SHARED_BITMAP waiting behind page frames was read after the decoder had
    received the next pages over it ("bad bitmap magic ... got b'\\xa5pag'").
    """

    async def main() -> None:
        handler = Handler()
        proto, _, enc = _setup(handler)
        bitmap = wire.SharedBitmap(b"MGBM" + bytes(range(256)) * 16)
        first = wire.PrivatePages(0, 1, bytes(52), _page(1, 1))
        _feed(proto, enc.encode_bytes(first) + enc.encode_bytes(bitmap))
        # Not yet placed: the bitmap is held. The next batch lands where it was received.
        later = [wire.SharedPages((i + 1) * PAGE_SIZE, 1, _page(1, 0xA5)) for i in range(2)]
        _feed(proto, b"".join(enc.encode_bytes(r) for r in later))
        handler.release(1)
        got = await proto.receive(WAIT)
        assert isinstance(got, wire.SharedBitmap) and bytes(got.payload) == bitmap.payload
        handler.release(2)
        await _until(lambda: len(handler.seen) == 3)
        proto.connection_lost(None)

    asyncio.run(main())


def test_reading_pauses_while_the_worker_is_behind() -> None:
    async def main() -> None:
        handler = Handler()
        proto, transport, enc = _setup(handler)
        runs = [wire.PrivatePages(i * PAGE_SIZE, 1, bytes(52), _page(1, i + 1)) for i in range(PIPELINE_DEPTH + 2)]
        for run in runs[: PIPELINE_DEPTH - 1]:
            _feed(proto, enc.encode_bytes(run))
        assert not transport.paused
        _feed(proto, enc.encode_bytes(runs[PIPELINE_DEPTH - 1]))
        assert transport.paused and proto.pending_pages() == PIPELINE_DEPTH
        handler.release(1)
        await _until(lambda: len(handler.seen) == 1)
        await asyncio.sleep(0.05)
        assert transport.paused  # one slot free is not enough: reading resumes at RESUME_DEPTH
        handler.release(PIPELINE_DEPTH - RESUME_DEPTH - 1)
        await _until(lambda: not transport.paused)
        for run in runs[PIPELINE_DEPTH:]:
            _feed(proto, enc.encode_bytes(run))
        handler.release(len(runs))
        # Finished frames are retired lazily (by the next frame, or a wake-up while the loop
        # waits): a control frame behind them is what makes the loop wait, as at a round's end.
        _feed(proto, enc.encode_bytes(wire.RoundEnd(0, 0)))
        assert await proto.receive(WAIT) == wire.RoundEnd(0, 0)
        assert len(handler.seen) == len(runs) and proto.pending_pages() == 0
        assert not transport.paused and transport.pauses >= 1
        assert [s[1] for s in handler.seen] == [r.gpa for r in runs]
        proto.connection_lost(None)

    asyncio.run(main())


@pytest.mark.parametrize("resume_depth", [RESUME_DEPTH, PIPELINE_DEPTH - 1])
def test_a_slow_worker_wakes_the_loop_once_per_resume_not_per_frame(
        resume_depth: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker behind a fast sender: reading pauses at PIPELINE_DEPTH and the worker wakes the
    loop only when it is down to RESUME_DEPTH frames. The second case is the negative control:
    resuming at the first free slot (as before) costs a wake-up and a pause for every frame."""
    monkeypatch.setattr(page_pipeline, "RESUME_DEPTH", resume_depth)

    async def main() -> tuple[int, int, int]:
        handler = Handler()
        proto, transport, enc = _setup(handler)
        loop = asyncio.get_running_loop()
        wakeups = 0
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counting(*args: Any, **kwargs: Any) -> Any:
            nonlocal wakeups
            wakeups += 1
            return call_soon_threadsafe(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        frames = 40
        sent = 0
        while len(handler.seen) < frames:
            while not transport.paused and sent < frames:  # the sender is faster: it fills the pipeline
                _feed(proto, enc.encode_bytes(wire.PrivatePages(sent * PAGE_SIZE, 1, bytes(52), _page(1, sent % 250 + 1))))
                sent += 1
            seen = len(handler.seen)
            handler.release(1)
            await _until(lambda: len(handler.seen) > seen)
            await asyncio.sleep(0)  # a wake-up it sent runs now
        _feed(proto, enc.encode_bytes(wire.RoundEnd(0, 0)))
        assert await proto.receive(WAIT) == wire.RoundEnd(0, 0)
        assert [s[1] for s in handler.seen] == [i * PAGE_SIZE for i in range(frames)]
        proto.connection_lost(None)
        return frames, wakeups, transport.pauses

    frames, wakeups, pauses = asyncio.run(main())
    per_resume = PIPELINE_DEPTH - resume_depth  # frames the worker finishes between two wake-ups
    assert pauses <= frames // per_resume + 1
    assert wakeups <= frames // per_resume + 2  # + the ROUND_END held at the end
    if resume_depth == PIPELINE_DEPTH - 1:
        assert wakeups >= frames - PIPELINE_DEPTH  # the old behaviour: one per frame


def test_a_frame_finishing_between_the_two_done_checks_is_not_a_failure() -> None:
    """collect() looks at the head frame's future twice (in _retire_done, then itself); the GIL
    can change hands in between and the worker finish the frame. Found by an adversarial review:
    collect() took that success for a failure (an AssertionError out of buffer_updated, which
    aborts the connection; under ``python -O`` an ABORT "internal error ... None"). The switch is
    forced: right after _retire_done returns with the head unfinished, the worker is let go and
    the test waits for that frame, as if the loop thread had lost the GIL there."""

    async def main() -> None:
        handler = Handler()
        proto, transport, enc = _setup(handler)
        _feed(proto, enc.encode_bytes(wire.PrivatePages(0, 1, bytes(52), _page(1, 1))))
        pipeline = proto._pipeline
        assert pipeline is not None
        original = pipeline._retire_done
        switched = False

        def retire_then_switch() -> None:
            nonlocal switched
            original()
            head = pipeline._backlog[0] if pipeline._backlog else None
            if not switched and head is not None and not isinstance(head, wire.Message) and not head.future.done():
                switched = True
                handler.release(1)  # the worker runs while the loop thread is between the checks
                concurrent.futures.wait([head.future], timeout=WAIT)

        pipeline._retire_done = retire_then_switch  # type: ignore[method-assign]
        # A PING behind the queued frame: held, and buffer_updated ends with collect().
        _feed(proto, enc.encode_bytes(wire.Ping(7)))
        assert await proto.receive(WAIT) == wire.Ping(7)
        assert switched and handler.seen[0][1] == 0 and transport.written == b""  # placed, no ABORT
        proto.connection_lost(None)

    asyncio.run(main())


def test_a_refused_run_fails_the_stream_and_nothing_after_it_is_placed() -> None:
    """A bad MAC in a later run: ABORT with the reason; runs and messages behind it never act."""

    async def main() -> None:
        handler = Handler(fail_at_gpa=2 * PAGE_SIZE)
        proto, transport, enc = _setup(handler)
        frames = [
            wire.PrivatePages(0, 1, bytes(52), _page(1, 1)),
            wire.PrivatePages(PAGE_SIZE, 1, bytes(52), _page(1, 2)),
            wire.PrivatePages(2 * PAGE_SIZE, 1, bytes(52), _page(1, 3)),  # refused by the handler
            wire.SharedPages(3 * PAGE_SIZE, 1, _page(1, 4)),
            wire.Prepare(4),
        ]
        _feed(proto, b"".join(enc.encode_bytes(f) for f in frames))
        handler.release(len(frames))  # the handler would take them all: the pipeline must not
        with pytest.raises(FirmwareError, match="MAC mismatch"):
            await proto.receive(WAIT)
        assert [s[1] for s in handler.seen] == [0, PAGE_SIZE, 2 * PAGE_SIZE]
        with pytest.raises(FirmwareError):  # the same end for every later receive: PREPARE is gone
            await proto.receive(WAIT)
        decoder = wire.FrameDecoder()
        (abort,) = decoder.feed(bytes(transport.written))
        assert isinstance(abort, wire.Abort) and "MAC mismatch" in abort.reason
        # Half-closed after the ABORT, not reset: see the lingering test below.
        assert transport.eof_written and not transport.closed and proto.pending_pages() == 0
        proto.connection_lost(None)

    asyncio.run(main())


@pytest.mark.parametrize(
    "frame",
    [wire.PrivatePages(0, 1, bytes(52), _page(1, 9)), wire.SharedPages(0, 1, _page(1, 9))],
    ids=["in-the-worker", "on-the-loop"],
)
def test_an_unexpected_handler_error_still_ends_the_stream_cleanly(frame: PageMsg) -> None:
    """A bug in the page handler (not a MigdError) ends the stream with an ABORT saying so,
    wherever the frame was placed: the worker (private runs) or the loop (a shared run)."""

    async def main() -> None:
        def broken(msg: PageMsg) -> None:
            raise KeyError("bug")

        proto = FrameProtocol()
        transport = FakeTransport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        proto.set_page_handler(broken)
        enc = wire.FrameEncoder()
        _feed(proto, enc.encode_bytes(frame) + enc.encode_bytes(wire.Prepare(1)))
        with pytest.raises(Exception, match="internal error while placing pages"):
            await proto.receive(WAIT)
        (abort,) = wire.FrameDecoder().feed(bytes(transport.written))
        assert isinstance(abort, wire.Abort) and "KeyError" in abort.reason
        proto.connection_lost(None)

    asyncio.run(main())


def test_a_refusing_side_lingers_so_its_abort_reaches_the_peer(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the ABORT the write side is shut (FIN) and what the peer still sends is read and
    dropped, so the kernel never resets the connection under the ABORT; the close comes when
    the peer closes too, or after LINGER_S at the latest. TLS (no half-close) closes at once."""
    from migd import stream

    monkeypatch.setattr(stream, "LINGER_S", 0.2)

    async def main() -> None:
        handler = Handler(fail_at_gpa=0)
        proto, transport, enc = _setup(handler)
        _feed(proto, enc.encode_bytes(wire.PrivatePages(0, 1, bytes(52), _page(1, 1))))
        handler.release(1)
        with pytest.raises(FirmwareError):
            await proto.receive(WAIT)
        assert transport.eof_written and not transport.closed
        written = len(transport.written)
        # The source does not know yet and keeps sending: dropped, no error, nothing placed.
        _feed(proto, b"\xff" * (300 * 1024))
        assert len(handler.seen) == 1 and len(transport.written) == written
        await _until(lambda: transport.closed)  # the peer never closed: LINGER_S bounds the wait

        tls = FakeTransport()
        tls.half_closable = False
        proto2 = FrameProtocol()
        proto2.connection_made(tls)  # type: ignore[arg-type]
        proto2.close()
        assert tls.closed and not tls.eof_written
        proto.connection_lost(None)
        proto2.connection_lost(None)

    asyncio.run(main())


def test_zero_and_shared_runs_with_nothing_queued_are_placed_at_once_on_the_loop() -> None:
    """No copy, no hand-off for a marker or a plain write; behind a queued private run they
    wait their turn in the worker (a page may change kind between rounds: order is everything)."""

    async def main() -> None:
        handler = Handler()
        proto, _, enc = _setup(handler)
        loop_thread = threading.current_thread().name
        handler.release(2)
        _feed(proto, enc.encode_bytes(wire.ZeroPages(0, 512)) + enc.encode_bytes(wire.SharedPages(0, 1, _page(1, 3))))
        assert [(s[0], s[3]) for s in handler.seen] == [("ZeroPages", loop_thread), ("SharedPages", loop_thread)]
        # A private run goes to the worker; the shared run for the same page behind it follows it there.
        _feed(proto, enc.encode_bytes(wire.PrivatePages(0, 1, bytes(52), _page(1, 4)))
              + enc.encode_bytes(wire.SharedPages(0, 1, _page(1, 5))))
        assert len(handler.seen) == 2  # both queued, nothing overtook
        handler.release(2)
        _feed(proto, enc.encode_bytes(wire.RoundEnd(0, 0)))
        assert await proto.receive(WAIT) == wire.RoundEnd(0, 0)
        assert [s[0] for s in handler.seen[2:]] == ["PrivatePages", "SharedPages"]
        assert all(s[3] != loop_thread for s in handler.seen[2:])
        assert handler.seen[-1][2] == _page(1, 5)  # the later content is what stays
        proto.connection_lost(None)

    asyncio.run(main())


def test_unthreaded_handler_runs_inline_with_the_receive_buffer_view() -> None:
    async def main() -> None:
        seen: list[bool] = []
        proto = FrameProtocol()
        proto.connection_made(FakeTransport())  # type: ignore[arg-type]
        proto.set_page_handler(lambda msg: seen.append(isinstance(msg.payload, memoryview)), threaded=False)
        _feed(proto, wire.FrameEncoder().encode_bytes(wire.SharedPages(0, 1, _page(1, 5))))
        assert seen == [True]
        proto.connection_lost(None)

    asyncio.run(main())


def test_page_frames_without_a_handler_are_a_protocol_error() -> None:
    async def main() -> None:
        proto = FrameProtocol()
        proto.connection_made(FakeTransport())  # type: ignore[arg-type]
        _feed(proto, wire.FrameEncoder().encode_bytes(wire.ZeroPages(0, 1)))
        with pytest.raises(Exception, match="unexpected ZERO_PAGES frame"):
            await proto.receive(WAIT)

    asyncio.run(main())


# ---------------------------------------------------------------------- before authentication


def test_before_authentication_a_page_frame_is_refused_from_its_length_prefix() -> None:
    """A frame announcing 2 MiB before mark_authenticated() ends the stream when its prefix
    arrives: the receive buffer stays at its initial 64 KiB and nothing near 2 MiB is ever
    allocated. The negative control: after mark_authenticated() the same frame is taken, and
    only then does the buffer grow to it."""
    frame = wire.FrameEncoder().encode_bytes(wire.SharedPages(0, 512, _page(512, 7)))
    # The first read fills the initial buffer; the transport then asks for room for the next one,
    # which is where an unbounded decoder grows to the announced frame.
    two_reads = frame[:INITIAL_RECEIVE_BUFFER + 4096]
    assert len(frame) > 2 << 20

    async def main() -> None:
        placed: list[tuple[int, bytes]] = []

        def handler(msg: PageMsg) -> None:
            placed.append((msg.npages, bytes(getattr(msg, "payload", b"")[:1])))

        proto = FrameProtocol(require_authentication=True)
        transport = FakeTransport()
        proto.connection_made(transport)  # type: ignore[arg-type]
        proto.set_page_handler(handler, threaded=False)
        assert not proto.authenticated.is_set()
        tracemalloc.start()
        try:
            _feed(proto, two_reads)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # Well under the frame's 2 MiB (msgpack takes 256 KiB of scratch to encode the ABORT).
        assert peak < 1 << 20, f"{peak} bytes allocated for a refused frame"
        assert proto.receive_buffer_bytes == INITIAL_RECEIVE_BUFFER
        with pytest.raises(ProtocolError, match=f"SHARED_PAGES frame of {len(frame)} bytes, at most "
                                                f"{MAX_FRAME_BEFORE_AUTHENTICATION} allowed"):
            await proto.receive(WAIT)
        (abort,) = wire.FrameDecoder().feed(bytes(transport.written))
        assert isinstance(abort, wire.Abort) and "at most" in abort.reason  # the peer is told why
        assert placed == []
        proto.connection_lost(None)

        trusted = FrameProtocol(require_authentication=True)
        trusted.connection_made(FakeTransport())  # type: ignore[arg-type]
        trusted.set_page_handler(handler, threaded=False)
        trusted.mark_authenticated()
        assert trusted.authenticated.is_set() and trusted.receive_buffer_bytes == INITIAL_RECEIVE_BUFFER
        _feed(trusted, frame)
        assert placed == [(512, b"\x07")]
        assert trusted.receive_buffer_bytes >= len(frame)
        trusted.connection_lost(None)

    asyncio.run(main())


def test_the_pre_authentication_bound_is_the_largest_control_frame() -> None:
    """64 KiB of metadata and no payload pass the size check; one byte more does not, whatever
    the type. (Only prefixes are fed: the decoder decides from them before buffering.)"""
    bound = MAX_FRAME_BEFORE_AUTHENTICATION
    assert bound == wire.PREFIX_SIZE + wire.MAX_META + wire.CRC_SIZE

    def prefix(ftype: wire.FrameType, total: int) -> bytes:
        return struct.pack(">IBH", total - 4, ftype, wire.MAX_META)

    for ftype in (wire.FrameType.HELLO, wire.FrameType.PRIVATE_PAGES):
        decoder = wire.FrameDecoder(initial=INITIAL_RECEIVE_BUFFER, max_frame=bound)
        assert decoder.feed(prefix(ftype, bound)) == [] and decoder.pending_bytes == wire.PREFIX_SIZE
    decoder = wire.FrameDecoder(initial=INITIAL_RECEIVE_BUFFER, max_frame=bound)
    with pytest.raises(ProtocolError, match=f"PRIVATE_PAGES frame of {bound + 1} bytes, at most {bound}"):
        decoder.feed(prefix(wire.FrameType.PRIVATE_PAGES, bound + 1))
    # Without the bound (an authenticated stream, or FrameProtocol() by default) only the type's
    # own limit applies.
    assert wire.FrameDecoder(initial=INITIAL_RECEIVE_BUFFER).feed(prefix(wire.FrameType.PRIVATE_PAGES, bound + 1)) == []
    assert FrameProtocol().authenticated.is_set()


# ---------------------------------------------------------------------- the control queue bound


def test_unread_control_messages_are_bounded_in_number() -> None:
    """MAX_QUEUED_CONTROL unread PINGs are kept; one more ends the stream with a ProtocolError
    and an ABORT to the peer instead of being buffered. The negative control: a reader that
    takes one message first makes room, and the same extra PING is kept."""
    encoder = wire.FrameEncoder()  # one stream: each frame's CRC covers its place in it
    pings = b"".join(encoder.encode_bytes(wire.Ping(i)) for i in range(MAX_QUEUED_CONTROL))
    one_more = encoder.encode_bytes(wire.Ping(MAX_QUEUED_CONTROL))

    async def main() -> None:
        for reader_took_one in (False, True):
            proto = FrameProtocol()
            transport = FakeTransport()
            proto.connection_made(transport)  # type: ignore[arg-type]
            _feed(proto, pings)
            assert transport.written == b"" and not transport.eof_written
            if reader_took_one:
                assert (await proto.receive(WAIT)) == wire.Ping(0)
            _feed(proto, one_more)
            if reader_took_one:
                assert transport.written == b"" and not transport.eof_written
                proto.connection_lost(None)
                continue
            assert transport.eof_written  # closing (it lingers so that the ABORT arrives)
            (abort,) = wire.FrameDecoder().feed(bytes(transport.written))
            assert isinstance(abort, wire.Abort) and "more control frames" in abort.reason
            for i in range(MAX_QUEUED_CONTROL):  # what was kept is still delivered, then the end
                assert (await proto.receive(WAIT)) == wire.Ping(i)
            with pytest.raises(ProtocolError, match=f"{MAX_QUEUED_CONTROL} waiting"):
                await proto.receive(WAIT)

    asyncio.run(main())


def test_unread_control_payloads_are_bounded_in_bytes() -> None:
    """A largest bitmap and a largest vCPU state fit in the queue together; a second largest
    bitmap while the first is unread ends the stream (the negative control: read first, it fits)."""
    encoder = wire.FrameEncoder()
    first = encoder.encode_bytes(wire.SharedBitmap(b"\x01" * MAX_BITMAP_BYTES))
    vcpu = encoder.encode_bytes(wire.VcpuState(0, None, b"\x02" * MAX_VCPU_STATE))
    second = encoder.encode_bytes(wire.SharedBitmap(b"\x03" * MAX_BITMAP_BYTES))

    async def main() -> None:
        for reader_took_one in (False, True):
            proto = FrameProtocol()
            transport = FakeTransport()
            proto.connection_made(transport)  # type: ignore[arg-type]
            proto.mark_authenticated()
            _feed(proto, first + vcpu, step=1 << 20)
            assert transport.written == b""
            if reader_took_one:
                assert isinstance(await proto.receive(WAIT), wire.SharedBitmap)
            _feed(proto, second, step=1 << 20)
            assert (transport.written == b"") is reader_took_one
            if not reader_took_one:
                (abort,) = wire.FrameDecoder().feed(bytes(transport.written))
                assert isinstance(abort, wire.Abort) and "more control frames" in abort.reason
            proto.connection_lost(None)

    asyncio.run(main())


class RecordingTransport(FakeTransport):
    """A transport that records each ``writelines`` call; ``tls`` makes it look like an SSL one."""

    def __init__(self, *, tls: bool) -> None:
        super().__init__()
        self.tls = tls
        self.calls: list[int] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return object() if self.tls else None
        return super().get_extra_info(name, default)

    def writelines(self, parts: list[bytes | memoryview]) -> None:
        self.calls.append(sum(len(p) for p in parts))
        super().writelines(parts)


def test_over_tls_a_large_frame_goes_to_the_transport_in_bounded_writes() -> None:
    """A 512-page run (the largest) reaches a TLS transport in writes of at most TLS_WRITE_BYTES, byte for
    byte the frame; the negative control is a plain transport, which gets it in one call."""
    payload = bytes(range(256)) * (512 * PAGE_SIZE // 256)
    msg = wire.SharedPages(0, 512, payload)
    expected = wire.FrameEncoder().encode_bytes(msg)

    async def main() -> None:
        for tls in (True, False):
            proto = FrameProtocol()
            transport = RecordingTransport(tls=tls)
            proto.connection_made(transport)  # type: ignore[arg-type]
            assert proto.write(msg) == len(expected)
            assert bytes(transport.written) == expected
            if tls:
                assert max(transport.calls) <= TLS_WRITE_BYTES
                assert len(transport.calls) == -(-len(expected) // TLS_WRITE_BYTES)
            else:
                assert transport.calls == [len(expected)]
            proto.connection_lost(None)

    asyncio.run(main())


@pytest.mark.parametrize("sizes", [[0], [10, 3 * 1024, 7], [4096 * 3], [1, 4096 * 2 - 1, 4096 * 2], [5000, 5000, 5000]])
def test_tls_write_batches_keep_order_and_bound_every_batch(sizes: list[int]) -> None:
    limit = 4096
    parts = [bytes([i % 251 + 1]) * n for i, n in enumerate(sizes)]
    batches = tls_write_batches(parts, limit)
    assert b"".join(bytes(v) for batch in batches for v in batch) == b"".join(parts)
    assert all(0 < sum(len(v) for v in batch) <= limit for batch in batches)
    # Only the last batch may be short: small buffers share a batch instead of making their own.
    assert all(sum(len(v) for v in batch) == limit for batch in batches[:-1])


def test_a_stopped_pipeline_lets_its_payload_buffers_go() -> None:
    """The pool of payload buffers (up to 8 x 2 MiB, all written) goes with the stream's end: an
    object that outlives the migration must not keep them."""

    async def main() -> None:
        handler = Handler()
        proto, _, enc = _setup(handler)
        runs = [wire.PrivatePages(i * PAGE_SIZE, 1, bytes(52), _page(1, i + 1)) for i in range(3)]
        _feed(proto, b"".join(enc.encode_bytes(r) for r in runs))
        handler.release(len(runs))
        _feed(proto, enc.encode_bytes(wire.RoundEnd(0, 0)))  # held: delivered once all are placed
        assert await proto.receive(WAIT) == wire.RoundEnd(0, 0)
        pipeline = proto._pipeline
        assert pipeline is not None and pipeline._buffers  # retired frames gave their buffers back
        proto.connection_lost(None)
        assert pipeline._buffers == []

    asyncio.run(main())
