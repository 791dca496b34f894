"""The REST API of docs/design.md §9 on aiohttp: routes, bearer-token auth, JSON bodies and errors.

Handlers stay thin: validate the body against the schemas of :mod:`migd.daemon.openapi` (so the
served document is what the daemon accepts), call the :class:`~migd.daemon.core.Daemon`, render
``HostGuest.to_json`` / ``MigrationProgress.to_json``. Exceptions become answers in one
place, :func:`_errors`: bad input (``ConfigError``) → 400, unknown names → 404, wrong state →
409, aiohttp's own 404/405/413 → the same JSON shape, anything unexpected → 500 with the
traceback in the log. Every answer but 204 and ``/metrics`` is JSON; every error is
``{"error": code, "detail": reason}``. Bad input never gets a 5xx (docs/design.md §8 "Invariants", 7).
"""

from __future__ import annotations

import decimal
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web

from migd import __version__
from migd.daemon import openapi
from migd.guest.channel import GuestChannelError
from migd.daemon.core import CannotCancel, Daemon, UnknownMigration
from migd.errors import ConfigError, FirmwareError
from migd.guest.host_guest import GuestDefinition, GuestStateError
from migd.guest.ram_capacity import InsufficientRam
from migd.host import GuestExists, UnknownGuest
from migd.daemon.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from migd.daemon.metrics import MetricsCollector
from migd.save import SaveRefused
from migd.save_format import SaveFileError
from migd.source import MigrationRefused
from migd.guest.workload import WorkloadConfig

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DAEMON = web.AppKey("daemon", Daemon)
API_TOKEN = web.AppKey("api_token", bytes)
METRICS = web.AppKey("metrics", MetricsCollector)

#: Largest request body accepted (aiohttp answers 413 beyond it). The biggest valid body, a
#: create or migrate request, is a few hundred bytes.
MAX_BODY_BYTES = 64 * 1024
REALM = "migd"
MAX_JSON_INT = (1 << 64) - 1

#: Domain errors → HTTP status, first match wins (the daemon's docstring lists them).
ERROR_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (ConfigError, 400),
    (UnknownGuest, 404),
    (UnknownMigration, 404),
    (GuestExists, 409),
    (GuestStateError, 409),
    (MigrationRefused, 409),
    (CannotCancel, 409),
    (GuestChannelError, 409),  # the guest's agent is gone or not answering: the guest is not running
    (FirmwareError, 409),  # the (emulated) PSP refused the command in this state
    (InsufficientRam, 409),  # no room for the guest's RAM in guests.ram_dir (detail: the numbers)
    (SaveRefused, 409),  # the guest cannot be saved now, or not to that path / for that PDH
    (SaveFileError, 409),  # not a save file this host can restore (format, MAC, target host, restored before)
)

routes = web.RouteTableDef()
_PUBLIC: set[Handler] = set()
_OPENAPI_JSON = json.dumps(openapi.DOCUMENT, indent=1)


def _public(handler: Handler) -> Handler:
    """Mark a handler as reachable without the bearer token (only /v1/health)."""
    _PUBLIC.add(handler)
    return handler


# ---------------------------------------------------------------------- answers


def error_response(status: int, detail: str, headers: dict[str, str] | None = None) -> web.Response:
    """The §7 error object ``{"error": code, "detail": reason}``."""
    code = openapi.ERROR_CODES.get(status) or ("bad_request" if status < 500 else "internal_error")
    return web.json_response({"error": code, "detail": detail}, status=status, headers=headers)


