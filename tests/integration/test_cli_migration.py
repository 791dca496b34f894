"""A live migration between two real ``migd serve`` processes, driven only through the CLI.

Every step is ``python -m migd --api URL --token-file FILE ...`` in a process of its own, as an
operator would type it; the daemons are read back through the CLI too (``--json``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .serve_process import ROOT, ServeProcess

pytestmark = pytest.mark.timeout(180)


class Cli:
    """``python -m migd`` pointed at one daemon."""

    def __init__(self, daemon: ServeProcess) -> None:
        self.daemon = daemon
        self.token_file = daemon.root / daemon.name / "api.token"

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "migd", "--api", self.daemon.url, "--token-file", str(self.token_file), *args]

    def __call__(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MIGD_")}
        return subprocess.run(self.argv(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def poll(self, predicate: Callable[[Any], bool], *args: str, timeout: float = 60.0) -> Any:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.json(*args)
            if predicate(value):
                return value
            time.sleep(0.2)
        raise TimeoutError(f"migd {' '.join(args)} never satisfied the condition; last: {value}")


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[ServeProcess, ServeProcess]]:
    a = ServeProcess.start(tmp_path, "hostA")
    try:
        b = ServeProcess.start(tmp_path, "hostB")
    except BaseException:
        a.stop()
        raise
    try:
        yield a, b
    finally:
        for daemon in (a, b):
            daemon.stop()


def _reason(daemon: ServeProcess, method: str, path: str, body: Any = None) -> tuple[int, str]:
    """What the daemon answers the same request over plain REST: (status, the CLI's error line)."""
    status, answer = daemon.request(method, path, body)
    return status, f"migd: error: {status} {answer['error']}: {answer['detail']}\n"


def test_migration_driven_only_through_the_cli(hosts: tuple[ServeProcess, ServeProcess]) -> None:
    a, b = hosts
    cli_a, cli_b = Cli(a), Cli(b)

    created = cli_a("guest", "create", "g1", "--memory-mib", "64")
    assert created.returncode == 0, created.stderr
    # Not booted yet: the MSR is not READY, the daemon refuses with 409 and the CLI says why.
    refused = cli_a("migrate", "g1", "--to", b.destination)
    status, line = _reason(a, "POST", "/v1/guests/g1/migrate", {"destination": b.destination})
    assert status == 409 and refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr == line and "g1" in line

    started = cli_a("guest", "start", "g1", "--dirty-rate-mib-s", "16", "--convert-rate-hz", "10", "--seed", "3")
    assert started.returncode == 0, started.stderr
    assert cli_a.poll(lambda g: g["migration_control"]["ready"], "guest", "show", "g1")["state"] == "running"
    time.sleep(0.5)  # let the workload dirty memory: pre-copy has pages to chase

    migrated = cli_a("migrate", "g1", "--to", b.destination)
    assert migrated.returncode == 0, migrated.stderr + a.log()
    summary = migrated.stdout
    assert re.search(r"^migration [0-9a-f]+ of g1 \(source\) to 127\.0\.0\.1:\d+: completed$", summary, re.M)
    for label in ("rounds:", "transferred:", "pages sent:", "throughput:", "downtime:", "total time:"):
        assert label in summary
    # stderr is not a terminal here: the progress bar comes as plain lines, no control characters.
    header, *bar = migrated.stderr.splitlines()
    assert re.fullmatch(rf"migration [0-9a-f]+: g1 -> {re.escape(b.destination)}", header)
    assert bar and all(line.startswith("g1 ") and "round" in line and "%" in line for line in bar)
    assert "\r" not in migrated.stderr and "\x1b" not in migrated.stderr
    assert bar[-1].split()[1] == "completed"

    arrived = cli_b.poll(lambda g: g["check"]["pages_verified"] >= g["pages"]["total"], "guest", "show", "g1")
    assert arrived["state"] == "running" and arrived["pages"]["total"] == 64 * 256
    assert arrived["check"] == {"pages_verified": 64 * 256, "errors": 0, "last_error": None}
    assert cli_a.json("guest", "show", "g1")["state"] == "migrated"
    incoming = cli_b.json("migrations")["migrations"]
    assert [(m["guest"], m["role"], m["status"]) for m in incoming] == [("g1", "destination", "completed")]

    # Unknown migration: 404 with the daemon's reason.
    cancel = cli_a("cancel", "0123456789abcdef")
    status, line = _reason(a, "POST", "/v1/migrations/0123456789abcdef/cancel")
    assert status == 404 and cancel.returncode == 1 and cancel.stderr == line
    # A finished migration cannot be cancelled: 409 with the reason.
    done = cli_a.json("migrations")["migrations"][0]
    cancel = cli_a("cancel", done["id"])
    assert cancel.returncode == 1 and cancel.stderr.startswith("migd: error: 409 conflict: ")

    # And back with --no-wait: the id at once, then `migd migrations ID` to follow it. The
    # source keeps a `migrated` record of the guest, which would block the name: delete it first.
    deleted = cli_a("guest", "delete", "g1")
    assert deleted.returncode == 0, deleted.stderr
    back = cli_b("migrate", "g1", "--to", a.destination, "--no-wait")
    assert back.returncode == 0 and re.fullmatch(r"[0-9a-f]+\n", back.stdout), back.stderr
    final = cli_b.poll(lambda m: m["status"] in ("completed", "failed", "cancelled"), "migrations",
                       back.stdout.strip())
    assert final["status"] == "completed", final
    home = cli_a.poll(lambda g: g["state"] == "running" and g["check"]["pages_verified"] >= g["pages"]["total"],
                      "guest", "show", "g1")
    assert home["check"]["errors"] == 0


def test_migrate_of_a_running_guest_that_is_not_ready_is_refused_with_the_reason(
    hosts: tuple[ServeProcess, ServeProcess],
) -> None:
    a, b = hosts
    cli_a = Cli(a)
    # An EFI guest whose firmware does not enable live migration never sets the MSR READY.
    assert cli_a("guest", "create", "efi1", "--memory-mib", "16", "--efi", "--uefi-live-migration", "false"
                 ).returncode == 0
    shown = cli_a.json("guest", "start", "efi1")
    assert shown["state"] == "running" and shown["migration_control"]["ready"] is False
    refused = cli_a("migrate", "efi1", "--to", b.destination)
    status, line = _reason(a, "POST", "/v1/guests/efi1/migrate", {"destination": b.destination})
    assert status == 409 and refused.returncode == 1 and refused.stderr == line
    assert cli_a.json("migrations") == {"migrations": []}  # nothing was started
    assert Cli(b).json("guest", "list") == {"guests": []}


def test_ctrl_c_during_migrate_cancels_the_migration(hosts: tuple[ServeProcess, ServeProcess]) -> None:
    """Like ``virsh migrate``: the first Ctrl-C cancels; the guest keeps running on the source."""
    a, b = hosts
    cli_a = Cli(a)
    assert cli_a("guest", "create", "g2", "--memory-mib", "64").returncode == 0
    assert cli_a("guest", "start", "g2", "--dirty-rate-mib-s", "16", "--seed", "5").returncode == 0
    time.sleep(1.0)  # ~16 MiB of private pages to send at 1 MiB/s: the migration cannot finish soon
    proc = subprocess.Popen(
        cli_a.argv("migrate", "g2", "--to", b.destination, "--max-bandwidth-mib-s", "1"), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # never inherit an ignored SIGINT
    )
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        while True:
            line = proc.stderr.readline()
            assert line and time.monotonic() < deadline, "no progress line from migd migrate"
            if " active " in line:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "cancelling migration" in err and ": cancelled" in out + err
    migration = cli_a.json("migrations")["migrations"][0]
    assert migration["status"] == "cancelled"
    guest = cli_a.json("guest", "show", "g2")
    assert guest["state"] == "running" and guest["migration_control"]["ready"]
