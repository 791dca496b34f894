"""Confidential save/restore with real ``migd serve`` processes, driven through their REST APIs.

1. A guest under write load (16-24 MiB/s, conversions) saved live and restored on the same host
   and, for another host's PDH, on that host: every page verified with no error, the workload
   goes on, the final shared-page bitmap is the same at the pause (the save job's digest in the
   saving host's journal), in the file's tail and as installed (the restore job's digest in the
   restoring host's journal); a later save's digest differs (the comparison can fail). The file
   is as long as its layout says and allocates no more than the guest plus metadata.
2. A guest that kexecs or reboots on its own during a live save: the job passes through
   ``blackout``, writes nothing while the MSR is 0, and the restored guest is clean. In-process
   (the agent flag is not reachable over REST): the same kexec, held in its window, with
   ``unsafe_kexec_keep_msr`` — the MSR stays READY, the save never blacks out, and the restored
   guest's self-check finds corrupted pages (the negative control of the MSR gate).
3. SIGKILL of the daemon mid-save: after the restart the guest is intact (stopped, boots, saves
   and restores clean) and no file exists under the path or the temporary name. SIGKILL of the
   destination daemon mid-restore: after its restart no trace of the guest exists; the restore,
   retried, completes clean.
4. A file restores once: a second restore (under another name, or of a copy) is refused, also
   after a SIGTERM restart; a newer save of the same guest is not.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from migd.abi import PAGE_SIZE
from migd.daemon.recovery import RESTART_ERROR
from migd.guest.host_guest import GuestDefinition, GuestState
from migd.guest.workload import WorkloadConfig
from migd.migration_state import MigrationStatus
from migd.progress import MigrationProgress
from migd.save import part_path
from test_api import make_daemon  # tests/ is on sys.path under pytest

from .save_helpers import (
    arrived_clean, assert_sparse_in_place, assert_workload_runs, completed, create_and_start, file_bitmap_sha256,
    journal_stats, metric, poll_job, refused_restore, restore, save, start, statuses, wait_populated,
)
from .serve_process import ServeProcess
from .test_restart import assert_no_guest, restart, runtime_dir_of, wait_no_agents

MEMORY_MIB = 64
NPAGES = MEMORY_MIB * 256
#: Write load (random runs of the data area), conversions, a quarter of the data area written at boot.
LOAD = {"dirty_rate_mib_s": 24, "convert_rate_hz": 20, "seed": 7, "populate_fraction": 0.25}
#: A guest whose save takes long enough to interrupt and to kexec in: every page written at boot
#: (RAM file fully allocated: wait_populated), so round 0 alone writes 256 MiB (~1 s here).
BIG_MIB = 256
BIG_NPAGES = BIG_MIB * 256
BIG_LOAD = {"dirty_rate_mib_s": 16, "convert_rate_hz": 20, "seed": 3, "populate_fraction": 1.0}
SMALL_MIB = 16



def same_bitmap(saver: ServeProcess, save_id: str, restorer: ServeProcess, restore_id: str, path: Path) -> str:
    """The shared-page bitmap at the pause (save job), in the file, and as installed (restore job): one digest."""
    at_pause = journal_stats(saver, save_id)["stats"]["shared_bitmap_sha256"]
    installed = journal_stats(restorer, restore_id)["stats"]["shared_bitmap_sha256"]
    in_file, shared = file_bitmap_sha256(path)
    assert at_pause is not None and at_pause == in_file == installed, (at_pause, in_file, installed)
    assert shared > 0  # the firmware's and the decrypted section's shared pages at least
    return in_file


def guest_state(daemon: ServeProcess, name: str = "g1") -> str | None:
    status, guest = daemon.request("GET", f"/v1/guests/{name}")
    return guest["state"] if status == 200 else None


# ---------------------------------------------------------------------- 1. under load, here and there


def test_a_guest_under_load_saved_live_restores_clean_here_and_on_another_host(
    tmp_path: Path, daemons: dict[str, ServeProcess]
) -> None:
    a, b = daemons["A"], daemons["B"]
    create_and_start(a, "g1", MEMORY_MIB, LOAD)
    time.sleep(1.0)  # under load for a while: pages written all over, some converted

    # Saved live and restored on the same host (the file is for its own PDH).
    here = tmp_path / "g1-here.save"
    save_id = save(a, "g1", here, live=True)
    job, samples = poll_job(a, save_id, "g1")
    assert job["status"] == "completed" and job["error"] is None, (job, a.log()[-3000:])
    assert "active" in statuses(samples), statuses(samples)
    assert job["rounds"] >= 2, job  # live: pre-copy round(s), then the paused pass
    assert guest_state(a) == "saved"
    assert not part_path(here, save_id).exists()
    restore_id = restore(a, here)
    restored = completed(a, restore_id)
    arrived_clean(a, "g1", NPAGES)
    digest_here = same_bitmap(a, save_id, a, restore_id, here)
    data_pages = restored["pages"]["private"] + restored["pages"]["shared"]  # what the file's table holds
    facts = assert_sparse_in_place(here, NPAGES, data_pages)
    assert facts.allocated < NPAGES * PAGE_SIZE, facts  # holes stay holes: a part of the guest was never written
    assert_workload_runs(a, "g1")
    time.sleep(1.0)  # the restored guest writes and converts on

    # The same guest saved live for hostB: only hostB's firmware can open it. Its arrival
    # check there is also the later check of the guest restored here above.
    there = tmp_path / "g1-there.save"
    save_id = save(a, "g1", there, live=True, for_host=b)
    completed(a, save_id)
    assert guest_state(a) == "saved"
    assert "saved for another host" in refused_restore(a, there)
    restore_id = restore(b, there)
    restored = completed(b, restore_id)
    arrived_clean(b, "g1", NPAGES)
    digest_there = same_bitmap(a, save_id, b, restore_id, there)
    # Negative control of the comparison: the bitmap changed between the two saves (the
    # workload converts pages), and so did its digest.
    assert digest_there != digest_here
    assert_sparse_in_place(there, NPAGES, restored["pages"]["private"] + restored["pages"]["shared"])
    assert_workload_runs(b, "g1")
    assert guest_state(a) == "saved"  # one copy runs: hostB's


# ---------------------------------------------------------------------- 2. kexec / reboot during a live save


@pytest.mark.parametrize("action", ["kexec", "reboot"])
def test_a_kexec_or_reboot_during_a_live_save_is_ridden_out_in_blackout(tmp_path: Path, action: str) -> None:
    a = ServeProcess.start(tmp_path, "hostA")
    try:
        # The guest goes offline on its own 0.5 s after its workload starts (after populating:
        # the save is then in round 0, ~1 s long) and its new kernel writes READY 1.5 s later.
        create_and_start(a, "g1", BIG_MIB, {**BIG_LOAD, f"{action}_after_s": 0.5, "boot_time_s": 1.5})
        wait_populated(a, "g1", BIG_MIB)
        path = tmp_path / "g1.save"
        save_id = save(a, "g1", path, live=True)
        job, samples = poll_job(a, save_id, "g1")
        assert job["status"] == "completed" and job["error"] is None, (job, a.log()[-3000:])
        seen = statuses(samples)
        assert "blackout" in seen, f"the {action} never came during the save: {seen}"
        blackout = [s for s in samples if s.status == "blackout"]
        assert blackout[-1].at - blackout[0].at > 0.5 and len(blackout) >= 10, blackout
        # No page written while the MSR was not READY: the count stood still the whole time...
        assert {s.transferred for s in blackout} == {blackout[0].transferred}, blackout
        # ...and the MSR was 0 (the guest read right after the job; the last may be READY already).
        assert all(s.msr == 0 for s in blackout[:-1]), blackout
        assert samples[-1].transferred > blackout[0].transferred  # the pages that changed were written after
        assert journal_stats(a, save_id)["stats"]["blackouts"] >= 1
        assert metric(a, "migd_migration_blackouts_total") >= 1
        log = a.log()
        assert "save blackout guest=g1" in log and f"kind={action}" in log, log[-3000:]

        assert guest_state(a) == "saved"
        # Every page at least once, plus the rounds that followed: more than the guest holds, in a
        # file no larger than the guest plus metadata (written in place).
        assert job["bytes"]["transferred"] > BIG_MIB << 20, job
        restore_id = restore(a, path)
        restored = completed(a, restore_id)
        assert_sparse_in_place(path, BIG_NPAGES, restored["pages"]["private"] + restored["pages"]["shared"])
        arrived_clean(a, "g1", BIG_NPAGES)
        same_bitmap(a, save_id, a, restore_id, path)
    finally:
        a.stop()


async def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


async def _finished(progress: MigrationProgress, timeout: float = 60.0) -> MigrationProgress:
    await _wait(lambda: progress.status.finished, timeout, f"job not finished: {progress.to_json()}")
    return progress


@pytest.mark.parametrize("unsafe", [False, True], ids=["safe-kexec", "unsafe-kexec-keep-msr"])
def test_a_kexec_held_in_its_window_during_a_live_save(tmp_path: Path, unsafe: bool) -> None:
    """In-process (HostGuest.start's ``unsafe_kexec_keep_msr`` has no REST form): the guest kexecs
    during a live save and is held where its new kernel has reused the old kernel's shared pages
    as private but not yet told the host (the stale-bitmap window of the seed race).

    Safe: the MSR went to 0 first: the save is in ``blackout`` and writes nothing until the
    guest goes on; the restore is clean. Unsafe (negative control): READY stays up, the save
    goes on writing with the stale bitmap, and the restored guest finds corrupted pages.
    """
    path = tmp_path / "g1.save"
    mib = 64

    async def main() -> None:
        daemon = make_daemon(tmp_path, "hostA")
        await daemon.start()
        try:
            daemon.create_guest(GuestDefinition("g1", mib, 0))
            guest = daemon.guest("g1")
            # Every data page written at boot, a quarter of them shared: many to reuse on kexec.
            workload = WorkloadConfig(dirty_rate_mib_s=2, convert_rate_hz=50, seed=21, populate_fraction=1.0,
                                      shared_fraction=0.25)
            await guest.start(workload, unsafe_kexec_keep_msr=unsafe)
            daemon.host.journal_guest(guest)
            await _wait(lambda: guest.vm.migration_ready, 20, "READY")
            await _wait(lambda: guest.ram.path.stat().st_blocks * 512 >= mib << 20, 30, "populated")
            channel = guest.channel
            assert channel is not None

            progress = daemon.save_guest("g1", str(path), live=True)
            await _wait(lambda: progress.bytes_transferred > 4 << 20, 10, f"no pages: {progress.to_json()}")
            assert progress.status is MigrationStatus.ACTIVE, progress.to_json()
            windows = channel.event_count("kexec-window")
            await channel.kexec(hold_in_window=True)
            await channel.wait_event("kexec-window", 20, since=windows)
            if unsafe:
                assert guest.vm.migration_ready  # the bug: the MSR never dropped
                await _finished(progress)
                assert progress.phase.blackouts == 0  # so the save never held back a page
            else:
                assert not guest.vm.migration_ready
                await _wait(lambda: progress.status is MigrationStatus.BLACKOUT, 5, progress.to_json())
                held_at = progress.bytes_transferred
                await asyncio.sleep(0.5)
                assert progress.status is MigrationStatus.BLACKOUT and progress.bytes_transferred == held_at
                await channel.resume()  # the new kernel goes on: early reset, READY
                await _finished(progress)
                assert progress.phase.blackouts >= 1 and progress.bytes_transferred > held_at
            assert progress.status is MigrationStatus.COMPLETED, progress.phase.error
            assert guest.state is GuestState.SAVED

            restored = await _finished(daemon.restore_guest(str(path)))
            assert restored.status is MigrationStatus.COMPLETED, restored.phase.error
            # The restore ends before the restored guest's arrival self-check reports.
            await _wait(lambda: daemon.guest("g1").to_json()["check"]["pages_verified"] > 0, 60, "no self-check")
            check = daemon.guest("g1").to_json()["check"]
            assert check["pages_verified"] == mib * 256, check
            if unsafe:
                assert check["errors"] > 0 and "corrupted" in check["last_error"], check
            else:
                assert check["errors"] == 0, check
        finally:
            await daemon.shutdown()

    asyncio.run(main())


# ---------------------------------------------------------------------- 3. SIGKILL mid-save, mid-restore


def kill_when(daemon: ServeProcess, job_id: str, predicate: Callable[[dict[str, Any]], bool],
              timeout: float = 30.0) -> dict[str, Any]:
    """Poll the job at ~5 ms; SIGKILL the daemon the first time ``predicate(job)`` holds (it must
    hold before the job ends). Returns that job body."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, job = daemon.request("GET", f"/v1/migrations/{job_id}")
        assert status == 200 and job["status"] not in ("completed", "failed", "cancelled"), job
        if predicate(job):
            daemon.kill()
            assert daemon.proc.returncode == -signal.SIGKILL
            return job  # type: ignore[no-any-return]
        time.sleep(0.005)
    raise TimeoutError(f"job {job_id} never reached the point to kill it")


@pytest.mark.fault_class("SIGKILL: daemon mid-save")
def test_sigkill_mid_save_keeps_the_guest_and_leaves_no_file(tmp_path: Path) -> None:
    a = ServeProcess.start(tmp_path, "hostA")
    try:
        create_and_start(a, "g1", BIG_MIB, BIG_LOAD)
        wait_populated(a, "g1", BIG_MIB)
        agents = runtime_dir_of(a)
        path = tmp_path / "g1.save"
        save_id = save(a, "g1", path, live=True)
        part = part_path(path, save_id)

        def mid_pages(job: dict[str, Any]) -> bool:  # pages written, the temporary file there
            return bool(job["status"] == "active" and job["bytes"]["transferred"] > 32 << 20 and part.exists())

        kill_when(a, save_id, mid_pages)
        assert part.exists() and not path.exists()  # the fault struck mid-pages, before the final name
        wait_no_agents(agents)

        a = restart(tmp_path, a)
        job = a.request("GET", f"/v1/migrations/{save_id}")[1]
        assert job["status"] == "failed" and job["error"] == RESTART_ERROR, job  # no commit: never the file's
        assert journal_stats(a, save_id)["committed"] == 0
        guest = a.request("GET", "/v1/guests/g1")[1]
        assert guest["state"] == "stopped" and guest["pages"]["total"] == BIG_NPAGES, guest
        # No file at the path, no temporary one, nothing else in the directory; no restore accepts it.
        assert not path.exists() and not part.exists()
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".g1.save", "g1.save"))]
        assert "cannot open" in refused_restore(a, path)
        # The guest is intact: it boots again, and saves and restores clean.
        start(a, "g1", {"dirty_rate_mib_s": 4, "convert_rate_hz": 10, "seed": 5})
        again = tmp_path / "g1-again.save"
        completed(a, save(a, "g1", again, live=False))
        completed(a, restore(a, again))
        arrived_clean(a, "g1", BIG_NPAGES)
    finally:
        a.stop()


