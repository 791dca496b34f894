"""Guest RAM (sparse mmap'ed file) and the emulated memory-encryption engine (migd/platform/memory.py)."""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from migd.platform import memory
from migd.abi import PAGE_SIZE
from migd.errors import GuestMemoryError
from migd.platform.memory import GPA_LIMIT, VEK_SIZE, GuestRam, MemoryEncryption, new_vek

VEK_A = bytes(range(VEK_SIZE))
VEK_B = bytes(range(100, 100 + VEK_SIZE))


def _rand(nbytes: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(nbytes)


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


# --- slow reference: the docs/design.md §6 construction, one 16-byte block at a time ------


def _ref_masks(vek: bytes, gpa: int, nblocks: int) -> list[bytes]:
    tweak = Cipher(algorithms.AES(vek[16:]), modes.ECB()).encryptor()
    return [tweak.update((gpa // 16 + j).to_bytes(16, "big")) for j in range(nblocks)]


def ref_encrypt(vek: bytes, gpa: int, plaintext: bytes) -> bytes:
    data = Cipher(algorithms.AES(vek[:16]), modes.ECB()).encryptor()
    out = b""
    for j, mask in enumerate(_ref_masks(vek, gpa, len(plaintext) // 16)):
        out += _xor(mask, data.update(_xor(plaintext[16 * j : 16 * j + 16], mask)))
    return out


def ref_decrypt(vek: bytes, gpa: int, raw: bytes) -> bytes:
    data = Cipher(algorithms.AES(vek[:16]), modes.ECB()).decryptor()
    masks = _ref_masks(vek, gpa, len(raw) // 16)
    out = b""
    for page in range(len(raw) // PAGE_SIZE):
        chunk = raw[page * PAGE_SIZE : (page + 1) * PAGE_SIZE]
        if chunk == bytes(PAGE_SIZE):
            out += chunk  # never-populated memory reads as zeros
            continue
        for j in range(PAGE_SIZE // 16):
            mask = masks[page * PAGE_SIZE // 16 + j]
            out += _xor(mask, data.update(_xor(chunk[16 * j : 16 * j + 16], mask)))
    return out


def test_reference_matches_the_design_construction() -> None:
    # The reference itself against the spelled-out formula for one block, so the property
    # test below compares against the design rather than against a shared mistake.
    gpa, block = 0x7000, bytes(range(16))
    mask = Cipher(algorithms.AES(VEK_A[16:]), modes.ECB()).encryptor().update((0x700).to_bytes(16, "big"))
    inner = Cipher(algorithms.AES(VEK_A[:16]), modes.ECB()).encryptor().update(_xor(block, mask))
    expected_first_block = _xor(mask, inner)
    page = block + bytes(PAGE_SIZE - 16)
    assert ref_encrypt(VEK_A, gpa, page)[:16] == expected_first_block
    assert bytes(MemoryEncryption(VEK_A).encrypt(gpa, page)[:16]) == expected_first_block
    assert ref_encrypt(VEK_A, gpa + PAGE_SIZE, page)[:16] != expected_first_block  # control: GPA matters


# --- MemoryEncryption ------------------------------------------------------------------------


@pytest.mark.parametrize("npages", [1, 3, 64])
def test_round_trip(npages: int) -> None:
    rng = random.Random(npages)
    gpa = rng.randrange(0, 1 << 40) * PAGE_SIZE
    plaintext = _rand(npages * PAGE_SIZE, npages)
    engine = MemoryEncryption(VEK_A)
    raw = bytes(engine.encrypt(gpa, plaintext))
    assert len(raw) == len(plaintext)
    assert raw != plaintext
    assert bytes(engine.encrypt(gpa, plaintext)) == raw  # deterministic
    assert bytes(MemoryEncryption(VEK_A).encrypt(gpa, plaintext)) == raw  # per key, not per object
    assert bytes(engine.decrypt(gpa, raw)) == plaintext


def test_same_plaintext_differs_by_address() -> None:
    engine = MemoryEncryption(VEK_A)
    page = _rand(PAGE_SIZE, 1)
    two = bytes(engine.encrypt(0x10000, page + page))
    assert two[:PAGE_SIZE] != two[PAGE_SIZE:]  # same page, adjacent GPAs
    assert bytes(engine.encrypt(0x10000, page)) == two[:PAGE_SIZE]  # control: same GPA, same bytes
    # Within a page too: identical 16-byte blocks at different offsets encrypt differently.
    raw = bytes(engine.encrypt(0, bytes(PAGE_SIZE)))
    assert len({raw[i : i + 16] for i in range(0, PAGE_SIZE, 16)}) == PAGE_SIZE // 16


def test_runs_can_be_split_anywhere() -> None:
    # Deterministic per (key, GPA, block), not per call: extents may be cut differently on
    # the two sides of a migration.
    engine = MemoryEncryption(VEK_A)
    plaintext = _rand(5 * PAGE_SIZE, 2)
    whole = bytes(engine.encrypt(0x40000, plaintext))
    parts = b"".join(
        bytes(engine.encrypt(0x40000 + start * PAGE_SIZE, plaintext[start * PAGE_SIZE : end * PAGE_SIZE]))
        for start, end in [(0, 2), (2, 3), (3, 5)]
    )
    assert parts == whole


def test_moved_page_reads_as_garbage() -> None:
    engine = MemoryEncryption(VEK_A)
    plaintext = _rand(PAGE_SIZE, 3)
    raw = bytes(engine.encrypt(0x5000, plaintext))
    moved = bytes(engine.decrypt(0x6000, raw))
    assert moved != plaintext
    assert moved != bytes(PAGE_SIZE)
    assert bytes(engine.decrypt(0x5000, raw)) == plaintext  # control: at its own GPA it reads fine


def test_other_vek_reads_as_garbage() -> None:
    plaintext = _rand(2 * PAGE_SIZE, 4)
    raw = bytes(MemoryEncryption(VEK_A).encrypt(0x2000, plaintext))
    seen = bytes(MemoryEncryption(VEK_B).decrypt(0x2000, raw))
    assert seen != plaintext
    # Garbage everywhere: no 16-byte block survives.
    assert all(seen[i : i + 16] != plaintext[i : i + 16] for i in range(0, len(seen), 16))
    # Control: only the tweak key differs → still garbage; the right VEK reads it.
    assert bytes(MemoryEncryption(VEK_A[:16] + VEK_B[16:]).decrypt(0x2000, raw)) != plaintext
    assert bytes(MemoryEncryption(VEK_A).decrypt(0x2000, raw)) == plaintext


@pytest.mark.parametrize("bit", [0, 7, 8 * 16, 8 * 4095 + 7, 8 * PAGE_SIZE + 8 * 2000 + 3])
def test_flipped_raw_bit_garbles_exactly_one_block(bit: int) -> None:
    # XEX property (as SEV on hardware): the block cipher diffuses within its 16-byte block
    # and the tweak masks are independent per block, so a flipped ciphertext bit garbles the
    # whole 16-byte block it lies in and nothing else (no propagation like CBC, no bit-exact
    # malleability like CTR).
    engine = MemoryEncryption(VEK_A)
    plaintext = _rand(2 * PAGE_SIZE, 5)
    raw = bytearray(engine.encrypt(0x9000, plaintext))
    raw[bit // 8] ^= 1 << (bit % 8)
    seen = bytes(engine.decrypt(0x9000, raw))
    damaged = [i // 16 for i in range(0, len(seen), 16) if seen[i : i + 16] != plaintext[i : i + 16]]
    assert damaged == [bit // 8 // 16]
    changed_bits = sum(bin(a ^ b).count("1") for a, b in zip(seen, plaintext, strict=True))
    assert changed_bits > 1  # diffused, not a 1:1 bit flip


def test_raw_zero_page_reads_as_zeros_mid_run() -> None:
    engine = MemoryEncryption(VEK_A)
    plaintext = _rand(5 * PAGE_SIZE, 6)
    raw = bytearray(engine.encrypt(0, plaintext))
    raw[2 * PAGE_SIZE : 3 * PAGE_SIZE] = bytes(PAGE_SIZE)
    seen = bytes(engine.decrypt(0, raw))
    assert seen[2 * PAGE_SIZE : 3 * PAGE_SIZE] == bytes(PAGE_SIZE)
    assert seen[: 2 * PAGE_SIZE] == plaintext[: 2 * PAGE_SIZE]
    assert seen[3 * PAGE_SIZE :] == plaintext[3 * PAGE_SIZE :]
    # Control: one non-zero raw byte makes it a normal (here: garbage) page again.
    raw[3 * PAGE_SIZE - 1] = 1
    almost = bytes(engine.decrypt(0, raw))[2 * PAGE_SIZE : 3 * PAGE_SIZE]
    assert almost != bytes(PAGE_SIZE)
    assert almost == ref_decrypt(VEK_A, 2 * PAGE_SIZE, bytes(raw[2 * PAGE_SIZE : 3 * PAGE_SIZE]))


def test_whole_zero_run_reads_as_zeros_in_place() -> None:
    engine = MemoryEncryption(VEK_A)
    buf = bytearray(3 * PAGE_SIZE)
    assert bytes(engine.decrypt(0x1000, buf, out=buf)) == bytes(3 * PAGE_SIZE)
    dirty = bytearray(b"\xaa" * 3 * PAGE_SIZE)  # control: a stale out buffer is overwritten
    assert bytes(engine.decrypt(0x1000, bytes(3 * PAGE_SIZE), out=dirty)) == bytes(3 * PAGE_SIZE)


def test_plaintext_zero_page_is_stored_non_zero() -> None:
    raw = bytes(MemoryEncryption(VEK_A).encrypt(0x3000, bytes(PAGE_SIZE)))
    assert raw.count(0) < 64  # random-looking: ~16 of 4096 bytes zero by chance
    assert bytes(MemoryEncryption(VEK_A).decrypt(0x3000, raw)) == bytes(PAGE_SIZE)


def test_in_place_and_out_buffers() -> None:
    engine = MemoryEncryption(VEK_A)
    plaintext = _rand(3 * PAGE_SIZE, 7)
    expected = bytes(engine.encrypt(0x8000, plaintext))
    buf = bytearray(plaintext)
    result = engine.encrypt(0x8000, buf, out=buf)
    assert bytes(buf) == expected and result.obj is buf
    engine.decrypt(0x8000, memoryview(buf), out=memoryview(buf))
    assert bytes(buf) == plaintext
    big = bytearray(b"\xee" * (5 * PAGE_SIZE))
    result = engine.encrypt(0x8000, plaintext, out=big)
    assert len(result) == len(plaintext) and bytes(result) == expected
    assert big[len(plaintext) :] == b"\xee" * (2 * PAGE_SIZE)  # nothing written past the run
    # Non-byte buffers are taken as their raw bytes.
    words = np.frombuffer(plaintext, dtype=np.uint64)
    assert bytes(engine.encrypt(0x8000, memoryview(words))) == expected


def test_empty_run() -> None:
    engine = MemoryEncryption(VEK_A)
    assert len(engine.encrypt(0x1000, b"")) == 0
    assert len(engine.decrypt(0x1000, b"", out=bytearray(PAGE_SIZE))) == 0


@pytest.mark.parametrize(
    ("gpa", "nbytes", "match"),
    [
        (1, PAGE_SIZE, "multiple of 0x1000"),
        (-PAGE_SIZE, PAGE_SIZE, "non-negative"),
        (0, PAGE_SIZE + 16, "multiple of 4096"),
        (0, 16, "multiple of 4096"),
        (GPA_LIMIT - PAGE_SIZE, 2 * PAGE_SIZE, "64-bit"),
        (GPA_LIMIT, PAGE_SIZE, "64-bit"),
    ],
)
def test_engine_rejects_bad_runs(gpa: int, nbytes: int, match: str) -> None:
    engine = MemoryEncryption(VEK_A)
    with pytest.raises(GuestMemoryError, match=match):
        engine.encrypt(gpa, bytes(nbytes))
    with pytest.raises(GuestMemoryError, match=match):
        engine.decrypt(gpa, bytes(nbytes))


def test_engine_accepts_the_top_page() -> None:
    # Control for the 64-bit bound: the last page of the address space is valid.
    engine = MemoryEncryption(VEK_A)
    plaintext = _rand(PAGE_SIZE, 8)
    raw = bytes(engine.encrypt(GPA_LIMIT - PAGE_SIZE, plaintext))
    assert raw == ref_encrypt(VEK_A, GPA_LIMIT - PAGE_SIZE, plaintext)


def test_engine_rejects_bad_out_buffers() -> None:
    engine = MemoryEncryption(VEK_A)
    plaintext = bytes(2 * PAGE_SIZE)
    with pytest.raises(ValueError, match=f"at least {2 * PAGE_SIZE} bytes, got {PAGE_SIZE}"):
        engine.encrypt(0, plaintext, out=bytearray(PAGE_SIZE))
    with pytest.raises(ValueError, match="writable"):
        engine.encrypt(0, plaintext, out=memoryview(bytearray(2 * PAGE_SIZE)).toreadonly())
    shared = memoryview(bytearray(3 * PAGE_SIZE))
    with pytest.raises(ValueError, match="partially overlaps"):
        engine.encrypt(0, shared[: 2 * PAGE_SIZE], out=shared[PAGE_SIZE:])
    with pytest.raises(ValueError, match="partially overlaps"):
        engine.decrypt(0, shared[PAGE_SIZE:], out=shared[: 2 * PAGE_SIZE])
    # Overlap hidden behind a numpy exporter is found too.
    words = np.frombuffer(shared, dtype=np.uint64)
    with pytest.raises(ValueError, match="partially overlaps"):
        engine.encrypt(0, memoryview(words[512:1536]), out=shared[: 2 * PAGE_SIZE])
    # Control: adjacent, non-overlapping halves of one buffer are fine.
    engine.encrypt(0, shared[:PAGE_SIZE], out=shared[PAGE_SIZE : 2 * PAGE_SIZE])
    with pytest.raises(ValueError, match="C-contiguous"):
        engine.encrypt(0, memoryview(bytearray(2 * PAGE_SIZE))[::2])


def test_vek_validation() -> None:
    with pytest.raises(ValueError, match="32 bytes, got 16"):
        MemoryEncryption(bytes(16))
    with pytest.raises(ValueError, match="32 bytes, got 33"):
        MemoryEncryption(bytes(33))
    with pytest.raises(ValueError, match="must differ"):
        MemoryEncryption(bytes(16) * 2)
    MemoryEncryption(bytes(31) + b"\x01")  # control: halves differ in one bit
    assert len(new_vek()) == VEK_SIZE
    assert new_vek() != new_vek()
    assert "key" in repr(MemoryEncryption(VEK_A)) and VEK_A.hex() not in repr(MemoryEncryption(VEK_A))


page_contents = st.lists(st.sampled_from(["random", "zero", "one-byte"]), min_size=1, max_size=3)
gpa_pages = st.one_of(
    st.integers(0, (1 << 40) - 1), st.integers((GPA_LIMIT // PAGE_SIZE) - 16, GPA_LIMIT // PAGE_SIZE - 3)
)


def _pages(kinds: list[str], seed: int) -> bytes:
    rng = random.Random(seed)
    out = b""
    for kind in kinds:
        if kind == "random":
            out += rng.randbytes(PAGE_SIZE)
        elif kind == "zero":
            out += bytes(PAGE_SIZE)
        else:
            page = bytearray(PAGE_SIZE)
            page[rng.randrange(PAGE_SIZE)] = rng.randrange(1, 256)
            out += page
    return out


@settings(max_examples=40, deadline=None)
@given(page=gpa_pages, kinds=page_contents, seed=st.integers(0, 2**32))
def test_matches_reference(page: int, kinds: list[str], seed: int) -> None:
    gpa = page * PAGE_SIZE
    vek = random.Random(seed).randbytes(VEK_SIZE)
    engine = MemoryEncryption(vek)
    data = _pages(kinds, seed)
    # As plaintext: the bulk engine stores exactly what the per-block reference stores.
    raw = bytes(engine.encrypt(gpa, data))
    assert raw == ref_encrypt(vek, gpa, data)
    assert bytes(engine.decrypt(gpa, raw)) == data
    # As raw memory (zero pages = never populated): the same reading as the reference.
    assert bytes(engine.decrypt(gpa, data)) == ref_decrypt(vek, gpa, data)


# --- GuestRam --------------------------------------------------------------------------------

NPAGES = 64


@pytest.fixture
def ram(tmp_path: Path) -> Iterator[GuestRam]:
    with GuestRam(tmp_path / "guest.ram", NPAGES, create=True) as r:
        yield r


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _punch_supported(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.write_bytes(b"\x01" * 2 * PAGE_SIZE)
    fd = os.open(probe, os.O_RDWR)
    try:
        return memory.punch_hole(fd, 0, PAGE_SIZE)
    finally:
        os.close(fd)


def test_create_is_sparse_and_reads_zero(tmp_path: Path) -> None:
    path = tmp_path / "big.ram"
    with GuestRam(path, 4096, create=True) as r:  # 16 MiB
        assert (r.path, r.npages, r.size) == (path, 4096, 4096 * PAGE_SIZE)
        assert os.stat(path).st_size == r.size
        assert _allocated(path) <= 64 * 1024
        assert r.read(0, 4) == bytes(4 * PAGE_SIZE)
        assert not r.nonzero_pages(0, 4096).any()
        # Control: writing every page does allocate.
        r.write(0, b"\x01" * r.size)
        r.flush()
        assert _allocated(path) >= r.size


def test_write_read_view(ram: GuestRam) -> None:
    data = _rand(3 * PAGE_SIZE, 9)
    ram.write(5 * PAGE_SIZE, data)
    assert ram.read(5 * PAGE_SIZE, 3) == data
    assert ram.read(4 * PAGE_SIZE, 1) == bytes(PAGE_SIZE)  # neighbours untouched
    assert ram.read(8 * PAGE_SIZE, 1) == bytes(PAGE_SIZE)
    view = ram.view(6 * PAGE_SIZE, 1)
    assert not view.readonly and len(view) == PAGE_SIZE
    view[0] = 0x42  # writes through to the mapping
    assert ram.read(6 * PAGE_SIZE, 1)[0] == 0x42
    assert len(ram.view(NPAGES * PAGE_SIZE, 0)) == 0
    with pytest.raises(GuestMemoryError, match="multiple of 4096, got 4097"):
        ram.write(0, bytes(PAGE_SIZE + 1))


BAD_RANGES = [
    pytest.param(1, 1, "multiple of 0x1000", id="unaligned"),
    pytest.param(PAGE_SIZE + 8, 1, "multiple of 0x1000", id="unaligned-mid"),
    pytest.param(-PAGE_SIZE, 1, "non-negative", id="negative-gpa"),
    pytest.param(0, -1, "npages must be >= 0", id="negative-npages"),
    pytest.param(0, NPAGES + 1, "past the end", id="too-long"),
    pytest.param(NPAGES * PAGE_SIZE, 1, "past the end", id="past-end"),
    pytest.param((NPAGES - 1) * PAGE_SIZE, 2**64, "past the end", id="overflow-npages"),
    pytest.param(GPA_LIMIT - PAGE_SIZE, 2, "past the end", id="overflow-gpa"),
]


@pytest.mark.parametrize(("gpa", "npages", "match"), BAD_RANGES)
@pytest.mark.parametrize("method", ["view", "read", "zero", "nonzero_pages"])
def test_range_validation(ram: GuestRam, method: str, gpa: int, npages: int, match: str) -> None:
    with pytest.raises(GuestMemoryError, match=match):
        getattr(ram, method)(gpa, npages)


@pytest.mark.parametrize("method", ["view", "read", "zero", "nonzero_pages"])
def test_range_edges_accepted(ram: GuestRam, method: str) -> None:
    # Controls for the bounds above: the last page and an empty range at the end are valid.
    getattr(ram, method)((NPAGES - 1) * PAGE_SIZE, 1)
    getattr(ram, method)(NPAGES * PAGE_SIZE, 0)
    getattr(ram, method)(0, NPAGES)


def test_write_and_private_ranges_checked(ram: GuestRam) -> None:
    engine = MemoryEncryption(VEK_A)
    with pytest.raises(GuestMemoryError, match="past the end"):
        ram.write((NPAGES - 1) * PAGE_SIZE, bytes(2 * PAGE_SIZE))
    with pytest.raises(GuestMemoryError, match="past the end"):
        engine.write_private(ram, (NPAGES - 1) * PAGE_SIZE, bytes(2 * PAGE_SIZE))
    with pytest.raises(GuestMemoryError, match="multiple of 4096"):
        engine.write_private(ram, 0, bytes(100))
    with pytest.raises(GuestMemoryError, match="past the end"):
        engine.read_private(ram, 0, NPAGES + 1)
    assert not ram.nonzero_pages(0, NPAGES).any()  # nothing was written by the failed calls


def test_private_access_through_ram(ram: GuestRam) -> None:
    engine = MemoryEncryption(VEK_A)
    plaintext = _rand(4 * PAGE_SIZE, 10)
    engine.write_private(ram, 10 * PAGE_SIZE, plaintext)
    raw = ram.read(10 * PAGE_SIZE, 4)
    assert raw != plaintext and raw == bytes(engine.encrypt(10 * PAGE_SIZE, plaintext))
    assert bytes(engine.read_private(ram, 10 * PAGE_SIZE, 4)) == plaintext
    out = bytearray(4 * PAGE_SIZE)
    assert engine.read_private(ram, 10 * PAGE_SIZE, 4, out=out).obj is out and bytes(out) == plaintext
    # Never-populated neighbours read as zeros through the key too.
    assert bytes(engine.read_private(ram, 9 * PAGE_SIZE, 1)) == bytes(PAGE_SIZE)
    assert bytes(MemoryEncryption(VEK_B).read_private(ram, 10 * PAGE_SIZE, 4)) != plaintext


def test_zero_punches_holes(tmp_path: Path, ram: GuestRam) -> None:
    ram.write(0, _rand(NPAGES * PAGE_SIZE, 11))
    ram.flush()
    before = _allocated(ram.path)
    early_view = ram.view(16 * PAGE_SIZE, 32)
    ram.zero(16 * PAGE_SIZE, 32)
    assert bytes(early_view) == bytes(32 * PAGE_SIZE)  # the mapping sees the hole at once
    assert ram.read(16 * PAGE_SIZE, 32) == bytes(32 * PAGE_SIZE)
    assert ram.read(15 * PAGE_SIZE, 1) != bytes(PAGE_SIZE)  # control: neighbours keep data
    assert ram.read(48 * PAGE_SIZE, 1) != bytes(PAGE_SIZE)
    expected = np.ones(NPAGES, dtype=bool)
    expected[16:48] = False
    assert (ram.nonzero_pages(0, NPAGES) == expected).all()
    if not _punch_supported(tmp_path):
        pytest.skip("filesystem cannot punch holes; content checked above")
    assert _allocated(ram.path) <= before - 32 * PAGE_SIZE


def test_zero_falls_back_to_writing_zeros(ram: GuestRam, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    def unsupported(fd: int, offset: int, length: int) -> bool:
        calls.append((offset, length))
        return False

    monkeypatch.setattr(memory, "punch_hole", unsupported)
    ram.write(0, b"\x07" * 4 * PAGE_SIZE)
    ram.zero(PAGE_SIZE, 2)
    assert calls == [(PAGE_SIZE, 2 * PAGE_SIZE)]
    assert ram.read(0, 4) == b"\x07" * PAGE_SIZE + bytes(2 * PAGE_SIZE) + b"\x07" * PAGE_SIZE


def test_punch_hole_reports_real_errors(tmp_path: Path) -> None:
    if memory._libc_fallocate() is None:
        pytest.skip("no fallocate(2) in this libc")
    fd = os.open(tmp_path / "ro", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        with pytest.raises(GuestMemoryError, match="punching a hole"):
            memory.punch_hole(fd, 0, PAGE_SIZE)  # EBADF: not open for writing
    finally:
        os.close(fd)


def test_nonzero_pages_matches_reference(ram: GuestRam) -> None:
    rng = random.Random(12)
    for page in rng.sample(range(NPAGES), 20):
        offset = rng.choice([0, PAGE_SIZE - 1, rng.randrange(PAGE_SIZE)])
        ram.view(page * PAGE_SIZE, 1)[offset] = rng.randrange(1, 256)
    raw = ram.read(0, NPAGES)
    reference = [raw[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] != bytes(PAGE_SIZE) for p in range(NPAGES)]
    assert sum(reference) == 20
    assert ram.nonzero_pages(0, NPAGES).tolist() == reference
    assert ram.nonzero_pages(8 * PAGE_SIZE, 10).tolist() == reference[8:18]
    result = ram.nonzero_pages(0, 0)
    assert result.dtype == bool and result.shape == (0,)


def test_reopen_sees_data(tmp_path: Path) -> None:
    path = tmp_path / "guest.ram"
    data = _rand(2 * PAGE_SIZE, 13)
    with GuestRam(path, 8, create=True) as r:
        r.write(3 * PAGE_SIZE, data)
    with GuestRam(path, 8) as r:
        assert r.read(3 * PAGE_SIZE, 2) == data
        assert r.read(0, 1) == bytes(PAGE_SIZE)


def test_open_errors(tmp_path: Path) -> None:
    path = tmp_path / "guest.ram"
    with GuestRam(path, 8, create=True) as r:
        r.write(0, b"\x09" * PAGE_SIZE)
    with pytest.raises(GuestMemoryError, match=f"is {8 * PAGE_SIZE} bytes, expected {9 * PAGE_SIZE}"):
        GuestRam(path, 9)
    with pytest.raises(GuestMemoryError, match="already exists"):
        GuestRam(path, 8, create=True)
    assert os.stat(path).st_size == 8 * PAGE_SIZE  # the existing guest was left alone
    with GuestRam(path, 8) as r:
        assert r.read(0, 1) == b"\x09" * PAGE_SIZE
    with pytest.raises(GuestMemoryError, match="cannot open"):
        GuestRam(tmp_path / "missing.ram", 8)
    with pytest.raises(GuestMemoryError, match="at least one page"):
        GuestRam(tmp_path / "empty.ram", 0, create=True)
    assert not (tmp_path / "empty.ram").exists()


def test_failed_create_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "ftruncate", no_space)
    with pytest.raises(GuestMemoryError, match="No space"):
        GuestRam(tmp_path / "guest.ram", 8, create=True)
    assert not (tmp_path / "guest.ram").exists()


def test_close(tmp_path: Path) -> None:
    r = GuestRam(tmp_path / "guest.ram", 4, create=True)
    held = r.view(0, 1)
    r.close()
    r.close()  # closing twice is fine
    with pytest.raises(GuestMemoryError, match="closed"):
        r.view(0, 1)
    with pytest.raises(GuestMemoryError, match="closed"):
        r.zero(0, 1)
    with pytest.raises(GuestMemoryError, match="closed"):
        r.flush()
    # A view taken before close stays usable (the unmap waits for it) and writes reach the file.
    held[:4] = b"abcd"
    held.release()
    with GuestRam(tmp_path / "guest.ram", 4) as again:
        assert again.read(0, 1)[:4] == b"abcd"
    assert "closed" in repr(r)


# --- holes of the sparse file: found without reading them ------------------------------------


def _reference_nonzero(ram: GuestRam, npages: int) -> list[bool]:
    # pread, not the mapping: a read(2) of a hole returns zeros without allocating it.
    raw = os.pread(ram._fd, npages * PAGE_SIZE, 0)
    return [raw[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] != bytes(PAGE_SIZE) for p in range(npages)]


def test_populated_pages_inside_large_holes_are_found(shm_dir: Path) -> None:
    npages = 8192
    with GuestRam(shm_dir / "guest.ram", npages, create=True) as ram:
        for page in (0, 1, 700, 4095, 8191):
            ram.write(page * PAGE_SIZE, _rand(PAGE_SIZE, page))
        # A page whose first word is zero must still count (the first-word shortcut).
        ram.write(3000 * PAGE_SIZE, bytes(8) + b"\x01" + bytes(PAGE_SIZE - 9))
        ram.write(5000 * PAGE_SIZE, bytes(PAGE_SIZE))  # allocated but all zero: data, yet a zero page
        before = _allocated(ram.path)
        nonzero = ram.nonzero_pages(0, npages)
        assert np.flatnonzero(nonzero).tolist() == [0, 1, 700, 3000, 4095, 8191]
        assert nonzero.tolist() == _reference_nonzero(ram, npages)
        populated = ram.populated_pages(0, npages)
        assert set(np.flatnonzero(populated).tolist()) >= {0, 1, 700, 3000, 4095, 5000, 8191}
        assert not populated[2:700].any() and not populated[5001:8191].any()
        # Holes were not read through the mapping: on tmpfs that would have allocated them.
        assert _allocated(ram.path) == before
        assert ram.next_populated(2 * PAGE_SIZE, npages - 2) == 700 * PAGE_SIZE
        assert ram.next_populated(701 * PAGE_SIZE, 100) == 801 * PAGE_SIZE  # none in range: its end
        assert ram.next_populated(8191 * PAGE_SIZE, 1) == 8191 * PAGE_SIZE
        assert ram.nonzero_pages(600 * PAGE_SIZE, 200).tolist() == _reference_nonzero(ram, 800)[600:]


def test_punched_pages_count_as_holes_again(shm_dir: Path) -> None:
    with GuestRam(shm_dir / "guest.ram", 64, create=True) as ram:
        ram.write(0, _rand(64 * PAGE_SIZE, 3))
        ram.zero(10 * PAGE_SIZE, 20)
        assert ram.nonzero_pages(0, 64).tolist() == [not 10 <= p < 30 for p in range(64)]
        if _punch_supported(shm_dir):
            assert ram.next_populated(10 * PAGE_SIZE, 20) == 30 * PAGE_SIZE


def test_non_resident_data_counts_as_populated(shm_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mincore() says "not in memory" for a swapped-out tmpfs page: SEEK_DATA must overrule it."""

    def nothing_resident(addr: int, length: int, vec: object) -> int:
        return 0  # leaves the vector all zero: no page resident

    with GuestRam(shm_dir / "guest.ram", 256, create=True) as ram:
        ram.write(100 * PAGE_SIZE, _rand(3 * PAGE_SIZE, 4))
        monkeypatch.setattr(memory, "_libc_mincore", lambda: nothing_resident)
        populated = ram.populated_pages(0, 256)
        assert populated[100:103].all()  # data, though "not resident"
        assert not populated[:100].any()  # before the first data: SEEK_DATA's hole
        assert ram.nonzero_pages(0, 256).tolist() == [100 <= p < 103 for p in range(256)]


def test_without_seek_data_every_page_is_scanned(ram: GuestRam, monkeypatch: pytest.MonkeyPatch) -> None:
    real_lseek = os.lseek

    def no_seek_data(fd: int, pos: int, how: int) -> int:
        if how == os.SEEK_DATA:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_lseek(fd, pos, how)

    ram.write(40 * PAGE_SIZE, _rand(PAGE_SIZE, 5))
    monkeypatch.setattr(os, "lseek", no_seek_data)
    assert ram.next_populated(0, NPAGES) == 0
    assert ram.populated_pages(0, NPAGES).all()
    assert np.flatnonzero(ram.nonzero_pages(0, NPAGES)).tolist() == [40]


def test_close_waits_for_a_write_in_flight(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker thread's write and the loop's close: the write never reaches a closed descriptor."""
    ram = GuestRam(tmp_path / "guest.ram", 4, create=True)
    entered, release = threading.Event(), threading.Event()
    real_pwrite = os.pwrite
    fds: list[int] = []

    def slow_pwrite(fd: int, data: object, offset: int) -> int:
        fds.append(fd)
        entered.set()
        assert release.wait(10)
        return real_pwrite(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    writer = threading.Thread(target=ram.write, args=(0, b"\x05" * PAGE_SIZE))
    writer.start()
    assert entered.wait(10)
    closer = threading.Thread(target=ram.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # close() waits for the write (without the lock it would be done)
    release.set()
    writer.join(10)
    closer.join(10)
    assert not closer.is_alive() and not writer.is_alive()
    with pytest.raises(GuestMemoryError, match="closed"):
        ram.write(0, b"\x06" * PAGE_SIZE)  # after close: refused, never a pwrite
    assert len(fds) == 1
    with GuestRam(tmp_path / "guest.ram", 4) as again:
        assert again.read(0, 1) == b"\x05" * PAGE_SIZE


def test_holds_tells_buffers_inside_the_mapping_from_others(tmp_path: Path) -> None:
    with GuestRam(tmp_path / "g.ram", 8, create=True) as ram, \
            GuestRam(tmp_path / "other.ram", 8, create=True) as other:
        assert ram.holds(ram.view(3 * PAGE_SIZE, 2)) and ram.holds(ram.view(0, 8))
        assert ram.holds(np.frombuffer(ram.view(0, 8), dtype=np.uint64)[512:])  # a numpy array over it
        assert not ram.holds(bytearray(PAGE_SIZE)) and not ram.holds(memoryview(bytes(PAGE_SIZE))[1:])
        assert not ram.holds(other.view(0, 8))
        assert not ram.holds(np.zeros(PAGE_SIZE, dtype=np.uint8))
