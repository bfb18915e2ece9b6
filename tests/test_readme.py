"""The docs' shell examples run as written in a fresh shell after the quick start.

Every block of README.md, CONTRIBUTING.md and docs/*.md (the dated GPU records excepted) is
checked statically: every program it calls is the venv's by path (and exists), a file of the
checkout, or a tool the reader brings; every option of ``trio-dpsup`` (and ``trio-dpsup
ctl``) parses; every extra named exists; every relative link and anchor resolves. Blocks
marked runnable (a fence opened with ```` ```sh runnable ````, see CONTRIBUTING.md) also run,
in order, each in a fresh shell with a time limit, and must stop whatever they started.
So the docs cannot rot again."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shlex
import signal
import socket
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# The docs' command lines are parsed by the CLI's own parsers, as the CLI would parse them.
from trio_dpsup._cli import build_parser
from trio_dpsup._plane.ctl import _parser as ctl_parser

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
#: The pages checked, README first: the order in which runnable blocks run.
PAGES = [
    ROOT / "README.md",
    ROOT / "CONTRIBUTING.md",
    *sorted(p for p in (ROOT / "docs").glob("*.md") if not p.name.startswith("gpu-record-")),
]

#: Programs a reader brings, each named where the docs use it: the shell's own words,
#: coreutils and friends, and the tools of the platforms it deploys on.
BROUGHT = frozenset({
    "python3", "sudo", "kill", "mkdir", "tail", "cat", "echo", "while", "do", "done", "true",
    "curl", "jq", "grep", "kubectl", "systemctl", "useradd", "install", "promtool",
    "systemd-analyze", "mktemp", "rm", "wait", "export", "for", "ls", "follow", "{", "}",
    "haproxy",
})  # fmt: skip
#: Programs of the venv that only a server's own install puts there (the docs say so).
#: (A bare ``vllm`` is the stand-in of trio_dpsup.testing.fake_servers, put on PATH.)
SERVERS = frozenset(
    {".venv/bin/vllm", "/opt/trio-dpsup/.venv/bin/pip", "/usr/local/bin/llama-server",
     "llama-server", "vllm"}
)  # fmt: skip
#: Our own programs: never bare (not on a fresh shell's PATH), always by the venv's path.
OURS = frozenset({"trio-dpsup", "python", "pip", "pytest"})
#: How long one runnable block may take (the slowest, a rolling restart of 8 ranks, takes
#: about 15 s on 2 busy cores).
BLOCK_TIMEOUT = 120
#: The ports the runnable blocks use: the defaults (ranks from 8000, control plane 9000)
#: and sgl-router's.
BLOCK_PORTS = (*range(8000, 8008), 9000, 30000)


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    text: str
    runnable: bool

    @property
    def id(self) -> str:
        first = self.text.splitlines()[0][:40] if self.text.strip() else ""
        return f"{self.page.relative_to(ROOT)}:{self.line}:{first}"


def blocks(pages: list[Path] = PAGES) -> list[Block]:
    found = []
    for page in pages:
        text = page.read_text()
        for match in re.finditer(r"^```(sh|bash)( runnable)?\n(.*?)^```", text, flags=re.S | re.M):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(page, line, match.group(3), bool(match.group(2))))
    return found


def shell_blocks() -> list[str]:
    return [b.text for b in blocks()]


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


def test_the_docs_have_shell_examples() -> None:
    assert len(shell_blocks()) >= 10
    assert sum(len(commands(b)) for b in shell_blocks()) >= 30
    assert sum(b.runnable for b in blocks()) >= 5


@pytest.mark.parametrize("block", blocks(), ids=lambda b: b.id)
def test_every_program_resolves_after_the_quick_start(block: Block) -> None:
    for command in commands(block.text):
        program = program_of(command)
        if program in BROUGHT or program in SERVERS:
            continue
        assert program not in OURS, f"{program} is not on a fresh shell's PATH: {command}"
        assert "/" in program, f"unknown program {program!r} in {command}: add it to BROUGHT?"
        # The venv the quick start made, or a file of the checkout.
        assert (ROOT / program).exists() or program.startswith("/opt/trio-dpsup/"), command


@pytest.mark.parametrize("block", blocks(), ids=lambda b: b.id)
def test_every_option_of_ours_parses(block: Block) -> None:
    for command in commands(block.text):
        if not program_of(command).endswith("trio-dpsup"):
            continue
        args = command[2:] if command[0] == "sudo" else command[1:]
        ctl = args[:1] == ["ctl"]
        parser = ctl_parser() if ctl else build_parser()
        try:
            parser.parse_args(args[1:] if ctl else args)
        except SystemExit:
            pytest.fail(f"{block.id}: does not parse: {shlex.join(command)}")


def test_every_extra_named_exists() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    text = "".join(page.read_text() for page in PAGES)
    named = set(re.findall(r"\.\[([\w-]+)\]", text)) | set(re.findall(r"trio-dpsup\[(\w+)\]", text))
    assert {"test", "bench", "harness", "debug"} <= named | set(extras)
    assert named <= set(extras), f"extras the docs name that do not exist: {named - set(extras)}"


def test_nothing_installs_from_an_index_that_has_no_release() -> None:
    # There is no release: `pip install trio-dpsup` would find nothing (or someone else's).
    for page in PAGES:
        assert not re.search(r"pip install ['\"]?trio-dpsup", page.read_text()), page


def test_the_readme_reads_in_five_minutes() -> None:
    assert README.count("\n") <= 300
    # .ci/run runs this line verbatim.
    assert (
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/python -m pytest"
        in README
    )
    for page in ("operating", "failures", "presets", "routers", "across-nodes", "deployment",
                 "security", "library", "performance", "architecture"):  # fmt: skip
        assert f"(docs/{page}.md)" in README, page


def _anchors(text: str) -> set[str]:
    """GitHub's anchors for the headings of `text`."""
    found = set()
    fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (m := re.match(r"#{1,6} (.*)", line)):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            found.add(slug)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_and_anchor_resolves(page: Path) -> None:
    text = page.read_text()
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"\w+:", target):
            continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists(), f"{page.name}: {target}: no such file"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file.read_text()), f"{page.name}: {target}: no such heading"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_long_page_has_contents(page: Path) -> None:
    text = page.read_text()
    if text.count("\n") > 60:
        assert "Contents:" in text, f"{page.name} passes a screen: give it a table of contents"


