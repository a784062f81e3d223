"""
Reliability of the daemon under faults, on a real daemon over real
sockets: slow and idle clients (checklist F), concurrent writers (G),
disconnects, storage errors and signals (H), and the unaligned O_DIRECT
case of B.16.

Tests that need root features (loop devices, tmpfs mounts) skip with the
reason when those are missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any, cast

from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.trial.unittest import SkipTest

from imageio import _log
from imageio.web._response import INTERNAL_ERROR
from tests._daemon import (
    Connection,
    DaemonTestCase,
    InProcessDaemon,
    Response,
    SubprocessDaemon,
    abortive,
    connect,
    control,
    fdCount,
    parallel,
    pattern,
    rawRequest,
    shortTempDir,
    ticketBody,
    waitFor,
)
from tests.test_reliability import jsonBytes, rangeRequest, readFile, rss

KiB = 1024
MiB = 1024**2
GiB = 1024**3


def ticketInfo(daemon: InProcessDaemon | SubprocessDaemon, ticket: str) -> dict[str, Any]:
    info: dict[str, Any] = control(daemon.addresses, "GET", f"/tickets/{ticket}").json()
    return info


def idle(daemon: InProcessDaemon | SubprocessDaemon, ticket: str) -> bool:
    """
    @return: Whether no operation runs on C{ticket} and no connection holds
        it.
    """
    info = ticketInfo(daemon, ticket)
    return not info["active"] and info["connections"] == 0


def run(*argv: str) -> str:
    """
    Run a system tool.

    @raise SkipTest: If it fails, with its error output.
    """
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise SkipTest(f"{argv[0]} unavailable: {e}") from None
    if result.returncode != 0:
        raise SkipTest(f"{' '.join(argv)} failed: {result.stderr.strip()}")
    return result.stdout


def loopDevice(case: DaemonTestCase, backing: Path, sectorSize: int = 512) -> str:
    """
    Attach C{backing} to a free loop device with direct I/O, detached when
    the test ends.

    @return: The device path.
    """
    if os.geteuid() != 0 or not shutil.which("losetup"):
        raise SkipTest("loop devices need root and losetup")
    device = run(
        "losetup",
        "--find",
        "--show",
        f"--sector-size={sectorSize}",
        "--direct-io=on",
        str(backing),
    ).strip()
    case.addCleanup(subprocess.run, ["losetup", "-d", device], capture_output=True, timeout=30)
    return device


def mountTmpfs(case: DaemonTestCase, size: str) -> Path:
    """
    Mount a tmpfs of C{size} on a new directory, unmounted when the test
    ends.
    """
    if os.geteuid() != 0:
        raise SkipTest("mounting a tmpfs needs root")
    directory = shortTempDir("iio-mnt-")
    try:
        run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory))
    except SkipTest:
        directory.rmdir()
        raise

    def unmount() -> None:
        # The daemon may still be closing its file: fall back to lazy.
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)
        shutil.rmtree(directory, ignore_errors=True)

    case.addCleanup(unmount)
    return directory


class SlowClientTests(DaemonTestCase):
    """
    Checklist F.29-F.32 and A.7: clients that are slow, idle, pipelined or
    oversized, with C{request_timeout} and C{handshake_timeout} of 1 second.
    """

    def setUp(self) -> None:
        self.daemon = self.startDaemon(daemon={"request_timeout": 1}, tls={"handshake_timeout": 1})
        self.size = 4 * MiB
        self.data = pattern(self.size, b"slow")
        self.image = self.makeImage(self.daemon, self.size, self.data)
        self.ticket = self.addTicket(self.daemon, self.image, self.size, inactivity_timeout=1)

    async def test_slowloris(self) -> None:
        """
        A client sending its request head one byte at a time, each byte
        within the idle timeout, is still cut within a bounded time.
        """

        def scenario() -> None:
            head = f"GET /images/{self.ticket} HTTP/1.1\r\nHost: localhost\r\nX-Slow: ".encode()
            head += b"z" * 200
            with connect(self.daemon.addresses) as conn:
                started = time.monotonic()
                for byte in head:
                    try:
                        conn.send(bytes([byte]))
                    except OSError:
                        break
                    if time.monotonic() - started > 3:
                        break
                    time.sleep(0.25)
                self.assertTrue(conn.waitClosed(0.1))
                self.assertLess(time.monotonic() - started, 3)

        await deferToThread(scenario)

    async def test_slowBody(self) -> None:
        """
        A PUT body trickling faster than the inactivity timeout is accepted
        (there is no minimum rate); a pause longer than the timeout cuts the
        connection without a response, and memory stays flat.
        """

        def scenario() -> None:
            before = rss()
            with connect(self.daemon.addresses) as conn:
                conn.send(
                    rawRequest("PUT", f"/images/{self.ticket}", [("Content-Length", str(MiB))])
                )
                for _ in range(5):
                    conn.send(b"s")
                    time.sleep(0.3)
                started = time.monotonic()
                self.assertTrue(conn.waitClosed(4))
                self.assertGreater(time.monotonic() - started, 0.5)
            self.assertTrue(waitFor(lambda: idle(self.daemon, self.ticket), 3))
            self.assertLess(rss() - before, 16 * MiB)
            self.assertEqual(readFile(self.image), self.data)

        await deferToThread(scenario)

    async def test_slowReaderHugeImage(self) -> None:
        """
        A client that reads one byte of a GET of a 1 TiB sparse image and
        stops reading is disconnected after the ticket's inactivity timeout,
        with no unbounded buffering, and its resources are freed.
        """
        huge = self.makeImage(self.daemon, 1024 * GiB, name="huge")
        ticket = self.addTicket(self.daemon, huge, 1024 * GiB, ops=["read"], inactivity_timeout=1)

        def scenario() -> None:
            fds, before = fdCount(), rss()
            conn = connect(self.daemon.addresses)
            try:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                conn.send(rawRequest("GET", f"/images/{ticket}"))
                response = conn.response(head=True)
                self.assertEqual(response.header("content-length"), str(1024 * GiB))
                conn.readBody(1)
                self.assertTrue(waitFor(lambda: ticketInfo(self.daemon, ticket)["active"], 2))
                started = time.monotonic()
                self.assertTrue(waitFor(lambda: idle(self.daemon, ticket), 5))
                self.assertGreater(time.monotonic() - started, 0.5)
                self.assertLess(rss() - before, 64 * MiB)
            finally:
                conn.close()
            self.waitForFds(fds)

        await deferToThread(scenario)

    async def test_slowReaderIsNotAnError(self) -> None:
        """
        Cutting a client that stopped reading is a normal event: nothing is
        logged as an error.
        """
        huge = self.makeImage(self.daemon, 1024 * GiB, name="huge")
        ticket = self.addTicket(self.daemon, huge, 1024 * GiB, ops=["read"], inactivity_timeout=1)

        def scenario() -> None:
            with connect(self.daemon.addresses) as conn:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                conn.send(rawRequest("GET", f"/images/{ticket}"))
                conn.response(head=True)
                self.assertTrue(waitFor(lambda: ticketInfo(self.daemon, ticket)["active"], 2))
                self.assertTrue(waitFor(lambda: idle(self.daemon, ticket), 5))

        await deferToThread(scenario)
        self.assertEqual([f.getErrorMessage() for f in self.flushLoggedErrors()], [])

    async def test_idleAndHalfOpenConnections(self) -> None:
        """
        Idle plain and TLS connections, TLS connections that never finish
        the handshake (sending nothing or half a ClientHello), and keep-alive
        connections idle after a request are all closed at their deadlines,
        while a legitimate client is served; file descriptors return.
        """

        def scenario() -> None:
            addresses = self.daemon.addresses
            fds = fdCount()
            clientHello = _clientHello()
            conns: list[Connection] = []
            for _ in range(50):
                conns.append(connect(addresses, "local"))
                conns.append(connect(addresses, "remote-plain"))
                half = connect(addresses, "remote-plain")
                half.send(clientHello[: len(clientHello) // 2])
                conns.append(half)
            for _ in range(10):
                conns.append(connect(addresses, "remote"))
                used = connect(addresses, "local")
                used.request("GET", f"/images/{self.ticket}", [("Range", "bytes=0-0")])
                conns.append(used)
            with connect(addresses, "remote") as legit:
                r = legit.request("GET", f"/images/{self.ticket}", [("Range", "bytes=0-9")])
                self.assertEqual(r.body, self.data[:10])
            started = time.monotonic()
            for conn in conns:
                self.assertTrue(conn.waitClosed(max(0.1, started + 3 - time.monotonic())))
                conn.close()
            self.waitForFds(fds)

        await deferToThread(scenario)

    async def test_pipelinedRequestsInOrder(self) -> None:
        """
        GET, PUT and GET pipelined on one connection, the first response
        delayed by a client that does not read, are answered in order: the
        first GET sees the old bytes and the last GET the new ones.
        """

        def scenario() -> None:
            with connect(self.daemon.addresses) as conn:
                conn.send(
                    rawRequest("GET", f"/images/{self.ticket}")
                    + rawRequest("PUT", f"/images/{self.ticket}?flush=n", body=b"N" * 10)
                    + rawRequest("GET", f"/images/{self.ticket}", [("Range", "bytes=0-19")])
                )
                time.sleep(0.5)
                first = conn.response()
                self.assertEqual((first.status, first.body), (200, self.data))
                self.assertEqual(conn.response().status, 200)
                last = conn.response()
                self.assertEqual(last.status, 206)
                self.assertEqual(last.body, b"N" * 10 + self.data[10:20])

        await deferToThread(scenario)

    async def test_oversizedRequestHead(self) -> None:
        """
        A request line over 4096 bytes gets 414; 10 000 headers get 400 or
        431; a 1 MB header gets 431; each connection is closed and the
        daemon keeps serving.
        """

        def scenario() -> None:
            cases = [
                (b"GET /images/" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", (414,)),
                (
                    b"GET /images/x HTTP/1.1\r\n"
                    + b"".join(b"X-%d: y\r\n" % i for i in range(10000))
                    + b"\r\n",
                    (400, 431),
                ),
                (b"GET /images/x HTTP/1.1\r\nX-Big: " + b"y" * MiB + b"\r\n\r\n", (431,)),
            ]
            for data, statuses in cases:
                with connect(self.daemon.addresses) as conn:
                    try:
                        conn.send(data)
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    r = conn.response()
                    self.assertIn(r.status, statuses)
                    self.assertTrue(conn.waitClosed(2))
            with connect(self.daemon.addresses) as conn:
                r = conn.request("GET", f"/images/{self.ticket}", [("Range", "bytes=0-0")])
                self.assertEqual(r.status, 206)

        await deferToThread(scenario)


def _clientHello() -> bytes:
    """
    @return: The first flight of a real TLS client.
    """
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


class TLSTests(DaemonTestCase):
    """
    Checklist F.33: plain HTTP to the TLS port, old TLS versions, bad
    certificates at startup.
    """

    def setUp(self) -> None:
        self.daemon = self.startDaemon()

    async def test_plainHTTPToTLSPort(self) -> None:
        """
        Plain HTTP to the TLS port is closed at once, without a hang, and
        TLS clients are still served.
        """

        def scenario() -> None:
            with connect(self.daemon.addresses, "remote-plain") as conn:
                conn.send(rawRequest("GET", "/info/"))
                started = time.monotonic()
                self.assertTrue(conn.waitClosed(2))
                self.assertLess(time.monotonic() - started, 1)
            with connect(self.daemon.addresses, "remote") as conn:
                self.assertEqual(conn.request("GET", "/info/").status, 200)

        await deferToThread(scenario)

    async def test_oldTLSRefused(self) -> None:
        """
        TLS 1.0 and 1.1 clients fail the handshake cleanly.
        """

        def scenario() -> None:
            for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                context.load_verify_locations(self.daemon.addresses.caFile)
                context.minimum_version = context.maximum_version = version
                try:
                    context.set_ciphers("DEFAULT:@SECLEVEL=0")
                except ssl.SSLError:
                    pass
                sock = socket.create_connection(self.daemon.addresses.remote, timeout=5)
                with self.assertRaises(ssl.SSLError):
                    context.wrap_socket(sock, server_hostname="localhost")
                sock.close()

        await deferToThread(scenario)

    async def test_badCertificateFailsStartup(self) -> None:
        """
        An expired certificate or a key that does not match stops twistd at
        once with a message naming the file and a failure status.
        """

        def scenario() -> None:
            from imageio._pki import makeTestPKI

            pki = makeTestPKI(str(self.daemon.runDir / "bad-pki"))
            for cert, key, words in [
                (pki.expiredCertFile, pki.expiredKeyFile, "expired"),
                (pki.certFile, pki.otherKeyFile, "does not match"),
            ]:
                started = time.monotonic()
                with self.assertRaises(RuntimeError) as raised:
                    SubprocessDaemon.start(
                        {"tls": {"cert_file": cert, "key_file": key}}, timeout=15
                    ).stop()
                output = str(raised.exception)
                self.assertIn(words, output)
                self.assertIn(os.path.basename(cert if words == "expired" else key), output)
                self.assertLess(time.monotonic() - started, 10)

        await deferToThread(scenario)


class ConcurrencyTests(DaemonTestCase):
    """
    Checklist G and B.16: concurrent writers and the bytes around them.
    """

    TICKET = 16 * MiB
    TAIL = MiB

    def setUp(self) -> None:
        self.daemon = self.startDaemon()
        self.old = pattern(self.TICKET + self.TAIL, b"old")

    def backing(self) -> Path:
        path = self.makeImage(self.daemon, 0, name="backing")
        path.write_bytes(self.old)
        return path

    def writeParts(self, ticket: str, parts: list[tuple[int, bytes]]) -> list[int]:
        """
        Upload each C{(offset, data)} on its own connection, all at once.

        @return: The statuses.
        """

        def put(offset: int, data: bytes) -> int:
            with connect(self.daemon.addresses) as conn:
                headers = [("Content-Range", f"bytes {offset}-{offset + len(data) - 1}/*")]
                return conn.request("PUT", f"/images/{ticket}", headers, data).status

        return cast(
            "list[int]", parallel(*[lambda o=o, d=d: put(o, d) for o, d in parts], timeout=60)
        )

    def download(self, ticket: str) -> bytes:
        with connect(self.daemon.addresses) as conn:
            r = conn.request("GET", f"/images/{ticket}")
            self.assertEqual(r.status, 200)
            return r.body

    def disjointWriters(self, ticket: str) -> None:
        """
        Write the ticket's range in 8 parts at once, then read it back.
        """
        new = pattern(self.TICKET, b"new")
        # Unaligned boundaries: every edge is a partial block.
        edges = [0] + [i * self.TICKET // 8 + 777 * i for i in range(1, 8)] + [self.TICKET]
        parts = [(a, new[a:b]) for a, b in zip(edges, edges[1:], strict=False)]
        self.assertEqual(self.writeParts(ticket, parts), [200] * 8)
        self.assertEqual(self.download(ticket), new)

    async def test_disjointWritersFile(self) -> None:
        """
        8 writers on disjoint, unaligned ranges of a file, then a reader:
        the image is byte-exact and the bytes past the ticket size are
        untouched.
        """
        path = self.backing()
        ticket = self.addTicket(self.daemon, path, self.TICKET)
        await deferToThread(self.disjointWriters, ticket)
        self.assertEqual(readFile(path, self.TICKET), self.old[self.TICKET :])

    async def test_disjointWritersBlockDevice(self) -> None:
        """
        8 writers on disjoint, unaligned ranges of a 4 KiB-sector block
        device, then a reader: byte-exact, and the device past the ticket
        size is untouched.
        """
        path = self.backing()
        device = loopDevice(self, path, 4096)
        ticket = self.addTicket(self.daemon, f"file://{device}", self.TICKET)
        await deferToThread(self.disjointWriters, ticket)
        self.assertEqual(readFile(path, self.TICKET), self.old[self.TICKET :])

    async def test_unalignedDirectWrites(self) -> None:
        """
        Writes of 511 bytes at offset 1 and 2 bytes at offset 4095 on a
        4 KiB-sector block device (O_DIRECT) change exactly those bytes.
        """
        path = self.backing()
        device = loopDevice(self, path, 4096)
        ticket = self.addTicket(self.daemon, f"file://{device}", self.TICKET)

        def scenario() -> None:
            self.assertEqual(self.writeParts(ticket, [(1, b"a" * 511), (4095, b"bc")]), [200, 200])
            expected = bytearray(self.old)
            expected[1:512] = b"a" * 511
            expected[4095:4097] = b"bc"
            self.assertEqual(self.download(ticket), bytes(expected[: self.TICKET]))
            self.assertEqual(readFile(path), bytes(expected))

        await deferToThread(scenario)

    async def test_overlapZeroAndFlushRaces(self) -> None:
        """
        Overlapping writers, a zero racing a write on the same range, and
        flushes during writes all succeed; bytes outside the raced ranges
        are exact and each raced byte comes from one of the racers.
        """
        path = self.backing()
        ticket = self.addTicket(self.daemon, path, self.TICKET)
        a, b = pattern(6 * MiB, b"A"), pattern(6 * MiB, b"B")
        w = pattern(2 * MiB, b"W")

        def flush() -> int:
            with connect(self.daemon.addresses) as conn:
                return conn.request(
                    "PATCH", f"/images/{ticket}", body=jsonBytes({"op": "flush"})
                ).status

        def zero() -> int:
            with connect(self.daemon.addresses) as conn:
                body = jsonBytes({"op": "zero", "offset": 12 * MiB + 5, "size": 2 * MiB})
                return conn.request("PATCH", f"/images/{ticket}", body=body).status

        def put(offset: int, data: bytes) -> int:
            with connect(self.daemon.addresses) as conn:
                headers = [("Content-Range", f"bytes {offset}-{offset + len(data) - 1}/*")]
                return conn.request("PUT", f"/images/{ticket}?flush=n", headers, data).status

        def scenario() -> None:
            statuses = parallel(
                lambda: put(0, a),
                lambda: put(4 * MiB + 3, b),
                lambda: put(12 * MiB + 5, w),
                zero,
                flush,
                flush,
            )
            self.assertEqual(statuses, [200] * 6)
            image = self.download(ticket)
            self.assertEqual(image[: 4 * MiB + 3], a[: 4 * MiB + 3])
            self.assertEqual(image[6 * MiB : 10 * MiB + 3], b[6 * MiB - 4 * MiB - 3 :])
            untouched = slice(10 * MiB + 3, 12 * MiB + 5)
            self.assertEqual(image[untouched], self.old[untouched])
            self.assertEqual(image[14 * MiB + 5 :], self.old[14 * MiB + 5 : self.TICKET])
            for i in range(4 * MiB + 3, 6 * MiB, 4099):
                self.assertIn(image[i], (a[i], b[i - 4 * MiB - 3]))
            for i in range(12 * MiB + 5, 14 * MiB + 5, 4099):
                self.assertIn(image[i], (0, w[i - 12 * MiB - 5]))

        await deferToThread(scenario)
        self.assertEqual(readFile(path, self.TICKET), self.old[self.TICKET :])

    async def test_deleteRacingFirstRequest(self) -> None:
        """
        A ticket deleted while new connections send their first request is
        never served after DELETE returned.
        """
        path = self.backing()

        def scenario() -> None:
            for i in range(15):
                ticket = f"race-{i}"
                self.daemon.registry.add(ticketBody(ticket, f"file://{path}", self.TICKET))
                conns = [connect(self.daemon.addresses) for _ in range(3)]

                def first(conn: Connection, ticket: str = ticket) -> int | None:
                    try:
                        conn.send(rangeRequest(ticket, "bytes=0-9"))
                        return conn.response(timeout=5).status
                    except Exception:
                        return None

                def delete(ticket: str = ticket) -> int:
                    return control(self.daemon.addresses, "DELETE", f"/tickets/{ticket}").status

                results = parallel(*[lambda c=c: first(c) for c in conns], delete)
                self.assertEqual(results[-1], 204)
                for status in results[:-1]:
                    self.assertIn(status, (206, 403, None))
                for conn in conns:
                    with conn:
                        self.assertIn(first(conn), (403, None))

        await deferToThread(scenario)


class DisconnectTests(DaemonTestCase):
    """
    Checklist H.38: clients that vanish mid-transfer.
    """

    def setUp(self) -> None:
        self.daemon = self.startDaemon()
        self.size = 32 * MiB
        self.data = pattern(self.size, b"disc")
        self.image = self.makeImage(self.daemon, self.size, self.data)
        self.ticket = self.addTicket(self.daemon, self.image, self.size)
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        level = _log.currentLevel()
        _log.setLevel("debug")
        self.addCleanup(_log.setLevel, level.name)

    def accessLines(self, method: str) -> list[str]:
        return [
            formatEvent(e)
            for e in self.events
            if e.get("method") == method and "status" in e and e.get("site") in ("local", "remote")
        ]

    def assertRecovered(self, fds: int) -> None:
        """
        The ticket is idle again, its file descriptors were freed, and a
        complete upload and download work.
        """
        self.assertTrue(waitFor(lambda: idle(self.daemon, self.ticket), 5))
        self.waitForFds(fds)
        with connect(self.daemon.addresses) as conn:
            self.assertEqual(
                conn.request("PUT", f"/images/{self.ticket}", body=self.data).status, 200
            )
            r = conn.request("GET", f"/images/{self.ticket}")
            self.assertEqual(r.body, self.data)

    async def test_disconnectMidPut(self) -> None:
        """
        A client that resets its connection in the middle of a PUT: no
        success is logged, resources are freed, the ticket works again.
        """

        def scenario() -> None:
            fds = fdCount()
            for listener in ("local", "remote"):
                conn = connect(self.daemon.addresses, listener)
                conn.send(
                    rawRequest(
                        "PUT", f"/images/{self.ticket}", [("Content-Length", str(self.size))]
                    )
                )
                conn.send(self.data[: 12 * MiB])
                self.assertTrue(waitFor(lambda: ticketInfo(self.daemon, self.ticket)["active"], 5))
                abortive(conn)
                self.assertTrue(waitFor(lambda: idle(self.daemon, self.ticket), 5))
            self.assertEqual(self.accessLines("PUT"), [])
            self.assertRecovered(fds)

        await deferToThread(scenario)

    async def test_disconnectMidGet(self) -> None:
        """
        A client that resets its connection in the middle of a GET: no
        success is logged, resources are freed, the ticket works again.
        """

        def scenario() -> None:
            fds = fdCount()
            for listener in ("local", "remote"):
                conn = connect(self.daemon.addresses, listener)
                conn.send(rawRequest("GET", f"/images/{self.ticket}"))
                conn.response(head=True)
                conn.readBody(MiB)
                abortive(conn)
                self.assertTrue(waitFor(lambda: idle(self.daemon, self.ticket), 5))
            self.assertEqual(self.accessLines("GET"), [])
            self.assertRecovered(fds)

        await deferToThread(scenario)


class StorageFaultTests(DaemonTestCase):
    """
    Checklist H.41: storage that fails.
    """

    def setUp(self) -> None:
        self.daemon = self.startDaemon()
        self.healthy = self.makeImage(self.daemon, MiB, pattern(MiB))
        self.healthyTicket = self.addTicket(self.daemon, self.healthy, MiB)

    def assertStillServing(self) -> None:
        with connect(self.daemon.addresses) as conn:
            r = conn.request("GET", f"/images/{self.healthyTicket}", [("Range", "bytes=0-9")])
            self.assertEqual((r.status, r.body), (206, pattern(10)))

    async def test_noSpace(self) -> None:
        """
        ENOSPC during a PUT or a zero is a 500 with the generic text (the
        reason is in the log), the connection closes, and the daemon keeps
        serving.
        """
        mount = mountTmpfs(self, "2m")
        image = mount / "image"
        with open(image, "wb") as f:
            f.truncate(16 * MiB)
        ticket = self.addTicket(self.daemon, image, 16 * MiB)

        def scenario() -> None:
            fds = fdCount()
            with connect(self.daemon.addresses) as conn:
                r = conn.request("PUT", f"/images/{ticket}", body=pattern(8 * MiB))
                self.assertEqual(r.status, 500)
                self.assertEqual(r.text, INTERNAL_ERROR + "\n")
                self.assertTrue(r.closes)
            with connect(self.daemon.addresses) as conn:
                body = jsonBytes({"op": "zero", "offset": 8 * MiB, "size": 8 * MiB})
                r = conn.request("PATCH", f"/images/{ticket}", body=body)
                self.assertEqual(r.status, 500)
                self.assertEqual(r.text, INTERNAL_ERROR + "\n")
            self.assertStillServing()
            self.assertTrue(waitFor(lambda: idle(self.daemon, ticket), 5))
            self.waitForFds(fds)

        await deferToThread(scenario)
        self.flushLoggedErrors(OSError)

    async def test_readOnlyFilesystem(self) -> None:
        """
        Writing to an image on a read-only file system is a 500 (the reason
        is in the log); reading it still works and the daemon keeps serving.
        """
        mount = mountTmpfs(self, "4m")
        image = mount / "image"
        image.write_bytes(pattern(MiB, b"ro"))
        run("mount", "-o", "remount,ro", str(mount))
        ticket = self.addTicket(self.daemon, image, MiB)
        readOnly = self.addTicket(self.daemon, image, MiB, ops=["read"])

        def scenario() -> None:
            with connect(self.daemon.addresses) as conn:
                r = conn.request("PUT", f"/images/{ticket}", body=b"x" * 4096)
                self.assertEqual(r.status, 500)
                self.assertEqual(r.text, INTERNAL_ERROR + "\n")
            with connect(self.daemon.addresses) as conn:
                r = conn.request("GET", f"/images/{readOnly}")
                self.assertEqual(r.body, pattern(MiB, b"ro"))
            self.assertStillServing()

        await deferToThread(scenario)
        self.flushLoggedErrors(OSError)

    async def test_ioError(self) -> None:
        """
        EIO from a device (a dm-error target) on GET and PUT is a 500 saying
        "Input/output error", and the daemon keeps serving.
        """
        if not os.path.exists("/dev/mapper/control") or not shutil.which("dmsetup"):
            raise SkipTest("device-mapper is not available here: no dm-error device for EIO")
        name = f"imageio-eio-{os.getpid()}"
        sectors = 2048
        run("dmsetup", "create", name, "--table", f"0 {sectors} error")
        self.addCleanup(subprocess.run, ["dmsetup", "remove", name], capture_output=True)
        ticket = self.addTicket(self.daemon, f"/dev/mapper/{name}", sectors * 512)

        def scenario() -> None:
            with connect(self.daemon.addresses) as conn:
                r = conn.request("GET", f"/images/{ticket}", [("Range", "bytes=0-4095")])
                self.assertEqual(r.status, 500)
                self.assertIn("Input/output error", r.text)
            with connect(self.daemon.addresses) as conn:
                r = conn.request("PUT", f"/images/{ticket}", body=b"x" * 4096)
                self.assertEqual(r.status, 500)
                self.assertIn("Input/output error", r.text)
            self.assertStillServing()

        await deferToThread(scenario)
        self.flushLoggedErrors(OSError)

    async def test_nbdServerKilled(self) -> None:
        """
        With the NBD server killed in the middle of a PUT, the PUT and the
        next request get a 500 (the NBD failure is in the log) without hanging; once
        the server is back, resending the upload works.
        """
        qemuNBD = shutil.which("qemu-nbd")
        if qemuNBD is None:
            raise SkipTest("qemu-nbd is not installed")
        image = self.makeImage(self.daemon, 64 * MiB, name="nbd-image")
        sock = str(self.daemon.runDir / "nbd.sock")

        def serve() -> subprocess.Popen[bytes]:
            process = subprocess.Popen(
                [qemuNBD, "--socket", sock, "--format", "raw", "--shared", "8", "--persistent"]
                + ["--cache", "none", str(image)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )

            def stop() -> None:
                if process.poll() is None:
                    process.kill()
                    process.wait()

            self.addCleanup(stop)
            if not waitFor(lambda: os.path.exists(sock), 10):
                raise SkipTest("qemu-nbd did not start")
            return process

        data = pattern(32 * MiB, b"nbd")

        def scenario() -> None:
            server = serve()
            ticket = f"nbd-{os.getpid()}"
            body = ticketBody(ticket, f"nbd:unix:{sock}", 64 * MiB)
            self.assertEqual(control(self.daemon.addresses, "PUT", "/tickets/x", body).status, 200)
            with connect(self.daemon.addresses) as conn:
                conn.send(
                    rawRequest("PUT", f"/images/{ticket}", [("Content-Length", str(len(data)))])
                )
                conn.send(data[: 12 * MiB])
                self.assertTrue(waitFor(lambda: ticketInfo(self.daemon, ticket)["active"], 5))
                server.kill()
                server.wait()
                os.unlink(sock)
                started = time.monotonic()
                try:
                    conn.send(data[12 * MiB :])
                except OSError:
                    pass
                r = conn.response(timeout=10)
                self.assertEqual(r.status, 500)
                self.assertEqual(r.text, INTERNAL_ERROR + "\n")
                self.assertLess(time.monotonic() - started, 5)
            with connect(self.daemon.addresses) as conn:
                r = conn.request("GET", f"/images/{ticket}", [("Range", "bytes=0-9")])
                self.assertEqual(r.status, 500)
                self.assertEqual(r.text, INTERNAL_ERROR + "\n")
            serve()
            with connect(self.daemon.addresses) as conn:
                self.assertEqual(conn.request("PUT", f"/images/{ticket}", body=data).status, 200)
                r = conn.request(
                    "GET", f"/images/{ticket}", [("Range", f"bytes=0-{len(data) - 1}")]
                )
                self.assertEqual(r.body, data)
            self.assertStillServing()

        await deferToThread(scenario)
        self.flushLoggedErrors(ConnectionError, OSError)


class SignalTests(DaemonTestCase):
    """
    Checklist H.39: a twistd daemon stopped by SIGTERM or killed mid-transfer.
    """

    def start(self, runDir: Path | None = None) -> SubprocessDaemon:
        daemon = SubprocessDaemon.start(
            {"daemon": {"inactivity_timeout": 30, "request_timeout": 30}}, runDir=runDir
        )
        self.addCleanup(daemon.stop)
        return daemon

    async def test_sigtermDuringTransfers(self) -> None:
        """
        On SIGTERM during an upload and a download, twistd stops within
        10 seconds, cuts both transfers (no success), removes the control
        socket, prints no traceback, and exits with a clean status.
        """
        daemon = self.start()
        image = daemon.runDir / "image"
        with open(image, "wb") as f:
            f.truncate(4 * GiB)
        control(daemon.addresses, "PUT", "/tickets/t", ticketBody("t", f"file://{image}", 4 * GiB))

        def scenario() -> None:
            upload = connect(daemon.addresses, "remote")
            upload.send(rawRequest("PUT", "/images/t", [("Content-Length", str(GiB))]))
            upload.send(b"u" * 16 * MiB)
            download = connect(daemon.addresses)
            download.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            download.send(rawRequest("GET", "/images/t"))
            download.response(head=True)
            self.assertTrue(waitFor(lambda: ticketInfo(daemon, "t")["active"], 5))
            started = time.monotonic()
            daemon.signal(signal.SIGTERM)
            status = daemon.wait(10)
            self.assertLess(time.monotonic() - started, 10)
            # twistd re-raises the signal that stopped it; systemd counts
            # both as a clean stop.
            self.assertIn(status, (0, -signal.SIGTERM))
            for conn in (upload, download):
                with conn:
                    try:
                        r: Response | None = conn.response(timeout=2)
                    except Exception:
                        r = None
                    self.assertTrue(r is None or r.status != 200)
            self.assertFalse(os.path.exists(daemon.addresses.control))
            output = daemon.output()
            self.assertNotIn("Traceback", output)
            self.assertIn("Stopping: canceling transfers", output)

        await deferToThread(scenario)

    async def test_sigkillThenRestart(self) -> None:
        """
        After SIGKILL mid-transfer, a restarted daemon replaces the stale
        sockets, knows no ticket (403), and the transfer can be redone.
        """
        runDir = shortTempDir()
        self.addCleanup(shutil.rmtree, runDir, True)
        daemon = self.start(runDir)
        image = runDir / "image"
        data = pattern(8 * MiB, b"kill")
        image.write_bytes(b"\0" * len(data))
        body = ticketBody("t", f"file://{image}", len(data))

        def scenario() -> None:
            control(daemon.addresses, "PUT", "/tickets/t", body)
            conn = connect(daemon.addresses)
            conn.send(rawRequest("PUT", "/images/t", [("Content-Length", str(len(data)))]))
            conn.send(data[: 4 * MiB])
            daemon.signal(signal.SIGKILL)
            self.assertEqual(daemon.wait(10), -signal.SIGKILL)
            self.assertTrue(conn.waitClosed(5))
            conn.close()
            self.assertTrue(os.path.exists(daemon.addresses.control))
            again = SubprocessDaemon.start({"daemon": {"inactivity_timeout": 30}}, runDir=runDir)
            try:
                with connect(again.addresses) as c:
                    r = c.request("PUT", "/images/t", [("Content-Length", str(len(data)))])
                    self.assertEqual(r.status, 403)
                    self.assertIn("No such ticket", r.text)
                self.assertEqual(control(again.addresses, "PUT", "/tickets/t", body).status, 200)
                with connect(again.addresses) as c:
                    self.assertEqual(c.request("PUT", "/images/t", body=data).status, 200)
                self.assertEqual(image.read_bytes(), data)
            finally:
                again.stop()

        await deferToThread(scenario)
