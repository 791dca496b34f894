"""The fault proxy itself, against a plain recording echo server on 127.0.0.1.

Every fault is checked twice: the record says it fired, and the bytes the far end got
show exactly that change and nothing else (a pass-through run is the control).
"""

from __future__ import annotations

import asyncio
import functools
import os
import struct
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import msgpack
import pytest

from migd import wire
from migd.abi import PAGE_SIZE
from migd.errors import ProtocolError
from migd.wire import FrameType

from faultproxy import (
    Cut,
    CutBeforeFrame,
    StallBeforeFrame,
    Direction,
    DropFrame,
    DuplicateFrame,
    Fault,
    FaultProxy,
    FlipBit,
    FlipFrameBit,
    FrameSelector,
    Framing,
    Region,
    ReplayFrame,
    RollbackFrame,
    Stall,
    SwapFrames,
)

UP, DOWN = Direction.UPSTREAM, Direction.DOWNSTREAM
pytestmark = pytest.mark.fault_class("fault proxy self-test")
P = FrameType.PRIVATE_PAGES
SH = FrameType.SHARED_PAGES


def run(coro_fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh loop, bounded in time."""

    @functools.wraps(coro_fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(20):
                await coro_fn(*args, **kwargs)

        asyncio.run(bounded())

    return wrapper


class EchoServer:
    """Echoes every byte back and keeps what each connection sent (the far end of the proxy)."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.received: list[bytearray] = []
        self.ended: list[asyncio.Event] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        got = bytearray()
        ended = asyncio.Event()
        self.received.append(got)
        self.ended.append(ended)
        try:
            if self.greeting:
                writer.write(self.greeting)
            while data := await reader.read(65536):
                got += data
                writer.write(data)
                await writer.drain()
            writer.close()
        except ConnectionError:
            pass
        finally:
            ended.set()

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()


async def exchange(faults: Sequence[Fault], payload: bytes, *, greeting: bytes = b"", framing: Framing = Framing.MIGD,
                   observe: bool = False, read_timeout: float = 5.0) -> tuple[bytes, bytes, bytes, FaultProxy]:
    """Send ``payload`` through a proxy to the echo server; (server got, client got back, greeting part, proxy)."""
    echo = EchoServer(greeting)
    port = await echo.start()
    proxy = FaultProxy("127.0.0.1", port, faults, framing=framing, observe=observe)
    await proxy.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(payload)
    back = bytearray()
    try:
        await writer.drain()
        writer.write_eof()
        async with asyncio.timeout(read_timeout):
            while data := await reader.read(65536):
                back += data
    except ConnectionError:
        pass
    writer.close()
    async with asyncio.timeout(5):
        while not echo.ended or not echo.ended[0].is_set():
            await asyncio.sleep(0.01)
    await proxy.close()
    await echo.close()
    return bytes(echo.received[0]), bytes(back), greeting, proxy


# ---------------------------------------------------------------------- byte faults


@run
async def test_pass_through_is_exact() -> None:
    payload = os.urandom(3 << 20)
    got, back, _, proxy = await exchange([], payload)
    assert got == payload and back == payload
    assert proxy.records == [] and proxy.connections == 1
    assert proxy.bytes_forwarded == {UP: len(payload), DOWN: len(payload)}


@run
async def test_cut_upstream_after_n_bytes() -> None:
    payload = os.urandom(1 << 20)
    got, back, _, proxy = await exchange([Cut(100_000)], payload)
    assert got == payload[:100_000]  # exactly N bytes arrived, then the connection was reset
    assert len(back) <= 100_000
    (cut,) = proxy.fired("cut")
    assert (cut.direction, cut.offset) == (UP, 100_000)


@run
async def test_cut_downstream_after_n_bytes() -> None:
    payload = os.urandom(1 << 20)
    got, back, _, proxy = await exchange([Cut(5000, DOWN)], payload)
    assert back == payload[:5000]
    (cut,) = proxy.fired("cut")
    assert (cut.direction, cut.offset) == (DOWN, 5000)


@run
async def test_cut_at_zero_forwards_nothing() -> None:
    got, back, _, proxy = await exchange([Cut(0)], b"hello")
    assert got == b"" and back == b""
    assert len(proxy.fired("cut")) == 1


@run
async def test_flip_bit_changes_exactly_one_byte() -> None:
    payload = os.urandom(600_000)
    got, back, _, proxy = await exchange([FlipBit(300_001, bit=5)], payload)
    (flip,) = proxy.fired("flip")
    assert flip.offset == 300_001 and flip.old == payload[300_001] and flip.new == payload[300_001] ^ 0x20
    diff = [i for i in range(len(payload)) if got[i] != payload[i]]
    assert diff == [300_001] and got[300_001] == flip.new
    assert back == got  # the echo carries the flipped byte back unchanged


@run
async def test_flip_downstream_only_touches_that_direction() -> None:
    payload = bytes(1000)
    got, back, _, proxy = await exchange([FlipBit(10, bit=0, direction=DOWN)], payload)
    assert got == payload
    assert back[10] == 1 and back[:10] + back[11:] == payload[:10] + payload[11:]
    assert proxy.fired("flip")[0].direction is DOWN


@run
async def test_stall_delays_one_direction_only() -> None:
    """Stall upstream at byte 10 for 0.6 s: later upstream bytes wait, downstream keeps flowing."""
    echo = EchoServer()
    port = await echo.start()
    async with FaultProxy("127.0.0.1", port, [Stall(10, 0.6)]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a" * 10)
        assert await reader.readexactly(10) == b"a" * 10  # before the stall point: prompt
        started = time.monotonic()
        writer.write(b"b" * 10)
        assert await reader.readexactly(10) == b"b" * 10
        waited = time.monotonic() - started
        writer.close()
    await echo.close()
    assert 0.55 <= waited < 5
    (stall,) = proxy.fired("stall")
    assert (stall.offset, stall.seconds) == (10, 0.6)


@run
async def test_stall_leaves_the_other_direction_flowing() -> None:
    greeting = b"x" * 1000
    echo = EchoServer(greeting)
    port = await echo.start()
    async with FaultProxy("127.0.0.1", port, [Stall(0, 2.0)]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"blocked")
        started = time.monotonic()
        assert await reader.readexactly(1000) == greeting  # downstream is not held by the upstream stall
        assert time.monotonic() - started < 1.0
        assert echo.received[0] == b""  # while upstream is still held
        writer.close()
    await echo.close()
    assert proxy.fired("stall")


@run
async def test_faults_apply_per_connection() -> None:
    echo = EchoServer()
    port = await echo.start()
    async with FaultProxy("127.0.0.1", port, [FlipBit(0)]) as proxy:
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(b"\x00")
            assert await reader.readexactly(1) == b"\x01"
            writer.close()
    await echo.close()
    assert [r.connection for r in proxy.fired("flip")] == [0, 1]


def test_rejects_non_loopback_targets_and_bad_faults() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("192.0.2.1", 4444)
    with pytest.raises(ValueError, match="bit"):
        FaultProxy("127.0.0.1", 4444, [FlipBit(0, bit=8)])
    with pytest.raises(ValueError, match="offset"):
        FaultProxy("127.0.0.1", 4444, [Cut(-1)])
    with pytest.raises(ValueError, match="migd framing"):
        FaultProxy("127.0.0.1", 4444, [RollbackFrame(frozenset({P}))], framing=Framing.TLS)


# ---------------------------------------------------------------------- frame faults (migd framing)


def _private(gpa_page: int, npages: int = 1, fill: int = 0) -> wire.PrivatePages:
    return wire.PrivatePages(gpa_page * PAGE_SIZE, npages, bytes([fill]) * 52, bytes([fill]) * (npages * PAGE_SIZE))


def _shared(gpa_page: int, fill: int) -> wire.SharedPages:
    return wire.SharedPages(gpa_page * PAGE_SIZE, 1, bytes([fill]) * PAGE_SIZE)


def _stream() -> list[wire.Message]:
    """A small migration-like stream: handshake, a round of pages, a re-sent round, the end."""
    msgs: list[wire.Message] = [wire.Hello("m1", wire.GuestSpec("g1", 256, 0), "bound")]
    msgs += [_private(i * 2, 2, fill=i) for i in range(5)]  # pages 0..9, fills 0..4
    msgs += [_shared(20 + i, fill=100 + i) for i in range(3)]
    msgs += [wire.RoundEnd(0, 3), _private(4, 1, fill=50), _private(300, 1, fill=51), wire.Prepare(9)]
    return msgs


def _encode(msgs: Sequence[wire.Message]) -> bytes:
    return wire.encode_stream(list(msgs))


def _decode(frame: bytes) -> wire.Message:
    """One raw migd frame's message, its CRC trailer not checked (the proxy may have moved it)."""
    _, ftype, meta_len = struct.unpack_from(">IBH", frame)
    view = memoryview(frame)
    return wire.detached(wire.decode_frame(ftype, view[7 : 7 + meta_len], view[7 + meta_len : -wire.CRC_SIZE]))


def _frames(data: bytes) -> list[bytes]:
    """Split a migd stream into raw frames."""
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos : pos + 4 + length])
        pos += 4 + length
    return out


