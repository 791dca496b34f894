"""The one error hierarchy of migd.

Every failure that crosses a module boundary is a ``MigdError``; callers catch the
precise subclass they can handle and let the rest propagate.
"""

from __future__ import annotations

from migd.abi import FirmwareStatus


class MigdError(Exception):
    """Base class of every error migd raises on purpose."""


class ConfigError(MigdError):
    """A configuration file or option is invalid."""


class ProtocolError(MigdError):
    """A peer sent bytes that do not follow the protocol (malformed, oversized, unexpected)."""


class PeerAborted(MigdError):
    """The peer ended the migration with an ABORT frame; the message is its reason (escaped)."""


class PeerProtocolError(ProtocolError):
    """The peer sent a message that is not legal in the session's phase, or that does not check out."""


class TransportError(MigdError):
    """An SEV transport structure (session blob, packet header) is malformed."""


class IntegrityError(TransportError):
    """A MAC did not verify: the data was tampered with, moved, replayed or misrouted."""


class CertificateError(MigdError):
    """A certificate is malformed, expired, of the wrong kind, or not signed by a trusted root."""


class GuestMemoryError(MigdError):
    """A guest-physical range is unaligned or outside guest RAM."""


class FirmwareError(MigdError):
    """An emulated PSP firmware command failed; ``status`` is the SEV API status code."""

    def __init__(self, status: int, message: str) -> None:
        try:
            self.status: int = FirmwareStatus(status)
            name = self.status.name
        except ValueError:
            self.status = status
            name = f"0x{status:02x}"
        super().__init__(f"firmware status {name}: {message}")
