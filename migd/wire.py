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

Each message is a frozen dataclass that owns its wire form: ``TYPE`` (its frame type), ``META``
(its msgpack keys, in order), ``to_meta`` and ``from_meta`` (which checks every field), and
its payload limit. ``MESSAGE_CLASSES`` maps each frame type to its class; the framing code
dispatches through it and knows nothing of any one message (docs/protocol.md lists the same
fields; tests/test_protocol_doc.py keeps the two equal).
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, Union, get_args

import msgpack

from migd.abi import PAGE_SIZE
from migd.errors import ProtocolError

#: 2: PING/PONG before the switch-over; 3: the destination's nonce, key confirmation and the
#: authenticated hand-off (docs/protocol.md "Authentication").
PROTOCOL_VERSION = 3
#: Capabilities this implementation speaks (HELLO and WELCOME ``caps``); :func:`negotiate`
#: gives those both ends speak, and the session (migd/session.py ``required_capabilities``)
#: refuses a peer without what this migration needs: zero runs, its transport mode, and the
#: VMSA packet for an SEV-ES guest. A later optional feature is announced here, used if agreed.
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


def _run(meta: dict[str, Any], payload: memoryview, what: str, with_payload: bool) -> tuple[int, int]:
    """A page run's ``gpa`` and ``n``: page aligned, inside any guest, and the payload they imply."""
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


def negotiate(ours: Iterable[str], theirs: Iterable[str]) -> tuple[str, ...]:
    """The capabilities both ends speak: the intersection of ``ours`` and ``theirs``, sorted.

    Pure and symmetric (``negotiate(a, b) == negotiate(b, a)``), so the source (on WELCOME) and
    the destination (on HELLO) get the same tuple from the two ``caps`` lists. A capability only
    one side lists is off, never an error: that is how a newer peer talks to an older one.
    Duplicates count once. ``theirs`` is the peer's, already bounded by the decoder.
    """
    return tuple(sorted(set(ours) & set(theirs)))


# ---------------------------------------------------------------- messages


@dataclass(frozen=True)
class MessageBase:
    """What every message of the stream has: its frame type, its wire fields and its own codec.

    ``META`` names the msgpack keys of the frame's metadata in the order ``to_meta`` writes them
    (docs/protocol.md's table lists the same names: tests/test_protocol_doc.py holds them equal).
    ``from_meta`` checks every field of a decoded map and builds the message; it raises
    ``ProtocolError`` saying which field of which frame (``what``) is wrong.
    """

    TYPE: ClassVar[FrameType]
    META: ClassVar[tuple[str, ...]]
    #: Largest payload the frame may carry; the decoder checks it from the length prefix.
    PAYLOAD_LIMIT: ClassVar[int] = 0
    #: A control frame carries no payload, refused before its fields are read; the data frames
    #: (pages, bitmap, vCPU state) check their payload themselves, together with their fields.
    CONTROL: ClassVar[bool] = True

    def to_meta(self) -> dict[str, Any]:
        """The frame's metadata map, keys in ``META`` order (the order is part of the bytes sent)."""
        raise NotImplementedError

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        """The message of a decoded metadata map and payload; every field is checked."""
        raise NotImplementedError


@dataclass(frozen=True)
class GuestSpec:
    """What the destination needs to know to create the guest before any page arrives."""

    name: str
    npages: int
    policy: int
    efi: bool = False
    uefi_live_migration: bool | None = None
    META: ClassVar[tuple[str, ...]] = ("name", "npages", "policy", "efi", "uefi_lm")

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
class Hello(MessageBase):
    migration_id: str
    guest: GuestSpec
    transport_mode: str
    version: int = PROTOCOL_VERSION
    capabilities: tuple[str, ...] = CAPABILITIES
    #: The source's migration listener port, where a destination in doubt sends RESOLVE (0: none).
    resolve_port: int = 0
    TYPE = FrameType.HELLO
    META = ("version", "caps", "id", "guest", "transport", "resolve_port")

    def to_meta(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "caps": list(self.capabilities),
            "id": self.migration_id,
            "guest": self.guest.to_meta(),
            "transport": self.transport_mode,
            "resolve_port": self.resolve_port,
        }

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(
            migration_id=_str(meta, "id", what, 64),
            guest=GuestSpec.from_meta(meta.get("guest")),
            transport_mode=_str(meta, "transport", what, 32),
            version=_int(meta, "version", what, 0, 0xFFFF),
            capabilities=_capabilities(meta, what),
            # Optional: a source that gives none cannot be asked (RESOLVE), so 0.
            resolve_port=_int(meta, "resolve_port", what, 0, 65535) if "resolve_port" in meta else 0,
        )


