# -*- test-case-name: tests.test_client_cli -*-
"""
C{imageio-client}: upload, download, checksum and inspect images.

The global options are those of upstream's C{examples/imageio-client}::

    imageio-client [-c CAFILE | --insecure] [-w WORKERS] [-b BUFFER_KIB] [-v]
                   [--output text|json] COMMAND ...
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from imageio.client._defaults import BUFFER_SIZE, FORMATS, MAX_WORKERS, isURL

if TYPE_CHECKING:
    from imageio.client._progress import Progress

PROG = "imageio-client"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{PROG}: error: {message}\n")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {value!r}")
    return n


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Upload and download images to an imageio server.")
    tls = p.add_mutually_exclusive_group()
    tls.add_argument(
        "-c",
        "--cafile",
        help="CA certificates verifying the server (default: the system's)",
    )
    tls.add_argument(
        "--insecure",
        dest="secure",
        action="store_false",
        default=True,
        help="do not verify the server's certificate and host name (not recommended)",
    )
    p.add_argument(
        "-w",
        "--workers",
        type=_positive,
        default=MAX_WORKERS,
        help=f"most connections to use (default {MAX_WORKERS})",
    )
    p.add_argument(
        "-b",
        "--buffer-size",
        type=_positive,
        default=BUFFER_SIZE // 1024,
        metavar="BUFFER_KIB",
        help=f"buffer size in KiB: the largest request (default {BUFFER_SIZE // 1024})",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="tracebacks on errors")
    p.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="progress as a bar on a terminal (text) or JSON lines (json)",
    )
    commands = p.add_subparsers(title="commands", dest="command", required=True)

    up = commands.add_parser("upload", help="upload an image (raw or qcow2)")
    up.add_argument("--resume", action="store_true", help="send only what is not written yet")
    up.add_argument("filename", help="image to upload")
    up.add_argument("url", help="transfer URL: https://host:54322/images/TICKET")

    down = commands.add_parser("download", help="download an image")
    down.add_argument(
        "-f",
        "--format",
        choices=FORMATS,
        default="qcow2",
        help="format of the new image (default qcow2)",
    )
    down.add_argument(
        "--incremental", action="store_true", help="only dirty extents (backup, qcow2)"
    )
    down.add_argument("--resume", action="store_true", help="continue a partial raw download")
    down.add_argument("url", help="transfer URL")
    down.add_argument("filename", help="image to write")

    checksum = commands.add_parser("checksum", help="block checksum of a file or URL")
    checksum.add_argument("target", help="file or transfer URL")

    info = commands.add_parser("info", help="describe a file or URL")
    info.add_argument("target", help="file or transfer URL")
    return p


def _progress(args: argparse.Namespace, description: str) -> Progress | None:
    from imageio.client._progress import JSONProgress, TextProgress

    if args.output == "json":
        return JSONProgress(description=description, output=sys.stdout)
    if sys.stderr.isatty():
        return TextProgress(description=description, output=sys.stderr)
    return None


def run(args: argparse.Namespace, program: bool = False) -> None:
    # First: the reactor core without pyOpenSSL (as the daemon's), which
    # the command never uses (its TLS is the stdlib's).
    import imageio._leanreactor  # noqa: F401
    from imageio.client import _sync

    thread = _sync.reactorThread()
    from imageio._diskio import DiskIO
    from imageio.client._api import Client

    if program:
        # Everything imported so far lives as long as the program: the
        # cycle collector need not walk it again on every collection
        # during the transfer (about 10% less CPU per GiB).
        gc.freeze()

    progress: Progress | None = None
    if args.command in ("upload", "download"):
        progress = _progress(args, args.command)

    def warn(message: str) -> None:
        sys.stderr.write(f"{PROG}: warning: {message}\n")

    client = Client(
        reactor=thread.reactor,
        diskio=DiskIO(thread.pool),
        cafile=args.cafile,
        secure=args.secure,
        workers=args.workers,
        bufferSize=args.buffer_size * 1024,
        progress=progress,
        warn=warn,
    )
    try:
        if args.command == "upload":
            thread.call(client.upload, args.filename, args.url, resume=args.resume)
        elif args.command == "download":
            thread.call(
                client.download,
                args.url,
                args.filename,
                fmt=args.format,
                incremental=args.incremental,
                resume=args.resume,
            )
        elif args.command == "checksum":
            _print(thread.call(client.checksum, args.target))
        elif args.command == "info":
            result = thread.call(client.info, args.target)
            if args.output == "json" or isURL(args.target):
                _print(result)
            else:
                print(f"format: {result['format']}")
                print(f"virtual-size: {result['virtual-size']}")
    except BaseException:
        from imageio.client._progress import TextProgress

        if isinstance(progress, TextProgress) and progress.output is not None:
            # End the bar's line before the error.
            progress.output.write("\n")
        raise
    if progress is not None:
        thread.call(progress.close)


def _print(result: Any) -> None:
    print(json.dumps(result, indent=None))


def main(argv: Sequence[str] | None = None, program: bool = False) -> int:
    """
    Run the command line; exit status 0 on success, 1 on failure (with one
    line on standard error), 2 for bad usage.

    @param program: The process is the C{imageio-client} program (not a
        caller's): its heap may be tuned for it.
    """
    args = parser().parse_args(argv)
    try:
        run(args, program)
    except KeyboardInterrupt:
        sys.stderr.write(f"{PROG}: error: interrupted\n")
        return 130
    except Exception as e:
        if args.verbose:
            traceback.print_exc()
        sys.stderr.write(f"{PROG}: error: {_message(e)}\n")
        return 1
    return 0


def _message(e: BaseException) -> str:
    from imageio.client._remote import errorMessage

    if isinstance(e, OSError) and e.strerror:
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    return errorMessage(e)


def command() -> NoReturn:
    """
    The C{imageio-client} program: L{main}, then exit without tearing the
    interpreter down. Freeing some 450 modules one by one cost a transfer
    0.05-0.1 CPU seconds; the reactor thread and the disk-io pool are
    stopped and the output flushed first, as an ordinary exit would.
    """
    code = main(program=True)
    from imageio.client import _sync

    _sync.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 1
    os._exit(code)


if __name__ == "__main__":
    command()
