"""RESOLVE: how a destination in doubt learns from the source whether a migration committed.

A destination that sent PREPARED and then lost the stream (or waited in vain for COMMIT)
may hold the only copy of the guest: the source may have committed and lost only the COMMIT
frame. It asks the source's migration listener on a new connection (``RESOLVE``); the source
answers from its own record (``RESOLVED``). Both messages are authenticated under that
migration's hand-off key (:mod:`migd.session_auth`): only the migration's destination can
ask, and only its source can answer — a forged ``committed`` would start a second copy, a
forged ``aborted`` would discard the only one.

Here: the asking side (:func:`ask_source`, used live by ``migd.dest`` and after a restart by
``migd.daemon.recovery``) and the answering side (:func:`answer`, on the source's listener).
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING

from migd import wire
from migd.peer_text import printable
from migd.session_auth import AuthenticationError, check_resolve, check_resolved, resolve_request, resolved_answer
from migd.stream import open_stream

if TYPE_CHECKING:  # the host registry imports the recovery that imports this: types only
    from migd.host import Host

log = logging.getLogger(__name__)


async def ask_source(address: str, migration_id: str, key: bytes, *, client_ssl: ssl.SSLContext | None = None,
                     timeout: float = 10.0) -> str:
    """One authenticated RESOLVE to the source's listener at ``host:port``; its verified answer.

    Raises MigdError (AuthenticationError for an answer that does not verify), OSError or
    TimeoutError if the source cannot be asked right now.
    """
    host, _, port = address.rpartition(":")
    request = resolve_request(migration_id, key)
    stream = await open_stream(host, int(port), ssl_context=client_ssl, timeout=timeout)
    try:
        stream.write(request)
        answer: wire.Resolved = await stream.expect(wire.Resolved, timeout)
    finally:
        stream.close()
    return check_resolved(answer, request, key)


def resolution(host: Host, migration_id: str) -> str:
    """How an outgoing migration of this host ended (``wire.RESOLUTIONS``), from memory or the journal.

    ``unknown``: this host was not the source of that migration (or no longer remembers it).
    """
    progress = host.migrations.get(migration_id)
    if progress is not None and progress.role == "source":
        if progress.phase.committed:
            return "committed"
        return "aborted" if progress.status.finished else "pending"
    if host.journal is not None:
        for record in host.journal.migrations():
            if record.id == migration_id and record.role == "source":
                return "committed" if record.committed else "aborted"
    return "unknown"


def answer(host: Host, request: wire.Resolve, peer: str) -> wire.Resolved | None:
    """The source's authenticated answer to ``request``, or None if the asker is not that migration's destination.

    Nothing is said to a peer that cannot prove it: not even whether the migration exists.
    """
    key = host.handoff_key(request.migration_id)
    if key is None:
        log.warning("RESOLVE refused migration=%s from=%s: no such outgoing migration with a session here",
                    printable(request.migration_id), printable(peer))
        return None
    try:
        check_resolve(request, key)
    except AuthenticationError as exc:
        log.warning("RESOLVE refused migration=%s from=%s: %s", printable(request.migration_id), printable(peer), exc)
        return None
    outcome = resolution(host, request.migration_id)
    if outcome == "unknown":
        # Only the source of a migration answers for it. A destination holds the same key: its
        # own listener must never answer its own question (a reflected RESOLVE), nor anyone's.
        log.warning("RESOLVE refused migration=%s from=%s: this host is not that migration's source",
                    printable(request.migration_id), printable(peer))
        return None
    log.info("RESOLVE migration=%s from=%s: %s", printable(request.migration_id), printable(peer), outcome)
    return resolved_answer(request, outcome, key)

