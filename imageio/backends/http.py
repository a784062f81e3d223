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
after L{CONNECT_TIMEOUT} seconds, and a daemon that sends nothing for
L{READ_TIMEOUT} seconds is given up on.

Errors keep their meaning for the client: a daemon's non-2xx answer is
raised as L{HTTPError} with the daemon's status and (the first 512 bytes
of) its text, so a client of the proxy sees the daemon's 403 or 416; a
daemon that cannot be reached is 503, a timeout 504, a daemon whose
certificate does not verify 502.

The HTTP client plumbing here (TLS policy, small-body collection, error
mapping, a body producer over a buffer) is shared with the signed-ticket
proxy (L{imageio.proxy}).
"""

from __future__ import annotations

import itertools
import json
from bisect import bisect_right
from collections.abc import Callable, Generator, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from attrs import define, field, frozen
from OpenSSL import SSL
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from imageio._log import Logger
from imageio.backends import RELAYED_HEADER, BackendContext
from imageio.interfaces import Extent, IBackend, UnsupportedOperation
from imageio.ranges import parseJSONInteger
from imageio.web._response import HTTPError

log = Logger()

T = TypeVar("T")

#: Seconds to wait for a TCP connection to the daemon (upstream's default).
CONNECT_TIMEOUT = 10.0

#: Seconds the daemon may stay silent: before its response headers, and
#: between pieces of a response body (upstream's default).
READ_TIMEOUT = 60.0

#: Bytes of a daemon's error text relayed to the client.
MAX_ERROR_TEXT = 512

#: Largest OPTIONS answer read.
MAX_OPTIONS_BODY = 64 * 1024

#: Largest extents answer read: about a million extents.
MAX_EXTENTS_BODY = 64 * 1024**2

#: Most extents one C{extents} call returns (as the file backend); callers
#: ask again from the end of the last one.
MAX_EXTENTS = 10_000

#: Pieces a body producer hands to the transport, so one 8 MiB write does
#: not become 8 MiB of ciphertext queued at once.
WRITE_CHUNK = 256 * 1024

#: Cached idle connections per backend: one operation runs at a time, so
#: one connection is in use; a second absorbs a late return to the pool.
CONNECTIONS_PER_BACKEND = 2

#: Seconds an idle connection stays in a pool. Daemons close idle
#: connections after 60 seconds; reusing one they are closing would fail a
#: request, so we let go first.
CACHED_CONNECTION_TIMEOUT = 30

#: Advertised concurrency when the daemon does not say (upstream's default).
DEFAULT_MAX_CONNECTIONS = 1

#: Largest C{max_readers}/C{max_writers} believed from a daemon.
MAX_CONNECTIONS = 64


class ReadTimeout(Exception):
    """
    The daemon sent nothing for too long.
    """


class BadResponse(Exception):
    """
    The daemon's answer does not follow the images API.
    """


class BodyTooLarge(Exception):
    """
    A response body was larger than the caller allows.
    """


# TLS


_TRUST_ROOTS: dict[str, Any] = {}


def loadTrustRoot(caFile: str) -> Any:
    """
    The trust root for verifying daemons: the certificates of C{caFile}, or
    the platform's trust store when C{caFile} is empty. Loaded once per
    process and path (a restart picks up a changed file).

    @raise ValueError: If C{caFile} cannot be read or holds no certificate.
    """
    if not caFile:
        return platformTrust()
    root = _TRUST_ROOTS.get(caFile)
    if root is not None:
        return root
    try:
        with open(caFile, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError(f"Cannot read CA file {caFile}: {e.strerror}") from e
    certificates = []
    marker = b"-----END CERTIFICATE-----"
    for block in pem.split(marker)[:-1]:
        begin = block.find(b"-----BEGIN CERTIFICATE-----")
        if begin < 0:
            continue
        try:
            certificates.append(Certificate.loadPEM(block[begin:] + marker + b"\n"))
        except SSL.Error as e:
            raise ValueError(f"Invalid certificate in CA file {caFile}: {e}") from e
    if not certificates:
        raise ValueError(f"No certificate in CA file {caFile}")
    root = trustRootFromCertificates(certificates)
    _TRUST_ROOTS[caFile] = root
    return root


@implementer(IPolicyForHTTPS)
@frozen
class VerifyingPolicy:
    """
    Verify daemons' certificates against C{trustRoot} and their host names
    (DNS names and IP addresses), TLS 1.2 at least.

    @ivar trustRoot: From L{loadTrustRoot}.
    """

    trustRoot: Any

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self.trustRoot,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
        )
        return creator


class _QuietClientFactory(_HTTP11ClientFactory):  # type: ignore[misc]
    """
    The pool's connection factory without "Starting factory" log lines for
    every connection.
    """

    noisy = False


def makePool(reactor: Any, maxPerHost: int, idleTimeout: int) -> HTTPConnectionPool:
    """
    A persistent connection pool.

    Only requests without a body (GET, OPTIONS) are ever retried on a fresh
    connection, by Twisted's pool; an upload is never replayed.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory
    pool.maxPersistentPerHost = maxPerHost
    pool.cachedConnectionTimeout = idleTimeout
    return pool


