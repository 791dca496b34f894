"""A stand-in guest agent whose exit the test controls: a clean-up that waits for it can be caught
in that wait (tests/test_dest_discard_cancel.py, tests/test_restore_cancel_discard.py)."""

from __future__ import annotations

import asyncio


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
