# -*- test-case-name: tests.test_head -*-
"""
Tests for L{imageio.web._head}: request heads that arrived whole are
parsed in one pass, and answered exactly as Twisted's line parser answers
them; anything unusual is left to Twisted's parser.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.resource import Resource

from imageio.web import ImageioChannel, ImageioSite
from imageio.web._head import MAX_HEAD, canonicalName, parseHead


class Echo(Resource):
    """
    Answers every request with what the server parsed: method, target,
    version, headers (in order) and body; requests to C{/later} are
    answered when the test says.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.later: list[Any] = []

    def render(self, request: Any) -> Any:
        lines = [request.method, request.uri, request.clientproto]
        for name, values in request.requestHeaders.getAllRawHeaders():
            for value in values:
                lines.append(name + b"=" + value)
        sink = getattr(request, "bodySink", None)
        body = getattr(sink, "data", None)
        lines.append(b"body=" + (bytes(body) if body is not None else b""))
        answer = b"\n".join(lines)
        request.setHeader(b"content-length", b"%d" % len(answer))
        if request.uri == b"/later":
            self.later.append((request, answer))
            return server.NOT_DONE_YET
        return answer


class TwistedParserChannel(ImageioChannel):
    """
    The channel with every head left to Twisted's line parser.
    """

    def headReady(self) -> bool:
        return False


def exchange(
    chunks: list[bytes], channelClass: type[ImageioChannel] = ImageioChannel
) -> tuple[bytes, bool, list[Any]]:
    """
    Send C{chunks} (each one C{dataReceived}), answer delayed requests in
    order, then again send nothing more.

    @return: What the server wrote (the C{Date} values blanked), whether it
        closed, and the requests it made.
    """
    clock = Clock()
    echo = Echo()
    site = ImageioSite(echo, "test", reactor=clock)
    site.protocol = channelClass  # type: ignore[assignment]
    channel: Any = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    made: list[Any] = []
    factory = channel.requestFactory

    def record(*args: Any) -> Any:
        request = factory(*args)
        made.append(request)
        return request

    channel.requestFactory = record
    for chunk in chunks:
        if transport.disconnecting:
            break
        channel.dataReceived(chunk)
        while echo.later:
            request, answer = echo.later.pop(0)
            if not request.finished and not request._disconnected:
                request.write(answer)
                request.finish()
    output = re.sub(rb"(?im)^date: .*$", b"date: -", transport.value())
    return output, bool(transport.disconnecting), made


GET = b"GET /images/x?a=1 HTTP/1.1\r\nHost: localhost\r\nRange: bytes=0-4095\r\n\r\n"

