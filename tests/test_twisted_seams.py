# -*- test-case-name: tests.test_twisted_seams -*-
"""
Pins for the private Twisted names imageio relies on, one quarantine module
per seam:

  - the socket transport seam: L{imageio.web._twisted_transport};
  - the HTTP client pool seam: L{imageio.backends._twisted_client};
  - the reactor core's import-time TLS seam:
    L{imageio._twisted_lazytls}, pinned by C{tests.test_leanreactor};
  - the HTTP channel/request/decoder seam: still in
    C{imageio.web._streaming} and C{imageio.web._response} (issue 11
    phase 2 moves it into its own module).

If one of these tests fails after a Twisted upgrade, Twisted changed
something we depend on: read the seam's module before anything else.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

from twisted.internet import abstract, main, tcp, unix
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.testing import MemoryReactor
from twisted.python.reflect import namedAny
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import client
from zope.interface import implementer

from imageio.backends import _twisted_client
from imageio.web import _twisted_transport
from imageio.web._transport import ZeroCopyTCPServer, ZeroCopyUNIXServer

ROOT = Path(__file__).resolve().parent.parent

#: The private names of the HTTP channel/request/decoder seam, used in
#: C{imageio.web._streaming} (and C{_response}) until issue 11 phase 2
#: quarantines them: file -> names.
HTTP_SEAM_PENDING = {
    "imageio/web/_streaming.py": {
        "_HTTPChannel__first_line",
        "_command",
        "_savedTimeOut",
        "_handlingRequest",
        "_send100Continue",
        "_respondToBadRequestAndDisconnect",
        "_transferDecoder",
        "_IdentityTransferDecoder",
        "_disconnected",
    },
    "imageio/web/_response.py": {"_disconnected"},
}

#: Quarantine module -> the private names it owns.
QUARANTINE = {
    "imageio/web/_twisted_transport.py": {n for _, n in _twisted_transport.PRIVATE_NAMES},
    "imageio/backends/_twisted_client.py": {n for _, n in _twisted_client.PRIVATE_NAMES},
}

#: Every Twisted private name we know we use.
KNOWN = set().union(*QUARANTINE.values(), *HTTP_SEAM_PENDING.values())


def namesIn(source: str) -> set[str]:
    """
    @return: Identifiers C{source} uses: attribute and plain names,
        imported names, defined functions (overrides) and string constants
        (C{getattr(obj, "_name")}).
    """
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            names.add(node.attr)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add(node.name.rpartition(".")[2])
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return names


class QuarantineTests(SynchronousTestCase):
    """
    Twisted's private names appear only in their seam's module.
    """

    def test_onlyInQuarantine(self) -> None:
        """
        No module but a seam's quarantine module names one of the Twisted
        privates we depend on (the HTTP seam's are listed until phase 2
        moves them).
        """
        problems = []
        for path in sorted((ROOT / "imageio").rglob("*.py")):
            where = str(path.relative_to(ROOT))
            allowed = QUARANTINE.get(where, set()) | HTTP_SEAM_PENDING.get(where, set())
            for name in sorted((namesIn(path.read_text()) & KNOWN) - allowed):
                problems.append(f"{where}: Twisted private {name} outside its seam's module")
        self.assertEqual(problems, [], "\n" + "\n".join(problems))

    def test_pendingListShrinks(self) -> None:
        """
        Every pending HTTP seam name is still used where listed: moved
        ones must leave the list.
        """
        stale = []
        for where, names in HTTP_SEAM_PENDING.items():
            for name in sorted(names - namesIn((ROOT / where).read_text())):
                stale.append(f"{where}: {name}")
        self.assertEqual(stale, [], "no longer used, remove from HTTP_SEAM_PENDING")

    def test_privateTwistedImports(self) -> None:
        """
        Private Twisted modules or names are imported only by quarantine
        modules.
        """
        problems = []
        for path in sorted((ROOT / "imageio").rglob("*.py")):
            where = str(path.relative_to(ROOT))
            if where in QUARANTINE:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("twisted"):
                    for alias in node.names:
                        if alias.name.startswith("_"):
                            problems.append(f"{where}:{node.lineno}: {node.module}.{alias.name}")
                if isinstance(node, ast.Import | ast.ImportFrom):
                    modules = (
                        [a.name for a in node.names]
                        if isinstance(node, ast.Import)
                        else [node.module or ""]
                    )
                    for module in modules:
                        parts = module.split(".")
                        if parts[0] == "twisted" and any(p.startswith("_") for p in parts):
                            problems.append(f"{where}:{node.lineno}: {module}")
        self.assertEqual(problems, [], "\n" + "\n".join(problems))


class TransportSeamTests(SynchronousTestCase):
    """
    The C{FileDescriptor} internals L{imageio.web._twisted_transport} uses.
    """

    def test_namesExist(self) -> None:
        """
        Every private name of the seam exists where the module says, and on
        both transports we extend.
        """
        for owner, name in _twisted_transport.PRIVATE_NAMES:
            self.assertTrue(hasattr(namedAny(owner), name), f"{owner}.{name} is gone")
            for transport in (tcp.Server, unix.Server):
                self.assertTrue(hasattr(transport, name), f"{transport}.{name} is gone")

    def test_signatures(self) -> None:
        """
        The private methods take the arguments we pass.
        """
        expected = {
            "_dataReceived": ["self", "data"],
            "_maybePauseProducer": ["self"],
            "_isSendBufferFull": ["self"],
            "_postLoseConnection": ["self"],
            "_closeWriteConnection": ["self"],
        }
        for name, parameters in expected.items():
            method = getattr(tcp.Server, name)
            self.assertEqual(list(inspect.signature(method).parameters), parameters, name)

    def test_emptyReadIsEndOfStream(self) -> None:
        """
        C{_dataReceived(b"")} reports the end of the stream, which is how
        our C{doRead} passes on a zero-byte C{recv}.
        """
        self.assertIs(tcp.Connection._dataReceived(object(), b""), main.CONNECTION_DONE)  # type: ignore[arg-type]

    def test_maybePauseProducerAsksIsSendBufferFull(self) -> None:
        """
        C{_maybePauseProducer} pauses a streaming producer exactly when
        C{_isSendBufferFull} says so: our C{sendBufferFull} decides.
        """

        @implementer(IPushProducer)
        class Producer:
            paused = 0

            def pauseProducing(self) -> None:
                self.paused += 1

            def resumeProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        class Transport(_twisted_transport.FileDescriptorSeam, abstract.FileDescriptor):
            full = False

            def sendBufferFull(self) -> bool:
                return self.full

        transport = Transport(MemoryReactor())
        producer = Producer()
        transport.registerProducer(producer, True)
        transport.pauseProducerIfFull()
        self.assertEqual(producer.paused, 0)
        transport.full = True
        transport.pauseProducerIfFull()
        self.assertEqual(producer.paused, 1)

    def test_halfCloseFlags(self) -> None:
        """
        C{loseWriteConnection} sets C{_writeDisconnecting}, which our
        C{writeDisconnecting} reads; both flags start false.
        """
        transport = ZeroCopyTCPServer.__new__(ZeroCopyTCPServer)
        self.assertFalse(transport.writeDisconnecting)
        self.assertFalse(transport.writeDisconnected)
        fd = abstract.FileDescriptor(MemoryReactor())
        fd.loseWriteConnection()
        self.assertTrue(fd._writeDisconnecting)

    def test_postLoseConnectionIsDone(self) -> None:
        """
        C{_postLoseConnection} ends the connection cleanly.
        """
        fd = abstract.FileDescriptor(MemoryReactor())
        self.assertIs(fd._postLoseConnection(), main.CONNECTION_DONE)

    def test_transportsUseTheSeam(self) -> None:
        """
        Both zero-copy transports override C{_isSendBufferFull} through the
        seam, ahead of Twisted's own.
        """
        for transport in (ZeroCopyTCPServer, ZeroCopyUNIXServer):
            self.assertIs(
                transport._isSendBufferFull,
                _twisted_transport.FileDescriptorSeam._isSendBufferFull,
            )


class ClientPoolSeamTests(SynchronousTestCase):
    """
    The C{HTTPConnectionPool} internals L{imageio.backends._twisted_client}
    uses.
    """

    def test_namesExist(self) -> None:
        """
        C{_HTTP11ClientFactory} exists and is the pool's default
        C{_factory}.
        """
        self.assertTrue(hasattr(client, "_HTTP11ClientFactory"))
        self.assertIs(client.HTTPConnectionPool._factory, client._HTTP11ClientFactory)

    def test_factorySignature(self) -> None:
        """
        The pool builds its factory with C{(quiescentCallback, metadata)},
        which our subclass inherits.
        """
        self.assertEqual(
            list(inspect.signature(client._HTTP11ClientFactory.__init__).parameters),
            ["self", "quiescentCallback", "metadata"],
        )

    def test_poolUsesQuietFactory(self) -> None:
        """
        A new connection of a quiet pool is made with the quiet factory,
        which does not log starting and stopping.
        """
        factories: list[Any] = []

        class Endpoint:
            def connect(self, factory: Any) -> Deferred[Any]:
                factories.append(factory)
                return Deferred()

        pool = _twisted_client.quietPool(MemoryReactor())
        pool.getConnection(("https", b"host", 443), Endpoint())
        [factory] = factories
        self.assertIsInstance(factory, _twisted_client.QuietClientFactory)
        self.assertFalse(factory.noisy)
