"""A host's ``migrated`` records against what an operator, a returning guest and retention do
at the same time: nothing that may still be the only copy is pruned, and a departure that ends
late never removes a guest of that name that came back meanwhile."""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import Callable
from pathlib import Path

import pytest

from migd import dest
from migd.guest.host_guest import GuestDefinition, GuestState, HostGuest
from migd.host import Host
from migd.journal import Journal
from migd.platform.psp import PspFirmware


def _host(tmp_path: Path, make_firmware: Callable[..., PspFirmware]) -> Host:
    firmware = make_firmware("hostA")
    return Host(tmp_path / "hostA", firmware, runtime_dir=tmp_path / "run", journal=Journal.open(tmp_path / "hostA"))


def _left(host: Host, name: str, *, keep_ram: bool) -> HostGuest:
    """A guest that migrated away; ``keep_ram``: the destination never confirmed its start
    (source.py ``_after_commit_failure`` keeps the RAM: it may be the only copy)."""
    guest = host.create_guest(GuestDefinition(name, 1))
    guest.state = GuestState.MIGRATED
    if not keep_ram:
        guest._release_memory()
    host.journal_guest(guest)
    return guest


@pytest.mark.parametrize("keep_ram", [True, False], ids=["keeps-its-ram", "negative-control-released"])
def test_retention_never_prunes_a_record_that_keeps_its_ram(
    tmp_path: Path, make_firmware: Callable[..., PspFirmware], keep_ram: bool,
) -> None:
    host = _host(tmp_path, make_firmware)
    guest = _left(host, "g1", keep_ram=keep_ram)
    dropped = host.prune_migrated(time.monotonic() + 10**6, keep_s=0, keep_count=0)
    if keep_ram:
        assert dropped == [] and host.guests["g1"] is guest and guest.has_memory
        assert guest.guest_dir.exists() and guest.handle in host.firmware.guest_handles()
    else:
        assert dropped == ["g1"] and "g1" not in host.guests


@pytest.mark.parametrize("once", [True, False], ids=["release-once", "negative-control-release-twice"])
def test_a_late_departure_does_not_remove_the_guest_that_came_back(
    tmp_path: Path, make_firmware: Callable[..., PspFirmware], monkeypatch: pytest.MonkeyPatch, once: bool,
) -> None:
    """The operator deletes the record while its agent is still stopping; the guest comes back
    into the same directory; then the departure's teardown ends and releases its memory."""
    host = _host(tmp_path, make_firmware)

    async def main() -> HostGuest:
        old = host.create_guest(GuestDefinition("g1", 1))
        old.state = GuestState.MIGRATED  # source.py: on the verified STARTED, before mark_migrated
        real_teardown = old._teardown_agent
        calls = 0

        async def slow_teardown(timeout: float = 5.0) -> None:  # an agent that takes 0.5 s to exit
            nonlocal calls
            calls += 1
            if calls == 1:
                await asyncio.sleep(0.5)
            await real_teardown(timeout)

        monkeypatch.setattr(old, "_teardown_agent", slow_teardown)
        if not once:  # the former release: every call removes whatever the name's paths hold now
            original = HostGuest._release_memory

            def release_every_time(self: HostGuest) -> None:
                self._memory_released = False
                original(self)

            monkeypatch.setattr(old, "_release_memory", types.MethodType(release_every_time, old))
        departing = asyncio.create_task(old.mark_migrated())

        async def returning() -> HostGuest:  # dest.py: wait for the departure, then take the name
            await dest.IncomingMigration._departed(types.SimpleNamespace(host=host), "g1")  # type: ignore[arg-type]
            return host.create_incoming(GuestDefinition("g1", 1), host.firmware.launch(0))

        incoming = asyncio.create_task(returning())
        await asyncio.sleep(0.1)
        await host.delete("g1")  # allowed: the record says migrated
        new = await asyncio.wait_for(incoming, 15)
        await asyncio.wait_for(departing, 15)
        return new

    new = asyncio.run(main())
    assert host.guests["g1"] is new
    intact = new.guest_dir.exists() and (new.guest_dir / "ram").exists()
    assert intact is once, (new.guest_dir, intact)
