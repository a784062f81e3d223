# -*- test-case-name: tests.test_tickets -*-
"""
Tickets: which image a transfer may touch, how, and for how long.

The registry is independent of HTTP: the control API adds, extends and
removes tickets; the images API and the proxy authorize each request and
run operations through it, which keeps C{active}, C{idle_time},
C{transferred} and cancellation right. Time comes from an injected
monotonic clock, so wall-clock jumps never expire a ticket.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from imageio._log import Logger
from imageio.ranges import RangeSet

log = Logger()

READ = "read"
WRITE = "write"
OPS = frozenset({READ, WRITE})

#: Longest C{timeout} a ticket may ask for; the engine uses minutes and
#: extends tickets with PATCH, so 30 days only guards against mistakes.
MAX_TIMEOUT = 30 * 24 * 3600
#: Largest image size a ticket may name (what a signed 64-bit offset holds).
MAX_SIZE = 2**63 - 1
#: Longest C{inactivity_timeout}.
MAX_INACTIVITY_TIMEOUT = 24 * 3600

#: URL schemes a ticket may name over the control API, each validated by
#: L{validateURL}; every one has a backend (C{memory:} is for tests only).
TICKET_SCHEMES = frozenset({"file", "nbd", "https", "http"})

# Ticket ids appear in URL paths and logs: no path separators, no
# percent-escapes, no whitespace or control characters.
_UUID_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._~:+=@-]{0,254}\Z")
_TRANSFER_ID_RE = re.compile(r"[\x21-\x7e]{1,255}\Z")
# Goes into Content-Disposition: printable, no quotes, separators or paths.
_FILENAME_FORBIDDEN = re.compile(r'[\x00-\x1f\x7f"\\/;]')


class TicketError(Exception):
    """
    Base of ticket errors; C{str()} is the text for the HTTP body.
    """


class InvalidTicket(TicketError):
    """
    A ticket body that does not describe a valid ticket (400).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"Invalid ticket: {reason}")


class AuthorizationError(TicketError):
    """
    A request the ticket does not allow (403).
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"You are not allowed to access this resource: {reason}")


class TicketNotFound(TicketError):
    """
    No ticket by that id (404 on the control API).
    """


class TicketBusy(TicketError):
    """
    Operations did not stop within the remove timeout (409).
    """


class OperationCanceled(AuthorizationError):
    """
    The ticket was canceled while the operation ran.
    """


def redactURL(url: str) -> str:
    """
    @return: C{url} safe for logs: an C{http(s)} URL's last path segment (a
        ticket id in proxy mode) is shortened; other URLs name paths or
        sockets, which are not secret.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return url
    head, _, last = parts.path.rpartition("/")
    return urlunsplit(parts._replace(path=f"{head}/{shortID(last)}", query="", fragment=""))


def shortID(uuid: str) -> str:
    """
    @return: A prefix of a ticket id, safe for INFO logs: ticket ids are
        credentials.
    """
    return uuid[:8] + "..." if len(uuid) > 8 else uuid


def _require(body: dict[str, Any], name: str) -> Any:
    if name not in body:
        raise InvalidTicket(f"Required ticket parameter is missing: {name}")
    return body[name]


def _typed(name: str, value: Any, kind: type) -> Any:
    # JSON booleans are not integers (design.md item 2).
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise InvalidTicket(f"Invalid value for {name!r}: {value!r}: expecting a {kind} value")
    return value


def _intInRange(name: str, value: Any, low: int, high: int) -> int:
    number: int = _typed(name, value, int)
    if not low <= number <= high:
        raise InvalidTicket(f"Invalid value for {name!r}: {value!r}: expecting {low}-{high}")
    return number


