# -*- test-case-name: tests.test_backend_nbd -*-
"""
The C{nbd:} backend: images served by an NBD server, usually C{qemu-nbd}
started by vdsm on a UNIX socket.

URL forms (as upstream)::

    nbd:unix:/path/to/socket[:exportname=name]
    nbd:host:port[:exportname=name]
    nbd://host[:port]/name

The export name is empty unless given. The wire work is done by
L{imageio.backends._nbdproto.NBDClientProtocol}; this module parses URLs,
connects, splits large operations into requests the server accepts and
turns block status into extents.
"""

from __future__ import annotations

import errno
import re
from typing import Any
from urllib.parse import unquote, urlsplit

from attrs import define, field, frozen
from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import ClientCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imageio.backends import MAX_EXTENTS, BackendContext
from imageio.backends._nbdproto import (
    BASE_ALLOCATION,
    DEFAULT_MAX_PAYLOAD,
    QEMU_ALLOCATION_DEPTH,
    STATE_ZERO,
    ExportInfo,
    NBDClientProtocol,
    NBDError,
    mergeStatus,
)
from imageio.interfaces import Extent, IBackend, UnsupportedOperation

log = Logger()

#: Default NBD TCP port (IANA), for C{nbd://host/name}.
DEFAULT_PORT = 10809

#: Seconds to wait for the socket to connect.
CONNECT_TIMEOUT = 10.0

#: Seconds from connect until the export is open; like QEMU's own
#: handshake deadline.
NEGOTIATION_TIMEOUT = 10.0

#: Largest single NBD_CMD_WRITE_ZEROES: qemu-nbd accepts up to about 2 GiB,
#: but a huge zero delays other requests on the same image.
MAX_ZERO = 128 * 1024**2

#: Largest range asked of one NBD_CMD_BLOCK_STATUS (the limit is 4 GiB - 1;
#: a smaller step bounds the extents one reply can carry).
MAX_BLOCK_STATUS = 2 * 1024**3

_UNIX_PATH = re.compile(r"unix:(?P<path>/[^:]*)(?::exportname=(?P<name>.*))?", re.DOTALL)
_TCP_PATH = re.compile(
    r"(?P<host>\[[^\]]+\]|[^:\[\]/]+):(?P<port>[0-9]+)(?::exportname=(?P<name>.*))?",
    re.DOTALL,
)


@frozen
class NBDAddress:
    """
    Where an NBD export lives.

    @ivar transport: C{"unix"} or C{"tcp"}.
    @ivar path: Socket path, for C{unix}.
    @ivar host: Host name or address (IPv6 without brackets), for C{tcp}.
    @ivar port: TCP port, for C{tcp}.
    @ivar exportName: The export name; empty for the default export.
    """

    transport: str
    exportName: str = ""
    path: str = ""
    host: str = ""
    port: int = 0

    def endpoint(self, reactor: Any, timeout: float = CONNECT_TIMEOUT) -> IStreamClientEndpoint:
        """
        @return: A client endpoint connecting to this address.
        """
        # Imported here: twisted.internet.endpoints imports pyOpenSSL and
        # cryptography (about 13 MiB), which a daemon serving unix: NBD
        # exports never needs (L{_open} connects to those without it).
        from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint

        if self.transport == "unix":
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        return HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)

    def __str__(self) -> str:
        if self.transport == "unix":
            where = f"unix:{self.path}"
        elif ":" in self.host:
            where = f"[{self.host}]:{self.port}"
        else:
            where = f"{self.host}:{self.port}"
        return f"nbd:{where}:exportname={self.exportName}"


