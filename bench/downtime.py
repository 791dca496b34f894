#!/usr/bin/env python3
"""Benchmark: downtime of a guest under write load, against its ``downtime_limit_ms``.

Issue 7's target: a guest writing 64 MiB/s with ``downtime_limit_ms = 300`` converges and its
measured downtime (the source's pause → the destination's STARTED, the migration object's
``downtime_ms``, docs/design.md §9 "External contract") is within the limit in at least 9 of 10
runs. Each run starts two real ``migd serve`` daemons on 127.0.0.1
(``migd.cli.demo.DemoWorkspace``), creates and populates a guest, starts its write load, migrates it and reads the REST migration object; then it reads
the two daemons' logs for the stop-and-copy timelines (``stop-and-copy timeline`` on the
source, ``incoming hand-off timeline`` on the destination: ``time.monotonic()`` stamps, one
clock for every process of the host) and splits the downtime into its steps:

    fetch_dirty      pause → the final dirty log fetched from the agent
    final_pages      → the last dirty pages queued (SEND_UPDATE_DATA / copies)
    bitmap           → the final shared-page bitmap hashed, encoded, queued
    export_state     → the paused agent's vCPU state (asked for right after fetch_dirty) + PREPARE queued
    drain            → PREPARE reached the destination (every page before it is placed)
    verify           → the destination checked the guest and has its agent waiting
    prepared_rtt     → PREPARED back at the source
    source_commit    → journal commit record + COMMIT queued
    commit_rtt       → COMMIT at the destination
    dest_journal     → the destination's commit record (durable)
    stage_wait       → the agent's staging of the vCPU state is done (it began when the state came)
    agent_start      → the staged agent runs (one request to it)
    started_rtt      → STARTED back at the source (the downtime ends)

One JSON line: every run (status, downtime, rounds, expected_downtime_ms at switch-over and the
fixed cost it budgeted, throttle, the dirty pages the switch-over saw and the ones stop-and-copy
sent, the meter's bandwidth at the switch-over next to the rate pre-copy's last half second
really queued at (REST polls), the steps above, and ``staging_took``: how long the destination
agent's staging ran, off the critical path) and the summary (runs within the limit, the median
of each step, the load average before and after). Not a test: nothing asserts a time, and the
machine may be shared: read the load average. A run that fails keeps both daemons' logs.

    python bench/downtime.py --quick
    python bench/downtime.py                    # 10 runs, 1 GiB, 64 MiB/s, limit 300 ms
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from migd.abi import MiB  # noqa: E402
from migd.cli.client import MigdClient  # noqa: E402
from migd.cli.demo import DemoHost, DemoWorkspace  # noqa: E402

GUEST = "bench"
MIGRATION_TIMEOUT_S = 600.0
CHECK_TIMEOUT_S = 300.0

#: (step name, mark it starts at, mark it ends at); "src."/"dst." say whose log has the mark.
STEPS = (
    ("fetch_dirty", "src.paused", "src.fetched"),
    ("final_pages", "src.fetched", "src.pages_queued"),
    ("bitmap", "src.pages_queued", "src.bitmap_queued"),
    ("export_state", "src.bitmap_queued", "src.state_exported"),
    ("drain", "src.prepare_queued", "dst.prepare_received"),
    ("verify", "dst.prepare_received", "dst.prepared_sent"),
    ("prepared_rtt", "dst.prepared_sent", "src.prepared"),
    ("source_commit", "src.prepared", "src.commit_sent"),
    ("commit_rtt", "src.commit_sent", "dst.commit_received"),
    ("dest_journal", "dst.commit_received", "dst.journaled"),
    ("stage_wait", "dst.journaled", "dst.staged"),
    ("agent_start", "dst.staged", "dst.imported"),
    ("started_rtt", "dst.imported", "src.started"),
)
_MARK = re.compile(r"(\w+)=(-?\d+\.\d+)")
_FIELD = re.compile(r"(\w+)=(\S+)")


def _timeline(host: DemoHost, marker: str, migration_id: str) -> dict[str, Any]:
    """The fields of the ``marker`` log line of ``migration_id`` in ``host``'s daemon log."""
    try:
        text = host.log_path.read_text(errors="replace")
    except OSError:
        return {}
    for line in reversed(text.splitlines()):
        if marker in line and f"id={migration_id}" in line:
            return dict(_FIELD.findall(line.split(marker, 1)[1]))
    return {}


