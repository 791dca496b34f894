"""Host-side helper that starts a guest agent process (``python -m migd.guest.agent`` / ``migd agent``).

The guest's VEK stands for the CPU key slot the PSP loads on ACTIVATE: only the agent may hold
it. It is handed over on an inherited pipe (the agent reads it from ``--key-fd`` until EOF and
closes it) — never on the command line or in the environment, where ``/proc/PID/cmdline`` and
``/proc/PID/environ`` would show it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from migd.errors import ConfigError
from migd.platform.memory import VEK_SIZE
from migd.guest.workload import WorkloadConfig

#: How the agent is started by default: the same interpreter, as a module (works in a venv
#: without the ``migd`` console script on PATH). ``("migd", "agent")`` is the installed form.
#: ``-P``: ``python -m`` would put the daemon's working directory first on sys.path, and a
#: ``concurrent.py`` or ``operator.py`` there would run inside every agent. Not ``-I``: that
#: also drops PYTHONPATH and the other PYTHON* variables, which an operator (or a
#: sitecustomize hook, tests/test_systemd_unit.py) sets for the daemon and its agents alike.
DEFAULT_COMMAND: tuple[str, ...] = (sys.executable, "-P", "-m", "migd.guest.agent")


@dataclass(frozen=True)
class AgentSpec:
    """What to start: one guest's agent and its boot/workload options."""

    name: str
    socket_path: Path
    ram_path: Path
    npages: int
    efi: bool = False
    incoming: bool = False
    firmware_shared: tuple[tuple[int, int], ...] | None = None
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    unsafe_kexec_keep_msr: bool = False
    verbose: bool = False

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("agent name must be non-empty")
        if isinstance(self.npages, bool) or not isinstance(self.npages, int) or self.npages <= 0:
            raise ConfigError(f"agent npages must be a positive integer, got {self.npages!r}")

    def argv(self, key_fd: int) -> list[str]:
        """The agent's arguments (after the command), reading its key from ``key_fd``."""
        args = [
            "--name", self.name,
            "--socket", os.fspath(self.socket_path),
            "--ram", os.fspath(self.ram_path),
            "--npages", str(self.npages),
            "--key-fd", str(key_fd),
            "--dirty-rate-mib-s", repr(float(self.workload.dirty_rate_mib_s)),
            "--convert-rate-hz", repr(float(self.workload.convert_rate_hz)),
            "--seed", str(self.workload.seed),
            "--populate-fraction", repr(float(self.workload.populate_fraction)),
            "--shared-fraction", repr(float(self.workload.shared_fraction)),
            "--kexec-after-s", repr(float(self.workload.kexec_after_s)),
            "--reboot-after-s", repr(float(self.workload.reboot_after_s)),
            "--boot-time-s", repr(float(self.workload.boot_time_s)),
        ]
        if self.efi:
            args.append("--efi")
        if self.incoming:
            args.append("--incoming")
        for gpa, npages in self.firmware_shared or ():
            args += ["--firmware-shared", f"{gpa:#x}:{npages}"]
        if self.unsafe_kexec_keep_msr:
            args.append("--unsafe-kexec-keep-msr")
        if self.verbose:
            args.append("--verbose")
        return args


class AgentProcess:
    """A running agent: its pid, and wait / terminate / kill."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen

    @property
    def pid(self) -> int:
        """The agent's process id."""
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once it has exited (negative: killed by that signal), else None."""
        return self._popen.poll()

    def poll(self) -> int | None:
        """Non-blocking: the exit status, or None while running."""
        return self._popen.poll()

    def wait(self, timeout: float | None = None) -> int:
        """Block until the agent exits (``subprocess.TimeoutExpired`` after ``timeout``)."""
        return self._popen.wait(timeout)

    async def wait_async(self, timeout: float | None = None) -> int:
        """Wait without blocking the event loop (polls every 20 ms; TimeoutError after ``timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while (code := self._popen.poll()) is None:
            if deadline is not None and loop.time() >= deadline:
                raise TimeoutError(f"agent pid {self.pid} still running after {timeout:g} s")
            await asyncio.sleep(0.02)
        return code

    def terminate(self) -> None:
        """SIGTERM: the agent runs its offline path (MSR 0) if its vCPU is running, then exits."""
        if self._popen.poll() is None:
            self._popen.terminate()

    def kill(self) -> None:
        """SIGKILL (no offline path)."""
        if self._popen.poll() is None:
            self._popen.kill()

    def stop(self, timeout: float = 5.0) -> int:
        """terminate, wait up to ``timeout``, then kill; returns the exit status."""
        self.terminate()
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self._popen.kill()
            return self._popen.wait()


def launch_agent(
    spec: AgentSpec,
    vek: bytes,
    *,
    command: Sequence[str] = DEFAULT_COMMAND,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> AgentProcess:
    """Start ``command + spec.argv(fd)`` with ``vek`` on an inherited pipe; returns its handle."""
    vek = bytes(vek)
    if len(vek) != VEK_SIZE:
        raise ConfigError(f"expected a {VEK_SIZE}-byte VEK, got {len(vek)} bytes")
    read_fd, write_fd = os.pipe()
    try:
        popen = subprocess.Popen(
            [*command, *spec.argv(read_fd)],
            pass_fds=(read_fd,),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
    except BaseException:
        os.close(write_fd)
        raise
    finally:
        os.close(read_fd)
    try:
        # 32 bytes fit in any pipe buffer: this never blocks, even if the agent is slow to read.
        os.write(write_fd, vek)
    except OSError:
        popen.kill()
        popen.wait()
        raise
    finally:
        with contextlib.suppress(OSError):
            os.close(write_fd)
    return AgentProcess(popen)


def describe_exit(returncode: int) -> str:
    """How a process ended, for people: ``killed by SIGBUS``, ``exited with status 1``."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def process_start_ticks(pid: int) -> int | None:
    """A live process's start time (clock ticks since boot, /proc/PID/stat field 22), else None.

    With the pid it identifies a process for good: a pid reused by another process has
    another start time. Zombies count as gone.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):
        return None
    try:
        return int(fields[19])  # field 22 overall: 3 is fields[0]
    except (IndexError, ValueError):
        return None
