"""Tests for migd.save_format: header and tail parsing, the page table's consistency, the layout,
the MACs a file is sealed with, and the unordered transport receiver a restore opens packets with.

Pure and fast: no daemon, no guest. Every refusal has a positive control next to it (the same
bytes without the one fault parse), so a check that stopped refusing would fail here.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest

from migd.abi import PAGE_SIZE
from migd.errors import IntegrityError, TransportError
from migd.platform import identity
from migd.platform.pki_verify import MAX_PDH_CERT_PEM
from migd.save_format import (
    ENTRY, ENTRY_SIZE, FILE_NONCE_SIZE, FILE_RUN_PAGES, FORMAT_VERSION, HEADER_REGION, MAGIC, MAX_NPAGES,
    TAIL_MAGIC, TAIL_PREFIX_SIZE, EntryKind, Layout, SaveFileError, SaveHeader, SaveTail, TableRun, pdh_fingerprint,
    run_entries, shared_mac, table_runs, tail_body_length, tail_mac,
)
from migd.sev_transport import (
    CTX_DATA, MAC_SIZE, PACKET_HEADER_SIZE, SESSION_BLOB_SIZE, TransportMode, TransportReceiver, TransportSender,
    new_session_keys,
)

NPAGES = 4096  # a 16 MiB guest
PREFIX = struct.Struct("<8sII")  # magic, version, body length: the header's prefix as the format defines it


# ---------------------------------------------------------------------- header


def header_fields(**changes: Any) -> dict[str, Any]:
    """The msgpack body of a valid header, with ``changes``."""
    fields: dict[str, Any] = {
        "save_id": "0123456789abcdef", "name": "g1", "memory_mib": 16, "policy": 0x1, "efi": False,
        "uefi_live_migration": None, "transport_mode": "bound", "source_pdh": b"-----BEGIN CERTIFICATE-----\n",
        "session_blob": bytes(range(SESSION_BLOB_SIZE)), "file_nonce": b"\x11" * (FILE_NONCE_SIZE - 1) + b"\x01",
        "target_pdh_sha256": b"\x22" * 32, "npages": NPAGES,
    }
    fields.update(changes)
    return fields


def header_region(fields: dict[str, Any], *, magic: bytes = MAGIC, version: int = FORMAT_VERSION,
                  length: int | None = None, pad: int = 64) -> bytes:
    """A header region as a file holds it: prefix, body, then zero padding (the region is sparse)."""
    body = msgpack.packb(fields, use_bin_type=True)
    return PREFIX.pack(magic, version, len(body) if length is None else length) + body + bytes(pad)


def valid_header() -> SaveHeader:
    return SaveHeader.unpack(header_region(header_fields()))


def test_header_round_trips_through_pack_and_unpack() -> None:
    header = valid_header()
    assert header.name == "g1" and header.npages == NPAGES and header.uefi_live_migration is None
    packed = header.pack()
    assert packed.startswith(MAGIC) and len(packed) <= HEADER_REGION
    assert SaveHeader.unpack(packed + bytes(100)) == header  # the zero padding after the body is ignored
    other = SaveHeader(**{**header.__dict__, "uefi_live_migration": True, "efi": True, "policy": 0xFFFFFFFF})
    assert SaveHeader.unpack(other.pack()) == other


def test_header_digest_covers_every_field() -> None:
    header = valid_header()
    base = header.digest()
    assert header.digest() == base  # deterministic
    for key, value in (("save_id", "x"), ("name", "g2"), ("policy", 0x5), ("efi", True),
                       ("uefi_live_migration", False), ("transport_mode", "sev-compat"), ("source_pdh", b"x"),
                       ("session_blob", bytes(SESSION_BLOB_SIZE)), ("file_nonce", bytes(FILE_NONCE_SIZE)),
                       ("target_pdh_sha256", bytes(32))):
        assert SaveHeader(**{**header.__dict__, key: value}).digest() != base, key
    bigger = SaveHeader(**{**header.__dict__, "memory_mib": 32, "npages": 2 * NPAGES})
    assert bigger.digest() != base


@pytest.mark.parametrize(("region", "match"), [
    (b"", "shorter than its header"),
    (MAGIC + b"\x01\x00", "shorter than its header"),
    (header_region(header_fields(), magic=b"MIGDSAVF"), "bad magic"),
    (header_region(header_fields(), magic=b"\x00" * 8), "bad magic"),
    (header_region(header_fields(), version=FORMAT_VERSION + 1), "format 2 is not supported"),
    (header_region(header_fields(), version=0), "format 0 is not supported"),
    (header_region(header_fields(), length=0), "length 0 is out of range"),
    (header_region(header_fields(), length=HEADER_REGION), "out of range"),
    (header_region(header_fields(), length=10_000, pad=0), "out of range"),  # past the bytes there are
], ids=["empty", "short", "magic", "zero-magic", "newer-version", "version-0", "length-0", "length-region",
        "length-past-end"])
def test_header_prefix_refusals(region: bytes, match: str) -> None:
    with pytest.raises(SaveFileError, match=match):
        SaveHeader.unpack(region)


def test_header_prefix_refusals_positive_control() -> None:
    # The same builder with the right magic, version and length parses, with or without padding.
    assert SaveHeader.unpack(header_region(header_fields(), pad=0)).name == "g1"
    assert SaveHeader.unpack(header_region(header_fields())).name == "g1"


@pytest.mark.parametrize(("changes", "match"), [
    ({"name": 7}, "'name' is missing or of the wrong type"),
    ({"name": b"g1"}, "'name' is missing or of the wrong type"),
    ({"save_id": 1}, "'save_id' is missing or of the wrong type"),
    ({"memory_mib": "16"}, "'memory_mib' is missing or of the wrong type"),
    ({"memory_mib": True}, "'memory_mib' is missing or of the wrong type"),
    ({"policy": 1.0}, "'policy' is missing or of the wrong type"),
    ({"policy": False}, "'policy' is missing or of the wrong type"),
    ({"efi": 0}, "'efi' is missing or of the wrong type"),
    ({"uefi_live_migration": 1}, "'uefi_live_migration' must be a boolean or null"),
    ({"transport_mode": None}, "'transport_mode' is missing or of the wrong type"),
    ({"source_pdh": "pem"}, "'source_pdh' is missing or of the wrong type"),
    ({"session_blob": "x" * SESSION_BLOB_SIZE}, "'session_blob' is missing or of the wrong type"),
    ({"npages": str(NPAGES)}, "'npages' is missing or of the wrong type"),
], ids=lambda v: str(v)[:40])
def test_header_fields_of_the_wrong_type_are_refused(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(SaveFileError, match=match):
        SaveHeader.unpack(header_region(header_fields(**changes)))


@pytest.mark.parametrize("key", ["save_id", "name", "memory_mib", "policy", "efi", "transport_mode", "source_pdh",
                                 "session_blob", "file_nonce", "target_pdh_sha256", "npages"])
def test_header_missing_field_is_refused(key: str) -> None:
    fields = header_fields()
    del fields[key]
    with pytest.raises(SaveFileError, match=f"'{key}' is missing"):
        SaveHeader.unpack(header_region(fields))


@pytest.mark.parametrize(("changes", "match"), [
    ({"memory_mib": 32}, "32 MiB is not 4096 pages"),
    ({"npages": NPAGES + 1}, "16 MiB is not 4097 pages"),
    ({"npages": 0, "memory_mib": 0}, "1..268435456 pages"),
    ({"npages": MAX_NPAGES + 256, "memory_mib": MAX_NPAGES // 256 + 1}, "1..268435456 pages"),
    ({"npages": -256, "memory_mib": -1}, "1..268435456 pages"),
    ({"name": ""}, "guest name must be 1..64"),
    ({"name": "g" * 65}, "guest name must be 1..64"),
    ({"save_id": ""}, "save id must be 1..64"),
    ({"save_id": "s" * 65}, "save id must be 1..64"),
    ({"policy": 1 << 32}, "is not a u32"),
    ({"policy": -1}, "is not a u32"),
    ({"session_blob": bytes(SESSION_BLOB_SIZE + 1)}, "'session_blob' must be 128 bytes"),
    ({"session_blob": bytes(SESSION_BLOB_SIZE - 1)}, "'session_blob' must be 128 bytes"),
    ({"file_nonce": bytes(FILE_NONCE_SIZE - 1)}, "'file_nonce' must be 32 bytes"),
    ({"file_nonce": bytes(FILE_NONCE_SIZE - 1) + b"\x02"}, "names no known kind of save"),
    ({"target_pdh_sha256": bytes(33)}, "'target_pdh_sha256' must be 32 bytes"),
    ({"source_pdh": bytes(MAX_PDH_CERT_PEM + 1)}, "not valid msgpack"),  # the parser's bound, before any copy
    ({"transport_mode": "m" * 1025}, "not valid msgpack"),
], ids=lambda v: str(v)[:40])
def test_header_values_out_of_range_are_refused(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(SaveFileError, match=match):
        SaveHeader.unpack(header_region(header_fields(**changes)))


def test_header_values_at_their_limits_parse() -> None:
    # Positive control of the range checks: the largest values each check allows.
    header = SaveHeader.unpack(header_region(header_fields(
        name="g" * 64, save_id="s" * 64, policy=0xFFFFFFFF, source_pdh=bytes(MAX_PDH_CERT_PEM),
        npages=MAX_NPAGES, memory_mib=MAX_NPAGES // 256)))
    assert header.npages == MAX_NPAGES and len(header.source_pdh) == MAX_PDH_CERT_PEM
    assert SaveHeader.unpack(header_region(header_fields(npages=256, memory_mib=1))).npages == 256


@pytest.mark.parametrize("body", [
    msgpack.packb([1, 2, 3]), msgpack.packb("a string"), msgpack.packb(7), b"\xc1", msgpack.packb({1: 2}),
    msgpack.packb(header_fields(), use_bin_type=True) + msgpack.packb({}),
], ids=["array", "string", "int", "reserved-byte", "int-key", "two-objects"])
def test_header_body_that_is_not_one_map_is_refused(body: bytes) -> None:
    region = PREFIX.pack(MAGIC, FORMAT_VERSION, len(body)) + body
    with pytest.raises(SaveFileError, match="not valid msgpack|not a map|wrong type"):
        SaveHeader.unpack(region)


def test_header_that_does_not_fit_its_region_cannot_be_packed() -> None:
    header = valid_header()
    huge = SaveHeader(**{**header.__dict__, "source_pdh": bytes(HEADER_REGION)})
    with pytest.raises(SaveFileError, match="does not fit"):
        huge.pack()
    assert len(SaveHeader(**{**header.__dict__, "source_pdh": bytes(MAX_PDH_CERT_PEM)}).pack()) <= HEADER_REGION


def test_pdh_fingerprint_is_the_certificates_sha256_and_refuses_non_pem(tmp_path: Path) -> None:
    paths = identity.init_host(tmp_path / "hostA", tmp_path / "ca", common_name="hostA")
    other = identity.init_host(tmp_path / "hostB", tmp_path / "ca", common_name="hostB")
    pem = paths["pdh_cert"].read_bytes()
    fingerprint = pdh_fingerprint(pem)
    assert len(fingerprint) == 32 and fingerprint == pdh_fingerprint(pem)
    assert pdh_fingerprint(other["pdh_cert"].read_bytes()) != fingerprint
    with pytest.raises(SaveFileError, match="not a PEM certificate"):
        pdh_fingerprint(b"not a certificate")


# ---------------------------------------------------------------------- tail


def valid_tail(**changes: Any) -> SaveTail:
    fields: dict[str, Any] = {
        "bitmap": b"\x01\x02\x03bitmap", "vcpu_header": None, "vcpu_payload": b"v" * 300, "vcpu_seq": None,
        "pages": {"private": 10, "shared": 2, "zero": NPAGES - 12}, "runs": 3, "final_sequence": 4,
        "header_sha256": b"\x33" * 32, "table_sha256": b"\x44" * 32,
    }
    fields.update(changes)
    return SaveTail(**fields)


def sealed(tail: SaveTail, mac: bytes = b"\x55" * MAC_SIZE) -> bytes:
    return tail.pack_unsealed() + mac


def tail_bytes(body: dict[str, Any], *, magic: bytes = TAIL_MAGIC) -> bytes:
    raw = msgpack.packb(body, use_bin_type=True)
    return struct.pack("<8sI", magic, len(raw)) + raw + bytes(MAC_SIZE)


def test_tail_round_trips() -> None:
    layout = Layout(NPAGES)
    for tail in (valid_tail(), valid_tail(vcpu_header=b"h" * PACKET_HEADER_SIZE, vcpu_seq=9)):
        parsed, body, mac = SaveTail.unpack(sealed(tail), layout)
        assert parsed == tail and body == tail.body() and mac == b"\x55" * MAC_SIZE
        assert tail_body_length(tail.pack_unsealed()[:TAIL_PREFIX_SIZE]) == len(body)


def test_tail_truncated_trailing_or_with_bad_magic_is_refused() -> None:
    layout = Layout(NPAGES)
    data = sealed(valid_tail())
    SaveTail.unpack(data, layout)  # positive control
    for cut in (data[:-1], data[:-MAC_SIZE], data[:len(data) // 2]):
        with pytest.raises(SaveFileError, match="truncated or has trailing bytes"):
            SaveTail.unpack(cut, layout)
    for short in (b"", data[:TAIL_PREFIX_SIZE + MAC_SIZE - 1]):
        with pytest.raises(SaveFileError, match="tail is missing"):
            SaveTail.unpack(short, layout)
    with pytest.raises(SaveFileError, match="trailing bytes"):
        SaveTail.unpack(data + b"\x00", layout)
    with pytest.raises(SaveFileError, match="bad magic"):
        SaveTail.unpack(b"MIGDTAIM" + data[8:], layout)
    with pytest.raises(SaveFileError, match="bad magic"):
        tail_body_length(b"MIGDSAVE" + data[8:TAIL_PREFIX_SIZE])
    with pytest.raises(SaveFileError, match="tail is missing"):
        tail_body_length(data[:TAIL_PREFIX_SIZE - 1])


@pytest.mark.parametrize(("changes", "match"), [
    ({"pages": {"private": 1, "shared": 1}}, "page counts are malformed"),
    ({"pages": {"private": -1, "shared": 1, "zero": 1}}, "page counts are malformed"),
    ({"pages": {"private": True, "shared": 1, "zero": 1}}, "page counts are malformed"),
    ({"pages": [1, 2, 3]}, "not valid msgpack"),
    ({"vcpu_header": b"h" * (PACKET_HEADER_SIZE - 1)}, "vCPU packet header is malformed"),
    ({"vcpu_header": "h" * PACKET_HEADER_SIZE}, "vCPU packet header is malformed"),
    ({"vcpu_seq": -1}, "vCPU packet sequence is malformed"),
    ({"vcpu_seq": True}, "vCPU packet sequence is malformed"),
    ({"vcpu_payload": b"v" * (2 * PAGE_SIZE + 1)}, "'vcpu_payload' is longer than"),
    ({"runs": "3"}, "'runs' is missing or of the wrong type"),
    ({"final_sequence": None}, "'final_sequence' is missing or of the wrong type"),
    ({"header_sha256": b"x" * 31}, "'header_sha256' must be 32 bytes"),
    ({"table_sha256": None}, "'table_sha256' is missing"),
    ({"bitmap": b"b" * (Layout(NPAGES).max_tail + 1)}, "not valid msgpack"),
], ids=lambda v: str(v)[:40])
def test_tail_fields_are_checked(changes: dict[str, Any], match: str) -> None:
    layout = Layout(NPAGES)
    body = {**msgpack.unpackb(valid_tail().body(), raw=False), **changes}
    SaveTail.unpack(tail_bytes(msgpack.unpackb(valid_tail().body(), raw=False)), layout)  # positive control
    with pytest.raises(SaveFileError, match=match):
        SaveTail.unpack(tail_bytes(body), layout)


def test_tail_that_is_not_a_map_is_refused() -> None:
    raw = msgpack.packb("tail")
    with pytest.raises(SaveFileError, match="not a map"):
        SaveTail.unpack(struct.pack("<8sI", TAIL_MAGIC, len(raw)) + raw + bytes(MAC_SIZE), Layout(NPAGES))


# ---------------------------------------------------------------------- page table


AUTH_A = bytes(range(PACKET_HEADER_SIZE))
AUTH_B = bytes(range(100, 100 + 32))


def sample_table(n: int = 64) -> np.ndarray:
    """Zero pages, a private run of 3 at page 2, a shared run of FILE_RUN_PAGES at page 10, a private 1 at 50."""
    entries = np.zeros(n, dtype=ENTRY)
    entries[2:5] = run_entries(EntryKind.PRIVATE, 3, 7, AUTH_A)
    entries[10:10 + FILE_RUN_PAGES] = run_entries(EntryKind.SHARED, FILE_RUN_PAGES, 1, AUTH_B)
    entries[50:51] = run_entries(EntryKind.PRIVATE, 1, 8, AUTH_A)
    return entries


def test_run_entries_point_back_to_their_first_page() -> None:
    entries = run_entries(EntryKind.PRIVATE, 4, 9, AUTH_A)
    assert entries["kind"].tolist() == [EntryKind.PRIVATE] + [EntryKind.PRIVATE_CONT] * 3
    assert entries["npages"].tolist() == [4, 1, 2, 3]
    assert int(entries["seq"][0]) == 9 and bytes(entries["auth"][0]) == AUTH_A
    assert not entries["seq"][1:].any() and not entries["auth"][1:].any()
    assert entries.itemsize == ENTRY_SIZE == 80
    shared = run_entries(EntryKind.SHARED, 2, 0, AUTH_B)
    assert shared["kind"].tolist() == [EntryKind.SHARED, EntryKind.SHARED_CONT]
    assert bytes(shared["auth"][0]) == AUTH_B + bytes(PACKET_HEADER_SIZE - 32)


def test_table_runs_reads_a_consistent_table() -> None:
    runs, carry = table_runs(sample_table(), 0, None)
    assert carry is None
    assert runs == [
        TableRun(EntryKind.PRIVATE, 2, 3, 7, AUTH_A),
        TableRun(EntryKind.SHARED, 10, FILE_RUN_PAGES, 1, AUTH_B + bytes(PACKET_HEADER_SIZE - 32)),
        TableRun(EntryKind.PRIVATE, 50, 1, 8, AUTH_A),
    ]
    # The slice's own first page is added to every run's place.
    assert [r.first for r in table_runs(sample_table(), 1000, None)[0]] == [1002, 1010, 1050]
    assert table_runs(np.zeros(16, dtype=ENTRY), 0, None) == ([], None)


def _broken(mutate: Any) -> np.ndarray:
    entries = sample_table()
    mutate(entries)
    return entries


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda e: e["kind"].__setitem__(2, EntryKind.ZERO), "continuation entry without its run"),
    (lambda e: e["kind"].__setitem__(60, EntryKind.PRIVATE_CONT), "continuation entry without its run"),
    (lambda e: e["kind"].__setitem__(0, EntryKind.SHARED_CONT), "continuation entry without its run near page 0"),
    (lambda e: e["npages"].__setitem__(4, 1), "the run at page 2 .3 pages. is broken"),  # back 1, should be 2
    (lambda e: e["npages"].__setitem__(3, 0), "the run at page 2 .3 pages. is broken"),
    (lambda e: e["kind"].__setitem__(4, EntryKind.SHARED_CONT), "the run at page 2 .3 pages. is broken"),
    (lambda e: e["kind"].__setitem__(3, EntryKind.PRIVATE), "the run at page 2 .3 pages. is broken"),
    (lambda e: e["npages"].__setitem__(2, 4), "the run at page 2 .4 pages. is broken"),  # claims page 5 too
    (lambda e: e["npages"].__setitem__(2, 2), "continuation entry without its run near page 4"),  # orphans page 4
    (lambda e: e["npages"].__setitem__(2, 0), "run at page 2 has 0 pages"),
    (lambda e: e["kind"].__setitem__(7, 5), "unknown entry kind"),
    (lambda e: e["kind"].__setitem__(7, 255), "unknown entry kind"),
], ids=["head-dropped", "stray-cont", "cont-at-start", "wrong-back-distance", "back-distance-0", "cont-kind-mixed",
        "head-inside-run", "count-too-long", "count-too-short", "count-0", "kind-5", "kind-255"])
def test_table_runs_refuses_an_inconsistent_table(mutate: Any, match: str) -> None:
    table_runs(sample_table(), 0, None)  # positive control: the unmutated table
    with pytest.raises(SaveFileError, match=match):
        table_runs(_broken(mutate), 0, None)


def test_table_runs_refuses_a_run_longer_than_the_file_allows() -> None:
    ok = np.zeros(40, dtype=ENTRY)
    ok[0:FILE_RUN_PAGES] = run_entries(EntryKind.PRIVATE, FILE_RUN_PAGES, 0, AUTH_A)
    assert table_runs(ok, 0, None)[0][0].npages == FILE_RUN_PAGES  # positive control: the longest run
    too_long = np.zeros(40, dtype=ENTRY)
    too_long[0:FILE_RUN_PAGES + 1] = run_entries(EntryKind.PRIVATE, FILE_RUN_PAGES + 1, 0, AUTH_A)
    with pytest.raises(SaveFileError, match=f"has {FILE_RUN_PAGES + 1} pages"):
        table_runs(too_long, 0, None)


def split_table() -> tuple[np.ndarray, np.ndarray]:
    """128 entries in two slices of 64; a private run of 8 at page 60 spans the boundary."""
    entries = np.zeros(128, dtype=ENTRY)
    entries[60:68] = run_entries(EntryKind.PRIVATE, 8, 3, AUTH_A)
    entries[70:72] = run_entries(EntryKind.SHARED, 2, 4, AUTH_B)
    return entries[:64].copy(), entries[64:].copy()


def test_table_runs_carries_a_run_across_slices() -> None:
    first, second = split_table()
    runs, carry = table_runs(first, 0, None)
    assert runs == [TableRun(EntryKind.PRIVATE, 60, 8, 3, AUTH_A)] and carry == runs[0]
    runs, carry = table_runs(second, 64, carry)
    assert [(r.kind, r.first, r.npages) for r in runs] == [(EntryKind.SHARED, 70, 2)] and carry is None
    # A run over three slices: the middle one is all continuation and passes the carry on.
    whole = np.concatenate(split_table())
    carry = None
    found: list[TableRun] = []
    for start in range(0, 128, 4):
        runs, carry = table_runs(whole[start:start + 4], start, carry)
        found += runs
        if start == 60:
            assert carry is not None and carry.first == 60
    assert carry is None and [(r.first, r.npages) for r in found] == [(60, 8), (70, 2)]


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda s: s["npages"].__setitem__(0, 1), "the run at page 60 .8 pages. is broken"),  # restarts the count
    (lambda s: s["kind"].__setitem__(1, EntryKind.ZERO), "the run at page 60 .8 pages. is broken"),
    (lambda s: s["kind"].__setitem__(3, EntryKind.SHARED_CONT), "the run at page 60 .8 pages. is broken"),
    (lambda s: s.__setitem__(slice(0, 4), run_entries(EntryKind.PRIVATE, 4, 9, AUTH_A)),
     "the run at page 60 .8 pages. is broken"),  # a new run where the carried one must go on
], ids=["slice-local-back-distance", "carry-dropped", "carry-kind-changed", "new-run-inside-carry"])
def test_table_runs_refuses_a_broken_carry(mutate: Any, match: str) -> None:
    first, second = split_table()
    _, carry = table_runs(first, 0, None)
    table_runs(second.copy(), 64, carry)  # positive control
    mutate(second)
    with pytest.raises(SaveFileError, match=match):
        table_runs(second, 64, carry)


def test_table_runs_refuses_a_slice_that_starts_with_a_continuation_and_no_carry() -> None:
    _, second = split_table()
    with pytest.raises(SaveFileError, match="continuation entry without its run near page 64"):
        table_runs(second, 64, None)


# ---------------------------------------------------------------------- layout


def test_layout_offsets() -> None:
    layout = Layout(NPAGES)
    assert layout.data_off == HEADER_REGION == 64 * 1024
    assert layout.page_offset(0) == HEADER_REGION
    assert layout.page_offset(5) == HEADER_REGION + 5 * PAGE_SIZE
    assert layout.table_off == HEADER_REGION + NPAGES * PAGE_SIZE
    assert layout.entry_offset(0) == layout.table_off and layout.entry_offset(7) == layout.table_off + 7 * 80
    assert layout.tail_off == layout.table_off + NPAGES * 80  # 4096 entries of 80 bytes: a whole number of pages
    assert layout.tail_off % PAGE_SIZE == 0
    small = Layout(3)  # 240 bytes of table round up to one page
    assert small.tail_off == HEADER_REGION + 3 * PAGE_SIZE + PAGE_SIZE
    assert Layout(52).tail_off - Layout(52).table_off == 2 * PAGE_SIZE
    assert layout.max_tail >= 64 * 1024 + NPAGES // 8 + 2 * PAGE_SIZE
    for npages in (0, -1, MAX_NPAGES + 1):
        with pytest.raises(SaveFileError, match="1..268435456 pages"):
            Layout(npages)
    assert Layout(1).npages == 1 and Layout(MAX_NPAGES).npages == MAX_NPAGES  # positive controls


# ---------------------------------------------------------------------- MACs


KEY = b"\x07" * 32


def test_tail_mac_depends_on_key_and_every_body_byte() -> None:
    body = valid_tail().body()
    mac = tail_mac(KEY, body)
    assert len(mac) == 32 and tail_mac(KEY, body) == mac
    assert tail_mac(b"\x08" + KEY[1:], body) != mac
    for i in range(len(body)):
        flipped = bytearray(body)
        flipped[i] ^= 0x01
        assert tail_mac(KEY, bytes(flipped)) != mac, i
    assert tail_mac(KEY, body[:-1]) != mac and tail_mac(KEY, body + b"\x00") != mac


def test_shared_mac_depends_on_every_input() -> None:
    data = bytes(range(256)) * 32  # two pages
    mac = shared_mac(KEY, 0x2000, 2, 5, data)
    assert shared_mac(KEY, 0x2000, 2, 5, memoryview(data)) == mac  # the same bytes from a view
    assert shared_mac(b"\x08" + KEY[1:], 0x2000, 2, 5, data) != mac
    assert shared_mac(KEY, 0x3000, 2, 5, data) != mac  # moved
    assert shared_mac(KEY, 0x2000, 1, 5, data) != mac  # shortened run
    assert shared_mac(KEY, 0x2000, 2, 6, data) != mac  # another write (round)
    for i in (0, 1, PAGE_SIZE, len(data) - 1):
        flipped = bytearray(data)
        flipped[i] ^= 0x80
        assert shared_mac(KEY, 0x2000, 2, 5, bytes(flipped)) != mac, i
    # The two MACs are domain-separated: the same key and bytes never give the same value.
    assert tail_mac(KEY, data) != shared_mac(KEY, 0, 0, 0, data)


# ---------------------------------------------------------------------- unordered receiver


SESSION_ID = b"F" * 48


def sealed_packets(mode: TransportMode = TransportMode.BOUND) -> tuple[Any, list[tuple[int, Any, bytes, bytes]]]:
    """(keys, [(gpa, header, ciphertext, plaintext)]) of three one-page packets, sequences 0, 1, 2."""
    keys = new_session_keys()
    sender = TransportSender(keys, mode, session_id=SESSION_ID)
    packets = []
    for i, gpa in enumerate((0x1000, 0x5000, 0x9000)):
        plaintext = bytes([i + 1]) * PAGE_SIZE
        header, ciphertext = sender.seal(CTX_DATA, plaintext, gpa=gpa, npages=1)
        packets.append((gpa, header, bytes(ciphertext), plaintext))
    return keys, packets


def test_unordered_receiver_opens_packets_in_any_order_with_their_sequence() -> None:
    keys, packets = sealed_packets()
    receiver = TransportReceiver(keys, TransportMode.BOUND, session_id=SESSION_ID, ordered=False)
    for seq in (2, 0, 1):
        gpa, header, ciphertext, plaintext = packets[seq]
        assert bytes(receiver.open(CTX_DATA, header, ciphertext, gpa=gpa, npages=1, sequence=seq)) == plaintext
    assert receiver.next_sequence == 3  # past the highest opened
    # The same packets in an ordered receiver must come in stream order: 2 first is refused.
    ordered = TransportReceiver(keys, TransportMode.BOUND, session_id=SESSION_ID)
    gpa, header, ciphertext, _ = packets[2]
    with pytest.raises(IntegrityError, match="sequence 0"):
        ordered.open(CTX_DATA, header, ciphertext, gpa=gpa, npages=1)


def test_unordered_receiver_refuses_a_wrong_sequence_or_a_moved_packet() -> None:
    keys, packets = sealed_packets()
    receiver = TransportReceiver(keys, TransportMode.BOUND, session_id=SESSION_ID, ordered=False)
    gpa, header, ciphertext, plaintext = packets[1]
    out = bytearray(b"\xee" * PAGE_SIZE)
    for seq in (0, 2, 1 << 40):
        with pytest.raises(IntegrityError, match=f"as sequence {seq}"):
            receiver.open(CTX_DATA, header, ciphertext, gpa=gpa, npages=1, out=out, sequence=seq)
    for moved in (packets[0][0], gpa + PAGE_SIZE, 0):
        with pytest.raises(IntegrityError, match=f"gpa {moved:#x}"):
            receiver.open(CTX_DATA, header, ciphertext, gpa=moved, npages=1, out=out, sequence=1)
    assert out == b"\xee" * PAGE_SIZE and receiver.next_sequence == 0  # nothing written, nothing advanced
    # Negative control: the right sequence at the right place opens.
    assert bytes(receiver.open(CTX_DATA, header, ciphertext, gpa=gpa, npages=1, out=out, sequence=1)) == plaintext
    assert receiver.next_sequence == 2


def test_moved_packet_opens_in_sev_compat_mode() -> None:
    # What the bound binding is for: without it (the firmware's own format) a packet moved to
    # another page opens, so the refusal above is the binding's doing, not an accident.
    keys, packets = sealed_packets(TransportMode.SEV_COMPAT)
    receiver = TransportReceiver(keys, TransportMode.SEV_COMPAT, session_id=SESSION_ID, ordered=False)
    _, header, ciphertext, plaintext = packets[1]
    assert bytes(receiver.open(CTX_DATA, header, ciphertext, gpa=0x7000, npages=1, sequence=9)) == plaintext


def test_sequence_argument_must_match_the_receivers_kind() -> None:
    keys, packets = sealed_packets()
    gpa, header, ciphertext, plaintext = packets[0]
    ordered = TransportReceiver(keys, TransportMode.BOUND, session_id=SESSION_ID)
    with pytest.raises(TransportError, match="stream order: a sequence number cannot be given"):
        ordered.open(CTX_DATA, header, ciphertext, gpa=gpa, npages=1, sequence=0)
    unordered = TransportReceiver(keys, TransportMode.BOUND, session_id=SESSION_ID, ordered=False)
    with pytest.raises(TransportError, match="needs each packet's sequence number"):
        unordered.open(CTX_DATA, header, ciphertext, gpa=gpa, npages=1)
    with pytest.raises(TransportError, match="packet sequence must be in"):
        unordered.open(CTX_DATA, header, ciphertext, gpa=gpa, npages=1, sequence=-1)
    # Negative controls: each receiver opens the packet the way it takes it.
    assert bytes(ordered.open(CTX_DATA, header, ciphertext, gpa=gpa, npages=1)) == plaintext
    assert bytes(unordered.open(CTX_DATA, header, ciphertext, gpa=gpa, npages=1, sequence=0)) == plaintext
