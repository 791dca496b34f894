"""Real ``migd serve`` processes for integration tests: config, keys, token, free ports.

    daemon = ServeProcess.start(tmp_path, "hostA")     # waits for /v1/health
    status, body = daemon.request("POST", "/v1/guests", {"name": "g1", "memory_mib": 16})
    daemon.stop()                                        # SIGTERM, bounded wait, then SIGKILL
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from migd.platform import identity

ROOT = Path(__file__).resolve().parents[2]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now, outside the kernel's ephemeral range.

    A port that ``bind(0)`` hands out comes from the range the kernel also uses for outgoing
    connections, so between this call and the daemon's bind a client socket of another test may
    take it (seen in CI: EADDRINUSE). Ports below the range are only ever taken on purpose.
    """
    low, _high = _ephemeral_range()
    candidates = list(range(10000, low)) if low > 11000 else []
    random.shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(root: Path, name: str, *, api_port: int, migration_port: int, tls: bool = False,
                 transport: str = "bound", extra: str = "") -> Path:
    """Identity (under the shared CA root/ca), token and a config file for host ``name``."""
    state = root / name
    identity.init_host(state, root / "ca", common_name=name)
    token_file = state / "api.token"
    if not token_file.exists():
        token_file.write_text(secrets.token_hex(16) + "\n")
        token_file.chmod(0o600)
    tls_table = ""
    if tls:
        tls_table = f'[tls]\nca = "{root / "ca" / "ca.pem"}"\ncert = "{state / "host.pem"}"\nkey = "{state / "host.key"}"\n'
    config = state / "migd.toml"
    config.write_text(
        f'state_dir = "{state}"\n'
        f'[api]\nlisten = "127.0.0.1:{api_port}"\ntoken_file = "{token_file}"\n'
        f'[migration]\nlisten = "127.0.0.1:{migration_port}"\ndowntime_limit_ms = 300\n'
        f"{tls_table}"
        f'[sev]\ntrusted_roots = ["{root / "ca" / "ca.pem"}"]\ntransport = "{transport}"\n'
        f"{extra}"
    )
    return config


def runtime_dir(root: Path, name: str) -> Path:
    """The host's RUNTIME_DIRECTORY (channel sockets, guest RAM): the same across restarts,
    like systemd's /run/migd with RuntimeDirectoryPreserve=, and short enough for sockets."""
    path = root / f"run-{name}"
    if len(os.fsencode(path)) > 80:
        digest = hashlib.sha256(os.fsencode(root)).hexdigest()[:12]
        path = Path(tempfile.gettempdir()) / f"migd-{digest}-{name}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


class ServeProcess:
    """One ``migd serve`` child process."""

    def __init__(self, root: Path, name: str, proc: subprocess.Popen[bytes], config: Path,
                 api_port: int, migration_port: int, log_path: Path) -> None:
        self.root, self.name, self.proc, self.config = root, name, proc, config
        self.api_port, self.migration_port = api_port, migration_port
        self.log_path = log_path
        self.token = (root / name / "api.token").read_text().strip()

    @classmethod
    def start(cls, root: Path, name: str, *, env: dict[str, str] | None = None, wait: bool = True,
              api_port: int | None = None, migration_port: int | None = None, **config_kw: Any) -> ServeProcess:
        chosen = api_port is None and migration_port is None
        for attempt in range(3):
            api = api_port or free_port()
            migration = migration_port or free_port()
            config = write_config(root, name, api_port=api, migration_port=migration, **config_kw)
            runtime = runtime_dir(root, name)
            log_path = root / f"{name}.log"
            environment = {**os.environ, "RUNTIME_DIRECTORY": str(runtime), **(env or {})}
            with open(log_path, "ab") as log:
                start_offset = log.tell()
                proc = subprocess.Popen(
                    [sys.executable, "-m", "migd", "serve", "--config", str(config)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=environment,
                )
            daemon = cls(root, name, proc, config, api, migration, log_path)
            if not wait:
                return daemon
            try:
                daemon.wait_healthy()
            except RuntimeError:
                # Ports we chose ourselves can still be taken by another process between the
                # check and the daemon's bind; choose again rather than fail the test on it.
                lost_port = "address already in use" in log_path.read_bytes()[start_offset:].decode(errors="replace")
                if chosen and lost_port and attempt < 2:
                    continue
                raise
            return daemon
        raise AssertionError("unreachable")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def destination(self) -> str:
        return f"127.0.0.1:{self.migration_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"migd serve {self.name} exited {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if self.request("GET", "/v1/health", auth=False, timeout=2.0)[0] == 200:
                    return
            time.sleep(0.05)
        raise TimeoutError(f"migd serve {self.name} not healthy after {timeout} s:\n{self.log()}")

    def request(self, method: str, path: str, body: Any = None, *, auth: bool = True,
                token: str | None = None, timeout: float = 60.0) -> tuple[int, Any]:
        """One HTTP request; returns (status, decoded JSON or text or None)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.api_port, timeout=timeout)
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Bearer {token if token is not None else self.token}"
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        if not data:
            return resp.status, None
        if resp.getheader("Content-Type", "").startswith("application/json"):
            return resp.status, json.loads(data)
        return resp.status, data.decode()

    def wait_for(self, method: str, path: str, predicate: Any, timeout: float = 60.0) -> Any:
        """Poll a GET until ``predicate(body)`` holds; returns that body."""
        deadline = time.monotonic() + timeout
        body = None
        while time.monotonic() < deadline:
            status, body = self.request(method, path)
            if status == 200 and predicate(body):
                return body
            time.sleep(0.1)
        raise TimeoutError(f"{path} never satisfied the condition; last body: {body}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait (bounded); SIGKILL past the bound. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode
