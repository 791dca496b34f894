"""The guest's physical memory layout (its "e820 map") and the kernel boot-parameter page.

Layout of guest RAM, low to high (page frame numbers):

* **kernel** region (private, from pfn 0): one boot-parameter page (this module's
  :class:`KernelHeader`: layout and workload seed) followed by the **ledger**: one u32 per
  guest page — bit 31 is the guest's own view of the page (set = shared, i.e. the C-bit is
  clear in its page tables), bits 30:0 the number of times the guest wrote it. The ledger lives
  in guest RAM so it migrates with memory and the destination can check itself.
* **decrypted section** (:data:`DECRYPTED_SECTION_PAGES` pages): marked shared by the kernel
  at every boot, like Linux's ``__bss_decrypted``.
* **firmware shared ranges**: made shared by the firmware (OVMF) with ``MAP_GPA_RANGE`` before
  the kernel runs, on first boot. They are not RAM in the e820 sense, so the kernel's early-boot
  reset skips them and they survive kexec and reboot. Default: the top
  :data:`DEFAULT_FIRMWARE_SHARED_PAGES` pages.
* **data** area: every other page; the workload writes and converts these.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from migd.abi import PAGE_SHIFT, PAGE_SIZE
from migd.errors import GuestMemoryError

KERNEL_HEADER_PAGES = 1
DECRYPTED_SECTION_PAGES = 4
DEFAULT_FIRMWARE_SHARED_PAGES = 16
MIN_DATA_PAGES = 64
MAX_FIRMWARE_RANGES = 64

LEDGER_SHARED = 1 << 31
LEDGER_VERSION_MASK = LEDGER_SHARED - 1
LEDGER_ENTRY_SIZE = 4
LEDGER_ENTRIES_PER_PAGE = PAGE_SIZE // LEDGER_ENTRY_SIZE

KERNEL_MAGIC = b"MIGDKERN"
KERNEL_FORMAT = 1
_HEADER_FIXED = struct.Struct("<8sIIQQQQQQI")  # magic, format, pad, npages, seed, ledger, decrypted, n_fw
_HEADER_RANGE = struct.Struct("<QQ")

PFN_2M = (2 << 20) >> PAGE_SHIFT


@dataclass(frozen=True, order=True)
class GpaRange:
    """A run of ``npages`` guest pages starting at page frame ``pfn``."""

    pfn: int
    npages: int

    def __post_init__(self) -> None:
        if self.pfn < 0 or self.npages <= 0:
            raise GuestMemoryError(f"a range needs pfn >= 0 and npages > 0, got pfn={self.pfn} npages={self.npages}")

    @property
    def gpa(self) -> int:
        """Guest-physical address of the first page."""
        return self.pfn << PAGE_SHIFT

    @property
    def end(self) -> int:
        """One past the last page frame."""
        return self.pfn + self.npages

    def overlaps(self, other: GpaRange) -> bool:
        """Whether the two ranges share a page."""
        return self.pfn < other.end and other.pfn < self.end


def _subtract(whole: GpaRange, holes: Iterable[GpaRange]) -> list[GpaRange]:
    out: list[GpaRange] = []
    cursor = whole.pfn
    for hole in sorted(holes):
        if hole.end <= cursor or hole.pfn >= whole.end:
            continue
        if hole.pfn > cursor:
            out.append(GpaRange(cursor, hole.pfn - cursor))
        cursor = max(cursor, hole.end)
    if cursor < whole.end:
        out.append(GpaRange(cursor, whole.end - cursor))
    return out


def ledger_npages(npages: int) -> int:
    """Pages the ledger of an ``npages`` guest takes."""
    return -(-npages // LEDGER_ENTRIES_PER_PAGE)


@dataclass(frozen=True)
class GuestLayout:
    """Where the kernel, its ledger, the decrypted section, firmware ranges and data live."""

    npages: int
    firmware_shared: tuple[GpaRange, ...]
    kernel: GpaRange = field(init=False)
    ledger: GpaRange = field(init=False)
    decrypted: GpaRange = field(init=False)

    def __post_init__(self) -> None:
        if self.npages <= 0:
            raise GuestMemoryError(f"a guest needs at least one page, got {self.npages}")
        nledger = ledger_npages(self.npages)
        object.__setattr__(self, "kernel", GpaRange(0, KERNEL_HEADER_PAGES + nledger))
        object.__setattr__(self, "ledger", GpaRange(KERNEL_HEADER_PAGES, nledger))
        object.__setattr__(self, "decrypted", GpaRange(self.kernel.end, DECRYPTED_SECTION_PAGES))
        if len(self.firmware_shared) > MAX_FIRMWARE_RANGES:
            raise GuestMemoryError(f"at most {MAX_FIRMWARE_RANGES} firmware ranges, got {len(self.firmware_shared)}")
        ordered = sorted(self.firmware_shared)
        for rng in ordered:
            if rng.end > self.npages:
                raise GuestMemoryError(
                    f"firmware range pfn {rng.pfn}+{rng.npages} is outside guest RAM ({self.npages} pages)"
                )
            if rng.pfn < self.decrypted.end:
                raise GuestMemoryError(
                    f"firmware range pfn {rng.pfn}+{rng.npages} overlaps the kernel region or decrypted section "
                    f"(pfns 0..{self.decrypted.end - 1})"
                )
        for a, b in zip(ordered, ordered[1:]):
            if a.overlaps(b):
                raise GuestMemoryError(f"firmware ranges {a} and {b} overlap")
        object.__setattr__(self, "firmware_shared", tuple(ordered))
        data = sum(r.npages for r in self.data_ranges())
        if data < MIN_DATA_PAGES:
            raise GuestMemoryError(f"the data area needs at least {MIN_DATA_PAGES} pages, this layout leaves {data}")

    @classmethod
    def build(cls, npages: int, firmware_shared: Sequence[tuple[int, int]] | None = None) -> GuestLayout:
        """Layout of an ``npages`` guest; ``firmware_shared`` is a list of (gpa, npages), default the top pages."""
        if npages <= 0:
            raise GuestMemoryError(f"a guest needs at least one page, got {npages}")
        if firmware_shared is None:
            if npages <= DEFAULT_FIRMWARE_SHARED_PAGES:
                raise GuestMemoryError(
                    f"the data area needs at least {MIN_DATA_PAGES} pages, a {npages}-page guest has none"
                )
            ranges = (GpaRange(npages - DEFAULT_FIRMWARE_SHARED_PAGES, DEFAULT_FIRMWARE_SHARED_PAGES),)
        else:
            items = []
            for gpa, count in firmware_shared:
                if gpa % PAGE_SIZE:
                    raise GuestMemoryError(f"firmware range gpa {gpa:#x} is not page aligned")
                items.append(GpaRange(gpa >> PAGE_SHIFT, count))
            ranges = tuple(items)
        return cls(npages, ranges)

    def ram_ranges(self) -> list[GpaRange]:
        """The e820 RAM ranges: all of memory but the firmware ranges (early-boot reset covers these)."""
        return _subtract(GpaRange(0, self.npages), self.firmware_shared)

    def data_ranges(self) -> list[GpaRange]:
        """The workload's data area: RAM minus the kernel region and the decrypted section."""
        return _subtract(GpaRange(0, self.npages), [self.kernel, self.decrypted, *self.firmware_shared])

    def data_mask(self) -> npt.NDArray[np.bool_]:
        """One bool per guest page: is it in the data area?"""
        mask = np.zeros(self.npages, dtype=bool)
        for rng in self.data_ranges():
            mask[rng.pfn : rng.end] = True
        return mask

    def firmware_mask(self) -> npt.NDArray[np.bool_]:
        """One bool per guest page: is it in a firmware shared range?"""
        mask = np.zeros(self.npages, dtype=bool)
        for rng in self.firmware_shared:
            mask[rng.pfn : rng.end] = True
        return mask

    def ledger_pages_of(self, pfn: int, npages: int) -> GpaRange:
        """The ledger pages holding the entries of guest pages ``pfn .. pfn+npages-1``."""
        if pfn < 0 or npages <= 0 or pfn + npages > self.npages:
            raise GuestMemoryError(f"pages {pfn}+{npages} are outside guest RAM ({self.npages} pages)")
        first = pfn // LEDGER_ENTRIES_PER_PAGE
        last = (pfn + npages - 1) // LEDGER_ENTRIES_PER_PAGE
        return GpaRange(self.ledger.pfn + first, last - first + 1)


