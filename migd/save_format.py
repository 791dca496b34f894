"""The confidential save file: layout, header, page table and trailer (docs/save-restore.md).

Like QEMU's mapped-ram, every page has a fixed place, so a live save's later rounds overwrite
pages in place and the file never grows past the guest's size plus metadata::

    0            HEADER_REGION   data_off + npages*4096     table_off + npages*80 (page aligned)
    | header      | page slots    | page table               | tail: bitmap, vCPU, trailer MAC |

* **header** (:class:`SaveHeader`): magic, format version, guest definition, the SEV session
  (the saving host's PDH certificate, the SEND_START session blob, the file nonce that joins
  the session id) and the SHA-256 fingerprint of the PDH the file is for.
* **page slots**: page ``i`` at ``data_off + i*4096``: a private page's SEV transport ciphertext,
  a shared page's plaintext, nothing (a hole) for a zero or never-populated page.
* **page table**: one 80-byte :data:`ENTRY` per page: the kind, and for the first page of a run
  its length, sequence number and authenticator (the SEV packet header of a private run; an
  HMAC under the hand-off key of a shared one); the other pages of a run say how far back
  their run starts. Runs are at most :data:`FILE_RUN_PAGES` long.
* **tail** (:class:`SaveTail`): the final shared-page bitmap, the vCPU state (a VMSA transport
  packet for SEV-ES), counts, the final transport sequence, the digests of the header and
  the page table, then the trailer MAC over all of it under the session's hand-off key. The
  MAC is written last, only after the saving host's journal committed the save: a file
  without it (a save that failed or was interrupted) is refused by every restore.

Everything here is pure: bytes in, values out, every field of a file checked before use.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from migd.abi import PAGE_SIZE
from migd.errors import MigdError
from migd.platform.pki_verify import MAX_PDH_CERT_PEM
from migd.sev_transport import MAC_SIZE, PACKET_HEADER_SIZE, SESSION_BLOB_SIZE

MAGIC = b"MIGDSAVE"
TAIL_MAGIC = b"MIGDTAIL"
FORMAT_VERSION = 1
#: Room for the header (its PDH certificate is at most MAX_PDH_CERT_PEM); the page slots follow.
HEADER_REGION = 64 * 1024
#: The longest run one table entry covers: a page dirtied again later re-writes at most its run.
FILE_RUN_PAGES = 32
#: The largest guest a file may describe (as the migration protocol's limit: 1 TiB).
MAX_NPAGES = 1 << 28
FILE_NONCE_SIZE = 32
#: The file nonce's last byte: a one-pass save (every packet sealed in table order, opened in
#: order) or a live one (pages overwritten in place, opened by their sequence numbers).
NONCE_ONE_PASS = 0
NONCE_LIVE = 1
_PREFIX = struct.Struct("<8sII")  # magic, version (header) or body length (tail), length
_TAIL_PREFIX = struct.Struct("<8sI")
TAIL_PREFIX_SIZE = _TAIL_PREFIX.size
_SHARED_BINDING = struct.Struct("<QIQ")  # gpa, npages, sequence
_SHARED_LABEL = b"migd-save-shared-v1\x00"
_TAIL_LABEL = b"migd-save-trailer-v1\x00"
_MAX_NAME = 64


class SaveFileError(MigdError):
    """A save file that is malformed, tampered, truncated, spliced or not for this host (REST 409)."""


class EntryKind(enum.IntEnum):
    """What a page-table entry says about its page."""

    ZERO = 0  # a hole: zero, or never populated (a sparse table reads as all ZERO)
    PRIVATE = 1  # first page of a private run: npages, transport sequence, SEV packet header
    PRIVATE_CONT = 2  # a later page of a private run: npages = distance back to its first page
    SHARED = 3  # first page of a shared run: npages, write sequence, HMAC in auth[:32]
    SHARED_CONT = 4


#: One page-table entry (80 bytes, little-endian).
ENTRY = np.dtype([("kind", "u1"), ("pad", "u1", (3,)), ("npages", "<u4"), ("seq", "<u8"),
                  ("auth", "u1", (PACKET_HEADER_SIZE,)), ("pad2", "u1", (12,))])
ENTRY_SIZE = ENTRY.itemsize
assert ENTRY_SIZE == 80


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


@dataclass(frozen=True)
class Layout:
    """Where everything of a file for a guest of ``npages`` pages lives."""

    npages: int

    def __post_init__(self) -> None:
        if not 1 <= self.npages <= MAX_NPAGES:
            raise SaveFileError(f"a saved guest has 1..{MAX_NPAGES} pages, the file says {self.npages}")

    @property
    def data_off(self) -> int:
        return HEADER_REGION

    @property
    def table_off(self) -> int:
        return self.data_off + self.npages * PAGE_SIZE

    @property
    def tail_off(self) -> int:
        return _round_up(self.table_off + self.npages * ENTRY_SIZE, PAGE_SIZE)

    def page_offset(self, page: int) -> int:
        return self.data_off + page * PAGE_SIZE

    def entry_offset(self, page: int) -> int:
        return self.table_off + page * ENTRY_SIZE

    @property
    def max_tail(self) -> int:
        """The largest tail a file may have: bitmap (at worst raw, plus codec framing), vCPU state, fields."""
        return 64 * 1024 + (self.npages + 7) // 8 + 2 * PAGE_SIZE


def pdh_fingerprint(pdh_cert_pem: bytes) -> bytes:
    """SHA-256 over the PDH certificate's DER: names the one host that can open a file."""
    try:
        cert = x509.load_pem_x509_certificate(pdh_cert_pem)
    except ValueError as exc:
        raise SaveFileError(f"not a PEM certificate: {exc}") from None
    return cert.fingerprint(hashes.SHA256())


