"""The standing listener for incoming migrations, and its bounds on peers not yet authenticated.

Until an incoming session has verified its peer (the destination checked the source's SESSION
and called ``FrameProtocol.mark_authenticated``), the peer is anyone who can reach the port, so
everything such a connection can hold is bounded here:

* at most ``max_pending`` of them at a time: past that a new connection is closed as soon as it
  is accepted, before any protocol, TLS state or buffer exists for it;
* each has ``handshake_timeout_s`` from its accept to authentication, its TLS handshake
  included; then it is closed, and its task, protocol and buffer go with it;
* its stream meanwhile takes only control frames into a 64 KiB buffer (migd/stream.py).

The first byte the peer sends, looked at before anything is read, says what a connection is:
a further connection of a migration begins with the lane preamble (``wire.LANE_PREAMBLE``, in
the clear, before TLS) and is handed, socket and all, to a thread of its own
(migd/lane_receiver.py: TLS, JOIN, then its page frames without the event loop), under the same
count and deadline; anything else (a TLS ClientHello, a plain frame) goes the usual way. A peer
that sends nothing by the deadline is refused as before.

Why the listener accepts sockets itself (``sock_accept``) and hands each to
``connect_accepted_socket`` rather than using ``create_server(ssl=...)``: there asyncio and
uvloop call the protocol's ``connection_made`` only after a successful TLS handshake and tell
nobody of a failed one, so a task waiting for it waits forever; the former listener kept such a
task and a 4 MiB receive buffer for every failed handshake (150 of them: +622 MiB RSS, measured
under uvloop), and no cap could reach a connection still in its handshake. Here the cap applies at
accept, and a failed or slow handshake is an exception (``ssl_handshake_timeout`` included)
in the connection's own task.

Every refusal is counted in :attr:`MigrationListener.refused` by :class:`Refusal` and logged,
at most one line per reason per :data:`REFUSAL_LOG_INTERVAL_S`, with the number of lines held
back: a flood of one kind (a port scanner's garbage) does not hide the one misconfigured peer.

A refused TLS handshake is classified from the ``ssl.SSLError`` (OpenSSL's reason code and,
for a certificate that does not verify, its verify code): no client certificate, a certificate
from another CA or otherwise unacceptable, a TLS version below 1.3, a peer that does not speak
TLS, a handshake that did not finish in time. The peer gets the alert OpenSSL chose
(``certificate_required``, ``unknown_ca``, ``protocol_version``, ...): asyncio's and uvloop's
SSL protocols drop it on a failed handshake, :class:`_AlertingSSLObject` makes them send it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import enum
import logging
import math
import socket
import ssl
import struct
import time
from dataclasses import dataclass

from migd import dest, wire
from migd.errors import PeerProtocolError, ProtocolError
from migd.host import Host
from migd.lane_receiver import LaneReceiver
from migd.peer_text import printable
from migd.platform import pki_verify
from migd.progress import MigrationProgress
from migd.stream import FrameProtocol, StreamClosed

log = logging.getLogger(__name__)

#: At most one refusal line per this many seconds; the next line counts those held back.
REFUSAL_LOG_INTERVAL_S = 5.0
#: accept() failing for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) is
#: retried after this long rather than at once, as asyncio's own servers do (its
#: ACCEPT_RETRY_DELAY).
ACCEPT_RETRY_DELAY_S = 1.0
#: A session whose connection was closed at its deadline sees the stream lost at once and
#: ends; this long is the backstop before its task is cancelled.
WIND_DOWN_S = 5.0
#: The session's own handshake deadline comes this long after the listener's, so that the
#: listener's bound is the one that closes (and counts) a connection that never authenticates.
#: Equal deadlines race: the session measures with time.monotonic(), the loop's timers with its
#: own clock, which uvloop caches per loop iteration (measured: 10 of 60 silent connections
#: were ended by the session first under 60 concurrent connections).
SESSION_HANDSHAKE_MARGIN_S = 1.0
#: How long close() waits for the incoming migrations it cancelled to clean up.
CLOSE_TIMEOUT_S = 60.0
#: Resolving the listen address (a host name goes through getaddrinfo in a thread).
RESOLVE_TIMEOUT_S = 10.0
_BACKLOG = 100  # as loop.create_server
#: SO_LINGER on with 0 s: closing a refused connection sends RST and leaves no TIME_WAIT here.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class Refusal(enum.StrEnum):
    """Why a connection ended before its peer was authenticated (keys of ``refused``)."""

    CAPACITY = "capacity"  # max_pending unauthenticated connections already
    HANDSHAKE_TIMEOUT = "handshake-timeout"  # TLS done (or none), but not authenticated within handshake_timeout_s
    TLS_TIMEOUT = "tls-timeout"  # the TLS handshake did not finish within handshake_timeout_s
    TLS_NO_CLIENT_CERTIFICATE = "tls-no-client-certificate"  # the peer sent no certificate
    TLS_UNKNOWN_CA = "tls-unknown-ca"  # its certificate is not issued by tls.ca
    TLS_BAD_CERTIFICATE = "tls-bad-certificate"  # issued by tls.ca, but expired, not yet valid, wrong purpose
    TLS_VERSION = "tls-version"  # the peer offers no TLS 1.3
    TLS_NOT_TLS = "tls-not-tls"  # plain TCP (a migd without [tls], HTTP, garbage) on the TLS port
    TLS_HANDSHAKE = "tls-handshake"  # the TLS handshake failed otherwise
    PROTOCOL_ERROR = "protocol-error"  # a frame refused before authentication (malformed, too large)
    #: The session refused the peer before it authenticated: another protocol version or transport
    #: mode, a replayed session, a SESSION that does not verify (a forged or foreign source).
    SESSION_REFUSED = "session-refused"
    CLOSED_BEFORE_AUTHENTICATION = "closed-before-authentication"  # the peer closed or reset it


@dataclass(eq=False)
class _Connection:
    """One accepted connection, as the listener tracks it until its task ends."""

    peer: str
    deadline: float  # loop time by which the peer must be authenticated
    sock: socket.socket | None  # ours until connect_accepted_socket takes it over
    proto: FrameProtocol | None = None
    settled: bool = False  # no longer counted as pending (authenticated, or over)
    refused: Refusal | None = None


class _RefusalLog:
    """Refusal warnings, at most one per reason per ``interval_s``; the next line of that reason
    says how many were held back."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.suppressed: collections.Counter[Refusal] = collections.Counter()
        self._next: dict[Refusal, float] = {}

    def note(self, reason: Refusal, peer: str, detail: str) -> None:
        """Log this refusal now, or count it for the next line of its reason."""
        now = time.monotonic()
        if now < self._next.get(reason, 0.0):
            self.suppressed[reason] += 1
            return
        # detail can carry peer-chosen text (a frame's fields in a ProtocolError): escaped, bounded.
        log.warning("incoming connection refused reason=%s peer=%s suppressed=%d detail=%s",
                    reason, peer, self.suppressed.pop(reason, 0), printable(detail))
        self._next[reason] = now + self.interval_s

    def flush(self) -> None:
        """Say how many refusals of each reason were held back since its last line, if any."""
        for reason, count in sorted(self.suppressed.items()):
            log.warning("incoming connection refusals not logged reason=%s suppressed=%d", reason, count)
        self.suppressed.clear()


