"""
Tests for L{imageio.web._tls}: the stdlib-ssl server transport and the
server context.
"""

from __future__ import annotations

import gc
import hashlib
import http.client
import os
import shutil
import socket
import ssl
import weakref
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import (
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    TimeoutError,
)
from twisted.internet.interfaces import (
    INegotiated,
    IPushProducer,
    ISSLTransport,
    IStreamServerEndpoint,
    ITCPTransport,
)
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer
from zope.interface.verify import verifyObject

from imageio._pki import TestPKI, ensureSelfSigned, makeTestPKI
from imageio.interfaces import IDirectReader, IDirectReadTransport, IZeroCopyTransport
from imageio.web import _tls
from imageio.web._tls import (
    CIPHERTEXT_QUEUED,
    READ_SIZE,
    WRITE_SIZE,
    TLSConfigError,
    TLSServerEndpoint,
    TLSServerFactory,
    TLSServerProtocol,
    makeServerContext,
)
from tests._http import FakeBackend, FakeOpener, ImagesHarness, parseResponses, request

reactor: Any = _reactor

# Deterministic, incompressible test data.
BODY = hashlib.shake_256(b"imageio").digest(1024 * 1024 + 17)


def _pki(case: SynchronousTestCase) -> TestPKI:
    return makeTestPKI(case.mktemp())


