# -*- test-case-name: tests.test_leanrequest -*-
"""
The lean per-request path of L{imageio.web} (issue 12, decision 3): where
L{StreamingRequest} and the channel replace a piece of twisted.web with a
cheaper one, the result is the same as Twisted's.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http, server
from twisted.web.resource import Resource

from imageio.web import ImageioSite
from imageio.web._request import StreamingRequest
from imageio.web._twisted_http import HTTPChannelSeam


class Quiet(Resource):
    """
    Answers nothing: the test answers the request itself.
    """

    isLeaf = True

    def render(self, request: Any) -> Any:
        return server.NOT_DONE_YET


def request(head: bytes = b"GET /x HTTP/1.1\r\n\r\n") -> tuple[Any, StringTransport]:
    """
    @return: The request an images site made from C{head}, and the
        transport of its connection.
    """
    site = ImageioSite(Quiet(), "test", reactor=Clock())
    channel: Any = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(head)
    [made] = channel.requests
    return made, transport


class WriteFirstTests(SynchronousTestCase):
    """
    The first write of a response is what Twisted's C{write} makes of it,
    whether L{writeFirst} takes it or leaves it to Twisted.
    """

    def check(self, head: bytes, prepare: Any, data: bytes = b"body") -> tuple[bytes, bytes]:
        outputs = []
        states = []
        for twisted in (False, True):
            req, transport = request(head)
            prepare(req)
            if twisted:
                server.Request.write(req, data)
            else:
                req.write(data)
            req.write(b"more")
            req.finish()
            outputs.append(transport.value())
            states.append((req.startedWriting, req.sentLength, req.chunked, req.finished))
        self.assertEqual(outputs[0], outputs[1])
        self.assertEqual(states[0], states[1])
        return outputs[0], outputs[1]

    def test_sameBytes(self) -> None:
        """
        Sized and unsized responses, HEAD, responses without a body, cookies,
        ETag and Last-Modified, HTTP/1.0: the same bytes either way.
        """

        def sized(req: Any) -> None:
            req.setHeader(b"content-length", b"8")
            req.setHeader(b"content-type", b"application/octet-stream")

        def unsized(req: Any) -> None:
            req.setHeader(b"content-type", b"text/plain")

        def untyped(req: Any) -> None:
            req.setHeader(b"content-length", b"8")

        def noContent(req: Any) -> None:
            sized(req)
            req.setResponseCode(204)

        def extras(req: Any) -> None:
            sized(req)
            req.addCookie(b"a", b"b")
            req.setETag(b"x")
            req.setLastModified(1000000000)

        get = b"GET /x HTTP/1.1\r\n\r\n"
        for head, prepare in [
            (get, sized),
            (get, unsized),
            (get, untyped),
            (get, noContent),
            (get, extras),
            (b"HEAD /x HTTP/1.1\r\n\r\n", sized),
            (b"GET /x HTTP/1.0\r\n\r\n", sized),
            (b"GET /x HTTP/1.0\r\n\r\n", unsized),
        ]:
            self.check(head, prepare)

    def test_sizedWrittenAtOnce(self) -> None:
        """
        A sized response's head and first bytes are one write, as before.
        """
        req, transport = request()
        req.setHeader(b"content-length", b"4")
        req.setHeader(b"content-type", b"application/octet-stream")
        req.write(b"body")
        self.assertTrue(transport.value().endswith(b"\r\n\r\nbody"))
        self.assertEqual(req.sentLength, 4)


class PersistenceTests(SynchronousTestCase):
    """
    C{checkPersistence}, cookies and C{Expect} as Twisted's channel does
    them.
    """

    def test_sameAsTwisted(self) -> None:
        """
        Connection tokens, versions, cookies and 100-continue: the same
        persistence, response headers and cookies as Twisted's channel.
        """
        heads = [
            b"GET / HTTP/1.1\r\n",
            b"GET / HTTP/1.0\r\n",
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n",
            b"GET / HTTP/1.1\r\nConnection: close\r\n",
            b"GET / HTTP/1.1\r\nConnection: Keep-Alive CLOSE\r\n",
            b"GET / HTTP/1.1\r\nConnection: keep-alive\r\nConnection: close\r\n",
            b"GET / HTTP/1.1\r\nConnection: closed\r\n",
            b"GET / HTTP/1.1\r\nCookie: a=b; c=d\r\nCookie: e=f\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nExpect: 100-Continue\r\n",
            b"PUT / HTTP/1.0\r\nContent-Length: 1\r\nExpect: 100-continue\r\n",
            # None of Cookie, Connection, Expect: the seam's shortcut.
            b"GET /images/t HTTP/1.1\r\nHost: x\r\nRange: bytes=0-4095\r\n",
            b"GET /images/t HTTP/1.0\r\nHost: x\r\nRange: bytes=0-4095\r\n",
            b"GET / HTTP/1.1\r\nExpect: 100-continue\r\n",
            b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nExpected: 100-continue\r\n",
        ]
        for head in heads:
            results = []
            for cls in (HTTPChannelSeam, http.HTTPChannel):
                channel: Any = cls()
                channel.requestFactory = _Request
                channel.callLater = Clock().callLater
                transport = StringTransport()
                channel.makeConnection(transport)
                channel.dataReceived(head + b"\r\n")
                [req] = channel.requests
                results.append(
                    (
                        channel.persistent,
                        list(req.responseHeaders.getAllRawHeaders()),
                        req.received_cookies,
                        transport.value(),
                    )
                )
            self.assertEqual(results[0], results[1], head)


class _Request(http.Request):
    def process(self) -> None:
        pass


class RequestReceivedTests(SynchronousTestCase):
    """
    L{StreamingRequest.requestReceived} sets what Twisted's does.
    """

    def test_pathAndArgs(self) -> None:
        """
        Method, target, version, path and query arguments.
        """
        req, _ = request(b"GET /images/x?a=1&a=2&b=&c HTTP/1.1\r\n\r\n")
        self.assertIsInstance(req, StreamingRequest)
        self.assertEqual(
            (req.method, req.uri, req.clientproto, req.path, req.args),
            (
                b"GET",
                b"/images/x?a=1&a=2&b=&c",
                b"HTTP/1.1",
                b"/images/x",
                http.parse_qs(b"a=1&a=2&b=&c", 1),
            ),
        )
        req, _ = request(b"GET /images/%41b HTTP/1.1\r\n\r\n")
        self.assertEqual(
            (req.path, req.args, req.prepath, req.postpath),
            (b"/images/%41b", {}, [], [b"images", b"Ab"]),
        )

    def test_formNotParsed(self) -> None:
        """
        A form posted to the images site is not parsed into C{args}: the
        body went to the request's sink (it never reaches C{content}).
        """
        body = b"a=1"
        req, _ = request(
            b"POST /x HTTP/1.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.assertEqual(req.args, {})
        self.assertEqual(req.bodySink.data, body)

    def test_addressesOncePerConnection(self) -> None:
        """
        The connection's addresses are asked of the transport once.
        """
        req, _ = request()
        self.assertIs(req.channel.getPeer(), req.client)
        self.assertIs(req.channel.getHost(), req.host)


class IdleTimerTests(SynchronousTestCase):
    """
    The channel's idle timeout keeps one timer across requests, with
    Twisted's timeouts: none while a request is answered, the full period
    from the last byte or the last answer otherwise.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        site = ImageioSite(Quiet(), "test", reactor=self.clock, timeout=10)
        self.channel: Any = site.buildProtocol(None)
        self.transport = StringTransport()
        self.channel.makeConnection(self.transport)

    def test_oneTimer(self) -> None:
        """
        Answering requests pushes the one timer back instead of making new
        ones; the connection times out 10 s after the last answer.
        """
        [idle] = self.clock.getDelayedCalls()
        for _ in range(3):
            self.channel.dataReceived(b"GET /x HTTP/1.1\r\n\r\n")
            self.clock.advance(1)
            self.channel.requests[-1].finish()
            self.assertEqual(self.clock.getDelayedCalls(), [idle])
            self.clock.advance(5)
        # Long answers are not cut.
        self.channel.dataReceived(b"GET /x HTTP/1.1\r\n\r\n")
        self.clock.advance(25)
        self.assertFalse(self.transport.disconnecting)
        self.channel.requests[-1].finish()
        self.clock.advance(9.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(self.transport.disconnecting)

    def test_bytesPushBack(self) -> None:
        """
        Bytes received restart the period.
        """
        self.channel.dataReceived(b"PUT /x HTTP/1.1\r\nContent-Length: 9\r\n\r\na")
        self.clock.advance(9)
        self.channel.dataReceived(b"b")
        self.clock.advance(9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(self.transport.disconnecting)

    def test_noTimerLeft(self) -> None:
        """
        A closed connection leaves no idle timer, also while a request was
        being answered.
        """
        self.channel.dataReceived(b"GET /x HTTP/1.1\r\n\r\n")
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])
