"""``migd demo``: the zero-configuration showcase (docs/design.md §9 "External contract").

Two ``migd serve`` daemons on 127.0.0.1, each with its own state directory, identity
(``keys init`` under one throw-away owner CA), API token and config, talking mutual TLS; a
guest on host A under write load with private↔shared page conversions; one live migration
to host B with the progress bar; then a report, including the guest's self-check of every
page after it arrived. Everything lives in one temporary directory that is removed at the
end whatever happens (failure, Ctrl-C, SIGTERM), unless ``--keep`` asks to keep it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from migd.platform import identity
from migd.cli.client import MigdClient
from migd.errors import MigdError
from migd.cli.progress_bar import ProgressDisplay, format_bytes, format_ms, page_breakdown

GUEST = "demo"
HEALTH_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 60.0
MIGRATION_TIMEOUT_S = 600.0
CHECK_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 20.0
#: Let the workload dirty memory before migrating, so pre-copy has real pages to chase.
WARMUP_S = 2.0
#: Unix socket paths must fit in sun_path (108 bytes); guest sockets go under the runtime dir.
MAX_RUNTIME_DIR = 60


class DemoError(MigdError):
    """A step of the demo did not happen (daemon did not start, guest never became ready, ...)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _short_tempdir(prefix: str) -> Path:
    """A new temporary directory whose path is short enough for unix sockets below it."""
    # Guest RAM files live under the runtime directory: tmpfs when there is one, as a VMM
    # backs guest memory with memfd or hugetlbfs rather than a disk file.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix=prefix, dir=shm))
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if len(os.fsencode(path)) <= MAX_RUNTIME_DIR:
        return path
    path.rmdir()
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@dataclass
class DemoHost:
    """One daemon of the demo: its config and, once started, its process."""

    name: str
    config: Path
    api_port: int
    migration_port: int
    token: str
    runtime_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def destination(self) -> str:
        return f"127.0.0.1:{self.migration_port}"

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""


@dataclass(frozen=True)
class Arrival:
    """The guest after the migration: its self-check on hostB and its state on both hosts."""

    pages_verified: int
    total: int
    errors: int
    first_error: str | None
    state: str
    source_state: str

    @property
    def clean(self) -> bool:
        return self.errors == 0 and self.pages_verified == self.total


