"""A small asynchronous client of the migd REST API (docs/design.md §9 "External contract").

    async with MigdClient("127.0.0.1:8470", token) as api:
        guest = await api.create_guest("g1", 512)
        migration = await api.migrate("g1", "10.0.0.2:4444")
        job = await api.save_guest("g1", "/var/lib/migd/saves/g1.save")

Every call returns the decoded JSON answer or raises :class:`ApiError` carrying the daemon's
status code and reason; a daemon that cannot be reached raises :class:`ApiUnreachable`.
:func:`resolve_settings` finds the API address and token the way the ``migd`` CLI does
(command-line options and ``--config`` first, then the environment, then the default config).
"""

from __future__ import annotations

import enum
import json
import os
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from migd import failure_text
from migd.daemon.config import DEFAULT_CONFIG, parse_address, read_token
from migd.errors import ConfigError, MigdError

#: Listening on a wildcard address means "reachable here on loopback" for a local client.
_WILDCARD_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}
#: Migration statuses after which nothing changes any more (docs/design.md §9 "External contract").
FINISHED_STATUSES = frozenset({"completed", "failed", "cancelled"})


class Omit(enum.Enum):
    """Marks an optional body field that is left out (which differs from sending JSON null)."""

    OMIT = "omit"


OMIT = Omit.OMIT


class ApiError(MigdError):
    """The daemon answered with an error status (400, 401, 404, 409, ...) and this reason."""

    def __init__(self, status: int, error: str, detail: Any = None) -> None:
        self.status = status
        self.error = error
        self.detail = detail
        super().__init__(format_api_error(status, error, detail))


class ApiUnreachable(MigdError):
    """No answer from the daemon: nothing listens there, or the connection broke."""


def format_api_error(status: int, error: str, detail: Any = None) -> str:
    """``409 Conflict: guest g1 is defined, ...`` — status, the daemon's error and its detail."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = ""
    text = f"{status} {error or phrase}".rstrip()
    if detail is None or detail == "" or detail == error:
        return text
    if not isinstance(detail, str):
        detail = json.dumps(detail, sort_keys=True)
    return f"{text}: {detail}"


@dataclass(frozen=True)
class ApiEndpoint:
    """Where the REST API listens: an HTTP base URL, or a unix socket (then ``base_url`` is nominal)."""

    base_url: str
    unix_path: Path | None = None

    def __str__(self) -> str:
        return f"unix:{self.unix_path}" if self.unix_path is not None else self.base_url


def parse_api_url(text: str) -> ApiEndpoint:
    """``http(s)://HOST:PORT[/prefix]``, a bare ``HOST:PORT`` (as in ``api.listen``) or ``unix:/path``."""
    text = text.strip()
    if text.startswith(("http://", "https://")):
        scheme, _, rest = text.partition("://")
        if not rest or rest.startswith("/"):
            raise ConfigError(f"--api: expected {scheme}://HOST:PORT, got {text!r}")
        return ApiEndpoint(text.rstrip("/"))
    if "://" in text:
        raise ConfigError(f"--api: expected http://, https://, HOST:PORT or unix:/path, got {text!r}")
    address = parse_address(text, "--api", allow_unix=True)
    if address.unix_path is not None:
        return ApiEndpoint("http://localhost", address.unix_path)
    if address.port == 0:
        raise ConfigError(f"--api: port must be 1..65535, got {text!r}")
    host = _WILDCARD_TO_LOOPBACK.get(address.host, address.host)
    host = f"[{host}]" if ":" in host else host
    return ApiEndpoint(f"http://{host}:{address.port}")


@dataclass(frozen=True)
class ClientSettings:
    """What the CLI needs to talk to a daemon; ``token`` is None when no token file was found."""

    endpoint: ApiEndpoint
    token: str | None
    token_file: Path | None


