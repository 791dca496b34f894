"""systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram per message."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger(__name__)


class Notifier:
    """Sends ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``; a no-op when not run by systemd."""

    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: str | int) -> bool:
        """Send e.g. ``notify(READY=1, STATUS="...")``; returns whether it was sent."""
        if self._sock is None or not self.address:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        # A leading '@' names a socket in the abstract namespace.
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            self._sock.sendto(message, target)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self.address, exc)
            return False
        return True

    def watchdog_interval(self) -> float | None:
        """Half of ``$WATCHDOG_USEC`` in seconds when the watchdog is on for this process."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 2_000_000
        except ValueError:
            return None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
