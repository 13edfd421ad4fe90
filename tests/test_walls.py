"""The walls between the rooms of agent/ (ARCHITECTURE.md): what each folder may import, and no
import cycles between rooms. Every import counts, also one inside a function or under
TYPE_CHECKING: a wall that holds only at load time is not a wall."""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "agent"

# room -> the rooms it must not import (a room is a folder of agent/, or a top-level module)
FORBIDDEN: dict[str, set[str]] = {
    "transport": {"store", "pipeline", "intake", "ops", "service", "cli"},
    "store": {"transport", "pipeline", "intake", "ops", "service", "cli"},
    "intake": {"transport", "pipeline", "ops", "service", "cli"},
    "pipeline": {"intake", "ops", "cli", "service"},
}
# rooms that may import nothing of agent/ but themselves and these
ONLY: dict[str, set[str]] = {
    "imports": {"errors", "units"},  # the pure import rules: no configuration, no journal, no transport
    "errors": set(),  # the error family (agent/errors.py): a leaf every room may use
    "units": set(),  # counted nouns and human durations (agent/units.py): a leaf too
}


def room_of(module: str) -> str:
    """agent.imports.types -> imports; agent.config -> config; agent -> agent."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    relative = path.relative_to(AGENT.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, module: str) -> set[str]:
    """Every agent module the file of `module` imports, anywhere in it."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolved against this module's package
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from agent import x`
    return {name for name in found if name == "agent" or name.startswith("agent.")}


def room_imports() -> dict[str, dict[str, set[str]]]:
    """room -> imported room -> the modules of the room that import it."""
    rooms: dict[str, dict[str, set[str]]] = {}
    for path in sorted(AGENT.rglob("*.py")):
        source = module_name(path)
        edges = rooms.setdefault(room_of(source), {})
        for target in imported_modules(path, source):
            if target != "agent":
                edges.setdefault(room_of(target), set()).add(source)
    return rooms


def test_rooms_are_found() -> None:
    rooms = room_imports()
    folders = {"imports", "intake", "transport", "store", "pipeline", "ops"}
    assert folders | {"config", "service", "cli"} <= set(rooms)
    assert "imports" in rooms["config"]  # the walk sees imports at all


def test_walls() -> None:
    breaches = []
    for room, edges in room_imports().items():
        for target, sources in edges.items():
            if target == room:
                continue
            if target in FORBIDDEN.get(room, set()) or (room in ONLY and target not in ONLY[room]):
                breaches.append(f"{room}/ imports {target} ({', '.join(sorted(sources))})")
    assert not breaches, "walls breached:\n" + "\n".join(breaches)


def test_no_cycles_between_rooms() -> None:
    graph = {room: {target for target in edges if target != room} for room, edges in room_imports().items()}
    cycles: list[list[str]] = []

    def visit(room: str, trail: list[str]) -> None:
        for target in sorted(graph.get(room, ())):
            if target in trail:
                cycles.append([*trail[trail.index(target):], target])
            elif target not in done:
                visit(target, [*trail, target])
        done.add(room)

    done: set[str] = set()
    for room in sorted(graph):  # bounded: each room is finished once, each trail is a simple path
        if room not in done:
            visit(room, [room])
    assert not cycles, "import cycles between rooms:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_walk_reads_every_kind_of_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from __future__ import annotations\n"
        "import agent.store.journal\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from agent.transport import sftp\n"
        "def f() -> None:\n    from agent.pipeline.upload import Uploader\n"
        "from .watch import DropScanner\n"
    )
    assert imported_modules(sample, "agent.intake.sample") >= {
        "agent.store.journal", "agent.transport", "agent.transport.sftp", "agent.pipeline.upload",
        "agent.intake.watch"}