async def _through(
    faults: Sequence[Fault], msgs: Sequence[wire.Message] | None = None
) -> tuple[list[bytes], list[bytes], FaultProxy]:
    sent = _encode(msgs if msgs is not None else _stream())
    got, back, _, proxy = await exchange(faults, sent)
    assert back == got
    return _frames(sent), _frames(got), proxy


@run
async def test_observe_counts_frames_without_changing_them() -> None:
    sent, got, proxy = await _through([])
    assert got == sent and proxy.frames(P) == 0  # not parsed: no frame fault, no observe
    data = _encode(_stream())
    got_bytes, _, _, proxy = await exchange([], data, observe=True)
    assert got_bytes == data
    assert proxy.frames(P) == 7 and proxy.frames(SH) == 3 and proxy.frames(FrameType.HELLO) == 1


@run
async def test_drop_frame() -> None:
    sent, got, proxy = await _through([DropFrame(FrameSelector.of(P, index=2))])
    (drop,) = proxy.fired("drop")
    assert drop.frame is not None and drop.frame.type == P and drop.frame.gpa == 4 * PAGE_SIZE
    assert got == sent[:3] + sent[4:]  # HELLO, P0, P1, (P2 dropped), P3 ...


@run
async def test_duplicate_frame() -> None:
    sent, got, proxy = await _through([DuplicateFrame(FrameSelector.of(SH, index=1))])
    (dup,) = proxy.fired("duplicate")
    assert dup.frame is not None and dup.frame.ordinal == 7
    assert got == sent[:8] + [sent[7]] + sent[8:]


