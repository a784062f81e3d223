#!/usr/bin/env python3
"""
The client row: our C{imageio-client} against upstream's
C{ovirt_imageio.client} (2.5.1, a test dependency), uploading and
downloading the same random raw image to and from the same daemon (ours),
alternating sample by sample.

Two daemon set-ups are measured: with the local UNIX socket advertised
(both clients switch to it on this host, as users get them) and without it
(both stay on HTTPS). For each transfer it prints the median wall time,
throughput and client CPU seconds per GiB (user + system of the client
process and its children: qemu-nbd, qemu-img), the peak RSS in MiB of the
largest of them over the runs, and ours/upstream ratios (throughput higher
is better, CPU and RSS lower is better).

Run from the repository root with the project's virtualenv::

    .venv/bin/python bench/client.py                  # 1 GiB, 3 runs each
    .venv/bin/python bench/client.py --size-mib 64 --runs 1   # smoke check

Images go under C{--dir} (default /dev/shm) so the disk is not measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests._daemon import SubprocessDaemon, control, ticketBody  # noqa: E402

MiB = 1024**2
GiB = 1024**3
PYTHON = str(ROOT / ".venv" / "bin" / "python")


def ours(op: str, source: str, target: str, ca: str) -> list[str]:
    if op == "upload":
        return [PYTHON, "-m", "imageio.client._cli", "-c", ca, "upload", source, target]
    return [PYTHON, "-m", "imageio.client._cli", "-c", ca, "download", "-f", "raw", source, target]


def upstream(op: str, source: str, target: str, ca: str) -> list[str]:
    if op == "upload":
        code = f"from ovirt_imageio import client; client.upload({source!r}, {target!r}, {ca!r})"
    else:
        code = (
            "from ovirt_imageio import client; "
            f"client.download({source!r}, {target!r}, {ca!r}, fmt='raw')"
        )
    return [PYTHON, "-c", code]


def measure(cmd: list[str]) -> tuple[float, float, float]:
    """
    @return: Wall seconds, CPU seconds (the command and its children) and
        peak RSS in MiB (the largest of the command and its children, from
        C{wait4}).
    """
    with tempfile.TemporaryFile() as err:
        start = time.monotonic()
        process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.monotonic() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            err.seek(0)
            text = err.read().decode(errors="replace")
            raise SystemExit(f"{cmd[:4]} failed: {text.strip()[-500:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return wall, cpu, usage.ru_maxrss / 1024


def same(a: Path, b: Path) -> None:
    if subprocess.run(["cmp", "-s", str(a), str(b)], check=False).returncode != 0:
        raise SystemExit(f"{b} differs from {a}")


def addTicket(daemon: SubprocessDaemon, path: Path, size: int) -> str:
    ticketID = str(uuid.uuid4())
    body = ticketBody(ticketID, f"file://{path}", size, ("read", "write"), timeout=3600)
    response = control(daemon.addresses, "PUT", f"/tickets/{ticketID}", body)
    if response.status != 200:
        raise SystemExit(f"Cannot add ticket: {response.status} {response.text}")
    return ticketID


def bench(setup: str, local: bool, size: int, runs: int, work: Path) -> list[dict[str, object]]:
    overrides = {"local": {"enable": local}, "daemon": {"inactivity_timeout": 60}}
    daemon = SubprocessDaemon.start(overrides=overrides)
    rows = []
    try:
        host, port = daemon.addresses.remote
        ca = daemon.addresses.caFile
        source = work / "source.raw"
        served = work / "served.raw"
        target = work / "target.raw"
        downloaded = work / "downloaded.raw"
        shutil.copyfile(source, served)
        readID = addTicket(daemon, served, size)
        for op in ("upload", "download"):
            samples: dict[str, list[tuple[float, float, float]]] = {"ours": [], "upstream": []}
            for _ in range(runs):
                for name, make in (("ours", ours), ("upstream", upstream)):
                    if op == "upload":
                        with open(target, "wb") as f:
                            f.truncate(size)
                        ticketID = addTicket(daemon, target, size)
                        url = f"https://{host}:{port}/images/{ticketID}"
                        samples[name].append(measure(make(op, str(source), url, ca)))
                        same(source, target)
                    else:
                        downloaded.unlink(missing_ok=True)
                        url = f"https://{host}:{port}/images/{readID}"
                        samples[name].append(measure(make(op, url, str(downloaded), ca)))
                        same(source, downloaded)
            row: dict[str, object] = {"setup": setup, "op": op}
            for name, values in samples.items():
                wall = statistics.median(v[0] for v in values)
                cpu = statistics.median(v[1] for v in values)
                row[name] = {
                    "seconds": round(wall, 3),
                    "MiB/s": round(size / MiB / wall, 1),
                    "cpu_s_per_GiB": round(cpu / (size / GiB), 3),
                    "peak_rss_MiB": round(max(v[2] for v in values), 1),
                    "samples": [(round(w, 3), round(c, 3), round(r, 1)) for w, c, r in values],
                }
            o, u = row["ours"], row["upstream"]
            assert isinstance(o, dict) and isinstance(u, dict)
            row["throughput_ratio"] = round(o["MiB/s"] / u["MiB/s"], 2)
            row["cpu_ratio"] = round(o["cpu_s_per_GiB"] / u["cpu_s_per_GiB"], 2)
            row["rss_ratio"] = round(o["peak_rss_MiB"] / u["peak_rss_MiB"], 2)
            rows.append(row)
    finally:
        daemon.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default="/dev/shm")
    parser.add_argument("--json", action="store_true", help="print JSON rows")
    args = parser.parse_args()
    size = args.size_mib * MiB
    work = Path(tempfile.mkdtemp(prefix="imageio-client-bench-", dir=args.dir))
    try:
        with open(work / "source.raw", "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MiB))
        rows = bench("UNIX socket", True, size, args.runs, work)
        rows += bench("HTTPS", False, size, args.runs, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.size_mib} MiB random raw image, {args.runs} runs, medians; ratio = ours/upstream")
    print(
        f"{'transfer':<22} {'ours MiB/s':>10} {'up MiB/s':>9} {'ratio':>6} "
        f"{'ours CPU/GiB':>12} {'up CPU/GiB':>11} {'ratio':>6} "
        f"{'ours RSS':>8} {'up RSS':>7}"
    )
    for row in rows:
        o, u = row["ours"], row["upstream"]
        assert isinstance(o, dict) and isinstance(u, dict)
        print(
            f"{row['op'] + ', ' + str(row['setup']):<22} {o['MiB/s']:>10} {u['MiB/s']:>9} "
            f"{row['throughput_ratio']:>6} {o['cpu_s_per_GiB']:>12} {u['cpu_s_per_GiB']:>11} "
            f"{row['cpu_ratio']:>6} {o['peak_rss_MiB']:>8} {u['peak_rss_MiB']:>7}"
        )


if __name__ == "__main__":
    main()
