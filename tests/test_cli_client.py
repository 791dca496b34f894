"""The client side of the ``migd`` CLI: parsing, where the daemon is found, rendering, errors.

Rendering is checked on migration objects made by the daemon's own ``MigrationProgress``
(so the shapes cannot drift from §7); error printing runs against a real ``migd serve``.
"""

from __future__ import annotations

import asyncio
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from migd.cli import commands as cli
from migd.abi import PAGE_SIZE
from migd.cli.client import ApiError, ApiUnreachable, MigdClient, format_api_error, parse_api_url, resolve_settings
from migd.daemon.config import read_token
from migd.errors import ConfigError
from migd.migration_state import MigrationStatus
from migd.page_runs import PageKind
from migd.progress import MigrationProgress
from migd.cli.progress_bar import (
    ProgressDisplay,
    format_bytes,
    format_ms,
    moved_pages,
    percent_done,
    progress_line,
    summary_lines,
    terminal_columns,
)

from integration.serve_process import ROOT, ServeProcess, free_port, write_config

TOKEN = "0123456789abcdef0123"


# ---------------------------------------------------------------------- argument parsing


def parse(*argv: str) -> Any:
    return cli.build_parser().parse_args(list(argv))


def test_guest_create_parses_every_option() -> None:
    args = parse("guest", "create", "g1", "--memory-mib", "512", "--policy", "0x5", "--efi",
                 "--uefi-live-migration", "false")
    assert (args.name, args.memory_mib, args.policy, args.efi, args.uefi_live_migration) == (
        "g1", 512, 5, True, "false")
    assert args.client_func is cli._guest_create
    defaults = parse("guest", "create", "g1", "--memory-mib", "16")
    assert (defaults.policy, defaults.efi, defaults.uefi_live_migration) == (None, False, None)


def test_client_options_are_accepted_before_and_after_the_nested_command() -> None:
    outer = parse("guest", "--api", "unix:/run/x.sock", "--json", "list")
    assert outer.api == "unix:/run/x.sock" and outer.json is True
    inner = parse("guest", "list", "--api", "h:1", "--token-file", "/t")
    assert inner.api == "h:1" and inner.token_file == "/t" and not hasattr(inner, "json")
    # Nothing given: the attributes are absent, so the resolver's defaults apply.
    bare = parse("migrations")
    assert not hasattr(bare, "api") and not hasattr(bare, "config") and bare.id is None


def test_migrate_and_start_options() -> None:
    args = parse("migrate", "g1", "--to", "10.0.0.2:4444", "--downtime-limit-ms", "50",
                 "--max-bandwidth-mib-s", "100", "--no-wait")
    assert (args.to, args.downtime_limit_ms, args.max_bandwidth_mib_s, args.no_wait) == ("10.0.0.2:4444", 50, 100, True)
    start = parse("guest", "start", "g1", "--dirty-rate-mib-s", "32", "--convert-rate-hz", "20", "--seed", "7")
    assert (start.dirty_rate_mib_s, start.convert_rate_hz, start.seed) == (32.0, 20.0, 7)
    assert parse("guest", "start", "g1").dirty_rate_mib_s is None  # unset: the daemon's default


def test_migrate_connections_option(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse("migrate", "g1", "--to", "10.0.0.2:4444", "--connections", "3").connections == 3
    assert parse("migrate", "g1", "--to", "10.0.0.2:4444", "--connections", "16").connections == 16
    assert parse("migrate", "g1", "--to", "10.0.0.2:4444").connections is None  # unset: the daemon's default
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["migrate", "--help"])
    assert exit_info.value.code == 0
    usage = " ".join(capsys.readouterr().out.split())
    for option in ("--to HOST:PORT", "[--downtime-limit-ms N]", "[--max-bandwidth-mib-s N]", "[--connections N]",
                   "[--no-wait]"):
        assert option in usage, option


