"""The asyncio adapter for the migration stream: a thin layer over :mod:`migd.wire`.

Receiving uses ``asyncio.BufferedProtocol`` so the kernel copies straight into the frame
decoder's buffer (plain ``StreamReader.read()`` was ~6x slower under uvloop, DESIGN.md §6).
Page frames are handed to a synchronous ``on_pages`` callback while their payload views are
still valid; every other message is queued for the task that drives the migration.
Sending writes ``encode()``'s buffer list with ``writelines`` and honours flow control.
"""

from __future__ import annotations

import asyncio
import logging
import time
import ssl
from collections.abc import Callable
from typing import Any

from migd import wire
from migd.errors import MigdError, ProtocolError

log = logging.getLogger(__name__)

PAGE_FRAMES = (wire.PrivatePages, wire.SharedPages, wire.ZeroPages)
PageHandler = Callable[[wire.PrivatePages | wire.SharedPages | wire.ZeroPages], None]


class StreamClosed(MigdError):
    """The peer closed the migration stream, or it broke."""


class FrameProtocol(asyncio.BufferedProtocol):
    """One migration stream connection, either side."""

    def __init__(self, on_pages: PageHandler | None = None) -> None:
        self._decoder = wire.FrameDecoder()
        self._encoder = wire.FrameEncoder()
        self._on_pages = on_pages
        self._queue: asyncio.Queue[wire.Message | BaseException] = asyncio.Queue()
        self._transport: asyncio.Transport | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._closed = asyncio.Event()
        self._close_reason: BaseException | None = None
        self.bytes_sent = 0
        self.peer: str | None = None
        self.last_activity = time.monotonic()  # when bytes last arrived (idle timeouts)
        self.peer_abort: str | None = None  # the peer's reason, if it sent ABORT
        self.connected = asyncio.Event()

    # -- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = transport  # type: ignore[assignment]
        peername = transport.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            self.peer = f"{peername[0]}:{peername[1]}"
        # Large writes go straight to the socket; pause only past a few MiB queued.
        transport.set_write_buffer_limits(high=8 << 20, low=2 << 20)
        self.connected.set()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.last_activity = time.monotonic()
        try:
            messages = self._decoder.buffer_updated(nbytes)
            for msg in messages:
                if isinstance(msg, PAGE_FRAMES):
                    if self._on_pages is None:
                        raise ProtocolError(f"unexpected {msg.TYPE.name} frame on this side of the stream")
                    self._on_pages(msg)
                else:
                    if isinstance(msg, wire.Abort):
                        self.peer_abort = msg.reason  # kept even if a later write fails first
                    self._queue.put_nowait(msg)
        except MigdError as exc:
            # The handler refused a frame (protocol, firmware or memory error): the stream is
            # over. Tell the peer why before closing, so both ends report the real reason.
            if self._close_reason is None and self._transport is not None:
                try:
                    self.write(wire.Abort(str(exc)))
                except MigdError:
                    pass
            self._fail(exc, graceful=True)

    def eof_received(self) -> bool:
        self._fail(StreamClosed("peer closed the migration stream"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(StreamClosed(f"migration stream lost: {exc}" if exc else "migration stream closed"))
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- driver API
    def set_page_handler(self, on_pages: PageHandler | None) -> None:
        """Install the synchronous consumer of page frames (destination side)."""
        self._on_pages = on_pages

    def _fail(self, exc: BaseException, *, graceful: bool = False) -> None:
        if self._close_reason is None:
            self._close_reason = exc
            self._queue.put_nowait(exc)
            self._closed.set()
            if self._transport is not None and not isinstance(exc, StreamClosed):
                if graceful:
                    self._transport.close()  # flushes the ABORT frame written just before
                else:
                    self._transport.abort()

    @property
    def close_reason(self) -> BaseException | None:
        return self._close_reason

    def write(self, msg: wire.Message) -> int:
        """Queue one message on the transport now (no await); returns the bytes framed.

        Callers ``await drain()`` between writes to respect flow control; keeping the write
        itself synchronous lets the source classify, read and write a chunk in one step.
        """
        if self._close_reason is not None:
            raise StreamClosed(f"cannot send {msg.TYPE.name}: {self._close_reason}")
        assert self._transport is not None
        parts = self._encoder.encode(msg)
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
            self._queue.put_nowait(item)  # every later receive sees the same end
            raise item
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
        return self._transport.get_write_buffer_size() if self._transport is not None else 0

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once."""
        if self._transport is not None:
            self._transport.abort()


class StreamTimeout(MigdError, TimeoutError):
    """The peer did not send the expected message in time."""


class PeerAborted(MigdError):
    """The peer ended the migration with an Abort frame; the message is its reason."""


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
