"""systemd/migd.service's SystemCallFilter= is enough for migd: both daemons and their guest
agents migrate a guest under exactly that filter (with RestrictNamespaces=yes's filter before
it, as systemd loads them), through libseccomp; the same filter lacking mincore(2) makes the
migration fail, so the filter really is in force.

The allow-list is computed from the unit text (tests/syscall_filter.py) with systemd's groups
from tests/systemd_syscall_groups.json, which scripts/syscall-groups writes from
``systemd-analyze syscall-filter``. The table is committed rather than read at run time so the
proof runs the same on a machine without systemd-analyze; when this machine's systemd is the
version the table came from, the table is checked against it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.serve_process import ROOT, ServeProcess, free_port, runtime_dir, write_config
from syscall_filter import AllowList, SyscallGroups, UnitFilterError, unit_allow_list

pyseccomp = pytest.importorskip("pyseccomp", reason="pyseccomp (test extra) needs libseccomp.so.2")

UNIT = ROOT / "systemd" / "migd.service"
LAUNCHER = Path(__file__).resolve().with_name("seccomp_launch.py")
GENERATOR = ROOT / "scripts" / "syscall-groups"
MEMORY_MIB = 32
NPAGES = MEMORY_MIB * 256


def _resolve(name: str) -> int:
    return int(pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name))


@pytest.fixture(scope="module")
def groups() -> SyscallGroups:
    return SyscallGroups.load()


@pytest.fixture(scope="module")
def unit_filter(groups: SyscallGroups) -> AllowList:
    return unit_allow_list(UNIT.read_text(), groups, _resolve)


# ------------------------------------------------------------------ the filter computed from the unit


def test_the_unit_filter_is_the_service_set_plus_mincore_minus_privileged_and_resources(
        unit_filter: AllowList, groups: SyscallGroups) -> None:
    import errno

    allowed = set(unit_filter.syscalls.values())
    assert unit_filter.errno == errno.EPERM
    # What migd and its dependencies call (strace of a migration): @default, the service set, mincore.
    assert {"mmap", "execve", "sendmsg", "recvmsg", "fallocate", "memfd_create", "io_uring_setup",
            "clone3", "mincore"} <= allowed
    # Gone: every @privileged and @resources call, and what @system-service never held.
    for removed in ("@privileged", "@resources", "@debug", "@mount", "@module", "@obsolete", "@swap"):
        hit = {name for name in groups.expand(removed) if _resolve(name) in unit_filter.syscalls}
        assert not hit, f"{removed} members allowed: {sorted(hit)}"
    assert {"seccomp", "ptrace", "setuid", "mbind", "sched_setaffinity"}.isdisjoint(allowed)


def test_the_model_follows_systemds_rules(groups: SyscallGroups) -> None:
    """The rules of systemd.exec(5), each shown on a small unit."""
    def allowed(service: str) -> set[str]:
        return set(unit_allow_list(f"[Service]\n{service}\n", groups, _resolve).syscalls.values())

    default = allowed("SystemCallFilter=@default")
    assert "execve" in default and "mmap" in allowed("SystemCallFilter=mincore")  # @default is implied
    assert allowed("SystemCallFilter=@default mincore\nSystemCallFilter=~mincore") == default
    # An empty assignment resets; later ones start over.
    assert allowed("SystemCallFilter=@system-service\nSystemCallFilter=\nSystemCallFilter=mincore") == default | {
        "mincore"}
    # A continued line is one assignment.
    assert allowed("SystemCallFilter=@default \\\n  mincore") == default | {"mincore"}
    # mmap2 has no x86-64 number (a pseudo-number): kept as systemd keeps it, skipped when loaded.
    assert unit_allow_list("[Service]\nSystemCallFilter=nosuchcall\n", groups, _resolve).syscalls.keys() == {
        _resolve(n) for n in default if _resolve(n) != -1}
    with pytest.raises(UnitFilterError, match="unknown system-call group @nosuchgroup"):
        allowed("SystemCallFilter=@nosuchgroup")
    with pytest.raises(UnitFilterError, match="deny-list"):
        allowed("SystemCallFilter=~@mount")
    with pytest.raises(UnitFilterError, match="no SystemCallFilter"):
        allowed("User=migd")
    assert unit_allow_list("[Service]\nSystemCallFilter=@default\n", groups, _resolve).errno is None  # SIGSYS
    # RestrictNamespaces=: the last assignment counts; only yes/no (the unit's form) is modelled.
    namespaces = "[Service]\nSystemCallFilter=@default\nRestrictNamespaces=yes\n"
    assert unit_allow_list(namespaces, groups, _resolve).restrict_namespaces
    assert not unit_allow_list(namespaces + "RestrictNamespaces=no\n", groups, _resolve).restrict_namespaces
    with pytest.raises(UnitFilterError, match="only yes and no"):
        unit_allow_list(namespaces + "RestrictNamespaces=net\n", groups, _resolve)


def test_the_removal_line_is_what_keeps_privileged_calls_out(groups: SyscallGroups) -> None:
    """Negative control for the first test: without ``~@privileged @resources`` they are allowed."""
    text = UNIT.read_text()
    assert "\nSystemCallFilter=~@privileged @resources\n" in text
    weakened = unit_allow_list(text.replace("\nSystemCallFilter=~@privileged @resources\n", "\n"), groups, _resolve)
    assert {"setuid", "mbind", "sched_setaffinity"} <= set(weakened.syscalls.values())


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_the_committed_groups_are_this_systemds(tmp_path: Path) -> None:
    check = subprocess.run([sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=60)
    if check.returncode == 3:
        pytest.skip(check.stderr.strip())  # another systemd version: nothing to compare
    assert check.returncode == 0, check.stderr
    # Negative control: one member less in @system-service is reported.
    table = json.loads((ROOT / "tests" / "systemd_syscall_groups.json").read_text())
    table["groups"]["@system-service"].remove("mremap")
    tampered = tmp_path / "groups.json"
    tampered.write_text(json.dumps(table))
    check = subprocess.run([sys.executable, str(GENERATOR), "--check", "--out", str(tampered)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1 and "@system-service" in check.stderr, check.stderr


# ------------------------------------------------------------------ the launcher loads it

PROBE = """\
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
print([line.split()[1] for line in open('/proc/self/status') if line.startswith('Seccomp:')][0], flush=True)
# clone3(NULL, 0): the kernel says EINVAL; RestrictNamespaces= says ENOSYS before the kernel looks.
print(errno.errorcode[ctypes.get_errno()] if libc.syscall(435, None, 0) < 0 else 'clone3', flush=True)
try:
    os.sched_setaffinity(0, os.sched_getaffinity(0))  # @resources: outside the allow-list
    print('allowed', flush=True)
