"""
Tests for L{imageio.web._transport}: the zero-copy TCP and UNIX server
transports and the endpoints listening with them.

These run on the real reactor with real loopback sockets. The client is a
blocking stdlib socket: it connects from the reactor thread (the kernel
completes the handshake from the listen backlog) and reads in a thread only
when a test lets it, so "the client does not read" is exact.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import stat
import struct
from array import array
from typing import TYPE_CHECKING, Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, DeferredQueue, succeed
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IListeningPort,
    IPullProducer,
    IPushProducer,
    IStreamServerEndpoint,
    ITCPTransport,
    ITLSTransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import directlyProvides, implementer
from zope.interface.verify import verifyObject

from imageio.interfaces import IDirectWriter, IZeroCopyTransport
from imageio.web._transport import (
    JOIN_SEQUENCE,
    TCPServerEndpoint,
    UNIXServerEndpoint,
    ZeroCopyTCPServer,
    ZeroCopyUNIXServer,
)
from tests._daemon import shortTempDir

reactor: Any = _reactor

KiB = 1024
MiB = 1024**2

#: Far more than loopback socket buffers hold while the client does not
#: read (its receive buffer is pinned to CLIENT_RCVBUF).
LARGE = 32 * MiB
CLIENT_RCVBUF = 64 * KiB

if TYPE_CHECKING:
    _Mixin = TestCase
else:
    _Mixin = object


def payload(size: int, seed: int = 0) -> bytearray:
    """
    @return: C{size} deterministic bytes without a short period, so that
        reordered or repeated pieces do not compare equal.
    """
    return bytearray(random.Random(seed).randbytes(size))


async def turns(count: int = 20) -> None:
    """
    Let the reactor run C{count} iterations, polling its descriptors each
    time, so that anything it would do by itself gets the chance.
    """
    for _ in range(count):
        await deferLater(reactor, 0, lambda: None)


class ServerProtocol(Protocol):
    """
    Records how the server side of a connection ended.
    """

    factory: ServerFactory

    def __init__(self) -> None:
        self.reason: Failure | None = None
        self._lost: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        self.factory.connections.put(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        waiters, self._lost = self._lost, []
        for d in waiters:
            d.callback(None)

    async def whenLost(self) -> Failure:
        """
        @return: The reason, once the connection is lost.
        """
        await self.lostDeferred()
        assert self.reason is not None
        return self.reason

    def lostDeferred(self) -> Deferred[None]:
        """
        @return: A Deferred firing once the connection is lost.
        """
        if self.reason is not None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lost.append(d)
        return d

    @property
    def zeroCopy(self) -> Any:
        """
        The transport, typed loosely: it is a Twisted transport and an
        L{IZeroCopyTransport}.
        """
        return self.transport


# Not Factory[ServerProtocol]: Factory is generic only from Twisted 25.
class ServerFactory(Factory):
    """
    Queues its protocols as they connect.
    """

    protocol = ServerProtocol

    def __init__(self) -> None:
        self.connections: DeferredQueue[ServerProtocol] = DeferredQueue()


class Client:
    """
    A blocking client socket that reads only when asked, in a thread.

    @ivar received: Bytes read so far (updated by the reading thread).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.received = 0

    def read(self, size: int | None = None) -> Deferred[bytes]:
        """
        Read in a thread until C{size} bytes or, without C{size}, until
        end of file.
        """
        return deferToThread(self._read, size)

    def _read(self, size: int | None) -> bytes:
        data = bytearray()
        while size is None or len(data) < size:
            chunk = self.sock.recv(1 * MiB)
            if not chunk:
                break
            data += chunk
            self.received += len(chunk)
        return bytes(data)

    def reset(self) -> None:
        """
        Close with unread data: a reset on TCP, the peer gone on UNIX.
        """
        if self.sock.family != socket.AF_UNIX:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        if self.sock.fileno() == -1:
            return
        try:
            # Wakes a thread blocked in recv.
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


