"""The admin socket's protocol, typed: one JSON line each way, shared by the server
(admin.py) and its client (ctl.py), so that an action's name and its parameters are declared
once. Standard library only, as the client is.

A request is ``{"action": ..., "rank": ..., ...}``; a reply ``{"ok": true, ...}`` or
``{"ok": false, "error": ...}``. A long action (a drain, a waited restart, a rolling restart)
sends progress lines before its reply, ``{"progress": "rank 1 drained in 0.52s"}``, at each
step and at least every `PROGRESS_EVERY` seconds, so that a client can wait for as long as
the supervisor has something to say. `Request.from_json` and `Reply.from_json` take what came
off the socket and raise `ProtocolError`, whose message goes back to the peer (or to the
operator) as it is.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

__all__ = [
    "MAX_PAUSE",
    "PROGRESS_EVERY",
    "Action",
    "ProtocolError",
    "Reply",
    "Request",
    "Skipped",
    "progress_line",
    "progress_of",
]

#: The longest probe pause a request may ask for, in seconds (a day).
MAX_PAUSE = 86400
#: The longest a long action goes without a progress line.
PROGRESS_EVERY = 5.0


def progress_line(text: str) -> dict[str, Any]:
    """A progress line of a long action, before its reply."""
    return {"progress": text}


def progress_of(document: object) -> str | None:
    """The text of a progress line, or None for anything else (a reply)."""
    if isinstance(document, dict) and set(document) == {"progress"}:
        text = document["progress"]
        return text if isinstance(text, str) else None
    return None


class ProtocolError(ValueError):
    """A request or a reply that is not the protocol's; the message says what is wrong."""


class Action(enum.Enum):
    """What a request asks for; the values are the wire's (and ctl's) names."""

    STATUS = "status"
    RESTART = "restart"
    DRAIN = "drain"
    UNDRAIN = "undrain"
    PAUSE_PROBES = "pause-probes"
    RESUME_PROBES = "resume-probes"
    ROLLING_RESTART = "rolling-restart"

    @property
    def of_one_rank(self) -> bool:
        """Whether the request names a rank."""
        return self not in (Action.STATUS, Action.ROLLING_RESTART)

    @property
    def takes_ranks_out(self) -> bool:
        """Whether it takes ranks out of service one by one, which a data-parallel group
        cannot absorb (refused there)."""
        return self in (Action.RESTART, Action.DRAIN, Action.ROLLING_RESTART)

    @property
    def outlives_the_request(self) -> bool:
        """Whether it goes on in the supervisor after its client stops waiting."""
        return self in (Action.RESTART, Action.DRAIN, Action.ROLLING_RESTART)


@dataclass(frozen=True)
class Request:
    """One operator request."""

    action: Action
    rank: int | None = None
    #: pause-probes: for how long.
    seconds: float | None = None
    #: restart, drain: even below --min-ready.
    force: bool = False
    #: restart: answer once the rank is ready again.
    wait: bool = False
    #: rolling-restart: ranks out at once (None: what --min-ready leaves room for).
    max_unavailable: int | None = None
    #: restart --wait, rolling-restart: how long a restarted rank may take (None: the
    #: supervisor's --startup-timeout).
    rank_timeout: float | None = None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"action": self.action.value}
        for name in ("rank", "seconds", "max_unavailable", "rank_timeout"):
            if (value := getattr(self, name)) is not None:
                document[name] = value
        for name in ("force", "wait"):
            if getattr(self, name):
                document[name] = True
        return document

    @classmethod
    def from_json(cls, document: object) -> Request:
        if not isinstance(document, dict):
            raise ProtocolError('a request is a JSON object, e.g. {"action": "status"}')
        name = document.get("action")
        try:
            action = Action(name)
        except ValueError:
            names = ", ".join(a.value for a in Action)
            raise ProtocolError(f"unknown action {name!r}: one of {names}") from None
        rank = document.get("rank")
        if action.of_one_rank and not _whole(rank):  # JSON true is no rank
            raise ProtocolError(f"no rank {rank!r} here: a rank is a whole number, e.g. 0")
        seconds = document.get("seconds") if action is Action.PAUSE_PROBES else None
        if action is Action.PAUSE_PROBES and not (_number(seconds) and 0 <= seconds <= MAX_PAUSE):
            raise ProtocolError(f"pause-probes needs SECONDS between 0 and {MAX_PAUSE}")
        max_unavailable = document.get("max_unavailable")
        if max_unavailable is not None and not _whole(max_unavailable):
            raise ProtocolError(
                f"--max-unavailable must be a whole number of ranks, not {max_unavailable!r}"
            )
        rank_timeout = document.get("rank_timeout")
        if rank_timeout is not None and not (_number(rank_timeout) and rank_timeout > 0):
            raise ProtocolError(f"--rank-timeout must be more than 0 seconds, not {rank_timeout!r}")
        return cls(
            action,
            rank=rank if action.of_one_rank else None,
            seconds=float(seconds) if _number(seconds) else None,
            force=_flag(document, "force"),
            wait=_flag(document, "wait"),
            max_unavailable=max_unavailable,
            rank_timeout=None if rank_timeout is None else float(rank_timeout),
        )