def _field(data: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise SaveFileError(f"{what}: field {key!r} is missing or of the wrong type")
    return value


def _bytes_field(data: dict[str, Any], key: str, size: int | None, what: str, *, max_size: int = 0) -> bytes:
    value = _field(data, key, bytes, what)
    if size is not None and len(value) != size:
        raise SaveFileError(f"{what}: field {key!r} must be {size} bytes, got {len(value)}")
    if max_size and len(value) > max_size:
        raise SaveFileError(f"{what}: field {key!r} is longer than {max_size} bytes")
    return bytes(value)


@dataclass(frozen=True)
class SaveHeader:
    """The file's header: what the guest is, and the session its pages are sealed in."""

    save_id: str
    name: str
    memory_mib: int
    policy: int
    efi: bool
    uefi_live_migration: bool | None
    transport_mode: str
    source_pdh: bytes
    session_blob: bytes
    file_nonce: bytes
    target_pdh_sha256: bytes
    npages: int

    def pack(self) -> bytes:
        """The header region's bytes (magic, version, length, msgpack body), at most HEADER_REGION."""
        body = msgpack.packb({
            "save_id": self.save_id, "name": self.name, "memory_mib": self.memory_mib, "policy": self.policy,
            "efi": self.efi, "uefi_live_migration": self.uefi_live_migration,
            "transport_mode": self.transport_mode, "source_pdh": self.source_pdh,
            "session_blob": self.session_blob, "file_nonce": self.file_nonce,
            "target_pdh_sha256": self.target_pdh_sha256, "npages": self.npages,
        }, use_bin_type=True)
        packed = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(body)) + body
        if len(packed) > HEADER_REGION:
            raise SaveFileError(f"header of {len(packed)} bytes does not fit the {HEADER_REGION}-byte region")
        return packed

    @classmethod
    def unpack(cls, region: bytes) -> SaveHeader:
        """Parse the header region of an untrusted file (SaveFileError names what is wrong)."""
        if len(region) < _PREFIX.size:
            raise SaveFileError("not a migd save file: shorter than its header")
        magic, version, length = _PREFIX.unpack_from(region)
        if magic != MAGIC:
            raise SaveFileError("not a migd save file (bad magic)")
        if version != FORMAT_VERSION:
            raise SaveFileError(f"save file format {version} is not supported (this migd reads {FORMAT_VERSION})")
        if not 0 < length <= HEADER_REGION - _PREFIX.size or _PREFIX.size + length > len(region):
            raise SaveFileError(f"save file header length {length} is out of range")
        try:
            data = msgpack.unpackb(region[_PREFIX.size:_PREFIX.size + length], raw=False, strict_map_key=True,
                                   max_bin_len=MAX_PDH_CERT_PEM, max_str_len=1024, max_array_len=0, max_map_len=32)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise SaveFileError(f"save file header is not valid msgpack: {exc}") from None
        if not isinstance(data, dict):
            raise SaveFileError("save file header is not a map")
        what = "save file header"
        name = _field(data, "name", str, what)
        if not 1 <= len(name) <= _MAX_NAME:
            raise SaveFileError(f"{what}: guest name must be 1..{_MAX_NAME} characters")
        uefi = data.get("uefi_live_migration")
        if uefi is not None and not isinstance(uefi, bool):
            raise SaveFileError(f"{what}: field 'uefi_live_migration' must be a boolean or null")
        header = cls(
            save_id=_field(data, "save_id", str, what), name=name,
            memory_mib=_field(data, "memory_mib", int, what), policy=_field(data, "policy", int, what),
            efi=_field(data, "efi", bool, what), uefi_live_migration=uefi,
            transport_mode=_field(data, "transport_mode", str, what),
            source_pdh=_bytes_field(data, "source_pdh", None, what, max_size=MAX_PDH_CERT_PEM),
            session_blob=_bytes_field(data, "session_blob", SESSION_BLOB_SIZE, what),
            file_nonce=_bytes_field(data, "file_nonce", FILE_NONCE_SIZE, what),
            target_pdh_sha256=_bytes_field(data, "target_pdh_sha256", 32, what),
            npages=_field(data, "npages", int, what),
        )
        if header.file_nonce[-1] not in (NONCE_ONE_PASS, NONCE_LIVE):
            raise SaveFileError(f"{what}: the file nonce names no known kind of save")
        if not 1 <= len(header.save_id) <= 64:
            raise SaveFileError(f"{what}: save id must be 1..64 characters")
        if not 0 <= header.policy <= 0xFFFFFFFF:
            raise SaveFileError(f"{what}: policy {header.policy} is not a u32")
        Layout(header.npages)  # the page-count range
        if header.memory_mib * 256 != header.npages:
            raise SaveFileError(f"{what}: {header.memory_mib} MiB is not {header.npages} pages")
        return header

    @property
    def one_pass(self) -> bool:
        """Every packet sealed in table order (not live): a restore opens them in order, as a stream."""
        return self.file_nonce[-1] == NONCE_ONE_PASS

    def digest(self) -> bytes:
        """What the trailer binds of the header: SHA-256 of its packed bytes."""
        return hashlib.sha256(self.pack()).digest()


