"""TLS diagnostics with real processes: `migd serve` refuses a TLS identity its peers would refuse,
a running daemon logs a refused TLS peer and sends it the alert that says why, and a source
reports why its TLS handshake with a destination failed.

Negative controls: the same `migd serve` with its sound identity starts (so the refusal is the
certificate's doing); the source's wording is checked against errors from real handshakes, and
the plain "stream closed" it gave before does not pass the check.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migd import listener as listener_module
from migd.host import Host
from migd.listener import MigrationListener
from migd.platform import identity
from migd.platform.pki_verify import tls_client_context, tls_server_context
from migd.platform.psp import PspFirmware
from migd.source import closed_by_tls, tls_connect_failure
from migd.stream import StreamClosed, open_stream

from .serve_process import ROOT, ServeProcess, free_port, runtime_dir, write_config

WAIT = 20.0


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _break_identity(root: Path, how: str) -> None:
    """Replace hostA's TLS files with ones peers (trusting root/ca) refuse."""
    state = root / "hostA"
    if how == "other-ca":
        identity.init_host(root / "rogue", root / "rogue-ca", common_name="hostA")
        for name in (identity.TLS_CERT, identity.TLS_KEY):
            shutil.copyfile(root / "rogue" / name, state / name)
    elif how == "key-mismatch":
        identity.init_host(root / "hostB", root / "ca", common_name="hostB")
        shutil.copyfile(root / "hostB" / identity.TLS_KEY, state / identity.TLS_KEY)
    elif how != "sound":
        raise AssertionError(how)


@pytest.mark.parametrize("how", ["other-ca", "key-mismatch", "sound"])
def test_migd_serve_refuses_a_tls_identity_its_peers_would_refuse(tmp_path: Path, how: str) -> None:
    """Exit 1 with one line naming the file and the problem, before anything listens; the sound
    identity (the negative control) starts and answers /v1/health."""
    api_port, migration_port = free_port(), free_port()
    config = write_config(tmp_path, "hostA", api_port=api_port, migration_port=migration_port, tls=True)
    _break_identity(tmp_path, how)
    if how == "sound":
        daemon = ServeProcess.start(tmp_path, "hostA", api_port=api_port, migration_port=migration_port, tls=True)
        assert daemon.stop() == 0
        return
    env = {"RUNTIME_DIRECTORY": str(runtime_dir(tmp_path, "hostA")), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "migd", "serve", "--config", str(config)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done
    errors = [line for line in done.stderr.splitlines() if line.startswith("migd: error: ")]
    assert len(errors) == 1, done.stderr
    expected = {
        # Both owner CAs have the default name: the signature tells them apart.
        "other-ca": (str(tmp_path / "hostA" / identity.TLS_CERT), "its signature does not verify under that CA's key"),
        "key-mismatch": (str(tmp_path / "hostA" / identity.TLS_KEY), "is not the key of tls.cert"),
    }[how]
    assert all(part in errors[0] for part in expected), errors[0]
    assert "migration listener on" not in done.stderr and "REST API on" not in done.stderr
    assert _port_free(api_port) and _port_free(migration_port)


def test_a_running_daemon_logs_a_refused_peer_and_sends_it_the_alert(tmp_path: Path) -> None:
    """`openssl s_client` without a certificate, as an operator would probe: it receives
    certificate_required; the daemon's log names its address and the reason."""
    daemon = ServeProcess.start(tmp_path, "hostA", tls=True)
    try:
        ca = tmp_path / "ca" / identity.CA_CERT
        probe = subprocess.run(
            ["openssl", "s_client", "-connect", daemon.destination, "-CAfile", str(ca), "-msg"],
            input="", capture_output=True, text=True, timeout=WAIT,
        )
        # s_client may quit on its stdin's EOF before reading the alert (TLS 1.3 refuses a client
        # certificate after the client's Finished): ask again and read until the server is done.
        if "certificate_required" not in probe.stdout:
            probe = subprocess.run(
                ["openssl", "s_client", "-connect", daemon.destination, "-CAfile", str(ca), "-msg", "-ign_eof"],
                input="", capture_output=True, text=True, timeout=WAIT,
            )
        assert "<<< TLS 1.3, Alert" in probe.stdout and "certificate_required" in probe.stdout, probe.stdout
        for _ in range(200):  # the line is written at the refusal; the log file may lag a little
            if "reason=tls-no-client-certificate" in daemon.log():
                break
            time.sleep(0.05)
        line = next(line for line in daemon.log().splitlines() if "reason=tls-no-client-certificate" in line)
        assert "incoming connection refused" in line and "peer=127.0.0.1:" in line, line
    finally:
        assert daemon.stop() == 0


# ---------------------------------------------------------------------- the source's side


def _pki(root: Path) -> dict[str, Path]:
    for name in ("hostA", "hostB"):
        identity.init_host(root / name, root / "ca", common_name=name)
    identity.init_host(root / "rogue", root / "rogue-ca", common_name="hostB")
    return {"ca": root / "ca" / identity.CA_CERT, "rogue-ca": root / "rogue-ca" / identity.CA_CERT}


async def _source_error(root: Path, kind: str) -> str:
    """What a source gets connecting to hostA's listener with a TLS setup of ``kind``: the
    migration's error text, as OutgoingMigration._handshake builds it."""
    files = _pki(root)
    state = root / "hostA"
    host = Host(state, PspFirmware.from_state_dir(state, [files["ca"]]), runtime_dir=root / "run")
    server = None if kind == "plain-destination" else tls_server_context(
        files["ca"], state / identity.TLS_CERT, state / identity.TLS_KEY)
    listener = MigrationListener(host, ssl_context=server, handshake_timeout_s=5)
    port = await listener.start("127.0.0.1", 0)
    ca = files["rogue-ca"] if kind == "other-ca-destination" else files["ca"]
    who = root / ("rogue" if kind == "refused-by-destination" else "hostB")
    client = tls_client_context(ca, who / identity.TLS_CERT, who / identity.TLS_KEY)
    try:
        async with asyncio.timeout(WAIT):
            try:
                proto = await open_stream("127.0.0.1", port, ssl_context=client, timeout=WAIT)
            except ssl.SSLError as exc:
                return tls_connect_failure(exc.reason, getattr(exc, "verify_code", None), str(exc), "127.0.0.1")
            try:
                await proto.receive(WAIT)  # a real source writes HELLO first; the refusal comes either way
            except StreamClosed as exc:
                return closed_by_tls(exc, "127.0.0.1") or str(exc)
            finally:
                proto.close()
    finally:
        await listener.close()
    raise AssertionError("the connection was not refused")


SOURCE_ERRORS = {
    "other-ca-destination": "TLS: the destination's certificate is not signed by our tls.ca",
    "refused-by-destination": "TLS: the destination refused our certificate",
    "plain-destination": "TLS: the destination does not speak TLS",
}


@pytest.mark.parametrize("kind", list(SOURCE_ERRORS))
def test_a_source_says_why_its_tls_handshake_failed(tmp_path: Path, kind: str) -> None:
    error = asyncio.run(_source_error(tmp_path, kind))
    assert error.startswith(SOURCE_ERRORS[kind]), error


def test_negative_control_without_the_alert_the_source_cannot_say_why(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The former listener dropped the alert: the source saw a bare end of stream, and its error
    fails the check above."""
    monkeypatch.setattr(listener_module, "_AlertingSSLObject", ssl.SSLObject)
    error = asyncio.run(_source_error(tmp_path, "refused-by-destination"))
    assert not error.startswith(SOURCE_ERRORS["refused-by-destination"]), error
