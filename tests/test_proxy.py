"""
Tests for L{imageio.proxy}: the signed-ticket proxy between clients and a
real daemon, on loopback with TLS on both hops and tickets signed exactly
as the engine signs them (L{tests.engine}).
"""

from __future__ import annotations

import json
import socket
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import DNSLookupError
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

import imageio
from imageio import _pki
from imageio.backends.httpclient import collectBody, hostError
from imageio.interfaces import HostUnavailable
from imageio.proxy._guard import isAllowedAddress
from imageio.proxy._relay import DaemonClient
from imageio.tap import ImageioService
from tests import engine
from tests._daemon import writeFragmentedImage
from tests.test_proxy_helpers import (
    Daemon,
    HTTPSClient,
    MiB,
    Proxy,
    daemonConfig,
    makeImage,
    pattern,
    proxyConfig,
)

reactor: Any = _reactor

CORS_ORIGIN = "access-control-allow-origin"


def signedTicket(
    ticketID: str,
    imagedURI: str,
    *,
    now: float | None = None,
    lifetime: int = 300,
    **kw: Any,
) -> str:
    """
    A signed ticket for daemon ticket C{ticketID}, made now as the engine
    makes them.
    """
    when = int(time.time() if now is None else now)
    payload = engine.makePayload(
        now=when, lifetime=lifetime, transferTicket=ticketID, imagedURI=imagedURI
    )
    return engine.makeTicket(payload, now=when, lifetime=lifetime, **kw)


def rawTLS(port: int, caFile: str) -> ssl.SSLSocket:
    """
    A blocking TLS connection to C{localhost:port}.
    """
    context = ssl.create_default_context(cafile=caFile)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(sock, server_hostname="localhost")


def exchange(port: int, caFile: str, request: bytes) -> bytes:
    """
    Send raw bytes and read until the server closes the connection.
    """
    with rawTLS(port, caFile) as sock:
        sock.sendall(request)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (ConnectionResetError, ssl.SSLError):
            pass
        return data


class ProxyTestCase(TestCase):
    """
    A daemon and a proxy in front of it.
    """

    timeout = 60
    allowLoopback = True

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.pki = _pki.makeTestPKI(str(self.dir / "pki"))
        self.daemon = Daemon.start(reactor, daemonConfig(self.pki), self.dir / "daemon")
        self.addCleanup(self.daemon.stop)
        self.config = proxyConfig(self.dir / "proxy", self.pki)
        self.proxy = yield Proxy.start(reactor, self.config, allowLoopback=self.allowLoopback)
        self.addCleanup(self.proxy.stop)
        self.client = HTTPSClient("localhost", self.proxy.portNumber, self.pki.caFile)
        self.addCleanup(self.client.close)

    def addImage(
        self,
        data: bytes,
        size: int | None = None,
        ops: tuple[str, ...] = ("read", "write"),
        **extra: Any,
    ) -> tuple[str, Path]:
        """
        An image file and a daemon ticket for it.

        @return: The ticket id and the image path.
        """
        ticketID = str(uuid.uuid4())
        path = self.dir / f"image-{ticketID}"
        size = len(data) if size is None else size
        self.daemon.addTicket(makeImage(path, data, size), size, ops, ticketID, **extra)
        return ticketID, path

    def signed(self, ticketID: str, **kw: Any) -> str:
        return signedTicket(ticketID, self.daemon.url("localhost"), **kw)

    def auth(self, ticketID: str, **kw: Any) -> dict[str, str]:
        return {"Authorization": self.signed(ticketID, **kw)}


