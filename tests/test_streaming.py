# -*- test-case-name: tests.test_streaming -*-
"""
Tests for L{imageio.web._streaming}, through the images site: request
bodies stream to storage with backpressure, disconnects and cancellation
end operations cleanly, timeouts apply, and the private Twisted details we
rely on are pinned.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http
from twisted.web.resource import Resource
from zope.interface import implementer
from zope.interface.verify import verifyObject

from imageio._buffers import BufferBudget, Lease
from imageio.interfaces import (
    HostTimedOut,
    IBodySink,
    IConnection,
    IDirectBodySink,
    IDirectReader,
    IDirectReadTransport,
    IExchange,
    IStreamingUpload,
)
from imageio.tickets import Ticket
from imageio.web import (
    ImageioChannel,
    ImageioSite,
    connectionOf,
    exchangeOf,
    redactPath,
)
from imageio.web._channel import MAX_REQUEST_LINE
from imageio.web._request import StreamingRequest
from imageio.web._response import HTTPError
from tests._http import (
    Connection,
    FakeBackend,
    FakeCallbackBackend,
    FakeOpener,
    ImagesHarness,
    countAllocations,
    parseResponses,
    request,
)

KiB = 1024
MiB = 1024 * KiB

#: Buffer size of the harness: the upload sink pauses the client when this
#: much is queued, and resumes below half of it.
BUFFER = 8 * KiB


class RequestLineTests(SynchronousTestCase):
    """
    The request line is known from the channel before the body arrives
    (the Twisted privates behind it are pinned in
    C{tests.test_twisted_seams}).
    """

    def test_requestLine(self) -> None:
        """
        After the request line and headers, and before the body, the channel
        holds the method, the raw path and the version; the request was
        given its sink.
        """
        h = ImagesHarness(opener=FakeOpener(FakeBackend(bytearray(10))))
        h.addTicket(None, size=10)
        conn = h.connect()
        channel = conn.channel
        self.assertTrue(channel.readingRequestLine)
        self.assertIsNone(channel.requestLine())
        conn.send(b"PUT /images/t1?flush=n HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
        self.assertEqual(channel.requestLine(), (b"PUT", b"/images/t1?flush=n", b"HTTP/1.1"))
        self.assertFalse(channel.readingRequestLine)
        request = channel.requests[-1]
        self.assertIsInstance(request, StreamingRequest)
        self.assertIsNotNone(request.bodySink)

    def test_requestMethods(self) -> None:
        """
        The request methods the channel calls, and C{StreamingRequest}
        overrides, exist on L{http.Request}.
        """
        for name in ("gotLength", "handleContentChunk", "requestReceived", "connectionLost"):
            self.assertTrue(callable(getattr(http.Request, name)), name)


class ConnectionStateTests(SynchronousTestCase):
    """
    Handlers reach per-connection and per-request state through
    L{IConnection} and L{IExchange} (L{connectionOf}, L{exchangeOf}).
    """

    def setUp(self) -> None:
        self.conn, _ = connectDirect(ImageioSite(SinkResource(), "test", reactor=Clock()))
        self.conn.send(putHead(10) + b"abc")
        self.request = self.conn.channel.requests[-1]

    def test_interfaces(self) -> None:
        """
        The channel provides L{IConnection} and the request L{IExchange}.
        """
        self.assertTrue(verifyObject(IConnection, connectionOf(self.request)))
        self.assertIs(connectionOf(self.request), self.conn.channel)
        self.assertTrue(verifyObject(IExchange, exchangeOf(self.request)))
        self.assertIs(exchangeOf(self.request), self.request)

    def test_otherRequests(self) -> None:
        """
        Requests of other sites are refused with L{TypeError}.
        """
        channel = http.HTTPChannel()
        channel.makeConnection(StringTransport())
        other = http.Request(channel)
        self.assertRaises(TypeError, exchangeOf, other)
        self.assertRaises(TypeError, connectionOf, other)

    def test_respondEarlyDomainError(self) -> None:
        """
        C{respondEarly} answers a domain error with the status the web
        layer maps it to, and closes.
        """
        exchangeOf(self.request).respondEarly(HostTimedOut("Timed out waiting for host"))
        response = self.conn.response()
        self.assertEqual(response.status, 504)
        self.assertTrue(self.conn.closed)


class StreamingTestCase(SynchronousTestCase):
    """
    A harness whose backend completes writes and reads only when the test
    says so.
    """

    backendClass: type[FakeBackend] = FakeBackend

    def setUp(self) -> None:
        self.backend = self.backendClass(bytearray(1024 * KiB))
        self.h = ImagesHarness(opener=FakeOpener(self.backend), bufferSize=BUFFER)
        self.clock = self.h.clock
        self.registry = self.h.registry

    def ticket(self, **kw: Any) -> Ticket:
        kw.setdefault("size", len(self.backend.image))
        return self.h.addTicket(None, **kw)

    def startPut(self, length: int, path: bytes = b"/images/t1?flush=n") -> Connection:
        conn = self.h.connect()
        conn.send(b"PUT %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path, length))
        return conn


class BackpressureTests(StreamingTestCase):
    """
    Uploads pause the client while storage is behind.
    """

    def test_pauseAndResume(self) -> None:
        """
        The transport is paused once a buffer's worth is queued behind a
        write in flight, and resumed once the queue drained into the buffer
        after that write completed.
        """
        self.ticket()
        conn = self.startPut(64 * KiB)
        conn.send(b"a" * BUFFER)
        self.assertEqual(self.backend.pendingWrites(), 1)
        self.assertEqual(conn.transport.producerState, "producing")
        conn.send(b"b" * (BUFFER - 1))
        self.assertEqual(conn.transport.producerState, "producing")
        conn.send(b"b")
        self.assertEqual(conn.transport.producerState, "paused")
        # Bytes the kernel already had keep arriving while paused.
        conn.send(b"c" * 100)
        self.backend.completeWrite()
        self.assertEqual(self.backend.pendingWrites(), 1)
        self.assertEqual(conn.transport.producerState, "producing")
        self.assertEqual(self.backend.writes[1][1], b"b" * BUFFER)

    def test_boundedQueue(self) -> None:
        """
        While storage is stalled, what the sink holds stays around two
        buffers, however much the client sends.
        """
        self.ticket()
        conn = self.startPut(512 * KiB)
        sent = 0
        while sent < 512 * KiB and conn.transport.producerState == "producing":
            conn.send(b"x" * 4096)
            sent += 4096
        self.assertEqual(conn.transport.producerState, "paused")
        self.assertLessEqual(sent, 2 * BUFFER + 4096)

    def test_wholeUploadInOrder(self) -> None:
        """
        An upload larger than many buffers arrives in storage intact, whatever
        the piece sizes, with every write but the last a full buffer.
        """
        self.ticket()
        data = bytes(range(256)) * 256  # 64 KiB
        conn = self.startPut(len(data))
        for i in range(0, len(data), 3000):
            conn.send(data[i : i + 3000])
            while self.backend.pendingWrites():
                self.backend.completeWrite()
        response = conn.response()
        self.assertEqual(response.status, 200)
        self.assertEqual(bytes(self.backend.image[: len(data)]), data)
        self.assertEqual({len(d) for _, d, _ in self.backend.writes}, {BUFFER})

    def test_alignedWrites(self) -> None:
        """
        An upload at an unaligned offset writes up to the next 4 KiB boundary
        first, then aligned buffers.
        """
        self.ticket()
        conn = self.h.connect()
        conn.send(
            request(
                b"PUT",
                b"/images/t1?flush=n",
                {b"Content-Range": b"bytes 100-*/*"},
                b"z" * 3 * BUFFER,
            ).replace(b"bytes 100-*/*", b"bytes 100-200/*")
        )
        while self.backend.pendingWrites():
            self.backend.completeWrite()
        self.assertEqual(conn.response().status, 200)
        offsets = [(o, len(d)) for o, d, _ in self.backend.writes]
        self.assertEqual(offsets[0], (100, BUFFER - 100))
        self.assertTrue(all(o % 4096 == 0 for o, _ in offsets[1:]))
        self.assertEqual(sum(n for _, n in offsets), 3 * BUFFER)

    def test_progressResetsTimeout(self) -> None:
        """
        While the client is paused, each completed write resets the idle
        timeout, so slow storage does not drop the client.
        """
        self.ticket(inactivity_timeout=10)
        conn = self.startPut(64 * KiB)
        conn.send(b"x" * 3 * BUFFER)
        self.assertEqual(conn.transport.producerState, "paused")
        for _ in range(2):
            self.clock.advance(8)
            self.backend.completeWrite()
        self.clock.advance(8)
        self.assertFalse(conn.closed)
        self.clock.advance(3)
        self.assertTrue(conn.closed)

    def test_storageStallTimesOut(self) -> None:
        """
        Storage that makes no progress for longer than the ticket's
        inactivity timeout drops the connection.
        """
        ticket = self.ticket(inactivity_timeout=10)
        conn = self.startPut(64 * KiB)
        conn.send(b"x" * 3 * BUFFER)
        self.clock.advance(11)
        self.assertTrue(conn.closed)
        conn.lose()
        self.backend.completeWrite()
        self.assertFalse(ticket.active)

    def test_transferred(self) -> None:
        """
        C{transferred} counts written bytes while the upload runs, and the
        whole range after it.
        """
        ticket = self.ticket(ops=("write",))
        conn = self.startPut(4 * BUFFER)
        conn.send(b"x" * 2 * BUFFER)
        self.assertTrue(ticket.active)
        self.assertEqual(ticket.transferred(), 0)
        self.backend.completeWrite()
        self.assertEqual(ticket.info(self.clock.seconds())["transferred"], BUFFER)
        conn.send(b"x" * 2 * BUFFER)
        while self.backend.pendingWrites():
            self.backend.completeWrite()
        self.assertEqual(conn.response().status, 200)
        info = ticket.info(self.clock.seconds())
        self.assertEqual((info["active"], info["transferred"]), (False, 4 * BUFFER))


class GetProgressTests(StreamingTestCase):
    """
    C{transferred} while a download runs.
    """

    def test_transferredDuringGet(self) -> None:
        """
        A running GET counts the bytes sent so far; once done, its range.
        """
        ticket = self.ticket(ops=("read",))
        conn = self.h.connect()
        conn.send(
            request(b"GET", b"/images/t1", {b"Range": b"bytes=100-%d" % (100 + 3 * BUFFER - 1)})
        )
        self.assertEqual(ticket.transferred(), 0)
        self.backend.completeRead()
        info = ticket.info(self.clock.seconds())
        self.assertEqual(
            (info["active"], info["transferred"], info["idle_time"]), (True, BUFFER, 0)
        )
        self.backend.completeRead()
        self.backend.completeRead()
        self.assertEqual(conn.response().status, 206)
        info = ticket.info(self.clock.seconds())
        self.assertEqual((info["active"], info["transferred"]), (False, 3 * BUFFER))


class DisconnectTests(StreamingTestCase):
    """
    Clients that go away mid-transfer.
    """

    def test_putWithWriteInFlight(self) -> None:
        """
        A client lost mid-PUT fails the sink; the operation ends once the
        write in flight returns, counting only what was written; the ticket
        is usable again and nothing is answered.
        """
        ticket = self.ticket(ops=("write",))
        conn = self.startPut(4 * BUFFER)
        conn.send(b"x" * (BUFFER + 10))
        self.assertEqual(self.backend.pendingWrites(), 1)
        conn.lose()
        self.assertTrue(ticket.active)
        self.backend.completeWrite()
        self.assertFalse(ticket.active)
        self.assertEqual(self.backend.pendingWrites(), 0)
        self.assertEqual(ticket.transferred(), BUFFER)
        self.assertEqual(conn.output(), b"")
        self.assertEqual(ticket.connections, {})
        self.assertEqual(self.backend.closed, 1)
        # Usable again from a new connection.
        response = self.h.roundTrip(request(b"OPTIONS", b"/images/t1"))
        self.assertEqual(response.status, 200)

    def test_putIdle(self) -> None:
        """
        A client lost while nothing is being written ends the operation at
        once.
        """
        ticket = self.ticket()
        conn = self.startPut(4 * BUFFER)
        conn.send(b"x" * 100)
        conn.lose(ConnectionDone())
        self.assertFalse(ticket.active)
        self.assertEqual(self.backend.writes, [])

    def test_getMidResponse(self) -> None:
        """
        A client lost mid-GET stops the producer; the read in flight is
        dropped when it returns, the operation ends and the backend closes.
        """
        ticket = self.ticket(ops=("read",))
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-%d" % (4 * BUFFER - 1)}))
        self.backend.completeRead()
        self.assertIn(b"206 Partial Content", conn.output())
        self.assertEqual(self.backend.pendingReads(), 1)
        conn.lose()
        self.assertFalse(ticket.active)
        self.backend.completeRead()
        self.assertEqual(conn.output(), b"")
        self.assertEqual(self.backend.pendingReads(), 0)
        self.assertEqual(ticket.connections, {})
        self.assertEqual(self.backend.closed, 1)


class CancelTests(StreamingTestCase):
    """
    DELETE /tickets (L{TicketRegistry.remove}) while transfers run.
    """

    def assertCanceled(self, conn: Connection) -> None:
        response = conn.response()
        self.assertEqual(response.status, 403)
        self.assertIn("was canceled", response.text)
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(conn.closed)

    def test_cancelPut(self) -> None:
        """
        Removing a ticket during a PUT answers 403 and closes the connection
        at once, as upstream; the removal completes once the connection is
        gone and the write in flight returned.
        """
        ticket = self.ticket()
        conn = self.startPut(4 * BUFFER)
        conn.send(b"x" * (BUFFER + 10))
        d = self.registry.remove("t1")
        self.assertCanceled(conn)
        self.assertNoResult(d)
        conn.lose()
        self.assertNoResult(d)
        self.backend.completeWrite()
        self.successResultOf(d)
        self.assertIsNone(self.registry.lookup("t1"))
        self.assertEqual(ticket.transferred(), 0)
        self.assertEqual(self.backend.pendingWrites(), 0)

    def test_cancelPutWaitingForClient(self) -> None:
        """
        A PUT waiting for a slow client is answered 403 and closed at once,
        and the removal completes as soon as the connection is gone.
        """
        self.ticket()
        conn = self.startPut(4 * BUFFER)
        conn.send(b"x" * 10)
        d = self.registry.remove("t1")
        self.assertCanceled(conn)
        conn.lose()
        self.successResultOf(d)

    def test_cancelGetStreaming(self) -> None:
        """
        Removing a ticket during a streaming GET cuts the connection after
        the current chunk; the removal completes.
        """
        self.ticket()
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/t1"))
        self.backend.completeRead()
        d = self.registry.remove("t1")
        self.assertTrue(conn.aborted)
        self.successResultOf(d)
        self.backend.completeRead()
        conn.lose()
        self.assertRaises(ValueError, parseResponses, conn.output())

    def test_cancelGetBeforeFirstByte(self) -> None:
        """
        A GET canceled before its first byte gets 403 C{Transfer ... was
        canceled} and the connection closes.
        """
        self.ticket()
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/t1"))
        d = self.registry.remove("t1")
        self.successResultOf(d)
        response = conn.response()
        self.assertEqual(response.status, 403)
        self.assertEqual(
            response.text,
            "You are not allowed to access this resource: Transfer tr-t1 was canceled\n",
        )
        self.assertTrue(conn.closed)

    def test_removeTimeout(self) -> None:
        """
        If an operation does not stop within the remove timeout, removal
        fails and the ticket stays canceled; new requests get 403.
        """
        self.ticket()
        conn = self.startPut(4 * BUFFER)
        conn.send(b"x" * (BUFFER + 10))
        d = self.registry.remove("t1")
        # The write in flight never returns; the canceled client is gone.
        self.assertCanceled(conn)
        conn.lose()
        self.clock.advance(60)
        self.failureResultOf(d)
        response = self.h.roundTrip(request(b"OPTIONS", b"/images/t1"))
        self.assertEqual(response.status, 403)
        self.assertIn("was canceled", response.text)
        self.backend.completeWrite()
        self.successResultOf(self.registry.remove("t1"))


class StalledReaderTests(StreamingTestCase):
    """
    Downloads to clients that stop reading.
    """

    def startGet(self) -> Connection:
        conn = self.h.connect()
        conn.send(b"GET /images/t1 HTTP/1.1\r\nHost: x\r\n\r\n")
        self.backend.completeRead()
        return conn

    def test_stalledReaderAborted(self) -> None:
        """
        A client that reads nothing for the ticket's inactivity timeout is
        aborted and the operation ends.
        """
        ticket = self.ticket(inactivity_timeout=30)
        conn = self.startGet()
        # The socket buffer is full: the transport pauses the channel.
        producer: Any = conn.transport.producer
        producer.pauseProducing()
        self.backend.completeRead()
        self.clock.advance(29)
        self.assertFalse(conn.aborted)
        self.assertTrue(ticket.active)
        self.clock.advance(2)
        self.assertTrue(conn.aborted)
        self.assertFalse(ticket.active)
        conn.lose()
        self.assertFalse(ticket.active)
        # Cutting a stalled reader is planned, not an error.
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_slowReaderKept(self) -> None:
        """
        A client that keeps reading, however slowly, is not aborted.
        """
        ticket = self.ticket(inactivity_timeout=30)
        conn = self.startGet()
        producer: Any = conn.transport.producer
        for _ in range(10):
            producer.pauseProducing()
            self.backend.completeRead()
            self.clock.advance(20)
            producer.resumeProducing()
        self.assertFalse(conn.aborted)
        self.assertTrue(ticket.active)


class DownloadBufferTests(StreamingTestCase):
    """
    Downloads keep at most two buffers and stop reading while paused.
    """

    def test_pausedStopsReading(self) -> None:
        """
        While the transport is paused, at most one chunk is read ahead;
        resuming sends it and reads on; the body arrives intact with at most
        two buffers allocated.
        """
        sizes = countAllocations(self)
        self.backend.image[:] = bytes(range(256)) * 4 * KiB
        self.ticket()
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-%d" % (6 * BUFFER - 1)}))
        producer: Any = conn.transport.producer
        self.assertEqual(self.backend.pendingReads(), 1)
        producer.pauseProducing()
        self.backend.completeRead()
        # The chunk read while paused waits, and nothing more is read.
        self.assertEqual(self.backend.pendingReads(), 0)
        self.assertEqual(len(self.backend.reads), 1)
        for _ in range(5):
            producer.resumeProducing()
            self.assertEqual(self.backend.pendingReads(), 1)
            producer.pauseProducing()
            self.backend.completeRead()
            self.assertEqual(self.backend.pendingReads(), 0)
        producer.resumeProducing()
        response = conn.response()
        self.assertEqual(response.body, bytes(self.backend.image[: 6 * BUFFER]))
        self.assertLessEqual(len(sizes), 2)
        self.assertIsNone(conn.channel._requestProducer)

    def test_twoBuffersWhenNeverPaused(self) -> None:
        """
        A long download never allocates more than two buffers.
        """
        sizes = countAllocations(self)
        self.backend.manual = False
        self.ticket()
        response = self.h.roundTrip(request(b"GET", b"/images/t1"))
        self.assertEqual(len(response.body), len(self.backend.image))
        self.assertEqual(len(self.backend.reads), len(self.backend.image) // BUFFER)
        self.assertLessEqual(len(sizes), 2)


class ConnectionTests(StreamingTestCase):
    """
    Per-connection backends and limits of the channel.
    """

    def test_oneBackendPerConnection(self) -> None:
        """
        A connection opens the ticket's backend once for many requests, and
        closes it when the connection closes; C{connections} counts it.
        """
        ticket = self.ticket()
        self.backend.manual = False
        conn = self.h.connect()
        conn.send(
            request(b"OPTIONS", b"/images/t1")
            + request(b"GET", b"/images/t1", {b"Range": b"bytes=0-9"})
            + request(b"PUT", b"/images/t1?flush=n", body=b"abc")
        )
        self.assertEqual([r.status for r in conn.responses()], [200, 206, 200])
        opener: FakeOpener = self.h.opener
        self.assertEqual(len(opener.opened), 1)
        self.assertEqual(ticket.info(0)["connections"], 1)
        conn.lose(ConnectionDone())
        self.assertEqual(ticket.info(0)["connections"], 0)
        self.assertEqual(self.backend.closed, 1)

    def test_requestLineTooLong(self) -> None:
        """
        A request line over 4096 bytes is 414 and closes.
        """
        conn = self.h.connect()
        conn.send(b"GET /images/" + b"a" * MAX_REQUEST_LINE + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        response = conn.response()
        self.assertEqual(response.status, 414)
        self.assertTrue(conn.closed)

    def test_headerTooLong(self) -> None:
        """
        A header line longer than the line limit is 431 and closes.
        """
        conn = self.h.connect()
        conn.send(b"GET /info/ HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")
        response = conn.response()
        self.assertEqual(response.status, 431)
        self.assertTrue(conn.closed)

    def test_largeBodyForSmallHandler(self) -> None:
        """
        A large body sent to a handler that does not stream is 413 before it
        is read, never buffered.
        """
        conn = self.h.connect()
        conn.send(
            b"POST /images/t1/extents HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
        )
        response = conn.response()
        self.assertEqual(response.status, 413)
        self.assertTrue(conn.closed)

    def test_chunkedSmallBodyCapped(self) -> None:
        """
        A chunked body to a handler that does not stream is collected in
        memory only up to the limit, then refused with 413.
        """
        self.assertChunkedBodyCapped(b"DELETE")

    def assertChunkedBodyCapped(self, method: bytes) -> None:
        """
        Send C{method} to C{/images/t1} with a chunked body of 80 KiB, more
        than a handler that does not stream collects: it is refused with 413
        and the connection closes.
        """
        conn = self.h.connect()
        conn.send(
            b"%s /images/t1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" % method
        )
        for _ in range(20):
            conn.send(b"1000\r\n" + b"x" * 4096 + b"\r\n")
        response = conn.response()
        self.assertEqual((method, response.status), (method, 413))
        self.assertTrue(conn.closed)

    def noSpooling(self) -> None:
        """
        Make twisted.web's body spooling fail the test if it is ever used.
        """

        def spool(*args: object) -> Any:
            raise AssertionError("Request body spooled by twisted.web")

        self.patch(tempfile, "TemporaryFile", spool)

    def test_bodylessMethodsLargeBodyRefused(self) -> None:
        """
        A large body sent with GET, HEAD, OPTIONS or DELETE is refused with
        413 from its headers and the connection closes; nothing is spooled
        to a temporary file.
        """
        self.noSpooling()
        self.ticket()
        for method in (b"GET", b"HEAD", b"OPTIONS", b"DELETE"):
            for path in (b"/images/t1", b"/info/", b"/nowhere"):
                conn = self.h.connect()
                conn.send(
                    b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n" % (method, path)
                    + b"x" * 1000
                )
                response = conn.response(head=method == b"HEAD")
                # DELETE routes are found from the headers: no route is 404.
                expected = 404 if (method, path) == (b"DELETE", b"/nowhere") else 413
                self.assertEqual((method, path, response.status), (method, path, expected))
                self.assertTrue(conn.closed)

    def test_bodylessMethodsChunkedBodyCapped(self) -> None:
        """
        A chunked body sent with GET or OPTIONS is collected in memory only
        up to the small limit, then refused with 413; nothing is spooled.
        """
        self.noSpooling()
        self.ticket()
        for method in (b"GET", b"OPTIONS"):
            self.assertChunkedBodyCapped(method)

    def test_bodylessMethodsSmallBodyAnswered(self) -> None:
        """
        A small body (chunked or not) sent with GET is read in memory and
        ignored: the request is answered, and the connection stays open.
        """
        self.noSpooling()
        self.ticket()
        self.backend.manual = False
        conn = self.h.connect()
        conn.send(
            b"GET /images/t1 HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n"
            b"Content-Length: 3\r\n\r\nabc"
            b"GET /images/t1 HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        self.assertEqual([r.status for r in conn.responses()], [206, 206])
        self.assertFalse(conn.closed)

    def test_otherResourceBodyNotSpooled(self) -> None:
        """
        A resource that does not stream bodies (not a L{Router}) never gets
        twisted.web's spooling either: a large body is 413.
        """
        self.noSpooling()
        site = ImageioSite(Resource(), "plain", reactor=Clock())
        conn, _ = connectDirect(site)
        conn.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        self.assertEqual(conn.response().status, 413)
        self.assertTrue(conn.closed)

    def test_channelType(self) -> None:
        """
        The site builds L{ImageioChannel}s making L{StreamingRequest}s.
        """
        conn = self.h.connect()
        self.assertIsInstance(conn.channel, ImageioChannel)
        conn.channel.connectionLost(Failure(ConnectionDone()))


class BodyRateTests(StreamingTestCase):
    """
    Request bodies must keep a minimum average rate (the site's
    C{bodyMinRate}, 1 KiB/s by default) after a grace period
    (C{bodyTimeout}, 60 s).
    """

    def setUp(self) -> None:
        super().setUp()
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def trickle(self, conn: Connection, seconds: int, piece: bytes, every: float = 5) -> None:
        for _ in range(int(seconds / every)):
            if conn.closed:
                return
            conn.send(piece)
            self.clock.advance(every)

    def test_trickleCut(self) -> None:
        """
        An upload trickling a byte every 5 seconds is answered 408 and
        closed once the grace period is over, the cut is logged, the
        upload's operation ends, and a client that does not read the
        answer is aborted.
        """
        ticket = self.ticket(inactivity_timeout=600)
        conn = self.startPut(MiB)
        self.trickle(conn, 59, b"x")
        self.assertFalse(conn.closed)
        self.trickle(conn, 10, b"x")
        self.assertTrue(conn.closed)
        response = conn.response()
        self.assertEqual(
            (response.status, response.text), (408, "Request body not received in time\n")
        )
        self.assertFalse(ticket.active)
        self.assertTrue(any("too slow" in formatEvent(e) for e in self.events))
        self.clock.advance(15)
        self.assertTrue(conn.aborted)

    def test_chunkedTrickleCut(self) -> None:
        """
        A chunked body trickling in is cut the same way.
        """
        conn = self.h.connect()
        conn.send(b"PATCH /images/t1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.trickle(conn, 70, b"1\r\n \r\n")
        self.assertTrue(conn.closed)
        self.assertEqual(conn.response().status, 408)

    def test_slowSteadyUploadKept(self) -> None:
        """
        An upload at 2 KiB/s, slow but above the minimum, is never cut.
        """
        self.backend.manual = False
        self.ticket(inactivity_timeout=600)
        conn = self.startPut(400 * KiB)
        self.trickle(conn, 200, b"x" * 2 * KiB, every=1)
        self.assertFalse(conn.closed)
        self.assertEqual(conn.response().status, 200)

    def test_creditForEarlyBytes(self) -> None:
        """
        Bytes sent early count for later: 120 KiB in the first second, then
        nothing for 150 seconds of a 180 s allowance, is not cut (the idle
        timeout is the limit for silence).
        """
        self.backend.manual = False
        self.ticket(inactivity_timeout=600)
        conn = self.startPut(MiB)
        conn.send(b"x" * 120 * KiB)
        self.trickle(conn, 150, b"x", every=30)
        self.assertFalse(conn.closed)

    def test_pausedTimeNotCounted(self) -> None:
        """
        Time the client is paused because storage is slower does not count
        against the client's rate.
        """
        self.ticket(inactivity_timeout=600)
        conn = self.startPut(4 * BUFFER)
        conn.send(b"x" * 3 * BUFFER)
        self.assertEqual(conn.transport.producerState, "paused")
        self.clock.advance(500)
        self.assertFalse(conn.closed)
        self.backend.manual = False
        self.backend.completeWrites()
        conn.send(b"x" * BUFFER)
        self.assertEqual(conn.response().status, 200)

    def test_disabled(self) -> None:
        """
        With C{bodyMinRate} 0 there is no minimum rate.
        """
        self.h.site.bodyMinRate = 0
        self.ticket(inactivity_timeout=600)
        conn = self.startPut(MiB)
        self.trickle(conn, 300, b"x")
        self.assertFalse(conn.closed)


class MeasuredBudget(BufferBudget):
    """
    A budget that records the most bytes it ever had out.
    """

    peak = 0

    def tryAcquire(self, size: int) -> Lease | None:
        lease = super().tryAcquire(size)
        self.peak = max(self.peak, self.used)
        return lease

    def _grant(self) -> None:
        super()._grant()
        self.peak = max(self.peak, self.used)


class BufferBudgetTests(SynchronousTestCase):
    """
    Uploads, downloads and checksums take their buffers from one budget
    shared by all connections: they wait for it rather than allocate past
    it, and give it back however they end.
    """

    def harness(self, limit: int, size: int = 1024 * KiB) -> None:
        self.backend = FakeBackend(bytearray(size))
        self.budget = MeasuredBudget(limit)
        self.h = ImagesHarness(
            opener=FakeOpener(self.backend), bufferSize=BUFFER, budget=self.budget
        )
        self.ticket = self.h.addTicket(None, size=size, inactivity_timeout=600)

    def test_parallelChecksums(self) -> None:
        """
        Six parallel checksums with a budget of two blocks never hold more
        than two blocks, all complete with the same answer, and the budget
        is whole again afterwards.
        """
        self.harness(2 * MiB, size=4 * MiB)
        conns = [self.h.connect() for _ in range(6)]
        for conn in conns:
            conn.send(request(b"GET", b"/images/t1/checksum?block_size=1048576"))
        self.assertEqual(self.budget.used, 2 * MiB)
        self.assertEqual(self.budget.waiting, 4)
        while self.backend.pendingReads():
            self.assertLessEqual(self.backend.pendingReads(), 2)
            self.backend.completeRead()
        self.assertLessEqual(self.budget.peak, 2 * MiB)
        answers = [conn.response() for conn in conns]
        self.assertEqual([a.status for a in answers], [200] * 6)
        self.assertEqual(len({a.body for a in answers}), 1)
        self.assertEqual((self.budget.used, self.budget.waiting), (0, 0))

    def test_checksumWaitEnds(self) -> None:
        """
        A checksum waiting for its block stops waiting when its client
        leaves, or with 403 when the ticket is deleted; the ticket is idle
        and the budget whole afterwards.
        """
        self.harness(MiB, size=2 * MiB)
        running = self.h.connect()
        running.send(request(b"GET", b"/images/t1/checksum?block_size=1048576"))
        gone = self.h.connect()
        gone.send(request(b"GET", b"/images/t1/checksum?block_size=1048576"))
        canceled = self.h.connect()
        canceled.send(request(b"GET", b"/images/t1/checksum?block_size=1048576"))
        self.assertEqual(self.budget.waiting, 2)
        gone.lose()
        self.assertEqual(self.budget.waiting, 1)
        self.h.registry.remove("t1")
        response = canceled.response()
        self.assertEqual(response.status, 403)
        self.assertEqual(self.budget.waiting, 0)
        while self.backend.pendingReads():
            self.backend.completeRead()
        # The running one was canceled too, after its block.
        self.assertEqual(running.response().status, 403)
        self.assertFalse(self.ticket.active)
        self.assertEqual(self.budget.used, 0)

    def test_uploadWaitsForBuffer(self) -> None:
        """
        An upload that finds the budget used up waits for its buffer with
        the client paused, and runs once the other upload gives its buffer
        back.
        """
        self.harness(BUFFER)
        first = self.h.connect()
        first.send(request(b"PUT", b"/images/t1?flush=n", body=b"a" * 3 * BUFFER))
        second = self.h.connect()
        second.send(request(b"PUT", b"/images/t1?flush=n", body=b"b" * 2 * BUFFER))
        self.assertEqual(self.budget.waiting, 1)
        self.assertEqual(second.transport.producerState, "paused")
        self.backend.manual = False
        self.backend.completeWrites()
        self.assertEqual(first.response().status, 200)
        self.assertEqual(second.response().status, 200)
        self.assertLessEqual(self.budget.peak, BUFFER)
        self.assertEqual(self.budget.used, 0)

    def test_abortedUploadReturnsBudget(self) -> None:
        """
        An upload cut by a disconnect (with a write in flight) or waiting
        for its buffer gives the budget back.
        """
        self.harness(2 * BUFFER)
        conn = self.h.connect()
        conn.send(b"PUT /images/t1 HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        conn.send(b"x" * 3 * BUFFER)
        self.assertEqual(self.budget.used, 2 * BUFFER)
        waiting = self.h.connect()
        waiting.send(b"PUT /images/t1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\nbb" % BUFFER)
        self.assertEqual(self.budget.waiting, 1)
        waiting.lose()
        self.assertEqual(self.budget.waiting, 0)
        conn.lose()
        self.backend.completeWrites()
        self.assertEqual(self.budget.used, 0)

    def test_finishedDownloadsFeedWaiters(self) -> None:
        """
        With downloads waiting for buffers, a finished download gives its
        buffer back instead of keeping it for its (still open) connection.
        """
        self.harness(2 * BUFFER)
        conns = [self.h.connect() for _ in range(4)]
        for conn in conns:
            conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-99"}))
        self.assertEqual((self.backend.pendingReads(), self.budget.waiting), (2, 2))
        self.backend.completeRead()
        self.backend.completeRead()
        self.assertEqual((self.backend.pendingReads(), self.budget.waiting), (2, 0))
        self.backend.completeRead()
        self.backend.completeRead()
        self.assertEqual([c.response().status for c in conns], [206] * 4)
        self.assertLessEqual(self.budget.peak, 2 * BUFFER)
        for conn in conns:
            conn.lose()
        self.assertEqual(self.budget.used, 0)

    def test_downloadBudget(self) -> None:
        """
        Finished downloads leave their buffers with the connection (still
        counted), which gives them back when other work would wait or when
        it closes; a download waits for its buffer when the budget is used
        up; a download cut by a disconnect gives its buffers back.
        """
        self.harness(2 * BUFFER)
        self.backend.manual = False
        idle = self.h.connect()
        idle.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-99"}))
        self.assertEqual(idle.response().status, 206)
        self.assertEqual(self.budget.used, BUFFER)
        busy = self.h.connect()
        busy.send(b"PUT /images/t1 HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        self.backend.manual = True
        busy.send(b"x" * 3 * BUFFER)
        self.assertEqual(self.budget.used, 2 * BUFFER)
        # The idle connection's spare goes to this download.
        reader = self.h.connect()
        reader.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-99999"}))
        self.assertEqual((self.budget.waiting, self.backend.pendingReads()), (0, 1))
        # Nothing spare left: this one waits, without reading.
        waiter = self.h.connect()
        waiter.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-99999"}))
        self.assertEqual((self.budget.waiting, self.backend.pendingReads()), (1, 1))
        busy.lose()
        self.backend.completeWrites()
        self.assertEqual((self.budget.waiting, self.backend.pendingReads()), (0, 2))
        self.backend.completeRead()
        reader.lose()
        while self.backend.pendingReads():
            self.backend.completeRead()
        self.assertEqual(waiter.response().status, 206)
        self.assertLessEqual(self.budget.peak, 2 * BUFFER)
        for conn in (idle, waiter):
            conn.lose()
        self.assertEqual(self.budget.used, 0)


class HeadDeadlineTests(StreamingTestCase):
    """
    The request head must arrive within the listener's timeout, however
    the bytes trickle in.
    """

    def test_slowloris(self) -> None:
        """
        A client sending its head one byte every 10 seconds is answered 408
        and closed 60 seconds after its first byte.
        """
        conn = self.h.connect()
        head = b"GET /info/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 100
        for i in range(6):
            conn.send(head[i : i + 1])
            self.clock.advance(10)
        self.assertTrue(conn.closed)
        response = conn.response()
        self.assertEqual((response.status, response.text), (408, "Request Timeout\n"))
        conn.send(head[6:] + b"\r\n\r\n")
        self.assertEqual(conn.output(), b"")
        # A client that does not read the answer is aborted later.
        self.clock.advance(15)
        self.assertTrue(conn.aborted)

    def test_completeHeadInTime(self) -> None:
        """
        A head completed within the timeout is served, and the deadline does
        not apply to a long response nor to the idle time after it.
        """
        self.ticket(inactivity_timeout=300)
        conn = self.h.connect()
        conn.send(b"GET /images/t1 HTTP/1.1\r\n")
        self.clock.advance(59)
        conn.send(b"Host: x\r\nRange: bytes=0-%d\r\n\r\n" % (2 * BUFFER - 1))
        # The response takes long; a pipelined request waits meanwhile.
        conn.send(request(b"GET", b"/info/"))
        self.clock.advance(100)
        self.backend.completeRead()
        self.clock.advance(100)
        self.backend.completeRead()
        self.assertEqual([r.status for r in conn.responses()], [206, 200])
        self.clock.advance(200)
        self.assertFalse(conn.closed)
        # The next request's head starts a new deadline.
        conn.send(b"GET /info/ HTTP/1.1\r\n")
        self.clock.advance(61)
        self.assertTrue(conn.closed)
        self.assertEqual(conn.response().status, 408)

    def test_wholeHeadArmsNoTimer(self) -> None:
        """
        A head that arrives in one piece (nearly every request) is parsed
        before any deadline is armed, so it costs no timer; one arriving in
        pieces gets its deadline from its first piece.
        """
        armed: list[str] = []
        callLater = self.clock.callLater

        def recording(delay: float, f: Any, *a: Any, **kw: Any) -> Any:
            armed.append(getattr(f, "__name__", ""))
            return callLater(delay, f, *a, **kw)

        self.clock.callLater = recording  # type: ignore[method-assign]
        conn = self.h.connect()
        conn.send(request(b"GET", b"/info/") + request(b"GET", b"/info/"))
        self.assertEqual([r.status for r in conn.responses()], [200, 200])
        self.assertNotIn("_headTimedOut", armed)
        conn.lose(ConnectionDone())
        conn = self.h.connect()
        conn.send(b"GET /info/ HTTP/1.1\r\n")
        self.assertIn("_headTimedOut", armed)
        self.clock.advance(30)
        conn.send(b"Host: x\r\n")
        self.clock.advance(30)
        self.assertEqual(conn.response().status, 408)

    def test_noPendingCallAfterClose(self) -> None:
        """
        Closing the connection cancels the deadline.
        """
        conn = self.h.connect()
        conn.send(b"GET /info/ HTTP/1.1\r\n")
        conn.lose(ConnectionDone())
        self.assertEqual([c for c in self.clock.getDelayedCalls() if c.active()], [])


class RedactTests(SynchronousTestCase):
    """
    Ticket ids are credentials: logs show a prefix.
    """

    def test_redactPath(self) -> None:
        """
        Ticket and session ids are shortened, queries dropped.
        """
        self.assertEqual(
            redactPath(b"/images/0123456789abcdef/extents?x=1"), "/images/01234567.../extents"
        )
        self.assertEqual(redactPath(b"/tickets/abcdefghijkl"), "/tickets/abcdefgh...")
        self.assertEqual(redactPath(b"/info/"), "/info/")


@implementer(IDirectReadTransport)
class DirectReadTransport(StringTransport):
    """
    A L{StringTransport} that can read into a direct reader's buffers, and
    records the readers it was given and the buffer sizes it was offered.
    """

    def __init__(self) -> None:
        super().__init__(lenient=True)
        self.reader: IDirectReader | None = None
        self.readers: list[IDirectReader | None] = []
        self.offered: list[int] = []

    def setDirectReader(self, reader: IDirectReader | None) -> None:
        self.reader = reader
        self.readers.append(reader)


@implementer(IBodySink)
class CopySink:
    """
    Collects a body delivered in pieces, noting how each piece came.
    """

    def __init__(self) -> None:
        self.body = bytearray()
        self.pieces: list[tuple[str, int]] = []
        self.complete = False
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.body += data
        self.pieces.append(("copied", len(data)))

    def bodyComplete(self) -> None:
        self.complete = True

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason


@implementer(IDirectBodySink)
class DirectSink(CopySink):
    """
    Collects a body, offering a buffer of C{size} bytes to read it into.
    """

    def __init__(self, size: int) -> None:
        super().__init__()
        self.buffer = bytearray(size)

    def bodyBuffer(self) -> memoryview | None:
        return memoryview(self.buffer)

    def bodyFilled(self, n: int) -> None:
        self.body += self.buffer[:n]
        self.pieces.append(("filled", n))


@implementer(IStreamingUpload)
class SinkResource(Resource):
    """
    Streams PUT bodies to a new L{DirectSink} per request (a L{CopySink}
    when not C{direct} or for C{/copy}) and answers with the body size;
    answers GET with C{hello}.
    """

    isLeaf = True

    def __init__(self, direct: bool = True, size: int = 4 * KiB) -> None:
        super().__init__()
        self.direct = direct
        self.size = size
        self.sinks: list[CopySink] = []
        self.rendered = 0
        self.refuse: HTTPError | None = None

    def bodySink(self, request: Any, length: int | None) -> IBodySink:
        if self.refuse is not None:
            raise self.refuse
        direct = self.direct and request.path != b"/copy"
        sink = DirectSink(self.size) if direct else CopySink()
        self.sinks.append(sink)
        return sink

    def render_PUT(self, request: Any) -> bytes:
        self.rendered += 1
        sink: CopySink = request.bodySink
        return b"got %d" % len(sink.body)

    def render_GET(self, request: Any) -> bytes:
        return b"hello"


def connectDirect(site: Any) -> tuple[Connection, DirectReadTransport]:
    """
    @return: A channel of C{site} connected to a L{DirectReadTransport}.
    """
    channel: ImageioChannel = site.buildProtocol(None)
    transport = DirectReadTransport()
    channel.makeConnection(transport)
    return Connection(channel, transport), transport


def receive(
    conn: Connection,
    transport: DirectReadTransport,
    data: bytes,
    most: int = 3000,
    whilePaused: Callable[[], object] | None = None,
) -> None:
    """
    Deliver C{data} as our socket transports read it: into the reader's
    buffer when one is offered, else through C{dataReceived}; at most
    C{most} bytes a read, calling C{whilePaused} while the transport is
    paused.
    """
    while data:
        if transport.producerState == "paused":
            if whilePaused is None:
                raise AssertionError("Transport paused")
            whilePaused()
            continue
        reader = transport.reader
        view = reader.readBuffer() if reader is not None else None
        if view is None:
            conn.send(data[:most])
            data = data[most:]
            continue
        assert reader is not None
        if not len(view):
            raise AssertionError("readBuffer offered no room")
        transport.offered.append(len(view))
        n = min(len(view), len(data), most)
        view[:n] = data[:n]
        data = data[n:]
        reader.bufferFilled(n)


def putHead(length: int, path: bytes = b"/x") -> bytes:
    return b"PUT %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (path, length)


class DirectReadTests(SynchronousTestCase):
    """
    L{ImageioChannel} as an L{IDirectReader}: a Content-Length body for a
    sink that provides L{IDirectBodySink} is read straight into the sink's
    buffers by a transport that provides L{IDirectReadTransport}.
    """

    def setUp(self) -> None:
        self.resource = SinkResource()
        self.site = ImageioSite(self.resource, "test", reactor=Clock())
        self.conn, self.transport = connectDirect(self.site)

    def test_channelProvidesDirectReader(self) -> None:
        """
        L{ImageioChannel} provides L{IDirectReader}.
        """
        self.assertTrue(verifyObject(IDirectReader, self.conn.channel))

    def test_readerSetAfterHeaders(self) -> None:
        """
        The channel becomes the transport's reader once the headers of a
        PUT with a body for a direct sink are complete, not before.
        """
        head = putHead(100)
        self.conn.send(head[:-2])
        self.assertEqual(self.transport.readers, [])
        self.conn.send(head[-2:])
        self.assertEqual(self.transport.readers, [self.conn.channel])

    def test_headPacketBodyCopied(self) -> None:
        """
        Body bytes that came with the headers go through C{dataReceived};
        the reader then offers buffer space for the rest only.
        """
        self.conn.send(putHead(100) + b"abc")
        self.assertEqual(self.transport.readers, [self.conn.channel])
        sink = self.resource.sinks[0]
        self.assertEqual((sink.pieces, bytes(sink.body)), ([("copied", 3)], b"abc"))
        view = self.conn.channel.readBuffer()
        assert view is not None
        # All but the last byte, which goes through Twisted's decoder.
        self.assertEqual(len(view), 96)

    def test_bodyIntoReaderBuffers(self) -> None:
        """
        The rest of the body fills the sink's buffers through
        C{bufferFilled}, but for the last byte, which goes through
        Twisted's decoder and ends the body; then the request is rendered
        and answered and the reader unset.
        """
        body = bytes(range(256)) * 40
        self.conn.send(putHead(len(body)) + body[:10])
        receive(self.conn, self.transport, body[10:])
        sink = self.resource.sinks[0]
        self.assertEqual(bytes(sink.body), body)
        self.assertEqual(sink.pieces[0], ("copied", 10))
        self.assertEqual({how for how, _ in sink.pieces[1:-1]}, {"filled"})
        self.assertEqual(sink.pieces[-1], ("copied", 1))
        self.assertTrue(sink.complete)
        self.assertEqual(self.resource.rendered, 1)
        [response] = self.conn.responses()
        self.assertEqual((response.status, response.body), (200, b"got %d" % len(body)))
        self.assertEqual(self.transport.readers, [self.conn.channel, None])
        self.assertFalse(self.conn.closed)

    def test_readBufferLimitedToContentLength(self) -> None:
        """
        C{readBuffer} offers the sink's buffer cut to the body bytes still
        to come but the last, and the sink's own limit when that is
        smaller; for the last byte it offers nothing.
        """
        self.conn.send(putHead(100))
        channel = self.conn.channel
        view = channel.readBuffer()
        assert view is not None
        self.assertEqual(len(view), 99)
        view[:30] = b"x" * 30
        channel.bufferFilled(30)
        view = channel.readBuffer()
        assert view is not None
        self.assertEqual(len(view), 69)
        channel.bufferFilled(69)
        self.assertIsNone(channel.readBuffer())
        self.assertEqual(self.transport.readers, [channel])
        self.conn.send(b"z")
        self.assertEqual(self.conn.response().body, b"got 100")
        self.assertEqual(self.transport.readers, [channel, None])
        resource = SinkResource(size=64)
        conn, _ = connectDirect(ImageioSite(resource, "test", reactor=Clock()))
        conn.send(putHead(100))
        view = conn.channel.readBuffer()
        assert view is not None
        self.assertEqual(len(view), 64)

    def test_readsCountedWhenSpaceFull(self) -> None:
        """
        The rest of the offered space is offered again after a read, and
        the sink hears of the bytes once that space is full: one
        C{bodyFilled} for many reads.
        """
        self.conn.send(putHead(100))
        channel = self.conn.channel
        view = channel.readBuffer()
        assert view is not None
        view[:30] = b"a" * 30
        channel.bufferFilled(30)
        sink = self.resource.sinks[0]
        self.assertEqual(sink.pieces, [])
        rest = channel.readBuffer()
        assert rest is not None
        self.assertEqual(len(rest), 69)
        rest[:69] = b"b" * 69
        channel.bufferFilled(69)
        self.assertEqual(sink.pieces, [("filled", 99)])
        self.assertEqual(bytes(sink.body), b"a" * 30 + b"b" * 69)
        self.conn.send(b"z")
        self.assertEqual(self.conn.response().body, b"got 100")

    def test_pendingReadsCountedOnLoss(self) -> None:
        """
        Bytes read into the offered space reach the sink before it hears
        that the connection was lost.
        """
        self.conn.send(putHead(100))
        receive(self.conn, self.transport, b"x" * 40, most=10)
        sink = self.resource.sinks[0]
        self.assertEqual(sink.pieces, [])
        self.conn.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual((sink.pieces, bytes(sink.body)), ([("filled", 40)], b"x" * 40))
        self.assertIsNotNone(sink.lost)

    def test_pendingReadsCountedWhenStopped(self) -> None:
        """
        Bytes read into the offered space reach the sink when the client
        half-closes, or when the body rate watch looks.
        """
        self.conn.send(putHead(100))
        receive(self.conn, self.transport, b"x" * 40, most=10)
        sink = self.resource.sinks[0]
        self.conn.channel.readConnectionLost()
        self.assertEqual(sink.pieces, [("filled", 40)])

    def test_directReadsKeepConnectionAlive(self) -> None:
        """
        Body bytes read straight into the sink's buffers count as activity
        for the idle timeout although they do not reset it one by one: the
        connection times out C{timeout} seconds after the last byte, not
        before.
        """
        clock = Clock()
        site = ImageioSite(SinkResource(size=64 * KiB), "test", timeout=10, reactor=clock)
        site.bodyMinRate = 0
        conn, transport = connectDirect(site)
        conn.send(putHead(64 * KiB))
        for _ in range(10):
            clock.advance(4)
            receive(conn, transport, b"x" * 100)
        self.assertEqual(site.resource.sinks[0].pieces, [])
        clock.advance(9.5)
        self.assertFalse(conn.closed)
        clock.advance(0.5)
        self.assertTrue(transport.disconnecting)

    def test_pipelinedAfterDirectBody(self) -> None:
        """
        Requests pipelined behind a body read into the sink's buffers are
        parsed from the same stream: no byte of theirs lands in the body,
        and each direct body starts and ends its own direct reads.
        """
        first = b"a" * 5000
        second = b"b" * 7000
        stream = first + request(b"GET", b"/x") + putHead(len(second)) + second
        self.conn.send(putHead(len(first)))
        receive(self.conn, self.transport, stream, most=4000)
        self.assertEqual(
            [(r.status, r.body) for r in self.conn.responses()],
            [(200, b"got 5000"), (200, b"hello"), (200, b"got 7000")],
        )
        self.assertEqual([bytes(s.body) for s in self.resource.sinks], [first, second])
        channel = self.conn.channel
        self.assertEqual(self.transport.readers, [channel, None, channel, None])
        # Each buffer offered was cut to what was left of its body but the
        # last byte, which came through Twisted's decoder.
        left = [len(first), len(second)]
        for size in self.transport.offered:
            if left[0] == 1:
                left.pop(0)
            self.assertLessEqual(size, left[0] - 1)
            left[0] -= min(size, 4000)
        for sink, body in zip(self.resource.sinks, (first, second), strict=True):
            self.assertEqual(sink.pieces[-1][0], "copied")
            filled = sum(n for how, n in sink.pieces if how == "filled")
            self.assertLessEqual(filled, len(body) - 1)

    def test_directBodyFramedExactly(self) -> None:
        """
        A Content-Length body read directly is framed exactly: bytes in it
        that look like requests are body, never parsed as requests, and the
        request pipelined after it is parsed once, from its first byte,
        however the reads fall.
        """
        smuggled = request(b"GET", b"/smuggled") + putHead(4, b"/smuggled")
        body = (smuggled * 200)[:5000]
        stream = body + request(b"GET", b"/x")
        for most in (1, 7, 4999, 5000, 5001, 100_000):
            resource = SinkResource(size=64 * KiB)
            conn, transport = connectDirect(ImageioSite(resource, "test", reactor=Clock()))
            conn.send(putHead(len(body)))
            receive(conn, transport, stream, most=most)
            self.assertEqual(
                [(r.status, r.body) for r in conn.responses()],
                [(200, b"got 5000"), (200, b"hello")],
                most,
            )
            self.assertEqual([bytes(s.body) for s in resource.sinks], [body], most)
            self.assertEqual(resource.rendered, 1)
            self.assertLessEqual(max(transport.offered, default=0), len(body) - 1)
            self.assertFalse(conn.closed)

    def test_chunkedNotDirect(self) -> None:
        """
        A chunked body is parsed by twisted.web: the channel does not
        become the transport's reader.
        """
        self.conn.send(
            b"PUT /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
        )
        self.assertEqual(self.transport.readers, [])
        self.assertEqual(self.conn.response().body, b"got 5")

    def test_copySinkNotDirect(self) -> None:
        """
        A sink that does not provide L{IDirectBodySink} gets its body
        through C{dataReceived}: no reader is set.
        """
        self.resource.direct = False
        self.conn.send(putHead(5))
        self.assertEqual(self.transport.readers, [])
        receive(self.conn, self.transport, b"hello")
        self.assertEqual(self.resource.sinks[0].pieces, [("copied", 5)])
        self.assertEqual(self.conn.response().body, b"got 5")

    def test_plainTransport(self) -> None:
        """
        On a transport that cannot read into buffers the body arrives
        through C{dataReceived} as before.
        """
        channel: ImageioChannel = self.site.buildProtocol(None)  # type: ignore[assignment]
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(putHead(5) + b"hel")
        self.assertIsNone(channel.readBuffer())
        channel.dataReceived(b"lo")
        self.assertEqual(self.resource.sinks[0].pieces, [("copied", 3), ("copied", 2)])
        self.assertIn(b"got 5", transport.value())

    def test_refusedFromHeadersNotDirect(self) -> None:
        """
        A request refused from its headers is answered at once and its
        body is never read into buffers.
        """
        self.resource.refuse = HTTPError(403, "No", close=True)
        self.conn.send(putHead(100))
        self.assertEqual(self.transport.readers, [])
        self.assertIsNone(self.conn.channel.readBuffer())
        self.assertEqual(self.conn.response().status, 403)
        self.assertTrue(self.conn.closed)

    def test_respondEarlyStopsDirectReads(self) -> None:
        """
        A request answered early while its body is read directly unsets
        the reader at the next read, and the rest of the body is dropped.
        """
        self.conn.send(putHead(100))
        channel = self.conn.channel
        receive(self.conn, self.transport, b"x" * 10)
        request: StreamingRequest = channel.requests[-1]
        request.respondEarly(HTTPError(403, "Canceled", close=True))
        self.assertIsNone(channel.readBuffer())
        self.assertEqual(self.transport.readers, [channel, None])
        receive(self.conn, self.transport, b"y" * 90)
        sink = self.resource.sinks[0]
        self.assertEqual(bytes(sink.body), b"x" * 10)
        self.assertIsNotNone(sink.lost)
        self.assertEqual(self.resource.rendered, 0)
        self.assertEqual(self.conn.response().status, 403)

    def test_staleReaderAfterCopiedBody(self) -> None:
        """
        A body that arrived whole with its head leaves no reader behind for
        a chunked request pipelined after it.
        """
        self.conn.send(
            putHead(3)
            + b"abc"
            + b"PUT /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.assertEqual(self.conn.response().body, b"got 3")
        receive(self.conn, self.transport, b"5\r\nhello\r\n0\r\n\r\n")
        self.assertEqual(self.conn.response().body, b"got 5")
        self.assertIsNone(self.transport.reader)

    def test_staleSinkAfterCopiedBody(self) -> None:
        """
        The body of a request pipelined behind one whose body came with its
        head goes to its own sink, not into the previous request's buffers.
        """
        self.conn.send(putHead(3) + b"abc" + putHead(5, b"/copy") + b"hel")
        receive(self.conn, self.transport, b"lo")
        self.assertEqual([bytes(s.body) for s in self.resource.sinks], [b"abc", b"hello"])
        self.assertEqual([r.body for r in self.conn.responses()], [b"got 3", b"got 5"])


class DirectUploadTests(StreamingTestCase):
    """
    Uploads through the images API read straight into the L{UploadSink}'s
    buffers.
    """

    def test_uploadIntoSinkBuffers(self) -> None:
        """
        A PUT body is read into the sink's buffers, pausing while storage is
        behind, and reaches storage intact; the reader is unset at the end.
        """
        self.ticket()
        data = bytes(range(256)) * (4 * BUFFER // 256) + b"end"
        conn, transport = connectDirect(self.h.site)
        conn.send(putHead(len(data), b"/images/t1?flush=n"))
        self.assertEqual(transport.readers, [conn.channel])
        receive(conn, transport, data, most=5000, whilePaused=self.backend.completeWrite)
        # All but the last byte, which ends the body through Twisted's decoder.
        self.assertEqual(sum(min(n, 5000) for n in transport.offered), len(data) - 1)
        self.assertLessEqual(max(transport.offered), BUFFER)
        self.assertEqual(transport.readers, [conn.channel, None])
        while self.backend.pendingWrites():
            self.backend.completeWrite()
        self.assertEqual(conn.response().status, 200)
        self.assertEqual(bytes(self.backend.image[: len(data)]), data)

    def test_cancelStopsDirectReads(self) -> None:
        """
        Removing the ticket during a PUT read into buffers answers 403 and
        stops direct reads.
        """
        self.ticket()
        conn, transport = connectDirect(self.h.site)
        conn.send(putHead(4 * BUFFER, b"/images/t1?flush=n"))
        receive(conn, transport, b"x" * 100)
        self.registry.remove("t1")
        self.assertEqual(conn.response().status, 403)
        self.assertIsNone(conn.channel.readBuffer())
        self.assertEqual(transport.readers, [conn.channel, None])

    def test_pipelinedChunkedPatch(self) -> None:
        """
        A chunked PATCH pipelined in the packet of a small PUT is read and
        answered like any other request.
        """
        self.ticket()
        self.backend.manual = False
        conn, transport = connectDirect(self.h.site)
        conn.send(
            putHead(3, b"/images/t1?flush=n")
            + b"abc"
            + b"PATCH /images/t1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        self.assertEqual(conn.response().status, 200)
        body = b'{"op": "flush"}'
        receive(conn, transport, b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        self.assertEqual(conn.response().status, 200)
        self.assertEqual(len(self.backend.flushes), 1)


class SmallReadTests(StreamingTestCase):
    """
    Small ranged reads after a connection's first request are answered from
    one backend read into a spare buffer, without a download producer, and
    fail as the producer's do before the headers.
    """

    def setUp(self) -> None:
        super().setUp()
        self.backend.image[:] = bytes(range(256)) * (len(self.backend.image) // 256)
        self.producers = 0
        from imageio.daemon import images

        real = images.DownloadProducer

        def counting(*a: Any, **kw: Any) -> Any:
            self.producers += 1
            return real(*a, **kw)

        self.patch(images, "DownloadProducer", counting)

    def warm(self, **kw: Any) -> Connection:
        """
        @return: A connection whose first read left a spare buffer.
        """
        self.ticket(**kw)
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-4095"}))
        self.backend.completeRead()
        self.assertEqual(conn.response().status, 206)
        self.assertEqual(self.producers, 1)
        return conn

    def test_smallRead(self) -> None:
        """
        The second 4 KiB read has the bytes and headers the producer sends.
        """
        conn = self.warm()
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=4100-8195"}))
        self.assertEqual(self.backend.pendingReads(), 1)
        self.backend.completeRead()
        response = conn.response()
        self.assertEqual(response.status, 206)
        self.assertEqual(response.body, bytes(self.backend.image[4100:8196]))
        self.assertEqual(response.header(b"content-length"), b"4096")
        self.assertEqual(
            response.header(b"content-range"), b"bytes 4100-8195/%d" % len(self.backend.image)
        )
        self.assertEqual(response.header(b"content-type"), b"application/octet-stream")
        self.assertEqual(response.header(b"accept-ranges"), b"bytes")
        self.assertEqual(self.producers, 1)
        self.assertFalse(conn.closed)
        # Counted as transferred, as the producer's reads are.
        self.assertEqual(self.registry.lookup("t1").transferred(), 4096 + 4096)  # type: ignore[union-attr]

    def test_sameHead(self) -> None:
        """
        The small read's status line and headers are those the producer
        sent for the same range, in the same order, with a quoted file name
        in C{Content-Disposition} and CORS headers.
        """
        self.ticket(filename="disk 1.raw")
        conn = self.h.connect()
        heads = []
        for _ in range(2):
            conn.send(
                request(
                    b"GET", b"/images/t1", {b"Range": b"bytes=4096-8191", b"Origin": b"https://x"}
                )
            )
            self.backend.completeRead()
            response = conn.response()
            heads.append((response.status, [h for h in response.headers if h[0] != b"date"]))
        self.assertEqual(self.producers, 1)
        self.assertEqual(heads[1], heads[0])
        self.assertIn((b"content-disposition", b'attachment; filename="disk 1.raw"'), heads[1][1])
        self.assertIn((b"access-control-allow-origin", b"*"), heads[1][1])

    def test_openBackendNoWait(self) -> None:
        """
        Once the connection's backend is open, a read does not wait for it
        through C{backendFor}, unless the request is relayed (which
        C{backendFor} checks for loops).
        """
        conn = self.warm()
        from imageio.daemon.images import ImagesService

        calls: list[object] = []
        real = ImagesService.backendFor

        def counting(*a: Any) -> Any:
            calls.append(a)
            return real(*a)

        self.patch(ImagesService, "backendFor", counting)
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-4095"}))
        self.backend.completeRead()
        self.assertEqual(conn.response().status, 206)
        self.assertEqual(calls, [])
        conn.send(
            request(b"GET", b"/images/t1", {b"Range": b"bytes=0-4095", b"Imageio-Relayed": b"1"})
        )
        self.backend.completeRead()
        self.assertEqual(conn.response().status, 206)
        self.assertEqual(len(calls), 1)

    def test_canceled(self) -> None:
        """
        A small read canceled while its backend read is in flight is
        answered 403 at once; the removal completes.
        """
        conn = self.warm()
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=4096-8191"}))
        d = self.registry.remove("t1")
        self.successResultOf(d)
        response = conn.response()
        self.assertEqual(response.status, 403)
        self.assertIn("was canceled", response.text)
        self.assertTrue(conn.closed)
        self.backend.completeRead()
        self.assertEqual(conn.output(), b"")

    def test_pastImage(self) -> None:
        """
        A small read inside the ticket but past the end of the image is
        answered 416, as the producer's.
        """
        conn = self.warm(size=2 * len(self.backend.image))
        end = len(self.backend.image)
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=%d-%d" % (end, end + 99)}))
        self.backend.completeRead()
        response = conn.response()
        self.assertEqual(response.status, 416)
        self.assertEqual(self.producers, 1)

    def test_clientGone(self) -> None:
        """
        A client that leaves during the read gets nothing; the buffer and
        the ticket's operation are released.
        """
        conn = self.warm()
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-4095"}))
        conn.lose()
        self.backend.completeRead()
        self.assertEqual(conn.output(), b"")
        self.successResultOf(self.registry.remove("t1"))

    def test_oneWrite(self) -> None:
        """
        The response head and a small body reach the transport as one write
        (one send, one TLS record).
        """
        conn = self.warm()
        writes: list[bytes] = []
        write = conn.transport.write

        def recording(data: bytes) -> None:
            writes.append(bytes(data))
            write(data)

        conn.transport.write = recording  # type: ignore[method-assign]
        conn.transport.writeSequence = lambda seq: recording(b"".join(seq))  # type: ignore[method-assign]
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-4095"}))
        self.backend.completeRead()
        self.assertEqual(len(writes), 1)
        response = conn.response()
        self.assertEqual((response.status, len(response.body)), (206, 4096))

    def test_bugAfterRead(self) -> None:
        """
        A bug while answering (after the read) is logged and the client gets
        500, not a request left hanging.
        """
        conn = self.warm()
        from imageio.daemon import images

        def broken(filename: object) -> bytes:
            raise RuntimeError("bug")

        self.patch(images, "contentDisposition", broken)
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-4095"}))
        self.backend.completeRead()
        self.assertEqual(conn.response().status, 500)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class SmallReadThenTests(SmallReadTests):
    """
    L{SmallReadTests} over a backend that gives the read's outcome to a
    plain function (L{IReadIntoThen}): the same answers without the read's
    Deferred and the handler's and router's errbacks.
    """

    backendClass = FakeCallbackBackend
    backend: FakeCallbackBackend

    def test_plainCallback(self) -> None:
        """
        A small read asks the backend for a plain callback, and the
        handler returns no Deferred.
        """
        conn = self.warm()
        from imageio.daemon.images import ImageHandler

        handled: list[object] = []
        realGET = ImageHandler.handleGET

        def handleGET(handler: ImageHandler, *a: Any) -> Any:
            handled.append(realGET(handler, *a))
            return handled[-1]

        self.patch(ImageHandler, "handleGET", handleGET)
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=4096-8191"}))
        self.backend.completeRead()
        self.assertEqual(conn.response().status, 206)
        self.assertEqual(handled, [None])
        self.assertEqual(self.backend.readsThen, 1)

    def test_storageError(self) -> None:
        """
        A read failing with an OS error is answered 500 with upstream's
        text and the connection closed; the error is logged, not sent.
        """
        conn = self.warm()
        self.backend.readError = OSError(5, "I/O error on /secret/path")
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=4096-8191"}))
        response = conn.response()
        self.assertEqual(response.status, 500)
        self.assertNotIn("secret", response.text)
        self.assertTrue(conn.closed)
        self.successResultOf(self.registry.remove("t1"))
