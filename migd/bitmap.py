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

Wire format of :meth:`PageBitmap.encode` (all integers little-endian)::

    magic "MGBM" | version u8 = 1 | encoding u8 | reserved u16 = 0 | npages u64 | body

* ``ENCODING_ZLIB`` (1): body is a zlib stream of the ``ceil(npages / 8)`` packed bytes.
* ``ENCODING_RUNS`` (2): body is LEB128 varints ``nruns, gap0, len0, gap1, len1, ...`` for
  the maximal runs of set bits: ``gap`` is the distance from the end of the previous run (or
  page 0) to the run's start and is >= 1 except for the first run, ``len`` >= 1. Sorted,
  non-overlapping, maximal runs are therefore the only thing the format can express, and
  ``nruns`` makes trailing bytes detectable.

The encoder emits whichever body is smaller; the decoder trusts nothing (see
:meth:`PageBitmap.decode`).
"""

from __future__ import annotations

import operator
import struct
import threading
import zlib
from typing import NamedTuple

import numpy as np

from migd.abi import PAGE_SHIFT
from migd.errors import GuestMemoryError, ProtocolError

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

MAGIC = b"MGBM"
VERSION = 1
ENCODING_ZLIB = 1
ENCODING_RUNS = 2
_HEADER = struct.Struct("<4sBBHQ")
# npages must stay below 2**63 so page numbers and run sums fit int64 / never wrap uint64.
_NPAGES_LIMIT = 1 << 63
# zlib level 1: on a 2 MiB bitmap with 100k runs it is ~5x faster than level 6 and within
# a few percent of its size (measured with bench/bitmap.py).
_ZLIB_LEVEL = 1
# Deflate cannot compress better than ~1032:1 (max match 258 bytes per >= 2 bits, RFC 1951),
# so a run body at most this small can never lose against zlib: skip compressing then.
_DEFLATE_MAX_RATIO = 1032
_LEB128_MAX_BYTES = 9  # 9 x 7 bits = 63 bits, enough for any value below _NPAGES_LIMIT

_WORD = np.dtype("<u8")
_ALL = (1 << 64) - 1
_U1 = np.uint64(1)
_U63 = np.uint64(63)
_EMPTY = np.zeros(0, dtype=np.int64)
_EMPTY.flags.writeable = False
_POPCOUNT8 = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


class BitmapDecodeError(ProtocolError):
    """An encoded bitmap from a peer or the journal is malformed, oversized or not canonical."""


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
    if array.dtype.kind == "u" and int(array.max()) >= _NPAGES_LIMIT:
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


def _leb128_encode(values: np.ndarray) -> bytes:
    """Unsigned LEB128 of every value (uint64, each < 2**63), concatenated."""
    if values.size == 0:
        return b""
    nbytes = np.ones(values.size, dtype=np.int64)
    for group in range(1, _LEB128_MAX_BYTES):
        nbytes += values >= np.uint64(1 << (7 * group))
    index = np.arange(int(nbytes.max()))
    groups = (values[:, None] >> (index.astype(np.uint64) * np.uint64(7))) & np.uint64(0x7F)
    more = index[None, :] < (nbytes[:, None] - 1)
    groups |= more.astype(np.uint64) << np.uint64(7)
    return bytes(groups[index[None, :] < nbytes[:, None]].astype(np.uint8).tobytes())


def _leb128_decode(body: bytes) -> np.ndarray:
    """Values (uint64) of concatenated canonical LEB128 varints; raises BitmapDecodeError."""
    raw = np.frombuffer(body, dtype=np.uint8)
    if raw.size == 0:
        return np.zeros(0, dtype=np.uint64)
    if raw[-1] & 0x80:
        raise BitmapDecodeError("run list truncated: last varint has its continuation bit set")
    last = np.flatnonzero((raw & 0x80) == 0)
    first = np.empty_like(last)
    first[0] = 0
    first[1:] = last[:-1] + 1
    length = last - first + 1
    if int(length.max()) > _LEB128_MAX_BYTES:
        raise BitmapDecodeError(f"run list varint longer than {_LEB128_MAX_BYTES} bytes")
    if np.any((length > 1) & (raw[last] == 0)):
        raise BitmapDecodeError("run list varint is not minimally encoded")
    owner = np.repeat(np.arange(last.size), length)
    shift = (np.arange(raw.size) - first[owner]).astype(np.uint64) * np.uint64(7)
    parts = (raw & 0x7F).astype(np.uint64) << shift
    return np.add.reduceat(parts, first)


class PageBitmap:
    """A fixed-size bitmap over ``npages`` guest pages; all bits start clear.

    Page arguments are page frame numbers (``gpa >> PAGE_SHIFT``); a range ``(first, count)``
    must satisfy ``0 <= first``, ``0 <= count``, ``first + count <= npages`` or the call
    raises :class:`GuestMemoryError`. ``count == 0`` is a valid empty range.
    """

    __slots__ = ("_lock", "_npages", "_words")

    def __init__(self, npages: int) -> None:
        npages = operator.index(npages)
        if not 0 <= npages < _NPAGES_LIMIT:
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
        """Compact self-describing serialization (see the module docstring for the format)."""
        snapshot = self.copy()
        nbytes = (self._npages + 7) >> 3
        runs: bytes | None = None
        # Each run costs at least two varint bytes; zlib never exceeds compressBound(nbytes).
        bound = nbytes + (nbytes >> 12) + (nbytes >> 14) + (nbytes >> 25) + 13
        if 2 * snapshot._run_count() <= bound:
            starts, counts = snapshot.extent_arrays(True)
            values = np.empty(1 + 2 * starts.size, dtype=np.uint64)
            values[0] = starts.size
            ends = starts + counts
            values[1::2] = starts - np.concatenate(([0], ends[:-1]))
            values[2::2] = counts
            runs = _leb128_encode(values)
        if runs is not None and len(runs) <= nbytes // _DEFLATE_MAX_RATIO:
            encoding, body = ENCODING_RUNS, runs
        else:
            packed = snapshot._words.view(np.uint8)[:nbytes]
            compressed = zlib.compress(packed.data, _ZLIB_LEVEL)
            if runs is not None and len(runs) <= len(compressed):
                encoding, body = ENCODING_RUNS, runs
            else:
                encoding, body = ENCODING_ZLIB, compressed
        return _HEADER.pack(MAGIC, VERSION, encoding, 0, self._npages) + body

    def _run_count(self) -> int:
        """Number of maximal runs of set bits (popcount of the rising edges)."""
        with self._lock:
            words = self._words
            rising = words & ~(words << _U1)
            rising[1:] &= ~(words[:-1] >> _U63)
        return _popcount(rising)

    @classmethod
    def decode(cls, data: bytes | memoryview, *, max_npages: int) -> PageBitmap:
        """Parse :meth:`encode` output from an untrusted source; raise BitmapDecodeError if bad.

        Rejects a bad magic, version, encoding or reserved field, ``npages > max_npages``, a
        zlib body that inflates to anything but ``ceil(npages / 8)`` bytes (inflating stops one
        byte past that, so a decompression bomb costs nothing), bits past ``npages``, runs
        that are empty, touching, overlapping or past ``npages``, non-canonical varints, and
        any trailing bytes.
        """
        max_npages = operator.index(max_npages)
        if not 0 <= max_npages < _NPAGES_LIMIT:
            raise ValueError(f"max_npages must be 0 <= max_npages < 2**63, got {max_npages}")
        raw = bytes(memoryview(data).cast("B"))
        if len(raw) < _HEADER.size:
            raise BitmapDecodeError(f"bitmap header truncated: expected {_HEADER.size} bytes, got {len(raw)}")
        magic, version, encoding, reserved, npages = _HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise BitmapDecodeError(f"bad bitmap magic: expected {MAGIC!r}, got {magic!r}")
        if version != VERSION:
            raise BitmapDecodeError(f"unsupported bitmap version: expected {VERSION}, got {version}")
        if reserved != 0:
            raise BitmapDecodeError(f"bitmap reserved field must be 0, got {reserved}")
        if npages > max_npages:
            raise BitmapDecodeError(f"bitmap too large: npages={npages} exceeds max_npages={max_npages}")
        body = raw[_HEADER.size :]
        if encoding == ENCODING_ZLIB:
            return cls._decode_zlib(npages, body)
        if encoding == ENCODING_RUNS:
            return cls._decode_runs(npages, body)
        raise BitmapDecodeError(f"unknown bitmap encoding {encoding}: expected {ENCODING_ZLIB} or {ENCODING_RUNS}")

    @classmethod
    def _decode_zlib(cls, npages: int, body: bytes) -> PageBitmap:
        nbytes = (npages + 7) >> 3
        inflater = zlib.decompressobj()
        try:
            packed = inflater.decompress(body, nbytes + 1)  # max_length 0 would mean unlimited
        except zlib.error as exc:
            raise BitmapDecodeError(f"bitmap zlib body is corrupt: {exc}") from exc
        if len(packed) != nbytes:
            got = "more" if len(packed) > nbytes else str(len(packed))
            raise BitmapDecodeError(f"bitmap zlib body must inflate to {nbytes} bytes, got {got}")
        if not inflater.eof:
            raise BitmapDecodeError("bitmap zlib body truncated: stream has no end")
        if inflater.unused_data:
            raise BitmapDecodeError(f"{len(inflater.unused_data)} trailing bytes after the bitmap zlib body")
        try:
            return cls.from_bytes(npages, packed)
        except GuestMemoryError as exc:
            raise BitmapDecodeError(str(exc)) from exc

    @classmethod
    def _decode_runs(cls, npages: int, body: bytes) -> PageBitmap:
        values = _leb128_decode(body)
        if values.size == 0:
            raise BitmapDecodeError("run list is empty: expected at least the run count")
        nruns = int(values[0])
        if values.size != 1 + 2 * nruns:
            what = "trailing bytes after" if values.size > 1 + 2 * nruns else "truncated"
            raise BitmapDecodeError(
                f"run list {what}: expected {nruns} (gap, length) pairs, got {values.size - 1} values"
            )
        if nruns == 0:
            return cls(npages)
        values = values[1:]
        if int(values.max()) > npages:
            raise BitmapDecodeError(f"run list value {int(values.max())} exceeds npages={npages}")
        gaps, lengths = values[0::2], values[1::2]
        if int(lengths.min()) == 0:
            raise BitmapDecodeError("run list has an empty run")
        if nruns > 1 and int(gaps[1:].min()) == 0:
            raise BitmapDecodeError("run list has touching or overlapping runs (gap 0)")
        # Every value <= npages < 2**63, so a sum wrapping past 2**64 first exceeds npages.
        bounds = np.cumsum(values, dtype=np.uint64)
        if int(bounds.max()) > npages:
            raise BitmapDecodeError(f"run list reaches page {int(bounds.max())}, past npages={npages}")
        bounds = bounds.astype(np.int64)
        words = _words_from_runs((npages + 63) >> 6, bounds[0::2], bounds[1::2])
        return cls._wrap(npages, words)
