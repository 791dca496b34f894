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
import signal
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from migd.abi import PAGE_SIZE, MiB
from migd.guest.agent_launcher import DEFAULT_COMMAND, AgentProcess, AgentSpec, describe_exit, launch_agent
from migd.guest.channel import CheckReport, GuestChannel
from migd.guest.ram_capacity import RamAccount, RamReservation
from migd.errors import ConfigError, MigdError
from migd.platform.memory import GuestRam
from migd.platform.psp import PspFirmware
from migd.guest.record_retention import Departure
from migd.guest.vm import VmConfig, VmPlatform
from migd.guest.workload import WorkloadConfig

log = logging.getLogger(__name__)

GUEST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
MAX_MEMORY_MIB = 256 * 1024
BOOT_TIMEOUT_S = 30.0
#: How long an agent that answered ``shutdown`` (or whose channel just failed) gets to exit on its
#: own before the host signals it or gives up on reading its exit status.
AGENT_EXIT_GRACE_S = 2.0
_T = TypeVar("_T")
#: File in a guest directory while the guest is a not-yet-committed incoming migration:
#: a daemon that finds it at start-up removes the partial guest (docs/design.md §8 "Invariants", 5).
INCOMING_MARKER = "incoming"


class GuestStateError(MigdError):
    """The guest is not in a state that allows the operation (REST 409)."""


class AgentDied(GuestStateError):
    """The guest's agent ended while the host waited for it (connect, boot); the message says how."""