def _json(data: Any, status: int = 200, location: str | None = None) -> web.Response:
    return web.json_response(data, status=status, headers={hdrs.LOCATION: location} if location else None)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _json_number(text: str) -> int | float:
    # JSON Schema counts 875.0 and 8.75e2 as integers (2020-12 validation §6.1.1), so does the
    # document's checker; returning them as int here means every handler gets the int a field typed
    # "integer" promises, whichever spelling the client chose. Decimal keeps it exact (float()
    # would round 9007199254740993.0), and the range test comes first so that 1e999999 is never
    # expanded into a million-digit int.
    try:
        exact = decimal.Decimal(text)
    except decimal.InvalidOperation:  # an exponent beyond the context's Emax/Emin (1e99999999999999999999)
        raise ValueError(f"number {text[:30]}{'...' if len(text) > 30 else ''} is out of range") from None
    if exact.copy_abs() <= MAX_JSON_INT and exact == exact.to_integral_value():
        return int(exact)
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text} is out of range")
    return value


def _u64_range_int(text: str) -> int:
    # Nothing in the API is wider than a u64; bigger integers would only overflow float
    # conversions further down (a 5xx for bad input) instead of failing here.
    value = int(text)
    if abs(value) > MAX_JSON_INT:
        raise ValueError(f"integer {text[:30]}{'...' if len(text) > 30 else ''} is out of range (|n| < 2**64)")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def decode_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, finite floats, integers within ±(2**64 - 1), unique keys.

    A number with a zero fractional part (``875.0``, ``8.75e2``) decodes as an int: JSON Schema's
    integer.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"body: not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        return json.loads(
            text, parse_constant=_reject_constant, parse_float=_json_number, parse_int=_u64_range_int,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as exc:
        raise ConfigError(f"body: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except ValueError as exc:  # the hooks above, or int() past its digit limit
        raise ConfigError(f"body: {exc}") from None
    except RecursionError:
        raise ConfigError("body: JSON nested too deeply") from None


async def read_body(request: web.Request, schema_name: str, *, required: bool = False) -> dict[str, Any]:
    """The request's JSON object, checked against ``openapi.SCHEMAS[schema_name]``.

    An empty body is ``{}`` unless ``required``.
    """
    raw = await request.read()  # aiohttp raises 413 past client_max_size
    if not raw.strip():
        if required:
            raise ConfigError("body: expected a JSON object, got an empty body")
        return {}
    data = decode_json(raw)
    openapi.check(data, openapi.schema(schema_name))
    return data  # type: ignore[no-any-return]  # check() proved it is an object


# ---------------------------------------------------------------------- middlewares


def _http_error_detail(request: web.Request, exc: web.HTTPException) -> str:
    if exc.status == 404:
        return f"no route for {request.method} {request.path}"
    if exc.status == 405:
        return f"{request.method} is not allowed on {request.path} (allowed: {exc.headers.get(hdrs.ALLOW, '')})"
    text = exc.text or ""
    return text if text and text != f"{exc.status}: {exc.reason}" else exc.reason


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure becomes the §7 error object."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers[hdrs.ALLOW]} if hdrs.ALLOW in exc.headers else None
        return error_response(exc.status, _http_error_detail(request, exc), headers)
    except Exception as exc:
        for kind, status in ERROR_STATUS:
            if isinstance(exc, kind):
                return error_response(status, str(exc) or type(exc).__name__)
        log.exception("unexpected error method=%s path=%s", request.method, request.path)
        # The client gets no internals (class names, paths in the text): the log has them.
        return error_response(500, "internal error handling this request: the daemon's log has the traceback")


@web.middleware
async def _auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """``Authorization: Bearer TOKEN`` on every route but /v1/health (RFC 6750 answers)."""
    if request.match_info.handler in _PUBLIC:
        return await handler(request)
    header = request.headers.get(hdrs.AUTHORIZATION)
    if header is None:
        return _unauthorized("missing bearer token: send Authorization: Bearer TOKEN", None)
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return _unauthorized(f"expected Authorization: Bearer TOKEN, got a {scheme[:20]!r} header", "invalid_request")
    # Constant time: the comparison must not tell how much of a guess was right.
    if not hmac.compare_digest(credentials.encode("utf-8", "surrogateescape"), request.app[API_TOKEN]):
        log.warning("rejected API request with a wrong token method=%s path=%s peer=%s",
                    request.method, request.path, request.remote)
        return _unauthorized("wrong bearer token", "invalid_token")
    return await handler(request)


#: Methods whose routes take no body (the document declares no requestBody for any of them).
_BODYLESS_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_DELETE})


