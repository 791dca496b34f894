"""The hand-off against an adversary: replay, hijack, truncation, a fake destination.

The adversaries (the security issue "The hand-off holds against an adversary"):

* a **host operator** who records the migration stream (on a mutual-TLS link: its plaintext,
  which the operator of the source host can read in its own daemon) and replays it later,
  also over mutual TLS with its own host's certificate;
* a **network peer without credentials** who can reach a migration listener (plain TCP) and
  send it frames, or sit on the path and recompute the unkeyed CRC32 of what it forwards;
* a peer holding only **another host's public PDH certificate**, posing as that host.

Each case asserts the *safe outcome* — what may not happen to the guest or to a host's records
— never an error message, so it holds for whatever way the engines refuse. Before the hand-off
had freshness and key confirmation every case here failed (the attack worked): that run, the
negative control, is in build/attacks-on-old-code.txt. Replays, hijacks and unauthenticated
HELLOs go to real ``migd serve`` daemons (their REST view and journal are what the operator
sees); the truncation and the fake destination drive in-process engines, whose guests can be
self-checked on the spot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from faultproxy import (
    Direction,
    DropFrame,
    DropLastFrameBefore,
    FaultProxy,
    FaultRecord,
    FrameSelector,
    HoldBeforeFrame,
    ReplayReport,
    replay,
    rewrite_meta,
)
from migd import wire
from migd.platform import identity
from migd.guest.channel import CheckReport
from migd.errors import ProtocolError
from migd.guest.host_guest import GuestState
from migd.host import Host
from migd.journal import JOURNAL_FILE
from migd.listener import MigrationListener
from migd.migration_state import MigrationStatus
from migd.platform.pki_verify import tls_client_context, tls_server_context
from migd.sev_transport import TransportMode
from migd.source import MigrationParams, OutgoingMigration
from migd.wire import FrameType
from migd.guest.workload import WorkloadConfig

from .hosts import closing, make_host, running_guest
from .serve_process import ServeProcess, runtime_dir


S = MigrationStatus
F = FrameType
UP, DOWN = Direction.UPSTREAM, Direction.DOWNSTREAM
pytestmark = pytest.mark.timeout(120)

MEMORY_MIB = 16
NPAGES = MEMORY_MIB * 256
#: REST workload of the daemons' guests: writes and conversions while migrating.
WORKLOAD = {"dirty_rate_mib_s": 4, "convert_rate_hz": 5, "seed": 1}
#: Short engine timeouts for the in-process cases: a refusal ends them in seconds.
PARAMS = MigrationParams(handshake_timeout_s=3.0, handoff_timeout_s=5.0)
FINISHED = ("completed", "failed", "cancelled")
#: What a destination's migration record is, for "unchanged" (the volatile counters left out).
RECORD_KEYS = ("id", "guest", "role", "status", "destination", "error")


# ---------------------------------------------------------------------- helpers: daemons


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., ServeProcess]]:
    """``daemon("hostB", tls=True)`` starts a ``migd serve``; every one started (restarts
    included) is stopped at the end."""
    started: list[ServeProcess] = []

    def start(name: str, **kw: Any) -> ServeProcess:
        started.append(ServeProcess.start(tmp_path, name, wait=False, **kw))
        started[-1].wait_healthy()  # a daemon that never gets healthy is still stopped below
        return started[-1]

    try:
        yield start
    finally:
        for proc in reversed(started):
            proc.stop()


def boot_guest(host: ServeProcess, name: str = "g1") -> None:
    status, body = host.request("POST", "/v1/guests", {"name": name, "memory_mib": MEMORY_MIB})
    assert status == 201, body
    status, body = host.request("POST", f"/v1/guests/{name}/start", {"workload": WORKLOAD})
    assert status == 200, body
    host.wait_for("GET", f"/v1/guests/{name}", lambda g: g["migration_control"]["ready"], timeout=20)


def start_migration(source: ServeProcess, destination: str) -> str:
    status, migration = source.request("POST", "/v1/guests/g1/migrate", {"destination": destination})
    assert status == 202, migration
    return str(migration["id"])


def finished(host: ServeProcess, mid: str, timeout: float = 60.0) -> dict[str, Any]:
    return host.wait_for("GET", f"/v1/migrations/{mid}", lambda m: m["status"] in FINISHED, timeout=timeout)


def guest_states(host: ServeProcess) -> dict[str, str]:
    status, body = host.request("GET", "/v1/guests")
    assert status == 200, body
    return {g["name"]: g["state"] for g in body["guests"]}


def migration_records(host: ServeProcess) -> dict[str, dict[str, Any]]:
    """Every migration the host lists, by id, as RECORD_KEYS."""
    status, body = host.request("GET", "/v1/migrations")
    assert status == 200, body
    return {m["id"]: {k: m.get(k) for k in RECORD_KEYS} for m in body["migrations"]}


def remove_guest(host: ServeProcess, name: str = "g1") -> None:
    """What an operator does to "delete the old record": stop the guest (if it runs) and delete it."""
    if name not in guest_states(host):
        return
    if guest_states(host).get(name) == "running":
        status, body = host.request("POST", f"/v1/guests/{name}/stop", {})
        assert status == 200, body
    status, body = host.request("DELETE", f"/v1/guests/{name}")
    assert status in (200, 204), body
    assert name not in guest_states(host)


def settle(host: ServeProcess, timeout: float = 30.0) -> None:
    """The host has finished with every migration and holds no half-received guest (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = host.request("GET", "/v1/migrations")
        busy = status != 200 or any(m["status"] not in FINISHED for m in body["migrations"])
        if not busy and "incoming" not in guest_states(host).values():
            return
        time.sleep(0.1)
    raise TimeoutError(f"{host.name} still busy: {host.request('GET', '/v1/migrations')[1]}")


def ram_files(tmp_path: Path, name: str, guest: str = "g1") -> list[Path]:
    """Where a daemon keeps a guest's RAM (RUNTIME_DIRECTORY/guests) or state: what exists of it."""
    places = [runtime_dir(tmp_path, name) / "guests" / guest, tmp_path / name / "guests" / guest]
    return [p for p in places if p.exists()]


def restart(start: Callable[..., ServeProcess], old: ServeProcess, **kw: Any) -> ServeProcess:
    """The same host again: same state directory, config and ports."""
    old.stop()
    return start(old.name, api_port=old.api_port, migration_port=old.migration_port, **kw)


class ProxyThread:
    """A :class:`FaultProxy` on its own event loop in a thread, for tests that drive daemons
    with blocking REST calls."""

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="attack-proxy", daemon=True)
        self._thread.start()
        self.port: int = self._call(proxy.start())

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _call(self, coro: Any, timeout: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self.proxy.release)

    def close(self) -> None:
        try:
            self._call(self.proxy.close())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()

    def __enter__(self) -> ProxyThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def no_problems(problems: list[str]) -> None:
    """Every violated safety property at once (an attack that works usually breaks several)."""
    assert not problems, "\n".join(["the attack worked:", *problems])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