@dataclass(frozen=True)
class Welcome(MessageBase):
    pdh_cert: bytes
    version: int = PROTOCOL_VERSION
    capabilities: tuple[str, ...] = CAPABILITIES
    #: The destination's fresh nonce: bound into the session, so nothing recorded elsewhere verifies.
    nonce: bytes = bytes(NONCE_SIZE)
    TYPE = FrameType.WELCOME
    META = ("version", "caps", "pdh", "nonce")

    def to_meta(self) -> dict[str, Any]:
        return {"version": self.version, "caps": list(self.capabilities), "pdh": self.pdh_cert, "nonce": self.nonce}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(
            pdh_cert=_bytes(meta, "pdh", what, max_size=16384),
            version=_int(meta, "version", what, 0, 0xFFFF),
            capabilities=_capabilities(meta, what),
            nonce=_bytes(meta, "nonce", what, NONCE_SIZE),
        )


@dataclass(frozen=True)
class Session(MessageBase):
    pdh_cert: bytes
    session_blob: bytes
    policy: int
    #: The source's proof that it holds the session keys, over the transcript (HELLO, WELCOME, this).
    mac: bytes = _NO_MAC
    TYPE = FrameType.SESSION
    META = ("pdh", "blob", "policy", "mac")

    def to_meta(self) -> dict[str, Any]:
        return {"pdh": self.pdh_cert, "blob": self.session_blob, "policy": self.policy, "mac": self.mac}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(
            pdh_cert=_bytes(meta, "pdh", what, max_size=16384),
            session_blob=_bytes(meta, "blob", what, 128),
            policy=_int(meta, "policy", what, 0, 0xFFFFFFFF),
            mac=_bytes(meta, "mac", what, MAC_SIZE),
        )


@dataclass(frozen=True)
class SessionAck(MessageBase):
    """Key confirmation: the destination unwrapped the session (MAC over the transcript)."""

    mac: bytes = _NO_MAC
    TYPE = FrameType.SESSION_ACK
    META = ("mac",)

    def to_meta(self) -> dict[str, Any]:
        return {"mac": self.mac}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(_bytes(meta, "mac", what, MAC_SIZE))


@dataclass(frozen=True)
class PrivatePages(MessageBase):
    gpa: int
    npages: int
    header: bytes  # the 52-byte SEV transport packet header
    payload: memoryview | bytes = field(repr=False)
    TYPE = FrameType.PRIVATE_PAGES
    META = ("gpa", "n", "hdr")
    PAYLOAD_LIMIT = MAX_RUN_PAGES * PAGE_SIZE
    CONTROL = False

    def to_meta(self) -> dict[str, Any]:
        return {"gpa": self.gpa, "n": self.npages, "hdr": self.header}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        gpa, npages = _run(meta, payload, what, with_payload=True)
        return cls(gpa, npages, _bytes(meta, "hdr", what, TRANSPORT_HEADER_SIZE), payload)


@dataclass(frozen=True)
class SharedPages(MessageBase):
    gpa: int
    npages: int
    payload: memoryview | bytes = field(repr=False)
    TYPE = FrameType.SHARED_PAGES
    META = ("gpa", "n")
    PAYLOAD_LIMIT = MAX_RUN_PAGES * PAGE_SIZE
    CONTROL = False

    def to_meta(self) -> dict[str, Any]:
        return {"gpa": self.gpa, "n": self.npages}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        gpa, npages = _run(meta, payload, what, with_payload=True)
        return cls(gpa, npages, payload)


@dataclass(frozen=True)
class ZeroPages(MessageBase):
    gpa: int
    npages: int
    TYPE = FrameType.ZERO_PAGES
    META = ("gpa", "n")
    CONTROL = False  # a page run: its (absent) payload is checked with its run, as the others'

    def to_meta(self) -> dict[str, Any]:
        return {"gpa": self.gpa, "n": self.npages}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        gpa, npages = _run(meta, payload, what, with_payload=False)
        return cls(gpa, npages)


@dataclass(frozen=True)
class RoundEnd(MessageBase):
    round: int
    dirty_pages: int
    TYPE = FrameType.ROUND_END
    META = ("round", "dirty")

    def to_meta(self) -> dict[str, Any]:
        return {"round": self.round, "dirty": self.dirty_pages}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(_int(meta, "round", what, 0, 1 << 32), _int(meta, "dirty", what, 0, MAX_GUEST_PAGES))


@dataclass(frozen=True)
class SharedBitmap(MessageBase):
    payload: memoryview | bytes = field(repr=False)
    TYPE = FrameType.SHARED_BITMAP
    META = ()
    PAYLOAD_LIMIT = MAX_BITMAP_BYTES
    CONTROL = False

    def to_meta(self) -> dict[str, Any]:
        return {}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        if not len(payload):
            raise ProtocolError(f"{what}: empty bitmap")
        return cls(payload)


