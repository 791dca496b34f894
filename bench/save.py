#!/usr/bin/env python3
"""Benchmark: confidential save and restore of one populated guest by a real `migd serve` daemon.

For each private fraction (``--private-fraction``, repeatable or a list), a daemon on
127.0.0.1 boots a guest populated like bench/migrate.py's (its workload's ``populate_fraction``
and ``shared_fraction``; idle by default), saves it (live by default) to a file in ``--dir``,
restores it from that file on the same host and waits for the restored guest's self-check of
every page. Measured: save and restore throughput in MiB of guest per second (the job's
``total_time_ms``, from the REST request to ``completed``; a restore's ends before the
self-check), rounds, the file's size and allocated size (``st_blocks * 512``) against the
guest's, each daemon run's CPU time and peak RssAnon, how busy the machine was.

The limit each is compared with is measured in the same repetition, in one process, over the
guest's own page runs (``bench.migrate.guest_runs``) cut as the file cuts them
(``FILE_RUN_PAGES``), into a fresh RAM file:

    save limit    = SEND path + sequential write      (serial: the save does both on one thread)
    restore limit = RECEIVE path + sequential read

* SEND path: SEND_UPDATE_DATA of each private run into a buffer; a shared run copied into the
  buffer and authenticated as the format requires (``save_format.shared_mac``).
* sequential write: as many bytes as the save writes (page slots and page table), in 1 MiB
  writes to a new file in the same directory as the save file, then fsync (the save fsyncs too).
* RECEIVE path: RECEIVE_UPDATE_DATA of each private packet with its sequence number (an
  unordered session, as a restore opens), a shared run's MAC checked, then written; into a fresh
  RAM file (first touch, as the restored guest's).
* sequential read: the written file read back in 1 MiB reads (page cache as the restore found
  its file: hot right after the save, cold with ``--cold-read``, which drops both files' cached
  pages with ``posix_fadvise(DONTNEED)`` first).

``ratio = limit time / measured time`` (both in MiB of guest per second); ``*_overlapped`` is
the ratio against max(the two parts) instead of their sum: what a save or restore pipelining
crypto and I/O on two threads could reach at best. The sum is not a hard bound: the kernel's
readahead (and, before the fsync, its write-behind) already overlaps some file I/O with a
single-threaded job's CPU work, so a job whose I/O part is large (``--cold-read``) can pass it
(measured: restore ratio 1.19, overlapped 0.95, 2 GiB at 50 % with a cold read). ``send_path_chunk_runs`` is SEND over the
runs a migration's source cuts (up to 512 pages) instead of the file's 32: the cost of the
file's shorter runs. Medians over ``--repeats``; one JSON line. Not a test: nothing here
asserts a time (read the ratio).

    python bench/save.py --quick
    python bench/save.py --memory-mib 2048 --private-fraction 0 0.5 1 --warm-host-memory-gib 8
    python bench/save.py --private-fraction 0.5 --no-live --cold-read --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.migrate import (  # noqa: E402
    _cpu_seconds, _machine_ticks, _populated, _rss_anon_kib, guest_runs, warm_host_memory,
)
from migd.abi import PAGE_SIZE, MiB  # noqa: E402
from migd.cli.client import MigdClient  # noqa: E402
from migd.cli.demo import DemoWorkspace  # noqa: E402
from migd.platform import identity  # noqa: E402
from migd.platform.memory import GuestRam, MemoryEncryption  # noqa: E402
from migd.platform.psp import PspFirmware  # noqa: E402
from migd.save_format import ENTRY_SIZE, FILE_NONCE_SIZE, FILE_RUN_PAGES, shared_mac  # noqa: E402

IO_CHUNK = 1 << 20
FINAL = ("completed", "failed", "cancelled")


# ---------------------------------------------------------------------- limits, same machine, same run


def file_runs(runs: list[tuple[int, int, bool]]) -> list[tuple[int, int, bool]]:
    """The guest's runs cut as a save file holds them: at most FILE_RUN_PAGES pages each."""
    return [(first + at, min(FILE_RUN_PAGES, count - at), private)
            for first, count, private in runs for at in range(0, count, FILE_RUN_PAGES)]


