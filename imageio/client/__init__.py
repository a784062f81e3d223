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
"""

from imageio.client._api import BUFFER_SIZE, MAX_WORKERS, Client, ClientError
from imageio.client._copy import Copier, CopyStats, Task, planTasks
from imageio.client._local import LocalImageError
from imageio.client._progress import JSONProgress, Progress, TextProgress
from imageio.client._remote import NotSupported, RemoteError
from imageio.client._sync import ImageioClient, checksum, download, info, upload

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
