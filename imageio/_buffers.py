# -*- test-case-name: tests.test_upload -*-
"""
Page-aligned buffers for O_DIRECT I/O, and the memory budget they share.
"""

from __future__ import annotations

import mmap
import weakref
from collections import deque

from attrs import define, field
from twisted.internet.defer import Deferred, succeed

from imageio._log import Logger

log = Logger()

#: Alignment of every buffer from L{allocate}; enough for O_DIRECT on any
#: storage with logical blocks up to 4 KiB.
ALIGNMENT = mmap.PAGESIZE


#: Upload buffers of at least this size ask for transparent huge pages.
HUGE_PAGE = 2 * 1024 * 1024


def allocate(size: int, huge: bool = False) -> mmap.mmap:
    """
    Allocate a zero-filled, page-aligned buffer of C{size} bytes (rounded up
    to a whole page).

    Anonymous mmap gives page alignment for free and returns the memory to
    the system when the buffer is closed or collected.

    @param huge: The buffer will be filled whole (an upload buffer, sized
        to the body). It is then private memory rather than Python's
        default shared anonymous memory (shmem), where a first touch costs
        more (3.2-4.2 ms instead of 1.8-2.6 ms per fresh 4 MiB in a VM),
        asks for transparent huge pages (C{MADV_HUGEPAGE}) from
        L{HUGE_PAGE} bytes on, so a fresh 4 MiB buffer takes two page
        faults instead of 1024 (0.2-0.3 ms), and is kept out of forked
        children (C{MADV_DONTFORK}: no copy-on-write under an O_DIRECT
        transfer). Not for buffers that may be touched only in part: a
        small read into a huge download buffer would hold a 2 MiB page.
    """
    size = max(ALIGNMENT, (size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT)
    if not huge:
        return mmap.mmap(-1, size)
    buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE)
    _advise(buf, getattr(mmap, "MADV_DONTFORK", None))
    if size >= HUGE_PAGE:
        _advise(buf, getattr(mmap, "MADV_HUGEPAGE", None))
    return buf


def _advise(buf: mmap.mmap, option: int | None) -> None:
    # Advice only: a kernel without THP (EINVAL) allocates normal pages.
    if option is not None:
        try:
            buf.madvise(option)
        except OSError:
            pass


@define(eq=False)
class Lease:
    """
    Bytes of a L{BufferBudget} held by one buffer (or one piece of work).

    @ivar size: The bytes held.
    """

    budget: BufferBudget
    size: int
    released: bool = False

    def release(self) -> None:
        """
        Give the bytes back to the budget; only the first call counts.
        """
        if not self.released:
            self.released = True
            self.budget._release(self.size)


class BufferBudget:
    """
    The memory that transfer buffers (upload and download buffers, checksum
    blocks) may hold at once, shared by all connections.

    Work that needs a buffer asks with L{acquire} and waits, in order of
    asking, while the budget is used up; it gives the bytes back with
    L{Lease.release} however it ends. A request larger than the whole
    budget is granted once nothing else is held, so it still runs. Spare
    buffers that connections keep between requests (L{BufferPool}) are
    given back first when work would wait. Waiting is logged once per
    episode.

    @ivar limit: Bytes that may be held at once; 0 for no limit.
    @ivar used: Bytes held now.
    @ivar waits: Requests that had to wait, since the start.
    """

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.used = 0
        self.waits = 0
        self._waiters: deque[tuple[int, Deferred[Lease]]] = deque()
        self._pools: weakref.WeakSet[BufferPool] = weakref.WeakSet()
        self._granting = False
        self._episodeWaits = 0

    @property
    def waiting(self) -> int:
        """
        Requests waiting for buffers now.
        """
        return len(self._waiters)

    def _fits(self, size: int) -> bool:
        return self.limit <= 0 or self.used == 0 or self.used + size <= self.limit

    def tryAcquire(self, size: int) -> Lease | None:
        """
        @return: A lease of C{size} bytes if the budget has them now and
            nobody is waiting, else C{None}.
        """
        if self._waiters or not self._fits(size):
            return None
        self.used += size
        return Lease(self, size)

    def acquire(self, size: int) -> Deferred[Lease]:
        """
        @return: A Deferred firing with a lease of C{size} bytes once the
            budget has them; cancel it to stop waiting.
        """
        lease = self.tryAcquire(size)
        if lease is None and not self._waiters:
            self._reclaim()
            lease = self.tryAcquire(size)
        if lease is not None:
            return succeed(lease)
        d: Deferred[Lease] = Deferred(self._cancel)
        if not self._waiters:
            self._episodeWaits = 0
            log.warn(
                "Transfer buffers use {used} of {limit} bytes ([daemon] buffer_memory): "
                "transfers wait for buffers",
                used=self.used,
                limit=self.limit,
            )
        self._waiters.append((size, d))
        self.waits += 1
        self._episodeWaits += 1
        return d

    def addPool(self, pool: BufferPool) -> None:
        self._pools.add(pool)

    def removePool(self, pool: BufferPool) -> None:
        self._pools.discard(pool)

    def _reclaim(self) -> None:
        for pool in list(self._pools):
            pool.clear()

    def _cancel(self, d: Deferred[Lease]) -> None:
        for i, (_, waiter) in enumerate(self._waiters):
            if waiter is d:
                del self._waiters[i]
                break
        # The head may have been the one in the way.
        self._grant()

    def _release(self, size: int) -> None:
        self.used -= size
        assert self.used >= 0, "budget released more than acquired"
        self._grant()

    def _grant(self) -> None:
        if self._granting:
            return
        self._granting = True
        try:
            while self._waiters and self._fits(self._waiters[0][0]):
                size, d = self._waiters.popleft()
                self.used += size
                d.callback(Lease(self, size))
        finally:
            self._granting = False
        if not self._waiters and self._episodeWaits:
            log.info(
                "Transfer buffers available again after {count} waits",
                count=self._episodeWaits,
            )
            self._episodeWaits = 0


@define(eq=False, weakref_slot=True)
class BufferPool:
    """
    Spare buffers one connection keeps between requests, still held from
    the budget; given back when the connection closes or when work waits
    for buffers.
    """

    budget: BufferBudget
    keep: int = 2
    _spares: list[tuple[memoryview, Lease]] = field(factory=list, init=False)
    closed: bool = field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self.budget.addPool(self)

    def __len__(self) -> int:
        return len(self._spares)

    def take(self) -> tuple[memoryview, Lease] | None:
        """
        @return: A spare buffer and its lease, if any.
        """
        return self._spares.pop() if self._spares else None

    def give(self, buf: memoryview, lease: Lease) -> None:
        """
        Keep C{buf} for a later request, or give its bytes back when the
        pool is full or closed, or when work is waiting for buffers.
        """
        if self.closed or len(self._spares) >= self.keep or self.budget.waiting:
            lease.release()
        else:
            self._spares.append((buf, lease))

    def clear(self) -> None:
        spares, self._spares = self._spares, []
        for _, lease in spares:
            lease.release()

    def close(self) -> None:
        self.closed = True
        self.clear()
        self.budget.removePool(self)
