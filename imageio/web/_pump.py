# -*- test-case-name: tests.test_pump -*-
"""
The body pump: large request bodies read on a thread while data flows.

On the reactor every read of a request body costs a wake-up of the event
loop and a few dozen Python calls of Twisted's dispatch around one
C{recv_into}; a fast local client sends 64 KiB a time, so a GiB costs
16,000 of them. Upstream reads with a blocking C{recv_into} on a thread per
connection, nearly all of it in the kernel.

So while a plain socket delivers a large body quickly, its transport
(L{imageio.web._transport}) stops reading on the reactor and lends the
socket and the upload buffer's free space to a pump thread, which loops
C{poll} and C{readv} until the space is full, the stream ends or fails,
no data came for L{IDLE} seconds (a slow client gives the thread back),
or it held the socket for L{MAX_HOLD} seconds (idle timeouts, the body
rate watch and cancellation see progress in bounded time). The count
comes back to the reactor thread, which hands it to the reader as if it
had read the bytes itself.

The thread reads a C{dup} of the socket: closing the connection on the
reactor can never make it read a reused descriptor number. The transport
shuts the read side down when the connection is lost while a pump runs,
which wakes the thread at once.

The threads are a L{imageio._diskio.DiskIOPool} of their own
(C{[daemon] body_threads}), never the disk-io pool: a pump only starts if a
thread is free, the reactor never waits for one.
"""

from __future__ import annotations

import os
import select
import time
from collections.abc import Callable

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads

from imageio._diskio import DiskIOPool

#: Default number of pump threads: one per concurrent fast upload.
DEFAULT_THREADS = 4

#: A pump starts only when the reader offers at least this much space;
#: smaller bodies (and buffer tails) are read on the reactor.
MIN_BUFFER = 256 * 1024

#: ... and only after a reactor read of at least this much: data is
#: flowing fast, the thread will not wait for it.
MIN_READ = 32 * 1024

#: Seconds without data after which the thread gives the socket back.
IDLE = 0.015

#: Most seconds a pump holds the socket.
MAX_HOLD = 0.5

#: Why a pump ended (the second item of its result).
FULL = "full"
EOF = "eof"
ERROR = "error"
IDLE_END = "idle"
HELD = "held"


def pumpInto(
    fd: int,
    view: memoryview,
    idle: float = IDLE,
    maxHold: float = MAX_HOLD,
    clock: Callable[[], float] = time.monotonic,
) -> tuple[int, str]:
    """
    Read from the non-blocking socket C{fd} into C{view} until it is full,
    the peer closes, an error, C{idle} seconds without data or C{maxHold}
    seconds. Runs on a pump thread; closes C{fd} whatever happens.

    On end of stream or an error it stops without reading further: the
    transport reads again on the reactor, which sees the same and runs the
    usual connection-lost path.

    @return: Bytes read into the start of C{view}, and why it stopped
        (L{FULL}, L{EOF}, L{ERROR}, L{IDLE_END} or L{HELD}).
    """
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        wait = max(1, round(idle * 1000))
        size = len(view)
        total = 0
        deadline = clock() + maxHold
        while total < size:
            if not poller.poll(wait):
                return total, IDLE_END
            try:
                n = os.readv(fd, (view[total:],))
            except BlockingIOError:
                continue
            except OSError:
                return total, ERROR
            if not n:
                return total, EOF
            total += n
            if clock() >= deadline:
                return total, HELD
        return total, FULL
    finally:
        os.close(fd)


@define
class BodyPump:
    """
    Lends sockets to a bounded pool of pump threads.

    @ivar pool: The pump threads (started and stopped by the service).
    @ivar minBuffer: Least space worth a pump.
    @ivar minRead: Least bytes of the reactor read that starts a pump.
    @ivar idle: Seconds without data that end a pump.
    @ivar maxHold: Most seconds one pump holds a socket.
    """

    pool: DiskIOPool
    minBuffer: int = MIN_BUFFER
    minRead: int = MIN_READ
    idle: float = IDLE
    maxHold: float = MAX_HOLD
    #: Pumps started, and body bytes they read (for metrics and tests).
    pumps: int = field(default=0, init=False)
    bytesRead: int = field(default=0, init=False)

    def available(self) -> bool:
        """
        @return: Whether a thread is free for L{pump} now. Reactor thread
            only.
        """
        return self.pool.idle > 0

    def pump(self, fd: int, view: memoryview) -> Deferred[tuple[int, str]]:
        """
        Read from socket C{fd} into C{view} on a free thread (L{available}
        must be true). The caller must not read C{fd} until the result
        arrives; closing it is safe.

        @return: A Deferred firing on the reactor thread with what
            L{pumpInto} returns.
        """
        if not self.available():
            raise RuntimeError("No body pump thread is free")
        dup = os.dup(fd)
        try:
            d = self.pool.run(pumpInto, dup, view, self.idle, self.maxHold)
        except BaseException:
            os.close(dup)
            raise
        self.pumps += 1
        return d.addCallback(self._count)

    def _count(self, result: tuple[int, str]) -> tuple[int, str]:
        self.bytesRead += result[0]
        return result


def createPool(reactor: IReactorFromThreads, threads: int = DEFAULT_THREADS) -> DiskIOPool:
    """
    @return: A new, not yet started, pool of C{threads} pump threads.
    """
    return DiskIOPool(reactor, threads, name="body-pump")
