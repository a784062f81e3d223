# -*- test-case-name: tests.test_upload -*-
"""
Page-aligned buffers for O_DIRECT I/O.
"""

from __future__ import annotations

import mmap

#: Alignment of every buffer from L{allocate}; enough for O_DIRECT on any
#: storage with logical blocks up to 4 KiB.
ALIGNMENT = mmap.PAGESIZE


def allocate(size: int) -> mmap.mmap:
    """
    Allocate a zero-filled, page-aligned buffer of C{size} bytes (rounded up
    to a whole page).

    Anonymous mmap gives page alignment for free and returns the memory to
    the system when the buffer is closed or collected.
    """
    size = max(ALIGNMENT, (size + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT)
    return mmap.mmap(-1, size)
