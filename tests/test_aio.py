# -*- test-case-name: tests.test_aio -*-
"""
Tests for L{imageio._aio}: the Linux AIO engine on real files with the real
reactor, and its handling of what the kernel may answer (C{EAGAIN} from
C{io_submit}, partial submits, short transfers, errors) with wrapped
syscalls.
"""

from __future__ import annotations

import ctypes
import errno
import os
import tempfile
from typing import Any, TypeVar

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from imageio import _aio, _buffers
from imageio._aio import AIOEngine, AIOService, AIOUnavailable, Syscalls

KiB = 1024


def directFile(case: SynchronousTestCase, data: bytes) -> int:
    """
    Write C{data} to a file in the trial temp directory and open it with
    C{O_DIRECT} for reading and writing.
    """
    path = os.path.abspath(case.mktemp())
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())
        # Cached pages make RWF_NOWAIT direct I/O say EAGAIN.
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        raise SkipTest(f"No O_DIRECT here: {e}") from None
    case.addCleanup(os.close, fd)
    return fd


_Engine = TypeVar("_Engine", bound=AIOEngine)


def startedEngine(case: SynchronousTestCase, engine: _Engine) -> _Engine:
    """
    C{engine}, started and stopped in cleanup; skips where the kernel
    forbids AIO.
    """
    try:
        engine.start()
    except AIOUnavailable as e:
        raise SkipTest(str(e)) from None
    case.addCleanup(engine.stop)
    return engine


class FlakySyscalls(Syscalls):
    """
    The real syscalls, except that C{io_submit} may fail with C{EAGAIN} or
    take fewer requests than asked, and completions may be reported short.
    """

    def __init__(self) -> None:
        super().__init__()
        self.eagains = 0
        self.submitAtMost: int | None = None
        self.shortOnce = False
        self.submits: list[int] = []

    def submit(self, ctx: int, count: int, pointers: Any) -> int:
        self.submits.append(count)
        if self.eagains and count:
            self.eagains -= 1
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        if self.submitAtMost is not None:
            count = min(count, self.submitAtMost)
        return super().submit(ctx, count, pointers)

    def getevents(self, ctx: int, minNr: int, events: Any, timeout: Any) -> int:
        n = super().getevents(ctx, minNr, events, timeout)
        if self.shortOnce and n and events[0].res > 4096:
            # Pretend the kernel stopped one block in; the engine must ask
            # for the rest (the bytes are read again, harmlessly).
            self.shortOnce = False
            events[0].res = 4096
        return n


class CountingSyscalls(Syscalls):
    """
    The real syscalls, counting C{io_getevents} calls.
    """

    getevents_ = 0

    def getevents(self, ctx: int, minNr: int, events: Any, timeout: Any) -> int:
        self.getevents_ += 1
        return super().getevents(ctx, minNr, events, timeout)


class FailingSetup(Syscalls):
    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code

    def setup(self, nr: int) -> int:
        raise OSError(self.code, os.strerror(self.code))


