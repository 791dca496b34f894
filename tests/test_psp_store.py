"""PSP persistence: RUNNING guest contexts survive a restart of the firmware object, sealed."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from migd.abi import PAGE_SIZE, FirmwareStatus
from migd.errors import FirmwareError, IntegrityError
from migd.platform.memory import GuestRam, MemoryEncryption
from migd.platform.psp import ContextState, PspFirmware
from migd.platform.psp_store import NEXT_HANDLE, SEALING_KEY, ContextStore, SealedStoreError, context_file_name

Make = Callable[..., PspFirmware]


def _psp_dir(tmp_path: Path, name: str = "hostA") -> Path:
    return tmp_path / name / "psp"


def _invalid_guest(fw: PspFirmware, handle: int) -> None:
    with pytest.raises(FirmwareError) as err:
        fw.context_state(handle)
    assert err.value.status is FirmwareStatus.INVALID_GUEST


def test_running_context_survives_with_its_handle_and_key(make_firmware: Make, tmp_path: Path) -> None:
    fw = make_firmware("hostA")
    first, second = fw.launch(0), fw.launch(0x2)  # NOKS
    ram = GuestRam(tmp_path / "ram", 4, create=True)
    plaintext = bytes(range(256)) * (PAGE_SIZE // 256)
    MemoryEncryption(fw.guest_key(second)).write_private(ram, PAGE_SIZE, plaintext)
    keys = {h: fw.guest_key(h) for h in (first, second)}

    again = make_firmware("hostA")
    assert again.guest_handles() == [first, second]
    for handle in (first, second):
        assert again.context_state(handle) is ContextState.RUNNING
        assert again.guest_key(handle) == keys[handle]
    assert again.guest_policy(second) == 0x2
    # The memory encrypted before the restart still decrypts under the restored context.
    assert again.dbg_decrypt(second, ram, PAGE_SIZE, 1) == plaintext
    assert again.launch(0) == second + 1
    ram.close()


def test_a_fresh_platform_gets_its_sealing_key_on_first_use(make_firmware: Make, tmp_path: Path) -> None:
    fw = make_firmware("hostA")
    key_path = _psp_dir(tmp_path) / SEALING_KEY
    assert not key_path.exists()  # nothing sealed yet: no key
    handle = fw.launch(0)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert len(key_path.read_bytes()) == 32
    ctx_file = _psp_dir(tmp_path) / context_file_name(handle)
    assert stat.S_IMODE(ctx_file.stat().st_mode) == 0o600
    # The VEK is never on disk in the clear.
    vek = fw.guest_key(handle)
    for path in _psp_dir(tmp_path).iterdir():
        assert vek not in path.read_bytes() and vek[:16] not in path.read_bytes()


def test_handles_are_never_reused_across_restarts(make_firmware: Make) -> None:
    fw = make_firmware("hostA")
    handles = [fw.launch(0) for _ in range(3)]
    fw.decommission(handles[-1])
    fw.decommission(handles[-2])
    again = make_firmware("hostA")
    assert again.guest_handles() == handles[:1]
    assert again.launch(0) == handles[-1] + 1  # not handles[1]: the counter is stored too


def test_not_yet_running_contexts_are_not_stored(make_firmware: Make) -> None:
    fw = make_firmware("hostA")
    handle = fw.launch_start(0)  # LUPDATE: never RUNNING
    again = make_firmware("hostA")
    _invalid_guest(again, handle)
    assert again.launch(0) == handle + 1


def test_mid_send_comes_back_running_and_sent_is_gone(make_firmware: Make) -> None:
    a, b = make_firmware("hostA"), make_firmware("hostB")
    sending, sent = a.launch(0), a.launch(0)
    a.send_start(sending, b.pdh_cert_pem)
    a.send_start(sent, b.pdh_cert_pem)
    a.send_finish(sent)
    assert a.context_state(sending) is ContextState.SUPDATE

    again = make_firmware("hostA")
    assert again.context_state(sending) is ContextState.RUNNING  # as after SEND_CANCEL
    _invalid_guest(again, sent)
    again.send_start(sending, b.pdh_cert_pem)  # a new session can start


def test_send_cancel_after_send_finish_stores_the_context_again(make_firmware: Make) -> None:
    a, b = make_firmware("hostA"), make_firmware("hostB")
    handle = a.launch(0)
    a.send_start(handle, b.pdh_cert_pem)
    a.send_finish(handle)
    _invalid_guest(make_firmware("hostA"), handle)  # SENT: forgotten on disk
    a.send_cancel(handle)
    assert make_firmware("hostA").context_state(handle) is ContextState.RUNNING


def test_mid_receive_is_gone_and_received_is_kept(make_firmware: Make) -> None:
    a, b = make_firmware("hostA"), make_firmware("hostB")
    src1, src2 = a.launch(0), a.launch(0)
    starts = [a.send_start(h, b.pdh_cert_pem) for h in (src1, src2)]
    receiving, received = (b.receive_start(s.policy, s.pdh_cert_pem, s.session_blob) for s in starts)
    key = b.guest_key(received)
    b.receive_finish(received)

    again = make_firmware("hostB")
    _invalid_guest(again, receiving)
    assert again.context_state(received) is ContextState.RUNNING
    assert again.guest_key(received) == key


def test_decommission_removes_the_sealed_file(make_firmware: Make, tmp_path: Path) -> None:
    fw = make_firmware("hostA")
    handle = fw.launch(0)
    path = _psp_dir(tmp_path) / context_file_name(handle)
    assert path.exists()
    fw.decommission(handle)
    assert not path.exists()
    _invalid_guest(make_firmware("hostA"), handle)


# ---------------------------------------------------------------------- tampering (negative controls)


@pytest.fixture
def stored(make_firmware: Make, tmp_path: Path) -> tuple[Path, int]:
    """A platform with one stored context; returns (psp dir, handle). Loading it works (control)."""
    fw = make_firmware("hostA")
    handle = fw.launch(0)
    assert make_firmware("hostA").guest_handles() == [handle]
    return _psp_dir(tmp_path), handle


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("offset", [0, 8, 20, -1], ids=["magic", "nonce", "ciphertext", "tag"])
def test_a_flipped_bit_is_an_error_naming_the_file(
    stored: tuple[Path, int], make_firmware: Make, offset: int
) -> None:
    psp, handle = stored
    path = psp / context_file_name(handle)
    _flip(path, offset)
    with pytest.raises(SealedStoreError, match=str(path)):
        make_firmware("hostA")


def test_truncated_and_empty_files_are_errors(stored: tuple[Path, int], make_firmware: Make) -> None:
    psp, handle = stored
    path = psp / context_file_name(handle)
    data = path.read_bytes()
    for garbled in (data[:-1], b"", data + b"\0"):
        path.write_bytes(garbled)
        with pytest.raises(SealedStoreError, match="garbled"):
            make_firmware("hostA")


def test_a_context_renamed_to_another_handle_does_not_unseal(stored: tuple[Path, int], make_firmware: Make) -> None:
    psp, handle = stored
    renamed = psp / context_file_name(handle + 7)
    (psp / context_file_name(handle)).rename(renamed)
    with pytest.raises(SealedStoreError, match=f"{renamed}.*tampered"):
        make_firmware("hostA")


def test_another_platforms_sealing_key_does_not_unseal(stored: tuple[Path, int], make_firmware: Make) -> None:
    psp, _ = stored
    (psp / SEALING_KEY).write_bytes(os.urandom(32))
    with pytest.raises(SealedStoreError, match="tampered"):
        make_firmware("hostA")


def test_missing_or_loose_sealing_key_is_an_error(stored: tuple[Path, int], make_firmware: Make) -> None:
    psp, _ = stored
    key = psp / SEALING_KEY
    key.chmod(0o644)
    with pytest.raises(SealedStoreError, match="mode 0600"):
        make_firmware("hostA")
    key.chmod(0o600)
    key.write_bytes(key.read_bytes()[:16])
    with pytest.raises(SealedStoreError, match="32 bytes"):
        make_firmware("hostA")
    key.unlink()
    with pytest.raises(SealedStoreError, match="missing"):
        make_firmware("hostA")
    assert not key.exists()  # never silently replaced by a new key


def test_tampered_handle_counter_is_an_error(stored: tuple[Path, int], make_firmware: Make) -> None:
    psp, _ = stored
    _flip(psp / NEXT_HANDLE, 30)
    with pytest.raises(SealedStoreError, match=NEXT_HANDLE):
        make_firmware("hostA")


def test_sealed_store_error_is_an_integrity_error() -> None:
    assert issubclass(SealedStoreError, IntegrityError)


def test_an_interrupted_write_leaves_the_previous_version(stored: tuple[Path, int], make_firmware: Make) -> None:
    psp, handle = stored
    leftover = psp / f".{context_file_name(handle)}.abc123.tmp"
    leftover.write_bytes(b"half a write")
    assert make_firmware("hostA").guest_handles() == [handle]
    assert not leftover.exists()


def test_storage_failure_fails_the_command_and_keeps_the_state(
    make_firmware: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    fw = make_firmware("hostA")
    handle = fw.launch_start(0)
    fw.launch_measure(handle)

    def full_disk(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ContextStore, "save", full_disk)
    with pytest.raises(FirmwareError) as err:
        fw.launch_finish(handle)
    assert err.value.status is FirmwareStatus.HWERROR_PLATFORM
    assert fw.context_state(handle) is ContextState.LSECRET  # not RUNNING without its sealed copy
    monkeypatch.undo()
    fw.launch_finish(handle)
    assert make_firmware("hostA").context_state(handle) is ContextState.RUNNING
