"""What the discard tests share (tests/test_dest_discard_cancel.py, tests/test_restore_cancel_discard.py):
a stand-in guest agent whose exit the test controls, so that a clean-up waiting for it can be caught
in that wait, and the traces a discarded partial guest must not leave."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from migd.platform import identity
from migd.platform.psp import PspFirmware


class SlowExitAgent:
    """``exiting`` is set when someone waits for the exit; the exit happens when the test sets ``exited``."""

    pid = 4242

    def __init__(self) -> None:
        self.exiting = asyncio.Event()
        self.exited = asyncio.Event()

    def poll(self) -> int | None:
        return None  # running

    def terminate(self) -> None:
        pass

    def kill(self) -> None:
        pass

    async def wait_async(self, timeout: float | None) -> int:
        self.exiting.set()
        await self.exited.wait()  # the agent takes a moment to exit
        return 0


def partial_guest_traces(host: Any, firmware: Any, name: str, handles_before: Any) -> list[str]:
    """What a partial guest ``name`` left on ``host`` after its discard (empty: nothing)."""
    traces = []
    if name in host.guests:
        traces.append("the partial guest is still registered")
    if host.guest_dir(name).exists():
        traces.append("the partial guest's RAM directory was left behind")
    if firmware.guest_handles() != handles_before:
        traces.append(f"the RECEIVE context was left open (handles {firmware.guest_handles()})")
    return traces


def two_firmwares(root: Path) -> tuple[PspFirmware, PspFirmware]:
    """Hosts A and B under ``root``, one owner CA: their emulated firmware (A sends, B receives)."""
    for name in ("hostA", "hostB"):
        identity.init_host(root / name, root / "ca", common_name=name)
    anchors = [root / "ca" / identity.CA_CERT]
    return PspFirmware.from_state_dir(root / "hostA", anchors), PspFirmware.from_state_dir(root / "hostB", anchors)
