"""``--config FILE.toml``: the options, as keys, in a file; the command line wins.

Keys are the long options without their dashes (``base-port = 8000``; ``base_port`` works
too), flags take booleans (``fail-on-leftovers = true``, ``no-log-prefix = true``), and
``command`` is the rank command as a list of strings, used when none follows ``--``::

    ranks = 8
    gpus-per-rank = 1
    base-port = 8000
    grace-period = 30
    command = ["vllm", "serve", "MODEL", "--port", "{port}"]
"""

from __future__ import annotations

import argparse
import os
import stat
import tomllib
from collections.abc import Iterable
from typing import Any

from .._errors import ConfigError

__all__ = ["load_config_file"]

#: The largest config file read: a config is a few hundred bytes, /dev/zero is endless.
MAX_FILE_BYTES = 1 << 20
#: The longest string value: hosts, paths and the like.
MAX_STRING = 4096
#: Options that make no sense in a file.
_NOT_KEYS = frozenset({"help", "config", "version"})


def load_config_file(
    path: str, actions: Iterable[argparse.Action]
) -> tuple[dict[str, Any], list[str] | None]:
    """Parser defaults (dest -> value) and the command, from the TOML file at `path`.

    Raises ConfigError naming the file and the key for a missing file, bad TOML, an unknown
    key, or a value of the wrong type.
    """
    try:
        # O_NONBLOCK: opening a FIFO for reading would wait for a writer, for ever.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"--config {path} is not a regular file: give a TOML file")
            raw = f.read(MAX_FILE_BYTES + 1)  # a huge file must not fill our memory
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}: give the path of a TOML file") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"--config {path} is larger than {MAX_FILE_BYTES} bytes: not a config")
    try:
        data = tomllib.loads(raw.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: not valid TOML ({exc})") from exc
    except RecursionError:
        # tomllib recurses per nesting level: thousands of nested arrays exhaust the stack.
        raise ConfigError(f"--config {path}: nested too deeply to be a config") from None
    by_key = {
        option.lstrip("-"): action
        for action in actions
        for option in action.option_strings
        if option.startswith("--") and option.lstrip("-") not in _NOT_KEYS
    }
    command = data.pop("command", None)
    if command is not None and not (
        isinstance(command, list)
        and command
        and all(isinstance(a, str) and len(a) <= MAX_STRING for a in command)
    ):
        raise ConfigError(f'{path}: command must be a list of strings, e.g. ["vllm", "serve"]')
    defaults: dict[str, Any] = {}
    for key, value in data.items():
        action = by_key.get(key.replace("_", "-"))
        if action is None:
            known = ", ".join(sorted(by_key))
            raise ConfigError(f"{path}: unknown key {key!r}: the keys are command, {known}")
        defaults[action.dest] = _value(path, key, action, value)
    return defaults, command


def _value(path: str, key: str, action: argparse.Action, value: Any) -> Any:
    shown = _shown(value)
    if isinstance(action, argparse.BooleanOptionalAction):  # on, off (or left to decide)
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {key} must be true or false, not {shown}")
        return not value if key.replace("_", "-").startswith("no-") else value
    if isinstance(action.nargs, int) and action.nargs > 1:  # several values at once
        if not (
            isinstance(value, list)
            and len(value) == action.nargs
            and all(_short_str(v) for v in value)
        ):
            count = action.nargs
            raise ConfigError(f"{path}: {key} must be a list of {count} strings, not {shown}")
        return tuple(value)
    if isinstance(action, argparse._StoreConstAction):  # store_true / store_false
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: {key} must be true or false, not {shown}")
        return action.const if value else action.default
    if action.dest == "devices":
        if isinstance(value, list) and all(isinstance(v, str | int) for v in value):
            return tuple(str(v) for v in value)
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise ConfigError(f'{path}: devices must be a list such as ["0", "1"], not {shown}')
        value = str(value)
    if isinstance(action, argparse._AppendAction):  # repeatable options: a list of strings
        if not (isinstance(value, list) and all(_short_str(v) for v in value)):
            raise ConfigError(f"{path}: {key} must be a list of strings, not {shown}")
        return list(value)
    if action.type in (None, str) and not _short_str(value):
        raise ConfigError(
            f"{path}: {key} must be a string of at most {MAX_STRING} characters, not {shown}"
        )
    if action.type in (int, float) and isinstance(value, str):
        # TOML has numbers: "2" is a string, as the README says a wrong type is refused.
        kind = "a whole number" if action.type is int else "a number of seconds"
        raise ConfigError(f"{path}: {key} must be {kind}, not the string {shown}")
    if isinstance(value, str) and action.type is not None and action.type is not str:
        try:
            value = action.type(value)  # type: ignore[operator]
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{path}: {key} = {shown} is not valid: {exc}") from exc
    if action.type is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{path}: {key} must be a whole number, not {shown}")
    if action.type is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: {key} must be a number of seconds, not {shown}")
        value = float(value)
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ConfigError(f"{path}: {key} must be one of {choices}, not {shown}")
    return value


def _short_str(value: Any) -> bool:
    return isinstance(value, str) and len(value) <= MAX_STRING


def _shown(value: Any) -> str:
    """`value` for a message: a 10 MB string must not become a 10 MB error line."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"
