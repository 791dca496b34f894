"""An adversary who holds the hand-off key: a one-pass file still cannot lose a private run.

The hand-off key seals a file's trailer, and both daemons hold it (the saving one journals it, the
restoring one derives it in RECEIVE_START). With it a host can rewrite the page table and seal it
again. A one-pass save's packets are then still opened in order by the firmware, like a
migration stream's, so a dropped private run fails the next packet's MAC. A live save's slots were
overwritten in place and are opened by sequence: there the trailer, that is the key, is what binds
them (docs/save-restore.md, "What the hand-off key protects").
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from migd.abi import PAGE_SIZE
from migd.migration_state import MigrationStatus
from migd.save_format import ENTRY_SIZE, EntryKind, SaveTail, tail_mac
from test_api import make_daemon
from test_save_file import SaveFile, mutated, past_first_step, refused, run_async, running_guest, save
from test_save_recovery import _finished


def _drop_and_reseal(original: SaveFile, key: bytes, dst: Path) -> Path:
    """``original`` with one private run made a hole, its table, counts and trailer made consistent again."""
    private = past_first_step(original.of_kind(EntryKind.PRIVATE))[:-1]  # not the last: a later packet follows
    assert private, "the guest has no private run to drop"
    run = private[len(private) // 2]
    layout = original.layout
    table = bytearray(original.data[layout.table_off:layout.table_off + layout.npages * ENTRY_SIZE])
    start = run.first * ENTRY_SIZE
    table[start:start + run.npages * ENTRY_SIZE] = bytes(run.npages * ENTRY_SIZE)
    t = original.tail
    pages = dict(t.pages, private=t.pages["private"] - run.npages, zero=t.pages["zero"] + run.npages)
    forged = SaveTail(t.bitmap, t.vcpu_header, t.vcpu_payload, t.vcpu_seq, pages, t.runs - 1, t.final_sequence,
                      t.header_sha256, hashlib.sha256(table).digest())
    unsealed = forged.pack_unsealed()
    mutated(original.path, dst, [
        (layout.page_offset(run.first), bytes(run.npages * PAGE_SIZE)),
        (layout.table_off, bytes(table)),
        (layout.tail_off, unsealed + tail_mac(key, forged.body())),
    ], size=layout.tail_off + len(unsealed) + 32)
    return dst


@pytest.mark.parametrize("live", [False, True], ids=["one-pass-refused", "negative-control-live-reseal-verifies"])
def test_a_private_run_dropped_and_resealed_with_the_key(tmp_path: Path, live: bool) -> None:
    async def main() -> None:
        d = make_daemon(tmp_path, "hostA")
        await d.start()
        try:
            await running_guest(d, "g1", seed=11)
            saved_path = await save(d, "g1", tmp_path / "g1.save", live=live)
            (job,) = [j for j in d.file_jobs.values() if j.progress.role == "save"]
            key = d.journal.handoff_key(job.progress.id)
            assert key is not None
            forged = _drop_and_reseal(SaveFile.read(saved_path), key, tmp_path / "forged.save")
            if not live:
                refusal = await refused(d, forged, name="copy")
                assert "MAC mismatch" in refusal.reason and "sequence" in refusal.reason, refusal
                return
            # The re-sealed trailer verifies (so the refusal above is the firmware's order, not a bad
            # forgery): a live file takes its slots by sequence, and the key is what binds them.
            progress = await _finished(d.restore_guest(str(forged), name="copy"), 120)
            assert progress.status is MigrationStatus.COMPLETED, progress.to_json()
        finally:
            await d.shutdown()

    run_async(main)


def test_the_kind_of_save_is_bound_into_the_session(tmp_path: Path) -> None:
    """A one-pass file whose header claims a live save (to be opened by sequence) opens nothing."""
    async def main() -> None:
        d = make_daemon(tmp_path, "hostA")
        await d.start()
        try:
            await running_guest(d, "g1", seed=12)
            original = SaveFile.read(await save(d, "g1", tmp_path / "g1.save"))
            nonce_at = original.data.index(original.header.file_nonce)
            assert original.header.one_pass
            claimed_live = mutated(original.path, tmp_path / "live.save", [(nonce_at + 31, b"\x01")])
            refusal = await refused(d, claimed_live, name="copy")
            assert "session blob" in refusal.reason or "trailer" in refusal.reason or "header" in refusal.reason, refusal
            # Negative control: the untouched file restores.
            progress = await _finished(d.restore_guest(str(original.path), name="copy"), 120)
            assert progress.status is MigrationStatus.COMPLETED, progress.to_json()
        finally:
            await d.shutdown()

    run_async(main)

