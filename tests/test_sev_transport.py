"""Tests for migd.sev_transport: known answers, formats, tampering, and the bound-mode guarantees."""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.kbkdf import CounterLocation, KBKDFHMAC, Mode
from hypothesis import given, settings
from hypothesis import strategies as st

from migd.abi import PAGE_SIZE
from migd.errors import IntegrityError, TransportError
from migd.sev_transport import (
    AAD_SIZE,
    CTX_DATA,
    CTX_VMSA,
    FLAG_BOUND,
    FLAG_COMPRESSED,
    PACKET_HEADER_SIZE,
    SESSION_BLOB_SIZE,
    PacketHeader,
    SessionBlob,
    SessionKeys,
    TransportMode,
    TransportReceiver,
    TransportSender,
    build_aad,
    derive_kek_kik,
    derive_master_secret,
    kdf,
    new_session_keys,
    unwrap_session,
    wrap_session,
)

ZERO16 = bytes(16)
MODES = [TransportMode.BOUND, TransportMode.SEV_COMPAT]
SESSION = b"S" * 16
GPA = 0x10_0000
SENTINEL = 0xA5

# Known-answer vectors (docs/design.md §5 "SEV firmware transport"), from an independent
# open-source SEV implementation.
KAT_MASTER = bytes.fromhex("ab4d269fcc62bedb4511d56c386ce706")
KAT_WRAP_TK = bytes.fromhex("2137bc7f9bb8bd7c3e55a576a15d3454b3856b8ba27afadf46dcfee9f02c02c4")
KAT_WRAP_MAC = bytes.fromhex("3176c0752738bd9d5e86689534020f528c088f16238826b000b327dee6aeed7d")
KAT_POLICY_MAC = bytes.fromhex("aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af")


def pair(mode: TransportMode, keys: SessionKeys | None = None) -> tuple[TransportSender, TransportReceiver]:
    keys = keys or new_session_keys()
    return TransportSender(keys, mode, session_id=SESSION), TransportReceiver(keys, mode, session_id=SESSION)


def pages(npages: int, tag: int = 0) -> bytes:
    """Distinct, non-zero page contents (so a misplaced page is visible)."""
    return hashlib.shake_256(struct.pack("<II", npages, tag)).digest(npages * PAGE_SIZE)


def flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


# --------------------------------------------------------------------------- known answers


def test_kdf_known_answer() -> None:
    assert kdf(ZERO16, b"sev-master-secret", ZERO16, 16) == KAT_MASTER
    assert derive_master_secret(ZERO16, ZERO16) == KAT_MASTER
    # Negative control: one bit of context changes the output.
    assert kdf(ZERO16, b"sev-master-secret", flip(ZERO16, 0), 16) != KAT_MASTER


def _reference_kdf(key: bytes, label: bytes, context: bytes, length: int, byteorder: str) -> bytes:
    """SP 800-108 counter mode written out, with i and L in the given byte order."""
    fmt = "<I" if byteorder == "little" else ">I"
    out = b""
    i = 1
    while len(out) < length:
        block = struct.pack(fmt, i) + label + b"\x00" + context + struct.pack(fmt, length * 8)
        out += hmac.digest(key, block, "sha256")
        i += 1
    return out[:length]


@pytest.mark.parametrize("length", [16, 48, 80])
def test_kdf_is_little_endian_unlike_kbkdfhmac(length: int) -> None:
    """Why we roll our own: cryptography's KBKDFHMAC writes i and L big-endian (NIST's usual encoding)."""
    key, label, context = os.urandom(48), b"sev-master-secret", os.urandom(16)
    library = KBKDFHMAC(
        algorithm=hashes.SHA256(), mode=Mode.CounterMode, length=length, rlen=4, llen=4,
        location=CounterLocation.BeforeFixed, label=label, context=context, fixed=None,
    ).derive(key)
    ours = kdf(key, label, context, length)
    assert ours != library
    # Both sides are the same construction; only the integer encoding differs.
    assert library == _reference_kdf(key, label, context, length, "big")
    assert ours == _reference_kdf(key, label, context, length, "little")
    # And for the firmware's own vector the big-endian bytes are not the known answer.
    big = KBKDFHMAC(
        algorithm=hashes.SHA256(), mode=Mode.CounterMode, length=16, rlen=4, llen=4,
        location=CounterLocation.BeforeFixed, label=b"sev-master-secret", context=ZERO16, fixed=None,
    ).derive(ZERO16)
    assert big != KAT_MASTER