_TLS_REFUSALS = {
    pki_verify.TlsProblem.NO_CERTIFICATE: Refusal.TLS_NO_CLIENT_CERTIFICATE,
    pki_verify.TlsProblem.UNKNOWN_CA: Refusal.TLS_UNKNOWN_CA,
    pki_verify.TlsProblem.EXPIRED: Refusal.TLS_BAD_CERTIFICATE,
    pki_verify.TlsProblem.NOT_YET_VALID: Refusal.TLS_BAD_CERTIFICATE,
    pki_verify.TlsProblem.WRONG_PURPOSE: Refusal.TLS_BAD_CERTIFICATE,
    pki_verify.TlsProblem.NAME_MISMATCH: Refusal.TLS_BAD_CERTIFICATE,
    pki_verify.TlsProblem.BAD_CERTIFICATE: Refusal.TLS_BAD_CERTIFICATE,
    pki_verify.TlsProblem.VERSION: Refusal.TLS_VERSION,
    pki_verify.TlsProblem.NOT_TLS: Refusal.TLS_NOT_TLS,
}
_TLS_DETAILS = {
    Refusal.TLS_NO_CLIENT_CERTIFICATE: "the peer presented no client certificate",
    Refusal.TLS_UNKNOWN_CA: "the peer's certificate is not issued by tls.ca",
    Refusal.TLS_BAD_CERTIFICATE: "the peer's certificate is not acceptable",
    Refusal.TLS_VERSION: "the peer does not offer TLS 1.3",
    Refusal.TLS_NOT_TLS: "the peer does not speak TLS (plain TCP: a migd without [tls]? HTTP?)",
    Refusal.TLS_HANDSHAKE: "the TLS handshake failed",
}


