"""Fuzzing the migration stream codec (:mod:`migd.wire`): ≥ 100 000 hostile frames per run.

Two layers, both against ``FrameDecoder`` (both receive paths) and ``decode_frame``:

* a fast, seeded loop (``random.Random(SEED)``): valid frames of every type, then mutated
  (bit flips, boundary bytes, truncation, extension, splices, rewritten length/type/meta_len,
  re-encoded metadata with fields of the wrong type or range) and wholly random headers. Half
  of the mutated frames get a valid CRC32 trailer again (a buggy or hostile peer computes it
  too), so the checks behind the CRC — framing, msgpack, every field — see them;
* hypothesis for structure: arbitrary msgpack metadata under every frame type, and valid
  streams cut at arbitrary points.

The oracle for every input: nothing but ``ProtocolError`` escapes; a failed decoder stays
failed; whatever decodes satisfies the documented bounds of its message; and the receive
buffer — the only allocation a peer sizes — never exceeds ``PREFIX_SIZE + MAX_META +
MAX_PAYLOAD + CRC_SIZE`` (per type: that type's payload limit instead of ``MAX_PAYLOAD``).
"""

from __future__ import annotations

import random
import struct
import time
import tracemalloc
import zlib
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migd import wire
from migd.abi import PAGE_SIZE
from migd.errors import ProtocolError
from migd.wire import FrameType

pytestmark = pytest.mark.fault_class("bad input: stream codec fuzz")
SEED = 0x6D696764  # "migd": a fixed seed, so a failure reproduces
FAST_FRAMES = 110_000
TIME_BUDGET_S = 20.0
#: The documented receive-buffer bound (wire.py: every length is checked before allocation).
BUFFER_BOUND = wire.PREFIX_SIZE + wire.MAX_META + wire.MAX_PAYLOAD + wire.CRC_SIZE
_PREFIX = struct.Struct(">IBH")
_CRC = struct.Struct(">I")
_PAYLOAD_LIMIT = {
    FrameType.PRIVATE_PAGES: wire.MAX_RUN_PAGES * PAGE_SIZE,
    FrameType.SHARED_PAGES: wire.MAX_RUN_PAGES * PAGE_SIZE,
    FrameType.SHARED_BITMAP: wire.MAX_BITMAP_BYTES,
    FrameType.VCPU_STATE: wire.MAX_VCPU_STATE,
}


# ---------------------------------------------------------------------- the oracle


def check_message(msg: wire.Message) -> None:
    """Whatever the decoder hands out satisfies the bounds its docstrings promise."""
    if isinstance(msg, (wire.PrivatePages, wire.SharedPages, wire.ZeroPages)):
        assert msg.gpa % PAGE_SIZE == 0 and 1 <= msg.npages <= wire.MAX_RUN_PAGES
        assert msg.gpa // PAGE_SIZE + msg.npages <= wire.MAX_GUEST_PAGES
        if isinstance(msg, wire.ZeroPages):
            return
        assert len(msg.payload) == msg.npages * PAGE_SIZE
        if isinstance(msg, wire.PrivatePages):
            assert len(msg.header) == wire.TRANSPORT_HEADER_SIZE
    elif isinstance(msg, wire.Hello):
        assert 1 <= len(msg.guest.name) <= 64 and 1 <= msg.guest.npages <= wire.MAX_GUEST_PAGES
        assert len(msg.migration_id) <= 64 and len(msg.capabilities) <= 64
        assert isinstance(msg.guest.efi, bool)
    elif isinstance(msg, wire.Session):
        assert len(msg.session_blob) == 128 and len(msg.pdh_cert) <= 16384
    elif isinstance(msg, wire.Welcome):
        assert len(msg.pdh_cert) <= 16384
    elif isinstance(msg, wire.VcpuState):
        assert 0 <= msg.vcpu_id <= 255 and len(msg.payload) <= wire.MAX_VCPU_STATE
        if msg.header is not None:
            assert len(msg.header) == wire.TRANSPORT_HEADER_SIZE and len(msg.payload) == PAGE_SIZE
    elif isinstance(msg, wire.SharedBitmap):
        assert 0 < len(msg.payload) <= wire.MAX_BITMAP_BYTES
    elif isinstance(msg, wire.Abort):
        assert len(msg.reason) <= 1024


