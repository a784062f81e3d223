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
until the space is full,
the stream ends or fails, no data came for L{IDLE} seconds (a slow client
gives the thread back), or it held the socket for L{MAX_HOLD} seconds
(idle timeouts, the body rate watch and cancellation see progress in
bounded time). The count comes back to the reactor thread, which hands it
to the reader as if it had read the bytes itself.

A full space does not give the socket back: the thread keeps it (and its
duplicate), reads nothing, and the reactor, once the reader took the bytes,
gives it the next space (the other half of the upload's double buffer, free
while the first is written) or, when there is none now (the upload is
paused until a write completes), leaves it waiting and gives the space
when reading resumes; it takes the socket back only when the body ends,
the connection closes or the reader offers too little. A buffer used to
cost the reactor a C{stopReading} and C{startReading} (two C{epoll_ctl})
and the thread a C{dup}, C{close} and its own two C{epoll_ctl}.

One thread reads several sockets (L{SOCKETS_PER_THREAD}), and sockets go
to the least busy of L{DEFAULT_THREADS} threads. A thread per upload used
to cost 0.13 CPU s/GiB more system time with four uploads than the reactor
alone (the threads fought for the interpreter lock after every 64 KiB
read: 140,000 C{futex} calls per GiB against 2,400); now that a socket
alone on its thread returns to Python once per MiB (L{WAIT_ALL}), four
threads took 18% less CPU per GiB for four uploads than one thread reading
all four from its C{epoll}.

While the thread reads a single socket it reads it with blocking
C{recv_into} calls: one system call a read, the wait inside it, where
an C{epoll_wait} and a C{readv} with a turn of a Python loop took two
(the process took 13% less CPU per GiB, C{bench/README.rst}). Blocking
is a flag of the open file, shared with the reactor's socket, whose
transport therefore never waits on it (C{MSG_DONTWAIT}); it is
non-blocking again before the socket goes back.
With several sockets the thread waits on its C{epoll} and reads what is
ready.

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
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFromThreads

from imageio._log import Logger
from imageio._wakepipe import WakePipe

log = Logger()

#: Default number of pump threads: a socket alone on its thread is read
#: with receives that wait in the kernel (L{PumpThread}); several on one
#: thread cost a return to Python per client write.
DEFAULT_THREADS = 4

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

#: With one socket to read, the thread waits at most this long for data
#: before it looks for the reactor's commands (a new lend, a stop).
LEAN_WAIT = 0.015

#: ... and each of its receives waits for this many bytes (or the space's
#: end, the stream's end, or L{LEAN_WAIT} seconds), in the kernel.
WAIT_ALL = 1024 * 1024

#: Why a pump reported (the second item of its result). L{FULL}: the
#: space is full and the thread still holds the socket, reading nothing,
#: until the reactor gives it the next space (L{Lend.refill}) or takes the
#: socket back (L{Lend.release}). Every other reason gives it back.
FULL = "full"
EOF = "eof"
ERROR = "error"
IDLE_END = "idle"
HELD = "held"
#: The thread closed its duplicate after L{Lend.release} (seen by
#: L{BodyPump} only, never by the transport).
RELEASED = "released"

_READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP
_DONTWAIT = socket.MSG_DONTWAIT
_WAITALL = socket.MSG_WAITALL


class Lend:
    """
    A socket lent to a pump thread, for as many spaces as the reactor gives
    it: the thread fills one space, reports it L{FULL} and waits, holding
    the socket, for the next one.

    Who owns what: the thread reads into the space it was given until it
    reports; from then on the reactor owns the bytes and decides, once per
    L{FULL} report and on the reactor thread only, whether to L{refill} or
    L{release}. Between the report and that decision nobody reads the
    socket.

    @ivar fd: The thread's duplicate of the socket (closed by the thread).
    @ivar onResult: Called on the reactor thread with C{(n, why)} for each
        report: C{n} bytes read into the start of the space.
    """

    __slots__ = (
        "thread",
        "fd",
        "view",
        "size",
        "total",
        "idle",
        "hold",
        "until",
        "last",
        "onResult",
        "sock",
    )

    def __init__(
        self,
        thread: PumpThread,
        fd: int,
        view: memoryview,
        idle: float,
        maxHold: float,
        onResult: Callable[[int, str], object],
    ) -> None:
        self.thread = thread
        self.fd = fd
        self.view: memoryview | None = view
        self.size = len(view)
        self.total = 0
        self.idle = idle
        self.hold = maxHold
        self.until = 0.0
        self.last = 0.0
        self.onResult = onResult
        #: A socket object on C{fd}, for the lean loop (L{PumpThread}).
        self.sock: socket.socket | None = None

    def refill(self, view: memoryview) -> None:
        """
        Read on into C{view}, after a L{FULL} report. Reactor thread only.
        """
        self.thread._order(self, view)

    def release(self) -> None:
        """
        Give the socket back after a L{FULL} report: the thread reads it no
        more (the caller may read it at once, once it made it non-blocking
        again: the thread made the open file blocking) and closes its
        duplicate. Reactor thread only.
        """
        self.thread._order(self, None)


