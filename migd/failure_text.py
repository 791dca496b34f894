"""One sentence per failure, for the people who read it: the migration's ``error`` and the CLI.

A Python exception's ``str()`` is written for a programmer (``[Errno 111] Connect call failed
('10.0.0.2', 4444)``, ``[Errno -2] Name or service not known``, an empty ``TimeoutError``); the
operator needs what happened, where, and the likely fix. :func:`cause_of` sorts an exception into
a :class:`Cause` (by errno and type, never by message text), and :func:`describe` turns it into
that sentence for a migration peer. migd's own errors (:class:`~migd.errors.MigdError`) already
say what was expected and what came: their text is kept, only scrubbed of OS error numbers, so a
message written at the place that knows better (the TLS connect, a session deadline) is never
overridden here.

The source (migd/source.py) and the destination (migd/dest.py) both describe their failures
with :func:`describe`; the CLI (migd/cli/client.py) uses :func:`cause_of` for its own
connection to the daemon's API.
"""

from __future__ import annotations

import enum
import errno
import re
import socket
import ssl

from migd.errors import MigdError

#: "[Errno 104] " in an OS error's text, and OpenSSL's "[SSL: WRONG_VERSION_NUMBER] " and " (_ssl.c:1006)"
#: around its reason: codes for the log, noise for the operator (the words next to them stay).
_ERRNO_PREFIX = re.compile(r"\[Errno -?\d+\]\s*|\[SSL(?:: [A-Z0-9_]+)?\]\s*|\s*\(_ssl\.c:\d+\)")
#: asyncio's create_connection, when several addresses of a name all failed, raises a plain
#: OSError("Multiple exceptions: [Errno 111] ..., [Errno 111] ...") without an errno.
_EMBEDDED_ERRNO = re.compile(r"\[Errno (-?\d+)\]")

_UNREACHABLE = frozenset({errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETDOWN})
_RESET = frozenset({errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE})


class Cause(enum.Enum):
    """What kind of failure an exception is, as far as the person reading about it cares."""

    MIGD = "migd"  # a MigdError: its own text says it
    REFUSED = "refused"  # ECONNREFUSED: nothing listens on that address and port
    UNRESOLVED = "unresolved"  # the host name does not resolve (getaddrinfo failed)
    UNREACHABLE = "unreachable"  # no route, network or host down
    TIMEOUT = "timeout"  # a wait ran out of time, with no text of its own
    RESET = "reset"  # an established connection was reset or broken
    TLS = "tls"  # a TLS handshake or record failed
    NO_SOCKET = "no-socket"  # a path (unix socket, file) does not exist
    PERMISSION = "permission"  # the OS refused access
    OS = "os"  # another OS error: its strerror says it
    INTERNAL = "internal"  # anything else: a bug here, the traceback belongs in the log


def _errno_of(exc: OSError) -> int | None:
    if exc.errno is not None:
        return exc.errno
    found = {int(n) for n in _EMBEDDED_ERRNO.findall(str(exc))}
    return found.pop() if len(found) == 1 else None


def cause_of(exc: BaseException) -> Cause:
    """Sort ``exc`` into a :class:`Cause` by its type and errno."""
    if isinstance(exc, MigdError):
        return Cause.MIGD
    # Before OSError: SSLError and gaierror are OSErrors whose errno means something else.
    if isinstance(exc, ssl.SSLError):
        return Cause.TLS
    if isinstance(exc, socket.gaierror):
        return Cause.UNRESOLVED
    if isinstance(exc, TimeoutError):
        return Cause.TIMEOUT  # asyncio.timeout's is bare: which wait it was is the caller's ``step``
    if isinstance(exc, OSError):
        code = _errno_of(exc)
        if code == errno.ECONNREFUSED:
            return Cause.REFUSED
        if code in _UNREACHABLE:
            return Cause.UNREACHABLE
        if code == errno.ETIMEDOUT:
            return Cause.TIMEOUT
        if code in _RESET:
            return Cause.RESET
        if code == errno.ENOENT:
            return Cause.NO_SOCKET
        if code in (errno.EACCES, errno.EPERM):
            return Cause.PERMISSION
        return Cause.OS
    return Cause.INTERNAL


