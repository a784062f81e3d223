# -*- test-case-name: tests.test_images -*-
"""
The images API: C{/images/<ticket-id>} and its extents, checksum and
written-ranges sub-resources, plus C{/info/}.

Served on the remote HTTPS listener and the local UNIX socket. Each
request is authorized against the ticket registry; bytes move through a
backend opened once per (connection, ticket) and closed with the
connection or the ticket.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import quote

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, fail, inlineCallbacks, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.web.server import Request

import imageio
from imageio import _blkhash, _buffers, _log
from imageio._log import Logger
from imageio.backends import RELAYED_HEADER, relayLoop
from imageio.interfaces import (
    Extent,
    IBackend,
    IBackendOpener,
    IBodySink,
    IConnection,
    IReadIntoThen,
    UnsupportedOperation,
)
from imageio.ranges import (
    RangeError,
    RangeNotSatisfiable,
    contentRangeHeader,
    parseContentLength,
    parseContentRange,
    parseRange,
    resolveRange,
)
from imageio.tickets import (
    READ,
    WRITE,
    AuthorizationError,
    Operation,
    OperationCanceled,
    Ticket,
    TicketRegistry,
    redactURL,
    shortID,
)
from imageio.web import (
    INTERNAL_ERROR,
    CollectSink,
    DownloadProducer,
    HTTPError,
    JSONListWriter,
    ReaderStalled,
    Router,
    ShortBody,
    SpliceProducer,
    SpliceRefused,
    TruncatedImage,
    UploadSink,
    abortConnection,
    answerFailure,
    closeAfterResponse,
    connectionOf,
    cors,
    enumArg,
    exchangeOf,
    headerValues,
    isGone,
    loadJSON,
    pushProducerOf,
    queryArg,
    redactPath,
    requestBody,
    sendEmpty,
    sendError,
    sendJSON,
    setSafeHeaders,
    tooLarge,
)

log = Logger()

ALL_FEATURES = ["checksum", "extents", "flush", "zero"]
BASE_FEATURES = ["checksum", "extents"]

#: Zero requests are split into steps so cancellation acts between them.
ZERO_STEP = 128 * 1024**2

#: Ranged reads up to this size are answered from one backend read into a
#: spare buffer of the connection, without a download producer.
SMALL_READ = 256 * 1024

#: Downloads over TLS read at most this much per backend read (each of their
#: two buffers holds this much): the reactor's encryption limits them, not
#: the read, and 2 MiB chunks instead of 4 MiB take 4 MiB off the peak RSS
#: of a download (issue 12). See bench/README.rst, "Memory".
TLS_CHUNK = 2 * 1024**2

#: JSON bodies of PATCH requests are small; cap them.
MAX_PATCH_BODY = 4096


#: L{RELAYED_HEADER} as Twisted spells request header names.
_RELAYED = RELAYED_HEADER.title()


def _forbidden(error: AuthorizationError, close: bool = True) -> HTTPError:
    return HTTPError(403, str(error), close=close)


def _rangeError(error: RangeError) -> HTTPError:
    headers = []
    if isinstance(error, RangeNotSatisfiable):
        headers.append((b"content-range", error.contentRange()))
    return HTTPError(error.status, error.message, headers)


def _resolve(byteRange: Any, ticket: Ticket, imageSize: int) -> tuple[int, int]:
    """
    @return: Offset and length of C{byteRange} in an image of C{imageSize}
        bytes served through C{ticket}.
    @raise HTTPError: 416 (with what is satisfiable) for a range past the
        end, as upstream answers; the small-read and producer paths share it.
    """
    try:
        return resolveRange(byteRange, ticket.size, min(ticket.size, imageSize))
    except RangeError as e:
        raise _rangeError(e) from None


def _logRead(ticket: Ticket, offset: int, length: int) -> None:
    # Debug lines on the hot path are skipped before they are built.
    if _log.enabled(LogLevel.debug):
        log.debug(
            "READ ticket={ticketID} offset={offset} size={size}",
            ticketID=shortID(ticket.uuid),
            offset=offset,
            size=length,
        )


def contentDisposition(filename: str | None) -> bytes:
    """
    @return: C{attachment}, with the ticket's file name escaped per RFC 6266:
        plain token names as upstream writes them, others quoted, non-ASCII
        names with an ASCII fallback and C{filename*}.
    """
    if not filename:
        return b"attachment"
    if filename.isascii():
        if all(c.isalnum() or c in "!#$&+-.^_`|~" for c in filename):
            return f"attachment; filename={filename}".encode("ascii")
        return f'attachment; filename="{filename}"'.encode("ascii")
    fallback = filename.encode("ascii", "replace").decode("ascii").replace("?", "_")
    encoded = quote(filename, safe="")
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{encoded}".encode("ascii")


def _outOfTicket(ticket: Ticket, close: bool = False) -> HTTPError:
    """
    @return: Upstream's 416 for a request past the ticket size.
    """
    return HTTPError(
        416,
        "Requested range out of allowed range",
        [(b"content-range", b"bytes */%d" % ticket.size)],
        close=close,
    )


def _integer(msg: dict[str, Any], name: str, default: int | None = None) -> int:
    if name not in msg:
        if default is not None:
            return default
        raise HTTPError(400, f"Missing required value for {name!r}")
    value = msg[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise HTTPError(400, f"Integer required {value!r}")
    if value < 0:
        raise HTTPError(400, f"Invalid value {value} < 0")
    return value


def _boolean(msg: dict[str, Any], name: str, default: bool) -> bool:
    value = msg.get(name, default)
    if not isinstance(value, bool):
        raise HTTPError(400, f"Boolean required {value!r}")
    return value


@define(eq=False)
class _Context:
    """
    A backend opened for one ticket on one connection.
    """

    ticket: Ticket
    connection: IConnection
    #: Download buffers kept between this connection's requests.
    buffers: _buffers.BufferPool
    backend: IBackend | None = None
    _opening: list[Deferred[IBackend]] = field(factory=list)
    closed: bool = False
    #: The image size C{backend} last reported: a closed range ending
    #: inside it needs no C{size()} round trip to the disk-io pool.
    sizeSeen: int = 0

    def imageSize(self, byteRange: Any) -> Deferred[int] | int:
        """
        @return: The image size to serve C{byteRange} from: L{sizeSeen} when
            the range is closed and ends inside it (upstream's client reads
            4 MiB ranges, each of which would cost a round trip to the
            disk-io pool), else asked. Images may grow while open (a volume
            extended under a transfer), hence asking again for a range past
            it; one that shrank while open cuts the transfer, as it would
            have a moment after asking.
        """
        if (
            byteRange is not None
            and byteRange.first is not None
            and byteRange.last is not None
            and byteRange.last < self.sizeSeen
        ):
            return self.sizeSeen
        return self.askSize()

    def askSize(self) -> Deferred[int]:
        """
        @return: The backend's size, remembered in L{sizeSeen}.
        """
        assert self.backend is not None

        def seen(size: int) -> int:
            self.sizeSeen = size
            return size

        return self.backend.size().addCallback(seen)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.buffers.close()
        if self.connection.contexts.get(self.ticket) is self:
            del self.connection.contexts[self.ticket]
        self.ticket.connections.pop(self.connection, None)
        if self.backend is not None:
            backend, self.backend = self.backend, None
            backend.close().addErrback(lambda f: log.failure("Closing backend failed", f))


@define
class ImagesService:
    """
    What the images handlers share.

    @ivar unixSocket: The local socket name advertised in OPTIONS, or
        C{None} when the local listener is disabled.
    """

    registry: TicketRegistry
    opener: IBackendOpener
    clock: IReactorTime
    runInPool: Callable[..., Deferred[Any]]
    bufferSize: int = 8 * 1024**2
    unixSocket: str | None = None
    #: The memory all transfer buffers and checksum blocks share.
    budget: _buffers.BufferBudget = field(factory=_buffers.BufferBudget)
    #: Send large downloads from direct files over plain sockets with
    #: C{splice(2)} (L{imageio.web.SpliceProducer}).
    splice: bool = True

    @property
    def chunkSize(self) -> int:
        """
        Size of each of the two buffers a transfer uses (one being filled
        while the other is on the wire or on the disk): a connection holds
        at most C{bufferSize} bytes, as upstream's single buffer.
        """
        return max(_buffers.ALIGNMENT, self.bufferSize // 2)

    def readChunkSize(self, request: Request) -> int:
        """
        Size of each of the two buffers a download on C{request}'s
        connection reads into: L{chunkSize}, at most L{TLS_CHUNK} over TLS.
        """
        if request.isSecure():
            return min(self.chunkSize, TLS_CHUNK)
        return self.chunkSize

    def authorize(self, ticketID: str, op: str, close: bool = True) -> Ticket:
        try:
            return self.registry.authorize(ticketID, op)
        except AuthorizationError as e:
            raise _forbidden(e, close) from None

    def openedBackend(self, request: Request, ticket: Ticket) -> IBackend | None:
        """
        @return: The backend of this connection for C{ticket} if it is open
            and the request may use it, else C{None}: then L{backendFor}
            opens it, waits for it, or refuses the request.
        """
        ctx = self.openedContext(request, ticket)
        return ctx.backend if ctx is not None else None

    def openedContext(self, request: Request, ticket: Ticket) -> _Context | None:
        """
        @return: This connection's context for C{ticket} (its backend and
            spare buffers) if the backend is open and the request may use
            it (see L{openedBackend}), else C{None}.
        """
        ctx: _Context | None = connectionOf(request).contexts.get(ticket)
        if ctx is None or ctx.backend is None:
            return None
        if headerValues(request.requestHeaders, _RELAYED) is not None:
            # backendFor decides whether that would be a loop.
            return None
        return ctx

    def backendFor(self, request: Request, ticket: Ticket) -> Deferred[IBackend]:
        """
        @return: The backend of this connection for C{ticket}, opening it on
            the connection's first request for the ticket.
        """
        loop = relayLoop(ticket.url, request.requestHeaders.hasHeader(RELAYED_HEADER))
        if loop is not None:
            log.warn(
                "Refusing a relayed request for ticket {ticketID}: its URL {url} would relay "
                "it again",
                ticketID=shortID(ticket.uuid),
                url=redactURL(ticket.url),
            )
            return fail(HTTPError(508, str(loop), close=True))
        connection = connectionOf(request)
        ctx: _Context | None = connection.contexts.get(ticket)
        if ctx is not None and ctx.backend is not None:
            return succeed(ctx.backend)
        d: Deferred[IBackend] = Deferred()
        if ctx is not None:
            ctx._opening.append(d)
            return d
        ctx = _Context(ticket, connection, _buffers.BufferPool(self.budget))
        ctx._opening.append(d)
        connection.contexts[ticket] = ctx
        ticket.connections[connection] = ctx.close
        connection.addCloseHook(ctx.close)
        # From now on the connection lives by the ticket's inactivity timeout.
        connection.setIdleTimeout(ticket.inactivityTimeout)

        def opened(backend: IBackend) -> None:
            waiters, ctx._opening = ctx._opening, []
            if ctx.closed:
                backend.close()
                for w in waiters:
                    w.errback(
                        Failure(
                            _forbidden(
                                AuthorizationError(f"Transfer={ticket.transferID} was canceled")
                            )
                        )
                    )
                return
            ctx.backend = backend
            for w in waiters:
                w.callback(backend)

        def failed(reason: Failure) -> None:
            # One ERROR line says it all (a missing image file is a
            # configuration problem, not a bug): no traceback later.
            log.error(
                "Opening {url} for ticket {ticketID} failed: {error}",
                url=redactURL(ticket.url),
                ticketID=shortID(ticket.uuid),
                error=reason.getErrorMessage(),
            )
            if isinstance(reason.value, OSError):
                reason.value.imageioLogged = True  # type: ignore[attr-defined]
            waiters, ctx._opening = ctx._opening, []
            ctx.close()
            for w in waiters:
                w.errback(reason)

        self.opener.open(
            ticket.url, write=WRITE in ticket.ops, sparse=ticket.sparse, dirty=ticket.dirty
        ).addCallbacks(opened, failed)
        return d

    def buffersFor(self, request: Request, ticket: Ticket) -> _buffers.BufferPool | None:
        """
        @return: The spare download buffers of this connection's context for
            C{ticket}, if it has one.
        """
        ctx: _Context | None = connectionOf(request).contexts.get(ticket)
        return ctx.buffers if ctx is not None else None

    def startOperation(self, ticket: Ticket, op: Operation) -> None:
        try:
            self.registry.startOperation(ticket, op)
        except AuthorizationError as e:
            raise _forbidden(e) from None

    def finishOperation(self, ticket: Ticket, op: Operation) -> None:
        self.registry.finishOperation(ticket, op)

    def flush(
        self, ticket: Ticket, backend: IBackend, running: Operation | None = None
    ) -> Deferred[None]:
        """
        Flush C{backend}; ranges written before the flush started, including
        those of the C{running} operation that asks for the flush, count as
        durable for the ticket's written-ranges report.
        """
        pending = ticket.flushStarted()
        if running is not None and running.done:
            pending.add(running.offset, running.offset + running.done)
        d = backend.flush()
        d.addCallback(lambda _: ticket.flushed(pending))
        return d


def _ticketID(ticketID: str) -> str:
    if not ticketID:
        raise HTTPError(400, "Ticket id is required")
    return ticketID


def _failureToHTTP(reason: Failure, request: Request) -> Failure:
    """
    Map data path failures to responses: cancellation to 403 (and close),
    storage errors to 500 with upstream's generic text. The error itself
    (an OS error text, an NBD socket path and export name) goes to the log
    only, with the ticket id shortened.
    """
    if reason.check(HTTPError):
        return reason
    if reason.check(AuthorizationError):
        return Failure(_forbidden(reason.value))  # type: ignore[arg-type]
    if reason.check(UnsupportedOperation):
        return Failure(HTTPError(404, f"Operation not supported: {reason.value}"))
    if reason.check(OSError):
        # The details (paths, OS error texts) go to the log only.
        if not getattr(reason.value, "imageioLogged", False):
            log.error(
                "{method} {path}: storage operation failed: {error}",
                method=request.method.decode("ascii", "replace"),
                path=redactPath(request.uri),
                error=str(reason.value),
            )
        return Failure(HTTPError(500, INTERNAL_ERROR, close=True))
    return reason


#: Headers of a GET response, dropped when it turns into an error.
_GET_HEADERS = (
    b"content-length",
    b"content-type",
    b"content-disposition",
    b"accept-ranges",
    b"content-range",
)


@define
class ImageHandler:
    """
    C{/images/<ticket-id>}: OPTIONS, GET (and HEAD), PUT, PATCH.
    """

    service: ImagesService

    # OPTIONS

    def handleOPTIONS(self, request: Request, ticketID: str) -> Deferred[Any] | None:
        cors(request, b"OPTIONS,GET,PUT")
        _ticketID(ticketID)
        options: dict[str, object] = {}
        if self.service.unixSocket is not None:
            options["unix_socket"] = self.service.unixSocket
        if ticketID == "*":
            options["features"] = ALL_FEATURES
            sendJSON(request, options, headers=[(b"allow", b"OPTIONS,GET,PUT,PATCH")])
            return None
        ticket = self.service.authorize(ticketID, READ)

        def respond(backend: IBackend) -> None:
            self.service.registry.touch(ticket)
            allow = ["OPTIONS"]
            if ticket.may(READ):
                allow.append("GET")
                options["features"] = BASE_FEATURES
            if ticket.may(WRITE):
                allow.extend(("PUT", "PATCH"))
                options["features"] = ALL_FEATURES
            options["max_readers"] = backend.maxReaders
            options["max_writers"] = backend.maxWriters
            sendJSON(request, options, headers=[(b"allow", ",".join(allow).encode())])

        d = self.service.backendFor(request, ticket)
        d.addCallback(respond)
        d.addErrback(_failureToHTTP, request)
        return d

    # GET and HEAD

    def handleGET(self, request: Request, ticketID: str) -> Deferred[Any] | None:
        cors(request)
        if not ticketID:
            _ticketID(ticketID)
        if queryArg(request, "close") == "y":
            closeAfterResponse(request)
        # request.getHeader(b"range"), in one dict lookup.
        ranges = headerValues(request.requestHeaders, b"Range")
        rangeHeader = ranges[-1] if ranges else None
        byteRange = None
        if rangeHeader is not None:
            try:
                byteRange = parseRange(rangeHeader)
            except RangeError as e:
                # Every 416 says what is satisfiable (RFC 9110 15.5.17): the
                # ticket size, known once the ticket is (a bad ticket is 403).
                ticket = self.service.authorize(ticketID, READ)
                raise HTTPError(
                    e.status, e.message, [(b"content-range", b"bytes */%d" % ticket.size)]
                ) from None
        ticket = self.service.authorize(ticketID, READ)
        ctx = self.service.openedContext(request, ticket)
        if ctx is not None:
            # The connection's backend is open (every request after its
            # first): no Deferred to wait for it.
            backend = ctx.backend
            assert backend is not None
            try:
                d = self._read(backend, request, ticket, byteRange, ctx.buffers)
            except Exception:
                d = fail()
            if d is None:
                # A small read answering by itself (IReadIntoThen).
                return None
        else:
            d = self.service.backendFor(request, ticket)
            d.addCallback(self._read, request, ticket, byteRange)
        d.addErrback(_failureToHTTP, request)
        return d

    def _read(
        self,
        backend: IBackend,
        request: Request,
        ticket: Ticket,
        byteRange: Any,
        pool: _buffers.BufferPool | None = None,
    ) -> Deferred[Any] | None:
        """
        @param pool: The connection's spare buffers for C{ticket}, if the
            caller has them at hand.
        @return: The outcome, for the handler's and the router's errbacks;
            C{None} for a small read that answers failures itself.
        """
        oneRead = self._oneRead(request, ticket, byteRange)
        if oneRead and byteRange.last - byteRange.first < SMALL_READ:
            if pool is None:
                pool = self.service.buffersFor(request, ticket)
            spare = pool.take() if pool is not None else None
            if pool is not None and spare is not None:
                return self._readSmall(backend, request, ticket, byteRange, pool, *spare)
        d: Deferred[Any] = self._startRead(backend, request, ticket, byteRange, oneRead)
        return d

    def _readSmall(
        self,
        backend: IBackend,
        request: Request,
        ticket: Ticket,
        byteRange: Any,
        pool: _buffers.BufferPool,
        buf: memoryview,
        lease: _buffers.Lease,
    ) -> Deferred[Any] | None:
        """
        A small range inside the ticket (random reads), with a spare buffer
        of the connection: one backend read into it, then the response in
        one piece (it is copied for the transport anyway, see
        C{imageio.web.DownloadProducer}), without a download producer.
        Failures are answered as the producer's are before the headers.

        @return: The read's Deferred, whose outcome the handler's and the
            router's errbacks see; or C{None} when the backend gives the
            outcome to a plain function (L{IReadIntoThen}), which then
            answers a failure as they would (no Deferred, no callback chain
            per request).
        """
        offset, length = byteRange.first, byteRange.last - byteRange.first + 1
        op = Operation("read", offset)
        try:
            self.service.startOperation(ticket, op)
        except HTTPError:
            pool.give(buf, lease)
            raise
        if _log.enabled(LogLevel.debug):
            _logRead(ticket, offset, length)
        # The read's own Deferred is the handler's result (no Deferred of
        # our own per request): what the callback returns is the outcome
        # the handler's and the router's errbacks see. Once the outcome is
        # decided (answered, canceled, or left to them), later events are
        # ignored.
        decided = False

        def canceled() -> None:
            # Answered at once, as the router answers a failed handler; the
            # buffer comes back when the read ends.
            nonlocal decided
            if not decided:
                decided = True
                self.service.finishOperation(ticket, op)
                error = OperationCanceled(f"Transfer {ticket.transferID} was canceled")
                answerFailure(request, _failureToHTTP(Failure(error), request))

        def done(n: object) -> object:
            nonlocal decided
            data = bytes(buf[:n]) if isinstance(n, int) and n == length else None
            pool.give(buf, lease)
            if decided:
                return None
            op.onCancel = None
            gone = isGone(request)
            if data is not None and not gone:
                op.done = length
            self.service.finishOperation(ticket, op)
            if gone:
                decided = True
                return None
            if data is None:
                decided = True
                if isinstance(n, int):
                    # The range ends past the image: answer as upstream does.
                    sized = self._askSize(request, ticket, backend)
                    sized.addCallback(self._shortRead, ticket, byteRange, offset, n)
                    return sized
                if isinstance(n, Failure):
                    return n
                return Failure(TypeError(f"Backend read returned {n!r}"))
            request.setResponseCode(206)
            # The same headers as _startRead's, in the same order, without
            # Twisted's encoding and sanitizing of each (about ten calls).
            headers = {
                b"Content-Length": [b"%d" % length],
                b"Content-Type": [b"application/octet-stream"],
            }
            disposition = contentDisposition(ticket.filename)
            # Ticket file names cannot hold control characters; should one,
            # Twisted's sanitizing takes care of it.
            safe = b"\r" not in disposition and b"\n" not in disposition
            if safe:
                headers[b"Content-Disposition"] = [disposition]
            headers[b"Accept-Ranges"] = [b"bytes"]
            headers[b"Content-Range"] = [contentRangeHeader(offset, length, ticket.size)]
            setSafeHeaders(request.responseHeaders, headers)
            if not safe:
                request.setHeader(b"content-disposition", disposition)
            request.write(data)
            request.finish()
            decided = True
            return None

        def safely(n: object) -> object:
            # A bug after the read (writing the response) must not leave the
            # request hanging: the router logs it and cuts or answers 500.
            nonlocal decided
            try:
                return done(n)
            except Exception:
                if not decided:
                    decided = True
                    return Failure()
                log.failure("Answering a small read failed")
                return None

        op.onCancel = canceled
        if IReadIntoThen.providedBy(backend):

            def answer(f: Failure) -> None:
                # What the handler's and the router's errbacks do.
                answerFailure(request, _failureToHTTP(f, request))

            def then(n: object) -> None:
                outcome = safely(n)
                if outcome is None:
                    return
                if isinstance(outcome, Failure):
                    answer(outcome)
                else:
                    # A short read asking the image size (_shortRead).
                    cast("Deferred[object]", outcome).addErrback(answer)

            backend.readIntoThen(offset, buf[:length], then)
            return None
        result: Deferred[Any] = backend.readInto(offset, buf[:length])
        result.addBoth(safely)
        return result

    def _shortRead(
        self, imageSize: int, ticket: Ticket, byteRange: Any, offset: int, n: int
    ) -> None:
        _resolve(byteRange, ticket, imageSize)
        raise TruncatedImage(f"Expected {byteRange.last - offset + 1} bytes at {offset}, got {n}")

    def _imageSize(
        self, request: Request, ticket: Ticket, backend: IBackend, byteRange: Any
    ) -> Deferred[int] | int:
        """
        @return: The image size to serve C{byteRange} from (see
            L{_Context.imageSize}).
        """
        ctx = self._contextOf(request, ticket, backend)
        return backend.size() if ctx is None else ctx.imageSize(byteRange)

    def _askSize(self, request: Request, ticket: Ticket, backend: IBackend) -> Deferred[int]:
        """
        @return: C{backend.size()}, remembered for the next ranges.
        """
        ctx = self._contextOf(request, ticket, backend)
        d: Deferred[int] = backend.size() if ctx is None else ctx.askSize()
        return d

    @staticmethod
    def _contextOf(request: Request, ticket: Ticket, backend: IBackend) -> _Context | None:
        ctx: _Context | None = connectionOf(request).contexts.get(ticket)
        return ctx if ctx is not None and ctx.backend is backend else None

    @inlineCallbacks
    def _startRead(
        self, backend: IBackend, request: Request, ticket: Ticket, byteRange: Any, oneRead: bool
    ) -> Any:
        """
        @param oneRead: What L{_oneRead} answered for this request.
        """
        imageSize: int | None = None
        if oneRead:
            # Small ranges inside the ticket (random reads): the read itself
            # tells whether the image has the bytes, which saves a size()
            # round trip to the disk-io pool on every request.
            offset, length = byteRange.first, byteRange.last - byteRange.first + 1
            if self.service.splice and SpliceProducer.applies(request, backend, length):
                # A spliced range is read in pipe-sized steps, and a short
                # image must still be a 416 before the head: ask first
                # (upstream's client asks 4 MiB at a time).
                imageSize = yield self._imageSize(request, ticket, backend, byteRange)
                offset, length = _resolve(byteRange, ticket, imageSize)
        else:
            imageSize = yield self._imageSize(request, ticket, backend, byteRange)
            offset, length = _resolve(byteRange, ticket, imageSize)
        request.setHeader(b"content-length", b"%d" % length)
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-disposition", contentDisposition(ticket.filename))
        request.setHeader(b"accept-ranges", b"bytes")
        if byteRange is not None:
            request.setResponseCode(206)
            request.setHeader(b"content-range", contentRangeHeader(offset, length, ticket.size))
        if request.method == b"HEAD" or length == 0:
            request.write(b"")
            request.finish()
            return
        op = Operation("read", offset)
        self.service.startOperation(ticket, op)
        _logRead(ticket, offset, length)
        # What either producer streams, and where from.
        common = (request, backend, offset, length, op, self.service.clock)

        def cancelWith(producer: DownloadProducer | SpliceProducer) -> None:
            # Canceling the operation cancels the producer.
            op.onCancel = lambda: producer.cancel(
                OperationCanceled(f"Transfer {ticket.transferID} was canceled")
            )

        try:
            if (
                self.service.splice
                and imageSize is not None
                and SpliceProducer.applies(request, backend, length)
            ):
                # A plain socket and a direct file: file -> pipe -> socket
                # in the kernel. The size is known, so a short image is a
                # 416 before the head, as below, whichever read finds it.
                spliced = SpliceProducer(*common, idleTimeout=ticket.inactivityTimeout)
                cancelWith(spliced)
                try:
                    yield spliced.start()
                    return
                except SpliceRefused:
                    # Nothing was written: the usual path below.
                    op.onCancel = None
            producer = DownloadProducer(
                *common,
                bufferSize=self.service.readChunkSize(request),
                idleTimeout=ticket.inactivityTimeout,
                pool=self.service.buffersFor(request, ticket),
                budget=self.service.budget,
            )
            cancelWith(producer)
            yield producer.start()
        except Exception:
            yield self._readFailed(Failure(), request, ticket, byteRange, backend)
        finally:
            self.service.finishOperation(ticket, op)

    @inlineCallbacks
    def _readFailed(
        self,
        f: Failure,
        request: Request,
        ticket: Ticket,
        byteRange: Any,
        backend: IBackend,
    ) -> Any:
        """
        A download producer failed with C{f}: answer an error if the head
        is not out yet, else log why and cut the connection.
        """
        if isGone(request):
            return
        if not request.startedWriting:
            # Failed before the first byte: the headers are not out yet,
            # so the client gets a proper error instead of a cut.
            for name in _GET_HEADERS:
                request.responseHeaders.removeHeader(name)
            request.setResponseCode(200)
            if f.check(TruncatedImage):
                # The range ends past the image (which may have shrunk since
                # its size was asked or seen): answer as upstream does.
                size = yield self._askSize(request, ticket, backend)
                _resolve(byteRange, ticket, size)
            f.raiseException()
        if f.check(OperationCanceled):
            log.info("Download for ticket {ticketID} canceled", ticketID=shortID(ticket.uuid))
        elif f.check(ReaderStalled):
            # A client that stopped reading is cut as planned: not an error.
            log.info(
                "Download for ticket {ticketID} cut: {reason}",
                ticketID=shortID(ticket.uuid),
                reason=f.getErrorMessage(),
            )
        elif not f.check(ConnectionError):
            log.failure("Download for ticket {ticketID} was cut", f, ticketID=shortID(ticket.uuid))
        abortConnection(request)

    def _oneRead(self, request: Request, ticket: Ticket, byteRange: Any) -> bool:
        """
        @return: Whether this GET is a closed range inside the ticket that one
            read covers, so a short read can still become a 416.
        """
        if not (
            request.method == b"GET"
            and byteRange is not None
            and byteRange.first is not None
            and byteRange.last is not None
            and byteRange.last < ticket.size
        ):
            return False
        span: int = byteRange.last - byteRange.first
        if span < TLS_CHUNK and span < self.service.chunkSize:
            # One read whatever the transport (small reads: not asked).
            return True
        return span < self.service.readChunkSize(request)

    # PUT

    def bodySinkPUT(self, request: Request, length: int | None, ticketID: str) -> IBodySink:
        """
        Validate an upload from its headers and stream its body to storage.

        Errors raised here are answered before the body is read, and the
        connection closed.
        """
        cors(request)
        _ticketID(ticketID)
        try:
            declared = parseContentLength(
                list(request.requestHeaders.getRawHeaders(b"content-length") or []) or None
            )
        except RangeError as e:
            raise HTTPError(e.status, e.message, close=True) from None
        if declared is None or length is None:
            raise HTTPError(400, "Content-Length header is required", close=True)
        offset = 0
        contentRange = request.getHeader(b"content-range")
        if contentRange is not None:
            try:
                offset = parseContentRange(contentRange).first
            except RangeError as e:
                raise HTTPError(e.status, e.message, close=True) from None
        flush = enumArg(request, "flush", ("y", "n"), "y")
        ticket = self.service.authorize(ticketID, WRITE)
        if offset + length > ticket.size:
            raise _outOfTicket(ticket, close=True)
        exchange = exchangeOf(request)
        op = Operation("write", offset)
        self.service.startOperation(ticket, op)
        backend = self.service.backendFor(request, ticket)
        sink = UploadSink(
            backend,
            offset,
            length,
            pushProducerOf(request),
            op,
            bufferSize=self.service.chunkSize,
            onProgress=connectionOf(request).resetTimeout,
            budget=self.service.budget,
        )
        # Answer 403 and close at once on cancel, even while waiting for a
        # slow client, as upstream does for a PUT in progress.
        op.onCancel = lambda: exchange.respondEarly(
            _forbidden(AuthorizationError(f"Transfer {ticket.transferID} was canceled"))
        )
        exchange.pending = _Upload(ticket, op, sink, flush == "y")
        sink.whenDone().addBoth(self._uploadDone, ticket, op)
        sink.whenDone().addErrback(self._uploadFailedEarly, request, sink)
        log.debug(
            "WRITE ticket={ticketID} offset={offset} size={size} flush={flush}",
            ticketID=shortID(ticket.uuid),
            offset=offset,
            size=length,
            flush=flush,
        )
        return sink

    def _uploadDone(self, result: object, ticket: Ticket, op: Operation) -> None:
        # A failed upload ends here; a successful one ends in handlePUT after
        # its flush, so the ticket stays active (and DELETE waits) until then.
        if isinstance(result, Failure):
            self.service.finishOperation(ticket, op)

    def _uploadFailedEarly(self, reason: Failure, request: Request, sink: UploadSink) -> None:
        # Storage failed while the body is still arriving: answer now and
        # close rather than read (and drop) the rest of a huge body. Once the
        # body is complete, handlePUT answers.
        if sink.bodyReceived or reason.check(ShortBody):
            return
        mapped = _failureToHTTP(reason, request)
        if mapped.check(HTTPError):
            error: HTTPError = mapped.value  # type: ignore[assignment]
        else:
            log.failure("Upload failed", reason)
            error = HTTPError(500, INTERNAL_ERROR)
        exchangeOf(request).respondEarly(error)

    def handlePUT(self, request: Request, ticketID: str) -> Deferred[Any]:
        upload = exchangeOf(request).pending
        assert isinstance(upload, _Upload), upload
        if queryArg(request, "close") == "y":
            closeAfterResponse(request)
        d: Deferred[Any] = upload.sink.whenDone()
        if upload.flush:
            d.addCallback(lambda _: self.service.backendFor(request, upload.ticket))
            d.addCallback(lambda backend: self.service.flush(upload.ticket, backend, upload.op))

        def done(result: object) -> object:
            self.service.finishOperation(upload.ticket, upload.op)
            return result

        d.addBoth(done)
        d.addCallback(lambda _: sendEmpty(request))
        d.addErrback(_failureToHTTP, request)
        return d

    # PATCH

    def bodySinkPATCH(self, request: Request, length: int | None, ticketID: str) -> IBodySink:
        if length is not None and length > MAX_PATCH_BODY:
            raise tooLarge(MAX_PATCH_BODY)
        return CollectSink(exchangeOf(request), MAX_PATCH_BODY)

    def handlePATCH(self, request: Request, ticketID: str) -> Deferred[Any]:
        _ticketID(ticketID)
        msg = loadJSON(requestBody(request), "Invalid JSON message ")
        if not isinstance(msg, dict):
            raise HTTPError(400, "Invalid JSON message: expecting an object")
        op = msg.get("op")
        if "op" not in msg:
            raise HTTPError(400, "Missing required value for op")
        if op not in ("zero", "flush"):
            raise HTTPError(
                400, f"Unsupported value {op!r} for 'op', expecting one of ['flush', 'zero']"
            )
        if op == "zero":
            size = _integer(msg, "size")
            offset = _integer(msg, "offset", default=0)
            flush = _boolean(msg, "flush", False)
            ticket = self.service.authorize(ticketID, WRITE)
            if offset + size > ticket.size:
                raise _outOfTicket(ticket)
            d = self.service.backendFor(request, ticket)
            d.addCallback(self._zero, ticket, offset, size, flush)
        else:
            ticket = self.service.authorize(ticketID, WRITE)
            d = self.service.backendFor(request, ticket)
            d.addCallback(self._flush, ticket)
        d.addCallback(lambda _: sendEmpty(request))
        d.addErrback(_failureToHTTP, request)
        return d

    @inlineCallbacks
    def _zero(self, backend: IBackend, ticket: Ticket, offset: int, size: int, flush: bool) -> Any:
        op = Operation("zero", offset)
        self.service.startOperation(ticket, op)
        try:
            while op.done < size:
                if op.canceled:
                    raise OperationCanceled(f"Transfer {ticket.transferID} was canceled")
                step = min(ZERO_STEP, size - op.done)
                yield backend.zero(offset + op.done, step)
                op.done += step
            if flush:
                yield self.service.flush(ticket, backend, op)
        finally:
            self.service.finishOperation(ticket, op)

    @inlineCallbacks
    def _flush(self, backend: IBackend, ticket: Ticket) -> Any:
        op = Operation("flush")
        self.service.startOperation(ticket, op)
        try:
            yield self.service.flush(ticket, backend)
        finally:
            self.service.finishOperation(ticket, op)


@define
class _Upload:
    ticket: Ticket
    op: Operation
    sink: UploadSink
    flush: bool


@define
class ExtentsHandler:
    """
    C{GET /images/<id>/extents[?context=zero|dirty][&start=N&length=N]}.

    Reports real holes for files (SEEK_DATA/SEEK_HOLE), and accepts a
    window so multi-TiB images need not be described in one answer. Long
    answers are gathered and written in slices (L{JSONListWriter}).
    """

    service: ImagesService

    def handleGET(self, request: Request, ticketID: str) -> Deferred[Any]:
        _ticketID(ticketID)
        ticket = self.service.authorize(ticketID, READ)
        context = enumArg(request, "context", ("zero", "dirty"), "zero")
        if context == "dirty" and not ticket.dirty:
            raise HTTPError(404, "Ticket does not support dirty extents")
        start = _queryInt(request, "start", 0)
        length = _queryInt(request, "length", None)

        @inlineCallbacks
        def extents(backend: IBackend) -> Any:
            size = yield backend.size()
            end = size if length is None else min(size, start + length)
            if start > size:
                raise HTTPError(416, f"Start {start} beyond image size {size}")
            # Backends answer part of a window (the file backend caps one
            # answer); each part is merged and encoded on the pool and
            # written once the transport took the previous one, so a map of
            # millions of extents costs neither memory nor reactor time.
            writer = JSONListWriter(request, self.service.budget)
            held: Extent | None = None
            position = start
            try:
                while position < end:
                    got = yield backend.extents(context, position, end - position)
                    if not got:
                        break
                    position = got[-1].start + got[-1].length
                    items, held = yield self.service.runInPool(
                        _encodeExtents, held, got, position >= end
                    )
                    yield writer.write(items)
                if held is not None:
                    items, _ = yield self.service.runInPool(_encodeExtents, held, [], True)
                    yield writer.write(items)
                yield writer.finish()
            except Exception:
                if isGone(request):
                    # The client left: nobody to answer.
                    return
                if not writer.streaming:
                    raise
                failure = Failure()
                if not failure.check(ConnectionDone):
                    log.failure(
                        "Extents answer for ticket {ticketID} was cut",
                        failure,
                        ticketID=shortID(ticket.uuid),
                    )
                abortConnection(request)
            finally:
                writer.release()

        d = self.service.backendFor(request, ticket)
        d.addCallback(extents)
        d.addErrback(_failureToHTTP, request)
        return d


def _encodeExtents(
    held: Extent | None, extents: list[Extent], final: bool
) -> tuple[bytes, Extent | None]:
    """
    Merge a slice of extents (after C{held}, the last extent of the previous
    slice) and encode them as JSON items. Runs on the pool.

    @return: The items joined by C{", "}, and the last extent, held back to
        be merged with the next slice, unless C{final}.
    """
    merged = _merged([held, *extents] if held is not None else extents)
    keep = None if final or not merged else merged.pop()
    return json.dumps([e.toJSON() for e in merged])[1:-1].encode("utf-8"), keep


def _merged(extents: list[Extent]) -> list[Extent]:
    """
    @return: C{extents} with neighbours of the same kind joined.
    """
    merged: list[Extent] = []
    for e in extents:
        if merged:
            last = merged[-1]
            if (last.zero, last.hole, last.dirty) == (e.zero, e.hole, e.dirty) and (
                last.start + last.length == e.start
            ):
                merged[-1] = Extent(last.start, last.length + e.length, e.zero, e.hole, e.dirty)
                continue
        merged.append(e)
    return merged


def _queryInt(request: Request, name: str, default: int | None) -> Any:
    value = queryArg(request, name)
    if value is None:
        return default
    if not (value.isascii() and value.isdigit()) or len(value) > 20:
        raise HTTPError(400, f"Invalid value for {name!r}: {value[:32]!r}")
    return int(value)


@define
class ChecksumHandler:
    """
    C{GET /images/<id>/checksum}: upstream's block hash of the image.
    """

    service: ImagesService

    def handleGET(self, request: Request, ticketID: str) -> Deferred[Any]:
        _ticketID(ticketID)
        try:
            algorithm = _blkhash.checkAlgorithm(
                queryArg(request, "algorithm") or _blkhash.DEFAULT_ALGORITHM
            )
            blockSize = _blkhash.parseBlockSize(queryArg(request, "block_size"))
        except ValueError as e:
            raise HTTPError(400, str(e)) from None
        # Upstream keeps the connection open on checksum auth errors.
        ticket = self.service.authorize(ticketID, READ, close=False)
        d = self.service.backendFor(request, ticket)
        d.addCallback(self._checksum, request, ticket, algorithm, blockSize)
        d.addErrback(_failureToHTTP, request)
        return d

    @inlineCallbacks
    def _checksum(
        self, backend: IBackend, request: Request, ticket: Ticket, algorithm: str, blockSize: int
    ) -> Any:
        op = Operation("checksum", 0)
        self.service.startOperation(ticket, op)
        lease: _buffers.Lease | None = None
        try:
            size = yield backend.size()
            size = min(size, ticket.size)
            hasher = _blkhash.Hasher(algorithm, blockSize)
            # The block buffer comes from the budget all transfers share:
            # many parallel checksums wait rather than take all memory. A
            # client that leaves or a canceled ticket stops the wait.
            waiting = self.service.budget.acquire(blockSize)
            op.onCancel = waiting.cancel
            request.notifyFinish().addErrback(lambda _: waiting.cancel())
            try:
                lease = yield waiting
            except CancelledError:
                if op.canceled:
                    raise OperationCanceled(f"Transfer {ticket.transferID} was canceled") from None
                return
            finally:
                op.onCancel = None
            # Page-aligned: O_DIRECT reads go straight into it.
            buf = memoryview(_buffers.allocate(blockSize))  # type: ignore[arg-type]

            def progress(end: int) -> None:
                if op.canceled:
                    raise OperationCanceled(f"Transfer {ticket.transferID} was canceled")
                op.done = end

            yield _blkhash.hashBackend(backend, size, hasher, buf, self.service.runInPool, progress)
            result = {
                "algorithm": algorithm,
                "block_size": blockSize,
                "checksum": hasher.hexdigest(),
            }
            sendJSON(request, result)
        finally:
            if lease is not None:
                lease.release()
            self.service.finishOperation(ticket, op)


@define
class AlgorithmsHandler:
    """
    C{GET /images/<anything>/checksum/algorithms}: no authorization.
    """

    def handleGET(self, request: Request, ticketID: str) -> None:
        sendJSON(request, {"algorithms": list(_blkhash.ALGORITHMS)})


@define
class WrittenHandler:
    """
    C{GET /images/<id>/written}: which ranges this ticket's uploads wrote
    and which of those were flushed, so an interrupted upload resumes
    exactly where the server says (design item 5).
    """

    service: ImagesService

    def handleGET(self, request: Request, ticketID: str) -> None:
        _ticketID(ticketID)
        ticket = self.service.authorize(ticketID, WRITE)
        sendJSON(
            request,
            {
                "written": [{"start": s, "length": e - s} for s, e in ticket.writtenRanges()],
                "flushed": [{"start": s, "length": e - s} for s, e in ticket.flushedRanges()],
            },
        )


@define
class InfoHandler:
    """
    C{GET /info/}: the server version.
    """

    def handleGET(self, request: Request) -> None:
        cors(request)
        sendJSON(request, {"version": imageio.__version__})


def imagesResource(service: ImagesService, info: bool = True) -> Router:
    """
    Build the images API tree, with upstream's routes in upstream's order.

    @param info: Serve C{/info/} (the remote listener does, the local one
        does not).
    """
    image = ImageHandler(service)
    routes: list[tuple[str, object]] = [
        (r"^/images/(.*)/extents", ExtentsHandler(service)),
        (r"^/images/(.*)/checksum/algorithms", AlgorithmsHandler()),
        (r"^/images/(.*)/checksum", ChecksumHandler(service)),
        (r"^/images/([^/]*)/written$", WrittenHandler(service)),
        (r"^/images/(.*)", image),
    ]
    if info:
        routes.append((r"^/info/", InfoHandler()))
    return Router(routes)


__all__ = ["imagesResource", "ImagesService", "sendError", "isGone"]