def feed_all(decoder: wire.FrameDecoder, data: bytes, chunk: int) -> int:
    """Feed ``data`` in ``chunk``-sized pieces; returns messages decoded (ProtocolError propagates)."""
    n = 0
    for start in range(0, len(data), chunk):
        for msg in decoder.feed(data[start : start + chunk]):
            check_message(msg)
            n += 1
        # White-box on purpose: the buffer is the one allocation whose size the peer controls.
        assert len(decoder._buf) <= BUFFER_BOUND
    return n


def decode_one(data: bytes, chunk: int) -> str:
    """Decode one hostile input through a fresh decoder; the outcome's name."""
    decoder = wire.FrameDecoder(initial=64)
    try:
        feed_all(decoder, data, chunk)
    except ProtocolError as exc:
        with pytest.raises(ProtocolError, match="already failed"):
            decoder.feed(b"\x00")  # a failed stream stays failed: nothing after it is trusted
        return "crc" if "CRC32" in str(exc) else "refused"
    return "decoded" if decoder.pending_bytes == 0 else "incomplete"


def frame(ftype: int, meta: bytes, payload: bytes = b"", sequence: int = 0) -> bytes:
    """A frame with any content and a valid CRC32 trailer for frame number ``sequence``."""
    body = struct.pack(">BH", ftype, len(meta)) + meta + payload
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<Q", sequence)))
    return struct.pack(">I", len(body) + wire.CRC_SIZE) + body + _CRC.pack(crc)


def reseal(data: bytes) -> bytes:
    """``data`` with its CRC trailer recomputed, when it still is one frame of consistent length."""
    if len(data) < wire.PREFIX_SIZE + wire.CRC_SIZE or struct.unpack_from(">I", data)[0] != len(data) - 4:
        return data
    crc = zlib.crc32(memoryview(data)[4:-wire.CRC_SIZE], zlib.crc32(struct.pack("<Q", 0)))
    return data[: -wire.CRC_SIZE] + _CRC.pack(crc)


# ---------------------------------------------------------------------- generators


def _valid_messages(rng: random.Random) -> list[wire.Message]:
    """One valid message of every kind, with random in-range fields."""
    npages = rng.randint(1, 3)
    gpa = rng.randrange(0, 1 << 20) * PAGE_SIZE
    payload = rng.randbytes(npages * PAGE_SIZE)
    spec = wire.GuestSpec(f"g{rng.randrange(1000)}", rng.randint(1, 1 << 20), rng.getrandbits(32),
                          rng.random() < 0.5, rng.choice([None, True, False]))
    return [
        wire.Hello(f"{rng.getrandbits(64):016x}", spec, rng.choice(["bound", "sev-compat"])),
        wire.Welcome(rng.randbytes(rng.randint(0, 600))),
        wire.Session(rng.randbytes(rng.randint(0, 600)), rng.randbytes(128), rng.getrandbits(32)),
        wire.SessionAck(),
        wire.PrivatePages(gpa, npages, rng.randbytes(52), payload),
        wire.SharedPages(gpa, npages, payload),
        wire.ZeroPages(gpa, rng.randint(1, wire.MAX_RUN_PAGES)),
        wire.RoundEnd(rng.randrange(1 << 32), rng.randrange(wire.MAX_GUEST_PAGES)),
        wire.SharedBitmap(rng.randbytes(rng.randint(1, 300))),
        wire.VcpuState(0, rng.randbytes(52), rng.randbytes(PAGE_SIZE)),
        wire.VcpuState(rng.randrange(256), None, rng.randbytes(rng.randint(0, 400))),
        wire.Prepare(rng.getrandbits(40)),
        wire.Prepared(rng.getrandbits(40)),
        wire.Commit(),
        wire.Started(),
        wire.Abort("x" * rng.randint(0, 1024)),
        wire.Resolve(f"{rng.getrandbits(64):016x}"),
        wire.Resolved(f"{rng.getrandbits(64):016x}", rng.choice(wire.RESOLUTIONS)),
        wire.Ping(rng.getrandbits(32)),
        wire.Pong(rng.getrandbits(32)),
    ]


