"""The source's side of one migration stream, sans-I/O (the table and the base: :mod:`migd.session`)."""

from __future__ import annotations

import hashlib
from typing import Any

from migd import wire
from migd.errors import PeerAborted, PeerProtocolError
from migd.migration_state import MigrationPhase
from migd.page_runs import PageKind
from migd.peer_text import printable
from migd.session import PAGE_PHASES, Local, LocalProtocolError, Phase, Role, Session, Timeouts, agree, vcpu_digest
from migd.session_auth import verify_mac

P, R = Phase, Role
#: What a handshake that ran out of time was waiting for, per phase (its SessionTimeout says it).
_AWAITED = {P.AWAIT_WELCOME: "it sent no WELCOME after our HELLO",
            P.SENDING_SESSION: "this host was still opening the session",
            P.AWAIT_SESSION_ACK: "it sent no SESSION_ACK after our SESSION"}


class SourceSession(Session):
    """The source's side of one migration stream."""

    ROLE = R.SOURCE

    def __init__(self, migration_id: str, guest: wire.GuestSpec, transport_mode: str, status: MigrationPhase,
                 now: float, *, timeouts: Timeouts | None = None, resolve_port: int = 0,
                 connections: int = 1) -> None:
        super().__init__(status, timeouts or Timeouts(), now, P.CONNECTING)
        self._hello = wire.Hello(migration_id, guest, transport_mode, resolve_port=resolve_port,
                                 connections=connections)
        self._welcome: wire.Welcome | None = None
        self._ping_token = 0
        self._ping_sent_at: float | None = None
        self._paused_at: float | None = None
        self._bitmap_digest: bytes | None = None
        self.capabilities: tuple[str, ...] = ()  # agreed on WELCOME

    def hello(self, now: float) -> wire.Hello:
        """The first message."""
        self._transition(Local.HELLO_SENT, now)
        self.handshake_deadline = now + self.timeouts.handshake_s  # from the connection, not construction
        self.transcript.absorb(self._hello)
        return self._hello

    def _on_welcome(self, msg: wire.Welcome, now: float) -> wire.Welcome:
        if msg.version != wire.PROTOCOL_VERSION:
            raise PeerProtocolError(f"protocol version mismatch: the destination speaks migd protocol {msg.version}, "
                                    f"this source {wire.PROTOCOL_VERSION}; run the same migd release on both hosts")
        hello = self._hello
        self.capabilities = agree(hello.capabilities, msg.capabilities, hello.transport_mode, hello.guest.policy)
        # A destination that does not speak "lanes" reads HELLO's conns as nothing: one connection.
        self.chain.resize(hello.connections if "lanes" in self.capabilities else 1)
        self._transition(wire.Welcome, now)
        self.transcript.absorb(msg)
        self._welcome = msg
        return msg  # the driver runs SEND_START with its PDH certificate and nonce

    def session(self, pdh_cert: bytes, session_blob: bytes, policy: int, handoff_key: bytes, now: float) -> wire.Session:
        """SEND_START's result as the SESSION message, with the source's proof of the keys."""
        self._require(Local.SESSION_SENT)
        self._key = handoff_key
        msg = self._signed(wire.Session(pdh_cert, session_blob, policy))
        self._abort_context = self.transcript.digest()
        self._transition(Local.SESSION_SENT, now)
        return msg

    def _on_session_ack(self, msg: wire.SessionAck, now: float) -> None:
        self._verify(msg)  # key confirmation: nothing is sent to a destination that cannot pass it
        self.transcript.absorb(msg)
        self._join_context = self.transcript.digest()
        self._transition(wire.SessionAck, now)

    def join(self, lane: int) -> wire.Join:
        """JOIN for further connection ``lane`` (after SESSION_ACK): this migration's, MACed."""
        if self.phase is not P.PRECOPY:
            raise LocalProtocolError(f"JOIN in phase {self.phase.value}")
        if not 1 <= lane < self.connections:
            raise LocalProtocolError(f"connection {lane} of {self.connections}")
        msg = wire.Join(self._hello.migration_id, lane)
        return wire.Join(msg.migration_id, lane, self._join_mac(msg, R.SOURCE))

    def check_joined(self, msg: wire.Joined, lane: int) -> None:
        """The destination's JOINED on connection ``lane``: its proof that it holds the key.

        AuthenticationError if the MAC does not verify; PeerProtocolError for another lane.
        """
        if msg.lane != lane:
            raise PeerProtocolError(f"JOINED for connection {msg.lane} on connection {lane}")
        if self._key is None or self._join_context is None:
            raise LocalProtocolError("JOINED before the session is established")
        verify_mac(self._key, R.DESTINATION.value, self._join_context, msg, msg.mac)
        self._joined.add(lane)

    def page_sent(self, kind: PageKind, gpa: int, npages: int, header: bytes | memoryview = b"", lane: int = 0) -> None:
        """One page frame written on connection ``lane`` (in its order); ``header`` of a private run."""
        if self.phase not in PAGE_PHASES[R.SOURCE]:
            raise LocalProtocolError(f"a page frame in phase {self.phase.value}")
        if lane and lane not in self._joined:
            raise LocalProtocolError(f"a page frame on connection {lane} before its JOINED")
        self.chain.lane(lane).add(kind, gpa, npages, header)

    def round_end(self, round_: int, dirty_pages: int) -> wire.RoundEnd:
        """ROUND_END, with the frames each further connection carried so far (its barrier)."""
        return wire.RoundEnd(round_, dirty_pages, self.chain.further_frames())

    def ping(self, now: float) -> wire.Ping:
        """Ask the destination to confirm every earlier frame is placed (on every connection)."""
        if self.phase is not P.PRECOPY:
            raise LocalProtocolError(f"PING in phase {self.phase.value}")
        self._ping_token = (self._ping_token + 1) & 0xFFFFFFFF
        self._ping_sent_at = now
        return wire.Ping(self._ping_token, self.chain.further_frames())

    def _on_pong(self, msg: wire.Pong, now: float) -> float:
        if self._ping_sent_at is None or msg.token != self._ping_token:
            raise PeerProtocolError(f"PONG {msg.token} answers no PING of ours (sent {self._ping_token})")
        self._transition(wire.Pong, now)
        waited, self._ping_sent_at = now - self._ping_sent_at, None
        return waited  # seconds the destination took to catch up

    def msr_dropped(self, now: float) -> None:
        """The guest's migration-control MSR is not READY: blackout (nothing may be sent)."""
        self._transition(Local.MSR_DROPPED, now)

    def msr_ready(self, now: float) -> None:
        """READY again: pre-copy goes on (the dirty log re-sends what changed)."""
        self._transition(Local.MSR_READY, now)

    def paused(self, now: float) -> None:
        """The guest is paused for the switch-over (MSR READY at the pause)."""
        self._paused_at = now
        self._transition(Local.PAUSED, now)

    def bitmap_sent(self, payload: bytes | memoryview) -> None:
        """The final shared-page bitmap as sent (its digest goes into PREPARE)."""
        self._bitmap_digest = hashlib.sha256(payload).digest()

    def prepare(self, vcpu: wire.VcpuState, transport_seq: int, now: float) -> wire.Prepare:
        """PREPARE, binding the end of the stream: counts, the frame chain, the digests."""
        self._require(Local.PREPARE_SENT)
        if self._bitmap_digest is None:
            raise LocalProtocolError("PREPARE before the shared-page bitmap was sent")
        pages = self.chain.pages
        msg = self._signed(wire.Prepare(
            sum(pages.values()), self.chain.frames, pages[PageKind.PRIVATE], pages[PageKind.SHARED],
            pages[PageKind.ZERO], transport_seq, self.chain.digest(), self._bitmap_digest, vcpu_digest(vcpu),
            lanes=self.chain.further_frames(),
        ))
        self._transition(Local.PREPARE_SENT, now)
        return msg

    def _on_prepared(self, msg: wire.Prepared, now: float) -> int:
        self._verify(msg)
        self.transcript.absorb(msg)
        self._transition(wire.Prepared, now)
        return msg.pages_received  # the driver writes the commit record, then calls commit()

    def commit(self, now: float) -> wire.Commit:
        """The commit point (after the durable commit record): COMMIT, authenticated."""
        self._require(Local.COMMIT_SENT)
        msg = self._signed(wire.Commit())
        self._transition(Local.COMMIT_SENT, now)
        return msg

    def _on_started(self, msg: wire.Started, now: float) -> None:
        self._verify(msg)
        self.transcript.absorb(msg)
        self._transition(wire.Started, now)

    def cancel(self, now: float) -> None:
        """The operator cancels (before the commit only)."""
        self._transition(Local.CANCEL, now, error="cancelled by the operator")

    def _abort_received(self, msg: wire.Abort, now: float) -> Any:
        if self.phase is P.AWAIT_STARTED:
            # Committed: the guest is the destination's whatever it says; never resumed here.
            self._transition(wire.Abort, now, error=f"committed, but the destination reported: "
                                                    f"{printable(msg.reason)}")
            raise PeerAborted(printable(msg.reason))
        return super()._abort_received(msg, now)

    def _deadline_step(self) -> tuple[str, float, str] | None:
        t, phase = self.timeouts, self.phase
        if phase in (P.AWAIT_WELCOME, P.SENDING_SESSION, P.AWAIT_SESSION_ACK):
            return ("handshake", self.handshake_deadline,
                    f"the destination did not complete the handshake within {t.handshake_s:g} s ({phase.value}): "
                    f"{_AWAITED[phase]}; is that port its migration.listen, and is it overloaded? "
                    f"(the limit is migration.handshake_timeout_s)")
        if phase is P.PRECOPY:
            return ("stall", self.last_activity + t.stall_s,
                    f"the destination took nothing for {t.stall_s:g} s during pre-copy: the link stalled or the "
                    f"destination stopped reading; see its log (the limit is migration.stall_timeout_s)")
        if phase is P.BLACKOUT:
            return ("blackout", self.entered_at + t.blackout_s,
                    f"the guest did not re-enable migration (MSR READY) within {t.blackout_s:g} s after it dropped")
        if phase in (P.STOP_COPY, P.AWAIT_PREPARED):
            # The guest is paused: a stall here is downtime, bounded by the limit plus a margin.
            bound = t.downtime_limit_s + t.stop_copy_margin_s
            if phase is P.AWAIT_PREPARED:
                return ("stop-copy", self.last_activity + bound,
                        f"no PREPARED from the destination within {bound:g} s of the end of stop-and-copy: it did "
                        f"not confirm the guest it received; see its log (the guest resumes here)")
            return ("stop-copy", self.last_activity + bound,
                    f"the destination took nothing for {bound:g} s during stop-and-copy: the link stalled or the "
                    f"destination stopped reading; see its log (the guest resumes here)")
        if phase is P.AWAIT_STARTED:
            return ("started", self.entered_at + t.handoff_s,
                    f"no STARTED from the destination within {t.handoff_s:g} s of COMMIT")
        return None

    _HANDLERS = {
        wire.Welcome: _on_welcome, wire.SessionAck: _on_session_ack, wire.Pong: _on_pong,
        wire.Prepared: _on_prepared, wire.Started: _on_started,
    }
