"""A fault-injecting TCP proxy for migration-stream tests (asyncio, 127.0.0.1 only).

Placed between a migration source and a destination listener, it forwards both directions
and injects the faults it was given, then records what it actually did, so every fault test
can first assert that the fault happened (the negative control) and only then what the
engines made of it::

    async with FaultProxy("127.0.0.1", dest_port, [DropFrame(FrameSelector.of(FrameType.PRIVATE_PAGES, 3))]) as proxy:
        progress = await OutgoingMigration(guest, "127.0.0.1", proxy.port).run()
    (drop,) = proxy.fired("drop")

Two kinds of faults:

* **byte faults** (:class:`Cut`, :class:`Stall`, :class:`FlipBit`) act at a byte offset of one
  direction of the connection: the offset counts the bytes the *receiver* gets (the same as
  what the sender sent, unless frame faults of that direction changed the stream);
* **frame faults** (:class:`CutBeforeFrame`, :class:`StallBeforeFrame`, :class:`DropFrame`, :class:`DuplicateFrame`,
  :class:`ReplayFrame`, :class:`RollbackFrame`, :class:`SwapFrames`, :class:`FlipFrameBit`) parse the direction's
  stream into frames and act on whole frames. With ``Framing.MIGD`` the frames are migd's
  (``u32 length | u8 type | u16 meta_len | meta | payload | u32 crc``, :mod:`migd.wire`); with
  ``Framing.TLS`` they are TLS records (``u8 type | u16 version | u16 length | fragment``), so
  the same faults can be aimed at a mutual-TLS stream whose frames the proxy cannot read.
  A :class:`FrameSelector` picks frames by type; its ``index`` counts the frames *the sender
  sent* that match it (0-based), whatever earlier faults did to them.

Two models of who breaks the stream. By default the proxy is an *accident* (a bad link, a bad
NIC): whatever it changes keeps the frames' CRC32 trailers as the sender wrote them, so the
receiver's CRC check sees the damage. With ``reseal=True`` (migd framing) it is an *attacker* on
the path: it renumbers and recomputes the unkeyed CRC of every frame it forwards, so only what
is keyed — the SEV transport's MAC, mutual TLS — can still notice a frame fault.

Faults apply to every connection the proxy accepts, each with fresh offsets and counters
(``FaultRecord.connection`` tells them apart); :class:`OnConnection` aims one at a single
connection (e.g. a further connection of a multi-connection migration, not its control one).
A frame whose length field announces more than ``max_frame`` bytes (a corrupted header) makes
the proxy stop parsing that direction and forward the rest raw, recorded as ``framing-lost``:
it never buffers without bound.

For attack tests (tests/integration/test_attacks.py): with ``record=True`` the proxy keeps, per
connection, the raw bytes of each direction and the interleaved sequence of frames as it saw
them (:class:`Recording`); :func:`replay` sends a recording's upstream frames again to a
listener, each reply of the recording awaited from the listener before what followed it (a
host operator who replays a migration it recorded), and :func:`rewrite_meta` changes a frame
no key covers (a replayed HELLO's migration id). With ``server_ssl``/``client_ssl`` the proxy
terminates TLS on both sides, so it records and faults the plaintext of a mutual-TLS stream.
:class:`HoldBeforeFrame` holds a frame until :meth:`FaultProxy.release` (a hand-off kept open
for as long as a test needs), and :class:`DropLastFrameBefore` drops the last frame of some
types before a frame of another type (truncating the stop-and-copy round).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import ipaddress
import logging
import ssl
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Union

import msgpack

from migd import wire

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
DEFAULT_MAX_FRAME = 64 << 20  # migd frames are at most ~8.5 MiB (a 256 GiB guest's bitmap)
DEFAULT_ROLLBACK_STORE = 64 << 20  # bytes of first-seen frames RollbackFrame may keep

_MIGD_PREFIX = struct.Struct(">IBH")  # length (bytes after this field), type, meta_len
_MIGD_CRC = struct.Struct(">I")  # trailer: CRC32 of (frame number as u64 LE || type .. payload)
_MIGD_SEQ = struct.Struct("<Q")
assert _MIGD_PREFIX.size == wire.PREFIX_SIZE and _MIGD_CRC.size == wire.CRC_SIZE
_TLS_HEADER = struct.Struct(">BHH")  # content type, legacy version, fragment length
TLS_APPLICATION_DATA = 23


class Direction(str, enum.Enum):
    """One direction of the proxied connection."""

    UPSTREAM = "upstream"  # client → server: migration source → destination
    DOWNSTREAM = "downstream"  # server → client: destination → source


class Framing(str, enum.Enum):
    """How frame faults cut a direction's stream into frames."""

    MIGD = "migd"
    TLS = "tls"


class Region(str, enum.Enum):
    """Where in a frame :class:`FlipFrameBit` flips its bit."""

    PREFIX = "prefix"  # migd: the 7-byte length/type/meta_len prefix; TLS: the 5-byte record header
    META = "meta"  # migd: the msgpack metadata (TLS records have none)
    PAYLOAD = "payload"  # migd: the payload after the metadata; TLS: the encrypted fragment
    TRAILER = "trailer"  # migd: the CRC32 (TLS records have none)


@dataclass(frozen=True)
class FrameInfo:
    """One frame as the proxy parsed it."""

    offset: int  # stream offset of its first byte, in the sender's stream
    ordinal: int  # position among all frames of this direction (0-based)
    type: int  # migd FrameType value, or TLS content type
    length: int  # total bytes, prefix included
    prefix_len: int
    meta_len: int
    trailer_len: int = 0
    gpa: int | None = None  # migd page frames: from the metadata
    npages: int | None = None

    @property
    def payload_len(self) -> int:
        return self.length - self.prefix_len - self.meta_len - self.trailer_len


