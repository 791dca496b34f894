"""`migd serve`'s lifetime (migd/daemon/serve.py): what a start opened, a failed start closes."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from migd.daemon import core, serve
from migd.daemon.config import parse_config
from migd.platform import identity


def _config(root: Path, api_port: int) -> object:
    state = root / "hostA"
    identity.init_host(state, root / "ca", common_name="hostA")
    (state / "api.token").write_text("t" * 32 + "\n")
    (state / "api.token").chmod(0o600)  # the daemon refuses a token file others can read
    return parse_config({
        "state_dir": str(state),
        "api": {"listen": f"127.0.0.1:{api_port}", "token_file": str(state / "api.token")},
        "migration": {"listen": "127.0.0.1:0"},
        "sev": {"trusted_roots": [str(root / "ca" / identity.CA_CERT)]},
    }, base=root)


def test_a_start_that_fails_at_the_rest_port_shuts_the_daemon_down(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The REST port is taken: `serve` fails — after the daemon had started its migration
    listener and journal, which the app's cleanup context closes again (before, they stayed open
    in the failing process)."""
    started: list[core.Daemon] = []
    original_start = core.Daemon.start

    async def recording_start(self: core.Daemon) -> None:
        started.append(self)
        await original_start(self)

    monkeypatch.setattr(core.Daemon, "start", recording_start)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = _config(tmp_path, taken.getsockname()[1])

        async def main() -> None:
            with pytest.raises(OSError):
                await asyncio.wait_for(serve.run_daemon(config), 60)  # type: ignore[arg-type]
            (daemon,) = started
            port = daemon.migration_port
            assert port, "the daemon's migration listener had started"
            assert not daemon.accepting  # shut down
            with socket.socket() as probe:  # its port is free again: nothing listens there
                probe.bind(("127.0.0.1", port))

        asyncio.run(main())
