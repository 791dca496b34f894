"""The migration session machines without sockets (migd/session.py).

A pair helper (h11's ``ConnectionPair``, aioquic's ``client_and_server``) pipes each side's
messages through the real wire codec into the other, with an explicit clock. The firmwares'
part (SEND_START / RECEIVE_START deriving the hand-off key) is played by the transport's own
key derivation, so a side "without the PDH private key" is one that derives another key.
"""

from __future__ import annotations

import ast
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migd import wire
from migd.abi import PAGE_SIZE, GuestPolicy
from migd.errors import PeerAborted
from migd.migration_state import MigrationPhase, MigrationStatus
from migd.page_runs import PageKind
from migd.dest_session import DestinationSession
from migd.errors import PeerProtocolError
from migd.session import (
    PAGE_PHASES, TRANSITIONS, Local, LocalProtocolError, Phase, Role, SessionTimeout, Timeouts, agree,
)
from migd.source_session import SourceSession
from migd.session_auth import AuthenticationError
from migd.sev_transport import derive_handoff_key, new_session_keys

GUEST = wire.GuestSpec("g1", 256, 0)
T0 = 1000.0
HEADER = bytes(range(52))  # a private run's SEV packet header (its IV and MAC are what differ per packet)


def _wire(msg: wire.Message, encoder: wire.FrameEncoder, decoder: wire.FrameDecoder) -> wire.Message:
    """One message through the codec, as the peer would decode it."""
    (out,) = decoder.feed(encoder.encode_bytes(msg))
    return out


