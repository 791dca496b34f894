"""Engine tests with source and destination engines in one event loop (modes, TLS, refusals)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from migd.platform import identity
from migd.abi import FirmwareStatus, GuestPolicy
from migd.guest.channel import CheckReport
from migd.errors import FirmwareError
from migd.guest.host_guest import GuestDefinition, GuestState, HostGuest
from migd.host import Host
from migd.listener import MigrationListener
from migd.migration_state import MigrationStatus
from migd.platform.pki_verify import tls_client_context, tls_server_context
from migd.progress import MigrationProgress
from migd.sev_transport import TransportMode
from migd.source import MigrationParams, MigrationRefused, OutgoingMigration

from .hosts import closing, make_host, running_guest


def test_running_guest_migrates(tmp_path: Path) -> None:
    async def main() -> None:
        a, b = make_host(tmp_path, "hostA"), make_host(tmp_path, "hostB")
        listener = MigrationListener(b)
        port = await listener.start("127.0.0.1", 0)
        async with closing(a, b):
            guest = await running_guest(a)
            migration = OutgoingMigration(guest, "127.0.0.1", port)
            progress = await asyncio.wait_for(migration.run(), 60)
            assert progress.status is MigrationStatus.COMPLETED, progress.phase.error
            assert guest.state is GuestState.MIGRATED
            arrived = b.get("g1")
            assert arrived.state is GuestState.RUNNING
            check = await arrived.wait_check(60)
            assert check.errors == 0, check
            assert check.pages_verified == arrived.definition.npages
            (incoming,) = b.migrations.values()
            assert incoming.shared_bitmap_sha256 == progress.shared_bitmap_sha256
            await listener.close()

    asyncio.run(main())


def _migrate(tmp_path: Path, *, mode: TransportMode = TransportMode.BOUND, policy: int = 0, tls: bool = False,
             client_ca: str = "ca", client_cert: bool = True) -> tuple[MigrationProgress, CheckReport | None, str | None]:
    async def main() -> tuple[MigrationProgress, CheckReport | None, str | None]:
        a, b = make_host(tmp_path, "hostA", mode), make_host(tmp_path, "hostB", mode)
        server_ctx = client_ctx = None
        if tls:
            b_dir, a_dir = tmp_path / "hostB", tmp_path / client_ca / "hostA"
            if client_ca != "ca":  # a client whose TLS certificate comes from another CA
                identity.init_host(a_dir, tmp_path / client_ca, common_name="hostA")
            else:
                a_dir = tmp_path / "hostA"
            server_ctx = tls_server_context(tmp_path / "ca" / "ca.pem", b_dir / "host.pem", b_dir / "host.key")
            client_ctx = tls_client_context(tmp_path / "ca" / "ca.pem", a_dir / "host.pem", a_dir / "host.key")
            if not client_cert:  # trusts the destination, presents nothing
                client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
                client_ctx.load_verify_locations(tmp_path / "ca" / "ca.pem")
        listener = MigrationListener(b, ssl_context=server_ctx)
        port = await listener.start("127.0.0.1", 0)
        async with closing(a, b):
            guest = await running_guest(a, policy=policy)
            progress = await asyncio.wait_for(
                OutgoingMigration(guest, "localhost" if tls else "127.0.0.1", port, ssl_context=client_ctx).run(), 60
            )
            check = None
            if progress.status is MigrationStatus.COMPLETED:
                check = await b.get("g1").wait_check(60)
            else:
                assert guest.state is GuestState.RUNNING and (await guest.check()).errors == 0
                assert b.guests == {} and list((tmp_path / "hostB" / "guests").iterdir()) == []
            await listener.close()
            return progress, check, progress.phase.error

    return asyncio.run(main())


def test_sev_es_guest_sends_its_vcpu_state_as_vmsa(tmp_path: Path) -> None:
    progress, check, error = _migrate(tmp_path, policy=int(GuestPolicy.ES))
    assert progress.status is MigrationStatus.COMPLETED, error
    assert check is not None and check.errors == 0


def test_sev_compat_transport_migrates(tmp_path: Path) -> None:
    progress, check, error = _migrate(tmp_path, mode=TransportMode.SEV_COMPAT)
    assert progress.status is MigrationStatus.COMPLETED, error
    assert check is not None and check.errors == 0


def test_mutual_tls_stream(tmp_path: Path) -> None:
    progress, check, error = _migrate(tmp_path, tls=True)
    assert progress.status is MigrationStatus.COMPLETED, error
    assert check is not None and check.errors == 0


@pytest.mark.fault_class("access control: TLS client certificate")
def test_mutual_tls_refuses_a_client_from_another_ca(tmp_path: Path) -> None:
    progress, _, error = _migrate(tmp_path, tls=True, client_ca="rogue-ca")
    assert progress.status is MigrationStatus.FAILED
    assert "mutual TLS" in (error or "")


@pytest.mark.fault_class("access control: TLS client certificate")
def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path: Path) -> None:
    progress, _, error = _migrate(tmp_path, tls=True, client_cert=False)
    assert progress.status is MigrationStatus.FAILED
    assert "mutual TLS" in (error or ""), error


@pytest.mark.fault_class("access control: NOSEND policy")
def test_a_nosend_guest_is_refused_with_the_reason(tmp_path: Path) -> None:
    """The engine refuses before it connects; the firmware refuses too, should that check be bypassed."""

    async def main() -> None:
        a, b = make_host(tmp_path, "hostA"), make_host(tmp_path, "hostB")
        listener = MigrationListener(b)
        port = await listener.start("127.0.0.1", 0)
        async with closing(a, b):
            guest = await running_guest(a, policy=int(GuestPolicy.NOSEND))
            with pytest.raises(MigrationRefused, match="NOSEND"):
                OutgoingMigration(guest, "127.0.0.1", port).start()
            with pytest.raises(FirmwareError, match="NOSEND") as refused:
                guest.firmware.send_start(guest.handle, b.firmware.pdh_cert_pem)
            assert refused.value.status is FirmwareStatus.POLICY_FAILURE
            assert guest.state is GuestState.RUNNING and (await guest.check()).errors == 0
            assert b.guests == {} and b.migrations == {}
            # Control: the same hosts migrate a guest without NOSEND.
            other = await running_guest(a, "g2")
            progress = await asyncio.wait_for(OutgoingMigration(other, "127.0.0.1", port).run(), 60)
            assert progress.status is MigrationStatus.COMPLETED, progress.phase.error
        await listener.close()

    asyncio.run(main())


@pytest.mark.fault_class("access control: transport mode mismatch")
def test_transport_mode_mismatch_is_refused(tmp_path: Path) -> None:
    async def main() -> str | None:
        a, b = make_host(tmp_path, "hostA"), make_host(tmp_path, "hostB", TransportMode.SEV_COMPAT)
        listener = MigrationListener(b)
        port = await listener.start("127.0.0.1", 0)
        async with closing(a, b):
            guest = await running_guest(a)
            progress = await OutgoingMigration(guest, "127.0.0.1", port).run()
            assert progress.status is MigrationStatus.FAILED
            assert guest.state is GuestState.RUNNING
            await listener.close()
            return progress.phase.error

    assert "transport mode" in (asyncio.run(main()) or "")


@pytest.mark.fault_class("access control: guest name taken")
def test_destination_refuses_an_existing_guest_name(tmp_path: Path) -> None:
    async def main() -> None:
        a, b = make_host(tmp_path, "hostA"), make_host(tmp_path, "hostB")
        b.create_guest(GuestDefinition("g1", 16))  # the name is taken there
        listener = MigrationListener(b)
        port = await listener.start("127.0.0.1", 0)
        async with closing(a, b):
            guest = await running_guest(a)
            progress = await OutgoingMigration(guest, "127.0.0.1", port).run()
            assert progress.status is MigrationStatus.FAILED
            assert "already exists on the destination" in (progress.phase.error or "")
            assert guest.state is GuestState.RUNNING and (await guest.check()).errors == 0
            assert b.get("g1").state is GuestState.DEFINED  # untouched
            await listener.close()

    asyncio.run(main())


def test_lost_commit_is_resolved_with_the_source_and_the_guest_runs_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT is lost after PREPARED: the destination asks the source's listener (RESOLVE)
    whether the migration committed, learns it did, and starts the guest — exactly one copy."""
    from migd import dest as dest_module

    monkeypatch.setattr(dest_module, "IncomingMigration",
                        functools.partial(dest_module.IncomingMigration, start_timeout_s=3.0, resolve_timeout_s=20.0))

    async def main() -> None:
        async with _commit_dropped(tmp_path, source_listener=True) as (b, guest):
            assert guest.state is GuestState.MIGRATED
            async with asyncio.timeout(30):
                while "g1" not in b.guests or b.get("g1").state is not GuestState.RUNNING:
                    await asyncio.sleep(0.05)
            check = await b.get("g1").wait_check(60)
            assert check.errors == 0 and check.pages_verified == guest.definition.npages
            # The source never resumed it: its copy stays paused (kept for the operator).
            before = dict(guest.vm.hypercall_counts)
            await asyncio.sleep(0.5)
            assert guest.state is GuestState.MIGRATED and guest.vm.hypercall_counts == before

    asyncio.run(main())


