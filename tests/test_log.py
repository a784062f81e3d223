"""
Tests for L{imageio._log}: level filtering and the JSON observer.
"""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
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
        self.assertTrue(_log.drain(10))
        names = sorted(p.name for p in directory.iterdir())
        self.assertEqual(names, ["daemon.log", "daemon.log.1", "daemon.log.2"])
        self.assertIn("line 19 ", path.read_text())
        self.assertNotIn("line 19 ", (directory / "daemon.log.1").read_text())
        self.assertEqual(_log.describeDestination(), f"{path} (rotated at 200 bytes, 2 kept)")
        self.assertIsNotNone(_log.configuredObserver())
        _log.setDestination("stdout")
        self.assertIsNone(_log.configuredObserver())


class GatedOutput:
    """
    A text output whose writes wait while its gate is closed (a journal
    that stopped reading), or fail while C{failing}.
    """

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.failing = False
        self.lines: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> None:
        self.gate.wait(30)
        if self.failing:
            raise OSError(errno.EPIPE, "Broken pipe")
        self.lines.append(text)

    def flush(self) -> None:
        self.flushes += 1


class BackgroundOutputTests(SynchronousTestCase):
    """
    L{_log.BackgroundOutput}: lines written in order by a thread of its own,
    a stalled output never blocking the writer, and losses said.
    """

    def output(self, backlog: int = 1000) -> tuple[GatedOutput, _log.BackgroundOutput]:
        real = GatedOutput()
        self.addCleanup(real.gate.set)
        return real, _log.BackgroundOutput(real, _log.jsonLine, backlog=backlog)  # type: ignore[arg-type]

    def test_inOrder(self) -> None:
        """
        Every line reaches the output, in order, one write each, flushed.
        """
        real, out = self.output(backlog=10**6)
        lines = [f"line {i}\n" for i in range(2000)]
        for line in lines:
            out.write(line)
        self.assertTrue(out.drain(10))
        self.assertEqual(real.lines, lines)
        self.assertGreater(real.flushes, 0)
        self.assertEqual(out.dropped, 0)

    def test_stalledOutput(self) -> None:
        """
        While the output does not take lines, writing returns at once: at
        most the backlog waits and the rest is dropped and counted. Once
        the output takes lines again, what waited is written, then one
        warning with the count (formatted by the notice function), then
        what came after.
        """
        real, out = self.output(backlog=100)
        out.write("first\n")
        self.assertTrue(out.drain(10))
        real.gate.clear()
        out.write("stuck\n")
        # The thread takes "stuck" and waits in the output's write.
        deadline = time.monotonic() + 10
        while not out._busy and time.monotonic() < deadline:
            time.sleep(0.001)
        started = time.monotonic()
        for i in range(1000):
            out.write(f"waiting {i:03d}\n")
        self.assertLess(time.monotonic() - started, 5)
        # 100 characters: eight 12-character lines wait.
        self.assertEqual(out.dropped, 992)
        real.gate.set()
        self.assertTrue(out.drain(10))
        out.write("after\n")
        self.assertTrue(out.drain(10))
        waited = [f"waiting {i:03d}\n" for i in range(8)]
        self.assertEqual(real.lines[:10], ["first\n", "stuck\n", *waited])
        notice = json.loads(real.lines[10])
        self.assertEqual(notice["level"], "warn")
        self.assertEqual(notice["namespace"], "imageio._log")
        self.assertEqual(notice["count"], 992)
        self.assertEqual(notice["message"], "992 log lines dropped: the log output did not keep up")
        self.assertEqual(real.lines[11:], ["after\n"])
        self.assertGreaterEqual(_log.droppedLines(), 992)

    def test_failingOutput(self) -> None:
        """
        Lines the output refuses (a closed stream, a full disk) count as
        dropped, the writer never sees the error, and the warning comes
        with the next lines that get through.
        """
        real, out = self.output()
        real.failing = True
        out.write("lost 1\n")
        out.write("lost 2\n")
        self.assertTrue(out.drain(10))
        self.assertEqual(real.lines, [])
        self.assertEqual(out.dropped, 2)
        real.failing = False
        out.write("back\n")
        self.assertTrue(out.drain(10))
        self.assertEqual(real.lines[0], "back\n")
        self.assertEqual(json.loads(real.lines[1])["count"], 2)

    def test_brokenNotice(self) -> None:
        """
        A notice function that raises costs the warning, not the thread:
        later lines are still written.
        """
        real = GatedOutput()

        def broken(event: dict[str, object]) -> str:
            raise RuntimeError("bug")

        out = _log.BackgroundOutput(real, broken, backlog=10)  # type: ignore[arg-type]
        real.failing = True
        out.write("lost\n")
        self.assertTrue(out.drain(10))
        real.failing = False
        out.write("later\n")
        self.assertTrue(out.drain(10))
        self.assertEqual(real.lines, ["later\n"])

    def test_writeFromSignalHandler(self) -> None:
        """
        A line written while the same thread is inside C{write} (a signal
        handler that logs, as twistd's SIGTERM handler does, interrupting
        the main thread there) is taken, not a deadlock.
        """
        real, out = self.output()

        def handler() -> None:
            with out._lock:
                out.write("from the handler\n")

        thread = threading.Thread(target=handler, daemon=True)
        thread.start()
        thread.join(5)
        self.assertFalse(thread.is_alive())
        self.assertTrue(out.drain(10))
        self.assertEqual(real.lines, ["from the handler\n"])

    def test_drainTimesOut(self) -> None:
        """
        L{BackgroundOutput.drain} gives up after its timeout when the output
        is stuck.
        """
        real, out = self.output()
        real.gate.clear()
        out.write("stuck\n")
        self.assertFalse(out.drain(0.05))
        real.gate.set()
        self.assertTrue(out.drain(10))

    def test_writeDirectly(self) -> None:
        """
        After L{BackgroundOutput.writeDirectly} (the reactor has shut down)
        what waited is written, and each later line at once on the
        caller's thread; a stuck output stays in the background.
        """
        real, out = self.output()
        out.write("queued\n")
        self.assertTrue(out.writeDirectly(10))
        self.assertEqual(real.lines, ["queued\n"])
        out.write("at once\n")
        self.assertEqual(real.lines, ["queued\n", "at once\n"])
        real.failing = True
        out.write("refused\n")
        self.assertEqual(out.dropped, 1)
        stuck, late = self.output()
        stuck.gate.clear()
        late.write("stuck\n")
        self.assertFalse(late.writeDirectly(0.05))
        late.write("waits\n")
        stuck.gate.set()
        self.assertTrue(late.drain(10))
        self.assertEqual(stuck.lines, ["stuck\n", "waits\n"])

    def run_python(self, code: str) -> str:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code)],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def test_writtenAtExit(self) -> None:
        """
        Lines still waiting when the process exits are written first.
        """
        out = self.run_python(
            """
            from imageio import _log
            logger = _log.Logger(namespace="exit", observer=_log.jsonObserver())
            for i in range(3000):
                logger.info("line {i}", i=i)
            """
        )
        lines = [json.loads(line) for line in out.splitlines()]
        self.assertEqual([line["i"] for line in lines], list(range(3000)))

    def test_forkedChild(self) -> None:
        """
        A forked child writes its own lines through a thread of its own.
        """
        out = self.run_python(
            """
            import os
            from imageio import _log
            logger = _log.Logger(namespace="fork", observer=_log.jsonObserver())
            logger.info("before")
            _log.drain()
            pid = os.fork()
            if pid == 0:
                logger.info("child")
                _log.drain()
                os._exit(0)
            os.waitpid(pid, 0)
            logger.info("parent")
            """
        )
        messages = [json.loads(line)["message"] for line in out.splitlines()]
        self.assertEqual(messages, ["before", "child", "parent"])
