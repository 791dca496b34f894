"""Test hosts: a Host with its own firmware identity under a shared owner CA."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from migd.platform import identity
from migd.guest.host_guest import GuestDefinition, HostGuest
from migd.host import Host
from migd.platform.psp import PspFirmware
from migd.sev_transport import TransportMode
from migd.guest.workload import WorkloadConfig


def make_host(root: Path, name: str, mode: TransportMode = TransportMode.BOUND) -> Host:
    """A host under ``root/name`` trusting ``root/ca``; sockets in a short runtime dir."""
    state = root / name
    identity.init_host(state, root / "ca", common_name=name)
    firmware = PspFirmware.from_state_dir(state, [root / "ca" / identity.CA_CERT], transport_mode=mode)
    runtime = Path(tempfile.mkdtemp(prefix=f"migd-{name}-"))  # unix socket paths must stay short
    return Host(state, firmware, runtime_dir=runtime)


async def running_guest(
    host: Host, name: str = "g1", memory_mib: int = 32, workload: WorkloadConfig | None = None,
    **definition: object,
) -> HostGuest:
    """Create and boot a guest; waits until its migration-control MSR is READY."""
    guest = host.create_guest(GuestDefinition(name, memory_mib, **definition))  # type: ignore[arg-type]
    await guest.start(workload or WorkloadConfig(dirty_rate_mib_s=4, convert_rate_hz=5, seed=7))
    async with asyncio.timeout(20):
        while not guest.vm.migration_ready:
            await asyncio.sleep(0.02)
    return guest


async def wait_populated(guest: HostGuest, fraction: float = 1.0, timeout: float = 20.0) -> None:
    """Wait until ``fraction`` of the guest's pages hold data (a workload with ``populate_fraction``
    writes its data area once right after boot); TimeoutError past ``timeout`` seconds."""
    npages = guest.definition.npages
    async with asyncio.timeout(timeout):
        while int(guest.ram.populated_pages(0, npages).sum()) < fraction * npages:
            await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def closing(*hosts: Host) -> AsyncIterator[None]:
    """Stop every guest agent of the hosts at the end, whatever happened."""
    try:
        yield
    finally:
        for host in hosts:
            for guest in list(host.guests.values()):
                with contextlib.suppress(Exception):
                    await guest.destroy()
            # make_host's runtime dir lives outside the test's tmp_path: remove it here.
            shutil.rmtree(host.runtime_dir, ignore_errors=True)
