#!/usr/bin/env python3
"""Benchmark: the CPU budget of one migrated byte, stage by stage, and the bound it sets.

Issue 7 asks migd's throughput to reach 0.70 x the limit of bench/migrate.py
(min(raw loopback TCP, SEND path alone, RECEIVE path alone)) on a 2-core machine where both
daemons and the guest share the cores. This script says what that can reach at best, from
the CPU cost (core-seconds per GiB: ``time.thread_time()``, not wall time, so other work on
a shared machine does not inflate it) of every stage a migrated byte goes through, each run
alone, single-threaded, with migd's own code over the same page runs as bench/migrate.py's
guest (``guest_runs``, fully populated):

    source daemon (event loop)       classify (zero scan + bitmap)   page_runs.classify
                                     SEND_UPDATE_DATA | copy         PspFirmware.send_update_data / GuestRam.read
                                     frame CRC                       wire._crc (ISA-L if importable, else zlib)
                                     TCP send                        sendall of 2 MiB frames
    destination daemon (event loop)  TCP receive                     recv_into a preallocated buffer
                                     frame CRC                       wire._crc
                                     copy to the pipeline buffer     bytearray slice assignment (stream.py),
                                                                     private runs only
    destination page worker          RECEIVE_UPDATE_DATA | write     PspFirmware.receive_update_data / GuestRam.write,
                                                                     into a fresh RAM file (first touch)

Model and assumptions:

* The guest agents are idle (bench/migrate.py's default dirty rate 0): all CPU goes to the
  two daemons' event loops and the destination's page worker. Everything else (msgpack,
  asyncio/uvloop callbacks, progress, GIL hand-offs) is left out, so the sum is a floor.
* ``bound = 2 cores / sum(stage costs)``: perfect overlap of the three threads on two cores,
  an optimistic assumption, so ``bound`` is an upper bound on what migd can reach.
  ``bound_threads`` also applies that no thread can go faster than one core
  (1 / its own stages); ``bound_effective`` is the smaller of the two.
* ``limit_cpu`` is the limit computed as bench/migrate.py defines it, from these CPU costs:
  min(1 / max(TCP send, TCP receive) [two threads, two cores], 1 / SEND path,
  1 / RECEIVE path (fresh file)). ``limit_wall`` is the same from wall-clock rates, the way
  bench/migrate.py measures it (its ``limit_mib_s``). ``bound_ratio = bound / limit_cpu``;
  ``bound_ratio_wall = bound / limit_wall``. Two what-ifs: ``bound_wall_costs`` (the same sum
  from wall times) and ``bound_if_zlib_crc`` (zlib's CRC at both ends instead of ISA-L's).
* First touch: on a VM with free page reporting (Firecracker, ``page_reporting`` on the
  kernel command line) host-fresh memory costs a host fault per page; whether that shows as
  the guest thread's CPU time or only as wall time depends on the hypervisor's steal-time
  accounting, so ``receive_fresh`` gives both. On the 2-core Firecracker VM this was written
  on they agree: host faults are charged to the guest thread. Pages freed a moment ago (an
  earlier repetition's files) come back cheap, so the 256 MiB default mostly sees recycled
  memory (fresh ~0.2 s/GiB above ``receive_rewrite``, the floor), whereas ``--mib 2048
  --repeats 1`` (~45 s, bench/migrate.py's guest size) lands on host-fresh memory (measured:
  2.8 s/GiB fresh vs 0.15 rewrite for shared pages, ~360 MiB/s). ``minor_faults_per_gib``
  tells which stages fault.
* Each stage runs alone in one thread, as in the daemon; in particular the CRC is measured in
  a loop of its own (see :func:`page_stages`).

Comparing with reality: bench/migrate.py prints ``daemon_cpu_s`` (a list of
{"source": s, "destination": s} per repetition: utime + stime of each daemon process during
the migration) and ``bytes_transferred``. Measured cost per GiB = ``(source + destination) /
(bytes_transferred / 2**30)``; compare it with ``stage_sum_cpu_s_per_gib`` here (per side:
``source_cpu_s_per_gib``, ``destination_cpu_s_per_gib``). The difference is the per-frame
Python overhead this model leaves out. ``machine_busy_each`` there tells whether the two
cores were actually saturated (1.0) or the pipeline stalled.

    python bench/cpu_budget.py
    python bench/cpu_budget.py --private-fraction 0.5 --mib 512 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.migrate import guest_runs  # noqa: E402
from migd import wire  # noqa: E402
from migd.platform import identity
from migd.abi import PAGE_SIZE, MiB  # noqa: E402
from migd.bitmap import PageBitmap  # noqa: E402
from migd.platform.memory import GuestRam, MemoryEncryption  # noqa: E402
from migd.page_runs import chunks, classify  # noqa: E402
from migd.platform.psp import PspFirmware  # noqa: E402

GiB = 1 << 30
FRAME = wire.MAX_RUN_PAGES * PAGE_SIZE  # one page frame's payload (2 MiB)
CORES = 2
#: A frame's head (prefix + msgpack metadata) is a few dozen bytes; its CRC cost is the payload's.
_HEAD = bytes(48)


@dataclass
class Meter:
    """Accumulated thread CPU time, wall time and minor page faults of one stage."""

    cpu_s: float = 0.0
    wall_s: float = 0.0
    minor_faults: int = 0

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Add the enclosed block's thread CPU time, wall time and minor page faults."""
        f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        c0, w0 = time.thread_time(), time.perf_counter()
        yield
        self.cpu_s += time.thread_time() - c0
        self.wall_s += time.perf_counter() - w0
        self.minor_faults += resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0


