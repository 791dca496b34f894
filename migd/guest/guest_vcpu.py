"""The guest's vCPU: boot, offline path, workload steps, pause and vCPU state — host I/O injected.

What a Linux SEV guest does, as Linux ``kvm_init_platform`` + ``setup_efi_kvm_sev_migration``
and OVMF do it (docs/design.md §3 "Guest-visible interface"):

* **first boot**: the firmware makes its ranges shared (page tables, then ``MAP_GPA_RANGE``,
  then use); the kernel's early boot sends ``MAP_GPA_RANGE(ENCRYPTED)`` for every e820 RAM range
  (firmware ranges are not RAM: they survive kexec and reboot), marks its decrypted section
  shared, then writes ``MSR_KVM_MIGRATION_CONTROL = READY`` — directly when not EFI-booted, only
  if ``SevLiveMigrationEnabled`` is present and true when EFI-booted. As in Linux and OVMF, the
  page-state hypercalls and the MSR are used only when CPUID advertises
  ``KVM_FEATURE_MIGRATION_CONTROL``; without it the MSR is never touched;
* the **offline path** (kexec, reboot, shutdown, SIGTERM, crash; Linux ``kvm_guest_cpu_offline``)
  writes the MSR back to 0 first. ``unsafe_kexec_keep_msr`` skips that on kexec to reproduce the
  seed's race: the new kernel reuses the pages the old one had shared as private *before* its
  early-boot reset, while the host still says READY and its bitmap still says shared;
* the **workload** (:mod:`migd.guest.workload`) and the **self-check** (:mod:`migd.guest.selfcheck`).

Everything the vCPU does happens in *steps* (one boot stage, one write run, one conversion,
one self-check) under one lock; ``pause`` is acknowledged only between steps, so no step is
half-done and no hypercall is in flight, and nothing runs until ``resume``. ``fetch_dirty`` is
answered between event-loop callbacks, never between a dirty mark and its write.

The host is reached through :class:`HostLink` (one coroutine: request → response map), so this
module never touches a socket; :mod:`migd.guest.agent` supplies the channel.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

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
from migd.guest.channel_codec import ChannelProtocolError, Message, get_bool, get_bytes, get_int
from migd.errors import MigdError
from migd.guest.guest_layout import PFN_2M, GuestLayout
from migd.platform.memory import GuestRam, MemoryEncryption
from migd.guest.selfcheck import CheckResult, iter_check
from migd.guest.workload import GuestMemory, Workload, WorkloadConfig

log = logging.getLogger(__name__)

STATE_FORMAT: Final = 1
KVM_CPUID_SIGNATURE: Final = 0x40000000
KVM_SIGNATURE: Final = b"KVMKVMKVM\0\0\0"
MAX_SLEEP: Final = 1.0  # longest sleep between two steps (host requests wake the vCPU at once)


class VcpuError(MigdError):
    """The vCPU cannot do what was asked (host refused an instruction, wrong state, bad vCPU state)."""


class HostLink(Protocol):
    """The guest's way to the host: one request, its response map (``ok``, fields / ``error``)."""

    async def request(self, op: str, **fields: Any) -> Message:
        """Send a guest → host request and wait for its response."""
        ...


class BootStep(enum.Enum):
    """One stage of a boot; each is one vCPU step (a pause may come between any two)."""

    PROBE = "probe"  # CPUID 0x40000000 / 0x40000001
    FIRMWARE = "firmware"  # first boot: boot params + ledger, firmware ranges made shared and filled
    FIRMWARE_REBOOT = "firmware-reboot"  # reboot: the firmware announces its (surviving) ranges again
    REUSE_SHARED = "reuse-shared"  # a new kernel uses pages the old one had shared, as private
    KEXEC_WINDOW = "kexec-window"  # test hook: hold right there, before the reset
    EARLY_RESET = "early-reset"  # MAP_GPA_RANGE(ENCRYPTED) over every e820 RAM range
    DECRYPTED_SECTION = "decrypted-section"  # __bss_decrypted: view shared, MAP_GPA_RANGE, use
    NEGOTIATE = "negotiate"  # MSR READY (not EFI) / UEFI variable, then READY (EFI)


#: The boot paths, as step tables (a kexec'd kernel starts using memory before anything else).
FIRST_BOOT: Final = (BootStep.PROBE, BootStep.FIRMWARE, BootStep.EARLY_RESET, BootStep.DECRYPTED_SECTION,
                     BootStep.NEGOTIATE)
