# -*- test-case-name: tests.test_httpclient -*-
"""
The HTTP client for talking to imageio daemons, and its limits: used by the
C{https:} backend (L{imageio.backends.http}, "proxy mode") and by the
signed-ticket proxy's relay (L{imageio.proxy}).

TLS is verified against a CA file (the system trust store when empty) with
host name checks, TLS 1.2 at least. Connecting times out after
L{CONNECT_TIMEOUT} seconds, and a daemon that sends nothing for
L{READ_TIMEOUT} seconds is given up on.

Failures are domain errors (L{imageio.interfaces}): a daemon's non-2xx
answer is a L{RemoteError} with its status and (the first
L{MAX_ERROR_TEXT} bytes of) its text; a daemon that cannot be reached, is
too slow or answers outside the images API is a L{HostError}. Only the web
layer (L{imageio.web.httpErrorFor}) turns them into HTTP statuses.
"""

from __future__ import annotations

import ssl
import sys
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any

from attrs import define, field, frozen
from twisted.internet import defer, error
from twisted.internet.defer import CancelledError, Deferred, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

from imageio._twisted_lazytls import restoreReactorTLS
from imageio.backends import CA_FILES
from imageio.backends._twisted_newclient import (
    HTTP11ClientProtocol,
    Request,
    RequestGenerationFailed,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from imageio.interfaces import (
    HostError,
    HostInvalid,
    HostTimedOut,
    HostUnavailable,
    RemoteError,
)

if TYPE_CHECKING:
    from twisted.web.client import Agent, HTTPConnectionPool

# pyOpenSSL, Twisted's TLS (twisted.internet.ssl) and twisted.web.client
# (which imports pyOpenSSL through twisted.internet.endpoints) are imported
# where a Twisted TLS client is made (makeAgent, loadTrustRoot, makePool),
# not here: the client (imageio.client) uses this module over UNIX sockets
# and its own stdlib TLS, without them.

#: Seconds to wait for a TCP connection to the daemon (upstream's default).
CONNECT_TIMEOUT = 10.0

#: Seconds the daemon may stay silent: before its response headers (after
#: an upload's body was sent, while it writes and flushes), and between
#: pieces of a response body; the relay also allows a client this long to
#: stop reading a download. Upstream's daemon backend used 60 seconds and
#: its 1.x proxy 120: we take the longer, because a false timeout fails an
#: upload that is never replayed, while a dead daemon is usually noticed
#: sooner by the connection itself.
READ_TIMEOUT = 120.0

#: Bytes of a daemon's error text relayed to the client: upstream's texts
#: are one line, but may name long paths; more is cut, never buffered.
MAX_ERROR_TEXT = 4096

#: Pieces a body producer hands to the transport, so one 8 MiB write does
#: not become 8 MiB of ciphertext queued at once.
WRITE_CHUNK = 256 * 1024

#: Seconds an idle connection stays in a pool. Daemons close idle
#: connections after 60 seconds; reusing one they are closing would fail a
#: request (an upload is never replayed), so we let go well before.
CACHED_CONNECTION_TIMEOUT = 30


class ReadTimeout(Exception):
    """
    The daemon sent nothing for too long (a cause; L{hostError} reports it
    as L{HostTimedOut}).
    """


class BadResponse(Exception):
    """
    The daemon's answer does not follow the images API.
    """


class BodyTooLarge(Exception):
    """
    A response body was larger than the caller allows.
    """


#: Failures that mean a daemon could not be reached or read; anything else
#: is a bug and is logged as one. With pyOpenSSL's C{SSL.Error}: see
#: L{networkErrors}.
NETWORK_ERRORS_WITHOUT_TLS = (
    error.ConnectError,
    error.ConnectionLost,
    error.ConnectionDone,
    error.ConnectingCancelledError,
    ResponseFailed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    RequestGenerationFailed,
    CancelledError,
    defer.TimeoutError,
    ReadTimeout,
    BadResponse,
    BodyTooLarge,
)


def _pyOpenSSLError() -> tuple[type[BaseException], ...]:
    """
    @return: pyOpenSSL's C{SSL.Error} if pyOpenSSL was imported; none can
        be raised otherwise.
    """
    module = sys.modules.get("OpenSSL.SSL")
    error = getattr(module, "Error", None)
    return (error,) if isinstance(error, type) else ()


def networkErrors() -> tuple[type[BaseException], ...]:
    """
    @return: Failures that mean a daemon could not be reached or read:
        L{NETWORK_ERRORS_WITHOUT_TLS}, and pyOpenSSL's C{SSL.Error} once a
        Twisted TLS client exists.
    """
    return NETWORK_ERRORS_WITHOUT_TLS + _pyOpenSSLError()


# TLS


_TRUST_ROOTS: dict[str, Any] = {}


def loadTrustRoot(caFile: str) -> Any:
    """
    The trust root for verifying daemons: the certificates of C{caFile}, or
    the platform's trust store when C{caFile} is empty. Loaded once per
    process and path (a restart picks up a changed file); a file the
    daemon read at start (L{imageio.backends.readCAFile}) is not read again.

    This may read the file: call it at start, or through
    L{loadTrustRootInPool}.

    @raise ValueError: If C{caFile} cannot be read or holds no certificate.
    """
    root = cachedTrustRoot(caFile)
    if root is None:
        root = _readTrustRoot(caFile)
    return root


def cachedTrustRoot(caFile: str) -> Any | None:
    """
    @return: The trust root for C{caFile} if it needs no file read: the
        platform's trust store, one loaded before, or one from the
        certificates the daemon read at start; else C{None}.
    """
    from twisted.internet.ssl import platformTrust

    # A daemon imports the reactor core without pyOpenSSL; now that it is
    # loaded, the reactor's connectSSL and listenSSL can have it back.
    restoreReactorTLS()
    if not caFile:
        return platformTrust()
    root = _TRUST_ROOTS.get(caFile)
    if root is None and caFile in CA_FILES:
        root = _parseTrustRoot(caFile, CA_FILES[caFile])
    return root


def loadTrustRootInPool(caFile: str, runInPool: Callable[..., Deferred[Any]]) -> Deferred[Any]:
    """
    L{loadTrustRoot}, reading the file (if it must be read) with
    C{runInPool}, off the reactor thread.
    """
    try:
        root = cachedTrustRoot(caFile)
    except ValueError as e:
        return fail(e)
    if root is not None:
        return succeed(root)
    return runInPool(_readTrustRoot, caFile)


def _readTrustRoot(caFile: str) -> Any:
    try:
        with open(caFile, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError(f"Cannot read CA file {caFile}: {e.strerror}") from e
    return _parseTrustRoot(caFile, pem)


def _parseTrustRoot(caFile: str, pem: bytes) -> Any:
    from OpenSSL import SSL
    from twisted.internet.ssl import Certificate, trustRootFromCertificates

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
        from twisted.internet.ssl import TLSVersion, optionsForClientTLS

        creator: IOpenSSLClientConnectionCreator = optionsForClientTLS(
            hostname.decode("ascii"),
            trustRoot=self.trustRoot,
            extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
        )
        return creator


def makePool(reactor: Any, maxPerHost: int, idleTimeout: int) -> HTTPConnectionPool:
    """
    A persistent connection pool that does not log every connection.

    Only requests without a body (GET, OPTIONS) are ever retried on a fresh
    connection, by Twisted's pool; an upload is never replayed.
    """
    from imageio.backends._twisted_client import quietPool

    pool = quietPool(reactor)
    pool.maxPersistentPerHost = maxPerHost
    pool.cachedConnectionTimeout = idleTimeout
    return pool


def makeAgent(reactor: Any, caFile: str, pool: HTTPConnectionPool, trustRoot: Any = None) -> Agent:
    """
    An HTTP client verifying daemons against C{caFile} (or C{trustRoot}, if
    given: L{loadTrustRootInPool}).

    @raise ValueError: If C{caFile} is unusable.
    """
    from twisted.web.client import Agent

    return Agent(
        reactor,
        contextFactory=VerifyingPolicy(
            trustRoot if trustRoot is not None else loadTrustRoot(caFile)
        ),
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
            stopTransport(self)
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


def stopTransport(protocol: Protocol) -> None:
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
        stopTransport(self)


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


def hostError(reason: Failure) -> HostError | RemoteError:
    """
    What went wrong reaching the daemon or reading its answer, as the
    domain error the client will hear of:

      - connect timeout: L{HostTimedOut} C{Timed out connecting to host};
      - read timeout: L{HostTimedOut} C{Timed out waiting for host};
      - certificate verification, answers outside the images API:
        L{HostInvalid};
      - refused, reset, DNS, anything else on the network:
        L{HostUnavailable}.

    A L{HostError} or L{RemoteError} is passed through.
    """
    if reason.check(HostError, RemoteError):
        known: HostError | RemoteError = reason.value  # type: ignore[assignment]
        return known
    failures = _innerFailures(reason)
    for f in failures:
        if f.check(error.TimeoutError, error.ConnectingCancelledError):
            return HostTimedOut("Timed out connecting to host")
        if f.check(ReadTimeout, defer.TimeoutError):
            return HostTimedOut("Timed out waiting for host")
        # pyOpenSSL (Twisted TLS) or the stdlib (imageio.client's TLS).
        tls = f.check(ssl.SSLError, *_pyOpenSSLError())
        if tls or type(f.value).__name__ == "VerificationError":
            return HostInvalid(f"Cannot verify the host's TLS certificate: {_describe(f)}")
        if f.check(BadResponse):
            return HostInvalid(f"Invalid response from host: {_describe(f)}")
    return HostUnavailable(f"Failed communicating with host: {_describe(failures[0])}")


def remoteError(response: IResponse, body: bytes) -> RemoteError:
    """
    The daemon's error answer as a L{RemoteError} with its status, text
    (at most L{MAX_ERROR_TEXT} bytes of it) and C{Content-Range} (416).
    """
    text = body[:MAX_ERROR_TEXT].decode("utf-8", "replace").rstrip("\r\n")
    if not text:
        text = response.phrase.decode("latin-1", "replace") or f"Error {response.code}"
    contentRange = response.headers.getRawHeaders(b"content-range")
    return RemoteError(response.code, text, contentRange[0] if contentRange else None)


@inlineCallbacks
def raiseRemoteError(response: IResponse) -> Generator[Deferred[Any], Any, None]:
    """
    Read the first bytes of an error answer and raise it as L{RemoteError}.
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


__all__ = [
    "CONNECT_TIMEOUT",
    "READ_TIMEOUT",
    "MAX_ERROR_TEXT",
    "WRITE_CHUNK",
    "CACHED_CONNECTION_TIMEOUT",
    "NETWORK_ERRORS_WITHOUT_TLS",
    "networkErrors",
    "ReadTimeout",
    "BadResponse",
    "BodyTooLarge",
    "loadTrustRoot",
    "loadTrustRootInPool",
    "VerifyingPolicy",
    "makePool",
    "makeAgent",
    "BytesProducer",
    "collectBody",
    "discardBody",
    "stopTransport",
    "hostError",
    "remoteError",
    "raiseRemoteError",
    "Watchdog",
    # Twisted's HTTP/1.1 client protocol, for imageio.client's own pool.
    "HTTP11ClientProtocol",
    "Request",
    "RequestNotSent",
    "RequestTransmissionFailed",
    "ResponseDone",
    "ResponseFailed",
    "ResponseNeverReceived",
]