@dataclass
class Repetition:
    """The stage meters of one repetition at one private fraction, and the bytes they covered."""

    nbytes: int = 0
    meters: dict[str, Meter] = field(default_factory=dict)

    def meter(self, stage: str) -> Meter:
        """The meter of ``stage``, new on first use."""
        return self.meters.setdefault(stage, Meter())

    def costs(self) -> dict[str, tuple[float, float, float]]:
        """Stage -> (cpu seconds, wall seconds, minor page faults) per GiB."""
        scale = GiB / self.nbytes
        return {name: (m.cpu_s * scale, m.wall_s * scale, m.minor_faults * scale) for name, m in self.meters.items()}


# ---------------------------------------------------------------------- kernel TCP


def tcp_costs(total_mib: int) -> dict[str, tuple[float, float, float]]:
    """Loopback TCP in 2 MiB frames, each side in its own thread: {"tcp_send"|"tcp_receive": costs per GiB}."""
    server = socket.socket()
    server.settimeout(30.0)  # a sender that never connects must not leave the receiver in accept()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    received = [0]
    meters = {"tcp_send": Meter(), "tcp_receive": Meter()}
    errors: list[BaseException] = []

    def receive() -> None:
        try:
            conn, _ = server.accept()
            conn.settimeout(30.0)
            view = memoryview(bytearray(FRAME))
            with conn, meters["tcp_receive"].timed():
                while n := conn.recv_into(view):
                    received[0] += n
        except OSError as exc:  # reported below: a broken measurement must not look like a number
            errors.append(exc)

    thread = threading.Thread(target=receive, name="tcp-receive")
    thread.start()
    payload = memoryview(os.urandom(FRAME))
    try:
        with socket.create_connection(("127.0.0.1", port)) as sender, meters["tcp_send"].timed():
            for _ in range(total_mib * MiB // FRAME):
                sender.sendall(payload)
    finally:
        thread.join()
        server.close()
    if errors or received[0] != total_mib * MiB // FRAME * FRAME:
        raise RuntimeError(f"TCP receiver got {received[0]} bytes: {errors}")
    scale = GiB / received[0]
    return {name: (m.cpu_s * scale, m.wall_s * scale, m.minor_faults * scale) for name, m in meters.items()}


# ---------------------------------------------------------------------- page stages


def page_stages(tmp: Path, hosts: tuple[PspFirmware, PspFirmware], mib: int, private_fraction: float) -> Repetition:
    """Every page stage but TCP over the guest's runs at ``private_fraction``, in fresh RAM files."""
    a, b = hosts
    npages = mib * MiB // PAGE_SIZE
    runs = guest_runs(mib, private_fraction, 1.0)
    rep = Repetition(nbytes=sum(count for _, count, _ in runs) * PAGE_SIZE)
    shared_bitmap = PageBitmap(npages)
    paths = [tmp / f"{name}-{os.getpid()}.ram" for name in ("src", "dst", "warmup")]
    try:
        with GuestRam(paths[0], npages, create=True) as src, GuestRam(paths[1], npages, create=True) as dst, \
                GuestRam(paths[2], npages, create=True) as warmup:
            handle = a.launch(0)
            engine = MemoryEncryption(a.guest_key(handle))
            block = os.urandom(FRAME)
            for first, count, private in runs:  # the guest's memory, untimed
                data = memoryview(block)[: count * PAGE_SIZE]
                if private:
                    engine.write_private(src, first * PAGE_SIZE, data)
                else:
                    src.write(first * PAGE_SIZE, data)
                    shared_bitmap.set_range(first, count)
            start = a.send_start(handle, b.pdh_cert_pem)
            dst_handle = b.receive_start(start.policy, start.pdh_cert_pem, start.session_blob)

            # Source: the classify scan of every chunk (source.py _send_step), over the guest.
            for first, count in chunks(np.array([0]), np.array([npages])):
                with rep.meter("classify").timed():
                    classify(shared_bitmap, src, first, count)

            # The frame CRC, both ends (wire.FrameEncoder / FrameDecoder), in a loop of its own:
            # its cost does not depend on the bytes, and run right before RECEIVE_UPDATE_DATA in
            # one thread, ISA-L's vector code slowed the AES that follows by ~0.5 s/GiB, which
            # the daemon never does (the destination's CRC and RECEIVE run in two threads).
            for seq, (first, count, _) in enumerate(runs):
                frame = src.view(first * PAGE_SIZE, count)
                with rep.meter("crc").timed():
                    wire._crc(seq, _HEAD, frame)
                with rep.meter("crc_zlib").timed():
                    zlib.crc32(frame, zlib.crc32(_HEAD, zlib.crc32(seq.to_bytes(8, "big"))))
                frame.release()

            pipeline = bytearray(FRAME)
            # Untimed warm-up (first ~32 MiB, into a scratch file), so that the timed passes see
            # the allocator's steady state for transient buffers (numpy masks, run buffers), as a
            # long migration does: cold, the first pass took ~3800 minor faults per GiB.
            for first, count, private in runs[:16]:
                header, payload = (a.send_update_data(handle, src, first * PAGE_SIZE, count) if private
                                   else (b"", memoryview(src.read(first * PAGE_SIZE, count))))
                memoryview(pipeline)[: len(payload)] = payload
                if private:
                    b.receive_update_data(dst_handle, warmup, first * PAGE_SIZE, count, header,
                                          memoryview(pipeline)[: len(payload)])
            for rewrite in (False, True):
                # Pass 1 lands in a fresh file (first touch), pass 2 rewrites the same pages;
                # both send anew: the receiver accepts each packet once, in order.
                receive = rep.meter("receive_rewrite" if rewrite else "receive_fresh")
                send = rep.meter("send_again" if rewrite else "send")
                copy = rep.meter("pipeline_copy_again" if rewrite else "pipeline_copy")
                for first, count, private in runs:
                    gpa = first * PAGE_SIZE
                    with send.timed():  # as source.py _send_run calls it (no ``out``: a new buffer per run)
                        if private:
                            header, payload = a.send_update_data(handle, src, gpa, count)
                        else:
                            header, payload = b"", memoryview(src.read(gpa, count))
                    # stream.py _page_frame: the worker gets a private run as a copy in a reused
                    # pipeline buffer; a shared run is written from the receive buffer on the loop.
                    staged = memoryview(pipeline)[: len(payload)]
                    if private:
                        with copy.timed():
                            staged[:] = payload
                    else:
                        staged = payload
                    with receive.timed():  # as dest.py's page handler calls it
                        if private:
                            b.receive_update_data(dst_handle, dst, gpa, count, header, staged)
                        else:
                            dst.write(gpa, staged)
                    staged.release()
            b.decommission(dst_handle)
            a.decommission(handle)
    finally:
        for path in paths:
            path.unlink(missing_ok=True)
    return rep


# ---------------------------------------------------------------------- model


def _per_mib_s(cost_s_per_gib: float) -> float:
    return GiB / MiB / cost_s_per_gib


def model(costs: dict[str, tuple[float, float, float]]) -> dict[str, object]:
    """Limit, bound and ratios from median stage costs {stage: (cpu s, wall s, minor faults) per GiB}."""
    cpu = {k: v[0] for k, v in costs.items()}
    wall = {k: v[1] for k, v in costs.items()}
    faults = {k: round(v[2]) for k, v in costs.items()}
    source = cpu["classify"] + cpu["send"] + cpu["crc"] + cpu["tcp_send"]
    dest_loop = cpu["tcp_receive"] + cpu["crc"] + cpu["pipeline_copy"]
    dest_worker = cpu["receive_fresh"]
    total = source + dest_loop + dest_worker
    bound = CORES * _per_mib_s(total)
    bound_threads = min(_per_mib_s(source), _per_mib_s(dest_loop), _per_mib_s(dest_worker))
    limit_cpu = {
        "tcp_loopback": _per_mib_s(max(cpu["tcp_send"], cpu["tcp_receive"])),
        "send_path": _per_mib_s(cpu["send"]),
        "receive_path": _per_mib_s(cpu["receive_fresh"]),
    }
    limit_wall = {  # bench/migrate.py: TCP wall rate, SEND and RECEIVE paths' wall rates
        "tcp_loopback": _per_mib_s(wall["tcp_send"]),
        "send_path": _per_mib_s(wall["send"]),
        "receive_path": _per_mib_s(wall["receive_fresh"]),
    }
    lc, lw = min(limit_cpu.values()), min(limit_wall.values())
    zlib_total = total + 2 * (cpu["crc_zlib"] - cpu["crc"])
    wall_total = (wall["classify"] + wall["send"] + 2 * wall["crc"] + wall["tcp_send"] + wall["tcp_receive"]
                  + wall["pipeline_copy"] + wall["receive_fresh"])
    r = lambda x: round(x, 3)  # noqa: E731
    return {
        "cpu_s_per_gib": {k: r(v) for k, v in cpu.items()},
        "wall_s_per_gib": {k: r(v) for k, v in wall.items()},
        "minor_faults_per_gib": faults,
        "source_cpu_s_per_gib": r(source),
        "destination_cpu_s_per_gib": r(dest_loop + dest_worker),
        "destination_loop_cpu_s_per_gib": r(dest_loop),
        "stage_sum_cpu_s_per_gib": r(total),
        "limit_cpu_mib_s": {**{k: round(v, 1) for k, v in limit_cpu.items()}, "min": round(lc, 1)},
        "limit_wall_mib_s": {**{k: round(v, 1) for k, v in limit_wall.items()}, "min": round(lw, 1)},
        "bound_mib_s": round(bound, 1),
        "bound_threads_mib_s": round(bound_threads, 1),
        "bound_effective_mib_s": round(min(bound, bound_threads), 1),
        "bound_ratio": r(bound / lc),
        "bound_ratio_wall": r(bound / lw),
        "bound_effective_ratio_wall": r(min(bound, bound_threads) / lw),
        "bound_wall_costs_mib_s": round(CORES * _per_mib_s(wall_total), 1),
        "bound_if_zlib_crc_mib_s": round(CORES * _per_mib_s(zlib_total), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--private-fraction", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--mib", type=int, default=256, help="guest size sampled (MiB, fully populated)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.mib < 16 or args.repeats < 1 or not all(0.0 <= f <= 1.0 for f in args.private_fraction):
        parser.error(f"need --mib >= 16, --repeats >= 1, fractions in [0, 1]; got {args.mib}, "
                     f"{args.repeats}, {args.private_fraction}")
    started = time.perf_counter()
    shm = "/dev/shm" if Path("/dev/shm").is_dir() else None
    samples: dict[float, list[dict[str, tuple[float, float, float]]]] = {f: [] for f in args.private_fraction}
    with tempfile.TemporaryDirectory(prefix="migd-cpubudget-", dir=shm) as d:
        tmp = Path(d)
        for host in ("hostA", "hostB"):
            identity.init_host(tmp / host, tmp / "ca", common_name=host)
        anchors = [tmp / "ca" / identity.CA_CERT]
        hosts = (PspFirmware.from_state_dir(tmp / "hostA", anchors), PspFirmware.from_state_dir(tmp / "hostB", anchors))
        for _ in range(args.repeats):
            tcp = tcp_costs(args.mib)
            for fraction in args.private_fraction:
                samples[fraction].append({**page_stages(tmp, hosts, args.mib, fraction).costs(), **tcp})
    results = []
    for fraction, reps in samples.items():
        def med(stage: str, i: int) -> float:
            return statistics.median(s[stage][i] for s in reps)  # noqa: B023 (used at once)

        median = {k: (med(k, 0), med(k, 1), med(k, 2)) for k in reps[0]}
        results.append({"private_fraction": fraction, **model(median)})
    crc = wire._crc32
    print(json.dumps({
        "mib": args.mib,
        "repeats": args.repeats,
        "cores": CORES,
        "crc32": f"{getattr(crc, '__module__', None) or type(crc).__module__}.{crc.__name__}",
        "page_reporting": "page_reporting" in Path("/proc/cmdline").read_text(),
        "results": results,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
