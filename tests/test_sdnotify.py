"""sd_notify: the Notifier on its own, then a real ``migd serve`` talking to a test NOTIFY_SOCKET."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migd.daemon.sdnotify import Notifier
from integration.serve_process import ServeProcess


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A bound unix datagram socket (short path: sun_path is 108 bytes) and its address."""
    directory = tempfile.mkdtemp(prefix="migd-notify-")
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        yield sock, path
    finally:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
            os.rmdir(directory)


def _messages(sock: socket.socket, until: str, timeout: float) -> list[dict[str, str]]:
    """Receive datagrams until one holds the line ``until`` (or fail after ``timeout``)."""
    received: list[dict[str, str]] = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {until!r} within {timeout} s; got {received}")
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            continue
        fields = dict(line.split("=", 1) for line in data.decode().splitlines())
        received.append(fields)
        key, value = until.split("=", 1)
        if fields.get(key) == value:
            return received


# ---------------------------------------------------------------------- the Notifier


def test_notifier_sends_one_datagram_of_key_value_lines(notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    notifier = Notifier(path)
    assert notifier.enabled
    assert notifier.notify(READY=1, STATUS="2 guests")
    sock.settimeout(2)
    assert sock.recv(4096) == b"READY=1\nSTATUS=2 guests"
    notifier.close()
    assert not notifier.notify(READY=1)


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"migd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        notifier = Notifier("@" + name)
        assert notifier.notify(WATCHDOG=1)
        sock.settimeout(2)
        assert sock.recv(4096) == b"WATCHDOG=1"
        notifier.close()


def test_notifier_without_systemd_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    assert not notifier.notify(READY=1)


def test_notifier_survives_a_vanished_socket(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    assert not notifier.notify(READY=1)  # logged, not raised: systemd going away must not kill migd


def test_watchdog_interval_is_half_the_timeout_and_only_for_this_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    notifier = Notifier("")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert notifier.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert notifier.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert notifier.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # the watchdog is another process's
    assert notifier.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert notifier.watchdog_interval() is None


# ---------------------------------------------------------------------- a real daemon


def test_serve_notifies_ready_status_watchdog_and_stopping(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}  # 2 s: a WATCHDOG=1 every second
    daemon = ServeProcess.start(tmp_path, "hostA", env=env, wait=False)
    try:
        first = _messages(sock, "READY=1", timeout=30)
        # READY=1 only once both listeners accept connections (systemd orders dependants on it).
        assert daemon.request("GET", "/v1/health", auth=False)[0] == 200
        with socket.create_connection(("127.0.0.1", daemon.migration_port), timeout=5):
            pass
        ready = first[-1]
        assert ready["STATUS"] == "0 guests, no active migration"

        status, _ = daemon.request("POST", "/v1/guests", {"name": "g1", "memory_mib": 16})
        assert status == 201
        beats = _messages(sock, "WATCHDOG=1", timeout=5)
        assert beats[-1]["STATUS"] == "1 guests, no active migration"  # STATUS follows the daemon

        daemon.proc.send_signal(signal.SIGTERM)
        stopping = _messages(sock, "STOPPING=1", timeout=30)
        assert stopping[-1]["STATUS"] == "stopping"
        assert daemon.proc.wait(30) == 0
    finally:
        daemon.stop()


def test_status_names_the_active_migration(tmp_path: Path, notify_socket: tuple[socket.socket, str]) -> None:
    sock, path = notify_socket
    source = ServeProcess.start(tmp_path, "hostA", env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
    dest = ServeProcess.start(tmp_path, "hostB")
    try:
        assert source.request("POST", "/v1/guests", {"name": "g1", "memory_mib": 64})[0] == 201
        workload = {"dirty_rate_mib_s": 4, "convert_rate_hz": 5, "seed": 3}
        assert source.request("POST", "/v1/guests/g1/start", {"workload": workload})[0] == 200
        source.wait_for("GET", "/v1/guests/g1", lambda g: g["migration_control"]["ready"], timeout=20)
        # A slow link keeps the migration active for several heartbeats.
        status, migration = source.request("POST", "/v1/guests/g1/migrate",
                                           {"destination": dest.destination, "max_bandwidth_mib_s": 8})
        assert status == 202, migration
        received = _messages(sock, "WATCHDOG=1", timeout=5)
        deadline = time.monotonic() + 20
        while "migrating: g1 source" not in received[-1].get("STATUS", ""):
            assert time.monotonic() < deadline, received
            received = _messages(sock, "WATCHDOG=1", timeout=5)
        assert received[-1]["STATUS"].startswith("1 guests; migrating: g1 source ")
        assert source.request("POST", f"/v1/migrations/{migration['id']}/cancel")[0] == 202
    finally:
        assert source.stop() == 0
        assert dest.stop() == 0
