"""
Tests for L{imageio.config}: defaults, drop-in order, upstream files, bad
values.
"""

from __future__ import annotations

import json
from pathlib import Path

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from imageio import config


class ConfigTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(self.mktemp())
        (self.dir / "conf.d").mkdir(parents=True)
        self.events: list[dict[str, object]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def write(self, name: str, text: str) -> Path:
        path = self.dir / "conf.d" / name
        path.write_text(text)
        return path

    def test_defaults(self) -> None:
        """
        With no files, the embedded defaults are upstream's.
        """
        c = config.loadDir(None)
        self.assertEqual(c.remote.port, 54322)
        self.assertEqual(c.remote.host, "::")
        self.assertEqual(c.local.socket, "\0/org/ovirt/imageio")
        self.assertEqual(c.control.transport, "unix")
        self.assertEqual(c.control.remove_timeout, 60)
        self.assertEqual(c.daemon.max_connections, 8)
        self.assertEqual(c.daemon.inactivity_timeout, 60)
        self.assertEqual(c.backend_file.buffer_size, 8 * 1024**2)
        self.assertTrue(c.tls.enable)
        self.assertFalse(c.tls.enable_tls1_1)
        self.assertFalse(c.proxy.enable)
        self.assertEqual(c.proxy.port, 54323)

    def test_laterFilesOverride(self) -> None:
        """
        Files are read in name order and later ones override earlier ones.
        """
        self.write("99-user.conf", "[remote]\nport = 9999\n")
        self.write("50-vdsm.conf", "[remote]\nport = 1111\nhost = 127.0.0.1\n")
        self.write("75-vendor.conf", "[remote]\nport = 2222\n")
        self.write("ignored.txt", "[remote]\nport = 1\n")
        c = config.loadDir(self.dir)
        self.assertEqual(c.remote.port, 9999)
        self.assertEqual(c.remote.host, "127.0.0.1")

    def test_upstreamVdsmDropIn(self) -> None:
        """
        vdsm's drop-in for upstream loads unchanged.
        """
        self.write(
            "60-vdsm.conf",
            "[tls]\nenable = true\nkey_file = /etc/pki/vdsm/keys/vdsmkey.pem\n"
            "cert_file = /etc/pki/vdsm/certs/vdsmcert.pem\n"
            "ca_file = /etc/pki/vdsm/certs/cacert.pem\n"
            "[remote]\nport = 54322\n[local]\nenable = true\n[control]\ntransport = unix\n",
        )
        c = config.loadDir(self.dir)
        self.assertEqual(c.tls.key_file, "/etc/pki/vdsm/keys/vdsmkey.pem")
        self.assertTrue(c.local.enable)

    def test_upstreamEngineDropIn(self) -> None:
        """
        engine-setup's drop-in for upstream (proxy mode) loads unchanged.
        """
        self.write(
            "50-engine.conf",
            "[tls]\nenable = true\nkey_file = /k\ncert_file = /c\nca_file = /ca\n"
            "[backend_http]\nca_file = /etc/pki/ovirt-engine/ca.pem\n"
            "[remote]\nport = 54323\n[local]\nenable = false\n"
            "[control]\ntransport = tcp\nport = 54324\n",
        )
        c = config.loadDir(self.dir)
        self.assertEqual(c.control.transport, "tcp")
        self.assertEqual(c.control.port, 54324)
        self.assertFalse(c.local.enable)
        self.assertEqual(c.backend_http.ca_file, "/etc/pki/ovirt-engine/ca.pem")

    def test_unknownAreWarnings(self) -> None:
        """
        Unknown sections and options are logged as warnings, not errors, and
        upstream's logging sections are accepted.
        """
        self.write(
            "10.conf",
            "[daemon]\nfuture_option = 1\nmax_connections = 4\n[future]\nx = 1\n"
            "[logger_root]\nlevel = DEBUG\n[handler_logfile]\nargs = ()\n",
        )
        c = config.loadDir(self.dir)
        self.assertEqual(c.daemon.max_connections, 4)
        warnings = [e for e in self.events if e.get("log_level") == LogLevel.warn]
        texts = " ".join(str(e.get("log_format")) + str(e) for e in warnings)
        self.assertIn("future_option", texts)
        self.assertIn("future", texts)
        self.assertNotIn("logger_root", texts)

    def test_booleansAsUpstream(self) -> None:
        """
        Booleans accept upstream's spellings.
        """
        for text, value in (("yes", True), ("On", True), ("0", False), ("false", False)):
            self.write("10.conf", f"[local]\nenable = {text}\n")
            self.assertEqual(config.loadDir(self.dir).local.enable, value)

    def test_abstractSocketEscape(self) -> None:
        """
        An abstract socket name written with upstream's escape is understood.
        """
        self.write("10.conf", "[local]\nsocket = \\u0000/my/socket\n")
        self.assertEqual(config.loadDir(self.dir).local.socket, "\0/my/socket")

    def test_badValuesNameFileAndOption(self) -> None:
        """
        Bad values fail with a message naming the file and the option.
        """
        cases = [
            ("[remote]\nport = abc\n", "[remote] port: expecting an integer"),
            ("[remote]\nport = 70000\n", "[remote] port: not a valid port"),
            ("[local]\nenable = maybe\n", "[local] enable: expecting a boolean"),
            ("[daemon]\nmax_connections = 0\n", "[daemon] max_connections: must be positive"),
            ("[control]\ntransport = udp\n", "[control] transport: expecting 'unix' or 'tcp'"),
            ("[daemon]\nio_engine = uring\n", "[daemon] io_engine: expecting 'auto', 'aio'"),
            ("[control]\ntransport = tcp\n", "[control] port must be set"),
            ("[backend_file]\nbuffer_size = 1000\n", "[backend_file] buffer_size"),
            ("[tls]\nkey_file = /k\n", "key_file and cert_file must be set together"),
            ("[proxy]\nenable = true\n", "[proxy] engine_cert_file is required"),
            ("[daemon]\npoll_interval = nan\n", "[daemon] poll_interval: expecting a finite"),
            ("not ini at all", "invalid syntax"),
        ]
        for text, message in cases:
            path = self.write("10.conf", text)
            e = self.assertRaises(config.ConfigError, config.loadDir, self.dir)
            self.assertIn(message, str(e))
            if "invalid syntax" not in message:
                self.assertIn(str(path), str(e))

    def test_noFiles(self) -> None:
        """
        A config dir without drop-ins is an error, as upstream.
        """
        e = self.assertRaises(config.ConfigError, config.loadDir, self.dir)
        self.assertIn("Could not find", str(e))

    def test_showConfig(self) -> None:
        """
        --show-config output is JSON with every section.
        """
        shown = json.loads(config.showConfig(config.loadDir(None)))
        self.assertEqual(shown["remote"]["port"], 54322)
        self.assertIn("proxy", shown)
        self.assertIn("backend_nbd", shown)

    def test_stateDir(self) -> None:
        """
        systemd's RuntimeDirectory wins over the XDG state directory.
        """
        self.patch(config.os, "environ", {"RUNTIME_DIRECTORY": "/run/x", "HOME": "/h"})
        self.assertEqual(config.defaultStateDir(), Path("/run/x"))
        self.patch(config.os, "environ", {"XDG_STATE_HOME": "/s", "HOME": "/h"})
        self.patch(config.os, "geteuid", lambda: 1000)
        self.assertEqual(config.defaultStateDir(), Path("/s/imageio"))
        self.patch(config.os, "geteuid", lambda: 0)
        self.assertEqual(config.defaultStateDir(), Path("/run/ovirt-imageio"))