@dataclass
class Pair:
    """A source and a destination session joined by the codec, driven step by step."""

    now: float = T0
    source: SourceSession = field(init=False)
    dest: DestinationSession = field(init=False)
    keys: object = field(default_factory=new_session_keys)
    blob_nonce: bytes = field(default_factory=lambda: os.urandom(16))
    dest_key: bytes | None = None  # None: the destination derives the real key
    sent: list[wire.Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.source = SourceSession("m1", GUEST, "bound", MigrationPhase(started_at=self.now), self.now,
                                    timeouts=Timeouts(downtime_limit_s=0.3))
        self.dest = DestinationSession(MigrationPhase(started_at=self.now), self.now)
        self._down = (wire.FrameEncoder(), wire.FrameDecoder())
        self._up = (wire.FrameEncoder(), wire.FrameDecoder())

    def to_dest(self, msg: wire.Message) -> object:
        self.sent.append(msg)
        return self.dest.receive(_wire(msg, *self._down), self.now)

    def to_source(self, msg: wire.Message) -> object:
        return self.source.receive(_wire(msg, *self._up), self.now)

    def key_for(self, nonce: bytes) -> bytes:
        return derive_handoff_key(self.keys, self.blob_nonce, nonce)  # type: ignore[arg-type]

    # -- the protocol, one step at a time (STEPS below)
    def hello(self) -> None:
        self.to_dest(self.source.hello(self.now))

    def welcome(self) -> None:
        welcome = self.dest.welcome(b"PDH", self.now)
        self.to_source(welcome)

    def session(self) -> None:
        key = self.key_for(self.dest.nonce)
        self.to_dest(self.source.session(b"SRC-PDH", self.blob_nonce + bytes(112), 0, key, self.now))

    def accept(self) -> None:
        key = self.dest_key or self.key_for(self.dest.nonce)
        self.to_source(self.dest.accept_session(key, self.now))

    def pages(self) -> None:
        for kind, gpa, n in ((PageKind.PRIVATE, 0, 4), (PageKind.SHARED, 4 * PAGE_SIZE, 2),
                             (PageKind.ZERO, 6 * PAGE_SIZE, 10)):
            header = HEADER if kind is PageKind.PRIVATE else b""
            self.source.page_sent(kind, gpa, n, header)
            payload = bytes(n * PAGE_SIZE)
            msg: wire.Message = {PageKind.PRIVATE: lambda: wire.PrivatePages(gpa, n, HEADER, payload),
                                 PageKind.SHARED: lambda: wire.SharedPages(gpa, n, payload),
                                 PageKind.ZERO: lambda: wire.ZeroPages(gpa, n)}[kind]()
            self.dest.page_received(_wire(msg, *self._down))  # type: ignore[arg-type]
        self.to_dest(wire.RoundEnd(0, 0))

    def ping(self) -> None:
        pong = self.to_dest(self.source.ping(self.now))
        self.to_source(pong)  # type: ignore[arg-type]

    def pause(self) -> None:
        self.source.paused(self.now)

    def final(self) -> None:
        bitmap = b"bitmap-bytes"
        self.source.bitmap_sent(bitmap)
        self.to_dest(wire.SharedBitmap(bitmap))
        self.vcpu = wire.VcpuState(0, None, b"vcpu-state")
        self.to_dest(self.vcpu)

    def prepare(self) -> None:
        prepare = self.source.prepare(self.vcpu, 1, self.now)
        got = self.to_dest(prepare)
        self.dest.check_prepare(got, 1)  # type: ignore[arg-type]

    def prepared(self) -> None:
        self.to_source(self.dest.prepared(16, self.now))

    def commit(self) -> None:
        self.to_dest(self.source.commit(self.now))

    def started(self) -> None:
        self.to_source(self.dest.started(self.now))


STEPS: list[Callable[[Pair], None]] = [Pair.hello, Pair.welcome, Pair.session, Pair.accept, Pair.pages, Pair.ping,
                                       Pair.pause, Pair.final, Pair.prepare, Pair.prepared, Pair.commit, Pair.started]


def pair_after(nsteps: int) -> Pair:
    pair = Pair()
    for step in STEPS[:nsteps]:
        step(pair)
    return pair


def test_a_whole_migration_goes_through_every_phase_to_completed() -> None:
    pair = pair_after(len(STEPS))
    assert pair.source.phase is Phase.COMPLETED and pair.dest.phase is Phase.COMPLETED
    assert pair.source.status.status is MigrationStatus.COMPLETED and pair.source.status.committed
    assert pair.dest.status.status is MigrationStatus.COMPLETED and pair.dest.status.committed
    assert pair.source.transcript.digest() == pair.dest.transcript.digest()


def test_statuses_follow_the_phases() -> None:
    seen = {Role.SOURCE: [], Role.DESTINATION: []}
    pair = Pair()
    pair.source.status.listeners.append(seen[Role.SOURCE].append)
    pair.dest.status.listeners.append(seen[Role.DESTINATION].append)
    for step in STEPS:
        step(pair)
    S = MigrationStatus
    assert seen[Role.SOURCE] == [S.ACTIVE, S.STOP_COPY, S.COMPLETED]
    assert seen[Role.DESTINATION] == [S.ACTIVE, S.STOP_COPY, S.COMPLETED]


# ---------------------------------------------------------------- the table


def _sample(kind: type) -> wire.Message:
    samples: dict[type, wire.Message] = {
        wire.Hello: wire.Hello("m9", GUEST, "bound"), wire.Welcome: wire.Welcome(b"pdh", nonce=bytes(32)),
        wire.Session: wire.Session(b"pdh", bytes(128), 0), wire.SessionAck: wire.SessionAck(),
        wire.RoundEnd: wire.RoundEnd(0, 0), wire.SharedBitmap: wire.SharedBitmap(b"x"),
        wire.VcpuState: wire.VcpuState(0, None, b"s"), wire.Prepare: wire.Prepare(1), wire.Prepared: wire.Prepared(1),
        wire.Commit: wire.Commit(), wire.Started: wire.Started(), wire.Ping: wire.Ping(1), wire.Pong: wire.Pong(1),
        wire.Resolve: wire.Resolve("m1"), wire.Resolved: wire.Resolved("m1", "aborted"),
    }
    return samples[kind]


CONTROL = [wire.Hello, wire.Welcome, wire.Session, wire.SessionAck, wire.RoundEnd, wire.SharedBitmap, wire.VcpuState,
           wire.Prepare, wire.Prepared, wire.Commit, wire.Started, wire.Ping, wire.Pong, wire.Resolve, wire.Resolved]


@pytest.mark.parametrize("nsteps", range(len(STEPS) + 1))
def test_every_message_outside_the_table_is_refused_in_every_phase(nsteps: int) -> None:
    """Each side, in the phase it reached after ``nsteps`` steps: a message type the table does
    not list there is a PeerProtocolError and leaves the phase where it was."""
    checked = 0
    for role in Role:
        for kind in CONTROL:
            pair = pair_after(nsteps)
            session = pair.source if role is Role.SOURCE else pair.dest
            phase = session.phase
            if (role, phase, kind) in TRANSITIONS:
                continue
            with pytest.raises(PeerProtocolError):
                session.receive(_sample(kind), pair.now)
            assert session.phase is phase
            checked += 1
    assert checked > 10  # the negative control of the loop itself: it did refuse things


@pytest.mark.parametrize("nsteps", [0, 4, 8, 10, 11])
def test_page_frames_outside_the_page_phases_are_refused(nsteps: int) -> None:
    pair = pair_after(nsteps)
    frame = wire.ZeroPages(0, 1)
    if pair.dest.phase in PAGE_PHASES[Role.DESTINATION]:
        assert pair.dest.page_received(frame) is PageKind.ZERO  # the control: legal there
    else:
        with pytest.raises(PeerProtocolError):
            pair.dest.page_received(frame)


def test_leaving_the_page_phase_waits_for_a_frame_being_placed() -> None:
    """The page worker runs beside the loop: a frame admitted just before VCPU_STATE is handled
    must reach guest RAM before the phase closes, never after PREPARE was verified."""
    pair = pair_after(5)
    frame = wire.ZeroPages(0, 1)
    admitted, release = threading.Event(), threading.Event()

    def worker() -> None:
        with pair.dest.page_frame(frame):
            admitted.set()
            release.wait(5)  # the placement, in progress

    placing = threading.Thread(target=worker)
    placing.start()
    assert admitted.wait(5)
    closing = threading.Thread(target=lambda: pair.dest.receive(wire.VcpuState(0, None, b"s"), pair.now))
    closing.start()
    closing.join(0.3)
    assert closing.is_alive() and pair.dest.phase is Phase.RECEIVING  # waits for the frame
    release.set()
    placing.join(5)
    closing.join(5)
    assert pair.dest.phase is Phase.AWAIT_PREPARE
    with pytest.raises(PeerProtocolError):
        with pair.dest.page_frame(frame):
            pass


def test_our_own_misuse_is_a_local_error_not_the_peers() -> None:
    pair = pair_after(0)
    with pytest.raises(LocalProtocolError):
        pair.source.commit(pair.now)  # no COMMIT before PREPARED
    with pytest.raises(LocalProtocolError):
        pair.source.ping(pair.now)
    pair = pair_after(4)
    with pytest.raises(LocalProtocolError):
        pair.source.page_sent(PageKind.ZERO, 0, 1) or pair.source.msr_ready(pair.now)  # not in blackout


def test_only_the_session_changes_phases() -> None:
    """No module but the session's (migd/session.py and its roles) assigns a phase or advances/commits a status."""
    root = Path(__file__).resolve().parents[1] / "migd"
    offenders = []
    for path in sorted(root.glob("*.py")):
        if path.name in ("session.py", "source_session.py", "dest_session.py", "save_session.py", "migration_state.py"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("advance", "commit") and "phase" in ast.unparse(node.func.value):
                offenders.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    text = ast.unparse(target)
                    if text.endswith((".phase", "phase.status", "phase.committed")):
                        offenders.append(f"{path.name}:{node.lineno}: {text} = ...")
    assert offenders == []


def test_the_phase_scan_catches_an_assignment(tmp_path: Path) -> None:
    """Negative control of the scan above: the same rules flag a driver that sets a phase."""
    code = "def f(progress, s):\n    progress.phase.advance(1, 0)\n    s.phase = 3\n"
    tree = ast.parse(code)
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
             and n.func.attr == "advance" and "phase" in ast.unparse(n.func.value)]
    assigns = [n for n in ast.walk(tree) if isinstance(n, ast.Assign)
               and ast.unparse(n.targets[0]).endswith(".phase")]
    assert len(calls) == 1 and len(assigns) == 1


# ---------------------------------------------------------------- authentication


def test_a_session_replayed_into_another_connection_fails_its_mac() -> None:
    """The SESSION recorded from one connection, offered to another (another destination nonce)."""
    recorded = pair_after(3)
    offered = recorded.sent[-1]
    assert isinstance(offered, wire.Session)
    fresh = Pair(keys=recorded.keys, blob_nonce=recorded.blob_nonce)  # the same blob unwraps the same way
    fresh.hello()
    fresh.dest.welcome(b"PDH", fresh.now)
    fresh.to_dest(offered)
    with pytest.raises(AuthenticationError):
        fresh.dest.accept_session(fresh.key_for(fresh.dest.nonce), fresh.now)
    assert fresh.dest.phase is Phase.OPENING_SESSION and not fresh.dest.authenticated
    # Control: in its own connection the same SESSION verifies.
    recorded.accept()
    assert recorded.dest.phase is Phase.RECEIVING


def test_a_destination_without_the_key_cannot_confirm_it() -> None:
    """A fake destination (only the public PDH certificate: it derives some other key)."""
    pair = pair_after(3)
    pair.dest_key = os.urandom(32)
    with pytest.raises(AuthenticationError):
        pair.dest.accept_session(pair.dest_key, pair.now)  # it cannot even check the source
    # It answers SESSION_ACK anyway, MACed with what it has: the source refuses before any page.
    forged = wire.SessionAck(os.urandom(32))
    with pytest.raises(AuthenticationError):
        pair.to_source(forged)
    assert pair.source.phase is Phase.AWAIT_SESSION_ACK
    with pytest.raises(LocalProtocolError):
        pair.source.page_sent(PageKind.PRIVATE, 0, 1)


def test_a_dropped_last_frame_fails_prepare() -> None:
    pair = pair_after(7)
    pair.source.page_sent(PageKind.PRIVATE, 100 * PAGE_SIZE, 1)  # sent, then dropped by an attacker
    pair.final()
    prepare = pair.source.prepare(pair.vcpu, 1, pair.now)
    got = pair.to_dest(prepare)  # the PREPARE itself is authentic
    with pytest.raises(PeerProtocolError, match="frames sent 4, received 3"):
        pair.dest.check_prepare(got, 1)  # type: ignore[arg-type]


def test_a_moved_frame_fails_prepare_even_with_equal_counts() -> None:
    pair = pair_after(4)
    pair.source.page_sent(PageKind.SHARED, 0, 1)
    pair.dest.page_received(wire.SharedPages(PAGE_SIZE, 1, bytes(PAGE_SIZE)))  # placed one page further
    pair.ping()
    pair.pause()
    pair.final()
    got = pair.to_dest(pair.source.prepare(pair.vcpu, 0, pair.now))
    with pytest.raises(PeerProtocolError, match="order or placement"):
        pair.dest.check_prepare(got, 0)  # type: ignore[arg-type]


def test_an_older_packet_of_the_same_run_fails_prepare() -> None:
    """A rollback: the run arrives as an earlier packet of the same gpa and size (authentic in
    ``sev-compat``, whose MAC binds no sequence); the packet header in the chain tells them apart."""
    pair = pair_after(4)
    newest, older = bytes(52), bytes(range(1, 53))
    pair.source.page_sent(PageKind.PRIVATE, 0, 1, newest)
    pair.dest.page_received(wire.PrivatePages(0, 1, older, bytes(PAGE_SIZE)))
    for step in STEPS[5:8]:
        step(pair)
    got = pair.to_dest(pair.source.prepare(pair.vcpu, 1, pair.now))
    with pytest.raises(PeerProtocolError, match="order or placement"):
        pair.dest.check_prepare(got, 1)  # type: ignore[arg-type]


def test_a_prepare_with_a_forged_mac_is_refused() -> None:
    pair = pair_after(8)
    honest = pair.source.prepare(pair.vcpu, 1, pair.now)
    forged = wire.Prepare(**{**honest.__dict__, "frames": honest.frames - 1})  # hides a dropped frame
    with pytest.raises(AuthenticationError):
        pair.to_dest(forged)


def test_only_an_authenticated_abort_ends_a_prepared_migration() -> None:
    pair = pair_after(10)
    with pytest.raises(AuthenticationError):
        pair.to_dest(wire.Abort("forged"))  # no MAC: a peer without the keys
    with pytest.raises(AuthenticationError):
        pair.to_dest(wire.Abort("forged", os.urandom(32)))
    assert pair.dest.phase is Phase.PREPARED
    with pytest.raises(PeerAborted):
        pair.to_dest(pair.source.abort("the source gave up"))  # control: the source's own
    # The status waits for the driver's clean-up (the prepared guest removed), then fails.
    assert pair.dest.phase is Phase.ABORTING and pair.dest.status.status is MigrationStatus.STOP_COPY
    pair.dest.fail("source aborted", pair.now)
    assert pair.dest.phase is Phase.FAILED and pair.dest.status.status is MigrationStatus.FAILED
    assert not pair.dest.committed


def test_commit_and_started_must_verify() -> None:
    pair = pair_after(10)
    with pytest.raises(AuthenticationError):
        pair.to_dest(wire.Commit(os.urandom(32)))
    assert pair.dest.phase is Phase.PREPARED and not pair.dest.committed
    pair.commit()
    with pytest.raises(AuthenticationError):
        pair.to_source(wire.Started(os.urandom(32)))
    assert pair.source.phase is Phase.AWAIT_STARTED


# ---------------------------------------------------------------- deadlines


def test_handshake_deadline() -> None:
    pair = pair_after(1)
    assert pair.source.deadline() == T0 + Timeouts().handshake_s
    pair.source.handle_timer(T0 + 1)  # not yet
    with pytest.raises(SessionTimeout) as caught:
        pair.source.handle_timer(T0 + Timeouts().handshake_s)
    assert caught.value.step == "handshake"


def test_stall_deadline_moves_with_activity_and_stop_copy_follows_the_downtime_limit() -> None:
    pair = pair_after(4)
    stall = Timeouts().stall_s
    pair.source.activity(T0 + 20)
    pair.source.handle_timer(T0 + stall + 1)  # activity at +20 moved it
    with pytest.raises(SessionTimeout, match="took nothing"):
        pair.source.handle_timer(T0 + 20 + stall)
    pair.source.paused(T0 + 21)
    pair.source.activity(T0 + 21)
    bound = 0.3 + Timeouts().stop_copy_margin_s
    assert pair.source.deadline() == pytest.approx(T0 + 21 + bound)
    with pytest.raises(SessionTimeout) as caught:
        pair.source.handle_timer(T0 + 21 + bound)
    assert caught.value.step == "stop-copy"


def test_a_long_blackout_does_not_count_as_a_stall() -> None:
    """Pre-copy resumes after 25 s of blackout (nothing was to be sent): the link's stall clock
    starts again there, or the first wait after it (the switch-over's PING) would fail at once."""
    pair = pair_after(4)
    pair.source.activity(T0)
    pair.source.msr_dropped(T0 + 1)
    pair.source.msr_ready(T0 + 26)
    pair.source.handle_timer(T0 + 32)  # 31 s after the last byte, 6 s after pre-copy resumed
    assert pair.source.deadline() == T0 + 26 + Timeouts().stall_s


def test_blackout_deadline() -> None:
    pair = pair_after(4)
    pair.source.msr_dropped(T0 + 5)
    assert pair.source.status.status is MigrationStatus.BLACKOUT
    with pytest.raises(SessionTimeout, match="MSR READY"):
        pair.source.handle_timer(T0 + 5 + Timeouts().blackout_s)
    pair.source.msr_ready(T0 + 6)
    assert pair.source.status.status is MigrationStatus.ACTIVE


# ---------------------------------------------------------------- random sequences


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(CONTROL) + 1), max_size=12), st.integers(0, len(STEPS)))
def test_random_messages_are_taken_by_the_table_or_refused_cleanly(picks: list[int], nsteps: int) -> None:
    """Illegal and legal messages in any order: the table decides; nothing else can happen."""
    pair = pair_after(nsteps)
    for role_session in (pair.dest, pair.source):
        for pick in picks:
            before = role_session.phase
            msg = wire.Abort("x") if pick >= len(CONTROL) else _sample(CONTROL[pick])
            try:
                role_session.receive(msg, pair.now)
            except (PeerProtocolError, PeerAborted):
                pass
            after = role_session.phase
            assert after is before or (role_session.ROLE, before, type(msg)) in TRANSITIONS
            if after is not before:
                assert TRANSITIONS[(role_session.ROLE, before, type(msg))] is after


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["pages", "ping", "drop"]), max_size=6))
def test_random_legal_runs_complete(precopy: list[str]) -> None:
    pair = pair_after(4)
    for step in precopy:
        if step == "pages":
            pair.pages()
        elif step == "ping":
            pair.ping()
        else:
            pair.source.msr_dropped(pair.now)
            pair.source.msr_ready(pair.now)
    for step in STEPS[6:]:
        step(pair)
    assert pair.source.phase is Phase.COMPLETED and pair.dest.phase is Phase.COMPLETED