def test_session_blob_known_answer() -> None:
    blob = wrap_session(ZERO16, 0, tek=ZERO16, tik=ZERO16, nonce=ZERO16, wrap_iv=ZERO16)
    assert blob.wrap_tk == KAT_WRAP_TK
    assert blob.wrap_mac == KAT_WRAP_MAC
    assert blob.policy_mac == KAT_POLICY_MAC
    assert blob.pack() == ZERO16 + KAT_WRAP_TK + ZERO16 + KAT_WRAP_MAC + KAT_POLICY_MAC
    assert unwrap_session(ZERO16, blob, 0) == SessionKeys(tek=ZERO16, tik=ZERO16)
    # Negative control: another policy changes only policy_mac.
    other = wrap_session(ZERO16, 1, tek=ZERO16, tik=ZERO16, nonce=ZERO16, wrap_iv=ZERO16)
    assert (other.wrap_tk, other.wrap_mac) == (KAT_WRAP_TK, KAT_WRAP_MAC) and other.policy_mac != KAT_POLICY_MAC


def test_kek_kik_are_distinct_and_keyed_by_master() -> None:
    kek, kik = derive_kek_kik(KAT_MASTER)
    assert len(kek) == len(kik) == 16 and kek != kik
    assert derive_kek_kik(flip(KAT_MASTER, 3)) != (kek, kik)


def test_kdf_rejects_bad_arguments() -> None:
    with pytest.raises(TransportError, match="empty"):
        kdf(b"", b"l", b"", 16)
    with pytest.raises(TransportError, match="length"):
        kdf(ZERO16, b"l", b"", 0)
    with pytest.raises(TransportError, match="nonce"):
        derive_master_secret(ZERO16, bytes(15))
    with pytest.raises(TransportError, match="shared secret"):
        derive_master_secret(bytes(8), ZERO16)


# --------------------------------------------------------------------------- session blob


def test_session_blob_round_trip_and_fresh_randomness() -> None:
    z = os.urandom(48)  # a P-384 shared secret
    keys = new_session_keys()
    blob = wrap_session(z, 0x0003_0021, tek=keys.tek, tik=keys.tik)
    packed = blob.pack()
    assert len(packed) == SESSION_BLOB_SIZE
    assert SessionBlob.unpack(packed) == blob
    assert SessionBlob.unpack(memoryview(bytearray(packed))) == blob
    assert unwrap_session(z, SessionBlob.unpack(packed), 0x0003_0021) == keys
    again = wrap_session(z, 0x0003_0021, tek=keys.tek, tik=keys.tik)
    assert again.nonce != blob.nonce and again.wrap_iv != blob.wrap_iv and again.wrap_tk != blob.wrap_tk


@pytest.mark.parametrize("size", [0, SESSION_BLOB_SIZE - 1, SESSION_BLOB_SIZE + 1, 2 * SESSION_BLOB_SIZE])
def test_session_blob_wrong_size_rejected(size: int) -> None:
    with pytest.raises(TransportError, match=f"must be {SESSION_BLOB_SIZE} bytes, got {size}"):
        SessionBlob.unpack(bytes(size))


def test_session_blob_fields_validated() -> None:
    with pytest.raises(TransportError, match="wrap_tk"):
        SessionBlob(nonce=ZERO16, wrap_tk=bytes(31), wrap_iv=ZERO16, wrap_mac=bytes(32), policy_mac=bytes(32))
    with pytest.raises(TransportError, match="TEK"):
        wrap_session(ZERO16, 0, tek=bytes(15), tik=ZERO16)
    with pytest.raises(TransportError, match="policy"):
        wrap_session(ZERO16, 1 << 32, tek=ZERO16, tik=ZERO16)


def test_unwrap_wrong_shared_secret() -> None:
    z = os.urandom(48)
    blob = wrap_session(z, 0, tek=os.urandom(16), tik=os.urandom(16))
    unwrap_session(z, blob, 0)  # negative control
    with pytest.raises(IntegrityError, match="wrap_mac"):
        unwrap_session(flip(z, 100), blob, 0)


def test_unwrap_wrong_policy() -> None:
    z = os.urandom(48)
    blob = wrap_session(z, 0x21, tek=os.urandom(16), tik=os.urandom(16))
    unwrap_session(z, blob, 0x21)  # negative control
    with pytest.raises(IntegrityError, match="policy_mac"):
        unwrap_session(z, blob, 0x20)


