# -*- test-case-name: tests.test_web -*-
"""
The HTTP layer: streaming requests and body sinks, the download producer
and upload sink, routing, upstream-format responses, TLS and zero-copy
socket transports.

This module is the layer's surface: C{imageio.daemon}, C{imageio.proxy},
C{imageio.control} and C{imageio.tap} import from here, never from
C{imageio.web._*} (C{tests/test_layers.py} checks). Domain errors from the
layers below become HTTP statuses here, in L{httpErrorFor}, and nowhere
else. Handlers keep per-connection and per-request state through
L{connectionOf} (an L{imageio.interfaces.IConnection}) and L{exchangeOf}
(an L{imageio.interfaces.IExchange}).

Inside: C{_request} (streaming requests), C{_channel} (the connection),
C{_site} (access log, metrics), C{_sinks}, C{_redact}, C{_socket}; the
Twisted internals they need are in C{_twisted_http} and
C{_twisted_transport} only.
"""

from imageio.web._channel import ImageioChannel, connectionOf, pushProducerOf
from imageio.web._download import DownloadProducer, ReaderStalled, TruncatedImage
from imageio.web._head import METHODS
from imageio.web._json import loadJSON
from imageio.web._jsonlist import JSONListWriter
from imageio.web._pump import BodyPump, BodyPumpService, createBodyPump
from imageio.web._redact import redactPath
from imageio.web._request import exchangeOf
from imageio.web._response import (
    INTERNAL_ERROR,
    HTTPError,
    abortConnection,
    closeAfterResponse,
    httpErrorFor,
    isGone,
    sendEmpty,
    sendError,
    sendHTTPError,
    sendJSON,
)
from imageio.web._router import Router, answerFailure, cors, enumArg, queryArg, requestBody
from imageio.web._sinks import CollectSink, tooLarge
from imageio.web._site import ImageioSite
from imageio.web._splice import SpliceProducer, SpliceRefused, probeSplice
from imageio.web._tls import (  # imageio.client._tls
    TLSConfigError,
    TLSServerEndpoint,
    TLSServerFactory,
    TLSServerProtocol,
    makeServerContext,
)
from imageio.web._transport import (
    TCPServerEndpoint,
    UNIXServerEndpoint,
    ZeroCopyTCPServer,
    ZeroCopyUNIXServer,
)
from imageio.web._twisted_http import headerValues, setSafeHeaders
from imageio.web._upload import ShortBody, UploadSink

__all__ = [
    # Responses and errors
    "HTTPError",
    "INTERNAL_ERROR",
    "httpErrorFor",
    "abortConnection",
    "closeAfterResponse",
    "isGone",
    "sendEmpty",
    "sendError",
    "sendHTTPError",
    "sendJSON",
    "headerValues",
    "setSafeHeaders",
    "loadJSON",
    "JSONListWriter",
    # Routing
    "METHODS",
    "Router",
    "answerFailure",
    "cors",
    "enumArg",
    "queryArg",
    "requestBody",
    # Requests, connections, sites
    "CollectSink",
    "tooLarge",
    "ImageioChannel",
    "ImageioSite",
    "pushProducerOf",
    "connectionOf",
    "exchangeOf",
    "redactPath",
    # Bodies
    "DownloadProducer",
    "SpliceProducer",
    "probeSplice",
    "SpliceRefused",
    "ReaderStalled",
    "TruncatedImage",
    "ShortBody",
    "UploadSink",
    # Listeners
    "TCPServerEndpoint",
    "UNIXServerEndpoint",
    "ZeroCopyTCPServer",
    "ZeroCopyUNIXServer",
    "BodyPump",
    "BodyPumpService",
    "createBodyPump",
    "TLSConfigError",
    "TLSServerEndpoint",
    "makeServerContext",
    "TLSServerFactory",
    "TLSServerProtocol",
]
