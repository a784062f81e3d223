# -*- test-case-name: tests.test_backend_file -*-
"""
Tests for L{imageio.backends.file}: regular files (direct, buffered, on
tmpfs), block devices on loop devices, a full small file system, and a real
disk-io thread pool.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from imageio import _buffers
from imageio._aio import IOCB_CMD_PREAD, TMPFS_MAGIC, AIOEngine
from imageio._diskio import DiskIO, SynchronousDiskIO, createPool
from imageio.backends import BackendContext
from imageio.backends import file as filebackend
from imageio.backends.file import (
    BackendClosed,
    FileBackend,
    fileSystemType,
    openBackend,
    parseURL,
)
from imageio.interfaces import Extent, IBackend, UnsupportedOperation
from tests.test_aio import startedEngine

KiB = 1024
MiB = 1024**2

if TYPE_CHECKING:
    _Mixin = SynchronousTestCase
else:
    _Mixin = object


def openSync(
    case: SynchronousTestCase,
    path: str,
    *,
    write: bool = True,
    sparse: bool = False,
    direct: bool = True,
    diskio: Any = None,
    maxConnections: int = 8,
    aio: AIOEngine | None = None,
) -> FileBackend:
    """
    Open C{path} with a synchronous disk-io (and C{aio}, if given) and close
    it in cleanup.
    """
    ctx = BackendContext(
        reactor=None, diskio=diskio or SynchronousDiskIO(), maxConnections=maxConnections, aio=aio
    )
    d = openBackend(ctx, "file://" + path, write=write, sparse=sparse, dirty=False, direct=direct)
    backend = case.successResultOf(d)
    assert isinstance(backend, FileBackend)
    case.addCleanup(backend.close)
    return backend


class InlineAIO(AIOEngine):
    """
    The real AIO engine, waiting in the kernel for each request it submits,
    so that synchronous tests see results at once.

    @ivar requests: Requests given to the kernel, counting resubmits.
    """

    def __init__(self) -> None:
        super().__init__(MemoryReactorClock(), maxEvents=8)
        self.requests = 0

    def submit(self, *args: Any) -> bool:
        taken = super().submit(*args)
        if taken:
            self.requests += 1
        while self._queue or self._busy:
            if self._busy:
                self._reap(block=True)
            else:
                self._submit()
        return taken


def submitting(outcome: Deferred[Any]) -> Callable[..., bool]:
    """
    An AIO engine's C{submit} that takes the request and gives it
    C{outcome}'s result when that fires.
    """

    def submit(*args: Any) -> bool:
        outcome.addBoth(args[-1])
        return True

    return submit


def refusing(error: OSError) -> Callable[..., bool]:
    """
    An AIO engine's C{submit} that takes every request and fails it at once
    with C{error}.
    """

    def submit(*args: Any) -> bool:
        args[-1](Failure(error))
        return True

    return submit


def inlineAIO(case: SynchronousTestCase) -> InlineAIO:
    """
    A started L{InlineAIO}, stopped in cleanup; skips where the kernel
    forbids AIO.
    """
    return startedEngine(case, InlineAIO())


def readBack(
    case: SynchronousTestCase, backend: IBackend, offset: int, length: int, misalign: int = 0
) -> bytes:
    """
    Read through the backend into an aligned buffer, or one C{misalign}
    bytes past an aligned address.
    """
    view = memoryview(_buffers.allocate(length + misalign))[misalign : misalign + length]
    n = case.successResultOf(backend.readInto(offset, view))
    return bytes(view[:n])


def dataView(rng: random.Random, length: int) -> memoryview:
    """
    Random bytes as a plain memoryview of bytes, an aligned buffer, or a
    misaligned slice of one.
    """
    raw = rng.randbytes(length)
    style = rng.randrange(3)
    if style == 0:
        return memoryview(raw)
    view = memoryview(_buffers.allocate(length + 1))[style - 1 : style - 1 + length]
    view[:] = raw
    return view


def filledView(length: int, fill: bytes = b"x") -> memoryview:
    """
    C{length} bytes of C{fill} in an aligned buffer of exactly that length.
    """
    view = memoryview(_buffers.allocate(length))[:length]
    view[:] = fill * length
    return view


def writeFile(path: str, data: bytes = b"", size: int | None = None) -> str:
    with open(path, "wb") as f:
        f.write(data)
        if size is not None:
            f.truncate(size)
    return os.path.abspath(path)


def applyModel(model: bytearray, offset: int, data: bytes) -> None:
    """
    What a write does to an image: grow it if needed, then overwrite.
    """
    end = offset + len(data)
    if end > len(model):
        model.extend(bytes(end - len(model)))
    model[offset:end] = data


def checkRandomOperations(
    case: SynchronousTestCase,
    backend: FileBackend,
    model: bytearray,
    seed: int,
    *,
    count: int = 150,
    grow: bool = True,
) -> None:
    """
    Apply random writes, zeroes and reads around block boundaries, checking
    every read, the size and the extents against C{model}.
    """
    rng = random.Random(seed)
    span = 4 * 4096
    lengths = [1, 2, 511, 512, 513, 4095, 4096, 4097, 8193]
    for _ in range(count):
        offset = max(
            0,
            rng.choice(
                [rng.randrange(span), rng.randrange(0, span, 512) + rng.choice([-1, 0, 1, 511])]
            ),
        )
        length = rng.choice([*lengths, rng.randrange(1, 3 * 4096)])
        if not grow:
            length = min(length, len(model) - offset)
            if length <= 0:
                continue
        op = rng.choice(["write", "zero", "read"])
        if op == "write":
            data = dataView(rng, length)
            case.assertEqual(case.successResultOf(backend.write(offset, data)), length)
            applyModel(model, offset, bytes(data))
        elif op == "zero":
            case.assertIsNone(case.successResultOf(backend.zero(offset, length)))
            applyModel(model, offset, bytes(length))
        else:
            misalign = rng.choice([0, 1, offset % 4096])
            case.assertEqual(
                readBack(case, backend, offset, length, misalign), model[offset : offset + length]
            )
        case.assertEqual(case.successResultOf(backend.size()), len(model), (op, offset, length))
    case.assertEqual(readBack(case, backend, 0, len(model)), model)
    checkExtentsCover(case, backend, bytes(model))


def checkExtentsCover(case: SynchronousTestCase, backend: FileBackend, model: bytes) -> None:
    """
    The extents tile the image in order, and zero extents really are zero.
    """
    extents = case.successResultOf(backend.extents("zero", 0, len(model) + 1))
    pos = 0
    for e in extents:
        case.assertEqual(e.start, pos)
        case.assertGreater(e.length, 0)
        if e.zero:
            case.assertEqual(model[e.start : e.start + e.length], bytes(e.length))
        pos += e.length
    case.assertEqual(pos, len(model))


class ParseURLTests(SynchronousTestCase):
    """
    Tests for L{parseURL} and URL checks in L{openBackend}.
    """

    def test_absolutePath(self) -> None:
        """
        A C{file:} URL with an absolute path and no host names that path.
        """
        self.assertEqual(parseURL("file:///var/lib/image.raw"), "/var/lib/image.raw")
        self.assertEqual(parseURL("file:/var/lib/image.raw"), "/var/lib/image.raw")

    def test_localhost(self) -> None:
        """
        The host C{localhost} is the same as no host.
        """
        self.assertEqual(parseURL("file://localhost/dev/sda"), "/dev/sda")

    def test_notDecoded(self) -> None:
        """
        The path is used as written, like upstream.
        """
        self.assertEqual(parseURL("file:///a%20b"), "/a%20b")

    def test_rejected(self) -> None:
        """
        Other schemes, hosts, relative paths, queries, fragments and control
        characters are rejected with a message naming the URL.
        """
        for url in [
            "nbd:unix:/sock",
            "file://host/path",
            "file://localhost:80/path",
            "file:relative/path",
            "file://",
            "file:///path?x=1",
            "file:///path#frag",
            "file:///pa\nth",
            "file:///pa\0th",
        ]:
            with self.assertRaises(ValueError) as e:
                parseURL(url)
            self.assertIn(repr(url), str(e.exception))

    def test_openBackendFailsDeferred(self) -> None:
        """
        L{openBackend} reports a bad URL through the Deferred, without
        touching the disk-io pool.
        """
        diskio = SynchronousDiskIO()
        ctx = BackendContext(reactor=None, diskio=diskio)
        d = openBackend(ctx, "file://host/x", write=False, sparse=False, dirty=False)
        self.assertIn("must not name a host", str(self.failureResultOf(d, ValueError).value))
        self.assertEqual(diskio.calls, 0)


class OpenTests(SynchronousTestCase):
    """
    Tests for opening files.
    """

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.mkdir(self.dir)

    def test_missingFileNotCreated(self) -> None:
        """
        Opening a missing file fails with ENOENT and does not create it.
        """
        path = os.path.join(self.dir, "missing")
        ctx = BackendContext(reactor=None, diskio=SynchronousDiskIO())
        d = openBackend(ctx, "file://" + path, write=True, sparse=False, dirty=False)
        self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.ENOENT)
        self.assertFalse(os.path.exists(path))

    def test_directoryRejected(self) -> None:
        """
        A directory is neither a regular file nor a block device.
        """
        ctx = BackendContext(reactor=None, diskio=SynchronousDiskIO())
        d = openBackend(ctx, "file://" + self.dir, write=False, sparse=False, dirty=False)
        self.assertIn("Not a regular file", str(self.failureResultOf(d, ValueError).value))

    def test_fifoRejected(self) -> None:
        """
        A FIFO is rejected at once instead of blocking the open.
        """
        path = os.path.join(self.dir, "fifo")
        os.mkfifo(path)
        ctx = BackendContext(reactor=None, diskio=SynchronousDiskIO())
        d = openBackend(ctx, "file://" + path, write=False, sparse=False, dirty=False)
        self.assertIn("Not a regular file", str(self.failureResultOf(d, ValueError).value))

    def test_pseudoFileSystemsRejected(self) -> None:
        """
        Files of procfs and sysfs (the daemon's memory, its environment,
        kernel state) are not images, even though they look like regular
        files, and even through a symbolic link.
        """
        link = os.path.join(self.dir, "innocent.raw")
        os.symlink("/proc/self/environ", link)
        ctx = BackendContext(reactor=None, diskio=SynchronousDiskIO())
        for path, kind in (
            ("/proc/self/mem", "proc"),
            ("/proc/self/environ", "proc"),
            (link, "proc"),
            ("/sys/kernel/mm/transparent_hugepage/enabled", "sysfs"),
        ):
            if not os.path.exists(path):
                continue
            d = openBackend(ctx, "file://" + path, write=False, sparse=False, dirty=False)
            error = self.failureResultOf(d, ValueError).value
            self.assertIn(f"is on a {kind} file system", str(error))

    def test_characterDevicesRejected(self) -> None:
        """
        Character devices (C{/dev/zero}, C{/dev/null}) are not images.
        """
        ctx = BackendContext(reactor=None, diskio=SynchronousDiskIO())
        for path in ("/dev/zero", "/dev/null"):
            d = openBackend(ctx, "file://" + path, write=False, sparse=False, dirty=False)
            self.assertIn("Not a regular file", str(self.failureResultOf(d, ValueError).value))

    def test_fileSystemType(self) -> None:
        """
        The file system type of an open file is read with C{fstatfs}.
        """
        fd = os.open("/proc/self/stat", os.O_RDONLY)
        self.addCleanup(os.close, fd)
        self.assertEqual(fileSystemType(fd), 0x9FA0)
        self.assertRaises(OSError, fileSystemType, -1)

    def test_blockingFlagsCleared(self) -> None:
        """
        The fd of an open backend does blocking I/O.
        """
        path = writeFile(os.path.join(self.dir, "img"), b"x" * 4096)
        backend = openSync(self, path)
        self.assertFalse(fcntl.fcntl(backend._fd, fcntl.F_GETFL) & os.O_NONBLOCK)

    def test_regularFile(self) -> None:
        """
        A regular file is backend C{file} with one writer and
        C{maxConnections} readers.
        """
        path = writeFile(os.path.join(self.dir, "img"), b"x" * 4096)
        backend = openSync(self, path, maxConnections=5)
        self.assertEqual((backend.name, backend.maxReaders, backend.maxWriters), ("file", 5, 1))
        self.assertIn(backend.blockSize, (512, 4096))

    def test_emptyFileBlockSize(self) -> None:
        """
        On an empty file any direct read works, so the block size cannot be
        told and the safe 4096 is used.
        """
        path = writeFile(os.path.join(self.dir, "img"))
        backend = openSync(self, path)
        if not backend.direct:
            raise SkipTest("No O_DIRECT on the trial temp directory")
        self.assertEqual(backend.blockSize, 4096)

    def test_bufferedBlockSize(self) -> None:
        """
        Buffered I/O needs no alignment.
        """
        path = writeFile(os.path.join(self.dir, "img"), b"x" * 4096)
        backend = openSync(self, path, direct=False)
        self.assertEqual((backend.direct, backend.blockSize), (False, 1))
        self.assertFalse(fcntl.fcntl(backend._fd, fcntl.F_GETFL) & os.O_DIRECT)

    def test_directRefusedFallsBack(self) -> None:
        """
        If the file system refuses O_DIRECT, the file is opened buffered and
        still works.
        """
        realOpen = os.open

        def refuseDirect(path: str, flags: int, *args: Any) -> int:
            if flags & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return realOpen(path, flags, *args)

        path = writeFile(os.path.join(self.dir, "img"), b"abc" * 1000)
        self.patch(os, "open", refuseDirect)
        backend = openSync(self, path)
        self.assertEqual((backend.direct, backend.blockSize), (False, 1))
        self.assertEqual(self.successResultOf(backend.write(1, memoryview(b"XY"))), 2)
        self.assertEqual(readBack(self, backend, 0, 4), b"aXYa")

    def test_undetectableBlockSizeFallsBack(self) -> None:
        """
        If no direct read size works, O_DIRECT is turned off on the open fd.
        """
        self.patch(filebackend, "_detectBlockSize", lambda fd: None)
        path = writeFile(os.path.join(self.dir, "img"), b"abc" * 1000)
        backend = openSync(self, path)
        self.assertFalse(backend.direct)
        self.assertFalse(fcntl.fcntl(backend._fd, fcntl.F_GETFL) & os.O_DIRECT)
        self.assertEqual(readBack(self, backend, 1, 3), b"bca")

    def test_readOnly(self) -> None:
        """
        A backend opened without C{write} reads, but refuses writes and
        zeroes.
        """
        path = writeFile(os.path.join(self.dir, "img"), b"abc")
        backend = openSync(self, path, write=False)
        self.assertEqual(readBack(self, backend, 0, 3), b"abc")
        for d in [backend.write(0, memoryview(b"x")), backend.zero(0, 1)]:
            self.assertIn("read-only", str(self.failureResultOf(d, UnsupportedOperation).value))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"abc")

    def test_cancelledOpenClosesFile(self) -> None:
        """
        If the caller cancels the open while the pool works on it, the file
        is closed when the pool returns.
        """
        diskio = cast(Any, ManualDiskIO())
        path = writeFile(os.path.join(self.dir, "img"), b"abc")
        ctx = BackendContext(reactor=None, diskio=diskio)
        d = openBackend(ctx, "file://" + path, write=False, sparse=False, dirty=False)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        diskio.runNext()
        self.assertIs(diskio.pending[0][0], os.close)
        fd = diskio.pending[0][1][0]
        os.fstat(fd)
        diskio.runNext()
        self.assertRaises(OSError, os.fstat, fd)


class _FileIOTestsMixin(_Mixin):
    """
    Reads, writes, zeroes, extents and size on regular files; subclasses
    choose the directory and the I/O mode.
    """

    direct = True
    #: Run aligned direct I/O through a real AIO engine.
    useAIO = False
    aio: InlineAIO | None = None
    #: The directory is on tmpfs, where only small direct reads go through
    #: AIO.
    memoryFS = False

    def directory(self) -> str:
        path: str = os.path.abspath(self.mktemp())
        os.mkdir(path)
        return path

    def setUp(self) -> None:
        self.dir = self.directory()
        self.rng = random.Random(42)
        if self.useAIO:
            self.aio = inlineAIO(self)

    def backend(self, data: bytes = b"", size: int | None = None, **kw: Any) -> FileBackend:
        self.path = writeFile(os.path.join(self.dir, "img"), data, size)
        backend = openSync(self, self.path, direct=self.direct, aio=self.aio, **kw)
        self.assertEqual(backend.direct, self.direct)
        engine = "threads"
        if self.useAIO and self.direct:
            engine = "aio-small-reads" if self.memoryFS else "aio"
        self.assertEqual(backend.engine, engine)
        return backend

    def fileBytes(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def test_readWholeFile(self) -> None:
        """
        Reading from 0 returns the file, short at the end.
        """
        data = self.rng.randbytes(64 * KiB + 1000)
        backend = self.backend(data)
        self.assertEqual(readBack(self, backend, 0, 128 * KiB), data)

    def test_readUnaligned(self) -> None:
        """
        Reads at any offset, of any length, into aligned or misaligned
        memory, return exactly the bytes asked for.
        """
        data = self.rng.randbytes(32 * KiB + 1000)
        backend = self.backend(data)
        for offset in [0, 1, 511, 512, 4095, 4096, 4097]:
            for length in [1, 2, 511, 512, 4096, 4097, 10000]:
                for misalign in [0, 1, offset % 4096]:
                    self.assertEqual(
                        readBack(self, backend, offset, length, misalign),
                        data[offset : offset + length],
                        (offset, length, misalign),
                    )

    def test_readLastPartialBlock(self) -> None:
        """
        The last, partial block of a file whose size is not block aligned
        reads short; reads at or past the end return nothing.
        """
        data = self.rng.randbytes(10000)
        backend = self.backend(data)
        self.assertEqual(readBack(self, backend, 4096, 8192), data[4096:])
        self.assertEqual(readBack(self, backend, 9728, 512), data[9728:])
        self.assertEqual(readBack(self, backend, 9999, 4096, 1), data[9999:])
        self.assertEqual(readBack(self, backend, 10000, 4096), b"")
        self.assertEqual(readBack(self, backend, 20480, 4096), b"")

    def test_readIntoThen(self) -> None:
        """
        L{FileBackend.readIntoThen} gives C{then}, once, what L{readInto}
        gives its Deferred: the bytes read (short at the end, aligned or
        not), or the failure.
        """
        data = self.rng.randbytes(20000)
        backend = self.backend(data)
        for offset, length, misalign in [
            (0, 4096, 0),
            (4096, 8192, 0),
            (16384, 4096, 0),
            (1, 100, 0),
            (4096, 4096, 1),
            (30000, 4096, 0),
        ]:
            view = memoryview(_buffers.allocate(length + misalign))[misalign : misalign + length]
            outcomes: list[object] = []
            backend.readIntoThen(offset, view, outcomes.append)
            expected = data[offset : offset + length]
            self.assertEqual(outcomes, [len(expected)], (offset, length, misalign))
            self.assertEqual(bytes(view[: len(expected)]), expected)
        outcomes = []
        backend.readIntoThen(-1, memoryview(bytearray(10)), outcomes.append)
        [failure] = outcomes
        assert isinstance(failure, Failure)
        failure.trap(ValueError)
        self.successResultOf(backend.close())
        outcomes = []
        backend.readIntoThen(0, memoryview(_buffers.allocate(4096)), outcomes.append)
        [failure] = outcomes
        assert isinstance(failure, Failure)
        failure.trap(filebackend.BackendClosed)

    def test_writeUnalignedKeepsNeighbours(self) -> None:
        """
        Writes at offsets 1, 511 and 4095 of various lengths change only
        their own bytes.
        """
        model = bytearray(self.rng.randbytes(32 * KiB))
        backend = self.backend(bytes(model))
        for offset in [1, 511, 4095, 4096 + 1]:
            for length in [1, 2, 511, 4097]:
                data = self.rng.randbytes(length)
                self.assertEqual(
                    self.successResultOf(backend.write(offset, memoryview(data))), length
                )
                applyModel(model, offset, data)
                self.assertEqual(self.fileBytes(), model, (offset, length))

    def second(self) -> FileBackend:
        """
        Another backend on the image of the last L{backend} call, as a
        second connection of the same ticket has.
        """
        return openSync(self, self.path, direct=self.direct, aio=self.aio)

    def raceDuring(
        self, owner: object, name: str, race: Callable[[], Deferred[Any]], before: bool = False
    ) -> list[Deferred[Any]]:
        """
        Call C{race} (once) from inside the first call of C{owner.<name>}
        (a pool-side method or system call), after it or C{before} it, as a
        second connection's request would arrive while a pool thread is in
        the middle of an operation.

        @return: Where C{race}'s Deferred is put once it was called.
        """
        real = getattr(owner, name)
        raced: list[Deferred[Any]] = []

        def hooked(*args: Any) -> Any:
            if before and not raced:
                raced.append(race())
            result = real(*args)
            if not raced:
                raced.append(race())
            return result

        self.patch(owner, name, hooked)
        return raced

    def raceMerge(
        self, race: Callable[[FileBackend], Deferred[Any]]
    ) -> tuple[bytes, FileBackend, list[Deferred[Any]]]:
        """
        Open 16 KiB of random bytes, and call C{race} with a second backend
        on them once the first one's next operation has read a block to
        merge; skips with buffered I/O, which merges nothing.

        @return: The bytes, the first backend, and where L{raceDuring}
            puts C{race}'s Deferred.
        """
        if not self.direct:
            raise SkipTest("Buffered I/O does no read-modify-write")
        old = self.rng.randbytes(16 * KiB)
        b = self.backend(old)
        a = self.second()
        return old, b, self.raceDuring(FileBackend, "_readBlock", lambda: race(a))

    def raceExtendingWrite(self, b: FileBackend) -> list[Deferred[Any]]:
        """
        Have a second backend write 8 KiB of C{b"A"} at 8 KiB, extending
        C{b}'s 4 KiB image, just before C{b}'s next C{ftruncate}.

        @return: Where L{raceDuring} puts the write's Deferred.
        """
        a = self.second()
        dataA = filledView(8 * KiB, b"A")
        return self.raceDuring(os, "ftruncate", lambda: a.write(8 * KiB, dataA), before=True)

    def test_alignedWriteDuringReadModifyWrite(self) -> None:
        """
        An aligned write of a block that another connection's unaligned
        write is merging (between its read and its write back) is not
        undone by the write back: the writes are serialized, the later one
        winning where they overlap.
        """
        old, b, raced = self.raceMerge(lambda a: a.write(0, filledView(2 * a.blockSize, b"A")))
        bs = b.blockSize
        self.assertEqual(self.successResultOf(b.write(bs + 3, memoryview(b"B" * bs))), bs)
        self.assertEqual(self.successResultOf(raced[0]), 2 * bs)
        self.assertEqual(self.fileBytes(), b"A" * 2 * bs + b"B" * 3 + old[2 * bs + 3 :])

    def test_alignedZeroDuringReadModifyWrite(self) -> None:
        """
        An aligned zero racing an unaligned write's merge of its last block
        is not undone by the write back.
        """
        old, b, raced = self.raceMerge(lambda a: a.zero(0, 2 * a.blockSize))
        bs = b.blockSize
        self.assertEqual(self.successResultOf(b.write(bs + 3, memoryview(b"B" * bs))), bs)
        self.assertIsNone(self.successResultOf(raced[0]))
        self.assertEqual(self.fileBytes(), bytes(2 * bs) + b"B" * 3 + old[2 * bs + 3 :])

    def test_alignedWriteDuringUnalignedZero(self) -> None:
        """
        An aligned write racing the merge of a zero's unaligned edge is not
        undone by the zero's write back.
        """
        old, b, raced = self.raceMerge(lambda a: a.write(0, filledView(2 * a.blockSize, b"A")))
        bs = b.blockSize
        self.assertIsNone(self.successResultOf(b.zero(bs + 3, bs)))
        self.assertEqual(self.successResultOf(raced[0]), 2 * bs)
        self.assertEqual(self.fileBytes(), b"A" * 2 * bs + bytes(3) + old[2 * bs + 3 :])

    def test_extendingWriteDuringTailTrim(self) -> None:
        """
        A write extending the file is not cut off by an unaligned write
        past the end of file trimming the whole block it wrote back to its
        own end.
        """
        if not self.direct:
            raise SkipTest("Buffered I/O writes partial blocks as they are")
        b = self.backend(b"o" * 4 * KiB)
        raced = self.raceExtendingWrite(b)
        self.assertEqual(self.successResultOf(b.write(4 * KiB, memoryview(b"B" * 100))), 100)
        self.assertEqual(self.successResultOf(raced[0]), 8 * KiB)
        self.assertEqual(
            self.fileBytes(), b"o" * 4 * KiB + b"B" * 100 + bytes(4 * KiB - 100) + b"A" * 8 * KiB
        )

    def test_extendingWriteDuringSparseZero(self) -> None:
        """
        A write extending the file is not cut off by a sparse zero past the
        end of file, which extends the file with C{ftruncate}.
        """
        b = self.backend(b"o" * 4 * KiB, sparse=True)
        raced = self.raceExtendingWrite(b)
        self.assertIsNone(self.successResultOf(b.zero(4 * KiB, 4 * KiB)))
        self.assertEqual(self.successResultOf(raced[0]), 8 * KiB)
        self.assertEqual(self.fileBytes(), b"o" * 4 * KiB + bytes(4 * KiB) + b"A" * 8 * KiB)

    def test_writeMisalignedMemory(self) -> None:
        """
        Data in memory that is not aligned is written correctly at aligned
        and unaligned offsets.
        """
        model = bytearray(32 * KiB)
        backend = self.backend(bytes(model))
        for offset, misalign in [(0, 1), (4096, 1), (1, 1), (511, 7), (4096, 512)]:
            view = memoryview(_buffers.allocate(9000 + misalign))[misalign:]
            view[:] = self.rng.randbytes(len(view))
            self.successResultOf(backend.write(offset, view))
            applyModel(model, offset, bytes(view))
        self.assertEqual(self.fileBytes(), model)

    def test_writeAlignedFastPath(self) -> None:
        """
        An aligned write from an aligned buffer goes straight to the file,
        without allocating a bounce buffer.
        """
        backend = self.backend(size=64 * KiB)
        view = memoryview(_buffers.allocate(16 * KiB))
        view[:] = self.rng.randbytes(len(view))
        self.successResultOf(backend.write(4096, view))
        self.assertEqual(self.fileBytes()[4096 : 20 * KiB], view)
        if backend.direct:
            self.assertEqual(backend._bounces, [])

    def test_writeInsideLastBlockKeepsSize(self) -> None:
        """
        A write inside the last, partial block does not change the size.
        """
        model = bytearray(self.rng.randbytes(1000))
        backend = self.backend(bytes(model))
        self.successResultOf(backend.write(100, memoryview(b"abc")))
        applyModel(model, 100, b"abc")
        self.assertEqual(self.fileBytes(), model)

    def test_writeCrossingEndOfFile(self) -> None:
        """
        A write across the end of the file grows it to the end of the write.
        """
        model = bytearray(self.rng.randbytes(1000))
        backend = self.backend(bytes(model))
        self.successResultOf(backend.write(950, memoryview(b"y" * 100)))
        applyModel(model, 950, b"y" * 100)
        self.assertEqual(self.fileBytes(), model)

    def test_writePastEndOfFile(self) -> None:
        """
        A write past the end grows the file to exactly the end of the write;
        the gap reads as zeroes.
        """
        model = bytearray(b"a" * 1000)
        backend = self.backend(bytes(model))
        for offset, length in [(5000, 10), (8191, 2), (12288, 4096), (20000, 5000)]:
            data = self.rng.randbytes(length)
            self.successResultOf(backend.write(offset, memoryview(data)))
            applyModel(model, offset, data)
            self.assertEqual(os.path.getsize(self.path), len(model))
        self.assertEqual(self.fileBytes(), model)

    def test_writeEmpty(self) -> None:
        """
        An empty write succeeds and changes nothing.
        """
        backend = self.backend(b"abc")
        self.assertEqual(self.successResultOf(backend.write(10, memoryview(b""))), 0)
        self.assertEqual(self.fileBytes(), b"abc")

    def test_randomOperations(self) -> None:
        """
        Random writes, zeroes and reads on a non-sparse backend match a
        byte-array model.
        """
        model = bytearray(self.rng.randbytes(5000))
        backend = self.backend(bytes(model))
        checkRandomOperations(self, backend, model, seed=1)

    def test_randomOperationsSparse(self) -> None:
        """
        Random writes, zeroes and reads on a sparse backend match a
        byte-array model.
        """
        model = bytearray(self.rng.randbytes(5000))
        backend = self.backend(bytes(model), sparse=True)
        checkRandomOperations(self, backend, model, seed=2)

    def test_size(self) -> None:
        """
        The size is the file size, after writes too.
        """
        backend = self.backend(size=12345)
        self.assertEqual(self.successResultOf(backend.size()), 12345)
        self.successResultOf(backend.write(20000, memoryview(b"x")))
        self.assertEqual(self.successResultOf(backend.size()), 20001)

    def test_flushSyncs(self) -> None:
        """
        Flush fsyncs the file, in buffered mode too.
        """
        backend = self.backend(b"abc")
        synced: list[int] = []
        self.patch(os, "fsync", synced.append)
        self.assertIsNone(self.successResultOf(backend.flush()))
        self.assertEqual(synced, [backend._fd])

    def test_zeroSparseDeallocates(self) -> None:
        """
        Zeroing on a sparse backend punches a hole: the bytes read as zeroes
        and the blocks are freed.
        """
        backend = self.backend(self.rng.randbytes(MiB))
        os.fsync(backend._fd)
        self.assertGreater(os.stat(self.path).st_blocks, 0)
        backend.sparse = True
        self.successResultOf(backend.zero(0, MiB))
        self.assertEqual(self.fileBytes(), bytes(MiB))
        self.assertEqual(os.stat(self.path).st_blocks, 0)

    def test_zeroAllocates(self) -> None:
        """
        Zeroing on a non-sparse backend allocates the range.
        """
        backend = self.backend(size=MiB)
        self.assertEqual(os.stat(self.path).st_blocks, 0)
        self.successResultOf(backend.zero(0, MiB))
        self.assertEqual(self.fileBytes(), bytes(MiB))
        self.assertGreaterEqual(os.stat(self.path).st_blocks * 512, MiB)

    def test_zeroAllocatesWithoutZeroRange(self) -> None:
        """
        Where ZERO_RANGE is missing, zeroing punches a hole and allocates it
        again, clearing data.
        """
        backend = self.backend(b"\xff" * MiB)
        backend._canZeroRange = False
        self.successResultOf(backend.zero(4096, 64 * KiB))
        self.assertEqual(
            self.fileBytes(), b"\xff" * 4096 + bytes(64 * KiB) + b"\xff" * (MiB - 68 * KiB)
        )
        self.assertGreaterEqual(os.stat(self.path).st_blocks * 512, MiB)

    def test_zeroByWritingZeroes(self) -> None:
        """
        Without any fallocate support, zeroing writes zeroes, allocating
        them, and grows the file when zeroing past the end.
        """
        backend = self.backend(b"\xff" * 3 * MiB)
        backend._canZeroRange = backend._canPunchHole = backend._canFallocate = False
        self.successResultOf(backend.zero(4096, 2 * MiB))
        self.successResultOf(backend.zero(3 * MiB + 100, 10000))
        expected = b"\xff" * 4096 + bytes(2 * MiB) + b"\xff" * (MiB - 4096) + bytes(10100)
        self.assertEqual(self.fileBytes(), expected)
        self.assertGreaterEqual(os.stat(self.path).st_blocks * 512, 3 * MiB + 8192)

    def test_zeroSparseWithoutPunchHole(self) -> None:
        """
        A sparse backend that cannot punch holes writes zeroes instead.
        """
        backend = self.backend(b"\xff" * 64 * KiB, sparse=True)
        backend._canPunchHole = False
        self.successResultOf(backend.zero(4096, 8192))
        self.assertEqual(self.fileBytes(), b"\xff" * 4096 + bytes(8192) + b"\xff" * 52 * KiB)

    def test_zeroUnalignedKeepsNeighbours(self) -> None:
        """
        Zeroing at unaligned offsets and lengths clears only that range.
        """
        for sparse in [False, True]:
            model = bytearray(self.rng.randbytes(32 * KiB))
            backend = self.backend(bytes(model), sparse=sparse)
            for offset, length in [(1, 510), (511, 2), (4095, 3 * 4096 + 2), (20000, 1)]:
                self.successResultOf(backend.zero(offset, length))
                applyModel(model, offset, bytes(length))
                self.assertEqual(self.fileBytes(), model, (sparse, offset, length))

    def test_zeroPastEndOfFile(self) -> None:
        """
        Zeroing past the end grows the file to the end of the range, sparse
        or not; a sparse zero allocates nothing there.
        """
        for sparse in [False, True]:
            backend = self.backend(b"a" * 1000, sparse=sparse)
            blocks = os.stat(self.path).st_blocks
            self.successResultOf(backend.zero(8192, MiB))
            self.assertEqual(self.fileBytes(), b"a" * 1000 + bytes(8192 + MiB - 1000))
            if sparse:
                self.assertLessEqual(os.stat(self.path).st_blocks, blocks + 8)
            else:
                self.assertGreaterEqual(os.stat(self.path).st_blocks * 512, MiB)

    def test_zeroInSteps(self) -> None:
        """
        A long zero is done in steps of at most L{filebackend.ZERO_STEP}
        bytes, one pool call each.
        """
        self.patch(filebackend, "ZERO_STEP", 64 * KiB)
        diskio = SynchronousDiskIO()
        backend = self.backend(b"\xff" * MiB, diskio=diskio)
        before = diskio.calls
        self.successResultOf(backend.zero(0, MiB))
        self.assertEqual(diskio.calls - before, 16)
        self.assertEqual(self.fileBytes(), bytes(MiB))

    def test_zeroNothing(self) -> None:
        """
        Zeroing no bytes changes nothing.
        """
        backend = self.backend(b"abc")
        self.assertIsNone(self.successResultOf(backend.zero(10, 0)))
        self.assertEqual(self.fileBytes(), b"abc")

    def sparseImage(self) -> FileBackend:
        """
        A 10 MiB file with data at [1 MiB, 1 MiB + 4 KiB) and [5 MiB, 6 MiB).
        """
        backend = self.backend(size=10 * MiB)
        self.successResultOf(backend.write(MiB, memoryview(b"d" * 4096)))
        self.successResultOf(backend.write(5 * MiB, memoryview(b"d" * MiB)))
        return backend

    def test_extentsReportHoles(self) -> None:
        """
        Holes are zero extents and data are data extents, in order, merged,
        covering the file.
        """
        backend = self.sparseImage()
        self.assertEqual(
            self.successResultOf(backend.extents("zero", 0, 10 * MiB)),
            [
                Extent(0, MiB, zero=True),
                Extent(MiB, 4096, zero=False),
                Extent(MiB + 4096, 4 * MiB - 4096, zero=True),
                Extent(5 * MiB, MiB, zero=False),
                Extent(6 * MiB, 4 * MiB, zero=True),
            ],
        )

    def test_extentsWindow(self) -> None:
        """
        Extents for a window are clipped to the window and the file size.
        """
        backend = self.sparseImage()
        self.assertEqual(
            self.successResultOf(backend.extents("zero", MiB + 100, MiB)),
            [Extent(MiB + 100, 3996, zero=False), Extent(MiB + 4096, MiB - 3996, zero=True)],
        )
        self.assertEqual(
            self.successResultOf(backend.extents("zero", 5 * MiB + 1, 100)),
            [Extent(5 * MiB + 1, 100, zero=False)],
        )
        self.assertEqual(
            self.successResultOf(backend.extents("zero", 9 * MiB, 1 << 50)),
            [Extent(9 * MiB, MiB, zero=True)],
        )
        self.assertEqual(self.successResultOf(backend.extents("zero", 10 * MiB, 1)), [])
        self.assertEqual(self.successResultOf(backend.extents("zero", 0, 0)), [])

    def test_extentsCapped(self) -> None:
        """
        At most L{filebackend.MAX_EXTENTS} extents come back; asking again
        from the end of the last continues.
        """
        self.patch(filebackend, "MAX_EXTENTS", 2)
        backend = self.sparseImage()
        first = self.successResultOf(backend.extents("zero", 0, 10 * MiB))
        self.assertEqual(first, [Extent(0, MiB, zero=True), Extent(MiB, 4096, zero=False)])
        second = self.successResultOf(backend.extents("zero", MiB + 4096, 10 * MiB))
        self.assertEqual(second[0], Extent(MiB + 4096, 4 * MiB - 4096, zero=True))

    def test_extentsEmptyFile(self) -> None:
        """
        An empty file has no extents.
        """
        backend = self.backend()
        self.assertEqual(self.successResultOf(backend.extents("zero", 0, MiB)), [])

    def test_extentsWithoutSeekData(self) -> None:
        """
        Where SEEK_DATA is not supported, the window is one data extent.
        """
        backend = self.sparseImage()
        realSeek = os.lseek

        def lseek(fd: int, pos: int, how: int) -> int:
            if how in (os.SEEK_DATA, os.SEEK_HOLE):
                raise OSError(errno.EINVAL, "Invalid argument")
            return realSeek(fd, pos, how)

        self.patch(os, "lseek", lseek)
        self.assertEqual(
            self.successResultOf(backend.extents("zero", 100, 20 * MiB)),
            [Extent(100, 10 * MiB - 100, zero=False)],
        )

    def test_extentsDirtyUnsupported(self) -> None:
        """
        Dirty extents are not supported, with upstream's message.
        """
        backend = self.backend(b"abc")
        failure = self.failureResultOf(backend.extents("dirty", 0, 3), UnsupportedOperation)
        self.assertEqual(str(failure.value), "Backend file does not support dirty extents")


class DirectFileIOTests(_FileIOTestsMixin, SynchronousTestCase):
    """
    Regular files with O_DIRECT, in the trial temp directory.
    """

    def setUp(self) -> None:
        super().setUp()
        probe = openSync(self, writeFile(os.path.join(self.dir, "probe"), b"x" * 4096))
        if not probe.direct:
            raise SkipTest("No O_DIRECT on the trial temp directory")


class _AIOFileIOTestsMixin(_FileIOTestsMixin):
    """
    The same tests with the AIO engine, and that it is used.
    """

    useAIO = True

    def backend(self, data: bytes = b"", size: int | None = None, **kw: Any) -> FileBackend:
        backend = super().backend(data, size, **kw)
        # Cached pages of the file we just wrote make RWF_NOWAIT direct I/O
        # on a disk say EAGAIN (and go to the pool): drop them.
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return backend

    def test_alignedIOUsesAIO(self) -> None:
        """
        Aligned reads and writes of aligned memory go through the AIO
        engine, not the pool; unaligned ones and read-only memory still
        work through the pool.
        """
        diskio = SynchronousDiskIO()
        data = self.rng.randbytes(64 * KiB)
        backend = self.backend(data, diskio=diskio)
        assert self.aio is not None
        before = (diskio.calls, self.aio.requests)
        view = memoryview(_buffers.allocate(16 * KiB))
        self.assertEqual(self.successResultOf(backend.readInto(4096, view)), 16 * KiB)
        self.assertEqual(bytes(view), data[4096 : 20 * KiB])
        view[:] = self.rng.randbytes(16 * KiB)
        self.assertEqual(self.successResultOf(backend.write(8192, view)), 16 * KiB)
        self.assertEqual(readBack(self, backend, 8192, 16 * KiB), bytes(view))
        self.assertEqual((diskio.calls - before[0], self.aio.requests - before[1]), (0, 3))
        self.assertEqual(readBack(self, backend, 1, 100), data[1:101])
        self.successResultOf(backend.write(0, memoryview(b"r" * 4096)))
        self.assertEqual((diskio.calls - before[0], self.aio.requests - before[1]), (2, 3))
        self.assertEqual(readBack(self, backend, 0, 4096), b"r" * 4096)

    def test_closeWaitsForAIO(self) -> None:
        """
        The file stays open while an AIO request is in flight.
        """
        diskio = SynchronousDiskIO()
        backend = self.backend(self.rng.randbytes(8192), diskio=diskio)
        assert self.aio is not None
        d: Deferred[int] = Deferred()
        self.patch(self.aio, "submit", submitting(d))
        read = backend.readInto(0, memoryview(_buffers.allocate(4096)))
        closed = backend.close()
        self.assertNoResult(closed)
        d.callback(4096)
        self.assertEqual(self.successResultOf(read), 4096)
        self.successResultOf(closed)

    def test_cancelLeavesAIOInFlight(self) -> None:
        """
        Cancelling a read whose AIO request is in flight fails the read at
        once; the file stays open until the kernel is done with it.
        """
        diskio = SynchronousDiskIO()
        backend = self.backend(self.rng.randbytes(8192), diskio=diskio)
        assert self.aio is not None
        d: Deferred[int] = Deferred()
        self.patch(self.aio, "submit", submitting(d))
        read = backend.readInto(0, memoryview(_buffers.allocate(4096)))
        read.cancel()
        self.failureResultOf(read, CancelledError)
        closed = backend.close()
        self.assertNoResult(closed)
        d.callback(4096)
        self.successResultOf(closed)

    def test_readIntoThenAIO(self) -> None:
        """
        An aligned L{FileBackend.readIntoThen} goes through the AIO engine
        and makes no pool call; the file stays open until C{then} was told.
        """
        diskio = SynchronousDiskIO()
        data = self.rng.randbytes(8192)
        backend = self.backend(data, diskio=diskio)
        assert self.aio is not None
        before = (diskio.calls, self.aio.requests)
        view = memoryview(_buffers.allocate(4096))
        outcomes: list[object] = []
        backend.readIntoThen(4096, view, outcomes.append)
        self.assertEqual(outcomes, [4096])
        self.assertEqual(bytes(view), data[4096:])
        self.assertEqual((diskio.calls - before[0], self.aio.requests - before[1]), (0, 1))
        d: Deferred[int] = Deferred()
        self.patch(self.aio, "submit", submitting(d))
        outcomes = []
        backend.readIntoThen(0, view, outcomes.append)
        closed = backend.close()
        self.assertNoResult(closed)
        self.assertEqual(outcomes, [])
        d.callback(4096)
        self.assertEqual(outcomes, [4096])
        self.successResultOf(closed)

    def test_readIntoThenFallBack(self) -> None:
        """
        Where the kernel would block (EAGAIN), C{readIntoThen}'s request
        runs on the pool and C{then} is told once.
        """
        diskio = SynchronousDiskIO()
        data = self.rng.randbytes(8192)
        backend = self.backend(data, diskio=diskio)
        self.patch(backend._aio, "submit", refusing(OSError(errno.EAGAIN, "Would block")))
        view = memoryview(_buffers.allocate(8192))
        before = diskio.calls
        outcomes: list[object] = []
        backend.readIntoThen(0, view, outcomes.append)
        self.assertEqual(outcomes, [8192])
        self.assertEqual(bytes(view), data)
        self.assertEqual(diskio.calls - before, 1)

    def test_fallBackOnEAGAIN(self) -> None:
        """
        Where the kernel would block (EAGAIN), the request runs on the
        pool and the backend keeps using AIO.
        """
        diskio = SynchronousDiskIO()
        data = self.rng.randbytes(8192)
        backend = self.backend(data, diskio=diskio)
        self.patch(backend._aio, "submit", refusing(OSError(errno.EAGAIN, "Would block")))
        view = memoryview(_buffers.allocate(8192))
        before = diskio.calls
        self.assertEqual(self.successResultOf(backend.readInto(0, view)), 8192)
        self.assertEqual(bytes(view), data)
        self.assertEqual(diskio.calls - before, 1)
        self.assertEqual(backend.engine, "aio")

    def test_fallBackAfterRefusals(self) -> None:
        """
        After L{filebackend.AIO_MAX_REFUSALS} EAGAINs in a row (a device
        that never takes non-blocking requests), the backend stops trying
        AIO; one request that goes through resets the count.
        """
        self.patch(filebackend, "AIO_MAX_REFUSALS", 3)
        data = self.rng.randbytes(8192)
        backend = self.backend(data)
        realSubmit = backend._aio.submit  # type: ignore[union-attr]
        refuse = [True]

        def submit(*args: Any) -> bool:
            if refuse[0]:
                return refusing(OSError(errno.EAGAIN, "Would block"))(*args)
            return realSubmit(*args)

        self.patch(backend._aio, "submit", submit)
        for _ in range(2):
            self.assertEqual(readBack(self, backend, 0, 4096), data[:4096])
        refuse[0] = False
        self.assertEqual(readBack(self, backend, 0, 4096), data[:4096])
        refuse[0] = True
        for _ in range(2):
            self.assertEqual(readBack(self, backend, 0, 4096), data[:4096])
        self.assertEqual(backend.engine, "aio")
        self.assertEqual(readBack(self, backend, 0, 4096), data[:4096])
        self.assertEqual(backend.engine, "threads")

    def test_fallBackForGood(self) -> None:
        """
        Where the file cannot do non-blocking asynchronous I/O (EOPNOTSUPP),
        the backend uses the pool from then on.
        """
        data = self.rng.randbytes(8192)
        backend = self.backend(data)
        self.patch(backend._aio, "submit", refusing(OSError(errno.EOPNOTSUPP, "Not supported")))
        self.assertEqual(readBack(self, backend, 0, 8192), data)
        self.assertEqual(backend.engine, "threads")

    def test_otherErrorsFail(self) -> None:
        """
        Other errors (EIO) fail the request, as from the pool.
        """
        backend = self.backend(self.rng.randbytes(8192))
        self.patch(backend._aio, "submit", refusing(OSError(errno.EIO, "I/O error")))
        view = memoryview(_buffers.allocate(4096))
        failure = self.failureResultOf(backend.write(0, view), OSError)
        self.assertEqual(failure.value.errno, errno.EIO)


class DirectFileAIOTests(_AIOFileIOTestsMixin, DirectFileIOTests):
    """
    Regular files with O_DIRECT through the AIO engine.
    """


class BufferedFileIOTests(_FileIOTestsMixin, SynchronousTestCase):
    """
    Regular files with buffered I/O.
    """

    direct = False


class TmpfsFileIOTests(_FileIOTestsMixin, SynchronousTestCase):
    """
    Regular files on tmpfs, which takes O_DIRECT since Linux 6.6 at any
    alignment and has no ZERO_RANGE.
    """

    memoryFS = True

    def directory(self) -> str:
        if not os.path.isdir("/dev/shm") or not os.access("/dev/shm", os.W_OK):
            raise SkipTest("No writable /dev/shm")
        path = tempfile.mkdtemp(dir="/dev/shm", prefix="imageio-test-")
        self.addCleanup(shutil.rmtree, path)
        probe = os.path.join(path, "probe")
        writeFile(probe, b"x" * 4096)
        try:
            os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        except OSError:
            self.direct = False
        return path


class TmpfsFileAIOTests(TmpfsFileIOTests):
    """
    Files on tmpfs with an AIO engine running. There C{io_submit} itself
    copies the bytes, on the reactor thread, and C{RWF_NOWAIT} is refused:
    aligned direct reads up to L{filebackend.SYNC_AIO_MAX_READ} go through
    the engine without the flag, larger reads and all writes through the
    pool. Every test of L{TmpfsFileIOTests} runs this way too.
    """

    useAIO = True

    def backend(self, data: bytes = b"", size: int | None = None, **kw: Any) -> FileBackend:
        if not self.direct and self._testMethodName in TmpfsFileAIOTests.__dict__:
            raise SkipTest("No O_DIRECT on tmpfs here")
        return super().backend(data, size, **kw)

    def recordReads(self, backend: FileBackend) -> list[tuple[int, bool]]:
        """
        @return: A list to which each read given to the AIO engine adds its
            length and C{nowait} flag.
        """
        assert self.aio is not None
        realSubmit = self.aio.submit
        reads: list[tuple[int, bool]] = []

        def submit(
            opcode: int,
            fd: int,
            view: memoryview,
            offset: int,
            align: int,
            nowait: bool,
            then: Callable[[Any], object],
        ) -> bool:
            if opcode == IOCB_CMD_PREAD:
                reads.append((len(view), nowait))
            return realSubmit(opcode, fd, view, offset, align, nowait, then)

        self.patch(self.aio, "submit", submit)
        return reads

    def test_smallReadsAIO(self) -> None:
        """
        Aligned reads up to L{filebackend.SYNC_AIO_MAX_READ} go through the
        engine, without C{RWF_NOWAIT}, and make no pool call.
        """
        diskio = SynchronousDiskIO()
        data = self.rng.randbytes(256 * KiB)
        backend = self.backend(data, diskio=diskio)
        reads = self.recordReads(backend)
        limit = filebackend.SYNC_AIO_MAX_READ
        self.assertEqual(limit, 64 * KiB)
        before = diskio.calls
        self.assertEqual(readBack(self, backend, 8192, 4096), data[8192:12288])
        self.assertEqual(readBack(self, backend, 64 * KiB, limit), data[64 * KiB : 128 * KiB])
        self.assertEqual(reads, [(4096, False), (limit, False)])
        self.assertEqual(diskio.calls - before, 0)
        self.assertEqual(backend.engine, "aio-small-reads")

    def test_largeReadsAndWritesOnPool(self) -> None:
        """
        A read one block larger than L{filebackend.SYNC_AIO_MAX_READ}, and
        aligned writes of any size, go through the pool: their copy inside
        C{io_submit} would hold the reactor.
        """
        diskio = SynchronousDiskIO()
        data = self.rng.randbytes(256 * KiB)
        backend = self.backend(data, diskio=diskio)
        reads = self.recordReads(backend)
        assert self.aio is not None
        before = (diskio.calls, self.aio.requests)
        size = filebackend.SYNC_AIO_MAX_READ + 4096
        self.assertEqual(readBack(self, backend, 0, size), data[:size])
        self.successResultOf(backend.write(0, filledView(4096, b"w")))
        self.assertEqual(readBack(self, backend, 0, 4096), b"w" * 4096)
        self.assertEqual(reads, [(4096, False)])
        self.assertEqual((diskio.calls - before[0], self.aio.requests - before[1]), (2, 1))

    def test_thresholdIsTheConstant(self) -> None:
        """
        The limit is L{filebackend.SYNC_AIO_MAX_READ} as it was when the
        file was opened.
        """
        self.patch(filebackend, "SYNC_AIO_MAX_READ", 8192)
        data = self.rng.randbytes(64 * KiB)
        backend = self.backend(data)
        reads = self.recordReads(backend)
        for length in (4096, 8192, 12288):
            self.assertEqual(readBack(self, backend, 0, length), data[:length])
        self.assertEqual(reads, [(4096, False), (8192, False)])

    def test_stoppedEngineUsesPool(self) -> None:
        """
        With the engine stopped (the daemon shutting down), small reads go
        through the pool.
        """
        diskio = SynchronousDiskIO()
        data = self.rng.randbytes(8192)
        backend = self.backend(data, diskio=diskio)
        assert self.aio is not None
        self.aio.stop()
        before = diskio.calls
        self.assertEqual(readBack(self, backend, 0, 4096), data[:4096])
        self.assertEqual((diskio.calls - before, self.aio.requests), (1, 0))

    def test_fallBackForGood(self) -> None:
        """
        If the kernel refuses AIO on the file after all (EOPNOTSUPP), the
        read is done on the pool and the backend uses the pool from then on.
        """
        diskio = SynchronousDiskIO()
        data = self.rng.randbytes(8192)
        backend = self.backend(data, diskio=diskio)
        assert self.aio is not None
        self.patch(self.aio, "submit", refusing(OSError(errno.EOPNOTSUPP, "Not supported")))
        before = diskio.calls
        self.assertEqual(readBack(self, backend, 0, 4096), data[:4096])
        self.assertEqual(backend.engine, "threads")
        self.assertEqual(readBack(self, backend, 4096, 4096), data[4096:])
        self.assertEqual(diskio.calls - before, 2)

    def test_detected(self) -> None:
        """
        Files on tmpfs are detected as such when opened; files elsewhere
        are not (if the trial directory is not on tmpfs too).
        """
        backend = self.backend(b"x" * 4096)
        self.assertEqual(backend._aioSyncMax, filebackend.SYNC_AIO_MAX_READ)
        other = os.path.abspath(self.mktemp())
        writeFile(other, b"x" * 4096, None)
        fd = os.open(other, os.O_RDONLY)
        try:
            if fileSystemType(fd) == TMPFS_MAGIC:
                raise SkipTest("The trial directory is on tmpfs")
        finally:
            os.close(fd)
        try:
            elsewhere = openSync(self, other, aio=self.aio)
        except OSError as e:
            raise SkipTest(f"Cannot open {other}: {e}") from None
        self.assertIsNone(elsewhere._aioSyncMax)
        self.assertEqual(elsewhere.engine, "aio" if elsewhere.direct else "threads")


@define
class ManualDiskIO:
    """
    A disk-io whose calls run only when the test says so.
    """

    pending: list[tuple[Callable[..., Any], tuple[Any, ...], Deferred[Any]]] = field(factory=list)

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pending.append((fn, args, d))
        return d

    def runNext(self) -> None:
        fn, args, d = self.pending.pop(0)
        try:
            result = fn(*args)
        except BaseException:
            d.errback(Failure())
        else:
            d.callback(result)


class CloseTests(SynchronousTestCase):
    """
    Tests for closing while operations are in flight.
    """

    def setUp(self) -> None:
        self.path = writeFile(self.mktemp(), b"a" * 64 * KiB)
        self.diskio = ManualDiskIO()
        ctx = BackendContext(reactor=None, diskio=cast(Any, self.diskio))
        d = openBackend(ctx, "file://" + self.path, write=True, sparse=False, dirty=False)
        self.diskio.runNext()
        backend = self.successResultOf(d)
        assert isinstance(backend, FileBackend)
        self.backend = backend
        self.fd = backend._fd

    def tearDown(self) -> None:
        self.backend.close()
        while self.diskio.pending:
            self.diskio.runNext()

    def test_closeWaitsForOperation(self) -> None:
        """
        Close releases the fd only after the operation in flight returned,
        and that operation still succeeds.
        """
        view = memoryview(_buffers.allocate(4096))
        read = self.backend.readInto(0, view)
        closed = self.backend.close()
        self.assertNoResult(closed)
        self.assertEqual(len(self.diskio.pending), 1)
        os.fstat(self.fd)
        self.diskio.runNext()
        self.assertEqual(self.successResultOf(read), 4096)
        self.assertNoResult(closed)
        self.diskio.runNext()
        self.assertIsNone(self.successResultOf(closed))
        self.assertRaises(OSError, os.fstat, self.fd)

    def test_closeIdle(self) -> None:
        """
        Closing an idle backend closes the fd on the pool.
        """
        closed = self.backend.close()
        self.assertIs(self.diskio.pending[0][0], os.close)
        self.diskio.runNext()
        self.assertIsNone(self.successResultOf(closed))
        self.assertRaises(OSError, os.fstat, self.fd)

    def test_closeIdempotent(self) -> None:
        """
        Closing twice closes the fd once; both Deferreds fire, and so does a
        close after the fd is gone.
        """
        first = self.backend.close()
        second = self.backend.close()
        self.assertEqual(len(self.diskio.pending), 1)
        self.diskio.runNext()
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))
        self.assertIsNone(self.successResultOf(self.backend.close()))
        self.assertEqual(self.diskio.pending, [])

    def test_operationsAfterClose(self) -> None:
        """
        Every operation after close fails with L{BackendClosed} naming the
        image, without reaching the pool.
        """
        self.backend.close()
        self.diskio.runNext()
        for d in [
            self.backend.size(),
            self.backend.readInto(0, memoryview(bytearray(1))),
            self.backend.write(0, memoryview(b"x")),
            self.backend.zero(0, 1),
            self.backend.zero(0, 0),
            self.backend.flush(),
            self.backend.extents("zero", 0, 1),
        ]:
            self.assertIn(self.path, str(self.failureResultOf(d, BackendClosed).value))
        self.assertEqual(self.diskio.pending, [])

    def test_cancelledOperationKeepsFd(self) -> None:
        """
        Cancelling an operation fails it at once, but the fd stays open
        until the pool call really returned.
        """
        write = self.backend.write(0, memoryview(b"b" * 4096))
        write.cancel()
        self.failureResultOf(write, CancelledError)
        closed = self.backend.close()
        self.assertEqual(len(self.diskio.pending), 1)
        self.diskio.runNext()
        self.diskio.runNext()
        self.successResultOf(closed)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(4096), b"b" * 4096)

    def test_closeStopsLongZero(self) -> None:
        """
        Closing during a multi-step zero stops it after the step in flight;
        the zero fails with L{BackendClosed}.
        """
        self.patch(filebackend, "ZERO_STEP", 16 * KiB)
        zero = self.backend.zero(0, 64 * KiB)
        closed = self.backend.close()
        self.diskio.runNext()
        self.failureResultOf(zero, BackendClosed)
        self.assertIs(self.diskio.pending[0][0], os.close)
        self.diskio.runNext()
        self.successResultOf(closed)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), bytes(16 * KiB) + b"a" * 48 * KiB)

    def test_cancelLongZero(self) -> None:
        """
        Cancelling a multi-step zero stops it after the step in flight.
        """
        self.patch(filebackend, "ZERO_STEP", 16 * KiB)
        zero = self.backend.zero(0, 64 * KiB)
        zero.cancel()
        self.failureResultOf(zero, CancelledError)
        self.diskio.runNext()
        self.assertEqual(self.diskio.pending, [])

    def test_failedOperation(self) -> None:
        """
        An error on the pool fails the operation's Deferred and leaves the
        backend usable.
        """
        d = self.backend.readInto(0, memoryview(bytearray(10)))
        self.diskio.pending[0] = (os.read, (-1, 1), self.diskio.pending[0][2])
        self.diskio.runNext()
        self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.EBADF)
        size = self.backend.size()
        self.diskio.runNext()
        self.assertEqual(self.successResultOf(size), 64 * KiB)


class WriteRegistryTests(SynchronousTestCase):
    """
    Tests for the per-image registry of writes and zeroes in flight, with
    two backends (two connections) on one image and a disk-io that runs
    calls when the test says.
    """

    def setUp(self) -> None:
        self.path = writeFile(self.mktemp(), b"a" * 64 * KiB)
        self.diskio = ManualDiskIO()
        self.a = self.open()
        self.b = self.open()
        self.bs = self.a.blockSize
        if not self.a.direct:
            raise SkipTest("No O_DIRECT on the trial temp directory: nothing to merge")

    def open(self, sparse: bool = False) -> FileBackend:
        ctx = BackendContext(reactor=None, diskio=cast(Any, self.diskio))
        d = openBackend(ctx, "file://" + self.path, write=True, sparse=sparse, dirty=False)
        self.diskio.runNext()
        backend = self.successResultOf(d)
        assert isinstance(backend, FileBackend)
        self.addCleanup(self.close, backend)
        return backend

    def close(self, backend: FileBackend) -> None:
        backend.close()
        while self.diskio.pending:
            self.diskio.runNext()

    def pendingWrites(self) -> list[tuple[int, int]]:
        """
        @return: C{(offset, length)} of the writes and zeroes on the pool.
        """
        return [
            (args[0], len(args[1]) if isinstance(args[1], memoryview) else args[1])
            for fn, args, _ in self.diskio.pending
            if getattr(fn, "__name__", "") in ("_write", "_zeroRange")
        ]

    def assertIdle(self) -> None:
        writes = self.a._writes
        self.assertIs(writes, self.b._writes)
        self.assertEqual((writes.active, writes.waiting), ([], []))

    def test_disjointAlignedWritesDoNotWait(self) -> None:
        """
        Aligned writes of disjoint ranges, from two backends and from one,
        all go to the pool at once.
        """
        bs = self.bs
        writes = [
            self.a.write(0, filledView(bs)),
            self.b.write(bs, filledView(2 * bs)),
            self.a.write(3 * bs, filledView(bs)),
            self.b.zero(4 * bs, bs),
        ]
        self.assertEqual(self.pendingWrites(), [(0, bs), (bs, 2 * bs), (3 * bs, bs), (4 * bs, bs)])
        while self.diskio.pending:
            self.diskio.runNext()
        for d in writes:
            self.successResultOf(d)
        self.assertIdle()

    def test_sharedBlockWaits(self) -> None:
        """
        Disjoint writes sharing an unaligned boundary block, and overlapping
        writes, are serialized in order of arrival; a write overlapping only
        a waiting one waits behind it.
        """
        bs = self.bs
        first = self.a.write(0, filledView(bs + 3, b"1"))
        second = self.b.write(bs + 3, filledView(bs, b"2"))
        third = self.b.zero(bs + 3, 1)
        fourth = self.a.write(2 * bs, filledView(bs, b"4"))
        self.assertEqual(self.pendingWrites(), [(0, bs + 3)])
        self.diskio.runNext()
        self.assertEqual(self.successResultOf(first), bs + 3)
        self.assertEqual(self.pendingWrites(), [(bs + 3, bs)])
        self.diskio.runNext()
        self.assertEqual(self.successResultOf(second), bs)
        self.assertEqual(self.pendingWrites(), [(bs + 3, 1), (2 * bs, bs)])
        self.diskio.runNext()
        self.diskio.runNext()
        self.assertIsNone(self.successResultOf(third))
        self.assertEqual(self.successResultOf(fourth), bs)
        self.assertIdle()
        with open(self.path, "rb") as f:
            self.assertEqual(
                f.read(3 * bs + 1), b"1" * (bs + 3) + b"\0" + b"2" * (bs - 4) + b"4" * bs + b"a"
            )

    def test_failedWriteReleases(self) -> None:
        """
        A write failing on the pool releases its blocks to the one waiting.
        """
        first = self.a.write(0, filledView(10))
        second = self.b.write(5, filledView(10))
        fn, args, d = self.diskio.pending[0]
        self.diskio.pending[0] = (os.read, (-1, 1), d)
        self.diskio.runNext()
        self.failureResultOf(first, OSError)
        self.assertEqual(self.pendingWrites(), [(5, 10)])
        self.diskio.runNext()
        self.successResultOf(second)
        self.assertIdle()

    def test_startRaisingReleases(self) -> None:
        """
        A write whose start raises (a bug, a thread that cannot start)
        fails and releases its blocks.
        """
        real = FileBackend._runThen
        calls = []

        def runThen(backend: FileBackend, *args: Any) -> Any:
            calls.append(args)
            if len(calls) == 1:
                raise RuntimeError("can't start new thread")
            return real(backend, *args)

        self.patch(FileBackend, "_runThen", runThen)
        self.failureResultOf(self.a.write(0, filledView(10)), RuntimeError)
        self.assertIdle()
        second = self.b.write(0, filledView(10))
        self.diskio.runNext()
        self.successResultOf(second)
        self.assertIdle()

    def test_cancelWaitingWithdraws(self) -> None:
        """
        Cancelling a write that waits withdraws it: it never runs, and a
        write that waited only behind it goes ahead.
        """
        bs = self.bs
        first = self.a.write(0, filledView(bs))
        second = self.b.write(0, filledView(2 * bs))
        third = self.a.write(bs, filledView(bs))
        self.assertEqual(self.pendingWrites(), [(0, bs)])
        second.cancel()
        self.failureResultOf(second, CancelledError)
        self.assertEqual(self.pendingWrites(), [(0, bs), (bs, bs)])
        self.diskio.runNext()
        self.diskio.runNext()
        self.successResultOf(first)
        self.successResultOf(third)
        self.assertIdle()

    def test_cancelRunningKeepsClaim(self) -> None:
        """
        Cancelling a write on the pool does not release its blocks before
        the pool call returned.
        """
        first = self.a.write(0, filledView(10))
        first.cancel()
        self.failureResultOf(first, CancelledError)
        second = self.b.write(0, filledView(10))
        self.assertEqual(self.pendingWrites(), [(0, 10)])
        self.diskio.runNext()
        self.assertEqual(self.pendingWrites(), [(0, 10)])
        self.diskio.runNext()
        self.successResultOf(second)
        self.assertIdle()

    def test_closeWhileWaiting(self) -> None:
        """
        A write waiting when its backend closes fails with L{BackendClosed}
        once its turn comes, without running, and releases its turn.
        """
        first = self.a.write(0, filledView(10))
        second = self.b.write(0, filledView(10))
        third = self.a.write(0, filledView(10))
        closed = self.b.close()
        self.assertIs(self.diskio.pending[-1][0], os.close)
        self.diskio.pending.pop()[2].callback(None)
        self.successResultOf(closed)
        self.diskio.runNext()
        self.successResultOf(first)
        self.failureResultOf(second, BackendClosed)
        self.assertEqual(self.pendingWrites(), [(0, 10)])
        self.diskio.runNext()
        self.successResultOf(third)
        self.assertIdle()

    def test_cancelZeroWhileWaiting(self) -> None:
        """
        Cancelling a zero waiting for its turn withdraws it.
        """
        first = self.a.write(0, filledView(10))
        zero = self.b.zero(0, 10)
        zero.cancel()
        self.failureResultOf(zero, CancelledError)
        self.diskio.runNext()
        self.successResultOf(first)
        self.assertEqual(self.diskio.pending, [])
        self.assertIdle()

    def test_trimClaimsToEnd(self) -> None:
        """
        An unaligned write or a sparse zero reaching past the end of file
        (which may set the file size) holds off every later write after
        it; within the file they claim only their blocks.
        """
        bs = self.bs
        sparse = self.open(sparse=True)
        inside = [self.a.write(bs + 3, filledView(10)), sparse.zero(2 * bs, bs)]
        far = self.b.write(1024 * bs, filledView(bs))
        self.assertEqual(len(self.pendingWrites()), 3)
        while self.diskio.pending:
            self.diskio.runNext()
        for d in [*inside, far]:
            self.successResultOf(d)
        for end, past in [
            (2048 * bs, lambda: self.a.write(1025 * bs + 3, filledView(10))),
            (4096 * bs, lambda: sparse.zero(3000 * bs, bs)),
        ]:
            first = past()
            later = self.b.write(end, filledView(bs))
            self.assertEqual(len(self.pendingWrites()), 1)
            self.diskio.runNext()
            self.successResultOf(first)
            self.assertEqual(self.pendingWrites(), [(end, bs)])
            self.diskio.runNext()
            self.successResultOf(later)
        self.assertIdle()


def requireRoot() -> None:
    if os.getuid() != 0:
        raise SkipTest("Needs root")


def attachLoop(case: SynchronousTestCase, path: str, sectorSize: int) -> str:
    """
    Attach C{path} to a free loop device; detach it in cleanup.
    """
    requireRoot()
    try:
        out = subprocess.run(
            ["losetup", "--find", "--show", "--sector-size", str(sectorSize), path],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise SkipTest(f"Cannot attach a loop device: {e}") from None
    device = out.stdout.strip()
    case.addCleanup(subprocess.run, ["losetup", "-d", device], check=False, timeout=30)
    return device


class _BlockDeviceTestsMixin(_Mixin):
    """
    The block backend on a loop device of C{sectorSize}-byte sectors.
    """

    sectorSize = 512
    size = 4 * MiB
    useAIO = False

    def setUp(self) -> None:
        self.rng = random.Random(7)
        self.model = bytearray(self.rng.randbytes(self.size))
        self.image = writeFile(self.mktemp(), bytes(self.model))
        self.device = attachLoop(self, self.image, self.sectorSize)
        aio = inlineAIO(self) if self.useAIO else None
        self.backend = openSync(self, self.device, maxConnections=6, aio=aio)

    def test_identity(self) -> None:
        """
        A block device is backend C{block}, with C{maxConnections} readers
        and writers and its logical sector size as block size.
        """
        b = self.backend
        self.assertEqual(
            (b.name, b.maxReaders, b.maxWriters, b.blockSize, b.direct),
            ("block", 6, 6, self.sectorSize, True),
        )

    def test_size(self) -> None:
        """
        The size is the device size.
        """
        self.assertEqual(self.successResultOf(self.backend.size()), self.size)

    def test_readWriteUnaligned(self) -> None:
        """
        Unaligned writes (offset 1 length 511, offset 4095 length 2, ...)
        keep their neighbours intact, read back exactly, and reach the
        backing file.
        """
        for offset, length in [(1, 511), (4095, 2), (511, 4096 * 2 + 3), (0, 1), (4096, 8192)]:
            data = self.rng.randbytes(length)
            self.successResultOf(self.backend.write(offset, memoryview(data)))
            applyModel(self.model, offset, data)
            start, end = max(0, offset - 1), offset + length + 1
            got = readBack(self, self.backend, start, end - start, 1)
            self.assertEqual(got, self.model[start:end])
        self.successResultOf(self.backend.flush())
        with open(self.image, "rb") as f:
            self.assertEqual(f.read(), self.model)

    def test_zero(self) -> None:
        """
        Zeroing, sparse or not, with ZERO_RANGE or with BLKZEROOUT, clears
        exactly the range, unaligned edges included.
        """
        cases = [(1, 510, False, True), (4095, 3 * 4096 + 2, True, True)]
        cases += [(MiB + 7, MiB, False, False), (3 * MiB, 4096, True, False)]
        for offset, length, sparse, canFallocate in cases:
            self.backend.sparse = sparse
            self.backend._canFallocate = canFallocate
            self.successResultOf(self.backend.zero(offset, length))
            applyModel(self.model, offset, bytes(length))
        self.assertEqual(readBack(self, self.backend, 0, self.size), self.model)

    def test_extents(self) -> None:
        """
        A block device is one data extent, clipped to the window.
        """
        self.assertEqual(
            self.successResultOf(self.backend.extents("zero", 4096, 1 << 40)),
            [Extent(4096, self.size - 4096, zero=False)],
        )

    def test_dirtyExtents(self) -> None:
        """
        Block devices have no dirty extents either, with upstream's message.
        """
        d = self.backend.extents("dirty", 0, 1)
        failure = self.failureResultOf(d, UnsupportedOperation)
        self.assertEqual(str(failure.value), "Backend file does not support dirty extents")

    def test_writePastEnd(self) -> None:
        """
        A write past the end of the device fails and does not grow it.
        """
        d = self.backend.write(self.size - 1, memoryview(b"xy"))
        self.failureResultOf(d, OSError)
        self.assertEqual(self.successResultOf(self.backend.size()), self.size)

    def test_randomOperations(self) -> None:
        """
        Random writes, zeroes and reads match a byte-array model.
        """
        checkRandomOperations(self, self.backend, self.model, seed=3, count=100, grow=False)


class BlockDevice512Tests(_BlockDeviceTestsMixin, SynchronousTestCase):
    """
    Loop device with 512-byte sectors.
    """


class BlockDevice4096Tests(_BlockDeviceTestsMixin, SynchronousTestCase):
    """
    Loop device with 4096-byte sectors (checklist B.16).
    """

    sectorSize = 4096


class BlockDevice4096AIOTests(BlockDevice4096Tests):
    """
    Loop device with 4096-byte sectors, through the AIO engine.
    """

    useAIO = True


class NoSpaceTests(SynchronousTestCase):
    """
    A full file system (checklist H.41).
    """

    def setUp(self) -> None:
        requireRoot()
        self.dir = tempfile.mkdtemp(prefix="imageio-enospc-")
        self.addCleanup(os.rmdir, self.dir)
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", self.dir],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if result.returncode != 0:
            raise SkipTest(f"Cannot mount a small tmpfs: {result.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", self.dir], check=False, timeout=30)
        self.path = writeFile(os.path.join(self.dir, "img"))

    def test_writeNoSpace(self) -> None:
        """
        Writing more than the file system holds fails with ENOSPC; the
        backend still closes.
        """
        backend = openSync(self, self.path)
        view = memoryview(_buffers.allocate(4 * MiB))
        d = backend.write(0, view)
        self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.ENOSPC)
        d = backend.write(3 * MiB + 1, memoryview(b"x" * 5000))
        self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.ENOSPC)
        self.assertIsNone(self.successResultOf(backend.close()))

    def test_zeroNoSpace(self) -> None:
        """
        Allocating zeroes beyond the free space fails with ENOSPC, while a
        sparse zero of the same range needs no space.
        """
        backend = openSync(self, self.path)
        d = backend.zero(0, 4 * MiB)
        self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.ENOSPC)
        sparse = openSync(self, self.path, sparse=True)
        self.assertIsNone(self.successResultOf(sparse.zero(0, 8 * MiB)))
        self.assertEqual(os.path.getsize(self.path), 8 * MiB)


class ThreadPoolTests(TestCase):
    """
    The backend on a real disk-io thread pool.
    """

    def setUp(self) -> None:
        from twisted.internet import reactor

        pool = createPool(cast(IReactorFromThreads, reactor), 4)
        pool.start()
        self.addCleanup(pool.stop)
        self.ctx = BackendContext(reactor=reactor, diskio=DiskIO(pool))

    async def roundTrip(self, path: str, chunk: int, total: int) -> None:
        backend = await openBackend(
            self.ctx, "file://" + path, write=True, sparse=False, dirty=False
        )
        rng = random.Random(5)
        buf = memoryview(_buffers.allocate(chunk))
        expected = []
        for offset in range(0, total, chunk):
            buf[:] = rng.randbytes(chunk)
            expected.append(bytes(buf))
            self.assertEqual(await backend.write(offset, buf), chunk)
        await backend.flush()
        for i, offset in enumerate(range(0, total, chunk)):
            self.assertEqual(await backend.readInto(offset, buf), chunk)
            self.assertTrue(buf == expected[i], f"chunk {i} differs")
        self.assertEqual(await backend.size(), total)
        await backend.close()

    def test_writeAndReadBack(self) -> Deferred[None]:
        """
        32 MiB written in 8 MiB chunks from pool threads read back the same.
        """
        path = writeFile(self.mktemp())
        return Deferred.fromCoroutine(self.roundTrip(path, 8 * MiB, 32 * MiB))

    def test_closeDuringOperation(self) -> Deferred[None]:
        """
        Closing while a write runs on a pool thread waits for it.
        """
        path = writeFile(self.mktemp(), size=8 * MiB)

        async def run() -> None:
            backend = await openBackend(
                self.ctx, "file://" + path, write=True, sparse=False, dirty=False
            )
            buf = memoryview(_buffers.allocate(8 * MiB))
            buf[:] = b"z" * len(buf)
            write = backend.write(0, buf)
            await backend.close()
            self.assertEqual(await write, 8 * MiB)
            with open(path, "rb") as f:
                self.assertEqual(f.read(), bytes(buf))

        return Deferred.fromCoroutine(run())

    def test_concurrentUnalignedWriters(self) -> Deferred[None]:
        """
        Connections writing disjoint bytes that share blocks, at the same
        time from several pool threads, do not undo each other's writes
        (checklist G.35).
        """
        path = writeFile(self.mktemp(), size=4096)
        writers = 4

        async def write(backend: IBackend, i: int) -> None:
            for offset in range(i, 4096, writers):
                await backend.write(offset, memoryview(bytes([i + 1])))

        async def run() -> None:
            backends = []
            for _ in range(writers):
                backends.append(
                    await openBackend(
                        self.ctx, "file://" + path, write=True, sparse=False, dirty=False
                    )
                )
            await gatherResults(
                [Deferred.fromCoroutine(write(b, i)) for i, b in enumerate(backends)]
            )
            for backend in backends:
                await backend.close()
            with open(path, "rb") as f:
                self.assertEqual(f.read(), bytes(i % writers + 1 for i in range(4096)))

        return Deferred.fromCoroutine(run())
