# -*- test-case-name: tests.test_interfaces -*-
"""
The seams of imageio: what a storage backend, a body sink and a streaming
upload resource promise to each other.

Everything on these interfaces is called on the reactor thread. Anything
that may block (file I/O, fsync, ioctl) is the implementation's business to
run on the disk-io thread pool (L{imageio._diskio.DiskIO}); the caller only
ever sees Deferreds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attrs import frozen
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from collections.abc import Callable

    from twisted.internet.defer import Deferred
    from twisted.python.failure import Failure
    from twisted.web.iweb import IRequest


@frozen
class Extent:
    """
    A run of bytes with uniform allocation state.

    @ivar start: Offset of the first byte.
    @ivar length: Number of bytes.
    @ivar zero: The bytes read as zeroes.
    @ivar hole: The bytes are unallocated in this layer (qcow2 over NBD with
        C{qemu:allocation-depth}); reads fall through to a backing file.
    @ivar dirty: For the C{dirty} context: the bytes changed since the
        checkpoint; C{None} in the C{zero} context.
    """

    start: int
    length: int
    zero: bool
    hole: bool = False
    dirty: bool | None = None

    def toJSON(self) -> dict[str, object]:
        """
        @return: The wire form of the extent, keys in upstream's order.
        """
        if self.dirty is None:
            return {
                "start": self.start,
                "length": self.length,
                "zero": self.zero,
                "hole": self.hole,
            }
        return {
            "start": self.start,
            "length": self.length,
            "dirty": self.dirty,
            "zero": self.zero,
        }


class UnsupportedOperation(Exception):
    """
    The backend cannot do what was asked (for example dirty extents on a
    file). The images API answers 404 with C{Operation not supported: ...}.
    """


class RemoteError(Exception):
    """
    The image is served by another daemon (a ticket in proxy mode, the
    signed-ticket proxy), and it refused the request: the client hears the
    same status and text (C{Content-Range} too, for 416).

    @ivar status: The daemon's HTTP status (4xx, 5xx).
    @ivar text: The daemon's error text, capped.
    @ivar contentRange: The daemon's C{Content-Range}, or C{None}.
    """

    def __init__(self, status: int, text: str, contentRange: bytes | None = None) -> None:
        super().__init__(status, text)
        self.status = status
        self.text = text
        self.contentRange = contentRange

    def __str__(self) -> str:
        return f"{self.status} {self.text}"


class HostError(Exception):
    """
    The daemon behind a backend or the proxy could not be used. Subclasses
    say how; the web layer picks the status (L{imageio.web.httpErrorFor}).

    @ivar message: What the client is told.
    @ivar close: The client connection must close after the answer (its
        request body may be unread).
    """

    def __init__(self, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.close = close


class HostUnavailable(HostError):
    """
    The daemon could not be reached: refused, reset, unknown host (503).
    """


class HostTimedOut(HostError):
    """
    Connecting to the daemon, or waiting for its answer, took too long (504).
    """


class HostInvalid(HostError):
    """
    The daemon's certificate did not verify, or its answer does not follow
    the images API (502).
    """


class IBackend(Interface):
    """
    One open image, owned by one client connection.

    A backend is opened when a connection first uses a ticket and closed
    when the connection closes or the ticket is removed. Callers keep at
    most one operation in flight per backend, except where noted, so an
    implementation needs no locking of its own.
    """

    name: str = Attribute("Short backend name for logs and errors: file, block, nbd, http.")
    blockSize: int = Attribute(
        "Alignment the storage wants for offsets and lengths (1 when any is fine). "
        "Callers need not align; aligned requests are just faster."
    )
    maxReaders: int = Attribute("How many connections may read this image at once.")
    maxWriters: int = Attribute("How many connections may write this image at once.")

    def size() -> Deferred[int]:
        """
        @return: The current size of the image in bytes.
        """

    def readInto(offset: int, buf: memoryview) -> Deferred[int]:
        """
        Read up to C{len(buf)} bytes at C{offset} into C{buf}.

        @param buf: A writable buffer; page-aligned when it comes from
            L{imageio._buffers.allocate}, which makes O_DIRECT reads zero-copy.
        @return: A Deferred firing with the number of bytes read; fewer than
            asked only at the end of the image.
        """

    def write(offset: int, data: memoryview) -> Deferred[int]:
        """
        Write all of C{data} at C{offset}. The caller must not touch
        C{data} until the Deferred fires.

        @return: A Deferred firing with C{len(data)}.
        """

    def zero(offset: int, length: int) -> Deferred[None]:
        """
        Make C{length} bytes at C{offset} read as zeroes: deallocate when the
        backend was opened C{sparse}, allocate otherwise.
        """

    def flush() -> Deferred[None]:
        """
        Make every completed write durable (fsync, NBD flush).
        """

    def extents(context: str, start: int, length: int) -> Deferred[list[Extent]]:
        """
        Describe C{[start, start + length)} of the image.

        @param context: C{"zero"} or C{"dirty"}.
        @return: Contiguous extents in order, covering exactly the window
            (clipped to the image size).
        @raise UnsupportedOperation: (through the Deferred) when the backend
            cannot report C{context}.
        """

    def close() -> Deferred[None]:
        """
        Release the image once the operation in flight (if any) returned.
        Idempotent.
        """


class IReadIntoThen(Interface):
    """
    A backend that can give a read's outcome to a plain function instead
    of a Deferred: the data path's small reads (4 KiB random reads) then
    make no Deferred and no callback chain per request.
    """

    def readIntoThen(offset: int, buf: memoryview, then: Callable[[int | Failure], object]) -> None:
        """
        L{IBackend.readInto}, giving its outcome to C{then} instead: called
        exactly once, maybe before this returns, with the number of bytes
        read or a L{Failure}. C{buf} is the backend's until then.
        """


class ISpliceSource(Interface):
    """
    A backend whose bytes the kernel can move into a pipe (C{splice(2)}),
    without a copy into our memory: a file opened C{O_DIRECT}.
    """

    spliceAlignment: int | None = Attribute(
        "Offsets and lengths given to spliceInto must be multiples of this (a range may "
        "end unaligned only at the end of the image); None when splicing is not possible."
    )

    def spliceInto(offset: int, length: int, pipe: int) -> Deferred[int]:
        """
        Move up to C{length} bytes at C{offset} into the write end of
        C{pipe}, on the disk-io pool, never waiting for room in the pipe.

        @return: A Deferred firing with the bytes moved: fewer than asked
            only when the pipe is full. It fails with C{EOFError} when the
            image ends first, with C{OSError(EINVAL)} when the kernel cannot
            splice this file.
        """


class IBackendOpener(Interface):
    """
    Opens backends for ticket URLs.
    """

    def open(url: str, *, write: bool, sparse: bool, dirty: bool) -> Deferred[IBackend]:
        """
        Open the image at C{url}.

        @param write: Open for writing as well as reading.
        @param sparse: Zeroing should deallocate.
        @param dirty: The transfer wants dirty extents (incremental backup).
        """


class IBodySink(Interface):
    """
    Consumer of an HTTP request body as it arrives, before C{render} runs.
    """

    def dataReceived(data: bytes) -> None:
        """
        A piece of the body arrived.
        """

    def bodyComplete() -> None:
        """
        The whole body (C{Content-Length} bytes) arrived.
        """

    def connectionLost(reason: Failure) -> None:
        """
        The connection went away before or after the body completed.
        """


class IDirectBodySink(IBodySink):
    """
    A body sink that lets the transport read the body straight into its
    buffers, saving a copy per byte.
    """

    def bodyBuffer() -> memoryview | None:
        """
        @return: Where the next body bytes go, or C{None} when the sink
            cannot take them now (they then arrive through C{dataReceived}).
        """

    def bodyFilled(n: int) -> None:
        """
        C{n} body bytes were read into the start of the last L{bodyBuffer}.
        """


class IDirectReader(Interface):
    """
    Takes bytes a transport reads into a buffer it provides: an HTTP
    connection receiving a request body.
    """

    def readBuffer() -> memoryview | None:
        """
        @return: Where the next bytes from the connection go, at most as
            many as the reader expects, or C{None} to deliver them to
            C{dataReceived} as usual.
        """

    def bufferFilled(n: int) -> None:
        """
        C{n} bytes were read into the start of the last L{readBuffer}.
        """


class IDirectReadTransport(Interface):
    """
    A transport that can read into a reader's buffers.
    """

    def setDirectReader(reader: IDirectReader | None) -> None:
        """
        Read into C{reader}'s buffers from now on, or as usual again with
        C{None}.
        """


class IDirectWriter(Interface):
    """
    Sends bytes into a transport's socket itself, after everything written
    to the transport before: a download moving a pipe into the socket with
    C{splice(2)}.
    """

    def sendTo(fd: int) -> bool:
        """
        Send what is ready into the non-blocking socket C{fd}.

        @return: C{True} if bytes are left that the socket would not take
            now (the transport calls again once it is writable), C{False}
            if nothing is ready (the writer calls
            L{IDirectWriteTransport.directWriteReady} when there is).
        @raise OSError: The connection is lost.
        """


class IDirectWriteTransport(Interface):
    """
    A plain socket transport that lets an L{IDirectWriter} send into its
    socket once its own buffered writes are sent.
    """

    def setDirectWriter(writer: IDirectWriter | None) -> None:
        """
        Use C{writer} from now on, or none with C{None}.
        """

    def directWriteReady() -> None:
        """
        The writer has bytes ready: have it send them now if nothing
        written before is waiting, else after that.
        """


class IStreamingUpload(Interface):
    """
    A resource that takes request bodies as a stream instead of letting
    twisted.web spool them to a temporary file.
    """

    def bodySink(request: IRequest, length: int | None) -> IBodySink | None:
        """
        Called when the request headers are complete, before any body byte.

        @param length: The declared C{Content-Length}, or C{None} for
            chunked bodies.
        @return: A sink for the body, or C{None} to let twisted.web buffer it
            as usual (small JSON bodies).
        """


class IConnection(Interface):
    """
    What a handler may keep on, and ask of, the connection a request came
    on (L{imageio.web.connectionOf}).
    """

    contexts = Attribute(
        """
        C{dict}: per-ticket state of this connection, the handlers' to
        manage (the images API keeps each ticket's open backend here).
        """
    )

    def addCloseHook(hook: Callable[[], object]) -> None:
        """
        Call C{hook} when the connection closes (errors are logged).
        """

    def setIdleTimeout(seconds: float | None) -> None:
        """
        Close the connection after C{seconds} without activity, from now if
        it is idle, else once the request being answered completes.
        """

    def resetTimeout() -> None:
        """
        Note activity (a request body making progress): the idle timeout
        starts again.
        """


class IExchange(Interface):
    """
    One request as its handler sees it beyond C{IRequest}: what the
    handler prepared when the headers arrived, and answers sent before the
    body was read (L{imageio.web.exchangeOf}).
    """

    pending = Attribute(
        """
        What the handler's C{bodySink} prepared for its C{render} (the
        upload being received, credentials already checked), or C{None}.
        """
    )
    respondedEarly = Attribute(
        "C{bool}: the request was answered before its body was read; the connection is closing."
    )

    def respondEarly(error: Exception) -> None:
        """
        Answer now, before the rest of the body was read, then close the
        connection. Does nothing once the request was answered or the
        client left.

        @param error: An C{imageio.web.HTTPError}, or a domain error the web
            layer maps to a status (C{imageio.web.httpErrorFor}).
        """


class IMetrics(Interface):
    """
    Where listeners count requests, bytes and connections (the control
    socket's C{/metrics} renders them).

    @see: L{imageio.control.Metrics}
    """

    def requestDone(listener: str, method: str, code: int, sent: int, received: int) -> None:
        """
        A request on C{listener} was answered with C{code}, after receiving
        C{received} body bytes and sending C{sent}.
        """

    def connectionOpened(listener: str) -> None:
        """
        A client connected to C{listener}.
        """

    def connectionClosed(listener: str) -> None:
        """
        A client connection of C{listener} closed.
        """


class IZeroCopyTransport(Interface):
    """
    A stream transport whose C{write} takes any buffer, a C{memoryview} of a
    reused read buffer too, and keeps a reference to it instead of a copy
    until the kernel took it.
    """

    def write(data: bytes | memoryview) -> None:
        """
        Send C{data}; a mutable buffer must not change until
        L{whenDrained} fires.
        """

    def pendingBytes() -> int:
        """
        @return: Bytes written and not yet handed to the kernel.
        """

    def whenDrained() -> Deferred[None]:
        """
        @return: A Deferred firing once every buffer written so far was
            sent or the connection closed: from then on the writer may reuse
            them.
        """
