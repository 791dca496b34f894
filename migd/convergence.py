"""Pre-copy convergence: bandwidth measurement, switch-over decision, auto-converge, rate limit.

Pure and clock-free (``now`` is an argument) so every decision is unit-tested. The rules
follow QEMU's ``migration/ram.c``: switch over once the bytes still dirty can be sent within
the downtime limit at the measured bandwidth; when a round dirties more than half of what it
sent (``throttle-trigger-threshold`` 50 %) for two rounds, throttle the guest (20 % first,
then +10 % a step, at most 99 %; a step jumps further when the dirty set still grows, see
:class:`AutoConverge`).

One departure from QEMU: the downtime is not only the dirty bytes over the bandwidth. The
hand-off after them (final dirty log, bitmap, vCPU state, PREPARE verification, the durable
commit records on both hosts, the destination's agent taking over, the round trips) costs a
fixed time that grows with the guest and with the host's load; QEMU's own ``expected_downtime``
ignores it (its device state is small and sent in-process). :class:`HandoffCost` predicts it and
the switch-over leaves only what is left of the limit to the pages (:func:`page_budget_ms`).
"""

from __future__ import annotations

import collections
import enum
import math
from dataclasses import dataclass, field

from migd.abi import PAGE_SIZE, GiB

AUTO_CONVERGE_INITIAL = 20
AUTO_CONVERGE_INCREMENT = 10
AUTO_CONVERGE_MAX = 99
DIRTY_SYNC_THRESHOLD = 0.5
ROUNDS_BEFORE_THROTTLE = 2

#: Hand-off fixed cost (:class:`HandoffCost`), fitted to bench/downtime.py on the 2-core
#: development machine: a 1 GiB guest's hand-off (all but the pages) took 15–30 ms, quiet to
#: loaded host, which the model puts at 10 + 4 + 4 × 1–4 ms. This term: what depends neither on
#: the guest's size nor on process hops (the durable commit records, their fsyncs, frame handling).
HANDOFF_BASE_MS = 10.0
#: What grows with the guest: shared-page bitmap copy, hash, encode and decode; received-page
#: accounting; the destination's arrival bookkeeping (per GiB of guest RAM).
HANDOFF_PER_GIB_MS = 4.0
#: Process hops on the hand-off's critical path, counted in agent round trips (two wake-ups
#: each): the final dirty log (source agent), PREPARE → PREPARED and COMMIT → STARTED across
#: the two daemons, and the destination agent's start. Each costs what the probe (the source's
#: recent ``fetch_dirty`` round trips, :meth:`migd.guest.channel.GuestChannel.round_trip_s`) costs
#: now: on a loaded host every wake-up waits for a CPU, and this term grows with it.
HANDOFF_ROUND_TRIPS = 4.0
#: When the predicted fixed cost eats more of the limit than this leaves, the pages still get
#: this share of the limit: no number of pre-copy rounds removes the fixed cost, and a budget of
#: zero would never switch over (the downtime then exceeds the limit by the fixed cost).
MIN_PAGE_BUDGET_SHARE = 0.25
#: The pages are planned against this share of the measured bandwidth. The meter counts bytes
#: as they leave the source's transport, but the destination's page pipeline and the socket
#: buffers hold 10–25 MiB that stop-and-copy must also wait for: on the 2-core machine the last
#: pages arrived at 0.55–1.2× (median 0.7 on a quiet host) the rate estimated at the switch-over
#: (bench/downtime.py). The limit is a limit, not a target.
BANDWIDTH_MARGIN = 0.7


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


@dataclass(frozen=True)
class HandoffCost:
    """Predicts stop-and-copy's fixed cost: everything between the pause and STARTED but the pages."""

    base_ms: float = HANDOFF_BASE_MS
    per_gib_ms: float = HANDOFF_PER_GIB_MS
    round_trips: float = HANDOFF_ROUND_TRIPS

    def __post_init__(self) -> None:
        for name in ("base_ms", "per_gib_ms", "round_trips"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"HandoffCost.{name} must be >= 0, got {value!r}")

    def predict_ms(self, npages: int, round_trip_s: float | None) -> float:
        """Fixed cost for a guest of ``npages`` given the probe's agent round trip (None: not yet measured)."""
        if npages < 0:
            raise ValueError(f"npages must be >= 0, got {npages}")
        if round_trip_s is not None and round_trip_s < 0:
            raise ValueError(f"round_trip_s must be >= 0, got {round_trip_s}")
        hops = self.round_trips * (round_trip_s or 0.0) * 1000.0
        return self.base_ms + self.per_gib_ms * npages * PAGE_SIZE / GiB + hops


