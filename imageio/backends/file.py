# -*- test-case-name: tests.test_backend_file -*-
"""
The C{file:} backend: images in regular files and on block devices.

The image is opened with C{O_DIRECT} so transfers bypass the page cache;
when the file system refuses it, the backend falls back to buffered I/O.
Every system call on the image runs on the disk-io pool, except aligned
direct reads and writes, which go through the AIO engine (L{imageio._aio})
when the daemon has one and fall back to the pool where the kernel would
block. On tmpfs, where AIO completes inside C{io_submit} (a memory copy on
the reactor thread), only reads up to L{SYNC_AIO_MAX_READ} go through the
engine. Unaligned requests go through a per-backend bounce buffer
(read-modify-write of whole blocks for writes), so callers need not know
the block size. Writes and zeroes that touch the same blocks of an image,
from any connection, take turns (L{_ImageWrites}), so that a
read-modify-write never undoes another writer's bytes.

Unlike upstream, C{extents} reports the holes of sparse files (from
C{SEEK_DATA}/C{SEEK_HOLE}), so clients can skip them.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat
import struct
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, ParamSpec, TypeVar, cast
from urllib.parse import urlsplit

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from imageio import _aio
from imageio._aio import fileSystemType
from imageio._buffers import allocate
from imageio.backends import MAX_EXTENTS
from imageio.interfaces import (
    Extent,
    IBackend,
    IReadIntoThen,
    ISpliceSource,
    UnsupportedOperation,
)

if TYPE_CHECKING:
    from imageio._aio import AIOEngine
    from imageio._diskio import DiskIO, SynchronousDiskIO
    from imageio.backends import BackendContext

P = ParamSpec("P")
T = TypeVar("T")

#: Told the outcome (result or Failure) of a claimed operation's storage
#: call when it really returned.
_Finished = Callable[[object], None]
#: Takes a read's outcome: the bytes read, or a L{Failure}
#: (L{IReadIntoThen}).
ReadOutcome = Callable[[int | Failure], object]

log = Logger()

#: Largest range one C{zero} pool call handles; a long zero is split so
#: close and cancellation act between steps and no thread is held for long.
ZERO_STEP = 128 * 1024**2

#: AIO requests in a row the kernel may refuse with EAGAIN (it would have
#: waited) before a backend stops trying AIO and uses the pool only.
AIO_MAX_REFUSALS = 64

#: Largest read given to the AIO engine on a file system where AIO completes
#: inside C{io_submit} (tmpfs: direct I/O there is a memory copy, made on
#: the calling thread, the reactor's). 64 KiB is the most one reactor socket
#: send moves anyway: its copy costs 5-10 us on this kind of machine against
#: 60-100 us CPU and a cross-CPU wake-up for the disk-io pool's round trip. A
#: 4 MiB read would hold the reactor for 0.5-5 ms, so larger reads, and all
#: writes (which may allocate pages), stay on the pool there.
SYNC_AIO_MAX_READ = 64 * 1024

#: Size of the bounce buffer for unaligned or misaligned-memory I/O.
BOUNCE_SIZE = 1024**2

#: Size of the shared buffer of zeroes written when fallocate cannot zero.
ZERO_BUFFER_SIZE = 1024**2

# splice(2) into a pipe without waiting for room in it.
_SPLICE_FLAGS = getattr(os, "SPLICE_F_NONBLOCK", 2) | getattr(os, "SPLICE_F_MOVE", 1)

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

#: C{_IO(0x12, 104)}: logical sector size of a block device.
BLKSSZGET = 0x1268
#: C{_IO(0x12, 127)}: zero a byte range of a block device.
BLKZEROOUT = 0x127F

# fallocate() modes a file system or kernel may not support; anything else
# (ENOSPC, EIO) is a real error.
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.ENODEV})

# AIO errors after which the request is done on the pool: the kernel would
# have blocked, cannot do it asynchronously, or the engine stopped.
_AIO_FALLBACK = frozenset(
    {errno.EAGAIN, errno.EOPNOTSUPP, errno.EINVAL, errno.ECANCELED, errno.ESHUTDOWN}
)

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate = _libc.fallocate64 if hasattr(_libc, "fallocate64") else _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_fallocate.restype = ctypes.c_int

#: C{f_type} of pseudo file systems (C{linux/magic.h}) whose "files" are
#: kernel or process state, never images: C{file:///proc/self/mem} would
#: serve the daemon's memory.
PSEUDO_FILE_SYSTEMS = {
    0x00009FA0: "proc",
    0x62656572: "sysfs",
    0x64626720: "debugfs",
    0x73636673: "securityfs",
    0x0027E0EB: "cgroup",
    0x63677270: "cgroup2",
    0x74726163: "tracefs",
    0xCAFE4A11: "bpf",
    0x6165676C: "pstore",
    0xDE5E81E4: "efivarfs",
    0x62656570: "configfs",
    0xF97CFF8C: "selinuxfs",
    0x43415D53: "smackfs",
    0x65735543: "fusectl",
    0x42494E4D: "binfmt_misc",
    0x6E736673: "nsfs",
    0x19800202: "mqueue",
    0x09041934: "anon_inode",
    0x00001CD1: "devpts",
    0xABBA1974: "xenfs",
    0x07655821: "resctrl",
    0x00009FA2: "usbdevfs",
    0x00000187: "autofs",
}


#: Footprint end of an operation that may cut the file short (C{ftruncate}
#: at the end of file): it must not run beside any later writer.
_TO_END = 2**63


@define(eq=False)
class _Footprint:
    """
    The blocks one write or zero may rewrite, C{[start, end)}, while it is
    waiting or in flight.
    """

    start: int
    end: int
    #: Fires when the operation may start; C{None} if it started at once.
    ready: Deferred[None] | None = None


@define(eq=False)
class _ImageWrites:
    """
    The writes and zeroes in flight on one image, shared by every backend
    open on it in this process; only the reactor thread touches it.

    An operation may rewrite bytes outside its own range: an unaligned
    direct write or zero merges whole edge blocks (read, modify, write
    back), and an unaligned write past the end of file trims the block it
    wrote back. So that no other writer's acknowledged bytes are undone,
    each operation first claims its footprint: its range widened to whole
    blocks, or to the end of the image where it may trim the file. An
    operation whose footprint overlaps one in flight, or one waiting before
    it, waits its turn (without blocking the reactor), in order of arrival.
    Disjoint aligned writes, the usual parallel upload, never wait.

    @ivar size: A lower bound of the file size: operations ending within it
        cannot trim the file (files only grow in this process).
    """

    active: list[_Footprint] = field(factory=list)
    waiting: list[_Footprint] = field(factory=list)
    size: int = 0

    def claim(self, start: int, end: int) -> _Footprint:
        """
        Claim C{[start, end)}; unless the claim is granted at once, its
        C{ready} fires when it is. Cancelling C{ready} withdraws the
        claim. A granted claim is held until L{release}.
        """
        fp = _Footprint(start, end)
        if _overlaps(fp, self.active) or _overlaps(fp, self.waiting):
            fp.ready = Deferred(lambda d: self._withdraw(fp))
            self.waiting.append(fp)
        else:
            self.active.append(fp)
        return fp

    def release(self, fp: _Footprint) -> None:
        self.active.remove(fp)
        if self.waiting:
            self._grant()

    def _withdraw(self, fp: _Footprint) -> None:
        self.waiting.remove(fp)
        self._grant()

    def _grant(self) -> None:
        granted: list[_Footprint] = []
        still: list[_Footprint] = []
        for fp in self.waiting:
            if _overlaps(fp, self.active) or _overlaps(fp, still):
                still.append(fp)
            else:
                self.active.append(fp)
                granted.append(fp)
        self.waiting = still
        # Only now: a granted operation may finish, and release, at once.
        for fp in granted:
            assert fp.ready is not None
            fp.ready.callback(None)


def _overlaps(fp: _Footprint, others: list[_Footprint]) -> bool:
    return any(o.start < fp.end and fp.start < o.end for o in others)


# Image identity -> its writes, for as long as a backend holds them.
_IMAGES: weakref.WeakValueDictionary[tuple[int, ...], _ImageWrites] = weakref.WeakValueDictionary()
_IMAGES_GUARD = threading.Lock()


def _imageWrites(st: os.stat_result) -> _ImageWrites:
    # Several device nodes may name one block device: key on st_rdev.
    key = (0, st.st_rdev) if stat.S_ISBLK(st.st_mode) else (1, st.st_dev, st.st_ino)
    with _IMAGES_GUARD:
        writes = _IMAGES.get(key)
        if writes is None:
            writes = _IMAGES[key] = _ImageWrites()
        return writes


class BackendClosed(Exception):
    """
    An operation was asked of a backend after C{close()}.
    """


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """
    Call C{fallocate(2)}, which the os module offers only without C{mode}.

    @raise OSError: With the errno of the failed call.
    """
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def parseURL(url: str) -> str:
    """
    @return: The absolute path named by a C{file:} URL.
    @raise ValueError: If C{url} is not a C{file:} URL of an absolute local
        path. The path is used as written, without percent-decoding, like
        upstream.
    """
    if any(c in url for c in "\t\r\n\0"):
        raise ValueError(f"Invalid characters in file URL: {url!r}")
    parts = urlsplit(url)
    if parts.scheme != "file":
        raise ValueError(f"Not a file URL: {url!r}")
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"File URL must not name a host: {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"File URL must not have a query or fragment: {url!r}")
    if not parts.path.startswith("/"):
        raise ValueError(f"File URL path must be absolute: {url!r}")
    return parts.path


def openBackend(
    ctx: BackendContext,
    url: str,
    *,
    write: bool,
    sparse: bool,
    dirty: bool,
    direct: bool = True,
) -> Deferred[IBackend]:
    """
    Open the file or block device named by C{url}. The file is never
    created.

    @param dirty: Ignored: files have no dirty bitmap, so C{extents("dirty")}
        fails.
    @param direct: Try C{O_DIRECT}; C{False} forces buffered I/O.
    @return: A Deferred firing with a L{FileBackend}, or failing with
        C{ValueError} for a bad URL or C{OSError} if the open failed.
    """
    try:
        path = parseURL(url)
    except ValueError:
        return fail()
    result: Deferred[IBackend] = Deferred()

    def opened(o: _Opened) -> None:
        if result.called:
            # The caller cancelled while the pool opened the file.
            ctx.diskio.run(os.close, o.fd)
            return
        backend = FileBackend(
            name="block" if o.isBlock else "file",
            blockSize=o.blockSize,
            maxReaders=ctx.maxConnections,
            maxWriters=ctx.maxConnections if o.isBlock else 1,
            path=path,
            diskio=ctx.diskio,
            fd=o.fd,
            writable=write,
            sparse=sparse,
            direct=o.direct,
            isBlock=o.isBlock,
            writes=o.writes,
            aio=ctx.aio if o.direct else None,
            # On tmpfs a direct read or write is a memory copy done inside
            # io_submit, on the reactor thread, for as long as the copy
            # takes: only small reads go there, larger ones and writes to
            # the pool.
            aioSyncMax=SYNC_AIO_MAX_READ if o.memoryFS else None,
        )
        if not o.isBlock:
            o.writes.size = max(o.writes.size, o.size)
        log.info(
            "Open backend {name} path={path} write={write} sparse={sparse} "
            "direct={direct} blockSize={blockSize} engine={engine}",
            name=backend.name,
            path=path,
            write=write,
            sparse=sparse,
            direct=o.direct,
            blockSize=o.blockSize,
            engine=backend.engine,
        )
        result.callback(backend)

    ctx.diskio.run(_openPath, path, write, direct).addCallbacks(opened, result.errback)
    return result


@frozen
class _Opened:
    fd: int
    isBlock: bool
    blockSize: int
    direct: bool
    writes: _ImageWrites
    memoryFS: bool = False
    size: int = 0


def _openPath(path: str, write: bool, direct: bool) -> _Opened:
    """
    Open C{path} and find how to do I/O on it. Runs on the pool.
    """
    # O_NONBLOCK so that a FIFO cannot hang a pool thread before we reject
    # it; cleared again below.
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    fd = -1
    if direct:
        try:
            fd = os.open(path, flags | os.O_DIRECT)
        except OSError as e:
            # The file system does not do direct I/O (older tmpfs, some FUSE).
            if e.errno != errno.EINVAL:
                raise
            direct = False
    if fd < 0:
        fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not (stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise ValueError(f"Not a regular file or block device: {path}")
        # Checked on the open file, so no symlink or rename gets past it.
        fsType = fileSystemType(fd)
        pseudo = PSEUDO_FILE_SYSTEMS.get(fsType)
        if pseudo is not None:
            raise ValueError(f"Not an image: {path} is on a {pseudo} file system")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        if stat.S_ISBLK(st.st_mode):
            return _Opened(fd, True, _sectorSize(fd), direct, _imageWrites(st))
        blockSize = 1
        if direct:
            detected = _detectBlockSize(fd)
            if detected is None:
                # O_DIRECT was accepted but no read size works: go buffered.
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                direct = False
            else:
                blockSize = detected
        memoryFS = direct and fsType in _aio.MEMORY_FILE_SYSTEMS
        return _Opened(fd, False, blockSize, direct, _imageWrites(st), memoryFS, st.st_size)
    except BaseException:
        os.close(fd)
        raise


def _sectorSize(fd: int) -> int:
    """
    @return: The logical sector size of a block device, or 512 if the
        kernel will not say.
    """
    try:
        size: int = struct.unpack("I", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
    except OSError:
        return 512
    return size or 512


def _detectBlockSize(fd: int) -> int | None:
    """
    Find the smallest direct read that works, as upstream does.

    @return: 512 or 4096; 4096 when any size works (O_DIRECT ignored, as on
        NFS or an empty file, so we cannot tell); C{None} if nothing works.
    """
    buf = allocate(4096)
    view = memoryview(buf)
    try:
        for size in (1, 512, 4096):
            try:
                os.preadv(fd, [view[:size]], 0)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                continue
            return 4096 if size == 1 else size
        return None
    finally:
        view.release()
        buf.close()


def _roundUp(n: int, size: int) -> int:
    return (n + size - 1) // size * size


def _byteView(data: memoryview) -> memoryview:
    view = memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    return view


def _appendExtent(extents: list[Extent], start: int, stop: int, zero: bool) -> None:
    if stop <= start:
        return
    if extents and extents[-1].zero == zero and extents[-1].start + extents[-1].length == start:
        last = extents.pop()
        start = last.start
    extents.append(Extent(start, stop - start, zero=zero, hole=False))


@implementer(IBackend, ISpliceSource, IReadIntoThen)
@define
class FileBackend:
    """
    An open regular file or block device.

    Public methods run on the reactor thread; the methods they hand to the
    disk-io pool (C{_readInto}, C{_write}, ...) run on a pool thread and
    touch only the fd, the buffers and the capability flags.

    @ivar path: The image path, for logs and errors.
    @ivar writable: Opened for writing.
    @ivar sparse: C{zero} deallocates instead of allocating.
    @ivar direct: I/O bypasses the page cache (C{O_DIRECT}); offsets,
        lengths and memory of direct I/O must be aligned to C{blockSize}.
    @ivar isBlock: The image is a block device.
    @ivar engine: C{"aio"} while aligned direct I/O goes through the AIO
        engine, C{"aio-small-reads"} where only reads up to
        L{SYNC_AIO_MAX_READ} do (tmpfs), else C{"threads"}.
    """

    name: str
    blockSize: int
    maxReaders: int
    maxWriters: int
    path: str
    _diskio: DiskIO | SynchronousDiskIO
    _fd: int
    writable: bool
    sparse: bool
    direct: bool
    isBlock: bool
    # Writes and zeroes in flight on this image, from any backend.
    _writes: _ImageWrites
    # Aligned direct reads and writes go here first, if set.
    _aio: AIOEngine | None = None
    # Where AIO completes inside io_submit, on the reactor (tmpfs): only
    # reads up to this many bytes go to the engine, without RWF_NOWAIT
    # (refused there), and no writes. None: AIO is asynchronous here.
    _aioSyncMax: int | None = None
    # AIO requests refused with EAGAIN since the last one that went through.
    _aioRefusals: int = field(default=0, init=False)
    # Pool calls that have not returned yet; the fd outlives them.
    _inFlight: int = field(default=0, init=False)
    _closed: bool = field(default=False, init=False)
    _fdClosed: bool = field(default=False, init=False)
    _closeWaiters: list[Deferred[None]] = field(factory=list, init=False)
    # Free bounce buffers (normally one, allocated on first unaligned I/O).
    _bounces: list[memoryview] = field(factory=list, init=False)
    _zeroes: memoryview | None = field(default=None, init=False)
    # Cleared when the kernel or file system says no, so we do not ask again.
    _canZeroRange: bool = field(default=True, init=False)
    _canPunchHole: bool = field(default=True, init=False)
    _canFallocate: bool = field(default=True, init=False)
    _canSeekData: bool = field(default=True, init=False)

    @property
    def engine(self) -> str:
        if self._aio is None:
            return "threads"
        return "aio" if self._aioSyncMax is None else "aio-small-reads"

    @property
    def spliceAlignment(self) -> int | None:
        # Direct reads only: buffered ones would put page-cache pages in the
        # pipe, which a later write could change before they are sent.
        return self.blockSize if self.direct else None

    def spliceInto(self, offset: int, length: int, pipe: int) -> Deferred[int]:
        if not self.direct:
            return fail(UnsupportedOperation(f"Backend {self.name} is not direct: {self.path}"))
        if offset < 0 or length <= 0:
            return fail(ValueError(f"Invalid range: offset={offset} length={length}"))
        return self._run(self._spliceInto, offset, length, pipe)

    # IBackend

    def size(self) -> Deferred[int]:
        return self._run(os.lseek, self._fd, 0, os.SEEK_END)

    def readInto(self, offset: int, buf: memoryview) -> Deferred[int]:
        if offset < 0:
            return fail(ValueError(f"Negative offset: {offset}"))
        aio = self._aio
        if aio is not None and aio.running and not self._closed and self._aligned(offset, buf):
            limit = self._aioSyncMax
            # Where AIO completes inside io_submit (tmpfs), only a bounded
            # copy: no thread hop.
            if limit is None or buf.nbytes <= limit:
                d = self._submitAIO(
                    aio, _aio.IOCB_CMD_PREAD, offset, buf, limit is None, self._readInto
                )
                if d is not None:
                    return d
        return self._run(self._readInto, offset, buf)

    # IReadIntoThen

    def readIntoThen(self, offset: int, buf: memoryview, then: ReadOutcome) -> None:
        """
        L{readInto}, giving the outcome to C{then}: a small read through
        the AIO engine makes no Deferred (others still run on the pool).
        """
        if offset < 0:
            then(Failure(ValueError(f"Negative offset: {offset}")))
            return
        aio = self._aio
        bs = self.blockSize
        size = buf.nbytes
        # _aligned, inline.
        if (
            aio is not None
            and aio.running
            and not self._closed
            and not (offset % bs or size % bs)
            and size
        ):
            limit = self._aioSyncMax
            if limit is None or size <= limit:
                if self._submitAIOThen(
                    aio, _aio.IOCB_CMD_PREAD, offset, buf, limit is None, self._readInto, then
                ):
                    return
        self._run(self._readInto, offset, buf).addBoth(then)

    def write(self, offset: int, data: memoryview) -> Deferred[int]:
        if not self.writable:
            return fail(self._readOnly())
        if offset < 0:
            return fail(ValueError(f"Negative offset: {offset}"))
        if self._closed:
            return fail(self._closedError())
        end = offset + _byteView(data).nbytes
        if end == offset:
            return self._run(self._write, offset, data)
        bs = self.blockSize
        claim = self._claim(offset, end, trims=self.direct and end % bs != 0)

        def start(finished: _Finished) -> Deferred[int]:
            aio = self._aio if self._aioSyncMax is None else None
            if aio is not None and aio.running and not self._closed and self._aligned(offset, data):
                d = self._submitAIO(
                    aio, _aio.IOCB_CMD_PWRITE, offset, data, True, self._write, finished
                )
                if d is not None:
                    return d
            return self._runThen(finished, self._write, offset, data)

        return self._whenGranted(claim, end, start)

    def zero(self, offset: int, length: int) -> Deferred[None]:
        """
        Zero in steps of at most L{ZERO_STEP} bytes, one pool call each.
        Closing the backend, or cancelling the returned Deferred, stops the
        zero after the step in flight.
        """
        if self._closed:
            return fail(self._closedError())
        if not self.writable:
            return fail(self._readOnly())
        if offset < 0 or length < 0:
            return fail(ValueError(f"Invalid range: offset={offset} length={length}"))
        return Deferred.fromCoroutine(self._zeroSteps(offset, length))

    def flush(self) -> Deferred[None]:
        return self._run(os.fsync, self._fd)

    def extents(self, context: str, start: int, length: int) -> Deferred[list[Extent]]:
        """
        Describe the window from C{SEEK_DATA}/C{SEEK_HOLE}: holes read as
        zeroes (C{zero=True}), everything else is data. Block devices, and
        file systems without C{SEEK_DATA}, report one data extent.

        At most L{MAX_EXTENTS} extents are returned per call; if the window
        is more fragmented than that, the extents cover only its start and
        the caller asks again from where they end.
        """
        if context != "zero":
            # Upstream's text, which says "file" for block devices too.
            return fail(UnsupportedOperation(f"Backend file does not support {context} extents"))
        if start < 0 or length < 0:
            return fail(ValueError(f"Invalid range: start={start} length={length}"))
        return self._run(self._extents, start, length)

    def close(self) -> Deferred[None]:
        if self._fdClosed:
            return succeed(None)
        if not self._closed:
            log.info("Close backend {name} path={path}", name=self.name, path=self.path)
            self._closed = True
        d: Deferred[None] = Deferred()
        self._closeWaiters.append(d)
        if self._inFlight == 0:
            self._closeFd()
        return d

    # Reactor-side plumbing

    def _run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        """
        Run C{fn} on the pool, counting it as in flight until it returns.

        The caller gets its own Deferred: cancelling it does not pretend the
        thread stopped, so the fd stays open until the call really returns.
        """
        return self._runThen(None, fn, *args, **kwargs)

    def _runThen(
        self,
        finished: _Finished | None,
        fn: Callable[P, T],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> Deferred[T]:
        """
        L{_run}, calling C{finished} with the outcome when the call really
        returned (or at once, if the backend is closed).
        """
        if self._closed:
            failure = Failure(self._closedError())
            if finished is not None:
                finished(failure)
            return fail(failure)
        self._inFlight += 1
        return self._untilReturned(self._diskio.run(fn, *args, **kwargs), finished)

    def _untilReturned(self, call: Deferred[T], finished: _Finished | None) -> Deferred[T]:
        """
        Once C{call}, already counted in flight, really returned: stop
        counting it, tell C{finished}, and close the fd if the backend was
        closed meanwhile.

        @return: C{call}'s outcome in a Deferred of its own, whose
            cancelling leaves C{call} (and the fd) alone.
        """
        result: Deferred[T] = Deferred()

        def done(r: T | Failure) -> T | Failure:
            self._returned(r, finished)
            return r

        call.addBoth(done).chainDeferred(result)
        return result

    def _returned(self, r: object, finished: _Finished | None) -> None:
        """
        A storage call counted in flight really returned with C{r}: stop
        counting it, tell C{finished}, and close the fd if the backend was
        closed meanwhile.
        """
        self._inFlight -= 1
        if finished is not None:
            finished(r)
        if self._closed and self._inFlight == 0:
            self._closeFd()

    def _claim(self, offset: int, end: int, trims: bool) -> _Footprint:
        """
        Claim the blocks C{[offset, end)} touches on the image, or all from
        the first one to the end of the image if the operation C{trims}
        (may set the file size) and may reach past the end of file.
        """
        bs = self.blockSize
        stop = _roundUp(end, bs)
        if trims and not self.isBlock and stop > self._writes.size:
            stop = _TO_END
        return self._writes.claim(offset - offset % bs, stop)

    def _whenGranted(
        self, claim: _Footprint, end: int, start: Callable[[_Finished], Deferred[T]]
    ) -> Deferred[T]:
        """
        Call C{start} once C{claim} is granted, with a function that its
        storage call must call when it really returned; that releases the
        claim. Cancelling the result while waiting withdraws the claim.

        @param end: Where the operation ends: the file is at least that
            long once it succeeded.
        """
        writes = self._writes
        held = [True]

        def finished(r: object) -> None:
            if not held:
                return
            held.clear()
            if not isinstance(r, Failure) and not self.isBlock and end > writes.size:
                writes.size = end
            writes.release(claim)

        def begin(_: object = None) -> Deferred[T]:
            try:
                return start(finished)
            except BaseException:
                # Never leave the blocks claimed: everyone would wait.
                failure = Failure()
                finished(failure)
                return fail(failure)

        if claim.ready is None:
            return begin()
        return cast("Deferred[T]", claim.ready.addCallback(begin))

    def _aligned(self, offset: int, buf: memoryview) -> bool:
        bs = self.blockSize
        return offset % bs == 0 and buf.nbytes % bs == 0 and buf.nbytes > 0

    def _submitAIO(
        self,
        aio: AIOEngine,
        opcode: int,
        offset: int,
        buf: memoryview,
        nowait: bool,
        fn: Callable[[int, memoryview], int],
        finished: _Finished | None = None,
    ) -> Deferred[int] | None:
        """
        L{_submitAIOThen}, with the outcome in the one Deferred of the
        request, which the caller may cancel without the fd closing under
        the kernel.

        @return: That Deferred; C{None} if the engine does not take C{buf},
            and nothing was started.
        """
        result: Deferred[int] = Deferred()
        # A Failure given to callback is an errback.
        if not self._submitAIOThen(aio, opcode, offset, buf, nowait, fn, result.callback, finished):
            return None
        return result

    def _submitAIOThen(
        self,
        aio: AIOEngine,
        opcode: int,
        offset: int,
        buf: memoryview,
        nowait: bool,
        fn: Callable[[int, memoryview], int],
        then: ReadOutcome,
        finished: _Finished | None = None,
    ) -> bool:
        """
        Give an aligned read or write to the AIO engine, counted in flight
        like a pool call until it completes; where the kernel would block
        (C{EAGAIN}) or cannot do it (C{EOPNOTSUPP}, C{EINVAL}: no
        non-blocking or no asynchronous I/O on this file, or memory
        alignment stricter than the block size), do it with C{fn} on the
        pool instead.

        @param then: Called once with the outcome (bytes moved, or a
            L{Failure}) once the fd may be closed, maybe before this
            returns.
        @return: Whether the request was started; if not (the engine does
            not take C{buf}), C{then} is never called.
        """

        def returned(r: int | Failure) -> None:
            self._returned(r, finished)
            then(r)

        def completed(r: int | Failure) -> None:
            if r.__class__ is not Failure:
                self._aioRefusals = 0
            elif self._aioFallBack(r):  # type: ignore[arg-type]
                # The fd stays open: this call is still counted in flight.
                self._diskio.run(fn, offset, buf).addBoth(returned)
                return
            self._returned(r, finished)
            then(r)

        view = buf if buf.ndim == 1 and buf.itemsize == 1 else _byteView(buf)
        self._inFlight += 1
        if not aio.submit(opcode, self._fd, view, offset, self.blockSize, nowait, completed):
            self._inFlight -= 1
            return False
        return True

    def _aioFallBack(self, f: Failure) -> bool:
        """
        Whether the AIO request that failed with C{f} should be done on the
        pool; stop using AIO where the file cannot do it, or the device
        never takes a request without waiting (a queue without nowait
        support).
        """
        code = f.value.errno if isinstance(f.value, OSError) else None
        if code not in _AIO_FALLBACK:
            return False
        if code == errno.EAGAIN:
            self._aioRefusals += 1
        if self._aio is not None and (
            code in (errno.EOPNOTSUPP, errno.EINVAL) or self._aioRefusals >= AIO_MAX_REFUSALS
        ):
            why = f.getErrorMessage()
            if code == errno.EAGAIN:
                why = f"{self._aioRefusals} requests in a row would have waited"
            log.info(
                "Backend {name} path={path}: no asynchronous I/O here ({error}), "
                "using the disk-io threads",
                name=self.name,
                path=self.path,
                error=why,
            )
            self._aio = None
        return True

    async def _zeroSteps(self, offset: int, length: int) -> None:
        pos, end = offset, offset + length
        while pos < end:
            # Step ends on block boundaries, so only the first and last
            # steps have unaligned edges.
            bs = self.blockSize
            stop = min(end, max(pos + bs - pos % bs, (pos + ZERO_STEP) // bs * bs))
            # A sparse zero extends a file with ftruncate; an unaligned end
            # may trim the block written back.
            claim = self._claim(pos, stop, trims=self.sparse or stop % bs != 0)

            def start(finished: _Finished, pos: int = pos, stop: int = stop) -> Deferred[None]:
                return self._runThen(finished, self._zeroRange, pos, stop - pos)

            await self._whenGranted(claim, stop, start)
            pos = stop

    def _closeFd(self) -> None:
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1

        def closed(r: object) -> None:
            self._fdClosed = True
            waiters, self._closeWaiters = self._closeWaiters, []
            for w in waiters:
                if isinstance(r, Failure):
                    w.errback(r)
                else:
                    w.callback(None)

        self._diskio.run(os.close, fd).addBoth(closed)

    def _closedError(self) -> BackendClosed:
        return BackendClosed(f"Backend {self.name} is closed: {self.path}")

    def _readOnly(self) -> UnsupportedOperation:
        return UnsupportedOperation(f"Backend {self.name} was opened read-only: {self.path}")

    # Pool-side work

    def _spliceInto(self, offset: int, length: int, pipe: int) -> int:
        done = 0
        while done < length:
            try:
                n = os.splice(
                    self._fd, pipe, length - done, offset_src=offset + done, flags=_SPLICE_FLAGS
                )
            except BlockingIOError:
                # The pipe is full.
                break
            if n == 0:
                raise EOFError(f"Image {self.path} ends at {offset + done}")
            done += n
            if (offset + done) % self.blockSize:
                # A direct read stopping inside a block stopped at the end
                # of the image; the bytes before it are in the pipe.
                if done < length:
                    raise EOFError(f"Image {self.path} ends at {offset + done}")
                break
        return done

    def _readInto(self, offset: int, buf: memoryview) -> int:
        view = _byteView(buf)
        if not self.direct or not view:
            return self._preadFull(offset, view)
        bs = self.blockSize
        end = offset + len(view)
        head = min(end, _roundUp(offset, bs))
        tail = max(head, end - end % bs)
        if tail == head:
            # Nothing aligned to read in place.
            return self._readBounced(offset, view)
        done = 0
        if head > offset:
            done = self._readBounced(offset, view[: head - offset])
            if done < head - offset:
                return done
        try:
            n = self._preadFull(head, view[head - offset : tail - offset])
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # The memory is not aligned for O_DIRECT (asking the address
            # first costs more than this rare failed call).
            return done + self._readBounced(head, view[head - offset :])
        done += n
        if n == tail - head and end > tail:
            done += self._readBounced(tail, view[tail - offset :])
        return done

    def _write(self, offset: int, data: memoryview) -> int:
        view = _byteView(data)
        if not self.direct or not view:
            self._pwriteFull(offset, view)
            return len(view)
        bs = self.blockSize
        end = offset + len(view)
        head = min(end, _roundUp(offset, bs))
        tail = max(head, end - end % bs)
        if tail == head:
            self._writeBounced(offset, view)
            return len(view)
        if head > offset:
            self._writeBounced(offset, view[: head - offset])
        try:
            self._pwriteFull(head, view[head - offset : tail - offset])
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # Memory not aligned for O_DIRECT: O_DIRECT fails before
            # writing anything.
            self._writeBounced(head, view[head - offset :])
            return len(view)
        if end > tail:
            self._writeBounced(tail, view[tail - offset :])
        return len(view)

    def _preadFull(self, offset: int, view: memoryview) -> int:
        """
        Read into all of C{view} unless the file ends first.
        """
        done = 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], offset + done)
            if n == 0:
                break
            done += n
            if self.direct and (offset + done) % self.blockSize:
                # A direct read stopping inside a block stopped at EOF.
                break
        return done

    def _pwriteFull(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            n = os.pwritev(self._fd, [view[done:]], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"Write made no progress at offset {offset + done}")
            done += n
            if self.direct and done < len(view) and (offset + done) % self.blockSize:
                raise OSError(errno.EIO, f"Unaligned short direct write at {offset + done}")

    def _readBounced(self, offset: int, view: memoryview) -> int:
        """
        Read whole blocks into the bounce buffer and copy out the part
        asked for.
        """
        bs = self.blockSize
        bounce = self._takeBounce()
        try:
            done, length = 0, len(view)
            while done < length:
                pos = offset + done
                start = pos - pos % bs
                skip = pos - start
                want = min(length - done, len(bounce) - skip)
                got = self._preadFull(start, bounce[: _roundUp(skip + want, bs)])
                n = max(0, min(want, got - skip))
                view[done : done + n] = bounce[skip : skip + n]
                done += n
                if n < want:
                    break
            return done
        finally:
            self._giveBounce(bounce)

    def _writeBounced(self, offset: int, view: memoryview) -> None:
        """
        Write C{view} through the bounce buffer, reading the blocks it only
        partly covers first so that their other bytes stay intact.

        A partial last block beyond the end of a file makes the file a whole
        block longer than the data; we truncate it back to where the data
        (or the old end of file, if later) ends, unless another writer has
        grown the file further meanwhile.
        """
        bs = self.blockSize
        bounce = self._takeBounce()
        try:
            end = offset + len(view)
            pos = offset
            while pos < end:
                start = pos - pos % bs
                stop = min(end, start + len(bounce))
                spanEnd = _roundUp(stop, bs)
                if pos == start and stop == spanEnd:
                    # Whole blocks: nothing to merge.
                    bounce[: stop - start] = view[pos - offset : stop - offset]
                    self._pwriteFull(start, bounce[: stop - start])
                else:
                    self._mergeBlocks(bounce, view[pos - offset : stop - offset], pos)
                pos = stop
        finally:
            self._giveBounce(bounce)

    def _mergeBlocks(self, bounce: memoryview, data: memoryview, pos: int) -> None:
        """
        Write C{data} at C{pos} (fitting in C{bounce}) merged into the blocks
        it partly covers. The caller's claim on the image's writes covers
        those blocks (and the end of file, if it may trim the file).
        """
        bs = self.blockSize
        start = pos - pos % bs
        stop = pos + len(data)
        spanEnd = _roundUp(stop, bs)
        # Where the file ended, if reading an edge block ran into EOF.
        eof: int | None = None
        if pos > start:
            eof = self._readBlock(bounce, 0, start, eof)
        last = spanEnd - bs
        if stop < spanEnd and not (pos > start and last == start):
            eof = self._readBlock(bounce, last - start, last, eof)
        bounce[pos - start : stop - start] = data
        self._pwriteFull(start, bounce[: spanEnd - start])
        if eof is not None and not self.isBlock and spanEnd > max(eof, stop):
            if os.fstat(self._fd).st_size == spanEnd:
                os.ftruncate(self._fd, max(eof, stop))

    def _readBlock(self, bounce: memoryview, at: int, offset: int, eof: int | None) -> int | None:
        """
        Read the block at C{offset} into C{bounce[at:]}, zero-padding past
        EOF.

        @return: The lowest end of file seen so far, or C{None} if none.
        """
        bs = self.blockSize
        got = self._preadFull(offset, bounce[at : at + bs])
        if got == bs:
            return eof
        bounce[at + got : at + bs] = self._zeroView()[: bs - got]
        return offset + got if eof is None else min(eof, offset + got)

    def _zeroRange(self, offset: int, length: int) -> None:
        bs = self.blockSize
        end = offset + length
        head = min(end, _roundUp(offset, bs))
        tail = max(head, end - end % bs)
        # fallocate and BLKZEROOUT want whole blocks on block devices; on
        # files we keep the edges on the same read-modify-write path.
        if head > offset:
            self._writeBounced(offset, self._zeroView()[: head - offset])
        if tail > head:
            if self.isBlock:
                self._zeroBlockDevice(head, tail - head)
            elif self.sparse:
                self._zeroSparse(head, tail - head)
            else:
                self._zeroAllocated(head, tail - head)
        if end > tail:
            self._writeBounced(tail, self._zeroView()[: end - tail])

    def _zeroBlockDevice(self, offset: int, length: int) -> None:
        # ZERO_RANGE also drops stale page cache; BLKZEROOUT is the
        # fallback for kernels before 4.9. Sparse is treated alike, as
        # upstream does: discard is not guaranteed to read back as zeroes.
        if self._canFallocate:
            if self._tryFallocate(FALLOC_FL_ZERO_RANGE, offset, length):
                return
            self._canFallocate = False
        fcntl.ioctl(self._fd, BLKZEROOUT, struct.pack("QQ", offset, length))

    def _zeroSparse(self, offset: int, length: int) -> None:
        end = offset + length
        size = os.fstat(self._fd).st_size
        if end > size:
            # Extending leaves a hole; only the old part needs punching.
            os.ftruncate(self._fd, end)
            end = max(offset, size)
        if end == offset:
            return
        if self._canPunchHole:
            if self._tryFallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, end - offset):
                return
            self._canPunchHole = False
        self._writeZeroes(offset, end - offset)

    def _zeroAllocated(self, offset: int, length: int) -> None:
        if self._canZeroRange:
            if self._tryFallocate(FALLOC_FL_ZERO_RANGE, offset, length):
                return
            self._canZeroRange = False
        # Punch then allocate, as qemu does where ZERO_RANGE is missing
        # (NFS 4.2, tmpfs).
        if self._canPunchHole and self._canFallocate:
            if self._tryFallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length):
                if self._tryFallocate(0, offset, length):
                    return
                self._canFallocate = False
            else:
                self._canPunchHole = False
        if self._canFallocate and offset >= os.fstat(self._fd).st_size:
            # Past EOF there is nothing to clear, only space to allocate.
            if self._tryFallocate(0, offset, length):
                return
            self._canFallocate = False
        self._writeZeroes(offset, length)

    def _tryFallocate(self, mode: int, offset: int, length: int) -> bool:
        """
        @return: C{False} if C{mode} is not supported here.
        @raise OSError: For other errors, such as C{ENOSPC}.
        """
        try:
            fallocate(self._fd, mode, offset, length)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            return False
        return True

    def _writeZeroes(self, offset: int, length: int) -> None:
        zeroes = self._zeroView()
        pos, end = offset, offset + length
        while pos < end:
            n = min(end - pos, len(zeroes))
            self._pwriteFull(pos, zeroes[:n])
            pos += n

    def _extents(self, start: int, length: int) -> list[Extent]:
        size = os.lseek(self._fd, 0, os.SEEK_END)
        end = min(start + length, size)
        extents: list[Extent] = []
        if start >= end:
            return extents
        if self.isBlock or not self._canSeekData:
            _appendExtent(extents, start, end, zero=False)
            return extents
        pos = start
        while pos < end and len(extents) < MAX_EXTENTS:
            try:
                data = os.lseek(self._fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    # No data after pos: a hole to EOF.
                    data = end
                elif e.errno == errno.EINVAL:
                    self._canSeekData = False
                    _appendExtent(extents, pos, end, zero=False)
                    return extents
                else:
                    raise
            if data > pos:
                stop = min(data, end)
                _appendExtent(extents, pos, stop, zero=True)
                pos = stop
                continue
            try:
                hole = os.lseek(self._fd, pos, os.SEEK_HOLE)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                hole = end
            # If the file changed under us and we made no progress, data
            # is the answer that never loses bytes.
            stop = min(hole, end) if hole > pos else end
            _appendExtent(extents, pos, stop, zero=False)
            pos = stop
        return extents

    # Buffers, shared by pool threads: list.pop and list.append are atomic.

    def _takeBounce(self) -> memoryview:
        try:
            return self._bounces.pop()
        except IndexError:
            size = _roundUp(max(BOUNCE_SIZE, 2 * self.blockSize), self.blockSize)
            return memoryview(allocate(size))

    def _giveBounce(self, bounce: memoryview) -> None:
        if not self._bounces:
            self._bounces.append(bounce)

    def _zeroView(self) -> memoryview:
        if self._zeroes is None:
            # Read-only, so nothing can dirty the zeroes we rely on.
            size = _roundUp(max(ZERO_BUFFER_SIZE, self.blockSize), self.blockSize)
            self._zeroes = memoryview(allocate(size)).toreadonly()
        return self._zeroes
