"""Found by an adversarial review. The daemon keeps every save job (Daemon.file_jobs, never pruned)
after it ends: a finished save must not keep its npages/8 written-pages bitmap nor its 128 KiB run buffer (as a finished migration keeps neither
its rings nor its re-send bitmap since 4c648ff / 47696a8)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from migd.bitmap import PageBitmap
from migd.guest.host_guest import GuestDefinition, GuestState
from migd.platform import identity
from migd.platform.psp import PspFirmware
from migd.save import GuestSave, SaveFailed

MEMORY_MIB = 64 << 10  # a 64 GiB guest


def _held(job: GuestSave) -> dict[str, int]:
    sizes = {}
    for name, value in vars(job).items():
        if isinstance(value, PageBitmap):
            sizes[name] = value._words.nbytes
        elif isinstance(value, (bytearray, np.ndarray)):
            sizes[name] = value.nbytes if isinstance(value, np.ndarray) else len(value)
    return sizes


def test_a_finished_save_keeps_no_bitmap_or_buffer(tmp_path: Path) -> None:
    identity.init_host(tmp_path / "hostA", tmp_path / "ca", common_name="hostA")
    fw = PspFirmware.from_state_dir(tmp_path / "hostA", [tmp_path / "ca" / identity.CA_CERT])
    guest = SimpleNamespace(
        name="g", definition=GuestDefinition("g", MEMORY_MIB, 0), handle=fw.launch(0), agent=object(),
        state=GuestState.RUNNING, firmware=fw, channel=None,
        vm=SimpleNamespace(migration_ready=True, msr_migration_control=1, on_migration_control_change=None),
    )
    job = GuestSave(guest, tmp_path / "g.save", fw.pdh_cert_pem)  # type: ignore[arg-type]

    async def stop_and_write(dirty: object) -> None:
        raise SaveFailed("injected")

    job._stop_and_write = stop_and_write  # type: ignore[method-assign]
    asyncio.run(job.run())
    assert job.session.finished
    held = _held(job)
    assert sum(held.values()) < 64 << 10, f"a finished save keeps {held} (bytes)"
