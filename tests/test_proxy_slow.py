"""
Slow measurements of the proxy: peak memory and throughput while 4 GiB go
through it each way, with curl as the client. Skipped unless
C{IMAGEIO_SLOW=1}.

The daemon and the proxy run in child processes of their own (this module
is their entry point too: C{python -m tests.test_proxy_slow daemon|proxy}),
so the proxy's peak RSS (C{VmHWM}, reset between runs through
C{/proc/PID/clear_refs}) is the proxy's alone.

Run: C{IMAGEIO_SLOW=1 .venv/bin/python -m twisted.trial tests.test_proxy_slow}.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import attrs
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from imageio import _pki
from tests.test_proxy_helpers import proxyConfig

GiB = 1024**3
MiB = 1024**2

#: Bytes moved each way.
SIZE = int(os.environ.get("IMAGEIO_SLOW_SIZE", 4 * GiB))

#: The promise: the proxy stays under this however large the transfer.
RSS_LIMIT_KIB = 100 * 1024


def procStatus(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def resetPeak(pid: int) -> None:
    """
    Reset C{VmHWM} of process C{pid} to its current RSS.
    """
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


class Child:
    """
    A daemon or proxy in a child process, ready once it printed its port.
    """

    def __init__(self, role: str, args: dict[str, Any]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.test_proxy_slow", role, json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"{role} did not start: {line!r}")
        self.port = int(line.split()[1])

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def curl(args: list[str]) -> float:
    """
    Run curl, failing on HTTP errors.

    @return: Seconds it took.
    """
    start = time.monotonic()
    subprocess.run(
        ["curl", "--silent", "--show-error", "--fail", "--http1.1", *args],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - start


class RelayMemoryTests(SynchronousTestCase):
    def setUp(self) -> None:
        if os.environ.get("IMAGEIO_SLOW") != "1":
            raise SkipTest("slow: set IMAGEIO_SLOW=1")
        if shutil.which("curl") is None:
            raise SkipTest("curl is not installed")
        self.dir = Path(tempfile.mkdtemp(prefix="iio-slow-"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.pki = _pki.makeTestPKI(str(self.dir / "pki"))
        shm = Path("/dev/shm") if Path("/dev/shm").is_dir() else self.dir
        self.source = Path(tempfile.mkdtemp(prefix="iio-slow-", dir=shm)) / "source.raw"
        self.addCleanup(shutil.rmtree, self.source.parent, True)
        # Sparse: reads are zeroes at memory speed, nothing is allocated.
        with open(self.source, "wb") as f:
            f.truncate(SIZE)
        # Written for real: on disk, not in memory.
        self.target = self.dir / "target.raw"
        with open(self.target, "wb") as f:
            f.truncate(SIZE)
        self.readTicket = str(uuid.uuid4())
        self.writeTicket = str(uuid.uuid4())
        tickets = [
            {
                "uuid": self.readTicket,
                "url": f"file://{self.source}",
                "size": SIZE,
                "ops": ["read"],
                "timeout": 3600,
            },
            {
                "uuid": self.writeTicket,
                "url": f"file://{self.target}",
                "size": SIZE,
                "ops": ["write"],
                "timeout": 3600,
            },
        ]
        pki = attrs.asdict(self.pki)
        self.daemon = Child("daemon", {"dir": str(self.dir), "pki": pki, "tickets": tickets})
        self.addCleanup(self.daemon.stop)
        # The engine's keys live in this process: write its certificates here.
        engineFiles = proxyConfig(self.dir / "engine", self.pki).proxy
        self.proxy = Child(
            "proxy",
            {
                "dir": str(self.dir),
                "pki": pki,
                "engineCert": engineFiles.engine_cert_file,
                "engineCA": engineFiles.engine_ca_cert_file,
            },
        )
        self.addCleanup(self.proxy.stop)
        # A daemon in proxy mode (2.x): plain tickets, same ids, URLs naming
        # the daemon above.
        relayed = [
            dict(ticket, url=f"https://localhost:{self.daemon.port}/images/{ticket['uuid']}")
            for ticket in tickets
        ]
        self.relay = Child("daemon", {"dir": str(self.dir), "pki": pki, "tickets": relayed})
        self.addCleanup(self.relay.stop)

    def ticket(self, ticketID: str) -> str:
        from tests.test_proxy import signedTicket

        return signedTicket(ticketID, f"https://localhost:{self.daemon.port}", lifetime=3600)

    def test_relayMemory(self) -> None:
        """
        The proxy's peak RSS, and that of a daemon in proxy mode, stay under
        100 MiB while 4 GiB go through each of them each way.
        """
        base = ["--cacert", self.pki.caFile]
        proxy = f"https://localhost:{self.proxy.port}"
        daemon = f"https://localhost:{self.daemon.port}"
        results: dict[str, Any] = {"size_gib": SIZE / GiB}
        results["proxy_rss_idle_mib"] = procStatus(self.proxy.pid, "VmRSS") / 1024

        # Direct to the daemon, for reference.
        results["direct_download_s"] = curl(
            [*base, "-o", "/dev/null", f"{daemon}/images/{self.readTicket}"]
        )
        results["direct_upload_s"] = curl(
            [*base, "-T", str(self.source), f"{daemon}/images/{self.writeTicket}?flush=n"]
        )

        resetPeak(self.proxy.pid)
        auth = ["-H", f"Authorization: {self.ticket(self.readTicket)}"]
        results["proxy_download_s"] = curl(
            [*base, *auth, "-o", "/dev/null", f"{proxy}/images/{self.readTicket}"]
        )
        results["proxy_download_peak_rss_mib"] = procStatus(self.proxy.pid, "VmHWM") / 1024

        resetPeak(self.proxy.pid)
        auth = ["-H", f"Authorization: {self.ticket(self.writeTicket)}"]
        results["proxy_upload_s"] = curl(
            [*base, *auth, "-T", str(self.source), f"{proxy}/images/{self.writeTicket}?flush=n"]
        )
        results["proxy_upload_peak_rss_mib"] = procStatus(self.proxy.pid, "VmHWM") / 1024

        relay = f"https://localhost:{self.relay.port}"
        results["proxy_mode_rss_idle_mib"] = procStatus(self.relay.pid, "VmRSS") / 1024
        resetPeak(self.relay.pid)
        results["proxy_mode_download_s"] = curl(
            [*base, "-o", "/dev/null", f"{relay}/images/{self.readTicket}"]
        )
        results["proxy_mode_download_peak_rss_mib"] = procStatus(self.relay.pid, "VmHWM") / 1024
        resetPeak(self.relay.pid)
        results["proxy_mode_upload_s"] = curl(
            [*base, "-T", str(self.source), f"{relay}/images/{self.writeTicket}?flush=n"]
        )
        results["proxy_mode_upload_peak_rss_mib"] = procStatus(self.relay.pid, "VmHWM") / 1024

        for name in (
            "direct_download",
            "direct_upload",
            "proxy_download",
            "proxy_upload",
            "proxy_mode_download",
            "proxy_mode_upload",
        ):
            results[name + "_mib_s"] = round(SIZE / MiB / results[name + "_s"], 1)
        print("\n" + json.dumps(results, indent=2))
        (Path(os.environ.get("IMAGEIO_SLOW_RESULTS", self.dir / "results.json"))).write_text(
            json.dumps(results, indent=2)
        )
        self.assertLess(results["proxy_download_peak_rss_mib"] * 1024, RSS_LIMIT_KIB)
        self.assertLess(results["proxy_upload_peak_rss_mib"] * 1024, RSS_LIMIT_KIB)
        self.assertLess(results["proxy_mode_download_peak_rss_mib"] * 1024, RSS_LIMIT_KIB)
        self.assertLess(results["proxy_mode_upload_peak_rss_mib"] * 1024, RSS_LIMIT_KIB)


# Child process entry points


def _serveDaemon(args: dict[str, Any]) -> None:
    from twisted.internet import reactor

    from imageio.tap import ImageioService
    from tests.test_proxy_helpers import daemonConfig

    directory = Path(args["dir"])
    pki = _pki.TestPKI(**args["pki"])
    service = ImageioService(daemonConfig(pki), reactor, directory / "daemon-state")
    for ticket in args["tickets"]:
        service.registry.add(ticket)

    def start() -> None:
        service.startService()
        port: Any = service.ports["remote"].getHost()
        print(f"PORT {port.port}", flush=True)

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


def _serveProxy(args: dict[str, Any]) -> None:
    from twisted.internet import reactor

    from tests.test_proxy_helpers import Proxy

    directory = Path(args["dir"])
    pki = _pki.TestPKI(**args["pki"])
    config = proxyConfig(directory / "proxy", pki)
    config.proxy.engine_cert_file = args["engineCert"]
    config.proxy.engine_ca_cert_file = args["engineCA"]

    def started(proxy: Proxy) -> None:
        print(f"PORT {proxy.portNumber}", flush=True)

    def start() -> None:
        d = Proxy.start(reactor, config)
        d.addCallback(started)

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    role, raw = sys.argv[1], sys.argv[2]
    {"daemon": _serveDaemon, "proxy": _serveProxy}[role](json.loads(raw))
