# -*- test-case-name: tests.test_wakepipe -*-
"""
Tests for L{imageio._wakepipe}.
"""

from __future__ import annotations

import fcntl
import os
import select

from twisted.trial.unittest import SynchronousTestCase

from imageio._wakepipe import WakePipe


class WakePipeTests(SynchronousTestCase):
    def pipe(self, blockingRead: bool = True) -> WakePipe:
        pipe = WakePipe(blockingRead)
        self.addCleanup(pipe.close)
        return pipe

    def test_wakeMakesReadable(self) -> None:
        """
        L{WakePipe.wake} makes the read end readable; L{WakePipe.drain}
        takes every pending wake-up.
        """
        pipe = self.pipe(blockingRead=False)
        self.assertEqual(select.select([pipe.readFD], [], [], 0)[0], [])
        pipe.wake()
        pipe.wake()
        self.assertEqual(select.select([pipe.readFD], [], [], 0)[0], [pipe.readFD])
        pipe.drain()
        self.assertEqual(select.select([pipe.readFD], [], [], 0)[0], [])
        # Nothing pending: drain does not block.
        pipe.drain()

    def test_fullPipeNeverBlocks(self) -> None:
        """
        A wake-up on a full pipe returns at once: the reactor thread never
        waits on it.
        """
        pipe = self.pipe()
        size = fcntl.fcntl(pipe.writeFD, fcntl.F_SETPIPE_SZ, 4096)
        for _ in range(size + 10):
            pipe.wake()
        self.assertEqual(len(os.read(pipe.readFD, size + 10)), size)

    def test_blocking(self) -> None:
        """
        The read end blocks unless asked otherwise; the write end never.
        """
        self.assertTrue(os.get_blocking(self.pipe().readFD))
        self.assertFalse(os.get_blocking(self.pipe(blockingRead=False).readFD))
        self.assertFalse(os.get_blocking(self.pipe().writeFD))
