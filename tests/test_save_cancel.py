"""Cancelling a save or a restore before its commit leaves everything as it was (in-process daemon)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from migd.guest.host_guest import GuestDefinition, GuestState
from migd.guest.workload import WorkloadConfig
from migd.migration_state import MigrationStatus
from migd.progress import MigrationProgress
from migd.save import part_path
from test_api import make_daemon
from test_save_recovery import _finished, _running_guest


async def _status(progress: MigrationProgress, wanted: MigrationStatus, timeout: float = 30.0) -> None:
    async with asyncio.timeout(timeout):
        while progress.status is not wanted:
            assert not progress.status.finished, progress.to_json()
            await asyncio.sleep(0.002)


@pytest.mark.parametrize("when", ["before-the-first-step", "while-active"])
def test_a_cancelled_save_resumes_the_guest_and_leaves_no_file(tmp_path: Path, when: str) -> None:
    path = tmp_path / "g1.save"

    async def main() -> None:
        daemon = make_daemon(tmp_path, "hostA")
        await daemon.start()
        try:
            await _running_guest(daemon, "g1")
            progress = daemon.save_guest("g1", str(path), live=True)
            if when == "while-active":
                await _status(progress, MigrationStatus.ACTIVE)
            assert daemon.cancel_migration(progress.id) is progress
            await _finished(progress)
            guest = daemon.guest("g1")
            assert progress.status is MigrationStatus.CANCELLED and not progress.phase.committed
            assert guest.state is GuestState.RUNNING and guest.has_memory
            assert not path.exists() and not part_path(path, progress.id).exists()
            assert (await guest.check()).errors == 0
            # Negative control: the same guest saves to the same path once nothing cancels it.
            again = await _finished(daemon.save_guest("g1", str(path), live=True))
            assert again.status is MigrationStatus.COMPLETED and path.exists()
            assert sum(again.pages.values()) == 16 * 256  # the job counts what the file holds, each page once
            assert daemon.guest("g1").state is GuestState.SAVED
        finally:
            await daemon.shutdown()

    asyncio.run(main())


def test_a_cancelled_restore_leaves_no_guest_and_the_file_restorable(tmp_path: Path) -> None:
    path = tmp_path / "g1.save"

    async def main() -> None:
        daemon = make_daemon(tmp_path, "hostA")
        await daemon.start()
        try:
            daemon.create_guest(GuestDefinition("g1", 64, 0x1))
            guest = await daemon.start_guest("g1", WorkloadConfig(dirty_rate_mib_s=32.0, convert_rate_hz=10.0,
                                                                  seed=5))
            async with asyncio.timeout(30):
                while not guest.vm.migration_ready:
                    await asyncio.sleep(0.02)
            await asyncio.sleep(1.0)  # some pages written: the restore has work to cancel
            assert (await _finished(daemon.save_guest("g1", str(path)))).status is MigrationStatus.COMPLETED
            handles = daemon.firmware.guest_handles()
            restore = daemon.restore_guest(str(path), name="copy")
            await _status(restore, MigrationStatus.ACTIVE)
            assert daemon.cancel_migration(restore.id) is restore
            await _finished(restore)
            assert restore.status is MigrationStatus.CANCELLED
            assert "copy" not in daemon.host.guests and not daemon.host.guest_dir("copy").exists()
            assert daemon.firmware.guest_handles() == handles
            # Negative control: the file was not used up; restored now, it runs clean.
            retried = await _finished(daemon.restore_guest(str(path), name="copy"), 120)
            assert retried.status is MigrationStatus.COMPLETED, retried.phase.error
            assert (await daemon.guest("copy").check()).errors == 0
        finally:
            await daemon.shutdown()

    asyncio.run(main())
