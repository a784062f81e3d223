#!/usr/bin/env python3
"""
The TLS layer in isolation: Twisted's pyOpenSSL TLS (C{TLSMemoryBIOProtocol},
what an C{ssl:} endpoint gives) against our stdlib-C{ssl} transport
(L{imageio.web._tls.TLSServerFactory}), serving the same C{twisted.web} site
from the same server process.

First the TLS layer alone: each wrapper in memory with a stdlib client at
the other end, no sockets and no HTTP. Then end to end: the site does no
I/O: GET streams a 1 MiB buffer from memory through a push
producer, PUT counts and drops the body. So the numbers are TLS plus
C{twisted.web}, nothing else. C{curl} is the client, over loopback, with a
sparse upload source on tmpfs. The two listeners are measured alternately
(A B B A ...) in one run, and each figure is the median of C{--runs}.

Server CPU comes from C{/proc/<pid>/stat} (user + system, and each apart:
system time is mostly the loopback TCP copy, the same for both) before and
after each transfer; client CPU from C{getrusage(RUSAGE_CHILDREN)} around
curl.

Usage::

    .venv/bin/python bench/tls_isolation.py [--size MiB] [--runs N] [--dir /dev/shm]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MiB = 1024 * 1024
GiB = 1024 * MiB
CHUNK = MiB
IMPLS = ("twisted", "stdlib")


# The server process.


def serve(options: argparse.Namespace) -> None:
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.internet.interfaces import IPushProducer
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Request, Site
    from zope.interface import implementer

    from imageio.web._tls import TLSServerFactory, makeServerContext

    data = os.urandom(CHUNK)

    @implementer(IPushProducer)
    class Streamer:
        def __init__(self, request: Any, size: int) -> None:
            self.request = request
            self.remaining = size
            self.paused = False
            request.notifyFinish().addErrback(lambda _: self.stopProducing())

        def resumeProducing(self) -> None:
            self.paused = False
            while not self.paused and self.remaining > 0:
                n = min(CHUNK, self.remaining)
                self.remaining -= n
                self.request.write(data if n == CHUNK else data[:n])
            if self.remaining == 0:
                self.remaining = -1
                self.request.unregisterProducer()
                self.request.finish()

        def pauseProducing(self) -> None:
            self.paused = True

        def stopProducing(self) -> None:
            self.paused = True
            self.remaining = -1

    class Discard:
        size = 0

        def write(self, data: bytes) -> None:
            self.size += len(data)

        def seek(self, *args: Any) -> None:
            pass

        def tell(self) -> int:
            return self.size

        def read(self, *args: Any) -> bytes:
            return b""

        def close(self) -> None:
            pass

    class DiscardingRequest(Request):
        def gotLength(self, length: int | None) -> None:
            self.content = Discard()

    class Data(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> object:
            size = int(request.args.get(b"size", [b"0"])[0])
            request.setHeader(b"content-length", b"%d" % size)
            producer = Streamer(request, size)
            request.registerProducer(producer, True)
            producer.resumeProducing()
            return NOT_DONE_YET

        def render_PUT(self, request: Any) -> bytes:
            return b"%d" % request.content.size

    site = Site(Data())
    site.requestFactory = DiscardingRequest
    site.displayTracebacks = False

    def escape(path: str) -> str:
        return path.replace(":", "\\:")

    twisted = serverFromString(
        reactor,
        f"ssl:0:interface=127.0.0.1:privateKey={escape(options.key)}"
        f":certKey={escape(options.cert)}",
    )
    stdlib = TLSServerFactory(site, makeServerContext(options.cert, options.key), reactor)
    ports: dict[str, int] = {}

    def listening(port: Any, name: str) -> None:
        ports[name] = port.getHost().port
        if len(ports) == 2:
            print(json.dumps(ports), flush=True)

    twisted.listen(site).addCallback(listening, "twisted")
    listening(reactor.listenTCP(0, stdlib, interface="127.0.0.1"), "stdlib")
    reactor.run()


# The TLS layer alone, in this process: no sockets, no HTTP.


def layerOnly(pki: Any, size: int) -> dict[tuple[str, str], float]:
    """
    Push C{size} bytes through each server-side TLS wrapper in memory, with
    a stdlib client at the other end, and time only the wrapper.

    Encrypt: the wrapped protocol writes 1 MiB pieces; the ciphertext goes
    to a transport that only counts it. Decrypt: the client's ciphertext is
    fed in 64 KiB pieces, as a TCP transport delivers it.

    @return: CPU seconds per GiB, by (wrapper, "encrypt" or "decrypt").
    """
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.ssl import PrivateCertificate
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from imageio.web._tls import TLSServerFactory, makeServerContext

    class Counting(StringTransport):
        count = 0

        def write(self, data: bytes) -> None:
            self.count += len(data)

    class Sink(Protocol):
        count = 0

        def dataReceived(self, data: bytes) -> None:
            self.count += len(data)

    def twistedFactory() -> Any:
        with open(pki.certFile, "rb") as c, open(pki.keyFile, "rb") as k:
            options = PrivateCertificate.loadPEM(c.read() + k.read()).options()
        return TLSMemoryBIOFactory(options, False, Factory.forProtocol(Sink))

    def stdlibFactory() -> Any:
        context = makeServerContext(pki.certFile, pki.keyFile)
        return TLSServerFactory(Factory.forProtocol(Sink), context, Clock())

    def connect(factory: Any) -> tuple[Any, Any, Any, Any]:
        server = factory.buildProtocol(None)
        transport = Counting()
        server.makeConnection(transport)
        context = ssl.create_default_context(cafile=pki.caFile)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        client = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        real = StringTransport()
        # Handshake over a recording transport, then swap in the counter.
        server.transport = real
        if hasattr(server, "_tcp"):
            server._tcp = real
        for _ in range(5):
            try:
                client.do_handshake()
            except ssl.SSLWantReadError:
                pass
            data = outgoing.read()
            if data:
                server.dataReceived(data)
            incoming.write(real.value())
            real.clear()
        server.transport = transport
        if hasattr(server, "_tcp"):
            server._tcp = transport
        return server, client, outgoing, transport

    chunk = os.urandom(CHUNK)
    pieces = size // CHUNK
    result: dict[tuple[str, str], float] = {}
    for name, make in (("twisted", twistedFactory), ("stdlib", stdlibFactory)):
        server, client, outgoing, transport = connect(make())
        start = time.process_time()
        for _ in range(pieces):
            server.write(chunk)
        result[(name, "encrypt")] = (time.process_time() - start) * GiB / size
        assert transport.count >= size

        server, client, outgoing, transport = connect(make())
        records = []
        for _ in range(pieces):
            client.write(chunk)
            data = outgoing.read()
            records += [data[i : i + 65536] for i in range(0, len(data), 65536)]
        start = time.process_time()
        for record in records:
            server.dataReceived(record)
        result[(name, "decrypt")] = (time.process_time() - start) * GiB / size
        assert server.wrappedProtocol.count == size
    return result


# The harness.


def cpuSeconds(pid: int) -> tuple[float, float]:
    """
    @return: User and system CPU seconds of process C{pid}.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15; fields[0] here is field 3.
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def childCPU() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def negotiated(port: int, caFile: str) -> str:
    context = ssl.create_default_context(cafile=caFile)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        with context.wrap_socket(sock, server_hostname="localhost") as tls:
            cipher = tls.cipher()
            return f"{tls.version()} {cipher[0] if cipher else '?'}"