# ---------------------------------------------------------------------- helpers: forged messages


def forge(cls: type[Any], **known: Any) -> Any:
    """A ``cls`` message from a peer without keys: ``known`` fields as given (those ``cls`` has),
    every other field without a default filled by its annotated type (int 0, str "", tuple (),
    dict {}, bool False), and every bytes field not given — default or not — random: a MAC, a
    nonce or a digest is what such a peer cannot compute, so it sends what it likes (a default
    of zeros could read as "no MAC" to a lenient receiver; random bytes are the honest attack).
    Built from ``dataclasses.fields``, so it survives messages gaining fields."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in known:
            values[f.name] = known[f.name]
            continue
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        if "bytes" in kind:
            values[f.name] = os.urandom(32)
        elif has_default:
            continue
        elif kind.startswith("int"):
            values[f.name] = 0
        elif kind.startswith("str"):
            values[f.name] = ""
        elif kind.startswith("tuple"):
            values[f.name] = ()
        elif kind.startswith("dict"):
            values[f.name] = {}
        elif kind.startswith("bool"):
            values[f.name] = False
        else:
            raise TypeError(f"forge: cannot fill {cls.__name__}.{f.name} of type {kind}")
    return cls(**values)


def attacker_hello(migration_id: str, guest: str) -> Any:
    """A HELLO as the source would send it, for a 16 MiB guest ``guest``."""
    spec = wire.GuestSpec(guest, NPAGES, 0)
    return forge(wire.Hello, migration_id=migration_id, guest=spec, transport_mode=TransportMode.BOUND.value,
                 version=wire.PROTOCOL_VERSION, capabilities=wire.CAPABILITIES, resolve_port=0)


async def send_hello(port: int, hello: Any, reply_timeout: float = 3.0) -> int | None:
    """Connect to a migration listener (plain TCP, no credentials), send ``hello``, read one
    reply frame and close; returns the reply's frame type (None: no reply)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(wire.encode_bytes(hello))
        await writer.drain()
        try:
            async with asyncio.timeout(reply_timeout):
                prefix = await reader.readexactly(5)
            return prefix[4]
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(2):
                await writer.wait_closed()