# A command for the thread: a new lend or a refill (the space), a release
# (None); None alone stops the thread.
_Command = tuple[Lend, memoryview | None] | None


class PumpThread:
    """
    One pump thread: reads a single socket lent to it with blocking
    receives, several as its C{epoll} reports them readable, so that
    several uploads cost one wake-up when their data arrives together, and
    one thread, not one per upload, takes the interpreter lock after each
    read.

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
        self._new: deque[_Command] = deque()
        self._thread: threading.Thread | None = None
        self._pipe: WakePipe | None = None

    @property
    def started(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._pipe = WakePipe(blockingRead=False)
        # Here, not on the thread: its descriptors exist once start returns.
        epoll = select.epoll()
        self._thread = threading.Thread(
            target=self._run, args=(epoll,), name=self.name, daemon=True
        )
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
        self,
        fd: int,
        view: memoryview,
        idle: float,
        maxHold: float,
        onResult: Callable[[int, str], object],
    ) -> Lend:
        """
        Read socket C{fd} (which the thread closes) into C{view}.

        @param onResult: Called on the reactor thread with the bytes read
            into the start of the space and why the thread reported, once
            per space.
        @return: The lend, to refill or release after a L{FULL} report.
        """
        entry = Lend(self, fd, view, idle, maxHold, onResult)
        self._order(entry, view)
        return entry

    # Internals

    def _order(self, entry: Lend, view: memoryview | None) -> None:
        self._new.append((entry, view))
        self._wake()

    def _wake(self) -> None:
        assert self._pipe is not None
        self._pipe.wake()

    def _run(self, epoll: select.epoll) -> None:
        # Sockets with space (registered in epoll), and those waiting for
        # the reactor after a FULL report.
        lent: dict[int, Lend] = {}
        parked: dict[int, Lend] = {}
        try:
            self._loop(epoll, lent, parked)
        except BaseException:
            # A bug: give the sockets back rather than hang their uploads.
            log.failure("Body pump thread failed")
            for entry in lent.values():
                self._finish(epoll, entry, ERROR)
            for entry in parked.values():
                self._finish(None, entry, ERROR)
        finally:
            epoll.close()

    def _commands(
        self, epoll: select.epoll, lent: dict[int, Lend], parked: dict[int, Lend], now: float
    ) -> bool:
        """
        Take the reactor's commands.

        @return: Whether the thread goes on.
        """
        while self._new:
            command = self._new.popleft()
            if command is None:
                for entry in lent.values():
                    self._finish(epoll, entry, EOF)
                for entry in parked.values():
                    self._finish(None, entry, EOF)
                lent.clear()
                parked.clear()
                return False
            entry, view = command
            parked.pop(entry.fd, None)
            if view is None:
                self._finish(None, entry, RELEASED)
                continue
            if entry.sock is None:
                entry.sock = self._blocking(entry)
            entry.view = view
            entry.size = len(view)
            entry.total = 0
            entry.last = now
            entry.until = now + entry.hold
            lent[entry.fd] = entry
            epoll.register(entry.fd, _READ_EVENTS)
        return True

    def _loop(self, epoll: select.epoll, lent: dict[int, Lend], parked: dict[int, Lend]) -> None:
        pipe = self._pipe
        assert pipe is not None
        wakeRead = pipe.readFD
        epoll.register(wakeRead, select.EPOLLIN)
        clock = self.clock
        timeout = -1.0
        while True:
            if len(lent) == 1 and not self._new:
                # One socket to read: the lean loop, until a command comes.
                [(fd, only)] = lent.items()
                why = self._lean(only)
                if why == FULL:
                    self._park(epoll, lent, parked, only)
                elif why is not None:
                    del lent[fd]
                    self._finish(epoll, only, why)
                timeout = 0.0
                continue
            events = epoll.poll(timeout)
            now = clock()
            for fd, _ in events:
                if fd == wakeRead:
                    pipe.drain()
                    if not self._commands(epoll, lent, parked, now):
                        return
                    continue
                entry = lent.get(fd)
                if entry is None:
                    # Reported full in this same pass.
                    continue
                assert entry.view is not None and entry.sock is not None
                try:
                    n = entry.sock.recv_into(entry.view[entry.total :], 0, _DONTWAIT)
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
                    self._park(epoll, lent, parked, entry)
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

    def _blocking(self, entry: Lend) -> socket.socket:
        """
        @return: A blocking socket object on the duplicate, whose blocking
            receives give up after L{LEAN_WAIT} seconds (or the idle time).
            Blocking is a flag of the open file, shared with the reactor's
            socket: its transport never waits (C{MSG_DONTWAIT}), and it is
            non-blocking again before the socket goes back.
        """
        sock = socket.socket(fileno=entry.fd)
        sock.setblocking(True)
        seconds, fraction = divmod(min(entry.idle, LEAN_WAIT), 1.0)
        # A zero timeval would wait for ever.
        micro = max(1, int(fraction * 1e6)) if not seconds else int(fraction * 1e6)
        timeval = struct.pack("ll", int(seconds), micro)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        return sock

    def _lean(self, entry: Lend) -> str | None:
        """
        Read the only socket with space with blocking receives that wait
        for L{WAIT_ALL} bytes (C{MSG_WAITALL}: the kernel copies what
        arrives as it arrives, and returns after a MiB, where an C{epoll}
        loop returns to Python twice per 64 KiB a client writes), until the
        space is full, the stream ends or fails, it idled or was held long
        enough, or a command came (the pipe is not watched here: every
        read, and every L{LEAN_WAIT} seconds without data, looks for one).

        @return: Why it stopped, or C{None} for a command.
        """
        sock = entry.sock
        view = entry.view
        assert sock is not None and view is not None
        recvInto = sock.recv_into
        clock = self.clock
        new = self._new
        total, size, until, idle, last = (
            entry.total,
            entry.size,
            entry.until,
            entry.idle,
            entry.last,
        )
        why = None
        try:
            while True:
                try:
                    n = recvInto(view[total : total + WAIT_ALL], 0, _WAITALL)
                except BlockingIOError:
                    # No data for LEAN_WAIT seconds (SO_RCVTIMEO).
                    now = clock()
                    if now - last >= idle:
                        why = IDLE_END
                        break
                    if now >= until:
                        why = HELD
                        break
                    if new:
                        break
                    continue
                except OSError:
                    why = ERROR
                    break
                if not n:
                    why = EOF
                    break
                total += n
                last = clock()
                if total == size:
                    why = FULL
                    break
                if new:
                    break
                if last >= until:
                    why = HELD
                    break
        finally:
            entry.total = total
            entry.last = last
        return why

    def _park(
        self, epoll: select.epoll, lent: dict[int, Lend], parked: dict[int, Lend], entry: Lend
    ) -> None:
        # A full space: keep the socket and its duplicate, the reactor
        # refills or releases it. Nothing reads it meanwhile.
        del lent[entry.fd]
        epoll.unregister(entry.fd)
        parked[entry.fd] = entry
        entry.view = None
        self.reactor.callFromThread(entry.onResult, entry.total, FULL)

    def _finish(self, epoll: select.epoll | None, entry: Lend, why: str) -> None:
        # The socket goes back: unregistered (if it was), its duplicate
        # closed, then the report.
        if epoll is not None:
            try:
                epoll.unregister(entry.fd)
            except (OSError, ValueError):
                pass
        if entry.sock is not None:
            entry.sock.setblocking(False)
            entry.sock.close()
        else:
            os.close(entry.fd)
        # A parked socket's bytes were reported with its FULL.
        total = 0 if entry.view is None else entry.total
        self.reactor.callFromThread(entry.onResult, total, why)
        entry.view = None


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
    #: Pumps started, spaces they filled (and kept the socket), and body
    #: bytes they read (for metrics and tests).
    pumps: int = field(default=0, init=False)
    spaces: int = field(default=0, init=False)
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
        # All at once: a thread started with its first socket would open
        # its descriptors (a pipe, an epoll) in the middle of a transfer.
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

    def pump(self, fd: int, view: memoryview, onResult: Callable[[int, str], object]) -> Lend:
        """
        Read from socket C{fd} into C{view} on the least busy thread
        (L{available} must be true). The caller must not read C{fd} until
        the socket comes back; closing it is safe.

        @param onResult: Called on the reactor thread with the bytes read
            into the start of the space and why the thread reported: L{FULL}
            (the thread keeps the socket until L{Lend.refill} or
            L{Lend.release}, which gives it back at once), L{EOF},
            L{ERROR}, L{IDLE_END} or L{HELD} (the socket is back). On end
            of stream or an error the thread stops without reading
            further: the transport reads again on the reactor, which sees
            the same.
        @return: The lend.
        """
        if not self.available():
            raise RuntimeError("No body pump thread is free")
        index = self._lent.index(min(self._lent))

        def returned(n: int, why: str) -> None:
            self.bytesRead += n
            if why == FULL:
                self.spaces += 1
            else:
                self._lent[index] -= 1
                if why == RELEASED:
                    return
            onResult(n, why)

        thread = self.threads[index]
        dup = os.dup(fd)
        try:
            lend = thread.lend(dup, view, self.idle, self.maxHold, returned)
        except BaseException:
            os.close(dup)
            raise
        self._lent[index] += 1
        self.pumps += 1
        return lend


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