@implementer(IPushProducer)
class RecordingPushProducer:
    """
    Records pause and resume calls, and the transport's pending bytes at
    each resume.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport
        self.events: list[str] = []
        self.pendingAtResume: list[int] = []
        self.resumed: Deferred[None] = Deferred()

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")
        self.pendingAtResume.append(self.transport.pendingBytes())
        if not self.resumed.called:
            self.resumed.callback(None)

    def stopProducing(self) -> None:
        self.events.append("stop")


@implementer(IPullProducer)
@implementer(IDirectWriter)
class _BytesWriter:
    """
    A direct writer sending bytes with C{os.write} on the socket.
    """

    def __init__(self, data: bytes) -> None:
        self.view = memoryview(data)
        self.calls = 0

    def sendTo(self, fd: int) -> bool:
        self.calls += 1
        while self.view:
            try:
                n = os.write(fd, self.view)
            except BlockingIOError:
                return True
            self.view = self.view[n:]
        return False


@implementer(IPullProducer)
class _PullProducer:
    """
    A pull producer that produces nothing.
    """

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class ChunkPullProducer:
    """
    A pull producer writing C{data} in C{chunk}-byte writes, one per
    C{resumeProducing}, then closing the connection.
    """

    def __init__(self, transport: Any, data: bytes, chunk: int) -> None:
        self.transport = transport
        self.data = data
        self.chunk = chunk
        self.offset = 0

    def resumeProducing(self) -> None:
        piece = self.data[self.offset : self.offset + self.chunk]
        self.offset += len(piece)
        self.transport.write(piece)
        if self.offset == len(self.data):
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def stopProducing(self) -> None:
        pass


class _ZeroCopyServerTestsMixin(_Mixin):
    """
    Tests for a zero-copy server transport, run over TCP and UNIX sockets.
    """

    serverClass: type
    #: No test here takes a second: fail a hung one quickly.
    timeout = 10

    def endpoint(self) -> IStreamServerEndpoint:
        """
        @return: The endpoint to listen with.
        """
        raise NotImplementedError()

    def dial(self, port: IListeningPort) -> socket.socket:
        """
        @return: A blocking socket connected to C{port}.
        """
        raise NotImplementedError()

    def setUp(self) -> None:
        self.factory = ServerFactory()
        self.port = self.successResultOf(self.endpoint().listen(self.factory))
        self.addCleanup(self.port.stopListening)

    async def connect(self) -> tuple[Any, Client]:
        """
        Connect a client that reads nothing until told.

        @return: The server transport and the client.
        """
        client = Client(self.dial(self.port))
        protocol = await self.factory.connections.get()
        self.addCleanup(self._disconnect, protocol, client)
        self.assertIsInstance(protocol.transport, self.serverClass)
        self.protocol = protocol
        return protocol.transport, client

    async def lost(self) -> Failure:
        """
        Wait until the connection is lost and the transport is done with
        it (whatever it does after calling the protocol).

        @return: The reason given to the protocol.
        """
        reason = await self.protocol.whenLost()
        await turns(1)
        return reason

    async def _disconnect(self, protocol: ServerProtocol, client: Client) -> None:
        client.close()
        if protocol.reason is None:
            protocol.zeroCopy.abortConnection()
        await protocol.whenLost()

    async def test_writeByReference(self) -> None:
        """
        A written memoryview is sent byte-exact and by reference: a change
        to its buffer before L{whenDrained} fires is what the client gets,
        a change after it is not.
        """
        transport, client = await self.connect()
        data = payload(LARGE)
        view = memoryview(data)
        transport.write(view)
        pending = transport.pendingBytes()
        self.assertGreater(pending, 1 * MiB)
        drained = transport.whenDrained()
        self.assertFalse(drained.called)
        # The tail is still queued in user space: change it there.
        view[-MiB:] = payload(MiB, seed=1)
        expected = bytes(data)
        reading = client.read(LARGE)
        await drained
        self.assertEqual(transport.pendingBytes(), 0)
        view[:] = bytes(LARGE)
        received = await reading
        self.assertEqual(len(received), LARGE)
        self.assertTrue(received == expected, "Received bytes differ from the buffer")

    async def test_sendNow(self) -> None:
        """
        C{sendNow} hands bytes to the kernel at once while nothing is
        queued, and sends nothing (0) while something is, so the order
        holds; after the connection closed it sends nothing either.
        """
        transport, client = await self.connect()
        first = bytes(payload(64 * 1024))
        self.assertEqual(transport.sendNow(first), len(first))
        self.assertEqual(transport.pendingBytes(), 0)
        queued = payload(LARGE, seed=3)
        transport.write(queued)
        self.assertGreater(transport.pendingBytes(), 0)
        self.assertEqual(transport.sendNow(b"late"), 0)
        transport.write(b"late")
        received = await client.read(len(first) + LARGE + 4)
        self.assertTrue(received == first + bytes(queued) + b"late", "Received bytes differ")
        transport.loseConnection()
        await self.lost()
        self.assertEqual(transport.sendNow(b"x"), 0)

    async def test_sendNowPullProducer(self) -> None:
        """
        C{sendNow} sends nothing while a pull producer is registered: it
        is asked for more from the write pass, which C{write} schedules.
        """
        transport, client = await self.connect()
        producer = _PullProducer()
        transport.registerProducer(producer, False)
        self.assertEqual(transport.sendNow(b"abc"), 0)
        transport.unregisterProducer()
        self.assertEqual(transport.sendNow(b"abc"), 3)
        self.assertEqual(await client.read(3), b"abc")

    async def test_directWriterAfterQueue(self) -> None:
        """
        A direct writer sends into the socket only once everything written
        to the transport before is sent, and again whenever the socket is
        writable while it has bytes left.
        """
        transport, client = await self.connect()
        head, body = payload(LARGE), payload(LARGE, seed=2)
        writer = _BytesWriter(bytes(body))
        transport.write(head)
        self.assertGreater(transport.pendingBytes(), 0)
        transport.setDirectWriter(writer)
        transport.directWriteReady()
        self.assertEqual(writer.calls, 0)
        received = await client.read(2 * LARGE)
        self.assertTrue(received == bytes(head) + bytes(body), "Received bytes differ")
        self.assertGreater(writer.calls, 1)
        transport.setDirectWriter(None)

    async def test_directWriterLost(self) -> None:
        """
        A direct writer's socket error is a lost connection.
        """
        transport, client = await self.connect()
        writer = _BytesWriter(bytes(payload(LARGE)))
        transport.setDirectWriter(writer)
        transport.directWriteReady()
        client.reset()
        reason = await self.lost()
        self.assertIsInstance(reason.value, (ConnectionDone, ConnectionLost, ConnectionAborted))

    async def test_startTLSRefused(self) -> None:
        """
        C{startTLS} is refused: it would write through buffers this
        transport never sends. The transport does not claim
        L{ITLSTransport}, and still is a full TCP transport.
        """
        transport, client = await self.connect()
        self.assertRaises(NotImplementedError, transport.startTLS, None)
        self.assertFalse(ITLSTransport.providedBy(transport))
        self.assertTrue(verifyObject(ITCPTransport, transport))
        self.assertTrue(IPushProducer.providedBy(transport))
        self.assertTrue(IConsumer.providedBy(transport))

    async def test_whenDrainedAtOnce(self) -> None:
        """
        With nothing pending L{whenDrained} has fired already; a write
        behind queued bytes is pending until the reactor's next write pass,
        which sends it even though the client reads nothing.
        """
        transport, client = await self.connect()
        self.assertEqual(transport.pendingBytes(), 0)
        self.assertTrue(transport.whenDrained().called)
        transport._enqueue(memoryview(b"x" * 50))
        transport.write(b"x" * 50)
        self.assertEqual(transport.pendingBytes(), 100)
        drained = transport.whenDrained()
        self.assertFalse(drained.called)
        await drained
        self.assertEqual(transport.pendingBytes(), 0)
        self.assertTrue(transport.whenDrained().called)
        self.assertEqual(await client.read(100), b"x" * 100)

    async def test_whenDrainedWaitsForClient(self) -> None:
        """
        While the client reads nothing, L{whenDrained} does not fire; it
        fires once the client read, with nothing pending any more.
        """
        transport, client = await self.connect()
        data = payload(LARGE)
        transport.write(memoryview(data))
        drained = transport.whenDrained()
        seen: list[tuple[int, int]] = []
        drained.addCallback(lambda _: seen.append((transport.pendingBytes(), client.received)))
        await turns()
        self.assertFalse(drained.called)
        self.assertGreater(transport.pendingBytes(), 0)
        reading = client.read(LARGE)
        await drained
        [(pending, received)] = seen
        self.assertEqual(pending, 0)
        self.assertGreater(received, 0)
        self.assertTrue(await reading == data)

    async def test_writeSentAtOnce(self) -> None:
        """
        A write to an idle socket goes to the kernel within C{write},
        however small (a whole small response: one send, no write pass);
        a write behind queued bytes waits for the write pass.
        """
        transport, client = await self.connect()
        transport.write(b"s" * 100)
        self.assertEqual(transport.pendingBytes(), 0)
        self.assertEqual(await client.read(100), b"s" * 100)
        transport._enqueue(memoryview(b"q" * 10))
        transport.write(b"t" * 10)
        self.assertEqual(transport.pendingBytes(), 20)
        await transport.whenDrained()
        self.assertEqual(await client.read(20), b"q" * 10 + b"t" * 10)

    async def test_producerPausedAndResumed(self) -> None:
        """
        A streaming producer is paused once more than C{bufferSize} bytes
        are queued (not before), and resumed only once all were sent.
        """
        transport, client = await self.connect()
        producer = RecordingPushProducer(transport)
        transport.registerProducer(producer, True)
        transport.write(b"h" * 1000)
        self.assertEqual(producer.events, [])
        data = payload(LARGE)
        transport.write(memoryview(data))
        self.assertGreater(transport.pendingBytes(), transport.bufferSize)
        self.assertEqual(producer.events, ["pause"])
        await turns()
        self.assertEqual(producer.events, ["pause"])
        reading = client.read(1000 + LARGE)
        await producer.resumed
        self.assertEqual(producer.events, ["pause", "resume"])
        self.assertEqual(producer.pendingAtResume, [0])
        self.assertTrue(await reading == b"h" * 1000 + data)

    async def test_pullProducerLargeWrites(self) -> None:
        """
        A non-streaming producer writing C{JOIN_SEQUENCE}-byte chunks is
        asked for the next chunk after each one was sent, up to the end.
        """
        transport, client = await self.connect()
        data = bytes(payload(16 * JOIN_SEQUENCE))
        reading = client.read()
        transport.registerProducer(ChunkPullProducer(transport, data, JOIN_SEQUENCE), False)
        lost = self.protocol.lostDeferred()
        # Without a next resumeProducing the transfer stalls: give up early.
        timeout = reactor.callLater(0.5, lost.cancel)
        await lost
        timeout.cancel()
        self.assertIsNotNone(self.protocol.reason)
        self.protocol.reason.trap(ConnectionDone)  # type: ignore[union-attr]
        self.assertTrue(await reading == data)

    async def test_loseConnectionAfterQueuedWrites(self) -> None:
        """
        loseConnection with large writes queued sends all of them, then
        closes: the client sees the whole payload, then end of file.
        """
        transport, client = await self.connect()
        pieces = [payload(8 * MiB, seed=n) for n in range(4)]
        for piece in pieces:
            transport.write(memoryview(piece))
        transport.write(b"tail")
        self.assertGreater(transport.pendingBytes(), 0)
        transport.loseConnection()
        received = await client.read()
        self.assertTrue(received == b"".join(pieces) + b"tail")
        reason = await self.protocol.whenLost()
        reason.trap(ConnectionDone)

    async def test_writeSequenceSmallPieces(self) -> None:
        """
        writeSequence of many small pieces, joined or queued one by one,
        arrives intact and in order.
        """
        transport, client = await self.connect()
        rng = random.Random(2)
        few = [rng.randbytes(rng.randrange(1, 50)) for _ in range(100)]
        many = [rng.randbytes(rng.randrange(1, 200)) for _ in range(5000)]
        self.assertLess(sum(map(len, few)), JOIN_SEQUENCE)
        self.assertGreater(sum(map(len, many)), JOIN_SEQUENCE)
        reading = client.read()
        transport.writeSequence(few)
        transport.writeSequence(many)
        transport.writeSequence(few)
        transport.loseConnection()
        self.assertEqual(await reading, b"".join(few + many + few))

    async def test_mixedWritesKeepOrder(self) -> None:
        """
        Small and large writes, bytes and views (of multi-byte items too),
        queued or sent at once, arrive in the order written.
        """
        transport, client = await self.connect()
        reading = client.read()
        large1 = payload(2 * MiB, seed=3)
        large2 = payload(3 * MiB, seed=4)
        large3 = payload(1 * MiB, seed=5)
        ints = array("i", range(70000))
        expected: list[bytes] = []

        def write(data: Any) -> None:
            transport.write(data)
            expected.append(bytes(memoryview(data).cast("B")))

        write(b"head")
        write(memoryview(large1))
        write(b"middle")
        transport.writeSequence([b"seq1", large2, b"seq2"])
        expected.extend([b"seq1", bytes(large2), b"seq2"])
        await transport.whenDrained()
        # Idle socket: sent within write.
        write(memoryview(large3))
        write(b"after")
        write(memoryview(ints))
        write(memoryview(large1)[100:200000])
        transport.loseConnection()
        self.assertTrue(await reading == b"".join(expected))

    async def test_clientGoneWhileQueued(self) -> None:
        """
        The client closing with data queued fires the pending
        L{whenDrained} waiters and the protocol's connectionLost; nothing
        is pending afterwards.
        """
        transport, client = await self.connect()
        transport.write(memoryview(payload(LARGE)))
        drained = transport.whenDrained()
        await turns()
        self.assertFalse(drained.called)
        client.reset()
        await self.lost()
        self.assertTrue(drained.called)
        self.assertEqual(transport.pendingBytes(), 0)
        self.assertTrue(transport.whenDrained().called)

    async def test_abortWhileQueued(self) -> None:
        """
        abortConnection with data queued fires the pending L{whenDrained}
        waiters and the protocol's connectionLost with L{ConnectionAborted}.
        """
        transport, client = await self.connect()
        transport.write(memoryview(payload(LARGE)))
        drained = transport.whenDrained()
        transport.abortConnection()
        reason = await self.lost()
        reason.trap(ConnectionAborted)
        self.assertTrue(drained.called)
        self.assertEqual(transport.pendingBytes(), 0)

    async def test_drainWaiterWritesWhileLost(self) -> None:
        """
        A L{whenDrained} asked for by a waiter that the lost connection
        fired (after writing again) fires too, leaving nothing pending.
        """
        transport, client = await self.connect()
        transport.write(memoryview(payload(LARGE)))
        again: list[Deferred[None]] = []

        def waiter(_: None) -> None:
            transport.write(memoryview(payload(MiB)))
            again.append(transport.whenDrained())

        transport.whenDrained().addCallback(waiter)
        await turns()
        client.reset()
        await self.lost()
        [second] = again
        self.assertTrue(second.called, "whenDrained never fires")
        self.assertEqual(transport.pendingBytes(), 0)

    async def test_resumeWhileReading(self) -> None:
        """
        C{resumeProducing} on a transport that reads (what twisted.web's
        channel calls after every request) leaves the reactor alone; after
        C{pauseProducing} it watches the socket again.
        """
        transport, client = await self.connect()
        added: list[object] = []
        self.patch(reactor, "addReader", added.append)
        transport.resumeProducing()
        self.assertEqual(added, [])
        transport.pauseProducing()
        self.assertNotIn(transport, reactor.getReaders())
        transport.resumeProducing()
        self.assertEqual(added, [transport])

    async def test_resumeAfterHalfClose(self) -> None:
        """
        Once the reactor stopped watching a socket the client half-closed,
        C{resumeProducing} watches it again, as Twisted's transports do.
        """
        transport, client = await self.connect()
        halves: list[str] = []
        directlyProvides(self.protocol, IHalfCloseableProtocol)
        self.protocol.readConnectionLost = lambda: halves.append("read")  # type: ignore[attr-defined]
        client.sock.shutdown(socket.SHUT_WR)
        while not halves:
            await turns(1)
        self.assertNotIn(transport, reactor.getReaders())
        added: list[object] = []
        self.patch(reactor, "addReader", added.append)
        transport.resumeProducing()
        self.assertEqual(added, [transport])


class ZeroCopyTCPServerTests(_ZeroCopyServerTestsMixin, TestCase):
    """
    L{ZeroCopyTCPServer} over loopback TCP.
    """

    serverClass = ZeroCopyTCPServer

    def endpoint(self) -> IStreamServerEndpoint:
        return TCPServerEndpoint(reactor, 0, interface="127.0.0.1")

    def dial(self, port: IListeningPort) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port.getHost().port))  # type: ignore[attr-defined]
        return sock


class ZeroCopyUNIXServerTests(_ZeroCopyServerTestsMixin, TestCase):
    """
    L{ZeroCopyUNIXServer} over a UNIX socket.
    """

    serverClass = ZeroCopyUNIXServer

    def endpoint(self) -> IStreamServerEndpoint:
        directory = shortTempDir("iio-zc-")
        self.addCleanup(shutil.rmtree, directory, True)
        return UNIXServerEndpoint(reactor, str(directory / "sock"))

    def dial(self, port: IListeningPort) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
        sock.settimeout(10)
        sock.connect(port.getHost().name)  # type: ignore[attr-defined]
        return sock


class _CountingSocket:
    """
    A socket wrapper that records which methods were called.
    """

    def __init__(self, sock: socket.socket, calls: list[str]) -> None:
        self._sock = sock
        self._calls = calls

    def __getattr__(self, name: str) -> Any:
        self._calls.append(name)
        return getattr(self._sock, name)


class EndpointTests(TestCase):
    """
    The endpoints listen where asked, and their connections are zero-copy
    transports.
    """

    async def accept(
        self, endpoint: IStreamServerEndpoint, family: int, address: Any
    ) -> tuple[IListeningPort, Any]:
        """
        Listen with C{endpoint} and connect a client to C{address}, or to
        the port's address if C{address} is None.

        @return: The listening port and the server transport.
        """
        self.assertTrue(verifyObject(IStreamServerEndpoint, endpoint))
        factory = ServerFactory()
        port = await endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        host: Any = port.getHost()
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(10)
        self.addCleanup(sock.close)
        sock.connect(address if address is not None else (host.host, host.port))
        protocol = await factory.connections.get()

        async def disconnect() -> None:
            protocol.zeroCopy.abortConnection()
            await protocol.whenLost()

        self.addCleanup(disconnect)
        transport = protocol.transport
        self.assertTrue(verifyObject(IZeroCopyTransport, transport))
        transport.write(b"hello")  # type: ignore[union-attr]
        self.assertEqual(await deferToThread(sock.recv, 5), b"hello")
        return port, transport

    async def test_tcp4(self) -> None:
        """
        On an IPv4 address the connections are L{ZeroCopyTCPServer}s.
        """
        endpoint = TCPServerEndpoint(reactor, 0, interface="127.0.0.1")
        port, transport = await self.accept(endpoint, socket.AF_INET, None)
        self.assertEqual(port.getHost().host, "127.0.0.1")  # type: ignore[attr-defined]
        self.assertIsInstance(transport, ZeroCopyTCPServer)

    async def test_addressesAskedOnce(self) -> None:
        """
        A connection's host and peer addresses are the socket's, and the
        kernel is asked for the host address once, not on every request.
        """
        endpoint = TCPServerEndpoint(reactor, 0, interface="127.0.0.1")
        port, transport = await self.accept(endpoint, socket.AF_INET, None)
        listening: Any = port.getHost()
        sock = transport.getHandle()
        calls = []
        # socket.socket's methods are read-only; wrap the handle instead.
        transport.socket = _CountingSocket(sock, calls)
        self.addCleanup(setattr, transport, "socket", sock)
        host, peer = transport.getHost(), transport.getPeer()
        self.assertEqual((host.host, host.port), ("127.0.0.1", listening.port))
        self.assertEqual((peer.host, peer.port), sock.getpeername())
        self.assertIs(transport.getHost(), host)
        self.assertIs(transport.getPeer(), peer)
        self.assertLessEqual(calls.count("getsockname"), 1)

    async def test_tcp6(self) -> None:
        """
        On an IPv6 address the endpoint listens on IPv6, with
        L{ZeroCopyTCPServer} connections.
        """
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError as e:
            raise SkipTest(f"No IPv6 loopback: {e}") from None
        endpoint = TCPServerEndpoint(reactor, 0, interface="::1")
        port, transport = await self.accept(endpoint, socket.AF_INET6, None)
        self.assertEqual(port.getHost().host, "::1")  # type: ignore[attr-defined]
        self.assertEqual(transport.getHandle().family, socket.AF_INET6)
        self.assertIsInstance(transport, ZeroCopyTCPServer)

    async def test_unixMode(self) -> None:
        """
        The UNIX endpoint creates its socket with the mode asked for, and
        the connections are L{ZeroCopyUNIXServer}s.
        """
        directory = shortTempDir("iio-zc-")
        self.addCleanup(shutil.rmtree, directory, True)
        path = str(directory / "sock")
        endpoint = UNIXServerEndpoint(reactor, path, mode=0o660)
        port, transport = await self.accept(endpoint, socket.AF_UNIX, path)
        st = os.stat(path)
        self.assertTrue(stat.S_ISSOCK(st.st_mode))
        self.assertEqual(stat.S_IMODE(st.st_mode), 0o660)
        self.assertIsInstance(transport, ZeroCopyUNIXServer)
