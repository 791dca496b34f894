"""Adversarial checks of the several-connections work (issue 14) at the firmware, sans-I/O.

Each test states one guarantee the emulated PSP keeps when a migration sends or receives over
several connections, and the note above it says who could do what if it broke (threat model:
docs/design.md §1). Negative controls sit beside them (the one-step SEND_UPDATE_DATA, the state
check that command makes, the scratch buffers found where the test looks) so that a failure
reads as the guarantee broken, not as a broken set-up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from migd.abi import PAGE_SIZE, FirmwareStatus
from migd.errors import FirmwareError
from migd.platform.memory import GuestRam, MemoryEncryption
from migd.platform.psp import PspFirmware
from migd.sev_transport import TransportMode

NPAGES = 8


def _plaintext(tag: int) -> bytes:
    """One recognisable, non-zero page of guest data."""
    return bytes((i * 13 + tag) & 0xFF for i in range(256)) * (PAGE_SIZE // 256)


class _Source:
    """A launched guest on host A (every page private, known plaintext) with SEND_START done to B."""

    def __init__(self, make: Callable[..., PspFirmware], mode: TransportMode, tmp_path: Path) -> None:
        self.a, self.b = make("hostA", mode), make("hostB", mode)
        self.ram = GuestRam(tmp_path / "src.ram", NPAGES, create=True)
        self.handle = self.a.launch(0)
        key = MemoryEncryption(self.a.guest_key(self.handle))
        for page in range(NPAGES):
            key.write_private(self.ram, page * PAGE_SIZE, _plaintext(page))
        self.a.send_start(self.handle, self.b.pdh_cert_pem)

    def close(self) -> None:
        self.ram.close()


@pytest.fixture(params=[TransportMode.BOUND, TransportMode.SEV_COMPAT], ids=["bound", "sev-compat"])
def source(request: pytest.FixtureRequest, make_firmware: Callable[..., PspFirmware],
           tmp_path: Path) -> Iterator[_Source]:
    src = _Source(make_firmware, request.param, tmp_path)
    yield src
    src.close()


# ---------------------------------------------------------------------------------------------
# The deferred SEND_UPDATE_DATA leaves only ciphertext in the caller's buffer.
#
# docs/design.md §1: the PSP is the boundary; daemon code only calls firmware commands and never
# sees a private page's plaintext (real firmware's SEND_UPDATE_DATA decrypts and re-encrypts
# inside the PSP, atomically). The send pipeline splits the command in two: the synchronous half,
# ``send_update_data_deferred``, reads the run, decrypts it under the VEK and encrypts it under
# TEK into the *caller's* buffer (the lane's sequence number is taken there too, in queue order);
# only the HMAC under TIK over ciphertext + binding is left for the connection's worker thread
# (psp.DeferredPacket.seal, sev_transport.EncryptedPacket.header). Were the plaintext left in that
# buffer between the halves, any daemon code could read the guest's private pages until a worker
# sealed them -- for ever if the migration were cancelled first -- and no real PSP could offer the
# command, so the design would not map back onto SEV. Deferring the MAC alone costs little: it is
# the slower half (HMAC ~1.4 GB/s vs CTR ~4.4).
#
# Negative control: the one-step SEND_UPDATE_DATA, whose buffer holds ciphertext when it returns;
# the pages' plaintext is known (_plaintext), so a buffer holding it would be seen.
# ---------------------------------------------------------------------------------------------


def test_deferred_send_never_leaves_plaintext_in_the_callers_buffer(source: _Source) -> None:
    out = bytearray(2 * PAGE_SIZE)
    packet = source.a.send_update_data_deferred(source.handle, source.ram, 2 * PAGE_SIZE, 2, out, lane=1)
    exposed = [page for page in (2, 3) if bytes(out[(page - 2) * PAGE_SIZE:(page - 1) * PAGE_SIZE]) == _plaintext(page)]
    packet.seal()  # the packet still seals: what is checked is the buffer between the halves
    assert not exposed, (f"pages {exposed}: the caller's buffer held the guest's private plaintext between "
                         f"SEND_UPDATE_DATA's two halves; it must hold ciphertext only")


def test_control_synchronous_send_leaves_only_ciphertext(source: _Source) -> None:
    """Negative control: the one-step command's output buffer holds ciphertext when it returns."""
    out = bytearray(2 * PAGE_SIZE)
    source.a.send_update_data(source.handle, source.ram, 2 * PAGE_SIZE, 2, out, lane=1)
    assert bytes(out[:PAGE_SIZE]) != _plaintext(2) and bytes(out[PAGE_SIZE:]) != _plaintext(3)


