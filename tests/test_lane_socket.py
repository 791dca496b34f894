"""A further connection's blocking socket (migd/lane_socket.py), against a peer thread on 127.0.0.1.

What the source relies on when a connection's own thread opens and writes it: the frames arrive
intact and in order (the peer's decoder checks every CRC and sequence number), plain and over
mutual TLS; JOINED is awaited within the handshake timeout; an ABORT or an oversized answer is
refused; a lost peer fails the write; and :meth:`LaneSocket.shutdown` ends a blocking connect
wait or write at once, from another thread, which is how the migration's end stops a thread
whose peer stopped reading (each with its control: without the shutdown the call stays blocked).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from migd import wire
from migd.abi import PAGE_SIZE
from migd.errors import PeerAborted, ProtocolError
from migd.lane_socket import WRITE_POLL_S, LaneSocket
from migd.send_lane import RUN_BYTES, SendLane
from migd.platform import identity
from migd.platform.pki_verify import tls_client_context, tls_server_context
from migd.stream import StreamClosed, StreamTimeout

JOIN = wire.Join("m-test", 1, bytes(wire.MAC_SIZE))
JOINED = wire.encode_bytes(wire.Joined(1, bytes(wire.MAC_SIZE)))
RUN = wire.MAX_RUN_PAGES


class Peer:
    """The destination's end of one further connection, in a thread: reads the lane preamble (in
    the clear) and JOIN, answers with
    ``answer`` (None: never), then reads and decodes every frame (``reading``) or stops reading."""

    def __init__(self, answer: bytes | None = JOINED, *, tls: ssl.SSLContext | None = None, reading: bool = True,
                 reset_after_answer: bool = False) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = self.server.getsockname()
        self.answer, self.tls, self.reading, self.reset = answer, tls, reading, reset_after_answer
        self.join_seen = threading.Event()
        self.frames: list[wire.Message] = []
        self.error: BaseException | None = None
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.server.settimeout(10)
            conn, _ = self.server.accept()
            conn.settimeout(10)
            preamble = b""
            while len(preamble) < len(wire.LANE_PREAMBLE) and (data := conn.recv(len(wire.LANE_PREAMBLE) - len(preamble))):
                preamble += data
            if preamble != wire.LANE_PREAMBLE:
                raise ProtocolError(f"the connection began with {preamble!r}, not the lane preamble")
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            self.conn = conn
            decoder = wire.FrameDecoder()
            while not self.frames:
                self.frames += decoder.feed(conn.recv(65536))
            self.join_seen.set()
            if self.answer is None:
                return
            conn.sendall(self.answer)
            if self.reset:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()
                return
            while self.reading and (data := conn.recv(1 << 20)):
                self.frames += decoder.feed(data)
        except (OSError, ProtocolError) as exc:
            self.error = exc

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()
        self.thread.join(10)


@pytest.fixture
def tls(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(the destination's server context, the source's client context), one owner CA."""
    for name in ("hostA", "hostB"):
        identity.init_host(tmp_path / name, tmp_path / "ca", common_name=name)

    def files(name: str) -> tuple[Path, Path, Path]:
        return tmp_path / "ca" / identity.CA_CERT, tmp_path / name / identity.TLS_CERT, tmp_path / name / identity.TLS_KEY

    return tls_server_context(*files("hostA")), tls_client_context(*files("hostB"))


