# -*- test-case-name: tests.test_images -*-
"""
Tests for L{imageio.daemon.images}: the images API against the wire
contract (section 1, as amended by design.md item 1), through the real
HTTP parser.
"""

from __future__ import annotations

import errno
import json
import os
from typing import Any
from unittest import SkipTest

from twisted.internet.defer import Deferred, fail
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

import imageio
from imageio import _blkhash
from imageio.backends import file as filebackend
from imageio.backends import memory
from imageio.web import _jsonlist
from imageio.web._response import INTERNAL_ERROR
from tests._http import (
    Connection,
    FakeBackend,
    FakeOpener,
    ImagesHarness,
    Response,
    parseResponses,
    request,
)

KiB = 1024
MiB = 1024**2

FORBIDDEN = "You are not allowed to access this resource: "
TEXT = b"text/plain; charset=UTF-8"


class ImagesTestCase(SynchronousTestCase):
    """
    Base: an images harness over the memory backend.
    """

    unixSocket: str | None = "\0/org/ovirt/imageio"

    def setUp(self) -> None:
        self.h = ImagesHarness(unixSocket=self.unixSocket)
        self.addCleanup(self.h.cleanup)
        self.clock = self.h.clock
        self.registry = self.h.registry

    def send(self, raw: bytes, head: bool = False) -> Response:
        return self.h.roundTrip(raw, head=head)

    def assertError(
        self, response: Response, status: int, text: str, close: bool | None = None
    ) -> None:
        """
        C{response} is the plain-text error C{text} with C{status}.
        """
        self.assertEqual((response.status, response.text), (status, text + "\n"))
        self.assertEqual(response.header(b"content-type"), TEXT)
        self.assertEqual(response.header(b"content-length"), b"%d" % len(response.body))
        if close is not None:
            self.assertEqual(response.header(b"connection") == b"close", close)

    def assertJSON(self, response: Response, status: int = 200) -> Any:
        self.assertEqual(response.status, status, response.body)
        self.assertEqual(response.header(b"content-type"), b"application/json")
        self.assertTrue(response.body.endswith(b"\n"))
        return json.loads(response.body)

    def image(self, ticketID: str = "t1") -> bytearray:
        name = self.registry.get(ticketID).url.split(":", 1)[1]
        return memory._images[name]


class CommonFormatTests(ImagesTestCase):
    """
    Section 1.2: status line, server header, Content-Length always.
    """

    def test_successWithoutBody(self) -> None:
        """
        Successful PUT answers C{HTTP/1.1 200 OK} with C{Content-Length: 0},
        no content type, and the C{Server: imageio/<version>} header.
        """
        self.h.addTicket(b"x" * 10)
        response = self.send(request(b"PUT", b"/images/t1", body=b"abc"))
        self.assertEqual((response.version, response.status), (b"HTTP/1.1", 200))
        self.assertEqual(response.reason, b"OK")
        self.assertEqual(response.header(b"content-length"), b"0")
        self.assertIsNone(response.header(b"content-type"))
        self.assertEqual(response.header(b"server"), b"imageio/" + imageio.__version__.encode())
        self.assertIsNotNone(response.header(b"date"))

    def test_keepAlive(self) -> None:
        """
        Connections are persistent: several requests are answered in order on
        one connection.
        """
        self.h.addTicket(b"0123456789")
        conn = self.h.connect()
        conn.send(
            request(b"GET", b"/images/t1", {b"Range": b"bytes=0-1"})
            + request(b"PUT", b"/images/t1", body=b"AB")
            + request(b"GET", b"/images/t1", {b"Range": b"bytes=0-3"})
        )
        responses = conn.responses()
        self.assertEqual([r.status for r in responses], [206, 200, 206])
        self.assertEqual([r.body for r in responses], [b"01", b"", b"AB23"])
        self.assertFalse(conn.closed)


class NonUTF8TicketTests(ImagesTestCase):
    """
    Ticket ids with percent-escapes that are not UTF-8 are unknown tickets.
    """

    def test_unknownTicket(self) -> None:
        """
        C{/images/%ff} is 403 with upstream's text (the escape becomes
        U+FFFD, as upstream's C{unquote} makes it) for every method and
        sub-resource, PUT with a body included; nothing is logged as a
        failure.
        """
        text = "You are not allowed to access this resource: No such ticket "
        for raw in (
            request(b"GET", b"/images/%ff"),
            request(b"HEAD", b"/images/%ff"),
            request(b"OPTIONS", b"/images/%ff"),
            request(b"GET", b"/images/%ff/extents"),
            request(b"GET", b"/images/%ff/checksum"),
            request(b"PUT", b"/images/%ff", body=b"abc"),
            request(b"PUT", b"/images/%ff%fe%80", body=b"abc"),
            request(b"PATCH", b"/images/%ff", body=b'{"op": "flush"}'),
        ):
            head = raw.startswith(b"HEAD")
            response = self.send(raw, head=head)
            self.assertEqual(response.status, 403, raw)
            if not head:
                self.assertTrue(response.text.startswith(text + "\ufffd"), raw)


class OptionsTests(ImagesTestCase):
    """
    Section 1.3: OPTIONS.
    """

    def test_star(self) -> None:
        """
        C{OPTIONS /images/*} needs no ticket and advertises every feature and
        the local socket, JSON-encoded with C{\\u0000}.
        """
        response = self.send(request(b"OPTIONS", b"/images/*"))
        self.assertEqual(response.header(b"allow"), b"OPTIONS,GET,PUT,PATCH")
        self.assertEqual(
            response.body,
            b'{"unix_socket": "\\u0000/org/ovirt/imageio", '
            b'"features": ["checksum", "extents", "flush", "zero"]}\n',
        )
        self.assertEqual(response.header(b"content-type"), b"application/json")

    def test_starQuoted(self) -> None:
        """
        The path is unquoted before matching: C{%2A} is C{*}.
        """
        response = self.send(request(b"OPTIONS", b"/images/%2A"))
        self.assertEqual(self.assertJSON(response)["features"][0], "checksum")

    def test_emptyID(self) -> None:
        """
        C{OPTIONS /images/} is 400 C{Ticket id is required}.
        """
        self.assertError(self.send(request(b"OPTIONS", b"/images/")), 400, "Ticket id is required")

    def test_writeTicket(self) -> None:
        """
        A write ticket allows every method and feature, with the backend's
        C{max_readers} and C{max_writers}, keys in upstream's order.
        """
        self.h.addTicket(b"data", ops=("write",))
        response = self.send(request(b"OPTIONS", b"/images/t1"))
        self.assertEqual(response.header(b"allow"), b"OPTIONS,GET,PUT,PATCH")
        self.assertEqual(
            response.body,
            b'{"unix_socket": "\\u0000/org/ovirt/imageio", '
            b'"features": ["checksum", "extents", "flush", "zero"], '
            b'"max_readers": 8, "max_writers": 8}\n',
        )

    def test_readTicket(self) -> None:
        """
        A read-only ticket allows OPTIONS and GET with the read features.
        """
        self.h.addTicket(b"data", ops=("read",))
        response = self.send(request(b"OPTIONS", b"/images/t1"))
        self.assertEqual(response.header(b"allow"), b"OPTIONS,GET")
        body = self.assertJSON(response)
        self.assertEqual(body["features"], ["checksum", "extents"])
        self.assertEqual((body["max_readers"], body["max_writers"]), (8, 8))

    def test_backendLimits(self) -> None:
        """
        C{max_readers} and C{max_writers} come from the backend.
        """
        self.h = ImagesHarness(opener=FakeOpener(FakeBackend(maxReaders=8, maxWriters=1)))
        self.h.addTicket(b"")
        body = self.assertJSON(self.send(request(b"OPTIONS", b"/images/t1")))
        self.assertEqual((body["max_readers"], body["max_writers"]), (8, 1))

    def test_touches(self) -> None:
        """
        OPTIONS on a ticket extends its expiry from now and resets its idle
        time.
        """
        ticket = self.h.addTicket(b"data")
        self.clock.advance(100)
        self.send(request(b"OPTIONS", b"/images/t1"))
        self.assertEqual(ticket.expires, 100 + 300)
        self.assertEqual(ticket.info(self.clock.seconds())["idle_time"], 0)

    def test_unknownTicket(self) -> None:
        """
        OPTIONS on an unknown ticket is 403 and closes the connection.
        """
        conn = self.h.connect()
        conn.send(request(b"OPTIONS", b"/images/nope"))
        self.assertError(conn.response(), 403, FORBIDDEN + "No such ticket nope", close=True)
        self.assertTrue(conn.closed)

    def test_expiredTicket(self) -> None:
        """
        OPTIONS on an expired ticket is 403 C{Transfer=<id> expired}.
        """
        self.h.addTicket(b"data")
        self.clock.advance(300)
        self.assertError(
            self.send(request(b"OPTIONS", b"/images/t1")), 403, FORBIDDEN + "Transfer=tr-t1 expired"
        )

    def test_expiryDuringAndAfterUpload(self) -> None:
        """
        A ticket expiring during a PUT lets that PUT finish (the in-flight
        policy: expiry is checked when a request starts); the completed
        operation extends it by its timeout, and once that passes the next
        request on the same keep-alive connection gets 403 and is closed.
        """
        self.h.addTicket(bytes(4096), timeout=1, inactivity_timeout=5)
        conn = self.h.connect()
        body = b"slow" * 512
        head = b"PUT /images/t1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
        conn.send(head + body[:1024])
        self.clock.advance(1.3)
        conn.send(body[1024:])
        self.assertEqual(conn.response().status, 200)
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-2047"}))
        response = conn.response()
        self.assertEqual((response.status, response.body), (206, body))
        self.clock.advance(1.2)
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-0"}))
        self.assertError(conn.response(), 403, FORBIDDEN + "Transfer=tr-t1 expired", close=True)
        self.assertTrue(conn.closed)


class OptionsWithoutLocalTests(ImagesTestCase):
    """
    OPTIONS when the local listener is disabled.
    """

    unixSocket = None

    def test_noUnixSocket(self) -> None:
        """
        Without a local listener, C{unix_socket} is not advertised.
        """
        self.h.addTicket(b"data")
        for path in (b"/images/*", b"/images/t1"):
            body = self.assertJSON(self.send(request(b"OPTIONS", path)))
            self.assertNotIn("unix_socket", body)


