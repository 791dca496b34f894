"""Tunables of an outgoing migration (migd/source.py MigrationParams) and the session's Timeouts.

A value the REST API let through must never make the migration's constructor raise something
other than ValueError (the daemon's 400): found by the REST fuzz, a downtime limit of a few denormal milliseconds
made the session's deadlines refuse a limit that underflowed to 0 s, and the request got a 500.
"""

from __future__ import annotations

import math

import pytest

from migd.session import Timeouts
from migd.source import MigrationParams


@pytest.mark.parametrize("value", [math.nan, math.inf, -1.0, 0.0])
def test_a_limit_that_is_no_number_or_not_positive_is_refused(value: float) -> None:
    with pytest.raises(ValueError, match="downtime_limit_ms"):
        MigrationParams(downtime_limit_ms=value)
    with pytest.raises(ValueError, match="stall_timeout_s"):
        MigrationParams(stall_timeout_s=value)


def test_a_tiny_limit_is_a_limit() -> None:
    params = MigrationParams(downtime_limit_ms=5e-324)  # the smallest float
    timeouts = Timeouts(downtime_limit_s=params.downtime_limit_ms / 1000.0)  # underflows to 0.0
    assert timeouts.downtime_limit_s == 0.0
    with pytest.raises(ValueError):
        Timeouts(downtime_limit_s=math.nan)