def firmware_paths_s(memory_mib: int, private_fraction: float, populated_fraction: float) -> dict[str, float]:
    """Seconds of the SEND path (file runs and chunk runs) and the RECEIVE path over the guest's runs.

    One host, as a save for this host and its restore: SEND_START to its own PDH with a file
    nonce, RECEIVE_START of the same session unordered. The source RAM file is filled first
    (untimed) with the guest's mix; each run is sealed, timed, then opened, timed, so nothing
    is buffered beyond one run; the destination is a fresh RAM file (first touch).
    """
    runs = guest_runs(memory_mib, private_fraction, populated_fraction)
    npages = memory_mib * MiB // PAGE_SIZE
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="migd-bench-save-", dir=shm) as d:
        tmp = Path(d)
        identity.init_host(tmp / "host", tmp / "ca", common_name="host")
        fw = PspFirmware.from_state_dir(tmp / "host", [tmp / "ca" / identity.CA_CERT])
        with GuestRam(tmp / "src.ram", npages, create=True) as src, \
                GuestRam(tmp / "dst.ram", npages, create=True) as dst:
            handle = fw.launch(0)
            engine = MemoryEncryption(fw.guest_key(handle))
            block = os.urandom(max((count for _, count, _ in runs), default=1) * PAGE_SIZE)
            for first, count, private in runs:
                data = memoryview(block)[: count * PAGE_SIZE]
                if private:
                    engine.write_private(src, first * PAGE_SIZE, data)
                else:
                    src.write(first * PAGE_SIZE, data)
            out = bytearray(len(block))
            # SEND over the runs a migration's source cuts: only to show what the file's runs cost.
            fw.send_start(handle, fw.pdh_cert_pem, os.urandom(FILE_NONCE_SIZE))
            t0 = time.perf_counter()
            for first, count, private in runs:
                if private:
                    fw.send_update_data(handle, src, first * PAGE_SIZE, count, out)
            chunk_private_s = time.perf_counter() - t0
            fw.send_cancel(handle)

            nonce = os.urandom(FILE_NONCE_SIZE)
            start = fw.send_start(handle, fw.pdh_cert_pem, nonce)
            key = start.handoff_key
            assert key is not None
            receiver = fw.receive_start(start.policy, start.pdh_cert_pem, start.session_blob, nonce, ordered=False)
            send_s = receive_s = shared_send_s = 0.0
            shared_seq = 0
            for first, count, private in file_runs(runs):
                gpa = first * PAGE_SIZE
                t0 = time.perf_counter()
                if private:
                    seq = fw.transport_sequence(handle)
                    header, payload = fw.send_update_data(handle, src, gpa, count, out)
                else:
                    payload = memoryview(out)[: count * PAGE_SIZE]
                    payload[:] = src.view(gpa, count)
                    seq, shared_seq = shared_seq, shared_seq + 1
                    header = shared_mac(key, gpa, count, seq, payload)
                t1 = time.perf_counter()
                if private:
                    fw.receive_update_data(receiver, dst, gpa, count, header, payload, sequence=seq)
                else:
                    if shared_mac(key, gpa, count, seq, payload) != header:
                        raise RuntimeError(f"shared run at {gpa:#x} does not verify")
                    dst.write(gpa, payload)
                t2 = time.perf_counter()
                send_s += t1 - t0
                receive_s += t2 - t1
                if not private:
                    shared_send_s += t1 - t0
            fw.decommission(receiver)
            fw.decommission(handle)
    return {"send": send_s, "receive": receive_s, "send_chunk_runs": chunk_private_s + shared_send_s,
            "populated_bytes": sum(count for _, count, _ in runs) * PAGE_SIZE}


