"""
Tests for L{imageio._diskio}: the disk-io pool on the real reactor.
"""

from __future__ import annotations

import fcntl
import threading
from typing import Any, cast

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imageio._diskio import DiskIO, DiskIOPool, DiskIOService, createPool

reactor = cast(IReactorFromThreads, _reactor)

#: How long a test waits for pool threads before it fails.
WAIT = 10


class DiskIOPoolTests(TestCase):
    """
    L{DiskIOPool} runs calls on at most C{maxThreads} threads and delivers
    results on the reactor thread.
    """

    def pool(self, maxThreads: int = 4) -> DiskIOPool:
        pool = createPool(reactor, maxThreads)
        pool.start()
        self.addCleanup(pool.stop)
        return pool

    async def test_result(self) -> None:
        """
        The call runs on a pool thread with its arguments; the Deferred
        fires with its result on the reactor thread.
        """
        pool = self.pool()
        calledOn = []

        def add(a: int, b: int = 0) -> int:
            calledOn.append(threading.current_thread())
            return a + b

        fired = []
        d = pool.run(add, 2, b=3)
        d.addCallback(lambda result: fired.append((result, threading.current_thread())))
        await d
        self.assertNotEqual(calledOn, [threading.main_thread()])
        self.assertTrue(calledOn[0].name.startswith("disk-io-"))
        self.assertEqual(fired, [(5, threading.main_thread())])

    async def test_error(self) -> None:
        """
        An exception in the call fails the Deferred with that exception.
        """
        pool = self.pool()

        def broken() -> None:
            raise OSError(5, "Input/output error")

        with self.assertRaises(OSError) as caught:
            await pool.run(broken)
        self.assertEqual(caught.exception.errno, 5)

    async def test_bounded(self) -> None:
        """
        No more than C{maxThreads} calls run at once; the others wait in
        order and run when a thread is free.
        """
        pool = self.pool(maxThreads=2)
        release = threading.Event()
        lock = threading.Lock()
        running = [0]
        most = [0]
        started = []

        def work(i: int) -> int:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
                started.append(i)
            release.wait(WAIT)
            with lock:
                running[0] -= 1
            return i

        calls = [pool.run(work, i) for i in range(6)]
        # Let the first two start and block.
        await deferToThread(lambda: _waitFor(lambda: running[0] == 2))
        self.assertEqual(pool.threads, 2)
        release.set()
        self.assertEqual(await gatherResults(calls), list(range(6)))
        self.assertEqual(most[0], 2)
        self.assertEqual(sorted(started[:2]), [0, 1])

    async def test_spareThread(self) -> None:
        """
        Threads start lazily, keeping one more than the busy ones: a lone
        caller ends up with two threads, never more.
        """
        pool = self.pool(maxThreads=8)
        self.assertEqual(pool.threads, 0)
        for i in range(5):
            self.assertEqual(await pool.run(int, i), i)
        self.assertEqual(pool.threads, 2)

    async def test_fullWakePipe(self) -> None:
        """
        Calls queued while the wake-up pipe is full still run: the reactor
        never blocks on the pipe, and workers drain the queue.
        """
        pool = self.pool(maxThreads=1)
        # The smallest pipe the kernel allows, one page: fewer calls fill it.
        size = fcntl.fcntl(pool._pipe.writeFD, fcntl.F_SETPIPE_SZ, 4096)
        release = threading.Event()
        first = pool.run(release.wait, WAIT)
        calls = [pool.run(lambda i=i: i) for i in range(size + 100)]
        release.set()
        self.assertTrue(await first)
        self.assertEqual(await gatherResults(calls), list(range(size + 100)))

    async def test_stopWaitsForQueuedCalls(self) -> None:
        """
        Stopping the pool lets running and queued calls finish; after that,
        calls run at once on the caller's thread, so connections closing at
        shutdown still close their files.
        """
        pool = createPool(reactor, 1)
        pool.start()
        release = threading.Event()
        done = []

        def slow() -> None:
            release.wait(WAIT)
            done.append("slow")

        running = pool.run(slow)
        queued = pool.run(done.append, "queued")
        # stop() joins the threads; release the first call meanwhile.
        threading.Timer(0.1, release.set).start()
        pool.stop()
        self.assertEqual(done, ["slow", "queued"])
        await gatherResults([running, queued])

        calledOn = []
        result = pool.run(lambda: calledOn.append(threading.current_thread()) or 7)
        self.assertEqual(self.successResultOf(result), 7)
        self.assertEqual(calledOn, [threading.main_thread()])

    def test_notStarted(self) -> None:
        """
        A pool that was never started refuses calls: a service started in
        the wrong order fails loudly instead of blocking the reactor.
        """
        pool = createPool(reactor, 2)
        f = self.failureResultOf(pool.run(lambda: None), RuntimeError)
        self.assertIn("not running", f.getErrorMessage())

    def test_atLeastOneThread(self) -> None:
        """
        A pool of no threads could never run anything.
        """
        self.assertRaises(ValueError, DiskIOPool, reactor, 0)


class DiskIOTests(SynchronousTestCase):
    """
    L{DiskIO} and L{DiskIOService} drive the pool.
    """

    def test_service(self) -> None:
        """
        The service starts the pool with the application and stops it.
        """
        pool = createPool(reactor, 2)
        service = DiskIOService(pool)
        service.startService()
        self.assertTrue(pool.started)
        service.stopService()
        self.assertFalse(pool.started)

    def test_runDelegates(self) -> None:
        """
        L{DiskIO.run} hands the call to its pool.
        """
        calls: list[tuple[Any, ...]] = []

        class FakePool:
            def run(self, fn: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
                calls.append((fn, args, kwargs))
                return Deferred()

        DiskIO(cast(DiskIOPool, FakePool())).run(print, 1, sep="")
        self.assertEqual(calls, [(print, (1,), {"sep": ""})])


def _waitFor(condition: Any) -> None:
    # On a helper thread: poll until true or fail.
    event = threading.Event()
    for _ in range(WAIT * 100):
        if condition():
            return
        event.wait(0.01)
    raise AssertionError("Condition never became true")