class GetTests(ImagesTestCase):
    """
    Section 1.4: GET, with design.md item 1.
    """

    data = bytes(range(256)) * 40  # 10240 bytes

    def setUp(self) -> None:
        super().setUp()
        self.ticket = self.h.addTicket(self.data, filename="disk.raw")

    def get(self, rangeHeader: bytes | None = None, path: bytes = b"/images/t1") -> Response:
        headers = {b"Range": rangeHeader} if rangeHeader is not None else {}
        return self.send(request(b"GET", path, headers))

    def test_whole(self) -> None:
        """
        Without Range: 200, the whole image, octet-stream, attachment with the
        ticket's file name, C{Accept-Ranges: bytes}, no Content-Range.
        """
        response = self.get()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, self.data)
        self.assertEqual(response.header(b"content-length"), b"10240")
        self.assertEqual(response.header(b"content-type"), b"application/octet-stream")
        self.assertEqual(response.header(b"content-disposition"), b"attachment; filename=disk.raw")
        self.assertEqual(response.header(b"accept-ranges"), b"bytes")
        self.assertIsNone(response.header(b"content-range"))

    def test_noFilename(self) -> None:
        """
        A ticket without a file name gives a bare C{attachment}.
        """
        self.h.addTicket(b"abc", uuid="t2")
        self.assertEqual(self.get(path=b"/images/t2").header(b"content-disposition"), b"attachment")

    def test_filenameEscaped(self) -> None:
        """
        File names that are not plain tokens are quoted, and non-ASCII ones
        get an ASCII fallback and C{filename*} (RFC 6266).
        """
        self.h.addTicket(b"abc", uuid="t2", filename="my disk (1).raw")
        self.h.addTicket(b"abc", uuid="t3", filename="disque-été.raw")
        self.assertEqual(
            self.get(path=b"/images/t2").header(b"content-disposition"),
            b'attachment; filename="my disk (1).raw"',
        )
        self.assertEqual(
            self.get(path=b"/images/t3").header(b"content-disposition"),
            b"attachment; filename=\"disque-_t_.raw\"; filename*=UTF-8''disque-%C3%A9t%C3%A9.raw",
        )

    def test_closedRange(self) -> None:
        """
        A closed range is 206 with C{Content-Range} whose complete length is
        the ticket size.
        """
        response = self.get(b"bytes=0-4")
        self.assertEqual((response.status, response.reason), (206, b"Partial Content"))
        self.assertEqual(response.body, self.data[:5])
        self.assertEqual(response.header(b"content-range"), b"bytes 0-4/10240")
        self.assertEqual(response.header(b"content-length"), b"5")
        self.assertEqual(response.header(b"accept-ranges"), b"bytes")

    def test_lastByte(self) -> None:
        """
        C{bytes=T-1-T-1} and C{bytes=0-0} return exactly one byte.
        """
        self.assertEqual(self.get(b"bytes=10239-10239").body, self.data[-1:])
        self.assertEqual(self.get(b"bytes=0-0").body, self.data[:1])

    def test_openEnded(self) -> None:
        """
        C{bytes=N-} returns the rest of the image as 206.
        """
        response = self.get(b"bytes=10000-")
        self.assertEqual(response.status, 206)
        self.assertEqual(response.body, self.data[10000:])
        self.assertEqual(response.header(b"content-range"), b"bytes 10000-10239/10240")

    def test_suffix(self) -> None:
        """
        Suffix ranges are served (upstream refuses them): the last N bytes,
        or the whole image when N is larger.
        """
        response = self.get(b"bytes=-3")
        self.assertEqual(response.status, 206)
        self.assertEqual(response.body, self.data[-3:])
        self.assertEqual(response.header(b"content-range"), b"bytes 10237-10239/10240")
        whole = self.get(b"bytes=-99999")
        self.assertEqual(whole.body, self.data)
        self.assertEqual(whole.header(b"content-range"), b"bytes 0-10239/10240")

    def test_suffixZero(self) -> None:
        """
        C{bytes=-0} selects nothing: 416.
        """
        response = self.get(b"bytes=-0")
        self.assertEqual(response.status, 416)
        self.assertEqual(response.header(b"content-range"), b"bytes */10240")

    def test_openEndedPastEnd(self) -> None:
        """
        An open-ended range at or past the end is 416 with
        C{Content-Range: bytes */T} (upstream sends a broken 400).
        """
        for value in (b"bytes=10240-", b"bytes=20000-"):
            response = self.get(value)
            self.assertError(response, 416, "Requested range out of allowed range")
            self.assertEqual(response.header(b"content-range"), b"bytes */10240")

    def test_closedPastTicket(self) -> None:
        """
        A closed range past the ticket size is 416 C{Requested range out of
        allowed range} with C{bytes */<ticket size>}.
        """
        response = self.get(b"bytes=10000-10240")
        self.assertError(response, 416, "Requested range out of allowed range")
        self.assertEqual(response.header(b"content-range"), b"bytes */10240")

    def test_firstAfterLast(self) -> None:
        """
        C{bytes=5-4} is 416.
        """
        response = self.get(b"bytes=5-4")
        self.assertError(response, 416, "Cannot satisfy range 'bytes=5-4', first > last")
        self.assertEqual(response.header(b"content-range"), b"bytes */10240")

    def test_badRangeUnknownTicket(self) -> None:
        """
        A bad Range on an unknown ticket is 403: the ticket is checked
        before answering what is satisfiable.
        """
        response = self.get(b"bytes=5-4", path=b"/images/nope")
        self.assertError(response, 403, FORBIDDEN + "No such ticket nope")

    def test_badRanges(self) -> None:
        """
        Multiple ranges, other units, spaces, signs, hex, underscores and
        non-ASCII digits are all 416 with upstream's text, never 206.
        """
        for value in (
            b"bytes=0-1,5-6",
            b"BYTES=0-1",
            b"bytes = 0-1",
            b"bytes=+1-2",
            b"bytes=0x10-0x20",
            b"bytes=1_0-2_0",
            "bytes=١-٢".encode(),
            b"items=0-1",
        ):
            response = self.get(value)
            self.assertEqual(response.status, 416, value)
            self.assertIn("Cannot satisfy range", response.text)
            self.assertTrue(response.text.endswith("invalid range or multiple ranges\n"), value)
            self.assertEqual(response.header(b"content-range"), b"bytes */10240")

    def test_bytesDash(self) -> None:
        """
        C{bytes=-} is 416 C{... no first or last}.
        """
        self.assertError(
            self.get(b"bytes=-"), 416, "Cannot satisfy range 'bytes=-', no first or last"
        )

    def test_hugeNumbers(self) -> None:
        """
        Numbers beyond 64 bits are 416, not an overflow or a 500.
        """
        response = self.get(b"bytes=0-18446744073709551615")
        self.assertEqual(response.status, 416)
        response = self.get(b"bytes=99999999999999999999999-")
        self.assertEqual(response.status, 416)

    def test_imageLargerThanTicket(self) -> None:
        """
        When the image is larger than the ticket, a full GET returns the
        ticket size.
        """
        self.h.addTicket(self.data, uuid="t2", size=100)
        response = self.get(path=b"/images/t2")
        self.assertEqual((response.status, response.body), (200, self.data[:100]))

    def test_ticketLargerThanImage(self) -> None:
        """
        When the ticket is larger than the image, a full GET returns the image
        (200), and ranges past the image are 416 C{Requested more bytes than
        available} with C{bytes */<image size>}.
        """
        self.h.addTicket(b"abcdef", uuid="t2", size=1000)
        response = self.get(path=b"/images/t2")
        self.assertEqual((response.status, response.body), (200, b"abcdef"))
        response = self.get(b"bytes=0-9", path=b"/images/t2")
        self.assertError(response, 416, "Requested more bytes than available: 10 > 6")
        self.assertEqual(response.header(b"content-range"), b"bytes */6")
        response = self.get(b"bytes=2-", path=b"/images/t2")
        self.assertEqual(response.body, b"cdef")
        self.assertEqual(response.header(b"content-range"), b"bytes 2-5/1000")

    def test_emptyImage(self) -> None:
        """
        An empty image with a size 0 ticket is 200 with an empty body.
        """
        self.h.addTicket(b"", uuid="t2", size=0)
        response = self.get(path=b"/images/t2")
        self.assertEqual((response.status, response.body), (200, b""))
        self.assertEqual(response.header(b"content-length"), b"0")

    def test_writeTicketMayRead(self) -> None:
        """
        GET is allowed with a write-only ticket (write implies read).
        """
        self.h.addTicket(b"abc", uuid="t2", ops=("write",))
        self.assertEqual(self.get(path=b"/images/t2").body, b"abc")

    def test_close(self) -> None:
        """
        C{?close=y} answers with C{Connection: close} and closes.
        """
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/t1?close=y", {b"Range": b"bytes=0-1"}))
        response = conn.response()
        self.assertEqual(response.body, self.data[:2])
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(conn.closed)

    def test_multipleBuffers(self) -> None:
        """
        An image larger than the buffer size is sent in full and in order.
        """
        self.h = ImagesHarness(bufferSize=4096)
        self.addCleanup(self.h.cleanup)
        data = bytes(range(251)) * 100
        self.h.addTicket(data)
        self.assertEqual(self.send(request(b"GET", b"/images/t1")).body, data)
        response = self.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=4000-12000"}))
        self.assertEqual(response.body, data[4000:12001])

    def readSizes(self) -> list[int]:
        """
        @return: The size of every backend read from now on, in order.
        """
        sizes: list[int] = []
        original = memory.MemoryBackend.readInto

        def readInto(backend: Any, offset: int, buf: memoryview) -> Any:
            sizes.append(len(buf))
            return original(backend, offset, buf)

        self.patch(memory.MemoryBackend, "readInto", readInto)
        return sizes

    def test_tlsChunks(self) -> None:
        """
        A download over TLS reads the backend in chunks of at most
        C{TLS_CHUNK} (its two buffers are that small); over a plain
        connection in chunks of half the buffer size.
        """
        from imageio.daemon import images

        self.patch(images, "TLS_CHUNK", 4096)
        self.h = ImagesHarness(bufferSize=16384)
        self.addCleanup(self.h.cleanup)
        data = bytes(range(251)) * 160
        self.h.addTicket(data)
        sizes = self.readSizes()
        conn = self.h.connect(secure=True)
        conn.send(request(b"GET", b"/images/t1"))
        self.assertEqual(conn.response().body, data)
        self.assertEqual(sizes, [4096] * 9 + [3296])
        del sizes[:]
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/t1"))
        self.assertEqual(conn.response().body, data)
        self.assertEqual(sizes, [16384, 16384, 7392])

    def test_tlsRangePastImage(self) -> None:
        """
        Over TLS, a range inside the ticket but past the end of the image is
        answered 416 before any byte, as over a plain connection, also when
        it is longer than a TLS chunk (the short read comes after a full
        one).
        """
        from imageio.daemon import images

        self.patch(images, "TLS_CHUNK", 4096)
        self.h = ImagesHarness(bufferSize=16384)
        self.addCleanup(self.h.cleanup)
        self.h.addTicket(bytes(6000), size=20000)
        for secure in (False, True):
            conn = self.h.connect(secure=secure)
            conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-9999"}))
            response = conn.response()
            self.assertError(response, 416, "Requested more bytes than available: 10000 > 6000")
            self.assertEqual(response.header(b"content-range"), b"bytes */6000")

    def sizeCalls(self) -> list[int]:
        """
        @return: What each backend C{size()} answers from now on.
        """
        calls: list[int] = []
        original = memory.MemoryBackend.size

        def size(backend: Any) -> Any:
            return original(backend).addCallback(lambda n: calls.append(n) or n)

        self.patch(memory.MemoryBackend, "size", size)
        return calls

    def tlsHarness(self, image: bytes, size: int) -> None:
        from imageio.daemon import images

        self.patch(images, "TLS_CHUNK", 4096)
        self.h = ImagesHarness(bufferSize=16384)
        self.addCleanup(self.h.cleanup)
        self.registry = self.h.registry
        self.h.addTicket(image, size=size)

    def test_rangesAskSizeOnce(self) -> None:
        """
        Closed ranges longer than a TLS chunk (upstream's client reads 4 MiB
        at a time) ask the image's size on a connection's first request
        only: later ones ending inside it use the size seen.
        """
        data = bytes(range(250)) * 80
        self.tlsHarness(data, len(data))
        calls = self.sizeCalls()
        conn = self.h.connect(secure=True)
        for first, last in ((0, 9999), (10000, 19999), (5000, 15000)):
            conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=%d-%d" % (first, last)}))
            response = conn.response()
            self.assertEqual(response.status, 206)
            self.assertEqual(response.body, data[first : last + 1])
        self.assertEqual(calls, [20000])
        # Another connection has its own backend, and asks.
        other = self.h.connect(secure=True)
        other.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-9999"}))
        self.assertEqual(other.response().body, data[:10000])
        self.assertEqual(calls, [20000, 20000])

    def test_grownImageAskedAgain(self) -> None:
        """
        A range past the size seen asks again: the image may have grown
        since (a volume extended under a transfer).
        """
        self.tlsHarness(bytes(6000), 20000)
        calls = self.sizeCalls()
        conn = self.h.connect(secure=True)
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-5999"}))
        self.assertEqual(conn.response().body, bytes(6000))
        grown = bytes(range(250)) * 80
        self.image()[:] = grown
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=6000-15999"}))
        response = conn.response()
        self.assertEqual(response.status, 206)
        self.assertEqual(response.body, grown[6000:16000])
        self.assertEqual(calls, [6000, 20000])

    def test_shrunkImage416(self) -> None:
        """
        An image that shrank below the size seen: a range past its new end
        is still a 416 before any byte, with the size asked again.
        """
        self.tlsHarness(bytes(20000), 20000)
        calls = self.sizeCalls()
        conn = self.h.connect(secure=True)
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-9999"}))
        self.assertEqual(conn.response().status, 206)
        del self.image()[6000:]
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=8000-15999"}))
        response = conn.response()
        self.assertError(response, 416, "Requested more bytes than available: 16000 > 6000")
        self.assertEqual(response.header(b"content-range"), b"bytes */6000")
        self.assertEqual(calls, [20000, 6000])

    def test_unknownTicket(self) -> None:
        """
        GET on an unknown ticket is 403 and closes the connection.
        """
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/nope"))
        self.assertError(conn.response(), 403, FORBIDDEN + "No such ticket nope", close=True)
        self.assertTrue(conn.closed)

    def test_subpathIsTicketID(self) -> None:
        """
        C{/images/a/b} names ticket C{a/b}, like upstream: 403, not 404.
        """
        self.assertError(
            self.send(request(b"GET", b"/images/a/b")), 403, FORBIDDEN + "No such ticket a/b"
        )

    def test_emptyID(self) -> None:
        """
        C{GET /images/} is 400 C{Ticket id is required}.
        """
        self.assertError(self.get(path=b"/images/"), 400, "Ticket id is required")

    def test_countsTransferred(self) -> None:
        """
        A completed GET counts its range in the ticket's C{transferred} and
        leaves the ticket inactive.
        """
        ticket = self.h.addTicket(self.data, uuid="t2", ops=("read",))
        self.get(b"bytes=100-199", path=b"/images/t2")
        self.get(b"bytes=150-299", path=b"/images/t2")
        info = ticket.info(self.clock.seconds())
        self.assertEqual((info["transferred"], info["active"]), (200, False))


