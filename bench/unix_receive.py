#!/usr/bin/env python3
"""
What one wake-up of a receiver costs on a UNIX stream socket, by loop.

A child process sends ``--size-mib`` MiB in 64 KiB ``send`` calls (what
``curl -T`` does); the parent receives them with ``recv_into`` into one
4 MiB buffer in a blocking loop (upstream's connection threads), an
``epoll`` loop, or Twisted's epoll reactor with a minimal reader (our
daemon's loop without HTTP), and prints CPU per GiB, the number of reads
and the user CPU per read. Run it with the project's venv (Twisted)::

    .venv/bin/python bench/unix_receive.py [--size-mib 1024] [--runs 3]
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import select
import socket
import time
from typing import Any

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
SEND = 64 * KiB


def send(sock: socket.socket, size: int) -> None:
    data = os.urandom(SEND)
    left = size
    while left:
        left -= sock.send(data[: min(SEND, left)])
    sock.close()


def receiveBlocking(sock: socket.socket, buf: memoryview) -> tuple[int, int]:
    got = reads = 0
    while n := sock.recv_into(buf):
        got += n
        reads += 1
    return got, reads


def receiveEpoll(sock: socket.socket, buf: memoryview) -> tuple[int, int]:
    sock.setblocking(False)
    poller = select.epoll()
    poller.register(sock.fileno(), select.EPOLLIN)
    got = reads = 0
    while True:
        for _ in poller.poll(-1, 1):
            n = sock.recv_into(buf)
            if not n:
                return got, reads
            got += n
            reads += 1


def receiveTwisted(sock: socket.socket, buf: memoryview) -> tuple[int, int]:
    from twisted.internet import abstract, epollreactor

    reactor: Any = epollreactor.EPollReactor()
    counts = [0, 0]

    class Reader(abstract.FileDescriptor):
        def fileno(self) -> int:
            return sock.fileno()

        def doRead(self) -> None:
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                return
            if not n:
                self.stopReading()
                reactor.stop()
                return
            counts[0] += n
            counts[1] += 1

    sock.setblocking(False)
    Reader(reactor).startReading()
    reactor.run(installSignalHandlers=False)
    return counts[0], counts[1]


LOOPS = {"blocking": receiveBlocking, "epoll": receiveEpoll, "twisted": receiveTwisted}


def measure(loop: str, size: int) -> str:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        ours.close()
        send(theirs, size)
        os._exit(0)
    theirs.close()
    buf = memoryview(mmap.mmap(-1, 4 * MiB, flags=mmap.MAP_PRIVATE))
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    got, reads = LOOPS[loop](ours, buf)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.waitpid(pid, 0)
    ours.close()
    if got != size:
        raise SystemExit(f"{loop}: received {got} of {size} bytes")
    user = after.ru_utime - before.ru_utime
    system = after.ru_stime - before.ru_stime
    return (
        f"{loop:9s} {size / MiB / elapsed:6.0f} MiB/s  user {user * GiB / size:.3f}  "
        f"sys {system * GiB / size:.3f} CPU s/GiB  {reads * GiB // size} reads/GiB  "
        f"{user / reads * 1e6:5.1f} us user/read  {got // reads // KiB} KiB/read"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--loops", default="blocking,epoll,twisted")
    opts = parser.parse_args()
    # Import Twisted before measuring.
    from twisted.internet import abstract, epollreactor  # noqa: F401

    for _ in range(opts.runs):
        for loop in opts.loops.split(","):
            print(measure(loop, opts.size_mib * MiB), flush=True)


if __name__ == "__main__":
    main()