class EngineTests(TestCase):
    """
    Reads and writes through a real AIO context, completed by the real
    reactor through the eventfd.
    """

    def engine(self, **kw: Any) -> AIOEngine:
        return startedEngine(self, AIOEngine(reactor, **kw))

    async def test_readWrite(self) -> None:
        """
        A write from an aligned buffer lands in the file; a read into one
        returns it, without a copy through another buffer.
        """
        data = os.urandom(64 * KiB)
        fd = directFile(self, data)
        engine = self.engine()
        buf = memoryview(_buffers.allocate(64 * KiB))
        n = await engine.read(fd, buf, 0, 4096)  # type: ignore[misc]
        self.assertEqual(n, 64 * KiB)
        self.assertEqual(bytes(buf), data)
        buf[:4096] = b"w" * 4096
        n = await engine.write(fd, buf[:4096], 8192, 4096)  # type: ignore[misc]
        self.assertEqual(n, 4096)
        check = memoryview(_buffers.allocate(4096))
        self.assertEqual(await engine.read(fd, check, 8192, 4096), 4096)  # type: ignore[misc]
        self.assertEqual(bytes(check), b"w" * 4096)
        self.assertEqual(engine.inFlight, 0)

    async def test_completionFunctions(self) -> None:
        """
        L{AIOEngine.submitRead} and L{AIOEngine.submitWrite} give the
        outcome to a plain function, once, with no Deferred; one request's
        slot (its iocb) is reused by the next.
        """
        data = os.urandom(16 * KiB)
        fd = directFile(self, data)
        engine = self.engine()
        outcomes: list[object] = []
        waiting: list[Deferred[None]] = []

        def then(result: object) -> None:
            outcomes.append(result)
            waiting.pop().callback(None)

        def next() -> Deferred[None]:
            d: Deferred[None] = Deferred()
            waiting.append(d)
            return d

        buf = memoryview(_buffers.allocate(8 * KiB))
        completed = next()
        self.assertTrue(engine.submitRead(fd, buf, 8192, 4096, True, then))
        await completed
        self.assertEqual(bytes(buf), data[8192:])
        buf[:] = b"w" * 8192
        completed = next()
        self.assertTrue(engine.submitWrite(fd, buf, 0, 4096, then))
        await completed
        completed = next()
        self.assertTrue(engine.submitRead(9999, buf, 0, 4096, True, then))
        await completed
        self.assertEqual(outcomes[:2], [8 * KiB, 8 * KiB])
        failure = outcomes[2]
        assert isinstance(failure, Failure)
        self.assertEqual(failure.value.errno, errno.EBADF)
        self.assertEqual(len(engine._slots), 1)
        self.assertEqual(engine.inFlight, 0)
        with open(f"/proc/self/fd/{fd}", "rb") as f:
            self.assertEqual(f.read(8192), b"w" * 8192)

    async def test_completionRaises(self) -> None:
        """
        A completion function that raises is logged; the engine keeps
        watching its eventfd and completes the next request.
        """
        fd = directFile(self, os.urandom(8192))
        engine = self.engine()
        buf = memoryview(_buffers.allocate(4096))
        called: Deferred[None] = Deferred()

        def broken(result: object) -> None:
            called.callback(None)
            raise RuntimeError("completion bug")

        self.assertTrue(engine.submitRead(fd, buf, 0, 4096, True, broken))
        await called
        # Resumed inside the completion, before it raised: the next read
        # runs once it has.
        self.assertEqual(await engine.read(fd, buf, 4096, 4096), 4096)  # type: ignore[misc]
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertIn(engine, reactor.getReaders())

    def test_notTaken(self) -> None:
        """
        A request the engine cannot take (not running, read-only memory)
        is refused at once and its completion function never called.
        """
        fd = directFile(self, os.urandom(8192))
        engine = AIOEngine(reactor)
        calls: list[object] = []
        buf = memoryview(_buffers.allocate(4096))
        self.assertFalse(engine.submitRead(fd, buf, 0, 4096, True, calls.append))
        engine = self.engine()
        readOnly = memoryview(b"x" * 4096)
        self.assertFalse(engine.submitWrite(fd, readOnly, 0, 1, calls.append))
        self.assertFalse(engine.submitRead(fd, readOnly, 0, 1, True, calls.append))
        self.assertEqual(calls, [])
        self.assertEqual(engine.inFlight, 0)

    async def test_readShortAtEOF(self) -> None:
        """
        A read past the end of the file returns what there is.
        """
        data = os.urandom(10000)
        fd = directFile(self, data)
        engine = self.engine()
        buf = memoryview(_buffers.allocate(16 * KiB))
        # RWF_NOWAIT refuses a read through cached pages of the file.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        n = await engine.read(fd, buf, 0, 4096)  # type: ignore[misc]
        self.assertEqual(n, 10000)
        self.assertEqual(bytes(buf[:n]), data)
        n = await engine.read(fd, buf[:4096], 12288, 4096)  # type: ignore[misc]
        self.assertEqual(n, 0)

    async def test_tmpfsWithoutNowait(self) -> None:
        """
        On tmpfs the kernel refuses C{RWF_NOWAIT} (EOPNOTSUPP); a read
        without it (C{nowait=False}) completes, through the eventfd.
        """
        data = os.urandom(16 * KiB)
        fd = self.tmpfsFile(data)
        self.assertTrue(_aio.isMemoryFileSystem(fd))
        engine = self.engine()
        buf = memoryview(_buffers.allocate(4096))
        with self.assertRaises(OSError) as e:
            await engine.read(fd, buf, 4096, 4096)  # type: ignore[misc]
        self.assertEqual(e.exception.errno, errno.EOPNOTSUPP)
        n = await engine.read(fd, buf, 4096, 4096, nowait=False)  # type: ignore[misc]
        self.assertEqual(n, 4096)
        self.assertEqual(bytes(buf), data[4096:8192])

    def tmpfsFile(self, data: bytes) -> int:
        """
        C{data} in a file on tmpfs, opened with C{O_DIRECT} for reading.
        """
        if not os.access("/dev/shm", os.W_OK):
            raise SkipTest("No writable /dev/shm")
        fd, path = tempfile.mkstemp(dir="/dev/shm", prefix="imageio-test-")
        self.addCleanup(os.unlink, path)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
        except OSError as e:
            raise SkipTest(f"No O_DIRECT on tmpfs here: {e}") from None
        self.addCleanup(os.close, fd)
        return fd

    def test_reapReady(self) -> None:
        """
        A read the kernel completed inside C{io_submit} (tmpfs) is delivered
        by L{AIOEngine.reapReady}, with no poll, and the eventfd is drained
        with it; the next poll's C{doRead} makes no C{io_getevents}.
        """
        data = os.urandom(16 * KiB)
        fd = self.tmpfsFile(data)
        syscalls = CountingSyscalls()
        engine = startedEngine(self, AIOEngine(reactor, syscalls=syscalls))
        self.assertIsNotNone(engine._ring)
        before = syscalls.getevents_
        buf = memoryview(_buffers.allocate(4096))
        results: list[object] = []
        self.assertTrue(engine.submitRead(fd, buf, 8192, 4096, False, results.append))
        self.assertEqual(results, [])
        engine.reapReady()
        self.assertEqual(results, [4096])
        self.assertEqual(bytes(buf), data[8192:12288])
        self.assertEqual(engine.inFlight, 0)
        self.assertEqual(syscalls.getevents_, before + 1)
        self.assertRaises(BlockingIOError, os.eventfd_read, engine.fileno())
        # Nothing left: neither call reaps again.
        engine.reapReady()
        engine.doRead()
        self.assertEqual(syscalls.getevents_, before + 1)

    def test_ringOnlyFromRealSetup(self) -> None:
        """
        The ring is read only at the address the real C{io_setup} returned:
        a context from another C{setup} (a fake's) is never read.
        """

        class OtherSetup(Syscalls):
            def setup(self, nr: int) -> int:
                return super().setup(nr)

        engine = startedEngine(self, AIOEngine(reactor, syscalls=OtherSetup()))
        self.assertIsNone(engine._ring)
        # Without it, reapReady does nothing; the eventfd delivers.
        engine.reapReady()
        real = startedEngine(self, AIOEngine(reactor))
        ring = real._ring
        assert ring is not None
        self.assertEqual(ring.magic, _aio.AIO_RING_MAGIC)
        self.assertEqual(ring.head, ring.tail)

    def test_notMemoryFileSystem(self) -> None:
        """
        A file in the trial directory is not on tmpfs (unless it is).
        """
        fd = directFile(self, b"x" * 4096)
        buf = ctypes.create_string_buffer(256)
        self.assertEqual(_aio._libc.fstatfs(fd, buf), 0)
        onTmpfs = ctypes.c_long.from_buffer(buf).value == _aio.TMPFS_MAGIC
        self.assertEqual(_aio.isMemoryFileSystem(fd), onTmpfs)
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        self.assertFalse(_aio.isMemoryFileSystem(r))

    async def test_errorFromCompletion(self) -> None:
        """
        A request the kernel fails (a misaligned direct read) fails with
        L{OSError} and its errno.
        """
        fd = directFile(self, os.urandom(8192))
        engine = self.engine()
        buf = memoryview(_buffers.allocate(4096))
        with self.assertRaises(OSError) as e:
            await engine.read(fd, buf, 1, 1)  # type: ignore[misc]
        self.assertEqual(e.exception.errno, errno.EINVAL)

    async def test_errorFromSubmit(self) -> None:
        """
        A request io_submit refuses (a closed fd) fails alone; the requests
        behind it still run.
        """
        fd = directFile(self, os.urandom(8192))
        engine = self.engine()
        bad = memoryview(_buffers.allocate(4096))
        good = memoryview(_buffers.allocate(4096))
        first = engine.read(9999, bad, 0, 4096)
        second = engine.read(fd, good, 4096, 4096)
        assert first is not None and second is not None
        with self.assertRaises(OSError) as e:
            await first
        self.assertEqual(e.exception.errno, errno.EBADF)
        self.assertEqual(await second, 4096)

    def test_unusableBuffers(self) -> None:
        """
        Read-only memory and memory not aligned as asked are not given to
        the kernel: the caller does that request another way.
        """
        fd = directFile(self, os.urandom(8192))
        engine = self.engine()
        self.assertIsNone(engine.write(fd, memoryview(b"x" * 4096), 0, 4096))
        misaligned = memoryview(_buffers.allocate(8192))[1:4097]
        self.assertIsNone(engine.read(fd, misaligned, 0, 4096))
        self.assertEqual(engine.inFlight, 0)

    async def test_contextSize(self) -> None:
        """
        More requests than the context holds wait in the queue and all
        complete.
        """
        data = os.urandom(64 * KiB)
        fd = directFile(self, data)
        engine = self.engine(maxEvents=2)
        bufs = [memoryview(_buffers.allocate(4096)) for _ in range(16)]
        ds: list[Deferred[int]] = []
        for i, buf in enumerate(bufs):
            d = engine.read(fd, buf, i * 4096, 4096)
            assert d is not None
            ds.append(d)
            self.assertLessEqual(engine.inFlight, 2)
        self.assertEqual(await gatherResults(ds), [4096] * 16)
        self.assertEqual(b"".join(bytes(b) for b in bufs), data)

    async def test_submitEAGAIN(self) -> None:
        """
        When io_submit says EAGAIN, requests stay queued and are submitted
        again later.
        """
        data = os.urandom(16 * KiB)
        fd = directFile(self, data)
        syscalls = FlakySyscalls()
        engine = self.engine(syscalls=syscalls)
        syscalls.eagains = 3
        buf = memoryview(_buffers.allocate(16 * KiB))
        d = engine.read(fd, buf, 0, 4096)
        assert d is not None
        self.assertEqual(await d, 16 * KiB)
        self.assertEqual(bytes(buf), data)
        self.assertEqual(syscalls.eagains, 0)

    async def test_partialSubmit(self) -> None:
        """
        When io_submit takes only some of a batch, the rest are submitted
        later.
        """
        data = os.urandom(32 * KiB)
        fd = directFile(self, data)
        syscalls = FlakySyscalls()
        engine = self.engine(syscalls=syscalls, maxEvents=8)
        syscalls.eagains = 1
        bufs = [memoryview(_buffers.allocate(4096)) for _ in range(8)]
        ds = [engine.read(fd, b, i * 4096, 4096) for i, b in enumerate(bufs)]
        # All eight wait behind the EAGAIN; then one batch, taken one by one.
        syscalls.submitAtMost = 1
        self.assertEqual(await gatherResults([d for d in ds if d is not None]), [4096] * 8)
        self.assertEqual(b"".join(bytes(b) for b in bufs), data)
        self.assertGreater(max(syscalls.submits), 1)

    async def test_shortTransfer(self) -> None:
        """
        A transfer that stops on a block boundary before the end is
        completed by another request for the rest.
        """
        data = os.urandom(64 * KiB)
        fd = directFile(self, data)
        syscalls = FlakySyscalls()
        engine = self.engine(syscalls=syscalls)
        syscalls.shortOnce = True
        buf = memoryview(_buffers.allocate(64 * KiB))
        self.assertEqual(await engine.read(fd, buf, 0, 4096), 64 * KiB)  # type: ignore[misc]
        self.assertEqual(bytes(buf), data)
        self.assertFalse(syscalls.shortOnce)
        self.assertEqual(syscalls.submits, [0, 1, 1])

    def test_stopWaitsForInFlight(self) -> None:
        """
        Stopping waits for the requests in the kernel and delivers them; the
        buffers cannot be freed while the kernel may write into them.
        """
        data = os.urandom(64 * KiB)
        fd = directFile(self, data)
        engine = AIOEngine(reactor)
        try:
            engine.start()
        except AIOUnavailable as e:
            raise SkipTest(str(e)) from None
        raw = _buffers.allocate(64 * KiB)
        buf = memoryview(raw)
        results: list[object] = []
        for i in range(16):
            d = engine.read(fd, buf[i * 4096 : (i + 1) * 4096], i * 4096, 4096)
            assert d is not None
            d.addBoth(results.append)
        del buf
        if engine.inFlight:
            self.assertRaises(BufferError, raw.close)
        engine.stop()
        self.assertEqual(results, [4096] * 16)
        self.assertEqual(bytes(raw), data)
        raw.close()

    def test_stopFailsQueued(self) -> None:
        """
        Requests still in our queue at stop fail with ECANCELED.
        """
        fd = directFile(self, os.urandom(8192))
        syscalls = FlakySyscalls()
        engine = AIOEngine(reactor, syscalls=syscalls)
        try:
            engine.start()
        except AIOUnavailable as e:
            raise SkipTest(str(e)) from None
        syscalls.eagains = 100
        d = engine.read(fd, memoryview(_buffers.allocate(4096)), 0, 4096)
        assert d is not None
        engine.stop()
        self.assertEqual(self.failureResultOf(d, OSError).value.errno, errno.ECANCELED)
        notRunning = engine.read(fd, memoryview(_buffers.allocate(4096)), 0, 4096)
        assert notRunning is not None
        self.assertEqual(self.failureResultOf(notRunning, OSError).value.errno, errno.ESHUTDOWN)


