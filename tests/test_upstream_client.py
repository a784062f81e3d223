"""
Conformance: upstream ovirt-imageio's own Python client against our daemon.

The client (C{ovirt_imageio.client}, a test dependency) connects over
HTTPS, reads OPTIONS, switches to the advertised local UNIX socket because
it runs on the same host, and then uses extents, ranged GETs, PUTs with
C{flush=n}, PATCH zero and flush, exactly as it does against upstream.
The blocking client runs in a thread; the daemon runs on the test reactor.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from imageio import _pki
from imageio import config as _config
from imageio.tap import ImageioService
from tests._daemon import writeFragmentedImage, writeSparseImage

try:
    from ovirt_imageio import client as upstream
except ImportError:  # pragma: no cover - the test extra installs it
    upstream = None

reactor: Any = _reactor
MiB = 1024**2


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


class UpstreamClientTests(TestCase):
    timeout = 120

    def setUp(self) -> Deferred[None] | None:
        if upstream is None:
            raise SkipTest("ovirt-imageio (upstream client) is not installed")
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.pki = _pki.makeTestPKI(str(self.dir / "pki"))
        conf = self.dir / "conf.d"
        conf.mkdir()
        # UNIX socket paths must fit in 108 bytes; trial's temp paths do not.
        sockets = Path(tempfile.mkdtemp(prefix="iio-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, sockets, True)
        (conf / "10.conf").write_text(
            f"[tls]\nkey_file = {self.pki.keyFile}\ncert_file = {self.pki.certFile}\n"
            f"ca_file = {self.pki.caFile}\n"
            "[remote]\nhost = 127.0.0.1\nport = 0\n"
            f"[local]\nsocket = {sockets}/local.sock\n"
            f"[control]\nsocket = {sockets}/control.sock\n"
        )
        self.service = ImageioService(
            _config.loadDir(self.dir, warn=False), reactor, self.dir / "state"
        )
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.port = self.service.ports["remote"].getHost().port
        return None

    def addTicket(self, path: Path, size: int, ops: list[str], sparse: bool = False) -> str:
        uuid = f"t-{len(self.service.registry)}"
        self.service.registry.add(
            {
                "uuid": uuid,
                "size": size,
                "url": f"file://{path}",
                "timeout": 300,
                "ops": ops,
                "sparse": sparse,
            }
        )
        return f"https://localhost:{self.port}/images/{uuid}"

    @inlineCallbacks
    def test_imageioClientReadWriteZeroFlush(self) -> Any:
        """
        ImageioClient reads, writes at unaligned offsets, zeroes and flushes,
        and the file has exactly the expected bytes.
        """
        image = self.dir / "disk.raw"
        size = 8 * MiB
        with open(image, "wb") as f:
            f.truncate(size)
        url = self.addTicket(image, size, ["read", "write"])
        pattern = os.urandom(3 * MiB + 17)
        result = yield deferToThread(readWriteZeroFlush, url, self.pki.caFile, pattern)
        checkReadWriteZeroFlush(self, result, pattern, image, size)

    @inlineCallbacks
    def test_fragmentedExtents(self) -> Any:
        """
        The extents of a very fragmented image, longer than one answer is
        sent whole (so streamed in slices), reach ImageioClient complete:
        its size and every extent are right.
        """
        image = self.dir / "fragmented.raw"
        runs = 20_000
        imageSize = writeFragmentedImage(image, runs)
        url = self.addTicket(image, imageSize, ["read"])

        def extents() -> tuple[int, list[Any]]:
            with upstream.ImageioClient(url, cafile=self.pki.caFile) as c:
                return c.size(), list(c.extents())

        size, got = yield deferToThread(extents)
        self.assertEqual(size, imageSize)
        self.assertEqual(len(got), 2 * runs)
        self.assertEqual(
            [(e.start, e.length, e.zero) for e in got[:2]], [(0, 4096, False), (4096, 4096, True)]
        )
        self.assertEqual(sum(e.length for e in got), size)

    @inlineCallbacks
    def test_uploadAndDownload(self) -> Any:
        """
        client.upload and client.download (qemu-nbd on the client side)
        move a sparse raw image byte-exact in both directions, keeping holes.
        """
        if not (shutil.which("qemu-img") and shutil.which("qemu-nbd")):
            raise SkipTest("qemu-img and qemu-nbd are needed (Debian: qemu-utils)")
        size = 16 * MiB
        source = self.dir / "source.raw"
        writeSparseImage(source, size)
        target = self.dir / "target.raw"
        with open(target, "wb") as f:
            f.truncate(size)
        # A sparse ticket punches holes where the source has none.
        upURL = self.addTicket(target, size, ["write"], sparse=True)
        yield deferToThread(upstream.upload, str(source), upURL, self.pki.caFile)
        self.assertEqual(sha256(target), sha256(source))

        downloaded = self.dir / "downloaded.raw"
        downURL = self.addTicket(target, size, ["read"])
        yield deferToThread(
            upstream.download, upURL.replace(upURL, downURL), str(downloaded), self.pki.caFile,
            fmt="raw",
        )  # fmt: skip
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), str(downloaded)],
            capture_output=True,
            text=True,
        )
        self.assertEqual(compare.returncode, 0, compare.stdout + compare.stderr)
        info = self.service.registry.get(downURL.rsplit("/", 1)[1]).info(0)
        # Holes were kept, and the download skipped them: transferred counts
        # the data only.
        self.assertLess(info["transferred"], size)
        self.assertGreaterEqual(info["transferred"], 3 * MiB)


def readWriteZeroFlush(url: str, caFile: str, pattern: bytes) -> tuple[int, bytes, int, int, int]:
    """
    With upstream's C{ImageioClient} (blocking: call in a thread), write
    C{pattern} at an unaligned offset, zero 4 KiB inside it, flush and read
    it back.

    @return: The image size, the bytes read back, the bytes the extents
        cover, and the advertised C{max_readers} and C{max_writers}.
    """
    with upstream.ImageioClient(url, cafile=caFile) as c:
        c.write(4097, pattern)
        c.zero(4097 + 100, 4096)
        c.flush()
        buf = bytearray(len(pattern))
        c.read(4097, buf)
        covered = sum(e.length for e in c.extents())
        return c.size(), bytes(buf), covered, c.max_readers, c.max_writers


def checkReadWriteZeroFlush(
    test: TestCase,
    result: tuple[int, bytes, int, int, int],
    pattern: bytes,
    path: Path,
    size: int,
) -> None:
    """
    Assert what L{readWriteZeroFlush} should have seen and left in C{path}.
    """
    imageSize, data, covered, readers, writers = result
    expected = bytearray(pattern)
    expected[100 : 100 + 4096] = bytes(4096)
    test.assertEqual(imageSize, size)
    test.assertEqual(data, bytes(expected))
    test.assertEqual(covered, size)
    test.assertEqual((readers, writers), (8, 1))
    with open(path, "rb") as f:
        f.seek(4097)
        test.assertEqual(f.read(len(expected)), bytes(expected))
