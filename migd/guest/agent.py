"""The guest agent process (``migd agent`` / ``python -m migd.guest.agent``): one SEV guest's inside.

It maps the guest's RAM file, reads the guest's VEK from an inherited pipe fd (it stands for
the CPU key slot: never on the command line or in the environment), connects to the host's
hypercall channel (a unix socket, docs/design.md §4 "The hypercall channel"), says ``hello`` and runs the
guest's vCPU (:mod:`migd.guest.guest_vcpu`) until ``shutdown``, a signal, or the host going away.

This module is the I/O shell: framing with :class:`~migd.guest.channel_codec.ChannelCodec`, matching
responses to requests by id, serving host requests as tasks (a ``pause`` waits for the step in
flight while ``fetch_dirty`` is still answered). Exit status: 0 after shutdown, a signal or the
host closing the channel; 1 if the vCPU or the channel failed; 2 if the agent could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

#: The signals that end an agent. Only its main thread may take them: every thread the imports
#: below start (OpenBLAS's, with numpy) inherits this blocked mask. One such thread taking a
#: SIGTERM in the instant the main thread moves its handler from asyncio's to SIG_IGN
#: (_ignore_exit_signals) made CPython write a stray traceback, "OSError: Signal 15 ignored
#: due to race condition", to the daemon's log.
_EXIT_SIGNALS: Final = frozenset({signal.SIGTERM, signal.SIGINT})
_unblocked = signal.pthread_sigmask(signal.SIG_BLOCK, _EXIT_SIGNALS)
try:
    from migd.errors import ConfigError, MigdError, ProtocolError
    from migd.guest.channel_codec import RESPONSE, ChannelCodec, Message, request, response_error, response_ok
    from migd.guest.guest_vcpu import GuestConfig, GuestVcpu, Offline
    from migd.guest.workload import WorkloadConfig
    from migd.platform.memory import VEK_SIZE, GuestRam, MemoryEncryption
finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, _unblocked)

log = logging.getLogger("migd.guest.agent")  # not __name__: that is "__main__" under python -m

REQUEST_TIMEOUT: Final = 10.0
OFFLINE_TIMEOUT: Final = 3.0  # bound on the offline path after a signal or a crash (the host may be gone)
_READ_SIZE: Final = 1 << 20


class AgentError(MigdError):
    """The agent cannot go on: the host refused hello, did not answer, or closed the channel."""


@dataclass(frozen=True)
class AgentOptions:
    """Everything ``migd agent`` takes on its command line."""

    socket_path: Path
    ram_path: Path
    key_fd: int
    guest: GuestConfig
    verbose: bool = False


@dataclass
class _Channel:
    """Client end of the hypercall channel: requests out, responses matched by id."""

    writer: asyncio.StreamWriter
    codec: ChannelCodec = field(default_factory=ChannelCodec)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    pending: dict[int, asyncio.Future[Message]] = field(default_factory=dict)
    lost: bool = False

    def send(self, msg: Message) -> None:
        if self.lost or self.writer.is_closing():
            raise AgentError("the channel to the host is closed")
        self.writer.write(self.codec.encode(msg))

    async def request(self, op: str, **fields: Any) -> Message:
        """Send one guest → host request; its response map (``ok`` true or false)."""
        msg_id = next(self.ids)
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = future
        try:
            self.send(request(msg_id, op, **fields))
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await future
        except TimeoutError as exc:
            raise AgentError(f"no answer to {op!r} within {REQUEST_TIMEOUT:g} s") from exc
        finally:
            self.pending.pop(msg_id, None)

    def responded(self, msg: Message) -> None:
        future = self.pending.pop(msg["id"], None)
        if future is not None and not future.done():
            future.set_result(msg)

    def close_pending(self) -> None:
        self.lost = True
        for future in self.pending.values():
            if not future.done():
                future.set_exception(AgentError("the channel to the host was lost"))
        self.pending.clear()


class GuestAgent:
    """The process: channel, vCPU, signals, exit status."""

    def __init__(self, options: AgentOptions, vek: bytes) -> None:
        self.options = options
        self.engine = MemoryEncryption(vek)
        self.ram = GuestRam(options.ram_path, options.guest.npages)
        self.exit_code = 0
        self._done = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._channel: _Channel | None = None
        self._vcpu: GuestVcpu | None = None

    async def run(self) -> int:
        """Connect, say hello, run the vCPU until told to stop; returns the exit status."""
        guest = self.options.guest
        try:
            reader, writer = await asyncio.open_unix_connection(os.fspath(self.options.socket_path))
        except OSError as exc:
            self.ram.close()
            raise AgentError(f"cannot connect to {self.options.socket_path}: {exc}") from exc
        channel = self._channel = _Channel(writer)
        vcpu = self._vcpu = GuestVcpu(guest, self.ram, self.engine, channel)
        reader_task = asyncio.create_task(self._read_loop(reader), name="channel-reader")
        loop = asyncio.get_running_loop()
        for signum in _EXIT_SIGNALS:
            loop.add_signal_handler(signum, self._on_signal, signum)
        _quiet_wakeup_fd()
        vcpu_task: asyncio.Task[None] | None = None
        try:
            rsp = await channel.request("hello", name=guest.name, npages=guest.npages, pid=os.getpid(),
                                        incoming=guest.incoming)
            if not rsp["ok"]:
                raise AgentError(f"the host refused hello: {rsp['error']}")
            log.info("agent connected name=%s npages=%d incoming=%s", guest.name, guest.npages, guest.incoming)
            vcpu_task = asyncio.create_task(vcpu.run(), name="vcpu")
            vcpu_task.add_done_callback(self._vcpu_done)
            await self._done.wait()
        finally:
            for task in (vcpu_task, reader_task, *self._tasks):
                if task is not None and not task.done():
                    task.cancel()
            for task in (vcpu_task, reader_task, *self._tasks):
                if task is not None:
                    # Teardown only: failures were already logged by the done callbacks.
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await writer.wait_closed()
            self.ram.close()
            _ignore_exit_signals(loop)
        return self.exit_code

    def _finish(self, code: int) -> None:
        if not self._done.is_set():
            self.exit_code = code
            self._done.set()

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed: %s", task.get_name(), task.exception(), exc_info=task.exception())
            self._finish(1)

    def _vcpu_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return  # halted (shutdown): the shutdown request finishes the process
        log.error("vcpu failed: %s", exc, exc_info=exc)
        self._spawn(self._crash(), "crash")

    async def _crash(self) -> None:
        """The vCPU died: best-effort offline path (MSR 0, crash report), bounded; exit 1."""
        assert self._vcpu is not None
        with contextlib.suppress(MigdError, TimeoutError, OSError, ConnectionError):
            async with asyncio.timeout(OFFLINE_TIMEOUT):
                await self._vcpu.crash_offline()
        self._finish(1)

    def _on_signal(self, signum: int) -> None:
        log.info("signal %s: going offline", signal.Signals(signum).name)
        self._spawn(self._signal_offline(), "signal")

    async def _signal_offline(self) -> None:
        """SIGTERM/SIGINT: the offline path at the next step boundary (bounded); exit 0.

        A paused, held, halted or not yet started vCPU runs no guest code: the process just ends.
        """
        vcpu = self._vcpu
        if vcpu is not None and vcpu.running:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(OFFLINE_TIMEOUT):
                    await vcpu.queue_offline(Offline.CRASH)
        self._finish(0)

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        assert self._channel is not None
        channel = self._channel
        try:
            while data := await reader.read(_READ_SIZE):
                for msg in channel.codec.feed(data):
                    if msg["t"] == RESPONSE:
                        channel.responded(msg)
                    else:
                        self._spawn(self._serve(msg), f"op-{msg['op']}")
            log.info("channel closed by the host")
        except ProtocolError as exc:
            log.error("channel protocol error: %s", exc)
            self.exit_code = 1
        except (OSError, ConnectionError) as exc:
            log.error("channel read failed: %s", exc)
            self.exit_code = 1
        channel.close_pending()
        self._finish(self.exit_code)

    async def _serve(self, msg: Message) -> None:
        assert self._channel is not None and self._vcpu is not None
        op = msg["op"]
        try:
            result = await self._vcpu.handle(op, msg)
            self._channel.send(response_ok(msg["id"], **result))
        except (MigdError, ValueError) as exc:
            log.warning("request %s refused: %s", op, exc)
            with contextlib.suppress(MigdError):
                self._channel.send(response_error(msg["id"], str(exc)))
            return
        if op == "shutdown":
            with contextlib.suppress(OSError, ConnectionError):
                await self._channel.writer.drain()
            self._finish(0)


def _quiet_wakeup_fd() -> None:
    """Keep the loop's signal wakeup fd, without the traceback when its buffer is full.

    asyncio learns which signal came from the bytes in its self-pipe. A burst of signals (a
    host or systemd repeating SIGTERM while the loop is busy) fills it, and every further one
    printed "Exception ignored when trying to write to the signal wakeup fd: BlockingIOError".
    Nothing is lost: the pipe already holds that signal for the loop to handle, which is why
    CPython has ``warn_on_full_buffer=False`` (bpo-30050). The signals are blocked while the fd
    is re-registered, so none arrives while no wakeup fd is set.
    """
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _EXIT_SIGNALS)
    try:
        fd = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(fd, warn_on_full_buffer=False)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _ignore_exit_signals(loop: asyncio.AbstractEventLoop) -> None:
    """From here the process only exits: take SIGTERM/SIGINT away from the loop, and ignore them.

    The loop's signal handlers write to its self-pipe (``signal.set_wakeup_fd``), and
    ``loop.close()`` closes that pipe *before* it removes them (CPython
    Lib/asyncio/unix_events.py, ``_UnixSelectorEventLoop.close``). A signal in between — the
    host's SIGTERM right after ``shutdown``, or systemd signalling the whole control group —
    printed "Exception ignored when trying to write to the signal wakeup fd: OSError: [Errno 9]
    Bad file descriptor" to the daemon's log. Removing them here unsets the wakeup fd while
    the pipe is open. The signals are blocked meanwhile, and no other thread takes them
    (``_EXIT_SIGNALS``): one that comes now stays pending, and is discarded once ignored
    (signal(7)); one the main thread caught just before the block is handled by asyncio's
    handler when the first ``signal.signal`` checks pending signals, before replacing it.
    """
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, _EXIT_SIGNALS)
    for signum in _EXIT_SIGNALS:
        loop.remove_signal_handler(signum)
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


# ---------------------------------------------------------------------- command line


def _firmware_range(text: str) -> tuple[int, int]:
    try:
        gpa_text, npages_text = text.split(":", 1)
        return int(gpa_text, 0), int(npages_text, 0)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected GPA:NPAGES (e.g. 0x3ff0000:16), got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``migd agent`` (:mod:`migd.guest.agent_launcher` builds them)."""
    parser = argparse.ArgumentParser(prog="migd agent", description="the in-guest agent of one emulated SEV guest")
    parser.add_argument("--name", required=True, help="guest name (must match the host's)")
    parser.add_argument("--socket", required=True, type=Path, help="hypercall channel unix socket")
    parser.add_argument("--ram", required=True, type=Path, help="guest RAM file")
    parser.add_argument("--npages", required=True, type=int, help="guest RAM size in 4 KiB pages")
    parser.add_argument("--key-fd", required=True, type=int, help=f"inherited fd to read the {VEK_SIZE}-byte VEK from")
    parser.add_argument("--efi", action="store_true", help="booted with UEFI (consult SevLiveMigrationEnabled)")
    parser.add_argument("--incoming", action="store_true", help="wait for import_state instead of booting")
    parser.add_argument("--firmware-shared", type=_firmware_range, action="append", metavar="GPA:NPAGES",
                        help="a firmware-owned shared range (repeatable; default: the top 16 pages)")
    parser.add_argument("--dirty-rate-mib-s", type=float, default=0.0)
    parser.add_argument("--convert-rate-hz", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--populate-fraction", type=float, default=0.0,
                        help="share of the data area written once after the first boot")
    parser.add_argument("--shared-fraction", type=float, default=0.0,
                        help="share of the populated pages made shared (bounce buffers)")
    parser.add_argument("--kexec-after-s", type=float, default=0.0, help="kexec once, this long after boot")
    parser.add_argument("--reboot-after-s", type=float, default=0.0, help="reboot once, this long after boot")
    parser.add_argument("--boot-time-s", type=float, default=0.0, help="how long a kexec/reboot keeps the guest down")
    parser.add_argument("--unsafe-kexec-keep-msr", action="store_true",
                        help="do not clear the migration-control MSR before kexec (reproduces the seed race)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def parse_options(argv: Sequence[str]) -> AgentOptions:
    """Parse ``migd agent`` arguments (argparse exits on usage errors; ConfigError on bad values)."""
    args = build_parser().parse_args(list(argv))
    guest = GuestConfig(
        name=args.name,
        npages=args.npages,
        efi=args.efi,
        incoming=args.incoming,
        firmware_shared=tuple(args.firmware_shared) if args.firmware_shared else None,
        workload=WorkloadConfig(args.dirty_rate_mib_s, args.convert_rate_hz, args.seed,
                                args.populate_fraction, args.shared_fraction, args.kexec_after_s,
                                args.reboot_after_s, args.boot_time_s),
        unsafe_kexec_keep_msr=args.unsafe_kexec_keep_msr,
    )
    return AgentOptions(args.socket, args.ram, args.key_fd, guest, args.verbose)


def read_key(fd: int) -> bytes:
    """Read the VEK from an inherited pipe until EOF, then close it."""
    chunks: list[bytes] = []
    try:
        while sum(map(len, chunks)) <= VEK_SIZE:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as exc:
        raise ConfigError(f"cannot read the VEK from fd {fd}: {exc.strerror}") from exc
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
    key = b"".join(chunks)
    if len(key) != VEK_SIZE:
        raise ConfigError(f"expected a {VEK_SIZE}-byte VEK on fd {fd}, got {len(key)} bytes")
    return key


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``migd agent``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.DEBUG if ("-v" in argv or "--verbose" in argv) else logging.INFO,
        format="%(asctime)s %(levelname)s agent[%(process)d] %(name)s %(message)s",
    )
    try:
        options = parse_options(argv)
        vek = read_key(options.key_fd)
        agent = GuestAgent(options, vek)
    except MigdError as exc:
        log.error("agent cannot start: %s", exc)
        return 2
    try:
        return asyncio.run(agent.run())
    except MigdError as exc:
        log.error("agent failed: %s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
