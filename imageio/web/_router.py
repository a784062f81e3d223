# -*- test-case-name: tests.test_router -*-
"""
Upstream-compatible request routing: regular expressions on the unquoted
path, tried in order, with upstream's 404 and 405 texts.

twisted.web's resource traversal splits paths into segments; upstream
matches C{/images/(.*)} on the whole path, so C{/images/a/b} names ticket
C{a/b} (and gets 403, not 404). L{Router} is a leaf resource that keeps
those semantics and hands each request to a handler method
C{handle<METHOD>(request, *groups)}. Handlers may provide
C{bodySink<METHOD>} to take the body as a stream.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from imageio._log import Logger
from imageio.interfaces import IBodySink, IStreamingUpload
from imageio.web._head import METHODS
from imageio.web._redact import redactPath
from imageio.web._request import exchangeOf
from imageio.web._response import (
    HTTPError,
    abortConnection,
    httpErrorFor,
    isGone,
    sendError,
    sendHTTPError,
    sendInternalError,
)
from imageio.web._sinks import MAX_SMALL_BODY, CollectSink, tooLarge
from imageio.web._twisted_http import hasAnyHeader

log = Logger()

Route = tuple["re.Pattern[str]", object]


def compileRoutes(routes: Sequence[tuple[str, object]]) -> list[Route]:
    return [(re.compile(pattern), handler) for pattern, handler in routes]


#: A pattern refers to its own groups (C{\\1}, C{(?P=name)}), or sets
#: flags: it cannot be one alternative of a combined pattern.
_SELF_REFERENCE = re.compile(r"\\[1-9]|\(\?P=|\(\?[aiLmsux]+\)")


def combineRoutes(
    routes: Sequence[tuple[str, object]],
) -> tuple[re.Pattern[str], list[tuple[int, int, object]]] | None:
    """
    One pattern trying C{routes}' patterns in order: each is an alternative
    in a group of its own, and since nothing follows the alternatives, the
    first that matches wins, as trying them one after another. The group
    that closes last (C{lastindex}) is the matching alternative's.

    @return: The pattern, and for each of its groups that wraps a route,
        (the route's first group, its number of groups, its handler) by
        group number; C{None} if a pattern cannot be combined.
    """
    parts = []
    table: list[tuple[int, int, object]] = [(0, 0, None)]
    for pattern, handler in routes:
        if _SELF_REFERENCE.search(pattern):
            return None
        count = re.compile(pattern).groups
        outer = len(table)
        parts.append(f"({pattern})")
        table.append((outer + 1, count, handler))
        table.extend((0, 0, None) for _ in range(count))
    try:
        combined = re.compile("|".join(parts))
    except re.error:
        return None
    return combined, table


def requestPath(request: Request) -> str:
    """
    @return: The unquoted path, as upstream matches it: escapes that are not
        UTF-8 (C{%ff}) become U+FFFD, as upstream's C{unquote} makes them,
        so the path is text that can be logged and answered (an unknown
        ticket id, not a crash).
    """
    raw = request.path if isinstance(request.path, bytes) else b"/"
    if b"%" in raw:
        raw = unquote_to_bytes(raw)
    return raw.decode("utf-8", "replace")


@implementer(IStreamingUpload)
class Router(Resource):
    """
    Dispatches requests to handlers by regular expression.
    """

    isLeaf = True

    def __init__(self, routes: Sequence[tuple[str, object]]) -> None:
        super().__init__()
        self._routes = compileRoutes(routes)
        self._combined = combineRoutes(routes)

    def _match(self, request: Request) -> tuple[object, tuple[str, ...], str]:
        path = requestPath(request)
        combined = self._combined
        if combined is not None:
            # One match instead of one per route.
            pattern, table = combined
            m = pattern.match(path)
            if m is not None:
                first, count, handler = table[m.lastindex or 0]
                return handler, m.groups()[first - 1 : first - 1 + count], path
            raise HTTPError(404, f"No handler for {path!r}")
        for pattern, handler in self._routes:
            m = pattern.match(path)
            if m is not None:
                return handler, m.groups(), path
        raise HTTPError(404, f"No handler for {path!r}")

    def _method(self, request: Request, handler: object, path: str, prefix: str) -> Any:
        method = request.method
        name = method.decode("ascii", "replace")
        if method not in METHODS:
            raise HTTPError(405, f"Invalid method {name!r}")
        fn = getattr(handler, prefix + name, None)
        if fn is None and method == b"HEAD" and prefix == "handle":
            fn = getattr(handler, "handleGET", None)
        if fn is None and prefix == "handle":
            raise HTTPError(405, f"Method {name!r} not defined for {path!r}")
        return fn

    # IStreamingUpload

    def bodySink(self, request: Request, length: int | None) -> IBodySink | None:  # type: ignore[override]
        handler, groups, path = self._match(request)
        fn = self._method(request, handler, path, "bodySink")
        if fn is not None:
            sink: IBodySink | None = fn(request, length, *groups)
            return sink
        if length is not None and length > MAX_SMALL_BODY:
            raise tooLarge(MAX_SMALL_BODY)
        # Small bodies are collected in memory; never spooled to disk.
        return CollectSink(exchangeOf(request), MAX_SMALL_BODY)

    # Resource

    def render(self, request: Request) -> object:
        try:
            handler, groups, path = self._match(request)
            fn = self._method(request, handler, path, "handle")
            result = fn(request, *groups)
        except Exception as e:
            error = httpErrorFor(e)
            if error is not None:
                sendHTTPError(request, error)
                return NOT_DONE_YET
            log.failure(
                "{method} {path} failed",
                method=request.method.decode("ascii", "replace"),
                path=redactPath(request.uri),
            )
            sendInternalError(request)
            return NOT_DONE_YET
        # (None first: isinstance against Deferred, an ABC, is dear for it.)
        if result is not None and isinstance(result, Deferred):
            result.addErrback(self._failed, request)
        return NOT_DONE_YET

    def _failed(self, reason: Failure, request: Request) -> None:
        answerFailure(request, reason)


def answerFailure(request: Request, reason: Failure) -> None:
    """
    Answer a handler's failure as the router answers the failure of the
    Deferred a handler returned: the mapped status, or 500 logged; a cut
    connection if the response started; nothing if the client left.
    """
    error = httpErrorFor(reason.value)
    if error is not None:
        if isGone(request):
            return
        if request.startedWriting:
            abortConnection(request)
            return
        sendHTTPError(request, error)
        return
    log.failure(
        "{method} {path} failed",
        reason,
        method=request.method.decode("ascii", "replace"),
        path=redactPath(request.uri),
    )
    if isGone(request):
        return
    if request.startedWriting:
        abortConnection(request)
    else:
        sendInternalError(request)


def requestBody(request: Request) -> bytes:
    """
    @return: The body collected by L{CollectSink}, or twisted.web's content.
    """
    sink = getattr(request, "bodySink", None)
    if isinstance(sink, CollectSink):
        return sink.data
    content = getattr(request, "content", None)
    if content is None:
        return b""
    content.seek(0)
    data: bytes = content.read(MAX_SMALL_BODY + 1)
    return data


def queryArg(request: Request, name: str) -> str | None:
    """
    @return: The first value of query parameter C{name}, decoded.
    """
    if not request.args:
        return None
    values = request.args.get(name.encode("ascii"))
    if not values:
        return None
    value: bytes = values[0]
    return value.decode("utf-8", "replace")


def enumArg(request: Request, name: str, values: Sequence[str], default: str) -> str:
    """
    Validate an enumerated query parameter with upstream's text.
    """
    value = queryArg(request, name)
    if value is None:
        return default
    if value not in values:
        raise HTTPError(
            400,
            f"Unsupported value {value!r} for {name!r}, expecting one of {sorted(values)}",
        )
    return value


#: Request headers that make L{cors} answer, as Twisted spells them.
_CORS_TRIGGERS = frozenset(
    {b"Origin", b"Access-Control-Request-Headers", b"Access-Control-Request-Method"}
)


def cors(request: Request, allowMethods: bytes = b"*") -> None:
    """
    Add upstream's CORS headers when the request asks for them.

    @param allowMethods: C{Access-Control-Allow-Methods} for preflights.
    """
    headers = request.requestHeaders
    if not hasAnyHeader(headers, _CORS_TRIGGERS):
        return
    triggered = False
    if headers.hasHeader(b"origin"):
        request.setHeader(b"access-control-allow-origin", b"*")
        triggered = True
    if headers.hasHeader(b"access-control-request-headers"):
        request.setHeader(b"access-control-allow-headers", b"*")
        triggered = True
    if headers.hasHeader(b"access-control-request-method"):
        request.setHeader(b"access-control-allow-methods", allowMethods)
        triggered = True
    if triggered:
        request.setHeader(b"access-control-max-age", b"86400")


__all__ = ["MAX_SMALL_BODY", "Router", "requestBody", "queryArg", "enumArg", "cors", "sendError"]
