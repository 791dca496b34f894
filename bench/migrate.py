#!/usr/bin/env python3
"""Benchmark: one live migration between two real `migd serve` daemons on 127.0.0.1.

Measures what operators measure for QEMU (throughput, downtime, total time, rounds, bytes on
the wire by kind, each daemon's peak anonymous memory) and, in the same run on the same
machine, the physical limit it is compared with:

    limit = min(raw single-stream loopback TCP,
                the SEND path alone, the RECEIVE path alone)

where the SEND/RECEIVE paths are the emulated firmware's SEND_UPDATE_DATA /
RECEIVE_UPDATE_DATA (private pages) and a plain copy (shared pages) over the same page runs
as the guest, full size, into a fresh RAM file, in one process (see
:func:`firmware_paths_mib_s` for why not a sample). The limit is measured in every
repetition right after its migration, after the same idle settle time the migration had
(so that neither writes into memory freed just before it), and reported with it; the ratio
is the median of the per-repetition ratios. ``machine_busy_each`` tells how busy the whole
machine was during each migration (other work on a shared machine lowers the ratio). Several repetitions; medians
are printed as one JSON line. Not a test: nothing here asserts a time (these machines are
noisy: read the ratio).

CPU: ``core_s_per_gib`` is the core-seconds both daemons (every thread: event loops, page
workers; not the guest agents) spent per GiB of pages moved; with ``--budget`` the same run
also measures bench/cpu_budget.py's unavoidable stages for this mix and reports the ratio
(``core_s_vs_unavoidable``: 1.0 = no overhead beyond them). ``--connections N`` stripes the
pages over N connections (docs/protocol.md "Several connections"); ``--tls`` runs mutual TLS.

    python bench/migrate.py --quick
    python bench/migrate.py --memory-mib 2048 --private-fraction 0.5 --connections 2 --tls --budget
    python bench/migrate.py --memory-mib 2048 --private-fraction 0.5 --repeats 3
    python bench/migrate.py --memory-mib 16384 --populated-fraction 0.015625 --repeats 1
    python bench/migrate.py --memory-mib 8192 --populated-fraction 0.3 --no-limit --repeats 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import mmap
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from migd import wire  # noqa: E402
from migd.platform import identity
from migd.abi import PAGE_SIZE, GiB, MiB  # noqa: E402
from migd.cli.client import MigdClient  # noqa: E402
from migd.cli.demo import DemoWorkspace  # noqa: E402
from migd.guest.guest_layout import GuestLayout  # noqa: E402
from migd.platform.memory import GuestRam, MemoryEncryption  # noqa: E402
from migd.page_runs import chunks  # noqa: E402
from migd.platform.psp import PspFirmware  # noqa: E402
from migd.guest.workload import MAX_WRITE_RUN_PAGES  # noqa: E402



# ---------------------------------------------------------------------- limits, same machine, same run


def tcp_loopback_mib_s(total_mib: int = 1024, chunk: int = 1 << 20) -> float:
    """Raw single-stream TCP over 127.0.0.1: one sender thread, one receiver thread."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    received = [0]

    def receive() -> None:
        conn, _ = server.accept()
        buf = bytearray(chunk)
        view = memoryview(buf)
        with conn:
            while n := conn.recv_into(view):
                received[0] += n

    thread = threading.Thread(target=receive)
    thread.start()
    payload = os.urandom(chunk)
    with socket.create_connection(("127.0.0.1", port)) as sender:
        start = time.perf_counter()
        for _ in range(total_mib * MiB // chunk):
            sender.sendall(payload)
    thread.join()
    elapsed = time.perf_counter() - start
    server.close()
    return received[0] / MiB / elapsed


def guest_runs(memory_mib: int, private_fraction: float, populated_fraction: float) -> list[tuple[int, int, bool]]:
    """The non-zero page runs migd sends for the benchmark's guest: (first page, pages, private).

    Rebuilt from the guest layout and the workload's populate pattern (migd/guest/workload.py: steps
    of ``MAX_WRITE_RUN_PAGES`` data pages, the first ``shared_fraction`` of each made shared),
    then cut exactly as the source cuts them (``page_runs.chunks`` of ``CHUNK_PAGES``, split by
    kind). The kernel page and ledger (a few KiB per MiB) are left out.
    """
    npages = memory_mib * MiB // PAGE_SIZE
    layout = GuestLayout.build(npages)
    data = np.concatenate([np.arange(r.pfn, r.end) for r in layout.data_ranges()])
    target = int(len(data) * populated_fraction)
    kinds = np.zeros(npages, dtype=np.int8)  # 0 zero, 1 private, 2 shared
    shared_fraction = 1.0 - private_fraction
    ends = np.cumsum([r.npages for r in layout.data_ranges()])
    index = 0
    while index < target:
        range_end = int(ends[np.searchsorted(ends, index, side="right")])  # _run_at: stay in one data range
        n = min(MAX_WRITE_RUN_PAGES, target - index, range_end - index)
        shared = round(n * shared_fraction)
        kinds[data[index : index + shared]] = 2
        kinds[data[index + shared : index + n]] = 1
        index += n
    runs: list[tuple[int, int, bool]] = []
    for first, count in chunks(np.array([0]), np.array([npages])):
        part = kinds[first : first + count]
        edges = np.flatnonzero(part[1:] != part[:-1]) + 1
        for s, e in zip([0, *edges.tolist()], [*edges.tolist(), count], strict=True):
            if part[s]:
                runs.append((first + s, e - s, bool(part[s] == 1)))
    return runs


def firmware_paths_mib_s(memory_mib: int, private_fraction: float, populated_fraction: float) -> tuple[float, float]:
    """SEND-only and RECEIVE-only rates over the guest's own page runs, full size, streaming.

    Full size, not a sample, and into a *fresh* destination RAM file: the first write to a
    tmpfs page allocates it, and on a VM with free page reporting (``page_reporting`` on the
    kernel command line, e.g. Firecracker) memory freed a few seconds earlier has gone back to
    the host, so first touch costs a host fault. Measured here: pwrite of 2 GiB into a new
    /dev/shm file ran at 2.1–2.4 GB/s on recently freed pages and 379 MiB/s on fresh host
    memory. A migration's destination pays that for every page of the guest, so the RECEIVE
    path must pay it too: the earlier 256 MiB sample landed on hot recycled pages and set the
    limit too high. Runs are processed one at a time (send one run, time it; receive it, time
    it): no whole-guest buffering, so the source RAM stays the only big allocation besides the
    destination file. The source file is filled first (untimed) with the guest's mix.
    """
    runs = guest_runs(memory_mib, private_fraction, populated_fraction)
    npages = memory_mib * MiB // PAGE_SIZE
    if not runs:
        return float("inf"), float("inf")
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="migd-bench-", dir=shm) as d:
        tmp = Path(d)
        for host in ("hostA", "hostB"):
            identity.init_host(tmp / host, tmp / "ca", common_name=host)
        anchors = [tmp / "ca" / identity.CA_CERT]
        a = PspFirmware.from_state_dir(tmp / "hostA", anchors)
        b = PspFirmware.from_state_dir(tmp / "hostB", anchors)
        src = GuestRam(tmp / "src.ram", npages, create=True)
        dst = GuestRam(tmp / "dst.ram", npages, create=True)
        with src, dst:
            handle = a.launch(0)
            engine = MemoryEncryption(a.guest_key(handle))
            block = os.urandom(max(count for _, count, _ in runs) * PAGE_SIZE)
            for first, count, private in runs:
                data = memoryview(block)[: count * PAGE_SIZE]
                if private:
                    engine.write_private(src, first * PAGE_SIZE, data)
                else:
                    src.write(first * PAGE_SIZE, data)
            start = a.send_start(handle, b.pdh_cert_pem)
            dst_handle = b.receive_start(start.policy, start.pdh_cert_pem, start.session_blob)
            out = bytearray(len(block))
            send_s = receive_s = 0.0
            nbytes = 0
            for first, count, private in runs:
                gpa = first * PAGE_SIZE
                t0 = time.perf_counter()
                if private:
                    header, payload = a.send_update_data(handle, src, gpa, count, out=out)
                else:
                    header, payload = None, src.read(gpa, count)  # the source copies shared runs too
                t1 = time.perf_counter()
                if header is not None:
                    b.receive_update_data(dst_handle, dst, gpa, count, header, payload)
                else:
                    dst.write(gpa, payload)
                t2 = time.perf_counter()
                send_s += t1 - t0
                receive_s += t2 - t1
                nbytes += count * PAGE_SIZE
    return nbytes / MiB / send_s, nbytes / MiB / receive_s


