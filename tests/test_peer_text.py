"""Peer strings made safe to log and return (migd/peer_text.py)."""

from __future__ import annotations

import logging

import pytest

from migd.peer_text import MAX_PEER_TEXT, printable


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("plain reason", "plain reason"),
        ("line1\nFORGED 2026 migd.dest ERROR all guests lost", "line1\\nFORGED 2026 migd.dest ERROR all guests lost"),
        ("\x1b[2Jcleared", "\\x1b[2Jcleared"),
        ("tab\tand\rreturn", "tab\\tand\\rreturn"),
        ("ünïcødé ✓", "ünïcødé ✓"),
        ("\u2028sep", "\\u2028sep"),
    ],
)
def test_control_characters_are_escaped(raw: str, shown: str) -> None:
    assert printable(raw) == shown
    assert "\n" not in printable(raw) and "\x1b" not in printable(raw)


def test_long_strings_are_cut_and_say_so() -> None:
    text = printable("x" * 10_000)
    assert text.startswith("x" * MAX_PEER_TEXT) and text.endswith("…(+9800 chars)")
    assert len(text) < MAX_PEER_TEXT + 20


def test_a_forged_log_line_stays_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """The negative control: logged raw, the reason becomes two records' worth of lines; escaped, one."""
    reason = "ok\n2026-12-03 ERROR migd.dest guest g1 deleted"
    log = logging.getLogger("migd.test")
    with caplog.at_level(logging.WARNING, logger="migd.test"):
        log.warning("peer said %s", reason)
        log.warning("peer said %s", printable(reason))
    raw, escaped = (r.getMessage() for r in caplog.records)
    assert raw.count("\n") == 1 and escaped.count("\n") == 0
