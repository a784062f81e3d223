# -*- test-case-name: tests.test_upload -*-
"""
Tests for L{imageio.web._upload.UploadSink}.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from zope.interface.verify import verifyObject

from imageio import _buffers
from imageio.interfaces import IBackend, IBodySink, IDirectBodySink
from imageio.tickets import Operation, OperationCanceled
from imageio.web._upload import ShortBody, UploadSink
from tests._http import FakeBackend

BUFFER = 8192


def makeSink(
    test: Any,
    length: int,
    offset: int,
    backend: Deferred[IBackend] | None,
    onProgress: Callable[[], None] = lambda: None,
) -> UploadSink:
    """
    @return: A sink of C{BUFFER}-byte buffers writing to C{test.backend}
        (or C{backend} once it fires), paused through C{test.producer}.
    """
    test.op.offset = offset
    return UploadSink(
        backend if backend is not None else succeed(test.backend),
        offset,
        length,
        test.producer,
        test.op,
        bufferSize=BUFFER,
        onProgress=onProgress,
    )


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
        return makeSink(self, length, offset, backend, onProgress=lambda: self.progress.append(1))

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
        self.backend.completeWrites()
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
        self.backend.completeWrites()
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
        self.backend.completeWrites()
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
        self.backend.completeWrites()
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


@define
class InFlightBackend(FakeBackend):
    """
    A L{FakeBackend} that notes every write whose buffer changed between the
    write call and its completion: storage reads the buffer meanwhile.
    """

    clobbered: list[int] = field(factory=list)

    def write(self, offset: int, data: memoryview) -> Deferred[int]:
        d = super().write(offset, data)
        started = self.writes[-1][1]

        def check(n: int) -> int:
            if bytes(data) != started:
                self.clobbered.append(offset)
            return n

        d.addCallback(check)
        return d


def address(view: memoryview) -> int:
    """
    @return: The memory address of the first byte of a writable C{view}.
    """
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class DirectBodyTests(SynchronousTestCase):
    """
    The transport reads the body straight into the sink's two aligned
    buffers (L{IDirectBodySink}), one filled while the other is written.
    """

    def setUp(self) -> None:
        self.backend = InFlightBackend(bytearray(1024 * 1024))
        self.producer = StringTransport()
        self.op = Operation("write", 0)

    def tearDown(self) -> None:
        self.assertEqual(self.backend.clobbered, [])

    def sink(
        self, length: int, offset: int = 0, backend: Deferred[IBackend] | None = None
    ) -> UploadSink:
        return makeSink(self, length, offset, backend)

    def fill(self, sink: UploadSink, data: bytes, most: int | None = None) -> None:
        """
        Read C{data} into the sink as a transport does, C{most} bytes at a
        time at most, completing a write whenever no buffer is free.
        """
        position = 0
        while position < len(data):
            view = sink.bodyBuffer()
            if view is None:
                self.assertEqual(self.producer.producerState, "paused")
                self.backend.completeWrite()
                continue
            self.assertTrue(len(view), "bodyBuffer offered no room")
            n = min(len(view), len(data) - position, most or len(view))
            view[:n] = data[position : position + n]
            position += n
            sink.bodyFilled(n)

    def test_directInterface(self) -> None:
        """
        L{UploadSink} provides L{IDirectBodySink}.
        """
        self.assertTrue(verifyObject(IDirectBodySink, self.sink(10)))

    def test_firstBufferEndsAligned(self) -> None:
        """
        At an unaligned offset, the first buffer starts page-aligned in
        memory and takes the bytes up to the next 4 KiB boundary of the
        image.
        """
        sink = self.sink(3 * BUFFER, offset=1000)
        view = sink.bodyBuffer()
        assert view is not None
        self.assertEqual(len(view), BUFFER - 1000)
        self.assertEqual(address(view) % _buffers.ALIGNMENT, 0)
        sink.bodyFilled(len(view))
        second = sink.bodyBuffer()
        assert second is not None
        self.assertEqual(len(second), BUFFER)
        self.assertEqual(address(second) % _buffers.ALIGNMENT, 0)

    def test_bodyBufferLimitedByLength(self) -> None:
        """
        C{bodyBuffer} offers no more than the body bytes still to come, and
        after a partial fill starts right after the bytes filled.
        """
        sink = self.sink(BUFFER + 100, offset=4096)
        view = sink.bodyBuffer()
        assert view is not None
        self.assertEqual(len(view), BUFFER)
        sink.bodyFilled(BUFFER - 10)
        rest = sink.bodyBuffer()
        assert rest is not None
        self.assertEqual((len(rest), address(rest)), (10, address(view) + BUFFER - 10))
        sink.bodyFilled(10)
        last = sink.bodyBuffer()
        assert last is not None
        self.assertEqual(len(last), 100)
        small = self.sink(100, offset=10).bodyBuffer()
        assert small is not None
        self.assertEqual(len(small), 100)

    def test_bodyFilledWrites(self) -> None:
        """
        Bytes filled in pieces reach the backend intact, at their image
        offsets: up to the first 4 KiB boundary, then whole buffers.
        """
        data = bytes(range(256)) * (3 * BUFFER // 256) + b"tail"
        sink = self.sink(len(data), offset=1000)
        done = sink.whenDone()
        self.fill(sink, data, most=3000)
        sink.bodyComplete()
        self.backend.completeWrites()
        self.successResultOf(done)
        self.assertEqual(bytes(self.backend.image[1000 : 1000 + len(data)]), data)
        writes = [(o, len(d)) for o, d, _ in self.backend.writes]
        self.assertEqual(
            writes,
            [(1000, BUFFER - 1000), (BUFFER, BUFFER), (2 * BUFFER, BUFFER), (3 * BUFFER, 1004)],
        )
        self.assertEqual((sink.bytesWritten, self.op.done), (len(data), len(data)))

    def test_twoBuffersAlternate(self) -> None:
        """
        While one buffer is written the other is offered; with both taken
        C{bodyBuffer} is C{None} and the client is paused until the write
        completes, which frees the first buffer again.
        """
        sink = self.sink(4 * BUFFER)
        first = sink.bodyBuffer()
        assert first is not None
        first[:] = b"a" * BUFFER
        sink.bodyFilled(BUFFER)
        self.assertEqual(self.backend.pendingWrites(), 1)
        second = sink.bodyBuffer()
        assert second is not None
        self.assertIsNot(second.obj, first.obj)
        self.assertEqual(self.producer.producerState, "producing")
        second[:] = b"b" * BUFFER
        sink.bodyFilled(BUFFER)
        self.assertIsNone(sink.bodyBuffer())
        self.assertEqual(self.producer.producerState, "paused")
        self.backend.completeWrite()
        self.assertEqual(self.producer.producerState, "producing")
        self.assertEqual(
            [(o, d[:1]) for o, d, _ in self.backend.writes], [(0, b"a"), (BUFFER, b"b")]
        )
        third = sink.bodyBuffer()
        assert third is not None
        self.assertIs(third.obj, first.obj)
        third[:] = b"c" * BUFFER
        sink.bodyFilled(BUFFER)
        self.assertIsNone(sink.bodyBuffer())
        self.assertEqual(self.producer.producerState, "paused")

    def test_mixedDelivery(self) -> None:
        """
        Pieces copied in through C{dataReceived} and bytes read straight
        into the buffers keep their order, also when copied pieces wait for
        a free buffer (C{bodyBuffer} is C{None} meanwhile).
        """
        sink = self.sink(3 * BUFFER)
        sink.dataReceived(b"a" * 100)
        view = sink.bodyBuffer()
        assert view is not None
        self.assertEqual(len(view), BUFFER - 100)
        view[:200] = b"b" * 200
        sink.bodyFilled(200)
        sink.dataReceived(b"c" * (BUFFER - 300))
        sink.dataReceived(b"d" * (BUFFER + 50))
        # Both buffers taken and 50 bytes waiting: the rest must not jump
        # ahead of them.
        self.assertIsNone(sink.bodyBuffer())
        self.assertEqual(self.producer.producerState, "paused")
        self.backend.completeWrite()
        view = sink.bodyBuffer()
        assert view is not None
        self.assertEqual(len(view), BUFFER - 50)
        view[:] = b"e" * (BUFFER - 50)
        sink.bodyFilled(BUFFER - 50)
        sink.bodyComplete()
        self.backend.completeWrites()
        self.successResultOf(sink.whenDone())
        expected = (
            b"a" * 100 + b"b" * 200 + b"c" * (BUFFER - 300) + b"d" * (BUFFER + 50)
        ) + b"e" * (BUFFER - 50)
        self.assertEqual(bytes(self.backend.image[: 3 * BUFFER]), expected)

    def test_noBufferAfterWriteFailure(self) -> None:
        """
        After a failed write C{bodyBuffer} is C{None}, so the rest of the
        body is dropped through C{dataReceived}.
        """
        sink = self.sink(4 * BUFFER)
        done = sink.whenDone()
        self.fill(sink, b"a" * BUFFER)
        self.backend.writes[0][2].errback(OSError(28, "No space left on device"))
        self.failureResultOf(done, OSError)
        self.assertIsNone(sink.bodyBuffer())
        sink.dataReceived(b"x" * BUFFER)
        self.assertEqual(self.backend.pendingWrites(), 0)

    def test_bodyFilledBeyondLength(self) -> None:
        """
        More bytes reported through C{bodyFilled} than C{Content-Length}
        fail the upload.
        """
        sink = self.sink(10)
        done = sink.whenDone()
        view = sink.bodyBuffer()
        assert view is not None
        sink.bodyFilled(6)
        sink.bodyFilled(5)
        self.backend.completeWrites()
        failure = self.failureResultOf(done, ValueError)
        self.assertEqual(str(failure.value), "Body longer than Content-Length")
        self.assertEqual(self.backend.writes, [])

    def test_notPausedOnceBodyPlaced(self) -> None:
        """
        Once the last body byte is in a buffer the client is not paused,
        even with both buffers taken, so a next request can be read; no
        more buffer is offered.
        """
        sink = self.sink(2 * BUFFER)
        self.fill(sink, b"a" * BUFFER)
        self.assertEqual(self.backend.pendingWrites(), 1)
        self.fill(sink, b"b" * BUFFER)
        self.assertEqual(self.producer.producerState, "producing")
        self.assertIsNone(sink.bodyBuffer())
        sink.bodyComplete()
        self.backend.completeWrites()
        self.successResultOf(sink.whenDone())
        self.assertEqual(bytes(self.backend.image[: 2 * BUFFER]), b"a" * BUFFER + b"b" * BUFFER)

    def test_resumedForLastBytes(self) -> None:
        """
        A client paused with both buffers taken is resumed by the write
        that frees one, and stays producing after the last byte.
        """
        sink = self.sink(2 * BUFFER + 100)
        self.fill(sink, b"a" * 2 * BUFFER)
        self.assertEqual(self.producer.producerState, "paused")
        self.backend.completeWrite()
        self.assertEqual(self.producer.producerState, "producing")
        self.fill(sink, b"z" * 100)
        self.assertEqual(self.producer.producerState, "producing")
        self.assertIsNone(sink.bodyBuffer())
        sink.bodyComplete()
        self.backend.completeWrites()
        self.successResultOf(sink.whenDone())
        self.assertEqual(
            bytes(self.backend.image[2 * BUFFER : 2 * BUFFER + 101]), b"z" * 100 + b"\0"
        )

    def test_directBackendOpensLater(self) -> None:
        """
        Before the backend opens, both buffers can be filled, then the
        client is paused; the writes start once it opens.
        """
        opened: Deferred[IBackend] = Deferred()
        sink = self.sink(3 * BUFFER, backend=opened)
        for _ in range(2):
            view = sink.bodyBuffer()
            assert view is not None
            view[:] = b"q" * len(view)
            sink.bodyFilled(len(view))
        self.assertIsNone(sink.bodyBuffer())
        self.assertEqual(self.producer.producerState, "paused")
        self.assertEqual(self.backend.writes, [])
        opened.callback(self.backend)  # type: ignore[arg-type]
        self.assertEqual(self.backend.pendingWrites(), 1)
        self.backend.completeWrite()
        self.assertEqual(self.producer.producerState, "producing")
        self.fill(sink, b"r" * BUFFER)
        sink.bodyComplete()
        self.backend.completeWrites()
        self.successResultOf(sink.whenDone())
        self.assertEqual(bytes(self.backend.image[: 3 * BUFFER]), b"q" * 2 * BUFFER + b"r" * BUFFER)


def _mappingOf(buf: Any) -> tuple[str, set[str]]:
    """
    @return: The permissions and C{VmFlags} of the mapping holding C{buf},
        from C{/proc/self/smaps}.
    """
    address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    perms: str | None = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=2)[0]
            if "-" in first and not first.endswith(":"):
                start, end = (int(x, 16) for x in first.split("-"))
                perms = line.split()[1] if start <= address < end else None
            elif perms is not None and line.startswith("VmFlags:"):
                return perms, set(line.split()[1:])
    raise AssertionError(f"No mapping at {address:#x}")


class AllocateTests(SynchronousTestCase):
    """
    L{_buffers.allocate}: page-aligned buffers that are cheap to touch for
    the first time.
    """

    def test_privateNotForked(self) -> None:
        """
        Buffers to be filled whole are private anonymous memory (not shmem,
        where every first touch is a shmem page fault) and are not copied
        into forked children; others stay shared anonymous memory.
        """
        buf = _buffers.allocate(64 * 1024, huge=True)
        perms, flags = _mappingOf(buf)
        self.assertEqual(perms[3], "p")
        self.assertNotIn("sh", flags)
        self.assertIn("dc", flags)
        self.assertNotIn("hg", flags)
        self.assertEqual(ctypes.addressof(ctypes.c_char.from_buffer(buf)) % _buffers.ALIGNMENT, 0)
        self.assertEqual(bytes(buf[:16]), bytes(16))
        self.assertEqual(_mappingOf(_buffers.allocate(64 * 1024))[0][3], "s")

    def test_hugePagesForLargeBuffers(self) -> None:
        """
        Buffers to be filled whole (C{huge}) of L{_buffers.HUGE_PAGE} bytes
        and more ask for transparent huge pages; others do not.
        """
        if not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
            raise SkipTest("This kernel has no transparent huge pages")
        self.assertNotIn("hg", _mappingOf(_buffers.allocate(_buffers.HUGE_PAGE))[1])
        buf = _buffers.allocate(_buffers.HUGE_PAGE, huge=True)
        self.assertIn("hg", _mappingOf(buf)[1])
        self.assertNotIn("hg", _mappingOf(_buffers.allocate(64 * 1024, huge=True))[1])

    def test_uploadBuffersHuge(self) -> None:
        """
        L{UploadSink} fills its buffers whole, so it asks for huge pages.
        """
        if not os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
            raise SkipTest("This kernel has no transparent huge pages")
        sink = UploadSink(
            Deferred(),
            0,
            8 * _buffers.HUGE_PAGE,
            StringTransport(),
            Operation("write", 0),
            bufferSize=2 * _buffers.HUGE_PAGE,
        )
        view = sink.bodyBuffer()
        assert view is not None
        self.assertEqual(len(view), 2 * _buffers.HUGE_PAGE)
        self.assertIn("hg", _mappingOf(view)[1])
