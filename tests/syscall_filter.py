"""The unit's SystemCallFilter= as systemd computes it, for a test to apply with libseccomp.

systemd's rules (systemd.exec(5) "SystemCallFilter=", systemd src/core/load-fragment.c
``config_parse_syscall_filter`` and src/shared/seccomp-util.c ``seccomp_parse_syscall_filter``):

* the first non-empty assignment decides the mode: an allow-list, unless it starts with ``~``;
  an allow-list always holds ``@default`` as well;
* later assignments add to the list when their ``~`` matches the mode and remove from it when
  it does not (``~@privileged`` after ``@system-service`` removes); an empty one resets;
* ``@group`` expands recursively to its members; a name libseccomp cannot resolve is ignored;
  the arithmetic is on system-call numbers of the native architecture;
* a call outside an allow-list gets ``SystemCallErrorNumber=`` as errno when set, else the
  process is killed (SIGSYS, SCMP_ACT_KILL_PROCESS).

The groups come from tests/systemd_syscall_groups.json (written by scripts/syscall-groups from
``systemd-analyze syscall-filter``), so no systemd is needed to compute the list.
"""

from __future__ import annotations

import errno
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

GROUPS_TABLE = Path(__file__).resolve().with_name("systemd_syscall_groups.json")
#: libseccomp's __NR_SCMP_ERROR: the name is not a system call it knows.
NR_UNKNOWN = -1


class UnitFilterError(Exception):
    """The unit's SystemCallFilter= uses something this model of systemd does not handle."""


@dataclass(frozen=True)
class SyscallGroups:
    """systemd's named system-call groups, as one systemd version defines them."""

    systemd: str
    groups: dict[str, tuple[str, ...]]

    @classmethod
    def load(cls, path: Path = GROUPS_TABLE) -> SyscallGroups:
        """The table scripts/syscall-groups wrote."""
        table = json.loads(path.read_text(encoding="utf-8"))
        if table.get("schema") != 1 or not isinstance(table.get("groups"), dict):
            raise UnitFilterError(f"{path}: not a scripts/syscall-groups table (schema 1)")
        return cls(str(table["systemd"]), {name: tuple(members) for name, members in table["groups"].items()})

    def expand(self, name: str, _seen: frozenset[str] = frozenset()) -> set[str]:
        """The system-call names ``name`` stands for (itself unless it is an ``@group``)."""
        if not name.startswith("@"):
            return {name}
        if name not in self.groups:
            # systemd ignores an unknown group with a warning; in our unit it is a typo.
            raise UnitFilterError(f"unknown system-call group {name} (systemd {self.systemd})")
        if name in _seen:
            raise UnitFilterError(f"system-call group {name} contains itself")
        names: set[str] = set()
        for member in self.groups[name]:
            names |= self.expand(member, _seen | {name})
        return names


@dataclass(frozen=True)
class AllowList:
    """The filter an allow-list SystemCallFilter= loads: allowed numbers, and what the rest gets."""

    syscalls: dict[int, str]  # native number → the first name that resolved to it
    errno: int | None  # SystemCallErrorNumber=; None: the process is killed
    #: RestrictNamespaces=yes, a second filter systemd loads (clone3 → ENOSYS, namespaces → EPERM).
    restrict_namespaces: bool = False

    def without(self, *names: str) -> AllowList:
        """The same filter lacking ``names`` (a test's deliberately broken copy)."""
        missing = [name for name in names if name not in self.syscalls.values()]
        if missing:
            raise UnitFilterError(f"not in the allow-list, cannot remove: {', '.join(missing)}")
        return AllowList({nr: n for nr, n in self.syscalls.items() if n not in names}, self.errno,
                         self.restrict_namespaces)

    def to_json(self) -> str:
        """What tests/seccomp_launch.py reads."""
        return json.dumps({"allow": sorted(self.syscalls.values()), "errno": self.errno,
                           "restrict_namespaces": self.restrict_namespaces})


def unit_assignments(unit_text: str, section: str) -> list[tuple[str, str]]:
    """(key, value) of every assignment in ``[section]``, in order, repeated keys kept.

    systemd.syntax(7): ``#`` and ``;`` start comment lines, a trailing backslash continues a
    line, whitespace around ``=`` and at both ends of a value is dropped.
    """
    assignments: list[tuple[str, str]] = []
    current = None
    pending = ""
    for raw in unit_text.splitlines():
        line = (pending + " " + raw.strip()) if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1].rstrip()
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif "=" in line:
            key, value = line.split("=", 1)
            if current == section:
                assignments.append((key.strip(), value.strip()))
        else:
            raise UnitFilterError(f"not an assignment, section or comment: {line!r}")
    return assignments


def _error_number(value: str | None) -> int | None:
    if value is None or value == "" or value == "kill":
        return None
    if value.isdigit():
        return int(value)
    number = getattr(errno, value, None)
    if not isinstance(number, int):
        raise UnitFilterError(f"SystemCallErrorNumber={value}: not an errno name")
    return number


def unit_allow_list(unit_text: str, groups: SyscallGroups, resolve: Callable[[str], int]) -> AllowList:
    """The allow-list the unit's ``[Service]`` SystemCallFilter= lines load under ``groups``.

    ``resolve`` maps a name to its native system-call number (libseccomp's
    ``seccomp_syscall_resolve_name``; NR_UNKNOWN for a name it does not know).
    """
    assignments = unit_assignments(unit_text, "Service")
    allow_list: bool | None = None
    allowed: dict[int, str] = {}
    for key, value in assignments:
        if key != "SystemCallFilter":
            continue
        if not value:
            allow_list, allowed = None, {}
            continue
        invert = value.startswith("~")
        words = value.removeprefix("~").split()
        if allow_list is None:
            allow_list = not invert
            if allow_list:
                _apply(allowed, groups.expand("@default"), resolve, add=True)
        if not allow_list:
            raise UnitFilterError("a deny-list SystemCallFilter= (first assignment starts with ~) is not modelled")
        for word in words:
            if ":" in word:
                raise UnitFilterError(f"per-call errno ({word}) is not modelled")
            _apply(allowed, groups.expand(word), resolve, add=not invert)
    if allow_list is None:
        raise UnitFilterError("the unit has no SystemCallFilter=")
    error = [value for key, value in assignments if key == "SystemCallErrorNumber"]
    namespaces = [value for key, value in assignments if key == "RestrictNamespaces"]
    if namespaces and namespaces[-1] not in ("yes", "no"):
        raise UnitFilterError(f"RestrictNamespaces={namespaces[-1]}: only yes and no are modelled")
    return AllowList(allowed, _error_number(error[-1] if error else None), bool(namespaces) and namespaces[-1] == "yes")


def _apply(allowed: dict[int, str], names: Iterable[str], resolve: Callable[[str], int], *, add: bool) -> None:
    for name in sorted(names):
        number = resolve(name)
        if number == NR_UNKNOWN:
            continue  # systemd: "Failed to parse system call, ignoring"
        if add:
            allowed.setdefault(number, name)
        else:
            allowed.pop(number, None)
