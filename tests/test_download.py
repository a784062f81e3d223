# -*- test-case-name: tests.test_download -*-
"""
Tests for L{imageio.web._download.DownloadProducer}.
"""

from __future__ import annotations

import random
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import alsoProvides, implementer
from zope.interface.verify import verifyObject

from imageio._buffers import BufferBudget, BufferPool
from imageio.interfaces import IBackend, IZeroCopyTransport
from imageio.tickets import Operation, OperationCanceled
from imageio.web._download import HOLD_MIN, DownloadProducer, ReaderStalled, TruncatedImage
from tests._http import FakeBackend, countAllocations

BUFFER = 4096


class TLSStringTransport(StringTransport):
    """
    A transport that says it is TLS, and accepts views like TLS transports.
    """

    def __init__(self) -> None:
        super().__init__()
        alsoProvides(self, ISSLTransport)

    def write(self, data: Any) -> None:
        super().write(bytes(data))


@define
class FakeChannel:
    transport: StringTransport


@define
class FakeRequest:
    """
    The part of a request a L{DownloadProducer} uses.
    """

    channel: Any
    written: list[Any] = field(factory=list)
    producer: Any = None
    finished: bool = False
    startedWriting: bool = False
    _finishes: list[Deferred[None]] = field(factory=list)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: Any) -> None:
        self.startedWriting = True
        self.written.append(data)

    def finish(self) -> None:
        self.finished = True

    def notifyFinish(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._finishes.append(d)
        return d

    def lose(self) -> None:
        self.channel = None
        for d in self._finishes:
            d.errback(Failure(ConnectionError("lost")))

    @property
    def body(self) -> bytes:
        return b"".join(bytes(d) for d in self.written)


class DownloadProducerTests(SynchronousTestCase):
    """
    The producer streams a range with two buffers, under the transport's
    control.
    """

    def setUp(self) -> None:
        self.image = bytearray(bytes(range(256)) * 64)  # 16 KiB
        self.backend = FakeBackend(self.image)
        self.transport = StringTransport()
        self.request = FakeRequest(FakeChannel(self.transport))
        self.clock = Clock()
        self.op = Operation("read", 0)
        self.allocations = countAllocations(self)

    def producer(
        self, offset: int = 0, length: int | None = None, idleTimeout: float | None = None
    ) -> DownloadProducer:
        self.op.offset = offset
        return DownloadProducer(
            self.request,  # type: ignore[arg-type]
            self.backend,  # type: ignore[arg-type]
            offset,
            len(self.image) - offset if length is None else length,
            self.op,
            self.clock,
            bufferSize=BUFFER,
            idleTimeout=idleTimeout,
        )

    def test_interface(self) -> None:
        """
        The producer is a push producer.
        """
        from twisted.internet.interfaces import IPushProducer

        self.assertTrue(verifyObject(IPushProducer, self.producer()))
        self.assertTrue(verifyObject(IBackend, self.backend))

    def test_range(self) -> None:
        """
        The range is read chunk by chunk and written in order; the request is
        finished and the producer unregistered.
        """
        self.backend.manual = False
        done = self.producer(100, 10000).start()
        self.successResultOf(done)
        self.assertEqual(self.request.body, bytes(self.image[100:10100]))
        self.assertTrue(self.request.finished)
        self.assertIsNone(self.request.producer)
        self.assertEqual(self.op.done, 10000)

    def test_poolReusedAcrossRequests(self) -> None:
        """
        With a connection pool, finished downloads leave their buffers there
        and the next download on the connection maps no new memory.
        """
        self.backend.manual = False
        pool = BufferPool(BufferBudget())
        first = self.producer(0, 100)
        first.pool = pool
        self.successResultOf(first.start())
        self.assertEqual(len(pool), 1)
        self.assertEqual(self.allocations, [BUFFER])
        self.request = FakeRequest(FakeChannel(self.transport))
        second = self.producer(200, 100)
        second.pool = pool
        self.successResultOf(second.start())
        self.assertEqual(self.request.body, bytes(self.image[200:300]))
        self.assertEqual(self.allocations, [BUFFER])
        self.assertEqual(len(pool), 1)

    def test_bytesOnPlainTransports(self) -> None:
        """
        Plain transports get bytes (Twisted's sockets refuse anything else).
        """
        self.backend.manual = False
        self.producer().start()
        self.assertTrue(all(type(d) is bytes for d in self.request.written))

    def test_viewsOnTLS(self) -> None:
        """
        TLS transports, which encrypt at once, get views of the buffer: no
        copy.
        """
        self.request.channel = FakeChannel(TLSStringTransport())
        self.backend.manual = False
        self.producer().start()
        self.assertTrue(all(type(d) is memoryview for d in self.request.written))

    def test_twoBuffers(self) -> None:
        """
        However long the download, at most two buffers are allocated.
        """
        self.image.extend(self.image * 10)
        self.backend.manual = False
        self.successResultOf(self.producer().start())
        self.assertLessEqual(len(self.allocations), 2)

    def test_paused(self) -> None:
        """
        While paused, one chunk is read ahead and kept; resuming writes it
        and reads on.
        """
        producer = self.producer()
        producer.start()
        producer.pauseProducing()
        self.backend.completeRead()
        self.assertEqual((self.request.written, self.backend.pendingReads()), ([], 0))
        producer.resumeProducing()
        self.assertEqual(self.request.body, bytes(self.image[:BUFFER]))
        self.assertEqual(self.backend.pendingReads(), 1)

    def test_stalled(self) -> None:
        """
        Paused longer than the idle timeout: the connection is aborted and
        C{done} fails with L{ReaderStalled}; resuming in time cancels that.
        """
        producer = self.producer(idleTimeout=10)
        done = producer.start()
        self.backend.completeRead()
        producer.pauseProducing()
        self.clock.advance(9)
        producer.resumeProducing()
        producer.pauseProducing()
        self.clock.advance(9)
        self.assertNoResult(done)
        self.clock.advance(2)
        self.failureResultOf(done, ReaderStalled)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_truncated(self) -> None:
        """
        An image shorter than promised aborts the connection after what was
        sent, failing with L{TruncatedImage}.
        """
        self.backend.manual = False
        done = self.producer(0, len(self.image) + 10).start()
        self.failureResultOf(done, TruncatedImage)
        self.assertTrue(self.transport.disconnected)

    def test_readFailsBeforeFirstByte(self) -> None:
        """
        A read error before anything was written fails C{done} without
        aborting: the caller can still answer with an error.
        """
        done = self.producer().start()
        self.backend.reads[0][2].errback(OSError(5, "Input/output error"))
        self.failureResultOf(done, OSError)
        self.assertFalse(self.transport.disconnected)
        self.assertIsNone(self.request.producer)

    def test_readFailsLater(self) -> None:
        """
        A read error after bytes were written aborts the connection.
        """
        done = self.producer().start()
        self.backend.completeRead()
        self.backend.reads[1][2].errback(OSError(5, "Input/output error"))
        self.failureResultOf(done, OSError)
        self.assertTrue(self.transport.disconnected)

    def test_clientGone(self) -> None:
        """
        A lost client (seen through C{notifyFinish}, after the request lost
        its channel) stops the producer; the read in flight is dropped.
        """
        done = self.producer().start()
        self.backend.completeRead()
        self.request.lose()
        self.failureResultOf(done, ConnectionError)
        self.backend.completeRead()
        self.assertEqual(len(self.request.written), 1)

    def test_stopProducing(self) -> None:
        """
        The transport stopping the producer fails C{done} with
        L{ConnectionError} and unregisters it.
        """
        producer = self.producer()
        done = producer.start()
        producer.stopProducing()
        self.failureResultOf(done, ConnectionError)
        self.assertIsNone(self.request.producer)

    def test_cancel(self) -> None:
        """
        Canceling fails C{done} with the reason given and aborts once bytes
        were sent.
        """
        producer = self.producer()
        done = producer.start()
        self.backend.completeRead()
        producer.cancel(OperationCanceled("Transfer tr-1 was canceled"))
        failure = self.failureResultOf(done, OperationCanceled)
        self.assertIn("tr-1", str(failure.value))
        self.assertTrue(self.transport.disconnected)

    def test_canceledOperation(self) -> None:
        """
        An operation marked canceled stops the producer at the next chunk.
        """
        producer = self.producer()
        done = producer.start()
        self.op.canceled = True
        self.backend.completeRead()
        self.failureResultOf(done, OperationCanceled)


def _image(size: int) -> bytearray:
    """
    @return: C{size} deterministic bytes without a short period, so a chunk
        read into the wrong buffer or sent twice does not compare equal.
    """
    return bytearray(random.Random(size).randbytes(size))


@implementer(IZeroCopyTransport)
class ZeroCopyStringTransport(StringTransport):
    """
    A transport that keeps written buffers by reference, as the zero-copy
    socket transports do, until the test "sends" them: L{sent} gets their
    content at that time, as the kernel would.

    @ivar literal: Fire each L{whenDrained} once the bytes written before it
        was asked for are sent (all the interface promises) instead of only
        once nothing is pending (what the socket transports do).
    """

    def __init__(self, literal: bool = False) -> None:
        super().__init__()
        self.literal = literal
        self.queue: list[memoryview] = []
        self.sent = bytearray()
        self.drainRequests = 0
        self._written = 0
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        self.queue.append(view)
        self._written += len(view)

    def pendingBytes(self) -> int:
        return sum(len(v) for v in self.queue)

    def whenDrained(self) -> Deferred[None]:
        self.drainRequests += 1
        if not self.queue:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((self._written, d))
        return d

    def send(self, size: int | None = None) -> None:
        """
        Send the first C{size} queued bytes, or all, then fire the waiters
        that are due.
        """
        size = self.pendingBytes() if size is None else size
        while size:
            head = self.queue[0]
            n = min(size, len(head))
            self.sent += head[:n]
            size -= n
            if n == len(head):
                self.queue.pop(0)
            else:
                self.queue[0] = head[n:]
        done = self._written - self.pendingBytes()
        due = [
            (mark, d)
            for mark, d in self._waiters
            if not self.queue or (self.literal and mark <= done)
        ]
        for waiter in due:
            self._waiters.remove(waiter)
            waiter[1].callback(None)

    def lose(self) -> None:
        """
        The connection is gone: nothing more is sent, waiters fire.
        """
        self.queue.clear()
        self.send()


@implementer(IZeroCopyTransport)
class SendingZeroCopyTransport(StringTransport):
    """
    A zero-copy transport whose socket takes every write at once.
    """

    drainRequests = 0

    def write(self, data: Any) -> None:
        super().write(bytes(data))

    def pendingBytes(self) -> int:
        return 0

    def whenDrained(self) -> Deferred[None]:
        self.drainRequests += 1
        return succeed(None)


@define
class TransportRequest(FakeRequest):
    """
    A request whose body goes to its channel's transport too.
    """

    def write(self, data: Any) -> None:
        super().write(data)
        self.channel.transport.write(data)


class DownloadProducerHeldTests(SynchronousTestCase):
    """
    With a transport that holds written buffers until sent
    (L{IZeroCopyTransport}), the producer writes views of its buffers and
    reuses one only once the transport is done with it.
    """

    def setUp(self) -> None:
        # Four full chunks and a short one.
        self.image = _image(4 * HOLD_MIN + 1000)
        self.backend = FakeBackend(self.image)
        self.transport = ZeroCopyStringTransport()
        self.request = TransportRequest(FakeChannel(self.transport))
        self.op = Operation("read", 0)
        self.allocations = countAllocations(self)

    def producer(self, length: int | None = None, bufferSize: int = HOLD_MIN) -> DownloadProducer:
        return DownloadProducer(
            self.request,  # type: ignore[arg-type]
            self.backend,  # type: ignore[arg-type]
            0,
            len(self.image) if length is None else length,
            self.op,
            Clock(),
            bufferSize=bufferSize,
        )

    def buffer(self, read: int) -> Any:
        """
        @return: The object whose memory the backend's C{read}th read filled.
        """
        return self.backend.reads[read][1].obj

    def runToEnd(self, done: Deferred[None]) -> None:
        """
        Complete reads, sending what the transport holds when the producer
        waits for it, until C{done} fires.
        """
        for _ in range(100):
            if done.called:
                return
            if self.backend.pendingReads():
                self.backend.completeRead()
            else:
                self.transport.send()
        self.fail("The download does not end")

    def test_views(self) -> None:
        """
        Chunks of at least C{HOLD_MIN} are written as views of the buffer
        the backend read into, not copies.
        """
        self.producer().start()
        self.backend.completeRead()
        [written] = self.request.written
        self.assertIs(type(written), memoryview)
        self.assertIs(written.obj, self.buffer(0))
        self.assertEqual(self.transport.pendingBytes(), HOLD_MIN)

    def test_heldNotReused(self) -> None:
        """
        With both buffers held by the transport no read starts; once
        L{whenDrained} fires, the next read reuses one of them, and the
        client gets the image intact.
        """
        done = self.producer().start()
        self.backend.completeRead()
        self.backend.completeRead()
        self.assertEqual(len(self.request.written), 2)
        self.assertIsNot(self.buffer(0), self.buffer(1))
        self.assertEqual(self.backend.pendingReads(), 0)
        self.assertEqual(len(self.backend.reads), 2)
        self.transport.send()
        self.assertEqual(len(self.backend.reads), 3)
        self.assertIn(self.buffer(2), (self.buffer(0), self.buffer(1)))
        self.runToEnd(done)
        self.successResultOf(done)
        self.transport.send()
        self.assertTrue(self.transport.sent == self.image, "The client got other bytes")
        self.assertEqual(self.allocations, [HOLD_MIN, HOLD_MIN])

    def test_heldUntilDrainedNotJustSent(self) -> None:
        """
        A buffer still partly queued is not reused: sending part of what is
        pending frees nothing.
        """
        done = self.producer().start()
        self.backend.completeRead()
        self.backend.completeRead()
        self.transport.send(HOLD_MIN + 1)
        self.assertEqual(len(self.backend.reads), 2)
        self.runToEnd(done)
        self.transport.send()
        self.assertTrue(self.transport.sent == self.image, "The client got other bytes")

    def test_reusedWhenSentAtOnce(self) -> None:
        """
        When the transport sent a view within C{write} (nothing pending),
        its buffer is reused at once, without asking for L{whenDrained}.
        """
        transport = SendingZeroCopyTransport()
        self.request = TransportRequest(FakeChannel(transport))
        self.backend.manual = False
        self.successResultOf(self.producer().start())
        self.assertEqual(transport.value(), self.image)
        self.assertTrue(all(type(d) is memoryview for d in self.request.written[:-1]))
        self.assertEqual(transport.drainRequests, 0)
        self.assertEqual(self.allocations, [HOLD_MIN])

    def test_smallChunksCopied(self) -> None:
        """
        Chunks under C{HOLD_MIN} are written as bytes, and their buffer is
        reused at once though the transport has not sent anything.
        """
        self.backend.manual = False
        done = self.producer(bufferSize=HOLD_MIN // 4).start()
        self.successResultOf(done)
        self.assertTrue(all(type(d) is bytes for d in self.request.written))
        self.assertEqual(self.transport.drainRequests, 0)
        self.assertEqual(len(self.allocations), 1)
        self.transport.send()
        self.assertTrue(self.transport.sent == self.image, "The client got other bytes")

    def test_shortLastChunkCopied(self) -> None:
        """
        The short last chunk of a held download is written as bytes.
        """
        done = self.producer().start()
        self.runToEnd(done)
        types = [type(d) for d in self.request.written]
        self.assertEqual(types, [memoryview] * 4 + [bytes])
        self.assertEqual(len(self.request.written[-1]), 1000)

    def test_tlsViewsReusedAtOnce(self) -> None:
        """
        A TLS transport, which encrypts at once, gets views of large chunks
        and the buffer is reused at once.
        """
        transport = TLSStringTransport()
        self.request = TransportRequest(FakeChannel(transport))
        self.backend.manual = False
        self.successResultOf(self.producer().start())
        self.assertEqual(transport.value(), self.image)
        self.assertTrue(all(type(d) is memoryview for d in self.request.written[:-1]))
        self.assertEqual(self.allocations, [HOLD_MIN])

    def test_zeroCopyWinsOverTLS(self) -> None:
        """
        A transport that is both TLS and zero-copy (ours, which encrypts as
        the socket drains) holds the buffers like a socket transport: one
        is reused only once L{whenDrained} fires.
        """
        alsoProvides(self.transport, ISSLTransport)
        done = self.producer().start()
        self.backend.completeRead()
        self.backend.completeRead()
        self.assertEqual(len(self.backend.reads), 2)
        self.assertEqual(self.transport.pendingBytes(), 2 * HOLD_MIN)
        self.transport.send()
        self.assertEqual(len(self.backend.reads), 3)
        self.runToEnd(done)
        self.successResultOf(done)
        self.transport.send()
        self.assertTrue(self.transport.sent == self.image, "The client got other bytes")
        self.assertEqual(self.allocations, [HOLD_MIN, HOLD_MIN])

    def test_plainTransportGetsBytes(self) -> None:
        """
        A transport neither TLS nor zero-copy gets bytes, large chunks too.
        """
        transport = StringTransport()
        self.request = TransportRequest(FakeChannel(transport))
        self.backend.manual = False
        self.successResultOf(self.producer().start())
        self.assertEqual(transport.value(), self.image)
        self.assertTrue(all(type(d) is bytes for d in self.request.written))

    def test_heldBufferNotPooled(self) -> None:
        """
        A buffer still held when the download finishes does not go back to
        the connection's pool: the next download on the connection cannot
        read into it before it is sent.
        """
        pool = BufferPool(BufferBudget())
        first = self.producer(length=3 * HOLD_MIN)
        first.pool = pool
        done = first.start()
        self.runToEnd(done)
        self.successResultOf(done)
        self.assertGreater(self.transport.pendingBytes(), 0)
        second = self.producer(length=2 * HOLD_MIN)
        second.pool = pool
        second.offset = HOLD_MIN
        second.start()
        self.backend.completeRead()
        self.transport.send()
        self.assertTrue(
            self.transport.sent[: 3 * HOLD_MIN] == self.image[: 3 * HOLD_MIN],
            "The first response was overwritten",
        )

    def test_lostWhileHeld(self) -> None:
        """
        After the connection is lost with buffers held, their drain (the
        transport letting go of them) starts no further read.
        """
        done = self.producer().start()
        self.backend.completeRead()
        self.backend.completeRead()
        self.request.lose()
        self.failureResultOf(done, ConnectionError)
        self.transport.lose()
        self.assertEqual(len(self.backend.reads), 2)

    def test_laterHeldBufferCoveredByItsOwnDrain(self) -> None:
        """
        A buffer written after the producer asked for L{whenDrained} is not
        reused when that Deferred fires, which the interface only promises
        for buffers written before it was asked for.
        """
        self.transport.literal = True
        done = self.producer().start()
        self.backend.completeRead()
        self.backend.completeRead()
        # The first chunk is sent; the second is still queued.
        self.transport.send(HOLD_MIN)
        self.runToEnd(done)
        self.transport.send()
        self.assertTrue(self.transport.sent == self.image, "The client got other bytes")
