"""
Unit tests for L{imageio.proxy._relay} and L{imageio.proxy._tickets}: the
upload pipe, the download relay and the stored-ticket table, with fakes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from imageio.backends.httpclient import ReadTimeout
from imageio.proxy import _tickets
from imageio.proxy._relay import COALESCE_SIZE, READ_TIMEOUT, Pipe, ResponseRelay
from imageio.proxy._signedticket import Claims
from imageio.proxy._tickets import ProxyTickets, TooManyTickets


class PipeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.inbound = StringTransport()
        self.events: list[str] = []
        self.pipe = Pipe(
            self.inbound,
            100,
            onComplete=lambda: self.events.append("complete"),
            onProgress=lambda: self.events.append("progress"),
            onLost=lambda f: self.events.append("lost"),
            highWater=10,
        )
        self.outbound = StringTransport()

    def test_earlyData(self) -> None:
        """
        Body bytes that arrive before the daemon connection wait in the
        pipe; the client is paused once they reach the high water mark and
        resumed when the daemon connection takes them.
        """
        self.pipe.dataReceived(b"12345")
        self.assertEqual(self.inbound.producerState, "producing")
        self.pipe.dataReceived(b"67890")
        self.assertEqual(self.inbound.producerState, "paused")
        finished = self.pipe.startProducing(self.outbound)
        self.assertEqual(self.outbound.value(), b"1234567890")
        self.assertEqual(self.inbound.producerState, "producing")
        self.assertNoResult(finished)
        self.assertEqual(self.pipe.length, 100)
        self.assertEqual(self.pipe.bytesWritten, 10)

    def test_backpressure(self) -> None:
        """
        When the daemon connection pauses the pipe, the client connection
        is paused, and resumed with it.
        """
        self.pipe.startProducing(self.outbound)
        self.pipe.pauseProducing()
        self.assertEqual(self.inbound.producerState, "paused")
        self.pipe.resumeProducing()
        self.assertEqual(self.inbound.producerState, "producing")
        self.assertIn("progress", self.events)
        self.pipe.dataReceived(b"abc")
        self.assertEqual(self.outbound.value(), b"abc")

    def test_complete(self) -> None:
        """
        The end of the body finishes the daemon request body and gives the
        client connection back to the channel, unpaused.
        """
        finished = self.pipe.startProducing(self.outbound)
        self.pipe.pauseProducing()
        self.pipe.bodyComplete()
        self.successResultOf(finished)
        self.assertEqual(self.inbound.producerState, "producing")
        self.assertEqual(self.events, ["complete"])
        # Pauses after the body do not reach the client connection.
        self.pipe.pauseProducing()
        self.assertEqual(self.inbound.producerState, "producing")

    def test_completeBeforeStart(self) -> None:
        """
        A body complete before the daemon connection is sent whole at once.
        """
        self.pipe.dataReceived(b"all")
        self.pipe.bodyComplete()
        finished = self.pipe.startProducing(self.outbound)
        self.successResultOf(finished)
        self.assertEqual(self.outbound.value(), b"all")

    def test_clientLost(self) -> None:
        """
        A client that goes away fails the daemon request body, after the
        owner heard of it.
        """
        finished = self.pipe.startProducing(self.outbound)
        order: list[str] = []
        finished.addErrback(lambda f: order.append(f"failed after {self.events}"))
        self.pipe.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(order, ["failed after ['lost']"])

    def test_clientLostBeforeStart(self) -> None:
        """
        A client lost before the daemon connection fails the body at once.
        """
        self.pipe.dataReceived(b"abc")
        self.pipe.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(self.pipe.startProducing(self.outbound), ConnectionLost)
        self.assertEqual(self.outbound.value(), b"")

    def test_abandoned(self) -> None:
        """
        Once the daemon request ended, the rest of the body is dropped and
        the body Deferred never fires.
        """
        finished = self.pipe.startProducing(self.outbound)
        self.pipe.stopProducing()
        self.pipe.dataReceived(b"late")
        self.pipe.bodyComplete()
        self.pipe.connectionLost(Failure(ConnectionLost()))
        self.assertNoResult(finished)
        self.assertEqual(self.outbound.value(), b"")


class _Holder(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render_GET(self, request: Request) -> Any:
        self.requests.append(request)
        return NOT_DONE_YET


class ResponseRelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        resource = _Holder()
        site = Site(resource, reactor=self.clock)
        self.channel = site.buildProtocol(None)
        self.client = StringTransport()
        self.channel.makeConnection(self.client)
        self.channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.request = resource.requests[0]
        self.request.setHeader(b"content-length", b"%d" % (2 * COALESCE_SIZE))
        self.relay = ResponseRelay(self.request, self.clock)
        self.daemon = StringTransport()
        self.relay.makeConnection(self.daemon)

    def body(self) -> bytes:
        value: bytes = self.client.value()
        return value.split(b"\r\n\r\n", 1)[1]

    def test_relay(self) -> None:
        """
        Body pieces reach the client in larger writes, and the response
        finishes when the daemon's body is complete.
        """
        self.relay.dataReceived(b"a" * 1000)
        self.assertEqual(self.client.value(), b"")
        self.clock.advance(0)
        self.assertEqual(self.body(), b"a" * 1000)
        rest = 2 * COALESCE_SIZE - 1000
        self.relay.dataReceived(b"b" * rest)
        self.relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.body(), b"a" * 1000 + b"b" * rest)
        self.successResultOf(self.relay.done)
        self.assertTrue(self.request.finished)
        # Only the connection's own idle timer is left.
        calls = self.clock.getDelayedCalls()
        owners = [getattr(getattr(c, "func", None), "__self__", None) for c in calls]
        self.assertEqual([type(o) for o in owners], [HTTPChannel])

    def test_backpressure(self) -> None:
        """
        A full client connection pauses the daemon connection.
        """
        producer: Any = self.client.producer
        producer.pauseProducing()
        self.assertEqual(self.daemon.producerState, "paused")
        producer.resumeProducing()
        self.assertEqual(self.daemon.producerState, "producing")

    def test_daemonCutsShort(self) -> None:
        """
        A daemon body that ends early aborts the client connection: the
        client never sees a short body as complete.
        """
        self.relay.dataReceived(b"a" * 1000)
        self.relay.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))
        self.failureResultOf(self.relay.done, ResponseFailed)
        self.assertTrue(self.client.disconnecting)
        self.assertFalse(self.request.finished)

    def test_clientGone(self) -> None:
        """
        A client that goes away closes the daemon connection, so it is not
        reused with a body half read.
        """
        self.channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.daemon.producerState, "stopped")
        self.successResultOf(self.relay.done)
        self.relay.dataReceived(b"late")
        self.relay.connectionLost(Failure(ResponseFailed([Failure(ConnectionLost())])))

    def test_stalled(self) -> None:
        """
        Nothing moving for the read timeout cuts both connections.
        """
        self.relay.dataReceived(b"a")
        self.clock.pump([1] * int(READ_TIMEOUT * 1.5 + 1))
        self.failureResultOf(self.relay.done, ReadTimeout)
        self.assertEqual(self.daemon.producerState, "stopped")
        self.assertTrue(self.client.disconnecting)


def claims(ticketID: str, expires: int) -> Claims:
    return Claims(
        transferTicket=ticketID,
        imagedURI="https://host:54322",
        notBefore=expires - 300,
        expires=expires,
    )


class ProxyTicketsTests(SynchronousTestCase):
    def test_addGetRemove(self) -> None:
        """
        Tickets are stored by transfer ticket, replaced and removed.
        """
        store = ProxyTickets(lambda: 1000.0)
        store.add(claims("t1", 2000))
        store.add(claims("t1", 3000))
        self.assertEqual(store.get("t1"), claims("t1", 3000))
        self.assertTrue(store.remove("t1"))
        self.assertFalse(store.remove("t1"))
        self.assertIsNone(store.get("t1"))

    def test_expiredForgotten(self) -> None:
        """
        Expired tickets are kept for a grace period, then forgotten.
        """
        now = [1000.0]
        store = ProxyTickets(lambda: now[0])
        store.add(claims("old", 1100))
        store.add(claims("new", 1000 + _tickets.EXPIRED_GRACE + 500))
        now[0] = 1200
        store.add(claims("x", 5000))
        self.assertIsNotNone(store.get("old"))
        now[0] = 1100 + _tickets.EXPIRED_GRACE
        store.add(claims("y", 9000))
        self.assertIsNone(store.get("old"))
        self.assertIsNotNone(store.get("new"))
        self.assertEqual(len(store), 3)

    def test_full(self) -> None:
        """
        A full store refuses new tickets but still replaces known ones.
        """
        store = ProxyTickets(lambda: 0.0, maxTickets=2)
        store.add(claims("a", 100))
        store.add(claims("b", 100))
        self.assertRaises(TooManyTickets, store.add, claims("c", 100))
        store.add(claims("a", 200))
