"""Live migration between two real processes on 127.0.0.1.

The source engine runs in the test process (with its guest agent as a child process); the
destination is ``host_process.py`` in a process of its own, which a test may SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from migd.guest.host_guest import GuestDefinition, GuestState, HostGuest
from migd.migration_state import MigrationStatus
from migd.source import MigrationParams, MigrationRefused, OutgoingMigration
from migd.guest.workload import WorkloadConfig

from .hosts import closing, make_host, running_guest

S = MigrationStatus
HOST_PROCESS = Path(__file__).with_name("host_process.py")
pytestmark = pytest.mark.timeout(120)


class DestProcess:
    """The destination host process and its JSON-lines control pipe."""

    def __init__(self, proc: asyncio.subprocess.Process, hello: dict[str, Any]) -> None:
        self.proc = proc
        self.hello = hello
        self.port = 0

    @classmethod
    async def start(cls, root: Path, name: str = "hostB") -> DestProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HOST_PROCESS), str(root), name,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        hello = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        dest = cls(proc, hello)
        dest.port = (await dest.call("listen"))["port"]
        return dest

    async def call(self, op: str, **kw: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"op": op, **kw}) + "\n").encode())
        await self.proc.stdin.drain()
        reply = json.loads(await asyncio.wait_for(self.proc.stdout.readline(), 90))
        assert "error" not in reply, reply
        return reply

    def kill(self) -> None:
        if self.proc.returncode is None:
            os.kill(self.proc.pid, signal.SIGKILL)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.call("exit"), 20)
            self.kill()
        await self.proc.wait()


@contextlib.asynccontextmanager
async def pair(tmp_path: Path) -> AsyncIterator[tuple[Any, DestProcess]]:
    source = make_host(tmp_path, "hostA")
    dest = await DestProcess.start(tmp_path)
    try:
        async with closing(source):
            yield source, dest
    finally:
        await dest.stop()


async def assert_source_guest_runs_clean(guest: HostGuest) -> None:
    assert guest.state is GuestState.RUNNING
    report = await guest.check()
    assert report.errors == 0, report
    assert report.pages_verified == guest.definition.npages


async def assert_no_trace_on_destination(dest: DestProcess, timeout: float = 15.0) -> None:
    """The destination drops a failed incoming guest once it sees the abort (bounded wait)."""
    async with asyncio.timeout(timeout):
        while True:
            guests, dirs = (await dest.call("guests"))["guests"], (await dest.call("dirs"))["dirs"]
            if guests == [] and dirs == []:
                return
            await asyncio.sleep(0.1)


def on_status(migration: OutgoingMigration, status: MigrationStatus, action: Callable[[], None]) -> None:
    """Run ``action`` the moment the migration enters ``status``."""

    def listener(to: MigrationStatus) -> None:
        if to is status:
            asyncio.get_running_loop().call_soon(action)

    migration.progress.phase.listeners.append(listener)


def run(coro: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro())


# ---------------------------------------------------------------------- the main job


def test_guest_under_load_migrates_and_runs_on(tmp_path: Path) -> None:
    async def main() -> None:
        async with pair(tmp_path) as (source, dest):
            guest = await running_guest(source, memory_mib=64,
                                        workload=WorkloadConfig(dirty_rate_mib_s=8, convert_rate_hz=20, seed=1))
            await asyncio.sleep(1.0)  # let the workload write and convert pages
            progress = await OutgoingMigration(guest, "127.0.0.1", dest.port).run()
            assert progress.status is S.COMPLETED, progress.phase.error
            assert guest.state is GuestState.MIGRATED and guest.agent is None
            assert not guest.guest_dir.exists()  # the source released the guest's memory
            report = await dest.call("wait_check", name="g1")
            assert report == {"pages_verified": guest.definition.npages, "errors": 0, "first_error": None}
            remote = await dest.call("migrations")
            (incoming,) = remote["migrations"]
            assert incoming["status"] == "completed" and incoming["role"] == "destination"
            assert remote["bitmaps"][incoming["id"]] == progress.shared_bitmap_sha256
            # The workload continues there: its page conversions keep reaching the new host.
            before = (await dest.call("hypercalls", name="g1"))["ok"]
            await asyncio.sleep(1.0)
            after = (await dest.call("hypercalls", name="g1"))["ok"]
            assert after > before
            (arrived,) = (await dest.call("guests"))["guests"]
            assert arrived["state"] == "running" and arrived["migration_control"]["ready"]
            assert (await dest.call("check", name="g1"))["errors"] == 0

    run(main)


def test_migration_refused_while_msr_not_ready(tmp_path: Path) -> None:
    async def main() -> None:
        async with pair(tmp_path) as (source, dest):
            guest = source.create_guest(
                GuestDefinition(
                    "efi1", 16, efi=True, uefi_live_migration=False))
            await guest.start()
            assert not guest.vm.migration_ready
            with pytest.raises(MigrationRefused, match="MSR_KVM_MIGRATION_CONTROL"):
                OutgoingMigration(guest, "127.0.0.1", dest.port).start()
            await assert_no_trace_on_destination(dest)

    run(main)


# ---------------------------------------------------------------------- kexec mid-migration


async def _kexec_during_migration(tmp_path: Path, *, unsafe: bool) -> tuple[Any, dict[str, Any], HostGuest]:
    async with pair(tmp_path) as (source, dest):
        guest = source.create_guest(GuestDefinition("g1", 64))
        await guest.start(WorkloadConfig(dirty_rate_mib_s=4, convert_rate_hz=20, seed=5),
                          unsafe_kexec_keep_msr=unsafe)
        async with asyncio.timeout(20):
            while not guest.vm.migration_ready:
                await asyncio.sleep(0.02)
        await asyncio.sleep(1.0)
        assert guest.channel is not None
        channel = guest.channel
        migration = OutgoingMigration(guest, "127.0.0.1", dest.port,
                                      MigrationParams(max_bandwidth_mib_s=32, blackout_timeout_s=20))
        task = migration.start()
        async with asyncio.timeout(20):
            while migration.progress.status is not S.ACTIVE:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)
        windows = channel.event_count("kexec-window")
        await channel.kexec(hold_in_window=True)
        await channel.wait_event("kexec-window", 20, since=windows)
        # The new kernel now uses formerly shared pages as private; its reset is not done yet.
        await asyncio.sleep(1.0)
        if not unsafe:
            assert migration.progress.status is S.BLACKOUT  # nothing is sent while MSR = 0
            await channel.resume()  # let the new kernel finish its early boot
        progress = await asyncio.wait_for(task, 90)
        report: dict[str, Any] = {}
        if progress.status is S.COMPLETED:
            report = await dest.call("wait_check", name="g1")
        else:
            await assert_source_guest_runs_clean(guest)
        return progress, report, guest


def test_kexec_during_migration_passes_through_blackout(tmp_path: Path) -> None:
    async def main() -> None:
        progress, report, guest = await _kexec_during_migration(tmp_path, unsafe=False)
        assert progress.phase.blackouts >= 1
        assert S.BLACKOUT in progress.phase.entered_at
        assert progress.status is S.COMPLETED, progress.phase.error
        assert report["errors"] == 0, report
        assert report["pages_verified"] == guest.definition.npages

    run(main)


def test_unsafe_kexec_during_migration_corrupts_the_guest(tmp_path: Path) -> None:
    """Negative control: a guest that keeps the MSR READY across kexec is migrated with a stale bitmap."""

    async def main() -> None:
        progress, report, _ = await _kexec_during_migration(tmp_path, unsafe=True)
        assert progress.phase.blackouts == 0  # the host never saw the MSR drop
        assert progress.status is S.COMPLETED, progress.phase.error
        assert report["errors"] > 0, report

    run(main)


# ---------------------------------------------------------------------- cancel and kill


async def _interrupt(tmp_path: Path, phase: str, interrupt: Callable[[OutgoingMigration, DestProcess], None],
                     expect: MigrationStatus) -> None:
    async with pair(tmp_path) as (source, dest):
        guest = await running_guest(source, memory_mib=64)
        migration = OutgoingMigration(guest, "127.0.0.1", dest.port, MigrationParams(max_bandwidth_mib_s=64))
        if phase == "setup":
            task = migration.start()
            async with asyncio.timeout(20):
                while migration._proto is None:  # connected: the handshake is under way
                    await asyncio.sleep(0.001)
            interrupt(migration, dest)
        else:
            on_status(migration, S(phase), lambda: interrupt(migration, dest))
            task = migration.start()
        progress = await asyncio.wait_for(task, 60)
        assert progress.status is expect, (progress.status, progress.phase.error)
        assert progress.phase.entered_at.keys() >= {S(phase)}
        await assert_source_guest_runs_clean(guest)
        if dest.proc.returncode is None:
            await assert_no_trace_on_destination(dest)
        else:
            await dest.proc.wait()
            restarted = await DestProcess.start(tmp_path)
            try:
                assert restarted.hello["removed_partial"] in ([], ["g1"])
                await assert_no_trace_on_destination(restarted)
            finally:
                await restarted.stop()


@pytest.mark.parametrize("phase", ["setup", "active", "stop-copy"])
def test_cancel_leaves_source_running_and_destination_clean(tmp_path: Path, phase: str) -> None:
    def cancel(migration: OutgoingMigration, _: DestProcess) -> None:
        assert migration.cancel()

    run(lambda: _interrupt(tmp_path, phase, cancel, S.CANCELLED))


@pytest.mark.parametrize("phase", ["setup", "active", "stop-copy"])
def test_destination_sigkill_leaves_source_running(tmp_path: Path, phase: str) -> None:
    def kill(_: OutgoingMigration, dest: DestProcess) -> None:
        dest.kill()

    run(lambda: _interrupt(tmp_path, phase, kill, S.FAILED))


# ---------------------------------------------------------------------- convergence


#: Convergence cases: what matters is the guest's dirty rate against the link (24 vs 12 MiB/s),
#: not its size. A 16 MiB guest makes each round, and so each auto-converge step, 4x shorter
#: than a 64 MiB one; unthrottled, its dirty set (~13 MiB) still never fits the downtime limit.
CONVERGE_MIB = 16
#: Pre-copy time after round 0 (the policy's clock). The throttled guest needs ~6 s of it (7
#: auto-converge steps); the unthrottled control gets the same bound and must still fail.
CONVERGE_S = 12.0


@pytest.mark.parametrize("auto_converge", [True, False], ids=["auto-converge", "no-auto-converge"])
def test_guest_dirtying_faster_than_the_link(tmp_path: Path, auto_converge: bool) -> None:
    async def main() -> None:
        async with pair(tmp_path) as (source, dest):
            guest = await running_guest(source, memory_mib=CONVERGE_MIB,
                                        workload=WorkloadConfig(dirty_rate_mib_s=24, convert_rate_hz=5, seed=3))
            params = MigrationParams(max_bandwidth_mib_s=12, downtime_limit_ms=100, converge_timeout_s=CONVERGE_S,
                                     auto_converge=auto_converge)
            progress = await OutgoingMigration(guest, "127.0.0.1", dest.port, params).run()
            if auto_converge:
                assert progress.status is S.COMPLETED, progress.phase.error
                assert progress.throttle_percent > 0
                assert (await dest.call("wait_check", name="g1"))["errors"] == 0
            else:  # negative control: without throttling the same guest never converges
                assert progress.status is S.FAILED
                assert "did not converge" in (progress.phase.error or "")
                await assert_source_guest_runs_clean(guest)
                await assert_no_trace_on_destination(dest)

    run(main)


def test_force_switchover_past_the_converge_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        async with pair(tmp_path) as (source, dest):
            guest = await running_guest(source, memory_mib=CONVERGE_MIB,
                                        workload=WorkloadConfig(dirty_rate_mib_s=24, convert_rate_hz=5, seed=4))
            params = MigrationParams(max_bandwidth_mib_s=12, downtime_limit_ms=50, converge_timeout_s=3,
                                     auto_converge=False, force_switchover=True)
            progress = await OutgoingMigration(guest, "127.0.0.1", dest.port, params).run()
            assert progress.status is S.COMPLETED, progress.phase.error
            assert progress.throttle_percent == 0
            assert (await dest.call("wait_check", name="g1"))["errors"] == 0

    run(main)


def test_blackout_past_its_bound_fails_cleanly(tmp_path: Path) -> None:
    async def main() -> None:
        async with pair(tmp_path) as (source, dest):
            guest = await running_guest(source, memory_mib=64)
            assert guest.channel is not None
            channel = guest.channel
            migration = OutgoingMigration(guest, "127.0.0.1", dest.port,
                                          MigrationParams(max_bandwidth_mib_s=32, blackout_timeout_s=1.5))
            on_status(migration, S.ACTIVE, lambda: asyncio.ensure_future(channel.kexec(hold_in_window=True)))
            progress = await asyncio.wait_for(migration.start(), 60)
            assert progress.status is S.FAILED
            assert "did not re-enable migration" in (progress.phase.error or "")
            assert S.BLACKOUT in progress.phase.entered_at
            await assert_no_trace_on_destination(dest)
            # The guest is still in its kexec window: let it finish booting, then it is intact.
            await channel.resume()
            async with asyncio.timeout(20):
                while not guest.vm.migration_ready:
                    await asyncio.sleep(0.02)
            await assert_source_guest_runs_clean(guest)

    run(main)
