"""``migd demo`` runs to the end, reports a clean self-check, and leaves nothing behind.

The demo is run with ``TMPDIR`` set to a fresh directory: every file it makes (state,
configs, logs, runtime sockets) must be gone from it afterwards, and no process may still
have that directory on its command line (the daemons and their guest agents all do).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .serve_process import ROOT

pytestmark = pytest.mark.timeout(300)
MEMORY_MIB = 128  # the README's demo uses 512; CI runs a smaller guest


@pytest.fixture
def tmpdir_env() -> Iterator[Path]:
    """A short, private TMPDIR (guest sockets live below it, so the path must stay short)."""
    path = Path(tempfile.mkdtemp(prefix="mdt-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def assert_nothing_left(tmpdir: Path) -> None:
    assert list(tmpdir.iterdir()) == [], "the demo left files behind"
    # Processes are reaped asynchronously by init once their parent is gone: allow a moment.
    deadline = time.monotonic() + 5
    while processes_mentioning(str(tmpdir)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_mentioning(str(tmpdir)) == []


def start_demo(tmpdir: Path, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    return subprocess.Popen(
        [sys.executable, "-m", "migd", "demo", "--memory-mib", str(MEMORY_MIB), *args], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # never inherit an ignored SIGINT
    )


def test_demo_runs_to_a_clean_self_check_and_cleans_up(tmpdir_env: Path) -> None:
    proc = start_demo(tmpdir_env)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    check = re.search(r"^self-check:  (\d+) of (\d+) pages verified on hostB, (\d+) errors$", out, re.M)
    assert check, out
    verified, total, errors = map(int, check.groups())
    assert (verified, total, errors) == (MEMORY_MIB * 256, MEMORY_MIB * 256, 0)
    assert re.search(r"^migration:   completed after \d+ rounds$", out, re.M)
    for label in ("transferred:", "pages sent:  private", "throughput:", "downtime:", "total time:"):
        assert label in out
    assert "guest:       running on hostB, migrated on hostA" in out
    assert out.rstrip().endswith("result:      OK")
    assert re.search(r"^demo completed round +\d+ \[#+\] 100\.0%", err, re.M), err  # the progress bar
    assert_nothing_left(tmpdir_env)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_cleans_up(tmpdir_env: Path, signum: int) -> None:
    proc = start_demo(tmpdir_env)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        seen = []
        # Interrupt while both daemons and the guest agent are running.
        while not seen or not seen[-1].startswith("letting the guest work"):
            line = proc.stdout.readline()
            if not line or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the demo never got its guest running:\n{''.join(seen)}{proc.communicate()[1]}")
            seen.append(line)
        assert processes_mentioning(str(tmpdir_env))  # negative control: there is something to clean up
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out + err
    assert "interrupted; cleaning up" in err
    assert_nothing_left(tmpdir_env)


def test_keep_leaves_the_directory_but_no_process(tmpdir_env: Path) -> None:
    proc = start_demo(tmpdir_env, "--keep")
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out + err
    kept = re.search(r"^migd demo: kept (\S+) ", err, re.M)
    assert kept, err
    root = Path(kept.group(1))
    assert root.parent == tmpdir_env and (root / "hostA.log").is_file() and (root / "hostB" / "migd.toml").is_file()
    assert [p.name for p in tmpdir_env.iterdir()] == [root.name]  # runtime dirs (sockets) are gone
    shutil.rmtree(root)
    assert_nothing_left(tmpdir_env)
