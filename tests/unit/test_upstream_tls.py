"""The upstream endpoint's own TLS layer, against a real TLS server, on both event loops."""

from __future__ import annotations

import asyncio
import errno
import os
import ssl
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from neonlocal.config.values import BranchSettings, Secret
from neonlocal.proxy import tls
from neonlocal.proxy.endpoint import PeerClosed, UpstreamEndpoint
from neonlocal.targets import Target, build_target
from neonlocal.tls.certs import CertificateAuthority

HOST = "ep-tls-100001.us-east-2.aws.neon.tech"

ServerHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate, server key) for HOST."""
    ca = CertificateAuthority.create("upstream TLS test CA")
    pair = ca.issue([HOST])
    directory = tmp_path_factory.mktemp("tls")
    paths = (directory / "ca.crt", directory / "server.crt", directory / "server.key")
    for path, data in zip(paths, (ca.cert_pem, pair.cert_pem, pair.key_pem), strict=True):
        path.write_bytes(data)
    return paths


def loop_factories() -> list[Any]:
    factories: list[Any] = [pytest.param(None, id="asyncio")]
    try:
        import uvloop
    except ImportError:
        return factories
    return [*factories, pytest.param(uvloop.Loop, id="uvloop")]


@pytest.fixture(params=loop_factories())
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    """Runs a coroutine to completion on the event loop under test."""

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=request.param) as loop_runner:
            return loop_runner.run(asyncio.wait_for(coro, 30))

    return runner


def client_context(ca_file: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file))


async def serve(tls_files: tuple[Path, Path, Path], handler: ServerHandler) -> asyncio.Server:
    _ca, cert, key = tls_files
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return await asyncio.start_server(handler, "127.0.0.1", 0, ssl=context)


async def connect(server: asyncio.Server, ca_file: Path, hostname: str = HOST) -> UpstreamEndpoint:
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    _transport, endpoint = await loop.create_connection(UpstreamEndpoint, "127.0.0.1", port)
    await endpoint.start_tls(client_context(ca_file), server_hostname=hostname)
    return endpoint


async def read_all(endpoint: UpstreamEndpoint) -> bytes:
    received = bytearray()
    while True:
        try:
            received += await endpoint.recv()
        except PeerClosed:
            return bytes(received)


def test_a_large_answer_spanning_many_tls_records_arrives_intact(
    tls_files: tuple[Path, Path, Path], run: Callable[[Coroutine[Any, Any, Any]], Any]
) -> None:
    payload = bytes(range(256)) * 12_000  # about 3 MB: hundreds of records, many socket reads

    async def handler(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    async def scenario() -> tuple[bytes, int]:
        async with await serve(tls_files, handler) as server:
            endpoint = await connect(server, tls_files[0])
            data = await read_all(endpoint)
            endpoint.close()
            return data, endpoint.bytes_in

    data, counted = run(scenario())
    assert data == payload
    assert counted == len(payload)


def test_the_servers_close_notify_is_reported_once_as_end_of_stream(
    tls_files: tuple[Path, Path, Path], run: Callable[[Coroutine[Any, Any, Any]], Any]
) -> None:
    async def handler(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"goodbye")
        await writer.drain()
        writer.close()  # TLS shutdown: close_notify, then the TCP close

    async def scenario() -> tuple[bytes, int, bool]:
        async with await serve(tls_files, handler) as server:
            endpoint = await connect(server, tls_files[0])
            eofs = 0

            def on_eof() -> bool:
                nonlocal eofs
                eofs += 1
                return False

            endpoint.on_eof = on_eof
            data = await read_all(endpoint)
            await asyncio.wait_for(endpoint.closed, 5)
            return data, eofs, endpoint.lost

    data, eofs, lost = run(scenario())
    assert data == b"goodbye"
    assert eofs == 1
    assert lost


def test_many_small_writes_arrive_encrypted_and_in_order(
    tls_files: tuple[Path, Path, Path], run: Callable[[Coroutine[Any, Any, Any]], Any]
) -> None:
    chunks = [f"message {i};".encode() for i in range(2000)]
    received: asyncio.Queue[bytes] = asyncio.Queue()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await received.put(await reader.read())  # up to the client's close
        writer.close()

    async def scenario() -> bytes:
        async with await serve(tls_files, handler) as server:
            endpoint = await connect(server, tls_files[0])
            for chunk in chunks:
                endpoint.send(chunk)
            endpoint.close()
            return await asyncio.wait_for(received.get(), 10)

    assert run(scenario()) == b"".join(chunks)


def test_closing_says_goodbye_in_tls_so_the_server_reads_a_clean_end(
    tls_files: tuple[Path, Path, Path], run: Callable[[Coroutine[Any, Any, Any]], Any]
) -> None:
    """A server that insists on close_notify (as asyncio's TLS does) sees EOF, not an error."""
    outcome: asyncio.Queue[str] = asyncio.Queue()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.read()
            await outcome.put(f"eof after {data!r}")
        except (ssl.SSLError, ConnectionError) as exc:
            await outcome.put(f"error: {exc!r}")
        writer.close()

    async def scenario() -> str:
        async with await serve(tls_files, handler) as server:
            endpoint = await connect(server, tls_files[0])
            endpoint.write(b"X\x00\x00\x00\x04")
            endpoint.close()
            return await asyncio.wait_for(outcome.get(), 10)

    assert run(scenario()) == "eof after b'X\\x00\\x00\\x00\\x04'"


def test_a_certificate_for_another_name_fails_the_handshake(
    tls_files: tuple[Path, Path, Path], run: Callable[[Coroutine[Any, Any, Any]], Any]
) -> None:
    async def handler(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    async def scenario() -> None:
        async with await serve(tls_files, handler) as server:
            await connect(server, tls_files[0], hostname="ep-other-1.us-east-2.aws.neon.tech")

    with pytest.raises(ssl.SSLCertVerificationError):
        run(scenario())


def test_a_server_that_hangs_up_mid_handshake_reads_as_peer_closed(
    run: Callable[[Coroutine[Any, Any, Any]], Any], tls_files: tuple[Path, Path, Path]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the ClientHello has begun: hang up without answering
        writer.close()

    async def scenario() -> None:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)  # plain TCP
        async with server:
            await connect(server, tls_files[0])

    with pytest.raises(PeerClosed):
        run(scenario())


def test_closing_when_the_half_close_fails_drops_the_connection_quietly(
    tls_files: tuple[Path, Path, Path],
) -> None:
    """`neonlocal use --terminate` closes sessions whose server may have reset a moment
    ago; the standard loop's half-close then raises ENOTCONN, which must not escape."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    async def scenario() -> bool:
        async with await serve(tls_files, handler) as server:
            endpoint = await connect(server, tls_files[0])
            transport = endpoint.transport
            assert transport is not None

            def reset_already(*_args: object) -> None:
                raise OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN))

            # What the kernel answers once a reset has arrived that the loop has not read.
            transport.write_eof = reset_already  # type: ignore[method-assign]
            endpoint.close()
            await asyncio.wait_for(endpoint.closed, 10)
            return endpoint.lost

    with asyncio.Runner() as runner:  # the standard loop: its transports can be patched
        assert runner.run(scenario())


# --- which CAs a branch trusts --------------------------------------------------------------


def _target(sslrootcert: str | None) -> Target:
    url = f"postgresql://u:pw@{HOST}/db"
    if sslrootcert is not None:
        url += f"?sslrootcert={sslrootcert}"
    return build_target("b", BranchSettings(url=Secret(url)))


def _trusted(context: ssl.SSLContext) -> set[str]:
    return {dict(part[0] for part in ca["subject"])["commonName"] for ca in context.get_ca_certs()}


def test_a_branch_with_sslrootcert_trusts_that_file_only_as_libpq_does(
    tls_files: tuple[Path, Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CA in the system store does not vouch for a branch whose URL names its own CA."""
    elsewhere = tmp_path / "system.pem"
    elsewhere.write_bytes(CertificateAuthority.create("some system CA").cert_pem)
    monkeypatch.setenv("SSL_CERT_FILE", str(elsewhere))  # OpenSSL's default store, for now
    tls.forget_contexts()
    try:
        own_ca = str(tls_files[0])
        assert _trusted(tls.client_context(_target(own_ca))) == {"upstream TLS test CA"}
        assert _trusted(tls.client_context(_target("system"))) == {"some system CA"}
        assert _trusted(tls.client_context(_target(None))) == {"some system CA"}
    finally:
        tls.forget_contexts()