# ---------------------------------------------------------------------------------------------
# A deferred packet is not sealed once its session has ended (SEND_CANCEL, SEND_FINISH).
#
# Every transport command checks the context's state (SUPDATE) when it runs, and the deferred
# command's second half does too: DeferredPacket.seal() re-checks, under the firmware lock, that
# the guest's outgoing session is still live -- the context in SUPDATE with the very sender that
# encrypted the packet -- and refuses with INVALID_GUEST_STATE otherwise. This matters because
# OutgoingMigration._roll_back calls SEND_CANCEL while the send lanes' workers may still be
# sealing (SendLane.close() comes later, in run()'s finally, and does not wait for the worker):
# without the check, packets of a cancelled session would be sealed -- and, during _roll_back's
# awaits, written -- after the firmware was told the session is over. The destination has failed
# by then, but the firmware model must hold: a cancelled or finished session seals nothing.
#
# Negative control: the one-step SEND_UPDATE_DATA refuses after SEND_CANCEL with the same status.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("end", ["send_cancel", "send_finish"])
def test_a_deferred_packet_is_not_sealed_after_the_session_ended(source: _Source, end: str) -> None:
    packet = source.a.send_update_data_deferred(source.handle, source.ram, 0, 1, bytearray(PAGE_SIZE), lane=1)
    getattr(source.a, end)(source.handle)
    with pytest.raises(FirmwareError) as err:  # no packet of the ended session may come out
        packet.seal()
    assert err.value.status == FirmwareStatus.INVALID_GUEST_STATE


def test_control_the_one_step_command_refuses_after_send_cancel(source: _Source) -> None:
    """Negative control: SEND_UPDATE_DATA itself refuses once the session was cancelled."""
    source.a.send_cancel(source.handle)
    with pytest.raises(FirmwareError) as err:
        source.a.send_update_data(source.handle, source.ram, 0, 1, lane=1)
    assert err.value.status == FirmwareStatus.INVALID_GUEST_STATE


# ---------------------------------------------------------------------------------------------
# RECEIVE_FINISH releases the per-connection RECEIVE scratch buffers.
#
# _GuestContext.scratch() keeps one work buffer per lane, as large as the largest run received
# (2 MiB). RECEIVE_FINISH (and DECOMMISSION) drop them: otherwise a guest that arrived over N
# connections would hold N x 2 MiB in its firmware context until it is deleted -- 32 MiB per guest
# at 16 connections, on every destination, for guests that will never receive again -- and the
# daemon's memory would grow with the guests it has taken in (invariant 6: fixed-size buffers).
#
# Negative control: before RECEIVE_FINISH the buffers are found where the test looks, one full
# stripe per connection.
# ---------------------------------------------------------------------------------------------

RUN = 512  # one stripe: the largest run a frame carries


def test_receive_finish_releases_the_per_lane_scratch(make_firmware: Callable[..., PspFirmware],
                                                      tmp_path: Path) -> None:
    lanes = 4
    a, b = make_firmware("hostA"), make_firmware("hostB")
    src = GuestRam(tmp_path / "src.ram", lanes * RUN, create=True)
    dst = GuestRam(tmp_path / "dst.ram", lanes * RUN, create=True)
    try:
        handle = a.launch(0)
        key = MemoryEncryption(a.guest_key(handle))
        key.write_private(src, 0, _plaintext(1) * (lanes * RUN))
        start = a.send_start(handle, b.pdh_cert_pem)
        dst_handle = b.receive_start(start.policy, start.pdh_cert_pem, start.session_blob)
        for lane in range(lanes):  # stripe k on connection k, as a 4-connection migration sends it
            gpa = lane * RUN * PAGE_SIZE
            header, ct = a.send_update_data(handle, src, gpa, RUN, lane=lane)
            b.receive_update_data(dst_handle, dst, gpa, RUN, header, ct, lane=lane)
        context = b._guests[dst_handle]  # the firmware's own state, as a test may look at it
        held = sum(len(buf) for buf in context._scratch.values())
        assert held == lanes * RUN * PAGE_SIZE  # control: the buffers are where this test looks
        b.receive_finish(dst_handle)
        held = sum(len(buf) for buf in context._scratch.values())
        assert held == 0, f"{held >> 20} MiB of RECEIVE scratch still held after RECEIVE_FINISH; it must be released"
    finally:
        src.close()
        dst.close()
