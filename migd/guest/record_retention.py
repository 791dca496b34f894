"""How long a ``migrated`` guest record stays on the host it left.

After a committed outgoing migration the source keeps the guest's record (state ``migrated``,
no RAM, no key) so an operator can see where the guest went. Records are informational: a
guest that migrates back replaces its own record at once (:meth:`migd.host.Host.create_incoming`),
and the rest are dropped by age and by count (``[guests] keep_migrated_s`` /
``keep_migrated_count``) so a busy host's guest list does not grow for ever.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Departure:
    """Where a guest went and when (``left_at``: ``time.monotonic()`` of the migration's end)."""

    migration_id: str
    destination: str
    left_at: float

    def to_json(self) -> dict[str, str]:
        """The guest object's ``migrated`` member."""
        return {"migration": self.migration_id, "to": self.destination}


def expired(departures: Mapping[str, Departure | None], now: float, *, keep_s: float, keep_count: int) -> list[str]:
    """Names of the ``migrated`` records to drop: older than ``keep_s``, then the oldest beyond ``keep_count``.

    A record whose departure is unknown (its migration was pruned from the journal) counts as
    the oldest: nothing says it is recent.
    """
    if keep_s < 0 or keep_count < 0:
        raise ValueError(f"retention must be >= 0, got keep_s={keep_s} keep_count={keep_count}")

    def left_at(name: str) -> float:
        departure = departures[name]
        return -math.inf if departure is None else departure.left_at

    oldest_first = sorted(departures, key=lambda name: (left_at(name), name))
    drop = [name for name in oldest_first if now - left_at(name) > keep_s]
    kept = [name for name in oldest_first if name not in drop]
    if len(kept) > keep_count:
        drop.extend(kept[:len(kept) - keep_count])
    return drop
