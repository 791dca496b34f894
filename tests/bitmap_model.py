"""Test helper: the plain-Python reference model of a page bitmap (a list of bools).

Shared by tests/test_bitmap.py (operations) and tests/test_bitmap_codec.py (wire format):
both compare migd's numpy bitmap against this model, written the obvious way.
"""

from __future__ import annotations

from hypothesis import strategies as st

from migd.bitmap import Extent, PageBitmap

# Sizes around byte and word boundaries, where masks go wrong.
EDGE_SIZES = [0, 1, 7, 8, 9, 63, 64, 65, 127, 128, 129, 191, 200]
sizes = st.one_of(st.sampled_from(EDGE_SIZES), st.integers(0, 300))


def model_runs(bits: list[bool], value: bool = True, first: int = 0, count: int | None = None) -> list[Extent]:
    """Maximal runs of ``value`` inside ``[first, first+count)``, one page at a time."""
    end = len(bits) if count is None else first + count
    runs: list[Extent] = []
    page = first
    while page < end:
        if bits[page] == value:
            start = page
            while page < end and bits[page] == value:
                page += 1
            runs.append(Extent(start, page - start))
        else:
            page += 1
    return runs


def model_packed(bits: list[bool]) -> bytes:
    """The packed little-bit-order bytes of ``bits``, one bit at a time."""
    out = bytearray((len(bits) + 7) // 8)
    for page, bit in enumerate(bits):
        if bit:
            out[page // 8] |= 1 << (page % 8)
    return bytes(out)


def from_model(bits: list[bool]) -> PageBitmap:
    """A PageBitmap with the set bits of ``bits``."""
    bitmap = PageBitmap(len(bits))
    for run in model_runs(bits):
        bitmap.set_range(run.first, run.count)
    return bitmap


@st.composite
def bit_lists(draw: st.DrawFn, npages: int | None = None) -> list[bool]:
    """Random bits, or a few random runs (so that long runs and word-filling ranges occur)."""
    n = draw(sizes) if npages is None else npages
    style = draw(st.sampled_from(["random", "runs"]))
    if style == "random":
        return draw(st.lists(st.booleans(), min_size=n, max_size=n))
    bits = [False] * n
    for _ in range(draw(st.integers(0, 6))):
        if n:
            first = draw(st.integers(0, n - 1))
            count = draw(st.integers(0, n - first))
            bits[first : first + count] = [True] * count
    return bits
