"""The daemon's TOML configuration (docs/design.md §9 "External contract"), validated before anything listens.

Unknown keys are errors; addresses, numbers and files are checked; every message names the
key, what was expected and what came. ``config/migd.toml`` is the documented example.
"""

from __future__ import annotations

import ipaddress
import math
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migd import wire
from migd.errors import ConfigError
from migd.sev_transport import TransportMode

DEFAULT_CONFIG = Path("/etc/migd/migd.toml")
#: Defaults of the ``[migration]`` bounds on unauthenticated and stalled peers.
DEFAULT_MAX_PENDING_CONNECTIONS = 64
DEFAULT_HANDSHAKE_TIMEOUT_S = 15.0
DEFAULT_STALL_TIMEOUT_S = 30.0
#: Default of ``migration.connections``: one TCP connection per outgoing migration.
DEFAULT_CONNECTIONS = 1
#: Defaults of ``[guests]``: how long and how many ``migrated`` records are kept (docs/operations.md).
DEFAULT_KEEP_MIGRATED_S = 86_400.0
DEFAULT_KEEP_MIGRATED_COUNT = 100


@dataclass(frozen=True)
class Address:
    """A TCP ``host:port`` or a unix socket path (``unix:/path``)."""

    host: str = ""
    port: int = 0
    unix_path: Path | None = None

    def __str__(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_address(text: str, key: str, *, allow_unix: bool = False) -> Address:
    """``HOST:PORT`` (IPv6 as ``[addr]:port``), or ``unix:/path`` when allowed."""
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{key}: expected an address string, got {text!r}")
    if text.startswith("unix:"):
        if not allow_unix:
            raise ConfigError(f"{key}: a unix socket is not allowed here, got {text!r}")
        path = Path(text[5:])
        if not path.is_absolute():
            raise ConfigError(f"{key}: unix socket path must be absolute, got {text!r}")
        if len(os.fsencode(path)) > 100:
            raise ConfigError(f"{key}: unix socket path is longer than 100 bytes: {text!r}")
        return Address(unix_path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{key}: port must be a number, got {port_text!r} in {text!r}") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{key}: port must be in 0..65535, got {port}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not all(part and len(part) <= 63 and part.replace("-", "").isalnum() for part in host.split(".")):
            raise ConfigError(f"{key}: {host!r} is neither an IP address nor a host name") from None
    return Address(host=host, port=port)


@dataclass(frozen=True)
class TlsConfig:
    ca: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class Config:
    """The whole configuration."""

    state_dir: Path
    api_listen: Address
    token_file: Path
    migration_listen: Address
    downtime_limit_ms: int = 300
    max_bandwidth_mib_s: float = 0.0
    #: Incoming connections not yet authenticated, at most; more are closed at once.
    max_pending_connections: int = DEFAULT_MAX_PENDING_CONNECTIONS
    #: From accepting a connection to an authenticated session (TLS and the SESSION handshake).
    handshake_timeout_s: float = DEFAULT_HANDSHAKE_TIMEOUT_S
    #: A peer that sends nothing, or takes nothing of what is sent, this long ends the migration.
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S
    #: TCP connections of an outgoing migration (1..wire.MAX_CONNECTIONS; more than one: control on
    #: the first, pages striped over the others).
    connections: int = DEFAULT_CONNECTIONS
    tls: TlsConfig | None = None
    trusted_roots: tuple[Path, ...] = ()
    transport: TransportMode = TransportMode.BOUND
    #: Where guest RAM files live (``guests.ram_dir``); None: ``$RUNTIME_DIRECTORY/guests``, else
    #: ``state_dir/guests`` (migd.daemon.core.guests_dir_for).
    ram_dir: Path | None = None
    #: A ``migrated`` record (the guest left this host) is dropped after this long ...
    keep_migrated_s: float = DEFAULT_KEEP_MIGRATED_S
    #: ... or when more than this many are kept, oldest first.
    keep_migrated_count: int = DEFAULT_KEEP_MIGRATED_COUNT
    source: Path | None = field(default=None, compare=False)

    def token(self) -> str:
        """The API bearer token (read at start; whitespace stripped)."""
        return read_token(self.token_file)


#: Mode bits a token file must not have: readable by every user, or writable by anyone but its
#: owner. Group-readable is allowed (root:migd 0640, systemd/migd.sysusers.conf).
TOKEN_FORBIDDEN_MODE = 0o026
#: A token file holds one line; more is a wrong path (a log, /dev/zero), not read into memory.
MAX_TOKEN_FILE = 4096


def read_token(path: Path) -> str:
    """Read a bearer token file: one non-empty line, at least 16 characters, not open to other users.

    Like sshd with a private key readable by others, a token that every local user can read
    (or replace) is refused, not warned about: it is the key to the whole API.
    """
    try:
        # O_NONBLOCK: a FIFO at that path must not block the open; it is refused below.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as file:
            mode = os.fstat(file.fileno()).st_mode  # of the file read, not of a path swapped meanwhile
            if not stat.S_ISREG(mode):
                raise ConfigError(f"api.token_file: {path} is not a regular file")
            raw = file.read(MAX_TOKEN_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"api.token_file: cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_TOKEN_FILE:
        raise ConfigError(f"api.token_file: {path} is larger than {MAX_TOKEN_FILE} bytes; it holds one token")
    if mode & TOKEN_FORBIDDEN_MODE:
        who = ("readable by every user, so anyone on this host could use the API" if mode & 0o004
               else "writable by other users, so they could replace the token")
        raise ConfigError(f"api.token_file: {path} is {who} (mode {mode & 0o777:04o}); "
                          f"run `chmod 600 {path}` (or 640 with the daemon's group)")
    try:
        token = raw.decode().strip()
    except UnicodeDecodeError:
        raise ConfigError(f"api.token_file: {path} is not text") from None
    if len(token) < 16 or any(c.isspace() for c in token):
        raise ConfigError(f"api.token_file: {path} must hold one token of at least 16 characters, no spaces")
    return token


_SCHEMA: dict[str, Any] = {
    "state_dir": str,
    "api": {"listen": str, "token_file": str},
    "migration": {
        "listen": str, "downtime_limit_ms": int, "max_bandwidth_mib_s": (int, float),
        "max_pending_connections": int, "handshake_timeout_s": (int, float), "stall_timeout_s": (int, float),
        "connections": int,
    },
    "tls": {"ca": str, "cert": str, "key": str},
    "sev": {"trusted_roots": list, "transport": str},
    "guests": {"ram_dir": str, "keep_migrated_s": (int, float), "keep_migrated_count": int},
}
#: The range a key takes, said in its type error too: "expected int in 1..16, got bool True" tells
#: the fix where "expected int" alone would leave the reader to guess the bounds.
_RANGES: dict[str, str] = {"migration.connections": f"1..{wire.MAX_CONNECTIONS}"}
_REQUIRED = {"state_dir": None, "api": ("listen", "token_file"), "migration": ("listen",), "sev": ("trusted_roots",)}


def _check_keys(table: dict[str, Any], schema: dict[str, Any], prefix: str) -> None:
    for key, value in table.items():
        name = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"unknown key {name!r} (allowed: {', '.join(sorted(schema))})")
        kind = schema[key]
        if isinstance(kind, dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a table, got {type(value).__name__}")
            _check_keys(value, kind, f"{name}.")
        elif isinstance(value, bool) or not isinstance(value, kind):
            expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            if name in _RANGES:
                expected = f"{expected} in {_RANGES[name]}"
            raise ConfigError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")


def _timeout(migration: dict[str, Any], key: str, default: float) -> float:
    """``migration.<key>``: a finite duration > 0 in seconds (TOML allows inf and nan; neither is a deadline)."""
    value = float(migration.get(key, default))
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"migration.{key} must be a finite number of seconds > 0, got {migration.get(key)!r}")
    return value


def _readable(path_text: str, key: str, base: Path) -> Path:
    path = Path(path_text)
    if not path.is_absolute():
        path = base / path
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(f"{key}: {path} is not a readable file")
    return path


def load_config(path: str | os.PathLike[str]) -> Config:
    """Parse and validate a config file; relative paths are relative to the file's directory."""
    source = Path(path)
    try:
        raw = tomllib.loads(source.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {source}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {source} is not valid TOML: {exc}") from None
    return parse_config(raw, base=source.resolve().parent, source=source)


def parse_config(raw: dict[str, Any], *, base: Path, source: Path | None = None) -> Config:
    """Validate an already-parsed TOML document."""
    _check_keys(raw, _SCHEMA, "")
    for table, keys in _REQUIRED.items():
        if table not in raw:
            raise ConfigError(f"missing required key {table!r}")
        for key in keys or ():
            if key not in raw[table]:
                raise ConfigError(f"missing required key '{table}.{key}'")
    api, migration, sev = raw["api"], raw["migration"], raw["sev"]
    state_dir = Path(raw["state_dir"])
    if not state_dir.is_absolute():
        state_dir = base / state_dir
    downtime = migration.get("downtime_limit_ms", 300)
    if not 1 <= downtime <= 3_600_000:
        raise ConfigError(f"migration.downtime_limit_ms must be in 1..3600000, got {downtime}")
    bandwidth = float(migration.get("max_bandwidth_mib_s", 0))
    if bandwidth < 0:
        raise ConfigError(f"migration.max_bandwidth_mib_s must be >= 0 (0 = unlimited), got {bandwidth}")
    max_pending = migration.get("max_pending_connections", DEFAULT_MAX_PENDING_CONNECTIONS)
    if max_pending < 1:
        raise ConfigError(f"migration.max_pending_connections must be >= 1, got {max_pending}")
    connections = migration.get("connections", DEFAULT_CONNECTIONS)
    if not 1 <= connections <= wire.MAX_CONNECTIONS:
        raise ConfigError(f"migration.connections must be in {_RANGES['migration.connections']}, got {connections}")
    handshake_timeout = _timeout(migration, "handshake_timeout_s", DEFAULT_HANDSHAKE_TIMEOUT_S)
    stall_timeout = _timeout(migration, "stall_timeout_s", DEFAULT_STALL_TIMEOUT_S)
    roots = sev["trusted_roots"]
    if not roots or not all(isinstance(r, str) for r in roots):
        raise ConfigError("sev.trusted_roots must be a non-empty list of PEM file paths")
    try:
        transport = TransportMode(sev.get("transport", TransportMode.BOUND.value))
    except ValueError:
        raise ConfigError(
            f"sev.transport must be one of {[m.value for m in TransportMode]}, got {sev.get('transport')!r}"
        ) from None
    tls = None
    if "tls" in raw:
        missing = {"ca", "cert", "key"} - set(raw["tls"])
        if missing:
            raise ConfigError(f"tls: missing {', '.join(sorted(missing))} (omit the whole table for plain TCP)")
        tls = TlsConfig(*(_readable(raw["tls"][k], f"tls.{k}", base) for k in ("ca", "cert", "key")))
    token_file = _readable(api["token_file"], "api.token_file", base)
    read_token(token_file)
    guests = raw.get("guests", {})
    ram_dir = None
    if "ram_dir" in guests:
        ram_dir = Path(guests["ram_dir"])
        if not ram_dir.is_absolute():
            ram_dir = base / ram_dir
    keep_s = float(guests.get("keep_migrated_s", DEFAULT_KEEP_MIGRATED_S))
    if not (math.isfinite(keep_s) and keep_s >= 0):
        raise ConfigError(f"guests.keep_migrated_s must be a finite number of seconds >= 0, got {keep_s}")
    keep_count = guests.get("keep_migrated_count", DEFAULT_KEEP_MIGRATED_COUNT)
    if keep_count < 0:
        raise ConfigError(f"guests.keep_migrated_count must be >= 0, got {keep_count}")
    return Config(
        state_dir=state_dir,
        api_listen=parse_address(api["listen"], "api.listen", allow_unix=True),
        token_file=token_file,
        migration_listen=parse_address(migration["listen"], "migration.listen"),
        downtime_limit_ms=downtime,
        max_bandwidth_mib_s=bandwidth,
        max_pending_connections=max_pending,
        handshake_timeout_s=handshake_timeout,
        stall_timeout_s=stall_timeout,
        connections=connections,
        tls=tls,
        trusted_roots=tuple(_readable(r, "sev.trusted_roots", base) for r in roots),
        transport=transport,
        ram_dir=ram_dir,
        keep_migrated_s=keep_s,
        keep_migrated_count=keep_count,
        source=source,
    )
