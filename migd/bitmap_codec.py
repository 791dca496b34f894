"""Wire format of page bitmaps: the compact, self-describing encoding of a :class:`PageBitmap`.

The shared-page bitmap and the dirty log travel between hosts and into the journal in this
form (all integers little-endian)::

    magic "MGBM" | version u8 = 1 | encoding u8 | reserved u16 = 0 | npages u64 | body

* ``ENCODING_ZLIB`` (1): body is a zlib stream of the ``ceil(npages / 8)`` packed bytes
  (the layout of :meth:`PageBitmap.to_bytes`).
* ``ENCODING_RUNS`` (2): body is LEB128 varints ``nruns, gap0, len0, gap1, len1, ...`` for
  the maximal runs of set bits: ``gap`` is the distance from the end of the previous run (or
  page 0) to the run's start and is >= 1 except for the first run, ``len`` >= 1. Sorted,
  non-overlapping, maximal runs are therefore the only thing the format can express, and
  ``nruns`` makes trailing bytes detectable.

The encoder emits whichever body is smaller; the decoder trusts nothing (see
:func:`decode_bitmap`). Varints are encoded and decoded with numpy over the whole body, with
no Python loop per run.

This module knows the bitmap only through its public methods; :mod:`migd.bitmap` builds the
bitmap from a :class:`DecodedBitmap` (``PageBitmap.encode``/``PageBitmap.decode`` delegate here).
"""

from __future__ import annotations

import operator
import struct
import zlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from migd.errors import ProtocolError


class EncodableBitmap(Protocol):
    """What the encoder needs of a bitmap (``migd.bitmap.PageBitmap``, which imports this module)."""

    @property
    def npages(self) -> int: ...

    def copy(self) -> EncodableBitmap: ...

    def run_count(self) -> int: ...

    def extent_arrays(self, value: bool = True) -> tuple[np.ndarray, np.ndarray]: ...

    def to_bytes(self) -> bytes: ...

__all__ = [
    "BitmapDecodeError",
    "DecodedBitmap",
    "ENCODING_RUNS",
    "ENCODING_ZLIB",
    "HEADER_SIZE",
    "MAGIC",
    "NPAGES_LIMIT",
    "VERSION",
    "decode_bitmap",
    "encode_bitmap",
]

MAGIC = b"MGBM"
VERSION = 1
ENCODING_ZLIB = 1
ENCODING_RUNS = 2
_HEADER = struct.Struct("<4sBBHQ")
HEADER_SIZE = _HEADER.size
#: Every bitmap has ``npages < NPAGES_LIMIT``: page numbers and run sums then fit int64 and
#: never wrap uint64, and each varint fits :data:`_LEB128_MAX_BYTES` bytes.
NPAGES_LIMIT = 1 << 63
# zlib level 1: on a 2 MiB bitmap with 100k runs it is ~5x faster than level 6 and within
# a few percent of its size (measured with bench/bitmap.py).
_ZLIB_LEVEL = 1
# Deflate cannot compress better than ~1032:1 (max match 258 bytes per >= 2 bits, RFC 1951),
# so a run body at most this small can never lose against zlib: skip compressing then.
_DEFLATE_MAX_RATIO = 1032
_LEB128_MAX_BYTES = 9  # 9 x 7 bits = 63 bits, enough for any value below NPAGES_LIMIT


class BitmapDecodeError(ProtocolError):
    """An encoded bitmap from a peer or the journal is malformed, oversized or not canonical."""


@dataclass(frozen=True, eq=False)
class DecodedBitmap:
    """A validated bitmap body: exactly one of ``packed`` and ``runs`` is set.

    ``packed`` (zlib encoding): the ``ceil(npages / 8)`` packed bytes, bits past ``npages`` clear.
    ``runs`` (run encoding): ``(starts, ends)`` as int64 arrays of maximal runs of set bits,
    ascending, non-empty, neither touching nor overlapping, all within ``[0, npages]``.
    """

    npages: int
    packed: bytes | None = None
    runs: tuple[np.ndarray, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if (self.packed is None) == (self.runs is None):
            raise ValueError("DecodedBitmap needs exactly one of packed and runs")


def encode_bitmap(bitmap: EncodableBitmap) -> bytes:
    """Encode ``bitmap`` (a consistent snapshot of it: writers may go on meanwhile)."""
    snapshot = bitmap.copy()
    npages = snapshot.npages
    nbytes = (npages + 7) >> 3
    runs: bytes | None = None
    # Each run costs at least two varint bytes; zlib never exceeds compressBound(nbytes).
    # Counting runs first skips building run arrays for a bitmap that could never win.
    bound = nbytes + (nbytes >> 12) + (nbytes >> 14) + (nbytes >> 25) + 13
    if 2 * snapshot.run_count() <= bound:
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
        compressed = zlib.compress(snapshot.to_bytes(), _ZLIB_LEVEL)
        if runs is not None and len(runs) <= len(compressed):
            encoding, body = ENCODING_RUNS, runs
        else:
            encoding, body = ENCODING_ZLIB, compressed
    return _HEADER.pack(MAGIC, VERSION, encoding, 0, npages) + body


def decode_bitmap(data: bytes | memoryview, *, max_npages: int) -> DecodedBitmap:
    """Parse :func:`encode_bitmap` output from an untrusted source; raise BitmapDecodeError if bad.

    Rejects a bad magic, version, encoding or reserved field, ``npages > max_npages``, a
    zlib body that inflates to anything but ``ceil(npages / 8)`` bytes (inflating stops one
    byte past that, so a decompression bomb costs nothing), bits past ``npages``, runs
    that are empty, touching, overlapping or past ``npages``, non-canonical varints, and
    any trailing bytes. ``max_npages`` itself must be ``0 <= max_npages < NPAGES_LIMIT``
    (ValueError otherwise: that is the caller's bug, not the peer's).
    """
    max_npages = operator.index(max_npages)
    if not 0 <= max_npages < NPAGES_LIMIT:
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
        return DecodedBitmap(npages, packed=_decode_zlib(npages, body))
    if encoding == ENCODING_RUNS:
        return DecodedBitmap(npages, runs=_decode_runs(npages, body))
    raise BitmapDecodeError(f"unknown bitmap encoding {encoding}: expected {ENCODING_ZLIB} or {ENCODING_RUNS}")


def _decode_zlib(npages: int, body: bytes) -> bytes:
    """The packed bytes of a zlib body, checked for length, stream end and tail bits."""
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
    if npages & 7 and packed[-1] >> (npages & 7):
        raise BitmapDecodeError(f"packed bitmap has bits set past npages = {npages}")
    return packed


def _decode_runs(npages: int, body: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of a run-list body, checked to be canonical and inside ``npages``."""
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
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
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
    return np.ascontiguousarray(bounds[0::2]), np.ascontiguousarray(bounds[1::2])


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
