"""The guest kernel's memory (C-bit routing, ledger, dirty log) and the workload that exercises it.

:class:`GuestMemory` is everything a write by the guest goes through:

* the **routing**: a page the guest views as private is written through the memory-encryption
  engine (the agent holds the VEK: it is the CPU key slot), a shared page raw;
* the **ledger** (:mod:`migd.guest.guest_layout`): the guest's view and version of every page, kept
  in process and written through to the private kernel region in guest RAM on every change,
  so it migrates with memory and a destination can check itself;
* the **dirty log**: every page the guest writes is marked *before* it is written, in the same
  synchronous section (no ``await`` between mark and write), so a ``fetch_dirty`` handled by
  the single-threaded agent between two callbacks never loses a write — the ordering KVM gets
  from write-protecting pages before the guest can write them.

:class:`Workload` writes runs of data pages at ``dirty_rate_mib_s`` and converts runs of data
pages between private and shared at ``convert_rate_hz``, in the order Linux
``__set_memory_enc_pgtable`` uses: change the page tables (own view), then notify the host
(``KVM_HC_MAP_GPA_RANGE`` via ``notify_page_enc_status_changed``), then use the pages with the
new routing. Every random choice comes from one seeded ``numpy`` PCG64 generator whose state
travels with the vCPU state, and time is passed in (``now``), so tests drive it without clocks.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from migd.abi import PAGE_SHIFT, PAGE_SIZE, MiB
from migd.bitmap import PageBitmap
from migd.errors import ConfigError, GuestMemoryError
from migd.guest.guest_layout import (
    LEDGER_ENTRIES_PER_PAGE,
    LEDGER_SHARED,
    LEDGER_VERSION_MASK,
    GpaRange,
    GuestLayout,
    KernelHeader,
)
from migd.platform.memory import GuestRam, MemoryEncryption
from migd.guest.page_content import MAX_SEED, MAX_VERSION, PageContent, PageKind
from migd.guest.selfcheck import ledger_digest, read_kernel_header, read_ledger

MAX_WRITE_RUN_PAGES = 256  # 1 MiB per step: one bulk encrypt, a few ms; keeps pause latency low
MAX_CONVERT_RUN_PAGES = 16
MAX_BURST_SECONDS = 0.1  # write budget carried over at most this long (after a pause or a stall)
#: WorkloadConfig's times in seconds (guest-initiated reboot/kexec, boot time): finite, >= 0.
TIMED_KEYS = ("kexec_after_s", "reboot_after_s", "boot_time_s")

#: ``notify(pfn, npages, shared)``: tell the host about a private/shared change (MAP_GPA_RANGE).
Notify = Callable[[int, int, bool], Awaitable[None]]


def _runs(flags: npt.NDArray[np.bool_]) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal values: (offset, length, value), vectorized edge detection."""
    if flags.size == 0:
        return []
    edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [flags.size]))
    return [(int(s), int(e - s), bool(flags[s])) for s, e in zip(starts, ends)]