def test_local_events_are_all_in_the_table() -> None:
    used = {event for (_, _, event) in TRANSITIONS if isinstance(event, Local)}
    assert used == set(Local)


# ---------------------------------------------------------------- capabilities


def test_both_ends_agree_on_the_same_capabilities() -> None:
    pair = pair_after(2)
    assert pair.source.capabilities == pair.dest.capabilities == tuple(sorted(wire.CAPABILITIES))


@pytest.mark.parametrize(("theirs", "policy", "missing"), [
    (("bound-transport", "vmsa"), 0, "zero-runs"),
    (("zero-runs", "sev-compat-transport"), 0, "bound-transport"),
    (("zero-runs", "bound-transport"), GuestPolicy.ES, "vmsa"),
])
def test_a_peer_without_what_the_migration_needs_is_refused(theirs: tuple[str, ...], policy: int,
                                                            missing: str) -> None:
    with pytest.raises(PeerProtocolError, match=missing):
        agree(wire.CAPABILITIES, theirs, "bound", policy)
    # Control: what it lacks is optional for another guest or mode, or everything is there.
    assert agree(wire.CAPABILITIES, wire.CAPABILITIES, "bound", policy)


def test_a_welcome_without_a_needed_capability_stops_the_source() -> None:
    pair = pair_after(1)
    welcome = wire.Welcome(b"PDH", capabilities=("bound-transport",), nonce=bytes(32))
    with pytest.raises(PeerProtocolError, match="zero-runs"):
        pair.to_source(welcome)
    assert pair.source.phase is Phase.AWAIT_WELCOME
