"""The migration stream's messages: one frozen dataclass per frame type, each with its own codec.

Each message owns its wire form: ``TYPE`` (its frame type), ``META`` (its msgpack keys, in
order), ``to_meta`` and ``from_meta`` (which checks every field, :mod:`migd.frame_fields`), and
its payload limit. ``MESSAGE_CLASSES`` maps each frame type to its class; the framing code
(:mod:`migd.wire`) dispatches through it and knows nothing of any one message
(docs/protocol.md lists the same fields; tests/test_protocol_doc.py keeps the two equal).
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self, Union, get_args

import msgpack

from migd.abi import PAGE_SIZE
from migd.errors import ProtocolError
from migd.frame_fields import (
    CAPABILITIES,
    DIGEST_SIZE,
    MAC_SIZE,
    MAX_BITMAP_BYTES,
    MAX_CONNECTIONS,
    MAX_GUEST_PAGES,
    MAX_RUN_PAGES,
    MAX_VCPU_STATE,
    NONCE_SIZE,
    PROTOCOL_VERSION,
    TRANSPORT_HEADER_SIZE,
    U64,
    FrameType,
    bytes_field,
    capabilities_field,
    field_value,
    int_field,
    lane_counts,
    _NO_MAC,
    run_fields,
    str_field,
)

@dataclass(frozen=True)
class MessageBase(abc.ABC):
    """What every message of the stream has: its frame type, its wire fields and its own codec.

    ``META`` names the msgpack keys of the frame's metadata in the order ``to_meta`` writes them
    (docs/protocol.md's table lists the same names: tests/test_protocol_doc.py holds them equal).
    ``from_meta`` checks every field of a decoded map and builds the message; it raises
    ``ProtocolError`` saying which field of which frame (``what``) is wrong.
    """

    TYPE: ClassVar[FrameType]
    META: ClassVar[tuple[str, ...]]
    #: Keys of ``META`` sent only when they differ from their default (added by a later feature:
    #: a frame that does not use it is byte for byte what it was before).
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    #: Largest payload the frame may carry; the decoder checks it from the length prefix.
    PAYLOAD_LIMIT: ClassVar[int] = 0
    #: A control frame carries no payload, refused before its fields are read; the data frames
    #: (pages, bitmap, vCPU state) check their payload themselves, together with their fields.
    CONTROL: ClassVar[bool] = True

    @abc.abstractmethod
    def to_meta(self) -> dict[str, Any]:
        """The frame's metadata map, keys in ``META`` order (the order is part of the bytes sent)."""

    @classmethod
    @abc.abstractmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        """The message of a decoded metadata map and payload; every field is checked."""


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
        name = str_field(meta, "name", what, 64)
        if not name:
            raise ProtocolError(f"{what}: empty guest name")
        return cls(
            name=name,
            npages=int_field(meta, "npages", what, 1, MAX_GUEST_PAGES),
            policy=int_field(meta, "policy", what, 0, 0xFFFFFFFF),
            efi=field_value(meta, "efi", bool, what),
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
    #: Connections the pages are striped over (1: this one only; more only if "lanes" is agreed).
    connections: int = 1
    TYPE = FrameType.HELLO
    META = ("version", "caps", "id", "guest", "transport", "resolve_port", "conns")
    OPTIONAL = frozenset({"conns"})

    def to_meta(self) -> dict[str, Any]:
        meta = {
            "version": self.version,
            "caps": list(self.capabilities),
            "id": self.migration_id,
            "guest": self.guest.to_meta(),
            "transport": self.transport_mode,
            "resolve_port": self.resolve_port,
        }
        if self.connections != 1:  # absent for one connection: the frame is what it was before lanes
            meta["conns"] = self.connections
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(
            migration_id=str_field(meta, "id", what, 64),
            guest=GuestSpec.from_meta(meta.get("guest")),
            transport_mode=str_field(meta, "transport", what, 32),
            version=int_field(meta, "version", what, 0, 0xFFFF),
            capabilities=capabilities_field(meta, what),
            # Optional: a source that gives none cannot be asked (RESOLVE), so 0.
            resolve_port=int_field(meta, "resolve_port", what, 0, 65535) if "resolve_port" in meta else 0,
            connections=int_field(meta, "conns", what, 2, MAX_CONNECTIONS) if "conns" in meta else 1,
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
            pdh_cert=bytes_field(meta, "pdh", what, max_size=16384),
            version=int_field(meta, "version", what, 0, 0xFFFF),
            capabilities=capabilities_field(meta, what),
            nonce=bytes_field(meta, "nonce", what, NONCE_SIZE),
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
            pdh_cert=bytes_field(meta, "pdh", what, max_size=16384),
            session_blob=bytes_field(meta, "blob", what, 128),
            policy=int_field(meta, "policy", what, 0, 0xFFFFFFFF),
            mac=bytes_field(meta, "mac", what, MAC_SIZE),
        )


@dataclass(frozen=True)
class _MacOnly(MessageBase):
    """A hand-off step whose one field is its MAC (SESSION_ACK, COMMIT, STARTED)."""

    mac: bytes = _NO_MAC
    META = ("mac",)

    def to_meta(self) -> dict[str, Any]:
        return {"mac": self.mac}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(bytes_field(meta, "mac", what, MAC_SIZE))


@dataclass(frozen=True)
class SessionAck(_MacOnly):
    """Key confirmation: the destination unwrapped the session (MAC over the transcript)."""

    TYPE = FrameType.SESSION_ACK


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
        gpa, npages = run_fields(meta, payload, what, with_payload=True)
        return cls(gpa, npages, bytes_field(meta, "hdr", what, TRANSPORT_HEADER_SIZE), payload)


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
        gpa, npages = run_fields(meta, payload, what, with_payload=True)
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
        gpa, npages = run_fields(meta, payload, what, with_payload=False)
        return cls(gpa, npages)


@dataclass(frozen=True)
class RoundEnd(MessageBase):
    round: int
    dirty_pages: int
    #: Page frames sent on each further connection before this frame (lanes 1..): a control
    #: frame after it is handled once they are placed. Empty with one connection.
    lanes: tuple[int, ...] = ()
    TYPE = FrameType.ROUND_END
    META = ("round", "dirty", "lanes")
    OPTIONAL = frozenset({"lanes"})

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"round": self.round, "dirty": self.dirty_pages}
        if self.lanes:
            meta["lanes"] = list(self.lanes)
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(int_field(meta, "round", what, 0, 1 << 32), int_field(meta, "dirty", what, 0, MAX_GUEST_PAGES),
                   lane_counts(meta, "lanes", what))


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
            header = bytes_field(meta, "hdr", what, TRANSPORT_HEADER_SIZE)
            if len(payload) != PAGE_SIZE:
                raise ProtocolError(f"{what}: a VMSA packet carries {PAGE_SIZE} bytes, got {len(payload)}")
        return cls(int_field(meta, "vcpu", what, 0, 255), header, payload)


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
    #: Page frames sent on each further connection (lanes 1..); empty with one connection.
    lanes: tuple[int, ...] = ()
    TYPE = FrameType.PREPARE
    META = ("pages", "frames", "kinds", "seq", "stream", "bitmap", "vcpu", "lanes", "mac")
    OPTIONAL = frozenset({"lanes"})

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "pages": self.pages_sent, "frames": self.frames, "kinds": [self.private, self.shared, self.zero],
            "seq": self.transport_seq, "stream": self.stream_digest, "bitmap": self.bitmap_digest,
            "vcpu": self.vcpu_digest}
        if self.lanes:
            meta["lanes"] = list(self.lanes)
        meta["mac"] = self.mac
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        kinds = field_value(meta, "kinds", list, what)
        if len(kinds) != 3 or not all(isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= U64
                                      for k in kinds):
            raise ProtocolError(f"{what}: field 'kinds' must be three page counts")
        return cls(
            pages_sent=int_field(meta, "pages", what), frames=int_field(meta, "frames", what),
            private=kinds[0], shared=kinds[1], zero=kinds[2], transport_seq=int_field(meta, "seq", what),
            stream_digest=bytes_field(meta, "stream", what, DIGEST_SIZE),
            bitmap_digest=bytes_field(meta, "bitmap", what, DIGEST_SIZE),
            vcpu_digest=bytes_field(meta, "vcpu", what, DIGEST_SIZE), mac=bytes_field(meta, "mac", what, MAC_SIZE),
            lanes=lane_counts(meta, "lanes", what),
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
        return cls(int_field(meta, "pages", what), bytes_field(meta, "mac", what, MAC_SIZE))


@dataclass(frozen=True)
class Commit(_MacOnly):
    """The commit point, authenticated: the source has journaled the commit; start the guest."""

    TYPE = FrameType.COMMIT


@dataclass(frozen=True)
class Started(_MacOnly):
    """The guest runs on the destination, authenticated."""

    TYPE = FrameType.STARTED


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
        return cls(str_field(meta, "reason", what, 1024), None if mac is None else bytes_field(meta, "mac", what, MAC_SIZE))


@dataclass(frozen=True)
class Ping(MessageBase):
    """The source asks whether the destination has placed everything sent before it.

    Bytes that left the source's socket may still sit in kernel buffers or a stalled
    network; only the destination can say they arrived (see ``source._link_caught_up``).
    """

    token: int
    #: Page frames sent on each further connection before this PING (lanes 1..): the PONG waits
    #: for them too. Empty with one connection.
    lanes: tuple[int, ...] = ()
    TYPE = FrameType.PING
    META = ("token", "lanes")
    OPTIONAL = frozenset({"lanes"})

    def to_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"token": self.token}
        if self.lanes:
            meta["lanes"] = list(self.lanes)
        return meta

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(int_field(meta, "token", what, 0, 0xFFFFFFFF), lane_counts(meta, "lanes", what))