def validateURL(url: str) -> str:
    """
    Check that a ticket URL names something a backend can open.

    @return: The URL normalized as upstream does (C{urlunparse(urlparse())}).
    @raise InvalidTicket: With the reason.
    """

    def bad(reason: str) -> InvalidTicket:
        return InvalidTicket(f"Invalid value for 'url': {url!r}: {reason}")

    if any(c in url for c in "\r\n\0\t "):
        raise bad("Unexpected whitespace or control characters")
    parts = urlsplit(url)
    if parts.scheme not in TICKET_SCHEMES:
        raise bad(f"Unsupported url scheme: {parts.scheme}")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise bad("Expecting an absolute path: file:///path")
        if parts.query or parts.fragment:
            raise bad("Unexpected query or fragment")
    elif parts.scheme == "nbd":
        rest = parts.path if not parts.netloc else ""
        if parts.netloc:
            if not parts.hostname:
                raise bad("Missing NBD server host")
        elif rest.startswith("unix:"):
            socket = rest[len("unix:") :].split(":exportname=", 1)[0]
            if not socket.startswith("/"):
                raise bad("Expecting an absolute socket path: nbd:unix:/path")
        else:
            hostPort = rest.split(":exportname=", 1)[0]
            host, sep, port = hostPort.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise bad("Expecting nbd:unix:/path or nbd:host:port")
    else:
        if not parts.hostname:
            raise bad("Missing host")
        try:
            _ = parts.port
        except ValueError:
            raise bad("Invalid port") from None
        if parts.username is not None or parts.password is not None:
            raise bad("Credentials in the URL are not allowed")
    return urlunsplit(parts)


@define(eq=False)
class Operation:
    """
    One running transfer on a ticket: a GET, PUT, zero, flush or checksum.

    Long operations check L{canceled} after each buffer; the data path
    may also set L{onCancel} to stop at once (abort a connection that is
    waiting for a slow client).

    @ivar kind: For logs: C{read}, C{write}, C{zero}, C{flush}, C{checksum}.
    @ivar offset: First byte of the range the operation covers.
    @ivar done: Bytes completed so far, from C{offset}.
    """

    kind: str
    offset: int = 0
    done: int = 0
    canceled: bool = False
    onCancel: Callable[[], None] | None = None

    def cancel(self) -> None:
        if self.canceled:
            return
        self.canceled = True
        if self.onCancel is not None:
            hook, self.onCancel = self.onCancel, None
            hook()


