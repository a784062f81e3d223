#!/usr/bin/env python3
"""
Random O_DIRECT reads (4 KiB unless told) through the file backend: the disk-io pool
against the AIO engine, A/B in one process.

Each round reads C{--reads} random 4 KiB blocks of a file through
L{FileBackend.readInto} on the real reactor, C{--depth} reads in flight at
once (each starts when one completes), once with the threads engine (every
read a reactor -> pool -> reactor round trip) and once with the AIO engine
(io_submit from the reactor, completion through the eventfd). Rounds
alternate (A B A B ...) so that noise from other work on the machine hits
both alike; the script prints medians and the aio/threads ratios.

CPU is the process's user + system time (C{getrusage}), threads included.
The file (C{--size}, default 256 MiB of random bytes) is made in C{--dir}
(default C{/var/tmp}: a disk, where O_DIRECT reads really go to the device;
C{/dev/shm} is tmpfs, where they are memory copies) and removed at exit.

Usage::

    .venv/bin/python bench/aio_engine.py [--dir D] [--reads N] [--depth N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from typing import Any

KiB = 1024
MiB = 1024 * KiB


def cpuSeconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--size", type=int, default=256 * MiB)
    parser.add_argument("--reads", type=int, default=20000)
    parser.add_argument("--depth", type=int, default=1)
    parser.add_argument("--block", type=int, default=4096, help="read size (default 4 KiB)")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, DeferredList

    from imageio._aio import AIOEngine
    from imageio._buffers import allocate
    from imageio._diskio import DiskIO, createPool
    from imageio.backends import BackendContext
    from imageio.backends.file import FileBackend, openBackend

    fd, path = tempfile.mkstemp(dir=args.dir, prefix="aio-engine-")
    with os.fdopen(fd, "wb") as f:
        for _ in range(args.size // MiB):
            f.write(os.urandom(MiB))
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    pool = createPool(reactor)
    pool.start()
    engine = AIOEngine(reactor)
    engine.start()
    diskio = DiskIO(pool)
    blocks = args.size // args.block
    results: dict[str, list[dict[str, float]]] = {"threads": [], "aio": []}

    async def open_(aio: AIOEngine | None) -> FileBackend:
        ctx = BackendContext(reactor=reactor, diskio=diskio, aio=aio)
        backend = await openBackend(ctx, "file://" + path, write=False, sparse=False, dirty=False)
        assert isinstance(backend, FileBackend)
        return backend

    async def round_(name: str, backend: FileBackend, seed: int) -> None:
        rng = random.Random(seed)
        remaining = [args.reads]

        async def worker() -> None:
            buf = memoryview(allocate(args.block))
            while remaining[0] > 0:
                remaining[0] -= 1
                n = await backend.readInto(rng.randrange(blocks) * args.block, buf)
                assert n == args.block

        cpu, wall = cpuSeconds(), time.perf_counter()
        await DeferredList([Deferred.fromCoroutine(worker()) for _ in range(args.depth)])
        cpu, wall = cpuSeconds() - cpu, time.perf_counter() - wall
        results[name].append(
            {"reads_per_s": args.reads / wall, "cpu_us_per_read": cpu / args.reads * 1e6}
        )

    async def run() -> None:
        try:
            threads = await open_(None)
            aio = await open_(engine)
            assert aio.engine == "aio", aio.engine
            # Warm-up, not recorded.
            await round_("threads", threads, 0)
            await round_("aio", aio, 0)
            results["threads"].clear()
            results["aio"].clear()
            for i in range(args.rounds):
                await round_("threads", threads, i + 1)
                await round_("aio", aio, i + 1)
            await threads.close()
            await aio.close()
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()))
    try:
        reactor.run()
    finally:
        engine.stop()
        pool.stop()
        os.unlink(path)

    summary: dict[str, Any] = {
        "dir": args.dir,
        "block": args.block,
        "depth": args.depth,
        "reads": args.reads,
    }
    for name, samples in results.items():
        summary[name] = {
            key: statistics.median(s[key] for s in samples)
            for key in ("reads_per_s", "cpu_us_per_read")
        }
    summary["aio/threads"] = {
        key: summary["aio"][key] / summary["threads"][key]
        for key in ("reads_per_s", "cpu_us_per_read")
    }
    json.dump(summary, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
