"""A connection driven by one thread's blocking calls, and shut from any thread.

A further connection of a migration needs no event loop on either end: the source's thread
writes its page frames (migd/lane_socket.py), the destination's reads and places them
(migd/lane_receiver.py). Both open it in that thread too (an asyncio TLS transport cannot be
handed to a thread). What they share is here: every opening step bounded by the handshake
deadline, and :meth:`ThreadSocket.shutdown`, which ends any blocking call under way at once.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from migd import wire
from migd.errors import ProtocolError
from migd.stream import MAX_FRAME_BEFORE_AUTHENTICATION, StreamClosed, StreamTimeout

_RECEIVE_BYTES = 4096


class ThreadSocket:
    """One socket: adopted and used by one thread, shut from any; ``name`` says which in errors."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()  # the socket's adoption and closing against its shutdown
        self._sock: socket.socket | None = None
        self._shut = False

    @property
    def shut(self) -> bool:
        """:meth:`shutdown` was called: nothing more is read or written."""
        return self._shut

    def _adopt(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            if self._shut:
                sock.close()
                raise StreamClosed(f"{self.name} was closed by this side")
            self._sock = sock
        return sock

    def _check_shut(self, step: str | None = None) -> None:
        if self._shut:
            during = "" if step is None else f" during {step}"
            raise StreamClosed(f"{self.name} was closed by this side{during}")

    def _within(self, sock: socket.socket, deadline: float, step: str, call: Callable[[], object]) -> None:
        # Shut before, during or after the call, the opening ends here: a socket shut before its
        # connect started is only marked (ENOTCONN), and the connect then returns at once with
        # the SYN still unanswered, after which a write would spin until the deadline (found by
        # an adversarial review).
        self._check_shut(step)
        left = deadline - time.monotonic()
        if left <= 0:
            raise StreamTimeout(f"{step} took longer than the handshake timeout")
        sock.settimeout(left)
        try:
            call()
        except TimeoutError:
            self._check_shut(step)
            raise StreamTimeout(f"{step} took longer than the handshake timeout") from None
        except OSError:
            self._check_shut(step)
            raise
        self._check_shut(step)

    def _receive_exactly(self, sock: socket.socket, n: int, deadline: float, step: str) -> bytes:
        """``n`` bytes, within the deadline (StreamClosed if the peer ends first)."""
        data = bytearray()
        while len(data) < n:
            got = b""

            def receive() -> None:
                nonlocal got
                got = sock.recv(n - len(data))

            self._within(sock, deadline, step, receive)
            if not got:
                raise StreamClosed(f"the peer closed {self.name} during {step}")
            data += got
        return bytes(data)

    def _receive_control(self, sock: socket.socket, decoder: wire.FrameDecoder, deadline: float,
                         step: str) -> wire.Message:
        """The peer's next frame, alone (a control frame: the decoder is bounded to their size
        until the peer is authenticated), within the deadline.

        The peer waits for this side's answer before it sends anything more: another frame, or
        part of one, behind it is a ProtocolError."""
        decoder.max_frame = MAX_FRAME_BEFORE_AUTHENTICATION
        data = bytearray(_RECEIVE_BYTES)
        while True:
            got = 0

            def receive() -> None:
                nonlocal got
                got = sock.recv_into(data)

            self._within(sock, deadline, step, receive)
            if got == 0:
                raise StreamClosed(f"the peer closed {self.name} before {step}")
            messages = decoder.feed(memoryview(data)[:got])
            if messages:
                if len(messages) > 1 or decoder.pending_bytes:
                    raise ProtocolError(f"more than one frame where {step} was due")
                return messages[0]

    # -- any thread
    def shutdown(self) -> None:
        """End the connection's traffic (idempotent): a blocking call under way in its thread fails
        at once; what was written is still delivered (FIN after it). The descriptor stays open
        until :meth:`close`, which only its thread's end may allow."""
        with self._lock:
            self._shut = True
            if self._sock is not None:
                try:
                    # The plain socket's shutdown, also on a TLS socket: SSLSocket.shutdown would
                    # drop its TLS state under a call that its thread may be in.
                    socket.socket.shutdown(self._sock, socket.SHUT_RDWR)
                except OSError:
                    pass  # not connected (yet, or any more)

    def close(self) -> None:
        """Shut and close the socket: only once its thread is done with it (idempotent)."""
        self.shutdown()
        with self._lock:
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()
