# -*- test-case-name: tests.test_nbdproto -*-
"""
Tests for L{imageio.backends._nbdproto}: the NBD client state machine,
driven by a scripted server over L{StringTransport}.
"""

from __future__ import annotations

import errno
import os
import struct

from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imageio.backends import _nbdproto as nbd
from imageio.backends._nbdproto import (
    ExportInfo,
    NBDClientProtocol,
    NegotiationTimeout,
    OptionError,
    ProtocolError,
    mergeStatus,
    replyError,
)

# The fake server: builders for what a server sends.


def greeting(flags: int = nbd.FLAG_FIXED_NEWSTYLE | nbd.FLAG_NO_ZEROES) -> bytes:
    return struct.pack("!QQH", nbd.NBDMAGIC, nbd.IHAVEOPT, flags)


def optionReply(option: int, reply: int, payload: bytes = b"") -> bytes:
    return struct.pack("!QIII", nbd.OPTION_REPLY_MAGIC, option, reply, len(payload)) + payload


def metaContext(option: int, contextID: int, name: str) -> bytes:
    return optionReply(option, nbd.REP_META_CONTEXT, struct.pack("!I", contextID) + name.encode())


def infoExport(size: int, flags: int) -> bytes:
    return optionReply(nbd.OPT_GO, nbd.REP_INFO, struct.pack("!HQH", nbd.INFO_EXPORT, size, flags))


def infoBlockSize(minimum: int, preferred: int, maximum: int) -> bytes:
    payload = struct.pack("!HIII", nbd.INFO_BLOCK_SIZE, minimum, preferred, maximum)
    return optionReply(nbd.OPT_GO, nbd.REP_INFO, payload)


def simpleReply(handle: int, error: int = 0, data: bytes = b"") -> bytes:
    return struct.pack("!IIQ", nbd.SIMPLE_REPLY_MAGIC, error, handle) + data


def chunk(handle: int, replyType: int, payload: bytes = b"", done: bool = False) -> bytes:
    flags = nbd.REPLY_FLAG_DONE if done else 0
    header = struct.pack(
        "!IHHQI", nbd.STRUCTURED_REPLY_MAGIC, flags, replyType, handle, len(payload)
    )
    return header + payload


def dataChunk(handle: int, offset: int, data: bytes, done: bool = False) -> bytes:
    return chunk(handle, nbd.REPLY_TYPE_OFFSET_DATA, struct.pack("!Q", offset) + data, done)


def holeChunk(handle: int, offset: int, size: int, done: bool = False) -> bytes:
    return chunk(handle, nbd.REPLY_TYPE_OFFSET_HOLE, struct.pack("!QI", offset, size), done)


def errorChunk(handle: int, code: int, message: str, done: bool = True) -> bytes:
    encoded = message.encode()
    payload = struct.pack("!IH", code, len(encoded)) + encoded
    return chunk(handle, nbd.REPLY_TYPE_ERROR, payload, done)


def statusChunk(
    handle: int, contextID: int, extents: list[tuple[int, int]], done: bool = False
) -> bytes:
    payload = struct.pack("!I", contextID) + b"".join(struct.pack("!II", *e) for e in extents)
    return chunk(handle, nbd.REPLY_TYPE_BLOCK_STATUS, payload, done)


def noneChunk(handle: int) -> bytes:
    return chunk(handle, nbd.REPLY_TYPE_NONE, done=True)


# Parsers for what the client sends.


def parseOptions(data: bytes) -> tuple[int, list[tuple[int, bytes]]]:
    """
    @return: The client flags and C{(option, data)} for each option sent.
    """
    (clientFlags,) = struct.unpack_from("!I", data)
    pos = 4
    options = []
    while pos < len(data):
        magic, option, length = struct.unpack_from("!QII", data, pos)
        assert magic == nbd.IHAVEOPT
        pos += 16
        options.append((option, data[pos : pos + length]))
        pos += length
    return clientFlags, options


