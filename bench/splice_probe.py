#!/usr/bin/env python3
"""
Is C{splice(2)} from an O_DIRECT file to a UNIX socket cheaper than
reading into our buffer and sending it?

Issue 12, decision 4: the plain (UNIX-socket) download path reads each
chunk with O_DIRECT into an aligned buffer and sends it (one copy, from
the buffer into the socket). C{splice} moves the data file -> pipe ->
socket inside the kernel. This script measures both alone, without HTTP or
the reactor: a blocking sender in this process, a reader process that
receives and drops everything, the sender's CPU (user + system) per GiB.

Usage::

    python3 bench/splice_probe.py [--dir /dev/shm] [--size-mib 512] [--runs 3]
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import socket
import statistics
import sys
import time

MiB = 1024 * 1024


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def reader(sock: socket.socket) -> None:
    buf = bytearray(MiB)
    while sock.recv_into(buf):
        pass
    os._exit(0)


def connected() -> tuple[socket.socket, int]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        a.close()
        reader(b)
    b.close()
    return a, pid


def reaped(pid: int) -> float:
    """
    @return: The reader's CPU seconds, once it exited.
    """
    _, _, usage = os.wait4(pid, 0)
    return float(usage.ru_utime + usage.ru_stime)


def readSend(path: str, size: int, chunk: int) -> tuple[float, float, float]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, chunk)
    view = memoryview(buf)
    sock, pid = connected()
    t0, c0 = time.perf_counter(), cpu()
    offset = 0
    while offset < size:
        n = os.preadv(fd, [view], offset)
        sock.sendall(view[:n])
        offset += n
    elapsed, used = time.perf_counter() - t0, cpu() - c0
    sock.close()
    received = reaped(pid)
    view.release()
    buf.close()
    os.close(fd)
    return elapsed, used, received


def spliced(path: str, size: int, chunk: int) -> tuple[float, float, float]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    r, w = os.pipe()
    import fcntl

    fcntl.fcntl(w, 1031, chunk)  # F_SETPIPE_SZ
    sock, pid = connected()
    t0, c0 = time.perf_counter(), cpu()
    offset = 0
    while offset < size:
        n = os.splice(fd, w, min(chunk, size - offset), offset_src=offset)
        if n == 0:
            break
        offset += n
        left = n
        while left:
            left -= os.splice(r, sock.fileno(), left)
    elapsed, used = time.perf_counter() - t0, cpu() - c0
    sock.close()
    received = reaped(pid)
    for f in (r, w, fd):
        os.close(f)
    return elapsed, used, received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args()
    size = opts.size_mib * MiB
    path = os.path.join(opts.dir, f"splice-probe-{os.getpid()}.raw")
    with open(path, "wb") as f:
        for _ in range(opts.size_mib):
            f.write(os.urandom(MiB))
    try:
        rows = [
            ("preadv 4 MiB + send", readSend, 4 * MiB),
            ("preadv 1 MiB + send", readSend, MiB),
            ("splice 1 MiB pipe", spliced, MiB),
        ]
        results: dict[str, list[tuple[float, float, float]]] = {label: [] for label, _, _ in rows}
        for _ in range(opts.runs):
            for label, fn, chunk in rows:
                results[label].append(fn(path, size, chunk))
        gib = size / (1024 * MiB)
        print(f"{opts.size_mib} MiB from {opts.dir}, medians of {opts.runs} (min-max)")
        print(f"{'variant':24}  {'sender CPU s/GiB':>22}  {'reader CPU s/GiB':>22}  {'MiB/s':>20}")
        for label, samples in results.items():
            cpus = sorted(c / gib for _, c, _ in samples)
            readers = sorted(r / gib for _, _, r in samples)
            rates = sorted(size / MiB / e for e, _, _ in samples)
            print(
                f"{label:24}  {statistics.median(cpus):6.3f} ({cpus[0]:.3f}-{cpus[-1]:.3f})"
                f"  {statistics.median(readers):6.3f} ({readers[0]:.3f}-{readers[-1]:.3f})"
                f"  {statistics.median(rates):6.0f} ({rates[0]:.0f}-{rates[-1]:.0f})"
            )
    finally:
        os.unlink(path)


if __name__ == "__main__":
    sys.exit(main())
