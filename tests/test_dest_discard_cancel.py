"""Found by an adversarial review (fixed with dest._uninterrupted): before, a daemon shutdown (MigrationListener.close() -> task.cancel()) while an incoming migration that
failed (the source's ABORT) was discarding its partial guest: host.discard -> destroy -> waiting for
the agent to exit. The cancel interrupted the discard: the guest was already out of host.guests (so
Host.close() in Daemon.shutdown did not find it either), its RAM directory, its RECEIVE context and
its RAM reservation stayed, and the migration never finished. Interleaving forced with events."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path


from migd.dest import IncomingMigration
from migd.errors import PeerAborted
from migd.guest.host_guest import GuestDefinition
from migd.host import Host
from migd.listener import MigrationListener, _Connection
from migd.progress import MigrationProgress
from session_pair import established
from discard_checks import SlowExitAgent, partial_guest_traces, two_firmwares


class Proto:
    """What IncomingMigration.run()/_fail need of the first connection (authenticated, open)."""

    peer_abort = None
    close_reason = None
    last_activity = 0.0
    local = "hostB"

    def __init__(self) -> None:
        self.authenticated = asyncio.Event()
        self.authenticated.set()
        self.written: list[str] = []

    def write(self, msg: object) -> None:
        self.written.append(type(msg).__name__)

    def close(self) -> None:
        pass

    def drop_pages(self) -> None:
        pass  # no page frame comes here


def test_shutdown_during_the_discard_of_a_failed_incoming_guest_leaves_nothing(tmp_path: Path) -> None:
    a, b = two_firmwares(tmp_path)
    host = Host(tmp_path / "hostB", b, runtime_dir=tmp_path / "run", guests_dir=tmp_path / "guests")
    definition = GuestDefinition("g", 1, 0)
    nonce = os.urandom(32)
    start = a.send_start(a.launch(0), b.pdh_cert_pem, nonce)
    handles_before = b.guest_handles()

    async def main() -> None:
        listener = MigrationListener(host)
        incoming = IncomingMigration(host, Proto(), "10.0.0.1:40000")  # type: ignore[arg-type]
        agent = SlowExitAgent()

        async def receive() -> None:  # as _receive once authenticated, pages streaming in
            incoming._handle = b.receive_start(0, start.pdh_cert_pem, start.session_blob, nonce)
            established(dest=incoming.session)
            incoming.progress = MigrationProgress("g", "destination", "hostB", definition.npages,
                                                  phase=incoming.session.status, id="m-1")
            host.add_migration(incoming.progress)
            incoming.guest = guest = host.create_incoming(definition, incoming._handle)
            guest.agent = agent  # type: ignore[assignment]  # prepare_incoming's agent
            raise PeerAborted("cancelled by the operator")  # the source's ABORT

        incoming._receive = receive  # type: ignore[method-assign]
        task = asyncio.ensure_future(incoming.run())
        listener._connections[task] = _Connection("10.0.0.1:40000", 0.0, None, settled=True)  # type: ignore[index]
        task.add_done_callback(listener._served)
        await asyncio.wait_for(agent.exiting.wait(), 5)  # _fail -> host.discard waits for the agent to exit
        closing = asyncio.ensure_future(listener.close())  # daemon shutdown: cancels the connection's task
        await asyncio.sleep(0)
        agent.exited.set()
        await asyncio.wait_for(closing, 5)
        await host.close()  # the rest of Daemon.shutdown
        problems = []
        if not incoming.session.finished:
            problems.append(f"the migration never finished ({incoming.progress.status.value})")
        problems += partial_guest_traces(host, b, "g", handles_before)
        if host.ram_account.reservations:
            problems.append(f"its RAM reservation was never released ({host.ram_account.reservations})")
        assert not problems, "; ".join(problems)

    asyncio.run(main())
