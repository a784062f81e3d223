# -*- test-case-name: tests.test_reliability -*-
"""
A real imageio daemon for reliability tests and benchmarks, and blocking
raw-socket HTTP clients to talk to it.

Two flavours, both with a temporary C{conf.d}, a test PKI, the remote
listener on C{127.0.0.1} port 0, the local listener and the control socket
on short UNIX paths:

    - L{InProcessDaemon}: an L{ImageioService} on the running (trial)
      reactor. Tests reach into C{daemon.registry} and count
      C{/proc/self/fd}; clients must then run in threads
      (C{deferToThread}), never on the reactor thread.
    - L{SubprocessDaemon}: C{twistd -n imageio} in a child process, for
      signals, file descriptor limits and measuring the daemon alone.

The client side (L{Connection}, L{connect}, L{control}, ...) is plain
blocking sockets, so tests write exactly the bytes they mean.
"""

from __future__ import annotations

import errno
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from attrs import define, field, frozen
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import TestCase as _TestCase

from imageio import _pki
from imageio import config as _config

#: Options every test daemon gets unless overridden: short deadlines so
#: tests about them finish quickly.
DEFAULTS: dict[str, dict[str, object]] = {
    "daemon": {
        "request_timeout": 2,
        "inactivity_timeout": 2,
        "systemd_enable": False,
    },
    "tls": {"handshake_timeout": 1},
    "remote": {"host": "127.0.0.1", "port": 0},
    "control": {"remove_timeout": 2},
}

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


# Configuration


def writeConfig(
    configDir: Path,
    runDir: Path,
    pki: _pki.TestPKI,
    overrides: Mapping[str, Mapping[str, object]] = {},
) -> Path:
    """
    Write C{configDir/conf.d/50-test.conf}: L{DEFAULTS}, the test PKI,
    sockets in C{runDir}, then C{overrides}.

    @return: The file written.
    """
    sections: dict[str, dict[str, object]] = {k: dict(v) for k, v in DEFAULTS.items()}
    sections["tls"].update(key_file=pki.keyFile, cert_file=pki.certFile)
    sections.setdefault("local", {})["socket"] = str(runDir / "local.sock")
    sections["control"]["socket"] = str(runDir / "control.sock")
    for name, options in overrides.items():
        sections.setdefault(name, {}).update(options)
    lines = []
    for name, options in sections.items():
        lines.append(f"[{name}]")
        for key, value in options.items():
            if isinstance(value, bool):
                value = "true" if value else "false"
            lines.append(f"{key} = {value}")
        lines.append("")
    path = configDir / "conf.d" / "50-test.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return path


def shortTempDir(prefix: str = "iio-") -> Path:
    """
    @return: A new directory under C{/tmp}: UNIX socket paths must stay
        under 108 bytes, which trial's temporary directories may not.
    """
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@frozen
class Addresses:
    """
    Where a daemon listens.

    @ivar remote: C{(host, port)} of the HTTPS images listener.
    @ivar local: Path of the local images socket.
    @ivar control: Path of the control socket.
    @ivar caFile: The CA that signed the remote listener's certificate.
    """

    remote: tuple[str, int]
    local: str
    control: str
    caFile: str


# In-process daemon


