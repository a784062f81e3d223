# -*- test-case-name: tests.test_client -*-
"""
Local images: format detection, raw files through the file backend, other
formats through a private C{qemu-nbd}.

Everything that blocks (reading a header, C{qemu-img}, starting and
stopping C{qemu-nbd}) runs on the disk-io pool.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import tempfile
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from zope.interface import implementer

from imageio.backends import BackendContext
from imageio.interfaces import Extent, IBackend

#: The first bytes of a qcow2 image (C{QFI\\xfb}).
QCOW2_MAGIC = b"QFI\xfb"

#: Seconds C{qemu-nbd} may take to listen, or to exit when asked.
QEMU_NBD_TIMEOUT = 20.0


class LocalImageError(Exception):
    """
    A local image cannot be used: missing, unreadable, or a tool failed.
    """


@frozen
class ImageInfo:
    """
    What C{qemu-img info} says of a local image.

    @ivar format: C{raw}, C{qcow2}, ...
    @ivar virtualSize: The guest-visible size in bytes.
    @ivar actualSize: Bytes allocated on the file system, when known.
    @ivar backingFile: The backing file of a qcow2 image, if any.
    """

    filename: str
    format: str
    virtualSize: int
    actualSize: int | None = None
    backingFile: str | None = None

    def toJSON(self) -> dict[str, object]:
        result: dict[str, object] = {
            "filename": self.filename,
            "format": self.format,
            "virtual-size": self.virtualSize,
        }
        if self.actualSize is not None:
            result["actual-size"] = self.actualSize
        if self.backingFile is not None:
            result["backing-filename"] = self.backingFile
        return result


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise LocalImageError(f"{name} is not installed (it comes with qemu-utils)")
    return path


def _run(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, check=False)
    except OSError as e:
        raise LocalImageError(f"Cannot run {args[0]}: {e.strerror}") from None
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        message = lines[-1] if lines else f"exit status {done.returncode}"
        raise LocalImageError(f"{os.path.basename(args[0])} failed: {message}")
    return done.stdout


def imageInfo(filename: str) -> ImageInfo:
    """
    Probe C{filename} as C{qemu-img info} does. Blocking: run it on the pool.

    Without C{qemu-img}, a qcow2 header is recognized by its magic and
    anything else is raw.

    @raise LocalImageError: If the file cannot be read or probed.
    """
    try:
        st = os.stat(filename)
    except OSError as e:
        raise LocalImageError(f"Cannot open {filename}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise LocalImageError(f"Cannot open {filename}: Is a directory")
    if shutil.which("qemu-img") is not None:
        out = _run(["qemu-img", "info", "--output", "json", "-U", "--", filename])
        try:
            info = json.loads(out)
            fmt = str(info["format"])
            virtualSize = int(info["virtual-size"])
            if fmt == "raw":
                # qemu rounds a raw image up to whole sectors: the guest
                # data is the file, byte for byte.
                virtualSize = _rawSize(filename)
            return ImageInfo(
                filename=filename,
                format=fmt,
                virtualSize=virtualSize,
                actualSize=info.get("actual-size"),
                backingFile=info.get("backing-filename"),
            )
        except (ValueError, KeyError, TypeError):
            raise LocalImageError(f"Unexpected qemu-img info output for {filename}") from None
    try:
        with open(filename, "rb") as f:
            header = f.read(32)
            size = f.seek(0, os.SEEK_END)
    except OSError as e:
        raise LocalImageError(f"Cannot read {filename}: {e.strerror}") from None
    if header[:4] == QCOW2_MAGIC and len(header) >= 32:
        return ImageInfo(filename, "qcow2", int.from_bytes(header[24:32], "big"), None)
    return ImageInfo(filename, "raw", size, st.st_blocks * 512)


def _rawSize(filename: str) -> int:
    with open(filename, "rb") as f:
        return f.seek(0, os.SEEK_END)


def createImage(filename: str, fmt: str, size: int) -> None:
    """
    Create a new, empty image (replacing any file there). Blocking.

    A raw image is a sparse file; other formats are made by C{qemu-img
    create}.
    """
    if fmt == "raw":
        try:
            with open(filename, "wb") as f:
                f.truncate(size)
        except OSError as e:
            raise LocalImageError(f"Cannot create {filename}: {e.strerror}") from None
        return
    _run([_tool("qemu-img"), "create", "-q", "-f", fmt, "--", filename, str(size)])


def prepareRaw(filename: str, size: int) -> None:
    """
    Check that an existing raw file can take an image of C{size} bytes (a
    resumed download). Blocking.
    """
    try:
        actual = os.stat(filename).st_size
    except OSError as e:
        raise LocalImageError(f"Cannot resume into {filename}: {e.strerror}") from None
    if actual != size:
        raise LocalImageError(
            f"Cannot resume into {filename}: its size is {actual} bytes, the image's {size}"
        )
    if not reportsHoles(os.path.dirname(os.path.abspath(filename))):
        raise LocalImageError(
            f"Cannot resume into {filename}: its file system does not report holes"
        )


def reportsHoles(directory: str) -> bool:
    """
    @return: Whether files in C{directory} report their holes through
        C{SEEK_DATA} (what a resumed download uses to find what is missing).
    """
    with tempfile.TemporaryFile(dir=directory) as f:
        f.truncate(1024**2)
        try:
            os.lseek(f.fileno(), 0, os.SEEK_DATA)
        except OSError:
            # ENXIO: no data at all, as it should be.
            return True
        return False


@define
class QemuNBD:
    """
    A private C{qemu-nbd} serving one image on a UNIX socket in a private
    directory. It exits by itself when its last client disconnects, so an
    interrupted client leaves nothing behind.

    @ivar process: The running server.
    @ivar directory: Holds the socket; removed on L{stop}.
    """

    process: subprocess.Popen[bytes]
    directory: str
    socket: str = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.socket = os.path.join(self.directory, "sock")

    @property
    def url(self) -> str:
        return f"nbd:unix:{self.socket}"

    @classmethod
    def start(
        cls, filename: str, fmt: str, *, readOnly: bool, shared: int, bitmap: str | None = None
    ) -> QemuNBD:
        """
        Start serving C{filename}; it listens soon after (L{listening}).
        Blocking: call it on the disk-io pool.
        """
        qemuNBD = _tool("qemu-nbd")
        directory = tempfile.mkdtemp(prefix="imageio-client-")
        sock = os.path.join(directory, "sock")
        args = [
            qemuNBD,
            "--socket",
            sock,
            "--format",
            fmt,
            "--shared",
            str(shared),
            "--cache",
            "none" if _directIO(filename) else "writeback",
            "--aio",
            "threads",
            "--discard",
            "unmap",
            "--export-name",
            "",
        ]
        if readOnly:
            args.append("--read-only")
        if bitmap:
            args += ["--bitmap", bitmap]
        args += ["--", filename]
        try:
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            shutil.rmtree(directory, ignore_errors=True)
            raise LocalImageError(f"Cannot run qemu-nbd: {e.strerror}") from None
        return cls(process, directory)

    def listening(self) -> bool:
        """
        @return: Whether the server listens yet. Blocking (reads
            C{/proc/net/unix}): call it on the disk-io pool.
        @raise LocalImageError: If the server exited, with its last error
            line.
        """
        if _listening(self.socket):
            return True
        if self.process.poll() is not None:
            assert self.process.stderr is not None
            lines = self.process.stderr.read().decode("utf-8", "replace").strip()
            message = lines.splitlines()[-1] if lines else f"exit status {self.process.returncode}"
            raise LocalImageError(f"qemu-nbd failed: {message}")
        return False

    def stop(self) -> None:
        """
        Stop the server and remove its directory. Blocking.
        """
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(QEMU_NBD_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
            if self.process.stderr is not None:
                self.process.stderr.close()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def _directIO(filename: str) -> bool:
    """
    @return: Whether C{filename} can be opened with C{O_DIRECT} (tmpfs
        cannot on older kernels).
    """
    try:
        fd = os.open(filename, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def _listening(path: str) -> bool:
    """
    @return: Whether a UNIX socket at C{path} is listening, from
        C{/proc/net/unix}, without connecting (a probe connection would
        count as qemu-nbd's client).
    """
    try:
        with open("/proc/net/unix") as f:
            for line in f:
                fields = line.split()
                # Num RefCount Protocol Flags Type St Inode Path; flag
                # 0x10000 is __SO_ACCEPTCON: listening.
                if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & 0x10000:
                    return True
    except OSError:
        return os.path.exists(path)
    return False


def openFile(ctx: BackendContext, filename: str, *, write: bool) -> Deferred[IBackend]:
    """
    Open a raw file or block device through the file backend (sparse: zero
    punches holes).
    """
    from imageio.backends import file as _file

    url = "file://" + os.path.abspath(filename)
    return _file.openBackend(ctx, url, write=write, sparse=True, dirty=False)


def openNBD(
    ctx: BackendContext, server: QemuNBD, *, write: bool, dirty: bool = False
) -> Deferred[IBackend]:
    """
    Connect to a private C{qemu-nbd}.
    """
    # Imported here: a raw transfer does not load the NBD client.
    from imageio.backends import nbd as _nbd

    return _nbd.openBackend(ctx, server.url, write=write, sparse=True, dirty=dirty)


def localExtents(filename: str) -> list[tuple[int, int]]:
    """
    @return: The data ranges of a local file from C{SEEK_DATA}/C{SEEK_HOLE},
        as C{(start, end)} pairs. Blocking.
    """
    result: list[tuple[int, int]] = []
    fd = os.open(filename, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        offset = 0
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            result.append((start, end))
            offset = end
    finally:
        os.close(fd)
    return result


#: Granularity of the zero detection of downloads: a 64 KiB run of zeroes
#: (a qcow2 cluster) is left as a hole.
ZERO_BLOCK = 64 * 1024


def dataRuns(data: memoryview, block: int = ZERO_BLOCK) -> list[tuple[int, int]]:
    """
    @return: The C{(start, end)} runs of C{data} that are not all zeroes,
        in blocks of C{block} bytes. CPU work: run it on the pool.
    """
    from imageio._blkhash import isZero

    runs: list[tuple[int, int]] = []
    view = memoryview(data).cast("B")
    for start in range(0, len(view), block):
        end = min(start + block, len(view))
        if isZero(view[start:end]):
            continue
        if runs and runs[-1][1] == start:
            runs[-1] = (runs[-1][0], end)
        else:
            runs.append((start, end))
    return runs


@implementer(IBackend)
@define(eq=False)
class SparseTarget:
    """
    A new image as a download target: blocks of zeroes in the data are not
    written, so they stay holes (servers that do not report holes send
    them as data).
    """

    backend: IBackend
    diskio: Any

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def blockSize(self) -> int:
        return self.backend.blockSize

    @property
    def maxReaders(self) -> int:
        return self.backend.maxReaders

    @property
    def maxWriters(self) -> int:
        return self.backend.maxWriters

    def size(self) -> Deferred[int]:
        return self.backend.size()

    def readInto(self, offset: int, buf: memoryview) -> Deferred[int]:
        return self.backend.readInto(offset, buf)

    def write(self, offset: int, data: memoryview) -> Deferred[int]:
        return Deferred.fromCoroutine(self._write(offset, data))

    async def _write(self, offset: int, data: memoryview) -> int:
        runs = await self.diskio.run(dataRuns, data)
        for start, end in runs:
            await self.backend.write(offset + start, data[start:end])
        return len(data)

    def zero(self, offset: int, length: int) -> Deferred[None]:
        return self.backend.zero(offset, length)

    def flush(self) -> Deferred[None]:
        return self.backend.flush()

    def extents(self, context: str, start: int, length: int) -> Deferred[list[Extent]]:
        return self.backend.extents(context, start, length)

    def close(self) -> Deferred[None]:
        return self.backend.close()