except PermissionError:
    print('EPERM', flush=True)
"""


def _launch(allow: AllowList, tmp_path: Path, *command: str) -> subprocess.CompletedProcess[str]:
    spec = tmp_path / "filter.json"
    spec.write_text(allow.to_json())
    return subprocess.run([sys.executable, str(LAUNCHER), str(spec), "--", *command],
                          capture_output=True, text=True, timeout=60)


def test_the_launcher_applies_the_filter_and_its_default_action(unit_filter: AllowList, tmp_path: Path) -> None:
    unfiltered = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60)
    assert unfiltered.stdout.split() == ["0", "EINVAL", "allowed"]  # control: the probe's calls work unfiltered
    assert unit_filter.restrict_namespaces
    under_unit = _launch(unit_filter, tmp_path, sys.executable, "-c", PROBE)
    assert under_unit.stdout.split() == ["2", "ENOSYS", "EPERM"], under_unit.stderr  # mode 2: a seccomp filter
    # SystemCallErrorNumber= unset: the same call kills the process with SIGSYS, as systemd does.
    killing = _launch(AllowList(unit_filter.syscalls, None), tmp_path, sys.executable, "-c", PROBE)
    assert killing.returncode == -signal.SIGSYS and killing.stdout.split() == ["2", "EINVAL"], killing


# ------------------------------------------------------------------ daemons under the filter


def _start(root: Path, name: str, allow: AllowList) -> ServeProcess:
    """``migd serve`` exec'd by the launcher: the filter is loaded before Python starts."""
    api_port, migration_port = free_port(), free_port()
    config = write_config(root, name, api_port=api_port, migration_port=migration_port)
    spec = root / f"{name}-filter.json"
    spec.write_text(allow.to_json())
    log_path = root / f"{name}.log"
    env = {**os.environ, "RUNTIME_DIRECTORY": str(runtime_dir(root, name))}
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, str(LAUNCHER), str(spec), "--", sys.executable, "-m", "migd", "serve",
             "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=env)
    daemon = ServeProcess(root, name, proc, config, api_port, migration_port, log_path)
    try:
        daemon.wait_healthy()
    except BaseException:
        daemon.kill()
        raise
    return daemon