@define(eq=False)
class Ticket:
    """
    Permission to transfer bytes of one image, with its live state.

    @ivar expires: Monotonic time at which the ticket stops authorizing.
    @ivar accessTime: Monotonic time of the last completed operation.
    @ivar connections: Per-connection state (backend contexts) keyed by
        an id the data path chooses; counted in C{connections}.
    """

    uuid: str
    size: int
    ops: tuple[str, ...]
    timeout: int
    url: str
    inactivityTimeout: int
    transferID: str
    filename: str | None
    sparse: bool
    dirty: bool
    expires: float
    accessTime: float
    canceled: bool = False
    connections: dict[object, Callable[[], object]] = field(factory=dict)
    _running: list[Operation] = field(factory=list)
    _completed: RangeSet = field(factory=RangeSet)
    _written: RangeSet = field(factory=RangeSet)
    _durable: RangeSet = field(factory=RangeSet)
    _idleWaiters: list[Deferred[None]] = field(factory=list)

    def may(self, op: str) -> bool:
        """
        @return: Whether the ticket allows C{op}; C{write} implies C{read}.
        """
        if op == READ:
            return READ in self.ops or WRITE in self.ops
        return op in self.ops

    @property
    def active(self) -> bool:
        return bool(self._running)

    def touch(self, now: float) -> None:
        """
        Extend the ticket by its timeout from C{now}, as after each completed
        operation.
        """
        self.expires = now + self.timeout
        self.accessTime = now

    def extend(self, timeout: int, now: float) -> None:
        """
        PATCH /tickets: set the expiry without changing C{timeout}.
        """
        self.expires = math.floor(now) + timeout

    def compatibleWith(self, other: Ticket) -> bool:
        """
        @return: Whether C{other}, a ticket body added again under this
            ticket's id, may update this ticket in place: it names the same
            image with the same backend options (open mode included), grants
            no less than this one's operations and does not shrink the size,
            so nothing already running or opened becomes wrong.
        """
        return (
            other.url == self.url
            and other.sparse == self.sparse
            and other.dirty == self.dirty
            and set(other.ops) >= set(self.ops)
            and (WRITE in other.ops) == (WRITE in self.ops)
            and other.size >= self.size
        )

    def update(self, other: Ticket) -> None:
        """
        Take the terms of C{other} (a compatible ticket, see
        L{compatibleWith}) while keeping this ticket's live state: running
        operations, connections, counters.
        """
        self.size = other.size
        self.ops = other.ops
        self.timeout = other.timeout
        self.inactivityTimeout = other.inactivityTimeout
        self.transferID = other.transferID
        self.filename = other.filename
        self.expires = other.expires
        self.accessTime = other.accessTime

    def transferred(self) -> int:
        """
        @return: Bytes covered by completed and running operations, each
            byte counted once.
        """
        if not self._running:
            return self._completed.total()
        ranges = self._completed.copy()
        for op in self._running:
            ranges.add(op.offset, op.offset + op.done)
        return ranges.total()

    def writtenRanges(self) -> list[tuple[int, int]]:
        """
        @return: Byte ranges C{[start, end)} completed by PUT and zero
            operations, merged: what a resuming uploader need not send again.
        """
        return self._written.ranges()

    def flushedRanges(self) -> list[tuple[int, int]]:
        """
        @return: The part of L{writtenRanges} that a later flush made durable.
        """
        return self._durable.ranges()

    def flushStarted(self) -> RangeSet:
        """
        @return: What a flush starting now will make durable: every range
            completed so far. Pass it to L{flushed} when the flush succeeds.
        """
        return self._written.copy()

    def flushed(self, snapshot: RangeSet) -> None:
        for start, end in snapshot.ranges():
            self._durable.add(start, end)

    def startOperation(self, op: Operation) -> None:
        self._running.append(op)

    def finishOperation(self, op: Operation, now: float) -> None:
        """
        Record a finished operation and touch the ticket. Canceled
        operations do not count as transferred.
        """
        # The hook refers to the data path (producer, request), which refers
        # to the operation: drop it so the request is freed by reference
        # counting instead of waiting for the cyclic garbage collector.
        op.onCancel = None
        try:
            self._running.remove(op)
        except ValueError:
            return
        if not op.canceled and op.done:
            self._completed.add(op.offset, op.offset + op.done)
            if op.kind in ("write", "zero"):
                self._written.add(op.offset, op.offset + op.done)
        if not self.canceled:
            self.touch(now)
        if not self._running:
            waiters, self._idleWaiters = self._idleWaiters, []
            for d in waiters:
                d.callback(None)

    def cancelOperations(self) -> None:
        for op in list(self._running):
            op.cancel()

    def whenIdle(self) -> Deferred[None]:
        """
        @return: A Deferred firing when no operation runs.
        """
        if not self._running:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idleWaiters.append(d)
        return d

    def closeConnections(self) -> None:
        """
        Close every connection context (backends) held for this ticket.
        """
        closers = list(self.connections.values())
        self.connections.clear()
        for close in closers:
            try:
                close()
            except Exception:
                log.failure(
                    "Closing a connection context of {ticketID} failed", ticketID=shortID(self.uuid)
                )

    def info(self, now: float) -> dict[str, object]:
        """
        @return: The ticket status for GET /tickets, keys in upstream's order.
        """
        idle = 0 if self._running else max(0, int(now) - int(self.accessTime))
        info: dict[str, object] = {
            "active": self.active,
            "canceled": self.canceled,
            "connections": len(self.connections),
            "expires": int(self.expires),
            "idle_time": idle,
            "inactivity_timeout": self.inactivityTimeout,
            "ops": list(self.ops),
            "size": self.size,
            "sparse": self.sparse,
            "dirty": self.dirty,
            "timeout": self.timeout,
            "url": self.url,
            "uuid": self.uuid,
            "transfer_id": self.transferID,
        }
        if self.filename is not None:
            info["filename"] = self.filename
        if len(self.ops) == 1:
            info["transferred"] = self.transferred()
        return info


