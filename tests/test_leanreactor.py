"""
Tests for L{imageio._twisted_lazytls} and L{imageio._leanreactor}: a daemon
starts without pyOpenSSL and cryptography, and loads them when an
C{https:} ticket needs them.
"""

from __future__ import annotations

import ast
import inspect
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.python.reflect import namedAny
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imageio import _pki, _twisted_lazytls, _twisted_leanweb
from tests._daemon import (
    SubprocessDaemon,
    connect,
    control,
    shortTempDir,
    ticketBody,
    waitFor,
)

QEMU_NBD = shutil.which("qemu-nbd")

#: Run in a fresh interpreter: what each step leaves loaded.
SCRIPT = """
import json, sys
import imageio._leanreactor as lean
loaded = lambda: "OpenSSL" in sys.modules or "cryptography" in sys.modules
steps = {"imported": lean.imported, "core": loaded()}
from twisted.internet import posixbase, reactor, tcp
from twisted.internet.interfaces import IReactorSSL
steps["reactor"] = loaded()
steps["reactorSSL"] = IReactorSSL.providedBy(reactor)
import imageio.tap
steps["tap"] = loaded()
import imageio.backends.httpclient, imageio.backends.http
steps["client"] = loaded()
steps["restoredEarly"] = IReactorSSL.providedBy(reactor)
imageio.backends.httpclient.loadTrustRoot("")
steps["trust"] = loaded()
steps["restored"] = IReactorSSL.providedBy(reactor) and posixbase.tls is not None
from twisted.protocols.tls import TLSMemoryBIOFactory
steps["bio"] = posixbase.tls.TLSMemoryBIOFactory is TLSMemoryBIOFactory
print(json.dumps(steps))
"""


#: Run in a fresh interpreter: what the lean import of twisted.web.server
#: leaves out, and that what it left out still comes when asked for.
WEB_SCRIPT = """
import json, sys
heavy = ("twisted.spread", "twisted.web.util", "twisted.web.template", "xml.sax",
         "pyexpat", "decimal", "hyperlink")
loaded = lambda: sorted(m for m in heavy if m in sys.modules)
import imageio._leanreactor as lean
import imageio.tap, imageio.daemon.images, imageio.backends.file
from twisted.web import server
steps = {"imported": lean.leanweb, "tap": loaded()}
steps["request"] = server.Request.__mro__[1].__module__
failure = server.util.formatFailure
steps["util"] = failure.__module__
import twisted.web.util, twisted.spread.pb
steps["real"] = [twisted.web.util.formatFailure is failure,
                 twisted.spread.pb.Copyable.__module__]
print(json.dumps(steps))
"""


