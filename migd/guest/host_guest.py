"""One guest on this host: RAM file, firmware context, KVM-side platform, channel and agent.

This is what the daemon manages and what a migration moves. The host never reads the
guest's key: it asks the firmware, and only :func:`migd.guest.agent_launcher.launch_agent`
receives the VEK to hand to the agent (the CPU key slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migd.abi import PAGE_SIZE, MiB
from migd.guest.agent_launcher import DEFAULT_COMMAND, AgentProcess, AgentSpec, launch_agent
from migd.guest.channel import CheckReport, GuestChannel
from migd.errors import ConfigError, MigdError
from migd.platform.memory import GuestRam
from migd.platform.psp import PspFirmware
from migd.guest.vm import VmConfig, VmPlatform
from migd.guest.workload import WorkloadConfig

log = logging.getLogger(__name__)

GUEST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_MEMORY_MIB = 256 * 1024
BOOT_TIMEOUT_S = 30.0
#: File in a guest directory while the guest is a not-yet-committed incoming migration:
#: a daemon that finds it at start-up removes the partial guest (docs/design.md §8 "Invariants", 5).
INCOMING_MARKER = "incoming"


class GuestStateError(MigdError):
    """The guest is not in a state that allows the operation (REST 409)."""


class GuestState(str, enum.Enum):
    """The ``state`` field of the REST guest object (docs/design.md §9 "External contract")."""

    DEFINED = "defined"
    RUNNING = "running"
    PAUSED = "paused"
    INCOMING = "incoming"
    MIGRATED = "migrated"
    STOPPED = "stopped"


@dataclass(frozen=True)
class GuestDefinition:
    """What a guest is: name, size, SEV policy, firmware type."""

    name: str
    memory_mib: int
    policy: int = 0
    efi: bool = False
    uefi_live_migration: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not GUEST_NAME.fullmatch(self.name):
            raise ConfigError(f"guest name must match {GUEST_NAME.pattern}, got {self.name!r}")
        if isinstance(self.memory_mib, bool) or not isinstance(self.memory_mib, int) or not (
            1 <= self.memory_mib <= MAX_MEMORY_MIB
        ):
            raise ConfigError(f"memory_mib must be an integer in [1, {MAX_MEMORY_MIB}], got {self.memory_mib!r}")
        if isinstance(self.policy, bool) or not isinstance(self.policy, int) or not 0 <= self.policy <= 0xFFFFFFFF:
            raise ConfigError(f"policy must be a u32, got {self.policy!r}")

    @property
    def npages(self) -> int:
        return self.memory_mib * MiB // PAGE_SIZE

    @property
    def vm_config(self) -> VmConfig:
        return VmConfig(self.name, self.npages, self.efi, self.uefi_live_migration)


class HostGuest:
    """A guest and every host-side resource it holds."""

    def __init__(
        self,
        definition: GuestDefinition,
        *,
        guest_dir: Path,
        socket_path: Path,
        firmware: PspFirmware,
        handle: int,
        ram: GuestRam | None,
        state: GuestState,
        agent_command: Sequence[str] = DEFAULT_COMMAND,
    ) -> None:
        self.definition = definition
        self.guest_dir = guest_dir
        self.socket_path = socket_path
        self.firmware = firmware
        self.handle = handle
        self._ram = ram
        self.state = state
        self.vm = VmPlatform(definition.vm_config)
        self.channel: GuestChannel | None = None
        self.agent: AgentProcess | None = None
        self.workload = WorkloadConfig()
        self._agent_command = tuple(agent_command)
        self._last_check: CheckReport | None = None
        #: Serialises lifecycle operations (start/stop/reboot/kexec/delete) on this guest.
        self.busy = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        #: The agent connection that holds a staged incoming state, and that state.
        self._staged: tuple[GuestChannel, bytes] | None = None

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def ram(self) -> GuestRam:
        """The guest's RAM; GuestStateError once released (the guest migrated away)."""
        if self._ram is None:
            raise GuestStateError(f"guest {self.name} is {self.state.value}: its RAM is no longer on this host")
        return self._ram

    @property
    def has_memory(self) -> bool:
        """Whether the RAM file and firmware context are still held here (not after migrating away)."""
        return self._ram is not None

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(
        cls, definition: GuestDefinition, *, guest_dir: Path, socket_path: Path, firmware: PspFirmware,
        agent_command: Sequence[str] = DEFAULT_COMMAND,
    ) -> HostGuest:
        """A new guest: empty (sparse) RAM and a launched firmware context; state ``defined``."""
        return cls._new(definition, guest_dir, socket_path, firmware, None, GuestState.DEFINED, agent_command)

    @classmethod
    def create_incoming(
        cls, definition: GuestDefinition, *, guest_dir: Path, socket_path: Path, firmware: PspFirmware,
        handle: int, agent_command: Sequence[str] = DEFAULT_COMMAND,
    ) -> HostGuest:
        """The destination side of a migration: empty RAM, the RECEIVE_START context; ``incoming``."""
        return cls._new(definition, guest_dir, socket_path, firmware, handle, GuestState.INCOMING, agent_command)

    @classmethod
    def _new(
        cls, definition: GuestDefinition, guest_dir: Path, socket_path: Path, firmware: PspFirmware,
        handle: int | None, state: GuestState, agent_command: Sequence[str],
    ) -> HostGuest:
        guest_dir.mkdir(parents=True, exist_ok=False)
        try:
            if state is GuestState.INCOMING:
                (guest_dir / INCOMING_MARKER).touch()
            ram = GuestRam(guest_dir / "ram", definition.npages, create=True)
            if handle is None:
                handle = firmware.launch(definition.policy)
        except BaseException:
            shutil.rmtree(guest_dir, ignore_errors=True)
            raise
        return cls(
            definition, guest_dir=guest_dir, socket_path=socket_path, firmware=firmware, handle=handle,
            ram=ram, state=state, agent_command=agent_command,
        )

    @classmethod
    def restore(
        cls, definition: GuestDefinition, *, guest_dir: Path, socket_path: Path, firmware: PspFirmware,
        handle: int, state: GuestState, workload: WorkloadConfig,
        agent_command: Sequence[str] = DEFAULT_COMMAND,
    ) -> HostGuest:
        """A guest reloaded from the journal after a restart: its RAM file is opened, not created.

        ``state`` must be one without an agent (the previous daemon's agents are gone):
        ``defined``/``stopped`` with RAM, or ``migrated`` without (nothing left here but the record).
        """
        if state in (GuestState.RUNNING, GuestState.PAUSED, GuestState.INCOMING):
            raise GuestStateError(f"guest {definition.name}: a restored guest cannot be {state.value}")
        ram = None
        if state is not GuestState.MIGRATED:
            ram_path = guest_dir / "ram"
            guest_dir.mkdir(parents=True, exist_ok=True)
            # A guest that is not running has no memory contents to keep (its next boot zeroes
            # RAM, guest_vcpu FIRMWARE step), so a lost RAM file is recreated, sparse.
            ram = GuestRam(ram_path, definition.npages, create=not ram_path.exists())
        guest = cls(
            definition, guest_dir=guest_dir, socket_path=socket_path, firmware=firmware, handle=handle,
            ram=ram, state=state, agent_command=agent_command,
        )
        guest.workload = workload
        if ram is None:
            # The source side of a committed hand-off: whatever the crash left (RAM file, a
            # context SEND_FINISH had not yet forgotten) goes, as mark_migrated would have done.
            guest._release_memory()
        return guest

    # ------------------------------------------------------------------ lifecycle

    def _require(self, *states: GuestState) -> None:
        if self.state not in states:
            wanted = " or ".join(s.value for s in states)
            raise GuestStateError(f"guest {self.name} is {self.state.value}, the operation needs {wanted}")

    async def _spawn_agent(self, *, incoming: bool, unsafe_kexec_keep_msr: bool = False) -> GuestChannel:
        channel = GuestChannel(self.vm, self.socket_path)
        await channel.start()
        self.channel = channel
        spec = AgentSpec(
            name=self.name, socket_path=self.socket_path, ram_path=self.ram.path, npages=self.definition.npages,
            efi=self.definition.efi, incoming=incoming, workload=self.workload,
            unsafe_kexec_keep_msr=unsafe_kexec_keep_msr,
        )
        self.agent = agent = launch_agent(spec, self.firmware.guest_key(self.handle), command=self._agent_command)
        self._watcher = asyncio.get_running_loop().create_task(self._watch_agent(agent))
        await channel.wait_connected(BOOT_TIMEOUT_S)
        return channel

    async def _watch_agent(self, agent: AgentProcess) -> None:
        """Notice an agent that dies on its own (a crashed VM): reap it, the guest is stopped."""
        code = await agent.wait_async(None)
        if self.agent is not agent:
            return  # a stop or teardown we asked for
        log.error("guest %s: agent pid %d exited unexpectedly (status %s); the guest is stopped",
                  self.name, agent.pid, code)
        self.agent = None
        if self.state in (GuestState.RUNNING, GuestState.PAUSED):
            self.state = GuestState.STOPPED  # before the MSR reset: listeners see a stopped guest
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close()
        self.vm.vcpu_reset()  # a dead vCPU has no migration-control MSR

    async def start(
        self, workload: WorkloadConfig | None = None, *, timeout: float = BOOT_TIMEOUT_S,
        unsafe_kexec_keep_msr: bool = False,
    ) -> None:
        """Launch the agent and wait until the guest has booted (its MSR may still be 0: EFI).

        ``unsafe_kexec_keep_msr`` makes the guest skip MSR = 0 on kexec: it reproduces the
        stale-bitmap race on purpose (negative controls only).
        """
        self._require(GuestState.DEFINED, GuestState.STOPPED)
        self.workload = workload or WorkloadConfig()
        try:
            channel = await self._spawn_agent(incoming=False, unsafe_kexec_keep_msr=unsafe_kexec_keep_msr)
            await channel.wait_event("booted", timeout, since=0)
        except BaseException:
            await self._teardown_agent()
            raise
        self.state = GuestState.RUNNING

    async def prepare_incoming(self) -> None:
        """Start the agent in incoming mode early (QEMU's ``-incoming``): it waits for its state."""
        self._require(GuestState.INCOMING)
        try:
            await self._spawn_agent(incoming=True)
        except BaseException:
            await self._teardown_agent()
            raise

    async def stage_incoming(self, vcpu_state: bytes) -> None:
        """Before COMMIT: the prepared agent checks ``vcpu_state`` and loads its memory, but does not run.

        Call it once the guest's RAM is final (every page placed): the agent reads its ledger
        from RAM now, so :meth:`start_incoming` after COMMIT is one short request.
        """
        self._require(GuestState.INCOMING)
        if self.channel is None:
            raise GuestStateError(f"guest {self.name} has no prepared agent to stage its state in")
        channel = self.channel
        await channel.import_state(vcpu_state, start=False)
        self._staged = (channel, vcpu_state)

    async def start_incoming(self, vcpu_state: bytes) -> None:
        """Hand the prepared agent its vCPU state: the guest runs (it self-checks every page first)."""
        self._require(GuestState.INCOMING)
        if self.channel is None:
            await self.prepare_incoming()
        assert self.channel is not None
        # The source has committed: from here on this copy is the guest, whatever happens.
        (self.guest_dir / INCOMING_MARKER).unlink(missing_ok=True)
        staged, self._staged = self._staged, None
        if staged is not None and staged[0] is self.channel and staged[1] == vcpu_state:
            await self.channel.start_imported()  # staged by this very agent: it only has to run
        else:
            await self.channel.import_state(vcpu_state)
        self.state = GuestState.RUNNING

    async def wait_check(self, timeout: float, *, since: int = 0) -> CheckReport:
        """The next self-check report after the first ``since`` ones (the arrival check: 0)."""
        if self.channel is None:
            raise GuestStateError(f"guest {self.name} has no running agent")
        await self.channel.wait_event("check", timeout, since=since)
        assert self.channel.last_check is not None
        self._last_check = self.channel.last_check
        return self._last_check

    async def stop(self, *, timeout: float = 10.0) -> None:
        """Shut the guest down (its offline path writes MSR 0) and stop the agent."""
        self._require(GuestState.RUNNING, GuestState.PAUSED)
        if self.channel is not None and self.channel.connected:
            with contextlib.suppress(MigdError, TimeoutError):
                await self.channel.shutdown(timeout=timeout)
        await self._teardown_agent(timeout)
        self.vm.vcpu_reset()
        self.state = GuestState.STOPPED

    async def reboot(self) -> None:
        """vCPU reset (MSR → 0) and reboot; the guest re-runs its boot path."""
        self._require(GuestState.RUNNING)
        assert self.channel is not None
        await self.channel.reboot()

    async def kexec(self) -> None:
        """Ask the guest to kexec into a new kernel."""
        self._require(GuestState.RUNNING)
        assert self.channel is not None
        await self.channel.kexec()

    async def check(self) -> CheckReport:
        """Run the guest's self-check now."""
        self._require(GuestState.RUNNING, GuestState.PAUSED)
        assert self.channel is not None
        self._last_check = await self.channel.check(timeout=120.0)
        return self._last_check

    async def _teardown_agent(self, timeout: float = 5.0) -> None:
        agent, self.agent = self.agent, None
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher is not asyncio.current_task():
            watcher.cancel()
        if agent is not None:
            agent.terminate()
            try:
                await agent.wait_async(timeout)
            except TimeoutError:
                agent.kill()
                await agent.wait_async(timeout)
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close()

    async def mark_migrated(self) -> None:
        """After a committed outgoing migration: stop the agent for good, drop RAM and key."""
        await self._teardown_agent()
        self.state = GuestState.MIGRATED
        self._release_memory()

    def release(self) -> None:
        """Remove RAM file, key and directory of a guest that never had an agent (nothing to stop)."""
        if self.agent is not None:
            raise GuestStateError(f"guest {self.name} has an agent; use destroy()")
        self._release_memory()

    async def set_aside(self) -> None:
        """Stop the agent and unmap RAM, keeping the RAM file and the firmware context.

        For a prepared incoming guest whose source has not said whether it committed: this
        copy may be the only one, so shutting down must not discard it (a restart asks).
        """
        await self._teardown_agent()
        ram, self._ram = self._ram, None
        if ram is not None:
            ram.close()

    async def destroy(self) -> None:
        """Remove every trace of the guest on this host (agent, channel, RAM file, key)."""
        await self._teardown_agent()
        self._release_memory()

    def _release_memory(self) -> None:
        ram, self._ram = self._ram, None
        if ram is not None:
            ram.close()
        with contextlib.suppress(MigdError):
            self.firmware.decommission(self.handle)
        shutil.rmtree(self.guest_dir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    # ------------------------------------------------------------------ reporting

    @property
    def last_check(self) -> CheckReport | None:
        if self.channel is not None and self.channel.last_check is not None:
            return self.channel.last_check
        return self._last_check

    def to_json(self) -> dict[str, Any]:
        """The REST guest object (docs/design.md §9 "External contract")."""
        check = self.last_check
        shared = self.vm.shared_bitmap.count()
        return {
            "name": self.name,
            "state": self.state.value,
            "memory_mib": self.definition.memory_mib,
            "policy": self.definition.policy,
            "migration_control": {
                "feature": self.vm.config.cpuid_migration_control,
                "msr": self.vm.msr_migration_control,
                "ready": self.vm.migration_ready,
            },
            "pages": {"total": self.definition.npages, "private": self.definition.npages - shared, "shared": shared},
            "check": {
                "pages_verified": check.pages_verified if check else 0,
                "errors": check.errors if check else 0,
                "last_error": check.first_error if check else None,
            },
        }


async def wait_until(predicate: Any, timeout: float, interval: float = 0.01) -> None:
    """Poll ``predicate()`` until true; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)
