"""GuestMemory (routing, ledger write-through, dirty log) and the Workload (rates, order, seed)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from migd.abi import PAGE_SHIFT, PAGE_SIZE
from migd.bitmap import PageBitmap
from migd.errors import ConfigError, GuestMemoryError
from migd.guest.guest_layout import GuestLayout
from migd.platform.memory import GuestRam, MemoryEncryption, new_vek
from migd.guest.page_content import PageContent, PageKind, pages_equal, parse_headers
from migd.guest.selfcheck import check_memory, read_ledger
from migd.guest.workload import GuestMemory, Workload, WorkloadConfig

NPAGES = 1024


@dataclass
class Setup:
    ram: GuestRam
    vek: bytes
    engine: MemoryEncryption
    layout: GuestLayout
    dirty: PageBitmap
    memory: GuestMemory

    def pages(self) -> np.ndarray:
        return np.frombuffer(self.ram.read(0, NPAGES), dtype=np.uint8).reshape(NPAGES, PAGE_SIZE)


def make_setup(path: Path, vek: bytes | None = None, seed: int = 5) -> Setup:
    ram = GuestRam(path, NPAGES, create=True)
    vek = vek or new_vek()
    engine = MemoryEncryption(vek)
    layout = GuestLayout.build(NPAGES)
    dirty = PageBitmap(NPAGES)
    memory = GuestMemory.format(ram, engine, layout, seed, dirty)
    return Setup(ram, vek, engine, layout, dirty, memory)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = make_setup(tmp_path / "ram")
    try:
        yield s
    finally:
        s.ram.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def dirty_pages(bitmap: PageBitmap) -> set[int]:
    return {p for e in bitmap.extents(True) for p in range(e.first, e.end)}


def test_format_writes_boot_params_and_ledger_and_load_reads_them(setup: Setup) -> None:
    assert dirty_pages(setup.dirty) == set(range(setup.layout.kernel.end))
    loaded = GuestMemory.load(setup.ram, setup.engine, PageBitmap(NPAGES))
    assert loaded.header == setup.memory.header
    assert np.array_equal(loaded.ledger, setup.memory.ledger)
    assert check_memory(setup.ram, setup.vek).errors == 0


def test_write_pages_routes_by_view_and_writes_through(setup: Setup) -> None:
    data = setup.layout.data_ranges()[0]
    pfn = data.pfn + 10
    setup.memory.set_view(pfn + 2, 2, True)
    setup.dirty.fetch_and_clear()
    before = setup.pages()
    setup.memory.write_pages(pfn, 6)
    after = setup.pages()
    changed = set(np.flatnonzero(~pages_equal(before, after)).tolist())
    ledger_page = setup.layout.ledger_pages_of(pfn, 6).pfn
    assert changed == set(range(pfn, pfn + 6)) | {ledger_page}
    assert dirty_pages(setup.dirty) == changed  # exactly the written pages are dirty
    expected = PageContent(5).generate_run(pfn << PAGE_SHIFT, [1] * 6, [1, 1, 2, 2, 1, 1])
    plain = np.frombuffer(setup.engine.read_private(setup.ram, pfn << PAGE_SHIFT, 6), np.uint8).reshape(6, -1)
    raw = after[pfn : pfn + 6]
    assert pages_equal(plain[[0, 1, 4, 5]], expected[[0, 1, 4, 5]]).all()  # private: through the engine
    assert pages_equal(raw[[2, 3]], expected[[2, 3]]).all()  # shared: raw
    assert not pages_equal(raw[[0, 1]], expected[[0, 1]]).any()  # private pages are not plaintext
    assert np.array_equal(read_ledger(setup.ram, setup.engine, setup.layout), setup.memory.ledger)
    assert setup.memory.versions(pfn, 6).tolist() == [1] * 6


def test_dirty_log_negative_control(setup: Setup) -> None:
    """The diff-vs-dirty-log comparison above can fail: a write behind the log's back shows."""
    setup.dirty.fetch_and_clear()
    before = setup.pages()
    victim = setup.layout.data_ranges()[0].pfn + 3
    setup.ram.write(victim << PAGE_SHIFT, b"\x07" * PAGE_SIZE)
    changed = set(np.flatnonzero(~pages_equal(before, setup.pages())).tolist())
    assert changed == {victim} and victim not in dirty_pages(setup.dirty)