class LeanWebTests(SynchronousTestCase):
    """
    L{_twisted_leanweb.importServer}.
    """

    def test_noOpOnceImported(self) -> None:
        """
        With C{twisted.web.server} imported, nothing happens.
        """
        from twisted.web import server

        self.assertFalse(_twisted_leanweb.importServer())
        self.assertIs(sys.modules["twisted.web.server"], server)

    def test_freshProcess(self) -> None:
        """
        In a fresh process, the daemon's modules are imported without
        Perspective Broker, the template system, C{xml.sax} and
        C{decimal}; C{twisted.web.server}'s error pages still get the real
        C{twisted.web.util}, and importing it or C{twisted.spread.pb}
        later gives the real modules.
        """
        result = subprocess.run(
            [sys.executable, "-c", WEB_SCRIPT],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        self.assertEqual(
            json.loads(result.stdout.splitlines()[-1]),
            {
                "imported": True,
                "tap": [],
                "request": "imageio._twisted_leanweb",
                "util": "twisted.web._template_util",
                "real": [True, "twisted.spread.flavors"],
            },
        )

    def test_serverUsesOnlyStandIns(self) -> None:
        """
        C{twisted.web.server} takes from C{twisted.spread.pb} exactly
        L{_twisted_leanweb.SPREAD_NAMES}, and uses C{twisted.web.util} only
        as C{util.<name>} inside functions, for names in
        L{_twisted_leanweb.UTIL_NAMES}; every name exists in the real
        modules; the modules imported first are all it imports from
        Twisted besides.
        """
        from twisted.spread import pb
        from twisted.web import server, util

        tree = ast.parse(inspect.getsource(server))
        spread = set()
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                if node.module == "twisted.spread.pb":
                    spread.update(alias.name for alias in node.names)
        self.assertEqual(spread, set(_twisted_leanweb.SPREAD_NAMES))
        inFunctions: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                inFunctions.update(id(n) for n in ast.walk(node))
        used = set()
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "util"
            ):
                self.assertIn(id(node), inFunctions, f"util.{node.attr} at import time")
                used.add(node.attr)
        self.assertLessEqual(used, set(_twisted_leanweb.UTIL_NAMES))
        for name in _twisted_leanweb.SPREAD_NAMES:
            self.assertTrue(hasattr(pb, name), name)
        for name in _twisted_leanweb.UTIL_NAMES:
            self.assertTrue(hasattr(util, name), name)
        twisted = {m for m in imported if m.startswith("twisted.") and m.count(".") > 1}
        self.assertLessEqual(
            twisted - {"twisted.spread.pb"},
            set(_twisted_leanweb._FIRST) | {"twisted.internet.error", "twisted.python.compat"},
        )


