"""The guest agent (``migd agent`` / ``python -m migd.agent``): the in-guest side of an SEV guest.

One process per running guest. It maps the guest's RAM file, holds the guest's VEK (read from
an inherited pipe fd, standing for the CPU key slot — never argv or the environment), connects
to the host's hypercall channel (/work/notes/channel-spec.md) and runs one vCPU:

* **boot**, as Linux ``kvm_init_platform`` + ``setup_efi_kvm_sev_migration`` and OVMF do
  (DESIGN.md §3): the firmware makes its ranges shared on first boot; the kernel's early boot
  sends ``MAP_GPA_RANGE(ENCRYPTED)`` for every e820 RAM range (not the firmware ranges), marks
  its decrypted section shared, then writes ``MSR_KVM_MIGRATION_CONTROL = READY`` — directly
  when not EFI-booted, only if ``SevLiveMigrationEnabled`` is present and true when EFI-booted.
  As in Linux and OVMF, page-state hypercalls and the MSR are used only when CPUID advertises
  ``KVM_FEATURE_MIGRATION_CONTROL``;
* the **offline path** (kexec, reboot, shutdown, SIGTERM, crash; Linux ``kvm_guest_cpu_offline``)
  writes the MSR back to 0 first. ``--unsafe-kexec-keep-msr`` skips that on kexec to reproduce
  the seed's race: the new kernel reuses the pages the old one had shared as private *before*
  its early-boot reset, while the host still says READY and its bitmap still says shared;
* the **workload** (:mod:`migd.workload`) and the **self-check** (:mod:`migd.selfcheck`).

Everything the vCPU does happens in *steps* (one boot stage, one write run, one conversion,
one self-check) under one lock; a ``pause`` is acknowledged only between steps, so no step is
half-done and no hypercall is in flight, and nothing runs until ``resume``. ``fetch_dirty`` is
answered between event-loop callbacks, never between a dirty mark and its write.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import enum
import itertools
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack

from migd.abi import (
    KVM_CPUID_FEATURES,
    KVM_FEATURE_MIGRATION_CONTROL,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_DECRYPTED,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
    KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
    KVM_MIGRATION_READY,
    MSR_KVM_MIGRATION_CONTROL,
    PAGE_SHIFT,
    UEFI_SEV_LIVE_MIGRATION_GUID,
    UEFI_SEV_LIVE_MIGRATION_VAR,
)
from migd.bitmap import PageBitmap
from migd.channel_codec import (
    RESPONSE,
    ChannelCodec,
    ChannelProtocolError,
    Message,
    get_bool,
    get_bytes,
    get_int,
    request,
    response_error,
    response_ok,
)
from migd.errors import ConfigError, MigdError, ProtocolError
from migd.guest_layout import PFN_2M, GpaRange, GuestLayout
from migd.memory import VEK_SIZE, GuestRam, MemoryEncryption
from migd.selfcheck import CheckResult, iter_check
from migd.workload import GuestMemory, Workload, WorkloadConfig

log = logging.getLogger("migd.agent")  # not __name__: "__main__" under python -m

STATE_FORMAT: Final = 1
REQUEST_TIMEOUT: Final = 10.0
OFFLINE_TIMEOUT: Final = 3.0  # bound on the SIGTERM offline path (the host may be gone)
MAX_SLEEP: Final = 1.0  # longest sleep between two steps (a throttled or slow workload)
KVM_SIGNATURE: Final = b"KVMKVMKVM\0\0\0"
_READ_SIZE: Final = 1 << 20


class AgentError(MigdError):
    """The agent cannot go on (host refused hello, request timed out, channel lost)."""


class BootStep(enum.Enum):
    """One stage of a boot; each is one vCPU step (a pause may come between any two)."""

    PROBE = "probe"  # CPUID 0x40000000 / 0x40000001
    FIRMWARE = "firmware"  # first boot: boot params + ledger, firmware ranges made shared and filled
    FIRMWARE_REBOOT = "firmware-reboot"  # reboot: firmware announces its (surviving) ranges again
    REUSE_SHARED = "reuse-shared"  # new kernel uses pages the old one had shared, as private
    KEXEC_WINDOW = "kexec-window"  # test hook: hold right there, before the reset
    EARLY_RESET = "early-reset"  # MAP_GPA_RANGE(ENCRYPTED) over every e820 RAM range
    DECRYPTED_SECTION = "decrypted-section"  # __bss_decrypted: view shared, MAP_GPA_RANGE, use
    NEGOTIATE = "negotiate"  # MSR READY (not EFI) / UEFI variable then READY (EFI)


FIRST_BOOT: Final = (BootStep.PROBE, BootStep.FIRMWARE, BootStep.EARLY_RESET, BootStep.DECRYPTED_SECTION,
                     BootStep.NEGOTIATE)
REBOOT: Final = (BootStep.PROBE, BootStep.FIRMWARE_REBOOT, BootStep.REUSE_SHARED, BootStep.EARLY_RESET,
                 BootStep.DECRYPTED_SECTION, BootStep.NEGOTIATE)
KEXEC: Final = (BootStep.REUSE_SHARED, BootStep.PROBE, BootStep.EARLY_RESET, BootStep.DECRYPTED_SECTION,
                BootStep.NEGOTIATE)


class Offline(enum.Enum):
    """Why the vCPU goes offline (Linux ``kvm_guest_cpu_offline`` callers)."""

    KEXEC = "kexec"
    REBOOT = "reboot"
    SHUTDOWN = "shutdown"
    CRASH = "crash"


@dataclass(frozen=True)
class AgentOptions:
    """Everything ``migd agent`` takes on its command line."""

    name: str
    socket_path: Path
    ram_path: Path
    npages: int
    key_fd: int
    efi: bool = False
    incoming: bool = False
    firmware_shared: tuple[tuple[int, int], ...] | None = None
    workload: WorkloadConfig = WorkloadConfig()
    unsafe_kexec_keep_msr: bool = False


def early_reset_calls(layout: GuestLayout) -> list[tuple[int, int, int]]:
    """(gpa, npages, attrs) of the early-boot reset: every e820 RAM range made private.

    Big ranges per hypercall; the 2M-aligned middle of a range carries the 2M size hint and the
    unaligned head and tail the 4K hint (the hint is advisory: KVM requires only 4K alignment).
    """
    calls: list[tuple[int, int, int]] = []
    for rng in layout.ram_ranges():
        head_end = min(rng.end, -(-rng.pfn // PFN_2M) * PFN_2M)
        body_end = max(head_end, (rng.end // PFN_2M) * PFN_2M)
        for first, end, hint in (
            (rng.pfn, head_end, KVM_MAP_GPA_RANGE_PAGE_SZ_4K),
            (head_end, body_end, KVM_MAP_GPA_RANGE_PAGE_SZ_2M),
            (body_end, rng.end, KVM_MAP_GPA_RANGE_PAGE_SZ_4K),
        ):
            if end > first:
                calls.append((first << PAGE_SHIFT, end - first, KVM_MAP_GPA_RANGE_ENCRYPTED | hint))
    return calls


class GuestAgent:
    """One guest's vCPU, memory and channel client (see module docstring)."""

    def __init__(self, options: AgentOptions, vek: bytes) -> None:
        self.options = options
        self.engine = MemoryEncryption(vek)
        self.ram = GuestRam(options.ram_path, options.npages)
        self.layout = GuestLayout.build(options.npages, options.firmware_shared)
        self.dirty_log = PageBitmap(options.npages)
        self.memory: GuestMemory | None = None
        self.workload: Workload | None = None
        self.features: int | None = None
        self.msr = 0
        self.booted = False
        self.boot_queue: collections.deque[BootStep] = collections.deque()
        self.controls: collections.deque[tuple[Offline, bool]] = collections.deque()
        self.hypercall_errors = 0
        self.exit_code = 0
        self._paused = False  # host "pause"
        self._held = False  # kexec-window hold (the guest paused itself)
        self._halted = False  # after shutdown/crash: the vCPU never runs again
        self._throttle = 0
        self._shutdown_requested = False
        self._expected_digest: bytes | None = None
        self._imported = not options.incoming
        self._running = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._done = asyncio.Event()
        self._step_lock = asyncio.Lock()
        self._codec = ChannelCodec()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._halt_waiters: list[asyncio.Future[None]] = []

    # ------------------------------------------------------------------ process lifetime

    async def run(self) -> int:
        """Connect, say hello, boot (or wait for the imported state), run until told to stop."""
        loop = asyncio.get_running_loop()
        reader, self._writer = await asyncio.open_unix_connection(os.fspath(self.options.socket_path))
        reader_task = asyncio.create_task(self._read_loop(reader), name="channel-reader")
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_signal, signum)
        vcpu_task: asyncio.Task[None] | None = None
        try:
            rsp = await self._request("hello", name=self.options.name, npages=self.options.npages,
                                      pid=os.getpid(), incoming=self.options.incoming)
            if not rsp["ok"]:
                raise AgentError(f"host refused hello: {rsp['error']}")
            log.info("agent connected name=%s npages=%d incoming=%s", self.options.name, self.options.npages,
                     self.options.incoming)
            if not self.options.incoming:
                self.boot_queue.extend(FIRST_BOOT)
            self._update_running()
            vcpu_task = asyncio.create_task(self._vcpu(), name="vcpu")
            vcpu_task.add_done_callback(self._vcpu_done)
            await self._done.wait()
        finally:
            for task in (vcpu_task, reader_task, *self._tasks):
                if task is not None and not task.done():
                    task.cancel()
            for task in (vcpu_task, reader_task, *self._tasks):
                if task is not None:
                    # Teardown only: failures were already logged by the done callbacks.
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if self._writer is not None:
                self._writer.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await self._writer.wait_closed()
            self.ram.close()
        return self.exit_code

    def _finish(self, code: int) -> None:
        if not self._done.is_set():
            self.exit_code = code
            self._done.set()

    def _vcpu_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("vcpu crashed: %s", exc, exc_info=exc)
            self._spawn(self._crash_offline(), "crash")

    async def _crash_offline(self) -> None:
        """The vCPU died: best-effort offline path (MSR 0, report), bounded, then exit 1."""
        with contextlib.suppress(MigdError, TimeoutError, OSError, ConnectionError):
            async with asyncio.timeout(OFFLINE_TIMEOUT):
                if self._migration_control and not self._paused:
                    await self._wrmsr(0)
                await self._report_event("crash", msr=self.msr)
        self._finish(1)

    def _on_signal(self, signum: int) -> None:
        log.info("signal %s: going offline", signal.Signals(signum).name)
        self._spawn(self._signal_offline(), "signal")

    async def _signal_offline(self) -> None:
        """SIGTERM/SIGINT: run the offline path at the next step boundary (bounded), then exit 0.

        A paused (or held, or not yet imported) vCPU runs no guest code: the process just ends.
        """
        if self._running.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OFFLINE_TIMEOUT):
                    await self._queue_control(Offline.CRASH, False)
        self._finish(0)

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed: %s", task.get_name(), task.exception(), exc_info=task.exception())
            self._finish(1)

    # ------------------------------------------------------------------ channel client

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(_READ_SIZE)
                if not data:
                    log.info("channel closed by the host")
                    break
                for msg in self._codec.feed(data):
                    if msg["t"] == RESPONSE:
                        future = self._pending.pop(msg["id"], None)
                        if future is not None and not future.done():
                            future.set_result(msg)
                    else:
                        self._spawn(self._serve(msg), f"op-{msg['op']}")
        except ProtocolError as exc:
            log.error("channel protocol error: %s", exc)
        except (OSError, ConnectionError) as exc:
            log.error("channel read failed: %s", exc)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(AgentError("channel to the host lost"))
        self._pending.clear()
        self._finish(self.exit_code)

    def _send(self, msg: Message) -> None:
        if self._writer is None or self._writer.is_closing():
            raise AgentError("channel to the host is closed")
        self._writer.write(self._codec.encode(msg))

    async def _request(self, op: str, **fields: Any) -> Message:
        msg_id = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        try:
            self._send(request(msg_id, op, **fields))
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await future
        except TimeoutError as exc:
            raise AgentError(f"no answer to {op!r} within {REQUEST_TIMEOUT:g} s") from exc
        finally:
            self._pending.pop(msg_id, None)

    async def _checked(self, op: str, **fields: Any) -> Message:
        rsp = await self._request(op, **fields)
        if not rsp["ok"]:
            raise AgentError(f"host refused {op!r}: {rsp['error']}")
        return rsp

    async def _report_event(self, event: str, **fields: Any) -> None:
        await self._checked("report", kind="event", event=event, **fields)

    # ------------------------------------------------------------------ platform instructions

    @property
    def _migration_control(self) -> bool:
        return self.features is not None and bool(self.features >> KVM_FEATURE_MIGRATION_CONTROL & 1)

    async def _cpuid(self, leaf: int) -> tuple[int, int, int, int]:
        rsp = await self._checked("cpuid", leaf=leaf, subleaf=0)
        return rsp["eax"], rsp["ebx"], rsp["ecx"], rsp["edx"]

    async def _wrmsr(self, value: int) -> None:
        rsp = await self._request("wrmsr", msr=MSR_KVM_MIGRATION_CONTROL, value=value)
        if rsp["ok"]:
            self.msr = value
        else:
            log.warning("wrmsr MSR_KVM_MIGRATION_CONTROL=%d faulted: %s (%s)", value, rsp["error"], rsp.get("fault"))

    async def _map_gpa_range(self, gpa: int, npages: int, attrs: int) -> None:
        rsp = await self._checked("hypercall", nr=KVM_HC_MAP_GPA_RANGE, args=[gpa, npages, attrs])
        ret = rsp["ret"]
        if ret != 0:
            # Linux ignores the result (kvm_sev_hc_page_enc_status is void); count it for diagnosis.
            self.hypercall_errors += 1
            log.warning("MAP_GPA_RANGE gpa=%#x npages=%d attrs=%#x returned %d", gpa, npages, attrs, ret)

    async def _notify(self, pfn: int, npages: int, shared: bool) -> None:
        """``notify_page_enc_status_changed``: only hooked up when MIGRATION_CONTROL is advertised."""
        if self._migration_control:
            attrs = (KVM_MAP_GPA_RANGE_DECRYPTED if shared else KVM_MAP_GPA_RANGE_ENCRYPTED)
            await self._map_gpa_range(pfn << PAGE_SHIFT, npages, attrs | KVM_MAP_GPA_RANGE_PAGE_SZ_4K)

    # ------------------------------------------------------------------ vCPU

    def _update_running(self) -> None:
        if self._imported and not (self._paused or self._held or self._halted or self._done.is_set()):
            self._running.set()
        else:
            self._running.clear()
        self._wakeup.set()

    async def _vcpu(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._running.wait()
            async with self._step_lock:
                if not self._running.is_set():
                    continue
                self._wakeup.clear()
                started = loop.time()
                delay = await self._step()
                elapsed = loop.time() - started
            if self._throttle:
                # Auto-converge: stall percent/(100-percent) of the time the step ran.
                delay = max(delay, elapsed * self._throttle / (100 - self._throttle))
            # Interruptible: a host control sets _wakeup, so the cap only bounds idle polling.
            await self._sleep(min(delay, MAX_SLEEP))

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()

    async def _step(self) -> float:
        """Run one step; returns how long the vCPU may sleep before the next one."""
        loop = asyncio.get_running_loop()
        if self.controls:
            reason, hold = self.controls.popleft()
            await self._offline(reason, hold)
            return 0.0
        if self.boot_queue:
            await self._boot_step(self.boot_queue.popleft())
            return 0.0
        workload = self.workload
        if not self.booted or workload is None or not workload.active:
            return MAX_SLEEP
        now = loop.time()
        if workload.convert_due(now):
            await workload.convert_step(now, self._notify)
        else:
            workload.write_step(now)
        return workload.next_due(loop.time())

    def _queue_control(self, reason: Offline, hold: bool) -> asyncio.Future[None]:
        """Queue an offline path for the next step boundary; the future resolves once halted."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.controls.append((reason, hold))
        if reason in (Offline.SHUTDOWN, Offline.CRASH):
            self._halt_waiters.append(waiter)
        self._wakeup.set()
        return waiter

    async def _offline(self, reason: Offline, hold: bool) -> None:
        """``kvm_guest_cpu_offline``: MSR 0 first (unless the unsafe kexec option), then the next kernel."""
        keep = reason is Offline.KEXEC and self.options.unsafe_kexec_keep_msr
        if self._migration_control and not keep:
            await self._wrmsr(0)
        self.booted = False
        self.boot_queue.clear()
        await self._report_event("offline", reason=reason.value, msr=self.msr)
        if reason is Offline.KEXEC:
            steps = list(KEXEC)
            if hold:
                steps.insert(1, BootStep.KEXEC_WINDOW)
            self.boot_queue.extend(steps)
            await self._report_event("kexec", msr=self.msr, hold_in_window=hold)
        elif reason is Offline.REBOOT:
            self.boot_queue.extend(REBOOT)
            await self._report_event("reboot", msr=self.msr)
        else:
            self._halted = True  # the vCPU never runs again
            self._update_running()
            await self._report_event(reason.value, msr=self.msr)
            waiters, self._halt_waiters = self._halt_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        log.info("offline reason=%s msr=%d", reason.value, self.msr)

    async def _boot_step(self, step: BootStep) -> None:
        log.debug("boot step %s", step.value)
        if step is BootStep.PROBE:
            _, ebx, ecx, edx = await self._cpuid(0x40000000)
            signature = b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx))
            self.features = (await self._cpuid(KVM_CPUID_FEATURES))[0] if signature == KVM_SIGNATURE else 0
        elif step is BootStep.FIRMWARE:
            self.memory = GuestMemory.format(self.ram, self.engine, self.layout, self.options.workload.seed,
                                             self.dirty_log)
            self.workload = Workload(self.memory, self.options.workload)
            self.workload.set_throttle(self._throttle)
            for rng in self.layout.firmware_shared:
                # OVMF MemEncryptSevClearPageEncMask: page tables, then the hypercall, then use.
                self.memory.set_view(rng.pfn, rng.npages, True)
                await self._notify(rng.pfn, rng.npages, True)
                self.memory.write_pages(rng.pfn, rng.npages)
        elif step is BootStep.FIRMWARE_REBOOT:
            for rng in self._memory().layout.firmware_shared:
                await self._notify(rng.pfn, rng.npages, True)
        elif step is BootStep.REUSE_SHARED:
            reused = self._memory().reuse_shared_as_private(self._memory().layout.data_ranges())
            log.info("new kernel reused %d previously shared pages as private", reused)
        elif step is BootStep.KEXEC_WINDOW:
            self._held = True
            self._update_running()
            await self._report_event("kexec-window", msr=self.msr)
        elif step is BootStep.EARLY_RESET:
            if self._migration_control:
                for gpa, npages, attrs in early_reset_calls(self._memory().layout):
                    await self._map_gpa_range(gpa, npages, attrs)
        elif step is BootStep.DECRYPTED_SECTION:
            memory = self._memory()
            rng = memory.layout.decrypted
            memory.set_view(rng.pfn, rng.npages, True)
            await self._notify(rng.pfn, rng.npages, True)
            memory.write_pages(rng.pfn, rng.npages)
        else:
            await self._negotiate()

    async def _negotiate(self) -> None:
        """Linux ``kvm_init_platform`` (not EFI) / ``setup_efi_kvm_sev_migration`` (EFI)."""
        if self._migration_control:
            if not self.options.efi:
                await self._wrmsr(KVM_MIGRATION_READY)
            else:
                rsp = await self._checked("uefi_get_variable", name=UEFI_SEV_LIVE_MIGRATION_VAR,
                                          guid=UEFI_SEV_LIVE_MIGRATION_GUID)
                if rsp.get("found") is True and rsp.get("value") is True:
                    await self._wrmsr(KVM_MIGRATION_READY)
                else:
                    log.info("SevLiveMigrationEnabled found=%s value=%s: migration stays disabled",
                             rsp.get("found"), rsp.get("value"))
        self.booted = True
        if self.workload is not None:
            self.workload.restart_clock(asyncio.get_running_loop().time())
        await self._report_event("booted", msr=self.msr, features=self.features or 0, efi=self.options.efi)

    def _memory(self) -> GuestMemory:
        if self.memory is None:
            raise AgentError("guest memory is not initialized (first boot has not run)")
        return self.memory

    # ------------------------------------------------------------------ host requests

    async def _serve(self, msg: Message) -> None:
        op = msg["op"]
        try:
            result = await self._dispatch(op, msg)
            self._send(response_ok(msg["id"], **result))
        except (MigdError, ValueError) as exc:
            log.warning("request %s refused: %s", op, exc)
            with contextlib.suppress(MigdError):
                self._send(response_error(msg["id"], str(exc)))
        if op == "shutdown" and self._shutdown_requested:
            with contextlib.suppress(OSError, ConnectionError):
                if self._writer is not None:
                    await self._writer.drain()
            self._finish(0)

    async def _dispatch(self, op: str, msg: Message) -> dict[str, Any]:
        if op == "pause":
            self._paused = True
            self._update_running()
            async with self._step_lock:  # the step in flight (and its hypercalls) completes first
                pass
            return {"paused": True}
        if op == "resume":
            self._paused = False
            self._held = False
            self._update_running()
            if self.workload is not None:
                self.workload.restart_clock(asyncio.get_running_loop().time())
            return {}
        if op == "fetch_dirty":
            return {"bitmap": self.dirty_log.fetch_and_clear().encode()}
        if op == "throttle":
            self._throttle = get_int(msg, "percent", 0, 99)
            if self.workload is not None:
                self.workload.set_throttle(self._throttle)
            return {}
        if op in ("reboot", "kexec"):
            hold = get_bool(msg, "hold_in_window", default=False) if op == "kexec" else False
            if self._halted or not self._imported or self.memory is None:
                raise AgentError(f"{op}: the guest is not running (halted, incoming or not booted yet)")
            self._queue_control(Offline(op), hold)
            return {}
        if op == "shutdown":
            # A paused or held vCPU runs no guest code (exactly one copy runs, DESIGN.md §5):
            # the host gets its answer and the process ends without the offline path.
            self._shutdown_requested = True
            if self._running.is_set():
                await self._queue_control(Offline.SHUTDOWN, False)
            return {}
        if op == "export_state":
            return {"state": self._export_state()}
        if op == "import_state":
            self._import_state(get_bytes(msg, "state"))
            self._spawn(self._after_import(), "after-import")
            return {}
        if op == "check":
            return (await self._self_check()).report()
        raise ChannelProtocolError(f"unknown op {op!r}")

    async def _self_check(self) -> CheckResult:
        """Full self-check as one step (the kernel's ledger copy must match the one in RAM)."""
        memory = self._memory()
        async with self._step_lock:
            result = await self._run_check(expected_ledger=memory.ledger)
        log.info("self-check pages=%d errors=%d first=%s", result.pages_verified, result.errors, result.first_error)
        return result

    async def _run_check(self, **expect: Any) -> CheckResult:
        """Drive :func:`iter_check`, yielding to the event loop between chunks (caller holds the step lock)."""
        checker = iter_check(self.ram, self.engine, **expect)
        while True:
            try:
                next(checker)
            except StopIteration as done:
                result: CheckResult = done.value
                return result
            # Host requests (fetch_dirty, a pause waiting for this step) are served in between;
            # no step can run, so the memory under check does not change.
            await asyncio.sleep(0)

    # ------------------------------------------------------------------ vCPU state

    def _export_state(self) -> bytes:
        if not (self._paused or self._held) or self._step_lock.locked():
            raise AgentError("export_state needs a paused guest (send 'pause' first)")
        memory = self._memory()
        state = {
            "format": STATE_FORMAT,
            "name": self.options.name,
            "npages": self.options.npages,
            "msr": self.msr,
            "features": self.features,
            "efi": self.options.efi,
            "booted": self.booted,
            "boot_queue": [step.value for step in self.boot_queue],
            "controls": [[reason.value, hold] for reason, hold in self.controls],
            "unsafe_kexec_keep_msr": self.options.unsafe_kexec_keep_msr,
            "ledger_sha256": memory.ledger_digest(),
            "pages_written": memory.pages_written,
            "hypercall_errors": self.hypercall_errors,
            "workload": self.workload.state() if self.workload is not None else None,
        }
        return msgpack.packb(state, use_bin_type=True)

    def _import_state(self, blob: bytes) -> None:
        if not self.options.incoming or self._imported or self.memory is not None:
            raise AgentError("import_state is only for an incoming guest, once, before it runs")
        try:
            state = msgpack.unpackb(blob, raw=False, strict_map_key=True)
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                raise ValueError(f"expected a state map of format {STATE_FORMAT}")
            if state["npages"] != self.options.npages:
                raise ValueError(f"state is for {state['npages']} pages, this guest has {self.options.npages}")
            memory = GuestMemory.load(self.ram, self.engine, self.dirty_log)
            workload = Workload.from_state(memory, state["workload"]) if state["workload"] is not None else None
            boot_queue = [BootStep(v) for v in state["boot_queue"]]
            controls = [(Offline(r), bool(h)) for r, h in state["controls"]]
            features = state["features"]
            msr = int(state["msr"])
            digest = bytes(state["ledger_sha256"])
        except (ValueError, KeyError, TypeError, msgpack.UnpackException, MigdError) as exc:
            raise AgentError(f"bad vCPU state: {exc}") from exc
        self.memory, self.workload, self.layout = memory, workload, memory.layout
        memory.pages_written = int(state.get("pages_written", 0))
        self.features = None if features is None else int(features)
        self.msr = msr
        self.booted = bool(state["booted"])
        self.boot_queue = collections.deque(boot_queue)
        self.controls = collections.deque(controls)
        self._expected_digest = digest
        if workload is not None:
            self._throttle = workload.throttle_percent

    async def _after_import(self) -> None:
        """Incoming guest: restore the vCPU MSR, check every page, report, then run."""
        async with self._step_lock:
            result = await self._run_check(expected_ledger_digest=self._expected_digest)
            if self._migration_control and self.msr:
                # KVM_SET_MSRS of the VMM: the register value travels with the vCPU state.
                await self._wrmsr(self.msr)
        log.info("incoming self-check pages=%d errors=%d first=%s", result.pages_verified, result.errors,
                 result.first_error)
        await self._checked("report", kind="check", **result.report())
        self._imported = True
        if self.workload is not None:
            self.workload.restart_clock(asyncio.get_running_loop().time())
        self._update_running()


# ---------------------------------------------------------------------- command line


def _firmware_range(text: str) -> tuple[int, int]:
    try:
        gpa_text, npages_text = text.split(":", 1)
        return int(gpa_text, 0), int(npages_text, 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected GPA:NPAGES (e.g. 0x3ff0000:16), got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``migd agent`` (the daemon's launcher builds them, see migd.agent_launcher)."""
    parser = argparse.ArgumentParser(prog="migd agent", description="the in-guest agent of one emulated SEV guest")
    parser.add_argument("--name", required=True, help="guest name (must match the host's)")
    parser.add_argument("--socket", required=True, type=Path, help="hypercall channel unix socket")
    parser.add_argument("--ram", required=True, type=Path, help="guest RAM file")
    parser.add_argument("--npages", required=True, type=int, help="guest RAM size in 4 KiB pages")
    parser.add_argument("--key-fd", required=True, type=int, help="inherited fd to read the 32-byte VEK from")
    parser.add_argument("--efi", action="store_true", help="booted with UEFI (consult SevLiveMigrationEnabled)")
    parser.add_argument("--incoming", action="store_true", help="wait for import_state instead of booting")
    parser.add_argument("--firmware-shared", type=_firmware_range, action="append", metavar="GPA:NPAGES",
                        help="a firmware-owned shared range (repeatable; default: the top 16 pages)")
    parser.add_argument("--dirty-rate-mib-s", type=float, default=0.0)
    parser.add_argument("--convert-rate-hz", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unsafe-kexec-keep-msr", action="store_true",
                        help="do not clear the migration-control MSR before kexec (reproduces the seed race)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def read_key(fd: int) -> bytes:
    """Read the VEK from an inherited pipe until EOF, then close it."""
    chunks: list[bytes] = []
    try:
        while sum(map(len, chunks)) <= VEK_SIZE:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read the VEK from fd {fd}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    key = b"".join(chunks)
    if len(key) != VEK_SIZE:
        raise ConfigError(f"expected a {VEK_SIZE}-byte VEK on fd {fd}, got {len(key)} bytes")
    return key


def parse_options(argv: Sequence[str]) -> AgentOptions:
    """Parse ``migd agent`` arguments into options (argparse exits on usage errors)."""
    args = build_parser().parse_args(list(argv))
    return AgentOptions(
        name=args.name,
        socket_path=args.socket,
        ram_path=args.ram,
        npages=args.npages,
        key_fd=args.key_fd,
        efi=args.efi,
        incoming=args.incoming,
        firmware_shared=tuple(args.firmware_shared) if args.firmware_shared else None,
        workload=WorkloadConfig(args.dirty_rate_mib_s, args.convert_rate_hz, args.seed),
        unsafe_kexec_keep_msr=args.unsafe_kexec_keep_msr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``migd agent``; returns the exit code (0 shutdown/signal, 1 error)."""
    argv = sys.argv[1:] if argv is None else argv
    verbose = "-v" in argv or "--verbose" in argv
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s agent[%(process)d] %(name)s %(message)s")
    try:
        options = parse_options(argv)
        vek = read_key(options.key_fd)
        agent = GuestAgent(options, vek)
    except MigdError as exc:
        log.error("agent cannot start: %s", exc)
        return 2
    try:
        return asyncio.run(agent.run())
    except (MigdError, OSError) as exc:
        log.error("agent failed: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