@contextlib.asynccontextmanager
async def _commit_dropped(
    tmp_path: Path, resolve_port: int = 0, *, source_listener: bool = False
) -> AsyncIterator[tuple[Host, HostGuest]]:
    """A migration that commits on the source while the proxy drops the COMMIT frame.

    ``source_listener``: the source host listens too and the destination is told its port, so
    the destination can RESOLVE the outcome (else it gets ``resolve_port``). Yields the
    destination host and the source's guest once the source is done; the listeners close and
    every guest agent stops afterwards.
    """
    from faultproxy import DropFrame, FaultProxy, FrameSelector

    from migd.wire import FrameType

    a, b = make_host(tmp_path, "hostA"), make_host(tmp_path, "hostB")
    listeners = [MigrationListener(b)]
    port = await listeners[0].start("127.0.0.1", 0)
    if source_listener:
        listeners.append(MigrationListener(a))
        resolve_port = await listeners[1].start("127.0.0.1", 0)
    try:
        async with closing(a, b), FaultProxy(
            "127.0.0.1", port, [DropFrame(FrameSelector.of(FrameType.COMMIT))]
        ) as proxy:
            guest = await running_guest(a)
            migration = OutgoingMigration(guest, "127.0.0.1", proxy.port, MigrationParams(handoff_timeout_s=2.0),
                                          resolve_port=resolve_port,
                                          on_established=lambda p, key: a.remember_handoff_key(p.id, key))
            a.add_migration(migration.progress)  # what the daemon does: the listener answers from it
            progress = await migration.run()
            assert proxy.fired("drop") and progress.phase.committed  # the fault really happened
            yield b, guest
    finally:
        for listener in listeners:
            await listener.close()


