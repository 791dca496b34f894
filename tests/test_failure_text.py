"""migd/failure_text.py: each kind of exception → one sentence with the peer, the step and the fix.

The exceptions are real where this host can make them (a refused connect, an unresolvable name,
a TLS client fed plain bytes, a bare asyncio timeout, a missing file); the others (no route to
host, a reset, EACCES) are built with the errno the kernel would give. :func:`class_names_in`
is the check every CLI message passes (tests/test_cli_errors.py uses it too); its negative
control is the old ``_reason`` of migd/source.py, replicated below, whose texts it flags.
"""

from __future__ import annotations

import asyncio
import builtins
import errno
import os
import re
import socket
import ssl
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

import migd.cli.client
import migd.dest
import migd.errors
import migd.guest.channel
import migd.session
import migd.source
import migd.stream
from migd import failure_text
from migd.errors import MigdError
from migd.failure_text import Cause, cause_of, describe
from migd.session import SessionTimeout

PEER = "127.0.0.1:4444"


def _exception_class_names() -> frozenset[str]:
    modules = (builtins, ssl, socket, asyncio, aiohttp, migd.errors, migd.stream, migd.session, migd.source,
               migd.dest, migd.cli.client, migd.guest.channel)
    return frozenset(obj.__name__ for module in modules for obj in vars(module).values()
                     if isinstance(obj, type) and issubclass(obj, BaseException))


#: Any exception class name, an OS error number, a traceback, "Xxx:" as Python prints an exception,
#: or the libraries' own texts (aiohttp's "ssl:default [Connect call failed ...]", OpenSSL's "[SSL: ...]").
_FORBIDDEN = re.compile(r"ssl:default|Connect call failed|\[SSL:|_ssl\.c|\b(?:%s)\b|Errno|Traceback|\b[A-Z]\w*Error:" % "|".join(
    sorted(map(re.escape, _exception_class_names()), key=len, reverse=True)))


def class_names_in(text: str) -> list[str]:
    """What in ``text`` is a programmer's view of a failure (class names, errnos): must be empty."""
    return _FORBIDDEN.findall(text)


def _old_source_reason(exc: BaseException) -> str:
    """migd/source.py's ``_reason`` before the shared helper (the negative control)."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, MigdError) else text


def _refused() -> BaseException:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again below: nothing listens there
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError as exc:
        return exc
    raise AssertionError("a connect to a closed port succeeded")


def _unresolved() -> BaseException:
    try:
        socket.getaddrinfo("nonexistent.invalid", 4444)  # RFC 6761: .invalid never resolves
    except OSError as exc:
        return exc
    raise AssertionError("nonexistent.invalid resolved")


def _bare_timeout() -> BaseException:
    async def wait() -> None:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)

    try:
        asyncio.run(wait())
    except TimeoutError as exc:
        return exc
    raise AssertionError("no timeout")


def _tls_fed_plain_bytes() -> BaseException:
    """A TLS client whose peer answers in plain migd frames: what a TLS source meets at a plain destination."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    incoming.write(b"\x00\x00\x00\x10" + b"plain frame bytes, not a TLS record")
    try:
        client.do_handshake()
    except ssl.SSLError as exc:
        return exc
    raise AssertionError("the handshake took plain bytes")


def _missing_file(tmp: Path) -> BaseException:
    try:
        (tmp / "absent.ram").open()
    except OSError as exc:
        return exc
    raise AssertionError("opened a missing file")


def _unverified_certificate() -> BaseException:
    exc = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    exc.reason, exc.verify_message = "CERTIFICATE_VERIFY_FAILED", "unable to get local issuer certificate"
    return exc


