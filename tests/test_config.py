"""The daemon's configuration (migd/daemon/config.py): the ``[migration]`` bounds on unauthenticated
and stalled peers, and the documented example ``config/migd.toml``."""

from __future__ import annotations

import asyncio
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from migd.platform import identity
from migd import wire
from migd.daemon.config import (
    DEFAULT_CONNECTIONS,
    DEFAULT_HANDSHAKE_TIMEOUT_S,
    DEFAULT_KEEP_MIGRATED_COUNT,
    DEFAULT_KEEP_MIGRATED_S,
    DEFAULT_MAX_PENDING_CONNECTIONS,
    DEFAULT_STALL_TIMEOUT_S,
    Config,
    parse_config,
)
from migd.daemon.core import Daemon
from migd.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "migd.toml"


@pytest.fixture
def raw(tmp_path: Path) -> dict[str, Any]:
    """A minimal valid document: identity under tmp_path/ca, a token file."""
    state = tmp_path / "hostA"
    identity.init_host(state, tmp_path / "ca", common_name="hostA")
    token_file = state / "api.token"
    token_file.write_text("c0ffee" * 6 + "\n")
    token_file.chmod(0o600)
    return {
        "state_dir": str(state),
        "api": {"listen": "127.0.0.1:0", "token_file": str(token_file)},
        "migration": {"listen": "127.0.0.1:0"},
        "sev": {"trusted_roots": [str(tmp_path / "ca" / identity.CA_CERT)]},
    }


def _parse(raw: dict[str, Any], **migration: Any) -> Config:
    doc = {**raw, "migration": {**raw["migration"], **migration}}
    return parse_config(doc, base=Path("/"))


def test_the_bounds_default_when_absent(raw: dict[str, Any]) -> None:
    config = _parse(raw)
    assert (config.max_pending_connections, config.handshake_timeout_s, config.stall_timeout_s) == (
        DEFAULT_MAX_PENDING_CONNECTIONS, DEFAULT_HANDSHAKE_TIMEOUT_S, DEFAULT_STALL_TIMEOUT_S) == (64, 15.0, 30.0)


def test_the_bounds_are_read(raw: dict[str, Any]) -> None:
    config = _parse(raw, max_pending_connections=1, handshake_timeout_s=2, stall_timeout_s=0.5)
    assert (config.max_pending_connections, config.handshake_timeout_s, config.stall_timeout_s) == (1, 2.0, 0.5)
    assert isinstance(config.handshake_timeout_s, float)


@pytest.mark.parametrize(
    ("key", "value", "why"),
    [
        ("max_pending_connections", 0, "must be >= 1, got 0"),
        ("max_pending_connections", -3, "must be >= 1, got -3"),
        ("max_pending_connections", 1.5, "expected int, got float"),
        ("max_pending_connections", True, "expected int, got bool"),
        ("max_pending_connections", "64", "expected int, got str"),
        ("handshake_timeout_s", 0, "finite number of seconds > 0, got 0"),
        ("handshake_timeout_s", -1.0, "finite number of seconds > 0, got -1.0"),
        ("handshake_timeout_s", float("inf"), "finite number of seconds > 0, got inf"),
        ("handshake_timeout_s", float("nan"), "finite number of seconds > 0, got nan"),
        ("handshake_timeout_s", False, "expected int or float, got bool"),
        ("handshake_timeout_s", "15", "expected int or float, got str"),
        ("stall_timeout_s", 0.0, "finite number of seconds > 0, got 0.0"),
        ("stall_timeout_s", float("inf"), "finite number of seconds > 0, got inf"),
        ("stall_timeout_s", [30], "expected int or float, got list"),
    ],
)
def test_bad_bounds_are_refused_naming_the_key(raw: dict[str, Any], key: str, value: Any, why: str) -> None:
    with pytest.raises(ConfigError, match=rf"migration\.{key}.*{why}"):
        _parse(raw, **{key: value})


