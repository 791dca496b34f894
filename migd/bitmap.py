"""Page bitmaps: one bit per 4 KiB guest page, for the shared-page bitmap and the dirty log.

Layout: bit ``p`` (page frame number ``p = gpa >> PAGE_SHIFT``) lives in little-endian 64-bit
word ``p // 64`` at bit ``p % 64``. Viewed as bytes this is exactly ``np.packbits(...,
bitorder="little")`` and the KVM dirty-log layout (``KVM_GET_DIRTY_LOG`` returns little-endian
``unsigned long`` words). Bits past ``npages`` in the last word are always zero, so counts,
equality and serialization never see them.

Every operation works on whole words with numpy (a 64 GiB guest is 16 Mi pages = 2 MiB of
bitmap): ranges touch two edge words in Python and fill the middle; runs are found from the
edge word array ``y ^ (y << 1)`` and only its non-zero bytes are unpacked. No Python loop runs
per page or per word; :meth:`PageBitmap.extents` loops once per *run* to build tuples, and
:meth:`PageBitmap.extent_arrays` is the loop-free form for hot paths.

Thread safety: each bitmap owns one ``threading.Lock``, taken once per call by every method
that reads or writes its bits. The dirty log is written by the hypercall/dirty-tracking thread
while the migration thread calls :meth:`PageBitmap.fetch_and_clear`, which swaps the word array
for a fresh zeroed one under the lock, so a set either lands in the fetched copy or in the
bitmap after it -- never in the gap between "copy" and "clear" (the lost-dirty-page race that
KVM closes with ``KVM_CLEAR_DIRTY_LOG``'s atomic fetch-and-clear). Methods combining two
bitmaps snapshot the other one under its own lock first, so no two locks are ever held together.

Serialization: :meth:`PageBitmap.to_bytes` / :meth:`PageBitmap.from_bytes` give the raw packed
bits; :meth:`PageBitmap.encode` / :meth:`PageBitmap.decode` the compact wire format, which
lives in :mod:`migd.bitmap_codec` (its names are re-exported here).
"""

from __future__ import annotations

import operator
import threading
from typing import NamedTuple

import numpy as np

from migd.abi import PAGE_SHIFT
from migd.bitmap_codec import (
    ENCODING_RUNS,
    ENCODING_ZLIB,
    MAGIC,
    NPAGES_LIMIT,
    VERSION,
    BitmapDecodeError,
    decode_bitmap,
    encode_bitmap,
)
from migd.errors import GuestMemoryError

__all__ = [
    "BitmapDecodeError",
    "BitmapSizeError",
    "ENCODING_RUNS",
    "ENCODING_ZLIB",
    "Extent",
    "MAGIC",
    "PageBitmap",
    "VERSION",
]

_WORD = np.dtype("<u8")
_ALL = (1 << 64) - 1
_U1 = np.uint64(1)
_U63 = np.uint64(63)
_EMPTY = np.zeros(0, dtype=np.int64)
_EMPTY.flags.writeable = False
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class BitmapSizeError(GuestMemoryError):
    """Two bitmaps that must describe the same guest have different ``npages``."""


class Extent(NamedTuple):
    """A run of ``count`` contiguous guest pages starting at page frame number ``first``."""

    first: int
    count: int  # type: ignore[assignment]  # the API's name; shadows tuple.count on purpose

    @property
    def end(self) -> int:
        """The page frame number just past the run."""
        return self.first + self.count

    @property
    def gpa(self) -> int:
        """Guest-physical address of the first page."""
        return self.first << PAGE_SHIFT

    @property
    def nbytes(self) -> int:
        """Size of the run in bytes."""
        return self.count << PAGE_SHIFT


