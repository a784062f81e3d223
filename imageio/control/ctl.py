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

and upstream's C{ovirt-imageioctl} spellings:

    imageio-ctl add-ticket [-c CONF_DIR] FILE
    imageio-ctl show-ticket [-c CONF_DIR] TICKET-ID
    imageio-ctl mod-ticket [-c CONF_DIR] TICKET-ID --timeout N
    imageio-ctl del-ticket [-c CONF_DIR] TICKET-ID

The control socket (UNIX or TCP) comes from C{-s}/C{-p}, else from the
configuration: C{-c CONF_DIR}, else as root upstream's system directories,
else the embedded defaults, as the daemon reads them.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
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


class DaemonUnreachable(Exception):
    """
    The control socket could not be reached or the daemon did not answer.
    """


def _connection(args: argparse.Namespace) -> http.client.HTTPConnection:
    if args.port:
        return http.client.HTTPConnection(args.host, args.port, timeout=args.timeout_seconds)
    return UnixHTTPConnection(args.socket, timeout=args.timeout_seconds)


def _where(args: argparse.Namespace) -> str:
    if args.port:
        return f"{args.host} port {args.port}"
    return str(args.socket).replace("\0", "@")


#: Where the system daemon (root, or the systemd units) listens.
SYSTEM_SOCKET = "/run/ovirt-imageio/sock"


def _hint(args: argparse.Namespace, error: Exception) -> str:
    """
    @return: What to try next, for the usual mistakes.
    """
    if args.port:
        return ""
    if isinstance(error, PermissionError):
        return " (the control socket is for root and the socket's group, ovirtimg)"
    if (
        isinstance(error, FileNotFoundError | ConnectionRefusedError)
        and args.socket != SYSTEM_SOCKET
        and os.path.exists(SYSTEM_SOCKET)
    ):
        return f" (the system daemon listens on {SYSTEM_SOCKET}: use -s {SYSTEM_SOCKET})"
    return ""


def _locate(args: argparse.Namespace) -> None:
    """
    Fill C{args.socket}, C{args.host} and C{args.port} from C{-s}/C{-p} or
    from the daemon's configuration.
    """
    args.host = "localhost"
    if args.socket or args.port:
        return
    confDir = getattr(args, "conf_dir", None)
    try:
        if confDir:
            config, _ = _config.loadConfigDir(Path(confDir), warn=False)
        elif os.geteuid() == 0:
            config, _ = _config.loadSystem(warn=False)
        else:
            config = _config.loadDir(None, warn=False)
    except _config.ConfigError as e:
        raise SystemExit(f"imageio-ctl: configuration error: {e}") from None
    control = config.control
    if not control.enable:
        raise SystemExit("imageio-ctl: the control service is disabled ([control] enable = false)")
    if control.transport == "tcp":
        args.host = "127.0.0.1" if control.prefer_ipv4 else "::1"
        args.port = control.port
    else:
        args.socket = control.socket or _defaultSocket()


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
    except (OSError, http.client.HTTPException) as e:
        raise DaemonUnreachable(
            f"cannot reach the daemon at {_where(args)}: {e}{_hint(args, e)}"
        ) from None
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
    try:
        fd = os.open(parts.path, os.O_RDONLY)
    except OSError as e:
        raise SystemExit(f"imageio-ctl: cannot open {parts.path} for its size: {e}") from None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _readTicket(filename: str) -> dict[str, Any]:
    try:
        with open(filename, "rb") as f:
            ticket = json.load(f)
    except OSError as e:
        raise SystemExit(f"imageio-ctl: cannot read ticket file: {e}") from None
    except ValueError as e:
        raise SystemExit(f"imageio-ctl: {filename}: not a JSON ticket: {e}") from None
    if not isinstance(ticket, dict):
        raise SystemExit(f"imageio-ctl: {filename}: not a JSON object")
    return ticket