class HeadTests(ImagesTestCase):
    """
    HEAD answers like GET without a body (design.md item 1).
    """

    def test_head(self) -> None:
        """
        HEAD has GET's status and headers and no body.
        """
        self.h.addTicket(b"0123456789", filename="d.raw")
        conn = self.h.connect()
        conn.send(request(b"HEAD", b"/images/t1") + request(b"GET", b"/images/t1"))
        head, get = parseResponses(conn.output(), head=(0,))
        self.assertEqual((head.status, head.body), (200, b""))
        self.assertEqual(head.header(b"content-length"), b"10")
        self.assertEqual(head.header(b"content-disposition"), b"attachment; filename=d.raw")
        self.assertEqual(head.header(b"accept-ranges"), b"bytes")
        self.assertEqual(get.body, b"0123456789")

    def test_headRange(self) -> None:
        """
        HEAD with a Range is 206 with the Content-Range GET would send.
        """
        self.h.addTicket(b"0123456789")
        response = self.send(request(b"HEAD", b"/images/t1", {b"Range": b"bytes=2-"}), head=True)
        self.assertEqual(response.status, 206)
        self.assertEqual(response.header(b"content-range"), b"bytes 2-9/10")
        self.assertEqual(response.header(b"content-length"), b"8")

    def test_headNoTransfer(self) -> None:
        """
        HEAD transfers nothing: C{transferred} stays 0.
        """
        ticket = self.h.addTicket(b"0123456789", ops=("read",))
        self.send(request(b"HEAD", b"/images/t1"), head=True)
        self.assertEqual(ticket.transferred(), 0)