def sequential_io_s(directory: Path, nbytes: int, *, cold_read: bool) -> tuple[float, float]:
    """Seconds to write ``nbytes`` sequentially to a new file in ``directory`` (with fsync), and to read them back."""
    payload = memoryview(os.urandom(IO_CHUNK))
    path = directory / f".bench-seq-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        t0 = time.perf_counter()
        left = nbytes
        while left:
            left -= os.write(fd, payload[: min(IO_CHUNK, left)])
        os.fsync(fd)
        write_s = time.perf_counter() - t0
        if cold_read:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        buf = bytearray(IO_CHUNK)
        os.lseek(fd, 0, os.SEEK_SET)
        t0 = time.perf_counter()
        with open(fd, "rb", buffering=0, closefd=False) as f:
            got = 0
            while n := f.readinto(buf):
                got += n
        read_s = time.perf_counter() - t0
        if got != nbytes:
            raise RuntimeError(f"read back {got} of {nbytes} bytes")
    finally:
        os.close(fd)
        path.unlink()
    return write_s, read_s


def measure_limit(args: argparse.Namespace, fraction: float, directory: Path) -> dict[str, Any]:
    """The save and restore limits of one repetition, in MiB of guest per second, and their parts."""
    fw = firmware_paths_s(args.memory_mib, fraction, args.populated_fraction)
    npages = args.memory_mib * MiB // PAGE_SIZE
    written = fw["populated_bytes"] + npages * ENTRY_SIZE  # page slots and the page table
    write_s, read_s = sequential_io_s(directory, written, cold_read=args.cold_read)
    rate = lambda seconds: round(args.memory_mib / seconds, 1) if seconds > 0 else None  # noqa: E731
    return {
        "send_path": rate(fw["send"]), "send_path_chunk_runs": rate(fw["send_chunk_runs"]),
        "sequential_write": rate(write_s), "save": rate(fw["send"] + write_s),
        "save_overlapped": rate(max(fw["send"], write_s)),
        "receive_path": rate(fw["receive"]), "sequential_read": rate(read_s),
        "restore": rate(fw["receive"] + read_s), "restore_overlapped": rate(max(fw["receive"], read_s)),
        "io_bytes": written,
    }


# ---------------------------------------------------------------------- one save and restore


