# -*- test-case-name: tests.test_wakepipe -*-
"""
A pipe that wakes worker threads from the reactor thread.

The disk-io pool (L{imageio._diskio}) and the body pump
(L{imageio.web._pump}) wake their threads with a byte written to a pipe: a
synchronous wake-up for the kernel, which then prefers to run the woken
thread on the waker's CPU. The write end never blocks: a full pipe already
has wake-ups pending for every reader, so the byte that did not fit is not
needed, and the reactor thread never waits on it.
"""

from __future__ import annotations

import os


class WakePipe:
    """
    One wake-up pipe.

    @ivar readFD: The end threads wait on (blocking unless
        C{blockingRead} was false, for a thread that polls it).
    @ivar writeFD: The end L{wake} writes to; non-blocking.
    """

    def __init__(self, blockingRead: bool = True) -> None:
        self.readFD, self.writeFD = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.writeFD, False)
        if not blockingRead:
            os.set_blocking(self.readFD, False)

    def wake(self) -> None:
        """
        Wake a thread waiting on L{readFD}; never blocks.
        """
        try:
            os.write(self.writeFD, b"\0")
        except BlockingIOError:
            # The pipe is full: wake-ups are pending already.
            pass

    def drain(self) -> None:
        """
        Take the pending wake-ups of a non-blocking L{readFD}.
        """
        try:
            os.read(self.readFD, 4096)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self.readFD)
        os.close(self.writeFD)
