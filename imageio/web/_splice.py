# -*- test-case-name: tests.test_splice -*-
"""
Download over a plain socket with C{splice(2)}: image bytes go file ->
pipe -> socket inside the kernel, never through our memory.

One pipe per transfer (L{PIPE_SIZE}). The disk-io pool fills it from the
C{O_DIRECT} file (that side of C{splice} blocks on the disk); the reactor
moves it into the socket with C{SPLICE_F_NONBLOCK} when the socket is
writable, through the transport's L{IDirectWriter} hook, so the response
head and anything else written to the transport goes first. The pool is
asked for more only while the pipe is at most half full, so a slow reader
holds at most one pipe of bytes, and no thread waits for the socket.

Unaligned edges of the range (C{O_DIRECT} wants block-aligned offsets and
lengths) are read with C{readInto} and written to the transport as usual,
the head before the pipe's bytes and the tail after them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from imageio._log import Logger
from imageio.interfaces import IDirectWriter, IDirectWriteTransport, ISpliceSource
from imageio.tickets import Operation, OperationCanceled
from imageio.web._download import ResponseProducer, TruncatedImage

log = Logger()

#: Pipe size asked for each transfer (C{F_SETPIPE_SZ}); the kernel's
#: default (64 KiB) is used when it refuses (C{/proc/sys/fs/pipe-max-size},
#: the per-user pipe page limits).
PIPE_SIZE = 1024 * 1024

#: A smaller pipe than this (the kernel refused the size asked, as for an
#: unprivileged user past C{fs.pipe-user-pages-soft}) costs more pool
#: round trips per GiB than the buffer path: that transfer takes it.
MIN_PIPE = 256 * 1024

#: Send buffer asked for a socket a download is spliced into (the kernel
#: doubles it, and caps it at C{net.core.wmem_max} unless the daemon may
#: exceed it). The default (about 200 KiB) takes a fifth of a pipe per
#: wake-up: about 4,000 C{EAGAIN} and as many extra reactor turns per GiB.
#: The socket holds the pipe's pages, not copies.
SEND_BUFFER = PIPE_SIZE

#: Downloads shorter than this take the usual path: the pipe costs a few
#: system calls to set up.
SPLICE_MIN = 1024 * 1024

_NONBLOCK = getattr(os, "SPLICE_F_NONBLOCK", 2) | getattr(os, "SPLICE_F_MOVE", 1)

# Process-wide: None until the kernel was asked, then whether it splices.
_usable: bool | None = None


class SpliceRefused(Exception):
    """
    The kernel cannot splice here; nothing was written: use the usual path.
    """


def probeSplice() -> bool:
    """
    Ask the kernel, once per process, whether it splices a pipe into a UNIX
    socket (with a socket pair and a pipe: no storage involved). The daemon
    asks when it starts, before the reactor runs, so that no download asks
    on the reactor thread.

    @return: Whether it does.
    """
    global _usable
    if _usable is None:
        _usable = _probeSocket()
    return _usable


def spliceUsable() -> bool:
    """
    @return: Whether this kernel splices a pipe into a UNIX socket
        (L{probeSplice}, asked here if nobody asked before), and no
        transfer found it refusing a file since.
    """
    return probeSplice()


def _probeSocket() -> bool:
    if not hasattr(os, "splice"):
        return _refuse("os.splice is missing")
    try:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as e:
        return _refuse(str(e))
    try:
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            os.write(w, b"x")
            a.setblocking(False)
            if os.splice(r, a.fileno(), 1, flags=_NONBLOCK) != 1:
                return _refuse("splice moved nothing")
        finally:
            os.close(r)
            os.close(w)
    except OSError as e:
        return _refuse(str(e))
    finally:
        a.close()
        b.close()
    return True


def _refuse(why: str) -> bool:
    global _usable
    if _usable is not False:
        log.info("Downloads will not use splice(2): {why}", why=why)
    _usable = False
    return False


def openPipe(size: int = PIPE_SIZE) -> tuple[int, int]:
    """
    @return: A non-blocking pipe (read end, write end) of C{size} bytes,
        or the kernel's default size if it refuses that.
    """
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        pass
    return r, w


def pipeSize(fd: int) -> int:
    return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))


def _raiseSendBuffer(transport: Any, size: int) -> None:
    # Best effort: the kernel caps it, and an unusual transport may have
    # no socket to tune.
    try:
        sock = transport.getHandle()
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < size:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    except (AttributeError, OSError):
        pass


@implementer(IPushProducer, IDirectWriter)
@define(eq=False)
class SpliceProducer(ResponseProducer):
    """
    Streams C{length} bytes at C{offset} of C{backend} into C{request},
    whose headers (with C{Content-Length}) are set, like
    L{imageio.web.DownloadProducer}: the same L{done}, cancel and
    inactivity semantics.

    @ivar done: Fires when the response is complete; fails when it was cut,
        or with L{SpliceRefused} before anything was written when the
        kernel cannot splice this file (then nothing changed: the caller
        uses the usual producer).
    """

    request: Request
    backend: Any  # IBackend and ISpliceSource
    offset: int
    length: int
    op: Operation
    clock: IReactorTime
    idleTimeout: float | None = None
    size: int = PIPE_SIZE
    done: Deferred[None] = field(factory=Deferred, init=False)
    _transport: Any = field(default=None, init=False)
    _pipe: tuple[int, int] | None = field(default=None, init=False)
    _capacity: int = field(default=0, init=False)
    # The aligned middle of the range, moved through the pipe.
    _start: int = field(default=0, init=False)
    _end: int = field(default=0, init=False)
    # Next offset to fill from; bytes in the pipe; body bytes sent (the
    # pipe's part is all sent once they reach _end - offset).
    _position: int = field(default=0, init=False)
    _inPipe: int = field(default=0, init=False)
    _delivered: int = field(default=0, init=False)
    _attached: bool = field(default=False, init=False)
    _filling: bool = field(default=False, init=False)
    _begun: bool = field(default=False, init=False)
    _sending: bool = field(default=False, init=False)
    _tail: bool = field(default=False, init=False)
    _paused: bool = field(default=False, init=False)
    _stopped: bool = field(default=False, init=False)
    _stall: IDelayedCall | None = field(default=None, init=False)

    @staticmethod
    def applies(request: Request, backend: object, length: int) -> bool:
        """
        @return: Whether a download of C{length} bytes of C{backend} in
            answer to C{request} can be spliced: a direct file, a plain
            socket, a large enough range, a kernel that can.
        """
        if length < SPLICE_MIN or not ISpliceSource.providedBy(backend):
            return False
        if getattr(backend, "spliceAlignment", None) is None:
            return False
        transport = getattr(request.channel, "transport", None)
        return IDirectWriteTransport.providedBy(transport) and spliceUsable()

    def start(self) -> Deferred[None]:
        """
        Open the pipe and fill it; once the first bytes are in, write the
        head and start sending.

        @return: L{done}.
        """
        align: int = self.backend.spliceAlignment
        end = self.offset + self.length
        self._start = min(end, -(-self.offset // align) * align)
        self._end = max(self._start, end - end % align)
        self._position = self._start
        self._transport = self.request.channel.transport  # type: ignore[attr-defined]
        if self._start == self._end:
            self.done.errback(SpliceRefused("No aligned range to splice"))
            return self.done
        try:
            self._pipe = openPipe(self.size)
            self._capacity = pipeSize(self._pipe[1])
        except OSError as e:
            self._closePipe()
            self.done.errback(SpliceRefused(f"No pipe: {e}"))
            return self.done
        if self._capacity < min(self.size, MIN_PIPE):
            self._closePipe()
            self.done.errback(SpliceRefused(f"Pipe of {self._capacity} bytes only"))
            return self.done
        _raiseSendBuffer(self._transport, SEND_BUFFER)
        return self._begin()

    # IDirectWriter

    def sendTo(self, fd: int) -> bool:
        if self._stopped or self._pipe is None:
            return False
        r = self._pipe[0]
        self._sending = True
        try:
            while self._inPipe:
                try:
                    n = os.splice(r, fd, self._inPipe, flags=_NONBLOCK)
                except BlockingIOError:
                    self._startStall()
                    return True
                if n <= 0:
                    break
                self._inPipe -= n
                self._delivered += n
                self.op.done = self._delivered
                self.request.sentLength += n
                if self._stall is not None:
                    self._cancelStall()
                if self._inPipe <= self._capacity // 2 and not self._filling:
                    # Refill while the rest is sent.
                    self._pump()
                    if self._stopped:
                        return False
        finally:
            self._sending = False
        if self._delivered == self._end - self.offset:
            # The pipe's part is sent: the tail and the end of the response
            # outside the transport's write pass.
            self.clock.callLater(0, self._pump)
        return False

    # Internals

    def _pump(self) -> None:
        if self._stopped:
            return
        if self.op.canceled:
            self._abort(Failure(OperationCanceled("Transfer was canceled")))
            return
        if self._filling or self._tail:
            return
        if self._position < self._end:
            if self._paused or self._inPipe > self._capacity // 2:
                return
            want = min(self._end - self._position, self._capacity - self._inPipe)
            self._filling = True
            d = self.backend.spliceInto(self._position, want, self._pipe[1])  # type: ignore[index]
            d.addCallbacks(self._filled, self._fillFailed)
            d.addErrback(self._abort)
            return
        if self._delivered == self._end - self.offset and not self._sending:
            self._tail = True
            self._edge(self._end, self.offset + self.length - self._end, self._finish)

    def _filled(self, n: int) -> None:
        self._filling = False
        if self._stopped:
            self._closePipe()
            return
        if n <= 0 and self._inPipe == 0:
            raise TruncatedImage(f"Expected bytes at {self._position}, the pipe took none")
        self._position += n
        self._inPipe += n
        if not self._begun:
            self._begun = True
            # The first bytes are in: the head, then the pipe.
            self._edge(self.offset, self._start - self.offset, self._sendPipe)
            return
        if not self._sending:
            self._transport.directWriteReady()
        self._pump()

    def _fillFailed(self, reason: Failure) -> None:
        self._filling = False
        if self._stopped:
            self._closePipe()
            return
        if reason.check(EOFError):
            reason = Failure(TruncatedImage(reason.getErrorMessage()))
        elif (
            not self._begun and (reason.check(OSError) and reason.value.errno == errno.EINVAL)  # type: ignore[union-attr]
        ):
            _refuse(f"the kernel refuses to splice {getattr(self.backend, 'path', 'the image')}")
            reason = Failure(SpliceRefused(reason.getErrorMessage()))
        self._abort(reason)

    def _edge(self, at: int, n: int, then: Any) -> None:
        """
        Read and write the unaligned C{n} bytes at C{at} (none: just write
        the head), then call C{then}.
        """
        if n == 0:
            self._write(b"")
            then()
            return
        buf = memoryview(bytearray(n))

        def read(got: int) -> None:
            if self._stopped:
                return
            if got != n:
                raise TruncatedImage(f"Expected {n} bytes at {at}, got {got}")
            self._delivered += n
            self.op.done = self._delivered
            self._write(bytes(buf))
            then()

        d = self.backend.readInto(at, buf)
        d.addCallback(read)
        d.addErrback(self._abort)

    def _write(self, data: bytes) -> None:
        self.request.write(data)
        # The head is held for the body's first bytes: out with it now.
        flush = getattr(self.request.channel, "flushHead", None)
        if flush is not None:
            flush()

    def _sendPipe(self) -> None:
        if self._stopped:
            return
        self._attached = True
        self._transport.setDirectWriter(self)
        self._transport.directWriteReady()
        self._pump()

    def _ending(self, complete: bool) -> None:
        self._detach()
        if complete or not self._filling:
            self._closePipe()

    def _detach(self) -> None:
        if self._attached:
            self._attached = False
            self._transport.setDirectWriter(None)

    def _closePipe(self) -> None:
        # Only once no pool thread splices into it (the fd number could be
        # reused meanwhile).
        pipe, self._pipe = self._pipe, None
        self._inPipe = 0
        if pipe is not None:
            for fd in pipe:
                os.close(fd)