class SessionTests(ProxyTestCase):
    @inlineCallbacks
    def test_browserDownloadWithResume(self) -> Any:
        """
        A session from C{POST /sessions} authorizes downloads named by a
        C{session_id} query parameter, resumed with a Range; deleting the
        session ends it.
        """
        data = pattern(2 * MiB + 77)
        ticketID, _ = self.addImage(data)
        reply = yield self.client.request("POST", "/sessions", headers=self.auth(ticketID))
        self.assertEqual(reply.status, 200, reply.text)
        self.assertEqual(reply.body, b"")
        session = reply.header("session-id")
        self.assertTrue(session)

        path = f"/images/{ticketID}?session_id={session}"
        first = yield self.client.request("GET", path, headers={"Range": "bytes=0-999999"})
        self.assertEqual(first.status, 206, first.text)
        self.assertEqual(first.header("content-range"), f"bytes 0-999999/{len(data)}")
        self.assertEqual(first.header("cache-control"), "no-cache, no-store")
        rest = yield self.client.request("GET", path, headers={"Range": "bytes=1000000-"})
        self.assertEqual(rest.status, 206)
        self.assertEqual(first.body + rest.body, data)
        self.assertEqual(rest.header("content-disposition"), "attachment")

        # The Session-Id header works as well as the query.
        reply = yield self.client.request(
            "GET", f"/images/{ticketID}", headers={"Session-Id": session}
        )
        self.assertEqual(reply.body, data)

        reply = yield self.client.request("DELETE", f"/sessions/{session}")
        self.assertEqual(reply.status, 204)
        reply = yield self.client.request("GET", path)
        self.assertEqual(
            (reply.status, reply.text), (401, "Invalid session id or session expired\n")
        )
        reply = yield self.client.request("DELETE", f"/sessions/{session}")
        self.assertEqual((reply.status, reply.text), (404, "No such session\n"))

    @inlineCallbacks
    def test_sessionsWithSlash(self) -> Any:
        """
        C{POST /sessions/} works like C{POST /sessions}.
        """
        ticketID, _ = self.addImage(b"x")
        reply = yield self.client.request("POST", "/sessions/", headers=self.auth(ticketID))
        self.assertEqual(reply.status, 200)
        self.assertTrue(reply.header("session-id"))

    @inlineCallbacks
    def test_sessionWithoutTicket(self) -> Any:
        """
        C{POST /sessions} without C{Authorization} is 401.
        """
        reply = yield self.client.request("POST", "/sessions")
        self.assertEqual(reply.status, 401)
        self.assertEqual(reply.text, "Could not initialize session: missing Authorization header\n")

    @inlineCallbacks
    def test_sessionWithForgedTicket(self) -> Any:
        """
        C{POST /sessions} with a ticket the engine did not sign is 401.
        """
        ticketID, _ = self.addImage(b"x")
        forged = self.signed(ticketID, signer=engine.stranger())
        reply = yield self.client.request("POST", "/sessions", headers={"Authorization": forged})
        self.assertEqual(reply.status, 401)
        self.assertEqual(reply.text, "Could not initialize session: invalid signature\n")

    @inlineCallbacks
    def test_sessionForAnotherTicket(self) -> Any:
        """
        A session for one ticket does not open another: 400.
        """
        ticketID, _ = self.addImage(b"x")
        other, _ = self.addImage(b"y")
        reply = yield self.client.request("POST", "/sessions", headers=self.auth(ticketID))
        session = reply.header("session-id")
        reply = yield self.client.request("GET", f"/images/{other}?session_id={session}")
        self.assertEqual(
            (reply.status, reply.text), (400, "Requested resource must match transfer ticket\n")
        )

    @inlineCallbacks
    def test_bogusSession(self) -> Any:
        """
        A made-up session id is 401.
        """
        ticketID, _ = self.addImage(b"x")
        reply = yield self.client.request("GET", f"/images/{ticketID}?session_id=abc.def")
        self.assertEqual(
            (reply.status, reply.text), (401, "Invalid session id or session expired\n")
        )


