"""The served OpenAPI document equals the server: schemathesis, run from inside the suite (issue 13).

A real daemon (tests/test_api.py ``serving``: a Daemon behind ``build_app`` on 127.0.0.1, an
ephemeral port) serves ``GET /v1/openapi.json``; schemathesis loads that served document and, for
every operation in it, generates positive (schema-valid) and negative (schema-invalid) requests
with the bearer token, sends them over HTTP and applies its checks: not_a_server_error,
status_code_conformance, content_type_conformance, response_schema_conformance,
negative_data_rejection and positive_data_acceptance. Any failure of any check fails the test,
with schemathesis' own report and a curl line to reproduce it.

Generation is derandomized (hypothesis ``derandomize=True``), so CI sees the same requests every
run. Positive requests are made cheap and local after generation, inside what the schema allows
(guests of at most 16 MiB, small workload rates, migrations only to a loopback port nobody
listens on), and half of them name a guest or migration that exists, so they reach the engine
instead of a 404. Every schema-valid file path of a save or restore body, in either mode, is moved
into the run's temporary directory before it is sent: a save of the running guest to a generated
"/x" would otherwise write that file (the tests may run as root), a restore would open it. The
daemon's shutdown stops every guest agent the run started.

The negative control (``test_schemathesis_catches_a_document_the_server_does_not_match``) points
the same harness at deliberately wrong documents — the issue's mismatches put back — and asserts
that schemathesis reports each.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_schema_conformance,
    status_code_conformance,
)

from migd.daemon import openapi
from test_api import TOKEN, Api, serving_in_thread

pytestmark = pytest.mark.fault_class("bad input: REST API fuzz")

#: Examples per operation and mode: 17 operations × 2 modes × this stays well under a minute.
MAX_EXAMPLES = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection, positive_data_acceptance]
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RUNNING, DEFINED = "g-run", "g-def"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Where every schema-valid destination is pointed: loopback, nobody listening (no stray traffic).
CLOSED_PORT = _closed_port()
_DESTINATION = re.compile(openapi._ecma_pattern(openapi.DESTINATION_PATTERN))
_FILE_PATH = re.compile(openapi._ecma_pattern(openapi.FILE_PATH_PATTERN))
_CHEAP_WORKLOAD = {"dirty_rate_mib_s": 4.0, "convert_rate_hz": 20.0, "populate_fraction": 0.05,
                   "kexec_after_s": 2.0, "reboot_after_s": 2.0, "boot_time_s": 0.2}


# ---------------------------------------------------------------------- the daemon


@dataclass
class Server:
    base_url: str
    api: Api
    loop: asyncio.AbstractEventLoop
    migration_id: str = ""
    document: dict[str, Any] = field(default_factory=dict)
    #: The only directory a generated save or restore body may name (under the run's tmp root).
    files: Path = Path()
    #: This host's own PDH certificate, a for_host_pdh a save accepts.
    own_pdh: Path = Path()
    saved: int = 0

    def request(self, method: str, path: str, json_body: Any = None) -> requests.Response:
        return requests.request(method, self.base_url + path, json=json_body, headers=AUTH, timeout=30)

    def restore_pool(self) -> None:
        """The guests positive requests name: g-run running and READY, g-def defined (bounded waits)."""
        for name, running in ((RUNNING, True), (DEFINED, False)):
            guest = self.request("GET", f"/v1/guests/{name}")
            if guest.status_code == 200 and guest.json()["state"] not in ("defined", "running", "stopped"):
                assert self.request("DELETE", f"/v1/guests/{name}").status_code == 204
                guest = self.request("GET", f"/v1/guests/{name}")
            if guest.status_code == 404:
                created = self.request("POST", "/v1/guests", {"name": name, "memory_mib": 16})
                assert created.status_code == 201, created.text
                guest = created
            state = guest.json()["state"]
            if running and state != "running":
                assert self.request("POST", f"/v1/guests/{name}/start", {}).status_code == 200
            if not running and state == "running":
                assert self.request("POST", f"/v1/guests/{name}/stop").status_code == 200
        asyncio.run_coroutine_threadsafe(
            self.api.poll(f"/v1/guests/{RUNNING}", lambda g: g["migration_control"]["ready"]), self.loop,
        ).result(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One daemon for the module on its own event-loop thread; shut down (agents and all) after."""
    root = tmp_path_factory.mktemp("schemathesis")
    with serving_in_thread(Path(root)) as (api, loop):
        srv = Server(f"http://127.0.0.1:{api.client.server.port}", api, loop, files=Path(root) / "files",
                     own_pdh=api.daemon.config.state_dir / "pdh.pem")
        srv.files.mkdir()
        srv.restore_pool()
        # One migration that exists (failed at once: nobody listens), for the {id} operations.
        started = srv.request("POST", f"/v1/guests/{RUNNING}/migrate", {"destination": f"127.0.0.1:{CLOSED_PORT}"})
        assert started.status_code == 202, started.text
        srv.migration_id = started.json()["id"]
        yield srv
        pids = [g.agent.pid for g in api.daemon.host.guests.values() if g.agent is not None]
        assert pids, "the run left no guest running: the stop-everything check below would prove nothing"
    # The daemon's shutdown stopped every agent the run started (start, reboot, kexec, migrate).
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], pids


