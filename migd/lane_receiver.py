"""A further connection on the destination: opened, read and placed by a thread of its own.

With several connections the destination's event loop used to receive every connection's
frames: the kernel copy, TLS, the CRC, a copy of each private payload for the page worker and
a hand-off to that worker per frame. A further connection carries JOIN and then page frames
only, and the destination writes nothing on it after JOINED (its ABORT goes on the first
connection), so it needs no event loop: its thread reads a frame into its own buffer, checks
it and places it (RECEIVE_UPDATE_DATA or the RAM write) straight from there. The kernel copy,
TLS, the CRC and the page crypto release the GIL; nothing goes through the loop per frame.

The listener knows such a connection by its preamble (``wire.LANE_PREAMBLE``, in the clear,
before TLS) and hands it over before anything else is read. The thread then does what the
listener does for every connection, under the same rules: the TLS handshake and JOIN within the
handshake deadline, frames bounded to control-frame sizes until the peer is authenticated. The
event loop has the migration's session verify JOIN (nothing is created for one), and the thread
answers JOINED or ABORT.

Once JOINED is written, the connection has a second thread: the first reads frames and copies
each payload out of its receive buffer, the second places them, in order. One thread doing both
was the bound of a migration over two connections at 100 % private on the 2-core VM: it spent
~2.2 core-s/GiB, a whole core, receiving and placing one after the other, where one connection's
loop and page worker overlap the two (the same split as migd/page_pipeline.py). At most
PLACE_DEPTH payloads wait for the placing thread; then reading waits, and TCP's window holds the
source back. :meth:`LaneReceiver.stop` (any thread) ends a read or a handshake under way at once
and no frame is placed after it; the reading thread closes the socket at its end.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable

from migd import wire
from migd.abi import PAGE_SIZE
from migd.errors import MigdError, PeerAborted, ProtocolError
from migd.stream import LINGER_S, PAGE_FRAMES, StreamClosed
from migd.thread_socket import ThreadSocket

log = logging.getLogger(__name__)

#: The name of every receiver's reading thread, and of its placing thread.
THREAD_NAME = "migd-lane-in"
PLACER_THREAD_NAME = "migd-lane-place"
#: Page frames with a payload read and not placed yet (the one being placed included), before
#: reading waits: the placing (RECEIVE_UPDATE_DATA, the RAM write) is the slower half, and one
#: frame waiting keeps it busy while the next is received. Bounds the connection to two payload
#: buffers (4 MiB) beside its receive buffer.
PLACE_DEPTH = 2
#: Frames queued at most, payload or not: a stretch of zero runs comes as many small frames.
MAX_QUEUED_FRAMES = 128
_PAYLOAD_BUFFER = wire.MAX_RUN_PAGES * PAGE_SIZE
#: How long writing JOINED (or the ABORT refusing JOIN) may take, at least: a few hundred bytes.
ANSWER_TIMEOUT_S = 5.0
#: How long the thread waits for the session's verdict on JOIN past the handshake deadline: the
#: loop answers at once, unless its task was cancelled meanwhile.
VERDICT_MARGIN_S = 5.0
#: One read takes at most this much (the frame decoder's buffer grows to the largest frame).
_READ_CHUNK = 1 << 20
_OPENING_BUFFER = 4096
_LINGER_READ = 64 << 10

PageFrame = wire.PrivatePages | wire.SharedPages | wire.ZeroPages


class LaneReceiver(ThreadSocket):
    """One further connection accepted by the listener, from its preamble to its end.

    The event loop calls :meth:`open`, then :meth:`admit` or :meth:`refuse`, and :meth:`stop`;
    everything else happens in the connection's thread. ``last_activity``, ``close_reason`` and
    ``closed_by_peer`` answer like a :class:`~migd.stream.FrameProtocol`'s.
    """

    def __init__(self, sock: socket.socket, peer: str) -> None:
        super().__init__(f"the further connection from {peer}")
        sock.setblocking(True)
        self._adopt(sock)
        self.peer = peer
        self.lane = 0
        #: When bytes last arrived or a frame was placed (the migration's stall deadline).
        self.last_activity = time.monotonic()
        #: Why the connection ended, once it has.
        self.close_reason: BaseException | None = None
        #: The peer ended it (EOF, reset, a TLS error), not this side.
        self.closed_by_peer = False
        #: The TLS handshake (if any) has completed: a timeout after it is not TLS's.
        self.tls_established = False
        self._decoder = wire.FrameDecoder(initial=_OPENING_BUFFER)
        self._encoder = wire.FrameEncoder()
        self._verdict = threading.Event()
        self._verdict_lock = threading.Lock()
        self._given_up = False  # the thread stopped waiting for the verdict
        self._answer: wire.Joined | wire.Abort | None = None
        self._place: Callable[[PageFrame], None] | None = None
        self._on_end: Callable[[BaseException], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # Frames read and not yet placed (with the buffer holding each payload), shared by the
        # reading and placing threads under _queue_ready.
        self._queue_ready = threading.Condition()
        self._placing: collections.deque[tuple[PageFrame, bytearray | None]] = collections.deque()
        self._payloads = 0  # queued frames holding a payload buffer
        self._buffers: list[bytearray] = []  # payload buffers free for reuse
        self._reading_done = False
        self._refusal: BaseException | None = None  # the frame the placing thread refused
        self._end_reported = False

    @property
    def queued(self) -> int:
        """Page frames read and not placed yet (the one being placed included)."""
        return len(self._placing)

    # -- the event loop
    async def open(self, ssl_context: ssl.SSLContext | None, timeout: float) -> wire.Join:
        """Start the thread: the preamble, TLS if ``ssl_context``, then JOIN, all within ``timeout``.

        Errors: StreamTimeout, ssl.SSLError, OSError, StreamClosed, ProtocolError (not a lane
        preamble, a frame too large before authentication, another frame than JOIN). On any
        error, or if cancelled, the connection ends.
        """
        loop = self._loop = asyncio.get_running_loop()
        opened: asyncio.Future[wire.Join] = loop.create_future()
        deadline = time.monotonic() + timeout
        thread = threading.Thread(target=self._run, args=(ssl_context, deadline, opened),
                                  name=THREAD_NAME, daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had (a process or memory limit)
            self.close()
            raise StreamClosed(f"{self.name}: no thread to receive it: {exc}") from exc
        try:
            return await opened
        except BaseException:
            self.stop()
            raise

    def admit(self, joined: wire.Joined, place: Callable[[PageFrame], None],
              on_end: Callable[[BaseException], None]) -> None:
        """The session accepted JOIN: the thread answers ``joined``, then hands every page frame to
        ``place`` (in its thread, in order); ``on_end(reason)`` runs on the loop when it ends.

        StreamClosed if the thread no longer waits for it (stopped, or it gave up waiting)."""
        self.lane = joined.lane
        self._answer_with(joined, place, on_end)

    def refuse(self, reason: str) -> None:
        """JOIN is refused: the thread answers ABORT (without a MAC: the peer proved nothing) and ends."""
        try:
            self._answer_with(wire.Abort(reason), None, None)
        except StreamClosed:
            pass  # the connection is over already

    def _answer_with(self, answer: wire.Joined | wire.Abort, place: Callable[[PageFrame], None] | None,
                     on_end: Callable[[BaseException], None] | None) -> None:
        # Under the lock: the thread takes the verdict, or gives up on it, exactly once.
        with self._verdict_lock:
            if self._given_up or self.shut:
                raise StreamClosed(f"{self.name} ended before its JOIN was answered")
            self._place, self._on_end, self._answer = place, on_end, answer
        self._verdict.set()

    def stop(self) -> None:
        """The migration no longer needs the connection: it ends (after the frame being placed,
        if any) without calling ``on_end``. Idempotent."""
        self._on_end = None
        self.shutdown()
        self._verdict.set()
        with self._queue_ready:
            self._queue_ready.notify_all()  # a placing thread waiting for frames, a reading one for room

    # -- its thread
    def _run(self, ssl_context: ssl.SSLContext | None, deadline: float, opened: asyncio.Future[wire.Join]) -> None:
        reason: BaseException | None = None
        try:
            try:
                join = self._opening(ssl_context, deadline)
            except (MigdError, OSError) as exc:  # ssl.SSLError and StreamTimeout included
                if isinstance(exc, ProtocolError):
                    self._tell(exc)
                self._to_loop(_settle, opened, None, exc)
                return
            except Exception as exc:  # a bug: the listener counts the connection refused at once
                log.error("opening %s failed unexpectedly: %r", self.name, exc, exc_info=exc)
                self._to_loop(_settle, opened, None, ProtocolError(f"internal error while opening: {exc!r}"))
                return
            self._to_loop(_settle, opened, join, None)
            # From here the loop hears of the connection's end, whatever it is.
            self._verdict.wait(max(0.0, deadline - time.monotonic()) + VERDICT_MARGIN_S)
            with self._verdict_lock:
                answer = self._answer
                self._given_up = answer is None
            if answer is None:
                raise StreamClosed(f"{self.name}: JOIN was not answered in time")
            self._check_shut()
            self._write_answer(answer)
            if isinstance(answer, wire.Abort):
                return  # refused: nobody listens for its end
            self._receive()
        except StreamClosed as exc:
            reason = exc
        except (MigdError, OSError) as exc:
            # The placing thread's refusal is reported as it was; the rest is the connection's.
            reason = exc if exc is self._refusal else self._lost(exc)
        except Exception as exc:  # a bug in the reading: the migration ends, as in the loop's worker
            log.error("reading pages of connection %d failed unexpectedly: %r", self.lane + 1, exc, exc_info=exc)
            reason = ProtocolError(f"internal error while reading pages: {exc!r}")
        finally:
            if reason is not None:
                self._report_end(reason)
                if not isinstance(reason, (StreamClosed, PeerAborted)):
                    self._linger()
            self.close()

    def _report_end(self, reason: BaseException) -> None:
        """Tell the loop how the connection ended: once, from whichever thread knows first."""
        with self._queue_ready:
            if self._end_reported:
                return
            self._end_reported = True
        self._to_loop(self._ended, reason)

    def _linger(self) -> None:
        """This side refused a frame: the migration tells the source why on the first connection.
        Until it stops this one (or LINGER_S), what the source still sends here is read and
        dropped: closing with unread data sends a reset, which the source's thread would see
        before that reason and report instead (a frame after the refused one is never placed)."""
        sock = self._sock
        if sock is None:
            return
        deadline = time.monotonic() + LINGER_S
        discard = memoryview(bytearray(_LINGER_READ))
        try:
            while not self.shut and (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not sock.recv_into(discard):
                    return
        except (OSError, ValueError):  # timed out, reset, shut by stop(); ValueError: TLS state gone
            pass

    def _opening(self, ssl_context: ssl.SSLContext | None, deadline: float) -> wire.Join:
        sock = self._sock
        assert sock is not None
        preamble = self._receive_exactly(sock, len(wire.LANE_PREAMBLE), deadline, "the lane preamble")
        if preamble != wire.LANE_PREAMBLE:
            raise ProtocolError("a connection that does not start with the lane preamble")
        if ssl_context is not None:
            tls = ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            sock = self._adopt(tls)
            self._within(sock, deadline, "the TLS handshake", tls.do_handshake)
            self.tls_established = True
        msg = self._receive_control(sock, self._decoder, deadline, "JOIN")
        if not isinstance(msg, wire.Join):
            raise ProtocolError(f"{msg.TYPE.name} frame on a further connection, where JOIN was due")
        return msg

    def _tell(self, exc: ProtocolError) -> None:
        """Tell the peer why its opening was refused (an ABORT without a MAC), if it still listens."""
        try:
            self._write_answer(wire.Abort(str(exc)))
        except (MigdError, OSError):
            pass  # it does not: the refusal is counted and logged here all the same

    def _write_answer(self, answer: wire.Joined | wire.Abort) -> None:
        sock = self._sock
        assert sock is not None
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        for part in self._encoder.encode(answer):
            self._within(sock, deadline, f"writing {answer.TYPE.name}", lambda part=part: sock.sendall(part))

    def _receive(self) -> None:
        """Page frames, read here and placed by the placing thread, until the connection ends (an
        exception: the placing thread's refusal, which it reported already, or the reading's end,
        raised once every frame read before it is placed)."""
        placer = threading.Thread(target=self._place_frames, name=PLACER_THREAD_NAME, daemon=True)
        try:
            placer.start()
        except RuntimeError as exc:  # no thread to be had (a process or memory limit)
            raise StreamClosed(f"{self.name}: no thread to place its pages: {exc}") from exc
        try:
            self._read_frames()
        finally:
            with self._queue_ready:
                self._reading_done = True
                self._queue_ready.notify_all()
            placer.join()
            self._placing.clear()  # stopped: what was queued is never placed
            self._buffers.clear()  # up to 4 MiB, written: nothing of a finished connection keeps them
            if self._refusal is not None:
                raise self._refusal

    def _read_frames(self) -> None:
        sock, decoder = self._sock, self._decoder
        assert sock is not None
        decoder.max_frame = None  # authenticated: page frames may come
        sock.settimeout(None)  # the migration's stall deadline is the loop's; shutdown() wakes a read
        tls = isinstance(sock, ssl.SSLSocket)
        while True:
            view = decoder.get_buffer()[:_READ_CHUNK]
            got = sock.recv_into(view)
            if tls:
                # A TLS read returns one record (16 KiB) at most: read on up to the end of the
                # frame under way (never past it: a complete frame must not wait for the next
                # one's bytes), then decode once, not once per record.
                want = min(decoder.missing_bytes, len(view))
                while 0 < got < want:
                    # Bytes arriving are activity (the stall deadline), however slowly they come.
                    self.last_activity = time.monotonic()
                    more = sock.recv_into(view[got:want])
                    if more == 0:
                        break
                    got += more
            if got == 0:
                self._check_shut()
                self.closed_by_peer = True
                raise StreamClosed("peer closed the migration stream")
            self.last_activity = time.monotonic()
            for msg in decoder.buffer_updated(got):
                if isinstance(msg, PAGE_FRAMES):
                    self._queue(msg)
                elif isinstance(msg, wire.Abort):
                    raise PeerAborted(msg.reason)
                else:
                    raise ProtocolError(f"{msg.TYPE.name} frame on a connection that carries page frames only")

    def _queue(self, msg: PageFrame) -> None:
        """Hand one frame to the placing thread: its payload copied out of the receive buffer,
        which the next read reuses. Waits while PLACE_DEPTH payloads (or MAX_QUEUED_FRAMES frames)
        are queued: reading stops, and TCP's window holds the source back.

        A zero or shared run with nothing queued or being placed is placed here at once (a
        marker, one pwrite: cheaper than its copy and the hand-off; RECEIVE_UPDATE_DATA's crypto
        is what the placing thread overlaps with receiving)."""
        cond = self._queue_ready
        payload = not isinstance(msg, wire.ZeroPages)
        with cond:
            while (self._refusal is None and not self.shut
                   and (self._payloads >= PLACE_DEPTH or len(self._placing) >= MAX_QUEUED_FRAMES)):
                cond.wait()
            if self._refusal is not None:
                raise self._refusal  # reported by the placing thread; nothing more is placed
            self._check_shut()  # stopped: not one more frame reaches guest RAM
            inline = not self._placing and not isinstance(msg, wire.PrivatePages)
            buffer = self._buffers.pop() if payload and not inline and self._buffers else None
            self._payloads += payload and not inline
        if inline:
            # Nothing is queued and only this thread queues: the placing thread stays idle.
            if not self._place_one(msg):
                assert self._refusal is not None
                raise self._refusal
            return
        if payload:
            n = len(msg.payload)
            if buffer is None or len(buffer) < n:
                buffer = bytearray(max(n, _PAYLOAD_BUFFER))
            view = memoryview(buffer)[:n]
            view[:] = msg.payload  # ~0.1 ms per MiB under the GIL; the placing releases it
            msg = dataclasses.replace(msg, payload=view)
        with cond:
            self._placing.append((msg, buffer))
            cond.notify_all()

    def _place_frames(self) -> None:
        """The placing thread: every queued frame, in order, until reading is done and nothing is
        queued, the migration stops the connection, or a frame is refused (reported at once)."""
        cond = self._queue_ready
        while True:
            with cond:
                while not self._placing and not self._reading_done and not self.shut:
                    cond.wait()
                if self.shut or not self._placing:
                    return
                msg, buffer = self._placing[0]
            if not self._place_one(msg):
                return
            with cond:
                self._placing.popleft()
                if buffer is not None:
                    self._payloads -= 1
                    if len(self._buffers) < PLACE_DEPTH:
                        self._buffers.append(buffer)
                cond.notify_all()

    def _place_one(self, msg: PageFrame) -> bool:
        """Place one frame; False if it was refused (reported, see _refused)."""
        place = self._place
        assert place is not None
        try:
            place(msg)
        except (MigdError, OSError) as exc:
            self._refused(exc)
            return False
        except Exception as exc:  # a bug in the page handler: the migration ends, as in the loop's worker
            log.error("placing pages of connection %d failed unexpectedly: %r", self.lane + 1, exc, exc_info=exc)
            self._refused(ProtocolError(f"internal error while placing pages: {exc!r}"))
            return False
        self.last_activity = time.monotonic()
        return True

    def _refused(self, exc: BaseException) -> None:
        """A frame was refused: the migration hears of it now (the reading may wait for bytes that
        never come); the reading stops queueing and drops what still arrives (see _linger)."""
        with self._queue_ready:
            self._refusal = exc
            self._placing.clear()
            self._queue_ready.notify_all()
        self._report_end(exc)

    def _lost(self, exc: MigdError | OSError) -> BaseException:
        """What ended the connection, as the migration reports it."""
        if self.shut:
            return StreamClosed(f"{self.name} was closed by this side")
        if isinstance(exc, ssl.SSLError):
            # A TLS record that fails its MAC is tampering or corruption on the path: say it was TLS.
            self.closed_by_peer = True
            closed = StreamClosed(f"migration stream lost: TLS record rejected: "
                                  f"{exc.reason.lower().replace('_', ' ') if exc.reason else exc}")
            closed.__cause__ = exc
            return closed
        if isinstance(exc, OSError):
            self.closed_by_peer = True
            return StreamClosed(f"migration stream lost: {exc.strerror or exc}")
        return exc

    def _ended(self, reason: BaseException) -> None:
        # On the loop: close_reason and on_end at once, as a FrameProtocol's end (the migration's
        # barrier reads one and times its grace from the other).
        self.close_reason = reason
        on_end, self._on_end = self._on_end, None
        if on_end is not None:
            on_end(reason)

    def _to_loop(self, call: Callable[..., object], *args: object) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(call, *args)
        except RuntimeError:  # the loop closed meanwhile: nobody is waiting any more
            pass


def _settle(opened: asyncio.Future[wire.Join], join: wire.Join | None, exc: BaseException | None) -> None:
    if opened.done():
        return  # the listener gave up waiting (cancelled): the thread has ended the connection
    if exc is not None:
        opened.set_exception(exc)
    else:
        assert join is not None
        opened.set_result(join)
