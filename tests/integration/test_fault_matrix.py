"""Fault matrix over two real ``migd serve`` processes: SIGKILL of the source daemon, the
destination daemon or the source guest agent, in each phase of a rate-limited live migration.

Each case first proves its fault happened (the process is gone: returncode -9, or no live agent
process left), then checks DESIGN.md §5 invariants 4 and 5: exactly one copy of the guest
(never running on both hosts), nothing left behind on the destination (no guest entry, no
directory under its state dir or RUNTIME_DIRECTORY/guests), and nothing lost: the surviving
copy migrates once more at full speed and its arrival self-check verifies every page.

Phases are reached by polling the source's migration at ~10 ms; ``setup`` is hit right after
the 202. ``blackout`` is not in the matrix: it needs the guest's MSR to drop mid-migration, and
over REST the only triggers (``/kexec``, ``/reboot``) are refused with 409 while the guest
migrates (asserted in the ``active`` cases); blackout is covered in-process by
tests/integration/test_interleavings.py and test_migration.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from migd import wire
from migd.abi import PAGE_SIZE
from migd.errors import ProtocolError
from migd.recovery import RESTART_ERROR
from migd.stream import open_stream

from .serve_process import ServeProcess, runtime_dir
from .test_restart import agent_pids, assert_no_guest, finished, restart, runtime_dir_of, wait_no_agents

MEMORY_MIB = 16
NPAGES = MEMORY_MIB * 256
WORKLOAD = {"dirty_rate_mib_s": 4, "convert_rate_hz": 10, "seed": 1}
#: ~3 s for the first round of 16 MiB, then shrinking rounds: every phase lasts > 10 ms polls.
LINK_MIB_S = 6
CHECK_LINK_MIB_S = 64
POLL_S = 0.01
FINISHED = ("completed", "failed", "cancelled")

FAULTS = ["source-daemon", "destination-daemon", "source-agent"]
PHASES = ["setup", "active", "stop-copy"]


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[dict[str, ServeProcess]]:
    procs = {"A": ServeProcess.start(tmp_path, "hostA"), "B": ServeProcess.start(tmp_path, "hostB")}
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


def start_loaded_guest(daemon: ServeProcess) -> None:
    status, body = daemon.request("POST", "/v1/guests", {"name": "g1", "memory_mib": MEMORY_MIB})
    assert status == 201, body
    status, body = daemon.request("POST", "/v1/guests/g1/start", {"workload": WORKLOAD})
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
    if phase == "active":  # why blackout is not in the matrix: no REST trigger mid-migration
        status, refused = source.request("POST", "/v1/guests/g1/kexec", {})
        assert status == 409 and "migrating" in refused["detail"], refused
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


def dest_forgets(dest: ServeProcess, mid: str, timeout: float = 30.0) -> None:
    """Wait until the destination has no guest and its side of ``mid`` (if it saw one) ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, migration = dest.request("GET", f"/v1/migrations/{mid}")
        ended = status == 404 or migration["status"] in FINISHED
        if ended and guest_state(dest) is None:
            if status == 200:
                assert migration["status"] == "failed" and migration["role"] == "destination", migration
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


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("fault", FAULTS)
def test_sigkill_mid_migration_keeps_one_clean_copy(
    tmp_path: Path, daemons: dict[str, ServeProcess], fault: str, phase: str
) -> None:
    source, dest = daemons["A"], daemons["B"]
    start_loaded_guest(source)
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


def test_a_killed_agent_is_reported_as_not_running(tmp_path: Path) -> None:
    daemon, _ = killed_agent_guest(tmp_path)
    try:
        guest = daemon.wait_for("GET", "/v1/guests/g1", lambda g: g["state"] != "running", timeout=5)
        assert guest["migration_control"]["ready"] is False, guest
    finally:
        daemon.stop()


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


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_back_pressured_shared_page_frame_arrives_intact(loop: str) -> None:
    """Negative control of the defect below: without a guest write the frame arrives on both loops."""
    runner = uvloop.run if loop == "uvloop" else asyncio.run
    frames = runner(_send_shared_frame_under_back_pressure(guest_writes=False))
    assert len(frames) == 33 and frames[-1] == (1 << 30, b"\x11")


def test_a_guest_write_to_a_queued_shared_page_does_not_fail_the_stream_under_uvloop() -> None:
    frames = uvloop.run(_send_shared_frame_under_back_pressure(guest_writes=True))
    # The frame carries the page as classified (the later write makes it dirty: re-sent next round).
    assert len(frames) == 33 and frames[-1] == (1 << 30, b"\x11")
