"""The repository stands on its own: its text points only at files it holds.

Comments, docstrings and docs once cited a design document that lived outside the repository,
and named paths of the machine the code was written on; a reader of a clone can follow neither.
The design is docs/design.md now. These tests search every file ``git grep`` sees — tracked ones
and untracked ones that are not ignored, so a new file is caught before it is committed — for
the old document's name and for the absolute path of the repository's parent directory (where
the code was written, the notes folder lay beside the repository). References into
docs/design.md must name a section it has.

The patterns are assembled at run time, so this file never matches its own search. Each check
is first run on a small repository of its own that holds such a reference (the negative control:
the check can see one), and on the same text without it (it does not flag correct text).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
#: The outside design document's name, in two pieces (see the module docstring).
OUTSIDE_DOCUMENT = "DESIGN" + ".md"
#: How text names the design, in two pieces too (the controls below hold references to it).
DESIGN_NAME = "docs/design" + ".md"
#: A reference into docs/design.md: its section number, and the section's name if given.
DESIGN_REFERENCE = r'docs/design\.md,? §([0-9]+)(?: "([^"]+)")?'
#: The same, as a POSIX extended regular expression for ``git grep -E`` (no groups needed).
DESIGN_REFERENCE_ERE = r"docs/design\.md,? §[0-9]+"


#: Directories that hold clones without being anyone's workplace: code uses them legitimately
#: (``tempfile``, socket paths), so when a clone sits directly in one, its own path is searched.
_SHARED_PARENTS = {Path("/"), Path("/tmp"), Path("/var/tmp"), Path(tempfile.gettempdir())}


def machine_path(root: Path) -> str:
    """The absolute path that must not appear: the repository's parent directory, with a slash.

    The slash keeps ``/work`` from matching ``migd/workload.py``. A clone directly under ``/`` or
    a temporary directory (CI's fresh clones) has no parent worth the name: ``//`` would match
    every URL and ``/tmp/`` every test that makes a socket path. Its own path is used instead.
    """
    parent = root.parent
    return f"{root if parent in _SHARED_PARENTS else parent}/"


def git_grep(repo: Path, *args: str) -> list[str]:
    """``git grep -nI ARGS`` over the tracked and the untracked, not ignored, files of ``repo``."""
    result = subprocess.run(
        ["git", "-C", str(repo), "grep", "--untracked", "-nI", *args, "--", "."],
        capture_output=True, text=True, check=False,
    )
    if result.returncode == 1:  # git grep: no match
        return []
    assert result.returncode == 0, f"git grep {' '.join(args)} failed in {repo}: {result.stderr}"
    return result.stdout.splitlines()


def stray_references(repo: Path, machine: str) -> list[str]:
    """Lines of ``repo`` that cite the outside design document or the absolute path ``machine``."""
    return git_grep(repo, "-F", "-e", OUTSIDE_DOCUMENT, "-e", machine)


def design_sections(text: str) -> dict[str, str]:
    """Section number → name of the ``## N. Name`` headings of docs/design.md."""
    return {m[1]: m[2].strip() for m in re.finditer(r"^## ([0-9]+)\. (.+)$", text, re.MULTILINE)}


def broken_design_references(repo: Path, sections: dict[str, str]) -> list[str]:
    """Lines of ``repo`` whose reference into docs/design.md names a section it does not have."""
    broken = []
    for line in git_grep(repo, "-E", "-e", DESIGN_REFERENCE_ERE):
        for number, name in re.findall(DESIGN_REFERENCE, line):
            if number not in sections or (name and name != sections[number]):
                broken.append(line)
    return broken


def scratch_repository(tmp_path: Path, files: dict[str, str]) -> Path:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True, capture_output=True)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_no_reference_to_the_outside_design_document_or_a_machine_path(tmp_path: Path) -> None:
    machine = machine_path(ROOT)
    # Negative control: the same check sees both kinds of reference in a repository that has them,
    # and leaves alone the text that replaced them.
    control = scratch_repository(tmp_path, {
        "stray.py": f'"""Values of {OUTSIDE_DOCUMENT} §3; the spec is {machine}notes/channel.md."""\n',
        "fixed.py": f'"""Values of {DESIGN_NAME} §3; see migd/guest/workload.py and design.md."""\n',
    })
    flagged = stray_references(control, machine)
    assert len(flagged) == 1 and flagged[0].startswith("stray.py:1:"), flagged

    assert stray_references(ROOT, machine) == []


def test_references_into_the_design_name_sections_it_has(tmp_path: Path) -> None:
    sections = design_sections(DESIGN.read_text())
    assert {"1", "3", "4", "5", "8", "9"} <= set(sections), sections
    # Negative control: a section that does not exist, and a name that is not the section's.
    control = scratch_repository(tmp_path, {
        "stray.py": f'# {DESIGN_NAME} §99\n# {DESIGN_NAME} §3 "Invariants"\n',
        "fixed.py": f'# {DESIGN_NAME} §3 "{sections["3"]}"\n# {DESIGN_NAME}, §8 "{sections["8"]}", 4\n',
    })
    flagged = broken_design_references(control, sections)
    assert [line.split(":")[:2] for line in flagged] == [["stray.py", "1"], ["stray.py", "2"]], flagged

    assert broken_design_references(ROOT, sections) == []
