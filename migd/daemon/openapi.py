"""The REST API as an OpenAPI 3.1 document (docs/design.md §9), and a checker for its schemas.

The document is plain data, served at ``/v1/openapi.json``. :mod:`migd.daemon.api` validates every
request body with :func:`check` against the schemas here, so what the document promises is
what the daemon accepts; the tests validate every response they see against it and compare
its paths with the app's router, so it cannot drift from the routes either.

:func:`check` implements the small JSON Schema (2020-12) subset the document uses and
refuses any other keyword, so a schema can never silently mean less than it says.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from migd import __version__, wire
from migd.errors import ConfigError
from migd.guest.host_guest import GUEST_NAME, MAX_MEMORY_MIB, GuestState
from migd.migration_state import MigrationStatus
from migd.guest.page_content import MAX_SEED
from migd.platform import psp
from migd.abi import POLICY_API_MAJOR_SHIFT, POLICY_API_MINOR_SHIFT
from migd.page_runs import PageKind

Schema = dict[str, Any]

#: Most a JSON number may be for a downtime limit (the config file's bound, migd/daemon/config.py).
MAX_DOWNTIME_LIMIT_MS = 3_600_000

#: Bound of the rates a body may ask for (MiB/s, Hz): far beyond any real use, small enough
#: that the float arithmetic downstream cannot overflow.
MAX_RATE = 1 << 20
MAX_GUEST_TIMER_S = 86400.0  # guest-initiated reboot/kexec timers and boot time: at most a day

# The migrate body's ``destination``: HOST:PORT where HOST is a DNS name or IPv4 address, or an
# IPv6 address in brackets (RFC 3986 §3.2.2 ``IP-literal``, its ``IPv6address`` ABNF spelled out),
# and PORT is 1..65535 without leading zeros. Every string it matches is one that
# migd/daemon/config.py ``parse_address`` accepts with a non-zero port (tests/test_api.py checks
# both directions), so the document promises no more and no less than the daemon takes.
_H16 = r"[0-9A-Fa-f]{1,4}"
_DEC_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_IPV4 = rf"{_DEC_OCTET}(?:\.{_DEC_OCTET}){{3}}"
_LS32 = rf"(?:{_H16}:{_H16}|{_IPV4})"
_IPV6 = "(?:" + "|".join([
    rf"(?:{_H16}:){{6}}{_LS32}",
    rf"::(?:{_H16}:){{5}}{_LS32}",
    rf"(?:{_H16})?::(?:{_H16}:){{4}}{_LS32}",
    rf"(?:(?:{_H16}:){{0,1}}{_H16})?::(?:{_H16}:){{3}}{_LS32}",
    rf"(?:(?:{_H16}:){{0,2}}{_H16})?::(?:{_H16}:){{2}}{_LS32}",
    rf"(?:(?:{_H16}:){{0,3}}{_H16})?::{_H16}:{_LS32}",
    rf"(?:(?:{_H16}:){{0,4}}{_H16})?::{_LS32}",
    rf"(?:(?:{_H16}:){{0,5}}{_H16})?::{_H16}",
    rf"(?:(?:{_H16}:){{0,6}}{_H16})?::",
]) + ")"
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PORT = r"(?:[1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
DESTINATION_PATTERN = rf"^(?:{_DNS_LABEL}(?:\.{_DNS_LABEL})*|\[{_IPV6}\]):{_PORT}$"

#: A file on the daemon's host (save and restore bodies): absolute (the daemon has no working
#: directory a client could mean), at most PATH_MAX (4096, Linux limits.h) characters, and no NUL,
#: which no file name can hold (the os calls would raise, not refuse).
FILE_PATH_PATTERN = r"^/[^\u0000]*$"
MAX_FILE_PATH = 4096

#: The ``error`` codes of the error object, by HTTP status.
ERROR_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    500: "internal_error",
}


def ref(name: str) -> Schema:
    """A reference to ``#/components/schemas/NAME``."""
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Schema], required: Iterable[str] | None = None, **extra: Any) -> Schema:
    """A closed object; every property required unless ``required`` says otherwise."""
    return {
        "type": "object",
        "properties": properties,
        "required": sorted(properties if required is None else required),
        "additionalProperties": False,
        **extra,
    }


