"""The migration stream codec: bytes in, messages out — no sockets."""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import typing
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


def test_missing_bytes_says_how_far_a_read_may_go_without_passing_the_frame() -> None:
    """What a reader may still read without passing the end of the frame under way: the prefix
    first, then the rest of the frame once its prefix is known, at least one byte between frames."""
    encoder = wire.FrameEncoder()  # the CRC covers each frame's number in the stream
    first = encoder.encode_bytes(wire.SharedPages(0, 1, bytes(PAGE_SIZE)))
    data = first + encoder.encode_bytes(wire.ZeroPages(0, 1))
    dec = wire.FrameDecoder()
    assert dec.missing_bytes == wire.PREFIX_SIZE
    assert dec.feed(data[:3]) == [] and dec.missing_bytes == wire.PREFIX_SIZE - 3
    assert dec.feed(data[3:100]) == [] and dec.missing_bytes == len(first) - 100
    assert len(dec.feed(data[100:len(first)])) == 1 and dec.missing_bytes == wire.PREFIX_SIZE
    assert len(dec.feed(data[len(first):])) == 1 and dec.missing_bytes == wire.PREFIX_SIZE


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


STREAM: list[wire.Message] = [
    wire.Hello("m", GUEST, "bound"), wire.SharedPages(0, 1, b"\x01" * PAGE_SIZE),
    wire.SharedPages(PAGE_SIZE, 1, b"\x02" * PAGE_SIZE), wire.ZeroPages(2 * PAGE_SIZE, 4), wire.Commit(),
]


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


# ---------------------------------------------------------------- pinned bytes
#
# Computed with the codec as it was before it became table-driven (migd/wire.py at a4a1a5d):
# what is MACed (migd/session_auth.py) and what goes on the wire must never change by accident.
# A deliberate change of the wire format is a new PROTOCOL_VERSION and new pins.

#: One message of every frame type (two HELLOs, VCPU_STATEs and ABORTs: each optional form).
#: The capabilities of the release these pins were first computed with (before "connections").
_CAPS_3 = ("zero-runs", "bound-transport", "sev-compat-transport", "vmsa")

PINNED: list[wire.Message] = [
    wire.Hello("mig-7", wire.GuestSpec("web-1", 4096, 0x5, efi=True, uefi_live_migration=None), "bound",
               resolve_port=4444, capabilities=_CAPS_3),
    wire.Hello("mig-8", wire.GuestSpec("db", 1, 0, efi=False, uefi_live_migration=False), "sev-compat",
               version=2, capabilities=("zero-runs",)),
    wire.Welcome(b"-----BEGIN CERTIFICATE-----\n...\n", nonce=bytes(range(32)), capabilities=_CAPS_3),
    wire.Session(b"pdh", bytes(range(128)), 0x5, mac=b"\x11" * 32),
    wire.SessionAck(b"\x22" * 32),
    wire.PrivatePages(8 * PAGE_SIZE, 1, bytes(range(52)), b"\xcd" * PAGE_SIZE),
    wire.SharedPages(PAGE_SIZE, 1, b"\xab" * PAGE_SIZE),
    wire.ZeroPages(16 * PAGE_SIZE, 300),
    wire.RoundEnd(3, 1234),
    wire.SharedBitmap(b"bitmap-bytes"),
    wire.VcpuState(0, bytes(range(52)), b"\xee" * PAGE_SIZE),
    wire.VcpuState(1, None, b"plain vcpu state"),
    wire.Prepare(4096, frames=9, private=1, shared=2, zero=3, transport_seq=5, stream_digest=b"\x01" * 32,
                 bitmap_digest=b"\x02" * 32, vcpu_digest=b"\x03" * 32, mac=b"\x44" * 32),
    wire.Prepared(4096, b"\x55" * 32),
    wire.Commit(b"\x66" * 32),
    wire.Started(b"\x77" * 32),
    wire.Abort("destination refused: guest exists", b"\x88" * 32),
    wire.Abort("no keys yet"),
    wire.Resolve("mig-7", bytes(range(32, 64)), b"\x99" * 32),
    wire.Resolved("mig-7", "committed", b"\xaa" * 32),
    wire.Ping(7),
    wire.Pong(0xFFFFFFFF),
    # Several connections: the optional fields, JOIN and JOINED (HELLO with the capabilities of
    # the release they were first computed with, which called several connections "connections";
    # "lanes" replaced it when further connections got their preamble and the first lost its pages).
    wire.Hello("mig-9", wire.GuestSpec("big", 8192, 0x5), "bound", resolve_port=4444, connections=4,
               capabilities=(*_CAPS_3, "connections")),
    wire.RoundEnd(2, 77, lanes=(10, 11, 12)),
    wire.Ping(8, lanes=(1, 0, 3)),
    wire.Prepare(4096, frames=9, private=1, shared=2, zero=3, transport_seq=5, stream_digest=b"\x01" * 32,
                 bitmap_digest=b"\x02" * 32, vcpu_digest=b"\x03" * 32, mac=b"\x44" * 32, lanes=(2, 3, 4)),
    wire.Join("mig-9", 3, b"\xbb" * 32),
    wire.Joined(3, b"\xcc" * 32),
]

