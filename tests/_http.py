"""
Shared helpers for tests that drive the real HTTP parser: an images site
over the C{memory:} backend with a fake clock, a connected channel over a
L{StringTransport}, a raw-HTTP response parser, fake backends whose
Deferreds the test fires, and the fake request the download producers
write to.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import IResource
from zope.interface import implementer

from imageio import _buffers
from imageio._buffers import BufferBudget
from imageio._diskio import SynchronousDiskIO
from imageio.backends import BackendContext, BackendOpener, memory
from imageio.daemon.images import ImagesService, imagesResource
from imageio.interfaces import Extent, IBackend, IBackendOpener, IReadIntoThen
from imageio.tickets import Ticket, TicketRegistry
from imageio.web import ImageioChannel, ImageioSite

_names = itertools.count()


@define
class Response:
    """
    One parsed HTTP response.

    @ivar headers: Header names lower-cased, in order, repeated names kept.
    """

    version: bytes
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        """
        @return: The value of the only (or first) header C{name}, or C{None}.
        """
        for key, value in self.headers:
            if key == name.lower():
                return value
        return None

    def headerNames(self) -> list[bytes]:
        return [key for key, _ in self.headers]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


def parseResponses(data: bytes, head: tuple[int, ...] = ()) -> list[Response]:
    """
    Split raw server output into responses, framed by C{Content-Length}.

    @param head: Indexes (among final responses) of answers to HEAD
        requests, which have no body whatever their C{Content-Length}.
    @raise ValueError: On anything that is not a well-framed response; an
        incomplete trailing response is an error too.
    """
    responses: list[Response] = []
    final = 0
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            raise ValueError(f"Incomplete response head: {data[:200]!r}")
        lines = data[:end].split(b"\r\n")
        data = data[end + 4 :]
        version, status, reason = (lines[0].split(b" ", 2) + [b""])[:3]
        headers = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ValueError(f"Bad header line {line!r}")
            headers.append((name.strip().lower(), value.strip()))
        code = int(status)
        if 100 <= code < 200:
            responses.append(Response(version, code, reason, headers, b""))
            continue
        lengths = [v for k, v in headers if k == b"content-length"]
        if any(k == b"transfer-encoding" for k, _ in headers):
            raise ValueError("Chunked response")
        if len(lengths) != 1:
            raise ValueError(f"Expected one Content-Length, got {lengths}")
        size = 0 if final in head else int(lengths[0])
        if len(data) < size:
            raise ValueError(f"Short body: {len(data)} of {size} bytes")
        responses.append(Response(version, code, reason, headers, data[:size]))
        data = data[size:]
        final += 1
    return responses


def parseResponse(data: bytes, head: bool = False) -> Response:
    """
    @return: The only final response in C{data} (interim 1xx are skipped).
    """
    responses = [r for r in parseResponses(data, (0,) if head else ()) if r.status >= 200]
    if len(responses) != 1:
        raise ValueError(f"Expected one response, got {len(responses)}: {data[:300]!r}")
    return responses[0]


def request(
    method: bytes,
    path: bytes,
    headers: dict[bytes, bytes] | list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
    body: bytes = b"",
    contentLength: bool | None = None,
) -> bytes:
    """
    Build a raw HTTP/1.1 request.

    @param contentLength: Add C{Content-Length}: by default when there is a
        body.
    """
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    if contentLength is None:
        contentLength = bool(body)
    lines = [b"%s %s HTTP/1.1" % (method, path), b"Host: localhost"]
    lines += [b"%s: %s" % (k, v) for k, v in items]
    if contentLength:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def uniqueName(prefix: str = "img") -> str:
    return f"{prefix}-{next(_names)}"


@implementer(IBackend)
@define
class FakeBackend:
    """
    A backend whose operations return Deferreds the test fires, and which
    records what it was asked to do. Reads and writes act on C{image}.
    """

    image: bytearray = field(factory=bytearray)
    name: str = "fake"
    blockSize: int = 1
    maxReaders: int = 8
    maxWriters: int = 1
    #: When true, write/read/flush wait for the test to fire them.
    manual: bool = True
    writes: list[tuple[int, bytes, Deferred[int]]] = field(factory=list)
    reads: list[tuple[int, memoryview, Deferred[int]]] = field(factory=list)
    flushes: list[Deferred[None]] = field(factory=list)
    zeros: list[tuple[int, int]] = field(factory=list)
    closed: int = 0
    sizeError: Exception | None = None

    def size(self) -> Deferred[int]:
        if self.sizeError is not None:
            from twisted.internet.defer import fail

            return fail(self.sizeError)
        return succeed(len(self.image))

    def readInto(self, offset: int, buf: memoryview) -> Deferred[int]:
        data = self.image[offset : offset + len(buf)]
        buf[: len(data)] = data
        d: Deferred[int] = Deferred()
        self.reads.append((offset, buf, d))
        if not self.manual:
            d.callback(len(data))
        return d

    def completeRead(self) -> None:
        """
        Fire the oldest pending read with the bytes it got.
        """
        for offset, buf, d in self.reads:
            if not d.called:
                d.callback(len(self.image[offset : offset + len(buf)]))
                return
        raise AssertionError("No pending read")

    def pendingReads(self) -> int:
        return sum(1 for _, _, d in self.reads if not d.called)

    def write(self, offset: int, data: memoryview) -> Deferred[int]:
        copy = bytes(data)
        d: Deferred[int] = Deferred()
        self.writes.append((offset, copy, d))

        def apply(n: int) -> int:
            end = offset + len(copy)
            if end > len(self.image):
                self.image.extend(bytes(end - len(self.image)))
            self.image[offset:end] = copy
            return n

        d.addCallback(apply)
        if not self.manual:
            d.callback(len(copy))
        return d

    def completeWrite(self) -> None:
        """
        Fire the oldest pending write.
        """
        for _, data, d in self.writes:
            if not d.called:
                d.callback(len(data))
                return
        raise AssertionError("No pending write")

    def pendingWrites(self) -> int:
        return sum(1 for _, _, d in self.writes if not d.called)

    def completeWrites(self) -> None:
        """
        Fire every pending write, and those the firing starts, in order.
        """
        while self.pendingWrites():
            self.completeWrite()

    def zero(self, offset: int, length: int) -> Deferred[None]:
        self.zeros.append((offset, length))
        end = offset + length
        if end > len(self.image):
            self.image.extend(bytes(end - len(self.image)))
        self.image[offset:end] = bytes(length)
        return succeed(None)

    def flush(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.flushes.append(d)
        if not self.manual:
            d.callback(None)
        return d

    def extents(self, context: str, start: int, length: int) -> Deferred[list[Extent]]:
        end = min(len(self.image), start + length)
        return succeed([Extent(start, end - start, zero=False)] if end > start else [])

    def close(self) -> Deferred[None]:
        self.closed += 1
        return succeed(None)


@implementer(IReadIntoThen)
@define
class FakeCallbackBackend(FakeBackend):
    """
    A L{FakeBackend} that also gives reads' outcomes to plain functions
    (L{IReadIntoThen}), when the test fires them; a read may fail with
    C{readError}.
    """

    readsThen: int = 0
    readError: Exception | None = None

    def readIntoThen(self, offset: int, buf: memoryview, then: Any) -> None:
        self.readsThen += 1
        if self.readError is not None:
            then(Failure(self.readError))
            return
        self.readInto(offset, buf).addBoth(then)


@implementer(IBackendOpener)
@define
class FakeOpener:
    """
    Opens C{backend} for any URL, recording the calls.
    """

    backend: Any
    opened: list[tuple[str, bool]] = field(factory=list)

    def open(self, url: str, *, write: bool, sparse: bool, dirty: bool) -> Deferred[IBackend]:
        self.opened.append((url, write))
        return succeed(self.backend)


@define
class ImagesHarness:
    """
    The images API of one daemon, in memory: a real L{TicketRegistry} on a
    L{MemoryReactorClock}, the C{memory:} backend through L{BackendOpener}
    with L{SynchronousDiskIO}, and an L{ImageioSite} to connect to.

    @ivar images: Memory image names created by L{addTicket}, removed by
        L{cleanup}.
    """

    clock: MemoryReactorClock = field(factory=MemoryReactorClock)
    opener: Any = None
    unixSocket: str | None = "\0/org/ovirt/imageio"
    info: bool = True
    #: The size of each transfer buffer (chunk); the service's buffer_size
    #: is twice that, split between the two buffers of a transfer.
    bufferSize: int = 8 * 1024**2
    removeTimeout: float = 60
    #: The memory budget of the service's transfer buffers.
    budget: BufferBudget = field(factory=BufferBudget)
    registry: TicketRegistry = field(init=False)
    service: ImagesService = field(init=False)
    site: ImageioSite = field(init=False)
    diskio: SynchronousDiskIO = field(factory=SynchronousDiskIO, init=False)
    images: list[str] = field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        self.registry = TicketRegistry(
            now=self.clock.seconds, scheduler=self.clock, removeTimeout=self.removeTimeout
        )
        if self.opener is None:
            self.opener = BackendOpener(
                BackendContext(reactor=self.clock, diskio=self.diskio, bufferSize=self.bufferSize)
            )
        self.service = ImagesService(
            registry=self.registry,
            opener=self.opener,
            clock=self.clock,
            runInPool=self.diskio.run,
            bufferSize=2 * self.bufferSize,
            unixSocket=self.unixSocket,
            budget=self.budget,
        )
        root: IResource = imagesResource(self.service, info=self.info)
        self.site = ImageioSite(root, "remote", timeout=60, reactor=self.clock)

    def cleanup(self) -> None:
        for name in self.images:
            memory.removeImage(name)

    def addTicket(
        self,
        data: bytes | None = b"",
        uuid: str = "t1",
        size: int | None = None,
        ops: tuple[str, ...] = ("read", "write"),
        imageName: str | None = None,
        **kw: Any,
    ) -> Ticket:
        """
        Add a ticket for a new memory image holding C{data}.

        The control API only accepts production schemes, so the ticket is
        added with a C{file:} URL and then pointed at C{memory:NAME}.

        @param data: The image bytes, or C{None} to leave the image to the
            test (C{imageName} must then name it).
        @param size: The ticket size, C{len(data)} by default.
        """
        name = imageName or uniqueName()
        if data is not None:
            memory.createImage(name, data)
        self.images.append(name)
        body: dict[str, Any] = {
            "uuid": uuid,
            "size": len(data or b"") if size is None else size,
            "ops": list(ops),
            "timeout": 300,
            "url": "file:///var/tmp/disk.raw",
            "transfer_id": f"tr-{uuid}",
        }
        body.update(kw)
        ticket = self.registry.add(body)
        ticket.url = f"memory:{name}"
        return ticket

    def connect(self, secure: bool = False) -> Connection:
        """
        @param secure: The transport says it is TLS (L{ISSLTransport}), as
            the daemon's HTTPS connections do.
        """
        channel: ImageioChannel = self.site.buildProtocol(None)  # type: ignore[assignment]
        # Lenient like a real transport: resuming after loseConnection is a no-op.
        transport = (_TLSStringTransport if secure else StringTransport)(lenient=True)
        channel.makeConnection(transport)
        return Connection(channel, transport)

    def roundTrip(self, raw: bytes, head: bool = False) -> Response:
        """
        Send C{raw} on a new connection and parse the single response.
        """
        conn = self.connect()
        conn.send(raw)
        return conn.response(head=head)


@implementer(ISSLTransport)
class _TLSStringTransport(StringTransport):
    """
    A L{StringTransport} that says it is TLS, as the daemon's HTTPS
    connections do (C{twisted.web} then also sets C{TCP_NODELAY}). Like a
    TLS transport it takes any buffer and is done with it (encrypted it)
    when C{write} returns.
    """

    def write(self, data: bytes | memoryview) -> None:
        super().write(bytes(data))

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass


@define
class Connection:
    """
    A channel connected to a L{StringTransport}.
    """

    channel: ImageioChannel
    transport: StringTransport
    _consumed: int = 0

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def output(self) -> bytes:
        """
        @return: Everything written since the last call.
        """
        value: bytes = self.transport.value()
        new = value[self._consumed :]
        self._consumed = len(value)
        return new

    def response(self, head: bool = False) -> Response:
        return parseResponse(self.output(), head=head)

    def responses(self) -> list[Response]:
        return parseResponses(self.output())

    @property
    def closed(self) -> bool:
        """
        The server closed (or aborted) the connection.
        """
        return bool(self.transport.disconnecting or self.transport.disconnected)

    @property
    def aborted(self) -> bool:
        return bool(getattr(self.transport, "disconnected", False))

    def lose(self, reason: Exception | None = None) -> None:
        """
        The client went away.
        """
        from twisted.internet.error import ConnectionLost

        self.channel.connectionLost(Failure(reason or ConnectionLost()))


@define
class FakeChannel:
    """
    A channel: just its transport.
    """

    transport: Any


@define
class FakeRequest:
    """
    The part of a request the download producers
    (L{imageio.web.DownloadProducer}, L{imageio.web.SpliceProducer}) use:
    what is written is kept in L{written}; L{lose} loses the connection.
    """

    channel: Any
    written: list[Any] = field(factory=list)
    producer: Any = None
    finished: bool = False
    startedWriting: bool = False
    _finishes: list[Deferred[None]] = field(factory=list)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: Any) -> None:
        self.startedWriting = True
        self.written.append(data)

    def finish(self) -> None:
        self.finished = True

    def notifyFinish(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._finishes.append(d)
        return d

    def lose(self) -> None:
        self.channel = None
        for d in self._finishes:
            d.errback(Failure(ConnectionError("lost")))

    @property
    def body(self) -> bytes:
        return b"".join(bytes(d) for d in self.written)


def chunks(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def countAllocations(test: SynchronousTestCase) -> list[int]:
    """
    Record the size of every buffer allocated during C{test}.

    @return: The list the sizes are appended to.
    """
    sizes: list[int] = []
    allocate = _buffers.allocate

    def counting(size: int) -> Any:
        sizes.append(size)
        return allocate(size)

    test.patch(_buffers, "allocate", counting)
    return sizes
