"""Found by an adversarial review, fixed with FileJob._rolling_back: before, a second cancel (REST cancel again, or daemon shutdown) arriving while a cancelled restore discarded its
partial guest (host.discard -> destroy -> waiting for the agent to exit) interrupted the discard: the
guest was already out of host.guests, but its RAM directory and its RECEIVE firmware context stayed, and
the job never finished. Interleaving forced with events."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from migd.guest.host_guest import GuestDefinition
from migd.host import Host
from migd.platform import identity
from migd.platform.psp import PspFirmware
from migd.restore import GuestRestore, SavedFile
from slow_exit_agent import SlowExitAgent


def test_a_second_cancel_during_the_restore_discard_leaves_no_partial_guest(tmp_path: Path) -> None:
    anchors = []
    for name in ("hostA", "hostB"):
        identity.init_host(tmp_path / name, tmp_path / "ca", common_name=name)
    anchors = [tmp_path / "ca" / identity.CA_CERT]
    a = PspFirmware.from_state_dir(tmp_path / "hostA", anchors)
    b = PspFirmware.from_state_dir(tmp_path / "hostB", anchors)
    host = Host(tmp_path / "hostB", b, runtime_dir=tmp_path / "run", guests_dir=tmp_path / "guests")
    (tmp_path / "run").mkdir(exist_ok=True)
    file = tmp_path / "g.save"
    file.write_bytes(b"x")
    info = os.stat(file)
    saved = SavedFile(file, None, None, None, b"", b"", (info.st_dev, info.st_ino))  # type: ignore[arg-type]
    definition = GuestDefinition("copy", 1, 0)
    nonce = os.urandom(32)
    start = a.send_start(a.launch(0), b.pdh_cert_pem, nonce)
    handles_before = b.guest_handles()

    async def main() -> None:
        job = GuestRestore(host, saved, definition)
        agent, placing = SlowExitAgent(), asyncio.Event()

        async def restore() -> None:  # as _restore while it places pages
            job._handle = b.receive_start(0, start.pdh_cert_pem, start.session_blob, nonce)
            job.guest = guest = host.create_incoming(definition, job._handle)
            guest.agent = agent  # type: ignore[assignment]  # prepare_incoming's agent
            job.session.begin(0.0)
            placing.set()
            await asyncio.Event().wait()

        job._restore = restore  # type: ignore[method-assign]
        task = job.start()
        await asyncio.wait_for(placing.wait(), 5)
        assert job.cancel()  # REST cancel: _discard starts
        await asyncio.wait_for(agent.exiting.wait(), 5)  # host.discard waits for the agent to exit
        assert job.cancel(), "cancel() refused: the window is not reachable"  # again, or daemon shutdown
        agent.exited.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
        problems = []
        if not job.session.finished:
            problems.append(f"the restore never finished ({job.progress.status.value})")
        if "copy" in host.guests:
            problems.append("the partial guest is still registered")
        if host.guest_dir("copy").exists():
            problems.append("the partial guest's RAM directory was left behind")
        if b.guest_handles() != handles_before:
            problems.append(f"the RECEIVE context was left open (handles {b.guest_handles()})")
        assert not problems, "; ".join(problems)

    asyncio.run(main())
