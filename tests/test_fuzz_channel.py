"""Fuzzing the hypercall channel from a hostile guest (docs/design.md §8 "Invariants", 7).

Three targets, each with a seeded fast loop and, where structure matters, hypothesis:

* ``VmPlatform.handle_guest_request``: random and mutated request maps. Oracle: it never
  raises; the answer is a response the codec can send; a hypercall or MSR write that the spec
  allows changes exactly what a reference model says and nothing else does; another guest's
  VmPlatform is bit-for-bit untouched;
* ``ChannelCodec.feed``: random and mutated byte streams raise nothing but
  ``ChannelProtocolError`` and never buffer past one maximum frame;
* a real ``GuestChannel`` on a unix socket: a fuzzing "guest" connects again and again and
  sends garbage, mutated frames and protocol violations while a well-behaved guest works
  on a second channel of the same event loop. Every fuzz session ends with the channel either
  still answering a valid request or having closed the connection; the loop sees no
  exception, the channel keeps accepting, and the other guest's state and answers are
  exactly those of its own requests.
"""

from __future__ import annotations

import asyncio
import os
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migd.abi import (
    KVM_EINVAL,
    KVM_ENOSYS,
    KVM_EPERM,
    KVM_HC_MAP_GPA_RANGE,
    KVM_MAP_GPA_RANGE_ENCRYPTED,
    KVM_MAP_GPA_RANGE_RESERVED_MASK,
    KVM_MIGRATION_READY,
    MSR_KVM_MIGRATION_CONTROL,
    PAGE_SIZE,
    UEFI_SEV_LIVE_MIGRATION_GUID,
    UEFI_SEV_LIVE_MIGRATION_VAR,
)
from migd.bitmap import PageBitmap
from migd.guest.channel import GuestChannel
from migd.guest.channel_codec import MAX_FRAME, U64_MAX, ChannelCodec, ChannelProtocolError, request
from migd.guest.vm import PLATFORM_OPS, VmConfig, VmPlatform

pytestmark = pytest.mark.fault_class("bad input: hypercall channel fuzz")
SEED = 0x6368616E  # "chan"
NPAGES = 1000  # not a multiple of 64: the bitmap's tail word is exercised
FAST_REQUESTS = 30_000
_LEN = struct.Struct(">I")

_HOSTILE: tuple[Any, ...] = (
    None, True, False, -1, 0, 1, 2, 3, 12, 16, 17, 22, 0x1000, 0x1001, NPAGES, NPAGES * PAGE_SIZE,
    (1 << 63), U64_MAX, U64_MAX + 1, -(1 << 63), 1.0, float("nan"), "", "x" * 5000, "0x1000", b"", b"\x00" * 8,
    [], [0, 1], [0, 1, 2, 3], [None, 1, 0], {}, {"a": 1}, MSR_KVM_MIGRATION_CONTROL, KVM_MIGRATION_READY,
)


def make_vm(name: str, efi: bool = False, uefi: bool | None = None) -> VmPlatform:
    return VmPlatform(VmConfig(name=name, npages=NPAGES, efi=efi, uefi_live_migration=uefi))


def snapshot(vm: VmPlatform) -> tuple[Any, ...]:
    """Every piece of daemon-side state of one guest's platform."""
    return (vm.shared_bitmap.to_bytes(), vm.state_change_log.to_bytes(), vm.msr_migration_control,
            dict(vm.hypercall_counts), vm.gp_faults, vm.bad_requests)


class PlatformModel:
    """The spec (docs/design.md §3 and §4) as a reference model of one guest's platform."""

    def __init__(self) -> None:
        self.shared = np.zeros(NPAGES, dtype=bool)
        self.msr = 0

    def expected_ret(self, nr: int, gpa: int, npages: int, attrs: int, cpl: int) -> int:
        if cpl != 0:
            return -KVM_EPERM
        if nr != KVM_HC_MAP_GPA_RANGE:
            return -KVM_ENOSYS
        gfn = gpa >> 12
        if gpa % PAGE_SIZE or npages == 0 or gfn + npages > U64_MAX or gfn + npages > NPAGES:
            return -KVM_EINVAL
        if attrs & KVM_MAP_GPA_RANGE_RESERVED_MASK or attrs & 0xF not in (0, 1, 2):
            return -KVM_EINVAL
        return 0

    def apply(self, gpa: int, npages: int, attrs: int) -> None:
        self.shared[gpa >> 12 : (gpa >> 12) + npages] = not attrs & KVM_MAP_GPA_RANGE_ENCRYPTED

    def matches(self, vm: VmPlatform) -> bool:
        expected = PageBitmap(NPAGES)
        starts = np.flatnonzero(np.diff(np.concatenate(([0], self.shared.astype(np.int8), [0]))) == 1)
        ends = np.flatnonzero(np.diff(np.concatenate(([0], self.shared.astype(np.int8), [0]))) == -1)
        for first, end in zip(starts.tolist(), ends.tolist()):
            expected.set_range(first, end - first)
        return vm.shared_bitmap.to_bytes() == expected.to_bytes() and vm.msr_migration_control == self.msr


