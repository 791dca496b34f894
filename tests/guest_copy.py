"""Test helper: copy a guest's memory to a second host "as the shared-page bitmap says".

Two PspFirmware instances stand for two hosts. Shared pages are copied raw; private pages go
through the SEV transport (source SEND_UPDATE_DATA → destination RECEIVE_UPDATE_DATA, re-encrypted
from the source VEK to the destination VEK). Like a correct host, the copier refuses to copy
while the migration-control MSR is not READY and waits (bounded) for it — so whether the
result is right depends only on whether the guest kept its bitmap honest while it said READY.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from migd.abi import PAGE_SIZE
from migd.guest.channel import GuestChannel
from migd.platform.memory import GuestRam
from migd.platform.psp import PspFirmware
from migd.guest.vm import VmPlatform

RUN_PAGES = 256  # pages per SEND/RECEIVE_UPDATE_DATA command


@dataclass(frozen=True)
class CopyResult:
    """What the copy did: the destination guest handle and how pages were routed."""

    dest_handle: int
    shared_pages: int
    private_pages: int
    waited_s: float


async def wait_ready(vm: VmPlatform, timeout: float) -> float:
    """Wait (bounded) until the guest's MSR says READY; returns seconds waited, TimeoutError if never."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not vm.migration_ready:
        if loop.time() - start > timeout:
            raise TimeoutError(f"migration-control MSR not READY within {timeout:g} s")
        await asyncio.sleep(0.01)
    return loop.time() - start


def copy_pages(
    vm: VmPlatform,
    src_fw: PspFirmware,
    src_handle: int,
    src_ram: GuestRam,
    dst_fw: PspFirmware,
    dst_ram: GuestRam,
) -> tuple[int, int, int]:
    """Copy every page per the bitmap now (caller guarantees READY and a paused guest)."""
    if not vm.migration_ready:
        raise RuntimeError("refusing to copy: the migration-control MSR is not READY")
    policy = src_fw.guest_policy(src_handle)
    start = src_fw.send_start(src_handle, dst_fw.pdh_cert_pem)
    dst_handle = dst_fw.receive_start(policy, start.pdh_cert_pem, start.session_blob)
    shared_total = private_total = 0
    for shared in (True, False):
        for extent in vm.shared_bitmap.extents(shared):
            for first in range(extent.first, extent.end, RUN_PAGES):
                count = min(RUN_PAGES, extent.end - first)
                gpa = first * PAGE_SIZE
                if shared:
                    dst_ram.write(gpa, src_ram.view(gpa, count))
                    shared_total += count
                else:
                    header, ciphertext = src_fw.send_update_data(src_handle, src_ram, gpa, count)
                    dst_fw.receive_update_data(dst_handle, dst_ram, gpa, count, header, ciphertext)
                    private_total += count
    src_fw.send_finish(src_handle)
    dst_fw.receive_finish(dst_handle)
    return dst_handle, shared_total, private_total


async def copy_guest(
    vm: VmPlatform,
    channel: GuestChannel | None,
    src_fw: PspFirmware,
    src_handle: int,
    src_ram: GuestRam,
    dst_fw: PspFirmware,
    dst_ram: GuestRam,
    *,
    ready_timeout: float = 10.0,
) -> CopyResult:
    """Wait for READY, pause the guest (if a channel is given), copy as the bitmap says.

    If the MSR drops between the wait and the pause ack, the guest is resumed and the wait
    starts over (a correct host never copies on a stale bitmap).
    """
    waited = 0.0
    while True:
        waited += await wait_ready(vm, ready_timeout)
        if channel is not None:
            await channel.pause()
        if vm.migration_ready:
            break
        if channel is not None:
            await channel.resume()
    dst_handle, shared_pages, private_pages = copy_pages(vm, src_fw, src_handle, src_ram, dst_fw, dst_ram)
    return CopyResult(dst_handle, shared_pages, private_pages, waited)
