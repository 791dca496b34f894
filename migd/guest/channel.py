"""The host side of one guest's hypercall channel: a unix-socket server for its agent.

A thin asyncio adapter (aioquic style) over two sans-I/O pieces: :class:`ChannelCodec`
frames the bytes and :class:`VmPlatform` answers the guest's platform requests
(docs/design.md §4 "The hypercall channel"). One :class:`GuestChannel` per running guest:

* listens on its own unix socket (mode 0600, created before ``listen`` so no one can connect
  through a wider mode), accepts one agent connection at a time — a second concurrent
  connection is closed at once;
* requires ``hello`` first, with the guest's name and page count from its :class:`VmConfig`;
* answers guest requests synchronously as the bytes arrive, so a ``wrmsr`` that drops the
  migration-control MSR reaches ``VmPlatform.on_migration_control_change`` before anything
  else the guest sent after it;
* offers awaitable host → guest requests (pause, resume, fetch_dirty, ...), each bounded by
  a timeout, and a race-free way to await guest reports (``event_count`` + ``wait_event``).

A guest that breaks the protocol (bad framing, bad envelope, requests before hello, a
response to nothing) loses its connection with a logged error; nothing raises into the
event loop and no other guest is affected (docs/design.md §8 "Invariants", 7).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from migd.bitmap import PageBitmap
from migd.guest.channel_codec import (
    RESPONSE,
    ChannelCodec,
    ChannelProtocolError,
    Message,
    get_bool,
    get_bytes,
    get_int,
    get_optional_str,
    get_str,
    get_u64,
    request,
    response_error,
    response_ok,
)
from migd.errors import ConfigError, MigdError, ProtocolError
from migd.guest.vm import VmPlatform

log = logging.getLogger(__name__)

#: sun_path is 108 bytes on Linux including the terminating NUL (unix(7)).
MAX_SOCKET_PATH: Final = 107
MAX_STATE_BYTES: Final = 1 << 20  # vCPU + agent state is KiBs (docs/design.md §4); never RAM
DEFAULT_REQUEST_TIMEOUT: Final = 10.0
DEFAULT_HELLO_TIMEOUT: Final = 10.0
_STALE_IDS: Final = 256  # ids of timed-out requests whose late answers are ignored
#: Round trips remembered per request kind (the switch-over's probe of the hand-off's cost).
ROUND_TRIP_SAMPLES: Final = 8

#: Event names a guest may report (docs/design.md §4: "report" kind "event", plus the kexec hold hook).
GUEST_EVENTS: Final = frozenset({"booted", "offline", "kexec", "reboot", "crash", "shutdown", "kexec-window"})
#: The key under which check reports are counted and awaited with :meth:`GuestChannel.wait_event`.
CHECK: Final = "check"


class GuestChannelError(MigdError):
    """A host → guest request failed: no agent connected, connection lost, or the guest said no."""


class GuestTimeoutError(GuestChannelError, TimeoutError):
    """A wait on the guest channel ran out of time."""


@dataclass(frozen=True)
class GuestHello:
    """What the agent announced when it connected."""

    name: str
    npages: int
    pid: int
    incoming: bool


@dataclass(frozen=True)
class CheckReport:
    """Result of a guest self-check of every page of its memory."""

    pages_verified: int
    errors: int
    first_error: str | None

    @classmethod
    def from_message(cls, msg: Message) -> CheckReport:
        """Validate the fields of a check report / check response."""
        return cls(
            pages_verified=get_u64(msg, "pages_verified"),
            errors=get_u64(msg, "errors"),
            first_error=get_optional_str(msg, "first_error"),
        )


class _AgentProtocol(asyncio.Protocol):
    """One accepted agent connection; everything it does is delegated to its channel."""

    def __init__(self, channel: GuestChannel) -> None:
        self.channel = channel
        self.codec = ChannelCodec()
        self.transport: asyncio.Transport | None = None
        self.hello: GuestHello | None = None
        self.closed = False
        self.writing_paused = False
        self.backlog: collections.deque[Message] = collections.deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport
        self.channel._connection_made(self)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.backlog.extend(self.codec.feed(data))
        except ProtocolError as exc:
            self.channel._violation(self, str(exc))
            return
        self._process_backlog()

    def _process_backlog(self) -> None:
        try:
            while self.backlog and not self.closed and not self.writing_paused:
                self.channel._message_received(self, self.backlog.popleft())
        except ProtocolError as exc:
            self.channel._violation(self, str(exc))
        except Exception:  # isolation boundary: a bug handling one guest must not kill the loop
            log.exception("internal error on guest channel guest=%s", self.channel.vm.config.name)
            self.abort()

    # Flow control: a guest that sends requests but never reads our answers would grow the
    # transport's write buffer without bound. Past the high-water mark we stop answering
    # (the rest of the decoded chunk waits in ``backlog``) and stop reading, so daemon
    # memory per guest stays bounded by one read chunk (docs/design.md §8 "Invariants", 6).
    def pause_writing(self) -> None:
        self.writing_paused = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._process_backlog()
        if self.transport is not None and not self.closed and not self.writing_paused:
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.channel._connection_lost(self, exc)

    def send(self, msg: Message) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(self.codec.encode(msg))

    def close(self) -> None:
        """Close after flushing what is queued (e.g. a refusal the agent should read)."""
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection now (a hostile peer may never read what we queued)."""
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.abort()