def _is_u64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= U64_MAX


def check_response(msg: Any, rsp: Any) -> None:
    """A response the codec can frame and send, echoing a valid request id."""
    assert isinstance(rsp, dict) and rsp["t"] == "rsp" and isinstance(rsp["ok"], bool), rsp
    assert _is_u64(rsp["id"])
    if isinstance(msg, dict) and _is_u64(msg.get("id")):
        assert rsp["id"] == msg["id"]
    if not rsp["ok"]:
        assert isinstance(rsp["error"], str) and rsp["error"]
    ChannelCodec().encode(rsp)  # the daemon must be able to send whatever it answers


def run_request(vm: VmPlatform, model: PlatformModel, msg: Any) -> dict[str, Any]:
    """One request through the platform, checked against the model."""
    rsp = vm.handle_guest_request(msg)
    check_response(msg, rsp)
    if rsp["ok"] and isinstance(msg, dict):
        op = msg["op"]
        if op == "hypercall":
            gpa, npages, attrs = msg["args"]
            expected = model.expected_ret(msg["nr"], gpa, npages, attrs, msg.get("cpl", 0))
            assert rsp["ret"] == expected, (msg, rsp)
            if expected == 0:
                model.apply(gpa, npages, attrs)
        elif op == "wrmsr":
            assert msg["msr"] == MSR_KVM_MIGRATION_CONTROL and msg["value"] in (0, KVM_MIGRATION_READY)
            model.msr = msg["value"]
        elif op == "rdmsr":
            assert rsp["value"] == model.msr
        assert op in PLATFORM_OPS
    return rsp


# ---------------------------------------------------------------------- request generators


def _valid_request(rng: random.Random, msg_id: int) -> dict[str, Any]:
    op = rng.choice(sorted(PLATFORM_OPS))
    if op == "hypercall":
        first = rng.randrange(NPAGES)
        count = rng.randint(1, NPAGES - first)
        attrs = rng.choice([0, KVM_MAP_GPA_RANGE_ENCRYPTED]) | rng.choice([0, 1, 2])
        return request(msg_id, op, nr=KVM_HC_MAP_GPA_RANGE, args=[first * PAGE_SIZE, count, attrs])
    if op == "rdmsr":
        return request(msg_id, op, msr=MSR_KVM_MIGRATION_CONTROL)
    if op == "wrmsr":
        return request(msg_id, op, msr=MSR_KVM_MIGRATION_CONTROL, value=rng.choice([0, KVM_MIGRATION_READY]))
    if op == "cpuid":
        return request(msg_id, op, leaf=rng.choice([0x40000000, 0x40000001, 0, 0xFFFFFFFF]), subleaf=0)
    return request(msg_id, op, name=UEFI_SEV_LIVE_MIGRATION_VAR, guid=UEFI_SEV_LIVE_MIGRATION_GUID)


def _mutated_request(rng: random.Random, msg_id: int) -> Any:
    msg: Any = _valid_request(rng, msg_id)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(7)
        key = rng.choice(sorted(msg) + ["extra", "nr", "args", "cpl", "msr", "value", "leaf", "name", "guid"])
        if kind == 0:
            msg.pop(key, None)
        elif kind == 1:
            msg[key] = rng.choice(_HOSTILE)
        elif kind == 2 and isinstance(msg.get("args"), list) and msg["args"]:
            msg["args"][rng.randrange(len(msg["args"]))] = rng.choice(_HOSTILE)
        elif kind == 3:
            msg["op"] = rng.choice(["hello", "report", "", "HYPERCALL", "pause", "x" * 100, 7, None])
        elif kind == 4:
            msg["t"] = rng.choice(["rsp", "", None, 1, "req "])
        elif kind == 5:
            msg["id"] = rng.choice([-1, U64_MAX + 1, True, "1", None, 0, U64_MAX])
        else:
            msg = rng.choice([[], None, 7, "req", b"", [msg]])
            break
    return msg


