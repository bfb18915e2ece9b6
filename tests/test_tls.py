"""TLS: an HTTPS control plane (also with client certificates), and ranks serving HTTPS."""

from __future__ import annotations

import signal
import ssl
from pathlib import Path

import httpx
import pytest
import trio
import trustme

from trio_dpsup.testing import free_port_range, open_cli_supervisor, run_cli

from .conftest import cli_args


class Certs:
    def __init__(self, directory: Path) -> None:
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(self.ca_file)
        server = self.ca.issue_cert("127.0.0.1", "localhost")
        self.cert = directory / "server.pem"
        self.key = directory / "server.key"
        server.cert_chain_pems[0].write_to_path(self.cert)
        server.private_key_pem.write_to_path(self.key)
        client = self.ca.issue_cert("client@example")
        self.client = directory / "client.pem"
        client.private_key_and_cert_chain_pem.write_to_path(self.client)

    def client_context(self, *, with_cert: bool = False) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if with_cert:
            context.load_cert_chain(str(self.client))
        return context


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    return Certs(tmp_path)


async def test_control_plane_over_https(certs: Certs) -> None:
    options = ["--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key)]
    async with open_cli_supervisor(cli_args(2, free_port_range(2), options=options)) as sup:
        url = await sup.wait_ready()
        assert url.startswith("https://127.0.0.1:")
        async with httpx.AsyncClient(verify=certs.client_context()) as client:
            assert (await client.get(f"{url}/ready")).status_code == 200
        async with httpx.AsyncClient(verify=ssl.create_default_context()) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(f"{url}/ready")  # our CA is not the system's
        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0


async def test_client_certificates_when_a_client_ca_is_given(certs: Certs) -> None:
    options = [
        "--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key),
        "--ssl-ca-certs", str(certs.ca_file),
    ]  # fmt: skip
    async with open_cli_supervisor(cli_args(1, free_port_range(1), options=options)) as sup:
        url = await sup.wait_ready()
        async with httpx.AsyncClient(verify=certs.client_context(with_cert=True)) as client:
            assert (await client.get(f"{url}/ready")).status_code == 200
        async with httpx.AsyncClient(verify=certs.client_context()) as client:
            with pytest.raises(httpx.TransportError):
                await client.get(f"{url}/ready")
        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0


@pytest.mark.parametrize("verify", ["loopback-unverified", "ca"])
async def test_ranks_serving_https(certs: Certs, verify: str) -> None:
    options = ["--rank-scheme", "https"]
    if verify == "ca":
        options += ["--rank-ca-certs", str(certs.ca_file)]
    rank_args = ["--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key)]
    args = cli_args(2, free_port_range(2), options=options, rank_args=rank_args)
    async with open_cli_supervisor(args) as sup:
        await sup.wait_ready()
        status = await sup.status()
        assert all(r.last_probe is not None and r.last_probe.ok for r in status.ranks)
        sup.send_signal(signal.SIGTERM)
        assert await sup.wait() == 0


async def test_ranks_with_a_certificate_from_another_ca_never_become_ready(
    certs: Certs, tmp_path: Path
) -> None:
    other = trustme.CA()
    other_file = tmp_path / "other-ca.pem"
    other.cert_pem.write_to_path(other_file)
    options = ["--rank-scheme", "https", "--rank-ca-certs", str(other_file)]
    options += ["--startup-timeout", "1"]
    rank_args = ["--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key)]
    args = cli_args(1, free_port_range(1), options=options, rank_args=rank_args)
    async with open_cli_supervisor(args) as sup:
        assert await sup.wait() == 1
    assert "startup timed out after 1s; ranks not ready: 0" in sup.log


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--ssl-certfile", "CERT"], "--ssl-certfile and --ssl-keyfile go together"),
        (["--ssl-certfile", "CA", "--ssl-keyfile", "CA"], "cannot use --ssl-certfile"),
        (["--ssl-ca-certs", "CA"], "pass --ssl-certfile and --ssl-keyfile too"),
        (["--rank-ca-certs", "CA"], "--rank-ca-certs verifies HTTPS ranks"),
        (["--rank-scheme", "https", "--rank-ca-certs", "CERT.key"], "--rank-ca-certs"),
        (["--ssl-certfile", "/nope", "--ssl-keyfile", "/nope"], "/nope is not a file"),
    ],
)
async def test_bad_tls_options_exit_2(certs: Certs, options: list[str], message: str) -> None:
    files = {"CERT": str(certs.cert), "CA": str(certs.ca_file), "CERT.key": str(certs.key)}
    options = [files.get(o, o) for o in options]
    status, _, stderr = await run_cli([*cli_args(1, free_port_range(1), options=options)], env=None)
    assert status == 2, stderr
    assert message in stderr


def member_options(certs: Certs, control: int, peers: list[int], member: int) -> list[str]:
    """A member of a group of two on loopback: HTTPS asking for client certificates, and
    asking its `peers` over HTTPS, verified by our CA."""
    return [
        "--control-port", str(control),
        "--ssl-certfile", str(certs.cert), "--ssl-keyfile", str(certs.key),
        "--ssl-ca-certs", str(certs.ca_file),
        "--group", "--group-member", str(member), "--group-size", "2",
        *(f"--group-peer=https://127.0.0.1:{peer}" for peer in peers),
        "--peer-ca-certs", str(certs.ca_file),
        "--start-rank", str(member), "--peer-timeout", "2", "--startup-timeout", "4",
    ]  # fmt: skip


async def test_members_of_a_group_watch_each_other_over_mutual_tls(certs: Certs) -> None:
    base = free_port_range(4)  # two ranks, then two control planes
    client = ["--peer-certfile", str(certs.client), "--peer-keyfile", str(certs.client)]
    a = [*member_options(certs, base + 2, [base + 3], 0), *client]
    b = [*member_options(certs, base + 3, [base + 2], 1), *client]
    async with (
        open_cli_supervisor(cli_args(1, base, options=a)) as member_a,
        open_cli_supervisor(cli_args(1, base + 1, options=b)) as member_b,
    ):
        with trio.fail_after(60):
            for member in (member_a, member_b):
                await member.wait_for_line(r"the group is ready: all 2 members")
        member_b.send_signal(signal.SIGTERM)
        with trio.fail_after(30):
            assert await member_b.wait() == 0
            assert await member_a.wait() == 0


async def test_a_member_without_a_client_certificate_is_never_heard(certs: Certs) -> None:
    # A star: the hub asks no one; the worker asks it, with no client certificate to show.
    base = free_port_range(4)
    hub = member_options(certs, base + 2, [], 0)
    worker = member_options(certs, base + 3, [base + 2], 1)
    async with (
        open_cli_supervisor(cli_args(1, base, options=hub)) as member_a,
        open_cli_supervisor(cli_args(1, base + 1, options=worker)) as member_b,
    ):
        with trio.fail_after(30):
            assert await member_b.wait() == 1
            assert await member_a.wait() == 1
    assert "group failed: member 1 never appeared within --startup-timeout 4s" in member_a.log
    assert "group failed: member 0 never appeared within --startup-timeout 4s" in member_b.log
