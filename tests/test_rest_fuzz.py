"""Fuzz the REST API (migd/daemon/api.py) from its own OpenAPI document (the schemathesis equivalent).

The operations come from the served ``GET /v1/openapi.json``; hypothesis draws one operation,
a path parameter (random names with odd characters, or a guest that exists) and a body that is
valid by the operation's schema, invalid (wrong type, extra or missing key, huge or non-finite
number, unicode, deep nesting, not an object) or raw bytes (not UTF-8, not JSON, oversized).
Against a real in-process server (tests/test_api.py ``serving``) every answer must be:

* never 5xx (docs/design.md §8 "Invariants", 7);
* a 4xx: JSON ``{"error", "detail"}`` valid by the Error schema, with a non-empty detail;
  an invalid body on an operation that takes one: exactly 400;
* a 2xx: valid by the documented response schema (``check_against_document``).

Generated values that are schema-valid stay cheap and local: guests of at most 16 MiB, small
workload rates, migrations only to a loopback port nobody listens on, and save / restore files
only in the run's own directory (a save of the running g1 to a generated "/x" would write that
file, and the tests may run as root).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migd.daemon import openapi
from migd.daemon.api import MAX_BODY_BYTES
from migd.errors import ConfigError
from test_api import TOKEN, Api, check_against_document, free_port, serving_in_thread

pytestmark = pytest.mark.fault_class("bad input: REST API fuzz")
MAX_EXAMPLES = 300
#: Where valid migrate bodies point: a loopback port nobody listens on (no stray traffic).
CLOSED_PORT = free_port()
_NONE = object()  # "send no body"
#: The only directory valid save and restore bodies name; the server fixture sets it before any request.
FILES = Path("/nonexistent/migd-rest-fuzz")


# ---------------------------------------------------------------------- the server


@dataclass
class Server:
    port: int
    api: Api
    document: dict[str, Any]
    requests: int = 0

    def request(self, method: str, path: str, body: bytes | None) -> tuple[int, str, Any, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        self.requests += 1
        content_type = resp.getheader("Content-Type", "")
        decoded: Any = None
        if raw and content_type.startswith("application/json"):
            decoded = json.loads(raw)
        elif raw:
            decoded = raw.decode()
        return resp.status, content_type, decoded, raw


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``serving`` on its own event loop thread for the whole module (one daemon, guest g1 running)."""
    global FILES
    root = tmp_path_factory.mktemp("fuzz")
    FILES = Path(root) / "files"
    FILES.mkdir()
    with serving_in_thread(Path(root)) as (api, loop):
        port = api.client.server.port
        assert port is not None
        srv = Server(port, api, {})
        status, _, document, _ = srv.request("GET", "/v1/openapi.json", None)
        assert status == 200 and document["paths"], document
        srv.document = document
        status, _, guest, _ = srv.request("POST", "/v1/guests", json.dumps({"name": "g1", "memory_mib": 16}).encode())
        assert status == 201, guest
        # Running and READY, so schema-valid migrate/stop/reboot/kexec requests reach the engine.
        status, _, guest, _ = srv.request("POST", "/v1/guests/g1/start", b"{}")
        assert status == 200, guest
        asyncio.run_coroutine_threadsafe(api.poll("/v1/guests/g1", lambda g: g["migration_control"]["ready"]),
                                         loop).result(timeout=30)
        yield srv


# ---------------------------------------------------------------------- strategies from the schemas


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = openapi.SCHEMAS[schema["$ref"].removeprefix("#/components/schemas/")]
    return schema


#: Bounds that keep schema-valid requests cheap (the schema allows far more).
_CHEAP = {"memory_mib": 16, "dirty_rate_mib_s": 4, "convert_rate_hz": 20, "max_bandwidth_mib_s": 64}


