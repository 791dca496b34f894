"""The self-check has teeth: every kind of damage is found on the right page, with the right name.

All in-process: a guest image is built with GuestMemory (the same code the agent runs) in a
small RAM file, then damaged the way a faulty or hostile host would damage it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migd.abi import PAGE_SHIFT, PAGE_SIZE
from migd.bitmap import PageBitmap
from migd.guest.guest_layout import LEDGER_SHARED, GuestLayout
from migd.platform.memory import GuestRam, MemoryEncryption, new_vek
from migd.guest.selfcheck import ErrorKind, check_memory, iter_check, ledger_digest, read_ledger, run_check
from migd.guest.workload import GuestMemory

NPAGES = 512
SEED = 1234


@dataclass
class Image:
    ram: GuestRam
    vek: bytes
    engine: MemoryEncryption
    layout: GuestLayout
    memory: GuestMemory
    private: list[int]  # written data pages the guest views private
    shared: list[int]  # written data pages the guest views shared
    untouched: list[int]  # data pages never written

    def gpa(self, pfn: int) -> int:
        return pfn << PAGE_SHIFT

    def raw(self, pfn: int) -> bytes:
        return self.ram.read(self.gpa(pfn), 1)

    def put_raw(self, pfn: int, data: bytes) -> None:
        self.ram.write(self.gpa(pfn), data)

    def plaintext(self, pfn: int) -> bytes:
        return bytes(self.engine.read_private(self.ram, self.gpa(pfn), 1))

    def put_plaintext(self, pfn: int, data: bytes) -> None:
        self.engine.write_private(self.ram, self.gpa(pfn), data)

    def poke_ledger(self, pfn: int, entry: int) -> None:
        """Change one ledger entry in guest RAM (as a host with the key could)."""
        ledger = read_ledger(self.ram, self.engine, self.layout)
        ledger[pfn] = entry
        plain = np.zeros(self.layout.ledger.npages * PAGE_SIZE // 4, dtype="<u4")
        plain[: ledger.size] = ledger
        self.engine.write_private(self.ram, self.layout.ledger.gpa, plain.view(np.uint8))


def build_image(path: Path) -> Image:
    """A guest as the agent leaves it after boot and some work (no channel needed)."""
    ram = GuestRam(path, NPAGES, create=True)
    vek = new_vek()
    engine = MemoryEncryption(vek)
    layout = GuestLayout.build(NPAGES)
    memory = GuestMemory.format(ram, engine, layout, SEED, PageBitmap(NPAGES))
    for rng in [*layout.firmware_shared, layout.decrypted]:
        memory.set_view(rng.pfn, rng.npages, True)
        memory.write_pages(rng.pfn, rng.npages)
    base = layout.data_ranges()[0].pfn
    memory.write_pages(base, 64)  # private, version 1
    memory.write_pages(base, 8)  # first 8: version 2
    memory.set_view(base + 100, 16, True)
    memory.write_pages(base + 100, 16)  # shared, version 1
    memory.write_pages(base + 100, 4)  # version 2
    private = list(range(base, base + 64))
    shared = list(range(base + 100, base + 116))
    untouched = list(range(base + 200, base + 260))
    return Image(ram, vek, engine, layout, memory, private, shared, untouched)


@pytest.fixture
def image(tmp_path: Path) -> Iterator[Image]:
    img = build_image(tmp_path / "ram")
    try:
        yield img
    finally:
        img.ram.close()


def test_clean_memory_passes(image: Image) -> None:
    result = check_memory(image.ram, image.vek)
    assert result.ok and result.errors == 0 and result.first_error is None
    assert result.pages_verified == NPAGES
    assert result.report() == {"pages_verified": NPAGES, "errors": 0, "first_error": None}


def test_corrupted_private_ciphertext(image: Image) -> None:
    victim = image.private[10]
    raw = bytearray(image.raw(victim))
    raw[2000] ^= 0x40
    image.put_raw(victim, bytes(raw))
    result = check_memory(image.ram, image.vek)
    assert result.errors == 1
    assert result.samples[0].pfn == victim and result.samples[0].kind is ErrorKind.CORRUPTED
    assert result.first_error == f"gpa {image.gpa(victim):#x}: corrupted (viewed private, expected version 1)"


def test_corrupted_shared_page(image: Image) -> None:
    victim = image.shared[5]
    raw = bytearray(image.raw(victim))
    raw[4095] ^= 0x01
    image.put_raw(victim, bytes(raw))
    result = check_memory(image.ram, image.vek)
    assert result.errors == 1 and result.samples[0].kind is ErrorKind.CORRUPTED


def test_swapped_shared_pages_come_from_another_gpa(image: Image) -> None:
    a, b = image.shared[6], image.shared[7]
    raw_a, raw_b = image.raw(a), image.raw(b)
    image.put_raw(a, raw_b)
    image.put_raw(b, raw_a)
    result = check_memory(image.ram, image.vek)
    assert result.errors == 2
    assert [e.kind for e in result.samples] == [ErrorKind.FOREIGN_GPA] * 2
    assert result.first_error == f"gpa {image.gpa(a):#x}: from another gpa {image.gpa(b):#x} (version 1, viewed shared)"


def test_private_pages_moved_through_plaintext_come_from_another_gpa(image: Image) -> None:
    """What a transport without GPA binding lets a host do (sev-compat): move a page's plaintext."""
    a, b = image.private[20], image.private[30]
    plain_a = image.plaintext(a)
    image.put_plaintext(b, plain_a)
    result = check_memory(image.ram, image.vek)
    assert result.errors == 1
    assert result.samples[0].pfn == b and result.samples[0].kind is ErrorKind.FOREIGN_GPA
    assert f"from another gpa {image.gpa(a):#x}" in str(result.first_error)