@dataclass(frozen=True)
class KernelHeader:
    """The kernel's boot-parameter page: the layout and the workload seed (private, pfn 0)."""

    layout: GuestLayout
    seed: int

    def encode(self) -> bytes:
        """The page content (exactly PAGE_SIZE bytes)."""
        lay = self.layout
        parts = [
            _HEADER_FIXED.pack(
                KERNEL_MAGIC,
                KERNEL_FORMAT,
                0,
                lay.npages,
                self.seed,
                lay.ledger.pfn,
                lay.ledger.npages,
                lay.decrypted.pfn,
                lay.decrypted.npages,
                len(lay.firmware_shared),
            )
        ]
        parts.extend(_HEADER_RANGE.pack(r.pfn, r.npages) for r in lay.firmware_shared)
        body = b"".join(parts)
        return body + bytes(PAGE_SIZE - len(body))

    @classmethod
    def decode(cls, page: bytes | memoryview) -> KernelHeader:
        """Parse a boot-parameter page; GuestMemoryError if it is not one (wrong key, corrupted)."""
        if len(page) != PAGE_SIZE:
            raise GuestMemoryError(f"a kernel header page is {PAGE_SIZE} bytes, got {len(page)}")
        magic, fmt, _pad, npages, seed, lpfn, lnp, dpfn, dnp, nfw = _HEADER_FIXED.unpack_from(page, 0)
        if magic != KERNEL_MAGIC:
            raise GuestMemoryError(f"kernel header magic is {bytes(magic)!r}, expected {KERNEL_MAGIC!r}")
        if fmt != KERNEL_FORMAT:
            raise GuestMemoryError(f"kernel header format {fmt}, expected {KERNEL_FORMAT}")
        if nfw > MAX_FIRMWARE_RANGES:
            raise GuestMemoryError(f"kernel header lists {nfw} firmware ranges, at most {MAX_FIRMWARE_RANGES}")
        ranges = tuple(
            GpaRange(*_HEADER_RANGE.unpack_from(page, _HEADER_FIXED.size + i * _HEADER_RANGE.size))
            for i in range(nfw)
        )
        layout = GuestLayout(npages, ranges)
        if (layout.ledger.pfn, layout.ledger.npages, layout.decrypted.pfn, layout.decrypted.npages) != (
            lpfn,
            lnp,
            dpfn,
            dnp,
        ):
            raise GuestMemoryError("kernel header ledger/decrypted-section fields disagree with its npages")
        return cls(layout, seed)
