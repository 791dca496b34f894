"""Hypercall channel codec: bytes in, messages out — including truncated and hostile bytes."""

from __future__ import annotations

import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migd.guest.channel_codec import (
    MAX_FRAME,
    U64_MAX,
    ChannelCodec,
    ChannelProtocolError,
    get_bool,
    get_bytes,
    get_int,
    get_optional_str,
    get_str,
    get_u32,
    get_u64,
    get_u64_list,
    request,
    response_error,
    response_ok,
    validate_envelope,
)
from migd.errors import ProtocolError

MESSAGES = [
    request(1, "hello", name="vm0", npages=4096, pid=1234, incoming=False),
    request(2, "hypercall", nr=12, args=[0x1000, 3, 1 << 4], cpl=0),
    request(U64_MAX, "fetch_dirty"),
    response_ok(7, bitmap=b"\x00\xff" * 100),
    response_ok(0),
    response_error(9, "no such MSR", fault="GP"),
    response_error(10, "bad field"),
    response_ok(11, value=None, found=False, state=b""),
]


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def packed(obj: object) -> bytes:
    return frame(msgpack.packb(obj, use_bin_type=True))


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: f"{m['t']}-{m.get('op', m.get('ok'))}")
def test_round_trip(msg: dict) -> None:
    codec = ChannelCodec()
    data = codec.encode(msg)
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    assert ChannelCodec().feed(data) == [msg]


def test_split_at_every_byte_boundary() -> None:
    stream = b"".join(ChannelCodec().encode(m) for m in MESSAGES)
    for cut in range(len(stream) + 1):
        codec = ChannelCodec()
        got = codec.feed(stream[:cut]) + codec.feed(stream[cut:])
        assert got == MESSAGES, cut
        assert codec.buffered == 0


def test_byte_at_a_time() -> None:
    stream = b"".join(ChannelCodec().encode(m) for m in MESSAGES)
    codec = ChannelCodec()
    got = [msg for i in range(len(stream)) for msg in codec.feed(stream[i:i + 1])]
    assert got == MESSAGES


def test_truncated_frame_waits_for_more() -> None:
    data = ChannelCodec().encode(MESSAGES[0])
    codec = ChannelCodec()
    assert codec.feed(data[:-1]) == []
    assert codec.buffered == len(data) - 1
    assert codec.feed(data[-1:]) == [MESSAGES[0]]


def test_oversized_length_rejected_from_header() -> None:
    codec = ChannelCodec()
    with pytest.raises(ChannelProtocolError, match="exceeds the maximum"):
        codec.feed(struct.pack(">I", MAX_FRAME + 1))
    # negative control: exactly the maximum is only buffered (more bytes awaited)
    assert ChannelCodec().feed(struct.pack(">I", MAX_FRAME)) == []


def test_codec_refuses_input_after_an_error() -> None:
    codec = ChannelCodec()
    with pytest.raises(ChannelProtocolError):
        codec.feed(struct.pack(">I", 0))
    with pytest.raises(ChannelProtocolError, match="already failed"):
        codec.feed(ChannelCodec().encode(MESSAGES[0]))


def test_custom_max_frame() -> None:
    data = ChannelCodec().encode(MESSAGES[3])
    with pytest.raises(ChannelProtocolError, match="exceeds"):
        ChannelCodec(max_frame=len(data) - 5).feed(data)
    assert ChannelCodec(max_frame=len(data) - 4).feed(data) == [MESSAGES[3]]
    with pytest.raises(ChannelProtocolError, match="exceeds"):
        ChannelCodec(max_frame=16).encode(MESSAGES[3])


@pytest.mark.parametrize(
    "data, match",
    [
        (struct.pack(">I", 0), "empty frame"),
        (frame(b"\xc1"), "bad msgpack"),  # 0xc1 is never used
        (frame(b"\x92\x01"), "bad msgpack"),  # array header promising 2 items, 1 present
        (frame(msgpack.packb({"t": "req"}) + b"\x00"), "bad msgpack"),  # trailing data
        (frame(b"\x81\xa1t\xc4\x02\xff\xfe"), "expected a string"),  # bin where str expected
        (frame(b"\x81\xa1t\xa2\xff\xfe"), "bad msgpack"),  # invalid UTF-8
        (packed([1, 2, 3]), "must be a map"),
        (packed("req"), "must be a map"),
        (packed({1: "x"}), "bad msgpack"),  # strict_map_key: int key
        (packed({b"t": "req", "id": 1, "op": "x"}), "keys must be strings"),
        (packed({"id": 1, "op": "x"}), "missing field 't'"),
        (packed({"t": "evt", "id": 1, "op": "x"}), "'req' or 'rsp'"),
        (packed({"t": "req", "op": "x"}), "missing field 'id'"),
        (packed({"t": "req", "id": -1, "op": "x"}), "'id'"),
        (packed({"t": "req", "id": True, "op": "x"}), "got boolean"),
        (packed({"t": "req", "id": "1", "op": "x"}), "got str"),
        (packed({"t": "req", "id": 1}), "missing field 'op'"),
        (packed({"t": "req", "id": 1, "op": ""}), "non-empty"),
        (packed({"t": "req", "id": 1, "op": 5}), "'op'"),
        (packed({"t": "rsp", "id": 1}), "missing field 'ok'"),
        (packed({"t": "rsp", "id": 1, "ok": 1}), "expected a boolean"),
        (packed({"t": "rsp", "id": 1, "ok": False}), "missing field 'error'"),
        (packed({"t": "rsp", "id": 1, "ok": False, "error": "x", "fault": 13}), "'fault'"),
        (frame(b"\x91" * 5000 + b"\xc0"), "bad msgpack"),  # nesting deeper than the unpacker stack
    ],
    ids=[
        "empty", "reserved-byte", "truncated-body", "trailing-data", "bin-as-str", "bad-utf8", "array",
        "string", "int-key", "bytes-key", "no-t", "bad-t", "no-id", "negative-id", "bool-id", "str-id",
        "no-op", "empty-op", "int-op", "rsp-no-ok", "rsp-int-ok", "rsp-no-error", "rsp-int-fault",
        "deep-nesting",
    ],
)
def test_malformed_frames(data: bytes, match: str) -> None:
    with pytest.raises(ChannelProtocolError, match=match):
        ChannelCodec().feed(data)


