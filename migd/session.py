"""The migration session, sans-I/O: which message is legal when, what is authenticated, and when.

One object per connection and role (``SourceSession`` in :mod:`migd.source_session`,
``DestinationSession`` in :mod:`migd.dest_session`, on the :class:`Session` here). It
takes decoded messages and local events with ``now`` and returns what to send and what
happened; it never touches a socket, the firmware or the journal (h11's ``Connection``,
aioquic's ``QuicConnection``). ``migd/source.py`` and ``migd/dest.py`` drive it.

Everything that changes a session's phase is one table, :data:`TRANSITIONS`, keyed by
(role, phase, event) where the event is a received message type or a :class:`Local` event
(h11's ``_state.py``). A message the table does not list for the current phase is a
:class:`PeerProtocolError`, raised in one place (:meth:`Session._transition`); calling the
session out of order is a :class:`LocalProtocolError`. The phase maps onto the REST status
(``setup``, ``active``, ...) through :data:`STATUS`, and the session is the only code that
advances a migration's :class:`~migd.migration_state.MigrationPhase`.

Deadlines are the session's too (aioquic's ``get_timer`` / ``handle_timer``): the driver asks
:meth:`Session.deadline`, waits at most until then, and calls :meth:`Session.handle_timer`,
which raises :class:`SessionTimeout` naming the step once it has really passed. Progress on
the link (:meth:`Session.activity`) moves the stall deadlines.

Authentication (docs/protocol.md "Authentication"): the destination sends a fresh nonce in
WELCOME; both firmwares derive the hand-off key from the session and that nonce; SESSION
proves the source holds it, SESSION_ACK proves the destination unwrapped the session (key
confirmation) before any page is sent; PREPARE binds the end of the stream (counts, the chain
of page frames, the transport sequence, digests of the bitmap and vCPU state); PREPARED,
COMMIT and STARTED are MACed over the whole transcript.
"""

from __future__ import annotations

import abc
import enum
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

