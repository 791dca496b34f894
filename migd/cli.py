"""The ``migd`` command line: one entry point, subcommands dispatch to their modules."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from migd import __version__
from migd.errors import MigdError


def _cmd_keys_init(args: argparse.Namespace) -> int:
    from migd import identity

    paths = identity.init_host(args.state_dir, args.ca, common_name=args.name)
    for label, path in paths.items():
        print(f"{label}: {path}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from migd.config import load_config
    from migd.serve import serve

    return serve(load_config(args.config))


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every ``migd`` subcommand."""
    parser = argparse.ArgumentParser(prog="migd", description=__doc__)
    parser.add_argument("--version", action="version", version=f"migd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the daemon in the foreground (systemd Type=notify)")
    serve.add_argument("--config", required=True, help="TOML config file (see config/migd.toml)")
    serve.set_defaults(func=_cmd_serve)

    keys = sub.add_parser("keys", help="host identity (PDH and TLS keys)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    init = keys_sub.add_parser(
        "init", help="create the owner CA (if missing), the PDH key/certificate and a TLS host certificate"
    )
    init.add_argument("--state-dir", required=True, help="host state directory (keys are stored here)")
    init.add_argument("--ca", required=True, help="owner CA directory (ca.pem, ca.key; created if missing)")
    init.add_argument("--name", default=None, help="host name for the certificates (default: this host's name)")
    init.set_defaults(func=_cmd_keys_init)

    sub.add_parser("agent", help="the guest agent (launched by the daemon; see `migd agent --help`)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``migd`` command; returns the process exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["agent"]:
        # The guest agent has its own parser: it is launched by the daemon, not typed by users.
        from migd import agent

        return agent.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except MigdError as exc:
        print(f"migd: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
