# -*- test-case-name: tests.test_backend_nbd -*-
"""
Tests for L{imageio.backends.nbd}: URL parsing and operation splitting with
a fake protocol, then the real thing against C{qemu-nbd}.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from imageio._diskio import SynchronousDiskIO
from imageio.backends import BackendContext, BackendOpener
from imageio.backends import _nbdproto as nbd
from imageio.backends import nbd as nbdbackend
from imageio.backends._nbdproto import ExportInfo, OptionError
from imageio.backends.nbd import (
    MAX_ZERO,
    NBDAddress,
    NBDBackend,
    openBackend,
    parseURL,
)
from imageio.interfaces import Extent, IBackend, UnsupportedOperation
from tests._daemon import acceptingUNIX

MiB = 1024**2


class ParseURLTests(SynchronousTestCase):
    def test_unixDefaultExport(self) -> None:
        """
        C{nbd:unix:/path} names the default (empty) export on a UNIX socket.
        """
        self.assertEqual(
            parseURL("nbd:unix:/run/vdsm/nbd/x.sock"),
            NBDAddress("unix", path="/run/vdsm/nbd/x.sock", exportName=""),
        )

    def test_unixExportName(self) -> None:
        """
        C{:exportname=} after the socket path names the export.
        """
        self.assertEqual(
            parseURL("nbd:unix:/tmp/nbd.sock:exportname=sda"),
            NBDAddress("unix", path="/tmp/nbd.sock", exportName="sda"),
        )

    def test_tcp(self) -> None:
        """
        C{nbd:host:port[:exportname=name]} names a TCP server.
        """
        self.assertEqual(
            parseURL("nbd:localhost:10809"), NBDAddress("tcp", host="localhost", port=10809)
        )
        self.assertEqual(
            parseURL("nbd:[::1]:10810:exportname=a:b"),
            NBDAddress("tcp", host="::1", port=10810, exportName="a:b"),
        )

    def test_uriForm(self) -> None:
        """
        In C{nbd://host:port/name} the first slash is not part of the name;
        the port defaults to 10809.
        """
        self.assertEqual(
            parseURL("nbd://example.com:10811/sda"),
            NBDAddress("tcp", host="example.com", port=10811, exportName="sda"),
        )
        self.assertEqual(
            parseURL("nbd://example.com//abs"),
            NBDAddress("tcp", host="example.com", port=10809, exportName="/abs"),
        )
        self.assertEqual(
            parseURL("nbd://[::1]:10809/"),
            NBDAddress("tcp", host="::1", port=10809, exportName=""),
        )

    def test_badURLs(self) -> None:
        """
        Malformed URLs raise L{ValueError} naming the URL.
        """
        for url in [
            "nbd:unix:",
            "nbd:unix:relative.sock",
            "nbd:localhost",
            "nbd:localhost:99999",
            "nbd://host:port/x",
            "nbd://host:1/x?y",
            "file:///tmp/x",
        ]:
            with self.subTest(url=url):
                e = self.assertRaises(ValueError, parseURL, url)
                self.assertIn(repr(url), str(e))

    def test_openBadURLFails(self) -> None:
        """
        Opening a bad URL fails the returned Deferred with L{ValueError}.
        """
        ctx = BackendContext(reactor=None, diskio=SynchronousDiskIO())
        d = openBackend(ctx, "nbd:nowhere", write=False, sparse=False, dirty=False)
        self.failureResultOf(d, ValueError)

    def test_openerDispatch(self) -> None:
        """
        L{BackendOpener} routes C{nbd:} URLs to this module.
        """
        ctx = BackendContext(reactor=None, diskio=SynchronousDiskIO())
        d = BackendOpener(ctx).open("nbd:unix:", write=False, sparse=False, dirty=False)
        self.assertIn("nbd:unix:", str(self.failureResultOf(d, ValueError).value))

    def test_endpoints(self) -> None:
        """
        UNIX addresses connect with a UNIX endpoint, TCP ones with a
        hostname endpoint.
        """
        unix = NBDAddress("unix", path="/tmp/s").endpoint(reactor)
        tcp = NBDAddress("tcp", host="localhost", port=1).endpoint(reactor)
        self.assertIsInstance(unix, UNIXClientEndpoint)
        self.assertIsInstance(tcp, HostnameEndpoint)


class FakeProtocol:
    """
    Records requests; answers them from C{results} or succeeds at once.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.results: list[Deferred[Any]] = []
        self.status: list[dict[str, list[tuple[int, int]]]] = []
        self.disconnects = 0

    def _answer(self, value: Any = None) -> Deferred[Any]:
        return self.results.pop(0) if self.results else succeed(value)

    def read(self, offset: int, buf: memoryview) -> Deferred[None]:
        self.calls.append(("read", offset, len(buf)))
        buf[:] = b"r" * len(buf)
        return self._answer()

    def write(self, offset: int, data: memoryview) -> Deferred[None]:
        self.calls.append(("write", offset, bytes(data)))
        return self._answer()

    def writeZeroes(self, offset: int, length: int, *, noHole: bool) -> Deferred[None]:
        self.calls.append(("zero", offset, length, noHole))
        return self._answer()

    def flush(self) -> Deferred[None]:
        self.calls.append(("flush",))
        return self._answer()

    def blockStatus(self, offset: int, length: int) -> Deferred[Any]:
        self.calls.append(("status", offset, length))
        return succeed(self.status.pop(0))

    def disconnect(self) -> Deferred[None]:
        self.disconnects += 1
        return succeed(None)


FULL = nbd.FLAG_HAS_FLAGS | nbd.FLAG_SEND_FLUSH | nbd.FLAG_SEND_WRITE_ZEROES
ALLOCATION = {nbd.BASE_ALLOCATION: 0, nbd.QEMU_ALLOCATION_DEPTH: 1}


def fakeBackend(
    size: int = 10 * MiB,
    flags: int = FULL,
    contexts: dict[str, int] | None = None,
    **kwargs: Any,
) -> tuple[NBDBackend, FakeProtocol]:
    proto = FakeProtocol()
    info = ExportInfo(
        name="",
        size=size,
        flags=flags,
        structuredReplies=True,
        metaContexts=ALLOCATION if contexts is None else contexts,
        dirtyBitmap=next((c for c in contexts or {} if c.startswith("qemu:dirty")), None),
    )
    kwargs.setdefault("writable", True)
    backend = NBDBackend(
        proto,  # type: ignore[arg-type]
        info,
        address=NBDAddress("unix", path="/fake"),
        **kwargs,
    )
    return backend, proto


class BackendTests(SynchronousTestCase):
    def test_provides(self) -> None:
        """
        The backend provides L{IBackend} with upstream's limits.
        """
        backend, _ = fakeBackend(maxConnections=4)
        self.assertTrue(IBackend.providedBy(backend))
        self.assertEqual(
            (backend.name, backend.blockSize, backend.maxReaders, backend.maxWriters),
            ("nbd", 1, 4, 4),
        )
        self.assertEqual(self.successResultOf(backend.size()), 10 * MiB)

    def test_readSplitsAndClips(self) -> None:
        """
        Reads are split into requests of at most the buffer size and
        clipped at the end of the export.
        """
        backend, proto = fakeBackend(size=MiB + 100, bufferSize=256 * 1024)
        buf = bytearray(2 * MiB)
        n = self.successResultOf(backend.readInto(MiB - 300 * 1024, memoryview(buf)))
        self.assertEqual(n, 300 * 1024 + 100)
        self.assertEqual(
            proto.calls,
            [
                ("read", MiB - 300 * 1024, 256 * 1024),
                ("read", MiB - 44 * 1024, 44 * 1024 + 100),
            ],
        )
        self.assertEqual(self.successResultOf(backend.readInto(MiB + 100, memoryview(buf))), 0)

    def test_splitReadWaitsForAllPieces(self) -> None:
        """
        A split read whose first piece fails reports the failure only once
        every piece is done, so nothing lands in the buffer afterwards.
        """
        backend, proto = fakeBackend(bufferSize=MiB)
        first: Deferred[None] = Deferred()
        second: Deferred[None] = Deferred()
        proto.results = [first, second]
        d = backend.readInto(0, memoryview(bytearray(2 * MiB)))
        first.errback(OSError(errno.EIO, "bad sector"))
        self.assertNoResult(d)
        second.callback(None)
        self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.EIO)

    def test_writeSplits(self) -> None:
        """
        Writes are split into requests of at most the buffer size.
        """
        backend, proto = fakeBackend(bufferSize=4)
        self.assertEqual(self.successResultOf(backend.write(10, memoryview(b"abcdefghij"))), 10)
        self.assertEqual(
            proto.calls, [("write", 10, b"abcd"), ("write", 14, b"efgh"), ("write", 18, b"ij")]
        )

    def test_zeroSteps(self) -> None:
        """
        Zeroing goes in steps of at most 128 MiB and keeps the range
        allocated unless the backend is sparse.
        """
        backend, proto = fakeBackend(size=1024**3)
        self.successResultOf(backend.zero(0, MAX_ZERO + MiB))
        self.assertEqual(proto.calls, [("zero", 0, MAX_ZERO, True), ("zero", MAX_ZERO, MiB, True)])
        sparse, proto = fakeBackend(sparse=True)
        self.successResultOf(sparse.zero(5, 10))
        self.assertEqual(proto.calls, [("zero", 5, 10, False)])

    def test_zeroWithoutWriteZeroesWrites(self) -> None:
        """
        A server without NBD_CMD_WRITE_ZEROES gets zeroes written.
        """
        backend, proto = fakeBackend(flags=nbd.FLAG_HAS_FLAGS, bufferSize=4)
        self.successResultOf(backend.zero(1, 6))
        self.assertEqual(proto.calls, [("write", 1, b"\0" * 4), ("write", 5, b"\0" * 2)])

    def test_writeRefused(self) -> None:
        """
        Writing and zeroing fail with an OSError when the backend was opened
        read-only or the export is read-only.
        """
        readOnly, proto = fakeBackend(writable=False)
        self.assertEqual(
            self.failureResultOf(readOnly.write(0, memoryview(b"x")), OSError).value.errno,
            errno.EBADF,
        )
        export, _ = fakeBackend(flags=FULL | nbd.FLAG_READ_ONLY)
        self.assertEqual(self.failureResultOf(export.zero(0, 1), OSError).value.errno, errno.EROFS)
        self.assertEqual(proto.calls, [])

    def test_flushWithoutServerSupport(self) -> None:
        """
        Flushing succeeds without a request when the server has nothing to
        flush.
        """
        backend, proto = fakeBackend(flags=nbd.FLAG_HAS_FLAGS)
        self.successResultOf(backend.flush())
        self.assertEqual(proto.calls, [])

    def test_extentsWithoutBaseAllocation(self) -> None:
        """
        Without C{base:allocation} the window is one data extent.
        """
        backend, proto = fakeBackend(size=100, contexts={})
        self.assertEqual(
            self.successResultOf(backend.extents("zero", 10, 1000)),
            [Extent(10, 90, zero=False, hole=False)],
        )
        self.assertEqual(proto.calls, [])

    def test_extentsMergeAndContinue(self) -> None:
        """
        Zero extents combine allocation and depth, merge neighbours that
        look alike, continue after a short reply and stop at the window's
        end.
        """
        backend, proto = fakeBackend(size=100)
        proto.status = [
            {
                nbd.BASE_ALLOCATION: [(10, 0), (10, 0), (20, 3)],
                nbd.QEMU_ALLOCATION_DEPTH: [(30, 1), (10, 0)],
            },
            {
                nbd.BASE_ALLOCATION: [(60, 3)],
                nbd.QEMU_ALLOCATION_DEPTH: [(40, 0), (40, 2)],
            },
        ]
        extents = self.successResultOf(backend.extents("zero", 0, 90))
        self.assertEqual(
            extents,
            [
                Extent(0, 20, zero=False, hole=False),
                Extent(20, 10, zero=True, hole=False),
                Extent(30, 50, zero=True, hole=True),
                Extent(80, 10, zero=True, hole=False),
            ],
        )
        self.assertEqual(proto.calls, [("status", 0, 90), ("status", 40, 50)])

    def test_extentsBoundedPerCall(self) -> None:
        """
        One call gathers at most about L{nbdbackend.MAX_EXTENTS} extents (it stops
        after the block status reply that reaches them); the caller asks
        again from the end of the last one.
        """
        self.patch(nbdbackend, "MAX_EXTENTS", 4)
        backend, proto = fakeBackend(size=100)
        alternating = [(5, 0), (5, 3)] * 3
        proto.status = [
            {nbd.BASE_ALLOCATION: alternating, nbd.QEMU_ALLOCATION_DEPTH: [(30, 1)]}
        ] * 3
        extents = self.successResultOf(backend.extents("zero", 0, 100))
        self.assertEqual(len(extents), 6)
        self.assertEqual(extents[-1], Extent(25, 5, zero=True, hole=False))
        self.assertEqual(proto.calls, [("status", 0, 100)])

    def test_dirtyExtents(self) -> None:
        """
        Dirty extents come from the bitmap context, with C{zero} from
        C{base:allocation}.
        """
        bitmap = "qemu:dirty-bitmap:b"
        backend, proto = fakeBackend(
            size=30, contexts={nbd.BASE_ALLOCATION: 0, bitmap: 2}, dirty=True
        )
        proto.status = [{nbd.BASE_ALLOCATION: [(20, 0), (10, 3)], bitmap: [(10, 1), (20, 0)]}]
        self.assertEqual(
            self.successResultOf(backend.extents("dirty", 0, 30)),
            [
                Extent(0, 10, zero=False, dirty=True),
                Extent(10, 10, zero=False, dirty=False),
                Extent(20, 10, zero=True, dirty=False),
            ],
        )

    def test_dirtyUnsupported(self) -> None:
        """
        Dirty extents are unsupported when the ticket is not dirty or the
        export has no bitmap, with upstream's message.
        """
        notDirty, _ = fakeBackend(contexts={"qemu:dirty-bitmap:b": 2, **ALLOCATION})
        noBitmap, _ = fakeBackend(dirty=True)
        for backend in (notDirty, noBitmap):
            failure = self.failureResultOf(backend.extents("dirty", 0, 1), UnsupportedOperation)
            self.assertEqual(str(failure.value), "NBD export '' does not support dirty extents")
        failure = self.failureResultOf(notDirty.extents("bogus", 0, 1), UnsupportedOperation)
        self.assertEqual(str(failure.value), "Backend nbd does not support bogus extents")

    def test_closeIsIdempotent(self) -> None:
        """
        Closing twice succeeds; operations after close fail.
        """
        backend, proto = fakeBackend()
        self.successResultOf(backend.close())
        self.successResultOf(backend.close())
        self.assertEqual(proto.disconnects, 2)
        self.failureResultOf(backend.readInto(0, memoryview(bytearray(1))), OSError)
        self.failureResultOf(backend.flush(), OSError)