@dataclass(frozen=True)
class SaveTail:
    """The end of a save: the final bitmap and vCPU state, counts, and the digests the trailer MAC binds."""

    bitmap: bytes
    vcpu_header: bytes | None
    vcpu_payload: bytes
    vcpu_seq: int | None
    pages: dict[str, int]
    runs: int
    final_sequence: int
    header_sha256: bytes
    table_sha256: bytes

    def body(self) -> bytes:
        """The msgpack body the trailer MAC covers."""
        return msgpack.packb({
            "bitmap": self.bitmap, "vcpu_header": self.vcpu_header, "vcpu_payload": self.vcpu_payload,
            "vcpu_seq": self.vcpu_seq, "pages": self.pages, "runs": self.runs,
            "final_sequence": self.final_sequence, "header_sha256": self.header_sha256,
            "table_sha256": self.table_sha256,
        }, use_bin_type=True)

    def pack_unsealed(self) -> bytes:
        """Prefix and body, without the trailer MAC (what a save writes before its commit)."""
        body = self.body()
        return _TAIL_PREFIX.pack(TAIL_MAGIC, len(body)) + body

    @classmethod
    def unpack(cls, data: bytes, layout: Layout) -> tuple[SaveTail, bytes, bytes]:
        """Parse the whole tail (``data`` runs to the end of the file): (tail, body, MAC)."""
        if len(data) < _TAIL_PREFIX.size + MAC_SIZE:
            raise SaveFileError("save file is truncated: its tail is missing")
        magic, length = _TAIL_PREFIX.unpack_from(data)
        if magic != TAIL_MAGIC:
            raise SaveFileError("save file tail has a bad magic (truncated, or not a migd save file)")
        if len(data) != _TAIL_PREFIX.size + length + MAC_SIZE:
            raise SaveFileError(f"save file is truncated or has trailing bytes: the tail says {length} bytes of "
                                f"body and a {MAC_SIZE}-byte MAC, {len(data) - _TAIL_PREFIX.size} follow")
        body = data[_TAIL_PREFIX.size:_TAIL_PREFIX.size + length]
        mac = data[_TAIL_PREFIX.size + length:]
        try:
            fields = msgpack.unpackb(body, raw=False, strict_map_key=True, max_bin_len=layout.max_tail,
                                     max_str_len=64, max_array_len=0, max_map_len=16)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise SaveFileError(f"save file tail is not valid msgpack: {exc}") from None
        if not isinstance(fields, dict):
            raise SaveFileError("save file tail is not a map")
        what = "save file tail"
        pages = _field(fields, "pages", dict, what)
        if set(pages) != {"private", "shared", "zero"} or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pages.values()):
            raise SaveFileError(f"{what}: page counts are malformed")
        vcpu_header = fields.get("vcpu_header")
        if vcpu_header is not None and (not isinstance(vcpu_header, bytes) or len(vcpu_header) != PACKET_HEADER_SIZE):
            raise SaveFileError(f"{what}: the vCPU packet header is malformed")
        vcpu_seq = fields.get("vcpu_seq")
        if vcpu_seq is not None and (not isinstance(vcpu_seq, int) or isinstance(vcpu_seq, bool) or vcpu_seq < 0):
            raise SaveFileError(f"{what}: the vCPU packet sequence is malformed")
        tail = cls(
            bitmap=_bytes_field(fields, "bitmap", None, what), vcpu_header=vcpu_header,
            vcpu_payload=_bytes_field(fields, "vcpu_payload", None, what, max_size=PAGE_SIZE * 2),
            vcpu_seq=vcpu_seq, pages=dict(pages), runs=_field(fields, "runs", int, what),
            final_sequence=_field(fields, "final_sequence", int, what),
            header_sha256=_bytes_field(fields, "header_sha256", 32, what),
            table_sha256=_bytes_field(fields, "table_sha256", 32, what),
        )
        return tail, bytes(body), bytes(mac)


