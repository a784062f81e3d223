# -*- test-case-name: tests.test_download -*-
"""
Download producer: a byte range of a backend streamed to a response.

A push producer with two reusable, page-aligned buffers: while one chunk
waits for the transport (paused because the socket is full), the next is
read on the disk-io pool. Our socket transports
(L{imageio.interfaces.IZeroCopyTransport}) send it without a copy and give
it back once sent, our TLS transport once encrypted (as the socket drains);
other TLS transports encrypt it at once, so it is free again when C{write}
returns. Memory per download is two buffers, whatever the image
size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime, ISSLTransport
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from imageio import _buffers
from imageio._buffers import BufferBudget, BufferPool, Lease
from imageio._log import Logger
from imageio.interfaces import IBackend, IZeroCopyTransport
from imageio.tickets import Operation, OperationCanceled

log = Logger()

#: Chunks smaller than this are copied for transports that would hold the
#: buffer: cheaper than keeping the buffer out of the connection's pool.
HOLD_MIN = 256 * 1024

# How a transport treats a written buffer.
_COPY, _CONSUMED, _HELD = range(3)


class TruncatedImage(Exception):
    """
    The backend returned fewer bytes than the response promised.
    """


class ReaderStalled(Exception):
    """
    The client stopped reading for longer than the inactivity timeout.
    """


class ResponseProducer:
    """
    What L{DownloadProducer} and L{imageio.web._splice.SpliceProducer}
    share: the life of a producer streaming a response body under the
    transport's control (pausing, the inactivity timer, canceling, cutting
    the response, finishing it, and L{done}).

    A mixin without state: the subclass (an attrs class) declares the
    attributes below, and implements L{_pump} and, when it holds anything,
    L{_ending} and L{_ended}.

    @ivar done: Fires when the response is complete; fails when it was cut.
    @ivar idleTimeout: Abort when the client reads nothing for this long.
    """

    if not TYPE_CHECKING:
        # The slotted subclass holds the state: no instance dict (hidden
        # from mypy, which takes the declarations below for slots missing).
        __slots__ = ()

    request: Request
    op: Operation
    clock: IReactorTime
    idleTimeout: float | None
    done: Deferred[None]
    _paused: bool
    _stopped: bool
    _stall: IDelayedCall | None

    # IPushProducer

    def pauseProducing(self) -> None:
        if self._paused or self._stopped:
            return
        self._paused = True
        if self.idleTimeout and self._stall is None:
            self._stall = self.clock.callLater(self.idleTimeout, self._stalled)

    def resumeProducing(self) -> None:
        if self._stall is not None:
            self._cancelStall()
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._stop(Failure(ConnectionError("Client disconnected")))

    def cancel(self, reason: Exception | None = None) -> None:
        """
        The transfer was canceled: stop now, cutting the response if it
        started.

        @param reason: What L{done} fails with, L{OperationCanceled} by
            default.
        """
        self._abort(Failure(reason or OperationCanceled("Transfer was canceled")))

    # For subclasses

    def _pump(self) -> None:
        """
        Move the transfer on: read, write or finish what can be now.
        """
        raise NotImplementedError()

    def _ending(self, complete: bool) -> None:
        """
        The transfer ends (C{complete}: the whole body was written): let go
        of the transport, before the producer leaves the request.
        """

    def _ended(self, complete: bool) -> None:
        """
        The producer left the request (and finished it when C{complete}):
        give back what it holds, before L{done} fires.
        """

    def _begin(self) -> Deferred[None]:
        """
        Register with the request and start pumping.

        @return: L{done}.
        """
        self.request.registerProducer(self, True)
        # A real transport calls stopProducing on disconnect; notifyFinish
        # also covers test transports.
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self._pump()
        return self.done

    def _startStall(self) -> None:
        if self.idleTimeout and self._stall is None:
            self._stall = self.clock.callLater(self.idleTimeout, self._stalled)

    def _cancelStall(self) -> None:
        if self._stall is not None and self._stall.active():
            self._stall.cancel()
        self._stall = None

    def _stalled(self) -> None:
        self._stall = None
        self._abort(Failure(ReaderStalled(f"Client read nothing for {self.idleTimeout} seconds")))

    def _finish(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._cancelStall()
        self._ending(True)
        self.request.unregisterProducer()
        self.request.finish()
        self._ended(True)
        self.done.callback(None)

    def _abort(self, reason: Failure) -> None:
        # Once the headers are out, cut the connection so the client sees a
        # short body; before that, L{done} fails and the caller answers.
        if self._stopped:
            return
        transport = getattr(self.request.channel, "transport", None)
        self._stop(reason)
        if transport is not None and self.request.startedWriting:
            transport.abortConnection()

    def _stop(self, reason: Failure) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._cancelStall()
        self._ending(False)
        # After a disconnect the request has no channel left to unregister
        # from (Request.connectionLost cleared it).
        if self.request.producer is self and self.request.channel is not None:
            self.request.unregisterProducer()
        self._ended(False)
        self.done.errback(reason)


@implementer(IPushProducer)
@define
class DownloadProducer(ResponseProducer):
    """
    Streams C{length} bytes at C{offset} of C{backend} into C{request},
    whose headers (with C{Content-Length}) are already set.

    @ivar idleTimeout: Abort when the client reads nothing for this long.
    @ivar budget: The memory budget buffers are taken from: the first
        buffer waits for it, the second is used only if the budget has it
        at once.
    """

    request: Request
    backend: IBackend
    offset: int
    length: int
    op: Operation
    clock: IReactorTime
    bufferSize: int = 8 * 1024**2
    idleTimeout: float | None = None
    #: Spare buffers of C{bufferSize} kept by the connection between
    #: requests (as upstream keeps one buffer per connection), so small
    #: reads do not map fresh memory each time.
    pool: BufferPool | None = None
    budget: BufferBudget = field(factory=BufferBudget)
    # Leases of the buffers this producer holds (at most two), by buffer
    # identity, and the one being waited for.
    _leases: dict[int, tuple[memoryview, Lease]] = field(factory=dict, init=False)
    _acquiring: Deferred[Lease] | None = field(default=None, init=False)
    done: Deferred[None] = field(factory=Deferred, init=False)
    _free: list[memoryview] = field(factory=list, init=False)
    _ready: tuple[memoryview, int] | None = field(default=None, init=False)
    _reading: bool = field(default=False, init=False)
    _paused: bool = field(default=False, init=False)
    _stopped: bool = field(default=False, init=False)
    _position: int = field(default=0, init=False)
    _delivered: int = field(default=0, init=False)
    _stall: IDelayedCall | None = field(default=None, init=False)
    _mode: int = field(default=_COPY, init=False)
    _held: list[memoryview] = field(factory=list, init=False)
    _finished: bool = field(default=False, init=False)

    def start(self) -> Deferred[None]:
        """
        Register with the request and start reading.

        @return: L{done}, firing when the response is complete or failing
            when it was cut.
        """
        self._position = self.offset
        # Ours (sockets, and TLS over them) hold the buffer until sent or
        # encrypted; other TLS transports encrypt what they are given at
        # once; others (Twisted's) accept only bytes.
        transport = getattr(self.request.channel, "transport", None)
        if IZeroCopyTransport.providedBy(transport):
            self._mode = _HELD
        elif ISSLTransport.providedBy(transport):
            self._mode = _CONSUMED
        return self._begin()

    # Internals

    def _pump(self) -> None:
        if self._stopped:
            return
        if self.op.canceled:
            self._abort(Failure(OperationCanceled("Transfer was canceled")))
            return
        if self._ready is not None and not self._paused:
            buf, n = self._ready
            self._ready = None
            self._delivered += n
            self.op.done = self._delivered
            self._write(buf, n)
            if self._delivered == self.length:
                self._finish()
                return
        if self._reading or self._ready is not None:
            return
        remaining = self.length - (self._position - self.offset)
        if remaining == 0:
            if self._delivered == self.length:
                self._finish()
            return
        nextBuf = self._buffer()
        if nextBuf is None:
            return
        buf = nextBuf
        size = min(len(buf), remaining)
        self._reading = True
        d = self.backend.readInto(self._position, buf[:size])
        d.addCallbacks(self._gotData, self._readFailed, callbackArgs=(buf, size))
        # A bug after the read (writing to the transport) must cut the
        # response, not leave it hanging with an unhandled error.
        d.addErrback(self._abort)

    def _write(self, buf: memoryview, n: int) -> None:
        if self._mode == _COPY or (self._mode == _HELD and n < HOLD_MIN):
            self.request.write(bytes(buf[:n]))
        else:
            self.request.write(buf[:n])  # type: ignore[arg-type]
            if self._mode == _HELD:
                transport = IZeroCopyTransport(self.request.channel.transport)  # type: ignore[attr-defined]
                if transport.pendingBytes():
                    self._held.append(buf)
                    transport.whenDrained().addCallback(self._drained, buf)
                    return
        # The transport encrypted, copied or sent it: reuse.
        self._free.append(buf)

    def _drained(self, _: None, buf: memoryview) -> None:
        # The transport sent (or dropped) buf.
        for i, held in enumerate(self._held):
            if held is buf:
                del self._held[i]
                break
        if self._finished:
            # Sent after the response completed: back to the connection.
            self._giveBack(buf)
            return
        if self._stopped:
            return
        self._free.append(buf)
        self._pump()

    def _buffer(self) -> memoryview | None:
        if self._free:
            return self._free.pop()
        if len(self._leases) < 2 and self._acquiring is None:
            if self.pool is not None:
                spare = self.pool.take()
                if spare is not None:
                    return self._own(*spare)
                size = self.bufferSize
            else:
                size = min(self.bufferSize, max(self.length, 1))
            lease = self.budget.tryAcquire(size)
            if lease is not None:
                return self._own(_pooled(size), lease)
            if not self._leases:
                # Wait for the first buffer; the second is a bonus.
                self._acquiring = d = self.budget.acquire(size)
                d.addCallbacks(self._granted, _ignoreCancel)
        return None

    def _own(self, buf: memoryview, lease: Lease) -> memoryview:
        self._leases[id(buf)] = (buf, lease)
        return buf

    def _granted(self, lease: Lease) -> None:
        self._acquiring = None
        if self._stopped:
            lease.release()
            return
        self._free.append(self._own(_pooled(lease.size), lease))
        self._pump()

    def _giveBack(self, buf: memoryview) -> None:
        # A buffer no longer used by this download: to the connection's
        # pool, or its bytes back to the budget.
        owned = self._leases.pop(id(buf), None)
        if owned is None:
            return
        if self.pool is not None:
            self.pool.give(buf, owned[1])
        else:
            owned[1].release()

    def _gotData(self, n: int, buf: memoryview, size: int) -> None:
        self._reading = False
        if self._stopped:
            return
        if n < size:
            self._abort(
                Failure(TruncatedImage(f"Expected {size} bytes at {self._position}, got {n}"))
            )
            return
        self._position += n
        self._ready = (buf, n)
        self._pump()

    def _readFailed(self, reason: Failure) -> None:
        self._reading = False
        if self._stopped:
            return
        self._abort(reason)

    def _ending(self, complete: bool) -> None:
        self._finished = complete

    def _ended(self, complete: bool) -> None:
        if complete:
            # Buffers in the free list are neither being read into nor held
            # by the transport (it copied or encrypted them); held ones come
            # back when sent (_drained).
            for buf in self._free:
                self._giveBack(buf)
        self._release()

    def _release(self) -> None:
        if self._acquiring is not None:
            d, self._acquiring = self._acquiring, None
            d.cancel()
        if not self._finished:
            # Stopped: every buffer's bytes go back to the budget now.
            leases, self._leases = self._leases, {}
            for _, lease in leases.values():
                lease.release()
        self._free.clear()
        # The transport keeps its references until sent.
        self._held.clear()
        self._ready = None


def _pooled(size: int) -> memoryview:
    return memoryview(_buffers.allocate(size))  # type: ignore[arg-type]


def _ignoreCancel(reason: Failure) -> None:
    reason.trap(CancelledError)