class GuestChannel:
    """Host end of one guest's hypercall channel (see module docstring)."""

    def __init__(
        self,
        vm: VmPlatform,
        path: str | os.PathLike[str],
        *,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        hello_timeout: float = DEFAULT_HELLO_TIMEOUT,
    ) -> None:
        self.vm = vm
        self.path = Path(path)
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"channel socket path must be at most {MAX_SOCKET_PATH} bytes, got "
                f"{len(os.fsencode(self.path))}: {self.path}")
        if request_timeout <= 0 or hello_timeout <= 0:
            raise ValueError(f"timeouts must be positive, got {request_timeout}, {hello_timeout}")
        self.request_timeout = request_timeout
        self.hello_timeout = hello_timeout
        self._server: asyncio.Server | None = None
        self._conn: _AgentProtocol | None = None
        self._connected = asyncio.Event()
        self._disconnected = asyncio.Event()
        self._disconnected.set()
        self._hello_timer: asyncio.TimerHandle | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Message]] = {}
        self._stale_ids: collections.deque[int] = collections.deque(maxlen=_STALE_IDS)
        self._event_counts: collections.Counter[str] = collections.Counter()
        self._last_events: dict[str, Message] = {}
        self._event_waiters: dict[str, list[asyncio.Future[Message]]] = collections.defaultdict(list)
        self.last_check: CheckReport | None = None
        self.protocol_errors = 0
        self.last_error: str | None = None
        self._round_trips: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=ROUND_TRIP_SAMPLES))

    # ------------------------------------------------------------------ lifetime

    async def start(self) -> None:
        """Create the socket (mode 0600) and start accepting the agent."""
        if self._server is not None:
            raise GuestChannelError(f"channel {self.path} already started")
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(self.path))
            # chmod before listen(): until listen() every connect is refused, so the socket
            # is never reachable with the umask's wider mode.
            os.chmod(self.path, 0o600)
            sock.setblocking(False)
            # Not serving until the server is ours: a cancel inside create_unix_server (its
            # sleep(0)) would otherwise leave the loop polling a socket nobody can close, whose
            # fd number the next socket reuses, never to be polled (seen: the next guest hung).
            server = await asyncio.get_running_loop().create_unix_server(
                lambda: _AgentProtocol(self), sock=sock, backlog=4, start_serving=False)
        except BaseException:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            raise
        self._server = server
        try:
            await server.start_serving()
        except BaseException:
            await self.close()
            raise
        log.info("channel listening guest=%s path=%s", self.vm.config.name, self.path)

    def _remove_stale_socket(self) -> None:
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise ConfigError(f"channel path {self.path} exists and is not a socket")
        self.path.unlink()  # left by a previous daemon run

    async def close(self) -> None:
        """Stop listening, drop the agent connection, fail pending requests, remove the socket."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self._conn is not None:
            conn = self._conn
            conn.abort()
            self._connection_lost(conn, None)
        if server is not None:
            # Python >= 3.12 also waits for accepted connections here; ours are aborted above.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.request_timeout):
                    await server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    async def __aenter__(self) -> GuestChannel:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # ------------------------------------------------------------------ connection state

    @property
    def connected(self) -> bool:
        """True while an agent that said a valid hello is connected."""
        return self._connected.is_set()

    @property
    def hello(self) -> GuestHello | None:
        """The accepted hello of the current agent connection."""
        return self._conn.hello if self._conn is not None else None

    async def wait_connected(self, timeout: float) -> GuestHello:
        """Wait until an agent has connected and said a valid hello."""
        await self._wait(self._connected.wait(), timeout, "agent connection")
        hello = self.hello
        if hello is None:  # lost again between the wake-up and now
            raise GuestChannelError(f"guest {self.vm.config.name}: agent disconnected right after hello")
        return hello

    async def wait_disconnected(self, timeout: float) -> None:
        """Wait until no agent is connected (e.g. after ``shutdown``)."""
        await self._wait(self._disconnected.wait(), timeout, "agent disconnect")

    def event_count(self, kind: str) -> int:
        """How many reports of ``kind`` (an event name or ``"check"``) arrived so far."""
        return self._event_counts[kind]

    def last_event(self, kind: str) -> Message | None:
        """The last report of ``kind``, as the guest sent it."""
        return self._last_events.get(kind)

    async def wait_event(self, kind: str, timeout: float, *, since: int | None = None) -> Message:
        """Wait for a report of ``kind`` newer than count ``since`` (default: from now on).

        Race-free pattern: ``n = ch.event_count("booted"); await ch.reboot();
        await ch.wait_event("booted", 10, since=n)``.
        """
        if since is None:
            since = self._event_counts[kind]
        if self._event_counts[kind] > since:
            return self._last_events[kind]
        waiter: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._event_waiters[kind].append(waiter)
        try:
            return await self._wait(waiter, timeout, f"guest report {kind!r}")
        finally:
            with contextlib.suppress(ValueError):
                self._event_waiters[kind].remove(waiter)

    # ------------------------------------------------------------------ host → guest requests

    async def pause(self, timeout: float | None = None) -> None:
        """Ask the guest to stop at a step boundary; returns once it no longer touches memory."""
        rsp = await self._request("pause", timeout)
        try:
            if not get_bool(rsp, "paused"):
                raise ChannelProtocolError("field 'paused': expected true, got false")
        except ChannelProtocolError as exc:
            self._violation_current(f"pause: {exc}")
            raise GuestChannelError(f"guest {self.vm.config.name}: pause not acknowledged: {exc}") from exc

    async def resume(self, timeout: float | None = None) -> None:
        """Let a paused guest (or one held in the kexec window) continue."""
        await self._request("resume", timeout)

    async def fetch_dirty(self, timeout: float | None = None) -> PageBitmap:
        """Pages written since the last fetch, united with pages whose state MAP_GPA_RANGE changed."""
        rsp = await self._request("fetch_dirty", timeout)
        npages = self.vm.config.npages
        try:
            dirty = PageBitmap.decode(get_bytes(rsp, "bitmap"), max_npages=npages)
            if dirty.npages != npages:
                raise ChannelProtocolError(f"dirty bitmap: expected {npages} pages, got {dirty.npages}")
        except ProtocolError as exc:
            self._violation_current(f"fetch_dirty: {exc}")
            raise GuestChannelError(f"guest {self.vm.config.name}: bad dirty bitmap: {exc}") from exc
        dirty.update(self.vm.state_change_log.fetch_and_clear())
        return dirty

    async def throttle(self, percent: int, timeout: float | None = None) -> None:
        """Make the guest stall ``percent`` (0..99) of its time (auto-converge)."""
        if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 99:
            raise ValueError(f"throttle percent must be an integer in [0, 99], got {percent!r}")
        await self._request("throttle", timeout, percent=percent)

    async def reboot(self, timeout: float | None = None) -> None:
        """Reset the vCPU host-side (MSR → 0, listener fires) and tell the guest to boot again."""
        self._require_agent("reboot")  # no reset without a guest to tell
        self.vm.vcpu_reset()
        await self._request("reboot", timeout)

    async def kexec(self, hold_in_window: bool = False, timeout: float | None = None) -> None:
        """Ask the guest to kexec a new kernel; ``hold_in_window`` stops it in the seed-race window."""
        await self._request("kexec", timeout, hold_in_window=bool(hold_in_window))

    async def shutdown(self, timeout: float | None = None) -> None:
        """Ask the guest to shut down (it writes MSR = 0, then the agent exits)."""
        await self._request("shutdown", timeout)

    async def export_state(self, timeout: float | None = None) -> bytes:
        """vCPU + agent state of the (paused) guest."""
        rsp = await self._request("export_state", timeout)
        try:
            return get_bytes(rsp, "state", max_len=MAX_STATE_BYTES)
        except ChannelProtocolError as exc:
            self._violation_current(f"export_state: {exc}")
            raise GuestChannelError(f"guest {self.vm.config.name}: bad exported state: {exc}") from exc

    async def import_state(self, state: bytes, timeout: float | None = None, *, start: bool = True) -> None:
        """Hand an incoming guest its vCPU + agent state before it runs.

        ``start=False`` only stages it (checked, memory loaded, not running) until :meth:`start_imported`.
        """
        if not isinstance(state, bytes) or len(state) > MAX_STATE_BYTES:
            raise ValueError(f"state must be bytes of at most {MAX_STATE_BYTES}, got {type(state).__name__}"
                             f" of {len(state) if isinstance(state, bytes) else '?'}")
        if start:
            await self._request("import_state", timeout, state=state)
        else:
            await self._request("import_state", timeout, state=state, start=False)

    async def start_imported(self, timeout: float | None = None) -> None:
        """Let an incoming guest whose state was staged (``import_state(start=False)``) run."""
        await self._request("start", timeout)

    async def check(self, timeout: float | None = None) -> CheckReport:
        """Have the guest self-check every page now; the result also becomes ``last_check``."""
        rsp = await self._request("check", timeout)
        try:
            report = CheckReport.from_message(rsp)
        except ChannelProtocolError as exc:
            self._violation_current(f"check: {exc}")
            raise GuestChannelError(f"guest {self.vm.config.name}: bad check result: {exc}") from exc
        self.last_check = report
        return report

    def round_trip_s(self, op: str) -> float | None:
        """The shortest of the last answered ``op`` requests, in seconds (None before the first answer).

        A probe of how long a hop to this guest's agent takes right now, load included: the
        switch-over budgets the hand-off's agent round trips with it (migd/convergence.py). The
        shortest, not the typical: a running guest answers only between its steps, so most
        samples also hold a step's wait, which a paused guest's hand-off never has.
        """
        samples = self._round_trips.get(op)
        return min(samples) if samples else None

    def _require_agent(self, op: str) -> _AgentProtocol:
        conn = self._conn
        if conn is None or conn.hello is None or conn.closed:
            raise GuestChannelError(f"guest {self.vm.config.name}: no agent connected for {op!r}")
        return conn

    async def _request(self, op: str, timeout: float | None, **fields: Any) -> Message:
        conn = self._require_agent(op)
        msg_id = next(self._ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = future
        try:
            sent_at = time.monotonic()
            conn.send(request(msg_id, op, **fields))
            rsp = await self._wait(future, self.request_timeout if timeout is None else timeout, f"{op!r} response")
            self._round_trips[op].append(time.monotonic() - sent_at)
        except (GuestTimeoutError, asyncio.CancelledError):
            # The guest may still answer; its late response must not look like a protocol violation.
            self._stale_ids.append(msg_id)
            raise
        finally:
            self._pending.pop(msg_id, None)
        if not rsp["ok"]:
            raise GuestChannelError(f"guest {self.vm.config.name} refused {op!r}: {rsp['error']}")
        return rsp

    async def _wait(self, awaitable: Any, timeout: float, what: str) -> Any:
        try:
            async with asyncio.timeout(timeout):
                return await awaitable
        except TimeoutError as exc:
            raise GuestTimeoutError(f"guest {self.vm.config.name}: no {what} within {timeout:g} s") from exc

    # ------------------------------------------------------------------ protocol callbacks

    def _connection_made(self, conn: _AgentProtocol) -> None:
        if self._conn is not None:
            log.warning("refusing second agent connection guest=%s", self.vm.config.name)
            conn.abort()
            return
        self._conn = conn
        self._disconnected.clear()
        self._hello_timer = asyncio.get_running_loop().call_later(
            self.hello_timeout, self._hello_timed_out, conn)

    def _hello_timed_out(self, conn: _AgentProtocol) -> None:
        if conn is self._conn and conn.hello is None:
            self._violation(conn, f"no hello within {self.hello_timeout:g} s")

    def _connection_lost(self, conn: _AgentProtocol, exc: Exception | None) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self._connected.clear()
        self._disconnected.set()
        for future in self._pending.values():
            if not future.done():
                future.set_exception(GuestChannelError(f"guest {self.vm.config.name}: agent connection lost"))
        self._pending.clear()
        log.info("agent disconnected guest=%s error=%s", self.vm.config.name, exc)

    def _violation(self, conn: _AgentProtocol, error: str) -> None:
        self.protocol_errors += 1
        self.last_error = error
        log.error("guest protocol violation, closing channel guest=%s error=%s", self.vm.config.name, error)
        conn.abort()

    def _violation_current(self, error: str) -> None:
        if self._conn is not None:
            self._violation(self._conn, error)

    def _message_received(self, conn: _AgentProtocol, msg: Message) -> None:
        if msg["t"] == RESPONSE:
            self._response_received(conn, msg)
        elif conn.hello is None:
            self._hello_received(conn, msg)
        elif msg["op"] == "hello":
            self._violation(conn, "second hello on one connection")
        elif msg["op"] == "report":
            conn.send(self._report_received(msg))
        else:
            conn.send(self.vm.handle_guest_request(msg))

    def _response_received(self, conn: _AgentProtocol, msg: Message) -> None:
        future = self._pending.get(msg["id"])
        if future is None:
            if msg["id"] in self._stale_ids:
                return  # the answer to a request that already timed out
            self._violation(conn, f"response to unknown request id {msg['id']}")
        elif not future.done():
            future.set_result(msg)

    def _hello_received(self, conn: _AgentProtocol, msg: Message) -> None:
        if msg["op"] != "hello":
            self._violation(conn, f"expected 'hello' first, got {msg['op']!r}")
            return
        config = self.vm.config
        try:
            hello = GuestHello(
                name=get_str(msg, "name", max_len=256),
                npages=get_u64(msg, "npages"),
                pid=get_int(msg, "pid", 0, (1 << 31) - 1),
                incoming=get_bool(msg, "incoming"),
            )
            if hello.name != config.name or hello.npages != config.npages:
                raise ChannelProtocolError(
                    f"hello mismatch: expected name={config.name!r} npages={config.npages}, "
                    f"got name={hello.name!r} npages={hello.npages}")
        except ChannelProtocolError as exc:
            conn.send(response_error(msg["id"], str(exc)))
            self.protocol_errors += 1
            self.last_error = str(exc)
            log.error("refusing agent guest=%s error=%s", config.name, exc)
            conn.close()  # flush the refusal so the agent can tell why
            return
        conn.hello = hello
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        conn.send(response_ok(msg["id"]))
        self._connected.set()
        log.info("agent connected guest=%s pid=%d incoming=%s", config.name, hello.pid, hello.incoming)

    def _report_received(self, msg: Message) -> Message:
        try:
            kind = get_str(msg, "kind", max_len=16)
            if kind == CHECK:
                self.last_check = CheckReport.from_message(msg)
                key = CHECK
            elif kind == "event":
                key = get_str(msg, "event", max_len=32)
                if key not in GUEST_EVENTS:
                    raise ChannelProtocolError(f"field 'event': expected one of {sorted(GUEST_EVENTS)}, got {key!r}")
            else:
                raise ChannelProtocolError(f"field 'kind': expected 'check' or 'event', got {kind!r}")
        except ChannelProtocolError as exc:
            log.warning("bad guest report guest=%s error=%s", self.vm.config.name, exc)
            return response_error(msg["id"], str(exc))
        self._event_counts[key] += 1
        self._last_events[key] = msg
        log.info("guest report guest=%s kind=%s", self.vm.config.name, key)
        for waiter in self._event_waiters.pop(key, []):
            if not waiter.done():
                waiter.set_result(msg)
        return response_ok(msg["id"])
