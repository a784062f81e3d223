#!/usr/bin/env python3
"""
Load test: many keep-alive connections doing small GETs, many idle
connections, and a big upload, all at once against one daemon.

The daemon runs alone in a C{twistd} subprocess (L{tests._daemon}) with a
raised file descriptor limit; the client is asyncio in this process. It
reports errors (which must be zero), GET latency percentiles and rate, the
upload's throughput, and the daemon's peak RSS and open file descriptors.

    .venv/bin/python bench/load.py                  # 1000 GETters, 200 idle, 2 GiB upload
    .venv/bin/python bench/load.py --connections 100 --idle 20 --upload-size 256M --duration 5
    .venv/bin/python bench/load.py --listener local # the UNIX socket instead of HTTPS

Run it from the project root with the project installed (``.venv``). The
client and the daemon share this machine's CPUs, so latencies include the
client's own scheduling; compare runs on the same machine only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import ssl
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attrs import define, field

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests._daemon import (  # noqa: E402
    Addresses,
    SubprocessDaemon,
    control,
    fdCount,
    pattern,
    raiseFileLimit,
    ticketBody,
)

KiB = 1024
MiB = 1024**2
GiB = 1024**3

#: Size of the image the GETs read from, and of each GET.
READ_IMAGE = 64 * MiB
READ_SIZE = 4 * KiB
#: How much the uploader writes per call.
UPLOAD_CHUNK = MiB
#: Connections opening at once (TLS handshakes in flight).
OPENING = 64
#: Seconds without progress after which the upload counts as stalled.
STALL = 60


def cpuSeconds(pid: int | str) -> float:
    """
    @return: User and system CPU seconds process C{pid} used so far.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parseSize(text: str) -> int:
    units = {"K": KiB, "M": MiB, "G": GiB}
    if text[-1:].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


@define
class Results:
    """
    What one run measured.
    """

    connections: int
    idle: int
    duration: float
    listener: str
    requests: int = 0
    errors: list[str] = field(factory=list)
    latencies: list[float] = field(factory=list)
    uploadSize: int = 0
    uploadSeconds: float = 0.0
    uploadStatus: int = 0
    idleClosed: int = 0
    daemonPeakRssKiB: int = 0
    daemonStartRssKiB: int = 0
    daemonPeakFds: int = 0
    daemonCpuSeconds: float = 0.0
    clientCpuSeconds: float = 0.0
    daemonFdLimit: str = ""
    clientFdLimit: int = 0
    elapsed: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            if not lat:
                return 0.0
            return lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1000

        return {
            "connections": self.connections,
            "idle": self.idle,
            "listener": self.listener,
            "duration_s": round(self.duration, 1),
            "requests": self.requests,
            "errors": len(self.errors),
            "error_samples": self.errors[:10],
            "requests_per_s": round(self.requests / self.duration, 1) if self.duration else 0,
            "latency_ms": {
                "p50": round(pct(50), 2),
                "p90": round(pct(90), 2),
                "p99": round(pct(99), 2),
                "max": round(lat[-1] * 1000, 2) if lat else 0,
                "mean": round(statistics.fmean(lat) * 1000, 2) if lat else 0,
            },
            "upload": {
                "bytes": self.uploadSize,
                "status": self.uploadStatus,
                "seconds": round(self.uploadSeconds, 2),
                "MiB_per_s": (
                    round(self.uploadSize / MiB / self.uploadSeconds, 1)
                    if self.uploadSeconds
                    else 0
                ),
            },
            "idle_closed_by_daemon": self.idleClosed,
            "daemon": {
                "start_rss_MiB": round(self.daemonStartRssKiB / 1024, 1),
                "peak_rss_MiB": round(self.daemonPeakRssKiB / 1024, 1),
                "peak_fds": self.daemonPeakFds,
                "cpu_s": round(self.daemonCpuSeconds, 1),
                "fd_limit": self.daemonFdLimit,
            },
            "client_fd_limit": self.clientFdLimit,
            "client_cpu_s": round(self.clientCpuSeconds, 1),
            "elapsed_s": round(self.elapsed, 1),
        }


