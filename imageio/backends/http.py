# -*- test-case-name: tests.test_backend_http -*-
"""
The C{https:} (and C{http:}) backend: "proxy mode", where the image lives
behind another imageio daemon.

A ticket whose C{url} is C{https://host:54322/images/<id>} makes the
ordinary images listeners relay to that daemon: each L{IBackend} call
becomes one HTTP request (wire contract 3.4). Each backend (one per client
connection and ticket) has its own persistent connection pool, so requests
of one client reuse one TLS connection to the daemon.

TLS is verified against the configured CA file (the system trust store
when empty) with host name checks, TLS 1.2 at least. Connecting times out
after C{CONNECT_TIMEOUT} seconds, and a daemon that sends nothing for
C{READ_TIMEOUT} seconds is given up on (L{imageio.backends.httpclient}).

Errors keep their meaning for the client: a daemon's non-2xx answer fails
with a L{imageio.interfaces.RemoteError} carrying the daemon's status and
text, so a client of the proxy sees the daemon's 403 or 416; a daemon that
cannot be reached, times out or misbehaves is a
L{imageio.interfaces.HostError} (the web layer answers 503, 504, 502).

The HTTP client plumbing (TLS policy, timeouts, small-body collection,
error mapping, a body producer over a buffer) is
L{imageio.backends.httpclient}, shared with the signed-ticket proxy.
"""

from __future__ import annotations

import itertools
import json
from bisect import bisect_right
from collections.abc import Callable, Generator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from attrs import define, field
from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from imageio._log import Logger
from imageio.backends import RELAYED_HEADER, BackendContext
from imageio.backends._twisted_newclient import ResponseDone
from imageio.backends.httpclient import (
    CACHED_CONNECTION_TIMEOUT,
    MAX_ERROR_TEXT,
    READ_TIMEOUT,
    BadResponse,
    BodyTooLarge,
    BytesProducer,
    ReadTimeout,
    Watchdog,
    collectBody,
    discardBody,
    hostError,
    loadTrustRoot,
    loadTrustRootInPool,
    makeAgent,
    makePool,
    raiseRemoteError,
    stopTransport,
)
from imageio.interfaces import Extent, HostInvalid, IBackend, UnsupportedOperation
from imageio.ranges import parseJSONInteger

if TYPE_CHECKING:
    from twisted.web.client import Agent, HTTPConnectionPool

log = Logger()

T = TypeVar("T")

#: Largest OPTIONS answer read.
MAX_OPTIONS_BODY = 64 * 1024

#: Largest extents answer read: about a million extents.
MAX_EXTENTS_BODY = 64 * 1024**2

#: Most extents one C{extents} call returns (as the file backend); callers
#: ask again from the end of the last one.
MAX_EXTENTS = 10_000

#: Cached idle connections per backend: one operation runs at a time, so
#: one connection is in use; a second absorbs a late return to the pool.
CONNECTIONS_PER_BACKEND = 2

#: Advertised concurrency when the daemon does not say (upstream's default).
DEFAULT_MAX_CONNECTIONS = 1

#: Largest C{max_readers}/C{max_writers} believed from a daemon.
MAX_CONNECTIONS = 64


class _ReadInto(Protocol):
    """
    Delivers a response body straight into a buffer: no copy is kept.
    """

    def __init__(self, buf: memoryview, clock: IReactorTime, timeout: float) -> None:
        self.done: Deferred[int] = Deferred()
        self._buf = buf
        self._position = 0
        self._failed = False
        self._watchdog = Watchdog(clock, timeout, self._timedOut)

    def connectionMade(self) -> None:
        self._watchdog.kick()

    def dataReceived(self, data: bytes) -> None:
        if self._failed:
            return
        end = self._position + len(data)
        if end > len(self._buf):
            self._fail(BadResponse("Host sent more bytes than asked for"))
            return
        self._buf[self._position : end] = data
        self._position = end
        self._watchdog.kick()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._watchdog.stop()
        if self._failed:
            return
        self._failed = True
        if reason.check(ResponseDone):
            self.done.callback(self._position)
        else:
            self.done.errback(reason)

    def _timedOut(self) -> None:
        self._fail(ReadTimeout(f"Host sent nothing for {self._watchdog.timeout} seconds"))

    def _fail(self, exc: Exception) -> None:
        self._failed = True
        self._watchdog.stop()
        stopTransport(self)
        self.done.errback(exc)


