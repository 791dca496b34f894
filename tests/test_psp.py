"""The emulated PSP firmware: two hosts, real keys, real RAM files."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from migd.platform import identity
from migd.abi import PAGE_SIZE, FirmwareStatus, GuestPolicy
from migd.errors import FirmwareError
from migd.platform.memory import GuestRam, MemoryEncryption
from migd.platform.psp import ContextState, PspFirmware
from migd.sev_transport import TransportMode

NPAGES = 64


@pytest.fixture
def rams(tmp_path: Path) -> Iterator[tuple[GuestRam, GuestRam]]:
    src = GuestRam(tmp_path / "src.ram", NPAGES, create=True)
    dst = GuestRam(tmp_path / "dst.ram", NPAGES, create=True)
    yield src, dst
    src.close()
    dst.close()


def _pages(npages: int, tag: int) -> bytes:
    """Distinct, recognisable plaintext for a run of pages."""
    return bytes((i * 7 + tag) & 0xFF for i in range(256)) * (npages * PAGE_SIZE // 256)


class Pair:
    """A source host with a running guest and a destination host, both under one owner CA."""

    def __init__(self, make: Callable[..., PspFirmware], mode: TransportMode, policy: int = 0) -> None:
        self.a = make("hostA", mode)
        self.b = make("hostB", mode)
        self.policy = policy
        self.src_handle = self.a.launch(policy)
        self.src_key = MemoryEncryption(self.a.guest_key(self.src_handle))

    def start(self) -> int:
        start = self.a.send_start(self.src_handle, self.b.pdh_cert_pem)
        self.dst_handle = self.b.receive_start(start.policy, start.pdh_cert_pem, start.session_blob)
        self.dst_key = MemoryEncryption(self.b.guest_key(self.dst_handle))
        return self.dst_handle


@pytest.fixture(params=[TransportMode.BOUND, TransportMode.SEV_COMPAT], ids=["bound", "sev-compat"])
def pair(request: pytest.FixtureRequest, make_firmware: Callable[..., PspFirmware]) -> Pair:
    return Pair(make_firmware, request.param)


def test_private_run_round_trip_between_hosts(pair: Pair, rams: tuple[GuestRam, GuestRam]) -> None:
    src, dst = rams
    plaintext = _pages(16, 3)
    pair.src_key.write_private(src, 8 * PAGE_SIZE, plaintext)
    assert src.read(8 * PAGE_SIZE, 16) != plaintext  # the host sees ciphertext only
    dst_handle = pair.start()
    header, ciphertext = pair.a.send_update_data(pair.src_handle, src, 8 * PAGE_SIZE, 16)
    assert len(header) == 52
    assert bytes(ciphertext) != plaintext
    pair.b.receive_update_data(dst_handle, dst, 8 * PAGE_SIZE, 16, header, ciphertext)
    # Different VEKs: the raw bytes differ, the guest's view is identical.
    assert pair.a.guest_key(pair.src_handle) != pair.b.guest_key(dst_handle)
    assert dst.read(8 * PAGE_SIZE, 16) != src.read(8 * PAGE_SIZE, 16)
    assert bytes(pair.dst_key.read_private(dst, 8 * PAGE_SIZE, 16)) == plaintext
    pair.a.send_finish(pair.src_handle)
    pair.b.receive_finish(dst_handle)
    assert pair.a.context_state(pair.src_handle) is ContextState.SENT
    assert pair.b.context_state(dst_handle) is ContextState.RUNNING


def test_send_into_a_caller_buffer_and_never_into_guest_memory(pair: Pair, rams: tuple[GuestRam, GuestRam]) -> None:
    """``out`` receives the ciphertext (the source's reusable ring); guest RAM is refused as ``out``."""
    src, dst = rams
    plaintext = _pages(4, 5)
    pair.src_key.write_private(src, 0, plaintext)
    before = src.read(0, NPAGES)
    dst_handle = pair.start()
    out = bytearray(8 * PAGE_SIZE)
    header, ciphertext = pair.a.send_update_data(pair.src_handle, src, 0, 4, out)
    assert ciphertext.obj is out and bytes(ciphertext) == bytes(out[: 4 * PAGE_SIZE])
    pair.b.receive_update_data(dst_handle, dst, 0, 4, header, ciphertext)
    assert bytes(pair.dst_key.read_private(dst, 0, 4)) == plaintext
    for gpa in (0, 2 * PAGE_SIZE, 8 * PAGE_SIZE):  # the run itself, a part of it, other guest pages
        with pytest.raises(FirmwareError) as err:
            pair.a.send_update_data(pair.src_handle, src, 0, 4, src.view(gpa, 4))
        assert err.value.status == FirmwareStatus.INVALID_ADDRESS
    assert src.read(0, NPAGES) == before  # nothing decrypted into guest memory

@pytest.mark.parametrize("mode", [TransportMode.BOUND, TransportMode.SEV_COMPAT], ids=["bound", "sev-compat"])
def test_vmsa_round_trip(make_firmware: Callable[..., PspFirmware], mode: TransportMode) -> None:
    pair = Pair(make_firmware, mode, policy=int(GuestPolicy.ES))
    dst_handle = pair.start()
    vmsa = os.urandom(PAGE_SIZE)
    header, ciphertext = pair.a.send_update_vmsa(pair.src_handle, 0, vmsa)
    assert bytes(ciphertext) != vmsa
    # Tampered header or ciphertext: refused, nothing installed.
    for bad_header, bad_ciphertext in ((_flip(header, 5 * 8), ciphertext), (header, _flip(ciphertext, 100))):
        with pytest.raises(FirmwareError) as err:
            pair.b.receive_update_vmsa(dst_handle, 0, bad_header, bad_ciphertext)
        assert err.value.status == FirmwareStatus.BAD_MEASUREMENT
        assert pair.b.guest_vmsa(dst_handle, 0) is None
    # Negative control: the genuine packet installs the identical save area.
    pair.b.receive_update_vmsa(dst_handle, 0, header, ciphertext)
    assert pair.b.guest_vmsa(dst_handle, 0) == vmsa


@pytest.mark.parametrize("mode", [TransportMode.BOUND, TransportMode.SEV_COMPAT], ids=["bound", "sev-compat"])
def test_packet_context_is_authenticated_between_data_and_vmsa(
    make_firmware: Callable[..., PspFirmware], rams: tuple[GuestRam, GuestRam], mode: TransportMode
) -> None:
    """The AAD's ctx byte (0x02 data / 0x03 VMSA) is MACed: a packet cannot change its kind."""
    src, dst = rams
    pair = Pair(make_firmware, mode, policy=int(GuestPolicy.ES))
    pair.src_key.write_private(src, 0, _pages(1, 8))
    dst_handle = pair.start()
    # One page of guest memory at GPA 0 and vCPU 0's VMSA share address and size: only ctx differs.
    data_header, data_ct = pair.a.send_update_data(pair.src_handle, src, 0, 1)
    data_ct = memoryview(bytes(data_ct))
    with pytest.raises(FirmwareError) as err:
        pair.b.receive_update_vmsa(dst_handle, 0, data_header, data_ct)
    assert err.value.status == FirmwareStatus.BAD_MEASUREMENT
    assert pair.b.guest_vmsa(dst_handle, 0) is None
    # Negative control, as data: it lands (in bound mode: the failed attempt used no sequence number).
    pair.b.receive_update_data(dst_handle, dst, 0, 1, data_header, data_ct)
    assert bytes(pair.dst_key.read_private(dst, 0, 1)) == _pages(1, 8)
    vmsa = os.urandom(PAGE_SIZE)
    vmsa_header, vmsa_ct = pair.a.send_update_vmsa(pair.src_handle, 0, vmsa)
    before = dst.read(0, 1)
    with pytest.raises(FirmwareError) as err:
        pair.b.receive_update_data(dst_handle, dst, 0, 1, vmsa_header, vmsa_ct)
    assert err.value.status == FirmwareStatus.BAD_MEASUREMENT
    assert dst.read(0, 1) == before
    pair.b.receive_update_vmsa(dst_handle, 0, vmsa_header, vmsa_ct)  # negative control
    assert pair.b.guest_vmsa(dst_handle, 0) == vmsa


def test_vmsa_refused_without_es_policy(pair: Pair) -> None:
    pair.start()
    with pytest.raises(FirmwareError) as err:
        pair.a.send_update_vmsa(pair.src_handle, 0, bytes(PAGE_SIZE))
    assert err.value.status == FirmwareStatus.INVALID_GUEST


def test_private_page_copied_raw_reads_as_garbage(pair: Pair, rams: tuple[GuestRam, GuestRam]) -> None:
    src, dst = rams
    plaintext = _pages(1, 5)
    pair.src_key.write_private(src, 0, plaintext)
    pair.start()
    dst.write(0, src.read(0, 1))  # misrouted: sent as if shared
    seen = bytes(pair.dst_key.read_private(dst, 0, 1))
    assert seen != plaintext
    # Negative control: the same page through the transport arrives intact.
    header, ciphertext = pair.a.send_update_data(pair.src_handle, src, 0, 1)
    pair.b.receive_update_data(pair.dst_handle, dst, 0, 1, header, ciphertext)
    assert bytes(pair.dst_key.read_private(dst, 0, 1)) == plaintext


def test_shared_page_through_transport_reads_as_garbage(pair: Pair, rams: tuple[GuestRam, GuestRam]) -> None:
    src, dst = rams
    plaintext = _pages(1, 9)
    src.write(PAGE_SIZE, plaintext)  # a shared page: plaintext in RAM
    pair.start()
    header, ciphertext = pair.a.send_update_data(pair.src_handle, src, PAGE_SIZE, 1)
    pair.b.receive_update_data(pair.dst_handle, dst, PAGE_SIZE, 1, header, ciphertext)
    assert dst.read(PAGE_SIZE, 1) != plaintext  # the guest reads shared pages raw
    assert bytes(pair.dst_key.read_private(dst, PAGE_SIZE, 1)) != plaintext
    # Negative control: copied raw, as a shared page must be, it arrives intact.
    dst.write(PAGE_SIZE, src.read(PAGE_SIZE, 1))
    assert dst.read(PAGE_SIZE, 1) == plaintext


def _flip(data: bytes | memoryview, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@pytest.mark.parametrize(
    "where,bit",
    [("header", 0), ("header", 3 * 8 + 7), ("header", 4 * 8 + 3), ("header", 19 * 8 + 7), ("header", 20 * 8 + 7),
     ("header", 51 * 8), ("ciphertext", 0), ("ciphertext", 4096 * 8 - 1), ("ciphertext", 3 * 4096 * 8 + 1000)],
)
def test_tampered_packet_rejected_and_nothing_written(
    pair: Pair, rams: tuple[GuestRam, GuestRam], where: str, bit: int
) -> None:
    """Header bits are the AAD's flags and iv plus the MAC; the sizes are covered below."""
    src, dst = rams
    pair.src_key.write_private(src, 0, _pages(4, 1))
    pair.start()
    header, ciphertext = pair.a.send_update_data(pair.src_handle, src, 0, 4)
    pair_header, pair_ciphertext = header, memoryview(bytes(ciphertext))
    dst.write(0, bytes([0xA5]) * (4 * PAGE_SIZE))  # not zeros: a write of any bytes would show
    before = dst.read(0, 4)
    if where == "header":
        header = _flip(header, bit)
    else:
        ciphertext = memoryview(_flip(ciphertext, bit))
    with pytest.raises(FirmwareError) as err:
        pair.b.receive_update_data(pair.dst_handle, dst, 0, 4, header, ciphertext)
    assert err.value.status in (FirmwareStatus.BAD_MEASUREMENT, FirmwareStatus.INVALID_PARAM)
    assert dst.read(0, 4) == before
    # Negative control: the untampered packet is accepted afterwards (nothing was consumed).
    pair.b.receive_update_data(pair.dst_handle, dst, 0, 4, pair_header, pair_ciphertext)
    assert bytes(pair.dst_key.read_private(dst, 0, 4)) == _pages(4, 1)


def test_aad_size_mismatch_rejected(pair: Pair, rams: tuple[GuestRam, GuestRam]) -> None:
    """The sizes are in the AAD: a packet presented as a shorter run is refused, nothing written."""
    src, dst = rams
    pair.src_key.write_private(src, 0, _pages(2, 1))
    pair.start()
    header, ciphertext = pair.a.send_update_data(pair.src_handle, src, 0, 2)
    with pytest.raises(FirmwareError):
        pair.b.receive_update_data(pair.dst_handle, dst, 0, 1, header, ciphertext[:PAGE_SIZE])
    assert dst.read(0, 2) == bytes(2 * PAGE_SIZE)


def _two_packets(pair: Pair, src: GuestRam) -> list[tuple[int, bytes, memoryview]]:
    pair.src_key.write_private(src, 0, _pages(1, 1))
    pair.src_key.write_private(src, PAGE_SIZE, _pages(1, 2))
    pair.start()
    out = []
    for gpa in (0, PAGE_SIZE):
        header, ciphertext = pair.a.send_update_data(pair.src_handle, src, gpa, 1)
        out.append((gpa, header, memoryview(bytes(ciphertext))))
    return out


def test_bound_mode_detects_moved_replayed_and_reordered(
    make_firmware: Callable[..., PspFirmware], rams: tuple[GuestRam, GuestRam]
) -> None:
    src, dst = rams
    pair = Pair(make_firmware, TransportMode.BOUND)
    (g0, h0, c0), (g1, h1, c1) = _two_packets(pair, src)
    b, hd = pair.b, pair.dst_handle
    with pytest.raises(FirmwareError):  # moved to another GPA
        b.receive_update_data(hd, dst, 5 * PAGE_SIZE, 1, h0, c0)
    with pytest.raises(FirmwareError):  # reordered: packet 1 first
        b.receive_update_data(hd, dst, g1, 1, h1, c1)
    b.receive_update_data(hd, dst, g0, 1, h0, c0)  # negative control: the right order passes
    with pytest.raises(FirmwareError):  # replayed
        b.receive_update_data(hd, dst, g0, 1, h0, c0)
    b.receive_update_data(hd, dst, g1, 1, h1, c1)
    assert bytes(pair.dst_key.read_private(dst, 0, 2)) == _pages(1, 1) + _pages(1, 2)
    assert dst.read(5 * PAGE_SIZE, 1) == bytes(PAGE_SIZE)


def test_bound_mode_detects_dropped_packet(
    make_firmware: Callable[..., PspFirmware], rams: tuple[GuestRam, GuestRam]
) -> None:
    src, dst = rams
    pair = Pair(make_firmware, TransportMode.BOUND)
    _, (g1, h1, c1) = _two_packets(pair, src)
    with pytest.raises(FirmwareError):
        pair.b.receive_update_data(pair.dst_handle, dst, g1, 1, h1, c1)


def test_sev_compat_known_weakness_move_replay_reorder_go_undetected(
    make_firmware: Callable[..., PspFirmware], rams: tuple[GuestRam, GuestRam]
) -> None:
    """The firmware's MAC binds no GPA and no sequence (docs/design.md §5): a host can move pages."""
    src, dst = rams
    pair = Pair(make_firmware, TransportMode.SEV_COMPAT)
    (g0, h0, c0), (g1, h1, c1) = _two_packets(pair, src)
    b, hd = pair.b, pair.dst_handle
    b.receive_update_data(hd, dst, g1, 1, h1, c1)  # reordered
    b.receive_update_data(hd, dst, 5 * PAGE_SIZE, 1, h0, c0)  # moved
    b.receive_update_data(hd, dst, 6 * PAGE_SIZE, 1, h0, c0)  # replayed
    # Page 0's content now also sits, validly encrypted, at GPAs 5 and 6.
    assert bytes(pair.dst_key.read_private(dst, 5 * PAGE_SIZE, 1)) == _pages(1, 1)
    assert bytes(pair.dst_key.read_private(dst, 6 * PAGE_SIZE, 1)) == _pages(1, 1)


@pytest.mark.fault_class("access control: untrusted PDH")
def test_send_start_refuses_untrusted_pdh(
    make_firmware: Callable[..., PspFirmware], tmp_path: Path
) -> None:
    a = make_firmware("hostA")
    handle = a.launch(0)
    rogue_dir = tmp_path / "rogue"
    identity.init_host(rogue_dir, tmp_path / "rogue-ca", common_name="rogue")
    rogue = PspFirmware.from_state_dir(rogue_dir, [tmp_path / "rogue-ca" / identity.CA_CERT])
    with pytest.raises(FirmwareError) as err:
        a.send_start(handle, rogue.pdh_cert_pem)
    assert err.value.status == FirmwareStatus.INVALID_CERTIFICATE
    assert a.context_state(handle) is ContextState.RUNNING
    with pytest.raises(FirmwareError) as err:
        a.send_start(handle, b"-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
    assert err.value.status == FirmwareStatus.INVALID_CERTIFICATE
    # Negative control: a PDH from the same owner CA is accepted.
    a.send_start(handle, make_firmware("hostB").pdh_cert_pem)
    assert a.context_state(handle) is ContextState.SUPDATE


@pytest.mark.fault_class("access control: untrusted PDH")
def test_receive_start_refuses_untrusted_sender(
    make_firmware: Callable[..., PspFirmware], tmp_path: Path
) -> None:
    b = make_firmware("hostB")
    identity.init_host(tmp_path / "rogue", tmp_path / "rogue-ca", common_name="rogue")
    rogue = PspFirmware.from_state_dir(tmp_path / "rogue", [tmp_path / "rogue-ca" / identity.CA_CERT])
    # A session blob is never even looked at when the sender's PDH does not chain to a trusted root.
    with pytest.raises(FirmwareError) as err:
        b.receive_start(0, rogue.pdh_cert_pem, bytes(128))
    assert err.value.status == FirmwareStatus.INVALID_CERTIFICATE


@pytest.mark.fault_class("access control: NOSEND policy")
def test_send_start_refuses_nosend_policy(make_firmware: Callable[..., PspFirmware]) -> None:
    a, b = make_firmware("hostA"), make_firmware("hostB")
    handle = a.launch(int(GuestPolicy.NOSEND))
    with pytest.raises(FirmwareError) as err:
        a.send_start(handle, b.pdh_cert_pem)
    assert err.value.status == FirmwareStatus.POLICY_FAILURE
    assert a.context_state(handle) is ContextState.RUNNING
    # Negative control: the same hosts migrate a guest whose policy allows it.
    allowed = a.launch(int(GuestPolicy.NODBG))
    a.send_start(allowed, b.pdh_cert_pem)
    assert a.context_state(allowed) is ContextState.SUPDATE


def test_receive_start_detects_policy_mismatch(make_firmware: Callable[..., PspFirmware]) -> None:
    a, b = make_firmware("hostA"), make_firmware("hostB")
    start = a.send_start(a.launch(0), b.pdh_cert_pem)
    with pytest.raises(FirmwareError) as err:
        b.receive_start(int(GuestPolicy.NODBG), start.pdh_cert_pem, start.session_blob)
    assert err.value.status == FirmwareStatus.BAD_MEASUREMENT
    assert b.guest_handles() == []
    b.receive_start(start.policy, start.pdh_cert_pem, start.session_blob)  # negative control


def test_session_blob_for_another_host_is_rejected(make_firmware: Callable[..., PspFirmware]) -> None:
    a, b, c = make_firmware("hostA"), make_firmware("hostB"), make_firmware("hostC")
    start = a.send_start(a.launch(0), b.pdh_cert_pem)
    with pytest.raises(FirmwareError) as err:  # hostC cannot unwrap a session made for hostB
        c.receive_start(start.policy, start.pdh_cert_pem, start.session_blob)
    assert err.value.status == FirmwareStatus.BAD_MEASUREMENT


def test_commands_out_of_order_fail_like_the_state_machine(
    make_firmware: Callable[..., PspFirmware], rams: tuple[GuestRam, GuestRam]
) -> None:
    src, _ = rams
    a, b = make_firmware("hostA"), make_firmware("hostB")
    handle = a.launch_start(0)

    def status(call: Callable[[], object]) -> FirmwareStatus:
        with pytest.raises(FirmwareError) as err:
            call()
        return FirmwareStatus(err.value.status)

    assert status(lambda: a.launch_finish(handle)) == FirmwareStatus.INVALID_GUEST_STATE  # LUPDATE
    assert status(lambda: a.send_start(handle, b.pdh_cert_pem)) == FirmwareStatus.INVALID_GUEST_STATE
    a.launch_measure(handle)
    a.launch_finish(handle)
    assert status(lambda: a.send_update_data(handle, src, 0, 1)) == FirmwareStatus.INVALID_GUEST_STATE
    assert status(lambda: a.send_finish(handle)) == FirmwareStatus.INVALID_GUEST_STATE
    assert status(lambda: a.receive_finish(handle)) == FirmwareStatus.INVALID_GUEST_STATE
    a.send_start(handle, b.pdh_cert_pem)
    assert status(lambda: a.send_start(handle, b.pdh_cert_pem)) == FirmwareStatus.INVALID_GUEST_STATE
    assert status(lambda: a.receive_update_data(handle, src, 0, 1, bytes(52), bytes(PAGE_SIZE))) == (
        FirmwareStatus.INVALID_GUEST_STATE
    )
    a.send_cancel(handle)  # back to RUNNING: the guest runs on
    assert a.context_state(handle) is ContextState.RUNNING
    assert status(lambda: a.send_update_data(99, src, 0, 1)) == FirmwareStatus.INVALID_GUEST


def test_ranges_are_checked(pair: Pair, rams: tuple[GuestRam, GuestRam]) -> None:
    src, _ = rams
    pair.start()
    for gpa, npages in ((NPAGES * PAGE_SIZE, 1), (5, 1), ((NPAGES - 1) * PAGE_SIZE, 2)):
        with pytest.raises(FirmwareError) as err:
            pair.a.send_update_data(pair.src_handle, src, gpa, npages)
        assert err.value.status == FirmwareStatus.INVALID_ADDRESS
    with pytest.raises(FirmwareError) as err:
        pair.a.send_update_data(pair.src_handle, src, 0, 0)
    assert err.value.status == FirmwareStatus.INVALID_LEN


def test_dbg_decrypt_and_nodbg(make_firmware: Callable[..., PspFirmware], rams: tuple[GuestRam, GuestRam]) -> None:
    src, _ = rams
    a = make_firmware("hostA")
    debuggable = a.launch(0)
    MemoryEncryption(a.guest_key(debuggable)).write_private(src, 0, _pages(1, 4))
    assert a.dbg_decrypt(debuggable, src, 0, 1) == _pages(1, 4)
    locked = a.launch(int(GuestPolicy.NODBG))
    with pytest.raises(FirmwareError) as err:
        a.dbg_decrypt(locked, src, 0, 1)
    assert err.value.status == FirmwareStatus.POLICY_FAILURE


def test_launch_update_data_encrypts_in_place(
    make_firmware: Callable[..., PspFirmware], rams: tuple[GuestRam, GuestRam]
) -> None:
    src, _ = rams
    a = make_firmware("hostA")
    handle = a.launch_start(0)
    src.write(0, _pages(2, 6))
    a.launch_update_data(handle, src, 0, 2)
    assert src.read(0, 2) != _pages(2, 6)
    measurement = a.launch_measure(handle)
    assert len(measurement) == 48
    a.launch_finish(handle)
    assert bytes(MemoryEncryption(a.guest_key(handle)).read_private(src, 0, 2)) == _pages(2, 6)


def test_policy_needing_newer_api_is_refused(make_firmware: Callable[..., PspFirmware]) -> None:
    a = make_firmware("hostA")
    with pytest.raises(FirmwareError) as err:
        a.launch_start(1 << 16)  # API major 1 > 0
    assert err.value.status == FirmwareStatus.POLICY_FAILURE