def makeAgent(reactor: Any, caFile: str, pool: HTTPConnectionPool) -> Agent:
    """
    An HTTP client verifying daemons against C{caFile}.

    @raise ValueError: If C{caFile} is unusable.
    """
    return Agent(
        reactor,
        contextFactory=VerifyingPolicy(loadTrustRoot(caFile)),
        connectTimeout=CONNECT_TIMEOUT,
        pool=pool,
    )


# Bodies


@implementer(IBodyProducer)
@define
class BytesProducer:
    """
    A request body from a buffer, handed to the transport in
    L{WRITE_CHUNK} pieces as it asks for them.

    @ivar data: The body; not copied, so the caller must not change it until
        the request completes.
    """

    data: bytes | memoryview
    length: int = field(init=False)
    _view: memoryview = field(init=False)
    _position: int = field(default=0, init=False)
    _consumer: IConsumer | None = field(default=None, init=False)
    _done: Deferred[None] | None = field(default=None, init=False)
    _paused: bool = field(default=False, init=False)
    _stopped: bool = field(default=False, init=False)
    _pumping: bool = field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._view = memoryview(self.data).cast("B")
        self.length = len(self._view)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._done = Deferred()
        self._pump()
        return self._done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        # The request failed; its Deferred need not fire.
        self._stopped = True
        self._view = memoryview(b"")

    def _pump(self) -> None:
        if self._pumping or self._consumer is None or self._done is None:
            return
        self._pumping = True
        try:
            while not self._paused and not self._stopped and self._position < self.length:
                end = min(self._position + WRITE_CHUNK, self.length)
                chunk = bytes(self._view[self._position : end])
                self._position = end
                self._consumer.write(chunk)
        finally:
            self._pumping = False
        if self._position == self.length and not self._stopped and not self._done.called:
            self._done.callback(None)


