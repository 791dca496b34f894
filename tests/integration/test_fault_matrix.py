"""Fault matrix over two real ``migd serve`` processes: SIGKILL of the source daemon, the
destination daemon or the source guest agent, in each phase of a live migration — ``setup``,
``active``, ``blackout``, ``stop-copy`` and the hand-off.

Each case first proves its fault happened (the process is gone: returncode -9, or no live agent
process left) and that the phase was really reached (the negative control: the case fails if the
migration never entered it), then checks docs/design.md §8 "Invariants", 4 and 5: exactly one copy of
the guest (never running on both hosts, never on none), nothing left behind on the destination
(no guest entry, no directory under its state dir or RUNTIME_DIRECTORY/guests), and nothing
lost: the surviving copy migrates once more and its arrival self-check verifies every page.

How each phase is reached:

* ``setup`` right after the 202; ``active`` and ``stop-copy`` by polling the source's migration
  at ~10 ms while the link is capped at 6 MiB/s;
* ``blackout``: the guest kexecs on its own ~1 s after it boots (workload ``kexec_after_s``) and
  its new kernel takes 2 s (``boot_time_s``) to write READY again; the poll sees ``blackout``,
  and the guest's MSR is 0 while the host's own ``/kexec`` is refused (409: migrating), so the
  MSR drop was the guest's;
* the hand-off, through :class:`FrameGate`, a relay that holds one frame back: COMMIT (the
  source got PREPARED and journaled its commit record — read from its SQLite journal — and the
  destination holds a verified guest, ``stop-copy``, waiting), PREPARED (the destination is
  prepared, the source has not committed) or STARTED (both committed, the source not told).
  Killed there: the source daemon (the destination is in doubt, asks the restarted source with
  RESOLVE, and runs the guest), the destination daemon (before COMMIT: its restart must keep the
  prepared guest if and only if the source committed; after COMMIT: it keeps it), the source
  agent (nothing changes: the committed source never runs it again; the destination does).

Also here: a destination whose PDH an untrusted CA signed is refused, with the reason on the
source (issue 6, item 4), and defects the matrix found, each as a test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from migd import wire
from migd.platform import identity
from migd.abi import PAGE_SIZE
from migd.errors import ProtocolError
from migd.journal import JOURNAL_FILE
from migd.daemon.recovery import RESTART_ERROR
from migd.stream import open_stream

from .serve_process import ServeProcess, runtime_dir
from .test_restart import agent_pids, assert_no_guest, finished, restart, runtime_dir_of, wait_no_agents

MEMORY_MIB = 16
NPAGES = MEMORY_MIB * 256
WORKLOAD = {"dirty_rate_mib_s": 4, "convert_rate_hz": 10, "seed": 1}
#: The same guest with its data area written once at boot (zero pages cost the link nothing:
#: round 0 then takes ~2.7 s at LINK_MIB_S), kexec'ing on its own ~1 s later (mid round 0) and
#: staying down 2 s before its new kernel writes READY: the blackout lasts ~2 s, ~200 polls.
BLACKOUT_WORKLOAD = {**WORKLOAD, "populate_fraction": 1.0, "kexec_after_s": 1.0, "boot_time_s": 2.0}
#: Caps the migrations whose phases are polled: every phase lasts > 10 ms polls (a guest that
#: has written little is mostly zero pages, which cost the link nothing: its round 0 is short).
LINK_MIB_S = 6
CHECK_LINK_MIB_S = 64
POLL_S = 0.01
FINISHED = ("completed", "failed", "cancelled")

FAULTS = ["source-daemon", "destination-daemon", "source-agent"]
PHASES = ["setup", "active", "blackout", "stop-copy"]



def start_loaded_guest(daemon: ServeProcess, workload: dict[str, Any] = WORKLOAD) -> None:
    status, body = daemon.request("POST", "/v1/guests", {"name": "g1", "memory_mib": MEMORY_MIB})
    assert status == 201, body
    status, body = daemon.request("POST", "/v1/guests/g1/start", {"workload": workload})
    assert status == 200, body
    daemon.wait_for("GET", "/v1/guests/g1", lambda g: g["migration_control"]["ready"], timeout=20)


def poll_until_status(source: ServeProcess, mid: str, wanted: str, timeout: float = 30.0) -> dict[str, Any]:
    """Poll the source's migration at ~10 ms until its status is ``wanted``; fail if it ends first."""
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while time.monotonic() < deadline:
        status, migration = source.request("GET", f"/v1/migrations/{mid}")
        assert status == 200, migration
        if not seen or seen[-1] != migration["status"]:
            seen.append(migration["status"])
        if migration["status"] == wanted:
            return migration  # type: ignore[no-any-return]
        assert migration["status"] not in FINISHED, f"never saw {wanted!r}; statuses seen: {seen}; {migration}"
        time.sleep(POLL_S)
    raise TimeoutError(f"never saw {wanted!r} within {timeout} s; statuses seen: {seen}")


