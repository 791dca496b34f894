"""A migration over several connections (lanes), unit by unit: no sockets, no daemons.

What is covered, each with its negative control where one makes sense:

1. the SEV transport's lanes (migd/sev_transport.py, and the emulated PSP's ``lane=``): a
   sequence space per lane, the lane bound into ``bound`` packets (never into lane 0's, nor
   into ``sev-compat`` ones);
2. the sessions (migd/session.py, source_session.py, dest_session.py): HELLO's ``conns``,
   JOIN / JOINED, the stripe check on page frames, PREPARE's per-lane chains, the fallback to
   one connection for a destination without the capability;
3. the stripes (migd/page_runs.py);
4. the shared/exclusive gate (migd/inflight.py);
5. the codec of JOIN, JOINED and the optional ``conns`` / ``lanes`` fields.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import itertools
import os
import struct
import threading
import types
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migd import dest_session as dest_session_module
from migd import wire
from migd.abi import PAGE_SHIFT, PAGE_SIZE, FirmwareStatus
from migd.dest_session import DestinationSession
from migd.errors import FirmwareError, IntegrityError, PeerProtocolError, ProtocolError, TransportError
from migd.inflight import InFlight
from migd.migration_state import MigrationPhase
from migd.page_runs import STRIPE_PAGES, PageKind, in_lane, lane_of, stripe_end
from migd.platform.memory import GuestRam, MemoryEncryption
from migd.platform.psp import PspFirmware
from migd.session import LaneChains, LocalProtocolError, Phase, Role, StreamChain
from migd.session_auth import AuthenticationError
from migd.sev_transport import (
    CTX_DATA,
    FLAG_BOUND,
    PacketHeader,
    SessionKeys,
    TransportMode,
    TransportReceiver,
    TransportSender,
    build_aad,
    new_session_keys,
)
from migd.source_session import SourceSession
from session_pair import GUEST, established

T0 = 1000.0
SESSION_ID = b"lane-session-id!"
GPA = 0x40_0000
#: The capabilities of a release without "lanes" (what an older destination speaks: the first
#: releases of several connections called theirs "connections" and do not interoperate).
OLD_CAPS = (*(c for c in wire.CAPABILITIES if c != "lanes"), "connections")
JOIN_WAIT = 5.0  # every thread join in this file is bounded by this


# =========================================================================== 1. transport


def _ends(mode: TransportMode, keys: SessionKeys | None = None, *,
          ordered: bool = True) -> tuple[TransportSender, TransportReceiver]:
    keys = keys or new_session_keys()
    return (TransportSender(keys, mode, session_id=SESSION_ID),
            TransportReceiver(keys, mode, session_id=SESSION_ID, ordered=ordered))


def _receiver_like(sender_keys: SessionKeys, mode: TransportMode) -> TransportReceiver:
    """A fresh receiver of the same session (every counter at 0)."""
    return TransportReceiver(sender_keys, mode, session_id=SESSION_ID)


def _page(tag: int) -> bytes:
    """One distinct, non-zero page (a misplaced one is visible)."""
    return hashlib.shake_256(struct.pack("<I", tag)).digest(PAGE_SIZE)


Packet = tuple[PacketHeader, bytes, bytes, int]  # header, ciphertext, plaintext, gpa


def _seal(sender: TransportSender, lane: int, tag: int, gpa: int = GPA) -> Packet:
    plaintext = _page(tag)
    header, ct = sender.seal(CTX_DATA, plaintext, gpa=gpa, npages=1, lane=lane)
    return header, bytes(ct), plaintext, gpa


def _open(receiver: TransportReceiver, packet: Packet, lane: int, **kw: object) -> bytes:
    header, ct, _, gpa = packet
    return bytes(receiver.open(CTX_DATA, header, ct, gpa=gpa, npages=1, lane=lane, **kw))  # type: ignore[arg-type]


def test_bound_packet_sealed_on_lane_2_fails_on_lane_1() -> None:
    """A packet moved to another connection fails its MAC (same sequence number 0 on both lanes)."""
    sender, receiver = _ends(TransportMode.BOUND)
    packet = _seal(sender, lane=2, tag=1)
    for wrong in (1, 0, 3):
        with pytest.raises(IntegrityError, match="MAC mismatch"):
            _open(receiver, packet, lane=wrong)
    assert receiver.next_sequence == 0  # a refused packet moves no counter
    assert _open(receiver, packet, lane=2) == packet[2]  # control: its own lane
    assert receiver.next_sequence == 1


def test_bound_packet_of_lane_1_replayed_on_lane_2_fails() -> None:
    """Lane 2 expects sequence 0 next, the number the lane-1 packet carries: only the lane differs."""
    sender, receiver = _ends(TransportMode.BOUND)
    first, second = _seal(sender, lane=1, tag=1), _seal(sender, lane=2, tag=2)
    assert _open(receiver, first, lane=1) == first[2]
    with pytest.raises(IntegrityError, match="lane 2"):
        _open(receiver, first, lane=2)
    with pytest.raises(IntegrityError):  # nor again on its own lane (sequence 1 there now)
        _open(receiver, first, lane=1)
    assert _open(receiver, second, lane=2) == second[2]  # control: lane 2's own packet, untouched counter


def test_sev_compat_moved_and_replayed_packets_open() -> None:
    """Negative control of the two tests above: ``sev-compat`` (the firmware's format) binds no
    connection, sequence or GPA, so the moved and the replayed packet both open here.

    In that mode it is the destination session that catches them: the stripe check refuses a run
    on a connection its GPA does not belong to (``DestinationSession.page_received``), and
    PREPARE binds every lane's frame chain, packet headers included (``check_prepare``) — see
    the session tests below.
    """
    sender, receiver = _ends(TransportMode.SEV_COMPAT)
    moved, replayed = _seal(sender, lane=2, tag=1), _seal(sender, lane=1, tag=2)
    assert _open(receiver, moved, lane=1) == moved[2]
    assert _open(receiver, replayed, lane=1) == replayed[2]
    assert _open(receiver, replayed, lane=2) == replayed[2]
    assert _open(receiver, replayed, lane=2) == replayed[2]  # and again, same lane
    # Control: the compat MAC itself still holds (a flipped ciphertext bit fails).
    header, ct, _, gpa = moved
    with pytest.raises(IntegrityError):
        receiver.open(CTX_DATA, header, bytes([ct[0] ^ 1]) + ct[1:], gpa=gpa, npages=1, lane=2)


def _hand_mac(keys: SessionKeys, header: PacketHeader, ct: bytes, gpa: int, seq: int, lane: int | None) -> bytes:
    """The bound-mode MAC as the module documents it: HMAC(TIK, aad || binding || ciphertext), the
    binding = "migd-bound-v1\\0" || len(session id) u8 || session id || ctx u8, gpa u64, npages u32,
    seq u64 (little-endian) [|| lane u16 on lanes > 0]. ``lane=None``: the pre-lane binding."""
    aad = build_aad(CTX_DATA, FLAG_BOUND, header.iv, len(ct), len(ct))
    binding = b"migd-bound-v1\x00" + bytes([len(SESSION_ID)]) + SESSION_ID + struct.pack("<BQIQ", CTX_DATA, gpa, 1, seq)
    if lane is not None:
        binding += struct.pack("<H", lane)
    return hmac.digest(keys.tik, aad + binding + ct, "sha256")


def test_lane_0_seals_exactly_as_before_lanes() -> None:
    """Lane 0's MAC is the single-connection binding, recomputed by hand; lane 2's adds the lane."""
    keys = new_session_keys()
    sender, _ = _ends(TransportMode.BOUND, keys)
    header0, ct0, plaintext0, gpa0 = _seal(sender, lane=0, tag=1)
    header0b, ct0b, _, _ = _seal(sender, lane=0, tag=2, gpa=GPA + PAGE_SIZE)
    header2, ct2, _, _ = _seal(sender, lane=2, tag=3)
    assert header0.flags == FLAG_BOUND
    assert header0.mac == _hand_mac(keys, header0, ct0, gpa0, 0, None)
    assert header0b.mac == _hand_mac(keys, header0b, ct0b, GPA + PAGE_SIZE, 1, None)
    assert header2.mac == _hand_mac(keys, header2, ct2, GPA, 0, 2)
    # Negative controls: the pre-lane formula does not fit a lane-2 packet, and lane 0 carries no lane.
    assert header2.mac != _hand_mac(keys, header2, ct2, GPA, 0, None)
    assert header0.mac != _hand_mac(keys, header0, ct0, gpa0, 0, 0)
    # And a sender that never names a lane (the pre-lane call) is lane 0.
    plain_sender, _ = _ends(TransportMode.BOUND, keys)
    header, ct = plain_sender.seal(CTX_DATA, plaintext0, gpa=gpa0, npages=1)
    assert header.mac == _hand_mac(keys, header, bytes(ct), gpa0, 0, None)


def test_sev_compat_binds_no_lane() -> None:
    """The compat MAC is the firmware's HMAC(TIK, aad || ciphertext) on every lane."""
    keys = new_session_keys()
    sender, _ = _ends(TransportMode.SEV_COMPAT, keys)
    for lane in (0, 1, 3):
        header, ct, _, _ = _seal(sender, lane=lane, tag=lane)
        assert header.flags == 0
        aad = build_aad(CTX_DATA, 0, header.iv, len(ct), len(ct))
        assert header.mac == hmac.digest(keys.tik, aad + ct, "sha256")


def test_an_unordered_receiver_opens_lane_0_packets_by_their_sequence() -> None:
    """A saved file: lane-0 packets (interleaved with other lanes' at the sender) open by their
    own lane-0 sequence numbers, in any order."""
    keys = new_session_keys()
    sender, reader = _ends(TransportMode.BOUND, keys, ordered=False)
    lane0 = []
    for i in range(3):
        lane0.append(_seal(sender, lane=0, tag=i, gpa=GPA + i * PAGE_SIZE))
        _seal(sender, lane=1, tag=100 + i)  # other lanes do not move lane 0's numbers
    for seq in (2, 0, 1):
        assert _open(reader, lane0[seq], lane=0, sequence=seq) == lane0[seq][2]
    with pytest.raises(IntegrityError):  # control: another sequence number does not verify
        _open(reader, lane0[0], lane=0, sequence=1)
    assert reader.next_sequence == 3


def test_an_unordered_receiver_refuses_further_lanes() -> None:
    sender, reader = _ends(TransportMode.BOUND, ordered=False)
    packet = _seal(sender, lane=1, tag=1)
    with pytest.raises(TransportError, match="one lane"):
        _open(reader, packet, lane=1, sequence=0)
    with pytest.raises(IntegrityError):  # a lane-1 packet is not a lane-0 one either
        _open(reader, packet, lane=0, sequence=0)
    assert reader.next_sequence == 0


def _interleavings(a: list[Packet], b: list[Packet]) -> Iterator[list[tuple[int, Packet]]]:
    """Every merge of lane 1's packets ``a`` and lane 2's ``b`` that keeps each lane's order."""
    n = len(a) + len(b)
    for positions in itertools.combinations(range(n), len(a)):
        ia, ib = iter(a), iter(b)
        yield [(1, next(ia)) if i in positions else (2, next(ib)) for i in range(n)]


def test_lanes_have_their_own_sequences_and_interleave_in_any_order() -> None:
    keys = new_session_keys()
    sender, _ = _ends(TransportMode.BOUND, keys)
    lane1 = [_seal(sender, lane=1, tag=10 + i) for i in range(2)]
    lane2 = [_seal(sender, lane=2, tag=20 + i) for i in range(2)]
    merges = list(_interleavings(lane1, lane2))
    assert len(merges) == 6
    for merge in merges:
        receiver = _receiver_like(keys, TransportMode.BOUND)
        for lane, packet in merge:
            assert _open(receiver, packet, lane=lane) == packet[2]
        assert receiver.next_sequence == 4


@pytest.mark.parametrize("mode", [TransportMode.BOUND, TransportMode.SEV_COMPAT], ids=["bound", "sev-compat"])
def test_two_packets_of_one_lane_swapped(mode: TransportMode) -> None:
    """Bound: lane 1's second packet first fails (each lane is ordered). Compat (the control of
    the mode): it opens, nothing binds the order."""
    keys = new_session_keys()
    sender, receiver = _ends(mode, keys)
    first, second = _seal(sender, lane=1, tag=1), _seal(sender, lane=1, tag=2)
    if mode is TransportMode.BOUND:
        with pytest.raises(IntegrityError, match="sequence 0 of lane 1"):
            _open(receiver, second, lane=1)
        # In order they open (the refused one did not advance the lane).
        assert _open(receiver, first, lane=1) == first[2]
        assert _open(receiver, second, lane=1) == second[2]
    else:
        assert _open(receiver, second, lane=1) == second[2]
        assert _open(receiver, first, lane=1) == first[2]


def test_next_sequence_counts_every_lane() -> None:
    keys = new_session_keys()
    sender, receiver = _ends(TransportMode.BOUND, keys)
    assert sender.next_sequence == receiver.next_sequence == 0
    packets = [(lane, _seal(sender, lane=lane, tag=i)) for i, lane in enumerate([0, 1, 1, 3, 3, 3])]
    assert sender.next_sequence == 6
    for done, (lane, packet) in enumerate(packets, start=1):
        _open(receiver, packet, lane=lane)
        assert receiver.next_sequence == done


def test_a_lane_out_of_range_is_refused() -> None:
    sender, receiver = _ends(TransportMode.BOUND)
    for bad in (-1, 1 << 16):
        with pytest.raises(TransportError, match="transport lane"):
            _seal(sender, lane=bad, tag=0)
    packet = _seal(sender, lane=0, tag=0)
    with pytest.raises(TransportError, match="transport lane"):
        _open(receiver, packet, lane=-1)
    assert sender.next_sequence == 1 and receiver.next_sequence == 0


# ---------------------------------------------------------------- the emulated PSP's lane=

NPAGES = 8


class _Hosts:
    """Two emulated PSPs in one mode, a guest launched on A (every page private), a session A → B."""

    def __init__(self, make: Callable[..., PspFirmware], mode: TransportMode, tmp_path: Path,
                 *, ordered: bool = True) -> None:
        self.a, self.b = make("hostA", mode), make("hostB", mode)
        self.src = GuestRam(tmp_path / "src.ram", NPAGES, create=True)
        self.dst = GuestRam(tmp_path / "dst.ram", NPAGES, create=True)
        self.src_handle = self.a.launch(0)
        src_key = MemoryEncryption(self.a.guest_key(self.src_handle))
        for page in range(NPAGES):
            src_key.write_private(self.src, page * PAGE_SIZE, _page(page))
        start = self.a.send_start(self.src_handle, self.b.pdh_cert_pem)
        self.dst_handle = self.b.receive_start(start.policy, start.pdh_cert_pem, start.session_blob, ordered=ordered)
        self.dst_key = MemoryEncryption(self.b.guest_key(self.dst_handle))

    def send(self, page: int, lane: int) -> tuple[bytes, bytes]:
        header, ct = self.a.send_update_data(self.src_handle, self.src, page * PAGE_SIZE, 1, lane=lane)
        return header, bytes(ct)

    def receive(self, page: int, packet: tuple[bytes, bytes], lane: int, sequence: int | None = None) -> None:
        self.b.receive_update_data(self.dst_handle, self.dst, page * PAGE_SIZE, 1, *packet, sequence=sequence,
                                   lane=lane)

    def placed(self, page: int) -> bytes:
        return bytes(self.dst_key.read_private(self.dst, page * PAGE_SIZE, 1))

    def close(self) -> None:
        self.src.close()
        self.dst.close()


@pytest.fixture(params=[TransportMode.BOUND, TransportMode.SEV_COMPAT], ids=["bound", "sev-compat"])
def hosts(request: pytest.FixtureRequest, make_firmware: Callable[..., PspFirmware],
          tmp_path: Path) -> Iterator[_Hosts]:
    pair = _Hosts(make_firmware, request.param, tmp_path)
    yield pair
    pair.close()


def test_psp_moved_and_replayed_packets_between_lanes(hosts: _Hosts) -> None:
    """RECEIVE_UPDATE_DATA with lane=: in bound mode a packet sealed for lane 2 and opened as
    lane 1, or lane 1's packet replayed on lane 2, is BAD_MEASUREMENT and writes nothing; in
    sev-compat both are placed (that format binds no connection: the session catches it there)."""
    bound = hosts.a.transport_mode is TransportMode.BOUND
    moved = hosts.send(2, lane=2)
    first = hosts.send(1, lane=1)
    before = hosts.dst.read(2 * PAGE_SIZE, 1)
    if bound:
        with pytest.raises(FirmwareError) as err:
            hosts.receive(2, moved, lane=1)
        assert err.value.status == FirmwareStatus.BAD_MEASUREMENT
        assert hosts.dst.read(2 * PAGE_SIZE, 1) == before  # nothing written
    else:
        hosts.receive(2, moved, lane=1)
        assert hosts.placed(2) == _page(2)
    hosts.receive(1, first, lane=1)  # lane 1's own packet (in bound mode: lane 1 still at sequence 0)
    assert hosts.placed(1) == _page(1)
    if bound:
        with pytest.raises(FirmwareError) as err:
            hosts.receive(1, first, lane=2)  # replayed on lane 2, whose next sequence is also 0
        assert err.value.status == FirmwareStatus.BAD_MEASUREMENT
        hosts.receive(2, moved, lane=2)  # control: the moved packet on its own lane
        assert hosts.placed(2) == _page(2)
    else:
        hosts.receive(1, first, lane=2)
    # Every lane's packets count in the session's sequence on both sides.
    assert hosts.a.transport_sequence(hosts.src_handle) == 2
    assert hosts.b.transport_sequence(hosts.dst_handle) == (2 if bound else 3)


def test_psp_lanes_interleave_and_count(make_firmware: Callable[..., PspFirmware], tmp_path: Path) -> None:
    hosts = _Hosts(make_firmware, TransportMode.BOUND, tmp_path)
    try:
        sent = [(page, lane, hosts.send(page, lane)) for page, lane in ((0, 0), (1, 1), (2, 2), (3, 1), (4, 0))]
        assert hosts.a.transport_sequence(hosts.src_handle) == 5
        # Received lane by lane in another interleaving (each lane in its own order).
        for page, lane, packet in sorted(sent, key=lambda s: (-s[1], s[0])):
            hosts.receive(page, packet, lane)
        assert [hosts.placed(p) for p in range(5)] == [_page(p) for p in range(5)]
        assert hosts.b.transport_sequence(hosts.dst_handle) == 5
    finally:
        hosts.close()


def test_psp_unordered_receive_refuses_a_lane(make_firmware: Callable[..., PspFirmware], tmp_path: Path) -> None:
    hosts = _Hosts(make_firmware, TransportMode.BOUND, tmp_path, ordered=False)
    try:
        packet = hosts.send(0, lane=0)
        with pytest.raises(FirmwareError) as err:
            hosts.receive(0, packet, lane=1, sequence=0)
        assert err.value.status == FirmwareStatus.INVALID_PARAM
        hosts.receive(0, packet, lane=0, sequence=0)  # control: lane 0, by its sequence
        assert hosts.placed(0) == _page(0)
    finally:
        hosts.close()


# =========================================================================== 2. sessions


def _codec(msg: wire.Message) -> wire.Message:
    """One message through the real codec, as the peer decodes it."""
    (out,) = wire.FrameDecoder().feed(wire.encode_bytes(msg))
    return out


def _source(connections: int, migration_id: str = "m-lanes") -> SourceSession:
    return SourceSession(migration_id, GUEST, "bound", MigrationPhase(started_at=T0), T0, connections=connections)


def _pair(connections: int = 4, migration_id: str = "m-lanes") -> tuple[SourceSession, DestinationSession]:
    return established(source=_source(connections, migration_id), now=T0)


def _join(source: SourceSession, dest: DestinationSession, lane: int) -> None:
    """One further connection joined, both proofs through the codec."""
    joined = dest.accept_join(_codec(source.join(lane)), T0)  # type: ignore[arg-type]
    source.check_joined(_codec(joined), lane)  # type: ignore[arg-type]


def _joined_pair(connections: int = 4, lanes: tuple[int, ...] = (1, 2, 3)) -> tuple[SourceSession, DestinationSession]:
    source, dest = _pair(connections)
    for lane in lanes:
        _join(source, dest, lane)
    return source, dest


def test_hello_carries_conns_and_both_ends_stripe_over_them() -> None:
    source = _source(4)
    hello = source.hello(T0)
    assert hello.to_meta()["conns"] == 4
    decoded = _codec(hello)
    assert isinstance(decoded, wire.Hello) and decoded.connections == 4
    source, dest = _pair(4)
    assert source.connections == dest.connections == 4
    # Control: one connection sends no conns (the frame is what it was before lanes).
    one = _source(1)
    assert "conns" not in one.hello(T0).to_meta()
    source, dest = _pair(1)
    assert source.connections == dest.connections == 1


def test_join_and_joined_verify_for_each_further_lane() -> None:
    source, dest = _pair(4)
    with pytest.raises(LocalProtocolError):  # no page on a lane before its JOINED
        source.page_sent(PageKind.ZERO, STRIPE_PAGES << PAGE_SHIFT, 1, lane=1)
    for lane in (1, 2, 3):
        join = source.join(lane)
        assert join.migration_id == "m-lanes" and join.lane == lane
        # The listener's fresh connection session takes JOIN (and hands it to the migration's).
        listener = DestinationSession(MigrationPhase(started_at=T0), T0)
        assert listener.receive(_codec(join), T0) == join
        assert listener.phase is Phase.JOINING
        joined = dest.accept_join(_codec(join), T0)  # type: ignore[arg-type]
        assert joined.lane == lane
        source.check_joined(_codec(joined), lane)  # type: ignore[arg-type]
    assert dest.joined == {1, 2, 3}
    source.page_sent(PageKind.ZERO, STRIPE_PAGES << PAGE_SHIFT, 1, lane=1)  # now allowed


def test_a_replayed_join_is_refused() -> None:
    source, dest = _pair(4)
    join = _codec(source.join(2))
    dest.accept_join(join, T0)  # type: ignore[arg-type]
    for _ in range(2):
        with pytest.raises(PeerProtocolError, match="replayed"):
            dest.accept_join(join, T0)  # type: ignore[arg-type]
    # A fresh JOIN for that lane (the source's own) is the same replay: a lane joins once.
    with pytest.raises(PeerProtocolError, match="joined already"):
        dest.accept_join(source.join(2), T0)
    assert dest.joined == {2}
    dest.accept_join(source.join(1), T0)  # control: another lane still joins
    assert dest.joined == {1, 2}


def test_a_join_for_lane_0_or_beyond_the_migration_is_refused() -> None:
    source, dest = _pair(4)
    with pytest.raises(LocalProtocolError):
        source.join(0)
    with pytest.raises(LocalProtocolError):
        source.join(4)
    for lane in (0, 4, 15):
        # MACed under the right key: only the lane check can refuse it.
        forged = wire.Join("m-lanes", lane, source._join_mac(wire.Join("m-lanes", lane), Role.SOURCE))
        with pytest.raises(PeerProtocolError, match="not a further connection") as err:
            dest.accept_join(forged, T0)
        assert not isinstance(err.value, AuthenticationError)
    assert dest.joined == frozenset()
    # On the wire the lane is 1..MAX_CONNECTIONS-1: lane 0 (the first connection) and lane 16
    # cannot even be decoded; lane 4 can (it fits some migration), the session refuses it above.
    for lane in (0, 16):
        with pytest.raises(ProtocolError, match="lane"):
            _codec(wire.Join("m-lanes", lane, bytes(32)))
        with pytest.raises(ProtocolError, match="lane"):
            _codec(wire.Joined(lane, bytes(32)))
    assert _codec(wire.Join("m-lanes", 4, bytes(32))) == wire.Join("m-lanes", 4, bytes(32))


def test_a_join_with_a_flipped_mac_byte_is_refused() -> None:
    source, dest = _pair(4)
    join = source.join(1)
    for i in (0, 17, 31):
        mac = bytearray(join.mac)
        mac[i] ^= 0x01
        with pytest.raises(AuthenticationError):
            dest.accept_join(_codec(wire.Join(join.migration_id, 1, bytes(mac))), T0)  # type: ignore[arg-type]
    with pytest.raises(AuthenticationError):  # the MAC also covers the lane and the id
        dest.accept_join(wire.Join(join.migration_id, 2, join.mac), T0)
    with pytest.raises(AuthenticationError):
        dest.accept_join(wire.Join("m-other", 1, join.mac), T0)
    assert dest.joined == frozenset()  # a refused JOIN takes no lane
    dest.accept_join(join, T0)  # control: the genuine one
    assert dest.joined == {1}


def test_a_join_made_under_another_sessions_key_is_refused() -> None:
    """The same migration id and lane, from another session (other keys, other transcript)."""
    source_a, dest_a = _pair(4)
    source_b, _ = _pair(4)
    with pytest.raises(AuthenticationError):
        dest_a.accept_join(_codec(source_b.join(1)), T0)  # type: ignore[arg-type]
    assert dest_a.joined == frozenset()
    dest_a.accept_join(_codec(source_a.join(1)), T0)  # type: ignore[arg-type]
    assert dest_a.joined == {1}


def test_check_joined_refuses_another_lane_a_bad_mac_and_another_session() -> None:
    source, dest = _pair(4)
    joined2 = dest.accept_join(source.join(2), T0)
    joined3 = dest.accept_join(source.join(3), T0)
    with pytest.raises(PeerProtocolError, match="JOINED for connection 2 on connection 3"):
        source.check_joined(joined2, 3)
    with pytest.raises(AuthenticationError):  # lane 3 claimed under lane 2's proof
        source.check_joined(wire.Joined(3, joined2.mac), 3)
    bad = bytearray(joined3.mac)
    bad[5] ^= 0x80
    with pytest.raises(AuthenticationError):
        source.check_joined(wire.Joined(3, bytes(bad)), 3)
    other_source, other_dest = _pair(4)
    with pytest.raises(AuthenticationError):  # a genuine JOINED of another migration's destination
        source.check_joined(other_dest.accept_join(other_source.join(3), T0), 3)
    with pytest.raises(LocalProtocolError):  # none of it let a page onto lane 3
        source.page_sent(PageKind.ZERO, (3 * STRIPE_PAGES) << PAGE_SHIFT, 1, lane=3)
    source.check_joined(_codec(joined3), 3)  # type: ignore[arg-type]  # control
    source.page_sent(PageKind.ZERO, (3 * STRIPE_PAGES) << PAGE_SHIFT, 1, lane=3)



# ---------------------------------------------------------------- the stripe check


def _gpa(page: int) -> int:
    return page << PAGE_SHIFT


def _frame(kind: PageKind, page: int, npages: int, header: bytes = bytes(52)) -> wire.Message:
    if kind is PageKind.PRIVATE:
        return wire.PrivatePages(_gpa(page), npages, header, bytes(npages * PAGE_SIZE))
    if kind is PageKind.SHARED:
        return wire.SharedPages(_gpa(page), npages, bytes(npages * PAGE_SIZE))
    return wire.ZeroPages(_gpa(page), npages)


def test_a_page_frame_must_come_on_its_stripes_connection() -> None:
    _, dest = _joined_pair(4)  # stripe k goes on connection 1 + k % 3; none on the first
    stripe1 = STRIPE_PAGES  # stripe 1 → connection 2
    frames_before = dest.chain.frames
    with pytest.raises(PeerProtocolError, match="goes on connection 2"):
        dest.page_received(_frame(PageKind.SHARED, stripe1, 2), 3)  # type: ignore[arg-type]
    with pytest.raises(PeerProtocolError, match="goes on connection 2"):
        dest.page_received(_frame(PageKind.ZERO, stripe1, 2), 0)  # type: ignore[arg-type]  # the control connection
    # Crossing a stripe boundary: pages 510..513 span connections 1 and 2.
    with pytest.raises(PeerProtocolError, match="crossing a stripe"):
        dest.page_received(_frame(PageKind.ZERO, stripe1 - 2, 4), 1)  # type: ignore[arg-type]
    with pytest.raises(PeerProtocolError):
        dest.page_received(_frame(PageKind.ZERO, stripe1 - 2, 4), 2)  # type: ignore[arg-type]
    assert dest.chain.frames == frames_before  # nothing refused entered a chain
    # Controls: each run on its own stripe's connection is admitted (stripe 3 wraps to connection 1).
    assert dest.page_received(_frame(PageKind.SHARED, stripe1, 2), 2) is PageKind.SHARED  # type: ignore[arg-type]
    assert dest.page_received(_frame(PageKind.ZERO, stripe1 - 4, 4), 1) is PageKind.ZERO  # type: ignore[arg-type]
    assert dest.page_received(_frame(PageKind.PRIVATE, 3 * STRIPE_PAGES, STRIPE_PAGES), 1) \
        is PageKind.PRIVATE  # type: ignore[arg-type]
    assert dest.page_received(_frame(PageKind.ZERO, 7 * STRIPE_PAGES + 511, 1), 2) \
        is PageKind.ZERO  # type: ignore[arg-type]
    assert dest.chain.further_frames() == (2, 2, 0)
    with dest.page_frame(_frame(PageKind.ZERO, 2 * STRIPE_PAGES, 1), 3) as kind:  # type: ignore[arg-type]
        assert kind is PageKind.ZERO  # the worker's entry point applies the same check
    with pytest.raises(PeerProtocolError):
        with dest.page_frame(_frame(PageKind.ZERO, 2 * STRIPE_PAGES, 1), 1):  # type: ignore[arg-type]
            pass


def test_a_page_frame_on_a_lane_that_has_not_joined_is_refused() -> None:
    _, dest = _joined_pair(4, lanes=(1, 2))
    stripe2 = 2 * STRIPE_PAGES  # → connection 3
    with pytest.raises(PeerProtocolError, match="before it joined"):
        dest.page_received(_frame(PageKind.ZERO, stripe2, 1), 3)  # type: ignore[arg-type]
    with pytest.raises(PeerProtocolError, match="not one of this migration's 4"):
        dest.page_received(_frame(PageKind.ZERO, 4 * STRIPE_PAGES, 1), 4)  # type: ignore[arg-type]
    assert dest.chain.frames == 0
    # Control: once lane 3 has joined, the same frame is admitted.
    _, dest = _joined_pair(4, lanes=(1, 2, 3))
    assert dest.page_received(_frame(PageKind.ZERO, stripe2, 1), 3) is PageKind.ZERO  # type: ignore[arg-type]


# ---------------------------------------------------------------- PREPARE over lanes

#: Frames of one test stream: (lane, kind, first page, npages); each on its stripe's connection
#: (4 connections: stripe k on connection 1 + k % 3).
STREAM = [
    (1, PageKind.PRIVATE, 0, 4),
    (2, PageKind.SHARED, 1 * STRIPE_PAGES, 2),
    (3, PageKind.ZERO, 2 * STRIPE_PAGES + 8, 100),
    (1, PageKind.PRIVATE, 3 * STRIPE_PAGES, 1),
    (2, PageKind.PRIVATE, 4 * STRIPE_PAGES, 3),
    (1, PageKind.ZERO, 6 * STRIPE_PAGES, 512),
    (3, PageKind.SHARED, 5 * STRIPE_PAGES + 500, 12),
]


def _header(i: int) -> bytes:
    return hashlib.sha256(b"hdr%d" % i).digest() + bytes(20)  # 52 bytes, unique per packet


def _send(source: SourceSession, frames: list[tuple[int, PageKind, int, int]]) -> None:
    for i, (lane, kind, page, n) in enumerate(frames):
        source.page_sent(kind, _gpa(page), n, _header(i) if kind is PageKind.PRIVATE else b"", lane=lane)


def _receive(dest: DestinationSession, frames: list[tuple[int, PageKind, int, int]],
             order: list[int] | None = None) -> None:
    for i in order if order is not None else range(len(frames)):
        lane, kind, page, n = frames[i]
        dest.page_received(_codec(_frame(kind, page, n, _header(i))), lane)  # type: ignore[arg-type]


def _prepare(source: SourceSession, dest: DestinationSession, seq: int = 3) -> wire.Prepare:
    """Pause, bitmap, vCPU state, PREPARE (verified by its MAC); returns what the destination got."""
    source.paused(T0)
    source.bitmap_sent(b"bitmap")
    dest.receive(_codec(wire.SharedBitmap(b"bitmap")), T0)
    vcpu = wire.VcpuState(0, None, b"vcpu")
    dest.receive(_codec(vcpu), T0)
    got = _codec(source.prepare(vcpu, seq, T0))
    dest.receive(got, T0)
    assert isinstance(got, wire.Prepare)
    return got


def test_prepare_agrees_when_each_lane_saw_its_frames_in_order() -> None:
    """The lanes interleave differently at the destination (other threads): no matter, per lane
    the order is the same."""
    source, dest = _joined_pair(4)
    _send(source, STREAM)
    _receive(dest, STREAM, order=[1, 0, 4, 2, 6, 3, 5])  # per lane: 0, 3, 5; 1, 4; 2, 6
    got = _prepare(source, dest)
    assert got.lanes == (3, 2, 2) and got.frames == len(STREAM)
    dest.check_prepare(got, 3)
    with pytest.raises(PeerProtocolError, match="transport_seq"):  # control: the check does check
        dest.check_prepare(got, 4)


def test_prepare_fails_when_a_frame_moved_from_lane_1_to_lane_2() -> None:
    """Lane 1's second frame (stripe 6) never arrives; lane 2 gets one more of the same kind and
    size (stripe 4, so the stripe check passes): the totals match, the per-lane counts do not."""
    source, dest = _joined_pair(4)
    sent = [(1, PageKind.SHARED, 3 * STRIPE_PAGES, 2), (1, PageKind.ZERO, 6 * STRIPE_PAGES, 8),
            (2, PageKind.SHARED, 1 * STRIPE_PAGES, 4)]
    arrived = [sent[0], (2, PageKind.ZERO, 4 * STRIPE_PAGES, 8), sent[2]]
    _send(source, sent)
    _receive(dest, arrived)
    got = _prepare(source, dest)
    with pytest.raises(PeerProtocolError) as err:
        dest.check_prepare(got, 3)
    text = str(err.value)
    assert "frames per further connection sent [2, 1, 0], received [1, 2, 0]" in text
    assert "order or placement" in text
    assert "frames sent" not in text and "pages sent" not in text  # the totals agreed


def test_prepare_fails_when_a_lanes_frames_are_reordered() -> None:
    """Same frames, same per-lane counts, lane 1's two frames swapped: the lane's chain differs."""
    source, dest = _joined_pair(4)
    sent = [(1, PageKind.SHARED, 0, 2), (1, PageKind.SHARED, 3 * STRIPE_PAGES, 2),
            (2, PageKind.ZERO, 1 * STRIPE_PAGES, 1)]
    _send(source, sent)
    _receive(dest, sent, order=[1, 0, 2])
    got = _prepare(source, dest)
    with pytest.raises(PeerProtocolError, match="order or placement") as err:
        dest.check_prepare(got, 3)
    assert "further connection" not in str(err.value)


def test_lane_chains_bind_which_lane_a_frame_came_on() -> None:
    """Below the stripe check: frames swapped between two lanes (equal counts everywhere) change
    the digest — what PREPARE relies on in sev-compat mode if a stripe check were ever bypassed."""
    a, b = LaneChains(3), LaneChains(3)
    a.lane(1).add(PageKind.ZERO, 0, 1)
    a.lane(2).add(PageKind.ZERO, PAGE_SIZE, 1)
    b.lane(1).add(PageKind.ZERO, PAGE_SIZE, 1)
    b.lane(2).add(PageKind.ZERO, 0, 1)
    assert a.further_frames() == b.further_frames() == (1, 1) and a.pages == b.pages
    assert a.digest() != b.digest()
    c = LaneChains(3)  # control: the same frames on the same lanes, added interleaved otherwise
    c.lane(2).add(PageKind.ZERO, PAGE_SIZE, 1)
    c.lane(1).add(PageKind.ZERO, 0, 1)
    assert c.digest() == a.digest()


def test_one_connection_prepare_digest_is_a_single_stream_chain() -> None:
    """Compatibility: with one connection PREPARE's stream digest is the pre-lane StreamChain's,
    and PREPARE carries no ``lanes``."""
    frames = [(0, kind, page, n) for _, kind, page, n in STREAM]
    single = StreamChain()
    for i, (_, kind, page, n) in enumerate(frames):
        single.add(kind, _gpa(page), n, _header(i) if kind is PageKind.PRIVATE else b"")
    source, dest = _pair(1)
    _send(source, frames)
    _receive(dest, frames)
    got = _prepare(source, dest)
    assert got.stream_digest == single.digest()
    assert got.lanes == () and "lanes" not in got.to_meta()
    dest.check_prepare(got, 3)
    # Negative control: over four connections the digest is the lanes' digest, not lane 0's
    # chain, even when every frame went on lane 0.
    chains = LaneChains(4)
    for i, (_, kind, page, n) in enumerate(frames):
        chains.lane(0).add(kind, _gpa(page), n, _header(i) if kind is PageKind.PRIVATE else b"")
    assert chains.lane(0).digest() == single.digest() and chains.digest() != single.digest()


# ---------------------------------------------------------------- fallback to one connection


def test_a_welcome_without_connections_makes_the_source_use_one() -> None:
    source = _source(4)
    hello = source.hello(T0)
    assert hello.connections == 4
    source.receive(_codec(wire.Welcome(b"PDH", capabilities=OLD_CAPS, nonce=os.urandom(32))), T0)
    assert "lanes" not in source.capabilities and source.connections == 1
    # Control: a destination that speaks it.
    source = _source(4)
    source.hello(T0)
    source.receive(_codec(wire.Welcome(b"PDH", nonce=os.urandom(32))), T0)
    assert source.connections == 4


class _OldWire(types.ModuleType):
    """What the destination's session sees as :mod:`migd.wire` in an older release: the same
    codec, without "lanes" in its capabilities or its WELCOME."""

    CAPABILITIES = OLD_CAPS
    Welcome = functools.partial(wire.Welcome, capabilities=OLD_CAPS)

    def __init__(self) -> None:
        super().__init__("old_wire")

    def __getattr__(self, name: str) -> object:
        return getattr(wire, name)


def test_a_destination_without_the_capability_takes_one_connection(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole handshake with a destination of a release without "lanes" (its capability
    list and its WELCOME lack it): both ends settle on one connection, though HELLO asked for 4;
    no JOIN can be made or taken, and every stripe goes on connection 0."""
    monkeypatch.setattr(dest_session_module, "wire", _OldWire())
    source, dest = _pair(4)
    assert source._hello.connections == 4
    assert source.phase is Phase.PRECOPY and dest.phase is Phase.RECEIVING  # the MACs verified
    assert source.connections == dest.connections == 1
    with pytest.raises(LocalProtocolError):
        source.join(1)
    with pytest.raises(PeerProtocolError, match="not a further connection"):
        dest.accept_join(wire.Join("m-lanes", 1, source._join_mac(wire.Join("m-lanes", 1), Role.SOURCE)), T0)
    assert dest.page_received(_frame(PageKind.ZERO, STRIPE_PAGES, 4), 0) is PageKind.ZERO  # type: ignore[arg-type]


def test_a_hello_without_the_capability_is_read_as_one_connection() -> None:
    """The destination's side of the same rule: ``conns`` counts only if "lanes" is agreed."""
    dest = DestinationSession(MigrationPhase(started_at=T0), T0)
    dest.receive(_codec(wire.Hello("m-old", GUEST, "bound", capabilities=OLD_CAPS, connections=4)), T0)
    assert dest.connections == 1
    dest = DestinationSession(MigrationPhase(started_at=T0), T0)  # control
    dest.receive(_codec(wire.Hello("m-new", GUEST, "bound", connections=4)), T0)
    assert dest.connections == 4


# =========================================================================== 3. stripes


def test_lane_of_and_stripe_end() -> None:
    s = STRIPE_PAGES
    assert s == 512
    # Four connections: the first carries control frames only, the stripes go round the other three.
    assert [lane_of(p, 4) for p in (0, s - 1, s, 2 * s, 3 * s + 7, 4 * s, 5 * s, 9 * s - 1)] == [1, 1, 2, 3, 1, 2, 3, 3]
    assert [lane_of(p, 3) for p in (0, s, 2 * s, 3 * s)] == [1, 2, 1, 2]
    assert {lane_of(p, 2) for p in (0, s, 3 * s, (1 << 26) - 1)} == {1}  # two: every page on the second
    assert [stripe_end(p, 4) for p in (0, s - 1, s, 3 * s + 1)] == [s, s, 2 * s, 4 * s]
    # One connection: always lane 0, and no stripe limit at all.
    assert {lane_of(p, 1) for p in (0, s, 3 * s, (1 << 26) - 1)} == {0}
    assert stripe_end(5 * s, 1) > 1 << 40


def test_in_lane() -> None:
    s = STRIPE_PAGES
    assert in_lane(0, s, 1, 4) and in_lane(s, 1, 2, 4) and in_lane(3 * s + 10, s - 10, 1, 4)
    assert not in_lane(1, s, 1, 4)  # one page into stripe 1
    assert not in_lane(s, 1, 1, 4) and not in_lane(s, 1, 3, 4)  # the wrong connection
    assert not in_lane(s - 1, 2, 1, 4) and not in_lane(s - 1, 2, 2, 4)  # crossing, whichever lane
    assert not in_lane(0, 0, 1, 4)  # an empty run is no run
    assert not any(in_lane(p, 1, 0, n) for p in (0, s, 2 * s) for n in (2, 4))  # nothing on the first
    # One connection: everything on lane 0, any length, nothing on another lane.
    assert in_lane(s - 1, 5 * s, 0, 1) and not in_lane(0, 1, 1, 1)


@settings(max_examples=200, deadline=None)
@given(page=st.integers(0, (1 << 26) - 1), npages=st.integers(1, 512), connections=st.integers(2, 16))
def test_every_run_belongs_to_at_most_one_lane(page: int, npages: int, connections: int) -> None:
    owners = [lane for lane in range(connections) if in_lane(page, npages, lane, connections)]
    fits = page + npages <= stripe_end(page, connections)
    assert owners == ([lane_of(page, connections)] if fits else [])
    assert 1 <= lane_of(page, connections) < connections  # a further connection, never the first
    assert lane_of(page, connections) == lane_of(stripe_end(page, connections) - 1, connections)  # a stripe: one lane
    assert lane_of(stripe_end(page, connections), connections) == lane_of(page, connections) % (connections - 1) + 1


# =========================================================================== 4. InFlight


def _run(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _finish(*threads: threading.Thread) -> None:
    for thread in threads:
        thread.join(JOIN_WAIT)
        assert not thread.is_alive(), "a thread is stuck"


def test_two_shared_sections_run_at_once() -> None:
    gate = InFlight()
    barrier = threading.Barrier(2, timeout=JOIN_WAIT)
    seen: list[int] = []

    def shared() -> None:
        with gate.shared():
            barrier.wait()  # both inside at the same time, or this breaks
            seen.append(gate.in_flight)
            barrier.wait()

    _finish(_run(shared), _run(shared))
    assert seen == [2, 2] and gate.in_flight == 0


def test_the_barrier_method_detects_sections_that_do_not_overlap() -> None:
    """Negative control of the test above: a shared and an exclusive section never meet, and the
    same barrier then breaks instead of passing."""
    gate = InFlight()
    barrier = threading.Barrier(2, timeout=0.3)
    broken: list[str] = []

    def enter(section: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with section():  # type: ignore[attr-defined]
                try:
                    barrier.wait()
                except threading.BrokenBarrierError:
                    broken.append("broken")
        return run

    _finish(_run(enter(gate.shared)), _run(enter(gate.exclusive)))
    assert broken  # at least the one that got in first waited alone


def test_an_exclusive_step_waits_for_a_shared_section() -> None:
    gate = InFlight()
    log: list[str] = []
    inside, trying = threading.Event(), threading.Event()

    def shared() -> None:
        with gate.shared():
            log.append("shared in")
            inside.set()
            assert trying.wait(JOIN_WAIT)
            threading.Event().wait(0.2)  # holds a while after the exclusive step asked
            log.append("shared out")

    def exclusive() -> None:
        assert inside.wait(JOIN_WAIT)
        trying.set()
        with gate.exclusive():
            log.append(f"exclusive in, {gate.in_flight} shared")

    _finish(_run(shared), _run(exclusive))
    assert log == ["shared in", "shared out", "exclusive in, 0 shared"]


def test_a_shared_section_waits_for_an_exclusive_step() -> None:
    gate = InFlight()
    log: list[str] = []
    inside, trying = threading.Event(), threading.Event()

    def exclusive() -> None:
        with gate.exclusive():
            log.append("exclusive in")
            inside.set()
            assert trying.wait(JOIN_WAIT)
            threading.Event().wait(0.2)
            log.append(f"exclusive out, {gate.in_flight} shared")  # the waiting one has not started

    def shared() -> None:
        assert inside.wait(JOIN_WAIT)
        trying.set()
        with gate.shared():
            log.append("shared in")

    _finish(_run(exclusive), _run(shared))
    assert log == ["exclusive in", "exclusive out, 0 shared", "shared in"]
    assert gate.in_flight == 0


def test_a_waiting_exclusive_step_holds_new_shared_sections_back() -> None:
    """A stream of page frames cannot starve the phase change: once an exclusive step waits,
    shared sections that arrive after it wait for it (negative control: the first shared section,
    already in, is not interrupted)."""
    gate = InFlight()
    log: list[str] = []
    first_in, release_first, exclusive_waiting, late_trying = (threading.Event() for _ in range(4))

    def first_shared() -> None:
        with gate.shared():
            log.append("first in")
            first_in.set()
            assert release_first.wait(JOIN_WAIT)
            log.append("first out")

    def exclusive() -> None:
        assert first_in.wait(JOIN_WAIT)
        exclusive_waiting.set()
        with gate.exclusive():
            log.append("exclusive")

    def late_shared() -> None:
        assert exclusive_waiting.wait(JOIN_WAIT)
        threading.Event().wait(0.1)  # the exclusive step is waiting by now
        late_trying.set()
        with gate.shared():
            log.append("late in")

    threads = [_run(first_shared), _run(exclusive), _run(late_shared)]
    assert late_trying.wait(JOIN_WAIT)
    threading.Event().wait(0.1)
    assert log == ["first in"]  # neither the exclusive step nor the late section got in
    release_first.set()
    _finish(*threads)
    assert log == ["first in", "first out", "exclusive", "late in"]


def test_a_shared_section_that_raises_still_releases_the_gate() -> None:
    gate = InFlight()
    with pytest.raises(RuntimeError):
        with gate.shared():
            raise RuntimeError("placement failed")
    assert gate.in_flight == 0
    done = threading.Event()

    def exclusive() -> None:
        with gate.exclusive():
            done.set()

    _finish(_run(exclusive))
    assert done.is_set()


# =========================================================================== 5. codec


def _hand_frame(ftype: int, meta: dict[str, object]) -> bytes:
    """A hand-built frame (sequence 0, valid CRC) with any metadata, even an invalid one."""
    packed = msgpack.packb(meta, use_bin_type=True)
    body = struct.pack(">BH", ftype, len(packed)) + packed
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<Q", 0)))
    return struct.pack(">I", len(body) + 4) + body + struct.pack(">I", crc)


def _decode(data: bytes) -> wire.Message:
    (msg,) = wire.FrameDecoder().feed(data)
    return msg


LANE_MESSAGES: list[wire.Message] = [
    wire.Join("mig-9", 1, b"\x01" * 32),
    wire.Join("m" * 64, 15, b"\x02" * 32),
    wire.Joined(3, b"\x03" * 32),
    wire.Hello("mig-9", GUEST, "bound", connections=16),
    wire.Hello("mig-9", GUEST, "bound", connections=2),
    wire.RoundEnd(2, 77, lanes=(10, 0, 12)),
    wire.RoundEnd(2, 77, lanes=tuple(range(15))),
    wire.Ping(8, lanes=((1 << 64) - 1,)),
    wire.Prepare(4096, frames=9, private=1, shared=2, zero=3, transport_seq=5, stream_digest=b"\x01" * 32,
                 bitmap_digest=b"\x02" * 32, vcpu_digest=b"\x03" * 32, mac=b"\x44" * 32, lanes=(2, 3, 4)),
]


@pytest.mark.parametrize("msg", LANE_MESSAGES, ids=lambda m: type(m).__name__)
def test_lane_messages_round_trip(msg: wire.Message) -> None:
    assert _codec(msg) == msg
    # The hand-built frame of the same metadata decodes alike (the encoder adds nothing else).
    assert _decode(_hand_frame(msg.TYPE, msg.to_meta())) == msg


def test_optional_fields_are_absent_at_their_default() -> None:
    """One connection: HELLO without conns, ROUND_END / PING / PREPARE without lanes — the frames
    of the release before lanes, byte for byte, and they decode to the defaults."""
    for msg, key in ((wire.Hello("m", GUEST, "bound"), "conns"), (wire.RoundEnd(1, 2), "lanes"),
                     (wire.Ping(3), "lanes"), (wire.Prepare(1), "lanes")):
        assert key not in msg.to_meta()
        assert _codec(msg) == msg
    assert _codec(wire.Hello("m", GUEST, "bound")).connections == 1  # type: ignore[union-attr]
    # Control: present when not the default.
    assert wire.Hello("m", GUEST, "bound", connections=3).to_meta()["conns"] == 3
    assert wire.RoundEnd(1, 2, (0,)).to_meta()["lanes"] == [0]


def _meta(msg: wire.Message, **changes: object) -> dict[str, object]:
    meta = dict(msg.to_meta())
    meta.update(changes)
    return meta


@pytest.mark.parametrize("counts", [list(range(16)), [1, -1], [True], ["1"], 3],
                         ids=["16-counts", "negative", "bool", "str", "not-a-list"])
@pytest.mark.parametrize("base", [wire.RoundEnd(1, 2), wire.Ping(3), wire.Prepare(1, mac=b"\x05" * 32)],
                         ids=["ROUND_END", "PING", "PREPARE"])
def test_bad_lane_counts_are_a_protocol_error(base: wire.Message, counts: list[object]) -> None:
    with pytest.raises(ProtocolError, match="lanes"):
        _decode(_hand_frame(base.TYPE, _meta(base, lanes=counts)))
    # Control: 15 counts (16 connections) decode.
    good = _decode(_hand_frame(base.TYPE, _meta(base, lanes=list(range(15)))))
    assert good.lanes == tuple(range(15))  # type: ignore[union-attr]


@pytest.mark.parametrize("conns", [1, 0, 17, -2, True], ids=str)
def test_conns_out_of_2_to_16_is_a_protocol_error(conns: object) -> None:
    """Present, conns is 2..16: an explicit 1 (or 0, 17, a bool) is refused, never read as one."""
    hello = wire.Hello("m", GUEST, "bound")
    with pytest.raises(ProtocolError, match="conns"):
        _decode(_hand_frame(hello.TYPE, _meta(hello, conns=conns)))
    for good in (2, 16):  # control
        decoded = _decode(_hand_frame(hello.TYPE, _meta(hello, conns=good)))
        assert isinstance(decoded, wire.Hello) and decoded.connections == good


@pytest.mark.parametrize(("ftype", "meta", "field"), [
    (wire.FrameType.JOIN, {"id": "m", "lane": 0, "mac": bytes(32)}, "lane"),
    (wire.FrameType.JOIN, {"id": "m", "lane": 16, "mac": bytes(32)}, "lane"),
    (wire.FrameType.JOIN, {"id": "m", "lane": 1, "mac": bytes(31)}, "mac"),
    (wire.FrameType.JOIN, {"id": "m" * 65, "lane": 1, "mac": bytes(32)}, "id"),
    (wire.FrameType.JOIN, {"id": "m", "mac": bytes(32)}, "lane"),
    (wire.FrameType.JOINED, {"lane": 0, "mac": bytes(32)}, "lane"),
    (wire.FrameType.JOINED, {"lane": 1}, "mac"),
])
def test_bad_join_and_joined_frames_are_a_protocol_error(ftype: int, meta: dict[str, object], field: str) -> None:
    with pytest.raises(ProtocolError, match=field):
        _decode(_hand_frame(ftype, meta))


def test_join_frames_are_control_frames_with_no_payload() -> None:
    """Control: a JOIN with a payload is refused before its fields are read (as every control frame)."""
    good = _hand_frame(wire.FrameType.JOIN, {"id": "m", "lane": 1, "mac": bytes(32)})
    assert _decode(good) == wire.Join("m", 1, bytes(32))
    packed = msgpack.packb({"id": "m", "lane": 1, "mac": bytes(32)}, use_bin_type=True)
    body = struct.pack(">BH", wire.FrameType.JOIN, len(packed)) + packed + b"payload"
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<Q", 0)))
    with pytest.raises(ProtocolError):
        _decode(struct.pack(">I", len(body) + 4) + body + struct.pack(">I", crc))
