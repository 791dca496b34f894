"""The migration stream codec: bytes in, messages out — no sockets."""

from __future__ import annotations

import struct
import zlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migd import wire
from migd.abi import PAGE_SIZE
from migd.errors import ProtocolError

GUEST = wire.GuestSpec("web-1", 4096, 0x5, efi=True, uefi_live_migration=True)

SAMPLES: list[wire.Message] = [
    wire.Hello("mig-1", GUEST, "bound"),
    wire.Welcome(b"-----BEGIN CERTIFICATE-----\n...\n"),
    wire.Session(b"pdh", bytes(range(128)), 0x5),
    wire.SessionAck(),
    wire.PrivatePages(8 * PAGE_SIZE, 2, bytes(range(52)), bytes(range(256)) * 32),
    wire.SharedPages(0, 1, b"\xab" * PAGE_SIZE),
    wire.ZeroPages(16 * PAGE_SIZE, 300),
    wire.RoundEnd(3, 1234),
    wire.SharedBitmap(b"bitmap-bytes"),
    wire.VcpuState(0, bytes(52), bytes(PAGE_SIZE)),
    wire.VcpuState(1, None, b"plain vcpu state"),
    wire.Prepare(4096),
    wire.Prepared(4096),
    wire.Commit(),
    wire.Started(),
    wire.Abort("destination refused: guest exists"),
    wire.Resolve("mig-1"),
    wire.Resolved("mig-1", "committed"),
    wire.Ping(7),
    wire.Pong(7),
]


def _same(a: wire.Message, b: wire.Message) -> bool:
    def norm(m: wire.Message) -> dict[str, object]:
        return {k: bytes(v) if isinstance(v, memoryview) else v for k, v in vars(m).items()}

    return type(a) is type(b) and norm(a) == norm(b)


def _frame(ftype: int, meta: object, payload: bytes = b"", sequence: int = 0) -> bytes:
    """A hand-built frame (any meta, even a wrong one) with a valid CRC for ``sequence``."""
    packed = meta if isinstance(meta, bytes) else msgpack.packb(meta, use_bin_type=True)
    body = struct.pack(">BH", ftype, len(packed)) + packed + payload
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<Q", sequence)))
    return struct.pack(">I", len(body) + 4) + body + struct.pack(">I", crc)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: wire.Message) -> None:
    (out,) = wire.FrameDecoder().feed(wire.encode_bytes(msg))
    assert _same(out, msg)


def test_stream_split_at_every_byte_boundary() -> None:
    data = wire.encode_stream(SAMPLES)
    for cut in range(0, len(data), 97):
        dec = wire.FrameDecoder(initial=64)
        got = dec.feed(data[:cut]) + dec.feed(data[cut:])
        assert len(got) == len(SAMPLES)
        assert all(_same(a, b) for a, b in zip(got, SAMPLES))
    dec = wire.FrameDecoder(initial=16)
    got = [m for i in range(len(data)) for m in dec.feed(data[i : i + 1])]
    assert all(_same(a, b) for a, b in zip(got, SAMPLES))


def test_buffered_protocol_path_gives_views_into_its_buffer() -> None:
    dec = wire.FrameDecoder(initial=1024)
    data = wire.encode_bytes(wire.SharedPages(0, 3, b"\x11" * 3 * PAGE_SIZE))
    got: list[wire.Message] = []
    pos = 0
    while pos < len(data):
        buf = dec.get_buffer()
        n = min(len(buf), 1000, len(data) - pos)
        buf[:n] = data[pos : pos + n]
        pos += n
        got += dec.buffer_updated(n)
    (msg,) = got
    assert isinstance(msg, wire.SharedPages) and isinstance(msg.payload, memoryview)
    assert bytes(msg.payload) == b"\x11" * 3 * PAGE_SIZE
    assert dec.pending_bytes == 0


def test_encode_does_not_copy_the_payload() -> None:
    ram = bytearray(b"\x22" * 2 * PAGE_SIZE)
    parts = wire.encode(wire.SharedPages(0, 2, memoryview(ram)))
    assert parts[1].obj is ram  # type: ignore[union-attr]


