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
from collections.abc import Sequence
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


def _systemTwistd(admin: Path, vendor: Path) -> list[str]:
    """
    C{twistd} as the system service runs it (root), with upstream's
    configuration directories moved to C{admin} and C{vendor}.
    """
    code = (
        "from pathlib import Path\n"
        "from imageio import config, tap\n"
        f"config.ADMIN_CONF_DIR = Path({str(admin)!r})\n"
        f"config.VENDOR_CONF_DIRS = (Path({str(vendor)!r}),)\n"
        "tap.isRoot = lambda: True\n"
        "from twisted.scripts.twistd import run\n"
        "run()\n"
    )
    return [sys.executable, "-c", code]


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
    def setUp(self) -> None:
        # Whoever runs the tests, never read the machine's /etc.
        self.patch(tap, "isRoot", lambda: False)

    def test_badConfigIsUsageError(self) -> None:
        """
        A bad configuration stops twistd with the file and option named.
        """
        conf = Path(self.mktemp()) / "conf.d"
        conf.mkdir(parents=True)
        (conf / "10.conf").write_text("[remote]\nport = nope\n")
        options = tap.Options()
        e = self.assertRaises(SystemExit, options.parseOptions, ["--config-dir", str(conf.parent)])
        self.assertIn("[remote] port", str(e))
        self.assertIn("10.conf", str(e))

    def test_twistdLogsToStdout(self) -> None:
        """
        L{tap.twistdLogsToStdout} says when twistd would write the log to
        standard output with its own observer (C{-n} without C{--logfile},
        C{--logger} or C{--syslog}): ours then writes it, from its thread.
        """
        from twisted.scripts.twistd import ServerOptions

        conf = Path(self.mktemp()).absolute()
        (conf / "conf.d").mkdir(parents=True)
        (conf / "conf.d" / "10.conf").write_text("[remote]\nport = 0\n")
        mine = ["imageio", "--config-dir", str(conf)]
        cases = [
            (["-n"], True),
            (["-n", "--logfile=-"], True),
            (["-n", "--logfile", str(conf / "twistd.log")], False),
            (["-n", "--logger=imageio._log.jsonObserver"], False),
            (["-n", "--syslog"], False),
            ([], False),
        ]
        for twistd, expected in cases:
            config = ServerOptions()
            config.parseOptions([*twistd, *mine])
            self.assertEqual(tap.twistdLogsToStdout(config.subOptions), expected, twistd)
        self.assertFalse(tap.twistdLogsToStdout(tap.Options()))

    def test_confDirSpellings(self) -> None:
        """
        Upstream's C{-c} and C{--conf-dir} are accepted as well as
        C{--config-dir}.
        """
        conf = Path(self.mktemp())
        (conf / "conf.d").mkdir(parents=True)
        (conf / "conf.d" / "10.conf").write_text("[remote]\nport = 1234\n")
        for args in (["-c", str(conf)], ["--conf-dir", str(conf)], ["--config-dir", str(conf)]):
            options = tap.Options()
            options.parseOptions(args)
            self.assertEqual(options["config"].remote.port, 1234, args)
            self.assertEqual(options["config-files"], [conf / "conf.d" / "10.conf"])

    def systemDirs(self) -> tuple[Path, Path]:
        admin = Path(self.mktemp())
        vendor = Path(self.mktemp())
        (admin / "conf.d").mkdir(parents=True)
        (vendor / "conf.d").mkdir(parents=True)
        self.patch(tap._config, "ADMIN_CONF_DIR", admin)
        self.patch(tap._config, "VENDOR_CONF_DIRS", (vendor,))
        (admin / "conf.d" / "60-vdsm.conf").write_text("[remote]\nport = 2222\n")
        (vendor / "conf.d" / "75-vendor.conf").write_text("[remote]\nhost = 127.0.0.1\n")
        return admin, vendor

    def test_rootReadsSystemDirs(self) -> None:
        """
        As root with no configuration option, upstream's admin and vendor
        directories are read.
        """
        self.systemDirs()
        self.patch(tap, "isRoot", lambda: True)
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual((options["config"].remote.port, options["config"].remote.host),
                         (2222, "127.0.0.1"))  # fmt: skip
        self.assertEqual(len(options["config-files"]), 2)

    def test_unprivilegedUsesDefaults(self) -> None:
        """
        An unprivileged run with no configuration option keeps the embedded
        defaults, whatever the system directories hold.
        """
        self.systemDirs()
        self.patch(tap, "isRoot", lambda: False)
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["config"].remote.port, 54322)
        self.assertEqual(options["config-files"], [])

    def test_showConfigEffective(self) -> None:
        """
        --show-config shows what the daemon would use: the control and
        local sockets, the certificate and key, the files read, and marks
        the options accepted without effect.
        """
        conf = Path(self.mktemp())
        (conf / "conf.d").mkdir(parents=True)
        (conf / "conf.d" / "10.conf").write_text("[daemon]\ndrop_privileges = true\n")
        options = tap.Options()
        out = self.patchStdout()
        e = self.assertRaises(
            SystemExit,
            options.parseOptions,
            ["-c", str(conf), "--state-dir", "/st", "--show-config"],
        )
        self.assertEqual(e.code, 0)
        shown = json.loads(out.getvalue())
        self.assertEqual(
            shown["effective"],
            {
                "state_dir": "/st",
                "control": "/st/sock",
                "local": "@/org/ovirt/imageio (abstract)",
                "remote": "https://[::]:54322",
                "cert_file": "/st/pki/cert.pem (self-signed, made at first start)",
                "key_file": "/st/pki/key.pem (self-signed, made at first start)",
                "log": "stdout",
                "config_files": [str(conf / "conf.d" / "10.conf")],
            },
        )
        self.assertIn("systemd User=", shown["no_effect"]["[daemon] drop_privileges"])
        self.assertIn("[daemon] run_dir", shown["no_effect"])

    def test_effectivePathsConfigured(self) -> None:
        """
        Configured files and a TCP control port are shown as configured.
        """
        from imageio import config

        c = config.Config()
        c.tls.cert_file, c.tls.key_file = "/c.pem", "/k.pem"
        c.control.transport, c.control.port = "tcp", 54324
        c.local.socket = ""
        c.remote.host = "0.0.0.0"
        shown = tap.effectivePaths(c, Path("/st"))
        self.assertEqual(shown["control"], "http://127.0.0.1:54324")
        self.assertEqual(shown["local"], "random abstract socket")
        self.assertEqual(shown["remote"], "https://0.0.0.0:54322")
        self.assertEqual((shown["cert_file"], shown["key_file"]), ("/c.pem", "/k.pem"))
        c.local.enable = c.control.enable = False
        shown = tap.effectivePaths(c, Path("/st"))
        self.assertEqual((shown["local"], shown["control"]), (None, None))

    def patchStdout(self) -> Any:
        import io

        out = io.StringIO()
        self.patch(sys, "stdout", out)
        return out

    def test_describeConfigFiles(self) -> None:
        """
        The start-up log names the files read, or says the embedded
        defaults apply and, for root, that upstream's directory had none.
        """
        self.assertEqual(
            tap.describeConfigFiles([Path("/a/10.conf"), Path("/b/20.conf")], False),
            "/a/10.conf, /b/20.conf",
        )
        self.assertEqual(tap.describeConfigFiles([], False), "embedded defaults")
        self.patch(tap, "isRoot", lambda: True)
        self.assertEqual(
            tap.describeConfigFiles([], False),
            "embedded defaults (no /etc/ovirt-imageio/conf.d/*.conf)",
        )

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


