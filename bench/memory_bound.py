#!/usr/bin/env python3
"""
Memory bound of the daemon during multi-GiB transfers over HTTPS.

Starts C{twistd -n imageio} as a subprocess with its own C{conf.d} (TLS
with a test CA, loopback only), with C{TMPDIR} pointing at an empty
directory; adds an upload and a download ticket through the control
socket; then runs, with curl:

  1. a PUT of a SIZE byte file (sparse source, so the client is cheap),
  2. a GET of the same image to /dev/null,

sampling the daemon's C{VmRSS} every 50 ms (and reading the kernel's own
peak, C{VmHWM}, at the end). It fails (exit 1) if the peak is 100 MiB or
more, if anything appeared in C{TMPDIR} (the body was spooled), or if a
transfer failed.

Run from the repository root with the project's virtualenv::

    .venv/bin/python bench/memory_bound.py            # 4 GiB each way
    .venv/bin/python bench/memory_bound.py --size-gib 1

It needs curl and about SIZE of free disk space for the target image
(written under C{--work-dir}, default a new directory in /var/tmp).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

GiB = 1024**3
MiB = 1024**2
LIMIT = 100 * MiB
INTERVAL = 0.05


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def rssOf(pid: int, field: str = "VmRSS") -> int:
    """
    @return: The C{field} of C{/proc/PID/status} in bytes, 0 when gone.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Sampler(threading.Thread):
    """
    Samples a process's RSS every L{INTERVAL} seconds.
    """

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, rssOf(self.pid))
            self.samples += 1
            self._done.wait(INTERVAL)

    def stop(self) -> None:
        self._done.set()
        self.join()


def curl(*args: str) -> tuple[float, str]:
    """
    Run curl; raise on failure.

    @return: Seconds taken and what C{-w} printed.
    """
    start = time.monotonic()
    result = subprocess.run(
        ["curl", "-sS", "--fail", *args], capture_output=True, text=True, check=False
    )
    elapsed = time.monotonic() - start
    if result.returncode != 0:
        raise SystemExit(f"curl {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return elapsed, result.stdout


def addTicket(controlSocket: Path, body: dict[str, object]) -> None:
    curl(
        "--unix-socket",
        str(controlSocket),
        "-X",
        "PUT",
        "--data-binary",
        json.dumps(body),
        f"http://localhost/tickets/{body['uuid']}",
    )


def waitForPort(port: int, proc: subprocess.Popen[bytes], deadline: float = 30) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("daemon did not start listening")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gib", type=float, default=4.0)
    parser.add_argument("--work-dir", default=None)
    args = parser.parse_args()
    size = int(args.size_gib * GiB) // 4096 * 4096
    if shutil.which("curl") is None:
        raise SystemExit("curl is required")

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from imageio import _pki

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="imageio-membound-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    tmpdir = work / "tmp"
    tmpdir.mkdir()
    pki = _pki.makeTestPKI(str(work / "pki"))
    port = freePort()
    control = work / "control.sock"
    confd = work / "conf" / "conf.d"
    confd.mkdir(parents=True)
    (confd / "50-bench.conf").write_text(
        f"""
[daemon]
systemd_enable = false

[tls]
enable = true
key_file = {pki.keyFile}
cert_file = {pki.certFile}

[remote]
host = 127.0.0.1
port = {port}

[local]
enable = false

[control]
transport = unix
socket = {control}
"""
    )
    source = work / "source.raw"
    target = work / "target.raw"
    with open(source, "wb") as f:
        f.truncate(size)
    with open(target, "wb") as f:
        f.truncate(size)

    twistd = Path(sys.executable).with_name("twistd")
    env = dict(os.environ, TMPDIR=str(tmpdir))
    log = open(work / "daemon.log", "wb")
    proc = subprocess.Popen(
        [
            str(twistd),
            "-n",
            "--pidfile=",
            "imageio",
            "--config-dir",
            str(work / "conf"),
            "--state-dir",
            str(work / "state"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=str(work),
    )
    failures: list[str] = []
    try:
        waitForPort(port, proc)
        baseline = rssOf(proc.pid)
        common = {"size": size, "timeout": 3600, "url": target.as_uri()}
        addTicket(control, {"uuid": "bench-put", "ops": ["write"], **common})
        addTicket(control, {"uuid": "bench-get", "ops": ["read"], **common})
        url = f"https://localhost:{port}/images/"
        results = {}
        for name, curlArgs in (
            ("PUT", ["-T", str(source), url + "bench-put"]),
            ("GET", ["-o", "/dev/null", url + "bench-get"]),
        ):
            sampler = Sampler(proc.pid)
            sampler.start()
            elapsed, _ = curl("--cacert", pki.caFile, *curlArgs)
            sampler.stop()
            results[name] = (elapsed, sampler.peak, sampler.samples)
            if name == "PUT":
                spooled = list(tmpdir.iterdir())
                if spooled:
                    failures.append(f"PUT wrote to TMPDIR: {spooled}")
        hwm = rssOf(proc.pid, "VmHWM")
        print(f"size: {size / GiB:.2f} GiB, baseline RSS {baseline / MiB:.1f} MiB")
        for name, (elapsed, peak, samples) in results.items():
            print(
                f"{name}: {elapsed:.1f} s ({size / MiB / elapsed:.0f} MiB/s), "
                f"peak VmRSS {peak / MiB:.1f} MiB over {samples} samples"
            )
            if peak >= LIMIT:
                failures.append(f"{name} peak RSS {peak / MiB:.1f} MiB >= {LIMIT / MiB:.0f} MiB")
        print(f"VmHWM (kernel peak, whole run): {hwm / MiB:.1f} MiB")
        print(f"TMPDIR entries after PUT: {len(list(tmpdir.iterdir()))}")
        if hwm >= LIMIT:
            failures.append(f"VmHWM {hwm / MiB:.1f} MiB >= {LIMIT / MiB:.0f} MiB")
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if not failures and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    for failure in failures:
        print("FAIL:", failure)
    if failures:
        print(f"work directory kept: {work}")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