@run
async def test_replay_frame_after_n_more() -> None:
    sent, got, proxy = await _through([ReplayFrame(FrameSelector.of(P, index=0), after=3)])
    (replay,) = proxy.fired("replay")
    assert replay.frame is not None and replay.frame.ordinal == 1
    assert replay.partner is not None and replay.partner.ordinal == 4
    assert got == sent[:5] + [sent[1]] + sent[5:]


@run
async def test_rollback_replays_the_older_copy_after_the_newer() -> None:
    sent, got, proxy = await _through([RollbackFrame(frozenset({P}))])
    (rollback,) = proxy.fired("rollback")
    # page 4 went first in P2 (pages 4-5, fill 2), again later alone (fill 50): the old run follows the new.
    assert rollback.frame is not None and rollback.frame.gpa == 4 * PAGE_SIZE and rollback.frame.npages == 2
    assert rollback.partner is not None and rollback.partner.npages == 1
    assert got == sent[:11] + [sent[3]] + sent[11:]
    replayed = _decode(got[11])
    assert isinstance(replayed, wire.PrivatePages) and bytes(replayed.payload[:1]) == b"\x02"


@run
async def test_after_type_counts_only_frames_after_that_type() -> None:
    # the first private frame after ROUND_END is ordinal 10 (page 4 re-sent)
    sent, got, proxy = await _through([DropFrame(FrameSelector.of(P, after_type=FrameType.ROUND_END))])
    (drop,) = proxy.fired("drop")
    assert drop.frame is not None and drop.frame.ordinal == 10 and drop.frame.gpa == 4 * PAGE_SIZE
    assert got == sent[:10] + sent[11:]