def describeExpiry(expires: float, now: float, wallNow: float) -> str:
    """
    @param expires: A ticket's C{expires}: the daemon's monotonic clock,
        which on Linux is the same for every process on the host.
    @param now: C{time.monotonic()} now.
    @param wallNow: C{time.time()} now.
    @return: When the ticket expires, for a person.
    """
    remaining = round(expires - now)
    at = datetime.fromtimestamp(wallNow + remaining, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    if remaining > 0:
        return f"in {remaining} s, at {at}"
    if remaining == 0:
        return f"now, at {at}"
    return f"expired {-remaining} s ago, at {at}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="imageio-ctl", description="Manage imageio tickets over the control socket."
    )
    parser.add_argument(
        "-s",
        "--socket",
        help="control socket (default: from the configuration; "
        f"{_defaultSocket()} when unconfigured)",
    )
    parser.add_argument("-p", "--port", type=int, help="control port, for [control] transport=tcp")
    confHelp = "daemon configuration directory, to find the control socket (as ovirt-imageioctl)"
    parser.add_argument("-c", "--conf-dir", help=confHelp)
    parser.add_argument("--timeout-seconds", type=float, default=90, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        p = sub.add_parser(name, aliases=list(aliases), help=help)
        # Upstream's tool takes -c after the command; SUPPRESS keeps one
        # given before the command.
        p.add_argument("-c", "--conf-dir", default=argparse.SUPPRESS, help=confHelp)
        return p

    p = command("add-ticket", "add a ticket from a JSON file")
    p.add_argument("filename")

    p = command("add", "add a ticket for a URL; prints the ticket id")
    p.add_argument("--url", required=True, help="file:///path, nbd:unix:/path or https://...")
    p.add_argument("--ops", default="read", help="read, write or read,write (default: read)")
    p.add_argument("--size", type=int, help="bytes (default: the file size)")
    p.add_argument("--timeout", type=int, default=300, help="seconds (default: 300)")
    p.add_argument("--uuid", help="ticket id (default: random)")
    p.add_argument("--sparse", action="store_true")
    p.add_argument("--filename", help="download file name for browsers")

    p = command("show", "show a ticket as JSON, with when it expires")
    p.add_argument("ticket_id")

    p = command("show-ticket", "show a ticket as JSON (as ovirt-imageioctl)")
    p.add_argument("ticket_id")

    p = command("extend", "set a ticket to expire SECONDS from now")
    p.add_argument("ticket_id")
    p.add_argument("timeout", type=int, metavar="SECONDS")

    p = command("mod-ticket", "set a ticket's timeout (as ovirt-imageioctl)")
    p.add_argument("ticket_id")
    p.add_argument("--timeout", type=int, required=True, help="new timeout in seconds")

    p = command("delete", "cancel and remove a ticket", aliases=("del-ticket",))
    p.add_argument("ticket_id")

    args = parser.parse_args(argv)
    try:
        status = _run(args)
        # Inside the try: a closed pipe shows now, not at interpreter exit.
        sys.stdout.flush()
        return status
    except DaemonUnreachable as e:
        raise SystemExit(f"imageio-ctl: {e}") from None
    except BrokenPipeError:
        # Our reader went away (imageio-ctl show ... | head): not an error
        # of the daemon's; keep Python from complaining again at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _run(args: argparse.Namespace) -> int:
    command = args.command
    if command == "add-ticket":
        ticket = _readTicket(args.filename)
        _locate(args)
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
        _locate(args)
        _check(*_request(args, "PUT", ticket["uuid"], ticket))
        print(ticket["uuid"])
    elif command in ("show", "show-ticket"):
        _locate(args)
        status, body = _request(args, "GET", args.ticket_id)
        _check(status, body)
        info = json.loads(body)
        if command == "show-ticket":
            print(json.dumps(info, indent=2))
        else:
            if isinstance(info.get("expires"), int | float):
                shown: dict[str, Any] = {}
                for key, value in info.items():
                    shown[key] = value
                    if key == "expires":
                        shown["expires_human"] = describeExpiry(
                            value, time.monotonic(), time.time()
                        )
                info = shown
            print(json.dumps(info, indent=4))
    elif command in ("extend", "mod-ticket"):
        _locate(args)
        _check(*_request(args, "PATCH", args.ticket_id, {"timeout": args.timeout}))
        # Upstream's spellings stay as quiet as upstream's tool.
        if command == "extend" and args.timeout > 0:
            print(f"Ticket {args.ticket_id} now expires in {args.timeout} s")
        elif command == "extend":
            print(f"Ticket {args.ticket_id} expired now; extending it again revives it")
    elif command in ("delete", "del-ticket"):
        _locate(args)
        _check(*_request(args, "DELETE", args.ticket_id))
        if command == "delete":
            print(f"Ticket {args.ticket_id} deleted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