class GuestState(str, enum.Enum):
    """The ``state`` field of the REST guest object (docs/design.md §9 "External contract")."""

    DEFINED = "defined"
    RUNNING = "running"
    PAUSED = "paused"
    INCOMING = "incoming"
    MIGRATED = "migrated"
    SAVED = "saved"
    STOPPED = "stopped"

    @property
    def departed(self) -> bool:
        """The guest left this host (migrated, or saved to a file): only its record is here."""
        return self in (GuestState.MIGRATED, GuestState.SAVED)


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
        ram_account: RamAccount | None = None,
        ram_reservation: RamReservation | None = None,
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
        self._memory_released = False
        #: Set once the guest has migrated away (state ``migrated``): where it went, when.
        self.departure: Departure | None = None
        #: Admission control of the RAM directory (None: none, engine tests), and this guest's
        #: admission while it runs or arrives (migd/guest/ram_capacity.py).
        self.ram_account = ram_account
        self._ram_reservation = ram_reservation
        #: How the last agent ended when nobody asked it to (``killed by SIGBUS``); None after a
        #: stop the host asked for, and cleared by the next start.
        self.agent_exit: str | None = None

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
        agent_command: Sequence[str] = DEFAULT_COMMAND, ram_account: RamAccount | None = None,
    ) -> HostGuest:
        """A new guest: empty (sparse) RAM and a launched firmware context; state ``defined``.

        InsufficientRam if its RAM would not fit now (a defined guest reserves nothing: it is
        admitted again, for real, when it starts).
        """
        return cls._new(definition, guest_dir, socket_path, firmware, None, GuestState.DEFINED, agent_command,
                        ram_account)

    @classmethod
    def create_incoming(
        cls, definition: GuestDefinition, *, guest_dir: Path, socket_path: Path, firmware: PspFirmware,
        handle: int, agent_command: Sequence[str] = DEFAULT_COMMAND, ram_account: RamAccount | None = None,
    ) -> HostGuest:
        """The destination side of a migration: empty RAM, the RECEIVE_START context; ``incoming``.

        Its whole RAM is reserved first (InsufficientRam, before any file exists, if it does not fit):
        the pages stream in from the source.
        """
        return cls._new(definition, guest_dir, socket_path, firmware, handle, GuestState.INCOMING, agent_command,
                        ram_account)

    @classmethod
    def _new(
        cls, definition: GuestDefinition, guest_dir: Path, socket_path: Path, firmware: PspFirmware,
        handle: int | None, state: GuestState, agent_command: Sequence[str], ram_account: RamAccount | None,
    ) -> HostGuest:
        size, ram_path = definition.npages * PAGE_SIZE, guest_dir / "ram"
        reservation = None
        if ram_account is not None and state is GuestState.INCOMING:
            reservation = ram_account.reserve(definition.name, size, ram_path)
        elif ram_account is not None:
            ram_account.check(definition.name, size, ram_path)
        try:
            guest_dir.mkdir(parents=True, exist_ok=False)
        except BaseException:
            if reservation is not None:
                reservation.release()
            raise
        try:
            if state is GuestState.INCOMING:
                (guest_dir / INCOMING_MARKER).touch()
            ram = GuestRam(ram_path, definition.npages, create=True)
            if handle is None:
                handle = firmware.launch(definition.policy)
        except BaseException:
            shutil.rmtree(guest_dir, ignore_errors=True)
            if reservation is not None:
                reservation.release()
            raise
        return cls(
            definition, guest_dir=guest_dir, socket_path=socket_path, firmware=firmware, handle=handle,
            ram=ram, state=state, agent_command=agent_command, ram_account=ram_account, ram_reservation=reservation,
        )

    @classmethod
    def restore(
        cls, definition: GuestDefinition, *, guest_dir: Path, socket_path: Path, firmware: PspFirmware,
        handle: int, state: GuestState, workload: WorkloadConfig,
        agent_command: Sequence[str] = DEFAULT_COMMAND, ram_account: RamAccount | None = None,
    ) -> HostGuest:
        """A guest reloaded from the journal after a restart: its RAM file is opened, not created.

        ``state`` must be one without an agent (the previous daemon's agents are gone):
        ``defined``/``stopped`` with RAM, or ``migrated`` without (nothing left here but the record).
        """
        if state in (GuestState.RUNNING, GuestState.PAUSED, GuestState.INCOMING):
            raise GuestStateError(f"guest {definition.name}: a restored guest cannot be {state.value}")
        ram = None
        if not state.departed:
            ram_path = guest_dir / "ram"
            guest_dir.mkdir(parents=True, exist_ok=True)
            # A guest that is not running has no memory contents to keep (its next boot zeroes
            # RAM, guest_vcpu FIRMWARE step), so a lost RAM file is recreated, sparse.
            ram = GuestRam(ram_path, definition.npages, create=not ram_path.exists())
        guest = cls(
            definition, guest_dir=guest_dir, socket_path=socket_path, firmware=firmware, handle=handle,
            ram=ram, state=state, agent_command=agent_command, ram_account=ram_account,
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
        await self._unless_agent_dies(agent, channel.wait_connected(BOOT_TIMEOUT_S), "connecting")
        return channel

    async def _unless_agent_dies(self, agent: AgentProcess, awaitable: Awaitable[_T], what: str) -> _T:
        """``await awaitable``, but if the agent exits first: AgentDied saying how, at once.

        Without this a start whose agent died while booting waited the whole boot timeout
        and then blamed a missing report.
        """
        waiting = asyncio.ensure_future(awaitable)
        exited = asyncio.ensure_future(agent.wait_async(None))
        try:
            await asyncio.wait((waiting, exited), return_when=asyncio.FIRST_COMPLETED)
            if waiting.done() and not waiting.cancelled() and waiting.exception() is None:
                return waiting.result()
            if not exited.done():
                # The wait failed (the channel closed, a timeout): if the agent is on its way
                # out, its exit status follows within moments and is the better answer.
                await asyncio.wait((exited,), timeout=AGENT_EXIT_GRACE_S)
            if not exited.done():
                return waiting.result()  # not the agent's death: the wait's own error
            code = exited.result()
        finally:
            for future in (waiting, exited):
                future.cancel()  # no-op once done
            await asyncio.gather(waiting, exited, return_exceptions=True)
        self.agent_exit = describe_exit(code)
        raise AgentDied(f"guest {self.name}: its agent (pid {agent.pid}) {self.agent_exit} while {what}"
                        f"{self._exit_hint(code)}")

    def _exit_hint(self, code: int) -> str:
        if code == -signal.SIGBUS:
            # A MAP_SHARED page of a file whose filesystem is full cannot be backed: the
            # kernel's answer to the write fault is SIGBUS (mmap(2), "SIGBUS").
            return f" (SIGBUS: a page of its RAM file could not be allocated; is the filesystem of {self.guest_dir} full?)"
        return ""

    async def _watch_agent(self, agent: AgentProcess) -> None:
        """Notice an agent that dies on its own (a crashed VM): reap it, the guest is stopped."""
        code = await agent.wait_async(None)
        if self.agent is not agent:
            return  # a stop or teardown we asked for
        self.agent_exit = describe_exit(code)
        log.error("guest %s: agent pid %d %s unexpectedly%s; the guest is stopped",
                  self.name, agent.pid, self.agent_exit, self._exit_hint(code))
        self.agent = None
        if self.state in (GuestState.RUNNING, GuestState.PAUSED):
            self.state = GuestState.STOPPED  # before the MSR reset: listeners see a stopped guest
        channel, self.channel = self.channel, None
        if channel is not None:
            await channel.close()
        self.vm.vcpu_reset()  # a dead vCPU has no migration-control MSR
        self._release_ram(only_if_idle=True)

    def _admit_ram(self) -> None:
        """Reserve room for the whole RAM before the agent may populate it (InsufficientRam otherwise)."""
        if self.ram_account is not None and self._ram_reservation is None:
            self._ram_reservation = self.ram_account.reserve(
                self.name, self.definition.npages * PAGE_SIZE, self.ram.path)

    def _release_ram(self, *, only_if_idle: bool = False) -> None:
        """Give the admission back; ``only_if_idle``: not while pages may still come (running, incoming)."""
        if only_if_idle and self.state in (GuestState.RUNNING, GuestState.PAUSED, GuestState.INCOMING):
            return
        reservation, self._ram_reservation = self._ram_reservation, None
        if reservation is not None:
            reservation.release()

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
        self.agent_exit = None
        self._admit_ram()  # no await before it: the check and the reservation are one step
        try:
            channel = await self._spawn_agent(incoming=False, unsafe_kexec_keep_msr=unsafe_kexec_keep_msr)
            assert self.agent is not None
            await self._unless_agent_dies(self.agent, channel.wait_event("booted", timeout, since=0), "booting")
        except BaseException:
            await self._teardown_agent()
            self._release_ram()
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
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()  # from here the agent's exit is one we asked for, not a crash to report
        if self.channel is not None and self.channel.connected:
            with contextlib.suppress(MigdError, TimeoutError):
                await self.channel.shutdown(timeout=timeout)
                # The agent exits on its own once it has answered: a SIGTERM now would only
                # land in the middle of its interpreter's exit.
                if self.agent is not None:
                    await self.agent.wait_async(AGENT_EXIT_GRACE_S)
        await self._teardown_agent(timeout)
        self.vm.vcpu_reset()
        self.state = GuestState.STOPPED
        self._release_ram()

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

    async def halt(self) -> None:
        """Stop the agent where it is (no shutdown path runs in the guest); RAM file and key stay.

        For a guest that must never run here again but whose memory is still its only copy
        (a save committed whose file is not finished yet).
        """
        await self._teardown_agent()

    async def mark_saved(self) -> None:
        """After a committed save: the file holds the guest; stop the agent for good, drop RAM and key."""
        await self._teardown_agent()
        self.state = GuestState.SAVED
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
        self._release_ram()  # unmapped: nothing populates it until a restart decides its fate
        ram, self._ram = self._ram, None
        if ram is not None:
            ram.close()

    async def destroy(self) -> None:
        """Remove every trace of the guest on this host (agent, channel, RAM file, key)."""
        await self._teardown_agent()
        self._release_memory()

    def _release_memory(self) -> None:
        # Once only: the paths are the name's, and after a first release (a delete racing a
        # departure's teardown) they may already belong to a guest of that name that came back.
        if self._memory_released:
            return
        self._memory_released = True
        self._release_ram()
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
        gone = self.state.departed
        # A migrated guest has no memory, bitmap or MSR here: the last values would read as a
        # guest still ready to migrate, with page counts of a RAM that is gone.
        shared = 0 if gone else self.vm.shared_bitmap.count()
        private = 0 if gone else self.definition.npages - shared
        return {
            "name": self.name,
            "state": self.state.value,
            "memory_mib": self.definition.memory_mib,
            "policy": self.definition.policy,
            "migration_control": {
                "feature": self.vm.config.cpuid_migration_control,
                "msr": self.vm.msr_migration_control,
                "ready": self.vm.migration_ready and not gone,
            },
            "pages": {"total": self.definition.npages, "private": private, "shared": shared},
            "check": {
                "pages_verified": check.pages_verified if check else 0,
                "errors": check.errors if check else 0,
                "last_error": check.first_error if check else None,
            },
            "agent": {
                "pid": agent.pid if (agent := self.agent) is not None and agent.poll() is None else None,
                "exit": self.agent_exit,
            },
            "migrated": self.departure.to_json() if self.state is GuestState.MIGRATED and self.departure is not None
            else None,
        }


async def wait_until(predicate: Any, timeout: float, interval: float = 0.01) -> None:
    """Poll ``predicate()`` until true; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)
