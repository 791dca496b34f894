"""Helpers for save/restore tests against real ``migd serve`` processes (tests/integration/test_save_restore.py).

Everything here reads what an operator could read: the REST API, the journal (SQLite, read
only, as tests/integration/test_fault_matrix.py does), the save file on disk and the guest's
RAM file under RUNTIME_DIRECTORY.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migd.abi import PAGE_SIZE
from migd.bitmap import PageBitmap
from migd.journal import JOURNAL_FILE
from migd.platform import identity
from migd.restore import read_saved
from migd.save_format import ENTRY_SIZE, HEADER_REGION, TAIL_PREFIX_SIZE

from .serve_process import ServeProcess, runtime_dir

FINISHED = ("completed", "failed", "cancelled")
POLL_S = 0.01
#: Between two polls of a job: each poll is two requests the daemon answers on the event loop
#: that also writes the pages; at 10 ms a 256 MiB live save took 10.7 s instead of 3.8 s.
JOB_POLL_S = 0.05


def pdh_cert(daemon: ServeProcess) -> Path:
    """The PDH certificate file of ``daemon``'s host: what a save for that host names (for_host_pdh)."""
    return Path(daemon.root, daemon.name, identity.PDH_CERT)


def ram_file(daemon: ServeProcess, name: str) -> Path:
    """Guest ``name``'s RAM file (``migd serve`` keeps guests under RUNTIME_DIRECTORY/guests)."""
    return runtime_dir(daemon.root, daemon.name) / "guests" / name / "ram"


def create_and_start(daemon: ServeProcess, name: str, memory_mib: int, workload: dict[str, Any]) -> None:
    """Define and boot guest ``name``; returns once its migration-control MSR is READY."""
    status, body = daemon.request("POST", "/v1/guests", {"name": name, "memory_mib": memory_mib})
    assert status == 201, body
    start(daemon, name, workload)


def start(daemon: ServeProcess, name: str, workload: dict[str, Any]) -> None:
    status, body = daemon.request("POST", f"/v1/guests/{name}/start", {"workload": workload})
    assert status == 200 and body["state"] == "running", body
    daemon.wait_for("GET", f"/v1/guests/{name}", lambda g: g["migration_control"]["ready"], timeout=20)


def wait_populated(daemon: ServeProcess, name: str, memory_mib: int, timeout: float = 30.0) -> None:
    """Wait until the guest wrote every page once (workload ``populate_fraction`` 1.0): its RAM file
    is fully allocated. The workload's kexec/reboot clock starts right after (WorkloadConfig)."""
    path, size = ram_file(daemon, name), memory_mib << 20
    deadline = time.monotonic() + timeout
    while (allocated := path.stat().st_blocks * 512) < size:
        assert time.monotonic() < deadline, f"{name} populated only {allocated} of {size} bytes in {timeout} s"
        time.sleep(POLL_S)


def save(daemon: ServeProcess, name: str, path: Path, *, live: bool, for_host: ServeProcess | None = None) -> str:
    """POST a save; returns the job id (the 202 is checked)."""
    body: dict[str, Any] = {"path": str(path), "live": live}
    if for_host is not None:
        body["for_host_pdh"] = str(pdh_cert(for_host))
    status, job = daemon.request("POST", f"/v1/guests/{name}/save", body)
    assert status == 202, job
    assert job["role"] == "save" and job["guest"] == name and job["destination"] == str(path), job
    return str(job["id"])


def restore(daemon: ServeProcess, path: Path, name: str | None = None) -> str:
    """POST a restore; returns the job id (the 202 is checked)."""
    body: dict[str, Any] = {"path": str(path)}
    if name is not None:
        body["name"] = name
    status, job = daemon.request("POST", "/v1/guests/restore", body)
    assert status == 202, job
    assert job["role"] == "restore" and job["destination"] == str(path), job
    return str(job["id"])


def refused_restore(daemon: ServeProcess, path: Path, name: str | None = None) -> str:
    """POST a restore that must be refused at once (409); returns the refusal's detail."""
    body: dict[str, Any] = {"path": str(path)}
    if name is not None:
        body["name"] = name
    status, refusal = daemon.request("POST", "/v1/guests/restore", body)
    assert status == 409, (status, refusal)
    return str(refusal["detail"])


