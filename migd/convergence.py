"""Pre-copy convergence: bandwidth measurement, switch-over decision, auto-converge, rate limit.

Pure and clock-free (``now`` is an argument) so every decision is unit-tested. The rules
follow QEMU's ``migration/ram.c``: switch over once the bytes still dirty can be sent within
the downtime limit at the measured bandwidth; when a round dirties more than half of what it
sent (``throttle-trigger-threshold`` 50 %) for two rounds, throttle the guest (20 % first,
then +10 % a step, at most 99 %).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

AUTO_CONVERGE_INITIAL = 20
AUTO_CONVERGE_INCREMENT = 10
AUTO_CONVERGE_MAX = 99
DIRTY_SYNC_THRESHOLD = 0.5
ROUNDS_BEFORE_THROTTLE = 2


class BandwidthMeter:
    """Bytes per second over a sliding window of recent samples (never a whole-run average)."""

    def __init__(self, window_s: float = 1.0) -> None:
        self._window = window_s
        self._samples: collections.deque[tuple[float, int]] = collections.deque()
        self._window_bytes = 0  # bytes of every sample but the oldest (the interval's left edge)
        self.total_bytes = 0

    def record(self, now: float, nbytes: int) -> None:
        """``nbytes`` finished sending at ``now``."""
        self.total_bytes += nbytes
        if self._samples:
            self._window_bytes += nbytes
        self._samples.append((now, nbytes))
        cutoff = now - self._window
        # Keep one sample older than the window as the interval's left edge; O(1) per record.
        while len(self._samples) > 2 and self._samples[1][0] < cutoff:
            self._samples.popleft()
            self._window_bytes -= self._samples[0][1]

    def rate(self, now: float) -> float:
        """Bytes/s over the window; 0 until two samples span some time."""
        if len(self._samples) < 2:
            return 0.0
        span = max(now, self._samples[-1][0]) - self._samples[0][0]
        if span <= 0:
            return 0.0
        return self._window_bytes / span


def expected_downtime_ms(remaining_bytes: int, bandwidth_bps: float) -> float | None:
    """How long stop-and-copy would take now; None while no bandwidth is known."""
    if bandwidth_bps <= 0:
        return None
    return remaining_bytes / bandwidth_bps * 1000.0


def should_switch_over(remaining_bytes: int, bandwidth_bps: float, downtime_limit_ms: float) -> bool:
    """True once the dirty bytes fit in ``bandwidth × downtime_limit`` (QEMU's threshold_size)."""
    if remaining_bytes == 0:
        return True
    downtime = expected_downtime_ms(remaining_bytes, bandwidth_bps)
    return downtime is not None and downtime <= downtime_limit_ms


@dataclass
class AutoConverge:
    """Decides the guest throttle from how much each round re-dirtied versus sent."""

    enabled: bool = True
    throttle_percent: int = 0
    _high_rounds: int = field(default=0, repr=False)

    def end_of_round(self, bytes_sent: int, bytes_dirtied: int) -> int | None:
        """Feed one round's numbers; returns a new throttle percentage when it should change."""
        if not self.enabled or bytes_sent <= 0:
            return None
        if bytes_dirtied > bytes_sent * DIRTY_SYNC_THRESHOLD:
            self._high_rounds += 1
        else:
            self._high_rounds = 0
        if self._high_rounds < ROUNDS_BEFORE_THROTTLE or self.throttle_percent >= AUTO_CONVERGE_MAX:
            return None
        if self.throttle_percent == 0:
            self.throttle_percent = AUTO_CONVERGE_INITIAL
        else:
            self.throttle_percent = min(AUTO_CONVERGE_MAX, self.throttle_percent + AUTO_CONVERGE_INCREMENT)
        return self.throttle_percent


class RateLimiter:
    """Token bucket for ``max_bandwidth_mib_s``: how long to wait before sending more."""

    def __init__(self, bytes_per_s: float, burst_s: float = 0.05) -> None:
        self.bytes_per_s = bytes_per_s
        self._burst = bytes_per_s * burst_s
        self._tokens = self._burst
        self._last: float | None = None

    @property
    def unlimited(self) -> bool:
        return self.bytes_per_s <= 0

    def delay(self, now: float, nbytes: int) -> float:
        """Account ``nbytes`` about to be sent; returns the seconds to wait first (0 = go)."""
        if self.unlimited:
            return 0.0
        if self._last is not None:
            self._tokens = min(self._burst, self._tokens + (now - self._last) * self.bytes_per_s)
        self._last = now
        self._tokens -= nbytes
        return 0.0 if self._tokens >= 0 else -self._tokens / self.bytes_per_s
