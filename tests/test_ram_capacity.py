"""Admission control for guest RAM (migd/guest/ram_capacity.py) on a filesystem of a chosen size.

The filesystem is modelled through the account's ``space`` seam: its free space is a chosen
capacity less what the real files under the RAM directory really occupy (``st_blocks``), so
pages written into a real sparse RAM file use it up as they would on a tmpfs of that size.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from migd.abi import MiB
from migd.guest.ram_capacity import FsSpace, InsufficientRam, RamAccount, allocated_bytes, filesystem_space


class SizedFs:
    """A filesystem of ``capacity`` bytes holding exactly the files under ``directory``."""

    def __init__(self, directory: Path, capacity: int) -> None:
        self.directory, self.capacity = directory, capacity

    def used(self) -> int:
        return sum(allocated_bytes(p) for p in self.directory.rglob("*") if p.is_file())

    def space(self, directory: Path) -> FsSpace:
        assert directory == self.directory
        return FsSpace(total=self.capacity, free=max(0, self.capacity - self.used()))


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def populate(path: Path, offset: int, nbytes: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x5a" * nbytes)
        f.flush()
        os.fsync(f.fileno())


@pytest.fixture
def fs(tmp_path: Path) -> SizedFs:
    d = tmp_path / "ram"
    d.mkdir()
    return SizedFs(d, 64 * MiB)


def test_two_guests_cannot_both_count_the_same_free_space(fs: SizedFs) -> None:
    account = RamAccount(fs.directory, space=fs.space)
    first = account.reserve("g1", 40 * MiB, fs.directory / "g1")
    # Nothing is written yet: the filesystem alone still shows 64 MiB free ...
    assert fs.space(fs.directory).free == 64 * MiB
    # ... and a check that looked only at it would admit a second 40 MiB guest (negative control).
    assert 40 * MiB <= fs.space(fs.directory).free
    with pytest.raises(InsufficientRam) as refused:
        account.reserve("g2", 40 * MiB, fs.directory / "g2")
    err = refused.value
    assert (err.needed, err.free, err.committed, err.directory) == (40 * MiB, 64 * MiB, 40 * MiB, fs.directory)
    assert str(err) == ("no room for guest g2's RAM: needs 40 MiB, 64 MiB free, 40 MiB committed to other guests, "
                        f"24 MiB available (in {fs.directory})")
    account.reserve("g3", 24 * MiB, fs.directory / "g3")  # exactly what is left fits
    with pytest.raises(InsufficientRam):
        account.check("g4", 1, None)
    first.release()
    first.release()  # idempotent
    account.check("g2", 40 * MiB, fs.directory / "g2")  # the released room is back


def test_admission_is_stable_while_admitted_guests_populate_their_ram(fs: SizedFs) -> None:
    account = RamAccount(fs.directory, space=fs.space)
    ram = sparse_file(fs.directory / "g1", 32 * MiB)
    assert allocated_bytes(ram) == 0  # sparse: nothing allocated yet
    reservation = account.reserve("g1", 32 * MiB, ram)
    populate(ram, 0, 20 * MiB)
    assert allocated_bytes(ram) >= 20 * MiB
    # Free space fell by what g1 populated, and so did what g1 may still grow by:
    assert fs.space(fs.directory).free == 64 * MiB - allocated_bytes(ram)
    assert account.committed() == reservation.outstanding() == 32 * MiB - allocated_bytes(ram)
    # ... so the room left for others is still exactly 32 MiB.
    account.check("g2", 32 * MiB)
    with pytest.raises(InsufficientRam):
        account.check("g2", 32 * MiB + 4096)


def test_memory_the_account_does_not_know_is_not_promised_twice(fs: SizedFs) -> None:
    account = RamAccount(fs.directory, space=fs.space)
    stopped = sparse_file(fs.directory / "stopped", 32 * MiB)
    populate(stopped, 0, 16 * MiB)  # a stopped guest's RAM file still holds its pages
    account.check("g1", 48 * MiB)
    with pytest.raises(InsufficientRam) as refused:
        account.check("g1", 48 * MiB + 4096)
    assert refused.value.committed == 0 and refused.value.free == 48 * MiB
    # Starting that guest again needs only what its file does not hold yet.
    account.reserve("stopped", 32 * MiB, stopped)
    assert account.committed() == 16 * MiB


def test_the_real_filesystem_seams(tmp_path: Path) -> None:
    st = os.statvfs(tmp_path)
    space = filesystem_space(tmp_path)
    assert space.total == st.f_blocks * st.f_frsize
    assert abs(space.free - st.f_bavail * st.f_frsize) <= 64 * MiB  # other writers on the machine
    ram = sparse_file(tmp_path / "ram", 8 * MiB)
    assert allocated_bytes(ram) == 0
    populate(ram, 4 * MiB, 1 * MiB)
    assert 1 * MiB <= allocated_bytes(ram) < 8 * MiB
    assert allocated_bytes(tmp_path / "missing") == 0
    # Default seams: a real directory admits a small guest and refuses one bigger than its filesystem.
    account = RamAccount(tmp_path)
    account.reserve("small", 1 * MiB, tmp_path / "small")
    with pytest.raises(InsufficientRam, match=re.escape(str(tmp_path))):
        account.check("huge", space.total + MiB)
