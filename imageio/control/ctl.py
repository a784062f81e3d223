# -*- test-case-name: tests.test_ctl -*-
"""
C{imageio-ctl}: manage tickets from a shell, over the control socket.

A blocking command-line tool (no reactor): it speaks HTTP/1.1 with the
standard library, one request per command, like vdsm does.

    imageio-ctl add-ticket ticket.json
    imageio-ctl add --url file:///var/tmp/disk.raw --ops read [--size N] [--timeout S]
    imageio-ctl show TICKET-ID
    imageio-ctl extend TICKET-ID SECONDS
    imageio-ctl delete TICKET-ID
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import uuid
from typing import Any
from urllib.parse import quote, urlsplit

from imageio import config as _config


class UnixHTTPConnection(http.client.HTTPConnection):
    """
    HTTP over a UNIX socket (filesystem path or abstract name).
    """

    def __init__(self, path: str, timeout: float = 60) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.path)


def _connection(args: argparse.Namespace) -> http.client.HTTPConnection:
    if args.port:
        return http.client.HTTPConnection("localhost", args.port, timeout=args.timeout_seconds)
    return UnixHTTPConnection(args.socket, timeout=args.timeout_seconds)


def _request(
    args: argparse.Namespace, method: str, ticketID: str, body: object = None
) -> tuple[int, bytes]:
    conn = _connection(args)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"content-type": "application/json"} if data is not None else {}
        conn.request(method, "/tickets/" + quote(ticketID, safe=""), body=data, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _check(status: int, body: bytes) -> None:
    if status >= 300:
        raise SystemExit(f"imageio-ctl: error {status}: {body.decode('utf-8', 'replace').strip()}")


def _defaultSocket() -> str:
    return str(_config.defaultStateDir() / "sock")


def _sizeOf(url: str) -> int:
    parts = urlsplit(url)
    if parts.scheme != "file":
        raise SystemExit("imageio-ctl: --size is required for non-file URLs")
    fd = os.open(parts.path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="imageio-ctl", description="Manage imageio tickets over the control socket."
    )
    parser.add_argument(
        "-s", "--socket", default=_defaultSocket(), help="control socket (default: %(default)s)"
    )
    parser.add_argument("-p", "--port", type=int, help="control port, for [control] transport=tcp")
    parser.add_argument("--timeout-seconds", type=float, default=90, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("add-ticket", help="add a ticket from a JSON file")
    p.add_argument("filename")

    p = sub.add_parser("add", help="add a ticket for a URL; prints the ticket id")
    p.add_argument("--url", required=True, help="file:///path, nbd:unix:/path or https://...")
    p.add_argument("--ops", default="read", help="read, write or read,write (default: read)")
    p.add_argument("--size", type=int, help="bytes (default: the file size)")
    p.add_argument("--timeout", type=int, default=300, help="seconds (default: 300)")
    p.add_argument("--uuid", help="ticket id (default: random)")
    p.add_argument("--sparse", action="store_true")
    p.add_argument("--filename", help="download file name for browsers")

    p = sub.add_parser("show", aliases=["show-ticket"], help="show a ticket as JSON")
    p.add_argument("ticket_id")

    p = sub.add_parser("extend", aliases=["mod-ticket"], help="extend a ticket's expiry")
    p.add_argument("ticket_id")
    p.add_argument("timeout", type=int)

    p = sub.add_parser("delete", aliases=["del-ticket"], help="cancel and remove a ticket")
    p.add_argument("ticket_id")

    args = parser.parse_args(argv)
    try:
        return _run(args)
    except OSError as e:
        where = f"port {args.port}" if args.port else args.socket
        raise SystemExit(f"imageio-ctl: cannot reach the daemon at {where}: {e}") from None


def _run(args: argparse.Namespace) -> int:
    command = args.command
    if command == "add-ticket":
        with open(args.filename, "rb") as f:
            ticket: dict[str, Any] = json.load(f)
        _check(*_request(args, "PUT", str(ticket.get("uuid", "")), ticket))
    elif command == "add":
        ticket = {
            "uuid": args.uuid or str(uuid.uuid4()),
            "size": args.size if args.size is not None else _sizeOf(args.url),
            "url": args.url,
            "timeout": args.timeout,
            "ops": [op.strip() for op in args.ops.split(",") if op.strip()],
            "sparse": args.sparse,
        }
        if args.filename:
            ticket["filename"] = args.filename
        _check(*_request(args, "PUT", ticket["uuid"], ticket))
        print(ticket["uuid"])
    elif command in ("show", "show-ticket"):
        status, body = _request(args, "GET", args.ticket_id)
        _check(status, body)
        print(json.dumps(json.loads(body), indent=4))
    elif command in ("extend", "mod-ticket"):
        _check(*_request(args, "PATCH", args.ticket_id, {"timeout": args.timeout}))
    elif command in ("delete", "del-ticket"):
        _check(*_request(args, "DELETE", args.ticket_id))
    return 0


if __name__ == "__main__":
    sys.exit(main())
