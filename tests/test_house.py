"""The package's structure: its families stand on floors, and imports only run down.

Each top-level module or folder ("room") of trio_dpsup is on one floor of `FLOORS`; a room
may import only rooms on lower floors (the rooms of one floor do not know each other), and
no files import each other in a circle. Each folder's own list, the "May import:" line of
its ``__init__.py`` docstring, is held too, exactly: a folder imports every room it lists and
no other. Imports are read from the source (``ast``), the ones made for type checkers
included: a name a signature needs is a dependency too.
"""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from collections.abc import Iterator
from pathlib import Path

import pytest

from trio_dpsup import SupervisorConfig
from trio_dpsup.testing import SupervisorSettings

PACKAGE = Path(__file__).parent.parent / "trio_dpsup"

#: From the ground up. The floors say what may know what: the process and GPU layers know
#: nothing of the supervisor; errors, output and configuration are the vocabulary; the state
#: is what one rank's life (`_ranks`) and the outside's surfaces (`_plane`) share, and
#: neither of those knows the other; the supervisor wires them; the faces stand on top.
FLOORS: tuple[frozenset[str], ...] = (
    frozenset({"_version", "_lazy", "_proc", "demo"}),
    frozenset({"_gpu"}),
    frozenset({"_errors"}),
    frozenset({"_output"}),
    frozenset({"_config"}),
    frozenset({"_state"}),
    frozenset({"_ranks", "_plane"}),
    frozenset({"_prepare"}),
    frozenset({"_supervisor"}),
    frozenset({"__init__", "_startup_line", "_systemd", "testing"}),
    frozenset({"_cli"}),
    frozenset({"__main__"}),
)
#: The most modules the top level may hold: the rest live in their families' folders.
MAX_TOP_MODULES = 12


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    """``trio_dpsup._ranks.rank`` -> ``_ranks``; ``trio_dpsup`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts}


def imports(this: str, path: Path, known: set[str]) -> Iterator[str]:
    """The package's modules that module `this`, read from `path`, imports (a ``from .
    import name`` of a submodule is that submodule), wherever the import stands."""
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("trio_dpsup"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            elif node.module and node.module.startswith("trio_dpsup"):
                target = node.module
            else:
                continue
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                yield submodule if submodule in known else target


def floor_of(name: str) -> int:
    for number, rooms in enumerate(FLOORS):
        if name in rooms:
            return number
    raise AssertionError(f"{name} stands on no floor of FLOORS: place it there")


def upward_imports(found: dict[str, Path]) -> list[str]:
    upward = []
    for module, path in found.items():
        here = room(module)
        for target in set(imports(module, path, set(found))):
            there = room(target)
            if there != here and floor_of(there) >= floor_of(here):
                upward.append(f"{module} -> {target} ({here} on {floor_of(here)}, {there} on "
                              f"{floor_of(there)})")  # fmt: skip
    return sorted(upward)


def test_every_import_runs_down() -> None:
    upward = upward_imports(modules())
    assert not upward, "imports that do not run down:\n" + "\n".join(upward)


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    # The check itself: the state importing the supervisor, even for type checkers only,
    # is what it must refuse.
    found = modules()
    planted = tmp_path / "board.py"
    planted.write_text(
        found["trio_dpsup._state.board"].read_text()
        + "\nif typing.TYPE_CHECKING:\n    from .._supervisor import Supervisor\n"
    )
    found["trio_dpsup._state.board"] = planted
    (caught,) = upward_imports(found)
    assert caught.startswith("trio_dpsup._state.board -> trio_dpsup._supervisor (_state on 5")


#: A folder's list: "May import: `_state`, `_config` (why), `_errors`." up to the sentence's
#: end, each room in backticks (none in a why); "nothing of the package" where it imports
#: none; "every room below it" for the top, which the floors alone hold.
MAY_IMPORT = re.compile(r"^May import: (?P<rooms>.*?)\.(?:\s|$)", re.MULTILINE | re.DOTALL)
EVERY_ROOM_BELOW = "every room below it"


def folders() -> dict[str, Path]:
    """Each room that is a folder, by name -> its ``__init__.py``."""
    return {p.parent.name: p for p in PACKAGE.glob("*/__init__.py")}


def may_import(init: Path) -> frozenset[str] | None:
    """The rooms a folder's docstring lists after "May import:"; None for every room below
    it (floors alone hold it)."""
    doc = ast.get_docstring(ast.parse(init.read_text())) or ""
    found = MAY_IMPORT.search(doc)
    assert found, f'{init}: its docstring has no "May import: ..." line (see MAY_IMPORT)'
    words = " ".join(found["rooms"].split())
    if words == EVERY_ROOM_BELOW:
        return None
    rooms = frozenset(re.findall(r"`([^`]+)`", words))
    assert rooms or words.startswith("nothing"), (
        f'{init}: "May import: {words}." names no room in backticks; say "nothing of the '
        f'package" or "{EVERY_ROOM_BELOW}"'
    )
    return rooms


def unlisted_imports(found: dict[str, Path]) -> list[str]:
    """Where a folder's modules and its "May import:" list disagree: an import of a room it
    does not list, or a listed room it never imports."""
    lists = {name: may_import(init) for name, init in folders().items()}
    used: dict[str, set[str]] = {name: set() for name in lists}
    wrong = []
    for module, path in found.items():
        here = room(module)
        allowed = lists.get(here)
        for target in sorted(set(imports(module, path, set(found)))):
            there = room(target)
            if here not in lists or there == here:
                continue
            used[here].add(there)
            if allowed is not None and there not in allowed:
                wrong.append(f"{module} -> {target} ({there} is not in {here}'s May import)")
    for name, allowed in lists.items():
        wrong += [
            f"{name} lists {r} but imports nothing of it" for r in (allowed or set()) - used[name]
        ]
    return sorted(wrong)


def test_each_folder_lists_rooms_below_it() -> None:
    for name, init in sorted(folders().items()):
        for listed in sorted(may_import(init) or ()):
            assert floor_of(listed) < floor_of(name), f"{name} lists {listed}, not below it"


def test_each_folder_imports_exactly_what_it_lists() -> None:
    wrong = unlisted_imports(modules())
    assert not wrong, "imports that a folder's May import does not say:\n" + "\n".join(wrong)


def test_an_unlisted_import_is_caught(tmp_path: Path) -> None:
    # The check itself: the control plane importing the process layer runs down the floors
    # but is not on `_plane`'s list; a list naming a room never imported is stale.
    found = modules()
    planted = tmp_path / "metrics.py"
    planted.write_text(
        found["trio_dpsup._plane.metrics"].read_text() + "\nfrom .._proc import stop\n"
    )
    found["trio_dpsup._plane.metrics"] = planted
    assert not upward_imports(found)
    assert unlisted_imports(found) == [
        "trio_dpsup._plane.metrics -> trio_dpsup._proc.stop (_proc is not in _plane's May import)"
    ]
    del found["trio_dpsup._plane.metrics"]
    assert unlisted_imports(found) == ["_plane lists _version but imports nothing of it"]


def test_no_files_import_each_other_in_a_circle() -> None:
    found = modules()
    graph = {m: set(imports(m, p, set(found))) & set(found) - {m} for m, p in found.items()}
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circle = [*path[path.index(target) :], target]
                pytest.fail("a circle of imports: " + " -> ".join(circle))
            if target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_top_level_holds_few_modules() -> None:
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= MAX_TOP_MODULES, top
    for folder in (p for p in PACKAGE.iterdir() if (p / "__init__.py").exists()):
        doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text()))
        assert doc, f"{folder.name}/__init__.py says nothing of what lives there"


def test_the_floors_name_every_room() -> None:
    rooms = {room(m) for m in modules()}
    named = set().union(*FLOORS)
    assert rooms == named, f"unplaced: {sorted(rooms - named)}; gone: {sorted(named - rooms)}"


def test_harness_settings_are_the_config_fields() -> None:
    """`SupervisorSettings` (the harness's typed keywords) holds every field of
    `SupervisorConfig` but those the harness sets, with the same types."""
    config = {f.name: str(f.type) for f in dataclasses.fields(SupervisorConfig)}
    for set_by_harness in ("command", "ranks"):
        config.pop(set_by_harness)
    # Both modules postpone annotations: each type is the text written, compared as such.
    settings = {
        name: hint.__forward_arg__ if isinstance(hint, typing.ForwardRef) else str(hint)
        for name, hint in SupervisorSettings.__annotations__.items()
    }
    assert settings == config


def test_tests_say_why_they_import_a_private_module() -> None:
    """Tests go through the public API; a unit tested on purpose says so where it is
    imported: a comment on the line, or just above its imports."""
    unexplained = []
    for path in sorted(Path(__file__).parent.glob("*.py")):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if not line.lstrip().startswith(("from trio_dpsup._", "import trio_dpsup._")):
                continue
            above = number - 1
            while above >= 0 and lines[above].lstrip().startswith(("from ", "import ")):
                above -= 1
            if "#" not in line and (above < 0 or not lines[above].lstrip().startswith("#")):
                unexplained.append(f"{path.name}:{number + 1}: {line.strip()}")
    assert not unexplained, "private imports without a why:\n" + "\n".join(unexplained)