class AuthorizationHeaderTests(ProxyTestCase):
    @inlineCallbacks
    def test_uploadAndDownload(self) -> Any:
        """
        A PUT of a few MiB with the signed ticket in C{Authorization} lands
        on the daemon's image; a GET reads the same bytes back.
        """
        size = 6 * MiB
        ticketID, path = self.addImage(b"", size)
        data = pattern(5 * MiB + 3, seed=7)
        reply = yield self.client.request(
            "PUT",
            f"/images/{ticketID}",
            body=data,
            headers={**self.auth(ticketID), "Content-Range": f"bytes 100-{99 + len(data)}/*"},
        )
        self.assertEqual(reply.status, 200, reply.text)
        self.assertEqual(reply.body, b"")
        expected = bytearray(size)
        expected[100 : 100 + len(data)] = data
        self.assertEqual(path.read_bytes(), bytes(expected))
        reply = yield self.client.request("GET", f"/images/{ticketID}", headers=self.auth(ticketID))
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.header("content-length"), str(size))
        self.assertEqual(reply.body, bytes(expected))

    @inlineCallbacks
    def test_uploadWithoutFlush(self) -> Any:
        """
        C{flush=n} reaches the daemon, and bad values are refused.
        """
        ticketID, path = self.addImage(b"", 1000)
        reply = yield self.client.request(
            "PUT", f"/images/{ticketID}?flush=n", body=b"abc", headers=self.auth(ticketID)
        )
        self.assertEqual(reply.status, 200, reply.text)
        self.assertEqual(path.read_bytes()[:3], b"abc")
        reply = yield self.client.request(
            "PUT", f"/images/{ticketID}?flush=x", body=b"abc", headers=self.auth(ticketID)
        )
        self.assertEqual(reply.status, 400)

    @inlineCallbacks
    def test_emptyUpload(self) -> Any:
        """
        A PUT with an empty body is relayed.
        """
        ticketID, _ = self.addImage(b"", 1000)
        reply = yield self.client.request(
            "PUT", f"/images/{ticketID}", body=b"", headers=self.auth(ticketID)
        )
        self.assertEqual(reply.status, 200, reply.text)

    @inlineCallbacks
    def test_chunkedUploadRefused(self) -> Any:
        """
        A PUT without C{Content-Length} is 400, before any daemon request.
        """
        ticketID, _ = self.addImage(b"", 1000)
        request = (
            f"PUT /images/{ticketID} HTTP/1.1\r\nHost: localhost\r\n"
            f"Authorization: {self.signed(ticketID)}\r\nTransfer-Encoding: chunked\r\n\r\n"
            "3\r\nabc\r\n0\r\n\r\n"
        ).encode()
        data = yield deferToThread(exchange, self.proxy.portNumber, self.pki.caFile, request)
        self.assertTrue(data.startswith(b"HTTP/1.1 400 "), data[:100])
        self.assertTrue(data.endswith(b"\r\n\r\nContent-Length header is required\n"))

    @inlineCallbacks
    def test_patch(self) -> Any:
        """
        PATCH zero and flush are relayed.
        """
        ticketID, path = self.addImage(b"\xff" * 10000)
        msg = {"op": "zero", "offset": 100, "size": 200}
        reply = yield self.client.request(
            "PATCH",
            f"/images/{ticketID}",
            body=json.dumps(msg).encode(),
            headers=self.auth(ticketID),
        )
        self.assertEqual(reply.status, 200, reply.text)
        reply = yield self.client.request(
            "PATCH", f"/images/{ticketID}", body=b'{"op": "flush"}', headers=self.auth(ticketID)
        )
        self.assertEqual(reply.status, 200, reply.text)
        self.assertEqual(path.read_bytes(), b"\xff" * 100 + bytes(200) + b"\xff" * 9700)
        # The daemon's validation errors come back as they are.
        reply = yield self.client.request(
            "PATCH", f"/images/{ticketID}", body=b'{"op": "trim"}', headers=self.auth(ticketID)
        )
        self.assertEqual(reply.status, 400)
        self.assertIn("Unsupported value 'trim' for 'op'", reply.text)

    @inlineCallbacks
    def test_options(self) -> Any:
        """
        OPTIONS intersects the proxy's methods and features with the
        daemon's; C{*} needs no ticket.
        """
        ticketID, _ = self.addImage(b"x" * 100)
        reply = yield self.client.request(
            "OPTIONS", f"/images/{ticketID}", headers=self.auth(ticketID)
        )
        self.assertEqual(reply.status, 200, reply.text)
        self.assertEqual(reply.header("allow"), "OPTIONS,GET,PUT,PATCH")
        options = json.loads(reply.body)
        self.assertEqual(options["features"], ["checksum", "extents", "flush", "zero"])
        self.assertNotIn("unix_socket", options)
        self.assertEqual(options["max_readers"], 8)

        readOnly, _ = self.addImage(b"x" * 100, ops=("read",))
        reply = yield self.client.request(
            "OPTIONS", f"/images/{readOnly}", headers=self.auth(readOnly)
        )
        self.assertEqual(reply.header("allow"), "OPTIONS,GET")
        self.assertEqual(json.loads(reply.body)["features"], ["checksum", "extents"])

        reply = yield self.client.request("OPTIONS", "/images/*")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.header("allow"), "OPTIONS,GET,PUT,PATCH")
        self.assertEqual(
            json.loads(reply.body), {"features": ["checksum", "extents", "flush", "zero"]}
        )

    @inlineCallbacks
    def test_extentsAndChecksum(self) -> Any:
        """
        Extents and checksums are relayed with their query parameters.
        """
        ticketID, _ = self.addImage(b"x" * MiB, 4 * MiB)
        reply = yield self.client.request(
            "GET", f"/images/{ticketID}/extents?context=zero", headers=self.auth(ticketID)
        )
        self.assertEqual(reply.status, 200, reply.text)
        extents = json.loads(reply.body)
        self.assertEqual(sum(e["length"] for e in extents), 4 * MiB)
        reply = yield self.client.request(
            "GET", f"/images/{ticketID}/extents?context=dirty", headers=self.auth(ticketID)
        )
        self.assertEqual(
            (reply.status, reply.text), (404, "Ticket does not support dirty extents\n")
        )
        reply = yield self.client.request(
            "GET", f"/images/{ticketID}/checksum?algorithm=sha256", headers=self.auth(ticketID)
        )
        self.assertEqual(reply.status, 200, reply.text)
        self.assertEqual(json.loads(reply.body)["algorithm"], "sha256")

    @inlineCallbacks
    def test_streamedExtents(self) -> Any:
        """
        The streamed extents answer of a very fragmented image is relayed
        whole.
        """
        runs = 20_000
        path = self.dir / "fragmented.raw"
        size = writeFragmentedImage(path, runs)
        ticketID = str(uuid.uuid4())
        self.daemon.addTicket(f"file://{path}", size, ("read",), ticketID)
        reply = yield self.client.request(
            "GET", f"/images/{ticketID}/extents", headers=self.auth(ticketID)
        )
        self.assertEqual(reply.status, 200, reply.text[:200])
        extents = json.loads(reply.body)
        self.assertEqual(len(extents), 2 * runs)
        self.assertEqual(sum(e["length"] for e in extents), size)

    @inlineCallbacks
    def test_head(self) -> Any:
        """
        HEAD is relayed as HEAD: headers, no body.
        """
        ticketID, _ = self.addImage(b"x" * 5000)
        reply = yield self.client.request(
            "HEAD", f"/images/{ticketID}", headers=self.auth(ticketID)
        )
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.header("content-length"), "5000")
        self.assertEqual(reply.body, b"")