def test_kernel_region_is_not_writable_as_data(setup: Setup) -> None:
    with pytest.raises(GuestMemoryError, match="kernel region"):
        setup.memory.write_pages(0, 1)
    with pytest.raises(GuestMemoryError, match="outside guest RAM"):
        setup.memory.set_view(NPAGES - 1, 2, True)


def test_reuse_shared_as_private(setup: Setup) -> None:
    mem = setup.memory
    fw = setup.layout.firmware_shared[0]
    mem.set_view(fw.pfn, fw.npages, True)
    mem.write_pages(fw.pfn, fw.npages)
    base = setup.layout.data_ranges()[0].pfn
    mem.set_view(base + 5, 3, True)
    mem.write_pages(base + 5, 3)
    mem.set_view(base + 50, 1, True)
    reused = mem.reuse_shared_as_private(setup.layout.data_ranges())
    assert reused == 4
    assert not mem.shared_view(base, 100).any()
    assert mem.shared_view(fw.pfn, fw.npages).all()  # firmware pages are not data
    assert mem.versions(base + 5, 3).tolist() == [2, 2, 2] and mem.versions(base + 50, 1).tolist() == [1]
    head = parse_headers(np.frombuffer(setup.engine.read_private(setup.ram, (base + 5) << PAGE_SHIFT, 1),
                                       np.uint8).reshape(1, -1))
    assert head.kind.tolist() == [PageKind.PRIVATE]
    assert check_memory(setup.ram, setup.vek).errors == 0


def test_conversion_follows_linux_order(setup: Setup) -> None:
    """Own view first, then MAP_GPA_RANGE, then the pages are used with the new routing."""
    workload = Workload(setup.memory, WorkloadConfig(0, 50, seed=9))
    seen: list[tuple[int, int, bool, bool, int]] = []

    async def notify(pfn: int, npages: int, shared: bool) -> None:
        ram_ledger = read_ledger(setup.ram, setup.engine, setup.layout)
        view_in_ram = bool(ram_ledger[pfn] >> 31)
        seen.append((pfn, npages, shared, view_in_ram, int(setup.memory.versions(pfn, 1)[0])))

    clock = FakeClock()
    for _ in range(20):
        now = clock.advance(0.001)
        for _ in range(10_000):
            if workload.convert_due(now):
                break
            now = clock.advance(0.001)
        pfn, npages, shared = asyncio.run(workload.convert_step(now, notify))
        assert seen[-1][:3] == (pfn, npages, shared)
        assert seen[-1][3] == shared  # the page tables (ledger, in RAM) changed before the hypercall
        assert int(setup.memory.versions(pfn, 1)[0]) == seen[-1][4] + 1  # written after it
        assert setup.memory.shared_view(pfn, npages).tolist() == [shared] * npages
    assert {s[2] for s in seen} == {True, False}
    assert workload.conversions == 20
    assert check_memory(setup.ram, setup.vek).errors == 0


def test_write_rate_and_throttle(setup: Setup) -> None:
    rate_mib = 4.0  # 1024 pages/s
    plain = Workload(setup.memory, WorkloadConfig(rate_mib, 0, 1))
    throttled = Workload(setup.memory, WorkloadConfig(rate_mib, 0, 1))
    throttled.set_throttle(75)
    totals = []
    for workload in (plain, throttled):
        clock = FakeClock()
        workload.restart_clock(clock.now)
        total = 0
        for _ in range(200):  # 2 s in 10 ms ticks
            total += workload.write_step(clock.advance(0.01))
        totals.append(total)
    assert 1900 <= totals[0] <= 2048
    assert 450 <= totals[1] <= 530  # a quarter of the time running
    with pytest.raises(ValueError, match="throttle"):
        plain.set_throttle(100)


