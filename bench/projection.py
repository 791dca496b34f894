#!/usr/bin/env python3
"""Projection: one migration's throughput on a host with C cores per side and a B Gbit/s link.

Input: the JSON line of ``bench/migrate.py`` (one or more, e.g. ``--connections 1`` and ``2``),
whose ``core_s_per_gib_each`` says where each daemon's CPU went per GiB moved: its event loop
(the main thread) and its page workers (the other threads: the source's sealing threads with
several connections, the destination's placing threads). The model:

* Per GiB moved, the source's loop costs ``Ls`` core-seconds, its workers ``Ws``; the
  destination's loop ``Ld``, its workers ``Wd`` (medians of the repetitions of one run). These
  costs are per byte: they do not change with the host (same CPU speed per core assumed).
* A loop is one thread that holds the GIL for its work: it runs at most one core's worth, so a
  side moves at most ``1 / L`` GiB/s whatever the number of cores.
* Workers run in parallel beside it (their bulk work, AES and HMAC, releases the GIL; measured in
  send_lane.py's docstring): with ``N`` connections the pages go on the ``N - 1`` further
  ones (the first carries the control frames), each with ``T`` worker threads (the source: one
  that seals and writes; the destination: one that reads, one that places), on the ``C - 1``
  cores the loop leaves, so they move at most ``min(T (N - 1), C - 1) / W`` GiB/s.
* A side cannot use more than its ``C`` cores: at most ``C / (L + W)`` GiB/s.
* The link carries at most ``B`` (payload ~ wire bytes: frame headers are < 0.1 %).
* Throughput = the smallest of these over both sides and the link. Left out: the guest's own
  CPU (idle guests), NUMA and memory bandwidth, TCP's own limits per connection, and that with
  one connection the source seals on its loop (its ``Ws`` is then ~0 and ``Ls`` holds it).

Check against this machine: both daemons (and the guests' agents) share its 2 cores, so the
model's prediction here is ``min(1/Ls, 1/Ld, W-bounds, 2 / (Ls + Ws + Ld + Wd))``, printed next
to what the run measured. Not a test: it computes, it asserts nothing.

    python bench/migrate.py --memory-mib 2048 --connections 2 ... > run2.json
    python bench/projection.py run1.json run2.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

GIB_PER_GBIT = 1e9 / 8 / (1 << 30)  # 1 Gbit/s in GiB/s
CORES = (2, 8, 32)
LINKS_GBIT = (25, 100)


def costs(run: dict[str, Any]) -> dict[str, float]:
    """Median core-s/GiB of each part (source/destination loop/workers) over the run's repetitions."""
    each = [c for c in run["core_s_per_gib_each"] if c]
    if not each:
        raise ValueError("the run has no CPU figures (no repetition completed)")
    parts = ("source_loop", "source_workers", "destination_loop", "destination_workers")
    # /proc samples a process's and its main thread's CPU in ticks: a share can come out a tick
    # below zero.
    return {part: max(0.0, statistics.median(c[part] for c in each)) for part in parts}


#: Worker threads of one page-carrying connection, per side (see the model above).
THREADS_PER_LANE = {"source": 1, "destination": 2}


def _worker_threads(connections: int, side: str) -> int:
    """The worker threads of a side: those of the connections that carry pages (with one
    connection, the first's single page worker; else every further one's)."""
    return THREADS_PER_LANE[side] * (connections - 1) if connections > 1 else 1


def side_limit(loop: float, workers: float, cores: float, threads: int) -> float:
    """GiB/s one side allows: its loop's one core, its ``threads`` workers' share, all its cores."""
    limits = [cores / (loop + workers)]
    if loop > 0:
        limits.append(1.0 / loop)
    if workers > 0:
        limits.append(max(1, min(threads, cores - 1)) / workers)
    return min(limits)


def project(c: dict[str, float], cores: float, link_gib_s: float, connections: int) -> float:
    """GiB/s of one migration with ``cores`` per side and a ``link_gib_s`` link."""
    return min(link_gib_s, *(
        side_limit(c[f"{side}_loop"], c[f"{side}_workers"], cores, _worker_threads(connections, side))
        for side in THREADS_PER_LANE))


def here(c: dict[str, float], connections: int, cores: float = 2.0) -> float:
    """The model's prediction for this machine: both daemons share its cores."""
    total = sum(c.values())
    limits = [cores / total]
    for side in THREADS_PER_LANE:
        loop, workers = c[f"{side}_loop"], c[f"{side}_workers"]
        if loop > 0:
            limits.append(1.0 / loop)
        if workers > 0:
            limits.append(max(1, min(_worker_threads(connections, side), cores - 1)) / workers)
    return min(limits)


def _best(measured_with: int, cores: int) -> int:
    """Connections projected on a host of ``cores``: a run of one connection seals on its loop, so
    its costs say nothing of more; a run of several projects a further connection for each spare
    core (16 connections at most)."""
    return 1 if measured_with == 1 else min(16, max(measured_with, cores))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="JSON lines of bench/migrate.py")
    args = parser.parse_args(argv)
    out = []
    for path in args.runs:
        run = json.loads(path.read_text().strip().splitlines()[-1])
        c, n = costs(run), int(run.get("connections", 1))
        measured = run["throughput_mib_s"]
        out.append({
            "run": str(path), "connections": n, "private_fraction": run["private_fraction"], "tls": run["tls"],
            "core_s_per_gib": {k: round(v, 3) for k, v in c.items()},
            "this_machine": {"predicted_mib_s": round(here(c, n) * 1024, 1), "measured_mib_s": measured},
            "projected_mib_s": {
                f"{cores} cores, {gbit} Gbit/s": round(project(c, cores, gbit * GIB_PER_GBIT, _best(n, cores)) * 1024, 1)
                for cores in CORES for gbit in LINKS_GBIT
            },
        })
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
