"""The REST API (migd/daemon/api.py) over a real socket around a real Daemon: every route of docs/design.md §9
with its success and error answers, auth on every route, strict bodies, and the OpenAPI document.

Every answer any test receives is checked against the OpenAPI document (:meth:`Api.call`):
the documented schema for that route and status, or the error schema for unrouted requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import shutil
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from migd import __version__, wire
from migd.platform import identity
from migd.daemon import openapi
from migd.daemon.api import MAX_BODY_BYTES, build_app, decode_json
from migd.daemon.config import parse_config
from migd.daemon import core
from migd.daemon.core import Daemon
from migd.errors import ConfigError
from migd.source import MigrationParams

TOKEN = "c0ffee" * 6
GUEST_PAGES_16MIB = 16 * 256
_NO_BODY = object()


def free_port() -> int:
    """A TCP port nobody listens on right now (a destination that refuses connections)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_daemon(root: Path, name: str, **tables: dict[str, Any]) -> Daemon:
    """A Daemon from a validated config: identity under root/ca, token file, ephemeral ports;
    ``tables``: more config tables (e.g. ``guests={"ram_dir": ...}``)."""
    state = root / name
    identity.init_host(state, root / "ca", common_name=name)
    token_file = state / "api.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)  # the daemon refuses a token file others can read
    raw = {
        "state_dir": str(state),
        "api": {"listen": "127.0.0.1:0", "token_file": str(token_file)},
        "migration": {"listen": "127.0.0.1:0", "downtime_limit_ms": 300},
        "sev": {"trusted_roots": [str(root / "ca" / identity.CA_CERT)]},
        **tables,
    }
    return Daemon(parse_config(raw, base=root))


# ---------------------------------------------------------------------- checking answers


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)))


_TEMPLATES = [(_template_regex(t), t) for t in openapi.PATHS]


