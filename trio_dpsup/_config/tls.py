"""TLS: the control plane over HTTPS, and the verification of ranks that serve HTTPS."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass

from .._errors import ConfigError
from .config import SupervisorConfig
from .enums import WILDCARD_HOSTS, RankScheme


@dataclass(frozen=True)
class TlsFiles:
    """The control plane's HTTPS: certificate chain, key, and the CA that client
    certificates must be signed by (None: no client certificates asked for)."""

    certfile: str
    keyfile: str
    client_ca: str | None = None

    @classmethod
    def of(cls, config: SupervisorConfig) -> TlsFiles | None:
        if config.ssl_certfile is None or config.ssl_keyfile is None:
            return None
        return cls(config.ssl_certfile, config.ssl_keyfile, config.ssl_ca_certs)


__all__ = [
    "WILDCARD_HOSTS",
    "TlsFiles",
    "check_tls",
    "is_loopback",
    "peer_context",
    "rank_verify",
]


def check_tls(config: SupervisorConfig) -> None:
    """Load every certificate, key and CA file now, so that a bad one is a ConfigError before
    anything starts (the control plane and the prober load them again when they need them)."""
    if config.rank_scheme is RankScheme.HTTPS:
        rank_verify(config.host, config.rank_ca_certs)
    if config.group_peers or config.peer_ca_certs or config.peer_certfile:
        peer_context(config.peer_ca_certs, config.peer_certfile, config.peer_keyfile)
    if config.ssl_certfile is None or config.ssl_keyfile is None:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(config.ssl_certfile, config.ssl_keyfile)
        if config.ssl_ca_certs is not None:
            context.load_verify_locations(config.ssl_ca_certs)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot use --ssl-certfile {config.ssl_certfile} / --ssl-keyfile "
            f"{config.ssl_keyfile}: {exc}: give a PEM certificate chain and its private key"
        ) from exc


def rank_verify(host: str, ca_certs: str | None) -> ssl.SSLContext | bool:
    """What the prober verifies HTTPS ranks on `host` with (httpx's `verify`), given
    --rank-ca-certs `ca_certs`."""
    if ca_certs is not None:
        try:
            return ssl.create_default_context(cafile=ca_certs)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"cannot use --rank-ca-certs {ca_certs}: {exc}: give a PEM CA bundle"
            ) from exc
    # Ranks on loopback hold self-signed certificates; nothing between us and them to fear.
    return not is_loopback(host)


def is_loopback(host: str) -> bool:
    # Wildcards are probed on loopback.
    if host == "localhost" or host in WILDCARD_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def peer_context(ca_certs: str | None, certfile: str | None, keyfile: str | None) -> ssl.SSLContext:
    """What this member verifies the other members' HTTPS control planes with
    (--peer-ca-certs; the system's CAs without it), showing --peer-certfile where a member
    asks for a client certificate."""
    try:
        context = ssl.create_default_context(cafile=ca_certs)
        if certfile is not None:
            context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"cannot use --peer-ca-certs {ca_certs} / --peer-certfile {certfile} / "
            f"--peer-keyfile {keyfile}: {exc}: give a PEM CA bundle, certificate chain and key"
        ) from exc
    return context