def parseURL(url: str) -> NBDAddress:
    """
    Parse an C{nbd:} ticket URL.

    @raise ValueError: If C{url} is not one of the supported forms.
    """
    parts = urlsplit(url)
    if parts.scheme != "nbd":
        raise ValueError(f"Unsupported NBD URL {url!r}: scheme must be 'nbd'")
    if parts.netloc:
        # nbd://host[:port]/name. As in the NBD URI spec and qemu, the
        # first "/" separates the name, and the name is percent-decoded.
        if parts.query or parts.fragment:
            raise ValueError(f"Unsupported NBD URL {url!r}: query and fragment not allowed")
        try:
            host = parts.hostname
            port = parts.port or DEFAULT_PORT
        except ValueError as e:
            raise ValueError(f"Unsupported NBD URL {url!r}: {e}") from None
        if not host:
            raise ValueError(f"Unsupported NBD URL {url!r}: missing host")
        return NBDAddress("tcp", host=host, port=port, exportName=unquote(parts.path[1:]))
    # The opaque forms: everything after "nbd:" (urlsplit would split a
    # "?" or "#" that is part of a path or export name).
    rest = url[len("nbd:") :]
    match = _UNIX_PATH.fullmatch(rest)
    if match:
        if match["path"] == "/":
            raise ValueError(f"Unsupported NBD URL {url!r}: missing socket path")
        return NBDAddress("unix", path=match["path"], exportName=match["name"] or "")
    match = _TCP_PATH.fullmatch(rest)
    if match:
        port = int(match["port"])
        if not 0 < port < 65536:
            raise ValueError(f"Unsupported NBD URL {url!r}: invalid port {port}")
        host = match["host"].strip("[]")
        return NBDAddress("tcp", host=host, port=port, exportName=match["name"] or "")
    raise ValueError(
        f"Unsupported NBD URL {url!r}: expecting nbd:unix:/path[:exportname=name], "
        "nbd:host:port[:exportname=name] or nbd://host:port/name"
    )


def openBackend(
    ctx: BackendContext, url: str, *, write: bool, sparse: bool, dirty: bool
) -> Deferred[IBackend]:
    """
    Connect to the NBD export at C{url} and open it.

    @param write: Allow L{NBDBackend.write} and L{NBDBackend.zero}.
    @param sparse: Zeroing may deallocate.
    @param dirty: Select the export's dirty bitmap for C{dirty} extents.
    @return: A Deferred firing with an L{NBDBackend}; failing with
        L{ValueError} for a bad URL, L{OSError} when the server cannot be
        reached, or L{imageio.backends._nbdproto.NBDError} when
        negotiation fails.
    """
    try:
        address = parseURL(url)
    except ValueError:
        return fail()
    return Deferred.fromCoroutine(_open(ctx, address, write=write, sparse=sparse, dirty=dirty))


async def _open(
    ctx: BackendContext, address: NBDAddress, *, write: bool, sparse: bool, dirty: bool
) -> IBackend:
    protocol = NBDClientProtocol(
        address.exportName,
        dirty=dirty,
        clock=ctx.reactor,
        negotiationTimeout=NEGOTIATION_TIMEOUT,
    )
    try:
        if address.transport == "unix":
            # What UNIXClientEndpoint does, without importing endpoints.
            creator = ClientCreator(ctx.reactor, lambda: protocol)
            await creator.connectUNIX(address.path, timeout=CONNECT_TIMEOUT)
        else:
            from twisted.internet.endpoints import connectProtocol

            await connectProtocol(address.endpoint(ctx.reactor, CONNECT_TIMEOUT), protocol)
    except CancelledError:
        raise
    except Exception as e:
        timedOut = isinstance(e, (error.TimeoutError, TimeoutError))
        code = errno.ETIMEDOUT if timedOut else errno.ECONNREFUSED
        raise ConnectionError(code, f"Cannot connect to NBD server {address}: {e}") from e
    try:
        info = await protocol.whenReady()
    except BaseException:
        # Failed or cancelled: do not leave the connection behind.
        protocol.disconnect()
        raise
    log.info(
        "Open backend address={address} size={size} sparse={sparse} dirty={dirty} "
        "contexts={contexts}",
        address=str(address),
        size=info.size,
        sparse=sparse,
        dirty=dirty,
        contexts=sorted(info.metaContexts),
    )
    return NBDBackend(
        protocol,
        info,
        address=address,
        writable=write,
        sparse=sparse,
        dirty=dirty,
        maxConnections=ctx.maxConnections,
        bufferSize=ctx.bufferSize,
    )