def scrub(text: str) -> str:
    """``text`` without OS error numbers and OpenSSL codes ("[Errno 104] Connection reset" → "Connection reset")."""
    return _ERRNO_PREFIX.sub("", text).strip()


def os_reason(exc: OSError) -> str:
    """The OS's own words for ``exc``, lower-case first letter, with the file it concerns if any."""
    text = exc.strerror or scrub(str(exc)) or "unknown operating-system error"
    text = text[:1].lower() + text[1:]
    return f"{text}: {exc.filename}" if exc.filename else text


def tls_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's reason code in words (``WRONG_VERSION_NUMBER`` → "wrong version number")."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if exc.reason:
        return exc.reason.lower().replace("_", " ")
    return scrub(exc.strerror or str(exc)) or "the TLS handshake failed"


def host_of(peer: str) -> str:
    """The host part of ``HOST:PORT`` (``[v6]:port`` too)."""
    host = peer.rpartition(":")[0] if ":" in peer else peer
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def describe(exc: BaseException, *, peer: str, peer_role: str, step: str) -> str:
    """One sentence for the migration's ``error``: what failed, with whom, in which step, the likely fix.

    ``peer`` is the other end (``HOST:PORT``), ``peer_role`` what it is ("destination" or
    "source"), ``step`` what this side was doing ("the handshake", "pre-copy", ...).
    A :class:`MigdError`'s own text is kept (scrubbed of OS error numbers).
    """
    cause = cause_of(exc)
    if cause is Cause.MIGD:
        text = scrub(str(exc))
        return text or f"the migration failed during {step} without a recorded reason; see this daemon's log"
    if cause is Cause.REFUSED:
        return (f"nothing is listening on {peer}: is migd running on the {peer_role} host, and is its "
                f"migration.listen that port?")
    if cause is Cause.UNRESOLVED:
        host = host_of(peer)
        return f"the {peer_role} host name {host} does not resolve: check the name, or give an IP address"
    if cause is Cause.UNREACHABLE:
        assert isinstance(exc, OSError)
        return (f"{peer} is unreachable ({os_reason(exc)}): check the address, the route and any firewall "
                f"between the hosts")
    if cause is Cause.TIMEOUT:
        return (f"timed out during {step} with the {peer_role} at {peer}: the link or the {peer_role} "
                f"is too slow or has stopped; see both daemons' logs")
    if cause is Cause.RESET:
        assert isinstance(exc, OSError)
        return (f"the connection to the {peer_role} at {peer} broke during {step} ({os_reason(exc)}): "
                f"the {peer_role} daemon may have stopped or restarted; see its log")
    if cause is Cause.TLS:
        assert isinstance(exc, ssl.SSLError)
        return (f"the TLS connection with the {peer_role} at {peer} failed during {step} ({tls_reason(exc)}): "
                f"both hosts need a [tls] table with certificates under the same tls.ca, or neither")
    if cause in (Cause.NO_SOCKET, Cause.PERMISSION, Cause.OS):
        assert isinstance(exc, OSError)
        return f"{os_reason(exc)} (during {step})"
    return (f"an internal error ended the migration during {step}; this daemon's log has the details "
            f"(please report it)")


def describe_file_job(exc: BaseException, *, path: str, step: str) -> str:
    """One sentence for a save's or restore's ``error`` (the other end is a file, not a host)."""
    cause = cause_of(exc)
    if cause is Cause.MIGD:
        return scrub(str(exc)) or f"the job failed during {step} without a recorded reason; see this daemon's log"
    if cause is Cause.TIMEOUT:
        return f"timed out during {step}: the guest's agent did not answer in time; see this daemon's log"
    if isinstance(exc, OSError):
        return f"{os_reason(exc)} (during {step}, file {path})"
    return (f"an internal error ended the job during {step}; this daemon's log has the details "
            f"(please report it)")
