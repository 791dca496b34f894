"""What a save and a restore share as jobs of the daemon: their task, their progress, their cancel."""

from __future__ import annotations

import abc
import asyncio
import time

from migd.progress import MigrationProgress
from migd.save_session import FileJobSession


class FileJob(abc.ABC):
    """A save or restore run in its own task; listed, polled and cancelled like a migration."""

    progress: MigrationProgress
    session: FileJobSession

    def __init__(self) -> None:
        self._task: asyncio.Task[MigrationProgress] | None = None
        self._running = False  # set by run()'s first step
        self._cancel_requested = False
        self._rolling_back = False  # the roll-back / discard is under way: a cancel must not interrupt it

    @abc.abstractmethod
    async def run(self) -> MigrationProgress:
        """Do the job; returns the final progress (completed, failed or cancelled)."""

    def _launch(self, name: str) -> asyncio.Task[MigrationProgress]:
        self._task = asyncio.get_running_loop().create_task(self.run(), name=name)
        return self._task

    @property
    def task(self) -> asyncio.Task[MigrationProgress] | None:
        """The task running this job, once started."""
        return self._task

    def cancel(self) -> bool:
        """Cancel before the commit; False if it is too late (committed or finished)."""
        if not self.progress.phase.can_cancel or self._task is None:
            return False
        self._cancel_requested = True
        if self._rolling_back:
            return True  # it resumes the guest / removes the partial one and ends the job by itself
        if not self._running:
            self.session.cancel(time.monotonic())  # the task never took a step: nothing to undo
        self._task.cancel()
        return True