class PutTests(ImagesTestCase):
    """
    Section 1.5: PUT.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ticket = self.h.addTicket(bytes(100))

    def put(
        self,
        body: bytes,
        headers: dict[bytes, bytes] | None = None,
        path: bytes = b"/images/t1",
        contentLength: bool | None = None,
    ) -> tuple[Response, Connection]:
        conn = self.h.connect()
        conn.send(request(b"PUT", path, headers or {}, body, contentLength=contentLength))
        return conn.response(), conn

    def test_write(self) -> None:
        """
        PUT without Content-Range writes at offset 0 and answers 200.
        """
        response, conn = self.put(b"hello")
        self.assertEqual((response.status, response.body), (200, b""))
        self.assertEqual(self.image()[:6], b"hello\0")
        self.assertFalse(conn.closed)

    def test_contentRangeStartOnly(self) -> None:
        """
        Only the first byte of Content-Range is used; the length written is
        Content-Length, even when the range disagrees.
        """
        self.put(b"abc", {b"Content-Range": b"bytes 10-99/*"})
        self.put(b"XY", {b"Content-Range": b"bytes 50-50/100"})
        image = self.image()
        self.assertEqual(image[9:14], b"\0abc\0")
        self.assertEqual(image[49:53], b"\0XY\0")

    def test_badContentRange(self) -> None:
        """
        Invalid Content-Range values are 400 C{Invalid Content-Range '...'}.
        """
        for value, suffix in (
            (b"5-9", ""),
            (b"bytes 7-13", ""),
            (b"bytes */100", ""),
            (b"bytes 13-7/20", ", first > last"),
            (b"bytes 0-20/20", ", last >= complete"),
        ):
            response, conn = self.put(b"x", {b"Content-Range": value})
            self.assertError(response, 400, f"Invalid Content-Range {value.decode()!r}{suffix}")
            self.assertTrue(conn.closed)

    def test_contentLengthRequired(self) -> None:
        """
        PUT without Content-Length is 400 C{Content-Length header is
        required} and closes the connection.
        """
        response, conn = self.put(b"", contentLength=False)
        self.assertError(response, 400, "Content-Length header is required", close=True)
        self.assertTrue(conn.closed)

    def test_chunked(self) -> None:
        """
        A chunked PUT is 400 C{Content-Length header is required}, the body
        is not read and the connection is closed.
        """
        response, conn = self.put(
            b"5\r\nhello\r\n0\r\n\r\n",
            {b"Transfer-Encoding": b"chunked"},
            contentLength=False,
        )
        self.assertError(response, 400, "Content-Length header is required", close=True)
        self.assertTrue(conn.closed)
        self.assertEqual(self.image(), bytes(100))

    def test_badContentLength(self) -> None:
        """
        Content-Length values that are not one plain non-negative decimal
        number are 400 (or Twisted's own 400), never a write.
        """
        for value in (b"-1", b"+5", b"1_0", b"0x10", b"1e3", b"x"):
            conn = self.h.connect()
            conn.send(
                b"PUT /images/t1 HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\n"
            )
            response = conn.response()
            self.assertEqual(response.status, 400, value)
            self.assertTrue(conn.closed)
        self.assertEqual(self.image(), bytes(100))

    def test_duplicateContentLength(self) -> None:
        """
        Two Content-Length headers, equal or not, are 400.
        """
        for values in ((b"3", b"3"), (b"3", b"4")):
            conn = self.h.connect()
            conn.send(
                b"PUT /images/t1 HTTP/1.1\r\nHost: x\r\n"
                + b"".join(b"Content-Length: %s\r\n" % v for v in values)
                + b"\r\nabc"
            )
            self.assertEqual(conn.response().status, 400)
            self.assertTrue(conn.closed)

    def test_flushYes(self) -> None:
        """
        By default (and with C{flush=y}) the backend is flushed after the
        write, before the response.
        """
        backend = FakeBackend(bytearray(100))
        self.h = ImagesHarness(opener=FakeOpener(backend))
        self.h.addTicket(None, size=100)
        for path in (b"/images/t1", b"/images/t1?flush=y"):
            conn = self.h.connect()
            conn.send(request(b"PUT", path, body=b"abc"))
            backend.completeWrite()
            self.assertEqual(conn.output(), b"")
            self.assertEqual(len(backend.flushes), 1)
            backend.flushes.pop().callback(None)
            self.assertEqual(conn.response().status, 200)

    def test_flushNo(self) -> None:
        """
        With C{flush=n} the backend is not flushed.
        """
        backend = FakeBackend(bytearray(100), manual=False)
        self.h = ImagesHarness(opener=FakeOpener(backend))
        self.h.addTicket(None, size=100)
        response = self.h.roundTrip(request(b"PUT", b"/images/t1?flush=n", body=b"abc"))
        self.assertEqual(response.status, 200)
        self.assertEqual(backend.flushes, [])
        self.assertEqual(backend.image[:3], b"abc")

    def test_flushInvalid(self) -> None:
        """
        Other C{flush} values are 400 with upstream's text.
        """
        response, conn = self.put(b"abc", path=b"/images/t1?flush=x")
        self.assertError(
            response, 400, "Unsupported value 'x' for 'flush', expecting one of ['n', 'y']"
        )
        self.assertEqual(self.image()[:3], bytes(3))

    def test_close(self) -> None:
        """
        C{?close=y} answers with C{Connection: close} and closes.
        """
        response, conn = self.put(b"abc", path=b"/images/t1?close=y")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(conn.closed)

    def test_expectContinue(self) -> None:
        """
        C{Expect: 100-continue} gets C{100 Continue} and then the final
        status once the body was written.
        """
        conn = self.h.connect()
        conn.send(
            b"PUT /images/t1 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 3\r\n\r\n"
        )
        self.assertEqual(conn.output(), b"HTTP/1.1 100 Continue\r\n\r\n")
        conn.send(b"abc")
        self.assertEqual(conn.response().status, 200)
        self.assertEqual(self.image()[:3], b"abc")

    def test_expectContinueForbidden(self) -> None:
        """
        C{Expect: 100-continue} with an unknown ticket is answered 403 at
        once, without C{100 Continue}, the body is never read and the
        connection is closed.
        """
        conn = self.h.connect()
        conn.send(
            b"PUT /images/nope HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: 107374182400\r\n\r\n"
        )
        output = conn.output()
        self.assertNotIn(b"100 Continue", output)
        response = parseResponses(output)[0]
        self.assertError(response, 403, FORBIDDEN + "No such ticket nope", close=True)
        self.assertTrue(conn.closed)
        conn.send(b"x" * 65536)
        self.assertEqual(conn.output(), b"")

    def test_readOnlyTicket(self) -> None:
        """
        PUT with a read-only ticket is 403 C{... forbids write} and closes.
        """
        self.h.addTicket(bytes(10), uuid="t2", ops=("read",))
        response, conn = self.put(b"abc", path=b"/images/t2")
        self.assertError(response, 403, FORBIDDEN + "Transfer=tr-t2 forbids write", close=True)
        self.assertTrue(conn.closed)
        self.assertEqual(self.image("t2"), bytes(10))

    def test_pastTicket(self) -> None:
        """
        A write past the ticket size is 416 with C{bytes */<ticket size>},
        before the body is read; a write ending exactly at the end is fine.
        """
        response, conn = self.put(b"abc", {b"Content-Range": b"bytes 98-100/*"})
        self.assertError(response, 416, "Requested range out of allowed range", close=True)
        self.assertEqual(response.header(b"content-range"), b"bytes */100")
        self.assertTrue(conn.closed)
        response, conn = self.put(b"ab", {b"Content-Range": b"bytes 98-99/*"})
        self.assertEqual(response.status, 200)
        self.assertEqual(self.image()[98:], b"ab")

    def test_hugeContentLength(self) -> None:
        """
        A Content-Length of 2**63 is 416 before any body is read.
        """
        conn = self.h.connect()
        conn.send(b"PUT /images/t1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % 2**63)
        self.assertEqual(conn.response().status, 416)
        self.assertTrue(conn.closed)

    def test_zeroLength(self) -> None:
        """
        C{Content-Length: 0} is a valid no-op, also at the ticket's end.
        """
        response, _ = self.put(b"", {b"Content-Length": b"0"}, contentLength=False)
        self.assertEqual(response.status, 200)
        response, _ = self.put(
            b"",
            {b"Content-Length": b"0", b"Content-Range": b"bytes 100-100/*"},
            contentLength=False,
        )
        self.assertEqual(response.status, 200)

    def test_emptyID(self) -> None:
        """
        C{PUT /images/} is 400 C{Ticket id is required}.
        """
        response, conn = self.put(b"abc", path=b"/images/")
        self.assertError(response, 400, "Ticket id is required")

    def test_transferEncodings(self) -> None:
        """
        Transfer codings other than one C{chunked}, and C{Transfer-Encoding}
        with C{Content-Length}, are 400 and close; nothing is written.
        """
        for headers in (
            [(b"Transfer-Encoding", b"gzip")],
            [(b"Transfer-Encoding", b"chunked, identity")],
            [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3")],
        ):
            conn = self.h.connect()
            conn.send(
                request(b"PUT", b"/images/t1", headers, contentLength=False)
                + b"3\r\nabc\r\n0\r\n\r\n"
            )
            response = conn.response()
            self.assertEqual(response.status, 400, headers)
            self.assertTrue(conn.closed)
        self.assertEqual(self.image(), bytes(100))

    def test_openFailure(self) -> None:
        """
        A backend that cannot be opened fails the PUT with the generic 500
        before the body is read, and closes.
        """
        name = self.ticket.url.split(":", 1)[1]
        memory.failNext(name, "open", ValueError("/secret/path"))
        conn = self.h.connect()
        conn.send(b"PUT /images/t1 HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n")
        response = conn.response()
        self.assertError(response, 500, INTERNAL_ERROR, close=True)
        self.assertTrue(conn.closed)
        self.assertFalse(self.ticket.active)
        self.assertTrue(self.flushLoggedErrors(ValueError))

    def test_bodyNotSpooled(self) -> None:
        """
        A PUT body streams to storage: when the handler runs,
        C{request.content} is an empty C{BytesIO}, never a temporary file.
        """
        import io

        from imageio.daemon import images

        handler = images.ImageHandler.handlePUT
        contents: list[tuple[type, bytes]] = []

        def handlePUT(self: Any, req: Any, ticketID: str) -> Any:
            contents.append((type(req.content), req.content.getvalue()))
            return handler(self, req, ticketID)

        self.patch(images.ImageHandler, "handlePUT", handlePUT)
        # Larger than Twisted's 100000-byte threshold for temporary files.
        self.h.addTicket(bytes(200_000), uuid="t2")
        response, _ = self.put(b"y" * 200_000, path=b"/images/t2")
        self.assertEqual(response.status, 200)
        self.assertEqual(contents, [(io.BytesIO, b"")])
        self.assertEqual(self.image("t2"), b"y" * 200_000)

    def test_transferred(self) -> None:
        """
        PUT ranges count in C{transferred} once, overlaps merged; with zero
        and GET: PUT 5 bytes at 5 + zero [0, 4096) + GET [0, 10) is 4096.
        """
        ticket = self.h.addTicket(bytes(8192), uuid="t2", ops=("write",))
        self.send(request(b"PUT", b"/images/t2", {b"Content-Range": b"bytes 5-9/*"}, b"hello"))
        self.assertEqual(ticket.transferred(), 5)
        self.send(request(b"PATCH", b"/images/t2", body=b'{"op": "zero", "size": 4096}'))
        self.send(request(b"GET", b"/images/t2", {b"Range": b"bytes=0-9"}))
        info = ticket.info(self.clock.seconds())
        self.assertEqual((info["transferred"], info["active"]), (4096, False))


class PatchTests(ImagesTestCase):
    """
    Section 1.6: PATCH zero and flush.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ticket = self.h.addTicket(b"x" * 100)

    def patch_(self, body: bytes, path: bytes = b"/images/t1") -> tuple[Response, Connection]:
        conn = self.h.connect()
        conn.send(request(b"PATCH", path, {b"Content-Type": b"application/json"}, body))
        return conn.response(), conn

    def test_zero(self) -> None:
        """
        C{zero} with offset and size zeroes that range; 200 empty.
        """
        response, conn = self.patch_(b'{"op": "zero", "offset": 10, "size": 20}')
        self.assertEqual((response.status, response.body), (200, b""))
        self.assertEqual(self.image(), b"x" * 10 + bytes(20) + b"x" * 70)
        self.assertFalse(conn.closed)

    def test_zeroDefaultOffset(self) -> None:
        """
        C{offset} defaults to 0, and unknown keys are ignored.
        """
        self.patch_(b'{"op": "zero", "size": 5, "future": true}')
        self.assertEqual(self.image()[:6], bytes(5) + b"x")

    def test_zeroFlush(self) -> None:
        """
        C{"flush": true} flushes after zeroing; without it there is no flush.
        """
        backend = FakeBackend(bytearray(b"x" * 100), manual=False)
        self.h = ImagesHarness(opener=FakeOpener(backend))
        self.h.addTicket(None, size=100)
        self.h.roundTrip(request(b"PATCH", b"/images/t1", body=b'{"op": "zero", "size": 10}'))
        self.assertEqual((backend.zeros, len(backend.flushes)), ([(0, 10)], 0))
        response = self.h.roundTrip(
            request(b"PATCH", b"/images/t1", body=b'{"op": "zero", "size": 10, "flush": true}')
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(len(backend.flushes), 1)

    def test_zeroSteps(self) -> None:
        """
        Zeroing is done in steps of at most 128 MiB.
        """
        backend = FakeBackend(bytearray(), manual=False)
        self.h = ImagesHarness(opener=FakeOpener(backend))
        self.h.addTicket(None, size=300 * MiB)
        self.patch(FakeBackend, "zero", lambda self, o, n: (self.zeros.append((o, n)), None)[1])
        from twisted.internet.defer import succeed

        def zero(self: FakeBackend, offset: int, length: int) -> Any:
            self.zeros.append((offset, length))
            return succeed(None)

        self.patch(FakeBackend, "zero", zero)
        response = self.h.roundTrip(
            request(b"PATCH", b"/images/t1", body=b'{"op": "zero", "size": %d}' % (300 * MiB))
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(
            backend.zeros, [(0, 128 * MiB), (128 * MiB, 128 * MiB), (256 * MiB, 44 * MiB)]
        )

    def test_flush(self) -> None:
        """
        C{{"op": "flush"}} flushes the backend; 200 empty.
        """
        backend = FakeBackend(bytearray(10), manual=False)
        self.h = ImagesHarness(opener=FakeOpener(backend))
        self.h.addTicket(None, size=10)
        response = self.h.roundTrip(request(b"PATCH", b"/images/t1", body=b'{"op": "flush"}'))
        self.assertEqual((response.status, len(backend.flushes)), (200, 1))

    def test_validation(self) -> None:
        """
        Every invalid message is 400 with upstream's text (or ours for what
        upstream accepts: NaN, duplicate keys, booleans as integers).
        """
        cases = [
            (b"", "Invalid JSON message Expecting value: line 1 column 1 (char 0)"),
            (
                b"{",
                "Invalid JSON message Expecting property name enclosed in double quotes: "
                "line 1 column 2 (char 1)",
            ),
            (b"{}", "Missing required value for op"),
            (
                b'{"op": "trim"}',
                "Unsupported value 'trim' for 'op', expecting one of ['flush', 'zero']",
            ),
            (b'{"op": "zero"}', "Missing required value for 'size'"),
            (b'{"op": "zero", "size": "1"}', "Integer required '1'"),
            (b'{"op": "zero", "size": 1.5}', "Integer required 1.5"),
            (b'{"op": "zero", "size": -1}', "Invalid value -1 < 0"),
            (b'{"op": "zero", "size": true}', "Integer required True"),
            (b'{"op": "zero", "size": 1, "offset": false}', "Integer required False"),
            (b'{"op": "zero", "size": 1, "offset": -5}', "Invalid value -5 < 0"),
            (b'{"op": "zero", "size": 1, "flush": "yes"}', "Boolean required 'yes'"),
            (b'{"op": "zero", "size": 1, "flush": 1}', "Boolean required 1"),
            (b'{"op": "zero", "size": NaN}', "Invalid JSON message Invalid constant NaN"),
            (b'{"op": "zero", "size": Infinity}', "Invalid JSON message Invalid constant Infinity"),
            (b'{"op": "zero", "size": 1, "size": 2}', "Invalid JSON message Duplicate key 'size'"),
            (
                b'{"op": "zero", "size": ' + b"7" * 4000 + b"}",
                "Invalid JSON message Number too long: 4000 digits, at most 32",
            ),
            (
                b'{"op": "zero", "size": 1, "offset": -' + b"7" * 33 + b"}",
                "Invalid JSON message Number too long: 33 digits, at most 32",
            ),
            (b"[1]", "Invalid JSON message: expecting an object"),
            (
                b'{"op": "zero", "size": 1}\xff',
                "Invalid JSON message 'utf-8' codec can't "
                "decode byte 0xff in position 25: invalid start byte",
            ),
        ]
        for body, text in cases:
            response, conn = self.patch_(body)
            self.assertError(response, 400, text)
        self.assertEqual(self.image(), b"x" * 100)

    def test_deepNesting(self) -> None:
        """
        Deeply nested JSON is 400 quickly, not a crash.
        """
        response, _ = self.patch_(b"[" * 2000 + b"]" * 2000)
        self.assertEqual(response.status, 400)

    def test_validatedBeforeTicket(self) -> None:
        """
        Bad JSON on an unknown ticket is 400, not 403.
        """
        response, _ = self.patch_(b"{", path=b"/images/nope")
        self.assertEqual(response.status, 400)

    def test_tooLarge(self) -> None:
        """
        A PATCH body over 4 KiB is 413 before it is read, and closes.
        """
        response, conn = self.patch_(b" " * 5000 + b"{}")
        self.assertEqual(response.status, 413)
        self.assertTrue(conn.closed)

    def test_readOnlyTicket(self) -> None:
        """
        Zero and flush on a read-only ticket are 403 and close.
        """
        self.h.addTicket(b"x" * 10, uuid="t2", ops=("read",))
        for body in (b'{"op": "zero", "size": 1}', b'{"op": "flush"}'):
            response, conn = self.patch_(body, path=b"/images/t2")
            self.assertError(response, 403, FORBIDDEN + "Transfer=tr-t2 forbids write", close=True)
            self.assertTrue(conn.closed)
        self.assertEqual(self.image("t2"), b"x" * 10)

    def test_pastTicket(self) -> None:
        """
        Zeroing past the ticket size is 416 with C{bytes */<ticket size>}.
        """
        response, _ = self.patch_(b'{"op": "zero", "offset": 90, "size": 11}')
        self.assertError(response, 416, "Requested range out of allowed range")
        self.assertEqual(response.header(b"content-range"), b"bytes */100")

    def test_hugeSize(self) -> None:
        """
        A huge size is 416, not an overflow.
        """
        response, _ = self.patch_(b'{"op": "zero", "size": %d}' % 2**70)
        self.assertEqual(response.status, 416)

    def test_emptyID(self) -> None:
        """
        C{PATCH /images/} is 400 C{Ticket id is required}.
        """
        response, _ = self.patch_(b'{"op": "flush"}', path=b"/images/")
        self.assertError(response, 400, "Ticket id is required")


class ExtentsTests(ImagesTestCase):
    """
    Section 1.7 and design.md item 4: extents.
    """

    def setUp(self) -> None:
        super().setUp()
        self.data = b"d" * 4096 + bytes(8192) + b"d" * 100
        self.h.addTicket(self.data)

    def test_zeroContext(self) -> None:
        """
        The zero context describes the whole image, contiguous, with upstream's
        keys; zero runs are reported as zero.
        """
        for path in (b"/images/t1/extents", b"/images/t1/extents?context=zero"):
            body = self.assertJSON(self.send(request(b"GET", path)))
            self.assertEqual(
                body,
                [
                    {"start": 0, "length": 4096, "zero": False, "hole": False},
                    {"start": 4096, "length": 8192, "zero": True, "hole": False},
                    {"start": 12288, "length": 100, "zero": False, "hole": False},
                ],
            )

    def test_window(self) -> None:
        """
        C{start} and C{length} restrict the answer to a window.
        """
        body = self.assertJSON(
            self.send(request(b"GET", b"/images/t1/extents?start=4000&length=200"))
        )
        self.assertEqual(
            body,
            [
                {"start": 4000, "length": 96, "zero": False, "hole": False},
                {"start": 4096, "length": 104, "zero": True, "hole": False},
            ],
        )
        body = self.assertJSON(self.send(request(b"GET", b"/images/t1/extents?start=12300")))
        self.assertEqual(body, [{"start": 12300, "length": 88, "zero": False, "hole": False}])

    def test_badWindow(self) -> None:
        """
        Non-numeric window values are 400.
        """
        for query in (b"start=-1", b"start=x", b"length=+5", b"length=1e3"):
            response = self.send(request(b"GET", b"/images/t1/extents?" + query))
            self.assertEqual(response.status, 400, query)

    def test_badContext(self) -> None:
        """
        Other contexts are 400 with upstream's text.
        """
        self.assertError(
            self.send(request(b"GET", b"/images/t1/extents?context=foo")),
            400,
            "Unsupported value 'foo' for 'context', expecting one of ['dirty', 'zero']",
        )

    def test_dirtyWithoutDirtyTicket(self) -> None:
        """
        C{context=dirty} on a ticket without C{dirty} is 404.
        """
        self.assertError(
            self.send(request(b"GET", b"/images/t1/extents?context=dirty")),
            404,
            "Ticket does not support dirty extents",
        )

    def test_dirtyUnsupportedByBackend(self) -> None:
        """
        C{context=dirty} on a dirty ticket whose backend cannot report it is
        404 C{Operation not supported: ...}.
        """
        self.h.addTicket(b"abc", uuid="t2", dirty=True)
        self.assertError(
            self.send(request(b"GET", b"/images/t2/extents?context=dirty")),
            404,
            "Operation not supported: Backend memory does not support dirty extents",
        )

    def test_unknownTicket(self) -> None:
        """
        Extents on an unknown ticket are 403.
        """
        response = self.send(request(b"GET", b"/images/nope/extents"))
        self.assertError(response, 403, FORBIDDEN + "No such ticket nope")

    def test_doesNotTouch(self) -> None:
        """
        Extents requests do not touch the ticket or count as transfers.
        """
        ticket = self.registry.get("t1")
        self.clock.advance(10)
        self.send(request(b"GET", b"/images/t1/extents"))
        self.assertEqual((ticket.expires, ticket.transferred()), (300, 0))


class ChecksumTests(ImagesTestCase):
    """
    Section 1.8: checksum and algorithms.
    """

    def setUp(self) -> None:
        super().setUp()
        # Two full 1 MiB blocks (one all zero) and a short data block.
        self.data = bytes(range(256)) * 4096 + bytes(MiB) + b"tail" * 1000
        self.h.addTicket(self.data)

    def expected(self, algorithm: str, blockSize: int, data: bytes | None = None) -> str:
        data = self.data if data is None else data
        hasher = _blkhash.Hasher(algorithm, blockSize)
        for i in range(0, len(data), blockSize):
            hasher.update(data[i : i + blockSize])
        return hasher.hexdigest()

    def test_default(self) -> None:
        """
        The default is blake2b with 4 MiB blocks, equal to a direct
        computation.
        """
        body = self.assertJSON(self.send(request(b"GET", b"/images/t1/checksum")))
        self.assertEqual(
            body,
            {
                "algorithm": "blake2b",
                "block_size": 4 * MiB,
                "checksum": self.expected("blake2b", 4 * MiB),
            },
        )

    def test_parameters(self) -> None:
        """
        C{algorithm} and C{block_size} are honoured; blocks split across
        data and zero runs hash like a direct computation.
        """
        for algorithm in ("sha256", "blake2s", "md5"):
            body = self.assertJSON(
                self.send(
                    request(
                        b"GET",
                        b"/images/t1/checksum?algorithm=%s&block_size=%d"
                        % (algorithm.encode(), MiB),
                    )
                )
            )
            self.assertEqual(body["checksum"], self.expected(algorithm, MiB), algorithm)

    def test_ticketSmallerThanImage(self) -> None:
        """
        Only the ticket's bytes are hashed.
        """
        self.h.addTicket(self.data, uuid="t2", size=MiB + 5)
        body = self.assertJSON(
            self.send(request(b"GET", b"/images/t2/checksum?block_size=1048576"))
        )
        self.assertEqual(body["checksum"], self.expected("blake2b", MiB, self.data[: MiB + 5]))

    def test_invalid(self) -> None:
        """
        Bad parameters are 400 with upstream's texts.
        """
        cases = [
            (b"algorithm=nope", "Unsupported value 'nope' for 'algorithm', expecting one of "),
            (b"block_size=x", "Invalid block size: 'x'"),
            (b"block_size=1024", "Block size out of allowed range: 1048576-16777216"),
            (b"block_size=33554432", "Block size out of allowed range: 1048576-16777216"),
            (b"block_size=1048577", "Block size is not aligned to 4096"),
        ]
        for query, text in cases:
            response = self.send(request(b"GET", b"/images/t1/checksum?" + query))
            self.assertEqual(response.status, 400, query)
            self.assertTrue(response.text.startswith(text), response.text)

    def test_forbiddenKeepsConnection(self) -> None:
        """
        An unknown ticket is 403 without closing the connection (unlike the
        other handlers).
        """
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/nope/checksum"))
        self.assertError(conn.response(), 403, FORBIDDEN + "No such ticket nope", close=False)
        self.assertFalse(conn.closed)

    def test_countsAsTransfer(self) -> None:
        """
        A checksum touches the ticket and counts the bytes hashed in
        C{transferred}.
        """
        ticket = self.h.addTicket(self.data, uuid="t2", ops=("read",))
        self.clock.advance(10)
        self.send(request(b"GET", b"/images/t2/checksum"))
        self.assertEqual(ticket.transferred(), len(self.data))
        self.assertEqual(ticket.expires, 310)

    def test_algorithms(self) -> None:
        """
        C{/checksum/algorithms} lists the sorted algorithms without any
        ticket.
        """
        body = self.assertJSON(self.send(request(b"GET", b"/images/anything/checksum/algorithms")))
        self.assertEqual(body, {"algorithms": sorted(_blkhash.ALGORITHMS)})
        self.assertIn("blake2b", body["algorithms"])


class WrittenTests(ImagesTestCase):
    """
    Design.md item 5: the written-ranges report.
    """

    def test_written(self) -> None:
        """
        PUT and zero ranges are reported merged; only those completed before
        a flush are reported flushed.
        """
        self.h.addTicket(bytes(100), ops=("write",))
        self.send(
            request(b"PUT", b"/images/t1?flush=n", {b"Content-Range": b"bytes 10-19/*"}, b"x" * 10)
        )
        body = self.assertJSON(self.send(request(b"GET", b"/images/t1/written")))
        self.assertEqual(body, {"written": [{"start": 10, "length": 10}], "flushed": []})
        self.send(request(b"PUT", b"/images/t1", {b"Content-Range": b"bytes 20-29/*"}, b"y" * 10))
        self.send(request(b"PATCH", b"/images/t1", body=b'{"op": "zero", "offset": 50, "size": 5}'))
        body = self.assertJSON(self.send(request(b"GET", b"/images/t1/written")))
        self.assertEqual(
            body,
            {
                "written": [{"start": 10, "length": 20}, {"start": 50, "length": 5}],
                "flushed": [{"start": 10, "length": 20}],
            },
        )

    def test_readOnlyTicket(self) -> None:
        """
        The report needs a write ticket.
        """
        self.h.addTicket(bytes(10), ops=("read",))
        response = self.send(request(b"GET", b"/images/t1/written"))
        self.assertError(response, 403, FORBIDDEN + "Transfer=tr-t1 forbids write")


class InfoTests(ImagesTestCase):
    """
    C{/info/}.
    """

    def test_info(self) -> None:
        """
        C{GET /info/} returns the version.
        """
        body = self.assertJSON(self.send(request(b"GET", b"/info/")))
        self.assertEqual(body, {"version": imageio.__version__})

    def test_noSlash(self) -> None:
        """
        C{/info} without the slash is 404.
        """
        self.assertError(self.send(request(b"GET", b"/info")), 404, "No handler for '/info'")

    def test_localHasNoInfo(self) -> None:
        """
        The local listener's tree has no C{/info/}.
        """
        self.h = ImagesHarness(info=False)
        self.assertEqual(self.h.roundTrip(request(b"GET", b"/info/")).status, 404)


class RoutingTests(ImagesTestCase):
    """
    Section 1.1 dispatch errors.
    """

    def test_noHandler(self) -> None:
        """
        Unknown paths are 404 C{No handler for '/foo'}.
        """
        self.assertError(self.send(request(b"GET", b"/foo")), 404, "No handler for '/foo'")
        self.assertError(
            self.send(request(b"PUT", b"/foo", body=b"x")), 404, "No handler for '/foo'"
        )

    def test_methodNotDefined(self) -> None:
        """
        A method a handler lacks is 405 C{Method 'X' not defined for '/path'}
        without an Allow header.
        """
        response = self.send(request(b"DELETE", b"/images/t1"))
        self.assertError(response, 405, "Method 'DELETE' not defined for '/images/t1'")
        self.assertIsNone(response.header(b"allow"))
        response = self.send(request(b"POST", b"/images/t1/extents", body=b"{}"))
        self.assertError(response, 405, "Method 'POST' not defined for '/images/t1/extents'")

    def test_invalidMethod(self) -> None:
        """
        Methods outside the known set are 405 C{Invalid method 'FOO'}.
        """
        self.assertError(self.send(request(b"FOO", b"/images/t1")), 405, "Invalid method 'FOO'")

    def test_controlNotReachable(self) -> None:
        """
        The control API is not reachable through the images listeners, even
        with dot segments.
        """
        for path in (b"/tickets/t1", b"/images/../tickets/t1", b"/%2e%2e/tickets/t1"):
            response = self.send(request(b"GET", path))
            self.assertIn(response.status, (403, 404), path)
            self.assertNotIn(b"uuid", response.body)


class CORSTests(ImagesTestCase):
    """
    Section 1.10: CORS headers when asked for.
    """

    trigger = {
        b"Origin": b"https://engine",
        b"Access-Control-Request-Headers": b"content-type",
        b"Access-Control-Request-Method": b"PUT",
    }

    def setUp(self) -> None:
        super().setUp()
        self.h.addTicket(b"abc")

    def cors(self, response: Response) -> dict[bytes, bytes | None]:
        return {
            name: response.header(name)
            for name in (
                b"access-control-allow-origin",
                b"access-control-allow-headers",
                b"access-control-allow-methods",
                b"access-control-max-age",
            )
        }

    def test_options(self) -> None:
        """
        OPTIONS answers a preflight with C{OPTIONS,GET,PUT} methods.
        """
        response = self.send(request(b"OPTIONS", b"/images/t1", self.trigger))
        self.assertEqual(
            self.cors(response),
            {
                b"access-control-allow-origin": b"*",
                b"access-control-allow-headers": b"*",
                b"access-control-allow-methods": b"OPTIONS,GET,PUT",
                b"access-control-max-age": b"86400",
            },
        )

    def test_getPut(self) -> None:
        """
        GET and PUT answer with C{*} methods, also on errors.
        """
        for raw in (
            request(b"GET", b"/images/t1", self.trigger),
            request(b"PUT", b"/images/t1", self.trigger, b"x"),
            request(b"GET", b"/images/nope", self.trigger),
            request(b"PUT", b"/images/nope", self.trigger, b"x"),
        ):
            response = self.send(raw)
            self.assertEqual(
                self.cors(response),
                {
                    b"access-control-allow-origin": b"*",
                    b"access-control-allow-headers": b"*",
                    b"access-control-allow-methods": b"*",
                    b"access-control-max-age": b"86400",
                },
                raw,
            )

    def test_originOnly(self) -> None:
        """
        Each trigger header adds only its own answer, plus the max age.
        """
        response = self.send(request(b"GET", b"/info/", {b"Origin": b"x"}))
        self.assertEqual(
            self.cors(response),
            {
                b"access-control-allow-origin": b"*",
                b"access-control-allow-headers": None,
                b"access-control-allow-methods": None,
                b"access-control-max-age": b"86400",
            },
        )

    def test_notTriggered(self) -> None:
        """
        Without trigger headers there are no CORS headers.
        """
        response = self.send(request(b"GET", b"/images/t1"))
        self.assertEqual(set(self.cors(response).values()), {None})

    def test_notOnPatchExtentsChecksum(self) -> None:
        """
        PATCH, extents and checksum have no CORS headers, like upstream.
        """
        for raw in (
            request(b"PATCH", b"/images/t1", self.trigger, b'{"op": "flush"}'),
            request(b"GET", b"/images/t1/extents", self.trigger),
            request(b"GET", b"/images/t1/checksum", self.trigger),
        ):
            self.assertEqual(set(self.cors(self.send(raw)).values()), {None}, raw)


class AuthorizationTests(ImagesTestCase):
    """
    Section 1.9: authorization texts and closing.
    """

    def test_order(self) -> None:
        """
        Checks run in order exists, canceled, expired, op, with upstream's
        texts.
        """
        self.h.addTicket(b"abc", ops=("read",))
        self.clock.advance(300)
        raw = request(b"PUT", b"/images/t1", body=b"x")
        self.assertError(self.send(raw), 403, FORBIDDEN + "Transfer=tr-t1 expired")
        self.registry.get("t1").canceled = True
        self.assertError(self.send(raw), 403, FORBIDDEN + "Transfer=tr-t1 was canceled")

    def test_forbiddenCloses(self) -> None:
        """
        Every 403 but checksum's closes the connection: nothing sent after it
        on that connection is answered.
        """
        for raw in (
            request(b"OPTIONS", b"/images/nope"),
            request(b"GET", b"/images/nope"),
            request(b"PUT", b"/images/nope", body=b"x"),
            request(b"PATCH", b"/images/nope", body=b'{"op": "flush"}'),
            request(b"GET", b"/images/nope/extents"),
            request(b"GET", b"/images/nope/written"),
        ):
            conn = self.h.connect()
            conn.send(raw + request(b"GET", b"/info/"))
            responses = conn.responses()
            self.assertEqual([r.status for r in responses], [403], raw)
            self.assertEqual(responses[0].header(b"connection"), b"close")
            self.assertTrue(conn.closed)

    def test_sameAnswerForUnknownAndCanceled(self) -> None:
        """
        Unknown, expired and canceled tickets all answer 403 with the same
        prefix, so callers cannot tell which tickets exist beyond the text.
        """
        self.h.addTicket(b"abc")
        self.registry.get("t1").canceled = True
        a = self.send(request(b"GET", b"/images/t1"))
        b = self.send(request(b"GET", b"/images/t9"))
        self.assertEqual((a.status, b.status), (403, 403))
        self.assertTrue(a.text.startswith(FORBIDDEN) and b.text.startswith(FORBIDDEN))


class FaultTests(ImagesTestCase):
    """
    Errors from storage and bugs: 500 without tracebacks.
    """

    def test_unexpectedError(self) -> None:
        """
        A backend raising an unexpected exception is 500 with the generic
        text, logged, never a traceback on the wire; the connection closes.
        """
        self.h.addTicket(b"abc")
        name = self.registry.get("t1").url.split(":", 1)[1]
        memory.failNext(name, "size", RuntimeError("secret detail"))
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/t1"))
        response = conn.response()
        self.assertError(response, 500, INTERNAL_ERROR, close=True)
        self.assertNotIn(b"secret", response.body)
        self.assertNotIn(b"Traceback", response.body)
        self.assertTrue(conn.closed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_openFailure(self) -> None:
        """
        A backend that cannot be opened is 500 with the generic text.
        """
        self.h.addTicket(b"abc")
        name = self.registry.get("t1").url.split(":", 1)[1]
        memory.failNext(name, "open", ValueError("no such file /secret/path"))
        response = self.send(request(b"OPTIONS", b"/images/t1"))
        self.assertError(response, 500, INTERNAL_ERROR)
        self.assertNotIn(b"secret", response.body)
        self.assertTrue(self.flushLoggedErrors(ValueError))
        self.assertEqual(self.registry.get("t1").connections, {})

    def test_enospcOnPut(self) -> None:
        """
        ENOSPC from storage is 500 with the system's reason and closes the
        connection; the ticket is not left active.
        """
        ticket = self.h.addTicket(bytes(10))
        name = ticket.url.split(":", 1)[1]
        memory.failNext(name, "write", OSError(errno.ENOSPC, "No space left on device"))
        conn = self.h.connect()
        conn.send(request(b"PUT", b"/images/t1", body=b"abc"))
        response = conn.response()
        self.assertError(
            response,
            500,
            INTERNAL_ERROR,
            close=True,
        )
        self.assertTrue(conn.closed)
        self.assertFalse(ticket.active)
        self.assertEqual(ticket.transferred(), 0)
        self.flushLoggedErrors(OSError)

    def test_enospcMidBody(self) -> None:
        """
        When storage fails while the body is still arriving, the 500 is sent
        at once and the rest of the body is not read.
        """
        backend = FakeBackend(bytearray(100 * KiB))
        self.h = ImagesHarness(opener=FakeOpener(backend), bufferSize=8192)
        ticket = self.h.addTicket(None, size=100 * KiB)
        conn = self.h.connect()
        conn.send(request(b"PUT", b"/images/t1", body=b"x" * 100 * KiB)[: -90 * KiB])
        self.assertEqual(backend.pendingWrites(), 1)
        backend.writes[0][2].errback(OSError(errno.ENOSPC, "No space left on device"))
        response = conn.response()
        self.assertError(response, 500, INTERNAL_ERROR)
        self.assertTrue(conn.closed)
        self.assertFalse(ticket.active)
        conn.send(b"x" * 90 * KiB)
        self.assertEqual(conn.output(), b"")
        self.assertEqual(backend.pendingWrites(), 0)
        self.flushLoggedErrors(OSError)

    def test_storageErrorDetailsOnlyInLog(self) -> None:
        """
        A backend that cannot be opened (an NBD server that is not there)
        is 500 with upstream's generic text: the socket path, the export
        name and the OS error text go to the log only, with the ticket id
        shortened.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        error = ConnectionRefusedError(
            errno.ECONNREFUSED,
            "Cannot connect to NBD server unix:/run/vdsm/nbd/secret.sock export 'sda': refused",
        )

        class FailingOpener:
            def open(self, url: str, **kw: Any) -> Any:
                return fail(error)

        self.h = ImagesHarness(opener=FailingOpener())
        self.h.addTicket(bytes(10), uuid="0123456789abcdef", transfer_id="tr-x")
        for raw in (
            request(b"GET", b"/images/0123456789abcdef"),
            request(b"PUT", b"/images/0123456789abcdef", body=b"abc"),
            request(b"OPTIONS", b"/images/0123456789abcdef"),
            request(b"GET", b"/images/0123456789abcdef/extents"),
            request(b"GET", b"/images/0123456789abcdef/checksum"),
            request(b"PATCH", b"/images/0123456789abcdef", body=b'{"op": "flush"}'),
        ):
            response = self.send(raw)
            self.assertError(response, 500, INTERNAL_ERROR, close=True)
        text = "\n".join(formatEvent(e) for e in events)
        self.assertIn("secret.sock export 'sda'", text)
        self.assertIn("/images/01234567...", text)
        self.assertNotIn("0123456789abcdef", text)
        self.assertFalse([e for e in events if "log_failure" in e])

    def test_errorOnFlush(self) -> None:
        """
        EIO on the flush after a PUT is 500 with the reason.
        """
        ticket = self.h.addTicket(bytes(10))
        name = ticket.url.split(":", 1)[1]
        memory.failNext(name, "flush", OSError(errno.EIO, "Input/output error"))
        response = self.send(request(b"PUT", b"/images/t1", body=b"abc"))
        self.assertError(response, 500, INTERNAL_ERROR)
        self.assertEqual(ticket.flushedRanges(), [])
        self.flushLoggedErrors(OSError)

    def test_errorOnFirstRead(self) -> None:
        """
        A read error before any byte was sent is a proper 500 with the
        reason, without the GET headers, and closes the connection.
        """
        ticket = self.h.addTicket(b"abc" * 10, filename="d.raw")
        name = ticket.url.split(":", 1)[1]
        memory.failNext(name, "read", OSError(errno.EIO, "Input/output error"))
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/t1", {b"Range": b"bytes=0-4"}))
        response = conn.response()
        self.assertError(response, 500, INTERNAL_ERROR, close=True)
        for name_ in (b"content-range", b"content-disposition", b"accept-ranges"):
            self.assertIsNone(response.header(name_))
        self.assertTrue(conn.closed)
        self.assertFalse(ticket.active)
        self.flushLoggedErrors(OSError)

    def test_errorOnLaterRead(self) -> None:
        """
        A read error once the response started aborts the connection, so the
        client sees a short body, never a complete-looking one.
        """
        self.h = ImagesHarness(bufferSize=4096)
        self.addCleanup(self.h.cleanup)
        ticket = self.h.addTicket(b"x" * 10000)
        name = ticket.url.split(":", 1)[1]
        conn = self.h.connect()
        original = memory.MemoryBackend.readInto
        calls = []

        def readInto(backend: Any, offset: int, buf: memoryview) -> Any:
            calls.append(offset)
            if len(calls) == 2:
                memory.failNext(name, "read", OSError(errno.EIO, "Input/output error"))
            return original(backend, offset, buf)

        self.patch(memory.MemoryBackend, "readInto", readInto)
        conn.send(request(b"GET", b"/images/t1"))
        self.assertTrue(conn.aborted)
        output = conn.output()
        self.assertIn(b"200 OK", output)
        self.assertRaises(ValueError, parseResponses, output)
        self.assertFalse(ticket.active)
        self.assertEqual(ticket.transferred(), 4096)
        self.assertTrue(self.flushLoggedErrors(OSError))

    def test_errorOnZero(self) -> None:
        """
        An error while zeroing is 500 with the reason, and closes.
        """
        ticket = self.h.addTicket(bytes(10))
        name = ticket.url.split(":", 1)[1]
        memory.failNext(name, "zero", OSError(errno.ENOSPC, "No space left on device"))
        conn = self.h.connect()
        conn.send(request(b"PATCH", b"/images/t1", body=b'{"op": "zero", "size": 5}'))
        self.assertError(
            conn.response(),
            500,
            INTERNAL_ERROR,
            close=True,
        )
        self.assertFalse(ticket.active)
        self.flushLoggedErrors(OSError)


class InactivityTests(ImagesTestCase):
    """
    Section 2.6: connection timeouts.
    """

    def test_ticketTimeout(self) -> None:
        """
        Once a connection used a ticket, it idles out after the ticket's
        C{inactivity_timeout}, not the listener's 60 seconds.
        """
        self.h.addTicket(b"abc", inactivity_timeout=10)
        conn = self.h.connect()
        conn.send(request(b"OPTIONS", b"/images/t1"))
        self.assertEqual(conn.response().status, 200)
        self.clock.advance(9)
        self.assertFalse(conn.closed)
        self.clock.advance(2)
        self.assertTrue(conn.closed)

    def test_longTicketTimeout(self) -> None:
        """
        A ticket timeout longer than the listener's keeps the connection open
        past 60 seconds.
        """
        self.h.addTicket(b"abc", inactivity_timeout=300)
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/t1"))
        self.assertEqual(conn.response().status, 200)
        self.clock.advance(299)
        self.assertFalse(conn.closed)
        self.clock.advance(2)
        self.assertTrue(conn.closed)

    def test_defaultTimeout(self) -> None:
        """
        A connection that used no ticket idles out after 60 seconds.
        """
        conn = self.h.connect()
        conn.send(request(b"GET", b"/info/"))
        self.clock.advance(59)
        self.assertFalse(conn.closed)
        self.clock.advance(2)
        self.assertTrue(conn.closed)


def decodeChunked(data: bytes) -> tuple[Response, list[bytes], bool]:
    """
    Parse one response with a chunked body.

    @return: The response (its body the joined chunks), the chunks, and
        whether the terminating chunk arrived.
    """
    head, sep, rest = data.partition(b"\r\n\r\n")
    assert sep, data[:200]
    lines = head.split(b"\r\n")
    version, status, reason = (lines[0].split(b" ", 2) + [b""])[:3]
    headers = [
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(b":") for line in lines[1:])
    ]
    chunks: list[bytes] = []
    complete = False
    while rest:
        size, sep, rest = rest.partition(b"\r\n")
        if not sep:
            break
        n = int(size, 16)
        if n == 0:
            complete = rest == b"\r\n"
            break
        chunks.append(rest[:n])
        assert rest[n : n + 2] == b"\r\n"
        rest = rest[n + 2 :]
    return Response(version, int(status), reason, headers, b"".join(chunks)), chunks, complete


class LargeExtentsTests(SynchronousTestCase):
    """
    Issue 10 item 10: the extents of a very fragmented image are answered
    in bounded slices, under backpressure, merged and encoded on the pool.
    """

    RUNS = 1000

    def setUp(self) -> None:
        self.h = ImagesHarness()
        self.addCleanup(self.h.cleanup)
        # A small cap per backend call stands for the real one (10,000) on
        # a map of millions of extents.
        self.patch(filebackend, "MAX_EXTENTS", 50)
        # Answers over 4 KiB are streamed (64 MiB in production, or 1 MiB
        # when the buffer budget is used up).
        self.patch(_jsonlist, "MAX_BUFFERED", 4096)
        self.patch(_jsonlist, "MAX_WHOLE", 4096)
        path = os.path.abspath(self.mktemp())
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            for i in range(self.RUNS):
                os.pwrite(fd, b"x" * 4096, i * 8192)
            os.ftruncate(fd, self.RUNS * 8192)
        finally:
            os.close(fd)
        if os.lseek(os.open(path, os.O_RDONLY), 0, os.SEEK_HOLE) != 4096:
            raise SkipTest("The file system does not report holes")
        ticket = self.h.addTicket(b"", size=self.RUNS * 8192, ops=("read",))
        ticket.url = "file://" + path
        self.calls: list[int] = []
        original = filebackend.FileBackend.extents

        def counting(backend: Any, context: str, start: int, length: int) -> Any:
            d = original(backend, context, start, length)
            d.addCallback(lambda got: self.calls.append(len(got)) or got)
            return d

        self.patch(filebackend.FileBackend, "extents", counting)
        self.expected = []
        for i in range(self.RUNS):
            self.expected.append({"start": i * 8192, "length": 4096, "zero": False, "hole": False})
            self.expected.append(
                {"start": i * 8192 + 4096, "length": 4096, "zero": True, "hole": False}
            )

    def pauseOnWrite(self, conn: Connection) -> Any:
        """
        Make C{conn}'s transport full after each write, as a client that
        reads slowly.
        """
        transport = conn.transport
        write, writeSequence = transport.write, transport.writeSequence

        def pausingWrite(data: bytes) -> None:
            write(data)
            transport.producer.pauseProducing()

        def pausingWriteSequence(data: list[bytes]) -> None:
            writeSequence(data)
            transport.producer.pauseProducing()

        self.patch(transport, "write", pausingWrite)
        self.patch(transport, "writeSequence", pausingWriteSequence)
        return transport

    def test_streamedInSlices(self) -> None:
        """
        An answer longer than one slice is streamed in chunks of at most one
        backend answer each, and holds the whole map, merged across slices.
        """
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/t1/extents?context=zero"))
        response, pieces, complete = decodeChunked(conn.output())
        self.assertTrue(complete)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"content-type"), b"application/json")
        self.assertEqual(response.header(b"transfer-encoding"), b"chunked")
        self.assertIsNone(response.header(b"content-length"))
        self.assertEqual(json.loads(response.body), self.expected)
        self.assertTrue(response.body.endswith(b"]\n"))
        self.assertGreater(len(pieces), 10)
        # Each chunk is one backend answer of at most 50 extents (about 64
        # bytes each), the first one after what was buffered.
        self.assertLess(len(pieces[0]), 4096 + 50 * 80)
        self.assertTrue(all(len(p) < 50 * 80 for p in pieces[1:]), max(map(len, pieces)))
        self.assertTrue(all(n <= 50 for n in self.calls))
        self.assertFalse(conn.closed)

    def test_windowStreamedToo(self) -> None:
        """
        A window wider than one slice is answered the same way; a window
        within one slice keeps C{Content-Length}.
        """
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/t1/extents?start=4096&length=8192000"))
        response, _, complete = decodeChunked(conn.output())
        self.assertTrue(complete)
        self.assertEqual(json.loads(response.body), self.expected[1:])
        small = self.h.roundTrip(request(b"GET", b"/images/t1/extents?start=8192&length=16384"))
        self.assertEqual(small.header(b"content-length"), b"%d" % len(small.body))
        self.assertEqual(json.loads(small.body), self.expected[2:6])

    def test_backpressure(self) -> None:
        """
        While the client does not read, no further part of the map is asked
        of the backend: memory per answer stays at a slice or two.
        """
        conn = self.h.connect()
        transport = self.pauseOnWrite(conn)
        conn.send(request(b"GET", b"/images/t1/extents"))
        for _ in range(3):
            self.assertLessEqual(len(self.calls), 3)
            _, _, complete = decodeChunked(transport.value())
            self.assertFalse(complete)
        rounds = 0
        while not decodeChunked(transport.value())[2]:
            before = len(self.calls)
            transport.producer.resumeProducing()
            self.assertLessEqual(len(self.calls) - before, 1)
            rounds += 1
        self.assertGreater(rounds, 10)
        response, _, complete = decodeChunked(transport.value())
        self.assertTrue(complete)
        self.assertEqual(json.loads(response.body), self.expected)

    def test_clientGoneMidAnswer(self) -> None:
        """
        A client that leaves in the middle of a streamed answer stops it:
        the backend is asked nothing more.
        """
        conn = self.h.connect()
        transport = self.pauseOnWrite(conn)
        conn.send(request(b"GET", b"/images/t1/extents"))
        calls = len(self.calls)
        conn.lose()
        transport.producer.resumeProducing()
        self.assertEqual(len(self.calls), calls)
        self.assertFalse(decodeChunked(transport.value())[2])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_clientGoneWhileBuffering(self) -> None:
        """
        A client that leaves while the answer is still being gathered gets
        nothing more and leaves no error behind.
        """
        current = filebackend.FileBackend.extents
        held: list[Deferred[Any]] = []

        def holding(backend: Any, *args: Any) -> Any:
            d = current(backend, *args)
            if len(self.calls) == 2:
                pending: Deferred[Any] = Deferred()
                held.append(pending)
                d.addCallback(lambda got: held.append(got))
                return pending
            return d

        self.patch(filebackend.FileBackend, "extents", holding)
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/t1/extents"))
        self.assertEqual(conn.output(), b"")
        conn.lose()
        pending, got = held
        pending.callback(got)
        self.assertEqual(len(self.calls), 2)
        self.assertEqual(conn.output(), b"")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_http10(self) -> None:
        """
        An HTTP/1.0 client gets the streamed answer delimited by the end of
        the connection.
        """
        conn = self.h.connect()
        conn.send(b"GET /images/t1/extents HTTP/1.0\r\nHost: localhost\r\n\r\n")
        head, _, body = conn.output().partition(b"\r\n\r\n")
        self.assertNotIn(b"chunked", head.lower())
        self.assertNotIn(b"content-length", head.lower())
        self.assertEqual(json.loads(body), self.expected)
        self.assertTrue(conn.closed)


def wholeAnswer(data: bytes) -> bool:
    """
    @return: Whether C{data} holds a response head and all the body its
        C{Content-Length} announces.
    """
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.lower().split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    raise AssertionError(f"no content-length: {head!r}")


class WholeExtentsTests(LargeExtentsTests):
    """
    Extents answers longer than L{_jsonlist.MAX_BUFFERED} are held against
    the buffer budget and sent with C{Content-Length}, as clients expect,
    a slice at a time; only when the budget cannot hold them are they
    streamed without a length.
    """

    def setUp(self) -> None:
        super().setUp()
        self.patch(_jsonlist, "MAX_WHOLE", 1024**2)

    def test_streamedInSlices(self) -> None:
        """
        An answer of many slices gets C{Content-Length} and the whole map,
        written a slice per write, and the budget's bytes are given back.
        """
        conn = self.h.connect()
        transport = self.pauseOnWrite(conn)
        writes: list[bytes] = []
        write = transport.write
        self.patch(transport, "write", lambda data: (writes.append(data), write(data)))
        conn.send(request(b"GET", b"/images/t1/extents?context=zero"))
        self.assertGreater(self.h.budget.used, 0)
        for _ in range(10000):
            if wholeAnswer(transport.value()):
                break
            transport.producer.resumeProducing()
        response = parseResponses(transport.value())[0]
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"content-length"), b"%d" % len(response.body))
        self.assertIsNone(response.header(b"transfer-encoding"))
        self.assertEqual(json.loads(response.body), self.expected)
        self.assertGreater(len(writes), 10)
        self.assertTrue(all(len(w) < 50 * 80 for w in writes[1:]), max(map(len, writes)))
        self.assertEqual(self.h.budget.used, 0)
        self.assertFalse(conn.closed)

    def test_windowStreamedToo(self) -> None:
        """
        A window is answered the same way.
        """
        response = self.h.roundTrip(
            request(b"GET", b"/images/t1/extents?start=4096&length=8192000")
        )
        self.assertEqual(response.header(b"content-length"), b"%d" % len(response.body))
        self.assertEqual(json.loads(response.body), self.expected[1:])
        self.assertEqual(self.h.budget.used, 0)

    def test_backpressure(self) -> None:
        """
        While the client does not read, the gathered answer is not written
        all at once: one slice per time the transport drains.
        """
        conn = self.h.connect()
        transport = self.pauseOnWrite(conn)
        conn.send(request(b"GET", b"/images/t1/extents"))
        sent = len(transport.value())
        rounds = 0
        while not wholeAnswer(transport.value()) and rounds < 10000:
            transport.producer.resumeProducing()
            self.assertLess(len(transport.value()) - sent, 50 * 80)
            sent = len(transport.value())
            rounds += 1
        self.assertGreater(rounds, 10)
        self.assertEqual(json.loads(parseResponses(transport.value())[0].body), self.expected)

    def test_clientGoneMidAnswer(self) -> None:
        """
        A client that leaves in the middle of the answer stops it, and the
        budget's bytes are given back.
        """
        conn = self.h.connect()
        transport = self.pauseOnWrite(conn)
        conn.send(request(b"GET", b"/images/t1/extents"))
        self.assertGreater(self.h.budget.used, 0)
        conn.lose()
        self.assertEqual(self.h.budget.used, 0)
        head, _, body = transport.value().partition(b"\r\n\r\n")
        self.assertIn(b"content-length", head.lower())
        self.assertLess(
            len(body), int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        )
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_http10(self) -> None:
        """
        An HTTP/1.0 client gets C{Content-Length} too.
        """
        conn = self.h.connect()
        conn.send(b"GET /images/t1/extents HTTP/1.0\r\nHost: localhost\r\n\r\n")
        head, _, body = conn.output().partition(b"\r\n\r\n")
        self.assertIn(b"content-length: %d" % len(body), head.lower())
        self.assertEqual(json.loads(body), self.expected)

    def test_budgetUsedUp(self) -> None:
        """
        When the buffer budget cannot hold the answer, it is streamed
        without a length rather than waiting for memory.
        """
        self.h.budget.limit = 8192
        hog = self.h.budget.tryAcquire(8000)
        self.assertIsNotNone(hog)
        conn = self.h.connect()
        conn.send(request(b"GET", b"/images/t1/extents"))
        response, _, complete = decodeChunked(conn.output())
        self.assertTrue(complete)
        self.assertEqual(response.header(b"transfer-encoding"), b"chunked")
        self.assertEqual(json.loads(response.body), self.expected)
        self.assertEqual(self.h.budget.used, 8000)


class RelayLoopTests(ImagesTestCase):
    """
    Issue 10 item 7: a request one of our relays sent is not relayed again.
    """

    def test_relayedRequestNotRelayedAgain(self) -> None:
        """
        A relayed request (C{Imageio-Relayed}) for a proxy-mode ticket is
        508 Loop Detected, and nothing is opened.
        """
        ticket = self.h.addTicket(b"x" * 10)
        ticket.url = "https://daemon.example.com:54322/images/t1"
        opened: list[str] = []
        self.patch(type(self.h.service.opener), "open", lambda self, url, **kw: opened.append(url))
        for method, path in (
            (b"OPTIONS", b"/images/t1"),
            (b"GET", b"/images/t1"),
            (b"GET", b"/images/t1/extents"),
            (b"GET", b"/images/t1/checksum"),
        ):
            response = self.send(request(method, path, {b"imageio-relayed": b"1"}))
            self.assertEqual(response.status, 508, path)
            self.assertIn("Loop detected", response.text)
            self.assertEqual(response.header(b"connection"), b"close")
        response = self.send(
            request(b"PUT", b"/images/t1", {b"imageio-relayed": b"1"}, body=b"y" * 10)
        )
        self.assertEqual(response.status, 508)
        self.assertEqual(opened, [])
        self.assertFalse(ticket.active)

    def test_relayedRequestServedFromStorage(self) -> None:
        """
        A relayed request for a ticket on storage (the proxy talking to the
        host's daemon) is served as any other.
        """
        self.h.addTicket(b"x" * 10)
        response = self.send(request(b"GET", b"/images/t1", {b"imageio-relayed": b"1"}))
        self.assertEqual((response.status, response.body), (200, b"x" * 10))


class HugeNumberTests(ImagesTestCase):
    """
    Issue 10 item 9: numbers of thousands of digits in headers and query
    arguments are refused without being converted.
    """

    def test_headersAndQueries(self) -> None:
        """
        Content-Length, Content-Range, Range, C{start}, C{length} and
        C{block_size} of 4,000 digits get 400 (416 for Range), quickly.
        """
        self.h.addTicket(bytes(100))
        huge = b"9" * 4000
        cases = [
            (b"PUT", b"/images/t1", b"Content-Length: " + huge, 400),
            (
                b"PUT",
                b"/images/t1",
                b"Content-Length: 5\r\nContent-Range: bytes " + huge + b"-5/*",
                400,
            ),
            (b"GET", b"/images/t1", b"Range: bytes=" + huge + b"-", 416),
            (b"GET", b"/images/t1/extents?start=" + huge, b"", 400),
            (b"GET", b"/images/t1/extents?length=" + huge, b"", 400),
            (b"GET", b"/images/t1/checksum?block_size=" + huge, b"", 400),
        ]
        for method, path, header, status in cases:
            conn = self.h.connect()
            raw = method + b" " + path + b" HTTP/1.1\r\nHost: x\r\n"
            conn.send(raw + (header + b"\r\n" if header else b"") + b"\r\nhello")
            response = parseResponses(conn.output())[0]
            self.assertEqual(response.status, status, (path, header[:40]))
            self.assertLess(len(response.body), 300)
