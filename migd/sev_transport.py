"""The SEV firmware transport: key derivation, session blob, packet header, page-run sealing.

Sans-I/O: pure functions and two small stateful objects (:class:`TransportSender`,
:class:`TransportReceiver`) that the emulated PSP firmware calls from SEND_START /
SEND_UPDATE_* and RECEIVE_START / RECEIVE_UPDATE_*. Formats follow the SEV API (AMD pub.
55766, "SEND_START", "SEND_UPDATE_DATA", "Key Derivation Function") as AMD's firmware
implements them, with the exact values of docs/design.md §5 "SEV firmware transport".

Two transport modes:

* ``sev-compat`` — the firmware's packet format: MAC = HMAC-SHA256(TIK, aad || ciphertext).
  It binds no GPA and no sequence number, so a host can move, replay, reorder or drop
  private pages undetected (the known weakness; tests demonstrate it).
* ``bound`` (default) — the MAC also covers a *binding* (session id, context, GPA, page
  count, per-session sequence number), and the header carries :data:`FLAG_BOUND` so a
  packet of the wrong format is diagnosed instead of merely failing.

Lanes (migd extension, for a migration striped over several connections): each lane (a
connection's index) has its own sequence space, and in ``bound`` mode the binding of a packet
on lane ``i > 0`` also carries ``i``, so a packet moved to another connection, or replayed
from one, fails its MAC. Lane 0 keeps the single-connection binding, so one connection and a
saved file are sealed exactly as before. (The AAD fixes the payload's length, so the two
binding lengths cannot be confused.) ``sev-compat`` binds neither, as the firmware's format.

Difference from real firmware, on purpose: one packet may carry a run of contiguous pages
(real firmware moves one page per command); the MAC then covers the whole run.
"""

from __future__ import annotations

import enum
import hmac
import os
import struct
import threading
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from migd.abi import PAGE_SIZE
from migd.errors import IntegrityError, TransportError

NONCE_SIZE = 16
TEK_SIZE = 16
TIK_SIZE = 16
KEK_SIZE = 16
KIK_SIZE = 16
IV_SIZE = 16
MAC_SIZE = 32  # HMAC-SHA256
SESSION_BLOB_SIZE = 128
PACKET_HEADER_SIZE = 52
AAD_SIZE = 29

#: AAD context byte (SEV API 55766, SEND_UPDATE_DATA / SEND_UPDATE_VMSA).
CTX_DATA = 0x02
CTX_VMSA = 0x03

#: Packet header flag bit 0: payload is compressed (SEV API). migd never compresses and rejects it.
FLAG_COMPRESSED = 1 << 0
#: migd extension in a bit the SEV API reserves: the MAC covers the bound-mode binding.
FLAG_BOUND = 1 << 31

U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1

_KDF_LABEL_MASTER = b"sev-master-secret"
_KDF_LABEL_KEK = b"sev-kek"
_KDF_LABEL_KIK = b"sev-kik"
#: migd extension: the hand-off key, one-way from TIK (see :func:`derive_handoff_key`).
_KDF_LABEL_HANDOFF = b"migd-handoff-v1"
HANDOFF_KEY_SIZE = 32

_BLOB = struct.Struct("<16s32s16s32s32s")
_HEADER = struct.Struct("<I16s32s")
_AAD = struct.Struct("<BI16sII")
_U32_LE = struct.Struct("<I")
#: Domain tag of the bound-mode binding, so its bytes can never be mistaken for other MAC input.
_BINDING_TAG = b"migd-bound-v1\x00"
#: Binding tail after the length-prefixed session id: ctx u8, gpa u64, npages u32, sequence u64.
_BINDING_TAIL = struct.Struct("<BQIQ")
#: The same on lane ``i > 0``, followed by the lane (u16).
_BINDING_TAIL_LANE = struct.Struct("<BQIQH")
MAX_LANE = 0xFFFF
_MAX_SESSION_ID = 255

assert _BLOB.size == SESSION_BLOB_SIZE and _HEADER.size == PACKET_HEADER_SIZE and _AAD.size == AAD_SIZE


class TransportMode(str, enum.Enum):
    """Which packet MAC the transport uses (config ``[sev] transport``)."""

    BOUND = "bound"
    SEV_COMPAT = "sev-compat"


