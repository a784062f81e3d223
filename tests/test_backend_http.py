# -*- test-case-name: tests.test_backend_http -*-
"""
Tests for L{imageio.backends.http}: the daemon in "proxy mode", relaying a
ticket whose C{url} is another daemon's C{https://.../images/<id>}.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imageio import _pki
from imageio.backends import BackendContext, ipAddress, isLocalAddress, namesListener
from imageio.backends import http as httpbackend
from imageio.backends.http import BadResponse, clipExtents, parseExtents
from imageio.interfaces import Extent, HostError, RemoteError
from imageio.tickets import InvalidTicket
from tests._daemon import writeFragmentedImage
from tests.test_proxy_helpers import (
    Daemon,
    HTTPSClient,
    MiB,
    daemonConfig,
    makeImage,
    pattern,
)

reactor: Any = _reactor


class ParseExtentsTests(SynchronousTestCase):
    def test_zeroExtents(self) -> None:
        """
        Zero extents become L{Extent}s in order.
        """
        body = json.dumps(
            [
                {"start": 0, "length": 4096, "zero": False, "hole": False},
                {"start": 4096, "length": 8192, "zero": True, "hole": True},
            ]
        ).encode()
        self.assertEqual(
            parseExtents(body, "zero"),
            [Extent(0, 4096, zero=False), Extent(4096, 8192, zero=True, hole=True)],
        )

    def test_dirtyExtents(self) -> None:
        """
        Dirty extents keep their C{dirty} flag; C{zero} defaults to false.
        """
        body = json.dumps([{"start": 0, "length": 10, "dirty": True}]).encode()
        self.assertEqual(parseExtents(body, "dirty"), [Extent(0, 10, zero=False, dirty=True)])

    def test_gapsRefused(self) -> None:
        """
        Extents that do not follow each other from offset 0 are refused.
        """
        for items in (
            [{"start": 1, "length": 1, "zero": False}],
            [{"start": 0, "length": 1, "zero": False}, {"start": 2, "length": 1, "zero": False}],
            [{"start": 0, "length": -1, "zero": False}],
            [{"start": 0, "length": True, "zero": False}],
            [{"start": 0, "length": 1, "zero": "no"}],
            {"start": 0},
            [1],
        ):
            self.assertRaises(BadResponse, parseExtents, json.dumps(items).encode(), "zero")
        self.assertRaises(BadResponse, parseExtents, b"not json", "zero")

    def test_hugeNumbersRefused(self) -> None:
        """
        A daemon answer with numbers of thousands of digits is refused before
        they are converted.
        """
        body = b'[{"start": 0, "length": ' + b"9" * 4000 + b', "zero": false}]'
        self.assertRaises(BadResponse, parseExtents, body, "zero")

    def test_clip(self) -> None:
        """
        Clipping keeps the parts of extents inside the window.
        """
        extents = [Extent(0, 10, zero=False), Extent(10, 10, zero=True)]
        self.assertEqual(
            clipExtents(extents, 5, 10), [Extent(5, 5, zero=False), Extent(10, 5, zero=True)]
        )
        self.assertEqual(clipExtents(extents, 20, 5), [])

    def test_clipLimit(self) -> None:
        """
        Clipping a long map returns at most C{limit} extents from the one
        holding C{start}, found without scanning from the first.
        """
        extents = [Extent(i * 10, 10, zero=bool(i % 2)) for i in range(100_000)]
        got = clipExtents(extents, 500_005, 10**9, limit=3)
        self.assertEqual(
            got,
            [
                Extent(500_005, 5, zero=False),
                Extent(500_010, 10, zero=True),
                Extent(500_020, 10, zero=False),
            ],
        )


class NamesListenerTests(SynchronousTestCase):
    def test_ownAddresses(self) -> None:
        """
        URLs naming a listener of ours, by C{localhost}, a loopback or
        unspecified address, this host's name or one of its addresses, on
        the listener's port, are recognized; other ports, hosts and schemes
        are not.
        """
        wildcard = [("::", 54322)]
        for url in (
            "https://localhost:54322/images/x",
            "https://LOCALHOST.:54322/images/x",
            "https://127.0.0.1:54322/images/x",
            "https://127.0.0.2:54322/images/x",
            "https://[::1]:54322/images/x",
            "https://[::ffff:127.0.0.1]:54322/images/x",
            "https://0.0.0.0:54322/images/x",
            "https://[::]:54322/images/x",
            f"https://{socket.gethostname()}:54322/images/x",
            "http://localhost:54322/images/x",
        ):
            self.assertTrue(namesListener(url, wildcard), url)
        for url in (
            "https://localhost:54323/images/x",
            "https://localhost/images/x",
            "https://192.0.2.1:54322/images/x",
            "https://daemon.example.com:54322/images/x",
            "file:///var/tmp/localhost:54322",
            "nbd:unix:/run/sock",
        ):
            self.assertFalse(namesListener(url, wildcard), url)
        self.assertTrue(namesListener("https://localhost/images/x", [("0.0.0.0", 443)]))
        specific = [("127.0.0.1", 54322)]
        self.assertTrue(namesListener("https://127.0.0.1:54322/images/x", specific))
        self.assertFalse(namesListener("https://192.0.2.1:54322/images/x", specific))

    def test_isLocalAddress(self) -> None:
        """
        Loopback, unspecified and this host's interface addresses are local;
        others and names are not.
        """
        for host in ("127.0.0.1", "::1", "0.0.0.0", "::", "::ffff:127.0.0.1"):
            self.assertTrue(isLocalAddress(host), host)
        for host in ("192.0.2.1", "2001:db8::1", "localhost", "not an address"):
            self.assertFalse(isLocalAddress(host), host)

    def test_ipAddress(self) -> None:
        """
        An IP literal names its address, without an IPv6 zone and with an
        IPv4-mapped address as its IPv4 address; a name names none.
        """
        for host, expected in [
            ("192.0.2.1", ipaddress.IPv4Address("192.0.2.1")),
            ("::ffff:192.0.2.1", ipaddress.IPv4Address("192.0.2.1")),
            ("fe80::1%eth0", ipaddress.IPv6Address("fe80::1")),
            ("2001:db8::1", ipaddress.IPv6Address("2001:db8::1")),
        ]:
            self.assertEqual(ipAddress(host), expected, host)
        for host in ("localhost", "not an address", "", "[::1]"):
            self.assertIsNone(ipAddress(host), host)


class ProxyModeTests(TestCase):
    """
    Daemon B serves a ticket whose URL points at daemon A's ticket; clients
    talk to B.
    """

    timeout = 60

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.pki = _pki.makeTestPKI(str(self.dir / "pki"))
        self.daemonA = Daemon.start(reactor, daemonConfig(self.pki), self.dir / "a")
        self.addCleanup(self.daemonA.stop)
        self.daemonB = Daemon.start(reactor, daemonConfig(self.pki), self.dir / "b")
        self.addCleanup(self.daemonB.stop)
        self.client = HTTPSClient("localhost", self.daemonB.port, self.pki.caFile)
        self.addCleanup(self.client.close)

    def relayTicket(
        self, data: bytes, size: int | None = None, host: str = "localhost", **extra: Any
    ) -> tuple[str, Path]:
        """
        An image on A, a ticket for it on A, and a proxy-mode ticket on B.

        @return: B's ticket id and the image path.
        """
        path = self.dir / f"image-{len(self.daemonA.registry)}"
        size = len(data) if size is None else size
        ticketA = self.daemonA.addTicket(makeImage(path, data, size), size, **extra)
        url = f"{self.daemonA.url(host)}/images/{ticketA}"
        ticketB = self.daemonB.addTicket(url, size, **extra)
        return ticketB, path

    @inlineCallbacks
    def test_ticketNamingItsOwnDaemon(self) -> Any:
        """
        A proxy-mode ticket naming its own daemon is refused when added; one
        that names it in a way only DNS tells (here: changed after adding) is
        answered 508 Loop Detected after one relayed request, instead of
        relaying to itself without end.
        """
        own = self.daemonB.url("localhost") + "/images/x"
        e = self.assertRaises(InvalidTicket, self.daemonB.addTicket, own, 4096)
        self.assertIn("The URL names this daemon", str(e))
        ticket = self.daemonB.addTicket(self.daemonA.url("localhost") + "/images/x", 4096)
        self.daemonB.registry.get(ticket).url = f"{self.daemonB.url('localhost')}/images/{ticket}"
        for method, path in (
            ("OPTIONS", f"/images/{ticket}"),
            ("GET", f"/images/{ticket}"),
            ("GET", f"/images/{ticket}/extents"),
        ):
            reply = yield self.client.request(method, path)
            self.assertEqual(reply.status, 508, reply.text)
            self.assertIn("Loop detected", reply.text)
        self.assertFalse(self.daemonB.registry.get(ticket).active)

    @inlineCallbacks
    def test_twoDaemonsNamingEachOther(self) -> Any:
        """
        Two daemons whose proxy-mode tickets name each other do not relay
        round: the first relayed request that would be relayed again is
        508.
        """
        ticket = str(uuid.uuid4())
        self.daemonA.addTicket(
            f"{self.daemonB.url('localhost')}/images/{ticket}", 4096, ticketID=ticket
        )
        self.daemonB.addTicket(
            f"{self.daemonA.url('localhost')}/images/{ticket}", 4096, ticketID=ticket
        )
        reply = yield self.client.request("GET", f"/images/{ticket}")
        self.assertEqual(reply.status, 508, reply.text)
        self.assertIn("Loop detected", reply.text)

    @inlineCallbacks
    def test_options(self) -> Any:
        """
        OPTIONS through B reports B's features and A's concurrency.
        """
        ticket, _ = self.relayTicket(b"x" * 4096)
        reply = yield self.client.request("OPTIONS", f"/images/{ticket}")
        self.assertEqual(reply.status, 200, reply.text)
        options = json.loads(reply.body)
        self.assertEqual(options["features"], ["checksum", "extents", "flush", "zero"])
        self.assertEqual(options["max_writers"], 1)
        self.assertEqual(options["max_readers"], 8)

    @inlineCallbacks
    def test_download(self) -> Any:
        """
        GET through B returns A's bytes, whole and by range.
        """
        data = pattern(3 * MiB + 123)
        ticket, _ = self.relayTicket(data)
        reply = yield self.client.request("GET", f"/images/{ticket}")
        self.assertEqual(reply.status, 200, reply.text)
        self.assertEqual(reply.body, data)
        reply = yield self.client.request(
            "GET", f"/images/{ticket}", headers={"Range": "bytes=1000-2000000"}
        )
        self.assertEqual(reply.status, 206)
        self.assertEqual(reply.body, data[1000:2000001])
        self.assertEqual(reply.header("content-range"), f"bytes 1000-2000000/{len(data)}")

    @inlineCallbacks
    def test_upload(self) -> Any:
        """
        PUT through B writes A's image; PATCH zero and flush reach A.
        """
        size = 4 * MiB
        ticket, path = self.relayTicket(b"", size)
        data = pattern(3 * MiB, seed=1)
        reply = yield self.client.request(
            "PUT",
            f"/images/{ticket}?flush=n",
            body=data,
            headers={"Content-Range": f"bytes 4096-{4096 + len(data) - 1}/*"},
        )
        self.assertEqual(reply.status, 200, reply.text)
        msg = json.dumps({"op": "zero", "offset": 8192, "size": 4096, "flush": True})
        reply = yield self.client.request(
            "PATCH", f"/images/{ticket}", body=msg.encode(), headers={"Content-Type": "json"}
        )
        self.assertEqual(reply.status, 200, reply.text)
        reply = yield self.client.request("PATCH", f"/images/{ticket}", body=b'{"op":"flush"}')
        self.assertEqual(reply.status, 200, reply.text)
        expected = bytearray(size)
        expected[4096 : 4096 + len(data)] = data
        expected[8192 : 8192 + 4096] = bytes(4096)
        self.assertEqual(path.read_bytes(), bytes(expected))
        # Reading back through B sees the new bytes.
        reply = yield self.client.request("GET", f"/images/{ticket}")
        self.assertEqual(reply.body, bytes(expected))

    @inlineCallbacks
    def test_extents(self) -> Any:
        """
        Extents through B are A's extents (holes of a sparse file included).
        """
        ticket, path = self.relayTicket(b"x" * MiB, 4 * MiB)
        reply = yield self.client.request("GET", f"/images/{ticket}/extents")
        self.assertEqual(reply.status, 200, reply.text)
        extents = json.loads(reply.body)
        direct = HTTPSClient("localhost", self.daemonA.port, self.pki.caFile)
        self.addCleanup(direct.close)
        ticketA = list(self.daemonA.registry._tickets)[0]
        expected = yield direct.request("GET", f"/images/{ticketA}/extents")
        self.assertEqual(extents, json.loads(expected.body))
        self.assertEqual(sum(e["length"] for e in extents), 4 * MiB)

    @inlineCallbacks
    def test_streamedExtents(self) -> Any:
        """
        A daemon's streamed extents answer (a very fragmented image) is read
        whole, and B streams its own answer in turn.
        """
        runs = 20_000
        path = self.dir / "fragmented.raw"
        size = writeFragmentedImage(path, runs)
        ticketA = self.daemonA.addTicket(f"file://{path}", size, ("read",))
        ticketB = self.daemonB.addTicket(
            f"{self.daemonA.url('localhost')}/images/{ticketA}", size, ("read",)
        )
        reply = yield self.client.request("GET", f"/images/{ticketB}/extents")
        self.assertEqual(reply.status, 200, reply.text[:200])
        extents = json.loads(reply.body)
        self.assertEqual(len(extents), 2 * runs)
        self.assertEqual(
            extents[:2],
            [
                {"start": 0, "length": 4096, "zero": False, "hole": False},
                {"start": 4096, "length": 4096, "zero": True, "hole": False},
            ],
        )

    @inlineCallbacks
    def test_checksum(self) -> Any:
        """
        A checksum computed by B reading through A equals A's own.
        """
        ticket, _ = self.relayTicket(pattern(2 * MiB + 5, seed=2))
        reply = yield self.client.request("GET", f"/images/{ticket}/checksum")
        self.assertEqual(reply.status, 200, reply.text)
        direct = HTTPSClient("localhost", self.daemonA.port, self.pki.caFile)
        self.addCleanup(direct.close)
        ticketA = list(self.daemonA.registry._tickets)[0]
        expected = yield direct.request("GET", f"/images/{ticketA}/checksum")
        self.assertEqual(json.loads(reply.body), json.loads(expected.body))

    @inlineCallbacks
    def test_remoteForbidden(self) -> Any:
        """
        A ticket unknown to A gives the client A's 403 and text.
        """
        ticket = self.daemonB.addTicket(f"{self.daemonA.url('localhost')}/images/nope", 100)
        reply = yield self.client.request("GET", f"/images/{ticket}")
        self.assertEqual(reply.status, 403)
        self.flushLoggedErrors(RemoteError, HostError)
        self.assertEqual(
            reply.text, "You are not allowed to access this resource: No such ticket nope\n"
        )

    @inlineCallbacks
    def test_remoteRangeError(self) -> Any:
        """
        A range beyond A's image is refused with 416 by B, which learned the
        image size from A.
        """
        ticket, _ = self.relayTicket(b"x" * 1000, 1000)
        reply = yield self.client.request(
            "GET", f"/images/{ticket}", headers={"Range": "bytes=2000-2999"}
        )
        self.assertEqual(reply.status, 416)

    @inlineCallbacks
    def test_remoteMissingImage(self) -> Any:
        """
        A's 500 for a missing image reaches the client as 500.
        """
        ticket, path = self.relayTicket(b"x" * 1000)
        path.unlink()
        reply = yield self.client.request("GET", f"/images/{ticket}")
        self.assertEqual(reply.status, 500)
        self.flushLoggedErrors(RemoteError, HostError, FileNotFoundError)

    @inlineCallbacks
    def test_remoteDown(self) -> Any:
        """
        A daemon that is not listening gives 503.
        """
        ticket, _ = self.relayTicket(b"x" * 1000)
        yield self.daemonA.stop()
        reply = yield self.client.request("GET", f"/images/{ticket}")
        self.assertEqual(reply.status, 503, reply.text)
        self.flushLoggedErrors(RemoteError, HostError)
        self.assertIn("Failed communicating with host", reply.text)

    @inlineCallbacks
    def test_wrongCA(self) -> Any:
        """
        A daemon whose certificate does not chain to the configured CA is
        refused: 502, and no data.
        """
        other = _pki.ensureSelfSigned(str(self.dir / "other"))[0]
        daemonC = Daemon.start(reactor, daemonConfig(self.pki, httpCAFile=other), self.dir / "c")
        self.addCleanup(daemonC.stop)
        path = self.dir / "secret"
        ticketA = self.daemonA.addTicket(makeImage(path, b"secret"), 6)
        ticket = daemonC.addTicket(f"{self.daemonA.url('localhost')}/images/{ticketA}", 6)
        client = HTTPSClient("localhost", daemonC.port, self.pki.caFile)
        self.addCleanup(client.close)
        reply = yield client.request("GET", f"/images/{ticket}")
        self.assertEqual(reply.status, 502, reply.text)
        self.assertNotIn(b"secret", reply.body)
        self.flushLoggedErrors(RemoteError, HostError)

    @inlineCallbacks
    def test_wrongHostName(self) -> Any:
        """
        A daemon whose certificate does not name the host in the URL is
        refused: 502, and no data.
        """
        daemonW = Daemon.start(
            reactor,
            daemonConfig(
                self.pki, certFile=self.pki.wrongNameCertFile, keyFile=self.pki.wrongNameKeyFile
            ),
            self.dir / "w",
        )
        self.addCleanup(daemonW.stop)
        path = self.dir / "secret"
        ticketW = daemonW.addTicket(makeImage(path, b"secret"), 6)
        ticket = self.daemonB.addTicket(f"{daemonW.url('localhost')}/images/{ticketW}", 6)
        reply = yield self.client.request("GET", f"/images/{ticket}")
        self.assertEqual(reply.status, 502, reply.text)
        self.assertNotIn(b"secret", reply.body)
        self.flushLoggedErrors(RemoteError, HostError)


class OpenBackendTests(TestCase):
    """
    L{httpbackend.openBackend} against a real daemon.
    """

    timeout = 30

    def setUp(self) -> None:
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.pki = _pki.makeTestPKI(str(self.dir / "pki"))
        self.daemon = Daemon.start(reactor, daemonConfig(self.pki), self.dir / "a")
        self.addCleanup(self.daemon.stop)

    def open(self, url: str) -> Deferred[Any]:
        ctx = BackendContext(reactor=reactor, diskio=None, caFile=self.pki.caFile)  # type: ignore[arg-type]
        return httpbackend.openBackend(ctx, url, write=True, sparse=False, dirty=False)

    @inlineCallbacks
    def test_operations(self) -> Any:
        """
        Every backend operation works against a real daemon, on one
        connection.
        """
        path = self.dir / "img"
        ticket = self.daemon.addTicket(makeImage(path, b"", 1 * MiB), MiB)
        backend = yield self.open(f"{self.daemon.url('localhost')}/images/{ticket}")
        self.addCleanup(backend.close)
        self.assertEqual(backend.features, frozenset({"checksum", "extents", "flush", "zero"}))
        size = yield backend.size()
        self.assertEqual(size, MiB)
        data = pattern(100_000, seed=3)
        n = yield backend.write(5, memoryview(data))
        self.assertEqual(n, len(data))
        yield backend.zero(10, 20)
        yield backend.flush()
        buf = bytearray(200_000)
        n = yield backend.readInto(0, memoryview(buf))
        self.assertEqual(n, 200_000)
        expected = bytearray(200_000)
        expected[5 : 5 + len(data)] = data
        expected[10:30] = bytes(20)
        self.assertEqual(buf, expected)
        # Reads stop at the end of the image.
        n = yield backend.readInto(MiB - 10, memoryview(buf))
        self.assertEqual(n, 10)
        extents = yield backend.extents("zero", 0, MiB)
        self.assertEqual(sum(e.length for e in extents), MiB)
        # All of it on one connection.
        self.assertEqual(len(self.daemon.registry.get(ticket).connections), 1)

    @inlineCallbacks
    def test_forbidden(self) -> Any:
        """
        Opening an unknown ticket fails with the daemon's 403 and text.
        """
        try:
            yield self.open(f"{self.daemon.url('localhost')}/images/unknown")
        except RemoteError as e:
            self.assertEqual(e.status, 403)
            self.assertIn("No such ticket unknown", e.text)
        else:
            self.fail("open succeeded")

    @inlineCallbacks
    def test_caFileReadInPool(self) -> Any:
        """
        A CA file the daemon did not read at start is read through the
        disk-io pool when the first C{https:} ticket opens, not on the
        reactor thread; later opens use the loaded trust root.
        """
        from twisted.internet.threads import deferToThread

        from imageio.backends import httpclient

        self.patch(httpclient, "_TRUST_ROOTS", {})
        self.patch(httpclient, "CA_FILES", {})
        calls: list[Any] = []

        class Pool:
            def run(self, fn: Any, *args: Any) -> Deferred[Any]:
                calls.append(fn)
                return deferToThread(fn, *args)

        ctx = BackendContext(reactor=reactor, diskio=Pool(), caFile=self.pki.caFile)  # type: ignore[arg-type]
        path = self.dir / "img"
        ticket = self.daemon.addTicket(makeImage(path, b"", MiB), MiB)
        url = f"{self.daemon.url('localhost')}/images/{ticket}"
        for _ in range(2):
            backend = yield httpbackend.openBackend(
                ctx, url, write=False, sparse=False, dirty=False
            )
            yield backend.close()
        self.assertEqual(calls.count(httpclient._readTrustRoot), 1)

    @inlineCallbacks
    def test_closeDuringOperation(self) -> Any:
        """
        Closing the backend while an operation runs lets it finish, then
        closes its connection instead of keeping it in the pool.
        """
        path = self.dir / "img"
        ticket = self.daemon.addTicket(makeImage(path, pattern(MiB)), MiB)
        backend = yield self.open(f"{self.daemon.url('localhost')}/images/{ticket}")
        buf = bytearray(MiB)
        reading = backend.readInto(0, memoryview(buf))
        yield backend.close()
        n = yield reading
        self.assertEqual(n, MiB)
        self.assertEqual(bytes(buf), pattern(MiB))
        connections = self.daemon.registry.get(ticket).connections
        for _ in range(100):
            if not connections:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(len(connections), 0)
