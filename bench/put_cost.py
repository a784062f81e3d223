"""
CPU cost of UNIX-socket uploads, A/B between two daemon commands.

Starts both daemons as bench/run does, then alternates ``curl -T`` uploads
(one, or four pieces at once) over the local socket into a pre-touched
tmpfs target, and per upload records the process CPU (``/proc/<pid>/stat``:
user, system), the CPU per thread name, context switches (voluntary and not,
from ``/proc/<pid>/task/*/status``) and, with ``--perf``, ``perf stat``
task-clock, context switches and CPU migrations of the server; with
``--strace``, the server's system call counts (``strace -c -f``; slow, so
its CPU figures are not comparable). Figures are per GiB.

    python3 bench/put_cost.py --a "CMD" --b "CMD" --pairs 3 [--x4] [--perf]

CMD as bench/run's ``--ours-cmd`` (``{config_dir}`` is replaced).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402

GiB = 1024**3


def threadStats(pids: list[int]) -> tuple[Counter[str], int, int]:
    """
    CPU seconds by thread name, and voluntary and involuntary context
    switches of the live threads of C{pids}.
    """
    cpu: Counter[str] = Counter()
    vol = invol = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        others = sorted(int(t) for t in tids if int(t) != pid)
        for tid in tids:
            base = f"/proc/{pid}/task/{tid}"
            try:
                with open(f"{base}/stat") as f:
                    data = f.read()
                with open(f"{base}/status") as f:
                    status = f.read()
            except OSError:
                continue
            # Python does not name its threads: the reactor, the first
            # other thread (our daemon's body pump: it starts with the
            # daemon, the disk-io threads on first use), and the rest.
            if int(tid) == pid:
                name = "reactor"
            elif others and int(tid) == others[0]:
                name = "first"
            else:
                name = "rest"
            fields = data[data.rindex(")") + 2 :].split()
            cpu[name + ":u"] += int(fields[11]) / bench.CLK_TCK
            cpu[name + ":s"] += int(fields[12]) / bench.CLK_TCK
            vol += int(re.search(r"voluntary_ctxt_switches:\s+(\d+)", status)[1])  # type: ignore[index]
            invol += int(re.search(r"nonvoluntary_ctxt_switches:\s+(\d+)", status)[1])  # type: ignore[index]
    return cpu, vol, invol


def perfStart(pid: int, out: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            "perf",
            "stat",
            "-x,",
            "-o",
            str(out),
            "-e",
            "task-clock,context-switches,cpu-migrations,"
            "syscalls:sys_enter_futex,raw_syscalls:sys_enter",
            "-p",
            str(pid),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def perfStop(proc: subprocess.Popen[bytes], out: Path) -> dict[str, float]:
    proc.send_signal(2)
    proc.wait()
    result = {}
    for line in out.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 3 and parts[0] and not line.startswith("#"):
            try:
                result[parts[2]] = float(parts[0])
            except ValueError:
                pass
    return result


def straceStart(pid: int, out: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    return proc


def straceStop(proc: subprocess.Popen[bytes], out: Path) -> dict[str, float]:
    proc.send_signal(2)
    proc.wait()
    counts = {}
    for line in out.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit():
            counts[parts[-1]] = float(parts[3])
    return counts


def upload(
    server: bench.Server, images: bench.Images, x4: bool, opts: argparse.Namespace
) -> dict[str, float]:
    target = images.target(server.name)
    bench.prepareTarget(target, images.size, images.targetMode)
    base, url = bench.curlBase(server, "unix", server.tickets["write"])
    base = base + ["-H", "Expect:"]
    if x4:
        commands = []
        for piece, (first, last) in zip(images.pieces, images.ranges, strict=True):
            header = f"Content-Range: bytes {first}-{last}/*"
            commands.append(base + ["-H", header, "-T", str(piece), url])
    else:
        commands = [base + ["-T", str(images.image), url]]
    pids = server.refreshPids()
    assert server.pid is not None
    tmp = Path(tempfile.mkdtemp())
    perf = perfStart(server.pid, tmp / "perf") if opts.perf else None
    tracer = straceStart(server.pid, tmp / "strace") if opts.strace else None
    recorder = None
    if opts.record:
        out = Path(opts.record) / f"{server.name}-{time.monotonic_ns()}.data"
        recorder = subprocess.Popen(
            ["perf", "record", "-q", "-g", "-o", str(out), "-p", str(server.pid)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
    t0, s0 = threadStats(pids), bench.cpuTimes(pids)
    start = time.monotonic()
    busy0 = bench.systemBusySeconds()
    bench.runClients(commands)
    elapsed = time.monotonic() - start
    busy = bench.systemBusySeconds() - busy0
    t1, s1 = threadStats(pids), bench.cpuTimes(pids)
    gib = images.size / GiB
    row: dict[str, float] = {
        "s": elapsed,
        "user": (s1[0] - s0[0]) / gib,
        "sys": (s1[1] - s0[1]) / gib,
        "vcs": (t1[1] - t0[1]) / gib,
        "ivcs": (t1[2] - t0[2]) / gib,
        "busy": busy / elapsed,
    }
    row["cpu"] = row["user"] + row["sys"]
    for key in set(t1[0]) | set(t0[0]):
        row["t." + key] = (t1[0][key] - t0[0][key]) / gib
    if perf is not None:
        for k, v in perfStop(perf, tmp / "perf").items():
            row["perf." + k] = v / gib
    if recorder is not None:
        recorder.send_signal(2)
        recorder.wait()
    if tracer is not None:
        for k, v in straceStop(tracer, tmp / "strace").items():
            row["sc." + k] = v / gib
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--a", required=True)
    parser.add_argument("--b", required=True)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--size", default="1G")
    parser.add_argument("--x4", action="store_true")
    parser.add_argument("--perf", action="store_true")
    parser.add_argument("--strace", action="store_true")
    parser.add_argument("--a-conf", help="a drop-in for A, lines separated by \\n")
    parser.add_argument("--b-conf", help="a drop-in for B, lines separated by \\n")
    parser.add_argument("--record", metavar="DIR", help="perf record -g each upload into DIR")
    parser.add_argument("--dir", default="/dev/shm")
    opts = parser.parse_args()
    opts.verify = False
    size = bench.parseSize(opts.size)
    # The image, its pieces and a target per server, with room to spare
    # (tmpfs is memory, shared with everything else on the machine).
    bench.checkSpace(Path(opts.dir), 6 * size, "put_cost")
    work = Path(tempfile.mkdtemp(prefix="put-cost-", dir=opts.dir))
    servers = []
    try:
        images = bench.makeImages(work, size)
        certs = bench.makeCertificates(work / "certs")
        for name, cmd in (("a", opts.a), ("b", opts.b)):
            s = bench.Server(name, cmd, work / name, work / "logs", certs)
            s.writeConfig()
            extra = opts.a_conf if name == "a" else opts.b_conf
            if extra:
                (s.configDir / "conf.d" / "99-put-cost.conf").write_text(extra.replace("\\n", "\n"))
            s.start(Path("."))
            servers.append(s)
        for s in servers:
            s.waitReady()
            s.addTicket("write", images.target(s.name), size, ["write"])
        for s in servers:  # warm-up
            upload(s, images, opts.x4, opts)
        rows: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
        for i in range(opts.pairs):
            order = servers if i % 2 == 0 else servers[::-1]
            for s in order:
                row = upload(s, images, opts.x4, opts)
                rows[s.name].append(row)
                cells = (f"{k}={v:.3f}" for k, v in sorted(row.items()) if not k.startswith("sc."))
                print(s.name, " ".join(cells), flush=True)
        keys = sorted(set(rows["a"][0]) | set(rows["b"][0]))
        print(f"{'per GiB':32} {'A median [min-max]':>32} {'B median [min-max]':>32}")
        for k in keys:
            cells = []
            for name in "ab":
                vals = [r.get(k, 0.0) for r in rows[name]]
                cells.append(f"{statistics.median(vals):9.3f} [{min(vals):.3f}-{max(vals):.3f}]")
            print(f"{k:32} {cells[0]:>32} {cells[1]:>32}")
    finally:
        for s in servers:
            s.stop()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
