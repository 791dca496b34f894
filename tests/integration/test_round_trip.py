"""A guest goes A → B → A (and on) with no manual delete: the host it left keeps a ``migrated``
record that says where it went, and the guest's return replaces that record.

Two real ``migd serve`` processes, driven through REST, four guests at once in each direction;
the guest self-check covers every page on each arrival. The negative control: a destination that
holds a *running* guest of the same name still refuses the incoming one, and neither copy is
harmed. Retention (``[guests] keep_migrated_count``) and the record's survival across a restart
are checked on a daemon of their own.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from .serve_process import ServeProcess

MEMORY_MIB = 16
NPAGES = MEMORY_MIB * 256
GUESTS = ("g1", "g2", "g3", "g4")
FINISHED = ("completed", "failed", "cancelled")

pytestmark = pytest.mark.timeout(240)


def _start_guests(host: ServeProcess, names: tuple[str, ...], seed: int) -> None:
    for i, name in enumerate(names):
        status, body = host.request("POST", "/v1/guests", {"name": name, "memory_mib": MEMORY_MIB})
        assert status == 201, body
        workload = {"dirty_rate_mib_s": 2, "convert_rate_hz": 5, "seed": seed + i}
        status, body = host.request("POST", f"/v1/guests/{name}/start", {"workload": workload})
        assert status == 200, body
    for name in names:
        host.wait_for("GET", f"/v1/guests/{name}", lambda g: g["migration_control"]["ready"], timeout=30)


def _migrate_all(source: ServeProcess, dest: ServeProcess, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Start every migration at once, then wait for each; returns the finished migration objects."""
    started = {}
    for name in names:
        status, migration = source.request("POST", f"/v1/guests/{name}/migrate", {"destination": dest.destination})
        assert status == 202, migration
        started[name] = migration["id"]
    return {name: source.wait_for("GET", f"/v1/migrations/{mid}", lambda m: m["status"] in FINISHED, timeout=90)
            for name, mid in started.items()}


def _arrived_clean(dest: ServeProcess, name: str) -> dict[str, Any]:
    # The agent self-checks every page after it resumes; a verified count of NPAGES is that check.
    guest = dest.wait_for("GET", f"/v1/guests/{name}",
                          lambda g: g["check"]["pages_verified"] >= NPAGES or g["check"]["errors"], timeout=60)
    assert guest["state"] == "running", guest
    assert guest["check"]["errors"] == 0 and guest["check"]["pages_verified"] == NPAGES, guest
    return guest


def _left_for(host: ServeProcess, name: str, dest: ServeProcess, migration_id: str) -> None:
    """``name`` is listed on ``host`` as what it is: a record of a guest that went to ``dest``."""
    record = host.wait_for("GET", f"/v1/guests/{name}", lambda g: g["state"] == "migrated", timeout=15)
    assert record["migrated"] == {"migration": migration_id, "to": dest.destination}, record
    # Nothing of it is here: not migratable, no page counts of a RAM that is gone.
    assert record["migration_control"]["ready"] is False, record
    assert record["pages"]["private"] == 0 and record["pages"]["shared"] == 0, record


def test_four_guests_go_there_and_back_twice_without_manual_deletes(tmp_path: Path) -> None:
    a = b = None
    try:
        a = ServeProcess.start(tmp_path, "hostA")
        b = ServeProcess.start(tmp_path, "hostB")
        _start_guests(a, GUESTS, seed=100)

        legs = [(a, b), (b, a), (a, b)]
        for source, dest in legs:
            done = _migrate_all(source, dest, GUESTS)
            for name, migration in done.items():
                assert migration["status"] == "completed", (migration, source.log()[-3000:], dest.log()[-3000:])
            for name, migration in done.items():
                _arrived_clean(dest, name)
                _left_for(source, name, dest, migration["id"])
                status, incoming = dest.request("GET", f"/v1/migrations/{migration['id']}")
                assert status == 200 and incoming["role"] == "destination", incoming
                # The destination names itself and the source's listener, not an ephemeral port.
                assert incoming["destination"] == dest.destination, incoming
                assert incoming["source"] == source.destination, incoming
            status, listing = source.request("GET", "/v1/guests")
            assert status == 200
            assert sorted((g["name"], g["state"]) for g in listing["guests"]) == [(n, "migrated") for n in GUESTS]
        status, listing = a.request("GET", "/v1/guests")
        assert all(g["state"] == "migrated" for g in listing["guests"]), listing
    finally:
        for daemon in (a, b):
            if daemon is not None:
                daemon.stop()


def test_a_running_guest_of_the_same_name_still_blocks_an_incoming_one(tmp_path: Path) -> None:
    """Negative control: only a ``migrated`` record gives way; a live guest never does."""
    a = b = None
    try:
        a = ServeProcess.start(tmp_path, "hostA")
        b = ServeProcess.start(tmp_path, "hostB")
        _start_guests(a, ("g1",), seed=7)
        _start_guests(b, ("g1",), seed=8)
        done = _migrate_all(a, b, ("g1",))["g1"]
        assert done["status"] == "failed", done
        assert "guest g1 already exists on the destination (running)" in (done["error"] or ""), done
        # Both copies untouched: A's resumed, B's never paused.
        for host in (a, b):
            status, guest = host.request("GET", "/v1/guests/g1")
            assert status == 200 and guest["state"] == "running" and guest["migrated"] is None, guest
            status, guest = host.request("GET", "/v1/guests/g1")
            assert guest["check"]["errors"] == 0, guest
    finally:
        for daemon in (a, b):
            if daemon is not None:
                daemon.stop()


def test_migrated_records_are_kept_by_count_and_survive_a_restart(tmp_path: Path) -> None:
    a = b = None
    try:
        a = ServeProcess.start(tmp_path, "hostA", extra="[guests]\nkeep_migrated_count = 1\n")
        b = ServeProcess.start(tmp_path, "hostB")
        _start_guests(a, ("g1", "g2"), seed=21)
        first = _migrate_all(a, b, ("g1",))["g1"]
        second = _migrate_all(a, b, ("g2",))["g2"]
        assert first["status"] == second["status"] == "completed", (first, second)
        _left_for(a, "g2", b, second["id"])
        # Only the newest record stays (pruned when the second migration's task ends); the older
        # one is gone, not "stopped" or anything else.
        deadline = time.monotonic() + 15
        while (answer := a.request("GET", "/v1/guests/g1"))[0] != 404 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answer[0] == 404, answer
        assert a.stop() == 0
        a = ServeProcess.start(tmp_path, "hostA", api_port=a.api_port, migration_port=a.migration_port,
                               extra="[guests]\nkeep_migrated_count = 1\n")
        _left_for(a, "g2", b, second["id"])  # the journal still knows where it went
    finally:
        for daemon in (a, b):
            if daemon is not None:
                daemon.stop()
