"""The hypercall channel codec, sans-I/O: bytes in, messages out, and back.

Frame layout (docs/design.md §4 "The hypercall channel"): a big-endian u32 length, then one msgpack map
(``use_bin_type=True``, ``raw=False``, ``strict_map_key``) of at most 16 MiB — enough for a
``PageBitmap.encode()`` of a 64 GiB guest. Every message is a map with ``"t"`` (``"req"`` |
``"rsp"``) and ``"id"`` (a u64 per-sender counter); a request carries ``"op"``, a response
``"ok"`` and, when ``ok`` is false, ``"error"`` and an optional ``"fault"``.

Nothing in here touches a socket (h11 style): :class:`ChannelCodec` takes bytes and hands
back decoded messages, and turns messages into bytes. Anything malformed — an oversized
or empty frame, bad msgpack, a non-map body, a missing or ill-typed envelope field —
raises :class:`ChannelProtocolError` and nothing else; after that the codec refuses further
input because the byte stream has lost its framing.

The ``get_*`` helpers check one argument of a message each, so the host can validate every
field a (possibly hostile) guest sends with an error that names the field, what was
expected and what came.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, Final

import msgpack

from migd.errors import ProtocolError

#: One channel message: a decoded msgpack map with ``str`` keys.
Message = dict[str, Any]

MAX_FRAME: Final = 16 * 1024 * 1024
U64_MAX: Final = (1 << 64) - 1
U32_MAX: Final = (1 << 32) - 1
MAX_STR: Final = 4096  # longest string field accepted by default (names, errors, GUIDs)

_LENGTH = struct.Struct(">I")
HEADER_SIZE: Final = _LENGTH.size

REQUEST: Final = "req"
RESPONSE: Final = "rsp"


class ChannelProtocolError(ProtocolError):
    """A hypercall-channel peer sent (or we were asked to send) something off the spec."""


class _Missing:
    """Sentinel type: no default given, the field is required."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Final = _Missing()


def _type_name(value: object) -> str:
    return "boolean" if isinstance(value, bool) else type(value).__name__


def _lookup(msg: Mapping[str, Any], key: str, default: object) -> tuple[bool, Any]:
    """(present, value); raise if absent and required."""
    if key in msg:
        return True, msg[key]
    if default is REQUIRED:
        raise ChannelProtocolError(f"missing field {key!r}")
    return False, default


