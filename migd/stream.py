"""The asyncio adapter for the migration stream: a thin layer over :mod:`migd.wire`.

Receiving uses ``asyncio.BufferedProtocol`` so the kernel copies straight into the frame
decoder's buffer (plain ``StreamReader.read()`` was ~6x slower under uvloop; docs/design.md §10
"Performance rules").
Page frames go to the ``on_pages`` callback; every other message is queued for the task that
drives the migration, but only once every page frame received before it has been handled:
a control frame (ROUND_END, PING, VCPU_STATE, PREPARE) always finds the pages sent before it
in place, and the SEV transport sees its packets in sequence.

The destination's page pipeline (``set_page_handler(..., threaded=True)``) is
:mod:`migd.page_pipeline`: page frames placed in stream order by a worker thread beside the loop,
control messages held behind them, reading paused while it is full.

Sending writes ``encode()``'s buffer list with ``writelines`` (over TLS in batches of at most
TLS_WRITE_BYTES) and honours flow control.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Any

from migd import wire
from migd.errors import MigdError, PeerAborted, ProtocolError
from migd.page_pipeline import PageHandler, PagePipeline

log = logging.getLogger(__name__)

PAGE_FRAMES = (wire.PrivatePages, wire.SharedPages, wire.ZeroPages)
#: The decoder's receive buffer starts small and grows to the largest frame received (the
#: decoder allocates it when that frame's length prefix arrives): a stream that only ever
#: carries control frames (the source side, RESOLVE, a peer that never authenticates) never
#: holds a page frame's 2 MiB. Against the former fixed buffer of two page frames (4.25 MiB),
#: receiving shared-page frames of mixed run sizes over loopback (uvloop, no-op handler) cost the
#: same CPU: 0.143 against 0.149 core-s/GiB, median of ten runs each. Reads stop at the buffer's
#: end, so a frame starting at its front fills it exactly; only one cut by a small frame is moved.
INITIAL_RECEIVE_BUFFER = 64 << 10
#: The largest frame legal before the peer is authenticated: control frames only (HELLO,
#: SESSION, RESOLVE, ABORT; docs/protocol.md "Frames"), metadata at most MAX_META, no payload.
MAX_FRAME_BEFORE_AUTHENTICATION = wire.PREFIX_SIZE + wire.MAX_META + wire.CRC_SIZE
#: Control messages received and not taken by the driving task yet, at most, and their payload
#: bytes at most (one shared-page bitmap and one vCPU state, with room to spare): a peer that
#: sends more is refused instead of being buffered without bound. A legitimate stream can have
#: many small ones at once: the ROUND_ENDs of every round sent behind a slow link arrive together
#: when it catches up (64 were seen in a test), each a few hundred bytes once decoded.
MAX_QUEUED_CONTROL = 4096
MAX_QUEUED_CONTROL_BYTES = wire.MAX_BITMAP_BYTES + wire.MAX_VCPU_STATE + (1 << 20)
#: One read fills at most this much of the buffer, so a read brings only a few frames for the
#: pipeline at once.
_READ_CHUNK = 1 << 20

#: The transport's write-buffer limits: writers pause (``drain``) past the high mark and go on
#: below the low one. A writer that drains before each step of at most one frame therefore
#: never has much more than WRITE_HIGH_WATER + a frame unsent.
WRITE_HIGH_WATER = 8 << 20
WRITE_LOW_WATER = 2 << 20

#: Over TLS a frame goes to the transport in writes of at most this many bytes. The SSL
#: transport encrypts each write into its outgoing memory BIO and hands the whole BIO to the
#: socket as one new buffer, so a 2 MiB run's payload made a 2 MiB buffer every time.
#: bench/tls.py (2 MiB frames, 1 GiB, medians of 3): 64 KiB writes 1604 MiB/s, sender 0.63
#: core-s/GiB; whole frames 1365 MiB/s, 0.73; 256 KiB 1269, 0.78; 16 KiB 1122, 0.90.
TLS_WRITE_BYTES = 64 << 10

#: How long a closing side keeps reading (and discarding) after its last frame. Closing a
#: socket with unread data makes the kernel send RST, and an RST can overtake the ABORT frame
#: written just before it: the peer would report "connection reset" instead of the reason.
LINGER_S = 2.0
_DISCARD = memoryview(bytearray(64 * 1024))


class StreamClosed(MigdError):
    """The peer closed the migration stream, or it broke."""


class FrameProtocol(asyncio.BufferedProtocol):
    """One migration stream connection, either side.

    ``require_authentication`` (the listener's side): until :meth:`mark_authenticated`, any
    frame larger than :data:`MAX_FRAME_BEFORE_AUTHENTICATION` ends the stream with a
    ``ProtocolError`` as soon as its length prefix arrives, so a peer that has not proved who
    it is cannot make this side buffer a page frame.
    """

    def __init__(self, on_pages: PageHandler | None = None, *, require_authentication: bool = False) -> None:
        self._decoder = wire.FrameDecoder(
            initial=INITIAL_RECEIVE_BUFFER,
            max_frame=MAX_FRAME_BEFORE_AUTHENTICATION if require_authentication else None,
        )
        self._receive_buffer_bytes = INITIAL_RECEIVE_BUFFER
        self._encoder = wire.FrameEncoder()
        # Page frames go to the page pipeline (migd/page_pipeline.py) once a handler is installed.
        self._pipeline: PagePipeline | None = None if on_pages is None else PagePipeline(on_pages, self, None,
                                                                                         threaded=False)
        self._queue: asyncio.Queue[wire.Message | BaseException] = asyncio.Queue()
        self._transport: asyncio.Transport | None = None
        self._tls = False
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._closed = asyncio.Event()
        self._close_reason: BaseException | None = None
        self.bytes_sent = 0
        self.peer: str | None = None
        #: The peer's socket address (as ``getpeername()`` gives it): where further connections go.
        self.peer_address: tuple[str, int] | tuple[str, int, int, int] | None = None
        #: This end's address ("host:port", IPv6 in brackets): on a destination, what the source dialled.
        self.local = "unknown"
        self.last_activity = time.monotonic()  # when bytes last arrived (idle timeouts)
        self.peer_abort: str | None = None  # the peer's reason, if it sent ABORT
        self.connected = asyncio.Event()
        #: Set by :meth:`mark_authenticated` (at once without ``require_authentication``).
        self.authenticated = asyncio.Event()
        if not require_authentication:
            self.authenticated.set()
        #: The peer ended the stream (EOF or a lost connection) before this side did.
        self.closed_by_peer = False
        self._aborting = False  # abort() was called: the connection_lost that follows is ours
        self._loop: asyncio.AbstractEventLoop | None = None
        self._linger: asyncio.TimerHandle | None = None  # set while closing gracefully
        self._high_water = WRITE_HIGH_WATER
        self._queued_bytes = 0  # payload bytes of the control messages in the queue
        self._dropping_pages = False  # drop_pages(): the migration failed, its guest goes

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = transport  # type: ignore[assignment]
        self._tls = transport.get_extra_info("ssl_object") is not None
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            self.peer = f"{peername[0]}:{peername[1]}"
            self.peer_address = peername
        sockname = transport.get_extra_info("sockname")
        if isinstance(sockname, tuple) and len(sockname) >= 2:
            host = str(sockname[0])
            self.local = f"[{host}]:{sockname[1]}" if ":" in host else f"{host}:{sockname[1]}"
        # Large writes go straight to the socket; pause only past a few MiB queued.
        transport.set_write_buffer_limits(high=self._high_water, low=min(WRITE_LOW_WATER, self._high_water // 4))
        self._loop = asyncio.get_running_loop()
        self.connected.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._close_reason is not None:
            return _DISCARD  # the stream is over: what still arrives is read only to be dropped
        view = self._decoder.get_buffer(sizehint)
        # The decoder's whole buffer (a bytearray), not just its free part.
        self._receive_buffer_bytes = len(view.obj)  # type: ignore[arg-type]
        return view[:_READ_CHUNK]

    def buffer_updated(self, nbytes: int) -> None:
        if self._close_reason is not None:
            return
        self.last_activity = time.monotonic()
        try:
            messages = self._decoder.buffer_updated(nbytes)
            for msg in messages:
                if isinstance(msg, PAGE_FRAMES):
                    if self._dropping_pages:
                        continue
                    if self._pipeline is None:
                        raise ProtocolError(f"unexpected {msg.TYPE.name} frame on this side of the stream")
                    self._pipeline.page_frame(msg)
                elif isinstance(msg, wire.Abort):
                    self.peer_abort = msg.reason  # kept even if a later write fails first
                    # Not held behind the pages before it: they no longer matter, and the end of
                    # the stream that follows at once must not overtake the peer's reason.
                    self._queue.put_nowait(msg)
                else:
                    # Its payload (a bitmap, vCPU state) points into the receive buffer, which
                    # the next read overwrites before the driving task gets to it.
                    msg = wire.detached(msg)
                    if self._pipeline is None or not self._pipeline.hold(msg):  # else: after the pages before it
                        self.deliver(msg)
        except MigdError as exc:
            self._refuse(exc)
        except Exception as exc:  # a bug in an inline page handler: ABORT and end, as in the worker
            self._refuse(exc)
        if self._pipeline is not None:
            self._pipeline.collect()

    def _refuse(self, exc: BaseException) -> None:
        """A frame was refused (protocol, firmware or memory error): the stream is over.

        Tell the peer why before closing, so both ends report the real reason.
        """
        if not isinstance(exc, MigdError):
            log.error("page handler failed unexpectedly: %r", exc, exc_info=exc)
            exc = ProtocolError(f"internal error while placing pages: {exc!r}")
        if self._close_reason is None and self._transport is not None:
            try:
                self.write(wire.Abort(str(exc)))
            except MigdError:
                pass
        self._fail(exc, graceful=True)

    def pending_pages(self) -> int:
        """Page frames handed to the worker and not yet retired (0 without a pipeline).

        Handled frames are retired lazily: when the next frame arrives, or at once while the
        loop waits for them (reading paused, a control message held behind them).
        """
        return self._pipeline.pending if self._pipeline is not None else 0

    # -- what the page pipeline needs of its stream (PipelineOwner)
    def deliver(self, msg: wire.Message) -> None:
        """A control message, every page frame before it placed: to the driving task.

        Past :data:`MAX_QUEUED_CONTROL` messages, or their bytes, not taken yet the stream is
        refused (a ProtocolError, ABORT to the peer)."""
        nbytes = len(getattr(msg, "payload", b""))
        if self._queue.qsize() >= MAX_QUEUED_CONTROL or self._queued_bytes + nbytes > MAX_QUEUED_CONTROL_BYTES:
            self._refuse(ProtocolError(f"the peer sent more control frames than this side handles at once "
                                       f"({self._queue.qsize()} waiting, {self._queued_bytes + nbytes} bytes)"))
            return
        self._queued_bytes += nbytes
        self._queue.put_nowait(msg)

    def refuse(self, exc: BaseException) -> None:
        """The pipeline refused a page frame."""
        self._refuse(exc)

    def set_reading(self, reading: bool) -> None:
        """Pause or resume reading (the pipeline's back-pressure)."""
        if self._transport is None or self._close_reason is not None:
            return
        if reading:
            self._transport.resume_reading()
        else:
            self._transport.pause_reading()

    def touch(self) -> None:
        """Page frames were placed: the stream is alive."""
        self.last_activity = time.monotonic()

    def eof_received(self) -> bool:
        if self._close_reason is None:
            self.closed_by_peer = True
        self._fail(StreamClosed("peer closed the migration stream"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        if self._close_reason is None and not self._aborting:
            self.closed_by_peer = True
        if isinstance(exc, ssl.SSLError):
            # A TLS record that fails its MAC is tampering or corruption on the path: say it was TLS.
            what = f"TLS record rejected: {exc.reason.lower().replace('_', ' ') if exc.reason else exc}"
        else:
            what = str(exc) if exc else ""
        closed = StreamClosed(f"migration stream lost: {what}" if what else "migration stream closed")
        closed.__cause__ = exc  # the reader may want the codes (a TLS alert's reason), not only the text
        self._fail(closed)
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- driver API
    def mark_authenticated(self) -> None:
        """The session has verified the peer: lift the pre-authentication frame bound (idempotent).

        The receive buffer still grows only when a larger frame arrives.
        """
        self._decoder.max_frame = None
        self.authenticated.set()

    @property
    def receive_buffer_bytes(self) -> int:
        """Bytes of receive buffer this stream holds (the decoder's, as last handed to the transport)."""
        return self._receive_buffer_bytes

    def set_page_handler(self, on_pages: PageHandler | None, *, threaded: bool = True) -> None:
        """Install the consumer of page frames (destination side).

        ``threaded``: run it in the pipeline's worker thread, in order (see the module
        docstring); it must then be safe to run beside the event loop. Otherwise it runs on
        the loop while the payload view is valid.
        """
        if self._pipeline is not None:
            self._pipeline.stop()
        self._pipeline = None if on_pages is None else PagePipeline(on_pages, self, self._loop, threaded=threaded)

    def drop_pages(self) -> None:
        """The migration has failed and its partial guest is being discarded: no page frame is
        placed from now on (queued ones are cancelled; one being placed finishes), and those still
        arriving are read and dropped, not refused: the peer has the reason already."""
        self._dropping_pages = True
        if self._pipeline is not None:
            self._pipeline.stop()

    def _fail(self, exc: BaseException, *, graceful: bool = False) -> None:
        if self._close_reason is None:
            self._close_reason = exc
            self._queue.put_nowait(exc)
            self._closed.set()
            if self._pipeline is not None:
                self._pipeline.stop()
            if self._transport is not None and not isinstance(exc, StreamClosed):
                if graceful:
                    self.close()  # flushes the ABORT frame written just before
                else:
                    self._transport.abort()

    def interrupt(self, exc: BaseException) -> None:
        """Make the driving task's next :meth:`receive` raise ``exc`` once (a further connection
        of its migration failed); the stream itself stays open, for the driver's ABORT."""
        if self._close_reason is None:
            self._queue.put_nowait(exc)

    @property
    def close_reason(self) -> BaseException | None:
        return self._close_reason

    def set_write_buffer_limits(self, high: int) -> None:
        """Pause the writer past ``high`` queued bytes (one of several connections takes a share)."""
        self._high_water = high
        if self._transport is not None:
            self._transport.set_write_buffer_limits(high=high, low=min(WRITE_LOW_WATER, high // 4))

    def write(self, msg: wire.Message) -> int:
        """Queue one message on the transport now (no await); returns the bytes framed.

        Callers ``await drain()`` between writes to respect flow control; keeping the write
        itself synchronous lets the source classify, read and write a chunk in one step.
        """
        if self._close_reason is not None:
            raise StreamClosed(f"cannot send {msg.TYPE.name}: {self._close_reason}")
        assert self._transport is not None
        parts = self._encoder.encode(msg)
        if self._tls:
            for batch in tls_write_batches(parts, TLS_WRITE_BYTES):
                self._transport.writelines(batch)
        else:
            self._transport.writelines(parts)
        nbytes = sum(len(p) for p in parts)
        self.bytes_sent += nbytes
        return nbytes

    async def drain(self) -> None:
        """Wait until the write buffer is below its low-water mark."""
        if not self._can_write.is_set():
            await self._can_write.wait()
        if self._close_reason is not None:
            raise StreamClosed(f"migration stream is closed: {self._close_reason}")

    async def receive(self, timeout: float) -> wire.Message:
        """The next control message; raises StreamClosed/ProtocolError or TimeoutError."""
        async with asyncio.timeout(timeout):
            item = await self._queue.get()
        if isinstance(item, BaseException):
            if item is self._close_reason:
                self._queue.put_nowait(item)  # every later receive sees the same end
            raise item  # an interrupt (interrupt()) is raised once
        self._queued_bytes -= len(getattr(item, "payload", b""))
        return item

    async def expect(self, kind: type[Any], timeout: float) -> Any:
        """Receive the next control message and insist on its type (an Abort becomes an error)."""
        try:
            msg = await self.receive(timeout)
        except TimeoutError:
            raise StreamTimeout(f"no {kind.__name__} from the peer within {timeout:g} s") from None
        if isinstance(msg, wire.Abort):
            raise PeerAborted(msg.reason)
        if not isinstance(msg, kind):
            raise ProtocolError(f"expected {kind.__name__}, peer sent {type(msg).__name__}")
        return msg

    def write_buffer_size(self) -> int:
        """Bytes written but still in the transport's buffer (not yet taken by the kernel)."""
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def bytes_consumed(self) -> int:
        """Bytes written so far that have left the transport's buffer for the kernel.

        The transport no longer needs the buffers behind them (see migd/send_buffers.py).
        """
        return self.bytes_sent - self.write_buffer_size()

    def close(self) -> None:
        """Close the connection gracefully (idempotent): what was written is delivered first.

        The write side is shut (FIN after the queued frames) and whatever the peer still sends
        is read and dropped until it closes too, for at most :data:`LINGER_S`: closing with
        unread data would reset the connection and could destroy our last frame (an ABORT and
        its reason) in the peer's receive queue. TLS cannot half-close: it just closes.
        """
        transport = self._transport
        if transport is None or transport.is_closing() or self._linger is not None:
            return
        if self._close_reason is None:
            self._close_reason = StreamClosed("migration stream closed by this side")
            self._queue.put_nowait(self._close_reason)
            self._closed.set()
            if self._pipeline is not None:
                self._pipeline.stop()
        if self._loop is None or not transport.can_write_eof():
            transport.close()
            return
        if self._pipeline is not None and self._pipeline.reading_paused:
            self._pipeline.reading_paused = False
            transport.resume_reading()
        transport.write_eof()
        self._linger = self._loop.call_later(LINGER_S, transport.close)

    def abort(self) -> None:
        """Drop the connection at once."""
        self._aborting = True
        if self._transport is not None:
            self._transport.abort()


def tls_write_batches(parts: list[Any], limit: int) -> list[list[memoryview]]:
    """Split a frame's buffers into batches of at most ``limit`` bytes, in order, uncopied.

    Small buffers (a frame's header, its CRC) share a batch with their neighbours; a large
    payload is cut into views of ``limit`` bytes.
    """
    batches: list[list[memoryview]] = []
    batch: list[memoryview] = []
    room = limit
    for part in parts:
        view = memoryview(part).cast("B")
        while len(view):
            take = min(room, len(view))
            batch.append(view[:take])
            view = view[take:]
            room -= take
            if room == 0:
                batches.append(batch)
                batch, room = [], limit
    if batch:
        batches.append(batch)
    return batches


class StreamTimeout(MigdError, TimeoutError):
    """The peer did not send the expected message in time."""




async def open_stream(
    host: str, port: int, *, ssl_context: ssl.SSLContext | None = None, timeout: float = 10.0
) -> FrameProtocol:
    """Connect to a migration listener."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        _, protocol = await loop.create_connection(
            FrameProtocol, host, port, ssl=ssl_context, server_hostname=host if ssl_context else None
        )
    return protocol
