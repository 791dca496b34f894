"""Progress and statistics of one migration: the REST migration object (docs/design.md §9).

Bytes, on both ends and in every statistic (``bytes.transferred``, ``bytes_by_kind``, the
``migd_migration_bytes_total`` metric), are *page-frame bytes*: every byte of each
PRIVATE_PAGES, SHARED_PAGES and ZERO_PAGES frame, from its length prefix to its CRC
(docs/protocol.md: prefix, msgpack metadata with a private run's 52-byte transport header,
payload, CRC). Control frames, TLS and TCP are not counted. The source counts the frames it
writes, the destination the frames it places, so both report the same number for one migration.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack

from migd import wire
from migd.abi import PAGE_SIZE, MiB
from migd.migration_state import MigrationPhase, MigrationStatus
from migd.page_runs import PageKind


def page_frame_bytes(msg: wire.PrivatePages | wire.SharedPages | wire.ZeroPages) -> int:
    """Size of a page frame as the stream codec (migd/wire.py ``FrameEncoder``) frames it.

    The destination counts with this: the decoder hands over messages, not frame sizes. For a
    migd source it is the size of the frame that arrived; a peer that pads its metadata
    (non-minimal msgpack) is counted at the size migd would have sent, never more.
    """
    meta = msgpack.packb(msg.to_meta(), use_bin_type=True)
    payload = getattr(msg, "payload", b"")
    return wire.PREFIX_SIZE + len(meta) + len(payload) + wire.CRC_SIZE



@dataclass
class MigrationProgress:
    """Counters a migration updates as it goes; ``to_json`` renders the REST object."""

    guest: str
    role: str  # "source" | "destination"
    destination: str
    npages: int
    phase: MigrationPhase = field(default_factory=lambda: MigrationPhase(started_at=time.monotonic()))
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    rounds: int = 0
    bytes_transferred: int = 0
    remaining_pages: int = 0
    pages: dict[PageKind, int] = field(default_factory=lambda: {k: 0 for k in PageKind})
    bytes_by_kind: dict[PageKind, int] = field(default_factory=lambda: {k: 0 for k in PageKind})
    throughput_bps: float = 0.0
    expected_downtime_ms: float | None = None
    downtime_ms: float | None = None
    throttle_percent: int = 0
    #: SHA-256 of the final shared-page bitmap sent (source) or installed (destination).
    shared_bitmap_sha256: str | None = None
    #: Destination role: where the guest came from (the source's migration listener, else its address).
    source: str | None = None

    def __post_init__(self) -> None:
        self.remaining_pages = self.npages

    @property
    def status(self) -> MigrationStatus:
        return self.phase.status

    def count_run(self, kind: PageKind, npages: int, wire_bytes: int) -> None:
        """Account one run sent or placed; ``wire_bytes``: its whole page frame (see the module doc)."""
        self.pages[kind] += npages
        self.bytes_by_kind[kind] += wire_bytes
        self.bytes_transferred += wire_bytes

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        """The REST migration object."""
        now = time.monotonic() if now is None else now
        total_ms = self.phase.total_time_ms(now)
        average = self.bytes_transferred / (total_ms / 1000.0) if total_ms > 0 else 0.0
        rate = self.throughput_bps if not self.status.finished else average
        return {
            "id": self.id,
            "guest": self.guest,
            "role": self.role,
            "status": self.status.value,
            "destination": self.destination,
            "source": self.source,
            "rounds": self.rounds,
            "bytes": {
                "transferred": self.bytes_transferred,
                "remaining": self.remaining_pages * PAGE_SIZE,
                "total": self.npages * PAGE_SIZE,
            },
            "pages": {k.value: v for k, v in self.pages.items()},
            "throughput_mib_s": round(rate / MiB, 2),
            "expected_downtime_ms": None if self.expected_downtime_ms is None else round(self.expected_downtime_ms, 1),
            "downtime_ms": None if self.downtime_ms is None else round(self.downtime_ms, 1),
            "total_time_ms": round(total_ms, 1),
            "error": self.phase.error,
        }
