"""Stand-ins for ``vllm`` and ``python -m sglang.launch_server``, for testing presets where
neither is installed.

`install_fake_servers(directory)` writes an executable ``vllm`` and a package ``sglang``
there and returns the PATH and PYTHONPATH that find them. Each fake records its argv and
CUDA_VISIBLE_DEVICES as one JSON line in the file named by TRIO_DPSUP_FAKE_ARGV_FILE, then
serves ``/health`` on its ``--host`` and ``--port`` as the fake rank does.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .fake_rank import main as fake_rank_main

__all__ = ["ARGV_FILE_ENV", "install_fake_servers", "read_recorded_argv", "serve_fake"]

#: Where the fakes record their command lines.
ARGV_FILE_ENV = "TRIO_DPSUP_FAKE_ARGV_FILE"


def serve_fake(name: str, argv: Sequence[str]) -> None:
    """Record `argv` (the fake's own, after the program name), then serve as a fake rank."""
    path = os.environ.get(ARGV_FILE_ENV)
    if path:
        entry = {
            "server": name,
            "argv": list(argv),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        }
        with open(path, "a") as f:
            f.write(json.dumps(entry) + "\n")
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    known, _ = parser.parse_known_args(argv)
    # /metrics as the real server names it, so the presets' metric names are exercised.
    fake_rank_main(["--host", known.host, "--port", str(known.port), "--metric-names", name])


def install_fake_servers(directory: str | os.PathLike[str]) -> Mapping[str, str]:
    """Write ``vllm`` and ``sglang.launch_server`` into `directory`; return the environment
    (PATH, PYTHONPATH) under which a supervisor's ranks find them."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vllm = directory / "vllm"
    vllm.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "from trio_dpsup.testing.fake_servers import serve_fake\n"
        "assert sys.argv[1] == 'serve', sys.argv\n"
        "serve_fake('vllm', sys.argv[1:])\n"
    )
    vllm.chmod(0o755)
    package = directory / "sglang"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "launch_server.py").write_text(
        "import sys\n"
        "from trio_dpsup.testing.fake_servers import serve_fake\n"
        "serve_fake('sglang', sys.argv[1:])\n"
    )
    paths = [str(directory), os.environ.get("PYTHONPATH", "")]
    return {
        "PATH": f"{directory}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
    }


def read_recorded_argv(path: Path) -> list[dict[str, object]]:
    """The entries the fakes recorded, in the order they started."""
    return [json.loads(line) for line in path.read_text().splitlines()]
