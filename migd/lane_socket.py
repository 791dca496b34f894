"""A further connection of a migration as a blocking socket, owned by that connection's thread.

With several connections the source's event loop used to frame, checksum and write every
connection's page frames: in a profile of a 2-connection migration (2 GiB, 50 % private,
py-spy on the source daemon) ``FrameProtocol.write`` was ~40 % of the loop's time, its CRC-32
and the socket write. A further connection carries JOIN, then page frames only, and nothing is
read from it after JOINED (the destination's ABORT comes on the first connection), so it needs
no event loop: its thread (migd/send_lane.py) seals a run, frames it and writes it, and the
CRC, TLS and the kernel copy release the GIL.

The connection is opened in that thread too (an asyncio TLS transport cannot be handed to a
thread): connect, the lane preamble (in the clear: the listener hands the connection to a
thread of its own before TLS, migd/lane_receiver.py), TLS handshake, JOIN, JOINED, all within
the handshake timeout, to the address
the first connection reached (so a name that resolves to several hosts cannot split a migration).

Every blocking call can be ended from the event loop: :meth:`LaneSocket.shutdown` shuts the
socket (a connect, handshake, read or write under way fails at once). Writes have no deadline of
their own: a peer that stops reading blocks the thread, the source's event loop sees no bytes
leave (``bytes_consumed``), ends the migration at its stall deadline and shuts the socket.
"""

from __future__ import annotations

import socket
import ssl
import time

from migd import wire
from migd.errors import PeerAborted
from migd.stream import TLS_WRITE_BYTES, StreamClosed
from migd.thread_socket import ThreadSocket

#: How long one blocking write waits before it looks again whether the socket was shut. A shut
#: socket wakes the write at once; this only bounds a wake-up the kernel did not deliver.
WRITE_POLL_S = 1.0
_RECEIVE_BYTES = 4096


class LaneSocket(ThreadSocket):
    """One further connection: opened and written by one thread, shut from any.

    ``peer_abort`` and ``write_buffer_size()`` answer like a :class:`~migd.stream.FrameProtocol`'s
    (nothing is read, nothing is buffered past the write under way).
    """

    peer_abort: str | None = None

    def __init__(self, index: int) -> None:
        super().__init__(f"connection {index + 1}")
        self.index = index
        self._encoder = wire.FrameEncoder()
        #: Bytes written so far (the kernel or TLS has them; their buffers are free again).
        self.bytes_sent = 0

    # -- its thread
    def open(self, address: tuple[str, int] | tuple[str, int, int, int], join: wire.Join,
             ssl_context: ssl.SSLContext | None, server_hostname: str, timeout: float) -> wire.Message:
        """Connect to ``address``, TLS if ``ssl_context``, write ``join``; returns the first frame
        the peer answers (JOINED, or its ABORT as PeerAborted), all within ``timeout``.

        Errors: OSError (connect), ssl.SSLError, StreamTimeout, StreamClosed, ProtocolError,
        PeerAborted, and StreamClosed if the socket was shut meanwhile.
        """
        deadline = time.monotonic() + timeout
        family = socket.AF_INET6 if len(address) == 4 else socket.AF_INET
        sock = self._adopt(socket.socket(family, socket.SOCK_STREAM))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's transports do
        try:
            self._within(sock, deadline, "the connection", lambda: sock.connect(address))
            # In the clear, before TLS: the listener hands such a connection to a thread of its own.
            self._within(sock, deadline, "the lane preamble", lambda: sock.sendall(wire.LANE_PREAMBLE))
            if ssl_context is not None:
                tls = ssl_context.wrap_socket(sock, server_hostname=server_hostname, do_handshake_on_connect=False)
                sock = self._adopt(tls)
                self._within(sock, deadline, "the TLS handshake", tls.do_handshake)
            for part in self._encoder.encode(join):
                self._within(sock, deadline, "JOIN", lambda part=part: sock.sendall(part))
            reply = self._receive_control(sock, wire.FrameDecoder(initial=_RECEIVE_BYTES), deadline, "JOINED")
        except BaseException:
            self.shutdown()
            raise
        sock.settimeout(WRITE_POLL_S)
        if isinstance(reply, wire.Abort):
            self.shutdown()
            raise PeerAborted(reply.reason)
        return reply

    def write(self, msg: wire.Message) -> int:
        """Frame ``msg`` and write it all (blocks while the peer does not read); returns its bytes."""
        sock = self._sock
        if sock is None or self._shut:
            raise StreamClosed(f"cannot send {msg.TYPE.name}: connection {self.index + 1} is closed")
        parts = self._encoder.encode(msg)
        try:
            if isinstance(sock, ssl.SSLSocket):
                nbytes = self._write_tls(sock, parts)
            else:
                nbytes = self._write_plain(sock, parts)
        except OSError as exc:
            if self._shut:
                raise StreamClosed(f"connection {self.index + 1} was closed by this side") from exc
            raise StreamClosed(f"connection {self.index + 1} lost: {exc.strerror or exc}") from exc
        return nbytes

    def _write_plain(self, sock: socket.socket, parts: list[bytes | memoryview]) -> int:
        # One sendmsg for the frame's header, payload and CRC; resumed where a short write stopped.
        views = [memoryview(part).cast("B") for part in parts]
        total = sum(len(v) for v in views)
        while views:
            try:
                sent = sock.sendmsg(views)
            except TimeoutError:
                self._check_shut()
                continue
            self.bytes_sent += sent
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views.pop(0))
                else:
                    views[0] = views[0][sent:]
                    sent = 0
        return total

    def _write_tls(self, sock: ssl.SSLSocket, parts: list[bytes | memoryview]) -> int:
        # SSL_write of a whole 2 MiB payload would hold it for one deadline; pieces of
        # TLS_WRITE_BYTES each get their own. After a timeout the same piece is written again,
        # as OpenSSL requires (it resumes the records already sent).
        total = 0
        for part in parts:
            view = memoryview(part).cast("B")
            for offset in range(0, len(view), TLS_WRITE_BYTES):
                piece = view[offset:offset + TLS_WRITE_BYTES]
                while True:
                    try:
                        sock.write(piece)
                        break
                    except TimeoutError:
                        self._check_shut()
                self.bytes_sent += len(piece)
            total += len(view)
        return total

    def bytes_consumed(self) -> int:
        """Bytes written so far: nothing waits in a buffer of ours."""
        return self.bytes_sent

    def write_buffer_size(self) -> int:
        """Nothing is queued past the frame being written."""
        return 0
