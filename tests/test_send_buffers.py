"""The source's payload ring: a region is never lent twice while the stream may still read it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migd.send_buffers import SendRing, SendRingError


def _overlaps(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def test_regions_come_back_only_once_the_stream_consumed_their_frame() -> None:
    ring = SendRing(100)
    first = ring.take(60, consumed=0)
    assert first is not None and len(first) == 60
    ring.placed(stream_end=70)  # frame = 10 bytes of header + the 60-byte payload
    # 40 bytes are free after it, 50 are not: nothing else yet.
    assert ring.take(50, consumed=69) is None
    second = ring.take(40, consumed=69)
    assert second is not None
    ring.placed(stream_end=120)
    assert ring.take(30, consumed=69) is None  # full: the first frame is one byte short of sent
    third = ring.take(30, consumed=70)  # the first frame is out: its region is free again
    assert third is not None
    assert ring.live_regions() == [(60, 100), (0, 30)]
    ring.placed(stream_end=160)
    assert ring.refused == 2 and ring.lent == 3


def test_a_full_wrapped_ring_lends_nothing_until_the_oldest_frame_is_sent() -> None:
    ring = SendRing(100)
    for end in (50, 100):
        assert ring.take(50, consumed=0) is not None
        ring.placed(end)
    assert ring.take(1, consumed=49) is None
    assert ring.take(50, consumed=50) is not None  # wraps into the first region
    ring.placed(150)
    assert ring.live_regions() == [(50, 100), (0, 50)]
    assert ring.take(1, consumed=99) is None  # head == tail: full, not empty


def test_everything_sent_starts_over_at_the_front() -> None:
    ring = SendRing(100)
    assert ring.take(70, consumed=0) is not None
    ring.placed(70)
    region = ring.take(90, consumed=70)  # the only live region is out: the whole ring is free
    assert region is not None and ring.live_regions() == [(0, 90)]


def test_a_region_released_unused_is_lent_again() -> None:
    ring = SendRing(100)
    assert ring.take(80, consumed=0) is not None
    ring.release()
    assert ring.take(100, consumed=0) is not None


def test_out_of_order_use_is_an_error() -> None:
    ring = SendRing(100)
    with pytest.raises(SendRingError):
        ring.placed(10)
    assert ring.take(10, consumed=0) is not None
    with pytest.raises(SendRingError):
        ring.take(10, consumed=0)
    ring.placed(20)
    assert ring.take(10, consumed=0) is not None
    with pytest.raises(SendRingError, match="went back"):
        ring.placed(19)
    with pytest.raises(ValueError):
        SendRing(0)


def test_requests_that_cannot_fit_are_refused() -> None:
    ring = SendRing(100)
    assert ring.take(0, consumed=0) is None
    assert ring.take(101, consumed=0) is None
    assert ring.refused == 2


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 40), st.integers(0, 3), st.integers(0, 60)), max_size=60))
def test_a_lent_region_never_overlaps_one_the_stream_may_still_read(
    steps: list[tuple[int, int, int]],
) -> None:
    """Model: frames of header + payload go into a stream consumed at a random pace."""
    ring = SendRing(100)
    written = 0
    consumed = 0
    unsent: list[tuple[tuple[int, int], int]] = []  # (region, stream end) not yet consumed
    for size, header, advance in steps:
        consumed = min(written, consumed + advance)
        unsent = [(region, end) for region, end in unsent if end > consumed]
        view = ring.take(size, consumed)
        if view is None:
            # Refused only while frames are unsent and no gap it can use holds the request.
            assert unsent
            assert all(b - a < size for a, b in _usable_gaps(100, [region for region, _ in unsent]))
            continue
        start = ring.live_regions()[-1][0]
        region = (start, start + size)
        assert len(view) == size
        assert not any(_overlaps(region, other) for other, _ in unsent)
        written += header + size
        ring.placed(written)
        unsent.append((region, written))


def _usable_gaps(capacity: int, used: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The gaps a ring can use: around the live span if it does not wrap, else inside it."""
    oldest, newest = used[0], used[-1]
    if oldest[0] < newest[1] and oldest[0] <= newest[0]:
        return [(newest[1], capacity), (0, oldest[0])]
    return [(newest[1], oldest[0])]