class GuestMemory:
    """The guest's memory as its kernel sees and writes it (see module docstring)."""

    def __init__(
        self,
        ram: GuestRam,
        engine: MemoryEncryption,
        header: KernelHeader,
        ledger: npt.NDArray[np.uint32],
        dirty_log: PageBitmap,
    ) -> None:
        layout = header.layout
        if ram.npages != layout.npages or dirty_log.npages != layout.npages:
            raise GuestMemoryError(
                f"RAM ({ram.npages} pages), dirty log ({dirty_log.npages}) and layout ({layout.npages}) disagree"
            )
        if ledger.shape != (layout.npages,) or ledger.dtype != np.uint32:
            raise GuestMemoryError(f"ledger must be {layout.npages} u32 entries, got {ledger.dtype} {ledger.shape}")
        self.ram = ram
        self.engine = engine
        self.header = header
        self.layout = layout
        self.ledger = ledger
        self.dirty_log = dirty_log
        self.content = PageContent(header.seed)
        self.pages_written = 0

    @classmethod
    def format(
        cls, ram: GuestRam, engine: MemoryEncryption, layout: GuestLayout, seed: int, dirty_log: PageBitmap
    ) -> GuestMemory:
        """First boot: write the boot-parameter page and an all-private, never-written ledger."""
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"workload seed must be a u64, got {seed}")
        memory = cls(ram, engine, KernelHeader(layout, seed), np.zeros(layout.npages, dtype=np.uint32), dirty_log)
        dirty_log.set_range(layout.kernel.pfn, layout.kernel.npages)
        engine.write_private(ram, 0, memory.header.encode())
        memory._write_ledger_pages(layout.ledger.pfn, layout.ledger.npages, mark=False)
        return memory

    @classmethod
    def load(cls, ram: GuestRam, engine: MemoryEncryption, dirty_log: PageBitmap) -> GuestMemory:
        """A resumed guest (destination): boot parameters and ledger as they are in guest RAM."""
        header = read_kernel_header(ram, engine)
        return cls(ram, engine, header, read_ledger(ram, engine, header.layout), dirty_log)

    # ------------------------------------------------------------------ ledger

    def shared_view(self, pfn: int, npages: int) -> npt.NDArray[np.bool_]:
        """The guest's own view (True = shared) of pages ``pfn .. pfn+npages-1``."""
        self._check(pfn, npages)
        return (self.ledger[pfn : pfn + npages] & np.uint32(LEDGER_SHARED)) != 0

    def versions(self, pfn: int, npages: int) -> npt.NDArray[np.uint32]:
        """How often the guest wrote each page of the range."""
        self._check(pfn, npages)
        return self.ledger[pfn : pfn + npages] & np.uint32(LEDGER_VERSION_MASK)

    def ledger_digest(self) -> bytes:
        """SHA-256 of the ledger (what the destination checks the migrated ledger against)."""
        return ledger_digest(self.ledger)

    def counts(self) -> dict[str, int]:
        """Pages the guest views as private / shared (all of RAM)."""
        shared = int(np.count_nonzero(self.ledger & np.uint32(LEDGER_SHARED)))
        return {"private": self.layout.npages - shared, "shared": shared}

    def _check(self, pfn: int, npages: int) -> None:
        if pfn < 0 or npages <= 0 or pfn + npages > self.layout.npages:
            raise GuestMemoryError(f"pages {pfn}+{npages} are outside guest RAM ({self.layout.npages} pages)")
        if pfn < self.layout.kernel.end:
            raise GuestMemoryError(f"pages {pfn}+{npages} overlap the kernel region (pfns < {self.layout.kernel.end})")

    def _write_ledger_pages(self, pfn: int, npages: int, *, mark: bool = True) -> None:
        """Write through the ledger pages holding the entries of pages ``pfn..pfn+npages-1``."""
        pages = self.layout.ledger_pages_of(pfn, npages)
        first_entry = (pages.pfn - self.layout.ledger.pfn) * LEDGER_ENTRIES_PER_PAGE
        plain = np.zeros(pages.npages * LEDGER_ENTRIES_PER_PAGE, dtype="<u4")
        entries = self.ledger[first_entry : first_entry + plain.size]
        plain[: entries.size] = entries
        if mark:
            self.dirty_log.set_range(pages.pfn, pages.npages)
        self.engine.write_private(self.ram, pages.gpa, plain.view(np.uint8))

    def set_view(self, pfn: int, npages: int, shared: bool) -> None:
        """Change the guest's page tables (C-bit) for a run; the ledger page is written through."""
        self._check(pfn, npages)
        entries = self.ledger[pfn : pfn + npages]
        if shared:
            entries |= np.uint32(LEDGER_SHARED)
        else:
            entries &= np.uint32(LEDGER_VERSION_MASK)
        self._write_ledger_pages(pfn, npages)

    # ------------------------------------------------------------------ writes

    def write_pages(self, pfn: int, npages: int) -> None:
        """Write a new version of every page of a run, each with the routing of the guest's view.

        Synchronous on purpose: mark dirty, write data, write the ledger through, with no
        suspension point in between (see module docstring).
        """
        self._check(pfn, npages)
        entries = self.ledger[pfn : pfn + npages]
        versions = entries & np.uint32(LEDGER_VERSION_MASK)
        if int(versions.max()) >= MAX_VERSION:
            raise GuestMemoryError(f"a page of run {pfn}+{npages} reached the maximum version {MAX_VERSION}")
        shared = (entries & np.uint32(LEDGER_SHARED)) != 0
        new_versions = versions + np.uint32(1)
        kinds = np.where(shared, np.uint32(PageKind.SHARED), np.uint32(PageKind.PRIVATE))
        data = self.content.generate_run(pfn << PAGE_SHIFT, new_versions, kinds)
        entries[:] = new_versions | (entries & np.uint32(LEDGER_SHARED))
        self.dirty_log.set_range(pfn, npages)
        for offset, count, is_shared in _runs(shared):
            chunk = data[offset : offset + count].reshape(-1)
            gpa = (pfn + offset) << PAGE_SHIFT
            if is_shared:
                self.ram.write(gpa, chunk)
            else:
                self.engine.write_private(self.ram, gpa, chunk)
        self._write_ledger_pages(pfn, npages)
        self.pages_written += npages

    def reuse_shared_as_private(self, ranges: list[GpaRange]) -> int:
        """A new kernel's first use of memory: pages it finds shared become private, rewritten.

        This is what happens right after kexec, before the early-boot reset hypercall: the
        new kernel's page tables map all RAM encrypted and it writes pages the old kernel had
        shared. Returns how many pages were reused.
        """
        reused = 0
        for rng in ranges:
            for offset, count, is_shared in _runs(self.shared_view(rng.pfn, rng.npages)):
                if is_shared:
                    self.set_view(rng.pfn + offset, count, False)
                    self.write_pages(rng.pfn + offset, count)
                    reused += count
        return reused