def test_connections_defaults_to_one_and_takes_1_to_16(raw: dict[str, Any]) -> None:
    assert _parse(raw).connections == DEFAULT_CONNECTIONS == 1
    assert wire.MAX_CONNECTIONS == 16
    for value in (1, 16):
        config = _parse(raw, connections=value)
        assert config.connections == value and type(config.connections) is int


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (0, "must be in 1..16, got 0"),
        (17, "must be in 1..16, got 17"),
        (-1, "must be in 1..16, got -1"),
        (True, "expected int in 1..16, got bool True"),
        (2.5, "expected int in 1..16, got float 2.5"),
        (2.0, "expected int in 1..16, got float 2.0"),  # TOML 2.0 is a float; only an integer is a count
        ("2", "expected int in 1..16, got str '2'"),
    ],
)
def test_bad_connections_are_refused_naming_the_key_and_the_range(raw: dict[str, Any], value: Any, why: str) -> None:
    with pytest.raises(ConfigError, match=rf"^migration\.connections.*{re.escape(why)}"):
        _parse(raw, connections=value)


def test_unknown_migration_keys_are_still_errors(raw: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'migration\.max_pending'.*max_pending_connections"):
        _parse(raw, max_pending=3)
    with pytest.raises(ConfigError, match=r"unknown key 'migration\.idle_timeout_s'.*stall_timeout_s"):
        _parse(raw, idle_timeout_s=3)


def test_the_documented_example_names_every_migration_key_with_its_default(raw: dict[str, Any]) -> None:
    """config/migd.toml documents each [migration] key; its values are the defaults, and it
    validates once its files exist."""
    example = tomllib.loads(EXAMPLE.read_text())
    documented = example["migration"]
    assert {"max_pending_connections", "handshake_timeout_s", "stall_timeout_s", "connections"} <= set(documented)
    config = _parse(raw, **{k: v for k, v in documented.items() if k != "listen"})
    assert config.connections == DEFAULT_CONNECTIONS
    assert config.max_pending_connections == DEFAULT_MAX_PENDING_CONNECTIONS
    assert config.handshake_timeout_s == DEFAULT_HANDSHAKE_TIMEOUT_S
    assert config.stall_timeout_s == DEFAULT_STALL_TIMEOUT_S


def test_the_daemon_gives_the_bounds_to_its_listener(raw: dict[str, Any]) -> None:
    config = _parse(raw, max_pending_connections=5, handshake_timeout_s=2.5)

    async def main() -> None:
        daemon = Daemon(config)
        await daemon.start()
        try:
            assert (daemon.listener.max_pending, daemon.listener.handshake_timeout_s) == (5, 2.5)
        finally:
            await daemon.shutdown()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("guests", "expected"),
    [
        ({}, (None, 86_400.0, 100)),
        ({"ram_dir": "/dev/shm/migd", "keep_migrated_s": 60, "keep_migrated_count": 0},
         (Path("/dev/shm/migd"), 60.0, 0)),
        ({"ram_dir": "ram"}, (Path("/ram"), 86_400.0, 100)),  # relative to the config's directory (base "/")
    ],
)
def test_the_guests_table_is_read(raw: dict[str, Any], guests: dict[str, Any],
                                  expected: tuple[Path | None, float, int]) -> None:
    config = parse_config({**raw, "guests": guests}, base=Path("/"))
    assert (config.ram_dir, config.keep_migrated_s, config.keep_migrated_count) == expected


@pytest.mark.parametrize(
    ("guests", "why"),
    [
        ({"keep_migrated_s": -1}, r"guests\.keep_migrated_s must be a finite number of seconds >= 0"),
        ({"keep_migrated_s": float("inf")}, r"guests\.keep_migrated_s must be a finite number"),
        ({"keep_migrated_count": -1}, r"guests\.keep_migrated_count must be >= 0"),
        ({"keep_migrated_count": 1.5}, r"guests\.keep_migrated_count: expected int, got float"),
        ({"ram_dir": 5}, r"guests\.ram_dir: expected str, got int"),
        ({"ramdir": "/x"}, r"unknown key 'guests\.ramdir'"),
    ],
)
def test_bad_guests_keys_are_refused_naming_the_key(raw: dict[str, Any], guests: dict[str, Any], why: str) -> None:
    with pytest.raises(ConfigError, match=why):
        parse_config({**raw, "guests": guests}, base=Path("/"))


def test_the_documented_example_guests_table_holds_the_defaults(raw: dict[str, Any]) -> None:
    example = tomllib.loads(EXAMPLE.read_text())["guests"]
    config = parse_config({**raw, "guests": example}, base=Path("/"))
    assert (config.keep_migrated_s, config.keep_migrated_count) == (DEFAULT_KEEP_MIGRATED_S, DEFAULT_KEEP_MIGRATED_COUNT)
