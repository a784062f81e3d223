# -*- test-case-name: tests.test_download -*-
"""
Tests for L{imageio.web._download.DownloadProducer}.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import alsoProvides
from zope.interface.verify import verifyObject

from imageio import _buffers
from imageio.interfaces import IBackend
from imageio.tickets import Operation, OperationCanceled
from imageio.web._download import DownloadProducer, ReaderStalled, TruncatedImage
from tests._http import FakeBackend

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
        self.allocations: list[int] = []
        allocate = _buffers.allocate

        def counting(size: int) -> Any:
            self.allocations.append(size)
            return allocate(size)

        self.patch(_buffers, "allocate", counting)

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
        pool: list[memoryview] = []
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
