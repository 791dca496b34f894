"""Rendering a migration object (docs/design.md §9) for people: the live progress line and the summary.

Save and restore jobs are migration objects too (role ``save`` / ``restore``, the file's path as
``destination``): the same bar and summary, worded for a file.

The render functions are pure (migration JSON in, text out) so they are tested without a
terminal. :class:`ProgressDisplay` decides *when* to draw: in place on a terminal (carriage
return + erase-to-end-of-line, like ``virsh migrate --verbose``), as periodic plain lines
when the stream is a pipe or a log file, where control characters would be noise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, TextIO

from migd.abi import PAGE_SIZE

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
_BAR_WIDTH = 24
_MIN_BAR_WIDTH = 8
#: What a terminal whose width is unknown is taken to be (shutil.get_terminal_size's fallback).
DEFAULT_COLUMNS = 80
#: Narrower than this, a reported width is taken as wrong (a serial console or a pty whose size
#: was never set reports 0): drawing into it would cut the line to nothing.
MIN_COLUMNS = 20


def usable_columns(columns: int) -> int:
    """``columns`` if it is a believable terminal width, else :data:`DEFAULT_COLUMNS`."""
    return columns if columns >= MIN_COLUMNS else DEFAULT_COLUMNS


def terminal_columns(stream: TextIO, env: Mapping[str, str] | None = None) -> int:
    """The width to draw ``stream``'s progress line in, as :func:`shutil.get_terminal_size` finds it.

    ``COLUMNS`` first (a positive integer), then the size of *this* stream's terminal (stdout
    may be redirected while stderr is not); 0 or an absurdly small width means unknown, and
    unknown is :data:`DEFAULT_COLUMNS`.
    """
    env = os.environ if env is None else env
    try:
        columns = int(env.get("COLUMNS", ""))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            columns = 0
    return usable_columns(columns)


def format_bytes(n: float) -> str:
    """``512 B``, ``4.0 KiB``, ``530.2 MiB``, ``1.25 GiB`` (binary units, as memory sizes are)."""
    value = float(n)
    if abs(value) < 1024:
        return f"{int(value)} B"
    for unit in _UNITS[1:-1]:
        value /= 1024
        if abs(value) < 1024:
            return f"{value:.2f} {unit}" if unit == "GiB" else f"{value:.1f} {unit}"
    return f"{value / 1024:.2f} {_UNITS[-1]}"


def format_ms(ms: float | None) -> str:
    """``-`` when unknown, ``41.2 ms`` below a second, ``1.83 s`` above."""
    if ms is None:
        return "-"
    return f"{ms:.1f} ms" if ms < 1000 else f"{ms / 1000:.2f} s"


#: Roles of the jobs whose other end is a file (docs/design.md §7): they have no downtime to expect,
#: and their ``destination`` is the file's path.
FILE_ROLES = frozenset({"save", "restore"})


def job_kind(migration: Mapping[str, Any]) -> str:
    """What the object is to a reader: ``migration``, ``save`` or ``restore``."""
    role = migration.get("role")
    return role if role in FILE_ROLES else "migration"


def job_title(migration: Mapping[str, Any]) -> str:
    """``migration ID of g1 to HOST:PORT``, ``save ID of g1 to FILE`` or ``restore ID of g1 from FILE``."""
    kind = job_kind(migration)
    where = "from" if kind == "restore" else "to"
    return f"{kind} {migration['id']} of {migration['guest']} {where} {migration['destination']}"


def job_route(migration: Mapping[str, Any]) -> str:
    """``g1 -> HOST:PORT``, ``g1 -> FILE`` or, for a restore, ``FILE -> g1``: which way the guest goes."""
    if job_kind(migration) == "restore":
        return f"{migration['destination']} -> {migration['guest']}"
    return f"{migration['guest']} -> {migration['destination']}"


def percent_done(migration: Mapping[str, Any]) -> float:
    """How much of guest memory no longer needs sending, 0–100 (100 once completed).

    ``bytes.remaining`` is what the current round still has to send (all memory in round 1,
    the dirty set later), so the bar fills once per round and ends full at the switch-over.
    """
    if migration.get("status") == "completed":
        return 100.0
    total = migration["bytes"]["total"]
    if total <= 0:
        return 0.0
    remaining = min(max(migration["bytes"]["remaining"], 0), total)
    return 100.0 * (total - remaining) / total


def progress_line(migration: Mapping[str, Any], *, width: int | None = None) -> str:
    """One line: guest, status, round, bar, percent, throughput, expected downtime (not for a save or
    restore: the guest's pause there is not a downtime to predict).

    With ``width`` (terminal columns) the bar shrinks (down to 8 cells) so the line fits.
    """
    percent = percent_done(migration)
    head = f"{migration['guest']} {migration['status']:<9} round {migration['rounds']:>2} "
    tail = f" {percent:5.1f}% {migration['throughput_mib_s']:6.1f} MiB/s"
    downtime = ""
    if job_kind(migration) == "migration":
        downtime = format_ms(migration.get("expected_downtime_ms"))
        tail += f"  exp. downtime {downtime}"
    bar_width = _BAR_WIDTH
    if width is not None:
        # Room for "999.9 ms" whatever the downtime says now, so the bar does not jitter.
        reserved = len(tail) - len(downtime) + (max(len(downtime), 8) if downtime else 0)
        bar_width = max(_MIN_BAR_WIDTH, min(_BAR_WIDTH, width - len(head) - reserved - 2))
    filled = int(bar_width * percent / 100.0 + 1e-9)
    return f"{head}[{'#' * filled}{'.' * (bar_width - filled)}]{tail}"


def page_breakdown(pages: Mapping[str, int]) -> str:
    """``private 120034 (468.9 MiB), shared 3021 (11.8 MiB), zero 8017 (31.3 MiB)``: pages sent by kind."""
    return ", ".join(
        f"{kind} {pages.get(kind, 0)} ({format_bytes(pages.get(kind, 0) * PAGE_SIZE)})"
        for kind in ("private", "shared", "zero")
    )


def moved_pages(migration: Mapping[str, Any]) -> bool:
    """Whether any guest page was sent or received: a summary of a migration that moved none is all zeros."""
    return any(count for count in migration.get("pages", {}).values())


def summary_lines(migration: Mapping[str, Any], *, with_error: bool = True) -> list[str]:
    """The end-of-migration report: status, rounds, bytes, pages by kind, throughput, downtime, time.

    ``with_error=False`` leaves out the error line (``migd migrate`` prints the error once, on stderr).
    """
    nbytes = migration["bytes"]
    kind = job_kind(migration)
    memory = f"(guest memory {format_bytes(nbytes['total'])})"
    if kind == "migration":
        head = (f"migration {migration['id']} of {migration['guest']} ({migration['role']}) "
                f"to {migration['destination']}: {migration['status']}")
        moved = [f"  transferred: {format_bytes(nbytes['transferred'])} on the wire {memory}",
                 f"  pages sent:  {page_breakdown(migration['pages'])}"]
    else:
        head = f"{job_title(migration)}: {migration['status']}"
        way = "written to" if kind == "save" else "read from"
        moved = [f"  transferred: {format_bytes(nbytes['transferred'])} {way} the file {memory}",
                 f"  pages:       {page_breakdown(migration['pages'])}"]
    lines = [
        head,
        f"  rounds:      {migration['rounds']}",
        *moved,
        f"  throughput:  {migration['throughput_mib_s']:.1f} MiB/s",
    ]
    if kind == "migration":  # a saved guest stops for good, a restored one starts: no downtime between
        lines.append(f"  downtime:    {format_ms(migration.get('downtime_ms'))}")
    lines.append(f"  total time:  {format_ms(migration.get('total_time_ms'))}")
    if with_error and migration.get("error"):
        lines.append(f"  error:       {migration['error']}")
    return lines


class ProgressDisplay:
    """Draws successive migration objects on ``stream`` (stderr in the CLI)."""

    def __init__(
        self, stream: TextIO, *, tty: bool | None = None, plain_interval_s: float = 2.0, columns: int | None = None,
    ) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.plain_interval_s = plain_interval_s
        self.columns = columns
        self._last_plain: float | None = None
        self._last_key: tuple[Any, ...] | None = None
        self._open = False  # a bar is drawn on the terminal and its line not ended

    def _columns(self) -> int:
        if self.columns is not None:
            return usable_columns(self.columns)
        return terminal_columns(self.stream)

    def update(self, migration: Mapping[str, Any], now: float) -> None:
        """Draw ``migration`` as of ``now`` (seconds, monotonic): redrawn in place, or a plain line
        when the status or round changed or ``plain_interval_s`` passed since the last one."""
        if self.tty:
            # Longer than the terminal, the line would wrap and \r would redraw only its tail.
            columns = self._columns() - 1
            self.stream.write("\r" + progress_line(migration, width=columns)[:columns] + "\x1b[K")
            self.stream.flush()
            self._open = True
            return
        line = progress_line(migration)
        key = (migration.get("status"), migration.get("rounds"))
        due = self._last_plain is None or now - self._last_plain >= self.plain_interval_s
        if key != self._last_key or due:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_key, self._last_plain = key, now

    def finish(self, migration: Mapping[str, Any]) -> None:
        """Draw the final state and end the line (the caller prints :func:`summary_lines`).

        A migration that ended without moving a page gets no final bar (an all-zero line says
        nothing): the caller's one error line says what happened.
        """
        if migration.get("status") != "completed" and not moved_pages(migration):
            if self._open:
                self.stream.write("\r\x1b[K")
                self._open = False
            self.stream.flush()
            return
        if self.tty:
            self.update(migration, 0.0)
            self.end_line()
        elif self._last_key != (migration.get("status"), migration.get("rounds")):
            self.stream.write(progress_line(migration) + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A line of its own (e.g. "cancelling ..."), without garbling an in-place bar."""
        if self._open:
            self.stream.write("\r\x1b[K")
            self._open = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        """Leave the bar as it is and move to a new line (before an error message, say)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