from migd import wire
from migd.abi import GuestPolicy
from migd.errors import MigdError, PeerAborted, PeerProtocolError
from migd.inflight import InFlight
from migd.migration_state import MigrationPhase, MigrationStatus
from migd.page_runs import PageKind
from migd.peer_text import printable
from migd.session_auth import Transcript, compute_mac, verify_mac

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
    JOINING = "joining"  # not a migration: a further connection of one (JOIN), handed to its session
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
    (R.DESTINATION, P.AWAIT_HELLO, wire.Join): P.JOINING,
    (R.DESTINATION, P.JOINING, Local.ANSWERED): P.CLOSED,
    (R.DESTINATION, P.JOINING, Local.FAIL): P.CLOSED,
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
                            P.ACCEPTING, P.AWAIT_SESSION, P.OPENING_SESSION, P.RESOLVING, P.JOINING, P.CLOSED)},
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
        for name in ("handshake_s", "stall_s", "blackout_s", "handoff_s", "stop_copy_margin_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"Timeouts.{name} must be > 0, got {getattr(self, name)!r}")
        # A downtime limit of a few nanoseconds is a limit too (it underflows to 0 s here).
        if not self.downtime_limit_s >= 0:
            raise ValueError(f"Timeouts.downtime_limit_s must be >= 0, got {self.downtime_limit_s!r}")


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


class LaneChains:
    """One :class:`StreamChain` per connection of a migration (lane 0: the first connection).

    Each connection's page frames keep their order (one thread per lane adds to its chain);
    connections relative to each other have none. PREPARE binds each lane's chain: its digest
    over one lane is that lane's chain, exactly as before lanes existed; over several it is
    SHA-256 of the lanes' digests in lane order.
    """

    def __init__(self, lanes: int = 1) -> None:
        self.lanes = [StreamChain() for _ in range(lanes)]

    def resize(self, lanes: int) -> None:
        """Set the number of lanes (before any page frame)."""
        if any(chain.frames for chain in self.lanes):
            raise LocalProtocolError("the connections of a migration are fixed once pages flow")
        self.lanes = [StreamChain() for _ in range(lanes)]

    def lane(self, index: int) -> StreamChain:
        """Lane ``index``'s chain (PeerProtocolError: no such connection in this migration)."""
        if not 0 <= index < len(self.lanes):
            raise PeerProtocolError(f"connection {index} is not one of this migration's {len(self.lanes)}")
        return self.lanes[index]

    @property
    def frames(self) -> int:
        return sum(chain.frames for chain in self.lanes)

    @property
    def pages(self) -> dict[PageKind, int]:
        return {kind: sum(chain.pages[kind] for chain in self.lanes) for kind in PageKind}

    def further_frames(self) -> tuple[int, ...]:
        """Frames of each further connection (lanes 1..): what PING, ROUND_END and PREPARE carry."""
        return tuple(chain.frames for chain in self.lanes[1:])

    def digest(self) -> bytes:
        if len(self.lanes) == 1:
            return self.lanes[0].digest()
        return hashlib.sha256(b"migd-lanes-v1" + b"".join(chain.digest() for chain in self.lanes)).digest()


def required_capabilities(transport_mode: str, policy: int) -> frozenset[str]:
    """What a migration of this guest needs both ends to speak (the rest is optional)."""
    needed = {"zero-runs", "bound-transport" if transport_mode == "bound" else "sev-compat-transport"}
    if policy & GuestPolicy.ES:
        needed.add("vmsa")  # the vCPU state travels as a VMSA transport packet
    return frozenset(needed)


def agree(ours: tuple[str, ...], theirs: tuple[str, ...], transport_mode: str, policy: int) -> tuple[str, ...]:
    """The capabilities both ends speak; PeerProtocolError if this migration needs one the peer lacks."""
    agreed = wire.negotiate(ours, theirs)
    missing = sorted(required_capabilities(transport_mode, policy) - set(agreed))
    if missing:
        raise PeerProtocolError(f"the peer does not speak {', '.join(missing)}, which this migration needs "
                                f"(it speaks: {printable(', '.join(theirs))})")
    return agreed


def vcpu_digest(msg: wire.VcpuState) -> bytes:
    """What PREPARE binds of the vCPU state frame."""
    return hashlib.sha256((msg.header or b"") + bytes(msg.payload)).digest()


class Session(abc.ABC):
    """What both roles share: the table walk, the transcript, the MACs, the deadlines.

    The roles: :class:`migd.source_session.SourceSession`, :class:`migd.dest_session.DestinationSession`.
    """

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
        self.chain = LaneChains()
        self._key: bytes | None = None
        #: What ABORT MACs cover: the transcript as the session got its keys, not its latest
        #: state, so an ABORT verifies whether or not the peer had seen our last message.
        self._abort_context = b""
        self._peer_role = R.DESTINATION if self.ROLE is R.SOURCE else R.SOURCE
        #: Page frames being placed (one per connection at most) against the phase leaving PAGE_PHASES.
        self._placing = InFlight()
        #: What JOIN and JOINED MACs cover: the transcript as of SESSION_ACK (set by each role then).
        self._join_context: bytes | None = None
        self._joined: set[int] = set()

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
        # A step of the protocol is progress: a stall deadline counts from the last one, not
        # from before, say, a long blackout in which nothing was meant to move.
        self.last_activity = max(self.last_activity, now)
        if self.phase in PAGE_PHASES[self.ROLE] and new not in PAGE_PHASES[self.ROLE]:
            # Leaving the page phase waits for the frames being placed (page_frame): once the phase
            # says "no more pages", no page frame is between its check and guest RAM.
            with self._placing.exclusive():
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

    @property
    def connections(self) -> int:
        """How many connections this migration's pages are striped over."""
        return len(self.chain.lanes)

    def _join_mac(self, msg: wire.Join | wire.Joined, role: Role) -> bytes:
        if self._key is None or self._join_context is None:
            raise LocalProtocolError(f"{msg.TYPE.name} before the session is established")
        return compute_mac(self._key, role.value, self._join_context, msg)

    def _check_lane(self, lane: int) -> None:
        if not 1 <= lane < self.connections:
            raise PeerProtocolError(f"connection {lane} is not a further connection of this migration "
                                    f"({self.connections} in all)")

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

    @abc.abstractmethod
    def _deadline_step(self) -> tuple[str, float, str] | None:
        """(step, deadline, message) of what this role waits for in its phase; None: no wait on the peer."""