def _popcount(words: np.ndarray) -> int:
    """Number of set bits in an array of words."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: one SIMD popcount pass
        return int(np.bitwise_count(words).sum(dtype=np.int64))
    return int(_POPCOUNT8[words.view(np.uint8)].sum(dtype=np.int64))


def _edge_masks(first: int, end: int) -> tuple[int, int, int, int]:
    """Word span ``[w0, w1)`` of pages ``[first, end)`` (end > first) and its edge-word masks."""
    w0 = first >> 6
    w1 = ((end - 1) >> 6) + 1
    lo = (_ALL << (first & 63)) & _ALL
    hi = _ALL if end & 63 == 0 else (1 << (end & 63)) - 1
    return w0, w1, lo, hi


def _bit_positions(words: np.ndarray) -> np.ndarray:
    """Ascending indices (int64) of the set bits of ``words``; cost follows the non-zero bytes."""
    words = words.astype(_WORD, copy=False)
    nonzero_words = np.count_nonzero(words)
    if nonzero_words == 0:
        return _EMPTY
    # Measured on 16 Mi pages: with few non-zero words, gathering them first skips most of
    # the byte scan (1000 runs: 3.6 -> 0.6 ms); with many, one pass over the bytes wins.
    sparse = nonzero_words * 8 < words.size
    word_index = np.flatnonzero(words) if sparse else None
    as_bytes = (words[word_index] if sparse else words).view(np.uint8)
    byte_index = np.flatnonzero(as_bytes)
    bit_index = np.flatnonzero(np.unpackbits(as_bytes[byte_index], bitorder="little"))
    positions = (byte_index[bit_index >> 3] << 3) | (bit_index & 7)
    if word_index is not None:
        positions = (word_index[positions >> 6] << 6) | (positions & 63)
    result: np.ndarray = positions.astype(np.int64, copy=False)
    return result


def _int_array(values: np.ndarray, what: str) -> np.ndarray:
    """``values`` as a flat int64 array; raises TypeError unless it holds integers."""
    array = np.asarray(values)
    if array.size == 0:
        return _EMPTY
    if array.dtype.kind not in "iu":
        raise TypeError(f"{what} must be an integer array, got dtype {array.dtype}")
    array = array.ravel()
    if array.dtype.kind == "u" and int(array.max()) >= NPAGES_LIMIT:
        raise GuestMemoryError(f"{what} out of range: got {int(array.max())}")
    return array.astype(np.int64, copy=False)


def _words_from_runs(nwords: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Words with bits set on ``[starts[i], ends[i])``; runs must be disjoint and not touching.

    Marks every start and end as a toggle bit, then takes the prefix XOR: within a word by
    six shift-XOR steps, across words by the cumulative parity of the words before.
    """
    toggles = np.zeros(nwords + 1, dtype=_WORD)  # +1: an end may be exactly nwords * 64
    edges = np.concatenate((starts, ends)).astype(np.int64, copy=False)
    np.bitwise_or.at(toggles, edges >> 6, np.left_shift(_U1, (edges & 63).astype(np.uint64)))
    for shift in (1, 2, 4, 8, 16, 32):
        toggles ^= toggles << np.uint64(shift)
    parity = toggles >> _U63
    carry = (np.cumsum(parity, dtype=np.uint64) - parity) & _U1
    toggles ^= carry * np.uint64(_ALL)
    return toggles[:nwords]