def _clientContext(
    pki: TestPKI, alpn: list[str] | None = None, maximum: ssl.TLSVersion | None = None
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(pki.caFile)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    if maximum is not None:
        context.maximum_version = maximum
        if maximum < ssl.TLSVersion.TLSv1_2:
            context.minimum_version = maximum
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


class RecordingProtocol(Protocol):
    """
    Records what it receives and how the connection ended.
    """

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lostReason: Failure | None = None
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lostReason = reason

    @property
    def data(self) -> bytes:
        return b"".join(self.received)


class CountingSSLObject:
    """
    Passes through to an C{SSLObject}, failing the test instead of hanging
    when C{read} is called far more often than data could explain.
    """

    def __init__(self, wrapped: ssl.SSLObject, limit: int = 1000) -> None:
        self._wrapped = wrapped
        self.reads = 0
        self._limit = limit

    def read(self, *args: Any) -> Any:
        self.reads += 1
        if self.reads > self._limit:
            raise AssertionError("SSLObject.read() called in a loop")
        return self._wrapped.read(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._wrapped, name)


class Connection:
    """
    A L{TLSServerProtocol} on a L{StringTransport} and a stdlib client
    C{SSLObject}, with bytes pumped between them by hand.
    """

    def __init__(
        self,
        serverContext: ssl.SSLContext,
        clientContext: ssl.SSLContext,
        wrappedFactory: Factory[Any] | None = None,
        handshakeTimeout: float = 10.0,
        transport: StringTransport | None = None,
    ) -> None:
        self.clock = Clock()
        if wrappedFactory is None:
            wrappedFactory = Factory.forProtocol(RecordingProtocol)
        self.factory = TLSServerFactory(wrappedFactory, serverContext, self.clock, handshakeTimeout)
        protocol = self.factory.buildProtocol(None)
        assert protocol is not None
        self.server: TLSServerProtocol = protocol
        self.wrapped: Any = protocol.wrappedProtocol
        self.transport = StringTransport() if transport is None else transport
        self.clientIn = ssl.MemoryBIO()
        self.clientOut = ssl.MemoryBIO()
        self.client = clientContext.wrap_bio(
            self.clientIn, self.clientOut, server_hostname="localhost"
        )
        self.server.makeConnection(self.transport)

    def toServer(self) -> None:
        data = self.clientOut.read()
        if data:
            self.server.dataReceived(data)

    def toClient(self) -> None:
        data = self.transport.value()
        self.transport.clear()
        if data:
            self.clientIn.write(data)

    def handshake(self) -> None:
        for _ in range(10):
            try:
                self.client.do_handshake()
            except ssl.SSLWantReadError:
                self.toServer()
                self.toClient()
            else:
                # The server may still have records for the client (TLS 1.3
                # tickets) and the client its last flight for the server.
                self.toServer()
                self.toClient()
                return
        raise AssertionError("handshake did not complete")

    def send(self, data: bytes) -> None:
        self.client.write(data)
        self.toServer()

    def receive(self) -> bytes:
        """
        @return: All plaintext the server sent so far.
        """
        self.toClient()
        chunks = []
        while True:
            try:
                chunk = self.client.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def clientSawCloseNotify(self) -> bool:
        self.toClient()
        try:
            while self.client.read(65536):
                pass
        except ssl.SSLZeroReturnError:
            return True
        except ssl.SSLWantReadError:
            return False
        return True

    def lose(self, reason: Exception) -> None:
        self.server.connectionLost(Failure(reason))


class ContextMixin:
    def setUp(self) -> None:
        self.pki = _pki(self)  # type: ignore[arg-type]
        self.serverContext = makeServerContext(self.pki.certFile, self.pki.keyFile)

    def connect(self, **kwargs: Any) -> Connection:
        alpn = kwargs.pop("alpn", ["http/1.1"])
        maximum = kwargs.pop("maximum", None)
        context = kwargs.pop("serverContext", self.serverContext)
        return Connection(context, _clientContext(self.pki, alpn, maximum), **kwargs)


class HandshakeTests(ContextMixin, SynchronousTestCase):
    def test_handshake(self) -> None:
        """
        A stdlib client verifying the server against the CA completes the
        handshake with TLS 1.3 and ALPN http/1.1.
        """
        c = self.connect()
        self.assertIsNone(c.server.negotiatedProtocol)
        c.handshake()
        self.assertEqual(c.client.version(), "TLSv1.3")
        self.assertEqual(c.server.negotiatedProtocol, b"http/1.1")
        self.assertEqual(c.server.sslObject.version(), "TLSv1.3")

    def test_noALPN(self) -> None:
        """
        A client that does not use ALPN negotiates no protocol.
        """
        c = self.connect(alpn=None)
        c.handshake()
        self.assertIsNone(c.server.negotiatedProtocol)

    def test_tls12(self) -> None:
        """
        A TLS 1.2 client is served.
        """
        c = self.connect(maximum=ssl.TLSVersion.TLSv1_2)
        c.handshake()
        self.assertEqual(c.server.sslObject.version(), "TLSv1.2")
        c.send(b"hello")
        self.assertEqual(c.wrapped.data, b"hello")

    def test_tls11Refused(self) -> None:
        """
        A TLS 1.1 client is refused with an alert and one info line naming
        the peer, and the wrapped protocol learns of the SSL error.
        """
        c = self.connect(maximum=ssl.TLSVersion.TLSv1_1)
        with capturedLogs() as events:
            with self.assertRaises(ssl.SSLError):
                c.handshake()
        self.assertTrue(c.transport.disconnecting)
        c.lose(ConnectionDone())
        self.assertIsInstance(c.wrapped.lostReason.value, ssl.SSLError)
        [event] = [e for e in events if e.get("log_namespace") == _tls.__name__]
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["peer"], "192.168.1.1:54321")
        self.assertEqual(event["reason"], "UNSUPPORTED_PROTOCOL")
        self.assertNotIn("log_failure", event)

    def test_tls11Enabled(self) -> None:
        """
        With TLS 1.1 enabled, a TLS 1.1 client is served.
        """
        context = makeServerContext(self.pki.certFile, self.pki.keyFile, enableTLS11=True)
        c = self.connect(maximum=ssl.TLSVersion.TLSv1_1, serverContext=context)
        c.handshake()
        self.assertEqual(c.server.sslObject.version(), "TLSv1.1")

    def test_plainHTTP(self) -> None:
        """
        Plain HTTP to the TLS port closes the connection and logs one info
        line, without a traceback.
        """
        c = self.connect()
        with capturedLogs() as events:
            c.server.dataReceived(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertTrue(c.transport.disconnecting)
        [event] = [e for e in events if e.get("log_namespace") == _tls.__name__]
        self.assertEqual(event["log_level"], LogLevel.info)
        self.assertEqual(event["reason"], "HTTP_REQUEST")
        self.assertNotIn("log_failure", event)
        # Nothing more is read.
        c.server.dataReceived(b"more")
        self.assertEqual(c.wrapped.received, [])
        c.lose(ConnectionDone())
        self.assertIsInstance(c.wrapped.lostReason.value, ssl.SSLError)

    def test_garbage(self) -> None:
        """
        Bytes that are not TLS close the connection.
        """
        c = self.connect()
        with capturedLogs():
            c.server.dataReceived(os.urandom(64))
        self.assertTrue(c.transport.disconnecting)

    def test_handshakeTimeout(self) -> None:
        """
        A client that does not complete the handshake within the timeout is
        aborted and the wrapped protocol is told it timed out.
        """
        c = self.connect(handshakeTimeout=5.0)
        with capturedLogs() as events:
            c.clock.advance(4.9)
            self.assertFalse(c.transport.disconnected)
            c.clock.advance(0.1)
        self.assertTrue(c.transport.disconnected)
        c.lose(ConnectionAborted())
        self.assertIsInstance(c.wrapped.lostReason.value, TimeoutError)
        [event] = [e for e in events if e.get("log_namespace") == _tls.__name__]
        self.assertEqual(event["log_level"], LogLevel.info)

    def test_handshakeTimeoutPartial(self) -> None:
        """
        A client that starts the handshake and stalls is aborted at the
        deadline.
        """
        c = self.connect(handshakeTimeout=5.0)
        try:
            c.client.do_handshake()
        except ssl.SSLWantReadError:
            pass
        c.toServer()  # ClientHello; the client never answers the server
        c.clock.advance(5)
        self.assertTrue(c.transport.disconnected)

    def test_handshakeCancelsTimeout(self) -> None:
        """
        A completed handshake cancels the deadline.
        """
        c = self.connect(handshakeTimeout=5.0)
        c.handshake()
        self.assertEqual(c.clock.getDelayedCalls(), [])
        c.clock.advance(60)
        self.assertFalse(c.transport.disconnected)

    def test_connectionLostCancelsTimeout(self) -> None:
        """
        A connection lost during the handshake cancels the deadline.
        """
        c = self.connect()
        c.lose(ConnectionLost())
        self.assertEqual(c.clock.getDelayedCalls(), [])

    def test_interfaces(self) -> None:
        """
        The wrapper is an SSL, TCP and negotiated transport and a push
        producer, so twisted.web sees a secure transport.
        """
        c = self.connect()
        for interface in (ISSLTransport, ITCPTransport, INegotiated, IPushProducer):
            self.assertTrue(verifyObject(interface, c.server))
        self.assertIsNone(c.server.getPeerCertificate())
        self.assertEqual(c.server.getPeer(), c.transport.getPeer())
        self.assertEqual(c.server.getHost(), c.transport.getHost())


class DataTests(ContextMixin, SynchronousTestCase):
    def test_clientToServer(self) -> None:
        """
        What the client sends reaches the wrapped protocol intact, in pieces
        of at most READ_SIZE.
        """
        c = self.connect()
        c.handshake()
        c.send(BODY)
        self.assertEqual(c.wrapped.data, BODY)
        self.assertLessEqual(max(map(len, c.wrapped.received)), READ_SIZE)
        self.assertLess(len(c.wrapped.received), len(BODY) // READ_SIZE + 3)

    def test_serverToClient(self) -> None:
        """
        What the wrapped protocol writes reaches the client intact.
        """
        c = self.connect()
        c.handshake()
        c.server.write(BODY)
        c.server.writeSequence([b"a", b"b", memoryview(b"c")])  # type: ignore[list-item]
        c.server.writeSequence([BODY, b"d"])
        self.assertEqual(c.receive(), BODY + b"abc" + BODY + b"d")

    def test_writeBeforeHandshake(self) -> None:
        """
        Data written before the handshake completed is sent after it.
        """
        c = self.connect()
        c.server.write(b"early")
        self.assertEqual(c.transport.value(), b"")
        c.handshake()
        self.assertEqual(c.receive(), b"early")

    def test_corruptRecord(self) -> None:
        """
        A record that fails to decrypt aborts the connection and reports the
        SSL error.
        """
        c = self.connect()
        c.handshake()
        c.client.write(b"x" * 1000)
        record = bytearray(c.clientOut.read())
        record[100] ^= 1
        with capturedLogs():
            c.server.dataReceived(bytes(record))
        self.assertTrue(c.transport.disconnected)
        c.lose(ConnectionAborted())
        self.assertIsInstance(c.wrapped.lostReason.value, ssl.SSLError)
        self.assertEqual(c.wrapped.received, [])


class CloseTests(ContextMixin, SynchronousTestCase):
    def test_freedWithoutCycleCollector(self) -> None:
        """
        Once the connection is lost, the protocol, the wrapped protocol (who
        keeps it as its transport) and the TLS state are freed by reference
        counting: the wrapper forgets the wrapped protocol, as Twisted's
        transports forget theirs. A server that waited for the cyclic
        garbage collector kept some 350 KiB per closed connection.
        """
        c = self.connect(transport=SocketTransport())
        c.handshake()
        c.server.write(b"x" * (WRITE_SIZE + 1))
        c.receive()
        c.lose(ConnectionDone())
        refs = [weakref.ref(o) for o in (c.server, c.wrapped, c.server.sslObject)]
        self.addCleanup(gc.enable)
        gc.disable()
        del c
        self.assertEqual([r() for r in refs], [None, None, None])

    def test_peerCloseNotify(self) -> None:
        """
        After the peer's close_notify the data before it is delivered, the
        server answers with its own close_notify and closes TCP, and the
        wrapped protocol sees a clean close.
        """
        c = self.connect()
        c.handshake()
        counting = CountingSSLObject(c.server._tls)
        c.server._tls = counting  # type: ignore[assignment]
        c.client.write(b"last words")
        try:
            c.client.unwrap()
        except ssl.SSLWantReadError:
            pass
        c.toServer()
        self.assertEqual(c.wrapped.data, b"last words")
        self.assertLess(counting.reads, 10)
        self.assertTrue(c.transport.disconnecting)
        self.assertTrue(c.clientSawCloseNotify())
        # Later bytes are ignored, and read() is not called again.
        reads = counting.reads
        c.server.dataReceived(b"\x17\x03\x03\x00\x01x")
        self.assertEqual(counting.reads, reads)
        c.lose(ConnectionDone())
        c.wrapped.lostReason.trap(ConnectionDone)

    def test_truncated(self) -> None:
        """
        A peer that closes TCP without close_notify is reported as
        ConnectionLost, so a truncated body is noticed.
        """
        c = self.connect()
        c.handshake()
        c.send(b"partial")
        c.lose(ConnectionDone())
        c.wrapped.lostReason.trap(ConnectionLost)

    def test_lostAbruptly(self) -> None:
        """
        A connection reset is reported as the transport reported it.
        """
        c = self.connect()
        c.handshake()
        c.lose(ConnectionLost("reset"))
        c.wrapped.lostReason.trap(ConnectionLost)

    def test_loseConnection(self) -> None:
        """
        loseConnection sends close_notify after the data written, closes TCP,
        and drops later writes.
        """
        c = self.connect()
        c.handshake()
        c.server.write(b"response")
        c.server.loseConnection()
        self.assertTrue(c.server.disconnecting)
        self.assertTrue(c.transport.disconnecting)
        c.server.write(b"too late")
        self.assertEqual(c.receive(), b"response")
        self.assertTrue(c.clientSawCloseNotify())
        c.lose(ConnectionDone())
        c.wrapped.lostReason.trap(ConnectionDone)

    def test_loseConnectionWaitsForProducer(self) -> None:
        """
        With a producer registered, close_notify is sent when it is
        unregistered, and data written until then gets through.
        """
        c = self.connect()
        c.handshake()
        producer = Producer()
        c.server.registerProducer(producer, True)
        c.server.loseConnection()
        self.assertFalse(c.transport.disconnecting)
        # Reading stops at once.
        self.assertEqual(c.transport.producerState, "paused")
        c.send(b"ignored")
        self.assertEqual(c.wrapped.received, [])
        c.server.write(b"tail")
        c.server.unregisterProducer()
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(c.receive(), b"tail")
        self.assertTrue(c.clientSawCloseNotify())

    def test_loseConnectionBeforeHandshake(self) -> None:
        """
        Closing before the handshake aborts: there is nothing to close
        cleanly.
        """
        c = self.connect()
        c.server.loseConnection()
        self.assertTrue(c.transport.disconnected)

    def test_loseConnectionBeforeHandshakeWithData(self) -> None:
        """
        Data written before the handshake and then loseConnection: the data
        and close_notify follow the handshake.
        """
        c = self.connect()
        c.server.write(b"bye")
        c.server.loseConnection()
        self.assertFalse(c.transport.disconnecting)
        c.handshake()
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(c.receive(), b"bye")
        self.assertTrue(c.clientSawCloseNotify())

    def test_abortConnection(self) -> None:
        """
        abortConnection aborts TCP without close_notify.
        """
        c = self.connect()
        c.handshake()
        c.server.abortConnection()
        self.assertTrue(c.transport.disconnected)
        self.assertFalse(c.clientSawCloseNotify())
        c.server.write(b"dropped")
        self.assertEqual(c.transport.value(), b"")
        c.lose(ConnectionAborted())
        c.wrapped.lostReason.trap(ConnectionAborted)

    def test_loseWriteConnection(self) -> None:
        """
        loseWriteConnection sends close_notify and keeps reading.
        """
        c = self.connect()
        c.handshake()
        c.server.loseWriteConnection()
        self.assertTrue(c.clientSawCloseNotify())
        self.assertFalse(c.transport.disconnecting)


@implementer(IPushProducer)
class Producer:
    def __init__(self) -> None:
        self.events: list[str] = []

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")

    def stopProducing(self) -> None:
        self.events.append("stop")


class ProducerTests(ContextMixin, SynchronousTestCase):
    def test_producerPassesThrough(self) -> None:
        """
        A producer registered with the wrapper is registered with the TCP
        transport, so the transport's pause and resume reach it directly.
        """
        c = self.connect()
        producer = Producer()
        c.server.registerProducer(producer, True)
        self.assertIs(c.transport.producer, producer)
        self.assertTrue(c.transport.streaming)
        registered: Any = c.transport.producer
        registered.pauseProducing()
        registered.resumeProducing()
        self.assertEqual(producer.events, ["pause", "resume"])
        c.server.unregisterProducer()
        self.assertIsNone(c.transport.producer)

    def test_registerAfterAbort(self) -> None:
        """
        A producer registered after the connection was aborted is stopped.
        """
        c = self.connect()
        c.server.abortConnection()
        producer = Producer()
        c.server.registerProducer(producer, True)
        self.assertEqual(producer.events, ["stop"])

    def test_pauseResumeReading(self) -> None:
        """
        Pausing the wrapper pauses the TCP transport and holds back plaintext
        already received; resuming delivers it and resumes the transport.
        """
        c = self.connect()
        c.handshake()
        c.server.pauseProducing()
        self.assertEqual(c.transport.producerState, "paused")
        c.send(b"held back")
        self.assertEqual(c.wrapped.received, [])
        c.server.resumeProducing()
        self.assertEqual(c.wrapped.data, b"held back")
        self.assertEqual(c.transport.producerState, "producing")

    def test_pauseFromDataReceived(self) -> None:
        """
        A protocol that pauses its transport while handling data gets no
        more until it resumes, even if more was already decrypted.
        """

        class Pausing(RecordingProtocol):
            def dataReceived(self, data: bytes) -> None:
                super().dataReceived(data)
                self.transport.pauseProducing()  # type: ignore[union-attr]

        c = self.connect(wrappedFactory=Factory.forProtocol(Pausing))
        c.handshake()
        c.send(BODY)
        self.assertEqual(len(c.wrapped.received), 1)
        while len(c.wrapped.data) < len(BODY):
            count = len(c.wrapped.received)
            c.server.resumeProducing()
            self.assertEqual(len(c.wrapped.received), count + 1)
        self.assertEqual(c.wrapped.data, BODY)

    def test_stopProducing(self) -> None:
        """
        stopProducing on the wrapper reaches the TCP transport.
        """
        c = self.connect()
        c.server.stopProducing()
        self.assertEqual(c.transport.producerState, "stopped")


@implementer(IZeroCopyTransport)
class SocketTransport(StringTransport):
    """
    Behaves like our zero-copy socket transports in front of a socket that
    takes C{room} more bytes: a write goes to the socket at once as far as
    it fits, the rest is queued; L{drain} makes room, and once the queue is
    empty fires the L{whenDrained} waiters, then resumes a producer it
    paused, unless a waiter wrote again.

    @ivar sent: What the socket took.
    @ivar mostQueued: The most bytes queued at once.
    """

    #: As Twisted's FileDescriptor.bufferSize.
    bufferSize = 64 * 1024

    def __init__(self, room: int = 1 << 30) -> None:
        super().__init__()
        self.room = room
        self.queue = bytearray()
        self.sent = bytearray()
        self.mostQueued = 0
        self.waiters: list[Deferred[None]] = []
        self.pausedByUs = False

    def write(self, data: Any) -> None:
        data = bytes(data)
        if not self.queue:
            n = min(len(data), self.room)
            self.sent += data[:n]
            self.room -= n
            data = data[n:]
        self.queue += data
        self.mostQueued = max(self.mostQueued, len(self.queue))
        if data:
            self.pauseProducerIfFull()

    def pendingBytes(self) -> int:
        return len(self.queue)

    def whenDrained(self) -> Deferred[None]:
        if not self.queue:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self.waiters.append(d)
        return d

    def pauseProducerIfFull(self) -> None:
        if self.producer is not None and self.streaming and len(self.queue) > self.bufferSize:
            self.pausedByUs = True
            self.producer.pauseProducing()

    def drain(self, room: int) -> None:
        """
        The peer read C{room} bytes: the socket sends that much more.
        """
        self.room += room
        n = min(len(self.queue), self.room)
        self.sent += self.queue[:n]
        del self.queue[:n]
        self.room -= n
        if self.queue:
            return
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(None)
        if not self.queue and self.pausedByUs and self.producer is not None:
            self.pausedByUs = False
            self.producer.resumeProducing()

    def value(self) -> bytes:
        # What the socket took, for Connection.toClient.
        data = bytes(self.sent)
        self.sent.clear()
        return data

    def clear(self) -> None:
        pass


class _HeldPlaintextTestsMixin(ContextMixin):
    """
    Over a zero-copy transport, written plaintext is held and encrypted as
    the socket drains: the ciphertext queued stays bounded.
    """

    #: What a slow reader may find queued at most: the threshold, one
    #: piece and its records' overhead.
    BOUND = CIPHERTEXT_QUEUED + WRITE_SIZE + 8 * 1024

    #: The transport in front of the socket.
    transportClass: type[SocketTransport]

    def setUp(self) -> None:
        super().setUp()
        self.socket = self.transportClass()
        self.c = self.connect(transport=self.socket)
        self.c.handshake()
        # The reader stops reading: nothing more fits in the socket.
        self.socket.room = 0
        self.data = bytearray(hashlib.shake_256(b"held").digest(4 * 1024 * 1024 + 5))

    def readAll(self, step: int = 64 * 1024) -> bytes:
        """
        Let the reader read C{step} bytes at a time until nothing is left,
        checking the bound at every step.

        @return: The plaintext it got.
        """
        received = bytearray()
        for _ in range(10000):
            self.assertLessEqual(len(self.socket.queue), self.BOUND)
            received += self.c.receive()
            if not self.socket.queue and not self.c.server.pendingBytes():
                return bytes(received)
            self.socket.drain(step)
        self.fail("never drained")

    def test_boundedCiphertext(self) -> None:
        """
        A 4 MiB write to a reader that does not read queues no more than
        about C{CIPHERTEXT_QUEUED} plus one piece of ciphertext; the rest
        waits as plaintext (the writer's buffer, held), and
        L{TLSServerProtocol.whenDrained} fires once it is all encrypted. The
        reader gets every byte.
        """
        self.assertTrue(verifyObject(IZeroCopyTransport, self.c.server))
        self.c.server.write(memoryview(self.data))
        self.assertLessEqual(self.socket.mostQueued, self.BOUND)
        self.assertGreater(self.c.server.pendingBytes(), len(self.data) - self.BOUND)
        drained = self.c.server.whenDrained()
        self.assertNoResult(drained)
        self.assertEqual(self.readAll(), self.data)
        self.successResultOf(drained)
        self.assertLessEqual(self.socket.mostQueued, self.BOUND)

    def test_orderKept(self) -> None:
        """
        Small writes after a held one wait behind it.
        """
        self.c.server.write(memoryview(self.data))
        self.c.server.write(b"after")
        self.c.server.writeSequence([b"and ", b"more"])
        self.assertEqual(self.readAll(), self.data + b"afterand more")

    def test_producerPaused(self) -> None:
        """
        A streaming producer registered while plaintext waits is paused at
        its next write and resumed only once everything was sent.
        """
        self.c.server.write(memoryview(self.data))
        producer = Producer()
        self.c.server.registerProducer(producer, True)
        self.c.server.write(b"x" * 1000)
        self.assertEqual(producer.events, ["pause"])
        received = self.c.receive()
        while self.c.server.pendingBytes() or self.socket.queue:
            # Paused again as pieces are queued, as Twisted's transports do.
            self.assertEqual(set(producer.events), {"pause"})
            self.socket.drain(256 * 1024)
            received += self.c.receive()
        self.assertEqual(producer.events[-1], "resume")
        self.assertEqual(producer.events.count("resume"), 1)
        self.assertEqual(received, self.data + b"x" * 1000)

    def test_closeAfterHeld(self) -> None:
        """
        C{loseConnection} sends close_notify and closes TCP only after the
        held plaintext was encrypted and sent.
        """
        self.c.server.write(memoryview(self.data))
        self.c.server.loseConnection()
        self.assertFalse(self.socket.disconnecting)
        self.assertEqual(self.readAll(), self.data)
        self.assertTrue(self.c.clientSawCloseNotify())
        self.assertTrue(self.socket.disconnecting)

    def test_halfCloseAfterHeld(self) -> None:
        """
        C{loseWriteConnection} too waits for the held plaintext.
        """
        self.c.server.write(memoryview(self.data))
        self.c.server.loseWriteConnection()
        self.assertEqual(self.readAll(), self.data)
        self.assertTrue(self.c.clientSawCloseNotify())

    def test_abortReleases(self) -> None:
        """
        An aborted connection encrypts nothing more; the writer's buffers
        are free once the connection is lost.
        """
        self.c.server.write(memoryview(self.data))
        drained = self.c.server.whenDrained()
        self.c.server.abortConnection()
        self.assertEqual(self.c.server.pendingBytes(), 0)
        self.c.lose(ConnectionAborted())
        self.successResultOf(drained)
        queued = len(self.socket.queue)
        self.socket.drain(1 << 30)
        self.assertLessEqual(queued, self.BOUND)
        self.assertEqual(self.c.server.pendingBytes(), 0)

    def test_twistedTransportEncryptsAtOnce(self) -> None:
        """
        Over a transport that is not ours (Twisted's), a write is encrypted
        at once: nothing is held.
        """
        c = self.connect()
        c.handshake()
        c.server.write(memoryview(self.data))
        self.assertEqual(c.server.pendingBytes(), 0)
        self.successResultOf(c.server.whenDrained())
        self.assertEqual(c.receive(), self.data)


class HeldPlaintextTests(_HeldPlaintextTestsMixin, SynchronousTestCase):
    """
    Held plaintext over a zero-copy transport that has only C{write}.
    """

    transportClass = SocketTransport


class SendNowSocketTransport(SocketTransport):
    """
    A L{SocketTransport} with our transports' C{sendNow}: what fits goes to
    the socket at once while nothing is queued.

    @ivar sendNowCalls: How often C{sendNow} was called.
    """

    def __init__(self, room: int = 1 << 30) -> None:
        super().__init__(room)
        self.sendNowCalls = 0

    def sendNow(self, data: bytes) -> int:
        self.sendNowCalls += 1
        if self.queue:
            return 0
        n = min(len(data), self.room)
        self.sent += data[:n]
        self.room -= n
        return n


class HeldPlaintextSendNowTests(_HeldPlaintextTestsMixin, SynchronousTestCase):
    """
    Held plaintext over a zero-copy transport with C{sendNow}: each piece of
    ciphertext goes through it, what it did not take through C{write}, and
    the bound, the order and the bytes are the same.
    """

    transportClass = SendNowSocketTransport

    def test_piecesSentNow(self) -> None:
        """
        With room in the socket, every piece goes through C{sendNow} and
        nothing is queued.
        """
        self.socket.room = 1 << 30
        self.c.server.write(memoryview(self.data))
        self.assertGreaterEqual(self.socket.sendNowCalls, len(self.data) // WRITE_SIZE)
        self.assertEqual(self.socket.mostQueued, 0)
        self.successResultOf(self.c.server.whenDrained())
        self.assertEqual(self.c.receive(), self.data)


class FactoryTests(ContextMixin, SynchronousTestCase):
    def test_refused(self) -> None:
        """
        When the wrapped factory refuses a connection, so does the wrapper.
        """

        # Not Factory[Protocol]: Factory is generic only from Twisted 25.
        class Refusing(Factory):
            def buildProtocol(self, addr: Any) -> None:
                return None

        factory = TLSServerFactory(Refusing(), self.serverContext, Clock())
        self.assertIsNone(factory.buildProtocol(None))

    def test_tracksProtocols(self) -> None:
        """
        The factory knows its open connections.
        """
        c = self.connect()
        self.assertEqual(c.factory.protocols, {c.server})
        c.lose(ConnectionLost())
        self.assertEqual(c.factory.protocols, set())

    def test_startStop(self) -> None:
        """
        Starting and stopping the factory starts and stops the wrapped one.
        """
        wrapped = Factory.forProtocol(Protocol)
        factory = TLSServerFactory(wrapped, self.serverContext, Clock())
        factory.doStart()
        self.assertEqual(wrapped.numPorts, 1)
        factory.doStop()
        self.assertEqual(wrapped.numPorts, 0)

    def test_endpoint(self) -> None:
        """
        The endpoint listens on the wrapped endpoint with a TLS factory
        around the given one.
        """

        @implementer(IStreamServerEndpoint)
        class Recording:
            factory: Any = None

            def listen(self, factory: Any) -> Deferred[Any]:
                self.factory = factory
                return succeed("port")

        wrapped = Recording()
        site = Factory.forProtocol(Protocol)
        clock = Clock()
        endpoint = TLSServerEndpoint(wrapped, self.serverContext, clock, 3.0)
        self.assertTrue(verifyObject(IStreamServerEndpoint, endpoint))
        self.assertEqual(self.successResultOf(endpoint.listen(site)), "port")
        self.assertIsInstance(wrapped.factory, TLSServerFactory)
        self.assertIs(wrapped.factory.wrappedFactory, site)
        self.assertIs(wrapped.factory.context, self.serverContext)
        self.assertIs(wrapped.factory.clock, clock)
        self.assertEqual(wrapped.factory.handshakeTimeout, 3.0)


class Echo(Resource):
    """
    GET returns L{BODY}; PUT answers with the SHA-256 of the body and
    whether the request was secure.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.secure: list[bool] = []

    def render_GET(self, request: Any) -> bytes:
        self.secure.append(request.isSecure())
        return BODY

    def render_PUT(self, request: Any) -> bytes:
        self.secure.append(request.isSecure())
        return hashlib.sha256(request.content.read()).hexdigest().encode()


@implementer(IPushProducer)
class Streamer:
    """
    Writes C{size} bytes of a pattern to a request as fast as it is allowed
    to, recording when it is paused and resumed.
    """

    chunk = bytes(range(256)) * 1024

    def __init__(self, request: Any, size: int, events: list[str]) -> None:
        self.request = request
        self.remaining = size
        self.events = events
        self.paused = False

    def start(self) -> None:
        self.request.setHeader(b"content-length", b"%d" % self.remaining)
        self.request.registerProducer(self, True)
        self.produce()

    def produce(self) -> None:
        while not self.paused and self.remaining:
            data = self.chunk[: self.remaining]
            self.remaining -= len(data)
            self.request.write(data)
        if not self.remaining:
            self.request.unregisterProducer()
            self.request.finish()

    def pauseProducing(self) -> None:
        self.events.append("pause")
        self.paused = True

    def resumeProducing(self) -> None:
        self.events.append("resume")
        self.paused = False
        self.produce()

    def stopProducing(self) -> None:
        self.events.append("stop")
        self.paused = True


class Streaming(Resource):
    isLeaf = True

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.events: list[str] = []

    def render_GET(self, request: Any) -> object:
        Streamer(request, self.size, self.events).start()
        return NOT_DONE_YET


class InMemoryHTTPTests(ContextMixin, SynchronousTestCase):
    def test_request(self) -> None:
        """
        An HTTP request through the wrapper is answered and the request is
        secure.
        """
        resource = Echo()
        c = self.connect(wrappedFactory=Site(resource))
        c.handshake()
        c.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        response = c.receive()
        self.assertTrue(response.startswith(b"HTTP/1.1 200 OK\r\n"), response[:100])
        self.assertTrue(response.endswith(BODY))
        self.assertEqual(resource.secure, [True])
        c.lose(ConnectionDone())


class ContextTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.pki = _pki(self)

    def test_defaults(self) -> None:
        """
        The context refuses anything older than TLS 1.2, renegotiation and
        compression, and asks no client certificate.
        """
        context = makeServerContext(self.pki.certFile, self.pki.keyFile)
        self.assertEqual(context.minimum_version, ssl.TLSVersion.TLSv1_2)
        self.assertTrue(context.options & ssl.OP_NO_RENEGOTIATION)
        self.assertTrue(context.options & ssl.OP_NO_COMPRESSION)
        self.assertEqual(context.verify_mode, ssl.CERT_NONE)

    def test_enableTLS11(self) -> None:
        """
        enableTLS11 lowers the minimum to TLS 1.1.
        """
        context = makeServerContext(self.pki.certFile, self.pki.keyFile, enableTLS11=True)
        self.assertEqual(context.minimum_version, ssl.TLSVersion.TLSv1_1)

    def test_chain(self) -> None:
        """
        A certificate file holding the chain is accepted.
        """
        makeServerContext(self.pki.chainFile, self.pki.keyFile)

    def test_caFile(self) -> None:
        """
        A CA file completes the chain sent to clients.
        """
        context = makeServerContext(self.pki.certFile, self.pki.keyFile, caFile=self.pki.caFile)
        self.assertEqual(context.cert_store_stats()["x509_ca"], 1)

    def assertConfigError(self, *names: str, **kwargs: Any) -> str:
        with self.assertRaises(TLSConfigError) as raised:
            makeServerContext(**kwargs)
        message = str(raised.exception)
        for name in names:
            self.assertIn(name, message)
        return message

    def test_missingCert(self) -> None:
        """
        A missing certificate file is named in the error.
        """
        missing = self.mktemp()
        self.assertConfigError(missing, certFile=missing, keyFile=self.pki.keyFile)

    def test_missingKey(self) -> None:
        """
        A missing key file is named in the error.
        """
        missing = self.mktemp()
        self.assertConfigError(missing, certFile=self.pki.certFile, keyFile=missing)

    def test_missingCA(self) -> None:
        """
        A missing CA file is named in the error.
        """
        missing = self.mktemp()
        self.assertConfigError(
            missing, certFile=self.pki.certFile, keyFile=self.pki.keyFile, caFile=missing
        )

    def test_keyMismatch(self) -> None:
        """
        A key that does not match the certificate is refused, naming both.
        """
        message = self.assertConfigError(
            self.pki.certFile,
            self.pki.otherKeyFile,
            certFile=self.pki.certFile,
            keyFile=self.pki.otherKeyFile,
        )
        self.assertIn("does not match", message)

    def test_expired(self) -> None:
        """
        An expired certificate is refused, naming the file.
        """
        message = self.assertConfigError(
            self.pki.expiredCertFile,
            certFile=self.pki.expiredCertFile,
            keyFile=self.pki.expiredKeyFile,
        )
        self.assertIn("expired", message)

    def test_notACertificate(self) -> None:
        """
        A certificate file without a certificate is refused, naming it.
        """
        self.assertConfigError(
            self.pki.keyFile, certFile=self.pki.keyFile, keyFile=self.pki.keyFile
        )

    def test_notAKey(self) -> None:
        """
        A key file without a key is refused, naming it.
        """
        self.assertConfigError(
            self.pki.certFile, certFile=self.pki.certFile, keyFile=self.pki.certFile
        )

    def test_encryptedKey(self) -> None:
        """
        An encrypted key is refused instead of prompting for a password.
        """
        from cryptography.hazmat.primitives import serialization

        with open(self.pki.keyFile, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), None)
        encrypted = self.mktemp()
        with open(encrypted, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(b"secret"),
                )
            )
        message = self.assertConfigError(encrypted, certFile=self.pki.certFile, keyFile=encrypted)
        self.assertIn("encrypted", message)


# Real sockets from here on.


class Server:
    """
    A Site behind L{TLSServerFactory} on 127.0.0.1, port 0.
    """

    def __init__(self, case: TestCase, context: ssl.SSLContext, site: Site) -> None:
        self.factory = TLSServerFactory(site, context, reactor, handshakeTimeout=10.0)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.number = self.port.getHost().port
        case.addCleanup(self.stop)

    def url(self, path: str = "/") -> str:
        return f"https://127.0.0.1:{self.number}{path}"

    @inlineCallbacks
    def stop(self) -> Any:
        yield self.port.stopListening()
        for protocol in list(self.factory.protocols):
            protocol.abortConnection()
        while self.factory.protocols:
            yield deferLater(reactor, 0.01, lambda: None)


class _Collect(ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.done: Deferred[tuple[bytes, int]] = Deferred()

    def connectionMade(self) -> None:
        # openssl s_client waits for its input to end.
        self.transport.closeStdin()  # type: ignore[union-attr]

    def outReceived(self, data: bytes) -> None:
        self.output += data

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.done.callback((self.output, getattr(reason.value, "exitCode", -1)))


def _run(program: str, args: list[str]) -> Deferred[tuple[bytes, int]]:
    """
    Run C{program} with its standard input closed.

    @return: Its standard output and error, interleaved, and its exit code.
    """
    collect = _Collect()
    reactor.spawnProcess(collect, program, [program, *args], env=os.environ)
    return collect.done


def _need(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise SkipTest(f"{program} is not installed")
    return path


class IntegrationTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.pki = _pki(self)
        self.resource = Echo()
        self.server = Server(
            self,
            makeServerContext(self.pki.certFile, self.pki.keyFile),
            Site(self.resource),
        )
        self.bodyFile = self.mktemp()
        with open(self.bodyFile, "wb") as f:
            f.write(BODY)

    @inlineCallbacks
    def test_curl(self) -> Any:
        """
        curl verifying the test CA downloads and uploads 1 MiB intact, and
        the requests are secure.
        """
        curl = _need("curl")
        out, err, code = yield getProcessOutputAndValue(
            curl, ["-sS", "--cacert", self.pki.caFile, self.server.url()]
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, BODY)
        out, err, code = yield getProcessOutputAndValue(
            curl,
            ["-sS", "--cacert", self.pki.caFile, "-T", self.bodyFile, self.server.url()],
        )
        self.assertEqual(code, 0, err)
        self.assertEqual(out, hashlib.sha256(BODY).hexdigest().encode())
        self.assertEqual(self.resource.secure, [True, True])

    @inlineCallbacks
    def test_httpClient(self) -> Any:
        """
        Python's http.client with a context verifying the test CA downloads
        and uploads 1 MiB intact.
        """
        context = _clientContext(self.pki)
        port = self.server.number

        def run() -> tuple[bytes, bytes]:
            # The certificate names 127.0.0.1 too, and the context checks it.
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=context)
            conn.request("GET", "/")
            got = conn.getresponse().read()
            conn.request("PUT", "/", body=BODY)
            digest = conn.getresponse().read()
            conn.close()
            return got, digest

        got, digest = yield deferToThread(run)
        self.assertEqual(got, BODY)
        self.assertEqual(digest, hashlib.sha256(BODY).hexdigest().encode())
        self.assertEqual(self.resource.secure, [True, True])

    @inlineCallbacks
    def test_twistedAgent(self) -> Any:
        """
        Twisted's Agent with pyOpenSSL, trusting the test CA, downloads and
        uploads 1 MiB intact.
        """
        from twisted.internet.ssl import Certificate, optionsForClientTLS
        from twisted.web.client import (
            Agent,
            FileBodyProducer,
            HTTPConnectionPool,
            readBody,
        )
        from twisted.web.iweb import IPolicyForHTTPS

        with open(self.pki.caFile, "rb") as f:
            ca = Certificate.loadPEM(f.read())

        @implementer(IPolicyForHTTPS)
        class Policy:
            def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
                return optionsForClientTLS(hostname.decode(), trustRoot=ca)

        pool = HTTPConnectionPool(reactor, persistent=False)
        agent = Agent(reactor, contextFactory=Policy(), pool=pool)
        url = self.server.url().encode()
        response = yield agent.request(b"GET", url)
        got = yield readBody(response)
        self.assertEqual(got, BODY)
        from io import BytesIO

        response = yield agent.request(b"PUT", url, bodyProducer=FileBodyProducer(BytesIO(BODY)))
        digest = yield readBody(response)
        self.assertEqual(digest, hashlib.sha256(BODY).hexdigest().encode())
        self.assertEqual(self.resource.secure, [True, True])
        yield pool.closeCachedConnections()

    @inlineCallbacks
    def test_backpressure(self) -> Any:
        """
        A client that stops reading pauses the response's producer through
        the TLS transport; when it reads again the producer resumes and the
        whole body arrives intact.
        """
        size = 32 * 1024 * 1024
        resource = Streaming(size)
        server = Server(
            self, makeServerContext(self.pki.certFile, self.pki.keyFile), Site(resource)
        )
        context = _clientContext(self.pki)

        def connect() -> ssl.SSLSocket:
            # Blocking: the handshake needs the reactor running.
            sock = context.wrap_socket(
                socket.create_connection(("127.0.0.1", server.number), timeout=10),
                server_hostname="localhost",
            )
            sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            return sock

        sock = yield deferToThread(connect)
        self.addCleanup(sock.close)
        for _ in range(500):
            if "pause" in resource.events:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(resource.events[:1], ["pause"])

        def readAll() -> bytes:
            chunks = []
            while chunk := sock.recv(1024 * 1024):
                chunks.append(chunk)
            return b"".join(chunks)

        response = yield deferToThread(readAll)
        head, body = response.split(b"\r\n\r\n", 1)
        self.assertEqual(len(body), size)
        self.assertEqual(body, (Streamer.chunk * (size // len(Streamer.chunk) + 1))[:size])
        self.assertIn("resume", resource.events)
        self.assertNotIn("stop", resource.events)

    @inlineCallbacks
    def test_plainHTTPThenHTTPS(self) -> Any:
        """
        Plain HTTP to the TLS port fails at once, and the server goes on
        serving HTTPS.
        """
        curl = _need("curl")
        url = f"http://127.0.0.1:{self.server.number}/"
        _, _, code = yield getProcessOutputAndValue(curl, ["-sS", "-m", "5", url])
        self.assertNotEqual(code, 0)
        self.assertNotEqual(code, 28)  # not a timeout
        out, err, code = yield getProcessOutputAndValue(
            curl, ["-sS", "--cacert", self.pki.caFile, self.server.url()]
        )
        self.assertEqual((code, out), (0, BODY), err)

    @inlineCallbacks
    def _sClient(self, server: Server, *args: str) -> Any:
        openssl = _need("openssl")
        output, code = yield _run(
            openssl,
            ["s_client", "-connect", f"127.0.0.1:{server.number}", "-CAfile", self.pki.caFile]
            + list(args),
        )
        return code, output

    @inlineCallbacks
    def _tls11Server(self) -> Any:
        server = Server(
            self,
            makeServerContext(self.pki.certFile, self.pki.keyFile, enableTLS11=True),
            Site(self.resource),
        )
        code, output = yield self._sClient(server, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0")
        if code != 0 or b"TLSv1.1" not in output:
            raise SkipTest(f"the local openssl cannot offer TLS 1.1: {output[-300:]!r}")
        return server

    @inlineCallbacks
    def test_tls11RefusedByDefault(self) -> Any:
        """
        openssl s_client limited to TLS 1.1 is refused by default, and served
        when TLS 1.1 is enabled.
        """
        yield self._tls11Server()
        with capturedLogs():
            code, output = yield self._sClient(
                self.server, "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"
            )
        self.assertNotEqual(code, 0)
        self.assertIn(b"alert protocol version", output)

    @inlineCallbacks
    def test_tls12And13(self) -> Any:
        """
        openssl s_client with TLS 1.2 and with TLS 1.3 verifies the server
        and negotiates http/1.1.
        """
        for version, name in (("-tls1_2", b"TLSv1.2"), ("-tls1_3", b"TLSv1.3")):
            code, output = yield self._sClient(
                self.server, version, "-alpn", "http/1.1", "-verify_return_error"
            )
            self.assertEqual(code, 0, output)
            self.assertIn(b"New, " + name + b", Cipher", output)
            self.assertIn(b"ALPN protocol: http/1.1", output)
            self.assertIn(b"Verify return code: 0 (ok)", output)

    @inlineCallbacks
    def test_curlPinsSelfSigned(self) -> Any:
        """
        curl pinning the daemon's self-signed certificate as its CA file
        accepts the server.
        """
        curl = _need("curl")
        certFile, keyFile = ensureSelfSigned(self.mktemp())
        server = Server(self, makeServerContext(certFile, keyFile), Site(self.resource))
        output, code = yield _run(curl, ["-sS", "--cacert", certFile, server.url()])
        self.assertEqual((code, output), (0, BODY))

    @inlineCallbacks
    def test_endpoint(self) -> Any:
        """
        TLSServerEndpoint serves HTTPS on a TCP endpoint.
        """
        curl = _need("curl")
        endpoint = TLSServerEndpoint(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"),
            makeServerContext(self.pki.certFile, self.pki.keyFile),
            reactor,
        )
        port = yield endpoint.listen(Site(self.resource))
        self.addCleanup(port.stopListening)
        url = f"https://127.0.0.1:{port.getHost().port}/"
        out, err, code = yield getProcessOutputAndValue(
            curl, ["-sS", "--cacert", self.pki.caFile, url]
        )
        self.assertEqual((code, out), (0, BODY), err)
        self.assertEqual(self.resource.secure, [True])
        # Let the server see the close before the reactor is checked.
        while port.factory.protocols:
            yield deferLater(reactor, 0.01, lambda: None)


@implementer(IDirectReader)
class BufferReader:
    """
    Takes plaintext into a buffer of C{size} bytes, at most C{limit} bytes
    in all, recording each fill; offers nothing while C{offer} is false or
    once C{limit} bytes came.

    @ivar onFilled: Called after each fill with its size.
    """

    def __init__(self, size: int, limit: int | None = None) -> None:
        self.buffer = bytearray(size)
        self.limit = limit
        self.filled: list[bytes] = []
        self.offer = True
        self.asked = 0
        self.onFilled: Callable[[int], object] = lambda n: None

    def readBuffer(self) -> memoryview | None:
        self.asked += 1
        if not self.offer:
            return None
        view = memoryview(self.buffer)
        if self.limit is not None:
            left = self.limit - len(self.data)
            if not left:
                return None
            view = view[:left]
        return view

    def bufferFilled(self, n: int) -> None:
        self.filled.append(bytes(self.buffer[:n]))
        self.onFilled(n)

    @property
    def data(self) -> bytes:
        return b"".join(self.filled)


class DirectReaderTests(ContextMixin, SynchronousTestCase):
    """
    With a direct reader set, plaintext is decrypted into the reader's
    buffers instead of the shared buffer and C{dataReceived}.
    """

    def test_directReadTransport(self) -> None:
        """
        The wrapper provides L{IDirectReadTransport}.
        """
        c = self.connect()
        self.assertTrue(verifyObject(IDirectReadTransport, c.server))

    def test_plaintextIntoReaderBuffer(self) -> None:
        """
        Plaintext lands in the reader's buffer, each fill as large as the
        buffer but the last, and nothing reaches C{dataReceived}.
        """
        c = self.connect()
        c.handshake()
        reader = BufferReader(64 * 1024)
        c.server.setDirectReader(reader)
        c.send(BODY)
        self.assertEqual(reader.data, BODY)
        self.assertEqual({len(f) for f in reader.filled[:-1]}, {64 * 1024})
        self.assertEqual(len(reader.filled), len(BODY) // (64 * 1024) + 1)
        self.assertEqual(c.wrapped.received, [])

    def test_limitedByReaderBuffer(self) -> None:
        """
        A fill is bounded by the reader's buffer, not by L{READ_SIZE}:
        a small buffer takes many fills, a large one everything at once.
        """
        c = self.connect()
        c.handshake()
        small = BufferReader(1000)
        c.server.setDirectReader(small)
        c.send(BODY[:10_500])
        self.assertEqual([len(f) for f in small.filled], [1000] * 10 + [500])
        self.assertEqual(small.data, BODY[:10_500])
        large = BufferReader(2 * len(BODY))
        c.server.setDirectReader(large)
        c.send(BODY)
        self.assertEqual([len(f) for f in large.filled], [len(BODY)])
        self.assertGreater(len(BODY), READ_SIZE)
        self.assertEqual(large.data, BODY)

    def test_unsetReader(self) -> None:
        """
        After C{setDirectReader(None)} plaintext goes to C{dataReceived}
        again.
        """
        c = self.connect()
        c.handshake()
        reader = BufferReader(4096)
        c.server.setDirectReader(reader)
        c.send(b"one")
        c.server.setDirectReader(None)
        c.send(b"two")
        self.assertEqual((reader.data, c.wrapped.data), (b"one", b"two"))

    def test_readerOffersNothing(self) -> None:
        """
        A reader whose C{readBuffer} is C{None} is asked, and the plaintext
        goes to C{dataReceived}; once it offers a buffer again it gets the
        plaintext.
        """
        c = self.connect()
        c.handshake()
        reader = BufferReader(4096)
        reader.offer = False
        c.server.setDirectReader(reader)
        c.send(b"copied")
        self.assertGreater(reader.asked, 0)
        self.assertEqual((reader.filled, c.wrapped.data), ([], b"copied"))
        reader.offer = True
        c.send(b"direct")
        self.assertEqual((reader.data, c.wrapped.data), (b"direct", b"copied"))

    def test_readerUnsetsItself(self) -> None:
        """
        A reader that takes a fixed number of bytes and then unsets itself
        (an HTTP body) gets exactly those; plaintext decrypted after them in
        the same delivery goes to C{dataReceived}, in order.
        """
        c = self.connect()
        c.handshake()
        reader = BufferReader(4096, limit=10_000)

        def filled(n: int) -> None:
            if len(reader.data) == 10_000:
                c.server.setDirectReader(None)

        reader.onFilled = filled
        c.server.setDirectReader(reader)
        c.send(BODY[:30_000])
        self.assertEqual(reader.data, BODY[:10_000])
        self.assertEqual(c.wrapped.data, BODY[10_000:30_000])

    def test_readerPausesTransport(self) -> None:
        """
        A reader that pauses the transport from C{bufferFilled} gets no
        more until it resumes it, even with plaintext already decrypted.
        """
        c = self.connect()
        c.handshake()
        reader = BufferReader(1000)
        reader.onFilled = lambda n: c.server.pauseProducing()
        c.server.setDirectReader(reader)
        c.send(BODY[:5000])
        self.assertEqual(len(reader.filled), 1)
        while len(reader.data) < 5000:
            count = len(reader.filled)
            c.server.resumeProducing()
            self.assertEqual(len(reader.filled), count + 1)
        self.assertEqual(reader.data, BODY[:5000])
        self.assertEqual(c.wrapped.received, [])


class InMemoryDirectUploadTests(ContextMixin, SynchronousTestCase):
    """
    An upload over TLS to the images API is decrypted straight into the
    upload buffers.
    """

    def test_uploadDecryptedIntoSink(self) -> None:
        """
        The channel becomes the TLS transport's reader for a PUT body: the
        body bypasses C{dataReceived}, reaches storage intact, and a
        request pipelined behind it is answered; the reader is unset.
        """
        backend = FakeBackend(bytearray(256 * 1024), manual=False)
        h = ImagesHarness(opener=FakeOpener(backend), bufferSize=8192)
        h.addTicket(None, size=len(backend.image))
        c = self.connect(wrappedFactory=h.site)
        readers: list[IDirectReader | None] = []
        setDirectReader = c.server.setDirectReader

        def recording(reader: IDirectReader | None) -> None:
            readers.append(reader)
            setDirectReader(reader)

        self.patch(c.server, "setDirectReader", recording)
        copied: list[int] = []
        dataReceived = c.wrapped.dataReceived

        def counting(data: bytes) -> None:
            copied.append(len(data))
            dataReceived(data)

        self.patch(c.wrapped, "dataReceived", counting)
        c.handshake()
        data = BODY[: 3 * 8192 + 123]
        head = request(b"PUT", b"/images/t1?flush=n", {b"Content-Length": b"%d" % len(data)})
        c.send(head)
        self.assertEqual(readers, [c.wrapped])
        c.send(data + request(b"OPTIONS", b"/images/t1"))
        self.assertEqual(readers, [c.wrapped, None])
        # Through dataReceived: the head, then the body's last byte (through
        # Twisted's decoder, which ends the body) with the request pipelined
        # behind it (which the channel replays to itself once the PUT is
        # answered).
        options = request(b"OPTIONS", b"/images/t1")
        self.assertEqual(copied[:2], [len(head), 1 + len(options)])
        self.assertEqual([r.status for r in parseResponses(c.receive())], [200, 200])
        self.assertEqual(bytes(backend.image[: len(data)]), data)