@pytest.mark.fault_class("SIGKILL: daemon mid-restore")
def test_sigkill_mid_restore_leaves_no_guest_and_the_restore_can_be_retried(
    tmp_path: Path, daemons: dict[str, ServeProcess]
) -> None:
    a, b = daemons["A"], daemons["B"]
    create_and_start(a, "g1", BIG_MIB, BIG_LOAD)
    wait_populated(a, "g1", BIG_MIB)
    path = tmp_path / "g1.save"
    completed(a, save(a, "g1", path, live=False, for_host=b))
    agents = runtime_dir_of(b)

    restore_id = restore(b, path)

    def mid_pages(job: dict[str, Any]) -> bool:  # pages placed into a guest that exists on hostB
        return bool(job["status"] == "active" and job["bytes"]["transferred"] > 16 << 20
                    and guest_state(b) == "incoming")

    kill_when(b, restore_id, mid_pages)
    wait_no_agents(agents)
    daemons["B"] = b = restart(tmp_path, b)
    assert_no_guest(b, tmp_path / "hostB")  # not listed, no directory, no firmware context
    job = b.request("GET", f"/v1/migrations/{restore_id}")[1]
    assert job["status"] == "failed" and job["error"] == RESTART_ERROR, job
    # The file was left restorable: the retry completes, every page verified.
    completed(b, restore(b, path))
    arrived_clean(b, "g1", BIG_NPAGES)
    assert guest_state(a) == "saved"


