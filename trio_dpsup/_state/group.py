"""The group across nodes as this member knows it: one `GroupView` of the other members,
changed only through its verbs (`heard`, `relayed`, `lose`, `told`), read through
`GroupStatus` snapshots, as the board keeps the ranks.

A member is heard from directly (it answers this member's watch, or its own watch of this
member reports its state) or relayed (the member this one watches says what it heard of the
others: in a star, the leader). Only direct words keep a member alive (`overdue`); relayed
ones count only towards readiness. A member's last state is kept once final: a failed or
lost member never comes back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .._config.group import GroupPlan
from .._errors import GroupFailed, SupervisorFailure
from .status import (
    GroupStatus,
    MemberState,
    MemberStatus,
    SupervisorState,
    SupervisorStatus,
)

__all__ = ["GroupView", "Origin", "member_state_of", "origin_of"]

#: States a member does not leave.
_FINAL = frozenset({MemberState.FAILED, MemberState.LOST})


@dataclass(frozen=True)
class Origin:
    """Where the group's failure began: the member, its node, and what happened there."""

    member: int
    node: str | None
    reason: str

    def failure(self) -> GroupFailed:
        return GroupFailed(self.member, self.node, self.reason)

    def __str__(self) -> str:
        return str(self.failure())


def origin_of(failure: SupervisorFailure, member: int, node: str) -> Origin:
    """The origin this member reports for its own first `failure`: a group's failure keeps
    the member it began at; any other began here."""
    if isinstance(failure, GroupFailed):
        return Origin(failure.member, failure.node, failure.reason)
    return Origin(member, node, str(failure))


def member_state_of(status: SupervisorStatus) -> MemberState:
    """This member's own state, for the others, from its status."""
    if status.failure is not None:
        return MemberState.FAILED
    if status.state is SupervisorState.DRAINING:
        return MemberState.DRAINING
    if status.state in (SupervisorState.STOPPING, SupervisorState.STOPPED):
        return MemberState.STOPPING
    return MemberState.READY if status.ranks_ready else MemberState.STARTING


class _Member:
    __slots__ = ("cause", "direct", "heard_at", "heard_wall", "node", "state", "told")

    def __init__(self) -> None:
        self.node: str | None = None
        self.state = MemberState.NOT_APPEARED
        self.cause: Origin | None = None
        #: Heard from directly at least once: its silence then counts (`overdue`).
        self.direct = False
        self.heard_at = -math.inf  # trio.current_time()
        self.heard_wall: float | None = None
        #: The last state of ours it is known to have received.
        self.told: MemberState | None = None


class GroupView:
    """The other members of this member's group, as last heard. One Trio thread: no locks.
    A visible change (a state, a node name, a cause) is announced through `on_change` (the
    board's version); being heard again with nothing new is not, so that heartbeats wake
    no long poll."""

    def __init__(
        self, plan: GroupPlan, run_id: str, node: str, on_change: Callable[[], None]
    ) -> None:
        self.plan = plan
        #: How this member names its node to the others.
        self.node = node
        self._on_change = on_change
        # The first member's run names the generation; the others learn it from their words.
        self._generation = run_id if plan.member == 0 else None
        self._members = {i: _Member() for i in range(plan.size) if i != plan.member}

    @property
    def generation(self) -> str | None:
        return self._generation

    def accepts(self, group_id: str, generation: str | None) -> bool:
        """Whether words from a member of group `group_id` in `generation` are for us: the
        same group, and the same generation where both are known."""
        if group_id != self.plan.group_id:
            return False
        return generation is None or self._generation in (None, generation)

    def adopt(self, generation: str) -> None:
        """Learn the group's generation (once: later ones are compared, never adopted)."""
        if self._generation is None:
            self._generation = generation
            self._on_change()

    def state(self, member: int) -> MemberState:
        return self._members[member].state

    def node_of(self, member: int) -> str | None:
        return self._members[member].node

    def heard(
        self, member: int, node: str, state: MemberState, cause: Origin | None
    ) -> MemberState:
        """`member` said, itself, that it is in `state` (with `cause` once failed). Returns
        its state before."""
        record = self._members[member]
        before = record.state
        record.direct = True
        record.heard_at = trio.current_time()
        record.heard_wall = time.time()
        if before in _FINAL:
            return before
        changed = (record.node, record.state, record.cause) != (node, state, cause)
        record.node, record.state, record.cause = node, state, cause
        if changed:
            self._on_change()
        return before

    def relayed(self, member: int, state: MemberState) -> None:
        """Another member says `member` is in `state`. Counts only for a member never heard
        from directly, and only towards readiness (starting or ready)."""
        record = self._members.get(member)
        if record is None or record.direct or record.state in _FINAL:
            return
        if state in (MemberState.STARTING, MemberState.READY) and state is not record.state:
            record.state = state
            self._on_change()

    def lose(self, member: int) -> None:
        """`member` was not heard from within the peer timeout."""
        record = self._members[member]
        if record.state not in _FINAL:
            record.state = MemberState.LOST
            self._on_change()

    def told(self, member: int, state: MemberState) -> None:
        """`member` received our `state` (an answer to it, or its answer to our report)."""
        self._members[member].told = state

    def overdue(self, timeout: float) -> list[int]:
        """Members heard from directly, alive and not stopping as planned, that have been
        silent for longer than `timeout` seconds."""
        now = trio.current_time()
        return [
            i for i, m in self._members.items() if self._watched(m) and m.heard_at + timeout < now
        ]

    def next_deadline(self, timeout: float) -> float:
        """When the next watched member becomes overdue (inf: none is watched)."""
        return min(
            (m.heard_at + timeout for m in self._members.values() if self._watched(m)),
            default=math.inf,
        )

    def not_appeared(self) -> list[int]:
        return [i for i, m in self._members.items() if m.state is MemberState.NOT_APPEARED]

    def untold(self, state: MemberState) -> list[int]:
        """Members heard from directly, neither failed nor stopping themselves (those know
        the group stops), that have not yet received our `state`."""
        return [
            i
            for i, m in self._members.items()
            if m.direct
            and m.state in (MemberState.STARTING, MemberState.READY)
            and m.told is not state
        ]

    @staticmethod
    def _watched(member: _Member) -> bool:
        return member.direct and member.state not in _FINAL and not member.state.planned_stop

    def own(self, status: SupervisorStatus) -> tuple[MemberState, Origin | None]:
        """This member's own state and, once failed, where the failure began."""
        state = member_state_of(status)
        if status.failure is None:
            return state, None
        return state, origin_of(status.failure, self.plan.member, self.node)

    def snapshot(self, status: SupervisorStatus) -> GroupStatus:
        """The group, this member's own entry read from its `status`."""
        state, cause = self.own(status)
        own = MemberStatus(
            self.plan.member, self.node, state, None if cause is None else str(cause), time.time()
        )
        members = [own] + [
            MemberStatus(
                i,
                m.node,
                m.state,
                None if m.cause is None else str(m.cause),
                m.heard_wall,
            )
            for i, m in self._members.items()
        ]
        return GroupStatus(
            group_id=self.plan.group_id,
            generation=self._generation,
            member=self.plan.member,
            members=tuple(sorted(members, key=lambda m: m.member)),
        )
