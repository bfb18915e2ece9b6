"""The fake rank's generation and load faults, each against the fake rank as a real process
over HTTP on loopback: ``POST /v1/completions`` answers in vLLM's shape and counts in
flight; ``generate-hang`` and ``generate-error`` break generation only; ``--load-seconds``
shows progress (disk reads, output lines) and then comes up; ``--load-wedge`` spins and
never does."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import psutil
import pytest
import trio

from trio_dpsup.testing import FAKE_RANK, Fault, FaultKind, free_port_range, inject_fault

#: Bounds, not expectations: what a loaded two-core machine may take.
START_TIMEOUT = 20.0


@dataclass
class FakeRank:
    """A fake rank process, its port and what it wrote to stdout."""

    process: trio.Process
    port: int
    started: float  # time.monotonic() just before it was spawned
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def health(self) -> int:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            return (await client.get(f"{self.url}/health")).status_code

    async def complete(self, timeout: float = 5.0, **body: Any) -> httpx.Response:  # noqa: ASYNC109
        body = {"model": "fake", "prompt": "Say one word.", "max_tokens": 1, **body}
        async with httpx.AsyncClient(trust_env=False, timeout=timeout) as client:
            return await client.post(f"{self.url}/v1/completions", json=body)

    async def metrics(self) -> tuple[float, float]:
        """(in flight, tokens) from /metrics."""
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            text = (await client.get(f"{self.url}/metrics")).text
        samples = [line.split() for line in text.splitlines() if not line.startswith("#")]
        values = {name.split("{")[0]: value for name, value in samples}
        return float(values["fake:requests_running"]), float(values["fake:tokens_total"])

    def read_bytes(self) -> int:
        """What it read from the storage layer (/proc/PID/io read_bytes)."""
        return int(psutil.Process(self.process.pid).io_counters().read_bytes)

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system


@asynccontextmanager
async def open_fake_rank(*args: str) -> AsyncIterator[FakeRank]:
    """The fake rank with `args`, once it answers HTTP (any status); killed on the way out."""
    port = free_port_range(1)
    started = time.monotonic()
    process = await trio.lowlevel.open_process(
        [*FAKE_RANK, "--port", str(port), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )
    rank = FakeRank(process, port, started)

    async def pump() -> None:
        assert process.stdout is not None
        buffer = b""
        async for chunk in process.stdout:
            *complete, buffer = (buffer + chunk).split(b"\n")
            rank.lines += [line.decode() for line in complete]

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            with trio.fail_after(START_TIMEOUT):
                while True:
                    try:
                        await rank.health()
                        break
                    except httpx.TransportError:
                        await trio.sleep(0.02)  # pacing: nothing to wait on until it listens
            yield rank
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            process.kill()
            await process.wait()


async def wait_for(predicate: Any, what: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Poll the async `predicate` until it holds, bounded by `timeout`."""
    with trio.move_on_after(timeout):
        for _ in range(int(timeout / 0.02) + 1):
            if await predicate():
                return
            await trio.sleep(0.02)  # pacing the polls
    raise AssertionError(f"not within {timeout:g}s: {what}")


# -- the generation endpoint ----------------------------------------------------------------


