# -*- test-case-name: tests.test_web -*-
"""
Responses in upstream's format: plain-text errors ending in a newline,
JSON bodies ending in a newline, an empty 200 for success, and
C{Content-Length} always.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.web.server import Request

import imageio
from imageio._log import Logger
from imageio.interfaces import HostError, HostInvalid, HostTimedOut, RemoteError
from imageio.web._twisted_http import requestGone

log = Logger()

SERVER = f"imageio/{imageio.__version__}".encode()
TEXT_PLAIN = b"text/plain; charset=UTF-8"
APPLICATION_JSON = b"application/json"

Headers = Sequence[tuple[bytes, bytes]]


class HTTPError(Exception):
    """
    An error answered with C{status} and C{message} as a plain-text body.

    @ivar headers: Extra response headers (C{Content-Range} for 416).
    @ivar close: Close the connection after the response (403, unread body).
    """

    def __init__(
        self,
        status: int,
        message: str,
        headers: Headers = (),
        close: bool = False,
    ) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.headers = headers
        self.close = close

    def __str__(self) -> str:
        return f"{self.status} {self.message}"


def httpErrorFor(error: BaseException | None) -> HTTPError | None:
    """
    The answer for a domain error from the layers below: the one place
    they become HTTP statuses.

      - L{RemoteError} (another daemon refused): its status, text and
        C{Content-Range}; 403 closes the connection, as the daemon does;
      - L{HostTimedOut}: 504; L{HostInvalid}: 502; any other L{HostError}
        (unreachable): 503.

    @return: The L{HTTPError} to answer with (C{error} itself if it is
        one), or C{None} if C{error} is none of these (a bug, or an error
        the caller maps itself).
    """
    if isinstance(error, HTTPError):
        return error
    if isinstance(error, RemoteError):
        headers = [(b"content-range", error.contentRange)] if error.contentRange else []
        return HTTPError(error.status, error.text, headers, close=error.status == 403)
    if isinstance(error, HostError):
        if isinstance(error, HostTimedOut):
            status = 504
        elif isinstance(error, HostInvalid):
            status = 502
        else:
            status = 503
        return HTTPError(status, error.message, close=error.close)
    return None


def isGone(request: Request) -> bool:
    """
    @return: Whether the response can no longer be sent: finished already
        or the client disconnected.
    """
    return bool(request.finished or requestGone(request))


def abortConnection(request: Request) -> None:
    """
    Drop the connection without a response: the headers are out and the
    body cannot be completed, so the client must see a short body.
    """
    transport: Any = getattr(getattr(request, "channel", None), "transport", None)
    if transport is not None:
        transport.abortConnection()


def closeAfterResponse(request: Request) -> None:
    """
    Close the connection once this response is written, as upstream does
    after 403 and after errors that leave body bytes unread.
    """
    request.setHeader(b"connection", b"close")
    channel = getattr(request, "channel", None)
    if channel is not None:
        channel.persistent = False


def sendBody(
    request: Request,
    status: int,
    body: bytes,
    contentType: bytes | None,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """
    Send a complete response with C{Content-Length}.
    """
    if isGone(request):
        return
    request.setResponseCode(status)
    for name, value in headers:
        request.setHeader(name, value)
    if contentType is not None:
        request.setHeader(b"content-type", contentType)
    request.setHeader(b"content-length", b"%d" % len(body))
    if body and request.method != b"HEAD":
        request.write(body)
    request.finish()


def sendError(
    request: Request,
    status: int,
    message: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
    close: bool = False,
) -> None:
    """
    Send an error: C{message} and a newline as UTF-8 plain text.
    """
    if close:
        closeAfterResponse(request)
    request.errorMessage = message  # type: ignore[attr-defined]  # for the access log
    # Messages may quote client input: never fail to encode it.
    body = message.encode("utf-8", "backslashreplace") + b"\n"
    sendBody(request, status, body, TEXT_PLAIN, headers)


def sendHTTPError(request: Request, error: HTTPError) -> None:
    sendError(request, error.status, error.message, error.headers, error.close)


def sendJSON(
    request: Request,
    obj: object,
    status: int = 200,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    """
    Send C{obj} as JSON followed by a newline, keys in insertion order.
    """
    body = json.dumps(obj).encode("utf-8") + b"\n"
    sendBody(request, status, body, APPLICATION_JSON, headers)


def sendEmpty(
    request: Request, status: int = 200, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """
    Send a response without a body (C{Content-Length: 0}).
    """
    sendBody(request, status, b"", None, headers)


INTERNAL_ERROR = "Server failed to perform the request, check logs"


def sendInternalError(request: Request) -> None:
    """
    Answer 500 without details (they are in the log), and close: the
    request body may be unread and the state of the transfer is unknown.
    """
    sendError(request, 500, INTERNAL_ERROR, close=True)
