"""A save that committed but could not finish its file: a restart's recovery finishes it, or keeps the guest.

The window between the journal's commit record and the trailer MAC is tiny, so the fault is
injected where the MAC is computed (an I/O error there); the daemon is then restarted on the
same state directory, as after a crash.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

import migd.save
from migd.guest.host_guest import GuestDefinition, GuestState
from migd.guest.workload import WorkloadConfig
from migd.migration_state import MigrationStatus
from migd.progress import MigrationProgress
from migd.save import part_path
from test_api import make_daemon


async def _finished(progress: MigrationProgress, timeout: float = 60.0) -> MigrationProgress:
    async with asyncio.timeout(timeout):
        while not progress.status.finished:
            await asyncio.sleep(0.02)
    return progress


async def _running_guest(daemon, name: str) -> None:  # type: ignore[no-untyped-def]
    daemon.create_guest(GuestDefinition(name, 16, 0x1))
    guest = await daemon.start_guest(name, WorkloadConfig(dirty_rate_mib_s=4.0, convert_rate_hz=10.0, seed=7))
    async with asyncio.timeout(30):
        while not guest.vm.migration_ready:
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("crash", ["before-the-mac", "torn-mac", "after-the-link", "no-key"],
                         ids=["recovery-finishes-the-file", "a-torn-mac-is-rewritten", "a-linked-file-is-kept",
                              "negative-control-no-key"])
def test_a_save_committed_before_its_mac_is_finished_by_recovery(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 crash: str) -> None:
    path = tmp_path / "g1.save"
    key_kept = crash != "no-key"

    def failing_mac(key: bytes, body: bytes) -> bytes:
        raise OSError(5, "Input/output error")

    async def save_and_fail() -> str:
        daemon = make_daemon(tmp_path, "hostA")
        await daemon.start()
        try:
            await _running_guest(daemon, "g1")
            monkeypatch.setattr(migd.save, "tail_mac", failing_mac)
            progress = await _finished(daemon.save_guest("g1", str(path), live=True))
            monkeypatch.undo()
            guest = daemon.guest("g1")
            # Committed: never resumed here, memory kept, agent stopped; no file under the final name.
            assert progress.status is MigrationStatus.COMPLETED and progress.phase.committed
            assert "could not be finished" in (progress.phase.error or "")
            assert guest.state is GuestState.SAVED and guest.has_memory and guest.agent is None
            assert not path.exists() and part_path(path, progress.id).exists()
            part = part_path(path, progress.id)
            if not key_kept:
                daemon.journal._db.execute("UPDATE migrations SET handoff_key = NULL WHERE id = ?", (progress.id,))
            elif crash == "torn-mac":  # the MAC's extent reached the disk, its bytes did not
                with open(part, "ab") as f:
                    f.write(bytes(32))
            elif crash == "after-the-link":  # linked to its final name, the temporary name not yet removed
                with open(part, "ab") as f:
                    f.write(bytes(32))
                os.link(part, path)
            return progress.id
        finally:
            await daemon.shutdown()

    async def restart() -> None:
        daemon = make_daemon(tmp_path, "hostA")
        await daemon.start()
        try:
            guest = daemon.guest("g1")
            if not key_kept:
                # The file cannot be finished: the memory here is the guest's only copy, kept, and the
                # unfinished file goes, so that no later restart finishes it once the guest ran again.
                assert not path.exists() and not part_path(path, job_id).exists()
                assert guest.state is GuestState.STOPPED and guest.has_memory
                return
            assert path.exists() and not part_path(path, job_id).exists()
            assert guest.state is GuestState.SAVED and not guest.has_memory
            restored = await _finished(daemon.restore_guest(str(path)), 120)
            assert restored.status is MigrationStatus.COMPLETED, restored.phase.error
            report = await daemon.guest("g1").check()
            assert report.errors == 0 and report.pages_verified == 16 * 256
        finally:
            await daemon.shutdown()

    job_id = asyncio.run(save_and_fail())
    started = time.monotonic()
    asyncio.run(restart())
    assert time.monotonic() - started < 120