def test_lost_commit_without_a_resolve_address_discards_the_prepared_guest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: with no RESOLVE address the destination cannot learn the outcome."""
    from migd import dest as dest_module

    monkeypatch.setattr(dest_module, "IncomingMigration",
                        functools.partial(dest_module.IncomingMigration, start_timeout_s=3.0))

    async def main() -> None:
        async with _commit_dropped(tmp_path) as (b, guest):
            async with asyncio.timeout(30):
                while b.guests:
                    await asyncio.sleep(0.05)
            assert guest.state is GuestState.MIGRATED  # the source kept its paused copy

    asyncio.run(main())


def test_an_unreachable_source_leaves_the_prepared_guest_in_doubt_through_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """COMMIT is lost and the source's listener never answers: the destination cannot know
    whether the source committed, so its copy may be the only one. It stays prepared (journal
    status stop-copy, not failed) and survives the daemon's shutdown, for the next start to ask.
    Before the fix the migration was marked failed and Host.close deleted the guest."""
    import socket

    from migd import dest as dest_module
    from migd.guest.host_guest import INCOMING_MARKER

    monkeypatch.setattr(dest_module, "IncomingMigration",
                        functools.partial(dest_module.IncomingMigration, start_timeout_s=2.0, resolve_timeout_s=1.5))
    with socket.socket() as s:  # a port nobody listens on: the source's listener is "down"
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]

    async def main() -> None:
        async with _commit_dropped(tmp_path, resolve_port=dead_port) as (b, guest):
            (incoming,) = b.migrations.values()
            async with asyncio.timeout(30):
                while "in doubt" not in (incoming.phase.error or ""):
                    await asyncio.sleep(0.05)
            assert incoming.status is MigrationStatus.STOP_COPY and not incoming.phase.committed
            assert b.get("g1").state is GuestState.INCOMING and b.prepared_in_doubt("g1")
            handle = b.get("g1").handle
            await b.close()  # the daemon's shutdown
            guest_dir = tmp_path / "hostB" / "guests" / "g1"
            assert (guest_dir / INCOMING_MARKER).exists() and any(guest_dir.iterdir())
            assert handle in b.firmware.guest_handles()
            assert guest.state is GuestState.MIGRATED  # and the source keeps its paused copy

    asyncio.run(main())