def test_pause_leaves_no_catch_up_burst(setup: Setup) -> None:
    workload = Workload(setup.memory, WorkloadConfig(4.0, 0, 1))
    clock = FakeClock()
    workload.restart_clock(clock.now)
    assert workload.write_step(clock.advance(60.0)) <= 256  # burst capped (and one run per step)
    workload.restart_clock(clock.advance(60.0))
    assert workload.write_step(clock.now) == 0
    assert 0 < workload.next_due(clock.now) <= 0.002


def test_same_seed_same_memory(tmp_path: Path) -> None:
    vek = new_vek()
    images = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        s = make_setup(tmp_path / name, vek=vek, seed=seed)
        workload = Workload(s.memory, WorkloadConfig(8.0, 30.0, seed))
        clock = FakeClock()
        workload.restart_clock(clock.now)

        async def noop(pfn: int, npages: int, shared: bool) -> None:
            return None

        for _ in range(100):
            now = clock.advance(0.01)
            if workload.convert_due(now):
                asyncio.run(workload.convert_step(now, noop))
            else:
                workload.write_step(now)
        images.append(s.ram.read(0, NPAGES))
        assert check_memory(s.ram, vek).errors == 0
        s.ram.close()
    assert images[0] == images[1]
    assert images[0] != images[2]


def test_state_round_trip_continues_the_same_sequence(tmp_path: Path) -> None:
    s = make_setup(tmp_path / "ram")
    try:
        first = Workload(s.memory, WorkloadConfig(8.0, 10.0, 77))
        first.set_throttle(20)
        for _ in range(5):
            first._pick_run(16)
        copy = Workload.from_state(s.memory, first.state())
        # The host's auto-converge throttle stays behind: the destination runs at full speed.
        assert copy.throttle_percent == 0 and copy.config == first.config
        assert [first._pick_run(16) for _ in range(50)] == [copy._pick_run(16) for _ in range(50)]
        fresh = Workload(s.memory, WorkloadConfig(8.0, 10.0, 77))
        assert [fresh._pick_run(16) for _ in range(50)] != [copy._pick_run(16) for _ in range(50)]
        with pytest.raises(ConfigError, match="workload state"):
            Workload.from_state(s.memory, {"config": {}})
    finally:
        s.ram.close()


def test_picked_runs_stay_inside_the_data_area(tmp_path: Path) -> None:
    ram = GuestRam(tmp_path / "ram", NPAGES, create=True)
    try:
        layout = GuestLayout.build(NPAGES, [(300 * PAGE_SIZE, 10), (1000 * PAGE_SIZE, 24)])
        memory = GuestMemory.format(ram, MemoryEncryption(new_vek()), layout, 0, PageBitmap(NPAGES))
        workload = Workload(memory, WorkloadConfig(1, 1, 0))
        data = layout.data_mask()
        hit = np.zeros(NPAGES, dtype=bool)
        for _ in range(3000):
            pfn, npages = workload._pick_run(64)
            assert npages >= 1 and data[pfn : pfn + npages].all()
            hit[pfn] = True
        assert hit[data].mean() > 0.9  # starts spread over the whole data area
    finally:
        ram.close()


@pytest.mark.parametrize(
    "kwargs",
    [{"dirty_rate_mib_s": -1}, {"convert_rate_hz": float("nan")}, {"seed": -1}, {"seed": 1 << 64},
     {"dirty_rate_mib_s": True}],
)
def test_workload_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        WorkloadConfig(**kwargs)  # type: ignore[arg-type]


def test_workload_config_dict_round_trip() -> None:
    config = WorkloadConfig(1.5, 2.0, 3)
    assert WorkloadConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="unknown"):
        WorkloadConfig.from_dict({"rate": 1})


