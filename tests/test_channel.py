"""Host end of the hypercall channel over a real unix socket, driven by a scripted fake agent.

The fake agent below is written with the codec on purpose: this is a protocol test of the host
adapter, so the guest side is a script that can also misbehave on demand.
"""

from __future__ import annotations

import asyncio
import functools
import os
import stat
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from migd.abi import KVM_HC_MAP_GPA_RANGE, KVM_MIGRATION_READY, MSR_KVM_MIGRATION_CONTROL, PAGE_SIZE
from migd.bitmap import PageBitmap
from migd.guest.channel import CheckReport, GuestChannel, GuestChannelError, GuestHello, GuestTimeoutError
from migd.guest.channel_codec import ChannelCodec, Message, request, response_error, response_ok
from migd.errors import ConfigError
from migd.guest.vm import VmConfig, VmPlatform

NPAGES = 256
WAIT = 5.0  # upper bound of every wait in here; nothing should come close to it

Handler = Callable[[Message], dict[str, Any] | None]


def run(coro_fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh loop (pytest-asyncio is not a dependency), time-bounded."""

    @functools.wraps(coro_fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        async def bounded() -> None:
            async with asyncio.timeout(20):
                await coro_fn(*args, **kwargs)

        asyncio.run(bounded())

    return wrapper


def make_vm(name: str = "vm0", npages: int = NPAGES) -> VmPlatform:
    return VmPlatform(VmConfig(name=name, npages=npages, efi=False, uefi_live_migration=None))


class FakeAgent:
    """A scripted guest agent: answers host requests from ``handlers`` (op -> result or None = error)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.codec = ChannelCodec()
        self.ids = 0
        self.pending: dict[int, asyncio.Future[Message]] = {}
        self.host_requests: list[Message] = []
        self.handlers: dict[str, Handler] = {
            "pause": lambda m: {"paused": True},
            "resume": lambda m: {},
            "fetch_dirty": lambda m: {"bitmap": PageBitmap(NPAGES).encode()},
        }
        self.silent: set[str] = set()  # ops to leave unanswered
        self.eof = asyncio.Event()
        self.task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: Path) -> FakeAgent:
        reader, writer = await asyncio.open_unix_connection(os.fspath(path))
        return cls(reader, writer)

    async def _read_loop(self) -> None:
        try:
            while data := await self.reader.read(65536):
                for msg in self.codec.feed(data):
                    if msg["t"] == "rsp":
                        self.pending.pop(msg["id"]).set_result(msg)
                    else:
                        self._answer(msg)
        except ConnectionError:
            pass
        finally:
            self.writer.close()
            self.eof.set()

    def _answer(self, msg: Message) -> None:
        self.host_requests.append(msg)
        if msg["op"] in self.silent:
            return
        result = self.handlers.get(msg["op"], lambda m: {})(msg)
        reply = response_error(msg["id"], "refused by test") if result is None else response_ok(msg["id"], **result)
        self.send_raw(self.codec.encode(reply))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def call(self, op: str, **fields: Any) -> Message:
        self.ids += 1
        future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
        self.pending[self.ids] = future
        self.send_raw(self.codec.encode(request(self.ids, op, **fields)))
        async with asyncio.timeout(WAIT):
            return await future

    async def hello(self, name: str = "vm0", npages: int = NPAGES) -> Message:
        return await self.call("hello", name=name, npages=npages, pid=os.getpid(), incoming=False)

    async def wait_closed(self) -> None:
        async with asyncio.timeout(WAIT):
            await self.eof.wait()

    async def close(self) -> None:
        self.writer.close()
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def started(tmp_path: Path, vm: VmPlatform | None = None, name: str = "g.sock",
                  **kwargs: Any) -> GuestChannel:
    channel = GuestChannel(vm or make_vm(), tmp_path / name, **kwargs)
    await channel.start()
    return channel


async def connected(tmp_path: Path, **kwargs: Any) -> tuple[GuestChannel, FakeAgent]:
    channel = await started(tmp_path, **kwargs)
    agent = await FakeAgent.connect(channel.path)
    assert (await agent.hello())["ok"] is True
    await channel.wait_connected(WAIT)
    return channel, agent


# ---------------------------------------------------------------- socket setup