# Integration with qemu-nbd.


QEMU_NBD = shutil.which("qemu-nbd")
QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
SKIP = None if QEMU_NBD and QEMU_IMG and QEMU_IO else "qemu-utils (qemu-nbd, qemu-img, qemu-io)"


class _QemuNBD(ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()
        self.stderr = b""

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)


class QemuNBDTests(TestCase):
    """
    The backend against a real C{qemu-nbd} on a UNIX socket.
    """

    if SKIP:
        skip = f"{SKIP} not installed"

    timeout = 30

    def setUp(self) -> None:
        # UNIX socket paths must stay short; trial's temp dir may be deep.
        self.dir = tempfile.mkdtemp(prefix="imageio-nbd-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.ctx = BackendContext(reactor=reactor, diskio=SynchronousDiskIO())

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    async def execute(self, *argv: str) -> None:
        out, err, code = await getProcessOutputAndValue(argv[0], argv[1:], env=os.environ)
        if code != 0:
            self.fail(f"{argv} failed ({code}): {err.decode()}")

    async def image(self, name: str, fmt: str = "raw", *writes: str, backing: str = "") -> str:
        """
        Create a 4 MiB image and write to it with qemu-io commands.
        """
        path = self.path(name)
        extra = ["-b", backing, "-F", "qcow2"] if backing else []
        await self.execute(QEMU_IMG or "", "create", "-q", "-f", fmt, *extra, path, "4M")
        if writes:
            argv = [QEMU_IO or "", "-f", fmt]
            for command in writes:
                argv += ["-c", command]
            await self.execute(*argv, path)
        return path

    async def serve(self, image: str, fmt: str, *options: str) -> tuple[str, Any]:
        """
        Serve C{image} like vdsm does, on a UNIX socket.

        @return: The ticket URL and the process transport.
        """
        socket = image + ".sock"
        protocol = _QemuNBD()
        argv = [
            QEMU_NBD or "",
            "--socket",
            socket,
            "--persistent",
            "--shared=8",
            "--export-name=",
            "--format",
            fmt,
            *options,
            image,
        ]
        process = reactor.spawnProcess(protocol, argv[0], argv, env=os.environ)

        async def stop() -> None:
            if process.pid is not None:
                process.signalProcess("KILL")
            await protocol.ended

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        for _ in range(500):
            # The socket file appears at bind(), before listen(): connecting
            # in between is refused, so wait until a connection is taken.
            if acceptingUNIX(socket):
                return f"nbd:unix:{socket}", process
            if protocol.ended.called:
                break
            await deferLater(reactor, 0.01, lambda: None)
        self.fail(f"qemu-nbd did not start: {protocol.stderr.decode()}")

    async def open(
        self,
        url: str,
        *,
        write: bool = True,
        sparse: bool = False,
        dirty: bool = False,
        ctx: BackendContext | None = None,
    ) -> NBDBackend:
        backend = await openBackend(ctx or self.ctx, url, write=write, sparse=sparse, dirty=dirty)
        self.addCleanup(backend.close)
        assert isinstance(backend, NBDBackend)
        return backend

    async def test_readWriteFlush(self) -> None:
        """
        Data written and flushed reads back, over NBD and in the file.
        """
        image = await self.image("disk.raw")
        url, _ = await self.serve(image, "raw")
        backend = await self.open(url)
        self.assertEqual(await backend.size(), 4 * MiB)
        data = os.urandom(MiB)
        self.assertEqual(await backend.write(MiB, memoryview(data)), MiB)
        await backend.flush()
        buf = bytearray(MiB)
        self.assertEqual(await backend.readInto(MiB, memoryview(buf)), MiB)
        self.assertEqual(buf, data)
        with open(image, "rb") as f:
            f.seek(MiB)
            self.assertEqual(f.read(MiB), data)

    async def test_unalignedReadWrite(self) -> None:
        """
        Reads and writes at odd offsets and lengths touch exactly those
        bytes.
        """
        image = await self.image("disk.raw", "raw", "write -P 0x61 0 8k")
        url, _ = await self.serve(image, "raw")
        backend = await self.open(url)
        await backend.write(4095, memoryview(b"XYZ"))
        buf = bytearray(7)
        self.assertEqual(await backend.readInto(4093, memoryview(buf)), 7)
        self.assertEqual(buf, b"aaXYZaa")

    async def test_readSplitAndShortAtEnd(self) -> None:
        """
        A read larger than the buffer size is split and pipelined, and a
        read past the end returns the bytes that exist.
        """
        image = await self.image("disk.raw", "raw", "write -P 0x62 3M 1M")
        url, _ = await self.serve(image, "raw")
        ctx = BackendContext(reactor=reactor, diskio=SynchronousDiskIO(), bufferSize=64 * 1024)
        backend = await self.open(url, ctx=ctx)
        buf = bytearray(2 * MiB)
        self.assertEqual(await backend.readInto(3 * MiB - 10, memoryview(buf)), MiB + 10)
        self.assertEqual(buf[: MiB + 10], bytes(10) + b"b" * MiB)
        self.assertEqual(await backend.readInto(4 * MiB, memoryview(buf)), 0)

    async def test_zeroSparseAndAllocated(self) -> None:
        """
        Zeroing makes the range read as zeroes; sparse zeroing leaves a
        hole, non-sparse zeroing keeps it allocated.
        """
        image = await self.image("disk.raw", "raw", "write -P 0x63 0 4M")
        url, _ = await self.serve(image, "raw")
        allocated = await self.open(url)
        sparse = await self.open(url, sparse=True)
        await allocated.zero(0, MiB)
        await sparse.zero(2 * MiB, MiB)
        await allocated.flush()
        buf = bytearray(4 * MiB)
        await allocated.readInto(0, memoryview(buf))
        self.assertEqual(buf, bytes(MiB) + b"c" * MiB + bytes(MiB) + b"c" * MiB)
        # Only the sparse zero gave space back.
        self.assertEqual(os.stat(image).st_blocks * 512, 3 * MiB)

    async def test_extentsQcow2WithBacking(self) -> None:
        """
        With C{qemu:allocation-depth}, ranges allocated nowhere in the chain
        are holes, and ranges in either layer are not.
        """
        base = await self.image("base.qcow2", "qcow2", "write -P 0x41 0 1M")
        top = await self.image("top.qcow2", "qcow2", "write -P 0x42 2M 1M", backing=base)
        url, _ = await self.serve(top, "qcow2", "--allocation-depth")
        backend = await self.open(url, write=False)
        self.assertIn(nbd.QEMU_ALLOCATION_DEPTH, backend.info.metaContexts)
        self.assertEqual(
            await backend.extents("zero", 0, 4 * MiB),
            [
                Extent(0, MiB, zero=False, hole=False),
                Extent(MiB, MiB, zero=True, hole=True),
                Extent(2 * MiB, MiB, zero=False, hole=False),
                Extent(3 * MiB, MiB, zero=True, hole=True),
            ],
        )
        self.assertEqual(
            await backend.extents("zero", MiB // 2, MiB),
            [
                Extent(MiB // 2, MiB // 2, zero=False, hole=False),
                Extent(MiB, MiB // 2, zero=True, hole=True),
            ],
        )
        buf = bytearray(4)
        await backend.readInto(MiB - 2, memoryview(buf))
        self.assertEqual(buf, b"AA\0\0")

    async def test_dirtyExtents(self) -> None:
        """
        With a dirty bitmap exported, dirty extents show what changed since
        the bitmap was added.
        """
        image = await self.image("disk.qcow2", "qcow2", "write -P 0x43 0 64k")
        await self.execute(QEMU_IMG or "", "bitmap", "--add", image, "b1")
        await self.execute(QEMU_IO or "", "-f", "qcow2", "-c", "write -P 0x44 1M 64k", image)
        url, _ = await self.serve(image, "qcow2", "-B", "b1")
        backend = await self.open(url, write=False, dirty=True)
        self.assertEqual(backend.info.dirtyBitmap, "qemu:dirty-bitmap:b1")
        self.assertEqual(
            await backend.extents("dirty", 0, 4 * MiB),
            [
                Extent(0, 64 * 1024, zero=False, dirty=False),
                Extent(64 * 1024, MiB - 64 * 1024, zero=True, dirty=False),
                Extent(MiB, 64 * 1024, zero=False, dirty=True),
                Extent(MiB + 64 * 1024, 3 * MiB - 64 * 1024, zero=True, dirty=False),
            ],
        )
        notDirty = await self.open(url, write=False)
        with self.assertRaises(UnsupportedOperation):
            await notDirty.extents("dirty", 0, MiB)

    async def test_dirtyWithoutBitmap(self) -> None:
        """
        A dirty ticket on an export without a bitmap opens, but dirty
        extents are unsupported.
        """
        image = await self.image("disk.raw")
        url, _ = await self.serve(image, "raw")
        backend = await self.open(url, dirty=True)
        with self.assertRaises(UnsupportedOperation):
            await backend.extents("dirty", 0, MiB)

    async def test_readOnlyExport(self) -> None:
        """
        A read-only export serves reads and refuses writes with an OSError.
        """
        image = await self.image("disk.raw")
        url, _ = await self.serve(image, "raw", "--read-only")
        backend = await self.open(url)
        self.assertTrue(backend.info.readOnly)
        with self.assertRaises(OSError) as e:
            await backend.write(0, memoryview(b"x"))
        self.assertEqual(e.exception.errno, errno.EROFS)
        self.assertEqual(await backend.readInto(0, memoryview(bytearray(10))), 10)

    async def test_serverErrorIsOSError(self) -> None:
        """
        A request the server refuses fails with an OSError and the
        connection stays usable.
        """
        image = await self.image("disk.raw")
        url, _ = await self.serve(image, "raw")
        backend = await self.open(url)
        with self.assertRaises(OSError) as e:
            await backend.write(4 * MiB - 1, memoryview(b"xy"))
        self.assertIn(e.exception.errno, (errno.ENOSPC, errno.EINVAL))
        await backend.write(4 * MiB - 1, memoryview(b"z"))

    async def test_serverKilledFailsPending(self) -> None:
        """
        When qemu-nbd dies mid-request the pending operation fails, and
        later operations fail at once.
        """
        image = await self.image("disk.raw")
        url, process = await self.serve(image, "raw")
        backend = await self.open(url)
        process.signalProcess("STOP")
        d = backend.readInto(0, memoryview(bytearray(MiB)))
        await deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(d.called)
        os.kill(process.pid, signal.SIGKILL)
        with self.assertRaises(ConnectionError):
            await d
        with self.assertRaises(ConnectionError):
            await backend.flush()

    async def test_missingSocket(self) -> None:
        """
        Opening a socket nobody listens on fails with a connection error.
        """
        with self.assertRaises(ConnectionError) as e:
            await openBackend(
                self.ctx,
                f"nbd:unix:{self.path('none.sock')}",
                write=False,
                sparse=False,
                dirty=False,
            )
        self.assertIn("none.sock", str(e.exception))

    async def test_unknownExport(self) -> None:
        """
        Asking for an export the server does not have fails with its
        message.
        """
        image = await self.image("disk.raw")
        url, _ = await self.serve(image, "raw")
        with self.assertRaises(OptionError):
            await openBackend(
                self.ctx, url + ":exportname=nope", write=False, sparse=False, dirty=False
            )

    async def test_close(self) -> None:
        """
        Closing disconnects; closing again is harmless.
        """
        image = await self.image("disk.raw")
        url, _ = await self.serve(image, "raw")
        backend = await self.open(url)
        await backend.close()
        await backend.close()
        with self.assertRaises(OSError):
            await backend.readInto(0, memoryview(bytearray(1)))
