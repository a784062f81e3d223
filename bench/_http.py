"""
HTTP connections the benchmark clients share: over a UNIX socket, and
HTTPS to 127.0.0.1 verifying the certificate for C{localhost}. Standard
library only: the scripts also run outside the project's environment.
"""

from __future__ import annotations

import http.client
import socket
import ssl


class UnixHTTPConnection(http.client.HTTPConnection):
    """
    HTTP over a UNIX stream socket (control and local services).
    """

    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unixPath = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unixPath)
        self.sock = sock


class LoopbackHTTPSConnection(http.client.HTTPConnection):
    """
    HTTPS to 127.0.0.1, verifying the server certificate for C{localhost}.
    """

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float = 10) -> None:
        super().__init__("127.0.0.1", port, timeout=timeout)
        self.context = context

    def connect(self) -> None:
        super().connect()
        self.sock = self.context.wrap_socket(self.sock, server_hostname="localhost")
