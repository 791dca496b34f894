"""docs/protocol.md's frame table says what the codec (migd/wire.py) sends, and nothing else.

The table under "## Frames" (columns type | name | direction | meta | payload) is parsed and
compared with ``wire.MESSAGE_CLASSES``: every frame type with its number and name, and per type
the metadata keys — the backticked names at the top level of the "meta" column, not those in
parentheses (explanations, values) or brackets — equal to the class's ``META`` both ways. Nested
fields (HELLO's ``guest`` {…}) are compared with their class's ``META`` too, and "—" in the
payload column with a payload limit of zero.

``table_mismatches`` reports differences instead of asserting, so that the negative controls can
run it on a deliberately damaged copy of the document and see it complain.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from migd import wire

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
COLUMNS = ["type", "name", "direction", "meta", "payload"]
#: Metadata values that are maps of their own, and the fields the codec puts in them.
NESTED: dict[tuple[wire.FrameType, str], tuple[str, ...]] = {
    (wire.FrameType.HELLO, "guest"): wire.GuestSpec.META,
}
_BACKTICKED = re.compile(r"`([^`]+)`")
_NESTED_GROUP = re.compile(r"`([^`]+)`\s*\{([^}]*)\}")


def frame_table(text: str) -> list[dict[str, str]]:
    """The rows of the first table in the "## Frames" section, as {column: cell}."""
    match = re.search(r"^## Frames\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    if match is None:
        raise ValueError('no "## Frames" section')
    lines: list[str] = []
    for line in match.group(1).splitlines():  # the first run of table lines: a blank line ends it
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
    if len(lines) < 2:
        raise ValueError('no table under "## Frames"')
    header = _cells(lines[0])
    if header != COLUMNS:
        raise ValueError(f"the frame table's columns are {header}, expected {COLUMNS}")
    return [dict(zip(COLUMNS, _cells(line))) for line in lines[2:]]  # lines[1]: the | --- | row


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _top_level(cell: str) -> str:
    """``cell`` without anything in (), [] or {}: what is left are the field names themselves."""
    out, depth = [], 0
    for ch in cell:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def meta_keys(cell: str) -> list[str]:
    """The top-level backticked names of a "meta" cell ("—": none)."""
    return _BACKTICKED.findall(_top_level(cell))


def nested_keys(cell: str) -> dict[str, list[str]]:
    """``{name: [keys]}`` for each `` `name` {`a`, `b`} `` group of a "meta" cell."""
    return {m.group(1): _BACKTICKED.findall(m.group(2)) for m in _NESTED_GROUP.finditer(cell)}


def _compare(where: str, documented: list[str], codec: tuple[str, ...]) -> list[str]:
    problems = [f"{where}: `{key}` is sent by the codec but missing from the doc" for key in codec
                if key not in documented]
    problems += [f"{where}: `{key}` is documented but the codec has no such field" for key in documented
                 if key not in codec]
    problems += [f"{where}: `{key}` is documented twice" for key in sorted(set(documented))
                 if documented.count(key) > 1]
    return problems


def table_mismatches(text: str) -> list[str]:
    """Every difference between the document's frame table and the codec's registry ([] if none)."""
    try:
        rows = frame_table(text)
    except ValueError as exc:
        return [str(exc)]
    problems: list[str] = []
    by_number: dict[int, dict[str, str]] = {}
    for row in rows:
        if not row["type"].isdigit():
            problems.append(f"row {row['name']!r}: type {row['type']!r} is not a number")
        elif int(row["type"]) in by_number:
            problems.append(f"type {row['type']} has two rows")
        else:
            by_number[int(row["type"])] = row
    for number in sorted(set(by_number) - {int(t) for t in wire.FrameType}):
        problems.append(f"type {number} ({by_number[number]['name']}) is documented but the codec has no such type")
    for ftype, cls in wire.MESSAGE_CLASSES.items():
        if int(ftype) not in by_number:
            problems.append(f"{ftype.name} (type {int(ftype)}) is missing from the table")
            continue
        row = by_number[int(ftype)]
        if row["name"] != ftype.name:
            problems.append(f"type {int(ftype)} is {ftype.name} in the codec, {row['name']} in the doc")
        problems += _compare(ftype.name, meta_keys(row["meta"]), cls.META)
        groups = nested_keys(row["meta"])
        for name in sorted(set(groups) | {n for (t, n) in NESTED if t is ftype}):
            if (ftype, name) not in NESTED:
                problems.append(f"{ftype.name}: `{name}` is documented as a map, the codec sends no map there")
            elif name not in groups:
                problems.append(f"{ftype.name}: `{name}` is a map in the codec, its fields are not documented")
            else:
                problems += _compare(f"{ftype.name} {name}", groups[name], NESTED[(ftype, name)])
        if row["payload"].startswith("—") != (cls.PAYLOAD_LIMIT == 0):
            problems.append(f"{ftype.name}: payload {row['payload']!r}, but the codec allows "
                            f"{cls.PAYLOAD_LIMIT} payload bytes")
    return problems


def test_frame_table_matches_the_codec() -> None:
    assert table_mismatches(DOC.read_text()) == []


def test_the_parser_reads_what_the_table_says() -> None:
    """Explanations in parentheses and brackets are not field names; nested maps are read."""
    rows = {row["name"]: row for row in frame_table(DOC.read_text())}
    assert meta_keys(rows["RESOLVED"]["meta"]) == ["id", "outcome", "mac"]  # not `committed`, …
    assert meta_keys(rows["PREPARE"]["meta"])[:3] == ["pages", "frames", "kinds"]
    assert meta_keys(rows["SHARED_BITMAP"]["meta"]) == []
    assert nested_keys(rows["HELLO"]["meta"]) == {"guest": list(wire.GuestSpec.META)}


@pytest.mark.parametrize(
    "old, new, expected",
    [
        pytest.param("`seq` (transport packets sealed), ", "", "PREPARE: `seq` is sent by the codec but missing",
                     id="field-removed"),
        pytest.param("`round`, `dirty`", "`round`, `dirty_pages`", "ROUND_END: `dirty_pages` is documented but",
                     id="field-renamed"),
        pytest.param("| `token` (u32), `lanes` (as ROUND_END's) |", "| `token` (u32), `lanes` (as ROUND_END's), `mac` |", "PING: `mac` is documented but",
                     id="field-added"),
        pytest.param("`efi`,`uefi_lm`}", "`efi`}", "HELLO guest: `uefi_lm` is sent by the codec but missing",
                     id="nested-field-removed"),
        pytest.param("| 19 | PONG |", "| 20 | PONG |", "PONG (type 19) is missing", id="type-renumbered"),
        pytest.param("| 13 | COMMIT |", "| 13 | COMMITTED |", "type 13 is COMMIT in the codec, COMMITTED",
                     id="type-renamed"),
        pytest.param("| 9 | SHARED_BITMAP | S→D | — | `PageBitmap.encode()` |\n", "",
                     "SHARED_BITMAP (type 9) is missing", id="row-removed"),
        pytest.param("`n` × 4 KiB plaintext", "—", "SHARED_PAGES: payload '—'", id="payload-denied"),
    ],
)
def test_a_damaged_table_is_reported(old: str, new: str, expected: str) -> None:
    """Negative control: the same check on a copy of the doc with one thing wrong finds it."""
    text = DOC.read_text()
    assert text.count(old) == 1, f"the doc no longer contains {old!r}: update this control"
    problems = table_mismatches(text.replace(old, new))
    assert any(expected in problem for problem in problems), problems


def test_a_missing_table_is_reported() -> None:
    assert table_mismatches("# migd\n\n## Frames\n\nno table\n") == ['no table under "## Frames"']
    assert table_mismatches("# migd\n") == ['no "## Frames" section']
