#!/usr/bin/env python3
"""
Side-by-side benchmark of our imageio daemon and upstream ovirt-imageio 2.5.1.

One command does everything: creates upstream's venv, a test CA and server
certificate, the image files, a C{conf.d} per server; starts both servers on
loopback, adds tickets through their control sockets, runs every measurement
for both servers in alternation (A B A B ...) with curl as the client, stops
both servers, prints a table of medians and ours/upstream ratios and writes
the raw samples as JSON under C{bench/results/}.

Standard library only, so any Python 3.10+ can run it.  See C{bench/README.rst}.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import http.client
import json
import os
import platform
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _http import LoopbackHTTPSConnection, UnixHTTPConnection  # bench/ is sys.path[0]

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
UPSTREAM_VERSION = "2.5.1"
DEFAULT_UPSTREAM_VENV = BENCH_DIR / ".upstream-venv"
DEFAULT_OURS_CMD = f"{ROOT}/.venv/bin/twistd -n --pidfile= imageio --config-dir {{config_dir}}"
DEFAULT_UPSTREAM_CMD = "{venv}/bin/ovirt-imageio -c {config_dir}"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Chunk used to generate and compare files.
CHUNK = 8 * MiB
#: How often the RSS sampler looks at the servers, in seconds.
RSS_INTERVAL = 0.05
#: Seconds to wait for a server to answer on its control socket.
READY_TIMEOUT = 60.0
#: Seconds to wait for a server to exit after SIGTERM before SIGKILL.
STOP_TIMEOUT = 15.0
#: Seconds a single curl may take before we call the transfer hung.
CURL_TIMEOUT = 600
#: Seconds curl may take to connect and finish the TLS handshake.
CONNECT_TIMEOUT = 20
#: Seconds without a byte moving before curl gives up on a hung server.
STALL_TIMEOUT = 60
#: Parallel connections in the "x4" measurements.
PARALLEL = 4
#: Random 1 MiB blocks written into the sparse source of the big upload.
BIG_DATA_BLOCKS = 8

CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """
    Something went wrong that makes the numbers meaningless; stop loudly.
    """


# ---------------------------------------------------------------------------
# Small helpers


def say(message: str) -> None:
    """
    Progress on stderr, so stdout stays the table.
    """
    stamp = time.strftime("%H:%M:%S")
    print(f"[{stamp}] {message}", file=sys.stderr, flush=True)


def parseSize(text: str) -> int:
    """
    Parse C{2G}, C{2GiB}, C{256M}, C{512MiB}, C{4096} (binary units).
    """
    match = re.fullmatch(r"\s*(\d+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid size: {text!r}")
    scale = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": 1024 * GiB}[match.group(2).lower()]
    return int(match.group(1)) * scale


def humanSize(n: int) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale} {unit}"
    return f"{n} bytes"


def freePort() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """
    Run a helper command, failing loudly with its output.
    """
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise BenchError(
            f"{shlex.join(cmd)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
        )
    return result


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e})"
    return "\n".join(text.splitlines()[-lines:])


def fsType(path: Path) -> str:
    """
    Filesystem type holding C{path}, from C{/proc/mounts} (longest prefix).
    """
    best, kind = "", "?"
    real = str(path.resolve())
    with open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            mnt = parts[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, kind = mnt, parts[2]
    return f"{kind} ({best})"


# ---------------------------------------------------------------------------
# Child processes: always cleaned up


_clients: set[subprocess.Popen[bytes]] = set()


def _dieWithParent() -> None:
    """
    preexec_fn: have the kernel SIGTERM a server if the harness dies hard.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def killClients() -> None:
    for proc in list(_clients):
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _clients.discard(proc)


class Interrupted(Exception):
    """
    SIGTERM or SIGHUP: stop everything like Ctrl-C does.
    """


def _onSignal(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


# ---------------------------------------------------------------------------
# Process accounting


def _procStat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            data = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ")".
    return data[data.rindex(")") + 2 :].split()


def groupPids(pgid: int) -> list[int]:
    """
    All live processes in process group C{pgid}.
    """
    pids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _procStat(int(name))
            # fields[0] is state (field 3); fields[2] is pgrp (field 5).
            if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(name))
    return sorted(pids)


def cpuTimes(pids: list[int]) -> tuple[float, float]:
    """
    C{(utime, stime)} of C{pids} in seconds (all threads, including finished
    ones).
    """
    user = system = 0
    for pid in pids:
        fields = _procStat(pid)
        if fields is not None:
            user += int(fields[11])
            system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def threadTimes(pids: list[int]) -> dict[tuple[int, int], float]:
    """
    CPU seconds (user + system) of every live thread of C{pids}, by
    C{(pid, tid)}.
    """
    times = {}
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    data = f.read()
            except OSError:
                continue
            fields = data[data.rindex(")") + 2 :].split()
            times[(pid, int(tid))] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return times


def rssBytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * KiB
                        break
        except OSError:
            pass
    return total


def listenerPid(socketPath: Path, candidates: list[int]) -> int | None:
    """
    The process among C{candidates} holding the listening UNIX socket bound
    to C{socketPath}: the server itself, whatever wrapper started it.
    """
    inodes = set()
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            # Num RefCount Protocol Flags Type St Inode [Path]
            if len(parts) >= 8 and parts[7] == str(socketPath) and int(parts[3], 16) & 0x10000:
                inodes.add(f"socket:[{parts[6]}]")
    for pid in candidates:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        return pid
                except OSError:
                    pass
        except OSError:
            pass
    return None


class RssSampler:
    """
    Sample the summed VmRSS of some processes every C{RSS_INTERVAL} seconds
    in a thread and keep the maximum.  (VmHWM is a lifetime high-water mark,
    useless for telling one transfer from the previous one.)

    Also keeps the last CPU time seen of every thread (L{threadTimes}), so
    threads that end during the sample (upstream's per-connection threads)
    still count.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = rssBytes(pids)
        self.threadsBefore = threadTimes(pids)
        self.threads = dict(self.threadsBefore)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, rssBytes(self.pids))
        self.threads.update(threadTimes(self.pids))

    def _loop(self) -> None:
        while not self._stop.wait(RSS_INTERVAL):
            self._sample()

    def busiestThread(self) -> float:
        """
        CPU seconds of the thread that used the most since the start.
        """
        before = self.threadsBefore
        return max((t - before.get(key, 0.0) for key, t in self.threads.items()), default=0.0)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


# ---------------------------------------------------------------------------
# Test data


def makeCertificates(directory: Path) -> dict[str, Path]:
    """
    A throwaway CA and a server certificate for localhost and 127.0.0.1.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca, caKey = directory / "ca.pem", directory / "ca.key"
    cert, key = directory / "server.pem", directory / "server.key"
    csr, ext = directory / "server.csr", directory / "server.ext"
    days = "7"
    run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256"]
        + ["-keyout", str(caKey), "-out", str(ca), "-days", days, "-subj", "/CN=imageio bench CA"]
        + ["-addext", "basicConstraints=critical,CA:TRUE"]
        + ["-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    )
    run(
        ["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-sha256"]
        + ["-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost"]
    )
    ext.write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
    )
    run(
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(caKey)]
        + ["-CAcreateserial", "-out", str(cert), "-days", days, "-sha256", "-extfile", str(ext)]
    )
    return {"ca": ca, "cert": cert, "key": key}


