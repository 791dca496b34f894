"""Convergence decisions with a driven clock."""

from __future__ import annotations

import pytest

from migd.convergence import (
    AUTO_CONVERGE_INITIAL,
    AUTO_CONVERGE_MAX,
    AutoConverge,
    BandwidthMeter,
    RateLimiter,
    expected_downtime_ms,
    should_switch_over,
)

MiB = 1 << 20


def test_bandwidth_meter_uses_a_sliding_window() -> None:
    m = BandwidthMeter(window_s=1.0)
    assert m.rate(0.0) == 0.0
    for i in range(11):  # 100 MiB/s for one second
        m.record(i * 0.1, 10 * MiB)
    assert m.rate(1.0) == pytest.approx(100 * MiB, rel=0.01)
    for i in range(1, 21):  # then 10 MiB/s: the old samples fall out of the window
        m.record(1.0 + i * 0.1, 1 * MiB)
    assert m.rate(3.0) == pytest.approx(10 * MiB, rel=0.15)
    assert m.total_bytes == 11 * 10 * MiB + 20 * MiB


def test_switch_over_decision() -> None:
    bw = 100 * MiB  # bytes/s
    assert expected_downtime_ms(30 * MiB, bw) == pytest.approx(300.0)
    assert should_switch_over(30 * MiB, bw, 300)
    assert not should_switch_over(31 * MiB, bw, 300)
    assert should_switch_over(0, 0.0, 300)  # nothing left: always
    assert not should_switch_over(1, 0.0, 300)  # bandwidth unknown: never guess
    assert expected_downtime_ms(1, 0.0) is None


def test_auto_converge_throttles_after_two_bad_rounds_and_steps_up() -> None:
    ac = AutoConverge()
    assert ac.end_of_round(100, 60) is None  # one bad round is not enough
    assert ac.end_of_round(100, 60) == AUTO_CONVERGE_INITIAL
    assert ac.end_of_round(100, 70) == AUTO_CONVERGE_INITIAL + 10
    assert ac.end_of_round(100, 10) is None  # converging: leave the throttle alone
    assert ac.throttle_percent == AUTO_CONVERGE_INITIAL + 10
    for _ in range(20):
        ac.end_of_round(100, 90)
    assert ac.throttle_percent == AUTO_CONVERGE_MAX


def test_auto_converge_disabled_never_throttles() -> None:
    ac = AutoConverge(enabled=False)
    assert all(ac.end_of_round(100, 100) is None for _ in range(5))


def test_rate_limiter_paces_to_the_limit() -> None:
    rl = RateLimiter(10 * MiB)
    now, sent = 0.0, 0
    while now < 2.0:
        now += rl.delay(now, MiB)
        sent += MiB
    assert sent / now == pytest.approx(10 * MiB, rel=0.1)
    assert RateLimiter(0).delay(0.0, 1 << 40) == 0.0  # 0 = unlimited
