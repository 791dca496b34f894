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
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import msgpack

from migd.abi import PAGE_SIZE
from migd.errors import ProtocolError

#: 2: PING/PONG before the switch-over; 3: the destination's nonce, key confirmation and the
#: authenticated hand-off (docs/protocol.md "Authentication").
PROTOCOL_VERSION = 3
#: Capabilities this implementation speaks; the session uses the intersection.
CAPABILITIES = ("zero-runs", "bound-transport", "sev-compat-transport", "vmsa")

_PREFIX = struct.Struct(">IBH")  # length, type, meta_len
PREFIX_SIZE = _PREFIX.size  # 7
_CRC = struct.Struct(">I")
CRC_SIZE = _CRC.size  # 4
_SEQ = struct.Struct("<Q")
MAX_META = 0xFFFF
MAX_RUN_PAGES = 512  # pages per page frame (2 MiB): bounds the receive buffer
MAX_GUEST_PAGES = 1 << 26  # 256 GiB guests
MAX_BITMAP_BYTES = (MAX_GUEST_PAGES // 8) + 4096
MAX_VCPU_STATE = 64 * 1024
MAX_PAYLOAD = max(MAX_RUN_PAGES * PAGE_SIZE, MAX_BITMAP_BYTES)
TRANSPORT_HEADER_SIZE = 52
NONCE_SIZE = 32  # the destination's fresh nonce (WELCOME) and RESOLVE's
MAC_SIZE = 32  # HMAC-SHA256 under the session's hand-off key
DIGEST_SIZE = 32  # SHA-256
_NO_MAC = bytes(MAC_SIZE)  # the default of an unauthenticated message: never verifies
U64 = (1 << 64) - 1


class FrameType(enum.IntEnum):
    """Frame types of the migration stream, in the order a migration uses them."""

    HELLO = 1  # source → destination: who, what, which capabilities
    WELCOME = 2  # destination → source: accepted, here is my PDH certificate
    SESSION = 3  # source → destination: source PDH + session blob (after SEND_START)
    SESSION_ACK = 4  # destination → source: RECEIVE_START succeeded
    PRIVATE_PAGES = 5  # a run through the SEV transport
    SHARED_PAGES = 6  # a run of plaintext shared pages
    ZERO_PAGES = 7  # a run of never-populated (all-zero) pages: no payload
    ROUND_END = 8  # end of a pre-copy round (progress only)
    SHARED_BITMAP = 9  # final shared-page bitmap (PageBitmap.encode())
    VCPU_STATE = 10  # vCPU state: a VMSA transport packet (SEV-ES) or plaintext state
    PREPARE = 11  # source → destination: everything sent, verify and get ready
    PREPARED = 12  # destination → source: I hold a complete, verified guest
    COMMIT = 13  # source → destination: the source has committed; start the guest
    STARTED = 14  # destination → source: the guest runs here
    ABORT = 15  # either way: the migration is over, with a reason
    RESOLVE = 16  # destination → source listener, on a new stream: did migration ID commit?
    RESOLVED = 17  # source → destination: committed | aborted | pending | unknown
    PING = 18  # source → destination: answer once every earlier frame is placed (QEMU's MIG_CMD_PING)
    PONG = 19  # destination → source: the token of the PING answered


# ---------------------------------------------------------------- field checks


def _field(meta: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    if name not in meta:
        raise ProtocolError(f"{what}: missing field {name!r}")
    value = meta[name]
    if isinstance(value, bool) and kind is int:
        raise ProtocolError(f"{what}: field {name!r} must be an integer, got a boolean")
    if not isinstance(value, kind):
        raise ProtocolError(f"{what}: field {name!r} has type {type(value).__name__}")
    return value


def _int(meta: dict[str, Any], name: str, what: str, lo: int = 0, hi: int = U64) -> int:
    value: int = _field(meta, name, int, what)
    if not lo <= value <= hi:
        raise ProtocolError(f"{what}: field {name!r} must be in [{lo}, {hi}], got {value}")
    return value


def _bytes(meta: dict[str, Any], name: str, what: str, size: int | None = None, max_size: int = MAX_META) -> bytes:
    value: bytes = _field(meta, name, bytes, what)
    if size is not None and len(value) != size:
        raise ProtocolError(f"{what}: field {name!r} must be {size} bytes, got {len(value)}")
    if len(value) > max_size:
        raise ProtocolError(f"{what}: field {name!r} is {len(value)} bytes, at most {max_size} allowed")
    return value


def _str(meta: dict[str, Any], name: str, what: str, max_len: int = 256) -> str:
    value: str = _field(meta, name, str, what)
    if len(value) > max_len:
        raise ProtocolError(f"{what}: field {name!r} is longer than {max_len} characters")
    return value


def _no_payload(payload: memoryview, what: str) -> None:
    if len(payload):
        raise ProtocolError(f"{what}: carries {len(payload)} payload bytes, expected none")


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class GuestSpec:
    """What the destination needs to know to create the guest before any page arrives."""

    name: str
    npages: int
    policy: int
    efi: bool = False
    uefi_live_migration: bool | None = None

    def to_meta(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "npages": self.npages,
            "policy": self.policy,
            "efi": self.efi,
            "uefi_lm": self.uefi_live_migration,
        }

    @classmethod
    def from_meta(cls, meta: Any) -> GuestSpec:
        what = "HELLO guest"
        if not isinstance(meta, dict):
            raise ProtocolError(f"{what}: expected a map")
        uefi = meta.get("uefi_lm")
        if uefi is not None and not isinstance(uefi, bool):
            raise ProtocolError(f"{what}: field 'uefi_lm' must be a boolean or nil")
        name = _str(meta, "name", what, 64)
        if not name:
            raise ProtocolError(f"{what}: empty guest name")
        return cls(
            name=name,
            npages=_int(meta, "npages", what, 1, MAX_GUEST_PAGES),
            policy=_int(meta, "policy", what, 0, 0xFFFFFFFF),
            efi=_field(meta, "efi", bool, what),
            uefi_live_migration=uefi,
        )


@dataclass(frozen=True)
class Hello:
    migration_id: str
    guest: GuestSpec
    transport_mode: str
    version: int = PROTOCOL_VERSION
    capabilities: tuple[str, ...] = CAPABILITIES
    #: The source's migration listener port, where a destination in doubt sends RESOLVE (0: none).
    resolve_port: int = 0
    TYPE: ClassVar[FrameType] = FrameType.HELLO


@dataclass(frozen=True)
class Welcome:
    pdh_cert: bytes
    version: int = PROTOCOL_VERSION
    capabilities: tuple[str, ...] = CAPABILITIES
    #: The destination's fresh nonce: bound into the session, so nothing recorded elsewhere verifies.
    nonce: bytes = bytes(NONCE_SIZE)
    TYPE: ClassVar[FrameType] = FrameType.WELCOME


@dataclass(frozen=True)
class Session:
    pdh_cert: bytes
    session_blob: bytes
    policy: int
    #: The source's proof that it holds the session keys, over the transcript (HELLO, WELCOME, this).
    mac: bytes = _NO_MAC
    TYPE: ClassVar[FrameType] = FrameType.SESSION


@dataclass(frozen=True)
class SessionAck:
    """Key confirmation: the destination unwrapped the session (MAC over the transcript)."""

    mac: bytes = _NO_MAC
    TYPE: ClassVar[FrameType] = FrameType.SESSION_ACK


@dataclass(frozen=True)
class PrivatePages:
    gpa: int
    npages: int
    header: bytes  # the 52-byte SEV transport packet header
    payload: memoryview | bytes = field(repr=False)
    TYPE: ClassVar[FrameType] = FrameType.PRIVATE_PAGES


@dataclass(frozen=True)
class SharedPages:
    gpa: int
    npages: int
    payload: memoryview | bytes = field(repr=False)
    TYPE: ClassVar[FrameType] = FrameType.SHARED_PAGES


@dataclass(frozen=True)
class ZeroPages:
    gpa: int
    npages: int
    TYPE: ClassVar[FrameType] = FrameType.ZERO_PAGES


@dataclass(frozen=True)
class RoundEnd:
    round: int
    dirty_pages: int
    TYPE: ClassVar[FrameType] = FrameType.ROUND_END


@dataclass(frozen=True)
class SharedBitmap:
    payload: memoryview | bytes = field(repr=False)
    TYPE: ClassVar[FrameType] = FrameType.SHARED_BITMAP


@dataclass(frozen=True)
class VcpuState:
    """vCPU state: ``header`` set = a VMSA transport packet (SEV-ES), else plaintext state."""

    vcpu_id: int
    header: bytes | None
    payload: memoryview | bytes = field(repr=False)
    TYPE: ClassVar[FrameType] = FrameType.VCPU_STATE


@dataclass(frozen=True)
class Prepare:
    """The end of the stream, bound: what was sent, in what order, and the final state's digests."""

    pages_sent: int  # pages of every kind, repeats included
    frames: int = 0  # page frames
    private: int = 0
    shared: int = 0
    zero: int = 0
    transport_seq: int = 0  # SEV transport packets sealed (private runs and the VMSA)
    stream_digest: bytes = bytes(DIGEST_SIZE)  # SHA-256 chain of every page frame's (type, gpa, npages)
    bitmap_digest: bytes = bytes(DIGEST_SIZE)  # SHA-256 of the SHARED_BITMAP payload
    vcpu_digest: bytes = bytes(DIGEST_SIZE)  # SHA-256 of the VCPU_STATE header and payload
    mac: bytes = _NO_MAC
    TYPE: ClassVar[FrameType] = FrameType.PREPARE


@dataclass(frozen=True)
class Prepared:
    pages_received: int
    mac: bytes = _NO_MAC
    TYPE: ClassVar[FrameType] = FrameType.PREPARED


@dataclass(frozen=True)
class Commit:
    mac: bytes = _NO_MAC
    TYPE: ClassVar[FrameType] = FrameType.COMMIT


@dataclass(frozen=True)
class Started:
    mac: bytes = _NO_MAC
    TYPE: ClassVar[FrameType] = FrameType.STARTED


@dataclass(frozen=True)
class Abort:
    """The end of a migration; ``mac`` (once the session has keys) proves which peer said it."""

    reason: str
    mac: bytes | None = None
    TYPE: ClassVar[FrameType] = FrameType.ABORT


@dataclass(frozen=True)
class Ping:
    """The source asks whether the destination has placed everything sent before it.

    Bytes that left the source's socket may still sit in kernel buffers or a stalled
    network; only the destination can say they arrived (see ``source._link_caught_up``).
    """

    token: int
    TYPE: ClassVar[FrameType] = FrameType.PING


@dataclass(frozen=True)
class Pong:
    token: int
    TYPE: ClassVar[FrameType] = FrameType.PONG


RESOLUTIONS = ("committed", "aborted", "pending", "unknown")


@dataclass(frozen=True)
class Resolve:
    """A destination that lost the stream between PREPARED and COMMIT asks the source.

    ``mac`` under that migration's hand-off key proves the asker is its destination; the fresh
    ``nonce`` makes the answer's MAC unique to this question.
    """

    migration_id: str
    nonce: bytes = bytes(NONCE_SIZE)
    mac: bytes = _NO_MAC
    TYPE: ClassVar[FrameType] = FrameType.RESOLVE


@dataclass(frozen=True)
class Resolved:
    migration_id: str
    outcome: str  # one of RESOLUTIONS
    mac: bytes = _NO_MAC
    TYPE: ClassVar[FrameType] = FrameType.RESOLVED


Message = Union[
    Hello, Welcome, Session, SessionAck, PrivatePages, SharedPages, ZeroPages, RoundEnd,
    SharedBitmap, VcpuState, Prepare, Prepared, Commit, Started, Abort, Resolve, Resolved, Ping, Pong,
]

#: Largest payload each frame type may carry: checked from the length prefix, before buffering.
_MAX_PAYLOAD: dict[FrameType, int] = {t: 0 for t in FrameType}
_MAX_PAYLOAD.update(
    {
        FrameType.PRIVATE_PAGES: MAX_RUN_PAGES * PAGE_SIZE,
        FrameType.SHARED_PAGES: MAX_RUN_PAGES * PAGE_SIZE,
        FrameType.SHARED_BITMAP: MAX_BITMAP_BYTES,
        FrameType.VCPU_STATE: MAX_VCPU_STATE,
    }
)


# ---------------------------------------------------------------- encode


def _meta_of(msg: Message) -> dict[str, Any]:
    if isinstance(msg, Hello):
        return {
            "version": msg.version,
            "caps": list(msg.capabilities),
            "id": msg.migration_id,
            "guest": msg.guest.to_meta(),
            "transport": msg.transport_mode,
            "resolve_port": msg.resolve_port,
        }
    if isinstance(msg, Welcome):
        return {"version": msg.version, "caps": list(msg.capabilities), "pdh": msg.pdh_cert, "nonce": msg.nonce}
    if isinstance(msg, Session):
        return {"pdh": msg.pdh_cert, "blob": msg.session_blob, "policy": msg.policy, "mac": msg.mac}
    if isinstance(msg, PrivatePages):
        return {"gpa": msg.gpa, "n": msg.npages, "hdr": msg.header}
    if isinstance(msg, (SharedPages, ZeroPages)):
        return {"gpa": msg.gpa, "n": msg.npages}
    if isinstance(msg, RoundEnd):
        return {"round": msg.round, "dirty": msg.dirty_pages}
    if isinstance(msg, VcpuState):
        return {"vcpu": msg.vcpu_id, "hdr": msg.header}
    if isinstance(msg, Prepare):
        return {"pages": msg.pages_sent, "frames": msg.frames, "kinds": [msg.private, msg.shared, msg.zero],
                "seq": msg.transport_seq, "stream": msg.stream_digest, "bitmap": msg.bitmap_digest,
                "vcpu": msg.vcpu_digest, "mac": msg.mac}
    if isinstance(msg, Prepared):
        return {"pages": msg.pages_received, "mac": msg.mac}
    if isinstance(msg, Abort):
        return {"reason": msg.reason[:1024], "mac": msg.mac}
    if isinstance(msg, Resolve):
        return {"id": msg.migration_id, "nonce": msg.nonce, "mac": msg.mac}
    if isinstance(msg, Resolved):
        return {"id": msg.migration_id, "outcome": msg.outcome, "mac": msg.mac}
    if isinstance(msg, (Ping, Pong)):
        return {"token": msg.token}
    if isinstance(msg, (SessionAck, Commit, Started)):
        return {"mac": msg.mac}
    return {}


def authenticated_bytes(msg: Message) -> bytes:
    """What a message's MAC covers of it: its type and every metadata field but ``mac``.

    msgpack of the sorted fields: both ends compute it from the decoded message, so the bytes
    do not depend on how the peer happened to encode its map.
    """
    meta = _meta_of(msg)
    meta.pop("mac", None)
    return bytes([msg.TYPE]) + msgpack.packb(dict(sorted(meta.items())), use_bin_type=True)


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
        meta = msgpack.packb(_meta_of(msg), use_bin_type=True)
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


def _run(meta: dict[str, Any], payload: memoryview, what: str, with_payload: bool) -> tuple[int, int]:
    gpa = _int(meta, "gpa", what)
    npages = _int(meta, "n", what, 1, MAX_RUN_PAGES)
    if gpa % PAGE_SIZE:
        raise ProtocolError(f"{what}: gpa {gpa:#x} is not page aligned")
    if gpa // PAGE_SIZE + npages > MAX_GUEST_PAGES:
        raise ProtocolError(f"{what}: run {gpa:#x}+{npages} pages is past any guest's RAM")
    expected = npages * PAGE_SIZE if with_payload else 0
    if len(payload) != expected:
        raise ProtocolError(f"{what}: {npages} pages need {expected} payload bytes, got {len(payload)}")
    return gpa, npages


def _capabilities(meta: dict[str, Any], what: str) -> tuple[str, ...]:
    caps = _field(meta, "caps", list, what)
    if len(caps) > 64 or not all(isinstance(c, str) and len(c) <= 64 for c in caps):
        raise ProtocolError(f"{what}: capabilities must be at most 64 short strings")
    return tuple(caps)


def decode_frame(ftype: int, meta_bytes: memoryview, payload: memoryview) -> Message:
    """Turn one complete frame into a message; every field is checked."""
    try:
        frame_type = FrameType(ftype)
    except ValueError:
        raise ProtocolError(f"unknown frame type {ftype}") from None
    what = frame_type.name
    try:
        meta = msgpack.unpackb(meta_bytes, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise ProtocolError(f"{what}: metadata is not valid msgpack: {exc}") from None
    if not isinstance(meta, dict):
        raise ProtocolError(f"{what}: metadata must be a map, got {type(meta).__name__}")
    if frame_type is FrameType.PRIVATE_PAGES:
        gpa, npages = _run(meta, payload, what, True)
        return PrivatePages(gpa, npages, _bytes(meta, "hdr", what, TRANSPORT_HEADER_SIZE), payload)
    if frame_type is FrameType.SHARED_PAGES:
        gpa, npages = _run(meta, payload, what, True)
        return SharedPages(gpa, npages, payload)
    if frame_type is FrameType.ZERO_PAGES:
        gpa, npages = _run(meta, payload, what, False)
        return ZeroPages(gpa, npages)
    if frame_type is FrameType.SHARED_BITMAP:
        if not len(payload):
            raise ProtocolError(f"{what}: empty bitmap")
        return SharedBitmap(payload)
    if frame_type is FrameType.VCPU_STATE:
        header = meta.get("hdr")
        if header is not None:
            header = _bytes(meta, "hdr", what, TRANSPORT_HEADER_SIZE)
            if len(payload) != PAGE_SIZE:
                raise ProtocolError(f"{what}: a VMSA packet carries {PAGE_SIZE} bytes, got {len(payload)}")
        return VcpuState(_int(meta, "vcpu", what, 0, 255), header, payload)
    _no_payload(payload, what)
    if frame_type is FrameType.HELLO:
        return Hello(
            migration_id=_str(meta, "id", what, 64),
            guest=GuestSpec.from_meta(meta.get("guest")),
            transport_mode=_str(meta, "transport", what, 32),
            version=_int(meta, "version", what, 0, 0xFFFF),
            capabilities=_capabilities(meta, what),
            resolve_port=_int(meta, "resolve_port", what, 0, 65535) if "resolve_port" in meta else 0,
        )
    if frame_type is FrameType.WELCOME:
        return Welcome(
            pdh_cert=_bytes(meta, "pdh", what, max_size=16384),
            version=_int(meta, "version", what, 0, 0xFFFF),
            capabilities=_capabilities(meta, what),
            nonce=_bytes(meta, "nonce", what, NONCE_SIZE),
        )
    if frame_type is FrameType.SESSION:
        return Session(
            pdh_cert=_bytes(meta, "pdh", what, max_size=16384),
            session_blob=_bytes(meta, "blob", what, 128),
            policy=_int(meta, "policy", what, 0, 0xFFFFFFFF),
            mac=_bytes(meta, "mac", what, MAC_SIZE),
        )
    if frame_type is FrameType.ROUND_END:
        return RoundEnd(_int(meta, "round", what, 0, 1 << 32), _int(meta, "dirty", what, 0, MAX_GUEST_PAGES))
    if frame_type is FrameType.PREPARE:
        kinds = _field(meta, "kinds", list, what)
        if len(kinds) != 3 or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= U64
                                      for k in kinds):
            raise ProtocolError(f"{what}: field 'kinds' must be three page counts")
        return Prepare(
            pages_sent=_int(meta, "pages", what), frames=_int(meta, "frames", what),
            private=kinds[0], shared=kinds[1], zero=kinds[2], transport_seq=_int(meta, "seq", what),
            stream_digest=_bytes(meta, "stream", what, DIGEST_SIZE),
            bitmap_digest=_bytes(meta, "bitmap", what, DIGEST_SIZE),
            vcpu_digest=_bytes(meta, "vcpu", what, DIGEST_SIZE), mac=_bytes(meta, "mac", what, MAC_SIZE),
        )
    if frame_type is FrameType.PREPARED:
        return Prepared(_int(meta, "pages", what), _bytes(meta, "mac", what, MAC_SIZE))
    if frame_type is FrameType.ABORT:
        mac = meta.get("mac")
        return Abort(_str(meta, "reason", what, 1024), None if mac is None else _bytes(meta, "mac", what, MAC_SIZE))
    if frame_type is FrameType.SESSION_ACK:
        return SessionAck(_bytes(meta, "mac", what, MAC_SIZE))
    if frame_type is FrameType.COMMIT:
        return Commit(_bytes(meta, "mac", what, MAC_SIZE))
    if frame_type is FrameType.RESOLVE:
        return Resolve(_str(meta, "id", what, 64), _bytes(meta, "nonce", what, NONCE_SIZE),
                       _bytes(meta, "mac", what, MAC_SIZE))
    if frame_type is FrameType.RESOLVED:
        outcome = _str(meta, "outcome", what, 16)
        if outcome not in RESOLUTIONS:
            raise ProtocolError(f"{what}: outcome must be one of {RESOLUTIONS}, got {outcome!r}")
        return Resolved(_str(meta, "id", what, 64), outcome, _bytes(meta, "mac", what, MAC_SIZE))
    if frame_type is FrameType.PING:
        return Ping(_int(meta, "token", what, 0, 0xFFFFFFFF))
    if frame_type is FrameType.PONG:
        return Pong(_int(meta, "token", what, 0, 0xFFFFFFFF))
    return Started(_bytes(meta, "mac", what, MAC_SIZE))


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


def detached(msg: Message) -> Message:
    """``msg`` with its payload copied out of the receive buffer, so it outlives the next read."""
    payload = getattr(msg, "payload", None)
    if isinstance(payload, memoryview):
        return dataclasses.replace(msg, payload=bytes(payload))  # type: ignore[arg-type]
    return msg
