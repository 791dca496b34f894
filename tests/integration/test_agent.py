"""The guest agent as a real process, against the real host side (GuestChannel + VmPlatform).

Every test starts ``python -m migd.guest.agent`` through :func:`migd.guest.agent_launcher.launch_agent`
with a VEK from an emulated PSP, and kills it in a ``finally``. Guests are 16 MiB.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import guest_copy
from migd.abi import (
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
    KVM_MAP_GPA_RANGE_PAGE_SZ_MASK,
    KVM_MIGRATION_READY,
    PAGE_SHIFT,
    PAGE_SIZE,
)
from migd.guest.agent_launcher import AgentProcess, AgentSpec, launch_agent
from migd.bitmap import PageBitmap
from migd.guest.channel import GuestChannel, GuestChannelError
from migd.guest.guest_layout import LEDGER_SHARED, LEDGER_VERSION_MASK, GuestLayout
from migd.platform.memory import GuestRam, MemoryEncryption
from migd.guest.page_content import pages_equal
from migd.platform.psp import PspFirmware
from migd.guest.selfcheck import check_memory, read_ledger
from migd.guest.vm import VmConfig, VmPlatform
from migd.guest.workload import WorkloadConfig

NPAGES = 4096  # 16 MiB
LAYOUT = GuestLayout.build(NPAGES)
TEST_TIMEOUT = 20.0
EVENT_TIMEOUT = 10.0

pytestmark = pytest.mark.timeout(60)


def run(coro_fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run one test body on a fresh event loop, bounded."""

    async def bounded() -> None:
        async with asyncio.timeout(TEST_TIMEOUT):
            await coro_fn()

    asyncio.run(bounded())


@dataclass
class Host:
    """One emulated host: a PSP and a short directory for unix sockets."""

    fw: PspFirmware
    sock_dir: Path
    tmp: Path


