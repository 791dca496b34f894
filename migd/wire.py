"""The migration stream codec, sans-I/O: bytes in, typed messages out, and back.

Frame layout (all integers big-endian)::

    u32 length      bytes that follow this field: 1 + 2 + meta_len + payload_len + 4
    u8  type        FrameType
    u16 meta_len
    meta            a msgpack map (small: never more than 64 KiB)
    payload         raw bytes: page contents, transport ciphertext, an encoded bitmap
    u32 crc         CRC32 of (sequence as u64 LE || type .. payload)

The sequence number is implicit: each direction counts its frames from 0 and both ends
feed it into the CRC, so a corrupted, dropped, duplicated, replayed or reordered frame of
any kind (shared pages and handshake fields included, which the SEV transport does not
cover) ends the stream. CRC32 stops accidents, not attackers: against those, run the stream
over mutual TLS (the ``[tls]`` table); private pages are bound by the SEV transport anyway.

Page payloads are never re-encoded: the sender hands ``encode`` a memoryview of guest RAM
or of a transport buffer and gets back a list of buffers for ``writelines``; the receiver
gets a memoryview into its receive buffer. Nothing in here touches a socket (h11 style):
``FrameDecoder.get_buffer``/``buffer_updated`` match ``asyncio.BufferedProtocol`` so the
kernel copies straight into the decoder's buffer.

Every length is checked before anything is allocated for it: a frame larger than its type
allows, an unknown type, bad msgpack, missing or ill-typed fields all raise ``ProtocolError``.

The messages are :mod:`migd.messages` (one class per frame type, each with its own metadata
codec, and the registry this framing dispatches through); their limits and field checks are
:mod:`migd.frame_fields`. Both are re-exported here, so ``wire.Hello`` is the one name users need.
"""


from __future__ import annotations

import struct
import zlib
from collections.abc import Callable

import msgpack

from migd.errors import ProtocolError
from migd.frame_fields import (
    CAPABILITIES,
    DIGEST_SIZE,
    MAC_SIZE,
    MAX_BITMAP_BYTES,
    MAX_CONNECTIONS,
    MAX_GUEST_PAGES,
    MAX_META,
    MAX_PAYLOAD,
    MAX_RUN_PAGES,
    MAX_VCPU_STATE,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    TRANSPORT_HEADER_SIZE,
    U64,
    FrameType,
    no_payload,
    negotiate,
)
from migd.messages import (
    _MAX_PAYLOAD,
    MESSAGE_CLASSES,
    RESOLUTIONS,
    Abort,
    Commit,
    GuestSpec,
    Hello,
    Join,
    Joined,
    Message,
    MessageBase,
    Ping,
    Pong,
    Prepare,
    Prepared,
    PrivatePages,
    Resolve,
    Resolved,
    RoundEnd,
    Session,
    SessionAck,
    SharedBitmap,
    SharedPages,
    Started,
    VcpuState,
    Welcome,
    ZeroPages,
    authenticated_bytes,
    detached,
    pack_vmsa,
    unpack_vmsa,
)

__all__ = [
    "CAPABILITIES", "CRC_SIZE", "DIGEST_SIZE", "LANE_PREAMBLE", "MAC_SIZE", "MAX_BITMAP_BYTES", "MAX_CONNECTIONS", "MAX_GUEST_PAGES", "MAX_META",
    "MAX_PAYLOAD", "MAX_RUN_PAGES", "MAX_VCPU_STATE", "MESSAGE_CLASSES", "NONCE_SIZE", "PREFIX_SIZE",
    "PROTOCOL_VERSION", "RESOLUTIONS", "TRANSPORT_HEADER_SIZE", "U64", "Abort", "Commit", "FrameDecoder",
    "FrameEncoder", "FrameType", "GuestSpec", "Hello", "Join", "Joined", "Message", "MessageBase", "Ping", "Pong", "Prepare",
    "Prepared", "PrivatePages", "Resolve", "Resolved", "RoundEnd", "Session", "SessionAck", "SharedBitmap",
    "SharedPages", "Started", "VcpuState", "Welcome", "ZeroPages", "authenticated_bytes", "decode_frame",
    "detached", "encode", "encode_bytes", "encode_stream", "negotiate", "pack_vmsa", "unpack_vmsa",
]

_PREFIX = struct.Struct(">IBH")  # length, type, meta_len
PREFIX_SIZE = _PREFIX.size  # 7
_CRC = struct.Struct(">I")
CRC_SIZE = _CRC.size  # 4
_SEQ = struct.Struct("<Q")
#: The first bytes of a further connection of a migration, in the clear (before TLS, if any):
#: the listener hands such a connection to a thread of its own before anything else is read.
#: Its first byte can begin neither a TLS record (0x16) nor a frame (a length below 16 MiB).
LANE_PREAMBLE = b"MIGDLANE"


