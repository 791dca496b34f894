"""The migration listener's bounds before authentication (migd/listener.py), on a real socket.

A real listener on 127.0.0.1 with a real ``Host`` (firmware identity under a test CA, no
guests) takes hundreds of connections that never authenticate: garbage, silence, TLS clients
without a certificate or with one from another CA, frames too large for an unauthenticated
peer. What it holds afterwards is measured three ways: the listener's own count of live
connection tasks and receive-buffer bytes, the ``FrameProtocol`` objects and asyncio tasks
alive in the process, and its RSS. The negative control runs the same measurement against
the former listener's connection handling (``create_server(ssl=...)`` and a task waiting for
``connection_made`` without a deadline) and sees every failed handshake stay behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import re
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

from migd import dest, lane_receiver, listener, wire
from migd.platform import identity
from migd.errors import MigdError
from migd.host import Host
from migd.listener import MigrationListener, Refusal
from migd.messages import GuestSpec
from migd.platform.pki_verify import tls_client_context, tls_server_context
from migd.platform.psp import PspFirmware
from migd.stream import MAX_FRAME_BEFORE_AUTHENTICATION, FrameProtocol

try:
    _MALLOC_TRIM = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
except OSError:  # no C library by that name: RSS is then read untrimmed
    _MALLOC_TRIM = None
LANE_THREAD = lane_receiver.THREAD_NAME
WAIT = 10.0  # bound on every wait of a client or for the listener to settle (never reached when things work)
SHORT_HANDSHAKE_S = 1.0  # the listener's handshake_timeout_s in these tests
MiB = 1 << 20

pytestmark = pytest.mark.fault_class("attack: unauthenticated connections to the migration listener")


# ---------------------------------------------------------------------- set-up


@dataclass(frozen=True)
class Pki:
    """The destination host's TLS files, a client of the same owner CA, and a rogue client."""

    root: Path

    def files(self, name: str) -> tuple[Path, Path, Path]:
        host = self.root / name
        return self.root / "ca" / identity.CA_CERT, host / identity.TLS_CERT, host / identity.TLS_KEY

    def server(self) -> ssl.SSLContext:
        return tls_server_context(*self.files("hostA"))

    def client(self) -> ssl.SSLContext:
        return tls_client_context(*self.files("hostB"))

    def rogue(self) -> ssl.SSLContext:
        """A client whose certificate comes from another CA (it trusts ours, to get as far as it can)."""
        ca, _, _ = self.files("hostA")
        _, cert, key = self.files("rogue")
        return tls_client_context(ca, cert, key)

    def anonymous(self) -> ssl.SSLContext:
        """A client with no certificate at all."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cafile=self.files("hostA")[0])
        return context


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    for name in ("hostA", "hostB"):
        identity.init_host(tmp_path / name, tmp_path / "ca", common_name=name)
    identity.init_host(tmp_path / "rogue", tmp_path / "rogue-ca", common_name="hostB")
    return Pki(tmp_path)


@pytest.fixture
def host(pki: Pki) -> Host:
    """The cheapest real destination: firmware and registry, no guests, no journal."""
    state = pki.root / "hostA"
    firmware = PspFirmware.from_state_dir(state, [pki.root / "ca" / identity.CA_CERT])
    return Host(state, firmware, runtime_dir=pki.root / "run")


def run(main: Callable[[], Coroutine[Any, Any, None]], loop: str = "asyncio") -> None:
    """The daemon runs on uvloop; the engine tests on asyncio: the listener must hold on both."""
    (uvloop.run if loop == "uvloop" else asyncio.run)(main())


# ---------------------------------------------------------------------- measurements


def rss_mib() -> float:
    """VmRSS, after handing the allocator's free memory back to the kernel.

    glibc keeps freed heap memory (a TLS connection frees ~256 KiB of asyncio's SSL buffer, a
    client's as well), so without the trim RSS shows the high-water mark of a wave of
    connections rather than what is still held.
    """
    gc.collect()
    if _MALLOC_TRIM is not None:  # glibc's; other C libraries have none
        _MALLOC_TRIM(0)
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@dataclass(frozen=True)
class Held:
    """What the process holds for migration streams: protocols alive, their receive buffers, tasks."""

    protocols: int
    buffer_bytes: int
    tasks: int
    threads: int  # further connections' receivers (migd/lane_receiver.py): a thread each

    @classmethod
    def now(cls) -> Held:
        gc.collect()
        protocols = [o for o in gc.get_objects() if isinstance(o, FrameProtocol)]
        return cls(len(protocols), sum(p.receive_buffer_bytes for p in protocols), len(asyncio.all_tasks()),
                   sum(t.name == LANE_THREAD for t in threading.enumerate()))


async def settled(lst: MigrationListener) -> None:
    """Until the listener holds no connection (bounded)."""
    async with asyncio.timeout(WAIT):
        while lst.live_connections or lst.pending_connections:
            await asyncio.sleep(0.02)


async def released(before: Held) -> Held:
    """What is held once it is ``before`` again (TimeoutError after WAIT).

    A session that refused its peer closes gracefully: its transport (and protocol) lingers
    until the peer closes too, at most LINGER_S (migd/stream.py), after its task has ended.
    """
    async with asyncio.timeout(WAIT):
        while (held := Held.now()) != before:
            await asyncio.sleep(0.1)
    return held


# ---------------------------------------------------------------------- clients that never authenticate


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """Read until the listener closes the connection; what it sent (an ABORT frame, or nothing)."""
    data = b""
    try:
        while chunk := await reader.read(65536):
            data += chunk
    except (OSError, asyncio.IncompleteReadError):  # reset, or a TLS alert
        pass
    return data


async def _client(port: int, kind: str, pki: Pki, tls: bool) -> bytes:
    """One connection of ``kind`` that fails to authenticate; returns what the listener sent."""
    contexts = {"anonymous": pki.anonymous, "rogue": pki.rogue, "tls-then-silence": pki.client}
    async with asyncio.timeout(WAIT):
        if kind.startswith("lane-"):
            return await _lane_client(port, kind.removeprefix("lane-"), pki, tls)
        if kind in contexts:
            try:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=contexts[kind](), server_hostname="hostA")
            except OSError:  # refused during the handshake (TLS 1.2 behaviour): fine too
                return b""
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            if kind == "garbage":
                writer.write(b"GET / HTTP/1.0\r\nHost: migd\r\n\r\n" if tls else b"\x00\x00\x00\x09\x2a" + b"\xff" * 64)
            elif kind == "zeros":
                writer.write(bytes(300))
            elif kind == "huge-frame":
                # A PRIVATE_PAGES frame announcing 512 pages (2 MiB) before authentication: the
                # prefix alone must end it (the rest never comes).
                length = 1 + 2 + 16 + 512 * 4096 + 4
                writer.write(struct.pack(">IBH", length, wire.FrameType.PRIVATE_PAGES, 16) + bytes(16) + bytes(4096))
            elif kind == "close-at-once":
                writer.close()
                return b""
            # "silence", "tls-then-silence", "anonymous", "rogue": say nothing; TLS 1.3 reports a
            # refused client certificate after the client's side of the handshake, on the next read.
            return await _until_closed(reader)
        finally:
            writer.close()


async def _lane_client(port: int, kind: str, pki: Pki, tls: bool) -> bytes:
    """One further connection (it opens with the lane preamble) of ``kind`` that fails to
    authenticate; returns what the listener sent."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if kind == "garbage":
            writer.write(wire.LANE_PREAMBLE[:4] + b"\xff" * 64)  # its first byte is the preamble's, the rest not
            return await _until_closed(reader)
        writer.write(wire.LANE_PREAMBLE)
        if kind == "anonymous":
            try:
                await writer.start_tls(pki.anonymous(), server_hostname="hostA")
            except OSError:  # refused during the handshake: fine too
                return b""
        elif tls:
            await writer.start_tls(pki.client(), server_hostname="hostA")
        if kind == "huge-frame":
            length = 1 + 2 + 16 + 512 * 4096 + 4
            writer.write(struct.pack(">IBH", length, wire.FrameType.PRIVATE_PAGES, 16) + bytes(16) + bytes(4096))
        elif kind == "unknown-join":
            writer.write(wire.encode_bytes(wire.Join("no-such-migration", 1, bytes(wire.MAC_SIZE))))
        # "silence": the preamble (and TLS), then nothing.
        return await _until_closed(reader)
    finally:
        writer.close()


PLAIN_KINDS = ("garbage", "zeros", "huge-frame", "silence", "close-at-once",
               "lane-garbage", "lane-huge-frame", "lane-unknown-join", "lane-silence")
TLS_KINDS = ("garbage", "zeros", "anonymous", "rogue", "silence", "tls-then-silence", "close-at-once",
             "lane-anonymous", "lane-unknown-join", "lane-silence")


async def _flood(port: int, pki: Pki, tls: bool, n: int, concurrency: int = 60) -> list[bytes]:
    """``n`` failing connections of every kind in turn, ``concurrency`` at a time: a leak grows
    with ``n``, the allocator's high-water mark only with ``concurrency``."""
    kinds = TLS_KINDS if tls else PLAIN_KINDS
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> bytes:
        async with slots:
            return await _client(port, kinds[i % len(kinds)], pki, tls)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def _expected_refusals(tls: bool, n: int) -> dict[str, int]:
    """How many of each kind ``_flood`` opens."""
    kinds = TLS_KINDS if tls else PLAIN_KINDS
    return {kind: len(range(i, n, len(kinds))) for i, kind in enumerate(kinds)}


# ---------------------------------------------------------------------- the leak, fixed


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_connections_that_never_authenticate_leave_nothing_behind(host: Host, pki: Pki, tls: bool, loop: str) -> None:
    """300 connections fail in every way: afterwards no task, protocol or buffer is left and RSS is flat."""
    n = 300

    async def main() -> None:
        lst = MigrationListener(host, ssl_context=pki.server() if tls else None, client_ssl=pki.client(),
                                max_pending=1000, handshake_timeout_s=SHORT_HANDSHAKE_S)
        port = await lst.start("127.0.0.1", 0)
        try:
            await _flood(port, pki, tls, 120)  # warm-up: OpenSSL tables, code paths, allocator arenas
            await settled(lst)
            # Receivers of earlier tests in this process may still be ending (a refusal lingers):
            # from none, so that one left over here shows.
            async with asyncio.timeout(WAIT):
                while any(t.name == LANE_THREAD for t in threading.enumerate()):
                    await asyncio.sleep(0.05)
            before, rss_before = Held.now(), rss_mib()
            lst.refused.clear()

            sent = await _flood(port, pki, tls, n)
            await settled(lst)
            try:
                after = await released(before)
            except TimeoutError:
                after = Held.now()
            rss_after = rss_mib()
            print(f"\n{loop} {'tls' if tls else 'plain'}: {n} failed connections: RSS {rss_before:.1f} -> "
                  f"{rss_after:.1f} MiB; held before {before}, after {after}; refused {dict(lst.refused)}")
        finally:
            await lst.close()

        assert lst.pending_connections == 0 and lst.receive_buffer_bytes == 0
        assert after == before, "a failed connection left a protocol, a buffer or a task behind"
        assert rss_after - rss_before < 20, f"RSS grew by {rss_after - rss_before:.1f} MiB"
        # Every connection was refused, and for the reason its kind gives.
        kinds = _expected_refusals(tls, n)
        assert sum(lst.refused.values()) == n, lst.refused
        assert lst.refused[Refusal.CAPACITY] == 0
        if tls:
            # Silence never finishes TLS; a client that did and then says nothing is not authenticated.
            assert lst.refused[Refusal.TLS_TIMEOUT] == kinds["silence"]
            assert lst.refused[Refusal.HANDSHAKE_TIMEOUT] == kinds["tls-then-silence"] + kinds["lane-silence"]
            # Garbage and zeros are not TLS; the anonymous and the rogue client fail the handshake
            # from the listener's side (their own side may have finished before the refusal).
            assert lst.refused[Refusal.TLS_NOT_TLS] == kinds["garbage"] + kinds["zeros"]
            assert lst.refused[Refusal.TLS_NO_CLIENT_CERTIFICATE] == kinds["anonymous"] + kinds["lane-anonymous"]
            assert lst.refused[Refusal.TLS_UNKNOWN_CA] == kinds["rogue"]
            assert lst.refused[Refusal.SESSION_REFUSED] == kinds["lane-unknown-join"]
        else:
            assert lst.refused[Refusal.HANDSHAKE_TIMEOUT] == kinds["silence"] + kinds["lane-silence"]
            assert lst.refused[Refusal.PROTOCOL_ERROR] == (kinds["garbage"] + kinds["zeros"] + kinds["huge-frame"]
                                                           + kinds["lane-garbage"] + kinds["lane-huge-frame"])
            # A peer that closes at once ends its session before HELLO: the session refused it.
            assert lst.refused[Refusal.SESSION_REFUSED] == kinds["lane-unknown-join"] + kinds["close-at-once"]
            # A JOIN for no migration here is answered: no such migration takes further connections.
            unknown = sent[PLAIN_KINDS.index("lane-unknown-join")::len(PLAIN_KINDS)]
            assert all(isinstance(m[0], wire.Abort) and "takes no further connections" in m[0].reason
                       for m in (wire.FrameDecoder().feed(data) for data in unknown)), unknown[:1]
            # The huge frame was refused by its prefix: the ABORT says so.
            huge = sent[PLAIN_KINDS.index("huge-frame")::len(PLAIN_KINDS)]
            aborts = [wire.FrameDecoder().feed(data) for data in huge]
            assert all(isinstance(m[0], wire.Abort) and f"at most {MAX_FRAME_BEFORE_AUTHENTICATION}" in m[0].reason
                       for m in aborts), aborts[:1]

    run(main, loop)


class _ListenerAsItWas:
    """The former listener's connection handling, kept as the negative control: ``create_server``
    with the TLS context, a ``FrameProtocol`` per connection and a task that waits for its
    ``connection_made`` without a deadline (a failed handshake never calls it)."""

    def __init__(self, ssl_context: ssl.SSLContext | None) -> None:
        self._ssl = ssl_context
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.get_running_loop().create_server(self._connection, "127.0.0.1", 0, ssl=self._ssl)
        return int(self._server.sockets[0].getsockname()[1])

    def _connection(self) -> FrameProtocol:
        proto = FrameProtocol()

        async def serve() -> None:
            await proto.connected.wait()
            proto.close()

        task = asyncio.get_running_loop().create_task(serve())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return proto

    async def close(self) -> None:
        self._server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def test_negative_control_the_measurement_sees_the_former_leak(pki: Pki) -> None:
    """The same failed TLS handshakes against the former handling: each leaves its task and protocol."""
    n = 50

    async def main() -> None:
        old = _ListenerAsItWas(pki.server())
        port = await old.start()
        try:
            before = Held.now()
            kinds = ("garbage", "anonymous", "rogue", "close-at-once")
            await asyncio.gather(*(_client(port, kinds[i % len(kinds)], pki, True) for i in range(n)))
            await asyncio.sleep(0.3)  # what would have ended has ended
            after = Held.now()
            print(f"\nformer listener: {n} failed handshakes: held before {before}, after {after}")
            assert after.tasks - before.tasks == n and len(old.tasks) == n
            assert after.protocols - before.protocols == n
            assert after.buffer_bytes - before.buffer_bytes >= n * 64 * 1024
        finally:
            await old.close()

    run(main)


# ---------------------------------------------------------------------- the cap


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
@pytest.mark.parametrize("max_pending", [3, 100])
def test_past_max_pending_a_connection_is_closed_at_once_and_counted(
    host: Host, pki: Pki, tls: bool, max_pending: int, caplog: pytest.LogCaptureFixture
) -> None:
    """With max_pending=3 the 4th..10th silent connection is closed at once (counted "capacity",
    logged rate-limited); once the first three time out, a new one is taken again. With 100
    (the negative control) the same seven wait for their handshake deadline like the rest."""
    caplog.set_level(logging.WARNING, logger="migd.listener")
    # A silent peer on the TLS port never finishes its TLS handshake; on the plain one, the session's.
    timeout = Refusal.TLS_TIMEOUT if tls else Refusal.HANDSHAKE_TIMEOUT

    async def main() -> None:
        lst = MigrationListener(host, ssl_context=pki.server() if tls else None, max_pending=max_pending,
                                handshake_timeout_s=SHORT_HANDSHAKE_S)
        port = await lst.start("127.0.0.1", 0)
        loop = asyncio.get_running_loop()
        try:
            first = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            async with asyncio.timeout(WAIT):
                while lst.pending_connections < 3:
                    await asyncio.sleep(0.01)
            started = loop.time()
            extra = [await asyncio.open_connection("127.0.0.1", port) for _ in range(7)]
            ends = await asyncio.gather(*(_until_closed(reader) for reader, _ in extra))
            waited = loop.time() - started
            assert ends == [b""] * 7
            if max_pending == 3:
                assert waited < SHORT_HANDSHAKE_S / 2, f"refused connections stayed open {waited:.2f} s"
                assert lst.refused == {Refusal.CAPACITY: 7} and lst.pending_connections == 3
            else:
                assert waited >= SHORT_HANDSHAKE_S * 0.9
                assert lst.refused[Refusal.CAPACITY] == 0 and lst.refused[timeout] >= 7
            # The first three time out; then a new connection is taken (pending, not refused).
            assert [await _until_closed(reader) for reader, _ in first] == [b""] * 3
            await settled(lst)
            assert lst.refused[timeout] == (3 if max_pending == 3 else 10)
            capacity = lst.refused[Refusal.CAPACITY]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            async with asyncio.timeout(WAIT):
                while lst.pending_connections < 1:
                    await asyncio.sleep(0.01)
            assert lst.refused[Refusal.CAPACITY] == capacity
            for _, w in (*first, *extra, (reader, writer)):
                w.close()
        finally:
            await lst.close()

        # One warning line per reason per REFUSAL_LOG_INTERVAL_S at most; each says how many it
        # held back, and close() reports the rest: every refusal is accounted for.
        lines = [r.getMessage() for r in caplog.records if r.name == "migd.listener"]
        refusal_lines = [line for line in lines if line.startswith("incoming connection refused ")]
        held_back = sum(int(m.group(1)) for line in lines if (m := re.search(r"suppressed=(\d+)", line)))
        # The whole test takes less than the interval: one line per reason that occurred.
        assert sorted(re.search(r"reason=(\S+)", line).group(1) for line in refusal_lines) == sorted(lst.refused)
        assert len(refusal_lines) + held_back == sum(lst.refused.values())

    run(main)


# ---------------------------------------------------------------------- the deadline holds whatever the session does


class _StubbornSession:
    """A session that would wait an hour for the peer's first frame."""

    def __init__(self, host: Host, proto: FrameProtocol, peer: str, **_: Any) -> None:
        self.proto = proto

    async def run(self) -> None:
        try:
            await self.proto.receive(3600)
        except MigdError:
            pass
        finally:
            self.proto.close()


class _DeafSession(_StubbornSession):
    """A session that ignores its stream altogether."""

    async def run(self) -> None:
        await asyncio.sleep(3600)


@pytest.fixture
def short_wind_down(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(listener, "WIND_DOWN_S", 0.3)
    yield


@pytest.mark.parametrize("session", [_StubbornSession, _DeafSession], ids=["stubborn", "deaf"])
def test_the_listener_closes_an_unauthenticated_connection_whatever_its_session_does(
    host: Host, pki: Pki, session: type, monkeypatch: pytest.MonkeyPatch, short_wind_down: None
) -> None:
    """The session's own handshake timeout is not relied on: at the listener's deadline the
    stream is closed, and a session that does not end then is cancelled (WIND_DOWN_S later)."""
    monkeypatch.setattr(dest, "IncomingMigration", session)

    async def main() -> None:
        lst = MigrationListener(host, max_pending=5, handshake_timeout_s=SHORT_HANDSHAKE_S)
        port = await lst.start("127.0.0.1", 0)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            closed = await asyncio.gather(*(_client(port, "silence", pki, False) for _ in range(5)))
            # Closed at the listener's deadline (the slack is for a busy machine; the session
            # alone would have waited an hour).
            assert closed == [b""] * 5 and loop.time() - started < SHORT_HANDSHAKE_S + 2
            await settled(lst)
            assert loop.time() - started < SHORT_HANDSHAKE_S + listener.WIND_DOWN_S + 2
            assert lst.refused == {Refusal.HANDSHAKE_TIMEOUT: 5}
        finally:
            await lst.close()

    run(main)


def test_an_authenticated_connection_is_no_longer_pending_nor_bounded(host: Host, pki: Pki,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """mark_authenticated() (what the session calls once SESSION verifies) takes the connection
    out of the pending count at once and past the handshake deadline; the stream then takes a
    2 MiB frame it refused before."""

    received: list[wire.Message] = []

    class TrustingSession(_StubbornSession):
        async def run(self) -> None:
            self.proto.set_page_handler(lambda msg: received.append(wire.detached(msg)), threaded=False)
            self.proto.mark_authenticated()
            try:
                received.append(await self.proto.receive(WAIT))  # the peer's first frame
                received.append(await self.proto.receive(WAIT))
            finally:
                self.proto.close()

    monkeypatch.setattr(dest, "IncomingMigration", TrustingSession)

    async def main() -> None:
        lst = MigrationListener(host, max_pending=1, handshake_timeout_s=0.3)
        port = await lst.start("127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            encoder = wire.FrameEncoder()
            # A peer speaks first (HELLO, RESOLVE, a TLS ClientHello): the listener waits for that.
            writer.write(encoder.encode_bytes(wire.RoundEnd(0, 0)))
            async with asyncio.timeout(WAIT):  # accepted, then authenticated by its session
                while not (lst.live_connections == 1 and lst.pending_connections == 0):
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # past the handshake deadline: still open
            assert lst.live_connections == 1 and not lst.refused
            writer.write(encoder.encode_bytes(wire.SharedPages(0, 512, bytes(512 * 4096)))
                         + encoder.encode_bytes(wire.RoundEnd(0, 0)))
            await _until_closed(reader)
            writer.close()
            await settled(lst)
        finally:
            await lst.close()
        assert [type(m).__name__ for m in received] == ["RoundEnd", "SharedPages", "RoundEnd"]
        assert not lst.refused

    run(main)


# ---------------------------------------------------------------------- a refused TLS peer: its reason, its log line, its alert


#: kind of peer → (the listener's refusal reason, the alert the peer receives: OpenSSL's reason code of it)
TLS_PEERS: dict[str, tuple[Refusal, str | None]] = {
    "anonymous": (Refusal.TLS_NO_CLIENT_CERTIFICATE, "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
    "rogue": (Refusal.TLS_UNKNOWN_CA, "TLSV1_ALERT_UNKNOWN_CA"),
    "tls1.2": (Refusal.TLS_VERSION, "TLSV1_ALERT_PROTOCOL_VERSION"),
    "plain-migd": (Refusal.TLS_NOT_TLS, None),  # a source without [tls]: its HELLO frame is no ClientHello
}


def _tls12_client(pki: Pki) -> ssl.SSLContext:
    """A client with our CA's certificate that speaks TLS 1.2 at most."""
    context = pki.client()
    context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
    return context


async def _refused_peer(port: int, kind: str, pki: Pki) -> tuple[str, str | None]:
    """One peer of ``kind``; returns its address as the listener sees it, and the reason code of
    the TLS alert it received (None: the connection just ended)."""
    contexts = {"anonymous": pki.anonymous, "rogue": pki.rogue, "tls1.2": lambda: _tls12_client(pki)}
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    sock.setblocking(False)
    address = "%s:%d" % sock.getsockname()[:2]
    async with asyncio.timeout(WAIT):
        if kind == "plain-migd":
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(wire.FrameEncoder().encode_bytes(wire.Abort("a HELLO would do as well")))
        else:
            try:
                reader, writer = await asyncio.open_connection(sock=sock, ssl=contexts[kind](),
                                                               server_hostname="hostA")
            except ssl.SSLError as exc:  # refused within the handshake (TLS 1.2: the version)
                return address, exc.reason
            except OSError:  # the connection just ended (reset, EOF): no alert
                return address, None
        try:
            await _until_closed_raising(reader)
        except ssl.SSLError as exc:  # TLS 1.3: the refusal of our certificate comes after our Finished
            return address, exc.reason
        finally:
            writer.close()
    return address, None


async def _until_closed_raising(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionResetError):
        while await reader.read(65536):
            pass


def check_refusal(kind: str, lst: MigrationListener, caplog: pytest.LogCaptureFixture, peer: str,
                  alert: str | None) -> None:
    """The refusal of one ``kind`` peer: counted by its reason, logged with its address and
    reason, and the peer got the alert that says why."""
    reason, expected_alert = TLS_PEERS[kind]
    assert dict(lst.refused) == {reason: 1}, lst.refused
    lines = [r.getMessage() for r in caplog.records
             if r.name == "migd.listener" and r.getMessage().startswith("incoming connection refused ")]
    assert len(lines) == 1 and f"reason={reason} peer={peer} " in lines[0], lines
    assert alert == expected_alert, f"the peer received {alert}, expected {expected_alert}"


def _serve_refused_peer(host: Host, pki: Pki, kind: str, loop: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="migd.listener")

    async def main() -> None:
        lst = MigrationListener(host, ssl_context=pki.server(), max_pending=5, handshake_timeout_s=WAIT)
        port = await lst.start("127.0.0.1", 0)
        try:
            peer, alert = await _refused_peer(port, kind, pki)
            await settled(lst)
        finally:
            await lst.close()
        check_refusal(kind, lst, caplog, peer, alert)

    run(main, loop)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("kind", list(TLS_PEERS))
def test_a_refused_tls_peer_is_counted_and_logged_with_its_reason_and_gets_its_alert(
    host: Host, pki: Pki, kind: str, loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    _serve_refused_peer(host, pki, kind, loop, caplog)


@pytest.mark.parametrize("kind", ["anonymous", "rogue", "tls1.2"])
@pytest.mark.parametrize("former", ["alert", "reason"])
def test_negative_control_the_check_catches_the_former_listener(
    host: Host, pki: Pki, kind: str, former: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same check against the former behaviour, one part at a time: the SSL protocol's own
    SSLObject (the alert dropped: the peer saw a bare EOF), or every failure counted as
    "tls-handshake" with OpenSSL's text. Either way the check fails."""
    if former == "alert":
        monkeypatch.setattr(listener, "_AlertingSSLObject", ssl.SSLObject)
    else:
        monkeypatch.setattr(listener, "tls_refusal", lambda exc: (Refusal.TLS_HANDSHAKE, str(exc)))
    with pytest.raises(AssertionError):
        _serve_refused_peer(host, pki, kind, "asyncio", caplog)


def test_a_refused_tls_handshake_that_never_finishes_is_a_tls_timeout(host: Host, pki: Pki) -> None:
    """Silence on the TLS port: "tls-timeout", no alert (there is nothing to answer)."""

    async def main() -> None:
        lst = MigrationListener(host, ssl_context=pki.server(), max_pending=5, handshake_timeout_s=SHORT_HANDSHAKE_S)
        port = await lst.start("127.0.0.1", 0)
        try:
            assert await _client(port, "silence", pki, True) == b""
            await settled(lst)
        finally:
            await lst.close()
        assert dict(lst.refused) == {Refusal.TLS_TIMEOUT: 1}

    run(main)


class _GlobalRefusalLog(listener._RefusalLog):
    """The former rate limit: one line per interval for all reasons together."""

    def note(self, reason: Refusal, peer: str, detail: str) -> None:
        super().note(Refusal.CAPACITY, peer, f"{reason} {detail}")  # one key: one shared limit


@pytest.mark.parametrize("log_class", [listener._RefusalLog, _GlobalRefusalLog], ids=["per-reason", "former"])
def test_a_flood_of_one_refusal_does_not_hide_another(log_class: type, caplog: pytest.LogCaptureFixture) -> None:
    """Fifty port-scanner refusals, then the one misconfigured peer: its reason is logged at once.
    The former, global limit (the negative control) holds that line back."""
    caplog.set_level(logging.WARNING, logger="migd.listener")
    refusals = log_class(60.0)
    for i in range(50):
        refusals.note(Refusal.TLS_NOT_TLS, f"192.0.2.1:{1000 + i}", "http request")
    refusals.note(Refusal.TLS_UNKNOWN_CA, "192.0.2.7:4242", "verify error 20")
    logged = "reason=tls-unknown-ca peer=192.0.2.7:4242" in caplog.text
    assert logged == (log_class is listener._RefusalLog)
    refusals.flush()
    assert "reason=tls-not-tls suppressed=49" in caplog.text or log_class is _GlobalRefusalLog


@pytest.mark.parametrize("former", [False, True], ids=["listener", "negative-control-former-session-log"])
def test_hellos_the_session_refuses_are_counted_and_their_log_is_bounded(
    host: Host, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, former: bool,
) -> None:
    """Twenty unauthenticated HELLOs of another protocol version: each is counted as
    ``session-refused``, the log says so once per 5 s (not once per connection)."""
    if former:  # the session logged every refusal itself, and the listener counted none
        original = dest.IncomingMigration._fail

        async def fail_as_before(self: dest.IncomingMigration, reason: str) -> None:
            logging.getLogger("migd.dest").warning("incoming migration from=%s failed: %s", self.peer, reason)
            await original(self, reason)
            self.refused_before_authentication = None

        monkeypatch.setattr(dest.IncomingMigration, "_fail", fail_as_before)
    n = 20

    async def main() -> MigrationListener:
        lst = MigrationListener(host, handshake_timeout_s=5)
        port = await lst.start("127.0.0.1", 0)
        try:
            for i in range(n):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                hello = wire.Hello(f"m{i}", GuestSpec("g1", 256, 0), host.firmware.transport_mode.value, version=99)
                writer.write(wire.encode_bytes(hello, 0))
                await writer.drain()
                await asyncio.wait_for(_until_closed(reader), 5)
                writer.close()
            await settled(lst)
        finally:
            await lst.close()
        return lst

    with caplog.at_level(logging.WARNING):
        lst = asyncio.run(main())
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    if former:
        assert lst.refused[Refusal.SESSION_REFUSED] == 0 and len(warnings) >= n, len(warnings)
        return
    assert lst.refused[Refusal.SESSION_REFUSED] == n, dict(lst.refused)
    assert len(warnings) <= 2, [r.getMessage() for r in warnings]
    assert "reason=session-refused" in warnings[0].getMessage()
    assert "protocol version mismatch" in warnings[0].getMessage()