@define
class InProcessDaemon:
    """
    An L{imageio.tap.ImageioService} running on the current reactor.

    @ivar service: The running service (C{registry}, C{ports}, ...).
    @ivar runDir: Temporary directory with sockets, config and state.
    """

    service: Any
    runDir: Path
    addresses: Addresses
    reactor: Any

    @classmethod
    def start(
        cls, reactor: Any, overrides: Mapping[str, Mapping[str, object]] = {}
    ) -> InProcessDaemon:
        """
        Start a daemon on C{reactor} with L{DEFAULTS} and C{overrides}.
        Call L{stop} (a Deferred) when done.
        """
        from imageio.tap import ImageioService

        runDir = shortTempDir()
        pki = _pki.makeTestPKI(str(runDir / "pki"))
        writeConfig(runDir, runDir, pki, overrides)
        config = _config.loadDir(runDir, warn=False)
        service = ImageioService(config, reactor, runDir / "state")
        service.startService()
        remote: Any = service.ports["remote"].getHost() if "remote" in service.ports else None
        addresses = Addresses(
            remote=(remote.host, remote.port) if remote is not None else ("", 0),
            local=config.local.socket,
            control=config.control.socket,
            caFile=pki.caFile,
        )
        return cls(service, runDir, addresses, reactor)

    @property
    def registry(self) -> Any:
        return self.service.registry

    def stop(self) -> Deferred[None]:
        """
        Stop the service, drop the connections it still has (twistd's
        reactor shutdown would), and remove the temporary directory.
        """
        d: Deferred[Any] = succeed(None)
        if self.service.running:
            d = self.service.stopService()

        def dropConnections(_: object) -> Deferred[None]:
            dropServerConnections(self.reactor)
            # Let connectionLost and the pool's close calls run.
            waited: Deferred[None] = Deferred()
            self.reactor.callLater(0.05, waited.callback, None)
            return waited

        def removeRunDir(result: object) -> object:
            shutil.rmtree(self.runDir, ignore_errors=True)
            return result

        d.addCallback(dropConnections)
        d.addBoth(removeRunDir)
        return d


def dropServerConnections(reactor: Any) -> int:
    """
    Abort every daemon-side connection on C{reactor}: test cleanup, so the
    reactor is clean for trial.

    @return: How many were aborted.
    """
    from imageio.web import ImageioChannel
    from imageio.web._tls import TLSServerProtocol

    count = 0
    for selectable in set(reactor.getReaders()) | set(reactor.getWriters()):
        protocol = getattr(selectable, "protocol", None)
        if isinstance(protocol, ImageioChannel | TLSServerProtocol):
            selectable.abortConnection()
            count += 1
    return count


def writeSparseImage(
    path: Path, size: int, dataAt: tuple[int, ...] = (0, 5 * 2**20 + 512, 12 * 2**20)
) -> None:
    """
    Write a sparse raw image of C{size} bytes with 1 MiB of random data at
    each offset of C{dataAt} and holes elsewhere.
    """
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in dataAt:
            f.seek(offset)
            f.write(os.urandom(2**20))


def writeFragmentedImage(path: Path, runs: int) -> int:
    """
    Write an image of C{runs} 8 KiB runs, each one byte of data (a 4 KiB
    data extent) then zeroes: as fragmented as 4 KiB blocks allow, with
    C{2 * runs} extents.

    @return: Its size.
    """
    size = runs * 8192
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        for i in range(runs):
            os.pwrite(fd, b"x", i * 8192)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return size


# Subprocess daemon


