# -*- test-case-name: tests.test_client_copy -*-
"""
The copy engine: moves an image's extents from one L{IBackend} to another.

Several workers run at once, each with a pair of backends (one connection
to each end) and one buffer of its own. A worker takes the next task from a
shared plan only when its previous task completed, so memory is bounded by
workers x buffer size whatever the image size, and a slow end slows the
whole copy instead of queueing data.

Data extents are read and written in pieces of at most one buffer (a
target or source that streams takes longer requests, through two buffers
of at most L{STREAM_PIECE}); zero
extents become C{zero()} calls (a C{PATCH} zero over HTTP: no bytes travel)
in pieces of at most L{MAX_ZERO}. The target is flushed once, at the end,
when every write completed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred, DeferredList, ensureDeferred

from imageio import _buffers
from imageio.interfaces import Extent, IBackend
from imageio.ranges import RangeSet

MiB = 1024**2

#: Largest zero request: big enough that a sparse image costs few requests,
#: small enough to spread a large zero over the workers.
MAX_ZERO = 1024 * MiB

#: Largest extents window asked of a source at once.
EXTENTS_WINDOW = 64 * 1024**3

#: Most buffers a streamed request is long (see L{streamSize}).
STREAM_BUFFERS = 8

#: Largest streamed request: an interrupted upload loses at most this.
MAX_STREAM = 64 * MiB

#: Largest of the two buffers a streamed request goes through (upstream's
#: buffer size). 8 MiB ones (the default buffer size) made four downloads
#: hold 64 MiB for no measurable gain: peak RSS 103-106 MiB against 71-74.
STREAM_PIECE = 4 * MiB

COPY = "copy"
ZERO = "zero"


class CopyError(Exception):
    """
    A copy failed for a reason the engine found itself (a short read).
    """


def streamSize(bufferSize: int) -> int:
    """
    @return: The length of the requests streamed to a target that takes
        long writes: eight buffers, at most L{MAX_STREAM}, at least one
        buffer.
    """
    return max(bufferSize, min(MAX_STREAM, STREAM_BUFFERS * bufferSize))


@frozen
class Task:
    """
    One request of the plan: copy or zero C{length} bytes at C{start}.
    """

    op: str
    start: int
    length: int


def planTasks(
    extents: Iterable[Extent],
    *,
    pieceSize: int,
    zero: bool = True,
    skip: RangeSet | None = None,
    zeroOnly: RangeSet | None = None,
    dirty: bool = False,
) -> Iterator[Task | int]:
    """
    Turn extents into copy and zero tasks of bounded size.

    @param pieceSize: Largest copy task (the workers' buffer size).
    @param zero: Zero extents become zero tasks; otherwise they are skipped
        (the target reads as zeroes already: a new file or qcow2 image),
        except dirty ones.
    @param skip: Ranges already on the target (a resumed transfer).
    @param zeroOnly: Zero extents are zeroed only within these ranges (a
        resumed download: where the file already has data).
    @param dirty: The extents are from the C{dirty} context: clean ones are
        skipped.
    @return: Tasks, and for every skipped range its length as an C{int}
        (progress counts skipped bytes as done).
    """
    merged = skip.ranges() if skip is not None else None
    where = zeroOnly.ranges() if zeroOnly is not None else None
    for extent in extents:
        if dirty and not extent.dirty:
            yield extent.length
            continue
        span = (extent.start, extent.start + extent.length)
        # A dirty zero extent is always zeroed: an incremental backup is
        # rebased onto the previous one, where the zeroes must hide the
        # older data.
        if extent.zero and not zero and not dirty:
            yield extent.length
            continue
        if extent.zero and where is not None:
            pieces = _intersect(span, where)
        elif merged:
            pieces = _subtract(span, merged)
        else:
            pieces = [span]
        done = extent.length - sum(e - s for s, e in pieces)
        if done:
            yield done
        op, step = (ZERO, MAX_ZERO) if extent.zero else (COPY, pieceSize)
        for start, end in pieces:
            for offset in range(start, end, step):
                yield Task(op, offset, min(step, end - offset))


def _subtract(span: tuple[int, int], merged: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """
    @return: The parts of C{span} not in C{merged} (sorted, disjoint ranges).
    """
    start, end = span
    # The first range that may overlap: the last one starting before end,
    # walking back while ranges still end after start.
    i = bisect_left(merged, (end, end))
    first = i
    while first > 0 and merged[first - 1][1] > start:
        first -= 1
    result = []
    for s, e in merged[first:i]:
        if s > start:
            result.append((start, s))
        start = max(start, e)
    if start < end:
        result.append((start, end))
    return result


def _intersect(span: tuple[int, int], merged: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """
    @return: The parts of C{span} in C{merged} (sorted, disjoint ranges).
    """
    start, end = span
    result = []
    for s, e in merged[max(0, bisect_left(merged, (start, start)) - 1) :]:
        if s >= end:
            break
        first, last = max(s, start), min(e, end)
        if first < last:
            result.append((first, last))
    return result


@define
class _Plan:
    """
    The shared task iterator, with progress for the ranges it skips.
    """

    tasks: Iterator[Task | int]
    progress: Callable[[int], object]
    stopped: bool = False

    def next(self) -> Task | None:
        while not self.stopped:
            try:
                item = next(self.tasks)
            except StopIteration:
                return None
            if isinstance(item, Task):
                return item
            self.progress(item)
        return None


@define
class CopyStats:
    """
    What a copy did.

    @ivar copied: Bytes read and written.
    @ivar zeroed: Bytes zeroed on the target.
    @ivar requests: Copy and zero tasks done.
    @ivar workers: Connections (pairs of backends) used.
    """

    copied: int = 0
    zeroed: int = 0
    requests: int = 0
    workers: int = 0


@define
class Copier:
    """
    Copies a plan of tasks with one worker per pair of backends.

    @ivar pairs: C{(source, target)} backends, one pair per worker.
    @ivar bufferSize: Each worker's buffer: the largest copy task.
    @ivar progress: Called with a byte count after every task (and for
        skipped ranges).
    @ivar flush: Flush the target once everything was written.
    """

    pairs: Sequence[tuple[IBackend, IBackend]]
    bufferSize: int
    progress: Callable[[int], object] = lambda n: None
    flush: bool = True
    stats: CopyStats = field(factory=CopyStats)
    _plan: _Plan | None = field(default=None, init=False)

    def run(self, tasks: Iterable[Task | int]) -> Deferred[CopyStats]:
        """
        Copy C{tasks} (from L{planTasks}).

        @return: A Deferred firing with the stats once every worker stopped
            and the target was flushed, or failing with the first error (after
            every worker stopped). Cancelling it stops the workers after the
            requests in flight.
        """
        if not self.pairs:
            raise ValueError("A copy needs at least one worker")
        self._plan = _Plan(iter(tasks), self.progress)
        self.stats.workers = len(self.pairs)
        return ensureDeferred(self._run())

    def stop(self) -> None:
        """
        Take no more tasks; workers stop after their requests in flight.
        """
        if self._plan is not None:
            self._plan.stopped = True

    async def _run(self) -> CopyStats:
        workers = [ensureDeferred(self._work(src, dst)) for src, dst in self.pairs]
        finished = DeferredList(workers, consumeErrors=True)
        # Cancelling the copy must not cancel the requests in flight: the
        # workers stop taking tasks, and the copy ends once they returned.
        shield: Deferred[Any] = Deferred()
        finished.addBoth(lambda r: None if shield.called else shield.callback(r))
        try:
            results = await shield
        except CancelledError:
            self.stop()
            await finished
            raise
        for ok, value in results:
            if not ok:
                failure: Any = value
                failure.raiseException()
        if self.flush:
            await self.pairs[0][1].flush()
        return self.stats

    async def _work(self, src: IBackend, dst: IBackend) -> None:
        """
        Run tasks until the plan is done. Reads and writes overlap: the
        next piece is read into a second buffer while the last one is
        written, so each end has at most one request in flight and the
        worker at most two buffers.
        """
        assert self._plan is not None
        free: list[memoryview] = []
        writing: Deferred[Any] | None = None
        written: Task | None = None
        inUse: memoryview | None = None
        try:
            while True:
                task = self._plan.next()
                if task is None:
                    break
                if task.op == ZERO:
                    if writing is not None:
                        await writing
                        self._done(written)
                        writing = None
                    await dst.zero(task.start, task.length)
                    self.stats.zeroed += task.length
                    self._done(task)
                    continue
                writeStream = getattr(dst, "writeStream", None)
                readStream = getattr(src, "readStream", None)
                if writeStream is not None or readStream is not None:
                    # One long request, read while it is sent (or written
                    # while it arrives), through two buffers.
                    while len(free) < 2:
                        size = min(self.bufferSize, STREAM_PIECE)
                        free.append(memoryview(_buffers.allocate(size)))
                    if writeStream is not None:
                        await writeStream(task.start, task.length, src.readInto, free[:2])
                    else:
                        assert readStream is not None
                        await readStream(task.start, task.length, dst.write, free[:2])
                    self.stats.copied += task.length
                    self._done(task)
                    continue
                # Page-aligned, so O_DIRECT files read into it as is.
                if free and free[-1].nbytes >= task.length:
                    view = free.pop()
                else:
                    view = memoryview(_buffers.allocate(self.bufferSize))
                piece = view[: task.length]
                try:
                    n = await src.readInto(task.start, piece)
                finally:
                    if writing is not None:
                        await writing
                        self._done(written)
                        assert inUse is not None
                        free.append(inUse)
                        writing = None
                if n != task.length:
                    raise CopyError(
                        f"Short read from {src.name} at offset {task.start}: "
                        f"{n} of {task.length} bytes"
                    )
                self.stats.copied += task.length
                writing, written, inUse = dst.write(task.start, piece), task, view
            if writing is not None:
                await writing
                self._done(written)
        except BaseException:
            self.stop()
            raise

    def _done(self, task: Task | None) -> None:
        assert task is not None
        self.stats.requests += 1
        self.progress(task.length)


async def collectExtents(backend: IBackend, size: int, context: str = "zero") -> list[Extent]:
    """
    @return: The extents of C{backend} from 0 to C{size}, asked in windows
        (a file backend answers at most some thousands per call).
    """
    extents: list[Extent] = []
    position = 0
    while position < size:
        got = await backend.extents(context, position, min(size - position, EXTENTS_WINDOW))
        if not got:
            break
        extents.extend(got)
        position = got[-1].start + got[-1].length
    return extents