REBOOT: Final = (BootStep.PROBE, BootStep.FIRMWARE_REBOOT, BootStep.REUSE_SHARED, BootStep.EARLY_RESET,
                 BootStep.DECRYPTED_SECTION, BootStep.NEGOTIATE)
KEXEC: Final = (BootStep.REUSE_SHARED, BootStep.PROBE, BootStep.EARLY_RESET, BootStep.DECRYPTED_SECTION,
                BootStep.NEGOTIATE)


class Offline(enum.Enum):
    """Why the vCPU goes offline (the callers of Linux ``kvm_guest_cpu_offline``)."""

    KEXEC = "kexec"
    REBOOT = "reboot"
    SHUTDOWN = "shutdown"
    CRASH = "crash"


@dataclass(frozen=True)
class GuestConfig:
    """What the guest is: size, firmware, boot mode, workload."""

    name: str
    npages: int
    efi: bool = False
    incoming: bool = False
    firmware_shared: tuple[tuple[int, int], ...] | None = None
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)
    unsafe_kexec_keep_msr: bool = False


@dataclass(frozen=True)
class _ImportedState:
    """An incoming guest's vCPU state, checked and with its memory loaded, waiting to run."""

    memory: GuestMemory
    workload: Workload | None
    boot_queue: tuple[BootStep, ...]
    controls: tuple[tuple[Offline, bool], ...]
    features: int | None
    msr: int
    booted: bool
    ledger_digest: bytes
    hypercall_errors: int


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


