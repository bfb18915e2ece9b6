"""The prober: a suspect rank is confirmed (or cleared) by quick probes, explicit failure
answers fail at once, and the probe's own HTTP client reads what servers send."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Unpack

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from trio_dpsup import ConfigError, Preset, RankUnhealthy, SupervisorConfig, SupervisorState

# The probe settings' own rule, and the probe client, on purpose.
from trio_dpsup._config.concerns import ProbeSettings, derive
from trio_dpsup._ranks.http_probe import MAX_HEADER, HttpProbe
from trio_dpsup.testing import Deployment, Form, Harness, SupervisorSettings

from .conftest import FORMS

pytest_plugins = ["trio_dpsup.testing.plugin"]


def slow_probes(**more: Unpack[SupervisorSettings]) -> SupervisorSettings:
    """Probes 5 s apart: without confirmation three failures would take 10 s or more."""
    return {"probe_interval": 5.0, "failure_threshold": 3, "suspect_interval": 0.05, **more}


@FORMS
async def test_a_failure_is_confirmed_by_quick_probes(dpsup: Harness, form: Form) -> None:
    deployment = await dpsup.start(2, form=form, **slow_probes())
    await deployment.fail_health(1, 500)
    # The next interval's probe sees it; two confirmations follow 50 ms apart, not 5 s.
    with trio.fail_after(5 + 3):
        await deployment.wait_for_state(SupervisorState.STOPPING)
    failure = await deployment.failure()
    assert isinstance(failure, RankUnhealthy)
    assert (failure.rank, failure.failures, failure.last_error) == (1, 3, "HTTP 500")


async def test_a_single_blip_does_not_fail_a_rank(dpsup: Harness) -> None:
    deployment = await dpsup.start(1, probe_interval=0.2, failure_threshold=3)
    await deployment.fail_health(0, 503, count=1)
    with trio.fail_after(10):  # the failed probe is counted; a healthy one clears it
        for _ in range(200):  # the counter is what we wait for; no event tells of it
            if await failed_probes(deployment) >= 1:
                break
            await trio.sleep(0.05)  # pacing the scrapes
        status = await deployment.wait_for_status(
            lambda s: (p := s.ranks[0].last_probe) is not None and p.ok, "a healthy probe"
        )
    assert status.state is SupervisorState.READY
    assert status.ranks[0].consecutive_failures == 0
    assert await failed_probes(deployment) == 1


async def failed_probes(deployment: Deployment) -> float:
    """trio_dpsup_probe_failures_total of rank 0, from /metrics."""
    async with httpx.AsyncClient(trust_env=False) as client:
        text = (await client.get(f"{deployment.control_url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "trio_dpsup_probe_failures_total" and sample.labels == {"rank": "0"}:
                return sample.value
    return 0.0


@FORMS
async def test_an_explicit_failure_status_fails_at_once(dpsup: Harness, form: Form) -> None:
    deployment = await dpsup.start(2, form=form, **slow_probes(fail_on_status=("5xx",)))
    await deployment.fail_health(0, 503)
    with trio.fail_after(5 + 3):
        await deployment.wait_for_state(SupervisorState.STOPPING)
    failure = await deployment.failure()
    assert isinstance(failure, RankUnhealthy)
    assert (failure.rank, failure.failures) == (0, 1)
    assert failure.last_error == "HTTP 503 (--fail-on-status)"


async def test_other_statuses_still_count_to_the_threshold(dpsup: Harness) -> None:
    deployment = await dpsup.start(1, **slow_probes(fail_on_status=("503",)))
    await deployment.fail_health(0, 500)
    with trio.fail_after(5 + 3):
        await deployment.wait_for_state(SupervisorState.STOPPING)
    failure = await deployment.failure()
    assert isinstance(failure, RankUnhealthy)
    assert failure.failures == 3


def test_fail_on_status_values_and_the_vllm_default() -> None:
    config = SupervisorConfig(command=("x",), fail_on_status=("503", "4xx"))
    probes = derive(ProbeSettings, config)
    assert [probes.fails_at_once(s) for s in (503, 500, 404, 200)] == [True, False, True, False]
    vllm = SupervisorConfig(command=("vllm", "serve", "m"), preset=Preset.VLLM)
    assert vllm.fail_on_status == ("503",)
    sglang = SupervisorConfig(command=("x",), preset=Preset.SGLANG)
    assert sglang.fail_on_status == ()
    with pytest.raises(ConfigError, match="--fail-on-status '5x3': give a status such as 503"):
        SupervisorConfig(command=("x",), fail_on_status=("5x3",))
    with pytest.raises(ConfigError, match="SGLang's /health answers after at least 1 second"):
        SupervisorConfig(command=("x",), preset=Preset.SGLANG, probe_timeout=1.0)


# -- the probe's HTTP client, against scripted servers ----------------------------------------


async def serve_script(
    nursery: trio.Nursery, answer: Callable[[int], bytes], close_after: bool = False
) -> tuple[int, list[int]]:
    """A server on a free loopback port that answers each request on a connection with
    `answer(n)` (n counts requests over all connections). Returns the port and a list that
    grows by one per connection accepted."""
    connections: list[int] = []
    served = [0]

    async def handle(stream: trio.SocketStream) -> None:
        connections.append(1)
        buffer = b""
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        return
                    buffer += chunk
                _, _, buffer = buffer.partition(b"\r\n\r\n")
                served[0] += 1
                await stream.send_all(answer(served[0]))
                if close_after:
                    return

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], connections


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n", 200),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n1;x=y\r\n\n\r\n"
         b"0\r\nTrailer: t\r\n\r\n", 200),
        (b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", 503),
        (b"HTTP/1.1 204 No Content\r\n\r\n", 204),
    ],
)  # fmt: skip
async def test_keep_alive_answers_are_read_whole(body: bytes, status: int) -> None:
    async with trio.open_nursery() as nursery:
        port, connections = await serve_script(nursery, lambda n: body)
        probe = HttpProbe("127.0.0.1", port, "/health")
        results = [await probe.probe(1.0) for _ in range(3)]
        await probe.aclose()
        nursery.cancel_scope.cancel()
    assert [r.status_code for r in results] == [status] * 3
    assert [r.ok for r in results] == [200 <= status < 300] * 3
    assert len(connections) == 1, "one kept-alive connection for every probe"


async def test_a_server_that_closes_gets_a_new_connection() -> None:
    body = b"HTTP/1.0 200 OK\r\n\r\nbody to EOF"
    async with trio.open_nursery() as nursery:
        port, connections = await serve_script(nursery, lambda n: body, close_after=True)
        probe = HttpProbe("127.0.0.1", port, "/health")
        results = [await probe.probe(1.0) for _ in range(2)]
        nursery.cancel_scope.cancel()
    assert [r.ok for r in results] == [True, True]
    assert len(connections) == 2


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * (MAX_HEADER // 3) + b"\r\n", "headers longer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", "a body of 99999999 bytes"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
    ],
)
async def test_what_is_not_a_sane_answer_is_a_failed_probe(body: bytes, error: str) -> None:
    async with trio.open_nursery() as nursery:
        port, _ = await serve_script(nursery, lambda n: body)
        probe = HttpProbe("127.0.0.1", port, "/health")
        result = await probe.probe(1.0)
        await probe.aclose()
        nursery.cancel_scope.cancel()
    assert not result.ok
    assert result.error is not None
    assert error in result.error


async def test_no_answer_and_a_refused_connection_are_failed_probes() -> None:
    async with trio.open_nursery() as nursery:
        port, _ = await serve_script(nursery, lambda n: b"")  # reads, never answers
        probe = HttpProbe("127.0.0.1", port, "/health")
        silent = await probe.probe(0.2)
        nursery.cancel_scope.cancel()
    refused = await HttpProbe("127.0.0.1", port, "/health").probe(1.0)
    assert (silent.ok, silent.error) == (False, "no answer within 0.2s")
    assert not refused.ok
    assert refused.error is not None