# ====================================================================== 1. replay


#: (how B stands at the replay, the replayed HELLO's migration id). A B whose journal was
#: wiped knows no id at all: there the recorded one is as good as a fresh one.
REPLAYS = [
    (variant, migration_id)
    for variant in ("plain-tcp", "mutual-tls", "after-restart")
    for migration_id in ("recorded-id", "fresh-id")
] + [("journal-wiped", "recorded-id")]


@pytest.mark.fault_class("attacker: replayed migration")
@pytest.mark.parametrize(("variant", "migration_id"), REPLAYS, ids=["-".join(r) for r in REPLAYS])
def test_a_replayed_migration_creates_no_second_copy(
    tmp_path: Path, daemon: Callable[..., ServeProcess], variant: str, migration_id: str
) -> None:
    """g1 migrates A → B through a recorder; B's operator deletes the arrived guest (stop +
    delete: no API deletes a migration record) and replays what A sent to B's listener. Safe:
    no g1 appears on B (not running, not listed, no RAM file), and B's migration list gains no
    completed destination migration of it.

    ``recorded-id`` replays the bytes as they were; ``fresh-id`` gives the replayed HELLO a new
    migration id (no key covers HELLO: the operator rewrites it and recomputes its CRC32), so
    that a destination which remembers the ids it has seen cannot stop the replay by that
    alone — only the session's freshness can. ``journal-wiped``: B's operator also deletes B's
    journal (its record of every migration and session it took) while B is down, so nothing B
    remembers can stop the replay either.

    Mutual TLS: the recorder terminates TLS (B's certificate towards A, A's towards B) to get
    the stream's plaintext — what the operator of A reads in its own daemon — and the replay
    opens its own mutual-TLS connection with A's certificate and key: TLS authenticates the
    host, not this migration, so it stops no replay by a host's operator. ``after-restart``: B's
    daemon restarts between the recording and the replay (freshness must not live in memory)."""
    tls = variant == "mutual-tls"
    a = daemon("hostA", tls=tls)
    b = daemon("hostB", tls=tls)
    boot_guest(a)
    ca = tmp_path / "ca" / identity.CA_CERT
    as_a = tls_client_context(ca, tmp_path / "hostA" / "host.pem", tmp_path / "hostA" / "host.key") if tls else None
    as_b = tls_server_context(ca, tmp_path / "hostB" / "host.pem", tmp_path / "hostB" / "host.key") if tls else None

    with ProxyThread(FaultProxy("127.0.0.1", b.migration_port, record=True, server_ssl=as_b, client_ssl=as_a)) as rec:
        mid = start_migration(a, rec.address)
        done = finished(a, mid)
    assert done["status"] == "completed", done
    (recording,) = rec.proxy.recordings
    sent, answered = recording.types(UP), recording.types(DOWN)  # a whole migration was recorded
    assert sent[0] == F.HELLO and {F.SESSION, F.PRIVATE_PAGES, F.PREPARE, F.COMMIT} <= set(sent), sent
    assert {F.WELCOME, F.SESSION_ACK, F.PREPARED, F.STARTED} <= set(answered), answered
    b.wait_for("GET", "/v1/guests/g1", lambda g: g["state"] == "running", timeout=30)

    if variant == "after-restart":
        b = restart(daemon, b, tls=tls)
    if variant == "journal-wiped":
        remove_guest(b)
        b.stop()
        for path in (tmp_path / "hostB").glob(JOURNAL_FILE + "*"):  # the database, its WAL and index
            path.unlink()
        b = restart(daemon, b)
    remove_guest(b)
    assert not ram_files(tmp_path, "hostB"), ram_files(tmp_path, "hostB")
    before = migration_records(b)

    if migration_id == "fresh-id":
        hello = recording.frames[0]
        assert hello.direction is UP and hello.type == F.HELLO, hello
        recording = recording.replacing(0, rewrite_meta(hello.data, 0, id=uuid.uuid4().hex[:16]))
    report = asyncio.run(replay(recording, "127.0.0.1", b.migration_port, ssl_context=as_a))
    assert report.sent[:1] == [F.HELLO], report.summary()  # the replay reached B's listener
    settle(b)
    no_problems(second_copy(tmp_path, b, before, report))


