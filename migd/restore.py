"""Confidential restore: a saved file back into a running guest, at most once (format: :mod:`migd.save_format`).

Before anything exists (:func:`inspect`, synchronous, REST 409 on a refusal): the header and
tail parse, the file is for this host's PDH, its guest policy allows what a save needs (not
NOSEND), its transport mode is this host's, the name is free and the session has not been
restored here before. Then, as a job:

1. RECEIVE_START with the file's session blob, the saving host's PDH and the file nonce: only
   this host's firmware can unwrap it; it yields the hand-off key, and the trailer MAC is
   verified with it before any guest exists (a file without its MAC — a save that never
   committed — stops here), and the header's digest with it;
2. the guest is created ``incoming`` (marker, journal row: a crash removes it) and its agent
   starts; the page table is read in order, each run placed as a migration's destination
   places it (private runs through RECEIVE_UPDATE_DATA with their sequence number, shared runs
   after their MAC, zero runs left as holes), while the table is hashed;
3. the table's digest, the page counts and the final sequence must be the trailer's; the
   bitmap and the vCPU state (a VMSA packet for SEV-ES) are installed, RECEIVE_FINISH;
4. the commit: in one journal transaction, the session is consumed and the commit recorded
   (a second restore of the same file, here or after a restart, is refused); the guest runs
   and self-checks every page.

Any failure before the commit removes every trace of the partial guest (invariant 5) and
leaves the file restorable.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from migd import failure_text, wire
from migd.abi import PAGE_SHIFT, PAGE_SIZE, GuestPolicy
from migd.bitmap import PageBitmap
from migd.errors import ConfigError, MigdError
from migd.file_job import FileJob
from migd.fileio import open_regular
from migd.guest.host_guest import GuestDefinition, HostGuest
from migd.host import Host
from migd.migration_state import MigrationPhase
from migd.page_runs import PageKind
from migd.progress import MigrationProgress
from migd.save_format import (
    ENTRY, ENTRY_SIZE, HEADER_REGION, EntryKind, Layout, SaveFileError, SaveHeader, SaveTail, TableRun,
    pdh_fingerprint, shared_mac, table_runs, tail_mac,
)
from migd.save_session import FileJobSession

log = logging.getLogger(__name__)

#: Table entries read (and runs placed) per step: 2 MiB of guest, ~40 KiB of table.
TABLE_STEP = 512


@dataclass(frozen=True)
class SavedFile:
    """A save file's parsed (not yet authenticated) header and tail, and where they are."""

    path: Path
    header: SaveHeader
    layout: Layout
    tail: SaveTail
    tail_body: bytes
    tail_mac: bytes
    #: (st_dev, st_ino) of the file inspected: the job reads that file, not one renamed over it.
    identity: tuple[int, int] = (0, 0)


def _read_exact(fd: int, size: int, offset: int, what: str) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.pread(fd, size - len(data), offset + len(data))
        if not chunk:
            raise SaveFileError(f"save file is truncated: {what} ends early")
        data += chunk
    return data


