# -*- test-case-name: tests.test_client_cli -*-
"""
Tests for the C{imageio-client} command (and the blocking API under it): a
real process against a real daemon on trial's reactor.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from imageio.client import _cli
from tests._daemon import DaemonTestCase, InProcessDaemon
from tests.test_client import compare, requireQemu

MiB = 1024**2

SIZE = 8 * MiB


class _Collect(ProcessProtocol):
    """
    Collects a child's output; calls C{onLine} for each stdout line.
    """

    def __init__(self, onLine: Any = None) -> None:
        self.out = b""
        self.err = b""
        self.done: Deferred[int] = Deferred()
        self.onLine = onLine

    def outReceived(self, data: bytes) -> None:
        self.out += data
        if self.onLine is not None:
            for line in data.splitlines():
                self.onLine(self, line)

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        code = reason.value.exitCode
        self.done.callback(code if code is not None else -(reason.value.signal or 0))


class CLITestCase(DaemonTestCase):
    timeout = 60

    def setUp(self) -> None:
        self.daemon: InProcessDaemon = self.startDaemon()
        self.dir = Path(self.mktemp()).absolute()
        self.dir.mkdir()

    def url(self, ticketID: str) -> str:
        host, port = self.daemon.addresses.remote
        return f"https://{host}:{port}/images/{ticketID}"

    def spawn(self, *args: str, onLine: Any = None) -> tuple[_Collect, Any]:
        """
        Run C{imageio-client} with C{args}.
        """
        return self.spawnPython("-m", "imageio.client._cli", *args, onLine=onLine)

    def spawnPython(self, *argv: str, onLine: Any = None) -> tuple[_Collect, Any]:
        """
        Run this Python with C{argv}, the checkout first on its path.
        """
        protocol = _Collect(onLine)
        env = dict(os.environ)
        env["PYTHONPATH"] = str(Path(__file__).parent.parent)
        process = reactor.spawnProcess(protocol, sys.executable, [sys.executable, *argv], env=env)
        return protocol, process

    @inlineCallbacks
    def cli(self, *args: str) -> Any:
        protocol, _ = self.spawn(*args)
        code = yield protocol.done
        return code, protocol.out.decode(), protocol.err.decode()

    def image(self, name: str, data: bytes, size: int = SIZE) -> Path:
        path = self.dir / name
        with open(path, "wb") as f:
            f.write(data)
            f.truncate(size)
        return path


class CommandTests(CLITestCase):
    """
    Transfers and their output.
    """

    @inlineCallbacks
    def test_uploadDownloadJSON(self) -> Any:
        """
        Upload then download raw over HTTPS with C{-c}; C{--output json}
        prints JSON lines, the last with C{transferred == size}.
        """
        source = self.image("source.raw", os.urandom(3 * MiB))
        target = self.makeImage(self.daemon, SIZE)
        ticketID = self.addTicket(self.daemon, target, SIZE)
        ca = self.daemon.addresses.caFile
        code, out, err = yield self.cli(
            "-c", ca, "--output", "json", "upload", str(source), self.url(ticketID)
        )
        self.assertEqual((code, err), (0, ""))
        lines = [json.loads(line) for line in out.splitlines()]
        self.assertEqual(set(lines[-1]), {"transferred", "size", "elapsed", "description"})
        self.assertEqual((lines[-1]["transferred"], lines[-1]["size"]), (SIZE, SIZE))
        self.assertEqual(lines[-1]["description"], "upload")
        compare(source, target)

        downloaded = self.dir / "down.raw"
        code, out, err = yield self.cli(
            "-c", ca, "download", "-f", "raw", self.url(ticketID), str(downloaded)
        )
        # Nothing on a pipe without --output json.
        self.assertEqual((code, out, err), (0, "", ""))
        compare(source, downloaded)

    @inlineCallbacks
    def test_checksumAndInfo(self) -> Any:
        """
        C{checksum} of a file and of its URL print the same JSON; C{info}
        of a file prints its format and size.
        """
        source = self.image("source.raw", os.urandom(MiB))
        ticketID = self.addTicket(self.daemon, source, SIZE, ops=("read",))
        ca = self.daemon.addresses.caFile
        code, local, err = yield self.cli("-c", ca, "checksum", str(source))
        self.assertEqual((code, err), (0, ""))
        code, remote, err = yield self.cli("-c", ca, "checksum", self.url(ticketID))
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(json.loads(local), json.loads(remote))
        code, out, err = yield self.cli("info", str(source))
        self.assertEqual(out, f"format: raw\nvirtual-size: {SIZE}\n")
        code, out, err = yield self.cli("-c", ca, "info", self.url(ticketID))
        self.assertEqual(json.loads(out)["size"], SIZE)

    @inlineCallbacks
    def test_killedAndResumed(self) -> Any:
        """
        An upload killed midway (SIGKILL) is finished by C{--resume}, which
        starts from what the server lists as written.
        """
        data = os.urandom(SIZE)
        source = self.image("source.raw", data)
        target = self.makeImage(self.daemon, SIZE)
        ticketID = self.addTicket(self.daemon, target, SIZE)
        ca = self.daemon.addresses.caFile

        def onLine(protocol: _Collect, line: bytes) -> None:
            if json.loads(line)["transferred"] >= 2 * MiB and not protocol.killed:
                protocol.killed = True
                process.signalProcess(signal.SIGKILL)

        args = ("-c", ca, "-w", "1", "-b", "256", "--output", "json", "upload")
        protocol, process = self.spawn(*args, str(source), self.url(ticketID), onLine=onLine)
        protocol.killed = False  # type: ignore[attr-defined]
        code = yield protocol.done
        self.assertEqual(code, -signal.SIGKILL)
        ticket = self.daemon.registry.get(ticketID)
        written = sum(e - s for s, e in ticket.writtenRanges())
        self.assertGreater(written, 0)
        self.assertLess(written, SIZE)

        code, out, err = yield self.cli(
            "-c", ca, "--output", "json", "upload", "--resume", str(source), self.url(ticketID)
        )
        self.assertEqual((code, err), (0, ""))
        first = json.loads(out.splitlines()[0])
        # The ranges already written count as done from the start.
        self.assertGreaterEqual(first["transferred"], written)
        self.assertEqual(target.read_bytes(), data)

    @inlineCallbacks
    def test_interrupted(self) -> Any:
        """
        Ctrl-C (SIGINT) stops a qcow2 upload cleanly: exit status 130, one
        line on standard error, and its private qemu-nbd is gone.
        """
        requireQemu()
        raw = self.image("big.raw", os.urandom(SIZE))
        qcow2 = self.dir / "interrupted.qcow2"
        yield self.cliTool("qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2))
        target = self.makeImage(self.daemon, SIZE)
        ticketID = self.addTicket(self.daemon, target, SIZE)

        def onLine(protocol: _Collect, line: bytes) -> None:
            if json.loads(line)["transferred"] > 0 and not protocol.killed:
                protocol.killed = True
                process.signalProcess(signal.SIGINT)

        ca = self.daemon.addresses.caFile
        args = ("-c", ca, "-w", "1", "-b", "64", "--output", "json", "upload")
        protocol, process = self.spawn(*args, str(qcow2), self.url(ticketID), onLine=onLine)
        protocol.killed = False  # type: ignore[attr-defined]
        code = yield protocol.done
        self.assertEqual(code, 130)
        self.assertEqual(protocol.err, b"imageio-client: error: interrupted\n")
        code, out, _ = yield self.cliTool("pgrep", "-f", str(qcow2))
        self.assertEqual(out, b"")

    @inlineCallbacks
    def test_qcow2Both(self) -> Any:
        """
        A qcow2 upload and a qcow2 download (the default format).
        """
        requireQemu()
        raw = self.image("source.raw", os.urandom(MiB))
        qcow2 = self.dir / "source.qcow2"
        code, _, _ = yield self.cliTool("qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2))
        target = self.makeImage(self.daemon, SIZE)
        ticketID = self.addTicket(self.daemon, target, SIZE)
        ca = self.daemon.addresses.caFile
        code, out, err = yield self.cli("-c", ca, "upload", str(qcow2), self.url(ticketID))
        self.assertEqual((code, err), (0, ""))
        compare(raw, target)
        downloaded = self.dir / "down.qcow2"
        code, out, err = yield self.cli("-c", ca, "download", self.url(ticketID), str(downloaded))
        self.assertEqual((code, err), (0, ""))
        compare(raw, downloaded)
        code, out, err = yield self.cli("info", str(downloaded))
        self.assertIn("format: qcow2", out)

    @inlineCallbacks
    def cliTool(self, *args: str) -> Any:
        from twisted.internet.utils import getProcessOutputAndValue

        out, err, code = yield getProcessOutputAndValue(args[0], args[1:], env=os.environ)
        return code, out, err


#: Runs the command line, then prints its exit status and which TLS
#: modules it loaded.
LEAN_SCRIPT = (
    "import sys\n"
    "from imageio.client import _cli\n"
    "code = _cli.main(sys.argv[1:])\n"
    "names = ('OpenSSL', 'cryptography', 'service_identity', 'twisted.internet.ssl',\n"
    "         'twisted.internet.endpoints', 'twisted.web.client')\n"
    "print(code, sorted(n for n in names if n in sys.modules))\n"
)


class StartUpTests(CLITestCase):
    """
    A transfer loads neither pyOpenSSL nor cryptography: over the UNIX
    socket it needs no TLS, and over HTTPS its TLS is the stdlib's.
    """

    @inlineCallbacks
    def leanTransfers(self, daemon: InProcessDaemon) -> Any:
        source = self.image("source.raw", os.urandom(MiB))
        target = self.makeImage(daemon, SIZE)
        ticketID = self.addTicket(daemon, target, SIZE)
        host, port = daemon.addresses.remote
        url = f"https://{host}:{port}/images/{ticketID}"
        ca = daemon.addresses.caFile
        downloaded = self.dir / "down.raw"
        for args in (
            ("upload", str(source), url),
            ("download", "-f", "raw", url, str(downloaded)),
            ("checksum", url),
        ):
            protocol, _ = self.spawnPython("-c", LEAN_SCRIPT, "-c", ca, *args)
            code = yield protocol.done
            self.assertEqual((code, protocol.err.decode()), (0, ""))
            self.assertEqual(protocol.out.decode().splitlines()[-1], "0 []", args[0])
        compare(source, target)
        compare(source, downloaded)

    def test_unixSocket(self) -> Any:
        """
        Through the daemon's UNIX socket (after the first C{OPTIONS} over
        HTTPS).
        """
        return self.leanTransfers(self.daemon)

    def test_https(self) -> Any:
        """
        Over HTTPS only: the daemon offers no UNIX socket.
        """
        return self.leanTransfers(self.startDaemon(local={"enable": False}))


class ErrorTests(CLITestCase):
    """
    Every failure exits non-zero with one line on standard error.
    """

    @inlineCallbacks
    def assertError(self, expected: str, *args: str) -> Any:
        code, out, err = yield self.cli(*args)
        self.assertEqual(code, 1, err)
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("imageio-client: error: "), err)
        self.assertIn(expected, err)
        return err

    @inlineCallbacks
    def test_unknownTicket(self) -> Any:
        """
        The server's 403 is shown with its text.
        """
        source = self.image("source.raw", b"x")
        ca = self.daemon.addresses.caFile
        yield self.assertError(
            "server answered 403", "-c", ca, "upload", str(source), self.url("nope")
        )

    @inlineCallbacks
    def test_untrustedCertificate(self) -> Any:
        """
        TLS is verified by default against the system's CAs.
        """
        source = self.image("source.raw", b"x")
        target = self.makeImage(self.daemon, SIZE)
        ticketID = self.addTicket(self.daemon, target, SIZE)
        yield self.assertError("certificate", "upload", str(source), self.url(ticketID))
        code, out, err = yield self.cli("--insecure", "upload", str(source), self.url(ticketID))
        self.assertEqual((code, err), (0, ""))

    @inlineCallbacks
    def test_missingFile(self) -> Any:
        """
        A missing file is named.
        """
        yield self.assertError(
            "No such file or directory", "upload", str(self.dir / "missing"), self.url("x")
        )

    @inlineCallbacks
    def test_badURL(self) -> Any:
        """
        A URL that is not an images URL is refused.
        """
        source = self.image("source.raw", b"x")
        yield self.assertError("Not an images URL", "upload", str(source), "https://h/x")

    @inlineCallbacks
    def test_badCAFile(self) -> Any:
        """
        An unreadable CA file is named.
        """
        source = self.image("source.raw", b"x")
        yield self.assertError(
            "Cannot read CA file", "-c", "/nonexistent", "upload", str(source), self.url("x")
        )

    @inlineCallbacks
    def test_verboseTraceback(self) -> Any:
        """
        C{-v} adds the traceback.
        """
        code, out, err = yield self.cli("-v", "info", str(self.dir / "missing"))
        self.assertEqual(code, 1)
        self.assertIn("Traceback", err)
        self.assertTrue(err.splitlines()[-1].startswith("imageio-client: error: "))


class ParserTests(SynchronousTestCase):
    """
    Command-line parsing.
    """

    def test_globalOptions(self) -> None:
        """
        The global options are upstream's names.
        """
        args = _cli.parser().parse_args(
            ["--insecure", "-w", "2", "-b", "1024", "-v", "--output", "json", "info", "f"]
        )
        self.assertEqual(
            (args.secure, args.workers, args.buffer_size, args.verbose, args.output),
            (False, 2, 1024, True, "json"),
        )

    def test_cafileExcludesInsecure(self) -> None:
        """
        C{-c} and C{--insecure} cannot be combined.
        """
        self.patch(sys, "stderr", io.StringIO())
        self.assertRaises(
            SystemExit, _cli.parser().parse_args, ["-c", "ca", "--insecure", "info", "f"]
        )

    def test_commandExitsQuickly(self) -> None:
        """
        The program stops the reactor thread, flushes its output and leaves
        with L{_cli.main}'s status without tearing the interpreter down.
        """
        from imageio.client import _sync

        calls: list[object] = []
        self.patch(_cli, "main", lambda program: 3 if program else 0)
        self.patch(_sync, "shutdown", lambda: calls.append("shutdown"))

        def exit(code: int) -> None:
            calls.append(code)
            raise SystemExit(code)

        self.patch(os, "_exit", exit)
        self.assertRaises(SystemExit, _cli.command)
        self.assertEqual(calls, ["shutdown", 3])

    def test_helpWithoutTwisted(self) -> None:
        """
        C{--help} and the package import load neither Twisted nor TLS: a
        fresh interpreter answers in a twentieth of a CPU second. The names
        of L{imageio.client} still resolve, loaded on first use.
        """
        script = (
            "import contextlib, io, sys\n"
            "from imageio.client import _cli\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    _cli.main(['--help'])\n"
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in"
            " ('twisted', 'OpenSSL', 'ssl', 'attr'))\n"
            "import imageio.client\n"
            "print(loaded, imageio.client.upload.__module__, imageio.client.MAX_WORKERS)\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout
        self.assertEqual(out.split(), ["[]", "imageio.client._sync", "4"])


class BlockingAPITests(CLITestCase):
    """
    The blocking functions, in a script, as upstream's are used.
    """

    @inlineCallbacks
    def test_scriptUploadsTwice(self) -> Any:
        """
        A script may call C{upload} twice (the reactor thread is started
        once) and check the result with C{checksum}, with upstream's
        argument names.
        """
        source = self.image("source.raw", os.urandom(MiB))
        target = self.makeImage(self.daemon, SIZE)
        ticketID = self.addTicket(self.daemon, target, SIZE)
        script = (
            "import sys\n"
            "from imageio import client\n"
            "src, url, ca = sys.argv[1:]\n"
            "client.upload(src, url, ca, buffer_size=256 * 1024, max_workers=2)\n"
            "client.upload(src, url, ca, secure=True)\n"
            "assert client.checksum(src) == client.checksum(url, cafile=ca)\n"
            "assert client.info(src)['format'] == 'raw'\n"
            "print('ok')\n"
        )
        protocol, _ = self.spawnPython(
            "-c", script, str(source), self.url(ticketID), self.daemon.addresses.caFile
        )
        code = yield protocol.done
        self.assertEqual((code, protocol.out, protocol.err), (0, b"ok\n", b""))
        compare(source, target)

    @inlineCallbacks
    def test_imageioClient(self) -> Any:
        """
        C{ImageioClient} has upstream's interface: size, extents, read,
        write, zero, flush, read_from, write_to, as a context manager.
        """
        target = self.makeImage(self.daemon, SIZE)
        ticketID = self.addTicket(self.daemon, target, SIZE)
        script = (
            "import io, sys\n"
            "from imageio import client\n"
            "url, ca = sys.argv[1:]\n"
            "with client.ImageioClient(url, cafile=ca, buffer_size=4096) as c:\n"
            "    assert c.size() == 8 * 1024**2 and c.max_writers == 1, c.size()\n"
            "    c.write(100, b'hello')\n"
            "    c.read_from(io.BytesIO(b'x' * 10000), 8192, 10000)\n"
            "    c.zero(8192, 100)\n"
            "    c.flush()\n"
            "    buf = bytearray(5)\n"
            "    c.read(100, buf)\n"
            "    assert buf == b'hello', buf\n"
            "    out = io.BytesIO()\n"
            "    c.write_to(out, 8192, 10000)\n"
            "    assert out.getvalue() == bytes(100) + b'x' * 9900\n"
            "    assert [e.zero for e in c.extents()][:2] == [False, True]\n"
            "print('ok')\n"
        )
        ca = self.daemon.addresses.caFile
        protocol, _ = self.spawnPython("-c", script, self.url(ticketID), ca)
        code = yield protocol.done
        self.assertEqual((code, protocol.out, protocol.err), (0, b"ok\n", b""))
