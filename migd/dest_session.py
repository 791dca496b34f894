"""The destination's side of one connection to the migration listener, sans-I/O (see :mod:`migd.session`)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

from migd import wire
from migd.abi import PAGE_SHIFT
from migd.errors import PeerProtocolError
from migd.migration_state import MigrationPhase, MigrationStatus
from migd.page_runs import PageKind, in_lane, lane_of
from migd.session import PAGE_PHASES, Local, LocalProtocolError, Phase, Role, Session, Timeouts, agree, vcpu_digest
from migd.session_auth import AuthenticationError, new_nonce, verify_mac

P, R = Phase, Role
_KIND_OF = {wire.PrivatePages: PageKind.PRIVATE, wire.SharedPages: PageKind.SHARED, wire.ZeroPages: PageKind.ZERO}


class DestinationSession(Session):
    """The destination's side of one connection to the migration listener."""

    ROLE = R.DESTINATION

    def __init__(self, status: MigrationPhase, now: float, *, timeouts: Timeouts | None = None,
                 nonce: bytes | None = None) -> None:
        super().__init__(status, timeouts or Timeouts(), now, P.AWAIT_HELLO)
        self.nonce = new_nonce() if nonce is None else nonce
        self.capabilities: tuple[str, ...] = ()  # agreed on HELLO
        self.hello_msg: wire.Hello | None = None
        self.session_msg: wire.Session | None = None
        self._bitmap_digest: bytes | None = None
        self._vcpu_digest: bytes | None = None

    @classmethod
    def restored_in_doubt(cls, status: MigrationPhase, now: float) -> DestinationSession:
        """The session of a migration reloaded from the journal as prepared without a commit record.

        A restarted daemon (migd.daemon.recovery) has no stream and no keys for it: only RESOLVE's
        answer moves it on (``resolved_committed`` then ``fail``: kept, or ``fail``: removed).
        """
        if status.status is not MigrationStatus.STOP_COPY or status.committed:
            raise LocalProtocolError(f"a restored migration in {status.status.value} is not in doubt")
        session = cls(status, now)
        session.phase = P.IN_DOUBT  # where the journal left it: entered, not a transition
        return session

    def _on_hello(self, msg: wire.Hello, now: float) -> wire.Hello:
        if msg.version == wire.PROTOCOL_VERSION:  # another version is refused by the driver, with its reason
            self.capabilities = agree(wire.CAPABILITIES, msg.capabilities, msg.transport_mode, msg.guest.policy)
        self._transition(wire.Hello, now)
        self.transcript.absorb(msg)
        self.hello_msg = msg
        # conns is in the transcript: SESSION's MAC binds it (a peer that changed it fails there).
        self.chain.resize(msg.connections if "lanes" in self.capabilities else 1)
        return msg  # the driver decides whether this host can take the guest

    def _on_resolve(self, msg: wire.Resolve, now: float) -> wire.Resolve:
        self._transition(wire.Resolve, now)
        return msg  # the driver looks the migration up and answers (or not)

    def _on_join(self, msg: wire.Join, now: float) -> wire.Join:
        self._transition(wire.Join, now)
        return msg  # the driver hands it to the session of that migration (accept_join), if any

    def accept_join(self, msg: wire.Join, now: float) -> wire.Joined:
        """A further connection asks to carry lane ``msg.lane`` of this migration: JOINED, or an error.

        AuthenticationError: not made by the holder of this session's key (for this migration).
        PeerProtocolError: no such lane, the lane is taken (a replayed JOIN), or not while pages flow.
        """
        if self._key is None or self._join_context is None:
            raise LocalProtocolError("JOIN before the session is established")
        # The MAC first: a peer without the key learns nothing of the migration's phase or size.
        verify_mac(self._key, R.SOURCE.value, self._join_context, msg, msg.mac)
        if self.phase is not P.RECEIVING:
            raise PeerProtocolError(f"JOIN in phase {self.phase.value}")
        self._check_lane(msg.lane)
        if msg.lane in self._joined:
            raise PeerProtocolError(f"connection {msg.lane} has joined already (a replayed JOIN)")
        self._joined.add(msg.lane)
        self.activity(now)
        reply = wire.Joined(msg.lane)
        return wire.Joined(msg.lane, self._join_mac(reply, R.DESTINATION))

    @property
    def joined(self) -> frozenset[int]:
        """The further connections that have joined."""
        return frozenset(self._joined)

    def answered(self, now: float) -> None:
        """The RESOLVE question was answered (or refused)."""
        self._transition(Local.ANSWERED, now)

    def welcome(self, pdh_cert: bytes, now: float) -> wire.Welcome:
        """Accept the HELLO: WELCOME with this host's PDH certificate and a fresh nonce."""
        self._require(Local.WELCOME_SENT)
        if self.hello_msg is not None and self.hello_msg.version != wire.PROTOCOL_VERSION:
            raise LocalProtocolError("a HELLO of another protocol version must be refused, not welcomed")
        msg = wire.Welcome(pdh_cert, nonce=self.nonce)
        self._transition(Local.WELCOME_SENT, now)
        self.transcript.absorb(msg)
        return msg

    def _on_session(self, msg: wire.Session, now: float) -> wire.Session:
        assert self.hello_msg is not None
        if msg.policy != self.hello_msg.guest.policy:
            raise PeerProtocolError(f"SESSION policy {msg.policy:#x} differs from HELLO's {self.hello_msg.guest.policy:#x}")
        self._transition(wire.Session, now)
        self.session_msg = msg
        return msg  # the driver runs RECEIVE_START (with our nonce), then accept_session()

    def accept_session(self, handoff_key: bytes, now: float) -> wire.SessionAck:
        """RECEIVE_START gave the hand-off key: check the source's proof, confirm ours.

        AuthenticationError: the SESSION was not made for this connection (replayed from a
        recorded stream, whose MAC covers another nonce) or not by the key holder.
        """
        if self.phase is not P.OPENING_SESSION or self.session_msg is None:
            raise LocalProtocolError(f"accept_session in phase {self.phase.value}")
        self._key = handoff_key
        try:
            self._verify(self.session_msg)
        except AuthenticationError:
            self._key = None
            raise
        self.transcript.absorb(self.session_msg)
        self._abort_context = self.transcript.digest()
        ack = self._signed(wire.SessionAck())
        self._join_context = self.transcript.digest()
        self._transition(Local.SESSION_ACCEPTED, now)
        return ack

    @contextlib.contextmanager
    def page_frame(self, msg: wire.PrivatePages | wire.SharedPages | wire.ZeroPages,
                   lane: int = 0) -> Iterator[PageKind]:
        """Admit one page frame of connection ``lane`` and hold the page phase open while the driver places it.

        The page workers run beside the event loop (one per connection, at once): without this,
        a frame checked just before the loop handled VCPU_STATE and PREPARE could reach guest RAM
        after PREPARE was verified.
        """
        with self._placing.shared():
            yield self.page_received(msg, lane)

    def page_received(self, msg: wire.PrivatePages | wire.SharedPages | wire.ZeroPages, lane: int = 0) -> PageKind:
        """One page frame, in its connection's order: checked against the phase and the
        connection's stripes, added to that connection's chain."""
        if self.phase not in PAGE_PHASES[R.DESTINATION]:
            raise PeerProtocolError(f"{msg.TYPE.name} frame in phase {self.phase.value}")
        chain = self.chain.lane(lane)
        if lane and lane not in self._joined:
            raise PeerProtocolError(f"{msg.TYPE.name} frame on connection {lane} before it joined")
        first, n = msg.gpa >> PAGE_SHIFT, self.connections
        if not in_lane(first, msg.npages, lane, n):
            raise PeerProtocolError(f"{msg.TYPE.name} run at page {first} (+{msg.npages}) came on connection {lane}; "
                                    f"its stripe goes on connection {lane_of(first, n)} (a run moved between "
                                    f"connections, or crossing a stripe)")
        kind = _KIND_OF[type(msg)]
        chain.add(kind, msg.gpa, msg.npages, msg.header if isinstance(msg, wire.PrivatePages) else b"")
        return kind

    def _on_round_end(self, msg: wire.RoundEnd, now: float) -> wire.RoundEnd:
        self._transition(wire.RoundEnd, now)
        return msg

    def _on_ping(self, msg: wire.Ping, now: float) -> wire.Pong:
        self._transition(wire.Ping, now)
        return wire.Pong(msg.token)

    def _on_bitmap(self, msg: wire.SharedBitmap, now: float) -> wire.SharedBitmap:
        if self._bitmap_digest is not None:
            raise PeerProtocolError("a second shared-page bitmap")
        self._transition(wire.SharedBitmap, now)
        self._bitmap_digest = hashlib.sha256(msg.payload).digest()
        return msg

    def _on_vcpu(self, msg: wire.VcpuState, now: float) -> wire.VcpuState:
        self._transition(wire.VcpuState, now)
        self._vcpu_digest = vcpu_digest(msg)
        return msg

    def _on_prepare(self, msg: wire.Prepare, now: float) -> wire.Prepare:
        self._verify(msg)
        self._transition(wire.Prepare, now)
        self.transcript.absorb(msg)
        return msg  # the driver checks it against the stream (check_prepare) with the firmware's sequence

    def check_prepare(self, msg: wire.Prepare, transport_seq: int) -> None:
        """Everything PREPARE binds must match what arrived; PeerProtocolError says what differs."""
        pages = self.chain.pages
        got = {"frames": self.chain.frames, "private": pages[PageKind.PRIVATE], "shared": pages[PageKind.SHARED],
               "zero": pages[PageKind.ZERO], "transport_seq": transport_seq}
        sent = {"frames": msg.frames, "private": msg.private, "shared": msg.shared, "zero": msg.zero,
                "transport_seq": msg.transport_seq}
        differs = [f"{k} sent {sent[k]}, received {got[k]}" for k in got if got[k] != sent[k]]
        if msg.pages_sent != sum(pages.values()):
            differs.append(f"pages sent {msg.pages_sent}, received {sum(pages.values())}")
        received = self.chain.further_frames()
        if msg.lanes != received:
            differs.append(f"frames per further connection sent {list(msg.lanes)}, received {list(received)}")
        if msg.stream_digest != self.chain.digest():
            differs.append("the page frames' order or placement")
        if msg.bitmap_digest != self._bitmap_digest:
            differs.append("the shared-page bitmap")
        if msg.vcpu_digest != self._vcpu_digest:
            differs.append("the vCPU state")
        if differs:
            raise PeerProtocolError("the stream is not what the source sent (dropped, injected or altered frames): "
                                    + "; ".join(differs))

    def prepared(self, pages_received: int, now: float) -> wire.Prepared:
        """The guest is complete and verified: PREPARED (from now on in doubt until COMMIT)."""
        self._require(Local.PREPARED_SENT)
        msg = self._signed(wire.Prepared(pages_received))
        self._transition(Local.PREPARED_SENT, now)
        return msg

    def _on_commit(self, msg: wire.Commit, now: float) -> None:
        self._verify(msg)
        self.transcript.absorb(msg)
        self._transition(wire.Commit, now)

    def _abort_received(self, msg: wire.Abort, now: float) -> Any:
        if self.phase is P.PREPARED:
            # Only the source itself may end a prepared migration: a forged ABORT (a peer
            # without the keys) must not discard what may be the only copy of the guest.
            if self._key is None or msg.mac is None:
                raise AuthenticationError("unauthenticated ABORT after PREPARED")
            verify_mac(self._key, self._peer_role.value, self._abort_context, msg, msg.mac)
        return super()._abort_received(msg, now)

    def stream_lost(self, reason: str, now: float) -> None:
        """After PREPARED the stream ended without COMMIT: in doubt (the driver asks the source)."""
        self._transition(Local.STREAM_LOST, now, error=f"in doubt after PREPARED, guest kept (not started): {reason}")

    def resolved_committed(self, now: float) -> None:
        """The source said (authenticated RESOLVED) that it committed."""
        self._transition(Local.RESOLVED_COMMITTED, now)

    def started(self, now: float) -> wire.Started:
        """The guest runs here: STARTED, authenticated."""
        self._require(Local.STARTED_SENT)
        msg = self._signed(wire.Started())
        self._transition(Local.STARTED_SENT, now)
        return msg

    def _deadline_step(self) -> tuple[str, float, str] | None:
        t, phase = self.timeouts, self.phase
        if phase in (P.AWAIT_HELLO, P.ACCEPTING, P.AWAIT_SESSION, P.OPENING_SESSION):
            return ("handshake", self.handshake_deadline,
                    f"the source did not complete the handshake within {t.handshake_s:g} s ({phase.value})")
        if phase in (P.RECEIVING, P.AWAIT_PREPARE):
            return ("stall", self.last_activity + t.stall_s, f"no data from the source for {t.stall_s:g} s")
        if phase is P.PREPARED:
            return ("commit", self.entered_at + t.handoff_s, f"no COMMIT within {t.handoff_s:g} s of PREPARED")
        return None

    _HANDLERS = {
        wire.Hello: _on_hello, wire.Resolve: _on_resolve, wire.Join: _on_join, wire.Session: _on_session, wire.RoundEnd: _on_round_end,
        wire.Ping: _on_ping, wire.SharedBitmap: _on_bitmap, wire.VcpuState: _on_vcpu, wire.Prepare: _on_prepare,
        wire.Commit: _on_commit,
    }
