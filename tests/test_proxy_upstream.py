"""
Conformance: upstream ovirt-imageio's own client through both kinds of
proxy: a daemon in "proxy mode" (a ticket whose URL is another daemon's)
and the signed-ticket proxy with a ticket the engine stored.
"""

from __future__ import annotations

import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest, TestCase

from imageio import _pki
from tests._daemon import writeSparseImage
from tests.test_proxy import signedTicket
from tests.test_proxy_helpers import (
    Daemon,
    HTTPSClient,
    MiB,
    Proxy,
    daemonConfig,
    makeImage,
    proxyConfig,
)
from tests.test_upstream_client import checkReadWriteZeroFlush, readWriteZeroFlush

try:
    from ovirt_imageio import client as upstream
except ImportError:  # pragma: no cover - the test extra installs it
    upstream = None

reactor: Any = _reactor


class UpstreamClientTests(TestCase):
    timeout = 120

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        if upstream is None:
            raise SkipTest("ovirt-imageio (upstream client) is not installed")
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.pki = _pki.makeTestPKI(str(self.dir / "pki"))
        self.daemon = Daemon.start(reactor, daemonConfig(self.pki), self.dir / "daemon")
        self.addCleanup(self.daemon.stop)
        self.relay = Daemon.start(reactor, daemonConfig(self.pki), self.dir / "relay")
        self.addCleanup(self.relay.stop)
        self.proxy = yield Proxy.start(reactor, proxyConfig(self.dir / "proxy", self.pki))
        self.addCleanup(self.proxy.stop)

    def image(self, size: int) -> tuple[str, Path]:
        """
        An empty image and a read-write daemon ticket for it.
        """
        ticketID = str(uuid.uuid4())
        path = self.dir / f"{ticketID}.raw"
        self.daemon.addTicket(makeImage(path, b"", size), size, ("read", "write"), ticketID)
        return ticketID, path

    def proxyModeURL(self, ticketID: str, size: int) -> str:
        relayed = self.relay.addTicket(
            f"{self.daemon.url('localhost')}/images/{ticketID}", size, ("read", "write")
        )
        return f"{self.relay.url('localhost')}/images/{relayed}"

    @inlineCallbacks
    def signedProxyURL(self, ticketID: str) -> Any:
        client = HTTPSClient("localhost", self.proxy.portNumber, self.pki.caFile)
        try:
            ticket = signedTicket(ticketID, self.daemon.url("localhost"))
            reply = yield client.request("PUT", "/tickets/", body=ticket.encode())
        finally:
            client.close()
        self.assertEqual(reply.status, 200, reply.text)
        return f"https://localhost:{self.proxy.portNumber}/images/{ticketID}"

    @inlineCallbacks
    def checkReadWrite(self, url: str, path: Path, size: int) -> Any:
        pattern = _pattern()
        result = yield deferToThread(readWriteZeroFlush, url, self.pki.caFile, pattern)
        checkReadWriteZeroFlush(self, result, pattern, path, size)

    def test_proxyMode(self) -> Any:
        """
        ImageioClient reads, writes, zeroes, flushes and gets extents
        through a daemon in proxy mode.
        """
        size = 8 * MiB
        ticketID, path = self.image(size)
        return self.checkReadWrite(self.proxyModeURL(ticketID, size), path, size)

    @inlineCallbacks
    def test_signedTicketProxy(self) -> Any:
        """
        ImageioClient does the same through the signed-ticket proxy, with
        the ticket stored by the engine.
        """
        size = 8 * MiB
        ticketID, path = self.image(size)
        url = yield self.signedProxyURL(ticketID)
        yield self.checkReadWrite(url, path, size)

    @inlineCallbacks
    def test_uploadDownloadThroughProxy(self) -> Any:
        """
        client.upload and client.download move a sparse image byte-exact
        through the signed-ticket proxy.
        """
        if not (shutil.which("qemu-img") and shutil.which("qemu-nbd")):
            raise SkipTest("qemu-img and qemu-nbd are needed (Debian: qemu-utils)")
        size = 16 * MiB
        source = self.dir / "source.raw"
        writeSparseImage(source, size)
        ticketID, target = self.image(size)
        url = yield self.signedProxyURL(ticketID)
        yield deferToThread(upstream.upload, str(source), url, self.pki.caFile)
        self.assertEqual(target.read_bytes(), source.read_bytes())
        downloaded = self.dir / "downloaded.raw"
        yield deferToThread(upstream.download, url, str(downloaded), self.pki.caFile, fmt="raw")
        compare = subprocess.run(
            ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(source), str(downloaded)],
            capture_output=True,
            text=True,
        )
        self.assertEqual(compare.returncode, 0, compare.stdout + compare.stderr)


def _pattern() -> bytes:
    import hashlib

    return hashlib.shake_256(b"upstream").digest(3 * MiB + 17)
