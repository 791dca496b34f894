"""Confidential save: a guest's memory and vCPU state to a file only one host's firmware can open.

The flow (a migration whose destination is a file; format in :mod:`migd.save_format`):

1. refuse unless the guest runs, its policy allows sending and its MSR is READY;
2. SEND_START to the target PDH (this host's own by default) with a fresh file nonce: the
   session blob, and the hand-off key that will seal the trailer, as for a migration;
3. with ``live``, pre-copy rounds while the guest runs: every page, then what the dirty log
   reports, each page written in place at its fixed offset; the MSR gate holds as in a
   migration (nothing is read while the MSR is not READY: ``blackout``, then the pages whose
   state changed are written again);
4. the guest is paused; the last dirty pages (or, without ``live``, every page), the final
   shared-page bitmap and the vCPU state (a VMSA packet for SEV-ES) are written, then the tail
   without its MAC, and the file is fsync'ed;
5. the commit point: the journal's commit record, durable. Only then the trailer MAC is written
   (a file without it is refused by every restore), fsync, the temporary name linked to the
   final one (never replacing a file), the directory fsync'ed, SEND_FINISH, and the guest is
   ``saved``: its agent stops, its RAM and key go.

Before the commit every failure or cancel removes the temporary file, SEND_CANCELs and resumes
the guest. After it the guest never runs here again; a step that fails after it leaves the
file for the restart's recovery to finish (it has the journaled key).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from migd import failure_text, wire
from migd.abi import PAGE_SHIFT, PAGE_SIZE, GuestPolicy
from migd.bitmap import PageBitmap
from migd.errors import MigdError
from migd.fileio import fsync_dir, open_regular
from migd.file_job import FileJob
from migd.guest.channel import GuestChannel
from migd.guest.host_guest import GuestState, HostGuest
from migd.migration_state import MigrationPhase
from migd.page_runs import CHUNK_PAGES, HOLE_STEP_PAGES, PageKind, classify
from migd.platform.memory import punch_hole
from migd.progress import MigrationProgress
from migd.save_format import (
    ENTRY, ENTRY_SIZE, FILE_NONCE_SIZE, FILE_RUN_PAGES, HEADER_REGION, NONCE_LIVE, NONCE_ONE_PASS, TAIL_PREFIX_SIZE,
    EntryKind, Layout, SaveFileError, SaveHeader, SaveTail, pdh_fingerprint, run_entries, shared_mac,
    tail_body_length, tail_mac,
)
from migd.sev_transport import MAC_SIZE
from migd.save_session import FileJobSession

log = logging.getLogger(__name__)

#: Live pre-copy stops after this many rounds, or once the dirty set is small (see ``_converged``).
MAX_LIVE_ROUNDS = 8
_TABLE_READ = 1 << 20


class SaveRefused(MigdError):
    """The save cannot start (guest state, policy, MSR, the path): REST 409."""


class SaveFailed(MigdError):
    """The save ended without a file; the guest runs on here."""


def part_path(path: Path, job_id: str) -> Path:
    """The temporary name a save writes under before its commit (same directory: the rename stays atomic)."""
    return path.parent / f".{path.name}.{job_id}.part"


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """pwrite until every byte is written (a regular file may take a write in pieces)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def table_digest(fd: int, layout: Layout) -> bytes:
    """SHA-256 over the whole page table of the file open at ``fd`` (streamed, bounded memory)."""
    digest = hashlib.sha256()
    offset, end = layout.table_off, layout.table_off + layout.npages * ENTRY_SIZE
    while offset < end:
        chunk = os.pread(fd, min(_TABLE_READ, end - offset), offset)
        if not chunk:
            raise SaveFailed(f"the page table ends early at offset {offset}")
        digest.update(chunk)
        offset += len(chunk)
    return digest.digest()


