"""The migration phase machine: every allowed and refused transition."""

from __future__ import annotations

import pytest

from migd.migration_state import TRANSITIONS, InvalidTransition, MigrationPhase, MigrationStatus

S = MigrationStatus


def test_happy_path_with_blackout() -> None:
    p = MigrationPhase(started_at=10.0)
    for t, to in enumerate([S.ACTIVE, S.BLACKOUT, S.ACTIVE, S.STOP_COPY]):
        p.advance(to, 11.0 + t)
    p.commit()
    p.advance(S.COMPLETED, 20.0)
    assert p.status is S.COMPLETED and p.blackouts == 1
    assert p.total_time_ms(99.0) == pytest.approx(10_000.0)


@pytest.mark.parametrize("src", list(S))
@pytest.mark.parametrize("dst", list(S))
def test_transition_table_is_enforced(src: MigrationStatus, dst: MigrationStatus) -> None:
    p = MigrationPhase(started_at=0.0, status=src)
    if dst in TRANSITIONS[src]:
        p.advance(dst, 1.0)
        assert p.status is dst
    else:
        with pytest.raises(InvalidTransition):
            p.advance(dst, 1.0)
        assert p.status is src


def test_no_pages_phase_can_skip_setup_checks() -> None:
    p = MigrationPhase(started_at=0.0)
    with pytest.raises(InvalidTransition):
        p.advance(S.STOP_COPY, 1.0)  # never straight from setup to stop-copy


def test_after_commit_no_cancel_or_failure() -> None:
    p = MigrationPhase(started_at=0.0)
    p.advance(S.ACTIVE, 1.0)
    assert p.can_cancel
    with pytest.raises(InvalidTransition):
        p.commit()  # only from stop-copy
    p.advance(S.STOP_COPY, 2.0)
    assert p.can_cancel
    p.commit()
    assert not p.can_cancel
    for end in (S.CANCELLED, S.FAILED):
        with pytest.raises(InvalidTransition):
            p.advance(end, 3.0)
    p.advance(S.COMPLETED, 3.0)


def test_finished_states_are_final_and_keep_error() -> None:
    p = MigrationPhase(started_at=0.0)
    p.advance(S.FAILED, 1.0, error="connection reset")
    assert p.status.finished and p.error == "connection reset" and not p.can_cancel
    assert p.finished_at == 1.0
