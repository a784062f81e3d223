"""
Tests for L{imageio.web._pump}, the body pump: large request bodies read on
a thread that owns the socket while data flows.

Three levels: L{pumpInto} on real socket pairs (the thread's loop, run on
the test thread); the transport's state machine (L{ZeroCopyUNIXServer} on a
real socket pair, a L{MemoryReactorClock} and a fake pump whose results the
test delivers); and the real daemon over its real UNIX socket.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from imageio.interfaces import IDirectReader, IDirectWriter
from imageio.web import ImageioSite
from imageio.web._pump import (
    EOF,
    ERROR,
    FULL,
    HELD,
    IDLE_END,
    RELEASED,
    BodyPump,
    Lend,
    PumpThread,
    createBodyPump,
)
from imageio.web._transport import UNIXPort, ZeroCopyUNIXServer
from tests._daemon import (
    DaemonTestCase,
    abortive,
    connect,
    control,
    fdCount,
    parallel,
    pattern,
    rawRequest,
    waitFor,
)
from tests.test_streaming import SinkResource, connectDirect, putHead

reactor: Any = _reactor

KiB = 1024
MiB = 1024**2


def socketPair() -> tuple[socket.socket, socket.socket]:
    """
    @return: A connected UNIX stream pair, the first end non-blocking (as
        the daemon's sockets are).
    """
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setblocking(False)
    return ours, peer


class ThreadReactor:
    """
    Collects what a pump thread hands to the reactor; the test runs it.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, tuple[Any, ...]]] = []
        self.event = threading.Event()
        self.lock = threading.Lock()

    def callFromThread(self, f: Any, *args: Any) -> None:
        with self.lock:
            self.calls.append((f, args))
        self.event.set()

    def deliver(self, count: int = 1, timeout: float = 10) -> None:
        """
        Wait for C{count} deliveries and run them.
        """
        deadline = time.monotonic() + timeout
        while len(self.calls) < count:
            if not self.event.wait(max(0, deadline - time.monotonic())):
                raise AssertionError(f"{len(self.calls)} of {count} results delivered")
            self.event.clear()
        with self.lock:
            calls, self.calls = self.calls, []
        for f, args in calls:
            f(*args)