def parseQueries(data: bytes) -> tuple[str, list[str]]:
    """
    @return: Export name and queries of a meta context option.
    """
    (nameLength,) = struct.unpack_from("!I", data)
    name = data[4 : 4 + nameLength].decode()
    pos = 4 + nameLength
    (count,) = struct.unpack_from("!I", data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        (length,) = struct.unpack_from("!I", data, pos)
        queries.append(data[pos + 4 : pos + 4 + length].decode())
        pos += 4 + length
    return name, queries


def parseRequests(data: bytes) -> list[tuple[int, int, int, int, int, bytes]]:
    """
    @return: C{(flags, command, handle, offset, length, payload)} for each
        request sent.
    """
    requests = []
    pos = 0
    while pos < len(data):
        magic, flags, command, handle, offset, length = struct.unpack_from("!IHHQQI", data, pos)
        assert magic == nbd.REQUEST_MAGIC
        pos += 28
        payload = b""
        if command == nbd.CMD_WRITE:
            payload = data[pos : pos + length]
            pos += length
        requests.append((flags, command, handle, offset, length, payload))
    return requests


SIZE = 1024**2
FLAGS = nbd.FLAG_HAS_FLAGS | nbd.FLAG_SEND_FLUSH | nbd.FLAG_SEND_WRITE_ZEROES


def serverScript(
    *,
    structured: bool = True,
    depth: bool = True,
    bitmaps: tuple[str, ...] = (),
    dirty: bool = False,
) -> bytes:
    """
    Everything a qemu-nbd-like server answers during negotiation, in order.
    """
    script = greeting()
    if not structured:
        script += optionReply(nbd.OPT_STRUCTURED_REPLY, nbd.REP_ERR_UNSUP)
    else:
        script += optionReply(nbd.OPT_STRUCTURED_REPLY, nbd.REP_ACK)
        if dirty:
            for name in bitmaps:
                script += metaContext(nbd.OPT_LIST_META_CONTEXT, 0, name)
            script += optionReply(nbd.OPT_LIST_META_CONTEXT, nbd.REP_ACK)
        script += metaContext(nbd.OPT_SET_META_CONTEXT, 0, nbd.BASE_ALLOCATION)
        if depth:
            script += metaContext(nbd.OPT_SET_META_CONTEXT, 1, nbd.QEMU_ALLOCATION_DEPTH)
        if dirty and len(bitmaps) == 1:
            script += metaContext(nbd.OPT_SET_META_CONTEXT, 2, bitmaps[0])
        script += optionReply(nbd.OPT_SET_META_CONTEXT, nbd.REP_ACK)
    script += infoExport(SIZE, FLAGS)
    script += infoBlockSize(1, 4096, 32 * 1024**2)
    script += optionReply(nbd.OPT_GO, nbd.REP_ACK)
    return script


class ProtocolTestCase(SynchronousTestCase):
    """
    Helpers to connect a protocol to a L{StringTransport}.
    """

    def connect(
        self, exportName: str = "", dirty: bool = False, clock: Clock | None = None
    ) -> tuple[NBDClientProtocol, StringTransport]:
        proto = NBDClientProtocol(exportName, dirty=dirty, clock=clock)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def negotiated(self, structured: bool = True) -> tuple[NBDClientProtocol, StringTransport]:
        """
        A protocol past negotiation, with an empty transport.
        """
        proto, transport = self.connect()
        proto.dataReceived(serverScript(structured=structured))
        self.successResultOf(proto.whenReady())
        transport.clear()
        return proto, transport


class NegotiationTests(ProtocolTestCase):
    def test_negotiatesStructuredRepliesContextsAndExport(self) -> None:
        """
        The client asks for structured replies, the allocation contexts and
        the named export, and reports what the server answered.
        """
        proto, transport = self.connect("disk")
        proto.dataReceived(serverScript())
        info = self.successResultOf(proto.whenReady())
        clientFlags, options = parseOptions(transport.value())
        self.assertEqual(clientFlags, nbd.FLAG_C_FIXED_NEWSTYLE | nbd.FLAG_C_NO_ZEROES)
        self.assertEqual(
            [o for o, _ in options],
            [nbd.OPT_STRUCTURED_REPLY, nbd.OPT_SET_META_CONTEXT, nbd.OPT_GO],
        )
        self.assertEqual(
            parseQueries(options[1][1]),
            ("disk", [nbd.BASE_ALLOCATION, nbd.QEMU_ALLOCATION_DEPTH]),
        )
        self.assertEqual(options[2][1], struct.pack("!I", 4) + b"disk" + struct.pack("!H", 0))
        self.assertEqual(
            info,
            ExportInfo(
                name="disk",
                size=SIZE,
                flags=FLAGS,
                minimumBlockSize=1,
                preferredBlockSize=4096,
                maximumBlockSize=32 * 1024**2,
                structuredReplies=True,
                metaContexts={nbd.BASE_ALLOCATION: 0, nbd.QEMU_ALLOCATION_DEPTH: 1},
            ),
        )
        self.assertTrue(info.canFlush)
        self.assertTrue(info.canZero)
        self.assertFalse(info.readOnly)

    def test_negotiationSurvivesOneByteAtATime(self) -> None:
        """
        Negotiation completes however the server's bytes are split.
        """
        proto, _ = self.connect()
        for byte in serverScript():
            proto.dataReceived(bytes([byte]))
        info = self.successResultOf(proto.whenReady())
        self.assertEqual(info.size, SIZE)

    def test_dirtySelectsTheOnlyBitmap(self) -> None:
        """
        With C{dirty}, the client lists dirty bitmaps and selects the single
        one found.
        """
        bitmap = "qemu:dirty-bitmap:b1"
        proto, transport = self.connect(dirty=True)
        proto.dataReceived(serverScript(dirty=True, bitmaps=(bitmap,)))
        info = self.successResultOf(proto.whenReady())
        _, options = parseOptions(transport.value())
        self.assertEqual(options[1][0], nbd.OPT_LIST_META_CONTEXT)
        self.assertEqual(parseQueries(options[1][1]), ("", [nbd.QEMU_DIRTY_BITMAP]))
        self.assertEqual(
            parseQueries(options[2][1])[1],
            [nbd.BASE_ALLOCATION, nbd.QEMU_ALLOCATION_DEPTH, bitmap],
        )
        self.assertEqual(info.dirtyBitmap, bitmap)
        self.assertEqual(info.metaContexts[bitmap], 2)

    def test_dirtyWithSeveralBitmapsSelectsNone(self) -> None:
        """
        When the export has more than one dirty bitmap, none is selected.
        """
        proto, transport = self.connect(dirty=True)
        proto.dataReceived(
            serverScript(dirty=True, bitmaps=("qemu:dirty-bitmap:a", "qemu:dirty-bitmap:b"))
        )
        info = self.successResultOf(proto.whenReady())
        _, options = parseOptions(transport.value())
        self.assertEqual(
            parseQueries(options[2][1])[1], [nbd.BASE_ALLOCATION, nbd.QEMU_ALLOCATION_DEPTH]
        )
        self.assertIsNone(info.dirtyBitmap)

    def test_noStructuredRepliesNoContexts(self) -> None:
        """
        A server refusing structured replies still opens the export, without
        metadata contexts.
        """
        proto, transport = self.connect()
        proto.dataReceived(serverScript(structured=False))
        info = self.successResultOf(proto.whenReady())
        _, options = parseOptions(transport.value())
        self.assertEqual([o for o, _ in options], [nbd.OPT_STRUCTURED_REPLY, nbd.OPT_GO])
        self.assertFalse(info.structuredReplies)
        self.assertEqual(info.metaContexts, {})

    def test_unknownExportFails(self) -> None:
        """
        An export the server does not have fails negotiation with the
        server's message, and the client says goodbye with NBD_OPT_ABORT.
        """
        proto, transport = self.connect("nope")
        proto.dataReceived(
            greeting()
            + optionReply(nbd.OPT_STRUCTURED_REPLY, nbd.REP_ACK)
            + optionReply(nbd.OPT_SET_META_CONTEXT, nbd.REP_ACK)
            + optionReply(nbd.OPT_GO, nbd.REP_ERR_UNKNOWN, b"export 'nope' not present")
        )
        failure = self.failureResultOf(proto.whenReady(), OptionError)
        self.assertIn("export 'nope' not present", str(failure.value))
        self.assertIn("NBD_OPT_GO", str(failure.value))
        _, options = parseOptions(transport.value())
        self.assertEqual(options[-1][0], nbd.OPT_ABORT)
        self.assertTrue(transport.disconnecting)

    def test_notAnNBDServer(self) -> None:
        """
        A peer that does not greet like an NBD server is hung up on.
        """
        proto, transport = self.connect()
        proto.dataReceived(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        self.failureResultOf(proto.whenReady(), ProtocolError)
        self.assertTrue(transport.disconnecting)

    def test_oldstyleServerRefused(self) -> None:
        """
        A server without fixed newstyle negotiation is refused.
        """
        proto, transport = self.connect()
        proto.dataReceived(greeting(flags=0))
        failure = self.failureResultOf(proto.whenReady(), ProtocolError)
        self.assertIn("fixed newstyle", str(failure.value))

    def test_negotiationTimesOut(self) -> None:
        """
        A server that stops answering during negotiation is hung up on
        after the timeout.
        """
        clock = Clock()
        proto, transport = self.connect(clock=clock)
        d = proto.whenReady()
        proto.dataReceived(greeting())
        clock.advance(proto.negotiationTimeout - 0.1)
        self.assertNoResult(d)
        clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, NegotiationTimeout)

    def test_timeoutCancelledWhenReady(self) -> None:
        """
        The negotiation timeout does not outlive negotiation.
        """
        clock = Clock()
        proto, _ = self.connect(clock=clock)
        proto.dataReceived(serverScript())
        self.successResultOf(proto.whenReady())
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_connectionLostDuringNegotiation(self) -> None:
        """
        The server closing the connection during negotiation fails it with a
        connection error.
        """
        proto, _ = self.connect()
        d = proto.whenReady()
        proto.dataReceived(greeting())
        proto.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(d, ConnectionError)
        self.assertIn("during negotiation", str(failure.value))


class RequestTests(ProtocolTestCase):
    def test_simpleRead(self) -> None:
        """
        Without structured replies, a read's data follows a simple reply
        and lands in the caller's buffer.
        """
        proto, transport = self.negotiated(structured=False)
        buf = bytearray(8)
        d = proto.read(100, memoryview(buf))
        [(flags, command, handle, offset, length, _)] = parseRequests(transport.value())
        self.assertEqual((flags, command, offset, length), (0, nbd.CMD_READ, 100, 8))
        reply = simpleReply(handle, data=b"abcdefgh")
        proto.dataReceived(reply[:20])
        self.assertNoResult(d)
        proto.dataReceived(reply[20:])
        self.successResultOf(d)
        self.assertEqual(buf, b"abcdefgh")

    def test_structuredReadDataAndHole(self) -> None:
        """
        Data and hole chunks, in any order, fill the caller's buffer.
        """
        proto, transport = self.negotiated()
        buf = bytearray(b"x" * 12)
        d = proto.read(1000, memoryview(buf))
        [(_, _, handle, _, _, _)] = parseRequests(transport.value())
        script = (
            dataChunk(handle, 1004, b"DATA")
            + holeChunk(handle, 1000, 4)
            + dataChunk(handle, 1008, b"TAIL")
            + noneChunk(handle)
        )
        # Cut the stream at awkward places: in headers and in payloads.
        for start in range(0, len(script), 7):
            proto.dataReceived(script[start : start + 7])
        self.successResultOf(d)
        self.assertEqual(buf, b"\0\0\0\0DATATAIL")

    def test_errorChunkFailsRequestOnly(self) -> None:
        """
        An error chunk fails its request with the matching OSError and the
        server's message; the connection stays usable.
        """
        proto, transport = self.negotiated()
        d = proto.read(0, memoryview(bytearray(4)))
        [(_, _, handle, _, _, _)] = parseRequests(transport.value())
        proto.dataReceived(errorChunk(handle, 28, "no room"))
        failure = self.failureResultOf(d, OSError)
        self.assertEqual(failure.value.errno, errno.ENOSPC)
        self.assertIn("no room", str(failure.value))
        transport.clear()
        flushed = proto.flush()
        [(_, command, handle, _, _, _)] = parseRequests(transport.value())
        self.assertEqual(command, nbd.CMD_FLUSH)
        proto.dataReceived(simpleReply(handle))
        self.successResultOf(flushed)

    def test_shutdownErrorDisconnects(self) -> None:
        """
        An ESHUTDOWN error fails the request and makes the client end the
        session, as the spec requires.
        """
        proto, transport = self.negotiated()
        d = proto.flush()
        [(_, _, handle, _, _, _)] = parseRequests(transport.value())
        transport.clear()
        proto.dataReceived(errorChunk(handle, 108, "shutting down"))
        self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.ESHUTDOWN)
        [disc] = parseRequests(transport.value())
        self.assertEqual(disc[1], nbd.CMD_DISC)
        self.assertTrue(transport.disconnecting)

    def test_simpleReplyError(self) -> None:
        """
        A simple reply with an error value fails the request with the
        matching OSError.
        """
        proto, transport = self.negotiated()
        d = proto.write(0, b"data")
        [(_, _, handle, _, _, _)] = parseRequests(transport.value())
        proto.dataReceived(simpleReply(handle, error=1))
        self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.EPERM)

    def test_readNotCoveredIsProtocolError(self) -> None:
        """
        A read reply that claims success without describing every byte
        drops the connection.
        """
        proto, transport = self.negotiated()
        d = proto.read(0, memoryview(bytearray(8)))
        [(_, _, handle, _, _, _)] = parseRequests(transport.value())
        proto.dataReceived(dataChunk(handle, 0, b"half") + noneChunk(handle))
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ProtocolError)

    def test_chunkOutsideRequestIsProtocolError(self) -> None:
        """
        A data chunk outside the requested range drops the connection
        before anything is written past the caller's slice.
        """
        proto, transport = self.negotiated()
        buf = bytearray(8)
        d = proto.read(100, memoryview(buf)[:4])
        [(_, _, handle, _, _, _)] = parseRequests(transport.value())
        proto.dataReceived(dataChunk(handle, 102, b"TOOLONG", done=True))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(buf, bytes(8))
        proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ProtocolError)

    def test_pipelinedRepliesMatchedByHandle(self) -> None:
        """
        Several requests may be in flight; replies arriving in another order
        complete the right ones.
        """
        proto, transport = self.negotiated()
        first, second = bytearray(3), bytearray(3)
        d1 = proto.read(0, memoryview(first))
        d2 = proto.read(3, memoryview(second))
        [r1, r2] = parseRequests(transport.value())
        proto.dataReceived(dataChunk(r2[2], 3, b"two", done=True))
        self.assertNoResult(d1)
        self.successResultOf(d2)
        proto.dataReceived(dataChunk(r1[2], 0, b"one", done=True))
        self.successResultOf(d1)
        self.assertEqual((first, second), (b"one", b"two"))

    def test_unknownHandleIsProtocolError(self) -> None:
        """
        A reply for a request never sent drops the connection and fails the
        requests in flight.
        """
        proto, transport = self.negotiated()
        d = proto.flush()
        proto.dataReceived(simpleReply(999))
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ProtocolError)

    def test_writeSendsPayload(self) -> None:
        """
        A write sends its header and payload together.
        """
        proto, transport = self.negotiated()
        d = proto.write(4096, memoryview(b"payload"))
        [(flags, command, handle, offset, length, payload)] = parseRequests(transport.value())
        self.assertEqual(
            (flags, command, offset, length, payload), (0, nbd.CMD_WRITE, 4096, 7, b"payload")
        )
        proto.dataReceived(simpleReply(handle))
        self.assertIsNone(self.successResultOf(d))

    def test_writeZeroesFlags(self) -> None:
        """
        Write zeroes sets NBD_CMD_FLAG_NO_HOLE only when asked to keep the
        range allocated.
        """
        proto, transport = self.negotiated()
        proto.writeZeroes(0, 512, noHole=True)
        proto.writeZeroes(512, 512, noHole=False)
        [allocate, punch] = parseRequests(transport.value())
        self.assertEqual(allocate[:2], (nbd.CMD_FLAG_NO_HOLE, nbd.CMD_WRITE_ZEROES))
        self.assertEqual(punch[:2], (0, nbd.CMD_WRITE_ZEROES))

    def test_blockStatusByContextName(self) -> None:
        """
        Block status answers are keyed by context name.
        """
        proto, transport = self.negotiated()
        d = proto.blockStatus(0, SIZE)
        [(_, command, handle, offset, length, _)] = parseRequests(transport.value())
        self.assertEqual((command, offset, length), (nbd.CMD_BLOCK_STATUS, 0, SIZE))
        proto.dataReceived(
            statusChunk(handle, 1, [(SIZE, 1)])
            + statusChunk(handle, 0, [(4096, 0), (SIZE - 4096, 3)], done=True)
        )
        self.assertEqual(
            self.successResultOf(d),
            {
                nbd.BASE_ALLOCATION: [(4096, 0), (SIZE - 4096, 3)],
                nbd.QEMU_ALLOCATION_DEPTH: [(SIZE, 1)],
            },
        )

    def test_blockStatusUnknownContext(self) -> None:
        """
        Block status for a context never selected drops the connection.
        """
        proto, transport = self.negotiated()
        d = proto.blockStatus(0, SIZE)
        [(_, _, handle, _, _, _)] = parseRequests(transport.value())
        proto.dataReceived(statusChunk(handle, 7, [(SIZE, 0)], done=True))
        self.assertTrue(transport.disconnecting)
        proto.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ProtocolError)

    def test_connectionLostFailsPending(self) -> None:
        """
        When the connection dies every request in flight fails, and later
        requests fail at once.
        """
        proto, _ = self.negotiated()
        d1 = proto.read(0, memoryview(bytearray(4)))
        d2 = proto.flush()
        proto.connectionLost(Failure(ConnectionDone()))
        for d in (d1, d2):
            failure = self.failureResultOf(d, ConnectionError)
            self.assertIn("NBD connection lost", str(failure.value))
        failure = self.failureResultOf(proto.flush(), ConnectionError)
        self.assertEqual(failure.value.errno, errno.ENOTCONN)

    def test_disconnectWaitsForPending(self) -> None:
        """
        Disconnecting sends NBD_CMD_DISC at once but closes only after the
        requests in flight have answered.
        """
        proto, transport = self.negotiated()
        d = proto.flush()
        closed = proto.disconnect()
        [flush, disc] = parseRequests(transport.value())
        self.assertEqual(disc[1], nbd.CMD_DISC)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(simpleReply(flush[2]))
        self.successResultOf(d)
        self.assertTrue(transport.disconnecting)
        self.assertNoResult(closed)
        proto.connectionLost(Failure(ConnectionDone()))
        self.successResultOf(closed)
        self.successResultOf(proto.disconnect())

    def test_cancelDropsConnection(self) -> None:
        """
        Cancelling a request hangs up, since NBD cannot withdraw a request
        whose data may still be arriving.
        """
        proto, transport = self.negotiated()
        d = proto.read(0, memoryview(bytearray(4)))
        d.cancel()
        self.failureResultOf(d)
        self.assertTrue(transport.disconnecting)


