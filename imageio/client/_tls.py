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

import ssl
from typing import Any

from attrs import frozen
from twisted.internet.interfaces import IProtocolFactory

from imageio.client._connect import tuneSocket
from imageio.web import TLSServerFactory, TLSServerProtocol

#: Seconds the server gets to complete the handshake.
HANDSHAKE_TIMEOUT = 30.0


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
        tuneSocket(transport)
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

    # What the reactor's connectTCP tells a client factory: passed on.

    def startedConnecting(self, connector: Any) -> None:
        pass

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        wrapped: Any = self.wrappedFactory
        wrapped.clientConnectionFailed(connector, reason)

    def clientConnectionLost(self, connector: Any, reason: Any) -> None:
        wrapped: Any = self.wrappedFactory
        wrapped.clientConnectionLost(connector, reason)


def wrapFactory(
    reactor: Any, factory: IProtocolFactory, context: ssl.SSLContext, hostname: str
) -> TLSClientFactory:
    """
    @return: A factory for TCP connections that speak TLS to C{hostname}
        (verified as C{context} says) and HTTP through C{factory}'s
        protocols.
    """
    return TLSClientFactory(
        factory,
        _ClientSide(context, hostname),  # type: ignore[arg-type]
        reactor,
        HANDSHAKE_TIMEOUT,
    )