def breakdown(source: dict[str, Any], dest: dict[str, Any]) -> dict[str, float]:
    """Milliseconds per step (see module docstring) from the two timelines' monotonic stamps."""
    marks: dict[str, float] = {}
    for side, fields in (("src", source), ("dst", dest)):
        for name, value in fields.items():
            if _MARK.fullmatch(f"{name}={value}"):
                marks[f"{side}.{name}"] = float(value)
    steps = {}
    for name, start, end in STEPS:
        if start in marks and end in marks:
            steps[name] = round((marks[end] - marks[start]) * 1000.0, 1)
    if "dst.stage_begin" in marks and "dst.stage_end" in marks:  # off the critical path: how long it took
        steps["staging_took"] = round((marks["dst.stage_end"] - marks["dst.stage_begin"]) * 1000.0, 1)
    if "src.state_exported" in marks and "src.prepare_queued" in marks:
        steps["export_state"] = round(steps.get("export_state", 0.0) + (
            marks["src.prepare_queued"] - marks["src.state_exported"]) * 1000.0, 1)
    return steps


async def _populated(ram: Path, want_bytes: int, timeout: float) -> None:
    """Wait until the guest's RAM file holds ``want_bytes`` (it fills after boot; st_blocks grows)."""
    deadline = time.monotonic() + timeout
    while (ram.stat().st_blocks * 512 if ram.exists() else 0) < want_bytes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"guest RAM {ram} did not reach {want_bytes} bytes in {timeout:g} s")
        await asyncio.sleep(0.1)


class SetupFailed(RuntimeError):
    """A daemon did not come up: not a migration result (the run is repeated)."""


async def _healthy(api: MigdClient, host: DemoHost) -> None:
    deadline = time.monotonic() + 30.0
    while True:
        try:
            await api.health()
            return
        except Exception as exc:  # the daemon is still starting (connection refused)
            exited = host.proc is not None and host.proc.poll() is not None
            if exited or time.monotonic() > deadline:
                raise SetupFailed(f"{host.name} did not start ({exc}):\n{host.log_tail()}") from None
            await asyncio.sleep(0.05)