# The backend


def _parseOptions(body: bytes) -> tuple[frozenset[str], int, int] | None:
    """
    @return: Features, max readers and max writers from an OPTIONS answer,
        or C{None} if it is not the JSON object we expect.
    """
    try:
        msg = json.loads(body, parse_int=parseJSONInteger)
    except ValueError:
        return None
    if not isinstance(msg, dict):
        return None
    features = msg.get("features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        return None
    return (
        frozenset(features),
        advertisedLimit(msg, "max_readers"),
        advertisedLimit(msg, "max_writers"),
    )


def advertisedLimit(msg: dict[str, Any], name: str) -> int:
    """
    @return: The C{max_readers} or C{max_writers} (C{name}) of a parsed
        C{OPTIONS} answer: the default when missing or not a positive
        integer, and at most L{MAX_CONNECTIONS}.
    """
    value = msg.get(name, DEFAULT_MAX_CONNECTIONS)
    if type(value) is not int or value < 1:
        return DEFAULT_MAX_CONNECTIONS
    return min(value, MAX_CONNECTIONS)


def parseExtents(body: bytes, context: str) -> list[Extent]:
    """
    Parse an extents answer, checking that the extents are contiguous from
    offset 0.

    @raise BadResponse: For anything else.
    """
    try:
        items = json.loads(body, parse_int=parseJSONInteger)
    except ValueError:
        raise BadResponse("extents are not JSON") from None
    if not isinstance(items, list):
        raise BadResponse("extents are not a list")
    extents: list[Extent] = []
    position = 0
    for item in items:
        if not isinstance(item, dict):
            raise BadResponse("extent is not an object")
        start, length = item.get("start"), item.get("length")
        zero, hole = item.get("zero", False), item.get("hole", False)
        dirty = item.get("dirty") if context == "dirty" else None
        if type(start) is not int or type(length) is not int or start != position or length < 0:
            raise BadResponse("extents are not contiguous")
        if type(zero) is not bool or type(hole) is not bool:
            raise BadResponse("invalid extent flags")
        if context == "dirty" and type(dirty) is not bool:
            raise BadResponse("invalid dirty flag")
        extents.append(Extent(start, length, zero=zero, hole=hole, dirty=dirty))
        position = start + length
    return extents


def clipExtents(
    extents: Sequence[Extent], start: int, length: int, limit: int | None = None
) -> list[Extent]:
    """
    @param extents: Contiguous extents, in order.
    @param limit: Most extents returned; the caller asks again from the end
        of the last one.
    @return: The parts of C{extents} within C{[start, start + length)}.
    """
    end = start + length
    clipped: list[Extent] = []
    # Found by bisection: asking for a map piece by piece must not scan it
    # from the start each time.
    index = max(0, bisect_right(extents, start, key=lambda e: e.start) - 1)
    for e in itertools.islice(extents, index, None):
        if e.start >= end or limit is not None and len(clipped) >= limit:
            break
        first, last = max(e.start, start), min(e.start + e.length, end)
        if first < last:
            clipped.append(Extent(first, last - first, zero=e.zero, hole=e.hole, dirty=e.dirty))
    return clipped


class BackendClosed(Exception):
    """
    An operation was asked of a backend after C{close()}.
    """


@implementer(IBackend)
@define(eq=False)
class HTTPBackend:
    """
    An image served by another daemon's images API.

    @ivar url: The image URL, C{https://host:port/images/<id>}.
    @ivar features: What the daemon's OPTIONS reported.
    @ivar bufferSize: Largest request body sent (zeroing without the
        C{zero} feature).
    """

    reactor: Any
    agent: Agent
    pool: HTTPConnectionPool
    url: bytes
    features: frozenset[str] = frozenset()
    maxReaders: int = DEFAULT_MAX_CONNECTIONS
    maxWriters: int = DEFAULT_MAX_CONNECTIONS
    bufferSize: int = 8 * 1024**2
    readTimeout: float = READ_TIMEOUT
    #: Runs CPU work off the reactor (parsing a daemon's extents answer,
    #: up to L{MAX_EXTENTS_BODY}); C{None} runs it in place.
    runInPool: Callable[..., Deferred[Any]] | None = None
    name: str = "http"
    blockSize: int = 1
    #: Mark requests as relayed (L{RELAYED_HEADER}): C{True} when a daemon
    #: relays a client's request, C{False} for a client of its own.
    relayed: bool = True
    _cachedSize: int | None = field(default=None, init=False)
    _zeroExtents: list[Extent] | None = field(default=None, init=False)
    _closed: bool = field(default=False, init=False)

    # Requests

    def _request(
        self,
        method: bytes,
        url: bytes,
        headers: dict[bytes, bytes] | None = None,
        body: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        raw = Headers({k: [v] for k, v in (headers or {}).items()})
        if self.relayed:
            raw.setRawHeaders(RELAYED_HEADER, [b"1"])
        d: Deferred[IResponse] = self.agent.request(method, url, raw, body)
        d.addTimeout(self.readTimeout, self.reactor)
        d.addErrback(lambda f: Failure(hostError(f)))
        return d

    def _subURL(self, suffix: str, query: str = "") -> bytes:
        parts = urlsplit(self.url.decode("ascii"))
        path = parts.path.rstrip("/") + suffix
        return urlunsplit((parts.scheme, parts.netloc, path, query, "")).encode("ascii")

    @inlineCallbacks
    def _expect(
        self, response: IResponse, codes: tuple[int, ...]
    ) -> Generator[Deferred[Any], Any, None]:
        if response.code not in codes:
            if 200 <= response.code < 300:
                discardBody(response)
                raise HostInvalid(f"Unexpected response from host: {response.code}", close=True)
            yield raiseRemoteError(response)

    @inlineCallbacks
    def _readSmall(self, response: IResponse, limit: int) -> Generator[Deferred[Any], Any, bytes]:
        try:
            body: bytes = yield collectBody(response, limit)
        except BodyTooLarge as e:
            raise HostInvalid(f"Invalid response from host: {e}") from None
        except Exception:
            raise hostError(Failure()) from None
        return body

    # IBackend

    def size(self) -> Deferred[int]:
        return self._run(self._getSize)

    def readInto(self, offset: int, buf: memoryview) -> Deferred[int]:
        return self._run(self._readInto, offset, buf)

    def write(self, offset: int, data: memoryview) -> Deferred[int]:
        return self._run(self._write, offset, data)

    def zero(self, offset: int, length: int) -> Deferred[None]:
        return self._run(self._zero, offset, length)

    def flush(self) -> Deferred[None]:
        return self._run(self._flush)

    def extents(self, context: str, start: int, length: int) -> Deferred[list[Extent]]:
        return self._run(self._extents, context, start, length)

    def _run(self, operation: Callable[..., Deferred[T]], *args: Any) -> Deferred[T]:
        """
        Start an operation, unless the backend is closed. An operation in
        flight when the backend is closed completes; then the connection it
        gave back to the pool is closed.
        """
        if self._closed:
            return defer.fail(BackendClosed("Backend http is closed"))

        def release(result: object) -> object:
            if self._closed:
                self.pool.closeCachedConnections()
            return result

        d = operation(*args)
        d.addBoth(release)
        return d

    @inlineCallbacks
    def _getSize(self) -> Generator[Deferred[Any], Any, int]:
        if self._cachedSize is not None:
            return self._cachedSize
        if "extents" in self.features:
            extents = yield self._zeroExtentsCached()
            size = extents[-1].start + extents[-1].length if extents else 0
        else:
            response = yield self._request(b"GET", self.url)
            if response.code != 200:
                yield self._expect(response, (200,))
            length = response.length
            discardBody(response)
            if not isinstance(length, int):
                raise HostInvalid("Invalid response from host: no Content-Length")
            size = length
        self._cachedSize = size
        return size

    @inlineCallbacks
    def _readInto(self, offset: int, buf: memoryview) -> Generator[Deferred[Any], Any, int]:
        size: int = yield self._getSize()
        length = min(len(buf), size - offset)
        if length <= 0:
            return 0
        headers = {b"range": b"bytes=%d-%d" % (offset, offset + length - 1)}
        response = yield self._request(b"GET", self.url, headers)
        yield self._expect(response, (206,))
        if response.length != length:
            discardBody(response)
            raise HostInvalid(
                f"Invalid response from host: expected {length} bytes, got {response.length}"
            )
        reader = _ReadInto(memoryview(buf).cast("B")[:length], self.reactor, self.readTimeout)
        response.deliverBody(reader)
        try:
            n = yield reader.done
        except Exception:
            raise hostError(Failure()) from None
        if n != length:
            raise HostInvalid(f"Invalid response from host: expected {length} bytes, got {n}")
        return length

    @inlineCallbacks
    def _write(self, offset: int, data: memoryview) -> Generator[Deferred[Any], Any, int]:
        producer = BytesProducer(data)
        n = producer.length
        yield self._put(offset, producer)
        return n

    @inlineCallbacks
    def _put(self, offset: int, producer: BytesProducer) -> Generator[Deferred[Any], Any, None]:
        n = producer.length
        query = "flush=n" if "flush" in self.features else ""
        headers = {b"content-type": b"application/octet-stream"}
        if n:
            headers[b"content-range"] = b"bytes %d-%d/*" % (offset, offset + n - 1)
        response = yield self._request(b"PUT", self._subURL("", query), headers, producer)
        yield self._expect(response, (200, 204))
        yield self._readSmall(response, MAX_ERROR_TEXT)
        self._wrote(offset, n)

    @inlineCallbacks
    def _zero(self, offset: int, length: int) -> Generator[Deferred[Any], Any, None]:
        if length == 0:
            return
        if "zero" in self.features:
            msg = {
                "op": "zero",
                "offset": offset,
                "size": length,
                "flush": "flush" not in self.features,
            }
            yield self._patch(msg)
            self._wrote(offset, length)
            return
        # Older daemons: write zeroes.
        zeroes = bytes(min(length, self.bufferSize))
        done = 0
        while done < length:
            step = min(len(zeroes), length - done)
            yield self._put(offset + done, BytesProducer(memoryview(zeroes)[:step]))
            done += step

    @inlineCallbacks
    def _flush(self) -> Generator[Deferred[Any], Any, None]:
        if "flush" in self.features:
            yield self._patch({"op": "flush"})

    @inlineCallbacks
    def _patch(self, msg: dict[str, object]) -> Generator[Deferred[Any], Any, None]:
        body = BytesProducer(json.dumps(msg).encode("utf-8"))
        headers = {b"content-type": b"application/json"}
        response = yield self._request(b"PATCH", self.url, headers, body)
        yield self._expect(response, (200, 204))
        yield self._readSmall(response, MAX_ERROR_TEXT)

    @inlineCallbacks
    def _extents(
        self, context: str, start: int, length: int
    ) -> Generator[Deferred[Any], Any, list[Extent]]:
        if context == "zero":
            if "extents" not in self.features:
                size = yield self._getSize()
                end = min(size, start + length)
                return [Extent(start, end - start, zero=False)] if end > start else []
            extents = yield self._zeroExtentsCached()
        elif context == "dirty":
            if "extents" not in self.features:
                raise UnsupportedOperation("Backend http does not support dirty extents")
            extents = yield self._fetchExtents("dirty")
        else:
            raise UnsupportedOperation(f"Backend http does not support {context} extents")
        return clipExtents(extents, start, length, MAX_EXTENTS)

    @inlineCallbacks
    def _zeroExtentsCached(self) -> Generator[Deferred[Any], Any, list[Extent]]:
        if self._zeroExtents is None:
            extents = yield self._fetchExtents("zero")
            self._zeroExtents = extents
            self._cachedSize = extents[-1].start + extents[-1].length if extents else 0
        return self._zeroExtents

    @inlineCallbacks
    def _fetchExtents(self, context: str) -> Generator[Deferred[Any], Any, list[Extent]]:
        url = self._subURL("/extents", f"context={context}")
        response = yield self._request(b"GET", url)
        yield self._expect(response, (200,))
        body = yield self._readSmall(response, MAX_EXTENTS_BODY)
        try:
            if self.runInPool is None:
                return parseExtents(body, context)
            extents: list[Extent] = yield self.runInPool(parseExtents, body, context)
            return extents
        except BadResponse as e:
            raise HostInvalid(f"Invalid response from host: {e}") from None

    def _wrote(self, offset: int, length: int) -> None:
        # Written bytes are not zero any more, and the image may have grown.
        self._zeroExtents = None
        if self._cachedSize is not None and "extents" in self.features:
            self._cachedSize = None
        elif self._cachedSize is not None:
            self._cachedSize = max(self._cachedSize, offset + length)

    def close(self) -> Deferred[None]:
        if self._closed:
            return succeed(None)
        self._closed = True
        d: Deferred[None] = self.pool.closeCachedConnections()
        return d


@inlineCallbacks
def _open(
    reactor: Any,
    agent: Agent,
    pool: HTTPConnectionPool,
    url: str,
    bufferSize: int,
    runInPool: Callable[..., Deferred[Any]] | None = None,
) -> Generator[Deferred[Any], Any, IBackend]:
    raw = url.encode("ascii")
    headers = Headers({b"cache-control": [b"no-cache"], RELAYED_HEADER: [b"1"]})
    d = agent.request(b"OPTIONS", raw, headers)
    d.addTimeout(READ_TIMEOUT, reactor)
    try:
        response = yield d
    except Exception:
        raise hostError(Failure()) from None
    features: frozenset[str] = frozenset()
    maxReaders = maxWriters = DEFAULT_MAX_CONNECTIONS
    if response.code == 200:
        try:
            body = yield collectBody(response, MAX_OPTIONS_BODY)
        except BodyTooLarge:
            body = b""
        except Exception:
            raise hostError(Failure()) from None
        parsed = _parseOptions(body)
        if parsed is not None:
            features, maxReaders, maxWriters = parsed
    elif response.code in (204, 405):
        # Daemons before 1.3 and 1.x proxies: GET and PUT only.
        yield collectBody(response, MAX_ERROR_TEXT, truncate=True)
    else:
        yield raiseRemoteError(response)
    return HTTPBackend(
        reactor=reactor,
        agent=agent,
        pool=pool,
        url=raw,
        features=features,
        maxReaders=maxReaders,
        maxWriters=maxWriters,
        bufferSize=bufferSize,
        runInPool=runInPool,
    )


def openBackend(
    ctx: BackendContext, url: str, *, write: bool, sparse: bool, dirty: bool
) -> Deferred[IBackend]:
    """
    Open the image at C{url} on another daemon: ask it for its features
    (C{OPTIONS}); its 403 for an unknown ticket fails the open with the
    same status.

    C{sparse} is the remote ticket's business; C{write} and C{dirty} are
    enforced by the remote ticket too.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        return defer.fail(ValueError(f"Not an HTTP URL: {url!r}"))
    if parts.username is not None or parts.password is not None:
        return defer.fail(ValueError("Credentials in the URL are not allowed"))
    try:
        clean = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        clean.encode("ascii")
    except (ValueError, UnicodeEncodeError):
        return defer.fail(ValueError(f"Invalid HTTP URL: {url!r}"))
    options = ctx.extra.get("http", {})
    bufferSize = int(options.get("bufferSize", ctx.bufferSize))
    runInPool = ctx.diskio.run if ctx.diskio is not None else None
    if runInPool is not None:
        # A CA file the daemon could not read at start is read on the
        # pool, not on the reactor thread.
        root = loadTrustRootInPool(ctx.caFile, runInPool)
    else:
        root = defer.maybeDeferred(loadTrustRoot, ctx.caFile)

    def opened(trustRoot: Any) -> Deferred[IBackend]:
        pool = makePool(ctx.reactor, CONNECTIONS_PER_BACKEND, CACHED_CONNECTION_TIMEOUT)
        agent = makeAgent(ctx.reactor, ctx.caFile, pool, trustRoot)
        d = _open(ctx.reactor, agent, pool, clean, bufferSize, runInPool)

        def failed(reason: Failure) -> Failure:
            pool.closeCachedConnections()
            return reason

        d.addErrback(failed)
        return d

    return root.addCallback(opened)


__all__ = [
    "openBackend",
    "HTTPBackend",
    "BackendClosed",
    "parseExtents",
    "clipExtents",
]