def finished(daemon: ServeProcess, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    body: dict[str, Any] = daemon.wait_for("GET", f"/v1/migrations/{job_id}", lambda m: m["status"] in FINISHED,
                                           timeout=timeout)
    return body


def completed(daemon: ServeProcess, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    job = finished(daemon, job_id, timeout)
    assert job["status"] == "completed" and job["error"] is None, (job, daemon.log()[-4000:])
    return job


@dataclass
class Sample:
    """One poll of a job (and of its guest's migration-control MSR), with its time."""

    at: float
    status: str
    transferred: int
    msr: int | None


def poll_job(daemon: ServeProcess, job_id: str, guest: str,
             timeout: float = 60.0) -> tuple[dict[str, Any], list[Sample]]:
    """Poll job and guest every JOB_POLL_S until the job ends; returns the last job body and every sample.

    The guest is read right after the job: a ``blackout`` sample carries the MSR as the guest
    had it then (the host's view of MSR_KVM_MIGRATION_CONTROL)."""
    deadline = time.monotonic() + timeout
    samples: list[Sample] = []
    while time.monotonic() < deadline:
        status, job = daemon.request("GET", f"/v1/migrations/{job_id}")
        assert status == 200, job
        gstatus, g = daemon.request("GET", f"/v1/guests/{guest}")
        msr = g["migration_control"]["msr"] if gstatus == 200 else None
        samples.append(Sample(time.monotonic(), job["status"], job["bytes"]["transferred"], msr))
        if job["status"] in FINISHED:
            return job, samples
        time.sleep(JOB_POLL_S)
    raise TimeoutError(f"job {job_id} did not end within {timeout} s; last: {samples[-1:]}")


def statuses(samples: list[Sample]) -> list[str]:
    """The statuses seen, consecutive repeats folded."""
    out: list[str] = []
    for s in samples:
        if not out or out[-1] != s.status:
            out.append(s.status)
    return out


def arrived_clean(daemon: ServeProcess, name: str, npages: int, timeout: float = 60.0) -> dict[str, Any]:
    """Wait for the restored guest's arrival self-check; it must cover every page with no error."""
    guest: dict[str, Any] = daemon.wait_for("GET", f"/v1/guests/{name}", lambda g: g["check"]["pages_verified"] > 0,
                                            timeout=timeout)
    assert guest["state"] == "running" and guest["pages"]["total"] == npages, guest
    assert guest["check"] == {"pages_verified": npages, "errors": 0, "last_error": None}, guest
    return guest


def journal_stats(daemon: ServeProcess, job_id: str) -> dict[str, Any]:
    """The journal's record of job ``job_id``: its row, with ``stats`` decoded (read-only SQLite)."""
    path = daemon.root / daemon.name / JOURNAL_FILE
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT * FROM migrations WHERE id = ?", (job_id,)).fetchone()
    finally:
        db.close()
    assert row is not None, f"job {job_id} is not in {path}"
    record = dict(row)
    record["stats"] = json.loads(record["stats"])
    return record


def file_bitmap_sha256(path: Path) -> tuple[str, int]:
    """(SHA-256, shared page count) of the shared-page bitmap in a save file's tail, as a restore decodes it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        saved = read_saved(fd, path)
    finally:
        os.close(fd)
    bitmap = PageBitmap.decode(saved.tail.bitmap, max_npages=saved.header.npages)
    return hashlib.sha256(bitmap.to_bytes()).hexdigest(), bitmap.count()


@dataclass(frozen=True)
class FileFacts:
    """A save file's size as its layout says, its size and allocation on disk."""

    npages: int
    expected_size: int  # Layout(npages).tail_off + the tail (prefix, body, MAC)
    size: int
    allocated: int  # st_blocks * 512
    metadata: int  # header region + page table + tail: everything but the page slots


def file_facts(path: Path) -> FileFacts:
    fd = os.open(path, os.O_RDONLY)
    try:
        saved = read_saved(fd, path)
        info = os.fstat(fd)
    finally:
        os.close(fd)
    layout = saved.layout
    tail = TAIL_PREFIX_SIZE + len(saved.tail_body) + len(saved.tail_mac)
    metadata = HEADER_REGION + layout.npages * ENTRY_SIZE + tail
    return FileFacts(layout.npages, layout.tail_off + tail, info.st_size, info.st_blocks * 512, metadata)


def assert_sparse_in_place(path: Path, npages: int, data_pages: int) -> FileFacts:
    """The mapped-ram properties of a finished save file (docs in migd/save_format.py):

    * its size is exactly the layout's: ``tail_off`` plus the tail it ends with;
    * what it allocates is at most the guest's size plus metadata (later rounds wrote in place),
      and in fact at most the ``data_pages`` its table holds plus metadata (zero pages are
      holes), and no less than those pages (they are really there); with a few file-system
      blocks of slack for the regions' last partial blocks and extent blocks.
    """
    facts = file_facts(path)
    assert facts.npages == npages, facts
    assert facts.size == facts.expected_size, facts
    slack = 4 * 4096
    assert facts.allocated <= npages * PAGE_SIZE + facts.metadata + slack, facts
    assert facts.allocated <= data_pages * PAGE_SIZE + facts.metadata + slack, facts
    assert facts.allocated >= data_pages * PAGE_SIZE, facts
    return facts


def metric(daemon: ServeProcess, series: str) -> float:
    """One sample of /metrics (0 if the series is absent)."""
    status, text = daemon.request("GET", "/metrics")
    assert status == 200
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


HYPERCALLS_OK = 'migd_hypercalls_total{result="ok"}'


def assert_workload_runs(daemon: ServeProcess, name: str, within: float = 10.0) -> None:
    """The guest keeps working: its conversions (MAP_GPA_RANGE hypercalls) go on being counted."""
    before = metric(daemon, HYPERCALLS_OK)
    deadline = time.monotonic() + within
    while metric(daemon, HYPERCALLS_OK) < before + 5:
        assert time.monotonic() < deadline, f"{name} made no hypercall for {within} s"
        time.sleep(0.1)
    status, guest = daemon.request("GET", f"/v1/guests/{name}")
    assert status == 200 and guest["state"] == "running" and guest["migration_control"]["ready"], guest
