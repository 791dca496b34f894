"""Splitting a range of guest pages into the runs the stream sends: private, shared, zero.

A page is routed by the shared-page bitmap *as it is when the page is read* (docs/design.md §8
"Invariants", 2), so callers classify and read a chunk in one synchronous step. Never-populated
pages (raw bytes all zero) of either kind go as zero markers, as QEMU does with zero pages;
holes of the sparse RAM file are known to be zero without reading them
(:meth:`GuestRam.nonzero_pages`).
All of it is vectorized: a chunk costs a handful of numpy calls, never a loop per page.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

from migd.bitmap import PageBitmap
from migd.platform.memory import GuestRam

#: Pages classified and read in one step, so at most one frame per run of one kind: 2 MiB, the
#: largest run a frame may carry (wire.MAX_RUN_PAGES). Per-frame work (msgpack, CRC set-up,
#: firmware call overhead, one worker hand-off at the destination) is paid half as often as
#: with 1 MiB; one step holds the event loop ~2-4 ms.
CHUNK_PAGES = 512
#: Pages of a hole of the sparse RAM file sent in one step (as zero runs, never read): 128 MiB,
#: 64 frames of ``wire.MAX_RUN_PAGES``, well under a millisecond of event-loop time.
HOLE_STEP_PAGES = 32768


class PageKind(enum.Enum):
    """How a run of pages travels."""

    PRIVATE = "private"
    SHARED = "shared"
    ZERO = "zero"


class PageRun(NamedTuple):
    kind: PageKind
    first: int
    count: int


def _runs_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the runs of equal values in a small 1-D array."""
    edges = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate(([0], edges))
    ends = np.concatenate((edges, [len(values)]))
    return starts, ends - starts


def classify(shared_bitmap: PageBitmap, ram: GuestRam, first: int, count: int) -> list[PageRun]:
    """The runs of ``[first, first + count)`` by kind, in ascending order (count ≤ a few chunks)."""
    if count <= 0:
        return []
    nonzero = ram.nonzero_pages(first << 12, count)
    shared = np.zeros(count, dtype=bool)
    starts, lengths = shared_bitmap.extent_arrays(True, first, count)
    for start, length in zip(starts.tolist(), lengths.tolist()):
        shared[start - first : start - first + length] = True
    # 0 = zero page, 1 = private, 2 = shared
    kinds = np.where(nonzero, np.where(shared, 2, 1), 0).astype(np.int8)
    run_starts, run_lengths = _runs_of(kinds)
    names = (PageKind.ZERO, PageKind.PRIVATE, PageKind.SHARED)
    return [
        PageRun(names[kinds[s]], first + s, n)
        for s, n in zip(run_starts.tolist(), run_lengths.tolist())
    ]


def chunks(starts: np.ndarray, counts: np.ndarray, chunk_pages: int = CHUNK_PAGES) -> Iterator[tuple[int, int]]:
    """Cut extents into pieces of at most ``chunk_pages`` (the unit read and sent in one step)."""
    for start, count in zip(starts.tolist(), counts.tolist()):
        end = start + count
        while start < end:
            n = min(chunk_pages, end - start)
            yield start, n
            start += n


#: A migration over several connections keeps the first for the control frames and stripes guest
#: memory over the others by GPA: stripe ``k`` (pages ``[k * STRIPE_PAGES, (k + 1) *
#: STRIPE_PAGES)``) always goes on connection ``1 + k % (connections - 1)``. A page therefore
#: always travels on the same connection, so its versions (one per round) arrive in the order they
#: were sent, whatever the other connections do; one stripe is one chunk, so a step classifies and
#: reads pages of one connection only. No page goes on the first connection, whose frames both
#: event loops handle: every page frame is its connection's thread's, on both ends.
STRIPE_PAGES = CHUNK_PAGES


def lane_of(page: int, connections: int) -> int:
    """The connection (lane) that carries ``page``: the first with one, a further one with several."""
    return 1 + (page // STRIPE_PAGES) % (connections - 1) if connections > 1 else 0


def stripe_end(page: int, connections: int) -> int:
    """The first page after ``page`` that may go on another connection (no limit with one)."""
    return (page // STRIPE_PAGES + 1) * STRIPE_PAGES if connections > 1 else 1 << 62


def in_lane(first: int, npages: int, lane: int, connections: int) -> bool:
    """Whether the run ``[first, first + npages)`` lies in one stripe of connection ``lane``."""
    if connections <= 1:
        return lane == 0
    return npages > 0 and lane_of(first, connections) == lane and first + npages <= stripe_end(first, connections)
