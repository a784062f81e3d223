# -*- test-case-name: tests.test_client_upstream -*-
"""
Our client against upstream ovirt-imageio 2.5.1's daemon (the test
dependency's C{ovirt-imageio} program): no C{/written}, one data extent
for files, its own local socket.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from imageio import _pki
from imageio._diskio import DiskIO, DiskIOPool
from imageio.client import Client
from tests._daemon import Addresses, control, shortTempDir, ticketBody
from tests.test_client import allocated, compare, requireQemu, writeSparseImage

MiB = 1024**2
SIZE = 8 * MiB

UPSTREAM = Path(sys.executable).parent / "ovirt-imageio"


def _freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class UpstreamDaemonTests(TestCase):
    """
    Transfers with an upstream daemon.
    """

    timeout = 60

    @inlineCallbacks
    def setUp(self) -> Any:
        if not UPSTREAM.exists():
            raise SkipTest("ovirt-imageio (upstream) is not installed")
        self.run = shortTempDir()
        self.addCleanup(shutil.rmtree, self.run, True)
        pki = _pki.makeTestPKI(str(self.run / "pki"))
        port = _freePort()
        confd = self.run / "conf.d"
        confd.mkdir()
        (confd / "daemon.conf").write_text(
            f"[daemon]\ndrop_privileges = false\nsystemd_enable = false\n"
            f"run_dir = {self.run}\n"
            f"[tls]\nenable = true\nkey_file = {pki.keyFile}\ncert_file = {pki.certFile}\n"
            f"[remote]\nhost = 127.0.0.1\nport = {port}\n"
            f"[local]\nenable = true\nsocket = {self.run}/local.sock\n"
            f"[control]\ntransport = unix\nsocket = {self.run}/control.sock\n"
        )
        (confd / "90-log.conf").write_text(f"[handler_logfile]\nargs = ('{self.run}/log',)\n")
        self.process = subprocess.Popen(
            [str(UPSTREAM), "-c", str(self.run)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.addCleanup(self.process.wait)
        self.addCleanup(self.process.send_signal, signal.SIGTERM)
        self.addresses = Addresses(
            ("127.0.0.1", port), f"{self.run}/local.sock", f"{self.run}/control.sock", pki.caFile
        )
        for _ in range(1000):
            if (self.run / "control.sock").exists() and (self.run / "local.sock").exists():
                break
            if self.process.poll() is not None:
                self.fail(f"ovirt-imageio exited: {(self.run / 'log').read_text()[-2000:]}")
            yield deferLater(reactor, 0.01, lambda: None)
        self.pool = DiskIOPool(reactor, 4, name="client-io")
        self.pool.start()
        self.addCleanup(self.pool.stop)
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()

    def addTicket(self, path: Path, ops: tuple[str, ...] = ("read", "write")) -> str:
        ticketID = os.urandom(8).hex()
        body = ticketBody(ticketID, f"file://{path}", SIZE, ops, sparse=True)
        response = control(self.addresses, "PUT", f"/tickets/{ticketID}", body)
        self.assertEqual(response.status, 200, response.text)
        host, port = self.addresses.remote
        return f"https://{host}:{port}/images/{ticketID}"

    def client(self, **kwargs: Any) -> Client:
        return Client(
            reactor=reactor,
            diskio=DiskIO(self.pool),
            cafile=self.addresses.caFile,
            bufferSize=MiB,
            **kwargs,
        )

    @inlineCallbacks
    def test_uploadResumeDownload(self) -> Any:
        """
        A resumed upload warns that the daemon has no C{/written} and sends
        everything; a raw download keeps the zeroes as holes although the
        daemon reports the file as data; a qcow2 download and the checksum
        agree.
        """
        source = self.dir / "source.raw"
        writeSparseImage(source, SIZE, dataAt=(0, 5 * MiB))
        target = self.dir / "target.raw"
        with open(target, "wb") as f:
            f.truncate(SIZE)
        url = self.addTicket(target)
        warnings: list[str] = []
        yield self.client(warn=warnings.append).upload(str(source), url, resume=True)
        compare(source, target)
        self.assertEqual(len(warnings), 1)

        downloaded = self.dir / "down.raw"
        yield self.client().download(url, str(downloaded), fmt="raw")
        compare(source, downloaded)
        self.assertLessEqual(allocated(downloaded), 3 * MiB)

        remote = yield self.client().checksum(url)
        local = yield self.client().checksum(str(source))
        self.assertEqual(remote, local)

        requireQemu()
        qcow2 = self.dir / "down.qcow2"
        yield self.client().download(url, str(qcow2), fmt="qcow2")
        compare(source, qcow2)
