# -*- test-case-name: tests.test_client_connect -*-
"""
The client's connections to a server: HTTP/1.1 over the server's UNIX
socket, over TCP, or over TLS on TCP (L{imageio.client._tls}, the stdlib's
C{ssl}), opened with the reactor's C{connectUNIX} and C{connectTCP}.

L{HTTPPool} does what C{twisted.web.client.Agent} with an
C{HTTPConnectionPool} did for the client, with the same HTTP/1.1 protocol
(and parser): it keeps idle persistent connections for reuse, and sends a
request without a body again on a fresh connection if a reused one turned
out closed. C{Agent} is not used because C{twisted.web.client} imports
C{twisted.internet.endpoints}, which imports pyOpenSSL and cryptography:
about a third of the client's start-up CPU, for TLS the client does not
use.

Connections are tuned for large transfers (L{tuneSocket}).
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from attrs import define, field
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.error import DNSLookupError, NotConnectingError
from twisted.internet.interfaces import IAddress, IConnector, IResolutionReceiver
from twisted.internet.protocol import ClientFactory
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from imageio.backends.httpclient import (
    HTTP11ClientProtocol,
    Request,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseNeverReceived,
)

#: Largest socket read of a client connection (Twisted reads 64 KiB): a
#: download is received in fewer, larger pieces, with fewer trips through
#: the reactor, TLS and the HTTP parser.
READ_SIZE = 256 * 1024

#: Largest send of a client connection (Twisted sends 128 KiB per reactor
#: iteration).
SEND_SIZE = 1024 * 1024

#: Send buffer of a UNIX socket connection (the kernel's default is about
#: 208 KiB): an upload hands the kernel up to 1 MiB per wake-up, and the
#: daemon receives it in as large pieces (bench/README.rst).
UNIX_SNDBUF = 1024 * 1024

#: Methods sent again on a fresh connection when a reused one was closed
#: before answering (as Twisted's pool does), if they have no body.
RETRIED_METHODS = (b"GET", b"HEAD", b"OPTIONS")


def tuneSocket(transport: object) -> None:
    """
    Let C{transport} (a Twisted TCP or UNIX socket transport) read up to
    L{READ_SIZE} bytes and send up to L{SEND_SIZE} bytes at once, and give a
    UNIX socket a send buffer of L{UNIX_SNDBUF}. Anything else is left alone.
    """
    if isinstance(getattr(transport, "bufferSize", None), int):
        transport.bufferSize = READ_SIZE  # type: ignore[attr-defined]
    if isinstance(getattr(transport, "SEND_LIMIT", None), int):
        transport.SEND_LIMIT = SEND_SIZE  # type: ignore[attr-defined]
    sock = getattr(transport, "socket", None)
    if isinstance(sock, socket.socket) and sock.family == socket.AF_UNIX:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)


class _Connection(HTTP11ClientProtocol):  # type: ignore[misc]
    """
    An HTTP/1.1 client connection that tells C{connected} once the socket
    is connected (before the TLS handshake, as Twisted's endpoints do).
    """

    def __init__(self, quiescent: Callable[[Any], object], connected: Deferred[Any]) -> None:
        super().__init__(quiescent)
        self._connected: Deferred[Any] | None = connected

    def connectionMade(self) -> None:
        super().connectionMade()
        tuneSocket(self.transport)
        d, self._connected = self._connected, None
        if d is not None and not d.called:
            d.callback(self)


class _Factory(ClientFactory):
    """
    Builds one connection and reports the connection's failure.
    """

    noisy = False

    def __init__(self, protocol: _Connection, connected: Deferred[Any]) -> None:
        self._protocol = protocol
        self._connected = connected

    def buildProtocol(self, addr: IAddress | None) -> _Connection:
        return self._protocol

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if not self._connected.called:
            self._connected.errback(reason)

    def clientConnectionLost(self, connector: IConnector, reason: Failure) -> None:
        self.clientConnectionFailed(connector, reason)


def resolve(reactor: Any, host: str, port: int) -> Deferred[list[str]]:
    """
    @return: The addresses of C{host} (IPv4 and IPv6, from the reactor's
        name resolver, C{getaddrinfo} on its thread pool); an IP address
        as it is.
    @raise DNSLookupError: (In the Deferred) if C{host} has no address.
    """
    if isIPAddress(host) or isIPv6Address(host):
        return succeed([host])
    done: Deferred[list[str]] = Deferred()
    addresses: list[str] = []

    @implementer(IResolutionReceiver)
    class Receiver:
        def resolutionBegan(self, resolution: object) -> None:
            pass

        def addressResolved(self, address: Any) -> None:
            if address.host not in addresses:
                addresses.append(address.host)

        def resolutionComplete(self) -> None:
            if addresses:
                done.callback(addresses)
            else:
                done.errback(DNSLookupError(f"Cannot resolve {host}"))

    reactor.nameResolver.resolveHostName(Receiver(), host, port)
    return done


@define(eq=False)
class HTTPPool:
    """
    Sends requests to one server (C{request}, as C{Agent.request}) over
    connections it opens (L{connect}) and keeps while idle
    (C{closeCachedConnections}, as C{HTTPConnectionPool}).

    @ivar unixSocket: Connect to this UNIX socket (an abstract one when it
        starts with a NUL) instead of the URL's host and port.
    @ivar tls: Speak TLS on TCP connections with this context (C{https}
        URLs); C{None} for plain HTTP.
    @ivar maxIdle: Idle connections kept.
    @ivar idleTimeout: Seconds an idle connection is kept.
    """

    reactor: Any
    connectTimeout: float
    unixSocket: str | None = None
    tls: ssl.SSLContext | None = None
    maxIdle: int = 2
    idleTimeout: float = 30
    _idle: list[tuple[Any, Any]] = field(factory=list, init=False)

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        """
        Send a request to C{uri} (C{http://} or C{https://}; over the UNIX
        socket, only its path and query count).

        @return: A Deferred firing with the response once its headers
            arrived. Cancelling it stops connecting or closes the connection.
        """
        parts = urlsplit(uri.decode("ascii"))
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = headers.copy() if headers is not None else Headers()
        if not headers.hasHeader(b"host"):
            headers.addRawHeader(b"host", parts.netloc.encode("ascii"))
        host = parts.hostname or "localhost"
        port = parts.port or (443 if parts.scheme == "https" else 80)
        secure = parts.scheme == "https"
        built = Request(method, path.encode("ascii"), headers, bodyProducer, persistent=True)
        return ensureDeferred(self._request(built, host, port, secure))

    async def _request(self, request: Any, host: str, port: int, secure: bool) -> IResponse:
        connection = self._takeIdle()
        if connection is not None:
            try:
                response: IResponse = await connection.request(request)
                return response
            except (RequestNotSent, RequestTransmissionFailed, ResponseNeverReceived) as e:
                if not self._retry(request, e):
                    raise
        connection = await self.connect(host, port, secure)
        response = await connection.request(request)
        return response

    def _retry(self, request: Any, e: Exception) -> bool:
        if request.method not in RETRIED_METHODS or request.bodyProducer is not None:
            return False
        reasons = getattr(e, "reasons", None) or []
        return not any(r.check(CancelledError) for r in reasons)

    def _takeIdle(self) -> Any:
        while self._idle:
            connection, call = self._idle.pop()
            if call.active():
                call.cancel()
            if connection.state == "QUIESCENT":
                return connection
        return None

    def _quiescent(self, connection: Any) -> None:
        if len(self._idle) >= self.maxIdle:
            connection.transport.loseConnection()
            return
        call = self.reactor.callLater(self.idleTimeout, self._expire, connection)
        self._idle.append((connection, call))

    def _expire(self, connection: Any) -> None:
        self._idle = [(c, call) for c, call in self._idle if c is not connection]
        connection.transport.loseConnection()

    async def connect(self, host: str, port: int, secure: bool) -> Any:
        """
        Open a connection: to the UNIX socket if there is one, otherwise to
        each address of C{host} in turn until one answers.

        @return: The connected HTTP/1.1 client protocol.
        """
        if self.unixSocket is not None:
            path = self.unixSocket
            return await self._attempt(
                lambda f: self.reactor.connectUNIX(path, f, timeout=self.connectTimeout)
            )
        addresses = await resolve(self.reactor, host, port)
        for i, address in enumerate(addresses):
            try:
                return await self._attempt(
                    lambda f, address=address: self.reactor.connectTCP(  # type: ignore[misc]
                        address, port, self._wrap(f, host, secure), timeout=self.connectTimeout
                    )
                )
            except CancelledError:
                raise
            except Exception:
                if i == len(addresses) - 1:
                    raise
        raise AssertionError("not reached")

    def _wrap(self, factory: ClientFactory, host: str, secure: bool) -> Any:
        if not secure:
            return factory
        if self.tls is None:
            raise ValueError("An https URL needs a TLS context")
        from imageio.client import _tls

        return _tls.wrapFactory(self.reactor, factory, self.tls, host.strip("[]"))

    async def _attempt(self, connect: Callable[[ClientFactory], IConnector]) -> Any:
        connector: IConnector | None = None

        def cancel(d: Deferred[Any]) -> None:
            if connector is not None:
                try:
                    connector.stopConnecting()
                except NotConnectingError:
                    # Connected: the connection is closed by its protocol
                    # (HTTP11ClientProtocol cancels its request).
                    pass

        connected: Deferred[Any] = Deferred(cancel)
        protocol = _Connection(self._quiescent, connected)
        connector = connect(_Factory(protocol, connected))
        return await connected

    def closeCachedConnections(self) -> Deferred[None]:
        """
        Close the idle connections.

        @return: A Deferred firing once they are closed.
        """
        from twisted.internet.defer import DeferredList

        idle, self._idle = self._idle, []
        ds = []
        for connection, call in idle:
            if call.active():
                call.cancel()
            ds.append(connection.abort())
        return DeferredList(ds, consumeErrors=True).addCallback(lambda _: None)
