# -*- test-case-name: tests.test_integration_images -*-
"""
Integration tests of the images API: the service built as in production
(L{imageio.tap.ImageioService}) on a real reactor, with TLS, the local
UNIX socket, real files through the file backend and the real disk-io
pool, driven by C{curl} and Python's C{http.client}.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import ssl
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from imageio import config as _config

MiB = 1024**2

CURL = shutil.which("curl")

#: Image size: several 8 MiB buffers plus an unaligned tail.
SIZE = 17 * MiB + 1234


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost")
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.path)


class _ServiceTestCase(TestCase):
    """
    The service built as in production on the real reactor: the remote
    listener on an ephemeral port, the local and control UNIX sockets.

    @ivar config: Its configuration.
    @ivar service: The running service.
    @ivar port: The remote listener's port.
    """

    #: Whether the remote listener speaks TLS.
    tls = True
    #: The storage I/O engine of the daemon under test.
    ioEngine = "auto"
    #: Prefix of the temporary directory holding the UNIX sockets.
    socketPrefix = "imageio-it-"

    def setUp(self) -> None:
        from imageio import _pki
        from imageio.tap import ImageioService

        # UNIX socket paths must be short: keep them out of _trial_temp.
        self.sockets = tempfile.mkdtemp(prefix=self.socketPrefix)
        self.addCleanup(shutil.rmtree, self.sockets, True)
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.pki = _pki.makeTestPKI(str(self.dir / "pki"))
        config = _config.Config()
        config.daemon.systemd_enable = False
        config.daemon.io_engine = self.ioEngine
        config.remote.host = "127.0.0.1"
        config.remote.port = 0
        config.tls.enable = self.tls
        config.tls.cert_file = self.pki.certFile
        config.tls.key_file = self.pki.keyFile
        config.local.socket = os.path.join(self.sockets, "local.sock")
        config.control.socket = os.path.join(self.sockets, "control.sock")
        self.config = config
        self.service = ImageioService(config, reactor, self.dir / "state")
        self.service.startService()
        self.addCleanup(self._stop)
        address: Any = self.service.ports["remote"].getHost()
        self.port = address.port

    @inlineCallbacks
    def _stop(self) -> Any:
        yield self.service.stopService()
        # Let server-side connections see their clients' close.
        yield deferLater(reactor, 0.1, lambda: None)

    def addTicket(
        self, path: Path, ops: tuple[str, ...], uuid: str = "t1", size: int = SIZE
    ) -> None:
        self.service.registry.add(
            {
                "uuid": uuid,
                "size": size,
                "ops": list(ops),
                "timeout": 300,
                "url": path.as_uri(),
                "transfer_id": f"tr-{uuid}",
            }
        )


class ImagesIntegrationTests(_ServiceTestCase):
    """
    Transfers with real clients against the real service.
    """

    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.local = self.config.local.socket
        self.url = f"https://127.0.0.1:{self.port}/images/"
        self.source = self.dir / "source.raw"
        self.source.write_bytes(os.urandom(SIZE))
        with open(self.source, "rb") as f:
            # Cached pages would send every direct AIO read to the pool.
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def newImage(self, name: str = "target.raw", size: int = SIZE) -> Path:
        path = self.dir / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    @inlineCallbacks
    def curl(self, *args: str) -> Any:
        """
        Run curl, failing the test unless it exits 0.

        @return: Its standard output.
        """
        if CURL is None:
            raise SkipTest("curl is not installed")
        out, err, code = yield getProcessOutputAndValue(
            CURL, ["-sS", "--fail", "--max-time", "60", *args], env=dict(os.environ)
        )
        if code != 0:
            self.fail(f"curl {' '.join(args)} exited {code}: {err.decode(errors='replace')}")
        return out

    @inlineCallbacks
    def test_downloadHTTPS(self) -> Any:
        """
        C{curl --cacert} downloads the whole image over HTTPS.
        """
        self.addTicket(self.source, ("read",))
        out = self.dir / "out.raw"
        yield self.curl("--cacert", self.pki.caFile, "-o", str(out), self.url + "t1")
        self.assertEqual(out.read_bytes(), self.source.read_bytes())
        info = self.service.registry.get("t1").info(0)
        self.assertEqual((info["transferred"], info["active"]), (SIZE, False))
        aio = self.service.aio
        if self.ioEngine == "threads":
            self.assertEqual((aio.running, aio.completed), (False, 0))
        elif aio.running:
            # The reads went through AIO (or were refused with EAGAIN).
            self.assertGreater(aio.completed, 0)

    @inlineCallbacks
    def test_resumeDownload(self) -> Any:
        """
        C{curl -C -} resumes a partial download with a Range request.
        """
        self.addTicket(self.source, ("read",))
        out = self.dir / "out.raw"
        data = self.source.read_bytes()
        out.write_bytes(data[: 5 * MiB + 17])
        yield self.curl("--cacert", self.pki.caFile, "-C", "-", "-o", str(out), self.url + "t1")
        self.assertEqual(out.read_bytes(), data)

    @inlineCallbacks
    def test_uploadHTTPS(self) -> Any:
        """
        C{curl -T} uploads a file over HTTPS (with C{Expect: 100-continue}),
        and the image on disk equals it.
        """
        target = self.newImage()
        self.addTicket(target, ("write",))
        yield self.curl("--cacert", self.pki.caFile, "-T", str(self.source), self.url + "t1")
        self.assertEqual(target.read_bytes(), self.source.read_bytes())
        ticket = self.service.registry.get("t1")
        self.assertEqual(ticket.writtenRanges(), [(0, SIZE)])
        self.assertEqual(ticket.flushedRanges(), [(0, SIZE)])

    @inlineCallbacks
    def test_uploadForbidden(self) -> Any:
        """
        An upload with an unknown ticket gets 403 at once: curl sees the
        status, not a connection reset.
        """
        if CURL is None:
            raise SkipTest("curl is not installed")
        out, err, code = yield getProcessOutputAndValue(
            CURL,
            [
                "-sS",
                "--max-time",
                "30",
                "--cacert",
                self.pki.caFile,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-T",
                str(self.source),
                self.url + "nope",
            ],
            env=dict(os.environ),
        )
        self.assertEqual((out, code), (b"403", 0), err)

    @inlineCallbacks
    def test_unixSocket(self) -> Any:
        """
        Upload and download over the local UNIX socket with
        C{curl --unix-socket}.
        """
        target = self.newImage()
        self.addTicket(target, ("read", "write"))
        url = "http://localhost/images/t1"
        yield self.curl("--unix-socket", self.local, "-T", str(self.source), url)
        self.assertEqual(target.read_bytes(), self.source.read_bytes())
        out = self.dir / "out.raw"
        yield self.curl("--unix-socket", self.local, "-o", str(out), url)
        self.assertEqual(out.read_bytes(), self.source.read_bytes())
        options = yield self.curl("--unix-socket", self.local, "-X", "OPTIONS", url)
        body = json.loads(options)
        self.assertEqual(body["unix_socket"], self.local)
        self.assertEqual(body["max_writers"], 1)

    @inlineCallbacks
    def test_httpClientRanges(self) -> Any:
        """
        C{http.client} on one keep-alive TLS connection: PUT pieces with
        Content-Range at unaligned offsets, flush, then ranged GETs return the
        same bytes.
        """
        target = self.newImage()
        self.addTicket(target, ("read", "write"))
        data = self.source.read_bytes()
        context = ssl.create_default_context(cafile=self.pki.caFile)
        port = self.port

        def client() -> list[tuple[int, bytes]]:
            conn = http.client.HTTPSConnection("localhost", port, context=context)
            results = []
            try:
                pieces = [(0, 4097), (4097, 3 * MiB), (3 * MiB + 4097, SIZE - 3 * MiB - 4097)]
                for offset, length in pieces:
                    conn.request(
                        "PUT",
                        "/images/t1?flush=n",
                        body=data[offset : offset + length],
                        headers={"Content-Range": f"bytes {offset}-{offset + length - 1}/*"},
                    )
                    r = conn.getresponse()
                    results.append((r.status, r.read()))
                conn.request(
                    "PATCH",
                    "/images/t1",
                    body=b'{"op": "flush"}',
                    headers={"Content-Type": "application/json"},
                )
                r = conn.getresponse()
                results.append((r.status, r.read()))
                for first, last in ((0, 0), (511, 8 * MiB + 3), (SIZE - 10, SIZE - 1)):
                    conn.request("GET", "/images/t1", headers={"Range": f"bytes={first}-{last}"})
                    r = conn.getresponse()
                    results.append((r.status, r.read()))
            finally:
                conn.close()
            return results

        results = yield deferToThread(client)
        self.assertEqual([status for status, _ in results], [200] * 4 + [206] * 3)
        self.assertEqual([body for _, body in results[:4]], [b""] * 4)
        self.assertEqual(results[4][1], data[0:1])
        self.assertEqual(results[5][1], data[511 : 8 * MiB + 4])
        self.assertEqual(results[6][1], data[SIZE - 10 :])
        self.assertEqual(target.read_bytes(), data)

    @inlineCallbacks
    def test_smallReadsSameTurn(self) -> Any:
        """
        Small reads of an image on tmpfs complete inside C{io_submit}; the
        daemon answers them in the reactor turn that asked (the AIO
        engine's C{reapReady} after the poll's dispatch), not a poll later.
        """
        if self.ioEngine == "threads" or type(reactor) is not EPollReactor:
            raise SkipTest("Needs the AIO engine and the epoll reactor")
        if not os.access("/dev/shm", os.W_OK):
            raise SkipTest("No writable /dev/shm")
        aio = self.service.aio
        if not aio.running:
            raise SkipTest("No Linux AIO here")
        image = Path(tempfile.mkdtemp(dir="/dev/shm", prefix="imageio-it-")) / "image.raw"
        self.addCleanup(shutil.rmtree, image.parent, True)
        data = os.urandom(SIZE)
        image.write_bytes(data)
        self.addTicket(image, ("read",))
        local = self.local
        offsets = [i * 4096 for i in (0, 7, 300, SIZE // 4096 - 1)]

        def client() -> list[bytes]:
            conn = _UnixHTTPConnection(local)
            try:
                bodies = []
                for offset in offsets:
                    last = offset + 4095
                    conn.request("GET", "/images/t1", headers={"Range": f"bytes={offset}-{last}"})
                    r = conn.getresponse()
                    self.assertEqual(r.status, 206)
                    bodies.append(r.read())
                return bodies
            finally:
                conn.close()

        before = aio.reapedEarly
        bodies = yield deferToThread(client)
        self.assertEqual(bodies, [data[o : o + 4096] for o in offsets])
        # The first read waited for the file to open on the disk-io pool,
        # and completed a poll later; every other in its own turn.
        self.assertEqual(aio.reapedEarly - before, len(offsets) - 1)

    @inlineCallbacks
    def test_httpClientUnixSocket(self) -> Any:
        """
        C{http.client} over the UNIX socket: a ranged GET of the source.
        """
        self.addTicket(self.source, ("read",))
        data = self.source.read_bytes()
        path = self.local

        def client() -> tuple[int, str | None, bytes]:
            conn = _UnixHTTPConnection(path)
            try:
                conn.request("GET", "/images/t1", headers={"Range": "bytes=-100"})
                r = conn.getresponse()
                return r.status, r.getheader("content-range"), r.read()
            finally:
                conn.close()

        status, contentRange, body = yield deferToThread(client)
        self.assertEqual((status, body), (206, data[-100:]))
        self.assertEqual(contentRange, f"bytes {SIZE - 100}-{SIZE - 1}/{SIZE}")

    @inlineCallbacks
    def test_checksum(self) -> Any:
        """
        The checksum of a file with data and a hole, through the file
        backend, equals a direct blkhash computation.
        """
        from imageio._blkhash import Hasher

        image = self.newImage("sparse.raw", 9 * MiB + 100)
        with open(image, "r+b") as f:
            f.seek(MiB + 7)
            f.write(b"data" * 1000)
            f.seek(9 * MiB)
            f.write(b"t" * 100)
        self.addTicket(image, ("read",), size=9 * MiB + 100)
        out = yield self.curl(
            "--cacert", self.pki.caFile, self.url + "t1/checksum?block_size=1048576"
        )
        hasher = Hasher("blake2b", MiB)
        data = image.read_bytes()
        for i in range(0, len(data), MiB):
            hasher.update(data[i : i + MiB])
        self.assertEqual(json.loads(out)["checksum"], hasher.hexdigest())


def _halfClosedExchange(
    sock: socket.socket, raw: bytes, context: ssl.SSLContext | None = None
) -> bytes:
    """
    Send C{raw}, then shut down the sending side (TLS: C{close_notify},
    then TCP C{SHUT_WR}), and read until the server closes.

    @return: Everything the server sent (decrypted).
    """
    sock.settimeout(30)
    if context is None:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        return data
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")

    def pump() -> bool:
        if outgoing.pending:
            sock.sendall(outgoing.read())
        chunk = sock.recv(65536)
        if chunk:
            incoming.write(chunk)
        else:
            incoming.write_eof()
        return bool(chunk)

    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pump()
    tls.write(raw)
    try:
        tls.unwrap()
    except ssl.SSLWantReadError:
        pass
    sock.sendall(outgoing.read())
    sock.shutdown(socket.SHUT_WR)
    data = b""
    while True:
        try:
            data += tls.read(65536)
            continue
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            return data
        if not pump():
            try:
                data += tls.read(65536)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError, ssl.SSLWantReadError):
                pass
            return data


class HalfCloseTests(_ServiceTestCase):
    """
    A client that sends its request and then shuts down its sending side
    gets its answer, then the connection closes: on the remote listener
    (TLS and plain TCP), the local UNIX socket and the control socket.
    """

    timeout = 60
    socketPrefix = "imageio-hc-"

    def setUp(self) -> None:
        super().setUp()
        image = self.dir / "image.raw"
        image.write_bytes(b"0123456789" * 100)
        self.addTicket(image, ("read", "write"), size=1000)

    def exchange(self, family: int, address: Any, raw: bytes, tls: bool = False) -> Any:
        context = None
        if tls:
            context = ssl.create_default_context(cafile=self.pki.caFile)

        def run() -> bytes:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.connect(address)
                return _halfClosedExchange(sock, raw, context)

        return deferToThread(run)

    def remote(self, raw: bytes) -> Any:
        return self.exchange(socket.AF_INET, ("127.0.0.1", self.port), raw, tls=self.tls)

    @inlineCallbacks
    def test_remote(self) -> Any:
        """
        A GET (read on the disk-io pool) and a PUT with its whole body are
        answered before the server closes.
        """
        data = yield self.remote(b"GET /images/t1 HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n")
        self.assertTrue(data.startswith(b"HTTP/1.1 206 "), data)
        self.assertTrue(data.endswith(b"\r\n\r\n0123456789"), data)
        data = yield self.remote(
            b"PUT /images/t1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)

    @inlineCallbacks
    def test_remotePipelined(self) -> Any:
        """
        Pipelined requests sent before the half-close are all answered.
        """
        get = b"GET /images/t1 HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n"
        data = yield self.remote(get * 3)
        self.assertEqual(data.count(b"HTTP/1.1 206 "), 3, data)

    @inlineCallbacks
    def test_incompleteRequestClosed(self) -> Any:
        """
        A request cut short by the half-close gets no answer: the server
        closes.
        """
        data = yield self.remote(b"GET /images/t1 HTTP/1.1\r\nHost: x\r\n")
        self.assertEqual(data, b"")
        data = yield self.remote(
            b"PUT /images/t1 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc"
        )
        self.assertEqual(data, b"")

    @inlineCallbacks
    def test_unixSockets(self) -> Any:
        """
        The local images socket and the control socket answer too.
        """
        data = yield self.exchange(
            socket.AF_UNIX,
            self.config.local.socket,
            b"GET /images/t1 HTTP/1.1\r\nHost: x\r\nRange: bytes=0-9\r\n\r\n",
        )
        self.assertTrue(data.endswith(b"\r\n\r\n0123456789"), data)
        data = yield self.exchange(
            socket.AF_UNIX,
            self.config.control.socket,
            b"GET /tickets/t1 HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data)
        self.assertIn(b'"uuid": "t1"', data)


class HalfClosePlainTCPTests(HalfCloseTests):
    """
    The same on a remote listener without TLS.
    """

    tls = False


class ThreadsEngineImagesIntegrationTests(ImagesIntegrationTests):
    """
    The same transfers with C{[daemon] io_engine = threads}.
    """

    ioEngine = "threads"