def documented_response(method: str, path: str, status: int) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(operation, response object) the document gives for this answer; operation None if unrouted."""
    for regex, template in _TEMPLATES:
        if regex.fullmatch(path):
            operation = openapi.PATHS[template].get(method.lower())
            if operation is None:
                # A concrete path comes before its template (/v1/guests/restore, POST only, before
                # /v1/guests/{name}): GET /v1/guests/restore is the guest called "restore".
                continue
            responses = operation["responses"]
            if str(status) in responses:
                return operation, responses[str(status)]
            assert status >= 400, f"{method} {path} answered {status}, which the document does not list"
            return operation, responses["default"]
    assert status >= 400, f"unrouted {method} {path} answered {status}"
    return None, {"content": {"application/json": {"schema": openapi.ref("Error")}}}


def check_against_document(method: str, path: str, status: int, content_type: str, body: Any) -> None:
    _, response = documented_response(method, path, status)
    assert response is not None
    if method == "HEAD":
        assert body is None
        return
    content = response.get("content")
    if content is None:
        assert body is None, f"{method} {path} {status} must have no body, got {body!r}"
        return
    ((media, spec),) = content.items()
    assert content_type.split(";")[0] == media.split(";")[0], (method, path, content_type, media)
    openapi.check(body, spec["schema"])


@dataclass
class Answer:
    status: int
    body: Any
    headers: dict[str, str]

    @property
    def detail(self) -> str:
        assert isinstance(self.body, dict) and "detail" in self.body, self.body
        return str(self.body["detail"])


@dataclass
class Api:
    client: TestClient
    daemon: Daemon

    @property
    def app(self) -> web.Application:
        return self.client.server.app  # type: ignore[no-any-return]

    async def call(self, method: str, path: str, body: Any = _NO_BODY, *, token: str | None = TOKEN,
                   raw: bytes | None = None, authorization: str | None = None) -> Answer:
        """One request; the answer is checked against the OpenAPI document before it is returned."""
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is _NO_BODY else json.dumps(body).encode())
        async with self.client.request(method, path, data=data, headers=headers) as resp:
            payload = await resp.read()
            content_type = resp.headers.get("Content-Type", "")
            if not payload:
                decoded: Any = None
            elif content_type.startswith("application/json"):
                decoded = json.loads(payload)
            else:
                decoded = payload.decode()
            answer = Answer(resp.status, decoded, dict(resp.headers))
        check_against_document(method, path, answer.status, content_type, decoded)
        return answer

    async def ok(self, method: str, path: str, body: Any = _NO_BODY, status: int = 200) -> Any:
        answer = await self.call(method, path, body)
        assert answer.status == status, (method, path, answer)
        return answer.body

    async def poll(self, path: str, predicate: Callable[[Any], bool], timeout: float = 20.0) -> Any:
        """GET ``path`` until ``predicate(body)``; bounded."""
        async with asyncio.timeout(timeout):
            while True:
                body = await self.ok("GET", path)
                if predicate(body):
                    return body
                await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def serving(root: Path, name: str = "hostA") -> AsyncIterator[Api]:
    """A started Daemon behind build_app on 127.0.0.1 (ephemeral port); everything stopped after."""
    daemon = make_daemon(root, name)
    await daemon.start()
    client = TestClient(TestServer(build_app(daemon, TOKEN), host="127.0.0.1", port=0))
    try:
        await client.start_server()
        yield Api(client, daemon)
    finally:
        await client.close()
        await daemon.shutdown()
        shutil.rmtree(daemon.host.runtime_dir, ignore_errors=True)


@contextlib.contextmanager
def serving_in_thread(root: Path) -> Iterator[tuple[Api, asyncio.AbstractEventLoop]]:
    """``serving`` on an event loop of its own thread, for synchronous clients (schemathesis, the
    fuzzer); the daemon is shut down (agents and all) when the block ends."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    ready: Future[Api] = Future()
    done = asyncio.Event()

    async def serve() -> None:
        async with serving(root) as api:
            ready.set_result(api)
            await done.wait()

    task = asyncio.run_coroutine_threadsafe(serve(), loop)
    try:
        yield ready.result(timeout=30), loop
    finally:
        loop.call_soon_threadsafe(done.set)
        task.result(timeout=60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def run(main: Callable[[], Awaitable[None]], timeout: float = 60.0) -> None:
    asyncio.run(asyncio.wait_for(main(), timeout))


def routes_of(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, path template) of every route the app's router serves."""
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        out.add((route.method, info.get("formatter") or info.get("path")))
    return out


def routes_of_document(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}


WORKLOAD = {"dirty_rate_mib_s": 2, "convert_rate_hz": 5, "seed": 3}


# ---------------------------------------------------------------------- health, auth, routing


def test_health_needs_no_token_and_reports_the_version(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as api:
            for token in (None, "wrong-token-wrong-token"):
                answer = await api.call("GET", "/v1/health", token=token)
                assert answer.status == 200
                assert answer.body == {"status": "ok", "version": __version__}

    run(main)


@pytest.mark.fault_class("access control: REST token")
def test_every_route_but_health_answers_401_without_the_right_token(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as api:
            routes = sorted(routes_of(api.app))
            assert len(routes) == 17  # every route of §7 plus the OpenAPI document
            bad: list[dict[str, Any]] = [
                {"token": None},
                {"token": "f" * len(TOKEN)},
                {"token": TOKEN[:-1]},
                {"token": TOKEN + "x"},
                {"authorization": f"Basic {TOKEN}"},
                {"authorization": "Bearer"},
                {"authorization": "Bearer    "},
                {"token": "t\u00f6ken-\u2603"},  # non-ASCII: compared as bytes, never a 500
            ]
            for method, template in routes:
                path = template.replace("{name}", "g1").replace("{id}", "m1")
                if template == "/v1/health":
                    continue
                for kwargs in bad:
                    answer = await api.call(method, path, {}, **kwargs)
                    assert answer.status == 401, (method, path, kwargs, answer)
                    assert answer.body["error"] == "unauthorized"
                    challenge = answer.headers["WWW-Authenticate"]
                    assert challenge.startswith('Bearer realm="migd"'), challenge
                    if "token" in kwargs and kwargs["token"] is not None:
                        assert 'error="invalid_token"' in challenge
                # Negative control: the right token gets past the gate (whatever the route says next).
                assert (await api.call(method, path, {})).status != 401, (method, path)
            # The scheme name is case-insensitive (RFC 7235 §2.1).
            assert (await api.call("GET", "/v1/guests", authorization=f"bearer {TOKEN}")).status == 200
            # Unknown routes are behind the gate too: nothing about the URL space leaks without a token.
            assert (await api.call("GET", "/v1/secret", token=None)).status == 401

    run(main)


def test_unknown_routes_and_methods_answer_json(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as api:
            for path in ("/v1/nope", "/v1/guests/", "/v2/guests", "/v1/guests/g1/explode"):
                answer = await api.call("GET", path)
                assert answer.status == 404 and answer.body["error"] == "not_found", (path, answer)
                assert path in answer.detail
            for method, path, allowed in (
                ("PUT", "/v1/guests", {"GET", "POST"}),
                ("DELETE", "/v1/migrations", {"GET"}),
                ("GET", "/v1/guests/g1/start", {"POST"}),
                ("POST", "/v1/health", {"GET"}),
                ("HEAD", "/v1/guests", {"GET", "POST"}),
            ):
                answer = await api.call(method, path)
                assert answer.status == 405, (method, path, answer)
                assert set(answer.headers["Allow"].split(",")) == allowed
                if method != "HEAD":
                    assert answer.body["error"] == "method_not_allowed" and method in answer.detail

    run(main)


# ---------------------------------------------------------------------- guests


def test_guest_lifecycle_with_every_guest_route(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as api:
            answer = await api.call("POST", "/v1/guests", {"name": "g1", "memory_mib": 16})
            assert answer.status == 201 and answer.headers["Location"] == "/v1/guests/g1"
            created = answer.body
            assert created["state"] == "defined" and created["memory_mib"] == 16 and created["policy"] == 0
            assert created["pages"] == {"total": GUEST_PAGES_16MIB, "private": GUEST_PAGES_16MIB, "shared": 0}
            assert created["migration_control"] == {"feature": True, "msr": 0, "ready": False}

            again = await api.call("POST", "/v1/guests", {"name": "g1", "memory_mib": 32})
            assert again.status == 409 and "already exists" in again.detail
            assert await api.ok("GET", "/v1/guests") == {"guests": [created]}
            assert await api.ok("GET", "/v1/guests/g1") == created
            for action in ("stop", "reboot", "kexec"):  # not running yet
                answer = await api.call("POST", f"/v1/guests/g1/{action}")
                assert answer.status == 409 and "defined" in answer.detail, (action, answer)

            running = await api.ok("POST", "/v1/guests/g1/start", {"workload": WORKLOAD})
            assert running["state"] == "running"
            assert api.daemon.guest("g1").workload.seed == 3  # the workload reached the guest
            ready = await api.poll("/v1/guests/g1", lambda g: g["migration_control"]["ready"])
            assert ready["migration_control"]["msr"] == 1 and ready["pages"]["shared"] > 0

            twice = await api.call("POST", "/v1/guests/g1/start", {})
            assert twice.status == 409 and "running" in twice.detail
            busy = await api.call("DELETE", "/v1/guests/g1")
            assert busy.status == 409 and "stop it first" in busy.detail
            assert (await api.ok("GET", "/v1/guests/g1"))["state"] == "running"

            for action in ("reboot", "kexec"):
                assert (await api.ok("POST", f"/v1/guests/g1/{action}", {}))["state"] == "running"
                await api.poll("/v1/guests/g1", lambda g: g["migration_control"]["ready"])

            stopped = await api.ok("POST", "/v1/guests/g1/stop")
            assert stopped["state"] == "stopped" and stopped["migration_control"]["msr"] == 0
            assert (await api.call("POST", "/v1/guests/g1/stop")).status == 409
            # A stopped guest starts again; without a body it runs idle.
            assert (await api.ok("POST", "/v1/guests/g1/start"))["state"] == "running"
            await api.ok("POST", "/v1/guests/g1/stop", {})

            deleted = await api.call("DELETE", "/v1/guests/g1")
            assert deleted.status == 204 and deleted.body is None
            assert (await api.call("GET", "/v1/guests/g1")).status == 404
            assert (await api.call("DELETE", "/v1/guests/g1")).status == 404
            assert await api.ok("GET", "/v1/guests") == {"guests": []}
            assert not (tmp_path / "hostA" / "guests" / "g1").exists()

    run(main)


def test_unknown_guest_or_migration_is_404_on_every_route_that_names_one(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as api:
            valid_body = {"migrate": {"destination": "127.0.0.1:4444"}, "start": {"workload": WORKLOAD},
                          "save": {"path": str(tmp_path / "ghost.save")}}
            checked = 0
            for method, template in sorted(routes_of(api.app)):
                if "{name}" not in template and "{id}" not in template:
                    continue
                path = template.replace("{name}", "ghost").replace("{id}", "0123456789abcdef")
                # GET and DELETE take no body (a body there is a 400, test_a_body_on_a_bodiless_route_is_400).
                body = _NO_BODY if method in ("GET", "DELETE") else valid_body.get(template.rsplit("/", 1)[-1], {})
                answer = await api.call(method, path, body)
                assert answer.status == 404 and answer.body["error"] == "not_found", (method, path, answer)
                assert "ghost" in answer.detail or "0123456789abcdef" in answer.detail
                checked += 1
            assert checked == 10

    run(main)


def test_invalid_bodies_are_400_with_a_reason_naming_the_field(tmp_path: Path) -> None:
    create: list[tuple[Any, str]] = [
        (b"not json", "not valid JSON"),
        (b"", "empty body"),
        (b"[1, 2]", "body: expected object, got array"),
        (b'"g1"', "body: expected object, got string"),
        (b"null", "body: expected object, got null"),
        ({"name": "g1", "memory_mib": 16, "colour": "red"}, "unknown key 'colour'"),
        ({"name": "g1"}, "missing required key 'memory_mib'"),
        ({"memory_mib": 16}, "missing required key 'name'"),
        ({"name": "g1", "memory_mib": True}, "memory_mib: expected integer, got boolean"),
        ({"name": "g1", "memory_mib": "16"}, "memory_mib: expected integer, got string"),
        ({"name": "g1", "memory_mib": 16.5}, "memory_mib: expected integer, got number"),
        ({"name": "g1", "memory_mib": 0}, "memory_mib: must be >= 1"),
        ({"name": "g1", "memory_mib": 10**9}, "memory_mib: must be <="),
        ({"name": "../etc", "memory_mib": 16}, "name: must match"),
        ({"name": "g1\n", "memory_mib": 16}, "name: must match"),
        ({"name": "", "memory_mib": 16}, "name: must match"),
        ({"name": 7, "memory_mib": 16}, "name: expected string"),
        ({"name": "g1", "memory_mib": 16, "policy": -1}, "policy: must be >= 0"),
        ({"name": "g1", "memory_mib": 16, "policy": False}, "policy: expected integer, got boolean"),
        ({"name": "g1", "memory_mib": 16, "efi": 1}, "efi: expected boolean, got integer"),
        ({"name": "g1", "memory_mib": 16, "uefi_live_migration": "yes"},
         "uefi_live_migration: expected boolean or null"),
        ({"name": "g1", "memory_mib": 16, "uefi_live_migration": False}, "only meaningful with efi: true"),
        (b'{"name": "g1", "memory_mib": NaN}', "NaN is not a JSON number"),
        (b'{"name": "g1", "memory_mib": -Infinity}', "-Infinity is not a JSON number"),
        (b'{"name": "g1", "memory_mib": 1e400}', "out of range"),
        (b'{"name": "g1", "memory_mib": 1' + b"0" * 40 + b"}", "out of range"),
        (b'{"name": "g1", "name": "g2", "memory_mib": 16}', "duplicate key 'name'"),
        (b'{"name": "g\xff", "memory_mib": 16}', "not UTF-8"),
        (b"[" * 50_000, "nested too deeply"),
    ]
    start: list[tuple[Any, str]] = [
        ({"workload": {"seed": True}}, "workload.seed: expected integer, got boolean"),
        ({"workload": {"seed": -1}}, "workload.seed: must be >= 0"),
        ({"workload": {"dirty_rate_mib_s": -1}}, "workload.dirty_rate_mib_s: must be >= 0"),
        ({"workload": {"dirty_rate_mib_s": "fast"}}, "workload.dirty_rate_mib_s: expected number"),
        ({"workload": {"convert_rate_hz": 1e300}}, "workload.convert_rate_hz: must be <="),
        ({"workload": {"speed": 1}}, "workload: unknown key 'speed'"),
        ({"workload": [1]}, "workload: expected object or null"),
        ({"workloads": {}}, "unknown key 'workloads'"),
    ]
    migrate: list[tuple[Any, str]] = [
        ({}, "missing required key 'destination'"),
        (b"", "empty body"),
        ({"destination": 4444}, "destination: expected string"),
        ({"destination": ""}, "destination: must be at least 1"),
        # The document's pattern (test_the_destination_pattern_is_what_the_daemon_accepts) refuses these.
        ({"destination": "nowhere"}, "destination: must match the pattern (HOST:PORT"),
        ({"destination": "127.0.0.1:0"}, "port 1..65535), got '127.0.0.1:0'"),
        ({"destination": "127.0.0.1:99999"}, "port 1..65535), got '127.0.0.1:99999'"),
        ({"destination": "bad host!:1"}, "destination: must match the pattern"),
        ({"destination": "127.0.0.1:4444", "downtime_limit_ms": 0}, "downtime_limit_ms: must be > 0"),
        ({"destination": "127.0.0.1:4444", "downtime_limit_ms": True}, "downtime_limit_ms: expected number or null"),
        ({"destination": "127.0.0.1:4444", "max_bandwidth_mib_s": -5}, "max_bandwidth_mib_s: must be >= 0"),
        ({"destination": "127.0.0.1:4444", "max_bandwidth_mib_s": 10**18}, "max_bandwidth_mib_s: must be <="),
        ({"destination": "127.0.0.1:4444", "to": "x"}, "unknown key 'to'"),
    ]
    empty: list[tuple[Any, str]] = [({"force": True}, "unknown key 'force'"), (b"[]", "expected object")]

    async def main() -> None:
        async with serving(tmp_path) as api:
            await api.ok("POST", "/v1/guests", {"name": "g0", "memory_mib": 16}, status=201)
            cases = [("/v1/guests", body, why) for body, why in create]
            cases += [("/v1/guests/g0/start", body, why) for body, why in start]
            cases += [("/v1/guests/g0/migrate", body, why) for body, why in migrate]
            for route in ("stop", "reboot", "kexec"):
                cases += [(f"/v1/guests/g0/{route}", body, why) for body, why in empty]
            cases += [("/v1/migrations/0123456789abcdef/cancel", body, why) for body, why in empty]
            for path, body, why in cases:
                raw = body if isinstance(body, bytes) else None
                answer = await api.call("POST", path, body, raw=raw)
                assert answer.status == 400, (path, body, answer)
                assert answer.body["error"] == "bad_request"
                assert why in answer.detail, (path, body, answer.detail)
            # Nothing happened: no guest g1, g0 still defined.
            assert [g["name"] for g in (await api.ok("GET", "/v1/guests"))["guests"]] == ["g0"]
            assert (await api.ok("GET", "/v1/guests/g0"))["state"] == "defined"

            too_big = await api.call("POST", "/v1/guests", raw=b" " * (MAX_BODY_BYTES + 1))
            assert too_big.status == 413 and too_big.body["error"] == "payload_too_large"

            # Negative controls: the same routes take valid bodies (null = the documented default).
            g1 = await api.ok("POST", "/v1/guests", {"name": "g1", "memory_mib": 16, "policy": 1, "efi": False,
                                                      "uefi_live_migration": None}, status=201)
            assert g1["policy"] == 1
            started = await api.ok("POST", "/v1/guests/g0/start", {"workload": None})
            assert started["state"] == "running"
            await api.ok("POST", "/v1/guests/g0/stop", {})

    run(main)


def test_migrate_is_409_while_the_msr_is_not_ready_and_the_reason_is_in_the_answer(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as api:
            destination = f"127.0.0.1:{free_port()}"
            defined = await api.ok("POST", "/v1/guests", {"name": "idle", "memory_mib": 16}, status=201)
            answer = await api.call("POST", "/v1/guests/idle/migrate", {"destination": destination})
            assert answer.status == 409 and "only a running guest can migrate" in answer.detail
            assert defined["state"] == "defined"

            # EFI guests whose SevLiveMigrationEnabled is false or absent never write READY
            # (docs/design.md §3 "Guest-visible interface").
            for name, variable in (("efi-off", False), ("efi-absent", None)):
                await api.ok("POST", "/v1/guests", {"name": name, "memory_mib": 16, "efi": True,
                                                     "uefi_live_migration": variable}, status=201)
                guest = await api.ok("POST", f"/v1/guests/{name}/start", {"workload": WORKLOAD})
                assert guest["state"] == "running"
                assert guest["migration_control"] == {"feature": True, "msr": 0, "ready": False}
                answer = await api.call("POST", f"/v1/guests/{name}/migrate", {"destination": destination})
                assert answer.status == 409 and answer.body["error"] == "conflict", answer
                assert "MSR_KVM_MIGRATION_CONTROL = 0x0" in answer.detail
                assert "SevLiveMigrationEnabled" in answer.detail
                assert (await api.ok("GET", "/v1/migrations")) == {"migrations": []}

            # Negative control: an EFI guest with the default (variable true) becomes READY and the
            # same request is accepted; the destination refuses the connection, so it fails cleanly.
            await api.ok("POST", "/v1/guests", {"name": "efi-on", "memory_mib": 16, "efi": True}, status=201)
            await api.ok("POST", "/v1/guests/efi-on/start", {"workload": WORKLOAD})
            await api.poll("/v1/guests/efi-on", lambda g: g["migration_control"]["ready"])
            accepted = await api.call("POST", "/v1/guests/efi-on/migrate",
                                      {"destination": destination, "downtime_limit_ms": 50, "max_bandwidth_mib_s": 0})
            assert accepted.status == 202, accepted
            migration = accepted.body
            assert accepted.headers["Location"] == f"/v1/migrations/{migration['id']}"
            assert migration["guest"] == "efi-on" and migration["role"] == "source"
            assert migration["destination"] == destination
            failed = await api.poll(f"/v1/migrations/{migration['id']}", lambda m: m["status"] == "failed")
            assert "nothing is listening on" in failed["error"], failed
            assert (await api.ok("GET", "/v1/migrations"))["migrations"] == [failed]
            assert (await api.ok("GET", "/v1/guests/efi-on"))["state"] == "running"  # nothing lost

            late = await api.call("POST", f"/v1/migrations/{migration['id']}/cancel")
            assert late.status == 409 and "too late to cancel" in late.detail, late

    run(main)


# ---------------------------------------------------------------------- migrations between two daemons


def test_migration_cancel_and_completion_between_two_daemons(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path, "hostA") as a, serving(tmp_path, "hostB") as b:
            destination = f"127.0.0.1:{b.daemon.migration_port}"
            await a.ok("POST", "/v1/guests", {"name": "g1", "memory_mib": 16}, status=201)
            await a.ok("POST", "/v1/guests/g1/start", {"workload": WORKLOAD})
            await a.poll("/v1/guests/g1", lambda g: g["migration_control"]["ready"])

            # 1 MiB/s for 16 MiB: still in pre-copy when the cancel arrives.
            slow = await a.ok("POST", "/v1/guests/g1/migrate", {"destination": destination, "max_bandwidth_mib_s": 1},
                              status=202)
            await a.poll(f"/v1/migrations/{slow['id']}", lambda m: m["status"] == "active")
            busy = await a.call("POST", "/v1/guests/g1/stop")
            assert busy.status == 409 and "migrating" in busy.detail
            again = await a.call("POST", "/v1/guests/g1/migrate", {"destination": destination})
            assert again.status == 409 and "migrating" in again.detail
            cancelling = await a.call("POST", f"/v1/migrations/{slow['id']}/cancel", {})
            assert cancelling.status == 202 and cancelling.body["id"] == slow["id"]
            cancelled = await a.poll(f"/v1/migrations/{slow['id']}", lambda m: m["status"] == "cancelled")
            assert cancelled["error"] == "cancelled by the operator"
            assert (await a.ok("GET", "/v1/guests/g1"))["state"] == "running"
            incoming = await b.poll("/v1/migrations", lambda body: any(
                m["status"] in ("failed", "cancelled") for m in body["migrations"]))
            (record,) = incoming["migrations"]
            assert record["id"] == slow["id"] and record["role"] == "destination"
            assert await b.ok("GET", "/v1/guests") == {"guests": []}  # no half-created guest
            refused = await b.call("POST", f"/v1/migrations/{slow['id']}/cancel")
            assert refused.status == 409 and "incoming here" in refused.detail

            fast = await a.ok("POST", "/v1/guests/g1/migrate", {"destination": destination}, status=202)
            done = await a.poll(f"/v1/migrations/{fast['id']}", lambda m: m["status"] in ("completed", "failed"))
            assert done["status"] == "completed", done
            assert done["downtime_ms"] is not None and done["rounds"] >= 2 and done["bytes"]["transferred"] > 0
            # The source marks its guest migrated once its agent has stopped, just after "completed".
            await a.poll("/v1/guests/g1", lambda g: g["state"] == "migrated", timeout=10)
            arrived = await b.poll("/v1/guests/g1", lambda g: g["check"]["pages_verified"] > 0)
            assert arrived["state"] == "running"
            assert arrived["check"] == {"pages_verified": GUEST_PAGES_16MIB, "errors": 0, "last_error": None}
            dest_record = await b.ok("GET", f"/v1/migrations/{fast['id']}")
            assert dest_record["role"] == "destination" and dest_record["status"] == "completed"

            finished = await a.call("POST", f"/v1/migrations/{fast['id']}/cancel")
            assert finished.status == 409 and "committed" in finished.detail
            metrics = (await a.call("GET", "/metrics")).body
            assert 'migd_migrations_total{role="source",result="completed"} 1' in metrics
            assert 'migd_migrations_total{role="source",result="cancelled"} 1' in metrics
            assert 'migd_migration_downtime_seconds_count 1' in metrics
            assert (await a.call("DELETE", "/v1/guests/g1")).status == 204  # the migrated husk goes
            await b.ok("POST", "/v1/guests/g1/stop")

    run(main, timeout=90)


# ---------------------------------------------------------------------- metrics, failures, document


def _sample(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"{series} not in the exposition"
    return float(match.group(1))


def test_metrics_route_serves_the_exposition_and_counters_survive_deletion(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as api:
            answer = await api.call("GET", "/metrics")
            assert answer.status == 200
            assert answer.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert _sample(answer.body, 'migd_hypercalls_total{result="ok"}') == 0

            # g1 lives and goes between two scrapes: DELETE itself must fold its counts in.
            await api.ok("POST", "/v1/guests", {"name": "g1", "memory_mib": 16}, status=201)
            await api.ok("POST", "/v1/guests/g1/start", {"workload": WORKLOAD})
            await api.poll("/v1/guests/g1", lambda g: g["migration_control"]["ready"])
            await api.ok("POST", "/v1/guests/g1/stop")
            gone = api.daemon.guest("g1").vm.hypercall_counts["ok"]
            assert gone > 0
            assert (await api.call("DELETE", "/v1/guests/g1")).status == 204
            assert api.daemon.host.guests == {}
            text = (await api.call("GET", "/metrics")).body
            assert _sample(text, 'migd_hypercalls_total{result="ok"}') == gone

            await api.ok("POST", "/v1/guests", {"name": "g2", "memory_mib": 16}, status=201)
            await api.ok("POST", "/v1/guests/g2/start")
            await api.poll("/v1/guests/g2", lambda g: g["migration_control"]["ready"])
            text = (await api.call("GET", "/metrics")).body
            assert _sample(text, 'migd_guests{state="running"}') == 1
            assert _sample(text, 'migd_guests{state="defined"}') == 0
            live = api.daemon.guest("g2").vm.hypercall_counts["ok"]
            assert _sample(text, 'migd_hypercalls_total{result="ok"}') == gone + live

    run(main)


def test_an_unexpected_exception_is_a_json_500_with_the_traceback_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(tmp_path) as api:
            real = api.daemon.migrations

            def broken() -> list[Any]:
                raise RuntimeError("injected fault")

            api.daemon.migrations = broken  # type: ignore[method-assign]
            with caplog.at_level(logging.ERROR, logger="migd.daemon.api"):
                answer = await api.call("GET", "/v1/migrations")
            assert answer.status == 500 and answer.body["error"] == "internal_error"
            # No internals for the client (class name, message): the log has them.
            assert "log has the traceback" in answer.detail and "RuntimeError" not in answer.detail
            assert "injected fault" not in answer.detail
            (record,) = [r for r in caplog.records if r.name == "migd.daemon.api"]
            assert record.exc_info is not None and "injected fault" in str(record.exc_info[1])
            api.daemon.migrations = real  # type: ignore[method-assign]
            assert (await api.call("GET", "/v1/migrations")).status == 200  # the daemon lives on

    run(main)


def test_the_openapi_document_is_served_and_true_to_the_routes(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as api:
            served = await api.ok("GET", "/v1/openapi.json")
            assert served == json.loads(json.dumps(openapi.DOCUMENT))
            assert served["openapi"] == "3.1.0" and served["info"]["version"] == __version__
            assert routes_of(api.app) == routes_of_document(served)
            assert (await api.call("GET", "/v1/openapi.json", token=None)).status == 401

            # Negative control: a route the document lacks, or a documented one the app lacks, shows.
            extra = build_app(api.daemon, TOKEN)

            async def hidden(request: web.Request) -> web.Response:
                return web.json_response({})

            extra.router.add_get("/v1/hidden", hidden, allow_head=False)
            assert routes_of(extra) - routes_of_document(served) == {("GET", "/v1/hidden")}
            trimmed = json.loads(json.dumps(served))
            del trimmed["paths"]["/v1/guests/{name}/kexec"]
            assert routes_of(api.app) - routes_of_document(trimmed) == {("POST", "/v1/guests/{name}/kexec")}

    run(main)


def schema_nodes(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """A schema and every subschema it holds (properties, items, additionalProperties, if, then, anyOf)."""
    nodes = [schema]
    for sub in schema.get("properties", {}).values():
        nodes += schema_nodes(sub)
    for key in ("items", "additionalProperties", "if", "then"):
        if isinstance(schema.get(key), dict):
            nodes += schema_nodes(schema[key])
    for sub in schema.get("anyOf", []):
        nodes += schema_nodes(sub)
    return nodes


def test_the_document_is_well_formed() -> None:
    doc = openapi.DOCUMENT
    roots = list(doc["components"]["schemas"].values())
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            responses = op["responses"]
            assert any(code.startswith("2") for code in responses), (method, path)
            assert ("401" in responses) == (path != "/v1/health"), (method, path)
            assert ("security" in op) == (path == "/v1/health"), (method, path)
            params = re.findall(r"\{(\w+)\}", path)
            assert [p["name"] for p in op.get("parameters", [])] == params, (method, path)
            if "requestBody" in op:
                assert "400" in responses and "413" in responses
                roots += [c["schema"] for c in op["requestBody"]["content"].values()]
            else:  # a body where none belongs is refused (test_a_body_on_a_bodiless_route_is_400)
                assert method in ("get", "delete") and "400" in responses, (method, path)
            for response in responses.values():
                roots += [c["schema"] for c in response.get("content", {}).values()]
    nodes = [node for root in roots for node in schema_nodes(root)]
    assert len(nodes) > 80
    for node in nodes:
        # check() implements exactly these, so every schema means what it says to the checker too.
        assert set(node) <= openapi.SUPPORTED_KEYWORDS, node
        if "$ref" in node:
            assert node["$ref"].removeprefix("#/components/schemas/") in doc["components"]["schemas"], node
    with pytest.raises(ValueError, match="does not implement"):
        openapi.check(1, {"type": "integer", "multipleOf": 2})


def test_the_schema_checker_rejects_what_it_must() -> None:
    guest = {
        "name": "g1", "state": "running", "memory_mib": 16, "policy": 0,
        "migration_control": {"feature": True, "msr": 1, "ready": True},
        "pages": {"total": 4096, "private": 4000, "shared": 96},
        "check": {"pages_verified": 0, "errors": 0, "last_error": None},
        "migrated": None,
    }
    openapi.check(guest, openapi.ref("Guest"))
    bad = [
        ({**guest, "state": "exploded"}, "state: expected one of"),
        ({**guest, "memory_mib": True}, "memory_mib: expected integer, got boolean"),
        ({**guest, "extra": 1}, "unknown key 'extra'"),
        ({k: v for k, v in guest.items() if k != "check"}, "missing required key 'check'"),
        ({**guest, "migration_control": {"feature": 1, "msr": 1, "ready": True}}, "migration_control.feature"),
        ({**guest, "check": {"pages_verified": -1, "errors": 0, "last_error": None}}, "check.pages_verified"),
    ]
    for value, why in bad:
        with pytest.raises(ConfigError, match=re.escape(why)):
            openapi.check(value, openapi.ref("Guest"))
    with pytest.raises(ConfigError, match=r"guests\[1\]: expected object"):
        openapi.check({"guests": [guest, 5]}, openapi.ref("GuestList"))
    with pytest.raises(ConfigError, match="expected number"):
        openapi.check(float("nan"), {"type": "number"})


# ---------------------------------------------------------------------- what schemathesis found (issue 13)


def test_integral_floats_are_integers_in_every_body(tmp_path: Path) -> None:
    """JSON Schema's integer includes 875.0; the daemon takes it as 875 in every integer field."""
    assert decode_json(b'{"seed": 875.0, "a": 8.75e2, "b": 9007199254740993.0, "c": -0.0}') == {
        "seed": 875, "a": 875, "b": 9007199254740993, "c": 0}  # exact: float() would give ...992
    assert all(type(v) is int for v in decode_json(b"[875.0, 8.75e2, 1e19]"))
    for fractional in (b"16.5", b"1e-999999", b"1.0000000000000000000000000000000001"):
        assert type(decode_json(fractional)) is float, fractional  # not integral: still no integer
    with pytest.raises(ConfigError, match="expected integer, got number"):
        openapi.check(decode_json(b"1.0000000000000000000000000000000001"), {"type": "integer"})
    # Exponents past decimal's context (Emax/Emin ~ 1e18) are bad input, not a 5xx.
    for huge in (b"1e99999999999999999999", b"1e-99999999999999999999", b'{"memory_mib": -1E+99999999999999999999}'):
        with pytest.raises(ConfigError, match="out of range"):
            decode_json(huge)
    # Negative control: the old decoding (json.loads with float) is what the checker refused.
    with pytest.raises(ConfigError, match=r"workload.seed: expected integer, got number 875.0"):
        openapi.check(json.loads('{"workload": {"seed": 875.0}}'), openapi.schema("StartGuest"))

    async def main() -> None:
        async with serving(tmp_path) as api:
            created = await api.call("POST", "/v1/guests", raw=b'{"name": "g1", "memory_mib": 16.0, "policy": 1e0}')
            assert created.status == 201, created
            assert created.body["memory_mib"] == 16 and created.body["policy"] == 1
            guest = api.daemon.guest("g1")
            assert type(guest.definition.memory_mib) is int
            started = await api.call("POST", "/v1/guests/g1/start", raw=b'{"workload": {"seed": 875.0}}')
            assert started.status == 200, started
            assert guest.workload.seed == 875 and type(guest.workload.seed) is int
            await api.ok("POST", "/v1/guests/g1/stop")

    run(main)


def test_the_destination_pattern_is_what_the_daemon_accepts() -> None:
    """Every string the document's pattern allows is an address parse_address takes with a port
    1..65535 (so a schema-valid migrate is never a 400), and the pattern refuses the shapes the
    issue named."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from migd.daemon.config import parse_address

    destination = openapi.schema("MigrateRequest")["properties"]["destination"]
    pattern = re.compile(openapi._ecma_pattern(destination["pattern"]))

    @settings(max_examples=400, deadline=None, database=None, derandomize=True)
    @given(st.from_regex(pattern, fullmatch=True))
    def accepted(text: str) -> None:
        address = parse_address(text, "destination")
        assert address.port is not None and 1 <= address.port <= 65535, text

    accepted()
    for good in ("127.0.0.1:4444", "[::1]:4444", "localhost:1", "host-b.example:65535", "[::ffff:10.0.0.1]:80",
                 "[fe80::1:2:3:4]:4444"):
        openapi.check(good, destination)
    for bad in ("nowhere", "127.0.0.1:0", "127.0.0.1:65536", "h:01", "h:", ":1", "::1:4444", "[abc]:1",
                "[1::2::3]:1", "[::1]", "bad host!:1", "a..b:1", "-a:1", "127.0.0.1:4444\n", "ü.example:1"):
        with pytest.raises(ConfigError, match="destination: must match|must be at least"):
            openapi.check({"destination": bad}, openapi.schema("MigrateRequest"))
    # Negative control: the old schema (no pattern) let these through to the handler.
    old = {k: v for k, v in destination.items() if k != "pattern"}
    openapi.check("[abc]:1", old)
    openapi.check("::1:4444", old)


def test_a_destination_outside_the_pattern_is_400_before_any_state_check(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as api:
            await api.ok("POST", "/v1/guests", {"name": "g1", "memory_mib": 16}, status=201)
            # The old code took "[abc]:1" as host "abc" and answered 409 (the guest is not running).
            for bad in ("[abc]:1", "::1:4444", "127.0.0.1:01"):
                answer = await api.call("POST", "/v1/guests/g1/migrate", {"destination": bad})
                assert answer.status == 400 and "destination: must match" in answer.detail, (bad, answer)
            # Negative control: a destination inside the pattern gets past the body check.
            answer = await api.call("POST", "/v1/guests/g1/migrate", {"destination": "[::1]:4444"})
            assert answer.status == 409 and "only a running guest can migrate" in answer.detail, answer

    run(main)


def test_the_uefi_rule_is_in_the_schema() -> None:
    """uefi_live_migration (not null) needs efi: true, and the document says so (if/then), so a
    client generating bodies from the document meets no undocumented 400."""
    create = openapi.schema("CreateGuest")
    refused = [{"name": "g1", "memory_mib": 16, "uefi_live_migration": False},
               {"name": "g1", "memory_mib": 16, "efi": False, "uefi_live_migration": True}]
    allowed = [{"name": "g1", "memory_mib": 16, "efi": False, "uefi_live_migration": None},
               {"name": "g1", "memory_mib": 16, "efi": True, "uefi_live_migration": False},
               {"name": "g1", "memory_mib": 16, "efi": True}, {"name": "g1", "memory_mib": 16}]
    for body in refused:
        with pytest.raises(ConfigError, match="only meaningful with efi: true"):
            openapi.check(body, create)
    for body in allowed:
        openapi.check(body, create)
    # An independent JSON Schema 2020-12 validator reads the served schema the same way.
    import jsonschema_rs

    document = json.loads(json.dumps(openapi.DOCUMENT))
    validator = jsonschema_rs.Draft202012Validator(
        {**document["components"]["schemas"]["CreateGuest"], "components": document["components"]})
    assert [validator.is_valid(b) for b in refused + allowed] == [False] * len(refused) + [True] * len(allowed)
    # Negative control: without the if/then (the old schema) the refused bodies are schema-valid.
    old = {k: v for k, v in create.items() if k not in ("if", "then")}
    for body in refused:
        openapi.check(body, old)
    with pytest.raises(ConfigError, match="expected true, got 1"):  # const is JSON equality: 1 is not true
        openapi.check(1, {"const": True})


def test_a_body_on_a_bodiless_route_is_400(tmp_path: Path) -> None:
    """GET and DELETE take no body; one that comes is refused, never silently ignored."""
    async def main() -> None:
        async with serving(tmp_path) as api:
            await api.ok("POST", "/v1/guests", {"name": "g1", "memory_mib": 16}, status=201)
            bodiless = sorted((m, t) for m, t in routes_of(api.app) if m in ("GET", "DELETE"))
            assert len(bodiless) == 8
            for method, template in bodiless:
                path = template.replace("{name}", "g1").replace("{id}", "0123456789abcdef")
                for garbage in (b"garbage", b"{}", b'{"force": true}', b"\x00\xff"):
                    answer = await api.call(method, path, raw=garbage)
                    assert answer.status == 400 and "takes no body" in answer.detail, (method, path, garbage, answer)
                # Negative control: no body, or only whitespace, gets past the check.
                if method == "GET":
                    assert (await api.call(method, path)).status != 400
                    assert (await api.call(method, path, raw=b" \r\n")).status != 400
            # The old daemon deleted the guest and ignored the body; now it is still there.
            assert (await api.ok("GET", "/v1/guests/g1"))["name"] == "g1"
            assert (await api.call("DELETE", "/v1/guests/g1")).status == 204

    run(main)


# ---------------------------------------------------------------------- migrate settings reach the engine


def test_connections_in_the_migrate_body_reaches_the_migration_params(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``connections`` (1..16, null or absent: migration.connections of the config) is what the
    daemon puts into MigrationParams; anything else is a 400 before any MigrationParams is made."""
    built: list[MigrationParams] = []

    def recording(**kwargs: Any) -> MigrationParams:
        params = MigrationParams(**kwargs)
        built.append(params)
        return params

    # The params the daemon builds, whatever happens next: the guest is only defined, so the
    # migration is refused (409) right after, and no engine runs.
    monkeypatch.setattr(core, "MigrationParams", recording)
    schema = openapi.schema("MigrateRequest")["properties"]["connections"]
    assert {k: v for k, v in schema.items() if k != "description"} == {
        "type": ["integer", "null"], "minimum": 1, "maximum": wire.MAX_CONNECTIONS}
    assert wire.MAX_CONNECTIONS == 16

    async def main() -> None:
        async with serving(tmp_path) as api:
            await api.ok("POST", "/v1/guests", {"name": "g1", "memory_mib": 16}, status=201)
            destination = f"127.0.0.1:{free_port()}"

            async def connections_of(raw: bytes) -> int:
                answer = await api.call("POST", "/v1/guests/g1/migrate", raw=raw)
                assert answer.status == 409 and "only a running guest can migrate" in answer.detail, (raw, answer)
                return built.pop().connections

            body = f'{{"destination": "{destination}", '.encode()
            assert await connections_of(body + b'"connections": 4}') == 4
            assert await connections_of(body + b'"connections": 16}') == 16
            assert await connections_of(body + b'"connections": 4.0}') == 4  # the API's integer rule (875.0)
            assert await connections_of(body + b'"connections": 1}') == 1
            # Absent or null: the config's migration.connections (default 1).
            assert await connections_of(body + b'"downtime_limit_ms": 50}') == 1
            api.daemon.config = replace(api.daemon.config, connections=5)
            assert await connections_of(body + b'"connections": null}') == 5
            assert await connections_of(body + b'"max_bandwidth_mib_s": 0}') == 5
            assert await connections_of(body + b'"connections": 2}') == 2  # the body wins over the config
            assert built == []

            for bad, why in ((0, "connections: must be >= 1, got 0"), (17, "connections: must be <= 16, got 17"),
                             (True, "connections: expected integer or null, got boolean True"),
                             ("3", "connections: expected integer or null, got string '3'"),
                             (2.5, "connections: expected integer or null, got number 2.5")):
                answer = await api.call("POST", "/v1/guests/g1/migrate", {"destination": destination,
                                                                          "connections": bad})
                assert answer.status == 400 and answer.body["error"] == "bad_request", (bad, answer)
                assert why in answer.detail, (bad, answer.detail)
            assert built == []  # refused before the daemon built anything

            # A Python caller's bool is refused too (MigrationParams would take True as 1).
            with pytest.raises(ConfigError, match="connections must be an integer, got True"):
                api.daemon.migrate("g1", destination, connections=True)  # type: ignore[arg-type]
            with pytest.raises(ConfigError, match="connections"):
                api.daemon.migrate("g1", destination, connections=0)
            assert (await api.ok("GET", "/v1/migrations")) == {"migrations": []}

    run(main)
