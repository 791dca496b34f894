"""Fixtures of the integration tests: real ``migd serve`` processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .serve_process import ServeProcess


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[dict[str, ServeProcess]]:
    """hostA and hostB under one owner CA; every process (restarts too) is stopped at the end."""
    procs = {"A": ServeProcess.start(tmp_path, "hostA"), "B": ServeProcess.start(tmp_path, "hostB")}
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()
