"""Routers the supervisor feeds (``--router KIND=URL``): which kinds there are and how one is
written. Each rank's URL is registered with every router once it serves and taken out before
it stops (see _plane/routers.py); a kind is one client of a router's worker API.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from urllib.parse import urlsplit

from .._errors import ConfigError

__all__ = ["RouterKind", "RouterSpec", "check_routers", "parse_router"]


class RouterKind(enum.Enum):
    #: sgl-router (``sglang-router`` on PyPI, the Rust router SGLang users run): its worker
    #: API, ``POST /workers``, ``GET /workers``, ``DELETE /workers/{worker_id}``.
    SGLANG = "sglang"


@dataclass(frozen=True)
class RouterSpec:
    kind: RouterKind
    #: The router's own address, without a trailing slash: ``http://10.0.0.5:30000``.
    url: str

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    def __str__(self) -> str:
        return f"{self.kind.value}={self.url}"


_FORM = "--router KIND=URL, e.g. --router sglang=http://127.0.0.1:30000"


def parse_router(option: str, text: str) -> RouterSpec:
    """``sglang=http://host:port`` as a RouterSpec; ConfigError naming the kinds and the
    form for anything else."""
    kinds = ", ".join(k.value for k in RouterKind)
    kind, equals, url = text.partition("=")
    if not equals:
        raise ConfigError(f"{option} {text!r} has no '=': write {_FORM} (kinds: {kinds})")
    try:
        member = RouterKind(kind)
    except ValueError:
        raise ConfigError(
            f"{option} {text!r}: unknown router kind {kind!r}; the kinds are: {kinds} ({_FORM})"
        ) from None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError as exc:
        raise ConfigError(f"{option} {text!r}: {exc}: {_FORM}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{option} {text!r}: the router's URL must be http:// or https:// with a host: {_FORM}"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(
            f"{option} {text!r}: give the router's address alone, without a path: {_FORM}"
        )
    return RouterSpec(member, f"{parts.scheme}://{parts.netloc}")


def check_routers(option: str, value: tuple[str, ...]) -> None:
    seen: set[RouterSpec] = set()
    for text in value:
        spec = parse_router(option, text)
        if spec in seen:
            raise ConfigError(f"{option} {spec} is given twice: give each router once")
        seen.add(spec)
