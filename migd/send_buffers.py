"""Reusable payload buffers for outgoing page frames, recycled by stream position.

The source hands each page frame's payload (a SEND_UPDATE_DATA ciphertext, a copy of a
shared run) to the transport without copying it, and the transport may keep a reference
until the kernel has taken the bytes. A fresh buffer per frame is the simple answer, but a
buffer of a few hundred KiB comes from ``mmap`` or a heap top that glibc keeps trimming:
every frame then pays zero-filled page faults (measured on the 2-core VM: ~80,000 minor faults
per GiB migrated, 50 % private, about 5 % of the source's CPU).

This ring lends regions of one preallocated buffer instead. A region is handed out again only
once the stream has consumed the frame it went into: ``consumed`` = bytes written so far minus
bytes still in the transport's buffer (uvloop counts libuv's unwritten bytes and its own queue;
asyncio's selector transport copies what it cannot send at once). Until then the region is
live and no other frame gets it. When the ring is full (a stalled link holds more than it),
:meth:`SendRing.take` returns None and the caller allocates a fresh buffer, as before.

A pipelined ring (``pipelined=True``, one connection of several, migd/send_lane.py) lends
several regions before the first is placed: the frames that carry them are queued (a private
run waits for its sealing thread) and placed in the order the regions were taken.

Sans-I/O: the caller passes stream positions; nothing here touches a socket.
"""

from __future__ import annotations

import collections
from typing import NamedTuple

from migd.errors import MigdError


class SendRingError(MigdError):
    """The ring was used out of order (a bug in the caller, never the peer's doing)."""


class _Region(NamedTuple):
    start: int  # offset in the ring
    end: int
    stream_end: int  # the stream position after the frame that carries it


class SendRing:
    """Regions of one buffer, lent to outgoing frames until the stream has sent them."""

    def __init__(self, capacity: int, *, pipelined: bool = False) -> None:
        """``capacity`` bytes, allocated once (at least one region must fit); ``pipelined``: several
        regions may be taken before the first is placed (in that order)."""
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self._buffer = bytearray(capacity)
        self._view = memoryview(self._buffer)
        self._live: collections.deque[_Region] = collections.deque()
        self._head = 0  # where the next region starts, if it fits
        self._pipelined = pipelined
        self._taken: collections.deque[tuple[int, int]] = collections.deque()  # lent, not yet placed, oldest first
        self.lent = 0  # regions lent so far (for tests and benchmarks)
        self.refused = 0  # requests that found no room

    @property
    def capacity(self) -> int:
        """The ring's size in bytes."""
        return len(self._buffer)

    def live_regions(self) -> list[tuple[int, int]]:
        """(start, end) of every region the stream may still read, oldest first."""
        return [(r.start, r.end) for r in self._live] + list(self._taken)

    def take(self, nbytes: int, consumed: int) -> memoryview | None:
        """A writable view of ``nbytes`` that no unsent frame uses, or None if none is free.

        ``consumed`` is how far the stream has been consumed (bytes that left the transport's
        buffer); regions of frames that ended at or before it are free again. Every region
        taken must be :meth:`placed` before the next :meth:`take` (a pipelined ring: in the
        order taken).
        """
        if self._taken and not self._pipelined:
            raise SendRingError("take() before the previous region was placed in the stream")
        if nbytes <= 0 or nbytes > len(self._buffer):
            self.refused += 1
            return None
        self._retire(consumed)
        start = self._fit(nbytes)
        if start is None:
            self.refused += 1
            return None
        self._taken.append((start, start + nbytes))
        self._head = start + nbytes
        self.lent += 1
        return self._view[start : start + nbytes]

    def placed(self, stream_end: int) -> None:
        """The region taken first (of those not placed yet) went into the frame that ends at
        stream position ``stream_end``."""
        if not self._taken:
            raise SendRingError("placed() without a region taken")
        if self._live and stream_end < self._live[-1].stream_end:
            raise SendRingError(
                f"stream position went back: {stream_end} after {self._live[-1].stream_end}"
            )
        self._live.append(_Region(*self._taken.popleft(), stream_end))

    def release(self) -> None:
        """Give back the region taken last, unused (the frame was never written)."""
        if self._taken:
            self._head = self._taken.pop()[0]

    def _retire(self, consumed: int) -> None:
        live = self._live
        while live and live[0].stream_end <= consumed:
            live.popleft()
        if not live and not self._taken:
            self._head = 0  # everything sent: start over at the front, the largest free span

    def _fit(self, nbytes: int) -> int | None:
        """Where ``nbytes`` fit, given the live regions [oldest.start, head) in ring order."""
        capacity, head = len(self._buffer), self._head
        if not self._live and not self._taken:
            return 0  # _retire started over at the front
        tail = self._live[0].start if self._live else self._taken[0][0]
        if tail < head:
            # The live span [tail, head) does not wrap: free are [head, capacity) and [0, tail).
            if head + nbytes <= capacity:
                return head
            return 0 if nbytes <= tail else None
        # It wraps (head <= tail; equal when full): free is [head, tail).
        return head if head + nbytes <= tail else None
