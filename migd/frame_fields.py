"""The migration stream's frame types, limits and metadata field checks (the codec's ground floor).

:mod:`migd.messages` builds the messages on these, :mod:`migd.wire` frames them; both the
limits here and the checks are what every decoded field passes before it is used.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Any

from migd.abi import PAGE_SIZE
from migd.errors import ProtocolError

#: 2: PING/PONG before the switch-over; 3: the destination's nonce, key confirmation and the
#: authenticated hand-off (docs/protocol.md "Authentication").
PROTOCOL_VERSION = 3
#: Capabilities this implementation speaks (HELLO and WELCOME ``caps``); :func:`negotiate`
#: gives those both ends speak, and the session (migd/session.py ``required_capabilities``)
#: refuses a peer without what this migration needs: zero runs, its transport mode, and the
#: VMSA packet for an SEV-ES guest. A later optional feature is announced here, used if agreed.
CAPABILITIES = ("zero-runs", "bound-transport", "sev-compat-transport", "vmsa", "lanes")

MAX_META = 0xFFFF
#: TCP connections one migration may use (HELLO ``conns``; pages striped over them).
MAX_CONNECTIONS = 16
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
    JOIN = 20  # source → destination listener, on a further connection: which migration and lane, the proof
    JOINED = 21  # destination → source: the lane is accepted (the destination's proof)


def field_value(meta: dict[str, Any], name: str, kind: type | tuple[type, ...], what: str) -> Any:
    """Field ``name`` of a decoded map, of type ``kind`` (a boolean is no integer); ``what`` names the frame."""
    if name not in meta:
        raise ProtocolError(f"{what}: missing field {name!r}")
    value = meta[name]
    if isinstance(value, bool) and kind is int:
        raise ProtocolError(f"{what}: field {name!r} must be an integer, got a boolean")
    if not isinstance(value, kind):
        raise ProtocolError(f"{what}: field {name!r} has type {type(value).__name__}")
    return value


def int_field(meta: dict[str, Any], name: str, what: str, lo: int = 0, hi: int = U64) -> int:
    """An integer field in ``[lo, hi]``."""
    value: int = field_value(meta, name, int, what)
    if not lo <= value <= hi:
        raise ProtocolError(f"{what}: field {name!r} must be in [{lo}, {hi}], got {value}")
    return value


def bytes_field(meta: dict[str, Any], name: str, what: str, size: int | None = None, max_size: int = MAX_META) -> bytes:
    """A bytes field of exactly ``size`` bytes (if given) and at most ``max_size``."""
    value: bytes = field_value(meta, name, bytes, what)
    if size is not None and len(value) != size:
        raise ProtocolError(f"{what}: field {name!r} must be {size} bytes, got {len(value)}")
    if len(value) > max_size:
        raise ProtocolError(f"{what}: field {name!r} is {len(value)} bytes, at most {max_size} allowed")
    return value


def str_field(meta: dict[str, Any], name: str, what: str, max_len: int = 256) -> str:
    """A string field of at most ``max_len`` characters."""
    value: str = field_value(meta, name, str, what)
    if len(value) > max_len:
        raise ProtocolError(f"{what}: field {name!r} is longer than {max_len} characters")
    return value


def no_payload(payload: memoryview, what: str) -> None:
    """A control frame carries no payload."""
    if len(payload):
        raise ProtocolError(f"{what}: carries {len(payload)} payload bytes, expected none")


def run_fields(meta: dict[str, Any], payload: memoryview, what: str, with_payload: bool) -> tuple[int, int]:
    """A page run's ``gpa`` and ``n``: page aligned, inside any guest, and the payload they imply."""
    gpa = int_field(meta, "gpa", what)
    npages = int_field(meta, "n", what, 1, MAX_RUN_PAGES)
    if gpa % PAGE_SIZE:
        raise ProtocolError(f"{what}: gpa {gpa:#x} is not page aligned")
    if gpa // PAGE_SIZE + npages > MAX_GUEST_PAGES:
        raise ProtocolError(f"{what}: run {gpa:#x}+{npages} pages is past any guest's RAM")
    expected = npages * PAGE_SIZE if with_payload else 0
    if len(payload) != expected:
        raise ProtocolError(f"{what}: {npages} pages need {expected} payload bytes, got {len(payload)}")
    return gpa, npages


def capabilities_field(meta: dict[str, Any], what: str) -> tuple[str, ...]:
    """``caps``: at most 64 strings of at most 64 characters."""
    caps = field_value(meta, "caps", list, what)
    if len(caps) > 64 or not all(isinstance(c, str) and len(c) <= 64 for c in caps):
        raise ProtocolError(f"{what}: capabilities must be at most 64 short strings")
    return tuple(caps)


def lane_counts(meta: dict[str, Any], name: str, what: str) -> tuple[int, ...]:
    """Optional ``name``: one count per further connection (lanes 1..), at most MAX_CONNECTIONS - 1."""
    if name not in meta:
        return ()
    counts = field_value(meta, name, list, what)
    if len(counts) > MAX_CONNECTIONS - 1 or not all(
            isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= U64 for c in counts):
        raise ProtocolError(f"{what}: field {name!r} must be at most {MAX_CONNECTIONS - 1} counts")
    return tuple(counts)


def negotiate(ours: Iterable[str], theirs: Iterable[str]) -> tuple[str, ...]:
    """The capabilities both ends speak: the intersection of ``ours`` and ``theirs``, sorted.

    Pure and symmetric (``negotiate(a, b) == negotiate(b, a)``), so the source (on WELCOME) and
    the destination (on HELLO) get the same tuple from the two ``caps`` lists. A capability only
    one side lists is off, never an error: that is how a newer peer talks to an older one.
    Duplicates count once. ``theirs`` is the peer's, already bounded by the decoder.
    """
    return tuple(sorted(set(ours) & set(theirs)))
