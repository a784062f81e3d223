# -*- test-case-name: tests.test_client_connect -*-
"""
Tests for L{imageio.client._connect}: the client's connection pool, on a
memory reactor with string transports.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone, ConnectionRefusedError, DNSLookupError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from imageio.backends.httpclient import ResponseNeverReceived
from imageio.client import _connect
from imageio.client._connect import HTTPPool

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Body:
    """
    Collects a response body (the connection goes idle once it ends).
    """

    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None

    def makeConnection(self, transport: Any) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason


class _Resolver:
    """
    A name resolver answering from a table.
    """

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    def resolveHostName(self, receiver: Any, host: str, port: int = 0, *args: Any) -> Any:
        receiver.resolutionBegan(None)
        for address in self.table.get(host, []):
            receiver.addressResolved(IPv4Address("TCP", address, port))
        receiver.resolutionComplete()
        return None


class PoolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.pool = HTTPPool(self.reactor, 10, unixSocket="/run/test.sock", idleTimeout=30)

    def connected(self, index: int = -1) -> tuple[Any, StringTransport]:
        """
        Connect the pool's last (or C{index}th) UNIX connection attempt.
        """
        factory = self.reactor.unixClients[index][1]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def get(self, uri: bytes = b"http://localhost/images/t?x=1") -> Any:
        return self.pool.request(b"GET", uri, Headers({b"x-test": [b"1"]}))

    def answer(self, protocol: Any, d: Any) -> _Body:
        protocol.dataReceived(OK)
        response = self.successResultOf(d)
        body = _Body()
        response.deliverBody(body)
        return body

    def test_requestOverUnixSocket(self) -> None:
        """
        A request connects to the UNIX socket with the connect timeout and
        sends the path, the query and a Host header from the URL.
        """
        d = self.get()
        [(path, _, timeout, _)] = self.reactor.unixClients
        self.assertEqual((path, timeout), ("/run/test.sock", 10))
        protocol, transport = self.connected()
        sent = transport.value()
        self.assertTrue(sent.startswith(b"GET /images/t?x=1 HTTP/1.1\r\n"), sent)
        self.assertIn(b"\r\nHost: localhost\r\n", sent)
        self.assertIn(b"\r\nX-Test: 1\r\n", sent)
        body = self.answer(protocol, d)
        self.assertEqual(body.data, b"ok")

    def test_reusesIdleConnection(self) -> None:
        """
        Once a response ended, the next request goes over the same
        connection.
        """
        d = self.get()
        protocol, transport = self.connected()
        self.answer(protocol, d)
        transport.clear()
        d = self.get()
        self.assertEqual(len(self.reactor.unixClients), 1)
        self.assertTrue(transport.value().startswith(b"GET "))
        self.assertEqual(self.answer(protocol, d).data, b"ok")

    def test_idleTimeout(self) -> None:
        """
        An idle connection is closed after C{idleTimeout} seconds; the next
        request opens a new one.
        """
        d = self.get()
        protocol, transport = self.connected()
        self.answer(protocol, d)
        self.reactor.advance(29)
        self.assertFalse(transport.disconnecting)
        self.reactor.advance(1)
        self.assertTrue(transport.disconnecting)
        self.get()
        self.assertEqual(len(self.reactor.unixClients), 2)

    def test_closedIdleConnectionNotReused(self) -> None:
        """
        An idle connection the server closed is dropped, not used.
        """
        d = self.get()
        protocol, _ = self.connected()
        self.answer(protocol, d)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.get()
        self.assertEqual(len(self.reactor.unixClients), 2)

    def test_getRetriedOnFreshConnection(self) -> None:
        """
        A GET that a reused connection lost before any answer is sent again
        on a new connection, as Twisted's pool does.
        """
        d = self.get()
        protocol, _ = self.connected()
        self.answer(protocol, d)
        d = self.get()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(d)
        self.assertEqual(len(self.reactor.unixClients), 2)
        fresh, transport = self.connected()
        self.assertTrue(transport.value().startswith(b"GET /images/t?x=1 "))
        self.assertEqual(self.answer(fresh, d).data, b"ok")

    def test_bodyNeverRetried(self) -> None:
        """
        A request with a body (an upload) is never sent twice.
        """
        from imageio.backends.httpclient import BytesProducer

        d = self.get()
        protocol, _ = self.connected()
        self.answer(protocol, d)
        d = self.pool.request(b"PUT", b"http://localhost/images/t", None, BytesProducer(b"data"))
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d).trap(Exception)
        self.assertEqual(len(self.reactor.unixClients), 1)

    def test_maxIdle(self) -> None:
        """
        At most C{maxIdle} connections are kept; more are closed.
        """
        pool = HTTPPool(self.reactor, 10, unixSocket="/run/test.sock", maxIdle=1)
        ds = [pool.request(b"GET", b"http://localhost/images/t") for _ in range(2)]
        connections = [self.connected(i) for i in range(2)]
        for (protocol, _), d in zip(connections, ds, strict=True):
            self.answer(protocol, d)
        self.assertEqual([t.disconnecting for _, t in connections], [False, True])

    def test_connectFailed(self) -> None:
        """
        A connection that fails fails the request with the reason.
        """
        d = self.get()
        factory = self.reactor.unixClients[0][1]
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        self.failureResultOf(d).trap(ConnectionRefusedError)

    def test_cancelWhileConnecting(self) -> None:
        """
        Cancelling a request while connecting stops connecting.
        """
        d = self.get()
        [connector] = self.reactor.connectors
        d.cancel()
        self.failureResultOf(d).trap(CancelledError)
        self.assertTrue(connector.stoppedConnecting)

    def test_closeCachedConnections(self) -> None:
        """
        Closing the pool's idle connections closes them and fires once they
        are gone.
        """
        d = self.get()
        protocol, transport = self.connected()
        self.answer(protocol, d)
        closed = self.pool.closeCachedConnections()
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(closed)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_lostBeforeAnswer(self) -> None:
        """
        A fresh connection lost before the answer fails the request (no
        retry).
        """
        d = self.get()
        protocol, _ = self.connected()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d).trap(ResponseNeverReceived)
        self.assertEqual(len(self.reactor.unixClients), 1)


class TCPTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.nameResolver = _Resolver(  # type: ignore[assignment]
            {"server.example": ["192.0.2.1", "192.0.2.2"]}
        )

    def test_eachAddressInTurn(self) -> None:
        """
        A host name is resolved; a refused address is followed by the next,
        and the Host header keeps the name and port.
        """
        pool = HTTPPool(self.reactor, 5)
        d = pool.request(b"GET", b"http://server.example:8080/images/t")
        [(host, port, factory, timeout, _)] = self.reactor.tcpClients
        self.assertEqual((host, port, timeout), ("192.0.2.1", 8080, 5))
        factory.clientConnectionFailed(None, Failure(ConnectionRefusedError()))
        host, port, factory, _, _ = self.reactor.tcpClients[1]
        self.assertEqual((host, port), ("192.0.2.2", 8080))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIn(b"\r\nHost: server.example:8080\r\n", transport.value())
        self.assertNoResult(d)

    def test_lastFailureReported(self) -> None:
        """
        When every address fails, the request fails with the last reason.
        """
        pool = HTTPPool(self.reactor, 5)
        d = pool.request(b"GET", b"http://server.example/images/t")
        for i in range(2):
            factory = self.reactor.tcpClients[i][2]
            factory.clientConnectionFailed(None, Failure(ConnectionRefusedError(str(i))))
        self.assertEqual(self.reactor.tcpClients[0][1], 80)
        self.assertIn("1", str(self.failureResultOf(d, ConnectionRefusedError).value))

    def test_unknownHost(self) -> None:
        """
        A name without addresses fails with L{DNSLookupError}.
        """
        d = _connect.resolve(self.reactor, "nowhere.example", 443)
        self.failureResultOf(d, DNSLookupError)

    def test_addressAsIs(self) -> None:
        """
        IP addresses are not resolved.
        """
        self.assertEqual(self.successResultOf(_connect.resolve(self.reactor, "::1", 443)), ["::1"])

    def test_httpsWithoutContext(self) -> None:
        """
        An https URL needs a TLS context.
        """
        pool = HTTPPool(self.reactor, 5)
        d = pool.request(b"GET", b"https://192.0.2.1/images/t")
        self.failureResultOf(d, ValueError)
