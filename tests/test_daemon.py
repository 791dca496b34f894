"""The daemon core: operations on one guest are serialised."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from migd.guest.host_guest import GuestDefinition, GuestState, GuestStateError

from test_api import make_daemon


def test_concurrent_lifecycle_operations_on_one_guest_are_refused_not_interleaved(tmp_path: Path) -> None:
    async def main() -> None:
        daemon = make_daemon(tmp_path, "hostA")
        await daemon.start()
        try:
            daemon.create_guest(GuestDefinition("g1", 16))
            first = asyncio.ensure_future(daemon.start_guest("g1"))
            await asyncio.sleep(0)  # the first start holds the guest now
            with pytest.raises(GuestStateError, match="busy"):
                await daemon.start_guest("g1")
            with pytest.raises(GuestStateError, match="busy"):
                await daemon.delete_guest("g1")
            guest = await asyncio.wait_for(first, 30)
            assert guest.state is GuestState.RUNNING and guest.agent is not None
            # Negative control: once the first operation is over, the next one goes through.
            await daemon.stop_guest("g1")
            assert guest.state is GuestState.STOPPED
        finally:
            await daemon.shutdown()

    asyncio.run(main())


def test_guest_names_with_a_trailing_newline_are_refused() -> None:
    from migd.errors import ConfigError

    with pytest.raises(ConfigError):
        GuestDefinition("g1\n", 16)
    GuestDefinition("g1", 16)
