"""The phases of one migration as one explicit state machine (h11's ``_state.py`` style).

::

    setup ──► active ◄──► blackout
                │            │
                ▼            │
            stop-copy ───────┴──► completed | failed | cancelled

``stop-copy`` includes the two-phase hand-off. The hand-off's commit point is recorded
here too: before it any failure or cancel leaves (and resumes) the guest on the source;
after it the source never resumes the guest and a cancel is refused (docs/design.md §8, 4).
Time is passed in (``now``), never read, so tests drive it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

from migd.errors import MigdError


class MigrationStatus(str, enum.Enum):
    """The ``status`` field of the REST migration object (docs/design.md §9 "External contract")."""

    SETUP = "setup"
    ACTIVE = "active"
    BLACKOUT = "blackout"
    STOP_COPY = "stop-copy"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED)


S = MigrationStatus
_END = {S.FAILED, S.CANCELLED}
TRANSITIONS: dict[MigrationStatus, frozenset[MigrationStatus]] = {
    S.SETUP: frozenset({S.ACTIVE, *_END}),
    S.ACTIVE: frozenset({S.BLACKOUT, S.STOP_COPY, *_END}),
    S.BLACKOUT: frozenset({S.ACTIVE, *_END}),
    S.STOP_COPY: frozenset({S.COMPLETED, *_END}),
    S.COMPLETED: frozenset(),
    S.FAILED: frozenset(),
    S.CANCELLED: frozenset(),
}


class InvalidTransition(MigdError):
    """A migration was asked to move to a phase it cannot reach from where it is."""


@dataclass
class MigrationPhase:
    """Where a migration is, when it got there, and whether the hand-off has committed."""

    started_at: float
    status: MigrationStatus = MigrationStatus.SETUP
    committed: bool = False
    error: str | None = None
    entered_at: dict[MigrationStatus, float] = field(default_factory=dict)
    finished_at: float | None = None
    blackouts: int = 0
    #: Called with the new status after every transition (progress display, metrics, tests).
    listeners: list[Callable[[MigrationStatus], None]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        self.entered_at.setdefault(self.status, self.started_at)

    def advance(self, to: MigrationStatus, now: float, *, error: str | None = None) -> None:
        """Move to ``to``; raises InvalidTransition if the table does not allow it."""
        if to not in TRANSITIONS[self.status]:
            raise InvalidTransition(f"migration cannot go from {self.status.value} to {to.value}")
        if self.committed and to in _END:
            raise InvalidTransition(f"migration has committed its hand-off; it cannot become {to.value}")
        if to is S.BLACKOUT:
            self.blackouts += 1
        self.status = to
        self.entered_at[to] = now
        if error is not None:
            self.error = error
        if to.finished:
            self.finished_at = now
        for listener in list(self.listeners):
            listener(to)

    def commit(self) -> None:
        """Record the commit point of the hand-off (only from stop-copy)."""
        if self.status is not S.STOP_COPY:
            raise InvalidTransition(f"commit needs stop-copy, migration is {self.status.value}")
        self.committed = True

    @property
    def can_cancel(self) -> bool:
        """A cancel is possible in any unfinished phase before the commit."""
        return not self.status.finished and not self.committed

    def total_time_ms(self, now: float) -> float:
        """Milliseconds from start to finish (or to ``now`` while running)."""
        end = self.finished_at if self.finished_at is not None else now
        return (end - self.started_at) * 1000.0
