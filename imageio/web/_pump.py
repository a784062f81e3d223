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
socket and the upload buffer's free space to a pump thread, which reads it
with C{readv} as its C{epoll} reports it readable until the space is full,
the stream ends or fails, no data came for L{IDLE} seconds (a slow client
gives the thread back), or it held the socket for L{MAX_HOLD} seconds
(idle timeouts, the body rate watch and cancellation see progress in
bounded time). The count comes back to the reactor thread, which hands it
to the reader as if it had read the bytes itself.

One thread reads several sockets (L{SOCKETS_PER_THREAD}): a thread per
upload, as upstream has, measured 0.13 CPU s/GiB more system time with
four uploads than the reactor alone (the threads fought for the
interpreter lock after every read: 140,000 C{futex} calls per GiB
against 2,400), while one thread with its own C{epoll} reads what arrived
on all of them per wake-up.

The thread reads a C{dup} of the socket: closing the connection on the
reactor can never make it read a reused descriptor number. The transport
shuts the read side down when the connection is lost while a pump runs,
which wakes the thread at once.

The threads are their own (C{[daemon] body_threads}), never the disk-io
pool: a pump only starts if a thread has room, the reactor never waits.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFromThreads

from imageio._log import Logger
from imageio._wakepipe import WakePipe

log = Logger()

#: Default number of pump threads.
DEFAULT_THREADS = 1

#: Most sockets one pump thread reads at once; more read on the reactor.
SOCKETS_PER_THREAD = 8

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

_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP


class _Lent:
    """
    A socket lent to a pump thread: where its bytes go and since when.
    """

    __slots__ = ("fd", "view", "size", "total", "idle", "until", "last", "d")

    def __init__(
        self, fd: int, view: memoryview, idle: float, maxHold: float, d: Deferred[Any]
    ) -> None:
        self.fd = fd
        self.view = view
        self.size = len(view)
        self.total = 0
        self.idle = idle
        self.until = maxHold
        self.last = 0.0
        self.d = d


class PumpThread:
    """
    One pump thread: reads every socket lent to it with C{readv} as its
    C{epoll} reports them readable, so that several uploads cost one
    wake-up when their data arrives together, and one thread, not one per
    upload, takes the interpreter lock after each read.

    @ivar reactor: Where results are delivered (C{callFromThread}).
    @ivar clock: The monotonic clock of idle and hold times.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        name: str = "body-pump",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.reactor = reactor
        self.name = name
        self.clock = clock
        self._new: deque[_Lent | None] = deque()
        self._thread: threading.Thread | None = None
        self._pipe: WakePipe | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._pipe = WakePipe(blockingRead=False)
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """
        Give every socket back (their results are delivered if the reactor
        still runs) and end the thread.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._new.append(None)
        self._wake()
        thread.join()
        assert self._pipe is not None
        self._pipe.close()

    def lend(
        self, fd: int, view: memoryview, idle: float, maxHold: float
    ) -> Deferred[tuple[int, str]]:
        """
        Read socket C{fd} (which the thread closes) into C{view}.

        @return: A Deferred firing on the reactor thread with the bytes read
            into the start of C{view} and why the thread stopped.
        """
        d: Deferred[tuple[int, str]] = Deferred()
        self._new.append(_Lent(fd, view, idle, maxHold, d))
        self._wake()
        return d

    # Internals

    def _wake(self) -> None:
        assert self._pipe is not None
        self._pipe.wake()

    def _run(self) -> None:
        epoll = select.epoll()
        lent: dict[int, _Lent] = {}
        try:
            self._loop(epoll, lent)
        except BaseException:
            # A bug: give the sockets back rather than hang their uploads.
            log.failure("Body pump thread failed")
            for entry in lent.values():
                self._finish(epoll, entry, ERROR)
        finally:
            epoll.close()

    def _loop(self, epoll: select.epoll, lent: dict[int, _Lent]) -> None:
        pipe = self._pipe
        assert pipe is not None
        wakeRead = pipe.readFD
        epoll.register(wakeRead, select.EPOLLIN)
        clock = self.clock
        readv = os.readv
        timeout = -1.0
        while True:
            events = epoll.poll(timeout)
            now = clock()
            for fd, _ in events:
                if fd == wakeRead:
                    pipe.drain()
                    while self._new:
                        entry = self._new.popleft()
                        if entry is None:
                            for entry in lent.values():
                                self._finish(epoll, entry, EOF)
                            lent.clear()
                            return
                        entry.last = now
                        entry.until += now
                        lent[entry.fd] = entry
                        epoll.register(entry.fd, _READ_EVENTS)
                    continue
                entry = lent[fd]
                try:
                    n = readv(fd, (entry.view[entry.total :],))
                except BlockingIOError:
                    continue
                except OSError:
                    del lent[fd]
                    self._finish(epoll, entry, ERROR)
                    continue
                if not n:
                    del lent[fd]
                    self._finish(epoll, entry, EOF)
                    continue
                entry.total += n
                entry.last = now
                if entry.total == entry.size:
                    del lent[fd]
                    self._finish(epoll, entry, FULL)
            # Idle and held sockets go back; the next wake-up is the
            # earliest of their deadlines.
            timeout = -1.0
            for fd, entry in list(lent.items()):
                if now >= entry.until:
                    why = HELD
                elif now - entry.last >= entry.idle:
                    why = IDLE_END
                else:
                    due = min(entry.until, entry.last + entry.idle) - now
                    if timeout < 0 or due < timeout:
                        timeout = due
                    continue
                del lent[fd]
                self._finish(epoll, entry, why)
            if timeout > 0:
                # epoll rounds down to milliseconds: never wake too early.
                timeout += 0.001

    def _finish(self, epoll: select.epoll, entry: _Lent, why: str) -> None:
        try:
            epoll.unregister(entry.fd)
        except (OSError, ValueError):
            pass
        os.close(entry.fd)
        self.reactor.callFromThread(entry.d.callback, (entry.total, why))
        entry.view = entry.d = None  # type: ignore[assignment]


