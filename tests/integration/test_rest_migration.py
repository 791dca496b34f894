"""Two real ``migd serve`` processes started from config files; a live migration driven only
through their REST APIs completes, and the guest's self-check on arrival is clean."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from .serve_process import ServeProcess

MEMORY_MIB = 16
NPAGES = MEMORY_MIB * 256


def _sample(metrics: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", metrics, re.MULTILINE)
    assert match, f"{series} missing from /metrics"
    return float(match.group(1))


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "mutual-tls"])
def test_a_migration_driven_only_through_rest_completes_with_a_clean_self_check(tmp_path: Path, tls: bool) -> None:
    a = b = None
    try:
        a = ServeProcess.start(tmp_path, "hostA", tls=tls)
        b = ServeProcess.start(tmp_path, "hostB", tls=tls)
        status, guest = a.request("POST", "/v1/guests", {"name": "g1", "memory_mib": MEMORY_MIB})
        assert status == 201, guest
        workload = {"dirty_rate_mib_s": 4, "convert_rate_hz": 10, "seed": 11}
        status, guest = a.request("POST", "/v1/guests/g1/start", {"workload": workload})
        assert status == 200 and guest["state"] == "running", guest
        a.wait_for("GET", "/v1/guests/g1", lambda g: g["migration_control"]["ready"], timeout=20)

        # TLS: the certificate names the host, so dial it by name (127.0.0.1 is not in the SAN).
        destination = f"localhost:{b.migration_port}" if tls else b.destination
        status, migration = a.request("POST", "/v1/guests/g1/migrate", {"destination": destination})
        assert status == 202, migration
        assert migration["role"] == "source" and migration["guest"] == "g1"
        done: dict[str, Any] = a.wait_for(
            "GET", f"/v1/migrations/{migration['id']}", lambda m: m["status"] in ("completed", "failed", "cancelled"),
            timeout=30,
        )
        assert done["status"] == "completed", (done, a.log(), b.log())
        assert done["error"] is None and done["downtime_ms"] is not None
        assert done["bytes"]["transferred"] > 0 and done["bytes"]["remaining"] == 0

        arrived = b.wait_for("GET", "/v1/guests/g1", lambda g: g["check"]["pages_verified"] > 0, timeout=30)
        assert arrived["state"] == "running"
        assert arrived["check"] == {"pages_verified": NPAGES, "errors": 0, "last_error": None}, arrived
        assert arrived["pages"]["total"] == NPAGES
        status, incoming = b.request("GET", f"/v1/migrations/{migration['id']}")
        assert status == 200 and incoming["role"] == "destination" and incoming["status"] == "completed"
        assert incoming["guest"] == "g1"
        a.wait_for("GET", "/v1/guests/g1", lambda g: g["state"] == "migrated", timeout=10)

        status, metrics = a.request("GET", "/metrics")
        assert status == 200
        assert _sample(metrics, 'migd_migrations_total{role="source",result="completed"}') == 1
        assert _sample(metrics, 'migd_migration_bytes_total{role="source",kind="private"}') > 0
        assert _sample(metrics, "migd_migration_downtime_seconds_count") == 1
        status, metrics = b.request("GET", "/metrics")
        assert _sample(metrics, 'migd_migrations_total{role="destination",result="completed"}') == 1
        assert _sample(metrics, 'migd_guests{state="running"}') == 1

        assert b.stop() == 0 and a.stop() == 0  # SIGTERM: clean exit with the guest running on B
    finally:
        for daemon in (a, b):
            if daemon is not None:
                daemon.stop()
