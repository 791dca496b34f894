"""Agent pieces without a process: early-boot reset plan, command line, key pipe, launcher argv.

The agent as a real process is tested in tests/integration/test_agent.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from migd.abi import (
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_PAGE_SZ_2M,
    KVM_MAP_GPA_RANGE_PAGE_SZ_4K,
    PAGE_SIZE,
)
from migd.guest.agent import parse_options, read_key
from migd.guest.agent_launcher import AgentSpec
from migd.errors import ConfigError
from migd.guest.guest_layout import PFN_2M, GuestLayout
from migd.guest.guest_vcpu import early_reset_calls
from migd.platform.memory import VEK_SIZE
from migd.guest.workload import WorkloadConfig


@pytest.mark.parametrize(
    "firmware",
    [None, [(100 * PAGE_SIZE, 8)], [(1000 * PAGE_SIZE, 1), (3 * PFN_2M * PAGE_SIZE, 512)]],
    ids=["default", "low-range", "two-ranges"],
)
def test_early_reset_covers_ram_except_firmware_with_hints(firmware: list[tuple[int, int]] | None) -> None:
    npages = 4 * PFN_2M
    layout = GuestLayout.build(npages, firmware)
    calls = early_reset_calls(layout)
    covered = np.zeros(npages, dtype=np.int64)
    for gpa, count, attrs in calls:
        assert gpa % PAGE_SIZE == 0 and count > 0
        assert attrs & KVM_MAP_GPA_RANGE_ENCRYPTED
        hint = attrs & 0xF
        pfn = gpa // PAGE_SIZE
        if hint == KVM_MAP_GPA_RANGE_PAGE_SZ_2M:
            assert pfn % PFN_2M == 0 and count % PFN_2M == 0  # the 2M hint only where aligned
        else:
            assert hint == KVM_MAP_GPA_RANGE_PAGE_SZ_4K
        covered[pfn : pfn + count] += 1
    assert np.array_equal(covered, (~layout.firmware_mask()).astype(np.int64))  # exactly once, no firmware page
    assert len(calls) <= 3 * len(layout.ram_ranges())  # big ranges, not page by page
    assert any(attrs & 0xF == KVM_MAP_GPA_RANGE_PAGE_SZ_2M for _, _, attrs in calls)


def test_parse_options_round_trips_the_launcher_argv(tmp_path: Path) -> None:
    spec = AgentSpec(
        "g1", tmp_path / "s.sock", tmp_path / "ram", 4096, efi=True, incoming=True,
        firmware_shared=((0x100000, 8), (0x200000, 2)), workload=WorkloadConfig(1.5, 20.0, 99),
        unsafe_kexec_keep_msr=True,
    )
    options = parse_options(spec.argv(7))
    guest = options.guest
    assert (guest.name, options.socket_path, options.ram_path, guest.npages, options.key_fd) == (
        "g1", tmp_path / "s.sock", tmp_path / "ram", 4096, 7)
    assert guest.efi and guest.incoming and guest.unsafe_kexec_keep_msr
    assert guest.firmware_shared == ((0x100000, 8), (0x200000, 2))
    assert guest.workload == WorkloadConfig(1.5, 20.0, 99)
    plain = parse_options(AgentSpec("g2", Path("s"), Path("r"), 64).argv(3)).guest
    assert not (plain.efi or plain.incoming or plain.unsafe_kexec_keep_msr)
    assert plain.firmware_shared is None and plain.workload == WorkloadConfig()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        parse_options(["--name", "g"])  # missing the rest
    with pytest.raises(SystemExit):
        parse_options(AgentSpec("g", Path("s"), Path("r"), 64).argv(3) + ["--firmware-shared", "nonsense"])
    with pytest.raises(ConfigError, match="seed"):
        parse_options(AgentSpec("g", Path("s"), Path("r"), 64).argv(3) + ["--seed", "-4"])
    with pytest.raises(ConfigError, match="npages"):
        AgentSpec("g", Path("s"), Path("r"), 0)


def test_read_key_reads_to_eof_and_closes() -> None:
    key = bytes(range(VEK_SIZE))
    r, w = os.pipe()
    os.write(w, key)
    os.close(w)
    assert read_key(r) == key
    with pytest.raises(OSError):
        os.fstat(r)  # closed


@pytest.mark.parametrize("length", [0, VEK_SIZE - 1, VEK_SIZE + 1])
def test_read_key_rejects_wrong_length(length: int) -> None:
    r, w = os.pipe()
    os.write(w, b"k" * length)
    os.close(w)
    with pytest.raises(ConfigError, match=f"{VEK_SIZE}-byte VEK"):
        read_key(r)
