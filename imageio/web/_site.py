# -*- test-case-name: tests.test_streaming -*-
"""
The site: streaming requests on L{ImageioChannel} connections, access logs
through twisted.logger with secrets redacted, and request metrics.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import LogLevel
from twisted.web import http, server
from twisted.web.resource import IResource, getChildForRequest

from imageio import _log
from imageio._log import Logger
from imageio.interfaces import IMetrics
from imageio.web._channel import ImageioChannel
from imageio.web._redact import redactMessage, redactPath
from imageio.web._request import StreamingRequest

log = Logger()


class ImageioSite(server.Site):
    """
    A site with streaming requests, per-connection contexts and access logs
    through twisted.logger with secrets redacted.

    @ivar accessLevel: Log level of access lines: C{debug} for the data
        listeners (thousands of requests a second), C{info} for control.
    """

    protocol = ImageioChannel  # type: ignore[assignment]
    requestFactory = StreamingRequest
    noisy = False
    accessLevel = "debug"
    #: Request bodies get this many seconds, then must arrive at
    #: C{bodyMinRate} bytes a second on average (0 disables either).
    bodyTimeout: float = 60
    bodyMinRate: float = 1024

    def __init__(
        self,
        resource: IResource,
        name: str,
        timeout: float = 60,
        metrics: IMetrics | None = None,
        bodyTimeout: float = 60,
        bodyMinRate: float = 1024,
        **kw: Any,
    ) -> None:
        super().__init__(resource, requestFactory=StreamingRequest, timeout=timeout, **kw)
        self.name = name
        self.metrics = metrics
        self.bodyTimeout = bodyTimeout
        self.bodyMinRate = bodyMinRate

    def getResourceFor(self, request: http.Request) -> IResource:
        """
        Twisted's, with C{sitepath} copied by a slice (it is a list).
        """
        request.site = self  # type: ignore[attr-defined]
        request.sitepath = request.prepath[:]  # type: ignore[attr-defined]
        return getChildForRequest(self.resource, request)  # type: ignore[no-any-return]

    def log(self, request: http.Request) -> None:
        sink = getattr(request, "bodySink", None)
        # Upload sinks count what they read directly; every other body
        # (PATCH, control PUT, refused uploads) went through
        # handleContentChunk.
        received: int = getattr(sink, "bytesWritten", None) or 0 if sink is not None else 0
        if not received:
            received = getattr(request, "contentReceived", 0)
        method = request.method.decode("ascii", "replace")
        if self.metrics is not None:
            self.metrics.requestDone(self.name, method, request.code, request.sentLength, received)
        level = LogLevel.info if self.accessLevel == "info" else LogLevel.debug
        # Refusals and failures are worth a line at the default level even
        # on the data listeners: an operator asking why a transfer failed.
        if request.code >= 500:
            level = LogLevel.error
        elif request.code >= 400:
            level = LogLevel.info
        if not _log.enabled(level):
            return
        started = getattr(request, "started", 0.0)
        elapsed = time.monotonic() - started if started else 0.0
        reason = getattr(request, "errorMessage", None)
        log.emit(
            level,
            "{site} {client} {method} {path} {status} sent={sent} received={received} "
            "{elapsed:.3f}s" + (": {reason}" if reason else ""),
            reason=redactMessage(reason, request.uri) if reason else None,
            site=self.name,
            client=_client(request),
            method=method,
            path=redactPath(request.uri),
            status=request.code,
            sent=request.sentLength,
            received=received,
            elapsed=elapsed,
        )


def _client(request: http.Request) -> str:
    peer = request.getClientAddress()
    host = getattr(peer, "host", None)
    return str(host) if host else "local"