def load_served(srv: Server) -> tuple[dict[str, Any], Any]:
    """The served document, and schemathesis' schema of it.

    ``schemathesis.openapi.from_url`` leaves out the operation that serves the document itself
    (GET /v1/openapi.json), so the served bytes go through ``from_dict`` instead: the same
    document, every operation.
    """
    answer = srv.request("GET", "/v1/openapi.json")
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("application/json")
    document = answer.json()
    return document, schemathesis.openapi.from_dict(document)


# ---------------------------------------------------------------------- the harness


def _cheap(case: Any, srv: Server, pick: Callable[[list[str]], str]) -> None:
    """Keep a generated request cheap, local and aimed at live state, inside what the schema allows."""
    body = case.body
    if isinstance(body, dict):
        destination = body.get("destination")
        if isinstance(destination, str) and _DESTINATION.match(destination):
            # Whatever the generated host, the daemon must connect to nothing but loopback.
            body["destination"] = pick([f"127.0.0.1:{CLOSED_PORT}", f"[::1]:{CLOSED_PORT}", f"localhost:{CLOSED_PORT}"])
        # Whatever the generated path, the daemon must write and open nothing outside the run's
        # directory: a new name there (a save writes it), a file saved there before (a restore
        # opens it), or a name that does not exist; for_host_pdh, this host's certificate or none.
        path = body.get("path")
        if isinstance(path, str) and _FILE_PATH.match(path) and len(path) <= openapi.MAX_FILE_PATH:
            srv.saved += 1
            fresh = srv.files / f"{srv.saved}.save"
            # Always three choices (hypothesis replays draws): the earliest file saved so far stands in
            # for "a save file" once there is one.
            earlier = min((p for p in srv.files.glob("*.save")), default=fresh, key=lambda p: p.stat().st_mtime)
            body["path"] = pick([str(fresh), str(srv.files / "absent" / "x.save"), str(earlier)])
        pdh = body.get("for_host_pdh")
        if isinstance(pdh, str) and _FILE_PATH.match(pdh) and len(pdh) <= openapi.MAX_FILE_PATH:
            body["for_host_pdh"] = pick([str(srv.own_pdh), str(srv.files / "absent.pem")])
    if not case.meta.generation.mode.is_positive:
        return
    if isinstance(body, dict):
        if isinstance(body.get("memory_mib"), int) and body["memory_mib"] > 16:
            body["memory_mib"] = 16
        if isinstance(body.get("max_bandwidth_mib_s"), (int, float)):
            body["max_bandwidth_mib_s"] = min(body["max_bandwidth_mib_s"], 64)
        workload = body.get("workload")
        if isinstance(workload, dict):
            for key, most in _CHEAP_WORKLOAD.items():
                if isinstance(workload.get(key), (int, float)) and workload[key] > most:
                    workload[key] = most
    params = case.path_parameters
    if params and "name" in params:
        params["name"] = pick([RUNNING, DEFINED, params["name"]])
    if params and "id" in params:
        params["id"] = pick([srv.migration_id, params["id"]])


@dataclass
class Run:
    failures: list[str] = field(default_factory=list)
    statuses: dict[tuple[str, str], set[int]] = field(default_factory=dict)


