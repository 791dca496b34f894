"""Page bitmaps against a plain-Python model, argument validation, and the lock.

The wire encoding (encode/decode against hostile input) is tested in tests/test_bitmap_codec.py.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
from bitmap_model import bit_lists, from_model, model_packed, model_runs, sizes
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test

from migd.abi import PAGE_SIZE
from migd.bitmap import BitmapSizeError, Extent, PageBitmap
from migd.errors import GuestMemoryError


@st.composite
def page_ranges(draw: st.DrawFn, npages: int) -> tuple[int, int]:
    """(first, count) inside ``npages``, often starting or ending next to a word boundary."""
    near_words = {min(max(word + delta, 0), npages) for word in range(0, npages + 64, 64) for delta in (-1, 0, 1)}
    first = draw(st.one_of(st.integers(0, npages), st.sampled_from(sorted(near_words))))
    ends = sorted(end for end in near_words if end >= first)
    end = draw(st.one_of(st.integers(first, npages), st.sampled_from(ends)))
    return first, end - first


# --- stateful comparison against the model -------------------------------------------------
class BitmapMachine(RuleBasedStateMachine):
    bitmap_class: type[PageBitmap] = PageBitmap

    @initialize(npages=sizes)
    def create(self, npages: int) -> None:
        self.bitmap = self.bitmap_class(npages)
        self.model = [False] * npages

    @rule(data=st.data(), value=st.booleans(), how=st.sampled_from(["set", "clear", "assign"]))
    def assign_range(self, data: st.DataObject, value: bool, how: str) -> None:
        first, count = data.draw(page_ranges(len(self.model)))
        if how == "set":
            value, changed = True, self.bitmap.set_range(first, count)
        elif how == "clear":
            value, changed = False, self.bitmap.clear_range(first, count)
        else:
            changed = self.bitmap.assign_range(first, count, value)
        before = self.model[first : first + count]
        self.model[first : first + count] = [value] * count
        assert changed == sum(1 for bit in before if bit != value)

    @rule(data=st.data())
    def set_pages(self, data: st.DataObject) -> None:
        if not self.model:
            return
        pages = data.draw(st.lists(st.integers(0, len(self.model) - 1), max_size=20))
        self.bitmap.set_pages(np.array(pages, dtype=np.int64))
        for page in pages:
            self.model[page] = True

    @rule(data=st.data())
    def set_extents(self, data: st.DataObject) -> None:
        ranges = data.draw(st.lists(page_ranges(len(self.model)), max_size=6))
        self.bitmap.set_extents(np.array([r[0] for r in ranges]), np.array([r[1] for r in ranges]))
        for first, count in ranges:
            self.model[first : first + count] = [True] * count

    @rule()
    def fetch_and_clear(self) -> None:
        fetched = self.bitmap.fetch_and_clear()
        assert fetched.to_bytes() == model_packed(self.model)
        self.model = [False] * len(self.model)

    @rule(data=st.data(), op=st.sampled_from(["update", "or", "and", "difference", "invert"]))
    def combine(self, data: st.DataObject, op: str) -> None:
        other_bits = data.draw(bit_lists(len(self.model)))
        other = from_model(other_bits)
        pairs = list(zip(self.model, other_bits, strict=True))
        if op == "update":
            self.bitmap.update(other)
            self.model = [a or b for a, b in pairs]
        elif op == "or":
            self.bitmap = self.bitmap | other
            self.model = [a or b for a, b in pairs]
        elif op == "and":
            self.bitmap = self.bitmap & other
            self.model = [a and b for a, b in pairs]
        elif op == "difference":
            self.bitmap = self.bitmap.difference(other)
            self.model = [a and not b for a, b in pairs]
        else:
            self.bitmap = ~self.bitmap
            self.model = [not a for a in self.model]
        assert other.to_bytes() == model_packed(other_bits)  # operands are left alone

    @rule(how=st.sampled_from(["encode", "bytes", "copy"]))
    def round_trip(self, how: str) -> None:
        n = len(self.model)
        if how == "encode":
            again = PageBitmap.decode(self.bitmap.encode(), max_npages=n)
        elif how == "bytes":
            again = PageBitmap.from_bytes(n, self.bitmap.to_bytes())
        else:
            again = self.bitmap.copy()
            again.assign_range(0, n, True)  # the copy is independent
            assert self.bitmap.count() == sum(self.model)
            again = self.bitmap.copy()
        assert again == self.bitmap
        self.bitmap = again

    @rule(data=st.data(), value=st.booleans())
    def query_range(self, data: st.DataObject, value: bool) -> None:
        first, count = data.draw(page_ranges(len(self.model)))
        window = self.model[first : first + count]
        assert self.bitmap.count(first, count) == sum(window)
        assert self.bitmap.all_set(first, count) == all(window)
        assert self.bitmap.any_set(first, count) == any(window)
        expected = model_runs(self.model, value, first, count)
        assert self.bitmap.extents(value, first, count) == expected
        starts, counts = self.bitmap.extent_arrays(value, first, count)
        assert starts.dtype == counts.dtype == np.int64
        assert list(zip(starts.tolist(), counts.tolist(), strict=True)) == [tuple(run) for run in expected]
        if first < len(self.model):
            assert self.bitmap.test(first) == self.model[first]

    @invariant()
    def matches_model(self) -> None:
        assert self.bitmap.npages == len(self.model)
        assert self.bitmap.count() == sum(self.model)
        assert self.bitmap.to_bytes() == model_packed(self.model)
        assert self.bitmap.extents() == model_runs(self.model)
        assert self.bitmap.extents(False) == model_runs(self.model, False)
        assert self.bitmap.run_count() == len(model_runs(self.model))


MACHINE_SETTINGS = settings(
    max_examples=80, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_bitmap_matches_model() -> None:
    run_state_machine_as_test(BitmapMachine, settings=MACHINE_SETTINGS)


class _OffByOneAtWordEnd(PageBitmap):
    """A plausible bug: a range ending exactly on a word boundary loses its last page."""

    def assign_range(self, first: int, count: int, value: bool) -> int:
        if count > 1 and (first + count) % 64 == 0:
            count -= 1
        return super().assign_range(first, count, value)


class _BuggyMachine(BitmapMachine):
    bitmap_class = _OffByOneAtWordEnd


def test_model_comparison_catches_a_word_edge_bug() -> None:
    # Negative control: the same machine must fail against a bitmap with a masking bug.
    with pytest.raises(AssertionError):
        run_state_machine_as_test(
            _BuggyMachine,
            settings=settings(
                MACHINE_SETTINGS, max_examples=200, derandomize=True, database=None, phases=[Phase.generate]
            ),
        )


# --- ranges and argument validation ----------------------------------------------------------
@pytest.mark.parametrize("first,count", [(-1, 1), (0, -1), (0, 101), (100, 1), (101, 0), (50, 51)])
def test_out_of_range_is_guest_memory_error(first: int, count: int) -> None:
    bitmap = PageBitmap(100)
    for call in (bitmap.set_range, bitmap.clear_range, bitmap.count, bitmap.all_set, bitmap.any_set):
        with pytest.raises(GuestMemoryError, match="npages = 100"):
            call(first, count)
    with pytest.raises(GuestMemoryError):
        bitmap.assign_range(first, count, True)
    with pytest.raises(GuestMemoryError):
        bitmap.extent_arrays(True, first, count)
    assert bitmap.count() == 0  # nothing half-applied
    # Control: the same bitmap accepts the whole range and the empty range at the end.
    assert bitmap.set_range(0, 100) == 100
    assert bitmap.set_range(100, 0) == 0


def test_empty_ranges_are_no_ops() -> None:
    bitmap = PageBitmap(70)
    bitmap.set_range(0, 70)
    assert bitmap.clear_range(70, 0) == 0 and bitmap.clear_range(3, 0) == 0
    assert bitmap.count(64, 0) == 0 and bitmap.extents(True, 5, 0) == []
    assert bitmap.all_set(10, 0) and not bitmap.any_set(10, 0)
    assert bitmap.count() == 70


def test_zero_page_bitmap() -> None:
    bitmap = PageBitmap(0)
    assert bitmap.count() == 0 and bitmap.extents() == [] and bitmap.to_bytes() == b""
    assert PageBitmap.decode(bitmap.encode(), max_npages=0) == bitmap
    with pytest.raises(GuestMemoryError):
        bitmap.test(0)


@pytest.mark.parametrize("npages", [-1, 1 << 63])
def test_bad_size_rejected(npages: int) -> None:
    with pytest.raises(GuestMemoryError, match="npages"):
        PageBitmap(npages)


def test_test_rejects_pages_outside() -> None:
    bitmap = PageBitmap(65)
    bitmap.set_range(64, 1)
    assert bitmap.test(64) and not bitmap.test(63)
    for page in (-1, 65):
        with pytest.raises(GuestMemoryError, match="outside"):
            bitmap.test(page)


def test_set_pages_validates() -> None:
    bitmap = PageBitmap(130)
    with pytest.raises(GuestMemoryError, match="min -1"):
        bitmap.set_pages(np.array([3, -1]))
    with pytest.raises(GuestMemoryError, match="max 130"):
        bitmap.set_pages(np.array([130], dtype=np.uint64))
    with pytest.raises(GuestMemoryError):
        bitmap.set_pages(np.array([1 << 63], dtype=np.uint64))
    with pytest.raises(TypeError, match="integer"):
        bitmap.set_pages(np.array([1.0]))
    assert bitmap.count() == 0
    bitmap.set_pages(np.array([[129, 0], [129, 64]], dtype=np.uint16))  # any shape, repeats
    assert bitmap.extents() == [Extent(0, 1), Extent(64, 1), Extent(129, 1)]
    bitmap.set_pages(np.array([], dtype=np.int64))
    assert bitmap.count() == 3


def test_set_extents_validates() -> None:
    bitmap = PageBitmap(100)
    with pytest.raises(GuestMemoryError, match="as many"):
        bitmap.set_extents(np.array([1, 2]), np.array([1]))
    for starts, counts in (([-1], [1]), ([0], [-1]), ([99], [2]), ([101], [0])):
        with pytest.raises(GuestMemoryError, match="npages = 100"):
            bitmap.set_extents(np.array(starts), np.array(counts))
    assert bitmap.count() == 0
    bitmap.set_extents(np.array([90, 10, 0, 12, 100]), np.array([10, 5, 3, 10, 0]))  # overlap + touch
    assert bitmap.extents() == [Extent(0, 3), Extent(10, 12), Extent(90, 10)]


def test_size_mismatch_and_foreign_types() -> None:
    a, b = PageBitmap(64), PageBitmap(65)
    for op in (a.update, a.__or__, a.__and__, a.difference):
        with pytest.raises(BitmapSizeError, match="expected npages=64, got 65"):
            op(b)
    assert a != b and a == PageBitmap(64) and a != "bits"
    with pytest.raises(TypeError):
        a.update("bits")  # type: ignore[arg-type]
    assert issubclass(BitmapSizeError, GuestMemoryError)


def test_invert_keeps_tail_clear() -> None:
    bitmap = ~PageBitmap(70)
    assert bitmap.count() == 70 and bitmap.to_bytes()[-1] == 0x3F
    assert (~bitmap).count() == 0


def test_from_bytes_validates() -> None:
    assert PageBitmap.from_bytes(12, b"\xff\x0f").count() == 12
    assert PageBitmap.from_bytes(12, memoryview(b"\x01\x08")).extents() == [Extent(0, 1), Extent(11, 1)]
    with pytest.raises(GuestMemoryError, match="must be 2 bytes, got 3"):
        PageBitmap.from_bytes(12, b"\x00\x00\x00")
    with pytest.raises(GuestMemoryError, match="past npages"):
        PageBitmap.from_bytes(12, b"\x00\x10")


def test_extent_conveniences() -> None:
    run = Extent(first=3, count=2)
    assert (run.end, run.gpa, run.nbytes) == (5, 3 * PAGE_SIZE, 2 * PAGE_SIZE)


def test_self_operations() -> None:
    bitmap = PageBitmap(100)
    bitmap.set_range(10, 20)
    bitmap.update(bitmap)
    assert bitmap == bitmap and (bitmap | bitmap) == bitmap and bitmap.difference(bitmap).count() == 0


# --- concurrency: the dirty log's fetch-and-clear loses nothing ------------------------------
NPAGES_RACE = 60_000 + 37


def _race(bitmap: PageBitmap) -> tuple[np.ndarray, np.ndarray, int]:
    """A writer sets every page once, in shuffled runs, while this thread keeps fetching.

    Returns (pages written, pages seen in the fetched copies plus the final state, fetches).
    Each page is written exactly once, so a write lost between a copy and a clear is never
    repaired by a later one and always shows up.
    """
    rng = np.random.default_rng(11)
    bounds = np.cumsum(rng.integers(1, 6, NPAGES_RACE))
    bounds = np.concatenate(([0], bounds[bounds < NPAGES_RACE], [NPAGES_RACE]))
    runs = list(zip(bounds[:-1].tolist(), np.diff(bounds).tolist(), strict=True))
    order = rng.permutation(len(runs)).tolist()
    done = threading.Event()

    def writer() -> None:
        for index in order:
            bitmap.set_range(*runs[index])
        done.set()

    seen = PageBitmap(NPAGES_RACE)
    fetches = 0
    thread = threading.Thread(target=writer)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # switch threads often so that interleavings really happen
    try:
        thread.start()
        while not done.is_set():
            seen.update(bitmap.fetch_and_clear())
            fetches += 1
        thread.join(timeout=30)
        assert not thread.is_alive()
    finally:
        sys.setswitchinterval(old_interval)
    seen.update(bitmap)
    expected = np.ones(NPAGES_RACE, dtype=bool)
    got = np.unpackbits(np.frombuffer(seen.to_bytes(), np.uint8), bitorder="little")[:NPAGES_RACE].astype(bool)
    return expected, got, fetches


def test_fetch_and_clear_loses_no_concurrent_write() -> None:
    expected, got, fetches = _race(PageBitmap(NPAGES_RACE))
    assert fetches > 10  # the two threads really overlapped
    assert np.array_equal(got, expected)


class _RacyBitmap(PageBitmap):
    """The bug the lock prevents: copy, then clear, as two separate steps."""

    def fetch_and_clear(self) -> PageBitmap:
        snapshot = self.copy()
        time.sleep(0.0005)  # let the writer in between
        self.clear_range(0, self.npages)
        return snapshot


def test_race_check_catches_a_non_atomic_fetch() -> None:
    # Negative control: the same harness sees pages lost by a copy-then-clear fetch.
    expected, got, _ = _race(_RacyBitmap(NPAGES_RACE))
    lost = expected & ~got
    assert lost.any()
    assert not (got & ~expected).any()


def test_fetch_and_clear_returns_and_clears() -> None:
    bitmap = PageBitmap(200)
    bitmap.set_range(60, 10)
    fetched = bitmap.fetch_and_clear()
    assert fetched.extents() == [Extent(60, 10)] and bitmap.count() == 0
    bitmap.set_range(0, 1)
    assert fetched.count() == 10  # the fetched copy is independent of later writes


def test_operations_are_callable_from_many_threads() -> None:
    bitmap = PageBitmap(1 << 16)
    errors: list[Exception] = []

    def worker(op: Callable[[], object]) -> None:
        try:
            for _ in range(200):
                op()
        except Exception as exc:  # reported by the assertion below
            errors.append(exc)

    other = PageBitmap(1 << 16)
    other.set_range(100, 1000)
    ops: list[Callable[[], object]] = [
        lambda: bitmap.set_range(5, 7000),
        lambda: bitmap.clear_range(3000, 100),
        lambda: bitmap.extent_arrays(),
        lambda: bitmap.encode(),
        lambda: bitmap.update(other),
        lambda: other.update(bitmap),
        lambda: bitmap == other,
    ]
    threads = [threading.Thread(target=worker, args=(op,)) for op in ops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)  # no deadlock between a and b
    assert errors == []
