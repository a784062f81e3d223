# -*- test-case-name: tests.test_client_copy -*-
"""
Tests for L{imageio.client._copy}: the plan and the copy engine, with fake
backends whose operations the test completes by hand.
"""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from imageio.client import _copy
from imageio.client._copy import COPY, ZERO, Copier, CopyError, Task, planTasks
from imageio.interfaces import Extent, IBackend
from imageio.ranges import RangeSet

MiB = 1024**2


@implementer(IBackend)
@define
class _Fake:
    """
    A backend recording every call; each returns a Deferred the test fires
    (or at once when C{auto}).
    """

    data: bytearray
    auto: bool = False
    name: str = "fake"
    blockSize: int = 1
    maxReaders: int = 8
    maxWriters: int = 8
    calls: list[tuple[Any, ...]] = field(factory=list)
    pending: list[tuple[Deferred[Any], Any]] = field(factory=list)

    def _op(self, call: tuple[Any, ...], result: Any) -> Deferred[Any]:
        self.calls.append(call)
        if self.auto:
            return succeed(result())
        d: Deferred[Any] = Deferred()
        self.pending.append((d, result))
        return d

    def completeAll(self) -> None:
        """
        Complete the requests pending now (not those they start).
        """
        pending, self.pending = self.pending, []
        for d, result in pending:
            d.callback(result())

    def size(self) -> Deferred[int]:
        return succeed(len(self.data))

    def readInto(self, offset: int, buf: memoryview) -> Deferred[int]:
        def read() -> int:
            piece = self.data[offset : offset + len(buf)]
            buf[: len(piece)] = piece
            return len(piece)

        return self._op(("read", offset, len(buf)), read)

    def write(self, offset: int, data: memoryview) -> Deferred[int]:
        def write() -> int:
            self.data[offset : offset + len(data)] = data
            return len(data)

        return self._op(("write", offset, len(data)), write)

    def zero(self, offset: int, length: int) -> Deferred[None]:
        def zero() -> None:
            self.data[offset : offset + length] = bytes(length)

        return self._op(("zero", offset, length), zero)

    def flush(self) -> Deferred[None]:
        return self._op(("flush",), lambda: None)

    def extents(self, context: str, start: int, length: int) -> Deferred[list[Extent]]:
        return succeed([Extent(start, length, zero=False)])

    def close(self) -> Deferred[None]:
        return succeed(None)


class PlanTests(SynchronousTestCase):
    """
    Tests for L{planTasks}.
    """

    def test_bounded(self) -> None:
        """
        Data extents are cut into pieces of at most the buffer size; zero
        extents become zero tasks.
        """
        extents = [Extent(0, 5 * MiB, zero=False), Extent(5 * MiB, 3 * MiB, zero=True)]
        tasks = list(planTasks(extents, pieceSize=2 * MiB))
        self.assertEqual(
            tasks,
            [
                Task(COPY, 0, 2 * MiB),
                Task(COPY, 2 * MiB, 2 * MiB),
                Task(COPY, 4 * MiB, MiB),
                Task(ZERO, 5 * MiB, 3 * MiB),
            ],
        )

    def test_skipZero(self) -> None:
        """
        Without C{zero}, zero extents are skipped and counted as done.
        """
        extents = [Extent(0, 10, zero=True), Extent(10, 5, zero=False)]
        self.assertEqual(
            list(planTasks(extents, pieceSize=100, zero=False)), [10, Task(COPY, 10, 5)]
        )

    def test_skipWritten(self) -> None:
        """
        Ranges already written are left out.
        """
        written = RangeSet()
        written.add(0, 4)
        written.add(6, 8)
        tasks = list(planTasks([Extent(0, 10, zero=False)], pieceSize=100, skip=written))
        self.assertEqual(tasks, [6, Task(COPY, 4, 2), Task(COPY, 8, 2)])

    def test_zeroOnly(self) -> None:
        """
        With C{zeroOnly}, zero extents are zeroed only where the target has
        data.
        """
        data = RangeSet()
        data.add(2, 4)
        tasks = list(planTasks([Extent(0, 10, zero=True)], pieceSize=100, skip=data, zeroOnly=data))
        self.assertEqual(tasks, [8, Task(ZERO, 2, 2)])

    def test_dirty(self) -> None:
        """
        Clean extents are skipped; dirty ones copied or zeroed, zeroed even
        into a new image (the zeroes hide the previous backup's data).
        """
        extents = [
            Extent(0, 10, zero=False, dirty=False),
            Extent(10, 10, zero=False, dirty=True),
            Extent(20, 10, zero=True, dirty=True),
        ]
        self.assertEqual(
            list(planTasks(extents, pieceSize=100, zero=False, dirty=True)),
            [10, Task(COPY, 10, 10), Task(ZERO, 20, 10)],
        )


