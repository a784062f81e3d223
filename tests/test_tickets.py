"""
Tests for L{imageio.tickets}: validation, authorization, expiry on a fake
clock, operations, C{transferred} and cancellation.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from imageio.tickets import (
    MAX_TIMEOUT,
    AuthorizationError,
    InvalidTicket,
    Operation,
    OperationCanceled,
    TicketBusy,
    TicketNotFound,
    TicketRegistry,
    parseTicket,
    redactURL,
    shortID,
    validateURL,
)


def ticketBody(**kw: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "uuid": "t1",
        "size": 1000,
        "url": "file:///var/tmp/disk.raw",
        "timeout": 300,
        "ops": ["read"],
    }
    body.update(kw)
    return body


class ParseTicketTests(SynchronousTestCase):
    def assertInvalid(self, body: object, text: str) -> None:
        e = self.assertRaises(InvalidTicket, parseTicket, body, 0, 60)
        self.assertIn(text, str(e))
        self.assertTrue(str(e).startswith("Invalid ticket: "))

    def test_defaults(self) -> None:
        """
        Optional fields get upstream's defaults and the transfer id falls back
        to the ticket id.
        """
        t = parseTicket(ticketBody(uuid="a" * 40), 10, 60)
        self.assertEqual(t.inactivityTimeout, 60)
        self.assertEqual(t.transferID, "(ticket/" + "a" * 18 + ")")
        self.assertIsNone(t.filename)
        self.assertFalse(t.sparse)
        self.assertFalse(t.dirty)
        self.assertEqual(t.expires, 310)

    def test_missingRequired(self) -> None:
        """
        Each required field missing is named with upstream's text.
        """
        for name in ("uuid", "size", "ops", "timeout", "url"):
            body = ticketBody()
            del body[name]
            self.assertInvalid(body, f"Required ticket parameter is missing: {name}")

    def test_notAnObject(self) -> None:
        """
        A JSON value that is not an object is refused with a clear reason.
        """
        self.assertInvalid([1, 2], "Ticket must be a JSON object")

    def test_wrongTypes(self) -> None:
        """
        Wrong types are refused, and JSON booleans are not integers.
        """
        self.assertInvalid(ticketBody(size="1"), "Invalid value for 'size': '1'")
        self.assertInvalid(ticketBody(size=True), "Invalid value for 'size': True")
        self.assertInvalid(ticketBody(timeout=False), "Invalid value for 'timeout'")
        self.assertInvalid(ticketBody(size=None), "Invalid value for 'size': None")
        self.assertInvalid(ticketBody(sparse=1), "Invalid value for 'sparse'")
        self.assertInvalid(ticketBody(dirty="yes"), "Invalid value for 'dirty'")
        self.assertInvalid(ticketBody(ops="read"), "Invalid value for 'ops'")

    def test_insaneNumbers(self) -> None:
        """
        Negative sizes and absurd timeouts are refused.
        """
        self.assertInvalid(ticketBody(size=-1), "Invalid value for 'size'")
        self.assertInvalid(ticketBody(size=2**63), "Invalid value for 'size'")
        self.assertInvalid(ticketBody(timeout=-1), "Invalid value for 'timeout'")
        self.assertInvalid(ticketBody(timeout=10**18), "Invalid value for 'timeout'")
        self.assertInvalid(ticketBody(inactivity_timeout=0), "'inactivity_timeout'")
        parseTicket(ticketBody(timeout=MAX_TIMEOUT, size=0), 0, 60)

    def test_ops(self) -> None:
        """
        Only read and write are operations; duplicates collapse.
        """
        self.assertInvalid(ticketBody(ops=["write", "exec"]), "Invalid value for 'ops'")
        self.assertInvalid(ticketBody(ops=[]), "Invalid value for 'ops'")
        t = parseTicket(ticketBody(ops=["write", "read", "write"]), 0, 60)
        self.assertEqual(t.ops, ("write", "read"))

    def test_uuidSafeInPath(self) -> None:
        """
        Ticket ids that could escape a path or a log line are refused.
        """
        for bad in ("", "a/b", "..", ".", "a b", "a%2fb", "x" * 300, "a\nb", "*"):
            self.assertInvalid(ticketBody(uuid=bad), "Invalid value for 'uuid'")
        parseTicket(ticketBody(uuid="9f8e7d6c-1111-2222-3333-444455556666"), 0, 60)

    def test_filenameSafeInHeader(self) -> None:
        """
        File names that would break Content-Disposition are refused.
        """
        for bad in ('a"b', "a;b", "a\r\nb", "../x", "", "a\\b"):
            self.assertInvalid(ticketBody(filename=bad), "Invalid value for 'filename'")
        self.assertEqual(
            parseTicket(ticketBody(filename="disk 1.raw"), 0, 60).filename, "disk 1.raw"
        )

    def test_urls(self) -> None:
        """
        URLs must be absolute and of a known scheme.
        """
        self.assertInvalid(ticketBody(url="foo:///x"), "Unsupported url scheme: foo")
        self.assertInvalid(ticketBody(url="file:relative/path"), "Expecting an absolute path")
        self.assertInvalid(ticketBody(url="file://host/x"), "Expecting an absolute path")
        self.assertInvalid(ticketBody(url="nbd:unix:"), "nbd:unix:/path")
        self.assertInvalid(ticketBody(url="nbd:host"), "nbd:host:port")
        self.assertInvalid(ticketBody(url="https:///images/x"), "Missing host")
        self.assertInvalid(ticketBody(url="https://u:p@h/images/x"), "Credentials")
        for good in (
            "file:///var/tmp/disk.raw",
            "nbd:unix:/run/vdsm/nbd/1.sock",
            "nbd:unix:/tmp/s.sock:exportname=sda",
            "nbd:localhost:10809",
            "nbd://localhost:10809/export",
            "https://host.example.com:54322/images/t1",
            "http://host:80/images/t1",
        ):
            self.assertEqual(validateURL(good), good)


class RegistryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.registry = TicketRegistry(
            now=self.clock.seconds, scheduler=self.clock, removeTimeout=60
        )

    def test_addAndGet(self) -> None:
        """
        Added tickets are found by uuid; unknown ids give upstream's 404 text.
        """
        t = self.registry.add(ticketBody())
        self.assertIs(self.registry.get("t1"), t)
        e = self.assertRaises(TicketNotFound, self.registry.get, "nope")
        self.assertEqual(str(e), "No such ticket 'nope'")

    def test_readdUpdatesInPlace(self) -> None:
        """
        Adding the same uuid again for the same image updates the live ticket
        (size, timeout, transfer id) and keeps its counters, so a transfer
        that runs on goes on under the new terms.
        """
        old = self.registry.add(ticketBody(ops=["write"]))
        op = Operation("write", 0)
        self.registry.startOperation(old, op)
        op.done = 10
        new = self.registry.add(ticketBody(ops=["read", "write"], size=5000, transfer_id="tr-2"))
        self.assertIs(old, new)
        self.assertEqual(self.registry.get("t1").size, 5000)
        self.assertEqual(new.transferID, "tr-2")
        self.assertEqual(new.ops, ("read", "write"))
        self.assertEqual(new.transferred(), 10)
        self.assertFalse(op.canceled)

    def test_deleteAfterReaddStopsRunningOperation(self) -> None:
        """
        After a ticket is added again under its id while an upload runs,
        DELETE still cancels that upload and answers only once it stopped:
        after DELETE, nothing writes.
        """
        t = self.registry.add(ticketBody(ops=["write"]))
        op = Operation("write", 0)
        self.registry.startOperation(t, op)
        self.registry.add(ticketBody(ops=["write"]))
        d = self.registry.remove("t1")
        self.assertTrue(op.canceled)
        self.assertNoResult(d)
        self.registry.finishOperation(t, op)
        self.successResultOf(d)
        self.assertIsNone(self.registry.lookup("t1"))

    def test_readdNarrowerCancelsOldTicket(self) -> None:
        """
        Adding the uuid again with another URL, fewer rights or a smaller
        size makes a new ticket and cancels the old one's operations; DELETE
        of the id waits for them too.
        """
        for changed in (
            {"url": "file:///var/tmp/other.raw"},
            {"ops": ["read"]},
            {"size": 10},
            {"sparse": True},
        ):
            old = self.registry.add(ticketBody(ops=["write"]))
            op = Operation("write", 0)
            self.registry.startOperation(old, op)
            closed: list[int] = []
            old.connections["c1"] = lambda closed=closed: closed.append(1)
            new = self.registry.add(ticketBody(**{"ops": ["write"], **changed}))
            self.assertIsNot(old, new, changed)
            self.assertTrue(op.canceled, changed)
            self.assertTrue(old.canceled)
            self.assertFalse(new.canceled)
            self.assertIs(self.registry.lookup("t1"), new)
            d = self.registry.remove("t1")
            self.assertNoResult(d)
            self.assertEqual(closed, [])
            self.registry.finishOperation(old, op)
            self.assertEqual(closed, [1])
            self.successResultOf(d)
            self.assertIsNone(self.registry.lookup("t1"))

    def test_readdWhileDeleting(self) -> None:
        """
        A ticket added again while its DELETE waits is a fresh ticket; a
        second DELETE waits for the old operations as well.
        """
        old = self.registry.add(ticketBody())
        op = Operation("read", 0)
        self.registry.startOperation(old, op)
        first = self.registry.remove("t1")
        new = self.registry.add(ticketBody())
        self.assertIsNot(old, new)
        self.assertEqual(self.registry.authorize("t1", "read"), new)
        second = self.registry.remove("t1")
        self.assertNoResult(second)
        self.clock.advance(60)
        self.failureResultOf(first, TicketBusy)
        self.failureResultOf(second, TicketBusy)
        self.registry.finishOperation(old, op)
        self.successResultOf(self.registry.remove("t1"))
        self.assertIsNone(self.registry.lookup("t1"))

    def test_authorizeOrder(self) -> None:
        """
        Authorization checks exist, canceled, expired and op, with upstream's texts.
        """
        self.registry.add(ticketBody(transfer_id="tr-1", timeout=10))
        e = self.assertRaises(AuthorizationError, self.registry.authorize, "x", "read")
        self.assertEqual(str(e), "You are not allowed to access this resource: No such ticket x")
        e = self.assertRaises(AuthorizationError, self.registry.authorize, "t1", "write")
        self.assertEqual(
            str(e), "You are not allowed to access this resource: Transfer=tr-1 forbids write"
        )
        self.clock.advance(10)
        e = self.assertRaises(AuthorizationError, self.registry.authorize, "t1", "read")
        self.assertEqual(
            str(e), "You are not allowed to access this resource: Transfer=tr-1 expired"
        )
        self.registry.get("t1").canceled = True
        e = self.assertRaises(AuthorizationError, self.registry.authorize, "t1", "read")
        self.assertEqual(
            str(e), "You are not allowed to access this resource: Transfer=tr-1 was canceled"
        )

    def test_writeImpliesRead(self) -> None:
        """
        A write ticket authorizes reads; a read ticket does not authorize writes.
        """
        self.registry.add(ticketBody(ops=["write"]))
        self.registry.authorize("t1", "read")
        self.registry.authorize("t1", "write")

    def test_expiryAndTouch(self) -> None:
        """
        Completed operations extend the ticket by its timeout; expiry is only
        checked at authorization, so running operations are not interrupted.
        """
        t = self.registry.add(ticketBody(timeout=10))
        self.clock.advance(9)
        op = Operation("read", 0)
        self.registry.startOperation(t, op)
        self.clock.advance(5)  # past the original expiry while running
        op.done = 100
        self.registry.finishOperation(t, op)
        self.assertEqual(t.expires, self.clock.seconds() + 10)
        self.registry.authorize("t1", "read")

    def test_extendRevivesAndKeepsTimeout(self) -> None:
        """
        PATCH sets expires from now without changing the ticket's timeout.
        """
        t = self.registry.add(ticketBody(timeout=10))
        self.clock.advance(20)
        self.assertRaises(AuthorizationError, self.registry.authorize, "t1", "read")
        self.registry.extend("t1", 100)
        self.registry.authorize("t1", "read")
        self.assertEqual(t.info(self.clock.seconds())["timeout"], 10)
        self.assertEqual(t.info(self.clock.seconds())["expires"], int(self.clock.seconds()) + 100)
        e = self.assertRaises(TicketNotFound, self.registry.extend, "nope", 1)
        self.assertEqual(str(e), "No such ticket: nope")

    def test_urlGuard(self) -> None:
        """
        The registry's URL guard refuses tickets (400 text) and changes
        nothing.
        """
        self.registry.urlGuard = lambda url: "names this daemon" if "self" in url else None
        e = self.assertRaises(
            InvalidTicket, self.registry.add, ticketBody(url="https://self:54322/images/t1")
        )
        self.assertEqual(
            str(e),
            "Invalid ticket: Invalid value for 'url': 'https://self:54322/images/t1': "
            "names this daemon",
        )
        self.assertIsNone(self.registry.lookup("t1"))
        self.registry.add(ticketBody(url="https://other:54322/images/t1"))

    def test_extendBounded(self) -> None:
        """
        Extending takes the bound of a new ticket's timeout.
        """
        t = self.registry.add(ticketBody())
        expires = t.expires
        self.assertRaises(ValueError, self.registry.extend, "t1", 10**18)
        self.assertRaises(ValueError, self.registry.extend, "t1", MAX_TIMEOUT + 1)
        self.assertRaises(ValueError, self.registry.extend, "t1", -1)
        self.assertEqual(t.expires, expires)
        self.registry.extend("t1", MAX_TIMEOUT)
        self.assertEqual(t.expires, 1000 + MAX_TIMEOUT)

    def test_idleTime(self) -> None:
        """
        idle_time counts from the last completed operation and is 0 while active.
        """
        t = self.registry.add(ticketBody())
        self.clock.advance(7)
        self.assertEqual(t.info(self.clock.seconds())["idle_time"], 7)
        op = Operation("read", 0)
        self.registry.startOperation(t, op)
        self.assertEqual(t.info(self.clock.seconds())["idle_time"], 0)
        self.assertTrue(t.info(self.clock.seconds())["active"])
        self.registry.finishOperation(t, op)
        self.clock.advance(3)
        self.assertEqual(t.info(self.clock.seconds())["idle_time"], 3)

    def test_transferredUnionOfRanges(self) -> None:
        """
        transferred counts every byte once across completed and running
        operations; canceled operations do not count.
        """
        t = self.registry.add(ticketBody(ops=["write"], size=10000))
        for kind, offset, done in (("write", 5, 5), ("zero", 0, 4096), ("read", 0, 10)):
            op = Operation(kind, offset)
            self.registry.startOperation(t, op)
            op.done = done
            self.registry.finishOperation(t, op)
        self.assertEqual(t.info(0)["transferred"], 4096)
        running = Operation("write", 8000)
        self.registry.startOperation(t, running)
        running.done = 100
        self.assertEqual(t.transferred(), 4196)
        running.canceled = True
        self.registry.finishOperation(t, running)
        self.assertEqual(t.transferred(), 4096)

    def test_transferredOmittedForReadWrite(self) -> None:
        """
        Tickets with both ops have no transferred key, as upstream.
        """
        t = self.registry.add(ticketBody(ops=["read", "write"]))
        self.assertNotIn("transferred", t.info(0))

    def test_infoKeysInUpstreamOrder(self) -> None:
        """
        GET /tickets fields come in upstream's order with upstream's names.
        """
        t = self.registry.add(ticketBody(filename="disk.raw", transfer_id="tr-1"))
        self.assertEqual(
            list(t.info(0)),
            [
                "active", "canceled", "connections", "expires", "idle_time",
                "inactivity_timeout", "ops", "size", "sparse", "dirty", "timeout",
                "url", "uuid", "transfer_id", "filename", "transferred",
            ],
        )  # fmt: skip

    def test_removeIdle(self) -> None:
        """
        Removing an idle ticket succeeds at once and closes its connections;
        removing an unknown ticket succeeds too.
        """
        t = self.registry.add(ticketBody())
        closed: list[int] = []
        t.connections["c1"] = lambda: closed.append(1)
        self.successResultOf(self.registry.remove("t1"))
        self.assertEqual(closed, [1])
        self.assertIsNone(self.registry.lookup("t1"))
        self.successResultOf(self.registry.remove("t1"))

    def test_removeWaitsForOperations(self) -> None:
        """
        Removing a ticket with a running operation cancels it and completes
        once the operation finishes within the deadline.
        """
        t = self.registry.add(ticketBody())
        op = Operation("read", 0)
        hooked: list[bool] = []
        op.onCancel = lambda: hooked.append(True)
        self.registry.startOperation(t, op)
        d = self.registry.remove("t1")
        self.assertNoResult(d)
        self.assertTrue(op.canceled)
        self.assertEqual(hooked, [True])
        self.assertTrue(t.info(0)["canceled"])
        e = self.assertRaises(AuthorizationError, self.registry.authorize, "t1", "read")
        self.assertIn("was canceled", str(e))
        self.assertRaises(OperationCanceled, self.registry.startOperation, t, Operation("read"))
        self.clock.advance(30)
        self.registry.finishOperation(t, op)
        self.successResultOf(d)
        self.assertIsNone(self.registry.lookup("t1"))

    def test_finishDropsCancelHook(self) -> None:
        """
        A finished operation lets go of its cancel hook, which refers back
        to the request serving it, and a late cancel calls nothing.
        """
        t = self.registry.add(ticketBody())
        op = Operation("read", 0)
        hooked: list[bool] = []
        op.onCancel = lambda: hooked.append(True)
        self.registry.startOperation(t, op)
        self.registry.finishOperation(t, op)
        self.assertIsNone(op.onCancel)
        op.cancel()
        self.assertEqual(hooked, [])

    def test_removeTimesOutThenSucceeds(self) -> None:
        """
        When operations outlive the deadline, remove fails with upstream's 409
        text and the ticket stays canceled; a later remove succeeds.
        """
        self.registry.add(ticketBody(transfer_id="tr-9"))
        t = self.registry.get("t1")
        op = Operation("write", 0)
        self.registry.startOperation(t, op)
        d = self.registry.remove("t1")
        self.clock.advance(60)
        f = self.failureResultOf(d, TicketBusy)
        self.assertEqual(str(f.value), "Timeout cancelling transfer tr-9")
        self.assertIs(self.registry.lookup("t1"), t)
        self.assertTrue(t.canceled)
        self.registry.finishOperation(t, op)
        self.successResultOf(self.registry.remove("t1"))
        self.assertIsNone(self.registry.lookup("t1"))

    def test_removeOldKeepsReplacement(self) -> None:
        """
        Finishing the removal of a replaced ticket leaves its replacement.
        """
        old = self.registry.add(ticketBody())
        op = Operation("read", 0)
        self.registry.startOperation(old, op)
        d = self.registry.remove("t1")
        new = self.registry.add(ticketBody(size=5))
        self.registry.finishOperation(old, op)
        self.successResultOf(d)
        self.assertIs(self.registry.lookup("t1"), new)

    def test_removeAll(self) -> None:
        """
        Removing all tickets drops them at once and cancels their operations.
        """
        a = self.registry.add(ticketBody(uuid="a"))
        self.registry.add(ticketBody(uuid="b"))
        op = Operation("read", 0)
        self.registry.startOperation(a, op)
        self.registry.removeAll()
        self.assertEqual(len(self.registry), 0)
        self.assertTrue(op.canceled)

    def test_writtenAndFlushedRanges(self) -> None:
        """
        Written ranges merge; only those completed before a flush are flushed.
        """
        t = self.registry.add(ticketBody(ops=["write"], size=10000))
        for offset in (0, 100):
            op = Operation("write", offset)
            self.registry.startOperation(t, op)
            op.done = 100
            self.registry.finishOperation(t, op)
        snapshot = t.flushStarted()
        op = Operation("write", 500)
        self.registry.startOperation(t, op)
        op.done = 10
        self.registry.finishOperation(t, op)
        t.flushed(snapshot)
        self.assertEqual(t.writtenRanges(), [(0, 200), (500, 510)])
        self.assertEqual(t.flushedRanges(), [(0, 200)])

    def test_redactURL(self) -> None:
        """
        Logged URLs keep paths and sockets but shorten the ticket id of a
        proxy-mode URL.
        """
        self.assertEqual(
            redactURL("https://host:54322/images/0123456789abcdef"),
            "https://host:54322/images/01234567...",
        )
        self.assertEqual(redactURL("file:///var/tmp/disk.raw"), "file:///var/tmp/disk.raw")
        self.assertEqual(redactURL("nbd:unix:/run/x.sock"), "nbd:unix:/run/x.sock")

    def test_shortID(self) -> None:
        """
        Log lines show only a prefix of long ticket ids.
        """
        self.assertEqual(shortID("0123456789abcdef"), "01234567...")
        self.assertEqual(shortID("t1"), "t1")