class SystemdTests(SynchronousTestCase):
    def test_upstreamUnit(self) -> None:
        """
        C{etc/systemd/ovirt-imageio.service} is a C{Type=notify} unit under
        upstream's name that runs our daemon on upstream's configuration,
        and no command is installed under upstream's names.
        """
        import configparser
        from importlib.metadata import distribution

        unit = configparser.RawConfigParser(strict=False)
        unit.optionxform = str  # type: ignore[assignment,method-assign]
        unit.read(ROOT / "etc" / "systemd" / "ovirt-imageio.service")
        service = unit["Service"]
        self.assertEqual(service["Type"], "notify")
        command = service["ExecStart"].split()
        self.assertTrue(command[0].endswith("/twistd"), command)
        self.assertIn("-n", command)
        self.assertEqual(
            command[command.index("imageio") :][1:], ["--conf-dir", "/etc/ovirt-imageio"]
        )
        self.assertEqual(service["RuntimeDirectory"], "ovirt-imageio")
        scripts = {e.name for e in distribution("tximageio").entry_points}
        self.assertEqual(scripts & {"ovirt-imageio", "ovirt-imageioctl"}, set())

    def receiver(self, abstract: bool = False) -> tuple[socket.socket, str]:
        directory = shortTempDir("iio-notify-")
        self.addCleanup(shutil.rmtree, directory, True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(s.close)
        path = f"\0{directory}/notify" if abstract else f"{directory}/notify"
        s.bind(path)
        s.settimeout(30)
        return s, "@" + path[1:] if abstract else path

    def test_notify(self) -> None:
        """
        With C{NOTIFY_SOCKET} set (a path or an abstract C{@name}), the
        message goes there as one datagram; without it, or with
        C{[daemon] systemd_enable = false}, nothing is sent.
        """
        notify = tap._notifySystemd  # type: ignore[attr-defined]
        for abstract in (False, True):
            receiver, address = self.receiver(abstract)
            self.patch(tap.os, "environ", {"NOTIFY_SOCKET": address})
            notify(b"READY=1", True)
            self.assertEqual(receiver.recv(100), b"READY=1")
            notify(b"READY=1", False)
            self.patch(tap.os, "environ", {})
            notify(b"READY=1", True)
            receiver.setblocking(False)
            self.assertRaises(BlockingIOError, receiver.recv, 100)

    def test_twistdNotifiesReady(self) -> None:
        """
        A real C{twistd -n imageio} sends C{READY=1} once its control socket
        answers, and C{STOPPING=1} on SIGTERM.
        """
        receiver, address = self.receiver()
        directory = Path(address).parent
        (directory / "conf.d").mkdir()
        (directory / "conf.d" / "10.conf").write_text(
            "[remote]\nhost = 127.0.0.1\nport = 0\n[local]\nenable = false\n"
        )
        process = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "imageio", "--config-dir", str(directory),
                      "--state-dir", str(directory / "state")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=str(directory),
            env=_environ(NOTIFY_SOCKET=address),
        )  # fmt: skip
        self.addCleanup(lambda: (process.poll() is None and process.kill(), process.wait()))
        self.assertEqual(receiver.recv(100), b"READY=1")
        response = _unixGet(str(directory / "state" / "sock"), "/tickets/nope")
        self.assertTrue(response.startswith(b"HTTP/1.1 404 "), response)
        process.send_signal(signal.SIGTERM)
        self.assertEqual(receiver.recv(100), b"STOPPING=1")
        process.wait(timeout=30)


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

    def start(
        self, *args: str, twistd: Sequence[str] = TWISTD, env: dict[str, str] | None = None
    ) -> subprocess.Popen[str]:
        """
        Start C{twistd -n imageio} with C{args} in the test directory,
        killed in cleanup.

        @param twistd: How to run C{twistd}.
        @param env: Its environment, if not ours.
        """
        process = subprocess.Popen(
            [*twistd, "-n", "--pidfile=", "imageio", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=str(self.dir),
            env=env,
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
        # Our observer writes from a thread; twistd re-raises SIGTERM
        # without atexit: its last line is written at once, not lost.
        self.assertTrue(output.rstrip().endswith("Server Shut Down."), output[-300:])

    def test_jsonLinesToTheLast(self) -> None:
        """
        With C{--logger=imageio._log.jsonObserver} (the systemd unit's), the
        JSON lines are written from our thread, and still none is lost when
        SIGTERM ends twistd (which re-raises it, skipping C{atexit}).
        """
        (self.dir / "conf.d" / "10-test.conf").write_text(
            f"[remote]\nhost = 127.0.0.1\nport = 0\n[local]\nsocket = {self.dir}/local.sock\n"
        )
        twistd = [*TWISTD, "--logger=imageio._log.jsonObserver"]
        process = self.start(
            "--config-dir", str(self.dir), "--state-dir", str(self.state), twistd=twistd
        )
        self.waitForSocket(self.state / "sock", process)
        # The socket is bound before twistd runs the reactor (and handles
        # SIGTERM): an answer says it runs.
        response = _unixGet(str(self.state / "sock"), "/tickets/nope")
        self.assertTrue(response.startswith(b"HTTP/1.1 404 "), response)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        lines = [json.loads(line) for line in output.splitlines()]
        self.assertIn("Listening: control", " ".join(line["message"] for line in lines))
        self.assertEqual(lines[-1]["message"], "Server Shut Down.")

    def test_freshSystemInstall(self) -> None:
        """
        A root install with vdsm's drop-in in C{/etc/ovirt-imageio/conf.d},
        a vendor drop-in and an admin override starts with no option, reads
        all three merged by name and says so.
        """
        from imageio import _pki

        admin, vendor = self.dir / "etc", self.dir / "vendor"
        (admin / "conf.d").mkdir(parents=True)
        (vendor / "conf.d").mkdir(parents=True)
        pki = _pki.makeTestPKI(str(self.dir / "pki"))
        (admin / "conf.d" / "60-vdsm.conf").write_text(
            f"[tls]\nenable = true\nkey_file = {pki.keyFile}\ncert_file = {pki.certFile}\n"
            f"ca_file = {pki.caFile}\n[remote]\nport = 54322\n[local]\nenable = true\n"
            f"socket = {self.dir}/local.sock\n[control]\ntransport = unix\n"
        )
        (vendor / "conf.d" / "75-vendor.conf").write_text("[remote]\nport = 1\nhost = 127.0.0.1\n")
        (admin / "conf.d" / "99-user.conf").write_text("[remote]\nport = 0\n")
        run = self.dir / "run"
        process = self.start(
            twistd=_systemTwistd(admin, vendor), env=_environ(RUNTIME_DIRECTORY=str(run))
        )
        sock = run / "sock"
        self.waitForSocket(sock, process)
        response = _unixGet(str(sock), "/tickets/nope")
        self.assertTrue(response.startswith(b"HTTP/1.1 404 "), response)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        self.assertIn(
            f"Configuration: {admin}/conf.d/60-vdsm.conf, {vendor}/conf.d/75-vendor.conf, "
            f"{admin}/conf.d/99-user.conf",
            output,
        )
        self.assertIn("Listening: remote https://127.0.0.1:", output)
        self.assertNotIn("https://127.0.0.1:1\n", output)
        self.assertNotIn("self-signed", output)
        self.assertNotIn("Traceback", output)

    def test_logFileFromConfiguration(self) -> None:
        """
        Upstream's C{[handler_logfile]} and C{[logger_root] level} are
        honoured: lines go to that file from that level on, not to
        standard output, and the terminal is told where they went.
        """
        logFile = self.dir / "log" / "daemon.log"
        (self.dir / "conf.d" / "10-test.conf").write_text(
            "[remote]\nhost = 127.0.0.1\nport = 0\n[local]\nenable = false\n"
            f"[logger_root]\nlevel = DEBUG\nhandlers = logfile\n"
            f"[handler_logfile]\nargs = ('{logFile}',)\n"
        )
        process = self.start("--config-dir", str(self.dir), "--state-dir", str(self.state))
        self.waitForSocket(self.state / "sock", process)
        _unixGet(str(self.state / "sock"), "/tickets/nope")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        self.assertIn(f"imageio: logging to {logFile} (rotated at 20971520 bytes, 10 kept)", output)
        self.assertNotIn("Listening", output)
        logged = logFile.read_text()
        self.assertIn("Listening: control", logged)
        self.assertIn("GET /tickets/nope 404", logged)
        self.assertEqual(logFile.stat().st_mode & 0o777, 0o640)

    def test_freshEngineInstall(self) -> None:
        """
        An engine host: engine-setup's C{50-engine.conf} in
        C{/etc/ovirt-imageio/conf.d} (proxy mode, TCP control port, no
        local socket) starts with no option and answers on the TCP control
        port, as the engine reaches it.
        """
        from imageio import _pki

        admin, vendor = self.dir / "etc", self.dir / "vendor"
        (admin / "conf.d").mkdir(parents=True)
        pki = _pki.makeTestPKI(str(self.dir / "pki"))
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        (admin / "conf.d" / "50-engine.conf").write_text(
            f"[tls]\nenable = true\nkey_file = {pki.keyFile}\ncert_file = {pki.certFile}\n"
            f"ca_file = {pki.caFile}\n[backend_http]\nca_file = {pki.caFile}\n"
            "[remote]\nhost = 127.0.0.1\nport = 0\n[local]\nenable = false\n"
            f"[control]\ntransport = tcp\nport = {port}\n"
        )
        process = self.start(
            twistd=_systemTwistd(admin, vendor),
            env=_environ(RUNTIME_DIRECTORY=str(self.dir / "run")),
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    s.sendall(b"GET /tickets/nope HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    response = s.recv(65536)
                break
            except ConnectionRefusedError:
                if process.poll() is not None or time.monotonic() > deadline:
                    self.fail(f"no control port: {process.communicate()[0]}")
                time.sleep(0.05)
        self.assertTrue(response.startswith(b"HTTP/1.1 404 "), response)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        self.assertIn(f"Configuration: {admin}/conf.d/50-engine.conf", output)
        self.assertIn(f"Listening: control http://127.0.0.1:{port}", output)
        self.assertNotIn("Listening: local", output)
        self.assertNotIn("Traceback", output)

    def daemonize(self, *args: str) -> subprocess.CompletedProcess[str]:
        """
        Run C{twistd imageio} the way that daemonizes (no C{-n}); return
        once the foreground process exits.
        """
        result = subprocess.run(
            TWISTD
            + ["--pidfile", str(self.dir / "twistd.pid"), "--logfile", str(self.dir / "log")]
            + ["imageio", "--config-dir", str(self.dir), "--state-dir", str(self.state), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(self.dir),
        )
        self.addCleanup(self.killDaemon)
        return result

    def daemonSocket(self) -> Path:
        """
        @return: The daemonized daemon's control socket, once it exists (30
            seconds at most).
        """
        sock = self.state / "sock"
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return sock

    def killDaemon(self) -> None:
        pidfile = self.dir / "twistd.pid"
        if pidfile.exists():
            os.kill(int(pidfile.read_text()), signal.SIGKILL)

    def test_daemonizedBusyPort(self) -> None:
        """
        Without C{-n}, a busy port stops twistd in the foreground at once,
        with the reason on the terminal, and nothing is left running.
        """
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            (self.dir / "conf.d" / "10.conf").write_text(
                f"[remote]\nhost = 127.0.0.1\nport = {port}\n[local]\nenable = false\n"
            )
            result = self.daemonize()
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("Cannot listen for remote", result.stderr)
        self.assertIn("Address already in use", result.stderr)
        self.assertFalse((self.dir / "twistd.pid").exists())

    def test_daemonizedBadCertificate(self) -> None:
        """
        Without C{-n}, a bad certificate stops twistd in the foreground with
        the file named.
        """
        bad = self.dir / "bad.pem"
        bad.write_text("not a certificate\n")
        (self.dir / "conf.d" / "10.conf").write_text(
            f"[remote]\nhost = 127.0.0.1\nport = 0\n[local]\nenable = false\n"
            f"[tls]\ncert_file = {bad}\nkey_file = {bad}\n"
        )
        result = self.daemonize()
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("TLS configuration error", result.stderr)
        self.assertIn(str(bad), result.stderr)
        self.assertFalse((self.dir / "twistd.pid").exists())

    def test_daemonizedLiveSocket(self) -> None:
        """
        Without C{-n}, a control socket another process listens on stops
        twistd in the foreground, asking whether imageio runs already; the
        socket is left alone.
        """
        (self.dir / "conf.d" / "10.conf").write_text(
            "[remote]\nhost = 127.0.0.1\nport = 0\n[local]\nenable = false\n"
        )
        self.state.mkdir()
        with socket.socket(socket.AF_UNIX) as live:
            live.bind(str(self.state / "sock"))
            live.listen()
            result = self.daemonize()
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(
            f"imageio: another process is listening on {self.state / 'sock'}: is imageio running?",
            result.stderr,
        )
        self.assertTrue((self.state / "sock").exists())

    def test_daemonizedStarts(self) -> None:
        """
        Without C{-n} a good configuration still daemonizes and serves.
        """
        (self.dir / "conf.d" / "10.conf").write_text(
            "[remote]\nhost = 127.0.0.1\nport = 0\n[local]\nenable = false\n"
        )
        result = self.daemonize()
        self.assertEqual(result.returncode, 0, result.stderr)
        sock = self.daemonSocket()
        response = _unixGet(str(sock), "/tickets/nope")
        self.assertTrue(response.startswith(b"HTTP/1.1 404 "), response)

    def test_daemonizedLogFile(self) -> None:
        """
        Daemonized with a configured log file: twistd forks after logging
        began, and the child's log thread writes every later line (a fork
        while the parent's thread was inside the file's write left the
        child's copy of the file's lock taken, and the log silent).
        """
        logFile = self.dir / "daemon.log"
        (self.dir / "conf.d" / "10.conf").write_text(
            "[remote]\nhost = 127.0.0.1\nport = 0\n[local]\nenable = false\n"
            f"[logger_root]\nlevel = INFO\nhandlers = logfile\n"
            f"[handler_logfile]\nargs = ('{logFile}',)\n"
        )
        result = self.daemonize()
        self.assertEqual(result.returncode, 0, result.stderr)
        _unixGet(str(self.daemonSocket()), "/tickets/nope")
        pid = int((self.dir / "twistd.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        # Gone, not only its pid file (removed before the last line).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                # A zombie (where nobody reaps the daemon) has ended too.
                stat = Path(f"/proc/{pid}/stat").read_text()
            except FileNotFoundError:
                break
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.05)
        logged = logFile.read_text()
        self.assertIn("GET /tickets/nope 404", logged)
        self.assertTrue(logged.rstrip().endswith("Server Shut Down."), logged[-300:])

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
        self.assertIn(
            f"imageio: configuration error: {self.dir}/conf.d/10.conf: [control] remove_timeout: "
            "expecting an integer, got 'soon'",
            out.stderr,
        )
        self.assertNotIn("Usage:", out.stdout + out.stderr)
        self.assertNotIn("<default>", out.stdout + out.stderr)
