"""The save file against an adversary: real files from an in-process daemon, restored after tampering.

Every copy here is altered the way a host that holds the file could alter it — truncated,
bit-flipped, reordered, spliced from another save, retargeted, never committed, restored a
second time — and each restore must be refused with a reason that says what is wrong, and leave
nothing behind: no guest record, no guest directory, no firmware context, no journal row. The
negative control of every case is an untouched copy made by the same helper, which restores and
whose guest self-checks every page without an error.

In process (no ``migd serve``): the daemon of tests/test_api.py's ``make_daemon``, its guest
agents its only subprocesses; small guests (16 MiB) with a seeded workload so files hold
private, shared and zero pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from migd.abi import PAGE_SHIFT, PAGE_SIZE, GuestPolicy
from migd.daemon.core import Daemon
from migd.guest.host_guest import GuestDefinition, GuestState, HostGuest
from migd.guest.workload import WorkloadConfig
from migd.journal import JournalError
from migd.migration_state import MigrationStatus
from migd.platform import identity
from migd.progress import MigrationProgress
from migd.restore import TABLE_STEP
from migd.save import SaveRefused, part_path
from migd.save_format import (
    ENTRY, ENTRY_SIZE, HEADER_REGION, TAIL_PREFIX_SIZE, EntryKind, Layout, SaveFileError, SaveHeader, SaveTail,
    TableRun, pdh_fingerprint, table_runs, tail_body_length,
)
from migd.sev_transport import MAC_SIZE

from test_api import make_daemon

TIMEOUT_S = 30.0
MEMORY_MIB = 16


def workload(seed: int) -> WorkloadConfig:
    """Dirties pages and converts them private ⇄ shared, reproducibly."""
    return WorkloadConfig(dirty_rate_mib_s=8.0, convert_rate_hz=20.0, seed=seed)


async def wait_for(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def finished(progress: MigrationProgress) -> MigrationProgress:
    await wait_for(lambda: progress.status.finished, f"job {progress.id}: {progress.to_json()}")
    return progress


async def running_guest(d: Daemon, name: str, *, seed: int, policy: int = GuestPolicy.NODBG) -> HostGuest:
    """A started guest with its workload, its migration MSR READY and some pages written."""
    d.create_guest(GuestDefinition(name, MEMORY_MIB, int(policy)))
    guest = await d.start_guest(name, workload(seed))
    await wait_for(lambda: guest.vm.migration_ready, f"guest {name} to enable migration")
    await asyncio.sleep(0.2)  # the workload dirties and converts pages
    return guest


async def save(d: Daemon, name: str, path: Path, **kwargs: object) -> Path:
    progress = await finished(d.save_guest(name, str(path), **kwargs))  # type: ignore[arg-type]
    assert progress.status is MigrationStatus.COMPLETED, progress.to_json()
    assert path.is_file()
    return path


async def restored(d: Daemon, path: Path, name: str | None = None) -> HostGuest:
    """Restore ``path`` and self-check every page of the guest: the negative control of every refusal."""
    progress = await finished(d.restore_guest(str(path), name=name))
    assert progress.status is MigrationStatus.COMPLETED, progress.to_json()
    guest = d.guest(progress.guest)
    assert guest.state is GuestState.RUNNING
    report = await guest.check()
    assert report.errors == 0 and report.pages_verified == MEMORY_MIB * 256, report
    return guest


# ---------------------------------------------------------------------- the file, read as an adversary


@dataclass(frozen=True)
class SaveFile:
    """A save file's header, layout, runs and tail, parsed to find where to strike."""

    path: Path
    header: SaveHeader
    layout: Layout
    runs: list[TableRun]
    tail: SaveTail
    data: bytes

    @classmethod
    def read(cls, path: Path) -> SaveFile:
        data = path.read_bytes()
        header = SaveHeader.unpack(data[:HEADER_REGION])
        layout = Layout(header.npages)
        table = np.frombuffer(data[layout.table_off:layout.table_off + layout.npages * ENTRY_SIZE], dtype=ENTRY)
        runs, carry = table_runs(table, 0, None)
        assert carry is None
        tail, _, _ = SaveTail.unpack(data[layout.tail_off:], layout)
        return cls(path, header, layout, runs, tail, data)

    def of_kind(self, kind: EntryKind) -> list[TableRun]:
        return [r for r in self.runs if r.kind is kind]

    def slot(self, run: TableRun) -> tuple[int, bytes]:
        """(offset, bytes) of a run's page slots."""
        offset = self.layout.page_offset(run.first)
        return offset, self.data[offset:offset + run.npages * PAGE_SIZE]

    def entries(self, run: TableRun) -> tuple[int, bytes]:
        """(offset, bytes) of a run's table entries (its first page's and its continuations')."""
        offset = self.layout.entry_offset(run.first)
        return offset, self.data[offset:offset + run.npages * ENTRY_SIZE]

    def flip(self, offset: int, mask: int = 0x01) -> tuple[int, bytes]:
        """The edit that flips ``mask`` in the byte at ``offset``."""
        return offset, bytes([self.data[offset] ^ mask])

    def name_offset(self) -> int:
        """Where the guest's name starts in the header (msgpack: fixstr "name", then the fixstr value)."""
        key = b"\xa4name" + bytes([0xA0 | len(self.header.name)]) + self.header.name.encode()
        return self.data.index(key, 0, HEADER_REGION) + 6

    def bitmap_offset(self) -> int:
        """Where the shared-page bitmap's bytes start in the tail body."""
        body = self.layout.tail_off + TAIL_PREFIX_SIZE
        return self.data.index(self.tail.bitmap, body)


