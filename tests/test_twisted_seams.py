# -*- test-case-name: tests.test_twisted_seams -*-
"""
Pins for the private Twisted names imageio relies on, one quarantine module
per seam:

  - the socket transport seam: L{imageio.web._twisted_transport};
  - the HTTP client pool seam: L{imageio.backends._twisted_client};
  - the HTTP channel/request/decoder seam: L{imageio.web._twisted_http};
  - the reactor core's import-time TLS seam:
    L{imageio._twisted_lazytls}, pinned by C{tests.test_leanreactor}.
  - C{twisted.web.server}'s import-time seam (no PB, no templates):
    L{imageio._twisted_leanweb}, pinned by C{tests.test_leanreactor}.
  - the epoll reactor's dispatch seam: L{imageio._twisted_dispatch}.

If one of these tests fails after a Twisted upgrade, Twisted changed
something we depend on: read the seam's module before anything else.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import os
import textwrap
import threading
from pathlib import Path
from typing import Any

from twisted.internet import abstract, main, tcp, unix
from twisted.internet.base import ReactorBase
from twisted.internet.defer import Deferred
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols import basic
from twisted.python import context, log
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import client, http
from twisted.web.http_headers import Headers
from zope.interface import implementer

from imageio import _twisted_dispatch
from imageio.backends import _twisted_client, _twisted_newclient
from imageio.web import _twisted_http, _twisted_transport
from imageio.web._transport import ZeroCopyTCPServer, ZeroCopyUNIXServer

ROOT = Path(__file__).resolve().parent.parent

#: Private names used outside their seam's module while a seam is being
#: quarantined: file -> names. Empty: every seam has its module.
HTTP_SEAM_PENDING: dict[str, set[str]] = {}

#: Quarantine module -> the private names it owns.
QUARANTINE = {
    "imageio/web/_twisted_transport.py": {n for _, n in _twisted_transport.PRIVATE_NAMES},
    "imageio/backends/_twisted_client.py": {n for _, n in _twisted_client.PRIVATE_NAMES},
    "imageio/backends/_twisted_newclient.py": {n for _, n in _twisted_newclient.PRIVATE_NAMES},
    "imageio/web/_twisted_http.py": {n for _, n in _twisted_http.PRIVATE_NAMES},
    "imageio/_twisted_dispatch.py": {n for _, n in _twisted_dispatch.PRIVATE_NAMES},
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

    def test_nothingPending(self) -> None:
        """
        Every seam has its quarantine module: no private name is allowed
        anywhere else.
        """
        self.assertEqual(HTTP_SEAM_PENDING, {})

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


def _codeDigest(function: Any) -> str:
    """
    @return: A digest of C{function}'s code without its docstring.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                node.body = node.body[1:]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]