def read_saved(fd: int, path: Path) -> SavedFile:
    """Parse the header and tail of the file open at ``fd`` (sizes checked before any read)."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise SaveFileError(f"{path} is not a regular file")
    identity = (info.st_dev, info.st_ino)
    if info.st_size < HEADER_REGION:
        raise SaveFileError(f"{path} is truncated or not a migd save file ({info.st_size} bytes)")
    header = SaveHeader.unpack(_read_exact(fd, HEADER_REGION, 0, "the header"))
    layout = Layout(header.npages)
    tail_size = info.st_size - layout.tail_off
    if tail_size <= 0:
        raise SaveFileError(f"{path} is truncated: it ends inside the page table")
    if tail_size > layout.max_tail:
        raise SaveFileError(f"{path} has {tail_size} bytes of tail, more than a guest of this size can have")
    tail, body, mac = SaveTail.unpack(_read_exact(fd, tail_size, layout.tail_off, "the tail"), layout)
    return SavedFile(path, header, layout, tail, body, mac, identity)


def inspect(host: Host, path: Path, name: str | None) -> tuple[SavedFile, GuestDefinition]:
    """The checks a restore makes before anything exists; SaveFileError / GuestExists say why not."""
    if not path.is_absolute():
        raise SaveFileError(f"restore path {path} must be absolute")
    fd = _open(path)
    try:
        saved = read_saved(fd, path)
    finally:
        os.close(fd)
    header = saved.header
    if header.target_pdh_sha256 != pdh_fingerprint(host.firmware.pdh_cert_pem):
        raise SaveFileError(f"{path} was saved for another host (PDH {header.target_pdh_sha256.hex()[:16]}…, this "
                            f"host's is {pdh_fingerprint(host.firmware.pdh_cert_pem).hex()[:16]}…): only that host's "
                            f"firmware can open it")
    if header.policy & GuestPolicy.NOSEND:
        raise SaveFileError(f"{path} claims a guest with the NOSEND policy, which no firmware saves: refused")
    mode = host.firmware.transport_mode.value
    if header.transport_mode != mode:
        raise SaveFileError(f"{path} uses the {header.transport_mode!r} transport, this host {mode!r}")
    try:
        definition = GuestDefinition(name or header.name, header.memory_mib, header.policy, header.efi,
                                     header.uefi_live_migration)
    except ConfigError as exc:
        if name is not None:
            raise  # the client's name: a bad request (400)
        raise SaveFileError(f"{path}: the saved guest definition is not valid here: {exc}") from None
    host.check_free(definition.name, replace_migrated=True)
    if host.session_known(header.session_blob[:16], f"restore-check-{header.save_id}"):
        raise SaveFileError(f"{path} was restored on this host before: a saved guest runs at most once "
                            f"(save {header.save_id})")
    return saved, definition


def _open(path: Path) -> int:
    """Open a save file for reading: a regular file, or SaveFileError (never blocks on a FIFO)."""
    try:
        return open_regular(path)
    except OSError as exc:
        raise SaveFileError(f"cannot open {path}: {failure_text.os_reason(exc)}") from None
    except ValueError as exc:
        raise SaveFileError(str(exc)) from None


#: Called once the guest is complete and verified: consumes the session and records the commit, durably.
CommitHook = Callable[[MigrationProgress, bytes], None]


class GuestRestore(FileJob):
    """One restore of the file ``saved`` as guest ``definition`` on ``host``."""

    def __init__(self, host: Host, saved: SavedFile, definition: GuestDefinition, *,
                 on_commit: CommitHook | None = None, check_timeout_s: float = 120.0) -> None:
        super().__init__()
        self.host = host
        self.saved = saved
        self.definition = definition
        self._on_commit = on_commit
        self.check_timeout_s = check_timeout_s
        self.progress = MigrationProgress(definition.name, "restore", str(saved.path), definition.npages,
                                          phase=MigrationPhase(started_at=time.monotonic()))
        self.session = FileJobSession(self.progress.phase)
        self.guest: HostGuest | None = None
        self._handle: int | None = None
        self._agent_ready: asyncio.Future[None] | None = None
        self._fd: int | None = None
        self._ordered = True
        self._started_at = time.monotonic()

    def start(self) -> asyncio.Task[MigrationProgress]:
        """Run the restore in a task (returned)."""
        return self._launch(f"restore-{self.definition.name}")

    async def run(self) -> MigrationProgress:
        """Restore; returns the final progress."""
        self._running = True
        try:
            self._fd = _open(self.saved.path)
            info = os.fstat(self._fd)
            if (info.st_dev, info.st_ino) != self.saved.identity:
                raise SaveFileError(f"{self.saved.path} was replaced after it was checked")
            await self._restore()
        except asyncio.CancelledError:
            if self.session.committed:
                raise
            await self._discard()
            self.session.cancel(time.monotonic())
        except Exception as exc:  # before the commit every failure removes the partial guest
            reason = _reason(exc, self.saved.path)
            if self.session.committed:
                log.error("restore guest=%s: %s (the guest is kept)", self.definition.name, reason)
                self.session.fail(f"guest kept after the commit: {reason}", time.monotonic())
            else:
                log.warning("restore of %s failed: %s", self.saved.path, reason)
                await self._discard()
                self.session.fail(reason, time.monotonic())
        finally:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        return self.progress

    async def _restore(self) -> None:
        host, saved, definition, progress = self.host, self.saved, self.definition, self.progress
        header, tail = saved.header, saved.tail
        fw = host.firmware
        # A one-pass file's packets are opened in order, as a stream's are: the firmware itself then
        # refuses a dropped, replayed or reordered private run. A live file's slots were overwritten
        # in place, so each packet is opened by its sequence and the trailer binds which one a slot holds.
        self._ordered = header.one_pass
        self._handle = fw.receive_start(header.policy, header.source_pdh, header.session_blob, header.file_nonce,
                                        ordered=self._ordered)
        key = fw.handoff_key(self._handle)
        if not hmac.compare_digest(tail_mac(key, saved.tail_body), saved.tail_mac):
            raise SaveFileError(f"{saved.path}: the trailer does not verify under the file's session: the file "
                                f"was altered, truncated or spliced, or its save never committed")
        if not hmac.compare_digest(tail.header_sha256, header.digest()):
            raise SaveFileError(f"{saved.path}: the header is not the one the save wrote (altered)")
        self.guest = guest = host.create_incoming(definition, self._handle)
        self._agent_ready = asyncio.ensure_future(guest.prepare_incoming())
        self.session.begin(time.monotonic())
        log.info("restore guest=%s id=%s from=%s save=%s", definition.name, progress.id, saved.path, header.save_id)
        await self._place_pages(key)
        self.session.stop_copy(time.monotonic())
        bitmap = PageBitmap.decode(tail.bitmap, max_npages=definition.npages)
        if bitmap.npages != definition.npages:
            raise SaveFileError(f"the saved bitmap covers {bitmap.npages} pages, the guest has {definition.npages}")
        state = self._vcpu_state(guest)
        fw.receive_finish(self._handle)
        guest.vm.shared_bitmap = bitmap
        progress.shared_bitmap_sha256 = hashlib.sha256(bitmap.to_bytes()).hexdigest()
        await self._agent_ready
        await guest.stage_incoming(state)
        # The commit point: the session consumed and the commit recorded in one durable step.
        if self._on_commit is not None:
            self._on_commit(progress, header.session_blob[:16])
        self.session.commit()
        await guest.start_incoming(state)
        progress.remaining_pages = 0
        self.session.completed(time.monotonic())
        report = await guest.wait_check(self.check_timeout_s)
        log.info("restore completed guest=%s pages_verified=%d errors=%d first_error=%s", definition.name,
                 report.pages_verified, report.errors, report.first_error)

    async def _place_pages(self, key: bytes) -> None:
        """Read the table in order, place every run it describes, and check it against the trailer."""
        saved, layout, progress = self.saved, self.saved.layout, self.progress
        fd = self._file()
        digest = hashlib.sha256()
        counts = {k: 0 for k in PageKind}
        runs = 0
        carry: TableRun | None = None
        max_seq = -1
        for first in range(0, layout.npages, TABLE_STEP):
            await asyncio.sleep(0)  # REST and the other guests run between steps
            n = min(TABLE_STEP, layout.npages - first)
            raw = _read_exact(fd, n * ENTRY_SIZE, layout.entry_offset(first), "the page table")
            digest.update(raw)
            found, still_open = table_runs(np.frombuffer(raw, dtype=ENTRY), first, carry)
            # Runs are placed whole where they begin; one still open goes on into the next step.
            for run in found:
                self._place(run, key)
                runs += 1
                kind = PageKind.PRIVATE if run.kind is EntryKind.PRIVATE else PageKind.SHARED
                counts[kind] += run.npages
                progress.count_run(kind, run.npages, run.npages * (PAGE_SIZE + ENTRY_SIZE))
                if run.kind is EntryKind.PRIVATE:
                    max_seq = max(max_seq, run.seq)
            carry = still_open
            progress.remaining_pages = layout.npages - first - n
            elapsed = time.monotonic() - self._started_at
            progress.throughput_bps = progress.bytes_transferred / elapsed if elapsed > 0 else 0.0
        if carry is not None:
            raise SaveFileError("page table: the last run runs past the end of the guest")
        tail = saved.tail
        if not hmac.compare_digest(digest.digest(), tail.table_sha256):
            raise SaveFileError(f"{saved.path}: the page table is not the one the save sealed (altered, reordered "
                                f"or spliced)")
        counts[PageKind.ZERO] = layout.npages - counts[PageKind.PRIVATE] - counts[PageKind.SHARED]
        progress.pages[PageKind.ZERO] = counts[PageKind.ZERO]
        if {k.value: v for k, v in counts.items()} != tail.pages or runs != tail.runs:
            raise SaveFileError(f"{saved.path}: the page table's counts differ from the trailer's")
        if max_seq >= tail.final_sequence:
            raise SaveFileError(f"{saved.path}: a packet's sequence is past the save's last one")

    def _place(self, run: TableRun, key: bytes) -> None:
        """One run into guest RAM: private through the firmware (its MAC binds GPA and sequence), shared after its MAC."""
        guest = self.guest
        assert guest is not None
        gpa = run.first << PAGE_SHIFT
        data = _read_exact(self._file(), run.npages * PAGE_SIZE, self.saved.layout.page_offset(run.first),
                           f"the pages at {gpa:#x}")
        if run.kind is EntryKind.PRIVATE:
            guest.firmware.receive_update_data(guest.handle, guest.ram, gpa, run.npages, run.auth, data,
                                               sequence=None if self._ordered else run.seq)
            return
        expected = shared_mac(key, gpa, run.npages, run.seq, data)
        if not hmac.compare_digest(expected, run.auth[:32]) or any(run.auth[32:]):
            raise SaveFileError(f"{self.saved.path}: the shared pages at {gpa:#x} do not verify (altered, moved, "
                                f"or from another save or round)")
        guest.ram.write(gpa, data)

    def _vcpu_state(self, guest: HostGuest) -> bytes:
        tail = self.saved.tail
        if guest.definition.policy & GuestPolicy.ES:
            if tail.vcpu_header is None or tail.vcpu_seq is None:
                raise SaveFileError("an SEV-ES guest's vCPU state must be a VMSA transport packet")
            guest.firmware.receive_update_vmsa(guest.handle, 0, tail.vcpu_header, tail.vcpu_payload,
                                               sequence=None if self._ordered else tail.vcpu_seq)
            vmsa = guest.firmware.guest_vmsa(guest.handle, 0)
            assert vmsa is not None
            return wire.unpack_vmsa(vmsa)
        if tail.vcpu_header is not None:
            raise SaveFileError("a non-ES guest's vCPU state is saved in plaintext")
        return tail.vcpu_payload

    async def _discard(self) -> None:
        """Before the commit: every trace of the partial guest goes; the file stays restorable."""
        self._rolling_back = True
        if self._agent_ready is not None:
            self._agent_ready.cancel()
            await asyncio.gather(self._agent_ready, return_exceptions=True)
        if self.guest is not None:
            await self.host.discard(self.guest.name)
        elif self._handle is not None:
            try:
                self.host.firmware.decommission(self._handle)
            except MigdError:
                pass

    def _file(self) -> int:
        assert self._fd is not None
        return self._fd


def _reason(exc: BaseException, path: Path) -> str:
    if failure_text.cause_of(exc) is failure_text.Cause.INTERNAL:
        log.error("internal error during a restore from %s", path, exc_info=exc)
    return failure_text.describe_file_job(exc, path=str(path), step="the restore")


__all__ = ["GuestRestore", "SavedFile", "inspect", "read_saved"]