def mutated(src: Path, dst: Path, edits: Iterable[tuple[int, bytes]] = (), *, size: int | None = None) -> Path:
    """A copy of ``src`` with ``edits`` (offset, bytes) written over it, then cut or extended to ``size``."""
    shutil.copyfile(src, dst)
    with open(dst, "r+b") as f:
        for offset, data in edits:
            f.seek(offset)
            f.write(data)
        if size is not None:
            f.truncate(size)
    return dst


def past_first_step(runs: list[TableRun]) -> list[TableRun]:
    """The runs a restore places after its first table step, once the incoming agent is starting.

    A refusal inside the first step (the first TABLE_STEP pages) has its own test below: it
    cancels the agent's start mid-way (which once left the host's next guest channel hanging).
    """
    return [r for r in runs if r.first >= TABLE_STEP]


def same_length_pair(runs: list[TableRun]) -> tuple[TableRun, TableRun]:
    """Two runs of one length: swapped whole, the table stays well-formed (only the binding can tell)."""
    by_length: dict[int, TableRun] = {}
    for run in runs:
        if run.npages in by_length:
            return by_length[run.npages], run
        by_length[run.npages] = run
    raise AssertionError(f"no two runs of one length among {[(r.first, r.npages) for r in runs]}")


@dataclass(frozen=True)
class Refusal:
    synchronous: bool  # SaveFileError from restore_guest (REST 409), else the job failed
    reason: str


async def refused(d: Daemon, path: Path, name: str | None = "copy") -> Refusal:
    """Restore ``path`` expecting a refusal; asserts that nothing was created or changed."""
    guests = dict(d.host.guests)
    states = {n: g.state for n, g in guests.items()}
    handles = d.firmware.guest_handles()
    journal_names = sorted(r.name for r in d.journal.guests())
    target = name or SaveHeader.unpack(path.read_bytes()[:HEADER_REGION]).name
    had_dir = d.host.guest_dir(target).exists()
    jobs = len(d.file_jobs)
    try:
        progress = d.restore_guest(str(path), name=name)
    except SaveFileError as exc:
        refusal = Refusal(True, str(exc))
        assert len(d.file_jobs) == jobs  # refused before any job existed
    else:
        await finished(progress)
        assert progress.status is MigrationStatus.FAILED, progress.to_json()
        refusal = Refusal(False, progress.to_json()["error"])
    assert d.host.guests == guests and {n: g.state for n, g in d.host.guests.items()} == states
    assert target in guests or target not in d.host.guests
    assert d.host.guest_dir(target).exists() == had_dir
    assert d.firmware.guest_handles() == handles
    assert sorted(r.name for r in d.journal.guests()) == journal_names
    assert refusal.reason
    return refusal


def run_async(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 120))


# ---------------------------------------------------------------------- tests


