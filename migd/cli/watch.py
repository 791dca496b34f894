"""Following one migration from the CLI: poll it and draw its progress until it ends (`migrate`, `demo`,
and the save / restore jobs of `guest save` and `guest restore`, polled under /v1/migrations alike)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import TYPE_CHECKING, Any

from migd.errors import MigdError

if TYPE_CHECKING:
    from migd.cli.client import MigdClient
    from migd.cli.progress_bar import ProgressDisplay


async def watch_migration(
    api: MigdClient, started: dict[str, Any], display: ProgressDisplay, *, interval_s: float = 0.2,
    cancel_on_interrupt: bool = False,
) -> tuple[dict[str, Any], bool]:
    """Poll the migration ``started`` (its object) and draw it until it has finished.

    Returns (the last migration object, whether the user interrupted). With
    ``cancel_on_interrupt`` the first Ctrl-C asks the daemon to cancel (as ``virsh migrate``
    does) and keeps watching; a second one stops watching (the daemon carries on).
    """
    from migd.cli.client import FINISHED_STATUSES
    from migd.cli.progress_bar import job_kind, job_route

    migration_id = started["id"]
    kind = job_kind(started)  # "migration", or "save" / "restore" (a job of the same shape)
    display.message(f"{kind} {migration_id}: {job_route(started)}")
    interrupts = 0
    cancel_sent = False
    wakeup = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        wakeup.set()

    if cancel_on_interrupt:
        loop.add_signal_handler(signal.SIGINT, on_sigint)
    try:
        while True:
            migration = await api.migration(migration_id)
            if migration["status"] in FINISHED_STATUSES:
                display.finish(migration)
                return migration, interrupts > 0
            display.update(migration, time.monotonic())
            if interrupts > 1:
                display.message(f"stopped watching; {kind} {migration_id} goes on in the daemon")
                return migration, True
            if interrupts == 1 and not cancel_sent:
                cancel_sent = True
                display.message(f"interrupted: cancelling {kind} {migration_id} (Ctrl-C again to stop watching)")
                try:
                    await api.cancel(migration_id)
                except MigdError as exc:  # e.g. 409: committed, too late to cancel
                    display.message(f"cannot cancel: {exc}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), interval_s)
            wakeup.clear()
    finally:
        display.end_line()  # an error message after this must not land on the bar's line
        if cancel_on_interrupt:
            loop.remove_signal_handler(signal.SIGINT)