class DemoWorkspace:
    """The temporary directory tree and the two daemon processes; :meth:`close` undoes everything."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.hosts: list[DemoHost] = []
        self.extra_dirs: list[Path] = []

    @classmethod
    def create(cls, *, tls: bool = True) -> DemoWorkspace:
        """Temporary dirs, a CA, two host identities, tokens and configs with free loopback ports."""
        workspace = cls(Path(tempfile.mkdtemp(prefix="migd-demo-")))
        try:
            for name in ("hostA", "hostB"):
                workspace.hosts.append(workspace._make_host(name, tls=tls))
        except BaseException:
            workspace.close(keep=False)
            raise
        return workspace

    def memory_file(self, host: DemoHost, guest: str) -> Path:
        """Where ``host`` keeps the RAM file of ``guest``."""
        return host.runtime_dir / "guests" / guest / "ram"

    def _make_host(self, name: str, *, tls: bool = True) -> DemoHost:
        state, ca = self.root / name, self.root / "ca"
        identity.init_host(state, ca, common_name=name)  # what `migd keys init` does
        token = secrets.token_hex(16)
        token_file = state / "api.token"
        token_file.write_text(token + "\n")
        token_file.chmod(0o600)
        runtime_dir = _short_tempdir(f"migd-demo-{name}-")
        self.extra_dirs.append(runtime_dir)
        api_port, migration_port = _free_port(), _free_port()
        config = state / "migd.toml"
        config.write_text(
            f'state_dir = "{state}"\n'
            f'[api]\nlisten = "127.0.0.1:{api_port}"\ntoken_file = "{token_file}"\n'
            f'[migration]\nlisten = "127.0.0.1:{migration_port}"\ndowntime_limit_ms = 300\n'
            + (
                f'[tls]\nca = "{ca / identity.CA_CERT}"\ncert = "{state / identity.TLS_CERT}"\n'
                f'key = "{state / identity.TLS_KEY}"\n'
                if tls else ""
            )
            + f'[sev]\ntrusted_roots = ["{ca / identity.CA_CERT}"]\n'
        )
        return DemoHost(name, config, api_port, migration_port, token, runtime_dir, self.root / f"{name}.log")

    def start_daemons(self) -> None:
        """``migd serve`` for each host, in sessions of their own.

        A new session keeps the terminal's Ctrl-C away from the daemons: the demo stops them
        in order itself, and their guest agents (same process group) can be killed with them.
        """
        for host in self.hosts:
            env = {**os.environ, "RUNTIME_DIRECTORY": str(host.runtime_dir)}
            with open(host.log_path, "ab") as log:
                host.proc = subprocess.Popen(
                    [sys.executable, "-m", "migd", "serve", "--config", str(host.config)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                    start_new_session=True,
                )

    def close(self, *, keep: bool) -> None:
        """SIGTERM each daemon, wait (bounded), then SIGKILL its process group; remove the dirs."""
        for host in self.hosts:
            proc = host.proc
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            # Guest agents the daemon failed to stop share its process group (the session
            # leader's pid): none may outlive the demo.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        for path in self.extra_dirs:
            shutil.rmtree(path, ignore_errors=True)
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def _signals_as_interrupts() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C (so the clean-up runs); restored afterwards."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _uninterruptible() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while cleaning up: a second Ctrl-C must not leave daemons behind."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


async def _poll(
    what: str, fetch: Callable[[], Awaitable[dict[str, Any]]], done: Callable[[dict[str, Any]], bool],
    timeout_s: float, interval_s: float = 0.2,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        last = await fetch()
        if done(last):
            return last
        await asyncio.sleep(interval_s)
    raise DemoError(f"{what} did not happen within {timeout_s:g} s (last state: {last})")


async def _wait_healthy(host: DemoHost, api: MigdClient) -> None:
    deadline = time.monotonic() + HEALTH_TIMEOUT_S
    while time.monotonic() < deadline:
        assert host.proc is not None
        if host.proc.poll() is not None:
            raise DemoError(f"migd serve ({host.name}) exited with {host.proc.returncode}:\n{host.log_tail()}")
        with contextlib.suppress(MigdError):
            await api.health()
            return
        await asyncio.sleep(0.1)
    raise DemoError(f"migd serve ({host.name}) not answering after {HEALTH_TIMEOUT_S:g} s:\n{host.log_tail()}")


async def _scenario(
    workspace: DemoWorkspace, memory_mib: int, workload: dict[str, Any], out: TextIO, err: TextIO
) -> int:
    from migd.cli.watch import watch_migration  # the same watcher as `migd migrate`

    host_a, host_b = workspace.hosts

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    async with MigdClient(host_a.api, host_a.token) as a, MigdClient(host_b.api, host_b.token) as b:
        await asyncio.gather(_wait_healthy(host_a, a), _wait_healthy(host_b, b))
        for host in workspace.hosts:
            say(f"  {host.name}: API {host.api}, migrations {host.destination} (mutual TLS)")

        await a.create_guest(GUEST, memory_mib)
        await a.start_guest(GUEST, workload)
        say(f"guest {GUEST!r} ({memory_mib} MiB) started on hostA: writes {workload['dirty_rate_mib_s']:g} MiB/s, "
            f"{workload['convert_rate_hz']:g} private<->shared conversions/s")
        guest = await _poll("migration readiness (MSR READY)", lambda: a.guest(GUEST),
                            lambda g: g["migration_control"]["ready"], READY_TIMEOUT_S)
        say(f"guest negotiated live migration (MSR {guest['migration_control']['msr']:#x}); "
            f"{guest['pages']['shared']} of {guest['pages']['total']} pages shared")

        say(f"letting the guest work for {WARMUP_S:g} s ...")
        await asyncio.sleep(WARMUP_S)
        say(f"migrating {GUEST!r} hostA -> hostB ({host_b.destination}) ...")
        started = await a.migrate(GUEST, host_b.destination)
        async with asyncio.timeout(MIGRATION_TIMEOUT_S):
            migration, _ = await watch_migration(a, started, ProgressDisplay(err))

        check: Arrival | None = None
        if migration["status"] == "completed":
            say("waiting for the guest's self-check on hostB ...")
            arrived = await _poll(
                "the arrival self-check", lambda: b.guest(GUEST),
                lambda g: g["check"]["pages_verified"] >= g["pages"]["total"] or g["check"]["errors"] > 0,
                CHECK_TIMEOUT_S,
            )
            check = Arrival(
                pages_verified=arrived["check"]["pages_verified"], total=arrived["pages"]["total"],
                errors=arrived["check"]["errors"], first_error=arrived["check"]["last_error"],
                state=arrived["state"], source_state=(await a.guest(GUEST))["state"],
            )

    for line in report_lines(migration, check):
        say(line)
    if not report_clean(migration, check):
        _print_logs(workspace, err)
        return 1
    return 0


def report_lines(migration: dict[str, Any], check: Arrival | None) -> list[str]:
    """The demo's closing report: the migration, then the guest's self-check on arrival."""
    nbytes = migration["bytes"]
    lines = [
        "",
        "== migd demo report ==",
        f"migration:   {migration['status']} after {migration['rounds']} rounds",
        f"transferred: {format_bytes(nbytes['transferred'])} on the wire "
        f"(guest memory {format_bytes(nbytes['total'])})",
        f"pages sent:  {page_breakdown(migration['pages'])}",
        f"throughput:  {migration['throughput_mib_s']:.1f} MiB/s",
        f"downtime:    {format_ms(migration.get('downtime_ms'))}",
        f"total time:  {format_ms(migration.get('total_time_ms'))}",
    ]
    if migration.get("error"):
        lines.append(f"error:       {migration['error']}")
    if check is None:
        lines.append("self-check:  not run (the guest did not arrive)")
    else:
        lines.append(
            f"self-check:  {check.pages_verified} of {check.total} pages verified on hostB, {check.errors} errors"
        )
        if check.first_error:
            lines.append(f"first error: {check.first_error}")
        lines.append(f"guest:       {check.state} on hostB, {check.source_state} on hostA")
    lines.append(f"result:      {'OK' if report_clean(migration, check) else 'FAILED'}")
    return lines


def report_clean(migration: dict[str, Any], check: Arrival | None) -> bool:
    """Completed, and the guest verified every page on arrival without an error."""
    return migration["status"] == "completed" and check is not None and check.clean


def _print_logs(workspace: DemoWorkspace | None, err: TextIO) -> None:
    """The daemons' last log lines: what went wrong is usually there."""
    for host in workspace.hosts if workspace is not None else ():
        tail = host.log_tail()
        if tail:
            print(f"--- last lines of {host.name}'s log ---\n{tail}", file=err, flush=True)