def test_populate_fills_the_data_area_with_the_asked_mix(setup: Setup) -> None:
    notified: list[tuple[int, int, bool]] = []

    async def notify(pfn: int, npages: int, shared: bool) -> None:
        notified.append((pfn, npages, shared))

    workload = Workload(setup.memory, WorkloadConfig(populate_fraction=0.5, shared_fraction=0.25, seed=2))
    assert workload.active and workload.populating
    while workload.populating:
        asyncio.run(workload.populate_step(notify))
    assert workload.populated == workload.populate_target == workload.data_pages // 2
    counts = setup.memory.counts()
    shared_notified = sum(n for _, n, shared in notified if shared)
    assert all(shared for _, _, shared in notified)  # every notification made pages shared
    assert abs(shared_notified - workload.populate_target * 0.25) <= len(notified)
    assert check_memory(setup.ram, setup.vek).errors == 0
    assert counts["shared"] >= shared_notified  # the guest's own view has them shared
    # Negative control: without populate nothing is written.
    idle = Workload(setup.memory, WorkloadConfig(seed=2))
    assert not idle.populating and not idle.active


def test_populate_fractions_are_validated() -> None:
    for bad in (-0.1, 1.5, True):
        with pytest.raises(ConfigError):
            WorkloadConfig(populate_fraction=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown workload keys"):
        WorkloadConfig.from_dict({"populate": 1})
    assert WorkloadConfig.from_dict({"populate_fraction": 1, "shared_fraction": 0.5}).populate_fraction == 1.0


def test_guest_initiated_offlines_fire_once_each_in_order(setup: Setup) -> None:
    clock = FakeClock()
    config = WorkloadConfig(seed=1, kexec_after_s=2.0, reboot_after_s=1.0, boot_time_s=0.5)
    workload = Workload(setup.memory, config)
    assert workload.active  # an offline still to come keeps an idle workload stepping
    assert workload.offline_due(clock.now) is None  # the clock starts at the first step
    assert workload.next_due(clock.now) == pytest.approx(1.0)
    assert workload.offline_due(clock.advance(0.99)) is None
    assert workload.offline_due(clock.advance(0.02)) == "reboot"
    assert workload.offline_due(clock.now) is None  # once
    workload.restart_clock(clock.now)  # a pause/resume (or the reboot's boot) does not postpone it
    assert workload.offline_due(clock.advance(1.0)) == "kexec"
    assert workload.offline_due(clock.advance(100.0)) is None and not workload.active
    assert workload.offlines_done == 2
    # Negative control: without the options the guest never goes offline on its own.
    plain = Workload(setup.memory, WorkloadConfig(seed=1))
    assert plain.offline_due(clock.now) is None and plain.offline_due(clock.advance(1e6)) is None


def test_a_done_offline_travels_with_the_state_and_never_repeats(setup: Setup) -> None:
    clock = FakeClock()
    source = Workload(setup.memory, WorkloadConfig(seed=1, kexec_after_s=1.0, reboot_after_s=5.0))
    source.offline_due(clock.now)
    assert source.offline_due(clock.advance(1.0)) == "kexec"
    arrived = Workload.from_state(setup.memory, source.state())
    assert arrived.offlines_done == 1
    assert arrived.offline_due(clock.now) is None  # its clock starts again here
    assert arrived.offline_due(clock.advance(5.0)) == "reboot"  # only the one not done yet
    assert arrived.offline_due(clock.advance(100.0)) is None
    # Negative control: a state exported before the kexec brings it along.
    early = Workload.from_state(setup.memory, Workload(setup.memory, source.config).state())
    early.offline_due(clock.now)
    assert early.offline_due(clock.advance(1.0)) == "kexec"


@pytest.mark.parametrize("key", ["kexec_after_s", "reboot_after_s", "boot_time_s"])
def test_offline_timers_are_validated_and_round_trip(key: str) -> None:
    for bad in (-1.0, float("inf"), float("nan"), True):
        with pytest.raises(ConfigError, match=key):
            WorkloadConfig(**{key: bad})  # type: ignore[arg-type]
    config = WorkloadConfig(seed=3, **{key: 1.5})  # type: ignore[arg-type]
    assert config.to_dict()[key] == 1.5
    assert WorkloadConfig.from_dict(config.to_dict()) == config
    assert key not in WorkloadConfig(seed=3).to_dict()  # the default dict keeps its old shape