class _Descriptor:
    """
    A readable descriptor over a pipe that records the log context each
    call runs in, and may raise or return a reason from C{doRead}.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.systems: list[str] = []
        self.lost: list[Failure] = []
        self.outcome: BaseException | None = None
        self.raises = False

    def logPrefix(self) -> str:
        return "descriptor-prefix"

    def fileno(self) -> int:
        return self.fd

    def doRead(self) -> object:
        self.systems.append(context.get(log.ILogContext)["system"])
        if self.raises:
            raise RuntimeError("doRead bug")
        return self.outcome

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)


class _Lean(_Descriptor):
    """
    A descriptor of a class given to L{_twisted_dispatch.install}.
    """


class DispatchSeamTests(SynchronousTestCase):
    """
    L{imageio._twisted_dispatch} on a real epoll reactor (not the global
    one): our classes without a log context, errors handled as Twisted
    does, every other descriptor as before.
    """

    def setUp(self) -> None:
        self.reactor = EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.addCleanup(self.reactor.removeAll)

    def readable(self, kind: type[_Descriptor]) -> _Descriptor:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        os.write(w, b"x")
        descriptor = kind(r)
        self.reactor.addReader(descriptor)  # type: ignore[arg-type]
        # Before the pipe closes.
        self.addCleanup(self.reactor.removeReader, descriptor)  # type: ignore[arg-type]
        return descriptor

    def test_namesExist(self) -> None:
        """
        Every private name of the seam exists where the module says (on
        a reactor instance for the reactor's).
        """
        for owner, name in _twisted_dispatch.PRIVATE_NAMES:
            onReactor = owner.endswith(("EPollReactor", "ReactorBase"))
            where = self.reactor if onReactor else namedAny(owner)
            self.assertTrue(hasattr(where, name), f"{owner}.{name} is gone")

    def test_twistedCodeUnchanged(self) -> None:
        """
        The seam copies C{EPollReactor.doPoll} and the read and write calls
        of C{_doReadOrWrite}: if Twisted changes either, read the seam again
        and update the digests.
        """
        self.assertEqual(_codeDigest(EPollReactor.doPoll), "9e3ff408889e1e7e")
        self.assertEqual(_codeDigest(EPollReactor._doReadOrWrite), "c849c38c21363b92")
        self.assertEqual(EPollReactor.doIteration, EPollReactor.doPoll)
        self.assertEqual(_codeDigest(ReactorBase.mainLoop), "04b357d96f77b92c")
        # Twisted 26 (a faster handler for timed call errors, an annotation
        # spelled anew) and 24.7, the oldest supported: the lean loop reads
        # the same state in both.
        self.assertIn(
            _codeDigest(ReactorBase.runUntilCurrent), {"127dd902affe5d40", "87c4634a83f81ba5"}
        )
        self.assertIn(_codeDigest(ReactorBase.timeout), {"88f4985f484b89e0", "e5a1bf313dfe6f11"})
        self.assertEqual(_codeDigest(ReactorBase.crash), "85bb69adfebc08ba")
        self.assertIs(EPollReactor.mainLoop, ReactorBase.mainLoop)

    def test_leanWithoutContext(self) -> None:
        """
        A descriptor of a lean class is read without a log context of its
        own; any other still runs under its prefix.
        """
        self.assertTrue(_twisted_dispatch.install(self.reactor, [_Lean]))
        lean, other = self.readable(_Lean), self.readable(_Descriptor)
        self.reactor.doIteration(0)
        self.assertEqual(lean.systems, ["-"])
        self.assertEqual(other.systems, ["descriptor-prefix"])
        _twisted_dispatch.uninstall(self.reactor)
        self.reactor.doIteration(0)
        self.assertEqual(lean.systems, ["-", "descriptor-prefix"])

    def test_wakerLean(self) -> None:
        """
        L{_twisted_dispatch.wakerClasses} names the class of the reactor's
        waker; installed, a wake-up (each C{callFromThread}) is read
        without a log context, and the call runs.
        """
        classes = _twisted_dispatch.wakerClasses(self.reactor)
        self.assertEqual(classes, (type(self.reactor.waker),))
        self.assertEqual(_twisted_dispatch.wakerClasses(object()), ())
        self.assertTrue(_twisted_dispatch.install(self.reactor, classes))
        logged: list[object] = []
        original = log.callWithLogger

        def callWithLogger(logger: object, *args: Any, **kwargs: Any) -> Any:
            logged.append(logger)
            return original(logger, *args, **kwargs)

        self.patch(log, "callWithLogger", callWithLogger)
        # Again, now that callWithLogger is patched.
        _twisted_dispatch.install(self.reactor, classes)
        called: list[int] = []
        self.reactor.callFromThread(called.append, 1)
        self.reactor.wakeUp()
        self.reactor.doIteration(0)
        self.reactor.runUntilCurrent()
        self.assertEqual(called, [1])
        self.assertNotIn(self.reactor.waker, logged)

    def test_errorLoggedAndDisconnected(self) -> None:
        """
        An exception from a lean descriptor's C{doRead} is logged under its
        prefix and the descriptor is disconnected with it, as Twisted does.
        """
        _twisted_dispatch.install(self.reactor, [_Lean])
        lean = self.readable(_Lean)
        lean.raises = True
        events: list[dict[str, Any]] = []
        log.addObserver(events.append)
        self.addCleanup(log.removeObserver, events.append)
        self.reactor.doIteration(0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([e["system"] for e in events if e.get("isError")], ["descriptor-prefix"])
        [reason] = lean.lost
        self.assertIsInstance(reason.value, RuntimeError)
        self.assertNotIn(lean, self.reactor.getReaders())

    def test_reasonDisconnects(self) -> None:
        """
        A lean descriptor whose C{doRead} returns a reason is disconnected
        with it.
        """
        _twisted_dispatch.install(self.reactor, [_Lean])
        lean = self.readable(_Lean)
        lean.outcome = ConnectionDone()
        self.reactor.doIteration(0)
        [reason] = lean.lost
        self.assertIsInstance(reason.value, ConnectionDone)
        self.assertNotIn(lean, self.reactor.getReaders())

    def test_afterPoll(self) -> None:
        """
        The C{afterPoll} functions run, in order, after a poll that
        dispatched something (after every descriptor's C{doRead}), and not
        after one that found nothing; one that raises is logged as the main
        loop logs its errors, and the next still runs.
        """
        calls: list[object] = []

        def broken() -> None:
            calls.append("broken")
            raise RuntimeError("after")

        def reads() -> None:
            calls.append(len(lean.systems) + len(other.systems))

        _twisted_dispatch.install(self.reactor, [_Lean], [reads, broken, lambda: calls.append(3)])
        self.reactor.doIteration(0)
        self.assertEqual(calls, [])
        lean = self.readable(_Lean)
        other = self.readable(_Descriptor)
        self.reactor.doIteration(0)
        self.assertEqual(calls, [2, "broken", 3])
        [failure] = self.flushLoggedErrors(RuntimeError)
        self.assertEqual(str(failure.value), "after")
        self.assertIn(lean, self.reactor.getReaders())

    def test_otherReactors(self) -> None:
        """
        Any reactor but Twisted's epoll reactor is left alone.
        """
        for other in (MemoryReactor(), SelectReactor()):
            self.assertFalse(_twisted_dispatch.install(other, [_Lean]))
            self.assertNotIn("doIteration", vars(other))
            _twisted_dispatch.uninstall(other)


class _Busy(_Lean):
    """
    A lean descriptor that is always readable (its byte is never read),
    and calls C{then} with the number of reads so far after each.
    """

    then: Any = None
    reads = 0

    def doRead(self) -> object:
        self.reads += 1
        if self.then is not None:
            self.then(self.reads)
        return None


class LeanLoopTests(SynchronousTestCase):
    """
    The lean main loop of L{imageio._twisted_dispatch} on a real epoll
    reactor (not the global one), run until it stops.
    """

    def setUp(self) -> None:
        self.reactor = EPollReactor()
        self.addCleanup(self.reactor._poller.close)
        self.addCleanup(self.reactor.removeAll)
        self.assertTrue(_twisted_dispatch.install(self.reactor, [_Busy]))
        self.turns = 0
        runUntilCurrent = self.reactor.runUntilCurrent

        def counting() -> None:
            self.turns += 1
            runUntilCurrent()

        vars(self.reactor)["runUntilCurrent"] = counting
        # Nothing may hang the test run: stop the reactor from a thread
        # after a while whatever happens (a thread call is what the loop
        # must never starve).
        failsafe = threading.Timer(30, self.reactor.callFromThread, [self.reactor.crash])
        failsafe.start()
        self.addCleanup(failsafe.cancel)

    def busy(self) -> _Busy:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        os.write(w, b"x")
        busy = _Busy(r)
        self.reactor.addReader(busy)  # type: ignore[arg-type]
        return busy

    def runReactor(self) -> None:
        self.reactor.run(installSignalHandlers=False)

    def test_leanTurns(self) -> None:
        """
        While nothing is due, turns only poll: C{runUntilCurrent} runs
        once as the loop starts and once for the stop, not per event.
        """
        busy = self.busy()
        busy.then = lambda reads: reads == 100 and self.reactor.stop()
        self.runReactor()
        self.assertEqual(busy.reads, 100)
        self.assertLessEqual(self.turns, 4)

    def test_uninstalled(self) -> None:
        """
        Once uninstalled, a running lean loop goes on with Twisted's turns.
        """
        busy = self.busy()

        def then(reads: int) -> None:
            if reads == 10:
                _twisted_dispatch.uninstall(self.reactor)
                self.before = self.turns
            elif reads == 30:
                self.reactor.stop()

        busy.then = then
        self.runReactor()
        self.assertGreaterEqual(self.turns - self.before, 20)

    def test_timedCallsInOrder(self) -> None:
        """
        A timed call made in a turn runs before the next poll, as in
        Twisted's loop; one that comes due while descriptors stay busy
        runs too.
        """
        busy = self.busy()
        ran: list[int] = []

        def then(reads: int) -> None:
            if reads == 3:
                self.reactor.callLater(0, lambda: ran.append(busy.reads))

        busy.then = then
        self.reactor.callLater(0.05, self.reactor.stop)
        self.runReactor()
        self.assertEqual(ran, [3])
        self.assertGreater(busy.reads, 3)

    def test_threadCalls(self) -> None:
        """
        A call from another thread runs while the loop waits without
        timed calls.
        """
        ran: list[bool] = []

        def fromThread() -> None:
            ran.append(threading.current_thread() is threading.main_thread())
            self.reactor.stop()

        threading.Timer(0.05, self.reactor.callFromThread, [fromThread]).start()
        self.runReactor()
        self.assertEqual(ran, [True])

    def test_errorInTurn(self) -> None:
        """
        An exception in a lean turn is logged as Twisted's main loop logs
        one, and the loop goes on.
        """
        busy = self.busy()
        seconds = self.reactor.seconds
        raised: list[bool] = []

        def failOnce() -> float:
            if not raised:
                raised.append(True)
                raise RuntimeError("clock bug")
            return seconds()

        busy.then = lambda reads: reads == 20 and self.reactor.stop()
        # A pending timed call makes lean turns ask the time.
        self.reactor.callLater(60, lambda: None)
        self.reactor.seconds = failOnce  # type: ignore[method-assign]
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.runReactor()
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(busy.reads, 20)
        [failure] = [e for e in events if "log_failure" in e]
        self.assertEqual(failure["log_namespace"], "twisted.internet.base")
        self.assertEqual(failure["log_format"], "Unexpected error in main loop")


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


class NewClientSeamTests(SynchronousTestCase):
    """
    The HTTP/1.1 client protocol L{imageio.backends._twisted_newclient}
    takes from C{twisted.web._newclient}, as L{imageio.client._connect}
    uses it.
    """

    def test_sameAsTwistedWebClient(self) -> None:
        """
        Every name is the class C{twisted.web.client} exports under it, so
        failures compare the same either way.
        """
        for name in _twisted_newclient.__all__:
            self.assertIs(getattr(_twisted_newclient, name), getattr(client, name), name)
        for owner, name in _twisted_newclient.PRIVATE_NAMES:
            self.assertTrue(hasattr(namedAny(owner), name), f"{owner}.{name} is gone")

    def test_signatures(self) -> None:
        """
        The protocol takes a quiescent callback, a request can be
        persistent.
        """
        self.assertEqual(
            list(inspect.signature(_twisted_newclient.HTTP11ClientProtocol.__init__).parameters),
            ["self", "quiescentCallback"],
        )
        self.assertEqual(
            list(inspect.signature(_twisted_newclient.Request.__init__).parameters),
            ["self", "method", "uri", "headers", "bodyProducer", "persistent"],
        )

    def test_quiescentState(self) -> None:
        """
        A new protocol is C{QUIESCENT} (the pool reuses connections in that
        state) and refuses a request in any other state.
        """
        protocol = _twisted_newclient.HTTP11ClientProtocol()
        self.assertEqual(protocol.state, "QUIESCENT")
        protocol.makeConnection(StringTransport())
        headers = client.Headers({b"host": [b"localhost"]})
        request = _twisted_newclient.Request(b"GET", b"/", headers, None, True)
        protocol.request(request)
        self.assertEqual(protocol.state, "WAITING")
        failure = self.failureResultOf(protocol.request(request))
        failure.trap(_twisted_newclient.RequestNotSent)


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


class _Request(http.Request):
    """
    A request that is never answered unless the test says so; its body
    chunks are recorded.
    """

    def __init__(self, channel: http.HTTPChannel, queued: object = None) -> None:
        super().__init__(channel)
        self.chunks: list[bytes] = []

    def handleContentChunk(self, data: bytes) -> None:
        self.chunks.append(data)

    def process(self) -> None:
        pass


def _channel(cls: type[_twisted_http.HTTPChannelSeam] = _twisted_http.HTTPChannelSeam) -> Any:
    clock = Clock()
    channel: Any = cls()
    channel.requestFactory = _Request
    channel.callLater = clock.callLater
    channel.clock = clock
    channel.makeConnection(StringTransport())
    return channel


def _put(length: int, path: bytes = b"/x?y", extra: bytes = b"") -> bytes:
    return b"PUT %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n" % (
        path,
        length,
        extra,
    )


class HTTPSeamTests(SynchronousTestCase):
    """
    The C{HTTPChannel}, C{Request} and C{_IdentityTransferDecoder}
    internals L{imageio.web._twisted_http} uses.
    """

    def test_classNamesExist(self) -> None:
        """
        The private names Twisted defines on its classes are there.
        """
        for owner, name in _twisted_http.PRIVATE_NAMES:
            if name in {
                "_command",
                "_path",
                "_version",
                "_handlingRequest",
                "_transferDecoder",
                "_dataBuffer",
                "_networkProducer",
            }:
                # Set on instances; pinned by the tests below.
                continue
            self.assertTrue(hasattr(namedAny(owner), name), f"{owner}.{name} is gone")
        # What IdentityBody relies on: a chunk before the last is counted
        # off contentLength; the last ends the body through finishCallback
        # and clears dataCallback.
        data: list[bytes] = []
        finished: list[bytes] = []
        decoder = http._IdentityTransferDecoder(5, data.append, finished.append)
        decoder.dataReceived(b"ab")
        self.assertEqual((decoder.contentLength, data, finished), (3, [b"ab"], []))
        decoder.contentLength -= 2
        decoder.dataReceived(b"eNEXT")
        self.assertEqual((data, finished), ([b"ab", b"e"], [b"NEXT"]))
        self.assertIsNone(decoder.dataCallback)
        self.assertEqual(decoder.contentLength, 0)

    def test_requestLine(self) -> None:
        """
        The request line is readable from the request line until the body
        is complete (C{_HTTPChannel__first_line}, C{_command}, C{_path},
        C{_version}).
        """
        channel = _channel()
        self.assertTrue(channel.readingRequestLine)
        self.assertIsNone(channel.requestLine())
        channel.dataReceived(b"PUT /x?y HTT")
        self.assertTrue(channel.readingRequestLine)
        channel.dataReceived(b"P/1.1\r\nHost: x\r\n")
        self.assertFalse(channel.readingRequestLine)
        self.assertEqual(channel.requestLine(), (b"PUT", b"/x?y", b"HTTP/1.1"))
        channel.dataReceived(b"Content-Length: 2\r\n\r\na")
        self.assertEqual(channel.requestLine(), (b"PUT", b"/x?y", b"HTTP/1.1"))
        channel.dataReceived(b"b")
        self.assertIsNone(channel.requestLine())
        self.assertTrue(channel.readingRequestLine)

    def test_handlingRequest(self) -> None:
        """
        C{handlingRequest} (C{_handlingRequest}) is true from a complete
        request until it is answered.
        """
        channel = _channel()
        channel.dataReceived(_put(1))
        self.assertFalse(channel.handlingRequest)
        channel.dataReceived(b"x")
        self.assertTrue(channel.handlingRequest)
        channel.requests[-1].finish()
        self.assertFalse(channel.handlingRequest)

    def test_requestDoneAsTwisted(self) -> None:
        """
        C{HTTPChannelSeam.requestDone} leaves the channel, its transport
        and the next requests as Twisted's C{requestDone} does: nothing
        buffered, pipelined requests buffered meanwhile (parsed then), a
        transport paused by them (resumed), HTTP/1.0 (closed), a request
        that is not the first (refused).
        """

        class TwistedDone(_twisted_http.HTTPChannelSeam):
            requestDone = http.HTTPChannel.requestDone

        get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
        # More than Twisted buffers before it pauses the transport (16 KiB).
        large = b"GET /b HTTP/1.1\r\nX-Pad: %s\r\n\r\n" % (b"p" * 4000,) * 6
        cases = [
            [get],
            [get + get + get],
            [get, large],
            [b"GET /a HTTP/1.0\r\n\r\n"],
        ]
        for sends in cases:
            outcomes = []
            for cls in (_twisted_http.HTTPChannelSeam, TwistedDone):
                channel = _channel(cls)
                for data in sends:
                    channel.dataReceived(data)
                states = []
                while len(states) < 10 and channel.requests and not channel.requests[0].finished:
                    channel.requests[0].finish()
                    transport = channel.transport
                    states.append(
                        (
                            transport.value(),
                            len(channel.requests),
                            channel.line_mode,
                            channel.persistent,
                            channel.handlingRequest,
                            transport.disconnecting,
                            transport.producerState,
                        )
                    )
                outcomes.append(states)
            self.assertEqual(outcomes[0], outcomes[1], sends)
            self.assertTrue(outcomes[0])
        for cls in (_twisted_http.HTTPChannelSeam, TwistedDone):
            channel = _channel(cls)
            channel.dataReceived(get)
            self.assertRaises(TypeError, channel.requestDone, _Request(channel))
            self.assertEqual(len(channel.requests), 1)
        live = _channel()
        self.assertEqual(live._dataBuffer, [])
        self.assertIs(live._networkProducer, live.transport)
        # The seam copies these: if Twisted changes them, read it again.
        self.assertEqual(_codeDigest(http.HTTPChannel.requestDone), "883a6b3682f6709b")
        self.assertEqual(_codeDigest(basic.LineReceiver.setLineMode), "2b377c1e4683eb4d")

    def test_setIdleTimeout(self) -> None:
        """
        While a request is answered the new timeout is saved
        (C{_savedTimeOut}) and takes effect when it completes; when idle,
        at once.
        """
        channel = _channel()
        channel.setIdleTimeout(5)
        self.assertEqual(channel.timeOut, 5)
        channel.dataReceived(_put(1) + b"x")
        self.assertIsNone(channel.timeOut)
        channel.setIdleTimeout(7)
        self.assertIsNone(channel.timeOut)
        channel.requests[-1].finish()
        self.assertEqual(channel.timeOut, 7)

    def test_abortLater(self) -> None:
        """
        C{abortLater} schedules one abort (C{_abortingCall}) after
        C{abortTimeout}.
        """
        channel = _channel()
        channel.abortLater()
        channel.abortLater()
        self.assertEqual(len(channel.clock.getDelayedCalls()), 1)
        channel.clock.advance(channel.abortTimeout)
        self.assertTrue(channel.transport.disconnecting)

    def test_send100ContinueHook(self) -> None:
        """
        Twisted's automatic C{100 Continue} (C{_send100Continue}) asks
        C{send100Continue}.
        """
        for send in (True, False):

            class Channel(_twisted_http.HTTPChannelSeam):
                answer = send

                def send100Continue(self) -> bool:
                    return self.answer

            channel = _channel(Channel)
            channel.dataReceived(_put(5, extra=b"Expect: 100-continue\r\n"))
            self.assertEqual(b"100 Continue" in channel.transport.value(), send)

    def test_badRequestHook(self) -> None:
        """
        Twisted's own 400 (C{_respondToBadRequestAndDisconnect}) calls
        C{badRequest}; by default Twisted answers.
        """
        refused: list[bool] = []

        class Channel(_twisted_http.HTTPChannelSeam):
            def badRequest(self) -> None:
                refused.append(True)

        channel = _channel(Channel)
        channel.dataReceived(b"PUT /x HTTP/1.1\r\nContent-Length: x\r\n\r\n")
        self.assertEqual(refused, [True])
        channel = _channel()
        channel.dataReceived(b"PUT /x HTTP/1.1\r\nContent-Length: x\r\n\r\n")
        self.assertTrue(channel.transport.value().startswith(b"HTTP/1.1 400 "))

    def test_headReady(self) -> None:
        """
        C{headReady} (C{_HTTPChannel__first_line}, C{_handlingRequest},
        C{LineReceiver._busyReceiving}) is true only between requests and
        outside the line parser's loop; C{takeLineBuffer} takes back an
        incomplete request line.
        """
        seen: list[bool] = []

        class Channel(_twisted_http.HTTPChannelSeam):
            def lineReceived(self, line: bytes) -> None:
                seen.append(self.headReady())
                super().lineReceived(line)

        channel = _channel(Channel)
        self.assertTrue(channel.headReady())
        channel.dataReceived(b"PUT /x HT")
        self.assertTrue(channel.headReady())
        self.assertEqual(channel.takeLineBuffer(), b"PUT /x HT")
        channel.dataReceived(_put(1))
        self.assertEqual(seen, [False, False, False, False])
        self.assertFalse(channel.headReady())
        channel.dataReceived(b"x")
        self.assertFalse(channel.headReady())
        channel.requests[-1].finish()
        self.assertTrue(channel.headReady())

    def test_beginRequest(self) -> None:
        """
        C{beginRequest} leaves the channel and request as Twisted's line
        parser leaves them before C{allHeadersReceived}.
        """
        states = []

        class Channel(_twisted_http.HTTPChannelSeam):
            def allHeadersReceived(self) -> None:
                [request] = self.requests
                states.append(
                    (
                        self.readingRequestLine,
                        self.requestLine(),
                        list(request.requestHeaders.getAllRawHeaders()),
                        self.length,
                    )
                )
                super().allHeadersReceived()

        for fast in (True, False):
            channel = _channel(Channel)
            if fast:
                channel.beginRequest(b"GET", b"/x?y", b"HTTP/1.1", {b"Host": [b"a", b"b"]})
                channel.allHeadersReceived()
                channel.allContentReceived()
            else:
                channel.dataReceived(b"GET /x?y HTTP/1.1\r\nhost: a\r\nHost: b\r\n\r\n")
            [request] = channel.requests
            self.assertEqual((request.method, request.uri), (b"GET", b"/x?y"))
        self.assertEqual(len(states), 2)
        self.assertEqual(states[0], states[1])

    def test_requestGone(self) -> None:
        """
        C{requestGone} (C{Request._disconnected}) tells that the client left.
        """
        channel = _channel()
        channel.dataReceived(_put(1) + b"x")
        request = channel.requests[-1]
        self.assertFalse(_twisted_http.requestGone(request))
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(_twisted_http.requestGone(request))


class HeaderSeamTests(SynchronousTestCase):
    """
    L{_twisted_http.setSafeHeaders} and L{_twisted_http.hasAnyHeader}
    (C{Headers._rawHeaders}) agree with C{Headers}' public methods.
    """

    def test_setSafeHeadersAsSetRawHeaders(self) -> None:
        """
        Headers set by canonical name read back through C{getRawHeaders}
        under any spelling, and compare equal to the same headers set
        through C{setRawHeaders}, in the same order.
        """
        names = [b"Content-Length", b"Content-Range", b"Accept-Ranges", b"Server", b"Date"]
        fast, slow = Headers(), Headers()
        fast.setRawHeaders(b"x-first", [b"1"])
        slow.setRawHeaders(b"x-first", [b"1"])
        _twisted_http.setSafeHeaders(fast, {name: [b"v%d" % i] for i, name in enumerate(names)})
        for i, name in enumerate(names):
            slow.setRawHeaders(name.lower(), [b"v%d" % i])
            self.assertEqual(fast.getRawHeaders(name.upper()), [b"v%d" % i])
        self.assertEqual(fast, slow)
        self.assertEqual(list(fast.getAllRawHeaders()), list(slow.getAllRawHeaders()))

    def test_rawHeaderItems(self) -> None:
        """
        C{rawHeaderItems} gives what C{getAllRawHeaders} gives, in order.
        """
        headers = Headers()
        headers.setRawHeaders(b"x-first", [b"1", b"2"])
        headers.addRawHeader(b"content-length", b"5")
        _twisted_http.setSafeHeaders(headers, {b"Server": [b"s"]})
        self.assertEqual(
            list(_twisted_http.rawHeaderItems(headers)), list(headers.getAllRawHeaders())
        )
        self.assertEqual(len(list(_twisted_http.rawHeaderItems(headers))), 3)

    def test_hasAnyHeader(self) -> None:
        """
        Header names received in any case are found by their canonical
        spelling.
        """
        headers = Headers()
        names = frozenset({b"Origin", b"Access-Control-Request-Method"})
        self.assertFalse(_twisted_http.hasAnyHeader(headers, names))
        headers.addRawHeader(b"host", b"x")
        self.assertFalse(_twisted_http.hasAnyHeader(headers, names))
        headers.addRawHeader(b"ACCESS-control-request-METHOD", b"GET")
        self.assertTrue(_twisted_http.hasAnyHeader(headers, names))


class IdentityBodyTests(SynchronousTestCase):
    """
    L{_twisted_http.IdentityBody}: bytes read around Twisted's decoder
    (C{_transferDecoder}, C{_IdentityTransferDecoder.contentLength}), with
    the framing still Twisted's.
    """

    def test_onlyContentLengthBodies(self) -> None:
        """
        There is an identity body while a Content-Length body is arriving;
        not before the headers end, for a chunked body, or once the body
        ended.
        """
        channel = _channel()
        self.assertIsNone(channel.identityBody())
        channel.dataReceived(_put(3))
        body = channel.identityBody()
        self.assertEqual((body.remaining(), body.readable()), (3, 2))
        channel.dataReceived(b"abc")
        self.assertIsNone(channel.identityBody())
        self.assertEqual((body.remaining(), body.readable()), (0, 0))
        channel = _channel()
        channel.dataReceived(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.assertIsNone(channel.identityBody())

    def test_consumedThenDecoderEnds(self) -> None:
        """
        Bytes read directly are counted off the body; the rest, the last
        byte at least, goes through the decoder, which ends the body and
        parses the request pipelined behind it.
        """
        channel = _channel()
        channel.dataReceived(_put(10))
        body = channel.identityBody()
        body.consumed(4)
        self.assertEqual(body.remaining(), 6)
        body.consumed(5)
        self.assertEqual((body.remaining(), body.readable()), (1, 0))
        first = channel.requests[-1]
        self.assertEqual(first.chunks, [])
        channel.dataReceived(b"Z" + _put(2, b"/next") + b"ok")
        self.assertEqual(first.chunks, [b"Z"])
        self.assertEqual(first.method, b"PUT")
        first.finish()
        second = channel.requests[-1]
        self.assertEqual((second.method, second.uri, second.chunks), (b"PUT", b"/next", [b"ok"]))

    def test_consumedTooMuch(self) -> None:
        """
        Taking more than all but the last byte is refused and changes
        nothing: the decoder keeps the end of the body.
        """
        channel = _channel()
        channel.dataReceived(_put(10))
        body = channel.identityBody()
        self.assertRaises(ValueError, body.consumed, 10)
        self.assertRaises(ValueError, body.consumed, -1)
        self.assertEqual(body.remaining(), 10)

    def test_bodyNeverParsedAsRequest(self) -> None:
        """
        A body that looks like requests, read partly directly and partly
        through the decoder, is body: only the requests after it are
        parsed, each exactly once.
        """
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        payload = smuggled * 3
        channel = _channel()
        channel.dataReceived(_put(len(payload)))
        body = channel.identityBody()
        body.consumed(len(smuggled) + 5)
        rest = payload[len(smuggled) + 5 :]
        channel.dataReceived(rest + b"GET /real HTTP/1.1\r\nHost: x\r\n\r\n")
        first = channel.requests[-1]
        self.assertEqual(b"".join(first.chunks), rest)
        first.finish()
        [second] = channel.requests
        self.assertEqual((second.method, second.uri), (b"GET", b"/real"))
        second.finish()
        self.assertEqual(channel.requests, [])