@dataclass(frozen=True)
class FrameSelector:
    """The ``index``-th frame (0-based) among those whose type is in ``types`` (None: any type),
    whose payload is at least ``min_payload`` bytes (TLS: skip the small handshake records) and,
    with ``after_type``, that come after the first frame of that type (e.g. after the first
    ROUND_END: a page re-sent in a later round)."""

    types: frozenset[int] | None = None
    index: int = 0
    min_payload: int = 0
    after_type: int | None = None

    def __post_init__(self) -> None:
        if self.index < 0 or self.min_payload < 0:
            raise ValueError(f"index and min_payload must be >= 0, got {self.index}, {self.min_payload}")

    @classmethod
    def of(cls, *types: int, index: int = 0, min_payload: int = 0, after_type: int | None = None) -> FrameSelector:
        """Selector for frames of any of ``types`` (no type: every frame)."""
        return cls(frozenset(int(t) for t in types) if types else None, index, min_payload,
                   None if after_type is None else int(after_type))

    def matches(self, frame: FrameInfo) -> bool:
        return (self.types is None or frame.type in self.types) and frame.payload_len >= self.min_payload


# ---------------------------------------------------------------------- byte faults


@dataclass(frozen=True)
class Cut:
    """Forward ``after`` bytes of ``direction``, then reset both connections (a broken network)."""

    after: int
    direction: Direction = Direction.UPSTREAM


@dataclass(frozen=True)
class Stall:
    """Forward ``at`` bytes of ``direction``, then stop reading and forwarding it for ``seconds``
    (TCP back-pressure reaches the sender); the other direction keeps flowing."""

    at: int
    seconds: float
    direction: Direction = Direction.UPSTREAM


@dataclass(frozen=True)
class FlipBit:
    """XOR bit ``bit`` (0 = least significant) of the byte at stream offset ``offset``."""

    offset: int
    bit: int = 0
    direction: Direction = Direction.UPSTREAM


# ---------------------------------------------------------------------- frame faults


@dataclass(frozen=True)
class CutBeforeFrame:
    """Reset both connections right before the selected frame would be forwarded: a cut at a
    protocol point (before PREPARED, before COMMIT, ...) rather than at a byte count."""

    select: FrameSelector
    direction: Direction = Direction.UPSTREAM


@dataclass(frozen=True)
class StallBeforeFrame:
    """Hold the selected frame, and everything after it in that direction, for ``seconds``: a
    stall at a protocol point (guest paused, before COMMIT, ...) rather than at a byte count."""

    select: FrameSelector
    seconds: float
    direction: Direction = Direction.UPSTREAM


@dataclass(frozen=True)
class HoldBeforeFrame:
    """Hold the selected frame, and everything after it in that direction, until
    :meth:`FaultProxy.release` is called (at most ``seconds``): a stall at a protocol point
    whose end the test decides (e.g. COMMIT held while something else happens)."""

    select: FrameSelector
    seconds: float = 60.0
    direction: Direction = Direction.UPSTREAM


@dataclass(frozen=True)
class DropLastFrameBefore:
    """Do not forward the last frame of ``types`` sent before the first frame of
    ``before_type`` (e.g. the last PRIVATE_PAGES run before SHARED_BITMAP: the stop-and-copy
    round truncated by one run).

    Which frame is the last is only known when the next one comes, so the latest frame of
    ``types`` and every frame after it are held back (in order, nothing reordered) until
    another frame of ``types`` comes (they are forwarded) or the ``before_type`` frame (the
    held frame of ``types`` is dropped, the rest forwarded). A frame of ``flush_types`` also
    forwards what is held: its sender waits for an answer (migd's PING), and holding it would
    stall the stream; the frames before it are then not the last ones."""

    types: frozenset[int]
    before_type: int
    flush_types: frozenset[int] = frozenset({int(wire.FrameType.PING)})
    direction: Direction = Direction.UPSTREAM


@dataclass(frozen=True)
class _Pause:
    """Marker in a frame stage's output: the byte stage waits this long before what follows
    (or, with ``until``, until that event is set, at most this long)."""

    seconds: float
    until: asyncio.Event | None = None


@dataclass(frozen=True)
class DropFrame:
    """Do not forward the selected frame."""

    select: FrameSelector
    direction: Direction = Direction.UPSTREAM


@dataclass(frozen=True)
class DuplicateFrame:
    """Forward the selected frame twice in a row."""

    select: FrameSelector
    direction: Direction = Direction.UPSTREAM


@dataclass(frozen=True)
class ReplayFrame:
    """Forward the selected frame, and a copy of it again right after ``after`` more frames
    matching the selector have passed."""

    select: FrameSelector
    after: int = 1
    direction: Direction = Direction.UPSTREAM


@dataclass(frozen=True)
class RollbackFrame:
    """Replay attack on page state (migd framing only): keep the first copy of every page
    frame of ``types``; when a later frame of those types overlaps its guest-physical range
    (the pages were re-sent with newer content), forward the kept older copy right after it,
    so those pages roll back. ``occurrence`` picks which overlap (0 = the first) triggers it.
    With ``before_type`` the older copy is held back and forwarded right before the first
    later frame of that type instead (e.g. SHARED_BITMAP: after the last page was sent, so no
    later re-send can repair the rollback)."""

    types: frozenset[int]
    occurrence: int = 0
    before_type: int | None = None
    direction: Direction = Direction.UPSTREAM


@dataclass(frozen=True)
class SwapFrames:
    """Exchange two consecutive matching frames: the first matching frame at or after the
    selector's index whose immediate successor also matches is forwarded after that successor."""

    select: FrameSelector
    direction: Direction = Direction.UPSTREAM


@dataclass(frozen=True)
class FlipFrameBit:
    """Flip bit ``bit`` of byte ``offset`` (negative: from the end) of ``region`` of the selected
    frame. With ``field`` (migd metadata only) flip bit ``bit`` of that msgpack unsigned-integer
    field's value instead (e.g. ``field="gpa", bit=12`` moves a run by one page); frames whose
    encoding cannot take that flip in place are skipped and do not count."""

    select: FrameSelector
    region: Region = Region.PAYLOAD
    offset: int = 0
    bit: int = 0
    field: str | None = None
    direction: Direction = Direction.UPSTREAM


