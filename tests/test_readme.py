"""The README's shell examples run as written in a fresh shell after the quick start: every
program they call is the venv's by path (and exists), a file of the checkout, or a tool the
reader brings; every extra they name exists. So the docs cannot rot again."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()

#: Programs a reader brings, each named where the README uses it: the shell's own words,
#: coreutils and friends, and the tools of the platforms it deploys on.
BROUGHT = frozenset({
    "python3", "sudo", "kill", "mkdir", "tail", "cat", "echo", "while", "do", "done", "true",
    "curl", "jq", "grep", "kubectl", "systemctl", "useradd", "install", "promtool",
    "systemd-analyze",
})  # fmt: skip
#: Programs of the venv that only a server's own install puts there (the README says so).
SERVERS = frozenset(
    {".venv/bin/vllm", "/opt/trio-dpsup/.venv/bin/pip", "/usr/local/bin/llama-server"}
)
#: Our own programs: never bare (not on a fresh shell's PATH), always by the venv's path.
OURS = frozenset({"trio-dpsup", "python", "pip", "pytest"})


def shell_blocks() -> list[str]:
    return re.findall(r"```(?:sh|bash)\n(.*?)```", README, flags=re.S)


def commands(block: str) -> list[list[str]]:
    """Each simple command of `block` (continuations joined, comments dropped, split at
    ``&&``, ``||``, ``|`` and ``;``; a command substitution is a command too), with the
    rank command after ``--`` as a command of its own."""
    text = re.sub(r"\\\n\s*", " ", block)
    lines: list[str] = []
    for line in text.splitlines():
        line = re.sub(r"\s#\s.*$", "", line).strip()
        if not line or line.startswith("#"):
            continue
        line = re.sub(r"\d*>&\d+", "", line)  # 2>&1: a redirection, not a command
        lines.extend(re.findall(r"\$\((.*?)\)", line))  # run as commands of their own
        lines.append(re.sub(r"\$\(.*?\)", "SUBSTITUTED", line))
    found: list[list[str]] = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;")
        lexer.whitespace_split = True
        command: list[str] = []
        for token in [*lexer, ";"]:
            if token.strip("|&;"):
                command.append(token)
                continue
            while command and re.fullmatch(r"\w+=.*", command[0]):  # v=... assignments
                command = command[1:]
            if "--" in command:
                at = command.index("--")
                found.extend([command[:at], command[at + 1 :]])
            elif command:
                found.append(command)
            command = []
    return [c for c in found if c]


def program_of(command: list[str]) -> str:
    return command[1] if command[0] == "sudo" and len(command) > 1 else command[0]


def test_the_readme_has_shell_examples() -> None:
    assert len(shell_blocks()) >= 10
    assert sum(len(commands(b)) for b in shell_blocks()) >= 30


@pytest.mark.parametrize("block", shell_blocks(), ids=lambda b: b.splitlines()[0][:50])
def test_every_program_resolves_after_the_quick_start(block: str) -> None:
    for command in commands(block):
        program = program_of(command)
        if program in BROUGHT or program in SERVERS:
            continue
        assert program not in OURS, f"{program} is not on a fresh shell's PATH: {command}"
        assert "/" in program, f"unknown program {program!r} in {command}: add it to BROUGHT?"
        # The venv the quick start made, or a file of the checkout.
        assert (ROOT / program).exists() or program.startswith("/opt/trio-dpsup/"), command


def test_every_extra_named_exists() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    named = set(re.findall(r"\.\[([\w-]+)\]", README)) | set(
        re.findall(r"trio-dpsup\[(\w+)\]", README)
    )
    assert {"test", "bench", "harness", "debug"} <= named | set(extras)
    assert named <= set(extras), f"extras the README names that do not exist: {named - set(extras)}"


def test_nothing_installs_from_an_index_that_has_no_release() -> None:
    # There is no release: `pip install trio-dpsup` would find nothing (or someone else's).
    assert not re.search(r"pip install ['\"]?trio-dpsup", README)
