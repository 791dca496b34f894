#!/usr/bin/env python3
"""Benchmark: one live migration between two real `migd serve` daemons on 127.0.0.1.

Measures what operators measure for QEMU (throughput, downtime, total time, rounds, bytes on
the wire by kind, each daemon's peak anonymous memory) and, in the same run on the same
machine, the physical limit it is compared with:

    limit = min(raw single-stream loopback TCP,
                the SEND path alone, the RECEIVE path alone)

where the SEND/RECEIVE paths are the emulated firmware's SEND_UPDATE_DATA /
RECEIVE_UPDATE_DATA (private pages) and a plain copy (shared pages) over the same page runs,
in one process. Several repetitions; the median is printed as one JSON line. Not a test:
nothing here asserts a time (these machines are noisy: read the ratio).

    python bench/migrate.py --quick
    python bench/migrate.py --memory-mib 2048 --private-fraction 0.5 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from migd import identity  # noqa: E402
from migd.abi import PAGE_SIZE  # noqa: E402
from migd.client import MigdClient  # noqa: E402
from migd.demo import DemoWorkspace  # noqa: E402
from migd.memory import GuestRam, MemoryEncryption  # noqa: E402
from migd.psp import PspFirmware  # noqa: E402

MiB = 1 << 20
RUN_PAGES = 256


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


def firmware_paths_mib_s(memory_mib: int, private_fraction: float) -> tuple[float, float]:
    """SEND-only and RECEIVE-only rates over page runs of the guest's private/shared mix."""
    npages = min(memory_mib, 256) * 256  # the rate, not the size, matters: cap the sample at 256 MiB
    with tempfile.TemporaryDirectory(prefix="migd-bench-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as d:
        tmp = Path(d)
        for host in ("hostA", "hostB"):
            identity.init_host(tmp / host, tmp / "ca", common_name=host)
        anchors = [tmp / "ca" / identity.CA_CERT]
        a = PspFirmware.from_state_dir(tmp / "hostA", anchors)
        b = PspFirmware.from_state_dir(tmp / "hostB", anchors)
        src = GuestRam(tmp / "src.ram", npages, create=True)
        dst = GuestRam(tmp / "dst.ram", npages, create=True)
        handle = a.launch(0)
        MemoryEncryption(a.guest_key(handle)).write_private(src, 0, os.urandom(npages * PAGE_SIZE))
        private_runs = int(npages // RUN_PAGES * private_fraction)
        runs = [(i * RUN_PAGES * PAGE_SIZE, i < private_runs) for i in range(npages // RUN_PAGES)]
        start = a.send_start(handle, b.pdh_cert_pem)
        packets = []
        t0 = time.perf_counter()
        for gpa, private in runs:
            if private:
                header, ct = a.send_update_data(handle, src, gpa, RUN_PAGES)
                packets.append((gpa, header, bytes(ct)))
            else:
                packets.append((gpa, None, src.read(gpa, RUN_PAGES)))
        send_s = time.perf_counter() - t0
        dst_handle = b.receive_start(start.policy, start.pdh_cert_pem, start.session_blob)
        t0 = time.perf_counter()
        for gpa, header, data in packets:
            if header is not None:
                b.receive_update_data(dst_handle, dst, gpa, RUN_PAGES, header, data)
            else:
                dst.write(gpa, data)
        receive_s = time.perf_counter() - t0
        src.close()
        dst.close()
    size_mib = npages * PAGE_SIZE / MiB
    return size_mib / send_s, size_mib / receive_s


# ---------------------------------------------------------------------- one migration


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its reaped children (/proc/PID/stat)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
            pids = [h.proc.pid for h in (a, b) if h.proc is not None]
            peak = {pid: 0 for pid in pids}
            cpu_before = {pid: _cpu_seconds(pid) for pid in pids}
            migration = await api_a.migrate("bench", b.destination, downtime_limit_ms=args.downtime_limit_ms)
            while True:
                for pid in pids:
                    peak[pid] = max(peak[pid], _rss_anon_kib(pid))
                migration = await api_a.migration(migration["id"])
                if migration["status"] in ("completed", "failed", "cancelled"):
                    break
                await asyncio.sleep(0.05)
            cpu = {pid: _cpu_seconds(pid) - cpu_before[pid] for pid in pids}
            check = None
            if migration["status"] == "completed":
                for _ in range(1200):
                    guest = await api_b.guest("bench")
                    if guest["check"]["pages_verified"] == guest["pages"]["total"] or guest["check"]["errors"]:
                        check = guest["check"]
                        break
                    await asyncio.sleep(0.1)
        moved = migration["bytes"]["transferred"]
        return {
            "status": migration["status"],
            "error": migration["error"],
            "throughput_mib_s": moved / MiB / (migration["total_time_ms"] / 1000.0),
            "downtime_ms": migration["downtime_ms"],
            "total_time_ms": migration["total_time_ms"],
            "rounds": migration["rounds"],
            "pages": migration["pages"],
            "bytes_transferred": moved,
            "rss_anon_mib": {"source": peak[pids[0]] / 1024, "destination": peak[pids[1]] / 1024},
            "cpu_s": {"source": round(cpu[pids[0]], 2), "destination": round(cpu[pids[1]], 2)},
            "self_check_errors": None if check is None else check["errors"],
        }
    finally:
        workspace.close(keep=False)


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
    args = parser.parse_args(argv)
    if args.quick:
        args.memory_mib, args.repeats = min(args.memory_mib, 256), 2
    tcp = tcp_loopback_mib_s()
    send, receive = firmware_paths_mib_s(args.memory_mib, args.private_fraction)
    limit = min(tcp, send, receive)
    runs = [asyncio.run(one_migration(args)) for _ in range(args.repeats)]
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
        "daemon_cpu_s": [r["cpu_s"] for r in runs],
        "limit_mib_s": {"tcp_loopback": round(tcp, 1), "send_path": round(send, 1), "receive_path": round(receive, 1),
                        "min": round(limit, 1)},
        "ratio": throughput and round(throughput / limit, 3),
        "errors": [r["error"] for r in runs if r["error"]],
    }
    print(json.dumps(result))
    return 0 if len(done) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
