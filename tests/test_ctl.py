"""
Tests for C{imageio-ctl} against a real daemon's control socket.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from imageio import config as _config
from imageio.tap import ImageioService

reactor: Any = _reactor


class CtlTests(TestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="iio-ctl-", dir="/tmp"))
        self.addCleanup(shutil.rmtree, self.dir, True)
        config = _config.loadDir(None, warn=False)
        config.remote.enable = False
        config.local.enable = False
        config.control.socket = str(self.dir / "sock")
        self.service = ImageioService(config, reactor, self.dir / "state")
        self.service.startService()
        self.addCleanup(self.service.stopService)
        self.image = self.dir / "disk.raw"
        self.image.write_bytes(b"x" * 12345)

    def ctl(self, *args: str) -> Any:
        return deferToThread(
            subprocess.run,
            [sys.executable, "-m", "imageio.control.ctl", "-s", str(self.dir / "sock"), *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    @inlineCallbacks
    def test_addShowExtendDelete(self) -> Any:
        """
        add prints a ticket id sized from the file; show, extend and delete
        act on it.
        """
        result = yield self.ctl("add", "--url", f"file://{self.image}", "--ops", "read,write")
        self.assertEqual(result.returncode, 0, result.stderr)
        ticketID = result.stdout.strip()
        ticket = self.service.registry.get(ticketID)
        self.assertEqual(ticket.size, 12345)
        self.assertEqual(ticket.ops, ("read", "write"))

        result = yield self.ctl("show", ticketID)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["uuid"], ticketID)

        result = yield self.ctl("extend", ticketID, "1000")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertGreater(ticket.expires, self.service.registry.now() + 900)

        result = yield self.ctl("delete", ticketID)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIsNone(self.service.registry.lookup(ticketID))

    @inlineCallbacks
    def test_addTicketFile(self) -> Any:
        """
        add-ticket sends a JSON file as is; server errors are reported with
        their status and text and a non-zero exit.
        """
        path = self.dir / "t.json"
        path.write_text(
            json.dumps(
                {
                    "uuid": "t1",
                    "size": 1,
                    "url": f"file://{self.image}",
                    "timeout": 9,
                    "ops": ["read"],
                }
            )
        )
        result = yield self.ctl("add-ticket", str(path))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIsNotNone(self.service.registry.lookup("t1"))
        path.write_text(json.dumps({"uuid": "t2"}))
        result = yield self.ctl("add-ticket", str(path))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("error 400", result.stderr)
        self.assertIn("Required ticket parameter is missing", result.stderr)

    @inlineCallbacks
    def test_unreachable(self) -> Any:
        """
        A daemon that is not running is reported clearly, not with a traceback.
        """
        result = yield deferToThread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "imageio.control.ctl",
                "-s",
                str(self.dir / "nope"),
                "show",
                "x",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("cannot reach the daemon", result.stderr)
        self.assertNotIn("Traceback", result.stderr)