def tls_refusal(exc: ssl.SSLError) -> tuple[Refusal, str]:
    """The refusal reason of a failed server-side TLS handshake, and the detail its log line gives.

    Classified from OpenSSL's reason and verify codes (:func:`pki_verify.tls_problem`); the
    detail adds OpenSSL's own words (a verify message names the exact certificate problem).
    """
    verify_code = getattr(exc, "verify_code", None)
    reason = _TLS_REFUSALS.get(pki_verify.tls_problem(exc.reason, verify_code), Refusal.TLS_HANDSHAKE)
    if verify_code:
        what = f"verify error {verify_code}: {getattr(exc, 'verify_message', '')}"
    else:
        what = f"{exc.library or 'SSL'} {exc.reason or type(exc).__name__}"
    return reason, f"{_TLS_DETAILS[reason]} ({what})"


class _TlsHandshake:
    """One connection's server-side TLS handshake, as :class:`_AlertingSSLObject` reports its failure."""

    def __init__(self) -> None:
        #: Why the handshake failed, classified at once: the exception itself would keep its
        #: traceback's frames, and with them the SSL protocol and its buffers, alive.
        self.refusal: tuple[Refusal, str] | None = None
        #: The task running connect_accepted_socket (set once it exists).
        self.connecting: asyncio.Task[None] | None = None

    def failed(self, exc: ssl.SSLError) -> None:
        """The handshake failed with ``exc``; once the alert is on its way, end the connecting."""
        self.refusal = tls_refusal(exc)
        if self.connecting is not None:
            # call_soon: the SSL protocol flushes the alert when do_handshake returns to it; the
            # cancelled connect_accepted_socket then closes the transport.
            asyncio.get_running_loop().call_soon(self.connecting.cancel)


def _handshake_refusal(exc: OSError) -> tuple[Refusal, str]:
    """The refusal reason and log detail of a connection whose (TLS) connecting failed with ``exc``."""
    if isinstance(exc, (ssl.SSLEOFError, ConnectionResetError, BrokenPipeError)):
        return Refusal.CLOSED_BEFORE_AUTHENTICATION, f"closed during the TLS handshake: {exc!r}"
    if isinstance(exc, ssl.SSLError):
        return tls_refusal(exc)
    if isinstance(exc, ConnectionAbortedError):  # ssl_handshake_timeout: a backstop, ours fires first
        return Refusal.TLS_TIMEOUT, str(exc)
    return Refusal.CLOSED_BEFORE_AUTHENTICATION, repr(exc)


