# -*- test-case-name: tests.test_diskio -*-
"""
The disk-io thread pool: the only place where storage calls block.

Every read, write, fsync, fallocate and ioctl on storage goes through
L{DiskIO.run}, which runs it on a dedicated, bounded L{ThreadPool} and hands
the result back on the reactor thread. The reactor's own pool stays free for
name resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ParamSpec, TypeVar

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

P = ParamSpec("P")
T = TypeVar("T")

#: Default number of disk-io threads: enough for a few concurrent transfers
#: to keep storage busy; more threads only add contention on 2 cores.
DEFAULT_THREADS = 8


@define
class DiskIO:
    """
    Runs blocking storage calls on a bounded thread pool.

    @ivar reactor: Where results are delivered.
    @ivar pool: The dedicated thread pool; started and stopped by
        L{DiskIOService}.
    """

    reactor: IReactorFromThreads
    pool: ThreadPool

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """
        Call C{fn(*args, **kwargs)} on the pool.

        @return: A Deferred firing on the reactor thread with the result.
        """
        return deferToThreadPool(self.reactor, self.pool, fn, *args, **kwargs)


@define
class SynchronousDiskIO:
    """
    Runs calls at once, on the calling thread. For unit tests only, where a
    real pool would make tests non-deterministic.
    """

    calls: int = field(default=0, init=False)

    def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        self.calls += 1
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            return fail(Failure())
        return succeed(result)


def createPool(threads: int = DEFAULT_THREADS) -> ThreadPool:
    """
    @return: A new, not yet started, disk-io pool of at most C{threads}.
    """
    return ThreadPool(minthreads=0, maxthreads=threads, name="disk-io")


class DiskIOService(Service):
    """
    Starts the disk-io pool with the application and joins it on shutdown,
    after in-flight storage calls returned.
    """

    name = "disk-io"

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()