ByteFault = Union[Cut, Stall, FlipBit]
FrameFault = Union[CutBeforeFrame, StallBeforeFrame, DropFrame, DuplicateFrame, ReplayFrame, RollbackFrame, SwapFrames,
                   FlipFrameBit, HoldBeforeFrame, DropLastFrameBefore]


@dataclass(frozen=True)
class OnConnection:
    """``fault`` on one connection only: the ``connection``-th the proxy accepts (0-based, accept
    order; ``FaultRecord.connection`` numbers them the same way). A migration over several
    connections opens its control connection first, so ``OnConnection(fault, 1)`` hits a further
    connection and leaves the control one alone. Without this wrapper a fault applies to every
    connection."""

    fault: ByteFault | FrameFault
    connection: int


Fault = Union[ByteFault, FrameFault, OnConnection]


@dataclass(frozen=True)
class FaultRecord:
    """What the proxy did, once: the evidence a test asserts on."""

    action: str  # cut | stall | hold | flip | drop | duplicate | replay | rollback | swap | framing-lost
    direction: Direction
    connection: int
    offset: int  # byte faults: stream offset; frame faults: offset of the (first) frame
    frame: FrameInfo | None = None
    partner: FrameInfo | None = None  # swap: the frame it changed places with; rollback: the newer copy
    old: int | None = None  # flip: the byte before
    new: int | None = None  # flip: the byte after
    bit: int | None = None
    seconds: float | None = None


# ---------------------------------------------------------------------- recording


@dataclass(frozen=True)
class RecordedFrame:
    """One frame of a recorded connection, as its sender sent it (before any fault)."""

    direction: Direction
    type: int
    data: bytes


@dataclass
class Recording:
    """What one proxied connection carried (``FaultProxy(record=True)``): the raw bytes of each
    direction as the senders sent them, and the frames of both directions interleaved in the
    order the proxy read them. That order is causal: a reply is read only after the frames it
    answers were read (and forwarded), so :func:`replay` can wait for each reply in its place."""

    connection: int
    frames: list[RecordedFrame] = field(default_factory=list)
    raw: dict[Direction, bytearray] = field(default_factory=lambda: {d: bytearray() for d in Direction})

    def sent(self, direction: Direction = Direction.UPSTREAM) -> bytes:
        """Every byte the sender of ``direction`` sent."""
        return bytes(self.raw[direction])

    def types(self, direction: Direction = Direction.UPSTREAM) -> list[int]:
        """The types of the frames of ``direction``, in order."""
        return [f.type for f in self.frames if f.direction is direction]

    def replacing(self, index: int, data: bytes) -> Recording:
        """A copy with ``frames[index]`` carrying ``data`` instead (e.g. from :func:`rewrite_meta`)."""
        frames = list(self.frames)
        frames[index] = dataclasses.replace(frames[index], data=data)
        return Recording(self.connection, frames, {d: bytearray(b) for d, b in self.raw.items()})


# ---------------------------------------------------------------------- framing


def _parse_header(framing: Framing, buf: bytearray) -> tuple[int, int, int, int, int] | None:
    """(total length, type, prefix length, meta length, trailer length) of the frame at the start of ``buf``."""
    if framing is Framing.MIGD:
        if len(buf) < _MIGD_PREFIX.size:
            return None
        length, ftype, meta_len = _MIGD_PREFIX.unpack_from(buf)
        trailer = min(_MIGD_CRC.size, max(length - 3, 0))  # a corrupt length may leave no room
        return 4 + length, ftype, _MIGD_PREFIX.size, min(meta_len, max(length - 3 - trailer, 0)), trailer
    if len(buf) < _TLS_HEADER.size:
        return None
    ctype, _, length = _TLS_HEADER.unpack_from(buf)
    return _TLS_HEADER.size + length, ctype, _TLS_HEADER.size, 0, 0


def reseal(frame: bytes, sequence: int) -> bytes:
    """``frame`` with the CRC32 trailer a sender would write for it as frame ``sequence``
    (the unkeyed checksum anyone on the path can recompute, :mod:`migd.wire`)."""
    body = memoryview(frame)[4 : len(frame) - _MIGD_CRC.size]
    crc = zlib.crc32(body, zlib.crc32(_MIGD_SEQ.pack(sequence)))
    return frame[: len(frame) - _MIGD_CRC.size] + _MIGD_CRC.pack(crc)


def rewrite_meta(frame: bytes, sequence: int, **fields: object) -> bytes:
    """The migd ``frame`` with its metadata ``fields`` set (the msgpack map re-encoded), its
    length fields and CRC32 trailer recomputed as frame number ``sequence``: what anyone on the
    path can do to a frame no key covers (e.g. give a replayed HELLO a fresh migration id)."""
    length, ftype, meta_len = _MIGD_PREFIX.unpack_from(frame)
    meta = msgpack.unpackb(frame[_MIGD_PREFIX.size : _MIGD_PREFIX.size + meta_len], raw=False)
    if not isinstance(meta, dict):
        raise ValueError(f"frame type {ftype}: metadata is not a map")
    meta.update(fields)
    packed = msgpack.packb(meta, use_bin_type=True)
    payload = frame[_MIGD_PREFIX.size + meta_len : 4 + length - _MIGD_CRC.size]
    body = _MIGD_PREFIX.pack(3 + len(packed) + len(payload) + _MIGD_CRC.size, ftype, len(packed)) + packed + payload
    return reseal(body + bytes(_MIGD_CRC.size), sequence)


