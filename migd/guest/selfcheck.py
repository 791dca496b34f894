"""The guest's self-check: read every page the way the guest sees it and compare with what it wrote.

The kernel region (:mod:`migd.guest.guest_layout`) holds the boot-parameter page and the ledger (the
guest's own view of every page and how often it wrote it); :mod:`migd.guest.page_content` defines
what a page of a given (gpa, version) must contain. The check reads the ledger from guest RAM
through the C-bit (so on a destination it checks what migrated), then every other page under
the ledger's view — private pages through the memory-encryption engine, shared pages raw —
and compares whole chunks of pages with the generated expected content in a few numpy
operations. Only mismatching pages are classified:

* ``nonzero never-written page``: the ledger says version 0 (never written), the page is not zero;
* ``from another gpa X``: a valid page, but written for another address (moved or swapped);
* ``stale version v<expected``: a valid page of this address, but an older write (replayed/lost);
* ``misrouted``: garbage under the guest's view, correct under the other routing (a shared
  page that went through the encryption engine, or the reverse);
* ``corrupted``: anything else (tampered ciphertext, wrong key, garbage).

Callable in-process on a GuestRam plus the VEK (tests, a destination check) with
:func:`check_memory`, or chunk by chunk from the agent's event loop with :func:`iter_check`.
"""

from __future__ import annotations

import enum
import hashlib
from collections import Counter
from collections.abc import Generator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from migd.abi import PAGE_SHIFT, PAGE_SIZE
from migd.errors import GuestMemoryError
from migd.guest.guest_layout import LEDGER_SHARED, LEDGER_VERSION_MASK, GuestLayout, KernelHeader
from migd.platform.memory import GuestRam, MemoryEncryption, true_runs
from migd.guest.page_content import MAX_VERSION, PageContent, PageKind, pages_equal, parse_headers

DEFAULT_CHUNK_PAGES = 1024  # 4 MiB per chunk: big enough for bulk crypto, small enough for the cache
DEFAULT_MAX_SAMPLES = 16
MAX_CLASSIFIED = 4096  # classify at most this many bad pages (each costs a page generation)


class ErrorKind(enum.Enum):
    """Why a page failed the self-check."""

    KERNEL = "kernel"
    CORRUPTED = "corrupted"
    MISROUTED = "misrouted"
    FOREIGN_GPA = "from another gpa"
    STALE = "stale version"
    NEVER_WRITTEN = "nonzero never-written page"
    UNCLASSIFIED = "unclassified"


@dataclass(frozen=True)
class PageError:
    """One bad page: where, why, and the details (found gpa, versions, routing)."""

    pfn: int
    kind: ErrorKind
    detail: str

    def __str__(self) -> str:
        return f"gpa {self.pfn << PAGE_SHIFT:#x}: {self.detail}"


@dataclass(frozen=True)
class CheckResult:
    """Outcome of a self-check: pages examined, bad pages, and the first one described."""

    pages_verified: int
    errors: int
    first_error: str | None
    by_kind: Mapping[str, int] = field(default_factory=dict)
    samples: tuple[PageError, ...] = ()

    @property
    def ok(self) -> bool:
        """True when every page read as expected."""
        return self.errors == 0

    def report(self) -> dict[str, Any]:
        """The channel ``report`` body (kind "check") / ``check`` response fields."""
        return {"pages_verified": self.pages_verified, "errors": self.errors, "first_error": self.first_error}


def read_kernel_header(ram: GuestRam, engine: MemoryEncryption) -> KernelHeader:
    """Decrypt and parse the boot-parameter page (pfn 0); GuestMemoryError if unreadable."""
    header = KernelHeader.decode(engine.read_private(ram, 0, 1))
    if header.layout.npages != ram.npages:
        raise GuestMemoryError(
            f"kernel header describes {header.layout.npages} pages, guest RAM has {ram.npages}"
        )
    return header


def read_ledger(ram: GuestRam, engine: MemoryEncryption, layout: GuestLayout) -> npt.NDArray[np.uint32]:
    """The ledger as stored in guest RAM: one u32 per guest page (a fresh array)."""
    plain = engine.read_private(ram, layout.ledger.gpa, layout.ledger.npages)
    return np.frombuffer(plain, dtype="<u4", count=layout.npages).astype(np.uint32)


def ledger_digest(ledger: npt.NDArray[np.uint32]) -> bytes:
    """SHA-256 of the ledger entries (little-endian u32), carried in the exported vCPU state."""
    return hashlib.sha256(np.ascontiguousarray(ledger, dtype="<u4").tobytes()).digest()


def _view_name(shared: bool) -> str:
    return "shared" if shared else "private"