def publish(part: Path, path: Path) -> None:
    """Give the finished temporary file its final name without ever replacing a file, durably."""
    try:
        os.link(part, path)  # fails if the name exists: a save never overwrites a file
    except FileExistsError:
        # Linked already (a crash between link and unlink, finished by recovery): only the
        # temporary name is left to remove. Any other file of that name is not ours to replace.
        if not os.path.samefile(part, path):
            raise SaveFailed(f"{path} appeared while the guest was being saved; the save is in {part}") from None
    os.unlink(part)
    fsync_dir(path.parent)


@dataclass(frozen=True)
class SaveParams:
    """Tunables of one save."""

    live: bool = False
    blackout_timeout_s: float = 30.0
    max_rounds: int = MAX_LIVE_ROUNDS


#: Called once the file holds everything but its MAC, before the MAC is written: durable (the journal).
CommitHook = Callable[[MigrationProgress], None]
#: Called with the session's hand-off key after SEND_START (journaled: recovery seals the file with it).
KeyHook = Callable[[MigrationProgress, bytes], None]


class GuestSave(FileJob):
    """One save of ``guest`` to ``path``, for the host whose PDH certificate is ``target_pdh``."""

    def __init__(self, guest: HostGuest, path: Path, target_pdh: bytes, params: SaveParams | None = None, *,
                 on_commit: CommitHook | None = None, on_key: KeyHook | None = None) -> None:
        self.guest = guest
        self.path = path
        self.target_pdh = target_pdh
        self.params = params or SaveParams()
        super().__init__()
        self._on_commit = on_commit
        self._on_key = on_key
        self.layout = Layout(guest.definition.npages)
        self.progress = MigrationProgress(guest.name, "save", str(path), guest.definition.npages,
                                          phase=MigrationPhase(started_at=time.monotonic()))
        self.session = FileJobSession(self.progress.phase, blackout_s=self.params.blackout_timeout_s)
        self.part = part_path(path, self.progress.id)
        self._fd: int | None = None
        self._key: bytes | None = None
        self._session_open = False
        self._paused = False
        self._msr_dropped = False
        self._msr_ready = asyncio.Event()
        self._written = PageBitmap(guest.definition.npages)  # pages whose slot holds data
        self._sequence = 0  # write sequence of shared runs
        self._buffer = bytearray(FILE_RUN_PAGES * PAGE_SIZE)
        self._started_at = time.monotonic()

    # ------------------------------------------------------------------ control

    def check_preconditions(self) -> None:
        """Raise SaveRefused unless the guest can be saved to ``path`` now."""
        g = self.guest
        if g.state is not GuestState.RUNNING:
            raise SaveRefused(f"guest {g.name} is {g.state.value}; only a running guest can be saved")
        if g.definition.policy & GuestPolicy.NOSEND:
            raise SaveRefused(f"guest {g.name} has the NOSEND policy: its firmware forbids sending it, "
                              f"to a host or to a file")
        if not g.vm.migration_ready:
            raise SaveRefused(f"guest {g.name} has not enabled migration: MSR_KVM_MIGRATION_CONTROL = "
                              f"{g.vm.msr_migration_control:#x} (the guest may be booting, rebooting or "
                              f"kexec'ing); its shared-page bitmap cannot be trusted yet")
        if not self.path.is_absolute():
            raise SaveRefused(f"save path {self.path} must be absolute")
        if not self.path.parent.is_dir():
            raise SaveRefused(f"the directory of {self.path} does not exist")
        if os.path.lexists(self.path):
            raise SaveRefused(f"{self.path} exists; a save never replaces a file")

    def start(self) -> asyncio.Task[MigrationProgress]:
        """Check preconditions, then run in a task (returned)."""
        self.check_preconditions()
        return self._launch(f"save-{self.guest.name}")

    # ------------------------------------------------------------------ the run

    async def run(self) -> MigrationProgress:
        """Save; returns the final progress (completed, failed or cancelled)."""
        self._running = True
        guest = self.guest
        try:
            self.check_preconditions()
            guest.vm.on_migration_control_change = self._msr_changed
            self._msr_ready.set()
            self._open()
            dirty = await self._precopy() if self.params.live else None
            await self._stop_and_write(dirty)
        except asyncio.CancelledError:
            if self.session.committed:
                raise
            await self._roll_back("cancelled by the operator" if self._cancel_requested else "cancelled",
                                  cancelled=True)
            if not self._cancel_requested:
                raise
        except Exception as exc:  # every failure before the commit ends the same safe way
            if self.session.committed:
                await self._after_commit_failure(exc)
            else:
                await self._roll_back(_reason(exc, self.path))
        finally:
            guest.vm.on_migration_control_change = None
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            # The daemon keeps finished jobs (their records): not their bitmap (npages / 8 bytes)
            # or their run buffer.
            self._written = PageBitmap(0)
            self._buffer = bytearray()
        return self.progress

    def _open(self) -> None:
        """The temporary file (0600, never an existing one), SEND_START, the header."""
        guest, layout = self.guest, self.layout
        self._fd = os.open(self.part, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.ftruncate(self._fd, layout.tail_off)  # sparse: holes stay holes
        fsync_dir(self.part.parent)  # the name must survive a crash after the commit (recovery finishes it)
        # The last nonce byte says whether the file is one pass (its packets in sequence order, opened
        # in order like a stream) or live (overwritten in place). It enters the session id, so a
        # file whose header claims the other kind opens no packet and verifies no trailer.
        nonce = os.urandom(FILE_NONCE_SIZE - 1) + bytes([NONCE_LIVE if self.params.live else NONCE_ONE_PASS])
        start = guest.firmware.send_start(guest.handle, self.target_pdh, nonce)
        self._session_open = True
        assert start.handoff_key is not None
        self._key = start.handoff_key
        if self._on_key is not None:
            self._on_key(self.progress, start.handoff_key)
        d = guest.definition
        self.header = SaveHeader(
            save_id=self.progress.id, name=d.name, memory_mib=d.memory_mib, policy=d.policy, efi=d.efi,
            uefi_live_migration=d.uefi_live_migration, transport_mode=guest.firmware.transport_mode.value,
            source_pdh=start.pdh_cert_pem, session_blob=start.session_blob, file_nonce=nonce,
            target_pdh_sha256=pdh_fingerprint(self.target_pdh), npages=d.npages,
        )
        pwrite_all(self._fd, self.header.pack(), 0)
        self.session.begin(time.monotonic())
        log.info("save guest=%s id=%s to=%s live=%s", d.name, self.progress.id, self.path, self.params.live)

    def _msr_changed(self, old: int, new: int) -> None:
        if self.guest.vm.migration_ready:
            self._msr_ready.set()
        else:
            self._msr_dropped = True  # the job passes through blackout even if READY is back soon
            self._msr_ready.clear()
            log.info("migration-control MSR dropped guest=%s msr=%#x: the save writes nothing", self.guest.name, new)

    async def _precopy(self) -> PageBitmap:
        """Live rounds while the guest runs; returns the dirty set left for the paused pass."""
        channel, progress, npages = self._channel(), self.progress, self.guest.definition.npages
        await channel.fetch_dirty()  # start the log: round 0 covers everything before
        progress.rounds = 1
        await self._write_extents(np.array([0]), np.array([npages]))
        previous = npages
        while True:
            dirty = await channel.fetch_dirty()
            remaining = dirty.count()
            progress.remaining_pages = remaining
            if self._converged(remaining, previous, progress.rounds):
                return dirty
            previous = remaining
            progress.rounds += 1
            await self._write_extents(*dirty.extent_arrays(True))

    def _converged(self, remaining: int, previous: int, rounds: int) -> bool:
        """Pre-copy ends when the dirty set is small, stops shrinking, or after ``max_rounds``.

        Unlike a migration there is no downtime to fit: the guest stops for good once saved, and
        pre-copy only shortens the pause; so a dirty set that no longer shrinks ends it too.
        """
        small = remaining <= max(256, self.guest.definition.npages // 100)
        return small or remaining >= 0.9 * previous or rounds >= self.params.max_rounds

    async def _blackout(self) -> None:
        """Write nothing until the guest's MSR is READY again (bounded by the blackout limit)."""
        session = self.session
        self._msr_dropped = False
        session.msr_dropped(time.monotonic())
        log.info("save blackout guest=%s: waiting up to %gs for READY", self.guest.name, session.blackout_s)
        while not self.guest.vm.migration_ready:
            self._check_agent()
            session.check_blackout(time.monotonic())
            self._msr_ready.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.5, session.blackout_left(time.monotonic()))):
                    await self._msr_ready.wait()
        session.msr_ready(time.monotonic())
        log.info("save blackout over guest=%s: state changes will be written again", self.guest.name)

    async def _stop_and_write(self, dirty: PageBitmap | None) -> None:
        guest, channel, session, progress = self.guest, self._channel(), self.session, self.progress
        while True:
            self._check_agent()
            self._paused = True  # before the await: a cancel during it must still resume the guest
            await channel.pause()
            if guest.vm.migration_ready and not self._msr_dropped:
                break
            # The MSR dropped just before the pause: the bitmap may be stale. Let it boot.
            await channel.resume()
            self._paused = False
            await self._blackout()
            if dirty is not None:
                dirty.update(await channel.fetch_dirty())
                await self._write_extents(*dirty.extent_arrays(True))
                dirty = await channel.fetch_dirty()
        session.stop_copy(time.monotonic())
        guest.state = GuestState.PAUSED
        progress.rounds += 1
        if dirty is None:
            await self._write_extents(np.array([0]), np.array([guest.definition.npages]))
        else:
            dirty.update(await channel.fetch_dirty())
            await self._write_extents(*dirty.extent_arrays(True))
        bitmap = guest.vm.shared_bitmap.copy()
        progress.shared_bitmap_sha256 = hashlib.sha256(bitmap.to_bytes()).hexdigest()
        state = await channel.export_state()
        fw, handle = guest.firmware, guest.handle
        if guest.definition.policy & GuestPolicy.ES:
            vcpu_seq: int | None = fw.transport_sequence(handle)
            header, ciphertext = fw.send_update_vmsa(handle, 0, wire.pack_vmsa(state))
            vcpu_header: bytes | None = bytes(header)
            vcpu_payload = bytes(ciphertext)
        else:
            vcpu_seq, vcpu_header, vcpu_payload = None, None, bytes(state)
        fd, layout = self._file(), self.layout
        pages, runs = self._table_counts()
        progress.pages.update(pages)  # what the file holds; rounds wrote some pages more than once
        tail = SaveTail(
            bitmap=bitmap.encode(), vcpu_header=vcpu_header, vcpu_payload=vcpu_payload, vcpu_seq=vcpu_seq,
            pages={k.value: v for k, v in pages.items()}, runs=runs,
            final_sequence=fw.transport_sequence(handle), header_sha256=self.header.digest(),
            table_sha256=table_digest(fd, layout),
        )
        unsealed = tail.pack_unsealed()
        try:
            # What a restore will parse, checked before the commit: a tail it would refuse (a vCPU
            # state too large, say) must fail the save here, while the guest can still resume.
            SaveTail.unpack(unsealed + bytes(MAC_SIZE), layout)
        except SaveFileError as exc:
            raise SaveFailed(f"the save's tail would not be accepted by a restore: {exc}") from None
        pwrite_all(fd, unsealed, layout.tail_off)
        os.ftruncate(fd, layout.tail_off + len(unsealed))  # no MAC yet: every restore refuses this file
        os.fsync(fd)
        # The commit point: from the journal's record on, the guest is the file's.
        if self._on_commit is not None:
            self._on_commit(progress)
        session.commit()
        assert self._key is not None
        pwrite_all(fd, tail_mac(self._key, tail.body()), layout.tail_off + len(unsealed))
        os.fsync(fd)
        publish(self.part, self.path)
        try:
            fw.send_finish(handle)
        except MigdError as exc:  # the guest is the file's either way: never resume it here
            log.error("SEND_FINISH failed after the save committed guest=%s: %s", guest.name, exc)
        progress.remaining_pages = 0
        await guest.mark_saved()
        session.completed(time.monotonic())
        log.info("save completed guest=%s id=%s file=%s rounds=%d bytes=%d total_ms=%.1f", guest.name, progress.id,
                 self.path, progress.rounds, progress.bytes_transferred,
                 progress.phase.total_time_ms(time.monotonic()))

    def _table_counts(self) -> tuple[dict[PageKind, int], int]:
        """Pages by kind and runs as the file's table holds them now (rounds overwrote earlier runs)."""
        counts = {k: 0 for k in PageKind}
        runs = 0
        fd, layout = self._file(), self.layout
        offset, end = layout.table_off, layout.table_off + layout.npages * ENTRY_SIZE
        step = (_TABLE_READ // ENTRY_SIZE) * ENTRY_SIZE
        while offset < end:
            kinds = np.frombuffer(os.pread(fd, min(step, end - offset), offset), dtype=ENTRY)["kind"]
            counts[PageKind.PRIVATE] += int(np.count_nonzero((kinds == EntryKind.PRIVATE)
                                                             | (kinds == EntryKind.PRIVATE_CONT)))
            counts[PageKind.SHARED] += int(np.count_nonzero((kinds == EntryKind.SHARED)
                                                            | (kinds == EntryKind.SHARED_CONT)))
            runs += int(np.count_nonzero((kinds == EntryKind.PRIVATE) | (kinds == EntryKind.SHARED)))
            offset += len(kinds) * ENTRY_SIZE
        counts[PageKind.ZERO] = layout.npages - counts[PageKind.PRIVATE] - counts[PageKind.SHARED]
        return counts, runs

    # ------------------------------------------------------------------ pages

    async def _write_extents(self, starts: np.ndarray, counts: np.ndarray) -> None:
        """Write every page of the extents in place, chunk by chunk, under the MSR gate.

        An extent is first widened to whole runs of the file: a run written earlier is one
        authenticated unit, so a page of it written again takes the rest of its run along.
        """
        guest = self.guest
        todo = int(counts.sum()) if len(counts) else 0
        for start, count in zip(starts.tolist(), counts.tolist(), strict=True):
            pos, end = self._run_bounds(start)[0], max(start + count, self._run_bounds(start + count - 1)[1])
            while pos < end:
                await asyncio.sleep(0)  # hypercalls and REST run between steps
                self._check_agent()
                if self._msr_dropped or not guest.vm.migration_ready:
                    await self._blackout()
                # Classify and read in one synchronous step: routing is the bitmap's at read time.
                step = self._write_step(pos, end)
                pos += step
                todo = max(0, todo - step)
                self.progress.remaining_pages = todo
                elapsed = time.monotonic() - self._started_at
                self.progress.throughput_bps = self.progress.bytes_transferred / elapsed if elapsed > 0 else 0.0

    def _run_bounds(self, page: int) -> tuple[int, int]:
        """[first, end) of the file run that holds ``page`` (the page alone if it is a hole)."""
        entry = np.frombuffer(os.pread(self._file(), ENTRY_SIZE, self.layout.entry_offset(page)), dtype=ENTRY)
        kind, n = int(entry["kind"][0]), int(entry["npages"][0])
        if kind in (EntryKind.PRIVATE_CONT, EntryKind.SHARED_CONT):
            first = page - n
            head = np.frombuffer(os.pread(self._file(), ENTRY_SIZE, self.layout.entry_offset(first)), dtype=ENTRY)
            return first, first + int(head["npages"][0])
        if kind in (EntryKind.PRIVATE, EntryKind.SHARED):
            return page, page + n
        return page, page + 1

    def _write_step(self, pos: int, end: int) -> int:
        """Write the pages from ``pos`` (one chunk, or a stretch of a hole); returns how many."""
        guest, fd, layout = self.guest, self._file(), self.layout
        data = guest.ram.next_populated(pos << PAGE_SHIFT, end - pos) >> PAGE_SHIFT
        if data > pos:
            count = min(data - pos, HOLE_STEP_PAGES)
            self._zero(pos, count)
            return count
        count = min(CHUNK_PAGES, end - pos)
        entries = np.zeros(count, dtype=ENTRY)
        for run in classify(guest.vm.shared_bitmap, guest.ram, pos, count):
            if run.kind is PageKind.ZERO:
                self._zero(run.first, run.count, entries=False)
                self.progress.count_run(PageKind.ZERO, run.count, 0)
                continue
            for first in range(run.first, run.first + run.count, FILE_RUN_PAGES):
                n = min(FILE_RUN_PAGES, run.first + run.count - first)
                entries[first - pos:first - pos + n] = self._write_run(run.kind, first, n)
        pwrite_all(fd, entries.tobytes(), layout.entry_offset(pos))
        return count

    def _write_run(self, kind: PageKind, first: int, n: int) -> np.ndarray:
        """Seal (private) or authenticate (shared) one run, write its slots; returns its table entries."""
        guest, fd = self.guest, self._file()
        gpa = first << PAGE_SHIFT
        out = memoryview(self._buffer)[:n * PAGE_SIZE]
        if kind is PageKind.PRIVATE:
            sequence = guest.firmware.transport_sequence(guest.handle)
            header, payload = guest.firmware.send_update_data(guest.handle, guest.ram, gpa, n, out)
            entries = run_entries(EntryKind.PRIVATE, n, sequence, bytes(header))
        else:
            assert self._key is not None
            out[:] = guest.ram.view(gpa, n)  # a copy: the MAC and the file get the same bytes
            payload = out
            sequence, self._sequence = self._sequence, self._sequence + 1
            entries = run_entries(EntryKind.SHARED, n, sequence, shared_mac(self._key, gpa, n, sequence, out))
        pwrite_all(fd, payload, self.layout.page_offset(first))
        self._written.set_range(first, n)
        self.progress.count_run(kind, n, n * (PAGE_SIZE + ENTRY_SIZE))
        return entries

    def _zero(self, first: int, count: int, *, entries: bool = True) -> None:
        """Pages that are zero now: their slots become holes again, their entries ZERO."""
        fd, layout = self._file(), self.layout
        if self._written.any_set(first, count):
            offset, length = layout.page_offset(first), count * PAGE_SIZE
            if not punch_hole(fd, offset, length):
                pwrite_all(fd, bytes(length), offset)
            self._written.clear_range(first, count)
        if entries:
            pwrite_all(fd, bytes(count * ENTRY_SIZE), layout.entry_offset(first))
            self.progress.count_run(PageKind.ZERO, count, 0)

    # ------------------------------------------------------------------ endings

    async def _roll_back(self, reason: str, *, cancelled: bool = False) -> None:
        """Before the commit: no file, the session cancelled, the guest resumed untouched."""
        self._rolling_back = True
        log.warning("save guest=%s %s: %s", self.guest.name, "cancelled" if cancelled else "failed", reason)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.part)
        if self._session_open:
            try:
                self.guest.firmware.send_cancel(self.guest.handle)
            except MigdError as exc:
                log.error("SEND_CANCEL failed guest=%s: %s", self.guest.name, exc)
        channel = self.guest.channel
        if self._paused and channel is not None and channel.connected:
            try:
                await channel.resume()
            except (MigdError, TimeoutError) as exc:
                log.error("could not resume guest=%s after a failed save: %s", self.guest.name, exc)
        self._paused = False
        if self.guest.state is GuestState.PAUSED:
            self.guest.state = GuestState.RUNNING
        if cancelled:
            self.session.cancel(time.monotonic())
        else:
            self.session.fail(reason, time.monotonic())

    async def _after_commit_failure(self, exc: BaseException) -> None:
        # The file is the guest now (the journal says so): never resume it here. Its agent stops,
        # but its RAM file and key stay until a restart's recovery has finished the file from
        # the journaled key (if that fails too, recovery keeps the guest here, stopped).
        reason = (f"committed, but the file could not be finished: {_reason(exc, self.path)}; the guest's "
                  f"memory is kept here and a restart of the daemon finishes {self.path}")
        log.error("save guest=%s: %s", self.guest.name, reason)
        await self.guest.halt()
        self.guest.state = GuestState.SAVED
        self.session.fail(reason, time.monotonic())

    def _check_agent(self) -> None:
        if self.guest.agent is None or self.guest.state is GuestState.STOPPED:
            raise SaveFailed(f"the agent of guest {self.guest.name} exited during the save (the guest crashed); "
                             f"no file was written")

    def _channel(self) -> GuestChannel:
        if self.guest.channel is None:
            raise SaveFailed(f"guest {self.guest.name} has no running agent")
        return self.guest.channel

    def _file(self) -> int:
        assert self._fd is not None
        return self._fd


