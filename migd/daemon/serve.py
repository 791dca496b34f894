"""``migd serve --config FILE``: the daemon in the foreground (systemd ``Type=notify``).

Order matters for systemd: everything is validated (config, keys, trust anchors) before
anything listens, and READY=1 is sent only once both the REST API and the migration
listener accept connections. SIGTERM/SIGINT: STOPPING=1, stop taking work, cancel
migrations that have not committed (their guests resume here), let committed hand-offs
finish, stop the guests' agents, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator, Callable, Sequence

import uvloop
from aiohttp import web

from migd.guest.agent_launcher import DEFAULT_COMMAND
from migd.daemon.config import Config
from migd.daemon.core import Daemon
from migd.daemon.sdnotify import Notifier

log = logging.getLogger(__name__)


def _status_line(daemon: Daemon) -> str:
    active = daemon.active_migrations()
    if not active:
        return f"{len(daemon.host.guests)} guests, no active migration"
    parts = [f"{m.guest} {m.role} {m.status.value} round {m.rounds}" for m in active]
    return f"{len(daemon.host.guests)} guests; migrating: " + ", ".join(parts)


def daemon_lifetime(daemon: Daemon) -> Callable[[web.Application], AsyncIterator[None]]:
    """The daemon as the app's resource (aiohttp ``cleanup_ctx``): started with the app, shut down
    when the app is cleaned up — also after a start that failed half-way (a REST port in use),
    so a listener or journal that did open is closed again."""

    async def lifetime(app: web.Application) -> AsyncIterator[None]:
        await daemon.start()
        try:
            yield
        finally:
            await daemon.shutdown()

    return lifetime


async def run_daemon(config: Config, *, agent_command: Sequence[str] = DEFAULT_COMMAND) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    from migd.daemon.api import build_app  # the HTTP layer; imported late to keep `migd agent` light

    notifier = Notifier()
    token = config.token()
    daemon = Daemon(config, agent_command=agent_command)
    app = build_app(daemon, token)
    app.cleanup_ctx.append(daemon_lifetime(daemon))
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()  # starts the daemon (daemon_lifetime up to its yield)
    loop = asyncio.get_running_loop()
    beat: asyncio.Task[None] | None = None
    try:
        api = config.api_listen
        site: web.BaseSite
        if api.unix_path is not None:
            site = web.UnixSite(runner, str(api.unix_path))
        else:
            site = web.TCPSite(runner, api.host, api.port)
        await site.start()
        log.info("REST API on %s, migrations on port %s", api, daemon.migration_port)

        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        notifier.notify(READY=1, STATUS=_status_line(daemon))

        async def heartbeat() -> None:
            interval = notifier.watchdog_interval()
            while True:
                await asyncio.sleep(min(interval or 5.0, 5.0))
                fields: dict[str, str | int] = {"STATUS": _status_line(daemon)}
                if interval is not None:
                    fields["WATCHDOG"] = 1
                notifier.notify(**fields)

        beat = loop.create_task(heartbeat())
        await stop.wait()
        log.info("stopping: no new work; cancelling migrations that have not committed")
        notifier.notify(STOPPING=1, STATUS="stopping")
    finally:
        if beat is not None:
            beat.cancel()
        # The API stops, then the daemon shuts down (daemon_lifetime after its yield).
        await runner.cleanup()
        notifier.close()
    return 0


def serve(config: Config) -> int:
    """Blocking entry point of ``migd serve`` (uvloop)."""
    return uvloop.run(run_daemon(config))
