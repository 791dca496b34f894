"""The package layers (docs/design.md "Components"): lower layers never import upper ones, no cycles.

Every ``import`` and ``from ... import`` of a ``migd`` module anywhere in a module counts — at
the top, inside a function, or under ``TYPE_CHECKING``: a type-only import is still a
dependency a reader must follow.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "migd"

#: The layers, lowest first. A module may import its own layer and the ones below it.
LAYERS: list[tuple[str, set[str]]] = [
    ("base", {"migd", "migd.abi", "migd.errors", "migd.fileio", "migd.peer_text", "migd.failure_text",
              "migd.inflight"}),
    ("platform", {"migd.platform", "migd.platform.memory", "migd.platform.psp", "migd.platform.psp_store",
                  "migd.platform.identity", "migd.platform.pki_verify", "migd.sev_transport", "migd.bitmap",
                  "migd.bitmap_codec"}),
    ("guest", {"migd.guest", "migd.guest.agent", "migd.guest.agent_launcher", "migd.guest.channel",
               "migd.guest.channel_codec", "migd.guest.guest_layout", "migd.guest.guest_vcpu",
               "migd.guest.page_content", "migd.guest.selfcheck", "migd.guest.vm", "migd.guest.workload",
               "migd.guest.host_guest", "migd.guest.record_retention", "migd.guest.ram_capacity"}),
    ("migration core", {"migd.wire", "migd.stream", "migd.session", "migd.session_auth", "migd.source_session",
                        "migd.dest_session", "migd.source", "migd.dest", "migd.resolve", "migd.listener",
                        "migd.convergence", "migd.migration_state", "migd.progress", "migd.page_runs",
                        "migd.send_buffers", "migd.send_lane", "migd.lane_socket", "migd.thread_socket", "migd.lane_receiver", "migd.host", "migd.journal", "migd.page_pipeline", "migd.messages",
                        "migd.frame_fields", "migd.save_format", "migd.save_session", "migd.save", "migd.restore",
                        "migd.file_job"}),
    ("daemon", {"migd.daemon", "migd.daemon.core", "migd.daemon.api", "migd.daemon.openapi", "migd.daemon.metrics",
                "migd.daemon.serve", "migd.daemon.sdnotify", "migd.daemon.config", "migd.daemon.recovery",
                "migd.daemon.tls_check"}),
    ("cli", {"migd.cli", "migd.cli.commands", "migd.cli.client", "migd.cli.progress_bar", "migd.cli.demo",
             "migd.cli.watch", "migd.__main__"}),
]


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(module: str, source: str, known: set[str]) -> set[str]:
    """The migd modules ``source`` (of ``module``) imports, resolved to module names."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "migd")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.split(".")[0] == "migd":
            for alias in node.names:  # ``from migd.pkg import mod`` imports a module, ``import name`` an attribute
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
    return {m for m in found if m != module}


def graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    return {name: imports(name, path.read_text(), known) for name, path in files.items()}


def layer_violations(edges: dict[str, set[str]], layers: list[tuple[str, set[str]]]) -> list[str]:
    rank = {m: i for i, (_, members) in enumerate(layers) for m in members}
    problems = [f"{m} is in no declared layer" for m in edges if m not in rank]
    for module, targets in edges.items():
        for target in targets:
            if target not in rank:
                problems.append(f"{module} imports {target}, which is in no declared layer")
            elif module in rank and rank[target] > rank[module]:
                problems.append(f"{module} ({layers[rank[module]][0]}) imports {target} ({layers[rank[target]][0]})")
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle found by a depth-first search (each reported once, by its members)."""
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    found.append(cycle + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_every_module_is_in_a_layer_and_imports_only_its_layer_and_below() -> None:
    assert layer_violations(graph(ROOT), LAYERS) == []


def test_there_are_no_import_cycles() -> None:
    assert cycles(graph(ROOT)) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "migd"
    for rel, text in files.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return pkg


@pytest.mark.parametrize(
    ("files", "expect"),
    [
        ({"__init__.py": "", "errors.py": "from migd.daemon.core import Daemon\n",
          "daemon/__init__.py": "", "daemon/core.py": "class Daemon: ...\n"},
         "migd.errors (base) imports migd.daemon.core (daemon)"),
        ({"__init__.py": "", "wire.py": "def f():\n    from migd.cli import commands\n",
          "cli/__init__.py": "", "cli/commands.py": ""},
         "migd.wire (migration core) imports migd.cli.commands (cli)"),
    ],
    ids=["top-level", "inside-a-function"],
)
def test_a_wrong_import_is_caught(tmp_path: Path, files: dict[str, str], expect: str) -> None:
    """Negative control: a deliberately upward import fails the layer check."""
    assert expect in layer_violations(graph(_write(tmp_path, files)), LAYERS)


def test_a_cycle_is_caught(tmp_path: Path) -> None:
    """Negative control: ``bitmap`` ↔ ``bitmap_codec`` as it was (a type-only import included)."""
    pkg = _write(tmp_path, {
        "__init__.py": "",
        "bitmap.py": "from migd.bitmap_codec import encode_bitmap\n",
        "bitmap_codec.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from migd.bitmap import PageBitmap\n",
    })
    (cycle,) = cycles(graph(pkg))
    assert set(cycle) == {"migd.bitmap", "migd.bitmap_codec"}


def _all(members: Iterable[set[str]]) -> set[str]:
    return set().union(*members)


def test_the_declared_layers_name_only_modules_that_exist() -> None:
    """The table above cannot drift: a module removed or renamed shows here."""
    assert _all(m for _, m in LAYERS) == set(graph(ROOT))
