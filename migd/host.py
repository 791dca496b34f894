"""This host's guests and migrations: the registry the daemon, the engine and the CLI share."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from migd.agent_launcher import DEFAULT_COMMAND
from migd.errors import MigdError
from migd.guest import INCOMING_MARKER, GuestDefinition, GuestState, GuestStateError, HostGuest
from migd.progress import MigrationProgress
from migd.psp import PspFirmware

log = logging.getLogger(__name__)


class GuestExists(MigdError):
    """A guest of that name already exists on this host (REST 409)."""


class UnknownGuest(MigdError):
    """No guest of that name on this host (REST 404)."""


class Host:
    """Guests live under ``state_dir/guests/NAME``; channel sockets under ``runtime_dir``."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        firmware: PspFirmware,
        *,
        runtime_dir: str | os.PathLike[str] | None = None,
        agent_command: Sequence[str] = DEFAULT_COMMAND,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.runtime_dir = Path(runtime_dir) if runtime_dir is not None else self.state_dir / "run"
        self.firmware = firmware
        self.agent_command = tuple(agent_command)
        self.guests: dict[str, HostGuest] = {}
        self.migrations: dict[str, MigrationProgress] = {}
        (self.state_dir / "guests").mkdir(parents=True, exist_ok=True)
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.removed_partial = self._remove_partial_incoming()

    def _remove_partial_incoming(self) -> list[str]:
        """Delete guests left half-received by a crash before their migration committed."""
        removed = []
        for guest_dir in sorted((self.state_dir / "guests").iterdir()):
            if (guest_dir / INCOMING_MARKER).exists():
                log.warning("removing partial incoming guest %s (its migration never committed)", guest_dir.name)
                shutil.rmtree(guest_dir, ignore_errors=True)
                removed.append(guest_dir.name)
        return removed

    def _paths(self, name: str) -> tuple[Path, Path]:
        return self.state_dir / "guests" / name, self.runtime_dir / f"{name}.sock"

    def _check_free(self, name: str) -> None:
        if name in self.guests:
            raise GuestExists(f"guest {name} already exists on this host ({self.guests[name].state.value})")
        if self._paths(name)[0].exists():
            raise GuestExists(f"guest {name}: leftover state directory {self._paths(name)[0]} exists")

    def create_guest(self, definition: GuestDefinition) -> HostGuest:
        """Define a new guest (RAM file + firmware launch)."""
        self._check_free(definition.name)
        guest_dir, socket_path = self._paths(definition.name)
        guest = HostGuest.create(
            definition, guest_dir=guest_dir, socket_path=socket_path, firmware=self.firmware,
            agent_command=self.agent_command,
        )
        self.guests[definition.name] = guest
        return guest

    def create_incoming(self, definition: GuestDefinition, handle: int) -> HostGuest:
        """Reserve the name and create the destination side of a migration."""
        self._check_free(definition.name)
        guest_dir, socket_path = self._paths(definition.name)
        guest = HostGuest.create_incoming(
            definition, guest_dir=guest_dir, socket_path=socket_path, firmware=self.firmware, handle=handle,
            agent_command=self.agent_command,
        )
        self.guests[definition.name] = guest
        return guest

    def get(self, name: str) -> HostGuest:
        """The guest called ``name``."""
        try:
            return self.guests[name]
        except KeyError:
            raise UnknownGuest(f"no guest named {name!r} on this host") from None

    async def delete(self, name: str) -> None:
        """Remove a guest that is not running."""
        guest = self.get(name)
        if guest.state in (GuestState.RUNNING, GuestState.PAUSED, GuestState.INCOMING):
            raise GuestStateError(f"guest {name} is {guest.state.value}; stop it first")
        await guest.destroy()
        del self.guests[name]

    async def discard(self, name: str) -> None:
        """Remove every trace of a guest whatever its state (failed incoming migration)."""
        guest = self.guests.pop(name, None)
        if guest is not None:
            await guest.destroy()

    async def close(self) -> None:
        """Stop every running guest (RAM files stay) and drop half-received ones."""
        for guest in list(self.guests.values()):
            if guest.state is GuestState.INCOMING:
                await self.discard(guest.name)
            elif guest.state in (GuestState.RUNNING, GuestState.PAUSED):
                await guest.stop()