_COUNT: Schema = {"type": "integer", "minimum": 0}
#: The policies LAUNCH_START takes: the firmware refuses one that asks for a newer API than its own
#: (migd/platform/psp.py ``_new_context``), so the document says so, one range of the low 16 bits
#: per API version (major, minor) <= the firmware's.
_LAUNCHABLE_POLICIES: list[Schema] = [
    {"minimum": base, "maximum": base | 0xFFFF}
    for major in range(psp.API_MAJOR + 1)
    for minor in range(0x100 if major < psp.API_MAJOR else psp.API_MINOR + 1)
    for base in [minor << POLICY_API_MINOR_SHIFT | major << POLICY_API_MAJOR_SHIFT]
]
_WORKLOAD_PROPERTIES: dict[str, Schema] = {
    "dirty_rate_mib_s": {"type": "number", "minimum": 0, "maximum": MAX_RATE, "description": "MiB/s the guest writes"},
    "convert_rate_hz": {"type": "number", "minimum": 0, "maximum": MAX_RATE,
                        "description": "private↔shared conversions per second"},
    "seed": {"type": "integer", "minimum": 0, "maximum": MAX_SEED, "description": "seed of every random choice"},
    "populate_fraction": {"type": "number", "minimum": 0, "maximum": 1,
                          "description": "share of the data area written once after the first boot (default 0)"},
    "shared_fraction": {"type": "number", "minimum": 0, "maximum": 1,
                        "description": "share of the populated pages made shared (default 0)"},
    "kexec_after_s": {"type": "number", "minimum": 0, "maximum": MAX_GUEST_TIMER_S,
                      "description": "the guest kexecs on its own once, this long after it boots (default 0: never)"},
    "reboot_after_s": {"type": "number", "minimum": 0, "maximum": MAX_GUEST_TIMER_S,
                       "description": "the guest reboots on its own once, this long after it boots (default 0: never)"},
    "boot_time_s": {"type": "number", "minimum": 0, "maximum": MAX_GUEST_TIMER_S,
                    "description": "how long a kexec or reboot keeps the guest down before it is READY (default 0)"},
}

#: The ``role`` of a migration object: the two ends of a live migration, and the file jobs.
MIGRATION_ROLES = ("source", "destination", "save", "restore")


def _file_path(description: str, *, nullable: bool = False) -> Schema:
    return {"type": ["string", "null"] if nullable else "string", "minLength": 1, "maxLength": MAX_FILE_PATH,
            "pattern": FILE_PATH_PATTERN, "description": description}