@dataclass(frozen=True)
class VcpuState(MessageBase):
    """vCPU state: ``header`` set = a VMSA transport packet (SEV-ES), else plaintext state."""

    vcpu_id: int
    header: bytes | None
    payload: memoryview | bytes = field(repr=False)
    TYPE = FrameType.VCPU_STATE
    META = ("vcpu", "hdr")
    PAYLOAD_LIMIT = MAX_VCPU_STATE
    CONTROL = False

    def to_meta(self) -> dict[str, Any]:
        return {"vcpu": self.vcpu_id, "hdr": self.header}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        header = meta.get("hdr")
        if header is not None:
            header = _bytes(meta, "hdr", what, TRANSPORT_HEADER_SIZE)
            if len(payload) != PAGE_SIZE:
                raise ProtocolError(f"{what}: a VMSA packet carries {PAGE_SIZE} bytes, got {len(payload)}")
        return cls(_int(meta, "vcpu", what, 0, 255), header, payload)


@dataclass(frozen=True)
class Prepare(MessageBase):
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
    TYPE = FrameType.PREPARE
    META = ("pages", "frames", "kinds", "seq", "stream", "bitmap", "vcpu", "mac")

    def to_meta(self) -> dict[str, Any]:
        return {"pages": self.pages_sent, "frames": self.frames, "kinds": [self.private, self.shared, self.zero],
                "seq": self.transport_seq, "stream": self.stream_digest, "bitmap": self.bitmap_digest,
                "vcpu": self.vcpu_digest, "mac": self.mac}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        kinds = _field(meta, "kinds", list, what)
        if len(kinds) != 3 or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= U64
                                      for k in kinds):
            raise ProtocolError(f"{what}: field 'kinds' must be three page counts")
        return cls(
            pages_sent=_int(meta, "pages", what), frames=_int(meta, "frames", what),
            private=kinds[0], shared=kinds[1], zero=kinds[2], transport_seq=_int(meta, "seq", what),
            stream_digest=_bytes(meta, "stream", what, DIGEST_SIZE),
            bitmap_digest=_bytes(meta, "bitmap", what, DIGEST_SIZE),
            vcpu_digest=_bytes(meta, "vcpu", what, DIGEST_SIZE), mac=_bytes(meta, "mac", what, MAC_SIZE),
        )


@dataclass(frozen=True)
class Prepared(MessageBase):
    pages_received: int
    mac: bytes = _NO_MAC
    TYPE = FrameType.PREPARED
    META = ("pages", "mac")

    def to_meta(self) -> dict[str, Any]:
        return {"pages": self.pages_received, "mac": self.mac}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(_int(meta, "pages", what), _bytes(meta, "mac", what, MAC_SIZE))


@dataclass(frozen=True)
class Commit(MessageBase):
    mac: bytes = _NO_MAC
    TYPE = FrameType.COMMIT
    META = ("mac",)

    def to_meta(self) -> dict[str, Any]:
        return {"mac": self.mac}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(_bytes(meta, "mac", what, MAC_SIZE))


@dataclass(frozen=True)
class Started(MessageBase):
    mac: bytes = _NO_MAC
    TYPE = FrameType.STARTED
    META = ("mac",)

    def to_meta(self) -> dict[str, Any]:
        return {"mac": self.mac}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(_bytes(meta, "mac", what, MAC_SIZE))


@dataclass(frozen=True)
class Abort(MessageBase):
    """The end of a migration; ``mac`` (once the session has keys) proves which peer said it."""

    reason: str
    mac: bytes | None = None
    TYPE = FrameType.ABORT
    META = ("reason", "mac")

    def to_meta(self) -> dict[str, Any]:
        # Cut to what the receiver accepts: a long local error must not make the ABORT itself refused.
        return {"reason": self.reason[:1024], "mac": self.mac}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        mac = meta.get("mac")
        return cls(_str(meta, "reason", what, 1024), None if mac is None else _bytes(meta, "mac", what, MAC_SIZE))


@dataclass(frozen=True)
class Ping(MessageBase):
    """The source asks whether the destination has placed everything sent before it.

    Bytes that left the source's socket may still sit in kernel buffers or a stalled
    network; only the destination can say they arrived (see ``source._link_caught_up``).
    """

    token: int
    TYPE = FrameType.PING
    META = ("token",)

    def to_meta(self) -> dict[str, Any]:
        return {"token": self.token}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(_int(meta, "token", what, 0, 0xFFFFFFFF))


