#!/usr/bin/env python3
"""Benchmark: the migration stream over mutual TLS against plain TCP, by TLS write size.

A sender (this process) writes SHARED_PAGES frames of 512 pages through migd's own
``FrameProtocol`` to a receiver in a second process over 127.0.0.1, under uvloop, as the
daemons do; the receiver places nothing (it only counts pages), so what is measured is the
stream: framing, CRC, TCP and, with TLS, the record layer on both ends. Each configuration —
plain TCP, then TLS with frames handed to the transport in writes of at most 16 KiB, 64 KiB
(migd's ``TLS_WRITE_BYTES``), 256 KiB, or whole frames (one ``writelines`` per frame, before
``TLS_WRITE_BYTES`` existed) — runs once per repetition in turn; the JSON line gives each one's
median MiB/s, sender and receiver core-s/GiB, and throughput as a fraction of plain TCP in
the same run. Not a test: nothing here asserts a time.

    python bench/tls.py [--mib 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from migd import stream, wire  # noqa: E402
from migd.errors import MigdError  # noqa: E402
from migd.abi import PAGE_SIZE, GiB, MiB  # noqa: E402
from migd.page_pipeline import PageFrame  # noqa: E402
from migd.platform import identity  # noqa: E402
from migd.platform.pki_verify import tls_client_context, tls_server_context  # noqa: E402

RUN_PAGES = wire.MAX_RUN_PAGES
#: TLS write sizes compared; None = a whole frame in one ``writelines`` (no batching).
WRITE_SIZES: tuple[int | None, ...] = (16 << 10, 64 << 10, 256 << 10, None)
WAIT_S = 60.0  # bound on every wait for the other process


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _receive(port_file: Path, total_pages: int, tls: dict[str, str] | None) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    pages = 0
    started: list[float] = []

    def on_pages(frame: PageFrame) -> None:
        nonlocal pages
        if not started:
            started.append(_cpu_s())
        pages += frame.npages
        if pages >= total_pages and not done.done():
            done.set_result(None)

    context = tls_server_context(tls["ca"], tls["cert"], tls["key"]) if tls else None
    server = await loop.create_server(lambda: stream.FrameProtocol(on_pages), "127.0.0.1", 0, ssl=context)
    port_file.write_text(str(server.sockets[0].getsockname()[1]))
    try:
        async with asyncio.timeout(WAIT_S):
            await done
    except TimeoutError:
        raise RuntimeError(f"the receiver got {pages} of {total_pages} pages in {WAIT_S:.0f} s") from None
    used = _cpu_s() - started[0]
    server.close()
    return {"receiver_cpu_s": used}


async def _send(port: int, total_pages: int, tls: dict[str, str] | None) -> dict[str, float]:
    context = tls_client_context(tls["ca"], tls["cert"], tls["key"]) if tls else None
    proto = await stream.open_stream("127.0.0.1", port, ssl_context=context, timeout=WAIT_S)
    payload = memoryview(os.urandom(RUN_PAGES * PAGE_SIZE))
    cpu0, t0 = _cpu_s(), time.perf_counter()
    for first in range(0, total_pages, RUN_PAGES):
        proto.write(wire.SharedPages(first * PAGE_SIZE, RUN_PAGES, payload))
        await asyncio.wait_for(proto.drain(), WAIT_S)
    # The receiver closes once it has every page: the time includes their delivery.
    with contextlib.suppress(MigdError):
        await proto.receive(WAIT_S)
    return {"sender_cpu_s": _cpu_s() - cpu0, "sender_wall_s": time.perf_counter() - t0}


def _one(total_pages: int, tls: dict[str, str] | None, write_bytes: int | None, tmp: Path) -> dict[str, float]:
    """One transfer: a receiver process, this process sending; returns both sides' figures."""
    port_file = tmp / "port"
    port_file.unlink(missing_ok=True)
    receiver = subprocess.Popen(
        [sys.executable, __file__, "--receive", str(port_file), "--pages", str(total_pages)]
        + (["--tls-files", json.dumps(tls)] if tls else []),
        stdout=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + WAIT_S
        while not port_file.exists() or not port_file.read_text():
            if receiver.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the receiver did not start")
            time.sleep(0.01)
        stream.TLS_WRITE_BYTES = write_bytes if write_bytes is not None else 1 << 40
        sent = uvloop.run(_send(int(port_file.read_text()), total_pages, tls))
        out, _ = receiver.communicate(timeout=WAIT_S)
    finally:
        if receiver.poll() is None:
            receiver.kill()
            receiver.wait()
    return {**sent, **json.loads(out.strip().splitlines()[-1])}


def run(mib: int, repeats: int) -> dict[str, object]:
    """Every configuration ``repeats`` times, in turn; medians per configuration."""
    total_pages = mib * MiB // PAGE_SIZE
    gib = total_pages * PAGE_SIZE / GiB
    default = stream.TLS_WRITE_BYTES
    with tempfile.TemporaryDirectory(prefix="migd-bench-tls-") as tmp_name:
        tmp = Path(tmp_name)
        files = identity.init_host(tmp / "host", tmp / "ca", common_name="bench")
        tls = {"ca": str(files["ca_cert"]), "cert": str(files["tls_cert"]), "key": str(files["tls_key"])}
        configs: list[tuple[str, dict[str, str] | None, int | None]] = [("tcp", None, None)]
        configs += [(f"tls_{size >> 10}k" if size else "tls_whole_frame", tls, size) for size in WRITE_SIZES]
        each: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in configs}
        for _ in range(repeats):
            for name, files_or_none, size in configs:
                each[name].append(_one(total_pages, files_or_none, size, tmp))
    stream.TLS_WRITE_BYTES = default
    result: dict[str, object] = {"mib": mib, "repeats": repeats, "tls_write_bytes_default": default}
    tcp_mib_s = [total_pages * PAGE_SIZE / MiB / r["sender_wall_s"] for r in each["tcp"]]
    for name, runs in each.items():
        mib_s = [total_pages * PAGE_SIZE / MiB / r["sender_wall_s"] for r in runs]
        result[name] = {
            "mib_s": round(statistics.median(mib_s), 1),
            "vs_tcp": round(statistics.median(m / t for m, t in zip(mib_s, tcp_mib_s)), 3),
            "sender_core_s_per_gib": round(statistics.median(r["sender_cpu_s"] for r in runs) / gib, 3),
            "receiver_core_s_per_gib": round(statistics.median(r["receiver_cpu_s"] for r in runs) / gib, 3),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=1024, help="MiB sent per transfer")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--receive", type=Path, help=argparse.SUPPRESS)  # the receiver process
    parser.add_argument("--pages", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tls-files", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive is not None:
        tls = json.loads(args.tls_files) if args.tls_files else None
        print(json.dumps(uvloop.run(_receive(args.receive, args.pages, tls))), flush=True)
        return
    if args.mib < 64 or args.repeats < 1:
        parser.error("--mib must be at least 64 and --repeats at least 1")
    print(json.dumps(run(args.mib, args.repeats)))


if __name__ == "__main__":
    main()