def _config_api_table(path: Path) -> tuple[str | None, Path | None]:
    """``api.listen`` and ``api.token_file`` of a daemon config (relative paths: the file's directory).

    Only the ``[api]`` table is read: an operator may run the CLI without access to the
    daemon's keys, which ``migd serve`` (load_config) insists on reading.
    """
    try:
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None
    api = raw.get("api", {})
    if not isinstance(api, dict):
        raise ConfigError(f"{path}: api must be a table, got {type(api).__name__}")
    listen, token_file = api.get("listen"), api.get("token_file")
    if listen is not None and not isinstance(listen, str):
        raise ConfigError(f"{path}: api.listen must be a string, got {listen!r}")
    if token_file is not None and not isinstance(token_file, str):
        raise ConfigError(f"{path}: api.token_file must be a string, got {token_file!r}")
    token_path = None
    if token_file is not None:
        token_path = Path(token_file)
        if not token_path.is_absolute():
            token_path = path.resolve().parent / token_path
    return listen, token_path


def resolve_settings(
    *, api: str | None = None, token_file: str | None = None, config: str | None = None,
    env: Mapping[str, str] | None = None, default_config: Path = DEFAULT_CONFIG,
) -> ClientSettings:
    """Find the API address and token; the first source that has a value wins.

    Order: ``--api``/``--token-file``; the ``--config`` file; ``MIGD_API``/``MIGD_TOKEN_FILE``;
    the ``MIGD_CONFIG`` file, else ``default_config`` when it exists. Command-line sources
    come before the environment, as with every other option.
    """
    env = os.environ if env is None else env
    layers: list[tuple[str | None, Path | None]] = [
        (api, Path(token_file) if token_file else None),
    ]
    if config:
        layers.append(_config_api_table(Path(config)))
    layers.append((env.get("MIGD_API") or None, Path(env["MIGD_TOKEN_FILE"]) if env.get("MIGD_TOKEN_FILE") else None))
    fallback = env.get("MIGD_CONFIG") or None
    if fallback:
        layers.append(_config_api_table(Path(fallback)))
    elif not config and default_config.is_file():
        layers.append(_config_api_table(default_config))

    listen = next((a for a, _ in layers if a), None)
    token_path = next((t for _, t in layers if t), None)
    if listen is None:
        raise ConfigError(
            "no API address: pass --api URL or --config FILE, or set MIGD_API or MIGD_CONFIG "
            f"({default_config} does not exist)"
        )
    if token_path is None:
        raise ConfigError(
            "no API token: pass --token-file FILE or --config FILE, or set MIGD_TOKEN_FILE or MIGD_CONFIG"
        )
    return ClientSettings(parse_api_url(listen), read_token(token_path), token_path)


def unreachable_text(endpoint: ApiEndpoint, exc: aiohttp.ClientError) -> str:
    """One sentence for a request to the API that got no HTTP answer: what happened, the likely fix.

    aiohttp's own text (``Cannot connect to host ... ssl:default [Connect call failed ...]``)
    names its internals; the OS error underneath says what happened (migd/failure_text.py).
    """
    where = f"cannot reach the migd API at {endpoint}"
    is_unix = endpoint.unix_path is not None
    os_error = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else None
    if os_error is None:
        if isinstance(exc, aiohttp.ServerDisconnectedError):
            what = "closed the connection without an HTTP answer"
        elif isinstance(exc, aiohttp.ClientResponseError):
            what = "did not answer in HTTP"
        else:
            return f"{where}: the connection broke before the answer; see the daemon's log (journalctl -u migd)"
        return (f"the server at {endpoint} {what}: it is not the migd API; check --api (the API is "
                f"api.listen of the daemon's config, not migration.listen)")
    cause = failure_text.cause_of(os_error)
    if cause is failure_text.Cause.REFUSED:
        if is_unix:
            return f"{where}: nothing accepts connections on that socket; is `migd serve` running?"
        return (f"{where}: nothing is listening there; is `migd serve` running, and is --api (or api.listen "
                f"of --config) this address?")
    if cause is failure_text.Cause.NO_SOCKET and is_unix:
        return (f"{where}: the socket does not exist; is `migd serve` running, and is api.listen of its "
                f"config this path?")
    if cause is failure_text.Cause.PERMISSION:
        return f"{where}: permission denied; run the command as a user allowed to open it (root or the daemon's group)"
    if cause is failure_text.Cause.UNRESOLVED:
        host = exc.host if isinstance(exc, aiohttp.ClientConnectorError) else str(endpoint)
        return f"{where}: the host name {host} does not resolve; check --api (or api.listen of --config)"
    if cause is failure_text.Cause.TLS:
        assert isinstance(os_error, ssl.SSLError)
        return (f"{where}: the TLS handshake failed ({failure_text.tls_reason(os_error)}); the migd API speaks "
                f"plain HTTP (http://) unless a proxy in front of it adds TLS")
    if cause is failure_text.Cause.TIMEOUT:
        return f"{where}: the connection timed out; check the address and the route to it"
    return f"{where}: {failure_text.os_reason(os_error)}; check the address and the route to it"


