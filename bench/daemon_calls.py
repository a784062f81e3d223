#!/usr/bin/env python3
"""
Python function calls per 4 KiB random read in the real daemon.

C{request_cost.py --profile} counts the calls of the twisted.web path in
process; the daemon also runs the reactor's dispatch, the socket
transports, TLS and the storage engine. This script runs C{twistd -n
imageio} under C{twistd}'s own profiler (C{--profile --profiler=cprofile
--savestats}) with C{bench/run}'s configuration (HTTPS on loopback and the
local UNIX socket, a random image on C{/dev/shm}), reads
C{--base} and then C{--base + --requests} 4 KiB blocks with
C{randread.py} in two daemon runs per transport, and divides the
difference of the calls by C{--requests}: start-up, the first request
(opening the backend) and shut-down cancel out. Call counts, unlike CPU
time, do not move with the machine's load.

It also prints the calls per request by source file (a built-in function's
calls counted in the files of its callers) and the functions with the most
calls per request (the difference of each function's count between the two
runs).

Usage::

    .venv/bin/python bench/daemon_calls.py [--transports unix,https]
        [--requests 4000] [--top 30] [--callers NAME] [--ours-cmd CMD]
        [--save DIR]

C{--ours-cmd} is C{bench/run}'s (C{{config_dir}} is replaced); the profiler
options are put after its C{twistd}.
"""

from __future__ import annotations

import argparse
import json
import pstats
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import bench  # bench/ is sys.path[0]

KiB = 1024
MiB = 1024 * KiB


def profiledCommand(template: str, profile: Path) -> str:
    """
    C{template} with C{twistd}'s profiler options after its C{twistd}.
    """
    words = shlex.split(template)
    for i, word in enumerate(words):
        if Path(word).name == "twistd":
            extra = [f"--profile={profile}", "--profiler=cprofile", "--savestats"]
            return shlex.join(words[: i + 1] + extra + words[i + 1 :])
    raise SystemExit(f"no twistd in the command: {template}")


def profiledRun(
    opts: argparse.Namespace,
    work: Path,
    certs: dict[str, Path],
    image: Path,
    size: int,
    transport: str,
    requests: int,
    tag: str,
) -> tuple[dict[tuple[str, int, str], int], dict[str, int], dict[tuple[str, str], int]]:
    """
    Start a profiled daemon, read C{requests} blocks over C{transport} on one
    connection, stop it.

    @return: Calls by function, by file (built-ins by their callers'), and
        by (function, caller) for the functions C{--callers} names.
    """
    profile = work / f"profile-{tag}.pstats"
    server = bench.Server(
        name="ours",
        commandTemplate=profiledCommand(opts.ours_cmd, profile),
        baseDir=work / f"server-{tag}",
        logDir=work / "logs",
        certs=certs,
    )
    server.writeConfig()
    server.start(bench.DEFAULT_UPSTREAM_VENV)
    try:
        server.waitReady()
        ticket = server.addTicket("read", image, size, ["read"])
        cmd = [sys.executable, str(bench.BENCH_DIR / "randread.py")]
        if transport == "https":
            cmd += ["--https-port", str(server.port), "--cacert", str(certs["ca"])]
        else:
            cmd += ["--unix", str(server.localSocket)]
        cmd += ["--ticket", ticket, "--size", str(size), "--requests", str(requests)]
        cmd += ["--seed", "1", "--image", str(image)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        done = json.loads(out)["requests"]
        if done != requests:
            raise SystemExit(f"randread made {done} requests, not {requests}")
    finally:
        server.stop()
    if opts.save:
        Path(opts.save).mkdir(parents=True, exist_ok=True)
        shutil.copy(profile, Path(opts.save) / f"{transport}-{tag}.pstats")
    stats: Any = pstats.Stats(str(profile)).stats
    byFile: dict[str, int] = {}
    for key, (_, calls, _, _, callers) in stats.items():
        if key[0] == "~":
            for caller, (_, callerCalls, _, _) in callers.items():
                where = fileLabel(caller[0])
                byFile[where] = byFile.get(where, 0) + callerCalls
        else:
            where = fileLabel(key[0])
            byFile[where] = byFile.get(where, 0) + calls
    byCaller: dict[tuple[str, str], int] = {}
    if opts.callers:
        for key, (_, _, _, _, callers) in stats.items():
            if opts.callers in label(key):
                for caller, (_, callerCalls, _, _) in callers.items():
                    byCaller[(label(key), label(caller))] = callerCalls
    return {key: value[1] for key, value in stats.items()}, byFile, byCaller


def fileLabel(path: str) -> str:
    """
    C{path} from its package root (C{imageio/...}, C{twisted/...}).
    """
    parts = Path(path).parts
    for root in ("imageio", "twisted"):
        if root in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(root) - 1 :])
    return path


def label(key: tuple[str, int, str]) -> str:
    path, line, name = key
    if path == "~":
        return name
    return f"{fileLabel(path)}:{line}({name})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transports", default="unix,https")
    parser.add_argument("--base", type=int, default=200, help="requests of the first run")
    parser.add_argument("--requests", type=int, default=4000, help="more in the second run")
    parser.add_argument("--top", type=int, default=30, help="functions to list (0: none)")
    parser.add_argument("--size", type=int, default=256 * MiB, help="image size")
    parser.add_argument("--dir", default="/dev/shm", help="where the image goes")
    parser.add_argument("--ours-cmd", default=bench.DEFAULT_OURS_CMD)
    parser.add_argument(
        "--callers", help="also list who calls the functions whose name holds this text"
    )
    parser.add_argument(
        "--save", help="keep each run's profile here (<transport>-a.pstats, -b.pstats)"
    )
    opts = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="daemon-calls-", dir=opts.dir) as tmp:
        work = Path(tmp)
        certs = bench.makeCertificates(work / "certs")
        image = work / "image.raw"
        with open(image, "wb") as f:
            for _ in range(opts.size // (8 * MiB)):
                f.write(bench.os.urandom(8 * MiB))
        for transport in opts.transports.split(","):
            small, smallFiles, smallCallers = profiledRun(
                opts, work, certs, image, opts.size, transport, opts.base, "a"
            )
            big, bigFiles, bigCallers = profiledRun(
                opts, work, certs, image, opts.size, transport, opts.base + opts.requests, "b"
            )
            perFunction = {
                key: (count - small.get(key, 0)) / opts.requests for key, count in big.items()
            }
            total = sum(big.values()) - sum(small.values())
            print(f"\n{transport}: {total / opts.requests:.1f} Python calls per request")
            print(f"{'calls/req':>9}  file (built-ins counted in their callers' files)")
            files = {k: (n - smallFiles.get(k, 0)) / opts.requests for k, n in bigFiles.items()}
            for where, perRequest in sorted(files.items(), key=lambda kv: -kv[1]):
                if perRequest >= 0.5:
                    print(f"{perRequest:9.1f}  {where}")
            if opts.top:
                print(f"\n{'calls/req':>9}  function")
                ranked = sorted(perFunction.items(), key=lambda kv: -kv[1])
                for key, perRequest in ranked[: opts.top]:
                    print(f"{perRequest:9.2f}  {label(key)}")
            if opts.callers:
                print(f"\n{'calls/req':>9}  function <- caller")
                for (callee, caller), n in sorted(bigCallers.items()):
                    perRequest = (n - smallCallers.get((callee, caller), 0)) / opts.requests
                    if perRequest >= 0.01:
                        print(f"{perRequest:9.2f}  {callee} <- {caller}")


if __name__ == "__main__":
    main()