@dataclass
class Guest:
    """A running guest: host-side platform + channel, its RAM, its agent process."""

    name: str
    vm: VmPlatform
    channel: GuestChannel
    ram: GuestRam
    proc: AgentProcess
    handle: int
    vek: bytes
    log_path: Path
    trace: list[tuple[Any, ...]] = field(default_factory=list)

    def agent_log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # pytest's tmp_path can exceed the 107-byte sun_path limit: sockets get a short directory.
    path = Path(tempfile.mkdtemp(prefix="migd-ag-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def host_a(make_firmware: Callable[..., PspFirmware], sock_dir: Path, tmp_path: Path) -> Host:
    return Host(make_firmware("hostA"), sock_dir, tmp_path)


@pytest.fixture
def host_b(make_firmware: Callable[..., PspFirmware], sock_dir: Path, tmp_path: Path) -> Host:
    return Host(make_firmware("hostB"), sock_dir, tmp_path)


def instrument(vm: VmPlatform, trace: list[tuple[Any, ...]]) -> None:
    """Record every MAP_GPA_RANGE (pfn, npages, attrs, ret) and MSR change, in order."""
    original = vm.map_gpa_range

    def traced(gpa: int, npages: int, attrs: int, *, cpl: int = 0) -> int:
        ret = original(gpa, npages, attrs, cpl=cpl)
        trace.append(("map", gpa >> PAGE_SHIFT, npages, attrs, ret))
        return ret

    vm.map_gpa_range = traced  # type: ignore[method-assign]
    vm.on_migration_control_change = lambda old, new: trace.append(("msr", old, new))


@contextlib.asynccontextmanager
async def started_guest(
    host: Host,
    *,
    name: str = "g1",
    efi: bool = False,
    uefi: bool | None = None,
    migration_control: bool = True,
    workload: WorkloadConfig | None = None,
    unsafe: bool = False,
    incoming: bool = False,
    ram: GuestRam | None = None,
    handle: int | None = None,
) -> AsyncIterator[Guest]:
    """Host side up, agent launched and connected; everything torn down afterwards."""
    config = VmConfig(name, NPAGES, efi=efi, uefi_live_migration=uefi, cpuid_migration_control=migration_control)
    vm = VmPlatform(config)
    trace: list[tuple[Any, ...]] = []
    instrument(vm, trace)
    channel = GuestChannel(vm, host.sock_dir / f"{name}-{id(vm):x}.sock")
    await channel.start()
    own_ram = ram is None
    if ram is None:
        ram = GuestRam(host.tmp / f"{name}-{id(vm):x}.ram", NPAGES, create=True)
    if handle is None:
        handle = host.fw.launch(0)
    vek = host.fw.guest_key(handle)
    log_path = host.tmp / f"{name}-{id(vm):x}.log"
    spec = AgentSpec(name, channel.path, ram.path, NPAGES, efi=efi, incoming=incoming,
                     workload=workload or WorkloadConfig(), unsafe_kexec_keep_msr=unsafe)
    with open(log_path, "wb") as log_file:
        proc = launch_agent(spec, vek, stderr=log_file)
    guest = Guest(name, vm, channel, ram, proc, handle, vek, log_path, trace)
    try:
        await channel.wait_connected(EVENT_TIMEOUT)
        yield guest
    except BaseException:
        print(f"--- agent log {name} ---\n{guest.agent_log()}")
        raise
    finally:
        proc.kill()
        proc.wait(5)
        await channel.close()
        if own_ram:
            ram.close()


def bitmap_array(bitmap: PageBitmap) -> np.ndarray:
    """One bool per page."""
    return np.unpackbits(np.frombuffer(bitmap.to_bytes(), dtype=np.uint8), bitorder="little")[: bitmap.npages] == 1


def ledger_shared(ram: GuestRam, vek: bytes) -> np.ndarray:
    """The guest's own view (True = shared) of every page, as stored in its RAM."""
    return (read_ledger(ram, MemoryEncryption(vek), LAYOUT) & np.uint32(LEDGER_SHARED)) != 0


def covered(trace: list[tuple[Any, ...]], encrypted: bool) -> np.ndarray:
    """Pages some traced successful MAP_GPA_RANGE of that kind covered."""
    mask = np.zeros(NPAGES, dtype=bool)
    for entry in trace:
        if entry[0] == "map" and entry[4] == 0 and bool(entry[3] & KVM_MAP_GPA_RANGE_ENCRYPTED) == encrypted:
            mask[entry[1] : entry[1] + entry[2]] = True
    return mask


def msr_changes(trace: list[tuple[Any, ...]]) -> list[tuple[int, int]]:
    return [(e[1], e[2]) for e in trace if e[0] == "msr"]


def firmware_mask() -> np.ndarray:
    return LAYOUT.firmware_mask()


def boot_shared_mask() -> np.ndarray:
    mask = firmware_mask()
    mask[LAYOUT.decrypted.pfn : LAYOUT.decrypted.end] = True
    return mask


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------- boot and negotiation


def test_boot_without_efi_resets_bitmap_then_writes_ready(host_a: Host) -> None:
    async def body() -> None:
        async with started_guest(host_a) as g:
            booted = await g.channel.wait_event("booted", EVENT_TIMEOUT, since=0)
            assert booted["msr"] == KVM_MIGRATION_READY
            assert g.vm.migration_ready
            assert msr_changes(g.trace) == [(0, KVM_MIGRATION_READY)]
            # Early boot: every e820 RAM page reset to private, firmware ranges never touched.
            reset = covered(g.trace, encrypted=True)
            assert np.array_equal(reset, ~firmware_mask())
            # The 2M hint on the aligned middle of the big RAM range, 4K elsewhere.
            hints = {e[3] & KVM_MAP_GPA_RANGE_PAGE_SZ_MASK for e in g.trace
                     if e[0] == "map" and e[3] & KVM_MAP_GPA_RANGE_ENCRYPTED}
            assert KVM_MAP_GPA_RANGE_PAGE_SZ_2M in hints
            # Order: firmware ranges shared, reset, decrypted section shared, then READY.
            kinds = [("enc" if e[3] & KVM_MAP_GPA_RANGE_ENCRYPTED else "dec") if e[0] == "map" else "msr"
                     for e in g.trace]
            assert kinds[0] == "dec" and kinds[-2:] == ["dec", "msr"]
            assert set(kinds[1:-2]) == {"enc"}
            assert np.array_equal(bitmap_array(g.vm.shared_bitmap), boot_shared_mask())
            assert g.vm.bad_requests == 0 and g.vm.gp_faults == 0

    run(body)


@pytest.mark.parametrize(("uefi", "ready"), [(True, True), (False, False), (None, False)],
                         ids=["var-true", "var-false", "var-absent"])
def test_efi_boot_writes_ready_only_if_variable_true(host_a: Host, uefi: bool | None, ready: bool) -> None:
    async def body() -> None:
        async with started_guest(host_a, efi=True, uefi=uefi) as g:
            booted = await g.channel.wait_event("booted", EVENT_TIMEOUT, since=0)
            assert booted["efi"] is True
            assert booted["msr"] == (KVM_MIGRATION_READY if ready else 0)
            if ready:
                assert g.vm.migration_ready
            else:
                # Bounded wait: READY never comes, and a correct copier refuses to start.
                with pytest.raises(TimeoutError):
                    await guest_copy.wait_ready(g.vm, 0.5)
                assert msr_changes(g.trace) == []
            # The bitmap reset happens either way (it is not gated on the UEFI variable).
            assert np.array_equal(bitmap_array(g.vm.shared_bitmap), boot_shared_mask())

    run(body)


def test_without_migration_control_feature_the_msr_is_never_written(host_a: Host) -> None:
    async def body() -> None:
        async with started_guest(host_a, migration_control=False) as g:
            booted = await g.channel.wait_event("booted", EVENT_TIMEOUT, since=0)
            assert booted["msr"] == 0
            assert g.vm.gp_faults == 0  # no wrmsr (it would #GP) and no rdmsr
            # Linux hooks the page-state hypercall only with the feature: none was issued.
            assert sum(g.vm.hypercall_counts.values()) == 0
            assert not g.vm.migration_ready

    run(body)


def test_reboot_clears_msr_then_resets_bitmap_before_ready(host_a: Host) -> None:
    async def body() -> None:
        workload = WorkloadConfig(dirty_rate_mib_s=4, convert_rate_hz=200, seed=3)
        async with started_guest(host_a, workload=workload) as g:
            await g.channel.wait_event("booted", EVENT_TIMEOUT, since=0)
            await wait_for(lambda: g.vm.shared_bitmap.count() > int(boot_shared_mask().sum()), 5,
                           "the workload to share data pages")
            fw_before = bytes(g.ram.view(LAYOUT.firmware_shared[0].gpa, LAYOUT.firmware_shared[0].npages))
            g.trace.clear()
            booted = g.channel.event_count("booted")
            await g.channel.reboot()
            again = await g.channel.wait_event("booted", EVENT_TIMEOUT, since=booted)
            assert again["msr"] == KVM_MIGRATION_READY
            changes = msr_changes(g.trace)
            assert changes == [(KVM_MIGRATION_READY, 0), (0, KVM_MIGRATION_READY)]
            ready_at = g.trace.index(("msr", 0, KVM_MIGRATION_READY))
            before_ready = g.trace[:ready_at]
            assert np.array_equal(covered(before_ready, encrypted=True), ~firmware_mask())
            assert g.channel.event_count("reboot") == 1
            # Firmware ranges survive a reboot, content and state.
            assert bytes(g.ram.view(LAYOUT.firmware_shared[0].gpa, LAYOUT.firmware_shared[0].npages)) == fw_before
            await g.channel.pause()
            assert np.array_equal(bitmap_array(g.vm.shared_bitmap), ledger_shared(g.ram, g.vek))
            report = await g.channel.check()
            assert report.errors == 0 and report.pages_verified == NPAGES

    run(body)


def test_kexec_keeps_firmware_ranges_and_bitmap_honest(host_a: Host) -> None:
    async def body() -> None:
        workload = WorkloadConfig(dirty_rate_mib_s=4, convert_rate_hz=200, seed=5)
        async with started_guest(host_a, workload=workload) as g:
            await g.channel.wait_event("booted", EVENT_TIMEOUT, since=0)
            await wait_for(lambda: g.vm.shared_bitmap.count() > int(boot_shared_mask().sum()), 5,
                           "the workload to share data pages")
            fw = LAYOUT.firmware_shared[0]
            fw_before = bytes(g.ram.view(fw.gpa, fw.npages))
            g.trace.clear()
            booted = g.channel.event_count("booted")
            await g.channel.kexec()
            await g.channel.wait_event("booted", EVENT_TIMEOUT, since=booted)
            await g.channel.pause()
            # The offline path cleared the MSR before the new kernel ran; READY again after.
            assert msr_changes(g.trace)[:2] == [(KVM_MIGRATION_READY, 0), (0, KVM_MIGRATION_READY)]
            reset = covered(g.trace, encrypted=True)
            assert not reset[firmware_mask()].any(), "the early-boot reset touched a firmware range"
            assert bytes(g.ram.view(fw.gpa, fw.npages)) == fw_before
            assert g.vm.shared_bitmap.all_set(fw.pfn, fw.npages)
            # The host bitmap agrees with the guest's own view of every page.
            assert np.array_equal(bitmap_array(g.vm.shared_bitmap), ledger_shared(g.ram, g.vek))
            report = await g.channel.check()
            assert report.errors == 0, report.first_error

    run(body)


# ---------------------------------------------------------------------- pause, dirty log, state


def test_pause_freezes_memory_and_export_needs_pause(host_a: Host) -> None:
    async def body() -> None:
        async with started_guest(host_a, workload=WorkloadConfig(8, 100, 9)) as g:
            await g.channel.wait_event("booted", EVENT_TIMEOUT, since=0)
            with pytest.raises(GuestChannelError, match="paused"):
                await g.channel.export_state()
            await g.channel.pause()
            frozen = g.ram.read(0, NPAGES)
            await asyncio.sleep(0.3)
            assert g.ram.read(0, NPAGES) == frozen
            state = await g.channel.export_state()
            assert 0 < len(state) < 16384
            await g.channel.resume()
            await asyncio.sleep(0.3)
            assert g.ram.read(0, NPAGES) != frozen  # control: a running guest does write

    run(body)


@pytest.mark.parametrize(("rate", "hz", "seed", "interval"), [(16, 300, 1, 0.005), (48, 50, 2, 0.03)])
def test_dirty_log_misses_no_write(host_a: Host, rate: float, hz: float, seed: int, interval: float) -> None:
    """Copy what fetch_dirty reports, round after round, while the guest runs: nothing is lost."""

    async def body() -> None:
        async with started_guest(host_a, workload=WorkloadConfig(rate, hz, seed)) as g:
            loop = asyncio.get_running_loop()
            ram = np.frombuffer(g.ram.view(0, NPAGES), dtype=np.uint8).reshape(NPAGES, PAGE_SIZE)
            shadow = np.zeros_like(ram)
            # Negative control: the same copy, skipping one fetched page (the boot-parameter
            # page, written exactly once, so no later round can repair the omission).
            skipping = np.zeros_like(ram)
            rounds = 0

            def copy(dirty: PageBitmap) -> None:
                starts, counts = dirty.extent_arrays(True)
                for first, count in zip(starts.tolist(), counts.tolist()):
                    shadow[first : first + count] = ram[first : first + count]
                    skipping[first : first + count] = ram[first : first + count]
                    if first == 0:
                        skipping[0] = 0

            deadline = loop.time() + 1.5
            while loop.time() < deadline or g.channel.event_count("booted") == 0:
                copy(await g.channel.fetch_dirty())
                rounds += 1
                await asyncio.sleep(interval)
            await g.channel.pause()
            copy(await g.channel.fetch_dirty())
            assert rounds > 10
            same = pages_equal(shadow, ram)
            assert same.all(), f"pages lost by the dirty log: {np.flatnonzero(~same)[:10]}"
            assert np.flatnonzero(~pages_equal(skipping, ram)).tolist() == [0]
            del ram

    run(body)


def test_sigterm_runs_offline_path_but_sigkill_does_not(host_a: Host) -> None:
    async def body() -> None:
        async with started_guest(host_a, name="term") as g:
            await g.channel.wait_event("booted", EVENT_TIMEOUT, since=0)
            assert g.vm.migration_ready
            g.proc.terminate()
            assert await g.proc.wait_async(5) == 0
            assert g.vm.msr_migration_control == 0
            assert g.channel.event_count("crash") == 1
        async with started_guest(host_a, name="kill") as g:
            await g.channel.wait_event("booted", EVENT_TIMEOUT, since=0)
            g.proc.kill()
            await g.proc.wait_async(5)
            assert g.vm.msr_migration_control == KVM_MIGRATION_READY  # control: no guest code ran

    run(body)


def test_shutdown_clears_msr_and_exits(host_a: Host) -> None:
    async def body() -> None:
        async with started_guest(host_a) as g:
            await g.channel.wait_event("booted", EVENT_TIMEOUT, since=0)
            await g.channel.shutdown()
            assert await g.proc.wait_async(5) == 0
            assert g.vm.msr_migration_control == 0
            assert g.channel.event_count("shutdown") == 1

    run(body)


def test_vek_never_on_command_line_or_environment(host_a: Host) -> None:
    async def body() -> None:
        async with started_guest(host_a) as g:
            await g.channel.wait_event("booted", EVENT_TIMEOUT, since=0)
            cmdline = Path(f"/proc/{g.proc.pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{g.proc.pid}/environ").read_bytes()
            for blob in (cmdline, environ):
                assert g.vek not in blob and g.vek.hex().encode() not in blob
            assert b"--key-fd" in cmdline
            # The pipe was read to EOF and closed: the agent holds no extra fd onto it.
            fds = os.listdir(f"/proc/{g.proc.pid}/fd")
            assert all("pipe:" not in os.readlink(f"/proc/{g.proc.pid}/fd/{fd}") or int(fd) <= 2 for fd in fds)

    run(body)


# ---------------------------------------------------------------------- the seed race, reproduced


async def _share_some_data_pages(g: Guest) -> None:
    await g.channel.wait_event("booted", EVENT_TIMEOUT, since=0)
    await wait_for(lambda: g.vm.shared_bitmap.count() > int(boot_shared_mask().sum()) + 16, 5,
                   "the workload to share data pages")


def test_unsafe_kexec_race_corrupts_the_destination(host_a: Host, host_b: Host) -> None:
    """--unsafe-kexec-keep-msr: READY stays up while the new kernel reuses shared pages as private."""

    async def body() -> None:
        workload = WorkloadConfig(dirty_rate_mib_s=2, convert_rate_hz=300, seed=21)
        async with started_guest(host_a, workload=workload, unsafe=True) as g:
            await _share_some_data_pages(g)
            windows = g.channel.event_count("kexec-window")
            await g.channel.kexec(hold_in_window=True)
            await g.channel.wait_event("kexec-window", EVENT_TIMEOUT, since=windows)
            assert g.vm.migration_ready  # the bug: the MSR never dropped
            dst_ram = GuestRam(host_b.tmp / "dst.ram", NPAGES, create=True)
            with dst_ram:
                result = await guest_copy.copy_guest(g.vm, g.channel, host_a.fw, g.handle, g.ram,
                                                     host_b.fw, dst_ram, ready_timeout=1)
                assert result.waited_s < 0.5  # nothing stopped the copier
                # The source itself is intact: the corruption is the migration's doing.
                assert check_memory(g.ram, g.vek).errors == 0
                dst_vek = host_b.fw.guest_key(result.dest_handle)
                check = check_memory(dst_ram, dst_vek)
                # Exactly the pages the guest views private but the stale bitmap called shared.
                stale = ledger_shared(dst_ram, dst_vek) != bitmap_array(g.vm.shared_bitmap)
                assert check.errors == int(stale.sum()) > 0
                assert check.by_kind == {"corrupted": check.errors}
                assert check.first_error is not None and "corrupted" in check.first_error

    run(body)


def test_safe_kexec_blocks_the_copier_until_ready(host_a: Host, host_b: Host) -> None:
    async def body() -> None:
        workload = WorkloadConfig(dirty_rate_mib_s=2, convert_rate_hz=300, seed=21)
        async with started_guest(host_a, workload=workload) as g:
            await _share_some_data_pages(g)
            windows = g.channel.event_count("kexec-window")
            await g.channel.kexec(hold_in_window=True)
            await g.channel.wait_event("kexec-window", EVENT_TIMEOUT, since=windows)
            assert not g.vm.migration_ready  # MSR 0 was written before the kexec
            # In the window the bitmap is as stale as in the unsafe case ...
            stale_now = ledger_shared(g.ram, g.vek) != bitmap_array(g.vm.shared_bitmap)
            assert stale_now.any()
            dst_ram = GuestRam(host_b.tmp / "dst.ram", NPAGES, create=True)
            with dst_ram:
                copier = asyncio.create_task(guest_copy.copy_guest(
                    g.vm, g.channel, host_a.fw, g.handle, g.ram, host_b.fw, dst_ram, ready_timeout=10))
                await asyncio.sleep(0.3)
                assert not copier.done()  # ... but the copier waits for READY
                await g.channel.resume()
                result = await copier
                assert result.waited_s >= 0.3
                dst_vek = host_b.fw.guest_key(result.dest_handle)
                check = check_memory(dst_ram, dst_vek)
                assert check.errors == 0, check.first_error
                assert check.pages_verified == NPAGES
                assert np.array_equal(ledger_shared(dst_ram, dst_vek), bitmap_array(g.vm.shared_bitmap))

    run(body)


# ---------------------------------------------------------------------- resume on a destination


def test_incoming_guest_checks_itself_then_runs_on(host_a: Host, host_b: Host) -> None:
    async def body() -> None:
        workload = WorkloadConfig(dirty_rate_mib_s=8, convert_rate_hz=100, seed=77)
        async with started_guest(host_a, workload=workload) as src:
            await _share_some_data_pages(src)
            dst_ram = GuestRam(host_b.tmp / "dst.ram", NPAGES, create=True)
            with dst_ram:
                result = await guest_copy.copy_guest(src.vm, src.channel, host_a.fw, src.handle, src.ram,
                                                     host_b.fw, dst_ram)
                state = await src.channel.export_state()
                # Negative control on a copy: one tampered page is caught by the incoming check.
                async with started_guest(host_b, name="dst", incoming=True, ram=dst_ram,
                                         handle=result.dest_handle) as dst:
                    dst.vm.shared_bitmap.update(src.vm.shared_bitmap)  # the bitmap migrates too
                    await dst.channel.import_state(state)
                    report = await dst.channel.wait_event("check", EVENT_TIMEOUT, since=0)
                    assert report["errors"] == 0, report["first_error"]
                    assert report["pages_verified"] == NPAGES
                    await wait_for(lambda: dst.vm.migration_ready, 5, "the restored MSR")
                    await asyncio.sleep(0.3)
                    dirty = await dst.channel.fetch_dirty()
                    assert dirty.count() > 0  # the workload runs on
                    await dst.channel.pause()
                    after = await dst.channel.check()
                    assert after.errors == 0, after.first_error
                    assert np.array_equal(bitmap_array(dst.vm.shared_bitmap), ledger_shared(dst_ram, dst.vek))

    run(body)


def test_incoming_check_reports_a_tampered_page(host_a: Host, host_b: Host) -> None:
    async def body() -> None:
        async with started_guest(host_a, workload=WorkloadConfig(8, 0, 4)) as src:
            await src.channel.wait_event("booted", EVENT_TIMEOUT, since=0)
            await asyncio.sleep(0.2)
            dst_ram = GuestRam(host_b.tmp / "dst.ram", NPAGES, create=True)
            with dst_ram:
                result = await guest_copy.copy_guest(src.vm, src.channel, host_a.fw, src.handle, src.ram,
                                                     host_b.fw, dst_ram)
                state = await src.channel.export_state()
                versions = read_ledger(src.ram, MemoryEncryption(src.vek), LAYOUT) & np.uint32(LEDGER_VERSION_MASK)
                written = np.flatnonzero((versions > 0) & LAYOUT.data_mask())
                victim = int(written[len(written) // 2])
                view = dst_ram.view(victim << PAGE_SHIFT, 1)
                view[100] ^= 0x01
                del view
                async with started_guest(host_b, name="dst", incoming=True, ram=dst_ram,
                                         handle=result.dest_handle) as dst:
                    await dst.channel.import_state(state)
                    report = await dst.channel.wait_event("check", EVENT_TIMEOUT, since=0)
                    assert report["errors"] == 1
                    assert report["first_error"].startswith(f"gpa {victim << PAGE_SHIFT:#x}: corrupted")

    run(body)