@run
async def test_cut_before_a_frame() -> None:
    data = _encode(_stream())
    sent = _frames(data)
    got, _, _, proxy = await exchange([CutBeforeFrame(FrameSelector.of(FrameType.ROUND_END))], data)
    (cut,) = proxy.fired("cut")
    assert cut.frame is not None and cut.frame.ordinal == 9 and cut.offset == len(b"".join(sent[:9]))
    assert _frames(got) == sent[:9]  # everything before it arrived, nothing from it on


@run
async def test_stall_before_a_frame() -> None:
    """Frames before the selected one arrive at once; it and the rest wait, then arrive intact."""
    data = _encode(_stream())
    sent = _frames(data)
    before = b"".join(sent[:9])  # ROUND_END is ordinal 9
    echo = EchoServer()
    port = await echo.start()
    async with FaultProxy("127.0.0.1", port, [StallBeforeFrame(FrameSelector.of(FrameType.ROUND_END), 1.5)]) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(data)
        started = time.monotonic()
        assert await reader.readexactly(len(before)) == before
        prompt = time.monotonic() - started
        assert await reader.readexactly(len(data) - len(before)) == data[len(before):]
        waited = time.monotonic() - started
        writer.close()
    await echo.close()
    assert prompt < 1.0 and 1.45 <= waited < 10
    (stall,) = proxy.fired("stall")
    assert stall.frame is not None and stall.frame.ordinal == 9 and stall.seconds == 1.5
    assert stall.offset == len(before)


@run
async def test_stall_now_and_cut_now() -> None:
    """Faults at a moment: a stall holds what comes next; a cut resets the connection."""
    echo = EchoServer()
    port = await echo.start()
    async with FaultProxy("127.0.0.1", port) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        writer.write(b"a" * 10)
        assert await reader.readexactly(10) == b"a" * 10
        proxy.stall_now(1.5)
        started = time.monotonic()
        writer.write(b"b" * 10)
        assert await reader.readexactly(10) == b"b" * 10
        assert 1.45 <= time.monotonic() - started < 10
        assert proxy.cut_now() == 1
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            async with asyncio.timeout(5):
                writer.write(b"c" * 10)
                await reader.readexactly(10)
        writer.close()
    await echo.close()
    assert [r.action for r in proxy.fired()] == ["stall", "cut"]
    assert proxy.cut_now() == 0  # nothing left to cut


@run
async def test_rollback_deferred_to_a_later_frame_type() -> None:
    sent, got, proxy = await _through([RollbackFrame(frozenset({P}), before_type=FrameType.PREPARE)])
    (rollback,) = proxy.fired("rollback")
    assert rollback.frame is not None and rollback.frame.ordinal == 3
    assert rollback.partner is not None and rollback.partner.ordinal == 10
    assert got == sent[:12] + [sent[3]] + sent[12:]  # right before PREPARE (ordinal 12)


@run
async def test_swap_two_consecutive_page_frames() -> None:
    sent, got, proxy = await _through([SwapFrames(FrameSelector.of(P, SH, index=4))])
    (swap,) = proxy.fired("swap")
    assert swap.frame is not None and swap.partner is not None
    assert (swap.frame.ordinal, swap.partner.ordinal) == (5, 6)
    assert got == sent[:5] + [sent[6], sent[5]] + sent[7:]


