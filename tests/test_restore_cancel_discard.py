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
from migd.restore import GuestRestore, SavedFile
from discard_checks import SlowExitAgent, partial_guest_traces, two_firmwares


def test_a_second_cancel_during_the_restore_discard_leaves_no_partial_guest(tmp_path: Path) -> None:
    a, b = two_firmwares(tmp_path)
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
        problems += partial_guest_traces(host, b, "copy", handles_before)
        assert not problems, "; ".join(problems)

    asyncio.run(main())
