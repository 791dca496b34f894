"""Admission control for guest RAM: does one more guest fit on the RAM directory's filesystem?

Guest RAM files are sparse files on tmpfs (``guests.ram_dir``, by default under systemd's
``/run``): a page takes room only when the guest (or an incoming migration) first writes it.
When the filesystem fills, the next write of *any* guest faults with SIGBUS — one guest
populating its memory kills another. So the daemon admits a guest only if the room for its
whole RAM is there, and counts that room as taken until the guest no longer runs.

Why an account and not ``posix_fallocate`` (measured on this machine's tmpfs, 1 GiB sparse
file, three runs: 0.4–0.9 s, and Shmem in /proc/meminfo grew by the full 1024 MiB at once):

- fallocate on tmpfs allocates real, zeroed RAM for every page, also for the pages the guest
  never touches, which throws away what the sparse file is for (a 64 GiB guest that uses 2 GiB
  would cost 64 GiB of host RAM from its first second, and 25–60 s to start);
- it would not even hold: the guest's power-on step and every zero run of an incoming
  migration punch holes into the RAM file (``GuestRam.zero``), which hands the reserved pages
  back to the filesystem for anyone to take.

Instead :class:`RamAccount` keeps, for every guest that runs or is arriving here, what it may
still grow to: ``outstanding = size - allocated`` (``st_blocks`` of its RAM file). A guest is
admitted when ``needed <= free - committed`` (``free``: ``statvfs`` ``f_bavail``;
``committed``: the sum of the others' outstanding). The comparison is stable under the guests'
own writes — a page one of them populates lowers ``free`` and its ``outstanding`` alike — so
only memory the account does not know (another program, a stopped guest's file) can break a
promise, and the check plus the reservation happen in one step under a lock: two guests can
never both count the same free space. This is QEMU/libvirt's sparse backing plus OpenStack's
placement-style accounting, not memory overcommit: what is admitted always fits.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from migd.abi import MiB
from migd.errors import MigdError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FsSpace:
    """Room on a filesystem, in bytes: ``free`` is what an unprivileged writer may still use."""

    total: int
    free: int


def filesystem_space(directory: Path) -> FsSpace:
    """``statvfs`` of ``directory``'s filesystem (``f_bavail``: root's reserve is not ours to count)."""
    st = os.statvfs(directory)
    return FsSpace(total=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize)


def allocated_bytes(path: Path) -> int:
    """Bytes the file really occupies (its blocks, not its sparse size); 0 if it does not exist."""
    try:
        return os.stat(path).st_blocks * 512  # st_blocks counts 512-byte units on Linux (stat(2))
    except FileNotFoundError:
        return 0


def _mib(nbytes: int) -> str:
    return f"{nbytes / MiB:.0f} MiB" if nbytes % MiB == 0 or nbytes >= 100 * MiB else f"{nbytes / MiB:.1f} MiB"


class InsufficientRam(MigdError):
    """The RAM directory's filesystem has no room for this guest's RAM (REST 409; an incoming
    migration is aborted with this message). The numbers are bytes."""

    def __init__(self, guest: str, *, needed: int, free: int, committed: int, directory: Path) -> None:
        self.guest, self.needed, self.free, self.committed, self.directory = guest, needed, free, committed, directory
        available = max(0, free - committed)
        # Numbers first: a source shows this as the destination's ABORT reason, which is cut to
        # 200 characters (migd/peer_text.py), so the directory comes last.
        super().__init__(
            f"no room for guest {guest}'s RAM: needs {_mib(needed)}, {_mib(free)} free, {_mib(committed)} "
            f"committed to other guests, {_mib(available)} available (in {directory})"
        )


class RamReservation:
    """One guest's admission: the room its RAM file may still grow into. ``release()`` once it stops."""

    def __init__(self, account: RamAccount, guest: str, size: int, ram_path: Path) -> None:
        self.account, self.guest, self.size, self.ram_path = account, guest, size, ram_path
        self.released = False

    def outstanding(self) -> int:
        """What the RAM file may still grow by (0 once released)."""
        if self.released:
            return 0
        return max(0, self.size - self.account.allocated(self.ram_path))

    def release(self) -> None:
        """Give the room back (idempotent)."""
        self.account._release(self)


class RamAccount:
    """What the guests of one RAM directory were promised, against what its filesystem holds.

    ``space`` and ``allocated`` are the seams to the filesystem (``statvfs`` and ``st_blocks``);
    tests give a filesystem of a chosen size through them.
    """

    def __init__(
        self, directory: Path, *, space: Callable[[Path], FsSpace] = filesystem_space,
        allocated: Callable[[Path], int] = allocated_bytes,
    ) -> None:
        self.directory = Path(directory)
        self.space = space
        self.allocated = allocated
        self._reservations: list[RamReservation] = []
        # The daemon admits from its event loop; the lock keeps check-and-reserve one step for
        # any other caller too (a second thread must never count the same free bytes).
        self._lock = threading.Lock()

    @property
    def reservations(self) -> tuple[RamReservation, ...]:
        """The guests admitted and not yet released."""
        with self._lock:
            return tuple(self._reservations)

    def committed(self) -> int:
        """Bytes the admitted guests may still populate."""
        with self._lock:
            return sum(r.outstanding() for r in self._reservations)

    def check(self, guest: str, size: int, ram_path: Path | None = None) -> None:
        """InsufficientRam unless ``size`` bytes of RAM (less what ``ram_path`` holds) fit now.

        For ``guest create``: a defined guest populates nothing, so nothing is reserved; this
        only refuses a guest that could not start now anyway.
        """
        with self._lock:
            self._admit(guest, size, ram_path)

    def reserve(self, guest: str, size: int, ram_path: Path) -> RamReservation:
        """Check as :meth:`check` and, in the same step, count the guest's RAM as committed."""
        with self._lock:
            self._admit(guest, size, ram_path)
            reservation = RamReservation(self, guest, size, ram_path)
            self._reservations.append(reservation)
        log.info("guest RAM admitted guest=%s size_mib=%d dir=%s committed_guests=%d",
                 guest, size // MiB, self.directory, len(self._reservations))
        return reservation

    def _admit(self, guest: str, size: int, ram_path: Path | None) -> None:
        needed = max(0, size - (self.allocated(ram_path) if ram_path is not None else 0))
        free = self.space(self.directory).free
        committed = sum(r.outstanding() for r in self._reservations)
        if needed > free - committed:
            error = InsufficientRam(guest, needed=needed, free=free, committed=committed, directory=self.directory)
            log.warning("guest RAM refused guest=%s needed_mib=%.1f free_mib=%.1f committed_mib=%.1f dir=%s",
                        guest, needed / MiB, free / MiB, committed / MiB, self.directory)
            raise error

    def _release(self, reservation: RamReservation) -> None:
        with self._lock:
            if reservation.released:
                return
            reservation.released = True
            self._reservations.remove(reservation)