class Client:
    """
    Opens connections to one listener of the daemon.
    """

    def __init__(self, addresses: Addresses, listener: str) -> None:
        self.addresses = addresses
        self.listener = listener
        self.context = ssl.create_default_context(cafile=addresses.caFile)
        self._opening = asyncio.Semaphore(OPENING)

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with self._opening:
            if self.listener == "local":
                return await asyncio.open_unix_connection(self.addresses.local, limit=MiB)
            host, port = self.addresses.remote
            return await asyncio.open_connection(
                host, port, ssl=self.context, server_hostname="localhost", limit=MiB
            )


async def readResponse(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return status, body


async def getter(
    client: Client,
    ticket: str,
    results: Results,
    connected: list[int],
    started: asyncio.Event,
    stopping: asyncio.Event,
) -> None:
    """
    One keep-alive connection doing small random GETs from C{started} until
    C{stopping}.
    """
    try:
        reader, writer = await client.open()
    except Exception as e:
        results.errors.append(f"connect: {e!r}")
        return
    connected.append(1)
    await started.wait()
    rng = random.Random()
    try:
        while not stopping.is_set():
            offset = rng.randrange(0, READ_IMAGE - READ_SIZE) // 512 * 512
            request = (
                f"GET /images/{ticket} HTTP/1.1\r\nHost: localhost\r\n"
                f"Range: bytes={offset}-{offset + READ_SIZE - 1}\r\n\r\n"
            ).encode()
            sent = time.perf_counter()
            writer.write(request)
            status, body = await asyncio.wait_for(readResponse(reader), STALL)
            results.latencies.append(time.perf_counter() - sent)
            results.requests += 1
            if status != 206 or len(body) != READ_SIZE:
                results.errors.append(f"GET status {status}, {len(body)} bytes")
                break
    except Exception as e:
        results.errors.append(f"GET: {e!r}")
    finally:
        writer.close()


async def uploader(client: Client, ticket: str, size: int, results: Results) -> None:
    """
    One streaming PUT of C{size} bytes.
    """
    chunk = pattern(UPLOAD_CHUNK, b"load")
    try:
        reader, writer = await client.open()
        started = time.monotonic()
        writer.write(
            f"PUT /images/{ticket} HTTP/1.1\r\nHost: localhost\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        sent = 0
        while sent < size:
            n = min(len(chunk), size - sent)
            writer.write(chunk[:n])
            sent += n
            try:
                await asyncio.wait_for(writer.drain(), STALL)
            except TimeoutError:
                results.errors.append(f"upload stalled after {sent - n} bytes")
                writer.transport.abort()
                return
        status, body = await asyncio.wait_for(readResponse(reader), STALL)
        results.uploadSeconds = time.monotonic() - started
        results.uploadStatus = status
        if status != 200:
            results.errors.append(f"upload status {status}: {body[:200]!r}")
        writer.close()
    except Exception as e:
        results.errors.append(f"upload: {e!r}")


async def sampler(daemon: SubprocessDaemon, results: Results, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            results.daemonPeakFds = max(results.daemonPeakFds, daemon.fdCount())
        except OSError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass


async def runLoad(
    daemon: SubprocessDaemon,
    listener: str,
    readTicket: str,
    writeTicket: str,
    results: Results,
    connections: int,
    idle: int,
    duration: float,
    uploadSize: int,
) -> None:
    client = Client(daemon.addresses, listener)
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler(daemon, results, stop))
    idleConns = await asyncio.gather(*[client.open() for _ in range(idle)], return_exceptions=True)
    for conn in idleConns:
        if isinstance(conn, BaseException):
            results.errors.append(f"idle connect: {conn!r}")
    started, stopping = asyncio.Event(), asyncio.Event()
    connected: list[int] = []
    getters = [
        asyncio.create_task(getter(client, readTicket, results, connected, started, stopping))
        for _ in range(connections)
    ]
    # Every getter connects (or fails) before the clock starts.
    while len(connected) + sum(1 for t in getters if t.done()) < connections:
        await asyncio.sleep(0.05)
    upload = asyncio.create_task(uploader(client, writeTicket, uploadSize, results))
    begin = time.monotonic()
    started.set()
    await asyncio.sleep(duration)
    stopping.set()
    await asyncio.gather(*getters, return_exceptions=True)
    results.duration = time.monotonic() - begin
    await upload
    for conn in idleConns:
        if isinstance(conn, BaseException):
            continue
        reader, writer = conn
        if reader.at_eof() or writer.is_closing():
            results.idleClosed += 1
        writer.close()
    stop.set()
    await sampling


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1000, help="GET connections")
    parser.add_argument("--idle", type=int, default=200, help="idle connections")
    parser.add_argument("--duration", type=float, default=20, help="seconds of GETs")
    parser.add_argument("--upload-size", type=parseSize, default=2 * GiB)
    parser.add_argument("--listener", choices=("remote", "local"), default="remote")
    parser.add_argument(
        "--nofile", type=int, default=0, help="daemon's fd limit (default: 2 per connection + 256)"
    )
    parser.add_argument("--dir", default="/var/tmp", help="where the upload target goes")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    total = args.connections + args.idle + 2
    clientLimit = raiseFileLimit(total + 256)
    if clientLimit < total + 64:
        raise SystemExit(f"client fd limit {clientLimit} too low for {total} connections")
    nofile = args.nofile or 2 * total + 256
    daemon = SubprocessDaemon.start(
        {
            "daemon": {
                "request_timeout": int(args.duration) + 120,
                "inactivity_timeout": int(args.duration) + 120,
            },
            "tls": {"handshake_timeout": 60},
        },
        nofile=nofile,
    )
    target = Path(args.dir) / f"imageio-load-{os.getpid()}.raw"
    results = Results(args.connections, args.idle, args.duration, args.listener)
    results.clientFdLimit = clientLimit
    try:
        with open(f"/proc/{daemon.pid}/limits") as f:
            results.daemonFdLimit = next(
                " ".join(line.split()[3:5]) for line in f if line.startswith("Max open files")
            )
        source = daemon.runDir / "read.raw"
        source.write_bytes(pattern(READ_IMAGE, b"read"))
        with open(target, "wb") as f:
            f.truncate(args.upload_size)
        readTicket, writeTicket = "load-read", "load-write"
        for ticket, path, size, ops in [
            (readTicket, source, READ_IMAGE, ["read"]),
            (writeTicket, target, args.upload_size, ["write"]),
        ]:
            body = ticketBody(ticket, f"file://{path}", size, ops, timeout=3600)
            r = control(daemon.addresses, "PUT", f"/tickets/{ticket}", body)
            if r.status != 200:
                raise SystemExit(f"cannot add ticket: {r.status} {r.text}")
        results.daemonStartRssKiB = daemon.rssKiB()
        began = time.monotonic()
        daemonCpu, clientCpu = cpuSeconds(daemon.pid), cpuSeconds("self")
        asyncio.run(
            runLoad(
                daemon,
                args.listener,
                readTicket,
                writeTicket,
                results,
                args.connections,
                args.idle,
                args.duration,
                args.upload_size,
            )
        )
        results.elapsed = time.monotonic() - began
        results.daemonCpuSeconds = cpuSeconds(daemon.pid) - daemonCpu
        results.clientCpuSeconds = cpuSeconds("self") - clientCpu
        results.uploadSize = args.upload_size
        results.daemonPeakRssKiB = daemon.peakRssKiB()
        if daemon.process.poll() is not None:
            results.errors.append(f"daemon exited: {daemon.process.returncode}")
    finally:
        status = daemon.stop()
        target.unlink(missing_ok=True)
    summary = results.summary()
    summary["daemon"]["exit_status"] = status
    summary["client_fds_at_end"] = fdCount()
    print(json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    summary = main()
    sys.exit(1 if summary["errors"] or summary["upload"]["status"] != 200 else 0)
