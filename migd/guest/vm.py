"""The host-side (KVM-side) platform state of one SEV guest, sans-I/O.

This is what KVM plus the VMM hold for a guest in the SEV live-migration design
(docs/design.md §3 "Guest-visible interface"): the **shared-page bitmap** the guest maintains with
``KVM_HC_MAP_GPA_RANGE``, the **migration-control MSR**, the paravirt **CPUID** leaves that
advertise both features, and the OVMF **UEFI variable** ``SevLiveMigrationEnabled``.
Guest requests arrive as decoded hypercall-channel messages (docs/design.md §4 "The hypercall channel");
:meth:`VmPlatform.handle_guest_request` validates every argument and answers with a
response map — bad guest input never raises, it gets ``ok=false`` and an error string.

The object is not thread-safe: the daemon drives it from its event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from migd.abi import (
    KVM_CPUID_FEATURES,
    KVM_EINVAL,
    KVM_ENOSYS,
    KVM_EPERM,
    KVM_FEATURE_HC_MAP_GPA_RANGE,
    KVM_FEATURE_MIGRATION_CONTROL,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_PAGE_SZ_1G,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
    KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
    KVM_MAP_GPA_RANGE_PAGE_SZ_MASK,
    KVM_MAP_GPA_RANGE_RESERVED_MASK,
    KVM_MIGRATION_READY,
    MSR_KVM_MIGRATION_CONTROL,
    PAGE_SHIFT,
    PAGE_SIZE,
    UEFI_SEV_LIVE_MIGRATION_GUID,
    UEFI_SEV_LIVE_MIGRATION_VAR,
)
from migd.bitmap import PageBitmap
from migd.guest.channel_codec import (
    U64_MAX,
    ChannelProtocolError,
    Message,
    get_int,
    get_str,
    get_u32,
    get_u64,
    get_u64_list,
    response_error,
    response_ok,
)
from migd.errors import ConfigError, MigdError

log = logging.getLogger(__name__)

KVM_CPUID_SIGNATURE: Final = 0x40000000
#: "KVMKVMKVM\0\0\0" as EBX, ECX, EDX (little-endian words), Linux ``KVM_SIGNATURE``.
KVM_SIGNATURE: Final = b"KVMKVMKVM\0\0\0"
_SIGNATURE_REGS: Final = tuple(int.from_bytes(KVM_SIGNATURE[i:i + 4], "little") for i in range(0, 12, 4))

#: Highest guest page count: every gpa of the guest must fit in 64 bits.
MAX_NPAGES: Final = 1 << (64 - PAGE_SHIFT)
_SIZE_HINTS: Final = frozenset({KVM_MAP_GPA_RANGE_PAGE_SZ_4K, KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
                                KVM_MAP_GPA_RANGE_PAGE_SZ_1G})
_MSR_VALUES: Final = frozenset({0, KVM_MIGRATION_READY})

#: Hypercall result names, the keys of :attr:`VmPlatform.hypercall_counts` (metrics labels).
_RESULT_NAMES: Final = {0: "ok", -KVM_ENOSYS: "enosys", -KVM_EINVAL: "einval", -KVM_EPERM: "eperm"}

#: Channel ops the platform answers; "hello" and "report" belong to the channel itself.
PLATFORM_OPS: Final = frozenset({"hypercall", "rdmsr", "wrmsr", "cpuid", "uefi_get_variable"})


class GeneralProtectionFault(MigdError):
    """The guest's instruction faults with #GP (e.g. RDMSR/WRMSR of an MSR it may not use)."""


@dataclass(frozen=True)
class VmConfig:
    """What the host exposes to one guest.

    ``uefi_live_migration`` is the value of ``SevLiveMigrationEnabled`` the firmware sees
    (``None``: the variable is absent); it only matters when ``efi`` is true.
    """

    name: str
    npages: int
    efi: bool
    uefi_live_migration: bool | None
    cpuid_map_gpa_range: bool = True
    cpuid_migration_control: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"guest name must be a non-empty string, got {self.name!r}")
        if isinstance(self.npages, bool) or not isinstance(self.npages, int) or not 1 <= self.npages < MAX_NPAGES:
            raise ConfigError(f"guest npages must be an integer in [1, {MAX_NPAGES - 1}], got {self.npages!r}")


