# -*- test-case-name: tests.test_upload -*-
"""
Upload sink: a request body streamed into a backend with backpressure.

The body fills two reusable, page-aligned buffers in turn: while one is
written to the backend (on the disk-io pool), the client fills the other.
Our transports read the body straight into the buffer
(L{imageio.interfaces.IDirectReader}); others deliver pieces that are
copied in. When both buffers are taken the client connection is paused, and
it is resumed once a write completes, so memory per upload is two buffers
whatever the request size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from imageio import _buffers
from imageio._log import Logger
from imageio.interfaces import IBackend, IBodySink, IDirectBodySink
from imageio.tickets import Operation, OperationCanceled
from imageio.web._response import httpErrorFor

log = Logger()


class ShortBody(Exception):
    """
    The connection closed before C{Content-Length} bytes arrived.
    """


@implementer(IBodySink, IDirectBodySink)
@define
class UploadSink:
    """
    Writes C{length} body bytes at C{offset} of the backend the Deferred
    C{backend} fires with.

    @ivar producer: Pauses reading from the client (the transport).
    @ivar op: Progress (C{done}) and cancellation of this upload.
    @ivar bufferSize: Size of each of the two buffers.
    @ivar onProgress: Called after each completed write (resets the
        connection's idle timeout while the transport is paused).
    @ivar budget: The memory budget the buffers are taken from: the first
        buffer waits for it (the client is paused meanwhile), the second is
        used only if the budget has it at once.
    """

    backend: Deferred[IBackend]
    offset: int
    length: int
    producer: IPushProducer
    op: Operation
    bufferSize: int = 8 * 1024**2
    onProgress: Callable[[], None] = lambda: None
    budget: _buffers.BufferBudget = field(factory=_buffers.BufferBudget)
    # Leases of the allocated buffers, and the one being waited for.
    _leases: list[_buffers.Lease] = field(factory=list, init=False)
    _acquiring: Deferred[_buffers.Lease] | None = field(default=None, init=False)
    # Buffers not in use, and how many were allocated (at most two).
    _free: list[memoryview] = field(factory=list, init=False)
    _allocated: int = field(default=0, init=False)
    # The buffer being filled: bytes in it and how many it takes.
    _buf: memoryview | None = field(default=None, init=False)
    _fill: int = field(default=0, init=False)
    _limit: int = field(default=0, init=False)
    # Filled buffers waiting for the backend: (buffer, image offset, size).
    _full: deque[tuple[memoryview, int, int]] = field(factory=deque, init=False)
    # Body bytes placed in buffers so far.
    _assigned: int = field(default=0, init=False)
    # Pieces delivered while no buffer had room (copying transports).
    _queue: deque[memoryview] = field(factory=deque, init=False)
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
        if self._stopped():
            return
        if not self._count(len(data)):
            return
        self._queue.append(memoryview(data))
        self._drainQueue()
        self._flowControl()
        self._startWrite()

    def bodyComplete(self) -> None:
        self._complete = True
        self._startWrite()
        self._maybeFinish()

    def connectionLost(self, reason: Failure) -> None:
        if self._result is None and not (self._complete and self._received == self.length):
            self._fail(
                Failure(
                    ShortBody(f"Client disconnected after {self._received} of {self.length} bytes")
                )
            )

    # IDirectBodySink

    def bodyBuffer(self) -> memoryview | None:
        if self._stopped() or self._queue:
            return None
        if not self._takeBuffer():
            return None
        assert self._buf is not None
        return self._buf[self._fill : self._limit]

    def bodyFilled(self, n: int) -> None:
        if self._stopped() or not self._count(n):
            return
        self._fill += n
        self._assigned += n
        self._bufferDone()
        self._flowControl()
        self._startWrite()

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

    def _stopped(self) -> bool:
        return self._failure is not None or self._result is not None

    def _count(self, n: int) -> bool:
        self._received += n
        if self._received > self.length:
            # Twisted frames bodies by Content-Length, so this is a bug.
            self._fail(Failure(ValueError("Body longer than Content-Length")))
            return False
        return True

    def _takeBuffer(self) -> bool:
        """
        Make sure a buffer with room is being filled.

        @return: C{False} when both buffers are taken.
        """
        if self._buf is not None:
            return True
        if self._assigned == self.length:
            return False
        if self._free:
            buf = self._free.pop()
        elif self._allocated < 2 and self._acquiring is None:
            size = min(self.bufferSize, max(self.length, 1))
            lease = self.budget.tryAcquire(size)
            if lease is None:
                if not self._allocated:
                    # Wait for the first buffer; the second is a bonus.
                    self._acquiring = d = self.budget.acquire(size)
                    d.addCallbacks(self._granted, _ignoreCancel)
                return False
            buf = self._allocate(lease)
        else:
            return False
        # Fill the first buffer only up to a 4 KiB boundary of the image, so
        # every later write is aligned and O_DIRECT needs no read-modify-write.
        head = (self.offset + self._assigned) % _buffers.ALIGNMENT
        size = len(buf) - head if head else len(buf)
        self._buf = buf
        self._fill = 0
        self._limit = min(size, self.length - self._assigned)
        return True

    def _allocate(self, lease: _buffers.Lease) -> memoryview:
        self._allocated += 1
        self._leases.append(lease)
        # Filled whole (sized to the body): huge pages where the kernel has them.
        return memoryview(_buffers.allocate(lease.size, huge=True))  # type: ignore[arg-type]

    def _granted(self, lease: _buffers.Lease) -> None:
        self._acquiring = None
        if self._stopped():
            lease.release()
            return
        self._free.append(self._allocate(lease))
        self._drainQueue()
        self._flowControl()
        self._startWrite()

    def _releaseBuffers(self) -> None:
        # However the upload ended, its buffers' bytes go back to the budget.
        if self._acquiring is not None:
            d, self._acquiring = self._acquiring, None
            d.cancel()
        leases, self._leases = self._leases, []
        for lease in leases:
            lease.release()

    def _bufferDone(self) -> None:
        # A full buffer (or the end of the body) goes to the write queue.
        if self._buf is not None and self._fill == self._limit:
            start = self.offset + self._assigned - self._fill
            self._full.append((self._buf, start, self._fill))
            self._buf = None

    def _drainQueue(self) -> None:
        while self._queue and self._takeBuffer():
            assert self._buf is not None
            piece = self._queue[0]
            n = min(len(piece), self._limit - self._fill)
            self._buf[self._fill : self._fill + n] = piece[:n]
            self._fill += n
            self._assigned += n
            if n == len(piece):
                self._queue.popleft()
            else:
                self._queue[0] = piece[n:]
            self._bufferDone()

    def _flowControl(self) -> None:
        # Pause while no buffer has room: the client fills the next buffer
        # while the previous one is written, and no further.
        # Once the whole body is in, the connection reads on: the next
        # request may follow.
        room = self._assigned == self.length or (
            not self._queue and (self._buf is not None or bool(self._free) or self._allocated < 2)
        )
        if not room and not self._paused:
            self._paused = True
            self.producer.pauseProducing()
        elif room and self._paused:
            self._paused = False
            self.producer.resumeProducing()

    def _startWrite(self) -> None:
        if self._writing or self._backend is None or self._failure is not None:
            self._maybeFinish()
            return
        if not self._full:
            self._maybeFinish()
            return
        if self.op.canceled:
            self._fail(Failure(OperationCanceled("Transfer was canceled")))
            return
        buf, offset, size = self._full[0]
        self._writing = True
        d = self._backend.write(offset, buf[:size])
        d.addCallbacks(self._wrote, self._writeFailed)

    def _gotBackend(self, backend: IBackend) -> None:
        self._backend = backend
        self._startWrite()

    def _wrote(self, n: int) -> None:
        self._writing = False
        buf, _, size = self._full.popleft()
        self._written += size
        self.op.done = self._written
        self._free.append(buf)
        self.onProgress()
        if self._stopped():
            self._maybeFinish()
            return
        self._drainQueue()
        self._flowControl()
        self._startWrite()

    def _writeFailed(self, reason: Failure) -> None:
        self._writing = False
        self._fail(reason)

    def _fail(self, reason: Failure) -> None:
        if self._failure is None:
            # A backend's domain error (a remote daemon's 403 in proxy
            # mode) reaches the client as its status, even when the upload
            # is answered before its body is complete.
            error = httpErrorFor(reason.value)
            self._failure = reason if error in (None, reason.value) else Failure(error)
        self._queue.clear()
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
        self._free.clear()
        self._full.clear()
        self._releaseBuffers()
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if self._result is True:
                d.callback(None)
            else:
                d.errback(self._result)  # type: ignore[arg-type]


def _ignoreCancel(reason: Failure) -> None:
    reason.trap(CancelledError)