def second_copy(tmp_path: Path, b: ServeProcess, before: dict[str, dict[str, Any]], report: ReplayReport) -> list[str]:
    """What of a second, stale g1 the replay left on ``b``."""
    problems = []
    states = guest_states(b)
    if "g1" in states:
        problems.append(f"the replay created guest g1 on {b.name}: {states['g1']}")
    if files := ram_files(tmp_path, b.name):
        problems.append(f"g1's RAM/state left on {b.name}: {[str(f) for f in files]}")
    after = migration_records(b)
    gained = [m for mid, m in after.items() if before.get(mid) != m]
    completed = [m for m in gained if m["role"] == "destination" and m["guest"] == "g1" and m["status"] == "completed"]
    if completed:
        problems.append(f"{b.name} lists the replay as a completed incoming migration of g1: {completed}")
    if problems:
        problems.append(f"replay: {report.summary()}")
    return problems


# ====================================================================== 2. hijacked record


@pytest.mark.fault_class("attacker: hijacked migration record")
@pytest.mark.parametrize("when", ["in-hand-off", "after-completion"])
def test_a_hello_reusing_a_migration_id_changes_no_record(
    tmp_path: Path, daemon: Callable[..., ServeProcess], when: str
) -> None:
    """A network peer without credentials sends B's listener a HELLO that reuses the id of
    migration A → B of g1: while it is in its hand-off (B prepared, COMMIT held on the path) or
    once it completed. The HELLO names another guest (a HELLO for g1 is refused anyway: the name
    is taken on B). Safe: B's record of the real migration keeps its role, status, guest and
    peer; B's migration list gains and changes nothing (nothing unauthenticated creates state);
    the real migration ends with exactly one running copy of g1, clean."""
    a = daemon("hostA")
    b = daemon("hostB")
    boot_guest(a)
    hold = [HoldBeforeFrame(FrameSelector.of(F.COMMIT), seconds=60.0)] if when == "in-hand-off" else []
    with ProxyThread(FaultProxy("127.0.0.1", b.migration_port, hold)) as gate:
        mid = start_migration(a, gate.address)
        if hold:
            wait_until(lambda: bool(gate.proxy.fired("hold")), 30, "COMMIT held")
            # B has sent PREPARED (the source committed before COMMIT went out): B is prepared.
            b.wait_for("GET", f"/v1/migrations/{mid}", lambda m: m["status"] == "stop-copy", timeout=10)
        else:
            assert finished(a, mid)["status"] == "completed"
            settle(b)
        before = migration_records(b)
        assert before[mid]["role"] == "destination" and before[mid]["guest"] == "g1", before

        reply = asyncio.run(send_hello(b.migration_port, attacker_hello(mid, "g2")))
        # Give B time to act on the HELLO and on the attacker's close (both happen at once today).
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline and migration_records(b) == before:
            time.sleep(0.05)
        time.sleep(0.3)
        after = migration_records(b)

        gate.release()
        outcome = finished(a, mid)
        settle(b)

    problems = []
    if after.get(mid) != before[mid]:
        problems.append(f"B's record of migration {mid} changed after an unauthenticated HELLO (answered with "
                        f"frame type {reply}): {before[mid]} -> {after.get(mid)}")
    if gained := {k: v for k, v in after.items() if before.get(k) != v and k != mid}:
        problems.append(f"B's migration list gained or changed entries: {gained}")
    problems += one_running_copy(a, b, outcome)
    no_problems(problems)


