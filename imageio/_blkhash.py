# -*- test-case-name: tests.test_blkhash -*-
"""
The block checksum of C{GET /images/<id>/checksum}, identical to upstream
ovirt-imageio's "blkhash" for the same image, algorithm and block size.

The image is cut into C{blockSize} blocks (the last one may be shorter).
Each block is hashed on its own, and the checksum is the hash, with the same
algorithm, of the concatenated block digests. C{blake2b} and C{blake2s} use
32-byte digests; every other algorithm its default size.

A block of zeroes always has the same digest, so zero extents and data
blocks that read as zeroes are not hashed: their digest comes from a small
cache. A sparse multi-TiB image costs one dictionary lookup per block.

Hashing a block is CPU work meant to run on the disk-io thread pool:
C{hashlib} releases the GIL on large buffers, L{Hasher} instances share no
mutable state, and the zero-digest cache is thread-safe.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Callable, Generator, Iterable, Iterator
from functools import lru_cache, partial
from typing import Any, Protocol

from attrs import define, field, frozen, setters
from twisted.internet.defer import Deferred, inlineCallbacks

from imageio.interfaces import Extent, IBackend

MiB = 1024**2

DEFAULT_ALGORITHM = "blake2b"
DEFAULT_BLOCK_SIZE = 4 * MiB
MIN_BLOCK_SIZE = DEFAULT_BLOCK_SIZE // 4
MAX_BLOCK_SIZE = DEFAULT_BLOCK_SIZE * 4
BLOCK_ALIGNMENT = 4096

_BLAKE2_DIGEST_SIZE = 32
"""
Upstream's digest size for C{blake2b} and C{blake2s}: valid for both, and
large enough.
"""

_ZERO = bytes(MiB)
"""
Zeroes to compare and hash blocks against, a chunk at a time, so no
block-sized zero buffer is ever allocated.
"""

_SHOWN = 100
"""
How much of a rejected query value is echoed in the error text.
"""


class _Hash(Protocol):
    """
    What we use of a C{hashlib} hash object.
    """

    @property
    def digest_size(self) -> int: ...

    def update(self, data: bytes | bytearray | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...

    def hexdigest(self) -> str: ...


def _constructor(algorithm: str) -> Callable[[], _Hash]:
    """
    @return: A callable making a new, empty hash object for C{algorithm}, with
        upstream's digest size.
    """
    # Checksums are for integrity, not security: keep md5 and sha1 usable on
    # FIPS hosts.
    if algorithm in ("blake2b", "blake2s"):
        blake2 = getattr(hashlib, algorithm)
        return partial(blake2, digest_size=_BLAKE2_DIGEST_SIZE, usedforsecurity=False)
    return partial(hashlib.new, algorithm, usedforsecurity=False)


def _usable(algorithm: str) -> bool:
    """
    @return: C{True} if C{algorithm} can be constructed and has a fixed digest
        size (the C{shake} family needs a length, which upstream never passes).
    """
    try:
        return _constructor(algorithm)().digest_size > 0
    except ValueError:
        return False


ALGORITHMS: list[str] = sorted(a for a in hashlib.algorithms_available if _usable(a))
"""
Algorithm names for C{/checksum/algorithms}, sorted: upstream's
C{hashlib.algorithms_available}, minus the variable-length C{shake_128} and
C{shake_256}, which upstream lists but cannot compute (it answers 500).
"""

_ALGORITHM_SET = frozenset(ALGORITHMS)


class InvalidParameter(ValueError):
    """
    A checksum query parameter is invalid.

    @ivar message: The error text for the response body (upstream's).
    @ivar status: The HTTP status to answer with, 400.
    """

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _text(value: bytes | str) -> str:
    """
    Decode a query value as upstream's C{parse_qsl} does.
    """
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


def _show(value: str) -> str:
    """
    Quote a value for an error text, shortening long values.
    """
    if len(value) > _SHOWN:
        return f"{value[:_SHOWN]!r}... ({len(value)} characters)"
    return repr(value)


def checkAlgorithm(value: bytes | str | None) -> str:
    """
    Validate the C{algorithm} query parameter.

    @param value: The parameter's last value, or C{None} when absent. An
        empty value is invalid, as upstream's.
    @return: The algorithm name, L{DEFAULT_ALGORITHM} when absent.
    @raise InvalidParameter: C{Unsupported value '<value>' for 'algorithm',
        expecting one of [...]}.
    """
    if value is None:
        return DEFAULT_ALGORITHM
    name = _text(value)
    if name not in _ALGORITHM_SET:
        raise InvalidParameter(
            f"Unsupported value {_show(name)} for 'algorithm', expecting one of {ALGORITHMS}"
        )
    return name


def parseBlockSize(value: bytes | str | None) -> int:
    """
    Validate the C{block_size} query parameter.

    Unlike upstream (which uses C{int()}), only ASCII digits are accepted.

    @param value: The parameter's last value, or C{None} when absent.
    @return: The block size, L{DEFAULT_BLOCK_SIZE} when absent.
    @raise InvalidParameter: C{Invalid block size: '<value>'}, C{Block size
        out of allowed range: 1048576-16777216} or C{Block size is not aligned
        to 4096}.
    """
    if value is None:
        return DEFAULT_BLOCK_SIZE
    text = _text(value)
    if not (text.isascii() and text.isdigit()):
        raise InvalidParameter(f"Invalid block size: {_show(text)}")
    # A long number is out of range whatever its value; don't convert it.
    blockSize = int(text) if len(text) <= 20 else MAX_BLOCK_SIZE + 1
    if not MIN_BLOCK_SIZE <= blockSize <= MAX_BLOCK_SIZE:
        raise InvalidParameter(
            f"Block size out of allowed range: {MIN_BLOCK_SIZE}-{MAX_BLOCK_SIZE}"
        )
    if blockSize % BLOCK_ALIGNMENT:
        raise InvalidParameter(f"Block size is not aligned to {BLOCK_ALIGNMENT}")
    return blockSize


def isZero(data: bytes | bytearray | memoryview) -> bool:
    """
    @return: C{True} if every byte of C{data} is zero. Runs at memory speed
        (C{memcmp} against a zero chunk), without copying C{data}.
    """
    view = memoryview(data).cast("B")
    chunk = len(_ZERO)
    for start in range(0, len(view), chunk):
        if not _ZERO.startswith(view[start : start + chunk]):
            return False
    return True


@lru_cache(maxsize=64)
def _zeroDigest(algorithm: str, length: int) -> bytes:
    """
    @return: The digest of C{length} zero bytes. Cached per algorithm and
        length; C{lru_cache} is thread-safe, and at worst two threads compute
        the same digest once each.
    """
    h = _constructor(algorithm)()
    chunk = len(_ZERO)
    for start in range(0, length, chunk):
        h.update(memoryview(_ZERO)[: min(chunk, length - start)])
    return h.digest()


def _checkAlgorithmName(instance: object, attribute: object, value: str) -> None:
    if value not in _ALGORITHM_SET:
        raise ValueError(f"Unsupported algorithm {value!r}")


def _checkPositive(instance: object, attribute: object, value: int) -> None:
    if value < 1:
        raise ValueError(f"Block size must be positive, got {value}")


# No validation on assignment: it would cost a Python call per block.
@define(on_setattr=setters.NO_OP)
class Hasher:
    """
    Incremental blkhash of one image.

    Feed every block in image order: L{update} for data, L{zero} for blocks
    known to read as zeroes. Every block is C{blockSize} bytes except the
    last, which may be shorter. One block at a time per instance, from any
    thread.

    @ivar algorithm: A name from L{ALGORITHMS}.
    @ivar blockSize: The block size the image is cut into.
    @ivar hashed: Bytes hashed so far.
    """

    algorithm: str = field(default=DEFAULT_ALGORITHM, validator=_checkAlgorithmName)
    blockSize: int = field(default=DEFAULT_BLOCK_SIZE, validator=_checkPositive)
    hashed: int = field(init=False, default=0)
    _new: Callable[[], _Hash] = field(init=False, repr=False)
    _outer: _Hash = field(init=False, repr=False)
    _ended: bool = field(init=False, default=False, repr=False)
    _fullZero: bytes | None = field(init=False, default=None, repr=False)

    def __attrs_post_init__(self) -> None:
        self._new = _constructor(self.algorithm)
        self._outer = self._new()

    def _block(self, length: int) -> None:
        """
        Account for a block of C{length} bytes, refusing blocks that would
        give a result upstream never computes.
        """
        if self._ended:
            raise ValueError("A short block must be the last one")
        if not 0 < length <= self.blockSize:
            raise ValueError(f"Block length {length} not in 1-{self.blockSize}")
        self._ended = length < self.blockSize
        self.hashed += length

    def update(self, block: bytes | bytearray | memoryview) -> None:
        """
        Hash the next block of image data. A block of zeroes is detected and
        takes the fast path of L{zero}.
        """
        length = memoryview(block).nbytes
        self._block(length)
        if isZero(block):
            self._outer.update(self._zeroBlockDigest(length))
        else:
            self._outer.update(self._hashBlock(block))

    def _hashBlock(self, block: bytes | bytearray | memoryview) -> bytes:
        h = self._new()
        h.update(block)
        return h.digest()

    def zero(self, length: int) -> None:
        """
        Hash the next block, C{length} bytes known to read as zeroes, without
        reading it.
        """
        self._block(length)
        self._outer.update(self._zeroBlockDigest(length))

    def _zeroBlockDigest(self, length: int) -> bytes:
        # Full blocks skip the shared cache: sparse images are mostly these.
        if length != self.blockSize:
            return _zeroDigest(self.algorithm, length)
        if self._fullZero is None:
            self._fullZero = _zeroDigest(self.algorithm, length)
        return self._fullZero

    def digest(self) -> bytes:
        """
        @return: The checksum of the blocks so far.
        """
        return self._outer.digest()

    def hexdigest(self) -> str:
        """
        @return: The checksum of the blocks so far, as the hex string of the
            C{checksum} key in the JSON answer.
        """
        return self._outer.hexdigest()


@frozen
class Block:
    """
    One block of the image, as cut by L{BlockCutter}.

    @ivar zero: Every extent the block covers reads as zeroes.
    """

    start: int
    length: int
    zero: bool


class BlockCutter:
    """
    Cut contiguous extents into the blocks to feed a L{Hasher}, as they
    arrive: extents come a window at a time, and a block may span windows.

    Blocks are C{blockSize} long and aligned to it, except the last one. A
    block is zero only if all the extents it covers are (C{hole} is ignored:
    holes read from the backing chain).

    @ivar blockSize: The block size the image is cut into.
    """

    def __init__(self, blockSize: int) -> None:
        self.blockSize = blockSize
        self._start = 0
        self._length = 0
        self._zero = True

    def cut(self, extents: Iterable[Extent]) -> Iterator[Block]:
        """
        Take the next extents, in order and without gaps after the ones
        before, and give every block they complete.
        """
        for extent in extents:
            offset = extent.start
            remaining = extent.length
            while remaining:
                if self._length == 0:
                    self._start = offset
                    self._zero = True
                taken = min(self.blockSize - self._length, remaining)
                self._length += taken
                self._zero = self._zero and extent.zero
                offset += taken
                remaining -= taken
                if self._length == self.blockSize:
                    self._length = 0
                    yield Block(self._start, self.blockSize, self._zero)

    def rest(self) -> Block | None:
        """
        @return: The last, short block the extents so far began, if any.
        """
        if not self._length:
            return None
        block = Block(self._start, self._length, self._zero)
        self._length = 0
        return block


def splitBlocks(extents: Iterable[Extent], blockSize: int) -> Iterator[Block]:
    """
    Cut contiguous extents into the blocks to feed a L{Hasher}, as
    L{BlockCutter} does.

    @param extents: Zero-context extents covering the image from offset 0,
        in order, without gaps.
    """
    cutter = BlockCutter(blockSize)
    yield from cutter.cut(extents)
    last = cutter.rest()
    if last is not None:
        yield last


#: Zero blocks hashed per pool call: runs of them are batched, and a
#: cancel is still seen within a few milliseconds.
ZERO_BATCH = 4096


@inlineCallbacks
def hashBackend(
    backend: IBackend,
    size: int,
    hasher: Hasher,
    buf: memoryview,
    runInPool: Callable[..., Deferred[Any]],
    progress: Callable[[int], None],
) -> Generator[Deferred[Any], Any, None]:
    """
    Feed C{hasher} the first C{size} bytes of C{backend}, asking for its
    extents a window at a time, so memory stays one window of extents and
    one block, whatever the size and fragmentation of the image.

    @param buf: A page-aligned buffer of at least C{hasher.blockSize}
        bytes, read into for data blocks.
    @param runInPool: Runs a callable on the disk-io pool: hashing is CPU
        work.
    @param progress: Called with the offset up to which the image is
        hashed, before each window of extents and each data block is read
        and after each is hashed; may raise to stop the work.
    @return: A Deferred firing when every block is hashed.
    """
    cutter = BlockCutter(hasher.blockSize)
    position = 0
    while position < size:
        progress(position)
        got = yield backend.extents("zero", position, size - position)
        if not got:
            break
        position = got[-1].start + got[-1].length
        zeros: list[Block] = []
        # Cut lazily: one extent may hold millions of blocks, and the
        # reactor gets control back at least every ZERO_BATCH of them.
        for block in _windowBlocks(cutter, got, position >= size):
            if block.zero:
                zeros.append(block)
                if len(zeros) < ZERO_BATCH:
                    continue
            if zeros:
                yield runInPool(_hashZeros, hasher, [b.length for b in zeros])
                progress(zeros[-1].start + zeros[-1].length)
                zeros = []
            if block.zero:
                continue
            progress(block.start)
            view = buf[: block.length]
            n = yield backend.readInto(block.start, view)
            if n != block.length:
                raise OSError(errno.EIO, f"Short read at {block.start}")
            yield runInPool(hasher.update, view)
            progress(block.start + block.length)
        if zeros:
            yield runInPool(_hashZeros, hasher, [b.length for b in zeros])
            progress(zeros[-1].start + zeros[-1].length)


def _windowBlocks(cutter: BlockCutter, extents: list[Extent], last: bool) -> Iterator[Block]:
    """
    The blocks C{extents} complete, and if they are the C{last} window, the
    short block they end with.
    """
    yield from cutter.cut(extents)
    if last:
        rest = cutter.rest()
        if rest is not None:
            yield rest


def _hashZeros(hasher: Hasher, lengths: list[int]) -> None:
    for length in lengths:
        hasher.zero(length)