# ---------------------------------------------------------------------- 4. at most once


@pytest.mark.fault_class("attacker: replayed save file")
def test_a_file_restores_once_also_after_a_restart(tmp_path: Path) -> None:
    a = ServeProcess.start(tmp_path, "hostA")
    try:
        create_and_start(a, "g1", SMALL_MIB, {"dirty_rate_mib_s": 4, "convert_rate_hz": 10, "seed": 9})
        path = tmp_path / "g1.save"
        completed(a, save(a, "g1", path, live=True))
        completed(a, restore(a, path))
        arrived_clean(a, "g1", SMALL_MIB * 256)
        copy = tmp_path / "g1-copy.save"
        shutil.copyfile(path, copy)
        # Under a free name, so the refusal is the file's, not the name's; a copy is the same session.
        for replay in (path, copy):
            assert "restored on this host before" in refused_restore(a, replay, name="g1b")

        assert a.stop() == 0, a.log()[-3000:]  # SIGTERM
        a = ServeProcess.start(tmp_path, "hostA", api_port=a.api_port, migration_port=a.migration_port)
        for replay in (path, copy):
            assert "restored on this host before" in refused_restore(a, replay, name="g1b")
        assert a.request("GET", "/v1/guests/g1b")[0] == 404

        # Negative control: a newer save of the same guest restores, under that same free name.
        assert guest_state(a) == "stopped"  # SIGTERM shut it down cleanly
        start(a, "g1", {"dirty_rate_mib_s": 4, "convert_rate_hz": 10, "seed": 9})
        newer = tmp_path / "g1-newer.save"
        completed(a, save(a, "g1", newer, live=False))
        completed(a, restore(a, newer, name="g1b"))
        arrived_clean(a, "g1b", SMALL_MIB * 256)
    finally:
        a.stop()