def _load_crc32() -> Callable[[bytes | memoryview, int], int]:
    """The fastest CRC-32 (ISO-HDLC, zlib's polynomial and values) available here.

    ISA-L's (``isal``, a dependency) ran at 44 GB/s against zlib 1.2.13's 2.6 GB/s on this
    2-core machine, 1 MiB buffers: zlib's costs each end ~0.25 core-s per GiB migrated, where
    both daemons together spend 1.2–3.8 (bench/cpu_budget.py, bench/migrate.py). Same function,
    so the wire format does not depend on it; zlib remains for a platform without an isal wheel.
    """
    try:
        from isal.isal_zlib import crc32 as isal_crc32
    except ImportError:
        return zlib.crc32
    return isal_crc32  # type: ignore[no-any-return]


_crc32 = _load_crc32()
#: Which CRC-32 implementation runs here (benchmarks report it).
CRC32_IMPLEMENTATION = f"{_crc32.__module__}.{_crc32.__name__}"


def _crc(seq: int, head: bytes | memoryview, payload: bytes | memoryview) -> int:
    crc = _crc32(_SEQ.pack(seq), 0)
    crc = _crc32(head, crc)
    return _crc32(payload, crc) if len(payload) else crc


class FrameEncoder:
    """Frames messages for one direction of a stream, numbering them for the CRC."""

    def __init__(self) -> None:
        self.sequence = 0

    def encode(self, msg: Message) -> list[bytes | memoryview]:
        """Frame ``msg``: buffers for ``transport.writelines`` (the payload is not copied)."""
        meta = msgpack.packb(msg.to_meta(), use_bin_type=True)
        payload = getattr(msg, "payload", b"")
        if len(meta) > MAX_META:
            raise ProtocolError(f"{msg.TYPE.name}: metadata of {len(meta)} bytes exceeds {MAX_META}")
        if len(payload) > _MAX_PAYLOAD[msg.TYPE]:
            raise ProtocolError(
                f"{msg.TYPE.name}: payload of {len(payload)} bytes exceeds {_MAX_PAYLOAD[msg.TYPE]}"
            )
        head = _PREFIX.pack(3 + len(meta) + len(payload) + CRC_SIZE, msg.TYPE, len(meta)) + meta
        trailer = _CRC.pack(_crc(self.sequence, memoryview(head)[4:], payload))
        self.sequence += 1
        return [head, payload, trailer] if len(payload) else [head + trailer]

    def encode_bytes(self, msg: Message) -> bytes:
        """Frame ``msg`` into one bytes object (tests, small control frames)."""
        return b"".join(bytes(part) for part in self.encode(msg))


def encode(msg: Message, sequence: int = 0) -> list[bytes | memoryview]:
    """Frame one message as frame number ``sequence`` of its direction."""
    encoder = FrameEncoder()
    encoder.sequence = sequence
    return encoder.encode(msg)


def encode_bytes(msg: Message, sequence: int = 0) -> bytes:
    """Frame one message into bytes as frame number ``sequence`` (tests, small control frames)."""
    return b"".join(bytes(part) for part in encode(msg, sequence))


def encode_stream(messages: list[Message]) -> bytes:
    """Frame a whole sequence of messages as one direction of a stream (tests)."""
    encoder = FrameEncoder()
    return b"".join(encoder.encode_bytes(m) for m in messages)


# ---------------------------------------------------------------- decode