SCHEMAS: dict[str, Schema] = {
    "Error": _object({
        "error": {"type": "string", "enum": sorted(set(ERROR_CODES.values())), "description": "machine-readable"},
        "detail": {"type": "string", "description": "the reason, for humans"},
    }),
    "Health": _object({"status": {"type": "string", "enum": ["ok"]}, "version": {"type": "string"}}),
    "Guest": _object({
        "name": {"type": "string"},
        "state": {"type": "string", "enum": [s.value for s in GuestState]},
        "memory_mib": {"type": "integer", "minimum": 1},
        "policy": {"type": "integer", "minimum": 0, "maximum": 0xFFFFFFFF},
        "migration_control": _object({
            "feature": {"type": "boolean", "description": "CPUID KVM_FEATURE_MIGRATION_CONTROL offered"},
            "msr": {"type": "integer", "minimum": 0, "description": "MSR_KVM_MIGRATION_CONTROL"},
            "ready": {"type": "boolean", "description": "MSR has KVM_MIGRATION_READY: migration allowed"},
        }),
        "pages": _object({"total": _COUNT, "private": _COUNT, "shared": _COUNT}),
        "check": _object({
            "pages_verified": _COUNT,
            "errors": _COUNT,
            "last_error": {"type": ["string", "null"]},
        }),
        "agent": _object({
            "pid": {"type": ["integer", "null"], "minimum": 1, "description": "the running agent's pid; null: none"},
            "exit": {"type": ["string", "null"],
                     "description": "how the last agent ended when the host had not asked it to, e.g. "
                                    "'killed by SIGBUS' or 'exited with status 1'; null otherwise, cleared by "
                                    "the next start"},
        }, description="the guest agent process (the VM)"),
        "migrated": {
            **_object({
                "migration": {"type": "string", "description": "id of the committed outgoing migration"},
                "to": {"type": "string", "description": "the destination it went to (HOST:PORT)"},
            }),
            "type": ["object", "null"],
            "description": "state migrated: where the guest went (null otherwise); the record is kept for "
                           "guests.keep_migrated_s, and replaced when the guest comes back",
        },
    }),
    "GuestList": _object({"guests": {"type": "array", "items": ref("Guest")}}),
    "CreateGuest": _object(
        {
            "name": {"type": "string", "pattern": GUEST_NAME.pattern},
            "memory_mib": {"type": "integer", "minimum": 1, "maximum": MAX_MEMORY_MIB},
            "policy": {"type": "integer", "minimum": 0, "maximum": 0xFFFFFFFF, "anyOf": _LAUNCHABLE_POLICIES,
                       "description": (f"SEV guest policy whose minimum firmware API (bits 23:16 major, 31:24 "
                                       f"minor) is at most this firmware's {psp.API_MAJOR}.{psp.API_MINOR}")},
            "efi": {"type": "boolean", "description": "boot with UEFI (default false)"},
            "uefi_live_migration": {
                "type": ["boolean", "null"],
                "description": (
                    "value of the UEFI variable SevLiveMigrationEnabled the guest sees; null: the variable "
                    "is absent. Only with efi: true; default true. An EFI guest enables migration "
                    "(MSR READY) only when it is present and true."
                ),
            },
        },
        required=["name", "memory_mib"],
        # The variable exists only in UEFI: a value for it on a guest without efi: true is a mistake
        # the daemon refuses (400) rather than ignores.
        **{"if": {"properties": {"uefi_live_migration": {"type": "boolean"}}, "required": ["uefi_live_migration"]},
           "then": {"properties": {"efi": {"const": True}}, "required": ["efi"],
                    "description": "uefi_live_migration is only meaningful with efi: true"}},
    ),
    "Workload": _object(_WORKLOAD_PROPERTIES, required=[]),
    "StartGuest": _object(
        {"workload": _object(_WORKLOAD_PROPERTIES, required=[], type=["object", "null"],
                             description="what the guest runs; omitted or null: idle")},
        required=[],
    ),
    "Empty": _object({}, description="no body, or an empty object"),
    "MigrateRequest": _object(
        {
            "destination": {"type": "string", "minLength": 1, "maxLength": 300, "pattern": DESTINATION_PATTERN,
                            "description": "HOST:PORT of the destination daemon's migration listener: a DNS "
                                           "name or IPv4 address, or an IPv6 address in brackets; port 1..65535"},
            "downtime_limit_ms": {"type": ["number", "null"], "exclusiveMinimum": 0,
                                  "maximum": MAX_DOWNTIME_LIMIT_MS, "description": "default from the config"},
            "max_bandwidth_mib_s": {"type": ["number", "null"], "minimum": 0, "maximum": MAX_RATE,
                                    "description": "0 = unlimited; default from the config"},
            "connections": {"type": ["integer", "null"], "minimum": 1, "maximum": wire.MAX_CONNECTIONS,
                            "description": "TCP connections (1: a single connection; more: the first for control, "
                                           "the pages striped over the others); "
                                           "default from the config (migration.connections)"},
        },
        required=["destination"],
    ),
    "SaveRequest": _object(
        {
            "path": _file_path("the file to write on the daemon's host: absolute, in an existing directory; "
                               "a save never replaces a file"),
            "for_host_pdh": _file_path(
                "the PDH certificate (pdh.pem in its state directory) of the host that may restore the file; it "
                "must chain to sev.trusted_roots. Omitted or null: this host's own", nullable=True),
            "live": {"type": "boolean", "description": "pre-copy while the guest runs, then pause it for the last "
                                                       "pages (shorter pause); default false: pause, then write"},
        },
        required=["path"],
    ),
    "RestoreRequest": _object(
        {
            "path": _file_path("the save file on the daemon's host: absolute; it must have been saved for this "
                               "host and not restored here before"),
            "name": {"type": ["string", "null"], "pattern": GUEST_NAME.pattern,
                     "description": "the restored guest's name; omitted or null: the name it was saved under"},
        },
        required=["path"],
    ),
    "Migration": _object({
        "id": {"type": "string"},
        "guest": {"type": "string"},
        "role": {"type": "string", "enum": list(MIGRATION_ROLES),
                 "description": "source and destination of a live migration; save and restore of a guest to "
                                "and from a file"},
        "status": {"type": "string", "enum": [s.value for s in MigrationStatus]},
        "destination": {"type": "string",
                        "description": "where the guest goes (HOST:PORT); on the destination, its own address "
                                       "as the source reached it; save and restore: the file's path"},
        "source": {"type": ["string", "null"],
                   "description": "destination role: the source's migration listener (HOST:PORT), or its "
                                  "address if it did not say; null on the source"},
        "rounds": _COUNT,
        "bytes": _object({"transferred": _COUNT, "remaining": _COUNT, "total": _COUNT}),
        "pages": _object({k.value: _COUNT for k in PageKind}),
        "throughput_mib_s": {"type": "number", "minimum": 0},
        "expected_downtime_ms": {"type": ["number", "null"], "minimum": 0},
        "downtime_ms": {"type": ["number", "null"], "minimum": 0},
        "total_time_ms": {"type": "number", "minimum": 0},
        "error": {"type": ["string", "null"]},
    }),
    "MigrationList": _object({"migrations": {"type": "array", "items": ref("Migration")}}),
}
# Additions to the contract's guest and migration objects: always sent, but not required, so that
# a client checking answers against this document still accepts them from a daemon that predates them.
for _name, _added in (("Guest", {"agent", "migrated"}), ("Migration", {"source"})):
    SCHEMAS[_name]["required"] = [key for key in SCHEMAS[_name]["required"] if key not in _added]