def run_operation(srv: Server, operation: Any, mode: GenerationMode, run: Run, max_examples: int) -> None:
    """Send ``max_examples`` generated requests for one operation and mode; collect check failures."""

    @settings(max_examples=max_examples, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def send(case: Any, data: st.DataObject) -> None:
        _cheap(case, srv, lambda options: data.draw(st.sampled_from(options)))
        response = case.call(base_url=srv.base_url, headers=AUTH, timeout=30)
        run.statuses.setdefault((operation.label, mode.value), set()).add(response.status_code)
        try:
            case.validate_response(response, checks=CHECKS, headers=AUTH)
        except FailureGroup as group:
            # Collected, not raised: hypothesis would spend minutes shrinking, and the report
            # below already has schemathesis' own message and a curl line for each.
            run.failures.append(f"{operation.label} [{mode.value}]: {group}")

    send()


def negatable(document: dict[str, Any], label: str) -> bool:
    """Whether an operation has anything a negative request could get wrong (a parameter or a body);
    for the others (GET /v1/guests, ...) hypothesis can draw no negative case at all."""
    method, path = label.split(" ", 1)
    operation = document["paths"][path][method.lower()]
    return bool(operation.get("parameters") or operation.get("requestBody"))


# ---------------------------------------------------------------------- the tests


def test_schemathesis_finds_no_mismatch_between_the_document_and_the_server(server: Server) -> None:
    document, schema = load_served(server)
    assert document == json.loads(json.dumps(openapi.DOCUMENT))
    operations = [result.ok() for result in schema.get_all_operations()]
    documented = {f"{method.upper()} {path}" for path, item in document["paths"].items() for method in item}
    assert {op.label for op in operations} == documented and len(documented) == 17
    run = Run()
    for operation in operations:
        server.restore_pool()
        run_operation(server, operation, GenerationMode.POSITIVE, run, MAX_EXAMPLES)
        if negatable(document, operation.label):
            run_operation(server, operation, GenerationMode.NEGATIVE, run, MAX_EXAMPLES)
    assert not run.failures, "\n\n".join(run.failures)
    # Coverage, not luck: every operation was sent in both modes, positive requests reached real
    # state (2xx) and negative ones were refused as bad input (400).
    assert {label for label, _ in run.statuses} == documented
    for operation in operations:
        assert (operation.label, "positive") in run.statuses
        assert ((operation.label, "negative") in run.statuses) == negatable(document, operation.label)
    assert sum(negatable(document, label) for label in documented) == 12
    positive = set().union(*(s for (_, mode), s in run.statuses.items() if mode == "positive"))
    negative = set().union(*(s for (_, mode), s in run.statuses.items() if mode == "negative"))
    assert {200, 201, 202, 204} <= positive, positive
    assert 400 in negative, negative
    assert server.request("GET", "/v1/health").status_code == 200  # the daemon lives on
    # The save route really ran (into the run's directory): the rewriting above is what kept it there.
    assert list(server.files.glob("*.save")), "no positive save completed: the save route was never exercised"


def _without_if_then(document: dict[str, Any]) -> None:
    create = document["components"]["schemas"]["CreateGuest"]
    del create["if"], create["then"]


def _without_destination_pattern(document: dict[str, Any]) -> None:
    del document["components"]["schemas"]["MigrateRequest"]["properties"]["destination"]["pattern"]


def _memory_mib_is_a_string(document: dict[str, Any]) -> None:
    document["components"]["schemas"]["Guest"]["properties"]["memory_mib"] = {"type": "string"}


def _integer_policy_refused_as_float(document: dict[str, Any]) -> None:
    # The old refusal of 875.0 seen from the other side: the document says any number, the daemon
    # (rightly, for a policy) takes only integers.
    document["components"]["schemas"]["CreateGuest"]["properties"]["policy"] = {
        "type": "number", "minimum": 0, "maximum": 0xFFFF}


@pytest.mark.parametrize(("doctor", "operation_label", "check_title"), [
    (_without_if_then, "POST /v1/guests", "Schema-valid request rejected"),
    (_without_destination_pattern, "POST /v1/guests/{name}/migrate", "Schema-valid request rejected"),
    (_integer_policy_refused_as_float, "POST /v1/guests", "Schema-valid request rejected"),
    (_memory_mib_is_a_string, "GET /v1/guests/{name}", "Response violates schema"),
])
def test_schemathesis_catches_a_document_the_server_does_not_match(
    server: Server, doctor: Callable[[dict[str, Any]], None], operation_label: str, check_title: str,
) -> None:
    """Negative control: the same harness, against a deliberately wrong copy of the served
    document (the issue's mismatches put back, and a response the schema misdescribes), reports
    a failure of the check that is meant to catch it."""
    document, _ = load_served(server)
    doctor(document)
    schema = schemathesis.openapi.from_dict(document)
    (operation,) = [r.ok() for r in schema.get_all_operations() if r.ok().label == operation_label]
    server.restore_pool()
    run = Run()
    run_operation(server, operation, GenerationMode.POSITIVE, run, 60)
    assert run.failures, f"schemathesis found nothing wrong with the doctored {operation_label}"
    assert any(check_title in failure for failure in run.failures), run.failures[0]
