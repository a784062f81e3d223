# -*- test-case-name: tests.test_splice -*-
"""
Tests for L{imageio.web._splice}: downloads moved file -> pipe -> socket
with C{splice(2)}.

Unit tests drive L{SpliceProducer} with a fake backend writing into the
real pipe, a fake transport over a real socket pair and a L{Clock}; the
integration tests use the service built as in production, real files and
the local UNIX socket.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path
from typing import Any

from attrs import define, field
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from imageio.interfaces import IBackend, IDirectWriter, IDirectWriteTransport, ISpliceSource
from imageio.tickets import Operation, OperationCanceled
from imageio.web import _splice
from imageio.web._download import DownloadProducer, ReaderStalled, TruncatedImage
from imageio.web._splice import SpliceProducer, SpliceRefused
from imageio.web._transport import ZeroCopyTCPServer, ZeroCopyUNIXServer
from tests._daemon import fdCount
from tests._http import FakeChannel, FakeRequest
from tests.test_integration_images import SIZE, _ServiceTestCase, _UnixHTTPConnection

KiB = 1024
MiB = 1024 * KiB
PIPE = 64 * KiB


@implementer(IBackend, ISpliceSource)
@define(eq=False)
class SpliceBackend:
    """
    An image in memory whose C{spliceInto} writes into the real pipe.

    @ivar hold: Keep C{spliceInto} calls pending in L{held} until released.
    """

    image: bytes
    spliceAlignment: int | None = 512
    hold: bool = False
    held: list[tuple[Deferred[int], int, int, int]] = field(factory=list)
    filled: int = 0
    calls: int = 0
    fail: Exception | None = None
    name: str = "fake"
    blockSize: int = 512
    maxReaders: int = 1
    maxWriters: int = 1

    def spliceInto(self, offset: int, length: int, pipe: int) -> Deferred[int]:
        self.calls += 1
        if self.fail is not None:
            return fail(self.fail)
        if self.hold:
            d: Deferred[int] = Deferred()
            self.held.append((d, offset, length, pipe))
            return d
        try:
            return succeed(self._splice(offset, length, pipe))
        except Exception:
            return fail()

    def release(self) -> None:
        held, self.held = self.held, []
        for d, offset, length, pipe in held:
            try:
                n = self._splice(offset, length, pipe)
            except Exception:
                d.errback(Failure())
            else:
                d.callback(n)

    def _splice(self, offset: int, length: int, pipe: int) -> int:
        data = self.image[offset : offset + length]
        if not data:
            raise EOFError(f"ends at {offset}")
        try:
            n = os.write(pipe, data)
        except BlockingIOError:
            return 0
        self.filled += n
        return n

    def readInto(self, offset: int, buf: memoryview) -> Deferred[int]:
        data = self.image[offset : offset + len(buf)]
        buf[: len(data)] = data
        return succeed(len(data))

    def size(self) -> Deferred[int]:
        return succeed(len(self.image))

    def write(self, offset: int, data: memoryview) -> Deferred[int]:
        raise NotImplementedError()

    def zero(self, offset: int, length: int) -> Deferred[None]:
        raise NotImplementedError()

    def flush(self) -> Deferred[None]:
        raise NotImplementedError()

    def extents(self, context: str, start: int, length: int) -> Deferred[list[Any]]:
        raise NotImplementedError()

    def close(self) -> Deferred[None]:
        return succeed(None)


@implementer(IDirectWriteTransport)
class SocketTransport:
    """
    The direct-write part of a socket transport over one end of a real
    socket pair: L{writable} is the reactor's write pass.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.writer: Any = None
        self.watching = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        # Heads and edges are small: the socket takes them.
        self.sock.sendall(data)

    def setDirectWriter(self, writer: Any) -> None:
        self.writer = writer

    def directWriteReady(self) -> None:
        if self.writer is not None:
            self.watching = self.writer.sendTo(self.sock.fileno())

    def writable(self) -> None:
        if self.watching and self.writer is not None:
            self.watching = self.writer.sendTo(self.sock.fileno())

    def abortConnection(self) -> None:
        self.aborted = True

    def getHandle(self) -> socket.socket:
        return self.sock


@define
class SocketRequest(FakeRequest):
    """
    The request a L{SpliceProducer} writes to: writes go to the transport,
    as Twisted's do, and count in L{sentLength}, as the producer's spliced
    bytes do.
    """

    sentLength: int = 0

    def write(self, data: bytes) -> None:
        self.startedWriting = True
        self.sentLength += len(data)
        if data:
            self.channel.transport.write(data)