# --------------------------------------------------------------------------- validation


def _check_len(value: bytes | bytearray | memoryview, expected: int, what: str) -> None:
    if len(value) != expected:
        raise TransportError(f"{what} must be {expected} bytes, got {len(value)}")


def _check_range(value: int, low: int, high: int, what: str) -> None:
    if not low <= value <= high:
        raise TransportError(f"{what} must be in {low}..{high:#x}, got {value}")


def _byte_view(buf: bytes | bytearray | memoryview, what: str, *, writable: bool = False) -> memoryview:
    """A flat unsigned-byte view of ``buf`` (no copy); rejects non-contiguous or read-only buffers."""
    view = memoryview(buf)
    if not view.c_contiguous:
        raise TransportError(f"{what} must be a contiguous buffer")
    if writable and view.readonly:
        raise TransportError(f"{what} must be writable, got a read-only buffer")
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


# --------------------------------------------------------------------------- key derivation


def kdf(key: bytes, label: bytes, context: bytes, length: int) -> bytes:
    """NIST SP 800-108 KDF in counter mode with HMAC-SHA256, as the SEV firmware computes it.

    Each block is ``HMAC(key, i || label || 0x00 || context || L)`` where ``i`` (from 1) and
    ``L`` (output length in *bits*) are little-endian u32 — the firmware's encoding (SEV API
    55766 "Key Derivation Function"); library KDFs such as KBKDFHMAC write them big-endian.
    """
    if not key:
        raise TransportError("KDF key must not be empty")
    _check_range(length, 1, U32_MAX // 8, "KDF output length")
    fixed = label + b"\x00" + context + _U32_LE.pack(length * 8)
    blocks = [
        hmac.digest(key, _U32_LE.pack(i) + fixed, "sha256") for i in range(1, -(-length // MAC_SIZE) + 1)
    ]
    return b"".join(blocks)[:length]


def derive_master_secret(shared_secret: bytes, nonce: bytes) -> bytes:
    """master = KDF(Z, "sev-master-secret", nonce, 16): the root of one transport session."""
    if len(shared_secret) < 16:
        raise TransportError(f"shared secret must be at least 16 bytes, got {len(shared_secret)}")
    _check_len(nonce, NONCE_SIZE, "nonce")
    return kdf(shared_secret, _KDF_LABEL_MASTER, nonce, 16)


def derive_kek_kik(master_secret: bytes) -> tuple[bytes, bytes]:
    """(KEK, KIK) = (KDF(master, "sev-kek"), KDF(master, "sev-kik")), empty context, 16 bytes each."""
    _check_len(master_secret, 16, "master secret")
    return (
        kdf(master_secret, _KDF_LABEL_KEK, b"", KEK_SIZE),
        kdf(master_secret, _KDF_LABEL_KIK, b"", KIK_SIZE),
    )


def _aes_ctr(key: bytes, iv: bytes, data: bytes) -> bytes:
    encryptor = Cipher(algorithms.AES(key), modes.CTR(iv)).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _policy_bytes(policy: int) -> bytes:
    _check_range(policy, 0, U32_MAX, "guest policy")
    return _U32_LE.pack(policy)


# --------------------------------------------------------------------------- session blob


@dataclass(frozen=True)
class SessionBlob:
    """The 128-byte session blob SEND_START returns and RECEIVE_START consumes."""

    nonce: bytes
    wrap_tk: bytes
    wrap_iv: bytes
    wrap_mac: bytes
    policy_mac: bytes

    def __post_init__(self) -> None:
        for name, size in (
            ("nonce", NONCE_SIZE),
            ("wrap_tk", TEK_SIZE + TIK_SIZE),
            ("wrap_iv", IV_SIZE),
            ("wrap_mac", MAC_SIZE),
            ("policy_mac", MAC_SIZE),
        ):
            value = getattr(self, name)
            _check_len(value, size, f"session blob {name}")
            object.__setattr__(self, name, bytes(value))

    def pack(self) -> bytes:
        """The wire form: nonce[16] wrap_tk[32] wrap_iv[16] wrap_mac[32] policy_mac[32]."""
        return _BLOB.pack(self.nonce, self.wrap_tk, self.wrap_iv, self.wrap_mac, self.policy_mac)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> SessionBlob:
        """Parse exactly :data:`SESSION_BLOB_SIZE` bytes."""
        _check_len(data, SESSION_BLOB_SIZE, "session blob")
        return cls(*_BLOB.unpack(data))


@dataclass(frozen=True)
class SessionKeys:
    """The transport keys of one session: TEK encrypts, TIK authenticates."""

    tek: bytes = field(repr=False)
    tik: bytes = field(repr=False)

    def __post_init__(self) -> None:
        _check_len(self.tek, TEK_SIZE, "TEK")
        _check_len(self.tik, TIK_SIZE, "TIK")
        object.__setattr__(self, "tek", bytes(self.tek))
        object.__setattr__(self, "tik", bytes(self.tik))


def derive_handoff_key(keys: SessionKeys, session_nonce: bytes, receiver_nonce: bytes) -> bytes:
    """The key that authenticates a migration's control messages (migd extension, not SEV API).

    KDF(TIK, "migd-handoff-v1", session nonce || receiver nonce, 32 bytes): only the two
    firmwares that hold the session's TIK can derive it, so a MAC under it proves the peer
    unwrapped *this* session (key confirmation), and the receiver's fresh nonce makes it unique
    to one connection: bytes recorded from any other session never verify. Being one-way from
    TIK, handing it to the daemon reveals neither transport key.
    """
    _check_len(session_nonce, NONCE_SIZE, "session nonce")
    if not 16 <= len(receiver_nonce) <= 64:
        raise TransportError(f"receiver nonce must be 16..64 bytes, got {len(receiver_nonce)}")
    return kdf(keys.tik, _KDF_LABEL_HANDOFF, bytes(session_nonce) + bytes(receiver_nonce), HANDOFF_KEY_SIZE)


def new_session_keys() -> SessionKeys:
    """Fresh random TEK and TIK, as SEND_START generates them."""
    return SessionKeys(tek=os.urandom(TEK_SIZE), tik=os.urandom(TIK_SIZE))


def wrap_session(
    shared_secret: bytes,
    policy: int,
    *,
    tek: bytes,
    tik: bytes,
    nonce: bytes | None = None,
    wrap_iv: bytes | None = None,
) -> SessionBlob:
    """Wrap TEK||TIK for the receiver that shares ``shared_secret`` (SEND_START).

    ``nonce`` / ``wrap_iv`` default to fresh random bytes; tests pin them for known answers.
    """
    keys = SessionKeys(tek=tek, tik=tik)
    policy_le = _policy_bytes(policy)
    nonce = os.urandom(NONCE_SIZE) if nonce is None else nonce
    wrap_iv = os.urandom(IV_SIZE) if wrap_iv is None else wrap_iv
    _check_len(wrap_iv, IV_SIZE, "wrap_iv")
    kek, kik = derive_kek_kik(derive_master_secret(shared_secret, nonce))
    wrap_tk = _aes_ctr(kek, wrap_iv, keys.tek + keys.tik)
    return SessionBlob(
        nonce=nonce,
        wrap_tk=wrap_tk,
        wrap_iv=wrap_iv,
        wrap_mac=hmac.digest(kik, wrap_tk, "sha256"),
        policy_mac=hmac.digest(keys.tik, policy_le, "sha256"),
    )


def unwrap_session(shared_secret: bytes, blob: SessionBlob, policy: int) -> SessionKeys:
    """Verify and unwrap a session blob (RECEIVE_START); any MAC mismatch → IntegrityError.

    The wrap MAC is checked before the keys are unwrapped, then the policy MAC proves the
    sender's guest policy equals ``policy``.
    """
    policy_le = _policy_bytes(policy)
    kek, kik = derive_kek_kik(derive_master_secret(shared_secret, blob.nonce))
    if not hmac.compare_digest(hmac.digest(kik, blob.wrap_tk, "sha256"), blob.wrap_mac):
        raise IntegrityError("session blob wrap_mac mismatch: wrong shared secret (PDH pair) or tampered blob")
    wrapped = _aes_ctr(kek, blob.wrap_iv, blob.wrap_tk)
    keys = SessionKeys(tek=wrapped[:TEK_SIZE], tik=wrapped[TEK_SIZE:])
    if not hmac.compare_digest(hmac.digest(keys.tik, policy_le, "sha256"), blob.policy_mac):
        raise IntegrityError(
            f"session blob policy_mac mismatch: sender's guest policy differs from {policy:#x} or blob tampered"
        )
    return keys


# --------------------------------------------------------------------------- packets


@dataclass(frozen=True)
class PacketHeader:
    """The 52-byte header of one transport packet: flags u32, iv[16], mac[32]."""

    flags: int
    iv: bytes
    mac: bytes

    def __post_init__(self) -> None:
        _check_range(self.flags, 0, U32_MAX, "packet flags")
        _check_len(self.iv, IV_SIZE, "packet iv")
        _check_len(self.mac, MAC_SIZE, "packet mac")
        object.__setattr__(self, "iv", bytes(self.iv))
        object.__setattr__(self, "mac", bytes(self.mac))

    def pack(self) -> bytes:
        """The wire form: flags u32 LE, iv[16], mac[32]."""
        return _HEADER.pack(self.flags, self.iv, self.mac)

    @classmethod
    def unpack(cls, data: bytes | bytearray | memoryview) -> PacketHeader:
        """Parse exactly :data:`PACKET_HEADER_SIZE` bytes."""
        _check_len(data, PACKET_HEADER_SIZE, "packet header")
        return cls(*_HEADER.unpack(data))


def build_aad(ctx: int, flags: int, iv: bytes, uncompressed_size: int, trans_size: int) -> bytes:
    """The 29-byte packed AAD the firmware MACs before the ciphertext (little-endian)."""
    _check_range(ctx, 0, 0xFF, "AAD ctx")
    _check_range(flags, 0, U32_MAX, "AAD flags")
    _check_len(iv, IV_SIZE, "AAD iv")
    _check_range(uncompressed_size, 0, U32_MAX, "AAD uncompressed_size")
    _check_range(trans_size, 0, U32_MAX, "AAD trans_size")
    return _AAD.pack(ctx, flags, iv, uncompressed_size, trans_size)


def _check_packet(ctx: int, length: int, gpa: int, npages: int) -> None:
    """Length and range rules shared by seal and open (checked before any crypto or write)."""
    _check_range(gpa, 0, U64_MAX, "gpa")
    _check_range(npages, 1, U32_MAX, "npages")
    if ctx == CTX_DATA:
        if gpa % PAGE_SIZE:
            raise TransportError(f"data packet gpa must be page aligned, got {gpa:#x}")
        if length != npages * PAGE_SIZE:
            raise TransportError(f"data packet of {npages} pages must be {npages * PAGE_SIZE} bytes, got {length}")
        # trans_size is a u32 in the AAD (SEV API), which caps a run at 1 MiB pages - 1.
        _check_range(length, PAGE_SIZE, U32_MAX, "data packet size")
    elif ctx == CTX_VMSA:
        # A VMSA is one page-sized save area (SEV-ES); npages only enters the binding.
        _check_range(length, 1, PAGE_SIZE, "VMSA packet size")
    else:
        raise TransportError(f"packet ctx must be {CTX_DATA:#04x} (data) or {CTX_VMSA:#04x} (VMSA), got {ctx:#x}")


class _Lane:
    """One lane's sequence counter, and the lock that makes its check and advance one step."""

    __slots__ = ("next_seq", "lock")

    def __init__(self) -> None:
        self.next_seq = 0
        self.lock = threading.Lock()


class _TransportEnd:
    """State shared by both ends of one session: keys, mode, session id, a sequence counter per lane."""

    def __init__(self, keys: SessionKeys, mode: TransportMode, session_id: bytes) -> None:
        self.mode = TransportMode(mode)
        if not 1 <= len(session_id) <= _MAX_SESSION_ID:
            raise TransportError(f"session id must be 1..{_MAX_SESSION_ID} bytes, got {len(session_id)}")
        self._aes = algorithms.AES(keys.tek)
        # Keyed once; each packet MACs on a copy (saves the HMAC key schedule per packet).
        self._mac_base = hmac.new(keys.tik, digestmod="sha256")
        self._flags = FLAG_BOUND if self.mode is TransportMode.BOUND else 0
        self._binding_head = _BINDING_TAG + bytes([len(session_id)]) + bytes(session_id)
        self._lanes: dict[int, _Lane] = {0: _Lane()}
        self._lanes_lock = threading.Lock()

    def lane(self, index: int) -> _Lane:
        """Lane ``index``'s state (created at its first packet)."""
        _check_range(index, 0, MAX_LANE, "transport lane")
        lane = self._lanes.get(index)
        if lane is None:
            with self._lanes_lock:
                lane = self._lanes.setdefault(index, _Lane())
        return lane

    @property
    def next_sequence(self) -> int:
        """Packets sealed (sender) or accepted (receiver) so far, over every lane.

        With one lane, the sequence number the next packet carries.
        """
        return sum(lane.next_seq for lane in list(self._lanes.values()))

    def _mac(self, ctx: int, flags: int, iv: bytes, payload: memoryview, gpa: int, npages: int, seq: int,
             lane: int = 0) -> bytes:
        """HMAC(TIK, aad [|| binding] || ciphertext) on one HMAC object: no copy of the payload."""
        mac = self._mac_base.copy()
        mac.update(build_aad(ctx, flags, iv, len(payload), len(payload)))
        if self.mode is TransportMode.BOUND:
            tail = (_BINDING_TAIL.pack(ctx, gpa, npages, seq) if lane == 0
                    else _BINDING_TAIL_LANE.pack(ctx, gpa, npages, seq, lane))
            mac.update(self._binding_head + tail)
        mac.update(payload)
        return mac.digest()


class TransportSender:
    """The sending end of one transport session (SEND_UPDATE_DATA / SEND_UPDATE_VMSA)."""

    def __init__(
        self, keys: SessionKeys, mode: TransportMode = TransportMode.BOUND, *, session_id: bytes
    ) -> None:
        self._end = _TransportEnd(keys, mode, session_id)

    @property
    def mode(self) -> TransportMode:
        """The transport mode of this session."""
        return self._end.mode

    @property
    def next_sequence(self) -> int:
        """Packets sealed so far, every lane (one lane: the next one's sequence number)."""
        return self._end.next_sequence

    def seal(
        self,
        ctx: int,
        plaintext: bytes | bytearray | memoryview,
        *,
        gpa: int,
        npages: int,
        out: bytearray | memoryview | None = None,
        lane: int = 0,
    ) -> tuple[PacketHeader, memoryview]:
        """Encrypt and MAC one packet; returns (header, view of the ciphertext).

        The ciphertext goes into ``out`` (at least ``len(plaintext)`` bytes) or a new buffer.
        Each packet gets a fresh random IV, so CTR keystream never repeats under one TEK.
        ``lane``: the connection it goes on (its own sequence space; bound into the MAC if > 0).
        """
        end = self._end
        state = end.lane(lane)
        src = _byte_view(plaintext, "plaintext")
        n = len(src)
        _check_packet(ctx, n, gpa, npages)
        dst = _byte_view(bytearray(n) if out is None else out, "out", writable=True)
        if len(dst) < n:
            raise TransportError(f"out buffer must hold {n} bytes, got {len(dst)}")
        dst = dst[:n]
        with state.lock:
            seq = state.next_seq
            if seq > U64_MAX:
                raise TransportError("transport sequence space exhausted; start a new session")
            state.next_seq = seq + 1
        iv = os.urandom(IV_SIZE)
        Cipher(end._aes, modes.CTR(iv)).encryptor().update_into(src, dst)
        flags = end._flags
        header = PacketHeader(flags=flags, iv=iv, mac=end._mac(ctx, flags, iv, dst, gpa, npages, seq, lane))
        return header, dst


class TransportReceiver:
    """The receiving end of one transport session (RECEIVE_UPDATE_DATA / RECEIVE_UPDATE_VMSA).

    In bound mode each lane's packets must be opened in the order they were sealed; ``open``
    calls on one lane are serialized so the sequence check and its advance are one step (lanes
    open in parallel).

    ``ordered=False`` (migd extension, for a saved file): each ``open`` names the packet's
    sequence number instead. A file keeps only the newest packet of each page slot, read in
    address order, so the stream's order is gone; the binding still ties each packet to its
    GPA and sequence, and the file's authenticated trailer binds which sequence each slot holds.
    """

    def __init__(
        self, keys: SessionKeys, mode: TransportMode = TransportMode.BOUND, *, session_id: bytes,
        ordered: bool = True,
    ) -> None:
        self._end = _TransportEnd(keys, mode, session_id)
        self.ordered = ordered

    @property
    def mode(self) -> TransportMode:
        """The transport mode of this session."""
        return self._end.mode

    @property
    def next_sequence(self) -> int:
        """Packets accepted so far, every lane (one lane: the sequence number the next must carry)."""
        return self._end.next_sequence

    def open(
        self,
        ctx: int,
        header: PacketHeader,
        ciphertext: bytes | bytearray | memoryview,
        *,
        gpa: int,
        npages: int,
        out: bytearray | memoryview | None = None,
        sequence: int | None = None,
        lane: int = 0,
    ) -> memoryview:
        """Verify then decrypt one packet; returns a view of the plaintext.

        The MAC is verified (constant time) before anything is decrypted: on any error
        nothing is written to ``out`` and the expected sequence number does not move.
        ``sequence``: the packet's sequence number, required by (and only by) an unordered
        receiver. ``lane``: the connection it came on (ordered receivers only).
        IntegrityError: the MAC does not verify. TransportError: malformed lengths,
        or an authentic packet in a format migd does not accept (compressed, other mode).
        """
        end = self._end
        if lane and not self.ordered:
            raise TransportError("an unordered receiver (a saved file) has one lane")
        state = end.lane(lane)
        if (sequence is None) is not self.ordered:
            raise TransportError("an unordered receiver needs each packet's sequence number, an ordered one "
                                 "takes none" if sequence is None else "this receiver opens packets in "
                                 "stream order: a sequence number cannot be given")
        if sequence is not None:
            _check_range(sequence, 0, U64_MAX, "packet sequence")
        src = _byte_view(ciphertext, "ciphertext")
        n = len(src)
        _check_packet(ctx, n, gpa, npages)
        dst = _byte_view(bytearray(n) if out is None else out, "out", writable=True)
        if len(dst) < n:
            raise TransportError(f"out buffer must hold {n} bytes, got {len(dst)}")
        dst = dst[:n]
        with state.lock:
            seq = state.next_seq if sequence is None else sequence
            expected = end._mac(ctx, header.flags, header.iv, src, gpa, npages, seq, lane)
            if not hmac.compare_digest(expected, header.mac):
                raise IntegrityError(self._mismatch_message(ctx, header.flags, gpa, npages, seq, lane))
            # Authentic, but is it a format we accept? Checked after the MAC so that a
            # flipped flag bit reads as tampering, and a genuine peer gets a precise reason.
            if header.flags & FLAG_COMPRESSED:
                raise TransportError("packet flags mark a compressed payload; migd never compresses")
            if header.flags != end._flags:
                raise TransportError(
                    f"packet flags {header.flags:#x} do not match {end.mode.value} mode (expected {end._flags:#x})"
                )
            state.next_seq = seq + 1 if sequence is None else max(state.next_seq, seq + 1)
        Cipher(end._aes, modes.CTR(header.iv)).decryptor().update_into(src, dst)
        return dst

    def _mismatch_message(self, ctx: int, flags: int, gpa: int, npages: int, seq: int, lane: int) -> str:
        end = self._end
        where = f"ctx {ctx:#04x} gpa {gpa:#x} npages {npages}" + (f" lane {lane}" if lane else "")
        if flags & ~(FLAG_COMPRESSED | FLAG_BOUND):
            hint = f"header flags {flags:#x} carry unknown bits (tampered header)"
        elif (flags & FLAG_BOUND) != (end._flags & FLAG_BOUND):
            sent = TransportMode.BOUND if flags & FLAG_BOUND else TransportMode.SEV_COMPAT
            hint = (
                f"header flags mark the {sent.value} format but this receiver uses {end.mode.value} "
                "(peer misconfigured or header tampered)"
            )
        elif end.mode is TransportMode.BOUND:
            hint = (
                f"tampered, or not the packet sealed for this session and place as sequence {seq} "
                f"{f'of lane {lane} ' if lane else ''}(moved, replayed, reordered or dropped, or sent on "
                "another connection)"
            )
        else:
            hint = "tampered header or ciphertext"
        return f"packet MAC mismatch at {where}: {hint}"
