# -*- test-case-name: tests.test_aio -*-
"""
Storage I/O completing on the reactor thread: Linux AIO without a thread hop.

L{AIOEngine} submits C{O_DIRECT} reads and writes with C{io_submit(2)} from
the reactor thread, straight into and out of the caller's aligned buffers
(no copy: the kernel gets the buffer's address). Each request asks the
kernel to signal an C{eventfd} when it completes; the reactor watches that
eventfd like a socket and L{AIOEngine} reaps completions with a
non-blocking C{io_getevents(2)}.

We call the syscalls through C{ctypes}: Linux AIO needs four syscalls and two
fixed-layout structures, where io_uring needs shared rings, memory barriers
and a far larger ABI, and the bindings we found either copy (C{caio}) or
want a kernel newer than hosts run (C{liburing}).

Requests carry C{RWF_NOWAIT}: where the kernel would block in C{io_submit}
(allocating blocks, contended locks), it fails the request with C{EAGAIN}
instead, and where a file system cannot do non-blocking I/O at all it says
C{EOPNOTSUPP}. Callers then do that request on the disk-io pool; the reactor
never waits for storage. Buffered (non-C{O_DIRECT}) files must not use this
engine: the kernel does buffered AIO synchronously inside C{io_submit}.
On tmpfs (L{isMemoryFileSystem}) direct I/O is a memory copy done inside
C{io_submit}, on the reactor thread, and the file system refuses
C{RWF_NOWAIT}: callers give such files only small reads, without the flag
(C{nowait=False}), so that the copy is a bounded slice (see
L{imageio.backends.file.SYNC_AIO_MAX_READ}).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import sys
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReadDescriptor
from twisted.python.failure import Failure
from zope.interface import implementer

from imageio._log import Logger

log = Logger()

#: The most requests in flight in the kernel at once (the AIO context size);
#: more wait in our queue. Counts against the host's C{fs.aio-max-nr}.
MAX_EVENTS = 256
#: The smallest context worth having when C{fs.aio-max-nr} is nearly used up.
MIN_EVENTS = 16

IOCB_CMD_PREAD = 0
IOCB_CMD_PWRITE = 1
IOCB_FLAG_RESFD = 1
RWF_NOWAIT = 0x08
TMPFS_MAGIC = 0x01021994
RAMFS_MAGIC = 0x858458F6

_libc = ctypes.CDLL(None, use_errno=True)

# Syscall numbers by machine: x86_64 has its own table, the newer ports share
# the generic one.
_SYSCALLS = {
    "x86_64": (206, 207, 208, 209),
    "aarch64": (0, 1, 4, 2),
    "riscv64": (0, 1, 4, 2),
    "ppc64le": (227, 228, 229, 230),
    "s390x": (243, 244, 245, 246),
}

if sys.byteorder == "little":
    _KEY_FLAGS = [("aio_key", ctypes.c_uint32), ("aio_rw_flags", ctypes.c_int32)]
else:
    _KEY_FLAGS = [("aio_rw_flags", ctypes.c_int32), ("aio_key", ctypes.c_uint32)]


class IOCB(ctypes.Structure):
    """
    C{struct iocb} from C{linux/aio_abi.h}.
    """

    _fields_ = [
        ("aio_data", ctypes.c_uint64),
        *_KEY_FLAGS,
        ("aio_lio_opcode", ctypes.c_uint16),
        ("aio_reqprio", ctypes.c_int16),
        ("aio_fildes", ctypes.c_uint32),
        ("aio_buf", ctypes.c_uint64),
        ("aio_nbytes", ctypes.c_uint64),
        ("aio_offset", ctypes.c_int64),
        ("aio_reserved2", ctypes.c_uint64),
        ("aio_flags", ctypes.c_uint32),
        ("aio_resfd", ctypes.c_uint32),
    ]


class IOEvent(ctypes.Structure):
    """
    C{struct io_event} from C{linux/aio_abi.h}.
    """

    _fields_ = [
        ("data", ctypes.c_uint64),
        ("obj", ctypes.c_uint64),
        ("res", ctypes.c_int64),
        ("res2", ctypes.c_int64),
    ]


#: C{struct aio_ring}'s magic (C{fs/aio.c}): the kernel maps the ring of
#: completions at the context's address, a 32-byte header then the events.
AIO_RING_MAGIC = 0xA10A10A1
AIO_RING_HEADER = 32


class _RingHeader(ctypes.Structure):
    """
    C{struct aio_ring}'s header, in our memory at the context's address:
    the kernel appends completions at C{tail}; C{head} is the next to reap.
    """

    _fields_ = [
        ("id", ctypes.c_uint),
        ("nr", ctypes.c_uint),
        ("head", ctypes.c_uint),
        ("tail", ctypes.c_uint),
        ("magic", ctypes.c_uint),
        ("compat_features", ctypes.c_uint),
        ("incompat_features", ctypes.c_uint),
        ("header_length", ctypes.c_uint),
    ]


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class AIOUnavailable(Exception):
    """
    The kernel, its configuration or a sandbox does not let us use Linux AIO.
    """


class Syscalls:
    """
    The four AIO syscalls, raising L{OSError} with the errno of a failure.

    Each syscall has its own prototyped C{syscall(2)} function, so that a
    call converts Python integers itself (no C{ctypes} objects made per
    call).
    """

    def __init__(self) -> None:
        numbers = _SYSCALLS.get(platform.machine())
        if numbers is None:
            raise AIOUnavailable(f"no AIO syscall numbers for {platform.machine()}")
        self.setupNr, self.destroyNr, self.geteventsNr, self.submitNr = numbers
        self._setup = _prototype(ctypes.c_uint, ctypes.c_void_p)
        self._destroy = _prototype(ctypes.c_ulong)
        self._submit = _prototype(ctypes.c_ulong, ctypes.c_long, ctypes.c_void_p)
        self._getevents = _prototype(
            ctypes.c_ulong, ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p
        )

    def setup(self, nr: int) -> int:
        ctx = ctypes.c_ulong(0)
        if self._setup(self.setupNr, nr, ctypes.byref(ctx)) < 0:
            raise _lastError()
        return ctx.value

    def ring(self, ctx: int) -> _RingHeader | None:
        """
        @return: The header of C{ctx}'s ring of completions, mapped in our
            memory, if it has the layout we know; C{None} if not, or if
            C{ctx} did not come from L{Syscalls.setup} (a test's fake).
        """
        if type(self).setup is not Syscalls.setup:
            return None
        header = _RingHeader.from_address(ctx)
        if header.magic != AIO_RING_MAGIC or header.header_length != AIO_RING_HEADER:
            return None
        return header

    def destroy(self, ctx: int) -> None:
        if self._destroy(self.destroyNr, ctx) < 0:
            raise _lastError()

    def submit(self, ctx: int, count: int, pointers: Any) -> int:
        """
        C{io_submit}: C{pointers} is an array of C{count} or more pointers
        to L{IOCB}.
        """
        result: int = self._submit(self.submitNr, ctx, count, pointers)
        if result < 0:
            raise _lastError()
        return result

    def getevents(self, ctx: int, minNr: int, events: Any, timeout: Timespec | None) -> int:
        """
        C{io_getevents} into C{events}, an array of L{IOEvent}, waiting at
        most C{timeout} (C{None}: until C{minNr} completed).
        """
        result: int = self._getevents(
            self.geteventsNr,
            ctx,
            minNr,
            events._length_,
            events,
            None if timeout is None else ctypes.byref(timeout),
        )
        if result < 0:
            raise _lastError()
        return result


def _prototype(*argtypes: Any) -> Any:
    """
    A C{syscall(2)} function of its own taking the syscall number (a
    C{long}) and C{argtypes}, returning a C{long}.
    """
    function = _libc["syscall"]
    function.argtypes = (ctypes.c_long, *argtypes)
    function.restype = ctypes.c_long
    return function


def _lastError() -> OSError:
    err = ctypes.get_errno()
    return OSError(err, os.strerror(err))


_fstatfs = _libc.fstatfs64 if hasattr(_libc, "fstatfs64") else _libc.fstatfs
_fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_fstatfs.restype = ctypes.c_int

#: File systems where direct I/O is a memory copy (tmpfs, ramfs).
MEMORY_FILE_SYSTEMS = frozenset({TMPFS_MAGIC, RAMFS_MAGIC})


def fileSystemType(fd: int) -> int:
    """
    @return: The C{f_type} of the file system holding C{fd}
        (C{fstatfs(2)}; C{os.statvfs} does not report it).
    @raise OSError: If the kernel refuses.
    """
    # struct statfs is 120 bytes on 64-bit Linux, 84 or 88 on 32-bit; f_type
    # is its first field, a native long everywhere we run.
    buf = ctypes.create_string_buffer(256)
    if _fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ctypes.c_ulong.from_buffer(buf).value & 0xFFFFFFFF


def isMemoryFileSystem(fd: int) -> bool:
    """
    @return: C{fd} is on tmpfs or ramfs, where direct I/O is a memory copy.
    """
    try:
        return fileSystemType(fd) in MEMORY_FILE_SYSTEMS
    except OSError:
        return False


#: Expose a writable buffer to the kernel without copying it: the C{ctypes}
#: character returned holds an export of the buffer, so while it lives the
#: buffer cannot be closed or resized and the kernel never writes into freed
#: memory; its address (C{ctypes.addressof}) is the buffer's. Raises
#: C{TypeError} or C{ValueError} for a read-only or non-contiguous buffer.
_pinned = ctypes.c_char.from_buffer


#: What a request's completion is given: the bytes transferred, or the
#: failure.
Completion = Callable[[Any], object]


class _Slot:
    """
    One request's place in the engine: its C{struct iocb} (allocated once,
    reused by the next request), and the request while it runs, possibly
    resubmitted for the rest after a short transfer.

    @ivar index: The slot's number, the C{aio_data} of its iocb.
    @ivar single: A one-pointer array to C{iocb}, for submitting it alone.
    @ivar buffer: The pinned buffer (L{_pinned}) while the request runs.
    """

    __slots__ = (
        "index",
        "iocb",
        "single",
        "opcode",
        "fd",
        "buffer",
        "address",
        "length",
        "offset",
        "align",
        "done",
        "then",
    )

    def __init__(self, index: int, eventfd: int) -> None:
        self.index = index
        self.iocb = IOCB()
        self.iocb.aio_data = index
        self.iocb.aio_flags = IOCB_FLAG_RESFD
        self.iocb.aio_resfd = eventfd
        self.single = (ctypes.POINTER(IOCB) * 1)(ctypes.pointer(self.iocb))
        self.opcode = 0
        self.fd = -1
        self.buffer: ctypes.c_char | None = None
        self.address = 0
        self.length = 0
        self.offset = 0
        self.align = 1
        self.done = 0
        self.then: Completion | None = None


@implementer(IReadDescriptor)
class AIOEngine:
    """
    Reads and writes on C{O_DIRECT} file descriptors through one AIO context,
    completed on the reactor thread. Reactor thread only.

    Each request takes a slot (L{_Slot}: an iocb allocated once and reused)
    and gives its completion to a plain function (L{submitRead},
    L{submitWrite}), so that a caller with a Deferred of its own needs no
    other; L{read} and L{write} return a Deferred.

    @ivar running: Between a successful L{start} and L{stop}.
    @ivar maxEvents: Size of the kernel context; further requests wait in
        our queue.
    @ivar completed: Requests completed by the kernel, counting resubmits.
    @ivar wouldBlock: Of those, the ones the kernel refused with C{EAGAIN}
        (the caller did them on the pool).
    @ivar reapedEarly: Times L{reapReady} found completions to deliver.
    """

    def __init__(
        self, reactor: Any, maxEvents: int = MAX_EVENTS, syscalls: Syscalls | None = None
    ) -> None:
        self.reactor = reactor
        self.maxEvents = maxEvents
        self.running = False
        self.completed = 0
        self.wouldBlock = 0
        self.reapedEarly = 0
        self._sys: Syscalls | None = None
        self._syscalls = syscalls
        self._ctx = 0
        # The context's ring header, read (never written) to see whether
        # completions wait, without a syscall.
        self._ring: _RingHeader | None = None
        self._eventfd = -1
        # Every slot made since start, by index; free ones are also in _free.
        self._slots: list[_Slot] = []
        self._free: list[_Slot] = []
        # Requests in the kernel; their buffers stay pinned.
        self._busy = 0
        self._queue: deque[_Slot] = deque()
        self._retryCall: IDelayedCall | None = None
        self._events = (IOEvent * maxEvents)()
        self._nEvents = maxEvents
        self._pointers = (ctypes.POINTER(IOCB) * maxEvents)()
        self._zero = Timespec(0, 0)

    # Lifecycle

    def start(self) -> None:
        """
        Create the AIO context and watch its eventfd.

        Where the host's C{fs.aio-max-nr} leaves less room than
        C{maxEvents}, a smaller context (down to L{MIN_EVENTS}) will do.

        @raise AIOUnavailable: If the kernel or a sandbox refuses (C{ENOSYS},
            C{EPERM}) or C{fs.aio-max-nr} is exhausted (C{EAGAIN}).
        """
        if self.running:
            return
        size = self.maxEvents
        try:
            syscalls = self._syscalls or Syscalls()
            while True:
                try:
                    ctx = syscalls.setup(size)
                    break
                except OSError as e:
                    if e.errno != errno.EAGAIN or size <= MIN_EVENTS:
                        raise
                    size = max(MIN_EVENTS, size // 2)
        except OSError as e:
            raise AIOUnavailable(f"io_setup failed: {e}") from None
        self.maxEvents = size
        try:
            # A sandbox may allow io_setup and deny the rest: ask once.
            syscalls.submit(ctx, 0, self._pointers)
            syscalls.getevents(ctx, 0, self._events, self._zero)
        except OSError as e:
            syscalls.destroy(ctx)
            raise AIOUnavailable(f"io_submit/io_getevents failed: {e}") from None
        self._sys, self._ctx = syscalls, ctx
        self._ring = syscalls.ring(ctx)
        self._eventfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # Slots name the eventfd: new ones for this context.
        self._slots = []
        self._free = []
        self.running = True
        self.reactor.addReader(self)

    def stop(self) -> None:
        """
        Fail queued requests, wait for those in the kernel to complete and
        deliver them, then destroy the context.

        Waiting blocks, but only at shutdown and only for requests already
        submitted: a buffer the kernel may still write into is never freed.
        """
        if not self.running:
            return
        self.running = False
        self.reactor.removeReader(self)
        if self._retryCall is not None:
            self._retryCall.cancel()
            self._retryCall = None
        assert self._sys is not None
        while self._busy or self._queue:
            while self._queue:
                # Not in the kernel: nothing to wait for.
                cancelled = OSError(errno.ECANCELED, "The AIO engine stopped")
                self._finish(self._queue.popleft(), Failure(cancelled))
            if self._busy:
                self._reap(block=True)
        self._ring = None
        self._sys.destroy(self._ctx)
        os.close(self._eventfd)
        self._eventfd = -1
        self._sys = None

    @property
    def inFlight(self) -> int:
        """
        Requests submitted to the kernel and not yet reaped.
        """
        return self._busy

    # Requests

    def read(
        self, fd: int, view: memoryview, offset: int, align: int = 1, nowait: bool = True
    ) -> Deferred[int] | None:
        """
        Read into all of C{view} from C{offset}, unless the file ends first.

        @param align: The file's block size: a transfer ending at an offset
            that is not a multiple of it ended at end of file.
        @param nowait: Ask for C{RWF_NOWAIT}. Only for files in memory
            (tmpfs), which refuse it and never wait for a disk, may this be
            C{False}, and then only for reads small enough that the copy
            C{io_submit} does on the calling thread is a bounded slice.
        @return: A Deferred firing with the bytes read, or failing with
            L{OSError}; C{None} if C{view} cannot be given to the kernel
            (read-only, not contiguous, or its address not a multiple of
            C{align}).
        """
        if not self.running:
            return fail(OSError(errno.ESHUTDOWN, "The AIO engine is not running"))
        d: Deferred[int] = Deferred()
        if not self.submitRead(fd, view, offset, align, nowait, d.callback):
            return None
        return d

    def write(self, fd: int, view: memoryview, offset: int, align: int = 1) -> Deferred[int] | None:
        """
        Write all of C{view} at C{offset}.

        @return: A Deferred firing with C{len(view)}, or failing with
            L{OSError}; C{None} if C{view} cannot be given to the kernel.
        """
        if not self.running:
            return fail(OSError(errno.ESHUTDOWN, "The AIO engine is not running"))
        d: Deferred[int] = Deferred()
        if not self.submitWrite(fd, view, offset, align, d.callback):
            return None
        return d

    def submitRead(
        self, fd: int, view: memoryview, offset: int, align: int, nowait: bool, then: Completion
    ) -> bool:
        """
        L{read}, giving the outcome to C{then} instead of a Deferred: the
        bytes read, or a L{Failure} of L{OSError}. C{then} may be called
        before this returns (a request C{io_submit} refused).

        @return: Whether the request was taken; if not (the engine is not
            running, or C{view} cannot be given to the kernel), C{then} is
            never called.
        """
        return self.submit(IOCB_CMD_PREAD, fd, view, offset, align, nowait, then)

    def submitWrite(
        self, fd: int, view: memoryview, offset: int, align: int, then: Completion
    ) -> bool:
        """
        L{write}, giving the outcome to C{then} as L{submitRead} does.
        """
        return self.submit(IOCB_CMD_PWRITE, fd, view, offset, align, True, then)

    def submit(
        self,
        opcode: int,
        fd: int,
        view: memoryview,
        offset: int,
        align: int,
        nowait: bool,
        then: Completion,
    ) -> bool:
        """
        Take a request (L{submitRead}, L{submitWrite}) and give it to the
        kernel at once, unless others wait for room before it.
        """
        if not self.running:
            return False
        length = view.nbytes
        if not length:
            if view.readonly:
                return False
            then(0)
            return True
        # Pinned while the kernel has it (see _pinned).
        try:
            buffer = _pinned(view)
        except (TypeError, ValueError):
            return False
        address = ctypes.addressof(buffer)
        if address % align:
            return False
        free = self._free
        slot = free.pop() if free else self._newSlot()
        slot.opcode = opcode
        slot.fd = fd
        slot.buffer = buffer
        slot.address = address
        slot.length = length
        slot.offset = offset
        slot.align = align
        slot.done = 0
        slot.then = then
        iocb = slot.iocb
        iocb.aio_rw_flags = RWF_NOWAIT if nowait else 0
        iocb.aio_lio_opcode = opcode
        iocb.aio_fildes = fd
        iocb.aio_buf = address
        iocb.aio_nbytes = length
        iocb.aio_offset = offset
        if self._queue or self._busy >= self.maxEvents:
            self._queue.append(slot)
            self._submit()
            return True
        assert self._sys is not None
        try:
            submitted = self._sys.submit(self._ctx, 1, slot.single)
        except OSError as e:
            if e.errno == errno.EAGAIN:
                self._queue.append(slot)
                self._retryLater()
            else:
                # A bad request (EBADF, EINVAL for a file that cannot do
                # AIO): it fails alone.
                self._finish(slot, Failure(e))
            return True
        if submitted:
            self._busy += 1
        else:
            self._queue.append(slot)
            self._retryLater()
        return True

    def _newSlot(self) -> _Slot:
        slot = _Slot(len(self._slots), self._eventfd)
        self._slots.append(slot)
        return slot

    def _submit(self) -> None:
        """
        Move queued requests into the kernel, as many as the context holds.
        """
        assert self._sys is not None
        while self._queue and self._busy < self.maxEvents:
            batch = min(len(self._queue), self.maxEvents - self._busy)
            for i in range(batch):
                slot = self._queue[i]
                self._fill(slot)
                self._pointers[i] = slot.single[0]
            try:
                submitted = self._sys.submit(self._ctx, batch, self._pointers)
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    self._retryLater()
                    return
                # The first request is bad (EBADF, EINVAL for a file that
                # cannot do AIO): fail it alone and go on with the rest.
                self._finish(self._queue.popleft(), Failure(e))
                continue
            if not submitted:
                self._retryLater()
                return
            for _ in range(submitted):
                self._queue.popleft()
            self._busy += submitted

    @staticmethod
    def _fill(slot: _Slot) -> None:
        """
        Point C{slot}'s iocb at what is left of its request.
        """
        iocb = slot.iocb
        iocb.aio_buf = slot.address + slot.done
        iocb.aio_nbytes = slot.length - slot.done
        iocb.aio_offset = slot.offset + slot.done

    def _retryLater(self) -> None:
        """
        Out of kernel resources: retry when a request completes, or soon if
        none is in flight.
        """
        if not self._busy and self._retryCall is None:
            self._retryCall = self.reactor.callLater(0.001, self._retry)

    def _retry(self) -> None:
        self._retryCall = None
        if self.running:
            self._submit()

    # Completions

    def _reap(self, block: bool = False) -> None:
        """
        Deliver completed requests; with C{block}, wait for at least one.
        """
        syscalls = self._sys
        assert syscalls is not None
        events = self._events
        slots = self._slots
        ring = self._ring
        while True:
            if not block and ring is not None and ring.head == ring.tail:
                # Nothing completed: no syscall (a turn after reapReady).
                return
            try:
                n = syscalls.getevents(
                    self._ctx, 1 if block else 0, events, None if block else self._zero
                )
            except InterruptedError:
                continue
            self._busy -= n
            if n == 1:
                # Copy out first: the completion may submit, reap or stop.
                event = events[0]
                self._complete(slots[event.data], event.res)
            elif n:
                done = [(slots[e.data], e.res) for e in events[:n]]
                for slot, res in done:
                    self._complete(slot, res)
                del done
            if n < self._nEvents or self._sys is None:
                # All reaped, or a callback stopped the engine.
                return
            block = False

    def _complete(self, slot: _Slot, res: int) -> None:
        self.completed += 1
        if res < 0:
            if res == -errno.EAGAIN:
                self.wouldBlock += 1
            self._finish(slot, Failure(OSError(-res, os.strerror(-res))))
            return
        done = slot.done = slot.done + res
        if done < slot.length:
            if res == 0 or (slot.offset + done) % slot.align:
                if slot.opcode == IOCB_CMD_PREAD:
                    # End of file.
                    self._finish(slot, done)
                    return
                where = slot.offset + done
                self._finish(slot, Failure(OSError(errno.EIO, f"Short write at {where}")))
                return
            if not self.running:
                cancelled = OSError(errno.ECANCELED, "The AIO engine stopped")
                self._finish(slot, Failure(cancelled))
                return
            # A short transfer on a block boundary: ask for the rest.
            self._fill(slot)
            self._queue.appendleft(slot)
            return
        self._finish(slot, done)

    def _finish(self, slot: _Slot, result: int | Failure) -> None:
        """
        Unpin the buffer and free the slot, then give the outcome: the
        completion may close the buffer, or take the slot again.
        """
        then = slot.then
        slot.buffer = None
        slot.then = None
        self._free.append(slot)
        assert then is not None
        try:
            then(result)
        except Exception:
            # The reactor would stop watching the eventfd: log it here.
            log.failure("A storage I/O completion failed")

    # IReadDescriptor

    def doRead(self) -> None:
        if not self.running:
            # Stopped in this reactor iteration; stop() reaped everything.
            return
        try:
            os.eventfd_read(self._eventfd)
        except BlockingIOError:
            pass
        self._reap()
        if self._queue and self.running:
            self._submit()

    def reapReady(self) -> None:
        """
        Deliver the completions already in the ring, as L{doRead} would a
        poll later. Called after each poll's dispatch
        (L{imageio._twisted_dispatch}), so that a request the kernel
        completed inside C{io_submit} (a small read on tmpfs) is answered in
        the turn that asked for it, one poll and two syscalls sooner.
        """
        ring = self._ring
        if ring is not None and self._busy and ring.head != ring.tail:
            self.reapedEarly += 1
            # doRead drains the eventfd before reaping: a completion whose
            # signal it takes is in the ring already, one after signals again.
            self.doRead()

    def fileno(self) -> int:
        return self._eventfd

    def connectionLost(self, reason: Failure) -> None:
        pass

    def logPrefix(self) -> str:
        return "aio"


class AIOService(Service):
    """
    Chooses the storage I/O engine at start and logs the choice: the AIO
    engine if the kernel allows it, else the disk-io threads.

    Stopped before the disk-io pool (add it to the parent after the pool's
    service): requests in flight complete first, then backends close their
    files on the pool.

    @ivar mode: C{"auto"}, C{"aio"} (fail to start without AIO) or
        C{"threads"} (never use AIO).
    """

    name = "aio"

    def __init__(self, engine: AIOEngine, mode: str) -> None:
        self.engine = engine
        self.mode = mode

    def startService(self) -> None:
        super().startService()
        if self.mode == "threads":
            log.info("Storage I/O engine: threads ([daemon] io_engine = threads)")
            return
        try:
            self.engine.start()
        except AIOUnavailable as e:
            if self.mode == "aio":
                raise SystemExit(
                    f"[daemon] io_engine = aio, but Linux AIO is unavailable: {e}"
                ) from None
            log.warn(
                "Storage I/O engine: threads (Linux AIO is unavailable: {error})", error=str(e)
            )
            return
        log.info(
            "Storage I/O engine: aio (Linux AIO, at most {maxEvents} requests in flight; "
            "buffered files, fsync, zeroing and opening stay on the disk-io threads)",
            maxEvents=self.engine.maxEvents,
        )

    def stopService(self) -> None:
        super().stopService()
        self.engine.stop()
