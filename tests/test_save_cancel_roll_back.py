"""Found by an adversarial review, fixed with FileJob._rolling_back: before, a cancel (REST cancel, a second Ctrl-C, daemon shutdown) arriving while a save's roll-back awaited the
guest's resume() interrupted the roll-back: the guest stayed PAUSED and the job never finished (which
kept _not_migrating refusing every operation on the guest). Interleaving forced with events."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest

from migd.guest.host_guest import GuestDefinition, GuestState
from migd.platform import identity
from migd.platform.psp import PspFirmware
from migd.save import GuestSave, SaveFailed, part_path


class Channel:
    connected = True

    def __init__(self) -> None:
        self.in_resume = asyncio.Event()
        self.reply = asyncio.Event()
        self.calls: list[str] = []

    async def resume(self) -> None:
        self.calls.append("resume sent")  # the request reaches the agent; the wait is for its reply
        self.in_resume.set()
        await self.reply.wait()
        self.calls.append("resume acknowledged")


def _firmware(tmp_path: Path) -> PspFirmware:
    identity.init_host(tmp_path / "hostA", tmp_path / "ca", common_name="hostA")
    return PspFirmware.from_state_dir(tmp_path / "hostA", [tmp_path / "ca" / identity.CA_CERT])


@pytest.mark.parametrize("first", ["failure", "cancel"])
def test_a_cancel_during_the_save_roll_back_still_resumes_and_finishes(tmp_path: Path, first: str) -> None:
    fw = _firmware(tmp_path)
    handle = fw.launch(0)

    async def main() -> None:
        channel = Channel()
        guest = SimpleNamespace(
            name="g", definition=GuestDefinition("g", 1, 0), handle=handle, agent=object(),
            state=GuestState.RUNNING, firmware=fw, channel=channel,
            vm=SimpleNamespace(migration_ready=True, msr_migration_control=1, on_migration_control_change=None),
        )
        path = tmp_path / "g.save"
        job = GuestSave(guest, path, fw.pdh_cert_pem)  # type: ignore[arg-type]
        stopped = asyncio.Event()

        async def stop_and_write(dirty: object) -> None:  # as _stop_and_write once it has paused the guest
            job._paused = True
            guest.state = GuestState.PAUSED
            if first == "failure":
                raise SaveFailed("injected: the file system is full")
            stopped.set()
            await asyncio.Event().wait()  # writing the last pages when the operator cancels

        job._stop_and_write = stop_and_write  # type: ignore[method-assign]
        task = job.start()
        if first == "cancel":
            await asyncio.wait_for(stopped.wait(), 5)
            assert job.cancel()  # REST cancel: the roll-back starts
        await asyncio.wait_for(channel.in_resume.wait(), 5)  # _roll_back awaits the agent's reply
        assert not part_path(path, job.progress.id).exists()
        assert job.cancel(), "cancel() refused: the window is not reachable"  # a second cancel / shutdown
        channel.reply.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        problems = []
        if not job.session.finished:
            problems.append(f"the save never finished ({job.progress.status.value})")
        if guest.state is not GuestState.RUNNING:
            problems.append(f"guest left {guest.state.value} (channel: {channel.calls})")
        assert not problems, "; ".join(problems)

    asyncio.run(main())
