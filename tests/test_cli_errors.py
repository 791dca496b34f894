"""THE CLI ERROR TABLE: every failure a user can cause or meet → one sentence with the fix, and its exit code.

Each row is produced for real, by ``python -m migd`` in a process of its own against real
``migd serve`` daemons on 127.0.0.1 (A: plain, the source, with short handshake and stall
deadlines; B: plain destination; C: a mutual-TLS destination; D: a mutual-TLS source), ports with
nothing listening, a name under ``.invalid`` (RFC 6761: never resolves), a socket that accepts
and never answers, a fake destination that answers HELLO with another protocol version, and a
destination stopped (SIGSTOP) in the middle of pre-copy. For every row: the exit code, the
sentence (or its key phrases), no exception class names / errnos / library texts anywhere in
stdout or stderr (tests/test_failure_text.py's :func:`class_names_in`), and for a failed
migration that moved nothing: no summary, the error printed once. The negative controls feed
the same row check the old CLI's output for the same failures and see it fail.

docs/operations.md "Errors" is the operator's copy of this table.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from migd import wire
from migd.cli.commands import EXIT_API_ERROR, EXIT_USAGE

from integration.serve_process import ROOT, ServeProcess, free_port, runtime_dir, write_config
from test_failure_text import class_names_in

pytestmark = pytest.mark.timeout(180)

HANDSHAKE_S = 2  # migration.handshake_timeout_s of the source A
STALL_S = 2  # migration.stall_timeout_s of the source A


def _serve(root: Path, name: str, *, migration_keys: str = "", tls: bool = False) -> ServeProcess:
    """``migd serve`` like ServeProcess.start, with extra keys in the config's [migration] table."""
    api_port, migration_port = free_port(), free_port()
    config = write_config(root, name, api_port=api_port, migration_port=migration_port, tls=tls)
    text = config.read_text()
    config.write_text(text.replace("downtime_limit_ms = 300\n", f"downtime_limit_ms = 300\n{migration_keys}", 1))
    log_path = root / f"{name}.log"
    env = {**os.environ, "RUNTIME_DIRECTORY": str(runtime_dir(root, name))}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "migd", "serve", "--config", str(config)], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
    return ServeProcess(root, name, proc, config, api_port, migration_port, log_path)


def _boot(daemon: ServeProcess, name: str, dirty_rate_mib_s: float) -> None:
    status, body = daemon.request("POST", "/v1/guests", {"name": name, "memory_mib": 64})
    assert status == 201, body
    status, body = daemon.request("POST", f"/v1/guests/{name}/start",
                                  {"workload": {"dirty_rate_mib_s": dirty_rate_mib_s, "seed": 3}})
    assert status == 200, body
    daemon.wait_for("GET", f"/v1/guests/{name}", lambda g: g["migration_control"]["ready"], timeout=60)


