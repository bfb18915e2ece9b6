"""The examples show something: the demo rank says what it does (so the `--log-dir` and JSON
log examples have rank lines to show), a client's reset at shutdown prints no traceback in
the demo, the fake rank or the stand-in vLLM/SGLang servers (all one server class), and the
embedding example is clean under a user's `mypy --strict`."""

from __future__ import annotations

import http.client
import importlib.util
import io
import signal
import subprocess
import sys
from contextlib import redirect_stderr
from pathlib import Path

import pytest

from trio_dpsup.demo import DemoServer
from trio_dpsup.testing._ports import free_port_range
from trio_dpsup.testing.fake_rank import FaultServer

ROOT = Path(__file__).parent.parent


def test_the_demo_rank_logs_its_start_and_every_request_but_its_health_path() -> None:
    port = free_port_range(1)
    demo = subprocess.Popen(
        [sys.executable, "-m", "trio_dpsup.demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert demo.stdout is not None
        first = demo.stdout.readline()  # written once it listens: no sleep needed
        assert first.startswith(f"demo rank listening on http://127.0.0.1:{port} (pid ")
        client = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        for path in ("/health", "/", "/nothing", "/health?verbose=1"):
            client.request("GET", path)
            client.getresponse().read()
        client.close()
    finally:
        demo.send_signal(signal.SIGTERM)
        out, err = demo.communicate(timeout=10)
    assert demo.returncode == 0
    assert out.splitlines() == ["GET / 200", "GET /nothing 404"]
    assert err == ""


@pytest.mark.parametrize("server_class", [DemoServer, FaultServer], ids=["demo", "fake-rank"])
def test_a_client_reset_is_no_traceback_but_a_real_error_is(
    server_class: type[DemoServer],
) -> None:
    # The stand-in vLLM and SGLang servers (testing/fake_servers.py) are fake ranks.
    server = server_class("127.0.0.1", 0, "/health", 0.0, None)
    try:
        for error, shown in ((ConnectionResetError(104, "reset"), False), (ValueError(), True)):
            printed = io.StringIO()
            with redirect_stderr(printed):
                try:
                    raise error
                except Exception:
                    server.handle_error(None, ("127.0.0.1", 1))
            assert ("Traceback" in printed.getvalue()) is shown, printed.getvalue()
    finally:
        server.server_close()


@pytest.mark.skipif(importlib.util.find_spec("mypy") is None, reason="mypy is not installed")
def test_the_embedding_example_passes_mypy_strict_as_a_user_runs_it(tmp_path: Path) -> None:
    # As in a user's project: --strict on the files alone, not this project's configuration.
    # The package is read from this checkout, so its own untyped import (NVML's bindings)
    # is excused, as mypy excuses an installed package's.
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nstrict = True\n[mypy-pynvml]\nignore_missing_imports = True\n")
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config), "--no-incremental",
         "examples/embed.py", "examples/test_my_deployment.py"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