@dataclass
class Images:
    """
    The files a run reads and writes.

    @ivar image: Random source image, downloaded and uploaded as a whole.
    @ivar pieces: C{image} cut in C{PARALLEL} files, for parallel uploads.
    @ivar ranges: C{(first, last)} byte range of each piece.
    @ivar bigSource: Sparse source of the big upload, or None.
    """

    directory: Path
    size: int
    image: Path
    pieces: list[Path]
    ranges: list[tuple[int, int]]
    targetMode: str = "allocate"
    bigDirectory: Path | None = None
    bigSize: int = 0
    bigSource: Path | None = None
    bigBlocks: list[int] = field(default_factory=list)

    def target(self, name: str) -> Path:
        return self.directory / f"target-{name}.raw"

    def bigTarget(self, name: str) -> Path:
        assert self.bigDirectory is not None
        return self.bigDirectory / f"big-target-{name}.raw"


def pieceRanges(size: int, count: int) -> list[tuple[int, int]]:
    """
    Split C{size} bytes in C{count} disjoint ranges on 4 KiB boundaries.
    """
    bounds = [(size * i // count) // (4 * KiB) * (4 * KiB) for i in range(count)] + [size]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(count) if bounds[i + 1] > bounds[i]]


def makeImages(directory: Path, size: int) -> Images:
    """
    Random image + its pieces; the source stays the reference for checks.
    """
    directory.mkdir(parents=True, exist_ok=True)
    image = directory / "image.raw"
    ranges = pieceRanges(size, PARALLEL)
    pieces = [directory / f"piece-{i}.raw" for i in range(len(ranges))]
    say(f"writing {humanSize(size)} of random data to {image} (+ {len(pieces)} pieces)")
    with open(image, "wb") as out:
        piece = 0
        pieceOut = open(pieces[0], "wb")
        try:
            done = 0
            while done < size:
                block = os.urandom(min(CHUNK, size - done))
                out.write(block)
                # Split the block over piece files.
                view = memoryview(block)
                while view:
                    room = ranges[piece][1] + 1 - pieceOut.tell() - ranges[piece][0]
                    pieceOut.write(view[:room])
                    view = view[room:]
                    if pieceOut.tell() == ranges[piece][1] + 1 - ranges[piece][0]:
                        pieceOut.close()
                        piece += 1
                        if piece < len(pieces):
                            pieceOut = open(pieces[piece], "wb")
                done += len(block)
        finally:
            pieceOut.close()
    for path, (first, last) in zip(pieces, ranges, strict=True):
        if path.stat().st_size != last - first + 1:
            raise BenchError(f"bad piece {path}")
    mode = "touch" if fsType(directory).startswith("tmpfs") else "allocate"
    return Images(directory, size, image, pieces, ranges, targetMode=mode)


def makeBigSource(images: Images, sourceDirectory: Path, targetDirectory: Path, size: int) -> None:
    """
    A sparse C{size} file with C{BIG_DATA_BLOCKS} random MiB spread over it,
    in C{sourceDirectory} (tmpfs when there is one).  On tmpfs its holes
    read as the shared zero page, so curl reads it at memory speed and the
    upload measures the server (on ext4 every hole read allocates and zeroes
    page cache: 0.6 s/GiB or more of the client's CPU, enough to make curl
    the bottleneck).  The target goes to C{targetDirectory}, on disk by
    default.
    """
    sourceDirectory.mkdir(parents=True, exist_ok=True)
    targetDirectory.mkdir(parents=True, exist_ok=True)
    source = sourceDirectory / "big-source.raw"
    say(f"creating sparse {humanSize(size)} big-upload source {source}")
    offsets = sorted({(size * i // BIG_DATA_BLOCKS) // MiB * MiB for i in range(BIG_DATA_BLOCKS)})
    offsets = [o for o in offsets if o + MiB <= size]
    with open(source, "wb") as f:
        f.truncate(size)
        for offset in offsets:
            os.pwrite(f.fileno(), os.urandom(MiB), offset)
    images.bigDirectory = targetDirectory
    images.bigSize = size
    images.bigSource = source
    images.bigBlocks = offsets


def prepareTarget(path: Path, size: int, mode: str) -> None:
    """
    Reset an upload target to C{size} zero bytes, so a server that writes
    nothing cannot pass verification with a previous upload's data, and
    every upload starts from the same state.

    @param mode: C{"touch"} (tmpfs): overwrite in place with zeros written
        by the harness, so the memory under the target is allocated and
        touched before the server writes.  In this VM the first touch of a
        page costs 2-3 s/GiB of kernel time (host-side faults; freed pages
        are handed back to the host), and without this the server that
        uploads first would be charged for it.  C{"allocate"} (disk):
        truncate and C{posix_fallocate}, fresh unwritten extents each time.
        C{"sparse"}: truncate to a sparse file.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if mode == "touch":
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, 0)
                os.ftruncate(fd, size)
            zeros = bytes(CHUNK)
            for offset in range(0, size, CHUNK):
                os.pwrite(fd, zeros[: min(CHUNK, size - offset)], offset)
        else:
            os.ftruncate(fd, 0)
            if mode == "allocate":
                os.posix_fallocate(fd, 0, size)
            else:
                os.ftruncate(fd, size)
    finally:
        os.close(fd)


def verifySame(source: Path, target: Path, what: str) -> None:
    """
    Fail loudly unless C{target} holds exactly the bytes of C{source}.
    """
    result = subprocess.run(["cmp", str(source), str(target)], capture_output=True, text=True)
    if result.returncode != 0:
        raise BenchError(
            f"{what}: uploaded data differs from the source: {result.stdout.strip()}"
            f" {result.stderr.strip()}"
        )


def verifyBig(images: Images, target: Path, what: str) -> None:
    """
    The big target: right size, the random blocks and a sample of the
    zeroes in between identical to the source (a full cmp would read 8 GiB).
    """
    assert images.bigSource is not None
    actual = target.stat().st_size
    if actual != images.bigSize:
        raise BenchError(f"{what}: target has {actual} bytes, expected {images.bigSize}")
    checks = list(images.bigBlocks)
    rnd = random.Random(1)
    checks += [rnd.randrange(images.bigSize // MiB) * MiB for _ in range(16)]
    with open(images.bigSource, "rb") as src, open(target, "rb") as dst:
        for offset in checks:
            want = os.pread(src.fileno(), MiB, offset)
            got = os.pread(dst.fileno(), MiB, offset)
            if want != got:
                raise BenchError(f"{what}: data differs in the MiB at offset {offset}")


# ---------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    """
    One daemon under test, with its own config dir, ports and tickets.
    """

    name: str
    commandTemplate: str
    baseDir: Path
    logDir: Path
    certs: dict[str, Path]
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    pid: int | None = None
    pids: list[int] = field(default_factory=list)
    tickets: dict[str, str] = field(default_factory=dict)
    tls: str = "?"
    version: str = "?"

    @property
    def configDir(self) -> Path:
        return self.baseDir / "config"

    @property
    def runDir(self) -> Path:
        return self.baseDir / "run"

    @property
    def controlSocket(self) -> Path:
        return self.runDir / "control.sock"

    @property
    def localSocket(self) -> Path:
        return self.runDir / "local.sock"

    @property
    def logFile(self) -> Path:
        return self.logDir / f"{self.name}.log"

    @property
    def pgid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self, venv: Path) -> list[str]:
        text = self.commandTemplate.format(config_dir=self.configDir, venv=venv)
        cmd = shlex.split(text)
        if "{config_dir}" not in self.commandTemplate:
            cmd.append(str(self.configDir))
        return cmd

    def writeConfig(self) -> None:
        """
        The same C{conf.d/daemon.conf} for both servers (ours reads
        upstream's sections).  Upstream also gets a logging drop-in, since
        its default log file is C{/var/log/ovirt-imageio/daemon.log}.
        """
        confd = self.configDir / "conf.d"
        confd.mkdir(parents=True, exist_ok=True)
        self.runDir.mkdir(parents=True, exist_ok=True)
        self.port = freePort()
        (confd / "daemon.conf").write_text(
            f"""\
[daemon]
drop_privileges = false
systemd_enable = false
run_dir = {self.runDir}

[tls]
enable = true
key_file = {self.certs["key"]}
cert_file = {self.certs["cert"]}
ca_file = {self.certs["ca"]}

[remote]
host = 127.0.0.1
port = {self.port}

[local]
enable = true
socket = {self.localSocket}

[control]
transport = unix
socket = {self.controlSocket}
"""
        )
        if self.name == "upstream":
            (confd / "90-bench-logging.conf").write_text(
                f"""\
[handler_logfile]
args = ({str(self.logFile)!r},)
"""
            )

    def start(self, venv: Path) -> None:
        cmd = self.command(venv)
        say(f"starting {self.name}: {shlex.join(cmd)}")
        self.logDir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(self.logDir / f"{self.name}.stdout", "wb") as out:
            self.process = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.baseDir,
                start_new_session=True,
                preexec_fn=_dieWithParent,
            )

    def failure(self, message: str) -> BenchError:
        logs = [self.logDir / f"{self.name}.stdout"]
        if self.logFile.exists():
            logs.append(self.logFile)
        text = "\n".join(f"--- last lines of {p}:\n{tail(p)}" for p in logs if p.stat().st_size > 0)
        return BenchError(f"{self.name}: {message}\n{text}")

    #: Whether the local UNIX socket listens (waitReady checks it).
    localListener = True

    def checkAlive(self) -> None:
        assert self.process is not None
        code = self.process.poll()
        if code is not None:
            raise self.failure(f"server exited with status {code}")

    def waitReady(self) -> None:
        """
        Poll the control socket until any HTTP answer, then make sure the
        remote and local listeners accept connections too.
        """
        deadline = time.monotonic() + READY_TIMEOUT
        lastError = "no attempt"
        while time.monotonic() < deadline:
            self.checkAlive()
            try:
                status, _ = self.control("GET", "/tickets/x")
                with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                    pass
                if self.localListener:
                    with socket.socket(socket.AF_UNIX) as s:
                        s.connect(str(self.localSocket))
                break
            except (OSError, http.client.HTTPException) as e:
                lastError = f"{type(e).__name__}: {e}"
                time.sleep(0.1)
        else:
            raise self.failure(f"not ready after {READY_TIMEOUT:.0f}s ({lastError})")
        candidates = groupPids(self.pgid)
        self.pid = listenerPid(self.controlSocket, candidates) or self.pgid
        self.pids = candidates
        say(
            f"{self.name} ready: pid {self.pid} (group {candidates}), "
            f"control GET /tickets/x -> {status}, https port {self.port}"
        )

    def refreshPids(self) -> list[int]:
        self.checkAlive()
        self.pids = groupPids(self.pgid) or [self.pgid]
        return self.pids

    def control(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = UnixHTTPConnection(str(self.controlSocket))
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def addTicket(self, role: str, path: Path, size: int, ops: list[str]) -> str:
        ticketId = str(uuid.uuid4())
        ticket = {
            "uuid": ticketId,
            "size": size,
            "url": path.resolve().as_uri(),
            "timeout": 3000,
            "inactivity_timeout": 600,
            "ops": ops,
            "transfer_id": f"bench-{self.name}-{role}",
        }
        status, data = self.control("PUT", f"/tickets/{ticketId}", json.dumps(ticket).encode())
        if status != 200:
            raise self.failure(f"PUT /tickets/{ticketId} -> {status}: {data[:500]!r}")
        self.tickets[role] = ticketId
        return ticketId

    def stop(self) -> None:
        """
        SIGTERM the server's process group, SIGKILL it if it lingers.
        """
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            say(f"stopping {self.name} (pgid {proc.pid})")
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                say(f"{self.name} ignored SIGTERM for {STOP_TIMEOUT:.0f}s, killing it")
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        # Anything left in its group (a wrapper's children)?
        for pid in groupPids(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process = None


# ---------------------------------------------------------------------------
# Clients


CURL_WRITE_OUT = "%{http_code} %{size_download} %{size_upload} %{http_version}\\n"


def curlBase(server: Server, transport: str, ticket: str) -> tuple[list[str], str]:
    """
    Common curl arguments and the URL of C{ticket} on C{transport}.

    HTTP/1.1 is forced (upstream does not speak HTTP/2; its client uses
    http.client) and C{Expect: 100-continue} is not sent (neither does the
    upstream client; curl would otherwise wait up to 1 s for a server that
    does not answer it).
    """
    base = ["curl", "-sS", "--http1.1", "-o", "/dev/null", "-w", CURL_WRITE_OUT]
    base += ["--connect-timeout", str(CONNECT_TIMEOUT), "--max-time", str(CURL_TIMEOUT)]
    base += ["--speed-limit", "1", "--speed-time", str(STALL_TIMEOUT)]
    if transport == "https":
        base += ["--cacert", str(server.certs["ca"])]
        base += ["--resolve", f"localhost:{server.port}:127.0.0.1"]
        return base, f"https://localhost:{server.port}/images/{ticket}"
    base += ["--unix-socket", str(server.localSocket)]
    return base, f"http://localhost/images/{ticket}"


def runClients(commands: list[list[str]]) -> list[str]:
    """
    Start all C{commands} at once, wait for all; return their stdout.
    """
    procs = []
    try:
        for cmd in commands:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            _clients.add(proc)
            procs.append((cmd, proc))
        outputs = []
        for cmd, proc in procs:
            out, err = proc.communicate()
            _clients.discard(proc)
            if proc.returncode != 0:
                raise BenchError(
                    f"{shlex.join(cmd)} failed ({proc.returncode}): {err.decode(errors='replace')}"
                )
            outputs.append(out.decode())
        return outputs
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            _clients.discard(proc)


def checkCurl(output: str, status: set[int], downloaded: int, uploaded: int, what: str) -> None:
    parts = output.split()
    if len(parts) < 4:
        raise BenchError(f"{what}: unexpected curl output {output!r}")
    code, down, up, version = int(parts[0]), int(parts[1]), int(parts[2]), parts[3]
    if code not in status:
        raise BenchError(f"{what}: HTTP {code}, expected {sorted(status)}")
    if down != downloaded or up != uploaded:
        raise BenchError(
            f"{what}: transferred {down} down / {up} up, expected {downloaded} / {uploaded}"
        )
    if version != "1.1":
        raise BenchError(f"{what}: HTTP version {version}, expected 1.1")


def tlsInfo(server: Server) -> str:
    """
    TLS version and cipher curl negotiates with the server.
    """
    ticket = server.tickets["read"]
    base, url = curlBase(server, "https", ticket)
    result = subprocess.run(
        base + ["-v", "-r", "0-0", url], capture_output=True, text=True, timeout=60
    )
    match = re.search(r"SSL connection using (\S+) / (\S+)", result.stderr)
    alpn = re.search(r"ALPN: server (?:accepted|did not agree)[^\n]*", result.stderr)
    info = f"{match.group(1)} {match.group(2)}" if match else "unknown"
    if alpn:
        info += f" ({alpn.group(0).replace('ALPN: ', '')})"
    return info


def checkRangeRead(server: Server, images: Images, transport: str) -> None:
    """
    Quick correctness check of GET with a Range, before measuring.
    """
    offset = random.Random(2).randrange(max(1, images.size // MiB - 1)) * MiB
    length = min(MiB, images.size - offset)
    conn: http.client.HTTPConnection
    if transport == "https":
        ctx = ssl.create_default_context(cafile=str(server.certs["ca"]))
        conn = LoopbackHTTPSConnection(server.port, ctx)
    else:
        conn = UnixHTTPConnection(str(server.localSocket))
    try:
        headers = {"Range": f"bytes={offset}-{offset + length - 1}"}
        conn.request("GET", f"/images/{server.tickets['read']}", headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    with open(images.image, "rb") as f:
        want = os.pread(f.fileno(), length, offset)
    if resp.status != 206 or data != want:
        raise server.failure(
            f"GET {transport} bytes={offset}-{offset + length - 1}: status {resp.status}, "
            f"{len(data)} bytes, {'same' if data == want else 'different'} data"
        )


# ---------------------------------------------------------------------------
# Measurements


@dataclass(frozen=True)
class Metric:
    key: str
    unit: str
    higherIsBetter: bool
    fmt: str
    #: False for diagnostics, whose ours/upstream ratio means nothing.
    compared: bool = True


MIBPS = Metric("mibps", "MiB/s", True, "{:.0f}")
CPU_PER_GIB = Metric("cpuPerGiB", "CPU s/GiB", False, "{:.2f}")
PEAK_RSS = Metric("peakRssMiB", "peak RSS MiB", False, "{:.0f}")
REQS = Metric("reqPerSec", "req/s", True, "{:.0f}")
CPU_PER_REQ = Metric("cpuMsPerReq", "CPU ms/req", False, "{:.3f}")
IDLE_RSS = Metric("idleRssMiB", "RSS MiB", False, "{:.0f}")
#: How close one thread (our reactor) came to being the limit.
BUSIEST = Metric("busiestThreadPct", "busiest thread %", False, "{:.0f}", compared=False)


@dataclass(frozen=True)
class Measurement:
    key: str
    label: str
    group: str
    metrics: tuple[Metric, ...]
    run: Callable[[Server, Images, argparse.Namespace], dict[str, Any]]


def systemBusySeconds() -> float:
    """
    CPU time all CPUs spent busy (steal included: another VM's work is noise
    too), from the first line of C{/proc/stat}.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def _rusageSeconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def measureProcess(server: Server, body: Callable[[], Any]) -> tuple[Any, dict[str, float]]:
    """
    Run C{body} while accounting the server's CPU time and sampling its RSS.

    Also accounts the clients' CPU (children the harness waited for) and the
    CPU used by everything else on the machine during the sample: other
    agents' work inflates our numbers, so each sample records how busy the
    machine was with foreign work, as a fraction of all CPUs.

    @return: C{body}'s result and a dict of C{seconds}, C{cpuSeconds}
        (server), C{peakRss} (bytes), C{clientCpuSeconds},
        C{foreignCpuFraction} and C{busiestThreadFraction}: the CPU time of
        the server's busiest thread over the elapsed time (near 1: that one
        thread is the limit).
    """
    pids = server.refreshPids()
    with RssSampler(pids) as sampler:
        busy0 = systemBusySeconds()
        children0 = _rusageSeconds(resource.RUSAGE_CHILDREN)
        self0 = _rusageSeconds(resource.RUSAGE_SELF)
        user0, system0 = cpuTimes(pids)
        t0 = time.monotonic()
        result = body()
        elapsed = time.monotonic() - t0
        user1, system1 = cpuTimes(pids)
        clients = _rusageSeconds(resource.RUSAGE_CHILDREN) - children0
        harness = _rusageSeconds(resource.RUSAGE_SELF) - self0
        busy = systemBusySeconds() - busy0
    server.checkAlive()
    busiest = sampler.busiestThread()
    user, system = user1 - user0, system1 - system0
    cpu = user + system
    foreign = max(0.0, busy - cpu - clients - harness)
    return result, {
        "seconds": elapsed,
        "cpuSeconds": cpu,
        "userSeconds": user,
        "systemSeconds": system,
        "peakRss": sampler.peak,
        "clientCpuSeconds": clients,
        "harnessCpuSeconds": harness,
        "foreignCpuFraction": foreign / (elapsed * (os.cpu_count() or 1)),
        "busiestThreadFraction": busiest / elapsed,
    }


def transferSample(nbytes: int, stats: dict[str, float]) -> dict[str, Any]:
    gib = nbytes / GiB
    return {
        "bytes": nbytes,
        "seconds": stats["seconds"],
        "cpuSeconds": stats["cpuSeconds"],
        "userSeconds": stats["userSeconds"],
        "systemSeconds": stats["systemSeconds"],
        "mibps": nbytes / MiB / stats["seconds"],
        "cpuPerGiB": stats["cpuSeconds"] / gib,
        "peakRssMiB": stats["peakRss"] / MiB,
        "clientCpuPerGiB": stats["clientCpuSeconds"] / gib,
        "foreignCpuFraction": stats["foreignCpuFraction"],
        "busiestThreadPct": stats["busiestThreadFraction"] * 100,
    }


def getCommands(
    base: list[str], url: str, images: Images, parallel: int
) -> tuple[list[list[str]], list[tuple[int, set[int]]]]:
    """
    @return: The curl commands downloading the image (whole, or one of
        C{images.ranges} each), and each one's expected bytes and statuses.
    """
    if parallel == 1:
        return [base + [url]], [(images.size, {200})]
    commands, expected = [], []
    for first, last in images.ranges:
        commands.append(base + ["-H", f"Range: bytes={first}-{last}", url])
        expected.append((last - first + 1, {206}))
    return commands, expected


def putCommands(
    base: list[str], url: str, images: Images, parallel: int
) -> tuple[list[list[str]], list[int]]:
    """
    @return: The curl commands uploading the image (whole, or one of
        C{images.pieces} each with its C{Content-Range}), and each one's
        bytes.
    """
    base = base + ["-H", "Expect:"]
    if parallel == 1:
        return [base + ["-T", str(images.image), url]], [images.size]
    commands, sizes = [], []
    for piece, (first, last) in zip(images.pieces, images.ranges, strict=True):
        header = f"Content-Range: bytes {first}-{last}/*"
        commands.append(base + ["-H", header, "-T", str(piece), url])
        sizes.append(last - first + 1)
    return commands, sizes


def makeGet(transport: str, parallel: int) -> Callable[..., dict[str, Any]]:
    def measure(server: Server, images: Images, opts: argparse.Namespace) -> dict[str, Any]:
        base, url = curlBase(server, transport, server.tickets["read"])
        commands, expected = getCommands(base, url, images, parallel)
        outputs, stats = measureProcess(server, lambda: runClients(commands))
        for out, (n, status) in zip(outputs, expected, strict=True):
            checkCurl(out, status, n, 0, f"{server.name} GET {transport}")
        return transferSample(images.size, stats)

    return measure


def makePut(transport: str, parallel: int) -> Callable[..., dict[str, Any]]:
    def measure(server: Server, images: Images, opts: argparse.Namespace) -> dict[str, Any]:
        target = images.target(server.name)
        prepareTarget(target, images.size, images.targetMode)
        base, url = curlBase(server, transport, server.tickets["write"])
        commands, expected = putCommands(base, url, images, parallel)
        outputs, stats = measureProcess(server, lambda: runClients(commands))
        for out, n in zip(outputs, expected, strict=True):
            checkCurl(out, {200}, 0, n, f"{server.name} PUT {transport}")
        if opts.verify:
            verifySame(images.image, target, f"{server.name} PUT {transport} x{parallel}")
        return transferSample(images.size, stats)

    return measure


def makeRandom(transport: str) -> Callable[..., dict[str, Any]]:
    def measure(server: Server, images: Images, opts: argparse.Namespace) -> dict[str, Any]:
        cmd = [sys.executable, str(BENCH_DIR / "randread.py")]
        if transport == "https":
            cmd += ["--https-port", str(server.port), "--cacert", str(server.certs["ca"])]
        else:
            cmd += ["--unix", str(server.localSocket)]
        cmd += ["--ticket", server.tickets["read"], "--size", str(images.size)]
        cmd += ["--seconds", str(opts.rand_seconds), "--image", str(images.image)]
        cmd += ["--seed", str(random.randrange(1 << 30))]
        outputs, stats = measureProcess(server, lambda: runClients([cmd]))
        result = json.loads(outputs[0])
        requests = result["requests"]
        return {
            "requests": requests,
            "seconds": result["seconds"],
            "cpuSeconds": stats["cpuSeconds"],
            "userSeconds": stats["userSeconds"],
            "systemSeconds": stats["systemSeconds"],
            "reqPerSec": requests / result["seconds"],
            "cpuMsPerReq": stats["cpuSeconds"] * 1000 / requests,
            "peakRssMiB": stats["peakRss"] / MiB,
            "clientCpuMsPerReq": stats["clientCpuSeconds"] * 1000 / requests,
            "foreignCpuFraction": stats["foreignCpuFraction"],
            "busiestThreadPct": stats["busiestThreadFraction"] * 100,
            "verifiedReads": result["verified"],
        }

    return measure


def measureBig(server: Server, images: Images, opts: argparse.Namespace) -> dict[str, Any]:
    assert images.bigSource is not None
    target = images.bigTarget(server.name)
    prepareTarget(target, images.bigSize, "sparse")
    try:
        role = "big"
        if role not in server.tickets:
            server.addTicket(role, target, images.bigSize, ["write"])
        base, url = curlBase(server, "https", server.tickets[role])
        cmd = base + ["-H", "Expect:", "-T", str(images.bigSource), url]
        outputs, stats = measureProcess(server, lambda: runClients([cmd]))
        checkCurl(outputs[0], {200}, 0, images.bigSize, f"{server.name} big PUT")
        verifyBig(images, target, f"{server.name} big PUT")
        return transferSample(images.bigSize, stats)
    finally:
        target.unlink(missing_ok=True)


TRANSFER = (MIBPS, CPU_PER_GIB, PEAK_RSS, BUSIEST)
RANDOM = (REQS, CPU_PER_REQ, PEAK_RSS, BUSIEST)

MEASUREMENTS = [
    Measurement("get-https", "GET HTTPS", "get", TRANSFER, makeGet("https", 1)),
    Measurement("get-unix", "GET UNIX", "get", TRANSFER, makeGet("unix", 1)),
    Measurement("put-https", "PUT HTTPS", "put", TRANSFER, makePut("https", 1)),
    Measurement("put-unix", "PUT UNIX", "put", TRANSFER, makePut("unix", 1)),
    Measurement("get-https-x4", "GET HTTPS x4", "get4", TRANSFER, makeGet("https", PARALLEL)),
    Measurement("get-unix-x4", "GET UNIX x4", "get4", TRANSFER, makeGet("unix", PARALLEL)),
    Measurement("put-https-x4", "PUT HTTPS x4", "put4", TRANSFER, makePut("https", PARALLEL)),
    Measurement("put-unix-x4", "PUT UNIX x4", "put4", TRANSFER, makePut("unix", PARALLEL)),
    Measurement("rand-https", "4K reads HTTPS", "rand", RANDOM, makeRandom("https")),
    Measurement("rand-unix", "4K reads UNIX", "rand", RANDOM, makeRandom("unix")),
]
BIG = Measurement("put-big-https", "big PUT HTTPS", "big", TRANSFER, measureBig)
IDLE = Measurement("idle", "idle, tickets added", "idle", (IDLE_RSS,), lambda *a: {})
GROUPS = ["get", "put", "get4", "put4", "rand", "big"]


# ---------------------------------------------------------------------------
# Report


def summarize(samples: list[dict[str, Any]], metric: Metric) -> dict[str, float] | None:
    values = [s[metric.key] for s in samples if metric.key in s]
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def pairedRatio(
    samples: dict[str, dict[str, list[dict[str, Any]]]], key: str, metric: Metric
) -> dict[str, float] | None:
    """
    @return: The median, least and greatest of ours/upstream within each
        pair (the two samples measured back to back): steadier than the
        ratio of medians when the machine's speed drifts between runs.
    """
    ours = samples.get("ours", {}).get(key, [])
    upstream = samples.get("upstream", {}).get(key, [])
    ratios = [
        o[metric.key] / u[metric.key]
        for o, u in zip(ours, upstream, strict=False)
        if metric.key in o and u.get(metric.key)
    ]
    if not ratios:
        return None
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def summaryRows(
    measurements: list[Measurement], samples: dict[str, dict[str, list[dict[str, Any]]]]
) -> list[dict[str, Any]]:
    rows = []
    for m in measurements:
        for metric in m.metrics:
            row: dict[str, Any] = {
                "measurement": m.key,
                "label": m.label,
                "metric": metric.unit,
                "higherIsBetter": metric.higherIsBetter,
            }
            for name in ("ours", "upstream"):
                row[name] = summarize(samples.get(name, {}).get(m.key, []), metric)
            if metric.compared and row["ours"] and row["upstream"] and row["upstream"]["median"]:
                row["ratio"] = row["ours"]["median"] / row["upstream"]["median"]
            else:
                row["ratio"] = None
            row["pairedRatio"] = pairedRatio(samples, m.key, metric) if metric.compared else None
            rows.append(row)
    return rows


def formatTable(rows: list[dict[str, Any]], metrics: dict[str, Metric]) -> str:
    def cell(summary: dict[str, float] | None, fmt: str) -> str:
        if summary is None:
            return "-"
        med, lo, hi = (fmt.format(summary[k]) for k in ("median", "min", "max"))
        return f"{med} ({lo}-{hi})"

    header = ["measurement", "metric", "ours", "upstream", "paired", "ours/upstream"]
    lines = [header]
    for row in rows:
        metric = metrics[row["metric"]]
        fmt = metric.fmt
        better = "higher is better" if row["higherIsBetter"] else "lower is better"
        if not metric.compared:
            ratio = "-     (diagnostic)"
        elif row["ratio"] is None:
            ratio = "-"
        else:
            ratio = f"{row['ratio']:.2f}  ({better})"
        paired = row.get("pairedRatio")
        pairs = "-" if not paired else cell(paired, "{:.2f}")
        lines.append(
            [
                row["label"],
                row["metric"],
                cell(row["ours"], fmt),
                cell(row["upstream"], fmt),
                pairs,
                ratio,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def environment(opts: argparse.Namespace, images: Images, servers: list[Server]) -> dict[str, Any]:
    def first(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
            return (out.stdout.strip().splitlines() or ["?"])[0]
        except Exception:
            return "?"

    cpuModel = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpuModel = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        memTotal = int(f.readline().split()[1]) * KiB
    env = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "cpuModel": cpuModel,
        "memTotalGiB": round(memTotal / GiB, 1),
        "loadavgAtEnd": open("/proc/loadavg").read().split()[:3],
        "imageDir": f"{images.directory} on {fsType(images.directory)}",
        "imageSize": images.size,
        "bigDir": (
            f"{images.bigDirectory} on {fsType(images.bigDirectory)}"
            if images.bigDirectory
            else None
        ),
        "bigSize": images.bigSize or None,
        "curl": first(["curl", "--version"]),
        "python": sys.version.split()[0],
        "runs": opts.runs,
        "warmup": opts.warmup,
    }
    for s in servers:
        env[f"{s.name}Version"] = s.version
        env[f"{s.name}Tls"] = s.tls
        env[f"{s.name}Command"] = s.commandTemplate
    return env


def formatEnvironment(env: dict[str, Any]) -> str:
    keys = [
        ("date", "date"),
        ("kernel", "kernel"),
        ("cpus", "CPUs"),
        ("cpuModel", "CPU"),
        ("memTotalGiB", "RAM GiB"),
        ("loadavgAtStart", "load avg at start"),
        ("loadavgAtEnd", "load avg at end"),
        ("foreignLoad", "foreign CPU in samples"),
        ("retried", "pairs re-measured"),
        ("imageDir", "image dir"),
        ("imageSize", "image size"),
        ("bigDir", "big upload target"),
        ("bigSize", "big upload size"),
        ("runs", "runs per server"),
        ("warmup", "warm-up rounds"),
        ("curl", "client"),
        ("oursVersion", "ours"),
        ("upstreamVersion", "upstream"),
        ("oursTls", "TLS (curl -> ours)"),
        ("upstreamTls", "TLS (curl -> upstream)"),
    ]
    lines = []
    for key, label in keys:
        if env.get(key) is None:
            continue
        value = env[key]
        if key in ("imageSize", "bigSize"):
            value = humanSize(value)
        elif isinstance(value, list):
            value = " ".join(value)
        lines.append(f"{label + ':':<24}{value}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Main


def ensureUpstreamVenv(venv: Path) -> str:
    exe = venv / "bin" / "ovirt-imageio"
    python = venv / "bin" / "python"
    if not exe.exists():
        say(f"creating {venv} with ovirt-imageio=={UPSTREAM_VERSION}")
        base = shutil.which("python3") or sys.executable
        run([base, "-m", "venv", str(venv)])
        run([str(python), "-m", "pip", "install", "-q", f"ovirt-imageio=={UPSTREAM_VERSION}"])
    out = run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('ovirt-imageio'))"]
    )
    version = out.stdout.strip()
    if version != UPSTREAM_VERSION:
        say(f"warning: {venv} has ovirt-imageio {version}, not {UPSTREAM_VERSION}")
    return f"ovirt-imageio {version}"


def oursVersion() -> str:
    """
    The commit our daemon is started from, and whether its code differs from
    it: others edit the same working tree, so what runs is whatever is on
    disk when the server starts.
    """
    try:
        commit = run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]).stdout.strip()
        status = run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "imageio", "twisted"])
        dirty = len(status.stdout.splitlines())
    except BenchError:
        return "imageio (Twisted), commit unknown"
    suffix = f" + {dirty} uncommitted files under imageio/ and twisted/" if dirty else ""
    return f"imageio (Twisted) {commit}{suffix}"


def checkSpace(directory: Path, needed: int, what: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    st = os.statvfs(directory)
    free = st.f_bavail * st.f_frsize
    if free < needed:
        raise BenchError(
            f"{what}: {directory} has {humanSize(free // MiB * MiB)} free, "
            f"needs about {humanSize(needed // MiB * MiB)}"
        )


def removeStale(directory: Path) -> None:
    """
    Remove what a killed harness left behind: C{imageio-bench-<pid>*}
    entries whose pid is gone.
    """
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for path in entries:
        match = re.fullmatch(r"imageio-bench-(\d+)(-.*)?", path.name)
        if not match or Path(f"/proc/{match.group(1)}").exists():
            continue
        say(f"removing {path}, left by a harness that died")
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def parseArgs(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark our imageio daemon against upstream ovirt-imageio 2.5.1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--only", choices=["both", "ours", "upstream"], default="both")
    p.add_argument("--runs", type=int, default=5, help="runs per server per measurement")
    p.add_argument(
        "--warmup", type=int, default=1, help="unrecorded rounds of every measurement first"
    )
    p.add_argument("--size", type=parseSize, default=2 * GiB, help="image size")
    p.add_argument("--dir", type=Path, default=Path("/dev/shm"), help="where images go")
    p.add_argument(
        "--big-size", type=parseSize, default=8 * GiB, help="size of the big upload (0 = skip)"
    )
    p.add_argument(
        "--big-dir", type=Path, default=Path("/var/tmp"), help="where the big upload target goes"
    )
    p.add_argument("--big-runs", type=int, default=1, help="big uploads per server")
    p.add_argument(
        "--max-foreign",
        type=float,
        default=0.25,
        help="re-measure a pair of samples when other work took more than this "
        "fraction of all CPUs during either of them",
    )
    p.add_argument(
        "--retries", type=int, default=1, help="re-measurements per noisy pair (0 = never)"
    )
    p.add_argument("--no-big", action="store_true", help="skip the big upload")
    p.add_argument(
        "--rand-seconds", type=float, default=5.0, help="duration of each 4 KiB random-read run"
    )
    p.add_argument(
        "--tests",
        default=",".join(GROUPS),
        help=f"comma-separated subset of {','.join(GROUPS)}",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke check: 256 MiB image, 2 runs, 2 s random reads, 1 GiB big upload",
    )
    p.add_argument(
        "--ours-cmd",
        default=DEFAULT_OURS_CMD,
        help="command starting our daemon; {config_dir} is replaced "
        "(appended if absent); must stay in the foreground",
    )
    p.add_argument(
        "--upstream-cmd",
        default=DEFAULT_UPSTREAM_CMD,
        help="command starting upstream; {venv} and {config_dir} are replaced",
    )
    p.add_argument("--upstream-venv", type=Path, default=DEFAULT_UPSTREAM_VENV)
    p.add_argument(
        "--no-verify",
        dest="verify",
        action="store_false",
        help="do not cmp every uploaded target with its source",
    )
    p.add_argument(
        "--keep", action="store_true", help="keep images, configs and certificates at exit"
    )
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="where results go")
    opts = p.parse_args(argv)
    if opts.quick:
        defaults = {"size": 2 * GiB, "runs": 5, "big_size": 8 * GiB, "rand_seconds": 5.0}
        quick = {"size": 256 * MiB, "runs": 2, "big_size": GiB, "rand_seconds": 2.0}
        for key, value in quick.items():
            if getattr(opts, key) == defaults[key]:
                setattr(opts, key, value)
    if opts.no_big:
        opts.big_size = 0
    opts.groups = [g.strip() for g in opts.tests.split(",") if g.strip()]
    unknown = set(opts.groups) - set(GROUPS)
    if unknown:
        p.error(f"unknown tests: {', '.join(sorted(unknown))}")
    if opts.big_size == 0 and "big" in opts.groups:
        opts.groups.remove("big")
    if opts.size < PARALLEL * 4 * KiB or opts.size % (4 * KiB):
        p.error("--size must be a multiple of 4 KiB and at least 16 KiB")
    if opts.runs < 1 or opts.warmup < 0:
        p.error("--runs must be at least 1 and --warmup at least 0")
    return opts


@dataclass
class Workspace:
    """
    Everything a run creates, removed at exit unless C{--keep}.
    """

    paths: list[Path] = field(default_factory=list)

    def add(self, path: Path) -> Path:
        self.paths.append(path)
        return path

    def cleanup(self) -> None:
        for path in reversed(self.paths):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def benchmark(opts: argparse.Namespace, workspace: Workspace, servers: list[Server]) -> int:
    runId = time.strftime("%Y%m%d-%H%M%S")
    resultDir = opts.results / runId
    logDir = resultDir / "logs"
    logDir.mkdir(parents=True, exist_ok=True)

    for tool in ("curl", "openssl", "cmp"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found in PATH")

    names = ["ours", "upstream"] if opts.only == "both" else [opts.only]
    upstreamVersion = None
    if "upstream" in names:
        upstreamVersion = ensureUpstreamVenv(opts.upstream_venv)

    # Space: image + pieces + one target per server; the big upload writes
    # one target at a time (removed after each) next to its sparse source.
    checkSpace(opts.dir, opts.size * (2 + len(names)) + 64 * MiB, "--dir")
    if "big" in opts.groups:
        checkSpace(opts.big_dir, opts.big_size + 64 * MiB, "--big-dir")

    loadAtStart = open("/proc/loadavg").read().split()[:3]
    for directory in {opts.dir, opts.big_dir, Path("/dev/shm"), Path(tempfile.gettempdir())}:
        removeStale(directory)
    work = workspace.add(Path(tempfile.mkdtemp(prefix=f"imageio-bench-{os.getpid()}-")))
    certs = makeCertificates(work / "pki")
    images = makeImages(workspace.add(opts.dir / f"imageio-bench-{os.getpid()}"), opts.size)
    if "big" in opts.groups:
        shm = Path("/dev/shm")
        if shm.is_dir() and fsType(shm).startswith("tmpfs"):
            sourceDirectory = workspace.add(shm / f"imageio-bench-{os.getpid()}-big")
        else:
            sourceDirectory = images.directory
        targetDirectory = workspace.add(opts.big_dir / f"imageio-bench-{os.getpid()}")
        makeBigSource(images, sourceDirectory, targetDirectory, opts.big_size)

    for name in names:
        template = opts.ours_cmd if name == "ours" else opts.upstream_cmd
        server = Server(name, template, work / name, logDir, certs)
        server.version = oursVersion() if name == "ours" else str(upstreamVersion)
        servers.append(server)
        server.writeConfig()
        server.start(opts.upstream_venv)
    for server in servers:
        server.waitReady()
        prepareTarget(images.target(server.name), images.size, images.targetMode)
        server.addTicket("read", images.image, images.size, ["read"])
        server.addTicket("write", images.target(server.name), images.size, ["write"])
        checkRangeRead(server, images, "https")
        checkRangeRead(server, images, "unix")
        server.tls = tlsInfo(server)
        say(f"{server.name}: TLS {server.tls}; range reads over HTTPS and UNIX correct")

    samples: dict[str, dict[str, list[dict[str, Any]]]] = {s.name: {} for s in servers}
    rejected: dict[str, list[dict[str, Any]]] = {}
    for server in servers:
        samples[server.name]["idle"] = [{"idleRssMiB": rssBytes(server.refreshPids()) / MiB}]

    selected = [m for m in MEASUREMENTS if m.group in opts.groups]
    # Warm-up rounds are measured and checked like the others but not
    # recorded: first connections, first buffers, first touch of memory.
    retried = 0
    for i in range(-opts.warmup, opts.runs):
        roundName = "warm-up" if i < 0 else f"run {i + 1}/{opts.runs}"
        # Each server goes first in every other round: neither always
        # measures after the other's run warmed (or tired) the machine.
        order = servers if i % 2 == 0 else servers[::-1]
        for m in selected:
            pair = measurePair(m, order, images, opts, roundName, retry=i >= 0)
            retried += pair["retries"]
            if i >= 0:
                for server in servers:
                    samples[server.name].setdefault(m.key, []).append(pair[server.name])
                if pair["rejected"]:
                    rejected.setdefault(m.key, []).extend(pair["rejected"])
    if "big" in opts.groups:
        for i in range(opts.big_runs):
            for server in servers:
                try:
                    sample = BIG.run(server, images, opts)
                except BenchError as e:
                    raise server.failure(f"{BIG.label}: {e}") from None
                samples[server.name].setdefault(BIG.key, []).append(sample)
                say(f"big {i + 1}/{opts.big_runs} {server.name:<8} {brief(BIG, sample)}")

    measurements = [IDLE] + selected + ([BIG] if "big" in opts.groups else [])
    rows = summaryRows(measurements, samples)
    env = environment(opts, images, servers)
    env["loadavgAtStart"] = loadAtStart
    env["foreignLoad"] = foreignLoad(samples)
    env["retried"] = f"{retried} (threshold {opts.max_foreign:.0%}, up to {opts.retries} per pair)"
    metrics = {
        m.unit: m for m in (MIBPS, CPU_PER_GIB, PEAK_RSS, REQS, CPU_PER_REQ, IDLE_RSS, BUSIEST)
    }
    table = formatTable(rows, metrics)
    report = f"{formatEnvironment(env)}\n\n{table}\n"
    print(report)

    for server in servers:
        server.stop()
    result = {
        "environment": env,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "summary": rows,
        "samples": samples,
        "rejectedPairs": rejected,
    }
    (resultDir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (resultDir / "table.txt").write_text(report)
    say(f"results in {resultDir}/ (result.json, table.txt, logs/)")
    return 0


def measurePair(
    m: Measurement,
    servers: list[Server],
    images: Images,
    opts: argparse.Namespace,
    roundName: str,
    retry: bool,
) -> dict[str, Any]:
    """
    One sample of C{m} from each server, back to back.  If other work on the
    machine took more than C{--max-foreign} of the CPUs during either
    sample, measure the pair again (up to C{--retries} times) and keep the
    quietest pair: the servers stay compared under the same conditions.
    """
    attempts: list[dict[str, Any]] = []
    for attempt in range(1 + (opts.retries if retry else 0)):
        pair = {}
        for server in servers:
            try:
                sample = m.run(server, images, opts)
            except BenchError as e:
                raise server.failure(f"{roundName} {m.label}: {e}") from None
            pair[server.name] = sample
            label = f"{roundName}, again" if attempt else roundName
            say(f"{label} {m.label:<15} {server.name:<8} {brief(m, sample)}")
        attempts.append(pair)
        if pairNoise(pair) <= opts.max_foreign:
            break
    best = min(attempts, key=pairNoise)
    result: dict[str, Any] = dict(best)
    result["retries"] = len(attempts) - 1
    result["rejected"] = [p for p in attempts if p is not best]
    return result


def pairNoise(pair: dict[str, dict[str, Any]]) -> float:
    return max(s.get("foreignCpuFraction", 0.0) for s in pair.values())


def brief(m: Measurement, sample: dict[str, Any]) -> str:
    text = "  ".join(
        f"{metric.fmt.format(sample[metric.key])} {metric.unit}"
        for metric in m.metrics
        if metric.key in sample
    )
    if "systemSeconds" in sample:
        text += f" ({sample['userSeconds']:.2f} user + {sample['systemSeconds']:.2f} sys s)"
    if "clientCpuPerGiB" in sample:
        text += f"  [client {sample['clientCpuPerGiB']:.2f} CPU s/GiB"
    elif "clientCpuMsPerReq" in sample:
        text += f"  [client {sample['clientCpuMsPerReq']:.3f} CPU ms/req"
    if "foreignCpuFraction" in sample:
        text += f", foreign load {sample['foreignCpuFraction']:.0%}]"
    return text


def foreignLoad(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """
    How busy the machine was with work other than ours during the samples.
    """
    values = [
        s["foreignCpuFraction"]
        for perServer in samples.values()
        for perMeasurement in perServer.values()
        for s in perMeasurement
        if "foreignCpuFraction" in s
    ]
    if not values:
        return "-"
    noisy = sum(1 for v in values if v > 0.10)
    return (
        f"median {statistics.median(values):.0%}, max {max(values):.0%} of all CPUs; "
        f"{noisy} of {len(values)} samples above 10%"
    )


def main(argv: list[str] | None = None) -> int:
    return runCleanly(parseArgs(argv), benchmark)


def runCleanly(
    opts: argparse.Namespace,
    benchmark: Callable[[argparse.Namespace, Workspace, list[Server]], int],
) -> int:
    """
    Run C{benchmark} and, whatever happens (errors, Ctrl-C, SIGTERM or
    SIGHUP), stop every server and client it started and remove its files
    (unless C{opts.keep}).

    @return: The exit status.
    """
    # Even if started with SIGINT ignored (a background job of a script).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _onSignal)
    signal.signal(signal.SIGHUP, _onSignal)
    workspace = Workspace()
    servers: list[Server] = []
    try:
        return benchmark(opts, workspace, servers)
    except BenchError as e:
        say(f"FAILED: {e}")
        return 1
    except KeyboardInterrupt:
        say("interrupted by SIGINT, cleaning up")
        return 130
    except Interrupted as e:
        say(f"interrupted by {e}, cleaning up")
        return 143
    finally:
        # Never leave a server or a client behind, whatever happened.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        killClients()
        for server in servers:
            try:
                server.stop()
            except Exception as e:  # keep stopping the others
                say(f"could not stop {server.name}: {e}")
        if getattr(opts, "keep", False):
            say("kept: " + ", ".join(str(p) for p in workspace.paths))
        else:
            workspace.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
