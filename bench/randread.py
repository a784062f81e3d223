#!/usr/bin/env python3
"""
4 KiB random reads over one keep-alive connection, as fast as one client can.

Run by C{bench.py} as a separate process so the harness's RSS sampler does
not share a GIL with the client.  Prints one JSON object on stdout:
C{{"requests": N, "seconds": T, "verified": V}}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import ssl
import sys
import time

from _http import LoopbackHTTPSConnection, UnixHTTPConnection  # bench/ is sys.path[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--https-port", type=int, help="HTTPS port on 127.0.0.1")
    where.add_argument("--unix", help="UNIX socket path")
    parser.add_argument("--cacert", help="CA file for HTTPS")
    parser.add_argument("--ticket", required=True)
    parser.add_argument("--size", type=int, required=True, help="image size in bytes")
    parser.add_argument("--block", type=int, default=4096)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--requests", type=int, default=0, help="stop after this many requests (0: --seconds)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--image", help="local copy of the image: every 64th read is compared with it"
    )
    args = parser.parse_args()

    conn: http.client.HTTPConnection
    if args.unix:
        conn = UnixHTTPConnection(args.unix)
    else:
        ctx = ssl.create_default_context(cafile=args.cacert)
        conn = LoopbackHTTPSConnection(args.https_port, ctx)

    image = open(args.image, "rb") if args.image else None
    path = f"/images/{args.ticket}"
    rnd = random.Random(args.seed)
    blocks = args.size // args.block
    count = verified = 0
    firstSock = None
    start = time.monotonic()
    deadline = start + args.seconds
    while True:
        offset = rnd.randrange(blocks) * args.block
        last = offset + args.block - 1
        conn.request("GET", path, headers={"Range": f"bytes={offset}-{last}"})
        resp = conn.getresponse()
        data = resp.read()
        if resp.status != 206 or len(data) != args.block:
            print(
                f"randread: GET bytes={offset}-{last}: status {resp.status}, {len(data)} bytes",
                file=sys.stderr,
            )
            return 1
        if firstSock is None:
            firstSock = conn.sock
        if conn.sock is not firstSock or resp.will_close:
            print("randread: server did not keep the connection alive", file=sys.stderr)
            return 1
        if image is not None and count % 64 == 0:
            if os.pread(image.fileno(), args.block, offset) != data:
                print(f"randread: wrong data at offset {offset}", file=sys.stderr)
                return 1
            verified += 1
        count += 1
        now = time.monotonic()
        if (count >= args.requests) if args.requests else (now >= deadline):
            break
    conn.close()
    print(json.dumps({"requests": count, "seconds": now - start, "verified": verified}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
