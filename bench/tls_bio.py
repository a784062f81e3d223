#!/usr/bin/env python3
"""
What the memory-BIO TLS design costs, in isolation.

Upstream ovirt-imageio serves HTTPS from a thread per connection on a
blocking C{ssl.SSLSocket}: OpenSSL encrypts straight into the socket and
decrypts straight from it. An event loop cannot block, so our daemon (like
Twisted's own TLS) drives an C{ssl.SSLObject} over two C{MemoryBIO}s and
moves ciphertext between them and a non-blocking socket itself. This script
measures just that difference: the same stdlib C{ssl}, the same cipher, the
same 256 KiB pieces, no HTTP and no storage.

For each direction it moves C{--size} over loopback TCP between two
processes and reports the CPU seconds per GiB of the measured side (user +
system, from C{getrusage}); the other side is a plain blocking
C{SSLSocket}:

    - C{send socket-bio}: C{SSLSocket.sendall} of views of one buffer;
    - C{send memory-bio}: C{SSLObject.write}, C{MemoryBIO.read}, C{sendall};
    - C{recv socket-bio}: C{SSLSocket.recv_into} one buffer;
    - C{recv memory-bio}: C{recv}, C{MemoryBIO.write}, C{SSLObject.read}
      into one buffer.

Usage::

    python3 bench/tls_bio.py [--size MiB] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile

MiB = 1024 * 1024
GiB = 1024 * MiB
PIECE = int(os.environ.get("PIECE", 256 * 1024))
MODES = ("socket-bio", "memory-bio")


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def makePKI(directory: str) -> tuple[str, str]:
    cert = os.path.join(directory, "cert.pem")
    key = os.path.join(directory, "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-keyout", key, "-out", cert],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def serverContext(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def clientContext() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def peer(port: int, direction: str, size: int) -> None:
    """
    The unmeasured side: a blocking client SSLSocket that reads (when the
    server sends) or writes C{size} bytes.
    """
    with socket.create_connection(("127.0.0.1", port)) as raw:
        with clientContext().wrap_socket(raw, server_hostname="localhost") as s:
            buf = memoryview(bytearray(4 * MiB))
            if direction == "send":
                receiveAll(s, buf, size)
            else:
                buf[:] = os.urandom(len(buf))
                sendAll(s, buf, size, len(buf))


def sendAll(s: ssl.SSLSocket, buf: memoryview, size: int, piece: int) -> None:
    """
    Send C{size} bytes, C{buf} over and over in C{piece}s, then wait for
    the peer's one-byte acknowledgement.
    """
    done = 0
    while done < size:
        n = min(len(buf), size - done)
        for i in range(0, n, piece):
            s.sendall(buf[i : min(n, i + piece)])
        done += n
    s.recv(1)


def receiveAll(s: ssl.SSLSocket, buf: memoryview, size: int) -> None:
    """
    Receive C{size} bytes into C{buf} over and over, then acknowledge.
    """
    done = 0
    while done < size:
        n = s.recv_into(buf)
        if not n:
            raise SystemExit("short stream")
        done += n
    s.sendall(b"k")


def measure(direction: str, mode: str, size: int, cert: str, key: str) -> float:
    """
    @return: CPU seconds per GiB of this process for one transfer.
    """
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    child = subprocess.Popen([sys.executable, __file__, "--peer", str(port), direction, str(size)])
    conn, _ = listener.accept()
    listener.close()
    ctx = serverContext(cert, key)
    buf = memoryview(bytearray(4 * MiB))
    buf[:] = os.urandom(len(buf))
    try:
        if mode == "socket-bio":
            s = ctx.wrap_socket(conn, server_side=True)
            start = cpu()
            if direction == "send":
                sendAll(s, buf, size, PIECE)
            else:
                receiveAll(s, buf, size)
            used = cpu() - start
            s.close()
        else:
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = ctx.wrap_bio(incoming, outgoing, server_side=True)
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if outgoing.pending:
                        conn.sendall(outgoing.read())
                    incoming.write(conn.recv(PIECE))
            if outgoing.pending:
                conn.sendall(outgoing.read())
            start = cpu()
            done = 0
            if direction == "send":
                while done < size:
                    n = min(len(buf), size - done)
                    for i in range(0, n, PIECE):
                        tls.write(buf[i : min(n, i + PIECE)])
                        conn.sendall(outgoing.read())
                    done += n
                while True:
                    try:
                        if tls.read(1):
                            break
                    except ssl.SSLWantReadError:
                        incoming.write(conn.recv(PIECE))
            else:
                while done < size:
                    try:
                        n = tls.read(len(buf), buf)
                    except ssl.SSLWantReadError:
                        data = conn.recv(PIECE)
                        if not data:
                            raise SystemExit("short stream") from None
                        incoming.write(data)
                        continue
                    done += n
                tls.write(b"k")
                conn.sendall(outgoing.read())
            used = cpu() - start
            conn.close()
    finally:
        child.wait()
    return used / (size / GiB)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        peer(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=2048, help="MiB per transfer")
    parser.add_argument("--runs", type=int, default=5)
    options = parser.parse_args()
    size = options.size * MiB
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = makePKI(tmp)
        results: dict[tuple[str, str], list[float]] = {}
        for run in range(options.runs):
            for direction in ("send", "recv"):
                order = MODES if run % 2 == 0 else MODES[::-1]
                for mode in order:
                    value = measure(direction, mode, size, cert, key)
                    results.setdefault((direction, mode), []).append(value)
    print(f"{ssl.OPENSSL_VERSION}, {options.size} MiB x {options.runs} runs, medians")
    print(f"{'measured side':<20} {'CPU s/GiB':>10} {'min-max':>12}")
    for direction in ("send", "recv"):
        for mode in MODES:
            values = results[(direction, mode)]
            print(
                f"{direction + ' ' + mode:<20} {statistics.median(values):>10.3f} "
                f"{min(values):>5.3f}-{max(values):<5.3f}"
            )
        socketBIO = statistics.median(results[(direction, "socket-bio")])
        memoryBIO = statistics.median(results[(direction, "memory-bio")])
        print(f"{direction + ' memory/socket':<20} {memoryBIO / socketBIO:>10.2f}")


if __name__ == "__main__":
    main()
