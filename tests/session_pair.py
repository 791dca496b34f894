"""Bring a session through the authenticated handshake with a real peer session (no sockets).

For tests of a driver's page paths (tests/test_source_send.py, tests/test_dest_place.py): the
other side is a real session of the other role, with a hand-off key both derive the same way.
"""

from __future__ import annotations

import os

from migd import wire
from migd.migration_state import MigrationPhase
from migd.dest_session import DestinationSession
from migd.source_session import SourceSession
from migd.sev_transport import derive_handoff_key, new_session_keys

GUEST = wire.GuestSpec("g", 256, 0)


def established(source: SourceSession | None = None, dest: DestinationSession | None = None,
                now: float = 0.0) -> tuple[SourceSession, DestinationSession]:
    """Run HELLO, WELCOME, SESSION, SESSION_ACK between the two (new ones where None is given)."""
    source = source or SourceSession("m-test", GUEST, "bound", MigrationPhase(started_at=now), now)
    dest = dest or DestinationSession(MigrationPhase(started_at=now), now)
    keys, blob_nonce = new_session_keys(), os.urandom(16)
    dest.receive(source.hello(now), now)
    welcome = dest.welcome(b"PDH", now)
    source.receive(welcome, now)
    key = derive_handoff_key(keys, blob_nonce, welcome.nonce)
    dest.receive(source.session(b"SRC", blob_nonce + bytes(112), source._hello.guest.policy, key, now), now)
    source.receive(dest.accept_session(key, now), now)
    return source, dest
