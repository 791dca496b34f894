"""Host-side guest platform: MAP_GPA_RANGE, migration-control MSR, CPUID, UEFI variable."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migd.abi import (
    KVM_EINVAL,
    KVM_ENOSYS,
    KVM_EPERM,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_PAGE_SZ_1G,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
    KVM_MIGRATION_READY,
    MSR_KVM_MIGRATION_CONTROL,
    PAGE_SIZE,
    UEFI_SEV_LIVE_MIGRATION_GUID,
    UEFI_SEV_LIVE_MIGRATION_VAR,
)
from migd.bitmap import PageBitmap
from migd.guest.channel_codec import U64_MAX, request, validate_envelope
from migd.errors import ConfigError
from migd.guest.vm import GeneralProtectionFault, VmConfig, VmPlatform

NPAGES = (1 << 18) + 515  # a little over 1 GiB, not a multiple of 64
PRE_SHARED = (500, 200)  # pages [500, 700) shared before each table row: straddles a 2M boundary
ENC = KVM_MAP_GPA_RANGE_ENCRYPTED


def make_vm(**overrides: Any) -> VmPlatform:
    fields: dict[str, Any] = {"name": "vm0", "npages": NPAGES, "efi": False, "uefi_live_migration": None}
    fields.update(overrides)
    return VmPlatform(VmConfig(**fields))


def hypercall(vm: VmPlatform, nr: int, args: list[int], cpl: int = 0, msg_id: int = 1) -> dict:
    return vm.handle_guest_request(request(msg_id, "hypercall", nr=nr, args=args, cpl=cpl))


def bitmap_of(npages: int, *ranges: tuple[int, int]) -> PageBitmap:
    bitmap = PageBitmap(npages)
    for first, count in ranges:
        bitmap.set_range(first, count)
    return bitmap


# ---------------------------------------------------------------- MAP_GPA_RANGE table

# (nr, gpa, npages, attrs, cpl, config overrides, expected ret)
TABLE = [
    pytest.param(KVM_HC_MAP_GPA_RANGE, 0x5000, 3, 0, 0, {}, 0, id="ok 4K"),
    pytest.param(KVM_HC_MAP_GPA_RANGE, 512 * PAGE_SIZE, 512, ENC | KVM_MAP_GPA_RANGE_PAGE_SZ_2M, 0, {}, 0,
                 id="ok 2M hint"),
    pytest.param(KVM_HC_MAP_GPA_RANGE, 0, 1 << 18, KVM_MAP_GPA_RANGE_PAGE_SZ_1G, 0, {}, 0, id="ok 1G hint"),
    pytest.param(KVM_HC_MAP_GPA_RANGE, 0x5001, 1, 0, 0, {}, -KVM_EINVAL, id="unaligned gpa"),
    pytest.param(KVM_HC_MAP_GPA_RANGE, 0x5000, 0, 0, 0, {}, -KVM_EINVAL, id="npages 0"),
    pytest.param(KVM_HC_MAP_GPA_RANGE, 0x1000, U64_MAX, 0, 0, {}, -KVM_EINVAL, id="wrap-around"),
    pytest.param(KVM_HC_MAP_GPA_RANGE, (NPAGES - 1) * PAGE_SIZE, 2, 0, 0, {}, -KVM_EINVAL,
                 id="range past end of RAM"),
    pytest.param(KVM_HC_MAP_GPA_RANGE, 0x5000, 1, 1 << 5, 0, {}, -KVM_EINVAL, id="reserved attrs bit"),
    pytest.param(KVM_HC_MAP_GPA_RANGE, 0x5000, 1, 3, 0, {}, -KVM_EINVAL, id="bad size hint"),
    pytest.param(KVM_HC_MAP_GPA_RANGE, 0x5000, 1, 0, 3, {}, -KVM_EPERM, id="cpl 3 -> EPERM"),
    pytest.param(KVM_HC_MAP_GPA_RANGE, 0x5000, 1, 0, 0, {"cpuid_map_gpa_range": False}, -KVM_ENOSYS,
                 id="feature disabled -> ENOSYS"),
    pytest.param(13, 0x5000, 1, 0, 0, {}, -KVM_ENOSYS, id="unknown nr -> ENOSYS"),
]
RESULT_NAME = {0: "ok", -KVM_ENOSYS: "enosys", -KVM_EINVAL: "einval", -KVM_EPERM: "eperm"}


@pytest.mark.parametrize("nr, gpa, npages, attrs, cpl, overrides, expected", TABLE)
def test_map_gpa_range_table(nr: int, gpa: int, npages: int, attrs: int, cpl: int,
                             overrides: dict[str, Any], expected: int) -> None:
    vm = make_vm(**overrides)
    vm.shared_bitmap.set_range(*PRE_SHARED)
    before = vm.shared_bitmap.copy()

    rsp = hypercall(vm, nr, [gpa, npages, attrs], cpl, msg_id=77)

    assert rsp == {"t": "rsp", "id": 77, "ok": True, "ret": expected}
    assert vm.hypercall_counts[RESULT_NAME[expected]] == 1
    assert sum(vm.hypercall_counts.values()) == 1
    if expected != 0:
        assert vm.shared_bitmap == before
        assert vm.state_change_log.count() == 0
        return
    gfn = gpa // PAGE_SIZE
    shared = not attrs & ENC
    expected_bitmap = before.copy()
    expected_bitmap.assign_range(gfn, npages, shared)
    assert vm.shared_bitmap == expected_bitmap
    # exactly the pages whose state flipped are in the state-change log
    changed = (before.copy() | expected_bitmap).difference(before & expected_bitmap)
    assert vm.state_change_log == changed
    assert vm.state_change_log.count() > 0  # every ok row flips something (guards the check above)


def test_table_ok_rows_change_expected_counts() -> None:
    """Pin the concrete numbers behind the generic ok-row checks."""
    vm = make_vm()
    vm.shared_bitmap.set_range(*PRE_SHARED)
    assert vm.map_gpa_range(512 * PAGE_SIZE, 512, ENC | KVM_MAP_GPA_RANGE_PAGE_SZ_2M) == 0
    assert vm.state_change_log.extents() == [(512, 188)]  # [512, 700) were shared, now private
    assert vm.shared_bitmap.extents() == [(500, 12)]


def test_last_page_is_inside_ram() -> None:
    """Negative control of the past-end row: the last page alone is valid."""
    vm = make_vm()
    assert vm.map_gpa_range((NPAGES - 1) * PAGE_SIZE, 1, 0) == 0
    assert vm.shared_bitmap.extents() == [(NPAGES - 1, 1)]


def test_largest_non_wrapping_range_is_only_outside_ram() -> None:
    vm = make_vm()
    # gfn + npages == 2**64 - 1: no wrap, still past RAM
    assert vm.map_gpa_range(0x1000, U64_MAX - 1, 0) == -KVM_EINVAL
    assert vm.shared_bitmap.count() == 0


@pytest.mark.parametrize("attrs", [1 << 63, 1 << 5 | ENC, (1 << 64) - 1, 0xF], ids=hex)
def test_more_bad_attrs(attrs: int) -> None:
    vm = make_vm()
    assert vm.map_gpa_range(0, 1, attrs) == -KVM_EINVAL
    assert vm.shared_bitmap.count() == 0


def test_size_hint_needs_no_alignment() -> None:
    vm = make_vm()
    assert vm.map_gpa_range(3 * PAGE_SIZE, 5, KVM_MAP_GPA_RANGE_PAGE_SZ_1G) == 0
    assert vm.shared_bitmap.extents() == [(3, 5)]


def test_cpl_checked_before_the_number() -> None:
    """KVM checks the CPL first: an unknown hypercall from CPL 3 is EPERM, not ENOSYS."""
    vm = make_vm(cpuid_map_gpa_range=False)
    assert vm.hypercall(99, [0, 0, 0], cpl=3) == -KVM_EPERM
    assert vm.hypercall(99, [0, 0, 0], cpl=0) == -KVM_ENOSYS


def test_state_change_log_marks_only_changed_pages() -> None:
    vm = make_vm()
    assert vm.map_gpa_range(10 * PAGE_SIZE, 10, 0) == 0
    assert vm.state_change_log.fetch_and_clear().extents() == [(10, 10)]
    # same state again: nothing changes, nothing is logged
    assert vm.map_gpa_range(10 * PAGE_SIZE, 10, 0) == 0
    assert vm.state_change_log.count() == 0
    # overlap: [15, 25) shared -> only [20, 25) change
    assert vm.map_gpa_range(15 * PAGE_SIZE, 10, 0) == 0
    assert vm.state_change_log.fetch_and_clear().extents() == [(20, 5)]
    # back to private across the whole area: [10, 25) change, [0, 10) and [25, 40) do not
    assert vm.map_gpa_range(0, 40, ENC) == 0
    assert vm.state_change_log.extents() == [(10, 15)]
    assert vm.shared_bitmap.count() == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 299), st.integers(1, 80), st.booleans()), max_size=12))
def test_map_gpa_range_matches_reference_model(ops: list[tuple[int, int, bool]]) -> None:
    npages = 300
    vm = make_vm(npages=npages)
    shared = np.zeros(npages, dtype=bool)
    log = np.zeros(npages, dtype=bool)
    for first, count, make_shared in ops:
        ret = vm.map_gpa_range(first * PAGE_SIZE, count, 0 if make_shared else ENC)
        if first + count > npages:
            assert ret == -KVM_EINVAL
            continue
        assert ret == 0
        window = slice(first, first + count)
        log[window] |= shared[window] != make_shared
        shared[window] = make_shared
    assert vm.shared_bitmap == PageBitmap.from_bytes(npages, np.packbits(shared, bitorder="little").tobytes())
    assert vm.state_change_log == PageBitmap.from_bytes(npages, np.packbits(log, bitorder="little").tobytes())


@pytest.mark.parametrize("args", [(-1, 1, 0), (0, 1 << 64, 0), (0, 1, True)], ids=["negative", "too-big", "bool"])
def test_map_gpa_range_rejects_non_register_values(args: tuple[int, int, int]) -> None:
    with pytest.raises(ValueError, match="u64"):
        make_vm().map_gpa_range(*args)


# ---------------------------------------------------------------- migration-control MSR


def test_msr_reads_zero_then_ready_then_zero() -> None:
    vm = make_vm()
    changes: list[tuple[int, int]] = []
    vm.on_migration_control_change = lambda old, new: changes.append((old, new))
    assert vm.rdmsr(MSR_KVM_MIGRATION_CONTROL) == 0
    assert not vm.migration_ready
    vm.wrmsr(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)
    assert vm.rdmsr(MSR_KVM_MIGRATION_CONTROL) == KVM_MIGRATION_READY
    assert vm.migration_ready
    vm.wrmsr(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)  # no change: no callback
    vm.wrmsr(MSR_KVM_MIGRATION_CONTROL, 0)
    assert not vm.migration_ready
    assert changes == [(0, KVM_MIGRATION_READY), (KVM_MIGRATION_READY, 0)]


@pytest.mark.parametrize("value", [2, 3, 1 << 63, U64_MAX], ids=hex)
def test_msr_other_values_gp(value: int) -> None:
    vm = make_vm()
    vm.wrmsr(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)
    with pytest.raises(GeneralProtectionFault, match="expected 0 or 1"):
        vm.wrmsr(MSR_KVM_MIGRATION_CONTROL, value)
    assert vm.msr_migration_control == KVM_MIGRATION_READY
    assert vm.gp_faults == 1


def test_unknown_msr_gp() -> None:
    vm = make_vm()
    with pytest.raises(GeneralProtectionFault):
        vm.rdmsr(MSR_KVM_MIGRATION_CONTROL + 1)
    with pytest.raises(GeneralProtectionFault):
        vm.wrmsr(0x10, 0)
    assert vm.gp_faults == 2


def test_msr_feature_off_gp() -> None:
    vm = make_vm(cpuid_migration_control=False)
    with pytest.raises(GeneralProtectionFault):
        vm.rdmsr(MSR_KVM_MIGRATION_CONTROL)
    with pytest.raises(GeneralProtectionFault):
        vm.wrmsr(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)
    assert vm.msr_migration_control == 0
    assert not vm.migration_ready


def test_vcpu_reset_zeroes_msr_and_notifies() -> None:
    vm = make_vm()
    changes: list[tuple[int, int]] = []
    vm.on_migration_control_change = lambda old, new: changes.append((old, new))
    vm.vcpu_reset()  # already 0: no notification
    assert changes == []
    vm.wrmsr(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)
    vm.shared_bitmap.set_range(3, 4)
    vm.vcpu_reset()
    assert vm.msr_migration_control == 0
    assert changes == [(0, 1), (1, 0)]
    # a reset leaves the (now stale) bitmap alone: the guest's early boot resets it
    assert vm.shared_bitmap.extents() == [(3, 4)]


def test_msr_through_channel_requests() -> None:
    vm = make_vm()
    ok = vm.handle_guest_request(request(1, "wrmsr", msr=MSR_KVM_MIGRATION_CONTROL, value=1))
    assert ok == {"t": "rsp", "id": 1, "ok": True}
    assert vm.handle_guest_request(request(2, "rdmsr", msr=MSR_KVM_MIGRATION_CONTROL)) == {
        "t": "rsp", "id": 2, "ok": True, "value": 1}
    gp = vm.handle_guest_request(request(3, "wrmsr", msr=MSR_KVM_MIGRATION_CONTROL, value=2))
    assert gp["ok"] is False and gp["fault"] == "GP" and gp["id"] == 3
    gp = vm.handle_guest_request(request(4, "rdmsr", msr=0x10))
    assert gp["ok"] is False and gp["fault"] == "GP"
    assert vm.msr_migration_control == 1


# ---------------------------------------------------------------- CPUID


def test_cpuid_signature() -> None:
    eax, ebx, ecx, edx = make_vm().cpuid(0x40000000, 0)
    assert eax == 0x40000001
    assert b"".join(r.to_bytes(4, "little") for r in (ebx, ecx, edx)) == b"KVMKVMKVM\0\0\0"


@pytest.mark.parametrize("map_gpa, control, eax", [(True, True, 0x30000), (True, False, 0x10000),
                                                   (False, True, 0x20000), (False, False, 0)])
def test_cpuid_feature_bits(map_gpa: bool, control: bool, eax: int) -> None:
    vm = make_vm(cpuid_map_gpa_range=map_gpa, cpuid_migration_control=control)
    assert vm.cpuid(0x40000001, 0) == (eax, 0, 0, 0)
    rsp = vm.handle_guest_request(request(5, "cpuid", leaf=0x40000001, subleaf=0))
    assert rsp == {"t": "rsp", "id": 5, "ok": True, "eax": eax, "ebx": 0, "ecx": 0, "edx": 0}


@pytest.mark.parametrize("leaf", [0, 1, 0x40000002, 0x80000000, 0xFFFFFFFF], ids=hex)
def test_cpuid_other_leaves_zero(leaf: int) -> None:
    assert make_vm().cpuid(leaf, 0) == (0, 0, 0, 0)


# ---------------------------------------------------------------- UEFI variable


@pytest.mark.parametrize(
    "efi, value, expected",
    [(True, True, (True, True)), (True, False, (True, False)), (True, None, (False, None)),
     (False, True, (False, None))],
    ids=["true", "false", "absent", "non-EFI"],
)
def test_uefi_variable(efi: bool, value: bool | None, expected: tuple[bool, bool | None]) -> None:
    vm = make_vm(efi=efi, uefi_live_migration=value)
    assert vm.uefi_get_variable(UEFI_SEV_LIVE_MIGRATION_VAR, UEFI_SEV_LIVE_MIGRATION_GUID) == expected
    rsp = vm.handle_guest_request(request(6, "uefi_get_variable", name=UEFI_SEV_LIVE_MIGRATION_VAR,
                                          guid=UEFI_SEV_LIVE_MIGRATION_GUID.upper()))
    assert (rsp["found"], rsp["value"]) == expected


def test_uefi_other_variable_not_found() -> None:
    vm = make_vm(efi=True, uefi_live_migration=True)
    assert vm.uefi_get_variable("SevLiveMigrationEnabledX", UEFI_SEV_LIVE_MIGRATION_GUID) == (False, None)
    assert vm.uefi_get_variable(UEFI_SEV_LIVE_MIGRATION_VAR, "00000000-0000-0000-0000-000000000000") == (False, None)


# ---------------------------------------------------------------- bad guest input


BAD_REQUESTS = [
    pytest.param(request(1, "hypercall", nr=12, cpl=0), "missing field 'args'", id="no-args"),
    pytest.param(request(1, "hypercall", nr=12, args=[0, 1]), "expected 3 elements", id="two-args"),
    pytest.param(request(1, "hypercall", nr=12, args=[0, "1", 0]), r"'args'\[1\]", id="str-arg"),
    pytest.param(request(1, "hypercall", nr=12, args=[0, 1 << 64, 0]), r"'args'\[1\]", id="arg-too-big"),
    pytest.param(request(1, "hypercall", nr=-1, args=[0, 1, 0]), "'nr'", id="negative-nr"),
    pytest.param(request(1, "hypercall", nr=12, args=[0, 1, 0], cpl=4), "'cpl'", id="cpl-4"),
    pytest.param(request(1, "hypercall", nr=12, args=None), "expected a list", id="args-nil"),
    pytest.param(request(1, "rdmsr", msr="0x4b564d08"), "'msr'", id="str-msr"),
    pytest.param(request(1, "wrmsr", msr=MSR_KVM_MIGRATION_CONTROL), "missing field 'value'", id="wrmsr-no-value"),
    pytest.param(request(1, "cpuid", leaf=1 << 32, subleaf=0), "'leaf'", id="leaf-too-big"),
    pytest.param(request(1, "uefi_get_variable", name=5, guid="x"), "'name'", id="int-name"),
    pytest.param(request(1, "uefi_get_variable", name="x" * 300, guid="x"), "at most 256", id="long-name"),
    pytest.param(request(1, "fly"), "unknown op 'fly'", id="unknown-op"),
    pytest.param(request(1, "hello", name="vm0"), "unknown op 'hello'", id="hello-not-platform"),
    pytest.param({"t": "rsp", "id": 1, "ok": True}, "t='req'", id="a-response"),
    pytest.param({"t": "req", "id": -5, "op": "cpuid"}, "'id'", id="bad-id"),
]


@pytest.mark.parametrize("msg, match", BAD_REQUESTS)
def test_bad_requests_get_error_responses(msg: dict, match: str) -> None:
    vm = make_vm()
    rsp = vm.handle_guest_request(msg)
    assert rsp["ok"] is False
    assert "fault" not in rsp
    assert re.search(match, rsp["error"]), rsp["error"]
    assert validate_envelope(rsp) is rsp
    assert vm.bad_requests == 1
    assert vm.shared_bitmap.count() == 0 and vm.msr_migration_control == 0


def test_bad_request_id_falls_back_to_zero() -> None:
    rsp = make_vm().handle_guest_request({"t": "req", "id": "x", "op": "cpuid"})
    assert rsp["id"] == 0 and rsp["ok"] is False


_junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=6) | st.binary(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=10,
)
_keys = st.sampled_from(["t", "id", "op", "nr", "args", "cpl", "msr", "value", "leaf", "subleaf", "name", "guid"])


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries({"t": st.just("req"), "id": st.integers(0, 10),
                           "op": st.sampled_from(["hypercall", "rdmsr", "wrmsr", "cpuid", "uefi_get_variable", "x"])}),
    st.dictionaries(_keys, _junk | st.lists(st.integers(-1, 1 << 65), max_size=4), max_size=6),
)
def test_handle_guest_request_never_raises(base: dict, extra: dict) -> None:
    vm = make_vm(npages=1024, efi=True, uefi_live_migration=True)
    msg = {**base, **extra}
    rsp = vm.handle_guest_request(msg)
    assert validate_envelope(rsp) is rsp
    assert rsp["t"] == "rsp"


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("overrides", [{"npages": 0}, {"npages": -1}, {"npages": True}, {"npages": 1 << 52},
                                       {"name": ""}], ids=["zero", "negative", "bool", "huge", "no-name"])
def test_vm_config_validation(overrides: dict[str, Any]) -> None:
    base = VmConfig(name="vm0", npages=16, efi=False, uefi_live_migration=None)
    with pytest.raises(ConfigError):
        dataclasses.replace(base, **overrides)


def test_new_vm_is_all_private() -> None:
    vm = make_vm()
    assert vm.shared_bitmap.npages == NPAGES and vm.shared_bitmap.count() == 0
    assert vm.state_change_log.count() == 0
    assert vm.msr_migration_control == 0
