"""Opening a connection to a branch: TCP, SSLRequest, TLS with SNI, verified certificate.

Every way this can fail becomes an ``UpstreamError`` with a SQLSTATE and a one-line cause
that the session turns into the client's ErrorResponse.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from dataclasses import dataclass

import structlog

from neonlocal.config.values import TlsMode
from neonlocal.errors import Refusal
from neonlocal.pgwire import codec, sqlstate
from neonlocal.proxy import tls
from neonlocal.proxy.addresses import AddressBook
from neonlocal.proxy.endpoint import Endpoint, NotTls, PeerClosed, UpstreamEndpoint
from neonlocal.targets import Negotiation, Target

log = structlog.get_logger("neonlocal.upstream")


class UpstreamError(Refusal):
    """Reaching a branch failed: ``message`` is the cause, without the branch's name;
    ``tls`` when TCP connected but TLS negotiation did not."""

    def __init__(
        self, message: str, code: str = sqlstate.UNABLE_TO_CONNECT, *, tls: bool = False
    ) -> None:
        super().__init__(message, code)
        self.tls = tls


@dataclass
class Upstream:
    endpoint: Endpoint
    certificate_der: bytes | None
    tls_version: str | None
    address: str
    direct_tls: bool = False


def _keepalive(sock: socket.socket | None) -> None:
    """Notice a peer that vanished (laptop suspend, NAT timeout) within a few minutes."""
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def describe_tls_error(exc: ssl.SSLError) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or exc.reason or "certificate verify failed"
        return f"certificate verify failed: {reason}"
    return f"TLS handshake failed: {exc.reason or exc}"


async def open_upstream(
    target: Target,
    *,
    timeout: float,
    keepalive: bool = True,
    addresses: AddressBook | None = None,
) -> Upstream:
    try:
        async with asyncio.timeout(timeout):
            return await _open(target, keepalive, addresses or AddressBook())
    except TimeoutError:
        # Neon's edge answers TCP and TLS at once even for a suspended compute (it wakes it
        # later, during the login), so a timeout here is the network or the host.
        raise UpstreamError(f"timed out after {timeout:g} s ([upstream] connect_timeout)") from None


class _NoDirectTls(Exception):
    """The server would not take a ClientHello as its first bytes (PostgreSQL 16 or older)."""


async def _open(target: Target, keepalive: bool, addresses: AddressBook) -> Upstream:
    direct = target.tries_direct_tls and not (
        target.negotiation is Negotiation.AUTO
        and addresses.refused_direct_tls(target.host, target.port)
    )
    try:
        return await _open_once(target, keepalive, addresses, direct=direct)
    except _NoDirectTls:
        # Learned once per server: from now on it gets the SSLRequest straight away.
        addresses.note_refused_direct_tls(target.host, target.port)
        log.info("direct_tls_refused", upstream=f"{target.host}:{target.port}", then="SSLRequest")
        return await _open_once(target, keepalive, addresses, direct=False)


async def _open_once(
    target: Target, keepalive: bool, addresses: AddressBook, *, direct: bool
) -> Upstream:
    transport, endpoint = await _connect(target, addresses)
    if keepalive:
        _keepalive(transport.get_extra_info("socket"))
    peer = transport.get_extra_info("peername")
    address = f"{peer[0]}:{peer[1]}" if peer else target.connect_host
    if target.tls is TlsMode.DISABLE:
        return Upstream(endpoint, None, None, address)
    if not direct:
        await _ssl_request(endpoint, transport)
    ssl_object = await _tls_handshake(target, endpoint, transport, direct=direct)
    der = ssl_object.getpeercert(binary_form=True)
    version = ssl_object.version()
    return Upstream(endpoint, der, version, address, direct_tls=direct)


async def _connect(
    target: Target, addresses: AddressBook
) -> tuple[asyncio.Transport, UpstreamEndpoint]:
    try:
        transport, protocol = await addresses.connect(
            target.connect_host, target.port, UpstreamEndpoint
        )
    except socket.gaierror as exc:
        raise UpstreamError(f"cannot resolve host {target.connect_host}: {exc.strerror}") from None
    except ConnectionRefusedError:
        raise UpstreamError("connection refused") from None
    except OSError as exc:
        raise UpstreamError(exc.strerror or str(exc)) from None
    assert isinstance(protocol, UpstreamEndpoint)
    return transport, protocol


async def _tls_handshake(
    target: Target, endpoint: UpstreamEndpoint, transport: asyncio.Transport, *, direct: bool
) -> ssl.SSLObject:
    """TLS with SNI and the certificate checked; _NoDirectTls when a guessed direct TLS
    should be retried the classic way."""
    # Only a guess (AUTO) may fall back; a URL that asked for direct TLS gets the error.
    may_fall_back = direct and target.negotiation is Negotiation.AUTO
    try:
        await endpoint.start_tls(tls.client_context(target), server_hostname=target.host)
    except (ssl.SSLError, PeerClosed, NotTls) as exc:
        transport.abort()
        if may_fall_back and not isinstance(exc, ssl.SSLCertVerificationError):
            raise _NoDirectTls from None
        raise _handshake_failure(exc, direct=direct) from None
    ssl_object = endpoint.ssl_object
    assert ssl_object is not None
    if direct and ssl_object.selected_alpn_protocol() != tls.ALPN:
        # As libpq 17: without the server's agreement on ALPN, the other end may not be
        # PostgreSQL at all.
        transport.abort()
        if may_fall_back:
            raise _NoDirectTls
        raise UpstreamError(
            f'the server did not agree to ALPN "{tls.ALPN}" in direct TLS', tls=True
        )
    return ssl_object


def _handshake_failure(exc: Exception, *, direct: bool) -> UpstreamError:
    if isinstance(exc, ssl.SSLError):
        return UpstreamError(describe_tls_error(exc), tls=True)
    if isinstance(exc, NotTls):
        return UpstreamError(
            "the server answered the TLS handshake with something that is not TLS",
            sqlstate.CONNECTION_FAILURE,
            tls=True,
        )
    if direct:
        return UpstreamError(
            "the server closed the connection during a direct TLS handshake: it may not "
            "support sslnegotiation=direct (PostgreSQL 17 or newer, Neon); remove it from "
            "the branch URL",
            sqlstate.CONNECTION_FAILURE,
            tls=True,
        )
    return UpstreamError(
        "connection lost during TLS handshake", sqlstate.CONNECTION_FAILURE, tls=True
    )


async def _ssl_request(endpoint: UpstreamEndpoint, transport: asyncio.Transport) -> None:
    """Ask for TLS the classic way; returns once the server said 'S'."""
    try:
        endpoint.write(codec.ssl_request())
        answer = await endpoint.recv()
    except PeerClosed:
        transport.abort()
        raise UpstreamError(
            "the server closed the connection during TLS negotiation",
            sqlstate.CONNECTION_FAILURE,
            tls=True,
        ) from None
    if answer[:1] != b"S":
        transport.abort()
        if answer[:1] == b"N":
            raise UpstreamError("the server does not support TLS", tls=True)
        raise UpstreamError(
            "unexpected answer to SSLRequest", sqlstate.CONNECTION_FAILURE, tls=True
        )
    if len(answer) > 1:
        # Bytes after 'S' but before the TLS handshake were not protected by TLS.
        transport.abort()
        raise UpstreamError("the server sent unencrypted data after accepting TLS", tls=True)


async def send_cancel(
    target: Target,
    process_id: int,
    secret: bytes,
    *,
    timeout: float,
    addresses: AddressBook | None = None,
) -> None:
    """Deliver a CancelRequest to the server a session is pinned to, over TLS with its SNI."""
    upstream = await open_upstream(target, timeout=timeout, keepalive=False, addresses=addresses)
    try:
        upstream.endpoint.write(codec.cancel_request(process_id, secret))
        # The server closes without answering once it has read the request.
        async with asyncio.timeout(timeout):
            await upstream.endpoint.closed
    except TimeoutError:
        pass
    finally:
        upstream.endpoint.close()
