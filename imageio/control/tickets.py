# -*- test-case-name: tests.test_control -*-
"""
The tickets control API: C{/tickets/<id>} for the management agent.

Served only on the control listener (a 0660 UNIX socket, or TCP on
localhost when configured), never on the data listeners. No
authentication: access to the socket is the credential.
"""

from __future__ import annotations

from typing import Any

from attrs import define
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.server import Request

from imageio._log import Logger
from imageio.control._metrics import Metrics
from imageio.tickets import MAX_TIMEOUT, InvalidTicket, TicketBusy, TicketNotFound, TicketRegistry
from imageio.web import HTTPError, Router, loadJSON, requestBody, sendEmpty, sendJSON

log = Logger()

#: Largest ticket body accepted; real tickets are a few hundred bytes.
MAX_TICKET_BODY = 64 * 1024


def _parseJSON(data: bytes, prefix: str) -> Any:
    if len(data) > MAX_TICKET_BODY:
        raise HTTPError(413, f"Request body too large: limit is {MAX_TICKET_BODY} bytes")
    return loadJSON(data, prefix)


@define
class TicketHandler:
    """
    C{/tickets/<id>}: add (PUT), status (GET), extend (PATCH), remove
    (DELETE).
    """

    registry: TicketRegistry

    def handlePUT(self, request: Request, ticketID: str) -> None:
        if not ticketID:
            raise HTTPError(400, "Ticket id is required")
        body = _parseJSON(requestBody(request), "Ticket is not in a json format: ")
        try:
            # Like upstream, the ticket is stored under the body's uuid.
            self.registry.add(body)
        except InvalidTicket as e:
            raise HTTPError(400, str(e)) from None
        sendEmpty(request)

    def handleGET(self, request: Request, ticketID: str) -> None:
        if not ticketID:
            raise HTTPError(400, "Ticket id is required")
        try:
            ticket = self.registry.get(ticketID)
        except TicketNotFound as e:
            raise HTTPError(404, str(e)) from None
        sendJSON(request, ticket.info(self.registry.now()))

    def handlePATCH(self, request: Request, ticketID: str) -> None:
        if not ticketID:
            raise HTTPError(400, "Ticket id is required")
        patch = _parseJSON(requestBody(request), "Invalid patch: ")
        if not isinstance(patch, dict):
            raise HTTPError(400, "Invalid patch: expecting a JSON object")
        if "timeout" not in patch:
            raise HTTPError(400, "Missing required value for 'timeout'")
        timeout = patch["timeout"]
        if isinstance(timeout, bool) or not isinstance(timeout, int):
            raise HTTPError(400, f"Integer required {timeout!r}")
        if timeout < 0:
            raise HTTPError(400, f"Invalid value {timeout} < 0")
        # The bound of a ticket's timeout holds for extensions too.
        if timeout > MAX_TIMEOUT:
            raise HTTPError(400, f"Invalid value {timeout} > {MAX_TIMEOUT}")
        try:
            self.registry.extend(ticketID, timeout)
        except TicketNotFound as e:
            raise HTTPError(404, str(e)) from None
        sendEmpty(request)

    def handleDELETE(self, request: Request, ticketID: str) -> Deferred[None] | None:
        if not ticketID:
            self.registry.removeAll()
            sendEmpty(request, 204)
            return None

        def busy(reason: Failure) -> None:
            reason.trap(TicketBusy)
            raise HTTPError(409, str(reason.value))

        d = self.registry.remove(ticketID)
        d.addCallback(lambda _: sendEmpty(request, 204))
        d.addErrback(busy)
        return d


@define
class MetricsHandler:
    """
    C{GET /metrics}: Prometheus text format.
    """

    metrics: Metrics

    def handleGET(self, request: Request) -> None:
        body = self.metrics.render().encode("utf-8")
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()


def controlResource(registry: TicketRegistry, metrics: Metrics | None = None) -> Router:
    """
    Build the control API tree.
    """
    routes: list[tuple[str, object]] = [(r"^/tickets/(.*)", TicketHandler(registry))]
    if metrics is not None:
        routes.append((r"^/metrics$", MetricsHandler(metrics)))
    return Router(routes)
