# -*- test-case-name: tests.test_images -*-
"""
A JSON list answer written in slices, under backpressure.

Some answers (the extents of a very fragmented image) can be megabytes of
JSON. Building them whole costs memory per request and a long stretch of
reactor time. L{JSONListWriter} takes the list in slices of items, each
already encoded (off the reactor, by the caller): an answer of at most
L{MAX_BUFFERED} bytes is sent as usual, with C{Content-Length}; a longer
one is streamed (chunked for HTTP/1.1 clients, delimited by closing the
connection for HTTP/1.0 ones), and the next slice is only asked for once
the transport has taken the previous one. Memory per answer is then
L{MAX_BUFFERED} and a slice, whatever the list's length.
"""

from __future__ import annotations

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from imageio.web._response import APPLICATION_JSON, isGone, sendBody

#: Largest answer sent whole, with C{Content-Length}: about 15,000 extents.
#: Longer answers are streamed.
MAX_BUFFERED = 1024**2


@implementer(IPushProducer)
@define
class JSONListWriter:
    """
    Writes C{[item, item, ...]\\n} to C{request} from encoded slices.

    @ivar request: The response to write.
    """

    request: Request
    _first: list[bytes] = field(factory=list, init=False)
    _buffered: int = field(default=0, init=False)
    _streaming: bool = field(default=False, init=False)
    _paused: bool = field(default=False, init=False)
    _stopped: bool = field(default=False, init=False)
    _waiter: Deferred[None] | None = field(default=None, init=False)

    @property
    def streaming(self) -> bool:
        """
        Whether the response has started (headers sent without
        C{Content-Length}); an error now can only abort the connection.
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
            if self._buffered <= MAX_BUFFERED:
                return succeed(None)
            self._start()
        else:
            self.request.write(b", " + items)
        return self._whenWritable()

    def finish(self) -> None:
        """
        Close the list and end the response.
        """
        if self._stopped or isGone(self.request):
            return
        if not self._streaming:
            body = b"[" + b", ".join(self._first) + b"]\n"
            self._first = []
            sendBody(self.request, 200, body, APPLICATION_JSON)
            return
        self.request.write(b"]\n")
        self.request.unregisterProducer()
        self.request.finish()

    def _start(self) -> None:
        self._streaming = True
        self.request.setResponseCode(200)
        self.request.setHeader(b"content-type", APPLICATION_JSON)
        self.request.registerProducer(self, True)
        first, self._first = self._first, []
        self.request.write(b"[" + b", ".join(first))

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
