"""Text a peer sent (an ABORT reason, a migration id), made safe to log or return over REST.

A peer controls these strings: unescaped, a newline forges log lines, control characters
rewrite a terminal, and a long one floods the journal. Every such string passes through
:func:`printable` before it reaches a log line, an error message or the REST API.
"""

from __future__ import annotations

#: Longest peer string kept (characters, before escaping).
MAX_PEER_TEXT = 200


def printable(text: object, limit: int = MAX_PEER_TEXT) -> str:
    """``text`` with every non-printable character escaped (``\\n``, ``\\x1b``, ...) and cut to ``limit``.

    Printable Unicode stays as it is; what was cut is said, so a reader knows it was.
    """
    value = text if isinstance(text, str) else str(text)
    cut = len(value) - limit
    if cut > 0:
        value = value[:limit]
    escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in value)
    return f"{escaped}…(+{cut} chars)" if cut > 0 else escaped
