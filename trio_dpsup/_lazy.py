"""Lazy package attributes (PEP 562), so that importing a package imports none of its parts.

Every rank runs ``python -m trio_dpsup.demo`` or ``trio_dpsup.testing.fake_rank``, and Python
imports the parent packages first. Eager imports there would load trio, httpx and h11
into every rank: measured on 2 cores, imports took 148 ms instead of 37, and the exit on
SIGTERM 33 ms instead of 11, on each rank.

A package lists its public names once, as the ``if typing.TYPE_CHECKING:`` imports that
type checkers read (``from ._errors import ConfigError as ConfigError``). At run time that
block is skipped; `lazy_exports` reads it from the package's source on the first lookup of
a name (``__all__`` included), so a rank that never looks pays nothing.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, exporting what its TYPE_CHECKING block
    imports from its own modules; ``__all__`` is those names, sorted."""
    namespace = sys.modules[package].__dict__
    table: dict[str, str] = {}  # public name -> the relative module it lives in

    def home() -> dict[str, str]:
        if not table:
            table.update(_declared(namespace["__file__"]))
        return table

    def __getattr__(name: str) -> Any:
        if name == "__all__":
            value: Any = sorted(home())
        elif name in home():
            value = getattr(importlib.import_module(home()[name], package), name)
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        namespace[name] = value  # later lookups do not come back here
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *home()})

    return __getattr__, __dir__


def _declared(path: str) -> dict[str, str]:
    """Name -> relative module, from the ``if typing.TYPE_CHECKING:`` block of `path`."""
    import ast  # only on first lookup: ranks never pay for it

    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    found: dict[str, str] = {}
    for node in tree.body:
        if isinstance(node, ast.If) and ast.unparse(node.test) == "typing.TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom) and statement.level:
                    module = "." * statement.level + (statement.module or "")
                    found.update({alias.asname or alias.name: module for alias in statement.names})
    if not found:
        raise ImportError(f"{path} declares no exports in an `if typing.TYPE_CHECKING:` block")
    return found