def decode_frame(ftype: int, meta_bytes: memoryview, payload: memoryview) -> Message:
    """Turn one complete frame into a message; every field is checked.

    The frame type picks the class (``MESSAGE_CLASSES``); the class checks its own fields.
    """
    try:
        cls = MESSAGE_CLASSES[FrameType(ftype)]
    except ValueError:
        raise ProtocolError(f"unknown frame type {ftype}") from None
    what = cls.TYPE.name
    try:
        meta = msgpack.unpackb(meta_bytes, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise ProtocolError(f"{what}: metadata is not valid msgpack: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"{what}: metadata must be a map, got {type(meta).__name__}")
    if cls.CONTROL:
        no_payload(payload, what)
    return cls.from_meta(meta, payload, what)


class FrameDecoder:
    """Incremental frame decoder over one preallocated, bounded receive buffer.

    Use either ``feed(data)`` (payloads copied out) or, from an ``asyncio.BufferedProtocol``,
    ``get_buffer()`` then ``buffer_updated(n)``: there payload memoryviews point into the
    decoder's buffer and stay valid only until the next ``get_buffer``: consume them (write
    them to guest RAM) before reading more. After a ``ProtocolError`` the decoder is
    dead, as the stream can no longer be trusted.
    """

    def __init__(self, initial: int = 1 << 20, *, max_frame: int | None = None) -> None:
        self._buf = bytearray(max(initial, PREFIX_SIZE))
        #: The largest whole frame (length prefix to CRC) accepted, checked from the prefix
        #: before the frame is buffered; None: only the per-type payload limits. A stream that
        #: has not authenticated its peer yet accepts only control frames (migd/stream.py), so
        #: an unauthenticated peer cannot make the buffer grow to a page frame's 2 MiB.
        self.max_frame = max_frame
        self._start = 0  # first unconsumed byte
        self._end = 0  # one past the last received byte
        self._need = 0  # size of the incomplete frame at _start, once its prefix is known
        self._failed: ProtocolError | None = None
        self.bytes_received = 0
        self.sequence = 0  # the next frame's number in this direction (feeds the CRC)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Free space to receive into; compacts, or grows within the frame-size bound."""
        self._check_alive()
        pending = self._end - self._start
        need = max(self._need, pending + 1)  # the whole frame being received, and at least one byte
        if need > len(self._buf):
            # A new buffer rather than a resize: views handed out earlier may still be alive.
            new = bytearray(need)
            new[:pending] = self._buf[self._start : self._end]
            self._buf = new
            self._start, self._end = 0, pending
        elif self._start + need > len(self._buf):
            # Same-size move; by contract the caller has consumed earlier payload views.
            self._buf[:pending] = self._buf[self._start : self._end]
            self._start, self._end = 0, pending
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> list[Message]:
        """``nbytes`` were written into the last ``get_buffer()``; returns completed messages."""
        self._end += nbytes
        self.bytes_received += nbytes
        return self._parse()

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Copy ``data`` in and return the completed messages, payloads copied out (they stay valid).

        The zero-copy path for hot loops is ``get_buffer``/``buffer_updated``.
        """
        view = memoryview(data).cast("B")
        messages: list[Message] = []
        while len(view):
            target = self.get_buffer()
            n = min(len(target), len(view))
            target[:n] = view[:n]
            view = view[n:]
            messages.extend(detached(m) for m in self.buffer_updated(n))
        return messages

    @property
    def missing_bytes(self) -> int:
        """Bytes still to receive before the frame under way is complete: its prefix first, then
        the rest once the prefix is known (at least 1)."""
        pending = self._end - self._start
        return max(1, (self._need or PREFIX_SIZE) - pending)

    @property
    def pending_bytes(self) -> int:
        """Bytes received that do not yet form a complete frame."""
        return self._end - self._start

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise ProtocolError(f"stream already failed: {self._failed}")

    def _parse(self) -> list[Message]:
        messages: list[Message] = []
        buf = memoryview(self._buf)
        try:
            while self._end - self._start >= PREFIX_SIZE:
                length, ftype, meta_len = _PREFIX.unpack_from(self._buf, self._start)
                if length < 3 + meta_len + CRC_SIZE:
                    raise ProtocolError(
                        f"frame length {length} is shorter than its metadata ({meta_len}) and checksum"
                    )
                try:
                    limit = _MAX_PAYLOAD[FrameType(ftype)]
                except ValueError:
                    raise ProtocolError(f"unknown frame type {ftype}") from None
                payload_len = length - 3 - meta_len - CRC_SIZE
                if payload_len > limit:
                    raise ProtocolError(
                        f"{FrameType(ftype).name} frame carries {payload_len} payload bytes, at most {limit} allowed"
                    )
                total = 4 + length
                if self.max_frame is not None and total > self.max_frame:
                    raise ProtocolError(
                        f"{FrameType(ftype).name} frame of {total} bytes, at most {self.max_frame} allowed here"
                    )
                if self._end - self._start < total:
                    self._need = total
                    break
                self._need = 0
                meta_start = self._start + PREFIX_SIZE
                payload_start = meta_start + meta_len
                crc_start = self._start + total - CRC_SIZE
                (crc,) = _CRC.unpack_from(self._buf, crc_start)
                if crc != _crc(self.sequence, buf[self._start + 4 : crc_start], b""):
                    raise ProtocolError(
                        f"frame {self.sequence} ({FrameType(ftype).name}) failed its CRC32 check: corrupted, "
                        f"or a frame was dropped, duplicated, replayed or reordered"
                    )
                messages.append(
                    decode_frame(ftype, buf[meta_start:payload_start], buf[payload_start:crc_start])
                )
                self.sequence += 1
                self._start = self._start + total
        except ProtocolError as exc:
            self._failed = exc
            raise
        if self._start == self._end:
            self._start = self._end = 0
        return messages