def transfer(
    direction: str, port: int, size: int, options: argparse.Namespace, serverPID: int
) -> dict[str, float]:
    url = f"https://127.0.0.1:{port}/data?size={size}"
    args = [
        "curl", "-sS", "--http1.1", "--cacert", options.ca, "-o", "/dev/null",
        "-w", "%{http_code} %{size_download} %{size_upload}",
    ]  # fmt: skip
    if direction == "upload":
        args += ["-T", options.source, "-H", "Expect:"]
    args.append(url)
    (user0, sys0), client0, wall0 = cpuSeconds(serverPID), childCPU(), time.monotonic()
    result = subprocess.run(args, capture_output=True, text=True)
    wall = time.monotonic() - wall0
    user1, sys1 = cpuSeconds(serverPID)
    user, system, client = user1 - user0, sys1 - sys0, childCPU() - client0
    code, down, up = result.stdout.split() if result.returncode == 0 else ("?", "0", "0")
    moved = int(down) if direction == "download" else int(up)
    if result.returncode != 0 or code != "200" or moved != size:
        raise SystemExit(f"{direction} on port {port} failed: {result.stdout} {result.stderr}")
    gib = size / GiB
    return {
        "MiB/s": size / MiB / wall,
        "server CPU s/GiB": (user + system) / gib,
        "server user": user / gib,
        "server sys": system / gib,
        "curl CPU s/GiB": client / gib,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB per transfer (1024)")
    parser.add_argument("--runs", type=int, default=3, help="samples per figure (3)")
    parser.add_argument("--dir", default="/dev/shm", help="where the upload source goes")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cert", help=argparse.SUPPRESS)
    parser.add_argument("--key", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        serve(options)
        return
    if shutil.which("curl") is None:
        raise SystemExit("curl is needed")

    from imageio._pki import makeTestPKI

    size = options.size * MiB
    work = tempfile.mkdtemp(prefix="tls-isolation-")
    source = tempfile.NamedTemporaryFile(dir=options.dir, prefix="tls-isolation-", delete=False)
    server = None
    try:
        pki = makeTestPKI(work)
        options.ca = pki.caFile

        layer: dict[tuple[str, str], list[float]] = {}
        for _ in range(options.runs):
            for key, value in layerOnly(pki, min(size, 256 * MiB)).items():
                layer.setdefault(key, []).append(value)
        print("TLS layer alone, in process (CPU s/GiB, median):")
        for impl in IMPLS:
            print(
                f"  {impl:8} "
                + "  ".join(
                    f"{op} {statistics.median(layer[(impl, op)]):.2f}"
                    for op in ("encrypt", "decrypt")
                )
            )

        # Sparse: curl reads zeroes from tmpfs at almost no cost.
        source.truncate(size)
        source.close()
        options.source = source.name
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--cert", pki.certFile, "--key", pki.keyFile],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert server.stdout is not None
        ports = json.loads(server.stdout.readline())
        for impl in IMPLS:
            print(f"{impl:8} port {ports[impl]}: {negotiated(ports[impl], pki.caFile)}")

        samples: dict[tuple[str, str], list[dict[str, float]]] = {}
        # One unrecorded warm-up transfer each.
        for impl in IMPLS:
            transfer("download", ports[impl], 64 * MiB, options, server.pid)
        for run in range(options.runs):
            for direction in ("download", "upload"):
                order = IMPLS if run % 2 == 0 else IMPLS[::-1]
                for impl in order:
                    sample = transfer(direction, ports[impl], size, options, server.pid)
                    samples.setdefault((impl, direction), []).append(sample)
                    print(
                        f"run {run + 1} {direction:8} {impl:8} "
                        + "  ".join(f"{k} {v:.2f}" for k, v in sample.items()),
                        flush=True,
                    )

        columns = ("MiB/s", "server CPU s/GiB", "server user", "server sys", "curl CPU s/GiB")
        print()
        print(f"{options.size} MiB per transfer, medians of {options.runs}")
        print(f"{'direction':10} {'server TLS':22} " + " ".join(f"{c:>16}" for c in columns))
        for direction in ("download", "upload"):
            for impl in IMPLS:
                label = "Twisted (pyOpenSSL)" if impl == "twisted" else "ours (stdlib ssl)"
                values = [
                    statistics.median(s[c] for s in samples[(impl, direction)]) for c in columns
                ]
                print(f"{direction:10} {label:22} " + " ".join(f"{v:16.2f}" for v in values))
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
        os.unlink(source.name)
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