@pytest.mark.parametrize("bit", [0, 127, 128, 300, 383, 384, 511, 512, 700, 767, 768, 900, 1023])
def test_unwrap_flipped_blob_bit(bit: int) -> None:
    """Every field is protected: nonce/wrap_tk/wrap_iv (wrong keys), wrap_mac, policy_mac."""
    z = os.urandom(48)
    packed = wrap_session(z, 0, tek=os.urandom(16), tik=os.urandom(16)).pack()
    unwrap_session(z, SessionBlob.unpack(packed), 0)  # negative control
    with pytest.raises(IntegrityError):
        unwrap_session(z, SessionBlob.unpack(flip(packed, bit)), 0)


# --------------------------------------------------------------------------- header and AAD


def test_packet_header_round_trip() -> None:
    header = PacketHeader(flags=FLAG_BOUND, iv=os.urandom(16), mac=os.urandom(32))
    packed = header.pack()
    assert len(packed) == PACKET_HEADER_SIZE
    assert packed[:4] == struct.pack("<I", FLAG_BOUND) and packed[4:20] == header.iv and packed[20:] == header.mac
    assert PacketHeader.unpack(packed) == header
    assert PacketHeader.unpack(memoryview(packed)) == header


@pytest.mark.parametrize("size", [0, 4, PACKET_HEADER_SIZE - 1, PACKET_HEADER_SIZE + 1, 4096])
def test_packet_header_wrong_size_rejected(size: int) -> None:
    with pytest.raises(TransportError, match=f"must be {PACKET_HEADER_SIZE} bytes, got {size}"):
        PacketHeader.unpack(bytes(size))


def test_packet_header_fields_validated() -> None:
    with pytest.raises(TransportError, match="iv"):
        PacketHeader(flags=0, iv=bytes(15), mac=bytes(32))
    with pytest.raises(TransportError, match="flags"):
        PacketHeader(flags=1 << 32, iv=ZERO16, mac=bytes(32))


def test_build_aad_layout() -> None:
    iv = bytes(range(16))
    aad = build_aad(CTX_VMSA, 0x8000_0001, iv, 0x01020304, 0x05060708)
    assert len(aad) == AAD_SIZE
    assert aad == b"\x03" + b"\x01\x00\x00\x80" + iv + b"\x04\x03\x02\x01" + b"\x08\x07\x06\x05"
    with pytest.raises(TransportError, match="trans_size"):
        build_aad(CTX_DATA, 0, iv, 1, 1 << 32)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("npages", [1, 16, 256])
def test_data_round_trip(mode: TransportMode, npages: int) -> None:
    sender, receiver = pair(mode)
    plaintext = pages(npages)
    wire = bytearray(npages * PAGE_SIZE + 100)  # larger preallocated buffer: only the prefix is used
    header, ciphertext = sender.seal(CTX_DATA, plaintext, gpa=GPA, npages=npages, out=wire)
    assert len(ciphertext) == len(plaintext) and bytes(ciphertext) != plaintext
    assert header.flags == (FLAG_BOUND if mode is TransportMode.BOUND else 0)
    assert wire[len(plaintext):] == bytes(100)
    dest = bytearray(npages * PAGE_SIZE)
    opened = receiver.open(CTX_DATA, PacketHeader.unpack(header.pack()), bytes(ciphertext), gpa=GPA, npages=npages,
                           out=memoryview(dest))
    assert bytes(opened) == plaintext and bytes(dest) == plaintext
    assert sender.next_sequence == receiver.next_sequence == 1


@pytest.mark.parametrize("mode", MODES)
def test_vmsa_round_trip_and_shared_sequence(mode: TransportMode) -> None:
    """DATA and VMSA packets share one sequence; a VMSA need not be a whole page."""
    sender, receiver = pair(mode)
    vmsa = os.urandom(PAGE_SIZE)
    short_vmsa = os.urandom(1000)
    packets = [
        (CTX_DATA, pages(2), GPA, 2),
        (CTX_VMSA, vmsa, 0, 1),
        (CTX_VMSA, short_vmsa, PAGE_SIZE, 1),
        (CTX_DATA, pages(1, tag=7), GPA + 2 * PAGE_SIZE, 1),
    ]
    sealed = [(ctx, sender.seal(ctx, pt, gpa=gpa, npages=n), gpa, n) for ctx, pt, gpa, n in packets]
    for (ctx, (header, ct), gpa, n), (_, pt, _, _) in zip(sealed, packets):
        assert bytes(receiver.open(ctx, header, ct, gpa=gpa, npages=n)) == pt
    assert sender.next_sequence == receiver.next_sequence == 4


