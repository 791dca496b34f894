"""The page-bitmap wire format: round trips against the reference model, the documented bytes,
compactness, and hostile input (malformed, oversized, non-canonical, decompression bombs)."""

from __future__ import annotations

import struct
import time
import zlib

import numpy as np
import pytest
from bitmap_model import bit_lists, from_model, model_packed, model_runs
from hypothesis import given, settings
from hypothesis import strategies as st

from migd import bitmap as bitmap_module
from migd.bitmap import Extent, PageBitmap
from migd.bitmap_codec import (
    ENCODING_RUNS,
    ENCODING_ZLIB,
    HEADER_SIZE,
    MAGIC,
    VERSION,
    BitmapDecodeError,
    DecodedBitmap,
    decode_bitmap,
    encode_bitmap,
)
from migd.errors import ProtocolError


def leb128(*values: int) -> bytes:
    """Unsigned LEB128, one value at a time (independent of the codec's numpy encoder)."""
    out = bytearray()
    for value in values:
        while True:
            byte = value & 0x7F
            value >>= 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                break
    return bytes(out)


def frame(npages: int, encoding: int, body: bytes, *, magic: bytes = MAGIC, version: int = VERSION) -> bytes:
    return struct.pack("<4sBBHQ", magic, version, encoding, 0, npages) + body


def runs_body(runs: list[Extent]) -> bytes:
    values = [len(runs)]
    end = 0
    for run in runs:
        values += [run.first - end, run.count]
        end = run.end
    return leb128(*values)


# --- round trips and the documented format -----------------------------------------------
@settings(max_examples=150, deadline=None)
@given(bits=bit_lists())
def test_encode_round_trip_and_picks_the_smaller(bits: list[bool]) -> None:
    bitmap = from_model(bits)
    data = bitmap.encode()
    again = PageBitmap.decode(data, max_npages=len(bits))
    assert again == bitmap and again.to_bytes() == model_packed(bits)
    assert PageBitmap.decode(memoryview(data), max_npages=len(bits)) == bitmap
    header = len(frame(0, 0, b""))
    assert len(data) <= header + len(runs_body(model_runs(bits)))
    assert len(data) <= header + len(zlib.compress(model_packed(bits), 1))


def test_encode_matches_the_documented_format() -> None:
    bits = [False] * 300
    bits[5:9] = [True] * 4
    bits[200:300] = [True] * 100
    expected = frame(300, ENCODING_RUNS, leb128(2, 5, 4, 191, 100))
    assert from_model(bits).encode() == expected
    # A hand-made zlib frame decodes too.
    assert PageBitmap.decode(frame(300, ENCODING_ZLIB, zlib.compress(model_packed(bits))), max_npages=300) == (
        from_model(bits)
    )