def measure_limit(args: argparse.Namespace) -> dict[str, float]:
    """The limit of one repetition: min(raw loopback TCP, SEND path, RECEIVE path), MiB/s."""
    tcp = tcp_loopback_mib_s()
    send, receive = firmware_paths_mib_s(args.memory_mib, args.private_fraction, args.populated_fraction)
    return {"tcp_loopback": round(tcp, 1), "send_path": round(send, 1), "receive_path": round(receive, 1),
            "min": round(min(tcp, send, receive), 1)}


# ---------------------------------------------------------------------- one migration


def _limit_fits(args: argparse.Namespace) -> bool:
    """Whether the limit's two full-size RAM files fit in memory next to the guest."""
    if args.no_limit:
        return False
    need = 2 * args.memory_mib * MiB * args.populated_fraction + 2 * 1024 * MiB  # + headroom
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 >= need
    return True


def _cpu_seconds(pid: int, tid: int | None = None) -> float:
    """utime + stime of a process, every thread (exited ones included), or of its thread ``tid``."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _loop_and_workers(pid: int) -> tuple[float, float]:
    """(main thread, every other thread) CPU seconds of a daemon: its event loop is the main
    thread; its page workers (sealing, placing) are the others."""
    total, main = _cpu_seconds(pid), _cpu_seconds(pid, pid)
    return main, total - main


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _rss_anon_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


async def _populated(ram: Path, want_bytes: int, timeout: float) -> None:
    """Wait until the guest's RAM file holds ``want_bytes`` (it fills at boot; st_blocks grows)."""
    deadline = time.monotonic() + timeout
    last, stable = -1, 0
    while time.monotonic() < deadline:
        allocated = ram.stat().st_blocks * 512 if ram.exists() else 0
        if allocated >= want_bytes:
            return
        stable = stable + 1 if allocated == last else 0
        last = allocated
        await asyncio.sleep(0.1)
    raise TimeoutError(f"guest RAM reached {last} of {want_bytes} bytes in {timeout} s")


