# -*- test-case-name: tests.test_client_tls -*-
"""
Client-side TLS on the standard library's C{ssl} module, for the client's
HTTPS connections.

Twisted's own TLS layer (L{twisted.protocols.tls}, pyOpenSSL) encrypts in
16 KiB steps driven from Python, with several copies per step; uploading
1 GiB over HTTPS cost the client about 1.6 times the CPU of upstream's
client, which uses the stdlib's C{ssl}. The daemon's server side already
runs on C{ssl.SSLObject} over two C{MemoryBIO}s
(L{imageio.web._tls.TLSServerProtocol}); the client reuses that protocol
with a client-side C{SSLObject}: it starts the handshake when connected,
and verifies the server's certificate and host name (DNS name or IP
address) against C{cafile} or the system's trust store.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from imageio.web import TLSServerFactory, TLSServerProtocol

#: Seconds the server gets to complete the handshake.
HANDSHAKE_TIMEOUT = 30.0

#: Largest socket read of a client connection (Twisted reads 64 KiB): a
#: download is received in fewer, larger pieces, with fewer trips through
#: the reactor, TLS and the HTTP parser.
READ_SIZE = 256 * 1024

#: Largest send of a client connection (Twisted sends 128 KiB per reactor
#: iteration).
SEND_SIZE = 1024 * 1024

#: Send buffer of a UNIX socket connection (the kernel's default is about
#: 208 KiB): an upload hands the kernel up to 1 MiB per wake-up, and the
#: daemon receives it in as large pieces. 20-40% faster uploads over the
#: UNIX socket at 10-15% less client CPU (bench/README.rst).
UNIX_SNDBUF = 1024 * 1024


def readMore(transport: object) -> None:
    """
    Let C{transport} (a Twisted TCP or UNIX socket transport) read up to
    L{READ_SIZE} bytes and send up to L{SEND_SIZE} bytes at once, and give a
    UNIX socket a send buffer of L{UNIX_SNDBUF}.
    """
    if isinstance(getattr(transport, "bufferSize", None), int):
        transport.bufferSize = READ_SIZE  # type: ignore[attr-defined]
    if isinstance(getattr(transport, "SEND_LIMIT", None), int):
        transport.SEND_LIMIT = SEND_SIZE  # type: ignore[attr-defined]
    sock = getattr(transport, "socket", None)
    if isinstance(sock, socket.socket) and sock.family == socket.AF_UNIX:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)


def makeClientContext(cafile: str | None, secure: bool) -> ssl.SSLContext:
    """
    @return: A client context: TLS 1.2 at least, ALPN C{http/1.1}, and when
        C{secure}, the server verified against C{cafile} (the system's trust
        store when C{None} or empty).
    @raise ValueError: If C{cafile} cannot be read or holds no certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    if not secure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if not cafile:
        context.load_default_certs()
        return context
    try:
        context.load_verify_locations(cafile=cafile)
    except OSError as e:
        if isinstance(e, ssl.SSLError):
            raise ValueError(f"No usable certificate in CA file {cafile}: {e}") from e
        raise ValueError(f"Cannot read CA file {cafile}: {e.strerror}") from e
    return context


@frozen
class _ClientSide:
    """
    What L{TLSServerProtocol} calls C{context}: wraps BIOs for the client
    side of a connection to C{hostname}.
    """

    context: ssl.SSLContext
    hostname: str

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, **_: Any) -> Any:
        return self.context.wrap_bio(
            incoming, outgoing, server_side=False, server_hostname=self.hostname
        )


class TLSClientProtocol(TLSServerProtocol):
    """
    The client side of one TLS connection: L{TLSServerProtocol} with a
    client C{SSLObject}, sending its hello as soon as TCP connects.
    """

    def makeConnection(self, transport: Any) -> None:
        readMore(transport)
        super().makeConnection(transport)

    def connectionMade(self) -> None:
        super().connectionMade()
        if not self._handshakeDone and self._reason is None and not self._aborted:
            self._doHandshake()


class TLSClientFactory(TLSServerFactory):
    """
    Wraps a client factory so its protocols talk TLS to the server.
    """

    def buildProtocol(self, addr: Any) -> TLSClientProtocol | None:
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return TLSClientProtocol(self, wrapped)


@implementer(IStreamClientEndpoint)
@frozen
class TLSClientEndpoint:
    """
    Connects through C{wrapped} (TCP) and speaks TLS to the server.
    """

    reactor: Any
    wrapped: IStreamClientEndpoint
    context: ssl.SSLContext
    hostname: str

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        factory = TLSClientFactory(
            protocolFactory,
            _ClientSide(self.context, self.hostname),  # type: ignore[arg-type]
            self.reactor,
            HANDSHAKE_TIMEOUT,
        )
        d: Deferred[Any] = self.wrapped.connect(factory)
        return d.addCallback(lambda protocol: protocol.wrappedProtocol)


@implementer(IAgentEndpointFactory)
@frozen
class TLSEndpointFactory:
    """
    Endpoints for an L{twisted.web.client.Agent}: C{https} URLs over
    L{TLSClientEndpoint}, C{http} ones over plain TCP.
    """

    reactor: Any
    context: ssl.SSLContext
    connectTimeout: float

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        tcp = HostnameEndpoint(self.reactor, uri.host, uri.port, timeout=self.connectTimeout)
        if uri.scheme != b"https":
            return tcp
        hostname = uri.host.decode("ascii").strip("[]")
        return TLSClientEndpoint(self.reactor, tcp, self.context, hostname)
