"""A rank's record changes only through its verbs: outside `_state` its fields are
read-only, and no new ones can be stuck on it."""

from __future__ import annotations

import inspect

import pytest
import trio

# The state family's own record, unit-tested on purpose: its verbs are its whole surface.
from trio_dpsup._config.plan import RankPlan
from trio_dpsup._state.board import Board, RankRecord
from trio_dpsup._state.status import ProbeResult, RankState

pytest_plugins = ["trio_dpsup.testing.plugin"]

PLAN = RankPlan(rank=0, local_rank=0, port=8000, devices=(), argv=("rank",), env=())


def fields() -> list[str]:
    """Every public data attribute of a record: its properties and its plain attributes."""
    return [
        name
        for name, value in inspect.getmembers(RankRecord)
        if not name.startswith("_") and isinstance(value, property)
    ]


def test_a_record_has_fields_to_hold() -> None:
    assert {"state", "pid", "drained", "restarts", "last_causes", "plan"} <= set(fields())
    assert len(fields()) >= 20


@pytest.mark.parametrize("name", fields())
async def test_no_field_of_a_record_is_assignable(name: str) -> None:
    record = RankRecord(PLAN)
    with pytest.raises(AttributeError):
        setattr(record, name, getattr(record, name))


async def test_no_field_can_be_added_and_collections_are_copies() -> None:
    record = RankRecord(PLAN)
    with pytest.raises(AttributeError):
        record.incarnation = trio.CancelScope()  # type: ignore[attr-defined]
    assert isinstance(record.last_causes, tuple)
    assert isinstance(record.restart_times, tuple)


async def test_the_verbs_carry_a_rank_through_its_life() -> None:
    board = Board((PLAN,), run_id="run")  # (its clock is trio's: inside a run)
    record = board.ranks[0]
    record.started(1234)
    assert (record.state, record.pid) == (RankState.STARTING, 1234)
    assert record.record_probe(ProbeResult(False, None, "refused", 0.0)) == 1
    assert record.record_probe(ProbeResult(True, 200, None, 0.0)) == 0
    assert board.mark_ready(record)
    assert record.serving
    record.failing()
    assert not record.serving
    assert record.snapshot().failing
    record.begin_stop(shutdown=True)
    assert record.state is RankState.STOPPING
    assert record.stopped(frozenset({1234}), -15, killed=False)
    assert (record.state, record.returncode, record.previous_tree) == (
        RankState.STOPPED,
        -15,
        frozenset({1234}),
    )