def parseTicket(body: object, now: float, defaultInactivityTimeout: int) -> Ticket:
    """
    Validate a ticket from the control API, more strictly than upstream.

    @param body: The decoded JSON body.
    @raise InvalidTicket: With the first problem found; nothing is stored.
    """
    if not isinstance(body, dict):
        raise InvalidTicket("Ticket must be a JSON object")
    uuid = _typed("uuid", _require(body, "uuid"), str)
    if not _UUID_RE.match(uuid) or uuid in (".", ".."):
        raise InvalidTicket(
            f"Invalid value for 'uuid': {uuid[:64]!r}: expecting 1-255 characters of "
            "letters, digits and ._~:+=@-"
        )
    size = _intInRange("size", _require(body, "size"), 0, MAX_SIZE)
    ops = _typed("ops", _require(body, "ops"), list)
    if not ops or not all(isinstance(o, str) and o in OPS for o in ops):
        raise InvalidTicket(f"Invalid value for 'ops': {ops!r}: expecting 'read' and/or 'write'")
    timeout = _intInRange("timeout", _require(body, "timeout"), 0, MAX_TIMEOUT)
    url = validateURL(_typed("url", _require(body, "url"), str))
    inactivity = _intInRange(
        "inactivity_timeout",
        body.get("inactivity_timeout", defaultInactivityTimeout),
        1,
        MAX_INACTIVITY_TIMEOUT,
    )
    transferID = body.get("transfer_id")
    if transferID is None:
        transferID = f"(ticket/{uuid[:18]})"
    elif not isinstance(transferID, str) or not _TRANSFER_ID_RE.match(transferID):
        raise InvalidTicket(
            f"Invalid value for 'transfer_id': {transferID!r}: expecting 1-255 printable characters"
        )
    filename = body.get("filename")
    if filename is not None:
        _typed("filename", filename, str)
        if not filename or len(filename) > 255 or _FILENAME_FORBIDDEN.search(filename):
            raise InvalidTicket(
                f"Invalid value for 'filename': {filename[:64]!r}: expecting a file name "
                "without quotes, semicolons, slashes or control characters"
            )
    sparse = _typed("sparse", body.get("sparse", False), bool)
    dirty = _typed("dirty", body.get("dirty", False), bool)
    # Keep the order given, without duplicates.
    uniqueOps = tuple(dict.fromkeys(ops))
    return Ticket(
        uuid=uuid,
        size=size,
        ops=uniqueOps,
        timeout=timeout,
        url=url,
        inactivityTimeout=inactivity,
        transferID=transferID,
        filename=filename,
        sparse=sparse,
        dirty=dirty,
        expires=now + timeout,
        accessTime=now,
    )


@frozen
class _Removal:
    deferred: Deferred[None]
    call: IDelayedCall


