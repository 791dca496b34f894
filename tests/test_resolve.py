"""RESOLVE (migd/resolve.py): only the migration's source answers, only its destination may ask."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from migd import resolve, wire
from migd.migration_state import MigrationStatus
from migd.progress import MigrationProgress
from migd.session_auth import AuthenticationError, check_resolved, resolve_request, resolved_answer

KEY = os.urandom(32)


@dataclass
class Records:
    """What resolve.answer needs of a Host: its migrations and their hand-off keys (no journal)."""

    migrations: dict[str, object] = field(default_factory=dict)
    journal: object | None = None
    keys: dict[str, bytes] = field(default_factory=dict)

    def handoff_key(self, migration_id: str) -> bytes | None:
        return self.keys.get(migration_id)


def _host_with(role: str, committed: bool) -> tuple[Records, str]:
    progress = MigrationProgress("g1", role, "peer", 256)
    if committed:
        progress.phase.advance(MigrationStatus.ACTIVE, 1.0)
        progress.phase.advance(MigrationStatus.STOP_COPY, 2.0)
        progress.phase.commit()
    return Records({progress.id: progress}, keys={progress.id: KEY}), progress.id


def test_the_source_answers_its_destination() -> None:
    host, mid = _host_with("source", committed=True)
    question = resolve_request(mid, KEY)
    answer = resolve.answer(host, question, "peer")
    assert answer is not None and check_resolved(answer, question, KEY) == "committed"


def test_a_destination_never_answers_even_its_own_question() -> None:
    """The reflection: a destination in doubt whose RESOLVE is routed to its own listener. It holds
    the same key, but it is not the source: no answer (before, it said "unknown" and the
    destination discarded what may have been the only copy)."""
    host, mid = _host_with("destination", committed=False)
    assert resolve.answer(host, resolve_request(mid, KEY), "itself") is None


def test_a_question_without_the_key_gets_no_answer() -> None:
    host, mid = _host_with("source", committed=True)
    assert resolve.answer(host, resolve_request(mid, os.urandom(32)), "forger") is None
    assert resolve.answer(host, wire.Resolve(mid), "forger") is None


def test_a_question_cannot_pass_for_an_answer_nor_an_old_answer_for_a_new_one() -> None:
    host, mid = _host_with("source", committed=True)
    question = resolve_request(mid, KEY)
    reflected = wire.Resolved(mid, "aborted", question.mac)  # the question's MAC, replayed as an answer
    with pytest.raises(AuthenticationError):
        check_resolved(reflected, question, KEY)
    old_answer = resolved_answer(resolve_request(mid, KEY), "aborted", KEY)  # another question's nonce
    with pytest.raises(AuthenticationError):
        check_resolved(old_answer, question, KEY)
    assert check_resolved(resolved_answer(question, "aborted", KEY), question, KEY) == "aborted"  # control