_JSON = "application/json"
#: The Prometheus text exposition format served by ``GET /metrics`` (migd/daemon/metrics.py).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _json_response(description: str, schema: Schema) -> Schema:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _error(description: str) -> Schema:
    return _json_response(description, ref("Error"))


def _operation(
    operation_id: str, summary: str, responses: dict[str, Schema], *, body: str | None = None,
    body_required: bool = False, name: str | None = None, public: bool = False,
) -> Schema:
    """One operation with the error answers every route shares (§7: 400/401/404/409)."""
    op: Schema = {"operationId": operation_id, "summary": summary, "responses": dict(responses)}
    if name is not None:
        op["parameters"] = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}]
        op["responses"]["404"] = _error(f"no {'guest' if name == 'name' else 'migration'} of that {name}")
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": {_JSON: {"schema": ref(body)}}}
        op["responses"]["400"] = _error("the body is not valid JSON or does not match the schema (detail: why)")
        op["responses"]["413"] = _error("the body is larger than the daemon accepts")
    if public:
        op["security"] = []
    else:
        op["responses"]["401"] = _error("missing or wrong bearer token")
    op["responses"]["default"] = _error("any other error (500: see the daemon's log)")
    return op


_GUEST = _json_response("the guest", ref("Guest"))
_MIGRATION = _json_response("the migration", ref("Migration"))
_CONFLICT = _error("the guest or migration is not in a state that allows this (detail: why)")


def _guest_action(action: str, summary: str, body: str = "Empty") -> Schema:
    return {"post": _operation(f"{action}Guest", summary, {"200": _GUEST, "409": _CONFLICT}, body=body, name="name")}


