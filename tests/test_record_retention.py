"""Which ``migrated`` records a host drops: by age (``keep_migrated_s``), then the oldest beyond
``keep_migrated_count``; a record whose departure is unknown counts as the oldest."""

from __future__ import annotations

import pytest

from migd.guest.record_retention import Departure, expired


def _records(**ages: float | None) -> dict[str, Departure | None]:
    """Records that left ``age`` seconds before t=1000 (None: departure unknown)."""
    return {name: None if age is None else Departure(f"m-{name}", "10.0.0.2:4444", 1000.0 - age)
            for name, age in ages.items()}


@pytest.mark.parametrize(("ages", "keep_s", "keep_count", "dropped"), [
    ({"a": 10, "b": 20}, 60, 100, []),  # young and few: all kept
    ({"a": 10, "b": 61}, 60, 100, ["b"]),  # one past the age limit
    ({"a": 10, "b": 20, "c": 30}, 3600, 2, ["c"]),  # one too many: the oldest goes
    ({"a": 10, "b": 20, "c": 30}, 3600, 0, ["c", "b", "a"]),  # keep none
    ({"a": 10, "b": None}, 3600, 1, ["b"]),  # unknown departure: counts as the oldest
    ({"a": 10, "b": None}, 3600, 100, ["b"]),  # ... and as older than any age limit
    ({"a": 100, "b": 20, "c": 30}, 60, 1, ["a", "c"]),  # age first, then count among the rest
    ({"a": 0.0}, 0, 100, []),  # keep_s 0: a record of this very instant is not yet past it
])
def test_expired_drops_by_age_then_oldest_beyond_the_count(
    ages: dict[str, float | None], keep_s: float, keep_count: int, dropped: list[str],
) -> None:
    assert expired(_records(**ages), 1000.0, keep_s=keep_s, keep_count=keep_count) == dropped


def test_expired_refuses_a_negative_retention() -> None:
    with pytest.raises(ValueError, match="retention must be >= 0"):
        expired({}, 0.0, keep_s=-1, keep_count=1)


def test_departure_renders_the_guest_objects_migrated_member() -> None:
    assert Departure("abc", "10.0.0.2:4444", 5.0).to_json() == {"migration": "abc", "to": "10.0.0.2:4444"}