async def test_a_completion_answers_in_vllms_shape_and_counts_its_token() -> None:
    async with open_fake_rank("--served-model-name", "tiny", "--api-key", "k") as rank:
        headers = {"Authorization": "Bearer k"}
        async with httpx.AsyncClient(trust_env=False, timeout=5, headers=headers) as client:
            body = {"model": "tiny", "prompt": "Say one word.", "max_tokens": 1}
            response = await client.post(f"{rank.url}/v1/completions", json=body)
            assert response.status_code == 200, response.text
            answer = response.json()
            assert answer["id"].startswith("cmpl-")
            assert (answer["object"], answer["model"]) == ("text_completion", "tiny")
            assert isinstance(answer["created"], int)
            (choice,) = answer["choices"]
            assert choice == {
                "index": 0,
                "text": " ok",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
            assert answer["usage"] == {
                "prompt_tokens": 3,
                "total_tokens": 4,
                "completion_tokens": 1,
            }
            assert await rank.metrics() == (0.0, 1.0)

            streamed = await client.post(
                f"{rank.url}/v1/completions", json={**body, "max_tokens": 2, "stream": True}
            )
            assert streamed.status_code == 200
            events = [e for e in streamed.text.split("\n\n") if e]
            assert events[-1] == "data: [DONE]"
            chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
            reasons = [c["choices"][0]["finish_reason"] for c in chunks]
            assert reasons == [None, "length"]
            assert await rank.metrics() == (0.0, 3.0)

            other = await client.post(f"{rank.url}/v1/completions", json={**body, "model": "x"})
            assert other.status_code == 404
            assert other.json()["error"]["message"] == "The model `x` does not exist."
        # The key guards generation as vLLM's --api-key does; health stays open.
        assert (await rank.complete(model="tiny")).status_code == 401
        assert await rank.health() == 200


async def test_bad_completion_requests_are_the_requests_errors() -> None:
    async with open_fake_rank() as rank:
        assert (await rank.complete(max_tokens=0)).status_code == 400
        assert (await rank.complete(max_tokens="1")).status_code == 400
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            url = f"{rank.url}/v1/completions"
            assert (await client.post(url, content=b"{not json")).status_code == 400
        # A body over 1 MiB is refused by its length, unread.
        stream = await trio.open_tcp_stream("127.0.0.1", rank.port)
        async with stream:
            await stream.send_all(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\n\r\n"
            )
            with trio.fail_after(5):
                head = await stream.receive_some()
            assert head.startswith(b"HTTP/1.1 413 "), head
        assert (await rank.complete()).status_code == 200  # still serving


async def test_a_completion_is_in_flight_while_it_runs() -> None:
    async with open_fake_rank("--token-seconds", "1") as rank:
        answers: list[httpx.Response] = []
        async with trio.open_nursery() as nursery:

            async def complete() -> None:
                answers.append(await rank.complete(max_tokens=2))

            nursery.start_soon(complete)

            async def in_flight() -> bool:
                return (await rank.metrics())[0] == 1.0

            await wait_for(in_flight, "the completion in the busy gauge", timeout=1.5)
            assert not answers, "the completion ended before its 2 s"
        assert [a.status_code for a in answers] == [200]
        assert await rank.metrics() == (0.0, 2.0)


# -- generation faults ----------------------------------------------------------------------


async def test_generate_hang_leaves_health_up_and_the_completion_in_flight() -> None:
    async with open_fake_rank() as rank:
        await inject_fault(rank.port, Fault.generate_hang())
        assert await rank.health() == 200
        began = trio.current_time()
        with pytest.raises(httpx.ReadTimeout):
            await rank.complete(timeout=1.0)
        assert 1.0 <= trio.current_time() - began < 3.0
        assert await rank.health() == 200
        # The hung request stays in flight (its client gone, as a hung engine's would) and
        # no token moves: busy and not progressing.
        assert await rank.metrics() == (1.0, 0.0)
        with pytest.raises(httpx.ReadTimeout):
            await rank.complete(timeout=0.5)
        assert await rank.metrics() == (2.0, 0.0)


async def test_generate_hang_for_a_count_of_requests_then_answers() -> None:
    async with open_fake_rank() as rank:
        await inject_fault(rank.port, Fault.generate_hang(count=1))
        with pytest.raises(httpx.ReadTimeout):
            await rank.complete(timeout=0.5)
        assert (await rank.complete()).status_code == 200


async def test_generate_error_fails_generation_only() -> None:
    async with open_fake_rank() as rank:
        await inject_fault(rank.port, Fault.generate_error())
        for _ in range(2):
            response = await rank.complete()
            assert response.status_code == 500
            error = response.json()["error"]
            assert (error["code"], error["type"]) == (500, "InternalServerError")
            assert "generate-error" in error["message"]
        assert await rank.health() == 200
        assert await rank.metrics() == (0.0, 0.0)

        await inject_fault(rank.port, Fault.generate_error(503, count=1))
        assert (await rank.complete()).status_code == 503
        assert (await rank.complete()).status_code == 200


def test_generation_faults_are_spelled_as_their_paths() -> None:
    fault = Fault.generate_error(503, count=2)
    assert fault.url(8000) == "http://127.0.0.1:8000/fault/generate-error?status=503&count=2"
    assert Fault.from_request(fault.path, fault.query()) == fault
    hang = Fault.generate_hang()
    assert (hang.path, hang.query()) == ("/fault/generate-hang", {})
    assert Fault.from_request("/fault/generate-hang", {"count": "3"}) == Fault(
        FaultKind.GENERATE_HANG, count=3
    )


# -- the load -------------------------------------------------------------------------------


async def test_load_seconds_reads_and_says_so_then_becomes_ready() -> None:
    async with open_fake_rank("--load-seconds", "2") as rank:
        assert await rank.health() == 503
        assert (await rank.complete()).status_code == 503
        read_before = rank.read_bytes()

        async def healthy() -> bool:
            return await rank.health() == 200

        await wait_for(healthy, "ready after its load", timeout=10)
        ready_after = time.monotonic() - rank.started
        grown = rank.read_bytes() - read_before
        loading = [line for line in rank.lines if "loading the model" in line]
        assert 2.0 <= ready_after < 15.0  # not before its load ends (a loaded machine: later)
        # A step every 0.2 s, each 256 KiB from the disk: 10 in 2 s, some of them before
        # the first sample.
        assert grown >= 1 << 20, f"read_bytes grew by {grown} only"
        assert len(loading) >= 5, rank.lines
        assert (await rank.complete()).status_code == 200


async def test_load_wedge_spins_and_never_becomes_ready() -> None:
    async with open_fake_rank("--load-wedge") as rank:
        cpu, read = rank.cpu_seconds(), rank.read_bytes()
        polls = 0
        # Until it has burnt 0.4 s of CPU: a loaded machine gives it a smaller share of a
        # core, so the measure is the CPU it spent, not a window of wall time.
        with trio.fail_after(30):
            while rank.cpu_seconds() - cpu < 0.4 or polls < 3:
                assert await rank.health() == 503
                polls += 1
                await trio.sleep(0.1)  # pacing the polls
        assert rank.read_bytes() == read
        assert rank.lines == []
        assert (await rank.complete()).status_code == 503


def test_load_seconds_and_load_wedge_exclude_each_other() -> None:
    args = ["--port", "1", "--load-seconds", "1", "--load-wedge"]
    result = subprocess.run([*FAKE_RANK, *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr
