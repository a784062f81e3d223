# -*- test-case-name: tests.test_router -*-
"""
Tests for L{imageio.web._router}: upstream's regex routing, its 404 and 405
texts, error mapping, and the CORS helper.
"""

from __future__ import annotations

import re
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, fail
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request

from imageio.web import ImageioSite
from imageio.web._response import INTERNAL_ERROR, HTTPError, sendJSON
from imageio.web._router import MAX_SMALL_BODY, Router, cors, enumArg, queryArg, requestBody
from tests._http import Connection, parseResponse, request


@define
class Handler:
    """
    Records calls; answers with the groups as JSON.
    """

    calls: list[tuple[str, tuple[str, ...]]] = field(factory=list)
    result: Any = None

    def handleGET(self, req: Request, *groups: str) -> Any:
        self.calls.append(("GET", groups))
        if self.result is not None:
            return self.result(req)
        sendJSON(req, {"groups": list(groups), "method": req.method.decode()})
        return None

    def handlePOST(self, req: Request, *groups: str) -> None:
        self.calls.append(("POST", groups))
        sendJSON(req, {"body": requestBody(req).decode()})


class RouterTests(SynchronousTestCase):
    """
    Dispatch through the real HTTP parser.
    """

    def setUp(self) -> None:
        self.first = Handler()
        self.second = Handler()
        router = Router([(r"^/a/(.*)/x", self.first), (r"^/a/(.*)", self.second)])
        self.site = ImageioSite(router, "test", reactor=MemoryReactorClock())

    def send(self, raw: bytes, head: bool = False) -> Any:
        channel: Any = self.site.buildProtocol(None)
        transport = StringTransport(lenient=True)
        channel.makeConnection(transport)
        conn = Connection(channel, transport)
        conn.send(raw)
        return parseResponse(conn.output(), head=head), conn

    def test_firstMatchWins(self) -> None:
        """
        Routes are tried in order with C{re.match} (a prefix match), and the
        first group is passed on.
        """
        response, _ = self.send(request(b"GET", b"/a/t1/x/more"))
        self.assertEqual(response.body, b'{"groups": ["t1"], "method": "GET"}\n')
        response, _ = self.send(request(b"GET", b"/a/b/c"))
        self.assertEqual(response.body, b'{"groups": ["b/c"], "method": "GET"}\n')
        self.assertEqual(len(self.first.calls) + len(self.second.calls), 2)

    def test_unquoted(self) -> None:
        """
        The path is percent-decoded before matching; the query is not part of
        it.
        """
        response, _ = self.send(request(b"GET", b"/a/%2A%20z?q=1"))
        self.assertEqual(response.body, b'{"groups": ["* z"], "method": "GET"}\n')

    def test_noHandler(self) -> None:
        """
        No route: 404 C{No handler for '<path>'}.
        """
        response, conn = self.send(request(b"GET", b"/b"))
        self.assertEqual((response.status, response.text), (404, "No handler for '/b'\n"))
        self.assertFalse(conn.closed)

    def test_methodNotDefined(self) -> None:
        """
        A handler without the method: 405 with upstream's text.
        """
        response, _ = self.send(request(b"PUT", b"/a/1", body=b"x"))
        self.assertEqual(
            (response.status, response.text), (405, "Method 'PUT' not defined for '/a/1'\n")
        )

    def test_invalidMethod(self) -> None:
        """
        Unknown methods: 405 C{Invalid method 'X'}.
        """
        response, _ = self.send(request(b"BREW", b"/a/1"))
        self.assertEqual((response.status, response.text), (405, "Invalid method 'BREW'\n"))

    def test_headUsesGet(self) -> None:
        """
        HEAD runs the GET handler and sends no body.
        """
        response, _ = self.send(request(b"HEAD", b"/a/1"), head=True)
        self.assertEqual((response.status, response.body), (200, b""))
        self.assertEqual(self.second.calls, [("GET", ("1",))])
        self.assertEqual(response.header(b"content-length"), b"36")

    def test_smallBody(self) -> None:
        """
        Handlers that do not stream get small bodies from memory.
        """
        response, _ = self.send(request(b"POST", b"/a/1", body=b"hello"))
        self.assertEqual(response.body, b'{"body": "hello"}\n')

    def test_bodyTooLarge(self) -> None:
        """
        Bodies over the in-memory limit are 413 before they are read.
        """
        raw = b"POST /a/1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (MAX_SMALL_BODY + 1)
        response, conn = self.send(raw)
        self.assertEqual(response.status, 413)
        self.assertTrue(conn.closed)
        self.assertEqual(self.second.calls, [])

    def test_unexpectedException(self) -> None:
        """
        An exception from a handler is 500 with the generic text and closes;
        the details are only logged.
        """

        def boom(req: Request) -> None:
            raise KeyError("secret")

        self.second.result = boom
        response, conn = self.send(request(b"GET", b"/a/1"))
        self.assertEqual((response.status, response.text), (500, INTERNAL_ERROR + "\n"))
        self.assertTrue(conn.closed)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    def test_failedDeferred(self) -> None:
        """
        A Deferred failing with L{HTTPError} sends that error; with anything
        else, 500.
        """
        self.second.result = lambda req: fail(HTTPError(409, "Busy"))
        response, _ = self.send(request(b"GET", b"/a/1"))
        self.assertEqual((response.status, response.text), (409, "Busy\n"))
        self.second.result = lambda req: fail(ValueError("secret"))
        response, _ = self.send(request(b"GET", b"/a/1"))
        self.assertEqual((response.status, response.text), (500, INTERNAL_ERROR + "\n"))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_failureAfterHeaders(self) -> None:
        """
        A failure after the response started aborts the connection instead
        of writing a second response.
        """
        d: Deferred[None] = Deferred()

        def started(req: Request) -> Deferred[None]:
            req.setHeader(b"content-length", b"10")
            req.write(b"12345")
            return d

        self.second.result = started
        channel: Any = self.site.buildProtocol(None)
        transport = StringTransport(lenient=True)
        channel.makeConnection(transport)
        channel.dataReceived(request(b"GET", b"/a/1"))
        d.errback(HTTPError(500, "late"))
        self.assertTrue(transport.disconnected)
        self.assertNotIn(b"late", transport.value())

    def test_clientGone(self) -> None:
        """
        A failure after the client left is dropped quietly.
        """
        d: Deferred[None] = Deferred()
        self.second.result = lambda req: d
        channel: Any = self.site.buildProtocol(None)
        transport = StringTransport(lenient=True)
        channel.makeConnection(transport)
        channel.dataReceived(request(b"GET", b"/a/1"))
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        channel.connectionLost(Failure(ConnectionDone()))
        d.errback(HTTPError(403, "gone"))
        self.assertEqual(transport.value(), b"")