@dataclass(frozen=True)
class WorkloadConfig:
    """How hard the guest works: write rate, conversion rate, and the seed of every choice."""

    dirty_rate_mib_s: float = 0.0
    convert_rate_hz: float = 0.0
    seed: int = 0
    #: Share of the data area written once right after the first boot (a populated guest), and
    #: the share of those pages made shared first (benchmarks: mixes of private and shared).
    populate_fraction: float = 0.0
    shared_fraction: float = 0.0
    #: A guest that reboots or kexecs on its own, once, this many seconds after its workload
    #: first ran on this host (0 = never): the guest-initiated MSR drop a migration must ride
    #: out in ``blackout`` (docs/design.md §8 "Invariants", 3) — the host's /reboot and /kexec are
    #: refused while the guest migrates, a real guest's own reboot is not.
    kexec_after_s: float = 0.0
    reboot_after_s: float = 0.0
    #: How long a kexec or reboot keeps the guest down (kernel loading) before the new kernel
    #: runs its boot path and writes READY again: how long a migration's blackout lasts.
    boot_time_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("dirty_rate_mib_s", "convert_rate_hz", *TIMED_KEYS):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"workload {name} must be a finite number >= 0, got {value!r}")
        for name in ("populate_fraction", "shared_fraction"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"workload {name} must be a number in [0, 1], got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ConfigError(f"workload seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain form (REST body, vCPU state)."""
        out: dict[str, Any] = {
            "dirty_rate_mib_s": self.dirty_rate_mib_s, "convert_rate_hz": self.convert_rate_hz, "seed": self.seed,
        }
        if self.populate_fraction:
            out.update(populate_fraction=self.populate_fraction, shared_fraction=self.shared_fraction)
        out.update({key: getattr(self, key) for key in TIMED_KEYS if getattr(self, key)})
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkloadConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        number_keys = ("dirty_rate_mib_s", "convert_rate_hz", "populate_fraction", "shared_fraction", *TIMED_KEYS)
        unknown = set(data) - {"seed", *number_keys}
        if unknown:
            raise ConfigError(f"unknown workload keys: {sorted(unknown)}")
        numbers = {}
        for key in number_keys:
            value = data.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"workload {key} must be a number, got {value!r}")
            try:
                numbers[key] = float(value)
            except OverflowError:
                raise ConfigError(f"workload {key} is out of range: {value!r}") from None
        return cls(seed=data.get("seed", 0), **numbers)


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """PCG64 state with its 128-bit integers as 16-byte strings (msgpack has no big ints)."""
    state = rng.bit_generator.state
    inner = state["state"]
    return {
        "state": int(inner["state"]).to_bytes(16, "little"),
        "inc": int(inner["inc"]).to_bytes(16, "little"),
        "has_uint32": int(state["has_uint32"]),
        "uinteger": int(state["uinteger"]),
    }


def _restore_rng(data: dict[str, Any]) -> np.random.Generator:
    try:
        bit_generator = np.random.PCG64()
        bit_generator.state = {
            "bit_generator": "PCG64",
            "state": {
                "state": int.from_bytes(data["state"], "little"),
                "inc": int.from_bytes(data["inc"], "little"),
            },
            "has_uint32": int(data["has_uint32"]),
            "uinteger": int(data["uinteger"]),
        }
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"bad workload RNG state: {exc}") from exc
    return np.random.Generator(bit_generator)


class Workload:
    """Writes and converts runs of data pages at the configured rates (see module docstring)."""

    def __init__(
        self, memory: GuestMemory, config: WorkloadConfig, *, rng_state: dict[str, Any] | None = None
    ) -> None:
        self.memory = memory
        self.config = config
        self.rng = _restore_rng(rng_state) if rng_state is not None else np.random.default_rng(config.seed)
        ranges = memory.layout.data_ranges()
        self._data_starts = np.array([r.pfn for r in ranges], dtype=np.int64)
        self._data_ends = np.array([r.end for r in ranges], dtype=np.int64)
        self._data_offsets = np.concatenate(([0], np.cumsum([r.npages for r in ranges])))
        self.data_pages = int(self._data_offsets[-1])
        self.throttle_percent = 0
        self.pages_per_second = config.dirty_rate_mib_s * MiB / PAGE_SIZE
        self._budget = 0.0
        self._last: float | None = None
        self._next_convert: float | None = None
        self.steps = 0
        self.conversions = 0
        self.populate_target = int(self.data_pages * config.populate_fraction)
        self.populated = 0
        #: The guest-initiated offlines still to come, soonest first: (seconds after the clock's
        #: origin, "kexec" | "reboot"); each happens once in the guest's life (it travels).
        self._offlines = sorted((after, kind) for kind, after in (("kexec", config.kexec_after_s),
                                                                   ("reboot", config.reboot_after_s)) if after > 0)
        self.offlines_done = 0
        self._offline_origin: float | None = None

    def state(self) -> dict[str, Any]:
        """What must travel with the vCPU: config, RNG state, counters.

        Not the throttle: auto-converge is the source host's brake (QEMU's cpu-throttle),
        and the destination never inherits it.
        """
        return {
            "config": self.config.to_dict(),
            "rng": _rng_state(self.rng),
            "steps": self.steps,
            "conversions": self.conversions,
            "populated": self.populated,
            "offlines_done": self.offlines_done,
        }

    @classmethod
    def from_state(cls, memory: GuestMemory, state: dict[str, Any]) -> Workload:
        """Rebuild a workload exported with :meth:`state` (destination)."""
        try:
            workload = cls(memory, WorkloadConfig.from_dict(dict(state["config"])), rng_state=dict(state["rng"]))
            workload.steps = int(state["steps"])
            workload.conversions = int(state["conversions"])
            workload.populated = int(state.get("populated", workload.populate_target))
            workload.offlines_done = int(state.get("offlines_done", 0))
            del workload._offlines[: workload.offlines_done]  # done on the source: never twice
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"bad workload state: {exc}") from exc
        return workload

    @property
    def active(self) -> bool:
        """Whether the workload does anything at all."""
        return (self.populating or self.pages_per_second > 0 or self.config.convert_rate_hz > 0
                or bool(self._offlines))

    @property
    def populating(self) -> bool:
        """Whether the one-time fill of the data area after the first boot is still going."""
        return self.populated < self.populate_target

    def _run_at(self, index: int, max_pages: int) -> tuple[int, int]:
        """The run of data pages starting at data-area index ``index``, within one data range."""
        which = int(np.searchsorted(self._data_offsets, index, side="right")) - 1
        pfn = int(self._data_starts[which]) + index - int(self._data_offsets[which])
        return pfn, min(max_pages, int(self._data_ends[which]) - pfn)

    async def populate_step(self, notify: Notify) -> int:
        """Fill the next run of the data area: its first ``shared_fraction`` made shared
        (view, MAP_GPA_RANGE, like a driver's bounce buffers), the rest private. Returns pages."""
        pfn, npages = self._run_at(self.populated, min(MAX_WRITE_RUN_PAGES, self.populate_target - self.populated))
        shared = round(npages * self.config.shared_fraction)
        if shared:
            self.memory.set_view(pfn, shared, True)
            await notify(pfn, shared, True)
        self.memory.write_pages(pfn, npages)
        self.populated += npages
        self.steps += 1
        return npages

    def set_throttle(self, percent: int) -> None:
        """Auto-converge: the vCPU runs only ``100 - percent`` % of the time (0..99)."""
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 99:
            raise ValueError(f"throttle percent must be an integer in [0, 99], got {percent!r}")
        self.throttle_percent = percent

    def restart_clock(self, now: float) -> None:
        """Forget elapsed time (after a pause, a boot, an import): no catch-up burst."""
        self._last = now
        self._budget = 0.0
        self._next_convert = None

    def _pick_run(self, max_pages: int) -> tuple[int, int]:
        """A random run of data pages inside one data range (start uniform over the data area)."""
        return self._run_at(int(self.rng.integers(self.data_pages)), max_pages)

    def _accrue(self, now: float) -> None:
        if self._last is None:
            self._last = now
        elapsed = max(0.0, now - self._last)
        self._last = now
        running = (100 - self.throttle_percent) / 100.0
        cap = max(1.0, self.pages_per_second * MAX_BURST_SECONDS)
        self._budget = min(cap, self._budget + self.pages_per_second * elapsed * running)

    def write_step(self, now: float) -> int:
        """Write one run of data pages if the rate allows; returns pages written (0 if none due)."""
        self._accrue(now)
        npages = min(MAX_WRITE_RUN_PAGES, int(self._budget))
        if npages <= 0:
            return 0
        pfn, npages = self._pick_run(npages)
        self.memory.write_pages(pfn, npages)
        self._budget -= npages
        self.steps += 1
        return npages

    def offline_due(self, now: float) -> str | None:
        """The guest-initiated offline due at ``now`` (``"kexec"`` or ``"reboot"``), once; else None.

        Timed from the first call (the workload's first step on this host), not reset by
        pauses: a migration's pause/resume does not postpone it.
        """
        if not self._offlines:
            return None
        if self._offline_origin is None:
            self._offline_origin = now
        after, kind = self._offlines[0]
        if now < self._offline_origin + after:
            return None
        del self._offlines[0]
        self.offlines_done += 1
        return kind

    def convert_due(self, now: float) -> bool:
        """Whether a private<->shared conversion is due at ``now``."""
        hz = self.config.convert_rate_hz
        if hz <= 0:
            return False
        if self._next_convert is None:
            self._next_convert = now + float(self.rng.exponential(1.0 / hz))
        return now >= self._next_convert

    async def convert_step(self, now: float, notify: Notify) -> tuple[int, int, bool]:
        """Convert one run of data pages, Linux order: own view, notify host, use. Returns the run."""
        hz = self.config.convert_rate_hz
        if hz <= 0:
            raise ConfigError("convert_step needs convert_rate_hz > 0")
        pfn, npages = self._pick_run(int(self.rng.integers(1, MAX_CONVERT_RUN_PAGES + 1)))
        to_shared = not bool(self.memory.shared_view(pfn, 1)[0])
        running = (100 - self.throttle_percent) / 100.0
        self._next_convert = max(self._next_convert or now, now) + float(self.rng.exponential(1.0 / (hz * running)))
        self.memory.set_view(pfn, npages, to_shared)  # page tables first (C-bit)
        await notify(pfn, npages, to_shared)  # then KVM_HC_MAP_GPA_RANGE
        self.memory.write_pages(pfn, npages)  # then use, with the new routing
        self.conversions += 1
        self.steps += 1
        return pfn, npages, to_shared

    def next_due(self, now: float) -> float:
        """Seconds from ``now`` until the next write or conversion is due (inf if never)."""
        waits = [math.inf]
        if self.pages_per_second > 0:
            running = (100 - self.throttle_percent) / 100.0
            missing = max(0.0, 1.0 - self._budget)
            waits.append(missing / (self.pages_per_second * running))
        if self.config.convert_rate_hz > 0 and self._next_convert is not None:
            waits.append(max(0.0, self._next_convert - now))
        elif self.config.convert_rate_hz > 0:
            waits.append(0.0)
        if self._offlines:
            origin = now if self._offline_origin is None else self._offline_origin
            waits.append(max(0.0, origin + self._offlines[0][0] - now))
        return min(waits)
