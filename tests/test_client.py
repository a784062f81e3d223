# -*- test-case-name: tests.test_client -*-
"""
Tests for L{imageio.client}: the Deferred API against a real daemon on
loopback (TLS, the local UNIX socket), real files, C{qemu-img} and
C{qemu-nbd}; client and daemon share trial's reactor.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from imageio._diskio import DiskIO, DiskIOPool
from imageio.client import Client, ClientError, RemoteError, _local
from tests._daemon import DaemonTestCase, InProcessDaemon, acceptingUNIX, writeSparseImage

MiB = 1024**2

#: Image size: a few buffers of 1 MiB with data, holes and an unaligned tail.
SIZE = 16 * MiB

QEMU = shutil.which("qemu-img") is not None and shutil.which("qemu-nbd") is not None


def requireQemu() -> None:
    if not QEMU:
        raise SkipTest("qemu-img and qemu-nbd are needed (qemu-utils)")


def compare(a: Path | str, b: Path | str) -> None:
    """
    Fail unless C{qemu-img compare} finds the guest data equal.
    """
    done = subprocess.run(
        ["qemu-img", "compare", str(a), str(b)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"qemu-img compare: {done.stdout} {done.stderr}")


def allocated(path: Path | str) -> int:
    """
    @return: Bytes allocated to C{path} on its file system.
    """
    return os.stat(path).st_blocks * 512


def convert(source: Path, target: Path, fmt: str) -> None:
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", fmt, str(source), str(target)], check=True
    )


class ClientTestCase(DaemonTestCase):
    """
    A daemon and a client (with its own disk-io pool) on trial's reactor.
    """

    timeout = 60

    @inlineCallbacks
    def startQemuNBD(self, args: list[str], sock: Path) -> Any:
        """
        Start C{qemu-nbd ARGS}, stopped at cleanup, and wait until it
        accepts connections on C{sock} (its socket file exists before it
        listens).
        """
        server = subprocess.Popen(["qemu-nbd", *args])
        self.addCleanup(server.wait)
        self.addCleanup(server.terminate)
        for _ in range(500):
            if acceptingUNIX(str(sock)):
                return
            yield deferLater(reactor, 0.01, lambda: None)
        self.fail(f"qemu-nbd did not listen on {sock}")

    def setUp(self) -> None:
        self.daemon: InProcessDaemon = self.startDaemon()
        self.pool = DiskIOPool(reactor, 4, name="client-io")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()
        self.progress: list[int] = []

    def client(self, **kwargs: Any) -> Client:
        options: dict[str, Any] = {
            "cafile": self.daemon.addresses.caFile,
            "bufferSize": MiB,
            "workers": 4,
        }
        options.update(kwargs)
        return Client(reactor=reactor, diskio=DiskIO(self.pool), **options)

    def url(self, ticketID: str) -> str:
        host, port = self.daemon.addresses.remote
        return f"https://{host}:{port}/images/{ticketID}"

    def source(self, name: str = "source.raw", size: int = SIZE) -> Path:
        path = self.dir / name
        writeSparseImage(path, size, dataAt=(0, 3 * MiB + 512, 9 * MiB, size - MiB))
        return path

    def target(self, size: int = SIZE, **extra: Any) -> tuple[Path, str]:
        path = self.makeImage(self.daemon, size)
        ticketID = self.addTicket(self.daemon, path, size, sparse=True, **extra)
        return path, self.url(ticketID)


class UploadTests(ClientTestCase):
    """
    Uploads of raw and qcow2 images.
    """

    @inlineCallbacks
    def test_raw(self) -> Any:
        """
        A raw upload writes the guest data and keeps the holes: only the
        data extents use space on the target.
        """
        source = self.source()
        target, url = self.target()
        client = self.client()
        stats = yield client.upload(str(source), url)
        compare(source, target)
        # 4 MiB of data, rounded to file system blocks.
        self.assertApproximates(stats.copied, 4 * MiB, 8192)
        self.assertLessEqual(allocated(target), 5 * MiB)
        # Requests are bounded by the buffer: 1 MiB pieces.
        self.assertGreaterEqual(stats.requests, 4)

    @inlineCallbacks
    def test_qcow2(self) -> Any:
        """
        A qcow2 source is detected and its guest data uploaded through a
        private qemu-nbd.
        """
        requireQemu()
        raw = self.source()
        qcow2 = self.dir / "source.qcow2"
        convert(raw, qcow2, "qcow2")
        target, url = self.target()
        stats = yield self.client().upload(str(qcow2), url)
        compare(raw, target)
        # 4 MiB of data, rounded to qcow2 clusters.
        self.assertApproximates(stats.copied, 4 * MiB, 128 * 1024)

    @inlineCallbacks
    def test_progress(self) -> Any:
        """
        Progress gets the size, then updates adding up to it.
        """

        class Recorder:
            size: int | None = None
            total = 0

            def update(self, n: int) -> None:
                self.total += n

        recorder = Recorder()
        source = self.source()
        _, url = self.target()
        yield self.client(progress=recorder).upload(str(source), url)
        self.assertEqual((recorder.size, recorder.total), (SIZE, SIZE))

    @inlineCallbacks
    def test_overUnixSocket(self) -> Any:
        """
        On the server's host the client switches to the advertised UNIX
        socket, where it gets the same results.
        """
        source = self.source()
        target, url = self.target()
        info = yield self.client().info(url)
        self.assertEqual(info["transport"], "unix")
        yield self.client().upload(str(source), url)
        compare(source, target)

    @inlineCallbacks
    def test_resume(self) -> Any:
        """
        An upload stopped midway is resumed with only the ranges the server
        does not list as written.
        """
        source = self.dir / "source.raw"
        with open(source, "wb") as f:
            f.write(os.urandom(SIZE))
        target, url = self.target()
        client = self.client(workers=1)
        stopped: Deferred[Any] = Deferred()

        class Stop:
            size: int | None = None
            total = 0

            def update(self, n: int) -> None:
                self.total += n
                if self.total >= 5 * MiB and not stopped.called:
                    stopped.callback(None)

        client.progress = Stop()
        d = client.upload(str(source), url)
        yield stopped
        d.cancel()
        yield self.assertFailure(d, CancelledError)
        resumed = self.client(workers=2)
        stats = yield resumed.upload(str(source), url, resume=True)
        compare(source, target)
        self.assertLess(stats.copied, SIZE - 4 * MiB)
        self.assertGreater(stats.copied, 0)

    @inlineCallbacks
    def test_oddSizeBothWays(self) -> Any:
        """
        An image whose size is not a multiple of the block size goes up and
        comes back intact.
        """
        size = 5 * MiB + 1234
        source = self.dir / "odd.raw"
        data = os.urandom(size)
        source.write_bytes(data)
        target, url = self.target(size=size)
        yield self.client(bufferSize=256 * 1024).upload(str(source), url)
        self.assertEqual(target.read_bytes(), data)
        downloaded = self.dir / "odd-down.raw"
        yield self.client(bufferSize=256 * 1024).download(url, str(downloaded), fmt="raw")
        self.assertEqual(downloaded.read_bytes(), data)

    @inlineCallbacks
    def test_readOnlyTicket(self) -> Any:
        """
        Uploading with a read-only ticket fails with the server's refusal.
        """
        source = self.source()
        path = self.makeImage(self.daemon, SIZE)
        ticketID = self.addTicket(self.daemon, path, SIZE, ops=("read",))
        e = yield self.assertFailure(
            self.client().upload(str(source), self.url(ticketID)), Exception
        )
        self.assertIn("403", str(e))

    @inlineCallbacks
    def test_connectionsWithinMaxWriters(self) -> Any:
        """
        The client opens C{workers} connections when the server allows as
        many writers (an NBD image), one for a file (one writer).
        """
        requireQemu()
        source = self.source()
        image = self.makeImage(self.daemon, SIZE)
        sock = self.daemon.runDir / "target.sock"
        yield self.startQemuNBD(["-t", "-f", "raw", "-e", "16", "-k", str(sock), str(image)], sock)
        ticketID = self.addTicket(self.daemon, f"nbd:unix:{sock}", SIZE)
        stats = yield self.client(workers=3).upload(str(source), self.url(ticketID))
        self.assertEqual(stats.workers, 3)
        compare(source, image)
        _, url = self.target()
        stats = yield self.client(workers=3).upload(str(source), url)
        self.assertEqual(stats.workers, 1)

    @inlineCallbacks
    def test_sourceLargerThanTarget(self) -> Any:
        """
        A source larger than the target image is refused before any byte is
        sent.
        """
        source = self.source()
        _, url = self.target(size=SIZE - MiB)
        e = yield self.assertFailure(self.client().upload(str(source), url), ClientError)
        self.assertIn("is larger", str(e))

    @inlineCallbacks
    def test_unknownTicket(self) -> Any:
        """
        An unknown ticket fails with the server's 403 and its text.
        """
        source = self.source()
        e = yield self.assertFailure(
            self.client().upload(str(source), self.url("no-such-ticket")), RemoteError
        )
        self.assertIn("server answered 403", str(e))
        self.assertIn("/images/no-such-...", str(e))

    @inlineCallbacks
    def test_untrusted(self) -> Any:
        """
        Without the CA the server's certificate does not verify (system
        trust store); C{secure=False} skips the check.
        """
        source = self.source()
        target, url = self.target()
        e = yield self.assertFailure(
            self.client(cafile=None, useUnix=False).upload(str(source), url), RemoteError
        )
        self.assertIn("certificate", str(e))
        yield self.client(cafile=None, secure=False, useUnix=False).upload(str(source), url)
        compare(source, target)

    @inlineCallbacks
    def test_refused(self) -> Any:
        """
        A server that is not there fails with the network error.
        """
        source = self.source()
        e = yield self.assertFailure(
            self.client().upload(str(source), "https://127.0.0.1:1/images/x"), RemoteError
        )
        self.assertIn("Cannot reach https://127.0.0.1:1/images/x", str(e))

    @inlineCallbacks
    def test_missingFile(self) -> Any:
        """
        A missing source file is named in the error.
        """
        _, url = self.target()
        e = yield self.assertFailure(self.client().upload(str(self.dir / "nope"), url), Exception)
        self.assertIn("nope", str(e))


class DownloadTests(ClientTestCase):
    """
    Downloads to raw and qcow2 images.
    """

    def served(self) -> tuple[Path, str]:
        source = self.source()
        ticketID = self.addTicket(self.daemon, source, SIZE, ops=("read",))
        return source, self.url(ticketID)

    @inlineCallbacks
    def test_raw(self) -> Any:
        """
        A raw download writes a sparse file: holes are never written.
        """
        source, url = self.served()
        target = self.dir / "down.raw"
        stats = yield self.client().download(url, str(target), fmt="raw")
        compare(source, target)
        self.assertEqual(os.path.getsize(target), SIZE)
        self.assertEqual(stats.zeroed, 0)
        self.assertLessEqual(allocated(target), 5 * MiB)

    @inlineCallbacks
    def test_qcow2(self) -> Any:
        """
        A qcow2 download creates a qcow2 image through a private qemu-nbd.
        """
        requireQemu()
        source, url = self.served()
        target = self.dir / "down.qcow2"
        yield self.client().download(url, str(target), fmt="qcow2")
        compare(source, target)
        with open(target, "rb") as f:
            self.assertEqual(f.read(4), b"QFI\xfb")

    @inlineCallbacks
    def test_resume(self) -> Any:
        """
        A partial raw download is continued: only the missing data is
        fetched.
        """
        source, url = self.served()
        target = self.dir / "down.raw"
        # As if the first 1 MiB and the last data extent were downloaded.
        with open(source, "rb") as src, open(target, "wb") as dst:
            dst.truncate(SIZE)
            dst.write(src.read(MiB))
            src.seek(SIZE - MiB)
            dst.seek(SIZE - MiB)
            dst.write(src.read(MiB))
        stats = yield self.client().download(url, str(target), fmt="raw", resume=True)
        compare(source, target)
        self.assertApproximates(stats.copied, 2 * MiB, 8192)

    @inlineCallbacks
    def test_incrementalNeedsQcow2(self) -> Any:
        """
        An incremental download to raw is refused.
        """
        _, url = self.served()
        e = yield self.assertFailure(
            self.client().download(url, str(self.dir / "x"), fmt="raw", incremental=True),
            ClientError,
        )
        self.assertIn("qcow2", str(e))

    @inlineCallbacks
    def test_incrementalWithoutDirty(self) -> Any:
        """
        An incremental download of a ticket without dirty extents says so.
        """
        requireQemu()
        _, url = self.served()
        e = yield self.assertFailure(
            self.client().download(url, str(self.dir / "x"), incremental=True),
            ClientError,
        )
        self.assertIn("dirty extents", str(e))


class ChecksumInfoTests(ClientTestCase):
    """
    Checksums and image information.
    """

    @inlineCallbacks
    def test_checksumMatchesServer(self) -> Any:
        """
        A local file's checksum (raw or qcow2) equals the server's for the
        same guest data.
        """
        source = self.source()
        ticketID = self.addTicket(self.daemon, source, SIZE, ops=("read",))
        client = self.client()
        remote = yield client.checksum(self.url(ticketID))
        local = yield client.checksum(str(source))
        self.assertEqual(local, remote)
        self.assertEqual(set(local), {"algorithm", "block_size", "checksum"})
        if QEMU:
            qcow2 = self.dir / "source.qcow2"
            convert(source, qcow2, "qcow2")
            fromQcow2 = yield client.checksum(str(qcow2))
            self.assertEqual(fromQcow2, remote)

    @inlineCallbacks
    def test_infoFile(self) -> Any:
        """
        Info of a file gives its format and virtual size.
        """
        source = self.source()
        info = yield self.client().info(str(source))
        self.assertEqual((info["format"], info["virtual-size"]), ("raw", SIZE))

    @inlineCallbacks
    def test_infoURL(self) -> Any:
        """
        Info of a URL gives size, features, readers and writers and the
        allocated bytes.
        """
        source = self.source()
        ticketID = self.addTicket(self.daemon, source, SIZE)
        info = yield self.client(useUnix=False).info(self.url(ticketID))
        self.assertEqual(info["size"], SIZE)
        self.assertApproximates(info["allocated"], 4 * MiB, 8192)
        self.assertEqual(info["transport"], "tcp")
        self.assertIn("zero", info["features"])
        self.assertGreaterEqual(info["max_readers"], 1)


class _OldServer(Resource):
    """
    A minimal images server in memory, with a chosen feature list (C{None}:
    OPTIONS answers 405, as daemons before 1.3): no C{/written}, and no
    C{/extents} or C{PATCH} unless listed.
    """

    isLeaf = True

    def __init__(self, size: int, features: list[str] | None) -> None:
        super().__init__()
        self.image = bytearray(size)
        self.features = features
        self.requests: list[str] = []

    def render(self, request: Any) -> bytes:
        method = request.method.decode()
        path = request.path.decode()
        self.requests.append(f"{method} {path}")
        features = self.features or []
        if method == "OPTIONS":
            if self.features is None:
                request.setResponseCode(405)
                return b""
            return json.dumps({"features": features}).encode()
        if path.endswith("/extents"):
            if "extents" not in features:
                request.setResponseCode(404)
                return b"no extents"
            return json.dumps([{"start": 0, "length": len(self.image), "zero": False}]).encode()
        if path.endswith("/written"):
            request.setResponseCode(404)
            return b"Not found"
        if method == "GET":
            header = request.getHeader("range")
            if header is None:
                return bytes(self.image)
            first, last = (int(x) for x in header.split("=")[1].split("-"))
            request.setResponseCode(206)
            request.setHeader("content-range", f"bytes {first}-{last}/{len(self.image)}")
            return bytes(self.image[first : last + 1])
        if method == "PUT":
            body = request.content.read()
            header = request.getHeader("content-range")
            start = int(header.split()[1].split("-")[0]) if header else 0
            self.image[start : start + len(body)] = body
            return b""
        if method == "PATCH" and "zero" in features:
            msg = json.loads(request.content.read())
            if msg["op"] == "zero":
                self.image[msg["offset"] : msg["offset"] + msg["size"]] = bytes(msg["size"])
            return b""
        request.setResponseCode(405)
        return b""


class FallbackTests(ClientTestCase):
    """
    Servers without C{zero}, C{extents}, C{flush} or C{/written}.
    """

    def serve(self, size: int, features: list[str] | None) -> tuple[_OldServer, str]:
        server = _OldServer(size, features)
        port = reactor.listenTCP(0, Site(server), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return server, f"http://127.0.0.1:{port.getHost().port}/images/old"

    @inlineCallbacks
    def test_uploadWithoutFeatures(self) -> Any:
        """
        Without C{zero} zero extents are written as zeroes; without
        C{/written} a resumed upload warns and sends everything.
        """
        source = self.source()
        server, url = self.serve(SIZE, [])
        # The image is not empty: zero extents must really be zeroed.
        server.image[:] = b"\xff" * SIZE
        warnings: list[str] = []
        yield self.client(warn=warnings.append).upload(str(source), url, resume=True)
        self.assertEqual(bytes(server.image), source.read_bytes())
        self.assertNotIn("PATCH /images/old", server.requests)
        self.assertEqual(len(warnings), 1)
        self.assertIn("uploading everything", warnings[0])

    @inlineCallbacks
    def test_uploadOptions405(self) -> Any:
        """
        A server answering OPTIONS with 405 (before 1.3) gets PUTs only.
        """
        source = self.source()
        server, url = self.serve(SIZE, None)
        yield self.client().upload(str(source), url)
        self.assertEqual(bytes(server.image), source.read_bytes())
        self.assertEqual({r.split()[0] for r in server.requests}, {"OPTIONS", "GET", "PUT"})

    @inlineCallbacks
    def test_downloadWithoutExtents(self) -> Any:
        """
        Without C{extents} the size comes from a GET and the whole image
        is downloaded as data; its zeroes are still left as holes.
        """
        data = os.urandom(2 * MiB) + bytes(SIZE - 2 * MiB)
        server, url = self.serve(SIZE, ["zero", "flush"])
        server.image[:] = data
        target = self.dir / "down.raw"
        stats = yield self.client().download(url, str(target), fmt="raw")
        self.assertEqual(target.read_bytes(), data)
        self.assertEqual(stats.copied, SIZE)
        self.assertLessEqual(allocated(target), 3 * MiB)


class IncrementalTests(ClientTestCase):
    """
    Incremental downloads from a ticket with dirty extents (an NBD export
    with a dirty bitmap).
    """

    @inlineCallbacks
    def test_onlyDirty(self) -> Any:
        """
        Only the ranges written since the bitmap was added are downloaded;
        the rest stays unallocated in the new qcow2 image.
        """
        requireQemu()
        if shutil.which("qemu-io") is None:
            raise SkipTest("qemu-io is needed")
        image = self.dir / "disk.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
        io = ["qemu-io", "-f", "qcow2", "-c"]
        subprocess.run([*io, "write -P 0x43 0 64k", str(image)], check=True, capture_output=True)
        subprocess.run(["qemu-img", "bitmap", "--add", str(image), "b1"], check=True)
        subprocess.run([*io, "write -P 0x44 1M 64k", str(image)], check=True, capture_output=True)
        sock = self.daemon.runDir / "nbd.sock"
        yield self.startQemuNBD(
            ["-t", "-r", "-f", "qcow2", "-B", "b1", "-e", "8", "-k", str(sock), str(image)],
            sock,
        )
        ticketID = self.addTicket(
            self.daemon, f"nbd:unix:{sock}", 4 * MiB, ops=("read",), dirty=True
        )
        target = self.dir / "backup.qcow2"
        stats = yield self.client().download(self.url(ticketID), str(target), incremental=True)
        self.assertEqual(stats.copied, 64 * 1024)
        raw = self.dir / "backup.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(target), str(raw)], check=True
        )
        data = raw.read_bytes()
        self.assertEqual(data[: 64 * 1024], bytes(64 * 1024))
        self.assertEqual(data[MiB : MiB + 64 * 1024], b"\x44" * 64 * 1024)


class ProxyTests(ClientTestCase):
    """
    Through our daemon in proxy mode (a ticket whose URL is another
    daemon's image).
    """

    @inlineCallbacks
    def test_bothWaysThroughProxy(self) -> Any:
        """
        An upload and a download through a proxying daemon reach the image
        behind it.
        """
        host = self.daemon
        proxy = self.startDaemon(backend_http={"ca_file": host.addresses.caFile})
        source = self.source()
        image = self.makeImage(host, SIZE)
        hostTicket = self.addTicket(host, image, SIZE, sparse=True)
        hostURL = self.url(hostTicket)
        proxyTicket = self.addTicket(proxy, hostURL, SIZE)
        phost, pport = proxy.addresses.remote
        url = f"https://{phost}:{pport}/images/{proxyTicket}"
        client = self.client(cafile=proxy.addresses.caFile)
        yield client.upload(str(source), url)
        compare(source, image)
        downloaded = self.dir / "down.raw"
        yield client.download(url, str(downloaded), fmt="raw")
        compare(source, downloaded)


class QemuNBDListeningTests(SynchronousTestCase):
    """
    L{_local.QemuNBD.listening}, which the client polls from the reactor's
    clock, each look on the pool.
    """

    def server(self, script: str) -> _local.QemuNBD:
        directory = self.mktemp()
        os.mkdir(directory)
        process = subprocess.Popen(["sh", "-c", script], stderr=subprocess.PIPE)
        self.addCleanup(process.wait)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        self.addCleanup(lambda: process.stderr and process.stderr.close())
        return _local.QemuNBD(process, directory)

    def test_notYet(self) -> None:
        """
        A server that runs but does not listen yet is not listening.
        """
        self.assertFalse(self.server("sleep 30").listening())

    def test_exited(self) -> None:
        """
        A server that exited is an error naming its last line on stderr.
        """
        server = self.server("echo first >&2; echo 'cannot open image' >&2; exit 3")
        server.process.wait()
        e = self.assertRaises(_local.LocalImageError, server.listening)
        self.assertEqual(str(e), "qemu-nbd failed: cannot open image")
