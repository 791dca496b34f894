#!/usr/bin/env python3
"""Benchmark: page bitmap operations on a 64 GiB guest (16 Mi pages, 2 MiB of bitmap).

Prints the best-of-N milliseconds of each operation, next to a naive bit-level baseline
measured in the same run (``np.unpackbits`` + ``np.diff`` + ``np.flatnonzero`` for runs, plain
``zlib.compress`` of the packed bytes for encoding) and the ratio between them (machines
are noisy: compare ratios, not absolute numbers). Not a test: nothing here asserts a time.

    python bench/bitmap.py [--npages N] [--runs N] [--repeats N] [--json]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import zlib
from collections.abc import Callable

import numpy as np

from migd.bitmap import ENCODING_RUNS, PageBitmap


def _best_ms(repeats: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _naive_runs(packed: bytes, npages: int) -> tuple[np.ndarray, np.ndarray]:
    """The bit-level way: unpack every bit, diff, find the edges."""
    bits = np.unpackbits(np.frombuffer(packed, np.uint8), bitorder="little")[:npages].astype(np.int8)
    edges = np.flatnonzero(np.diff(bits, prepend=0, append=0))
    return edges[0::2], edges[1::2] - edges[0::2]


def _random_runs(npages: int, nruns: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``nruns`` disjoint runs of 1..79 pages spread over the guest."""
    slot = npages // nruns
    starts = np.arange(nruns, dtype=np.int64) * slot + rng.integers(0, max(slot - 80, 1), nruns)
    counts = np.minimum(rng.integers(1, 80, nruns), slot - (starts % slot))
    return starts, counts


def run(npages: int, nruns: int, repeats: int) -> list[dict[str, object]]:
    """Measure every operation; one row per operation."""
    rng = np.random.default_rng(2024)
    starts, counts = _random_runs(npages, nruns, rng)
    range_list = list(zip(starts.tolist(), counts.tolist(), strict=True))
    rows: list[dict[str, object]] = []

    def row(name: str, ms: float, baseline_ms: float | None = None, **extra: object) -> None:
        entry: dict[str, object] = {"op": name, "ms": round(ms, 3)}
        if baseline_ms is not None:
            entry["baseline_ms"] = round(baseline_ms, 3)
            entry["speedup"] = round(baseline_ms / ms, 1)
        entry.update(extra)
        rows.append(entry)

    def set_each() -> None:
        fresh = PageBitmap(npages)
        for first, count in range_list:
            fresh.set_range(first, count)

    ms = _best_ms(repeats, set_each)
    row(f"set_range x{len(range_list)}", ms, us_per_call=round(ms * 1e3 / len(range_list), 2))
    row(f"set_extents ({nruns} runs, one call)", _best_ms(repeats, lambda: _with_runs(npages, starts, counts)))
    pages = rng.integers(0, npages, 1_000_000)
    row("set_pages (1M random pages)", _best_ms(repeats, lambda: PageBitmap(npages).set_pages(pages)))

    bitmap = PageBitmap(npages)
    bitmap.set_extents(starts, counts)
    packed = bitmap.to_bytes()
    row("count", _best_ms(repeats, bitmap.count), bits=bitmap.count())
    row("count (middle half)", _best_ms(repeats, lambda: bitmap.count(npages // 4 + 3, npages // 2)))
    ref_starts, ref_counts = _naive_runs(packed, npages)
    got_starts, got_counts = bitmap.extent_arrays()
    assert np.array_equal(got_starts, ref_starts) and np.array_equal(got_counts, ref_counts)
    naive_ms = _best_ms(repeats, lambda: _naive_runs(packed, npages))
    row("extent_arrays", _best_ms(repeats, bitmap.extent_arrays), naive_ms, runs=int(got_starts.size))
    row("extent_arrays(False)", _best_ms(repeats, lambda: bitmap.extent_arrays(False)))
    row("extents (list of Extent)", _best_ms(repeats, bitmap.extents), naive_ms)

    shapes = {
        f"{nruns} runs": bitmap,
        "sparse (1000 runs)": _with_runs(npages, *_random_runs(npages, 1000, rng)),
        "full": _with_runs(npages, np.array([0]), np.array([npages])),
        "random 50%": _with_pages(npages, rng.integers(0, npages, npages // 2 + npages // 5)),
    }
    for label, shape in shapes.items():
        data = shape.encode()
        encoding = "runs" if data[5] == ENCODING_RUNS else "zlib"
        zlib_ms = _best_ms(repeats, functools.partial(zlib.compress, shape.to_bytes(), 1))
        row(f"encode {label}", _best_ms(repeats, shape.encode), zlib_ms, bytes=len(data), encoding=encoding)
        row(f"decode {label}", _best_ms(repeats, functools.partial(PageBitmap.decode, data, max_npages=npages)))

    fetch_ms = float("inf")
    for _ in range(repeats):
        bitmap.update(shapes[f"{nruns} runs"])  # refill, outside the measured swap
        t0 = time.perf_counter()
        bitmap.fetch_and_clear()
        fetch_ms = min(fetch_ms, (time.perf_counter() - t0) * 1e3)
    row("fetch_and_clear", fetch_ms)
    row("copy", _best_ms(repeats, bitmap.copy))
    other = shapes["random 50%"]
    row("update (union)", _best_ms(repeats, lambda: bitmap.update(other)))
    row("difference", _best_ms(repeats, lambda: bitmap.difference(other)))
    return rows


def _with_runs(npages: int, starts: np.ndarray, counts: np.ndarray) -> PageBitmap:
    bitmap = PageBitmap(npages)
    bitmap.set_extents(starts, counts)
    return bitmap


def _with_pages(npages: int, pages: np.ndarray) -> PageBitmap:
    bitmap = PageBitmap(npages)
    bitmap.set_pages(pages)
    return bitmap


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--npages", type=int, default=16 << 20, help="guest pages (default: 64 GiB)")
    parser.add_argument("--runs", type=int, default=100_000, help="runs in the typical bitmap")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args(argv)
    rows = run(args.npages, args.runs, args.repeats)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        return 0
    print(f"PageBitmap over {args.npages} pages ({args.npages >> 8} MiB guest), best of {args.repeats}")
    print(f"{'operation':<36} {'ms':>9} {'baseline ms':>12} {'speedup':>8}  notes")
    for r in rows:
        notes = " ".join(f"{k}={v}" for k, v in r.items() if k not in {"op", "ms", "baseline_ms", "speedup"})
        base = r.get("baseline_ms", "")
        speed = r.get("speedup", "")
        print(f"{r['op']:<36} {r['ms']:>9} {base!s:>12} {speed!s:>8}  {notes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