@dataclass(frozen=True)
class Skipped:
    """A rank a rolling restart left alone, and why."""

    rank: int
    why: str


@dataclass(frozen=True)
class Reply:
    """One answer. Which fields an action fills is `Reply.check`'s business."""

    ok: bool = True
    error: str | None = None
    #: The rank acted on.
    rank: int | None = None
    #: pause-probes: for how long.
    seconds: float | None = None
    #: rolling-restart: the ranks restarted, those skipped, and how many were out at once.
    ranks: tuple[int, ...] | None = None
    skipped: tuple[Skipped, ...] = field(default=())
    max_unavailable: int | None = None
    #: status: the /status document, and the long operation in progress, if any.
    status: Mapping[str, Any] | None = None
    operation: str | None = None

    @classmethod
    def refusal(cls, error: str) -> Reply:
        return cls(ok=False, error=error)

    def to_json(self) -> dict[str, Any]:
        if not self.ok:
            return {"ok": False, "error": self.error}
        document: dict[str, Any] = {"ok": True}
        for name in ("rank", "seconds", "max_unavailable"):
            if (value := getattr(self, name)) is not None:
                document[name] = value
        if self.ranks is not None:
            document["ranks"] = list(self.ranks)
            document["skipped"] = [{"rank": s.rank, "why": s.why} for s in self.skipped]
        if self.status is not None:
            document["status"] = self.status
            document["operation"] = self.operation
        return document

    @classmethod
    def from_json(cls, document: object) -> Reply:
        if not isinstance(document, dict):
            raise ProtocolError("an answer that is not a JSON object")
        ok = document.get("ok")
        if ok is False:
            error = document.get("error")
            if not isinstance(error, str):
                raise ProtocolError("a refusal without its error")
            return cls.refusal(error)
        if ok is not True:
            raise ProtocolError("an answer without ok: true or false")
        try:
            ranks = document.get("ranks")
            skipped = document.get("skipped", [])
            status = document.get("status")
            reply = cls(
                rank=_optional(document, "rank", _whole),
                seconds=_optional(document, "seconds", _number),
                ranks=None if ranks is None else tuple(_checked(r, _whole) for r in ranks),
                skipped=tuple(Skipped(_checked(s["rank"], _whole), str(s["why"])) for s in skipped),
                max_unavailable=_optional(document, "max_unavailable", _whole),
                status=None if status is None else _checked(status, _mapping),
                operation=_optional(document, "operation", _text),
            )
        except (KeyError, TypeError, ProtocolError) as exc:
            raise ProtocolError(f"an answer of the wrong shape ({exc!r})") from None
        return reply

    def check(self, action: Action) -> None:
        """Raise ProtocolError unless a successful reply to `action` has what it needs."""
        needs = (
            ("status",)
            if action is Action.STATUS
            else ("ranks", "max_unavailable")
            if action is Action.ROLLING_RESTART
            else ("rank", "seconds")
            if action is Action.PAUSE_PROBES
            else ("rank",)
        )
        missing = [name for name in needs if getattr(self, name) is None]
        if missing:
            raise ProtocolError(f"a reply to {action.value} without {', '.join(missing)}")


def _whole(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: object) -> bool:
    return isinstance(value, str)


def _mapping(value: object) -> bool:
    return isinstance(value, dict)


def _checked(value: Any, kind: Callable[[object], bool]) -> Any:
    if not kind(value):
        raise ProtocolError(f"{value!r}")
    return value


def _optional(document: Mapping[str, Any], name: str, kind: Callable[[object], bool]) -> Any:
    value = document.get(name)
    return None if value is None else _checked(value, kind)


def _flag(document: Mapping[str, Any], name: str) -> bool:
    value = document.get(name, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{name} must be true or false, not {value!r}")
    return value