def reach_phase(source: ServeProcess, dest: ServeProcess, phase: str) -> str:
    """Start the rate-limited migration and return its id at the moment it is in ``phase``."""
    status, migration = source.request(
        "POST", "/v1/guests/g1/migrate", {"destination": dest.destination, "max_bandwidth_mib_s": LINK_MIB_S}
    )
    assert status == 202, migration
    mid: str = migration["id"]
    if phase == "setup":
        assert migration["status"] == "setup", migration
        return mid
    poll_until_status(source, mid, phase)
    if phase in ("active", "blackout"):  # the host cannot kexec a migrating guest...
        status, refused = source.request("POST", "/v1/guests/g1/kexec", {})
        assert status == 409 and "migrating" in refused["detail"], refused
    if phase == "blackout":  # ...so this blackout is the guest's own kexec: its MSR is 0 right now
        guest = source.request("GET", "/v1/guests/g1")[1]
        assert guest["migration_control"]["ready"] is False and guest["migration_control"]["msr"] == 0, guest
    return mid


def kill_agent(daemon: ServeProcess) -> None:
    (pid,) = agent_pids(runtime_dir_of(daemon))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid in agent_pids(runtime_dir_of(daemon)):  # gone or a zombie (not yet reaped)
        assert time.monotonic() < deadline, f"agent {pid} survived SIGKILL"
        time.sleep(POLL_S)


def guest_state(daemon: ServeProcess) -> str | None:
    status, guest = daemon.request("GET", "/v1/guests/g1")
    return guest["state"] if status == 200 else None


def assert_nothing_on(daemon: ServeProcess, tmp_path: Path) -> None:
    """No guest entry, no state or runtime directory for g1 (assert_no_guest), and none at all
    under RUNTIME_DIRECTORY/guests."""
    assert_no_guest(daemon, tmp_path / daemon.name)
    guests_dir = runtime_dir(tmp_path, daemon.name) / "guests"
    assert not guests_dir.exists() or not list(guests_dir.iterdir()), list(guests_dir.iterdir())