@define
class BodyPump:
    """
    Lends sockets to pump threads, at most L{SOCKETS_PER_THREAD} to each.

    @ivar threads: The pump threads (started and stopped by
        L{BodyPumpService}).
    @ivar minBuffer: Least space worth a pump.
    @ivar minRead: Least bytes of the reactor read that starts a pump.
    @ivar idle: Seconds without data that end a pump.
    @ivar maxHold: Most seconds one pump holds a socket.
    @ivar perThread: Most sockets one thread reads at once.
    """

    threads: list[PumpThread]
    minBuffer: int = MIN_BUFFER
    minRead: int = MIN_READ
    idle: float = IDLE
    maxHold: float = MAX_HOLD
    perThread: int = SOCKETS_PER_THREAD
    #: Pumps started, and body bytes they read (for metrics and tests).
    pumps: int = field(default=0, init=False)
    bytesRead: int = field(default=0, init=False)
    #: Sockets lent now, by thread; reactor thread only.
    _lent: list[int] = field(factory=list, init=False)
    running: bool = field(default=False, init=False)

    def __attrs_post_init__(self) -> None:
        self._lent = [0] * len(self.threads)

    @property
    def lent(self) -> int:
        """
        Sockets the threads hold now.
        """
        return sum(self._lent)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        self.running = True

    def stop(self) -> None:
        self.running = False
        for thread in self.threads:
            thread.stop()

    def available(self) -> bool:
        """
        @return: Whether a thread takes a socket now. Reactor thread only.
        """
        return self.running and min(self._lent, default=self.perThread) < self.perThread

    def pump(self, fd: int, view: memoryview) -> Deferred[tuple[int, str]]:
        """
        Read from socket C{fd} into C{view} on the least busy thread
        (L{available} must be true). The caller must not read C{fd} until
        the result arrives; closing it is safe.

        @return: A Deferred firing on the reactor thread with the bytes read
            into the start of C{view}, and why the thread stopped (L{FULL},
            L{EOF}, L{ERROR}, L{IDLE_END} or L{HELD}). On end of stream or an
            error the thread stops without reading further: the transport
            reads again on the reactor, which sees the same.
        """
        if not self.available():
            raise RuntimeError("No body pump thread is free")
        index = self._lent.index(min(self._lent))
        dup = os.dup(fd)
        try:
            d = self.threads[index].lend(dup, view, self.idle, self.maxHold)
        except BaseException:
            os.close(dup)
            raise
        self._lent[index] += 1
        self.pumps += 1
        return d.addCallback(self._returned, index)

    def _returned(self, result: tuple[int, str], index: int) -> tuple[int, str]:
        self._lent[index] -= 1
        self.bytesRead += result[0]
        return result


def createBodyPump(reactor: IReactorFromThreads, threads: int = DEFAULT_THREADS) -> BodyPump:
    """
    @return: A new, not yet started, body pump of C{threads} threads.
    """
    return BodyPump([PumpThread(reactor, f"body-pump-{i}") for i in range(threads)])


class BodyPumpService(Service):
    """
    Starts the pump threads with the application and ends them on shutdown
    (sockets they hold go back to the reactor).
    """

    name = "body-pump"

    def __init__(self, pump: BodyPump) -> None:
        self.pump = pump

    def startService(self) -> None:
        super().startService()
        self.pump.start()

    def stopService(self) -> None:
        super().stopService()
        self.pump.stop()