@pytest.mark.parametrize("kind", ["empty", "sparse", "full", "dense-with-holes", "random"])
def test_encode_is_compact(kind: str) -> None:
    npages = 1 << 20  # a 4 GiB guest: 128 KiB of raw bitmap
    bitmap = PageBitmap(npages)
    rng = np.random.default_rng(7)
    if kind == "sparse":
        bitmap.set_pages(rng.integers(0, npages, 100))
    elif kind == "full":
        bitmap.set_range(0, npages)
    elif kind == "dense-with-holes":
        bitmap.set_range(0, npages)
        bitmap = bitmap.difference(_with_pages(npages, rng.integers(0, npages, 100)))
    elif kind == "random":
        bitmap.set_pages(rng.integers(0, npages, npages // 2))
    data = bitmap.encode()
    raw = len(bitmap.to_bytes())
    limit = {"empty": 20, "sparse": 16 + 100 * 5, "full": 24, "dense-with-holes": 16 + 100 * 5, "random": raw + 64}
    assert len(data) <= limit[kind], (kind, len(data), raw)
    assert PageBitmap.decode(data, max_npages=npages) == bitmap


def _with_pages(npages: int, pages: np.ndarray) -> PageBitmap:
    bitmap = PageBitmap(npages)
    bitmap.set_pages(pages)
    return bitmap


# --- hostile input -------------------------------------------------------------------------
def _bomb() -> bytes:
    return zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros in ~64 KiB


HOSTILE: dict[str, tuple[bytes, str]] = {
    "empty": (b"", "truncated"),
    "short header": (frame(8, ENCODING_RUNS, b"")[:15], "truncated"),
    "bad magic": (frame(8, ENCODING_RUNS, leb128(0), magic=b"MGBX"), "magic"),
    "bad version": (frame(8, ENCODING_RUNS, leb128(0), version=2), "version"),
    "reserved set": (struct.pack("<4sBBHQ", MAGIC, VERSION, ENCODING_RUNS, 1, 8) + leb128(0), "reserved"),
    "unknown encoding": (frame(8, 7, leb128(0)), "encoding"),
    "too many pages": (frame(1001, ENCODING_RUNS, leb128(0)), "max_npages"),
    "huge npages": (frame((1 << 64) - 1, ENCODING_RUNS, leb128(0)), "max_npages"),
    "zlib corrupt": (frame(64, ENCODING_ZLIB, b"\x78\x9c\xff\xff\xff"), "corrupt"),
    "zlib truncated": (frame(800, ENCODING_ZLIB, zlib.compress(bytes(100))[:-4]), "truncated"),
    "zlib short": (frame(800, ENCODING_ZLIB, zlib.compress(bytes(99))), "100 bytes, got 99"),
    "zlib long": (frame(800, ENCODING_ZLIB, zlib.compress(bytes(101))), "got more"),
    "zlib bomb": (frame(64, ENCODING_ZLIB, _bomb()), "got more"),
    "zlib trailing": (frame(800, ENCODING_ZLIB, zlib.compress(bytes(100)) + b"\x00"), "trailing"),
    "zlib tail bits": (frame(12, ENCODING_ZLIB, zlib.compress(b"\x00\x10")), "past npages"),
    "runs empty body": (frame(8, ENCODING_RUNS, b""), "run count"),
    "runs truncated varint": (frame(1000, ENCODING_RUNS, leb128(1, 5) + b"\x85"), "continuation"),
    "runs missing pair": (frame(1000, ENCODING_RUNS, leb128(2, 5, 4)), "truncated"),
    "runs odd value": (frame(1000, ENCODING_RUNS, leb128(1, 5)), "truncated"),
    "runs trailing": (frame(1000, ENCODING_RUNS, leb128(1, 5, 4, 1, 1)), "trailing"),
    "runs overlong varint": (frame(1000, ENCODING_RUNS, leb128(1, 5) + b"\x80" * 9 + b"\x01"), "longer"),
    "runs non-minimal": (frame(1000, ENCODING_RUNS, leb128(1, 5) + b"\x84\x00"), "minimal"),
    "runs empty run": (frame(1000, ENCODING_RUNS, leb128(2, 5, 0, 3, 4)), "empty run"),
    "runs touching": (frame(1000, ENCODING_RUNS, leb128(2, 5, 4, 0, 4)), "touching or overlapping"),
    "runs past end": (frame(1000, ENCODING_RUNS, leb128(1, 990, 11)), "past npages"),
    "runs value too big": (frame(1000, ENCODING_RUNS, leb128(1, 1 << 40, 1)), "exceeds npages"),
    "runs sum past end": (frame(1000, ENCODING_RUNS, leb128(3, 1000, 1000, 1000, 1000, 1000, 1000)), "past npages"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_encodings_rejected(name: str) -> None:
    data, message = HOSTILE[name]
    start = time.perf_counter()
    with pytest.raises(BitmapDecodeError, match=message):
        PageBitmap.decode(data, max_npages=1000)
    assert time.perf_counter() - start < 2.0  # a bomb is refused without inflating it
    assert issubclass(BitmapDecodeError, ProtocolError)


def test_hostile_inputs_differ_from_valid_ones_only_in_the_fault() -> None:
    # Negative controls: the same frames with the fault removed decode fine.
    valid = [
        frame(8, ENCODING_RUNS, leb128(0)),
        frame(1000, ENCODING_RUNS, leb128(1, 5, 4)),
        frame(1000, ENCODING_RUNS, leb128(2, 5, 4, 1, 4)),
        frame(1000, ENCODING_RUNS, leb128(1, 989, 11)),
        frame(800, ENCODING_ZLIB, zlib.compress(bytes(100))),
        frame(12, ENCODING_ZLIB, zlib.compress(b"\x00\x08")),
        frame(1000, ENCODING_RUNS, leb128(1, 5) + b"\x84\x01"),
    ]
    for data in valid:
        PageBitmap.decode(data, max_npages=1000)
    assert PageBitmap.decode(valid[2], max_npages=1000).extents() == [Extent(5, 4), Extent(10, 4)]


@settings(max_examples=200, deadline=None)
@given(bits=bit_lists(), cut=st.integers(0, 1 << 16), junk=st.binary(min_size=1, max_size=8))
def test_truncated_or_extended_encodings_never_decode_silently(bits: list[bool], cut: int, junk: bytes) -> None:
    data = from_model(bits).encode()
    for mangled in (data[: cut % len(data)], data + junk):
        with pytest.raises(BitmapDecodeError):
            PageBitmap.decode(mangled, max_npages=len(bits))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=64), npages=st.integers(0, 300), encoding=st.sampled_from([1, 2]))
def test_random_bodies_decode_or_raise_decode_error(data: bytes, npages: int, encoding: int) -> None:
    try:
        bitmap = PageBitmap.decode(frame(npages, encoding, data), max_npages=300)
    except BitmapDecodeError:
        return
    assert bitmap.npages == npages
    assert PageBitmap.decode(bitmap.encode(), max_npages=300) == bitmap


def test_run_sums_that_wrap_uint64_are_rejected_before_allocating() -> None:
    # gap/length values just under npages = 2**62: the running sum wraps 2**64 after four
    # values. Decoding must refuse (and not try to allocate a 2**62-page bitmap).
    npages = 1 << 62
    data = frame(npages, ENCODING_RUNS, leb128(3, *([npages] * 6)))
    with pytest.raises(BitmapDecodeError, match="past npages"):
        PageBitmap.decode(data, max_npages=npages)


def test_decode_rejects_bad_max_npages() -> None:
    with pytest.raises(ValueError):
        PageBitmap.decode(frame(0, ENCODING_RUNS, leb128(0)), max_npages=-1)


# --- the codec's own API --------------------------------------------------------------------
def test_codec_names_are_re_exported_from_bitmap() -> None:
    # Callers that imported the format from migd.bitmap before the split keep working.
    for name in ("BitmapDecodeError", "ENCODING_RUNS", "ENCODING_ZLIB", "MAGIC", "VERSION"):
        assert getattr(bitmap_module, name) is globals()[name]
    assert HEADER_SIZE == len(frame(0, 0, b""))


def test_decode_bitmap_returns_the_body_in_its_own_form() -> None:
    bits = [False] * 300
    bits[5:9] = [True] * 4
    bits[200:300] = [True] * 100
    runs = decode_bitmap(frame(300, ENCODING_RUNS, runs_body(model_runs(bits))), max_npages=300)
    assert runs.npages == 300 and runs.packed is None and runs.runs is not None
    starts, ends = runs.runs
    assert starts.tolist() == [5, 200] and ends.tolist() == [9, 300]
    packed = decode_bitmap(frame(300, ENCODING_ZLIB, zlib.compress(model_packed(bits))), max_npages=300)
    assert packed.runs is None and packed.packed == model_packed(bits)
    # encode_bitmap and PageBitmap.encode are the same bytes.
    assert encode_bitmap(from_model(bits)) == from_model(bits).encode()


def test_decoded_bitmap_holds_exactly_one_body() -> None:
    empty = np.zeros(0, dtype=np.int64)
    with pytest.raises(ValueError, match="exactly one"):
        DecodedBitmap(8)
    with pytest.raises(ValueError, match="exactly one"):
        DecodedBitmap(8, packed=b"\x00", runs=(empty, empty))
    DecodedBitmap(8, packed=b"\x00")  # negative control