#: ``authenticated_bytes(PINNED[i])``: the type byte and the sorted metadata but ``mac``.
AUTHENTICATED_HEX = [
    ("0186a46361707394a97a65726f2d72756e73af626f756e642d7472616e73706f7274b47365762d636f6d7061742d7472616e"
     "73706f7274a4766d7361a5677565737485a46e616d65a57765622d31a66e7061676573cd1000a6706f6c69637905a3656669"
     "c3a7756566695f6c6dc0a26964a56d69672d37ac7265736f6c76655f706f7274cd115ca97472616e73706f7274a5626f756e"
     "64a776657273696f6e03"),
    ("0186a46361707391a97a65726f2d72756e73a5677565737485a46e616d65a26462a66e706167657301a6706f6c69637900a3"
     "656669c2a7756566695f6c6dc2a26964a56d69672d38ac7265736f6c76655f706f727400a97472616e73706f7274aa736576"
     "2d636f6d706174a776657273696f6e02"),
    ("0284a46361707394a97a65726f2d72756e73af626f756e642d7472616e73706f7274b47365762d636f6d7061742d7472616e"
     "73706f7274a4766d7361a56e6f6e6365c420000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
     "a3706468c4202d2d2d2d2d424547494e2043455254494649434154452d2d2d2d2d0a2e2e2e0aa776657273696f6e03"),
    ("0383a4626c6f62c480000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728"
     "292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f404142434445464748494a4b4c4d4e4f505152535455565758595a"
     "5b5c5d5e5f606162636465666768696a6b6c6d6e6f707172737475767778797a7b7c7d7e7fa3706468c403706468a6706f6c"
     "69637905"),
    "0480",
    ("0583a3677061cd8000a3686472c434000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122"
     "232425262728292a2b2c2d2e2f30313233a16e01"),
    "0682a3677061cd1000a16e01",
    "0782a3677061ce00010000a16ecd012c",
    "0882a56469727479cd04d2a5726f756e6403",
    "0980",
    ("0a82a3686472c434000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f20212223242526272829"
     "2a2b2c2d2e2f30313233a47663707500"),
    "0a82a3686472c0a47663707501",
    ("0b87a66269746d6170c4200202020202020202020202020202020202020202020202020202020202020202a66672616d6573"
     "09a56b696e647393010203a57061676573cd1000a373657105a673747265616dc42001010101010101010101010101010101"
     "01010101010101010101010101010101a476637075c420030303030303030303030303030303030303030303030303030303"
     "0303030303"),
    "0c81a57061676573cd1000",
    "0d80",
    "0e80",
    "0f81a6726561736f6ed92164657374696e6174696f6e20726566757365643a20677565737420657869737473",
    "0f81a6726561736f6eab6e6f206b65797320796574",
    "1082a26964a56d69672d37a56e6f6e6365c420202122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f",
    "1182a26964a56d69672d37a76f7574636f6d65a9636f6d6d6974746564",
    "1281a5746f6b656e07",
    "1381a5746f6b656eceffffffff",
    ("0187a46361707395a97a65726f2d72756e73af626f756e642d7472616e73706f7274b47365762d636f6d7061742d7472616e"
     "73706f7274a4766d7361ab636f6e6e656374696f6e73a5636f6e6e7304a5677565737485a46e616d65a3626967a66e706167"
     "6573cd2000a6706f6c69637905a3656669c2a7756566695f6c6dc0a26964a56d69672d39ac7265736f6c76655f706f7274cd"
     "115ca97472616e73706f7274a5626f756e64a776657273696f6e03"),
    "0883a564697274794da56c616e6573930a0b0ca5726f756e6402",
    "1282a56c616e657393010003a5746f6b656e08",
    ("0b88a66269746d6170c4200202020202020202020202020202020202020202020202020202020202020202a66672616d6573"
     "09a56b696e647393010203a56c616e657393020304a57061676573cd1000a373657105a673747265616dc420010101010101"
     "0101010101010101010101010101010101010101010101010101a476637075c4200303030303030303030303030303030303"
     "030303030303030303030303030303"),
    "1482a26964a56d69672d39a46c616e6503",
    "1581a46c616e6503",
]