class WelcomeOfAnotherVersion:
    """A destination of another protocol version: it answers the first HELLO with its WELCOME."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.hello: wire.Hello | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(60)
        with contextlib.suppress(OSError), self.sock.accept()[0] as conn:
            conn.settimeout(30)
            decoder = wire.FrameDecoder()
            while self.hello is None:
                data = conn.recv(65536)
                if not data:
                    return
                for msg in decoder.feed(data):
                    if isinstance(msg, wire.Hello):
                        self.hello = msg
            conn.sendall(wire.encode_bytes(wire.Welcome(b"pdh", version=wire.PROTOCOL_VERSION + 1)))
            while conn.recv(65536):  # until the source hangs up
                pass

    def close(self) -> None:
        self.sock.close()
        self._thread.join(10)


@dataclass
class Hosts:
    root: Path
    a: ServeProcess  # plain source, guest g1 (and g-idle, defined, never started)
    b: ServeProcess  # plain destination
    c: ServeProcess  # TLS destination
    d: ServeProcess  # TLS source, guest g2
    silent: socket.socket  # accepts connections (the kernel does) and never answers
    other_version: WelcomeOfAnotherVersion

    @property
    def silent_address(self) -> str:
        return f"127.0.0.1:{self.silent.getsockname()[1]}"

    def token(self, daemon: ServeProcess) -> Path:
        return daemon.root / daemon.name / "api.token"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    root = tmp_path_factory.mktemp("errors")
    started: list[ServeProcess] = []
    silent = socket.create_server(("127.0.0.1", 0), backlog=8)
    other = WelcomeOfAnotherVersion()
    try:
        # Identities first, one by one (they share the owner CA, which the first one creates).
        a = _serve(root, "hostA", migration_keys=f"handshake_timeout_s = {HANDSHAKE_S}\n"
                                                  f"stall_timeout_s = {STALL_S}\n")
        started.append(a)
        for name, tls in (("hostB", False), ("hostC", True), ("hostD", True)):
            started.append(_serve(root, name, tls=tls))
        for daemon in started:
            daemon.wait_healthy()
        _, b, c, d = started
        _boot(a, "g1", 32)
        _boot(d, "g2", 4)
        assert a.request("POST", "/v1/guests", {"name": "g-idle", "memory_mib": 16})[0] == 201
        yield Hosts(root, a, b, c, d, silent, other)
    finally:
        for daemon in started:
            with contextlib.suppress(OSError):
                os.kill(daemon.proc.pid, signal.SIGCONT)  # a row stops B: never leave it stopped
            daemon.stop()
        silent.close()
        other.close()
        for daemon in started:
            shutil.rmtree(runtime_dir(root, daemon.name), ignore_errors=True)


@dataclass(frozen=True)
class Result:
    code: int
    stdout: str
    stderr: str


def migd(hosts: Hosts, *argv: str, daemon: ServeProcess | None = None, token: Path | None = None,
         api: str | None = None, timeout: float = 60.0) -> Result:
    """``python -m migd ARGV`` against ``daemon`` (default A), as an operator types it."""
    daemon = daemon or hosts.a
    connection = ["--api", api or daemon.url, "--token-file", str(token or hosts.token(daemon))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGD_") and k != "COLUMNS"}
    done = subprocess.run([sys.executable, "-m", "migd", *argv, *connection], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    return Result(done.returncode, done.stdout, done.stderr)


def error_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("migd: error: ")]


def check_row(result: Result, code: int, phrases: tuple[str, ...], *, summary: bool = False) -> str:
    """The row's assertions; returns the error sentence (the text after ``migd: error: ``)."""
    assert result.code == code, result
    assert class_names_in(result.stdout + result.stderr) == [], result
    errors = error_lines(result)
    assert len(errors) == 1, result  # one sentence, once
    sentence = errors[0].removeprefix("migd: error: ")
    for phrase in phrases:
        assert phrase in sentence, (phrase, sentence)
    # Printed once: the summary (if any) leaves the error out; nothing moved, no summary at all.
    assert ("rounds:" in result.stdout) is summary, result
    assert "error:" not in result.stdout
    assert "Traceback" not in result.stderr
    return sentence


def failed_migration(sentence: str, guest: str, destination: str) -> str:
    """The reason of ``migration ID of GUEST to DESTINATION failed: REASON``."""
    match = re.fullmatch(rf"migration [0-9a-f]+ of {guest} to {re.escape(destination)} failed: (.+)", sentence)
    assert match, sentence
    return match.group(1)


# ---------------------------------------------------------------------- (a) the CLI and its daemon


def test_daemon_not_running(hosts: Hosts) -> None:
    port = free_port()
    result = migd(hosts, "guest", "list", api=f"127.0.0.1:{port}")
    assert check_row(result, EXIT_API_ERROR, ()) == (
        f"cannot reach the migd API at http://127.0.0.1:{port}: nothing is listening there; is `migd serve` "
        f"running, and is --api (or api.listen of --config) this address?")


