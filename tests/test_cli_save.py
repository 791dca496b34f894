"""``migd guest save`` and ``migd guest restore``: parsing, rendering of save and restore jobs, and the
commands against a real ``migd serve`` (paths made absolute, the progress of ``migrate``, its exit codes).

Rendering is checked on job objects made by the daemon's own ``MigrationProgress`` (role ``save`` or
``restore``), so the shapes cannot drift from §7.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migd.abi import PAGE_SIZE
from migd.cli import commands as cli
from migd.cli.progress_bar import ProgressDisplay, job_route, job_title, progress_line, summary_lines
from migd.migration_state import MigrationStatus
from migd.page_runs import PageKind
from migd.progress import MigrationProgress

from integration.serve_process import ServeProcess
from test_cli_client import run_cli

S = MigrationStatus
FILE = "/var/lib/migd/saves/g1.save"


def parse(*argv: str) -> Any:
    return cli.build_parser().parse_args(list(argv))


# ---------------------------------------------------------------------- argument parsing


def test_guest_save_and_restore_parse_every_option() -> None:
    args = parse("guest", "save", "g1", "--to", "g1.save", "--for-host", "hostB/pdh.pem", "--live", "--no-wait")
    assert (args.name, args.to, args.for_host, args.live, args.no_wait) == (
        "g1", "g1.save", "hostB/pdh.pem", True, True)
    assert args.client_func is cli._guest_save
    defaults = parse("guest", "save", "g1", "--to", "/s/g1.save")
    assert (defaults.for_host, defaults.live, defaults.no_wait) == (None, False, False)
    restore = parse("guest", "restore", "g1.save", "--name", "g2", "--no-wait", "--json")
    assert (restore.file, restore.name, restore.no_wait, restore.json) == ("g1.save", "g2", True, True)
    assert restore.client_func is cli._guest_restore
    assert parse("guest", "restore", "/s/g1.save").name is None


@pytest.mark.parametrize("argv, culprit", [
    (["guest", "save", "g1"], "--to"),
    (["guest", "save", "g1", "--to", ""], "--to"),
    (["guest", "save", "--to", "/s/x"], "NAME"),
    (["guest", "save", "g1", "--to", "/s/x", "--for-host", ""], "--for-host"),
    (["guest", "save", "g1", "--to", "/s/x", "--live", "yes"], "unrecognized arguments: yes"),
    (["guest", "restore"], "FILE"),
    (["guest", "restore", "/s/x", "--name", ""], "--name"),
])
def test_save_and_restore_usage_errors_exit_2_naming_the_culprit(
    argv: list[str], culprit: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == cli.EXIT_USAGE
    assert culprit in capsys.readouterr().err
    # Negative control: the command itself exists and parses when complete.
    assert parse("guest", "save", "g1", "--to", "/s/x").client_func is cli._guest_save


# ---------------------------------------------------------------------- rendering


def _job(role: str, status: MigrationStatus = S.ACTIVE, **fields: Any) -> dict[str, Any]:
    """A save or restore job as the daemon renders it (512 MiB guest)."""
    progress = MigrationProgress(guest="g1", role=role, destination=FILE, npages=131072)
    progress.id = "5a7e5a7e5a7e5a7e"
    t = progress.phase.started_at
    path = {S.ACTIVE: [S.ACTIVE], S.COMPLETED: [S.ACTIVE, S.STOP_COPY, S.COMPLETED],
            S.FAILED: [S.ACTIVE, S.FAILED], S.CANCELLED: [S.ACTIVE, S.CANCELLED]}[status]
    for i, step in enumerate(path, 1):
        progress.phase.advance(step, t + i * 0.5, error={S.FAILED: "the disk is full",
                                                         S.CANCELLED: "cancelled by the operator"}.get(step))
    progress.count_run(PageKind.PRIVATE, 1000, 1000 * (PAGE_SIZE + 80))
    progress.count_run(PageKind.ZERO, 130_072, 0)
    for key, value in fields.items():
        setattr(progress, key, value)
    return progress.to_json(now=t + 1.25)


def test_titles_say_which_way_the_guest_goes() -> None:
    assert job_title(_job("save")) == f"save 5a7e5a7e5a7e5a7e of g1 to {FILE}"
    assert job_title(_job("restore")) == f"restore 5a7e5a7e5a7e5a7e of g1 from {FILE}"
    assert job_route(_job("save")) == f"g1 -> {FILE}"
    assert job_route(_job("restore")) == f"{FILE} -> g1"
    # Negative control: a migration keeps its wording.
    migration = {**_job("save"), "role": "source", "destination": "10.0.0.2:4444"}
    assert job_title(migration) == "migration 5a7e5a7e5a7e5a7e of g1 to 10.0.0.2:4444"
    assert job_route(migration) == "g1 -> 10.0.0.2:4444"


def test_the_progress_line_of_a_job_has_no_expected_downtime() -> None:
    job = _job("save", rounds=2, remaining_pages=131072 // 2, throughput_bps=300 * 2**20)
    assert progress_line(job) == "g1 active    round  2 [" + "#" * 12 + "." * 12 + "]  50.0%  300.0 MiB/s"
    assert len(progress_line(job, width=60)) <= 60 < len(progress_line(job))  # the bar shrinks to fit
    # Negative control: the same object as a migration's shows the expected downtime.
    assert progress_line({**job, "role": "source"}).endswith("exp. downtime -")


def test_summaries_of_save_and_restore() -> None:
    saved = summary_lines(_job("save", S.COMPLETED, rounds=3))
    assert saved[0] == f"save 5a7e5a7e5a7e5a7e of g1 to {FILE}: completed"
    text = "\n".join(saved)
    assert "transferred: 4.0 MiB written to the file (guest memory 512.0 MiB)" in text
    assert "pages:       private 1000 (3.9 MiB), shared 0 (0 B), zero 130072 (508.1 MiB)" in text
    assert "rounds:      3" in text and "total time:  1.50 s" in text
    assert "downtime" not in text and "on the wire" not in text  # a file has neither
    restored = summary_lines(_job("restore", S.COMPLETED))
    assert restored[0] == f"restore 5a7e5a7e5a7e5a7e of g1 from {FILE}: completed"
    assert "read from the file" in restored[2]
    failed = summary_lines(_job("save", S.FAILED))
    assert failed[-1] == "  error:       the disk is full"
    assert summary_lines(_job("save", S.FAILED), with_error=False) == failed[:-1]
    # Negative control: a migration's summary still has its downtime and bytes on the wire.
    migration = "\n".join(summary_lines({**_job("save", S.COMPLETED), "role": "source"}))
    assert "downtime:    -" in migration and "on the wire" in migration and "(source)" in migration


def test_failure_lines_of_save_and_restore() -> None:
    assert cli.failure_line(_job("save", S.FAILED)) == f"save 5a7e5a7e5a7e5a7e of g1 to {FILE} failed: the disk is full"
    assert cli.failure_line(_job("restore", S.FAILED)).startswith(f"restore 5a7e5a7e5a7e5a7e of g1 from {FILE} failed")
    unexplained = {**_job("save", S.CANCELLED), "error": None}
    assert cli.failure_line(unexplained).endswith("cancelled: cancelled before the commit; the guest runs on here "
                                                  "and no file was written")
    restore = {**_job("restore", S.CANCELLED), "error": None}
    assert "no guest was created and the file can be restored again" in cli.failure_line(restore)
    # Negative control: a migration's cancel still speaks of the source.
    assert cli.failure_line({**unexplained, "role": "source"}).endswith("the guest runs on at the source")


def test_the_display_announces_the_job_as_what_it_is() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, tty=False)
    display.update(_job("restore"), now=0.0)
    display.finish(_job("restore", S.COMPLETED))
    lines = stream.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["active", "completed"]
    assert "exp. downtime" not in stream.getvalue()


def _guest(**changes: Any) -> dict[str, Any]:
    guest = {
        "name": "g1", "state": "running", "memory_mib": 16, "policy": 0,
        "migration_control": {"feature": True, "msr": 1, "ready": True},
        "pages": {"total": 4096, "private": 4000, "shared": 96},
        "check": {"pages_verified": 4096, "errors": 0, "last_error": None},
        "migrated": None, "agent": {"pid": 1234, "exit": None},
    }
    return {**guest, **changes}


def test_guest_list_and_show_of_a_saved_guest() -> None:
    saved = _guest(state="saved", migration_control={"feature": True, "msr": 1, "ready": False},
                   pages={"total": 4096, "private": 0, "shared": 0}, agent={"pid": None, "exit": None})
    table = cli.guest_table([_guest(), saved])
    assert table[2].split()[:4] == ["g1", "saved", "16", "MiB"] and table[2].endswith("in its save file")
    assert table[2].split()[4] == "no"  # not migratable
    shown = cli.guest_lines(saved)
    assert "state:       saved" in shown
    assert any(line.startswith("saved:       its memory and vCPU state are in a save file") for line in shown)
    assert not any(line.startswith("migrated to") for line in shown)
    # Negative control: a running guest says nothing of a file, and its check column is its check.
    assert not any(line.startswith("saved:") for line in cli.guest_lines(_guest()))
    assert table[1].endswith("4096/4096 ok")


# ---------------------------------------------------------------------- against a real daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = ServeProcess.start(tmp_path_factory.mktemp("serve-save"), "hostS")
    try:
        yield process
    finally:
        process.stop()


def _boot(daemon: ServeProcess, name: str) -> None:
    assert run_cli(daemon, "guest", "create", name, "--memory-mib", "16")[0] == 0
    code, _, err = run_cli(daemon, "guest", "start", name, "--dirty-rate-mib-s", "2", "--convert-rate-hz", "5")
    assert code == 0, err
    daemon.wait_for("GET", f"/v1/guests/{name}", lambda g: g["migration_control"]["ready"], timeout=30)


def _cleanup(daemon: ServeProcess, name: str) -> None:
    run_cli(daemon, "guest", "stop", name)
    run_cli(daemon, "guest", "delete", name)


def test_save_and_restore_with_relative_paths_and_the_progress_of_migrate(
    daemon: ServeProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    _boot(daemon, "cs1")
    try:
        code, out, err = run_cli(daemon, "guest", "save", "cs1", "--to", "cs1.save", "--live")
        file = tmp_path / "cs1.save"
        assert code == 0, err
        assert file.is_file()  # the relative name was the caller's directory, not the daemon's
        assert out.splitlines()[0].startswith("save ") and out.splitlines()[0].endswith(f"of cs1 to {file}: completed")
        assert "written to the file" in out
        assert err.splitlines()[0].endswith(f": cs1 -> {file}") and err.startswith("save ")
        assert "completed" in err.splitlines()[-1]  # the last progress line
        code, out, _ = run_cli(daemon, "guest", "show", "cs1")
        assert code == 0 and "state:       saved" in out and "saved:       " in out
        code, out, _ = run_cli(daemon, "guest", "list")
        assert [line for line in out.splitlines() if line.startswith("cs1 ")][0].endswith("in its save file")

        code, out, err = run_cli(daemon, "guest", "restore", "cs1.save")
        assert code == 0, err
        assert out.splitlines()[0].endswith(f"of cs1 from {file}: completed") and "read from the file" in out
        assert err.splitlines()[0].endswith(f": {file} -> cs1")
        guest = daemon.wait_for("GET", "/v1/guests/cs1", lambda g: g["check"]["pages_verified"] > 0)
        assert guest["state"] == "running" and guest["check"]["errors"] == 0

        # Once only: the daemon's reason, printed once, exit 1.
        code, out, err = run_cli(daemon, "guest", "restore", str(file), "--name", "cs1-again")
        assert (code, out) == (1, "") and len(err.splitlines()) == 1
        assert err.startswith("migd: error: 409 conflict: ") and "restored on this host before" in err
    finally:
        _cleanup(daemon, "cs1")


def test_no_wait_prints_the_job_and_a_failed_restore_exits_1_with_one_error_line(
    daemon: ServeProcess, tmp_path: Path,
) -> None:
    _boot(daemon, "cs2")
    try:
        file = tmp_path / "cs2.save"
        code, out, err = run_cli(daemon, "guest", "save", "cs2", "--to", str(file), "--no-wait")
        assert (code, err) == (0, "")
        job_id = out.strip()
        done = daemon.wait_for("GET", f"/v1/migrations/{job_id}", lambda m: m["status"] == "completed")
        assert done["role"] == "save" and done["destination"] == str(file)
        code, out, _ = run_cli(daemon, "migrations", job_id)
        assert code == 0 and out.splitlines()[0] == f"save {job_id} of cs2 to {file}: completed"

        # A flipped bit in the trailer: the daemon accepts the restore, the job fails on the MAC.
        tampered = tmp_path / "tampered.save"
        data = bytearray(file.read_bytes())
        data[-1] ^= 1
        tampered.write_bytes(data)
        code, out, err = run_cli(daemon, "guest", "restore", str(tampered), "--json")
        assert code == cli.EXIT_API_ERROR
        final = json.loads(out)
        assert final["role"] == "restore" and final["status"] == "failed"
        errors = [line for line in err.splitlines() if line.startswith("migd: error:")]
        assert errors == [f"migd: error: restore {final['id']} of cs2 from {tampered} failed: {final['error']}"]
        assert "does not verify" in final["error"]
        assert daemon.request("GET", "/v1/guests/cs2")[1]["state"] == "saved"  # nothing half-restored

        # Negative control: the untouched file restores with --no-wait --json, exit 0.
        code, out, err = run_cli(daemon, "guest", "restore", str(file), "--no-wait", "--json")
        assert code == 0, err
        started = json.loads(out)
        assert started["role"] == "restore" and started["destination"] == str(file)
        done = daemon.wait_for("GET", f"/v1/migrations/{started['id']}", lambda m: m["status"] == "completed")
        assert done["error"] is None
        # Its self-check before the cleanup stops it (a restore job waits for that report).
        guest = daemon.wait_for("GET", "/v1/guests/cs2", lambda g: g["check"]["pages_verified"] > 0)
        assert guest["check"]["errors"] == 0
    finally:
        _cleanup(daemon, "cs2")


def test_a_refused_save_prints_the_reason_once_and_exits_1(daemon: ServeProcess, tmp_path: Path) -> None:
    assert run_cli(daemon, "guest", "create", "cs3", "--memory-mib", "16")[0] == 0
    try:
        code, out, err = run_cli(daemon, "guest", "save", "cs3", "--to", str(tmp_path / "cs3.save"))
        assert (code, out) == (1, "") and err.splitlines() == [err.rstrip("\n")]
        assert err.startswith("migd: error: 409 conflict: ") and "only a running guest can be saved" in err
        assert os.listdir(tmp_path) == []
        code, _, err = run_cli(daemon, "guest", "save", "no-such-guest", "--to", str(tmp_path / "x.save"))
        assert code == 1 and err.startswith("migd: error: 404 ")
    finally:
        _cleanup(daemon, "cs3")
