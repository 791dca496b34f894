"""A shared/exclusive gate for work that runs in worker threads beside a step that must see none of it.

Several operations may be in flight at once (:meth:`InFlight.shared`); an exclusive step
(:meth:`InFlight.exclusive`) waits until none is, and none starts while it runs. Used where a
migration over several connections places page runs from several threads at once: guest RAM's
writes against its close (:mod:`migd.platform.memory`), and page frames against the session
leaving its page phase (:mod:`migd.session`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class InFlight:
    """Shared operations and exclusive steps; an exclusive step waits for the shared ones to end.

    An exclusive step that is waiting already holds new shared operations back, so a steady
    stream of them (page frames) cannot keep it waiting for ever.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = 0  # exclusive steps waiting or running

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """One operation: runs beside other shared ones, never beside (or ahead of a waiting) exclusive step."""
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Waits until no shared operation is in flight; none starts from the moment it asks until it ends."""
        with self._cond:
            self._exclusive += 1
            try:
                self._cond.wait_for(lambda: self._shared == 0)
                yield
            finally:
                self._exclusive -= 1
                self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        """Shared operations running now."""
        return self._shared