def test_private_pages_swapped_raw_are_corrupted(image: Image) -> None:
    """The XEX tweak binds the address: raw ciphertext moved to another GPA is garbage there."""
    a, b = image.private[20], image.private[30]
    raw_a, raw_b = image.raw(a), image.raw(b)
    image.put_raw(a, raw_b)
    image.put_raw(b, raw_a)
    result = check_memory(image.ram, image.vek)
    assert result.errors == 2
    assert {e.kind for e in result.samples} == {ErrorKind.CORRUPTED}


@pytest.mark.parametrize("which", ["private", "shared"])
def test_restored_older_version_is_stale(image: Image, which: str) -> None:
    victim = (image.private if which == "private" else image.shared)[40 if which == "private" else 10]
    old = image.raw(victim)
    image.memory.write_pages(victim, 1)
    image.memory.write_pages(victim, 1)  # now version 3
    image.put_raw(victim, old)  # replay version 1
    result = check_memory(image.ram, image.vek)
    assert result.errors == 1 and result.samples[0].kind is ErrorKind.STALE
    assert result.first_error == f"gpa {image.gpa(victim):#x}: stale version 1<3 (viewed {which})"


@pytest.mark.parametrize("which", ["private", "shared"])
def test_flipped_ledger_view_is_misrouted(image: Image, which: str) -> None:
    victim = image.private[3] if which == "private" else image.shared[3]
    entry = int(image.memory.ledger[victim]) ^ LEDGER_SHARED
    image.poke_ledger(victim, entry)
    result = check_memory(image.ram, image.vek)
    assert result.errors == 1 and result.samples[0].kind is ErrorKind.MISROUTED
    other = "shared" if which == "private" else "private"
    assert f"reads correctly as {which}" in str(result.first_error)
    assert f"viewed {other}" in str(result.first_error)


def test_shared_slot_holding_encrypted_content_is_misrouted(image: Image) -> None:
    """A shared page that went through the encryption engine (routed as private)."""
    victim = image.shared[12]
    image.put_plaintext(victim, image.raw(victim))
    result = check_memory(image.ram, image.vek)
    assert result.errors == 1 and result.samples[0].kind is ErrorKind.MISROUTED
    assert "viewed shared but reads correctly as private" in str(result.first_error)


def test_private_page_copied_raw_into_a_shared_slot_is_corrupted(image: Image) -> None:
    victim = image.shared[13]
    image.put_raw(victim, image.raw(image.private[0]))
    result = check_memory(image.ram, image.vek)
    assert result.errors == 1 and result.samples[0].kind is ErrorKind.CORRUPTED


def test_nonzero_never_written_page(image: Image) -> None:
    victim = image.untouched[7]
    image.put_raw(victim, b"\x01" + bytes(PAGE_SIZE - 1))
    result = check_memory(image.ram, image.vek)
    assert result.errors == 1 and result.samples[0].kind is ErrorKind.NEVER_WRITTEN
    assert result.first_error == f"gpa {image.gpa(victim):#x}: nonzero never-written page (viewed private)"