#: Requests that both parsers must answer alike: name -> chunks.
CASES: dict[str, list[bytes]] = {
    "get": [GET],
    "two gets": [GET, GET],
    "pipelined": [GET + GET + GET],
    "pipelined, last split": [GET + GET[:20], GET[20:]],
    "split head": [GET[:30], GET[30:]],
    "split request line": [GET[:5], GET[5:]],
    "byte by byte": [GET[i : i + 1] for i in range(len(GET))],
    "head ends split": [GET[:-2], GET[-2:]],
    "lower-case names": [b"GET / HTTP/1.1\r\nhost: x\r\nrange: bytes=0-1\r\nx-a-b: c\r\n\r\n"],
    "special capitalization": [
        b"GET / HTTP/1.1\r\nwww-authenticate: x\r\nETAG: y\r\ndnt: 1\r\n\r\n"
    ],
    "repeated header": [b"GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\na: 3\r\n\r\n"],
    "empty value": [b"GET / HTTP/1.1\r\nA:\r\nB: \t \r\n\r\n"],
    "whitespace around value": [b"GET / HTTP/1.1\r\nA: \t x y \t\r\n\r\n"],
    "colon in value": [b"GET / HTTP/1.1\r\nA: b:c: d\r\n\r\n"],
    "no headers": [b"GET / HTTP/1.1\r\n\r\n"],
    "http/1.0": [b"GET / HTTP/1.0\r\nHost: x\r\n\r\n" + GET],
    "http/1.0 keep-alive": [b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" + GET],
    "connection close": [b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n" + GET],
    "connection close, later": [b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n", GET],
    "head method": [b"HEAD /images/x HTTP/1.1\r\n\r\n"],
    "options": [b"OPTIONS /images/x HTTP/1.1\r\n\r\n"],
    "options star": [b"OPTIONS * HTTP/1.1\r\n\r\n"],
    "delete": [b"DELETE /x HTTP/1.1\r\n\r\n"],
    "unknown method": [b"MKCOL / HTTP/1.1\r\n\r\n"],
    "lower-case method": [b"get / HTTP/1.1\r\n\r\n"],
    "bad method": [b"G(T / HTTP/1.1\r\n\r\n"],
    "bad version": [b"GET / HTTP/2.0\r\n\r\n"],
    "lower-case version": [b"GET / http/1.1\r\n\r\n"],
    "two spaces": [b"GET  / HTTP/1.1\r\n\r\n"],
    "no version": [b"GET /\r\n\r\n"],
    "control in target": [b"GET /a\x7fb HTTP/1.1\r\n\r\n"],
    "high byte in target": [b"GET /a\xc3\xa9 HTTP/1.1\r\n\r\n"],
    "nul in value": [b"GET / HTTP/1.1\r\nA: b\x00c\r\n\r\n"],
    "bare lf in value": [b"GET / HTTP/1.1\r\nA: b\nc\r\n\r\n"],
    "bare cr in value": [b"GET / HTTP/1.1\r\nA: b\rc\r\n\r\n"],
    "bare lf line ends": [b"GET / HTTP/1.1\nA: b\n\n" + GET],
    "no colon": [b"GET / HTTP/1.1\r\nA b\r\n\r\n"],
    "space before colon": [b"GET / HTTP/1.1\r\nA : b\r\n\r\n"],
    "empty name": [b"GET / HTTP/1.1\r\n: b\r\n\r\n"],
    "obs-fold": [b"GET / HTTP/1.1\r\nA: b\r\n c\r\n\td\r\n\r\n"],
    "leading empty line": [b"\r\n" + GET],
    "two leading empty lines": [b"\r\n\r\n" + GET],
    "long target": [b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n"],
    "target at the limit": [b"GET /" + b"a" * 4081 + b" HTTP/1.1\r\n\r\n"],
    "head just over MAX_HEAD": [
        b"GET / HTTP/1.1\r\nA: " + b"a" * (MAX_HEAD - 19) + b"\r\n\r\n" + GET
    ],
    "many headers": [b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 600 + b"\r\n"],
    "headers over 16 KiB": [
        b"GET / HTTP/1.1\r\n" + (b"A: " + b"b" * 1000 + b"\r\n") * 17 + b"\r\n"
    ],
    "content-length body": [b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc" + GET],
    "content-length zero": [b"DELETE /x HTTP/1.1\r\ncontent-length: 0\r\n\r\n" + GET],
    "duplicate content-length": [
        b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc" + GET
    ],
    "bad content-length": [b"PUT /x HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc" + GET],
    "content-length and chunked": [
        b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\n\r\n" + GET
    ],
    "chunked": [
        b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" + GET
    ],
    "bad transfer-encoding": [b"PUT /x HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n"],
    "expect continue": [
        b"PUT /x HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n",
        b"abc" + GET,
    ],
    "expect without body": [b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n" + GET],
    "smuggled request in body": [
        b"PUT /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (len(GET), GET) + GET
    ],
    "request after delayed one": [b"GET /later HTTP/1.1\r\n\r\n" + GET, GET],
    "delayed then pipelined split": [b"GET /later HTTP/1.1\r\n\r\n" + GET[:10], GET[10:]],
}


class SameAnswersTests(SynchronousTestCase):
    """
    The one-pass parser and Twisted's answer every request alike: same
    bytes written, same closing, same requests made with the same method,
    target, version and headers.
    """

    def test_sameAnswers(self) -> None:
        """
        Every case of L{CASES} is answered byte for byte as Twisted's line
        parser answers it.
        """
        for name, chunks in CASES.items():
            ours = exchange(chunks)
            twisted = exchange(chunks, TwistedParserChannel)
            self.assertEqual(ours[:2], twisted[:2], name)
            self.assertEqual(len(ours[2]), len(twisted[2]), name)
            for a, b in zip(ours[2], twisted[2], strict=True):
                self.assertEqual(
                    [getattr(a, n, None) for n in ("method", "uri", "clientproto", "path")],
                    [getattr(b, n, None) for n in ("method", "uri", "clientproto", "path")],
                    name,
                )
                self.assertEqual(a.requestHeaders, b.requestHeaders, name)
                self.assertEqual(
                    list(a.requestHeaders.getAllRawHeaders()),
                    list(b.requestHeaders.getAllRawHeaders()),
                    name,
                )

    def test_answered(self) -> None:
        """
        The cases are answered at all (a test comparing two silences would
        pass whatever the parsers did).
        """
        output, closed, made = exchange(CASES["pipelined"])
        self.assertEqual(output.count(b"HTTP/1.1 200 OK\r\n"), 3)
        self.assertIn(b"\nHost=localhost\nRange=bytes=0-4095\n", output)
        self.assertFalse(closed)
        self.assertEqual(len(made), 3)
        output, closed, _ = exchange(CASES["bad version"])
        self.assertTrue(output.startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertTrue(closed)
        output, closed, _ = exchange(CASES["long target"])
        self.assertTrue(output.startswith(b"HTTP/1.1 414 "))

    def test_wholeHeadsInOnePass(self) -> None:
        """
        Usual heads that arrived whole, pipelined ones too, do not go
        through Twisted's line parser; the others do.
        """
        lines: list[bytes] = []

        class Channel(ImageioChannel):
            def lineReceived(self, line: bytes) -> None:
                lines.append(line)
                super().lineReceived(line)

        exchange(CASES["pipelined"] + CASES["lower-case names"] + CASES["http/1.0"], Channel)
        self.assertEqual(lines, [])
        exchange(CASES["obs-fold"], Channel)
        self.assertEqual(lines[0], b"GET / HTTP/1.1")

    def test_splitHeadTakenWhole(self) -> None:
        """
        A head whose request line was incomplete is taken in one pass once
        the rest arrives (the start Twisted's parser held is taken back).
        """
        lines: list[bytes] = []

        class Channel(ImageioChannel):
            def lineReceived(self, line: bytes) -> None:
                lines.append(line)
                super().lineReceived(line)

        output, _, made = exchange(CASES["split request line"], Channel)
        self.assertEqual((lines, len(made)), ([], 1))
        self.assertIn(b"200 OK", output)

    def test_headDeadlineForSplitHead(self) -> None:
        """
        The head deadline starts for a head that did not arrive whole after
        requests that did, and not otherwise.
        """
        clock = Clock()
        site = ImageioSite(Echo(), "test", reactor=clock, timeout=10)
        channel: Any = site.buildProtocol(None)
        channel.makeConnection(StringTransport())
        idle = len(clock.getDelayedCalls())
        channel.dataReceived(GET + GET)
        self.assertEqual(len(clock.getDelayedCalls()), idle)
        channel.dataReceived(GET + GET[:10])
        self.assertEqual(len(clock.getDelayedCalls()), idle + 1)


class ParseHeadTests(SynchronousTestCase):
    """
    L{parseHead} alone.
    """

    def test_parsed(self) -> None:
        """
        Request line parts, and headers by canonical name in order.
        """
        self.assertEqual(
            parseHead(b"GET /a?b HTTP/1.1\r\nhost: x\r\nRANGE:  bytes=1-2\t\r\nhost: y"),
            (
                b"GET",
                b"/a?b",
                b"HTTP/1.1",
                {b"Host": [b"x", b"y"], b"Range": [b"bytes=1-2"]},
            ),
        )

    def test_leftToTwisted(self) -> None:
        """
        Heads Twisted's parser must take give C{None}.
        """
        for head in [
            b"GET / HTTP/1.1\r\nContent-Length: 0",
            b"GET / HTTP/1.1\r\ntransfer-encoding: chunked",
            b"GET / HTTP/1.1\r\nExpect: 100-continue",
            b"GET / HTTP/1.1\r\nA: b\r\n c",
            b"GET / HTTP/1.1\r\nA b",
            b"GET / HTTP/1.1\r\nA\x00: b",
            b"GET / HTTP/1.1\nA: b",
            b"GET / HTTP/1.1\r\nA: \rb",
            b"GET / HTTP/1.1\r\n" + b"A: b\r\n" * 100 + b"A: b",
            b"GET /" + b"a" * MAX_HEAD + b" HTTP/1.1",
            b"BREW / HTTP/1.1",
            b"GET / HTTP/1.2",
            b"GET  HTTP/1.1",
            b"GET / x HTTP/1.1",
            b"",
        ]:
            self.assertIsNone(parseHead(head), head)

    def test_canonicalName(self) -> None:
        """
        Names are canonical as Twisted makes them; non-tokens are refused.
        """
        self.assertEqual(canonicalName(b"content-md5"), b"Content-MD5")
        self.assertEqual(canonicalName(b"X-FOO"), b"X-Foo")
        self.assertIsNone(canonicalName(b"a b"))
        self.assertIsNone(canonicalName(b""))