#: (id, how to make the exception, its Cause, phrases the sentence must contain).
CASES: list[tuple[str, Callable[[Path], BaseException], Cause, tuple[str, ...]]] = [
    ("refused", lambda _: _refused(), Cause.REFUSED,
     (f"nothing is listening on {PEER}", "is migd running on the destination host", "migration.listen")),
    ("refused-on-every-address", lambda _: OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('::1', 4444, 0, 0), "
        "[Errno 111] Connect call failed ('127.0.0.1', 4444)"), Cause.REFUSED, ("nothing is listening",)),
    ("unresolved", lambda _: _unresolved(), Cause.UNRESOLVED,
     ("destination host name 127.0.0.1 does not resolve", "give an IP address")),
    ("no-route", lambda _: OSError(errno.EHOSTUNREACH, os.strerror(errno.EHOSTUNREACH)), Cause.UNREACHABLE,
     (f"{PEER} is unreachable (no route to host)", "firewall")),
    ("network-down", lambda _: OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH)), Cause.UNREACHABLE,
     ("unreachable (network is unreachable)",)),
    ("bare-timeout", lambda _: _bare_timeout(), Cause.TIMEOUT, ("timed out during pre-copy", PEER)),
    ("connect-timed-out", lambda _: OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT)), Cause.TIMEOUT,
     ("timed out during pre-copy",)),
    ("reset", lambda _: ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET)), Cause.RESET,
     ("broke during pre-copy (connection reset by peer)", "may have stopped or restarted")),
    ("broken-pipe", lambda _: BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE)), Cause.RESET,
     ("broke during pre-copy (broken pipe)",)),
    ("tls-plain-peer", lambda _: _tls_fed_plain_bytes(), Cause.TLS,
     (f"the TLS connection with the destination at {PEER} failed", "wrong version number", "[tls]")),
    ("tls-unverified", lambda _: _unverified_certificate(), Cause.TLS,
     ("certificate verify failed: unable to get local issuer certificate", "tls.ca")),
    ("missing-file", _missing_file, Cause.NO_SOCKET, ("no such file or directory: ", "absent.ram")),
    ("permission", lambda _: PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/run/migd/g1.ram"),
     Cause.PERMISSION, ("permission denied: /run/migd/g1.ram",)),
    ("disk-full", lambda _: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), Cause.OS,
     ("no space left on device (during pre-copy)",)),
    ("session-deadline", lambda _: SessionTimeout("stall", "the destination took nothing for 2 s during pre-copy"),
     Cause.MIGD, ("the destination took nothing for 2 s during pre-copy",)),
    ("migd-text-with-errno", lambda _: MigdError("migration stream lost: [Errno 104] Connection reset by peer"),
     Cause.MIGD, ("migration stream lost: Connection reset by peer",)),
    ("migd-text-with-openssl-codes", lambda _: MigdError(
        "TLS: the destination does not speak TLS: [SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)"),
     Cause.MIGD, ("TLS: the destination does not speak TLS: wrong version number",)),
    ("migd-without-text", lambda _: MigdError(), Cause.MIGD,
     ("failed during pre-copy without a recorded reason", "log")),
    ("bug", lambda _: KeyError("npages"), Cause.INTERNAL, ("an internal error ended the migration during pre-copy",
                                                            "please report it")),
]


@pytest.mark.parametrize("make, cause, phrases", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_kind_of_failure_is_one_sentence_with_the_peer_the_step_and_the_fix(
    make: Callable[[Path], BaseException], cause: Cause, phrases: tuple[str, ...], tmp_path: Path,
) -> None:
    exc = make(tmp_path)
    assert cause_of(exc) is cause
    text = describe(exc, peer=PEER, peer_role="destination", step="pre-copy")
    for phrase in phrases:
        assert phrase in text, (phrase, text)
    assert class_names_in(text) == [], text
    assert "\n" not in text and not text.endswith(".")


#: The cases whose old text had something to hide (every non-migd one; migd texts with codes in them).
_OLD_FLAGGED = [c for c in CASES if c[2] is not Cause.MIGD or re.search(r"Errno|_ssl\.c", str(c[1](Path())))]


@pytest.mark.parametrize("make", [c[1] for c in _OLD_FLAGGED], ids=[c[0] for c in _OLD_FLAGGED])
def test_the_old_texts_are_what_the_check_flags(make: Callable[[Path], BaseException], tmp_path: Path) -> None:
    """Negative control: the replaced ``_reason`` showed class names or errnos for each of these."""
    assert class_names_in(_old_source_reason(make(tmp_path)))


def test_the_check_flags_the_messages_of_the_issue() -> None:
    for old in ("TimeoutError: TimeoutError", "gaierror: [Errno -2] Name or service not known",
                "ConnectionRefusedError: [Errno 111] Connect call failed ('127.0.0.1', 4444)",
                "cannot reach the migd API at http://127.0.0.1:1: Cannot connect to host 127.0.0.1:1 ssl:default "
                "[Connect call failed ('127.0.0.1', 1)]",
                "SSLError: [SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)",
                "MigrationFailed: could not connect"):
        assert class_names_in(old), old
    # ... and not ordinary words: "timeout", "error", "TLS", "PREPARED", a MiB/s figure.
    assert class_names_in("migd: error: the destination did not complete the handshake within 2 s (await-welcome): "
                          "migration.handshake_timeout_s; 12.5 MiB/s; TLS; PREPARED") == []


def test_a_name_is_resolved_where_the_address_says() -> None:
    text = describe(_unresolved(), peer="nonexistent.invalid:4444", peer_role="destination", step="the connection")
    assert text == ("the destination host name nonexistent.invalid does not resolve: check the name, or give an "
                    "IP address")
    assert failure_text.host_of("[fd00::1]:4444") == "fd00::1"


def test_the_source_and_the_destination_use_the_same_helper() -> None:
    """Both drivers' ``_reason`` end in :func:`describe` (the two used to differ for empty texts)."""
    for module, role in ((migd.source, "destination"), (migd.dest, "source")):
        phase = migd.session.Phase.PRECOPY if module is migd.source else migd.session.Phase.RECEIVING
        assert module._reason(TimeoutError(), "10.0.0.2:4444", phase) == describe(
            TimeoutError(), peer="10.0.0.2:4444", peer_role=role, step="pre-copy")
        assert module._reason(MigdError(), "10.0.0.2:4444", phase) == describe(
            MigdError(), peer="10.0.0.2:4444", peer_role=role, step="pre-copy")
