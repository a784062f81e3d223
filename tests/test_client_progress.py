# -*- test-case-name: tests.test_client_progress -*-
"""
Tests for L{imageio.client._progress}.
"""

from __future__ import annotations

import io
import json

from twisted.trial.unittest import SynchronousTestCase

from imageio.client._progress import JSONProgress, TextProgress, humanSize


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class ProgressTests(SynchronousTestCase):
    """
    The text bar and the JSON lines.
    """

    def test_jsonLines(self) -> None:
        """
        A line at the start and one per percent of progress, the last with C{transferred ==
        size}, with upstream's keys.
        """
        out = io.StringIO()
        clock = _Clock()
        progress = JSONProgress(description="upload", now=clock, output=out)
        progress.size = 1000
        for _ in range(100):
            clock.now += 0.01
            progress.update(5)
        progress.update(500)
        progress.close()
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual([line["transferred"] for line in lines[:3]], [5, 10, 20])
        self.assertEqual(
            lines[-1],
            {"transferred": 1000, "size": 1000, "elapsed": 1.0, "description": "upload"},
        )

    def test_textBar(self) -> None:
        """
        The bar shows percent, bytes, rate and time left, redrawn in place
        at most every 0.1 seconds, and ends its line when closed.
        """
        out = io.StringIO()
        clock = _Clock()
        progress = TextProgress(description="download", now=clock, output=out, width=20)
        progress.size = 4 * 1024**2
        clock.now += 1
        progress.update(1024**2)
        progress.update(1024**2)
        self.assertEqual(
            out.getvalue(), "[  25% ] 1.00 MiB, 1.00 s, 1.00 MiB/s, ETA 3 s | download\r"
        )
        clock.now += 1
        progress.update(2 * 1024**2)
        progress.close()
        self.assertTrue(
            out.getvalue().endswith("[ 100% ] 4.00 MiB, 2.00 s, 2.00 MiB/s | download\n")
        )

    def test_humanSize(self) -> None:
        """
        Sizes are shown in binary units.
        """
        self.assertEqual(
            [humanSize(n) for n in (0, 1023, 1024, 1536 * 1024, 3 * 1024**4)],
            ["0 bytes", "1023 bytes", "1.00 KiB", "1.50 MiB", "3.00 TiB"],
        )
