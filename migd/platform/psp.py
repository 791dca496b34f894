"""The emulated PSP (AMD Secure Processor) firmware of one host.

It follows the guest state machine of the SEV API (AMD pub. 55766, "Guest State
Transitions"): LAUNCH_START → LUPDATE → LAUNCH_MEASURE → LSECRET → LAUNCH_FINISH → RUNNING;
SEND_START: RUNNING → SUPDATE → SEND_FINISH → SENT (SEND_CANCEL back to RUNNING);
RECEIVE_START → RUPDATE → RECEIVE_FINISH → RUNNING. A command issued in any other state
fails with ``INVALID_GUEST_STATE``, as the real firmware does.

Differences from real firmware, on purpose:

* SEND/RECEIVE_UPDATE_DATA take a *run* of contiguous pages per command (real firmware
  moves one page per command); the packet's MAC then covers the whole run.
* SEND_START always validates the receiver's PDH certificate chain against the configured
  trust anchors (real firmware skips it unless the DOMAIN or SEV policy bit is set).
* The default transport mode binds session, GPA range and a sequence number into the MAC
  (see :mod:`migd.sev_transport`); ``sev-compat`` keeps the firmware format.
* Certificates are X.509 signed by an owner CA instead of the AMD ARK/ASK/CEK/PEK chain.

Daemon code never sees a VEK: only :meth:`PspFirmware.guest_key`, which stands for the key
slot the CPU loads on ACTIVATE, hands it to the guest agent launcher.

The PSP is hardware, so its guest contexts outlive the daemon: every context that enters
RUNNING (LAUNCH_FINISH, RECEIVE_FINISH, SEND_CANCEL) is sealed to ``state_dir/psp``
(:mod:`migd.platform.psp_store`) before the command returns, and forgotten on SEND_FINISH and
DECOMMISSION. A new ``PspFirmware`` on the same state directory finds them again under the same
handles, all RUNNING: one that was mid-SEND is back as after SEND_CANCEL, one still in RECEIVE
was never stored (its partial guest is gone).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
from cryptography import x509

from migd.platform import identity
from migd.abi import PAGE_SIZE, FirmwareStatus, GuestPolicy, POLICY_API_MAJOR_SHIFT, POLICY_API_MINOR_SHIFT
from migd.errors import CertificateError, FirmwareError, GuestMemoryError, IntegrityError, MigdError, TransportError
from migd.platform.memory import GuestRam, MemoryEncryption, new_vek
from migd.platform.psp_store import ContextStore, StoredContext
from migd.sev_transport import (
    CTX_DATA,
    CTX_VMSA,
    PacketHeader,
    SessionBlob,
    SessionKeys,
    TransportMode,
    TransportReceiver,
    TransportSender,
    derive_handoff_key,
    new_session_keys,
    unwrap_session,
    wrap_session,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")

#: The SEV API version this emulated firmware reports (policy API fields are checked against it).
API_MAJOR = 0
API_MINOR = 24
BUILD_ID = 1

MAX_GUESTS = 509  # the SEV ASID space of a Rome part; RESOURCE_LIMIT past it
VMSA_SIZE = PAGE_SIZE


class ContextState(enum.Enum):
    """A firmware guest context's state (SEV API 55766, "Guest States"); not the REST guest state
    (:class:`migd.guest.host_guest.GuestState`), hence its own name."""

    LUPDATE = "LUPDATE"
    LSECRET = "LSECRET"
    RUNNING = "RUNNING"
    SUPDATE = "SUPDATE"
    RUPDATE = "RUPDATE"
    SENT = "SENT"


@dataclass(frozen=True)
class SendStart:
    """What SEND_START gives the source to pass to the destination."""

    pdh_cert_pem: bytes
    session_blob: bytes
    policy: int
    #: Set when SEND_START was given the receiver's nonce (migd's authenticated hand-off).
    handoff_key: bytes | None = field(default=None, repr=False)


@dataclass
class _GuestContext:
    handle: int
    policy: int
    vek: bytes
    state: ContextState
    engine: MemoryEncryption
    launch_digest: "hashlib._Hash" = field(default_factory=hashlib.sha256)
    sender: TransportSender | None = None
    receiver: TransportReceiver | None = None
    vmsa: dict[int, bytes] = field(default_factory=dict)
    handoff_key: bytes | None = field(default=None, repr=False)
    _scratch: dict[int, bytearray] = field(default_factory=dict, repr=False)

    def scratch(self, nbytes: int, lane: int = 0) -> memoryview:
        """A reusable work buffer for one RECEIVE run (a lane's commands run one at a time; lanes
        run in parallel, each with its own buffer)."""
        buffer = self._scratch.get(lane)
        if buffer is None or len(buffer) < nbytes:
            self._scratch[lane] = buffer = bytearray(nbytes)
        return memoryview(buffer)[:nbytes]


def _policy_api(policy: int) -> tuple[int, int]:
    return (policy >> POLICY_API_MAJOR_SHIFT) & 0xFF, (policy >> POLICY_API_MINOR_SHIFT) & 0xFF


class RunAbandoned(MigdError):
    """SEND_UPDATE_DATA was abandoned by its caller's check after the read: nothing was sealed,
    the plaintext was wiped, the connection's sequence number did not move."""


