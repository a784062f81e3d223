# -*- test-case-name: tests.test_proxy_relay -*-
"""
Streaming relays between a client of the proxy and a host daemon.

Image bytes pass through the proxy without being held: an upload's body
goes from the client connection through a L{Pipe} (the request's body sink)
into the daemon request (the pipe is its body producer); a download's body
goes from the daemon response through a L{ResponseRelay} into the client
response. Backpressure works end to end both ways: when the receiving
socket is full, the sending one stops being read. Memory per transfer is a
few socket buffers, whatever the image size.

Nothing is retried once a request body has started: a PUT is never
replayed. A daemon response that ends early aborts the client connection,
so the client never sees a short body as a complete one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from attrs import define, field
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseDone,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from imageio._log import Logger
from imageio.backends import RELAYED_HEADER
from imageio.backends.httpclient import (
    CACHED_CONNECTION_TIMEOUT,
    CONNECT_TIMEOUT,
    MAX_ERROR_TEXT,
    READ_TIMEOUT,
    ReadTimeout,
    VerifyingPolicy,
    Watchdog,
    collectBody,
    hostError,
    loadTrustRoot,
    makePool,
    networkErrors,
    remoteError,
)
from imageio.interfaces import IBodySink
from imageio.proxy._guard import GuardedEndpointFactory
from imageio.web import (
    INTERNAL_ERROR,
    HTTPError,
    abortConnection,
    connectionOf,
    exchangeOf,
    httpErrorFor,
    isGone,
    pushProducerOf,
    sendEmpty,
    sendHTTPError,
)

log = Logger()

#: Bytes an upload may bring before the daemon connection is ready; the
#: client is paused beyond this.
PIPE_HIGH_WATER = 1024 * 1024

#: Idle daemon connections kept for reuse, per daemon.
MAX_PERSISTENT_PER_HOST = 8

#: Downloads write to the client in pieces of about this size.
COALESCE_SIZE = 256 * 1024

#: Largest small daemon answer read (OPTIONS, PATCH, PUT bodies).
MAX_SMALL_RESPONSE = 64 * 1024


@define
class DaemonClient:
    """
    The proxy's HTTP client for daemons: one persistent pool shared by all
    clients, TLS verified against the daemon CA with host name checks.
    """

    reactor: Any
    agent: Agent
    pool: HTTPConnectionPool

    @classmethod
    def create(cls, reactor: Any, caFile: str, allowLoopback: bool = False) -> DaemonClient:
        """
        @param allowLoopback: Connect to daemons on loopback addresses;
            link-local, multicast and unspecified addresses are always
            refused (L{imageio.proxy._guard}).
        @raise ValueError: If C{caFile} is unusable.
        """
        pool = makePool(reactor, MAX_PERSISTENT_PER_HOST, CACHED_CONNECTION_TIMEOUT)
        endpoints = GuardedEndpointFactory(
            reactor, VerifyingPolicy(loadTrustRoot(caFile)), CONNECT_TIMEOUT, allowLoopback
        )
        agent = Agent.usingEndpointFactory(reactor, endpoints, pool=pool)
        return cls(reactor, agent, pool)

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Mapping[bytes, bytes],
        body: IBodyProducer | None = None,
        timeout: float | None = READ_TIMEOUT,
    ) -> Deferred[IResponse]:
        """
        Start a request.

        @param timeout: Seconds until the response headers must have
            arrived, or C{None} to wait as long as it takes (uploads start
            their own timer once the body is sent).
        """
        raw = Headers({b"cache-control": [b"no-cache"], RELAYED_HEADER: [b"1"]})
        for name, value in headers.items():
            raw.setRawHeaders(name, [value])
        d: Deferred[IResponse] = self.agent.request(method, url, raw, body)
        if timeout is not None:
            d.addTimeout(timeout, self.reactor)
        return d

    def close(self) -> Deferred[None]:
        d: Deferred[None] = self.pool.closeCachedConnections()
        return d


def relayError(reason: Failure, request: Request, what: str) -> None:
    """
    Answer a failed relay: the client gets the mapped error, or its
    connection is aborted if the response had started. Bugs are logged with
    their traceback; network trouble at info.
    """
    known = httpErrorFor(reason.value)
    if known is not None:
        e = known
    elif reason.check(*networkErrors()):
        e = _httpError(hostError(reason))
        log.info("{what} failed: {status} {message}", what=what, status=e.status, message=e.message)
    else:
        log.failure("{what} failed", reason, what=what)
        e = HTTPError(500, INTERNAL_ERROR, close=True)
    if isGone(request):
        return
    if request.startedWriting:
        abortConnection(request)
        return
    sendHTTPError(request, e)


def readError(response: IResponse) -> Deferred[HTTPError]:
    """
    @return: The daemon's error answer as an L{HTTPError} with its status
        and text.
    """
    d = collectBody(response, MAX_ERROR_TEXT, truncate=True)
    d.addErrback(lambda _: b"")
    return d.addCallback(lambda body: _httpError(remoteError(response, body)))


def _httpError(error: Exception) -> HTTPError:
    """
    @return: The answer for a daemon's error or a failure to reach it
        (L{imageio.web.httpErrorFor}).
    """
    mapped = httpErrorFor(error)
    assert mapped is not None, error
    return mapped


# Upload


@implementer(IBodySink, IBodyProducer)
class Pipe:
    """
    The body sink of a client's upload and the body producer of the daemon
    request: bytes go straight through.

    Until the daemon connection is ready, up to L{PIPE_HIGH_WATER} bytes
    wait here and then the client is paused. Afterwards the daemon
    connection's pause and resume reach the client connection, until the
    whole body arrived.

    @ivar length: The body length (C{Content-Length}), for the daemon
        request.
    @ivar bytesWritten: Body bytes received from the client (for the
        access log).
    @ivar complete: The whole body arrived.
    """

    def __init__(
        self,
        inbound: IPushProducer,
        length: int | None,
        onComplete: Callable[[], object] = lambda: None,
        onProgress: Callable[[], object] = lambda: None,
        onLost: Callable[[Failure], object] = lambda f: None,
        highWater: int = PIPE_HIGH_WATER,
    ) -> None:
        self.length: int | object = UNKNOWN_LENGTH if length is None else length
        self.bytesWritten = 0
        self.complete = False
        self._inbound = inbound
        self._onComplete = onComplete
        self._onProgress = onProgress
        self._onLost = onLost
        self._highWater = highWater
        self._consumer: IConsumer | None = None
        self._finished: Deferred[None] | None = None
        self._early: list[bytes] = []
        self._earlySize = 0
        self._pausedInbound = False
        self._abandoned = False
        self._lost: Failure | None = None

    # IBodySink: the client side

    def dataReceived(self, data: bytes) -> None:
        self.bytesWritten += len(data)
        if self._abandoned:
            return
        if self._consumer is None:
            self._early.append(data)
            self._earlySize += len(data)
            if self._earlySize >= self._highWater:
                self._pauseInbound()
        else:
            self._consumer.write(data)

    def bodyComplete(self) -> None:
        self.complete = True
        # The channel takes over reading from here (pipelined requests).
        self._resumeInbound()
        if self._finished is not None and not self._finished.called and not self._abandoned:
            self._finished.callback(None)
        self._onComplete()

    def connectionLost(self, reason: Failure) -> None:
        if self._lost is not None:
            return
        self._lost = reason
        self._early.clear()
        # The owner learns first, so that the failing daemon request is not
        # mistaken for a daemon fault.
        self._onLost(reason)
        if self._finished is not None and not self._finished.called and not self._abandoned:
            self._finished.errback(reason)

    def abandon(self) -> None:
        """
        The daemon request ended (answered or failed) before the body did:
        drop the rest of the body, and never fire the producer's Deferred.
        """
        self._abandoned = True
        self._early.clear()
        self._consumer = None

    # IBodyProducer: the daemon side

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._finished = Deferred()
        if self._lost is not None:
            self._finished.errback(self._lost)
            return self._finished
        if self._abandoned:
            return self._finished
        self._consumer = consumer
        early, self._early, self._earlySize = self._early, [], 0
        for chunk in early:
            consumer.write(chunk)
        if self.complete:
            self._finished.callback(None)
        elif self._consumer is not None:
            self._resumeInbound()
        return self._finished

    def pauseProducing(self) -> None:
        if not self.complete:
            self._pauseInbound()

    def resumeProducing(self) -> None:
        self._onProgress()
        if not self.complete and not self._abandoned:
            self._resumeInbound()

    def stopProducing(self) -> None:
        # The daemon connection went away; the upload's owner answers the
        # client (and closes its connection) when the request fails.
        self.abandon()

    def _pauseInbound(self) -> None:
        if not self._pausedInbound:
            self._pausedInbound = True
            self._inbound.pauseProducing()

    def _resumeInbound(self) -> None:
        if self._pausedInbound:
            self._pausedInbound = False
            self._inbound.resumeProducing()


@define(eq=False)
class UploadRelay:
    """
    One upload through the proxy: the L{Pipe}, the daemon request, and
    which of the two ends first.

    The daemon normally answers after the whole body; then the client gets
    the answer when its request is rendered (L{respond}). If the daemon
    answers or fails before the body is complete (403, refused
    connection), the client is answered at once and its connection closed,
    without reading the rest of the body.
    """

    request: Request
    clock: IReactorTime
    length: int
    readTimeout: float = READ_TIMEOUT
    pipe: Pipe = field(init=False)
    _outbound: Deferred[IResponse] | None = field(default=None, init=False)
    _outcome: IResponse | Failure | None = field(default=None, init=False)
    _waiter: Deferred[IResponse] | None = field(default=None, init=False)
    _early: bool = field(default=False, init=False)
    _timedOut: bool = field(default=False, init=False)
    _clientGone: bool = field(default=False, init=False)
    _watchdog: Watchdog = field(init=False)

    def __attrs_post_init__(self) -> None:
        self._watchdog = Watchdog(self.clock, self.readTimeout, self._expired)
        self.pipe = Pipe(
            pushProducerOf(self.request),
            self.length,
            onComplete=self._bodyComplete,
            onProgress=connectionOf(self.request).resetTimeout,
            onLost=self._clientLost,
        )

    def start(self, outbound: Deferred[IResponse]) -> None:
        """
        Follow the daemon request, whose body producer is L{pipe}.
        """
        self._outbound = outbound
        outbound.addBoth(self._responded)

    def respond(self) -> Deferred[None] | None:
        """
        Answer the client once the daemon answered (at render time: the
        body is complete).
        """
        if self._early:
            return None
        if self._outcome is not None:
            return self._answer(self._outcome)
        self._waiter = Deferred()
        return self._waiter.addBoth(self._answer)

    # Events

    def _bodyComplete(self) -> None:
        if self._outbound is not None:
            self._watchdog.kick()

    def _expired(self) -> None:
        self._timedOut = True
        if self._outbound is not None:
            self._outbound.cancel()

    def _clientLost(self, reason: Failure) -> None:
        # Abort the daemon request: a partial upload must not look complete.
        self._clientGone = True
        self._watchdog.stop()
        if self._outbound is not None:
            self._outbound.cancel()

    def _responded(self, result: IResponse | Failure) -> None:
        self._outbound = None
        self._watchdog.stop()
        if isinstance(result, Failure) and self._timedOut:
            result = Failure(ReadTimeout("Host did not answer the upload in time"))
        if not self.pipe.complete:
            self.pipe.abandon()
            self._early = True
            self._answer(result)
        elif self._waiter is not None:
            waiter, self._waiter = self._waiter, None
            waiter.callback(result)
        else:
            self._outcome = result

    # Answers

    def _answer(self, result: IResponse | Failure) -> Deferred[None]:
        if isinstance(result, Failure):
            mapped = httpErrorFor(result.value)
            if mapped is None and result.check(*networkErrors()):
                mapped = _httpError(hostError(result))
            self._send(mapped, result)
            return defer.succeed(None)
        response: IResponse = result
        if 200 <= response.code < 300:
            body = collectBody(response, MAX_SMALL_RESPONSE, truncate=True)
            return body.addBoth(lambda _: self._sendSuccess(response.code))
        return readError(response).addCallback(lambda e: self._send(e, None))

    def _sendSuccess(self, code: int) -> None:
        if self._clientGone or isGone(self.request):
            return
        if self._early:
            # The daemon cannot have taken a body we did not send.
            self._send(HTTPError(502, "Host answered before the upload completed"), None)
            return
        sendEmpty(self.request, code, [(b"cache-control", b"no-cache, no-store")])

    def _send(self, e: HTTPError | None, failure: Failure | None) -> None:
        if self._clientGone or isGone(self.request):
            log.debug("Upload relay ended: the client went away")
            return
        if e is None:
            log.failure("Upload relay failed", failure)
            e = HTTPError(500, INTERNAL_ERROR, close=True)
        elif failure is not None:
            log.info("Upload relay failed: {status} {message}", status=e.status, message=e.message)
        if self._early:
            exchangeOf(self.request).respondEarly(e)
        else:
            sendHTTPError(self.request, e)


# Download


@implementer(IPushProducer)
class ResponseRelay(Protocol):
    """
    Streams a daemon response body into the client response.

    It is the client response's producer: when the client socket is full
    the daemon connection stops being read, and when the client goes away
    the daemon connection is closed (never returned to the pool with a
    body half read). A daemon body that ends early, or a daemon or client
    silent for L{READ_TIMEOUT}, aborts the client connection.

    @ivar done: Fires when the client response finished, fails when it was
        cut.
    """

    def __init__(self, request: Request, clock: IReactorTime, timeout: float = READ_TIMEOUT):
        self.done: Deferred[None] = Deferred()
        self.received = 0
        self._request = request
        self._clock = clock
        self._stopped = False
        self._watchdog = Watchdog(clock, timeout, self._timedOut)
        # Pieces of at most 16 KiB (TLS records) are gathered and written
        # in fewer, larger writes: the client side encrypts and sends per
        # write.
        self._pending: list[bytes] = []
        self._pendingSize = 0
        self._flushCall: IDelayedCall | None = None

    # Protocol: the daemon side

    def connectionMade(self) -> None:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self._clientGone())
        self._watchdog.kick()

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        self.received += len(data)
        self._pending.append(data)
        self._pendingSize += len(data)
        if self._pendingSize >= COALESCE_SIZE:
            self._flush()
        elif self._flushCall is None:
            self._flushCall = self._clock.callLater(0, self._flush)
        self._watchdog.kick()

    def _flush(self) -> None:
        if self._flushCall is not None:
            if self._flushCall.active():
                self._flushCall.cancel()
            self._flushCall = None
        if not self._pending:
            return
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending = []
        self._pendingSize = 0
        if not self._stopped:
            self._request.write(data)

    def _dropPending(self) -> None:
        if self._flushCall is not None and self._flushCall.active():
            self._flushCall.cancel()
        self._flushCall = None
        self._pending = []
        self._pendingSize = 0

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._watchdog.stop()
        if self._stopped:
            self._dropPending()
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self._flush()
        else:
            self._dropPending()
        self._stopped = True
        if self._request.producer is self:
            self._request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            if not isGone(self._request):
                self._request.finish()
            self.done.callback(None)
        else:
            self._abortClient()
            self.done.errback(reason)

    # IPushProducer: the client side

    def pauseProducing(self) -> None:
        if not self._stopped:
            self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        if not self._stopped:
            self._watchdog.kick()
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        self._clientGone()

    # Internals

    def _clientGone(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._dropPending()
        self._watchdog.stop()
        self._stopDaemon()
        if not self.done.called:
            self.done.callback(None)

    def _timedOut(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._dropPending()
        self._stopDaemon()
        self._abortClient()
        self.done.errback(ReadTimeout(f"No progress for {self._watchdog.timeout} seconds"))

    def _stopDaemon(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def _abortClient(self) -> None:
        if self._request.producer is self:
            self._request.unregisterProducer()
        abortConnection(self._request)


#: Daemon response headers a download passes on.
RELAYED_HEADERS = (
    b"content-length",
    b"content-range",
    b"content-type",
    b"content-disposition",
    b"accept-ranges",
)


def startResponse(request: Request, response: IResponse, extra: Mapping[bytes, bytes] = {}) -> None:
    """
    Copy the daemon's status and the relayed headers to the client
    response.
    """
    request.setResponseCode(response.code)
    # Twisted's client keeps the framing header to itself.
    if isinstance(response.length, int):
        request.setHeader(b"content-length", b"%d" % response.length)
    for name in RELAYED_HEADERS:
        values = response.headers.getRawHeaders(name)
        if values:
            request.setHeader(name, values[0])
    for name, value in extra.items():
        request.setHeader(name, value)


__all__ = [
    "DaemonClient",
    "Pipe",
    "UploadRelay",
    "ResponseRelay",
    "startResponse",
    "relayError",
    "readError",
]
