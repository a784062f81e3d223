# -*- test-case-name: tests.test_nbdproto -*-
"""
A Twisted client for the NBD protocol: fixed newstyle negotiation,
structured replies, metadata contexts and pipelined requests.

The protocol knows nothing about tickets or URLs; L{imageio.backends.nbd}
builds the backend on top of it. Everything here runs on the reactor
thread and never blocks: replies are parsed as bytes arrive, and read
payloads are copied straight into the caller's buffer.

Reference: the NBD protocol specification,
U{https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md}.
"""

from __future__ import annotations

import errno
import itertools
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionClosed
from twisted.internet.interfaces import IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# Magic numbers.
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1

# Transmission flags.
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option replies.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR + 1
REP_ERR_POLICY = REP_FLAG_ERROR + 2
REP_ERR_INVALID = REP_FLAG_ERROR + 3
REP_ERR_PLATFORM = REP_FLAG_ERROR + 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR + 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR + 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR + 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR + 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR + 9

# NBD_OPT_GO information types.
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

# Commands and command flags.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1

# Structured replies.
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR_BIT = 1 << 15
REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT + 1
REPLY_TYPE_ERROR_OFFSET = REPLY_TYPE_ERROR_BIT + 2

# Metadata contexts and their flags.
BASE_ALLOCATION = "base:allocation"
QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"
QEMU_DIRTY_BITMAP = "qemu:dirty-bitmap:"
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1
STATE_DIRTY = 1 << 0

#: Largest read or write payload when the server sends no block size
#: constraints (the spec's default maximum).
DEFAULT_MAX_PAYLOAD = 32 * 1024**2

#: Largest option reply we accept during negotiation; replies are export
#: names, context names and error messages, each at most 4 KiB by the spec.
MAX_OPTION_REPLY = 64 * 1024

#: Largest block status payload we buffer: 4 MiB is half a million extents,
#: more than any sane server sends for one request.
MAX_BLOCK_STATUS_PAYLOAD = 4 * 1024**2

#: Error strings are at most 4 KiB by the spec; leave room for the header.
MAX_ERROR_PAYLOAD = 4096 + 14

# Wire formats.
_GREETING = struct.Struct("!QQH")
_OPTION = struct.Struct("!QII")
_OPTION_REPLY = struct.Struct("!QIII")
_REQUEST = struct.Struct("!IHHQQI")
_SIMPLE_REPLY = struct.Struct("!IIQ")
_STRUCTURED_START = struct.Struct("!IHHQ")
_STRUCTURED_REST = struct.Struct("!I")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_INFO_EXPORT = struct.Struct("!QH")
_INFO_BLOCK_SIZE = struct.Struct("!III")
_HOLE = struct.Struct("!QI")
_ERROR = struct.Struct("!IH")
_EXTENT = struct.Struct("!II")

#: Shared source of zeroes for hole chunks.
_ZEROES = bytes(1024**2)

#: NBD error values (proto.md "Error values") to this platform's errno.
_NBD_ERRNO = {
    1: errno.EPERM,
    5: errno.EIO,
    12: errno.ENOMEM,
    22: errno.EINVAL,
    28: errno.ENOSPC,
    75: errno.EOVERFLOW,
    95: errno.EOPNOTSUPP,
    108: errno.ESHUTDOWN,
}

_OPTION_NAMES = {
    OPT_EXPORT_NAME: "NBD_OPT_EXPORT_NAME",
    OPT_ABORT: "NBD_OPT_ABORT",
    OPT_GO: "NBD_OPT_GO",
    OPT_STRUCTURED_REPLY: "NBD_OPT_STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "NBD_OPT_LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "NBD_OPT_SET_META_CONTEXT",
}

_OPTION_ERRORS = {
    REP_ERR_UNSUP: "option not supported by the server",
    REP_ERR_POLICY: "denied by server policy",
    REP_ERR_INVALID: "invalid option",
    REP_ERR_PLATFORM: "not supported on the server's platform",
    REP_ERR_TLS_REQD: "the server requires TLS",
    REP_ERR_UNKNOWN: "the requested export is not available",
    REP_ERR_SHUTDOWN: "the server is shutting down",
    REP_ERR_BLOCK_SIZE_REQD: "the server requires block size negotiation",
    REP_ERR_TOO_BIG: "request or reply too large",
}