def _open(lane: LaneSocket, peer: Peer, client: ssl.SSLContext | None = None, timeout: float = 5.0) -> wire.Message:
    return lane.open(peer.address, JOIN, client, "hostA", timeout)


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[BaseException], list[float]]:
    """Run ``call`` in a thread; its exception and when it ended go in the lists."""
    failed: list[BaseException] = []
    ended: list[float] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 -- handed to the test
            failed.append(exc)
        ended.append(time.monotonic())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, failed, ended


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "mutual-tls"])
def test_frames_arrive_intact_and_in_order(tls: tuple[ssl.SSLContext, ssl.SSLContext], secure: bool) -> None:
    server, client = tls if secure else (None, None)
    peer = Peer(tls=server)
    lane = LaneSocket(1)
    try:
        assert isinstance(_open(lane, peer, client), wire.Joined)
        frames: list[wire.Message] = [
            wire.SharedPages(0, RUN, bytes(range(256)) * (RUN * PAGE_SIZE // 256)),
            wire.ZeroPages(RUN * PAGE_SIZE, 7),
            wire.PrivatePages(2 * RUN * PAGE_SIZE, 3, bytes(52), b"\x5a" * (3 * PAGE_SIZE)),
            wire.SharedPages(3 * RUN * PAGE_SIZE, 1, b"\x01" * PAGE_SIZE),
        ]
        written = [lane.write(msg) for msg in frames]
        assert written == [len(wire.encode_bytes(msg)) for msg in frames]
        assert lane.bytes_consumed() == sum(written)
        lane.shutdown()  # FIN after the frames: the peer reads them all, then the end
        peer.thread.join(10)
        assert peer.error is None, peer.error
        assert peer.frames == [JOIN, *frames]
    finally:
        lane.close()
        peer.close()


def test_no_answer_to_join_times_out_within_the_handshake_timeout() -> None:
    peer = Peer(answer=None)
    lane = LaneSocket(1)
    started = time.monotonic()
    try:
        with pytest.raises(StreamTimeout, match="JOINED took longer than the handshake timeout"):
            _open(lane, peer, timeout=0.5)
        assert 0.4 < time.monotonic() - started < 3
        assert peer.join_seen.is_set()
    finally:
        lane.close()
        peer.close()


def test_shutdown_ends_a_wait_for_joined_at_once() -> None:
    """The migration ends (another connection was refused, a cancel) while this one waits for
    JOINED with 30 s left: the wait ends at the shutdown. Control: it was still waiting before."""
    peer = Peer(answer=None)
    lane = LaneSocket(1)
    try:
        thread, failed, ended = _in_thread(lambda: _open(lane, peer, timeout=30.0))
        assert peer.join_seen.wait(5)
        thread.join(0.5)
        assert thread.is_alive(), "the control: without a shutdown the wait for JOINED goes on"
        shut_at = time.monotonic()
        lane.shutdown()
        thread.join(5)
        assert not thread.is_alive() and ended[0] - shut_at < 1.0
        assert isinstance(failed[0], StreamClosed), failed
    finally:
        lane.close()
        peer.close()


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "mutual-tls"])
def test_shutdown_ends_a_write_the_peer_does_not_take(tls: tuple[ssl.SSLContext, ssl.SSLContext],
                                                      secure: bool) -> None:
    """The peer stops reading: the thread's write blocks (no deadline of its own: the source's
    stall deadline decides) and the shutdown ends it at once. Control: it stays blocked for more
    than one poll interval before."""
    server, client = tls if secure else (None, None)
    peer = Peer(tls=server, reading=False)
    lane = LaneSocket(1)
    try:
        _open(lane, peer, client)
        payload = bytes(RUN * PAGE_SIZE)
        thread, failed, ended = _in_thread(lambda: [lane.write(wire.SharedPages(0, RUN, payload)) for _ in range(64)])
        stuck = lane.bytes_sent
        for _ in range(100):  # until the kernel's buffers are full and the write waits
            time.sleep(0.05)
            if lane.bytes_sent == stuck:
                break
            stuck = lane.bytes_sent
        thread.join(WRITE_POLL_S + 0.5)
        assert thread.is_alive() and lane.bytes_sent == stuck, "the control: the write waits for the peer"
        shut_at = time.monotonic()
        lane.shutdown()
        thread.join(5)
        assert not thread.is_alive() and ended[0] - shut_at < 1.0
        assert isinstance(failed[0], StreamClosed) and "closed by this side" in str(failed[0]), failed
    finally:
        lane.close()
        peer.close()


def test_an_abort_in_answer_to_join_is_the_peers_reason() -> None:
    peer = Peer(answer=wire.encode_bytes(wire.Abort("no such migration")))
    lane = LaneSocket(1)
    try:
        with pytest.raises(PeerAborted, match="no such migration"):
            _open(lane, peer)
    finally:
        lane.close()
        peer.close()


def test_an_answer_larger_than_a_control_frame_is_refused_unbuffered() -> None:
    """Before JOINED the peer has proved nothing: a page frame's length prefix is refused as it
    arrives, not buffered (the same bound as the first connection's)."""
    peer = Peer(answer=wire.encode_bytes(wire.SharedPages(0, RUN, bytes(RUN * PAGE_SIZE))))
    lane = LaneSocket(1)
    try:
        with pytest.raises(ProtocolError, match="allowed here"):
            _open(lane, peer)
    finally:
        lane.close()
        peer.close()