@run
async def test_swap_skips_a_frame_whose_successor_does_not_match() -> None:
    # the 3rd shared frame is followed by ROUND_END: the swap moves on to the next consecutive pair
    sent, got, proxy = await _through([SwapFrames(FrameSelector.of(P, SH, index=7))])
    (swap,) = proxy.fired("swap")
    assert swap.frame is not None and swap.partner is not None
    assert (swap.frame.ordinal, swap.partner.ordinal) == (10, 11)
    assert got == sent[:10] + [sent[11], sent[10]] + sent[12:]


@run
async def test_swap_held_at_end_of_stream_is_released() -> None:
    msgs = _stream()[:2]
    sent, got, proxy = await _through([SwapFrames(FrameSelector.of(P))], msgs)
    assert got == sent and proxy.fired("swap") == []


@pytest.mark.parametrize(
    ("region", "offset", "where"),
    [(Region.PREFIX, 4, lambda f: 4), (Region.META, 0, lambda f: 7), (Region.PAYLOAD, -1, lambda f: len(f) - 5),
     (Region.TRAILER, 0, lambda f: len(f) - 4)],
)
def test_flip_in_a_frame_region(region: Region, offset: int, where: Callable[[bytes], int]) -> None:
    @run
    async def main() -> None:
        sent, got, proxy = await _through([FlipFrameBit(FrameSelector.of(P, index=1), region, offset, bit=3)])
        (flip,) = proxy.fired("flip")
        assert flip.frame is not None and flip.frame.ordinal == 2
        raw = _encode(_stream())
        got_bytes = b"".join(got)
        at = flip.frame.offset + where(sent[2])
        assert proxy.flip_offsets == [at]
        assert [i for i in range(len(raw)) if raw[i] != got_bytes[i]] == [at]
        assert got_bytes[at] == raw[at] ^ 8 and (flip.old, flip.new) == (raw[at], raw[at] ^ 8)

    main()


@run
async def test_flip_a_metadata_field_moves_the_run() -> None:
    # index 1 among the frames that can take the flip: P0 (gpa 0, a fixint) does not count
    sent, got, proxy = await _through([FlipFrameBit(FrameSelector.of(P, index=1), field="gpa", bit=12)])
    (flip,) = proxy.fired("flip")
    decoded = [_decode(f) for f in got]
    original = [_decode(f) for f in sent]
    assert isinstance(decoded[3], wire.PrivatePages) and isinstance(original[3], wire.PrivatePages)
    assert decoded[3].gpa == original[3].gpa ^ PAGE_SIZE  # gpa page 4 → page 5
    assert flip.frame is not None and flip.frame.gpa == original[3].gpa and flip.frame.ordinal == 3
    assert [m for i, m in enumerate(decoded) if i != 3] == [m for i, m in enumerate(original) if i != 3]


@run
async def test_flip_field_skips_frames_that_cannot_take_it() -> None:
    # gpa 0 is a msgpack fixint: bit 12 cannot be flipped in place, so index 0 is the next frame
    sent, got, proxy = await _through([FlipFrameBit(FrameSelector.of(P, index=0), field="gpa", bit=12)])
    (flip,) = proxy.fired("flip")
    assert flip.frame is not None and flip.frame.ordinal == 2


@run
async def test_oversized_length_field_stops_parsing_and_forwards_raw() -> None:
    bogus = struct.pack(">IBH", 0x7FFFFFFF, 5, 0) + b"tail"
    data = _encode(_stream()[:3]) + bogus
    got, _, _, proxy = await exchange([DropFrame(FrameSelector.of(FrameType.PREPARE))], data)
    assert got == data
    (lost,) = proxy.records
    assert lost.action == "framing-lost" and proxy.fired() == []


# ---------------------------------------------------------------------- accident vs attacker (CRC trailers)


@run
async def test_frame_faults_keep_the_senders_crc_so_the_receiver_sees_them() -> None:
    data = _encode(_stream())
    got, _, _, proxy = await exchange([DropFrame(FrameSelector.of(P, index=1))], data)
    assert proxy.fired("drop")
    with pytest.raises(ProtocolError, match="CRC32"):
        wire.FrameDecoder().feed(got)


