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

A further connection (every one but the first, which carries the control frames and is the
event loop's) is a :class:`~migd.lane_socket.LaneSocket` of the lane's own: its thread writes
each frame itself, right after sealing it, in queue order (shared and zero runs go through the
thread too, in their turn), and the loop only accounts for what was written when it looks.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from migd import wire
from migd.abi import PAGE_SIZE
from migd.errors import MigdError
from migd.lane_socket import LaneSocket
from migd.page_runs import PageKind
from migd.send_buffers import SendRing

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: Payload one connection may have queued (sealing or waiting for an earlier frame), in runs of
#: at most 2 MiB: 6 MiB per connection beyond what its transport holds.
MAX_PENDING = 3
#: The largest payload of one frame.
RUN_BYTES = wire.MAX_RUN_PAGES * PAGE_SIZE
#: Frames one connection may have queued, payload or not: zero runs carry none, and a stretch of
#: holes queues 64 per step (page_runs.HOLE_STEP_PAGES), so behind a connection that does not
#: move only this keeps the queue from taking every hole of the guest (a few hundred bytes each).
MAX_QUEUED_FRAMES = 128

#: Called on the loop for each frame in its turn: (message, kind, gpa, npages, header, nbytes);
#: ``nbytes`` None: write the frame now, and return the stream position after it (its payload
#: buffer is free once the transport has sent that far); else the lane's thread wrote it
#: (``nbytes`` framed bytes): account for it only.
Written = Callable[[wire.Message, PageKind, int, int, bytes, "int | None"], int]
#: A run's job, run in the worker: its frame, or None if the run was abandoned.
Job = Callable[[], "wire.Message | None"]


class SendLaneError(MigdError):
    """Sealing or writing a queued frame failed: the migration ends."""


class _Written(NamedTuple):
    """A frame the lane's thread wrote: its bytes, and the stream position after it."""

    msg: wire.Message
    nbytes: int
    end: int


#: A job's outcome: a frame to write, one its thread wrote, or None (abandoned).
_Done = wire.Message | _Written | None


class _Queued(NamedTuple):
    future: concurrent.futures.Future[list[_Done]]  # its batch's frames (one for a ready frame)
    index: int  # its frame in that list
    kind: PageKind
    gpa: int
    npages: int
    in_ring: bool  # its payload is a region of the lane's ring (placed once the frame is written)


class SendLane:
    """The ordered queue of one connection's page frames, its sealing thread and its buffers."""

    def __init__(self, index: int, write: Written, consumed: Callable[[], int], *, transport_bytes: int,
                 max_pending: int = MAX_PENDING, socket: LaneSocket | None = None) -> None:
        """``write`` puts a ready frame on the connection and accounts for it (on the loop);
        ``consumed`` says how far the connection's transport has sent (stream position);
        ``transport_bytes``: how much its transport may hold (its write high-water mark);
        ``socket``: the connection, written by the lane's thread (None: by ``write``, on the loop)."""
        self.index = index
        self.socket = socket
        self._write = write
        self._consumed = consumed
        self._max_pending = max_pending
        self._queue: collections.deque[_Queued] = collections.deque()
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"migd-lane-{index}")
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._waiting = False  # the loop waits for this connection: a finished seal must wake it
        # What the transport may hold and the queued frames; past that (a slow link, the frame
        # being written) a payload gets a buffer of its own, as with one connection.
        self._ring: SendRing | None = SendRing(transport_bytes + max_pending * RUN_BYTES, pipelined=True)
        self._pending_bytes = 0  # payload queued and not written
        self._batch: list[Job] = []  # runs of the current step not handed to the worker yet
        self._batch_future: concurrent.futures.Future[list[_Done]] | None = None
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
        if self.socket is not None:  # the thread writes it, in its turn among the step's runs
            self._batched(lambda: msg, kind, gpa, npages, in_ring)
            return
        future: concurrent.futures.Future[list[_Done]] = concurrent.futures.Future()
        future.set_result([msg])
        self._queued(_Queued(future, 0, kind, gpa, npages, in_ring), kind is not PageKind.ZERO)
        self.pump()

    def put_private(self, job: Job, gpa: int, npages: int, in_ring: bool) -> None:
        """A private run: ``job`` (SEND_UPDATE_DATA into its buffer) runs in the worker with the
        step's other private runs (:meth:`submit`); its frame is written in its turn."""
        self._batched(job, PageKind.PRIVATE, gpa, npages, in_ring)

    def _batched(self, job: Job, kind: PageKind, gpa: int, npages: int, in_ring: bool) -> None:
        self._check()
        if self._batch_future is None:
            self._batch_future = concurrent.futures.Future()
        self._batch.append(job)
        self._queued(_Queued(self._batch_future, len(self._batch) - 1, kind, gpa, npages, in_ring),
                     kind is not PageKind.ZERO)

    def submit(self) -> None:
        """Hand the runs batched since the last call to the worker (the end of a step): the
        private ones, and with a socket of its own every one."""
        if self._batch_future is None:
            return
        batch, future = self._batch, self._batch_future
        self._batch, self._batch_future = [], None
        future.add_done_callback(self._sealed_one)
        try:
            self._worker.submit(_run_batch, batch, future, self.socket)
        except RuntimeError as exc:  # the worker was shut down: the migration is over
            future.set_exception(exc)

    def run_in_thread(self, call: Callable[[], _T]) -> asyncio.Future[_T]:
        """Run ``call`` in the lane's thread, before its frames (a further connection is opened
        there: its socket is that thread's). Cancelling the wait does not stop ``call``:
        :meth:`close` does, by shutting the socket."""
        return asyncio.wrap_future(self._worker.submit(call))

    def _queued(self, queued: _Queued, has_payload: bool) -> None:
        self._queue.append(queued)
        if has_payload:
            self._pending_bytes += queued.npages * PAGE_SIZE

    @property
    def crowded(self) -> bool:
        """As many frames queued as :data:`MAX_QUEUED_FRAMES`: :meth:`room` would wait."""
        return len(self._queue) >= MAX_QUEUED_FRAMES

    async def room(self, timeout: float) -> None:
        """Wait until another step's runs may be queued (TimeoutError after ``timeout``)."""
        await self._wait_until(lambda: self._pending_bytes < self._max_pending * RUN_BYTES and not self.crowded,
                               timeout)

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
        (one chunk's runs, milliseconds) finishes first: none reads guest RAM after this.
        A further connection's socket is shut first (a write or a connect under way in its thread
        fails at once: none waits on the peer) and closed once the thread is done."""
        for queued in self._queue:
            queued.future.cancel()
        self._queue.clear()
        self._batch.clear()
        if self.socket is not None:
            self.socket.shutdown()
        self._worker.shutdown(wait=True, cancel_futures=True)
        if self.socket is not None:
            self.socket.close()
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
                done = queued.future.result()[queued.index]
                if done is None:  # abandoned: nothing to write; its ring region is free at once
                    self.abandoned += 1
                    end = self._last_end
                elif isinstance(done, _Written):  # the lane's thread wrote it: account for it
                    self._write(done.msg, queued.kind, queued.gpa, queued.npages, _header(done.msg), done.nbytes)
                    end = self._last_end = done.end
                else:
                    end = self._last_end = self._write(done, queued.kind, queued.gpa, queued.npages, _header(done), None)
            except concurrent.futures.CancelledError:
                continue
            except Exception as exc:  # the job (firmware) or the write (stream) failed: the migration ends
                self.error = exc
                break
            if queued.in_ring and self._ring is not None:
                self._ring.placed(end)
        self._changed.set()


def _header(msg: wire.Message) -> bytes:
    return msg.header if isinstance(msg, wire.PrivatePages) else b""


def _run_batch(jobs: list[Job], future: concurrent.futures.Future[list[_Done]], socket: LaneSocket | None) -> None:
    """The worker: one step's runs, in order (their sequence numbers follow); with a socket,
    each frame is written as soon as it is sealed."""
    if not future.set_running_or_notify_cancel():
        return
    try:
        frames: list[_Done] = []
        for job in jobs:
            msg = job()
            if msg is not None and socket is not None:
                frames.append(_Written(msg, socket.write(msg), socket.bytes_sent))
            else:
                frames.append(msg)
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(frames)