_COMMAND_NAMES = {
    CMD_READ: "NBD_CMD_READ",
    CMD_WRITE: "NBD_CMD_WRITE",
    CMD_DISC: "NBD_CMD_DISC",
    CMD_FLUSH: "NBD_CMD_FLUSH",
    CMD_TRIM: "NBD_CMD_TRIM",
    CMD_WRITE_ZEROES: "NBD_CMD_WRITE_ZEROES",
    CMD_BLOCK_STATUS: "NBD_CMD_BLOCK_STATUS",
}


class NBDError(Exception):
    """
    Base class of NBD client errors that are not plain I/O errors.
    """


class ProtocolError(NBDError):
    """
    The server broke the protocol; the connection is dropped.
    """


class OptionError(NBDError):
    """
    The server refused an option during negotiation.

    @ivar option: The option number.
    @ivar reply: The error reply type.
    """

    def __init__(self, option: int, reply: int, message: str) -> None:
        self.option = option
        self.reply = reply
        name = _OPTION_NAMES.get(option, str(option))
        reason = message or _OPTION_ERRORS.get(reply, f"error {reply:#x}")
        super().__init__(f"NBD server refused {name}: {reason}")


class RequestCancelled(NBDError):
    """
    A request was cancelled, which drops the connection.
    """


class NegotiationTimeout(NBDError):
    """
    The server did not finish negotiation in time.
    """


def replyError(code: int, message: str = "") -> OSError:
    """
    Turn an NBD error value into an L{OSError}.

    @param code: The error value from a simple reply or an error chunk.
    @param message: The server's human readable message, if any.
    """
    errnum = _NBD_ERRNO.get(code, errno.EIO)
    text = os.strerror(errnum)
    if message:
        text = f"{text}: {message}"
    return OSError(errnum, text)


@frozen
class ExportInfo:
    """
    What negotiation learned about the export.

    @ivar name: The export name.
    @ivar size: Export size in bytes.
    @ivar flags: Transmission flags.
    @ivar minimumBlockSize: Smallest useful request alignment (1 unless the
        server says otherwise).
    @ivar preferredBlockSize: Alignment for best performance.
    @ivar maximumBlockSize: Largest read or write payload.
    @ivar structuredReplies: Structured replies were negotiated.
    @ivar metaContexts: Selected metadata contexts, name to server id.
    @ivar dirtyBitmap: The selected C{qemu:dirty-bitmap:*} context, if any.
    """

    name: str
    size: int
    flags: int
    minimumBlockSize: int = 1
    preferredBlockSize: int = 4096
    maximumBlockSize: int = DEFAULT_MAX_PAYLOAD
    structuredReplies: bool = False
    metaContexts: dict[str, int] = field(factory=dict)
    dirtyBitmap: str | None = None

    @property
    def readOnly(self) -> bool:
        return bool(self.flags & FLAG_READ_ONLY)

    @property
    def canFlush(self) -> bool:
        return bool(self.flags & FLAG_SEND_FLUSH)

    @property
    def canZero(self) -> bool:
        return bool(self.flags & FLAG_SEND_WRITE_ZEROES)


#: Block status answer: context name to C{(length, flags)} descriptors.
BlockStatus = dict[str, list[tuple[int, int]]]


@define
class _Request:
    """
    A request in flight, keyed by its handle.

    @ivar covered: Bytes of a read described by content chunks so far.
    @ivar error: The first error chunk; the request fails when done.
    """

    command: int
    offset: int
    length: int
    deferred: Deferred[Any]
    buf: memoryview | None = None
    covered: int = 0
    error: OSError | None = None
    status: BlockStatus = field(factory=dict)

    def describe(self) -> str:
        name = _COMMAND_NAMES.get(self.command, str(self.command))
        return f"{name} offset={self.offset} length={self.length}"


def mergeStatus(*contexts: Sequence[tuple[int, int]]) -> list[tuple[int, tuple[int, ...]]]:
    """
    Line up block status descriptors of several metadata contexts.

    Each context describes the same range as consecutive C{(length,
    flags)} descriptors, but the contexts split it at different places.

    @return: C{(length, (flags of each context, ...))} for every piece where
        no context changes, up to where the shortest context ends.
    """
    iterators = [iter(c) for c in contexts]
    current: list[list[int]] = []
    for it in iterators:
        first = next(it, None)
        if first is None:
            return []
        current.append(list(first))
    merged: list[tuple[int, tuple[int, ...]]] = []
    while True:
        step = min(c[0] for c in current)
        merged.append((step, tuple(c[1] for c in current)))
        for i, c in enumerate(current):
            c[0] -= step
            if c[0] == 0:
                following = next(iterators[i], None)
                if following is None:
                    return merged
                current[i] = list(following)