#: SHA-256 of ``encode_stream(PINNED)`` (14 582 bytes): every byte of every frame, the CRCs over
#: the sequence numbers 0..27 included.
PINNED_STREAM_SHA256 = "1a64f2ba00bf08775b5270cf9703dfa20a332dd1df71eca59fd8b1bbc7170ce9"


def test_pinned_messages_cover_every_frame_type() -> None:
    assert {m.TYPE for m in PINNED} == set(wire.FrameType)
    assert len(AUTHENTICATED_HEX) == len(PINNED)


@pytest.mark.parametrize("index", range(len(PINNED)), ids=lambda i: f"{i}-{type(PINNED[i]).__name__}")
def test_authenticated_bytes_are_pinned(index: int) -> None:
    assert wire.authenticated_bytes(PINNED[index]).hex() == AUTHENTICATED_HEX[index]


def test_authenticated_bytes_leave_out_only_the_mac() -> None:
    """Negative control for the pins: the MAC is not covered, every other field is."""
    prepare = PINNED[12]
    assert isinstance(prepare, wire.Prepare)
    assert wire.authenticated_bytes(dataclasses.replace(prepare, mac=bytes(32))) == wire.authenticated_bytes(prepare)
    for changed in (dataclasses.replace(prepare, transport_seq=6), dataclasses.replace(prepare, zero=4),
                    dataclasses.replace(prepare, vcpu_digest=bytes(32))):
        assert wire.authenticated_bytes(changed) != wire.authenticated_bytes(prepare)


def test_frame_bytes_are_pinned() -> None:
    data = wire.encode_stream(PINNED)
    assert len(data) == 14582
    assert hashlib.sha256(data).hexdigest() == PINNED_STREAM_SHA256


@pytest.mark.parametrize(
    "index, parts",
    [
        (0, ["000000a601009f86a776657273696f6e03a46361707394a97a65726f2d72756e73af626f756e642d7472616e73706f7274"
             "b47365762d636f6d7061742d7472616e73706f7274a4766d7361a26964a56d69672d37a5677565737485a46e616d65a577"
             "65622d31a66e7061676573cd1000a6706f6c69637905a3656669c3a7756566695f6c6dc0a97472616e73706f7274a5626f"
             "756e64ac7265736f6c76655f706f7274cd115c5c7d8d8a"]),
        (5, ["0000104c05004583a3677061cd8000a16e01a3686472c434000102030405060708090a0b0c0d0e0f101112131415161718"
             "191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f30313233", None, "8730a5c3"]),
        (9, ["0000001409000180", "6269746d61702d6279746573", "91299208"]),
        (11, ["000000230a000c82a47663707501a3686472c0", "706c61696e2076637075207374617465", "a2c76ef1"]),
        (17, ["000000200f001982a6726561736f6eab6e6f206b65797320796574a36d6163c0a1705da1"]),
        (21, ["0000001313000c81a5746f6b656eceffffffffce073c4c"]),
    ],
    ids=lambda v: f"{v}-{type(PINNED[v]).__name__}" if isinstance(v, int) else "",
)
def test_some_frames_byte_for_byte(index: int, parts: list[str | None]) -> None:
    """Readable pins: HELLO, a page run (the payload is the caller's buffer, handed on as is),
    a bitmap, plaintext vCPU state, an ABORT without MAC, a PONG; frame number = ``index``."""
    msg = PINNED[index]
    got = wire.encode(msg, index)
    assert len(got) == len(parts)
    for part, expected in zip(got, parts):
        if expected is None:
            assert part is getattr(msg, "payload")
        else:
            assert bytes(part).hex() == expected


# ---------------------------------------------------------------- the registry


def test_registry_has_one_class_per_frame_type() -> None:
    assert sorted(wire.MESSAGE_CLASSES) == sorted(wire.FrameType)
    assert all(cls.TYPE is t for t, cls in wire.MESSAGE_CLASSES.items())
    assert set(wire.MESSAGE_CLASSES.values()) == set(typing.get_args(wire.Message))