def tail_body_length(prefix: bytes) -> int:
    """The body length a tail's prefix announces (SaveFileError if it is not a tail)."""
    if len(prefix) != _TAIL_PREFIX.size:
        raise SaveFileError("save file is truncated: its tail is missing")
    magic, length = _TAIL_PREFIX.unpack(prefix)
    if magic != TAIL_MAGIC:
        raise SaveFileError("save file tail has a bad magic (truncated, or not a migd save file)")
    return int(length)


def tail_mac(key: bytes, body: bytes) -> bytes:
    """The trailer MAC: HMAC-SHA256 under the session's hand-off key over the tail's body."""
    return hmac.new(key, _TAIL_LABEL + body, "sha256").digest()


def shared_mac(key: bytes, gpa: int, npages: int, sequence: int, data: bytes | memoryview) -> bytes:
    """The authenticator of a shared run: its place, its write sequence and its bytes, under the hand-off key.

    Shared pages are plaintext by design (the guest shares them with the host), but a restore
    must still not take them from another place, another save or an older round.
    """
    mac = hmac.new(key, _SHARED_LABEL + _SHARED_BINDING.pack(gpa, npages, sequence), "sha256")
    mac.update(data)
    return mac.digest()


def run_entries(kind: EntryKind, npages: int, sequence: int, auth: bytes) -> np.ndarray:
    """The table entries of one run: its first page, then continuation pages pointing back to it."""
    entries = np.zeros(npages, dtype=ENTRY)
    entries["kind"][0] = kind
    entries["npages"][0] = npages
    entries["seq"][0] = sequence
    entries["auth"][0, :len(auth)] = np.frombuffer(auth, dtype=np.uint8)
    if npages > 1:
        entries["kind"][1:] = EntryKind.PRIVATE_CONT if kind is EntryKind.PRIVATE else EntryKind.SHARED_CONT
        entries["npages"][1:] = np.arange(1, npages, dtype=np.uint32)
    return entries


