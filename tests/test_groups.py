"""Groups and replicas: ranks that form one data-parallel group restart as one, serve whole
or not at all, and refuse what only replicas can take; replicas keep per-rank restarts."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path
from typing import Any, Unpack

import pytest

from trio_dpsup import (
    ConfigError,
    Preset,
    RankExited,
    RankState,
    RestartedWith,
    RestartPolicy,
    RestartScope,
    SupervisorConfig,
    plan_ranks,
)
from trio_dpsup.testing import Form, Harness, SupervisorSettings, run_cli

from .conftest import on_failure
from .test_admin import ctl

pytest_plugins = ["trio_dpsup.testing.plugin"]

VLLM_GROUP = ("vllm", "serve", "m", "--data-parallel-size", "2")


def vllm(*command: str, ranks: int = 2, **settings: Unpack[SupervisorSettings]) -> SupervisorConfig:
    group: SupervisorSettings = {"gpus_per_rank": 0, "preset": Preset.VLLM, **settings}
    return SupervisorConfig(command=command, ranks=ranks, **group)


def test_a_data_parallel_group_restarts_as_one_and_replicas_one_by_one() -> None:
    group = vllm(*VLLM_GROUP, restart=RestartPolicy.ON_FAILURE)
    assert group.forms_group
    assert group.scope is RestartScope.ALL
    replicas = vllm("vllm", "serve", "m", restart=RestartPolicy.ON_FAILURE)
    assert not replicas.forms_group
    assert replicas.scope is RestartScope.RANK
    # Another program says so itself.
    other = SupervisorConfig(command=("server",), ranks=2, gpus_per_rank=0, group=True)
    assert (other.forms_group, other.scope) == (True, RestartScope.ALL)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"restart": RestartPolicy.ON_FAILURE, "restart_scope": RestartScope.RANK},
            "--restart-scope rank: --data-parallel-size 2 in the command makes the ranks one "
            "vLLM data-parallel group, which cannot take back one restarted rank: drop "
            "--restart-scope (a group restarts as one), or pass --restart never",
        ),
        (
            {"min_ready": 1},
            "--min-ready 1: --data-parallel-size 2 in the command makes the ranks one vLLM "
            "data-parallel group, which serves whole or not at all: drop --min-ready",
        ),
    ],
)
def test_what_a_group_cannot_take_is_refused(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        vllm(*VLLM_GROUP, **settings)


def test_a_group_across_nodes_exits_rather_than_restarts() -> None:
    config = vllm(
        "vllm", "serve", "m", "--data-parallel-size", "4", "--data-parallel-address", "10.0.0.1",
        restart=RestartPolicy.ON_FAILURE,
    )  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        plan_ranks(config, {"PATH": os.environ["PATH"]})
    assert str(caught.value) == (
        "--restart on-failure: the data-parallel group (--data-parallel-size 4) spans more "
        "than these 2 ranks, and a part restarted on one node cannot rejoin it: pass "
        "--restart never; the supervisor then exits non-zero and LeaderWorkerSet's "
        "RecreateGroupOnPodRestart recreates the whole group "
        "(deploy/kubernetes/leaderworkerset.yaml)"
    )


async def test_the_cli_refuses_a_group_with_per_rank_restarts(tmp_path: Path) -> None:
    code, _, err = await run_cli(
        [
            "--preset", "vllm", "--ranks", "2", "--gpus-per-rank", "0", "--restart",
            "on-failure", "--restart-scope", "rank", "--", *VLLM_GROUP,
        ]
    )  # fmt: skip
    assert code == 2
    assert err.startswith("trio-dpsup: error: --restart-scope rank: --data-parallel-size 2")
    assert err.count("\n") == 1


async def test_a_group_restarts_whole_and_serves_whole(dpsup: Harness, tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    deployment = await dpsup.start(
        3, form=Form.CLI, **on_failure(0.1, group=True, admin_socket=str(sock))
    )
    status = await deployment.status()
    assert status.group
    assert status.min_ready == 3
    # An operator cannot take one rank of a group out.
    for args in (("drain", "1", "--force"), ("restart", "1", "--force"), ("rolling-restart",)):
        code, _, err = await ctl(sock, *args)
        assert code == 2
        assert "--group makes the ranks one group, which cannot take back one restarted" in err
    before = await deployment.status()
    await deployment.crash_rank(1, 1)
    after = await deployment.wait_for_status(
        lambda s: all(r.restarts == 1 and r.state is RankState.READY for r in s.ranks),
        "every rank restarted once and ready",
    )
    assert all(a.pid != b.pid for a, b in zip(after.ranks, before.ranks, strict=True))
    (cause,) = after.ranks[0].last_causes
    assert isinstance(cause, RestartedWith)
    assert isinstance(cause.cause, RankExited)
    assert await deployment.ready_code() == 200
    deployment.signal_supervisor(signal.SIGTERM)
    assert await deployment.wait_exit() == 0


async def test_replicas_keep_per_rank_restarts(dpsup: Harness) -> None:
    deployment = await dpsup.start(3, **on_failure(0.1, min_ready=2))
    assert not (await deployment.status()).group
    before = await deployment.status()
    await deployment.crash_rank(2, 1)
    after = await deployment.wait_for_status(
        lambda s: s.ranks[2].restarts == 1 and s.ranks[2].state is RankState.READY,
        "rank 2 restarted",
    )
    assert [r.pid for r in after.ranks[:2]] == [r.pid for r in before.ranks[:2]]
    assert [r.restarts for r in after.ranks] == [0, 0, 1]
