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
from migd.platform.psp import PspFirmware, RunAbandoned
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
        self.start = self.a.send_start(self.handle, self.b.pdh_cert_pem)

    def close(self) -> None:
        self.ram.close()


def _receiver(source: _Source) -> int:
    """The destination's RECEIVE_START for the source's session: its handle."""
    start = source.start
    return source.b.receive_start(start.policy, start.pdh_cert_pem, start.session_blob)


@pytest.fixture(params=[TransportMode.BOUND, TransportMode.SEV_COMPAT], ids=["bound", "sev-compat"])
def source(request: pytest.FixtureRequest, make_firmware: Callable[..., PspFirmware],
           tmp_path: Path) -> Iterator[_Source]:
    src = _Source(make_firmware, request.param, tmp_path)
    yield src
    src.close()


# ---------------------------------------------------------------------------------------------
# An abandoned SEND_UPDATE_DATA leaves no plaintext and takes no sequence number.
#
# docs/design.md §1: the PSP is the boundary; daemon code only calls firmware commands and never
# sees a private page's plaintext (real firmware's SEND_UPDATE_DATA decrypts and re-encrypts inside
# the PSP, atomically). With several connections the command runs in the connection's thread,
# and the source may abandon it after the read (``still_valid`` False: the guest's MSR dropped
# between the run's classification and the end of its read, so the read may be of a kernel that
# is rebooting). The command then wipes the plaintext it decrypted into the caller's buffer and
# seals nothing, so the connection's next packet takes the sequence number the abandoned one would
# have had: otherwise daemon code could read the guest's private pages from that buffer, and the
# destination would refuse every later packet of the connection (a gap in its sequence).
#
# Negative controls: the one-step command's buffer holds ciphertext when it returns, and the
# pages' plaintext is known (_plaintext), so a buffer holding it would be seen; a packet sealed
# out of sequence does fail at the receiver (bound mode).
# ---------------------------------------------------------------------------------------------


def test_an_abandoned_send_wipes_the_plaintext_and_keeps_the_sequence(source: _Source) -> None:
    out = bytearray(2 * PAGE_SIZE)
    with pytest.raises(RunAbandoned):
        source.a.send_update_data(source.handle, source.ram, 2 * PAGE_SIZE, 2, out, lane=1,
                                  still_valid=lambda: False)
    assert not any(out), "the caller's buffer kept the run's plaintext after the command was abandoned"
    header, ciphertext = source.a.send_update_data(source.handle, source.ram, 2 * PAGE_SIZE, 2, lane=1)
    receiver = _receiver(source)
    target = GuestRam(source.ram.path.with_name("dst.ram"), NPAGES, create=True)
    try:
        source.b.receive_update_data(receiver, target, 2 * PAGE_SIZE, 2, header, ciphertext, lane=1)
        if source.a.transport_mode is TransportMode.BOUND:
            # Control: one more packet sealed but never delivered makes the next one fail there.
            source.a.send_update_data(source.handle, source.ram, 0, 1, lane=1)
            late = source.a.send_update_data(source.handle, source.ram, PAGE_SIZE, 1, lane=1)
            with pytest.raises(FirmwareError):
                source.b.receive_update_data(receiver, target, PAGE_SIZE, 1, *late, lane=1)
    finally:
        target.close()


def test_control_synchronous_send_leaves_only_ciphertext(source: _Source) -> None:
    """Negative control: the one-step command's output buffer holds ciphertext when it returns."""
    out = bytearray(2 * PAGE_SIZE)
    source.a.send_update_data(source.handle, source.ram, 2 * PAGE_SIZE, 2, out, lane=1)
    assert bytes(out[:PAGE_SIZE]) != _plaintext(2) and bytes(out[PAGE_SIZE:]) != _plaintext(3)


def test_the_command_refuses_once_the_session_ended(source: _Source) -> None:
    """A connection's thread that runs SEND_UPDATE_DATA after SEND_CANCEL gets nothing sealed."""
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