class StoredTicketTests(ProxyTestCase):
    @inlineCallbacks
    def test_storedTicket(self) -> Any:
        """
        After the engine's C{PUT /tickets/}, clients need no credentials;
        after C{DELETE /tickets/<id>} they are refused.
        """
        data = pattern(MiB, seed=3)
        ticketID, _ = self.addImage(data)
        reply = yield self.client.request(
            "PUT",
            "/tickets/",
            body=self.signed(ticketID).encode(),
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
        self.assertEqual(reply.status, 200, reply.text)
        reply = yield self.client.request("GET", f"/images/{ticketID}")
        self.assertEqual(reply.status, 200, reply.text)
        self.assertEqual(reply.body, data)
        reply = yield self.client.request("PUT", f"/images/{ticketID}", body=b"new")
        self.assertEqual(reply.status, 200, reply.text)

        reply = yield self.client.request("DELETE", f"/tickets/{ticketID}")
        self.assertEqual(reply.status, 204)
        reply = yield self.client.request("GET", f"/images/{ticketID}")
        self.assertEqual((reply.status, reply.text), (401, "Not authorized\n"))
        reply = yield self.client.request("DELETE", f"/tickets/{ticketID}")
        self.assertEqual(reply.status, 204)
        reply = yield self.client.request("DELETE", "/tickets/")
        self.assertEqual((reply.status, reply.text), (400, "Missing ticket ID\n"))

    @inlineCallbacks
    def test_forgedTicketNotStored(self) -> Any:
        """
        C{PUT /tickets/} with a ticket that does not verify is 403.
        """
        ticketID, _ = self.addImage(b"x")
        forged = self.signed(ticketID, signer=engine.rogue())
        reply = yield self.client.request("PUT", "/tickets/", body=forged.encode())
        self.assertEqual(
            (reply.status, reply.text), (403, "Error verifying signed ticket: invalid signature\n")
        )
        reply = yield self.client.request("GET", f"/images/{ticketID}")
        self.assertEqual(reply.status, 401)

    @inlineCallbacks
    def test_storedTicketExpires(self) -> Any:
        """
        A stored ticket past its C{exp} is refused as expired.
        """
        ticketID, _ = self.addImage(b"x")
        reply = yield self.client.request("PUT", "/tickets/", body=self.signed(ticketID).encode())
        self.assertEqual(reply.status, 200)
        self.proxy.service.verifier.clock = lambda: time.time() + 3600
        reply = yield self.client.request("GET", f"/images/{ticketID}")
        self.assertEqual((reply.status, reply.text), (401, "Not authorized (expired ticket)\n"))


class ForgedTicketTests(ProxyTestCase):
    """
    Tickets that must not open anything (reliability checklist I.43).
    """

    @inlineCallbacks
    def assertRefused(self, ticket: str, text: str, method: str = "GET") -> Any:
        ticketID = self.ticketID
        body = b"data" if method == "PUT" else None
        reply = yield self.client.request(
            method, f"/images/{ticketID}", body=body, headers={"Authorization": ticket}
        )
        self.assertEqual((reply.status, reply.text), (401, text + "\n"))
        self.assertEqual(reply.header(CORS_ORIGIN), "*")

    def setUp(self) -> Any:
        d = super().setUp()

        def image(_: object) -> None:
            self.ticketID, self.path = self.addImage(b"secret")

        return d.addCallback(image)

    def test_tamperedPayload(self) -> Any:
        """
        A ticket whose payload was changed after signing is refused.
        """

        def tamper(fields: dict[str, str]) -> None:
            payload = json.loads(fields["data"])
            payload["exp"] += 3600
            fields["data"] = engine.jacksonPretty(payload)

        return self.assertRefused(
            self.signed(self.ticketID, lifetime=300, tamper=tamper),
            "Not authorized (invalid signature)",
        )

    def test_expired(self) -> Any:
        """
        An expired ticket is refused as expired.
        """
        return self.assertRefused(
            self.signed(self.ticketID, now=time.time() - 1000), "Not authorized (expired ticket)"
        )

    def test_notYetValid(self) -> Any:
        """
        A ticket from the future is refused.
        """
        return self.assertRefused(
            self.signed(self.ticketID, now=time.time() + 1000),
            "Not authorized (ticket not valid yet)",
        )

    def test_wrongSigner(self) -> Any:
        """
        Tickets signed by a key chaining to the engine CA, or by a stranger,
        are refused.
        """
        d = self.assertRefused(
            self.signed(self.ticketID, signer=engine.rogue()), "Not authorized (invalid signature)"
        )
        d.addCallback(
            lambda _: self.assertRefused(
                self.signed(self.ticketID, signer=engine.stranger(), v1=False, v2=True),
                "Not authorized (invalid signature)",
            )
        )
        return d

    def test_garbage(self) -> Any:
        """
        Something that is not a ticket is refused.
        """
        return self.assertRefused("not a ticket!", "Not authorized (malformed base64)")

    def test_forgedUpload(self) -> Any:
        """
        An upload with a forged ticket is refused before its body is read.
        """
        d = self.assertRefused(
            self.signed(self.ticketID, signer=engine.stranger()),
            "Not authorized (invalid signature)",
            method="PUT",
        )
        d.addCallback(lambda _: self.assertEqual(self.path.read_bytes(), b"secret"))
        return d

    @inlineCallbacks
    def test_noCredentials(self) -> Any:
        """
        A request without a ticket or session is 401 C{Not authorized}.
        """
        reply = yield self.client.request("GET", f"/images/{self.ticketID}")
        self.assertEqual((reply.status, reply.text), (401, "Not authorized\n"))

    @inlineCallbacks
    def test_v2Signature(self) -> Any:
        """
        Tickets of current engines (RSA-PSS, C{v2_signature}) are accepted.
        """
        ticket = self.signed(self.ticketID, v1=False, v2=True)
        reply = yield self.client.request(
            "GET", f"/images/{self.ticketID}", headers={"Authorization": ticket}
        )
        self.assertEqual((reply.status, reply.body), (200, b"secret"))

    @inlineCallbacks
    def test_otherResource(self) -> Any:
        """
        A valid ticket for one image does not open another.
        """
        other, _ = self.addImage(b"other")
        reply = yield self.client.request(
            "GET", f"/images/{other}", headers=self.auth(self.ticketID)
        )
        self.assertEqual(reply.status, 400)


class LoopbackRefusedTests(ProxyTestCase):
    allowLoopback = False

    @inlineCallbacks
    def test_loopbackDaemonRefused(self) -> Any:
        """
        By default a ticket naming a daemon on a loopback address is refused
        (reliability I.44): the proxy does not reach its own host.
        """
        ticketID, _ = self.addImage(b"secret")
        for host in ("localhost", "127.0.0.1"):
            ticket = signedTicket(ticketID, self.daemon.url(host))
            reply = yield self.client.request(
                "GET", f"/images/{ticketID}", headers={"Authorization": ticket}
            )
            self.assertEqual(
                (reply.status, reply.text),
                (
                    401,
                    "Not authorized (imaged-uri names a loopback daemon, refused unless "
                    "[proxy] allow_loopback = true (all-in-one labs only))\n",
                ),
            )


class RelayLoopTests(ProxyTestCase):
    @inlineCallbacks
    def test_relayedRequestRefused(self) -> Any:
        """
        A request another imageio relay sent (a daemon's proxy-mode ticket
        naming this proxy) is 508 Loop Detected, not relayed again.
        """
        ticketID, _ = self.addImage(b"x" * 10)
        reply = yield self.client.request(
            "GET",
            f"/images/{ticketID}",
            headers={**self.auth(ticketID), "Imageio-Relayed": "1"},
        )
        self.assertEqual(reply.status, 508, reply.text)
        self.assertIn("Loop detected", reply.text)

    @inlineCallbacks
    def test_relayMarksRequests(self) -> Any:
        """
        The proxy marks what it relays: a daemon ticket that is itself a
        proxy-mode ticket is refused by the daemon with 508, relayed as is.
        """
        ticketID, _ = self.addImage(b"x" * 10)
        # A URL that names the daemon itself only through DNS.
        self.daemon.registry.get(ticketID).url = f"{self.daemon.url('localhost')}/images/x"
        reply = yield self.client.request("GET", f"/images/{ticketID}", headers=self.auth(ticketID))
        self.assertEqual(reply.status, 508, reply.text)


class DaemonErrorTests(ProxyTestCase):
    @inlineCallbacks
    def test_unknownTicket(self) -> Any:
        """
        The daemon's 403 for an unknown ticket is relayed with its text.
        """
        ticketID = str(uuid.uuid4())
        reply = yield self.client.request("GET", f"/images/{ticketID}", headers=self.auth(ticketID))
        self.assertEqual(reply.status, 403)
        self.assertEqual(
            reply.text, f"You are not allowed to access this resource: No such ticket {ticketID}\n"
        )

    @inlineCallbacks
    def test_unknownTicketUpload(self) -> Any:
        """
        The daemon's 403 on an upload reaches the client before the client
        sent the whole body, and its connection is closed.
        """
        ticketID = str(uuid.uuid4())
        size = 64 * MiB

        def upload() -> tuple[bytes, bool]:
            sock = rawTLS(self.proxy.portNumber, self.pki.caFile)
            with sock:
                head = (
                    f"PUT /images/{ticketID} HTTP/1.1\r\nHost: localhost\r\n"
                    f"Authorization: {self.signed(ticketID)}\r\n"
                    f"Content-Length: {size}\r\n\r\n"
                ).encode()
                sock.sendall(head + bytes(MiB))
                sock.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(65536)
                # The server closes: more reads end.
                closed = False
                try:
                    while True:
                        chunk = sock.recv(65536)
                        data += chunk
                        if not chunk:
                            closed = True
                            break
                except (ConnectionResetError, ssl.SSLError, OSError):
                    closed = True
                return data, closed

        data, closed = yield deferToThread(upload)
        self.assertTrue(data.startswith(b"HTTP/1.1 403 "), data[:200])
        self.assertIn(b"No such ticket", data)
        self.assertTrue(closed)

    @inlineCallbacks
    def test_rangeNotSatisfiable(self) -> Any:
        """
        The daemon's 416 is relayed with its C{Content-Range}.
        """
        ticketID, _ = self.addImage(b"x" * 1000)
        reply = yield self.client.request(
            "GET",
            f"/images/{ticketID}",
            headers={**self.auth(ticketID), "Range": "bytes=2000-2999"},
        )
        self.assertEqual(reply.status, 416)
        self.assertEqual(reply.header("content-range"), "bytes */1000")

    @inlineCallbacks
    def test_missingImage(self) -> Any:
        """
        The daemon's 500 for a missing image is relayed.
        """
        ticketID, path = self.addImage(b"x" * 1000)
        path.unlink()
        reply = yield self.client.request("GET", f"/images/{ticketID}", headers=self.auth(ticketID))
        self.assertEqual(reply.status, 500)
        self.flushLoggedErrors(FileNotFoundError)

    @inlineCallbacks
    def test_daemonDown(self) -> Any:
        """
        A daemon that is not listening is 503, for downloads and uploads.
        """
        ticketID, _ = self.addImage(b"x" * 1000)
        yield self.daemon.stop()
        reply = yield self.client.request("GET", f"/images/{ticketID}", headers=self.auth(ticketID))
        self.assertEqual(reply.status, 503, reply.text)
        self.assertIn("Failed communicating with host", reply.text)
        reply = yield self.client.request(
            "PUT", f"/images/{ticketID}", body=b"x" * 100, headers=self.auth(ticketID)
        )
        self.assertEqual(reply.status, 503, reply.text)

    @inlineCallbacks
    def test_wrongCA(self) -> Any:
        """
        A daemon whose certificate does not chain to the daemon CA is
        refused (502), and nothing is relayed.
        """
        other = _pki.ensureSelfSigned(str(self.dir / "other"))[0]
        proxy = yield Proxy.start(reactor, proxyConfig(self.dir / "p2", self.pki, other))
        self.addCleanup(proxy.stop)
        client = HTTPSClient("localhost", proxy.portNumber, self.pki.caFile)
        self.addCleanup(client.close)
        ticketID, _ = self.addImage(b"secret")
        reply = yield client.request("GET", f"/images/{ticketID}", headers=self.auth(ticketID))
        self.assertEqual(reply.status, 502, reply.text)
        self.assertIn("Cannot verify the host's TLS certificate", reply.text)
        self.assertNotIn(b"secret", reply.body)
        reply = yield client.request(
            "PUT", f"/images/{ticketID}", body=b"evil", headers=self.auth(ticketID)
        )
        self.assertEqual(reply.status, 502, reply.text)

    @inlineCallbacks
    def test_wrongHostName(self) -> Any:
        """
        A daemon whose certificate does not name its host is refused.
        """
        daemon = Daemon.start(
            reactor,
            daemonConfig(
                self.pki, certFile=self.pki.wrongNameCertFile, keyFile=self.pki.wrongNameKeyFile
            ),
            self.dir / "wrong",
        )
        self.addCleanup(daemon.stop)
        ticketID = daemon.addTicket(makeImage(self.dir / "w", b"secret"), 6)
        ticket = signedTicket(ticketID, daemon.url("localhost"))
        reply = yield self.client.request(
            "GET", f"/images/{ticketID}", headers={"Authorization": ticket}
        )
        self.assertEqual(reply.status, 502, reply.text)
        self.assertNotIn(b"secret", reply.body)


class DisconnectTests(ProxyTestCase):
    @inlineCallbacks
    def waitIdle(self, ticketID: str) -> Any:
        """
        Wait until the daemon has no connection or operation for the ticket.
        """
        ticket = self.daemon.registry.get(ticketID)
        for _ in range(200):
            if not ticket.connections and not ticket.active:
                return
            yield deferLater(reactor, 0.025, lambda: None)
        self.fail(f"daemon still busy: {len(ticket.connections)} connections")

    @inlineCallbacks
    def test_downloadClientGone(self) -> Any:
        """
        A client that goes away in the middle of a download frees the
        daemon connection.
        """
        ticketID, _ = self.addImage(b"", 512 * MiB)
        auth = self.signed(ticketID)

        def download() -> int:
            sock = rawTLS(self.proxy.portNumber, self.pki.caFile)
            with sock:
                sock.sendall(
                    f"GET /images/{ticketID} HTTP/1.1\r\nHost: localhost\r\n"
                    f"Authorization: {auth}\r\n\r\n".encode()
                )
                received = 0
                while received < 4 * MiB:
                    received += len(sock.recv(MiB))
                return received

        received = yield deferToThread(download)
        self.assertGreaterEqual(received, 4 * MiB)
        yield self.waitIdle(ticketID)

    @inlineCallbacks
    def test_uploadClientGone(self) -> Any:
        """
        A client that goes away in the middle of an upload aborts the daemon
        request: the daemon's upload fails and its connection is freed.
        """
        ticketID, _ = self.addImage(b"", 512 * MiB)
        auth = self.signed(ticketID)

        def upload() -> None:
            sock = rawTLS(self.proxy.portNumber, self.pki.caFile)
            with sock:
                sock.sendall(
                    f"PUT /images/{ticketID} HTTP/1.1\r\nHost: localhost\r\n"
                    f"Authorization: {auth}\r\nContent-Length: {512 * MiB}\r\n\r\n".encode()
                )
                block = bytes(MiB)
                for _ in range(20):
                    sock.sendall(block)

        yield deferToThread(upload)
        yield self.waitIdle(ticketID)
        ticket = self.daemon.registry.get(ticketID)
        self.assertLess(ticket.transferred(), 512 * MiB)


class DaemonGoneTests(ProxyTestCase):
    @inlineCallbacks
    def test_daemonGoneMidDownload(self) -> Any:
        """
        A daemon connection that breaks in the middle of a download aborts
        the client connection: the client never gets a short body that
        looks complete.
        """
        ticketID, _ = self.addImage(b"", 512 * MiB)
        auth = self.signed(ticketID)
        started: defer.Deferred[None] = defer.Deferred()

        def download() -> tuple[int, int]:
            sock = rawTLS(self.proxy.portNumber, self.pki.caFile)
            with sock:
                sock.sendall(
                    f"GET /images/{ticketID} HTTP/1.1\r\nHost: localhost\r\n"
                    f"Authorization: {auth}\r\n\r\n".encode()
                )
                data = b""
                while b"\r\n\r\n" not in data:
                    data += sock.recv(65536)
                head, body = data.split(b"\r\n\r\n", 1)
                lengths = [
                    line.split(b":")[1]
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ]
                length = int(lengths[0])
                received = len(body)
                reactor.callFromThread(started.callback, None)
                try:
                    while chunk := sock.recv(MiB):
                        received += len(chunk)
                except (ConnectionResetError, ssl.SSLError):
                    pass
                return received, length

        result = deferToThread(download)
        yield started
        # Break the daemon's side of the relay.
        daemonSite = self.daemon.service._listeners[0][2]
        for selectable in set(reactor.getReaders()) | set(reactor.getWriters()):
            protocol = getattr(selectable, "protocol", None)
            wrapped = getattr(getattr(protocol, "factory", None), "wrappedFactory", None)
            if wrapped is daemonSite:
                selectable.abortConnection()
        received, length = yield result
        self.assertEqual(length, 512 * MiB)
        self.assertLess(received, length)


class CORSTests(ProxyTestCase):
    @inlineCallbacks
    def test_everyResponse(self) -> Any:
        """
        Successes, errors and unknown paths all carry the CORS headers.
        """
        for method, path in (
            ("GET", "/info/"),
            ("GET", "/images/nope"),
            ("GET", "/nothing"),
            ("DELETE", "/sessions/nope"),
        ):
            reply = yield self.client.request(method, path)
            self.assertEqual(reply.header(CORS_ORIGIN), "*", (method, path))
            self.assertEqual(
                reply.header("access-control-expose-headers"),
                "Authorization, Content-Length, Content-Range, Range, Session-Id",
            )
            self.assertEqual(reply.header("access-control-max-age"), "300")

    @inlineCallbacks
    def test_preflight(self) -> Any:
        """
        A CORS preflight is answered without credentials.
        """
        reply = yield self.client.request(
            "OPTIONS",
            f"/images/{uuid.uuid4()}",
            headers={"Origin": "https://engine", "Access-Control-Request-Method": "PUT"},
        )
        self.assertEqual(reply.status, 204)
        self.assertEqual(
            reply.header("access-control-allow-methods"), "GET, PUT, PATCH, OPTIONS, POST, DELETE"
        )


class InfoTests(ProxyTestCase):
    @inlineCallbacks
    def test_info(self) -> Any:
        """
        C{GET /info/} reports the version.
        """
        reply = yield self.client.request("GET", "/info/")
        self.assertEqual(reply.status, 200)
        self.assertEqual(json.loads(reply.body), {"version": imageio.__version__})

    @inlineCallbacks
    def test_invalidPaths(self) -> Any:
        """
        Unknown sub-resources and a missing ticket id are 400.
        """
        reply = yield self.client.request("GET", "/images/abc/def")
        self.assertEqual((reply.status, reply.text), (400, "Invalid resource path\n"))
        reply = yield self.client.request("GET", "/images/")
        self.assertEqual(reply.status, 400)


class HostileRequestTests(ProxyTestCase):
    """
    The proxy listener refuses what the daemon's listeners refuse.
    """

    @inlineCallbacks
    def test_nonUTF8TicketID(self) -> Any:
        """
        Ticket ids with escapes that are not UTF-8 are unknown tickets (no
        500, no traceback), on the images and the tickets APIs.
        """
        for method, path, body in (
            ("GET", "/images/%ff", None),
            ("PUT", "/images/%ff", b"abc"),
            ("OPTIONS", "/images/%ff", None),
            ("GET", "/images/%ff/extents", None),
            ("DELETE", "/tickets/%ff", None),
        ):
            reply = yield self.client.request(method, path, body=body)
            self.assertIn(reply.status, (204, 401, 403), (method, path, reply.text))

    @inlineCallbacks
    def test_bodyOnGetRefused(self) -> Any:
        """
        A large body sent with GET is refused with 413, not spooled.
        """

        def run() -> bytes:
            context = ssl.create_default_context(cafile=self.pki.caFile)
            raw = socket.create_connection(("localhost", self.proxy.portNumber), timeout=30)
            with context.wrap_socket(raw, server_hostname="localhost") as sock:
                sock.sendall(b"GET /info/ HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n")
                data = b""
                while chunk := sock.recv(65536):
                    data += chunk
                return data

        data = yield deferToThread(run)
        self.assertTrue(data.startswith(b"HTTP/1.1 413 "), data)


class ServiceTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_tapComposesProxy(self) -> Any:
        """
        With C{[proxy] enable = true} the service listens for the proxy with
        TLS, beside the daemon.
        """
        directory = Path(self.mktemp()).resolve()
        pki = _pki.makeTestPKI(str(directory / "pki"))
        config = proxyConfig(directory / "proxy", pki)
        config.tls.cert_file, config.tls.key_file = pki.certFile, pki.keyFile
        config.remote.host, config.remote.port = "127.0.0.1", 0
        config.local.enable = False
        config.control.enable = False
        service = ImageioService(config, reactor, directory / "state")
        service.startService()
        from tests.test_proxy_helpers import stopService

        self.addCleanup(stopService, service, reactor)
        port: Any = service.ports["proxy"].getHost()
        client = HTTPSClient("localhost", port.port, pki.caFile)
        self.addCleanup(client.close)
        reply = yield client.request("GET", "/info/")
        self.assertEqual(reply.status, 200)
        ticketID = str(uuid.uuid4())
        reply = yield client.request(
            "GET",
            f"/images/{ticketID}",
            headers={"Authorization": signedTicket(ticketID, "https://localhost:54322")},
        )
        # No [proxy] allow_loopback option: loopback daemons are refused.
        self.assertEqual(reply.status, 401)


class GuardTests(TestCase):
    timeout = 30

    def test_addresses(self) -> None:
        """
        Loopback is refused unless allowed; link-local, multicast and
        unspecified addresses always.
        """
        for host, loopback, expected in (
            ("192.0.2.10", False, True),
            ("2001:db8::1", False, True),
            ("127.0.0.1", False, False),
            ("127.0.0.1", True, True),
            ("::1", False, False),
            ("::ffff:127.0.0.1", False, False),
            ("169.254.169.254", True, False),
            ("fe80::1%eth0", True, False),
            ("224.0.0.1", True, False),
            ("0.0.0.0", True, False),
            ("not-an-address", True, False),
        ):
            self.assertEqual(isAllowedAddress(host, loopback), expected, (host, loopback))

    @inlineCallbacks
    def test_nameResolvingToLoopback(self) -> Any:
        """
        A daemon host name that resolves to a loopback address is refused
        (no connection is made) unless loopback is allowed.
        """
        directory = Path(self.mktemp()).resolve()
        pki = _pki.makeTestPKI(str(directory / "pki"))
        daemon = Daemon.start(reactor, daemonConfig(pki), directory / "daemon")
        self.addCleanup(daemon.stop)
        url = f"https://localhost:{daemon.port}/info/".encode()
        events: list[Any] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        refused = DaemonClient.create(reactor, pki.caFile, allowLoopback=False)
        self.addCleanup(refused.close)
        failure = yield self.assertFailure(refused.request(b"GET", url, {}), DNSLookupError)
        self.assertIsInstance(hostError(Failure(failure)), HostUnavailable)
        texts = [formatEvent(e) for e in events]
        self.assertTrue(any("[proxy] allow_loopback = true" in t for t in texts), texts)
        allowed = DaemonClient.create(reactor, pki.caFile, allowLoopback=True)
        self.addCleanup(allowed.close)
        response = yield allowed.request(b"GET", url, {})
        self.assertEqual(response.code, 200)
        yield collectBody(response, 1024)