def check_int(value: object, what: str, lo: int, hi: int) -> int:
    """Return ``value`` if it is an int (not a bool) in ``[lo, hi]``, else raise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ChannelProtocolError(f"{what}: expected an integer in [{lo}, {hi}], got {_type_name(value)}")
    if not lo <= value <= hi:
        raise ChannelProtocolError(f"{what}: expected an integer in [{lo}, {hi}], got {value}")
    return value


def get_int(msg: Mapping[str, Any], key: str, lo: int, hi: int, default: int | _Missing = REQUIRED) -> int:
    """Field ``key`` as an int in ``[lo, hi]`` (``default`` if absent; required without one)."""
    present, value = _lookup(msg, key, default)
    return check_int(value, f"field {key!r}", lo, hi) if present else value


def get_u64(msg: Mapping[str, Any], key: str, default: int | _Missing = REQUIRED) -> int:
    """Field ``key`` as an unsigned 64-bit integer (a register value)."""
    return get_int(msg, key, 0, U64_MAX, default)


def get_u32(msg: Mapping[str, Any], key: str, default: int | _Missing = REQUIRED) -> int:
    """Field ``key`` as an unsigned 32-bit integer (e.g. a CPUID leaf)."""
    return get_int(msg, key, 0, U32_MAX, default)


def get_bool(msg: Mapping[str, Any], key: str, default: bool | _Missing = REQUIRED) -> bool:
    """Field ``key`` as a boolean (integers are not accepted as booleans)."""
    present, value = _lookup(msg, key, default)
    if present and not isinstance(value, bool):
        raise ChannelProtocolError(f"field {key!r}: expected a boolean, got {_type_name(value)}")
    return bool(value)


def get_str(msg: Mapping[str, Any], key: str, *, max_len: int = MAX_STR,
            default: str | _Missing = REQUIRED) -> str:
    """Field ``key`` as a string of at most ``max_len`` characters."""
    present, value = _lookup(msg, key, default)
    return _check_str(value, key, max_len, "a string") if present else str(value)


def get_optional_str(msg: Mapping[str, Any], key: str, *, max_len: int = MAX_STR) -> str | None:
    """Field ``key`` as a string or nil; absent means None."""
    value = msg.get(key)
    return None if value is None else _check_str(value, key, max_len, "a string or nil")


def _check_str(value: object, key: str, max_len: int, expected: str) -> str:
    if not isinstance(value, str):
        raise ChannelProtocolError(f"field {key!r}: expected {expected}, got {_type_name(value)}")
    if len(value) > max_len:
        raise ChannelProtocolError(f"field {key!r}: expected at most {max_len} characters, got {len(value)}")
    return value


def get_bytes(msg: Mapping[str, Any], key: str, *, max_len: int = MAX_FRAME,
              default: bytes | _Missing = REQUIRED) -> bytes:
    """Field ``key`` as a msgpack bin of at most ``max_len`` bytes."""
    present, value = _lookup(msg, key, default)
    if not present:
        return bytes(value)
    if not isinstance(value, bytes):
        raise ChannelProtocolError(f"field {key!r}: expected bytes, got {_type_name(value)}")
    if len(value) > max_len:
        raise ChannelProtocolError(f"field {key!r}: expected at most {max_len} bytes, got {len(value)}")
    return value


def get_u64_list(msg: Mapping[str, Any], key: str, length: int) -> list[int]:
    """Field ``key`` as a list of exactly ``length`` u64 values (hypercall arguments)."""
    _, value = _lookup(msg, key, REQUIRED)
    if not isinstance(value, list):
        raise ChannelProtocolError(f"field {key!r}: expected a list of {length} integers, got {_type_name(value)}")
    if len(value) != length:
        raise ChannelProtocolError(f"field {key!r}: expected {length} elements, got {len(value)}")
    return [check_int(item, f"field {key!r}[{i}]", 0, U64_MAX) for i, item in enumerate(value)]


def validate_envelope(msg: object) -> Message:
    """Check the envelope of one message (t, id, op / ok, error, fault) and return it typed."""
    if not isinstance(msg, dict):
        raise ChannelProtocolError(f"message must be a map, got {_type_name(msg)}")
    for key in msg:
        if not isinstance(key, str):
            raise ChannelProtocolError(f"message keys must be strings, got {_type_name(key)}")
    kind = get_str(msg, "t", max_len=8)
    get_u64(msg, "id")
    if kind == REQUEST:
        if not get_str(msg, "op", max_len=64):
            raise ChannelProtocolError("field 'op': expected a non-empty string, got ''")
    elif kind == RESPONSE:
        if not get_bool(msg, "ok"):
            get_str(msg, "error")
            get_optional_str(msg, "fault", max_len=64)
    else:
        raise ChannelProtocolError(f"field 't': expected 'req' or 'rsp', got {kind!r}")
    return msg


def request(msg_id: int, op: str, **fields: Any) -> Message:
    """Build a request message."""
    return {"t": REQUEST, "id": msg_id, "op": op, **fields}


def response_ok(msg_id: int, **result: Any) -> Message:
    """Build a successful response to request ``msg_id``."""
    return {"t": RESPONSE, "id": msg_id, "ok": True, **result}


def response_error(msg_id: int, error: str, fault: str | None = None) -> Message:
    """Build a failed response to request ``msg_id`` (``fault`` e.g. ``"GP"`` for an injected #GP)."""
    msg: Message = {"t": RESPONSE, "id": msg_id, "ok": False, "error": error}
    if fault is not None:
        msg["fault"] = fault
    return msg


class ChannelCodec:
    """Frames messages for one direction pair of a hypercall channel connection.

    ``feed`` buffers partial frames across calls; a frame whose announced length exceeds
    ``max_frame`` is refused from its 4-byte header, before anything is buffered for it.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        if not 1 <= max_frame <= MAX_FRAME:
            raise ValueError(f"max_frame must be in [1, {MAX_FRAME}], got {max_frame}")
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._broken: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Take received bytes; return every message they complete, in order."""
        if self._broken is not None:
            raise ChannelProtocolError(f"channel stream already failed: {self._broken}")
        self._buffer += data
        messages: list[Message] = []
        try:
            offset = 0
            while len(self._buffer) - offset >= HEADER_SIZE:
                (length,) = _LENGTH.unpack_from(self._buffer, offset)
                self._check_length(length)
                end = offset + HEADER_SIZE + length
                if end > len(self._buffer):
                    break
                messages.append(self._decode(memoryview(self._buffer)[offset + HEADER_SIZE:end]))
                offset = end
            del self._buffer[:offset]
        except ChannelProtocolError as exc:
            self._broken = str(exc)
            self._buffer.clear()
            raise
        return messages

    def encode(self, msg: Mapping[str, Any]) -> bytes:
        """Serialize one message (envelope checked) into a length-prefixed frame."""
        validate_envelope(dict(msg))
        try:
            body = msgpack.packb(msg, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise ChannelProtocolError(f"cannot encode message: {exc}") from exc
        self._check_length(len(body))
        return _LENGTH.pack(len(body)) + body

    def _check_length(self, length: int) -> None:
        if length == 0:
            raise ChannelProtocolError("empty frame: expected a msgpack map, got 0 bytes")
        if length > self.max_frame:
            raise ChannelProtocolError(f"frame of {length} bytes exceeds the maximum of {self.max_frame}")

    @staticmethod
    def _decode(body: memoryview) -> Message:
        try:
            msg = msgpack.unpackb(body, use_list=True, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            # ValueError covers ExtraData, FormatError, StackError and bad UTF-8.
            raise ChannelProtocolError(f"bad msgpack frame: {exc}") from exc
        finally:
            body.release()
        return validate_envelope(msg)