def valid(schema: dict[str, Any], key: str = "") -> st.SearchStrategy[Any]:
    """Values that ``openapi.check`` accepts for ``schema`` (the subset the document uses)."""
    schema = resolve(schema)
    if key == "destination":
        return st.sampled_from([f"127.0.0.1:{CLOSED_PORT}", f"[::1]:{CLOSED_PORT}", f"localhost:{CLOSED_PORT}"])
    if key in ("path", "for_host_pdh"):
        # A new file, one an earlier save may have written (a restore opens it), one that cannot exist.
        return st.sampled_from([str(FILES / "a.save"), str(FILES / "b.save"), str(FILES / "absent" / "x.save")])
    if key == "policy":
        # Bits 16..31 of a policy are the minimum firmware API; the schema's anyOf allows at most
        # this firmware's 0.24 (test_a_policy_the_firmware_refuses_is_outside_the_document below).
        return st.integers(0, 0xFFFF) | st.integers(0, 24).map(lambda minor: minor << 24)  # API 0.minor
    if key == "name":
        return st.just("g1") | st.from_regex(openapi._ecma_pattern(schema["pattern"]), fullmatch=True)
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    types = schema.get("type", "object")
    options = []
    for kind in types if isinstance(types, list) else [types]:
        if kind == "null":
            options.append(st.none())
        elif kind == "boolean":
            options.append(st.booleans())
        elif kind in ("integer", "number"):
            low = schema.get("minimum", schema.get("exclusiveMinimum", -(1 << 40)))
            high = min(schema.get("maximum", 1 << 40), _CHEAP.get(key, 1 << 62))
            ints = st.integers(int(low) + (1 if "exclusiveMinimum" in schema else 0), int(high))
            if kind == "integer":
                options.append(ints)
            else:
                options.append(ints | st.floats(low, high, exclude_min="exclusiveMinimum" in schema,
                                                allow_nan=False, allow_infinity=False))
        elif kind == "string":
            if "pattern" in schema:
                options.append(st.from_regex(openapi._ecma_pattern(schema["pattern"]), fullmatch=True))
            else:
                longest = min(schema.get("maxLength", 40), 40)
                options.append(st.text(min_size=schema.get("minLength", 0), max_size=longest))
        elif kind == "object":
            options.append(valid_object(schema))
    return st.one_of(options)


@st.composite
def valid_object(draw: st.DrawFn, schema: dict[str, Any]) -> dict[str, Any]:
    properties = schema.get("properties", {})
    required = set(schema.get("required", ()))
    out = {}
    for key, sub in properties.items():
        if key in required or draw(st.booleans()):
            out[key] = draw(valid(sub, key))
    if "if" in schema and not _rejected(out, schema["if"]):
        # if/then (CreateGuest: uefi_live_migration needs efi: true): satisfy then's constants.
        for key, sub in schema["then"].get("properties", {}).items():
            if "const" in sub:
                out[key] = sub["const"]
    return out