@dataclass(frozen=True)
class TableRun:
    """One run the page table describes (private or shared), as a restore places it."""

    kind: EntryKind
    first: int
    npages: int
    seq: int
    auth: bytes


def table_runs(entries: np.ndarray, first_page: int, carry: TableRun | None) -> tuple[list[TableRun], TableRun | None]:
    """The runs that start in a slice of the table, checked for consistency.

    ``carry``: a run whose first page was in an earlier slice and which continues into this one.
    Returns (runs complete or begun here, the run still open at the slice's end). Every
    continuation entry must point back exactly to its run's first page, and every run must
    have exactly as many pages as its first entry says: anything else is a malformed table.
    """
    kinds = entries["kind"]
    if np.any(kinds > EntryKind.SHARED_CONT):
        raise SaveFileError(f"page table: unknown entry kind near page {first_page}")
    runs: list[TableRun] = []
    pos = 0
    n = len(entries)
    if carry is not None:
        left = carry.first + carry.npages - first_page
        take = min(left, n)
        _check_continuation(entries[:take], carry, first_page)
        pos = take
        if take < left:
            return runs, carry
        carry = None
    heads = np.flatnonzero((kinds[pos:] == EntryKind.PRIVATE) | (kinds[pos:] == EntryKind.SHARED)) + pos
    zero_or_head = (kinds == EntryKind.ZERO) | (kinds == EntryKind.PRIVATE) | (kinds == EntryKind.SHARED)
    expected_end = pos
    for head in heads.tolist():
        if head < expected_end:
            raise SaveFileError(f"page table: a run starts at page {first_page + head} inside another run")
        if not zero_or_head[expected_end:head].all():
            raise SaveFileError(f"page table: a continuation entry without its run near page {first_page + expected_end}")
        entry = entries[head]
        count = int(entry["npages"])
        if not 1 <= count <= FILE_RUN_PAGES:
            raise SaveFileError(f"page table: run at page {first_page + head} has {count} pages "
                                f"(1..{FILE_RUN_PAGES})")
        run = TableRun(EntryKind(int(entry["kind"])), first_page + head, count, int(entry["seq"]),
                       bytes(entry["auth"]))
        runs.append(run)
        take = min(count, n - head)
        _check_continuation(entries[head + 1:head + take], run, first_page + head + 1)
        expected_end = head + take
        if take < count:
            return runs, run
    if not zero_or_head[expected_end:].all():
        raise SaveFileError(f"page table: a continuation entry without its run near page {first_page + expected_end}")
    return runs, None


def _check_continuation(entries: np.ndarray, run: TableRun, first_page: int) -> None:
    if not len(entries):
        return
    cont = EntryKind.PRIVATE_CONT if run.kind is EntryKind.PRIVATE else EntryKind.SHARED_CONT
    back = np.arange(first_page - run.first, first_page - run.first + len(entries), dtype=np.uint32)
    if np.any(entries["kind"] != cont) or np.any(entries["npages"] != back):
        raise SaveFileError(f"page table: the run at page {run.first} ({run.npages} pages) is broken")