# -- the runnable blocks


#: The machine's lock on BLOCK_PORTS: two suites at once (or two checkouts) take turns with
#: the blocks, which use the docs' fixed ports, instead of both finding them free and then
#: colliding.
PORTS_LOCK = Path(tempfile.gettempdir()) / "trio-dpsup-docs-ports.lock"
#: The longest a block waits for the other suite's block to end (a block takes 4 s at most
#: on 2 busy cores; BLOCK_TIMEOUT bounds it).
LOCK_WAIT = BLOCK_TIMEOUT + 30


@contextlib.contextmanager
def _docs_ports() -> Iterator[None]:
    """Hold PORTS_LOCK (an exclusive flock, released when the file is closed, also by a
    killed holder); skip where another holder keeps it past LOCK_WAIT."""
    with open(PORTS_LOCK, "a") as lock:
        deadline = time.monotonic() + LOCK_WAIT
        while True:  # bounded by the deadline
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.skip(f"the docs' ports stayed locked ({PORTS_LOCK}) by another run")
                time.sleep(0.1)  # pacing the tries: a flock has no timeout of its own
        yield


def _port_taken(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


@pytest.mark.parametrize("block", [b for b in blocks() if b.runnable], ids=lambda b: b.id)
def test_a_runnable_block_runs_in_a_fresh_shell(block: Block) -> None:
    assert not re.search(r"\bsleep\b", block.text), "wait for a condition, not for a time"
    if not (ROOT / ".venv" / "bin" / "trio-dpsup").exists():
        pytest.skip("no .venv in the checkout: the docs' blocks run after the quick start")
    with _docs_ports():
        taken = [port for port in BLOCK_PORTS if _port_taken(port)]
        if taken:
            pytest.skip(f"ports the docs' examples use are taken here: {taken}")
        ran = run_block(block.text, BLOCK_TIMEOUT)
    assert not ran.overran, f"{block.id}: still running after {BLOCK_TIMEOUT} s:\n{ran.out}"
    assert ran.returncode == 0, f"{block.id}: exit {ran.returncode} in {ran.took:.1f} s:\n{ran.out}"
    assert not ran.left, f"{block.id}: left a process running (stop what you start):\n{ran.out}"
    print(f"{block.id}: {ran.took:.1f} s")


@dataclass(frozen=True)
class Ran:
    returncode: int | None
    out: str
    took: float
    #: Whether it was still running at its time limit.
    overran: bool
    #: Whether a process it started was still running when it ended.
    left: bool


def run_block(text: str, timeout: float) -> Ran:
    """Run `text` as a fresh shell would, in a process group of its own (what it starts in
    the background stays in it), then kill whatever of the group is left."""
    # A fresh shell: nothing activated, the venv's programs only by path; errors stop it.
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
    }
    with tempfile.TemporaryFile("w+") as out:
        shell = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", "-c", text],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        started = time.monotonic()
        overran = False
        try:
            shell.wait(timeout=timeout)  # the shell, not its output: a leftover may hold that
        except subprocess.TimeoutExpired:
            overran = True
        took = time.monotonic() - started
        left = not overran and _group_alive(shell.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
        out.seek(0)
        return Ran(shell.returncode if not overran else None, out.read(), took, overran, left)


def _group_alive(pgid: int) -> bool:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, 0)
        return True
    return False


