"""Placing received runs into the new guest's RAM (IncomingMigration._place), without a stream."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from migd import wire
from migd.abi import PAGE_SIZE
from migd.bitmap import PageBitmap
from migd.dest import IncomingMigration
from session_pair import established
from migd.errors import ProtocolError
from migd.platform.memory import GuestRam
from migd.progress import MigrationProgress

NPAGES = 64


def _incoming(ram: GuestRam) -> IncomingMigration:
    incoming = IncomingMigration(None, None, "peer")  # type: ignore[arg-type]
    incoming.guest = SimpleNamespace(definition=SimpleNamespace(npages=NPAGES), ram=ram)  # type: ignore[assignment]
    incoming._received = PageBitmap(NPAGES)
    incoming.progress = MigrationProgress("g", "destination", "peer", NPAGES)
    established(dest=incoming.session)  # page frames are legal once the session is authenticated
    return incoming


def test_zero_run_over_placed_pages_zeroes_them(tmp_path: Path) -> None:
    with GuestRam(tmp_path / "ram", NPAGES, create=True) as ram:
        incoming = _incoming(ram)
        incoming._place(wire.SharedPages(8 * PAGE_SIZE, 4, os.urandom(4 * PAGE_SIZE)))
        incoming._place(wire.ZeroPages(6 * PAGE_SIZE, 4))  # a later round: pages 8, 9 became zero
        assert ram.nonzero_pages(0, NPAGES).tolist() == [p in (10, 11) for p in range(NPAGES)]
        assert incoming._received.count() == 6


def test_zero_run_into_a_fresh_range_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with GuestRam(tmp_path / "ram", NPAGES, create=True) as ram:
        incoming = _incoming(ram)
        zeroed: list[tuple[int, int]] = []
        real_zero = ram.zero
        monkeypatch.setattr(ram, "zero", lambda gpa, n: (zeroed.append((gpa, n)), real_zero(gpa, n))[1])
        incoming._place(wire.ZeroPages(0, 32))  # the new guest's file is one hole already
        assert zeroed == []
        incoming._place(wire.SharedPages(40 * PAGE_SIZE, 1, os.urandom(PAGE_SIZE)))
        incoming._place(wire.ZeroPages(32 * PAGE_SIZE, 16))  # overlaps the placed page 40: punched
        assert zeroed == [(32 * PAGE_SIZE, 16)]
        assert not ram.nonzero_pages(0, NPAGES).any()
        assert incoming._received.count() == 48


def test_run_outside_the_guest_is_refused(tmp_path: Path) -> None:
    with GuestRam(tmp_path / "ram", NPAGES, create=True) as ram:
        incoming = _incoming(ram)
        with pytest.raises(ProtocolError, match="outside the guest"):
            incoming._place(wire.ZeroPages((NPAGES - 1) * PAGE_SIZE, 2))
        incoming.session.receive(wire.VcpuState(0, None, b"state"), 0.0)  # the last frame before PREPARE
        with pytest.raises(ProtocolError, match="ZERO_PAGES frame in phase await-prepare"):
            incoming._place(wire.ZeroPages(0, 1))