def test_zeroed_written_pages_are_all_counted(image: Image) -> None:
    image.ram.zero(image.gpa(image.private[0]), 50)
    result = check_memory(image.ram, image.vek, max_samples=4)
    assert result.errors == 50 and len(result.samples) == 4
    assert result.by_kind == {"corrupted": 50}


def test_wrong_key_cannot_read_the_kernel(image: Image) -> None:
    result = check_memory(image.ram, new_vek())
    assert result.errors == 1 and result.samples[0].kind is ErrorKind.KERNEL
    assert "kernel header unreadable" in str(result.first_error)


def test_ledger_checked_against_the_kernel_copy_and_the_state_digest(image: Image) -> None:
    ledger = image.memory.ledger.copy()
    assert check_memory(image.ram, image.vek, expected_ledger=ledger,
                        expected_ledger_digest=ledger_digest(ledger)).errors == 0
    victim = image.private[1]
    # Consistent tampering (ledger and page both rolled back) is invisible to the content
    # check, but not to the kernel's copy nor to the digest carried in the vCPU state.
    old_entry, old_raw = int(ledger[victim]), image.raw(victim)
    image.memory.write_pages(victim, 1)
    current = image.memory.ledger.copy()
    image.poke_ledger(victim, old_entry)
    image.put_raw(victim, old_raw)
    assert check_memory(image.ram, image.vek).errors == 0
    with_copy = check_memory(image.ram, image.vek, expected_ledger=current)
    assert with_copy.errors == 1 and with_copy.samples[0].kind is ErrorKind.KERNEL
    with_digest = check_memory(image.ram, image.vek, expected_ledger_digest=ledger_digest(current))
    assert with_digest.errors == 1 and "digest" in str(with_digest.first_error)


def test_chunking_does_not_change_the_result(image: Image) -> None:
    image.put_raw(image.shared[0], image.raw(image.shared[1]))
    image.ram.zero(image.gpa(image.private[5]), 3)
    whole = check_memory(image.ram, image.vek)
    progress = []
    checker = iter_check(image.ram, image.engine, chunk_pages=7)
    while True:
        try:
            progress.append(next(checker))
        except StopIteration as done:
            small = done.value
            break
    assert (small.errors, small.first_error, small.by_kind) == (whole.errors, whole.first_error, whole.by_kind)
    assert progress == sorted(progress) and progress[-1] == NPAGES
    assert run_check(iter_check(image.ram, image.engine, chunk_pages=1)).errors == 4


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(picks=st.sets(st.integers(0, 63 + 16 - 1), min_size=1, max_size=6), offset=st.integers(32, PAGE_SIZE - 1))
def test_property_exactly_the_damaged_pages_are_reported(tmp_path: Path, picks: set[int], offset: int) -> None:
    img = build_image(tmp_path / f"ram-{len(list(tmp_path.iterdir()))}")
    try:
        written = img.private + img.shared
        victims = sorted(written[i] for i in picks)
        for pfn in victims:
            raw = bytearray(img.raw(pfn))
            raw[offset] ^= 0xFF
            img.put_raw(pfn, bytes(raw))
        result = check_memory(img.ram, img.vek, max_samples=10)
        assert result.errors == len(victims)
        assert [e.pfn for e in result.samples] == victims
        assert {e.kind for e in result.samples} == {ErrorKind.CORRUPTED}
    finally:
        img.ram.close()


def test_holes_are_checked_without_being_allocated(shm_dir: Path) -> None:
    """The RAM file's holes read as zeros without a read through the mapping, which on tmpfs
    would allocate every page of a sparse guest; a written page punched out is still caught."""
    import os

    image = build_image(shm_dir / "ram")
    try:
        _check_holes(image)
    finally:
        image.ram.close()


def _check_holes(image: Image) -> None:
    import os

    blocks_before = os.stat(image.ram.path).st_blocks
    result = check_memory(image.ram, image.vek, chunk_pages=16)
    assert result.errors == 0 and result.pages_verified == NPAGES
    assert os.stat(image.ram.path).st_blocks == blocks_before  # no hole was filled
    # Negative control: a whole chunk of written private pages becomes a hole.
    first = image.private[0]
    aligned = first - first % 16 + 16
    image.ram.zero(image.gpa(aligned), 16)
    assert image.ram.next_populated(image.gpa(aligned), 16) == image.gpa(aligned + 16)
    punched = check_memory(image.ram, image.vek, chunk_pages=16)
    assert punched.errors == 16 and punched.by_kind == {"corrupted": 16}