async def one_migration(args: argparse.Namespace) -> dict[str, Any]:
    """Two daemons, one guest, one migration; returns the measured numbers."""
    workspace = DemoWorkspace.create(tls=args.tls)
    try:
        workspace.start_daemons()
        a, b = workspace.hosts
        async with MigdClient(a.api, a.token) as api_a, MigdClient(b.api, b.token) as api_b:
            for api in (api_a, api_b):
                for _ in range(300):
                    try:
                        await api.health()
                        break
                    except Exception:  # the daemon is still starting
                        await asyncio.sleep(0.05)
            await api_a.create_guest("bench", args.memory_mib)
            workload = {
                "dirty_rate_mib_s": args.dirty_rate_mib_s, "convert_rate_hz": 0, "seed": 1,
                "populate_fraction": args.populated_fraction, "shared_fraction": 1.0 - args.private_fraction,
            }
            await api_a.start_guest("bench", workload)
            ram = workspace.memory_file(a, "bench")
            await _populated(ram, int(args.memory_mib * MiB * args.populated_fraction * 0.97), 600)
            while not (await api_a.guest("bench"))["migration_control"]["ready"]:
                await asyncio.sleep(0.05)
            # Let memory freed by the setup go back to the host first (free page reporting runs
            # ~2 s after a free): the destination then allocates cold memory, like the limit's.
            await asyncio.sleep(args.settle_s)
            pids = [h.proc.pid for h in (a, b) if h.proc is not None]
            peak = {pid: 0 for pid in pids}
            cpu_before = {pid: _cpu_seconds(pid) for pid in pids}
            split_before = {pid: _loop_and_workers(pid) for pid in pids}
            ticks_before = _machine_ticks()
            migration = await api_a.migrate("bench", b.destination, downtime_limit_ms=args.downtime_limit_ms,
                                            connections=args.connections)
            while True:
                for pid in pids:
                    peak[pid] = max(peak[pid], _rss_anon_kib(pid))
                migration = await api_a.migration(migration["id"])
                if migration["status"] in ("completed", "failed", "cancelled"):
                    break
                await asyncio.sleep(0.05)
            cpu = {pid: _cpu_seconds(pid) - cpu_before[pid] for pid in pids}
            split = {pid: tuple(a - b for a, b in zip(_loop_and_workers(pid), split_before[pid], strict=True))
                     for pid in pids}
            ticks_after = _machine_ticks()
            # How busy the whole machine was meanwhile, and how much of it the two daemons were:
            # other work on a shared machine shows as busy time that is not the daemons'.
            elapsed_ticks = max(1, ticks_after[1] - ticks_before[1])
            machine_busy = (ticks_after[0] - ticks_before[0]) / elapsed_ticks
            check = None
            if migration["status"] == "completed":
                for _ in range(1200):
                    guest = await api_b.guest("bench")
                    if guest["check"]["pages_verified"] == guest["pages"]["total"] or guest["check"]["errors"]:
                        check = guest["check"]
                        break
                    await asyncio.sleep(0.1)
            # Allocated pages of the arrived guest's RAM file after its self-check: a sparse guest
            # must stay sparse (reading holes through a tmpfs mapping would allocate them).
            try:
                allocated_mib = workspace.memory_file(b, "bench").stat().st_blocks * 512 / MiB
            except OSError:
                allocated_mib = None
            # The limit of this repetition, measured right after its migration and the guest's
            # self-check, after the same settle time the migration had: the source released
            # its copy of the guest on completion, and free page reporting hands memory freed
            # ~2 s ago back to the host, so the limit's destination file starts from memory in
            # the same state the migration's destination did. (Measured right *before* the
            # migration, the limit's own freed files would hand the migration's destination
            # recently used pages: cheaper to touch, an advantage to migd.)
            await asyncio.sleep(args.settle_s)
            limit = measure_limit(args) if _limit_fits(args) else None
        moved = migration["bytes"]["transferred"]
        throughput = moved / MiB / (migration["total_time_ms"] / 1000.0)
        return {
            "status": migration["status"],
            "limit_mib_s": limit,
            "ratio": round(throughput / limit["min"], 3) if limit else None,
            "error": migration["error"],
            "throughput_mib_s": throughput,
            "downtime_ms": migration["downtime_ms"],
            "total_time_ms": migration["total_time_ms"],
            "rounds": migration["rounds"],
            "pages": migration["pages"],
            "bytes_transferred": moved,
            "rss_anon_mib": {"source": peak[pids[0]] / 1024, "destination": peak[pids[1]] / 1024},
            "cpu_s": {"source": round(cpu[pids[0]], 2), "destination": round(cpu[pids[1]], 2)},
            "core_s_per_gib": {
                "source": round(cpu[pids[0]] / (moved / GiB), 3), "destination": round(cpu[pids[1]] / (moved / GiB), 3),
                "total": round((cpu[pids[0]] + cpu[pids[1]]) / (moved / GiB), 3),
                # Where it went: each daemon's event loop (main thread) and its page workers.
                "source_loop": round(split[pids[0]][0] / (moved / GiB), 3),
                "source_workers": round(split[pids[0]][1] / (moved / GiB), 3),
                "destination_loop": round(split[pids[1]][0] / (moved / GiB), 3),
                "destination_workers": round(split[pids[1]][1] / (moved / GiB), 3),
            } if moved else None,
            "machine_busy": round(machine_busy, 2),
            "self_check_errors": None if check is None else check["errors"],
            "dest_ram_allocated_mib": None if allocated_mib is None else round(allocated_mib, 1),
        }
    finally:
        workspace.close(keep=False)