@define
class TicketRegistry:
    """
    The tickets of one daemon or proxy, in memory (never persisted).

    @ivar now: Monotonic clock, in seconds.
    @ivar scheduler: Schedules the remove deadline.
    @ivar removeTimeout: Seconds DELETE waits for running operations
        before answering 409.
    @ivar defaultInactivityTimeout: For tickets that name none.
    """

    now: Callable[[], float]
    scheduler: IReactorTime
    removeTimeout: float = 60
    defaultInactivityTimeout: int = 60
    #: Checks a new ticket's URL further (the service knows its own
    #: listeners): returns why the URL is refused, or C{None}.
    urlGuard: Callable[[str], str | None] | None = None
    _tickets: dict[str, Ticket] = field(factory=dict, init=False)
    #: Tickets replaced under an id while operations still ran on them:
    #: canceled, kept until idle so that DELETE of the id waits for them.
    _retired: dict[str, list[Ticket]] = field(factory=dict, init=False)

    def __len__(self) -> int:
        return len(self._tickets)

    def activeCount(self) -> int:
        """
        @return: How many tickets have an operation running.
        """
        return sum(1 for t in self._tickets.values() if t.active)

    def add(self, body: object) -> Ticket:
        """
        Add or replace a ticket from its JSON body.

        @raise InvalidTicket: Nothing is changed then.
        """
        ticket = parseTicket(body, self.now(), self.defaultInactivityTimeout)
        if self.urlGuard is not None:
            reason = self.urlGuard(ticket.url)
            if reason is not None:
                raise InvalidTicket(f"Invalid value for 'url': {ticket.url!r}: {reason}")
        old = self._tickets.get(ticket.uuid)
        if old is not None and not old.canceled and old.compatibleWith(ticket):
            # The same transfer again (an agent retrying, or giving more
            # time or size): running transfers go on under the new terms and
            # a later DELETE still finds and stops them.
            old.update(ticket)
            ticket = old
            verb = "updated"
        else:
            if old is not None:
                # Another image, fewer rights or a smaller size: whatever
                # runs under the old terms stops, and DELETE of the id waits
                # for it as for the new ticket's operations.
                self._retire(old)
            self._tickets[ticket.uuid] = ticket
            verb = "replaced" if old is not None else "added"
        log.info(
            "Ticket {ticketID} {verb}: transfer {transferID}, ops {ops}, size {size}, "
            "timeout {timeout}",
            ticketID=shortID(ticket.uuid),
            verb=verb,
            transferID=ticket.transferID,
            ops=list(ticket.ops),
            size=ticket.size,
            timeout=ticket.timeout,
        )
        return ticket

    def get(self, uuid: str) -> Ticket:
        """
        @raise TicketNotFound: With upstream's text for GET /tickets.
        """
        try:
            return self._tickets[uuid]
        except KeyError:
            raise TicketNotFound(f"No such ticket {uuid!r}") from None

    def lookup(self, uuid: str) -> Ticket | None:
        return self._tickets.get(uuid)

    def extend(self, uuid: str, timeout: int) -> Ticket:
        """
        PATCH /tickets: C{expires = now + timeout}, reviving expired tickets.

        @raise ValueError: If C{timeout} is outside 0-L{MAX_TIMEOUT}, the
            bound of a new ticket's timeout (callers check first).
        @raise TicketNotFound: With upstream's PATCH text.
        """
        if not 0 <= timeout <= MAX_TIMEOUT:
            raise ValueError(f"Invalid value {timeout}: expecting 0-{MAX_TIMEOUT}")
        ticket = self._tickets.get(uuid)
        if ticket is None:
            raise TicketNotFound(f"No such ticket: {uuid}")
        ticket.extend(timeout, self.now())
        log.info(
            "Ticket {ticketID} extended by {timeout} seconds",
            ticketID=shortID(uuid),
            timeout=timeout,
        )
        return ticket

    def authorize(self, uuid: str, op: str) -> Ticket:
        """
        Check that ticket C{uuid} allows C{op} now.

        Checks run in upstream's order: exists, canceled, expired, op.

        @raise AuthorizationError: With upstream's exact text (403).
        """
        ticket = self._tickets.get(uuid)
        if ticket is None:
            raise AuthorizationError(f"No such ticket {uuid}")
        if ticket.canceled:
            raise AuthorizationError(f"Transfer={ticket.transferID} was canceled")
        if ticket.expires <= self.now():
            raise AuthorizationError(f"Transfer={ticket.transferID} expired")
        if not ticket.may(op):
            raise AuthorizationError(f"Transfer={ticket.transferID} forbids {op}")
        return ticket

    def touch(self, ticket: Ticket) -> None:
        ticket.touch(self.now())

    def startOperation(self, ticket: Ticket, op: Operation) -> None:
        """
        Mark C{op} as running on C{ticket} (C{active}, C{transferred}).

        @raise OperationCanceled: When the ticket was canceled meanwhile.
        """
        if ticket.canceled:
            raise OperationCanceled(f"Transfer {ticket.transferID} was canceled")
        ticket.startOperation(op)

    def finishOperation(self, ticket: Ticket, op: Operation) -> None:
        ticket.finishOperation(op, self.now())

    def remove(self, uuid: str) -> Deferred[None]:
        """
        DELETE /tickets/<uuid>: cancel the ticket and remove it once no
        operation runs.

        Unknown tickets succeed at once (idempotent). Running operations are
        asked to stop; if they do not within L{removeTimeout} the Deferred
        fails with L{TicketBusy} and the ticket stays, canceled, for a later
        DELETE to finish the job.
        """
        ticket = self._tickets.get(uuid)
        retired = self._retired.get(uuid, [])
        if ticket is None and not retired:
            return succeed(None)
        if ticket is not None:
            if not ticket.canceled:
                log.info("Canceling ticket {ticketID}", ticketID=shortID(uuid))
            ticket.canceled = True
            if not ticket.active and not retired:
                self._drop(ticket)
                return succeed(None)
            ticket.cancelOperations()
        transferID = ticket.transferID if ticket is not None else retired[-1].transferID
        result: Deferred[None] = Deferred()
        # Every ticket ever stored under this id: after DELETE answers,
        # nothing writes with any of them.
        waits = [t.whenIdle() for t in retired]
        if ticket is not None:
            waits.append(ticket.whenIdle())
        idle: Deferred[list[None]] = gatherResults(waits)

        def timedOut() -> None:
            log.warn(
                "Timeout canceling ticket {ticketID}: operations still running",
                ticketID=shortID(uuid),
            )
            result.errback(TicketBusy(f"Timeout cancelling transfer {transferID}"))

        call = self.scheduler.callLater(self.removeTimeout, timedOut)

        def idleNow(_: object) -> None:
            if call.active():
                call.cancel()
                if ticket is not None:
                    self._drop(ticket)
                result.callback(None)

        idle.addCallback(idleNow)
        return result

    def _retire(self, ticket: Ticket) -> None:
        """
        Cancel a ticket replaced under its id; keep it until its operations
        end, then close its connections.
        """
        ticket.canceled = True
        if not ticket.active:
            ticket.closeConnections()
            return
        ticket.cancelOperations()
        retired = self._retired.setdefault(ticket.uuid, [])
        retired.append(ticket)

        def idle(_: None) -> None:
            retired.remove(ticket)
            if not retired and self._retired.get(ticket.uuid) is retired:
                del self._retired[ticket.uuid]
            ticket.closeConnections()

        ticket.whenIdle().addCallback(idle)

    def removeAll(self) -> None:
        """
        DELETE /tickets/: drop every ticket at once, without waiting.
        """
        tickets = list(self._tickets.values())
        self._tickets.clear()
        for ticket in tickets:
            ticket.canceled = True
            ticket.cancelOperations()
            ticket.closeConnections()
        log.info("Removed all tickets ({count})", count=len(tickets))

    def _drop(self, ticket: Ticket) -> None:
        # A replaced ticket under the same id must survive the old one's removal.
        if self._tickets.get(ticket.uuid) is ticket:
            del self._tickets[ticket.uuid]
        ticket.closeConnections()
        log.info("Ticket {ticketID} removed", ticketID=shortID(ticket.uuid))