async def one_run(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """Two daemons, one guest under load, one migration; the numbers of that run."""
    workspace = DemoWorkspace.create(tls=args.tls)
    try:
        workspace.start_daemons()
        a, b = workspace.hosts
        async with MigdClient(a.api, a.token) as api_a, MigdClient(b.api, b.token) as api_b:
            await _healthy(api_a, a)
            await _healthy(api_b, b)
            await api_a.create_guest(GUEST, args.memory_mib)
            workload = {
                "dirty_rate_mib_s": args.dirty_rate_mib_s, "convert_rate_hz": args.convert_rate_hz, "seed": seed,
                "populate_fraction": args.populated_fraction, "shared_fraction": 1.0 - args.private_fraction,
            }
            await api_a.start_guest(GUEST, workload)
            want = int(args.memory_mib * MiB * args.populated_fraction * 0.97)
            await _populated(workspace.memory_file(a, GUEST), want, 600)
            while not (await api_a.guest(GUEST))["migration_control"]["ready"]:
                await asyncio.sleep(0.05)
            await asyncio.sleep(args.warmup_s)  # the write load runs at its rate before pre-copy starts
            migration = await api_a.migrate(GUEST, b.destination, downtime_limit_ms=args.downtime_limit_ms)
            deadline = time.monotonic() + MIGRATION_TIMEOUT_S
            series: list[tuple[float, str, int, int]] = []  # (t, status, bytes queued, round): pre-copy's pace
            while migration["status"] not in ("completed", "failed", "cancelled") and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                migration = await api_a.migration(migration["id"])
                series.append((time.monotonic(), migration["status"], migration["bytes"]["transferred"],
                               migration["rounds"]))
            check = None
            if migration["status"] == "completed" and args.check:
                deadline = time.monotonic() + CHECK_TIMEOUT_S
                while time.monotonic() < deadline:
                    guest = await api_b.guest(GUEST)
                    if guest["check"]["pages_verified"] == guest["pages"]["total"] or guest["check"]["errors"]:
                        check = guest["check"]
                        break
                    await asyncio.sleep(0.1)
        source = _timeline(a, "stop-and-copy timeline", migration["id"])
        dest = _timeline(b, "incoming hand-off timeline", migration["id"])
        downtime = migration["downtime_ms"]
        kept_logs = None
        if migration["status"] != "completed" or migration["error"] or downtime is None:
            kept_logs = _keep_logs(workspace, migration["id"])
        return {
            "status": migration["status"],
            "downtime_ms": downtime,
            "within_limit": downtime is not None and downtime <= args.downtime_limit_ms,
            "rounds": migration["rounds"],
            "expected_downtime_ms": migration["expected_downtime_ms"],
            "fixed_cost_ms": _number(source.get("fixed_cost_ms")),
            "throttle_percent": _number(source.get("throttle")),
            "decision_dirty_pages": _number(source.get("decision_pages")),
            "final_dirty_pages": _number(source.get("final_pages")),
            "decision_bandwidth_mib_s": _number(source.get("decision_mib_s")),
            "total_time_ms": migration["total_time_ms"],
            "precopy_tail_mib_s": _tail_rate(series),
            "self_check_errors": None if check is None else check["errors"],
            "steps_ms": breakdown(source, dest),
            "error": migration["error"],
            "logs": kept_logs,
        }
    finally:
        workspace.close(keep=False)


def _keep_logs(workspace: DemoWorkspace, migration_id: str) -> str:
    """Copy both daemons' logs of a run that went wrong out of the workspace (it is removed)."""
    keep = Path(tempfile.mkdtemp(prefix=f"migd-downtime-{migration_id}-"))
    for host in workspace.hosts:
        with contextlib.suppress(OSError):
            shutil.copy(host.log_path, keep / host.log_path.name)
    return str(keep)


def _tail_rate(series: list[tuple[float, str, int, int]], span_s: float = 0.5) -> float | None:
    """MiB/s queued by the source over the last ``span_s`` of pre-copy rounds after round 0 (REST polls)."""
    active = [(t, sent) for t, status, sent, rounds in series if status == "active" and rounds > 1]
    if len(active) < 2:
        return None
    end_t, end_sent = active[-1]
    start = next(((t, sent) for t, sent in active if t >= end_t - span_s), active[0])
    if end_t - start[0] <= 0:
        return None
    return round((end_sent - start[1]) / MiB / (end_t - start[0]), 1)


def _number(text: str | None) -> float | None:
    try:
        return None if text is None or text == "none" else float(text)
    except ValueError:
        return None


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 runs of a 256 MiB guest (about a minute)")
    parser.add_argument("--runs", type=int, default=10)
    # 1 GiB: the stop-and-copy fixed cost grows with the guest (bitmaps, ledger, digests), so a
    # guest bigger than the throughput benchmark's quick 256 MiB tests the budget, while ten
    # runs (populate, migrate, arrival self-check) still fit in a few minutes on two cores.
    parser.add_argument("--memory-mib", type=int, default=1024)
    parser.add_argument("--private-fraction", type=float, default=0.5)
    parser.add_argument("--populated-fraction", type=float, default=1.0)
    parser.add_argument("--dirty-rate-mib-s", type=float, default=64.0)
    parser.add_argument("--convert-rate-hz", type=float, default=0.0)
    parser.add_argument("--downtime-limit-ms", type=int, default=300)
    parser.add_argument("--warmup-s", type=float, default=1.0, help="write load before the migration starts")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="do not wait for the destination's arrival self-check")
    parser.add_argument("--tls", action="store_true", help="mutual TLS between the daemons")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.memory_mib = min(args.runs, 3), min(args.memory_mib, 256)
    load_before = _load()
    runs: list[dict[str, Any]] = []
    setup_failures: list[str] = []
    for seed in range(1, args.runs + 1):
        for _ in range(3):
            try:
                runs.append(asyncio.run(one_run(args, seed)))
                break
            except SetupFailed as exc:
                setup_failures.append(str(exc)[-2000:])
        else:
            raise SystemExit(f"daemons did not start three times: {setup_failures[-1]}")
    done = [r for r in runs if r["status"] == "completed"]
    steps: dict[str, float] = {}
    for name, _, _ in STEPS:
        values = [r["steps_ms"][name] for r in done if name in r["steps_ms"]]
        if values:
            steps[name] = round(statistics.median(values), 1)
    downtimes = [r["downtime_ms"] for r in done if r["downtime_ms"] is not None]
    result = {
        "memory_mib": args.memory_mib,
        "private_fraction": args.private_fraction,
        "populated_fraction": args.populated_fraction,
        "dirty_rate_mib_s": args.dirty_rate_mib_s,
        "convert_rate_hz": args.convert_rate_hz,
        "downtime_limit_ms": args.downtime_limit_ms,
        "tls": args.tls,
        "runs": args.runs,
        "completed": len(done),
        "within_limit": sum(1 for r in runs if r["within_limit"]),
        "downtime_ms_median": round(statistics.median(downtimes), 1) if downtimes else None,
        "downtime_ms_max": max(downtimes) if downtimes else None,
        "steps_ms_median": steps,
        "load_avg_before_after": [load_before, _load()],
        "setup_failures": setup_failures,
        "each": runs,
    }
    print(json.dumps(result))
    return 0 if len(done) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