def test_unix_socket_missing(hosts: Hosts, tmp_path: Path) -> None:
    result = migd(hosts, "guest", "list", api=f"unix:{tmp_path}/api.sock")
    assert check_row(result, EXIT_API_ERROR, ()) == (
        f"cannot reach the migd API at unix:{tmp_path}/api.sock: the socket does not exist; is `migd serve` "
        f"running, and is api.listen of its config this path?")


def test_api_name_not_resolved(hosts: Hosts) -> None:
    result = migd(hosts, "guest", "list", api="nonexistent.invalid:8470")
    check_row(result, EXIT_API_ERROR, ("cannot reach the migd API at http://nonexistent.invalid:8470: the host "
                                       "name nonexistent.invalid does not resolve; check --api",))


def test_api_pointed_at_the_migration_port(hosts: Hosts) -> None:
    result = migd(hosts, "guest", "list", api=hosts.b.destination)
    check_row(result, EXIT_API_ERROR, (f"the server at http://{hosts.b.destination} ", "it is not the migd API",
                                       "not migration.listen"))


def test_api_that_never_answers(hosts: Hosts) -> None:
    started = time.monotonic()
    result = migd(hosts, "guest", "list", "--api-timeout", "1", api=hosts.silent_address)
    assert time.monotonic() - started < 30
    assert check_row(result, EXIT_API_ERROR, ()) == (
        f"the migd API at http://{hosts.silent_address} did not answer GET /v1/guests within 1 s: the daemon "
        f"may be overloaded or hung; see its log (journalctl -u migd)")


def test_wrong_token(hosts: Hosts, tmp_path: Path) -> None:
    wrong = tmp_path / "other.token"
    wrong.write_text(hosts.token(hosts.b).read_text())  # another daemon's token
    wrong.chmod(0o600)
    result = migd(hosts, "migrations", token=wrong)
    assert check_row(result, EXIT_API_ERROR, ()) == (
        f"401 unauthorized: wrong bearer token; {wrong} must hold the token in the daemon's api.token_file "
        f"(pass --token-file, or --config with the daemon's config)")


def test_http_errors_carry_the_daemons_reason(hosts: Hosts) -> None:
    status, body = hosts.a.request("GET", "/v1/guests/nosuch")
    result = migd(hosts, "guest", "show", "nosuch")
    assert check_row(result, EXIT_API_ERROR, ()) == f"404 {body['error']}: {body['detail']}" and status == 404
    result = migd(hosts, "migrate", "g-idle", "--to", hosts.b.destination)
    check_row(result, EXIT_API_ERROR, ("409 conflict: guest g-idle is defined",))


@pytest.mark.parametrize("mode, phrase", [(0o644, "readable by every user"), (0o620, "writable by other users")],
                         ids=["0644", "0620"])
def test_token_file_open_to_other_users_is_refused(hosts: Hosts, tmp_path: Path, mode: int, phrase: str) -> None:
    loose = tmp_path / "loose.token"
    loose.write_text(hosts.token(hosts.a).read_text())
    loose.chmod(mode)
    result = migd(hosts, "guest", "list", token=loose)
    check_row(result, EXIT_USAGE, (f"api.token_file: {loose} is {phrase}", f"(mode {mode:04o})",
                                   f"run `chmod 600 {loose}`"))
    # Control: the same file, owner-only, is accepted.
    loose.chmod(0o600)
    assert migd(hosts, "guest", "list", token=loose).code == 0