def test_tampered_truncated_and_reordered_copies_are_refused_and_leave_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        d = make_daemon(tmp_path, "hostA")
        await d.start()
        try:
            await running_guest(d, "g1", seed=11)
            original = await save(d, "g1", tmp_path / "g1.save", live=True)
            f = SaveFile.read(original)
            layout, size = f.layout, len(f.data)
            private = past_first_step(f.of_kind(EntryKind.PRIVATE))
            shared = past_first_step(f.of_kind(EntryKind.SHARED))
            assert private and shared, "the file must hold private and shared pages"
            copies = tmp_path / "copies"
            copies.mkdir()

            def copy(label: str, edits: Iterable[tuple[int, bytes]] = (), *, size: int | None = None) -> Path:
                return mutated(original, copies / f"{label}.save", edits, size=size)

            victim = private[len(private) // 2]
            victim_gpa = victim.first << PAGE_SHIFT
            a, b = same_length_pair(private)
            (slot_a, bytes_a), (slot_b, bytes_b) = f.slot(a), f.slot(b)
            (entry_a, entries_a), (entry_b, entries_b) = f.entries(a), f.entries(b)
            assert bytes_a != bytes_b and entries_a != entries_b  # the swaps below really change the file
            forged_header = dataclasses.replace(f.header, policy=f.header.policy | GuestPolicy.NOSEND).pack()
            assert len(forged_header) == len(f.header.pack())

            # (label, copy, refused before any job, what the reason must say)
            cases: list[tuple[str, Path, bool, str]] = [
                ("cut inside the header", copy("cut-header", size=1000), True, "truncated or not a migd save file"),
                ("cut inside the page area", copy("cut-pages", size=layout.page_offset(victim.first) + 100), True,
                 "truncated: it ends inside the page table"),
                ("cut inside the table", copy("cut-table", size=layout.entry_offset(victim.first) + 7), True,
                 "truncated: it ends inside the page table"),
                ("cut inside the tail", copy("cut-tail", size=(layout.tail_off + size) // 2), True,
                 "truncated or has trailing bytes"),
                ("last byte cut", copy("cut-last", size=size - 1), True, "truncated or has trailing bytes"),
                ("trailer MAC cut", copy("cut-mac", size=size - MAC_SIZE), True, "truncated or has trailing bytes"),
                ("one byte appended", copy("appended", size=size + 1), True, "trailing bytes"),
                ("header claims NOSEND", copy("nosend", [(0, forged_header)]), True, "NOSEND"),
                ("bit flip in a private slot", copy("flip-private", [f.flip(f.slot(victim)[0] + 100)]), False,
                 f"packet at gpa {victim_gpa:#x}: packet MAC mismatch"),
                ("bit flip in a shared slot", copy("flip-shared", [f.flip(f.slot(shared[0])[0] + 5, 0x80)]), False,
                 f"shared pages at {shared[0].first << PAGE_SHIFT:#x} do not verify"),
                ("bit flip in the header's name", copy("flip-name", [f.flip(f.name_offset())]), False,
                 "the header is not the one the save wrote"),
                ("bit flip in the tail's bitmap", copy("flip-bitmap", [f.flip(f.bitmap_offset() + 3, 0x10)]), False,
                 "the trailer does not verify"),
                ("trailer MAC forged", copy("forged-mac", [(size - MAC_SIZE, bytes(MAC_SIZE))]), False,
                 "the trailer does not verify"),
                ("two private runs swapped, slots and entries",
                 copy("swap-runs", [(slot_a, bytes_b), (slot_b, bytes_a), (entry_a, entries_b), (entry_b, entries_a)]),
                 False, f"packet at gpa {a.first << PAGE_SHIFT:#x}: packet MAC mismatch"),
                ("two private runs' entries swapped",
                 copy("swap-entries", [(entry_a, entries_b), (entry_b, entries_a)]),
                 False, f"packet at gpa {a.first << PAGE_SHIFT:#x}: packet MAC mismatch"),
                ("a private run dropped from the table",
                 copy("dropped", [(f.entries(victim)[0], bytes(victim.npages * ENTRY_SIZE))]),
                 False, "the page table is not the one the save sealed"),
            ]
            # The flips that must get past the synchronous checks really do: the header and tail still parse.
            assert SaveHeader.unpack((copies / "flip-name.save").read_bytes()[:HEADER_REGION]).name != f.header.name
            SaveTail.unpack((copies / "flip-bitmap.save").read_bytes()[layout.tail_off:], layout)
            for label, path, synchronous, match in cases:
                refusal = await refused(d, path)
                assert refusal.synchronous is synchronous, (label, refusal)
                assert match in refusal.reason, (label, refusal.reason)

            # Negative control: an untouched copy from the same helper restores, every page intact,
            # after all those refusals (none of them consumed the file's session).
            pristine = copy("pristine")
            assert pristine.read_bytes() == f.data
            await restored(d, pristine, "copy")

            # At most once: the same file again, under its own name (the saved record) or another.
            assert d.guest("g1").state is GuestState.SAVED
            for path, name in ((pristine, None), (original, None), (original, "copy2")):
                refusal = await refused(d, path, name)
                assert refusal.synchronous and "was restored on this host before" in refusal.reason, refusal
            assert d.guest("g1").state is GuestState.SAVED
        finally:
            await d.shutdown()

    run_async(main)


def test_a_page_spliced_from_another_save_of_the_guest_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        d = make_daemon(tmp_path, "hostA")
        await d.start()
        try:
            await running_guest(d, "g1", seed=12)
            file_a = await save(d, "g1", tmp_path / "a.save")
            guest = await restored(d, file_a)  # under its own name: the saved record is replaced
            await wait_for(lambda: guest.vm.migration_ready, "the restored guest to enable migration")
            file_b = await save(d, "g1", tmp_path / "b.save")
            fa, fb = SaveFile.read(file_a), SaveFile.read(file_b)
            assert fa.header.session_blob != fb.header.session_blob

            def common(kind: EntryKind) -> TableRun:
                places = {(r.first, r.npages) for r in fa.of_kind(kind)}
                found = [r for r in past_first_step(fb.of_kind(kind)) if (r.first, r.npages) in places]
                assert found, f"no {kind.name} run at the same place in both saves"
                return found[0]

            run = common(EntryKind.PRIVATE)
            a_run = next(r for r in fa.runs if (r.first, r.npages) == (run.first, run.npages))
            (slot, a_slot), (entry, a_entries) = fa.slot(a_run), fa.entries(a_run)
            assert a_slot != fb.slot(run)[1] and a_entries != fb.entries(run)[1]
            gpa = run.first << PAGE_SHIFT
            for label, edits in (("slot and entries", [(slot, a_slot), (entry, a_entries)]),
                                 ("slot only", [(slot, a_slot)]), ("entries only", [(entry, a_entries)])):
                spliced = mutated(file_b, tmp_path / f"spliced-{label.replace(' ', '-')}.save", edits)
                refusal = await refused(d, spliced)
                assert not refusal.synchronous and f"packet at gpa {gpa:#x}: packet MAC mismatch" in refusal.reason, \
                    (label, refusal)
            s_run = common(EntryKind.SHARED)
            a_shared = next(r for r in fa.runs if (r.first, r.npages) == (s_run.first, s_run.npages))
            spliced = mutated(file_b, tmp_path / "spliced-shared.save", [fa.slot(a_shared), fa.entries(a_shared)])
            refusal = await refused(d, spliced)
            assert not refusal.synchronous and "do not verify" in refusal.reason, refusal

            # Negative control: B untouched restores.
            await restored(d, mutated(file_b, tmp_path / "b-copy.save"), "copy")
            # A was restored once under its own name: under another one it is refused too.
            refusal = await refused(d, file_a, "other")
            assert refusal.synchronous and "was restored on this host before" in refusal.reason, refusal
        finally:
            await d.shutdown()

    run_async(main)


def test_a_file_for_another_host_restores_only_there(tmp_path: Path) -> None:
    async def main() -> None:
        host_a, host_b = make_daemon(tmp_path, "hostA"), make_daemon(tmp_path, "hostB")
        await host_a.start()
        await host_b.start()
        try:
            # SEV-ES: the vCPU state travels as a VMSA packet that only hostB's firmware opens.
            await running_guest(host_a, "g1", seed=13, policy=GuestPolicy.NODBG | GuestPolicy.ES)
            path = await save(host_a, "g1", tmp_path / "g1.save",
                              for_host_pdh=str(tmp_path / "hostB" / identity.PDH_CERT))
            f = SaveFile.read(path)
            assert f.header.target_pdh_sha256 == pdh_fingerprint(host_b.firmware.pdh_cert_pem)
            refusal = await refused(host_a, path)
            assert refusal.synchronous and "was saved for another host" in refusal.reason, refusal
            # The header retargeted to hostA passes the fingerprint check; the firmware still refuses
            # the session, which is wrapped for hostB's PDH alone.
            retargeted = dataclasses.replace(f.header, target_pdh_sha256=pdh_fingerprint(host_a.firmware.pdh_cert_pem))
            forged = mutated(path, tmp_path / "retargeted.save", [(0, retargeted.pack())])
            refusal = await refused(host_a, forged)
            assert not refusal.synchronous and "session blob rejected" in refusal.reason, refusal
            # Negative control: on hostB the file restores, every page and the vCPU intact.
            guest = await restored(host_b, path)
            assert guest.definition.policy & GuestPolicy.ES
        finally:
            await host_b.shutdown()
            await host_a.shutdown()

    run_async(main)


def test_a_nosend_guest_is_not_saved(tmp_path: Path) -> None:
    async def main() -> None:
        d = make_daemon(tmp_path, "hostA")
        await d.start()
        try:
            guest = await running_guest(d, "secret", seed=14, policy=GuestPolicy.NODBG | GuestPolicy.NOSEND)
            out = tmp_path / "out"
            out.mkdir()
            path = out / "secret.save"
            handles, jobs = d.firmware.guest_handles(), len(d.file_jobs)
            with pytest.raises(SaveRefused, match="NOSEND policy"):
                d.save_guest("secret", str(path))
            assert os.listdir(out) == [] and len(d.file_jobs) == jobs
            assert guest.state is GuestState.RUNNING and d.firmware.guest_handles() == handles
            assert (await guest.check()).errors == 0
            # Negative control: the same save of a guest without NOSEND goes through.
            await running_guest(d, "open", seed=14)
            await save(d, "open", path)
        finally:
            await d.shutdown()

    run_async(main)


def test_a_save_that_never_commits_leaves_no_file_and_the_guest_running(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        d = make_daemon(tmp_path, "hostA")
        await d.start()
        try:
            guest = await running_guest(d, "g1", seed=15)
            out = tmp_path / "out"
            out.mkdir()
            path = out / "g1.save"
            uncommitted = tmp_path / "uncommitted.save"

            def journal_down(progress: MigrationProgress, **_: object) -> None:
                # Everything but the MAC is written: keep that file, then fail the commit.
                shutil.copyfile(part_path(path, progress.id), uncommitted)
                raise JournalError("injected: the journal cannot record the commit")

            monkeypatch.setattr(d.journal, "record_commit", journal_down)
            progress = await finished(d.save_guest("g1", str(path), live=True))
            monkeypatch.undo()
            assert progress.status is MigrationStatus.FAILED, progress.to_json()
            assert "injected" in progress.to_json()["error"]
            assert uncommitted.is_file()  # the fault really struck after the tail was written
            assert os.listdir(out) == []  # no file, no temporary file
            assert d.guest("g1") is guest and guest.state is GuestState.RUNNING
            assert guest.handle in d.firmware.guest_handles()
            assert (await guest.check()).errors == 0

            # The file as it was at the commit point: its tail ends without the MAC.
            raw = uncommitted.read_bytes()
            layout = Layout(SaveHeader.unpack(raw[:HEADER_REGION]).npages)
            body_len = tail_body_length(raw[layout.tail_off:layout.tail_off + TAIL_PREFIX_SIZE])
            assert len(raw) == layout.tail_off + TAIL_PREFIX_SIZE + body_len
            refusal = await refused(d, uncommitted)
            assert refusal.synchronous and "truncated or has trailing bytes" in refusal.reason, refusal
            with_mac = mutated(uncommitted, tmp_path / "with-mac.save", [(len(raw), bytes(MAC_SIZE))])
            refusal = await refused(d, with_mac)
            assert not refusal.synchronous and "the trailer does not verify" in refusal.reason, refusal

            # Negative control: with the journal back the same save commits, and its file restores.
            await wait_for(lambda: guest.vm.migration_ready, "the guest to enable migration")
            await save(d, "g1", path, live=True)
            assert os.listdir(out) == ["g1.save"]
            await restored(d, path, "copy")
        finally:
            await d.shutdown()

    run_async(main)


def test_a_restore_refused_in_its_first_table_step_leaves_the_next_guest_working(tmp_path: Path) -> None:
    # A file altered in its first 2 MiB is refused in the same loop step as the incoming agent's
    # start begins; the discard then cancels that start. Whatever that instant, the host must
    # come out as before: the untouched file restores (its agent connects and answers).
    async def main() -> None:
        d = make_daemon(tmp_path, "hostA")
        await d.start()
        try:
            await running_guest(d, "g1", seed=16)
            original = await save(d, "g1", tmp_path / "g1.save")
            f = SaveFile.read(original)
            first = f.of_kind(EntryKind.PRIVATE)[0]
            assert first.first < TABLE_STEP
            bad = mutated(original, tmp_path / "bad.save", [f.flip(f.slot(first)[0] + 10)])
            refusal = await refused(d, bad)
            assert not refusal.synchronous and "packet MAC mismatch" in refusal.reason, refusal
            await restored(d, mutated(original, tmp_path / "copy.save"), "copy")
        finally:
            await d.shutdown()

    run_async(main)
