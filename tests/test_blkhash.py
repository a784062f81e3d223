# -*- test-case-name: tests.test_blkhash -*-
"""
Tests for L{imageio._blkhash}.

The known digests below were computed with upstream ovirt-imageio 2.5.1
(C{ovirt_imageio._internal.blkhash.checksum}) on the same images, so these
tests pin compatibility without needing upstream installed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from imageio import _blkhash
from imageio._blkhash import (
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    DEFAULT_BLOCK_SIZE,
    ZERO_BATCH,
    Block,
    BlockCutter,
    Hasher,
    InvalidParameter,
    checkAlgorithm,
    hashBackend,
    isZero,
    parseBlockSize,
    splitBlocks,
)
from imageio.interfaces import Extent

MiB = 1024**2
SIZE = 10 * MiB + 12345

# (zero tail, algorithm, block size) -> upstream checksum.
UPSTREAM = {
    (False, "blake2b", MiB): "7f6821d8e1fcb08ea8b476176d589e5be00e26934031483ffb3dcd59914d8f93",
    (False, "blake2b", 4 * MiB): "0eda2916d117b5bc3c8993ae18260a15a0c38d8da3dbdcb7fc9960b170e68334",
    (False, "sha256", MiB): "4e1ab65ff4d93ded6330294561879a802024bbb2c03ea80c602e1ec0cbb38254",
    (False, "sha256", 4 * MiB): "bc931b1169d95beddbdca3018e1d9f14776e624ef98c2284d789268f5f96d63e",
    (False, "blake2s", 4 * MiB): "2efed1533c12685fc3f6308dd57263453dbd8459e2bb215ae42a16a808b0453b",
    (False, "md5", 4 * MiB): "3e8127bb2996e2c656dfb051e5518e58",
    (True, "blake2b", MiB): "e85c97b03a2afbb470cab46d0347193f186ff3f8e4b96c42ef9701a07ba24997",
    (True, "blake2b", 4 * MiB): "386c7a874b9fe27df155f511664944879593208e671989bb1d352dbc24c2ed0b",
    (True, "sha256", 4 * MiB): "01532697009af7aaf73be51c26fc659b3b5a3366764a66254735ac267a7dc27b",
}


def makeImage(zeroTail: bool) -> bytearray:
    """
    Build a 10 MiB + 12345 bytes image with data, holes, a lone non-zero
    byte, a fully zero 4 MiB block and a short last block.

    @param zeroTail: Leave the last 12345 bytes zero.
    """
    buf = bytearray(SIZE)
    buf[0:MiB] = bytes(range(256)) * 4096
    buf[MiB : MiB + MiB // 2] = b"imageio!" * (MiB // 16)
    buf[3 * MiB + 4097] = 1
    buf[10 * MiB - 1000 : 10 * MiB] = b"\xff" * 1000
    if not zeroTail:
        buf[10 * MiB :] = (bytes(range(251)) * 50)[:12345]
    return buf


def imageExtents(zeroTail: bool) -> list[Extent]:
    """
    @return: Zero-context extents of L{makeImage}, as a backend with
        4 KiB granularity would report them.
    """
    extents = [
        Extent(0, 3 * MiB // 2, zero=False),
        Extent(3 * MiB // 2, 3 * MiB // 2, zero=True),
        Extent(3 * MiB, 8192, zero=False),
        Extent(3 * MiB + 8192, 7 * MiB - 8192 - 4096, zero=True),
        Extent(10 * MiB - 4096, 4096, zero=False),
    ]
    extents.append(Extent(10 * MiB, 12345, zero=zeroTail))
    return extents


def hashData(data: bytes | bytearray, algorithm: str, blockSize: int) -> str:
    """
    Hash C{data} block by block, without extents.
    """
    h = Hasher(algorithm, blockSize)
    view = memoryview(data)
    for start in range(0, len(data), blockSize):
        h.update(view[start : start + blockSize])
    return h.hexdigest()


class UpstreamCompatibilityTests(SynchronousTestCase):
    """
    L{Hasher} gives upstream's checksums.
    """

    def test_dataBlocks(self) -> None:
        """
        Hashing every block as data gives upstream's checksum.
        """
        for (zeroTail, algorithm, blockSize), expected in UPSTREAM.items():
            image = makeImage(zeroTail)
            self.assertEqual(
                hashData(image, algorithm, blockSize),
                expected,
                (zeroTail, algorithm, blockSize),
            )

    def test_withExtents(self) -> None:
        """
        Skipping the zero blocks that extents report gives upstream's
        checksum.
        """
        for (zeroTail, algorithm, blockSize), expected in UPSTREAM.items():
            image = memoryview(makeImage(zeroTail))
            h = Hasher(algorithm, blockSize)
            zeroBlocks = 0
            for block in splitBlocks(imageExtents(zeroTail), blockSize):
                if block.zero:
                    zeroBlocks += 1
                    h.zero(block.length)
                else:
                    h.update(image[block.start : block.start + block.length])
            self.assertGreater(zeroBlocks, 0)
            self.assertEqual(h.hashed, SIZE)
            self.assertEqual(h.hexdigest(), expected, (zeroTail, algorithm, blockSize))

    def test_empty(self) -> None:
        """
        An empty image hashes to the digest of no block digests.
        """
        self.assertEqual(
            Hasher("blake2b").hexdigest(),
            "0e5751c026e543b2e8ab2eb06099daa1d1e5df47778f7787faab45cdf12fe3a8",
        )
        self.assertEqual(
            Hasher("sha256").hexdigest(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        )


class HasherTests(SynchronousTestCase):
    """
    Tests for L{Hasher}.
    """

    def test_defaults(self) -> None:
        """
        A hasher defaults to blake2b with 4 MiB blocks.
        """
        h = Hasher()
        self.assertEqual((h.algorithm, h.blockSize), ("blake2b", 4 * MiB))
        self.assertEqual((DEFAULT_ALGORITHM, DEFAULT_BLOCK_SIZE), ("blake2b", 4 * MiB))

    def test_zeroDataBlockIsZeroBlock(self) -> None:
        """
        An all-zero data block hashes like a zero block of the same length,
        full or short.
        """
        for length in [MiB, 4096]:
            data = Hasher("sha256", MiB)
            data.update(bytearray(MiB))
            data.update(memoryview(bytearray(length)))
            zero = Hasher("sha256", MiB)
            zero.zero(MiB)
            zero.zero(length)
            self.assertEqual(data.hexdigest(), zero.hexdigest())

    def test_zeroBlockDigest(self) -> None:
        """
        The cached digest of a zero block is the real hash of zeroes, with
        32-byte blake2b digests.
        """
        for length in [1, 4096, MiB + 1, 4 * MiB]:
            h = Hasher("blake2b", 4 * MiB)
            h.zero(length)
            inner = hashlib.blake2b(bytes(length), digest_size=32).digest()
            expected = hashlib.blake2b(inner, digest_size=32).hexdigest()
            self.assertEqual(h.hexdigest(), expected, length)

    def test_dataBlockDigest(self) -> None:
        """
        A data block is hashed with the algorithm's default digest size
        except for blake2.
        """
        block = b"x" * 4096
        h = Hasher("sha512", MiB)
        h.update(block)
        expected = hashlib.sha512(hashlib.sha512(block).digest()).hexdigest()
        self.assertEqual(h.hexdigest(), expected)
        self.assertEqual(len(h.digest()), 64)

    def test_hashed(self) -> None:
        """
        The hasher counts the bytes of data and zero blocks.
        """
        h = Hasher("sha1", MiB)
        h.update(b"a" * MiB)
        h.zero(MiB)
        h.zero(10)
        self.assertEqual(h.hashed, 2 * MiB + 10)

    def test_shortBlockLast(self) -> None:
        """
        No block may follow a short one.
        """
        h = Hasher("sha1", MiB)
        h.update(b"a" * 10)
        self.assertRaises(ValueError, h.update, b"a" * MiB)
        self.assertRaises(ValueError, h.zero, MiB)

    def test_blockLength(self) -> None:
        """
        Empty blocks and blocks longer than the block size are refused.
        """
        h = Hasher("sha1", MiB)
        self.assertRaises(ValueError, h.update, b"")
        self.assertRaises(ValueError, h.zero, 0)
        self.assertRaises(ValueError, h.update, bytes(MiB + 1))
        self.assertEqual(h.hashed, 0)

    def test_unknownAlgorithm(self) -> None:
        """
        A hasher cannot be made for an algorithm not in L{ALGORITHMS}.
        """
        self.assertRaises(ValueError, Hasher, "shake_128")
        self.assertRaises(ValueError, Hasher, "nope")


class IsZeroTests(SynchronousTestCase):
    """
    Tests for L{isZero}.
    """

    def test_zeroes(self) -> None:
        """
        Buffers of zeroes, including empty ones and ones longer than the
        comparison chunk, are zero.
        """
        for length in [0, 1, 4096, MiB, 4 * MiB + 3]:
            self.assertTrue(isZero(bytearray(length)), length)

    def test_nonZeroAnywhere(self) -> None:
        """
        A single non-zero byte at the start, a chunk boundary or the end is
        found.
        """
        for index in [0, MiB - 1, MiB, 4 * MiB + 2]:
            buf = bytearray(4 * MiB + 3)
            buf[index] = 0x80
            self.assertFalse(isZero(memoryview(buf)), index)

    def test_wideItems(self) -> None:
        """
        Buffers of items wider than a byte are checked byte by byte.
        """
        view = memoryview(bytearray(16)).cast("Q")
        self.assertTrue(isZero(view))
        view[1] = 1 << 56
        self.assertFalse(isZero(view))


class ParameterTests(SynchronousTestCase):
    """
    Tests for L{checkAlgorithm}, L{parseBlockSize} and L{ALGORITHMS}.
    """

    def assertInvalidBlockSize(self, value: bytes | str, message: str) -> None:
        e = self.assertRaises(InvalidParameter, parseBlockSize, value)
        self.assertEqual((e.message, e.status), (message, 400))
        self.assertIsInstance(e, ValueError)

    def test_algorithms(self) -> None:
        """
        The algorithm list is sorted, comes from hashlib, and leaves out the
        variable-length shake algorithms.
        """
        self.assertEqual(ALGORITHMS, sorted(ALGORITHMS))
        self.assertTrue(set(ALGORITHMS) <= hashlib.algorithms_available)
        self.assertTrue({"blake2b", "blake2s", "md5", "sha1", "sha256"} <= set(ALGORITHMS))
        self.assertNotIn("shake_128", ALGORITHMS)
        self.assertNotIn("shake_256", ALGORITHMS)

    def test_algorithmDefault(self) -> None:
        """
        No algorithm means blake2b.
        """
        self.assertEqual(checkAlgorithm(None), "blake2b")

    def test_algorithmKnown(self) -> None:
        """
        Known algorithms are accepted as text or bytes.
        """
        self.assertEqual(checkAlgorithm("sha256"), "sha256")
        self.assertEqual(checkAlgorithm(b"blake2s"), "blake2s")

    def test_algorithmUnknown(self) -> None:
        """
        Unknown, empty and shake algorithms get upstream's text.
        """
        for value in ["x", "", "shake_128", "SHA256"]:
            e = self.assertRaises(InvalidParameter, checkAlgorithm, value)
            self.assertEqual(
                e.message,
                f"Unsupported value {value!r} for 'algorithm', expecting one of {ALGORITHMS}",
            )
            self.assertEqual(e.status, 400)
        e = self.assertRaises(InvalidParameter, checkAlgorithm, b"x")
        self.assertTrue(
            e.message.startswith(
                "Unsupported value 'x' for 'algorithm', expecting one of ['blake2b', 'blake2s', "
            )
        )

    def test_blockSizeDefault(self) -> None:
        """
        No block size means 4 MiB.
        """
        self.assertEqual(parseBlockSize(None), 4 * MiB)

    def test_blockSizeValid(self) -> None:
        """
        Aligned sizes from 1 MiB to 16 MiB are accepted as text or bytes.
        """
        self.assertEqual(parseBlockSize("1048576"), MiB)
        self.assertEqual(parseBlockSize(b"16777216"), 16 * MiB)
        self.assertEqual(parseBlockSize(b"1052672"), MiB + 4096)
        self.assertEqual(parseBlockSize("0004194304"), 4 * MiB)

    def test_blockSizeNotANumber(self) -> None:
        """
        Anything but ASCII digits is an invalid block size.
        """
        for value in ["abc", "", "+4194304", " 4194304", "4_194_304", "4194304.0", "0x400000"]:
            self.assertInvalidBlockSize(value, f"Invalid block size: {value!r}")
        self.assertInvalidBlockSize("\u0661".encode(), "Invalid block size: '\u0661'")

    def test_blockSizeOutOfRange(self) -> None:
        """
        Sizes below 1 MiB or above 16 MiB, however long, are out of range.
        """
        for value in ["0", "1044480", "16781312", "9" * 30, "9" * 5000]:
            self.assertInvalidBlockSize(value, "Block size out of allowed range: 1048576-16777216")

    def test_blockSizeUnaligned(self) -> None:
        """
        Sizes that are not a multiple of 4096 are refused.
        """
        self.assertInvalidBlockSize("1050000", "Block size is not aligned to 4096")


class SplitBlocksTests(SynchronousTestCase):
    """
    Tests for L{splitBlocks}.
    """

    def split(self, extents: list[tuple[int, int, bool]], blockSize: int) -> list[Block]:
        return list(splitBlocks([Extent(*e) for e in extents], blockSize))

    def test_mergeSmallExtents(self) -> None:
        """
        Small extents merge into one block, which is zero only if all of them
        are.
        """
        self.assertEqual(
            self.split([(0, 100, False), (100, 100, True), (200, 56, True)], 256),
            [Block(0, 256, False)],
        )
        self.assertEqual(self.split([(0, 100, True), (100, 156, True)], 256), [Block(0, 256, True)])

    def test_splitLargeExtents(self) -> None:
        """
        Large extents are cut into aligned blocks, the tail joining the next
        extent's block.
        """
        self.assertEqual(
            self.split([(0, 600, True), (600, 424, False)], 256),
            [
                Block(0, 256, True),
                Block(256, 256, True),
                Block(512, 256, False),
                Block(768, 256, False),
            ],
        )

    def test_shortLastBlock(self) -> None:
        """
        The last block is short when the image is not a multiple of the
        block size.
        """
        self.assertEqual(
            self.split([(0, 300, True)], 256), [Block(0, 256, True), Block(256, 44, True)]
        )

    def test_holeIsNotZero(self) -> None:
        """
        Only the C{zero} flag decides; a hole reading from a backing file is
        data.
        """
        blocks = list(splitBlocks([Extent(0, 256, zero=False, hole=True)], 256))
        self.assertEqual(blocks, [Block(0, 256, False)])

    def test_empty(self) -> None:
        """
        No extents, no blocks.
        """
        self.assertEqual(self.split([], 256), [])


class BlockCutterTests(SynchronousTestCase):
    """
    Tests for L{BlockCutter}: extents fed a window at a time.
    """

    def test_windowsGiveTheSameBlocks(self) -> None:
        """
        Feeding the extents one at a time, with blocks spanning windows,
        gives the blocks of feeding them all at once.
        """
        extents = imageExtents(zeroTail=True)
        for blockSize in (MiB, 4 * MiB):
            cutter = BlockCutter(blockSize)
            blocks = []
            for extent in extents:
                blocks.extend(cutter.cut([extent]))
            last = cutter.rest()
            self.assertIsNotNone(last)
            blocks.append(last)
            self.assertEqual(blocks, list(splitBlocks(extents, blockSize)))

    def test_restOnce(self) -> None:
        """
        The short block is given once, and none when the extents end on a
        block boundary.
        """
        cutter = BlockCutter(256)
        self.assertEqual(list(cutter.cut([Extent(0, 300, zero=False)])), [Block(0, 256, False)])
        self.assertEqual(cutter.rest(), Block(256, 44, False))
        self.assertIsNone(cutter.rest())
        cutter = BlockCutter(256)
        list(cutter.cut([Extent(0, 512, zero=True)]))
        self.assertIsNone(cutter.rest())


class WindowedBackend:
    """
    A backend over an image in memory that reports extents at most
    C{window} at a time and records every call.
    """

    def __init__(self, image: bytearray, extents: list[Extent], window: int = 1) -> None:
        self.image = image
        self.imageExtents = extents
        self.window = window
        self.calls: list[tuple[str, int]] = []

    def extents(self, context: str, start: int, length: int) -> Deferred[list[Extent]]:
        self.calls.append(("extents", start))
        got = [
            e for e in self.imageExtents if e.start + e.length > start and e.start < start + length
        ]
        return succeed(got[: self.window])

    def readInto(self, offset: int, buf: memoryview) -> Deferred[int]:
        self.calls.append(("read", offset))
        n = len(buf)
        buf[:] = self.image[offset : offset + n]
        return succeed(n)


class HashBackendTests(SynchronousTestCase):
    """
    Tests for L{hashBackend}.
    """

    def hash(
        self,
        backend: WindowedBackend,
        blockSize: int,
        progress: Callable[[int], None] = lambda end: None,
        pool: list[int] | None = None,
        size: int = SIZE,
    ) -> tuple[Hasher, Deferred[None]]:
        def runInPool(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
            if pool is not None:
                pool.append(1)
            return maybeDeferred(fn, *args)

        h = Hasher(DEFAULT_ALGORITHM, blockSize)
        d = hashBackend(backend, size, h, memoryview(bytearray(blockSize)), runInPool, progress)
        return h, d

    def test_upstreamChecksum(self) -> None:
        """
        Extents one at a time give upstream's checksum.
        """
        for zeroTail in (False, True):
            backend = WindowedBackend(makeImage(zeroTail), imageExtents(zeroTail))
            h, d = self.hash(backend, MiB)
            self.successResultOf(d)
            self.assertEqual(h.hexdigest(), UPSTREAM[(zeroTail, DEFAULT_ALGORITHM, MiB)])

    def test_streams(self) -> None:
        """
        Blocks are read as their extents arrive, not after the whole map is
        collected: memory stays one window of extents.
        """
        backend = WindowedBackend(makeImage(False), imageExtents(False))
        self.successResultOf(self.hash(backend, MiB)[1])
        firstRead = backend.calls.index(("read", 0))
        lastExtents = max(i for i, call in enumerate(backend.calls) if call[0] == "extents")
        self.assertLess(firstRead, lastExtents)

    def test_zeroRunsBatched(self) -> None:
        """
        A run of zero blocks is hashed with one pool call per
        L{ZERO_BATCH} blocks, not one per block.
        """
        size = (ZERO_BATCH + 10) * 4096
        backend = WindowedBackend(bytearray(), [Extent(0, size, zero=True)])
        pool: list[int] = []
        progress: list[int] = []
        h, d = self.hash(backend, 4096, progress.append, pool, size)
        self.successResultOf(d)
        self.assertEqual(len(pool), 2)
        self.assertEqual(h.hashed, size)
        self.assertEqual(progress[-1], size)

    def test_cutsLazily(self) -> None:
        """
        Blocks are cut as they are hashed, not all of a window first: one
        extent may hold millions of blocks, and the reactor must get back
        control at least every L{ZERO_BATCH} of them.
        """
        made: list[int] = []

        def block(start: int, length: int, zero: bool) -> Block:
            made.append(start)
            return Block(start, length, zero)

        self.patch(_blkhash, "Block", block)
        size = 3 * ZERO_BATCH * 4096
        backend = WindowedBackend(bytearray(), [Extent(0, size, zero=True)])
        cutWhenCalled: list[int] = []

        def runInPool(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
            cutWhenCalled.append(len(made))
            return Deferred()

        h = Hasher(DEFAULT_ALGORITHM, 4096)
        hashBackend(backend, size, h, memoryview(bytearray(4096)), runInPool, lambda end: None)
        self.assertEqual(cutWhenCalled, [ZERO_BATCH])

    def test_progressStops(self) -> None:
        """
        An exception from C{progress} stops the work before the next read.
        """
        backend = WindowedBackend(makeImage(False), imageExtents(False))

        def progress(end: int) -> None:
            if end > 0:
                raise RuntimeError("canceled")

        h, d = self.hash(backend, MiB, progress)
        self.failureResultOf(d, RuntimeError)
        self.assertEqual([c for c in backend.calls if c[0] == "read"], [("read", 0)])

    def test_shortRead(self) -> None:
        """
        A short read fails with C{EIO}, naming the offset.
        """
        backend = WindowedBackend(makeImage(False), imageExtents(False))
        backend.readInto = lambda offset, buf: succeed(len(buf) - 1)  # type: ignore[method-assign]
        f = self.failureResultOf(self.hash(backend, MiB)[1], OSError)
        self.assertIn("Short read at 0", str(f.value))
