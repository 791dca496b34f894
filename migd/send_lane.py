"""One outgoing connection's page frames, in order, with SEND_UPDATE_DATA of private runs in a worker thread.

With several connections (docs/protocol.md "Several connections") the source's event loop
still classifies every chunk under the MSR gate and copies its shared runs, but SEND_UPDATE_DATA
of its private runs (the VEK read, AES-CTR under TEK, HMAC under TIK) runs in a thread of the
connection's own: ``cryptography`` and ``hashlib`` release the GIL on bulk data, so several
connections' runs are read and sealed in parallel beside the loop (measured on the 2-core VM,
2 MiB runs, 2 threads against 1: CTR 4.4 → 8.1 GB/s, HMAC 1.4 → 2.5 GB/s, the VEK's XEX 3.1 →
4.2 GB/s). A job may come back empty: the source abandons a run whose read may have followed
an MSR drop (migd/source.py), and re-sends its pages.

Frames go out in the order they were queued, each as soon as it and everything queued before
it on that connection are ready: a page's versions never overtake each other, and a lane's
transport sequence numbers (taken when a run is sealed) follow the frames' order, since its
worker runs the jobs in queue order. At most ``max_pending`` runs' worth of payload (2 MiB each) waits per
connection, so memory stays bounded whatever the worker's speed. The private runs of one step
(one chunk: a few runs) go to the worker together (:meth:`SendLane.submit`): one hand-off per
chunk, not per run.

Per-frame costs are kept off the loop where they can be: payloads go into regions of a
ring per connection (:class:`~migd.send_buffers.SendRing`, pipelined: regions are taken in
queue order and placed in the same order), each free again once the transport has sent its
frame (a fresh buffer per frame costs page faults and zeroing); and a finished seal wakes the
loop only when it waits for this connection, otherwise the loop writes what is ready at its
next step (:meth:`SendLane.pump`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from collections.abc import Callable
from typing import NamedTuple

from migd import wire
from migd.abi import PAGE_SIZE
from migd.errors import MigdError
from migd.page_runs import PageKind
from migd.send_buffers import SendRing

log = logging.getLogger(__name__)

#: Payload one connection may have queued (sealing or waiting for an earlier frame), in runs of
#: at most 2 MiB: 6 MiB per connection beyond what its transport holds.
MAX_PENDING = 3
#: The largest payload of one frame.
RUN_BYTES = wire.MAX_RUN_PAGES * PAGE_SIZE

#: Called on the loop for each frame as it is written: (message, kind, gpa, npages, header);
#: returns the stream position after the frame (its payload buffer is free once the transport
#: has sent that far).
Written = Callable[[wire.Message, PageKind, int, int, bytes], int]
#: A private run's job, run in the worker: its frame, or None if the run was abandoned.
Job = Callable[[], "wire.PrivatePages | None"]


class SendLaneError(MigdError):
    """Sealing or writing a queued frame failed: the migration ends."""


class _Queued(NamedTuple):
    future: concurrent.futures.Future[list[wire.Message | None]]  # its batch's frames (one for a ready frame)
    index: int  # its frame in that list
    kind: PageKind
    gpa: int
    npages: int
    in_ring: bool  # its payload is a region of the lane's ring (placed once the frame is written)


class SendLane:
    """The ordered queue of one connection's page frames, its sealing thread and its buffers."""

    def __init__(self, index: int, write: Written, consumed: Callable[[], int], *, transport_bytes: int,
                 max_pending: int = MAX_PENDING) -> None:
        """``write`` puts a ready frame on the connection and accounts for it (on the loop);
        ``consumed`` says how far the connection's transport has sent (stream position);
        ``transport_bytes``: how much its transport may hold (its write high-water mark)."""
        self.index = index
        self._write = write
        self._consumed = consumed
        self._max_pending = max_pending
        self._queue: collections.deque[_Queued] = collections.deque()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"migd-seal-{index}")
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._waiting = False  # the loop waits for this connection: a finished seal must wake it
        # What the transport may hold and the queued frames; past that (a slow link, the frame
        # being written) a payload gets a buffer of its own, as with one connection.
        self._ring: SendRing | None = SendRing(transport_bytes + max_pending * RUN_BYTES, pipelined=True)
        self._pending_bytes = 0  # payload queued and not written
        self._batch: list[Job] = []  # private runs of the current step, not handed to the worker yet
        self._batch_future: concurrent.futures.Future[list[wire.Message | None]] | None = None
        self._last_end = 0  # the stream position after the last frame written
        #: Private runs abandoned by their job (not sent; the source re-sends their pages).
        self.abandoned = 0
        self.error: BaseException | None = None

    @property
    def pending(self) -> int:
        """Frames queued and not written yet."""
        return len(self._queue)

    def buffer(self, nbytes: int) -> tuple[memoryview, bool]:
        """A payload buffer of ``nbytes`` for the next frame queued: (the buffer, whether it is the
        ring's). Its frame must be queued next (``in_ring`` passed on)."""
        view = None if self._ring is None else self._ring.take(nbytes, self._consumed())
        return (view, True) if view is not None else (memoryview(bytearray(nbytes)), False)

    def unused(self, in_ring: bool) -> None:
        """The buffer just taken will carry no frame (reading the run failed)."""
        if in_ring and self._ring is not None:
            self._ring.release()

    def put_ready(self, msg: wire.Message, kind: PageKind, gpa: int, npages: int, in_ring: bool = False) -> None:
        """A frame that needs no sealing (zero or shared run): written once those before it are."""
        future: concurrent.futures.Future[list[wire.Message | None]] = concurrent.futures.Future()
        future.set_result([msg])
        self._queued(_Queued(future, 0, kind, gpa, npages, in_ring), kind is not PageKind.ZERO)
        self.pump()

    def put_private(self, job: Job, gpa: int, npages: int, in_ring: bool) -> None:
        """A private run: ``job`` (SEND_UPDATE_DATA into its buffer) runs in the worker with the
        step's other private runs (:meth:`submit`); its frame is written in its turn."""
        self._check()
        if self._batch_future is None:
            self._batch_future = concurrent.futures.Future()
        self._batch.append(job)
        self._queued(_Queued(self._batch_future, len(self._batch) - 1, PageKind.PRIVATE, gpa, npages, in_ring), True)

    def submit(self) -> None:
        """Hand the private runs queued since the last call to the worker (the end of a step)."""
        if self._batch_future is None:
            return
        batch, future = self._batch, self._batch_future
        self._batch, self._batch_future = [], None
        future.add_done_callback(self._sealed_one)
        try:
            self._worker.submit(_run_batch, batch, future)
        except RuntimeError as exc:  # the worker was shut down: the migration is over
            future.set_exception(exc)

    def _queued(self, queued: _Queued, has_payload: bool) -> None:
        self._queue.append(queued)
        if has_payload:
            self._pending_bytes += queued.npages * PAGE_SIZE

    async def room(self, timeout: float) -> None:
        """Wait until another step's runs may be queued (TimeoutError after ``timeout``)."""
        await self._wait_until(lambda: self._pending_bytes < self._max_pending * RUN_BYTES, timeout)

    async def flush(self, timeout: float) -> None:
        """Wait until every queued frame is written (TimeoutError after ``timeout``)."""
        await self._wait_until(lambda: not self._queue, timeout)

    async def _wait_until(self, done: Callable[[], bool], timeout: float) -> None:
        self.submit()
        self._waiting = True
        try:
            self.pump()  # what finished while nobody was to be woken
            async with asyncio.timeout(timeout):
                while not done():
                    self._check()
                    self._changed.clear()
                    await self._changed.wait()
        finally:
            self._waiting = False
        self._check()

    def close(self) -> None:
        """Drop what is queued and stop the worker (the migration is over); a job it is running
        (one chunk's runs, milliseconds) finishes first: none reads guest RAM after this."""
        for queued in self._queue:
            queued.future.cancel()
        self._queue.clear()
        self._batch.clear()
        self._worker.shutdown(wait=True, cancel_futures=True)
        # The daemon keeps finished migrations (their records); the ring (the transport's share
        # plus 6 MiB, all of it written during the migration) must not stay with them. Views the
        # transport still holds keep their bytes until it lets go.
        self._ring = None
        self._changed.set()

    def _check(self) -> None:
        if self.error is not None:
            raise SendLaneError(f"connection {self.index + 1}: {self.error}") from self.error

    def _sealed_one(self, _future: concurrent.futures.Future[wire.Message]) -> None:
        # The worker thread. The loop writes at its next step anyway; wake it only if it waits.
        if self._waiting:
            try:
                self._loop.call_soon_threadsafe(self.pump)
            except RuntimeError:  # the loop is closed: the migration is long over
                pass

    def pump(self) -> None:
        """Write the frames at the head of the queue that are ready, in order (on the loop)."""
        queue = self._queue
        while queue and queue[0].future.done() and self.error is None:
            queued = queue.popleft()
            if queued.kind is not PageKind.ZERO:
                self._pending_bytes -= queued.npages * PAGE_SIZE
            try:
                msg = queued.future.result()[queued.index]
                if msg is None:  # abandoned: nothing to write; its ring region is free at once
                    self.abandoned += 1
                    end = self._last_end
                else:
                    header = msg.header if isinstance(msg, wire.PrivatePages) else b""
                    end = self._last_end = self._write(msg, queued.kind, queued.gpa, queued.npages, header)
            except concurrent.futures.CancelledError:
                continue
            except Exception as exc:  # the job (firmware) or the write (stream) failed: the migration ends
                self.error = exc
                break
            if queued.in_ring and self._ring is not None:
                self._ring.placed(end)
        self._changed.set()


def _run_batch(jobs: list[Job], future: concurrent.futures.Future[list[wire.Message | None]]) -> None:
    """The worker: one step's private runs, in order (their sequence numbers follow)."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        frames: list[wire.Message | None] = [job() for job in jobs]
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(frames)