#: The handshake of the connection whose task runs in this context. asyncio and uvloop run a
#: transport's callbacks, and so the SSL object's do_handshake, in a copy of the context of the
#: task that created the transport: the connection's own task (:meth:`MigrationListener._serve`).
_HANDSHAKE: contextvars.ContextVar[_TlsHandshake] = contextvars.ContextVar("migd_listener_tls_handshake")


class _AlertingSSLObject(ssl.SSLObject):
    """The listener's ``SSLContext.sslobject_class``: a failed handshake still sends its TLS alert.

    asyncio's and uvloop's SSL protocols (``SSLProtocol._do_handshake``) write out what OpenSSL
    queued only while the handshake wants more data; on a failure they abort the transport at
    once and the alert OpenSSL had queued (``certificate_required``, ``unknown_ca``,
    ``protocol_version``) is dropped: the peer sees a bare EOF and cannot tell why (measured with
    ``openssl s_client -msg``). Reporting the failure as "wants to read" once makes the protocol
    flush the alert; the connection's task, told through :class:`_TlsHandshake`, then closes
    it and counts the real error. Without a ``_TlsHandshake`` in context it behaves as SSLObject.
    """

    def do_handshake(self) -> None:
        """``SSLObject.do_handshake``, but a first failure is recorded and its alert flushed."""
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as exc:
            handshake = _HANDSHAKE.get(None)
            if handshake is None or handshake.refusal is not None:
                raise
            handshake.failed(exc)
            raise ssl.SSLWantReadError("TLS handshake failed; flushing its alert") from exc