class MergeStatusTests(SynchronousTestCase):
    def test_sameSplits(self) -> None:
        """
        Contexts split at the same places merge piece by piece.
        """
        self.assertEqual(
            mergeStatus([(10, 1), (20, 2)], [(10, 0), (20, 1)]),
            [(10, (1, 0)), (20, (2, 1))],
        )

    def test_differentSplits(self) -> None:
        """
        Each piece of the merge is where no context changes.
        """
        self.assertEqual(
            mergeStatus([(30, 3)], [(10, 0), (15, 1), (5, 0)]),
            [(10, (3, 0)), (15, (3, 1)), (5, (3, 0))],
        )

    def test_shortestContextEnds(self) -> None:
        """
        The merge ends where the shortest context ends.
        """
        self.assertEqual(mergeStatus([(10, 1), (10, 2)], [(15, 0)]), [(10, (1, 0)), (5, (2, 0))])

    def test_single(self) -> None:
        """
        One context merges to itself.
        """
        self.assertEqual(mergeStatus([(4, 2), (6, 0)]), [(4, (2,)), (6, (0,))])


class ReplyErrorTests(SynchronousTestCase):
    def test_knownCode(self) -> None:
        """
        NBD error values become the matching errno, with the server's text.
        """
        error = replyError(28, "disk full")
        self.assertEqual(error.errno, errno.ENOSPC)
        self.assertEqual(error.strerror, f"{os.strerror(errno.ENOSPC)}: disk full")

    def test_unknownCode(self) -> None:
        """
        Unknown NBD error values become EIO.
        """
        self.assertEqual(replyError(12345).errno, errno.EIO)
