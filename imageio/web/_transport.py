# -*- test-case-name: tests.test_transport -*-
"""
Socket transports for the data listeners that send buffers without copying.

Twisted's TCP and UNIX transports accept only C{bytes} and keep two output
buffers that they join (copy) whenever a send was partial: moving a 4 MiB
chunk costs a C{bytes} copy of the producer's buffer plus copies of every
partially sent tail. Image downloads move gigabytes, so our listeners use
L{ZeroCopyTCPServer} and L{ZeroCopyUNIXServer} instead: C{write} takes any
buffer (a C{memoryview} of a reused read buffer too), keeps a reference to
it until the kernel took all of it, and sends queued buffers with one
gathering C{sendmsg}. A large write to an idle socket is sent at once, while
its bytes (ciphertext just encrypted) are still in the CPU cache.

Writers that pass a mutable buffer must leave it alone until
L{IZeroCopyTransport.whenDrained} fires.

For uploads they read the other way round: an HTTP connection receiving a
request body sets itself as the L{IDirectReader}, and the body is read with
C{recv_into} straight into the upload's buffer. While a large body arrives
fast, a thread of the body pump (L{imageio.web._pump}) reads it instead of
the reactor.

A download over a plain socket may send the bytes itself, moving them from
a pipe into the socket with C{splice(2)} (L{IDirectWriter}): the transport
asks it to, once everything written before was sent.

The transports are Twisted's own with C{write}, C{writeSequence} and
C{doWrite} replaced; L{TCPServerEndpoint} and L{UNIXServerEndpoint} listen
with them.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Iterable
from errno import EAGAIN, ENOBUFS, EWOULDBLOCK
from typing import Any

from attrs import frozen
from twisted.internet import defer, main, tcp, unix
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamServerEndpoint,
    ITCPTransport,
    ITLSTransport,
)
from twisted.python.failure import Failure
from zope.interface import implementedBy, implementer, implementer_only
from zope.interface.interface import InterfaceClass

from imageio._log import Logger
from imageio.interfaces import (
    IDirectReader,
    IDirectReadTransport,
    IDirectWriter,
    IDirectWriteTransport,
    IZeroCopyTransport,
)
from imageio.web._pump import FULL, HELD, BodyPump, Lend
from imageio.web._twisted_transport import FileDescriptorSeam

log = Logger()

#: Most bytes handed to the kernel per send call.
SEND_LIMIT = 4 * 1024 * 1024

#: Writes at least this large go to an idle socket at once; smaller ones
#: wait for the reactor's write pass. The HTTP channel writes a response's
#: head with its first body bytes, so a small response is one write: sent
#: at once, it saves the write pass (two C{epoll_ctl} and a reactor turn).
IMMEDIATE_SEND = 1

#: A C{writeSequence} smaller than this is joined into one write.
JOIN_SEQUENCE = 64 * 1024

#: At most this many buffers per gathering send (well under IOV_MAX).
MAX_IOVEC = 64

_WOULD_BLOCK = (EAGAIN, EWOULDBLOCK, ENOBUFS)

#: Every receive and send of the transport: a body pump thread makes the
#: socket (the open file, shared with its duplicate) blocking while it
#: holds it, and the reactor must never wait on it, for an early answer
#: written meanwhile either.
_DONTWAIT = socket.MSG_DONTWAIT


class _ZeroCopyMixin(FileDescriptorSeam):
    """
    Replaces the output buffering of a L{twisted.internet.abstract.FileDescriptor}
    socket transport with a queue of buffers sent as they are.
    """

    # Provided by the Twisted transport this is mixed into.
    socket: Any
    connected: int
    disconnecting: int
    disconnected: int
    producer: Any
    producerPaused: bool
    streamingProducer: bool
    bufferSize: int
    dataBuffer: bytes

    _queue: deque[memoryview] | None = None
    _queued = 0
    _drainWaiters: list[Deferred[None]] | None = None
    _directReader: IDirectReader | None = None
    _directWriter: IDirectWriter | None = None
    _pump: BodyPump | None = None
    _pumping = False
    # The pump's lend while it holds the socket, whether it is parked (its
    # space full, waiting for the next), and the space it fills.
    _lend: Lend | None = None
    _parked = False
    _pumpSpace: tuple[IDirectReader, memoryview] | None = None
    _wantRead = False
    _host: Any = None
    _peer: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.server: Any
        self._pump = getattr(self.server, "bodyPump", None)

    def getHost(self) -> Any:
        # twisted.web asks on every request, and Twisted's transports ask
        # the kernel (getsockname) every time; a connection's addresses
        # never change.
        if self._host is None:
            self._host = super().getHost()  # type: ignore[misc]
        return self._host

    def getPeer(self) -> Any:
        if self._peer is None:
            self._peer = super().getPeer()  # type: ignore[misc]
        return self._peer

    def setDirectReader(self, reader: IDirectReader | None) -> None:
        self._directReader = reader

    def doRead(self) -> Any:
        # Twisted's doRead, plus reading straight into a reader's buffer;
        # on UNIX sockets also plain recv instead of recvmsg (we pass no
        # file descriptors).
        reader = self._directReader
        view = reader.readBuffer() if reader is not None else None
        if view is not None and not len(view):
            # recv_into an empty buffer returns 0, which means EOF.
            view = None
        try:
            if view is None:
                data = self.socket.recv(self.bufferSize, _DONTWAIT)
            else:
                n = self.socket.recv_into(view, 0, _DONTWAIT)
        except OSError as e:
            if e.errno in _WOULD_BLOCK:
                return None
            return main.CONNECTION_LOST
        if view is None:
            return self.deliverData(data)
        if n == 0:
            return self.deliverData(b"")
        assert reader is not None
        reader.bufferFilled(n)
        pump = self._pump
        if pump is not None and n >= pump.minRead:
            self._startPump(pump, reader)
        return None

    # The body pump (imageio.web._pump): while a large body flows fast, a
    # thread reads it. Meanwhile the reactor does not read this socket, and
    # startReading/stopReading (the upload's flow control) are recorded,
    # applied when the pump returns. A pump that filled its space keeps the
    # socket (parked): the next space is given when the reader has one and
    # reading is wanted, and the socket comes back when it has none.

    def _startPump(self, pump: BodyPump, reader: IDirectReader) -> None:
        if self._pumping or not (self.connected and pump.available()) or self.disconnecting:
            return
        view = reader.readBuffer()
        if view is None or len(view) < pump.minBuffer:
            return
        super().stopReading()  # type: ignore[misc]
        self._pumping = True
        self._pumpSpace = (reader, view)
        try:
            self._lend = pump.pump(self.socket.fileno(), view, self._pumped)
        except Exception:
            log.failure("Cannot start the body pump")
            self._pumpSpace = None
            self._pumpReturned()

    def _pumpReturned(self) -> None:
        # The reactor owns the socket again: apply what flow control asked
        # meanwhile.
        self._pumping = False
        self._lend = None
        self._parked = False
        if self._wantRead and self.connected and not self.disconnecting:
            super().startReading()  # type: ignore[misc]
        if self._directWriter is not None:
            # It waited for the socket to be non-blocking again.
            self.directWriteReady()

    def _pumped(self, n: int, why: str) -> None:
        try:
            self._pumpedUnsafe(n, why)
        except Exception:
            # A bug in the reader: never leave the socket with the thread.
            log.failure("Body pump result failed")
            if self._parked:
                assert self._lend is not None
                self._lend.release()
                self.socket.setblocking(False)
                self._pumpReturned()

    def _pumpedUnsafe(self, n: int, why: str) -> None:
        space, self._pumpSpace = self._pumpSpace, None
        if not self.connected:
            # Lost meanwhile: the reader heard of it already. A parked
            # pump gives its duplicate back.
            if why == FULL and self._lend is not None:
                self._lend.release()
            self._pumping = False
            self._lend = None
            return
        if why != FULL:
            self._pumpReturned()
        else:
            self._parked = True
        if n:
            assert space is not None
            reader, view = space
            if reader is self._directReader:
                reader.bufferFilled(n)
            else:
                # Not expected: never lose body bytes.
                self.deliverData(bytes(view[:n]))
        if why == FULL:
            # The reader took the bytes (and may have paused us): the next
            # space, or the socket back.
            if self._parked:
                self._refill()
            return
        pump, again = self._pump, self._directReader
        if why == HELD and self._wantRead and pump is not None and again is not None:
            # Data flows: lend the socket again without a reactor read.
            self._startPump(pump, again)

    def _refill(self) -> None:
        """
        A parked pump: give it the reader's next space, leave it parked
        while reading is paused, or take the socket back.
        """
        if not self._wantRead and self.connected and not self.disconnecting:
            return
        lend, pump, reader = self._lend, self._pump, self._directReader
        assert lend is not None
        if (
            self.connected
            and not self.disconnecting
            and pump is not None
            and reader is not None
            and pump.running
        ):
            view = reader.readBuffer()
            if view is not None and len(view) >= pump.minBuffer:
                self._parked = False
                self._pumpSpace = (reader, view)
                lend.refill(view)
                return
        # The thread reads no more once told: the socket is ours now, and
        # non-blocking again (the thread made the open file blocking).
        lend.release()
        self.socket.setblocking(False)
        self._pumpReturned()

    def startReading(self) -> None:
        self._wantRead = True
        if not self._pumping:
            super().startReading()  # type: ignore[misc]
        elif self._parked:
            self._refill()

    def stopReading(self) -> None:
        self._wantRead = False
        if not self._pumping:
            super().stopReading()  # type: ignore[misc]

    def resumeProducing(self) -> None:
        # twisted.web's HTTPChannel.requestDone resumes its transport after
        # every request, paused or not: a transport already reading (or
        # whose reads the body pump holds) has nothing to do, where
        # Twisted's would ask the reactor to watch the socket again (five
        # calls down to epoll's bookkeeping, which finds it watched).
        if not self._wantRead:
            super().resumeProducing()  # type: ignore[misc]

    def readConnectionLost(self, reason: Failure) -> None:
        # The reactor stopped watching the socket itself (the client
        # half-closed): a later resumeProducing watches it again, as
        # Twisted's does.
        self._wantRead = False
        super().readConnectionLost(reason)  # type: ignore[misc]

    def setDirectWriter(self, writer: IDirectWriter | None) -> None:
        self._directWriter = writer

    def directWriteReady(self) -> None:
        writer = self._directWriter
        if writer is None or not self.connected or self.disconnected or self._queued:
            # With buffers queued we already wait for writability; doWrite
            # sends them first, then asks the writer.
            return
        if self._pumping:
            # A pump thread may have made the shared open file blocking, and
            # splice(2) into a socket waits unless the file is non-blocking:
            # the writer goes on when the socket is back (_pumpReturned).
            return
        try:
            blocked = writer.sendTo(self.socket.fileno())
        except OSError:
            # doWrite meets the same error and reports the lost connection.
            blocked = True
        if blocked:
            self.startWriting()  # type: ignore[attr-defined]

    def pendingBytes(self) -> int:
        return self._queued

    def whenDrained(self) -> Deferred[None]:
        if not self._queued or self.disconnected:
            return succeed(None)
        if self._drainWaiters is None:
            self._drainWaiters = []
        d: Deferred[None] = Deferred()
        self._drainWaiters.append(d)
        return d

    def write(self, data: bytes | memoryview) -> None:
        if not self.connected or self.writeDisconnected or not len(data):
            return
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        size = view.nbytes
        if not self._queued and size >= IMMEDIATE_SEND:
            sent = self._send(view)
            if sent == size:
                if self.producer is not None and not self.streamingProducer:
                    # A pull producer is asked for more from doWrite.
                    self.startWriting()  # type: ignore[attr-defined]
                return
            view = view[sent:]
        self._enqueue(view)

    def sendNow(self, data: bytes) -> int:
        """
        Send what the socket takes of C{data} at once, without queuing: the
        TLS layer's path for each piece of ciphertext it just encrypted (one
        call instead of L{write}'s).

        @return: The bytes the kernel took; 0 when something is queued (the
            order must hold), a pull producer waits for the write pass, the
            connection is closed or the send failed. The caller writes the
            rest with L{write}, which reports errors as usual.
        """
        if (
            self._queued
            or not self.connected
            or self.writeDisconnected
            or (self.producer is not None and not self.streamingProducer)
        ):
            return 0
        try:
            # MSG_DONTWAIT, as every send here (see _pump).
            sent: int = self.socket.send(data, _DONTWAIT)
        except OSError:
            return 0
        return sent

    def writeSequence(self, data: Iterable[bytes]) -> None:
        items = list(data)
        if sum(map(len, items)) < JOIN_SEQUENCE:
            # Response headers come as a dozen small pieces: one buffer.
            self.write(b"".join(items))
            return
        for item in items:
            self.write(item)

    def doWrite(self) -> Any:
        while self._queue:
            views = []
            size = 0
            for view in self._queue:
                views.append(view[: SEND_LIMIT - size])
                size += len(views[-1])
                if size >= SEND_LIMIT or len(views) == MAX_IOVEC:
                    break
            try:
                if len(views) > 1:
                    sent = self.socket.sendmsg(views, (), _DONTWAIT)
                else:
                    sent = self.socket.send(views[0], _DONTWAIT)
            except OSError as e:
                if e.errno in _WOULD_BLOCK:
                    return None
                return main.CONNECTION_LOST
            self._consume(sent)
            if sent < size:
                # The socket is full: wait for the next write pass.
                return None
        writer = self._directWriter
        if writer is not None:
            if self._pumping:
                # As in directWriteReady: _pumpReturned asks the writer.
                self.stopWriting()  # type: ignore[attr-defined]
                return None
            # Only now: its bytes follow everything written before.
            try:
                if writer.sendTo(self.socket.fileno()):
                    return None
            except OSError:
                return main.CONNECTION_LOST
        return self._drained()

    # Internals

    def _send(self, view: memoryview) -> int:
        try:
            sent: int = self.socket.send(view[:SEND_LIMIT], _DONTWAIT)
        except OSError:
            # Queue it all: doWrite meets the same error (or the socket
            # became writable) and reports a lost connection the way
            # Twisted does.
            return 0
        return sent

    def _enqueue(self, view: memoryview) -> None:
        if self._queue is None:
            self._queue = deque()
        self._queue.append(view)
        self._queued += len(view)
        self.pauseProducerIfFull()
        self.startWriting()  # type: ignore[attr-defined]

    def _consume(self, sent: int) -> None:
        queue = self._queue
        assert queue is not None
        self._queued -= sent
        while sent:
            head = queue[0]
            if sent >= len(head):
                sent -= len(head)
                queue.popleft()
            else:
                queue[0] = head[sent:]
                sent = 0

    def sendBufferFull(self) -> bool:
        return self._queued > self.bufferSize

    def _drained(self) -> Failure | Exception | None:
        # Everything is sent: what Twisted's doWrite does at this point.
        self.stopWriting()  # type: ignore[attr-defined]
        waiters, self._drainWaiters = self._drainWaiters, None
        for d in waiters or ():
            d.callback(None)
        if self._queued:
            # A waiter wrote again.
            self.startWriting()  # type: ignore[attr-defined]
            return None
        if self.producer is not None and ((not self.streamingProducer) or self.producerPaused):
            self.producerPaused = False
            self.producer.resumeProducing()
        elif self.disconnecting:
            return self.finishLoseConnection()
        elif self.writeDisconnecting:
            return self.finishHalfClose()
        return None

    def startTLS(self, ctx: object, normal: bool = True) -> None:
        # Twisted's startTLS writes through buffers our doWrite never sends;
        # our listeners put TLS in front instead (imageio.web._tls). The
        # class does not declare ITLSTransport; this guards direct calls.
        raise NotImplementedError("startTLS is not supported; use imageio.web._tls")

    def connectionLost(self, reason: Failure) -> None:
        if self._parked:
            # Its space is full, it reads nothing: it closes its duplicate.
            assert self._lend is not None
            self._lend.release()
            self._pumping = self._parked = False
            self._lend = None
        elif self._pumping:
            # Wake the pump thread: its epoll sees the end at once.
            try:
                self.socket.shutdown(socket.SHUT_RD)
            except OSError:
                pass
        self._directReader = None
        self._directWriter = None
        self._queue = None
        self._queued = 0
        super().connectionLost(reason)  # type: ignore[misc]
        # Nothing more will be sent: the buffers are free again. After the
        # protocol heard of the loss, so writers do not write again.
        waiters, self._drainWaiters = self._drainWaiters, None
        for d in waiters or ():
            d.callback(None)


def _withoutTLS(base: type) -> list[InterfaceClass]:
    # What Twisted's transport declares, less ITLSTransport (startTLS is
    # refused), so nobody checking for it tries.
    return [i for i in implementedBy(base).interfaces() if i is not ITLSTransport]


@implementer_only(
    IZeroCopyTransport,
    IDirectReadTransport,
    IDirectWriteTransport,
    ITCPTransport,
    *_withoutTLS(tcp.Server),
)
class ZeroCopyTCPServer(_ZeroCopyMixin, tcp.Server):
    """
    A TCP server connection whose writes are not copied.
    """


@implementer_only(
    IZeroCopyTransport,
    IDirectReadTransport,
    IDirectWriteTransport,
    ITCPTransport,
    *_withoutTLS(unix.Server),
)
class ZeroCopyUNIXServer(_ZeroCopyMixin, unix.Server):
    """
    A UNIX socket server connection whose writes are not copied.
    """


class TCPPort(tcp.Port):
    transport = ZeroCopyTCPServer
    #: Lends large request bodies' sockets to threads (the connections
    #: read it at creation).
    bodyPump: BodyPump | None = None


class UNIXPort(unix.Port):
    transport = ZeroCopyUNIXServer
    bodyPump: BodyPump | None = None


@implementer(IStreamServerEndpoint)
@frozen
class TCPServerEndpoint:
    """
    Listens on TCP (IPv4 or IPv6, by the interface address) with
    L{ZeroCopyTCPServer} connections, which lend large request bodies to
    C{bodyPump} if given.
    """

    reactor: Any
    port: int
    backlog: int = 50
    interface: str = ""
    bodyPump: BodyPump | None = None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return defer.execute(self._listen, protocolFactory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        port = TCPPort(self.port, factory, self.backlog, self.interface, self.reactor)
        port.bodyPump = self.bodyPump
        port.startListening()
        return port


@implementer(IStreamServerEndpoint)
@frozen
class UNIXServerEndpoint:
    """
    Listens on a UNIX socket with L{ZeroCopyUNIXServer} connections,
    which lend large request bodies to C{bodyPump} if given.
    """

    reactor: Any
    address: str
    backlog: int = 50
    mode: int = 0o666
    bodyPump: BodyPump | None = None

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        return defer.execute(self._listen, protocolFactory)

    def _listen(self, factory: IProtocolFactory) -> IListeningPort:
        # Twisted's stubs say bytes; it takes str paths too.
        path: Any = self.address
        port = UNIXPort(path, factory, self.backlog, self.mode, self.reactor, False)
        port.bodyPump = self.bodyPump
        port.startListening()
        return port