class MigrationListener:
    """The standing listener for incoming migrations (TCP, optionally mutual TLS).

    ``ssl_context``: the server side of mutual TLS (``pki_verify.tls_server_context``);
    ``client_ssl``: what a session uses to RESOLVE an in-doubt migration with its source.
    ``max_pending``: connections not yet authenticated, at most; ``handshake_timeout_s``: from
    accept to authentication; ``stall_timeout_s``: an incoming migration whose source sends
    nothing for this long ends (``None``: the session's default).
    """

    def __init__(
        self,
        host: Host,
        *,
        ssl_context: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        max_pending: int = 64,
        handshake_timeout_s: float = 15.0,
        stall_timeout_s: float | None = None,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if not (math.isfinite(handshake_timeout_s) and handshake_timeout_s > 0):
            raise ValueError(f"handshake_timeout_s must be a finite number > 0, got {handshake_timeout_s}")
        self.host = host
        self.max_pending = max_pending
        self.handshake_timeout_s = handshake_timeout_s
        self.stall_timeout_s = stall_timeout_s
        if ssl_context is not None:
            # The context is the listener's (the server side of mutual TLS): its failed handshakes
            # send their alert (see _AlertingSSLObject).
            ssl_context.sslobject_class = _AlertingSSLObject
        self._ssl = ssl_context
        self._client_ssl = client_ssl
        #: Connections ended before authentication, by reason (every one counted, logged or not).
        self.refused: collections.Counter[str] = collections.Counter()
        self._refusal_log = _RefusalLog(REFUSAL_LOG_INTERVAL_S)
        self._pending = 0
        self._sockets: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._connections: dict[asyncio.Task[MigrationProgress | None], _Connection] = {}

    # -- what it holds (tests, metrics)
    @property
    def pending_connections(self) -> int:
        """Accepted connections whose peer is not authenticated yet (at most ``max_pending``)."""
        return self._pending

    @property
    def live_connections(self) -> int:
        """Connection tasks alive: pending ones and incoming migrations."""
        return len(self._connections)

    @property
    def receive_buffer_bytes(self) -> int:
        """Receive-buffer bytes held by the streams of live connections."""
        return sum(c.proto.receive_buffer_bytes for c in self._connections.values() if c.proto is not None)

    # -- lifetime
    async def start(self, address: str, port: int) -> int:
        """Listen; returns the bound port (pass 0 for a free one)."""
        if self._sockets:
            raise RuntimeError("the migration listener is already listening")
        self._sockets = await _listening_sockets(address, port)
        loop = asyncio.get_running_loop()
        self._accepting = [loop.create_task(self._accept(sock)) for sock in self._sockets]
        return int(self._sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and end every incoming migration still before its commit."""
        for accepting in self._accepting:
            accepting.cancel()
        # Bounded: a cancelled sock_accept ends at once.
        await asyncio.gather(*self._accepting, return_exceptions=True)
        self._accepting = []
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            _, left = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
            if left:
                log.error("migration listener closed with %d incoming connections still winding down after %.0f s",
                          len(left), CLOSE_TIMEOUT_S)
        self._refusal_log.flush()

    # -- accepting
    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, address = await loop.sock_accept(listening)
            except ConnectionAbortedError:
                continue  # reset by the peer while it waited in the backlog: nothing to do
            except OSError as exc:
                log.error("migration listener: accept failed error=%s; retrying in %.0f s", exc, ACCEPT_RETRY_DELAY_S)
                await asyncio.sleep(ACCEPT_RETRY_DELAY_S)
                continue
            peer = _peer_name(address)
            if self._pending >= self.max_pending:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
                sock.close()
                self._refuse(peer, Refusal.CAPACITY,
                             f"{self._pending} connections not yet authenticated (max_pending={self.max_pending})")
                continue
            self._pending += 1
            connection = _Connection(peer, loop.time() + self.handshake_timeout_s, sock)
            task = loop.create_task(self._serve(connection))
            self._connections[task] = connection
            task.add_done_callback(self._served)

    async def _serve(self, connection: _Connection) -> MigrationProgress | None:
        """One connection: the TLS handshake (if any), then its incoming session, under the deadline."""
        first = await self._first_byte(connection)
        if first is None:
            if self._ssl is not None:
                self._refuse_connection(connection, Refusal.TLS_TIMEOUT,
                                        f"no TLS handshake within {self.handshake_timeout_s:g} s")
            else:
                self._refuse_connection(connection, Refusal.HANDSHAKE_TIMEOUT,
                                        f"not authenticated within {self.handshake_timeout_s:g} s")
            return None
        if first == wire.LANE_PREAMBLE[:1]:
            await self._serve_lane(connection)
            return None
        loop = asyncio.get_running_loop()
        proto = connection.proto = FrameProtocol(require_authentication=True)
        sock = connection.sock
        assert sock is not None

        async def connect() -> None:
            # From here the transport owns the socket (and closes it); a task cancelled before
            # its first step never gets here, and _served closes the socket.
            connection.sock = None
            await loop.connect_accepted_socket(
                lambda: proto, sock, ssl=self._ssl,
                ssl_handshake_timeout=self.handshake_timeout_s if self._ssl is not None else None,
            )

        handshake = _TlsHandshake()
        # Set before the connecting task exists: create_task copies this context into it, and the
        # transport it makes runs its callbacks in a copy of that (see _HANDSHAKE).
        _HANDSHAKE.set(handshake)
        connecting = handshake.connecting = loop.create_task(connect())
        try:
            async with asyncio.timeout_at(connection.deadline):
                await connecting
        except TimeoutError:
            self._refuse_connection(connection, Refusal.TLS_TIMEOUT,
                                    f"no TLS handshake within {self.handshake_timeout_s:g} s")
            return None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if handshake.refusal is None or (current is not None and current.cancelling()):
                raise  # cancelled from outside (close()), not by a failed handshake
            self._refuse_connection(connection, *handshake.refusal)
            return None
        except OSError as exc:
            # A recorded TLS failure is the cause even when the peer then closed or reset.
            self._refuse_connection(connection, *(handshake.refusal or _handshake_refusal(exc)))
            return None
        finally:
            # The transport's handles keep a copy of this context, and so the handshake, after the
            # connection is over (a cancelled timer stays in the loop's heap until its time):
            # the finished task, its exception and that exception's frames must not hang on it.
            handshake.connecting = None
        current = asyncio.current_task()
        assert current is not None
        watch = loop.create_task(self._watch(connection, current))
        try:
            # Looked up at each connection, so that a test's replacement of dest.IncomingMigration
            # (shorter timeouts, a stub session) reaches the listener too.
            timeouts = {} if self.stall_timeout_s is None else {"idle_timeout_s": self.stall_timeout_s}
            incoming = dest.IncomingMigration(
                self.host, proto, proto.peer or connection.peer, client_ssl=self._client_ssl,
                handshake_timeout_s=self.handshake_timeout_s + SESSION_HANDSHAKE_MARGIN_S, **timeouts,
            )
            progress = await incoming.run()
        finally:
            watch.cancel()
        if not proto.authenticated.is_set() and connection.refused is None:
            self._ended_before_authentication(connection, incoming.refused_before_authentication)
        return progress

    async def _first_byte(self, connection: _Connection) -> bytes | None:
        """The connection's first byte, left in the socket: b"" if the peer closed or reset it
        (the usual path finds out the same), None if it sent nothing by the deadline."""
        loop = asyncio.get_running_loop()
        sock = connection.sock
        assert sock is not None
        readable: asyncio.Future[None] = loop.create_future()
        loop.add_reader(sock.fileno(), lambda: readable.done() or readable.set_result(None))
        try:
            async with asyncio.timeout_at(connection.deadline):
                await readable
        except TimeoutError:
            return None
        finally:
            loop.remove_reader(sock.fileno())
        try:
            return sock.recv(1, socket.MSG_PEEK)
        except OSError:
            return b""  # reset: the usual path sees it too

    async def _serve_lane(self, connection: _Connection) -> None:
        """A further connection of a migration (it began with the lane preamble): a thread of its
        own does its TLS handshake and reads JOIN, the migration it names verifies JOIN, and the
        thread receives its page frames until the migration no longer needs it."""
        loop = asyncio.get_running_loop()
        sock, connection.sock = connection.sock, None
        assert sock is not None
        receiver = LaneReceiver(sock, connection.peer)  # from here it closes the socket
        try:
            # The thread's steps have the same deadline; this bound holds whatever the thread does.
            async with asyncio.timeout_at(connection.deadline + WIND_DOWN_S):
                join = await receiver.open(self._ssl, connection.deadline - loop.time())
        except TimeoutError:  # StreamTimeout included
            what = Refusal.TLS_TIMEOUT if self._ssl is not None and not receiver.tls_established else \
                Refusal.HANDSHAKE_TIMEOUT
            self._refuse_connection(connection, what, f"not authenticated within {self.handshake_timeout_s:g} s")
            return
        except ProtocolError as exc:
            self._refuse_connection(connection, Refusal.PROTOCOL_ERROR, str(exc))
            return
        except StreamClosed as exc:
            self._refuse_connection(connection, Refusal.CLOSED_BEFORE_AUTHENTICATION, str(exc))
            return
        except OSError as exc:  # ssl.SSLError included
            self._refuse_connection(connection, *_handshake_refusal(exc))
            return
        admit = self.host.lane_servers.get(join.migration_id)
        try:
            if admit is None:
                raise dest.IncomingRefused(f"JOIN for migration {printable(join.migration_id)}, which takes no "
                                           f"further connections here (unknown, finished, or of one connection)")
            ended = admit(receiver, join)
        except (PeerProtocolError, dest.IncomingRefused) as exc:  # AuthenticationError included
            receiver.refuse(str(exc))
            self._refuse_connection(connection, Refusal.SESSION_REFUSED, printable(str(exc), 1024))
            return
        except StreamClosed as exc:  # its thread stopped waiting for the answer meanwhile
            self._refuse_connection(connection, Refusal.CLOSED_BEFORE_AUTHENTICATION, str(exc))
            return
        self._settle(connection)
        try:
            await ended
        finally:
            receiver.stop()

    async def _watch(self, connection: _Connection, serving: asyncio.Task[MigrationProgress | None]) -> None:
        """Settle the connection once its session authenticates the peer; close it at the deadline otherwise.

        The session's own handshake timeout is not relied on: the listener's bound holds
        whatever the session does.
        """
        proto = connection.proto
        assert proto is not None
        try:
            async with asyncio.timeout_at(connection.deadline):
                await proto.authenticated.wait()
        except TimeoutError:
            self._refuse_connection(connection, Refusal.HANDSHAKE_TIMEOUT,
                                    f"not authenticated within {self.handshake_timeout_s:g} s")
            proto.abort()  # the session sees the stream lost and ends
            _, left = await asyncio.wait({serving}, timeout=WIND_DOWN_S)
            if left:
                log.error("incoming connection peer=%s: session still running %.0f s after its stream was "
                          "closed; cancelling it", connection.peer, WIND_DOWN_S)
                serving.cancel()
            return
        self._settle(connection)

    def _served(self, task: asyncio.Task[MigrationProgress | None]) -> None:
        """Done callback of a connection's task: forget it, settle it, close what it never handed over."""
        connection = self._connections.pop(task)
        if connection.sock is not None:  # cancelled before it started (close())
            connection.sock.close()
            connection.sock = None
        connection.proto = None
        self._settle(connection)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("incoming connection peer=%s failed unexpectedly", connection.peer, exc_info=exc)

    # -- accounting
    def _settle(self, connection: _Connection) -> None:
        """Stop counting the connection as pending (exactly once: authenticated, or over)."""
        if not connection.settled:
            connection.settled = True
            self._pending -= 1

    def _ended_before_authentication(self, connection: _Connection, session_refusal: str | None) -> None:
        """The session ended before authentication: count it, unless it ended as it should (a
        RESOLVE answered). ``session_refusal``: why the session refused the peer, if it did; counted
        and logged here, rate-limited, as every other refusal of an unauthenticated peer."""
        proto = connection.proto
        assert proto is not None
        reason = proto.close_reason
        if isinstance(reason, ProtocolError):
            self._refuse_connection(connection, Refusal.PROTOCOL_ERROR, str(reason))
        elif session_refusal is not None:
            self._refuse_connection(connection, Refusal.SESSION_REFUSED, session_refusal)
        elif proto.closed_by_peer:
            self._refuse_connection(connection, Refusal.CLOSED_BEFORE_AUTHENTICATION, str(reason))

    def _refuse_connection(self, connection: _Connection, reason: Refusal, detail: str) -> None:
        connection.refused = reason
        self._refuse(connection.peer, reason, detail)

    def _refuse(self, peer: str, reason: Refusal, detail: str) -> None:
        self.refused[reason] += 1
        self._refusal_log.note(reason, peer, detail)


def _peer_name(address: object) -> str:
    """``host:port`` of an accepted peer (IPv6 addresses come as 4-tuples)."""
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address)


async def _listening_sockets(address: str, port: int) -> list[socket.socket]:
    """Non-blocking listening sockets on every address ``address`` resolves to, as create_server binds.

    With port 0 the first socket picks a free port and the others take the same one.
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(RESOLVE_TIMEOUT_S):
        infos = await loop.getaddrinfo(address or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    seen: set[tuple[int, object]] = set()
    try:
        for family, kind, protocol, _, sockaddr in infos:
            if (family, sockaddr) in seen:
                continue
            seen.add((family, sockaddr))
            sock = socket.socket(family, kind, protocol)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # One socket per family (IPv4 on its own): as create_server, so "::" and
                # "0.0.0.0" from the same name do not collide.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:
                sockaddr = (sockaddr[0], sockets[0].getsockname()[1], *sockaddr[2:])
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {sockaddr!r}: {exc.strerror}") from None
            sock.listen(_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(f"migration listen address {address!r} resolves to no address")
    return sockets
