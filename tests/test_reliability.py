"""
Reliability and security of the daemon against bad inputs, on a real
daemon over real sockets: reliability checklist sections A (Range on GET),
B (PUT body framing), C (PATCH), D (control socket) and E (tickets).

Faults, slow clients, concurrency and signals are in
L{tests.test_reliability_faults}; connection counts and memory in
L{tests.test_reliability_load}.

Each test starts an in-process daemon on trial's reactor and does its
client work in a thread, writing raw request bytes.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import statistics
import time
from pathlib import Path
from typing import Any, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from imageio.ranges import RangeSet
from imageio.tickets import Operation, parseTicket
from tests._daemon import (
    Connection,
    DaemonTestCase,
    InProcessDaemon,
    Response,
    connect,
    control,
    fdCount,
    parallel,
    pattern,
    rawRequest,
    ticketBody,
    waitFor,
)

KiB = 1024
MiB = 1024**2
#: Ticket size of most tests: not a multiple of the block size.
T = MiB + 4097


def rangeRequest(ticket: str, value: str) -> bytes:
    return rawRequest("GET", f"/images/{ticket}", [("Range", value)])


def readFile(path: Path, offset: int = 0, size: int = -1) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def sendRaw(conn: Connection, data: bytes) -> None:
    """
    Send C{data}, tolerating a server that answers and closes before
    reading all of it.
    """
    try:
        conn.send(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def exchange(
    daemon: InProcessDaemon, data: bytes, listener: str = "local"
) -> tuple[Response, bool]:
    """
    Send C{data} on a new connection.

    @return: The response and whether the server closed the connection
        right after it (a response without C{Content-Length} is read to the
        end of the connection; one saying C{Connection: close} must be
        followed by the end within 2 seconds).
    """
    with connect(daemon.addresses, listener) as conn:
        sendRaw(conn, data)
        response = conn.response(timeout=10)
        if response.header("content-length") is None:
            return response, True
        return response, response.closes and conn.waitClosed(2)


class RangeTests(DaemonTestCase):
    """
    Checklist A: the C{Range} header of GET.
    """

    def setUp(self) -> None:
        self.daemon = self.startDaemon()
        self.data = pattern(T)
        self.ticket = self.addTicket(
            self.daemon, self.makeImage(self.daemon, T, self.data), T, ops=["read"]
        )
        self.target = f"/images/{self.ticket}"

    def get(self, conn: Connection, rangeValue: str | bytes) -> Response:
        header = rangeValue if isinstance(rangeValue, bytes) else rangeValue.encode("latin-1")
        conn.send(
            b"GET %s HTTP/1.1\r\nHost: localhost\r\nRange: %s\r\n\r\n"
            % (self.target.encode(), header)
        )
        return conn.response()

    def assertUnsatisfiable(self, response: Response, contentRange: bool = True) -> None:
        self.assertEqual(response.status, 416, response.text)
        self.assertTrue(response.text.endswith("\n"))
        if contentRange:
            self.assertEqual(response.header("content-range"), f"bytes */{T}")

    async def test_exactRanges(self) -> None:
        """
        C{bytes=0-0}, C{bytes=T-1-T-1} and C{bytes=0-} get 206 with exactly
        the bytes asked for, over TLS and the local socket.
        """

        def scenario(listener: str) -> None:
            with connect(self.daemon.addresses, listener) as conn:
                for value, first, last in [
                    ("bytes=0-0", 0, 0),
                    (f"bytes={T - 1}-{T - 1}", T - 1, T - 1),
                    ("bytes=0-", 0, T - 1),
                ]:
                    r = self.get(conn, value)
                    self.assertEqual(r.status, 206, r.text)
                    self.assertEqual(r.header("content-range"), f"bytes {first}-{last}/{T}")
                    self.assertEqual(r.header("content-length"), str(last - first + 1))
                    self.assertEqual(r.body, self.data[first : last + 1])

        await deferToThread(scenario, "local")
        await deferToThread(scenario, "remote")

    async def test_unsatisfiableRanges(self) -> None:
        """
        Ranges starting at or ending past the ticket size get 416 with
        C{Content-Range: bytes */T}, and the connection stays usable.
        """

        def scenario() -> None:
            with connect(self.daemon.addresses) as conn:
                for value in [f"bytes={T}-", f"bytes={T}-{T + 10}", f"bytes={T + 10}-{T + 20}"]:
                    self.assertUnsatisfiable(self.get(conn, value))
                self.assertEqual(self.get(conn, "bytes=1-2").body, self.data[1:3])

        await deferToThread(scenario)

    async def test_invertedRange(self) -> None:
        """
        C{bytes=5-4} gets 416 with C{Content-Range: bytes */T}, like every
        other unsatisfiable range.
        """

        def scenario() -> None:
            with connect(self.daemon.addresses) as conn:
                self.assertUnsatisfiable(self.get(conn, "bytes=5-4"))

        await deferToThread(scenario)

    async def test_suffixRanges(self) -> None:
        """
        Suffix ranges are served (design item 1): C{bytes=-1} is the last
        byte, C{bytes=-T} and longer suffixes the whole image, and
        C{bytes=-0} is 416.
        """

        def scenario() -> None:
            with connect(self.daemon.addresses) as conn:
                r = self.get(conn, "bytes=-1")
                self.assertEqual((r.status, r.body), (206, self.data[-1:]))
                self.assertEqual(r.header("content-range"), f"bytes {T - 1}-{T - 1}/{T}")
                for value in [f"bytes=-{T}", f"bytes=-{T + 100}"]:
                    r = self.get(conn, value)
                    self.assertEqual(r.status, 206)
                    self.assertEqual(r.header("content-range"), f"bytes 0-{T - 1}/{T}")
                    self.assertEqual(r.body, self.data)
                self.assertUnsatisfiable(self.get(conn, "bytes=-0"))

        await deferToThread(scenario)

    async def test_multipleRanges(self) -> None:
        """
        Several ranges, 1000 overlapping ranges and a 64 KiB Range header are
        refused (416, or 431 for the header too large to parse) in constant
        memory; the daemon keeps serving.
        """

        def scenario() -> None:
            thousand = "bytes=" + ",".join(f"{i}-{i + 5}" for i in range(1000))
            with connect(self.daemon.addresses) as conn:
                self.assertUnsatisfiable(self.get(conn, "bytes=0-1,2-3"))
                self.assertUnsatisfiable(self.get(conn, thousand))
                self.assertLess(len(self.get(conn, thousand).body), 512)
                before = rss()
                for _ in range(50):
                    self.assertEqual(self.get(conn, thousand).status, 416)
                self.assertLess(rss() - before, 8 * MiB)
            with connect(self.daemon.addresses) as conn:
                r = self.get(conn, "bytes=" + "0" * 64 * KiB + "-1")
                self.assertIn(r.status, (416, 431))
                if r.status == 431:
                    self.assertTrue(conn.waitClosed(2))
            with connect(self.daemon.addresses) as conn:
                self.assertEqual(self.get(conn, "bytes=0-0").status, 206)

        await deferToThread(scenario)

    async def test_hugeNumbers(self) -> None:
        """
        Numbers past 64 bits, or of hundreds of digits, are 416, never an
        overflow or a slow conversion.
        """

        def scenario() -> None:
            with connect(self.daemon.addresses) as conn:
                self.assertUnsatisfiable(self.get(conn, "bytes=0-18446744073709551615"))
                self.assertUnsatisfiable(self.get(conn, "bytes=99999999999999999999-"))
                started = time.monotonic()
                r = self.get(conn, "bytes=" + "9" * 4000 + "-")
                self.assertEqual(r.status, 416)
                self.assertLess(time.monotonic() - started, 1)

        await deferToThread(scenario)

    async def test_malformedRanges(self) -> None:
        """
        Upper-case units, spaces, signs, hex, underscores, non-ASCII digits
        and other units are refused (400 or 416), never 206; the legacy
        C{Request-Range} header is ignored.
        """

        def scenario() -> None:
            values = [
                b"BYTES=0-1",
                b"bytes = 0-1",
                b"bytes=+1-2",
                b"bytes=0x10-0x20",
                b"bytes=1_0-2_0",
                "bytes=\u0661-\u0662".encode(),
                b"items=0-1",
                b"bytes=0-1\x00",
                b"bytes=-",
                b"bytes=",
            ]
            for value in values:
                with connect(self.daemon.addresses) as conn:
                    r = self.get(conn, value)
                    self.assertIn(r.status, (400, 416), value)
            with connect(self.daemon.addresses) as conn:
                conn.send(rawRequest("GET", self.target, [("Request-Range", "bytes=0-1")]))
                r = conn.response()
                self.assertEqual(r.status, 200)
                self.assertEqual(r.body, self.data)

        await deferToThread(scenario)


class UploadFramingTests(DaemonTestCase):
    """
    Checklist B: how a PUT body is framed. The image is larger than the
    ticket; bytes past the ticket size must never change.
    """

    TAIL = 64 * KiB

    def setUp(self) -> None:
        self.daemon = self.startDaemon()
        self.original = pattern(T + self.TAIL, b"original")
        self.image = self.makeImage(self.daemon, T + self.TAIL, self.original)
        self.ticket = self.addTicket(self.daemon, self.image, T)
        self.target = f"/images/{self.ticket}"

    def put(self, headers: bytes, body: bytes = b"") -> tuple[Response, bool]:
        return exchange(
            self.daemon,
            b"PUT %s HTTP/1.1\r\nHost: localhost\r\n%s\r\n%s"
            % (self.target.encode(), headers, body),
        )

    def assertUnchanged(self, start: int = 0) -> None:
        self.assertEqual(readFile(self.image, start), self.original[start:])

    def assertRefused(
        self, headers: bytes, body: bytes, statuses: tuple[int, ...] = (400,)
    ) -> None:
        response, closed = self.put(headers, body)
        self.assertIn(response.status, statuses, (headers, response.status, response.text))
        self.assertTrue(closed, headers)
        self.assertUnchanged()

    async def test_badContentLength(self) -> None:
        """
        A PUT without C{Content-Length}, or with one that is not a plain
        decimal number, is refused with 400 (or 411), the connection closed
        and nothing written.
        """

        def scenario() -> None:
            response, closed = self.put(b"", b"hello")
            self.assertIn(response.status, (400, 411))
            self.assertIn("Content-Length", response.text)
            self.assertTrue(closed)
            for value in [b"-1", b"+5", b"1_000", b"0x10", b"1e3", b"5x", b"\xd9\xa5"]:
                self.assertRefused(b"Content-Length: %s\r\n" % value, b"hello")
            self.assertUnchanged()

        await deferToThread(scenario)

    async def test_contentLengthWhitespace(self) -> None:
        """
        Whitespace around a C{Content-Length} value is not part of it (RFC
        9110 section 5.5), so C{"5 "} is 5: exactly five bytes are written.
        """

        def scenario() -> None:
            response, _ = self.put(b"Content-Length: 5 \r\nConnection: close\r\n", b"hello")
            self.assertEqual(response.status, 200)
            self.assertEqual(readFile(self.image, 0, 5), b"hello")
            self.assertUnchanged(5)

        await deferToThread(scenario)

    async def test_duplicateContentLength(self) -> None:
        """
        Two C{Content-Length} headers, equal or not, get 400.
        """

        def scenario() -> None:
            self.assertRefused(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello")
            self.assertRefused(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!")
            self.assertRefused(b"Content-Length: 5, 5\r\n", b"hello")

        await deferToThread(scenario)

    async def test_transferEncoding(self) -> None:
        """
        C{Transfer-Encoding} with C{Content-Length}, unknown codings, coding
        lists, and chunked bodies (even malformed ones) get 400 and nothing
        is written.
        """

        def scenario() -> None:
            chunked = b"5\r\nhello\r\n0\r\n\r\n"
            cases = [
                (b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", chunked),
                (b"Transfer-Encoding: gzip\r\n", chunked),
                (b"Transfer-Encoding: chunked, identity\r\n", chunked),
                (b"Transfer-Encoding: identity\r\n", b"hello"),
                (b"Transfer-Encoding: chunked\r\n", b"0x5\r\nhello\r\n0\r\n\r\n"),
                (b"Transfer-Encoding: chunked\r\n", b"5;a=\nb\r\nhello\r\n0\r\n\r\n"),
                (b"Transfer-Encoding: chunked\r\n", chunked),
            ]
            for headers, body in cases:
                self.assertRefused(headers, body, (400, 411))

        await deferToThread(scenario)

    async def test_shortBodyThenIdle(self) -> None:
        """
        A client that sends less than C{Content-Length} and then goes idle
        is cut at the ticket's inactivity timeout, gets no success, and the
        ticket's C{transferred} counts no byte it did not send.
        """
        ticket = self.addTicket(self.daemon, self.image, T, ops=["write"], inactivity_timeout=1)

        def scenario() -> None:
            sent = 100 * KiB
            with connect(self.daemon.addresses) as conn:
                conn.send(
                    rawRequest(
                        "PUT", f"/images/{ticket}", [("Content-Length", str(MiB))], pattern(sent)
                    )
                )
                started = time.monotonic()
                self.assertTrue(conn.waitClosed(5))
                self.assertGreater(time.monotonic() - started, 0.5)
            info = control(self.daemon.addresses, "GET", f"/tickets/{ticket}").json()
            self.assertLessEqual(info["transferred"], sent)
            self.assertFalse(info["active"])
            self.assertUnchanged(sent)

        await deferToThread(scenario)

    async def test_lengthBeyondTicket(self) -> None:
        """
        A C{Content-Length} of 2^63 or one byte more than the ticket allows
        gets 416 before any body byte is sent.
        """

        def scenario() -> None:
            for value in [str(2**63), str(T + 1), "9" * 20]:
                response, closed = self.put(f"Content-Length: {value}\r\n".encode())
                self.assertEqual(response.status, 416, value)
                self.assertEqual(response.header("content-range"), f"bytes */{T}")
                self.assertTrue(closed)
            self.assertUnchanged()

        await deferToThread(scenario)

    async def test_contentRangeLengthMismatch(self) -> None:
        """
        When C{Content-Range} and C{Content-Length} disagree, the write
        starts at the range's first byte and is C{Content-Length} long.
        """

        def scenario() -> None:
            response, _ = self.put(
                b"Content-Range: bytes 0-99/*\r\nContent-Length: 50\r\nConnection: close\r\n",
                b"x" * 50,
            )
            self.assertEqual(response.status, 200)
            self.assertEqual(readFile(self.image, 0, 50), b"x" * 50)
            self.assertUnchanged(50)

        await deferToThread(scenario)

    async def test_writeEdges(self) -> None:
        """
        A write ending exactly at the ticket size succeeds; one byte more,
        or an offset that overflows 64 bits, gets 416; an empty write at the
        ticket size succeeds. Bytes past the ticket size never change.
        """

        def scenario() -> None:
            def put(first: int, body: bytes) -> Response:
                headers = f"Content-Range: bytes {first}-{first + max(len(body), 1) - 1}/*\r\n"
                headers += f"Content-Length: {len(body)}\r\n"
                return self.put(headers.encode(), body)[0]

            self.assertEqual(put(T - 10, b"e" * 10).status, 200)
            self.assertEqual(put(T - 10, b"f" * 11).status, 416)
            self.assertEqual(put(T, b"").status, 200)
            self.assertEqual(put(2**64 - 1, b"g").status, 416)
            self.assertEqual(put(2**63 - 1, b"g").status, 416)
            self.assertEqual(readFile(self.image, T - 10, 10), b"e" * 10)
            self.assertUnchanged(T)

        await deferToThread(scenario)

    async def test_expectContinueBadTicket(self) -> None:
        """
        C{Expect: 100-continue} on a ticket that does not exist gets 403
        without the client sending its body, and the connection closes.
        """

        def scenario() -> None:
            with connect(self.daemon.addresses) as conn:
                conn.send(
                    rawRequest(
                        "PUT",
                        "/images/no-such-ticket",
                        [("Content-Length", str(10 * MiB)), ("Expect", "100-continue")],
                    )
                )
                response = conn.response(timeout=5)
                self.assertEqual(response.status, 403)
                self.assertIn("No such ticket", response.text)
                self.assertTrue(conn.waitClosed(2))

        await deferToThread(scenario)


class PatchTests(DaemonTestCase):
    """
    Checklist C: PATCH bodies (zero and flush).
    """

    def setUp(self) -> None:
        self.daemon = self.startDaemon()
        self.original = pattern(T, b"patch")
        self.image = self.makeImage(self.daemon, T, self.original)
        self.ticket = self.addTicket(self.daemon, self.image, T)
        self.readOnly = self.addTicket(self.daemon, self.image, T, ops=["read"])

    def sendPatch(self, body: bytes, ticket: str = "") -> Response:
        with connect(self.daemon.addresses) as conn:
            sendRaw(
                conn,
                rawRequest(
                    "PATCH",
                    f"/images/{ticket or self.ticket}",
                    [("Content-Type", "application/json")],
                    body,
                ),
            )
            return conn.response(timeout=10)

    async def test_badZeroFields(self) -> None:
        """
        Missing, negative, boolean, fractional, NaN and oversized sizes,
        ranges past the ticket, unknown ops and non-boolean flush are
        refused (400 or 416) and nothing is zeroed.
        """

        def scenario() -> None:
            cases = [
                (b'{"op": "zero"}', 400),
                (b'{"op": "zero", "size": -1}', 400),
                (b'{"op": "zero", "size": true}', 400),
                (b'{"op": "zero", "size": 1.5}', 400),
                (b'{"op": "zero", "size": NaN}', 400),
                (b'{"op": "zero", "size": Infinity}', 400),
                (b'{"op": "zero", "size": "10"}', 400),
                (b'{"op": "zero", "size": null}', 400),
                (b'{"op": "zero", "size": 1e3}', 400),
                (b'{"op": "zero", "size": 18446744073709551616}', 416),
                (b'{"op": "zero", "size": %d}' % (T + 1), 416),
                (b'{"op": "zero", "offset": %d, "size": 2}' % (T - 1), 416),
                (b'{"op": "zero", "offset": -5, "size": 2}', 400),
                (b'{"op": "zero", "offset": true, "size": 2}', 400),
                (b'{"op": "trim", "size": 2}', 400),
                (b'{"size": 2}', 400),
                (b'{"op": "zero", "size": 2, "flush": "yes"}', 400),
                (b'{"op": "zero", "size": 2, "flush": 1}', 400),
                (b'{"op": "flush", "flush": "yes"}', 200),
            ]
            for body, status in cases:
                r = self.sendPatch(body)
                self.assertEqual(r.status, status, (body, r.text))
                if status == 416:
                    self.assertEqual(r.header("content-range"), f"bytes */{T}")
            self.assertEqual(readFile(self.image), self.original)

        await deferToThread(scenario)

    async def test_hostileBodies(self) -> None:
        """
        A 100 MB body is refused before it is sent; deeply nested arrays,
        duplicate keys and invalid UTF-8 get a quick 400 or 413.
        """

        def scenario() -> None:
            with connect(self.daemon.addresses) as conn:
                conn.send(
                    rawRequest(
                        "PATCH", f"/images/{self.ticket}", [("Content-Length", str(100 * 10**6))]
                    )
                )
                r = conn.response(timeout=5)
                self.assertEqual(r.status, 413)
                self.assertTrue(conn.waitClosed(2))
            cases = [
                (b"[" * 10000 + b"]" * 10000, (400, 413)),
                (b"[" * 2000 + b"]" * 2000, (400,)),
                (b'{"op": "zero", "op": "flush", "size": 1}', (400,)),
                (b'{"op": "zero", "size": 1, "x": "\xff\xfe"}', (400,)),
                (b"\xef\xbb\xbf{}", (400,)),
                (b"", (400,)),
            ]
            for body, statuses in cases:
                started = time.monotonic()
                r = self.sendPatch(body)
                self.assertIn(r.status, statuses, (body[:20], r.text))
                self.assertLess(time.monotonic() - started, 2)
            self.assertEqual(readFile(self.image), self.original)

        await deferToThread(scenario)

    async def test_readOnlyTicket(self) -> None:
        """
        Zero, flush and PUT with a read-only ticket get 403 and close the
        connection; nothing changes.
        """

        def scenario() -> None:
            for body in [b'{"op": "zero", "size": 10}', b'{"op": "flush"}']:
                r = self.sendPatch(body, self.readOnly)
                self.assertEqual(r.status, 403)
                self.assertIn("forbids write", r.text)
                self.assertTrue(r.closes)
            r, closed = exchange(
                self.daemon, rawRequest("PUT", f"/images/{self.readOnly}", body=b"x" * 10)
            )
            self.assertEqual(r.status, 403)
            self.assertTrue(closed)
            self.assertEqual(readFile(self.image), self.original)

        await deferToThread(scenario)


class ControlTests(DaemonTestCase):
    """
    Checklist D: the control socket.
    """

    def setUp(self) -> None:
        self.daemon = self.startDaemon()
        self.image = self.makeImage(self.daemon, T)
        self.url = f"file://{self.image}"

    def valid(self, **changes: object) -> dict[str, object]:
        body = ticketBody("ctl-ticket", self.url, T)
        body.update(changes)
        return body

    async def test_malformedBodies(self) -> None:
        """
        Malformed JSON and non-object JSON get 400; a 10 MB body gets 413
        before it is read; nothing is added.
        """

        def scenario() -> None:
            addresses = self.daemon.addresses
            for raw in [b"{", b"[]", b'"ticket"', b"null", b"\xff", b'{"uuid": NaN}', b""]:
                r = control(addresses, "PUT", "/tickets/x", raw=raw)
                self.assertEqual(r.status, 400, raw)
            with connect(addresses, "control") as conn:
                conn.send(rawRequest("PUT", "/tickets/x", [("Content-Length", str(10 * 10**6))]))
                r = conn.response(timeout=5)
                self.assertEqual(r.status, 413)
                self.assertTrue(conn.waitClosed(2))
            self.assertEqual(len(self.daemon.registry), 0)

        await deferToThread(scenario)

    async def test_invalidTicketFields(self) -> None:
        """
        Every invalid field gets 400 naming the field, and leaves no ticket
        behind.
        """
        bad: list[dict[str, object]] = [
            self.valid(size=-1),
            self.valid(size=True),
            self.valid(size=1.5),
            self.valid(size=2**63),
            self.valid(size="1"),
            self.valid(timeout=-1),
            self.valid(timeout=10**18),
            self.valid(timeout=True),
            self.valid(ops=["write", "exec"]),
            self.valid(ops=[]),
            self.valid(ops="read"),
            self.valid(url="foo:///x"),
            self.valid(url="file:relative/path"),
            self.valid(url="file://host/path"),
            self.valid(url="nbd:unix:"),
            self.valid(url="nbd:unix:relative.sock"),
            self.valid(url="file:///a\r\nb"),
            self.valid(uuid=""),
            self.valid(uuid="x" * 10 * 1024),
            self.valid(uuid="a/b"),
            self.valid(uuid=".."),
            self.valid(uuid="a%2fb"),
            self.valid(uuid="a b"),
            self.valid(filename='a"b'),
            self.valid(filename="a;b"),
            self.valid(filename="a\r\nSet-Cookie: x"),
            self.valid(filename="../etc/passwd"),
            self.valid(inactivity_timeout=0),
            self.valid(sparse="yes"),
            self.valid(transfer_id="a\nb"),
        ]
        for field in ["uuid", "size", "ops", "timeout", "url"]:
            body = self.valid()
            del body[field]
            bad.append(body)

        def scenario() -> None:
            for body in bad:
                r = control(self.daemon.addresses, "PUT", "/tickets/x", body)
                self.assertEqual(r.status, 400, (body, r.text))
                self.assertTrue(r.text.startswith("Invalid ticket"), r.text)
                uuid = body.get("uuid")
                if isinstance(uuid, str) and uuid:
                    r = control(self.daemon.addresses, "GET", f"/tickets/{uuid[:200]}")
                    self.assertIn(r.status, (400, 404))
            self.assertEqual(len(self.daemon.registry), 0)

        await deferToThread(scenario)

    async def test_zeroSizeAndTimeout(self) -> None:
        """
        Size 0 and timeout 0 are valid, as upstream: a size 0 ticket serves
        an empty image, a timeout 0 ticket is expired until extended.
        """

        def scenario() -> None:
            addresses = self.daemon.addresses
            empty = self.makeImage(self.daemon, 0, name="empty")
            body = ticketBody("empty", f"file://{empty}", 0)
            self.assertEqual(control(addresses, "PUT", "/tickets/empty", body).status, 200)
            r, _ = exchange(self.daemon, rawRequest("GET", "/images/empty"))
            self.assertEqual((r.status, r.body), (200, b""))
            body = self.valid(uuid="expired", timeout=0)
            self.assertEqual(control(addresses, "PUT", "/tickets/expired", body).status, 200)
            r, _ = exchange(self.daemon, rawRequest("GET", "/images/expired"))
            self.assertEqual(r.status, 403)
            self.assertIn("expired", r.text)
            patch = {"timeout": 60}
            self.assertEqual(control(addresses, "PATCH", "/tickets/expired", patch).status, 200)
            r, _ = exchange(
                self.daemon, rawRequest("GET", "/images/expired", [("Range", "bytes=0-0")])
            )
            self.assertEqual(r.status, 206)

        await deferToThread(scenario)

    async def test_replaceAndUnknown(self) -> None:
        """
        Adding a ticket id again replaces it (the new size applies at once);
        extending an unknown id is 404 and deleting one is 204.
        """

        def scenario() -> None:
            addresses = self.daemon.addresses
            self.assertEqual(
                control(addresses, "PUT", "/tickets/t", self.valid(uuid="t")).status, 200
            )
            r = control(addresses, "PUT", "/tickets/t", self.valid(uuid="t", size=10))
            self.assertEqual(r.status, 200)
            self.assertEqual(control(addresses, "GET", "/tickets/t").json()["size"], 10)
            r, _ = exchange(self.daemon, rangeRequest("t", "bytes=10-10"))
            self.assertEqual(r.status, 416)
            self.assertEqual(
                control(addresses, "PATCH", "/tickets/nope", {"timeout": 5}).status, 404
            )
            self.assertEqual(control(addresses, "DELETE", "/tickets/nope").status, 204)
            self.assertEqual(len(self.daemon.registry), 1)

        await deferToThread(scenario)

    async def test_deleteDuringWriters(self) -> None:
        """
        DELETE while 8 connections are uploading returns 204 well within
        C{remove_timeout}: every upload is cut, none succeeds, and new
        requests get 403.
        """
        ticket = self.addTicket(self.daemon, self.image, T, ops=["write"])
        part = T // 8

        def writer(i: int) -> object:
            conn = connect(self.daemon.addresses)
            headers = [
                ("Content-Range", f"bytes {i * part}-{(i + 1) * part - 1}/*"),
                ("Content-Length", str(part)),
            ]
            conn.send(rawRequest("PUT", f"/images/{ticket}", headers, b"w" * 1000))
            return conn

        def scenario() -> None:
            conns = parallel(*[lambda i=i: writer(i) for i in range(8)])
            self.assertTrue(
                waitFor(
                    lambda: control(self.daemon.addresses, "GET", f"/tickets/{ticket}").json()[
                        "active"
                    ],
                    5,
                )
            )
            started = time.monotonic()
            r = control(self.daemon.addresses, "DELETE", f"/tickets/{ticket}")
            self.assertEqual(r.status, 204)
            self.assertLess(time.monotonic() - started, 1.5)
            for conn in conns:
                with conn:
                    try:
                        conn.send(b"w" * 1000)
                        response: Response | None = conn.response(timeout=5)
                    except (OSError, Exception):
                        response = None
                    if response is not None:
                        self.assertEqual(response.status, 403)
                    self.assertTrue(conn.waitClosed(2))
            r, _ = exchange(self.daemon, rawRequest("GET", f"/images/{ticket}"))
            self.assertEqual(r.status, 403)

        await deferToThread(scenario)

    async def test_addDeleteChurn(self) -> None:
        """
        Thousands of add and delete requests, one connection each as vdsm
        makes them, leave no ticket, file descriptor or memory behind.
        """

        def scenario() -> None:
            addresses = self.daemon.addresses
            for i in range(50):
                control(addresses, "PUT", "/tickets/c", self.valid(uuid=f"c{i}"))
                control(addresses, "DELETE", f"/tickets/c{i}")
            fds, memory = fdCount(), rss()
            started = time.monotonic()
            for i in range(1000):
                self.assertEqual(
                    control(addresses, "PUT", "/tickets/c", self.valid(uuid=f"c{i}")).status, 200
                )
                self.assertEqual(control(addresses, "DELETE", f"/tickets/c{i}").status, 204)
            elapsed = time.monotonic() - started
            self.waitForFds(fds)
            self.assertLess(rss() - memory, 8 * MiB)
            self.assertEqual(len(self.daemon.registry), 0)
            self.assertLess(elapsed, 30)

        await deferToThread(scenario)

    def test_controlSocketMode(self) -> None:
        """
        The control socket is a socket file of mode 0660 owned by the
        daemon's user.
        """
        st_ = os.stat(self.daemon.addresses.control)
        self.assertTrue(stat.S_ISSOCK(st_.st_mode))
        self.assertEqual(stat.S_IMODE(st_.st_mode), 0o660)
        self.assertEqual(st_.st_uid, os.geteuid())

    async def test_controlNotOnDataListeners(self) -> None:
        """
        No path trick reaches the control API through the remote or local
        listeners: tickets can be neither read, added nor deleted there.
        """
        existing = self.addTicket(self.daemon, self.image, T)
        paths = [
            "/tickets/{id}",
            "/tickets/",
            "/images/../tickets/{id}",
            "/images/%2e%2e/tickets/{id}",
            "/images/%2E%2E%2Ftickets%2F{id}",
            "//tickets/{id}",
            "/%74ickets/{id}",
            "/./tickets/{id}",
            "/images/..;/tickets/{id}",
            "http://localhost/tickets/{id}",
            "/metrics",
        ]

        def scenario() -> None:
            for listener in ["local", "remote"]:
                for template in paths:
                    path = template.format(id=existing)
                    for method, body in [("GET", b""), ("DELETE", b""), ("PUT", b"{}")]:
                        if method == "PUT":
                            body = jsonBytes(self.valid(uuid="injected"))
                        with connect(self.daemon.addresses, listener) as conn:
                            sendRaw(conn, rawRequest(method, path, [("Connection", "close")], body))
                            r = conn.response(timeout=5)
                        self.assertIn(r.status, (400, 403, 404, 405), (listener, method, path))
                        self.assertNotIn('"uuid"', r.text)
            self.assertIsNone(self.daemon.registry.lookup("injected"))
            self.assertIsNotNone(self.daemon.registry.lookup(existing))

        await deferToThread(scenario)


def jsonBytes(obj: object) -> bytes:
    return json.dumps(obj).encode()


def rss() -> int:
    """
    @return: This process's resident set size, in bytes.
    """
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class TicketLifetimeTests(DaemonTestCase):
    """
    Checklist E: expiry, cancellation and what clients can learn.
    """

    def setUp(self) -> None:
        self.daemon = self.startDaemon()
        self.data = pattern(T, b"life")
        self.image = self.makeImage(self.daemon, T, self.data)

    async def test_readdThenDeleteStopsUpload(self) -> None:
        """
        Issue 10 item 6: the ticket added again (same body, as an agent
        retrying) while an upload runs, then DELETE: the DELETE stops the
        upload before answering, and not one more byte lands after it.
        """
        image = self.makeImage(self.daemon, T)
        body = ticketBody("readd", f"file://{image}", T, ["write"])

        def scenario() -> None:
            added = control(self.daemon.addresses, "PUT", "/tickets/readd", body)
            self.assertEqual(added.status, 200)
            with connect(self.daemon.addresses) as conn:
                headers = [("Content-Length", str(T))]
                conn.send(rawRequest("PUT", "/images/readd", headers, b"A" * 1000))
                self.assertTrue(
                    waitFor(
                        lambda: control(self.daemon.addresses, "GET", "/tickets/readd").json()[
                            "active"
                        ],
                        5,
                    )
                )
                again = control(self.daemon.addresses, "PUT", "/tickets/readd", body)
                self.assertEqual(again.status, 200)
                r = control(self.daemon.addresses, "DELETE", "/tickets/readd")
                self.assertEqual(r.status, 204)
                after = image.read_bytes()
                try:
                    for _ in range(20):
                        conn.send(b"B" * 65536)
                except OSError:
                    pass
                self.assertTrue(conn.waitClosed(5))
            self.assertEqual(set(image.read_bytes()) - {0, ord("A")}, set())
            self.assertEqual(image.read_bytes(), after)
            self.assertEqual(control(self.daemon.addresses, "GET", "/tickets/readd").status, 404)

        await deferToThread(scenario)

    async def test_cancelWithTransfersAndIdleConnections(self) -> None:
        """
        DELETE cancels a running download, upload and zero at once and
        returns within the deadline; idle keep-alive connections and new
        connections get 403 on their next request.
        """
        big = 64 * 1024**3
        sparse = self.makeImage(self.daemon, big, name="sparse")
        ticket = self.addTicket(self.daemon, sparse, big, inactivity_timeout=10, sparse=True)

        def scenario() -> None:
            addresses = self.daemon.addresses
            download = connect(addresses)
            download.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            download.send(rawRequest("GET", f"/images/{ticket}"))
            head = download.readBody(1)
            self.assertTrue(head)
            upload = connect(addresses)
            upload.send(
                rawRequest("PUT", f"/images/{ticket}", [("Content-Length", str(MiB))], b"u" * 100)
            )
            idle = connect(addresses)
            idle.send(rawRequest("GET", f"/images/{ticket}", [("Range", "bytes=0-0")]))
            self.assertEqual(idle.response().status, 206)
            zero = connect(addresses)
            zero.send(
                rawRequest(
                    "PATCH",
                    f"/images/{ticket}",
                    body=jsonBytes({"op": "zero", "size": big}),
                )
            )
            self.assertTrue(
                waitFor(lambda: len(self.daemon.registry.lookup(ticket)._running) >= 2, 5)
            )
            started = time.monotonic()
            r = control(addresses, "DELETE", f"/tickets/{ticket}")
            elapsed = time.monotonic() - started
            self.assertEqual(r.status, 204)
            self.assertLess(elapsed, 1.5)
            for conn in (download, upload):
                self.assertTrue(conn.waitClosed(3))
                conn.close()
            try:
                zeroResponse: int | None = zero.response(timeout=5).status
            except Exception:
                zeroResponse = None
            self.assertIn(zeroResponse, (None, 200, 403))
            zero.close()
            idle.send(rawRequest("GET", f"/images/{ticket}", [("Range", "bytes=0-0")]))
            r = idle.response()
            self.assertEqual(r.status, 403)
            idle.close()
            r, _ = exchange(self.daemon, rawRequest("GET", f"/images/{ticket}"))
            self.assertEqual(r.status, 403)

        await deferToThread(scenario)

    async def test_canceledUploadLetsTicketGo(self) -> None:
        """
        After DELETE cancels an upload whose client still had body to send,
        the operation ends: DELETE returns 204 at once and the ticket is
        gone, rather than staying active with every DELETE answering 409.
        """
        ticket = self.addTicket(self.daemon, self.image, T, ops=["write"])

        def scenario() -> None:
            with connect(self.daemon.addresses) as conn:
                conn.send(
                    rawRequest("PUT", f"/images/{ticket}", [("Content-Length", str(MiB))], b"u")
                )
                self.assertTrue(waitFor(lambda: self.daemon.registry.lookup(ticket).active, 5))
                started = time.monotonic()
                r = control(self.daemon.addresses, "DELETE", f"/tickets/{ticket}")
                self.assertEqual(r.status, 204, r.text)
                self.assertLess(time.monotonic() - started, 1)
                self.assertEqual(conn.response(timeout=5).status, 403)
                self.assertTrue(conn.waitClosed(2))
            r = control(self.daemon.addresses, "GET", f"/tickets/{ticket}")
            self.assertEqual(r.status, 404)

        await deferToThread(scenario)

    async def test_cancelIsNotAnError(self) -> None:
        """
        Canceling a ticket during a download is a normal event: nothing is
        logged as an error.
        """
        big = 64 * 1024**3
        sparse = self.makeImage(self.daemon, big, name="sparse")
        ticket = self.addTicket(self.daemon, sparse, big, ops=["read"])

        def scenario() -> None:
            with connect(self.daemon.addresses) as conn:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                conn.send(rawRequest("GET", f"/images/{ticket}"))
                conn.readBody(1)
                self.assertEqual(
                    control(self.daemon.addresses, "DELETE", f"/tickets/{ticket}").status, 204
                )
                self.assertTrue(conn.waitClosed(3))

        await deferToThread(scenario)
        errors = self.flushLoggedErrors()
        self.assertEqual([e.getErrorMessage() for e in errors], [])

    async def test_noEnumerationOracle(self) -> None:
        """
        Unknown, expired and canceled tickets all get 403 with the
        connection closed, in about the same time.
        """
        expired = self.addTicket(self.daemon, self.image, T, timeout=0)
        canceled = self.addTicket(self.daemon, self.image, T)
        self.daemon.registry.lookup(canceled).canceled = True

        def scenario() -> None:
            timings: dict[str, list[float]] = {}
            for _ in range(30):
                for name, ticket in [
                    ("unknown", "0b9d4c8e-unknown"),
                    ("expired", expired),
                    ("canceled", canceled),
                ]:
                    with connect(self.daemon.addresses) as conn:
                        started = time.perf_counter()
                        conn.send(rawRequest("GET", f"/images/{ticket}"))
                        r = conn.response()
                        timings.setdefault(name, []).append(time.perf_counter() - started)
                        self.assertEqual(r.status, 403)
                        self.assertTrue(r.closes)
            medians = {name: statistics.median(t) for name, t in timings.items()}
            self.assertLess(max(medians.values()) - min(medians.values()), 0.005, medians)

        await deferToThread(scenario)

    async def test_ticketIdsNotLoggedAtInfo(self) -> None:
        """
        No log event at INFO or above shows a whole ticket id, through a
        ticket's whole life: add, use, extend, delete.
        """
        events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        secret = "5ecre7-1d-0f-a-t1cket-4-logs"

        def scenario() -> None:
            addresses = self.daemon.addresses
            body = ticketBody(secret, f"file://{self.image}", T)
            self.assertEqual(control(addresses, "PUT", f"/tickets/{secret}", body).status, 200)
            exchange(self.daemon, rawRequest("GET", f"/images/{secret}", [("Range", "bytes=0-9")]))
            exchange(self.daemon, rawRequest("PUT", f"/images/{secret}", body=b"x" * 10))
            exchange(self.daemon, rawRequest("OPTIONS", f"/images/{secret}"))
            control(addresses, "GET", f"/tickets/{secret}")
            control(addresses, "PATCH", f"/tickets/{secret}", {"timeout": 30})
            control(addresses, "DELETE", f"/tickets/{secret}")
            exchange(self.daemon, rawRequest("GET", f"/images/{secret}"))

        await deferToThread(scenario)
        shown = [
            formatEvent(e)
            for e in events
            if e.get("log_level", LogLevel.info) >= LogLevel.info
            and secret in (formatEvent(e) + repr(e.get("log_failure", "")))
        ]
        self.assertEqual(shown, [])
        self.assertTrue(events)

    async def test_wallClockJump(self) -> None:
        """
        Moving the wall clock a day forward or back does not expire or
        extend tickets: expiry runs on the monotonic clock.
        """
        ticket = self.addTicket(self.daemon, self.image, T, timeout=30)
        real = time.time
        self.addCleanup(setattr, time, "time", real)

        def scenario() -> None:
            for jump in (86400, -86400):
                time.time = lambda jump=jump: real() + jump  # type: ignore[misc]
                r, _ = exchange(
                    self.daemon, rawRequest("GET", f"/images/{ticket}", [("Range", "bytes=0-0")])
                )
                self.assertEqual(r.status, 206)
                info = control(self.daemon.addresses, "GET", f"/tickets/{ticket}").json()
                self.assertLessEqual(info["expires"], time.monotonic() + 31)
            time.time = real  # type: ignore[misc]

        await deferToThread(scenario)


class TransferredPropertyTests(SynchronousTestCase):
    """
    The ticket's C{transferred} under random interleavings of operations,
    against a naive model: a byte counts once it was covered by a completed
    (not canceled) operation or by the progress of a running one.
    """

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["start", "progress", "finish", "cancel"]),
                st.integers(0, 7),
                st.integers(0, 200),
                st.integers(0, 64),
            ),
            max_size=60,
        )
    )
    def test_transferredMatchesModel(self, steps: list[tuple[str, int, int, int]]) -> None:
        """
        C{transferred} is the size of the union of completed and running
        ranges, whatever the order of start, progress, cancel and finish.
        """
        ticket = parseTicket(
            ticketBody("prop", "file:///prop", 1000, ["read"]), now=0, defaultInactivityTimeout=60
        )
        ops: dict[int, Operation] = {}
        lengths: dict[int, int] = {}
        completed: set[int] = set()
        for kind, slot, offset, length in steps:
            op = ops.get(slot)
            if kind == "start" and op is None:
                ops[slot] = op = Operation("read", offset)
                lengths[slot] = length
                ticket.startOperation(op)
            elif op is None:
                continue
            elif kind == "progress":
                op.done = min(lengths[slot], op.done + 1 + length // 4)
            elif kind == "cancel":
                op.cancel()
            elif kind == "finish":
                ticket.finishOperation(op, now=1)
                if not op.canceled:
                    completed.update(range(op.offset, op.offset + op.done))
                del ops[slot]
            running: set[int] = set(completed)
            for live in ops.values():
                running.update(range(live.offset, live.offset + live.done))
            self.assertEqual(ticket.transferred(), len(running))
            expected = RangeSet()
            for byte in completed:
                expected.add(byte, byte + 1)
            self.assertEqual(ticket._completed.ranges(), expected.ranges())
