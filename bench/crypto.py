#!/usr/bin/env python3
"""Benchmark: emulated firmware SEND_UPDATE_DATA + RECEIVE_UPDATE_DATA over page runs.

Prints, for runs of 1, 16, 64 and 256 pages, the MB/s of SEND alone, RECEIVE alone and
SEND+RECEIVE, next to plain AES-128-CTR over the same buffer measured in the same run, and
the ratio between them (machines are noisy: compare ratios, not absolute numbers).
Not a test: nothing here asserts a time.

    python bench/crypto.py [--quick] [--mib N] [--mode bound|sev-compat] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from migd.platform import identity
from migd.abi import PAGE_SIZE
from migd.platform.memory import GuestRam, MemoryEncryption
from migd.platform.psp import PspFirmware, SendStart
from migd.sev_transport import TransportMode

RUN_SIZES = (1, 16, 64, 256)


def _best_of(repeats: int, fn: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(total_mib: int, repeats: int, mode: TransportMode) -> list[dict[str, float]]:
    """Measure every run size over ``total_mib`` of private guest memory; one row per size."""
    npages = total_mib * 256
    with tempfile.TemporaryDirectory(prefix="migd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        for host in ("hostA", "hostB"):
            identity.init_host(tmp / host, tmp / "ca", common_name=host)
        anchors = [tmp / "ca" / identity.CA_CERT]
        a = PspFirmware.from_state_dir(tmp / "hostA", anchors, transport_mode=mode)
        b = PspFirmware.from_state_dir(tmp / "hostB", anchors, transport_mode=mode)
        src = GuestRam(tmp / "src.ram", npages, create=True)
        dst = GuestRam(tmp / "dst.ram", npages, create=True)
        handle = a.launch(0)
        MemoryEncryption(a.guest_key(handle)).write_private(src, 0, os.urandom(npages * PAGE_SIZE))
        buffer = bytearray(npages * PAGE_SIZE + 16)  # update_into wants block_size - 1 spare
        src_view = src.view(0, npages)
        rows = []
        for run_pages in RUN_SIZES:
            packets: list[tuple[int, bytes, bytes]] = []
            session: dict[str, object] = {}

            def send() -> None:
                start = a.send_start(handle, b.pdh_cert_pem)
                packets.clear()
                for gpa in range(0, npages * PAGE_SIZE, run_pages * PAGE_SIZE):
                    header, ct = a.send_update_data(handle, src, gpa, run_pages)
                    packets.append((gpa, header, bytes(ct)))
                a.send_cancel(handle)
                session["start"] = start

            def receive() -> None:
                start = session["start"]
                assert isinstance(start, SendStart)
                dst_handle = b.receive_start(start.policy, start.pdh_cert_pem, start.session_blob)
                for gpa, header, ct in packets:
                    b.receive_update_data(dst_handle, dst, gpa, run_pages, header, ct)
                b.decommission(dst_handle)

            def plain_ctr() -> None:
                enc = Cipher(algorithms.AES(bytes(16)), modes.CTR(bytes(16))).encryptor()
                for off in range(0, npages * PAGE_SIZE, run_pages * PAGE_SIZE):
                    end = off + run_pages * PAGE_SIZE
                    enc.update_into(src_view[off:end], memoryview(buffer)[off : end + 15])

            t_send = _best_of(repeats, send)
            t_recv = _best_of(repeats, receive)
            t_ctr = _best_of(repeats, plain_ctr)
            mb = npages * PAGE_SIZE / 1e6
            rows.append(
                {
                    "run_pages": run_pages,
                    "send_mb_s": round(mb / t_send, 1),
                    "receive_mb_s": round(mb / t_recv, 1),
                    "send_receive_mb_s": round(mb / (t_send + t_recv), 1),
                    "aes_ctr_mb_s": round(mb / t_ctr, 1),
                    "ratio_send_receive_vs_ctr": round(t_ctr / (t_send + t_recv), 3),
                }
            )
        src.close()
        dst.close()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small buffer, fewer repetitions")
    parser.add_argument("--mib", type=int, default=64, help="private memory to move per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=[m.value for m in TransportMode], default=TransportMode.BOUND.value)
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args(argv)
    mib, repeats = (16, 2) if args.quick else (args.mib, args.repeats)
    rows = run(mib, repeats, TransportMode(args.mode))
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    print(f"SEV transport ({args.mode}) over {mib} MiB of private pages, best of {repeats}")
    print(f"{'run':>5} {'SEND MB/s':>10} {'RECV MB/s':>10} {'S+R MB/s':>9} {'AES-CTR MB/s':>13} {'S+R/CTR':>8}")
    for r in rows:
        print(
            f"{r['run_pages']:>5} {r['send_mb_s']:>10} {r['receive_mb_s']:>10} {r['send_receive_mb_s']:>9} "
            f"{r['aes_ctr_mb_s']:>13} {r['ratio_send_receive_vs_ctr']:>8}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