def _hypercall_args(rng: random.Random) -> list[int]:
    """Arguments near every boundary the spec names (alignment, RAM end, wrap at 2^64, attrs bits)."""
    gpa = rng.choice([0, 0x1000, 0x1001, (NPAGES - 1) * PAGE_SIZE, NPAGES * PAGE_SIZE, U64_MAX & ~0xFFF,
                      rng.randrange(NPAGES) * PAGE_SIZE, rng.getrandbits(64)])
    npages = rng.choice([0, 1, 2, NPAGES, NPAGES + 1, U64_MAX, (1 << 52), rng.randrange(NPAGES)])
    attrs = rng.choice([0, 1, 2, 3, 0xF, 16, 17, 18, 19, 32, 1 << 63, U64_MAX, rng.getrandbits(64)])
    return [gpa, npages, attrs]


def requests(rng: random.Random, count: int) -> Iterator[Any]:
    for i in range(count):
        roll = rng.random()
        if roll < 0.35:
            yield _valid_request(rng, i)
        elif roll < 0.6:
            yield request(i, "hypercall", nr=rng.choice([KVM_HC_MAP_GPA_RANGE] * 6 + [0, 11, 13, U64_MAX]),
                          args=_hypercall_args(rng), cpl=rng.choice([0, 0, 0, 3]))
        else:
            yield _mutated_request(rng, i)


# ---------------------------------------------------------------------- VmPlatform


def test_platform_requests_fast_loop(record_inputs: Any) -> None:
    rng = random.Random(SEED)
    victim, other = make_vm("victim"), make_vm("other", efi=True, uefi=True)
    other.handle_guest_request(request(1, "hypercall", nr=KVM_HC_MAP_GPA_RANGE, args=[0x10000, 7, 0]))
    before = snapshot(other)
    model = PlatformModel()
    outcomes = {True: 0, False: 0}
    for msg in requests(rng, FAST_REQUESTS):
        outcomes[run_request(victim, model, msg)["ok"]] += 1
    record_inputs(sum(outcomes.values()), "guest requests")
    assert model.matches(victim)
    assert snapshot(other) == before
    # Both kinds of answers occurred in numbers, and the hostile inputs were counted, not just dropped.
    assert min(outcomes.values()) > FAST_REQUESTS // 10, outcomes
    assert victim.bad_requests == outcomes[False] - victim.gp_faults
    assert victim.hypercall_counts["einval"] > 1000 and victim.hypercall_counts["ok"] > 1000
    assert victim.state_change_log.count() > 0


def test_model_is_a_real_oracle() -> None:
    """Negative control: a platform that drifted from the model is noticed."""
    vm, model = make_vm("vm"), PlatformModel()
    run_request(vm, model, request(1, "hypercall", nr=KVM_HC_MAP_GPA_RANGE, args=[0, 4, 0]))
    assert model.matches(vm)
    vm.shared_bitmap.set_range(10, 1)  # behind the model's back
    assert not model.matches(vm)
    with pytest.raises(AssertionError):
        check_response({"id": 5}, {"t": "rsp", "id": 6, "ok": True})


_leaf = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 64), 1 << 65), st.floats(), st.text(max_size=20),
                  st.binary(max_size=20))
_value = st.recursive(_leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                      max_leaves=8)
_keys = st.sampled_from(["t", "id", "op", "nr", "args", "cpl", "msr", "value", "leaf", "subleaf", "name", "guid"])


@settings(max_examples=400, deadline=None, derandomize=True)
@given(
    op=st.one_of(st.sampled_from(sorted(PLATFORM_OPS)), _value),
    fields=st.dictionaries(st.one_of(_keys, st.text(max_size=5)), _value, max_size=6),
    msg_id=st.one_of(st.integers(0, U64_MAX), _value),
)
def test_platform_any_request_structure(op: Any, fields: dict[str, Any], msg_id: Any) -> None:
    vm, other = make_vm("victim"), make_vm("other")
    before = snapshot(other)
    msg = {**fields, "t": "req", "id": msg_id, "op": op}
    run_request(vm, PlatformModel(), msg)
    assert snapshot(other) == before


# ---------------------------------------------------------------------- ChannelCodec


def _frame(body: bytes) -> bytes:
    return _LEN.pack(len(body)) + body


