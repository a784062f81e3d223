# -*- test-case-name: tests.test_client_cli -*-
"""
The client's defaults, in a module that imports nothing, so that the
command line can build its parser (and answer C{--help}) without loading
Twisted.
"""

from __future__ import annotations

MiB = 1024**2

#: Default buffer per worker: the largest request sent.
BUFFER_SIZE = 8 * MiB

#: Largest buffer accepted (bounded requests; NBD's limit is 32 MiB).
MAX_BUFFER_SIZE = 32 * MiB

#: Default number of connections (upstream's).
MAX_WORKERS = 4

#: Download formats.
FORMATS = ("raw", "qcow2")


def isURL(target: str) -> bool:
    """
    @return: Whether C{target} names a remote image rather than a file.
    """
    return target.startswith(("https://", "http://"))