class _Collector(Protocol):
    """
    Collects a small response body, failing with L{BodyTooLarge} (and
    closing the connection) beyond C{limit} bytes, or keeping only the first
    C{limit} bytes when C{truncate}.
    """

    def __init__(self, limit: int, truncate: bool) -> None:
        self.done: Deferred[bytes] = Deferred()
        self._limit = limit
        self._truncate = truncate
        self._data: list[bytes] = []
        self._size = 0
        self._stopped = False

    def dataReceived(self, data: bytes) -> None:
        if self._stopped:
            return
        room = self._limit - self._size
        if len(data) > room:
            self._stopped = True
            self._data.append(data[:room])
            self._size += min(room, len(data))
            _stopTransport(self)
            if self._truncate:
                self.done.callback(b"".join(self._data))
            else:
                self._data.clear()
                self.done.errback(BodyTooLarge(f"Response body larger than {self._limit} bytes"))
            return
        self._data.append(data)
        self._size += len(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._stopped:
            return
        self._stopped = True
        if reason.check(ResponseDone, PotentialDataLoss) or self._truncate:
            self.done.callback(b"".join(self._data))
        else:
            self.done.errback(reason)


def _stopTransport(protocol: Protocol) -> None:
    """
    Stop a response body: closes the connection it arrives on.
    """
    transport: Any = protocol.transport
    if transport is not None:
        transport.stopProducing()


def collectBody(response: IResponse, limit: int, truncate: bool = False) -> Deferred[bytes]:
    """
    Read a small response body.

    @param limit: Most bytes read.
    @param truncate: Return the first C{limit} bytes of a larger body
        (and of a body cut short) instead of failing.
    @return: A Deferred firing with the body; failing with L{BodyTooLarge}
        or the reason the body was cut.
    """
    collector = _Collector(limit, truncate)
    response.deliverBody(collector)
    return collector.done


class _Discard(Protocol):
    """
    Closes the connection at once instead of reading a body.
    """

    def connectionMade(self) -> None:
        _stopTransport(self)


def discardBody(response: IResponse) -> None:
    """
    Close the response's connection without reading its body (a whole image,
    say). The connection is not reused.
    """
    response.deliverBody(_Discard())


# Errors


def _innerFailures(reason: Failure) -> list[Failure]:
    """
    @return: The failures wrapped in Twisted's client errors
        (L{ResponseNeverReceived}, L{ResponseFailed}, ...), or C{reason}.
    """
    value = reason.value
    reasons = getattr(value, "reasons", None)
    if isinstance(value, ResponseNeverReceived | ResponseFailed) or (
        reasons and all(isinstance(r, Failure) for r in reasons)
    ):
        inner: list[Failure] = []
        for r in reasons or []:
            inner.extend(_innerFailures(r))
        return inner or [reason]
    return [reason]


def _describe(reason: Failure) -> str:
    value = reason.value
    text = str(value).strip() or type(value).__name__
    return text.splitlines()[0][:200]


def hostError(reason: Failure) -> HTTPError:
    """
    Map a failure to reach the daemon or to read its answer to the error
    the client gets.

      - connect timeout: 504 C{Timed out connecting to host};
      - read timeout: 504 C{Timed out waiting for host};
      - certificate verification: 502;
      - refused, reset, DNS, anything else on the network: 503.
    """
    if reason.check(HTTPError):
        httpError: HTTPError = reason.value  # type: ignore[assignment]
        return httpError
    failures = _innerFailures(reason)
    for f in failures:
        if f.check(error.TimeoutError, error.ConnectingCancelledError):
            return HTTPError(504, "Timed out connecting to host")
        if f.check(ReadTimeout, defer.TimeoutError):
            return HTTPError(504, "Timed out waiting for host")
        if f.check(SSL.Error) or type(f.value).__name__ == "VerificationError":
            return HTTPError(502, f"Cannot verify the host's TLS certificate: {_describe(f)}")
        if f.check(BadResponse):
            return HTTPError(502, f"Invalid response from host: {_describe(f)}")
    return HTTPError(503, f"Failed communicating with host: {_describe(failures[0])}")


def remoteError(response: IResponse, body: bytes) -> HTTPError:
    """
    The daemon's error answer as an L{HTTPError} with its status, text and
    C{Content-Range} (416); 403 closes the connection as the daemon does.
    """
    text = body[:MAX_ERROR_TEXT].decode("utf-8", "replace").rstrip("\r\n")
    if not text:
        text = response.phrase.decode("latin-1", "replace") or f"Error {response.code}"
    headers = []
    contentRange = response.headers.getRawHeaders(b"content-range")
    if contentRange:
        headers.append((b"content-range", contentRange[0]))
    return HTTPError(response.code, text, headers, close=response.code == 403)


@inlineCallbacks
def raiseRemoteError(response: IResponse) -> Generator[Deferred[Any], Any, None]:
    """
    Read the first bytes of an error answer and raise it as L{HTTPError}.
    """
    try:
        body = yield collectBody(response, MAX_ERROR_TEXT, truncate=True)
    except Exception:
        body = b""
    raise remoteError(response, body)


# Timeouts


@define
class Watchdog:
    """
    Calls C{expired} when C{timeout} seconds pass without L{kick}.

    L{kick} runs for every piece of data, so it only sets a flag; a timer
    looks at the flag twice per C{timeout}. Silence is noticed after
    C{timeout} to C{1.5 * timeout} seconds.
    """

    clock: IReactorTime
    timeout: float
    expired: Callable[[], object]
    _call: IDelayedCall | None = field(default=None, init=False)
    _active: bool = field(default=False, init=False)
    _idleChecks: int = field(default=0, init=False)

    def kick(self) -> None:
        self._active = True
        if self._call is None:
            self._idleChecks = 0
            self._call = self.clock.callLater(self.timeout / 2, self._check)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _check(self) -> None:
        if self._active:
            self._active = False
            self._idleChecks = 0
        else:
            self._idleChecks += 1
            if self._idleChecks >= 2:
                self._call = None
                self.expired()
                return
        self._call = self.clock.callLater(self.timeout / 2, self._check)


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
        _stopTransport(self)
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

    def limit(name: str) -> int:
        value = msg.get(name, DEFAULT_MAX_CONNECTIONS)
        if type(value) is not int or value < 1:
            return DEFAULT_MAX_CONNECTIONS
        return min(value, MAX_CONNECTIONS)

    return frozenset(features), limit("max_readers"), limit("max_writers")


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
                raise HTTPError(502, f"Unexpected response from host: {response.code}", close=True)
            yield raiseRemoteError(response)

    @inlineCallbacks
    def _readSmall(self, response: IResponse, limit: int) -> Generator[Deferred[Any], Any, bytes]:
        try:
            body: bytes = yield collectBody(response, limit)
        except BodyTooLarge as e:
            raise HTTPError(502, f"Invalid response from host: {e}") from None
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
                raise HTTPError(502, "Invalid response from host: no Content-Length")
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
            raise HTTPError(
                502,
                f"Invalid response from host: expected {length} bytes, got {response.length}",
            )
        reader = _ReadInto(memoryview(buf).cast("B")[:length], self.reactor, self.readTimeout)
        response.deliverBody(reader)
        try:
            n = yield reader.done
        except Exception:
            raise hostError(Failure()) from None
        if n != length:
            raise HTTPError(502, f"Invalid response from host: expected {length} bytes, got {n}")
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
            raise HTTPError(502, f"Invalid response from host: {e}") from None

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
    pool = makePool(ctx.reactor, CONNECTIONS_PER_BACKEND, CACHED_CONNECTION_TIMEOUT)
    try:
        agent = makeAgent(ctx.reactor, ctx.caFile, pool)
    except ValueError as e:
        return defer.fail(e)
    runInPool = ctx.diskio.run if ctx.diskio is not None else None
    d = _open(ctx.reactor, agent, pool, clean, bufferSize, runInPool)

    def failed(reason: Failure) -> Failure:
        pool.closeCachedConnections()
        return reason

    d.addErrback(failed)
    return d


__all__ = [
    "openBackend",
    "HTTPBackend",
    "VerifyingPolicy",
    "loadTrustRoot",
    "makeAgent",
    "makePool",
    "BytesProducer",
    "collectBody",
    "discardBody",
    "hostError",
    "remoteError",
    "Watchdog",
    "CONNECT_TIMEOUT",
    "READ_TIMEOUT",
]