def test_codec_fast_loop(record_inputs: Any) -> None:
    rng = random.Random(SEED + 1)
    outcomes = {"refused": 0, "decoded": 0}
    for msg in requests(rng, 20_000):
        try:
            body = msgpack.packb(msg, use_bin_type=True)
        except (TypeError, ValueError, OverflowError):
            body = rng.randbytes(20)
        data = bytearray(_frame(body))
        roll = rng.randrange(6)
        if roll == 0:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif roll == 1:
            _LEN.pack_into(data, 0, rng.choice([0, MAX_FRAME + 1, U64_MAX & 0xFFFFFFFF, len(body) - 1]))
        elif roll == 2:
            data += rng.randbytes(rng.randint(1, 30))
        elif roll == 3:
            data = bytearray(rng.randbytes(rng.randint(1, 64)))
        codec = ChannelCodec()
        try:
            step = rng.choice([len(data), 1, 3])
            for start in range(0, len(data), step):
                codec.feed(bytes(data[start : start + step]))
                assert codec.buffered <= MAX_FRAME + 4
            outcomes["decoded"] += 1
        except ChannelProtocolError:
            outcomes["refused"] += 1
            with pytest.raises(ChannelProtocolError, match="already failed"):
                codec.feed(b"\x00")
    record_inputs(sum(outcomes.values()), "channel byte streams")
    assert min(outcomes.values()) > 2000, outcomes


def test_codec_refuses_an_oversized_length_before_buffering() -> None:
    codec = ChannelCodec()
    with pytest.raises(ChannelProtocolError, match="exceeds"):
        codec.feed(_LEN.pack(MAX_FRAME + 1))
    assert codec.buffered == 0


# ---------------------------------------------------------------------- a real GuestChannel


class GuestClient:
    """A guest-side connection speaking the channel protocol (or not, on purpose)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.codec = ChannelCodec()
        self.closed = False

    @classmethod
    async def connect(cls, path: Path) -> GuestClient:
        reader, writer = await asyncio.open_unix_connection(os.fspath(path))
        return cls(reader, writer)

    def send_raw(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    def send(self, msg: Any) -> None:
        self.send_raw(_frame(msgpack.packb(msg, use_bin_type=True)))

    async def response(self, msg_id: int, timeout: float = 3.0) -> dict[str, Any] | None:
        """The response to ``msg_id``; None once the host closed the connection (TimeoutError if neither)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    data = await self.reader.read(65536)
                    if not data:
                        self.closed = True
                        return None
                    for msg in self.codec.feed(data):
                        if msg["t"] == "rsp" and msg["id"] == msg_id:
                            return msg
        except ConnectionError:
            self.closed = True
            return None

    async def call(self, msg: dict[str, Any], timeout: float = 3.0) -> dict[str, Any] | None:
        self.send(msg)
        return await self.response(msg["id"], timeout)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass


def _hello(name: str, msg_id: int = 0) -> dict[str, Any]:
    return request(msg_id, "hello", name=name, npages=NPAGES, pid=os.getpid(), incoming=False)


def _bad_fields(rng: random.Random) -> bytes:
    """A request with a valid envelope and hostile fields: answered with ok=false, never fatal."""
    msg = _valid_request(rng, rng.randrange(1 << 20))
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(["nr", "args", "cpl", "msr", "value", "leaf", "subleaf", "name", "guid", "extra"])
        msg[key] = rng.choice(_HOSTILE)
    if rng.random() < 0.2:
        msg["op"] = rng.choice(["HYPERCALL", "pause", "x" * 60, "shutdown"])
    try:
        return _frame(msgpack.packb(msg, use_bin_type=True))
    except OverflowError:  # 2^64 has no msgpack encoding: a guest cannot send it either
        return _bad_fields(rng)


def _garbage(rng: random.Random, name: str) -> bytes:
    """One hostile write: a mutated request, a protocol violation or raw bytes."""
    roll = rng.randrange(10)
    if roll < 5:
        msg = _mutated_request(rng, rng.randrange(1 << 20))
        try:
            return _frame(msgpack.packb(msg, use_bin_type=True))
        except (TypeError, ValueError, OverflowError):
            return rng.randbytes(16)
    if roll == 5:
        return _frame(msgpack.packb({"t": "rsp", "id": rng.randrange(1 << 30), "ok": True}))  # answer to nothing
    if roll == 6:
        return _frame(msgpack.packb(_hello(name, 7)))  # a second hello
    if roll == 7:
        kind = rng.choice(["check", "event", "bogus", 5])
        return _frame(msgpack.packb(request(rng.randrange(1 << 20), "report", kind=kind, event=rng.choice(
            ["booted", "nonsense", None]), pages_verified=rng.choice([1, -1, "x"]), errors=0, first_error=None)))
    if roll == 8:
        return _LEN.pack(rng.choice([0, MAX_FRAME + 1, 0xFFFFFFFF])) + rng.randbytes(8)
    return rng.randbytes(rng.randint(1, 200))