class GuestVcpu:
    """One guest's vCPU and memory (see module docstring)."""

    def __init__(self, config: GuestConfig, ram: GuestRam, engine: MemoryEncryption, host: HostLink) -> None:
        if ram.npages != config.npages:
            raise VcpuError(f"guest RAM has {ram.npages} pages, the guest {config.npages}")
        self.config = config
        self.ram = ram
        self.engine = engine
        self.host = host
        self.layout = GuestLayout.build(config.npages, config.firmware_shared)
        self.dirty_log = PageBitmap(config.npages)
        self.memory: GuestMemory | None = None
        self.workload: Workload | None = None
        self.features: int | None = None  # CPUID 0x40000001 EAX, once probed
        self.msr = 0  # the value this vCPU last wrote to MSR_KVM_MIGRATION_CONTROL
        self.booted = False
        self.boot_queue: collections.deque[BootStep] = collections.deque()
        self.controls: collections.deque[tuple[Offline, bool]] = collections.deque()
        self.hypercall_errors = 0
        self.halted = asyncio.Event()  # set once shutdown/crash went offline: never runs again
        self._paused = False  # host "pause"
        self._held = False  # kexec-window hold (the guest paused itself)
        self._boot_at = 0.0  # loop time before which the next boot step may not run (boot_time_s)
        self._throttle = 0
        self._state_ready = asyncio.Event()  # first boot: at once; incoming: on import_state
        self._started = False  # run() is past the incoming check: steps may run
        self._expected_digest: bytes | None = None
        self._staged: _ImportedState | None = None  # an incoming guest's state, loaded, not yet running
        self._running = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._step_lock = asyncio.Lock()
        self._halt_waiters: list[asyncio.Future[None]] = []
        if not config.incoming:
            self._state_ready.set()
            self.boot_queue.extend(FIRST_BOOT)

    # ------------------------------------------------------------------ instructions

    @property
    def migration_control(self) -> bool:
        """Whether CPUID advertised KVM_FEATURE_MIGRATION_CONTROL (Linux gates MSR and hypercalls on it)."""
        return self.features is not None and bool(self.features >> KVM_FEATURE_MIGRATION_CONTROL & 1)

    @property
    def running(self) -> bool:
        """Whether the vCPU may run steps now (not paused, held, halted, or waiting for its state)."""
        return self._running.is_set()

    async def _checked(self, op: str, **fields: Any) -> Message:
        rsp = await self.host.request(op, **fields)
        if not rsp["ok"]:
            raise VcpuError(f"host refused {op!r}: {rsp['error']}")
        return rsp

    async def _report_event(self, event: str, **fields: Any) -> None:
        await self._checked("report", kind="event", event=event, **fields)

    async def _cpuid(self, leaf: int) -> tuple[int, int, int, int]:
        rsp = await self._checked("cpuid", leaf=leaf, subleaf=0)
        return rsp["eax"], rsp["ebx"], rsp["ecx"], rsp["edx"]

    async def _wrmsr(self, value: int) -> None:
        rsp = await self.host.request("wrmsr", msr=MSR_KVM_MIGRATION_CONTROL, value=value)
        if rsp["ok"]:
            self.msr = value
        else:
            log.warning("wrmsr MSR_KVM_MIGRATION_CONTROL=%d faulted: %s (%s)", value, rsp["error"], rsp.get("fault"))

    async def _map_gpa_range(self, gpa: int, npages: int, attrs: int) -> None:
        rsp = await self._checked("hypercall", nr=KVM_HC_MAP_GPA_RANGE, args=[gpa, npages, attrs])
        if rsp["ret"] != 0:
            # Linux ignores the result (kvm_sev_hc_page_enc_status is void); count it for diagnosis.
            self.hypercall_errors += 1
            log.warning("MAP_GPA_RANGE gpa=%#x npages=%d attrs=%#x returned %d", gpa, npages, attrs, rsp["ret"])

    async def _notify(self, pfn: int, npages: int, shared: bool) -> None:
        """``notify_page_enc_status_changed``: hooked up only when MIGRATION_CONTROL is advertised."""
        if self.migration_control:
            attrs = KVM_MAP_GPA_RANGE_DECRYPTED if shared else KVM_MAP_GPA_RANGE_ENCRYPTED
            await self._map_gpa_range(pfn << PAGE_SHIFT, npages, attrs | KVM_MAP_GPA_RANGE_PAGE_SZ_4K)

    def _memory(self) -> GuestMemory:
        if self.memory is None:
            raise VcpuError("guest memory is not initialized (the first boot has not run)")
        return self.memory

    # ------------------------------------------------------------------ the vCPU loop

    def _update_running(self) -> None:
        runnable = self._started and not (self._paused or self._held or self.halted.is_set())
        if runnable:
            self._running.set()
        else:
            self._running.clear()
        self._wakeup.set()

    async def run(self) -> None:
        """Run the vCPU until it halts (an incoming guest first waits for its state and checks itself)."""
        await self._state_ready.wait()
        if self.config.incoming:
            await self._resume_incoming()
        self._started = True
        self._update_running()
        loop = asyncio.get_running_loop()
        while await self._runnable():
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
            await self._sleep(min(delay, MAX_SLEEP))

    async def _runnable(self) -> bool:
        """Wait until the vCPU may run a step (True) or has halted for good (False)."""
        while not self._running.is_set():
            if self.halted.is_set():
                return False
            self._wakeup.clear()
            await self._wakeup.wait()  # every state change sets it (_update_running)
        return True

    async def _sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()

    async def _step(self) -> float:
        """Run one step; returns how long the vCPU may sleep before the next one."""
        if self.controls:
            reason, hold = self.controls.popleft()
            await self._offline(reason, hold)
            return 0.0
        if self.boot_queue:
            loading = self._boot_at - asyncio.get_running_loop().time()
            if loading > 0:
                return loading  # the next kernel is still loading (WorkloadConfig.boot_time_s)
            await self._boot_step(self.boot_queue.popleft())
            return 0.0
        workload = self.workload
        if not self.booted or workload is None or not workload.active:
            return MAX_SLEEP
        if workload.populating:
            await workload.populate_step(self._notify)
            if not workload.populating:
                workload.restart_clock(asyncio.get_running_loop().time())  # no catch-up burst
            return 0.0
        now = asyncio.get_running_loop().time()
        offline = workload.offline_due(now)
        if offline is not None:  # the guest reboots/kexecs on its own (WorkloadConfig.kexec_after_s)
            await self._offline(Offline(offline), False)
            return 0.0
        if workload.convert_due(now):
            await workload.convert_step(now, self._notify)
        else:
            workload.write_step(now)
        return workload.next_due(asyncio.get_running_loop().time())

    def queue_offline(self, reason: Offline, hold: bool = False) -> asyncio.Future[None]:
        """Queue an offline path for the next step boundary; the future resolves once halted."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.controls.append((reason, hold))
        if reason in (Offline.SHUTDOWN, Offline.CRASH):
            self._halt_waiters.append(waiter)
        self._wakeup.set()
        return waiter

    async def _offline(self, reason: Offline, hold: bool) -> None:
        """``kvm_guest_cpu_offline``: MSR 0 first (unless the unsafe kexec option), then the next kernel."""
        keep = reason is Offline.KEXEC and self.config.unsafe_kexec_keep_msr
        if self.migration_control and not keep:
            await self._wrmsr(0)
        self.booted = False
        self.boot_queue.clear()
        boot_time = self.workload.config.boot_time_s if self.workload is not None else 0.0
        self._boot_at = asyncio.get_running_loop().time() + boot_time
        await self._report_event("offline", reason=reason.value, msr=self.msr)
        if reason is Offline.KEXEC:
            steps = list(KEXEC)
            if hold:
                steps.insert(steps.index(BootStep.REUSE_SHARED) + 1, BootStep.KEXEC_WINDOW)
            self.boot_queue.extend(steps)
            await self._report_event("kexec", msr=self.msr, hold_in_window=hold)
        elif reason is Offline.REBOOT:
            self.boot_queue.extend(REBOOT)
            await self._report_event("reboot", msr=self.msr)
        else:
            self.halted.set()  # the vCPU never runs again
            self._update_running()
            await self._report_event(reason.value, msr=self.msr)
            waiters, self._halt_waiters = self._halt_waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
        log.info("offline reason=%s msr=%d", reason.value, self.msr)

    async def crash_offline(self) -> None:
        """The vCPU died under us: best effort MSR 0 and a crash report (caller bounds the time)."""
        self.halted.set()
        self._update_running()
        if self.migration_control and not self._paused:
            await self._wrmsr(0)
        await self._report_event("crash", msr=self.msr)

    # ------------------------------------------------------------------ boot

    async def _boot_step(self, step: BootStep) -> None:
        log.debug("boot step %s", step.value)
        if step is BootStep.PROBE:
            _, ebx, ecx, edx = await self._cpuid(KVM_CPUID_SIGNATURE)
            signature = b"".join(reg.to_bytes(4, "little") for reg in (ebx, ecx, edx))
            self.features = (await self._cpuid(KVM_CPUID_FEATURES))[0] if signature == KVM_SIGNATURE else 0
        elif step is BootStep.FIRMWARE:
            # Power-on: RAM starts zero-filled, as a host hands a new VM fresh pages. A guest
            # started again on its old RAM file must not inherit its previous life: the new
            # ledger says "never written" for every page. (Hole punch: O(extents), not O(RAM).)
            self.dirty_log.set_range(0, self.config.npages)
            self.ram.zero(0, self.config.npages)
            self.memory = GuestMemory.format(self.ram, self.engine, self.layout, self.config.workload.seed,
                                             self.dirty_log)
            self.workload = Workload(self.memory, self.config.workload)
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
            memory = self._memory()
            reused = memory.reuse_shared_as_private(memory.layout.data_ranges())
            log.info("new kernel reused %d previously shared pages as private", reused)
        elif step is BootStep.KEXEC_WINDOW:
            self._held = True  # before the report: a "resume" answering it must find us held
            self._update_running()
            await self._report_event("kexec-window", msr=self.msr)
        elif step is BootStep.EARLY_RESET:
            if self.migration_control:
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
        if self.migration_control:
            if not self.config.efi:
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
        await self._report_event("booted", msr=self.msr, features=self.features or 0, efi=self.config.efi)

    # ------------------------------------------------------------------ host → guest requests

    async def handle(self, op: str, msg: Message) -> dict[str, Any]:
        """Answer one host request (docs/design.md §4, hypercall channel); raises a MigdError to refuse it."""
        if op == "pause":
            self._paused = True
            self._update_running()
            async with self._step_lock:  # the step in flight (and its hypercalls) completes first
                pass
            return {"paused": True}
        if op == "resume":
            self._paused = self._held = False
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
            if self.halted.is_set() or not self._started or self.memory is None:
                raise VcpuError(f"{op}: the guest is not running (halted, incoming or not booted yet)")
            self.queue_offline(Offline(op), hold)
            return {}
        if op == "shutdown":
            # A paused or held vCPU runs no guest code (exactly one copy runs: docs/design.md §8, 4):
            # the host gets its answer and the process ends without the offline path.
            if self.running:
                await self.queue_offline(Offline.SHUTDOWN)
            self.halted.set()
            self._update_running()
            return {}
        if op == "export_state":
            return {"state": self.export_state()}
        if op == "import_state":
            self.import_state(get_bytes(msg, "state"), start=get_bool(msg, "start", default=True))
            return {}
        if op == "start":
            self.start_imported()
            return {}
        if op == "check":
            memory = self._memory()
            async with self._step_lock:
                result = await self._run_check(expected_ledger=memory.ledger)
            log.info("self-check pages=%d errors=%d first=%s", result.pages_verified, result.errors,
                     result.first_error)
            return result.report()
        raise ChannelProtocolError(f"unknown op {op!r}")

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

    def export_state(self) -> bytes:
        """vCPU + agent state (msgpack map, KiBs): only while paused, never RAM.

        ``"msr"`` is the migration-control MSR value, for a VMM that restores it host-side.
        """
        if not (self._paused or self._held) or self._step_lock.locked():
            raise VcpuError("export_state needs a paused guest (send 'pause' first)")
        memory = self._memory()
        state = {
            "format": STATE_FORMAT,
            "name": self.config.name,
            "npages": self.config.npages,
            "msr": self.msr,
            "features": self.features,
            "efi": self.config.efi,
            "booted": self.booted,
            "boot_queue": [step.value for step in self.boot_queue],
            "controls": [[reason.value, hold] for reason, hold in self.controls],
            "ledger_sha256": memory.ledger_digest(),
            "pages_written": memory.pages_written,
            "hypercall_errors": self.hypercall_errors,
            "workload": self.workload.state() if self.workload is not None else None,
        }
        return msgpack.packb(state, use_bin_type=True)

    def import_state(self, blob: bytes, *, start: bool = True) -> None:
        """Take an exported state (incoming guest, once, before it runs); memory comes from RAM.

        ``start=False`` stages it: the state is parsed and checked and the guest's memory
        (boot parameters, ledger) loaded from RAM now, but the vCPU runs only on
        :meth:`start_imported`. The destination stages as soon as RAM is final, while the
        source still commits, so COMMIT → STARTED is one short hop (the guest runs nowhere
        before COMMIT: invariant 4).
        """
        if not self.config.incoming or self._state_ready.is_set() or self._staged is not None:
            raise VcpuError("import_state is only for an incoming guest, once, before it runs")
        try:
            state = msgpack.unpackb(blob, raw=False, strict_map_key=True)
            if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
                raise ValueError(f"expected a state map of format {STATE_FORMAT}")
            if state["npages"] != self.config.npages:
                raise ValueError(f"state is for {state['npages']} pages, this guest has {self.config.npages}")
            memory = GuestMemory.load(self.ram, self.engine, self.dirty_log)
            workload = Workload.from_state(memory, state["workload"]) if state["workload"] is not None else None
            staged = _ImportedState(
                memory=memory,
                workload=workload,
                boot_queue=tuple(BootStep(value) for value in state["boot_queue"]),
                controls=tuple((Offline(reason), bool(hold)) for reason, hold in state["controls"]),
                features=None if state["features"] is None else int(state["features"]),
                msr=int(state["msr"]),
                booted=bool(state["booted"]),
                ledger_digest=bytes(state["ledger_sha256"]),
                hypercall_errors=int(state["hypercall_errors"]),
            )
            memory.pages_written = int(state["pages_written"])
        except (ValueError, KeyError, TypeError, msgpack.UnpackException, MigdError) as exc:
            raise VcpuError(f"bad vCPU state: {exc}") from exc
        self._staged = staged
        if start:
            self.start_imported()

    def start_imported(self) -> None:
        """Run the incoming guest from its staged state (``import_state(start=False)`` first)."""
        staged = self._staged
        if staged is None or self._state_ready.is_set():
            raise VcpuError("start needs an incoming guest with a staged state (import_state start=false) "
                            "that has not started yet")
        self.memory, self.workload, self.layout = staged.memory, staged.workload, staged.memory.layout
        self.features, self.msr, self.booted = staged.features, staged.msr, staged.booted
        self.boot_queue = collections.deque(staged.boot_queue)
        self.controls = collections.deque(staged.controls)
        self.hypercall_errors = staged.hypercall_errors
        self._expected_digest = staged.ledger_digest
        self._throttle = 0  # a host throttle never travels: the destination runs the guest at full speed
        self._state_ready.set()

    async def _resume_incoming(self) -> None:
        """First thing an incoming guest does: check every page, restore its MSR, report."""
        async with self._step_lock:
            result = await self._run_check(expected_ledger_digest=self._expected_digest)
            if self.migration_control and self.msr:
                # The VMM's KVM_SET_MSRS: the register value travels with the vCPU state.
                await self._wrmsr(self.msr)
        log.info("incoming self-check pages=%d errors=%d first=%s", result.pages_verified, result.errors,
                 result.first_error)
        await self._checked("report", kind="check", **result.report())
        if self.workload is not None:
            self.workload.restart_clock(asyncio.get_running_loop().time())