def _reason(exc: BaseException, path: Path) -> str:
    """The job's ``error`` for ``exc``: one sentence, no class names (migd/failure_text.py)."""
    if failure_text.cause_of(exc) is failure_text.Cause.INTERNAL:
        log.error("internal error during a save to %s", path, exc_info=exc)
    return failure_text.describe_file_job(exc, path=str(path), step="the save")


def finish_interrupted(path: Path, job_id: str, *, committed: bool, finished: bool,
                       key: bytes | None) -> str | None:
    """Restart recovery of a save the daemon died in; returns what was done (for the log), None if nothing.

    Without a commit record the save never happened: its temporary file goes (the guest is
    intact here). With one, the guest is the file's: the temporary file is checked (it is this
    save's, its table is the one its tail binds), gets its trailer MAC (computed again from the
    journaled hand-off key; always rewritten: a crash may have left a torn one) and its final
    name. SaveFailed if that cannot be done, or if an unfinished committed save has neither its
    temporary file nor its final one: then no restore accepts the guest, and its memory here
    must be kept.
    """
    part = part_path(path, job_id)
    if not os.path.lexists(part):
        if committed and not finished and not _is_save(path, job_id):
            raise SaveFailed(f"neither {part} nor {path} (of this save) exists")
        return None
    if not committed:
        os.unlink(part)
        return f"removed {part}"
    if key is None:
        raise SaveFailed(f"cannot finish {part}: the save's hand-off key was never journaled")
    fd = os.open(part, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        header = SaveHeader.unpack(os.pread(fd, HEADER_REGION, 0))
        if header.save_id != job_id:
            raise SaveFailed(f"cannot finish {part}: it holds save {header.save_id}, not {job_id}")
        layout = Layout(header.npages)
        size = os.fstat(fd).st_size
        body_len = tail_body_length(os.pread(fd, TAIL_PREFIX_SIZE, layout.tail_off))
        body = os.pread(fd, body_len, layout.tail_off + TAIL_PREFIX_SIZE)
        sealed_at = layout.tail_off + TAIL_PREFIX_SIZE + body_len
        if size not in (sealed_at, sealed_at + MAC_SIZE):
            raise SaveFailed(f"cannot finish {part}: {size} bytes, its tail says {sealed_at} (+ MAC)")
        tail, _, _ = SaveTail.unpack(os.pread(fd, sealed_at - layout.tail_off, layout.tail_off) + bytes(MAC_SIZE),
                                     layout)
        if tail.header_sha256 != header.digest() or tail.table_sha256 != table_digest(fd, layout):
            raise SaveFailed(f"cannot finish {part}: its header or page table is not the one its tail binds")
        pwrite_all(fd, tail_mac(key, body), sealed_at)
        os.fsync(fd)
    except SaveFileError as exc:
        raise SaveFailed(f"cannot finish {part}: {exc}") from None
    finally:
        os.close(fd)
    publish(part, path)
    return f"finished {path}"


def _is_save(path: Path, job_id: str) -> bool:
    """Whether ``path`` is a file of save ``job_id`` (its header says so)."""
    try:
        fd = open_regular(path)
    except (OSError, ValueError):
        return False
    try:
        return SaveHeader.unpack(os.pread(fd, HEADER_REGION, 0)).save_id == job_id
    except SaveFileError:
        return False
    finally:
        os.close(fd)