class SpliceProducerTests(SynchronousTestCase):
    """
    The producer's state machine, with a real pipe and socket pair.
    """

    def setUp(self) -> None:
        self.image = os.urandom(300 * KiB + 77)
        self.backend = SpliceBackend(self.image)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        a.setblocking(False)
        b.setblocking(False)
        self.peer = b
        self.transport = SocketTransport(a)
        self.request = SocketRequest(FakeChannel(self.transport))
        self.clock = Clock()
        self.op = Operation("read", 0)
        self.fds = fdCount()
        self.patch(_splice, "_usable", True)
        # Small socket buffers, so that the socket fills in these tests.
        self.patch(_splice, "SEND_BUFFER", 0)

    def producer(
        self, offset: int = 0, length: int | None = None, idleTimeout: float | None = None
    ) -> SpliceProducer:
        self.op.offset = offset
        return SpliceProducer(
            self.request,  # type: ignore[arg-type]
            self.backend,
            offset,
            len(self.image) - offset if length is None else length,
            self.op,
            self.clock,
            idleTimeout=idleTimeout,
            size=PIPE,
        )

    def receive(self, limit: int | None = None) -> bytes:
        """
        Read what the peer can, letting the transport write as the socket
        drains, up to C{limit} bytes.
        """
        got = []
        total = 0
        while limit is None or total < limit:
            self.transport.writable()
            self.clock.advance(0)
            try:
                data = self.peer.recv(min(256 * KiB, (limit or 2**30) - total))
            except BlockingIOError:
                if not self.transport.watching:
                    break
                continue
            if not data:
                break
            got.append(data)
            total += len(data)
        return b"".join(got)

    def test_interface(self) -> None:
        """
        The producer is a direct writer.
        """
        self.assertTrue(verifyObject(IDirectWriter, self.producer()))
        self.assertTrue(IDirectWriteTransport.implementedBy(ZeroCopyUNIXServer))
        self.assertTrue(IDirectWriteTransport.implementedBy(ZeroCopyTCPServer))

    def test_whole(self) -> None:
        """
        An aligned start and an unaligned end: the pipe's bytes, then the
        tail, all accounted; the pipe is closed at the end.
        """
        producer = self.producer()
        done = producer.start()
        body = self.receive()
        self.assertEqual(body, self.image)
        self.successResultOf(done)
        self.assertTrue(self.request.finished)
        self.assertIsNone(self.request.producer)
        self.assertEqual(self.op.done, len(self.image))
        self.assertEqual(self.request.sentLength, len(self.image))
        self.assertEqual(self.backend.filled, len(self.image) // 512 * 512)
        self.assertIsNone(self.transport.writer)
        self.assertEqual(fdCount(), self.fds)

    def test_sendBuffer(self) -> None:
        """
        The socket's send buffer is raised towards a pipe's worth, so one
        wake-up moves more than the default 200 KiB (as far as the kernel
        lets this process).
        """
        self.patch(_splice, "SEND_BUFFER", _splice.PIPE_SIZE)
        sock = self.transport.sock
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * KiB)
        before = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        self.producer().start()
        self.assertGreater(sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF), before)

    def test_unalignedEdges(self) -> None:
        """
        An unaligned head is written before the pipe's bytes, an unaligned
        tail after them.
        """
        done = self.producer(1000, 200 * KiB + 3).start()
        body = self.receive()
        self.assertEqual(body, self.image[1000 : 1000 + 200 * KiB + 3])
        self.successResultOf(done)
        self.assertEqual(self.op.done, 200 * KiB + 3)
        self.assertEqual(self.request.sentLength, 200 * KiB + 3)

    def test_headBeforePipe(self) -> None:
        """
        Nothing is written until the first fill succeeded; then the head
        bytes are on the socket before any spliced byte.
        """
        self.backend.hold = True
        self.producer(100, 100 * KiB).start()
        self.assertFalse(self.request.startedWriting)
        self.backend.release()
        self.assertTrue(self.request.startedWriting)
        self.assertEqual(self.peer.recv(412 + 10), self.image[100 : 100 + 422])

    def test_slowReaderBounded(self) -> None:
        """
        A reader that takes nothing: the pipe fills, the socket buffer
        fills, then no more is read from storage however often the
        transport is writable.
        """
        self.image = os.urandom(8 * MiB)
        self.backend = SpliceBackend(self.image)
        done = self.producer().start()
        for _ in range(50):
            self.transport.writable()
            self.clock.advance(0)
        calls, filled = self.backend.calls, self.backend.filled
        for _ in range(50):
            self.transport.writable()
            self.clock.advance(0)
        self.assertEqual((self.backend.calls, self.backend.filled), (calls, filled))
        self.assertTrue(self.transport.watching)
        self.assertLessEqual(filled - self.op.done, PIPE)
        self.assertLess(filled, len(self.image) // 4)
        self.assertNoResult(done)
        # Reading again, the rest comes.
        self.assertEqual(self.receive(), self.image)
        self.successResultOf(done)

    def test_cancelWhileFilling(self) -> None:
        """
        Canceled while the pool fills the pipe: done fails at once, the
        connection is cut, the pipe is closed only once the fill returned.
        """
        self.image = os.urandom(8 * MiB)
        self.backend = SpliceBackend(self.image)
        producer = self.producer()
        done = producer.start()
        self.receive(100 * KiB)
        self.backend.hold = True
        self.receive(100 * KiB)
        self.assertTrue(self.backend.held)
        producer.cancel(OperationCanceled("gone"))
        self.failureResultOf(done, OperationCanceled)
        self.assertTrue(self.transport.aborted)
        self.assertIsNone(self.transport.writer)
        self.assertEqual(fdCount(), self.fds + 2)
        self.backend.release()
        self.assertEqual(fdCount(), self.fds)

    def test_opCanceled(self) -> None:
        """
        A canceled operation stops the transfer at the next step.
        """
        done = self.producer().start()
        self.receive(64 * KiB)
        self.op.canceled = True
        self.receive()
        self.failureResultOf(done, OperationCanceled)
        self.assertEqual(fdCount(), self.fds)

    def test_clientGone(self) -> None:
        """
        The client disconnects midway: done fails, the pipe is closed.
        """
        done = self.producer().start()
        self.receive(100 * KiB)
        self.request.lose()
        self.failureResultOf(done, ConnectionError)
        self.assertFalse(self.transport.aborted)
        self.assertIsNone(self.transport.writer)
        self.assertEqual(fdCount(), self.fds)

    def test_socketError(self) -> None:
        """
        A socket error while splicing is the transport's to report.
        """
        producer = self.producer()
        producer.start()
        self.receive(10 * KiB)
        self.peer.close()
        with self.assertRaises(OSError):
            for _ in range(100):
                producer.sendTo(self.transport.sock.fileno())
                self.clock.advance(0)

    def test_stalled(self) -> None:
        """
        A reader that takes nothing for the inactivity timeout is cut.
        """
        self.image = os.urandom(8 * MiB)
        self.backend = SpliceBackend(self.image)
        done = self.producer(idleTimeout=30).start()
        for _ in range(10):
            self.transport.writable()
        self.clock.advance(29)
        self.assertNoResult(done)
        self.clock.advance(1)
        self.failureResultOf(done, ReaderStalled)
        self.assertTrue(self.transport.aborted)
        self.assertEqual(fdCount(), self.fds)

    def test_progressKeepsAlive(self) -> None:
        """
        A slow reader that keeps reading is not cut.
        """
        done = self.producer(idleTimeout=30).start()
        while not done.called:
            self.clock.advance(20)
            # A UNIX socket frees room a whole sent buffer at a time.
            self.receive(256 * KiB)
            self.transport.writable()
        self.successResultOf(done)

    def test_refused(self) -> None:
        """
        A kernel refusing to splice the file (EINVAL) before anything was
        written: L{SpliceRefused}, nothing written, no pipe left, splicing
        off for the process.
        """
        self.backend.fail = OSError(errno.EINVAL, "Invalid argument")
        done = self.producer().start()
        self.failureResultOf(done, SpliceRefused)
        self.assertFalse(self.request.startedWriting)
        self.assertFalse(self.transport.aborted)
        self.assertIsNone(self.request.producer)
        self.assertEqual(fdCount(), self.fds)
        self.assertFalse(_splice.spliceUsable())

    def test_smallPipe(self) -> None:
        """
        A pipe much smaller than asked (the kernel refused the size): the
        usual path, with nothing written and no pipe left.
        """

        def defaultPipe(size: int) -> tuple[int, int]:
            return os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

        self.patch(_splice, "openPipe", defaultPipe)
        producer = self.producer()
        producer.size = _splice.PIPE_SIZE
        done = producer.start()
        self.failureResultOf(done, SpliceRefused)
        self.assertFalse(self.request.startedWriting)
        self.assertEqual(self.backend.calls, 0)
        self.assertEqual(fdCount(), self.fds)
        self.assertTrue(_splice.spliceUsable())

    def test_truncated(self) -> None:
        """
        The image ends before the range: before the head, done fails with
        L{TruncatedImage} and nothing is written.
        """
        done = self.producer(0, len(self.image) + 10 * KiB).start()
        self.receive()
        self.backend.image = self.image[: 512 * 3]
        self.failureResultOf(done, TruncatedImage)
        self.assertEqual(fdCount(), self.fds)

    def test_truncatedBeforeHead(self) -> None:
        """
        An image shorter than the range from the first fill on: nothing
        written, so the handler can answer an error.
        """
        self.backend.image = b""
        done = self.producer(0, 100 * KiB).start()
        self.failureResultOf(done, TruncatedImage)
        self.assertFalse(self.request.startedWriting)
        self.assertEqual(fdCount(), self.fds)

    def test_applies(self) -> None:
        """
        Only direct sources, plain transports, and large ranges.
        """
        request: Any = self.request
        self.assertTrue(SpliceProducer.applies(request, self.backend, _splice.SPLICE_MIN))
        self.assertFalse(SpliceProducer.applies(request, self.backend, _splice.SPLICE_MIN - 1))
        self.assertFalse(SpliceProducer.applies(request, object(), _splice.SPLICE_MIN))
        self.backend.spliceAlignment = None
        self.assertFalse(SpliceProducer.applies(request, self.backend, _splice.SPLICE_MIN))
        self.backend.spliceAlignment = 512
        self.request.channel = FakeChannel(object())
        self.assertFalse(SpliceProducer.applies(request, self.backend, _splice.SPLICE_MIN))


class ProbeTests(SynchronousTestCase):
    """
    The kernel is asked once whether it splices into a socket.
    """

    def test_usable(self) -> None:
        self.patch(_splice, "_usable", None)
        self.assertTrue(_splice.spliceUsable())
        self.assertIs(_splice._usable, True)

    def test_daemonAsksAtStart(self) -> None:
        """
        The daemon asks the kernel while it is set up, before the reactor
        serves anything, so no download asks on the reactor thread; with
        C{[daemon] splice} off it never asks.
        """
        from imageio import config as _config
        from imageio.tap import ImageioService

        for enabled, expected in ((True, True), (False, None)):
            self.patch(_splice, "_usable", None)
            directory = Path(self.mktemp()).absolute()
            directory.mkdir()
            config = _config.loadDir(None, warn=False)
            config.daemon.splice = enabled
            config.local.socket = str(directory / "local.sock")
            config.remote.enable = False
            config.control.socket = str(directory / "control.sock")
            service = ImageioService(config, reactor, directory / "state")
            service._prepare()
            self.assertIs(_splice._usable, expected, enabled)

    def test_pipeSize(self) -> None:
        """
        The pipe gets the size asked for, or the kernel's default.
        """
        r, w = _splice.openPipe(256 * KiB)
        try:
            self.assertIn(_splice.pipeSize(w), (256 * KiB, 64 * KiB))
        finally:
            os.close(r)
            os.close(w)
        r, w = _splice.openPipe(2**40)
        try:
            self.assertGreater(_splice.pipeSize(w), 0)
        finally:
            os.close(r)
            os.close(w)


class _SpliceServiceCase(_ServiceTestCase):
    """
    The service with a read ticket for a real file; counts which producer
    each download used.
    """

    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.local = self.config.local.socket
        self.source = self.dir / "source.raw"
        self.data = os.urandom(SIZE)
        self.source.write_bytes(self.data)
        self.started: list[SpliceProducer] = []
        self.fallback: list[DownloadProducer] = []
        started = self.started
        fallback = self.fallback
        spliceStart = SpliceProducer.start
        downloadStart = DownloadProducer.start

        def countSplice(producer: SpliceProducer) -> Deferred[None]:
            started.append(producer)
            return spliceStart(producer)

        def countDownload(producer: DownloadProducer) -> Deferred[None]:
            fallback.append(producer)
            return downloadStart(producer)

        self.patch(SpliceProducer, "start", countSplice)
        self.patch(DownloadProducer, "start", countDownload)
        self.addTicket(self.source, ("read",))

    def get(
        self, headers: dict[str, str] | None = None, ticket: str = "t1"
    ) -> Deferred[tuple[int, bytes]]:
        path = self.local

        def client() -> tuple[int, bytes]:
            conn = _UnixHTTPConnection(path)
            try:
                conn.request("GET", f"/images/{ticket}", headers=headers or {})
                r = conn.getresponse()
                return r.status, r.read()
            finally:
                conn.close()

        return deferToThread(client)

    @inlineCallbacks
    def openFds(self) -> Any:
        """
        @return: How many fds the process has open once the daemon's pools
            and the test's threads run (after one small download).
        """
        status, _ = yield self.get({"Range": "bytes=0-4095"})
        self.assertEqual(status, 206)
        yield self.waitFor(lambda: not self.service.registry.get("t1").connections, "idle")
        del self.started[:], self.fallback[:]
        return fdCount()

    def rawGet(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
        sock.connect(self.local)
        sock.sendall(b"GET /images/t1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
        return sock

    @inlineCallbacks
    def waitFor(self, predicate: Any, what: str) -> Any:
        for _ in range(500):
            if predicate():
                return
            yield deferLater(reactor, 0.01, lambda: None)
        fds = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                pass
        self.fail(f"Timed out waiting for {what}: {fds}")


class SpliceIntegrationTests(_SpliceServiceCase):
    """
    Downloads over the local UNIX socket from real files, through the real
    file backend, disk-io pool and transport.
    """

    @inlineCallbacks
    def test_wholeImage(self) -> Any:
        """
        The whole image (with an unaligned end) is spliced, accounted as
        transferred, and no pipe stays open.
        """
        fds = yield self.openFds()
        sent = self.service.metrics.bytesSent["local"]
        status, body = yield self.get()
        self.assertEqual((status, len(body)), (200, SIZE))
        self.assertEqual(body, self.data)
        self.assertEqual((len(self.started), len(self.fallback)), (1, 0))
        info = self.service.registry.get("t1").info(0)
        self.assertEqual((info["transferred"], info["active"]), (SIZE, False))
        # The access log and the metrics count the spliced bytes.
        self.assertEqual(self.service.metrics.bytesSent["local"] - sent, SIZE)
        yield self.waitFor(lambda: fdCount() <= fds, "the pipe to close")

    @inlineCallbacks
    def test_ranges(self) -> Any:
        """
        Ranges at aligned and unaligned offsets come back exact; small ones
        take the usual path.
        """
        ranges = [
            (0, 2 * MiB - 1),
            (4097, 9 * MiB + 13),
            (511, SIZE - 1),
            (SIZE - 5 * MiB - 1, SIZE - 1),
            (100, 100 + 300 * KiB),
        ]
        for first, last in ranges:
            status, body = yield self.get({"Range": f"bytes={first}-{last}"})
            self.assertEqual(status, 206)
            self.assertEqual(body, self.data[first : last + 1], (first, last))
        self.assertEqual(len(self.started), 4)

    @inlineCallbacks
    def test_upstreamClientRange(self) -> Any:
        """
        Upstream's client asks 4 MiB at a time: spliced too.
        """
        status, body = yield self.get({"Range": f"bytes={MiB}-{5 * MiB - 1}"})
        self.assertEqual((status, body == self.data[MiB : 5 * MiB]), (206, True))
        self.assertEqual((len(self.started), len(self.fallback)), (1, 0))

    @inlineCallbacks
    def test_rangePastImage(self) -> Any:
        """
        A ticket larger than its image: ranges past the image's end get
        the answers the buffer producer gives (a 416 before any byte).
        """
        self.addTicket(self.source, ("read",), uuid="t2", size=SIZE + 8 * MiB)
        ranges = [
            (SIZE - 3 * MiB, SIZE - 1),
            (SIZE - MiB, SIZE + 3 * MiB - 1),
            (SIZE + MiB, SIZE + 5 * MiB - 1),
            (SIZE - 2 * MiB, SIZE + 6 * MiB),
        ]
        spliced = []
        for first, last in ranges:
            spliced.append((yield self.get({"Range": f"bytes={first}-{last}"}, "t2")))
        # Only the range the image has was spliced.
        self.assertEqual(len(self.started), 1)
        self.patch(SpliceProducer, "applies", staticmethod(lambda *args: False))
        usual = []
        for first, last in ranges:
            usual.append((yield self.get({"Range": f"bytes={first}-{last}"}, "t2")))
        self.assertEqual([status for status, _ in spliced], [206, 416, 416, 416])
        self.assertEqual(spliced, usual)

    @inlineCallbacks
    def test_httpsNotSpliced(self) -> Any:
        """
        TLS cannot splice: the usual producer.
        """
        import http.client
        import ssl

        context = ssl.create_default_context(cafile=self.pki.caFile)
        port = self.port

        def client() -> bytes:
            conn = http.client.HTTPSConnection("localhost", port, context=context)
            try:
                conn.request("GET", "/images/t1")
                return conn.getresponse().read()
            finally:
                conn.close()

        body = yield deferToThread(client)
        self.assertEqual(body, self.data)
        self.assertEqual((len(self.started), len(self.fallback)), (0, 1))

    @inlineCallbacks
    def test_clientDisconnects(self) -> Any:
        """
        A client that leaves midway: the operation ends, the pipe and the
        connection are closed.
        """
        fds = yield self.openFds()
        sock = self.rawGet()
        got = 0
        while got < 3 * MiB:
            got += len((yield deferToThread(sock.recv, MiB)))
        sock.close()
        ticket = self.service.registry.get("t1")
        yield self.waitFor(lambda: not ticket.active, "the operation to end")
        yield self.waitFor(lambda: fdCount() <= fds, "the pipe to close")
        self.assertEqual(len(self.started), 1)
        self.assertLess(ticket.info(0)["transferred"], SIZE)

    @inlineCallbacks
    def test_deleteTicket(self) -> Any:
        """
        Deleting the ticket during a spliced download cuts it and closes
        the pipe and the backend.
        """
        fds = yield self.openFds()
        sock = self.rawGet()
        yield deferToThread(sock.recv, 64 * KiB)
        yield self.waitFor(lambda: self.started, "the download")
        yield self.service.registry.remove("t1")
        received = 0

        def drain() -> int:
            n = 0
            while True:
                data = sock.recv(MiB)
                if not data:
                    return n
                n += len(data)

        try:
            received = yield deferToThread(drain)
        except ConnectionError:
            pass
        finally:
            sock.close()
        self.assertLess(received, SIZE)
        yield self.waitFor(lambda: fdCount() <= fds, "the pipe and backend to close")

    @inlineCallbacks
    def test_slowReader(self) -> Any:
        """
        A client that stops reading: the daemon reads at most a pipe ahead
        of what the socket took.
        """
        sock = self.rawGet()
        self.addCleanup(sock.close)
        yield self.waitFor(lambda: self.started, "the download")
        producer = self.started[0]
        yield self.waitFor(
            lambda: producer._inPipe > 0 and not producer._filling, "the pipe to fill"
        )
        positions = set()
        for _ in range(10):
            yield deferLater(reactor, 0.02, lambda: None)
            positions.add(producer._position)
        self.assertEqual(len(positions), 1)
        self.assertLessEqual(producer._position - producer._delivered, producer._capacity)
        self.assertLess(producer._position, SIZE // 2)


class SpliceDisabledTests(_SpliceServiceCase):
    """
    C{[daemon] splice = false}: every download takes the usual path.
    """

    def setUp(self) -> None:
        from imageio import config as _config

        # The configuration is built by the base class: load the option the
        # way an operator sets it, then apply it before the service starts.
        path = Path(self.mktemp())
        path.write_text("[daemon]\nsplice = false\n")
        loaded = _config.load([path])
        self.assertFalse(loaded.daemon.splice)
        original = _config.Config

        def withoutSplice() -> Any:
            c = original()
            c.daemon.splice = loaded.daemon.splice
            return c

        self.patch(_config, "Config", withoutSplice)
        super().setUp()

    @inlineCallbacks
    def test_wholeImage(self) -> Any:
        """
        The whole image, through the usual producer.
        """
        status, body = yield self.get()
        self.assertEqual((status, body == self.data), (200, True))
        self.assertEqual((len(self.started), len(self.fallback)), (0, 1))
