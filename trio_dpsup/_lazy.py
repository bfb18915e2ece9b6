"""Lazy package attributes (PEP 562), so that importing a package imports none of its parts.

Every rank runs ``python -m trio_dpsup.demo`` or ``trio_dpsup.testing.fake_rank``, and Python
imports the parent packages first. Eager imports there would load trio, httpx and h11
into every rank: measured on 2 cores, imports took 148 ms instead of 37, and the exit on
SIGTERM 33 ms instead of 11, on each rank.

A package names its public names twice, side by side, in its ``__init__.py``: as the
``if typing.TYPE_CHECKING:`` imports that type checkers read (``from ._errors import
ConfigError as ConfigError``), and as ``_EXPORTS``, the table the run time reads (``"ConfigError":
"._errors"``), public name -> the relative module it lives in. tests/test_public_api.py holds
that the two agree exactly. The run time reads nothing but the table: no source, no file
(a package compiled without its ``.py`` files, or inside a zip, exports the same names), and a
name's module is imported on its first lookup only, so a rank that never looks pays nothing.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, exporting each name of `exports` (public name
    -> the module it lives in, relative to `package`) from its module on first use; sets the
    package's ``__all__`` to those names, sorted."""
    namespace = sys.modules[package].__dict__
    table = dict(exports)  # a copy: what the package exports cannot change under it
    namespace["__all__"] = sorted(table)

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(table[name], package), name)
        namespace[name] = value  # later lookups do not come back here
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *table})

    return __getattr__, __dir__
