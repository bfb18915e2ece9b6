"""Each setting declared once: `setting()` puts a `SupervisorConfig` field's CLI face (help,
group, unit, spelling) next to its type and default; the argparse parser, the TOML keys of
``--config`` (read off the parser) and the harness's CLI arguments are all derived here.

Adding an option is one `setting(...)` field in `SupervisorConfig` plus its use.
Standard library only (the config module is imported by the guardian's package).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .._errors import ConfigError

__all__ = [
    "GROUPS",
    "Setting",
    "add_settings",
    "at_least_one",
    "check_settings",
    "cli_arguments",
    "config_fields",
    "creatable_directory",
    "interval",
    "interval_or_zero",
    "option_name",
    "positive_seconds",
    "seconds_or_auto",
    "seconds_or_zero",
    "setting",
    "writable_directory_of",
    "zero_or_more",
]

#: Help groups, in the order --help shows them.
GROUPS = (
    "ranks",
    "control plane",
    "health probes",
    "progress",
    "canary",
    "restarts",
    "drain and routers",
    "across nodes",
    "shutdown",
    "logs",
)


@dataclass(frozen=True)
class Setting:
    """How one field of SupervisorConfig appears on the command line."""

    help: str
    group: str
    #: The metavar: the value's unit or kind (SECONDS, PORT, N, PATH, HOST, LIST...).
    unit: str | None = None
    #: The spelling, when not --the-field-name: a repeatable option's singular, or the flag
    #: that turns a default True off (``--no-log-prefix``).
    flag: str | None = None
    #: Append "(default: ...)" to the help.
    show_default: bool = True
    #: Validates the value (None passes when the default is None); raises ConfigError
    #: naming the option as the user spells it.
    check: Callable[[str, Any], None] | None = None
    #: Values the option takes at once (``--canary-request METHOD PATH JSON``), named by
    #: `unit` split at spaces; the field is a tuple of them, empty when not given.
    nargs: int | None = None
    #: Reads the option's text, where the field's type cannot (``--progress-timeout auto``).
    parse: Callable[[str], Any] | None = None


def at_least_one(option: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{option} must be 1 or more, not {value}")


def zero_or_more(option: str, value: int) -> None:
    if value < 0:
        raise ConfigError(f"{option} must be 0 or more, not {value}")


def positive_seconds(option: str, value: float) -> None:
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{option} must be more than 0 seconds, not {value}")


#: The shortest interval of any periodic check: low enough for the tests' fast settings, high
#: enough that a typo (1e-9) cannot spend a whole core on probing.
MIN_INTERVAL = 0.01


def interval(option: str, value: float) -> None:
    """A period between checks: at least MIN_INTERVAL seconds."""
    positive_seconds(option, value)
    if value < MIN_INTERVAL:
        raise ConfigError(
            f"{option} must be at least {MIN_INTERVAL:g} seconds (shorter spends a core on "
            f"checking), not {value:g}"
        )


def interval_or_zero(option: str, value: float) -> None:
    """A period between checks, or 0 for never."""
    if value != 0:
        interval(option, value)
    else:
        seconds_or_zero(option, value)


def seconds_or_auto(text: str) -> float | None:
    """``auto`` (None: learned) or a number of seconds, as the command line gives it."""
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"give a number of seconds or auto, not {text!r}"
        ) from None


def seconds_or_zero(option: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{option} must be 0 or more seconds, not {value}")


def setting(default: Any, help: str, group: str, unit: str | None = None, **more: Any) -> Any:
    """A dataclass field with a default and its CLI declaration (see `Setting`)."""
    if group not in GROUPS:
        raise ValueError(f"unknown help group {group!r}")
    meta = {"setting": Setting(help, group, unit, **more)}
    if isinstance(default, list | dict | set):
        raise TypeError("mutable defaults: use a tuple")
    return dataclasses.field(default=default, metadata=meta)


def config_fields(cls: type) -> list[tuple[dataclasses.Field[Any], Setting, Any]]:
    """The fields of `cls` that have a CLI face, with their declaration and resolved type."""
    hints = typing.get_type_hints(cls)
    return [
        (f, f.metadata["setting"], hints[f.name])
        for f in dataclasses.fields(cls)
        if "setting" in f.metadata
    ]


def flag_of(name: str, decl: Setting) -> str:
    return decl.flag or "--" + name.replace("_", "-")


def writable_directory_of(option: str, path: str) -> None:
    """A file we will write: its directory must exist and be writable now, not at exit."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{option} {path} is a directory: give a file path")
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{option} {path}: cannot write in {directory}: create it or choose a writable one"
        )