@run
async def test_socket_mode_and_cleanup(tmp_path: Path) -> None:
    channel = await started(tmp_path)
    mode = os.stat(channel.path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    await channel.close()
    assert not channel.path.exists()


def test_socket_path_length_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at most 107 bytes"):
        GuestChannel(make_vm(), tmp_path / ("x" * 120))
    GuestChannel(make_vm(), "/tmp/" + "x" * 102)  # negative control: exactly 107 bytes is fine


@run
async def test_stale_socket_replaced_but_regular_file_refused(tmp_path: Path) -> None:
    first = await started(tmp_path)
    first._server.close()  # type: ignore[union-attr]  # simulate a crash: socket file left behind
    assert first.path.exists()
    second = await started(tmp_path)
    agent = await FakeAgent.connect(second.path)
    assert (await agent.hello())["ok"]
    await agent.close()
    await second.close()
    (tmp_path / "plain").write_text("not a socket")
    with pytest.raises(ConfigError, match="not a socket"):
        await started(tmp_path, name="plain")
    assert (tmp_path / "plain").read_text() == "not a socket"


# ---------------------------------------------------------------- hello


@run
async def test_hello_and_hypercalls(tmp_path: Path) -> None:
    changes: list[tuple[int, int]] = []
    vm = make_vm()
    vm.on_migration_control_change = lambda old, new: changes.append((old, new))
    channel = await started(tmp_path, vm=vm)
    assert not channel.connected
    agent = await FakeAgent.connect(channel.path)
    assert await agent.hello() == {"t": "rsp", "id": 1, "ok": True}
    hello = await channel.wait_connected(WAIT)
    assert hello == GuestHello(name="vm0", npages=NPAGES, pid=os.getpid(), incoming=False)

    rsp = await agent.call("hypercall", nr=KVM_HC_MAP_GPA_RANGE, args=[4 * PAGE_SIZE, 8, 0], cpl=0)
    assert rsp["ret"] == 0
    assert vm.shared_bitmap.extents() == [(4, 8)]
    rsp = await agent.call("hypercall", nr=KVM_HC_MAP_GPA_RANGE, args=[1, 8, 0])
    assert rsp["ret"] == -22
    rsp = await agent.call("wrmsr", msr=MSR_KVM_MIGRATION_CONTROL, value=KVM_MIGRATION_READY)
    assert rsp["ok"] and changes == [(0, 1)] and vm.migration_ready
    rsp = await agent.call("cpuid", leaf=0x40000001, subleaf=0)
    assert rsp["eax"] == 0x30000
    # bad arguments get an error answer and the connection stays up
    rsp = await agent.call("hypercall", nr=12, args=[0, "x", 0])
    assert rsp["ok"] is False and "'args'[1]" in rsp["error"]
    assert (await agent.call("rdmsr", msr=MSR_KVM_MIGRATION_CONTROL))["value"] == 1
    assert channel.connected and channel.protocol_errors == 0
    await agent.close()
    await channel.close()


@pytest.mark.parametrize("name, npages", [("other", NPAGES), ("vm0", NPAGES + 1)], ids=["name", "npages"])
@run
async def test_hello_mismatch_refused(tmp_path: Path, name: str, npages: int) -> None:
    channel = await started(tmp_path)
    agent = await FakeAgent.connect(channel.path)
    rsp = await agent.hello(name=name, npages=npages)
    assert rsp["ok"] is False and "hello mismatch" in rsp["error"]
    await agent.wait_closed()
    assert not channel.connected and channel.protocol_errors == 1
    with pytest.raises(GuestChannelError, match="no agent connected"):
        await channel.pause()
    # the channel accepts a correct agent afterwards
    good = await FakeAgent.connect(channel.path)
    assert (await good.hello())["ok"] is True
    await good.close()
    await channel.close()


@run
async def test_request_before_hello_closes(tmp_path: Path) -> None:
    channel = await started(tmp_path)
    agent = await FakeAgent.connect(channel.path)
    agent.send_raw(agent.codec.encode(request(1, "cpuid", leaf=0, subleaf=0)))
    await agent.wait_closed()
    assert "expected 'hello' first" in (channel.last_error or "")
    await channel.close()


@run
async def test_hello_timeout_closes(tmp_path: Path) -> None:
    channel = await started(tmp_path, hello_timeout=0.1)
    agent = await FakeAgent.connect(channel.path)
    await agent.wait_closed()
    assert "no hello" in (channel.last_error or "")
    await channel.close()


@run
async def test_second_connection_refused(tmp_path: Path) -> None:
    channel, first = await connected(tmp_path)
    second = await FakeAgent.connect(channel.path)
    await second.wait_closed()
    assert not first.eof.is_set()
    await channel.pause()  # the first agent is still served
    assert [m["op"] for m in first.host_requests] == ["pause"]
    # once the first agent is gone a new one may connect
    await first.close()
    await channel.wait_disconnected(WAIT)
    third = await FakeAgent.connect(channel.path)
    assert (await third.hello())["ok"] is True
    await third.close()
    await channel.close()


# ---------------------------------------------------------------- host -> guest requests


@run
async def test_pause_resume_fetch_dirty(tmp_path: Path) -> None:
    channel, agent = await connected(tmp_path)
    written = PageBitmap(NPAGES)
    written.set_range(100, 3)
    agent.handlers["fetch_dirty"] = lambda m: {"bitmap": written.encode()}
    await channel.pause()
    # a page conversion is logged host-side and joins the guest's dirty pages
    rsp = await agent.call("hypercall", nr=KVM_HC_MAP_GPA_RANGE, args=[10 * PAGE_SIZE, 2, 0])
    assert rsp["ret"] == 0
    dirty = await channel.fetch_dirty()
    assert dirty.extents() == [(10, 2), (100, 3)]
    assert channel.vm.state_change_log.count() == 0  # fetched and cleared
    await channel.resume()
    assert [m["op"] for m in agent.host_requests] == ["pause", "fetch_dirty", "resume"]
    await agent.close()
    await channel.close()


@run
async def test_round_trips_are_probed_per_request_kind(tmp_path: Path) -> None:
    """The switch-over's probe: how long answered requests of one kind took, recently."""
    channel, agent = await connected(tmp_path)
    assert channel.round_trip_s("fetch_dirty") is None  # nothing measured yet
    agent.silent.add("fetch_dirty")
    fetch = asyncio.ensure_future(channel.fetch_dirty())
    async with asyncio.timeout(WAIT):
        while not agent.host_requests:
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)  # the guest answers late
    (req,) = agent.host_requests
    agent.send_raw(agent.codec.encode(response_ok(req["id"], bitmap=PageBitmap(NPAGES).encode())))
    await fetch
    slow = channel.round_trip_s("fetch_dirty")
    assert slow is not None and slow >= 0.05
    assert channel.round_trip_s("pause") is None  # negative control: only what was asked and answered
    agent.silent.add("resume")
    with pytest.raises(GuestTimeoutError):
        await channel.resume(timeout=0.05)
    assert channel.round_trip_s("resume") is None  # an unanswered request is no sample
    await agent.close()
    await channel.close()