def _page_range(framing: Framing, frame: bytes, prefix_len: int, meta_len: int) -> tuple[int | None, int | None]:
    """(gpa, npages) from a migd frame's metadata, when it has them."""
    if framing is not Framing.MIGD or not meta_len:
        return None, None
    try:
        meta = msgpack.unpackb(frame[prefix_len : prefix_len + meta_len], raw=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None, None
    if not isinstance(meta, dict):
        return None, None
    gpa, npages = meta.get("gpa"), meta.get("n")
    if isinstance(gpa, int) and isinstance(npages, int) and not isinstance(gpa, bool):
        return gpa, npages
    return None, None


def _uint_field_bit(meta: bytes, name: str, bit: int) -> int | None:
    """Offset in ``meta`` of the byte holding bit ``bit`` of msgpack uint field ``name``, or None."""
    key = msgpack.packb(name)
    pos = meta.find(key)
    if pos < 0 or pos + len(key) >= len(meta):
        return None
    value_at = pos + len(key)
    tag = meta[value_at]
    if tag <= 0x7F:  # positive fixint: the value is the tag byte itself (7 bits)
        return value_at if bit < 7 else None
    width = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}.get(tag)
    if width is None or bit >= 8 * width or value_at + 1 + width > len(meta):
        return None
    return value_at + 1 + (width - 1 - bit // 8)


# ---------------------------------------------------------------------- frame-fault state


class _Connection:
    """Per-connection context the stages report through."""

    def __init__(self, proxy: FaultProxy, number: int) -> None:
        self.proxy = proxy
        self.number = number
        self.writers: list[asyncio.StreamWriter] = []
        self.cut = False
        self.cut_pending = False  # a CutBeforeFrame fired: forward what came before, then reset
        self.recording: Recording | None = None  # FaultProxy(record=True)

    def record(self, record: FaultRecord) -> None:
        self.proxy.records.append(record)
        log.info("fault %s", record)

    def abort(self) -> None:
        self.cut = True
        for writer in self.writers:
            writer.transport.abort()


class _FrameFaultState:
    """One frame fault's progress on one direction of one connection."""

    def __init__(self, fault: FrameFault, framing: Framing, conn: _Connection, direction: Direction) -> None:
        self.fault = fault
        self.framing = framing
        self.conn = conn
        self.direction = direction
        self.count = 0  # matching frames seen so far
        self.done = False
        self.held: tuple[bytes, FrameInfo] | None = None  # swap
        self.saved: tuple[bytes, FrameInfo] | None = None  # replay; rollback with before_type
        self.partner: FrameInfo | None = None  # rollback with before_type: the newer copy
        self.store: list[tuple[int, int, bytes, FrameInfo]] = []  # rollback: first copies
        self.stored_bytes = 0
        self.overlaps = 0
        self.after_seen = 0  # replay: matching frames since the saved one
        self.held_run: list[tuple[list[bytes], bytes, FrameInfo]] = []  # drop-last: (output, frame, info)
        select = getattr(fault, "select", None)
        self.armed = select is None or select.after_type is None

    def _matches(self, info: FrameInfo) -> bool:
        select: FrameSelector = self.fault.select  # type: ignore[union-attr]
        if not self.armed:
            self.armed = info.type == select.after_type
            return False
        return select.matches(info)

    def _record(self, action: str, frame: FrameInfo, *, partner: FrameInfo | None = None, old: int | None = None,
                new: int | None = None, bit: int | None = None, seconds: float | None = None) -> None:
        self.conn.record(FaultRecord(action, self.direction, self.conn.number, frame.offset, frame, partner=partner,
                                     old=old, new=new, bit=bit, seconds=seconds))

    def on_frame(self, raw: bytes, info: FrameInfo, emit: list[bytes]) -> list[bytes]:
        """Transform the output ``emit`` of the frame ``raw`` (as sent: ``info``)."""
        fault = self.fault
        if isinstance(fault, DropLastFrameBefore):
            return self._drop_last(raw, info, emit)
        if isinstance(fault, RollbackFrame):
            return self._rollback(raw, info, emit)
        if isinstance(fault, SwapFrames):
            return self._swap(raw, info, emit)
        if isinstance(fault, ReplayFrame) and self.saved is not None and not self.done:
            if self._matches(info):
                self.count += 1
                self.after_seen += 1
                if self.after_seen == fault.after:
                    self.done = True
                    self._record("replay", self.saved[1], partner=info)
                    return emit + [self.saved[0]]
            return emit
        if self.done or not self._matches(info):
            return emit
        if isinstance(fault, FlipFrameBit):
            at = self._flip_position(raw, info)
            if at is None:
                return emit  # cannot flip this one in place: skip it, it does not count
        index, self.count = self.count, self.count + 1
        if index != fault.select.index:
            return emit
        if isinstance(fault, CutBeforeFrame):
            self.done = True
            self._record("cut", info)
            self.conn.cut_pending = True
            return []
        if isinstance(fault, StallBeforeFrame):
            self.done = True
            self._record("stall", info, seconds=fault.seconds)
            return [_Pause(fault.seconds), *emit]
        if isinstance(fault, HoldBeforeFrame):
            self.done = True
            self._record("hold", info, seconds=fault.seconds)
            return [_Pause(fault.seconds, self.conn.proxy.released), *emit]
        if isinstance(fault, DropFrame):
            self.done = True
            self._record("drop", info)
            return [part for part in emit if part is not raw]
        if isinstance(fault, DuplicateFrame):
            self.done = True
            self._record("duplicate", info)
            return emit + [raw]
        if isinstance(fault, ReplayFrame):
            self.saved = (raw, info)
            self.after_seen = 0
            if fault.after == 0:
                self.done = True
                self._record("replay", info, partner=info)
                return emit + [raw]
            return emit
        assert isinstance(fault, FlipFrameBit) and at is not None
        self.done = True
        flipped = bytearray(raw)
        old = flipped[at]
        flipped[at] ^= 1 << (fault.bit if fault.field is None else fault.bit % 8)
        self._record("flip", info, old=old, new=flipped[at], bit=fault.bit)
        self.conn.proxy.flip_offsets.append(info.offset + at)
        return [bytes(flipped) if part is raw else part for part in emit]

    def _flip_position(self, raw: bytes, info: FrameInfo) -> int | None:
        fault = self.fault
        assert isinstance(fault, FlipFrameBit)
        if fault.field is not None:
            if self.framing is not Framing.MIGD:
                return None
            meta = raw[info.prefix_len : info.prefix_len + info.meta_len]
            at = _uint_field_bit(meta, fault.field, fault.bit)
            return None if at is None else info.prefix_len + at
        start, size = {
            Region.PREFIX: (0, info.prefix_len),
            Region.META: (info.prefix_len, info.meta_len),
            Region.PAYLOAD: (info.prefix_len + info.meta_len, info.payload_len),
            Region.TRAILER: (info.length - info.trailer_len, info.trailer_len),
        }[fault.region]
        offset = fault.offset if fault.offset >= 0 else size + fault.offset
        if not 0 <= offset < size or not 0 <= fault.bit < 8:
            return None
        return start + offset

    def _swap(self, raw: bytes, info: FrameInfo, emit: list[bytes]) -> list[bytes]:
        fault = self.fault
        assert isinstance(fault, SwapFrames)
        if self.done:
            return emit
        matches = self._matches(info)
        if self.held is not None:
            held_raw, held_info = self.held
            self.held = None
            if matches:
                self.done = True
                self.conn.record(FaultRecord("swap", self.direction, self.conn.number, held_info.offset,
                                             held_info, partner=info))
                return emit + [held_raw]
            emit = [held_raw] + emit  # its successor is no match: release it in order, try later
        if matches:
            index, self.count = self.count, self.count + 1
            if index >= fault.select.index and raw in emit:
                self.held = (raw, info)
                return [part for part in emit if part is not raw]
        return emit

    def _rollback(self, raw: bytes, info: FrameInfo, emit: list[bytes]) -> list[bytes]:
        fault = self.fault
        assert isinstance(fault, RollbackFrame)
        if self.saved is not None and info.type == fault.before_type:
            (old_raw, old_info), self.saved = self.saved, None
            self.conn.record(FaultRecord("rollback", self.direction, self.conn.number, old_info.offset,
                                         old_info, partner=self.partner))
            return [old_raw] + emit
        if self.done or info.type not in fault.types or info.gpa is None or info.npages is None:
            return emit
        first, end = info.gpa, info.gpa + info.npages * 4096
        for gpa, stop, old_raw, old_info in self.store:
            if gpa < end and first < stop:
                index, self.overlaps = self.overlaps, self.overlaps + 1
                if index == fault.occurrence:
                    self.done = True
                    if fault.before_type is not None:
                        self.saved, self.partner = (old_raw, old_info), info  # forwarded later
                        return emit
                    self.conn.record(FaultRecord("rollback", self.direction, self.conn.number, old_info.offset,
                                                 old_info, partner=info))
                    return emit + [old_raw]
                return emit
        if self.stored_bytes + len(raw) <= self.conn.proxy.rollback_store:
            self.store.append((first, end, raw, info))
            self.stored_bytes += len(raw)
        return emit

    def _drop_last(self, raw: bytes, info: FrameInfo, emit: list[bytes]) -> list[bytes]:
        fault = self.fault
        assert isinstance(fault, DropLastFrameBefore)
        if self.done:
            return emit
        if info.type == fault.before_type:
            self.done = True  # only the first frame of before_type counts
            if not self.held_run:
                return emit  # no frame of ``types`` since the last flush: nothing to drop
            (first_out, first_raw, first_info), rest = self.held_run[0], self.held_run[1:]
            self.held_run = []
            self._record("drop", first_info, partner=info)
            kept = [part for part in first_out if part is not first_raw]
            return kept + [part for out, _, _ in rest for part in out] + emit
        if info.type in fault.types:
            released = [part for out, _, _ in self.held_run for part in out]
            self.held_run = [(emit, raw, info)]
            return released
        if self.held_run:
            if info.type in fault.flush_types:
                released = [part for out, _, _ in self.held_run for part in out]
                self.held_run = []
                return released + emit
            self.held_run.append((emit, raw, info))
            return []
        return emit

    def flush(self) -> list[bytes]:
        """Frames still held back when the sender's stream ends."""
        if self.held_run:
            released = [part for out, _, _ in self.held_run for part in out]
            self.held_run = []
            return released
        if self.held is not None:
            held, self.held = self.held[0], None
            return [held]
        return []


class _FrameStage:
    """Cuts one direction into frames and runs them through that direction's frame faults."""

    def __init__(self, faults: Sequence[FrameFault], framing: Framing, conn: _Connection, direction: Direction,
                 max_frame: int, observe: bool, reseal: bool, record: bool = False) -> None:
        self.framing = framing
        self.conn = conn
        self.direction = direction
        self.max_frame = max_frame
        self.states = [_FrameFaultState(f, framing, conn, direction) for f in faults]
        self.reseal = reseal and framing is Framing.MIGD
        self.active = bool(faults) or observe or self.reseal or record
        self.buf = bytearray()
        self.offset = 0  # sender-stream offset of buf[0]
        self.ordinal = 0
        self.out_sequence = 0  # frames forwarded (reseal: the number the receiver expects next)
        # A further connection opens with the lane preamble, in the clear: forwarded as it is.
        self.preamble_seen = direction is not Direction.UPSTREAM

    def _preamble(self, out: list[bytes]) -> bool:
        """Forward the lane preamble if the stream starts with it; False while too few bytes tell."""
        preamble = wire.LANE_PREAMBLE
        if len(self.buf) < len(preamble) and preamble.startswith(bytes(self.buf)):
            return False
        self.preamble_seen = True
        if self.buf.startswith(preamble):
            out.append(preamble)
            del self.buf[:len(preamble)]
            self.offset += len(preamble)
        return True

    def _sealed(self, frames: list[bytes]) -> list[bytes]:
        if not self.reseal:
            return frames
        out = []
        for frame in frames:
            if isinstance(frame, _Pause):
                out.append(frame)
                continue
            out.append(reseal(frame, self.out_sequence))
            self.out_sequence += 1
        return out

    def feed(self, data: bytes) -> list[bytes]:
        if not self.active:
            return [data]
        self.buf += data
        out: list[bytes] = []
        if not self.preamble_seen and not self._preamble(out):
            return out
        while (header := _parse_header(self.framing, self.buf)) is not None:
            total, ftype, prefix_len, meta_len, trailer_len = header
            if total > self.max_frame:
                self.conn.record(FaultRecord("framing-lost", self.direction, self.conn.number, self.offset))
                self.active = False
                for state in self.states:
                    out.extend(self._sealed(state.flush()))
                out.append(bytes(self.buf))
                self.buf.clear()
                return out
            if len(self.buf) < total:
                break
            raw = bytes(self.buf[:total])
            del self.buf[:total]
            gpa, npages = _page_range(self.framing, raw, prefix_len, meta_len)
            info = FrameInfo(self.offset, self.ordinal, ftype, total, prefix_len, meta_len, trailer_len, gpa, npages)
            self.conn.proxy.frames_seen[(self.direction, ftype)] += 1
            if self.conn.recording is not None:
                self.conn.recording.frames.append(RecordedFrame(self.direction, ftype, raw))
            self.offset += total
            self.ordinal += 1
            emit = [raw]
            for state in self.states:
                emit = state.on_frame(raw, info, emit)
            if self.conn.cut_pending:
                self.buf.clear()  # nothing from the cut frame on is forwarded
                return out
            out.extend(self._sealed(emit))
        return out

    def flush(self) -> list[bytes]:
        out: list[bytes] = []
        for state in self.states:
            out.extend(self._sealed(state.flush()))
        if self.buf:
            out.append(bytes(self.buf))
            self.buf.clear()
        return out


async def _flush(writer: asyncio.StreamWriter, timeout: float = 5.0) -> None:
    """Wait until everything queued on ``writer`` reached the kernel (drain() stops at the low-water
    mark): a cut must deliver exactly the bytes before it, and an abort drops what is still queued."""
    with contextlib.suppress(ConnectionError, TimeoutError):
        await writer.drain()
        async with asyncio.timeout(timeout):
            while writer.transport.get_write_buffer_size() and not writer.transport.is_closing():
                await asyncio.sleep(0.001)


class _ByteStage:
    """Applies one direction's byte faults to what is written to the receiver."""

    def __init__(self, faults: Sequence[ByteFault], conn: _Connection, direction: Direction) -> None:
        def at(f: ByteFault) -> int:
            return f.after if isinstance(f, Cut) else f.at if isinstance(f, Stall) else f.offset

        self.pending = sorted(faults, key=at)
        self.at = at
        self.conn = conn
        self.direction = direction
        self.offset = 0

    async def write(self, data: bytes | _Pause, writer: asyncio.StreamWriter) -> bool:
        """Forward ``data``; False once a cut ended the connection."""
        if isinstance(data, _Pause):  # a StallBeforeFrame: what came before is delivered, then nothing
            await _flush(writer)
            if data.until is None:
                await asyncio.sleep(data.seconds)
            else:  # a HoldBeforeFrame: until released
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(data.seconds):
                        await data.until.wait()
            return True
        while (held := self.conn.proxy.held_until[self.direction] - time.monotonic()) > 0:
            await asyncio.sleep(held)
        view = memoryview(data)
        while self.pending:
            fault = self.pending[0]
            at = self.at(fault)
            end = self.offset + len(view)
            # A flip needs its byte in this chunk; a cut or stall fires once ``at`` bytes went through.
            if at >= end if isinstance(fault, FlipBit) else at > end:
                break
            self.pending.pop(0)
            split = at - self.offset
            if split:
                writer.write(view[:split])
                self.offset += split
                view = view[split:]
            if isinstance(fault, FlipBit):
                byte = bytearray(view[:1])
                old = byte[0]
                byte[0] ^= 1 << fault.bit
                self.conn.record(FaultRecord("flip", self.direction, self.conn.number, self.offset, old=old,
                                             new=byte[0], bit=fault.bit))
                writer.write(bytes(byte))
                self.offset += 1
                view = view[1:]
                continue
            await _flush(writer)
            if isinstance(fault, Cut):
                self.conn.record(FaultRecord("cut", self.direction, self.conn.number, self.offset))
                self.conn.abort()
                return False
            self.conn.record(FaultRecord("stall", self.direction, self.conn.number, self.offset,
                                         seconds=fault.seconds))
            await asyncio.sleep(fault.seconds)
        if len(view):
            writer.write(view)
            self.offset += len(view)
        await writer.drain()
        return True


# ---------------------------------------------------------------------- the proxy


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FaultProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``target_host:target_port`` with faults."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        faults: Sequence[Fault] = (),
        *,
        framing: Framing = Framing.MIGD,
        observe: bool = False,
        reseal: bool = False,
        max_frame: int = DEFAULT_MAX_FRAME,
        rollback_store: int = DEFAULT_ROLLBACK_STORE,
        record: bool = False,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
    ) -> None:
        if not _is_loopback(target_host):
            raise ValueError(f"the fault proxy only forwards to loopback, got {target_host!r}")
        if not 0 < target_port < 65536:
            raise ValueError(f"target port must be in [1, 65535], got {target_port}")
        for fault in faults:
            self._validate(fault, framing)
        self.target = (target_host, target_port)
        self.faults = tuple(faults)
        self.framing = framing
        self.observe = observe
        if reseal and framing is not Framing.MIGD:
            raise ValueError("reseal recomputes migd CRC32 trailers: it needs the migd framing")
        self.reseal = reseal
        self.max_frame = max_frame
        self.rollback_store = rollback_store
        #: record=True: one Recording per accepted connection, in accept order.
        self.record = record
        self.recordings: list[Recording] = []
        #: TLS termination: the proxy is the TLS server of its clients (``server_ssl``) and a TLS
        #: client of its target (``client_ssl``), and sees the plaintext in between.
        self.server_ssl = server_ssl
        self.client_ssl = client_ssl
        self.released = asyncio.Event()  # HoldBeforeFrame: set by release()
        self.records: list[FaultRecord] = []
        self.frames_seen: collections.Counter[tuple[Direction, int]] = collections.Counter()
        self.flip_offsets: list[int] = []  # sender-stream offsets of frame-relative flips
        self.bytes_forwarded: dict[Direction, int] = dict.fromkeys(Direction, 0)
        self.held_until: dict[Direction, float] = dict.fromkeys(Direction, 0.0)  # stall_now()
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # connection handlers (asyncio's callbacks)
        self._pumps: set[asyncio.Task[None]] = set()
        self._conns: list[_Connection] = []

    @staticmethod
    def _validate(fault: Fault, framing: Framing) -> None:
        if isinstance(fault, OnConnection):
            if isinstance(fault.fault, OnConnection) or fault.connection < 0:
                raise ValueError(f"{fault}: wraps one fault, on a connection number >= 0")
            FaultProxy._validate(fault.fault, framing)
            return
        if isinstance(fault, (Cut, Stall, FlipBit)):
            offset = fault.after if isinstance(fault, Cut) else fault.at if isinstance(fault, Stall) else fault.offset
            if offset < 0:
                raise ValueError(f"{fault}: offset must be >= 0")
            if isinstance(fault, FlipBit) and not 0 <= fault.bit < 8:
                raise ValueError(f"{fault}: bit must be in [0, 7]")
            if isinstance(fault, Stall) and not fault.seconds >= 0:
                raise ValueError(f"{fault}: seconds must be >= 0")
            return
        if isinstance(fault, RollbackFrame) and framing is not Framing.MIGD:
            raise ValueError("RollbackFrame needs the migd framing (it reads each frame's gpa)")
        if isinstance(fault, FlipFrameBit):
            if fault.field is not None and framing is not Framing.MIGD:
                raise ValueError("FlipFrameBit(field=...) needs the migd framing")
            if fault.field is None and not 0 <= fault.bit < 8:
                raise ValueError(f"{fault}: bit must be in [0, 7] (or name a field)")
            if fault.region is Region.META and framing is Framing.TLS:
                raise ValueError("TLS records have no metadata region")
        if isinstance(fault, (StallBeforeFrame, HoldBeforeFrame)) and not fault.seconds >= 0:
            raise ValueError(f"{fault}: seconds must be >= 0")
        if isinstance(fault, DropLastFrameBefore) and (not fault.types or fault.before_type in fault.types):
            raise ValueError(f"{fault}: needs types, and before_type must not be one of them")
        if isinstance(fault, ReplayFrame) and fault.after < 0:
            raise ValueError(f"{fault}: after must be >= 0")

    # -- lifetime
    async def start(self) -> int:
        """Start listening on 127.0.0.1; returns the port."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, ssl=self.server_ssl)
        return self.port

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("proxy not started")
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and drop every proxied connection."""
        if self._server is not None:
            self._server.close()
        for conn in self._conns:
            conn.abort()
        for pump in list(self._pumps):
            pump.cancel()  # e.g. one asleep in a stall
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # -- evidence
    def cut_now(self) -> int:
        """Reset every open connection at once (a cut at a moment, not at an offset, e.g. while
        the source sends nothing in ``blackout``); returns how many were cut, each recorded."""
        cut = 0
        for conn in self._conns:
            if not conn.cut:
                conn.record(FaultRecord("cut", Direction.UPSTREAM, conn.number, self.bytes_forwarded[Direction.UPSTREAM]))
                conn.abort()
                cut += 1
        return cut

    def stall_now(self, seconds: float, direction: Direction = Direction.UPSTREAM) -> None:
        """Hold ``direction`` of every connection for ``seconds`` from now (recorded once)."""
        if not seconds >= 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        self.held_until[direction] = time.monotonic() + seconds
        self.records.append(FaultRecord("stall", direction, self.connections, self.bytes_forwarded[direction],
                                        seconds=seconds))

    def release(self) -> None:
        """End every :class:`HoldBeforeFrame` hold, present and future (call it on the proxy's loop)."""
        self.released.set()

    def fired(self, action: str | None = None) -> list[FaultRecord]:
        """The records of faults that happened (of one ``action``, or all but ``framing-lost``)."""
        if action is None:
            return [r for r in self.records if r.action != "framing-lost"]
        return [r for r in self.records if r.action == action]

    def frames(self, ftype: int, direction: Direction = Direction.UPSTREAM) -> int:
        """How many frames of ``ftype`` the sender sent in ``direction`` (parsed directions only)."""
        return self.frames_seen[(direction, int(ftype))]

    # -- forwarding
    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Connection(self, self.connections)
        self.connections += 1
        self._conns.append(conn)
        if self.record:
            conn.recording = Recording(conn.number)
            self.recordings.append(conn.recording)
        conn.writers.append(client_writer)
        try:
            try:
                server_reader, server_writer = await asyncio.open_connection(
                    *self.target, ssl=self.client_ssl, server_hostname=self.target[0] if self.client_ssl else None)
            except OSError as exc:
                log.warning("proxy cannot reach %s:%d: %s", *self.target, exc)
                client_writer.transport.abort()
                return
            conn.writers.append(server_writer)
            pumps = [
                asyncio.create_task(self._pump(conn, Direction.UPSTREAM, client_reader, server_writer)),
                asyncio.create_task(self._pump(conn, Direction.DOWNSTREAM, server_reader, client_writer)),
            ]
            self._pumps.update(pumps)
            # asyncio.wait, not gather: a pump cancelled by close() must not cancel this handler
            # (asyncio logs a cancelled client_connected_cb task as an error).
            await asyncio.wait(pumps)
            self._pumps.difference_update(pumps)
        finally:
            for writer in conn.writers:
                if conn.cut:
                    writer.transport.abort()
                else:
                    writer.close()  # flushes what is queued: the stream ended normally
            self._tasks.discard(task)

    def _faults_of(self, conn: _Connection) -> list[ByteFault | FrameFault]:
        """The faults that apply to ``conn``: every unwrapped one, and those aimed at its number."""
        out: list[ByteFault | FrameFault] = []
        for fault in self.faults:
            if not isinstance(fault, OnConnection):
                out.append(fault)
            elif fault.connection == conn.number:
                out.append(fault.fault)
        return out

    async def _pump(self, conn: _Connection, direction: Direction, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        faults = self._faults_of(conn)
        frames = _FrameStage([f for f in faults if isinstance(f, _FRAME_FAULTS) and f.direction is direction],
                             self.framing, conn, direction, self.max_frame, self.observe, self.reseal, self.record)
        raw = _ByteStage([f for f in faults if isinstance(f, (Cut, Stall, FlipBit)) and f.direction is direction],
                         conn, direction)
        try:
            while not conn.cut:
                data = await reader.read(READ_SIZE)
                if conn.cut:
                    return
                if conn.recording is not None:
                    conn.recording.raw[direction] += data
                if not data:
                    for part in frames.flush():
                        if not await raw.write(part, writer):
                            return
                        self.bytes_forwarded[direction] += 0 if isinstance(part, _Pause) else len(part)
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                for part in frames.feed(data):
                    if not await raw.write(part, writer):
                        return
                    self.bytes_forwarded[direction] += 0 if isinstance(part, _Pause) else len(part)
                if conn.cut_pending:
                    await _flush(writer)
                    conn.abort()
                    return
        except (ConnectionError, OSError) as exc:
            # One side reset: the other sees a reset too, as through a real broken path.
            log.info("proxy %s connection %d ended: %s", direction.value, conn.number, exc)
            conn.abort()


_FRAME_FAULTS = (CutBeforeFrame, StallBeforeFrame, DropFrame, DuplicateFrame, ReplayFrame, RollbackFrame, SwapFrames,
                 FlipFrameBit, HoldBeforeFrame, DropLastFrameBefore)


# ---------------------------------------------------------------------- replay


@dataclass
class ReplayReport:
    """What :func:`replay` sent and what the listener answered."""

    sent: list[int] = field(default_factory=list)  # types of the frames written, in order
    received: list[int] = field(default_factory=list)  # types of the listener's frames read
    end: str = "done"  # done (every recorded frame went) | closed | timeout | refused
    abort_reason: str | None = None  # the listener's ABORT, if it sent one

    def summary(self) -> str:
        """One line for an assertion message: frames by type each way, and how it ended."""

        def names(types: list[int]) -> str:
            counts = collections.Counter(types)
            return ", ".join(f"{_type_name(t)}×{n}" if n > 1 else _type_name(t) for t, n in counts.items()) or "nothing"

        reason = f" ({self.abort_reason})" if self.abort_reason else ""
        return f"sent {names(self.sent)}; received {names(self.received)}; ended {self.end}{reason}"


def _type_name(ftype: int) -> str:
    try:
        return wire.FrameType(ftype).name
    except ValueError:
        return str(ftype)


async def _read_migd_frame(reader: asyncio.StreamReader, timeout: float) -> bytes | str:
    """One whole migd frame from ``reader``, or why there is none: "closed" or "timeout"."""
    try:
        async with asyncio.timeout(timeout):
            prefix = await reader.readexactly(4)
            (length,) = struct.unpack(">I", prefix)
            if length > DEFAULT_MAX_FRAME:
                return "closed"  # not a migd frame: nothing sensible follows
            return prefix + await reader.readexactly(length)
    except TimeoutError:
        return "timeout"
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        return "closed"


def _abort_reason(frame: bytes) -> str | None:
    """The ``reason`` of an ABORT frame, read from its metadata (no codec: any protocol version)."""
    if len(frame) < _MIGD_PREFIX.size:
        return None
    _, _, meta_len = _MIGD_PREFIX.unpack_from(frame)
    try:
        meta = msgpack.unpackb(frame[_MIGD_PREFIX.size : _MIGD_PREFIX.size + meta_len], raw=False)
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    reason = meta.get("reason") if isinstance(meta, dict) else None
    return reason if isinstance(reason, str) else None


async def replay(recording: Recording, host: str, port: int, *, ssl_context: ssl.SSLContext | None = None,
                 reply_timeout: float = 10.0) -> ReplayReport:
    """Replay a recorded migd connection's upstream frames to ``host:port`` (loopback only).

    The recording's frames are walked in order: an upstream frame is sent as recorded; a
    downstream one means the original listener answered there, so one frame is read from this
    listener (whatever it is) before going on. The replay ends early when the listener sends
    ABORT, closes, or says nothing for ``reply_timeout`` seconds. With ``ssl_context`` the
    connection is mutual TLS under whatever certificate the context holds. Bytes are replayed
    as recorded: the frame numbers and CRC32 trailers are the originals, and a listener that
    accepts them has accepted the recorded migration again.
    """
    if not _is_loopback(host):
        raise ValueError(f"replay only targets loopback, got {host!r}")
    report = ReplayReport()
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, ssl=ssl_context, server_hostname=host if ssl_context else None),
            reply_timeout)
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        log.info("replay: cannot connect to %s:%d: %s", host, port, exc)
        report.end = "refused"
        return report
    try:
        for frame in recording.frames:
            if frame.direction is Direction.UPSTREAM:
                writer.write(frame.data)
                report.sent.append(frame.type)
                await writer.drain()
                continue
            answer = await _read_migd_frame(reader, reply_timeout)
            if isinstance(answer, str):
                report.end = answer
                break
            report.received.append(answer[4])
            if answer[4] == wire.FrameType.ABORT:
                report.abort_reason = _abort_reason(answer)
                report.end = "closed"
                break
    except (ConnectionError, OSError) as exc:
        log.info("replay: the listener ended the stream: %s", exc)
        report.end = "closed"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError, TimeoutError, ssl.SSLError):
            async with asyncio.timeout(2):
                await writer.wait_closed()
        writer.transport.abort()
    return report