class PageBitmap:
    """A fixed-size bitmap over ``npages`` guest pages; all bits start clear.

    Page arguments are page frame numbers (``gpa >> PAGE_SHIFT``); a range ``(first, count)``
    must satisfy ``0 <= first``, ``0 <= count``, ``first + count <= npages`` or the call
    raises :class:`GuestMemoryError`. ``count == 0`` is a valid empty range.
    """

    __slots__ = ("_lock", "_npages", "_words")

    def __init__(self, npages: int) -> None:
        npages = operator.index(npages)
        if not 0 <= npages < NPAGES_LIMIT:
            raise GuestMemoryError(f"bitmap size must be 0 <= npages < 2**63, got {npages}")
        self._npages = npages
        self._words = np.zeros((npages + 63) >> 6, dtype=_WORD)
        self._lock = threading.Lock()

    @classmethod
    def _wrap(cls, npages: int, words: np.ndarray) -> PageBitmap:
        """A bitmap owning ``words`` (already the right length, tail bits clear)."""
        bitmap = cls.__new__(cls)
        bitmap._npages = npages
        bitmap._words = words
        bitmap._lock = threading.Lock()
        return bitmap

    @property
    def npages(self) -> int:
        """Number of pages (bits) the bitmap covers."""
        return self._npages

    def _range(self, first: int, count: int | None) -> tuple[int, int]:
        """Validated ``(first, end)`` of a page range; ``count=None`` means up to ``npages``."""
        first = operator.index(first)
        if count is None:
            if not 0 <= first <= self._npages:
                raise GuestMemoryError(f"first page {first} outside the bitmap: expected 0 <= first <= {self._npages}")
            return first, self._npages
        count = operator.index(count)
        if first < 0 or count < 0 or first + count > self._npages:
            raise GuestMemoryError(
                f"page range first={first} count={count} outside the bitmap: expected "
                f"first >= 0, count >= 0 and first + count <= npages = {self._npages}"
            )
        return first, first + count

    def _check_peer(self, other: PageBitmap) -> np.ndarray:
        """Snapshot of ``other``'s words after checking it describes the same guest size."""
        if not isinstance(other, PageBitmap):
            raise TypeError(f"expected a PageBitmap, got {type(other).__name__}")
        if other._npages != self._npages:
            raise BitmapSizeError(f"bitmap sizes differ: expected npages={self._npages}, got {other._npages}")
        with other._lock:
            return other._words.copy()

    def _clear_tail(self, words: np.ndarray) -> None:
        """Zero the bits past ``npages`` in the last word (the class invariant)."""
        if self._npages & 63:
            words[-1] &= np.uint64((1 << (self._npages & 63)) - 1)

    def assign_range(self, first: int, count: int, value: bool) -> int:
        """Set (``value`` true) or clear pages ``[first, first+count)``; return how many changed."""
        first, end = self._range(first, count)
        if first == end:
            return 0
        w0, w1, lo, hi = _edge_masks(first, end)
        with self._lock:
            words = self._words
            if w1 - w0 == 1:
                return self._assign_word(words, w0, lo & hi, value)
            changed = self._assign_word(words, w0, lo, value) + self._assign_word(words, w1 - 1, hi, value)
            middle = words[w0 + 1 : w1 - 1]
            if middle.size:
                ones = _popcount(middle)
                changed += middle.size * 64 - ones if value else ones
                middle.fill(_ALL if value else 0)
            return changed

    @staticmethod
    def _assign_word(words: np.ndarray, index: int, mask: int, value: bool) -> int:
        old = int(words[index])
        new = old | mask if value else old & ~mask
        words[index] = new
        return (old ^ new).bit_count()

    def set_range(self, first: int, count: int) -> int:
        """Set pages ``[first, first+count)``; return how many bits changed 0 -> 1."""
        return self.assign_range(first, count, True)

    def clear_range(self, first: int, count: int) -> int:
        """Clear pages ``[first, first+count)``; return how many bits changed 1 -> 0."""
        return self.assign_range(first, count, False)

    def test(self, page: int) -> bool:
        """Whether the bit of ``page`` is set."""
        page = operator.index(page)
        if not 0 <= page < self._npages:
            raise GuestMemoryError(f"page {page} outside the bitmap: expected 0 <= page < {self._npages}")
        with self._lock:
            return bool((int(self._words[page >> 6]) >> (page & 63)) & 1)

    def count(self, first: int = 0, count: int | None = None) -> int:
        """Number of set bits in ``[first, first+count)`` (default: up to the last page)."""
        first, end = self._range(first, count)
        if first == end:
            return 0
        w0, w1, lo, hi = _edge_masks(first, end)
        with self._lock:
            words = self._words
            if w1 - w0 == 1:
                return (int(words[w0]) & lo & hi).bit_count()
            total = (int(words[w0]) & lo).bit_count() + (int(words[w1 - 1]) & hi).bit_count()
            return total + _popcount(words[w0 + 1 : w1 - 1])

    def all_set(self, first: int, count: int) -> bool:
        """Whether every page of the range is set (true for an empty range)."""
        return self.count(first, count) == operator.index(count)

    def any_set(self, first: int, count: int) -> bool:
        """Whether at least one page of the range is set (false for an empty range)."""
        return self.count(first, count) > 0

    def run_count(self) -> int:
        """Number of maximal runs of set bits (popcount of the rising edges; builds no extents)."""
        with self._lock:
            words = self._words
            rising = words & ~(words << _U1)
            rising[1:] &= ~(words[:-1] >> _U63)
        return _popcount(rising)

    def extent_arrays(
        self, value: bool = True, first: int = 0, count: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Maximal runs of bits equal to ``value`` inside the range, as ``(starts, counts)``.

        Both arrays are int64 and ascending by start; runs are clipped to the range.
        """
        first, end = self._range(first, count)
        if first == end:
            return _EMPTY.copy(), _EMPTY.copy()
        w0, w1, lo, hi = _edge_masks(first, end)
        n = w1 - w0
        y = np.empty(n + 1, dtype=_WORD)  # one zero word past the range closes a final run
        with self._lock:
            if value:
                y[:n] = self._words[w0:w1]
            else:
                np.invert(self._words[w0:w1], out=y[:n])
        y[n] = 0
        y[0] = int(y[0]) & lo
        y[n - 1] = int(y[n - 1]) & hi
        # A run starts or ends wherever a bit differs from the bit below it.
        edges = y << _U1
        edges[1:] |= y[:-1] >> _U63
        edges ^= y
        positions = _bit_positions(edges) + w0 * 64
        starts = np.ascontiguousarray(positions[0::2])
        return starts, positions[1::2] - starts

    def extents(self, value: bool = True, first: int = 0, count: int | None = None) -> list[Extent]:
        """Maximal runs of bits equal to ``value`` inside the range, ascending.

        Builds one tuple per run; hot paths should use :meth:`extent_arrays`.
        """
        starts, counts = self.extent_arrays(value, first, count)
        return list(map(Extent._make, zip(starts.tolist(), counts.tolist(), strict=True)))

    def set_pages(self, pages: np.ndarray) -> None:
        """Set the bits of an integer array of pages (any order, repeats allowed)."""
        array = _int_array(pages, "pages")
        if array.size == 0:
            return
        if int(array.min()) < 0 or int(array.max()) >= self._npages:
            raise GuestMemoryError(
                f"pages out of range: expected 0 <= page < npages = {self._npages}, "
                f"got min {int(array.min())} max {int(array.max())}"
            )
        bits = np.left_shift(_U1, (array & 63).astype(np.uint64))
        with self._lock:
            np.bitwise_or.at(self._words, array >> 6, bits)

    def set_extents(self, starts: np.ndarray, counts: np.ndarray) -> None:
        """Set every range ``[starts[i], starts[i] + counts[i])``; ranges may overlap or touch.

        The vectorized form of many :meth:`set_range` calls (one lock, no per-range Python).
        """
        start = _int_array(starts, "extent starts")
        length = _int_array(counts, "extent counts")
        if start.shape != length.shape:
            raise GuestMemoryError(f"expected as many extent counts as starts ({start.size}), got {length.size}")
        if start.size == 0:
            return
        if (
            int(start.min()) < 0
            or int(length.min()) < 0
            or int(start.max()) > self._npages
            or int(length.max()) > self._npages
            or int((start + length).max()) > self._npages
        ):
            raise GuestMemoryError(
                f"extents out of range: expected start >= 0, count >= 0 and start + count <= npages = {self._npages}"
            )
        keep = length > 0
        start, length = start[keep], length[keep]
        if start.size == 0:
            return
        order = np.argsort(start, kind="stable")
        start = start[order]
        reach = np.maximum.accumulate(start + length[order])
        # Merge overlapping and touching ranges: the toggle trick needs disjoint, gapped runs.
        opens = np.flatnonzero(np.concatenate(([True], start[1:] > reach[:-1])))
        closes = np.concatenate((opens[1:] - 1, [start.size - 1]))
        union = _words_from_runs(self._words.size, start[opens], reach[closes])
        with self._lock:
            self._words |= union

    def fetch_and_clear(self) -> PageBitmap:
        """Return the current bits and clear them, atomically with respect to other callers."""
        with self._lock:
            words = self._words
            self._words = np.zeros_like(words)  # calloc: no pass over memory under the lock
        return self._wrap(self._npages, words)

    def update(self, other: PageBitmap) -> None:
        """In-place union with ``other`` (same ``npages``, else :class:`BitmapSizeError`)."""
        theirs = self._check_peer(other)
        with self._lock:
            self._words |= theirs

    def copy(self) -> PageBitmap:
        """An independent bitmap with the same bits."""
        with self._lock:
            return self._wrap(self._npages, self._words.copy())

    def __or__(self, other: PageBitmap) -> PageBitmap:
        theirs = self._check_peer(other)
        with self._lock:
            theirs |= self._words
        return self._wrap(self._npages, theirs)

    def __and__(self, other: PageBitmap) -> PageBitmap:
        theirs = self._check_peer(other)
        with self._lock:
            theirs &= self._words
        return self._wrap(self._npages, theirs)

    def difference(self, other: PageBitmap) -> PageBitmap:
        """Pages set here and not in ``other`` (``self & ~other``)."""
        theirs = self._check_peer(other)
        np.invert(theirs, out=theirs)
        with self._lock:
            theirs &= self._words
        return self._wrap(self._npages, theirs)

    def __invert__(self) -> PageBitmap:
        with self._lock:
            words = np.invert(self._words)
        self._clear_tail(words)
        return self._wrap(self._npages, words)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PageBitmap):
            return NotImplemented
        if other is self:
            return True
        if other._npages != self._npages:
            return False
        theirs = self._check_peer(other)
        with self._lock:
            return bool(np.array_equal(self._words, theirs))

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        return f"PageBitmap(npages={self._npages}, set={self.count()})"

    def to_bytes(self) -> bytes:
        """The packed bits, little bit order: ``ceil(npages / 8)`` bytes."""
        with self._lock:
            return self._words.view(np.uint8)[: (self._npages + 7) >> 3].tobytes()

    @classmethod
    def from_bytes(cls, npages: int, data: bytes | memoryview) -> PageBitmap:
        """Inverse of :meth:`to_bytes`; the length must match and bits past ``npages`` be zero."""
        bitmap = cls(npages)
        raw = memoryview(data).cast("B")
        nbytes = (bitmap._npages + 7) >> 3
        if raw.nbytes != nbytes:
            raise GuestMemoryError(f"packed bitmap of {bitmap._npages} pages must be {nbytes} bytes, got {raw.nbytes}")
        if bitmap._npages & 7 and raw[nbytes - 1] >> (bitmap._npages & 7):
            raise GuestMemoryError(f"packed bitmap has bits set past npages = {bitmap._npages}")
        bitmap._words.view(np.uint8)[:nbytes] = np.frombuffer(raw, dtype=np.uint8)
        return bitmap

    def encode(self) -> bytes:
        """Compact self-describing serialization (format: :mod:`migd.bitmap_codec`)."""
        return encode_bitmap(self)

    @classmethod
    def decode(cls, data: bytes | memoryview, *, max_npages: int) -> PageBitmap:
        """Parse :meth:`encode` output from an untrusted source; raise BitmapDecodeError if bad.

        Every check is :func:`migd.bitmap_codec.decode_bitmap`'s: bad header fields,
        ``npages > max_npages``, decompression bombs, bits past ``npages``, non-canonical
        runs or varints and trailing bytes are all refused before a bitmap is built.
        """
        decoded = decode_bitmap(data, max_npages=max_npages)
        if decoded.runs is not None:
            starts, ends = decoded.runs
            return cls._wrap(decoded.npages, _words_from_runs((decoded.npages + 63) >> 6, starts, ends))
        if decoded.packed is None:  # excluded by DecodedBitmap.__post_init__; keeps -O honest
            raise BitmapDecodeError("decoded bitmap carries neither packed bits nor runs")
        return cls.from_bytes(decoded.npages, decoded.packed)
