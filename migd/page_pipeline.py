"""The destination's page pipeline: page frames placed in stream order beside the event loop.

Each private-page frame's payload is copied out of the receive buffer into one of a few reusable
buffers and handed, in order, to one worker thread, which runs the handler (RECEIVE_UPDATE_DATA
and the write into guest RAM; both release the GIL). A zero or shared run with nothing queued
ahead of it is placed at once on the loop (a marker, one pwrite: cheaper than the copy and the
hand-off); behind a queued frame it goes to the worker too, so frames are always placed in
stream order. A control message that arrives while frames wait is held behind them and
delivered once they are placed: a control frame (ROUND_END, PING, VCPU_STATE, PREPARE) always
finds the pages sent before it in place. At most :data:`PIPELINE_DEPTH` frames wait for the
worker; past that the owner stops reading (TCP back-pressure reaches the source) until the worker is
down to :data:`RESUME_DEPTH`. A frame the
handler refuses ends the pipeline: the owner refuses the stream, frames queued behind it are
never handled.

The owner is the stream (:class:`migd.stream.FrameProtocol`), seen through :class:`PipelineOwner`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple, Protocol

from migd import wire
from migd.abi import PAGE_SIZE

PageFrame = wire.PrivatePages | wire.SharedPages | wire.ZeroPages
PageHandler = Callable[[PageFrame], None]

#: Page frames handed to the worker thread and not yet handled, before reading pauses. Each
#: holds one buffer of at most a frame's payload (2 MiB): 4 bound the pipeline to ~8 MiB and
#: keep the worker busy while the loop receives the next frame.
PIPELINE_DEPTH = 4
#: Frames left with the worker when reading resumes after a pause. Resuming at the first free
#: slot paused and resumed the stream once per frame when the worker is the slower side (the
#: common case: RECEIVE_UPDATE_DATA costs more than receiving), each time an eventfd wake-up
#: from the worker, two epoll_ctl calls and GIL hand-offs; half the depth still leaves the
#: worker two frames (~6 ms of private pages) while the loop receives the next ones.
RESUME_DEPTH = PIPELINE_DEPTH // 2
_PAYLOAD_BUFFER = wire.MAX_RUN_PAGES * PAGE_SIZE
#: Free payload buffers kept for reuse: a receive can bring a few frames past PIPELINE_DEPTH
#: before reading pauses, and each needs one.
_POOLED_BUFFERS = PIPELINE_DEPTH + 4


class PipelineOwner(Protocol):
    """What the pipeline needs of the stream that feeds it (all called on the event loop)."""

    def deliver(self, msg: wire.Message) -> None:
        """A control message whose earlier page frames are all placed."""

    def refuse(self, exc: BaseException) -> None:
        """A page frame was refused: the stream is over."""

    def set_reading(self, reading: bool) -> None:
        """Pause (False) or resume (True) reading from the peer."""

    def touch(self) -> None:
        """Page frames were placed: the stream is alive (idle deadlines)."""


class _PendingPages(NamedTuple):
    """One page frame in the worker's hands: its future and the buffer its payload occupies."""

    future: Future[None]
    buffer: bytearray | None