def test_the_block_runner_fails_a_block_that_leaves_a_process_or_overruns() -> None:
    python = ROOT / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip("no .venv in the checkout")
    wait = f"{python} -c 'import time; time.sleep(30)'"
    left = run_block(f"{wait} > /dev/null &\necho started", 30)
    assert (left.returncode, left.out, left.left, left.overran) == (0, "started\n", True, False)
    overran = run_block(wait, 0.5)
    assert overran.overran
    assert run_block("false\necho not reached", 30).returncode == 1  # -e: an error stops it


def test_every_option_and_endpoint_has_an_example() -> None:
    used: set[str] = set()
    texts = []
    for block in blocks():
        texts.append(block.text)
        for command in commands(block.text):
            if program_of(command).endswith("trio-dpsup"):
                used |= {arg.split("=")[0] for arg in command if arg.startswith("--")}
    options = {o for a in build_parser()._actions for o in a.option_strings if o[:2] == "--"}
    missing = options - used - {"--help", "--version"}
    assert not missing, f"options with no example in any shell block of the docs: {missing}"
    every = "".join(texts)
    for endpoint in ("/livez", "/startupz", "/ready", "/readyz", "/health", "/ranks/1/ready",
                     "/metrics", "/ranks?wait=", "/prometheus/targets", "/status"):  # fmt: skip
        assert f"localhost:9000{endpoint}" in every or endpoint in every, endpoint


@pytest.mark.parametrize("block", [b for b in blocks() if not b.runnable], ids=lambda b: b.id)
def test_a_background_start_says_how_to_stop_it(block: Block) -> None:
    # Runnable blocks are held to it by running them; the others must say so.
    if re.search(r"[^&]&\s*($|#)", block.text, flags=re.M):
        assert "kill" in block.text, f"{block.id}: a background start, and no word of its stop"


@pytest.mark.parametrize("block", [b for b in blocks() if not b.runnable], ids=lambda b: b.id)
def test_every_loop_ends(block: Block) -> None:
    # A loop in a block that does not run could spin for ever unseen: run it (mark the block
    # runnable), so that the test holds its end.
    assert not re.search(r"^\s*(while|until)\b", block.text, flags=re.M), block.id
