"""
Tests for C{imageio-ctl} against a real daemon's control socket.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
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
        return self.runCtl("-s", str(self.dir / "sock"), *args)

    def runCtl(self, *args: str) -> Any:
        return deferToThread(
            subprocess.run,
            [sys.executable, "-m", "imageio.control.ctl", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def confDir(self, text: str) -> Path:
        conf = self.dir / "conf"
        (conf / "conf.d").mkdir(parents=True, exist_ok=True)
        (conf / "conf.d" / "50-test.conf").write_text(text)
        return conf

    def ticketFile(self, ticketID: str) -> Path:
        path = self.dir / f"{ticketID}.json"
        path.write_text(
            json.dumps(
                {
                    "uuid": ticketID,
                    "size": 12345,
                    "url": f"file://{self.image}",
                    "timeout": 300,
                    "ops": ["read"],
                }
            )
        )
        return path

    @inlineCallbacks
    def test_upstreamCommandsWithConfDir(self) -> Any:
        """
        ovirt-imageioctl's commands and options work, C{-c} finding the
        control socket in the daemon's configuration, given after the
        command as upstream's tool takes it or before it.
        """
        conf = str(self.confDir(f"[control]\ntransport = unix\nsocket = {self.dir}/sock\n"))
        path = self.ticketFile("u1")
        result = yield self.runCtl("add-ticket", "-c", conf, str(path))
        self.assertEqual(result.returncode, 0, result.stderr)
        ticket = self.service.registry.get("u1")

        result = yield self.runCtl("show-ticket", "-c", conf, "u1")
        self.assertEqual(result.returncode, 0, result.stderr)
        shown = json.loads(result.stdout)
        self.assertEqual(shown["uuid"], "u1")
        self.assertNotIn("expires_human", shown)

        result = yield self.runCtl("-c", conf, "mod-ticket", "u1", "--timeout", "1000")
        self.assertEqual((result.returncode, result.stdout), (0, ""), result.stderr)
        self.assertGreater(ticket.expires, self.service.registry.now() + 900)

        result = yield self.runCtl("mod-ticket", "-c", conf, "u1")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("--timeout", result.stderr)

        result = yield self.runCtl("del-ticket", "-c", conf, "u1")
        self.assertEqual((result.returncode, result.stdout), (0, ""), result.stderr)
        self.assertIsNone(self.service.registry.lookup("u1"))

    @inlineCallbacks
    def test_confDirTCP(self) -> Any:
        """
        C{-c} with C{[control] transport = tcp} talks to the TCP port.
        """
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        config = _config.loadDir(None, warn=False)
        config.remote.enable = False
        config.local.enable = False
        config.control.transport = "tcp"
        config.control.port = port
        service = ImageioService(config, reactor, self.dir / "state-tcp")
        service.startService()
        self.addCleanup(service.stopService)
        conf = str(self.confDir(f"[control]\ntransport = tcp\nport = {port}\n"))
        result = yield self.runCtl("add-ticket", "-c", conf, str(self.ticketFile("t1")))
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIsNotNone(service.registry.lookup("t1"))
        result = yield self.runCtl("-c", conf, "delete", "t1")
        self.assertEqual(result.returncode, 0, result.stderr)
        result = yield self.runCtl("-c", conf, "show", "t1")
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("error 404", result.stderr)
        service.stopService()
        result = yield self.runCtl("-c", conf, "show", "t1")
        self.assertIn(f"cannot reach the daemon at 127.0.0.1 port {port}", result.stderr)

    @inlineCallbacks
    def test_localErrors(self) -> Any:
        """
        A missing or broken ticket file and a bad configuration are
        reported as what they are, not as an unreachable daemon.
        """
        result = yield self.ctl("add-ticket", str(self.dir / "missing.json"))
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("cannot read ticket file", result.stderr)
        self.assertIn("missing.json", result.stderr)
        self.assertNotIn("cannot reach", result.stderr)
        broken = self.dir / "broken.json"
        broken.write_text("{")
        result = yield self.ctl("add-ticket", str(broken))
        self.assertIn("not a JSON ticket", result.stderr)
        conf = str(self.confDir("[control]\ntransport = carrier-pigeon\n"))
        result = yield self.runCtl("-c", conf, "show", "x")
        self.assertIn("configuration error", result.stderr)
        self.assertIn("[control] transport", result.stderr)
        self.assertNotIn("Traceback", result.stderr)

    @inlineCallbacks
    def test_brokenPipe(self) -> Any:
        """
        A reader that went away before the output is written (a pipe into
        C{head}) is not a daemon error and not a traceback.
        """
        result = yield self.ctl("add", "--url", f"file://{self.image}")
        ticketID = result.stdout.strip()
        read, write = os.pipe()
        os.close(read)
        try:
            result = yield deferToThread(
                subprocess.run,
                [sys.executable, "-m", "imageio.control.ctl", "-s", str(self.dir / "sock"),
                 "show", ticketID],
                stdout=write,
                stderr=subprocess.PIPE,
                text=True,
                timeout=60,
            )  # fmt: skip
        finally:
            os.close(write)
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stderr, "")

    def test_hints(self) -> None:
        """
        An unreachable socket comes with what to try: the system daemon's
        socket when it exists, the group for a permission error.
        """
        import argparse

        from imageio.control import ctl

        system = self.dir / "system.sock"
        self.patch(ctl, "SYSTEM_SOCKET", str(system))
        args = argparse.Namespace(port=None, socket=str(self.dir / "mine.sock"))
        self.assertEqual(ctl._hint(args, FileNotFoundError()), "")  # type: ignore[attr-defined]
        system.touch()
        self.assertEqual(
            ctl._hint(args, FileNotFoundError()),  # type: ignore[attr-defined]
            f" (the system daemon listens on {system}: use -s {system})",
        )
        self.assertIn("ovirtimg", ctl._hint(args, PermissionError()))  # type: ignore[attr-defined]
        args.port = 54324
        self.assertEqual(ctl._hint(args, FileNotFoundError()), "")  # type: ignore[attr-defined]

    def test_describeExpiry(self) -> None:
        """
        C{expires} is shown as remaining seconds and a wall-clock time.
        """
        from imageio.control.ctl import describeExpiry

        self.assertEqual(
            describeExpiry(1600.2, 1000, 1_800_000_000),
            "in 600 s, at 2027-01-15 08:10:00 UTC",
        )
        self.assertEqual(
            describeExpiry(990, 1000, 1_800_000_000),
            "expired 10 s ago, at 2027-01-15 07:59:50 UTC",
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
        shown = json.loads(result.stdout)
        self.assertEqual(shown["uuid"], ticketID)
        self.assertIsInstance(shown["expires"], int)
        self.assertRegex(shown["expires_human"], r"^in (29\d|300) s, at \d{4}-\d\d-\d\d ")

        result = yield self.ctl("extend", ticketID, "1000")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, f"Ticket {ticketID} now expires in 1000 s\n")
        self.assertGreater(ticket.expires, self.service.registry.now() + 900)

        result = yield self.ctl("delete", ticketID)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, f"Ticket {ticketID} deleted\n")
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