def _seccomp_mode(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split()[1] for line in status.splitlines() if line.startswith("Seccomp:"))


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue  # gone meanwhile
            if int(stat[stat.rfind(")") + 2:].split()[1]) == pid:
                children.append(int(entry.name))
    return children


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[ServeProcess]]:
    started: list[ServeProcess] = []
    yield started
    for daemon in started:
        daemon.stop()


def _migrate(source: ServeProcess, dest: ServeProcess) -> dict[str, Any]:
    assert source.request("POST", "/v1/guests", {"name": "g1", "memory_mib": MEMORY_MIB})[0] == 201
    workload = {"dirty_rate_mib_s": 4, "convert_rate_hz": 5, "seed": 11}
    assert source.request("POST", "/v1/guests/g1/start", {"workload": workload})[0] == 200
    source.wait_for("GET", "/v1/guests/g1", lambda g: g["migration_control"]["ready"], timeout=20)
    # The source's agent (a child of the daemon) runs under the filter too.
    agents = _children(source.proc.pid)
    assert agents and {_seccomp_mode(pid) for pid in agents} == {"2"}, agents
    status, migration = source.request("POST", "/v1/guests/g1/migrate", {"destination": dest.destination})
    assert status == 202, migration
    done: dict[str, Any] = source.wait_for("GET", f"/v1/migrations/{migration['id']}",
                                           lambda m: m["status"] in ("completed", "failed", "cancelled"), timeout=30)
    return done


@pytest.mark.parametrize("case", ["unit filter", "without mincore"])
def test_two_daemons_migrate_under_the_unit_filter(case: str, unit_filter: AllowList, tmp_path: Path,
                                                   daemons: list[ServeProcess]) -> None:
    allow = unit_filter if case == "unit filter" else unit_filter.without("mincore")
    source = _start(tmp_path, "hostA", allow)
    daemons.append(source)
    dest = _start(tmp_path, "hostB", allow)
    daemons.append(dest)
    assert _seccomp_mode(source.proc.pid) == _seccomp_mode(dest.proc.pid) == "2"
    done = _migrate(source, dest)
    if case == "without mincore":
        # The negative control: the filter is in force, and mincore(2) is a call migd needs.
        assert done["status"] == "failed", done
        assert "mincore" in done["error"] and "Operation not permitted" in done["error"], done
        return
    assert done["status"] == "completed", (done, source.log(), dest.log())
    arrived = dest.wait_for("GET", "/v1/guests/g1", lambda g: g["check"]["pages_verified"] > 0, timeout=30)
    assert arrived["check"] == {"pages_verified": NPAGES, "errors": 0, "last_error": None}, arrived
    agents = _children(dest.proc.pid)
    assert agents and {_seccomp_mode(pid) for pid in agents} == {"2"}, agents
    # SIGTERM: both stop cleanly under the filter (the agents' offline paths included).
    assert dest.stop() == 0, dest.log()
    assert source.stop() == 0, source.log()
    assert "Operation not permitted" not in source.log() + dest.log()