def dest_forgets(dest: ServeProcess, mid: str, timeout: float = 30.0, failed_reason: str | None = None) -> None:
    """Wait until the destination has no guest and its side of ``mid`` (if it saw one) ended
    (``failed``; with ``failed_reason``, one whose error starts with it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, migration = dest.request("GET", f"/v1/migrations/{mid}")
        ended = status == 404 or migration["status"] in FINISHED
        if ended and guest_state(dest) is None:
            if status == 200:
                assert migration["status"] == "failed" and migration["role"] == "destination", migration
                assert failed_reason is None or migration["error"].startswith(failed_reason), migration
            return
        time.sleep(0.05)
    raise TimeoutError(f"destination still holds g1 or migration {mid}: {dest.request('GET', '/v1/guests')}")


def migrate_and_check_clean(source: ServeProcess, dest: ServeProcess) -> None:
    """Nothing lost: one more migration, then every page verified on arrival, no error.

    Capped at CHECK_LINK_MIB_S so the stream never backs up: a back-pressured stream of a guest
    writing shared pages fails its CRC under uvloop (the DEFECT shown precisely by
    test_a_guest_write_to_a_queued_shared_page_does_not_fail_the_stream_under_uvloop below)."""
    status, migration = source.request("POST", "/v1/guests/g1/migrate",
                                       {"destination": dest.destination, "max_bandwidth_mib_s": CHECK_LINK_MIB_S})
    assert status == 202, migration
    done = finished(source, migration["id"])
    assert done["status"] == "completed", (done, source.log()[-3000:], dest.log()[-3000:])
    guest = dest.wait_for("GET", "/v1/guests/g1", lambda g: g["check"]["pages_verified"] > 0, timeout=30)
    assert guest["state"] == "running" and guest["pages"]["total"] == NPAGES
    assert guest["check"] == {"pages_verified": NPAGES, "errors": 0, "last_error": None}, guest
    assert guest_state(source) == "migrated"  # exactly one copy runs


def ensure_running(daemon: ServeProcess) -> None:
    if guest_state(daemon) != "running":
        status, body = daemon.request("POST", "/v1/guests/g1/start", {"workload": WORKLOAD})
        assert status == 200, body
    daemon.wait_for("GET", "/v1/guests/g1", lambda g: g["migration_control"]["ready"], timeout=20)


@pytest.mark.fault_class("SIGKILL: {fault}")
@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("fault", FAULTS)
def test_sigkill_mid_migration_keeps_one_clean_copy(
    tmp_path: Path, daemons: dict[str, ServeProcess], fault: str, phase: str
) -> None:
    source, dest = daemons["A"], daemons["B"]
    start_loaded_guest(source, BLACKOUT_WORKLOAD if phase == "blackout" else WORKLOAD)
    source_runtime = runtime_dir_of(source)
    mid = reach_phase(source, dest, phase)

    if fault == "source-daemon":
        source.kill()
        assert source.proc.returncode == -signal.SIGKILL
        # The destination sees the stream die before COMMIT: it drops the partial guest.
        dest_forgets(dest, mid)
        assert_nothing_on(dest, tmp_path)
        wait_no_agents(source_runtime)  # the guest died with its daemon: no second copy anywhere
        daemons["A"] = source = restart(tmp_path, source)
        guest = source.request("GET", "/v1/guests/g1")[1]
        assert guest["state"] == "stopped" and guest["pages"]["total"] == NPAGES, guest
        status, migration = source.request("GET", f"/v1/migrations/{mid}")
        assert status == 200 and migration["status"] == "failed", migration
        assert migration["error"] == RESTART_ERROR, migration
        assert guest_state(dest) is None  # never running on both
        ensure_running(source)

    elif fault == "destination-daemon":
        dest.kill()
        assert dest.proc.returncode == -signal.SIGKILL
        failed = finished(source, mid)
        assert failed["status"] == "failed", failed
        guest = source.request("GET", "/v1/guests/g1")[1]
        assert guest["state"] == "running" and guest["migration_control"]["ready"] is not None, guest
        daemons["B"] = dest = restart(tmp_path, dest)
        assert_nothing_on(dest, tmp_path)
        status, incoming = dest.request("GET", f"/v1/migrations/{mid}")
        # In setup the destination may not have got the HELLO yet: then it never heard of it.
        assert status == 404 or (incoming["status"] == "failed" and incoming["error"] == RESTART_ERROR), incoming
        ensure_running(source)

    else:  # the source guest agent
        kill_agent(source)
        assert source.proc.poll() is None  # only the agent died
        failed = finished(source, mid)
        assert failed["status"] == "failed", failed
        assert "agent" in failed["error"] and "g1" in failed["error"], failed
        dest_forgets(dest, mid)
        assert_nothing_on(dest, tmp_path)
        assert not agent_pids(source_runtime)  # and no copy runs anywhere
        assert guest_state(source) != "paused"  # never left paused by the failed migration
        # The daemon noticed the dead agent: the guest is reported stopped (a crashed VM) and
        # boots again on request.
        source.wait_for("GET", "/v1/guests/g1", lambda g: g["state"] == "stopped", timeout=10)
        ensure_running(source)

    migrate_and_check_clean(source, dest)


# ---------------------------------------------------------------------- a guest agent dies on its own


def killed_agent_guest(tmp_path: Path) -> tuple[ServeProcess, str]:
    """A daemon whose running, READY guest g1 just lost its agent to SIGKILL (checked)."""
    daemon = ServeProcess.start(tmp_path, "hostA")
    start_loaded_guest(daemon)
    runtime = runtime_dir_of(daemon)
    kill_agent(daemon)
    assert not agent_pids(runtime) and daemon.proc.poll() is None
    return daemon, runtime


@pytest.mark.fault_class("SIGKILL: source-agent")
def test_a_killed_agent_is_reported_as_not_running(tmp_path: Path) -> None:
    daemon, _ = killed_agent_guest(tmp_path)
    try:
        guest = daemon.wait_for("GET", "/v1/guests/g1", lambda g: g["state"] != "running", timeout=5)
        assert guest["migration_control"]["ready"] is False, guest
    finally:
        daemon.stop()


@pytest.mark.fault_class("SIGKILL: source-agent")
@pytest.mark.parametrize("action", ["kexec", "reboot"])
def test_actions_on_a_guest_whose_agent_died_are_not_5xx(tmp_path: Path, action: str) -> None:
    daemon, _ = killed_agent_guest(tmp_path)
    try:
        status, body = daemon.request("POST", f"/v1/guests/g1/{action}", {})
        assert status == 409 and body["detail"], (status, body)
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0  # and the daemon itself still shuts down cleanly


# ---------------------------------------------------------------------- found by the matrix: torn shared pages


async def _send_shared_frame_under_back_pressure(guest_writes: bool) -> list[Any]:
    """Queue 8 MiB of page frames behind a destination that does not read yet, then one
    SharedPages frame that is a zero-copy view of "guest RAM" (as the source sends it,
    ``guest.ram.view``); optionally the guest writes that page before the stream drains.
    Returns the frames the destination decodes (a ProtocolError propagates)."""
    accepted: asyncio.Future[asyncio.StreamReader] = asyncio.get_running_loop().create_future()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set_result(reader)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        proto = await open_stream("127.0.0.1", server.sockets[0].getsockname()[1], timeout=5)
        reader = await asyncio.wait_for(accepted, 5)
        filler = bytes(64 * PAGE_SIZE)
        for i in range(32):
            proto.write(wire.SharedPages(i * 64 * PAGE_SIZE, 64, filler))
        ram = bytearray(b"\x11" * (16 * PAGE_SIZE))
        # What OutgoingMigration._send_run hands the stream for a shared run: a snapshot
        # (GuestRam.read), never a live view of guest RAM that uvloop could send later.
        proto.write(wire.SharedPages(1 << 30, 16, bytes(ram)))
        if guest_writes:
            ram[:PAGE_SIZE] = b"\x22" * PAGE_SIZE  # a legal guest write to a shared page
        raw = await asyncio.wait_for(reader.readexactly(proto.bytes_sent), 20)
        proto.close()
    finally:
        server.close()
    decoder = wire.FrameDecoder()
    frames: list[Any] = []
    view = memoryview(raw)
    while view:
        buf = decoder.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        view = view[n:]
        frames += [(m.gpa, bytes(m.payload[:1])) for m in decoder.buffer_updated(n)]
    return frames


@pytest.mark.fault_class("stall / slow link")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_back_pressured_shared_page_frame_arrives_intact(loop: str) -> None:
    """Negative control of the defect below: without a guest write the frame arrives on both loops."""
    runner = uvloop.run if loop == "uvloop" else asyncio.run
    frames = runner(_send_shared_frame_under_back_pressure(guest_writes=False))
    assert len(frames) == 33 and frames[-1] == (1 << 30, b"\x11")


@pytest.mark.fault_class("stall / slow link")
def test_a_guest_write_to_a_queued_shared_page_does_not_fail_the_stream_under_uvloop() -> None:
    frames = uvloop.run(_send_shared_frame_under_back_pressure(guest_writes=True))
    # The frame carries the page as classified (the later write makes it dirty: re-sent next round).
    assert len(frames) == 33 and frames[-1] == (1 << 30, b"\x11")


# ---------------------------------------------------------------------- the hand-off


class FrameGate:
    """A relay between the two daemons (127.0.0.1, its own thread and event loop) that holds back
    the first frame of type ``hold`` in one direction of its first connection until
    :meth:`release`: the hand-off held open at a protocol point for as long as a case needs.

    ``hold=COMMIT`` upstream: the source has sent COMMIT, so it got PREPARED and wrote its
    journal's commit record (``OutgoingMigration`` writes COMMIT only after ``on_commit``), and
    the destination has not received it. ``hold=STARTED`` downstream: the destination committed
    and started the guest, the source has not heard so. Evidence: ``held`` is set once the frame
    is held; ``before`` lists the frame types forwarded before it; ``dropped`` is set once the
    sender's side ended while the frame was held (it was never delivered). Other connections
    (none in these cases: RESOLVE goes straight to the source's listener) pass untouched.
    """

    def __init__(self, target_port: int, hold: wire.FrameType, upstream: bool = True) -> None:
        self.target_port, self.hold, self.upstream = target_port, int(hold), upstream
        self.held = threading.Event()
        self.before: list[int] = []
        self.dropped = threading.Event()
        self._passing = False
        self._buf = bytearray()
        self._gated_writer: asyncio.StreamWriter | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="frame-gate", daemon=True)
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port: int = self._server.sockets[0].getsockname()[1]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def release(self) -> None:
        """Deliver the held frame and everything queued behind it; from now on just relay."""
        async def release() -> None:
            self._passing = True
            if self._gated_writer is not None and self._buf:
                self._gated_writer.write(bytes(self._buf))
                self._buf.clear()
        self._call(release())

    def close(self) -> None:
        async def close() -> None:
            self._server.close()
            for writer in self._writers:
                writer.transport.abort()
        self._call(close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        gated = self._connections == 0
        self._connections += 1
        self._writers.append(client_writer)
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.transport.abort()
            return
        self._writers.append(server_writer)
        await asyncio.gather(
            self._pump(client_reader, server_writer, gated and self.upstream),
            self._pump(server_reader, client_writer, gated and not self.upstream),
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, gated: bool) -> None:
        if gated:
            self._gated_writer = writer
        clean = True
        try:
            while data := await reader.read(1 << 16):
                if not gated or self._passing:
                    writer.write(data)
                else:
                    self._buf += data
                    self._forward_frames_before_the_held_one(writer)
                await writer.drain()
        except (ConnectionError, OSError):
            clean = False
        finally:
            if gated and self.held.is_set() and not self._passing:
                self.dropped.set()  # the sender is gone: the held frame never reaches the receiver
            if clean:
                writer.close()
            else:
                writer.transport.abort()

    def _forward_frames_before_the_held_one(self, writer: asyncio.StreamWriter) -> None:
        while not self.held.is_set() and len(self._buf) >= 5:
            length, ftype = struct.unpack_from(">IB", self._buf)
            if ftype == self.hold:
                self.held.set()
                return
            if len(self._buf) < 4 + length:
                return
            self.before.append(ftype)
            writer.write(bytes(self._buf[: 4 + length]))
            del self._buf[: 4 + length]


@pytest.fixture
def gate_factory() -> Iterator[Any]:
    gates: list[FrameGate] = []

    def make(target_port: int, hold: wire.FrameType, upstream: bool = True) -> FrameGate:
        gates.append(FrameGate(target_port, hold, upstream))
        return gates[-1]

    try:
        yield make
    finally:
        for gate in gates:
            gate.close()


def journal_commit(daemon: ServeProcess, mid: str) -> tuple[str, bool] | None:
    """(role, committed) of migration ``mid`` in the daemon's journal, read straight from SQLite."""
    path = daemon.root / daemon.name / JOURNAL_FILE
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        row = db.execute("SELECT role, committed FROM migrations WHERE id = ?", (mid,)).fetchone()
    finally:
        db.close()
    return None if row is None else (row[0], bool(row[1]))


def migration_status(daemon: ServeProcess, mid: str) -> str | None:
    status, migration = daemon.request("GET", f"/v1/migrations/{mid}")
    return migration["status"] if status == 200 else None


def hold_hand_off(source: ServeProcess, dest: ServeProcess, gate: FrameGate) -> str:
    """Migrate g1 through ``gate`` until it holds its frame; returns the migration id with the
    hand-off proven open: PREPARE went out, nothing finished, and the source committed (journal)
    unless the frame held is PREPARED (then it has not)."""
    status, migration = source.request("POST", "/v1/guests/g1/migrate", {"destination": gate.address})
    assert status == 202, migration
    mid: str = migration["id"]
    assert gate.held.wait(30), (f"the {wire.FrameType(gate.hold).name} frame never came",
                                source.request("GET", f"/v1/migrations/{mid}")[1])
    if gate.hold == wire.FrameType.STARTED:
        assert wire.FrameType.PREPARED in gate.before, gate.before
    assert migration_status(source, mid) == "stop-copy"  # still in the hand-off: no STARTED yet
    committed = gate.hold != wire.FrameType.PREPARED
    assert journal_commit(source, mid) == ("source", committed)  # past the point of no return, or not
    return mid


def migrate_back_and_check_clean(owner: ServeProcess, other: ServeProcess) -> None:
    """The destination owns g1 now: the source's ``migrated`` record goes, then g1 migrates back
    and its arrival self-check verifies every page (nothing lost)."""
    assert guest_state(other) == "migrated"
    status, body = other.request("DELETE", "/v1/guests/g1")
    assert status in (200, 204), body
    ensure_running(owner)
    migrate_and_check_clean(owner, other)


def assert_arrived_clean(dest: ServeProcess) -> None:
    guest = dest.wait_for("GET", "/v1/guests/g1", lambda g: g["check"]["pages_verified"] > 0, timeout=30)
    assert guest["state"] == "running", guest
    assert guest["check"] == {"pages_verified": NPAGES, "errors": 0, "last_error": None}, guest


#: (fault, the frame held): where exactly in the hand-off each fault hits. COMMIT held: the
#: source committed, the destination is prepared and has not heard; PREPARED held: the destination
#: is prepared, the source has not committed; STARTED held: both committed, the source not told.
HANDOFF_CASES = [
    ("source-daemon", "COMMIT"),
    ("destination-daemon", "PREPARED"),
    ("destination-daemon", "COMMIT"),  # in doubt after its restart: recovery asks the source
    ("destination-daemon", "STARTED"),
    ("source-agent", "COMMIT"),
]


@pytest.mark.fault_class("SIGKILL: {fault}")
@pytest.mark.parametrize(("fault", "held"), HANDOFF_CASES)
def test_sigkill_in_the_hand_off_keeps_one_clean_copy(
    tmp_path: Path, daemons: dict[str, ServeProcess], gate_factory: Any, fault: str, held: str
) -> None:
    source, dest = daemons["A"], daemons["B"]
    start_loaded_guest(source)
    source_runtime = runtime_dir_of(source)
    hold = wire.FrameType[held]
    gate = gate_factory(dest.migration_port, hold, upstream=hold == wire.FrameType.COMMIT)
    mid = hold_hand_off(source, dest, gate)
    if hold == wire.FrameType.STARTED:  # the destination has COMMIT: committed (journal) and runs the guest
        assert journal_commit(dest, mid) == ("destination", True)
        assert guest_state(dest) == "running"
    else:  # the destination holds a verified guest (PREPARED) and waits for COMMIT
        assert migration_status(dest, mid) == "stop-copy" and guest_state(dest) == "incoming"
        assert journal_commit(dest, mid) == ("destination", False)

    if fault == "source-daemon":
        source.kill()
        assert source.proc.returncode == -signal.SIGKILL
        wait_no_agents(source_runtime)  # the source's (paused) copy died with its daemon
        assert gate.dropped.wait(10)  # COMMIT never reached the destination: it is in doubt...
        time.sleep(0.5)
        assert guest_state(dest) == "incoming" and migration_status(dest, mid) == "stop-copy"  # ...and waits
        daemons["A"] = source = restart(tmp_path, source)
        # The destination asks the restarted source (RESOLVE): committed, so it starts its copy.
        assert finished(dest, mid)["status"] == "completed"
        assert_arrived_clean(dest)
        assert "resolved by the source: committed" in dest.log()
        assert guest_state(source) == "migrated"  # never both
        migration = source.request("GET", f"/v1/migrations/{mid}")[1]
        assert migration["status"] == "completed" and "after the commit" in migration["error"], migration
        migrate_back_and_check_clean(dest, source)

    elif fault == "destination-daemon" and hold == wire.FrameType.PREPARED:
        dest.kill()
        assert dest.proc.returncode == -signal.SIGKILL
        assert gate.dropped.wait(10)  # PREPARED never reached the source: it cannot have committed
        failed = finished(source, mid)
        assert failed["status"] == "failed", failed
        assert guest_state(source) == "running" and journal_commit(source, mid) == ("source", False)
        daemons["B"] = dest = restart(tmp_path, dest)
        # Its prepared copy is not the guest: the restarted destination keeps nothing of it.
        dest_forgets(dest, mid, failed_reason=RESTART_ERROR)
        assert_nothing_on(dest, tmp_path)
        migrate_and_check_clean(source, dest)

    elif fault == "destination-daemon":
        dest.kill()
        assert dest.proc.returncode == -signal.SIGKILL
        assert gate.dropped.wait(10)  # COMMIT (or STARTED) never arrived
        done = finished(source, mid)
        # Committed: the source never resumes the guest on its own (docs/design.md §8 "Invariants", 4).
        assert done["status"] == "completed" and "did not confirm" in done["error"], done
        assert guest_state(source) == "migrated"
        daemons["B"] = dest = restart(tmp_path, dest)
        # The destination is now the only place the guest can run: it must have kept it (after
        # PREPARED without COMMIT, once the source confirmed the commit: RESOLVE).
        try:
            dest.wait_for("GET", "/v1/guests/g1", lambda g: g["state"] == "stopped", timeout=5)
        except TimeoutError:
            raise AssertionError(f"g1 lost: {dest.request('GET', '/v1/guests')[1]}\n{dest.log()[-3000:]}") from None
        migration = dest.request("GET", f"/v1/migrations/{mid}")[1]
        assert migration["status"] == "completed", migration
        if hold == wire.FrameType.COMMIT:
            assert "the source confirmed the commit" in migration["error"], migration
            assert "resolved by the source: committed" in dest.log()
        assert guest_state(source) == "migrated"  # never both
        migrate_back_and_check_clean(dest, source)

    else:  # the source guest agent, while COMMIT is held
        kill_agent(source)
        assert source.proc.poll() is None and not agent_pids(source_runtime)
        # The committed source can never run it again, not even when asked.
        status, refused = source.request("POST", "/v1/guests/g1/start", {"workload": WORKLOAD})
        assert status == 409, refused
        gate.release()
        assert finished(source, mid)["status"] == "completed"
        assert not gate.dropped.is_set()
        assert_arrived_clean(dest)
        assert guest_state(source) == "migrated" and not agent_pids(source_runtime)
        migrate_back_and_check_clean(dest, source)


# ---------------------------------------------------------------------- access control: the destination's PDH


@pytest.mark.fault_class("access control: untrusted PDH")
def test_a_destination_whose_pdh_an_untrusted_ca_signed_is_refused(
    tmp_path: Path, daemons: dict[str, ServeProcess]
) -> None:
    """Issue 6 item 4 between two real daemons: the source's SEND_START validates the
    destination's PDH chain against its trust anchors (docs/design.md §5 "SEV firmware transport")
    and reports why it refused."""
    source, trusted = daemons["A"], daemons["B"]
    (tmp_path / "rogue").mkdir()
    rogue = ServeProcess.start(tmp_path / "rogue", "hostB")  # the same name, its own owner CA
    try:
        anchor = x509.load_pem_x509_certificate((tmp_path / "ca" / identity.CA_CERT).read_bytes())
        rogue_pdh = x509.load_pem_x509_certificate((tmp_path / "rogue" / "hostB" / identity.PDH_CERT).read_bytes())
        good_pdh = x509.load_pem_x509_certificate((tmp_path / "hostB" / identity.PDH_CERT).read_bytes())
        good_pdh.verify_directly_issued_by(anchor)  # negative control of the premise...
        with pytest.raises((ValueError, TypeError, InvalidSignature)):
            rogue_pdh.verify_directly_issued_by(anchor)  # ...the rogue's PDH is not from our CA
        start_loaded_guest(source)
        status, migration = source.request("POST", "/v1/guests/g1/migrate", {"destination": rogue.destination})
        assert status == 202, migration
        failed = finished(source, migration["id"])
        assert failed["status"] == "failed", failed
        assert "INVALID_CERTIFICATE" in failed["error"] and "trust anchor" in failed["error"], failed
        guest = source.request("GET", "/v1/guests/g1")[1]
        assert guest["state"] == "running" and guest["migration_control"]["ready"], guest  # untouched
        assert_nothing_on(rogue, tmp_path / "rogue")
        # The same guest, to a destination whose PDH our CA signed: migrates clean.
        migrate_and_check_clean(source, trusted)
    finally:
        rogue.stop()