def _path_segment(value: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"expected a non-empty name or id, got {value!r}")
    return quote(value, safe="")


class MigdClient:
    """One connection pool to one daemon; use as an async context manager."""

    def __init__(self, api: str | ApiEndpoint, token: str | None, *, timeout_s: float = 120.0) -> None:
        self.endpoint = api if isinstance(api, ApiEndpoint) else parse_api_url(api)
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: ClientSettings, *, timeout_s: float = 120.0) -> MigdClient:
        return cls(settings.endpoint, settings.token, timeout_s=timeout_s)

    async def __aenter__(self) -> MigdClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = None
            if self.endpoint.unix_path is not None:
                connector = aiohttp.UnixConnector(path=str(self.endpoint.unix_path))
            headers = {"Accept": "application/json"}
            if self._token is not None:
                headers["Authorization"] = f"Bearer {self._token}"
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout, headers=headers)
        return self._session

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        """One API call: the decoded JSON answer (None for 204); ApiError on an error status."""
        url = self.endpoint.base_url + path
        try:
            async with self._http().request(method, url, json=body) as resp:
                data = await resp.read()
                content_type = resp.content_type
                status = resp.status
        except TimeoutError:
            raise ApiUnreachable(
                f"the migd API at {self.endpoint} did not answer {method} {path} within {self._timeout.total:g} s: "
                f"the daemon may be overloaded or hung; see its log (journalctl -u migd)"
            ) from None
        except aiohttp.ClientError as exc:
            raise ApiUnreachable(unreachable_text(self.endpoint, exc)) from None
        decoded: Any = None
        if data:
            if content_type == "application/json":
                try:
                    decoded = json.loads(data)
                except ValueError:
                    raise ApiError(status, "invalid JSON answer", data[:200].decode(errors="replace")) from None
            else:
                decoded = data.decode(errors="replace")
        if status >= 400:
            if isinstance(decoded, dict) and "error" in decoded:
                raise ApiError(status, str(decoded["error"]), decoded.get("detail"))
            raise ApiError(status, "", decoded.strip() if isinstance(decoded, str) else decoded)
        return decoded

    # ------------------------------------------------------------------ routes (docs/design.md §9)

    async def health(self) -> dict[str, Any]:
        """``GET /v1/health`` (needs no token)."""
        return await self.request("GET", "/v1/health")

    async def guests(self) -> list[dict[str, Any]]:
        """Every guest of the host."""
        return (await self.request("GET", "/v1/guests"))["guests"]

    async def guest(self, name: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/guests/{_path_segment(name)}")

    async def create_guest(
        self, name: str, memory_mib: int, *, policy: int | None = None, efi: bool | None = None,
        uefi_live_migration: bool | None | Omit = OMIT,
    ) -> dict[str, Any]:
        """Define a guest (201); optional fields are sent only when given.

        ``uefi_live_migration`` is the UEFI variable SevLiveMigrationEnabled an EFI guest sees:
        True/False, None for "variable absent", OMIT for the daemon's default (true).
        """
        body: dict[str, Any] = {"name": name, "memory_mib": memory_mib}
        if policy is not None:
            body["policy"] = policy
        if efi is not None:
            body["efi"] = efi
        if uefi_live_migration is not OMIT:
            body["uefi_live_migration"] = uefi_live_migration
        return await self.request("POST", "/v1/guests", body)

    async def start_guest(self, name: str, workload: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Boot the guest, with the daemon's default workload unless ``workload`` is given."""
        body = {} if workload is None else {"workload": dict(workload)}
        return await self.request("POST", f"/v1/guests/{_path_segment(name)}/start", body)

    async def guest_action(self, name: str, action: str) -> dict[str, Any]:
        """``stop``, ``reboot`` or ``kexec``."""
        if action not in ("stop", "reboot", "kexec"):
            raise ConfigError(f"guest action must be stop, reboot or kexec, got {action!r}")
        return await self.request("POST", f"/v1/guests/{_path_segment(name)}/{action}")

    async def delete_guest(self, name: str) -> None:
        await self.request("DELETE", f"/v1/guests/{_path_segment(name)}")

    async def migrate(
        self, name: str, destination: str, *, downtime_limit_ms: float | None = None,
        max_bandwidth_mib_s: float | None = None, connections: int | None = None,
    ) -> dict[str, Any]:
        """Start a live migration (202); returns the migration object at once. A setting left
        ``None`` is not sent: the daemon's config decides it."""
        body: dict[str, Any] = {"destination": destination}
        if downtime_limit_ms is not None:
            body["downtime_limit_ms"] = downtime_limit_ms
        if max_bandwidth_mib_s is not None:
            body["max_bandwidth_mib_s"] = max_bandwidth_mib_s
        if connections is not None:
            body["connections"] = connections
        return await self.request("POST", f"/v1/guests/{_path_segment(name)}/migrate", body)

    async def save_guest(
        self, name: str, path: str, *, for_host_pdh: str | None = None, live: bool | None = None,
    ) -> dict[str, Any]:
        """Start saving a running guest to ``path`` on the daemon's host (202); returns the job (role
        ``save``) at once. ``for_host_pdh``: the PDH certificate of the host that may restore it (default:
        the daemon's own). Paths are sent as given: the daemon takes absolute ones only."""
        body: dict[str, Any] = {"path": path}
        if for_host_pdh is not None:
            body["for_host_pdh"] = for_host_pdh
        if live is not None:
            body["live"] = live
        return await self.request("POST", f"/v1/guests/{_path_segment(name)}/save", body)

    async def restore_guest(self, path: str, *, name: str | None = None) -> dict[str, Any]:
        """Start restoring the save file ``path`` on the daemon's host (202); returns the job (role
        ``restore``) at once. ``name``: the guest's new name (default: the saved one)."""
        body: dict[str, Any] = {"path": path}
        if name is not None:
            body["name"] = name
        return await self.request("POST", "/v1/guests/restore", body)

    async def migrations(self) -> list[dict[str, Any]]:
        return (await self.request("GET", "/v1/migrations"))["migrations"]

    async def migration(self, migration_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/v1/migrations/{_path_segment(migration_id)}")

    async def cancel(self, migration_id: str) -> dict[str, Any]:
        """Ask the source to cancel (202); the migration ends ``cancelled`` unless it has committed."""
        return await self.request("POST", f"/v1/migrations/{_path_segment(migration_id)}/cancel")

    async def metrics(self) -> str:
        """``GET /metrics`` (Prometheus text)."""
        return await self.request("GET", "/metrics")

