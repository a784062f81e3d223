#!/usr/bin/env python3
"""
What one small request costs the daemon, in parts.

C{bench/run} measures 4 KiB random reads end to end: ours cost about twice
upstream's CPU per request. Upstream reads in place on the connection's own
thread; our reactor must hand every storage call to the disk-io pool and
take the result back (never block the reactor). This script measures the
two parts of our cost that upstream does not have, each in isolation:

    - C{http stack}: one keep-alive 4 KiB C{GET /images/<ticket>} with a
      C{Range}, parsed, routed, authorized and answered by the real images
      site (twisted.web, tickets, the download producer) over the
      C{memory:} backend, with storage calls run inline and no sockets:
      the Python cost per request;
    - C{pool round trip}: one 4 KiB C{preadv} through L{DiskIO.run} on the
      real reactor and disk-io pool, started when the last one's result
      came back: the cost of the hand-off alone, with the reactor and pool
      threads free to run on any CPU, then all pinned to one CPU;
    - C{inline}: the same C{preadv} called on the reactor thread (what the
      daemon must not do), for reference.

CPU is the process's user + system time per request or round trip
(C{getrusage}), so it includes the kernel's wake-ups and the threads'
waiting for the GIL.

Usage::

    .venv/bin/python bench/request_cost.py [--requests N] [--round-trips N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any

KiB = 1024
MiB = 1024 * KiB


def cpuSeconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def httpStack(requests: int, profile: bool = False) -> dict[str, float]:
    """
    CPU per 4 KiB range GET through the images site, in process.

    @param profile: Run the measured requests under C{cProfile} and add
        each part's share (L{PARTS}) to the result, as C{share:<part>}.
    """
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from imageio._diskio import SynchronousDiskIO
    from imageio.backends import BackendContext, BackendOpener, memory
    from imageio.control._metrics import Metrics
    from imageio.daemon.images import ImagesService, imagesResource
    from imageio.tickets import TicketRegistry
    from imageio.web import ImageioSite

    size = 64 * MiB
    clock = MemoryReactorClock()
    diskio = SynchronousDiskIO()
    registry = TicketRegistry(now=clock.seconds, scheduler=clock)
    service = ImagesService(
        registry=registry,
        opener=BackendOpener(BackendContext(reactor=clock, diskio=diskio)),
        clock=clock,
        runInPool=diskio.run,
        unixSocket=None,
    )
    # As the daemon's: with metrics.
    site = ImageioSite(imagesResource(service), "remote", reactor=clock, metrics=Metrics())
    memory.createImage("request-cost", bytes(size))
    ticket = registry.add(
        {
            "uuid": "t1",
            "size": size,
            "ops": ["read"],
            "timeout": 300,
            "url": "file:///var/tmp/request-cost.raw",
        }
    )
    # The control API accepts only production schemes.
    ticket.url = "memory:request-cost"

    channel: Any = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    rnd = random.Random(1)
    raw = []
    for _ in range(requests):
        offset = rnd.randrange(size // (4 * KiB)) * 4 * KiB
        raw.append(
            b"GET /images/t1 HTTP/1.1\r\nHost: localhost\r\nRange: bytes=%d-%d\r\n\r\n"
            % (offset, offset + 4 * KiB - 1)
        )

    def send(batch: list[bytes]) -> None:
        for data in batch:
            channel.dataReceived(data)
            if not transport.value().startswith(b"HTTP/1.1 206 "):
                raise SystemExit(f"unexpected response: {transport.value()[:200]!r}")
            transport.clear()

    send(raw[: requests // 10])  # warm up
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
        send(raw)
        profiler.disable()
        memory.removeImage("request-cost")
        result = shares(profiler)
        calls = sum(row[1] for row in profiler.getstats())  # type: ignore[attr-defined]
        result["callsPerRequest"] = calls / requests
        return result
    t0, c0 = time.perf_counter(), cpuSeconds()
    send(raw)
    elapsed, cpu = time.perf_counter() - t0, cpuSeconds() - c0
    memory.removeImage("request-cost")
    return {"cpuMicroseconds": cpu / requests * 1e6, "wallMicroseconds": elapsed / requests * 1e6}


#: The parts of one request, each named by the functions whose time
#: (inclusive, as C{cProfile} measures it) it is, less the time of the
#: parts listed after it that run inside them. Function names are
#: C{file-suffix:function}.
PARTS: list[tuple[str, list[str]]] = [
    ("request line and header parsing", ["_channel.py:dataReceived"]),
    ("Request construction (twisted)", ["web/server.py:__init__"]),
    ("early resource lookup, body sink (ours)", ["_request.py:gotLength"]),
    ("head deadline, body watch (ours)", ["_channel.py:allHeadersReceived"]),
    ("process(): Server/Date headers, resource lookup", ["_request.py:process"]),
    ("Router: match, method", ["_router.py:render"]),
    ("handler: CORS, Range, query args", ["images.py:handleGET"]),
    ("ticket authorization", ["tickets.py:authorize"]),
    (
        "backend lookup (per connection)",
        ["images.py:backendFor", "images.py:openedBackend", "images.py:openedContext"],
    ),
    (
        "small read: response headers, Deferreds",
        ["images.py:_readSmall", "images.py:_startRead"],
    ),
    (
        "ticket operations (start, finish)",
        ["images.py:startOperation", "images.py:finishOperation"],
    ),
    ("download producer (not used by small reads)", ["_download.py:start"]),
    # A small read's readIntoThen calls back inline, so the answer is
    # inside it: it is counted with the small read.
    ("backend read (memory, inline)", ["memory.py:readInto"]),
    ("response head formatting", ["_channel.py:writeHeaders"]),
    ("finish, request done, clean-up (twisted)", ["web/http.py:finish"]),
    ("access log and metrics (ours)", ["_site.py:log"]),
]


def shares(profiler: Any) -> dict[str, float]:
    """
    @return: Each of L{PARTS}' share of the profiled time.
    """
    import pstats

    stats: Any = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    inclusive: dict[str, float] = {}
    total = 0.0
    for (filename, _, name), (_, _, tottime, cumtime, _) in stats.items():
        total += tottime
        for _, names in PARTS:
            for key in names:
                suffix, function = key.split(":")
                if filename.endswith(suffix) and name == function:
                    inclusive[key] = inclusive.get(key, 0.0) + cumtime
    result: dict[str, float] = {}
    # Nested parts: each part's time less the later parts' (which all run
    # inside the earlier ones in this order for a ranged GET).
    times = [sum(inclusive.get(k, 0.0) for k in names) for _, names in PARTS]
    exclusive = list(times)
    nesting = {
        0: [1, 2, 3, 4],
        4: [5],
        5: [6],
        6: [7, 8, 9],
        # A 4 KiB read is one backend read, then headers and body in one
        # write (no download producer).
        9: [10, 11, 12, 13, 14],
        14: [15],
    }
    for parent, children in nesting.items():
        exclusive[parent] -= sum(times[c] for c in children)
    for (label, _), value in zip(PARTS, exclusive, strict=True):
        result["share:" + label] = value / total
    result["share:rest (send loop, StringTransport)"] = (total - times[0]) / total
    return result


def roundTrips(count: int, inline: bool) -> dict[str, float]:
    """
    CPU and wall time per 4 KiB preadv handed to the disk-io pool (or, with
    C{inline}, called on the reactor thread).
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred, fail, succeed
    from twisted.python.failure import Failure

    from imageio._diskio import DiskIO, createPool

    with tempfile.NamedTemporaryFile(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as f:
        f.write(os.urandom(4 * MiB))
        f.flush()
        fd = f.fileno()
        buf = bytearray(4 * KiB)

        def read(offset: int) -> int:
            return os.preadv(fd, [buf], offset)

        pool = createPool(reactor)
        diskio = DiskIO(pool)

        def call(offset: int) -> Deferred[int]:
            if not inline:
                return diskio.run(read, offset)
            try:
                return succeed(read(offset))
            except Exception:
                return fail(Failure())

        result: dict[str, float] = {}
        state = {"n": 0}

        def step(_: object = None) -> None:
            state["n"] += 1
            if state["n"] == count:
                result["wall"] = time.perf_counter() - t0
                result["cpu"] = cpuSeconds() - c0
                reactor.stop()
                return
            # From the reactor's next pass, so inline calls do not recurse.
            d = call((state["n"] % 1024) * 4 * KiB)
            d.addCallback(lambda _: reactor.callLater(0, step))  # type: ignore[attr-defined]

        pool.start()
        t0, c0 = time.perf_counter(), cpuSeconds()
        reactor.callWhenRunning(step)  # type: ignore[attr-defined]
        reactor.run()  # type: ignore[attr-defined]
        pool.stop()
    return {
        "cpuMicroseconds": result["cpu"] / count * 1e6,
        "wallMicroseconds": result["wall"] / count * 1e6,
    }


def child(args: list[str]) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--round-trips", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--part", choices=["http", "pool", "pinned", "inline"], help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="show where the http stack's time goes (cProfile, shares of the time)",
    )
    opts = parser.parse_args()

    if opts.part is not None:
        # One measurement in a fresh process (one reactor each).
        if opts.part == "http":
            result = httpStack(opts.requests, profile=opts.profile)
        else:
            if opts.part == "pinned":
                # Threads started from now on inherit the mask.
                os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
            result = roundTrips(opts.round_trips, inline=opts.part == "inline")
        print(json.dumps(result))
        return

    cpus = len(os.sched_getaffinity(0))
    if opts.profile:
        cpu = child(["--part", "http", "--requests", str(opts.requests)])["cpuMicroseconds"]
        parts = child(["--part", "http", "--requests", str(opts.requests), "--profile"])
        print(f"http stack: {cpu:.1f} us CPU per 4 KiB GET, by part (cProfile shares)\n")
        print(f"{'part':52}  {'share':>6}  {'us':>6}")
        calls = parts.pop("callsPerRequest")
        for key, share in parts.items():
            print(f"{key.split(':', 1)[1]:52}  {share * 100:5.1f}%  {share * cpu:6.1f}")
        print(f"\nPython function calls per request: {calls:.0f}")
        return
    print(f"{cpus} CPUs; medians of {opts.runs} runs (min-max)\n")
    rows = [
        ("http", "http stack, per 4 KiB GET", ["--requests", str(opts.requests)]),
        ("pool", "pool round trip, any CPU", ["--round-trips", str(opts.round_trips)]),
        ("pinned", "pool round trip, one CPU", ["--round-trips", str(opts.round_trips)]),
        ("inline", "inline preadv (reference)", ["--round-trips", str(opts.round_trips)]),
    ]
    print(f"{'part':28}  {'CPU us':>18}  {'wall us':>18}")
    for part, label, extra in rows:
        results = [child(["--part", part, *extra]) for _ in range(opts.runs)]
        cells = []
        for key in ("cpuMicroseconds", "wallMicroseconds"):
            values = sorted(r[key] for r in results)
            cells.append(f"{values[len(values) // 2]:.1f} ({values[0]:.1f}-{values[-1]:.1f})")
        print(f"{label:28}  {cells[0]:>18}  {cells[1]:>18}")


if __name__ == "__main__":
    main()
