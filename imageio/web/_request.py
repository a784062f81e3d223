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
import time
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IRequest
from zope.interface import implementer

from imageio._log import Logger
from imageio.interfaces import IBodySink, IExchange, IStreamingUpload
from imageio.web._redact import redactPath
from imageio.web._response import (
    INTERNAL_ERROR,
    SERVER,
    HTTPError,
    abortConnection,
    httpErrorFor,
    sendHTTPError,
    sendInternalError,
)
from imageio.web._sinks import MAX_SMALL_BODY, CollectSink, DiscardSink, tooLarge
from imageio.web._twisted_http import (
    HTTPChannelSeam,
    headerValues,
    requestGone,
    setSafeHeaders,
    writeFirst,
)

log = Logger()


@implementer(IExchange)
class StreamingRequest(server.Request):
    """
    A request whose body may stream to the resource's sink.

    @ivar bodySink: The sink the resource chose, or C{None} when
        twisted.web buffers the body.
    @ivar respondedEarly: The request was answered before its body was
        read; the channel is closing.
    @ivar pending: See L{IExchange.pending}.
    @ivar started: Monotonic time the headers completed, for access logs.
    """

    bodySink: IBodySink | None = None
    respondedEarly: bool = False
    pending: object = None
    started: float = 0.0
    #: Body bytes handed to us by twisted.web (not those read directly
    #: into an upload sink's buffers, which the sink counts).
    contentReceived: int = 0
    _earlyError: HTTPError | None = None

    def gotLength(self, length: int | None) -> None:
        self.started = time.monotonic()
        try:
            resource = self._earlyResource()
            if resource is not None:
                self.bodySink = IStreamingUpload(resource).bodySink(self, length)
        except HTTPError as e:
            self.bodySink = DiscardSink()
            self._earlyError = e
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
        progress = getattr(self.channel, "bodyProgress", None)
        if progress is not None:
            progress(len(data))
        if self.bodySink is None:
            super().handleContentChunk(data)
        else:
            self.bodySink.dataReceived(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        Twisted's C{requestReceived} without its form parsing: a body never
        reaches C{content} here (it went to the sink, see L{gotLength}), so
        there is no C{POST} form to parse into C{args}.
        """
        if self.respondedEarly:
            return
        if self.bodySink is not None:
            self.bodySink.bodyComplete()
        self.method, self.uri = command, path
        self.clientproto = version
        if b"?" in path:
            self.path, query = path.split(b"?", 1)
            self.args = http.parse_qs(query, 1)
        else:
            self.path = path
            self.args = {}
        self.process()

    def parseCookies(self) -> None:
        # The images API uses no cookies; parsed when sent, as Twisted does.
        if headerValues(self.requestHeaders, b"Cookie") is not None:
            super().parseCookies()

    def write(self, data: bytes) -> None:
        """
        Twisted's C{write}; the first write of a response that has its
        C{Content-Length} and C{Content-Type} (a small read, an error, JSON)
        skips its header lookups (see L{writeFirst}).
        """
        if self.startedWriting or not writeFirst(self, data):
            super().write(data)

    def connectionLost(self, reason: Failure) -> None:
        if self.bodySink is not None:
            self.bodySink.connectionLost(reason)
        super().connectionLost(reason)

    def process(self) -> None:
        """
        Twisted's C{process}, without what the images API never uses: one
        C{Server} header (ours) instead of two, the C{Date} text made once a
        second, and no content-encoding wrapper (our resources offer none).
        The resource is still found by the site's resource tree.
        """
        if self.path == b"*":
            # Twisted's own answer to C{OPTIONS *}.
            super().process()
            return
        channel: Any = self.channel
        self.site = site = channel.site
        setSafeHeaders(self.responseHeaders, {b"Server": [SERVER], b"Date": [_httpDate()]})
        self.prepath = []
        self.postpath = _segments(self.path)
        try:
            self.render(site.getResourceFor(self))
        except BaseException:
            self.processingFailed(Failure())

    def processingFailed(self, reason: Failure) -> None:
        """
        An exception escaped C{render}: log it, answer 500 without details.
        """
        log.failure(
            "Request {method} {path} failed", reason, method=self.method, path=redactPath(self.uri)
        )
        if not self.finished and not requestGone(self):
            if self.startedWriting:
                abortConnection(self)
            else:
                sendInternalError(self)

    # Early responses

    def takeEarlyError(self) -> HTTPError | None:
        """
        @return: The answer C{bodySink} chose instead of reading the body,
            once; or C{None}.
        """
        error, self._earlyError = self._earlyError, None
        return error

    @property
    def refusedFromHeaders(self) -> bool:
        """
        The request will be answered from its headers (no C{100 Continue}).
        """
        return self._earlyError is not None

    def respondEarly(self, error: Exception) -> None:
        """
        Answer before the body has been read, then close the connection.

        Twisted sets the request line fields only once the body is complete,
        so they are filled here from the channel.
        """
        if self.respondedEarly or self.finished or requestGone(self):
            return
        mapped = httpErrorFor(error)
        if mapped is None:
            log.failure("Request failed", Failure(error))
            mapped = HTTPError(500, INTERNAL_ERROR)
        channel: Any = self.channel
        if not isinstance(self.method, bytes) or not self.method.isalpha():
            line = channel.requestLine() if isinstance(channel, HTTPChannelSeam) else None
            self.method, self.uri, self.clientproto = line or (b"GET", b"/", b"HTTP/1.1")
            self.path = self.uri.split(b"?", 1)[0]
        self.respondedEarly = True
        channel.closingEarly = True
        self.setHeader(b"server", SERVER)
        sendHTTPError(self, HTTPError(mapped.status, mapped.message, mapped.headers, close=True))
        sink = self.bodySink
        if sink is not None:
            # The rest of the body will never be read, and the finished
            # request has left the channel's queue, so the channel will not
            # tell the sink when the connection closes: tell it now.
            sink.connectionLost(Failure(ConnectionDone("Answered before the body was read")))

    def _earlyResource(self) -> Any:
        channel = self.channel
        # No request line on HTTP/2 streams, which then fall back to
        # buffering.
        line = channel.requestLine() if isinstance(channel, HTTPChannelSeam) else None
        if line is None or line[0] in (b"GET", b"HEAD", b"OPTIONS"):
            return None
        site: Any = channel.site  # type: ignore[attr-defined]
        # Twisted sets these again when the body is complete; resources and
        # sinks need them now.
        self.method, uri, self.clientproto = line
        self.uri = uri
        self.path = uri.split(b"?", 1)[0]
        self.args = http.parse_qs(uri.split(b"?", 1)[1], 1) if b"?" in uri else {}
        self.prepath = []
        self.postpath = _segments(self.path)
        try:
            resource = site.getResourceFor(self)
        finally:
            del self.prepath, self.postpath
        return resource if IStreamingUpload.providedBy(resource) else None


def _segments(path: bytes) -> list[bytes]:
    """
    @return: The unquoted segments of C{path} after its first C{/}, as
        Twisted makes C{postpath} (a segment without C{%} is itself).
    """
    segments = path[1:].split(b"/")
    if b"%" not in path:
        return segments
    return [unquote_to_bytes(s) if b"%" in s else s for s in segments]


_date: tuple[int, bytes] = (0, b"")


def _httpDate() -> bytes:
    """
    @return: The C{Date} header's value for now, formatted once a second.
    """
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, http.datetimeToString(now))
    return _date[1]


def exchangeOf(request: IRequest | http.Request) -> IExchange:
    """
    @return: C{request} as its handler's L{IExchange}.
    @raise TypeError: For a request not made by an L{imageio.web.ImageioSite}.
    """
    if isinstance(request, StreamingRequest):
        return request
    raise TypeError(f"Not a request of an imageio site: {request!r}")