@define
class SubprocessDaemon:
    """
    C{twistd -n imageio} in a child process.

    @ivar process: The child.
    @ivar lines: Its output (stdout and stderr), line by line, as read so far.
    """

    process: subprocess.Popen[str]
    runDir: Path
    addresses: Addresses
    lines: list[str]
    _reader: threading.Thread
    _ownsRunDir: bool = True

    @classmethod
    def start(
        cls,
        overrides: Mapping[str, Mapping[str, object]] = {},
        nofile: int | None = None,
        runDir: Path | None = None,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = 30,
    ) -> SubprocessDaemon:
        """
        Start the daemon and wait until it is ready.

        @param nofile: The child's C{RLIMIT_NOFILE} (soft and hard), or
            C{None} to inherit ours.
        @raise RuntimeError: If it exits or is not ready within C{timeout},
            with its output.
        """
        owns = runDir is None
        runDir = shortTempDir() if runDir is None else runDir
        pki = _pki.makeTestPKI(str(runDir / "pki"))
        writeConfig(runDir, runDir, pki, overrides)
        config = _config.loadDir(runDir, warn=False)

        def limits() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        environ = dict(os.environ if env is None else env)
        environ.pop("NOTIFY_SOCKET", None)
        process = subprocess.Popen(
            [
                *TWISTD,
                "-n",
                "--pidfile=",
                "imageio",
                "--config-dir",
                str(runDir),
                "--state-dir",
                str(runDir / "state"),
                *args,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=str(runDir),
            env=environ,
            preexec_fn=limits,
        )
        lines: list[str] = []
        ready = threading.Event()
        started: list[bool] = []

        def read() -> None:
            assert process.stdout is not None
            for line in process.stdout:
                lines.append(line)
                if "[imageio.tap#info] imageio " in line and line.rstrip().endswith(" ready"):
                    started.append(True)
                    ready.set()
            ready.set()

        reader = threading.Thread(target=read, daemon=True, name="twistd-output")
        reader.start()
        if not ready.wait(timeout) or not started:
            process.kill()
            process.wait()
            reader.join(5)
            if process.stdout is not None:
                process.stdout.close()
            if owns:
                shutil.rmtree(runDir, ignore_errors=True)
            raise RuntimeError("imageio did not start:\n" + "".join(lines))
        remote = ("", 0)
        for line in lines:
            m = re.search(r"Listening: remote https?://(\S+):(\d+)", line)
            if m:
                remote = (m.group(1), int(m.group(2)))
        addresses = Addresses(
            remote=remote,
            local=config.local.socket,
            control=config.control.socket,
            caFile=pki.caFile,
        )
        return cls(process, runDir, addresses, lines, reader, owns)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return "".join(self.lines)

    def fdCount(self) -> int:
        return fdCount(self.pid)

    def rssKiB(self) -> int:
        return procStatus(self.pid, "VmRSS")

    def peakRssKiB(self) -> int:
        return procStatus(self.pid, "VmHWM")

    def signal(self, number: int = signal.SIGTERM) -> None:
        self.process.send_signal(number)

    def wait(self, timeout: float) -> int:
        """
        @return: The exit status (negative: killed by that signal).
        @raise subprocess.TimeoutExpired: If it is still running.
        """
        status = self.process.wait(timeout)
        self._reader.join(5)
        return status

    def stop(self, timeout: float = 15) -> int | None:
        """
        SIGTERM, then SIGKILL after C{timeout}; remove the run directory.

        @return: The exit status.
        """
        status: int | None = None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                status = self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                status = self.process.wait()
        else:
            status = self.process.returncode
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._ownsRunDir:
            shutil.rmtree(self.runDir, ignore_errors=True)
        return status


# /proc


def fdCount(pid: int | str = "self") -> int:
    """
    @return: How many file descriptors process C{pid} has open.
    """
    return len(os.listdir(f"/proc/{pid}/fd"))


def procStatus(pid: int | str, key: str) -> int:
    """
    @return: A C{kB} value of C{/proc/<pid>/status}, such as C{VmRSS} or
        C{VmHWM} (peak RSS).
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def acceptingUNIX(path: str) -> bool:
    """
    @return: Whether a server accepts connections on UNIX socket C{path}
        (a socket file exists between a server's bind and its listen).
    """
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


def waitFor(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """
    Poll C{predicate} (blocking) until it is true or C{timeout} passed.

    @return: The last value of C{predicate()}.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


# Raw HTTP client


@define
class Response:
    """
    A parsed HTTP response.

    @ivar headers: Lower-cased names, in order, repeats kept.
    @ivar interim: Status codes of 1xx responses that came first.
    """

    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes
    interim: list[int] = field(factory=list)

    def header(self, name: str) -> str | None:
        name = name.lower()
        for key, value in self.headers:
            if key == name:
                return value
        return None

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    @property
    def closes(self) -> bool:
        """
        The server said it closes the connection after this response.
        """
        return (self.header("connection") or "").lower() == "close"

    def json(self) -> Any:
        return json.loads(self.body)


class ConnectionClosed(Exception):
    """
    The server closed the connection before a complete response.

    @ivar partial: What was received of the response.
    """

    def __init__(self, partial: bytes) -> None:
        super().__init__(f"Connection closed after {len(partial)} bytes: {partial[:200]!r}")
        self.partial = partial


class Connection:
    """
    A blocking client connection that writes raw bytes and parses
    responses.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]] = (),
        body: bytes = b"",
        contentLength: bool = True,
    ) -> Response:
        """
        Send one request and read its response.

        A server may answer before the body is sent (storage failed, request
        refused) and close; like curl, read that answer rather than fail on
        the broken pipe.
        """
        try:
            self.send(rawRequest(method, target, headers, body, contentLength))
        except (BrokenPipeError, ConnectionResetError):
            pass
        return self.response(head=method == "HEAD")

    def _fill(self) -> None:
        try:
            data = self.sock.recv(1024 * 1024)
        except ConnectionResetError:
            data = b""
        if not data:
            raise ConnectionClosed(bytes(self._buf))
        self._buf += data

    def _take(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill()
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _head(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self._buf[:end])
                del self._buf[: end + 4]
                return head
            self._fill()

    def response(self, head: bool = False, timeout: float | None = 30) -> Response:
        """
        Read the next response, skipping (and recording) 1xx ones. Bodies
        are framed by C{Content-Length}, or by the end of the connection.

        @raise ConnectionClosed: If the connection ends first.
        @raise TimeoutError: If nothing arrives for C{timeout} seconds.
        """
        self.sock.settimeout(timeout)
        interim = []
        while True:
            statusLine, *headerLines = self._head().decode("latin-1").split("\r\n")
            _, status, reason = (statusLine.split(" ", 2) + [""])[:3]
            headers = []
            for line in headerLines:
                name, _, value = line.partition(":")
                headers.append((name.strip().lower(), value.strip()))
            code = int(status)
            if 100 <= code < 200:
                interim.append(code)
                continue
            break
        response = Response(code, reason, headers, b"", interim)
        length = response.header("content-length")
        if head or code in (204, 304):
            return response
        if length is not None:
            response.body = self._take(int(length))
        else:
            while True:
                try:
                    self._fill()
                except ConnectionClosed:
                    break
            response.body = bytes(self._buf)
            self._buf.clear()
        return response

    def readBody(self, n: int, timeout: float | None = 30) -> bytes:
        self.sock.settimeout(timeout)
        return self._take(n)

    def waitClosed(self, timeout: float) -> bool:
        """
        Read and discard until the server closes the connection.

        @return: C{True} if it closed (EOF or reset) within C{timeout}.
        """
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1024 * 1024)
            except TimeoutError:
                return False
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                return True
            except OSError as e:
                if e.errno in (errno.ECONNRESET, errno.EPIPE):
                    return True
                raise
            if not data:
                return True

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def rawRequest(
    method: str,
    target: str,
    headers: Iterable[tuple[str, str]] = (),
    body: bytes = b"",
    contentLength: bool = True,
) -> bytes:
    """
    @return: An HTTP/1.1 request, with C{Host} and (unless told otherwise
        or given in C{headers}) C{Content-Length} for bodies.
    """
    headers = list(headers)
    names = {name.lower() for name, _ in headers}
    lines = [f"{method} {target} HTTP/1.1", "Host: localhost"]
    if contentLength and "content-length" not in names and (body or method in ("PUT", "PATCH")):
        lines.append(f"Content-Length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def clientContext(caFile: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=caFile)
    return context


def connect(addresses: Addresses, listener: str = "local", timeout: float = 10) -> Connection:
    """
    Connect to a listener: C{local} (UNIX socket), C{remote} (TLS),
    C{remote-plain} (TCP to the TLS port, no TLS) or C{control}.
    """
    if listener in ("local", "control"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(addresses.local if listener == "local" else addresses.control)
        return Connection(sock)
    sock = socket.create_connection(addresses.remote, timeout=timeout)
    if listener == "remote-plain":
        return Connection(sock)
    context = clientContext(addresses.caFile)
    return Connection(context.wrap_socket(sock, server_hostname="localhost"))


def control(
    addresses: Addresses, method: str, path: str, body: object = None, raw: bytes | None = None
) -> Response:
    """
    One request on a new control connection, as vdsm makes them.
    """
    data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
    with connect(addresses, "control") as conn:
        return conn.request(method, path, [("Connection", "close")], data)


def ticketBody(
    uuid: str,
    url: str,
    size: int,
    ops: Sequence[str] = ("read", "write"),
    timeout: int = 300,
    **extra: object,
) -> dict[str, object]:
    body: dict[str, object] = {
        "uuid": uuid,
        "url": url,
        "size": size,
        "ops": list(ops),
        "timeout": timeout,
    }
    body.update(extra)
    return body


def raiseFileLimit(wanted: int) -> int:
    """
    Raise this process's soft C{RLIMIT_NOFILE} towards C{wanted} (up to the
    hard limit).

    @return: The soft limit now.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def parallel(*calls: Callable[[], Any], timeout: float = 60) -> list[Any]:
    """
    Run blocking C{calls} in threads at once and wait for all of them.

    @return: Their results, in order.
    @raise BaseException: The first exception one of them raised.
    @raise TimeoutError: If one is still running after C{timeout}.
    """
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException | None] = [None] * len(calls)

    def run(i: int, call: Callable[[], Any]) -> None:
        try:
            results[i] = call()
        except BaseException as e:
            errors[i] = e

    threads = [
        threading.Thread(target=run, args=(i, c), daemon=True, name=f"client-{i}")
        for i, c in enumerate(calls)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0, deadline - time.monotonic()))
        if t.is_alive():
            raise TimeoutError(f"{t.name} still running after {timeout} seconds")
    for e in errors:
        if e is not None:
            raise e
    return results