def _consistent(page: npt.NDArray[np.uint8], content: PageContent) -> tuple[int, int, int] | None:
    """(gpa, version, kind) if ``page`` is exactly a page this seed's workload wrote, else None."""
    head = parse_headers(page[None, :])
    gpa, version, kind = int(head.gpa[0]), int(head.version[0]), int(head.kind[0])
    if not head.magic_ok[0] or int(head.seed_tag[0]) != content.seed_tag:
        return None
    if gpa % PAGE_SIZE or not 1 <= version <= MAX_VERSION or kind not in (PageKind.PRIVATE, PageKind.SHARED):
        return None
    if not content.body_matches(page[None, :], [gpa], [version], [kind])[0]:
        return None
    return gpa, version, kind


def classify_page(
    pfn: int,
    version: int,
    shared: bool,
    actual: npt.NDArray[np.uint8],
    other: npt.NDArray[np.uint8],
    content: PageContent,
) -> PageError:
    """Why page ``pfn`` (ledger: ``version``, viewed ``shared``) does not read as expected.

    ``actual`` is the page read under the guest's view, ``other`` under the other routing.
    """
    view = _view_name(shared)
    gpa = pfn << PAGE_SHIFT
    if version == 0:
        return PageError(pfn, ErrorKind.NEVER_WRITTEN, f"nonzero never-written page (viewed {view})")
    found = _consistent(actual, content)
    if found is not None:
        found_gpa, found_version, found_kind = found
        if found_gpa != gpa:
            return PageError(
                pfn, ErrorKind.FOREIGN_GPA, f"from another gpa {found_gpa:#x} (version {found_version}, viewed {view})"
            )
        if found_version < version:
            return PageError(pfn, ErrorKind.STALE, f"stale version {found_version}<{version} (viewed {view})")
        if found_version > version:
            return PageError(
                pfn, ErrorKind.CORRUPTED, f"corrupted: version {found_version} is newer than the ledger's {version}"
            )
        return PageError(
            pfn, ErrorKind.CORRUPTED,
            f"corrupted: written as {PageKind(found_kind).name.lower()}, viewed {view} (version {version})",
        )
    found = _consistent(other, content)
    if found is not None and found[0] == gpa:
        other_view = _view_name(not shared)
        note = "" if found[1] == version else f", found version {found[1]}"
        return PageError(
            pfn, ErrorKind.MISROUTED,
            f"misrouted: viewed {view} but reads correctly as {other_view} (version {version}{note})",
        )
    return PageError(pfn, ErrorKind.CORRUPTED, f"corrupted (viewed {view}, expected version {version})")


