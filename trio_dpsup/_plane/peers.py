"""The members of a group across nodes watch each other over their control planes, so that
the group fails as one in seconds, not at NCCL's timeout.

Each member asks the members it is given (``--group-peer``; under LeaderWorkerSet a worker
asks the leader) ``GET /group`` with its own word in the query: who it is, its group and
generation, its state and, once failed, where the group's failure began. The member asked
takes that word and answers, as a long poll, with its own: at once when its state or its
view of the group changed since the asker's last answer, else after a heartbeat
(``--peer-timeout`` / `HEARTBEATS`). So a change crosses in one round trip either way, and
each member hears from each member it is joined to at least `HEARTBEATS` times per peer
timeout; one silent for longer than the peer timeout is lost, and the group fails.

A word can only make this member stop: a member that failed (or saw the group fail) fails
it, with the origin it names; a member stopping as planned (SIGTERM) starts this member's
planned stop, which drains; a member of another group or generation is ignored, and one not
yet heard from has "not yet appeared". Nothing a peer says starts or restarts anything.

Cancellation of `GroupMember.run` ends the watch; `linger` first gives every member this
member's last state, bounded.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import h11
import trio

from .._config.concerns import PeerSettings
from .._config.tls import peer_context
from .._errors import GroupFailed, SupervisorFailure
from .._state.board import Board
from .._state.group import GroupView, Origin
from .._state.status import MemberState
from .http_server import Response

__all__ = ["HEARTBEATS", "GroupMember"]

logger = logging.getLogger(__name__)

#: Answers per peer timeout, at least: two may be lost (or late) without a false failure.
HEARTBEATS = 3
#: The longest text a word carries (names, a failure's reason); the longest answer read.
MAX_TEXT = 2000
MAX_ANSWER = 64 * 1024
#: The most kinds of ignored words logged (each once).
MAX_IGNORED = 64
#: How long to wait before asking again a member that did not answer (not yet listening,
#: or its link down), at first: short, since its silence is timed by the peer timeout, not
#: by this; it doubles at each ask left unanswered, up to a heartbeat.
RETRY = 0.2
#: The longest `linger` waits for every member to have our last state.
LINGER = 2.0

_JSON = [(b"content-type", b"application/json")]
_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]


@dataclass(frozen=True)
class Word:
    """What one member says of itself (and, in an answer, of the members it heard)."""

    group_id: str
    generation: str | None
    member: int
    node: str
    state: MemberState
    cause: Origin | None
    #: What it heard of the others (answers only): member, state.
    members: tuple[tuple[int, MemberState], ...] = ()

    def query(self) -> dict[str, str]:
        out = {
            "group": self.group_id,
            "member": str(self.member),
            "node": self.node,
            "state": self.state.value,
        }
        if self.generation is not None:
            out["generation"] = self.generation
        if self.cause is not None:
            out["cause_member"] = str(self.cause.member)
            out["cause_reason"] = self.cause.reason
            if self.cause.node is not None:
                out["cause_node"] = self.cause.node
        return out

    @classmethod
    def from_query(cls, query: dict[str, list[str]]) -> Word:
        """The word in a report's query. Raises ValueError for a malformed one."""
        one = {name: values[0] for name, values in query.items() if values}
        cause = None
        if "cause_member" in one:
            cause = Origin(
                _whole(one["cause_member"]), one.get("cause_node"), _text(one["cause_reason"])
            )
        return cls(
            group_id=_text(one["group"]),
            generation=None if "generation" not in one else _text(one["generation"]),
            member=_whole(one["member"]),
            node=_text(one["node"]),
            state=MemberState(one["state"]),
            cause=cause,
        )

    def to_json(self, version: int) -> dict[str, Any]:
        cause = self.cause
        return {
            "group": self.group_id,
            "generation": self.generation,
            "member": self.member,
            "node": self.node,
            "state": self.state.value,
            "cause": None
            if cause is None
            else {"member": cause.member, "node": cause.node, "reason": cause.reason},
            "version": version,
            "members": [{"member": m, "state": s.value} for m, s in self.members],
        }

    @classmethod
    def from_json(cls, doc: Any) -> tuple[Word, int]:
        """The word in an answer, and the asked member's version. Raises ValueError (or
        KeyError, TypeError) for a malformed one."""
        cause = doc["cause"]
        generation = doc["generation"]
        word = cls(
            group_id=_text(doc["group"]),
            generation=None if generation is None else _text(generation),
            member=_whole(doc["member"]),
            node=_text(doc["node"]),
            state=MemberState(doc["state"]),
            cause=None
            if cause is None
            else Origin(
                _whole(cause["member"]),
                None if cause["node"] is None else _text(cause["node"]),
                _text(cause["reason"]),
            ),
            members=tuple(
                (_whole(m["member"]), MemberState(m["state"])) for m in doc["members"][:4096]
            ),
        )
        version = doc["version"]
        if not isinstance(version, int):
            raise ValueError("version is not a whole number")
        return word, version