class CopierTests(SynchronousTestCase):
    """
    Tests for L{Copier}.
    """

    def setUp(self) -> None:
        self.source = bytes(range(256)) * 64  # 16 KiB
        self.progress: list[int] = []

    def pairs(self, workers: int, auto: bool = False) -> tuple[list[Any], list[_Fake]]:
        target = bytearray(len(self.source))
        targets = [_Fake(target, auto=auto) for _ in range(workers)]
        sources = [_Fake(bytearray(self.source), auto=True) for _ in range(workers)]
        return list(zip(sources, targets, strict=True)), targets

    def test_copies(self) -> None:
        """
        Every task is done, zero as C{zero()}, and the target flushed once
        at the end.
        """
        pairs, targets = self.pairs(2, auto=True)
        extents = [Extent(0, 8192, zero=False), Extent(8192, 8192, zero=True)]
        copier = Copier(pairs, 4096, self.progress.append)
        stats = self.successResultOf(copier.run(planTasks(extents, pieceSize=4096)))
        self.assertEqual(bytes(targets[0].data[:8192]), self.source[:8192])
        self.assertEqual(bytes(targets[0].data[8192:]), bytes(8192))
        calls = targets[0].calls + targets[1].calls
        self.assertEqual(calls.count(("flush",)), 1)
        self.assertEqual(targets[0].calls[-1], ("flush",))
        self.assertIn(("zero", 8192, 8192), calls)
        self.assertEqual((stats.copied, stats.zeroed, stats.requests), (8192, 8192, 3))
        self.assertEqual(sum(self.progress), 16384)

    def test_streamBuffers(self) -> None:
        """
        A source that streams (a remote image's long ranged GET) gets each
        task whole, through two buffers of at most L{_copy.STREAM_PIECE},
        reused by the worker's next task; a smaller buffer size is kept.
        """
        # Buffers are whole pages.
        self.patch(_copy, "STREAM_PIECE", 8192)
        streamed: list[tuple[int, int, list[int]]] = []
        buffers: set[int] = set()

        class Streaming(_Fake):
            def readStream(
                self, offset: int, length: int, write: Any, views: list[memoryview]
            ) -> Deferred[None]:
                streamed.append((offset, length, [v.nbytes for v in views]))
                buffers.update(id(v) for v in views)
                piece = views[0].nbytes
                for start in range(offset, offset + length, piece):
                    chunk = views[0][: min(piece, offset + length - start)]
                    chunk[:] = self.data[start : start + chunk.nbytes]
                    write(start, chunk)
                return succeed(None)

        for bufferSize, expected in ((16384, 8192), (4096, 4096)):
            del streamed[:]
            buffers.clear()
            target = bytearray(len(self.source))
            pair = (Streaming(bytearray(self.source), auto=True), _Fake(target, auto=True))
            tasks = planTasks([Extent(0, len(self.source), zero=False)], pieceSize=8192)
            self.successResultOf(Copier([pair], bufferSize, self.progress.append).run(tasks))
            self.assertEqual(bytes(target), self.source)
            self.assertEqual(streamed, [(0, 8192, [expected] * 2), (8192, 8192, [expected] * 2)])
            self.assertEqual(len(buffers), 2)

    def test_backpressure(self) -> None:
        """
        Each worker has at most one write in flight (and one piece read
        ahead): no more writes start until a target completes one.
        """
        pairs, targets = self.pairs(2)
        extents = [Extent(0, 16384, zero=False)]
        d = Copier(pairs, 1024, self.progress.append).run(planTasks(extents, pieceSize=1024))
        self.assertEqual([len(t.pending) for t in targets], [1, 1])
        targets[0].completeAll()
        self.assertEqual([len(t.pending) for t in targets], [1, 1])
        self.assertEqual(sum(self.progress), 1024)
        while not d.called:
            for t in targets:
                t.completeAll()
        self.successResultOf(d)
        self.assertEqual(bytes(targets[0].data), self.source)

    def test_failure(self) -> None:
        """
        The first failure stops the other workers after their request in
        flight, and fails the copy without a flush.
        """
        pairs, targets = self.pairs(2)
        d = Copier(pairs, 1024).run(planTasks([Extent(0, 16384, zero=False)], pieceSize=1024))
        failing, result = targets[0].pending.pop()
        failing.errback(OSError(5, "Input/output error"))
        self.assertNoResult(d)
        # Worker 1 writes the piece it already read, then stops.
        targets[1].completeAll()
        self.assertNoResult(d)
        targets[1].completeAll()
        self.failureResultOf(d, OSError)
        self.assertEqual(len(targets[1].calls), 2)
        self.assertNotIn(("flush",), targets[0].calls + targets[1].calls)

    def test_shortRead(self) -> None:
        """
        A source shorter than its extents fails the copy.
        """
        pairs, _ = self.pairs(1, auto=True)
        tasks = planTasks([Extent(0, 20000, zero=False)], pieceSize=20000)
        f = self.failureResultOf(Copier(pairs, 20000).run(tasks), CopyError)
        self.assertIn("Short read", str(f.value))

    def test_cancel(self) -> None:
        """
        Cancelling waits for the requests in flight and the piece already
        read, then fails with L{CancelledError}; no further task starts.
        """
        pairs, targets = self.pairs(1)
        d = Copier(pairs, 1024).run(planTasks([Extent(0, 16384, zero=False)], pieceSize=1024))
        d.cancel()
        self.assertNoResult(d)
        # The piece already read is written, then the worker stops.
        targets[0].completeAll()
        self.assertNoResult(d)
        targets[0].completeAll()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(len(targets[0].calls), 2)
