"""The ``migd`` command line: exit codes and messages of ``migd keys init`` on bad input.

What ``keys init`` creates is tested in tests/test_identity.py; here: a failure is a non-zero
exit with a one-line ``migd: error: ...`` message naming the culprit, never a traceback.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from migd.cli import commands as cli
from migd.platform import identity


def _keys_init(state: Path, ca: Path, name: str = "node1") -> list[str]:
    return ["keys", "init", "--state-dir", str(state), "--ca", str(ca), "--name", name]


@pytest.fixture
def regular_file(tmp_path: Path) -> Path:
    """A plain file: no directory can be created below it (not even by root)."""
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    return path


def test_state_dir_that_cannot_be_created_fails_with_a_message(
    tmp_path: Path, regular_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = regular_file / "state"
    assert cli.main(_keys_init(state, tmp_path / "ca")) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("migd: error: cannot create directory")
    assert str(state) in captured.err and "Traceback" not in captured.err
    assert regular_file.read_text() == "x"  # the obstacle is left alone
    # Negative control: the same command with a usable state directory succeeds.
    assert cli.main(_keys_init(tmp_path / "state", tmp_path / "ca")) == 0
    assert (tmp_path / "state" / identity.PDH_KEY).exists()


def test_state_dir_that_is_a_file_fails_with_a_message(
    tmp_path: Path, regular_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(_keys_init(regular_file, tmp_path / "ca")) == 1
    assert f"cannot create directory {regular_file}" in capsys.readouterr().err
    assert regular_file.read_text() == "x"


def test_ca_dir_that_cannot_be_created_fails_before_the_host_identity(
    tmp_path: Path, regular_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = regular_file / "ca"
    assert cli.main(_keys_init(tmp_path / "state", ca)) == 1
    assert f"cannot create directory {ca}" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()  # no host keys without a CA to certify them


def test_ca_certificate_without_its_key_fails_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(_keys_init(tmp_path / "a", tmp_path / "ca", "a")) == 0
    capsys.readouterr()
    (tmp_path / "ca" / identity.CA_KEY).unlink()
    assert cli.main(_keys_init(tmp_path / "b", tmp_path / "ca", "b")) == 1
    assert "ca.key is missing" in capsys.readouterr().err
    assert not (tmp_path / "ca" / identity.CA_KEY).exists()  # never silently re-keyed


def test_missing_required_option_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["keys", "init", "--ca", str(tmp_path / "ca")])
    assert exit_info.value.code == 2
    assert "--state-dir" in capsys.readouterr().err
    assert not (tmp_path / "ca").exists()


def test_process_exit_status_is_non_zero(tmp_path: Path, regular_file: Path) -> None:
    """The real entry point turns the error into the process exit status."""
    argv = [sys.executable, "-m", "migd.cli.commands", *_keys_init(regular_file / "state", tmp_path / "ca")]
    failed = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert failed.returncode == 1
    assert "migd: error: cannot create directory" in failed.stderr and "Traceback" not in failed.stderr
    argv = [sys.executable, "-m", "migd.cli.commands", *_keys_init(tmp_path / "state", tmp_path / "ca")]
    ok = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert ok.returncode == 0, ok.stderr  # negative control
    assert "pdh_key: " in ok.stdout


def _guest_json(**changes: Any) -> dict[str, Any]:
    guest = {
        "name": "g1", "state": "running", "memory_mib": 16, "policy": 0,
        "migration_control": {"feature": True, "msr": 1, "ready": True},
        "pages": {"total": 4096, "private": 4000, "shared": 96},
        "check": {"pages_verified": 4096, "errors": 0, "last_error": None},
        "migrated": None, "agent": {"pid": 1234, "exit": None},
    }
    return {**guest, **changes}


def test_guest_list_and_show_say_where_a_migrated_guest_went() -> None:
    gone = _guest_json(state="migrated", migration_control={"feature": True, "msr": 1, "ready": False},
                       pages={"total": 4096, "private": 0, "shared": 0},
                       migrated={"migration": "abc123", "to": "10.0.0.2:4444"}, agent={"pid": None, "exit": None})
    table = cli.guest_table([_guest_json(), gone])
    assert table[1].split()[-2:] == ["4096/4096", "ok"]
    assert table[2].split()[1:4] == ["migrated", "16", "MiB"] and table[2].endswith("left for 10.0.0.2:4444")
    assert "no" in table[2].split()  # not migratable
    shown = cli.guest_lines(gone)
    assert "migrated to: 10.0.0.2:4444 (migration abc123); only this record is left here" in shown
    # Negative control: a guest still here says nothing of the kind.
    assert not any(line.startswith("migrated to") for line in cli.guest_lines(_guest_json()))


def test_guest_show_names_why_the_agent_died() -> None:
    dead = _guest_json(state="stopped", agent={"pid": None, "exit": "killed by SIGBUS"})
    assert "agent:       killed by SIGBUS" in cli.guest_lines(dead)
    assert not any(line.startswith("agent:") for line in cli.guest_lines(_guest_json()))