def test_migd_serve_refuses_a_world_readable_token(hosts: Hosts, tmp_path: Path) -> None:
    config = write_config(tmp_path, "hostE", api_port=free_port(), migration_port=free_port())
    token = tmp_path / "hostE" / "api.token"
    token.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGD_")}
    done = subprocess.run([sys.executable, "-m", "migd", "serve", "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done
    assert f"migd: error: api.token_file: {token} is readable by every user" in done.stderr
    assert f"`chmod 600 {token}`" in done.stderr and class_names_in(done.stderr) == []


# ---------------------------------------------------------------------- (b) the migration's error


def test_destination_port_with_nothing_listening(hosts: Hosts) -> None:
    to = f"127.0.0.1:{free_port()}"
    sentence = check_row(migd(hosts, "migrate", "g1", "--to", to), EXIT_API_ERROR, ())
    assert failed_migration(sentence, "g1", to) == (
        f"nothing is listening on {to}: is migd running on the destination host, and is its migration.listen "
        f"that port?")


def test_destination_name_not_resolved(hosts: Hosts) -> None:
    to = "nonexistent.invalid:4444"
    sentence = check_row(migd(hosts, "migrate", "g1", "--to", to), EXIT_API_ERROR, ())
    assert failed_migration(sentence, "g1", to) == (
        "the destination host name nonexistent.invalid does not resolve: check the name, or give an IP address")


def test_destination_that_never_answers_the_handshake(hosts: Hosts) -> None:
    to = hosts.silent_address
    sentence = check_row(migd(hosts, "migrate", "g1", "--to", to), EXIT_API_ERROR, ())
    assert failed_migration(sentence, "g1", to) == (
        f"the destination did not complete the handshake within {HANDSHAKE_S} s (await-welcome): it sent no "
        f"WELCOME after our HELLO; is that port its migration.listen, and is it overloaded? (the limit is "
        f"migration.handshake_timeout_s)")


def test_destination_of_another_protocol_version(hosts: Hosts) -> None:
    to = hosts.other_version.address
    sentence = check_row(migd(hosts, "migrate", "g1", "--to", to), EXIT_API_ERROR, ())
    assert hosts.other_version.hello is not None  # it really spoke to the fake destination
    assert failed_migration(sentence, "g1", to) == (
        f"protocol version mismatch: the destination speaks migd protocol {wire.PROTOCOL_VERSION + 1}, this "
        f"source {wire.PROTOCOL_VERSION}; run the same migd release on both hosts")


def test_a_destination_refuses_a_source_of_another_protocol_version(hosts: Hosts) -> None:
    """The other direction: the real destination B answers a HELLO of another version with an ABORT
    whose reason (shown at the source as "the destination aborted the migration: ...") says so."""
    hello = wire.Hello("0123456789abcdef", wire.GuestSpec("gv", 16 * 256, 0, False, True), "bound",
                       version=wire.PROTOCOL_VERSION + 1)
    with socket.create_connection(("127.0.0.1", hosts.b.migration_port), timeout=10) as conn:
        conn.sendall(wire.encode_bytes(hello))
        decoder, answers = wire.FrameDecoder(), []
        while not answers:
            data = conn.recv(65536)
            assert data, "the destination hung up without an ABORT"
            answers = decoder.feed(data)
    assert isinstance(answers[0], wire.Abort)
    assert answers[0].reason == (f"protocol version mismatch: the source speaks migd protocol "
                                 f"{wire.PROTOCOL_VERSION + 1}, the destination {wire.PROTOCOL_VERSION}; run the "
                                 f"same migd release on both hosts")


def test_plain_source_to_a_tls_destination(hosts: Hosts) -> None:
    to = hosts.c.destination
    sentence = check_row(migd(hosts, "migrate", "g1", "--to", to), EXIT_API_ERROR, ())
    assert "handshake" in failed_migration(sentence, "g1", to)


def test_tls_source_to_a_plain_destination(hosts: Hosts) -> None:
    to = hosts.b.destination
    sentence = check_row(migd(hosts, "migrate", "g2", "--to", to, daemon=hosts.d), EXIT_API_ERROR, ())
    assert "TLS" in failed_migration(sentence, "g2", to)


def test_destination_that_stops_taking_pages(hosts: Hosts) -> None:
    """B is stopped (SIGSTOP) in pre-copy: the source's stall deadline ends the migration, the guest
    runs on at A. Pages moved, so the summary comes (without the error), the error once on stderr."""
    to = hosts.b.destination
    argv = [sys.executable, "-m", "migd", "migrate", "g1", "--to", to, "--max-bandwidth-mib-s", "8",
            "--api", hosts.a.url, "--token-file", str(hosts.token(hosts.a))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGD_")}
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        deadline = time.monotonic() + 60
        seen = []
        while True:  # the progress lines (plain: stderr is a pipe) say when pre-copy runs
            line = proc.stderr.readline()
            seen.append(line)
            assert line and time.monotonic() < deadline, seen
            if " active " in line:
                break
        os.kill(hosts.b.proc.pid, signal.SIGSTOP)
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            os.kill(hosts.b.proc.pid, signal.SIGCONT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = Result(proc.returncode, out, "".join(seen) + err)
    sentence = check_row(result, EXIT_API_ERROR, (), summary=True)
    reason = failed_migration(sentence, "g1", to)
    assert "stalled" in reason, reason
    assert re.search(r"^migration [0-9a-f]+ of g1 \(source\) to .*: failed$", result.stdout, re.M)
    assert "pages sent:" in result.stdout
    guest = hosts.a.wait_for("GET", "/v1/guests/g1", lambda g: g["state"] == "running", timeout=30)
    assert guest["migration_control"]["ready"]


# ---------------------------------------------------------------------- negative controls


OLD_ALL_ZERO_SUMMARY = """\
migration 5f0c2d1e9a8b7c6d of g1 (source) to 127.0.0.1:4444: failed
  rounds:      0
  transferred: 0 B on the wire (guest memory 64.0 MiB)
  pages sent:  private 0 (0 B), shared 0 (0 B), zero 0 (0 B)
  throughput:  0.0 MiB/s
  downtime:    -
  total time:  3.1 ms
  error:       ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 4444)
"""


@pytest.mark.parametrize("old", [
    # The old CLI for a destination port with nothing listening: the all-zero summary, then the error again.
    Result(1, OLD_ALL_ZERO_SUMMARY, "migration 5f0c2d1e9a8b7c6d: g1 -> 127.0.0.1:4444\nmigd: error: migration "
           "5f0c2d1e9a8b7c6d failed: ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 4444)\n"),
    # Old texts without the summary: each alone is flagged by the class-name check.
    Result(1, "", "migd: error: cannot reach the migd API at http://127.0.0.1:1: Cannot connect to host "
           "127.0.0.1:1 ssl:default [Connect call failed ('127.0.0.1', 1)]\n"),
    Result(1, "", "migd: error: migration 5f0c2d1e9a8b7c6d failed: gaierror: [Errno -2] Name or service not known\n"),
    Result(1, "", "migd: error: migration 5f0c2d1e9a8b7c6d failed: TimeoutError: TimeoutError\n"),
    Result(1, "", "migd: error: migration 5f0c2d1e9a8b7c6d failed: SSLError: [SSL: WRONG_VERSION_NUMBER] wrong "
           "version number (_ssl.c:1006)\n"),
    # A clean sentence printed twice (in the summary and on stderr) is flagged too.
    Result(1, "migration 5f0c2d1e9a8b7c6d of g1 (source) to h:1: failed\n  rounds:      0\n",
           "migd: error: migration 5f0c2d1e9a8b7c6d of g1 to h:1 failed: nothing is listening on h:1\n"),
], ids=["all-zero-summary", "aiohttp-text", "gaierror", "bare-timeout", "ssl-error", "summary-of-nothing"])
def test_the_row_check_fails_on_the_old_output(old: Result) -> None:
    with pytest.raises(AssertionError):
        check_row(old, EXIT_API_ERROR, ())


def test_the_row_check_passes_a_clean_row() -> None:
    """The control of the control: the check is not one that fails on everything."""
    clean = Result(1, "", "migration 5f0c2d1e9a8b7c6d: g1 -> h:1\nmigd: error: migration 5f0c2d1e9a8b7c6d of g1 "
                          "to h:1 failed: nothing is listening on h:1: is migd running on the destination host, and "
                          "is its migration.listen that port?\n")
    assert failed_migration(check_row(clean, EXIT_API_ERROR, ("nothing is listening",)), "g1", "h:1")