class VmPlatform:
    """KVM's view of one guest: shared-page bitmap, migration-control MSR, CPUID, UEFI variable.

    ``state_change_log`` marks every page whose private/shared state a ``MAP_GPA_RANGE``
    changed; the migration engine ``fetch_and_clear``\\ s it with each dirty-log round so a
    converted page is re-sent with its new routing (docs/design.md §8 "Invariants", 2).
    ``on_migration_control_change(old, new)`` is called synchronously whenever the MSR value
    changes (guest write or vCPU reset), so a migration can enter blackout the instant it
    drops (docs/design.md §3: the host must re-block when the MSR goes back to 0).
    """

    def __init__(self, config: VmConfig) -> None:
        self.config = config
        self.shared_bitmap = PageBitmap(config.npages)  # all private at creation
        self.state_change_log = PageBitmap(config.npages)
        self.msr_migration_control = 0
        self.hypercall_counts: dict[str, int] = dict.fromkeys(_RESULT_NAMES.values(), 0)
        self.gp_faults = 0
        self.bad_requests = 0
        self.on_migration_control_change: Callable[[int, int], None] | None = None

    # ------------------------------------------------------------------ hypercalls

    def hypercall(self, nr: int, args: list[int], *, cpl: int = 0) -> int:
        """Emulate VMMCALL ``nr`` with ``args`` [a0, a1, a2]; return the signed KVM return value."""
        if nr == KVM_HC_MAP_GPA_RANGE:
            gpa, npages, attrs = args
            return self.map_gpa_range(gpa, npages, attrs, cpl=cpl)
        # Linux kvm_emulate_hypercall checks the CPL before looking at the number.
        return self._count(-KVM_EPERM if cpl != 0 else -KVM_ENOSYS)

    def map_gpa_range(self, gpa: int, npages: int, attrs: int, *, cpl: int = 0) -> int:
        """``KVM_HC_MAP_GPA_RANGE``: mark ``npages`` pages from ``gpa`` private or shared.

        Checks in KVM's order (Linux ``kvm_emulate_hypercall``, then the attribute checks
        of the VMM's exit handler): CPL → EPERM; feature not exposed → ENOSYS; unaligned gpa,
        npages 0, gfn + npages wrapping 2^64 → EINVAL; range outside RAM, reserved attrs bits
        63:5, size hint not 4K/2M/1G → EINVAL. On error nothing changes. Size hints are hints
        only: no alignment beyond 4 KiB is required, as in KVM.
        """
        for what, value in (("gpa", gpa), ("npages", npages), ("attrs", attrs)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
                raise ValueError(f"{what} must be a u64 register value, got {value!r}")
        if cpl != 0:
            return self._count(-KVM_EPERM)
        if not self.config.cpuid_map_gpa_range:
            return self._count(-KVM_ENOSYS)
        gfn = gpa >> PAGE_SHIFT
        # KVM: "gpa_to_gfn(gpa) + npages <= gpa_to_gfn(gpa)" in u64, i.e. the sum wraps.
        if gpa % PAGE_SIZE or npages == 0 or gfn + npages > U64_MAX:
            return self._count(-KVM_EINVAL)
        if gfn + npages > self.config.npages:
            return self._count(-KVM_EINVAL)
        if attrs & KVM_MAP_GPA_RANGE_RESERVED_MASK or (attrs & KVM_MAP_GPA_RANGE_PAGE_SZ_MASK) not in _SIZE_HINTS:
            return self._count(-KVM_EINVAL)
        shared = not attrs & KVM_MAP_GPA_RANGE_ENCRYPTED
        # The pages that change are the runs currently in the other state. Log them only
        # *after* the bitmap changed: a dirty-log fetch between the two steps then misses the
        # mark and the next round re-sends the page with its new routing; logging first would
        # let a round read the page with the old routing and never re-send it (invariant 2).
        starts, counts = self.shared_bitmap.extent_arrays(not shared, gfn, npages)
        self.shared_bitmap.assign_range(gfn, npages, shared)
        self.state_change_log.set_extents(starts, counts)
        return self._count(0)

    def _count(self, ret: int) -> int:
        self.hypercall_counts[_RESULT_NAMES[ret]] += 1
        return ret

    # ------------------------------------------------------------------ MSR / CPUID / UEFI

    def rdmsr(self, msr: int) -> int:
        """RDMSR: the migration-control MSR if its feature is exposed; anything else is #GP."""
        if msr != MSR_KVM_MIGRATION_CONTROL or not self.config.cpuid_migration_control:
            self.gp_faults += 1
            raise GeneralProtectionFault(f"rdmsr 0x{msr:x}: not an MSR this guest may read")
        return self.msr_migration_control

    def wrmsr(self, msr: int, value: int) -> None:
        """WRMSR: only 0 or KVM_MIGRATION_READY to the migration-control MSR, else #GP."""
        if msr != MSR_KVM_MIGRATION_CONTROL or not self.config.cpuid_migration_control:
            self.gp_faults += 1
            raise GeneralProtectionFault(f"wrmsr 0x{msr:x}: not an MSR this guest may write")
        if value not in _MSR_VALUES:
            self.gp_faults += 1
            raise GeneralProtectionFault(
                f"wrmsr MSR_KVM_MIGRATION_CONTROL: expected 0 or {KVM_MIGRATION_READY}, got 0x{value:x}")
        self._set_migration_control(value)

    def vcpu_reset(self) -> None:
        """A host-initiated vCPU reset: the migration-control MSR returns to 0 (docs/design.md §3)."""
        self._set_migration_control(0)

    def _set_migration_control(self, value: int) -> None:
        old, self.msr_migration_control = self.msr_migration_control, value
        if old != value:
            log.info("migration-control msr guest=%s old=%d new=%d", self.config.name, old, value)
            if self.on_migration_control_change is not None:
                self.on_migration_control_change(old, value)

    @property
    def migration_ready(self) -> bool:
        """True iff the feature is exposed and the guest has written READY (migration allowed)."""
        return self.config.cpuid_migration_control and bool(self.msr_migration_control & KVM_MIGRATION_READY)

    def cpuid(self, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
        """CPUID (eax, ebx, ecx, edx): the KVM signature and feature leaves; zeros elsewhere."""
        if leaf == KVM_CPUID_SIGNATURE:
            return (KVM_CPUID_FEATURES, *_SIGNATURE_REGS)  # eax = highest KVM leaf
        if leaf == KVM_CPUID_FEATURES:
            eax = (int(self.config.cpuid_map_gpa_range) << KVM_FEATURE_HC_MAP_GPA_RANGE
                   | int(self.config.cpuid_migration_control) << KVM_FEATURE_MIGRATION_CONTROL)
            return (eax, 0, 0, 0)
        return (0, 0, 0, 0)

    def uefi_get_variable(self, name: str, guid: str) -> tuple[bool, bool | None]:
        """(found, value) of a UEFI variable; only ``SevLiveMigrationEnabled`` exists, on EFI guests."""
        if (not self.config.efi or self.config.uefi_live_migration is None
                or name != UEFI_SEV_LIVE_MIGRATION_VAR or guid.lower() != UEFI_SEV_LIVE_MIGRATION_GUID):
            return False, None
        return True, self.config.uefi_live_migration

    # ------------------------------------------------------------------ channel requests

    def handle_guest_request(self, msg: Message) -> Message:
        """Answer one decoded guest request with a response map; never raises for bad input."""
        raw_id = msg.get("id") if isinstance(msg, dict) else None
        msg_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) and 0 <= raw_id <= U64_MAX else 0
        try:
            if not isinstance(msg, dict) or msg.get("t") != "req":
                raise ChannelProtocolError("expected a request map with t='req'")
            get_u64(msg, "id")
            op = get_str(msg, "op", max_len=64)
            if op not in PLATFORM_OPS:
                raise ChannelProtocolError(f"unknown op {op!r}: expected one of {sorted(PLATFORM_OPS)}")
            return response_ok(msg_id, **self._dispatch(op, msg))
        except ChannelProtocolError as exc:
            self.bad_requests += 1
            # A guest controls how often this happens: log the 1st, 2nd, 4th, 8th, ... so a
            # hostile guest cannot flood the journal; the counter has the full number.
            if self.bad_requests & (self.bad_requests - 1) == 0:
                log.warning("bad guest request guest=%s id=%d count=%d error=%s",
                            self.config.name, msg_id, self.bad_requests, exc)
            return response_error(msg_id, str(exc))
        except GeneralProtectionFault as exc:
            return response_error(msg_id, str(exc), fault="GP")

    def _dispatch(self, op: str, msg: Message) -> dict[str, Any]:
        if op == "hypercall":
            nr = get_u64(msg, "nr")
            args = get_u64_list(msg, "args", 3)
            cpl = get_int(msg, "cpl", 0, 3, default=0)
            return {"ret": self.hypercall(nr, args, cpl=cpl)}
        if op == "rdmsr":
            return {"value": self.rdmsr(get_u32(msg, "msr"))}
        if op == "wrmsr":
            msr, value = get_u32(msg, "msr"), get_u64(msg, "value")
            self.wrmsr(msr, value)
            return {}
        if op == "cpuid":
            eax, ebx, ecx, edx = self.cpuid(get_u32(msg, "leaf"), get_u32(msg, "subleaf", default=0))
            return {"eax": eax, "ebx": ebx, "ecx": ecx, "edx": edx}
        # op == "uefi_get_variable" (PLATFORM_OPS is checked by the caller)
        found, value = self.uefi_get_variable(get_str(msg, "name", max_len=256), get_str(msg, "guid", max_len=64))
        return {"found": found, "value": value}
