#!/usr/bin/env python3
"""
Proxy-mode benchmark: our daemon and upstream ovirt-imageio 2.5.1, each
relaying to one backend daemon (ours) over verified TLS.

One backend daemon holds a file ticket on a random image on C{/dev/shm};
each proxy holds a ticket whose C{url} is the backend's
C{https://127.0.0.1:<port>/images/<id>}.  curl downloads and uploads the
whole image through each proxy in turn (A B, B A, ...), and the table shows
the proxy's throughput, CPU per GiB and peak RSS, with the backend's CPU for
information.

Standard library only; reuses C{bench.py}'s helpers.  See
C{bench/README.rst}, "Proxy mode: proxy.py".
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench  # bench/ is sys.path[0]
from bench import (
    CPU_PER_GIB,
    MIBPS,
    PEAK_RSS,
    BenchError,
    GiB,
    Images,
    Metric,
    MiB,
    RssSampler,
    Server,
    Workspace,
    checkCurl,
    cpuTimes,
    curlBase,
    humanSize,
    makeCertificates,
    makeImages,
    parseSize,
    prepareTarget,
    say,
    verifySame,
)

BACKEND_CPU = Metric("backendCpuPerGiB", "backend CPU s/GiB", False, "{:.2f}", compared=False)
METRICS = (MIBPS, CPU_PER_GIB, PEAK_RSS, BACKEND_CPU)
#: (key, label, method, parallel connections)
MEASUREMENTS = [
    ("get", "GET x1", "GET", 1),
    ("get4", "GET x4", "GET", 4),
    ("put", "PUT x1", "PUT", 1),
    ("put4", "PUT x4", "PUT", 4),
]


class Backend(Server):
    """
    The daemon serving the image: ours, HTTPS only.  Its local socket is
    disabled so that OPTIONS advertises no C{unix_socket}: upstream's http
    backend would otherwise switch to it (the backend is on loopback) and
    relay over UNIX instead of TLS, which a real proxy on another host
    cannot do.
    """

    localListener = False

    def writeConfig(self) -> None:
        super().writeConfig()
        (self.configDir / "conf.d" / "zz-bench-backend.conf").write_text(
            "[local]\nenable = false\n"
        )


class Proxy(Server):
    """
    A daemon under test in proxy mode: verifies the backend's certificate
    with the bench CA (C{[backend_http] ca_file}, read by both).
    """

    def writeConfig(self) -> None:
        super().writeConfig()
        (self.configDir / "conf.d" / "zz-bench-proxy.conf").write_text(
            f"[backend_http]\nca_file = {self.certs['ca']}\n"
        )

    def addProxyTicket(self, backend: Server, size: int) -> str:
        ticketId = str(uuid.uuid4())
        ticket = {
            "uuid": ticketId,
            "size": size,
            "url": f"https://127.0.0.1:{backend.port}/images/{backend.tickets['image']}",
            "timeout": 3000,
            "inactivity_timeout": 600,
            "ops": ["read", "write"],
            "transfer_id": f"bench-proxy-{self.name}",
        }
        status, data = self.control("PUT", f"/tickets/{ticketId}", json.dumps(ticket).encode())
        if status != 200:
            raise self.failure(f"PUT /tickets/{ticketId} -> {status}: {data[:500]!r}")
        self.tickets["image"] = ticketId
        return ticketId


# ---------------------------------------------------------------------------
# Measurements


def measureProxy(proxy: Server, backend: Server, body: Callable[[], Any]) -> dict[str, float]:
    """
    Run C{body}, accounting the proxy's and the backend's CPU and sampling
    the proxy's RSS.
    """
    pids = proxy.refreshPids()
    backendPids = backend.refreshPids()
    with RssSampler(pids) as sampler:
        busy0 = bench.systemBusySeconds()
        children0 = bench._rusageSeconds(resource.RUSAGE_CHILDREN)
        self0 = bench._rusageSeconds(resource.RUSAGE_SELF)
        user0, system0 = cpuTimes(pids)
        buser0, bsystem0 = cpuTimes(backendPids)
        t0 = time.monotonic()
        body()
        elapsed = time.monotonic() - t0
        user1, system1 = cpuTimes(pids)
        buser1, bsystem1 = cpuTimes(backendPids)
        busy = bench.systemBusySeconds() - busy0
        clients = bench._rusageSeconds(resource.RUSAGE_CHILDREN) - children0
        harness = bench._rusageSeconds(resource.RUSAGE_SELF) - self0
    proxy.checkAlive()
    backend.checkAlive()
    cpu = user1 - user0 + system1 - system0
    backendCpu = buser1 - buser0 + bsystem1 - bsystem0
    foreign = max(0.0, busy - cpu - backendCpu - clients - harness)
    cpus = os.cpu_count() or 1
    return {
        "seconds": elapsed,
        "userSeconds": user1 - user0,
        "systemSeconds": system1 - system0,
        "cpuSeconds": cpu,
        "backendCpuSeconds": backendCpu,
        "clientCpuSeconds": clients,
        "peakRss": sampler.peak,
        "busiestThreadFraction": sampler.busiestThread() / elapsed,
        "machineBusyFraction": busy / (elapsed * cpus),
        "foreignCpuFraction": foreign / (elapsed * cpus),
    }


def runVerifiedGets(
    commands: list[list[str]], references: list[Path], fifos: list[Path]
) -> list[str]:
    """
    Start every curl writing into a FIFO read by C{cmp} against its
    reference file; wait for all; fail on any difference.
    """
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for cmd, ref, fifo in zip(commands, references, fifos, strict=True):
            cmp = subprocess.Popen(
                ["cmp", str(fifo), str(ref)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            bench._clients.add(cmp)
            procs.append(("cmp", cmp))
            curl = subprocess.Popen(
                cmd + ["-o", str(fifo)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            bench._clients.add(curl)
            procs.append(("curl", curl))
        outputs = []
        for kind, proc in procs:
            out, err = proc.communicate()
            bench._clients.discard(proc)
            if proc.returncode != 0:
                text = (out + (err or b"")).decode(errors="replace").strip()
                raise BenchError(f"{kind} failed ({proc.returncode}): {text}")
            if kind == "curl":
                outputs.append(out.decode())
        return outputs
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            bench._clients.discard(proc)


def measure(
    method: str,
    parallel: int,
    proxy: Server,
    backend: Server,
    images: Images,
    target: Path,
    fifos: list[Path],
) -> dict[str, Any]:
    base, url = curlBase(proxy, "https", proxy.tickets["image"])
    base = [a for a in base if a not in ("-o", "/dev/null")]
    what = f"{proxy.name} {method} x{parallel}"
    if method == "GET":
        commands, expected = bench.getCommands(base, url, images, parallel)
        refs = [images.image] if parallel == 1 else list(images.pieces)
        outputs: list[str] = []

        def body() -> None:
            outputs.extend(runVerifiedGets(commands, refs, fifos[: len(commands)]))

        stats = measureProxy(proxy, backend, body)
        for out, (n, status) in zip(outputs, expected, strict=True):
            checkCurl(out, status, n, 0, what)
    else:
        prepareTarget(target, images.size, images.targetMode)
        commands, sizes = bench.putCommands(base + ["-o", "/dev/null"], url, images, parallel)
        outputs = []

        def body() -> None:
            outputs.extend(bench.runClients(commands))

        stats = measureProxy(proxy, backend, body)
        for out, n in zip(outputs, sizes, strict=True):
            checkCurl(out, {200}, 0, n, what)
        verifySame(images.image, target, what)
    gib = images.size / GiB
    return {
        "bytes": images.size,
        "seconds": stats["seconds"],
        "mibps": images.size / MiB / stats["seconds"],
        "cpuPerGiB": stats["cpuSeconds"] / gib,
        "userSeconds": stats["userSeconds"],
        "systemSeconds": stats["systemSeconds"],
        "peakRssMiB": stats["peakRss"] / MiB,
        "backendCpuPerGiB": stats["backendCpuSeconds"] / gib,
        "busiestThreadPct": stats["busiestThreadFraction"] * 100,
        "clientCpuPerGiB": stats["clientCpuSeconds"] / gib,
        "machineBusyPct": stats["machineBusyFraction"] * 100,
        "foreignPct": stats["foreignCpuFraction"] * 100,
    }


def brief(sample: dict[str, Any]) -> str:
    return (
        f"{sample['mibps']:.0f} MiB/s  {sample['cpuPerGiB']:.2f} CPU s/GiB"
        f" ({sample['userSeconds']:.2f} user + {sample['systemSeconds']:.2f} sys s)"
        f"  {sample['peakRssMiB']:.0f} MiB RSS  busiest thread {sample['busiestThreadPct']:.0f}%"
        f"  [backend {sample['backendCpuPerGiB']:.2f} CPU s/GiB,"
        f" clients {sample['clientCpuPerGiB']:.2f} CPU s/GiB,"
        f" machine {sample['machineBusyPct']:.0f}% busy, {sample['foreignPct']:.0f}% foreign]"
    )


# ---------------------------------------------------------------------------
# Report


def formatTable(samples: dict[str, dict[str, list[dict[str, Any]]]], names: list[str]) -> str:
    def cell(values: list[float], fmt: str) -> str:
        if not values:
            return "-"
        med = statistics.median(values)
        return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"

    header = ["measurement", "metric"] + names
    if names == ["ours", "upstream"]:
        header.append("paired ours/upstream")
    lines = [header]
    for key, label, _, _ in MEASUREMENTS:
        for metric in METRICS:
            line = [label, metric.unit]
            for name in names:
                values = [s[metric.key] for s in samples[name].get(key, [])]
                line.append(cell(values, metric.fmt))
            if len(header) > len(line):
                ratio = bench.pairedRatio(samples, key, metric) if metric.compared else None
                if ratio is None:
                    line.append("-")
                else:
                    line.append(f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})")
            lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def foreignLoad(samples: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """
    How busy the machine was with work other than the run's own (proxies,
    backend, curl, cmp, harness) during the samples.
    """
    values = [s["foreignPct"] for per in samples.values() for ss in per.values() for s in ss]
    if not values:
        return "-"
    return f"median {statistics.median(values):.0f}%, max {max(values):.0f}% of all CPUs"


def parseArgs(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark proxy mode: our daemon and upstream ovirt-imageio 2.5.1 "
        "relaying to one backend daemon over verified TLS.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--only", choices=["both", "ours", "upstream"], default="both")
    p.add_argument("--runs", type=int, default=3, help="recorded rounds")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first")
    p.add_argument("--size", type=parseSize, default=GiB, help="image size")
    p.add_argument("--dir", type=Path, default=Path("/dev/shm"), help="where images go")
    p.add_argument("--quick", action="store_true", help="smoke check: 256 MiB, 1 run")
    p.add_argument("--ours-cmd", default=bench.DEFAULT_OURS_CMD)
    p.add_argument("--upstream-cmd", default=bench.DEFAULT_UPSTREAM_CMD)
    p.add_argument("--upstream-venv", type=Path, default=bench.DEFAULT_UPSTREAM_VENV)
    p.add_argument("--results", type=Path, default=bench.RESULTS_DIR, help="where results go")
    opts = p.parse_args(argv)
    if opts.quick:
        if opts.size == GiB:
            opts.size = 256 * MiB
        if opts.runs == 3:
            opts.runs = 1
    if opts.size < 16 * 1024 or opts.size % 4096:
        p.error("--size must be a multiple of 4 KiB and at least 16 KiB")
    if opts.runs < 1 or opts.warmup < 0:
        p.error("--runs must be at least 1 and --warmup at least 0")
    return opts


def benchmark(opts: argparse.Namespace, workspace: Workspace, servers: list[Server]) -> int:
    runId = time.strftime("%Y%m%d-%H%M%S") + "-proxy"
    resultDir = opts.results / runId
    logDir = resultDir / "logs"
    logDir.mkdir(parents=True, exist_ok=True)
    for tool in ("curl", "openssl", "cmp"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} not found in PATH")
    names = ["ours", "upstream"] if opts.only == "both" else [opts.only]
    upstreamVersion = None
    if "upstream" in names:
        upstreamVersion = bench.ensureUpstreamVenv(opts.upstream_venv)
    bench.checkSpace(opts.dir, opts.size * 3 + 64 * MiB, "--dir")
    loadAtStart = open("/proc/loadavg").read().split()[:3]
    for directory in {opts.dir, Path(tempfile.gettempdir())}:
        bench.removeStale(directory)

    work = workspace.add(Path(tempfile.mkdtemp(prefix=f"imageio-bench-{os.getpid()}-")))
    certs = makeCertificates(work / "pki")
    images = makeImages(workspace.add(opts.dir / f"imageio-bench-{os.getpid()}"), opts.size)
    target = images.target("backend")
    fifos = []
    for i in range(len(images.pieces)):
        fifo = work / f"get-{i}.fifo"
        os.mkfifo(fifo)
        fifos.append(fifo)

    backend = Backend("backend", opts.ours_cmd, work / "backend", logDir, certs)
    servers.append(backend)
    backend.version = bench.oursVersion()
    backend.writeConfig()
    backend.start(opts.upstream_venv)
    proxies: list[Proxy] = []
    for name in names:
        template = opts.ours_cmd if name == "ours" else opts.upstream_cmd
        proxy = Proxy(name, template, work / name, logDir, certs)
        proxy.version = bench.oursVersion() if name == "ours" else str(upstreamVersion)
        servers.append(proxy)
        proxies.append(proxy)
        proxy.writeConfig()
        proxy.start(opts.upstream_venv)

    backend.waitReady()
    shutil.copyfile(images.image, target)
    backend.addTicket("image", target, images.size, ["read", "write"])
    for proxy in proxies:
        proxy.waitReady()
        proxy.addProxyTicket(backend, images.size)
        say(f"{proxy.name}: proxy ticket -> https://127.0.0.1:{backend.port}/images/...")

    samples: dict[str, dict[str, list[dict[str, Any]]]] = {p.name: {} for p in proxies}
    idle = {p.name: bench.rssBytes(p.refreshPids()) / MiB for p in proxies}
    for i in range(-opts.warmup, opts.runs):
        roundName = "warm-up" if i < 0 else f"run {i + 1}/{opts.runs}"
        order = proxies if i % 2 == 0 else proxies[::-1]
        for key, label, method, parallel in MEASUREMENTS:
            for proxy in order:
                try:
                    sample = measure(method, parallel, proxy, backend, images, target, fifos)
                except BenchError as e:
                    raise proxy.failure(f"{roundName} {label}: {e}") from None
                say(f"{roundName} {label} {proxy.name:<8} {brief(sample)}")
                if i >= 0:
                    samples[proxy.name].setdefault(key, []).append(sample)

    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "loadavgAtStart": loadAtStart,
        "loadavgAtEnd": open("/proc/loadavg").read().split()[:3],
        "imageSize": humanSize(opts.size),
        "imageDir": bench.fsType(opts.dir),
        "runs": opts.runs,
        "warmup": opts.warmup,
        "backend": f"{backend.version}: {shlex.join(backend.command(opts.upstream_venv))}",
        "proxies": {
            p.name: f"{p.version}: {shlex.join(p.command(opts.upstream_venv))}" for p in proxies
        },
        "idleRssMiB": idle,
        "foreignLoad": foreignLoad(samples),
    }
    table = formatTable(samples, [p.name for p in proxies])
    lines = [f"{k}: {v}" for k, v in env.items()]
    report = "\n".join(lines) + "\n\n" + table + "\n"
    print(report)
    for server in servers:
        server.stop()
    result = {
        "environment": env,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(opts).items()},
        "samples": samples,
    }
    (resultDir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (resultDir / "table.txt").write_text(report)
    say(f"results in {resultDir}/ (result.json, table.txt, logs/)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return bench.runCleanly(parseArgs(argv), benchmark)


if __name__ == "__main__":
    sys.exit(main())
