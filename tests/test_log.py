"""
Tests for L{imageio._log}: level filtering and the JSON observer.
"""

from __future__ import annotations

import io
import json

from twisted.logger import LogLevel, globalLogPublisher, jsonFileLogObserver
from twisted.trial.unittest import SynchronousTestCase

from imageio import _log


class LogTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.addCleanup(_log.setLevel, _log.currentLevel().name)

    def test_levelFilters(self) -> None:
        """
        Events below the configured level are not emitted at all.
        """
        logger = _log.Logger(namespace="test")
        _log.setLevel("info")
        logger.debug("hidden")
        logger.info("shown")
        self.assertEqual([e["log_format"] for e in self.events], ["shown"])
        _log.setLevel("debug")
        logger.debug("now shown")
        self.assertEqual(self.events[-1]["log_format"], "now shown")
        _log.setLevel("warning")
        logger.info("hidden again")
        self.assertEqual(self.events[-1]["log_format"], "now shown")
        self.assertEqual(_log.currentLevel(), LogLevel.warn)

    def test_unknownLevel(self) -> None:
        """
        Unknown level names are a ValueError.
        """
        self.assertRaises(ValueError, _log.setLevel, "loud")

    def test_jsonLines(self) -> None:
        """
        The JSON observer writes one parseable object per line with the
        structured fields.
        """
        out = io.StringIO()
        observer = jsonFileLogObserver(out, recordSeparator="")
        logger = _log.Logger(namespace="test", observer=observer)
        logger.info("ticket {ticketID} added", ticketID="abc...")
        record = json.loads(out.getvalue().splitlines()[0])
        self.assertEqual(record["ticketID"], "abc...")
        self.assertEqual(record["log_namespace"], "test")
