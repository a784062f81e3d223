# -*- test-case-name: tests.test_streaming -*-
"""
Tests for L{imageio.web._streaming}, through the images site: request
bodies stream to storage with backpressure, disconnects and cancellation
end operations cleanly, timeouts apply, and the private Twisted details we
rely on are pinned.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http

from imageio.tickets import Ticket
from imageio.web._streaming import MAX_REQUEST_LINE, ImageioChannel, StreamingRequest, redactPath
from tests._http import (
    Connection,
    FakeBackend,
    FakeOpener,
    ImagesHarness,
    parseResponses,
    request,
)

KiB = 1024

#: Buffer size of the harness: the upload sink pauses the client when this
#: much is queued, and resumes below half of it.
BUFFER = 8 * KiB


class PrivateTwistedTests(SynchronousTestCase):
    """
    Pin the private L{http.HTTPChannel} attributes L{StreamingRequest} and
    L{ImageioChannel} read: if Twisted renames them, these fail first.
    """

    def test_requestLineAttributes(self) -> None:
        """
        After the request line and headers, and before the body, the channel
        holds the method, the raw path and the version in C{_command},
        C{_path} and C{_version}.
        """
        h = ImagesHarness(opener=FakeOpener(FakeBackend(bytearray(10))))
        h.addTicket(None, size=10)
        conn = h.connect()
        channel: Any = conn.channel
        self.assertTrue(channel._HTTPChannel__first_line)
        conn.send(b"PUT /images/t1?flush=n HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nab")
        self.assertEqual(channel._command, b"PUT")
        self.assertEqual(channel._path, b"/images/t1?flush=n")
        self.assertEqual(channel._version, b"HTTP/1.1")
        self.assertFalse(channel._HTTPChannel__first_line)
        request = channel.requests[-1]
        self.assertIsInstance(request, StreamingRequest)
        self.assertIsNotNone(request.bodySink)

    def test_channelMethods(self) -> None:
        """
        The channel methods we override or call exist on HTTPChannel.
        """
        for name in (
            "_send100Continue",
            "_respondToBadRequestAndDisconnect",
            "allHeadersReceived",
            "allContentReceived",
            "lineLengthExceeded",
            "_savedTimeOut",
            "_handlingRequest",
        ):
            self.assertTrue(hasattr(http.HTTPChannel(), name), name)

    def test_requestMethods(self) -> None:
        """
        The request methods the channel calls, and C{StreamingRequest}
        overrides, exist on L{http.Request}.
        """
        for name in ("gotLength", "handleContentChunk", "requestReceived", "connectionLost"):
            self.assertTrue(callable(getattr(http.Request, name)), name)


class StreamingTestCase(SynchronousTestCase):
    """
    A harness whose backend completes writes and reads only when the test
    says so.
    """

    def setUp(self) -> None:
        self.backend = FakeBackend(bytearray(1024 * KiB))
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

    def countAllocations(self) -> list[int]:
        from imageio import _buffers

        sizes: list[int] = []
        allocate = _buffers.allocate

        def counting(size: int) -> Any:
            sizes.append(size)
            return allocate(size)

        self.patch(_buffers, "allocate", counting)
        return sizes

    def test_pausedStopsReading(self) -> None:
        """
        While the transport is paused, at most one chunk is read ahead;
        resuming sends it and reads on; the body arrives intact with at most
        two buffers allocated.
        """
        sizes = self.countAllocations()
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
        sizes = self.countAllocations()
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
        conn = self.h.connect()
        conn.send(b"DELETE /images/t1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(20):
            conn.send(b"1000\r\n" + b"x" * 4096 + b"\r\n")
        response = conn.response()
        self.assertEqual(response.status, 413)
        self.assertTrue(conn.closed)

    def test_channelType(self) -> None:
        """
        The site builds L{ImageioChannel}s making L{StreamingRequest}s.
        """
        conn = self.h.connect()
        self.assertIsInstance(conn.channel, ImageioChannel)
        conn.channel.connectionLost(Failure(ConnectionDone()))


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
