# -*- test-case-name: tests.test_client -*-
"""
The imageio client: upload and download images to and from an imageio
server (ours, our proxy, or upstream ovirt-imageio).

Scripts use the blocking functions, with upstream's names and arguments
(C{ovirt_imageio.client}), so switching is a change of import::

    from imageio import client
    client.upload("disk.qcow2", "https://host:54322/images/TICKET", "ca.pem")

Twisted programs use L{Client}, whose methods return Deferreds; it needs
the reactor and a started disk-io pool::

    pool = DiskIOPool(reactor)
    pool.start()
    client = Client(reactor=reactor, diskio=DiskIO(pool), cafile="ca.pem")
    d = client.upload("disk.qcow2", url, resume=True)

The pieces: L{Copier} moves extents between two L{imageio.interfaces.IBackend}s
with several workers (the file and NBD backends locally, the http backend
remotely); L{planTasks} turns extents into bounded copy and zero requests.

The names are loaded on first use, so that a program (or the command
line's C{--help}) importing one module of the package does not pay for
Twisted, TLS and the backends it does not use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from imageio.client._api import Client, ClientError
    from imageio.client._copy import Copier, CopyStats, Task, planTasks
    from imageio.client._defaults import BUFFER_SIZE, MAX_WORKERS
    from imageio.client._local import LocalImageError
    from imageio.client._progress import JSONProgress, Progress, TextProgress
    from imageio.client._remote import NotSupported, RemoteError
    from imageio.client._sync import ImageioClient, checksum, download, info, upload

_WHERE = {
    "BUFFER_SIZE": "_defaults",
    "MAX_WORKERS": "_defaults",
    "Client": "_api",
    "ClientError": "_api",
    "Copier": "_copy",
    "CopyStats": "_copy",
    "Task": "_copy",
    "planTasks": "_copy",
    "LocalImageError": "_local",
    "JSONProgress": "_progress",
    "Progress": "_progress",
    "TextProgress": "_progress",
    "NotSupported": "_remote",
    "RemoteError": "_remote",
    "ImageioClient": "_sync",
    "checksum": "_sync",
    "download": "_sync",
    "info": "_sync",
    "upload": "_sync",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_WHERE))


__all__ = [
    "BUFFER_SIZE",
    "MAX_WORKERS",
    "Client",
    "ClientError",
    "Copier",
    "CopyStats",
    "ImageioClient",
    "JSONProgress",
    "LocalImageError",
    "NotSupported",
    "Progress",
    "RemoteError",
    "Task",
    "TextProgress",
    "checksum",
    "download",
    "info",
    "planTasks",
    "upload",
]