PATHS: dict[str, Schema] = {
    "/v1/health": {"get": _operation(
        "health", "liveness; no token needed", {"200": _json_response("the daemon runs", ref("Health"))}, public=True,
    )},
    "/v1/guests": {
        "get": _operation("listGuests", "every guest on this host",
                          {"200": _json_response("the guests", ref("GuestList"))}),
        "post": _operation(
            "createGuest", "define a guest (RAM file and firmware launch)",
            {"201": _GUEST, "409": _error("a guest of that name exists")}, body="CreateGuest", body_required=True,
        ),
    },
    # Before /v1/guests/{name}: a client matching paths in document order must meet the literal first.
    "/v1/guests/restore": {"post": _operation(
        "restoreGuest", "start restoring a saved guest from a file; poll /v1/migrations/{id}",
        {"202": _MIGRATION, "409": _error(
            "the file cannot be restored here: not a readable save file, altered or incomplete, saved for "
            "another host, already restored on this host, or a guest of its name exists (detail: why)")},
        body="RestoreRequest", body_required=True,
    )},
    "/v1/guests/{name}": {
        "get": _operation("showGuest", "one guest", {"200": _GUEST}, name="name"),
        "delete": _operation(
            "deleteGuest", "remove a guest that is not running (RAM file and key)",
            {"204": {"description": "deleted"}, "409": _CONFLICT}, name="name",
        ),
    },
    "/v1/guests/{name}/start": _guest_action("start", "launch the guest agent and wait for its boot", "StartGuest"),
    "/v1/guests/{name}/stop": _guest_action("stop", "shut the guest down"),
    "/v1/guests/{name}/reboot": _guest_action("reboot", "vCPU reset and reboot (the MSR drops to 0)"),
    "/v1/guests/{name}/kexec": _guest_action("kexec", "the guest kexecs into a new kernel (the MSR drops to 0)"),
    "/v1/guests/{name}/migrate": {"post": _operation(
        "migrateGuest", "start a live migration; poll /v1/migrations/{id}",
        {"202": _MIGRATION, "409": _error("the guest cannot migrate now, e.g. its MSR is not READY (detail: why)")},
        body="MigrateRequest", body_required=True, name="name",
    )},
    "/v1/guests/{name}/save": {"post": _operation(
        "saveGuest", "start saving a running guest to a file that only the target host can restore; poll "
                     "/v1/migrations/{id}; once completed the guest is saved (it no longer runs here)",
        {"202": _MIGRATION, "409": _error(
            "the guest cannot be saved now (not running, NOSEND policy, MSR not READY, busy) or the file is "
            "refused (its directory is missing, it exists, the PDH certificate is unreadable or untrusted) "
            "(detail: why)")},
        body="SaveRequest", body_required=True, name="name",
    )},
    "/v1/migrations": {"get": _operation(
        "listMigrations", "every migration this host knows, oldest first",
        {"200": _json_response("the migrations", ref("MigrationList"))},
    )},
    "/v1/migrations/{id}": {"get": _operation("showMigration", "one migration", {"200": _MIGRATION}, name="id")},
    "/v1/migrations/{id}/cancel": {"post": _operation(
        "cancelMigration", "cancel an outgoing migration before its hand-off commits; the guest resumes here",
        {"202": _MIGRATION, "409": _error("committed, finished, or incoming here")}, body="Empty", name="id",
    )},
    "/metrics": {"get": _operation("metrics", "Prometheus text format", {"200": {
        "description": "the metrics (migd/daemon/metrics.py)",
        "content": {METRICS_CONTENT_TYPE: {"schema": {"type": "string"}}},
    }})},
    "/v1/openapi.json": {"get": _operation(
        "openapi", "this document", {"200": _json_response("the OpenAPI 3.1 document", {"type": "object"})},
    )},
}
# GET and DELETE take no body; the daemon refuses one (migd/daemon/api.py _no_body).
for _item in PATHS.values():
    for _method in ("get", "delete"):
        if _method in _item:
            _item[_method]["responses"]["400"] = _error("a body was sent; this operation takes none")

DOCUMENT: Schema = {
    "openapi": "3.1.0",
    "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
    "info": {
        "title": "migd",
        "version": __version__,
        "description": (
            "Live migration of AMD SEV guests (docs/design.md §9). "
            "Errors are {\"error\": code, \"detail\": reason}."
        ),
    },
    "security": [{"bearer": []}],
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "api.token_file"}},
    },
}


def schema(name: str) -> Schema:
    """The component schema called ``name``."""
    return SCHEMAS[name]


# ---------------------------------------------------------------------- checking

_ANNOTATIONS = frozenset({"description", "title", "default", "examples", "format"})
#: The JSON Schema keywords :func:`check` implements (plus annotations it ignores).
SUPPORTED_KEYWORDS = frozenset({
    "$ref", "type", "enum", "properties", "required", "additionalProperties", "items",
    "minimum", "maximum", "exclusiveMinimum", "minLength", "maxLength", "pattern", "const", "if", "then", "anyOf",
}) | _ANNOTATIONS


def json_type(value: Any) -> str:
    """The JSON type name of a decoded value (``bool`` is ``boolean``, never ``integer``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _type_matches(value: Any, wanted: str) -> bool:
    actual = json_type(value)
    if wanted == "number":
        return actual in ("integer", "number") and (actual == "integer" or math.isfinite(value))
    # An "integer" is an int here. JSON Schema also counts 875.0 as one (2020-12 validation
    # §6.1.1); request bodies get that from decode_json in migd/daemon/api.py, which decodes every
    # number whose exact decimal value is integral as an int, so a float that reaches this test is
    # not integral (1.0000000000000000000001 is a float 1.0 in Python, and still no integer).
    return actual == wanted


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _ecma_pattern(pattern: str) -> str:
    """Read a final ``$`` as ECMA 262 does (end of string), not as Python (also before a final newline)."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        return pattern[:-1] + r"\Z"
    return pattern


