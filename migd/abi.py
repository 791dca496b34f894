"""Guest- and firmware-visible interface values, kept exactly as the documents define them.

Sources: Linux ``include/uapi/linux/kvm_para.h`` and ``Documentation/virt/kvm/x86/hypercalls.rst``
(hypercall, CPUID, MSR), OVMF ``MemEncryptSevLib`` (UEFI variable), AMD SEV API 55766
(guest policy, firmware status codes), Linux ``include/uapi/linux/psp-sev.h`` (status numbers).
"""

from __future__ import annotations

import enum

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

#: Binary units (the REST API and the config speak MiB: `memory_mib`, `max_bandwidth_mib_s`).
MiB = 1 << 20
GiB = 1 << 30

# --- KVM paravirt interface (docs/design.md §3 "Guest-visible interface") -------------------
KVM_HC_MAP_GPA_RANGE = 12
KVM_MAP_GPA_RANGE_PAGE_SZ_4K = 0
KVM_MAP_GPA_RANGE_PAGE_SZ_2M = 1
KVM_MAP_GPA_RANGE_PAGE_SZ_1G = 2
KVM_MAP_GPA_RANGE_PAGE_SZ_MASK = 0xF
KVM_MAP_GPA_RANGE_ENCRYPTED = 1 << 4
KVM_MAP_GPA_RANGE_DECRYPTED = 0
KVM_MAP_GPA_RANGE_RESERVED_MASK = ~((1 << 5) - 1) & ((1 << 64) - 1)

KVM_ENOSYS = 1000
KVM_EINVAL = 22
KVM_EPERM = 1

KVM_CPUID_FEATURES = 0x40000001
KVM_FEATURE_HC_MAP_GPA_RANGE = 16
KVM_FEATURE_MIGRATION_CONTROL = 17

MSR_KVM_MIGRATION_CONTROL = 0x4B564D08
KVM_MIGRATION_READY = 1 << 0

UEFI_SEV_LIVE_MIGRATION_VAR = "SevLiveMigrationEnabled"
UEFI_SEV_LIVE_MIGRATION_GUID = "0cf29b71-9e51-433a-a3b7-81f3ab16b875"


# --- SEV guest policy (SEV API 55766, "Guest Policy") -------------------------------------
class GuestPolicy(enum.IntFlag):
    """Guest policy bits; API major/minor live in bits 23:16 and 31:24."""

    NODBG = 1 << 0
    NOKS = 1 << 1
    ES = 1 << 2
    NOSEND = 1 << 3
    DOMAIN = 1 << 4
    SEV = 1 << 5


POLICY_API_MAJOR_SHIFT = 16
POLICY_API_MINOR_SHIFT = 24
POLICY_MAX = (1 << 32) - 1


# --- SEV firmware status codes (psp-sev.h ``enum sev_ret_code``) --------------------------
class FirmwareStatus(enum.IntEnum):
    """Status codes a SEV firmware command returns."""

    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    INVALID_LEN = 0x04
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DFFLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWERROR_PLATFORM = 0x13
    HWERROR_UNSAFE = 0x14
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18
