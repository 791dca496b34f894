"""A page worker that fails, on either end of a migration over several connections.

With several connections each one's page work runs in a thread of its own: the source's sealing
of private runs (migd/send_lane.py), the destination's placement (its page pipeline). A failure
there must end the migration like any other before the commit: the guest runs on at the source
with a clean self-check, nothing is left on the destination, and the error says which
connection failed. Each case first asserts that its injected failure fired.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from migd.abi import FirmwareStatus
from migd.errors import FirmwareError
from migd.platform.psp import PspFirmware

from .test_stream_faults import PARAMS, migrate_through

pytestmark = pytest.mark.timeout(120)

CONNECTIONS = 4
FAILING_LANE = 2  # the third connection: a further one, not the control connection


def _failing_on(lane_calls: list[int], lane: int, failing: int, nth: int) -> bool:
    """Whether this call, on ``lane``, is the ``nth`` call on lane ``failing`` (the one that fails).

    The lane of this call is checked, not only the count: the connections' threads append
    concurrently, and another lane's call may see the count reach ``nth`` too."""
    return lane == failing and lane_calls.count(failing) == nth


@pytest.mark.fault_class("page worker failure: {end}")
@pytest.mark.parametrize("end", ["source", "destination"])
def test_a_failing_page_worker_ends_the_migration_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         end: str) -> None:
    calls: list[int] = []
    if end == "source":
        send = PspFirmware.send_update_data

        def failing_send(self: PspFirmware, handle: int, ram: Any, gpa: int, npages: int, out: Any = None,
                         lane: int = 0, **kwargs: Any) -> tuple[bytes, memoryview]:
            calls.append(lane)
            if _failing_on(calls, lane, FAILING_LANE, 2):
                raise FirmwareError(FirmwareStatus.INVALID_PARAM, "injected: the sealing worker failed")
            return send(self, handle, ram, gpa, npages, out, lane, **kwargs)

        monkeypatch.setattr(PspFirmware, "send_update_data", failing_send)
    else:
        receive = PspFirmware.receive_update_data

        def failing_receive(self: PspFirmware, *args: Any, lane: int = 0, **kwargs: Any) -> None:
            calls.append(lane)
            if _failing_on(calls, lane, FAILING_LANE, 2):
                raise FirmwareError(FirmwareStatus.INVALID_PARAM, "injected: the placing worker failed")
            receive(self, *args, lane=lane, **kwargs)

        monkeypatch.setattr(PspFirmware, "receive_update_data", failing_receive)
    outcome = migrate_through(tmp_path, [], params=dataclasses.replace(PARAMS, connections=CONNECTIONS),
                              monkeypatch=monkeypatch)
    # The negative control: the worker of that connection really ran twice, and failed.
    assert calls.count(FAILING_LANE) >= 2, calls
    assert len(set(calls)) > 1, calls  # the private runs went over several connections
    outcome.assert_rolled_back()
    error = outcome.progress.phase.error or ""
    assert "injected" in error, error
    if end == "source":
        assert f"connection {FAILING_LANE + 1}" in error, error
        assert "injected" in outcome.dest_error, outcome.dest_error  # the source's ABORT, not a lost connection
    else:
        assert "injected" in outcome.dest_error, outcome.dest_error


def test_the_same_migration_without_the_failure_completes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Control for the cases above: nothing else about them makes the migration fail."""
    outcome = migrate_through(tmp_path, [], params=dataclasses.replace(PARAMS, connections=CONNECTIONS),
                              monkeypatch=monkeypatch)
    outcome.assert_moved_intact()