def test_truncated_frame_yields_nothing_yet() -> None:
    data = wire.encode_bytes(wire.SharedPages(0, 1, bytes(PAGE_SIZE)))
    dec = wire.FrameDecoder()
    assert dec.feed(data[:-1]) == []
    assert dec.pending_bytes == len(data) - 1
    assert len(dec.feed(data[-1:])) == 1


def test_oversized_length_rejected_before_buffering() -> None:
    dec = wire.FrameDecoder(initial=64)
    header = struct.pack(">IBH", 0xFFFFFFF0, wire.FrameType.SHARED_PAGES, 10)
    with pytest.raises(ProtocolError, match="at most"):
        dec.feed(header)
    assert len(dec._buf) == 64  # nothing was allocated for the claimed length


def test_control_frame_with_payload_rejected() -> None:
    with pytest.raises(ProtocolError, match="at most 0"):
        wire.FrameDecoder().feed(_frame(wire.FrameType.COMMIT, {}, b"x"))


@pytest.mark.parametrize(
    "frame, match",
    [
        (_frame(99, {}), "unknown frame type"),
        (struct.pack(">IBH", 7, wire.FrameType.COMMIT, 5), "shorter than its metadata"),
        (_frame(wire.FrameType.COMMIT, b"\xc1\xc1"), "not valid msgpack"),
        (_frame(wire.FrameType.COMMIT, {})[:-1] + b"\x00", "CRC32"),
        (_frame(wire.FrameType.COMMIT, [1, 2]), "must be a map"),
        (_frame(wire.FrameType.SHARED_PAGES, {"gpa": 0}, bytes(PAGE_SIZE)), "missing field 'n'"),
        (_frame(wire.FrameType.SHARED_PAGES, {"gpa": "0", "n": 1}, bytes(PAGE_SIZE)), "type str"),
        (_frame(wire.FrameType.SHARED_PAGES, {"gpa": 1, "n": 1}, bytes(PAGE_SIZE)), "not page aligned"),
        (_frame(wire.FrameType.SHARED_PAGES, {"gpa": 0, "n": 2}, bytes(PAGE_SIZE)), "need 8192 payload"),
        (_frame(wire.FrameType.SHARED_PAGES, {"gpa": 0, "n": 0}, b""), "must be in"),
        (_frame(wire.FrameType.ZERO_PAGES, {"gpa": -4096, "n": 1}), "must be in"),
        (_frame(wire.FrameType.ZERO_PAGES, {"gpa": (1 << 26) * PAGE_SIZE, "n": 1}), "past any guest"),
        (_frame(wire.FrameType.ZERO_PAGES, {"gpa": 0, "n": True}), "boolean"),
        (_frame(wire.FrameType.PRIVATE_PAGES, {"gpa": 0, "n": 1, "hdr": bytes(51)}, bytes(PAGE_SIZE)), "52 bytes"),
        (_frame(wire.FrameType.SESSION, {"pdh": b"x", "blob": bytes(127), "policy": 0}), "128 bytes"),
        (_frame(wire.FrameType.HELLO, {"id": "m", "guest": {}, "transport": "bound", "version": 1, "caps": []}),
         "missing field 'name'"),
        (_frame(wire.FrameType.HELLO, {"id": "m", "guest": {"name": "g", "npages": 1 << 30, "policy": 0,
                                                             "efi": False}, "transport": "b", "version": 1,
                                       "caps": []}), "npages"),
        (_frame(wire.FrameType.VCPU_STATE, {"vcpu": 0, "hdr": bytes(52)}, b"short"), "VMSA packet"),
        (_frame(wire.FrameType.SHARED_BITMAP, {}), "empty bitmap"),
        (_frame(wire.FrameType.ABORT, {"reason": "x" * 2000}), "longer than"),
    ],
)
def test_malformed_frames_raise_protocol_error(frame: bytes, match: str) -> None:
    dec = wire.FrameDecoder()
    with pytest.raises(ProtocolError, match=match):
        dec.feed(frame)
    with pytest.raises(ProtocolError, match="already failed"):  # a failed stream stays failed
        dec.feed(wire.encode_bytes(wire.Commit()))