async def _bystander(path: Path, stop: asyncio.Event, vm: VmPlatform) -> tuple[int, PlatformModel]:
    """A well-behaved guest: valid hypercalls and MSR writes, every answer checked against the model."""
    rng = random.Random(SEED + 3)
    model = PlatformModel()
    client = await GuestClient.connect(path)
    assert (await client.call(_hello("bystander")) or {}).get("ok") is True
    done = 0
    while not stop.is_set():
        msg = _valid_request(rng, 1000 + done)
        rsp = await client.call(msg)
        assert rsp is not None and rsp["ok"], rsp
        check_response(msg, rsp)
        if msg["op"] == "hypercall":
            assert rsp["ret"] == 0
            model.apply(*msg["args"])
        elif msg["op"] == "wrmsr":
            model.msr = msg["value"]
        elif msg["op"] == "rdmsr":
            assert rsp["value"] == model.msr
        done += 1
        await asyncio.sleep(0)
    assert model.matches(vm)
    await client.close()
    return done, model


SESSIONS = 120


def test_guest_channel_under_a_fuzzing_guest(tmp_path: Path, record_inputs: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop_errors: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _, context: loop_errors.append(context))
        rng = random.Random(SEED + 2)
        victim_vm, other_vm = make_vm("victim"), make_vm("bystander")
        victim = GuestChannel(victim_vm, tmp_path / "victim.sock", hello_timeout=2.0)
        other = GuestChannel(other_vm, tmp_path / "other.sock")
        await victim.start()
        await other.start()
        stop = asyncio.Event()
        bystander = asyncio.create_task(_bystander(tmp_path / "other.sock", stop, other_vm))
        # usable: the probe is answered; closed: the host dropped the guest for a violation;
        # mid-frame: the guest's own garbage announced a frame (<= 16 MiB) the host still waits
        # for, so the probe is part of it. Only that guest's connection is affected by it.
        outcomes = {"usable": 0, "closed": 0, "mid-frame": 0}
        for session in range(SESSIONS):
            client = await GuestClient.connect(tmp_path / "victim.sock")
            errors_before = victim.protocol_errors
            if rng.random() < 0.9:
                client.send(_hello("victim", 0))
            hostile = _garbage if rng.random() < 0.5 else (lambda rng, _: _bad_fields(rng))
            for _ in range(rng.randint(1, 12)):
                client.send_raw(hostile(rng, "victim"))
            probe = request(1 << 40, "rdmsr", msr=MSR_KVM_MIGRATION_CONTROL)
            try:
                rsp = await client.call(probe, timeout=1.0)
            except TimeoutError:
                assert victim.connected and victim.protocol_errors == errors_before
                outcomes["mid-frame"] += 1
                await client.close()
                await victim.wait_disconnected(5.0)
                continue
            if rsp is None:
                outcomes["closed"] += 1
                assert victim.protocol_errors > errors_before or victim.last_error
            else:
                check_response(probe, rsp)
                assert rsp["ok"] and rsp["value"] == victim_vm.msr_migration_control
                outcomes["usable"] += 1
            await client.close()
            await victim.wait_disconnected(5.0)  # the channel is free for the next guest connection
        stop.set()
        requests_done, _ = await bystander
        # The bystander's platform holds exactly what its own requests did, and saw no violation.
        assert other_vm.bad_requests == 0 and other.protocol_errors == 0 and other.connected
        assert requests_done > SESSIONS
        assert victim.protocol_errors >= outcomes["closed"] > 10 and outcomes["usable"] > 10, outcomes
        assert victim.vm is victim_vm and not victim.connected
        # Still accepting: a proper guest gets proper answers after all of that.
        client = await GuestClient.connect(tmp_path / "victim.sock")
        assert (await client.call(_hello("victim")) or {}).get("ok") is True
        assert (await client.call(request(5, "cpuid", leaf=0x40000001, subleaf=0)) or {}).get("ok") is True
        await client.close()
        await victim.close()
        await other.close()
        assert loop_errors == []

    asyncio.run(asyncio.wait_for(main(), 60))
    record_inputs(SESSIONS, "hostile guest sessions")