def test_good_frame_before_bad_one_is_lost_with_the_stream() -> None:
    """A bad frame poisons the stream; the error is still a ChannelProtocolError (a ProtocolError)."""
    codec = ChannelCodec()
    with pytest.raises(ProtocolError):
        codec.feed(ChannelCodec().encode(MESSAGES[0]) + packed([1]))


def test_id_bounds() -> None:
    assert ChannelCodec().feed(packed({"t": "req", "id": U64_MAX, "op": "x"}))[0]["id"] == U64_MAX
    with pytest.raises(ChannelProtocolError):
        ChannelCodec().encode({"t": "req", "id": U64_MAX + 1, "op": "x"})


@pytest.mark.parametrize(
    "msg",
    [
        {"t": "req", "id": 1},
        {"t": "req", "id": 1, "op": "x", "value": object()},
        {"t": "req", "id": 1, "op": "x", "value": 1 << 64},
        {"t": "rsp", "id": 1, "ok": False},
    ],
    ids=["no-op", "unserializable", "int-too-big", "error-without-text"],
)
def test_encode_rejects_bad_messages(msg: dict) -> None:
    with pytest.raises(ChannelProtocolError):
        ChannelCodec().encode(msg)


def test_extra_fields_pass_through() -> None:
    msg = request(3, "report", kind="event", event="booted", extra={"nested": [1, b"x"]})
    assert ChannelCodec().feed(ChannelCodec().encode(msg)) == [msg]


# ---------------------------------------------------------------- field helpers


def test_field_helpers_accept_good_values() -> None:
    msg = {"a": 5, "b": True, "s": "x", "n": None, "y": b"\x01", "l": [1, 2, U64_MAX], "big": U64_MAX}
    assert get_int(msg, "a", 0, 5) == 5
    assert get_u64(msg, "big") == U64_MAX
    assert get_u32(msg, "a") == 5
    assert get_bool(msg, "b") is True
    assert get_str(msg, "s") == "x"
    assert get_optional_str(msg, "n") is None
    assert get_optional_str(msg, "absent") is None
    assert get_optional_str(msg, "s") == "x"
    assert get_bytes(msg, "y") == b"\x01"
    assert get_u64_list(msg, "l", 3) == [1, 2, U64_MAX]
    assert get_int(msg, "absent", 0, 3, default=0) == 0
    assert get_bool(msg, "absent", default=False) is False


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: get_int(m, "a", 0, 4), r"in \[0, 4\], got 5"),
        (lambda m: get_u64(m, "neg"), "got -1"),
        (lambda m: get_u32(m, "big"), f"got {U64_MAX}"),
        (lambda m: get_u64(m, "b"), "got boolean"),
        (lambda m: get_u64(m, "f"), "got float"),
        (lambda m: get_u64(m, "absent"), "missing field 'absent'"),
        (lambda m: get_bool(m, "a"), "expected a boolean, got int"),
        (lambda m: get_str(m, "y"), "expected a string, got bytes"),
        (lambda m: get_str(m, "s", max_len=0), "at most 0 characters, got 1"),
        (lambda m: get_optional_str(m, "a"), "string or nil, got int"),
        (lambda m: get_bytes(m, "s"), "expected bytes, got str"),
        (lambda m: get_bytes(m, "y", max_len=0), "at most 0 bytes, got 1"),
        (lambda m: get_u64_list(m, "l", 2), "expected 2 elements, got 3"),
        (lambda m: get_u64_list(m, "a", 3), "expected a list"),
        (lambda m: get_u64_list(m, "badl", 3), r"'badl'\[1\]"),
    ],
)
def test_field_helpers_reject_bad_values(call, match: str) -> None:  # type: ignore[no-untyped-def]
    msg = {"a": 5, "neg": -1, "big": U64_MAX, "b": True, "f": 1.5, "s": "x", "y": b"\x01",
           "l": [1, 2, 3], "badl": [1, "2", 3]}
    with pytest.raises(ChannelProtocolError, match=match):
        call(msg)


def test_validate_envelope_direct() -> None:
    assert validate_envelope(request(1, "x")) == request(1, "x")
    with pytest.raises(ChannelProtocolError):
        validate_envelope(None)


# ---------------------------------------------------------------- fuzz


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64) | st.binary(min_size=1, max_size=64).map(frame), max_size=8))
def test_random_bytes_only_raise_channel_protocol_error(chunks: list[bytes]) -> None:
    codec = ChannelCodec(max_frame=1 << 16)
    try:
        for chunk in chunks:
            for msg in codec.feed(chunk):
                assert validate_envelope(msg) is msg
    except ChannelProtocolError:
        pass


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), U64_MAX) | st.text(max_size=8) | st.binary(max_size=8)
    | st.floats(allow_nan=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["t", "id", "op", "ok", "error", "fault", "x"]), _values, max_size=6))
def test_random_maps_only_raise_channel_protocol_error(obj: dict) -> None:
    """Structured garbage (valid msgpack, wrong envelope) is either accepted intact or rejected cleanly."""
    try:
        got = ChannelCodec().feed(packed(obj))
    except ChannelProtocolError:
        return
    assert got == [obj]
    assert obj["t"] in ("req", "rsp")
