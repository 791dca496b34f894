"""Self-describing guest page content: what the guest workload writes and its self-check expects.

Every page the guest writes carries a 32-byte header and a body:

======  =====  ==============================================================
offset  size   field
======  =====  ==============================================================
0       8      magic ``b"MIGDPAGE"``
8       8      GPA the page was written for (u64 LE)
16      4      version: how many times the guest wrote this page (u32 LE, >= 1)
20      4      kind: 1 = written as private (C-bit set), 2 = written as shared
24      8      seed tag: 8 bytes derived from the workload seed
32      4064   body: a pure function of (gpa, version, seed)
======  =====  ==============================================================

A page whose version is 0 was never written and must read as zeros.

The body is AES-128-ECB over counter blocks ``(gpa u64, version u32, block u32)`` under a key
derived from the seed — AES-CTR with a per-page counter, computed for a whole run of pages in one
bulk ``update_into`` call (docs/design.md §10 "Performance rules": runs of pages, never a Python
loop per page). Because it is a PRF of the address, a page moved to another GPA, replayed from an
older version, or sent through the wrong routing can never pass for the expected content by
accident.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from migd.abi import PAGE_SIZE

PAGE_MAGIC = b"MIGDPAGE"
HEADER_SIZE = 32
MAX_VERSION = (1 << 31) - 1  # the ledger keeps versions in 31 bits (bit 31 is the view)
MAX_SEED = (1 << 64) - 1

_MAGIC_U64 = int.from_bytes(PAGE_MAGIC, "little")
_BLOCKS_PER_PAGE = PAGE_SIZE // 16
_CHUNK_PAGES = 1024  # 4 MiB of counter blocks per bulk AES call: fits in L2/L3, measured ~1.4 GB/s
_U64_PER_PAGE = PAGE_SIZE // 8


class PageKind(enum.IntEnum):
    """How a page was written: through the encryption engine (private) or raw (shared)."""

    PRIVATE = 1
    SHARED = 2


@dataclass(frozen=True)
class PageHeaders:
    """The parsed headers of an array of pages (one entry per page)."""

    magic_ok: npt.NDArray[np.bool_]
    gpa: npt.NDArray[np.uint64]
    version: npt.NDArray[np.uint32]
    kind: npt.NDArray[np.uint32]
    seed_tag: npt.NDArray[np.uint64]


def _as_pages(pages: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    if pages.dtype != np.uint8 or pages.ndim != 2 or pages.shape[1] != PAGE_SIZE:
        raise ValueError(f"expected a (n, {PAGE_SIZE}) uint8 array of pages, got {pages.dtype} {pages.shape}")
    if not pages.flags.c_contiguous:
        raise ValueError("the page array must be C-contiguous")
    return pages


def parse_headers(pages: npt.NDArray[np.uint8]) -> PageHeaders:
    """Parse the header of every page of a ``(n, PAGE_SIZE)`` uint8 array (vectorized)."""
    pages = _as_pages(pages)
    words = pages.view("<u8")
    halves = pages.view("<u4")
    return PageHeaders(
        magic_ok=words[:, 0] == _MAGIC_U64,
        gpa=words[:, 1].astype(np.uint64),
        version=halves[:, 4].astype(np.uint32),
        kind=halves[:, 5].astype(np.uint32),
        seed_tag=words[:, 3].astype(np.uint64),
    )


def pages_equal(a: npt.NDArray[np.uint8], b: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """Per-page equality of two ``(n, PAGE_SIZE)`` arrays (compared as u64 words)."""
    a = _as_pages(a)
    b = _as_pages(b)
    if a.shape != b.shape:
        raise ValueError(f"page arrays differ in shape: {a.shape} vs {b.shape}")
    return np.all(a.view(np.uint64) == b.view(np.uint64), axis=1)


class PageContent:
    """Generator of the expected content of pages for one workload seed."""

    def __init__(self, seed: int) -> None:
        if not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be a u64 (0..{MAX_SEED}), got {seed}")
        self.seed = seed
        digest = hashlib.sha256(b"migd page content v1" + seed.to_bytes(8, "little")).digest()
        self._key = digest[:16]
        self.seed_tag = int.from_bytes(digest[16:24], "little")
        template = np.zeros((1, _BLOCKS_PER_PAGE, 2), dtype=np.uint64)
        template[0, :, 1] = np.arange(_BLOCKS_PER_PAGE, dtype=np.uint64) << np.uint64(32)
        self._template = template

    def generate(
        self,
        gpas: npt.ArrayLike,
        versions: npt.ArrayLike,
        kinds: npt.ArrayLike,
        out: npt.NDArray[np.uint8] | None = None,
    ) -> npt.NDArray[np.uint8]:
        """The content of pages at ``gpas`` with ``versions`` written as ``kinds``.

        ``gpas``, ``versions``, ``kinds`` are equal-length 1-D arrays (``kinds`` may be a single
        :class:`PageKind`). Pages of version 0 come out as zeros. Returns a ``(n, PAGE_SIZE)``
        uint8 array (``out`` if given).
        """
        gpa_arr = np.asarray(gpas, dtype=np.uint64).reshape(-1)
        n = gpa_arr.shape[0]
        ver_arr = np.broadcast_to(np.asarray(versions, dtype=np.uint64), (n,))
        kind_arr = np.broadcast_to(np.asarray(kinds, dtype=np.uint32), (n,))
        if np.any(gpa_arr & np.uint64(PAGE_SIZE - 1)):
            raise ValueError("every gpa must be page aligned")
        if n and int(ver_arr.max()) > MAX_VERSION:
            raise ValueError(f"versions must be <= {MAX_VERSION}, got {int(ver_arr.max())}")
        if n and not np.all((kind_arr == PageKind.PRIVATE) | (kind_arr == PageKind.SHARED)):
            raise ValueError(f"kinds must be {int(PageKind.PRIVATE)} or {int(PageKind.SHARED)}")
        if out is None:
            out = np.empty((n, PAGE_SIZE), dtype=np.uint8)
        else:
            _as_pages(out)
            if out.shape[0] != n:
                raise ValueError(f"out holds {out.shape[0]} pages, {n} requested")
        for start in range(0, n, _CHUNK_PAGES):
            stop = min(n, start + _CHUNK_PAGES)
            self._fill_chunk(gpa_arr[start:stop], ver_arr[start:stop], kind_arr[start:stop], out[start:stop])
        return out

    def generate_run(
        self, gpa: int, versions: npt.ArrayLike, kinds: npt.ArrayLike, out: npt.NDArray[np.uint8] | None = None
    ) -> npt.NDArray[np.uint8]:
        """Content of a contiguous run of pages starting at ``gpa`` (one version per page)."""
        ver_arr = np.asarray(versions, dtype=np.uint64).reshape(-1)
        gpas = np.uint64(gpa) + np.arange(ver_arr.shape[0], dtype=np.uint64) * np.uint64(PAGE_SIZE)
        return self.generate(gpas, ver_arr, kinds, out=out)

    def _fill_chunk(
        self,
        gpas: npt.NDArray[np.uint64],
        versions: npt.NDArray[np.uint64],
        kinds: npt.NDArray[np.uint32],
        out: npt.NDArray[np.uint8],
    ) -> None:
        n = gpas.shape[0]
        counters = np.empty((n, _BLOCKS_PER_PAGE, 2), dtype=np.uint64)
        offsets = np.empty((n, 1, 2), dtype=np.uint64)
        offsets[:, 0, 0] = gpas
        offsets[:, 0, 1] = versions
        np.add(self._template, offsets, out=counters)
        # update_into wants room for one extra block minus a byte; ECB keeps no state between
        # calls, so a fresh encryptor per chunk costs only its setup (microseconds).
        keystream = bytearray(n * PAGE_SIZE + 15)
        encryptor = Cipher(algorithms.AES(self._key), modes.ECB()).encryptor()
        encryptor.update_into(counters.reshape(-1).view(np.uint8), keystream)
        out[:] = np.frombuffer(keystream, dtype=np.uint8, count=n * PAGE_SIZE).reshape(n, PAGE_SIZE)
        words = out.view("<u8")
        halves = out.view("<u4")
        words[:, 0] = _MAGIC_U64
        words[:, 1] = gpas
        halves[:, 4] = versions.astype(np.uint32)
        halves[:, 5] = kinds
        words[:, 3] = self.seed_tag
        never_written = versions == 0
        if np.any(never_written):
            out[never_written] = 0

    def body_matches(
        self, pages: npt.NDArray[np.uint8], gpas: npt.ArrayLike, versions: npt.ArrayLike, kinds: npt.ArrayLike
    ) -> npt.NDArray[np.bool_]:
        """Per page: does ``pages`` equal the content generated for (gpas, versions, kinds)?"""
        pages = _as_pages(pages)
        expected = self.generate(gpas, versions, kinds)
        return pages_equal(pages, expected)