class NBDClientProtocol(Protocol):
    """
    One NBD client connection.

    Negotiation starts when the connection is made; L{whenReady} fires with
    the L{ExportInfo} once the export is open. Then L{read}, L{write},
    L{writeZeroes}, L{flush} and L{blockStatus} send one request each and
    may be called again before earlier ones answer; replies are matched by
    handle. When the connection goes away every request in flight fails.

    @ivar exportName: The export to open.
    @ivar dirty: Look for a C{qemu:dirty-bitmap:*} context and select it.
    @ivar clock: Times negotiation out.
    @ivar negotiationTimeout: Seconds allowed from connect to export open.
    """

    def __init__(
        self,
        exportName: str = "",
        *,
        dirty: bool = False,
        clock: IReactorTime | None = None,
        negotiationTimeout: float = 10.0,
    ) -> None:
        self.exportName = exportName
        self.dirty = dirty
        self.clock = clock
        self.negotiationTimeout = negotiationTimeout
        self.info: ExportInfo | None = None

        self._handles = itertools.count(1)
        self._pending: dict[int, _Request] = {}
        self._readyWaiters: list[Deferred[ExportInfo]] = []
        self._lostWaiters: list[Deferred[None]] = []
        self._readyResult: ExportInfo | Failure | None = None
        self._connected = False
        self._lost = False
        self._disconnecting = False
        self._failReason: Failure | None = None
        self._timeoutCall: IDelayedCall | None = None
        self._contextNames: dict[int, str] = {}

        # Negotiation reads: a buffer and at most one waiting reader.
        self._inbox = bytearray()
        self._wanted = 0
        self._waiter: Deferred[bytes] | None = None

        # Transmission parsing: either fill _header up to _need bytes and
        # call _handler, or copy payload into _sink and call _sinkDone.
        self._transmission = False
        self._header = bytearray()
        self._need = 0
        self._handler: Callable[[memoryview], None] = self._gotReplyHeader
        self._sink: memoryview | None = None
        self._sinkDone: Callable[[], None] = _noop

    # Lifecycle

    def whenReady(self) -> Deferred[ExportInfo]:
        """
        @return: A Deferred firing with the L{ExportInfo} when the export is
            open, or failing with why negotiation failed.
        """
        if isinstance(self._readyResult, Failure):
            return fail(self._readyResult)
        if self._readyResult is not None:
            return succeed(self._readyResult)
        d: Deferred[ExportInfo] = Deferred()
        self._readyWaiters.append(d)
        return d

    def whenLost(self) -> Deferred[None]:
        """
        @return: A Deferred firing when the connection is gone.
        """
        if self._lost:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._lostWaiters.append(d)
        return d

    def connectionMade(self) -> None:
        self._connected = True
        if ITCPTransport.providedBy(self.transport):
            try:
                # Small request headers must not wait for Nagle.
                self.transport.setTcpNoDelay(True)
            except OSError:
                pass  # UNIX sockets share the TCP transport class.
        if self.clock is not None:
            self._timeoutCall = self.clock.callLater(
                self.negotiationTimeout, self._negotiationTimedOut
            )
        d = Deferred.fromCoroutine(self._negotiate())
        d.addCallbacks(self._negotiated, self._negotiationFailed)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._connected = False
        self._lost = True
        self._cancelTimeout()
        if self._failReason is not None:
            reason = self._failReason
        # Negotiation in progress: its pending read fails with the reason.
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.errback(reason)
        if self._readyResult is None:
            self._setReady(reason)
        pending, self._pending = self._pending, {}
        if pending:
            error = reason
            if not reason.check(NBDError):
                error = Failure(
                    ConnectionError(
                        errno.ECONNRESET,
                        f"NBD connection lost with {len(pending)} requests in flight: "
                        f"{reason.getErrorMessage()}",
                    )
                )
            for request in pending.values():
                request.deferred.errback(error)
        waiters, self._lostWaiters = self._lostWaiters, []
        for d in waiters:
            d.callback(None)

    def disconnect(self) -> Deferred[None]:
        """
        End the session politely: C{NBD_OPT_ABORT} during negotiation,
        C{NBD_CMD_DISC} once requests in flight have answered.

        @return: A Deferred firing when the connection is gone.
        """
        if not self._connected:
            return self.whenLost()
        if not self._disconnecting:
            self._disconnecting = True
            assert self.transport is not None
            if not self._transmission:
                self.transport.write(_OPTION.pack(IHAVEOPT, OPT_ABORT, 0))
                self.transport.loseConnection()
            else:
                self.transport.write(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
                self._maybeFinishDisconnect()
        return self.whenLost()

    def _maybeFinishDisconnect(self) -> None:
        # The server answers requests sent before NBD_CMD_DISC, so keep
        # reading until they are all in.
        if self._disconnecting and not self._pending and self._connected:
            assert self.transport is not None
            self.transport.loseConnection()

    def _fatal(self, error: NBDError) -> None:
        """
        Drop the connection because of C{error}; requests in flight and
        negotiation fail with it.
        """
        if self._failReason is None:
            log.warn("NBD client dropping connection: {error}", error=error)
            self._failReason = Failure(error)
        if self._connected:
            self._abort()

    def _abort(self) -> None:
        # Hard disconnect: drop unsent data and stop reading at once.
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()
        elif self.transport is not None:
            self.transport.loseConnection()

    def _send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def _cancelRequest(self, d: Deferred[Any]) -> None:
        # NBD cannot withdraw a request, and its reply may still be on the
        # way into the caller's buffer: the only safe cancel is hanging up.
        self._fatal(RequestCancelled("NBD request cancelled; connection dropped"))

    # Negotiation

    async def _negotiate(self) -> ExportInfo:
        greeting = await self._readExactly(_GREETING.size)
        magic, optMagic, handshakeFlags = _GREETING.unpack(greeting)
        if magic != NBDMAGIC:
            raise ProtocolError(f"Not an NBD server: bad magic {magic:#x}")
        if optMagic != IHAVEOPT:
            raise ProtocolError("NBD server does not support newstyle negotiation")
        if not handshakeFlags & FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("NBD server does not support fixed newstyle negotiation")
        clientFlags = FLAG_C_FIXED_NEWSTYLE
        if handshakeFlags & FLAG_NO_ZEROES:
            clientFlags |= FLAG_C_NO_ZEROES
        self._send(_U32.pack(clientFlags))

        structured = await self._negotiateStructuredReplies()
        metaContexts: dict[str, int] = {}
        dirtyBitmap = None
        if structured:
            queries = [BASE_ALLOCATION, QEMU_ALLOCATION_DEPTH]
            if self.dirty:
                bitmaps = await self._listMetaContexts(QEMU_DIRTY_BITMAP)
                if len(bitmaps) == 1:
                    dirtyBitmap = bitmaps[0]
                    queries.append(dirtyBitmap)
                else:
                    log.warn(
                        "NBD export {export!r} has {count} dirty bitmaps, need exactly one",
                        export=self.exportName,
                        count=len(bitmaps),
                    )
            metaContexts = await self._setMetaContexts(queries)
            if dirtyBitmap not in metaContexts:
                dirtyBitmap = None
        info = await self._go()
        return ExportInfo(
            name=self.exportName,
            size=info["size"],
            flags=info["flags"],
            minimumBlockSize=info.get("minimum", 1),
            preferredBlockSize=info.get("preferred", 4096),
            maximumBlockSize=info.get("maximum", DEFAULT_MAX_PAYLOAD),
            structuredReplies=structured,
            metaContexts=metaContexts,
            dirtyBitmap=dirtyBitmap,
        )

    async def _negotiateStructuredReplies(self) -> bool:
        self._sendOption(OPT_STRUCTURED_REPLY)
        reply, payload = await self._readOptionReply(OPT_STRUCTURED_REPLY)
        if reply == REP_ACK:
            return True
        if reply & REP_FLAG_ERROR:
            # Plain reads still work; we only lose extents.
            log.info(
                "NBD structured replies unavailable: {error}",
                error=OptionError(OPT_STRUCTURED_REPLY, reply, _text(payload)),
            )
            return False
        raise ProtocolError(f"Unexpected reply {reply} to NBD_OPT_STRUCTURED_REPLY")

    async def _listMetaContexts(self, query: str) -> list[str]:
        self._sendOption(OPT_LIST_META_CONTEXT, self._metaContextData([query]))
        return list(await self._readMetaContextReplies(OPT_LIST_META_CONTEXT))

    async def _setMetaContexts(self, queries: list[str]) -> dict[str, int]:
        self._sendOption(OPT_SET_META_CONTEXT, self._metaContextData(queries))
        contexts = await self._readMetaContextReplies(OPT_SET_META_CONTEXT)
        for name in contexts:
            if name not in queries:
                raise ProtocolError(f"NBD server selected unrequested context {name!r}")
        return contexts

    async def _readMetaContextReplies(self, option: int) -> dict[str, int]:
        contexts: dict[str, int] = {}
        while True:
            reply, payload = await self._readOptionReply(option)
            if reply == REP_ACK:
                return contexts
            if reply & REP_FLAG_ERROR:
                log.info(
                    "NBD metadata contexts unavailable: {error}",
                    error=OptionError(option, reply, _text(payload)),
                )
                return {}
            if reply != REP_META_CONTEXT or len(payload) < 4:
                raise ProtocolError(f"Unexpected reply {reply} to option {option}")
            (contextID,) = _U32.unpack_from(payload)
            contexts[_text(payload[4:])] = contextID

    async def _go(self) -> dict[str, int]:
        # We do not ask for NBD_INFO_BLOCK_SIZE: asking commits us to the
        # server's minimum (512 or 4096 for qemu-nbd --cache=none), while
        # not asking makes qemu accept any alignment and do the
        # read-modify-write itself, which it does better than we could.
        name = self.exportName.encode("utf-8")
        data = _U32.pack(len(name)) + name + _U16.pack(0)
        self._sendOption(OPT_GO, data)
        info: dict[str, int] = {}
        while True:
            reply, payload = await self._readOptionReply(OPT_GO)
            if reply == REP_ACK:
                if "size" not in info:
                    raise ProtocolError("NBD server sent no export size")
                return info
            if reply & REP_FLAG_ERROR:
                raise OptionError(OPT_GO, reply, _text(payload))
            if reply != REP_INFO or len(payload) < 2:
                raise ProtocolError(f"Unexpected reply {reply} to NBD_OPT_GO")
            (infoType,) = _U16.unpack_from(payload)
            body = payload[2:]
            if infoType == INFO_EXPORT:
                if len(body) != _INFO_EXPORT.size:
                    raise ProtocolError("Bad NBD_INFO_EXPORT length")
                info["size"], info["flags"] = _INFO_EXPORT.unpack(body)
            elif infoType == INFO_BLOCK_SIZE:
                if len(body) != _INFO_BLOCK_SIZE.size:
                    raise ProtocolError("Bad NBD_INFO_BLOCK_SIZE length")
                info["minimum"], info["preferred"], info["maximum"] = _INFO_BLOCK_SIZE.unpack(body)
            # Other information (name, description) is not needed.

    def _metaContextData(self, queries: list[str]) -> bytes:
        name = self.exportName.encode("utf-8")
        parts = [_U32.pack(len(name)), name, _U32.pack(len(queries))]
        for query in queries:
            encoded = query.encode("utf-8")
            parts += [_U32.pack(len(encoded)), encoded]
        return b"".join(parts)

    def _sendOption(self, option: int, data: bytes = b"") -> None:
        self._send(_OPTION.pack(IHAVEOPT, option, len(data)) + data)

    async def _readOptionReply(self, option: int) -> tuple[int, bytes]:
        header = await self._readExactly(_OPTION_REPLY.size)
        magic, replyOption, reply, length = _OPTION_REPLY.unpack(header)
        if magic != OPTION_REPLY_MAGIC:
            raise ProtocolError(f"Bad NBD option reply magic {magic:#x}")
        if replyOption != option:
            raise ProtocolError(f"NBD reply for option {replyOption}, expected {option}")
        if length > MAX_OPTION_REPLY:
            raise ProtocolError(f"NBD option reply too large: {length} bytes")
        payload = await self._readExactly(length) if length else b""
        return reply, payload

    def _readExactly(self, n: int) -> Deferred[bytes]:
        if self._failReason is not None:
            return fail(self._failReason)
        if len(self._inbox) >= n:
            data = bytes(self._inbox[:n])
            del self._inbox[:n]
            return succeed(data)
        self._wanted = n
        self._waiter = Deferred()
        return self._waiter

    def _negotiated(self, info: ExportInfo) -> None:
        self._cancelTimeout()
        self.info = info
        self._contextNames = {cid: name for name, cid in info.metaContexts.items()}
        self._transmission = True
        self._need = _SIMPLE_REPLY.size
        log.debug(
            "NBD export {export!r} open: size={size} flags={flags:#x} contexts={contexts}",
            export=info.name,
            size=info.size,
            flags=info.flags,
            contexts=sorted(info.metaContexts),
        )
        leftover, self._inbox = bytes(self._inbox), bytearray()
        self._setReady(info)
        if leftover:
            self.dataReceived(leftover)

    def _negotiationFailed(self, reason: Failure) -> None:
        self._cancelTimeout()
        if self._failReason is not None:
            reason = self._failReason
        elif reason.check(ConnectionClosed):
            reason = Failure(
                ConnectionError(
                    errno.ECONNRESET,
                    "NBD server closed the connection during negotiation: "
                    + reason.getErrorMessage(),
                )
            )
        else:
            self._failReason = reason
        if self._connected:
            assert self.transport is not None
            if reason.check(OptionError):
                # Polite goodbye: the server is fine, the export is not.
                self.transport.write(_OPTION.pack(IHAVEOPT, OPT_ABORT, 0))
                self.transport.loseConnection()
            else:
                self._abort()
        self._setReady(reason)

    def _negotiationTimedOut(self) -> None:
        self._timeoutCall = None
        self._fatal(
            NegotiationTimeout(f"NBD negotiation did not finish in {self.negotiationTimeout}s")
        )

    def _cancelTimeout(self) -> None:
        if self._timeoutCall is not None:
            self._timeoutCall.cancel()
            self._timeoutCall = None

    def _setReady(self, result: ExportInfo | Failure) -> None:
        if self._readyResult is not None:
            return
        self._readyResult = result
        waiters, self._readyWaiters = self._readyWaiters, []
        for d in waiters:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    # Requests

    def read(self, offset: int, buf: memoryview) -> Deferred[None]:
        """
        Read C{len(buf)} bytes at C{offset} into C{buf} with one
        C{NBD_CMD_READ}. C{len(buf)} must not exceed the server's maximum
        payload.
        """
        return self._request(CMD_READ, offset, len(buf), buf=buf)

    def write(self, offset: int, data: bytes | memoryview) -> Deferred[None]:
        """
        Write C{data} at C{offset} with one C{NBD_CMD_WRITE}.
        """
        return self._request(CMD_WRITE, offset, len(data), payload=data)

    def writeZeroes(self, offset: int, length: int, *, noHole: bool) -> Deferred[None]:
        """
        Zero a range with C{NBD_CMD_WRITE_ZEROES}.

        @param noHole: Keep the range allocated (C{NBD_CMD_FLAG_NO_HOLE}).
        """
        flags = CMD_FLAG_NO_HOLE if noHole else 0
        return self._request(CMD_WRITE_ZEROES, offset, length, flags=flags)

    def flush(self) -> Deferred[None]:
        """
        Make completed writes durable with C{NBD_CMD_FLUSH}.
        """
        return self._request(CMD_FLUSH, 0, 0)

    def blockStatus(self, offset: int, length: int) -> Deferred[BlockStatus]:
        """
        Ask for the status of a range in every selected metadata context.

        @return: A Deferred firing with context name to C{(length, flags)}
            descriptors; they may cover less than asked.
        """
        return self._request(CMD_BLOCK_STATUS, offset, length)

    def _request(
        self,
        command: int,
        offset: int,
        length: int,
        *,
        flags: int = 0,
        buf: memoryview | None = None,
        payload: bytes | memoryview | None = None,
    ) -> Deferred[Any]:
        if self._lost or self._disconnecting:
            return fail(ConnectionError(errno.ENOTCONN, "NBD connection is closed"))
        if not self._transmission:
            return fail(NBDError("NBD negotiation has not finished"))
        assert self.transport is not None
        handle = next(self._handles)
        d: Deferred[Any] = Deferred(self._cancelRequest)
        request = _Request(command, offset, length, d, buf=buf)
        self._pending[handle] = request
        header = _REQUEST.pack(REQUEST_MAGIC, flags, command, handle, offset, length)
        if payload is None:
            self.transport.write(header)
        else:
            # Twisted transports take bytes only; one join is one copy.
            self.transport.write(b"".join((header, payload)))
        return d

    # Transmission parsing

    def dataReceived(self, data: bytes) -> None:
        if not self._transmission:
            self._inbox += data
            while self._waiter is not None and len(self._inbox) >= self._wanted:
                waiter, self._waiter = self._waiter, None
                piece = bytes(self._inbox[: self._wanted])
                del self._inbox[: self._wanted]
                waiter.callback(piece)
                if self._transmission:
                    return  # _negotiated fed the rest to the reply parser.
            return
        view = memoryview(data)
        while view and self._failReason is None:
            if self._sink is not None:
                n = min(len(self._sink), len(view))
                self._sink[:n] = view[:n]
                view = view[n:]
                if n == len(self._sink):
                    self._sink = None
                    self._sinkDone()
                else:
                    self._sink = self._sink[n:]
                continue
            missing = self._need - len(self._header)
            if not self._header and len(view) >= self._need:
                chunk, view = view[: self._need], view[self._need :]
                self._handler(chunk)
            elif len(view) >= missing:
                self._header += view[:missing]
                view = view[missing:]
                chunk = memoryview(bytes(self._header))
                self._header.clear()
                self._handler(chunk)
            else:
                self._header += view
                view = view[len(view) :]

    def _expect(self, n: int, handler: Callable[[memoryview], None]) -> None:
        if n == 0:
            handler(memoryview(b""))
        else:
            self._need = n
            self._handler = handler

    def _expectInto(self, target: memoryview, done: Callable[[], None]) -> None:
        if len(target) == 0:
            done()
        else:
            self._sink = target
            self._sinkDone = done

    def _nextReply(self) -> None:
        self._expect(_SIMPLE_REPLY.size, self._gotReplyHeader)

    def _gotReplyHeader(self, header: memoryview) -> None:
        (magic,) = _U32.unpack_from(header)
        if magic == SIMPLE_REPLY_MAGIC:
            _, error, handle = _SIMPLE_REPLY.unpack(header)
            self._gotSimpleReply(error, handle)
        elif magic == STRUCTURED_REPLY_MAGIC:
            if self.info is None or not self.info.structuredReplies:
                self._fatal(ProtocolError("Structured reply without negotiating it"))
                return
            # The 16 bytes hold magic, flags, type and handle; the payload
            # length follows.
            _, flags, replyType, handle = _STRUCTURED_START.unpack(header)
            self._expect(
                _STRUCTURED_REST.size,
                lambda rest: self._gotChunkHeader(flags, replyType, handle, rest),
            )
        else:
            self._fatal(ProtocolError(f"Bad NBD reply magic {magic:#x}"))

    def _lookup(self, handle: int) -> _Request | None:
        request = self._pending.get(handle)
        if request is None:
            self._fatal(ProtocolError(f"NBD reply for unknown handle {handle}"))
        return request

    def _gotSimpleReply(self, error: int, handle: int) -> None:
        request = self._lookup(handle)
        if request is None:
            return
        if error:
            request.error = replyError(error)
            self._finish(handle)
        elif request.command == CMD_READ:
            assert request.buf is not None
            request.covered = request.length
            self._expectInto(request.buf, lambda: self._finish(handle))
        elif request.command == CMD_BLOCK_STATUS:
            self._fatal(ProtocolError("Simple reply to NBD_CMD_BLOCK_STATUS"))
        else:
            self._finish(handle)

    def _gotChunkHeader(self, flags: int, replyType: int, handle: int, rest: memoryview) -> None:
        (length,) = _STRUCTURED_REST.unpack(rest)
        request = self._lookup(handle)
        if request is None:
            return
        done = bool(flags & REPLY_FLAG_DONE)

        def after() -> None:
            if done:
                self._finish(handle)
            elif self._failReason is None:
                self._nextReply()

        if replyType == REPLY_TYPE_NONE:
            if length != 0 or not done:
                self._fatal(ProtocolError("Bad NBD_REPLY_TYPE_NONE chunk"))
                return
            after()
        elif replyType == REPLY_TYPE_OFFSET_DATA:
            if request.command != CMD_READ or length <= _U64.size:
                self._fatal(ProtocolError("Bad NBD_REPLY_TYPE_OFFSET_DATA chunk"))
                return
            self._expect(
                _U64.size, lambda raw: self._gotDataOffset(request, length - _U64.size, raw, after)
            )
        elif replyType == REPLY_TYPE_OFFSET_HOLE:
            if request.command != CMD_READ or length != _HOLE.size:
                self._fatal(ProtocolError("Bad NBD_REPLY_TYPE_OFFSET_HOLE chunk"))
                return
            self._expect(_HOLE.size, lambda raw: self._gotHole(request, raw, after))
        elif replyType == REPLY_TYPE_BLOCK_STATUS:
            if (
                request.command != CMD_BLOCK_STATUS
                or length < _U32.size + _EXTENT.size
                or (length - _U32.size) % _EXTENT.size
                or length > MAX_BLOCK_STATUS_PAYLOAD
            ):
                self._fatal(ProtocolError(f"Bad NBD_REPLY_TYPE_BLOCK_STATUS chunk ({length})"))
                return
            self._expect(length, lambda raw: self._gotBlockStatus(request, raw, after))
        elif replyType & REPLY_TYPE_ERROR_BIT:
            if length < _ERROR.size or length > MAX_ERROR_PAYLOAD:
                self._fatal(ProtocolError(f"Bad NBD error chunk length {length}"))
                return
            self._expect(length, lambda raw: self._gotError(request, raw, after))
        else:
            self._fatal(ProtocolError(f"Unknown NBD reply chunk type {replyType}"))

    def _gotDataOffset(
        self, request: _Request, size: int, raw: memoryview, after: Callable[[], None]
    ) -> None:
        (offset,) = _U64.unpack(raw)
        start = offset - request.offset
        if start < 0 or start + size > request.length:
            self._fatal(ProtocolError("NBD data chunk outside the requested range"))
            return
        assert request.buf is not None
        request.covered += size
        self._expectInto(request.buf[start : start + size], after)

    def _gotHole(self, request: _Request, raw: memoryview, after: Callable[[], None]) -> None:
        offset, size = _HOLE.unpack(raw)
        start = offset - request.offset
        if size == 0 or start < 0 or start + size > request.length:
            self._fatal(ProtocolError("NBD hole chunk outside the requested range"))
            return
        assert request.buf is not None
        request.covered += size
        end = start + size
        while start < end:
            step = min(end - start, len(_ZEROES))
            request.buf[start : start + step] = _ZEROES[:step]
            start += step
        after()

    def _gotBlockStatus(
        self, request: _Request, raw: memoryview, after: Callable[[], None]
    ) -> None:
        assert self.info is not None
        (contextID,) = _U32.unpack_from(raw)
        name = self._contextNames.get(contextID)
        if name is None:
            self._fatal(ProtocolError(f"NBD block status for unknown context {contextID}"))
            return
        extents = list(_EXTENT.iter_unpack(raw[_U32.size :]))
        if any(length == 0 for length, _ in extents):
            self._fatal(ProtocolError("NBD block status with a zero length extent"))
            return
        request.status[name] = extents
        after()

    def _gotError(self, request: _Request, raw: memoryview, after: Callable[[], None]) -> None:
        code, messageLength = _ERROR.unpack_from(raw)
        if _ERROR.size + messageLength > len(raw):
            self._fatal(ProtocolError("NBD error message longer than its chunk"))
            return
        message = _text(raw[_ERROR.size : _ERROR.size + messageLength])
        if request.error is None:
            request.error = replyError(code, message)
        after()

    def _finish(self, handle: int) -> None:
        request = self._pending[handle]
        if request.error is None and request.covered != request.length:
            if request.command == CMD_READ:
                # The spec lets us hang up on a reply that claims success
                # without describing every byte.
                self._fatal(
                    ProtocolError(
                        f"NBD read reply covered {request.covered} of {request.length} bytes"
                    )
                )
                return
        del self._pending[handle]
        # Parser state first: the callbacks below may send new requests.
        self._nextReply()
        if request.error is not None:
            if request.error.errno == errno.ESHUTDOWN:
                # The spec wants a soft disconnect from us now.
                self.disconnect()
            request.deferred.errback(request.error)
        elif request.command == CMD_BLOCK_STATUS:
            request.deferred.callback(request.status)
        else:
            request.deferred.callback(None)
        self._maybeFinishDisconnect()

    def __repr__(self) -> str:
        return f"<NBDClientProtocol export={self.exportName!r} pending={len(self._pending)}>"


def _text(data: bytes | memoryview) -> str:
    return bytes(data).decode("utf-8", errors="replace")


def _noop() -> None:
    pass