class CombinedRoutesTests(SynchronousTestCase):
    """
    The router tries its routes in one combined pattern: the same handler
    and groups as trying them one by one.
    """

    def sequential(self, routes: list[tuple[str, object]], path: str) -> object:
        for pattern, handler in routes:
            m = re.match(pattern, path)
            if m is not None:
                return handler, m.groups(), path
        return None

    def combined(self, routes: list[tuple[str, object]], path: str) -> object:
        router = Router(routes)
        self.assertIsNotNone(router._combined)
        req: Any = type("R", (), {"path": path.encode()})()
        try:
            return router._match(req)
        except HTTPError as e:
            self.assertEqual(e.status, 404)
            return None

    def test_sameAsSequential(self) -> None:
        """
        The daemon's routes (upstream's, in upstream's order) and some that
        overlap: every path gets the handler and groups the first matching
        route gives.
        """
        routes: list[tuple[str, object]] = [
            (r"^/images/(.*)/extents", "extents"),
            (r"^/images/(.*)/checksum/algorithms", "algorithms"),
            (r"^/images/(.*)/checksum", "checksum"),
            (r"^/images/([^/]*)/written$", "written"),
            (r"^/images/(.*)", "image"),
            (r"^/info/", "info"),
            (r"^/(x)(y)?(z)", "xyz"),
            (r"^/x", "x"),
        ]
        paths = [
            "/images/t",
            "/images/",
            "/images",
            "/images/t/extents",
            "/images/t/extents?x",
            "/images/a/b/extents",
            "/images/t/checksum",
            "/images/t/checksum/algorithms",
            "/images/t/written",
            "/images/t/written/",
            "/images/a/b/written",
            "/images/t/extents/checksum",
            "/info/",
            "/info",
            "/xz",
            "/xyz",
            "/x",
            "/",
            "",
        ]
        for path in paths:
            self.assertEqual(self.combined(routes, path), self.sequential(routes, path), repr(path))

    def test_notCombined(self) -> None:
        """
        Patterns that refer to their own groups or set flags are tried one
        by one, as before.
        """
        for pattern in [r"^/(a)\1", r"^/(?P<n>a)(?P=n)", r"(?i)^/a"]:
            router = Router([(pattern, "h")])
            self.assertIsNone(router._combined, pattern)
            req: Any = type("R", (), {"path": b"/aa"})()
            self.assertEqual(router._match(req)[0], "h", pattern)


class HelperTests(SynchronousTestCase):
    """
    Query and CORS helpers.
    """

    def request(self, uri: bytes, headers: dict[bytes, bytes] | None = None) -> Any:
        from twisted.web.test.requesthelper import DummyRequest

        req = DummyRequest([])
        req.uri = uri
        from twisted.web import http

        req.args = http.parse_qs(uri.split(b"?", 1)[1], 1) if b"?" in uri else {}
        for name, value in (headers or {}).items():
            req.requestHeaders.setRawHeaders(name, [value])
        return req

    def test_queryArg(self) -> None:
        """
        The first value of a query parameter, decoded; C{None} if absent.
        """
        req = self.request(b"/x?a=1&a=2&b=%C3%A9")
        self.assertEqual((queryArg(req, "a"), queryArg(req, "b")), ("1", "é"))
        self.assertIsNone(queryArg(req, "c"))

    def test_enumArg(self) -> None:
        """
        Enumerated parameters default when absent and are 400 with upstream's
        text when unknown.
        """
        self.assertEqual(enumArg(self.request(b"/x"), "flush", ("y", "n"), "y"), "y")
        self.assertEqual(enumArg(self.request(b"/x?flush=n"), "flush", ("y", "n"), "y"), "n")
        e = self.assertRaises(
            HTTPError, enumArg, self.request(b"/x?flush=maybe"), "flush", ("y", "n"), "y"
        )
        self.assertEqual(
            (e.status, e.message),
            (400, "Unsupported value 'maybe' for 'flush', expecting one of ['n', 'y']"),
        )

    def test_cors(self) -> None:
        """
        CORS headers answer only the trigger headers present, with the max
        age whenever any is.
        """
        req = self.request(b"/x", {b"access-control-request-method": b"PUT"})
        cors(req, b"OPTIONS,GET,PUT")
        headers = dict(req.responseHeaders.getAllRawHeaders())
        self.assertEqual(
            headers,
            {
                b"Access-Control-Allow-Methods": [b"OPTIONS,GET,PUT"],
                b"Access-Control-Max-Age": [b"86400"],
            },
        )
        req = self.request(b"/x")
        cors(req)
        self.assertEqual(list(req.responseHeaders.getAllRawHeaders()), [])