@run
async def test_staged_import_and_start_requests(tmp_path: Path) -> None:
    channel, agent = await connected(tmp_path)
    await channel.import_state(b"incoming-state", start=False)
    await channel.start_imported()
    sent = [(m["op"], {k: v for k, v in m.items() if k not in ("t", "id", "op")}) for m in agent.host_requests]
    assert sent == [("import_state", {"state": b"incoming-state", "start": False}), ("start", {})]
    await agent.close()
    await channel.close()


@run
async def test_pause_without_paused_flag_is_a_violation(tmp_path: Path) -> None:
    channel, agent = await connected(tmp_path)
    agent.handlers["pause"] = lambda m: {}
    with pytest.raises(GuestChannelError, match="pause not acknowledged"):
        await channel.pause()
    await agent.wait_closed()
    await channel.close()


@pytest.mark.parametrize("bitmap", [PageBitmap(NPAGES + 1).encode(), PageBitmap(NPAGES - 1).encode(), b"junk", 5],
                         ids=["too-large", "too-small", "garbage", "not-bytes"])
@run
async def test_bad_dirty_bitmap_closes(tmp_path: Path, bitmap: Any) -> None:
    channel, agent = await connected(tmp_path)
    agent.handlers["fetch_dirty"] = lambda m: {"bitmap": bitmap}
    with pytest.raises(GuestChannelError, match="bad dirty bitmap"):
        await channel.fetch_dirty()
    await agent.wait_closed()
    assert channel.protocol_errors == 1
    await channel.close()