@dataclass(frozen=True)
class Pong(MessageBase):
    token: int
    TYPE = FrameType.PONG
    META = ("token",)

    def to_meta(self) -> dict[str, Any]:
        return {"token": self.token}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(int_field(meta, "token", what, 0, 0xFFFFFFFF))


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
        return cls(str_field(meta, "id", what, 64), bytes_field(meta, "nonce", what, NONCE_SIZE),
                   bytes_field(meta, "mac", what, MAC_SIZE))


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
        outcome = str_field(meta, "outcome", what, 16)
        if outcome not in RESOLUTIONS:
            raise ProtocolError(f"{what}: outcome must be one of {RESOLUTIONS}, got {outcome!r}")
        return cls(str_field(meta, "id", what, 64), outcome, bytes_field(meta, "mac", what, MAC_SIZE))


@dataclass(frozen=True)
class Join(MessageBase):
    """A further connection of a migration: the first frame on it, from the source.

    ``mac`` under the migration's hand-off key, over its transcript as of SESSION_ACK and this
    message: only the source that holds the key can open lane ``lane`` of this migration, once.
    """

    migration_id: str
    lane: int
    mac: bytes = _NO_MAC
    TYPE = FrameType.JOIN
    META = ("id", "lane", "mac")

    def to_meta(self) -> dict[str, Any]:
        return {"id": self.migration_id, "lane": self.lane, "mac": self.mac}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(str_field(meta, "id", what, 64), int_field(meta, "lane", what, 1, MAX_CONNECTIONS - 1),
                   bytes_field(meta, "mac", what, MAC_SIZE))