def _whole(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"not a whole number: {value!r}")
    number = int(value)
    if not 0 <= number < 2**31:
        raise ValueError(f"out of range: {number}")
    return number


def _text(value: object) -> str:
    # Printable only: a peer's words reach our log lines and /status.
    if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT or not value.isprintable():
        raise ValueError("not a printable text of 1 to 2000 characters")
    return value


class GroupMember:
    """This supervisor as one member of its group: answers ``GET /group`` (`respond`, for
    the control plane) and asks its peers (`run`). `fail` records a failure and stops
    every rank (the supervisor's); `stop` begins the planned stop (its SIGTERM path)."""

    def __init__(
        self,
        settings: PeerSettings,
        board: Board,
        fail: Callable[[SupervisorFailure], object],
        stop: Callable[[], None],
    ) -> None:
        assert board.members is not None
        self._settings = settings
        self._board = board
        self._view: GroupView = board.members
        self._plan = board.members.plan
        self._fail = fail
        self._stop = stop
        #: Set (and replaced) each time a member is known to have received our state.
        self._told = trio.Event()
        self._ignored: set[str] = set()  # what was logged as ignored, to log it once
        #: (the board's version, our word, as a query, as an answer), made once per
        #: version: read at every ask and every answer.
        self._cached: tuple[int, Word, str, bytes] | None = None
        self._asking: set[tuple[trio.CancelScope, MemberState]] = set()
        #: When each member last asked us (trio.current_time()).
        self._asked_at: dict[int, float] = {}
        #: Set at each member's next ask (for `_while_asked_by`).
        self._next_ask: dict[int, trio.Event] = {}

    @property
    def heartbeat(self) -> float:
        return self._settings.peer_timeout / HEARTBEATS

    # -- answering --------------------------------------------------------------------------

    async def respond(self, query: dict[str, list[str]]) -> Response:
        """The answer to a member's ``GET /group`` report: 400 for a malformed one, 409 for
        a member of another group or generation, else this member's word once it changed
        since `version` or after ``wait`` seconds (at most a heartbeat).

        **Cancellation**: the long poll ends at once; the report was taken already.
        """
        try:
            word = Word.from_query(query)
            wait = min(float(query.get("wait", ["0"])[0]), self.heartbeat)
            version = int(query.get("version", ["-1"])[0])
            if not wait >= 0:
                raise ValueError("wait")
        except (KeyError, ValueError) as exc:
            return Response(400, _TEXT, f"a malformed report: {exc}\n".encode())
        if not self._take(word):
            return Response(409, _TEXT, b"not a member of this group and generation\n")
        self._asked_at[word.member] = trio.current_time()
        self._next_ask.pop(word.member, trio.Event()).set()
        if wait > 0 and version == self._board.version:
            with trio.move_on_after(wait):
                await self._board.changed.wait()
        _, own, _, body = self._cache()
        self._note_told(word.member, own.state)
        return Response(200, _JSON, body)

    # -- asking -----------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ask every peer, time every member heard from, and fail the group for a member
        that never appeared by the startup timeout; until cancelled.

        **Cancellation**: ends every ask at once.
        """
        context = self._verify()
        async with trio.open_nursery() as nursery:
            for url in self._plan.peers:
                nursery.start_soon(self._ask_peer, _PeerConnection(url, context))
            nursery.start_soon(self._cancel_stale_asks)
            nursery.start_soon(self._watch_silence)
            nursery.start_soon(self._watch_startup)
            nursery.start_soon(self._log_ready)
            logger.info(
                "member %d of group %s (%d members, from %s): asking %s every %.2gs at most; "
                "a member silent for %gs fails the group",
                self._plan.member,
                self._plan.group_id,
                self._plan.size,
                self._plan.source,
                ", ".join(self._plan.peers) or "no one (the others ask this member)",
                self.heartbeat,
                self._settings.peer_timeout,
            )
            task_status.started()

    async def linger(self) -> None:
        """Return once every member alive has received this member's last state, or after
        `LINGER` seconds (or the peer timeout, if shorter). Call it before the control plane
        stops: a failure told to every member is what makes the group fail fast.

        **Cancellation**: returns at once.
        """
        with trio.move_on_after(min(LINGER, self._settings.peer_timeout)):
            while self._view.untold(self._word().state):
                await self._told.wait()

    def _verify(self) -> ssl.SSLContext:
        settings = self._settings
        return peer_context(settings.peer_ca_certs, settings.peer_certfile, settings.peer_keyfile)

    async def _ask_peer(self, peer: _PeerConnection) -> None:
        """Ask `peer` again and again: at once after our own state changed, else as a long
        poll a heartbeat long.

        **Cancellation**: the connection is closed."""
        version = -1
        pause = RETRY
        try:
            while True:
                own = self._word()
                target = f"/group?{self._query()}&version={version}&wait={self.heartbeat:g}"
                answer: tuple[Word, int] | None = None
                # Cancelled by `_cancel_stale_asks` once our state is no longer `own.state`.
                asking = (trio.CancelScope(), own.state)
                self._asking.add(asking)
                try:
                    with asking[0]:
                        answer = await self._ask(peer, target)
                finally:
                    self._asking.discard(asking)
                if answer is None:
                    if self._word().state is own.state:  # not asked again at once for news
                        # Doubling up to a heartbeat: a member that never appears (a pod
                        # never scheduled) is asked a few times a second at first, then
                        # once a heartbeat, for as long as --startup-timeout.
                        await trio.sleep(pause)
                        pause = min(2 * pause, self.heartbeat)
                    continue
                pause = RETRY
                word, version = answer
                if self._take(word):
                    self._note_told(word.member, own.state)
                    if word.member < self._plan.member and self._asked_lately(word.member):
                        await peer.aclose()  # idle meanwhile: the peer would close it
                        await self._while_asked_by(word.member)
        finally:
            await peer.aclose()

    async def _while_asked_by(self, member: int) -> None:
        """Return once `member` has not asked us for two heartbeats. Two members that list
        each other need only one of them asking: each ask carries the asker's word there
        and the answer brings the other's back, and both time their silence. So the member
        of the higher index leaves the asking to the lower while the lower asks, and asks
        again when it stops (its silence is then timed from its last ask)."""
        while True:
            with trio.move_on_after(2 * self.heartbeat) as quiet:
                await self._next_ask.setdefault(member, trio.Event()).wait()
            if quiet.cancelled_caught:
                return

    def _asked_lately(self, member: int) -> bool:
        """Whether `member` asked us within the last two heartbeats."""
        last = self._asked_at.get(member, -math.inf)
        return last + 2 * self.heartbeat > trio.current_time()

    async def _ask(self, peer: _PeerConnection, target: str) -> tuple[Word, int] | None:
        """One ask, bounded by a heartbeat and a peer timeout; None for no usable answer."""
        with trio.move_on_after(self.heartbeat + self._settings.peer_timeout):
            try:
                status, body = await peer.get(target)
                if status == 409:
                    self._ignore(
                        peer.url, f"{peer.url} is not a member of this group and generation"
                    )
                    return None
                if status != 200:
                    raise ValueError(f"HTTP {status}: {body[:200]!r}")
                return Word.from_json(json.loads(body))
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                    h11.ProtocolError) as exc:  # fmt: skip
                logger.debug("group peer %s did not answer: %r", peer.url, exc)
            except (ValueError, KeyError, TypeError) as exc:
                self._ignore(peer.url, f"group peer {peer.url} answered with something else: {exc}")
        await peer.aclose()  # no answer in time, or none to trust: the next ask starts afresh
        return None

    async def _cancel_stale_asks(self) -> None:
        """Cancel each ask that carries a state of ours that is no longer ours: the news
        goes out at once, in a new ask."""
        while True:
            await self._board.changed.wait()
            state = self._word().state
            for scope, reported in list(self._asking):
                if reported is not state:
                    scope.cancel()

    # -- taking a word ----------------------------------------------------------------------

    def _take(self, word: Word) -> bool:
        """Take `word` from a member (asked or asking); False if it was ignored."""
        plan, view = self._plan, self._view
        if word.member == plan.member or not 0 <= word.member < plan.size:
            self._ignore(
                f"member {word.member}",
                f"a word from member {word.member} of a group of {plan.size}, which this "
                f"member ({plan.member}) ignores: is --group-member (or --group-peer) right?",
            )
            return False
        if not view.accepts(word.group_id, word.generation):
            self._ignore(
                f"{word.group_id} {word.generation}",
                f"member {word.member} ({word.node}) is of group {word.group_id}, generation "
                f"{word.generation}, not this member's ({plan.group_id}, {view.generation}): "
                "ignored",
            )
            return False
        if view.generation is None and word.generation is not None:
            if word.state in (MemberState.FAILED, MemberState.LOST) or word.state.planned_stop:
                # A member still stopping while its group is recreated: not ours to join.
                return False
            view.adopt(word.generation)
        before = view.heard(word.member, word.node, word.state, word.cause)
        if before is MemberState.NOT_APPEARED:
            logger.info(
                "group member %d (%s) appeared: %s", word.member, word.node, word.state.value
            )
        for member, state in word.members:
            if member != plan.member and 0 <= member < plan.size:
                view.relayed(member, state)
        self._react(word)
        return True

    def _react(self, word: Word) -> None:
        """What a member's state makes this member do: only ever stop."""
        board = self._board
        if board.failure is not None:
            return
        if word.state is MemberState.FAILED:
            cause = word.cause or Origin(word.member, word.node, "failed")
            self._fail(cause.failure())
        elif word.state.planned_stop and not board.stopping.is_set():
            logger.info(
                "group member %d (%s) is stopping as planned: the group drains and stops",
                word.member,
                word.node,
            )
            self._stop()

    def _word(self) -> Word:
        """This member's own word, now (made once per version of the board: it is read at
        every ask and every answer)."""
        return self._cache()[1]

    def _query(self) -> str:
        """This member's own word, now, as a query string."""
        return self._cache()[2]

    def _cache(self) -> tuple[int, Word, str, bytes]:
        version = self._board.version
        if self._cached is None or self._cached[0] != version:
            word = self._make_word()
            body = json.dumps(word.to_json(version)).encode()
            self._cached = (version, word, urlencode(word.query()), body)
        return self._cached

    def _make_word(self) -> Word:
        status = self._board.snapshot()
        state, cause = self._view.own(status)
        view, plan = self._view, self._plan
        heard = () if status.members is None else status.members.members
        members = tuple((m.member, m.state) for m in heard)
        return Word(plan.group_id, view.generation, plan.member, view.node, state, cause, members)

    def _note_told(self, member: int, state: MemberState) -> None:
        self._view.told(member, state)
        self._told.set()
        self._told = trio.Event()

    def _ignore(self, key: str, message: str) -> None:
        """Log `message` once per `key` (at most `MAX_IGNORED` keys: words from a client
        that makes up a new group at every ask must not fill memory or the log)."""
        if key not in self._ignored and len(self._ignored) < MAX_IGNORED:
            self._ignored.add(key)
            logger.warning("%s", message)

    # -- timing -----------------------------------------------------------------------------

    def _watching(self) -> bool:
        """Whether silence still matters: not once this member fails or stops as planned."""
        return not self._board.stopping.is_set()

    async def _watch_silence(self) -> None:
        timeout = self._settings.peer_timeout
        while self._watching():
            with trio.move_on_at(self._view.next_deadline(timeout)):
                await self._board.changed.wait()
            if not self._watching():
                return
            for member in self._view.overdue(timeout):
                node = self._view.node_of(member)
                self._view.lose(member)
                self._fail(
                    GroupFailed(
                        member,
                        node,
                        f"stopped answering: not heard from for {timeout:g}s (--peer-timeout)",
                    )
                )

    async def _watch_startup(self) -> None:
        timeout = self._settings.startup_timeout
        if not timeout:
            return
        with trio.move_on_at(self._board.started_at + timeout):
            while self._view.not_appeared():
                await self._board.changed.wait()
            return
        missing = self._view.not_appeared()
        if missing and self._board.failure is None and not self._board.stopping.is_set():
            self._fail(
                GroupFailed(
                    missing[0],
                    None,
                    f"never appeared within --startup-timeout {timeout:g}s"
                    + ("" if len(missing) == 1 else f" (nor did members {missing[1:]})"),
                )
            )

    async def _log_ready(self) -> None:
        while not self._board.snapshot().ready:
            if self._board.stopping.is_set():
                return
            await self._board.changed.wait()
        logger.info("the group is ready: all %d members report every rank ready", self._plan.size)