def check(value: Any, schema: Mapping[str, Any], where: str = "", *,
          schemas: Mapping[str, Schema] = SCHEMAS) -> None:
    """Raise ConfigError naming the field unless ``value`` matches ``schema``.

    ``where`` is the field path so far ("" for the whole body); ``$ref`` resolves in ``schemas``.
    """
    unknown = set(schema) - SUPPORTED_KEYWORDS
    if unknown:
        raise ValueError(f"schema uses keywords this checker does not implement: {sorted(unknown)}")
    label = where or "body"
    if "$ref" in schema:
        target = schema["$ref"].removeprefix("#/components/schemas/")
        check(value, schemas[target], where, schemas=schemas)
        return
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_type_matches(value, t) for t in types):
            raise ConfigError(f"{label}: expected {' or '.join(types)}, got {json_type(value)} {_show(value)}")
    if "enum" in schema and value not in schema["enum"]:
        raise ConfigError(f"{label}: expected one of {schema['enum']}, got {_show(value)}")
    if "const" in schema and not _same_json(value, schema["const"]):
        raise ConfigError(f"{label}: expected {json.dumps(schema['const'])}, got {_show(value)}")
    if "if" in schema and "then" in schema and _matches(value, schema["if"], where, schemas):
        try:
            check(value, schema["then"], where, schemas=schemas)
        except ConfigError as exc:
            why = schema["then"].get("description")
            raise ConfigError(f"{label}: {why} ({exc})" if why else str(exc)) from None
    kind = json_type(value)
    if kind == "object":
        _check_object(value, schema, where, schemas)
    elif kind == "array" and "items" in schema:
        for index, item in enumerate(value):
            check(item, schema["items"], f"{label}[{index}]", schemas=schemas)
    elif kind in ("integer", "number"):
        if "minimum" in schema and value < schema["minimum"]:
            raise ConfigError(f"{label}: must be >= {schema['minimum']}, got {_show(value)}")
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            raise ConfigError(f"{label}: must be > {schema['exclusiveMinimum']}, got {_show(value)}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ConfigError(f"{label}: must be <= {schema['maximum']}, got {_show(value)}")
    elif kind == "string":
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise ConfigError(f"{label}: must be at least {schema['minLength']} characters, got {_show(value)}")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise ConfigError(f"{label}: must be at most {schema['maxLength']} characters, got {len(value)}")
        if "pattern" in schema and not re.search(_ecma_pattern(schema["pattern"]), value):
            # A long pattern (the destination's is 1.6 kB) helps nobody in an error line: say
            # what it means instead; the document has it verbatim.
            shown = schema["pattern"]
            if len(shown) > 100:
                shown = f"the pattern ({schema.get('description', 'see the OpenAPI document')})"
            raise ConfigError(f"{label}: must match {shown}, got {_show(value)}")
    # Last: the plain keywords above give the more precise reason when they fail too.
    if "anyOf" in schema and not any(_matches(value, sub, where, schemas) for sub in schema["anyOf"]):
        why = schema.get("description", f"one of {len(schema['anyOf'])} alternatives")
        raise ConfigError(f"{label}: must be {why}, got {_show(value)}")


def _same_json(value: Any, const: Any) -> bool:
    """JSON equality: ``true`` is not ``1`` (Python's ``True == 1`` is)."""
    return json_type(value) == json_type(const) and value == const


def _matches(value: Any, schema: Mapping[str, Any], where: str, schemas: Mapping[str, Schema]) -> bool:
    try:
        check(value, schema, where, schemas=schemas)
    except ConfigError:
        return False
    return True


def _check_object(value: dict[str, Any], schema: Mapping[str, Any], where: str,
                  schemas: Mapping[str, Schema]) -> None:
    properties: Mapping[str, Schema] = schema.get("properties", {})
    prefix = f"{where}." if where else ""
    for key in schema.get("required", ()):
        if key not in value:
            raise ConfigError(f"{where or 'body'}: missing required key {key!r}")
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            check(item, properties[key], f"{prefix}{key}", schemas=schemas)
        elif extra is False:
            allowed = ", ".join(sorted(properties)) or "none"
            raise ConfigError(f"{where or 'body'}: unknown key {key!r} (allowed: {allowed})")
        elif isinstance(extra, dict):
            check(item, extra, f"{prefix}{key}", schemas=schemas)


__all__ = [
    "DOCUMENT", "ERROR_CODES", "FILE_PATH_PATTERN", "MAX_FILE_PATH", "METRICS_CONTENT_TYPE", "MIGRATION_ROLES",
    "PATHS", "SCHEMAS", "SUPPORTED_KEYWORDS", "Schema", "check",
    "json_type", "ref", "schema",
]
