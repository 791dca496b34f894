"""Guest memory layout: regions, e820 RAM ranges, ledger addressing, boot-parameter page."""

from __future__ import annotations

import numpy as np
import pytest

from migd.abi import PAGE_SIZE
from migd.errors import GuestMemoryError
from migd.guest.guest_layout import (
    DECRYPTED_SECTION_PAGES,
    DEFAULT_FIRMWARE_SHARED_PAGES,
    LEDGER_ENTRIES_PER_PAGE,
    GpaRange,
    GuestLayout,
    KernelHeader,
)


def test_default_layout_regions_partition_ram() -> None:
    layout = GuestLayout.build(4096)
    assert layout.kernel == GpaRange(0, 1 + 4)  # boot params + 4 ledger pages (1024 entries each)
    assert layout.ledger == GpaRange(1, 4)
    assert layout.decrypted == GpaRange(5, DECRYPTED_SECTION_PAGES)
    assert layout.firmware_shared == (GpaRange(4096 - DEFAULT_FIRMWARE_SHARED_PAGES, DEFAULT_FIRMWARE_SHARED_PAGES),)
    owner = np.zeros(4096, dtype=np.int64)
    for index, rng in enumerate([layout.kernel, layout.decrypted, *layout.firmware_shared, *layout.data_ranges()]):
        owner[rng.pfn : rng.end] += 1 << index
    assert np.all(owner > 0) and np.all(owner & (owner - 1) == 0), "regions overlap or leave holes"
    assert layout.data_mask().sum() == 4096 - 5 - 4 - 16
    assert layout.firmware_mask().sum() == 16


def test_ram_ranges_exclude_only_firmware_ranges() -> None:
    layout = GuestLayout.build(2048, [(100 * PAGE_SIZE, 8), (1000 * PAGE_SIZE, 2)])
    assert layout.ram_ranges() == [GpaRange(0, 100), GpaRange(108, 892), GpaRange(1002, 1046)]
    assert layout.data_ranges()[0].pfn == layout.decrypted.end


def test_ledger_pages_of_a_run() -> None:
    layout = GuestLayout.build(8192)
    assert layout.ledger_pages_of(0, 1) == GpaRange(layout.ledger.pfn, 1)
    assert layout.ledger_pages_of(LEDGER_ENTRIES_PER_PAGE - 1, 2) == GpaRange(layout.ledger.pfn, 2)
    assert layout.ledger_pages_of(8191, 1) == GpaRange(layout.ledger.pfn + 7, 1)
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        layout.ledger_pages_of(8191, 2)


@pytest.mark.parametrize(
    ("npages", "firmware", "match"),
    [
        (4096, [(4090 * PAGE_SIZE, 16)], "outside guest RAM"),
        (4096, [(2 * PAGE_SIZE, 4)], "overlaps the kernel region"),
        (4096, [(100 * PAGE_SIZE, 8), (104 * PAGE_SIZE, 8)], "overlap"),
        (4096, [(100 * PAGE_SIZE + 1, 8)], "not page aligned"),
        (64, None, "data area needs at least"),
        (0, None, "at least one page"),
    ],
)
def test_bad_layouts_are_rejected(npages: int, firmware: list[tuple[int, int]] | None, match: str) -> None:
    with pytest.raises(GuestMemoryError, match=match):
        GuestLayout.build(npages, firmware)


def test_kernel_header_round_trip() -> None:
    layout = GuestLayout.build(4096, [(512 * PAGE_SIZE, 4), (4000 * PAGE_SIZE, 16)])
    page = KernelHeader(layout, seed=(1 << 64) - 1).encode()
    assert len(page) == PAGE_SIZE
    decoded = KernelHeader.decode(page)
    assert decoded.layout == layout and decoded.seed == (1 << 64) - 1


def test_kernel_header_rejects_garbage() -> None:
    good = KernelHeader(GuestLayout.build(4096), seed=1).encode()
    with pytest.raises(GuestMemoryError, match="magic"):
        KernelHeader.decode(bytes(PAGE_SIZE))
    with pytest.raises(GuestMemoryError, match="4096 bytes"):
        KernelHeader.decode(good[:100])
    tampered = bytearray(good)
    tampered[8] ^= 0xFF  # format
    with pytest.raises(GuestMemoryError, match="format"):
        KernelHeader.decode(bytes(tampered))
    tampered = bytearray(good)
    tampered[32] ^= 0x01  # ledger pfn
    with pytest.raises(GuestMemoryError, match="disagree"):
        KernelHeader.decode(bytes(tampered))