async def _job(api: MigdClient, job: dict[str, Any], pid: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Poll a save or restore job to its end; returns it and the daemon's CPU s, peak RssAnon, machine busy."""
    cpu0, ticks0, peak = _cpu_seconds(pid), _machine_ticks(), 0
    while True:
        peak = max(peak, _rss_anon_kib(pid))
        job = await api.migration(job["id"])
        if job["status"] in FINAL:
            break
        await asyncio.sleep(0.05)
    ticks1 = _machine_ticks()
    busy = (ticks1[0] - ticks0[0]) / max(1, ticks1[1] - ticks0[1])
    return job, {"cpu_s": round(_cpu_seconds(pid) - cpu0, 2), "rss_anon_mib": round(peak / 1024, 1),
                 "machine_busy": round(busy, 2)}


async def _self_check(api: MigdClient, name: str, timeout: float = 600.0) -> dict[str, Any]:
    """The restored guest's self-check once it covered every page (or found an error)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        guest = await api.guest(name)
        if guest["check"]["pages_verified"] == guest["pages"]["total"] or guest["check"]["errors"]:
            return guest["check"]
        await asyncio.sleep(0.1)
    raise TimeoutError(f"the restored guest's self-check did not finish within {timeout} s")


def _drop_cache(path: Path) -> None:
    """Evict a (fsync'ed, so clean) file's pages from the page cache: the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


async def one_round_trip(args: argparse.Namespace, fraction: float, directory: Path) -> dict[str, Any]:
    """One daemon, one guest: save it to a file, restore it, check it; returns the measured numbers."""
    workspace = DemoWorkspace.create(tls=False)
    del workspace.hosts[1:]  # one host saves and restores: the second daemon would only idle
    path = directory / "bench.save"
    try:
        workspace.start_daemons()
        host = workspace.hosts[0]
        assert host.proc is not None
        pid = host.proc.pid
        async with MigdClient(host.api, host.token) as api:
            for _ in range(300):
                try:
                    await api.health()
                    break
                except Exception:  # the daemon is still starting
                    await asyncio.sleep(0.05)
            await api.create_guest("bench", args.memory_mib)
            await api.start_guest("bench", {
                "dirty_rate_mib_s": args.dirty_rate_mib_s, "convert_rate_hz": 0, "seed": 1,
                "populate_fraction": args.populated_fraction, "shared_fraction": 1.0 - fraction,
            })
            ram = workspace.memory_file(host, "bench")
            await _populated(ram, int(args.memory_mib * MiB * args.populated_fraction * 0.97), 600)
            while not (await api.guest("bench"))["migration_control"]["ready"]:
                await asyncio.sleep(0.05)
            await asyncio.sleep(args.settle_s)
            save, save_use = await _job(api, await api.save_guest("bench", str(path), live=args.live), pid)
            info = path.stat() if path.exists() else None
            restore = check = None
            restore_use: dict[str, float] = {}
            if save["status"] == "completed" and info is not None:
                if args.cold_read:
                    _drop_cache(path)
                await asyncio.sleep(args.settle_s)
                restore, restore_use = await _job(api, await api.restore_guest(str(path)), pid)
                if restore["status"] == "completed":
                    check = await _self_check(api, "bench")
    finally:
        workspace.close(keep=False)
        path.unlink(missing_ok=True)
    # Measured after the daemon is gone and after the same settle time, as bench/migrate.py does:
    # the limit's fresh RAM file then starts from memory in the state the restore's did.
    await asyncio.sleep(args.settle_s)
    limit = None if args.no_limit else measure_limit(args, fraction, directory)
    guest_mib = args.memory_mib

    def rate(job: dict[str, Any] | None) -> float | None:
        if job is None or job["status"] != "completed" or not job["total_time_ms"]:
            return None
        return guest_mib / (job["total_time_ms"] / 1000.0)

    def ratio(measured: float | None, key: str) -> float | None:
        return round(measured / limit[key], 3) if measured and limit and limit[key] else None

    save_rate, restore_rate = rate(save), rate(restore)
    return {
        "save_status": save["status"], "restore_status": None if restore is None else restore["status"],
        "errors": [j["error"] for j in (save, restore) if j is not None and j["error"]],
        "save_mib_s": save_rate, "restore_mib_s": restore_rate,
        "save_ms": save["total_time_ms"], "restore_ms": None if restore is None else restore["total_time_ms"],
        "save_rounds": save["rounds"], "save_pages": save["pages"],
        "save_ratio": ratio(save_rate, "save"), "save_ratio_overlapped": ratio(save_rate, "save_overlapped"),
        "restore_ratio": ratio(restore_rate, "restore"),
        "restore_ratio_overlapped": ratio(restore_rate, "restore_overlapped"),
        "limit_mib_s": limit,
        "file_mib": None if info is None else round(info.st_size / MiB, 1),
        "file_allocated_mib": None if info is None else round(info.st_blocks * 512 / MiB, 1),
        "save_use": save_use, "restore_use": restore_use,
        "self_check": check,
    }


def summarize(fraction: float, reps: list[dict[str, Any]], memory_mib: int) -> dict[str, Any]:
    """Medians of the repetitions at one private fraction, and each repetition's key figures."""
    done = [r for r in reps if r["save_status"] == "completed" and r["restore_status"] == "completed"]

    def med(key: str, digits: int = 1) -> float | None:
        values = [r[key] for r in done if r[key] is not None]
        return round(statistics.median(values), digits) if values else None

    def med_limit(key: str) -> float | None:
        values = [r["limit_mib_s"][key] for r in done if r["limit_mib_s"] and r["limit_mib_s"][key]]
        return round(statistics.median(values), 1) if values else None

    last = done[-1] if done else (reps[-1] if reps else None)
    return {
        "private_fraction": fraction,
        "completed": len(done),
        "save_mib_s": med("save_mib_s"), "save_limit_mib_s": med_limit("save"),
        "save_ratio": med("save_ratio", 3), "save_ratio_overlapped": med("save_ratio_overlapped", 3),
        "restore_mib_s": med("restore_mib_s"), "restore_limit_mib_s": med_limit("restore"),
        "restore_ratio": med("restore_ratio", 3), "restore_ratio_overlapped": med("restore_ratio_overlapped", 3),
        "limit_parts_mib_s": {k: med_limit(k) for k in (
            "send_path", "send_path_chunk_runs", "sequential_write", "receive_path", "sequential_read")},
        "save_ms": med("save_ms"), "restore_ms": med("restore_ms"), "save_rounds": med("save_rounds", 0),
        "guest_mib": memory_mib,
        "file_mib": None if last is None else last["file_mib"],
        "file_allocated_mib": None if last is None else last["file_allocated_mib"],
        "file_vs_guest": None if last is None or last["file_mib"] is None else round(last["file_mib"] / memory_mib, 4),
        "allocated_vs_guest": None if last is None or last["file_allocated_mib"] is None
        else round(last["file_allocated_mib"] / memory_mib, 4),
        "save_pages": None if last is None else last["save_pages"],
        "self_check_each": [r["self_check"] for r in reps],
        "save_mib_s_each": [r["save_mib_s"] and round(r["save_mib_s"], 1) for r in reps],
        "restore_mib_s_each": [r["restore_mib_s"] and round(r["restore_mib_s"], 1) for r in reps],
        "save_ratio_each": [r["save_ratio"] for r in reps],
        "restore_ratio_each": [r["restore_ratio"] for r in reps],
        "daemon_use_each": [{"save": r["save_use"], "restore": r["restore_use"]} for r in reps],
        "errors": [e for r in reps for e in r["errors"]],
    }


def _fractions(values: list[str]) -> list[float]:
    """``--private-fraction`` given repeatedly, as a list, or comma-separated: each in [0, 1]."""
    out = [float(part) for value in values for part in value.split(",") if part.strip()]
    if not out or not all(0.0 <= f <= 1.0 for f in out):
        raise argparse.ArgumentTypeError(f"private fractions must be in [0, 1], got {values}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="256 MiB, one repetition")
    parser.add_argument("--memory-mib", type=int, default=2048)
    parser.add_argument("--private-fraction", nargs="+", action="extend", default=None, metavar="F",
                        help="fractions of private pages (repeatable, or a list: 0 0.5 1, or 0,0.5,1); "
                             "default 0 0.5 1")
    parser.add_argument("--populated-fraction", type=float, default=1.0)
    parser.add_argument("--dirty-rate-mib-s", type=float, default=0.0)
    parser.add_argument("--no-live", dest="live", action="store_false",
                        help="pause the guest for the whole save instead of pre-copying while it runs")
    parser.add_argument("--cold-read", action="store_true",
                        help="drop the save file's cached pages before the restore (and the read baseline's)")
    parser.add_argument("--dir", type=Path, default=ROOT / "build",
                        help="where the save file and the I/O baseline's file go (default: build/)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--settle-s", type=float, default=4.0,
                        help="idle seconds before the save, before the restore and before the limit")
    parser.add_argument("--no-limit", action="store_true", help="skip the limit measurement")
    parser.add_argument("--warm-host-memory-gib", type=float, default=0.0,
                        help="hold free page reporting and pre-touch this much memory (bench/migrate.py's "
                             "warm_host_memory; root; e.g. 4x the guest size)")
    args = parser.parse_args(argv)
    try:
        fractions = _fractions(args.private_fraction or ["0", "0.5", "1"])
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(str(exc))
    if args.quick:
        args.memory_mib, args.repeats = min(args.memory_mib, 256), 1
    if args.memory_mib < 16 or args.repeats < 1:
        parser.error(f"need --memory-mib >= 16 and --repeats >= 1, got {args.memory_mib}, {args.repeats}")
    args.dir.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="migd-bench-save-", dir=args.dir.resolve()))
    started = time.perf_counter()
    try:
        with warm_host_memory(args.warm_host_memory_gib) as host_memory:
            results = [summarize(f, [asyncio.run(one_round_trip(args, f, directory)) for _ in range(args.repeats)],
                                 args.memory_mib) for f in fractions]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    fs = os.statvfs(args.dir)
    print(json.dumps({
        "memory_mib": args.memory_mib, "populated_fraction": args.populated_fraction, "live": args.live,
        "dirty_rate_mib_s": args.dirty_rate_mib_s, "cold_read": args.cold_read, "repeats": args.repeats,
        "dir": str(args.dir), "dir_free_gib": round(fs.f_bavail * fs.f_frsize / (1 << 30), 1),
        "results": results, "host_memory": host_memory, "elapsed_s": round(time.perf_counter() - started, 1),
    }))
    return 0 if all(r["completed"] == args.repeats for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
