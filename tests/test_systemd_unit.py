"""systemd/migd.service: ``systemd-analyze verify`` clean, the settings the issue asks for, and
MemoryDenyWriteExecute= shown harmless by running two daemons and a migration under the kernel's MDWE."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from integration.serve_process import ROOT, ServeProcess
from syscall_filter import unit_assignments

UNIT = ROOT / "systemd" / "migd.service"
SYSUSERS = ROOT / "systemd" / "migd.sysusers.conf"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
EXEC_START = "/usr/bin/migd serve --config /etc/migd/migd.toml"
needs_systemd_analyze = pytest.mark.skipif(not Path(SYSTEMD_ANALYZE).exists(), reason="systemd-analyze not installed")


def _verify(unit_text: str, tmp_path: Path, executable: str | None = None) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on a copy whose ExecStart names an executable that exists here."""
    migd = Path(sys.executable).with_name("migd")
    assert migd.exists(), f"the migd console script is not installed next to {sys.executable}"
    unit = tmp_path / "migd.service"
    unit.write_text(unit_text.replace("/usr/bin/migd", executable or str(migd)))
    return subprocess.run([SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)


def _service() -> dict[str, str]:
    """[Service] as key → value; a key given more than once (SystemCallFilter=) keeps its last value."""
    return dict(unit_assignments(UNIT.read_text(), "Service"))


@needs_systemd_analyze
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    result = _verify(UNIT.read_text(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr + result.stdout


@needs_systemd_analyze
def test_verify_would_catch_a_bad_unit(tmp_path: Path) -> None:
    """Negative controls: a warning (exit 0!) and an error both show up where the test looks."""
    text = UNIT.read_text()
    typo = _verify(text.replace("Restart=on-failure", "Restart=on-failure\nRestartt=always"), tmp_path)
    assert "Unknown key 'Restartt'" in typo.stderr
    bad_value = _verify(text.replace("Restart=on-failure", "Restart=sometimes"), tmp_path)
    assert "Failed to parse service restart specifier" in bad_value.stderr
    missing = _verify(text, tmp_path, executable=str(tmp_path / "no-such-migd"))
    assert missing.returncode != 0 and "no-such-migd" in missing.stderr


#: The sandbox directives issue 13 added to bring the exposure from 3.2 to 1.2.
HARDENING_ADDED = ("PrivateMounts", "ProtectProc", "ProcSubset", "DevicePolicy", "SystemCallFilter",
                   "SystemCallErrorNumber")
MAX_EXPOSURE = 2.0


def _exposure(unit_text: str, tmp_path: Path) -> float:
    """``systemd-analyze security --offline=yes``'s overall exposure of the unit (0.0 best, 10.0 worst)."""
    unit = tmp_path / "migd.service"
    unit.write_text(unit_text)
    result = subprocess.run([SYSTEMD_ANALYZE, "security", "--offline=yes", str(unit)], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    match = re.search(r"Overall exposure level for migd\.service: (\d+\.\d+)", result.stdout)
    assert result.returncode == 0 and match, result.stdout + result.stderr
    return float(match.group(1))


@needs_systemd_analyze
def test_exposure_is_at_most_two(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert _exposure(text, tmp_path) <= MAX_EXPOSURE
    # Negative control: the unit without the added directives is the 3.2 the issue started from.
    removed = "".join(line for line in text.splitlines(keepends=True)
                      if line.split("=", 1)[0] not in HARDENING_ADDED)
    assert len(text.splitlines()) - len(removed.splitlines()) == len(HARDENING_ADDED) + 1  # two SystemCallFilter=
    assert _exposure(removed, tmp_path) > MAX_EXPOSURE


def test_unit_settings() -> None:
    service = _service()
    expected = {
        "Type": "notify", "NotifyAccess": "main", "ExecStart": EXEC_START, "Restart": "on-failure",
        "WatchdogSec": "30s", "StateDirectory": "migd", "RuntimeDirectory": "migd", "ConfigurationDirectory": "migd",
        "KillMode": "mixed", "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
        "PrivateTmp": "yes", "PrivateDevices": "yes", "ProtectKernelTunables": "yes", "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes", "ProtectControlGroups": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6", "RestrictNamespaces": "yes", "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native", "CapabilityBoundingSet": "",
        "PrivateMounts": "yes", "ProtectProc": "invisible", "ProcSubset": "pid", "DevicePolicy": "closed",
        "SystemCallErrorNumber": "EPERM",
    }
    assert {key: service.get(key) for key in expected} == expected
    # The allow-list and what is taken out of it (tests/test_seccomp.py proves migd runs under it).
    filters = [value for key, value in unit_assignments(UNIT.read_text(), "Service") if key == "SystemCallFilter"]
    assert filters == ["@system-service mincore", "~@privileged @resources"]
    assert "ExecReload" not in service  # migd has no reload: no SIGHUP handler
    # Stopping waits for a committed hand-off (up to 120 s for STARTED) plus the guests' offline paths.
    assert int(service["TimeoutStopSec"].removesuffix("s")) > 120
    assert service["User"] == "migd"
    assert "u migd " in SYSUSERS.read_text()


def test_execstart_is_the_cli_entry_point() -> None:
    from migd.cli.commands import build_parser

    args = build_parser().parse_args(EXEC_START.split()[1:])
    assert (args.command, args.config) == ("serve", "/etc/migd/migd.toml")


# ---------------------------------------------------------------------- MemoryDenyWriteExecute

PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1

SITECUSTOMIZE = textwrap.dedent(f"""\
    # Test hook: every Python process of the test (daemons and their guest agents) runs under
    # the kernel's MDWE, the rule systemd's MemoryDenyWriteExecute= enforces, and says so.
    import ctypes, os
    _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
        raise SystemExit("PR_SET_MDWE failed: errno %d" % ctypes.get_errno())
    _markers = os.environ.get("MIGD_TEST_MDWE_MARKERS")
    if _markers:
        with open(os.path.join(_markers, str(os.getpid())), "w") as _f:
            _f.write(str(_libc.prctl({PR_GET_MDWE}, 0, 0, 0, 0)))
""")


def _mdwe_supported() -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_GET_MDWE, 0, 0, 0, 0) >= 0


@pytest.mark.skipif(not _mdwe_supported(), reason="kernel without PR_SET_MDWE (Linux >= 6.3)")
def test_daemons_and_agents_migrate_under_memory_deny_write_execute(tmp_path: Path) -> None:
    hook, markers = tmp_path / "mdwe", tmp_path / "markers"
    hook.mkdir()
    markers.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "MIGD_TEST_MDWE_MARKERS": str(markers)}

    # Control: under the hook, writable+executable memory is refused (so the hook really bites).
    probe = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    probe_env = {**os.environ, "PYTHONPATH": env["PYTHONPATH"]}
    refused = subprocess.run([sys.executable, "-c", probe], env=probe_env, capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0 and "Permission denied" in refused.stderr
    allowed = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30)
    assert allowed.returncode == 0

    source = ServeProcess.start(tmp_path, "hostA", env=env)
    dest = ServeProcess.start(tmp_path, "hostB", env=env)
    try:
        assert source.request("POST", "/v1/guests", {"name": "g1", "memory_mib": 32})[0] == 201
        workload = {"dirty_rate_mib_s": 4, "convert_rate_hz": 5, "seed": 11}
        assert source.request("POST", "/v1/guests/g1/start", {"workload": workload})[0] == 200
        source.wait_for("GET", "/v1/guests/g1", lambda g: g["migration_control"]["ready"], timeout=20)
        status, migration = source.request("POST", "/v1/guests/g1/migrate", {"destination": dest.destination})
        assert status == 202, migration
        done = source.wait_for("GET", f"/v1/migrations/{migration['id']}",
                               lambda m: m["status"] in ("completed", "failed", "cancelled"), timeout=30)
        assert done["status"] == "completed", done
        guest = dest.wait_for("GET", "/v1/guests/g1", lambda g: g["check"]["pages_verified"] > 0, timeout=30)
        assert guest["check"]["errors"] == 0 and guest["check"]["pages_verified"] == guest["pages"]["total"]
        # Both daemons and both agents (source and destination) ran with MDWE on.
        flags = {int(p.name): p.read_text() for p in markers.iterdir()}
        assert {source.proc.pid, dest.proc.pid} <= flags.keys()
        assert len(flags) == 4 and set(flags.values()) == {str(PR_MDWE_REFUSE_EXEC_GAIN)}
    finally:
        assert source.stop() == 0, source.log()
        assert dest.stop() == 0, dest.log()
