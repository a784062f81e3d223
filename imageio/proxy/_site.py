# -*- test-case-name: tests.test_proxy -*-
"""
The signed-ticket proxy's HTTP tree (the 1.x generation, wire contract
4.1-4.4): C{/sessions/}, C{/tickets/}, C{/images/} and C{/info/}.

A client proves it may use a daemon ticket with one of:

  - C{Authorization: <signed ticket>} on the request itself (4.1-era SDK
    clients);
  - a session id from C{POST /sessions} in a C{Session-Id} header or a
    C{session_id} query parameter (browsers, which cannot set headers on
    downloads); session ids carry their own proof, so any replica with the
    same key accepts them;
  - nothing, when the engine stored the signed ticket with
    C{PUT /tickets/} (1.2.1-1.6 engines).

Requests for C{/images/<id>} are then relayed, streamed both ways, to
C{<imaged-uri>/images/<id>} on the daemon named by the verified ticket;
daemon certificates are verified against C{[proxy] daemon_ca_file} with
host name checks. Daemon addresses on loopback, link-local, multicast or
unspecified addresses are refused (a signed ticket must not make the proxy
talk to services on its own host); loopback can be allowed for tests and
all-in-one labs with the C{allowLoopback} argument of L{makeProxySite} (or
a C{[proxy] allow_loopback} option, once the configuration has one).

Every response carries the 1.x proxy's CORS headers.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any
from urllib.parse import quote, urlencode

from attrs import define
from twisted.internet.defer import Deferred
from twisted.web.iweb import IResponse
from twisted.web.server import Request

import imageio
from imageio import config as _config
from imageio._log import Logger
from imageio.backends import RELAYED_HEADER, relayLoop
from imageio.backends.httpclient import BytesProducer, collectBody, loadTrustRoot
from imageio.interfaces import IBodySink, IMetrics
from imageio.proxy._relay import (
    MAX_SMALL_RESPONSE,
    DaemonClient,
    ResponseRelay,
    UploadRelay,
    readError,
    relayError,
    startResponse,
)
from imageio.proxy._sessions import (
    COULD_NOT_INITIALIZE_SESSION,
    ERROR_VERIFYING_TICKET,
    INVALID_SESSION,
    NO_SUCH_SESSION,
    NOT_AUTHORIZED,
    NOT_AUTHORIZED_EXPIRED,
    NOT_AUTHORIZED_REASON,
    InvalidSession,
    SessionManager,
    sessionKeyFromFile,
)
from imageio.proxy._signedticket import (
    MAX_ALLOWED_SKEW,
    Claims,
    ExpiredTicket,
    InvalidTicket,
    TicketVerifier,
)
from imageio.proxy._tickets import ProxyTickets, TooManyTickets
from imageio.ranges import RangeError, parseContentLength, parseJSONInteger
from imageio.tickets import shortID
from imageio.web import (
    CollectSink,
    HTTPError,
    ImageioSite,
    Router,
    exchangeOf,
    isGone,
    queryArg,
    requestBody,
    sendEmpty,
    sendHTTPError,
    sendJSON,
    tooLarge,
)

log = Logger()

#: The 1.x proxy's CORS headers, on every response (wire contract 4.1).
CORS_HEADERS = (
    (b"access-control-allow-origin", b"*"),
    (
        b"access-control-allow-headers",
        b"Cache-Control, Pragma, Authorization, Content-Type, Content-Length, "
        b"Content-Range, Range, Session-Id",
    ),
    (b"access-control-allow-methods", b"GET, PUT, PATCH, OPTIONS, POST, DELETE"),
    (
        b"access-control-expose-headers",
        b"Authorization, Content-Length, Content-Range, Range, Session-Id",
    ),
    (b"access-control-max-age", b"300"),
)

#: Methods the proxy relays, in the order C{Allow} lists them.
PROXY_ALLOW = ("OPTIONS", "GET", "PUT", "PATCH")

#: Features the proxy relays. Upstream's 1.x proxy offered only C{zero} and
#: C{flush}; this one also relays C{/extents} and C{/checksum}, so it says
#: so. Intersected with what the daemon reports.
PROXY_FEATURES = ("checksum", "extents", "flush", "zero")

#: Largest PATCH body relayed (JSON messages).
MAX_PATCH_BODY = 4096

#: Query parameters passed on to the daemon, by resource.
EXTENTS_QUERY = ("context", "start", "length")
CHECKSUM_QUERY = ("algorithm", "block_size")

NO_STORE = {b"cache-control": b"no-cache, no-store"}

INVALID_RESOURCE = "Invalid format for requested resource or no resource specified"
RESOURCE_MISMATCH = "Requested resource must match transfer ticket"


def addCORS(request: Request) -> None:
    for name, value in CORS_HEADERS:
        request.setHeader(name, value)


class ProxyRouter(Router):
    """
    A router that puts the CORS headers on every response, errors from
    routing and early refusals included.
    """

    def bodySink(self, request: Request, length: int | None) -> IBodySink | None:
        addCORS(request)
        return super().bodySink(request, length)

    def render(self, request: Request) -> object:
        addCORS(request)
        return super().render(request)


@define
class ProxyService:
    """
    What the proxy's handlers share.

    @ivar verifier: Checks signed tickets against the engine certificate.
    @ivar sessions: Makes and checks session ids.
    @ivar tickets: Tickets the engine stored with C{PUT /tickets/}.
    @ivar client: The HTTP client for daemons.
    @ivar reactor: Clock for relay deadlines.
    """

    verifier: TicketVerifier
    sessions: SessionManager
    tickets: ProxyTickets
    client: DaemonClient
    reactor: Any

    def authenticate(self, request: Request, ticketID: str) -> Claims:
        """
        Find and check the claims a request presents for C{ticketID}.

        @raise HTTPError: 401 with upstream's texts; 400 when the claims are
            for another ticket.
        """
        header = request.getHeader(b"authorization")
        if header:
            try:
                claims = self.verifier.verify(header)
            except ExpiredTicket:
                raise HTTPError(401, NOT_AUTHORIZED_EXPIRED) from None
            except InvalidTicket as e:
                raise HTTPError(401, NOT_AUTHORIZED_REASON.format(reason=e)) from None
        else:
            sessionID = _sessionID(request)
            if sessionID is not None:
                try:
                    claims = self.sessions.lookup(sessionID)
                except InvalidSession:
                    raise HTTPError(401, INVALID_SESSION) from None
            else:
                stored = self.tickets.get(ticketID)
                if stored is None:
                    raise HTTPError(401, NOT_AUTHORIZED)
                try:
                    self.verifier.checkCurrent(stored)
                except ExpiredTicket:
                    raise HTTPError(401, NOT_AUTHORIZED_EXPIRED) from None
                except InvalidTicket as e:
                    raise HTTPError(401, NOT_AUTHORIZED_REASON.format(reason=e)) from None
                claims = stored
        if claims.transferTicket != ticketID:
            raise HTTPError(400, RESOURCE_MISMATCH)
        return claims

    def authorize(self, request: Request, ticketID: str) -> Claims:
        """
        Check the resource id, then the credentials.
        """
        if not ticketID:
            raise HTTPError(400, INVALID_RESOURCE)
        claims = self.authenticate(request, ticketID)
        # The proxy relays everything: a request another relay sent (a
        # daemon's https: ticket naming this proxy) would go round.
        loop = relayLoop(claims.imagedURI, request.requestHeaders.hasHeader(RELAYED_HEADER))
        if loop is not None:
            raise HTTPError(508, str(loop), close=True)
        return claims

    def daemonURL(self, claims: Claims, suffix: str = "", query: str = "") -> bytes:
        """
        @return: C{<imaged-uri>/images/<transfer-ticket><suffix>[?query]}.
        """
        url = f"{claims.imagedURI}/images/{quote(claims.transferTicket, safe='')}{suffix}"
        if query:
            url += "?" + query
        return url.encode("ascii")

    def relayDownload(
        self, request: Request, method: bytes, url: bytes, headers: dict[bytes, bytes]
    ) -> Deferred[None]:
        """
        Relay a GET (or HEAD) and stream the daemon's answer to the client.
        """
        d = self.client.request(method, url, headers)
        cancelOnClientLoss(request, d)

        def gotResponse(response: IResponse) -> Deferred[None] | None:
            if not 200 <= response.code < 300:
                return readError(response).addCallback(_sendError, request)
            startResponse(request, response, NO_STORE)
            relay = ResponseRelay(request, self.reactor)
            response.deliverBody(relay)
            return relay.done

        result: Deferred[None] = d.addCallback(gotResponse)
        return result.addErrback(relayError, request, "Download relay")


def cancelOnClientLoss(request: Request, d: Deferred[IResponse]) -> None:
    """
    Cancel the daemon request if the client goes away before the daemon
    answered (afterwards the relay itself stops the daemon connection).
    """

    def cancel(_: object) -> None:
        if not d.called:
            d.cancel()

    request.notifyFinish().addErrback(cancel)


def _sessionID(request: Request) -> str | None:
    value = request.getHeader(b"session-id")
    if value is not None:
        return value.decode("ascii", "replace")
    return queryArg(request, "session_id")


def _sendError(e: HTTPError, request: Request) -> None:
    if not isGone(request):
        sendHTTPError(request, e)


def _forwardQuery(request: Request, names: tuple[str, ...]) -> str:
    """
    @return: The query parameters C{names} (first value each) of the
        request, encoded for the daemon; others (C{session_id}) are dropped.
    """
    pairs = [(name, value) for name in names if (value := queryArg(request, name)) is not None]
    return urlencode(pairs)


@define
class ImageHandler:
    """
    C{/images/<ticket-id>}: OPTIONS, GET (and HEAD), PUT, PATCH relayed.
    """

    service: ProxyService

    # OPTIONS

    def handleOPTIONS(self, request: Request, ticketID: str) -> Deferred[None] | None:
        if request.requestHeaders.hasHeader(b"access-control-request-method"):
            # A CORS preflight carries no credentials; answer it alone.
            sendEmpty(request, 204)
            return None
        if ticketID == "*":
            sendJSON(
                request,
                {"features": list(PROXY_FEATURES)},
                headers=[(b"allow", ",".join(PROXY_ALLOW).encode())],
            )
            return None
        claims = self.service.authorize(request, ticketID)
        d = self.service.client.request(b"OPTIONS", self.service.daemonURL(claims), {})
        cancelOnClientLoss(request, d)
        result: Deferred[None] = d.addCallback(self._gotOptions, request)
        return result.addErrback(relayError, request, "OPTIONS relay")

    def _gotOptions(self, response: IResponse, request: Request) -> Deferred[None]:
        if response.code in (204, 405):
            # A daemon before 1.3: estimate, as upstream's proxy did.
            body = collectBody(response, MAX_SMALL_RESPONSE, truncate=True)
            return body.addCallback(
                lambda _: sendJSON(
                    request, {"features": []}, headers=[(b"allow", b"OPTIONS,GET,PUT")]
                )
            )
        if response.code != 200:
            return readError(response).addCallback(_sendError, request)
        d = collectBody(response, MAX_SMALL_RESPONSE)
        return d.addCallback(self._sendOptions, response, request)

    def _sendOptions(self, body: bytes, response: IResponse, request: Request) -> None:
        try:
            msg = json.loads(body, parse_int=parseJSONInteger)
            daemonFeatures = msg["features"]
            if not isinstance(daemonFeatures, list):
                raise TypeError(daemonFeatures)
        except (ValueError, KeyError, TypeError):
            raise HTTPError(
                502, "Got invalid response from host: invalid JSON or missing 'features'"
            ) from None
        allowHeader = b",".join(response.headers.getRawHeaders(b"allow") or [])
        daemonAllow = {m.strip() for m in allowHeader.decode("latin-1").split(",")}
        options: dict[str, object] = {
            "features": [f for f in PROXY_FEATURES if f in daemonFeatures],
        }
        for name in ("max_readers", "max_writers"):
            value = msg.get(name)
            if type(value) is int and value > 0:
                options[name] = value
        allow = ",".join(m for m in PROXY_ALLOW if m in daemonAllow)
        sendJSON(request, options, headers=[(b"allow", allow.encode())])

    # GET and HEAD

    def handleGET(self, request: Request, ticketID: str) -> Deferred[None]:
        claims = self.service.authorize(request, ticketID)
        headers = {}
        byteRange = request.getHeader(b"range")
        if byteRange is not None:
            headers[b"range"] = byteRange
        method = b"HEAD" if request.method == b"HEAD" else b"GET"
        return self.service.relayDownload(request, method, self.service.daemonURL(claims), headers)

    # PUT

    def bodySinkPUT(self, request: Request, length: int | None, ticketID: str) -> IBodySink:
        """
        Check an upload from its headers and start the daemon request at
        once; the body streams through as it arrives. Errors here are
        answered before the body is read, and the connection closed.
        """
        claims = self.service.authorize(request, ticketID)
        try:
            values = request.requestHeaders.getRawHeaders(b"content-length")
            declared = parseContentLength(list(values) if values is not None else None)
        except RangeError as e:
            raise HTTPError(e.status, e.message, close=True) from None
        if declared is None or length is None:
            raise HTTPError(400, "Content-Length header is required", close=True)
        flush = queryArg(request, "flush")
        if flush is not None and flush not in ("y", "n"):
            raise HTTPError(
                400, f"Unsupported value {flush!r} for 'flush', expecting one of ['n', 'y']"
            )
        headers = {b"content-type": b"application/octet-stream"}
        contentRange = request.getHeader(b"content-range")
        if contentRange is not None:
            headers[b"content-range"] = contentRange
        url = self.service.daemonURL(claims, query=f"flush={flush}" if flush else "")
        relay = UploadRelay(request, self.service.reactor, declared)
        relay.start(self.service.client.request(b"PUT", url, headers, relay.pipe, timeout=None))
        exchangeOf(request).pending = relay
        log.debug(
            "PUT ticket={ticketID} size={size}",
            ticketID=shortID(claims.transferTicket),
            size=declared,
        )
        return relay.pipe

    def handlePUT(self, request: Request, ticketID: str) -> Deferred[None] | None:
        relay = exchangeOf(request).pending
        assert isinstance(relay, UploadRelay), relay
        return relay.respond()

    # PATCH

    def bodySinkPATCH(self, request: Request, length: int | None, ticketID: str) -> IBodySink:
        exchangeOf(request).pending = self.service.authorize(request, ticketID)
        if not length:
            raise HTTPError(400, "Content-Length is required", close=True)
        if length > MAX_PATCH_BODY:
            raise tooLarge(MAX_PATCH_BODY)
        return CollectSink(exchangeOf(request), MAX_PATCH_BODY)

    def handlePATCH(self, request: Request, ticketID: str) -> Deferred[None]:
        claims = getattr(request, "pending", None)
        if not isinstance(claims, Claims):
            # Requests that bypassed the body sink (HTTP/2 streams).
            claims = self.service.authorize(request, ticketID)
        body = BytesProducer(requestBody(request))
        headers = {b"content-type": b"application/json"}
        # No deadline: zeroing a large range takes as long as the storage
        # needs (upstream's proxy did the same).
        d = self.service.client.request(
            b"PATCH", self.service.daemonURL(claims), headers, body, timeout=None
        )
        cancelOnClientLoss(request, d)
        result: Deferred[None] = d.addCallback(_relaySmall, request)
        return result.addErrback(relayError, request, "PATCH relay")


def _relaySmall(response: IResponse, request: Request) -> Deferred[None]:
    """
    Relay a daemon answer without a body (PATCH): its status, or its error.
    """
    if not 200 <= response.code < 300:
        return readError(response).addCallback(_sendError, request)
    body = collectBody(response, MAX_SMALL_RESPONSE, truncate=True)

    def send(_: object) -> None:
        if not isGone(request):
            sendEmpty(request, response.code)

    return body.addCallback(send)


@define
class SubresourceHandler:
    """
    C{/images/<ticket-id>/extents} and C{/checksum}: GET relayed with the
    sub-resource's query parameters.
    """

    service: ProxyService
    suffix: str
    query: tuple[str, ...]

    def handleGET(self, request: Request, ticketID: str) -> Deferred[None]:
        claims = self.service.authorize(request, ticketID)
        url = self.service.daemonURL(claims, self.suffix, _forwardQuery(request, self.query))
        method = b"HEAD" if request.method == b"HEAD" else b"GET"
        return self.service.relayDownload(request, method, url, {})


class InvalidPathHandler:
    """
    C{/images/<id>/<anything else>}: 400, as upstream's proxy.
    """

    def _refuse(self, *args: object) -> None:
        raise HTTPError(400, "Invalid resource path", close=True)

    handleGET = handleOPTIONS = handlePUT = handlePATCH = handleDELETE = handlePOST = _refuse
    bodySinkPUT = bodySinkPATCH = bodySinkPOST = _refuse


@define
class SessionsHandler:
    """
    C{POST /sessions}: a session id for a signed ticket;
    C{DELETE /sessions/<id>}: end it.
    """

    service: ProxyService

    def handlePOST(self, request: Request, sessionID: str | None) -> None:
        header = request.getHeader(b"authorization")
        if not header:
            raise HTTPError(
                401, COULD_NOT_INITIALIZE_SESSION.format(reason="missing Authorization header")
            )
        try:
            claims = self.service.verifier.verify(header)
        except InvalidTicket as e:
            raise HTTPError(401, COULD_NOT_INITIALIZE_SESSION.format(reason=e)) from None
        session = self.service.sessions.create(claims)
        log.info("Session started for ticket {ticketID}", ticketID=shortID(claims.transferTicket))
        sendEmpty(request, 200, [(b"session-id", session.encode("ascii"))])

    def handleDELETE(self, request: Request, sessionID: str | None) -> None:
        try:
            self.service.sessions.revoke(sessionID or "")
        except InvalidSession:
            raise HTTPError(404, NO_SUCH_SESSION) from None
        sendEmpty(request, 204)


@define
class TicketsHandler:
    """
    C{PUT /tickets/}: store a signed ticket (the engine, 1.2.1-1.6);
    C{DELETE /tickets/<id>}: forget it.
    """

    service: ProxyService

    def handlePUT(self, request: Request, ticketID: str) -> None:
        body = requestBody(request).strip()
        if body.startswith(b'"'):
            # Tolerate the ticket sent as a JSON string.
            try:
                decoded = json.loads(body)
            except ValueError:
                decoded = None
            if isinstance(decoded, str):
                body = decoded.encode("utf-8", "replace")
        try:
            claims = self.service.verifier.verify(body)
        except InvalidTicket as e:
            raise HTTPError(403, ERROR_VERIFYING_TICKET.format(reason=e)) from None
        try:
            self.service.tickets.add(claims)
        except TooManyTickets as e:
            raise HTTPError(503, str(e)) from None
        log.info(
            "Ticket {ticketID} stored, expires at {expires}",
            ticketID=shortID(claims.transferTicket),
            expires=claims.expires,
        )
        sendEmpty(request)

    def handleDELETE(self, request: Request, ticketID: str) -> None:
        if not ticketID:
            raise HTTPError(400, "Missing ticket ID")
        if self.service.tickets.remove(ticketID):
            log.info("Ticket {ticketID} removed", ticketID=shortID(ticketID))
        sendEmpty(request, 204)


@define
class InfoHandler:
    """
    C{GET /info/}: the server version.
    """

    def handleGET(self, request: Request) -> None:
        sendJSON(request, {"version": imageio.__version__})


def proxyResource(service: ProxyService) -> ProxyRouter:
    """
    The proxy's tree, routes tried in order.
    """
    return ProxyRouter(
        [
            (r"^/images/([^/]*)/extents$", SubresourceHandler(service, "/extents", EXTENTS_QUERY)),
            (
                r"^/images/([^/]*)/checksum$",
                SubresourceHandler(service, "/checksum", CHECKSUM_QUERY),
            ),
            (r"^/images/([^/]*)$", ImageHandler(service)),
            (r"^/images/", InvalidPathHandler()),
            (r"^/sessions(?:/(.*))?$", SessionsHandler(service)),
            (r"^/tickets/(.*)$", TicketsHandler(service)),
            (r"^/info/", InfoHandler()),
        ]
    )


class ProxySite(ImageioSite):
    """
    The proxy listener's site; closes the daemon connections it keeps when
    it stops listening.
    """

    def __init__(self, resource: ProxyRouter, service: ProxyService, **kw: Any) -> None:
        super().__init__(resource, "proxy", **kw)
        self.service = service

    def stopFactory(self) -> None:
        self.service.client.close()
        super().stopFactory()


def _readFile(path: str, what: str, secret: bool = False) -> bytes:
    try:
        with open(path, "rb") as f:
            if secret:
                mode = os.fstat(f.fileno()).st_mode
                if mode & (stat.S_IRWXG | stat.S_IRWXO):
                    log.warn(
                        "{what} {path} is accessible to other users (mode {mode:o})",
                        what=what,
                        path=path,
                        mode=mode & 0o777,
                    )
            return f.read()
    except OSError as e:
        raise _config.ConfigError(f"[proxy] cannot read {what} {path}: {e.strerror}") from e


def makeProxySite(
    config: _config.Config,
    reactor: Any,
    registry: object,
    diskio: object,
    metrics: IMetrics | None,
    *,
    allowLoopback: bool | None = None,
) -> ImageioSite:
    """
    Build the proxy listener's site from the C{[proxy]} section.

    This reads the engine certificates, the session key and the daemon CA
    file, so call it at startup.

    @param registry: Unused: the 1.x proxy keeps its own state (signed
        tickets), not daemon tickets. Plain tickets with C{https:} URLs are
        served by the daemon listeners ("proxy mode").
    @param diskio: Unused: the proxy touches no storage.
    @param allowLoopback: Accept daemons on loopback addresses (tests,
        all-in-one labs); by default C{[proxy] allow_loopback} if the
        configuration has it, else C{False}.
    @raise imageio.config.ConfigError: For unreadable or invalid files.
    """
    proxy = config.proxy
    if allowLoopback is None:
        allowLoopback = bool(getattr(proxy, "allow_loopback", False))
    if not proxy.engine_cert_file:
        raise _config.ConfigError("[proxy] engine_cert_file is required")
    engineCert = _readFile(proxy.engine_cert_file, "engine certificate")
    engineCA = None
    if proxy.engine_ca_cert_file:
        engineCA = _readFile(proxy.engine_ca_cert_file, "engine CA certificate")
    if not 0 <= proxy.allowed_skew_seconds <= MAX_ALLOWED_SKEW:
        raise _config.ConfigError(
            f"[proxy] allowed_skew_seconds must be from 0 to {MAX_ALLOWED_SKEW}"
        )
    try:
        verifier = TicketVerifier(
            engineCert,
            clock=reactor.seconds,
            engineCACert=engineCA,
            allowedSkew=proxy.allowed_skew_seconds,
            allowLoopback=allowLoopback,
        )
    except ValueError as e:
        raise _config.ConfigError(f"[proxy] engine certificate: {e}") from e
    if proxy.session_key_file:
        try:
            key = sessionKeyFromFile(_readFile(proxy.session_key_file, "session key", True))
        except ValueError as e:
            raise _config.ConfigError(f"[proxy] session_key_file: {e}") from e
        sessions = SessionManager(key, reactor.seconds, proxy.allowed_skew_seconds)
    else:
        log.info("No [proxy] session_key_file: session ids are valid in this process only")
        sessions = SessionManager.withRandomKey(reactor.seconds, proxy.allowed_skew_seconds)
    caFile = proxy.daemon_ca_file or config.backend_http.ca_file or config.tls.ca_file
    try:
        loadTrustRoot(caFile)
        client = DaemonClient.create(reactor, caFile, allowLoopback)
    except ValueError as e:
        raise _config.ConfigError(f"[proxy] daemon_ca_file: {e}") from e
    if not caFile:
        log.warn(
            "No [proxy] daemon_ca_file: daemon certificates are verified against "
            "the system trust store"
        )
    service = ProxyService(
        verifier=verifier,
        sessions=sessions,
        tickets=ProxyTickets(reactor.seconds),
        client=client,
        reactor=reactor,
    )
    return ProxySite(
        proxyResource(service),
        service,
        timeout=config.daemon.request_timeout,
        reactor=reactor,
        metrics=metrics,
        bodyTimeout=config.daemon.body_timeout,
        bodyMinRate=config.daemon.body_min_rate,
    )