class PumpThreadTests(SynchronousTestCase):
    """
    L{PumpThread}: the thread that reads lent sockets.
    """

    def setUp(self) -> None:
        self.reactor = ThreadReactor()
        self.now = 0.0
        self.tick = 0.0
        self.thread = PumpThread(self.reactor, clock=self.clock)  # type: ignore[arg-type]
        self.thread.start()
        self.addCleanup(self.stop)
        self.ours, self.peer = socketPair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.peer.close)

    def stop(self) -> None:
        stopper = threading.Thread(target=self.thread.stop)
        stopper.start()
        while stopper.is_alive():
            self.reactor.event.wait(0.01)
            with self.reactor.lock:
                self.reactor.calls = []
        stopper.join()

    def clock(self) -> float:
        # Time passes by self.tick per look at the clock (a receive that
        # waits in the kernel may return after the test moved the time).
        self.now += self.tick
        return self.now

    def lend(
        self,
        size: int,
        idle: float = 30.0,
        maxHold: float = 60.0,
        sock: socket.socket | None = None,
    ) -> tuple[list[tuple[int, str]], bytearray, int]:
        buf = bytearray(size)
        fd = os.dup((sock or self.ours).fileno())
        results: list[tuple[int, str]] = []
        self.lent = self.thread.lend(
            fd, memoryview(buf), idle, maxHold, lambda n, why: results.append((n, why))
        )
        return results, buf, fd

    def queued(self) -> bool:
        try:
            return bool(self.ours.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except BlockingIOError:
            return False

    def assertClosed(self, fd: int) -> None:
        # The thread closed its duplicate (the number may be reused, by
        # another duplicate at most: check it is not ours any more).
        try:
            os.fstat(fd)
        except OSError:
            return
        self.assertNotEqual(os.fstat(fd).st_ino, os.fstat(self.ours.fileno()).st_ino)

    def test_full(self) -> None:
        """
        It reads until the buffer is full, and not one byte more; it keeps
        the socket (its duplicate stays open) until it is released, and
        then closes the duplicate.
        """
        data = pattern(100 * KiB)
        results, buf, fd = self.lend(100 * KiB)
        self.peer.sendall(data + b"next")
        self.reactor.deliver()
        self.assertEqual(results, [(100 * KiB, FULL)])
        self.assertEqual(bytes(buf), data)
        self.assertEqual(os.fstat(fd).st_ino, os.fstat(self.ours.fileno()).st_ino)
        self.lent.release()
        self.assertEqual(self.ours.recv(10), b"next")
        self.reactor.deliver()
        self.assertEqual(results, [(100 * KiB, FULL), (0, RELEASED)])
        self.assertClosed(fd)

    def test_blockingWhileHeld(self) -> None:
        """
        While the thread holds the socket, the open file is blocking (its
        reads wait in the kernel); when the thread gives it back, it is
        non-blocking again (after a release the transport sees to it).
        """
        fd = self.ours.fileno()
        results, _, _ = self.lend(10)
        self.peer.sendall(b"0123456789")
        self.reactor.deliver()
        self.assertTrue(os.get_blocking(fd))
        self.lent.release()
        self.reactor.deliver()
        self.ours.setblocking(False)
        results, _, _ = self.lend(10)
        self.peer.sendall(b"abc")
        self.peer.shutdown(socket.SHUT_WR)
        self.reactor.deliver()
        self.assertEqual(results, [(3, EOF)])
        self.assertFalse(os.get_blocking(fd))

    def test_waitAll(self) -> None:
        """
        A single socket is read with receives that wait in the kernel for a
        MiB: a MiB sent through a socket buffer that takes a fifth of it
        costs one receive (a receive per readiness would take five or more).
        """
        calls = []

        class Counting(socket.socket):
            def recv_into(self, *args: Any) -> int:
                calls.append(args[1:])
                return super().recv_into(*args)

        blocking = self.thread._blocking

        def counting(entry: Lend) -> socket.socket:
            sock = blocking(entry)
            return Counting(fileno=sock.detach())

        self.thread._blocking = counting  # type: ignore[method-assign]
        data = pattern(MiB)
        results, buf, _ = self.lend(MiB)
        sender = threading.Thread(target=self.peer.sendall, args=(data,))
        sender.start()
        self.reactor.deliver()
        sender.join()
        self.assertEqual(results, [(MiB, FULL)])
        self.assertEqual(bytes(buf), data)
        self.assertLessEqual(len(calls), 2, calls)
        self.assertEqual(calls[0], (0, socket.MSG_WAITALL))

    def test_fullReadsNothingMore(self) -> None:
        """
        After a full space it reads nothing (no wake-ups either) until it is
        refilled.
        """
        results, _, _ = self.lend(10)
        self.peer.sendall(b"0123456789more")
        self.reactor.deliver()
        self.assertEqual(results, [(10, FULL)])
        self.now = 100.0
        time.sleep(0.05)
        self.assertEqual(results, [(10, FULL)])
        self.assertEqual(self.ours.recv(10, socket.MSG_PEEK), b"more")

    def test_refill(self) -> None:
        """
        A refilled socket is read on into the new space, from the byte after
        the last one of the previous space, with the idle and hold times
        counted from the refill.
        """
        data = pattern(300 * KiB)
        results, first, fd = self.lend(100 * KiB, maxHold=1.0)
        self.peer.sendall(data[: 150 * KiB])
        self.reactor.deliver()
        self.assertEqual(results, [(100 * KiB, FULL)])
        self.now = 5.0
        second = bytearray(200 * KiB)
        self.lent.refill(memoryview(second))
        self.peer.sendall(data[150 * KiB :])
        self.reactor.deliver()
        self.assertEqual(results, [(100 * KiB, FULL), (200 * KiB, FULL)])
        self.assertEqual(bytes(first) + bytes(second), data)
        self.assertEqual(os.fstat(fd).st_ino, os.fstat(self.ours.fileno()).st_ino)

    def test_refillIdle(self) -> None:
        """
        A refilled socket with no data coming goes back after the idle time.
        """
        results, _, fd = self.lend(10, idle=0.001)
        self.peer.sendall(b"x" * 12)
        self.reactor.deliver()
        self.lent.refill(memoryview(bytearray(10)))
        self.assertTrue(waitFor(lambda: not self.queued(), 10))
        self.tick = 1.0
        self.reactor.deliver()
        self.assertEqual(results, [(10, FULL), (2, IDLE_END)])
        self.assertClosed(fd)

    def test_idle(self) -> None:
        """
        With no more data coming it gives the socket back after the idle
        time, with what it read.
        """
        self.peer.sendall(b"abc")
        results, buf, fd = self.lend(100, idle=0.001)
        self.assertTrue(waitFor(lambda: not self.queued(), 10))
        self.tick = 1.0
        self.reactor.deliver()
        self.assertEqual(results, [(3, IDLE_END)])
        self.assertEqual(bytes(buf[:3]), b"abc")
        self.assertClosed(fd)

    def test_eof(self) -> None:
        """
        At the end of the stream it stops, with what came before.
        """
        self.peer.sendall(b"abc")
        self.peer.shutdown(socket.SHUT_WR)
        results, _, _ = self.lend(100)
        self.reactor.deliver()
        self.assertEqual(results, [(3, EOF)])
        # The reactor's own read sees the end again.
        self.assertEqual(self.ours.recv(10), b"")

    def test_error(self) -> None:
        """
        A read error (the peer closed with our bytes unread: ECONNRESET)
        ends the pump with what came before.
        """
        self.ours.send(b"unread")
        self.peer.close()
        results, _, _ = self.lend(100)
        self.reactor.deliver()
        self.assertEqual(results, [(0, ERROR)])

    def test_maxHold(self) -> None:
        """
        After C{maxHold} seconds it gives the socket back, even while data
        flows.
        """
        results, _, _ = self.lend(10 * KiB, maxHold=0.5)
        self.peer.sendall(b"a" * 1000)
        self.assertTrue(waitFor(lambda: not self.queued(), 10))
        self.assertEqual(results, [])
        self.now = 1.0
        self.peer.sendall(b"b" * 1000)
        self.reactor.deliver()
        [(n, why)] = results
        self.assertEqual(why, HELD)
        self.assertGreaterEqual(n, 1000)

    def test_severalSockets(self) -> None:
        """
        One thread reads several sockets at once, each into its own buffer.
        """
        pairs = [socketPair() for _ in range(3)]
        for ours, peer in pairs:
            self.addCleanup(ours.close)
            self.addCleanup(peer.close)
        lent = [self.lend(64 * KiB, sock=ours) for ours, _ in pairs]
        datas = [pattern(64 * KiB, b"%d" % i) for i in range(3)]
        for (_, peer), data in zip(pairs, datas, strict=True):
            peer.sendall(data)
        self.reactor.deliver(3)
        for (results, buf, _), data in zip(lent, datas, strict=True):
            self.assertEqual(results, [(64 * KiB, FULL)])
            self.assertEqual(bytes(buf), data)

    def test_lendWhileOneReads(self) -> None:
        """
        While the thread reads a single socket (its lean loop, which does
        not watch the wake-up pipe) and no data comes, a second socket lent
        is still read at once, and the first one after it.
        """
        first, _, _ = self.lend(10)
        time.sleep(0.05)
        ours, peer = socketPair()
        self.addCleanup(ours.close)
        self.addCleanup(peer.close)
        second, buf, _ = self.lend(10, sock=ours)
        peer.sendall(b"0123456789")
        self.reactor.deliver()
        self.assertEqual((first, second), ([], [(10, FULL)]))
        self.assertEqual(bytes(buf), b"0123456789")
        self.peer.sendall(b"abcdefghij")
        self.reactor.deliver()
        self.assertEqual(first, [(10, FULL)])

    def test_shutdownWakes(self) -> None:
        """
        A read-side shutdown of the original socket (what the transport does
        when the connection is lost) wakes the thread for that socket.
        """
        results, _, fd = self.lend(100)
        self.ours.shutdown(socket.SHUT_RD)
        self.reactor.deliver()
        self.assertEqual(results, [(0, EOF)])
        self.assertClosed(fd)

    def test_stopGivesBack(self) -> None:
        """
        Stopping the thread gives every socket back.
        """
        results, _, fd = self.lend(100)
        self.peer.sendall(b"xy")
        stopper = threading.Thread(target=self.thread.stop)
        stopper.start()
        self.reactor.deliver()
        stopper.join(10)
        self.assertFalse(stopper.is_alive())
        self.assertEqual(len(results), 1)
        self.assertClosed(fd)

    def test_stopGivesBackParked(self) -> None:
        """
        Stopping the thread gives back sockets waiting for a refill too.
        """
        results, _, fd = self.lend(2)
        self.peer.sendall(b"xy")
        self.reactor.deliver()
        stopper = threading.Thread(target=self.thread.stop)
        stopper.start()
        self.reactor.deliver()
        stopper.join(10)
        self.assertEqual(results, [(2, FULL), (0, EOF)])
        self.assertClosed(fd)


@implementer(IDirectReader)
class FakeReader:
    """
    A direct reader with a buffer of C{size} bytes, recording fills.
    """

    def __init__(self, size: int) -> None:
        self.buffer = bytearray(size)
        self.filled = 0
        self.calls: list[int] = []

    def readBuffer(self) -> memoryview | None:
        return memoryview(self.buffer)[self.filled :]

    def bufferFilled(self, n: int) -> None:
        self.filled += n
        self.calls.append(n)


class FakeLend:
    """
    A lend whose thread is the test: records refills and releases.
    """

    def __init__(self, view: memoryview, onResult: Any) -> None:
        self.view = view
        self.onResult = onResult
        self.refills: list[memoryview] = []
        self.released = False

    def refill(self, view: memoryview) -> None:
        assert not self.released
        self.refills.append(view)
        self.view = view

    def release(self) -> None:
        assert not self.released
        self.released = True


class FakePump(BodyPump):
    """
    A L{BodyPump} whose pumps the test finishes.
    """

    def __init__(self) -> None:
        super().__init__([], minBuffer=1000, minRead=10)
        self.started: list[tuple[int, memoryview, FakeLend]] = []
        self.free = True
        self.running = True

    def available(self) -> bool:
        return self.free

    def pump(self, fd: int, view: memoryview, onResult: Any) -> Lend:
        lend = FakeLend(view, onResult)
        self.started.append((fd, view, lend))
        return lend  # type: ignore[return-value]

    @property
    def lend(self) -> FakeLend:
        return self.started[-1][2]

    def finish(self, n: int, why: str, data: bytes = b"") -> None:
        lend = self.lend
        lend.view[: len(data)] = data
        lend.onResult(n, why)


def FakePort(pump: BodyPump | None) -> UNIXPort:
    """
    @return: A port (not listening) whose connections use C{pump}.
    """
    port = UNIXPort("unused", Factory())
    port.bodyPump = pump
    return port


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost = reason or Failure(Exception("lost"))


class TransportPumpTests(SynchronousTestCase):
    """
    The transport's side of the pump: when it lends the socket, what it
    does meanwhile, and how it takes it back.
    """

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.ours, self.peer = socketPair()
        self.addCleanup(self.peer.close)
        self.pump = FakePump()
        self.protocol = Recorder()
        self.transport = ZeroCopyUNIXServer(
            self.ours, self.protocol, "peer", FakePort(self.pump), 1, self.reactor
        )
        self.protocol.makeConnection(self.transport)
        self.reader = FakeReader(100 * KiB)
        self.transport.setDirectReader(self.reader)

    def tearDown(self) -> None:
        if self.transport.connected:
            self.transport.connectionLost(Failure(Exception("test over")))

    def reading(self) -> bool:
        return self.transport in self.reactor.getReaders()

    def test_handoff(self) -> None:
        """
        A large read into a reader's buffer with plenty of room left lends
        the socket and the rest of the buffer to a pump thread; the reactor
        stops reading the socket.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        self.assertEqual(self.reader.calls, [100])
        [(fd, view, _)] = self.pump.started
        self.assertEqual(fd, self.ours.fileno())
        self.assertEqual(len(view), 100 * KiB - 100)
        self.assertFalse(self.reading())

    def test_smallReadStaysOnReactor(self) -> None:
        """
        A small read (a slow client) does not start a pump.
        """
        self.peer.sendall(b"x" * 5)
        self.transport.doRead()
        self.assertEqual(self.pump.started, [])
        self.assertTrue(self.reading())

    def test_smallBufferStaysOnReactor(self) -> None:
        """
        With little room left in the reader's buffer, the reactor reads.
        """
        self.reader.filled = 100 * KiB - 1100
        self.peer.sendall(b"x" * 200)
        self.transport.doRead()
        self.assertEqual(self.pump.started, [])
        self.assertTrue(self.reading())

    def test_poolFull(self) -> None:
        """
        With no pump thread free, the reactor reads as before, never waits.
        """
        self.pump.free = False
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        self.assertEqual((self.pump.started, self.reader.calls), ([], [100]))
        self.assertTrue(self.reading())

    def test_noPump(self) -> None:
        """
        A transport of a listener without a pump reads on the reactor.
        """
        ours, peer = socketPair()
        self.addCleanup(peer.close)
        transport = ZeroCopyUNIXServer(ours, Recorder(), "peer", FakePort(None), 2, self.reactor)
        transport.setDirectReader(self.reader)
        peer.sendall(b"x" * 100)
        transport.doRead()
        self.assertEqual(self.reader.calls, [100])
        self.assertIn(transport, self.reactor.getReaders())
        transport.connectionLost(Failure(Exception("test over")))

    def test_idleReturn(self) -> None:
        """
        A pump that ran idle hands its bytes to the reader and the reactor
        reads again; no new pump starts until a large read.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        self.pump.finish(50, IDLE_END, b"y" * 50)
        self.assertEqual(self.reader.calls, [100, 50])
        self.assertEqual(bytes(self.reader.buffer[100:150]), b"y" * 50)
        self.assertTrue(self.reading())
        self.assertEqual(len(self.pump.started), 1)

    def test_fullOrHeldPumpsAgain(self) -> None:
        """
        A pump that gave back while data flowed (maximum hold) is lent the
        socket again at once, with the rest of the buffer.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        self.pump.finish(10 * KiB, HELD)
        self.assertEqual(self.reader.calls, [100, 10 * KiB])
        self.assertEqual(len(self.pump.started), 2)
        self.assertEqual(len(self.pump.started[1][1]), 90 * KiB - 100)
        self.assertFalse(self.reading())

    def test_pauseResumeRecorded(self) -> None:
        """
        Pausing and resuming the transport while a pump owns the socket is
        only recorded: the reactor does not read the socket meanwhile. The
        last state applies when the pump returns.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        self.transport.pauseProducing()
        self.assertFalse(self.reading())
        self.transport.resumeProducing()
        self.assertFalse(self.reading())
        self.transport.pauseProducing()
        self.pump.finish(10, IDLE_END)
        self.assertEqual(self.reader.calls, [100, 10])
        self.assertFalse(self.reading())
        self.transport.resumeProducing()
        self.assertTrue(self.reading())

    def test_resumedWhilePumping(self) -> None:
        """
        Paused then resumed while pumping: reading goes on after the pump.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        self.transport.pauseProducing()
        self.transport.resumeProducing()
        self.pump.finish(10, IDLE_END)
        self.assertTrue(self.reading())

    def pauseOnFill(self) -> None:
        """
        Make the reader pause the transport whenever bytes arrive (both
        upload buffers taken).
        """
        original = self.reader.bufferFilled

        def fillAndPause(n: int) -> None:
            original(n)
            self.transport.pauseProducing()

        self.reader.bufferFilled = fillAndPause  # type: ignore[method-assign]

    def test_pausedByFill(self) -> None:
        """
        A reader that pauses the transport when the pump's bytes arrive
        (both upload buffers taken) leaves it paused, and no pump starts.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        self.pauseOnFill()
        self.pump.finish(10 * KiB, FULL)
        self.assertFalse(self.reading())
        self.assertEqual(len(self.pump.started), 1)

    def test_fullRefills(self) -> None:
        """
        A pump that filled its space keeps the socket: its bytes go to the
        reader and it is given the reader's next space at once, without a
        new pump (no new duplicate) and without the reactor reading.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        lend = self.pump.lend
        self.pump.finish(10 * KiB, FULL, b"a" * 10 * KiB)
        self.assertEqual(self.reader.calls, [100, 10 * KiB])
        self.assertEqual(bytes(self.reader.buffer[100 : 100 + 10 * KiB]), b"a" * 10 * KiB)
        self.assertEqual(len(self.pump.started), 1)
        [view] = lend.refills
        self.assertEqual(len(view), 90 * KiB - 100)
        self.assertFalse(lend.released)
        self.assertFalse(self.reading())
        # The next report fills the next space.
        self.pump.finish(5, IDLE_END, b"bbbbb")
        self.assertEqual(self.reader.calls, [100, 10 * KiB, 5])
        self.assertEqual(bytes(self.reader.buffer[100 + 10 * KiB :][:5]), b"bbbbb")
        self.assertTrue(self.reading())

    def test_fullPausedParks(self) -> None:
        """
        A reader that pauses the transport when a full space arrives (both
        upload buffers taken) leaves the pump parked: nothing reads the
        socket, the pump is neither refilled nor released; resuming gives it
        the next space.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        self.pauseOnFill()
        lend = self.pump.lend
        self.pump.finish(10 * KiB, FULL)
        self.assertEqual((lend.refills, lend.released, self.reading()), ([], False, False))
        self.transport.pauseProducing()
        self.assertEqual((lend.refills, lend.released, self.reading()), ([], False, False))
        self.transport.resumeProducing()
        self.assertEqual(len(lend.refills), 1)
        self.assertEqual(len(lend.refills[0]), 90 * KiB - 100)
        self.assertFalse(lend.released)
        self.assertFalse(self.reading())
        self.assertEqual(len(self.pump.started), 1)

    def test_fullNoSpaceReleases(self) -> None:
        """
        A full space when the reader offers too little next (the end of
        the body): the socket is released and the reactor reads at once.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        lend = self.pump.lend
        self.pump.finish(100 * KiB - 600, FULL)
        self.assertEqual(lend.refills, [])
        self.assertTrue(lend.released)
        self.assertTrue(self.reading())
        self.peer.sendall(b"y" * 500)
        self.transport.doRead()
        self.assertEqual(self.reader.calls, [100, 100 * KiB - 600, 500])
        self.assertEqual(len(self.pump.started), 1)

    def test_releaseNonBlocking(self) -> None:
        """
        Taking the socket back from a parked pump makes it non-blocking
        again (the thread made the open file blocking) before the reactor
        reads it.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        os.set_blocking(self.ours.fileno(), True)
        self.pump.finish(100 * KiB - 600, FULL)
        self.assertTrue(self.pump.lend.released)
        self.assertFalse(os.get_blocking(self.ours.fileno()))

    def test_fullNoReaderReleases(self) -> None:
        """
        A full space after the reader went away (the body is complete):
        released, and the reactor reads as usual.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        lend = self.pump.lend

        def fillAndStop(n: int) -> None:
            self.reader.filled += n
            self.transport.setDirectReader(None)

        self.reader.bufferFilled = fillAndStop  # type: ignore[method-assign]
        self.pump.finish(10 * KiB, FULL)
        self.assertTrue(lend.released)
        self.assertTrue(self.reading())

    def test_lostWhileParked(self) -> None:
        """
        A connection lost while the pump is parked releases it (the thread
        closes its duplicate; there is no read to wake).
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        self.transport.pauseProducing()
        lend = self.pump.lend
        self.pump.finish(10 * KiB, FULL)
        self.assertFalse(lend.released)
        self.transport.connectionLost(Failure(Exception("gone")))
        self.assertTrue(lend.released)
        self.assertIsNotNone(self.protocol.lost)

    def test_lostThenFull(self) -> None:
        """
        A full space reported after the connection was lost releases the
        pump, and its bytes are dropped.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        lend = self.pump.lend
        self.transport.connectionLost(Failure(Exception("gone")))
        self.assertFalse(lend.released)
        self.pump.finish(10 * KiB, FULL)
        self.assertTrue(lend.released)
        self.assertEqual(self.reader.calls, [100])

    def test_loseConnectionWhileParked(self) -> None:
        """
        C{loseConnection} while the pump is parked: it is never refilled,
        reading does not resume, and the lost connection releases it.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        self.transport.pauseProducing()
        lend = self.pump.lend
        self.pump.finish(10 * KiB, FULL)
        self.transport.loseConnection()
        self.transport.resumeProducing()
        self.transport.startReading()
        self.assertEqual(lend.refills, [])
        self.assertFalse(self.reading())
        self.transport.connectionLost(Failure(Exception("closed")))
        self.assertTrue(lend.released)

    def test_readerFailsOnFull(self) -> None:
        """
        A reader failing on a full space's bytes (a bug) is logged and the
        socket comes back to the reactor, never left with the thread.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        lend = self.pump.lend

        def broken(n: int) -> None:
            raise RuntimeError("bug")

        self.reader.bufferFilled = broken  # type: ignore[method-assign]
        self.pump.finish(10 * KiB, FULL)
        self.assertTrue(lend.released)
        self.assertTrue(self.reading())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_eofHandedBack(self) -> None:
        """
        End of stream seen by the pump: its bytes go to the reader, the
        reactor reads again and its own read runs the usual lost path.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        self.peer.close()
        self.pump.finish(3, EOF, b"abc")
        self.assertEqual(self.reader.calls, [100, 3])
        self.assertTrue(self.reading())
        self.assertEqual(len(self.pump.started), 1)
        self.assertIsNotNone(self.transport.doRead())

    def test_errorHandedBack(self) -> None:
        """
        An error seen by the pump: the reactor reads again.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        self.pump.finish(0, ERROR)
        self.assertEqual(self.reader.calls, [100])
        self.assertTrue(self.reading())

    def test_lostWhilePumping(self) -> None:
        """
        A connection lost while a pump runs shuts the socket's read side
        down (which wakes the thread: its duplicate reads the end), and the
        pump's late result is dropped.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        dup = os.dup(self.ours.fileno())
        self.addCleanup(os.close, dup)
        self.transport.connectionLost(Failure(Exception("gone")))
        self.assertIsNotNone(self.protocol.lost)
        self.assertEqual(os.read(dup, 10), b"")
        self.pump.finish(10, EOF)
        self.assertEqual(self.reader.calls, [100])
        self.assertFalse(self.reading())

    def test_neverWaits(self) -> None:
        """
        The transport's receives and sends never wait, even while a pump
        thread made the socket blocking: an early answer larger than the
        socket takes is queued, a read with nothing to read returns.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        os.set_blocking(self.ours.fileno(), True)
        self.addCleanup(os.set_blocking, self.ours.fileno(), False)
        # Were it to wait, it would for 5 s, then fail.
        timeval = struct.pack("ll", 5, 0)
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        started = time.monotonic()
        self.transport.write(b"y" * 4 * MiB)
        self.assertGreater(self.transport.pendingBytes(), 0)
        self.transport.doWrite()
        self.transport.setDirectReader(None)
        self.assertIsNone(self.transport.doRead())
        self.assertLess(time.monotonic() - started, 2.5)

    def test_sendNowNeverWaits(self) -> None:
        """
        C{sendNow} (the TLS layer's send) does not wait either on a socket
        a pump thread made blocking: it takes what the socket takes.
        """
        os.set_blocking(self.ours.fileno(), True)
        self.addCleanup(os.set_blocking, self.ours.fileno(), False)
        timeval = struct.pack("ll", 5, 0)
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        started = time.monotonic()
        sent = self.transport.sendNow(b"y" * 4 * MiB)
        self.assertLess(sent, 4 * MiB)
        self.assertLess(time.monotonic() - started, 2.5)

    def test_directWriterWaitsForPump(self) -> None:
        """
        A direct writer (a spliced download) is not asked to send while a
        pump holds the socket, which may be blocking then, neither when it
        has bytes ready nor on a write pass; it is asked once the socket is
        back.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        fds: list[int] = []

        @implementer(IDirectWriter)
        class Writer:
            def sendTo(self, fd: int) -> bool:
                fds.append(fd)
                return False

        self.transport.setDirectWriter(Writer())
        self.transport.directWriteReady()
        self.transport.startWriting()
        self.transport.doWrite()
        self.assertEqual(fds, [])
        self.assertNotIn(self.transport, self.reactor.getWriters())
        self.pump.finish(10, IDLE_END)
        self.assertEqual(fds, [self.ours.fileno()])

    def test_writeWhilePumping(self) -> None:
        """
        The reactor may write (an early answer) while a pump reads.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        self.transport.write(b"HTTP/1.1 403 Forbidden\r\n\r\n")
        self.assertEqual(self.peer.recv(100), b"HTTP/1.1 403 Forbidden\r\n\r\n")

    def test_loseConnectionWhilePumping(self) -> None:
        """
        C{loseConnection} during a pump: reading does not resume when it
        returns.
        """
        self.peer.sendall(b"x" * 100)
        self.transport.doRead()
        self.transport.loseConnection()
        self.pump.finish(10, IDLE_END)
        self.assertFalse(self.reading())


class ChannelPumpTests(SynchronousTestCase):
    """
    The HTTP channel as the reader of a pumped body.
    """

    def test_filledAfterFlush(self) -> None:
        """
        Bytes a pump put in the offered space count even when the channel
        flushed meanwhile (the body rate watch does): they follow the
        bytes counted before.
        """
        resource = SinkResource(size=1000)
        conn, _ = connectDirect(ImageioSite(resource, "test", reactor=Clock()))
        conn.send(putHead(100))
        channel = conn.channel
        view = channel.readBuffer()
        assert view is not None
        view[:10] = b"a" * 10
        channel.bufferFilled(10)
        view = channel.readBuffer()
        assert view is not None
        # The pump holds view; the rate watch flushes.
        channel._flushDirect()
        view[:20] = b"b" * 20
        channel.bufferFilled(20)
        view = channel.readBuffer()
        assert view is not None
        self.assertEqual(len(view), 69)
        view[:69] = b"c" * 69
        channel.bufferFilled(69)
        conn.send(b"z")
        self.assertEqual(conn.response().body, b"got 100")


class BodyPumpTests(SynchronousTestCase):
    """
    L{BodyPump}: which thread gets a socket, and when none does.
    """

    def test_notRunning(self) -> None:
        """
        A pump is refused (and no descriptor is duplicated) while the
        threads do not run: the transport reads on the reactor.
        """
        pump = createBodyPump(ThreadReactor(), 1)  # type: ignore[arg-type]
        self.assertFalse(pump.available())
        before = fdCount()
        self.assertRaises(RuntimeError, pump.pump, 0, memoryview(bytearray(1)), print)
        self.assertEqual(fdCount(), before)

    def test_perThread(self) -> None:
        """
        Each thread takes up to C{perThread} sockets, the least busy first;
        beyond that none is available until one comes back.
        """
        reactor = ThreadReactor()
        pump = createBodyPump(reactor, 2)  # type: ignore[arg-type]
        pump.perThread = 1
        pump.idle = 30.0
        pump.start()
        self.addCleanup(pump.stop)
        pairs = [socketPair() for _ in range(2)]
        for ours, peer in pairs:
            self.addCleanup(ours.close)
            self.addCleanup(peer.close)
        results: list[tuple[int, str]] = []
        lends = []
        for ours, _ in pairs:
            self.assertTrue(pump.available())
            lends.append(
                pump.pump(
                    ours.fileno(),
                    memoryview(bytearray(10)),
                    lambda n, why: results.append((n, why)),
                )
            )
        self.assertFalse(pump.available())
        self.assertEqual((pump.lent, pump.pumps), (2, 2))
        pairs[0][1].sendall(b"x" * 10)
        reactor.deliver()
        self.assertEqual(results, [(10, FULL)])
        # A full space keeps the socket until it is released.
        self.assertEqual((pump.lent, pump.bytesRead, pump.spaces), (2, 10, 1))
        self.assertFalse(pump.available())
        lends[0].release()
        reactor.deliver()
        # The transport does not hear of the release (it took the socket
        # back when it asked).
        self.assertEqual(results, [(10, FULL)])
        self.assertEqual(pump.lent, 1)
        self.assertTrue(pump.available())

    def test_refillCountsSpaces(self) -> None:
        """
        Refilled spaces count as spaces, not as new pumps.
        """
        reactor = ThreadReactor()
        pump = createBodyPump(reactor, 1)  # type: ignore[arg-type]
        pump.idle = 30.0
        pump.start()
        self.addCleanup(pump.stop)
        ours, peer = socketPair()
        self.addCleanup(ours.close)
        self.addCleanup(peer.close)
        results: list[tuple[int, str]] = []
        lend = pump.pump(
            ours.fileno(), memoryview(bytearray(10)), lambda n, why: results.append((n, why))
        )
        peer.sendall(b"x" * 25)
        reactor.deliver()
        lend.refill(memoryview(bytearray(10)))
        reactor.deliver()
        lend.refill(memoryview(bytearray(10)))
        peer.shutdown(socket.SHUT_WR)
        reactor.deliver()
        self.assertEqual(results, [(10, FULL), (10, FULL), (5, EOF)])
        self.assertEqual((pump.pumps, pump.spaces, pump.bytesRead, pump.lent), (1, 2, 25, 0))


# The real daemon over its real UNIX socket.

BIG = 24 * MiB


class DaemonPumpTests(DaemonTestCase):
    """
    Uploads over the local UNIX socket with the body pump.
    """

    def setUp(self) -> None:
        self.daemon = self.startDaemon()
        self.pump: BodyPump = self.daemon.service.bodyPump

    def holdLong(self) -> None:
        """
        Pumps keep the socket far longer than the test waits: only the
        wake-up on a lost connection returns them in time.
        """
        self.pump.idle = 30.0
        self.pump.maxHold = 60.0

    def pumping(self) -> bool:
        return self.pump.lent > 0

    def upload(self, ticket: str, data: bytes) -> int:
        with connect(self.daemon.addresses) as conn:
            r = conn.request("PUT", f"/images/{ticket}", [("Content-Length", str(len(data)))], data)
            return r.status

    async def test_largeUpload(self) -> None:
        """
        A large upload arrives byte-exact, read mostly by pump threads.
        """
        data = pattern(BIG, b"large")
        image = self.makeImage(self.daemon, BIG)
        ticket = self.addTicket(self.daemon, image, BIG)
        status = await deferToThread(self.upload, ticket, data)
        self.assertEqual(status, 200)
        self.assertEqual(image.read_bytes(), data)
        self.assertGreater(self.pump.bytesRead, BIG // 2)
        # The thread kept the socket from one buffer to the next.
        self.assertGreater(self.pump.spaces, 0)

    async def test_concurrentUploads(self) -> None:
        """
        Four concurrent uploads arrive byte-exact.
        """
        datas = [pattern(BIG // 2, b"c%d" % i) for i in range(4)]
        images = [self.makeImage(self.daemon, BIG // 2) for _ in datas]
        tickets = [self.addTicket(self.daemon, image, BIG // 2) for image in images]

        def run() -> list[int]:
            return parallel(
                *[lambda t=t, d=d: self.upload(t, d) for t, d in zip(tickets, datas, strict=True)]
            )

        statuses = await deferToThread(run)
        self.assertEqual(statuses, [200] * 4)
        for image, data in zip(images, datas, strict=True):
            self.assertEqual(image.read_bytes(), data)
        self.assertGreater(self.pump.bytesRead, BIG)

    async def test_clientKilledWhilePumping(self) -> None:
        """
        A client gone mid-body while a pump thread holds its socket: no
        hang, the buffers go back to the budget, the thread is released and
        no descriptor leaks.
        """
        image = self.makeImage(self.daemon, BIG)
        ticket = self.addTicket(self.daemon, image, BIG)
        service = self.daemon.service
        self.holdLong()

        def scenario() -> None:
            baseline = fdCount()
            conn = connect(self.daemon.addresses)
            conn.send(rawRequest("PUT", f"/images/{ticket}", [("Content-Length", str(BIG))]))
            chunk = pattern(MiB, b"k")
            for _ in range(6):
                conn.send(chunk)
            self.assertTrue(waitFor(self.pumping, 5))
            abortive(conn)
            self.assertTrue(waitFor(lambda: service.budget.used == 0, 5))
            self.assertTrue(waitFor(lambda: self.pump.lent == 0, 5))
            self.waitForFds(baseline)

        await deferToThread(scenario)
        self.assertGreater(self.pump.pumps, 0)

    async def test_cancelWhilePumping(self) -> None:
        """
        DELETE of the ticket mid-body cancels the upload promptly: 204 within
        a second, the connection closed, the pump threads free.
        """
        image = self.makeImage(self.daemon, BIG)
        ticket = self.addTicket(self.daemon, image, BIG, ops=["write"])
        self.holdLong()

        def scenario() -> None:
            conn = connect(self.daemon.addresses)
            conn.send(rawRequest("PUT", f"/images/{ticket}", [("Content-Length", str(BIG))]))
            chunk = pattern(MiB, b"d")
            for _ in range(6):
                conn.send(chunk)
            self.assertTrue(waitFor(self.pumping, 5))
            started = time.monotonic()
            r = control(self.daemon.addresses, "DELETE", f"/tickets/{ticket}")
            self.assertEqual(r.status, 204, r.text)
            self.assertLess(time.monotonic() - started, 1.5)
            try:
                for _ in range(8):
                    conn.send(chunk)
            except OSError:
                pass
            self.assertTrue(conn.waitClosed(5))
            conn.close()
            self.assertTrue(waitFor(lambda: self.pump.lent == 0, 5))
            self.assertEqual(
                control(self.daemon.addresses, "GET", f"/tickets/{ticket}").status, 404
            )

        await deferToThread(scenario)


class SlowBodyTests(DaemonTestCase):
    """
    The body rate watch still cuts a client that sent fast, then stalled.
    """

    async def test_stalledAfterPump(self) -> None:
        daemon = self.startDaemon(daemon={"body_timeout": 1, "body_min_rate": 4 * MiB})
        pump: BodyPump = daemon.service.bodyPump
        image = self.makeImage(daemon, BIG)
        ticket = self.addTicket(daemon, image, BIG)

        def scenario() -> int:
            with connect(daemon.addresses) as conn:
                conn.send(rawRequest("PUT", f"/images/{ticket}", [("Content-Length", str(BIG))]))
                conn.send(pattern(2 * MiB, b"s"))
                self.assertTrue(waitFor(lambda: pump.pumps > 0, 5))
                return conn.response(timeout=10).status

        status = await deferToThread(scenario)
        self.assertEqual(status, 408)
        self.assertTrue(pump.bytesRead > 0)


class NoPumpTests(DaemonTestCase):
    """
    C{body_threads = 0}: no pump, bodies read on the reactor as before.
    """

    async def test_disabled(self) -> None:
        daemon = self.startDaemon(daemon={"body_threads": 0})
        self.assertIsNone(daemon.service.bodyPump)
        self.assertNotIn("body-pump", daemon.service.namedServices)
        data = pattern(BIG, b"off")
        image = self.makeImage(daemon, BIG)
        ticket = self.addTicket(daemon, image, BIG)

        def upload() -> int:
            with connect(daemon.addresses) as conn:
                r = conn.request(
                    "PUT", f"/images/{ticket}", [("Content-Length", str(len(data)))], data
                )
                return r.status

        self.assertEqual(await deferToThread(upload), 200)
        self.assertEqual(image.read_bytes(), data)


class ListenerTests(DaemonTestCase):
    """
    Which listeners lend their sockets: plain ones only.
    """

    async def upload(self, sections: dict[str, Any], listener: str, size: int, tag: bytes) -> None:
        """
        PUT C{size} bytes to a new image of a daemon started with
        C{sections}, over C{listener}: answered 200, stored byte-exact.
        """
        daemon = self.daemon = self.startDaemon(**sections)
        data = pattern(size, tag)
        image = self.makeImage(daemon, size)
        ticket = self.addTicket(daemon, image, size)

        def upload() -> int:
            with connect(daemon.addresses, listener) as conn:
                headers = [("Content-Length", str(len(data)))]
                return conn.request("PUT", f"/images/{ticket}", headers, data).status

        self.assertEqual(await deferToThread(upload), 200)
        self.assertEqual(image.read_bytes(), data)

    async def test_plainRemote(self) -> None:
        """
        The remote listener with TLS disabled reads large bodies with the
        pump too, byte-exact.
        """
        await self.upload({"tls": {"enable": False}}, "remote-plain", BIG, b"tcp")
        pump: BodyPump = self.daemon.service.bodyPump
        self.assertGreater(pump.bytesRead, 0)

    async def test_tlsRemote(self) -> None:
        """
        An upload over TLS is not read by the pump (its bodies are
        decrypted on the reactor).
        """
        await self.upload({}, "remote", BIG // 4, b"tls")
        pump: BodyPump = self.daemon.service.bodyPump
        self.assertEqual(pump.pumps, 0)