def one_running_copy(a: ServeProcess, b: ServeProcess, outcome: dict[str, Any]) -> list[str]:
    """Exactly one running copy of g1, on the side the migration's outcome says, and clean."""
    on_a, on_b = guest_states(a).get("g1"), guest_states(b).get("g1")
    running = [host for host, state in (("A", on_a), ("B", on_b)) if state == "running"]
    where = "B" if outcome["status"] == "completed" else "A"
    if running != [where]:
        return [f"g1 runs on {running or 'no host'} (A: {on_a}, B: {on_b}), expected on {where} only: "
                f"the real migration ended {outcome['status']} ({outcome['error']})"]
    if where == "B":
        guest = b.wait_for("GET", "/v1/guests/g1", lambda g: g["check"]["pages_verified"] > 0, timeout=30)
        if guest["check"] != {"pages_verified": NPAGES, "errors": 0, "last_error": None}:
            return [f"g1's arrival self-check on B: {guest['check']}"]
    return []


# ====================================================================== 3. truncation


#: Mostly private memory (no conversions), written fast enough that the stop-and-copy round
#: always carries private runs.
PRIVATE_WRITER = WorkloadConfig(dirty_rate_mib_s=32, convert_rate_hz=0, seed=5)


async def _dest_settled(b: Host, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while any(not m.status.finished for m in b.migrations.values()) or any(
            g.state is GuestState.INCOMING for g in b.guests.values()
        ):
            await asyncio.sleep(0.02)


#: Attempts at a truncation that matters (see the test's docstring).
TRUNCATION_ATTEMPTS = 5


@dataclass
class Truncation:
    """One migration through the truncating attacker, and what became of it."""

    dropped: FaultRecord | None
    status: MigrationStatus
    committed: bool
    error: str | None
    source_state: GuestState
    source_check: CheckReport | None  # when the guest stayed on A
    arrival: CheckReport | None  # when it moved to B
    dest_guests: list[str]

    @property
    def conclusive(self) -> bool:
        """The run was dropped, and either refused or taken with stale pages."""
        harmless = self.status is S.COMPLETED and self.arrival is not None and self.arrival.errors == 0
        return self.dropped is not None and not harmless


async def _truncated_migration(root: Path) -> Truncation:
    a, b = make_host(root, "hostA"), make_host(root, "hostB")
    async with closing(a, b):
        listener = MigrationListener(b)
        port = await listener.start("127.0.0.1", 0)
        try:
            guest = await running_guest(a, memory_mib=MEMORY_MIB, workload=PRIVATE_WRITER)
            await asyncio.sleep(0.5)  # the workload has written: later rounds re-send private pages
            truncate = DropLastFrameBefore(frozenset({F.PRIVATE_PAGES}), F.SHARED_BITMAP)
            async with FaultProxy("127.0.0.1", port, [truncate], reseal=True) as proxy:
                progress = await asyncio.wait_for(OutgoingMigration(guest, "127.0.0.1", proxy.port, PARAMS).run(), 60)
                await _dest_settled(b)
            moved = progress.status is S.COMPLETED and "g1" in b.guests
            arrival = await b.get("g1").wait_check(60) if moved else None
            stayed = guest.state is GuestState.RUNNING
            source_check = await guest.check() if stayed else None
        finally:
            await listener.close()
        drops = proxy.fired("drop")
        return Truncation(drops[0] if drops else None, progress.status, progress.phase.committed, progress.phase.error,
                          guest.state, source_check, arrival, sorted(b.guests))


@pytest.mark.fault_class("attacker: truncated stream")
def test_a_truncated_stop_and_copy_round_is_noticed(tmp_path: Path) -> None:
    """An attacker on a plain-TCP path (it recomputes the unkeyed CRC32) drops the last
    PRIVATE_PAGES run of the stop-and-copy round, the one right before SHARED_BITMAP: no later
    private run's transport sequence number shows the gap. Safe: no migration completes with
    stale pages — it fails and g1 runs on in A, self-check clean; or it completed and g1's
    arrival self-check on B finds no error.

    That run is often the highest-addressed one of the round, and round 0 read those pages
    last: about one time in four the guest had not written them since, the dropped run held
    what B already had, and the truncation harms nothing (completed, no error). Such a run
    proves nothing either way, so the attack is repeated, on fresh hosts, until a run was
    dropped and B either refused the migration or took stale pages (at most
    TRUNCATION_ATTEMPTS times; a refusing destination ends it at the first)."""
    runs: list[Truncation] = []
    for attempt in range(TRUNCATION_ATTEMPTS):
        runs.append(asyncio.run(_truncated_migration(tmp_path / f"attempt{attempt}")))
        if runs[-1].conclusive:
            break
    run = runs[-1]
    assert any(r.dropped is not None for r in runs), f"the fault never fired in {len(runs)} migrations: {runs}"
    if run.dropped is None:
        return  # every run that fired was harmless (completed, no error), the last did not fire
    assert run.dropped.frame is not None and run.dropped.frame.type == F.PRIVATE_PAGES, run.dropped
    assert run.dropped.partner is not None and run.dropped.partner.type == F.SHARED_BITMAP, run.dropped
    if run.status is S.COMPLETED:
        assert run.arrival is not None and run.arrival.errors == 0 and run.arrival.pages_verified == NPAGES, (
            f"the attack worked (attempt {len(runs)}): the migration completed without the dropped run "
            f"{run.dropped.frame}, and g1's arrival self-check on B says {run.arrival}")
    else:
        assert run.status is S.FAILED and not run.committed, run
        assert run.source_state is GuestState.RUNNING, run
        assert run.source_check is not None and run.source_check.errors == 0, run
        assert run.source_check.pages_verified == NPAGES, run
        assert run.dest_guests == [], run


# ====================================================================== 4. no key confirmation


class FakeDestination:
    """A migration listener that holds only a real destination's *public* PDH certificate and
    plays the destination's part with migd's own codec: WELCOME with that certificate, then
    SESSION_ACK, PONG, PREPARED and STARTED whenever the source asks; every field it cannot
    compute (MACs, nonces) forged. It records what the source sent."""

    def __init__(self, pdh_cert: bytes) -> None:
        self.pdh_cert = pdh_cert
        self.received: list[str] = []
        self.decode_error: str | None = None
        self._server: asyncio.Server | None = None

    @property
    def private_pages_frames(self) -> int:
        return self.received.count("PrivatePages")

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._server.wait_closed()

    def _answer(self, msg: Any) -> Any:
        if isinstance(msg, wire.Hello):
            return forge(wire.Welcome, pdh_cert=self.pdh_cert)
        if isinstance(msg, wire.Session):
            return forge(wire.SessionAck)
        if isinstance(msg, wire.Ping):
            return forge(wire.Pong, token=msg.token)
        if isinstance(msg, wire.Prepare):
            return forge(wire.Prepared, pages_received=getattr(msg, "pages_sent", 0))
        if isinstance(msg, wire.Commit):
            return forge(wire.Started)
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder, encoder = wire.FrameDecoder(), wire.FrameEncoder()
        try:
            while data := await reader.read(1 << 16):
                try:
                    messages = decoder.feed(data)
                except ProtocolError as exc:
                    self.decode_error = str(exc)
                    return
                for msg in messages:
                    self.received.append(type(msg).__name__)
                    answer = self._answer(msg)
                    if answer is not None:
                        writer.write(encoder.encode_bytes(answer))
                    if isinstance(msg, wire.Abort):
                        return
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.transport.abort()


@pytest.mark.fault_class("attacker: fake destination (key confirmation)")
def test_a_destination_without_the_pdh_key_gets_nothing(tmp_path: Path) -> None:
    """g1 on A migrates to a fake destination that presents hostB's genuine PDH certificate (a
    valid chain under the owner CA) without its private key, and answers every step. Safe: A
    never commits (its migration fails, g1 runs on A, self-check clean), and the fake gets no
    PRIVATE_PAGES frame at all: key confirmation comes before any page."""

    async def main() -> None:
        a = make_host(tmp_path, "hostA")
        identity.init_host(tmp_path / "hostB", tmp_path / "ca", common_name="hostB")
        pdh_cert = (tmp_path / "hostB" / identity.PDH_CERT).read_bytes()  # public: all the fake holds
        fake = FakeDestination(pdh_cert)
        port = await fake.start()
        async with closing(a):
            try:
                guest = await running_guest(a, memory_mib=MEMORY_MIB)
                progress = await asyncio.wait_for(OutgoingMigration(guest, "127.0.0.1", port, PARAMS).run(), 60)
            finally:
                await fake.close()
            assert "Hello" in fake.received, (fake.received[:5], fake.decode_error)  # the fake was asked
            problems = []
            if progress.status is not S.FAILED or progress.phase.committed:
                problems.append(f"the source ended {progress.status.value} (committed={progress.phase.committed}) "
                                f"with a destination that has no PDH key: {progress.phase.error}")
            if guest.state is not GuestState.RUNNING:
                problems.append(f"g1 is {guest.state.value} on A, running nowhere")
            else:
                check = await guest.check()
                if check.errors or check.pages_verified != NPAGES:
                    problems.append(f"g1's self-check on A: {check}")
            if fake.private_pages_frames:
                problems.append(f"the fake received {fake.private_pages_frames} PRIVATE_PAGES frames "
                                f"(of {len(fake.received)} frames) before any key confirmation")
            no_problems(problems)

    asyncio.run(main())


# ====================================================================== 5. unauthenticated HELLO


@pytest.mark.fault_class("attacker: unauthenticated HELLO")
def test_an_unauthenticated_hello_creates_no_record(tmp_path: Path, daemon: Callable[..., ServeProcess]) -> None:
    """A network peer without credentials sends B's listener a HELLO with a fresh id and a valid
    guest, reads the answer and goes. Safe: B lists no migration and no guest — not at once, not
    after a restart (its journal)."""
    b = daemon("hostB")
    mid = uuid.uuid4().hex[:16]
    reply = asyncio.run(send_hello(b.migration_port, attacker_hello(mid, "g1")))
    deadline = time.monotonic() + 1.5  # B acts on the HELLO and on the close within milliseconds today
    while time.monotonic() < deadline and not migration_records(b):
        time.sleep(0.05)
    time.sleep(0.3)
    problems = []
    if records := migration_records(b):
        problems.append(f"an unauthenticated HELLO (answered with frame type {reply}) created migration "
                        f"records on B: {records}")
    if guests := guest_states(b):
        problems.append(f"... and guests: {guests}")
    b = restart(daemon, b)
    if records := migration_records(b):
        problems.append(f"B's journal keeps them across a restart: {records}")
    no_problems(problems)


async def _redirect(target_port: int) -> tuple[asyncio.Server, int]:
    """"The network": a TCP forwarder that leads every connection to ``target_port``."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.fault_class("attacker: reflected RESOLVE")
def test_a_reflected_resolve_never_discards_a_committed_copy(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """COMMIT is dropped and the destination's RESOLVE is routed back to its own listener, which
    holds the same hand-off key. The source committed: the destination must keep its copy in doubt
    (never answer itself, never take its own question for an answer). Found in review of the
    first version of the authenticated RESOLVE: there the destination answered itself "unknown"
    and discarded the guest, which then ran nowhere."""
    from migd import dest as dest_module

    monkeypatch.setattr(dest_module, "IncomingMigration",
                        functools.partial(dest_module.IncomingMigration, start_timeout_s=3.0, resolve_timeout_s=3.0))

    async def main() -> None:
        a, b = make_host(tmp_path, "hostA"), make_host(tmp_path, "hostB")
        listener = MigrationListener(b)
        port = await listener.start("127.0.0.1", 0)
        redirect, redirect_port = await _redirect(port)
        try:
            async with closing(a, b), FaultProxy("127.0.0.1", port, [DropFrame(FrameSelector.of(F.COMMIT))]) as proxy:
                guest = await running_guest(a)
                migration = OutgoingMigration(guest, "127.0.0.1", proxy.port, MigrationParams(handoff_timeout_s=2.0),
                                              resolve_port=redirect_port,
                                              on_established=lambda p, key: a.remember_handoff_key(p.id, key))
                a.add_migration(migration.progress)
                progress = await asyncio.wait_for(migration.run(), 60)
                assert proxy.fired("drop")
                assert progress.phase.committed and guest.state is GuestState.MIGRATED  # the source gave it up
                (incoming,) = b.migrations.values()
                async with asyncio.timeout(30):  # the destination asks, is refused, and gives up asking
                    while "in doubt" not in (incoming.phase.error or ""):
                        await asyncio.sleep(0.1)
                await asyncio.sleep(5.0)  # past its 3 s of asking (refused each time)
                assert "g1" in b.guests and b.guests["g1"].state is GuestState.INCOMING, \
                    ("the prepared copy was discarded although the source committed", incoming.phase.error)
                assert incoming.status is S.STOP_COPY and not incoming.phase.committed
        finally:
            await listener.close()
            redirect.close()

    asyncio.run(main())
