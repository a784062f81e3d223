# -*- test-case-name: tests.test_client -*-
"""
The remote end of a transfer: an image on an imageio server, reached through
the http backend (L{imageio.backends.http.HTTPBackend}), one backend per
connection.

Opening asks the server's C{OPTIONS} for its features, its readers and
writers limits and its local socket; a client on the server's own host then
talks over that UNIX socket (no TLS), as upstream's client does.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from imageio.backends import http as _http
from imageio.backends import httpclient
from imageio.backends.httpclient import ResponseDone, ResponseFailed
from imageio.client import _tls
from imageio.client._connect import HTTPPool
from imageio.interfaces import IBackend
from imageio.ranges import RangeSet

#: Largest OPTIONS, C{/written} or checksum answer read.
MAX_SMALL_BODY = 16 * 1024**2


class RemoteError(Exception):
    """
    The server refused a request or could not be reached.

    @ivar status: The server's HTTP status, if it answered.
    """

    status: int | None = None


class StreamError(Exception):
    """
    A streamed response broke off, went silent or sent too much.
    """


def networkError(reason: Failure, url: str) -> RemoteError:
    """
    @return: A failure to reach the server or to read its answer, as
        L{RemoteError} naming the URL.
    """
    mapped = httpclient.hostError(reason)
    why = getattr(mapped, "message", str(mapped))
    return RemoteError(f"Cannot reach {_shown(url)}: {why}")


class NotSupported(RemoteError):
    """
    The server does not offer what was asked (an older server).
    """


@frozen
class ServerOptions:
    """
    What a server's C{OPTIONS /images/<id>} said.
    """

    features: frozenset[str] = frozenset()
    maxReaders: int = _http.DEFAULT_MAX_CONNECTIONS
    maxWriters: int = _http.DEFAULT_MAX_CONNECTIONS
    unixSocket: str | None = None


def parseOptions(body: bytes) -> ServerOptions:
    """
    Parse an C{OPTIONS} answer; anything unexpected counts as an old server
    with no features.
    """
    try:
        msg = json.loads(body)
    except ValueError:
        return ServerOptions()
    if not isinstance(msg, dict):
        return ServerOptions()
    features = msg.get("features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        features = []
    unixSocket = msg.get("unix_socket")
    if not isinstance(unixSocket, str) or not unixSocket:
        unixSocket = None
    return ServerOptions(
        frozenset(features),
        _http.advertisedLimit(msg, "max_readers"),
        _http.advertisedLimit(msg, "max_writers"),
        unixSocket,
    )


def errorMessage(reason: Failure | BaseException) -> str:
    """
    @return: One line saying why a request failed: the server's status and
        text, or the network error.
    """
    exc = reason.value if isinstance(reason, Failure) else reason
    status = getattr(exc, "status", None)
    message = getattr(exc, "message", None)
    if isinstance(status, int) and isinstance(message, str):
        return f"{status} {message}"
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def isLocalHost(host: str) -> bool:
    """
    @return: Whether C{host} names this machine: loopback, or an address a
        socket here can bind. Blocking (name resolution): run on the pool.
    """
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            return True
    except ValueError:
        if host == "localhost":
            return True
    try:
        infos = socket.getaddrinfo(host.strip("[]"), None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    for family, _, _, _, address in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((address[0], 0) if family == socket.AF_INET else (address[0], 0, 0, 0))
        except OSError:
            continue
        return True
    return False


@define
class Connector:
    """
    Makes connection pools for one server: over TCP (TLS verified against
    C{cafile} or the system trust store, or not at all when not C{secure})
    or, once L{useUnix} was called, over the server's UNIX socket.
    """

    reactor: Any
    cafile: str | None
    secure: bool
    unixSocket: str | None = field(default=None, init=False)
    _context: Any = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        # Raises ValueError for an unreadable CA file.
        self._context = _tls.makeClientContext(self.cafile, self.secure)

    def useUnix(self, path: str) -> None:
        self.unixSocket = path

    def agent(self) -> HTTPPool:
        """
        @return: A new pool: it sends requests and closes its connections
            (an HTTP backend's agent and pool both).
        """
        # TLS on the stdlib's ssl module, not Twisted's (pyOpenSSL): about
        # 40% less CPU per GiB uploaded (see imageio.client._tls).
        pool = HTTPPool(
            self.reactor,
            httpclient.CONNECT_TIMEOUT,
            unixSocket=self.unixSocket,
            tls=self._context,
            maxIdle=2,
            idleTimeout=30,
        )
        return pool


def unixURL(url: str) -> str:
    """
    @return: C{url} as sent over a UNIX socket: plain HTTP to C{localhost}.
    """
    parts = urlsplit(url)
    return urlunsplit(("http", "localhost", parts.path, "", ""))


async def request(
    reactor: Any,
    agent: HTTPPool,
    method: bytes,
    url: str,
    headers: dict[bytes, bytes] | None = None,
) -> IResponse:
    """
    Send a request without a body.

    @raise RemoteError: When the server cannot be reached.
    """
    raw = Headers({k: [v] for k, v in (headers or {}).items()})
    d: Deferred[IResponse] = agent.request(method, url.encode("ascii"), raw)
    d.addTimeout(httpclient.READ_TIMEOUT, reactor)
    try:
        return await d
    except Exception:
        raise networkError(Failure(), url) from None


async def readJSON(response: IResponse, url: str) -> Any:
    """
    Read a small JSON answer.

    @raise RemoteError: For an error status or a body that is not JSON.
    """
    if response.code != 200:
        await raiseFor(response, url)
    try:
        body = await httpclient.collectBody(response, MAX_SMALL_BODY)
        return json.loads(body)
    except ValueError:
        raise RemoteError(f"Invalid answer from {_shown(url)}: not JSON") from None
    except Exception as e:
        raise RemoteError(f"Cannot read the answer of {_shown(url)}: {errorMessage(e)}") from None


async def raiseFor(response: IResponse, url: str) -> None:
    """
    Raise the server's error answer as L{RemoteError}.
    """
    try:
        body = await httpclient.collectBody(response, 512, truncate=True)
    except Exception:
        body = b""
    text = body.decode("utf-8", "replace").strip() or response.phrase.decode("latin-1")
    text = " ".join(text.split())
    error = NotSupported if response.code in (404, 405) else RemoteError
    exc = error(f"{_shown(url)}: server answered {response.code}: {text}")
    exc.status = response.code
    raise exc


def _shown(url: str) -> str:
    """
    @return: C{url} as shown in errors: the ticket id is a credential, so only
        its start is shown.
    """
    parts = urlsplit(url)
    path = parts.path
    prefix = "/images/"
    if path.startswith(prefix):
        rest = path[len(prefix) :]
        ticket, sep, tail = rest.partition("/")
        if len(ticket) > 8:
            ticket = ticket[:8] + "..."
        path = prefix + ticket + sep + tail
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


@define
class Remote:
    """
    An image on an imageio server.

    @ivar url: The transfer URL as given.
    @ivar options: What C{OPTIONS} said.
    @ivar runInPool: Runs CPU work off the reactor (parsing an extents
        answer); C{None} runs it in place.
    """

    reactor: Any
    url: str
    options: ServerOptions
    connector: Connector
    bufferSize: int
    _backends: list[IBackend] = field(factory=list, init=False)
    _first: HTTPPool | None = None
    runInPool: Callable[..., Deferred[Any]] | None = None

    @property
    def overUnix(self) -> bool:
        return self.connector.unixSocket is not None

    @property
    def shownURL(self) -> str:
        return _shown(self.url)

    @property
    def requestURL(self) -> str:
        """
        Where requests go: L{url}, or C{http://localhost/...} over the UNIX
        socket.
        """
        return unixURL(self.url) if self.overUnix else self.url

    def backends(self, count: int) -> list[IBackend]:
        """
        @return: C{count} backends, each with its own connection. The first
            ones are reused across calls.
        """
        while len(self._backends) < count:
            if self._first is not None:
                pool = self._first
                self._first = None
            else:
                pool = self.connector.agent()
            self._backends.append(
                StreamingTarget(
                    self.reactor,
                    _http.HTTPBackend(
                        reactor=self.reactor,
                        # An Agent and its pool, as far as the backend
                        # can tell.
                        agent=cast(Any, pool),
                        pool=cast(Any, pool),
                        url=self.requestURL.encode("ascii"),
                        features=self.options.features,
                        maxReaders=self.options.maxReaders,
                        maxWriters=self.options.maxWriters,
                        bufferSize=self.bufferSize,
                        runInPool=self.runInPool,
                        relayed=False,
                    ),
                    self.requestURL,
                )
            )
        return self._backends[:count]

    def _subURL(self, suffix: str, query: str = "") -> str:
        parts = urlsplit(self.requestURL)
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/") + suffix, query, ""))

    async def _getJSON(self, suffix: str, query: str = "") -> Any:
        agent = self._agent()
        url = self._subURL(suffix, query)
        response = await request(self.reactor, agent, b"GET", url)
        return await readJSON(response, url)

    def _agent(self) -> HTTPPool:
        target: Any = self.backends(1)[0]
        agent: HTTPPool = target.backend.agent
        return agent

    async def size(self) -> int:
        try:
            return await self.backends(1)[0].size()
        except Exception as e:
            raise RemoteError(
                f"Cannot get the size of {self.shownURL}: {errorMessage(e)}"
            ) from None

    async def written(self) -> RangeSet:
        """
        @return: The ranges this ticket's uploads wrote (C{GET .../written}).
        @raise NotSupported: If the server does not track them.
        """
        try:
            msg = await self._getJSON("/written")
        except RemoteError as e:
            # Older servers: no such route (404, 405), or the path taken for
            # a ticket id (upstream 2.x answers 403). The ticket itself was
            # just accepted by OPTIONS.
            if e.status in (403, 404, 405):
                raise NotSupported(str(e)) from None
            raise
        written = RangeSet()
        items = msg.get("written") if isinstance(msg, dict) else None
        if not isinstance(items, list):
            raise RemoteError(f"Invalid answer from {self.shownURL}/written")
        for item in items:
            start, length = item.get("start"), item.get("length")
            if type(start) is not int or type(length) is not int or start < 0 or length < 0:
                raise RemoteError(f"Invalid answer from {self.shownURL}/written")
            written.add(start, start + length)
        return written

    async def checksum(self, algorithm: str | None = None, blockSize: int | None = None) -> Any:
        """
        @return: The server's checksum answer (C{algorithm}, C{block_size},
            C{checksum}).
        """
        query = []
        if algorithm:
            query.append(f"algorithm={algorithm}")
        if blockSize:
            query.append(f"block_size={blockSize}")
        return await self._getJSON("/checksum", "&".join(query))

    def close(self) -> Deferred[None]:
        from twisted.internet.defer import DeferredList

        ds: list[Deferred[Any]] = [b.close() for b in self._backends]
        if self._first is not None:
            ds.append(self._first.closeCachedConnections())
            self._first = None
        self._backends.clear()
        return DeferredList(ds, consumeErrors=True).addCallback(lambda _: None)


async def openRemote(
    reactor: Any,
    url: str,
    *,
    cafile: str | None,
    secure: bool,
    bufferSize: int,
    useUnix: bool = True,
    runInPool: Callable[..., Deferred[Any]] | None = None,
) -> Remote:
    """
    Ask the server at C{url} what it offers, and switch to its UNIX socket
    when it is on this host.

    @raise RemoteError: If the server cannot be reached or refuses the
        ticket.
    @raise ValueError: For a URL that is not an images URL, or an unusable
        CA file.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"Not an https URL: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("Credentials in the URL are not allowed")
    if not parts.path.startswith("/images/") or len(parts.path) <= len("/images/"):
        raise ValueError(f"Not an images URL (https://host:port/images/TICKET): {_shown(url)}")
    clean = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    connector = Connector(reactor, cafile, secure)
    first = connector.agent()
    options = await _options(reactor, first, clean)
    remote = Remote(reactor, clean, options, connector, bufferSize, first, runInPool)
    if useUnix and options.unixSocket is not None and runInPool is not None:
        local = await runInPool(isLocalHost, parts.hostname)
        if local:
            unix = Connector(reactor, cafile, secure)
            unix.useUnix(options.unixSocket)
            pool = unix.agent()
            try:
                unixOptions = await _options(reactor, pool, unixURL(clean))
            except RemoteError:
                # Keep TLS, as upstream does.
                await pool.closeCachedConnections()
            else:
                await first.closeCachedConnections()
                remote = Remote(
                    reactor,
                    clean,
                    ServerOptions(
                        unixOptions.features,
                        unixOptions.maxReaders,
                        unixOptions.maxWriters,
                        options.unixSocket,
                    ),
                    unix,
                    bufferSize,
                    pool,
                    runInPool,
                )
    return remote


async def _options(reactor: Any, agent: HTTPPool, url: str) -> ServerOptions:
    response = await request(reactor, agent, b"OPTIONS", url, {b"cache-control": b"no-cache"})
    if response.code == 200:
        try:
            body = await httpclient.collectBody(response, MAX_SMALL_BODY)
        except Exception as e:
            raise RemoteError(
                f"Cannot read the answer of {_shown(url)}: {errorMessage(e)}"
            ) from None
        return parseOptions(body)
    if response.code in (204, 405):
        # Servers before 1.3 and 1.x proxies: GET and PUT only.
        await httpclient.collectBody(response, 512, truncate=True)
        return ServerOptions()
    await raiseFor(response, url)
    raise AssertionError("not reached")


#: Pieces a streaming body hands to the transport at once.
STREAM_CHUNK = 1024 * 1024


@implementer(IBodyProducer)
class StreamBody:
    """
    A C{PUT} body read from a source backend while it is sent: the next
    piece is read into a free buffer while the last one goes out, so the
    server receives one long stream instead of a request per buffer.

    At most one read is in flight on the source and at most
    C{len(views)} buffers are used; the transport's pause stops the
    sending, and with it the reading once every buffer is full.

    @ivar error: Why a source read failed, if one did.
    """

    def __init__(
        self,
        read: Callable[[int, memoryview], Deferred[int]],
        offset: int,
        length: int,
        views: list[memoryview],
    ) -> None:
        self.length = length
        self.error: BaseException | None = None
        self._read = read
        self._next = offset
        self._end = offset + length
        self._free = list(views)
        self._ready: list[memoryview] = []
        self._position = 0
        self._sent = 0
        self._consumer: Any = None
        self._done: Deferred[None] | None = None
        self._reading: Deferred[int] | None = None
        self._idle: list[Deferred[None]] = []
        self._paused = False
        self._stopped = False
        self._pumping = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._consumer = consumer
        self._done = Deferred(lambda _: self.stopProducing())
        self._fill()
        return self._done

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._stopped = True
        self._ready.clear()

    def idle(self) -> Deferred[None]:
        """
        @return: A Deferred firing once no read is in flight: the buffers
            are free again.
        """
        if self._reading is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def _fill(self) -> None:
        if self._stopped or self._reading is not None or not self._free or self._next >= self._end:
            return
        view = self._free.pop()
        piece = view[: min(len(view), self._end - self._next)]
        offset = self._next
        self._reading = d = self._read(offset, piece)

        def read(n: int) -> None:
            self._reading = None
            if n != len(piece):
                raise OSError(5, f"Short read at offset {offset}: {n} of {len(piece)} bytes")
            self._next += n
            self._ready.append(piece)
            self._pump()
            self._fill()

        def failed(reason: Failure) -> None:
            self._reading = None
            self.error = reason.value
            self._stopped = True
            if self._done is not None and not self._done.called:
                self._done.errback(reason)

        def idle(_: object) -> None:
            if self._reading is not None:
                # The next read started: its own completion will tell.
                return
            waiters, self._idle = self._idle, []
            for w in waiters:
                w.callback(None)

        d.addCallback(read).addErrback(failed).addBoth(idle)

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._paused and not self._stopped and self._ready:
                piece = self._ready[0]
                end = min(self._position + STREAM_CHUNK, len(piece))
                chunk = bytes(piece[self._position : end])
                self._position = end
                if end == len(piece):
                    self._ready.pop(0)
                    self._position = 0
                    self._free.append(_base(piece))
                self._sent += len(chunk)
                self._consumer.write(chunk)
                if end == len(piece):
                    self._fill()
        finally:
            self._pumping = False
        if self._sent == self.length and self._done is not None and not self._done.called:
            self._done.callback(None)


def _base(piece: memoryview) -> memoryview:
    """
    @return: The whole buffer C{piece} is a slice of.
    """
    obj = piece.obj
    return memoryview(obj) if not isinstance(obj, memoryview) else obj


@implementer(IBackend)
@define(eq=False)
class StreamingTarget:
    """
    An http backend as a copy target that also takes long streamed writes
    (L{writeStream}): a request per tens of MiB instead of one per buffer.
    """

    reactor: Any
    backend: Any
    url: str

    @property
    def name(self) -> str:
        return str(self.backend.name)

    @property
    def blockSize(self) -> int:
        return int(self.backend.blockSize)

    @property
    def maxReaders(self) -> int:
        return int(self.backend.maxReaders)

    @property
    def maxWriters(self) -> int:
        return int(self.backend.maxWriters)

    def size(self) -> Deferred[int]:
        d: Deferred[int] = self.backend.size()
        return d

    def readInto(self, offset: int, buf: memoryview) -> Deferred[int]:
        d: Deferred[int] = self.backend.readInto(offset, buf)
        return d

    def write(self, offset: int, data: memoryview) -> Deferred[int]:
        d: Deferred[int] = self.backend.write(offset, data)
        return d

    def zero(self, offset: int, length: int) -> Deferred[None]:
        d: Deferred[None] = self.backend.zero(offset, length)
        return d

    def flush(self) -> Deferred[None]:
        d: Deferred[None] = self.backend.flush()
        return d

    def extents(self, context: str, start: int, length: int) -> Deferred[Any]:
        d: Deferred[Any] = self.backend.extents(context, start, length)
        return d

    def close(self) -> Deferred[None]:
        d: Deferred[None] = self.backend.close()
        return d

    async def readStream(
        self,
        offset: int,
        length: int,
        write: Callable[[int, memoryview], Deferred[int]],
        views: list[memoryview],
    ) -> None:
        """
        Read C{length} bytes at C{offset} in one ranged C{GET}, writing them
        with C{write} from C{views} as they arrive.
        """
        headers = Headers({b"range": [b"bytes=%d-%d" % (offset, offset + length - 1)]})
        d = self.backend.agent.request(b"GET", self.url.encode("ascii"), headers)
        d.addTimeout(httpclient.READ_TIMEOUT, self.reactor)
        try:
            response = await d
        except Exception:
            raise networkError(Failure(), self.url) from None
        if response.code != 206:
            if 200 <= response.code < 300:
                httpclient.discardBody(response)
                raise RemoteError(f"Unexpected answer from the server: {response.code}")
            await raiseFor(response, self.url)
        if response.length != length:
            httpclient.discardBody(response)
            raise RemoteError(
                f"Invalid answer from the server: expected {length} bytes, got {response.length}"
            )
        receiver = _StreamReceiver(
            write, offset, length, views, self.reactor, httpclient.READ_TIMEOUT
        )
        response.deliverBody(receiver)
        try:
            await receiver.done
        except (StreamError, ResponseFailed) as e:
            raise RemoteError(
                f"Download from {_shown(self.url)} failed: {errorMessage(e)}"
            ) from None

    async def writeStream(
        self,
        offset: int,
        length: int,
        read: Callable[[int, memoryview], Deferred[int]],
        views: list[memoryview],
    ) -> None:
        """
        Write C{length} bytes at C{offset} in one C{PUT}, reading them with
        C{read} into C{views} as they are sent.
        """
        body = StreamBody(read, offset, length, views)
        features = self.backend.features
        query = "?flush=n" if "flush" in features else ""
        headers = Headers(
            {
                b"content-type": [b"application/octet-stream"],
                b"content-range": [b"bytes %d-%d/*" % (offset, offset + length - 1)],
            }
        )
        d = self.backend.agent.request(b"PUT", (self.url + query).encode("ascii"), headers, body)
        # The whole request: the read timeout plus a second per MiB.
        d.addTimeout(httpclient.READ_TIMEOUT + length / 1024**2, self.reactor)
        try:
            response = await d
        except Exception:
            reason = Failure()
            await body.idle()
            if body.error is not None:
                raise body.error from None
            raise networkError(reason, self.url) from None
        await body.idle()
        if response.code not in (200, 204):
            await raiseFor(response, self.url)
        await httpclient.collectBody(response, 512, truncate=True)


class _StreamReceiver(Protocol):
    """
    Receives a long ranged C{GET} body into a few buffers and writes each
    full buffer to the target while the next one fills. When every buffer
    is full or being written, the response is paused.
    """

    def __init__(
        self,
        write: Callable[[int, memoryview], Deferred[int]],
        offset: int,
        length: int,
        views: list[memoryview],
        clock: Any,
        timeout: float,
    ) -> None:
        self.done: Deferred[None] = Deferred()
        self._write = write
        self._offset = offset
        self._length = length
        self._free = list(views)
        self._current: memoryview | None = None
        self._filled = 0
        self._received = 0
        self._queued: list[tuple[int, memoryview]] = []
        self._overflow: list[bytes] = []
        self._writing = False
        self._paused = False
        self._ended = False
        self._error: Failure | None = None
        self._watchdog = httpclient.Watchdog(clock, timeout, self._timedOut)

    def connectionMade(self) -> None:
        self._watchdog.kick()

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._watchdog.kick()
        if self._received + len(data) > self._length:
            self._fail(Failure(StreamError("Host sent more bytes than asked for")))
            return
        self._received += len(data)
        if self._overflow:
            self._overflow.append(data)
            return
        self._take(memoryview(data))

    def _take(self, data: memoryview) -> None:
        while data:
            if self._current is None:
                if not self._free:
                    # Every buffer is full: keep the rest (a socket read at
                    # most) until a write returns one.
                    self._overflow.insert(0, bytes(data))
                    self._pause()
                    return
                self._current = self._free.pop()
                self._filled = 0
            room = len(self._current) - self._filled
            n = min(room, len(data))
            self._current[self._filled : self._filled + n] = data[:n]
            self._filled += n
            data = data[n:]
            if self._filled == len(self._current):
                self._queue()

    def _queue(self) -> None:
        assert self._current is not None
        if self._filled:
            self._queued.append((self._offset, self._current[: self._filled]))
            self._offset += self._filled
        else:
            self._free.append(self._current)
        self._current = None
        self._filled = 0
        if not self._free:
            self._pause()
        self._next()

    def _next(self) -> None:
        if self._writing or self._error is not None:
            self._finish()
            return
        if not self._queued:
            self._finish()
            return
        offset, piece = self._queued.pop(0)
        self._writing = True

        def written(_: object) -> None:
            self._writing = False
            self._free.append(_base(piece))
            self._drain()
            self._next()

        def failed(reason: Failure) -> None:
            self._writing = False
            self._fail(reason)

        self._write(offset, piece).addCallbacks(written, failed)

    def _drain(self) -> None:
        """
        Move bytes kept while every buffer was full into the free ones, in
        order, and resume the response once there is room.
        """
        while self._overflow and self._error is None and (self._current is not None or self._free):
            self._take(memoryview(self._overflow.pop(0)))
        if self._ended and self._current is not None and not self._overflow:
            self._queue()
        if not self._overflow and (self._free or self._current is not None):
            self._resume()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._watchdog.stop()
        if self._error is not None:
            self._finish()
            return
        if not reason.check(ResponseDone) or self._received != self._length:
            self._error = Failure(
                StreamError(f"Body ended after {self._received} of {self._length} bytes")
            )
            if not reason.check(ResponseDone):
                self._error = reason
            self._finish()
            return
        self._ended = True
        if self._current is not None and not self._overflow:
            self._queue()
        self._finish()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def _resume(self) -> None:
        if self._paused and self.transport is not None and not self._ended:
            self._paused = False
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def _timedOut(self) -> None:
        self._fail(Failure(StreamError("Host sent nothing for too long")))

    def _fail(self, reason: Failure) -> None:
        if self._error is None:
            self._error = reason
            self._watchdog.stop()
            if self.transport is not None and not self._ended:
                self.transport.stopProducing()  # type: ignore[attr-defined]
        self._finish()

    def _finish(self) -> None:
        if self.done.called or self._writing:
            return
        if self._error is not None:
            self.done.errback(self._error)
        elif self._ended and not self._queued and self._current is None and not self._overflow:
            self.done.callback(None)