def page_budget_ms(downtime_limit_ms: float, fixed_cost_ms: float, margin: float = BANDWIDTH_MARGIN) -> float:
    """How long sending the last dirty pages may take at the measured bandwidth, for the switch-over.

    What the fixed cost leaves of the limit, times ``margin`` (the bandwidth may drop by
    stop-and-copy), and never less than ``MIN_PAGE_BUDGET_SHARE`` of the limit times ``margin``:
    a fixed cost that alone overruns the limit cannot be pre-copied away, and the migration
    must still be able to converge.
    """
    if downtime_limit_ms <= 0 or fixed_cost_ms < 0 or not 0 < margin <= 1:
        raise ValueError(f"need downtime_limit_ms > 0, fixed_cost_ms >= 0 and 0 < margin <= 1, "
                         f"got {downtime_limit_ms}, {fixed_cost_ms}, {margin}")
    return max(downtime_limit_ms - fixed_cost_ms, downtime_limit_ms * MIN_PAGE_BUDGET_SHARE) * margin


def expected_downtime_ms(remaining_bytes: int, bandwidth_bps: float, fixed_cost_ms: float = 0.0) -> float | None:
    """How long stop-and-copy would take now (the pages, then the fixed cost); None while no bandwidth is known."""
    if bandwidth_bps <= 0:
        return None
    return remaining_bytes / bandwidth_bps * 1000.0 + fixed_cost_ms


def should_switch_over(remaining_bytes: int, bandwidth_bps: float, budget_ms: float) -> bool:
    """True once the dirty bytes fit in ``bandwidth × budget`` (QEMU's threshold_size).

    ``budget_ms`` is the downtime limit in QEMU; migd passes :func:`page_budget_ms` (the limit
    minus the hand-off's fixed cost), so the whole downtime, not just the pages, fits the limit.
    """
    if remaining_bytes == 0:
        return True
    downtime = expected_downtime_ms(remaining_bytes, bandwidth_bps)
    return downtime is not None and downtime <= budget_ms


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
            step = AUTO_CONVERGE_INCREMENT
            if bytes_dirtied > bytes_sent:
                # The dirty set grew although the guest is throttled: one step per round (and a
                # round of a big dirty set lasts seconds) would not catch up within the converge
                # timeout. Jump to the throttle that would have halved this round's dirtying
                # relative to what was sent (the trigger threshold), at least two steps.
                running = (100 - self.throttle_percent) * DIRTY_SYNC_THRESHOLD * bytes_sent / bytes_dirtied
                step = max(2 * AUTO_CONVERGE_INCREMENT, math.ceil(100 - running) - self.throttle_percent)
            self.throttle_percent = min(AUTO_CONVERGE_MAX, self.throttle_percent + step)
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


class Decision(enum.Enum):
    """What pre-copy does after a round (:meth:`SwitchoverPolicy.after_round`)."""

    NEXT_ROUND = "next-round"
    CONFIRM_LINK = "confirm-link"  # the dirty set fits: PING, and switch over if the PONG is quick
    SWITCH_OVER = "switch-over"  # forced past the converge timeout
    GIVE_UP = "give-up"  # not converged within the converge timeout


@dataclass
class SwitchoverPolicy:
    """The switch-over decision of one migration, fed with what the source knows after each round.

    Dirty bytes plus bytes still queued behind the link must fit in the page budget (the
    downtime limit less the hand-off's predicted fixed cost, :func:`page_budget_ms`) at the
    measured bandwidth; then the destination is asked to confirm it has placed everything
    (PING/PONG), and a PONG slower than the limit means the link held more than the meter saw:
    one more round. Past ``converge_timeout_s`` the migration is forced over or given up.
    """

    downtime_limit_ms: float
    converge_timeout_s: float
    force: bool
    started_at: float
    cost: HandoffCost = field(default_factory=HandoffCost)
    expected_downtime_ms: float | None = None
    fixed_cost_ms: float = 0.0

    def after_round(self, now: float, dirty_bytes: int, queued_bytes: int, bandwidth_bps: float, npages: int,
                    round_trip_s: float | None) -> Decision:
        """Decide after a round; updates :attr:`expected_downtime_ms` (the REST field)."""
        self.fixed_cost_ms = self.cost.predict_ms(npages, round_trip_s)
        pending = dirty_bytes + queued_bytes
        self.expected_downtime_ms = expected_downtime_ms(pending, bandwidth_bps, self.fixed_cost_ms)
        if should_switch_over(pending, bandwidth_bps, page_budget_ms(self.downtime_limit_ms, self.fixed_cost_ms)):
            return Decision.CONFIRM_LINK
        return self.out_of_time(now) or Decision.NEXT_ROUND

    def out_of_time(self, now: float) -> Decision | None:
        """Past the converge timeout: force or give up; None while there is time."""
        if now - self.started_at <= self.converge_timeout_s:
            return None
        return Decision.SWITCH_OVER if self.force else Decision.GIVE_UP

    def link_confirmed(self, waited_s: float) -> bool:
        """True if the PONG came within the downtime limit (else the dirty set is stale)."""
        return waited_s * 1000.0 <= self.downtime_limit_ms

    def confirm_deadline(self, sent_at: float, handshake_s: float) -> float:
        """How long a PING may wait: a link that never catches up fails like a guest that never converges."""
        return max(self.started_at + self.converge_timeout_s, sent_at + handshake_s)
