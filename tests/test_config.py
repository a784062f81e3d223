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

    def assertRefused(self, cases: list[tuple[str, str]]) -> None:
        """
        Each drop-in text of C{cases} fails to load with an error saying its
        message and, unless it is not INI at all, naming the file.
        """
        for text, message in cases:
            path = self.write("10.conf", text)
            e = self.assertRaises(config.ConfigError, config.loadDir, self.dir)
            self.assertIn(message, str(e))
            if "invalid syntax" not in message:
                self.assertIn(str(path), str(e))

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
            "[logger_root]\nlevel = DEBUG\n[handler_logfile]\nargs = ('/tmp/d.log',)\n",
        )
        c = config.loadDir(self.dir)
        self.assertEqual(c.daemon.max_connections, 4)
        warnings = [e for e in self.events if e.get("log_level") == LogLevel.warn]
        texts = " ".join(str(e.get("log_format")) + str(e) for e in warnings)
        self.assertIn("future_option", texts)
        self.assertIn("future", texts)
        self.assertNotIn("logger_root", texts)

    def test_loggingDefaultsToStdout(self) -> None:
        """
        Without logging sections logs go to standard output, at the level
        given on the command line.
        """
        self.write("10.conf", "[remote]\nport = 1\n")
        self.assertEqual(config.logSettings(config.loadDir(self.dir)), config.LogSettings())

    def test_loggingUpstreamExample(self) -> None:
        """
        Upstream's example logging configuration: the root level and a log
        file rotated at 20 MiB keeping 10 files.
        """
        self.write(
            "10.conf",
            "[loggers]\nkeys = root\n[handlers]\nkeys = logfile\n[formatters]\nkeys = long\n"
            "[logger_root]\nlevel = WARNING\nhandlers = logfile\npropagate = 0\n"
            "[handler_logfile]\nclass = logging.handlers.RotatingFileHandler\n"
            "args = ('/var/log/ovirt-imageio/daemon.log',)\n"
            "kwargs = {'maxBytes': 20971520, 'backupCount': 10}\nlevel = DEBUG\n"
            "formatter = long\n[formatter_long]\nformat = %(asctime)s %(message)s\n",
        )
        c = config.loadDir(self.dir)
        self.assertEqual(
            config.logSettings(c),
            config.LogSettings("warn", "file", "/var/log/ovirt-imageio/daemon.log", 20971520, 10),
        )
        shown = json.loads(config.showConfig(c))
        self.assertEqual(shown["logger_root"]["level"], "WARNING")
        self.assertEqual(
            shown["handler_logfile"]["kwargs"], "{'maxBytes': 20971520, 'backupCount': 10}"
        )

    def test_loggingPartialSections(self) -> None:
        """
        A file that only moves the log file keeps upstream's rotation; a
        root logger naming upstream's stderr handler logs there; a root
        level alone keeps standard output.
        """
        self.write("10.conf", "[handler_logfile]\nargs = ('/l/d.log',)\n")
        self.assertEqual(
            config.logSettings(config.loadDir(self.dir)),
            config.LogSettings(None, "file", "/l/d.log", 20971520, 10),
        )
        self.write("10.conf", "[logger_root]\nhandlers = stderr\nlevel = debug\n")
        self.assertEqual(
            config.logSettings(config.loadDir(self.dir)), config.LogSettings("debug", "stderr")
        )
        self.write("10.conf", "[logger_root]\nlevel = ERROR\n")
        self.assertEqual(config.logSettings(config.loadDir(self.dir)), config.LogSettings("error"))
        self.write(
            "10.conf",
            "[logger_root]\nhandlers = plain\n[handler_plain]\nclass = logging.FileHandler\n"
            "args = ('/l/p.log', 'a')\n",
        )
        self.assertEqual(
            config.logSettings(config.loadDir(self.dir)),
            config.LogSettings(None, "file", "/l/p.log"),
        )

    def test_loggingErrors(self) -> None:
        """
        Logging values we cannot honour fail at start, naming the file.
        """
        cases = [
            ("[logger_root]\nlevel = LOUD\n", "[logger_root] level: expecting DEBUG"),
            ("[logger_root]\nhandlers = nope\n", "[logger_root] handlers: no [handler_nope]"),
            (
                "[handler_logfile]\nclass = logging.handlers.SysLogHandler\n",
                "[handler_logfile] class: imageio writes logs to a file",
            ),
            ("[handler_logfile]\nargs = (\n", "[handler_logfile] args: expecting a Python literal"),
            ("[handler_logfile]\nargs = ()\n", "[handler_logfile] args: expecting the log file"),
        ]
        self.assertRefused(cases)

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
            ("[daemon]\nbody_threads = -1\n", "[daemon] body_threads: must not be negative"),
            ("[control]\ntransport = udp\n", "[control] transport: expecting 'unix' or 'tcp'"),
            ("[daemon]\nio_engine = uring\n", "[daemon] io_engine: expecting 'auto', 'aio'"),
            ("[control]\ntransport = tcp\n", "[control] port must be set"),
            ("[backend_file]\nbuffer_size = 1000\n", "[backend_file] buffer_size"),
            ("[tls]\nkey_file = /k\n", "key_file and cert_file must be set together"),
            ("[proxy]\nenable = true\n", "[proxy] engine_cert_file is required"),
            ("[daemon]\npoll_interval = nan\n", "[daemon] poll_interval: expecting a finite"),
            ("not ini at all", "invalid syntax"),
        ]
        self.assertRefused(cases)

    def test_neverNamesDefaultAsFile(self) -> None:
        """
        An error about an option no file set names the file that set its
        partner, and never C{<default>} as a file.
        """
        path = self.write("10.conf", "[tls]\ncert_file = /c\n")
        e = self.assertRaises(config.ConfigError, config.loadDir, self.dir)
        self.assertEqual(
            str(e), f"{path}: [tls] cert_file: [tls] key_file and cert_file must be set together"
        )
        self.write("10.conf", "[control]\nport = 5\n")
        c = config.load([])
        c.control.transport = "tcp"
        c.control.port = -1
        e = self.assertRaises(config.ConfigError, config._check, c, {})  # type: ignore[attr-defined]
        self.assertNotIn("<default>", str(e))
        self.assertIn("[control] transport (default)", str(e))

    def test_systemFilesMergedByName(self) -> None:
        """
        Upstream's rule for a system installation: admin and vendor
        C{conf.d/*.conf} files are sorted by file name only, later names
        override; of two files with one name the vendor's is read last.
        """
        admin = Path(self.mktemp())
        vendor = Path(self.mktemp())
        other = Path(self.mktemp())
        for d in (admin, vendor, other):
            (d / "conf.d").mkdir(parents=True)
        (admin / "conf.d" / "50-engine.conf").write_text("[remote]\nport = 1\nhost = a\n")
        (admin / "conf.d" / "60-vdsm.conf").write_text("[remote]\nport = 2\n")
        (admin / "conf.d" / "99-user.conf").write_text("[local]\nenable = false\n")
        (admin / "conf.d" / "notes.txt").write_text("[remote]\nport = 9\n")
        (vendor / "conf.d" / "75-vendor.conf").write_text("[remote]\nport = 3\n")
        (vendor / "conf.d" / "99-user.conf").write_text("[local]\nenable = true\n")
        (other / "conf.d" / "10-base.conf").write_text("[control]\nremove_timeout = 7\n")
        files = config.systemConfigFiles(admin, [vendor, other])
        self.assertEqual(
            [str(f) for f in files],
            [
                str(other / "conf.d" / "10-base.conf"),
                str(admin / "conf.d" / "50-engine.conf"),
                str(admin / "conf.d" / "60-vdsm.conf"),
                str(vendor / "conf.d" / "75-vendor.conf"),
                str(admin / "conf.d" / "99-user.conf"),
                str(vendor / "conf.d" / "99-user.conf"),
            ],
        )
        c, read = config.loadSystem(admin, [vendor, other])
        self.assertEqual(read, files)
        self.assertEqual((c.remote.port, c.remote.host), (3, "a"))
        self.assertTrue(c.local.enable)
        self.assertEqual(c.control.remove_timeout, 7)

    def test_systemWithoutFiles(self) -> None:
        """
        A system without upstream's directories runs on the embedded
        defaults.
        """
        missing = Path(self.mktemp())
        c, read = config.loadSystem(missing, [missing / "vendor"])
        self.assertEqual(read, [])
        self.assertEqual(c, config.Config())

    def test_adminDirComesWithVendorDirs(self) -> None:
        """
        C{-c} naming upstream's admin directory reads its vendor directories
        too, as upstream does; any other directory is read alone.
        """
        admin = Path(self.mktemp())
        vendor = Path(self.mktemp())
        (admin / "conf.d").mkdir(parents=True)
        (vendor / "conf.d").mkdir(parents=True)
        (admin / "conf.d" / "60-vdsm.conf").write_text("[remote]\nport = 2\n")
        (vendor / "conf.d" / "75-vendor.conf").write_text("[remote]\nport = 3\n")
        self.patch(config, "ADMIN_CONF_DIR", admin)
        self.patch(config, "VENDOR_CONF_DIRS", (vendor,))
        c, files = config.loadConfigDir(admin)
        self.assertEqual((c.remote.port, len(files)), (3, 2))
        self.write("10.conf", "[remote]\nport = 4\n")
        c, files = config.loadConfigDir(self.dir)
        self.assertEqual((c.remote.port, files), (4, [self.dir / "conf.d" / "10.conf"]))
        e = self.assertRaises(config.ConfigError, config.loadConfigDir, Path(self.mktemp()))
        self.assertIn("Could not find", str(e))

    def test_upstreamLocations(self) -> None:
        """
        The system locations are upstream's admin and vendor directories.
        """
        self.assertEqual(config.ADMIN_CONF_DIR, Path("/etc/ovirt-imageio"))
        self.assertIn(Path("/usr/lib/ovirt-imageio"), config.VENDOR_CONF_DIRS)
        self.assertIn(Path("/var/lib/ovirt-imageio"), config.VENDOR_CONF_DIRS)

    def test_exampleConfigDirs(self) -> None:
        """
        The examples in C{etc/} are configuration directories: C{--config-dir
        etc/host} and C{--config-dir etc/engine} load them.
        """
        root = Path(__file__).resolve().parent.parent / "etc"
        host, files = config.loadConfigDir(root / "host")
        self.assertEqual([f.name for f in files], ["60-host.conf"])
        self.assertEqual(host.tls.key_file, "/etc/pki/vdsm/keys/vdsmkey.pem")
        engine, files = config.loadConfigDir(root / "engine")
        self.assertEqual([f.name for f in files], ["50-engine.conf"])
        self.assertEqual((engine.control.transport, engine.control.port), ("tcp", 54324))

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
