"""The ``migd`` command line: one entry point, subcommands dispatch to their modules.

Client commands (``guest``, ``migrate``, ``migrations``, ``cancel``) talk to a daemon over
its REST API (docs/design.md §9 "External contract"). Exit codes (docs/operations.md "Errors"):

- 0: done (``migrate``, ``guest save``, ``guest restore``: the migration or job completed);
- 1 (:data:`EXIT_API_ERROR`): the daemon refused (its reason is printed), cannot be reached, or
  the migration (save, restore) failed or was cancelled;
- 2 (:data:`EXIT_USAGE`): bad options, no API address or token, an unreadable or unsafe token file;
- 130 (:data:`EXIT_INTERRUPTED`): Ctrl-C.

A failure is one line on stderr, ``migd: error: ...``: what happened and the likely fix, never a
traceback or an exception's class name (tests/test_cli_errors.py holds the table).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from migd import __version__
from migd.cli.watch import watch_migration
from migd.errors import ConfigError, MigdError
from migd.wire import MAX_CONNECTIONS

if TYPE_CHECKING:  # imported when used: `migd --help` and `migd serve` need no HTTP client
    from migd.cli.client import ApiError, ClientSettings, MigdClient

EXIT_API_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it


def _cmd_keys_init(args: argparse.Namespace) -> int:
    from migd.platform import identity

    paths = identity.init_host(args.state_dir, args.ca, common_name=args.name)
    for label, path in paths.items():
        print(f"{label}: {path}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from migd.daemon.config import load_config
    from migd.daemon.serve import serve

    return serve(load_config(args.config))


def _cmd_demo(args: argparse.Namespace) -> int:
    from migd.cli.demo import run_demo

    if not args.verbose:
        # The demo narrates on its own; key-creation INFO lines would drown it.
        logging.getLogger("migd").setLevel(logging.WARNING)
    return run_demo(memory_mib=args.memory_mib, keep=args.keep)


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _guest_check(guest: dict[str, Any]) -> str:
    check = guest["check"]
    if guest.get("migrated"):
        # Nothing of the guest is here: say where it went instead of a check of a RAM that is gone.
        return f"left for {guest['migrated']['to']}"
    if guest["state"] == "saved":
        return "in its save file"
    if check["errors"]:
        return f"{check['errors']} errors"
    if check["pages_verified"]:
        return f"{check['pages_verified']}/{guest['pages']['total']} ok"
    return "-"


def guest_lines(guest: dict[str, Any]) -> list[str]:
    """``migd guest show``: one guest object (docs/design.md §9 "External contract") for people."""
    control, pages, check = guest["migration_control"], guest["pages"], guest["check"]
    lines = [
        f"name:        {guest['name']}",
        f"state:       {guest['state']}",
        f"memory:      {guest['memory_mib']} MiB ({pages['total']} pages: "
        f"{pages['private']} private, {pages['shared']} shared)",
        f"policy:      {guest['policy']:#010x}",
        f"migration:   feature {'on' if control['feature'] else 'off'}, MSR {control['msr']:#x} "
        f"({'ready' if control['ready'] else 'not ready'})",
        f"self-check:  {check['pages_verified']} pages verified, {check['errors']} errors",
    ]
    if check.get("last_error"):
        lines.append(f"last error:  {check['last_error']}")
    if guest.get("migrated"):
        lines.append(f"migrated to: {guest['migrated']['to']} (migration {guest['migrated']['migration']}); "
                     f"only this record is left here")
    elif guest["state"] == "saved":
        lines.append("saved:       its memory and vCPU state are in a save file; only this record is left "
                     "here (`migd guest restore FILE` runs it again)")
    agent = guest.get("agent") or {}
    if agent.get("exit"):
        lines.append(f"agent:       {agent['exit']}")
    return lines


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    cells = [list(header)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def guest_table(guests: Sequence[dict[str, Any]]) -> list[str]:
    """``migd guest list``."""
    rows = [
        (g["name"], g["state"], f"{g['memory_mib']} MiB", "yes" if g["migration_control"]["ready"] else "no",
         g["pages"]["private"], g["pages"]["shared"], _guest_check(g))
        for g in guests
    ]
    return _table(("NAME", "STATE", "MEMORY", "MIGRATABLE", "PRIVATE", "SHARED", "CHECK"), rows)


def migration_table(migrations: Sequence[dict[str, Any]]) -> list[str]:
    """``migd migrations``."""
    from migd.cli.progress_bar import format_bytes, format_ms

    rows = [
        (m["id"], m["guest"], m["role"], m["status"], m["destination"], m["rounds"],
         format_bytes(m["bytes"]["transferred"]), format_ms(m.get("downtime_ms")), format_ms(m.get("total_time_ms")))
        for m in migrations
    ]
    return _table(("ID", "GUEST", "ROLE", "STATUS", "DESTINATION", "ROUNDS", "TRANSFERRED", "DOWNTIME", "TIME"), rows)


async def _guest_create(api: MigdClient, args: argparse.Namespace) -> int:
    from migd.cli.client import OMIT

    uefi = {"true": True, "false": False, "absent": None, None: OMIT}[args.uefi_live_migration]
    guest = await api.create_guest(
        args.name, args.memory_mib, policy=args.policy, efi=True if args.efi else None, uefi_live_migration=uefi
    )
    _emit_guest(guest, args, f"guest {guest['name']} created")
    return 0


def _emit_guest(guest: dict[str, Any], args: argparse.Namespace, what: str) -> None:
    if getattr(args, "json", False):
        _print_json(guest)
    else:
        ready = "migration ready" if guest["migration_control"]["ready"] else "migration not ready"
        print(f"{what}: {guest['state']}, {guest['memory_mib']} MiB, {ready}")


async def _guest_list(api: MigdClient, args: argparse.Namespace) -> int:
    guests = await api.guests()
    if getattr(args, "json", False):
        _print_json({"guests": guests})
    elif guests:
        print("\n".join(guest_table(guests)))
    return 0


async def _guest_show(api: MigdClient, args: argparse.Namespace) -> int:
    guest = await api.guest(args.name)
    if getattr(args, "json", False):
        _print_json(guest)
    else:
        print("\n".join(guest_lines(guest)))
    return 0


async def _guest_start(api: MigdClient, args: argparse.Namespace) -> int:
    workload = {
        key: value
        for key, value in (
            ("dirty_rate_mib_s", args.dirty_rate_mib_s), ("convert_rate_hz", args.convert_rate_hz), ("seed", args.seed)
        )
        if value is not None
    }
    guest = await api.start_guest(args.name, workload or None)
    _emit_guest(guest, args, f"guest {guest['name']} started")
    return 0


async def _guest_action(api: MigdClient, args: argparse.Namespace) -> int:
    guest = await api.guest_action(args.name, args.guest_command)
    done = {"stop": "stopped", "reboot": "rebooting", "kexec": "kexec'ing"}[args.guest_command]
    _emit_guest(guest, args, f"guest {guest['name']} {done}")
    return 0


async def _guest_delete(api: MigdClient, args: argparse.Namespace) -> int:
    await api.delete_guest(args.name)
    print(f"guest {args.name} deleted")
    return 0


#: What a cancel before the commit leaves, by the kind of job (migd/cli/progress_bar.py job_kind).
_CANCELLED = {
    "migration": "cancelled before the commit; the guest runs on at the source",
    "save": "cancelled before the commit; the guest runs on here and no file was written",
    "restore": "cancelled before the commit; no guest was created and the file can be restored again",
}


def failure_line(migration: dict[str, Any]) -> str:
    """``migration ID of G to D failed: REASON`` — what ended a failed or cancelled migration (or save,
    or restore), in one sentence."""
    from migd.cli.progress_bar import job_kind, job_title

    reason = migration.get("error") or (_CANCELLED[job_kind(migration)] if migration["status"] == "cancelled"
                                        else "no reason recorded; see the daemon's log")
    return f"{job_title(migration)} {migration['status']}: {reason}"


async def _migrate(api: MigdClient, args: argparse.Namespace) -> int:
    migration = await api.migrate(
        args.name, args.to, downtime_limit_ms=args.downtime_limit_ms, max_bandwidth_mib_s=args.max_bandwidth_mib_s,
        connections=args.connections,
    )
    return await _follow(api, migration, args)


async def _guest_save(api: MigdClient, args: argparse.Namespace) -> int:
    # The daemon takes absolute paths only; a relative one means the caller's directory, so it is
    # resolved here (the file is on the daemon's host: the same one for a local daemon).
    job = await api.save_guest(
        args.name, os.path.abspath(args.to),
        for_host_pdh=None if args.for_host is None else os.path.abspath(args.for_host),
        live=True if args.live else None,
    )
    return await _follow(api, job, args)


async def _guest_restore(api: MigdClient, args: argparse.Namespace) -> int:
    job = await api.restore_guest(os.path.abspath(args.file), name=args.name)
    return await _follow(api, job, args)


async def _follow(api: MigdClient, migration: dict[str, Any], args: argparse.Namespace) -> int:
    """After a migrate, save or restore was accepted: with --no-wait print its id (or object), else draw
    its progress until it ends, print the summary and the error (once, on stderr); the exit code."""
    from migd.cli.progress_bar import ProgressDisplay, moved_pages, summary_lines

    if args.no_wait:
        if getattr(args, "json", False):
            _print_json(migration)
        else:
            print(migration["id"])
        return 0
    final, interrupted = await watch_migration(api, migration, ProgressDisplay(sys.stderr), cancel_on_interrupt=True)
    failed = final["status"] in ("failed", "cancelled")
    if getattr(args, "json", False):
        _print_json(final)
    elif final["status"] == "completed" or moved_pages(final):
        # The error goes to stderr below, once: the summary leaves it out.
        print("\n".join(summary_lines(final, with_error=not failed)))
    if final["status"] == "completed":
        return 0
    if failed:
        print(f"migd: error: {failure_line(final)}", file=sys.stderr)
    return EXIT_INTERRUPTED if interrupted else EXIT_API_ERROR


async def _migrations(api: MigdClient, args: argparse.Namespace) -> int:
    from migd.cli.progress_bar import summary_lines

    as_json = getattr(args, "json", False)
    if args.id is not None:
        migration = await api.migration(args.id)
        if as_json:
            _print_json(migration)
        else:
            print("\n".join(summary_lines(migration)))
        return 0
    migrations = await api.migrations()
    if as_json:
        _print_json({"migrations": migrations})
    elif migrations:
        print("\n".join(migration_table(migrations)))
    return 0


async def _cancel(api: MigdClient, args: argparse.Namespace) -> int:
    migration = await api.cancel(args.id)
    if getattr(args, "json", False):
        _print_json(migration)
    else:
        print(f"migration {migration['id']}: cancel requested (status {migration['status']})")
    return 0


def _api_error_hint(exc: ApiError, settings: ClientSettings) -> str:
    """The likely fix for an error status whose reason alone does not say it (the daemon cannot know)."""
    if exc.status == 401:
        return (f"; {settings.token_file} must hold the token in the daemon's api.token_file "
                f"(pass --token-file, or --config with the daemon's config)")
    if exc.status >= 500:
        return "; the daemon hit an internal error: its log has the details (journalctl -u migd)"
    return ""


def _run_client(args: argparse.Namespace) -> int:
    from migd.cli.client import ApiError, ApiUnreachable, MigdClient, resolve_settings

    try:
        settings = resolve_settings(
            api=getattr(args, "api", None), token_file=getattr(args, "token_file", None),
            config=getattr(args, "config", None),
        )
    except ConfigError as exc:
        print(f"migd: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def run() -> int:
        async with MigdClient.from_settings(settings, timeout_s=getattr(args, "api_timeout", 120.0)) as api:
            return await args.client_func(api, args)

    try:
        return asyncio.run(run())
    except ApiError as exc:
        print(f"migd: error: {exc}{_api_error_hint(exc, settings)}", file=sys.stderr)
        return EXIT_API_ERROR
    except ApiUnreachable as exc:
        print(f"migd: error: {exc}", file=sys.stderr)
        return EXIT_API_ERROR
    except KeyboardInterrupt:
        print("migd: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _client_options() -> argparse.ArgumentParser:
    """``--api``, ``--token-file``, ``--config``, ``--json``: accepted at every level of a client command.

    SUPPRESS defaults keep a value given before a nested subcommand (``migd guest --api X
    list``) from being reset by the inner parser.
    """
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("daemon connection")
    group.add_argument("--api", default=argparse.SUPPRESS, metavar="URL",
                       help="REST API: http://HOST:PORT, HOST:PORT or unix:/path (default: api.listen of "
                            "--config, else $MIGD_API, else api.listen of $MIGD_CONFIG or /etc/migd/migd.toml)")
    group.add_argument("--token-file", default=argparse.SUPPRESS, metavar="FILE",
                       help="bearer token file (default: api.token_file of --config, else $MIGD_TOKEN_FILE, "
                            "else api.token_file of $MIGD_CONFIG or /etc/migd/migd.toml)")
    group.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                       help="the daemon's TOML config, for api.listen and api.token_file")
    group.add_argument("--api-timeout", type=_positive(float), default=argparse.SUPPRESS, metavar="SECONDS",
                       help="how long one API request may take (default: 120)")
    options.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                         help="print the daemon's JSON objects instead of text")
    return options


def _name(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _non_negative(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):  # inf would overflow a timer, nan compares false with every bound
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
        return value

    return parse


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = _non_negative(kind)(text)
        if value == 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


_positive_int = _positive(int)


def _connections(text: str) -> int:
    # Checked here too, not only by the daemon: a usage error (exit 2) names the option, where the
    # daemon's 400 would name the body field.
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= MAX_CONNECTIONS:
        raise argparse.ArgumentTypeError(f"must be in 1..{MAX_CONNECTIONS}, got {text}")
    return value


def _policy(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a u32 (decimal or 0x hex), got {text!r}") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"expected a u32, got {text}")
    return value


def _add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser],
                         opts: argparse.ArgumentParser) -> None:
    guest = sub.add_parser("guest", parents=[opts], help="define, list, start, stop, save, restore and delete guests")
    guest_sub = guest.add_subparsers(dest="guest_command", required=True, metavar="COMMAND")
    create = guest_sub.add_parser("create", parents=[opts], help="define a guest (state: defined)")
    create.add_argument("name", type=_name, metavar="NAME")
    create.add_argument("--memory-mib", type=_positive_int, required=True, metavar="N", help="guest RAM in MiB")
    create.add_argument("--policy", type=_policy, default=None, metavar="P", help="SEV guest policy (u32)")
    create.add_argument("--efi", action="store_true", help="boot with UEFI")
    create.add_argument("--uefi-live-migration", choices=("true", "false", "absent"), default=None,
                        help="the UEFI variable SevLiveMigrationEnabled an --efi guest sees "
                             "(absent: no such variable; default: the daemon's, true)")
    create.set_defaults(client_func=_guest_create)
    guest_sub.add_parser("list", parents=[opts], help="every guest of the host").set_defaults(client_func=_guest_list)
    show = guest_sub.add_parser("show", parents=[opts], help="one guest")
    show.add_argument("name", type=_name, metavar="NAME")
    show.set_defaults(client_func=_guest_show)
    start = guest_sub.add_parser("start", parents=[opts], help="boot the guest (with an optional workload)")
    start.add_argument("name", type=_name, metavar="NAME")
    start.add_argument("--dirty-rate-mib-s", type=_non_negative(float), default=None, metavar="X",
                       help="memory the guest writes per second")
    start.add_argument("--convert-rate-hz", type=_non_negative(float), default=None, metavar="Y",
                       help="private<->shared page conversions per second")
    start.add_argument("--seed", type=_non_negative(int), default=None, metavar="S", help="workload seed")
    start.set_defaults(client_func=_guest_start)
    for action, text in (("stop", "shut the guest down"), ("reboot", "reboot the guest (MSR back to 0)"),
                         ("kexec", "kexec the guest into a new kernel")):
        parser = guest_sub.add_parser(action, parents=[opts], help=text)
        parser.add_argument("name", type=_name, metavar="NAME")
        parser.set_defaults(client_func=_guest_action)
    delete = guest_sub.add_parser("delete", parents=[opts], help="remove the guest and its memory")
    delete.add_argument("name", type=_name, metavar="NAME")
    delete.set_defaults(client_func=_guest_delete)

    migrate = sub.add_parser("migrate", parents=[opts], help="live-migrate a guest to another migd host")
    migrate.add_argument("name", type=_name, metavar="NAME")
    migrate.add_argument("--to", required=True, metavar="HOST:PORT", help="the destination's migration listener")
    migrate.add_argument("--downtime-limit-ms", type=_positive(float), default=None, metavar="N",
                         help="stop-and-copy budget (default: the daemon's migration.downtime_limit_ms)")
    migrate.add_argument("--max-bandwidth-mib-s", type=_non_negative(float), default=None, metavar="N",
                         help="bandwidth cap, 0 = unlimited (default: the daemon's)")
    migrate.add_argument("--connections", type=_connections, default=None, metavar="N",
                         help=f"TCP connections, 1..{MAX_CONNECTIONS}: with more than one the first carries control "
                              "and the pages are striped over the others (default: the daemon's "
                              "migration.connections)")
    migrate.add_argument("--no-wait", action="store_true", help="print the migration id and return at once")
    migrate.set_defaults(client_func=_migrate)

    save = guest_sub.add_parser(
        "save", parents=[opts], help="save a running guest to a file only the target host can restore (state: saved)")
    save.add_argument("name", type=_name, metavar="NAME")
    save.add_argument("--to", required=True, type=_name, metavar="FILE",
                      help="the file to write on the daemon's host (relative: to this directory); never replaced")
    save.add_argument("--for-host", default=None, type=_name, metavar="PDH_CERT",
                      help="the PDH certificate (pdh.pem in its state directory) of the host that may restore the "
                           "file (default: the daemon's own)")
    save.add_argument("--live", action="store_true",
                      help="copy memory while the guest runs, then pause it for the rest (a shorter pause)")
    save.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    save.set_defaults(client_func=_guest_save)
    restore = guest_sub.add_parser("restore", parents=[opts], help="run a saved guest again from its file")
    restore.add_argument("file", type=_name, metavar="FILE",
                         help="the save file on the daemon's host (relative: to this directory)")
    restore.add_argument("--name", type=_name, default=None, metavar="NAME",
                         help="the restored guest's name (default: the name it was saved under)")
    restore.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
    restore.set_defaults(client_func=_guest_restore)

    migrations = sub.add_parser("migrations", parents=[opts],
                                help="migrations, saves and restores of the host, or one of them")
    migrations.add_argument("id", nargs="?", default=None, metavar="ID")
    migrations.set_defaults(client_func=_migrations)

    cancel = sub.add_parser("cancel", parents=[opts], help="cancel an outgoing migration before it commits")
    cancel.add_argument("id", type=_name, metavar="ID")
    cancel.set_defaults(client_func=_cancel)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``migd`` subcommand."""
    client_options = _client_options()
    parser = argparse.ArgumentParser(
        prog="migd", description="migd: live migration of AMD SEV confidential guests",
        parents=[client_options],  # `migd --api URL guest list` as well as `migd guest list --api URL`
    )
    parser.add_argument("--version", action="version", version=f"migd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon in the foreground (systemd Type=notify)")
    serve.add_argument("--config", required=True, help="TOML config file (see config/migd.toml)")
    serve.set_defaults(func=_cmd_serve)

    demo = sub.add_parser("demo", help="two daemons on loopback, one live migration, a report (no setup needed)")
    demo.add_argument("--memory-mib", type=_positive_int, default=512, metavar="N", help="guest RAM (default: 512)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, state) for inspection")
    demo.set_defaults(func=_cmd_demo)

    keys = sub.add_parser("keys", help="host identity (PDH and TLS keys)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser(
        "init", help="create the owner CA (if missing), the PDH key/certificate and a TLS host certificate"
    )
    init.add_argument("--state-dir", required=True, help="host state directory (keys are stored here)")
    init.add_argument("--ca", required=True, help="owner CA directory (ca.pem, ca.key; created if missing)")
    init.add_argument("--name", default=None, help="host name for the certificates (default: this host's name)")
    init.set_defaults(func=_cmd_keys_init)

    _add_client_commands(sub, client_options)
    sub.add_parser("agent", help="the guest agent (launched by the daemon; see `migd agent --help`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``migd`` command; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["agent"]:
        # The guest agent has its own parser: it is launched by the daemon, not typed by users.
        from migd.guest import agent

        return agent.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        if hasattr(args, "client_func"):
            return _run_client(args)
        return int(args.func(args) or 0)
    except MigdError as exc:
        print(f"migd: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
