"""Self-describing page content: header fields, determinism, and that every input matters."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migd.abi import PAGE_SIZE
from migd.guest.page_content import (
    HEADER_SIZE,
    PAGE_MAGIC,
    PageContent,
    PageKind,
    pages_equal,
    parse_headers,
)


def test_header_fields_describe_the_page() -> None:
    content = PageContent(42)
    pages = content.generate([0x5000, 0x7000], [3, 9], [PageKind.PRIVATE, PageKind.SHARED])
    assert pages.shape == (2, PAGE_SIZE) and pages.dtype == np.uint8
    assert bytes(pages[0, :8]) == PAGE_MAGIC
    head = parse_headers(pages)
    assert head.magic_ok.tolist() == [True, True]
    assert head.gpa.tolist() == [0x5000, 0x7000]
    assert head.version.tolist() == [3, 9]
    assert head.kind.tolist() == [PageKind.PRIVATE, PageKind.SHARED]
    assert head.seed_tag.tolist() == [content.seed_tag] * 2


def test_version_zero_is_a_zero_page() -> None:
    pages = PageContent(1).generate([0x1000, 0x2000], [0, 1], PageKind.PRIVATE)
    assert not pages[0].any()
    assert pages[1].any()
    assert not parse_headers(pages).magic_ok[0]


def test_content_is_a_pure_function_of_gpa_version_seed() -> None:
    a = PageContent(7).generate([0x3000], [5], PageKind.SHARED)
    b = PageContent(7).generate([0x3000], [5], PageKind.SHARED)
    assert np.array_equal(a, b)
    bodies = {
        "base": a,
        "gpa": PageContent(7).generate([0x4000], [5], PageKind.SHARED),
        "version": PageContent(7).generate([0x3000], [6], PageKind.SHARED),
        "seed": PageContent(8).generate([0x3000], [5], PageKind.SHARED),
    }
    for name, other in bodies.items():
        if name != "base":
            assert not np.array_equal(a[0, HEADER_SIZE:], other[0, HEADER_SIZE:]), name
    # The body does not depend on the kind; only the header records it.
    private = PageContent(7).generate([0x3000], [5], PageKind.PRIVATE)
    assert np.array_equal(a[0, HEADER_SIZE:], private[0, HEADER_SIZE:])
    assert not np.array_equal(a, private)


def test_bulk_generation_equals_page_by_page() -> None:
    content = PageContent(99)
    n = 2500  # crosses the internal 1024-page chunking
    rng = np.random.default_rng(0)
    gpas = rng.integers(0, 1 << 30, n, dtype=np.uint64) * np.uint64(PAGE_SIZE)
    versions = rng.integers(0, 50, n, dtype=np.uint64)
    kinds = rng.choice([PageKind.PRIVATE, PageKind.SHARED], n).astype(np.uint32)
    bulk = content.generate(gpas, versions, kinds)
    for i in (0, 1, 1023, 1024, 2047, 2499):
        single = content.generate(gpas[i : i + 1], versions[i : i + 1], kinds[i : i + 1])
        assert np.array_equal(bulk[i], single[0])


def test_generate_run_matches_generate() -> None:
    content = PageContent(5)
    run = content.generate_run(0x10000, [1, 2, 3], PageKind.PRIVATE)
    explicit = content.generate([0x10000, 0x11000, 0x12000], [1, 2, 3], PageKind.PRIVATE)
    assert np.array_equal(run, explicit)


def test_generate_into_out_buffer() -> None:
    out = np.full((2, PAGE_SIZE), 0xAA, dtype=np.uint8)
    got = PageContent(3).generate([0, PAGE_SIZE], [1, 0], PageKind.SHARED, out=out)
    assert got is out
    assert not out[1].any()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"gpas": [0x1001], "versions": [1], "kinds": PageKind.PRIVATE}, "page aligned"),
        ({"gpas": [0x1000], "versions": [1 << 31], "kinds": PageKind.PRIVATE}, "versions"),
        ({"gpas": [0x1000], "versions": [1], "kinds": [3]}, "kinds"),
    ],
)
def test_generate_rejects_bad_input(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PageContent(0).generate(**kwargs)  # type: ignore[arg-type]


def test_bad_seed_and_bad_arrays_are_rejected() -> None:
    with pytest.raises(ValueError, match="u64"):
        PageContent(-1)
    with pytest.raises(ValueError, match="u64"):
        PageContent(1 << 64)
    with pytest.raises(ValueError, match="holds 1 pages"):
        PageContent(0).generate([0, PAGE_SIZE], [1, 1], PageKind.SHARED, out=np.zeros((1, PAGE_SIZE), np.uint8))
    with pytest.raises(ValueError, match="uint8 array of pages"):
        parse_headers(np.zeros((1, 100), dtype=np.uint8))
    with pytest.raises(ValueError, match="differ in shape"):
        pages_equal(np.zeros((1, PAGE_SIZE), np.uint8), np.zeros((2, PAGE_SIZE), np.uint8))


@settings(max_examples=30, deadline=None)
@given(index=st.integers(0, 3), offset=st.integers(0, PAGE_SIZE - 1), bit=st.integers(0, 7))
def test_any_single_bit_flip_is_detected(index: int, offset: int, bit: int) -> None:
    content = PageContent(11)
    gpas, versions = [0, PAGE_SIZE, 2 * PAGE_SIZE, 3 * PAGE_SIZE], [1, 2, 3, 4]
    pages = content.generate(gpas, versions, PageKind.PRIVATE)
    assert content.body_matches(pages, gpas, versions, PageKind.PRIVATE).all()
    pages[index, offset] ^= 1 << bit
    matches = content.body_matches(pages, gpas, versions, PageKind.PRIVATE)
    assert np.flatnonzero(~matches).tolist() == [index]