def unavoidable_core_s_per_gib(private_fraction: float) -> float:
    """bench/cpu_budget.py's sum of the unavoidable stages (core-s per GiB) for this mix, measured now."""
    import cpu_budget  # bench/ is on sys.path when this file runs as a script

    with tempfile.TemporaryDirectory(prefix="migd-budget-") as d:
        tmp = Path(d)
        for host in ("hostA", "hostB"):
            identity.init_host(tmp / host, tmp / "ca", common_name=host)
        anchors = [tmp / "ca" / identity.CA_CERT]
        hosts = (PspFirmware.from_state_dir(tmp / "hostA", anchors), PspFirmware.from_state_dir(tmp / "hostB", anchors))
        costs = {**cpu_budget.page_stages(tmp, hosts, 256, private_fraction).costs(), **cpu_budget.tcp_costs(256)}
    total = cpu_budget.model(costs)["stage_sum_cpu_s_per_gib"]
    assert isinstance(total, float)
    return total


PAGE_REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")


@contextlib.contextmanager
def warm_host_memory(gib: float) -> Iterator[dict[str, Any]]:
    """Hold the guest kernel's free page reporting and pre-touch ``gib`` GiB, for the whole run.

    On a VM with free page reporting (virtio-balloon; Firecracker here) memory freed for ~2 s
    is handed back to the host, and the next first touch of it costs a host fault: measured
    ~400 MiB/s against ~7 GB/s for memory touched before. Both the migration's destination
    and the limit's RECEIVE path write a fresh RAM file, so which of them happened to get
    returned memory decided the ratio (0.4 to 1.9 for the same code). With reporting held
    (an order above the largest buddy order: no free block qualifies) and enough memory
    touched once, both measure the machine rather than the hypervisor's reclaim. The old
    setting is restored on exit. Needs root; without it nothing changes and the JSON says so.
    """
    state: dict[str, Any] = {"page_reporting_held": False, "warmed_gib": 0}
    old = None
    try:
        if gib > 0:
            try:
                old = PAGE_REPORTING_ORDER.read_text().strip()
                PAGE_REPORTING_ORDER.write_text("11\n")
                state["page_reporting_held"] = True
            except OSError as exc:
                old = None
                print(f"warm-host-memory: cannot hold free page reporting ({exc}); measuring as is", file=sys.stderr)
            size = int(gib * (1 << 30))
            with mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as buf:
                np.frombuffer(buf, dtype=np.uint8)[::PAGE_SIZE] = 1  # one write per page: each is faulted in
            state["warmed_gib"] = gib
        yield state
    finally:
        if old is not None:
            PAGE_REPORTING_ORDER.write_text(old + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 MiB, 2 repetitions (< 2 minutes)")
    parser.add_argument("--memory-mib", type=int, default=2048)
    parser.add_argument("--private-fraction", type=float, default=0.5)
    parser.add_argument("--populated-fraction", type=float, default=1.0)
    parser.add_argument("--dirty-rate-mib-s", type=float, default=0.0)
    parser.add_argument("--downtime-limit-ms", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tls", action="store_true", help="mutual TLS between the daemons")
    parser.add_argument("--connections", type=int, default=1, help="connections the migration stripes its pages over")
    parser.add_argument("--budget", action="store_true",
                        help="also measure bench/cpu_budget.py's unavoidable stages for this mix (adds ~20 s)")
    parser.add_argument("--settle-s", type=float, default=4.0,
                        help="idle seconds between populating the guest and migrating it")
    parser.add_argument("--no-limit", action="store_true",
                        help="skip the limit measurement (e.g. a large guest where two more copies do not fit)")
    parser.add_argument("--warm-host-memory-gib", type=float, default=0.0,
                        help="hold free page reporting and pre-touch this much memory (see warm_host_memory; "
                             "root; at least 3x the populated guest, 2x with --no-limit)")
    args = parser.parse_args(argv)
    if args.quick:
        args.memory_mib, args.repeats = min(args.memory_mib, 256), 2
    # Each repetition touches fresh memory for both guests' RAM files and, for the limit, a third
    # copy: warmed memory short of that leaves the last to touch on host-returned memory (seen: a
    # limit of 325 MiB/s in one repetition, 2671 in another, with 4 GiB warmed for a 2 GiB guest).
    copies = 2 if args.no_limit else 3
    if 0 < args.warm_host_memory_gib * 1024 < copies * args.memory_mib * args.populated_fraction:
        print(f"warm-host-memory: {args.warm_host_memory_gib:g} GiB is less than the {copies} copies of the "
              f"populated guest a repetition touches; its figures may vary between repetitions", file=sys.stderr)
    with warm_host_memory(args.warm_host_memory_gib) as host_memory:
        runs = [asyncio.run(one_migration(args)) for _ in range(args.repeats)]
        unavoidable = unavoidable_core_s_per_gib(args.private_fraction) if args.budget else None
    done = [r for r in runs if r["status"] == "completed"]
    median = (lambda key: statistics.median(r[key] for r in done)) if done else (lambda key: None)
    throughput = median("throughput_mib_s")
    result = {
        "memory_mib": args.memory_mib,
        "private_fraction": args.private_fraction,
        "populated_fraction": args.populated_fraction,
        "dirty_rate_mib_s": args.dirty_rate_mib_s,
        "downtime_limit_ms": args.downtime_limit_ms,
        "tls": args.tls,
        "connections": args.connections,
        "repeats": args.repeats,
        "completed": len(done),
        "throughput_mib_s": throughput and round(throughput, 1),
        "downtime_ms": median("downtime_ms"),
        "total_time_ms": median("total_time_ms"),
        "rounds": median("rounds"),
        "downtime_ms_each": [r["downtime_ms"] for r in runs],
        "pages": done[-1]["pages"] if done else None,
        "bytes_transferred": median("bytes_transferred"),
        "rss_anon_mib": {
            side: round(max(r["rss_anon_mib"][side] for r in runs), 1) for side in ("source", "destination")
        },
        "self_check_errors": [r["self_check_errors"] for r in runs],
        "dest_ram_allocated_mib_each": [r["dest_ram_allocated_mib"] for r in runs],
        "daemon_cpu_s": [r["cpu_s"] for r in runs],
        "core_s_per_gib_each": [r["core_s_per_gib"] for r in runs],
        "core_s_per_gib": (round(statistics.median(r["core_s_per_gib"]["total"] for r in done), 3)
                           if done and all(r["core_s_per_gib"] for r in done) else None),
        "unavoidable_core_s_per_gib": unavoidable,
        "machine_busy_each": [r["machine_busy"] for r in runs],  # 1.0 = every core busy (any process)
        "throughput_mib_s_each": [round(r["throughput_mib_s"], 1) for r in runs],
        "total_time_ms_each": [r["total_time_ms"] for r in runs],
        "limit_mib_s_each": [r["limit_mib_s"] for r in runs],
        "ratio_each": [r["ratio"] for r in runs],
        "ratio": round(statistics.median(ratios), 3) if (ratios := [r["ratio"] for r in done if r["ratio"]]) else None,
        "errors": [r["error"] for r in runs if r["error"]],
        "host_memory": host_memory,
        "crc32": wire.CRC32_IMPLEMENTATION,
    }
    if unavoidable and result["core_s_per_gib"]:
        result["core_s_vs_unavoidable"] = round(result["core_s_per_gib"] / unavoidable, 3)
    print(json.dumps(result))
    return 0 if len(done) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
