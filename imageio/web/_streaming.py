# -*- test-case-name: tests.test_streaming -*-
"""
Streaming requests: request bodies go to a sink as they arrive instead of
being spooled to a temporary file before C{render} runs.

twisted.web has no public API for this (twisted/twisted#10190), so
L{StreamingRequest} overrides the request methods the channel calls
(C{gotLength}, C{handleContentChunk}, C{requestReceived},
C{connectionLost}) and finds the target resource early, as soon as the
headers are in. A resource that provides L{IStreamingUpload} returns an
L{IBodySink}; others get twisted.web's usual buffering.

A resource may also refuse a request before its body: L{HTTPError} from
C{bodySink} is answered at once (instead of Twisted's automatic
C{100 Continue}) and the connection closed, so a 100 GiB upload with a bad
ticket is not read.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IHalfCloseableProtocol, IPushProducer
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource
from twisted.web.server import unquote  # type: ignore[attr-defined]
from zope.interface import implementer

from imageio import _log
from imageio._log import Logger
from imageio.interfaces import (
    IBodySink,
    IDirectBodySink,
    IDirectReader,
    IDirectReadTransport,
    IStreamingUpload,
)
from imageio.interfaces import IMetrics as Metrics  # issue 11 phase 2: spell it IMetrics
from imageio.web._response import (
    INTERNAL_ERROR,
    SERVER,
    HTTPError,
    abortConnection,
    sendHTTPError,
    sendInternalError,
)

log = Logger()

#: Longest request line; upstream answers 414 above 4096 bytes.
MAX_REQUEST_LINE = 4096

#: Bodies of requests whose resource does not stream them (JSON messages,
#: and bodies sent with GET, HEAD or OPTIONS) are collected in memory up to
#: this size; larger ones get 413 and the connection closes. Nothing is ever
#: spooled to twisted.web's temporary file.
MAX_SMALL_BODY = 64 * 1024

# Ticket ids are credentials: access logs show a prefix only.
_SECRET_PATH = re.compile(rb"^(/(?:images|tickets|sessions)/)([^/?]{8})[^/?]*")
_SECRET_ID = re.compile(rb"^(/(?:images|tickets|sessions)/)([^/?]+)")


def redactPath(path: bytes) -> str:
    """
    @return: C{path} with the ticket or session id shortened and the query
        dropped (C{session_id} may be in it), for logs.
    """
    path = path.split(b"?", 1)[0]
    return _SECRET_PATH.sub(rb"\1\2...", path).decode("ascii", "replace")


@implementer(IBodySink)
@define
class DiscardSink:
    """
    Drops a body, counting it: for requests refused before their body.
    """

    received: int = 0
    complete: bool = False

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)

    def bodyComplete(self) -> None:
        self.complete = True

    def connectionLost(self, reason: Failure) -> None:
        pass


@implementer(IBodySink)
@define
class CollectSink:
    """
    Collects a small body (JSON) in memory, up to C{limit} bytes; beyond
    that the request is refused with 413 and the connection closed.
    """

    request: StreamingRequest
    limit: int
    _data: list[bytes] = field(factory=list, init=False)
    _size: int = field(default=0, init=False)

    @property
    def data(self) -> bytes:
        return b"".join(self._data)

    def dataReceived(self, data: bytes) -> None:
        if self.request.respondedEarly:
            return
        self._size += len(data)
        if self._size > self.limit:
            self._data.clear()
            self.request.respondEarly(tooLarge(self.limit))
            return
        self._data.append(data)

    def bodyComplete(self) -> None:
        pass

    def connectionLost(self, reason: Failure) -> None:
        self._data.clear()


def tooLarge(limit: int) -> HTTPError:
    return HTTPError(413, f"Request body too large: limit is {limit} bytes", close=True)


class StreamingRequest(server.Request):
    """
    A request whose body may stream to the resource's sink.

    @ivar bodySink: The sink the resource chose, or C{None} when
        twisted.web buffers the body.
    @ivar respondedEarly: The request was answered before its body was
        read; the channel is closing.
    @ivar started: Monotonic time the headers completed, for access logs.
    """

    bodySink: IBodySink | None = None
    respondedEarly: bool = False
    started: float = 0.0
    #: Body bytes handed to us by twisted.web (not those read directly
    #: into an upload sink's buffers, which the sink counts).
    contentReceived: int = 0

    def gotLength(self, length: int | None) -> None:
        self.started = time.monotonic()
        try:
            resource = self._earlyResource()
            if resource is not None:
                self.bodySink = IStreamingUpload(resource).bodySink(self, length)
        except HTTPError as e:
            self.bodySink = DiscardSink()
            self._earlyError: HTTPError | None = e
        except Exception:
            log.failure("Preparing the request body failed")
            self.bodySink = DiscardSink()
            self._earlyError = HTTPError(500, INTERNAL_ERROR, close=True)
        if self.bodySink is None and length != 0:
            # No streaming resource: never twisted.web's spooling (a
            # temporary file, written on the reactor, without a limit).
            if length is not None and length > MAX_SMALL_BODY:
                self.bodySink = DiscardSink()
                self._earlyError = tooLarge(MAX_SMALL_BODY)
            else:
                self.bodySink = CollectSink(self, MAX_SMALL_BODY)
        # render() sees an empty body; a collected one is in the sink.
        self.content = io.BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        self.contentReceived += len(data)
        if self.respondedEarly:
            return
        channel = self.channel
        if isinstance(channel, ImageioChannel):
            channel.bodyProgress(len(data))
        if self.bodySink is None:
            super().handleContentChunk(data)
        else:
            self.bodySink.dataReceived(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.respondedEarly:
            return
        if self.bodySink is not None:
            self.bodySink.bodyComplete()
        super().requestReceived(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        if self.bodySink is not None:
            self.bodySink.connectionLost(reason)
        super().connectionLost(reason)

    def render(self, resrc: IResource) -> None:
        self.setHeader(b"server", SERVER)
        super().render(resrc)

    def processingFailed(self, reason: Failure) -> None:
        """
        An exception escaped C{render}: log it, answer 500 without details.
        """
        log.failure(
            "Request {method} {path} failed", reason, method=self.method, path=redactPath(self.uri)
        )
        if not self.finished and not self._disconnected:
            if self.startedWriting:
                abortConnection(self)
            else:
                sendInternalError(self)

    # Early responses

    def takeEarlyError(self) -> HTTPError | None:
        error: HTTPError | None = getattr(self, "_earlyError", None)
        self._earlyError = None
        return error

    def respondEarly(self, error: HTTPError) -> None:
        """
        Answer before the body has been read, then close the connection.

        Twisted sets the request line fields only once the body is complete,
        so they are filled here from the channel.
        """
        if self.respondedEarly or self.finished or self._disconnected:
            return
        channel: Any = self.channel
        if not isinstance(self.method, bytes) or not self.method.isalpha():
            self.method = getattr(channel, "_command", b"GET")
            self.uri = getattr(channel, "_path", b"/")
            self.path = self.uri.split(b"?", 1)[0]
            self.clientproto = getattr(channel, "_version", b"HTTP/1.1")
        self.respondedEarly = True
        channel.closingEarly = True
        self.setHeader(b"server", SERVER)
        sendHTTPError(self, HTTPError(error.status, error.message, error.headers, close=True))
        sink = self.bodySink
        if sink is not None:
            # The rest of the body will never be read, and the finished
            # request has left the channel's queue, so the channel will not
            # tell the sink when the connection closes: tell it now.
            sink.connectionLost(Failure(ConnectionDone("Answered before the body was read")))

    def _earlyResource(self) -> Any:
        # Private HTTPChannel attributes, pinned by a test; missing on HTTP/2
        # streams, which then fall back to buffering.
        method = getattr(self.channel, "_command", None)
        uri = getattr(self.channel, "_path", None)
        if method in (None, b"GET", b"HEAD", b"OPTIONS") or uri is None:
            return None
        site: Any = self.channel.site  # type: ignore[attr-defined]
        # Twisted sets these again when the body is complete; resources and
        # sinks need them now.
        self.method, self.uri = method, uri
        self.path = uri.split(b"?", 1)[0]
        self.clientproto = getattr(self.channel, "_version", b"HTTP/1.1")
        self.args = http.parse_qs(uri.split(b"?", 1)[1], 1) if b"?" in uri else {}
        self.prepath = []
        self.postpath = [unquote(s) for s in self.path[1:].split(b"/")]
        try:
            resource = site.getResourceFor(self)
        finally:
            del self.prepath, self.postpath
        return resource if IStreamingUpload.providedBy(resource) else None


#: Bytes a socket transport hands the kernel per send, and asks of it per
#: recv. Twisted's defaults (128 KiB sends, 64 KiB reads) cost one reactor
#: iteration per 64-128 KiB: about 16,000 per GiB moved. Image transfers
#: move megabytes per request; memoryview slicing keeps larger sends free of
#: copies, and the producer pause threshold (the same bufferSize) stays far
#: below our 8 MiB buffers.
SEND_LIMIT = 1024 * 1024
RECV_SIZE = 256 * 1024


def _tuneTransport(transport: Any) -> None:
    """
    Raise the send and receive sizes of the socket transport under
    C{transport} (which may be a TLS wrapper).
    """
    for _ in range(3):
        if transport is None:
            return
        if hasattr(transport, "SEND_LIMIT") and hasattr(transport, "socket"):
            transport.SEND_LIMIT = SEND_LIMIT
            transport.bufferSize = RECV_SIZE
            return
        transport = getattr(transport, "transport", None)


@implementer(IDirectReader, IHalfCloseableProtocol)
class ImageioChannel(http.HTTPChannel):
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
    # The body rate watch of the request whose body is arriving.
    _bodyWatch: IDelayedCall | None = None
    _bodyStarted = 0.0
    _bodyReceived = 0
    _bodyPaused = 0.0
    _bodyPausedSince: float | None = None

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
        if self.closingEarly or self._handlingRequest:
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
        if self._abortingCall is None and self.abortTimeout is not None:  # type: ignore[has-type]
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)  # type: ignore[attr-defined]

    def connectionMade(self) -> None:
        super().connectionMade()
        _tuneTransport(self.transport)
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
        self.readClosed = True
        self._closeIfDone()

    def writeConnectionLost(self) -> None:
        self.loseConnection()

    def _closeIfDone(self) -> None:
        transport: Any = self.transport
        if transport is None or getattr(transport, "disconnecting", False):
            return
        if not self._handlingRequest:
            self.loseConnection()

    def requestDone(self, request: http.Request) -> None:
        persistent = self.persistent
        super().requestDone(request)
        if self.readClosed and persistent:
            # Pipelined requests that arrived complete are being answered;
            # once none is left, close.
            self._closeIfDone()

    def addCloseHook(self, hook: Callable[[], object]) -> None:
        """
        Call C{hook} when the connection closes.
        """
        self._closeHooks.append(hook)

    def setIdleTimeout(self, seconds: float | None) -> None:
        """
        Change the inactivity timeout, effective now if the connection is
        idle or once the request being processed completes.
        """
        if self._handlingRequest:
            self._savedTimeOut = seconds
        else:
            self.setTimeout(seconds)

    def lineReceived(self, line: bytes) -> None:
        if self._HTTPChannel__first_line and len(line) > MAX_REQUEST_LINE:  # type: ignore[attr-defined]
            self._respondToStatus(414, b"Request-URI Too Long")
            return
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._HTTPChannel__first_line:  # type: ignore[attr-defined]
            self._respondToStatus(414, b"Request-URI Too Long")
        else:
            self._respondToStatus(431, b"Request Header Fields Too Large")

    def _respondToBadRequestAndDisconnect(self) -> None:
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

    def _send100Continue(self) -> None:
        # A request refused from its headers gets its final status instead
        # (RFC 9110 10.1.1), so the client does not start sending the body.
        request = self.requests[-1] if self.requests else None
        if getattr(request, "_earlyError", None) is not None:
            return
        super()._send100Continue()  # type: ignore[misc]

    def allHeadersReceived(self) -> None:
        self._cancelHeadDeadline()
        super().allHeadersReceived()
        request = self.requests[-1] if self.requests else None
        if isinstance(request, StreamingRequest):
            error = request.takeEarlyError()
            if error is not None:
                request.respondEarly(error)
            else:
                self._startDirectReads(request)
                self._startBodyWatch()

    # Request bodies read straight into the sink's buffers (IDirectReader):
    # the transport reads with recv_into (or decrypts) into the upload
    # buffer instead of handing us bytes to copy. Only Content-Length
    # bodies; twisted.web's decoder is told the bytes arrived.

    _directSink: IDirectBodySink | None = None

    def _startDirectReads(self, request: StreamingRequest) -> None:
        sink = request.bodySink
        decoder = self._transferDecoder  # type: ignore[has-type]
        if (
            IDirectBodySink.providedBy(sink)
            and IDirectReadTransport.providedBy(self.transport)
            and isinstance(decoder, http._IdentityTransferDecoder)  # type: ignore[attr-defined]
            and decoder.contentLength
        ):
            self._directSink = sink
            IDirectReadTransport(self.transport).setDirectReader(self)

    def _stopDirectReads(self) -> None:
        if self._directSink is not None:
            self._directSink = None
            transport = IDirectReadTransport(self.transport, None)
            if transport is not None:
                transport.setDirectReader(None)

    def readBuffer(self) -> memoryview | None:
        decoder = self._transferDecoder  # type: ignore[has-type]
        if (
            self._directSink is None
            or self.closingEarly
            or decoder is None
            or decoder.dataCallback is None
            or not decoder.contentLength
        ):
            self._stopDirectReads()
            return None
        view = self._directSink.bodyBuffer()
        if view is None:
            return None
        return view[: decoder.contentLength]

    def bufferFilled(self, n: int) -> None:
        assert self._directSink is not None
        self.resetTimeout()
        self._bodyReceived += n
        decoder: Any = self._transferDecoder  # type: ignore[has-type]
        decoder.contentLength -= n
        self._directSink.bodyFilled(n)
        if decoder.contentLength == 0:
            # What the decoder does at the end of a body.
            self._stopDirectReads()
            finish = decoder.finishCallback
            decoder.dataCallback = decoder.finishCallback = None
            finish(b"")

    def dataReceived(self, data: bytes) -> None:
        if self.closingEarly:
            return
        if data and self._HTTPChannel__first_line and not self._handlingRequest:  # type: ignore[attr-defined]
            self._startHeadDeadline()
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        # However the body ended (the last bytes may have come with the
        # headers), the next request must not read into this one's sink.
        self._stopDirectReads()
        self._stopBodyWatch()
        if self.closingEarly:
            return
        super().allContentReceived()

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        metrics = getattr(getattr(self, "site", None), "metrics", None)
        if metrics is not None:
            metrics.connectionClosed(self.site.name)
        self._cancelHeadDeadline()
        self._stopBodyWatch()
        self._directSink = None
        hooks, self._closeHooks = self._closeHooks, []
        try:
            super().connectionLost(reason)
        finally:
            for hook in hooks:
                try:
                    hook()
                except Exception:
                    log.failure("Connection close hook failed")


class ImageioSite(server.Site):
    """
    A site with streaming requests, per-connection contexts and access logs
    through twisted.logger with secrets redacted.

    @ivar accessLevel: Log level of access lines: C{debug} for the data
        listeners (thousands of requests a second), C{info} for control.
    """

    protocol = ImageioChannel  # type: ignore[assignment]
    requestFactory = StreamingRequest
    noisy = False
    accessLevel = "debug"
    #: Request bodies get this many seconds, then must arrive at
    #: C{bodyMinRate} bytes a second on average (0 disables either).
    bodyTimeout: float = 60
    bodyMinRate: float = 1024

    def __init__(
        self,
        resource: IResource,
        name: str,
        timeout: float = 60,
        metrics: Metrics | None = None,
        bodyTimeout: float = 60,
        bodyMinRate: float = 1024,
        **kw: Any,
    ) -> None:
        super().__init__(resource, requestFactory=StreamingRequest, timeout=timeout, **kw)
        self.name = name
        self.metrics = metrics
        self.bodyTimeout = bodyTimeout
        self.bodyMinRate = bodyMinRate

    def log(self, request: http.Request) -> None:
        sink = getattr(request, "bodySink", None)
        # Upload sinks count what they read directly; every other body
        # (PATCH, control PUT, refused uploads) went through
        # handleContentChunk.
        received: int = getattr(sink, "bytesWritten", None) or 0
        if not received:
            received = getattr(request, "contentReceived", 0)
        method = request.method.decode("ascii", "replace")
        if self.metrics is not None:
            self.metrics.requestDone(self.name, method, request.code, request.sentLength, received)
        level = LogLevel.info if self.accessLevel == "info" else LogLevel.debug
        # Refusals and failures are worth a line at the default level even
        # on the data listeners: an operator asking why a transfer failed.
        if request.code >= 500:
            level = LogLevel.error
        elif request.code >= 400:
            level = LogLevel.info
        if not _log.enabled(level):
            return
        started = getattr(request, "started", 0.0)
        elapsed = time.monotonic() - started if started else 0.0
        reason = getattr(request, "errorMessage", None)
        log.emit(
            level,
            "{site} {client} {method} {path} {status} sent={sent} received={received} "
            "{elapsed:.3f}s" + (": {reason}" if reason else ""),
            reason=_redactMessage(reason, request.uri) if reason else None,
            site=self.name,
            client=_client(request),
            method=method,
            path=redactPath(request.uri),
            status=request.code,
            sent=request.sentLength,
            received=received,
            elapsed=elapsed,
        )


def _redactMessage(message: str, uri: bytes) -> str:
    """
    @return: An error message for the log with the request's ticket or
        session id shortened, as L{redactPath} shortens it in the path.
    """
    match = _SECRET_ID.match(uri.split(b"?", 1)[0])
    if match is None or len(match.group(2)) <= 8:
        return message
    secret = unquote(match.group(2)).decode("utf-8", "replace")
    return message.replace(secret, secret[:8] + "...")


def _client(request: http.Request) -> str:
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    return str(host) if host else "local"


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