class PspFirmware:
    """One host's PSP: platform PDH identity plus guest contexts and their commands."""

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        trust_anchors: Sequence[x509.Certificate],
        *,
        transport_mode: TransportMode = TransportMode.BOUND,
    ) -> None:
        if not trust_anchors:
            raise CertificateError("the firmware needs at least one trust anchor for PDH certificates")
        self._pdh_key, pdh_cert = identity.load_pdh(state_dir)
        self.pdh_cert_pem: bytes = identity.certificate_pem(pdh_cert)
        self._anchors = list(trust_anchors)
        self.transport_mode = TransportMode(transport_mode)
        store_dir = Path(state_dir) / "psp"
        try:
            self._store = ContextStore(store_dir)
            stored, self._next_handle = self._store.load()  # SealedStoreError names a bad file
        except OSError as exc:
            message = f"cannot use the PSP store {store_dir}: {exc}"
            raise FirmwareError(FirmwareStatus.HWERROR_PLATFORM, message) from exc
        self._guests: dict[int, _GuestContext] = {
            c.handle: _GuestContext(c.handle, c.policy, c.vek, ContextState.RUNNING, MemoryEncryption(c.vek))
            for c in stored
        }
        if stored:
            log.info("PSP restored guest contexts handles=%s", ",".join(str(c.handle) for c in stored))
        self._lock = threading.Lock()

    @classmethod
    def from_state_dir(
        cls,
        state_dir: str | os.PathLike[str],
        trust_anchor_paths: Iterable[str | os.PathLike[str]],
        *,
        transport_mode: TransportMode = TransportMode.BOUND,
    ) -> PspFirmware:
        """Load the platform identity from ``state_dir`` and the trust anchors from PEM files."""
        anchors = identity.load_trust_anchors([Path(p) for p in trust_anchor_paths])
        return cls(state_dir, anchors, transport_mode=transport_mode)

    # ------------------------------------------------------------------ helpers

    def _context(self, handle: int, *allowed: ContextState) -> _GuestContext:
        ctx = self._guests.get(handle)
        if ctx is None:
            raise FirmwareError(FirmwareStatus.INVALID_GUEST, f"no guest context with handle {handle}")
        if allowed and ctx.state not in allowed:
            wanted = "/".join(s.value for s in allowed)
            raise FirmwareError(
                FirmwareStatus.INVALID_GUEST_STATE,
                f"guest {handle} is in state {ctx.state.value}, the command needs {wanted}",
            )
        return ctx

    def _new_context(self, policy: int, state: ContextState) -> _GuestContext:
        if not 0 <= policy <= 0xFFFFFFFF:
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"policy must be a u32, got {policy}")
        major, minor = _policy_api(policy)
        if (major, minor) > (API_MAJOR, API_MINOR):
            raise FirmwareError(
                FirmwareStatus.POLICY_FAILURE,
                f"policy needs firmware API >= {major}.{minor}, this firmware is {API_MAJOR}.{API_MINOR}",
            )
        with self._lock:
            if len(self._guests) >= MAX_GUESTS:
                raise FirmwareError(FirmwareStatus.RESOURCE_LIMIT, f"all {MAX_GUESTS} guest slots are in use")
            handle = self._next_handle
            # Durable before use: a handle number is never handed out twice, even across restarts.
            self._storage("record the next handle", self._store.save_next_handle, handle + 1)
            self._next_handle += 1
            vek = new_vek()
            ctx = _GuestContext(handle, policy, vek, state, MemoryEncryption(vek))
            self._guests[handle] = ctx
        return ctx

    @staticmethod
    def _storage(what: str, action: Callable[[_T], None], arg: _T) -> None:
        """Run a store write; an I/O failure is the platform's hardware error, as on a real PSP."""
        try:
            action(arg)
        except OSError as exc:
            raise FirmwareError(FirmwareStatus.HWERROR_PLATFORM, f"cannot {what}: {exc}") from exc

    def _persist_running(self, ctx: _GuestContext) -> None:
        """Seal the context before it is RUNNING: a restart then finds it (and its key) again."""
        stored = StoredContext(ctx.handle, ctx.policy, ctx.vek)
        self._storage(f"seal guest context {ctx.handle}", self._store.save, stored)

    def _forget(self, handle: int) -> None:
        # Never fails the command: a leftover file only brings the context back RUNNING after a
        # restart, where the journal's commit record decides (the daemon's recovery).
        try:
            self._store.remove(handle)
        except OSError as exc:
            log.error("PSP could not remove the sealed context handle=%d: %s", handle, exc)

    def _peer_shared_secret(self, peer_pdh_cert_pem: bytes) -> bytes:
        try:
            peer_public = identity.verify_pdh_certificate(peer_pdh_cert_pem, self._anchors)
        except CertificateError as exc:
            raise FirmwareError(FirmwareStatus.INVALID_CERTIFICATE, f"peer PDH rejected: {exc}") from exc
        return identity.ecdh_shared_secret(self._pdh_key, peer_public)

    @staticmethod
    def _checked_range(ram: GuestRam, gpa: int, npages: int) -> memoryview:
        if npages <= 0:
            raise FirmwareError(FirmwareStatus.INVALID_LEN, f"a run needs at least one page, got {npages}")
        try:
            return ram.view(gpa, npages)
        except GuestMemoryError as exc:
            raise FirmwareError(FirmwareStatus.INVALID_ADDRESS, str(exc)) from exc

    # ------------------------------------------------------------------ launch

    def launch_start(self, policy: int) -> int:
        """LAUNCH_START: a new guest context with a fresh VEK, in LUPDATE; returns its handle."""
        ctx = self._new_context(policy, ContextState.LUPDATE)
        log.debug("LAUNCH_START handle=%d policy=%#x", ctx.handle, policy)
        return ctx.handle

    def launch_update_data(self, handle: int, ram: GuestRam, gpa: int, npages: int) -> None:
        """LAUNCH_UPDATE_DATA: encrypt a run of plaintext pages in place and measure them."""
        ctx = self._context(handle, ContextState.LUPDATE)
        view = self._checked_range(ram, gpa, npages)
        ctx.launch_digest.update(gpa.to_bytes(8, "little"))
        ctx.launch_digest.update(view)
        ctx.engine.encrypt(gpa, bytes(view), out=view)

    def launch_measure(self, handle: int) -> bytes:
        """LAUNCH_MEASURE: the launch digest (32 bytes) followed by a fresh 16-byte mnonce."""
        ctx = self._context(handle, ContextState.LUPDATE)
        mnonce = os.urandom(16)
        digest = hashlib.sha256(
            bytes([0x04, API_MAJOR, API_MINOR, BUILD_ID]) + ctx.launch_digest.digest() + mnonce
        ).digest()
        ctx.state = ContextState.LSECRET
        return digest + mnonce

    def launch_finish(self, handle: int) -> None:
        """LAUNCH_FINISH: LSECRET → RUNNING."""
        ctx = self._context(handle, ContextState.LSECRET)
        self._persist_running(ctx)
        ctx.state = ContextState.RUNNING

    def launch(self, policy: int) -> int:
        """LAUNCH_START, LAUNCH_MEASURE and LAUNCH_FINISH for a guest whose RAM starts empty."""
        handle = self.launch_start(policy)
        self.launch_measure(handle)
        self.launch_finish(handle)
        return handle

    def guest_key(self, handle: int) -> bytes:
        """The guest's VEK: stands for the CPU key slot; only the agent launcher may use it."""
        return self._context(handle).vek

    def guest_policy(self, handle: int) -> int:
        """The policy the guest context was created with."""
        return self._context(handle).policy

    def context_state(self, handle: int) -> ContextState:
        """The state of a guest context."""
        return self._context(handle).state

    # ------------------------------------------------------------------ send

    def send_start(self, handle: int, peer_pdh_cert_pem: bytes, peer_nonce: bytes | None = None) -> SendStart:
        """SEND_START: check policy and the receiver's PDH chain, create the session (RUNNING → SUPDATE).

        ``peer_nonce`` (migd extension): the receiver's fresh nonce. It joins the session id the
        ``bound`` transport MACs, and with it the firmware derives the session's hand-off key
        (:func:`~migd.sev_transport.derive_handoff_key`), returned in ``SendStart.handoff_key``.
        """
        ctx = self._context(handle, ContextState.RUNNING)
        if ctx.policy & GuestPolicy.NOSEND:
            raise FirmwareError(FirmwareStatus.POLICY_FAILURE, "guest policy NOSEND forbids SEND_START")
        shared_secret = self._peer_shared_secret(peer_pdh_cert_pem)
        keys = new_session_keys()
        blob = wrap_session(shared_secret, ctx.policy, tek=keys.tek, tik=keys.tik)
        session_id, ctx.handoff_key = self._session_binding(keys, blob, peer_nonce)
        ctx.sender = TransportSender(keys, self.transport_mode, session_id=session_id)
        ctx.state = ContextState.SUPDATE
        log.debug("SEND_START handle=%d mode=%s", handle, self.transport_mode.value)
        return SendStart(self.pdh_cert_pem, blob.pack(), ctx.policy, ctx.handoff_key)

    @staticmethod
    def _session_binding(keys: SessionKeys, blob: SessionBlob, receiver_nonce: bytes | None) -> tuple[bytes, bytes | None]:
        """The bound-mode session id and the hand-off key, with the receiver's nonce when there is one."""
        if receiver_nonce is None:
            return blob.nonce, None
        try:
            key = derive_handoff_key(keys, blob.nonce, receiver_nonce)
        except TransportError as exc:
            raise FirmwareError(FirmwareStatus.INVALID_LEN, str(exc)) from exc
        return blob.nonce + bytes(receiver_nonce), key

    def handoff_key(self, handle: int) -> bytes:
        """The hand-off key of the guest's current session (migd extension; see ``send_start``)."""
        ctx = self._context(handle, ContextState.SUPDATE, ContextState.SENT, ContextState.RUPDATE, ContextState.RUNNING)
        if ctx.handoff_key is None:
            raise FirmwareError(FirmwareStatus.INVALID_GUEST, f"guest {handle} has no session with a hand-off key")
        return ctx.handoff_key

    def transport_sequence(self, handle: int) -> int:
        """Packets sealed (SUPDATE) or accepted (RUPDATE) so far in the guest's transport session."""
        ctx = self._context(handle, ContextState.SUPDATE, ContextState.RUPDATE)
        end = ctx.sender if ctx.state is ContextState.SUPDATE else ctx.receiver
        assert end is not None
        return end.next_sequence

    def send_update_data(
        self,
        handle: int,
        ram: GuestRam,
        gpa: int,
        npages: int,
        out: bytearray | memoryview | None = None,
        lane: int = 0,
        still_valid: Callable[[], bool] | None = None,
    ) -> tuple[bytes, memoryview]:
        """SEND_UPDATE_DATA over a run: VEK → plaintext → TEK. Returns (52-byte header, ciphertext).

        The ciphertext is a view of ``out`` (at least ``npages`` pages, disjoint from guest RAM)
        when given, else of a new buffer. ``lane`` (migd extension): the connection the packet
        goes on, its own sequence space (:mod:`migd.sev_transport`). ``still_valid`` (migd
        extension, for a send pipeline that reads runs in worker threads): asked once the run is
        read; False abandons the command (:class:`RunAbandoned`) before anything is sealed.
        Thread-safe: runs of different lanes may be sent at once.
        """
        ctx = self._context(handle, ContextState.SUPDATE)
        raw = self._checked_range(ram, gpa, npages)
        # Read once: a SEND_CANCEL on another thread sets ctx.sender to None meanwhile.
        sender = ctx.sender
        assert sender is not None
        if out is not None and ram.holds(out):
            # SEND never writes guest memory: decrypting into it would leave plaintext behind.
            raise FirmwareError(FirmwareStatus.INVALID_ADDRESS, "SEND_UPDATE_DATA output overlaps guest memory")
        # Decrypted into ``out`` (or a new buffer), then CTR in place: one buffer per run, not two.
        plaintext = ctx.engine.decrypt(gpa, raw, out)
        try:
            if still_valid is not None and not still_valid():
                raise RunAbandoned(f"SEND_UPDATE_DATA at gpa {gpa:#x} ({npages} pages) abandoned after the read")
            header, ciphertext = sender.seal(CTX_DATA, plaintext, gpa=gpa, npages=npages, out=plaintext, lane=lane)
        except BaseException:
            np.frombuffer(plaintext, dtype=np.uint8)[:] = 0  # no plaintext left behind in the caller's buffer
            raise
        return header.pack(), ciphertext

    def send_update_vmsa(self, handle: int, vcpu_id: int, vmsa: bytes) -> tuple[bytes, memoryview]:
        """SEND_UPDATE_VMSA: one vCPU's 4 KiB save area through the transport (SEV-ES guests only)."""
        ctx = self._context(handle, ContextState.SUPDATE)
        if not ctx.policy & GuestPolicy.ES:
            raise FirmwareError(FirmwareStatus.INVALID_GUEST, "SEND_UPDATE_VMSA needs an SEV-ES (ES policy) guest")
        self._check_vmsa(vcpu_id, len(vmsa))
        assert ctx.sender is not None
        header, ciphertext = ctx.sender.seal(CTX_VMSA, vmsa, gpa=vcpu_id * VMSA_SIZE, npages=1)
        return header.pack(), ciphertext

    def send_finish(self, handle: int) -> None:
        """SEND_FINISH: SUPDATE → SENT; the guest may no longer run here."""
        ctx = self._context(handle, ContextState.SUPDATE)
        self._forget(handle)
        ctx.sender = None
        ctx.state = ContextState.SENT

    def send_cancel(self, handle: int) -> None:
        """SEND_CANCEL: abandon the outgoing session; the guest runs on (→ RUNNING)."""
        ctx = self._context(handle, ContextState.SUPDATE, ContextState.SENT)
        if ctx.state is ContextState.SENT:  # SEND_FINISH forgot it; SUPDATE is still stored as RUNNING
            self._persist_running(ctx)
        ctx.sender = None
        ctx.state = ContextState.RUNNING

    # ------------------------------------------------------------------ receive

    def receive_start(self, policy: int, peer_pdh_cert_pem: bytes, session_blob: bytes,
                      own_nonce: bytes | None = None, *, ordered: bool = True) -> int:
        """RECEIVE_START: check the sender's PDH chain, unwrap the session, new context in RUPDATE.

        ``own_nonce``: the nonce this receiver sent (migd extension, see ``send_start``); the
        hand-off key is then available from :meth:`handoff_key`. ``ordered=False`` (migd
        extension): packets come from a saved file, each with its sequence number
        (:class:`~migd.sev_transport.TransportReceiver`).
        """
        shared_secret = self._peer_shared_secret(peer_pdh_cert_pem)
        try:
            blob = SessionBlob.unpack(session_blob)
            keys = unwrap_session(shared_secret, blob, policy)
        except IntegrityError as exc:
            raise FirmwareError(FirmwareStatus.BAD_MEASUREMENT, f"session blob rejected: {exc}") from exc
        except TransportError as exc:
            raise FirmwareError(FirmwareStatus.INVALID_LEN, f"session blob rejected: {exc}") from exc
        session_id, handoff_key = self._session_binding(keys, blob, own_nonce)
        ctx = self._new_context(policy, ContextState.RUPDATE)
        ctx.handoff_key = handoff_key
        ctx.receiver = TransportReceiver(keys, self.transport_mode, session_id=session_id, ordered=ordered)
        log.debug("RECEIVE_START handle=%d mode=%s", ctx.handle, self.transport_mode.value)
        return ctx.handle

    def receive_update_data(
        self,
        handle: int,
        ram: GuestRam,
        gpa: int,
        npages: int,
        header: bytes | memoryview,
        ciphertext: bytes | memoryview,
        sequence: int | None = None,
        lane: int = 0,
    ) -> None:
        """RECEIVE_UPDATE_DATA over a run: verify, TEK → plaintext → this guest's VEK at ``gpa``.

        The MAC is checked before anything is decrypted, so a rejected packet writes nothing.
        ``sequence``: the packet's sequence number (a session started with ``ordered=False``).
        ``lane``: the connection it came on; lanes may be received in parallel threads.
        """
        ctx = self._context(handle, ContextState.RUPDATE)
        self._checked_range(ram, gpa, npages)
        if len(ciphertext) != npages * PAGE_SIZE:
            raise FirmwareError(
                FirmwareStatus.INVALID_LEN,
                f"packet for {npages} pages must carry {npages * PAGE_SIZE} bytes, got {len(ciphertext)}",
            )
        assert ctx.receiver is not None
        try:
            packet = PacketHeader.unpack(header)
            # The MAC is verified before anything is written. The run is decrypted and
            # re-encrypted in a per-context scratch buffer, then stored with one write
            # (GuestRam.write: pwrite, no page fault per page of the new guest).
            scratch = ctx.scratch(len(ciphertext), lane)
            plaintext = ctx.receiver.open(CTX_DATA, packet, ciphertext, gpa=gpa, npages=npages, out=scratch,
                                          sequence=sequence, lane=lane)
        except IntegrityError as exc:
            raise FirmwareError(FirmwareStatus.BAD_MEASUREMENT, f"packet at gpa {gpa:#x}: {exc}") from exc
        except TransportError as exc:
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"packet at gpa {gpa:#x}: {exc}") from exc
        ram.write(gpa, ctx.engine.encrypt(gpa, plaintext, out=plaintext))

    def receive_update_vmsa(
        self, handle: int, vcpu_id: int, header: bytes | memoryview, ciphertext: bytes | memoryview,
        sequence: int | None = None,
    ) -> None:
        """RECEIVE_UPDATE_VMSA: verify and install one vCPU's save area (SEV-ES guests only)."""
        ctx = self._context(handle, ContextState.RUPDATE)
        if not ctx.policy & GuestPolicy.ES:
            raise FirmwareError(FirmwareStatus.INVALID_GUEST, "RECEIVE_UPDATE_VMSA needs an SEV-ES guest")
        self._check_vmsa(vcpu_id, len(ciphertext))
        assert ctx.receiver is not None
        try:
            packet = PacketHeader.unpack(header)
            plaintext = ctx.receiver.open(CTX_VMSA, packet, ciphertext, gpa=vcpu_id * VMSA_SIZE, npages=1,
                                          sequence=sequence)
        except IntegrityError as exc:
            raise FirmwareError(FirmwareStatus.BAD_MEASUREMENT, f"VMSA of vCPU {vcpu_id}: {exc}") from exc
        except TransportError as exc:
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"VMSA of vCPU {vcpu_id}: {exc}") from exc
        ctx.vmsa[vcpu_id] = bytes(plaintext)

    def receive_finish(self, handle: int) -> None:
        """RECEIVE_FINISH: RUPDATE → RUNNING; the guest may now run here."""
        ctx = self._context(handle, ContextState.RUPDATE)
        self._persist_running(ctx)
        ctx.receiver = None
        ctx._scratch.clear()  # a work buffer per connection: not for the guest's whole life
        ctx.state = ContextState.RUNNING

    def guest_vmsa(self, handle: int, vcpu_id: int = 0) -> bytes | None:
        """The VMSA received for a vCPU (SEV-ES), as the CPU would load it; None if none came."""
        return self._context(handle).vmsa.get(vcpu_id)

    @staticmethod
    def _check_vmsa(vcpu_id: int, length: int) -> None:
        if not 0 <= vcpu_id < 256:
            raise FirmwareError(FirmwareStatus.INVALID_PARAM, f"vCPU id must be 0..255, got {vcpu_id}")
        if length != VMSA_SIZE:
            raise FirmwareError(FirmwareStatus.INVALID_LEN, f"a VMSA is {VMSA_SIZE} bytes, got {length}")

    # ------------------------------------------------------------------ debug and teardown

    def dbg_decrypt(self, handle: int, ram: GuestRam, gpa: int, npages: int) -> bytes:
        """DBG_DECRYPT: the plaintext of a run of private pages; refused under the NODBG policy."""
        ctx = self._context(
            handle, ContextState.LUPDATE, ContextState.LSECRET, ContextState.RUNNING, ContextState.SUPDATE,
            ContextState.RUPDATE,
        )
        if ctx.policy & GuestPolicy.NODBG:
            raise FirmwareError(FirmwareStatus.POLICY_FAILURE, "guest policy NODBG forbids DBG_DECRYPT")
        raw = self._checked_range(ram, gpa, npages)
        return bytes(ctx.engine.decrypt(gpa, raw))

    def decommission(self, handle: int) -> None:
        """DECOMMISSION: forget the guest context and its key."""
        with self._lock:
            ctx = self._guests.pop(handle, None)
            if ctx is None:
                raise FirmwareError(FirmwareStatus.INVALID_GUEST, f"no guest context with handle {handle}")
            ctx._scratch.clear()
            self._forget(handle)

    def guest_handles(self) -> list[int]:
        """Handles of every live guest context."""
        return sorted(self._guests)