class ReactorCoreTests(SynchronousTestCase):
    """
    L{_twisted_lazytls.importReactorCore} and
    L{_twisted_lazytls.restoreReactorTLS}.
    """

    def test_noOpOnceImported(self) -> None:
        """
        With the reactor imported (trial's), nothing is imported or
        changed.
        """
        self.assertFalse(_twisted_lazytls.importReactorCore())
        for name in _twisted_lazytls.BLOCKED:
            self.assertIsNot(sys.modules.get(name, 0), None)
        _twisted_lazytls.restoreReactorTLS()

    def test_privateNames(self) -> None:
        """
        C{posixbase} still binds the TLS modules to the names we restore,
        and the modules we block exist.
        """
        for owner, name in _twisted_lazytls.PRIVATE_NAMES:
            self.assertTrue(hasattr(namedAny(owner), name), f"{owner}.{name} is gone")
        from twisted.internet import posixbase, ssl
        from twisted.protocols import tls

        self.assertIs(posixbase.tls, tls)  # type: ignore[attr-defined]
        self.assertIs(posixbase.ssl, ssl)  # type: ignore[attr-defined]
        for name in _twisted_lazytls.BLOCKED:
            namedAny(name)

    def test_freshProcess(self) -> None:
        """
        In a fresh process, importing L{imageio._leanreactor} first keeps
        pyOpenSSL and cryptography out of the reactor and of
        C{imageio.tap}, and of the HTTP client and backend modules until
        they make a Twisted TLS client (a trust root), which loads them and
        gives the reactor its C{IReactorSSL} back.
        """
        result = subprocess.run(
            [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
        )
        self.assertEqual(
            json.loads(result.stdout.splitlines()[-1]),
            {
                "imported": True,
                "core": False,
                "reactor": False,
                "reactorSSL": False,
                "tap": False,
                "client": False,
                "restoredEarly": False,
                "trust": True,
                "restored": True,
                "bio": True,
            },
        )


def _mapped(pid: int, name: str) -> bool:
    """
    @return: Whether an extension module or library called C{name} is
        mapped into process C{pid}.
    """
    return name in Path(f"/proc/{pid}/maps").read_text()


def _cryptographyLoaded(pid: int) -> bool:
    """
    @return: Whether cryptography's Rust extension (which pyOpenSSL loads)
        is mapped into process C{pid}.
    """
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "cryptography" in maps or "_rust.abi3" in maps


class LeanDaemonTests(TestCase):
    """
    A real daemon (C{twistd -n imageio}) with its own long-lived
    certificate and a CA file for C{https:} tickets.
    """

    timeout = 120

    async def test_idleWithoutCryptographyHTTPSTicketWorks(self) -> None:
        """
        At idle the daemon has not loaded cryptography, nor after serving a
        C{file:} ticket and (with C{qemu-nbd}) an C{nbd:unix:} one; an
        C{https:} ticket relaying to another daemon still works, loading it
        then.
        """

        def scenario() -> None:
            source = SubprocessDaemon.start()
            self.addCleanup(source.stop)
            pkiDir = shortTempDir("iio-ss-")
            self.addCleanup(shutil.rmtree, pkiDir, True)
            cert, key = _pki.ensureSelfSigned(str(pkiDir))
            lean = SubprocessDaemon.start(
                {"tls": {"cert_file": cert, "key_file": key, "ca_file": source.addresses.caFile}}
            )
            self.addCleanup(lean.stop)
            self.assertFalse(_cryptographyLoaded(lean.pid), lean.output())

            data = bytes(range(256)) * 4096
            image = pkiDir / "image.raw"
            image.write_bytes(data)
            sourceTicket = str(uuid.uuid4())
            body = ticketBody(sourceTicket, f"file://{image}", len(data), ("read",))
            response = control(source.addresses, "PUT", f"/tickets/{sourceTicket}", body)
            self.assertEqual(response.status, 200, response.text)
            response = control(lean.addresses, "PUT", f"/tickets/{sourceTicket}", body)
            self.assertEqual(response.status, 200, response.text)
            with connect(lean.addresses) as conn:
                response = conn.request("GET", f"/images/{sourceTicket}")
            self.assertEqual(response.body, data)
            # Nor the template system's XML parser, nor Perspective
            # Broker's decimal (twisted.web.server's lean import).
            self.assertFalse(_mapped(lean.pid, "pyexpat"), lean.output())
            self.assertFalse(_mapped(lean.pid, "_decimal"), lean.output())
            if QEMU_NBD is not None:
                self._nbdTicket(lean, image, data, pkiDir)
            self.assertFalse(_cryptographyLoaded(lean.pid), lean.output())
            host, port = source.addresses.remote
            relayTicket = str(uuid.uuid4())
            url = f"https://localhost:{port}/images/{sourceTicket}"
            body = ticketBody(relayTicket, url, len(data), ("read",))
            response = control(lean.addresses, "PUT", f"/tickets/{relayTicket}", body)
            self.assertEqual(response.status, 200, response.text)
            with connect(lean.addresses) as conn:
                response = conn.request("GET", f"/images/{relayTicket}")
            self.assertEqual(response.status, 200, response.text)
            self.assertEqual(response.body, data)
            self.assertTrue(_cryptographyLoaded(lean.pid))

        await deferToThread(scenario)

    def _nbdTicket(self, lean: SubprocessDaemon, image: Path, data: bytes, where: Path) -> None:
        """
        Serve C{image} with C{qemu-nbd} and read it through an C{nbd:unix:}
        ticket of C{lean}.
        """
        assert QEMU_NBD is not None
        sock = where / "nbd.sock"
        server = subprocess.Popen(
            [QEMU_NBD, "--socket", str(sock), "--format", "raw", "--read-only", str(image)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(server.wait)
        self.addCleanup(server.kill)
        self.assertTrue(waitFor(sock.exists, 10), "qemu-nbd did not start")
        ticket = str(uuid.uuid4())
        body = ticketBody(ticket, f"nbd:unix:{sock}", len(data), ("read",))
        response = control(lean.addresses, "PUT", f"/tickets/{ticket}", body)
        self.assertEqual(response.status, 200, response.text)
        with connect(lean.addresses) as conn:
            response = conn.request("GET", f"/images/{ticket}")
        self.assertEqual(response.status, 200, response.text)
        self.assertEqual(response.body, data)