class UnavailableTests(SynchronousTestCase):
    """
    Where the kernel or a sandbox forbids AIO, the engine says so and the
    service falls back to the threads, or refuses to start if told to use
    AIO.
    """

    def test_setupFails(self) -> None:
        for code in (errno.ENOSYS, errno.EPERM, errno.EAGAIN):
            engine = AIOEngine(MemoryReactorClock(), syscalls=FailingSetup(code))
            with self.assertRaises(AIOUnavailable) as e:
                engine.start()
            self.assertIn(os.strerror(code), str(e.exception))
            self.assertFalse(engine.running)

    def test_smallerContext(self) -> None:
        """
        Where C{fs.aio-max-nr} leaves less room than asked, a smaller
        context will do.
        """

        class Limited(Syscalls):
            def setup(self, nr: int) -> int:
                if nr > 40:
                    raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
                return super().setup(nr)

        engine = AIOEngine(MemoryReactorClock(), maxEvents=256, syscalls=Limited())
        try:
            engine.start()
        except AIOUnavailable as e:
            raise SkipTest(str(e)) from None
        self.addCleanup(engine.stop)
        self.assertEqual(engine.maxEvents, 32)

    def test_unknownMachine(self) -> None:
        self.patch(_aio.platform, "machine", lambda: "vax")
        with self.assertRaises(AIOUnavailable):
            Syscalls()

    def test_serviceAutoFallsBack(self) -> None:
        engine = AIOEngine(MemoryReactorClock(), syscalls=FailingSetup(errno.ENOSYS))
        service = AIOService(engine, "auto")
        service.startService()
        self.assertFalse(engine.running)
        service.stopService()

    def test_serviceAIORequired(self) -> None:
        engine = AIOEngine(MemoryReactorClock(), syscalls=FailingSetup(errno.EPERM))
        with self.assertRaises(SystemExit) as e:
            AIOService(engine, "aio").startService()
        self.assertIn("io_engine = aio", str(e.exception))

    def test_serviceThreads(self) -> None:
        engine = AIOEngine(MemoryReactorClock())
        service = AIOService(engine, "threads")
        service.startService()
        self.assertFalse(engine.running)
        service.stopService()

    def test_serviceStartsAndStops(self) -> None:
        fake = MemoryReactorClock()
        engine = AIOEngine(fake)
        service = AIOService(engine, "auto")
        service.startService()
        if not engine.running:
            raise SkipTest("No AIO here")
        self.assertIn(engine, fake.readers)
        service.stopService()
        self.assertFalse(engine.running)
        self.assertNotIn(engine, fake.readers)
