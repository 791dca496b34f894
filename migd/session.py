"""The migration session, sans-I/O: which message is legal when, what is authenticated, and when.

One object per connection and role (:class:`SourceSession`, :class:`DestinationSession`). It
takes decoded messages and local events with ``now`` and returns what to send and what
happened; it never touches a socket, the firmware or the journal (h11's ``Connection``,
aioquic's ``QuicConnection``). ``migd/source.py`` and ``migd/dest.py`` drive it.

Everything that changes a session's phase is one table, :data:`TRANSITIONS`, keyed by
(role, phase, event) where the event is a received message type or a :class:`Local` event
(h11's ``_state.py``). A message the table does not list for the current phase is a
:class:`PeerProtocolError`, raised in one place (:meth:`_Session._transition`); calling the
session out of order is a :class:`LocalProtocolError`. The phase maps onto the REST status
(``setup``, ``active``, ...) through :data:`STATUS`, and the session is the only code that
advances a migration's :class:`~migd.migration_state.MigrationPhase`.

Deadlines are the session's too (aioquic's ``get_timer`` / ``handle_timer``): the driver asks
:meth:`_Session.deadline`, waits at most until then, and calls :meth:`_Session.handle_timer`,
which raises :class:`SessionTimeout` naming the step once it has really passed. Progress on
the link (:meth:`_Session.activity`) moves the stall deadlines.

Authentication (docs/protocol.md "Authentication"): the destination sends a fresh nonce in
WELCOME; both firmwares derive the hand-off key from the session and that nonce; SESSION
proves the source holds it, SESSION_ACK proves the destination unwrapped the session (key
confirmation) before any page is sent; PREPARE binds the end of the stream (counts, the chain
of page frames, the transport sequence, digests of the bitmap and vCPU state); PREPARED,
COMMIT and STARTED are MACed over the whole transcript.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Union

from migd import wire
from migd.errors import MigdError, PeerAborted, PeerProtocolError
from migd.migration_state import MigrationPhase, MigrationStatus
from migd.page_runs import PageKind
from migd.peer_text import printable
from migd.session_auth import AuthenticationError, Transcript, compute_mac, new_nonce, verify_mac

S = MigrationStatus


class LocalProtocolError(MigdError):
    """This side drove the session out of order (a bug here, not the peer's doing)."""


class SessionTimeout(MigdError, TimeoutError):
    """A session deadline passed; ``step`` names what was being waited for."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


class Role(str, enum.Enum):
    SOURCE = "source"
    DESTINATION = "destination"


class Phase(enum.Enum):
    """Where one side of the protocol is (finer than the REST status, see :data:`STATUS`)."""

    # source
    CONNECTING = "connecting"  # HELLO not sent yet
    AWAIT_WELCOME = "await-welcome"
    SENDING_SESSION = "sending-session"  # WELCOME in; SEND_START and SESSION are the driver's next step
    AWAIT_SESSION_ACK = "await-session-ack"
    PRECOPY = "precopy"
    BLACKOUT = "blackout"  # the guest's MSR dropped: nothing may be sent
    STOP_COPY = "stop-copy"  # guest paused, last pages
    AWAIT_PREPARED = "await-prepared"
    COMMITTING = "committing"  # PREPARED verified: the driver writes the commit record, then COMMIT
    AWAIT_STARTED = "await-started"  # committed
    # destination
    AWAIT_HELLO = "await-hello"
    ACCEPTING = "accepting"  # HELLO in: the driver checks it can take the guest
    AWAIT_SESSION = "await-session"
    OPENING_SESSION = "opening-session"  # SESSION in: RECEIVE_START, then the MAC is checked
    RECEIVING = "receiving"
    AWAIT_PREPARE = "await-prepare"  # the vCPU state came: no page may follow
    VERIFYING = "verifying"  # PREPARE checked out: RECEIVE_FINISH, bitmap, the agent
    PREPARED = "prepared"  # PREPARED sent: in doubt until COMMIT (or an authenticated ABORT)
    IN_DOUBT = "in-doubt"  # the stream is gone after PREPARED: only the source can say (RESOLVE)
    COMMITTED = "committed"
    RESOLVING = "resolving"  # not a migration: a RESOLVE question on this connection
    CLOSED = "closed"  # the RESOLVE question answered or refused
    # both
    ABORTING = "aborting"  # the peer's ABORT came: this side cleans up, then fail() makes it FAILED
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


class Local(enum.Enum):
    """Events of this side (the driver's steps) that move the session."""

    HELLO_SENT = "hello-sent"
    SESSION_SENT = "session-sent"
    MSR_DROPPED = "msr-dropped"
    MSR_READY = "msr-ready"
    PAUSED = "paused"
    PREPARE_SENT = "prepare-sent"
    COMMIT_SENT = "commit-sent"
    WELCOME_SENT = "welcome-sent"
    SESSION_ACCEPTED = "session-accepted"
    PREPARED_SENT = "prepared-sent"
    STREAM_LOST = "stream-lost"  # after PREPARED: in doubt
    RESOLVED_COMMITTED = "resolved-committed"
    STARTED_SENT = "started-sent"
    ANSWERED = "answered"
    FAIL = "fail"
    CANCEL = "cancel"


P, R = Phase, Role
Event = Union[type, Local]

_SOURCE_LIVE = (P.AWAIT_WELCOME, P.SENDING_SESSION, P.AWAIT_SESSION_ACK, P.PRECOPY, P.BLACKOUT, P.STOP_COPY,
                P.AWAIT_PREPARED, P.COMMITTING)
_DEST_LIVE = (P.AWAIT_HELLO, P.ACCEPTING, P.AWAIT_SESSION, P.OPENING_SESSION, P.RECEIVING, P.AWAIT_PREPARE,
              P.VERIFYING)

#: Every phase change of every session: (role, phase, event) → next phase. Nothing else moves a phase.
TRANSITIONS: dict[tuple[Role, Phase, Event], Phase] = {
    (R.SOURCE, P.CONNECTING, Local.HELLO_SENT): P.AWAIT_WELCOME,
    (R.SOURCE, P.AWAIT_WELCOME, wire.Welcome): P.SENDING_SESSION,
    (R.SOURCE, P.SENDING_SESSION, Local.SESSION_SENT): P.AWAIT_SESSION_ACK,
    (R.SOURCE, P.AWAIT_SESSION_ACK, wire.SessionAck): P.PRECOPY,
    (R.SOURCE, P.PRECOPY, wire.Pong): P.PRECOPY,
    (R.SOURCE, P.PRECOPY, Local.MSR_DROPPED): P.BLACKOUT,
    (R.SOURCE, P.BLACKOUT, Local.MSR_READY): P.PRECOPY,
    (R.SOURCE, P.PRECOPY, Local.PAUSED): P.STOP_COPY,
    (R.SOURCE, P.STOP_COPY, Local.PREPARE_SENT): P.AWAIT_PREPARED,
    (R.SOURCE, P.AWAIT_PREPARED, wire.Prepared): P.COMMITTING,
    (R.SOURCE, P.COMMITTING, Local.COMMIT_SENT): P.AWAIT_STARTED,
    (R.SOURCE, P.AWAIT_STARTED, wire.Started): P.COMPLETED,
    # After the commit the guest is the destination's whatever it says: an ABORT or a failure
    # here completes the migration with an error, the guest is never resumed on the source.
    (R.SOURCE, P.AWAIT_STARTED, wire.Abort): P.COMPLETED,
    (R.SOURCE, P.AWAIT_STARTED, Local.FAIL): P.COMPLETED,
    (R.SOURCE, P.CONNECTING, Local.FAIL): P.FAILED,
    (R.SOURCE, P.CONNECTING, Local.CANCEL): P.CANCELLED,
    **{(R.SOURCE, phase, wire.Abort): P.ABORTING for phase in _SOURCE_LIVE},
    (R.SOURCE, P.ABORTING, Local.FAIL): P.FAILED,
    (R.SOURCE, P.ABORTING, Local.CANCEL): P.CANCELLED,
    **{(R.SOURCE, phase, Local.FAIL): P.FAILED for phase in _SOURCE_LIVE},
    **{(R.SOURCE, phase, Local.CANCEL): P.CANCELLED for phase in _SOURCE_LIVE},

    (R.DESTINATION, P.AWAIT_HELLO, wire.Hello): P.ACCEPTING,
    (R.DESTINATION, P.AWAIT_HELLO, wire.Resolve): P.RESOLVING,
    (R.DESTINATION, P.RESOLVING, Local.ANSWERED): P.CLOSED,
    (R.DESTINATION, P.RESOLVING, Local.FAIL): P.CLOSED,
    (R.DESTINATION, P.ACCEPTING, Local.WELCOME_SENT): P.AWAIT_SESSION,
    (R.DESTINATION, P.AWAIT_SESSION, wire.Session): P.OPENING_SESSION,
    (R.DESTINATION, P.OPENING_SESSION, Local.SESSION_ACCEPTED): P.RECEIVING,
    (R.DESTINATION, P.RECEIVING, wire.RoundEnd): P.RECEIVING,
    (R.DESTINATION, P.RECEIVING, wire.Ping): P.RECEIVING,
    (R.DESTINATION, P.RECEIVING, wire.SharedBitmap): P.RECEIVING,
    (R.DESTINATION, P.RECEIVING, wire.VcpuState): P.AWAIT_PREPARE,
    (R.DESTINATION, P.AWAIT_PREPARE, wire.Prepare): P.VERIFYING,
    (R.DESTINATION, P.VERIFYING, Local.PREPARED_SENT): P.PREPARED,
    (R.DESTINATION, P.PREPARED, wire.Commit): P.COMMITTED,
    # Only an authenticated ABORT ends a prepared migration (the handler checks its MAC);
    # anything else that ends the stream leaves it in doubt.
    (R.DESTINATION, P.PREPARED, wire.Abort): P.ABORTING,
    (R.DESTINATION, P.PREPARED, Local.STREAM_LOST): P.IN_DOUBT,
    (R.DESTINATION, P.IN_DOUBT, Local.RESOLVED_COMMITTED): P.COMMITTED,
    (R.DESTINATION, P.IN_DOUBT, Local.FAIL): P.FAILED,
    (R.DESTINATION, P.COMMITTED, Local.STARTED_SENT): P.COMPLETED,
    (R.DESTINATION, P.COMMITTED, Local.FAIL): P.COMPLETED,
    **{(R.DESTINATION, phase, wire.Abort): P.ABORTING for phase in _DEST_LIVE},
    (R.DESTINATION, P.ABORTING, Local.FAIL): P.FAILED,
    **{(R.DESTINATION, phase, Local.FAIL): P.FAILED for phase in _DEST_LIVE},
}

#: Page frames are legal only here (checked by :meth:`DestinationSession.page_received`).
PAGE_PHASES: dict[Role, frozenset[Phase]] = {
    R.SOURCE: frozenset({P.PRECOPY, P.STOP_COPY}),
    R.DESTINATION: frozenset({P.RECEIVING}),
}

#: The REST status of each phase. ABORTING has none: the status stays until the driver has cleaned
#: up (resumed the guest, removed a partial one) and says so with ``fail()``, so that nobody sees
#: "failed" while a half-received guest is still on disk.
STATUS: dict[Phase, MigrationStatus] = {
    **{p: S.SETUP for p in (P.CONNECTING, P.AWAIT_WELCOME, P.SENDING_SESSION, P.AWAIT_SESSION_ACK, P.AWAIT_HELLO,
                            P.ACCEPTING, P.AWAIT_SESSION, P.OPENING_SESSION, P.RESOLVING, P.CLOSED)},
    P.PRECOPY: S.ACTIVE, P.BLACKOUT: S.BLACKOUT, P.RECEIVING: S.ACTIVE, P.AWAIT_PREPARE: S.ACTIVE,
    P.VERIFYING: S.ACTIVE,
    **{p: S.STOP_COPY for p in (P.STOP_COPY, P.AWAIT_PREPARED, P.COMMITTING, P.AWAIT_STARTED, P.PREPARED,
                                P.IN_DOUBT, P.COMMITTED)},
    P.COMPLETED: S.COMPLETED, P.FAILED: S.FAILED, P.CANCELLED: S.CANCELLED,
}

#: Phases that the hand-off's commit point has been passed in (never FAILED after these).
_COMMITTED = frozenset({P.AWAIT_STARTED, P.COMMITTED})
_FINAL = frozenset({P.COMPLETED, P.FAILED, P.CANCELLED, P.CLOSED})

_FRAME = struct.Struct(">BQI")  # page frame type, gpa, npages: one link of the stream chain
_KIND_OF = {wire.PrivatePages: PageKind.PRIVATE, wire.SharedPages: PageKind.SHARED, wire.ZeroPages: PageKind.ZERO}
_TYPE_OF = {PageKind.PRIVATE: wire.FrameType.PRIVATE_PAGES, PageKind.SHARED: wire.FrameType.SHARED_PAGES,
            PageKind.ZERO: wire.FrameType.ZERO_PAGES}


@dataclass(frozen=True)
class Timeouts:
    """How long a session waits for the peer, per step (seconds)."""

    handshake_s: float = 15.0  # connection to an authenticated session
    stall_s: float = 30.0  # no byte moved on the link while pages flow
    blackout_s: float = 30.0  # the guest's MSR not READY
    handoff_s: float = 120.0  # PREPARED after PREPARE (source), COMMIT after PREPARED (destination), STARTED
    stop_copy_margin_s: float = 10.0  # stop-copy stalls end after the downtime limit plus this
    downtime_limit_s: float = 0.3

    def __post_init__(self) -> None:
        for name in ("handshake_s", "stall_s", "blackout_s", "handoff_s", "stop_copy_margin_s", "downtime_limit_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Timeouts.{name} must be > 0, got {getattr(self, name)!r}")


class StreamChain:
    """The order and placement of every page frame, chained: what PREPARE binds of the stream.

    Kept by both ends from the frames' (type, gpa, npages), one hash update per frame (not per
    page). A frame dropped, injected, moved or reordered — shared and zero runs included, which
    the SEV transport does not cover — changes the chain or the counts.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256(b"migd-stream-v1")
        self.frames = 0
        self.pages = {k: 0 for k in PageKind}

    def add(self, kind: PageKind, gpa: int, npages: int, header: bytes | memoryview = b"") -> None:
        """One page frame, in stream order; ``header``: a private run's SEV packet header.

        The header carries the packet's IV and MAC, unique per packet: with it the chain also
        tells an older packet of the same run from the newest (a rollback), which ``sev-compat``
        packets, whose MAC binds no sequence, cannot.
        """
        self._hash.update(_FRAME.pack(_TYPE_OF[kind], gpa, npages))
        if header:
            self._hash.update(header)
        self.frames += 1
        self.pages[kind] += npages

    def digest(self) -> bytes:
        return self._hash.copy().digest()


def vcpu_digest(msg: wire.VcpuState) -> bytes:
    """What PREPARE binds of the vCPU state frame."""
    return hashlib.sha256((msg.header or b"") + bytes(msg.payload)).digest()


class _Session:
    """What both roles share: the table walk, the transcript, the MACs, the deadlines."""

    ROLE: Role
    _HANDLERS: dict[type, Callable[..., Any]]

    def __init__(self, status: MigrationPhase, timeouts: Timeouts, now: float, first: Phase) -> None:
        self.status = status
        self.timeouts = timeouts
        self.phase = first
        self.entered_at = now
        self.last_activity = now
        self.handshake_deadline = now + timeouts.handshake_s
        self.transcript = Transcript()
        self.chain = StreamChain()
        self._key: bytes | None = None
        #: What ABORT MACs cover: the transcript as the session got its keys, not its latest
        #: state, so an ABORT verifies whether or not the peer had seen our last message.
        self._abort_context = b""
        self._peer_role = R.DESTINATION if self.ROLE is R.SOURCE else R.SOURCE
        self._pages_lock = threading.Lock()

    # -- the table
    def _transition(self, event: Event, now: float, error: str | None = None) -> Phase:
        """Move by the table; the only place a phase (and the REST status) changes."""
        key = (self.ROLE, self.phase, event)
        if key not in TRANSITIONS:
            name = event.__name__ if isinstance(event, type) else event.value
            if isinstance(event, type):
                raise PeerProtocolError(f"{self.ROLE.value} in phase {self.phase.value}: unexpected {name} from the peer")
            raise LocalProtocolError(f"{self.ROLE.value} in phase {self.phase.value}: {name} is not a step from here")
        new = TRANSITIONS[key]
        if self.phase in PAGE_PHASES[self.ROLE] and new not in PAGE_PHASES[self.ROLE]:
            # Leaving the page phase waits for a frame being placed (page_frame): once the phase
            # says "no more pages", no page frame is between its check and guest RAM.
            with self._pages_lock:
                self.phase, self.entered_at = new, now
        else:
            self.phase, self.entered_at = new, now
        status = STATUS.get(new, self.status.status)
        if new in _COMMITTED and not self.status.committed:
            self.status.commit()
        if status is not self.status.status:
            self.status.advance(status, now, error=error)
        elif error is not None:
            self.status.error = error
        return new

    def _require(self, event: Local) -> None:
        """Check a local step is legal now, before any of its work (a MAC, the transcript) is done."""
        if (self.ROLE, self.phase, event) not in TRANSITIONS:
            raise LocalProtocolError(f"{self.ROLE.value} in phase {self.phase.value}: {event.value} is not a step from here")

    def receive(self, msg: wire.Message, now: float) -> Any:
        """Take one control message from the peer; returns the handler's result (see each role)."""
        self.activity(now)
        if isinstance(msg, wire.Abort):
            return self._abort_received(msg, now)
        key = (self.ROLE, self.phase, type(msg))
        if key not in TRANSITIONS:
            self._transition(type(msg), now)  # raises PeerProtocolError
        return self._HANDLERS[type(msg)](self, msg, now)

    def _abort_received(self, msg: wire.Abort, now: float) -> Any:
        reason = f"{self._peer_role.value} aborted: {printable(msg.reason)}"
        self._transition(wire.Abort, now, error=reason)
        raise PeerAborted(printable(msg.reason))

    # -- authentication
    @property
    def authenticated(self) -> bool:
        return self._key is not None

    def _mac(self, msg: wire.Message) -> bytes:
        assert self._key is not None
        return compute_mac(self._key, self.ROLE.value, self.transcript.digest(), msg)

    def _verify(self, msg: wire.Message) -> None:
        if self._key is None:
            raise LocalProtocolError(f"{msg.TYPE.name} cannot be verified before the session has keys")
        verify_mac(self._key, self._peer_role.value, self.transcript.digest(), msg, getattr(msg, "mac", None))

    def _signed(self, msg: Any) -> Any:
        """``msg`` with its MAC at this point of the transcript, absorbed into it."""
        signed = type(msg)(**{**msg.__dict__, "mac": self._mac(msg)})
        self.transcript.absorb(signed)
        return signed

    def abort(self, reason: str) -> wire.Abort:
        """An ABORT to send; MACed once the session has keys, so the peer knows it is ours."""
        msg = wire.Abort(reason[:1024])
        if self._key is None:
            return msg
        return wire.Abort(msg.reason, compute_mac(self._key, self.ROLE.value, self._abort_context, msg))

    # -- local ends
    def fail(self, reason: str, now: float) -> None:
        """This side ends the migration (before the commit: failed; after it: completed with the error)."""
        if self.phase not in _FINAL:
            self._transition(Local.FAIL, now, error=reason)

    @property
    def finished(self) -> bool:
        return self.phase in _FINAL

    @property
    def committed(self) -> bool:
        return self.status.committed

    # -- deadlines
    def activity(self, now: float) -> None:
        """Something moved on the link (bytes sent or received): stall deadlines start again."""
        self.last_activity = max(self.last_activity, now)

    def deadline(self) -> float | None:
        """When :meth:`handle_timer` must be called at the latest (None: no wait on the peer)."""
        step = self._deadline_step()
        return None if step is None else step[1]

    def time_left(self, now: float) -> float:
        """Seconds until the deadline (at least a millisecond; long when there is none)."""
        deadline = self.deadline()
        return 3600.0 if deadline is None else max(0.001, deadline - now)

    def handle_timer(self, now: float) -> None:
        """Raise :class:`SessionTimeout` if the current deadline has passed."""
        step = self._deadline_step()
        if step is not None and now >= step[1]:
            raise SessionTimeout(step[0], step[2])

    def _deadline_step(self) -> tuple[str, float, str] | None:
        raise NotImplementedError  # each role defines its waits


class SourceSession(_Session):
    """The source's side of one migration stream."""

    ROLE = R.SOURCE

    def __init__(self, migration_id: str, guest: wire.GuestSpec, transport_mode: str, status: MigrationPhase,
                 now: float, *, timeouts: Timeouts | None = None, resolve_port: int = 0) -> None:
        super().__init__(status, timeouts or Timeouts(), now, P.CONNECTING)
        self._hello = wire.Hello(migration_id, guest, transport_mode, resolve_port=resolve_port)
        self._welcome: wire.Welcome | None = None
        self._ping_token = 0
        self._ping_sent_at: float | None = None
        self._paused_at: float | None = None
        self._bitmap_digest: bytes | None = None

    def hello(self, now: float) -> wire.Hello:
        """The first message."""
        self._transition(Local.HELLO_SENT, now)
        self.handshake_deadline = now + self.timeouts.handshake_s  # from the connection, not construction
        self.transcript.absorb(self._hello)
        return self._hello

    def _on_welcome(self, msg: wire.Welcome, now: float) -> wire.Welcome:
        if msg.version != wire.PROTOCOL_VERSION:
            raise PeerProtocolError(f"destination speaks protocol {msg.version}, we speak {wire.PROTOCOL_VERSION}")
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
        self._transition(wire.SessionAck, now)

    def page_sent(self, kind: PageKind, gpa: int, npages: int, header: bytes | memoryview = b"") -> None:
        """One page frame written (stream order); ``header`` of a private run."""
        if self.phase not in PAGE_PHASES[R.SOURCE]:
            raise LocalProtocolError(f"a page frame in phase {self.phase.value}")
        self.chain.add(kind, gpa, npages, header)

    def ping(self, now: float) -> wire.Ping:
        """Ask the destination to confirm every earlier frame is placed."""
        if self.phase is not P.PRECOPY:
            raise LocalProtocolError(f"PING in phase {self.phase.value}")
        self._ping_token = (self._ping_token + 1) & 0xFFFFFFFF
        self._ping_sent_at = now
        return wire.Ping(self._ping_token)

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
                    f"the destination did not complete the handshake within {t.handshake_s:g} s ({phase.value})")
        if phase is P.PRECOPY:
            return ("stall", self.last_activity + t.stall_s,
                    f"the destination took nothing for {t.stall_s:g} s (link stalled or peer stopped reading)")
        if phase is P.BLACKOUT:
            return ("blackout", self.entered_at + t.blackout_s,
                    f"the guest did not re-enable migration (MSR READY) within {t.blackout_s:g} s after it dropped")
        if phase in (P.STOP_COPY, P.AWAIT_PREPARED):
            # The guest is paused: a stall here is downtime, bounded by the limit plus a margin.
            bound = t.downtime_limit_s + t.stop_copy_margin_s
            return ("stop-copy", self.last_activity + bound,
                    f"the destination made no progress for {bound:g} s in stop-and-copy ({phase.value})")
        if phase is P.AWAIT_STARTED:
            return ("started", self.entered_at + t.handoff_s,
                    f"no STARTED from the destination within {t.handoff_s:g} s of COMMIT")
        return None

    _HANDLERS = {
        wire.Welcome: _on_welcome, wire.SessionAck: _on_session_ack, wire.Pong: _on_pong,
        wire.Prepared: _on_prepared, wire.Started: _on_started,
    }


@dataclass(frozen=True)
class PrepareChecked:
    """PREPARE verified: the destination holds exactly what the source sent."""

    pages: int


class DestinationSession(_Session):
    """The destination's side of one connection to the migration listener."""

    ROLE = R.DESTINATION

    def __init__(self, status: MigrationPhase, now: float, *, timeouts: Timeouts | None = None,
                 nonce: bytes | None = None) -> None:
        super().__init__(status, timeouts or Timeouts(), now, P.AWAIT_HELLO)
        self.nonce = new_nonce() if nonce is None else nonce
        self.hello_msg: wire.Hello | None = None
        self.session_msg: wire.Session | None = None
        self._bitmap_digest: bytes | None = None
        self._vcpu_digest: bytes | None = None

    @classmethod
    def restored_in_doubt(cls, status: MigrationPhase, now: float) -> DestinationSession:
        """The session of a migration reloaded from the journal as prepared without a commit record.

        A restarted daemon (migd.recovery) has no stream and no keys for it: only RESOLVE's
        answer moves it on (``resolved_committed`` then ``fail``: kept, or ``fail``: removed).
        """
        if status.status is not MigrationStatus.STOP_COPY or status.committed:
            raise LocalProtocolError(f"a restored migration in {status.status.value} is not in doubt")
        session = cls(status, now)
        session.phase = P.IN_DOUBT  # where the journal left it: entered, not a transition
        return session

    def _on_hello(self, msg: wire.Hello, now: float) -> wire.Hello:
        self._transition(wire.Hello, now)
        self.transcript.absorb(msg)
        self.hello_msg = msg
        return msg  # the driver decides whether this host can take the guest

    def _on_resolve(self, msg: wire.Resolve, now: float) -> wire.Resolve:
        self._transition(wire.Resolve, now)
        return msg  # the driver looks the migration up and answers (or not)

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
        self._transition(Local.SESSION_ACCEPTED, now)
        return ack

    @contextlib.contextmanager
    def page_frame(self, msg: wire.PrivatePages | wire.SharedPages | wire.ZeroPages) -> Iterator[PageKind]:
        """Admit one page frame and hold the page phase open while the driver places it.

        The page worker runs beside the event loop: without this, a frame checked just before
        the loop handled VCPU_STATE and PREPARE could reach guest RAM after PREPARE was verified.
        """
        with self._pages_lock:
            yield self.page_received(msg)

    def page_received(self, msg: wire.PrivatePages | wire.SharedPages | wire.ZeroPages) -> PageKind:
        """One page frame, in stream order: checked against the phase, added to the chain."""
        if self.phase not in PAGE_PHASES[R.DESTINATION]:
            raise PeerProtocolError(f"{msg.TYPE.name} frame in phase {self.phase.value}")
        kind = _KIND_OF[type(msg)]
        self.chain.add(kind, msg.gpa, msg.npages, msg.header if isinstance(msg, wire.PrivatePages) else b"")
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
        wire.Hello: _on_hello, wire.Resolve: _on_resolve, wire.Session: _on_session, wire.RoundEnd: _on_round_end,
        wire.Ping: _on_ping, wire.SharedBitmap: _on_bitmap, wire.VcpuState: _on_vcpu, wire.Prepare: _on_prepare,
        wire.Commit: _on_commit,
    }
