"""Shared fixtures: hosts with real identities under one owner CA."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from migd.platform import identity
from migd.platform.psp import PspFirmware
from migd.sev_transport import TransportMode

#: The fault-suite reliability table (``--reliability-json PATH``; inert without it).
pytest_plugins = ["reliability"]


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    """The owner CA directory shared by every host of a test."""
    return tmp_path / "ca"


@pytest.fixture
def make_firmware(tmp_path: Path, ca_dir: Path) -> Callable[..., PspFirmware]:
    """Factory: ``make_firmware("hostA")`` → a PspFirmware with its own PDH under the test's CA."""

    def make(name: str, transport_mode: TransportMode = TransportMode.BOUND) -> PspFirmware:
        state_dir = tmp_path / name
        identity.init_host(state_dir, ca_dir, common_name=name)
        return PspFirmware.from_state_dir(state_dir, [ca_dir / identity.CA_CERT], transport_mode=transport_mode)

    return make


@pytest.fixture
def shm_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one: there reading a hole through the mapping allocates it."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="migd-test-", dir=shm))
        try:
            yield d
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path
