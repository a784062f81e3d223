# -*- test-case-name: tests.test_streaming -*-
"""
The HTTP connection: per-connection state for handlers (L{IConnection}),
answers before a body is read, deadlines on request heads and bodies,
half-closed clients, and request bodies read straight into a sink's
buffers (L{IDirectReader}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import define
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http_headers import Headers
from twisted.web.iweb import IRequest
from zope.interface import implementer

from imageio._log import Logger
from imageio.interfaces import (
    IConnection,
    IDirectBodySink,
    IDirectReader,
    IDirectReadTransport,
)
from imageio.web._head import MAX_HEAD, parseHead
from imageio.web._request import StreamingRequest
from imageio.web._response import SERVER, HTTPError
from imageio.web._socket import tuneTransport
from imageio.web._twisted_http import HTTPChannelSeam, IdentityBody, rawHeaderItems

log = Logger()

#: Longest request line; upstream answers 414 above 4096 bytes.
MAX_REQUEST_LINE = 4096

#: A response head and a first body write up to this size go to the
#: transport as one write (one send, one TLS record).
JOIN_HEAD = 64 * 1024


@implementer(IConnection, IDirectReader, IHalfCloseableProtocol)
class ImageioChannel(HTTPChannelSeam):
    """
    An HTTP connection with per-connection state for the images API.

    A client may send its requests and then shut down its side of the
    connection (C{shutdown(SHUT_WR)}, or TLS C{close_notify}): complete
    requests are answered, then the connection closes.

    @ivar contexts: Per-ticket state the data path keeps for this
        connection (open backends), closed when the connection closes.
    @ivar closingEarly: A request was answered before its body; ignore the
        rest of the input.
    @ivar readClosed: The client will send nothing more.
    """

    closingEarly = False
    readClosed = False
    site: Any
    _headDeadline: IDelayedCall | None = None
    _headsReceived = 0
    # A response head not written yet: it goes with the body's first bytes.
    _head: bytes | None = None
    _lost = False
    # The body rate watch of the request whose body is arriving.
    _bodyWatch: IDelayedCall | None = None
    _bodyStarted = 0.0
    _bodyReceived = 0
    _bodyPaused = 0.0
    _bodyPausedSince: float | None = None
    # The body being read straight into a sink's buffers.
    _directSink: IDirectBodySink | None = None
    _directBody: IdentityBody | None = None
    # The rest of the sink buffer the transport reads into, the bytes read
    # into it not yet counted (by the body, the sink, the rate watch), and
    # when the last of them arrived (reactor seconds).
    _directView: memoryview | None = None
    _directPending = 0
    _directReadAt: float | None = None
    _directNow: Callable[[], float]

    def __init__(self) -> None:
        super().__init__()
        self.contexts: dict[object, Any] = {}
        self._closeHooks: list[Callable[[], object]] = []

    # Request head deadline: Twisted's idle timeout restarts on every byte,
    # so a client sending one header byte at a time (slowloris) would never
    # be cut. The whole head must arrive within the listener's timeout.

    def _startHeadDeadline(self) -> None:
        timeout = getattr(self.site, "timeOut", None)
        if self._headDeadline is None and timeout:
            self._headDeadline = self.callLater(timeout, self._headTimedOut)  # type: ignore[attr-defined]

    def _cancelHeadDeadline(self) -> None:
        if self._headDeadline is not None:
            if self._headDeadline.active():
                self._headDeadline.cancel()
            self._headDeadline = None

    def _headTimedOut(self) -> None:
        self._headDeadline = None
        transport: Any = self.transport
        log.info("Request head not complete in time from {client}", client=str(transport.getPeer()))
        body = b"Request Timeout\n"
        transport.write(
            b"HTTP/1.1 408 Request Timeout\r\nserver: %s\r\n"
            b"content-type: text/plain; charset=UTF-8\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (SERVER, len(body), body)
        )
        self.closingEarly = True
        # Closes, and aborts if the client does not read the answer.
        self.timeoutConnection()

    # Request body minimum rate, like Apache's mod_reqtimeout: after the
    # site's bodyTimeout grace seconds, a body must keep arriving at
    # bodyMinRate bytes a second on average, or it gets 408 and the
    # connection closes. Time we paused the client ourselves (storage
    # slower than the client, waiting for buffers) does not count.

    def _seconds(self) -> float:
        return float(self.site.reactor.seconds())

    def _startBodyWatch(self) -> None:
        site = getattr(self, "site", None)
        grace = getattr(site, "bodyTimeout", 0)
        rate = getattr(site, "bodyMinRate", 0)
        if not (grace and rate) or self.length == 0:
            return
        self._stopBodyWatch()
        self._bodyStarted = self._seconds()
        self._bodyReceived = 0
        self._bodyPaused = 0.0
        self._bodyPausedSince = None
        self._bodyWatch = self.callLater(grace, self._checkBodyRate)  # type: ignore[attr-defined]

    def _stopBodyWatch(self) -> None:
        if self._bodyWatch is not None:
            if self._bodyWatch.active():
                self._bodyWatch.cancel()
            self._bodyWatch = None
        self._bodyPausedSince = None

    def bodyProgress(self, n: int) -> None:
        """
        C{n} bytes of the current request body arrived.
        """
        self._bodyReceived += n

    def bodyPaused(self, paused: bool) -> None:
        """
        We stopped (or resumed) reading the request body: that time is ours,
        not the client's.
        """
        if self._bodyWatch is None:
            return
        now = self._seconds()
        if paused:
            if self._bodyPausedSince is None:
                self._bodyPausedSince = now
        elif self._bodyPausedSince is not None:
            self._bodyPaused += now - self._bodyPausedSince
            self._bodyPausedSince = None

    def _checkBodyRate(self) -> None:
        self._bodyWatch = None
        self._flushDirect()
        if self.closingEarly or self.handlingRequest:
            return
        grace: float = self.site.bodyTimeout
        rate: float = self.site.bodyMinRate
        now = self._seconds()
        paused = self._bodyPaused
        if self._bodyPausedSince is not None:
            paused += now - self._bodyPausedSince
        deadline = self._bodyStarted + grace + paused + self._bodyReceived / rate
        if self._bodyPausedSince is not None or now < deadline:
            delay = grace if self._bodyPausedSince is not None else deadline - now
            self._bodyWatch = self.callLater(max(delay, 1.0), self._checkBodyRate)  # type: ignore[attr-defined]
            return
        transport: Any = self.transport
        elapsed = now - self._bodyStarted - paused
        log.info(
            "Request body from {client} too slow: {received} bytes in {elapsed:.0f} s, "
            "minimum {rate} bytes/s after {grace} s; closing",
            client=str(transport.getPeer()),
            received=self._bodyReceived,
            elapsed=elapsed,
            rate=rate,
            grace=grace,
        )
        metrics = getattr(self.site, "metrics", None)
        if metrics is not None:
            metrics.bodyTimedOut(self.site.name)
        request = self.requests[-1] if self.requests else None
        if isinstance(request, StreamingRequest):
            self._stopDirectReads()
            request.respondEarly(HTTPError(408, "Request body not received in time", close=True))
        else:
            self.closingEarly = True
            self.loseConnection()
        # Closes once the answer is sent; aborts if the client does not read.
        self.abortLater()

    def connectionMade(self) -> None:
        super().connectionMade()
        tuneTransport(self.transport)
        metrics = getattr(self.site, "metrics", None)
        if metrics is not None:
            metrics.connectionOpened(self.site.name)

    # IHalfCloseableProtocol

    def readConnectionLost(self) -> None:
        """
        The client sent all it will send. A complete request being processed
        is answered (and so are complete requests pipelined after it), then
        the connection closes; with no complete request there is nothing to
        answer (an incomplete body ends as a disconnect would end it).
        """
        self._flushDirect()
        self.readClosed = True
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        self.loseConnection()

    def _closeIfDone(self) -> None:
        transport: Any = self.transport
        if transport is None or getattr(transport, "disconnecting", False):
            return
        if not self.handlingRequest:
            self.loseConnection()

    # Response heads: held until the body's first bytes (or the end of the
    # response), so that a small response is one transport write.

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        if self._head is not None:
            self._flushHead()
        # Twisted's format (Headers sanitized the names and values).
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in rawHeaderItems(headers):
            for value in values:
                head += (name, b": ", value, b"\r\n")
        head += (b"\r\n",)
        self._head = b"".join(head)

    def flushHead(self) -> None:
        """
        Write a held response head to the transport now: a writer sending
        the body past the transport (C{splice(2)}) needs it sent first.
        """
        self._flushHead()

    def _flushHead(self) -> None:
        head, self._head = self._head, None
        if head is not None and self.transport is not None:
            self.transport.write(head)

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            if len(data) <= JOIN_HEAD:
                self.transport.write(head + data)  # type: ignore[union-attr]
                return
            self.transport.write(head)  # type: ignore[union-attr]
        self.transport.write(data)  # type: ignore[union-attr]

    def writeSequence(self, iovec: Any) -> None:
        self._flushHead()
        super().writeSequence(iovec)

    def loseConnection(self) -> None:
        self._flushHead()
        super().loseConnection()

    def requestDone(self, request: http.Request) -> None:
        if self._head is not None:
            self._flushHead()
        persistent = self.persistent
        super().requestDone(request)
        if self.readClosed and persistent:
            # Pipelined requests that arrived complete are being answered;
            # once none is left, close.
            self._closeIfDone()

    # IConnection (setIdleTimeout: HTTPChannelSeam)

    def addCloseHook(self, hook: Callable[[], object]) -> None:
        """
        Call C{hook} when the connection closes.
        """
        self._closeHooks.append(hook)

    # Request heads

    # A connection's addresses do not change: every request asks for both
    # (twisted.web's Request.__init__), a TCP transport makes new ones.
    _peer: Any = None
    _host: Any = None

    def getPeer(self) -> Any:
        peer = self._peer
        if peer is None:
            peer = self._peer = super().getPeer()
        return peer

    def getHost(self) -> Any:
        host = self._host
        if host is None:
            host = self._host = super().getHost()
        return host

    def lineReceived(self, line: bytes) -> None:
        if len(line) > MAX_REQUEST_LINE and self.readingRequestLine:
            self._respondToStatus(414, b"Request-URI Too Long")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.readingRequestLine:
            self._respondToStatus(414, b"Request-URI Too Long")
        else:
            self._respondToStatus(431, b"Request Header Fields Too Large")

    def badRequest(self) -> None:
        # Twisted's own 400 (bad request line, headers or Content-Length) has
        # no body and no Content-Length; answer in our format.
        self._respondToStatus(400, b"Bad Request")

    def _respondToStatus(self, code: int, reason: bytes) -> None:
        body = reason + b"\n"
        transport: Any = self.transport
        transport.write(
            b"HTTP/1.1 %d %s\r\nserver: %s\r\ncontent-type: text/plain; charset=UTF-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (code, reason, SERVER, len(body), body)
        )
        self.closingEarly = True
        self.loseConnection()

    def send100Continue(self) -> bool:
        # A request refused from its headers gets its final status instead
        # (RFC 9110 10.1.1), so the client does not start sending the body.
        request = self.requests[-1] if self.requests else None
        return not (isinstance(request, StreamingRequest) and request.refusedFromHeaders)

    def allHeadersReceived(self) -> None:
        self._headsReceived += 1
        if self._headDeadline is not None:
            self._cancelHeadDeadline()
        super().allHeadersReceived()
        request = self.requests[-1] if self.requests else None
        if isinstance(request, StreamingRequest):
            error = request.takeEarlyError()
            if error is not None:
                request.respondEarly(error)
            elif self.length != 0:
                # A body follows (Content-Length, or chunked: None); a GET
                # has none, and neither a direct read nor a watch.
                self._startDirectReads(request)
                self._startBodyWatch()

    # Request bodies read straight into the sink's buffers (IDirectReader):
    # the transport reads with recv_into (or decrypts) into the upload
    # buffer instead of handing us bytes to copy. Only Content-Length
    # bodies, and never their last byte: that one goes through Twisted's
    # decoder, which ends the body and parses what follows (IdentityBody).
    #
    # A read moves 64-200 KiB on a UNIX socket (the client's send buffer
    # bounds it), so a 4 MiB buffer takes dozens of reads. The rest of the
    # buffer is offered again as it is, and the body, the sink and the
    # idle timeout hear of the bytes once the offered space is full or the
    # direct reads stop (_flushDirect): the bytes of one read cost two
    # attribute updates instead of a call chain through the decoder, the
    # sink and a timer reset. The idle timeout asks when the last byte
    # arrived (timeoutConnection).

    def _startDirectReads(self, request: StreamingRequest) -> None:
        sink = request.bodySink
        if not (
            IDirectBodySink.providedBy(sink) and IDirectReadTransport.providedBy(self.transport)
        ):
            return
        body = self.identityBody()
        if body is not None and body.readable():
            self._directSink = sink
            self._directBody = body
            self._directNow = self.site.reactor.seconds
            IDirectReadTransport(self.transport).setDirectReader(self)

    def _stopDirectReads(self) -> None:
        self._flushDirect()
        self._directReadAt = None
        if self._directSink is not None:
            self._directSink = None
            self._directBody = None
            transport = IDirectReadTransport(self.transport, None)
            if transport is not None:
                transport.setDirectReader(None)

    def _flushDirect(self) -> None:
        """
        Count the bytes read into the offered space: the decoder, the sink
        (which may queue a full buffer for writing) and the idle timeout
        hear of them.
        """
        self._directView = None
        n, self._directPending = self._directPending, 0
        sink, body = self._directSink, self._directBody
        if not n or sink is None or body is None:
            return
        self.resetTimeout()
        self._bodyReceived += n
        body.consumed(n)
        sink.bodyFilled(n)

    def readBuffer(self) -> memoryview | None:
        view = self._directView
        if view is not None and not self.closingEarly:
            return view
        self._flushDirect()
        sink, body = self._directSink, self._directBody
        if sink is None or body is None or self.closingEarly:
            self._stopDirectReads()
            return None
        readable = body.readable()
        if not readable:
            # The last byte: through dataReceived and the decoder.
            return None
        view = sink.bodyBuffer()
        if view is None:
            return None
        view = view[:readable]
        self._directView = view
        return view

    def bufferFilled(self, n: int) -> None:
        view = self._directView
        assert self._directSink is not None
        self._directPending += n
        self._directReadAt = self._directNow()
        if view is not None and n < len(view):
            self._directView = view[n:]
        else:
            # Full, or flushed while a body pump thread filled it (the rate
            # watch): the bytes are where the sink's buffer resumes.
            self._flushDirect()

    def timeoutConnection(self) -> None:
        # Bytes read straight into a body buffer do not reset the idle
        # timer one by one: if the last one came within the timeout, the
        # connection is not idle; wait for the rest of the period.
        last, period = self._directReadAt, self.timeOut
        if last is not None and period is not None:
            remaining = last + period - self._directNow()
            if remaining > 0:
                self.setTimeout(remaining)
                self.timeOut = period
                return
        super().timeoutConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._directPending:
            self._flushDirect()
        if self.closingEarly:
            return
        if self.headReady():
            rest = self._wholeHeads(data)
            if not rest:
                return
            data = rest
        starting = bool(data) and self.readingRequestLine and not self.handlingRequest
        heads = self._headsReceived
        super().dataReceived(data)
        # The deadline starts once these bytes are parsed, in the same
        # reactor turn: a head that arrived whole (nearly every request)
        # needs no timer.
        if starting and heads == self._headsReceived and not (self.closingEarly or self._lost):
            self._startHeadDeadline()

    def _wholeHeads(self, data: bytes) -> bytes:
        """
        Take the request heads that arrived whole at the start of C{data},
        each parsed in one pass (L{parseHead}) instead of line by line; a
        request without a body is then answered as Twisted's parser would
        have it answered (C{allHeadersReceived}, C{allContentReceived}).

        @return: What is left for Twisted's parser: C{data} from the first
            head L{parseHead} leaves to it (a split head, anything unusual),
            or the bytes after a request being answered; empty once the
            connection is closing.
        """
        pending = self.takeLineBuffer()
        if pending:
            data = pending + data
        # The idle timeout restarts when Twisted's parser gets bytes, and
        # when a request taken here is answered (it is off until then).
        while True:
            end = data.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
            if end < 0:
                return data
            head = parseHead(data[:end])
            if head is None:
                return data
            data = data[end + 4 :]
            self.beginRequest(*head)
            self.allHeadersReceived()
            if self.length == 0:
                self.allContentReceived()
            else:
                self.setRawMode()
            transport: Any = self.transport
            if self.closingEarly or self._lost or transport is None or transport.disconnecting:
                # As Twisted's parser: nothing more is read.
                return b""
            if not (data and self.headReady()):
                return data

    def allContentReceived(self) -> None:
        # However the body ended (the last bytes may have come with the
        # headers), the next request must not read into this one's sink.
        # (A GET has neither: no calls.)
        if (
            self._directSink is not None
            or self._directPending
            or self._directView is not None
            or self._directReadAt is not None
        ):
            self._stopDirectReads()
        if self._bodyWatch is not None or self._bodyPausedSince is not None:
            self._stopBodyWatch()
        if self.closingEarly:
            return
        super().allContentReceived()

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self._lost = True
        self._head = None
        # Bytes read into a body buffer count before the sink hears of the loss.
        self._flushDirect()
        self._directReadAt = None
        metrics = getattr(getattr(self, "site", None), "metrics", None)
        if metrics is not None:
            metrics.connectionClosed(self.site.name)
        self._cancelHeadDeadline()
        self._stopBodyWatch()
        self._directSink = None
        self._directBody = None
        hooks, self._closeHooks = self._closeHooks, []
        try:
            super().connectionLost(reason)
        finally:
            for hook in hooks:
                try:
                    hook()
                except Exception:
                    log.failure("Connection close hook failed")


def connectionOf(request: IRequest | http.Request) -> IConnection:
    """
    @return: The connection C{request} came on, as its handlers see it.
    @raise TypeError: For a request not made by an L{imageio.web.ImageioSite}
        connection.
    """
    channel = request.channel  # type: ignore[union-attr]
    if isinstance(channel, ImageioChannel):
        return channel
    raise TypeError(f"Not a connection of an imageio site: {channel!r}")


@implementer(IPushProducer)
@define
class _BodyProducer:
    """
    The connection's transport as the producer of a request body, telling
    the channel when reading is paused (the body rate watch does not count
    that time against the client).
    """

    channel: ImageioChannel
    transport: IPushProducer

    def pauseProducing(self) -> None:
        self.channel.bodyPaused(True)
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.channel.bodyPaused(False)
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()


def pushProducerOf(request: http.Request) -> IPushProducer:
    """
    @return: The producer that pauses reading from the client: the
        connection's transport.
    """
    transport: Any = request.channel.transport
    channel = request.channel
    if isinstance(channel, ImageioChannel):
        return _BodyProducer(channel, transport)
    result: IPushProducer = transport
    return result
