"""
Tests for L{imageio._log}: level filtering and the JSON observer.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from twisted.logger import LogLevel, globalLogPublisher
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
        The JSON observer writes one object per event and line: the time,
        the level, the namespace, the rendered message and the plain
        fields; not Twisted's raw event.
        """
        out = io.StringIO()
        observer = _log.JSONLinesObserver(out)
        logger = _log.Logger(namespace="test", observer=observer)
        logger.info("ticket {ticketID} added", ticketID="abc...")
        logger.warn("odd {thing!r}", thing=object())
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        record = json.loads(lines[0])
        self.assertEqual(record["message"], "ticket abc... added")
        self.assertEqual(record["level"], "info")
        self.assertEqual(record["namespace"], "test")
        self.assertEqual(record["ticketID"], "abc...")
        self.assertRegex(record["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")
        self.assertFalse([k for k in record if k.startswith("log_")], record)
        other = json.loads(lines[1])
        self.assertEqual(other["level"], "warn")
        self.assertTrue(other["message"].startswith("odd <object object at"))
        self.assertNotIn("thing", other)

    def test_jsonFailure(self) -> None:
        """
        A logged failure carries its traceback as text.
        """
        out = io.StringIO()
        logger = _log.Logger(namespace="test", observer=_log.JSONLinesObserver(out))
        try:
            raise ZeroDivisionError("x")
        except ZeroDivisionError:
            logger.failure("Boom {n}", n=1)
        record = json.loads(out.getvalue())
        self.assertEqual((record["level"], record["message"]), ("critical", "Boom 1"))
        self.assertIn("ZeroDivisionError", record["traceback"])

    def test_rotatedFile(self) -> None:
        """
        A configured log file is written and rotated as upstream's
        RotatingFileHandler rotates: C{daemon.log.1} newest, at most
        C{backupCount} old files.
        """
        directory = Path(self.mktemp()) / "log"
        path = directory / "daemon.log"
        _log.setDestination("file", str(path), maxBytes=200, backupCount=2)
        self.addCleanup(_log.setDestination, "stdout")
        observer = _log.textObserver()
        logger = _log.Logger(namespace="test", observer=observer)
        for i in range(20):
            logger.info("line {i} " + "x" * 60, i=i)
        names = sorted(p.name for p in directory.iterdir())
        self.assertEqual(names, ["daemon.log", "daemon.log.1", "daemon.log.2"])
        self.assertIn("line 19 ", path.read_text())
        self.assertNotIn("line 19 ", (directory / "daemon.log.1").read_text())
        self.assertEqual(_log.describeDestination(), f"{path} (rotated at 200 bytes, 2 kept)")
        self.assertIsNotNone(_log.configuredObserver())
        _log.setDestination("stdout")
        self.assertIsNone(_log.configuredObserver())