@run
async def test_control_requests(tmp_path: Path) -> None:
    vm = make_vm()
    channel = await started(tmp_path, vm=vm)
    agent = await FakeAgent.connect(channel.path)
    await agent.hello()
    await channel.wait_connected(WAIT)
    vm.wrmsr(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)
    msr_seen_by_guest: list[int] = []
    agent.handlers["reboot"] = lambda m: msr_seen_by_guest.append(vm.msr_migration_control) or {}
    agent.handlers["export_state"] = lambda m: {"state": b"vcpu-state"}
    agent.handlers["check"] = lambda m: {"pages_verified": NPAGES, "errors": 0, "first_error": None}

    await channel.throttle(40)
    await channel.reboot()
    assert msr_seen_by_guest == [0]  # the host reset the vCPU before telling the guest
    await channel.kexec(hold_in_window=True)
    await channel.kexec()
    assert await channel.export_state() == b"vcpu-state"
    await channel.import_state(b"incoming-state")
    report = await channel.check()
    assert report == CheckReport(pages_verified=NPAGES, errors=0, first_error=None)
    assert channel.last_check == report
    await channel.shutdown()
    sent = [(m["op"], {k: v for k, v in m.items() if k not in ("t", "id", "op")}) for m in agent.host_requests]
    assert sent == [("throttle", {"percent": 40}), ("reboot", {}), ("kexec", {"hold_in_window": True}),
                    ("kexec", {"hold_in_window": False}), ("export_state", {}),
                    ("import_state", {"state": b"incoming-state"}), ("check", {}), ("shutdown", {})]
    with pytest.raises(ValueError, match="0, 99"):
        await channel.throttle(100)
    await agent.close()
    await channel.wait_disconnected(WAIT)
    await channel.close()


@run
async def test_guest_refusal_and_bad_results(tmp_path: Path) -> None:
    channel, agent = await connected(tmp_path)
    agent.handlers["resume"] = lambda m: None
    with pytest.raises(GuestChannelError, match="refused 'resume': refused by test"):
        await channel.resume()
    assert channel.connected  # a refusal is not a protocol violation
    agent.handlers["check"] = lambda m: {"pages_verified": -1, "errors": 0, "first_error": None}
    with pytest.raises(GuestChannelError, match="bad check result"):
        await channel.check()
    await agent.wait_closed()
    await channel.close()


@run
async def test_request_timeout_and_late_answer(tmp_path: Path) -> None:
    channel, agent = await connected(tmp_path)
    agent.silent.add("pause")
    with pytest.raises(GuestTimeoutError, match="no 'pause' response within 0.1 s"):
        await channel.pause(timeout=0.1)
    assert isinstance(GuestTimeoutError("x"), TimeoutError)
    stale_id = agent.host_requests[-1]["id"]
    agent.send_raw(agent.codec.encode(response_ok(stale_id, paused=True)))  # late: ignored
    await channel.resume()
    assert channel.connected and channel.protocol_errors == 0
    # a response to an id never used is a violation
    agent.send_raw(agent.codec.encode(response_ok(9999)))
    await agent.wait_closed()
    assert "unknown request id 9999" in (channel.last_error or "")
    await channel.close()


@run
async def test_disconnect_fails_pending_request(tmp_path: Path) -> None:
    channel, agent = await connected(tmp_path)
    agent.silent.add("check")
    task = asyncio.create_task(channel.check())
    async with asyncio.timeout(WAIT):
        while not agent.host_requests:
            await asyncio.sleep(0.01)
    await agent.close()
    with pytest.raises(GuestChannelError, match="connection lost"):
        async with asyncio.timeout(WAIT):
            await task
    await channel.close()


# ---------------------------------------------------------------- reports


@run
async def test_events_and_check_reports(tmp_path: Path) -> None:
    channel, agent = await connected(tmp_path)
    before = channel.event_count("booted")
    waiter = asyncio.create_task(channel.wait_event("booted", WAIT))
    await asyncio.sleep(0)
    assert (await agent.call("report", kind="event", event="booted"))["ok"] is True
    assert (await waiter)["event"] == "booted"
    # race-free form: the event already arrived before the wait started
    assert (await agent.call("report", kind="event", event="booted", extra=1))["ok"] is True
    got = await channel.wait_event("booted", WAIT, since=before + 1)
    assert got["extra"] == 1 and channel.event_count("booted") == before + 2
    with pytest.raises(GuestTimeoutError):
        await channel.wait_event("booted", 0.05)  # nothing new: times out

    rsp = await agent.call("report", kind="check", pages_verified=10, errors=1, first_error="page 3")
    assert rsp["ok"] is True
    assert channel.last_check == CheckReport(10, 1, "page 3")
    assert channel.event_count("check") == 1

    for bad in ({"kind": "event", "event": "exploded"}, {"kind": "weird"}, {"kind": "check", "errors": 0}):
        rsp = await agent.call("report", **bad)
        assert rsp["ok"] is False
    assert channel.connected and channel.last_check == CheckReport(10, 1, "page 3")
    await agent.close()
    await channel.close()