def creatable_directory(option: str, path: str) -> None:
    """A directory we will write in: it exists and is writable, or can be made."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(
            f"{option} {path}: cannot write in {existing}: choose a writable directory"
        )


def option_name(cls: type, name: str) -> str:
    """How a user spells field `name` of `cls`: its CLI option, or the field name itself for
    a setting only the library has."""
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    decl = field.metadata.get("setting")
    return name if decl is None else flag_of(name, decl)


def check_types(config: Any) -> None:
    """Raise ConfigError, naming the field and its option, for a value its annotation does
    not admit (``ranks="2"``, ``ranks=True``, ``fail_on_status=(503,)``); an int where a
    float is declared is fine, and so is a list where a tuple is (it is made the tuple).
    The CLI and the TOML file convert and check their own text first; this is for library
    callers, whose wrong type would otherwise surface as an internal TypeError far from
    its cause."""
    declared = {f.name: decl for f, decl, _ in config_fields(type(config))}
    for name, hint in typing.get_type_hints(type(config)).items():
        value = getattr(config, name)
        if isinstance(value, list) and _admits(hint, tuple(value)):
            # A list where a tuple is declared holds the same items: kept as the tuple
            # (the configuration is frozen, and hashable).
            object.__setattr__(config, name, tuple(value))
            continue
        if _admits(hint, value):
            continue
        option = f" ({flag_of(name, declared[name])})" if name in declared else ""
        shown = repr(value) if len(repr(value)) <= 80 else f"{repr(value)[:60]}..."
        raise ConfigError(f"{name}{option} must be {_kind(hint)}, not {shown}")


def _admits(hint: Any, value: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_admits(arm, value) for arm in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if origin is tuple:
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_admits(args[0], item) for item in value)
        return len(args) == len(value) and all(map(_admits, args, value))
    return not isinstance(hint, type) or isinstance(value, hint)


def _kind(hint: Any) -> str:
    """What `hint` admits, as Python spells it: ``int | None``, ``tuple[str, ...]``."""
    if isinstance(hint, type) and not typing.get_args(hint):
        return "None" if hint is type(None) else hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


def check_settings(config: Any) -> None:
    """Run each declared field's own check on its value in `config`."""
    for field, decl, _ in config_fields(type(config)):
        value = getattr(config, field.name)
        if decl.check is not None and value is not None:
            decl.check(flag_of(field.name, decl), value)


def add_settings(cls: type, groups: Mapping[str, argparse._ArgumentGroup]) -> None:
    """Add an argument for each declared field of `cls` to its group."""
    for field, decl, hint in config_fields(cls):
        base = _base_type(hint)
        kwargs: dict[str, Any] = {"dest": field.name, "help": decl.help}
        default = field.default
        if base is bool and default is None:  # on, off, or decided by the other settings
            kwargs["action"] = argparse.BooleanOptionalAction
            kwargs["default"] = None
        elif base is bool:
            kwargs["action"] = "store_false" if decl.flag else "store_true"
        elif base is tuple and decl.nargs is not None:
            kwargs["nargs"] = decl.nargs
            kwargs["default"] = ()
            kwargs["metavar"] = tuple((decl.unit or "").split())
        elif isinstance(base, type) and issubclass(base, enum.Enum):
            kwargs["choices"] = [m.value for m in base]
            kwargs["default"] = None if default is None else default.value
        elif base is tuple and field.name == "devices":
            kwargs["type"] = _comma_list
            kwargs["default"] = default
        elif base is tuple:
            kwargs["action"] = "append"
            kwargs["default"] = []
        else:
            kwargs["type"] = decl.parse or base
            kwargs["default"] = default
        plain = decl.nargs is None and kwargs.get("action") in (None, "append")
        if decl.unit is not None and plain:
            kwargs["metavar"] = decl.unit
        if decl.show_default and base is not bool and default is not None and default != ():
            kwargs["help"] += " (default: %(default)s)"
        groups[decl.group].add_argument(flag_of(field.name, decl), **kwargs)


def from_namespace(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The declared fields' values from parsed `args`, as `cls` takes them."""
    values: dict[str, Any] = {}
    for field, _, hint in config_fields(cls):
        value = getattr(args, field.name)
        if _base_type(hint) is tuple and isinstance(value, list):
            value = tuple(value)
        values[field.name] = value
    return values


def cli_arguments(cls: type, settings: Mapping[str, Any]) -> list[str]:
    """`settings` (field name -> value) as the CLI arguments that set them."""
    declared = {f.name: (f, decl, hint) for f, decl, hint in config_fields(cls)}
    out: list[str] = []
    for name, value in settings.items():
        if name not in declared:
            raise ValueError(f"{name} has no CLI option")
        field, decl, hint = declared[name]
        flag = flag_of(name, decl)
        base = _base_type(hint)
        if base is bool and field.default is None:
            if value is not None:
                out.append(flag if value else f"--no-{flag[2:]}")
        elif base is bool:
            if value != field.default:
                out.append(flag)
        elif base is tuple and decl.nargs is not None:
            out += [flag, *value] if value else []
        elif isinstance(value, enum.Enum):
            out += [flag, str(value.value)]
        elif base is tuple and name == "devices":
            out += [flag, ",".join(value)]
        elif base is tuple:
            out += [f"{flag}={item}" for item in value]
        elif value is not None:
            out += [flag, str(value)]
    return out


def _base_type(hint: Any) -> Any:
    """`int` for ``int | None``, `tuple` for ``tuple[str, ...]``, the enum for an enum."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return typing.get_origin(hint) or hint


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(","))
