"""The vCPU in-process, against VmPlatform directly (no socket): steps, pause, state, the window."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from migd.abi import KVM_MIGRATION_READY
from migd.guest.channel_codec import Message
from migd.errors import MigdError
from migd.guest.guest_layout import LEDGER_SHARED
from migd.guest.guest_vcpu import GuestConfig, GuestVcpu, VcpuError
from migd.platform.memory import GuestRam, MemoryEncryption, new_vek
from migd.guest.selfcheck import check_memory, read_ledger
from migd.guest.vm import VmConfig, VmPlatform
from migd.guest.workload import WorkloadConfig

NPAGES = 1024


class LocalHost:
    """A HostLink straight into a VmPlatform; hypercalls can be held to keep one in flight."""

    def __init__(self, vm: VmPlatform) -> None:
        self.vm = vm
        self.events: list[dict[str, Any]] = []
        self.hold_hypercalls = False
        self.release = asyncio.Event()
        self.in_flight = 0
        self.hypercalls = 0

    async def request(self, op: str, **fields: Any) -> Message:
        msg: Message = {"t": "req", "id": 1, "op": op, **fields}
        if op == "report":
            self.events.append(fields)
            return {"t": "rsp", "id": 1, "ok": True}
        if op == "hypercall":
            self.in_flight += 1
            if self.hold_hypercalls:
                await self.release.wait()
            self.in_flight -= 1
            self.hypercalls += 1
        return self.vm.handle_guest_request(msg)

    def count(self, event: str) -> int:
        return sum(1 for e in self.events if e.get("event") == event)


def run(body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(10):
            await body()

    asyncio.run(bounded())


async def until(predicate: Callable[[], bool], what: str) -> None:
    for _ in range(5000):
        if predicate():
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f"timed out waiting for {what}")


def make(tmp_path: Path, name: str = "g", **config: Any) -> tuple[GuestVcpu, LocalHost, GuestRam, bytes]:
    vm = VmPlatform(VmConfig(name, NPAGES, efi=False, uefi_live_migration=None))
    host = LocalHost(vm)
    ram = GuestRam(tmp_path / f"{name}.ram", NPAGES, create=True)
    vek = new_vek()
    vcpu = GuestVcpu(GuestConfig(name, NPAGES, **config), ram, MemoryEncryption(vek), host)
    return vcpu, host, ram, vek


def shared_view(ram: GuestRam, vek: bytes, vcpu: GuestVcpu) -> np.ndarray:
    return (read_ledger(ram, MemoryEncryption(vek), vcpu.layout) & np.uint32(LEDGER_SHARED)) != 0


def bitmap_array(vm: VmPlatform) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(vm.shared_bitmap.to_bytes(), dtype=np.uint8), bitorder="little")
    return bits[:NPAGES] == 1


def test_first_boot_in_process(tmp_path: Path) -> None:
    async def body() -> None:
        vcpu, host, ram, vek = make(tmp_path)
        task = asyncio.create_task(vcpu.run())
        await until(lambda: host.count("booted") == 1, "boot")
        assert host.vm.migration_ready and vcpu.msr == KVM_MIGRATION_READY
        await vcpu.handle("pause", {})
        assert np.array_equal(bitmap_array(host.vm), shared_view(ram, vek, vcpu))
        report = await vcpu.handle("check", {})
        assert report == {"pages_verified": NPAGES, "errors": 0, "first_error": None}
        task.cancel()
        ram.close()

    run(body)


def test_pause_waits_for_the_step_in_flight(tmp_path: Path) -> None:
    """A conversion blocked in its hypercall: pause is acknowledged only once the step completed."""

    async def body() -> None:
        vcpu, host, ram, vek = make(tmp_path, workload=WorkloadConfig(0, 1000, 3))
        task = asyncio.create_task(vcpu.run())
        await until(lambda: host.count("booted") == 1, "boot")
        host.hold_hypercalls = True
        await until(lambda: host.in_flight == 1, "a conversion in its hypercall")
        pause = asyncio.create_task(vcpu.handle("pause", {}))
        await asyncio.sleep(0.05)
        assert not pause.done()  # a hypercall is in flight: no ack
        dirty = await vcpu.handle("fetch_dirty", {})  # still served meanwhile
        assert isinstance(dirty["bitmap"], bytes)
        before_release = ram.read(0, NPAGES)
        host.release.set()
        assert await pause == {"paused": True}
        assert host.in_flight == 0
        # The step finished: the pages were written with their new routing after the hypercall.
        assert ram.read(0, NPAGES) != before_release
        assert np.array_equal(bitmap_array(host.vm), shared_view(ram, vek, vcpu))
        calls, frozen = host.hypercalls, ram.read(0, NPAGES)
        await asyncio.sleep(0.05)
        assert host.hypercalls == calls and ram.read(0, NPAGES) == frozen
        assert check_memory(ram, vek).errors == 0
        task.cancel()
        ram.close()

    run(body)


def test_state_moves_to_an_incoming_vcpu(tmp_path: Path) -> None:
    async def body() -> None:
        src, src_host, src_ram, vek = make(tmp_path, "src", workload=WorkloadConfig(16, 200, 8))
        src_task = asyncio.create_task(src.run())
        await until(lambda: src_host.count("booted") == 1, "boot")
        await asyncio.sleep(0.1)
        with pytest.raises(VcpuError, match="paused"):
            src.export_state()
        await src.handle("pause", {})
        state = (await src.handle("export_state", {}))["state"]
        assert len(state) < 4096
        # Same key on both sides: a raw copy of RAM stands for a perfect migration here.
        dst_vm = VmPlatform(VmConfig("dst", NPAGES, efi=False, uefi_live_migration=None))
        dst_vm.shared_bitmap.update(src_host.vm.shared_bitmap)
        dst_host = LocalHost(dst_vm)
        dst_ram = GuestRam(tmp_path / "dst.ram", NPAGES, create=True)
        dst_ram.write(0, src_ram.view(0, NPAGES))
        dst = GuestVcpu(GuestConfig("dst", NPAGES, incoming=True), dst_ram, MemoryEncryption(vek), dst_host)
        dst_task = asyncio.create_task(dst.run())
        with pytest.raises(MigdError, match="not running"):
            await dst.handle("kexec", {})
        await dst.handle("import_state", {"state": state})
        assert dst.workload is not None and src.workload is not None
        assert dst.workload.state() == src.workload.state()  # same RNG position, same counters
        with pytest.raises(VcpuError, match="once"):
            dst.import_state(state)
        await until(lambda: any(e.get("kind") == "check" for e in dst_host.events), "incoming check")
        check = next(e for e in dst_host.events if e.get("kind") == "check")
        assert check["errors"] == 0 and check["pages_verified"] == NPAGES
        assert dst_vm.migration_ready  # MSR restored with the vCPU state
        await asyncio.sleep(0.1)
        assert dst.workload.steps > src.workload.steps  # and it runs on
        with pytest.raises(VcpuError, match="only for an incoming guest"):
            src.import_state(state)
        for task in (src_task, dst_task):
            task.cancel()
        src_ram.close()
        dst_ram.close()

    run(body)


def test_a_staged_state_runs_only_on_start(tmp_path: Path) -> None:
    """import_state(start=False) loads everything but runs nothing; "start" runs it (the
    destination stages before COMMIT and starts after it)."""

    async def body() -> None:
        src, src_host, src_ram, vek = make(tmp_path, "src", workload=WorkloadConfig(16, 200, 8))
        src_task = asyncio.create_task(src.run())
        await until(lambda: src_host.count("booted") == 1, "boot")
        await asyncio.sleep(0.1)
        await src.handle("pause", {})
        state = (await src.handle("export_state", {}))["state"]
        dst_vm = VmPlatform(VmConfig("dst", NPAGES, efi=False, uefi_live_migration=None))
        dst_vm.shared_bitmap.update(src_host.vm.shared_bitmap)
        dst_host = LocalHost(dst_vm)
        dst_ram = GuestRam(tmp_path / "dst.ram", NPAGES, create=True)
        dst_ram.write(0, src_ram.view(0, NPAGES))
        dst = GuestVcpu(GuestConfig("dst", NPAGES, incoming=True), dst_ram, MemoryEncryption(vek), dst_host)
        dst_task = asyncio.create_task(dst.run())
        with pytest.raises(VcpuError, match="start needs"):
            await dst.handle("start", {})  # nothing staged yet
        await dst.handle("import_state", {"state": state, "start": False})
        with pytest.raises(VcpuError, match="once"):
            dst.import_state(state)  # staging is the one import
        await asyncio.sleep(0.1)
        assert not dst.running and dst.workload is None and dst_host.events == []  # loaded, not running
        assert not dst_vm.migration_ready
        await dst.handle("start", {})
        await until(lambda: any(e.get("kind") == "check" for e in dst_host.events), "incoming check")
        check = next(e for e in dst_host.events if e.get("kind") == "check")
        assert check["errors"] == 0 and check["pages_verified"] == NPAGES
        assert dst_vm.migration_ready and dst.running
        assert dst.workload is not None and src.workload is not None
        with pytest.raises(VcpuError, match="start needs"):
            dst.start_imported()  # once
        with pytest.raises(VcpuError, match="start needs"):
            src.start_imported()  # not an incoming guest
        for task in (src_task, dst_task):
            task.cancel()
        src_ram.close()
        dst_ram.close()

    run(body)


def test_a_bad_state_is_refused_when_staged_too(tmp_path: Path) -> None:
    async def body() -> None:
        vcpu, _, ram, _ = make(tmp_path, incoming=True)
        with pytest.raises(VcpuError, match="bad vCPU state"):
            vcpu.import_state(b"\x00garbage", start=False)
        with pytest.raises(VcpuError, match="start needs"):
            vcpu.start_imported()  # the failed staging left nothing to start
        ram.close()

    run(body)


def test_import_rejects_a_bad_state(tmp_path: Path) -> None:
    async def body() -> None:
        vcpu, _, ram, _ = make(tmp_path, incoming=True)
        for blob in (b"\x00garbage", b"\x81\xa6format\x02"):
            with pytest.raises(VcpuError, match="bad vCPU state"):
                vcpu.import_state(blob)
        ram.close()

    run(body)


@pytest.mark.parametrize("unsafe", [True, False])
def test_kexec_window_bitmap_is_stale_and_msr_tells(tmp_path: Path, unsafe: bool) -> None:
    async def body() -> None:
        vcpu, host, ram, vek = make(tmp_path, workload=WorkloadConfig(0, 1000, 5), unsafe_kexec_keep_msr=unsafe)
        task = asyncio.create_task(vcpu.run())
        await until(lambda: host.count("booted") == 1, "boot")
        await until(lambda: host.vm.shared_bitmap.count() > 40, "shared data pages")
        await vcpu.handle("kexec", {"hold_in_window": True})
        await until(lambda: host.count("kexec-window") == 1, "the kexec window")
        assert not vcpu.running
        stale = shared_view(ram, vek, vcpu) != bitmap_array(host.vm)
        assert stale.any()  # reused pages: private to the guest, shared to the host
        assert host.vm.migration_ready is unsafe  # only the safe guest told the host
        await vcpu.handle("resume", {})
        await until(lambda: host.count("booted") == 2, "boot after kexec")
        await vcpu.handle("pause", {})
        assert np.array_equal(bitmap_array(host.vm), shared_view(ram, vek, vcpu))
        assert check_memory(ram, vek).errors == 0
        task.cancel()
        ram.close()

    run(body)


def test_shutdown_halts_and_a_paused_guest_runs_no_code(tmp_path: Path) -> None:
    async def body() -> None:
        vcpu, host, ram, _ = make(tmp_path)
        task = asyncio.create_task(vcpu.run())
        await until(lambda: host.count("booted") == 1, "boot")
        await vcpu.handle("shutdown", {})
        assert vcpu.halted.is_set() and not host.vm.migration_ready and host.count("shutdown") == 1
        await asyncio.wait_for(task, 1)  # run() returns once halted
        ram.close()

        paused, phost, pram, _ = make(tmp_path, "p")
        ptask = asyncio.create_task(paused.run())
        await until(lambda: phost.count("booted") == 1, "boot")
        await paused.handle("pause", {})
        await paused.handle("shutdown", {})
        assert phost.vm.migration_ready and phost.count("shutdown") == 0  # no guest code ran
        await asyncio.wait_for(ptask, 1)  # and its run() is over
        pram.close()

    run(body)


def test_ram_size_must_match(tmp_path: Path) -> None:
    ram = GuestRam(tmp_path / "r", NPAGES, create=True)
    try:
        with pytest.raises(VcpuError, match="pages"):
            GuestVcpu(GuestConfig("g", NPAGES * 2), ram, MemoryEncryption(new_vek()), LocalHost(
                VmPlatform(VmConfig("g", NPAGES, efi=False, uefi_live_migration=None))))
    finally:
        ram.close()


def test_a_second_cold_boot_on_the_same_ram_starts_clean(tmp_path: Path) -> None:
    """stop + start reuses the RAM file: power-on zeroes it, so the new ledger is truthful."""

    async def body() -> None:
        vcpu, host, ram, vek = make(tmp_path, workload=WorkloadConfig(32, 100, 1))
        task = asyncio.create_task(vcpu.run())
        await until(lambda: host.count("booted") == 1, "boot")
        await asyncio.sleep(0.1)
        await vcpu.handle("shutdown", {})
        await asyncio.wait_for(task, 1)
        written = int(ram.nonzero_pages(0, NPAGES).sum())
        assert written > 100
        again = GuestVcpu(GuestConfig("g", NPAGES), ram, MemoryEncryption(vek), LocalHost(host.vm))
        task = asyncio.create_task(again.run())
        await until(lambda: again.booted, "second boot")
        await again.handle("pause", {})
        assert check_memory(ram, vek).errors == 0
        assert int(ram.nonzero_pages(0, NPAGES).sum()) < written
        task.cancel()
        ram.close()

    run(body)
