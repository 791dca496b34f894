"""Found by an adversarial review (fixed in Host.close): before, a daemon shutdown right after an incoming migration COMMITTED, while the destination hands the guest
its state (IncomingMigration._receive: commit record -> _staged() -> start_incoming(), each an await on
the guest agent). MigrationListener.close() cancels every connection's task, committed or not; _fail
sees `committed` and keeps the guest, but it is still `incoming` (start_incoming never set RUNNING),
and Daemon.shutdown's next step, Host.close(), discarded every `incoming` guest that is not in doubt:
the source has given the guest up (COMMIT), the only copy's RAM file and firmware context were
deleted. Invariant 5 (nothing lost). Interleaving forced with events."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest


from migd.dest import IncomingMigration
from migd.guest.host_guest import GuestDefinition
from migd.host import Host
from migd.journal import Journal
from migd.listener import MigrationListener, _Connection
from migd.platform import identity
from migd.platform.psp import PspFirmware
from migd.progress import MigrationProgress
from test_session import pair_after
from test_dest_discard_cancel import Proto


class Channel:
    """The prepared agent's channel: importing the state (loading memory, the self-check) takes a while."""

    connected = True
    last_check = None

    def __init__(self) -> None:
        self.importing = asyncio.Event()
        self.done = asyncio.Event()

    async def import_state(self, state: bytes, timeout: float | None = None, *, start: bool = True) -> None:
        self.importing.set()
        await self.done.wait()

    async def start_imported(self, timeout: float | None = None) -> None:
        self.importing.set()
        await self.done.wait()

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("where", ["staging", "starting"])
def test_shutdown_right_after_commit_keeps_the_only_copy(tmp_path: Path, where: str) -> None:
    for name in ("hostA", "hostB"):
        identity.init_host(tmp_path / name, tmp_path / "ca", common_name=name)
    anchors = [tmp_path / "ca" / identity.CA_CERT]
    a = PspFirmware.from_state_dir(tmp_path / "hostA", anchors)
    b = PspFirmware.from_state_dir(tmp_path / "hostB", anchors)
    journal = Journal.open(tmp_path / "hostB")
    host = Host(tmp_path / "hostB", b, runtime_dir=tmp_path / "run", guests_dir=tmp_path / "guests",
                journal=journal)
    definition = GuestDefinition("g1", 1, 0)
    nonce = os.urandom(32)
    start = a.send_start(a.launch(0), b.pdh_cert_pem, nonce)

    async def main() -> None:
        listener = MigrationListener(host)
        incoming = IncomingMigration(host, Proto(), "10.0.0.1:40000")  # type: ignore[arg-type]
        incoming.session = pair_after(11).dest  # COMMIT received and verified
        assert incoming.session.committed
        channel = Channel()
        staging_done = asyncio.Event()

        async def receive() -> None:  # _receive from COMMIT on (dest.py, after `marks.append(("commit_received"`)
            handle = b.receive_start(0, start.pdh_cert_pem, start.session_blob, nonce)
            incoming.progress = progress = MigrationProgress("g1", "destination", "hostB", definition.npages,
                                                             phase=incoming.session.status, id="m1")
            host.add_migration(progress)
            incoming.guest = guest = host.create_incoming(definition, handle)
            guest.channel = channel  # type: ignore[assignment]  # the agent prepare_incoming started
            if where == "staging":
                async def stage() -> None:  # the agent still loading its memory (a large guest)
                    await staging_done.wait()
                incoming._staging = asyncio.ensure_future(stage())
            incoming._vcpu_state = b"vcpu-state"
            host.incoming_committed(progress)
            await incoming._staged()
            await guest.start_incoming(incoming._vcpu_state)
            raise AssertionError("not reached in this test")

        incoming._receive = receive  # type: ignore[method-assign]
        task = asyncio.ensure_future(incoming.run())
        listener._connections[task] = _Connection("10.0.0.1:40000", 0.0, None, settled=True)  # type: ignore[index]
        task.add_done_callback(listener._served)
        for _ in range(20):
            await asyncio.sleep(0)
        if where == "starting":
            await asyncio.wait_for(channel.importing.wait(), 5)
        assert not task.done()
        await asyncio.wait_for(listener.close(), 5)  # Daemon.shutdown: the listener first ...
        await host.close()  # ... then the host
        problems = []
        if "g1" not in host.guests:
            problems.append("the committed guest's record was dropped")
        if not (host.guest_dir("g1") / "ram").exists():
            problems.append("the committed guest's RAM file was deleted (the source gave it up at COMMIT)")
        if not b.guest_handles():
            problems.append("its firmware context was decommissioned")
        assert journal.migrations()[-1].committed  # the commit record was durable
        assert not problems, "; ".join(problems)

    try:
        asyncio.run(main())
    finally:
        journal.close()
