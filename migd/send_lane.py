"""One outgoing connection's page frames, in order, with the sealing of private runs in a worker thread.

With several connections (docs/protocol.md "Several connections") the source's event loop
still classifies and reads every chunk in one synchronous step (the MSR gate and the routing
by the bitmap at read time stay exactly as with one connection), but the expensive half of
SEND_UPDATE_DATA, AES-CTR under TEK and HMAC under TIK, runs in a thread of the connection's
own: ``cryptography`` and ``hashlib`` release the GIL on bulk data, so several connections'
sealing runs in parallel beside the loop (measured on the 2-core VM, 2 MiB runs: CTR 4.4 →
8.1 GB/s and HMAC 1.4 → 2.5 GB/s with a second thread).

Frames go out in the order they were queued, each as soon as it and everything queued before
it on that connection are ready: a page's versions never overtake each other, and a lane's
transport sequence numbers (taken at sealing) follow the frames' order, since its worker seals
in queue order. At most ``max_pending`` frames wait per connection, so memory stays bounded
whatever the worker's speed.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from collections.abc import Callable
from typing import NamedTuple

from migd import wire
from migd.errors import MigdError
from migd.page_runs import PageKind
from migd.platform.psp import DeferredPacket

log = logging.getLogger(__name__)

#: Frames one connection may have queued (sealing or waiting for an earlier one): with runs of
#: at most 2 MiB, 8 MiB of payload per connection beyond what its transport holds.
MAX_PENDING = 4

#: Called on the loop for each frame as it is written: (message, kind, gpa, npages, header).
Written = Callable[[wire.Message, PageKind, int, int, bytes], None]


class SendLaneError(MigdError):
    """Sealing or writing a queued frame failed: the migration ends."""


class _Queued(NamedTuple):
    future: concurrent.futures.Future[wire.Message]
    kind: PageKind
    gpa: int
    npages: int


class SendLane:
    """The ordered queue of one connection's page frames and its sealing thread."""

    def __init__(self, index: int, write: Written, *, max_pending: int = MAX_PENDING) -> None:
        """``write`` puts a ready frame on the connection and accounts for it (on the loop)."""
        self.index = index
        self._write = write
        self._max_pending = max_pending
        self._queue: collections.deque[_Queued] = collections.deque()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"migd-seal-{index}")
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self.error: BaseException | None = None

    @property
    def pending(self) -> int:
        """Frames queued and not written yet."""
        return len(self._queue)

    def put_ready(self, msg: wire.Message, kind: PageKind, gpa: int, npages: int) -> None:
        """A frame that needs no sealing (zero or shared run): written once those before it are."""
        future: concurrent.futures.Future[wire.Message] = concurrent.futures.Future()
        future.set_result(msg)
        self._queue.append(_Queued(future, kind, gpa, npages))
        self._pump()

    def put_private(self, packet: DeferredPacket) -> None:
        """A private run read by the firmware: sealed by the worker, then written in its turn."""
        self._check()
        future = self._worker.submit(_sealed, packet)
        self._queue.append(_Queued(future, PageKind.PRIVATE, packet.gpa, packet.npages))
        future.add_done_callback(self._ready_soon)

    async def room(self, timeout: float) -> None:
        """Wait until another frame may be queued (TimeoutError after ``timeout``)."""
        async with asyncio.timeout(timeout):
            while len(self._queue) >= self._max_pending:
                self._check()
                self._changed.clear()
                await self._changed.wait()
        self._check()

    async def flush(self, timeout: float) -> None:
        """Wait until every queued frame is written (TimeoutError after ``timeout``)."""
        async with asyncio.timeout(timeout):
            while self._queue:
                self._check()
                self._changed.clear()
                await self._changed.wait()
        self._check()

    def close(self) -> None:
        """Drop what is queued and stop the worker (the migration is over)."""
        for queued in self._queue:
            queued.future.cancel()
        self._queue.clear()
        self._worker.shutdown(wait=False, cancel_futures=True)
        self._changed.set()

    def _check(self) -> None:
        if self.error is not None:
            raise SendLaneError(f"connection {self.index + 1}: {self.error}") from self.error

    def _ready_soon(self, _future: concurrent.futures.Future[wire.Message]) -> None:
        # The worker thread: the frames are written on the loop.
        try:
            self._loop.call_soon_threadsafe(self._pump)
        except RuntimeError:  # the loop is closed: the migration is long over
            pass

    def _pump(self) -> None:
        """Write the frames at the head of the queue that are ready, in order."""
        queue = self._queue
        while queue and queue[0].future.done() and self.error is None:
            queued = queue.popleft()
            try:
                msg = queued.future.result()
                header = msg.header if isinstance(msg, wire.PrivatePages) else b""
                self._write(msg, queued.kind, queued.gpa, queued.npages, header)
            except concurrent.futures.CancelledError:
                continue
            except Exception as exc:  # sealing (firmware) or writing (stream) failed: the migration ends
                self.error = exc
        self._changed.set()


def _sealed(packet: DeferredPacket) -> wire.Message:
    """The worker's half: seal the run (sequence numbers in queue order: one worker per lane)."""
    header, ciphertext = packet.seal()
    return wire.PrivatePages(packet.gpa, packet.npages, header, ciphertext)
