"""
The daemon under many connections and transfers (checklist F.29, F.34,
H.42), on real sockets: bursts of connects, running out of file
descriptors, memory with many concurrent transfers, and a short smoke run
of C{bench/load.py} (only with C{IMAGEIO_SLOW=1}).
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import time
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SkipTest

from tests._daemon import (
    Connection,
    DaemonTestCase,
    SubprocessDaemon,
    connect,
    control,
    fdCount,
    parallel,
    pattern,
    raiseFileLimit,
    rawRequest,
    ticketBody,
    waitFor,
)

KiB = 1024
MiB = 1024**2
GiB = 1024**3

ROOT = Path(__file__).resolve().parent.parent


def cpuSeconds(pid: int) -> float:
    """
    @return: User and system CPU time process C{pid} used so far.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ConnectionBurstTests(DaemonTestCase):
    """
    Checklist F.34: many clients connecting at the same moment.
    """

    COUNT = 300

    async def test_burstOfConnects(self) -> None:
        """
        300 non-blocking connects at once to the local socket never fail
        with EAGAIN (the listen backlog holds them), 300 TCP connects all
        complete without waiting for a SYN retransmit, and every connection
        is served.
        """
        raiseFileLimit(4 * self.COUNT + 256)
        # The TCP connections wait, unused, while the UNIX ones are served:
        # under load that takes longer than the tests' short handshake and
        # request deadlines, which are not what this test is about.
        daemon = self.startDaemon(daemon={"request_timeout": 30}, tls={"handshake_timeout": 30})
        size = 64 * KiB
        data = pattern(size)
        ticket = self.addTicket(daemon, self.makeImage(daemon, size, data), size, ops=["read"])

        def scenario() -> None:
            fds = fdCount()
            unix: list[socket.socket] = []
            eagain = 0
            for _ in range(self.COUNT):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                try:
                    sock.connect(daemon.addresses.local)
                except BlockingIOError:
                    eagain += 1
                unix.append(sock)
            tcp: list[socket.socket] = []
            started = time.monotonic()
            for _ in range(self.COUNT):
                sock = socket.create_connection(daemon.addresses.remote, timeout=10)
                tcp.append(sock)
            tcpSeconds = time.monotonic() - started
            try:
                self.assertEqual(eagain, 0)
                self.assertLess(tcpSeconds, 0.9)
                for sock in unix:
                    sock.setblocking(True)
                conns = [Connection(sock) for sock in unix]
                request = rawRequest("GET", f"/images/{ticket}", [("Range", "bytes=0-99")])
                for conn in conns:
                    conn.send(request)
                for conn in conns:
                    r = conn.response(timeout=10)
                    self.assertEqual((r.status, r.body), (206, data[:100]))
                # TLS on a sample of the TCP connections, while all are open.
                for sock in tcp[:: self.COUNT // 20]:
                    context = ssl.create_default_context(cafile=daemon.addresses.caFile)
                    # wrap_socket takes the descriptor over: close the wrapper.
                    tls = context.wrap_socket(sock, server_hostname="localhost")
                    with Connection(tls) as conn:
                        r = conn.request("GET", f"/images/{ticket}", [("Range", "bytes=0-99")])
                        self.assertEqual(r.status, 206)
            finally:
                for sock in unix + tcp:
                    sock.close()
            self.waitForFds(fds)

        await deferToThread(scenario)


class FileLimitTests(DaemonTestCase):
    """
    Checklist F.29: a daemon out of file descriptors.
    """

    LIMIT = 128

    async def test_fileDescriptorExhaustion(self) -> None:
        """
        With more idle connections than file descriptors, the daemon does
        not spin, keeps running, frees the descriptors at the handshake and
        request deadlines, and then serves a legitimate client.
        """

        def scenario() -> None:
            daemon = SubprocessDaemon.start(
                {"daemon": {"request_timeout": 1}, "tls": {"handshake_timeout": 1}},
                nofile=self.LIMIT,
            )
            self.addCleanup(daemon.stop)
            baseline = daemon.fdCount()
            idle = [
                socket.create_connection(daemon.addresses.remote, timeout=5)
                for _ in range(self.LIMIT + 72)
            ]
            try:
                self.assertTrue(waitFor(lambda: daemon.fdCount() >= self.LIMIT - 2, 3))
                cpu, started = cpuSeconds(daemon.pid), time.monotonic()
                time.sleep(0.5)
                busy = (cpuSeconds(daemon.pid) - cpu) / (time.monotonic() - started)
                self.assertLess(busy, 0.5)

                def legitimate() -> bool:
                    try:
                        with connect(daemon.addresses, "remote", timeout=2) as conn:
                            return conn.request("GET", "/info/").status == 200
                    except (OSError, Exception):
                        return False

                self.assertTrue(waitFor(legitimate, 6, interval=0.2))
                self.assertIsNone(daemon.process.poll())
            finally:
                for sock in idle:
                    sock.close()
            self.assertTrue(waitFor(lambda: daemon.fdCount() <= baseline + 2, 5))

        await deferToThread(scenario)


class MemoryTests(DaemonTestCase):
    """
    Checklist H.42: memory with many transfers at once.
    """

    async def test_memoryManyTransfers(self) -> None:
        """
        8 uploads and 8 downloads at once on two tickets keep the daemon's
        peak RSS within the buffers they need (8 MiB per upload, two 8 MiB
        buffers per download) plus a fixed allowance, whatever the image
        size; every transfer is byte-exact.
        """

        def scenario() -> None:
            daemon = SubprocessDaemon.start({"daemon": {"inactivity_timeout": 30}})
            self.addCleanup(daemon.stop)
            size = 32 * MiB
            source = daemon.runDir / "source"
            source.write_bytes(pattern(size, b"src"))
            target = daemon.runDir / "target"
            with open(target, "wb") as f:
                f.truncate(8 * size)
            for ticket, path, total in [("r", source, size), ("w", target, 8 * size)]:
                body = ticketBody(ticket, f"file://{path}", total)
                self.assertEqual(
                    control(daemon.addresses, "PUT", f"/tickets/{ticket}", body).status, 200
                )
            data = pattern(size, b"src")
            baseline = daemon.rssKiB() * KiB

            def upload(i: int) -> int:
                with connect(daemon.addresses, "remote" if i % 2 else "local") as conn:
                    headers = [("Content-Range", f"bytes {i * size}-{(i + 1) * size - 1}/*")]
                    return conn.request("PUT", "/images/w?flush=n", headers, data).status

            def download(i: int) -> bool:
                with connect(daemon.addresses, "remote" if i % 2 else "local") as conn:
                    return conn.request("GET", "/images/r").body == data

            results = parallel(
                *[lambda i=i: upload(i) for i in range(8)],
                *[lambda i=i: download(i) for i in range(8)],
                timeout=120,
            )
            self.assertEqual(results, [200] * 8 + [True] * 8)
            peak = daemon.peakRssKiB() * KiB
            budget = 8 * 8 * MiB + 8 * 2 * 8 * MiB + 64 * MiB
            self.assertLess(peak - baseline, budget, f"peak {peak / MiB:.0f} MiB")
            with open(target, "rb") as written:
                for i in range(8):
                    self.assertEqual(written.read(size), data, i)

        await deferToThread(scenario)


class LoadSmokeTests(DaemonTestCase):
    """
    A short run of C{bench/load.py}: slow, so only with C{IMAGEIO_SLOW=1}.
    """

    timeout = 300

    async def test_loadSmoke(self) -> None:
        """
        200 keep-alive connections doing small GETs, 50 idle connections and
        a 512 MiB upload at once: no errors, the upload succeeds and no idle
        connection is dropped.
        """
        if os.environ.get("IMAGEIO_SLOW") != "1":
            raise SkipTest("slow: set IMAGEIO_SLOW=1")
        sys.path.insert(0, str(ROOT / "bench"))
        self.addCleanup(sys.path.remove, str(ROOT / "bench"))
        import load  # type: ignore[import-not-found]

        summary = await deferToThread(
            load.main,
            ["--connections", "200", "--idle", "50", "--duration", "5", "--upload-size", "512M"],
        )
        self.assertEqual(summary["errors"], 0, summary["error_samples"])
        self.assertEqual(summary["upload"]["status"], 200)
        self.assertEqual(summary["idle_closed_by_daemon"], 0)
        self.assertGreater(summary["requests"], 0)


class ControlChurnTests(DaemonTestCase):
    """
    Checklist D.22: tickets added and deleted for a minute. Slow, so only
    with C{IMAGEIO_SLOW=1}.
    """

    timeout = 300

    async def test_addDeleteForAMinute(self) -> None:
        """
        Adding and deleting tickets as fast as one client can for a minute,
        one connection per request, leaves the daemon's file descriptors
        and memory where they started.
        """
        if os.environ.get("IMAGEIO_SLOW") != "1":
            raise SkipTest("slow: set IMAGEIO_SLOW=1")
        seconds = float(os.environ.get("IMAGEIO_CHURN_SECONDS", "60"))

        def scenario() -> None:
            daemon = SubprocessDaemon.start()
            self.addCleanup(daemon.stop)
            image = daemon.runDir / "image"
            image.write_bytes(b"\0" * 4096)

            def cycle(i: int) -> None:
                body = ticketBody(f"churn-{i}", f"file://{image}", 4096)
                self.assertEqual(control(daemon.addresses, "PUT", "/tickets/x", body).status, 200)
                r = control(daemon.addresses, "DELETE", f"/tickets/churn-{i}")
                self.assertEqual(r.status, 204)

            for i in range(200):
                cycle(i)
            fds, memory = daemon.fdCount(), daemon.rssKiB()
            started, count = time.monotonic(), 0
            while time.monotonic() - started < seconds:
                cycle(count)
                count += 1
            elapsed = time.monotonic() - started
            self.assertTrue(waitFor(lambda: daemon.fdCount() <= fds, 5))
            self.assertLess(daemon.rssKiB() - memory, 10 * 1024)
            self.assertEqual(
                control(daemon.addresses, "GET", f"/tickets/churn-{count - 1}").status, 404
            )
            print(
                f"\n{count / elapsed:.0f} add+delete per second for {elapsed:.0f} s; "
                f"RSS {memory} -> {daemon.rssKiB()} KiB; fds {fds} -> {daemon.fdCount()}"
            )

        await deferToThread(scenario)
