# -*- test-case-name: tests.test_upload -*-
"""
Tests for L{imageio.web._upload.UploadSink}.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from imageio.interfaces import IBackend, IBodySink
from imageio.tickets import Operation, OperationCanceled
from imageio.web._upload import ShortBody, UploadSink
from tests._http import FakeBackend

BUFFER = 8192


class UploadSinkTests(SynchronousTestCase):
    """
    The sink writes the body to the backend in aligned buffers, one write in
    flight, pausing the client while storage is behind.
    """

    def setUp(self) -> None:
        self.backend = FakeBackend(bytearray(1024 * 1024))
        self.producer = StringTransport()
        self.op = Operation("write", 0)
        self.progress: list[int] = []

    def sink(
        self, length: int, offset: int = 0, backend: Deferred[IBackend] | None = None
    ) -> UploadSink:
        self.op.offset = offset
        return UploadSink(
            backend if backend is not None else succeed(self.backend),  # type: ignore[arg-type]
            offset,
            length,
            self.producer,
            self.op,
            bufferSize=BUFFER,
            onProgress=lambda: self.progress.append(1),
        )

    def drain(self) -> None:
        while self.backend.pendingWrites():
            self.backend.completeWrite()

    def test_interface(self) -> None:
        """
        L{UploadSink} provides L{IBodySink}.
        """
        self.assertTrue(verifyObject(IBodySink, self.sink(10)))

    def test_smallBody(self) -> None:
        """
        A body smaller than a buffer is written once, when complete, and
        C{whenDone} fires after the write.
        """
        sink = self.sink(5, offset=3)
        done = sink.whenDone()
        sink.dataReceived(b"ab")
        sink.dataReceived(b"cde")
        self.assertEqual([(o, d) for o, d, _ in self.backend.writes], [(3, b"abcde")])
        sink.bodyComplete()
        self.assertNoResult(done)
        self.backend.completeWrite()
        self.successResultOf(done)
        self.assertEqual((sink.bytesWritten, self.op.done), (5, 5))
        self.assertEqual(self.progress, [1])

    def test_alignment(self) -> None:
        """
        The first write ends on a 4 KiB boundary of the image; later writes
        are whole buffers at aligned offsets.
        """
        sink = self.sink(3 * BUFFER, offset=1000)
        sink.dataReceived(b"x" * 3 * BUFFER)
        sink.bodyComplete()
        self.drain()
        writes = [(o, len(d)) for o, d, _ in self.backend.writes]
        self.assertEqual(writes[0], (1000, BUFFER - 1000))
        self.assertEqual(writes[1], (BUFFER, BUFFER))
        self.assertEqual(sum(n for _, n in writes), 3 * BUFFER)
        self.assertTrue(all(o % 4096 == 0 for o, _ in writes[1:]))

    def test_pauseResume(self) -> None:
        """
        The producer is paused when a buffer's worth is queued, and resumed
        once the queue drained into the buffer.
        """
        sink = self.sink(10 * BUFFER)
        sink.dataReceived(b"a" * BUFFER)
        self.assertEqual(self.backend.pendingWrites(), 1)
        sink.dataReceived(b"b" * BUFFER)
        self.assertEqual(self.producer.producerState, "paused")
        self.backend.completeWrite()
        self.assertEqual(self.producer.producerState, "producing")

    def test_fanOut(self) -> None:
        """
        Every C{whenDone} caller gets its own result, before or after the end.
        """
        sink = self.sink(3)
        first = sink.whenDone()
        sink.dataReceived(b"abc")
        sink.bodyComplete()
        self.drain()
        self.successResultOf(first)
        self.successResultOf(sink.whenDone())

    def test_writeFailure(self) -> None:
        """
        A failed write fails every waiter with the error, resumes a paused
        client so the rest of the body drains, and drops further data.
        """
        sink = self.sink(10 * BUFFER)
        done = sink.whenDone()
        sink.dataReceived(b"a" * 2 * BUFFER)
        self.assertEqual(self.producer.producerState, "paused")
        self.backend.writes[0][2].errback(OSError(28, "No space left on device"))
        self.failureResultOf(done, OSError)
        self.failureResultOf(sink.whenDone(), OSError)
        self.assertEqual(self.producer.producerState, "producing")
        sink.dataReceived(b"x" * BUFFER)
        self.assertEqual(self.backend.pendingWrites(), 0)

    def test_shortBody(self) -> None:
        """
        A connection lost before the body completed fails with L{ShortBody}
        once the write in flight returned.
        """
        sink = self.sink(4 * BUFFER)
        done = sink.whenDone()
        sink.dataReceived(b"a" * (BUFFER + 5))
        sink.connectionLost(Failure(ConnectionDone()))
        self.assertNoResult(done)
        self.backend.completeWrite()
        self.failureResultOf(done, ShortBody)
        self.assertEqual(self.backend.pendingWrites(), 0)

    def test_lostAfterComplete(self) -> None:
        """
        A connection lost after the whole body arrived does not fail the
        upload.
        """
        sink = self.sink(3)
        done = sink.whenDone()
        sink.dataReceived(b"abc")
        sink.bodyComplete()
        sink.connectionLost(Failure(ConnectionDone()))
        self.drain()
        self.successResultOf(done)

    def test_canceled(self) -> None:
        """
        A canceled operation stops before the next write.
        """
        sink = self.sink(4 * BUFFER)
        done = sink.whenDone()
        sink.dataReceived(b"a" * BUFFER)
        self.op.cancel()
        sink.dataReceived(b"b" * BUFFER)
        self.backend.completeWrite()
        self.failureResultOf(done, OperationCanceled)
        self.assertEqual(len(self.backend.writes), 1)

    def test_backendOpensLater(self) -> None:
        """
        Data arriving before the backend is open is queued (pausing the
        client at the watermark) and written once it opens.
        """
        opened: Deferred[IBackend] = Deferred()
        sink = self.sink(3 * BUFFER, backend=opened)
        sink.dataReceived(b"a" * 3 * BUFFER)
        self.assertEqual(self.producer.producerState, "paused")
        opened.callback(self.backend)  # type: ignore[arg-type]
        self.backend.completeWrite()
        self.assertEqual(self.producer.producerState, "producing")
        sink.bodyComplete()
        self.drain()
        self.successResultOf(sink.whenDone())
        self.assertEqual(bytes(self.backend.image[: 3 * BUFFER]), b"a" * 3 * BUFFER)

    def test_openFailure(self) -> None:
        """
        A backend that fails to open fails the upload.
        """
        opened: Deferred[IBackend] = Deferred()
        sink = self.sink(10, backend=opened)
        done = sink.whenDone()
        opened.errback(ValueError("cannot open"))
        self.failureResultOf(done, ValueError)

    def test_emptyBody(self) -> None:
        """
        A zero-length upload succeeds without any write.
        """
        sink = self.sink(0)
        sink.bodyComplete()
        self.successResultOf(sink.whenDone())
        self.assertEqual(self.backend.writes, [])