@implementer(IBackend)
@define
class NBDBackend:
    """
    One NBD connection serving one client connection's operations.

    @ivar protocol: The connected, negotiated client protocol.
    @ivar info: What negotiation learned about the export.
    @ivar address: Where the export is, for logs and errors.
    @ivar writable: The ticket allows writing.
    @ivar sparse: Zeroing may deallocate.
    @ivar dirty: The ticket asked for dirty extents.
    @ivar maxConnections: Advertised as C{maxReaders} and C{maxWriters}.
    @ivar bufferSize: Largest read or write request to send.
    """

    protocol: NBDClientProtocol
    info: ExportInfo
    address: NBDAddress
    writable: bool
    sparse: bool = False
    dirty: bool = False
    maxConnections: int = 8
    bufferSize: int = 8 * 1024**2
    name: str = field(default="nbd", init=False)
    _closed: bool = field(default=False, init=False)
    _zeroes: bytes = field(default=b"", init=False, repr=False)

    @property
    def blockSize(self) -> int:
        # Without NBD_INFO_BLOCK_SIZE in our NBD_OPT_GO, qemu-nbd reports
        # (and accepts) byte granularity.
        return self.info.minimumBlockSize

    @property
    def maxReaders(self) -> int:
        return self.maxConnections

    @property
    def maxWriters(self) -> int:
        return self.maxConnections

    @property
    def maxRequest(self) -> int:
        """
        Largest payload of one read or write request.
        """
        limit = self.info.maximumBlockSize or DEFAULT_MAX_PAYLOAD
        return max(1, min(limit, DEFAULT_MAX_PAYLOAD, self.bufferSize))

    def size(self) -> Deferred[int]:
        return succeed(self.info.size)

    def readInto(self, offset: int, buf: memoryview) -> Deferred[int]:
        if self._closed:
            return fail(_closedError())
        length = max(0, min(len(buf), self.info.size - offset))
        if length == 0:
            return succeed(0)
        view = memoryview(buf)
        step = self.maxRequest
        # Pipelined: every piece is in flight at once, each landing in its
        # own slice of the caller's buffer.
        reads = [
            self.protocol.read(offset + pos, view[pos : min(pos + step, length)])
            for pos in range(0, length, step)
        ]
        return _gather(reads).addCallback(lambda _: length)

    def write(self, offset: int, data: memoryview) -> Deferred[int]:
        refused = self._refuseWrite()
        if refused is not None:
            return refused
        view = memoryview(data)
        length = len(view)
        if length == 0:
            return succeed(0)
        step = self.maxRequest
        writes = [
            self.protocol.write(offset + pos, view[pos : pos + step])
            for pos in range(0, length, step)
        ]
        return _gather(writes).addCallback(lambda _: length)

    def zero(self, offset: int, length: int) -> Deferred[None]:
        refused = self._refuseWrite()
        if refused is not None:
            return refused
        return Deferred.fromCoroutine(self._zero(offset, length))

    async def _zero(self, offset: int, length: int) -> None:
        end = offset + length
        if self.info.canZero:
            # One step at a time, so other clients' requests get a turn.
            while offset < end:
                step = min(end - offset, MAX_ZERO)
                await self.protocol.writeZeroes(offset, step, noHole=not self.sparse)
                offset += step
            return
        # The server cannot zero: write zeroes, allocating either way.
        if not self._zeroes:
            self._zeroes = bytes(min(self.maxRequest, length))
        while offset < end:
            step = min(end - offset, len(self._zeroes))
            await self.protocol.write(offset, memoryview(self._zeroes)[:step])
            offset += step

    def flush(self) -> Deferred[None]:
        if self._closed:
            return fail(_closedError())
        if not self.info.canFlush:
            # Nothing to flush: the server writes through.
            return succeed(None)
        return self.protocol.flush()

    def extents(self, context: str, start: int, length: int) -> Deferred[list[Extent]]:
        if context not in ("zero", "dirty"):
            return fail(UnsupportedOperation(f"Backend nbd does not support {context} extents"))
        if context == "dirty" and (not self.dirty or self.info.dirtyBitmap is None):
            return fail(
                UnsupportedOperation(
                    f"NBD export {self.info.name!r} does not support dirty extents"
                )
            )
        if self._closed:
            return fail(_closedError())
        end = min(start + length, self.info.size)
        if start >= end:
            return succeed([])
        if context == "zero" and BASE_ALLOCATION not in self.info.metaContexts:
            # Nothing known: one data extent, like the file backend.
            return succeed([Extent(start, end - start, zero=False, hole=False)])
        return Deferred.fromCoroutine(self._extents(context, start, end))

    async def _extents(self, context: str, start: int, end: int) -> list[Extent]:
        contexts = self.info.metaContexts
        if context == "dirty":
            assert self.info.dirtyBitmap is not None
            names = [self.info.dirtyBitmap]
        else:
            names = []
            if QEMU_ALLOCATION_DEPTH in contexts:
                names.append(QEMU_ALLOCATION_DEPTH)
        if BASE_ALLOCATION in contexts:
            names.append(BASE_ALLOCATION)

        result: list[Extent] = []
        offset = start
        while offset < end:
            step = min(end - offset, MAX_BLOCK_STATUS)
            status = await self.protocol.blockStatus(offset, step)
            missing = [name for name in names if name not in status]
            if missing:
                raise NBDError(f"NBD server sent no block status for {', '.join(missing)}")
            pieces = mergeStatus(*(status[name] for name in names))
            for pieceLength, flags in pieces:
                pieceLength = min(pieceLength, end - offset)
                extent = self._extent(context, names, offset, pieceLength, flags)
                _append(result, extent)
                offset += pieceLength
                if offset == end:
                    break
            if len(result) >= MAX_EXTENTS:
                # Enough for one answer: the caller asks again from here.
                break
        return result

    def _extent(
        self, context: str, names: list[str], offset: int, length: int, flags: tuple[int, ...]
    ) -> Extent:
        byName = dict(zip(names, flags, strict=True))
        zero = bool(byName.get(BASE_ALLOCATION, 0) & STATE_ZERO)
        if context == "dirty":
            assert self.info.dirtyBitmap is not None
            dirty = bool(byName[self.info.dirtyBitmap] & 1)
            return Extent(offset, length, zero=zero, dirty=dirty)
        # Depth 0: not allocated in this qcow2 layer, reads fall through.
        hole = QEMU_ALLOCATION_DEPTH in byName and byName[QEMU_ALLOCATION_DEPTH] == 0
        return Extent(offset, length, zero=zero, hole=hole)

    def close(self) -> Deferred[None]:
        if not self._closed:
            self._closed = True
            log.info("Close backend address={address}", address=str(self.address))
        return self.protocol.disconnect()

    def _refuseWrite(self) -> Deferred[Any] | None:
        if self._closed:
            return fail(_closedError())
        if not self.writable:
            return fail(OSError(errno.EBADF, "Backend nbd was not opened for writing"))
        if self.info.readOnly:
            return fail(OSError(errno.EROFS, f"NBD export {self.info.name!r} is read-only"))
        return None


def _append(extents: list[Extent], extent: Extent) -> None:
    """
    Add C{extent}, merging it into the last one when they look the same.
    """
    if extents:
        last = extents[-1]
        if (last.zero, last.hole, last.dirty) == (extent.zero, extent.hole, extent.dirty):
            extents[-1] = Extent(
                last.start, last.length + extent.length, last.zero, last.hole, last.dirty
            )
            return
    extents.append(extent)


def _gather(ds: list[Deferred[None]]) -> Deferred[None]:
    """
    Wait for every request; fail with the first failure once all are done.
    """
    if len(ds) == 1:
        return ds[0]

    def firstFailure(results: list[tuple[bool, Any]]) -> Failure | None:
        # Waiting for all matters: a failed read must not return while
        # other pieces may still land in the caller's buffer.
        for ok, value in results:
            if not ok:
                assert isinstance(value, Failure)
                return value
        return None

    return DeferredList(ds, consumeErrors=True).addCallback(firstFailure)


def _closedError() -> OSError:
    return OSError(errno.EBADF, "Backend nbd is closed")