def iter_check(
    ram: GuestRam,
    engine: MemoryEncryption,
    *,
    expected_ledger: npt.NDArray[np.uint32] | None = None,
    expected_ledger_digest: bytes | None = None,
    chunk_pages: int = DEFAULT_CHUNK_PAGES,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> Generator[int, None, CheckResult]:
    """Check every page of ``ram``; yields the pages done after each chunk, returns the result.

    ``expected_ledger`` (the running kernel's in-memory copy) or ``expected_ledger_digest``
    (from the imported vCPU state) make a ledger that differs in RAM an error too.
    """
    if chunk_pages <= 0:
        raise ValueError(f"chunk_pages must be positive, got {chunk_pages}")
    errors: list[PageError] = []
    counts: Counter[str] = Counter()
    total_errors = 0

    def note(err: PageError) -> None:
        counts[err.kind.value] += 1
        if len(errors) < max_samples:
            errors.append(err)

    try:
        header = read_kernel_header(ram, engine)
    except GuestMemoryError as exc:
        err = PageError(0, ErrorKind.KERNEL, f"kernel header unreadable: {exc}")
        return CheckResult(1, 1, str(err), {ErrorKind.KERNEL.value: 1}, (err,))
    layout = header.layout
    content = PageContent(header.seed)
    ledger = read_ledger(ram, engine, layout)

    # The kernel region itself: boot parameters parsed above, the ledger compared with what
    # the kernel (or the exported vCPU state) says it should be.
    if expected_ledger is not None:
        if expected_ledger.shape != ledger.shape:
            raise ValueError(f"expected_ledger has {expected_ledger.shape[0]} entries, the guest {ledger.shape[0]}")
        differ = np.flatnonzero(expected_ledger != ledger)
        if differ.size:
            ledger_pages = np.unique(differ // (PAGE_SIZE // 4))
            total_errors += int(ledger_pages.size)
            for index in ledger_pages[:max_samples].tolist():
                note(PageError(layout.ledger.pfn + index, ErrorKind.KERNEL,
                               "kernel: ledger page differs from the kernel's own copy"))
            counts[ErrorKind.KERNEL.value] += max(0, int(ledger_pages.size) - max_samples)
    if expected_ledger_digest is not None and ledger_digest(ledger) != expected_ledger_digest:
        total_errors += 1
        note(PageError(layout.ledger.pfn, ErrorKind.KERNEL,
                       "kernel: ledger digest differs from the one in the vCPU state"))
    kernel_entries = ledger[: layout.kernel.end]
    if np.any(kernel_entries):
        total_errors += 1
        note(PageError(layout.ledger.pfn, ErrorKind.KERNEL, "kernel: ledger entries of the kernel region are not 0"))
    verified = layout.kernel.npages
    yield verified

    first = layout.kernel.end
    chunk = min(chunk_pages, layout.npages - first)
    decrypted_buf = bytearray(chunk * PAGE_SIZE)
    sparse_raw = np.empty((chunk, PAGE_SIZE), dtype=np.uint8)  # a chunk with holes, read around them
    actual = np.empty((chunk, PAGE_SIZE), dtype=np.uint8)
    expected = np.empty((chunk, PAGE_SIZE), dtype=np.uint8)
    classified = 0
    for pfn in range(first, layout.npages, chunk):
        n = min(chunk, layout.npages - pfn)
        gpa = pfn << PAGE_SHIFT
        populated = ram.populated_pages(gpa, n)
        if populated.all():
            raw_view = ram.view(gpa, n)
        else:
            # Holes of the sparse RAM file read as zeros (and a zero page decrypts to zeros):
            # only the populated pages are read. Reading a tmpfs hole through the mapping would
            # allocate it: a 16 GiB guest with 256 MiB populated came out ~14 GiB allocated.
            sparse = sparse_raw[:n]
            sparse[~populated] = 0
            for start, stop in zip(*(r.tolist() for r in true_runs(populated)), strict=True):
                sparse[start:stop] = np.frombuffer(ram.view(gpa + start * PAGE_SIZE, stop - start),
                                                   dtype=np.uint8).reshape(stop - start, PAGE_SIZE)
            raw_view = memoryview(sparse.reshape(-1))
        raw = np.frombuffer(raw_view, dtype=np.uint8).reshape(n, PAGE_SIZE)
        decrypted = np.frombuffer(
            engine.decrypt(gpa, raw_view, out=memoryview(decrypted_buf)[: n * PAGE_SIZE]), dtype=np.uint8
        ).reshape(n, PAGE_SIZE)
        entries = ledger[pfn : pfn + n]
        shared = (entries & np.uint32(LEDGER_SHARED)) != 0
        versions = entries & np.uint32(LEDGER_VERSION_MASK)
        kinds = np.where(shared, np.uint32(PageKind.SHARED), np.uint32(PageKind.PRIVATE))
        gpas = (np.arange(pfn, pfn + n, dtype=np.uint64)) << np.uint64(PAGE_SHIFT)
        content.generate(gpas, versions, kinds, out=expected[:n])
        act = actual[:n]
        np.copyto(act, decrypted)
        np.copyto(act, raw, where=shared[:, None])
        bad = np.flatnonzero(~pages_equal(act, expected[:n]))
        total_errors += int(bad.size)
        for index in bad.tolist():
            if classified >= MAX_CLASSIFIED:
                counts[ErrorKind.UNCLASSIFIED.value] += 1
                continue
            classified += 1
            is_shared = bool(shared[index])
            other = decrypted[index] if is_shared else raw[index]
            note(classify_page(pfn + index, int(versions[index]), is_shared, act[index], other, content))
        del raw, decrypted, raw_view
        verified += n
        yield verified

    first_error = str(errors[0]) if errors else None
    return CheckResult(verified, total_errors, first_error, dict(counts), tuple(errors))


def run_check(checker: Generator[int, None, CheckResult]) -> CheckResult:
    """Drive an :func:`iter_check` generator to completion."""
    while True:
        try:
            next(checker)
        except StopIteration as done:
            result: CheckResult = done.value
            return result


def check_memory(
    ram: GuestRam,
    vek: bytes,
    *,
    expected_ledger: npt.NDArray[np.uint32] | None = None,
    expected_ledger_digest: bytes | None = None,
    chunk_pages: int = DEFAULT_CHUNK_PAGES,
    max_samples: int = DEFAULT_MAX_SAMPLES,
) -> CheckResult:
    """Self-check every page of ``ram`` with the guest key ``vek`` (in-process, no agent needed)."""
    return run_check(
        iter_check(
            ram,
            MemoryEncryption(vek),
            expected_ledger=expected_ledger,
            expected_ledger_digest=expected_ledger_digest,
            chunk_pages=chunk_pages,
            max_samples=max_samples,
        )
    )