class _PeerConnection:
    """One kept-alive HTTP/1.1 connection to a peer's control plane: h11 on a Trio stream
    (TLS for https). Not httpx: a member asks each peer several times per peer timeout for
    as long as it runs, and httpx spends about three times the CPU of this per request
    (measured: 0.71 ms against 0.22 ms a request, both ends counted, on loopback)."""

    def __init__(self, url: str, context: ssl.SSLContext) -> None:
        self.url = url
        parts = urlsplit(url)
        # Both checked when the configuration was built (config.py, check_peer_url).
        assert parts.hostname is not None
        assert parts.port is not None
        self._host, self._port = parts.hostname, parts.port
        self._netloc = parts.netloc
        self._context = context if parts.scheme == "https" else None
        self._stream: trio.abc.Stream | None = None
        self._h11 = h11.Connection(h11.CLIENT)

    async def get(self, target: str) -> tuple[int, bytes]:
        """GET `target`: the status and the body (at most `MAX_ANSWER` bytes). Raises
        OSError, trio's stream errors, h11.ProtocolError or ValueError, and the connection
        is then closed (the next call opens another).

        **Cancellation**: the connection is closed."""
        if self._stream is None:
            self._stream = await self._connect()
            self._h11 = h11.Connection(h11.CLIENT)
        stream, connection = self._stream, self._h11
        try:
            request = h11.Request(method="GET", target=target, headers=[("host", self._netloc)])
            await stream.send_all(connection.send(request) + connection.send(h11.EndOfMessage()))
            status, body = 0, b""
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_ANSWER:
                        raise ValueError(f"an answer of more than {MAX_ANSWER} bytes")
                elif isinstance(event, h11.EndOfMessage):
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise ValueError("the connection closed before the answer ended")
        except BaseException:
            await self.aclose()
            raise
        if connection.our_state is h11.DONE and connection.their_state is h11.DONE:
            connection.start_next_cycle()
        else:
            await self.aclose()
        return status, body

    async def _connect(self) -> trio.abc.Stream:
        stream: trio.abc.Stream = await trio.open_tcp_stream(self._host, self._port)
        if self._context is not None:
            tls = trio.SSLStream(
                stream, self._context, server_hostname=self._host, https_compatible=True
            )
            try:
                await tls.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            stream = tls
        return stream

    async def aclose(self) -> None:
        """Close the connection, if open. **Cancellation**: closes it anyway."""
        stream, self._stream = self._stream, None
        if stream is not None:
            await trio.aclose_forcefully(stream)
