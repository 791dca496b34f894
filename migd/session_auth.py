"""Authentication of a migration's control messages: the transcript and its MACs.

The SEV transport authenticates private pages only, and its format has no freshness: a session
blob recorded today unwraps the same way tomorrow. migd's hand-off key (derived by both
firmwares from the session's TIK, the source's session nonce and the destination's fresh nonce,
:func:`migd.sev_transport.derive_handoff_key`) authenticates everything that decides where a
guest runs:

* every hand-off message (SESSION, SESSION_ACK, PREPARE, PREPARED, COMMIT, STARTED, an ABORT
  once keys exist) carries ``HMAC-SHA256(key, label || transcript digest || its own fields)``;
* the transcript is a SHA-256 chain over every such message in order (HELLO and WELCOME
  included), so a MAC verifies only at its place in this one conversation;
* RESOLVE / RESOLVED (a new connection, after the stream is gone) MAC their fields and a fresh
  nonce of the asker under the same key.

Pure functions and one small class; no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from migd import wire
from migd.errors import PeerProtocolError
from migd.peer_text import printable

KEY_SIZE = 32
_TAG = b"migd-handoff-mac-v1\x00"
_LEN = struct.Struct(">I")


class AuthenticationError(PeerProtocolError):
    """A peer's message failed its MAC: forged, replayed from another session, or keyless."""


def new_nonce() -> bytes:
    """A fresh random nonce (WELCOME, RESOLVE)."""
    return os.urandom(wire.NONCE_SIZE)


def _check_key(key: bytes) -> None:
    if len(key) != KEY_SIZE:
        raise ValueError(f"a hand-off key is {KEY_SIZE} bytes, got {len(key)}")


def compute_mac(key: bytes, label: str, context: bytes, msg: wire.Message) -> bytes:
    """``HMAC(key, tag || label || context || the message's authenticated bytes)``, each part length-prefixed."""
    _check_key(key)
    mac = hmac.new(key, _TAG, "sha256")
    for part in (label.encode(), context, wire.authenticated_bytes(msg)):
        mac.update(_LEN.pack(len(part)))
        mac.update(part)
    return mac.digest()


def verify_mac(key: bytes, label: str, context: bytes, msg: wire.Message, mac: bytes | None) -> None:
    """Raise :class:`AuthenticationError` unless ``mac`` is ``msg``'s MAC at ``context`` (constant time)."""
    expected = compute_mac(key, label, context, msg)
    if mac is None or not hmac.compare_digest(expected, mac):
        raise AuthenticationError(
            f"{msg.TYPE.name} failed its MAC: not from the peer that holds this session's keys "
            f"(forged, replayed from another session, or sent by a host without the PDH private key)"
        )


class Transcript:
    """A SHA-256 chain over the control messages of one session, in the order they were exchanged."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256(b"migd-transcript-v1")

    def absorb(self, msg: wire.Message) -> None:
        """Append one message (its authenticated fields and, if it has one, its MAC)."""
        body = wire.authenticated_bytes(msg)
        mac = getattr(msg, "mac", None) or b""
        self._hash.update(_LEN.pack(len(body)) + body + _LEN.pack(len(mac)) + mac)

    def digest(self) -> bytes:
        """The chain so far."""
        return self._hash.copy().digest()


# ---------------------------------------------------------------- RESOLVE


#: RESOLVE's labels: a question and an answer MAC under labels no other message uses, so neither
#: can be reflected as the other (nor as a hand-off message of the live session).
RESOLVE_QUESTION = "destination-asks-resolve"
RESOLVE_ANSWER = "source-answers-resolve"


def resolve_request(migration_id: str, key: bytes, nonce: bytes | None = None) -> wire.Resolve:
    """The destination's authenticated question: did ``migration_id`` commit?"""
    unsigned = wire.Resolve(migration_id, new_nonce() if nonce is None else nonce)
    return wire.Resolve(unsigned.migration_id, unsigned.nonce, compute_mac(key, RESOLVE_QUESTION, b"", unsigned))


def check_resolve(msg: wire.Resolve, key: bytes) -> None:
    """The source's check that the asker is the destination of that migration."""
    verify_mac(key, RESOLVE_QUESTION, b"", msg, msg.mac)


def resolved_answer(request: wire.Resolve, outcome: str, key: bytes) -> wire.Resolved:
    """The source's answer, MACed together with the asker's nonce (an old answer never verifies)."""
    unsigned = wire.Resolved(request.migration_id, outcome)
    return wire.Resolved(request.migration_id, outcome, compute_mac(key, RESOLVE_ANSWER, request.nonce, unsigned))


def check_resolved(answer: wire.Resolved, request: wire.Resolve, key: bytes) -> str:
    """The destination's check of the answer; returns the outcome."""
    if answer.migration_id != request.migration_id:
        raise AuthenticationError(f"RESOLVED answers migration {printable(answer.migration_id)}, "
                                  f"not {request.migration_id}")
    verify_mac(key, RESOLVE_ANSWER, request.nonce, answer, answer.mac)
    return answer.outcome
