# -*- test-case-name: tests.test_twisted_seams -*-
"""
Quarantine for the Twisted internals of the HTTP channel/request/decoder
seam.

twisted.web has no public API for streaming request bodies
(twisted/twisted#10190), for answering before a body is read, or for
reading a body straight into a buffer. L{imageio.web._channel} and
L{imageio.web._request} need a little of C{HTTPChannel}'s and C{Request}'s
private state for that. Every private name involved is used here and only
here, behind public names, and each is pinned by C{tests.test_twisted_seams}:

  - C{HTTPChannel._HTTPChannel__first_line}: true until the request line
    of the next request arrived;
  - C{HTTPChannel._command}, C{_path}, C{_version}: the request line,
    set once it arrived, deleted once the body is complete;
  - C{HTTPChannel._handlingRequest}: a complete request is being answered;
  - C{HTTPChannel._savedTimeOut}: the idle timeout restored after that;
  - C{HTTPChannel._abortingCall}: the abort that follows a
    C{loseConnection} the client does not complete;
  - C{HTTPChannel._send100Continue()}: the automatic C{100 Continue};
  - C{HTTPChannel._respondToBadRequestAndDisconnect()}: Twisted's own 400;
  - C{HTTPChannel._transferDecoder} and C{http._IdentityTransferDecoder}
    (its C{contentLength}, C{dataCallback}): the Content-Length framing
    of the body being received, reached only through L{IdentityBody};
  - C{Request._disconnected}: the client went away;
  - C{Headers._rawHeaders}: the header dict, keyed by canonical names
    (C{Content-Length}), for response headers we set without Twisted's
    per-name encoding and per-value sanitizing (L{setSafeHeaders}), and
    for request headers parsed in one pass (L{HTTPChannelSeam.beginRequest});
  - C{server.Request._encoder}, C{_inFakeHead}: a content encoding, and
    a C{HEAD} answered as a C{GET}, which L{writeFirst} leaves to Twisted;
  - C{LineReceiver._busyReceiving}: the channel's line parser is inside its
    own loop (a head taken in one pass must not overtake bytes it holds);
  - C{HTTPChannel._dataBuffer}, C{_waitingForTransport},
    C{_networkProducer}: the bytes that arrived while a request was being
    answered, whether the transport is full, and the producer reading the
    client, for C{requestDone} (L{HTTPChannelSeam.requestDone}).

Body framing stays Twisted's: a body read directly into a sink's buffer is
counted off the decoder's C{contentLength} exactly as the decoder itself
counts a chunk that is not the last one, and the last byte of every body
goes through the decoder, whose own end-of-body path then runs
(C{finishCallback}, and the next request is parsed from what follows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.web import http
from twisted.web.http_headers import Headers
from twisted.web.iweb import INonQueuedRequestFactory

if TYPE_CHECKING:
    from twisted.web import server

#: The private names this module touches, by the Twisted class that
#: defines them (for the pinning tests). Instance attributes are pinned
#: on a live channel by the tests.
PRIVATE_NAMES = (
    ("twisted.web.http.HTTPChannel", "_HTTPChannel__first_line"),
    ("twisted.web.http.HTTPChannel", "_command"),
    ("twisted.web.http.HTTPChannel", "_path"),
    ("twisted.web.http.HTTPChannel", "_version"),
    ("twisted.web.http.HTTPChannel", "_handlingRequest"),
    ("twisted.web.http.HTTPChannel", "_savedTimeOut"),
    ("twisted.web.http.HTTPChannel", "_abortingCall"),
    ("twisted.web.http.HTTPChannel", "_send100Continue"),
    ("twisted.web.http.HTTPChannel", "_respondToBadRequestAndDisconnect"),
    ("twisted.web.http.HTTPChannel", "_transferDecoder"),
    ("twisted.web.http", "_IdentityTransferDecoder"),
    ("twisted.web.http.Request", "_disconnected"),
    ("twisted.web.http_headers.Headers", "_rawHeaders"),
    ("twisted.protocols.basic.LineReceiver", "_busyReceiving"),
    ("twisted.web.server.Request", "_encoder"),
    ("twisted.web.server.Request", "_inFakeHead"),
    ("twisted.web.http.HTTPChannel", "_dataBuffer"),
    ("twisted.web.http.HTTPChannel", "_waitingForTransport"),
    ("twisted.web.http.HTTPChannel", "_networkProducer"),
)

_IdentityTransferDecoder: type = http._IdentityTransferDecoder  # type: ignore[attr-defined]


class IdentityBody:
    """
    The Content-Length body a channel is receiving, for reads that bypass
    Twisted's decoder. Twisted still frames the body: L{consumed} never
    takes the last byte, which the decoder receives and ends the body with.
    """

    __slots__ = ("_decoder",)

    def __init__(self, decoder: Any) -> None:
        self._decoder = decoder

    def remaining(self) -> int:
        """
        @return: Body bytes not received yet (0 once the body ended).
        """
        decoder = self._decoder
        if decoder.dataCallback is None or decoder.contentLength is None:
            return 0
        length: int = decoder.contentLength
        return length

    def readable(self) -> int:
        """
        @return: How many bytes may be read directly now: all but the last
            byte of the body, which must reach the decoder.
        """
        return max(self.remaining() - 1, 0)

    def consumed(self, n: int) -> None:
        """
        C{n} body bytes were read directly, at most L{readable}: the
        decoder counts them as it counts a chunk before the last.

        @raise ValueError: For more than L{readable} (the decoder's state
            is left as it was).
        """
        if not 0 <= n <= self.readable():
            raise ValueError(f"{n} bytes read directly, {self.readable()} readable")
        self._decoder.contentLength -= n


def identityBody(channel: http.HTTPChannel) -> IdentityBody | None:
    """
    @return: The Content-Length body C{channel} is receiving, or C{None}
        (no body, a chunked one, or the body ended).
    """
    decoder = getattr(channel, "_transferDecoder", None)
    if isinstance(decoder, _IdentityTransferDecoder):
        body = IdentityBody(decoder)
        if body.remaining():
            return body
    return None


def requestGone(request: http.Request) -> bool:
    """
    @return: Whether the client of C{request} disconnected.
    """
    return bool(request._disconnected)


def setSafeHeaders(headers: Headers, values: dict[bytes, list[bytes]]) -> None:
    """
    Set response headers as C{headers.setRawHeaders} would, for names in
    Twisted's canonical form (C{b"Content-Length"}) and values we made
    ourselves from constants and numbers, which need no sanitizing: one
    dict update instead of about ten calls per header.

    @param values: Canonical name -> values, none containing CR or LF.
    """
    headers._rawHeaders.update(values)


def headerValues(headers: Headers, name: bytes) -> list[bytes] | None:
    """
    @param name: A header name in Twisted's canonical form.
    @return: C{headers.getRawHeaders(name)}, in one dict lookup.
    """
    values: list[bytes] | None = headers._rawHeaders.get(name)
    return values


#: Response codes without a body (Twisted's C{NO_BODY_CODES}).
_NO_BODY_CODES = frozenset(http.NO_BODY_CODES)


def writeFirst(request: server.Request, data: bytes) -> bool:
    """
    The first write of a response, as C{server.Request.write} and
    C{http.Request.write} do it, for the usual response: one that set its
    C{Content-Length} and C{Content-Type}, on a request that is not
    C{HEAD}, with no cookies, C{ETag}, C{Last-Modified}, content encoding
    or faked C{HEAD} (C{Request._encoder}, C{_inFakeHead}): the headers
    Twisted would look up (about ten calls each) are known to be set, so
    none is added, and the response is not chunked.

    @return: Whether it was written; if not, nothing was done, and
        Twisted's C{write} must write it.
    """
    raw = request.responseHeaders._rawHeaders
    if (
        b"Content-Length" not in raw
        or b"Content-Type" not in raw
        or request.finished
        or request._disconnected
        or request.method == b"HEAD"
        or request.code in _NO_BODY_CODES
        or request.cookies
        or request.etag is not None
        or request.lastModified is not None
        or request._encoder is not None
        or request._inFakeHead
    ):
        return False
    request.startedWriting = 1
    request.channel.writeHeaders(
        request.clientproto, b"%d" % (request.code,), request.code_message, request.responseHeaders
    )
    request.sentLength += len(data)
    if data:
        request.channel.write(data)
    return True


def rawHeaderItems(headers: Headers) -> Any:
    """
    @return: C{headers.getAllRawHeaders()}: (name, values) in the order
        set, without its iterator's calls.
    """
    return headers._rawHeaders.items()


def hasAnyHeader(headers: Headers, names: frozenset[bytes]) -> bool:
    """
    @param names: Header names in Twisted's canonical form.
    @return: Whether C{headers} has any of C{names}: one set operation
        instead of a C{hasHeader} call (and name encoding) per name.
    """
    return not headers._rawHeaders.keys().isdisjoint(names)


#: Request headers that change what L{HTTPChannelSeam.allHeadersReceived}
#: does, as Twisted spells them.
_HEAD_OPTIONS = frozenset({b"Cookie", b"Connection", b"Expect"})


class HTTPChannelSeam(http.HTTPChannel):
    """
    C{HTTPChannel} with the private state we use under public names, and
    public hooks for the private methods we override.
    """

    @property
    def readingRequestLine(self) -> bool:
        """
        The next bytes are (or start) a request line.
        """
        return bool(self._HTTPChannel__first_line)  # type: ignore[attr-defined]

    def requestLine(self) -> tuple[bytes, bytes, bytes] | None:
        """
        @return: Method, target and version of the request whose headers or
            body are arriving, or C{None} (no request line yet, or the
            request is complete and being answered).
        """
        command = getattr(self, "_command", None)
        if command is None:
            return None
        return command, self._path, self._version  # type: ignore[attr-defined]

    @property
    def handlingRequest(self) -> bool:
        """
        A complete request is being answered.
        """
        return bool(self._handlingRequest)

    # The idle timeout without a new timer per request. Twisted's
    # TimeoutMixin cancels its timer while a request is answered and makes
    # a new one after it (setTimeout(None), then setTimeout(saved)); here a
    # disabled timeout leaves the timer pending, to fire into nothing or be
    # pushed back when the timeout is set again. Same timeouts, one
    # DelayedCall.reset per request instead of a cancel and a callLater.

    _idleCall: Any = None

    def setTimeout(self, period: float | None) -> float | None:
        """
        Change the idle timeout, as C{TimeoutMixin.setTimeout}.

        @return: The previous timeout.
        """
        previous: float | None = self.timeOut
        self.timeOut = period  # type: ignore[assignment]
        if period is not None:
            call = self._idleCall
            if call is None:
                self._idleCall = self.callLater(period, self._idleTimedOut)  # type: ignore[attr-defined]
            else:
                call.reset(period)
        return previous

    def resetTimeout(self) -> None:
        """
        Restart the idle timeout, as C{TimeoutMixin.resetTimeout}.
        """
        call, period = self._idleCall, self.timeOut
        if call is not None and period is not None:
            call.reset(period)

    def _idleTimedOut(self) -> None:
        self._idleCall = None
        if self.timeOut is not None:
            self.timeoutConnection()

    def connectionLost(self, reason: Any = None) -> None:
        try:
            super().connectionLost(reason)
        finally:
            call, self._idleCall = self._idleCall, None
            if call is not None and call.active():
                call.cancel()

    def setIdleTimeout(self, seconds: float | None) -> None:
        """
        Change the inactivity timeout, effective now if the connection is
        idle, else once the request being answered completes (Twisted
        restores the saved timeout then).
        """
        if self._handlingRequest:
            self._savedTimeOut = seconds
        else:
            self.setTimeout(seconds)

    def abortLater(self) -> None:
        """
        Abort the connection if the client has not closed it within
        C{abortTimeout} (what C{loseConnection} after a response does).
        """
        if self._abortingCall is None and self.abortTimeout is not None:  # type: ignore[has-type]
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)  # type: ignore[attr-defined]

    # A request head parsed in one pass (imageio.web._head): the state
    # Twisted's line parser leaves after the blank line ending a head, up to
    # allHeadersReceived, which the caller then calls.

    def headReady(self) -> bool:
        """
        @return: Whether the next bytes received start a request head, with
            nothing of it buffered or being parsed by Twisted's line parser
            (and the connection open to more requests).
        """
        return bool(
            self.line_mode
            and self._HTTPChannel__first_line  # type: ignore[attr-defined]
            and not self._handlingRequest
            and not self._busyReceiving
            and not self.paused
            and self.persistent
        )

    def takeLineBuffer(self) -> bytes:
        """
        @return: The start of a request head Twisted's line parser holds
            (an incomplete request line), which it then no longer holds.
        """
        return self.clearLineBuffer()  # type: ignore[no-any-return]

    def beginRequest(
        self, method: bytes, target: bytes, version: bytes, headers: dict[bytes, list[bytes]]
    ) -> http.Request:
        """
        Start a request from a head parsed whole, as Twisted's line parser
        does from its request line and headers: the request is made and
        queued, the request line kept for L{requestLine} and
        C{allContentReceived}, the headers stored. Only when L{headReady}.

        @param headers: Canonical name -> values, checked as Twisted's
            C{headerReceived} checks them, and no body framing headers.
        """
        factory: Any = self.requestFactory
        if INonQueuedRequestFactory.providedBy(factory):
            request = factory(self)
        else:
            request = factory(self, len(self.requests))
        self.requests.append(request)
        self._HTTPChannel__first_line = 0
        self._command = method
        self._path = target
        self._version = version
        request.requestHeaders._rawHeaders.update(headers)
        return request  # type: ignore[no-any-return]

    def allHeadersReceived(self) -> None:
        """
        Twisted's, with its header lookups in one dict lookup each, and
        none for a request without C{Cookie}, C{Connection} and C{Expect}
        (nearly all): no cookie to parse, the connection persists on
        HTTP/1.1, nothing to continue.
        """
        request = self.requests[-1]
        version = self._version
        if request.requestHeaders._rawHeaders.keys().isdisjoint(_HEAD_OPTIONS):
            self.persistent = version == b"HTTP/1.1"
            request.gotLength(self.length)
            return
        request.parseCookies()
        self.persistent = self.checkPersistence(request, version)
        request.gotLength(self.length)
        # Expect: 100-continue gets Twisted's automatic answer.
        expect = headerValues(request.requestHeaders, b"Expect")
        if expect and expect[0].lower() == b"100-continue" and version == b"HTTP/1.1":
            self._send100Continue()

    def checkPersistence(self, request: http.Request, version: bytes) -> bool:
        """
        Twisted's: HTTP/1.1 connections persist unless the request's first
        C{Connection} header has a C{close} token (then the response says
        C{Connection: close}); earlier versions close.
        """
        if version != b"HTTP/1.1":
            return False
        connection = headerValues(request.requestHeaders, b"Connection")
        if connection and b"close" in [t.lower() for t in connection[0].split(b" ")]:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return True

    def identityBody(self) -> IdentityBody | None:
        """
        @return: See L{identityBody}.
        """
        return identityBody(self)

    def requestDone(self, request: http.Request) -> None:
        """
        Twisted's C{requestDone}, without its calls that do nothing for a
        request that is the first in line (C{Request.__eq__} is identity)
        on a persistent connection with nothing buffered meanwhile
        (C{setLineMode(b"")} only sets C{line_mode}).
        """
        requests = self.requests
        if not requests or request is not requests[0]:
            super().requestDone(request)
            return
        del requests[0]
        if not self._waitingForTransport:
            self._networkProducer.resumeProducing()
        if self.persistent:
            self._handlingRequest = False
            if self._savedTimeOut:
                self.setTimeout(self._savedTimeOut)
            buffered = self._dataBuffer
            if buffered:
                self._dataBuffer = []
                self.setLineMode(b"".join(buffered))
            else:
                self.line_mode = 1
        else:
            self.loseConnection()

    # Hooks

    def send100Continue(self) -> bool:
        """
        @return: Whether the automatic C{100 Continue} is sent for the
            request whose headers just arrived.
        """
        return True

    def _send100Continue(self) -> None:
        if self.send100Continue():
            super()._send100Continue()  # type: ignore[misc]

    def badRequest(self) -> None:
        """
        Twisted refused the request (bad request line, headers or
        Content-Length): answer 400 and disconnect.
        """
        super()._respondToBadRequestAndDisconnect()  # type: ignore[misc]

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.badRequest()