@dataclass(frozen=True)
class Joined(MessageBase):
    """The destination took the lane (``mac``: it holds the key too); pages may flow on it."""

    lane: int
    mac: bytes = _NO_MAC
    TYPE = FrameType.JOINED
    META = ("lane", "mac")

    def to_meta(self) -> dict[str, Any]:
        return {"lane": self.lane, "mac": self.mac}

    @classmethod
    def from_meta(cls, meta: dict[str, Any], payload: memoryview, what: str) -> Self:
        return cls(int_field(meta, "lane", what, 1, MAX_CONNECTIONS - 1), bytes_field(meta, "mac", what, MAC_SIZE))


Message = Union[
    Hello, Welcome, Session, SessionAck, PrivatePages, SharedPages, ZeroPages, RoundEnd,
    SharedBitmap, VcpuState, Prepare, Prepared, Commit, Started, Abort, Resolve, Resolved, Ping, Pong,
    Join, Joined,
]

#: The frame-type registry (aioquic's ``__frame_handlers`` is the model): which class encodes and
#: decodes each frame type. Built from ``Message`` so that a new message is declared once, there.
MESSAGE_CLASSES: dict[FrameType, type[Message]] = {cls.TYPE: cls for cls in get_args(Message)}
# At import, not in a test only: a frame type without a class would escape the decoder as a KeyError.
if sorted(MESSAGE_CLASSES) != sorted(FrameType) or len(MESSAGE_CLASSES) != len(get_args(Message)):
    raise RuntimeError("migd.wire: every FrameType needs exactly one message class in Message")

#: Largest payload each frame type may carry: checked from the length prefix, before buffering.
_MAX_PAYLOAD: dict[FrameType, int] = {t: cls.PAYLOAD_LIMIT for t, cls in MESSAGE_CLASSES.items()}


def authenticated_bytes(msg: Message) -> bytes:
    """What a message's MAC covers of it: its type and every metadata field but ``mac``.

    msgpack of the sorted fields: both ends compute it from the decoded message, so the bytes
    do not depend on how the peer happened to encode its map.
    """
    meta = msg.to_meta()
    meta.pop("mac", None)
    return bytes([msg.TYPE]) + msgpack.packb(dict(sorted(meta.items())), use_bin_type=True)


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