@dataclass(frozen=True)
class Pong(MessageBase):
    token: int
    TYPE = FrameType.PONG
    META = ("token",)

    def to_meta(self) -> dict[str, Any]:
        return {"token": self.token}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(_int(meta, "token", what, 0, 0xFFFFFFFF))


RESOLUTIONS = ("committed", "aborted", "pending", "unknown")


@dataclass(frozen=True)
class Resolve(MessageBase):
    """A destination that lost the stream between PREPARED and COMMIT asks the source.

    ``mac`` under that migration's hand-off key proves the asker is its destination; the fresh
    ``nonce`` makes the answer's MAC unique to this question.
    """

    migration_id: str
    nonce: bytes = bytes(NONCE_SIZE)
    mac: bytes = _NO_MAC
    TYPE = FrameType.RESOLVE
    META = ("id", "nonce", "mac")

    def to_meta(self) -> dict[str, Any]:
        return {"id": self.migration_id, "nonce": self.nonce, "mac": self.mac}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(_str(meta, "id", what, 64), _bytes(meta, "nonce", what, NONCE_SIZE),
                   _bytes(meta, "mac", what, MAC_SIZE))


@dataclass(frozen=True)
class Resolved(MessageBase):
    migration_id: str
    outcome: str  # one of RESOLUTIONS
    mac: bytes = _NO_MAC
    TYPE = FrameType.RESOLVED
    META = ("id", "outcome", "mac")

    def to_meta(self) -> dict[str, Any]:
        return {"id": self.migration_id, "outcome": self.outcome, "mac": self.mac}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        outcome = _str(meta, "outcome", what, 16)
        if outcome not in RESOLUTIONS:
            raise ProtocolError(f"{what}: outcome must be one of {RESOLUTIONS}, got {outcome!r}")
        return cls(_str(meta, "id", what, 64), outcome, _bytes(meta, "mac", what, MAC_SIZE))


Message = Union[
    Hello, Welcome, Session, SessionAck, PrivatePages, SharedPages, ZeroPages, RoundEnd,
    SharedBitmap, VcpuState, Prepare, Prepared, Commit, Started, Abort, Resolve, Resolved, Ping, Pong,
]

#: The frame-type registry (aioquic's ``__frame_handlers`` is the model): which class encodes and
#: decodes each frame type. Built from ``Message`` so that a new message is declared once, there.
MESSAGE_CLASSES: dict[FrameType, type[Message]] = {cls.TYPE: cls for cls in get_args(Message)}
# At import, not in a test only: a frame type without a class would escape the decoder as a KeyError.
if sorted(MESSAGE_CLASSES) != sorted(FrameType) or len(MESSAGE_CLASSES) != len(get_args(Message)):
    raise RuntimeError("migd.wire: every FrameType needs exactly one message class in Message")

#: Largest payload each frame type may carry: checked from the length prefix, before buffering.
_MAX_PAYLOAD: dict[FrameType, int] = {t: cls.PAYLOAD_LIMIT for t, cls in MESSAGE_CLASSES.items()}


# ---------------------------------------------------------------- encode


def authenticated_bytes(msg: Message) -> bytes:
    """What a message's MAC covers of it: its type and every metadata field but ``mac``.

    msgpack of the sorted fields: both ends compute it from the decoded message, so the bytes
    do not depend on how the peer happened to encode its map.
    """
    meta = msg.to_meta()
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
        _no_payload(payload, what)
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


def pack_vmsa(state: bytes) -> bytes:
    """vCPU state in one 4 KiB VMSA page (what SEND_UPDATE_VMSA seals): u32 length LE, state, zeros."""
    if len(state) > PAGE_SIZE - 4:
        raise ValueError(f"vCPU state of {len(state)} bytes does not fit a {PAGE_SIZE}-byte VMSA")
    return len(state).to_bytes(4, "little") + state + bytes(PAGE_SIZE - 4 - len(state))


def unpack_vmsa(page: bytes) -> bytes:
    """Inverse of :func:`pack_vmsa`, checked (the page came from the peer, through RECEIVE_UPDATE_VMSA)."""
    length = int.from_bytes(page[:4], "little")
    if len(page) != PAGE_SIZE or length > PAGE_SIZE - 4:
        raise ProtocolError(f"malformed VMSA page ({len(page)} bytes, length field {length})")
    return bytes(page[4 : 4 + length])


def detached(msg: Message) -> Message:
    """``msg`` with its payload copied out of the receive buffer, so it outlives the next read."""
    payload = getattr(msg, "payload", None)
    if isinstance(payload, memoryview):
        return dataclasses.replace(msg, payload=bytes(payload))  # type: ignore[arg-type]
    return msg