@pytest.mark.parametrize("value, culprit", [
    ("0", "must be in 1..16, got 0"), ("17", "must be in 1..16, got 17"), ("two", "expected an integer, got 'two'"),
    ("2.5", "expected an integer, got '2.5'"),
])
def test_migrate_connections_out_of_range_is_a_usage_error(value: str, culprit: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["migrate", "g1", "--to", "10.0.0.2:4444", "--connections", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--connections" in err and culprit in err


@pytest.mark.parametrize("argv, culprit", [
    (["guest", "create", "g1"], "--memory-mib"),
    (["guest", "create", "g1", "--memory-mib", "0"], "must be > 0"),
    (["guest", "create", "g1", "--memory-mib", "-4"], "must be >= 0"),
    (["guest", "create", "g1", "--memory-mib", "16", "--policy", "0x1ffffffff"], "u32"),
    (["guest", "create", "g1", "--memory-mib", "16", "--uefi-live-migration", "yes"], "invalid choice"),
    (["guest", "start", "g1", "--dirty-rate-mib-s", "fast"], "expected a number"),
    (["migrate", "g1"], "--to"),
    (["guest", "frobnicate", "g1"], "invalid choice"),
    (["cancel"], "ID"),
])
def test_usage_errors_exit_2_naming_the_culprit(argv: list[str], culprit: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert culprit in capsys.readouterr().err


class _RecordingApi(http.server.BaseHTTPRequestHandler):
    """Answers every POST with 202 and a migration object; keeps each request body."""

    bodies: list[Any] = []

    def do_POST(self) -> None:  # noqa: N802 (the http.server name)
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.bodies.append((self.path, json.loads(raw)))
        answer = json.dumps(_migration(id="feedc0de12345678")).encode()
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_migrate_sends_connections_only_when_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--connections 3`` is ``"connections": 3`` in the migrate body; without the option the key
    is absent (the daemon's migration.connections applies), never null or 1."""
    token_file = tmp_path / "api.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    _RecordingApi.bodies = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RecordingApi)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    api = ["--api", f"127.0.0.1:{server.server_address[1]}", "--token-file", str(token_file), "--api-timeout", "10"]
    try:
        for extra in (["--connections", "3"], []):
            assert cli.main(["migrate", "g1", "--to", "10.0.0.2:4444", "--no-wait", *extra, *api]) == 0
            assert capsys.readouterr().out == "feedc0de12345678\n"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert _RecordingApi.bodies == [
        ("/v1/guests/g1/migrate", {"destination": "10.0.0.2:4444", "connections": 3}),
        ("/v1/guests/g1/migrate", {"destination": "10.0.0.2:4444"}),
    ]


# ---------------------------------------------------------------------- where the daemon is


def _daemon_config(path: Path, listen: str, token_file: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'state_dir = "/nonexistent"\n[api]\nlisten = "{listen}"\ntoken_file = "{token_file}"\n'
                    '[migration]\nlisten = "0.0.0.0:4444"\n[sev]\ntrusted_roots = ["/nonexistent.pem"]\n')
    return path


@pytest.fixture
def tokens(tmp_path: Path) -> dict[str, Path]:
    paths = {}
    for name in ("flag", "config", "env", "envconfig"):
        paths[name] = tmp_path / f"{name}.token"
        paths[name].write_text(f"{name}-token-{TOKEN}\n")
        paths[name].chmod(0o600)
    return paths


def test_settings_precedence_flag_then_config_then_env_then_env_config(tmp_path: Path,
                                                                       tokens: dict[str, Path]) -> None:
    config = _daemon_config(tmp_path / "c" / "migd.toml", "0.0.0.0:8001", str(tokens["config"]))
    env_config = _daemon_config(tmp_path / "e" / "migd.toml", "[::]:8003", str(tokens["envconfig"]))
    env = {"MIGD_API": "127.0.0.2:8002", "MIGD_TOKEN_FILE": str(tokens["env"]), "MIGD_CONFIG": str(env_config)}
    missing = tmp_path / "none.toml"

    flags = resolve_settings(api="http://h:1/", token_file=str(tokens["flag"]), config=str(config), env=env,
                             default_config=missing)
    assert (flags.endpoint.base_url, flags.token) == ("http://h:1", f"flag-token-{TOKEN}")
    from_config = resolve_settings(config=str(config), env=env, default_config=missing)
    # A wildcard listen address is reached over loopback.
    assert (from_config.endpoint.base_url, from_config.token) == ("http://127.0.0.1:8001", f"config-token-{TOKEN}")
    from_env = resolve_settings(env=env, default_config=missing)
    assert (from_env.endpoint.base_url, from_env.token) == ("http://127.0.0.2:8002", f"env-token-{TOKEN}")
    only_env_config = resolve_settings(env={"MIGD_CONFIG": str(env_config)}, default_config=missing)
    assert (only_env_config.endpoint.base_url, only_env_config.token) == (
        "http://[::1]:8003", f"envconfig-token-{TOKEN}")
    # Sources combine key by key: the address from the flag, the token from the config.
    mixed = resolve_settings(api="unix:/run/migd/api.sock", config=str(config), env={}, default_config=missing)
    assert mixed.endpoint.unix_path == Path("/run/migd/api.sock") and mixed.token == f"config-token-{TOKEN}"


def test_default_config_is_used_only_when_nothing_else_names_one(tmp_path: Path, tokens: dict[str, Path]) -> None:
    default = _daemon_config(tmp_path / "etc" / "migd.toml", "127.0.0.1:8470", "../config.token")
    settings = resolve_settings(env={}, default_config=default)
    # A relative token_file is relative to the config's directory, as for `migd serve`.
    assert settings.endpoint.base_url == "http://127.0.0.1:8470" and settings.token == f"config-token-{TOKEN}"
    # Negative control: an explicit --config without an [api] table does not fall back to it.
    bare = tmp_path / "bare.toml"
    bare.write_text('state_dir = "/x"\n')
    with pytest.raises(ConfigError, match="no API address"):
        resolve_settings(config=str(bare), env={}, default_config=default)


@pytest.mark.parametrize("kwargs, message", [
    ({}, "no API address"),
    ({"api": "127.0.0.1:1"}, "no API token"),
    ({"api": "127.0.0.1:1", "token_file": "/nonexistent/token"}, "cannot read /nonexistent/token"),
    ({"config": "/nonexistent/migd.toml"}, "cannot read config /nonexistent/migd.toml"),
    ({"api": "ftp://h:1", "token_file": "TOKEN"}, "expected http://"),
    ({"api": "h", "token_file": "TOKEN"}, "expected HOST:PORT"),
    ({"api": "h:0", "token_file": "TOKEN"}, "port must be 1..65535"),
    ({"api": "unix:relative.sock", "token_file": "TOKEN"}, "must be absolute"),
])
def test_settings_errors_say_what_is_missing(kwargs: dict[str, str], message: str, tokens: dict[str, Path],
                                             tmp_path: Path) -> None:
    if kwargs.get("token_file") == "TOKEN":
        kwargs = {**kwargs, "token_file": str(tokens["flag"])}
    with pytest.raises(ConfigError, match=message):
        resolve_settings(**kwargs, env={}, default_config=tmp_path / "none.toml")


def test_short_token_is_refused(tmp_path: Path) -> None:
    short = tmp_path / "short.token"
    short.write_text("abc\n")
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 16 characters"):
        resolve_settings(api="h:1", token_file=str(short), env={}, default_config=tmp_path / "none.toml")


@pytest.mark.parametrize("mode, refused", [
    (0o600, None), (0o400, None), (0o640, None),  # owner-only, or the daemon's group may read (sysusers.conf)
    (0o644, "readable by every user"), (0o604, "readable by every user"),
    (0o620, "writable by other users"), (0o602, "writable by other users"),
], ids=lambda value: f"{value:04o}" if isinstance(value, int) else None)
def test_token_file_open_to_other_users_is_refused_by_client_and_daemon_alike(
    tmp_path: Path, mode: int, refused: str | None,
) -> None:
    token = tmp_path / "api.token"
    token.write_text(f"secret-{TOKEN}\n")
    token.chmod(mode)
    if refused is None:
        assert resolve_settings(api="h:1", token_file=str(token), env={}, default_config=tmp_path / "none.toml"
                                ).token == f"secret-{TOKEN}"
        assert read_token(token) == f"secret-{TOKEN}"
        return
    with pytest.raises(ConfigError) as client:
        resolve_settings(api="h:1", token_file=str(token), env={}, default_config=tmp_path / "none.toml")
    with pytest.raises(ConfigError) as daemon:
        read_token(token)  # what load_config (migd serve) calls
    text = str(daemon.value)
    assert str(client.value) == text and text.startswith(f"api.token_file: {token} is {refused}, ")
    assert f"(mode {mode:04o}); run `chmod 600 {token}`" in text


def test_a_token_path_that_is_not_a_small_regular_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 10_000)
    big.chmod(0o600)
    cases = [(fifo, "is not a regular file"), (Path("/dev/zero"), "is not a regular file"),
             (big, "is larger than 4096 bytes")]
    for path, why in cases:  # a FIFO would block a plain open, /dev/zero would fill memory
        with pytest.raises(ConfigError, match=why):
            read_token(path)
    # Negative control: the same token, small and regular, is read.
    big.write_text(f"secret-{TOKEN}\n")
    assert read_token(big) == f"secret-{TOKEN}"


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0"])
def test_api_timeout_must_be_a_finite_positive_number(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--api-timeout", value, "guest", "list"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--api-timeout" in err and "Traceback" not in err, err


def test_api_url_forms() -> None:
    assert parse_api_url("https://migd.example:8443/").base_url == "https://migd.example:8443"
    assert parse_api_url("10.1.2.3:8470").base_url == "http://10.1.2.3:8470"
    assert parse_api_url("[fd00::1]:8470").base_url == "http://[fd00::1]:8470"
    unix = parse_api_url("unix:/run/migd/api.sock")
    assert unix.unix_path == Path("/run/migd/api.sock") and str(unix) == "unix:/run/migd/api.sock"
    with pytest.raises(ConfigError):
        parse_api_url("http://")


def test_missing_settings_are_a_usage_error_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("MIGD_API", "MIGD_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MIGD_CONFIG", str(tmp_path / "absent.toml"))
    assert cli.main(["guest", "list"]) == 2
    assert capsys.readouterr().err == f"migd: error: cannot read config {tmp_path / 'absent.toml'}: " \
                                      "No such file or directory\n"


# ---------------------------------------------------------------------- rendering


def _migration(status: MigrationStatus = MigrationStatus.ACTIVE, **fields: Any) -> dict[str, Any]:
    """A migration object as the daemon renders it (512 MiB guest)."""
    progress = MigrationProgress(guest="g1", role="source", destination="10.0.0.2:4444", npages=131072)
    progress.id = "a1b2c3d4e5f60718"
    t = progress.phase.started_at
    path = {
        MigrationStatus.SETUP: [], MigrationStatus.ACTIVE: [MigrationStatus.ACTIVE],
        MigrationStatus.STOP_COPY: [MigrationStatus.ACTIVE, MigrationStatus.STOP_COPY],
        MigrationStatus.COMPLETED: [MigrationStatus.ACTIVE, MigrationStatus.STOP_COPY, MigrationStatus.COMPLETED],
        MigrationStatus.FAILED: [MigrationStatus.ACTIVE, MigrationStatus.FAILED],
    }[status]
    for i, step in enumerate(path, 1):
        progress.phase.advance(step, t + i * 0.5, error="peer closed the connection"
                               if step is MigrationStatus.FAILED else None)
    progress.count_run(PageKind.PRIVATE, 100_000, 100_000 * (PAGE_SIZE + 32))
    progress.count_run(PageKind.SHARED, 1024, 1024 * PAGE_SIZE)
    progress.count_run(PageKind.ZERO, 30_048, 64)
    for key, value in fields.items():
        setattr(progress, key, value)
    return progress.to_json(now=t + 1.25)


def test_progress_line_shows_round_percent_throughput_and_expected_downtime() -> None:
    line = progress_line(_migration(rounds=3, remaining_pages=131072 // 4, throughput_bps=812.44 * 2**20,
                                    expected_downtime_ms=42.0))
    assert line == "g1 active    round  3 [" + "#" * 18 + "." * 6 + "]  75.0%  812.4 MiB/s  exp. downtime 42.0 ms"
    # Negative control: nothing remaining fills the bar; unknown expected downtime is "-".
    full = progress_line(_migration(rounds=1, remaining_pages=0))
    assert "[" + "#" * 24 + "]" in full and "100.0%" in full and full.endswith("exp. downtime -")


def test_progress_line_fits_the_terminal() -> None:
    migration = _migration(rounds=12, remaining_pages=0, throughput_bps=1234.5 * 2**20, expected_downtime_ms=133.7)
    assert len(progress_line(migration)) > 79
    assert len(progress_line(migration, width=79)) <= 79
    assert "[" + "#" * 8 + "]" in progress_line(migration, width=40)  # never fewer than 8 cells
    assert progress_line(migration, width=500) == progress_line(migration)  # nor more than the default


def test_percent_is_bounded_and_complete_when_completed() -> None:
    assert percent_done(_migration(remaining_pages=131072)) == 0.0
    assert percent_done(_migration(remaining_pages=10 * 131072)) == 0.0  # never negative
    assert percent_done(_migration(MigrationStatus.COMPLETED, remaining_pages=17)) == 100.0
    assert percent_done(_migration(MigrationStatus.FAILED, remaining_pages=65536)) == 50.0


def test_summary_lists_status_rounds_bytes_by_kind_throughput_downtime_and_time() -> None:
    lines = summary_lines(_migration(MigrationStatus.COMPLETED, rounds=4, downtime_ms=41.23))
    text = "\n".join(lines)
    assert lines[0] == "migration a1b2c3d4e5f60718 of g1 (source) to 10.0.0.2:4444: completed"
    assert "rounds:      4" in text
    assert "private 100000 (390.6 MiB), shared 1024 (4.0 MiB), zero 30048 (117.4 MiB)" in text
    wire = 100_000 * (PAGE_SIZE + 32) + 1024 * PAGE_SIZE + 64
    assert f"transferred: {format_bytes(wire)} on the wire (guest memory 512.0 MiB)" in text
    # A finished migration reports its average rate: wire bytes over 1.5 s.
    assert f"throughput:  {wire / 1.5 / 2**20:.1f} MiB/s" in text
    assert "downtime:    41.2 ms" in text and "total time:  1.50 s" in text
    assert "error" not in text
    failed = "\n".join(summary_lines(_migration(MigrationStatus.FAILED)))
    assert ": failed" in failed and "error:       peer closed the connection" in failed
    assert "downtime:    -" in failed


def test_summary_of_a_failed_migration_can_leave_the_error_to_stderr() -> None:
    failed = _migration(MigrationStatus.FAILED)
    assert summary_lines(failed, with_error=False) == summary_lines(failed)[:-1]
    assert summary_lines(failed)[-1] == "  error:       peer closed the connection"  # control: it has one
    assert moved_pages(failed)


def _nothing_moved(status: str = "failed") -> dict[str, Any]:
    progress = MigrationProgress(guest="g1", role="source", destination="10.0.0.2:4444", npages=16384)
    if status != "setup":
        progress.phase.advance(MigrationStatus(status), progress.phase.started_at + 0.01, error="nothing is listening")
    return progress.to_json()


def test_a_migration_that_moved_nothing_gets_no_final_bar() -> None:
    nothing = _nothing_moved()
    assert not moved_pages(nothing)
    for tty in (True, False):
        stream = io.StringIO()
        display = ProgressDisplay(stream, tty=tty, columns=80)
        display.update(_nothing_moved("setup"), now=0.0)
        display.finish(nothing)
        # On a terminal the setup bar is erased; in a pipe its line stays, and no "failed 0.0%" follows.
        assert "failed" not in stream.getvalue()
        assert stream.getvalue().endswith("\r\x1b[K" if tty else "\n")
    # Control: one that moved pages gets its final line.
    stream = io.StringIO()
    ProgressDisplay(stream, tty=False).finish(_migration(MigrationStatus.FAILED))
    assert stream.getvalue().split()[1] == "failed"


class _Tty(io.StringIO):
    """A stream whose terminal reports ``columns`` (a pty whose size was never set reports 0)."""

    def __init__(self, columns: int) -> None:
        super().__init__()
        self.reported = columns

    def fileno(self) -> int:
        return -1

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("env, reported, expected", [
    ({}, 0, 80),  # the tty does not know: unknown is 80
    ({}, 5, 80),  # absurdly narrow: taken as wrong
    ({}, 132, 132),
    ({"COLUMNS": "100"}, 0, 100),  # COLUMNS first, as shutil.get_terminal_size
    ({"COLUMNS": "0"}, 120, 120),  # 0 means unknown: ask the tty
    ({"COLUMNS": "wide"}, 0, 80),
])
def test_terminal_width_follows_get_terminal_size_and_zero_means_unknown(
    env: dict[str, str], reported: int, expected: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = _Tty(reported)
    monkeypatch.setattr(os, "get_terminal_size", lambda fd: os.terminal_size((stream.reported, 24)))
    assert terminal_columns(stream, env) == expected


def test_a_terminal_reporting_zero_columns_still_gets_the_whole_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(os, "get_terminal_size", lambda fd: os.terminal_size((0, 0)))
    migration = _migration(rounds=2, remaining_pages=1000, throughput_bps=100 * 2**20, expected_downtime_ms=12.0)
    stream = _Tty(0)
    ProgressDisplay(stream).update(migration, now=0.0)
    drawn = stream.getvalue().removeprefix("\r").removesuffix("\x1b[K")
    assert drawn == progress_line(migration, width=79) and drawn.endswith("exp. downtime 12.0 ms")
    # Negative control: the old rule, max(columns - 1, 20), cut the same line to 20 characters.
    old = progress_line(migration, width=max(0 - 1, 20))[:max(0 - 1, 20)]
    assert len(old) == 20 and old != drawn


def test_units() -> None:
    assert [format_bytes(n) for n in (0, 1023, 1024, 5 * 2**20 + 2**19, 3 * 2**30)] == [
        "0 B", "1023 B", "1.0 KiB", "5.5 MiB", "3.00 GiB"]
    assert [format_ms(x) for x in (None, 0.04, 999.94, 1830.0)] == ["-", "0.0 ms", "999.9 ms", "1.83 s"]


def test_display_redraws_in_place_on_a_terminal() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, tty=True, columns=80)
    for rounds in (1, 2, 2):
        display.update(_migration(rounds=rounds), now=float(rounds))
    display.message("interrupted")
    display.finish(_migration(MigrationStatus.COMPLETED, rounds=3))
    out = stream.getvalue()
    assert out.count("\r") == 5 and out.count("\x1b[K") == 5
    assert out.count("\n") == 2  # the message and the end of the bar: no scrolling per update
    drawn = [chunk.rstrip("\n").removesuffix("\x1b[K") for chunk in out.split("\r")[1:]]
    assert all(len(chunk) <= 79 for chunk in drawn)
    assert drawn[3] == "\x1b[Kinterrupted"
    assert drawn[-1].startswith("g1 completed round  3 [########") and "100.0%" in drawn[-1]
    # A bar left open (an error interrupts the watch) is ended once, so the error gets a line.
    stream = io.StringIO()
    display = ProgressDisplay(stream, tty=True, columns=80)
    display.update(_migration(rounds=1), now=0.0)
    display.end_line()
    display.end_line()
    assert stream.getvalue().count("\n") == 1 and stream.getvalue().endswith("\x1b[K\n")


def test_display_prints_plain_lines_on_change_or_periodically_otherwise() -> None:
    stream = io.StringIO()
    display = ProgressDisplay(stream, tty=False, plain_interval_s=2.0)
    display.update(_migration(rounds=1), now=0.0)   # first: printed
    display.update(_migration(rounds=1), now=1.0)   # same round, within 2 s: silent
    display.update(_migration(rounds=1), now=2.5)   # periodic
    display.update(_migration(rounds=2), now=2.6)   # new round
    display.update(_migration(MigrationStatus.STOP_COPY, rounds=2), now=2.7)  # new status
    display.finish(_migration(MigrationStatus.COMPLETED, rounds=3))
    display.end_line()  # nothing open in plain mode: no blank line
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert [line.split()[1] for line in lines] == ["active", "active", "active", "stop-copy", "completed"]


def test_api_error_text() -> None:
    assert format_api_error(409, "conflict", "guest g1 is defined") == "409 conflict: guest g1 is defined"
    assert format_api_error(404, "") == "404 Not Found"
    assert format_api_error(400, "bad body", {"field": "memory_mib"}) == '400 bad body: {"field": "memory_mib"}'
    error = ApiError(409, "conflict", "not ready")
    assert (error.status, error.error, error.detail) == (409, "conflict", "not ready")
    assert str(error) == "409 conflict: not ready"


# ---------------------------------------------------------------------- against a real daemon


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = ServeProcess.start(tmp_path_factory.mktemp("serve"), "hostA")
    try:
        yield process
    finally:
        process.stop()


def run_cli(daemon: ServeProcess, *argv: str, token_file: Path | None = None) -> tuple[int, str, str]:
    """``python -m migd ARGV --api ... --token-file ...`` in-process; returns (code, stdout, stderr)."""
    token = token_file or daemon.root / daemon.name / "api.token"
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        code = cli.main([*argv, "--api", daemon.url, "--token-file", str(token)])
    finally:
        sys.stdout, sys.stderr = saved
    return code, out.getvalue(), err.getvalue()


def test_guest_commands_against_a_daemon(daemon: ServeProcess) -> None:
    code, out, err = run_cli(daemon, "guest", "create", "cli1", "--memory-mib", "16")
    assert (code, err) == (0, "") and out.startswith("guest cli1 created: defined, 16 MiB")
    code, out, _ = run_cli(daemon, "guest", "list", "--json")
    assert code == 0 and "cli1" in [g["name"] for g in json.loads(out)["guests"]]
    code, out, _ = run_cli(daemon, "guest", "list")
    assert code == 0 and out.splitlines()[0].split() == ["NAME", "STATE", "MEMORY", "MIGRATABLE", "PRIVATE",
                                                         "SHARED", "CHECK"]
    code, out, _ = run_cli(daemon, "guest", "show", "cli1", "--json")
    assert code == 0 and json.loads(out)["pages"]["total"] == 16 * 256
    code, out, _ = run_cli(daemon, "guest", "show", "cli1")
    assert code == 0 and "state:       defined" in out
    code, out, _ = run_cli(daemon, "guest", "delete", "cli1")
    assert (code, out) == (0, "guest cli1 deleted\n")
    assert daemon.request("GET", "/v1/guests/cli1")[0] == 404


def test_uefi_variable_absent_vs_default_is_what_the_efi_guest_sees(daemon: ServeProcess) -> None:
    """``--uefi-live-migration absent`` must reach the guest as "no variable" (JSON null), not be
    dropped (the daemon's default, true): the guest decides at boot, before start answers."""
    guests = {"efi-absent": ["--uefi-live-migration", "absent"], "efi-default": [], "efi-false":
              ["--uefi-live-migration", "false"]}
    try:
        for name, extra in guests.items():
            assert run_cli(daemon, "guest", "create", name, "--memory-mib", "16", "--efi", *extra)[0] == 0
            code, out, err = run_cli(daemon, "guest", "start", name, "--json")
            assert code == 0, err
            assert json.loads(out)["migration_control"]["ready"] is (name == "efi-default"), name
    finally:
        for name in guests:
            run_cli(daemon, "guest", "stop", name)
            run_cli(daemon, "guest", "delete", name)
    # A bad combination is refused by the daemon, whose reason the CLI prints.
    code, _, err = run_cli(daemon, "guest", "create", "u1", "--memory-mib", "16", "--uefi-live-migration", "true")
    assert code == 1 and err.startswith("migd: error: 400 bad_request: ") and "uefi_live_migration" in err


def test_errors_print_the_daemons_reason_and_exit_1(daemon: ServeProcess) -> None:
    code, out, err = run_cli(daemon, "guest", "show", "no-such-guest")
    status, body = daemon.request("GET", "/v1/guests/no-such-guest")
    assert (code, out, status) == (1, "", 404)
    assert err == f"migd: error: {format_api_error(404, body['error'], body.get('detail'))}\n"
    assert err.startswith("migd: error: 404 ") and "no-such-guest" in err
    # 409: a guest that has not booted cannot migrate; the daemon says why.
    assert run_cli(daemon, "guest", "create", "cli2", "--memory-mib", "16")[0] == 0
    try:
        code, _, err = run_cli(daemon, "migrate", "cli2", "--to", "127.0.0.1:9")
        assert code == 1 and err.startswith("migd: error: 409 ") and len(err.splitlines()) == 1
        code, _, err = run_cli(daemon, "guest", "create", "cli2", "--memory-mib", "16")
        assert code == 1 and err.startswith("migd: error: 409 ")
        code, _, err = run_cli(daemon, "guest", "create", "Bad Name!", "--memory-mib", "16")
        assert code == 1 and err.startswith("migd: error: 400 ")
    finally:
        run_cli(daemon, "guest", "delete", "cli2")


@pytest.mark.fault_class("access control: REST token")
def test_wrong_token_is_401_with_the_reason(daemon: ServeProcess, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.token"
    wrong.write_text("f" * 32 + "\n")
    wrong.chmod(0o600)
    code, out, err = run_cli(daemon, "migrations", token_file=wrong)
    assert (code, out) == (1, "") and err.startswith("migd: error: 401 ")
    # Negative control: the right token lists (possibly no) migrations.
    assert run_cli(daemon, "migrations", "--json")[0] == 0


def test_unreachable_daemon_message(daemon: ServeProcess, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()
    assert cli.main(["guest", "list", "--api", f"127.0.0.1:{port}",
                     "--token-file", str(daemon.root / daemon.name / "api.token")]) == 1
    assert capsys.readouterr().err.startswith(f"migd: error: cannot reach the migd API at http://127.0.0.1:{port}")


def test_client_over_a_unix_socket_api(tmp_path: Path) -> None:
    """``api.listen = "unix:..."``: the CLI finds the socket and the token from ``--config`` alone."""
    runtime = Path(tempfile.mkdtemp(prefix="migd-cli-"))
    config = write_config(tmp_path, "hostU", api_port=free_port(), migration_port=free_port())
    sock = runtime / "api.sock"
    text = config.read_text()
    start = text.index('listen = "127.0.0.1:')
    config.write_text(text[:start] + f'listen = "unix:{sock}"' + text[text.index("\n", start):])
    proc = subprocess.Popen([sys.executable, "-m", "migd", "serve", "--config", str(config)], cwd=ROOT,
                            env={**os.environ, "RUNTIME_DIRECTORY": str(runtime)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "migd serve did not create its socket"
            time.sleep(0.05)
        result = subprocess.run([sys.executable, "-m", "migd", "guest", "list", "--json", "--config", str(config)],
                                cwd=ROOT, capture_output=True, text=True, timeout=60,
                                env={k: v for k, v in os.environ.items() if not k.startswith("MIGD_")})
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"guests": []}
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(runtime, ignore_errors=True)


def test_client_raises_typed_errors(daemon: ServeProcess) -> None:
    async def scenario() -> None:
        async with MigdClient(daemon.url, daemon.token) as api:
            assert (await api.health())["status"] == "ok"
            with pytest.raises(ApiError) as info:
                await api.migration("0" * 16)
            assert info.value.status == 404 and info.value.error
        async with MigdClient(f"127.0.0.1:{free_port()}", daemon.token) as api:
            with pytest.raises(ApiUnreachable):
                await api.guests()

    asyncio.run(scenario())


def test_demo_report_is_ok_only_for_a_completed_migration_with_a_clean_full_self_check() -> None:
    from migd.cli.demo import Arrival, report_clean, report_lines

    done = _migration(MigrationStatus.COMPLETED, rounds=2, downtime_ms=12.0)
    clean = Arrival(131072, 131072, 0, None, "running", "migrated")
    lines = report_lines(done, clean)
    assert "self-check:  131072 of 131072 pages verified on hostB, 0 errors" in lines
    assert lines[-1] == "result:      OK" and report_clean(done, clean)
    # Negative controls: an error, a partial check, a failed migration.
    bad = Arrival(131072, 131072, 3, "gpa 0x1000: private page read as shared", "running", "migrated")
    assert report_lines(done, bad)[-1] == "result:      FAILED" and not report_clean(done, bad)
    assert "first error: gpa 0x1000: private page read as shared" in report_lines(done, bad)
    partial = Arrival(4096, 131072, 0, None, "running", "migrated")
    assert not report_clean(done, partial)
    failed = _migration(MigrationStatus.FAILED)
    assert "self-check:  not run (the guest did not arrive)" in report_lines(failed, None)
    assert not report_clean(failed, None) and not report_clean(failed, clean)