@run
async def test_second_hello_is_a_violation(tmp_path: Path) -> None:
    channel, agent = await connected(tmp_path)
    agent.send_raw(agent.codec.encode(request(50, "hello", name="vm0", npages=NPAGES, pid=1, incoming=False)))
    await agent.wait_closed()
    assert "second hello" in (channel.last_error or "")
    await channel.close()


# ---------------------------------------------------------------- isolation


@pytest.mark.parametrize(
    "garbage",
    [b"\xff\xff\xff\xff", b"\x00\x00\x00\x01\xc1", b"\x00\x00\x00\x03\x93\x01\x02", b"\x00\x00\x00\x00"],
    ids=["oversized", "bad-msgpack", "non-map", "empty-frame"],
)
@run
async def test_garbage_closes_only_that_guest(tmp_path: Path, garbage: bytes) -> None:
    bad_channel = await started(tmp_path, vm=make_vm("bad"), name="bad.sock")
    good_channel = await started(tmp_path, vm=make_vm("good"), name="good.sock")
    bad = await FakeAgent.connect(bad_channel.path)
    good = await FakeAgent.connect(good_channel.path)
    assert (await bad.hello(name="bad"))["ok"] and (await good.hello(name="good"))["ok"]
    await bad_channel.wait_connected(WAIT)
    await good_channel.wait_connected(WAIT)

    bad.send_raw(garbage)
    await bad.wait_closed()
    await bad_channel.wait_disconnected(WAIT)
    assert bad_channel.protocol_errors == 1

    assert good_channel.connected and good_channel.protocol_errors == 0
    assert (await good.call("hypercall", nr=12, args=[0, 1, 0]))["ret"] == 0
    await good_channel.pause()
    assert good_channel.vm.shared_bitmap.count() == 1
    await good.close()
    await asyncio.gather(bad_channel.close(), good_channel.close())


@run
async def test_close_drops_agent(tmp_path: Path) -> None:
    channel, agent = await connected(tmp_path)
    await channel.close()
    await agent.wait_closed()
    assert not channel.connected and not channel.path.exists()


def test_waits_need_a_connection(tmp_path: Path) -> None:
    async def scenario() -> None:
        channel = await started(tmp_path)
        with pytest.raises(GuestTimeoutError, match="no agent connection within 0.05 s"):
            await channel.wait_connected(0.05)
        with pytest.raises(GuestChannelError):
            await channel.fetch_dirty()
        channel.vm.wrmsr(MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY)
        with pytest.raises(GuestChannelError, match="no agent connected for 'reboot'"):
            await channel.reboot()
        assert channel.vm.migration_ready  # nothing was reset
        await channel.close()

    asyncio.run(scenario())



@run
async def test_guest_that_never_reads_is_flow_controlled(tmp_path: Path) -> None:
    """Requests from a guest that ignores our answers stop being read instead of piling up answers."""
    channel = await started(tmp_path)
    reader, writer = await asyncio.open_unix_connection(os.fspath(channel.path))
    codec = ChannelCodec()
    writer.write(codec.encode(request(0, "hello", name="vm0", npages=NPAGES, pid=1, incoming=False)))
    await channel.wait_connected(WAIT)
    count = 20_000
    writer.write(b"".join(codec.encode(request(i, "cpuid", leaf=0x40000000, subleaf=0)) for i in range(1, count + 1)))
    conn = channel._conn
    assert conn is not None and conn.transport is not None
    async with asyncio.timeout(WAIT):
        while conn.transport.is_reading():
            await asyncio.sleep(0.01)
    high_water = conn.transport.get_write_buffer_limits()[1]
    assert conn.transport.get_write_buffer_size() <= high_water + 1024  # one answer past the mark
    # once the guest reads, everything is answered
    answered = 0
    async with asyncio.timeout(WAIT):
        while answered < count + 1:
            answered += len(codec.feed(await reader.read(1 << 16)))
    assert conn.transport.is_reading() and not conn.backlog and channel.protocol_errors == 0
    writer.close()
    await channel.close()
