# -*- test-case-name: tests.test_client_remote -*-
"""
Tests for L{imageio.client._remote}: the streaming request body and the
streaming response receiver, with fake transports, and OPTIONS parsing.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone, ResponseFailed

from imageio.client._remote import (
    Connector,
    Remote,
    ServerOptions,
    StreamBody,
    _StreamReceiver,
    errorMessage,
    parseOptions,
)


class _Consumer:
    def __init__(self) -> None:
        self.data = b""
        self.producer: Any = None

    def write(self, data: bytes) -> None:
        self.data += data


class _Transport:
    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


class StreamBodyTests(SynchronousTestCase):
    """
    Tests for L{StreamBody}.
    """

    def setUp(self) -> None:
        self.source = bytes(range(256)) * 40  # 10240 bytes
        self.reads: list[tuple[int, int, Deferred[int]]] = []

    def read(self, offset: int, buf: memoryview) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.reads.append((offset, len(buf), d))
        buf[:] = self.source[offset : offset + len(buf)]
        return d

    def test_readsAheadOneBuffer(self) -> None:
        """
        One read is in flight at a time; the next piece is read while the
        last one is sent, and no more than the buffers are used.
        """
        views = [memoryview(bytearray(1024)) for _ in range(2)]
        body = StreamBody(self.read, 1000, 5000, views)
        consumer = _Consumer()
        done = body.startProducing(consumer)
        self.assertEqual([(o, n) for o, n, _ in self.reads], [(1000, 1024)])
        body.pauseProducing()
        self.reads[0][2].callback(1024)
        # Paused: nothing sent, but the second buffer is being filled.
        self.assertEqual(consumer.data, b"")
        self.assertEqual([(o, n) for o, n, _ in self.reads[1:]], [(2024, 1024)])
        self.reads[1][2].callback(1024)
        # Both buffers full: no third read.
        self.assertEqual(len(self.reads), 2)
        body.resumeProducing()
        while not done.called:
            offset, n, d = self.reads[-1]
            if not d.called:
                d.callback(n)
        self.successResultOf(done)
        self.assertEqual(consumer.data, self.source[1000:6000])
        self.successResultOf(body.idle())

    def test_readFailure(self) -> None:
        """
        A failed read fails the body with the read's error.
        """
        body = StreamBody(self.read, 0, 4096, [memoryview(bytearray(1024))])
        done = body.startProducing(_Consumer())
        self.reads[0][2].errback(OSError(5, "Input/output error"))
        self.failureResultOf(done, OSError)
        self.assertIsInstance(body.error, OSError)


class StreamReceiverTests(SynchronousTestCase):
    """
    Tests for L{_StreamReceiver}.
    """

    def setUp(self) -> None:
        self.target = bytearray(10000)
        self.writes: list[tuple[int, int, Deferred[int]]] = []
        self.clock = Clock()

    def write(self, offset: int, data: memoryview) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self.writes.append((offset, len(data), d))
        self.target[offset : offset + len(data)] = data
        return d

    def receiver(self, offset: int, length: int, buffers: int = 2) -> tuple[Any, _Transport]:
        views = [memoryview(bytearray(1000)) for _ in range(buffers)]
        receiver = _StreamReceiver(self.write, offset, length, views, self.clock, 60)
        transport = _Transport()
        receiver.makeConnection(transport)
        return receiver, transport

    def test_inOrderWithBackpressure(self) -> None:
        """
        Full buffers are written one at a time, in order; the response is
        paused while every buffer is busy, and what arrives meanwhile is
        kept and written in order.
        """
        data = bytes(range(256)) * 20  # 5120 bytes
        receiver, transport = self.receiver(100, len(data))
        receiver.dataReceived(data[:1500])
        self.assertEqual([(o, n) for o, n, _ in self.writes], [(100, 1000)])
        self.assertFalse(transport.paused)
        receiver.dataReceived(data[1500:3500])
        # Second buffer full and queued, no free one: paused.
        self.assertTrue(transport.paused)
        self.assertEqual(len(self.writes), 1)
        while len(self.writes) < 6 or not all(d.called for _, _, d in self.writes):
            pending = [w for w in self.writes if not w[2].called]
            if pending:
                pending[0][2].callback(pending[0][1])
            if len(self.writes) == 3 and self.writes[2][2].called is False:
                receiver.dataReceived(data[3500:])
                receiver.connectionLost(Failure(ResponseDone()))
        self.successResultOf(receiver.done)
        self.assertEqual(bytes(self.target[100 : 100 + len(data)]), data)
        self.assertEqual([o for o, _, _ in self.writes], [100, 1100, 2100, 3100, 4100, 5100])

    def test_shortBody(self) -> None:
        """
        A body that ends early fails once the write in flight returned.
        """
        receiver, _ = self.receiver(0, 5000)
        receiver.dataReceived(b"x" * 1000)
        receiver.connectionLost(Failure(ResponseFailed([Failure(OSError("reset"))])))
        self.assertNoResult(receiver.done)
        self.writes[0][2].callback(1000)
        self.failureResultOf(receiver.done, ResponseFailed)

    def test_tooMuch(self) -> None:
        """
        More bytes than asked for fail the transfer and stop the response.
        """
        receiver, transport = self.receiver(0, 10)
        receiver.dataReceived(b"x" * 11)
        self.assertTrue(transport.stopped)
        self.assertIn("more bytes", str(self.failureResultOf(receiver.done).value))

    def test_silence(self) -> None:
        """
        A server silent for the read timeout fails the transfer.
        """
        receiver, transport = self.receiver(0, 10)
        for _ in range(4):
            self.clock.advance(30)
        self.assertTrue(transport.stopped)
        self.failureResultOf(receiver.done)


class OptionsTests(SynchronousTestCase):
    """
    Tests for L{parseOptions} and L{errorMessage}.
    """

    def test_parse(self) -> None:
        """
        Features, limits (capped) and the local socket are read; anything
        unexpected means an old server.
        """
        body = b'{"features": ["zero"], "max_readers": 1000, "unix_socket": "\\u0000/x"}'
        self.assertEqual(parseOptions(body), ServerOptions(frozenset({"zero"}), 64, 1, "\0/x"))
        self.assertEqual(parseOptions(b"not json"), ServerOptions())
        self.assertEqual(parseOptions(b'{"max_writers": true}'), ServerOptions())

    def test_errorMessage(self) -> None:
        """
        An error with a status and message shows both; others their text.
        """

        class E(Exception):
            status = 403
            message = "No such ticket"

        self.assertEqual(errorMessage(E()), "403 No such ticket")
        self.assertEqual(errorMessage(Failure(ValueError("bad\nmore"))), "bad")


class RemoteTests(SynchronousTestCase):
    """
    Tests for L{Remote}.
    """

    def test_backendsParseExtentsOffTheReactor(self) -> None:
        """
        The backends of a remote image parse an extents answer (up to 64
        MiB of JSON) with the pool the remote was given, not on the
        reactor thread.
        """

        def runInPool(fn: Any, *args: Any) -> Deferred[Any]:
            raise AssertionError("not called")

        connector = Connector(Clock(), None, False)
        remote = Remote(
            Clock(),
            "https://example.com/images/ticket",
            ServerOptions(frozenset({"extents"})),
            connector,
            4096,
            runInPool=runInPool,
        )
        target: Any = remote.backends(1)[0]
        self.assertIs(target.backend.runInPool, runInPool)