@web.middleware
async def _no_body(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse (400) a body on a GET or DELETE route: nothing reads it, so a client that sends one
    has a mistake the daemon must not silently ignore (POST routes check theirs in read_body)."""
    if request.method in _BODYLESS_METHODS and request.match_info.http_exception is None:
        raw = await request.read()  # aiohttp raises 413 past client_max_size
        if raw.strip():
            raise ConfigError(f"body: {request.method} {request.path} takes no body, got {len(raw)} bytes")
    return await handler(request)


def _unauthorized(detail: str, error: str | None) -> web.Response:
    challenge = f'Bearer realm="{REALM}"' + (f', error="{error}"' if error else "")
    return error_response(401, detail, {hdrs.WWW_AUTHENTICATE: challenge})


# ---------------------------------------------------------------------- routes


def _daemon(request: web.Request) -> Daemon:
    return request.app[DAEMON]


@routes.get("/v1/health", allow_head=False)
@_public
async def health(request: web.Request) -> web.Response:
    return _json({"status": "ok", "version": __version__})


@routes.get("/v1/guests", allow_head=False)
async def list_guests(request: web.Request) -> web.Response:
    return _json({"guests": [g.to_json() for g in _daemon(request).host.guests.values()]})


@routes.post("/v1/guests")
async def create_guest(request: web.Request) -> web.Response:
    body = await read_body(request, "CreateGuest", required=True)
    # The schema's if/then already refused uefi_live_migration (not null) without efi: true.
    efi = body.get("efi", False)
    definition = GuestDefinition(
        body["name"], body["memory_mib"], body.get("policy", 0), efi,
        # An EFI guest sees SevLiveMigrationEnabled = true unless told otherwise (null: absent).
        body.get("uefi_live_migration", True) if efi else None,
    )
    guest = _daemon(request).create_guest(definition)
    return _json(guest.to_json(), 201, location=f"/v1/guests/{guest.name}")


def _file_path(body: dict[str, Any], key: str) -> str | None:
    """``body[key]``, a path the schema has checked (absolute, no NUL), as the OS will take it.

    JSON may carry a lone surrogate (``"\\ud800"``) that no file name encodes: the os calls would
    raise UnicodeEncodeError (a 500), so it is bad input here.
    """
    path = body.get(key)
    if path is None:
        return None
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise ConfigError(f"{key}: not a file name this host can encode (a lone UTF-16 surrogate?)") from None
    return str(path)


@routes.post("/v1/guests/restore")  # a literal path beside /v1/guests/{name} (which has no POST)
async def restore_guest(request: web.Request) -> web.Response:
    body = await read_body(request, "RestoreRequest", required=True)
    path = _file_path(body, "path")
    assert path is not None  # required by the schema
    progress = _daemon(request).restore_guest(path, name=body.get("name"))
    return _json(progress.to_json(), 202, location=f"/v1/migrations/{progress.id}")


@routes.get("/v1/guests/{name}", allow_head=False)
async def show_guest(request: web.Request) -> web.Response:
    return _json(_daemon(request).guest(request.match_info["name"]).to_json())


@routes.delete("/v1/guests/{name}")
async def delete_guest(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    # Fold the guest's hypercall counts into the running totals before it goes.
    request.app[METRICS].observe(daemon.host.guests.values(), daemon.host.migrations.values())
    await daemon.delete_guest(request.match_info["name"])
    return web.Response(status=204)


@routes.post("/v1/guests/{name}/start")
async def start_guest(request: web.Request) -> web.Response:
    body = await read_body(request, "StartGuest")
    workload = body.get("workload")
    config = None if workload is None else WorkloadConfig.from_dict(workload)
    return _json((await _daemon(request).start_guest(request.match_info["name"], config)).to_json())


@routes.post("/v1/guests/{name}/stop")
async def stop_guest(request: web.Request) -> web.Response:
    await read_body(request, "Empty")
    return _json((await _daemon(request).stop_guest(request.match_info["name"])).to_json())


@routes.post("/v1/guests/{name}/reboot")
async def reboot_guest(request: web.Request) -> web.Response:
    await read_body(request, "Empty")
    return _json((await _daemon(request).reboot_guest(request.match_info["name"])).to_json())


@routes.post("/v1/guests/{name}/kexec")
async def kexec_guest(request: web.Request) -> web.Response:
    await read_body(request, "Empty")
    return _json((await _daemon(request).kexec_guest(request.match_info["name"])).to_json())


@routes.post("/v1/guests/{name}/migrate")
async def migrate_guest(request: web.Request) -> web.Response:
    body = await read_body(request, "MigrateRequest", required=True)
    progress = _daemon(request).migrate(
        request.match_info["name"], body["destination"],
        downtime_limit_ms=body.get("downtime_limit_ms"), max_bandwidth_mib_s=body.get("max_bandwidth_mib_s"),
        connections=body.get("connections"),
    )
    return _json(progress.to_json(), 202, location=f"/v1/migrations/{progress.id}")


@routes.post("/v1/guests/{name}/save")
async def save_guest(request: web.Request) -> web.Response:
    body = await read_body(request, "SaveRequest", required=True)
    path = _file_path(body, "path")
    assert path is not None  # required by the schema
    progress = _daemon(request).save_guest(
        request.match_info["name"], path, for_host_pdh=_file_path(body, "for_host_pdh"),
        live=body.get("live", False),
    )
    return _json(progress.to_json(), 202, location=f"/v1/migrations/{progress.id}")


@routes.get("/v1/migrations", allow_head=False)
async def list_migrations(request: web.Request) -> web.Response:
    return _json({"migrations": [m.to_json() for m in _daemon(request).migrations()]})


@routes.get("/v1/migrations/{id}", allow_head=False)
async def show_migration(request: web.Request) -> web.Response:
    return _json(_daemon(request).migration(request.match_info["id"]).to_json())


@routes.post("/v1/migrations/{id}/cancel")
async def cancel_migration(request: web.Request) -> web.Response:
    await read_body(request, "Empty")
    return _json(_daemon(request).cancel_migration(request.match_info["id"]).to_json(), 202)


@routes.get("/metrics", allow_head=False)
async def metrics(request: web.Request) -> web.Response:
    daemon = _daemon(request)
    host = daemon.host
    text = request.app[METRICS].render(host.guests.values(), host.migrations.values(), daemon.listener.refused)
    return web.Response(body=text.encode(), headers={hdrs.CONTENT_TYPE: METRICS_CONTENT_TYPE})


@routes.get("/v1/openapi.json", allow_head=False)
async def openapi_document(request: web.Request) -> web.Response:
    return web.Response(text=_OPENAPI_JSON, content_type="application/json")


def build_app(daemon: Daemon, token: str) -> web.Application:
    """The aiohttp application serving ``daemon`` behind bearer token ``token``."""
    if not token:
        raise ConfigError("the API token must not be empty")
    app = web.Application(middlewares=[_errors, _auth, _no_body], client_max_size=MAX_BODY_BYTES)
    app[DAEMON] = daemon
    app[API_TOKEN] = token.encode("utf-8", "surrogateescape")
    app[METRICS] = MetricsCollector()
    app[METRICS].track(daemon.host)  # before the daemon starts (migd serve): no migration goes uncounted
    app.add_routes(routes)
    return app


__all__ = ["API_TOKEN", "DAEMON", "ERROR_STATUS", "MAX_BODY_BYTES", "METRICS", "build_app", "decode_json",
           "error_response", "read_body"]