def pattern(size: int, seed: bytes = b"imageio") -> bytes:
    """
    @return: C{size} deterministic, incompressible bytes.
    """
    import hashlib

    return hashlib.shake_256(seed).digest(size)


def abortive(conn: Connection) -> None:
    """
    Close with a TCP reset (or plain close for UNIX sockets): a client that
    vanished.
    """
    if conn.sock.family != socket.AF_UNIX:
        import struct

        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


# trial support


class DaemonTestCase(_TestCase):
    """
    Base for tests against an L{InProcessDaemon} on trial's reactor.

    Test methods do their client work in threads (C{deferToThread}), so
    the reactor keeps serving the daemon.
    """

    timeout = 60

    def startDaemon(self, **sections: Mapping[str, object]) -> InProcessDaemon:
        """
        Start a daemon with L{DEFAULTS} updated by C{sections}; it stops when
        the test ends.
        """
        from twisted.internet import reactor

        daemon = InProcessDaemon.start(reactor, sections)
        self.addCleanup(daemon.stop)
        return daemon

    def makeImage(
        self, daemon: InProcessDaemon, size: int, data: bytes = b"", name: str = ""
    ) -> Path:
        """
        @return: A file of C{size} bytes in the daemon's directory starting
            with C{data}; the rest is a hole.
        """
        images = daemon.runDir / "images"
        images.mkdir(exist_ok=True)
        path = images / (name or f"img-{len(list(images.iterdir()))}")
        with open(path, "wb") as f:
            f.write(data)
            f.truncate(size)
        return path

    def addTicket(
        self,
        daemon: InProcessDaemon,
        path: Path | str,
        size: int,
        ops: Sequence[str] = ("read", "write"),
        **extra: object,
    ) -> str:
        """
        Add a ticket for C{path} (a file or a URL) straight to the registry.

        @return: Its id.
        """
        import uuid

        ticketID = str(uuid.uuid4())
        url = str(path) if str(path).startswith(("file:", "nbd:", "http")) else f"file://{path}"
        body = ticketBody(ticketID, url, size, ops)
        body.update(extra)
        daemon.registry.add(body)
        return ticketID

    def waitForFds(self, baseline: int, timeout: float = 5) -> None:
        """
        Wait (blocking; call from a client thread) until this process has
        no more file descriptors open than C{baseline}.
        """
        if not waitFor(lambda: fdCount() <= baseline, timeout):
            self.fail(
                f"{fdCount() - baseline} file descriptors leaked: "
                f"{sorted(os.readlink(f'/proc/self/fd/{fd}') for fd in _fds())}"
            )


def _fds() -> list[str]:
    result = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        result.append(fd)
    return result
