# -*- test-case-name: tests.test_images -*-
"""
A JSON list answer written in slices, under backpressure.

Some answers (the extents of a very fragmented image) can be megabytes of
JSON. Building them whole costs memory per request and a long stretch of
reactor time. L{JSONListWriter} takes the list in slices of items, each
already encoded (off the reactor, by the caller).

Clients expect C{Content-Length} on every answer (upstream builds the
whole answer), so the slices are gathered: up to L{MAX_BUFFERED} bytes
freely, beyond that up to L{MAX_WHOLE} bytes held against the buffer
budget all transfers share, and the answer is then sent with
C{Content-Length}, a slice at a time as the transport takes them. Only an
answer longer than that, or one that finds the budget used up, is streamed
without a length (chunked for HTTP/1.1 clients, delimited by closing the
connection for HTTP/1.0 ones), the next slice asked for once the transport
has taken the previous one. Memory per answer is bounded either way.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from imageio._buffers import BufferBudget, Lease
from imageio.web._response import APPLICATION_JSON, isGone, sendBody

#: Largest answer gathered without asking the buffer budget: about 15,000
#: extents.
MAX_BUFFERED = 1024**2

#: Largest answer sent with C{Content-Length}, held against the buffer
#: budget: about a million extents. Longer answers are streamed.
MAX_WHOLE = 64 * 1024**2


@implementer(IPushProducer)
@define
class JSONListWriter:
    """
    Writes C{[item, item, ...]\\n} to C{request} from encoded slices.

    @ivar request: The response to write.
    @ivar budget: The buffer budget answers longer than L{MAX_BUFFERED}
        are held against; without one, they are streamed.
    """

    request: Request
    budget: BufferBudget | None = None
    _first: list[bytes] = field(factory=list, init=False)
    _leases: list[Lease] = field(factory=list, init=False)
    _leased: int = field(default=0, init=False)
    _buffered: int = field(default=0, init=False)
    _streaming: bool = field(default=False, init=False)
    _paused: bool = field(default=False, init=False)
    _stopped: bool = field(default=False, init=False)
    _waiter: Deferred[None] | None = field(default=None, init=False)

    @property
    def streaming(self) -> bool:
        """
        Whether the response has started (headers sent); an error now can
        only abort the connection.
        """
        return self._streaming

    def write(self, items: bytes) -> Deferred[None]:
        """
        Add a slice: encoded items joined by C{", "}, without brackets.

        @return: A Deferred firing when the caller may prepare the next
            slice (the transport took this one), or failing with
            L{ConnectionDone} if the client went away.
        """
        if self._stopped or isGone(self.request):
            return fail(ConnectionDone("The client went away"))
        if not items:
            return succeed(None)
        if not self._streaming:
            self._first.append(items)
            self._buffered += len(items)
            if self._hold():
                return succeed(None)
            return self._start()
        self.request.write(b", " + items)
        return self._whenWritable()

    def _hold(self) -> bool:
        """
        @return: Whether what is gathered may stay gathered: within
            L{MAX_BUFFERED}, or within L{MAX_WHOLE} with the budget's
            bytes for it, asked for in doubling steps, never waited for
            (an answer that waits while holding memory could block the
            transfers that would free it).
        """
        needed = self._buffered - MAX_BUFFERED
        if needed <= self._leased:
            return True
        if self.budget is None or self._buffered > MAX_WHOLE:
            return False
        while self._leased < needed:
            step = min(max(self._leased, MAX_BUFFERED), MAX_WHOLE - MAX_BUFFERED - self._leased)
            lease = self.budget.tryAcquire(step)
            if lease is None:
                return False
            self._leases.append(lease)
            self._leased += step
        return True

    def release(self) -> None:
        """
        Give back the budget's bytes this answer holds; safe to call on
        every end path, and more than once.
        """
        leases, self._leases = self._leases, []
        self._leased = 0
        for lease in leases:
            lease.release()

    def finish(self) -> Deferred[None]:
        """
        Close the list and end the response.

        @return: A Deferred firing once the whole answer is written, or
            failing with L{ConnectionDone} if the client went away first.
        """
        if self._stopped or isGone(self.request):
            self.release()
            return succeed(None)
        if not self._streaming:
            if self._buffered <= MAX_BUFFERED:
                body = b"[" + b", ".join(self._first) + b"]\n"
                self._first = []
                sendBody(self.request, 200, body, APPLICATION_JSON)
                return succeed(None)
            return self._sendWhole()
        self.request.write(b"]\n")
        self.request.unregisterProducer()
        self.request.finish()
        return succeed(None)

    @inlineCallbacks
    def _sendWhole(self) -> Generator[Deferred[Any], Any, None]:
        """
        Send the gathered answer with C{Content-Length}.
        """
        # The brackets, the gathered items and the separators between them.
        length = 1 + self._buffered + 2 * (len(self._first) - 1) + 2
        self._streaming = True
        request = self.request
        request.setResponseCode(200)
        request.setHeader(b"content-type", APPLICATION_JSON)
        request.setHeader(b"content-length", b"%d" % length)
        self._register()
        yield self._drain()
        request.write(b"]\n")
        request.unregisterProducer()
        request.finish()

    def _start(self) -> Deferred[None]:
        """
        Start a streamed answer, without a length, with what was gathered.
        """
        self._streaming = True
        self.request.setResponseCode(200)
        self.request.setHeader(b"content-type", APPLICATION_JSON)
        self._register()
        return self._drain()

    def _register(self) -> None:
        self.request.registerProducer(self, True)
        # A paused producer is not told when the connection is lost; the
        # request is, and a wait for the transport must end then.
        self.request.notifyFinish().addErrback(lambda _: self.stopProducing())

    @inlineCallbacks
    def _drain(self) -> Generator[Deferred[Any], Any, None]:
        """
        Write the gathered slices, each once the transport has taken the
        one before (no large join or copy on the reactor), then give back
        the budget's bytes they held.
        """
        pieces, self._first = self._first, []
        try:
            separator = b"["
            for i, piece in enumerate(pieces):
                if self._stopped or isGone(self.request):
                    raise ConnectionDone("The client went away")
                pieces[i] = b""
                self.request.write(separator + piece)
                separator = b", "
                yield self._whenWritable()
        finally:
            self.release()

    def _whenWritable(self) -> Deferred[None]:
        if self._stopped:
            return fail(ConnectionDone("The client went away"))
        if not self._paused:
            return succeed(None)
        self._waiter = Deferred()
        return self._waiter

    # IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.callback(None)

    def stopProducing(self) -> None:
        self._stopped = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.errback(Failure(ConnectionDone("The client went away")))