def test_encoder_refuses_oversized_payload() -> None:
    with pytest.raises(ProtocolError):
        wire.encode(wire.SharedPages(0, 1, bytes(wire.MAX_RUN_PAGES * PAGE_SIZE + 1)))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_ever_raise_protocol_error(data: bytes) -> None:
    dec = wire.FrameDecoder(initial=64)
    try:
        dec.feed(data)
    except ProtocolError:
        pass
    assert len(dec._buf) <= wire.PREFIX_SIZE + wire.MAX_META + wire.MAX_PAYLOAD


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SAMPLES), st.integers(0, 10_000), st.integers(0, 255))
def test_mutated_valid_frames_only_raise_protocol_error(msg: wire.Message, pos: int, value: int) -> None:
    data = bytearray(wire.encode_bytes(msg))
    data[pos % len(data)] = value
    try:
        wire.FrameDecoder(initial=64).feed(bytes(data))
    except ProtocolError:
        pass


STREAM = [wire.Hello("m", GUEST, "bound"), wire.SharedPages(0, 1, b"\x01" * PAGE_SIZE),
          wire.SharedPages(PAGE_SIZE, 1, b"\x02" * PAGE_SIZE), wire.ZeroPages(2 * PAGE_SIZE, 4), wire.Commit()]


def _frames(messages: list[wire.Message]) -> list[bytes]:
    encoder = wire.FrameEncoder()
    return [encoder.encode_bytes(m) for m in messages]


def _decode_all(frames: list[bytes]) -> list[wire.Message]:
    return wire.FrameDecoder().feed(b"".join(frames))


def test_intact_stream_decodes_in_order() -> None:
    """Negative control for the integrity tests below."""
    assert [type(m) for m in _decode_all(_frames(STREAM))] == [type(m) for m in STREAM]


@pytest.mark.parametrize("offset", [4, 5, 7, 20, 200, -5, -1])
def test_a_flipped_bit_anywhere_fails_the_crc(offset: int) -> None:
    frames = _frames(STREAM)
    damaged = bytearray(frames[1])
    damaged[offset] ^= 0x10
    frames[1] = bytes(damaged)
    with pytest.raises(ProtocolError):
        _decode_all(frames)


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda f: f[:1] + f[2:], id="drop"),
        pytest.param(lambda f: f[:2] + [f[1]] + f[2:], id="duplicate"),
        pytest.param(lambda f: f[:3] + [f[1]] + f[3:], id="replay"),
        pytest.param(lambda f: [f[0], f[2], f[1], *f[3:]], id="swap"),
    ],
)
def test_dropped_duplicated_replayed_or_swapped_frames_fail_the_crc(mutate: object) -> None:
    frames = mutate(_frames(STREAM))  # type: ignore[operator]
    with pytest.raises(ProtocolError, match="CRC32"):
        _decode_all(frames)


def test_each_direction_counts_its_own_frames() -> None:
    """A fresh decoder expects frame 0: a stream cannot be spliced in mid-way."""
    frames = _frames(STREAM)
    with pytest.raises(ProtocolError, match="frame 0"):
        wire.FrameDecoder().feed(frames[2])


def test_frame_crc_is_zlibs_crc32_whichever_implementation_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast CRC (ISA-L when installed) must be zlib's CRC-32 exactly: it is the wire format."""
    assert wire._crc32(b"123456789", 0) == 0xCBF43926  # the CRC-32/ISO-HDLC check value (CRC-32C: 0xE3069283)
    payload = bytes(range(256)) * 4099
    head = b"\x05\x00\x10meta"
    expected = zlib.crc32(payload, zlib.crc32(head, zlib.crc32(struct.pack("<Q", 9))))
    assert wire._crc(9, head, memoryview(payload)) == expected
    assert wire._crc(10, head, payload) != expected  # the sequence number is in it
    # Without the optional accelerator: zlib's own.
    import builtins

    real_import = builtins.__import__

    def no_isal(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("isal"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", no_isal)
    assert wire._load_crc32() is zlib.crc32
