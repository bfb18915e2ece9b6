"""The faults a fake rank can be made to show at run time, declared once: the fake rank
parses them (`Fault.from_request`), `Deployment.inject` and `inject_fault` send them, and
tests and the bench name them (``Fault.stall()``) instead of writing URLs. Faults of the
rank's start (a slow or wedged load, a rank that exits) are its flags instead: see
fake_rank.py.

Standard library only: the fake rank imports it, and ranks must start fast.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

__all__ = ["Fault", "FaultKind", "inject_fault"]


class FaultKind(enum.Enum):
    """What goes wrong; the value is the fake rank's path, ``POST /fault/{value}``."""

    #: The health path answers `Fault.status` from now on, or for its next `Fault.count`
    #: answers only (a blip).
    HEALTH = "health"
    #: The health path hangs: the probe-timeout path.
    HANG = "hang"
    #: The rank exits at once with `Fault.code` (negative: killed by that signal).
    EXIT = "exit"
    #: The busy gauge reads `Fault.busy` (0: idle); the progress counter moves while busy.
    BUSY = "busy"
    #: The progress counter stops for good, and a thread blocks in a function named for
    #: the stack dump (``engine_step_stalled_in_fake_rank``).
    STALL = "stall"
    #: /metrics answers `Fault.status`.
    METRICS = "metrics"
    #: Generation (``POST /v1/completions``) never answers, from now on or for its next
    #: `Fault.count` requests; each such request stays in flight (the busy gauge counts it)
    #: and makes no progress. Health is untouched: the hung engine that /health hides.
    GENERATE_HANG = "generate-hang"
    #: Generation answers `Fault.status` (500 by default), from now on or for its next
    #: `Fault.count` requests; health is untouched.
    GENERATE_ERROR = "generate-error"


@dataclass(frozen=True)
class Fault:
    """One fault with its parameters. Make it with the constructors: ``Fault.health(503)``."""

    kind: FaultKind
    status: int | None = None
    count: int | None = None
    code: int | None = None
    busy: float | None = None

    @classmethod
    def health(cls, status: int = 503, count: int | None = None) -> Fault:
        return cls(FaultKind.HEALTH, status=status, count=count)

    @classmethod
    def hang(cls) -> Fault:
        return cls(FaultKind.HANG)

    @classmethod
    def exit(cls, code: int = 1) -> Fault:
        return cls(FaultKind.EXIT, code=code)

    @classmethod
    def busy_with(cls, requests: float = 1) -> Fault:
        return cls(FaultKind.BUSY, busy=requests)

    @classmethod
    def stall(cls) -> Fault:
        return cls(FaultKind.STALL)

    @classmethod
    def metrics(cls, status: int = 500) -> Fault:
        return cls(FaultKind.METRICS, status=status)

    @classmethod
    def generate_hang(cls, count: int | None = None) -> Fault:
        return cls(FaultKind.GENERATE_HANG, count=count)

    @classmethod
    def generate_error(cls, status: int = 500, count: int | None = None) -> Fault:
        return cls(FaultKind.GENERATE_ERROR, status=status, count=count)

    @property
    def path(self) -> str:
        return f"/fault/{self.kind.value}"

    def query(self) -> dict[str, str]:
        """The parameters as the fake rank reads them."""
        named = {"status": self.status, "count": self.count, "code": self.code, "n": self.busy}
        return {name: str(value) for name, value in named.items() if value is not None}

    def url(self, port: int, host: str = "127.0.0.1") -> str:
        """Where to POST this fault for the fake rank on `port`."""
        query = urlencode(self.query())
        return f"http://{host}:{port}{self.path}" + (f"?{query}" if query else "")

    @classmethod
    def from_request(cls, path: str, query: Mapping[str, str]) -> Fault | None:
        """The fault a ``POST path?query`` asks for; None for a path that is none.
        Raises ValueError for a parameter that is not a number."""
        if not path.startswith("/fault/"):
            return None
        try:
            kind = FaultKind(path.removeprefix("/fault/"))
        except ValueError:
            return None
        if kind is FaultKind.HEALTH:
            count = query.get("count")
            return cls.health(
                int(query.get("status", "503")), None if count is None else int(count)
            )
        if kind is FaultKind.EXIT:
            return cls.exit(int(query.get("code", "1")))
        if kind is FaultKind.BUSY:
            return cls.busy_with(float(query.get("n", "1")))
        if kind is FaultKind.METRICS:
            return cls.metrics(int(query.get("status", "500")))
        count = query.get("count")
        counted = None if count is None else int(count)
        if kind is FaultKind.GENERATE_HANG:
            return cls.generate_hang(counted)
        if kind is FaultKind.GENERATE_ERROR:
            return cls.generate_error(int(query.get("status", "500")), counted)
        return cls(kind)


async def inject_fault(port: int, fault: Fault) -> None:
    """POST `fault` to the fake rank on `port` (loopback), for tests and benchmarks that
    run the CLI by ports rather than through a `Deployment`. Raises httpx's errors; an
    exit fault may close the connection before its answer, which the caller may expect."""
    import httpx  # here: the fake rank imports this module and must not pay for httpx

    async with httpx.AsyncClient(trust_env=False) as client:
        (await client.post(fault.url(port))).raise_for_status()
