# -*- test-case-name: tests.test_backend_memory -*-
"""
The C{memory:} backend, for tests: images are byte arrays in this process.

C{memory:NAME?size=N} opens the image registered as C{NAME}, creating it
with C{N} zero bytes if there is none; C{memory:} (or C{memory:?size=N})
opens a fresh private image. Every connection to a name sees the same
bytes. Operations complete at once, and L{failNext} makes the next one
fail, to test error paths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import parse_qs, urlsplit

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure
from zope.interface import implementer

from imageio.backends.file import BackendClosed
from imageio.interfaces import Extent, IBackend, IReadIntoThen, UnsupportedOperation

if TYPE_CHECKING:
    from imageio.backends import BackendContext

T = TypeVar("T")

#: Operations L{failNext} can make fail.
OPERATIONS = frozenset({"open", "size", "read", "write", "zero", "flush", "extents"})

#: Granularity of zero detection in C{extents}.
ZERO_BLOCK = 4096

_images: dict[str, bytearray] = {}
_failures: dict[tuple[str, str], list[Exception]] = {}


def createImage(name: str, data: bytes | bytearray = b"") -> bytearray:
    """
    Register (or replace) the image C{name}.

    @return: The image's bytes; the test may inspect or change them.
    """
    image = bytearray(data)
    _images[name] = image
    return image


def removeImage(name: str) -> None:
    """
    Forget the image C{name} and any failures queued for it. Open backends
    keep their bytes.
    """
    _images.pop(name, None)
    for key in [k for k in _failures if k[0] == name]:
        del _failures[key]


def failNext(name: str, op: str, exc: Exception) -> None:
    """
    Make the next C{op} on image C{name}, by any connection, fail with
    C{exc}. Calls queue up: each fails one operation.

    @param op: One of L{OPERATIONS}.
    """
    if op not in OPERATIONS:
        raise ValueError(f"Unknown operation {op!r}, expecting one of {sorted(OPERATIONS)}")
    _failures.setdefault((name, op), []).append(exc)


def _takeFailure(name: str, op: str) -> Exception | None:
    queue = _failures.get((name, op))
    if not queue:
        return None
    exc = queue.pop(0)
    if not queue:
        del _failures[(name, op)]
    return exc


def openBackend(
    ctx: BackendContext, url: str, *, write: bool, sparse: bool, dirty: bool
) -> Deferred[IBackend]:
    """
    Open the memory image named by C{url}.
    """
    parts = urlsplit(url)
    if parts.scheme != "memory":
        return fail(ValueError(f"Not a memory URL: {url!r}"))
    name = parts.path
    try:
        sizes = parse_qs(parts.query, strict_parsing=bool(parts.query)).get("size", ["0"])
        size = int(sizes[-1])
        if size < 0:
            raise ValueError(size)
    except ValueError:
        return fail(ValueError(f"Invalid memory URL: {url!r}"))
    exc = _takeFailure(name, "open")
    if exc is not None:
        return fail(exc)
    if not name:
        image = bytearray(size)
    elif name in _images:
        image = _images[name]
    else:
        image = createImage(name, bytes(size))
    return succeed(MemoryBackend(name, image, writable=write))


@implementer(IBackend, IReadIntoThen)
@define
class MemoryBackend:
    """
    An open memory image.

    @ivar imageName: The registry name, empty for a private image.
    @ivar image: The bytes, shared with other backends on the same name.
    """

    imageName: str
    image: bytearray
    writable: bool
    name: str = "memory"
    blockSize: int = 1
    maxReaders: int = 8
    maxWriters: int = 8
    _closed: bool = field(default=False, init=False)

    def size(self) -> Deferred[int]:
        return self._do("size", lambda: len(self.image))

    def readInto(self, offset: int, buf: memoryview) -> Deferred[int]:
        def read() -> int:
            data = self.image[offset : offset + len(buf)]
            buf[: len(data)] = data
            return len(data)

        return self._do("read", read, offset)

    def readIntoThen(
        self, offset: int, buf: memoryview, then: Callable[[int | Failure], object]
    ) -> None:
        # As readInto, without its Deferred.
        try:
            exc = self._refusal("read", offset)
            if exc is None:
                data = self.image[offset : offset + len(buf)]
                buf[: len(data)] = data
                outcome: int | Failure = len(data)
            else:
                outcome = Failure(exc)
        except Exception:
            outcome = Failure()
        then(outcome)

    def write(self, offset: int, data: memoryview) -> Deferred[int]:
        def write() -> int:
            n = len(memoryview(data).cast("B"))
            self._grow(offset)
            self.image[offset : offset + n] = data
            return n

        return self._do("write", write, offset, writing=True)

    def zero(self, offset: int, length: int) -> Deferred[None]:
        def zero() -> None:
            self._grow(offset + length)
            self.image[offset : offset + length] = bytes(length)

        return self._do("zero", zero, offset, length, writing=True)

    def flush(self) -> Deferred[None]:
        return self._do("flush", lambda: None)

    def extents(self, context: str, start: int, length: int) -> Deferred[list[Extent]]:
        """
        Report runs of whole L{ZERO_BLOCK}s of zeroes as zero extents.
        """
        if context != "zero":
            return fail(UnsupportedOperation(f"Backend memory does not support {context} extents"))
        return self._do("extents", lambda: self._extents(start, length), start, length)

    def close(self) -> Deferred[None]:
        self._closed = True
        return succeed(None)

    def _do(
        self, op: str, fn: Callable[[], T], *numbers: int, writing: bool = False
    ) -> Deferred[T]:
        exc = self._refusal(op, *numbers, writing=writing)
        if exc is not None:
            return fail(exc)
        return succeed(fn())

    def _refusal(self, op: str, *numbers: int, writing: bool = False) -> Exception | None:
        """
        @return: Why C{op} fails before it starts (closed, read-only, a
            negative number, a failure injected for tests), or C{None}.
        """
        if self._closed:
            return BackendClosed(f"Backend memory is closed: {self.imageName!r}")
        if writing and not self.writable:
            return UnsupportedOperation("Backend memory was opened read-only")
        if any(n < 0 for n in numbers):
            return ValueError(f"Negative offset or length: {numbers}")
        return _takeFailure(self.imageName, op)

    def _grow(self, size: int) -> None:
        if size > len(self.image):
            self.image.extend(bytes(size - len(self.image)))

    def _extents(self, start: int, length: int) -> list[Extent]:
        end = min(start + length, len(self.image))
        extents: list[Extent] = []
        pos = start
        while pos < end:
            stop = min(end, (pos // ZERO_BLOCK + 1) * ZERO_BLOCK)
            zero = self.image.count(0, pos, stop) == stop - pos
            last = extents[-1] if extents else None
            if last is not None and last.zero == zero:
                extents[-1] = Extent(last.start, stop - last.start, zero=zero)
            else:
                extents.append(Extent(pos, stop - pos, zero=zero))
            pos = stop
        return extents