JSON_LEAF = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
ANY_JSON = st.recursive(
    JSON_LEAF, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
#: Deeply nested arrays (json.dumps itself stops near 1000 levels; deeper ones are raw bytes).
DEEP = st.integers(1, 500).map(lambda depth: json.loads("[" * depth + "]" * depth))
HUGE = st.sampled_from([2**63, 2**64 - 1, -(2**64 - 1), 10**19, 1e308, -1e308, 1e-320, 5e-324])


def wrong_type(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """A JSON value of a type ``schema`` does not allow."""
    types = resolve(schema).get("type", "object")
    allowed = set(types if isinstance(types, list) else [types])
    return ANY_JSON.filter(lambda v: not any(openapi._type_matches(v, t) for t in allowed))


@st.composite
def invalid_body(draw: st.DrawFn, schema_name: str) -> Any:
    """A decoded JSON body that ``openapi.check`` rejects for ``schema_name``."""
    schema = openapi.schema(schema_name)
    properties: dict[str, Any] = schema.get("properties", {})
    body = draw(valid_object(schema))
    mutations = ["extra key", "not an object"]
    if properties:
        mutations += ["wrong type", "huge number"]
    if schema.get("required"):
        mutations.append("missing key")
    mutation = draw(st.sampled_from(mutations))
    if mutation == "extra key":
        key = draw(st.text(min_size=1, max_size=20).filter(lambda k: k not in properties))
        body[key] = draw(ANY_JSON)
    elif mutation == "not an object":
        return draw(ANY_JSON.filter(lambda v: not isinstance(v, dict)) | DEEP)
    elif mutation == "missing key":
        body.pop(draw(st.sampled_from(schema["required"])))
    elif mutation == "wrong type":
        key = draw(st.sampled_from(sorted(properties)))
        body[key] = draw(wrong_type(properties[key]))
    else:
        numeric = [k for k, s in properties.items() if "maximum" in resolve(s) or "minimum" in resolve(s)]
        if not numeric:
            key = draw(st.sampled_from(sorted(properties)))
            body[key] = draw(wrong_type(properties[key]))
        else:
            key = draw(st.sampled_from(numeric))
            sub = resolve(properties[key])
            body[key] = draw(HUGE.filter(lambda v: _rejected(v, sub)))
    return body


def _rejected(value: Any, schema: dict[str, Any]) -> bool:
    try:
        openapi.check(value, schema)
    except ConfigError:
        return True
    return False


RAW_BODIES = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([
        b"\xff\xfe{}", b"NaN", b"Infinity", b"1e999", b"-1e999", b'{"a": 1, "a": 2}', b"{" * 5000,
        b"[" * 60000, b"9" * 5000, b'{"name": "\xed\xa0\x80"}', b"\x00", b"{}garbage",
        b"x" * (MAX_BODY_BYTES + 1),
    ]),
    ANY_JSON.map(lambda v: json.dumps(v).encode()),
)

ODD_NAME = st.one_of(
    st.just("g1"),
    st.just("g1"),  # the guest that exists, as often as everything else together
    st.text(min_size=1, max_size=40),
    st.sampled_from(["..", ".", "%00", "g1/start", "a" * 300, "g1;x", "ü", "\u202e", "g1 ", "-", "0" * 64]),
)


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    body_schema: str | None

    def path(self, name: str) -> str:
        quoted = urllib.parse.quote(name, safe="")
        return self.template.replace("{name}", quoted).replace("{id}", quoted)


def operations(document: dict[str, Any]) -> list[Operation]:
    out = []
    for template, item in document["paths"].items():
        for method, op in item.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            out.append(Operation(method.upper(), template, body["$ref"].rsplit("/", 1)[-1] if body else None))
    return sorted(out, key=lambda o: (o.template, o.method))


@st.composite
def requests(draw: st.DrawFn, ops: list[Operation]) -> tuple[Operation, str, str, Any, bytes | None]:
    """(operation, path, body kind, decoded body or _NONE, bytes sent)."""
    op = draw(st.sampled_from(ops))
    path = op.path(draw(ODD_NAME))
    kinds = ["none", "raw"] + (["valid", "invalid"] if op.body_schema else [])
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return op, path, kind, _NONE, None
    if kind == "raw":
        return op, path, kind, _NONE, draw(RAW_BODIES)
    assert op.body_schema is not None
    body = draw(valid(openapi.schema(op.body_schema)) if kind == "valid" else invalid_body(op.body_schema))
    return op, path, kind, body, json.dumps(body, ensure_ascii=draw(st.booleans())).encode()


# ---------------------------------------------------------------------- the property


def check_answer(server: Server, op: Operation, path: str, kind: str, sent: bytes | None) -> int:
    status, content_type, decoded, raw = server.request(op.method, path, sent)
    where = (op.method, path, kind, sent[:200] if sent else sent, status, raw[:500])
    assert status < 500, where
    if 400 <= status < 500:
        assert content_type.startswith("application/json"), where
        openapi.check(decoded, openapi.schema("Error"))
        assert decoded["detail"].strip(), where
    if kind == "invalid":
        # 400 before anything else; but aiohttp's {name} never matches "{" or "}", so such a
        # name is an unrouted 404 before any handler reads the body.
        braces = any(c in urllib.parse.unquote(path) for c in "{}")
        unrouted = status == 404 and decoded["detail"].startswith("no route") and braces
        assert status == 400 or unrouted, where
    if status < 400:
        check_against_document(op.method, path, status, content_type, decoded)
    return status


def test_the_generators_mean_what_they_say(server: Server) -> None:
    """Negative control: "valid" bodies pass the schema checker, "invalid" ones fail it, and the
    answer checks reject a 5xx and an error without a detail."""
    ops = [op for op in operations(server.document) if op.body_schema]
    assert {op.body_schema for op in ops} == {"CreateGuest", "StartGuest", "Empty", "MigrateRequest", "SaveRequest",
                                              "RestoreRequest"}

    @settings(max_examples=60, deadline=None, database=None)
    @given(data=st.data())
    def bodies(data: st.DataObject) -> None:
        op = data.draw(st.sampled_from(ops))
        assert op.body_schema is not None
        openapi.check(data.draw(valid(openapi.schema(op.body_schema))), openapi.schema(op.body_schema))
        with pytest.raises(ConfigError):
            openapi.check(data.draw(invalid_body(op.body_schema)), openapi.schema(op.body_schema))

    bodies()
    with pytest.raises(ConfigError):
        openapi.check({"error": "internal_error", "detail": 5}, openapi.schema("Error"))
    with pytest.raises(ConfigError):  # a guest answer missing a field is caught
        check_against_document("GET", "/v1/guests/g1", 200, "application/json", {"name": "g1"})


def test_every_documented_operation_survives_generated_requests(server: Server) -> None:
    ops = operations(server.document)
    assert len(ops) == 17, ops  # every route of §7 plus the document (test_api checks they match the router)
    seen: dict[tuple[str, str], set[int]] = {}

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(request=requests(ops))
    def answers(request: tuple[Operation, str, str, Any, bytes | None]) -> None:
        op, path, kind, _, sent = request
        status = check_answer(server, op, path, kind, sent)
        seen.setdefault((op.method, op.template), set()).add(status)

    before = server.requests
    answers()
    # Coverage, not luck: every operation was exercised, and both successes and refusals came back.
    assert set(seen) == {(op.method, op.template) for op in ops}, sorted(seen)
    statuses = set().union(*seen.values())
    assert {200, 400, 404} <= statuses, statuses
    assert server.requests - before >= MAX_EXAMPLES // 2
    # The daemon is still healthy after all of it.
    assert server.request("GET", "/v1/health", None)[0] == 200


def test_a_policy_the_firmware_refuses_is_outside_the_document(server: Server) -> None:
    """The document allows exactly the policies the firmware launches (schemathesis found the
    document allowing API versions above the firmware's, answered 400 by the firmware)."""
    for policy in (0xFFFFFFFF, 25 << 24, 1 << 16):  # API 255.255, 0.25, 1.0: newer than 0.24
        body = {"name": "p1", "memory_mib": 16, "policy": policy}
        with pytest.raises(ConfigError, match="at most this firmware's 0.24"):
            openapi.check(body, openapi.schema("CreateGuest"))
        status, _, answer, _ = server.request("POST", "/v1/guests", json.dumps(body).encode())
        assert status == 400 and "policy: must be SEV guest policy" in answer["detail"], (status, answer)
        assert server.request("GET", "/v1/guests/p1", None)[0] == 404  # nothing half-created
    # Negative control: the newest policy the document allows (API 0.24) is launched.
    body = {"name": "p1", "memory_mib": 16, "policy": 24 << 24 | 0xFFFF}
    openapi.check(body, openapi.schema("CreateGuest"))
    status, _, answer, _ = server.request("POST", "/v1/guests", json.dumps(body).encode())
    assert status == 201 and answer["policy"] == 24 << 24 | 0xFFFF, (status, answer)
    assert server.request("DELETE", "/v1/guests/p1", None)[0] == 204
