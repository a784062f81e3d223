# -*- test-case-name: tests.test_client -*-
"""
The client for Twisted programs: every operation returns a Deferred and
runs on the reactor it was given, storage calls on a disk-io pool.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred
from twisted.internet.task import deferLater

from imageio import _blkhash, _buffers
from imageio._diskio import DiskIO
from imageio.backends import BackendContext
from imageio.client import _local
from imageio.client._copy import Copier, CopyStats, collectExtents, planTasks, streamSize
from imageio.client._defaults import BUFFER_SIZE, FORMATS, MAX_BUFFER_SIZE, MAX_WORKERS, isURL
from imageio.client._remote import NotSupported, Remote, RemoteError, openRemote
from imageio.interfaces import IBackend, UnsupportedOperation
from imageio.ranges import RangeSet


class ClientError(Exception):
    """
    A transfer cannot be done as asked; the message says why.
    """


@define
class Client:
    """
    Transfers between local images and an imageio server.

    @ivar reactor: Runs the network and receives the pool's results.
    @ivar diskio: Runs every blocking call (files, C{qemu-img}, C{qemu-nbd}).
    @ivar cafile: CA bundle verifying the server; C{None} for the system's.
    @ivar secure: Verify the server's certificate and host name.
    @ivar workers: Most connections (and buffers) per transfer; fewer when
        the server allows fewer readers or writers.
    @ivar bufferSize: Each connection's buffer: the largest request.
    @ivar progress: Gets C{size} and C{update(n)} (upstream's progress
        interface), on the reactor thread.
    @ivar warn: Called with a warning that does not stop the transfer.
    @ivar useUnix: Use the server's UNIX socket when on its host.
    """

    reactor: Any
    diskio: DiskIO | Any
    cafile: str | None = None
    secure: bool = True
    workers: int = MAX_WORKERS
    bufferSize: int = BUFFER_SIZE
    progress: Any = None
    warn: Callable[[str], object] = lambda message: None
    useUnix: bool = True
    proxyURL: str | None = None
    lastStats: CopyStats | None = field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"Workers must be at least 1, not {self.workers}")
        if not 4096 <= self.bufferSize <= MAX_BUFFER_SIZE:
            raise ValueError(
                f"Buffer size must be 4 KiB to {MAX_BUFFER_SIZE // 1024} KiB, "
                f"not {self.bufferSize // 1024} KiB"
            )

    # Public API

    def upload(self, filename: str, url: str, *, resume: bool = False) -> Deferred[CopyStats]:
        """
        Upload the guest data of C{filename} (raw, qcow2, any format
        C{qemu-img} reads) to the image at C{url}.

        @param resume: Send only what the server does not list as written
            (C{GET /images/<id>/written}); a full upload with a warning when
            the server does not track it.
        """
        return ensureDeferred(self._upload(filename, url, resume))

    def download(
        self,
        url: str,
        filename: str,
        *,
        fmt: str = "qcow2",
        incremental: bool = False,
        resume: bool = False,
    ) -> Deferred[CopyStats]:
        """
        Download the image at C{url} to a new C{filename} of format C{fmt}.

        @param incremental: Only dirty extents (backup); needs C{qcow2}.
        @param resume: Continue a partial C{raw} download into C{filename}.
        """
        return ensureDeferred(self._download(url, filename, fmt, incremental, resume))

    def checksum(
        self,
        target: str,
        *,
        algorithm: str = _blkhash.DEFAULT_ALGORITHM,
        blockSize: int = _blkhash.DEFAULT_BLOCK_SIZE,
    ) -> Deferred[dict[str, Any]]:
        """
        @return: The block checksum of a URL (the server's) or of a local
            image's guest data (computed here the same way).
        """
        return ensureDeferred(self._checksum(target, algorithm, blockSize))

    def info(self, target: str) -> Deferred[dict[str, Any]]:
        """
        @return: For a file, its format and virtual size; for a URL, the
            image size, the server's features, readers and writers, and the
            allocated bytes.
        """
        return ensureDeferred(self._info(target))

    # Helpers

    def _ctx(self, connections: int) -> BackendContext:
        return BackendContext(
            reactor=self.reactor,
            diskio=self.diskio,
            bufferSize=self.bufferSize,
            maxConnections=connections,
        )

    def _pool(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = self.diskio.run(fn, *args)
        return d

    async def _openRemote(self, url: str) -> Remote:
        try:
            return await openRemote(
                self.reactor,
                url,
                cafile=self.cafile,
                secure=self.secure,
                bufferSize=self.bufferSize,
                useUnix=self.useUnix,
                runInPool=self._pool,
            )
        except RemoteError:
            if self.proxyURL is None:
                raise
        return await openRemote(
            self.reactor,
            self.proxyURL,
            cafile=self.cafile,
            secure=self.secure,
            bufferSize=self.bufferSize,
            useUnix=False,
            runInPool=self._pool,
        )

    def _startProgress(self, size: int) -> None:
        if self.progress is not None:
            self.progress.size = size

    def _update(self, n: int) -> None:
        if self.progress is not None:
            self.progress.update(n)

    async def _openLocal(
        self, info: _local.ImageInfo, count: int, write: bool
    ) -> tuple[list[IBackend], _local.QemuNBD | None]:
        """
        Open C{count} connections to a local image: the file backend for raw
        files, a private C{qemu-nbd} for anything else.
        """
        ctx = self._ctx(count)
        backends: list[IBackend] = []
        server: _local.QemuNBD | None = None
        try:
            if info.format == "raw":
                for _ in range(count):
                    backends.append(await _local.openFile(ctx, info.filename, write=write))
            else:
                server = await self._pool(
                    lambda: _local.QemuNBD.start(
                        info.filename, info.format, readOnly=not write, shared=count
                    )
                )
                assert server is not None
                await self._whenListening(server)
                for _ in range(count):
                    backends.append(await _local.openNBD(ctx, server, write=write))
        except BaseException:
            await self._closeLocal(backends, server)
            raise
        return backends, server

    async def _whenListening(self, server: _local.QemuNBD) -> None:
        # Polled from the reactor's clock; each look at the process and
        # /proc/net/unix runs on the pool.
        deadline = self.reactor.seconds() + _local.QEMU_NBD_TIMEOUT
        while not await self._pool(server.listening):
            if self.reactor.seconds() > deadline:
                raise _local.LocalImageError("qemu-nbd did not start listening")
            await deferLater(self.reactor, 0.005, lambda: None)

    async def _closeLocal(self, backends: list[IBackend], server: _local.QemuNBD | None) -> None:
        await DeferredList([b.close() for b in backends], consumeErrors=True)
        if server is not None:
            await self._pool(server.stop)

    async def _copy(self, pairs: list[tuple[IBackend, IBackend]], tasks: Any) -> CopyStats:
        copier = Copier(pairs, self.bufferSize, self._update)
        stats = await copier.run(tasks)
        self.lastStats = stats
        return stats

    # Operations

    async def _upload(self, filename: str, url: str, resume: bool) -> CopyStats:
        info = await self._pool(_local.imageInfo, filename)
        remote = await self._openRemote(url)
        sources: list[IBackend] = []
        server = None
        try:
            targetSize = await remote.size()
            if info.virtualSize > targetSize:
                raise ClientError(
                    f"{filename} is larger ({info.virtualSize} bytes) than the "
                    f"target image ({targetSize} bytes)"
                )
            skip: RangeSet | None = None
            if resume:
                try:
                    skip = await remote.written()
                except NotSupported:
                    self.warn(
                        "The server does not report written ranges "
                        "(GET /images/<id>/written): uploading everything"
                    )
            count = max(1, min(self.workers, remote.options.maxWriters))
            sources, server = await self._openLocal(info, count, write=False)
            extents = await collectExtents(sources[0], info.virtualSize)
            self._startProgress(info.virtualSize)
            # The remote end takes long streamed writes.
            piece = streamSize(self.bufferSize)
            tasks = planTasks(extents, pieceSize=piece, zero=True, skip=skip)
            return await self._copy(list(zip(sources, remote.backends(count), strict=True)), tasks)
        finally:
            await self._closeLocal(sources, server)
            await remote.close()

    async def _download(
        self, url: str, filename: str, fmt: str, incremental: bool, resume: bool
    ) -> CopyStats:
        if fmt not in FORMATS:
            raise ClientError(f"Unsupported format {fmt!r}: use raw or qcow2")
        if incremental and fmt != "qcow2":
            raise ClientError("An incremental download needs the qcow2 format")
        if resume and fmt != "raw":
            raise ClientError("Only a raw download can be resumed")
        if resume and incremental:
            raise ClientError("An incremental download cannot be resumed")
        remote = await self._openRemote(url)
        targets: list[IBackend] = []
        server = None
        try:
            size = await remote.size()
            count = max(1, min(self.workers, remote.options.maxReaders))
            sources = remote.backends(count)
            context = "dirty" if incremental else "zero"
            try:
                extents = await collectExtents(sources[0], size, context)
            except Exception as e:
                if not incremental or not (
                    isinstance(e, UnsupportedOperation) or getattr(e, "status", None) == 404
                ):
                    raise
                raise ClientError(
                    f"{remote.shownURL} has no dirty extents: an incremental download "
                    "needs a backup ticket with dirty extents"
                ) from None
            skip = zeroOnly = None
            if resume and await self._pool(os.path.exists, filename):
                await self._pool(_local.prepareRaw, filename, size)
                zeroOnly = RangeSet()
                for start, end in await self._pool(_local.localExtents, filename):
                    zeroOnly.add(start, end)
                skip = zeroOnly
            else:
                await self._pool(_local.createImage, filename, fmt, size)
            info = _local.ImageInfo(filename, fmt, size)
            targets, server = await self._openLocal(info, count, write=True)
            # The target is new (or, resumed, a hole where data is missing):
            # zeroes in the data need not be written.
            sparse: list[IBackend] = [_local.SparseTarget(t, self.diskio) for t in targets]
            self._startProgress(size)
            tasks = planTasks(
                extents,
                pieceSize=streamSize(self.bufferSize),
                zero=zeroOnly is not None,
                skip=skip,
                zeroOnly=zeroOnly,
                dirty=incremental,
            )
            return await self._copy(list(zip(sources, sparse, strict=True)), tasks)
        finally:
            await self._closeLocal(targets, server)
            await remote.close()

    async def _checksum(self, target: str, algorithm: str, blockSize: int) -> dict[str, Any]:
        try:
            algorithm = _blkhash.checkAlgorithm(algorithm)
            blockSize = _blkhash.parseBlockSize(str(blockSize))
        except ValueError as e:
            raise ClientError(str(e)) from None
        if isURL(target):
            remote = await self._openRemote(target)
            try:
                result: dict[str, Any] = await remote.checksum(algorithm, blockSize)
                return result
            finally:
                await remote.close()
        info = await self._pool(_local.imageInfo, target)
        backends, server = await self._openLocal(info, 1, write=False)
        try:
            backend = backends[0]
            self._startProgress(info.virtualSize)
            hasher = _blkhash.Hasher(algorithm, blockSize)
            view = memoryview(_buffers.allocate(blockSize))
            done = 0

            def progress(end: int) -> None:
                nonlocal done
                self._update(end - done)
                done = end

            try:
                await _blkhash.hashBackend(
                    backend, info.virtualSize, hasher, view, self._pool, progress
                )
            except OSError as e:
                raise ClientError(f"Cannot read {target}: {e.strerror or e}") from None
            return {
                "algorithm": algorithm,
                "block_size": blockSize,
                "checksum": hasher.hexdigest(),
            }
        finally:
            await self._closeLocal(backends, server)

    async def _info(self, target: str) -> dict[str, Any]:
        if not isURL(target):
            info: _local.ImageInfo = await self._pool(_local.imageInfo, target)
            return info.toJSON()
        remote = await self._openRemote(target)
        try:
            size = await remote.size()
            result: dict[str, Any] = {
                "url": remote.shownURL,
                "size": size,
                "features": sorted(remote.options.features),
                "max_readers": remote.options.maxReaders,
                "max_writers": remote.options.maxWriters,
                "transport": "unix" if remote.overUnix else "tcp",
            }
            if "extents" in remote.options.features:
                extents = await collectExtents(remote.backends(1)[0], size)
                result["allocated"] = sum(e.length for e in extents if not e.zero)
            return result
        finally:
            await remote.close()