class PagePipeline:
    """Places one stream's page frames, in order; ``threaded=False`` places each on the loop at once."""

    def __init__(self, handler: PageHandler, owner: PipelineOwner, loop: asyncio.AbstractEventLoop | None, *,
                 threaded: bool = True) -> None:
        self._on_pages = handler
        self._owner = owner
        self._loop = loop
        self._threaded = threaded
        self._executor: ThreadPoolExecutor | None = None
        # Frames with the worker, and control messages held back behind them, in arrival order.
        self._backlog: collections.deque[_PendingPages | wire.Message] = collections.deque()
        self._pending_pages = 0
        self._held_messages = 0
        self._wake_loop = False  # the loop waits for the worker (see _page_done)
        # Frames handed to the worker, and those whose future is done (counted by _page_done,
        # which runs once per frame, in order: in the worker, or on the loop for a frame done
        # before its callback was added, when the worker has nothing newer); the loop is woken
        # once _finished reaches _wake_at.
        self._submitted = 0
        self._finished = 0
        self._wake_at = 0
        self._pipeline_stopped = False  # a frame failed or the stream ended: the worker stops
        self._ended = False  # stop() was called: nothing more is delivered
        self._buffers: list[bytearray] = []
        self.reading_paused = False

    def hold(self, msg: wire.Message) -> bool:
        """Hold a control message behind the frames queued before it; False if none are (deliver it now)."""
        if not self._backlog:
            return False
        self._backlog.append(msg)
        self._held_messages += 1
        return True

    def page_frame(self, msg: PageFrame) -> None:
        """One page frame, in stream order (on the loop): placed now (inline) or queued for the worker."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()  # the worker's wake-ups go to the loop feeding us
        if self._backlog:
            # Frames the worker finished are retired lazily: take them (and their buffers) back
            # first. A new 2 MiB buffer costs an mmap, zero-filled page faults and later a
            # munmap (~100 us a frame, measured, where the copy itself is ~20 us).
            self._retire_done()
        if not self._threaded or (not self._backlog and not isinstance(msg, wire.PrivatePages)):
            # Inline: nothing is queued ahead (or no pipeline), so order holds; the payload
            # view is valid only during this call. A zero run or a shared one (one pwrite) costs
            # less here than its copy and the hand-off to the worker; RECEIVE_UPDATE_DATA's
            # crypto is what the worker overlaps with receiving.
            self._on_pages(msg)
            return
        buffer: bytearray | None = None
        if not isinstance(msg, wire.ZeroPages):
            # The payload lives in the receive buffer, which the next read overwrites: copy it
            # into a reusable buffer (~0.1 ms per MiB) for the worker.
            n = len(msg.payload)
            buffer = self._buffers.pop() if self._buffers else bytearray(max(n, _PAYLOAD_BUFFER))
            if len(buffer) < n:
                buffer = bytearray(n)
            view = memoryview(buffer)[:n]
            view[:] = msg.payload
            msg = dataclasses.replace(msg, payload=view)
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="migd-pages")
        future = self._executor.submit(self._run_page, self._on_pages, msg)
        self._backlog.append(_PendingPages(future, buffer))
        self._pending_pages += 1
        self._submitted += 1
        future.add_done_callback(self._page_done)

    def _run_page(self, handler: PageHandler, msg: PageFrame) -> None:
        """Worker thread: handle one frame, unless an earlier one failed or the stream ended.

        The flag is set here, at once: the loop hears of a failure only later, and the frames
        queued behind a refused one must never reach guest RAM.
        """
        if self._pipeline_stopped:
            return
        try:
            handler(msg)
        except BaseException:
            self._pipeline_stopped = True
            raise

    def _page_done(self, future: Future[None]) -> None:
        """Worker thread (or the loop, if already done): wake the loop if it waits for this.

        Only then: each wake-up costs the worker a GIL hand-off and the loop a self-pipe
        round trip, and while frames stream in the loop collects finished work by itself
        (``buffer_updated``). It waits when reading is paused, when a control message is held
        behind page frames, and always hears of a failure at once.
        """
        self._finished += 1
        failed = not future.cancelled() and future.exception() is not None
        loop = self._loop
        if not ((self._wake_loop and self._finished >= self._wake_at) or failed) or loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self.collect)
        except RuntimeError:  # the loop closed meanwhile: nobody is waiting any more
            pass

    def _retire_done(self) -> None:
        """Retire the frames at the head of the backlog that the worker handled successfully.

        Their buffers go back to the pool. A failed or cancelled frame, or a control message,
        stops it: :meth:`collect` deals with those.
        """
        backlog = self._backlog
        while backlog:
            head = backlog[0]
            if not (isinstance(head, _PendingPages) and head.future.done()) or head.future.cancelled():
                return
            if head.future.exception() is not None:
                return
            backlog.popleft()
            self._pending_pages -= 1
            if head.buffer is not None and len(self._buffers) < _POOLED_BUFFERS:
                self._buffers.append(head.buffer)
            self._owner.touch()

    def collect(self) -> None:
        """On the loop: retire handled page frames in order, deliver control messages behind them."""
        while not self._ended:
            while self._backlog:
                self._retire_done()
                if not self._backlog:
                    break
                head = self._backlog[0]
                if isinstance(head, _PendingPages):
                    if not head.future.done():
                        break
                    if not head.future.cancelled() and head.future.exception() is None:
                        # The worker finished it after _retire_done looked (the GIL can change
                        # hands between the two checks): a success, retired on the next pass.
                        continue
                    # Cancelled or failed.
                    self._backlog.popleft()
                    self._pending_pages -= 1
                    if head.future.cancelled():
                        continue
                    exc = head.future.exception()
                    assert exc is not None  # successes are retired above
                    self._owner.refuse(exc)
                    return
                else:
                    self._backlog.popleft()
                    self._held_messages -= 1
                    self._owner.deliver(head)
            self._flow_control()
            # Ask the worker for a wake-up only while the loop waits for it: at once for a held
            # control message, when it is down to RESUME_DEPTH frames for paused reading. Then
            # look once more, since those frames may have finished before the flag was set.
            self._wake_loop = bool(self._backlog) and (self.reading_paused or self._held_messages > 0)
            if not self._wake_loop:
                return
            retired = self._submitted - self._pending_pages
            self._wake_at = retired + 1 if self._held_messages else self._submitted - RESUME_DEPTH
            if self._finished < self._wake_at:
                return

    def _flow_control(self) -> None:
        """Pause reading while the worker has PIPELINE_DEPTH frames to handle; resume at RESUME_DEPTH."""
        if self._ended:
            return
        if not self.reading_paused and self._pending_pages >= PIPELINE_DEPTH:
            self.reading_paused = True
            self._owner.set_reading(False)
        elif self.reading_paused and self._pending_pages <= RESUME_DEPTH:
            self.reading_paused = False
            self._owner.set_reading(True)

    @property
    def pending(self) -> int:
        """Page frames handed to the worker and not yet retired (0 without a pipeline).

        Handled frames are retired lazily: when the next frame arrives, or at once while the
        loop waits for them (reading paused, a control message held behind them).
        """
        return self._pending_pages

    def stop(self) -> None:
        """Handle no further page frames: queued ones are cancelled, control messages dropped.

        A frame the worker is handling finishes (it cannot be interrupted); guest RAM makes a
        discard wait for its write (GuestRam.close).
        """
        self._pipeline_stopped = self._ended = True
        for item in self._backlog:
            if isinstance(item, _PendingPages):
                item.future.cancel()
        self._backlog.clear()
        self._buffers.clear()  # up to 8 x 2 MiB, written: nothing of a finished stream keeps them
        self._pending_pages = self._held_messages = 0
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