_BOUNDARY_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xC0, 0xC1, 0xCC, 0xCF, 0xD9, 0xDC, 0xDD, 0xDE, 0xDF, 0xFF)
_HOSTILE_VALUES: tuple[Any, ...] = (
    None, True, False, -1, 0, 1, 4095, 4096, 1 << 26, 1 << 63, (1 << 64) - 1, -(1 << 63), 1.5, "", "x" * 300,
    b"", b"\x00" * 52, b"\x00" * 129, [], [1, 2], {}, {"a": 1},
)


def _mutate_meta(rng: random.Random, raw: bytes) -> bytes:
    """Re-encode the metadata with one field replaced, removed or added (valid framing)."""
    length, ftype, meta_len = _PREFIX.unpack_from(raw)
    meta = msgpack.unpackb(raw[7 : 7 + meta_len], raw=False)
    payload = raw[7 + meta_len : -wire.CRC_SIZE]
    key = rng.choice(sorted(meta) + ["extra"]) if meta else "extra"
    action = rng.randrange(3)
    if action == 0 and key in meta:
        del meta[key]
    elif action == 1 and isinstance(meta.get(key), dict):
        inner = meta[key]
        inner_key = rng.choice(sorted(inner) + ["extra"])
        inner[inner_key] = rng.choice(_HOSTILE_VALUES)
    else:
        meta[key] = rng.choice(_HOSTILE_VALUES)
    return frame(ftype, msgpack.packb(meta, use_bin_type=True), payload)


def _mutate(rng: random.Random, raw: bytes, others: list[bytes]) -> bytes:
    data = bytearray(raw)
    kind = rng.randrange(9)
    if kind == 0:  # a few bit flips anywhere
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
    elif kind == 1:  # a boundary byte in the prefix or the metadata
        pos = rng.randrange(min(len(data), 7 + 40))
        data[pos] = rng.choice(_BOUNDARY_BYTES)
    elif kind == 2:  # truncated
        del data[rng.randrange(len(data)) :]
    elif kind == 3:  # extended with garbage
        data += rng.randbytes(rng.randint(1, 64))
    elif kind == 4:  # a rewritten length field
        length = rng.choice([0, 1, 2, 3, len(data) - 5, len(data) - 3, len(data), (1 << 32) - 1,
                             rng.getrandbits(32), 3 + wire.MAX_META + wire.MAX_PAYLOAD + 1])
        struct.pack_into(">I", data, 0, max(0, min(length, (1 << 32) - 1)))
    elif kind == 5:  # a rewritten type
        data[4] = rng.choice([0, 16, 17, 255, rng.randrange(256)] + [int(t) for t in FrameType])
    elif kind == 6:  # a rewritten meta_len
        struct.pack_into(">H", data, 5, rng.choice([0, 1, 0xFFFF, rng.randrange(1 << 16)]))
    elif kind == 7:  # two frames spliced at random points
        other = rng.choice(others)
        data = data[: rng.randrange(len(data) + 1)] + other[rng.randrange(len(other)) :]
    else:  # a field of the metadata replaced by a hostile value
        return _mutate_meta(rng, raw)
    return reseal(bytes(data)) if rng.random() < 0.5 else bytes(data)


def _random_header(rng: random.Random) -> bytes:
    """A wholly random prefix and a short random body (half the time with a valid CRC)."""
    body = rng.randbytes(rng.randint(0, 96))
    length = rng.choice([rng.getrandbits(32), 3 + len(body) + wire.CRC_SIZE, rng.randint(0, 200)])
    data = _PREFIX.pack(length, rng.randrange(256), rng.randrange(1 << 16)) + body + rng.randbytes(4)
    return reseal(data) if rng.random() < 0.5 else data


# ---------------------------------------------------------------------- the fast loop