def test_a_peer_that_resets_fails_the_write() -> None:
    peer = Peer(reset_after_answer=True)
    lane = LaneSocket(1)
    try:
        _open(lane, peer)
        peer.thread.join(5)
        payload = bytes(RUN * PAGE_SIZE)
        with pytest.raises(StreamClosed, match="connection 2 lost"):
            for _ in range(64):
                lane.write(wire.SharedPages(0, RUN, payload))
    finally:
        lane.close()
        peer.close()


def test_a_shut_lane_writes_nothing() -> None:
    peer = Peer()
    lane = LaneSocket(1)
    try:
        _open(lane, peer)
        lane.shutdown()
        with pytest.raises(StreamClosed, match="closed"):
            lane.write(wire.ZeroPages(0, 1))
        lane.close()
        lane.close()  # idempotent
    finally:
        peer.close()


class Unanswering:
    """A listener whose one place in its accept queue is taken: a further SYN gets no answer."""

    def __init__(self) -> None:
        self.server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(0)
        self.address = self.server.getsockname()
        self.filler = socket.create_connection(self.address, timeout=5)

    def close(self) -> None:
        self.filler.close()
        self.server.close()


@pytest.fixture
def unanswering() -> Any:
    listener = Unanswering()
    yield listener
    listener.close()


def test_control_a_connect_to_the_unanswering_listener_hangs(unanswering: Unanswering) -> None:
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        with pytest.raises(TimeoutError):
            probe.connect(unanswering.address)
    finally:
        probe.close()


def _pause_after_adopting(monkeypatch: pytest.MonkeyPatch, adopted: threading.Event,
                          until: Callable[[LaneSocket], bool]) -> None:
    """Hold the lane's thread right after it adopted its unconnected socket, until ``until``:
    the interleaving a switch of the GIL between the two lines allows."""
    adopt = LaneSocket._adopt

    def adopt_and_pause(self: LaneSocket, sock: socket.socket) -> socket.socket:
        sock = adopt(self, sock)
        if not adopted.is_set():
            adopted.set()
            deadline = time.monotonic() + 5
            while not until(self) and time.monotonic() < deadline:
                time.sleep(0.001)
        return sock

    monkeypatch.setattr(LaneSocket, "_adopt", adopt_and_pause)


@pytest.mark.parametrize("when", ["before-the-connect", "during-the-connect"])
def test_shutdown_ends_an_opening_at_once(monkeypatch: pytest.MonkeyPatch, unanswering: Unanswering,
                                          when: str) -> None:
    """A shutdown that lands before the connect starts only marks the socket (ENOTCONN): the
    connect then returned at once, the SYN unanswered, and sending JOIN spun at full CPU until
    the handshake timeout (found by an adversarial review); during the connect, the kernel ends
    it (the control for the set-up)."""
    adopted = threading.Event()
    if when == "before-the-connect":
        _pause_after_adopting(monkeypatch, adopted, lambda lane: lane._shut)
    lane = LaneSocket(1)
    thread, failed, ended = _in_thread(lambda: lane.open(unanswering.address, JOIN, None, "x", 4.0))
    try:
        if when == "before-the-connect":
            assert adopted.wait(5)
        else:
            thread.join(0.5)
            assert thread.is_alive()
        shut_at = time.monotonic()
        lane.shutdown()
        thread.join(6)
        assert not thread.is_alive() and ended[0] - shut_at < 1.0, (ended[0] - shut_at, failed)
        assert isinstance(failed[0], StreamClosed), failed
    finally:
        lane.close()


def test_closing_a_lane_that_is_opening_does_not_hold_the_event_loop(monkeypatch: pytest.MonkeyPatch,
                                                                    unanswering: Unanswering) -> None:
    """SendLane.close() runs on the event loop (a failed opening's clean-up, a roll-back) and
    waits for the lane's thread: with the shutdown landing before the connect, that held the
    daemon's whole loop for the handshake timeout."""
    adopted = threading.Event()
    _pause_after_adopting(monkeypatch, adopted, lambda lane: lane._shut)

    async def main() -> float:
        lane_socket = LaneSocket(1)
        lane = SendLane(1, lambda *args: 0, lane_socket.bytes_consumed, transport_bytes=RUN_BYTES,
                        socket=lane_socket)
        opening = lane.run_in_thread(lambda: lane_socket.open(unanswering.address, JOIN, None, "x", 4.0))
        assert await asyncio.to_thread(adopted.wait, 5)
        started = time.monotonic()
        lane.close()
        took = time.monotonic() - started
        with pytest.raises(StreamClosed):
            await opening
        return took

    took = asyncio.run(main())
    assert took < 1.0, f"SendLane.close() held the event loop for {took:.2f} s"
