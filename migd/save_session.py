"""The session of a save or restore job, sans-I/O: its phases and its one deadline.

A save or restore has no peer on a link, so none of :mod:`migd.session`'s messages: what is
left is the REST status (``setup → active ⇄ blackout → stop-copy → completed``, or ``failed`` /
``cancelled`` before the commit) and the blackout deadline. Like the migration sessions, this is
the only code that advances a job's :class:`~migd.migration_state.MigrationPhase`
(tests/test_session.py scans for it).
"""

from __future__ import annotations

from migd.errors import MigdError
from migd.migration_state import MigrationPhase, MigrationStatus

S = MigrationStatus


class BlackoutTimeout(MigdError, TimeoutError):
    """The guest's migration-control MSR stayed not READY past the blackout limit."""


class FileJobSession:
    """Where one save or restore is; the driver reports its steps with ``now``."""

    def __init__(self, phase: MigrationPhase, *, blackout_s: float = 30.0) -> None:
        if not blackout_s > 0:
            raise ValueError(f"blackout_s must be > 0, got {blackout_s!r}")
        self.status = phase
        self.blackout_s = blackout_s
        self._blackout_since: float | None = None

    def begin(self, now: float) -> None:
        """The session is open (save: SEND_START done; restore: the file verified): pages flow."""
        self.status.advance(S.ACTIVE, now)

    def msr_dropped(self, now: float) -> None:
        """The guest's MSR is not READY: nothing may be written until it is again."""
        self._blackout_since = now
        self.status.advance(S.BLACKOUT, now)

    def msr_ready(self, now: float) -> None:
        """READY again: pages flow (the dirty log re-sends what changed meanwhile)."""
        self._blackout_since = None
        self.status.advance(S.ACTIVE, now)

    def check_blackout(self, now: float) -> None:
        """Raise BlackoutTimeout once the blackout has lasted longer than allowed."""
        since = self._blackout_since
        if since is not None and now - since >= self.blackout_s:
            raise BlackoutTimeout(f"the guest's migration-control MSR was not READY again within "
                                  f"{self.blackout_s:g} s (reboot or kexec did not finish)")

    def blackout_left(self, now: float) -> float:
        """Seconds the blackout may still last (at least a millisecond)."""
        since = self._blackout_since if self._blackout_since is not None else now
        return max(0.001, since + self.blackout_s - now)

    def stop_copy(self, now: float) -> None:
        """The guest is paused (save) or the pages are placed (restore): the last steps."""
        self.status.advance(S.STOP_COPY, now)

    def commit(self) -> None:
        """The commit point (the journal's record is durable): no failure or cancel undoes the job now."""
        self.status.commit()

    def completed(self, now: float) -> None:
        self.status.advance(S.COMPLETED, now)

    def fail(self, reason: str, now: float) -> None:
        """End the job with ``reason``: failed before the commit, completed with the error after it."""
        if self.status.status.finished:
            return
        if self.status.committed:
            self.status.advance(S.COMPLETED, now, error=reason)
        else:
            self.status.advance(S.FAILED, now, error=reason)

    def cancel(self, now: float) -> None:
        if not self.status.status.finished:
            self.status.advance(S.CANCELLED, now, error="cancelled by the operator")

    @property
    def committed(self) -> bool:
        return self.status.committed

    @property
    def finished(self) -> bool:
        return self.status.status.finished