@pytest.mark.parametrize(
    "fault",
    [
        DropFrame(FrameSelector.of(P, index=1)),
        DuplicateFrame(FrameSelector.of(SH)),
        ReplayFrame(FrameSelector.of(P), after=2),
        RollbackFrame(frozenset({P})),
        SwapFrames(FrameSelector.of(P, index=1)),
        FlipFrameBit(FrameSelector.of(SH), Region.PAYLOAD, 100, 0),
    ],
    ids=["drop", "duplicate", "replay", "rollback", "swap", "flip"],
)
def test_reseal_makes_every_frame_fault_pass_the_crc(fault: Fault) -> None:
    """The attacker model: frames renumbered and re-checksummed, so the stream decodes cleanly."""

    @run
    async def main() -> None:
        data = _encode(_stream())
        echo = EchoServer()
        port = await echo.start()
        async with FaultProxy("127.0.0.1", port, [fault], reseal=True) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            writer.write(data)
            writer.write_eof()
            async with asyncio.timeout(5):
                while await reader.read(65536):
                    pass
            writer.close()
        await echo.close()
        assert proxy.fired()
        got = bytes(echo.received[0])
        assert got != data
        messages = wire.FrameDecoder().feed(got)  # every CRC valid, in the receiver's numbering
        assert len(messages) == len(_frames(got))

    main()


def test_reseal_of_an_untouched_stream_is_the_identity() -> None:
    frames = _frames(_encode(_stream()))
    from faultproxy import reseal

    assert [reseal(f, i) for i, f in enumerate(frames)] == frames


def test_reseal_needs_migd_framing() -> None:
    with pytest.raises(ValueError, match="migd framing"):
        FaultProxy("127.0.0.1", 4444, reseal=True, framing=Framing.TLS)


# ---------------------------------------------------------------------- TLS record framing


def _records(sizes: Sequence[int], ctype: int = 23) -> list[bytes]:
    return [struct.pack(">BHH", ctype, 0x0303, n) + bytes([i % 256]) * n for i, n in enumerate(sizes)]


@run
async def test_tls_framing_selects_records_by_size() -> None:
    records = _records([50, 3000, 80, 16000, 16000, 16000])
    faults: list[Fault] = [DropFrame(FrameSelector.of(23, index=1, min_payload=1000))]
    got, _, _, proxy = await exchange(faults, b"".join(records), framing=Framing.TLS)
    assert got == b"".join(records[:3] + records[4:])
    (drop,) = proxy.fired("drop")
    assert drop.frame is not None and drop.frame.ordinal == 3 and drop.frame.payload_len == 16000


@run
async def test_tls_flip_in_record_payload() -> None:
    records = _records([100, 2000, 2000])
    faults: list[Fault] = [FlipFrameBit(FrameSelector.of(23, index=1, min_payload=1000), Region.PAYLOAD, 7)]
    got, _, _, proxy = await exchange(faults, b"".join(records), framing=Framing.TLS)
    sent = b"".join(records)
    (at,) = proxy.flip_offsets
    assert at == len(records[0]) + len(records[1]) + 5 + 7
    assert [i for i in range(len(sent)) if sent[i] != got[i]] == [at]


def test_meta_helper_agrees_with_msgpack_encoding() -> None:
    """The field locator finds the value bytes msgpack wrote (uint16, uint32 and uint64 encodings)."""
    from faultproxy import _uint_field_bit

    for value in (0x1000, 0x12345000, 0x1234_5678_9000):
        meta = msgpack.packb({"gpa": value, "n": 1})
        at = _uint_field_bit(meta, "gpa", 12)
        assert at is not None
        flipped = bytearray(meta)
        flipped[at] ^= 1 << (12 % 8)
        assert msgpack.unpackb(bytes(flipped))["gpa"] == value ^ (1 << 12)
    assert _uint_field_bit(msgpack.packb({"gpa": 0}), "gpa", 12) is None
    assert _uint_field_bit(msgpack.packb({"n": 1}), "gpa", 0) is None