def test_sev_compat_is_the_firmware_format() -> None:
    """Recompute a compat packet by hand: AES-128-CTR(TEK, iv) and HMAC(TIK, aad || ciphertext)."""
    keys = new_session_keys()
    sender, _ = pair(TransportMode.SEV_COMPAT, keys)
    plaintext = pages(3)
    header, ct = sender.seal(CTX_DATA, plaintext, gpa=GPA, npages=3)
    assert header.flags == 0
    decryptor = Cipher(algorithms.AES(keys.tek), modes.CTR(header.iv)).decryptor()
    assert decryptor.update(bytes(ct)) == plaintext
    aad = build_aad(CTX_DATA, 0, header.iv, len(plaintext), len(plaintext))
    assert header.mac == hmac.digest(keys.tik, aad + bytes(ct), "sha256")
    # Bound mode uses the same cipher but a MAC that is not the firmware one.
    bound_sender, _ = pair(TransportMode.BOUND, keys)
    bheader, bct = bound_sender.seal(CTX_DATA, plaintext, gpa=GPA, npages=3)
    baad = build_aad(CTX_DATA, FLAG_BOUND, bheader.iv, len(plaintext), len(plaintext))
    assert bheader.mac != hmac.digest(keys.tik, baad + bytes(bct), "sha256")


def test_fresh_iv_per_packet() -> None:
    sender, _ = pair(TransportMode.BOUND)
    plaintext = pages(1)
    (h1, c1), (h2, c2) = (sender.seal(CTX_DATA, plaintext, gpa=GPA, npages=1) for _ in range(2))
    assert h1.iv != h2.iv and bytes(c1) != bytes(c2)


