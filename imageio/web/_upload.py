# -*- test-case-name: tests.test_upload -*-
"""
Upload sink: a request body streamed into a backend with backpressure.

Body pieces (up to 64 KiB each, as the socket delivers them) are copied
into one reusable, page-aligned buffer; a full buffer is written to the
backend (on the disk-io pool) while the next pieces wait in a small queue.
When the queue reaches the high watermark the client connection is paused,
and it is resumed once a write completes, so memory per upload is bounded
by two buffers whatever the request size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from imageio import _buffers
from imageio._log import Logger
from imageio.interfaces import IBackend, IBodySink
from imageio.tickets import Operation, OperationCanceled

log = Logger()


class ShortBody(Exception):
    """
    The connection closed before C{Content-Length} bytes arrived.
    """


@implementer(IBodySink)
@define
class UploadSink:
    """
    Writes C{length} body bytes at C{offset} of the backend the Deferred
    C{backend} fires with.

    @ivar producer: Pauses reading from the client (the transport).
    @ivar op: Progress (C{done}) and cancellation of this upload.
    @ivar onProgress: Called after each completed write (resets the
        connection's idle timeout while the transport is paused).
    """

    backend: Deferred[IBackend]
    offset: int
    length: int
    producer: IPushProducer
    op: Operation
    bufferSize: int = 8 * 1024**2
    onProgress: Callable[[], None] = lambda: None
    _buf: memoryview | None = field(default=None, init=False)
    _mmap: object = field(default=None, init=False)
    _fill: int = field(default=0, init=False)
    _limit: int = field(default=0, init=False)
    _queue: deque[memoryview] = field(factory=deque, init=False)
    _queued: int = field(default=0, init=False)
    _received: int = field(default=0, init=False)
    _written: int = field(default=0, init=False)
    _writing: bool = field(default=False, init=False)
    _paused: bool = field(default=False, init=False)
    _complete: bool = field(default=False, init=False)
    _backend: IBackend | None = field(default=None, init=False)
    _failure: Failure | None = field(default=None, init=False)
    _result: object = field(default=None, init=False)
    _waiters: list[Deferred[None]] = field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        self.backend.addCallbacks(self._gotBackend, self._fail)

    # IBodySink

    def dataReceived(self, data: bytes) -> None:
        if self._failure is not None or self._result is not None:
            return
        self._received += len(data)
        if self._received > self.length:
            # Twisted frames bodies by Content-Length, so this is a bug.
            self._fail(Failure(ValueError("Body longer than Content-Length")))
            return
        self._queue.append(memoryview(data))
        self._queued += len(data)
        if self._queued >= self.bufferSize and not self._paused:
            self._paused = True
            self.producer.pauseProducing()
        self._pump()

    def bodyComplete(self) -> None:
        self._complete = True
        self._pump()

    def connectionLost(self, reason: Failure) -> None:
        if self._result is None and not (self._complete and self._received == self.length):
            self._fail(
                Failure(
                    ShortBody(f"Client disconnected after {self._received} of {self.length} bytes")
                )
            )

    # Results

    def whenDone(self) -> Deferred[None]:
        """
        @return: A fresh Deferred firing when every byte was written, or
            failing with the first error (fan-out: each caller its own).
        """
        d: Deferred[None] = Deferred()
        if self._result is None:
            self._waiters.append(d)
        elif self._result is True:
            d.callback(None)
        else:
            assert isinstance(self._result, Failure)
            d.errback(self._result)
        return d

    @property
    def bytesWritten(self) -> int:
        return self._written

    @property
    def bodyReceived(self) -> bool:
        """
        The whole body arrived (it may not all be written yet).
        """
        return self._complete

    # Internals

    def _gotBackend(self, backend: IBackend) -> None:
        self._backend = backend
        self._pump()

    def _pump(self) -> None:
        if self._writing or self._backend is None or self._failure is not None:
            self._maybeFinish()
            return
        if self.op.canceled:
            self._fail(Failure(OperationCanceled("Transfer was canceled")))
            return
        if self._written == self.length:
            self._maybeFinish()
            return
        if self._buf is None:
            self._mmap = _buffers.allocate(min(self.bufferSize, max(self.length, 1)))
            self._buf = memoryview(self._mmap)  # type: ignore[arg-type]
            self._startBuffer()
        buf = self._buf
        while self._queue and self._fill < self._limit:
            piece = self._queue[0]
            n = min(len(piece), self._limit - self._fill)
            buf[self._fill : self._fill + n] = piece[:n]
            self._fill += n
            self._queued -= n
            if n == len(piece):
                self._queue.popleft()
            else:
                self._queue[0] = piece[n:]
        # Resume once the queue drained into the buffer, so the client
        # sends the next buffer while this one is written.
        if self._paused and self._queued < self.bufferSize // 2:
            self._paused = False
            self.producer.resumeProducing()
        remaining = self.length - self._written
        if self._fill and (self._fill == self._limit or self._fill == remaining):
            self._writing = True
            offset = self.offset + self._written
            d = self._backend.write(offset, buf[: self._fill])
            d.addCallbacks(self._wrote, self._writeFailed)
            return
        self._maybeFinish()

    def _startBuffer(self) -> None:
        # Fill the first buffer only up to a 4 KiB boundary of the image, so
        # every later write is aligned and O_DIRECT needs no read-modify-write.
        assert self._buf is not None
        position = self.offset + self._written
        head = position % _buffers.ALIGNMENT
        size = len(self._buf) - head if head else len(self._buf)
        self._limit = min(size, self.length - self._written)
        self._fill = 0

    def _wrote(self, n: int) -> None:
        self._writing = False
        self._written += self._fill
        self.op.done = self._written
        self._startBuffer()
        self.onProgress()
        self._pump()

    def _writeFailed(self, reason: Failure) -> None:
        self._writing = False
        self._fail(reason)

    def _fail(self, reason: Failure) -> None:
        if self._failure is None:
            self._failure = reason
        self._queue.clear()
        self._queued = 0
        if self._paused:
            # Keep draining so the client gets an answer.
            self._paused = False
            self.producer.resumeProducing()
        self._maybeFinish()

    def _maybeFinish(self) -> None:
        if self._writing or self._result is not None:
            return
        if self._failure is not None:
            self._result = self._failure
        elif self._complete and self._written == self.length:
            self._result = True
        else:
            return
        self._buf = None
        self._mmap = None
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if self._result is True:
                d.callback(None)
            else:
                d.errback(self._result)  # type: ignore[arg-type]
