# -*- test-case-name: tests.test_client_cli -*-
"""
The blocking API, for scripts: upstream's functions and argument names,
run on a reactor in a dedicated thread.

The global reactor cannot be restarted once stopped, so it is started once,
in a daemon thread, the first time a blocking call needs it, and every call
after that hands its work to that thread and waits. A script may call
L{upload} as often as it likes. A Twisted program whose reactor already
runs must use L{imageio.client.Client} instead.

This module is, with C{imageio/tap.py}, the only library code that imports
the global reactor: it is an entry point, like twistd's plugin.
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.python.failure import Failure

from imageio import _blkhash
from imageio._diskio import DiskIO, DiskIOPool
from imageio.client._api import Client
from imageio.client._defaults import BUFFER_SIZE, MAX_WORKERS
from imageio.interfaces import Extent

#: Disk-io threads of the blocking API's pool.
POOL_THREADS = 8

#: Seconds to wait for the reactor thread to stop at exit.
SHUTDOWN_TIMEOUT = 5.0


class _ReactorThread:
    """
    The global reactor running in a daemon thread, and a disk-io pool.
    """

    def __init__(self) -> None:
        from twisted.internet import reactor as _reactor

        self.reactor: Any = _reactor
        if self.reactor.running:
            raise RuntimeError(
                "The Twisted reactor already runs in this process: "
                "use imageio.client.Client, which returns Deferreds"
            )
        reactor: Any = self.reactor
        self.pool = DiskIOPool(reactor, POOL_THREADS, name="imageio-client-io")
        self.pool.start()
        self.thread = threading.Thread(
            target=self.reactor.run,
            kwargs={"installSignalHandlers": False},
            name="imageio-client-reactor",
            daemon=True,
        )
        self.thread.start()
        atexit.register(self.stop)

    def stop(self) -> None:
        """
        Stop the reactor and the pool at exit, so that no thread is running
        Python code while the interpreter shuts down.
        """
        if self.thread.is_alive():
            self.reactor.callFromThread(self.reactor.stop)
            self.thread.join(SHUTDOWN_TIMEOUT)
        self.pool.stop()

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """
        Run C{fn} on the reactor thread and wait for its Deferred.

        On C{KeyboardInterrupt} the operation is cancelled, its clean-up
        (closing connections, stopping C{qemu-nbd}) is waited for, and the
        interrupt is raised again.
        """
        results: queue.Queue[Any] = queue.Queue()
        started: list[Deferred[Any]] = []

        def start() -> None:
            d = maybeDeferred(fn, *args, **kwargs)
            started.append(d)
            d.addBoth(results.put)

        self.reactor.callFromThread(start)
        try:
            result = results.get()
        except KeyboardInterrupt:
            self.reactor.callFromThread(_cancel, started)
            results.get()
            raise
        if isinstance(result, Failure):
            result.raiseException()
        return result


def _cancel(started: list[Deferred[Any]]) -> None:
    for d in started:
        d.cancel()


_lock = threading.Lock()
_thread: _ReactorThread | None = None


def shutdown() -> None:
    """
    Stop the reactor thread and its pool, if they were started (as at
    exit).
    """
    with _lock:
        thread = _thread
    if thread is not None:
        thread.stop()


def reactorThread() -> _ReactorThread:
    """
    @return: The reactor thread, started on first use.
    """
    global _thread
    with _lock:
        if _thread is None:
            _thread = _ReactorThread()
        return _thread


class _Progress:
    """
    Hands progress from the reactor thread to the caller's object (it may
    be upstream's C{ProgressBar}, which locks, or a plain callable).
    """

    def __init__(self, target: Any) -> None:
        self._target = target

    @property
    def size(self) -> int | None:
        return getattr(self._target, "size", None)

    @size.setter
    def size(self, n: int) -> None:
        if hasattr(self._target, "size") or not callable(self._target):
            self._target.size = n

    def update(self, n: int) -> None:
        if callable(self._target) and not hasattr(self._target, "update"):
            self._target(n)
        else:
            self._target.update(n)


def _client(
    cafile: str | None,
    secure: bool,
    buffer_size: int,
    max_workers: int,
    progress: Any,
    proxy_url: str | None,
    warn: Callable[[str], object] | None = None,
) -> tuple[_ReactorThread, Client]:
    thread = reactorThread()
    client = Client(
        reactor=thread.reactor,
        diskio=DiskIO(thread.pool),
        cafile=cafile,
        secure=secure,
        workers=max_workers,
        bufferSize=buffer_size,
        progress=_Progress(progress) if progress is not None else None,
        proxyURL=proxy_url,
        warn=warn or _warn,
    )
    return thread, client


def _warn(message: str) -> None:
    import warnings

    warnings.warn(message, stacklevel=3)


def upload(
    filename: str,
    url: str,
    cafile: str | None,
    buffer_size: int = BUFFER_SIZE,
    secure: bool = True,
    progress: Any = None,
    proxy_url: str | None = None,
    max_workers: int = MAX_WORKERS,
    member: str | None = None,
    backing_chain: bool = True,
    disk_is_zero: bool = False,
    resume: bool = False,
) -> None:
    """
    Upload C{filename} (raw, qcow2, ...) to C{url}, as upstream's
    C{ovirt_imageio.client.upload}; C{resume} sends only what the server
    does not list as written.
    """
    _unsupported(member=member, backing_chain=not backing_chain, disk_is_zero=disk_is_zero)
    thread, client = _client(cafile, secure, buffer_size, max_workers, progress, proxy_url)
    thread.call(client.upload, filename, url, resume=resume)


def download(
    url: str,
    filename: str,
    cafile: str | None,
    fmt: str = "qcow2",
    incremental: bool = False,
    buffer_size: int = BUFFER_SIZE,
    secure: bool = True,
    progress: Any = None,
    proxy_url: str | None = None,
    max_workers: int = MAX_WORKERS,
    backing_file: str | None = None,
    backing_format: str | None = None,
    resume: bool = False,
) -> None:
    """
    Download C{url} to a new C{filename} of format C{fmt}, as upstream's
    C{ovirt_imageio.client.download}; C{resume} continues a raw download.
    """
    _unsupported(backing_file=backing_file, backing_format=backing_format)
    thread, client = _client(cafile, secure, buffer_size, max_workers, progress, proxy_url)
    thread.call(client.download, url, filename, fmt=fmt, incremental=incremental, resume=resume)


def checksum(
    filename: str,
    member: str | None = None,
    block_size: int = _blkhash.DEFAULT_BLOCK_SIZE,
    algorithm: str = _blkhash.DEFAULT_ALGORITHM,
    detect_zeroes: bool = True,
    cafile: str | None = None,
    secure: bool = True,
) -> dict[str, Any]:
    """
    @return: The block checksum of a local image's guest data (or of a URL:
        the server's), comparable with the server's C{/checksum}:
        C{{"algorithm": ..., "block_size": ..., "checksum": ...}}.
    """
    _unsupported(member=member)
    thread, client = _client(cafile, secure, BUFFER_SIZE, 1, None, None)
    result: dict[str, Any] = thread.call(
        client.checksum, filename, algorithm=algorithm, blockSize=block_size
    )
    return result


def info(filename: str, member: str | None = None) -> dict[str, Any]:
    """
    @return: C{format} and C{virtual-size} of a local image (C{qemu-img
        info}'s names), or what the server says of a URL.
    """
    _unsupported(member=member)
    thread, client = _client(None, True, BUFFER_SIZE, 1, None, None)
    result: dict[str, Any] = thread.call(client.info, filename)
    return result


def _unsupported(**options: Any) -> None:
    for name, value in options.items():
        if value:
            raise ValueError(f"{name} is not supported by imageio.client")


class ImageioClient:
    """
    Random access to one image on a server, blocking, with upstream's
    C{ovirt_imageio.client.ImageioClient} interface: one connection, each
    call one request.
    """

    def __init__(
        self,
        transfer_url: str,
        cafile: str | None = None,
        secure: bool = True,
        proxy_url: str | None = None,
        buffer_size: int = BUFFER_SIZE,
    ) -> None:
        self._thread, client = _client(cafile, secure, buffer_size, 1, None, proxy_url)
        self._bufferSize = buffer_size
        self._remote: Any = self._thread.call(
            lambda: Deferred.fromCoroutine(client._openRemote(transfer_url))
        )
        self._backend: Any = self._remote.backends(1)[0]
        self._size: int | None = None

    @property
    def max_writers(self) -> int:
        return int(self._remote.options.maxWriters)

    @property
    def max_readers(self) -> int:
        return int(self._remote.options.maxReaders)

    def size(self) -> int:
        """
        @return: The image size in bytes.
        """
        if self._size is None:
            self._size = int(self._thread.call(self._backend.size))
        return self._size

    def extents(self, context: str = "zero") -> Iterator[Extent]:
        """
        @return: The image's extents (C{start}, C{length}, C{zero},
            C{hole}, C{dirty}).
        """
        from imageio.client._copy import collectExtents

        size = self.size()
        extents: list[Extent] = self._thread.call(
            lambda: Deferred.fromCoroutine(collectExtents(self._backend, size, context))
        )
        yield from extents

    def read(self, offset: int, buffer: Any) -> int:
        """
        Read C{len(buffer)} bytes at C{offset} (one ranged C{GET}).
        """
        view = memoryview(buffer).cast("B")
        if offset + len(view) > self.size():
            raise RuntimeError("Read out of image bounds")
        n: int = self._thread.call(self._backend.readInto, offset, view)
        return n

    def write(self, offset: int, buffer: Any) -> None:
        """
        Write all of C{buffer} at C{offset} (one C{PUT}).
        """
        view = memoryview(buffer).cast("B")
        if offset + len(view) > self.size():
            raise RuntimeError("Write out of image bounds")
        self._thread.call(self._backend.write, offset, view)

    def zero(self, offset: int, length: int) -> None:
        self._thread.call(self._backend.zero, offset, length)

    def flush(self) -> None:
        self._thread.call(self._backend.flush)

    def read_from(self, reader: Any, offset: int, length: int) -> None:
        """
        Write C{length} bytes read from C{reader} (C{readinto}) at C{offset},
        a buffer at a time.
        """
        buf = bytearray(min(self._bufferSize, length))
        view = memoryview(buf)
        done = 0
        while done < length:
            n = reader.readinto(view[: min(len(view), length - done)])
            if not n:
                raise RuntimeError(f"Expected {length} bytes, got {done}")
            self.write(offset + done, view[:n])
            done += n

    def write_to(self, writer: Any, offset: int, length: int) -> None:
        """
        Read C{length} bytes at C{offset} and hand them to C{writer.write}, a
        buffer at a time.
        """
        buf = bytearray(min(self._bufferSize, length))
        view = memoryview(buf)
        done = 0
        while done < length:
            n = self.read(offset + done, view[: min(len(view), length - done)])
            writer.write(view[:n])
            done += n

    def close(self) -> None:
        self._thread.call(self._remote.close)

    def __enter__(self) -> ImageioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