@settings(max_examples=25, deadline=None)
@given(
    mode=st.sampled_from(MODES),
    npages=st.integers(1, 4),
    gpa_page=st.integers(0, (1 << 40) - 1),
    data=st.binary(min_size=1, max_size=64),
)
def test_round_trip_property(mode: TransportMode, npages: int, gpa_page: int, data: bytes) -> None:
    sender, receiver = pair(mode)
    plaintext = (data * (npages * PAGE_SIZE // len(data) + 1))[: npages * PAGE_SIZE]
    gpa = gpa_page * PAGE_SIZE
    header, ct = sender.seal(CTX_DATA, plaintext, gpa=gpa, npages=npages)
    assert bytes(receiver.open(CTX_DATA, header, ct, gpa=gpa, npages=npages)) == plaintext


# --------------------------------------------------------------------------- input validation


def test_seal_validates_inputs() -> None:
    sender, _ = pair(TransportMode.BOUND)
    with pytest.raises(TransportError, match="must be 8192 bytes, got 4096"):
        sender.seal(CTX_DATA, pages(1), gpa=GPA, npages=2)
    with pytest.raises(TransportError, match="page aligned"):
        sender.seal(CTX_DATA, pages(1), gpa=GPA + 8, npages=1)
    with pytest.raises(TransportError, match="out buffer must hold 4096 bytes, got 4095"):
        sender.seal(CTX_DATA, pages(1), gpa=GPA, npages=1, out=bytearray(4095))
    with pytest.raises(TransportError, match="read-only"):
        sender.seal(CTX_DATA, pages(1), gpa=GPA, npages=1, out=memoryview(bytes(4096)))
    with pytest.raises(TransportError, match="ctx"):
        sender.seal(0x01, pages(1), gpa=GPA, npages=1)
    with pytest.raises(TransportError, match="VMSA packet size"):
        sender.seal(CTX_VMSA, bytes(PAGE_SIZE + 1), gpa=0, npages=1)
    with pytest.raises(TransportError, match="npages"):
        sender.seal(CTX_VMSA, bytes(16), gpa=0, npages=0)
    # Rejected calls consume no sequence number; a valid one does.
    assert sender.next_sequence == 0
    sender.seal(CTX_DATA, pages(1), gpa=GPA, npages=1)
    assert sender.next_sequence == 1


def test_session_id_validated() -> None:
    keys = new_session_keys()
    with pytest.raises(TransportError, match="session id"):
        TransportSender(keys, session_id=b"")
    with pytest.raises(TransportError, match="session id"):
        TransportReceiver(keys, session_id=bytes(256))


# --------------------------------------------------------------------------- tampering

NPAGES_T = 4
TAMPER_HEADER_BITS = [("flags", b) for b in (0, 1, 7, 16, 30, 31)] + [("iv", b) for b in (0, 63, 64, 127)] + [
    ("mac", b) for b in (0, 100, 255)
]
TAMPER_CT_BITS = [0, 7, 4096 * 8 + 3, NPAGES_T * PAGE_SIZE * 8 - 1]


def _sealed(mode: TransportMode) -> tuple[TransportReceiver, PacketHeader, bytes, bytes]:
    sender, receiver = pair(mode)
    plaintext = pages(NPAGES_T)
    header, ct = sender.seal(CTX_DATA, plaintext, gpa=GPA, npages=NPAGES_T)
    return receiver, header, bytes(ct), plaintext


def _assert_rejected_untouched(
    receiver: TransportReceiver, header: PacketHeader, ct: bytes, exc: type[Exception], *, npages: int = NPAGES_T,
    ctx: int = CTX_DATA,
) -> None:
    out = bytearray([SENTINEL]) * (NPAGES_T * PAGE_SIZE)
    with pytest.raises(exc) as info:
        receiver.open(ctx, header, ct, gpa=GPA, npages=npages, out=out)
    assert out == bytearray([SENTINEL]) * (NPAGES_T * PAGE_SIZE), "a rejected packet wrote into out"
    assert receiver.next_sequence == 0, "a rejected packet advanced the sequence"
    assert str(info.value)


def _assert_original_opens(receiver: TransportReceiver, header: PacketHeader, ct: bytes, plaintext: bytes) -> None:
    out = bytearray([SENTINEL]) * (NPAGES_T * PAGE_SIZE)
    assert bytes(receiver.open(CTX_DATA, header, ct, gpa=GPA, npages=NPAGES_T, out=out)) == plaintext
    assert bytes(out) == plaintext


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("field_name", "bit"), TAMPER_HEADER_BITS)
def test_tampered_header_bit(mode: TransportMode, field_name: str, bit: int) -> None:
    receiver, header, ct, plaintext = _sealed(mode)
    if field_name == "flags":
        bad = PacketHeader(flags=header.flags ^ (1 << bit), iv=header.iv, mac=header.mac)
    elif field_name == "iv":
        bad = PacketHeader(flags=header.flags, iv=flip(header.iv, bit), mac=header.mac)
    else:
        bad = PacketHeader(flags=header.flags, iv=header.iv, mac=flip(header.mac, bit))
    _assert_rejected_untouched(receiver, bad, ct, IntegrityError)
    _assert_original_opens(receiver, header, ct, plaintext)  # negative control, after the attempt


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bit", TAMPER_CT_BITS)
def test_tampered_ciphertext_bit(mode: TransportMode, bit: int) -> None:
    receiver, header, ct, plaintext = _sealed(mode)
    _assert_rejected_untouched(receiver, header, flip(ct, bit), IntegrityError)
    _assert_original_opens(receiver, header, ct, plaintext)


@pytest.mark.parametrize("mode", MODES)
def test_aad_sizes_detect_truncated_run(mode: TransportMode) -> None:
    """Opening the first page of a 4-page packet as a 1-page packet: the AAD sizes differ."""
    receiver, header, ct, plaintext = _sealed(mode)
    _assert_rejected_untouched(receiver, header, ct[:PAGE_SIZE], IntegrityError, npages=1)
    _assert_rejected_untouched(receiver, header, ct[: 3 * PAGE_SIZE], IntegrityError, npages=3)
    # Wrong npages with the full ciphertext breaks the length rule before any MAC work.
    _assert_rejected_untouched(receiver, header, ct, TransportError, npages=NPAGES_T + 1)
    _assert_original_opens(receiver, header, ct, plaintext)


@pytest.mark.parametrize("mode", MODES)
def test_aad_sizes_detect_truncated_vmsa(mode: TransportMode) -> None:
    sender, receiver = pair(mode)
    vmsa = os.urandom(PAGE_SIZE)
    header, ct = sender.seal(CTX_VMSA, vmsa, gpa=0, npages=1)
    _assert_rejected_untouched(receiver, header, bytes(ct)[:-1], IntegrityError, npages=1, ctx=CTX_VMSA)
    assert bytes(receiver.open(CTX_VMSA, header, ct, gpa=0, npages=1)) == vmsa


@pytest.mark.parametrize("mode", MODES)
def test_ctx_byte_is_authenticated(mode: TransportMode) -> None:
    """A one-page data packet presented as a VMSA fails: ctx is in the AAD."""
    sender, receiver = pair(mode)
    header, ct = sender.seal(CTX_DATA, pages(1), gpa=0, npages=1)
    _assert_rejected_untouched(receiver, header, bytes(ct), IntegrityError, npages=1, ctx=CTX_VMSA)
    assert bytes(receiver.open(CTX_DATA, header, ct, gpa=0, npages=1)) == pages(1)


def test_compressed_flag_rejected_even_when_authentic() -> None:
    """A genuine firmware packet with COMPRESSED set: authentic, but unsupported -> TransportError."""
    keys = new_session_keys()
    _, receiver = pair(TransportMode.SEV_COMPAT, keys)
    iv = os.urandom(16)
    ct = os.urandom(PAGE_SIZE)
    mac = hmac.digest(keys.tik, build_aad(CTX_DATA, FLAG_COMPRESSED, iv, PAGE_SIZE, PAGE_SIZE) + ct, "sha256")
    with pytest.raises(TransportError, match="compressed") as info:
        receiver.open(CTX_DATA, PacketHeader(FLAG_COMPRESSED, iv, mac), ct, gpa=GPA, npages=1)
    assert not isinstance(info.value, IntegrityError)
    # Negative control: the same packet without the flag (and its MAC) opens.
    mac0 = hmac.digest(keys.tik, build_aad(CTX_DATA, 0, iv, PAGE_SIZE, PAGE_SIZE) + ct, "sha256")
    receiver.open(CTX_DATA, PacketHeader(0, iv, mac0), ct, gpa=GPA, npages=1)


@pytest.mark.parametrize(("send_mode", "recv_mode"), [(MODES[0], MODES[1]), (MODES[1], MODES[0])])
def test_mode_mismatch_is_diagnosed(send_mode: TransportMode, recv_mode: TransportMode) -> None:
    keys = new_session_keys()
    sender = TransportSender(keys, send_mode, session_id=SESSION)
    receiver = TransportReceiver(keys, recv_mode, session_id=SESSION)
    header, ct = sender.seal(CTX_DATA, pages(1), gpa=GPA, npages=1)
    with pytest.raises(IntegrityError, match=f"{send_mode.value} format but this receiver uses {recv_mode.value}"):
        receiver.open(CTX_DATA, header, ct, gpa=GPA, npages=1)


# --------------------------------------------------------------------------- bound mode guarantees


def _seal_run(sender: TransportSender, count: int) -> list[tuple[PacketHeader, bytes, bytes, int]]:
    """``count`` one-page packets at consecutive GPAs: (header, ciphertext, plaintext, gpa)."""
    out = []
    for i in range(count):
        gpa = GPA + i * PAGE_SIZE
        plaintext = pages(1, tag=i)
        header, ct = sender.seal(CTX_DATA, plaintext, gpa=gpa, npages=1)
        out.append((header, bytes(ct), plaintext, gpa))
    return out


def test_bound_detects_moved_packet() -> None:
    sender, receiver = pair(TransportMode.BOUND)
    ((header, ct, plaintext, gpa),) = _seal_run(sender, 1)
    with pytest.raises(IntegrityError, match="moved, replayed, reordered or dropped"):
        receiver.open(CTX_DATA, header, ct, gpa=gpa + PAGE_SIZE, npages=1)
    assert bytes(receiver.open(CTX_DATA, header, ct, gpa=gpa, npages=1)) == plaintext


def test_bound_detects_moved_run_with_other_npages() -> None:
    """Same bytes, same GPA, but claimed as part of a different run length (VMSA: no length rule)."""
    sender, receiver = pair(TransportMode.BOUND)
    vmsa = os.urandom(PAGE_SIZE)
    header, ct = sender.seal(CTX_VMSA, vmsa, gpa=0, npages=1)
    with pytest.raises(IntegrityError):
        receiver.open(CTX_VMSA, header, ct, gpa=0, npages=2)
    assert bytes(receiver.open(CTX_VMSA, header, ct, gpa=0, npages=1)) == vmsa


def test_bound_detects_replay() -> None:
    sender, receiver = pair(TransportMode.BOUND)
    (h0, c0, p0, g0), (h1, c1, p1, g1) = _seal_run(sender, 2)
    assert bytes(receiver.open(CTX_DATA, h0, c0, gpa=g0, npages=1)) == p0
    with pytest.raises(IntegrityError, match="sequence 1"):
        receiver.open(CTX_DATA, h0, c0, gpa=g0, npages=1)
    assert bytes(receiver.open(CTX_DATA, h1, c1, gpa=g1, npages=1)) == p1


def test_bound_detects_reorder() -> None:
    sender, receiver = pair(TransportMode.BOUND)
    (h0, c0, p0, g0), (h1, c1, p1, g1) = _seal_run(sender, 2)
    with pytest.raises(IntegrityError):
        receiver.open(CTX_DATA, h1, c1, gpa=g1, npages=1)
    # In order they still open (the failed attempt did not advance the sequence).
    assert bytes(receiver.open(CTX_DATA, h0, c0, gpa=g0, npages=1)) == p0
    assert bytes(receiver.open(CTX_DATA, h1, c1, gpa=g1, npages=1)) == p1


def test_bound_detects_dropped_packet() -> None:
    sender, receiver = pair(TransportMode.BOUND)
    (h0, c0, p0, g0), _dropped, (h2, c2, p2, g2) = _seal_run(sender, 3)
    assert bytes(receiver.open(CTX_DATA, h0, c0, gpa=g0, npages=1)) == p0
    with pytest.raises(IntegrityError):
        receiver.open(CTX_DATA, h2, c2, gpa=g2, npages=1)
    assert receiver.next_sequence == 1


def test_bound_detects_packet_from_another_session() -> None:
    keys = new_session_keys()
    sender = TransportSender(keys, session_id=b"session-A")
    # Same keys, other session id: only the binding tells them apart.
    other_id = TransportReceiver(keys, session_id=b"session-B")
    other_keys = TransportReceiver(new_session_keys(), session_id=b"session-A")
    right = TransportReceiver(keys, session_id=b"session-A")
    header, ct = sender.seal(CTX_DATA, pages(1), gpa=GPA, npages=1)
    for receiver in (other_id, other_keys):
        with pytest.raises(IntegrityError):
            receiver.open(CTX_DATA, header, ct, gpa=GPA, npages=1)
    assert bytes(right.open(CTX_DATA, header, ct, gpa=GPA, npages=1)) == pages(1)


def test_sev_compat_known_weakness_move_replay_reorder_undetected() -> None:
    """The firmware format binds no GPA or sequence: a host can move, replay and reorder pages.

    Each packet below opens and yields the original plaintext at the wrong place — exactly
    what bound mode (the default) refuses (tests above).
    """
    keys = new_session_keys()
    sender, receiver = pair(TransportMode.SEV_COMPAT, keys)
    (h0, c0, p0, g0), (h1, c1, p1, g1), (h2, c2, p2, g2) = _seal_run(sender, 3)
    # Reordered: packet 1 first.
    assert bytes(receiver.open(CTX_DATA, h1, c1, gpa=g1, npages=1)) == p1
    # Moved: packet 0's page lands at packet 2's GPA.
    assert bytes(receiver.open(CTX_DATA, h0, c0, gpa=g2, npages=1)) == p0
    # Replayed: packet 0 again, at yet another GPA; packet 2 is dropped and nothing notices.
    assert bytes(receiver.open(CTX_DATA, h0, c0, gpa=GPA + 100 * PAGE_SIZE, npages=1)) == p0
    # A session id is not part of the firmware MAC: a receiver of another session id opens it too.
    other_id = TransportReceiver(keys, TransportMode.SEV_COMPAT, session_id=b"another session")
    assert bytes(other_id.open(CTX_DATA, h2, c2, gpa=g0, npages=1)) == p2
    # Control: the MAC itself still works in compat mode (other keys, flipped ciphertext fail).
    with pytest.raises(IntegrityError):
        TransportReceiver(new_session_keys(), TransportMode.SEV_COMPAT, session_id=SESSION).open(
            CTX_DATA, h2, c2, gpa=g2, npages=1
        )
    with pytest.raises(IntegrityError):
        receiver.open(CTX_DATA, h2, flip(c2, 5), gpa=g2, npages=1)