def test_fuzz_frames_only_protocol_errors_escape(record_inputs: Callable[[int, str], None]) -> None:
    rng = random.Random(SEED)
    started = time.monotonic()
    outcomes: dict[str, int] = {"crc": 0, "refused": 0, "decoded": 0, "incomplete": 0}
    generated = 0
    while generated < FAST_FRAMES:
        valid = [wire.encode_bytes(m) for m in _valid_messages(rng)]  # each frame number 0
        for raw in valid:
            for _ in range(8):
                data = _random_header(rng) if rng.random() < 0.15 else _mutate(rng, raw, valid)
                # Whole, in three pieces, in pages, or (small inputs) byte by byte: the prefix
                # and the metadata then straddle every possible receive boundary.
                size = len(data) or 1
                pieces = [size, -(-size // 3), 4096] + ([1, 5] if size <= 128 else [])
                outcomes[decode_one(data, rng.choice(pieces))] += 1
                generated += 1
    elapsed = time.monotonic() - started
    record_inputs(generated, "frames")
    assert generated >= 100_000
    assert elapsed < TIME_BUDGET_S, f"{generated} frames took {elapsed:.1f} s"
    # The mutations are neither all caught by the CRC nor all harmless: each outcome occurs, and
    # the checks behind the CRC (framing, msgpack, fields) refuse thousands of resealed frames.
    assert all(n > 1000 for n in outcomes.values()), outcomes


def test_valid_stream_through_the_buffered_protocol_path() -> None:
    """Control: the generated valid frames decode back to the same messages through get_buffer."""
    rng = random.Random(SEED + 1)
    messages = [m for _ in range(50) for m in _valid_messages(rng)]
    data = wire.encode_stream(messages)
    decoder = wire.FrameDecoder(initial=64)
    out: list[wire.Message] = []
    pos = 0
    while pos < len(data):
        target = decoder.get_buffer(-1)
        n = min(len(target), rng.randint(1, 9000), len(data) - pos)
        target[:n] = data[pos : pos + n]
        pos += n
        for msg in decoder.buffer_updated(n):
            check_message(msg)
            out.append(wire.detached(msg))  # views die at the next get_buffer
    assert [type(m) for m in out] == [type(m) for m in messages]
    assert wire.encode_stream(out) == data


# ---------------------------------------------------------------------- allocation bounds


def _peak_while(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        try:
            action()
        except ProtocolError:
            pass
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_the_codec_has_the_payload_limits_assumed_here() -> None:
    """The bounds below are this file's own statement of the limits; the codec's table must agree."""
    assert {t: cls.PAYLOAD_LIMIT for t, cls in wire.MESSAGE_CLASSES.items()} == {
        t: _PAYLOAD_LIMIT.get(t, 0) for t in FrameType
    }


@pytest.mark.parametrize("ftype", list(FrameType), ids=lambda t: t.name)
def test_length_field_never_allocates_past_the_type_bound(ftype: FrameType) -> None:
    """A prefix claiming the largest frame its type allows may grow the buffer to exactly that;
    one byte more is refused from the 7-byte prefix alone, before any allocation."""
    limit = _PAYLOAD_LIMIT.get(ftype, 0)
    largest = 3 + wire.MAX_META + limit + wire.CRC_SIZE
    decoder = wire.FrameDecoder(initial=64)
    assert decoder.feed(_PREFIX.pack(largest, ftype, wire.MAX_META)) == []
    decoder.get_buffer(-1)
    assert len(decoder._buf) == 4 + largest <= BUFFER_BOUND
    for claim in (largest + 1, (1 << 32) - 1):
        fresh = wire.FrameDecoder(initial=64)
        peak = _peak_while(lambda: fresh.feed(_PREFIX.pack(claim, ftype, 0)))
        assert peak < 64 * 1024, f"{ftype.name}: {peak} bytes allocated for a refused length {claim}"
        with pytest.raises(ProtocolError, match="already failed"):
            fresh.get_buffer(-1)


def test_hostile_metadata_allocates_little() -> None:
    """msgpack containers declaring 2^32 elements inside a 64 KiB metadata field are refused
    without allocating for the declared size (msgpack bounds them by the input length)."""
    metas = [
        b"\xdd\xff\xff\xff\xff",  # array32 of 4 G elements
        b"\xdf\xff\xff\xff\xff",  # map32 of 4 G entries
        b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
        b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
        b"\x81\xa3gpa\xdd\x00\x01\x00\x00" + b"\xc0" * 60000,  # 65536 nils declared, fewer present
    ]
    for meta in metas:
        peak = _peak_while(lambda: wire.decode_frame(FrameType.ZERO_PAGES, memoryview(meta), memoryview(b"")))
        assert peak < 4 * wire.MAX_META, f"{meta[:8]!r}: {peak} bytes"


# ---------------------------------------------------------------------- hypothesis: structure

_msgpack_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.floats(allow_nan=True),
    st.text(max_size=80), st.binary(max_size=80),
)
_msgpack_value = st.recursive(
    _msgpack_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)
#: Every key the codec reads (each message's ``META``, the guest's): from the registry, so a new
#: field is fuzzed without anyone remembering to list it here.
_field_names = st.sampled_from(sorted({key for cls in wire.MESSAGE_CLASSES.values() for key in cls.META}
                                      | set(wire.GuestSpec.META)))
_meta_maps = st.dictionaries(st.one_of(_field_names, st.text(max_size=6)), _msgpack_value, max_size=8)


@settings(max_examples=600, deadline=None, derandomize=True)
@given(
    ftype=st.integers(0, 255),
    meta=st.one_of(_meta_maps, _msgpack_value),
    payload=st.one_of(st.binary(max_size=64), st.sampled_from([bytes(PAGE_SIZE), bytes(2 * PAGE_SIZE)])),
)
def test_any_metadata_under_any_type(ftype: int, meta: Any, payload: bytes) -> None:
    packed = msgpack.packb(meta, use_bin_type=True)
    try:
        msg = wire.decode_frame(ftype, memoryview(packed), memoryview(payload))
    except ProtocolError:
        return
    check_message(msg)
    if len(packed) <= wire.MAX_META:  # what decodes from a frame decodes the same from a stream
        (again,) = wire.FrameDecoder(initial=64).feed(frame(ftype, packed, payload))
        assert type(again) is type(msg)


@st.composite
def _streams(draw: st.DrawFn) -> tuple[bytes, list[int]]:
    rng = random.Random(draw(st.integers(0, 1 << 32)))
    messages = draw(st.lists(st.sampled_from(_valid_messages(rng)), min_size=1, max_size=12))
    data = wire.encode_stream(messages)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return data, cuts


@settings(max_examples=150, deadline=None, derandomize=True)
@given(_streams(), st.integers(0, 1 << 16), st.integers(0, 7))
def test_valid_stream_with_one_flipped_bit_at_any_cut(stream: tuple[bytes, list[int]], pos: int, bit: int) -> None:
    """A valid stream, delivered in arbitrary pieces, with one bit flipped: the clean copy decodes
    fully whatever the pieces; the flipped copy is always refused (the CRC covers every byte
    after the length field; a flipped length fails the framing or the CRC)."""
    data, cuts = stream
    pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    decoder = wire.FrameDecoder(initial=64)
    got = [m for piece in pieces for m in decoder.feed(piece)]
    assert decoder.pending_bytes == 0 and got
    flipped = bytearray(data)
    flipped[pos % len(flipped)] ^= 1 << bit
    assert decode_one(bytes(flipped), max(1, len(pieces[0]))) in ("crc", "refused", "incomplete")


@pytest.mark.parametrize(
    "bad",
    [
        wire.PrivatePages(4096, 2, bytes(52), bytes(PAGE_SIZE)),  # payload of 1 page for 2
        wire.ZeroPages(123, 1),  # unaligned
        wire.SharedPages(0, wire.MAX_RUN_PAGES + 1, b""),
        wire.Session(b"", bytes(127), 0),
        wire.VcpuState(0, bytes(52), bytes(10)),
    ],
    ids=["payload-size", "unaligned", "run-too-long", "blob-size", "vmsa-size"],
)
def test_the_oracle_rejects_out_of_bound_messages(bad: wire.Message) -> None:
    """Negative control: the oracle used above does catch a message outside its documented bounds."""
    with pytest.raises(AssertionError):
        check_message(bad)