@pytest.mark.parametrize("msg", PINNED, ids=lambda m: type(m).__name__)
def test_meta_keys_are_the_declared_wire_fields_in_order(msg: wire.Message) -> None:
    """``META`` is what the doc test compares with docs/protocol.md: it must be what is sent
    (an ``OPTIONAL`` key only when it is not its default)."""
    cls = type(msg)
    sent = tuple(msg.to_meta())
    assert sent == tuple(k for k in cls.META if k in sent)
    assert set(cls.META) - set(sent) <= cls.OPTIONAL
    assert tuple(wire.GuestSpec("g", 1, 0).to_meta()) == wire.GuestSpec.META


def test_payload_limits() -> None:
    """Control frames carry nothing; the data frames' limits bound the receive buffer."""
    limits = {t: cls.PAYLOAD_LIMIT for t, cls in wire.MESSAGE_CLASSES.items() if cls.PAYLOAD_LIMIT}
    assert limits == {
        wire.FrameType.PRIVATE_PAGES: wire.MAX_RUN_PAGES * PAGE_SIZE,
        wire.FrameType.SHARED_PAGES: wire.MAX_RUN_PAGES * PAGE_SIZE,
        wire.FrameType.SHARED_BITMAP: wire.MAX_BITMAP_BYTES,
        wire.FrameType.VCPU_STATE: wire.MAX_VCPU_STATE,
    }
    data = {t for t, cls in wire.MESSAGE_CLASSES.items() if not cls.CONTROL}
    assert data == set(limits) | {wire.FrameType.ZERO_PAGES}


@pytest.mark.parametrize(
    "ftype, payload, match",
    [
        (wire.FrameType.COMMIT, b"x", "carries 1 payload bytes, expected none"),  # before its fields
        (wire.FrameType.ZERO_PAGES, b"x", "missing field 'gpa'"),  # a run: its fields first
    ],
)
def test_decode_frame_checks_control_payloads_first(ftype: wire.FrameType, payload: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        wire.decode_frame(ftype, memoryview(msgpack.packb({})), memoryview(payload))


# ---------------------------------------------------------------- capabilities


def test_negotiate_is_the_intersection_in_one_order() -> None:
    newer = ("vmsa", "future-feature", "zero-runs", "zero-runs")
    assert wire.negotiate(wire.CAPABILITIES, newer) == ("vmsa", "zero-runs")
    assert wire.negotiate(newer, wire.CAPABILITIES) == ("vmsa", "zero-runs")
    assert wire.negotiate(wire.CAPABILITIES, wire.CAPABILITIES) == tuple(sorted(wire.CAPABILITIES))
    assert wire.negotiate(wire.CAPABILITIES, ()) == ()


@given(st.lists(st.text(max_size=8), max_size=10), st.lists(st.text(max_size=8), max_size=10))
def test_negotiate_properties(ours: list[str], theirs: list[str]) -> None:
    agreed = wire.negotiate(ours, theirs)
    assert agreed == wire.negotiate(theirs, ours)  # both ends hold the same tuple
    assert set(agreed) == set(ours) & set(theirs)
    assert list(agreed) == sorted(set(agreed))  # each once, in a fixed order


def test_both_ends_agree_on_what_they_exchanged() -> None:
    """The source negotiates with WELCOME's caps, the destination with HELLO's: same result."""
    hello = wire.Hello("m", GUEST, "bound", capabilities=("zero-runs", "vmsa", "bound-transport", "x-new"))
    welcome = wire.Welcome(b"pdh")
    decoder = wire.FrameDecoder()
    (hello_in, welcome_in) = decoder.feed(wire.encode_stream([hello, welcome]))
    assert isinstance(hello_in, wire.Hello) and isinstance(welcome_in, wire.Welcome)
    at_destination = wire.negotiate(wire.CAPABILITIES, hello_in.capabilities)
    at_source = wire.negotiate(hello.capabilities, welcome_in.capabilities)
    assert at_source == at_destination == ("bound-transport", "vmsa", "zero-runs")


def test_vmsa_packing_round_trips_and_refuses_what_does_not_fit() -> None:
    state = bytes(range(200))
    page = wire.pack_vmsa(state)
    assert len(page) == PAGE_SIZE and wire.unpack_vmsa(page) == state
    with pytest.raises(ValueError):
        wire.pack_vmsa(bytes(PAGE_SIZE))  # no room for the length field
    bad = (PAGE_SIZE).to_bytes(4, "little") + page[4:]  # a length field past the page (from a peer)
    with pytest.raises(ProtocolError, match="malformed VMSA"):
        wire.unpack_vmsa(bad)
    with pytest.raises(ProtocolError):
        wire.unpack_vmsa(page[:-1])
