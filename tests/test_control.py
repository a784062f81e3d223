"""
Tests for the tickets control API (L{imageio.control.tickets}), through the
real twisted.web HTTP parser over a L{StringTransport}.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase

from imageio.control._metrics import Metrics
from imageio.control.tickets import controlResource
from imageio.tickets import MAX_TIMEOUT, Operation, TicketRegistry
from imageio.web import ImageioSite
from tests._daemon import DaemonTestCase, control
from tests.test_tickets import ticketBody


class Response:
    """
    A parsed HTTP/1.1 response.
    """

    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1])
        self.headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower()] = value.strip()

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)


def request(method: str, path: str, body: bytes | None = None, headers: str = "") -> bytes:
    raw = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}".encode()
    if body is not None:
        raw += b"Content-Length: %d\r\n" % len(body)
    return raw + b"\r\n" + (body or b"")


def ticketJSON(**kw: Any) -> bytes:
    return json.dumps(ticketBody(**kw)).encode()


class ControlAPITests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(5000)
        self.registry = TicketRegistry(
            now=self.clock.seconds, scheduler=self.clock, removeTimeout=60
        )
        self.metrics = Metrics()
        self.site = ImageioSite(
            controlResource(self.registry, self.metrics),
            "control",
            reactor=self.clock,
            metrics=self.metrics,
        )

    def call(self, raw: bytes) -> Response:
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(raw)
        value = transport.value()
        self.assertTrue(value, "no response")
        channel.connectionLost(None)
        return Response(value)

    def assertError(self, response: Response, status: int, text: str) -> None:
        self.assertEqual(response.status, status, response.text)
        self.assertEqual(response.text, text + "\n")
        self.assertEqual(response.headers[b"content-type"], b"text/plain; charset=UTF-8")

    def test_putAddsTicketUnderBodyUUID(self) -> None:
        """
        PUT answers 200 with an empty body and stores the ticket under the
        body's uuid, whatever the URL says.
        """
        r = self.call(request("PUT", "/tickets/other", ticketJSON()))
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers[b"content-length"], b"0")
        self.assertEqual(r.body, b"")
        self.assertTrue(r.headers[b"server"].startswith(b"imageio/"))
        self.assertIsNotNone(self.registry.lookup("t1"))
        self.assertIsNone(self.registry.lookup("other"))

    def test_putErrors(self) -> None:
        """
        Bad ticket bodies get 400 with upstream's texts and store nothing.
        """
        self.assertError(
            self.call(request("PUT", "/tickets/", ticketJSON())), 400, "Ticket id is required"
        )
        r = self.call(request("PUT", "/tickets/t1", b"{not json"))
        self.assertEqual(r.status, 400)
        self.assertTrue(r.text.startswith("Ticket is not in a json format: "))
        r = self.call(request("PUT", "/tickets/t1", b'{"uuid": "t1", "size": NaN}'))
        self.assertEqual(r.status, 400)
        r = self.call(request("PUT", "/tickets/t1", b'{"uuid": "t1", "uuid": "t2"}'))
        self.assertEqual(r.status, 400)
        self.assertIn("Duplicate key", r.text)
        r = self.call(request("PUT", "/tickets/t1", b"\xff\xfe"))
        self.assertEqual(r.status, 400)
        self.assertError(
            self.call(request("PUT", "/tickets/t1", b"[1]")),
            400,
            "Invalid ticket: Ticket must be a JSON object",
        )
        self.assertError(
            self.call(request("PUT", "/tickets/t1", ticketJSON(size="1"))),
            400,
            "Invalid ticket: Invalid value for 'size': '1': expecting a <class 'int'> value",
        )
        body = json.loads(ticketJSON())
        del body["size"]
        self.assertError(
            self.call(request("PUT", "/tickets/t1", json.dumps(body).encode())),
            400,
            "Invalid ticket: Required ticket parameter is missing: size",
        )
        self.assertError(
            self.call(request("PUT", "/tickets/t1", ticketJSON(url="foo:///x"))),
            400,
            "Invalid ticket: Invalid value for 'url': 'foo:///x': Unsupported url scheme: foo",
        )
        self.assertEqual(len(self.registry), 0)

    def test_putBodyCapped(self) -> None:
        """
        A huge body is refused by its Content-Length before it is read, and
        the connection is closed.
        """
        raw = b"PUT /tickets/t1 HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n{"
        r = self.call(raw)
        self.assertEqual(r.status, 413)
        self.assertEqual(r.headers[b"connection"], b"close")

    def test_putChunkedBodyCapped(self) -> None:
        """
        A chunked body growing past the cap is refused as soon as it does.
        """
        chunk = b"x" * 70000
        raw = (
            b"PUT /tickets/t1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(chunk)
            + chunk
            + b"\r\n"
        )
        r = self.call(raw)
        self.assertEqual(r.status, 413)

    def test_get(self) -> None:
        """
        GET returns the ticket status as JSON ending in a newline.
        """
        self.call(request("PUT", "/tickets/t1", ticketJSON(filename="disk.raw")))
        r = self.call(request("GET", "/tickets/t1"))
        self.assertEqual(r.status, 200)
        self.assertEqual(r.headers[b"content-type"], b"application/json")
        self.assertTrue(r.body.endswith(b"}\n"))
        info = r.json()
        self.assertEqual(info["uuid"], "t1")
        self.assertEqual(info["expires"], 5300)
        self.assertEqual(info["filename"], "disk.raw")
        self.assertEqual(info["transferred"], 0)
        self.assertFalse(info["active"])
        self.assertEqual(info["connections"], 0)

    def test_getErrors(self) -> None:
        """
        GET of an unknown ticket is 404 and of no id is 400.
        """
        self.assertError(self.call(request("GET", "/tickets/nope")), 404, "No such ticket 'nope'")
        self.assertError(self.call(request("GET", "/tickets/")), 400, "Ticket id is required")

    def test_getExpiredTicket(self) -> None:
        """
        Expired tickets are still reported.
        """
        self.call(request("PUT", "/tickets/t1", ticketJSON(timeout=1)))
        self.clock.advance(10)
        self.assertEqual(self.call(request("GET", "/tickets/t1")).status, 200)

    def test_patchExtends(self) -> None:
        """
        PATCH sets expires to now + timeout and answers 200 with no body.
        """
        self.call(request("PUT", "/tickets/t1", ticketJSON()))
        r = self.call(request("PATCH", "/tickets/t1", b'{"timeout": 900}'))
        self.assertEqual(r.status, 200)
        self.assertEqual(r.body, b"")
        info = self.call(request("GET", "/tickets/t1")).json()
        self.assertEqual(info["expires"], 5900)
        self.assertEqual(info["timeout"], 300)

    def test_patchErrors(self) -> None:
        """
        PATCH validates the body before looking the ticket up, with upstream's
        texts.
        """
        r = self.call(request("PATCH", "/tickets/nope", b"junk"))
        self.assertEqual(r.status, 400)
        self.assertTrue(r.text.startswith("Invalid patch: "))
        self.assertError(
            self.call(request("PATCH", "/tickets/nope", b"{}")),
            400,
            "Missing required value for 'timeout'",
        )
        self.assertError(
            self.call(request("PATCH", "/tickets/nope", b'{"timeout": "1"}')),
            400,
            "Integer required '1'",
        )
        self.assertError(
            self.call(request("PATCH", "/tickets/nope", b'{"timeout": true}')),
            400,
            "Integer required True",
        )
        self.assertError(
            self.call(request("PATCH", "/tickets/nope", b'{"timeout": -1}')),
            400,
            "Invalid value -1 < 0",
        )
        self.assertError(
            self.call(request("PATCH", "/tickets/nope", b'{"timeout": 1}')),
            404,
            "No such ticket: nope",
        )
        self.assertError(
            self.call(request("PATCH", "/tickets/", b'{"timeout": 1}')),
            400,
            "Ticket id is required",
        )

    def test_patchBounded(self) -> None:
        """
        PATCH applies the bound of a new ticket's C{timeout} (30 days), and
        refuses numbers of thousands of digits before converting them.
        """
        self.call(request("PUT", "/tickets/t1", ticketJSON()))
        expires = self.registry.get("t1").expires
        self.assertError(
            self.call(request("PATCH", "/tickets/t1", b'{"timeout": 1000000000000000000}')),
            400,
            f"Invalid value 1000000000000000000 > {MAX_TIMEOUT}",
        )
        r = self.call(request("PATCH", "/tickets/t1", b'{"timeout": ' + b"9" * 4000 + b"}"))
        self.assertEqual(r.status, 400)
        self.assertEqual(r.text, "Invalid patch: Number too long: 4000 digits, at most 32\n")
        self.assertEqual(self.registry.get("t1").expires, expires)
        r = self.call(request("PATCH", "/tickets/t1", b'{"timeout": %d}' % MAX_TIMEOUT))
        self.assertEqual(r.status, 200)

    def test_addHugeNumbers(self) -> None:
        """
        A ticket with a number of thousands of digits is refused with 400.
        """
        body = ticketJSON().replace(b'"size": 1000', b'"size": ' + b"1" * 4000)
        r = self.call(request("PUT", "/tickets/t1", body))
        self.assertEqual(r.status, 400)
        self.assertIn("Number too long", r.text)
        self.assertIsNone(self.registry.lookup("t1"))

    def test_deleteIdempotent(self) -> None:
        """
        DELETE answers 204 for known and unknown tickets.
        """
        self.call(request("PUT", "/tickets/t1", ticketJSON()))
        r = self.call(request("DELETE", "/tickets/t1"))
        self.assertEqual(r.status, 204)
        self.assertIsNone(self.registry.lookup("t1"))
        self.assertEqual(self.call(request("DELETE", "/tickets/t1")).status, 204)

    def test_deleteAll(self) -> None:
        """
        DELETE /tickets/ removes every ticket.
        """
        self.call(request("PUT", "/tickets/a", ticketJSON(uuid="a")))
        self.call(request("PUT", "/tickets/b", ticketJSON(uuid="b")))
        self.assertEqual(self.call(request("DELETE", "/tickets/")).status, 204)
        self.assertEqual(len(self.registry), 0)

    def test_deleteWithRunningOperation(self) -> None:
        """
        DELETE with an operation running answers 204 once it stops in time;
        409 after the deadline, then 204 once nothing runs.
        """
        self.call(request("PUT", "/tickets/t1", ticketJSON(transfer_id="tr-1")))
        ticket = self.registry.get("t1")

        op = Operation("read", 0)
        self.registry.startOperation(ticket, op)
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(request("DELETE", "/tickets/t1"))
        self.assertEqual(transport.value(), b"")
        self.assertTrue(op.canceled)
        self.clock.advance(10)
        self.registry.finishOperation(ticket, op)
        self.assertEqual(Response(transport.value()).status, 204)

        self.call(request("PUT", "/tickets/t1", ticketJSON(transfer_id="tr-1")))
        ticket = self.registry.get("t1")
        op = Operation("write", 0)
        self.registry.startOperation(ticket, op)
        channel = self.site.buildProtocol(None)
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(request("DELETE", "/tickets/t1"))
        self.clock.advance(60)
        self.assertError(Response(transport.value()), 409, "Timeout cancelling transfer tr-1")
        info = self.call(request("GET", "/tickets/t1")).json()
        self.assertTrue(info["canceled"])
        self.registry.finishOperation(ticket, op)
        self.assertEqual(self.call(request("DELETE", "/tickets/t1")).status, 204)
        self.assertIsNone(self.registry.lookup("t1"))

    def test_routing(self) -> None:
        """
        Unknown paths and methods get upstream's 404 and 405 texts.
        """
        self.assertError(self.call(request("GET", "/foo")), 404, "No handler for '/foo'")
        self.assertError(
            self.call(request("GET", "/images/t1")), 404, "No handler for '/images/t1'"
        )
        self.assertError(
            self.call(request("POST", "/tickets/t1", b"{}")),
            405,
            "Method 'POST' not defined for '/tickets/t1'",
        )
        self.assertError(self.call(request("FOO", "/tickets/t1")), 405, "Invalid method 'FOO'")

    def test_metricsMethodLabelBounded(self) -> None:
        """
        Methods a client makes up are counted as C{other}: a thousand
        distinct methods add one series, not a thousand.
        """
        for i in range(1000):
            r = self.call(request(f"X{i}", "/tickets/t1"))
            self.assertEqual(r.status, 405)
        r = self.call(request("GET", "/metrics"))
        series = [line for line in r.text.splitlines() if line.startswith("imageio_requests_total")]
        self.assertIn(
            'imageio_requests_total{listener="control",method="other",code="405"} 1000', series
        )
        self.assertEqual(len(series), 1)

    def test_metricsLabelsBounded(self) -> None:
        """
        Statuses outside 100-599 are C{other}; listener names past the
        limit share C{other}, in every metric.
        """
        metrics = Metrics()
        metrics.requestDone("remote", "GET", 999, 1, 0)
        for i in range(100):
            metrics.connectionOpened(f"l{i}")
            metrics.requestDone(f"l{i}", "BREW", 200, 1, 1)
        text = metrics.render()
        self.assertIn('imageio_requests_total{listener="remote",method="GET",code="other"} 1', text)
        self.assertIn('imageio_requests_total{listener="other",method="other",code="200"}', text)
        self.assertLess(len(text.splitlines()), 100)

    def test_nonUTF8TicketID(self) -> None:
        """
        A ticket id with a percent-escape that is not UTF-8 is an unknown
        ticket: GET and PATCH are 404, DELETE 204 (idempotent), and nothing
        is logged as a failure.
        """
        self.call(request("PUT", "/tickets/t1", ticketJSON()))
        self.assertError(self.call(request("GET", "/tickets/%ff")), 404, "No such ticket '\ufffd'")
        r = self.call(request("PATCH", "/tickets/%ff", b'{"timeout": 10}'))
        self.assertEqual(r.status, 404)
        self.assertEqual(r.text, "No such ticket: \ufffd\n")
        self.assertEqual(self.call(request("DELETE", "/tickets/%ff%fe")).status, 204)
        self.assertIsNotNone(self.registry.lookup("t1"))

    def test_metrics(self) -> None:
        """
        /metrics reports requests by listener, method and status in the
        Prometheus text format.
        """
        self.call(request("PUT", "/tickets/t1", ticketJSON()))
        self.call(request("GET", "/tickets/nope"))
        r = self.call(request("GET", "/metrics"))
        self.assertEqual(r.status, 200)
        self.assertIn(
            'imageio_requests_total{listener="control",method="PUT",code="200"} 1', r.text
        )
        self.assertIn(
            'imageio_requests_total{listener="control",method="GET",code="404"} 1', r.text
        )
        self.assertIn("# TYPE imageio_open_connections gauge", r.text)

    def test_metricsReceivedBytes(self) -> None:
        """
        Received bytes count every request body: PUT and PATCH JSON bodies
        too, not only image uploads.
        """
        body = ticketJSON()
        self.call(request("PUT", "/tickets/t1", body))
        patch = b'{"timeout": 300}'
        self.call(request("PATCH", "/tickets/t1", patch))
        r = self.call(request("GET", "/metrics"))
        self.assertIn(
            f'imageio_received_bytes_total{{listener="control"}} {len(body) + len(patch)}', r.text
        )


class MethodLabelTests(SynchronousTestCase):
    """
    The methods counted by name are the methods the web layer answers.
    """

    def test_sameAsWeb(self) -> None:
        from imageio import web
        from imageio.control import _metrics

        self.assertEqual(_metrics.METHODS, {m.decode("ascii") for m in web.METHODS})


class SampledMetricsTests(SynchronousTestCase):
    """
    Values sampled when C{/metrics} is rendered: gauges and running totals.
    """

    def test_counterType(self) -> None:
        """
        A running total is typed C{counter}, a level C{gauge}, so that
        Prometheus' C{rate()} treats a restart as a reset, not a drop.
        """
        metrics = Metrics()
        metrics.addCounter("imageio_x_total", "Things done.", lambda: 3)
        metrics.addGauge("imageio_y", "Things now.", lambda: 2)
        text = metrics.render()
        self.assertIn(
            "# HELP imageio_x_total Things done.\n"
            "# TYPE imageio_x_total counter\n"
            "imageio_x_total 3\n",
            text,
        )
        self.assertIn("# TYPE imageio_y gauge\nimageio_y 2\n", text)

    def test_exactValues(self) -> None:
        """
        Large byte counts are rendered exactly, not rounded to six digits;
        fractions keep their digits.
        """
        metrics = Metrics()
        metrics.addCounter("imageio_bytes", "Bytes.", lambda: 2**31 + 1)
        metrics.addGauge("imageio_float", "Float.", lambda: 1234567.0)
        metrics.addGauge("imageio_ratio", "Ratio.", lambda: 0.25)
        text = metrics.render()
        self.assertIn("imageio_bytes 2147483649\n", text)
        self.assertIn("imageio_float 1234567\n", text)
        self.assertIn("imageio_ratio 0.25\n", text)


class DaemonMetricsTests(DaemonTestCase):
    """
    The running daemon's C{/metrics} on its control socket.
    """

    async def test_runningTotalsAreCounters(self) -> None:
        """
        The body pump's bytes and the AIO totals only grow: they are
        counters; buffer memory in use is a gauge.
        """
        daemon = self.startDaemon()
        r = await deferToThread(control, daemon.addresses, "GET", "/metrics")
        self.assertEqual(r.status, 200)
        for name in ("imageio_body_pump_bytes", "imageio_aio_completed", "imageio_aio_would_block"):
            self.assertIn(f"# TYPE {name} counter\n{name} 0\n", r.text)
        self.assertIn("# TYPE imageio_log_lines_dropped counter\n", r.text)
        self.assertIn("# TYPE imageio_buffer_bytes gauge\nimageio_buffer_bytes 0\n", r.text)