def run_demo(
    *, memory_mib: int = 512, keep: bool = False, dirty_rate_mib_s: float = 32.0, convert_rate_hz: float = 20.0,
    out: TextIO | None = None, err: TextIO | None = None,
) -> int:
    """Run the whole demo; exit code 0 only if the migration completed and the self-check is clean."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    workload = {"dirty_rate_mib_s": dirty_rate_mib_s, "convert_rate_hz": convert_rate_hz, "seed": 1}
    workspace: DemoWorkspace | None = None
    with _signals_as_interrupts():
        try:
            workspace = DemoWorkspace.create()
            print(f"migd demo: two daemons on 127.0.0.1 under {workspace.root}", file=out, flush=True)
            workspace.start_daemons()
            return asyncio.run(_scenario(workspace, memory_mib, workload, out, err))
        except KeyboardInterrupt:
            print("\nmigd demo: interrupted; cleaning up", file=err, flush=True)
            return 130
        except MigdError as exc:
            print(f"migd demo: error: {exc}", file=err, flush=True)
            _print_logs(workspace, err)
            return 1
        except TimeoutError:
            print(f"migd demo: error: the migration did not finish within {MIGRATION_TIMEOUT_S:g} s", file=err)
            return 1
        finally:
            if workspace is not None:
                with _uninterruptible():
                    workspace.close(keep=keep)
                if keep:
                    print(f"migd demo: kept {workspace.root} (configs, state, daemon logs)", file=err, flush=True)
