"""Daemon restarts during a migration, with two real ``migd serve`` processes.

SIGKILL of either side mid-migration: the restarted daemon reloads its guests from the journal,
marks the migration failed, and the guest is intact on the side that owns it (the source: no
commit record); the destination keeps no partial guest. SIGTERM mid-migration: exit 0, no guest
lost. Each guest is finally proven clean by migrating it and reading its arrival self-check
(every page verified, no error).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from migd.daemon.recovery import RESTART_ERROR

from .serve_process import ServeProcess, runtime_dir

MEMORY_MIB = 64
#: Half the data area written at boot: zero pages cost the link nothing, these 32 MiB keep a
#: migration over SLOW_LINK_MIB_S in flight for ~2.7 s: time to interrupt it.
WORKLOAD = {"dirty_rate_mib_s": 4, "convert_rate_hz": 5, "seed": 21, "populate_fraction": 0.5}
SLOW_LINK_MIB_S = 12



def restart(tmp_path: Path, old: ServeProcess) -> ServeProcess:
    """The same host again: same state directory, config and ports."""
    return ServeProcess.start(tmp_path, old.name, api_port=old.api_port, migration_port=old.migration_port)


def running_guest(daemon: ServeProcess, name: str = "g1") -> None:
    status, body = daemon.request("POST", "/v1/guests", {"name": name, "memory_mib": MEMORY_MIB})
    assert status == 201, body
    start_and_wait_ready(daemon, name)


def start_and_wait_ready(daemon: ServeProcess, name: str = "g1") -> None:
    status, body = daemon.request("POST", f"/v1/guests/{name}/start", {"workload": WORKLOAD})
    assert status == 200, body
    daemon.wait_for("GET", f"/v1/guests/{name}", lambda g: g["migration_control"]["ready"], timeout=20)


def migrate_slowly_until_under_way(source: ServeProcess, dest: ServeProcess) -> str:
    """Start a rate-limited migration; return its id once pages are flowing."""
    status, migration = source.request("POST", "/v1/guests/g1/migrate",
                                       {"destination": dest.destination, "max_bandwidth_mib_s": SLOW_LINK_MIB_S})
    assert status == 202, migration
    mid = migration["id"]
    source.wait_for("GET", f"/v1/migrations/{mid}",
                    lambda m: m["status"] == "active" and m["bytes"]["transferred"] > 4 << 20, timeout=20)
    # The destination holds a partial guest right now (the thing that must not survive).
    dest.wait_for("GET", "/v1/guests", lambda b: [g["state"] for g in b["guests"]] == ["incoming"], timeout=10)
    return mid


def finished(daemon: ServeProcess, mid: str, timeout: float = 30) -> dict[str, Any]:
    return daemon.wait_for("GET", f"/v1/migrations/{mid}",
                           lambda m: m["status"] in ("completed", "failed", "cancelled"), timeout=timeout)


def assert_no_guest(daemon: ServeProcess, state_dir: Path) -> None:
    status, body = daemon.request("GET", "/v1/guests")
    assert status == 200 and body["guests"] == [], body
    assert daemon.request("GET", "/v1/guests/g1")[0] == 404
    assert not (state_dir / "guests" / "g1").exists()
    assert not (runtime_dir(state_dir.parent, state_dir.name) / "guests" / "g1").exists()
    assert not list((state_dir / "psp").glob("guest-*.ctx"))  # no firmware context left either


def migrate_and_check_clean(source: ServeProcess, dest: ServeProcess) -> None:
    """Migrate g1 at full speed; its arrival self-check must verify every page without error."""
    status, migration = source.request("POST", "/v1/guests/g1/migrate", {"destination": dest.destination})
    assert status == 202, migration
    done = finished(source, migration["id"])
    assert done["status"] == "completed", done
    guest = dest.wait_for("GET", "/v1/guests/g1", lambda g: g["check"]["pages_verified"] > 0, timeout=30)
    assert guest["state"] == "running"
    assert guest["check"] == {"pages_verified": guest["pages"]["total"], "errors": 0, "last_error": None}
    assert source.request("GET", "/v1/guests/g1")[1]["state"] == "migrated"


def agent_pids(runtime_hint: str) -> list[int]:
    """Live guest agent processes of guest g1 whose channel socket path contains ``runtime_hint``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if b"migd.guest.agent" in cmdline and any(runtime_hint.encode() in arg for arg in cmdline) and state != "Z":
            pids.append(int(proc.name))
    return pids


def wait_no_agents(runtime_hint: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while pids := agent_pids(runtime_hint):
        assert time.monotonic() < deadline, f"agents {pids} outlived their daemon"
        time.sleep(0.05)


def runtime_dir_of(daemon: ServeProcess) -> str:
    """The RUNTIME_DIRECTORY a ServeProcess gave its daemon (the agents' sockets are under it)."""
    environ = Path(f"/proc/{daemon.proc.pid}/environ").read_bytes().split(b"\0")
    (value,) = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RUNTIME_DIRECTORY=")]
    return value.decode()


def test_source_sigkill_during_migration(tmp_path: Path, daemons: dict[str, ServeProcess]) -> None:
    source, dest = daemons["A"], daemons["B"]
    running_guest(source)
    old_runtime = runtime_dir_of(source)
    mid = migrate_slowly_until_under_way(source, dest)

    source.kill()
    # The destination sees the stream die before COMMIT: it drops the partial guest.
    incoming = finished(dest, mid)
    assert incoming["status"] == "failed" and incoming["role"] == "destination"
    assert_no_guest(dest, tmp_path / "hostB")
    wait_no_agents(old_runtime)  # the guest's agent went with its daemon: no second copy can run

    daemons["A"] = source = restart(tmp_path, source)
    guest = source.request("GET", "/v1/guests/g1")[1]
    assert guest["state"] == "stopped" and guest["pages"]["total"] == MEMORY_MIB * 256, guest
    status, migration = source.request("GET", f"/v1/migrations/{mid}")
    assert status == 200 and migration["status"] == "failed" and migration["error"] == RESTART_ERROR, migration
    assert migration["bytes"]["total"] == MEMORY_MIB << 20 and migration["destination"] == dest.destination
    # Still the same guest (definition, firmware context): it starts and migrates clean.
    start_and_wait_ready(source)
    migrate_and_check_clean(source, dest)


def test_destination_sigkill_during_migration(tmp_path: Path, daemons: dict[str, ServeProcess]) -> None:
    source, dest = daemons["A"], daemons["B"]
    running_guest(source)
    mid = migrate_slowly_until_under_way(source, dest)

    dest.kill()
    failed = finished(source, mid)
    assert failed["status"] == "failed", failed
    guest = source.request("GET", "/v1/guests/g1")[1]
    assert guest["state"] == "running" and guest["migration_control"]["ready"], guest  # it never stopped

    daemons["B"] = dest = restart(tmp_path, dest)
    assert_no_guest(dest, tmp_path / "hostB")
    status, incoming = dest.request("GET", f"/v1/migrations/{mid}")
    assert status == 200 and incoming["status"] == "failed" and incoming["error"] == RESTART_ERROR, incoming
    # The source's guest ran on the whole time; the restarted destination takes it, clean.
    migrate_and_check_clean(source, dest)


@pytest.mark.parametrize("side", ["source", "destination"])
def test_sigterm_during_migration_exits_0_and_loses_no_guest(
    tmp_path: Path, daemons: dict[str, ServeProcess], side: str
) -> None:
    source, dest = daemons["A"], daemons["B"]
    running_guest(source)
    mid = migrate_slowly_until_under_way(source, dest)

    if side == "source":
        assert source.stop() == 0, source.log()
        assert finished(dest, mid)["status"] == "failed"
        assert_no_guest(dest, tmp_path / "hostB")
        daemons["A"] = source = restart(tmp_path, source)
        # Shut down cleanly: the migration was cancelled (guest resumed), then the guest stopped.
        migration = source.request("GET", f"/v1/migrations/{mid}")[1]
        assert migration["status"] == "cancelled", migration
        assert source.request("GET", "/v1/guests/g1")[1]["state"] == "stopped"
        start_and_wait_ready(source)
    else:
        assert dest.stop() == 0, dest.log()
        assert finished(source, mid)["status"] == "failed"
        assert source.request("GET", "/v1/guests/g1")[1]["state"] == "running"
        daemons["B"] = dest = restart(tmp_path, dest)
        assert_no_guest(dest, tmp_path / "hostB")
        assert dest.request("GET", f"/v1/migrations/{mid}")[1]["status"] == "failed"
    migrate_and_check_clean(source, dest)
