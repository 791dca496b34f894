"""The stop-and-copy hand-off (engines in one event loop): the destination stages the vCPU state
in its agent before COMMIT, runs it only after COMMIT, and writes no page under a staged agent."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

from migd import wire
from migd.guest.channel import GuestChannel
from migd.errors import MigdError
from migd.guest.host_guest import GuestState
from migd.host import Host
from migd.listener import MigrationListener
from migd.migration_state import MigrationStatus
from migd.page_runs import classify
from migd.source import OutgoingMigration
from migd.guest.workload import WorkloadConfig

from .hosts import closing, make_host, running_guest

LOAD = WorkloadConfig(dirty_rate_mib_s=8, convert_rate_hz=5, seed=21)


async def _migrate(tmp_path: Path, *, on_commit: Callable[[Host], Any] | None = None,
                   write: Callable[[Any, wire.Message], int] | None = None) -> tuple[Host, Host, Any]:
    """Migrate a loaded guest from hostA to hostB; returns both hosts and the source's progress.

    ``on_commit(b)`` runs as the source's commit hook; ``write`` replaces ``OutgoingMigration._write``.
    """
    a, b = make_host(tmp_path, "hostA"), make_host(tmp_path, "hostB")
    listener = MigrationListener(b)
    port = await listener.start("127.0.0.1", 0)
    guest = await running_guest(a, workload=LOAD)
    hook = None if on_commit is None else (lambda progress: on_commit(b))
    try:
        with mock.patch.object(OutgoingMigration, "_write", write or OutgoingMigration._write):
            progress = await asyncio.wait_for(OutgoingMigration(guest, "127.0.0.1", port, on_commit=hook).run(), 60)
        async with asyncio.timeout(30):  # the destination side ends on its own (completed, or cleaned up)
            while not all(m.status.finished for m in b.migrations.values()):
                await asyncio.sleep(0.02)
    finally:
        await listener.close()
    return a, b, progress


def test_the_destination_starts_a_staged_guest_with_one_request(tmp_path: Path) -> None:
    async def main() -> None:
        seen: dict[str, Any] = {}

        def at_commit(b: Host) -> None:  # PREPARED has come: the destination holds a verified guest
            seen["state"] = b.get("g1").state

        a, b, progress = await _migrate(tmp_path, on_commit=at_commit)
        async with closing(a, b):
            assert progress.status is MigrationStatus.COMPLETED, progress.phase.error
            assert seen["state"] is GuestState.INCOMING  # staged, not running, until COMMIT
            arrived = b.get("g1")
            assert arrived.state is GuestState.RUNNING
            check = await arrived.wait_check(60)
            assert check.errors == 0 and check.pages_verified == arrived.definition.npages
            channel = arrived.channel
            assert channel is not None
            # The staged path: the state went in before COMMIT, and COMMIT only said "start".
            assert channel.round_trip_s("import_state") is not None
            assert channel.round_trip_s("start") is not None

    asyncio.run(main())


def test_a_staged_guest_never_runs_when_the_source_does_not_commit(tmp_path: Path) -> None:
    """The source's journal fails at the commit point: it rolls back, and the destination's agent,
    which may already hold the staged state, is discarded without ever having been started."""

    async def main() -> None:
        channels: list[GuestChannel] = []

        def failing_commit(b: Host) -> None:
            channel = b.get("g1").channel
            assert channel is not None
            channels.append(channel)
            raise MigdError("journal: disk full (test)")

        a, b, progress = await _migrate(tmp_path, on_commit=failing_commit)
        async with closing(a, b):
            assert progress.status is MigrationStatus.FAILED
            assert "disk full" in (progress.phase.error or "")
            source_guest = a.get("g1")
            assert source_guest.state is GuestState.RUNNING and (await source_guest.check()).errors == 0
            assert b.guests == {}  # the partial guest is gone
            (channel,) = channels
            assert channel.round_trip_s("start") is None  # nothing told the staged agent to run
            assert channel.event_count("check") == 0  # and it never ran its arrival self-check

    asyncio.run(main())


def _injecting(before_state: bool) -> Callable[[Any, wire.Message], int]:
    """A source ``_write`` that sends the (paused) guest's last page once more, right before or
    right after the vCPU state: the same bytes, only their place in the stream differs."""
    original = OutgoingMigration._write

    def resend_last_page(self: Any) -> None:
        guest = self.guest
        for run in classify(guest.vm.shared_bitmap, guest.ram, guest.definition.npages - 1, 1):
            self._send_run(run.kind, run.first, run.count)

    def write(self: Any, msg: wire.Message, lane: int = 0) -> int:
        if isinstance(msg, wire.VcpuState) and before_state:
            resend_last_page(self)
        nbytes = original(self, msg, lane)
        if isinstance(msg, wire.VcpuState) and not before_state:
            resend_last_page(self)
        return nbytes

    return write


def test_a_page_after_the_vcpu_state_never_reaches_a_staged_guest(tmp_path: Path) -> None:
    """The destination's page worker may place the frame before the loop handles the state (then
    the agent, staged after, reads it from RAM, and the guest checks clean); once the state is
    handled a later page is refused, on arrival or counted at PREPARE. Either way nothing is
    written under an agent that already loaded its state."""

    async def main() -> None:
        a, b, progress = await _migrate(tmp_path, write=_injecting(before_state=False))
        async with closing(a, b):
            error = progress.phase.error or ""
            if progress.status is MigrationStatus.FAILED:
                assert "frame in phase await-prepare" in error or "not what the source sent" in error, error
                source_guest = a.get("g1")
                assert source_guest.state is GuestState.RUNNING and (await source_guest.check()).errors == 0
                assert b.guests == {}
            else:
                assert progress.status is MigrationStatus.COMPLETED and not error, error
                check = await b.get("g1").wait_check(60)
                assert check.errors == 0, check

    asyncio.run(main())


def test_a_page_before_the_vcpu_state_is_fine(tmp_path: Path) -> None:
    """The same extra page one frame earlier is part of the guest: always accepted."""

    async def main() -> None:
        a, b, progress = await _migrate(tmp_path, write=_injecting(before_state=True))
        async with closing(a, b):
            assert progress.status is MigrationStatus.COMPLETED, progress.phase.error
            assert progress.phase.error is None
            check = await b.get("g1").wait_check(60)
            assert check.errors == 0, check

    asyncio.run(main())
