# -*- test-case-name: tests.test_backend_memory -*-
"""
Tests for L{imageio.backends.memory}.
"""

from __future__ import annotations

from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from imageio._diskio import SynchronousDiskIO
from imageio.backends import BackendContext, BackendOpener, memory
from imageio.backends.file import BackendClosed
from imageio.interfaces import Extent, IBackend, IReadIntoThen, UnsupportedOperation


class MemoryBackendTests(SynchronousTestCase):
    """
    Tests for the C{memory:} backend.
    """

    def setUp(self) -> None:
        self.opener = BackendOpener(BackendContext(reactor=None, diskio=SynchronousDiskIO()))
        self.addCleanup(memory.removeImage, "disk")

    def open(self, url: str = "memory:disk", write: bool = True) -> IBackend:
        d = self.opener.open(url, write=write, sparse=False, dirty=False)
        return self.successResultOf(d)

    def read(self, backend: IBackend, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        n = self.successResultOf(backend.readInto(offset, memoryview(buf)))
        return bytes(buf[:n])

    def test_provides(self) -> None:
        """
        The backend provides L{IBackend} with block size 1 and 8 readers
        and writers.
        """
        backend = self.open()
        self.assertTrue(verifyObject(IBackend, backend))
        self.assertEqual(
            (backend.name, backend.blockSize, backend.maxReaders, backend.maxWriters),
            ("memory", 1, 8, 8),
        )

    def test_sharedByName(self) -> None:
        """
        Connections to the same name see the same bytes as the test.
        """
        image = memory.createImage("disk", b"hello")
        first, second = self.open(), self.open()
        self.successResultOf(first.write(1, memoryview(b"ELL")))
        self.assertEqual(self.read(second, 0, 10), b"hELLo")
        self.assertEqual(image, b"hELLo")

    def test_sizeFromURL(self) -> None:
        """
        A new name is created with C{size} zero bytes; C{memory:} alone is
        a private empty image.
        """
        self.assertEqual(self.successResultOf(self.open("memory:disk?size=100").size()), 100)
        self.assertEqual(self.successResultOf(self.open("memory:").size()), 0)

    def test_badURL(self) -> None:
        """
        A bad size fails the open with C{ValueError}.
        """
        for url in ["memory:disk?size=x", "memory:disk?size=-1", "memory:disk?junk"]:
            d = self.opener.open(url, write=False, sparse=False, dirty=False)
            self.failureResultOf(d, ValueError)

    def test_writeZeroGrow(self) -> None:
        """
        Writing and zeroing past the end grow the image with zeroes.
        """
        image = memory.createImage("disk", b"ab")
        backend = self.open()
        self.assertEqual(self.successResultOf(backend.write(4, memoryview(b"cd"))), 2)
        self.successResultOf(backend.zero(5, 3))
        self.assertEqual(image, b"ab\0\0c\0\0\0")

    def test_extents(self) -> None:
        """
        Runs of zero blocks are zero extents, clipped to the window.
        """
        block = memory.ZERO_BLOCK
        memory.createImage("disk", bytes(block) + b"x" * block + bytes(block))
        extents = self.successResultOf(self.open().extents("zero", 1, 10 * block))
        self.assertEqual(
            extents,
            [
                Extent(1, block - 1, zero=True),
                Extent(block, block, zero=False),
                Extent(2 * block, block, zero=True),
            ],
        )
        d = self.open().extents("dirty", 0, 1)
        self.failureResultOf(d, UnsupportedOperation)

    def test_failNext(self) -> None:
        """
        L{memory.failNext} fails the next operation of that kind only.
        """
        memory.createImage("disk", b"abc")
        memory.failNext("disk", "open", OSError("no open"))
        self.failureResultOf(self.opener.open("memory:disk", write=True, sparse=False, dirty=False))
        backend = self.open()
        memory.failNext("disk", "write", OSError("no write"))
        self.failureResultOf(backend.write(0, memoryview(b"x")), OSError)
        self.successResultOf(backend.write(0, memoryview(b"x")))
        self.assertRaises(ValueError, memory.failNext, "disk", "dance", OSError())

    def test_readOnlyAndClosed(self) -> None:
        """
        A read-only backend refuses writes; a closed one refuses everything.
        """
        backend = self.open(write=False)
        self.failureResultOf(backend.zero(0, 1), UnsupportedOperation)
        self.successResultOf(backend.close())
        self.successResultOf(backend.close())
        self.failureResultOf(backend.size(), BackendClosed)

    def test_readIntoThen(self) -> None:
        """
        C{readIntoThen} gives C{then} what C{readInto} gives its Deferred:
        the bytes read (short at the end), or the failure (injected, a
        negative offset, closed).
        """
        memory.createImage("disk", b"hello")
        backend = self.open()
        self.assertTrue(IReadIntoThen.providedBy(backend))
        buf = bytearray(4)
        outcomes: list[object] = []
        backend.readIntoThen(3, memoryview(buf), outcomes.append)  # type: ignore[attr-defined]
        self.assertEqual((outcomes, buf[:2]), ([2], b"lo"))
        memory.failNext("disk", "read", OSError("no read"))
        backend.readIntoThen(0, memoryview(buf), outcomes.append)  # type: ignore[attr-defined]
        backend.readIntoThen(-1, memoryview(buf), outcomes.append)  # type: ignore[attr-defined]
        self.successResultOf(backend.close())
        backend.readIntoThen(0, memoryview(buf), outcomes.append)  # type: ignore[attr-defined]
        kinds = [f.type if isinstance(f, Failure) else f for f in outcomes[1:]]
        self.assertEqual(kinds, [OSError, ValueError, BackendClosed])
