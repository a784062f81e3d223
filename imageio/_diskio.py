# -*- test-case-name: tests.test_diskio -*-
"""
The disk-io thread pool: the only place where storage calls block.

Every read, write, fsync, fallocate and ioctl on storage goes through
L{DiskIO.run}, which runs it on a dedicated, bounded L{DiskIOPool} and hands
the result back on the reactor thread. The reactor's own pool stays free for
name resolution.

Small requests (a 4 KiB read) cost little more than this hand-off, so the
pool is built for it: workers wait on a pipe rather than on a condition
variable. A pipe write is a synchronous wake-up for the kernel, which then
prefers to run the worker on the reactor's CPU while the reactor sleeps. On
a 2-vCPU VM a reactor -> pool -> reactor round trip costs about 60 us of CPU
this way against 95 us through Twisted's C{ThreadPool}
(C{bench/request_cost.py}).
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure

from imageio._wakepipe import WakePipe

P = ParamSpec("P")
T = TypeVar("T")

#: Default number of disk-io threads: enough for a few concurrent transfers
#: to keep storage busy; more threads only add contention on 2 cores.
DEFAULT_THREADS = 8

# A queued call: function, arguments, keyword arguments, its Deferred.
_Task = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any], Deferred[Any]]


class DiskIOPool:
    """
    A bounded pool of threads for blocking calls, started lazily up to
    C{maxThreads}.

    Calls wait in a deque; each one also writes a byte to a pipe on which
    idle workers block. A worker takes calls from the deque before it waits,
    so a byte may outlive its call (a spurious wake-up, harmless), and a
    full pipe loses no call.

    @ivar reactor: Where results are delivered.
    @ivar maxThreads: The most threads running calls at once.
    @ivar name: Prefix of the threads' names.
    """

    def __init__(
        self, reactor: IReactorFromThreads, maxThreads: int = DEFAULT_THREADS, name: str = "disk-io"
    ) -> None:
        if maxThreads < 1:
            raise ValueError(f"A pool needs at least one thread, not {maxThreads}")
        self.reactor = reactor
        self.maxThreads = maxThreads
        self.name = name
        self._tasks: deque[_Task | None] = deque()
        self._threads: list[threading.Thread] = []
        # Calls queued or running, not yet delivered; reactor thread only.
        self._busy = 0
        self._pipe: WakePipe | None = None
        self.started = False
        self._stopped = False

    @property
    def threads(self) -> int:
        """
        Threads started so far.
        """
        return len(self._threads)

    def start(self) -> None:
        if self.started:
            return
        self._stopped = False
        # A full pipe does not block the reactor; workers drain the deque.
        self._pipe = WakePipe()
        self.started = True

    def stop(self) -> None:
        """
        Wait for running and queued calls to finish, then end the threads.
        Their results are delivered to the reactor if it still runs.
        """
        if not self.started:
            return
        self.started = False
        self._stopped = True
        for _ in self._threads:
            self._tasks.append(None)
            self._wake()
        for thread in self._threads:
            thread.join()
        self._threads.clear()
        assert self._pipe is not None
        self._pipe.close()

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """
        Call C{fn(*args, **kwargs)} on a pool thread. Reactor thread only.

        @return: A Deferred firing on the reactor thread with the result.
        """
        if not self.started:
            if self._stopped:
                # Shutting down: connections closing after the pool stopped
                # still close their files, here and now.
                return _inline(fn, *args, **kwargs)
            return fail(RuntimeError(f"The {self.name} pool is not running"))
        d: Deferred[T] = Deferred()
        self._busy += 1
        self._tasks.append((fn, args, kwargs, d))
        # One thread more than busy ones: the next call wakes a thread
        # already waiting on the pipe rather than the one still returning
        # the last result, which cuts a lone caller's round trip by a third.
        if self._busy >= len(self._threads) < self.maxThreads:
            thread = threading.Thread(
                target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(thread)
            thread.start()
        self._wake()
        return d

    # Internals

    def _wake(self) -> None:
        assert self._pipe is not None
        self._pipe.wake()

    def _work(self) -> None:
        tasks = self._tasks
        deliver = self.reactor.callFromThread
        assert self._pipe is not None
        wakeRead = self._pipe.readFD
        while True:
            try:
                task = tasks.popleft()
            except IndexError:
                os.read(wakeRead, 1)
                continue
            if task is None:
                return
            fn, args, kwargs, d = task
            try:
                result = fn(*args, **kwargs)
            except BaseException:
                deliver(self._deliver, d, False, Failure())
            else:
                deliver(self._deliver, d, True, result)
            # Drop references before waiting: buffers are reused.
            del task, fn, args, kwargs, d

    def _deliver(self, d: Deferred[Any], ok: bool, result: Any) -> None:
        self._busy -= 1
        if ok:
            d.callback(result)
        else:
            d.errback(result)


@define
class DiskIO:
    """
    Runs blocking storage calls on a bounded thread pool.

    @ivar pool: The dedicated pool; started and stopped by L{DiskIOService}.
    """

    pool: DiskIOPool

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """
        Call C{fn(*args, **kwargs)} on the pool.

        @return: A Deferred firing on the reactor thread with the result.
        """
        return self.pool.run(fn, *args, **kwargs)


@define
class SynchronousDiskIO:
    """
    Runs calls at once, on the calling thread. For unit tests only, where a
    real pool would make tests non-deterministic.
    """

    calls: int = field(default=0, init=False)

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        self.calls += 1
        return _inline(fn, *args, **kwargs)


def _inline(fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
    try:
        result = fn(*args, **kwargs)
    except BaseException:
        return fail(Failure())
    return succeed(result)


def createPool(reactor: IReactorFromThreads, threads: int = DEFAULT_THREADS) -> DiskIOPool:
    """
    @return: A new, not yet started, disk-io pool of at most C{threads}.
    """
    return DiskIOPool(reactor, threads)


class DiskIOService(Service):
    """
    Starts the disk-io pool with the application and joins it on shutdown,
    after in-flight storage calls returned.
    """

    name = "disk-io"

    def __init__(self, pool: DiskIOPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()
