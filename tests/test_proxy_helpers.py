"""
Fixtures for the proxy tests: real daemons and a real signed-ticket proxy
on loopback with TLS on every hop, and a blocking HTTPS client that runs
in a thread.

Nothing here is a test; L{tests.test_backend_http} and L{tests.test_proxy}
use it.
"""

from __future__ import annotations

import http.client
import os
import ssl
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from imageio import _pki
from imageio import config as _config
from imageio.tap import ImageioService
from tests import engine
from tests._daemon import dropServerConnections

MiB = 1024**2


def daemonConfig(
    pki: _pki.TestPKI,
    certFile: str | None = None,
    keyFile: str | None = None,
    httpCAFile: str | None = None,
) -> _config.Config:
    """
    A daemon with only the remote listener, on 127.0.0.1 port 0, TLS with a
    certificate from C{pki}; its C{https:} backend trusts C{httpCAFile}
    (the PKI's CA by default).
    """
    config = _config.Config()
    config.daemon.systemd_enable = False
    config.daemon.io_threads = 2
    config.tls.cert_file = certFile or pki.certFile
    config.tls.key_file = keyFile or pki.keyFile
    config.remote.host = "127.0.0.1"
    config.remote.port = 0
    config.local.enable = False
    config.control.enable = False
    config.backend_http.ca_file = pki.caFile if httpCAFile is None else httpCAFile
    return config


@define
class Daemon:
    """
    An L{ImageioService} with its remote listener on the test reactor.
    """

    service: ImageioService
    reactor: Any
    port: int

    @classmethod
    def start(cls, reactor: Any, config: _config.Config, stateDir: Path) -> Daemon:
        service = ImageioService(config, reactor, stateDir)
        service.startService()
        port: Any = service.ports["remote"].getHost()
        return cls(service, reactor, port.port)

    @property
    def registry(self) -> Any:
        return self.service.registry

    def url(self, host: str = "127.0.0.1") -> str:
        return f"https://{host}:{self.port}"

    def addTicket(
        self,
        url: str,
        size: int,
        ops: Iterable[str] = ("read", "write"),
        ticketID: str | None = None,
        **extra: object,
    ) -> str:
        """
        Add a ticket for C{url}.

        @return: Its id.
        """
        ticketID = ticketID or str(uuid.uuid4())
        body: dict[str, object] = {
            "uuid": ticketID,
            "url": url,
            "size": size,
            "ops": list(ops),
            "timeout": 300,
        }
        body.update(extra)
        self.registry.add(body)
        return ticketID

    def stop(self) -> Deferred[None]:
        return stopService(self.service, self.reactor)


@inlineCallbacks
def stopService(service: Any, reactor: Any) -> Any:
    """
    Stop C{service}, abort the connections it still serves, and give the
    reactor a moment to close client pools.
    """
    if service.running:
        yield service.stopService()
    yield dropAll(reactor)


def _channelsWithTimers(reactor: Any) -> list[Any]:
    from imageio.web import ImageioChannel

    channels = []
    for call in reactor.getDelayedCalls():
        owner = getattr(call.func, "__self__", None)
        if isinstance(owner, ImageioChannel) and call.active():
            channels.append(owner)
    return channels


@inlineCallbacks
def dropAll(reactor: Any) -> Any:
    """
    Abort server connections until none is left with a pending idle timer
    (connections closing cleanly may wait for their peer outside the
    reactor's readers and writers).
    """
    for _ in range(40):
        dropServerConnections(reactor)
        yield deferLater(reactor, 0.05, lambda: None)
        channels = _channelsWithTimers(reactor)
        if not channels:
            return
        for channel in channels:
            transport = getattr(channel, "transport", None)
            if transport is not None:
                transport.abortConnection()
            channel.setTimeout(None)


def makeImage(path: Path, data: bytes, size: int | None = None) -> str:
    """
    Write C{data} to C{path}, extended (sparse) to C{size}.

    @return: The C{file:} URL.
    """
    with open(path, "wb") as f:
        f.write(data)
        if size is not None:
            f.truncate(size)
    return f"file://{path}"


def pattern(size: int, seed: int = 0) -> bytes:
    """
    Incompressible, position-dependent test bytes.
    """
    block = os.urandom(64 * 1024) if seed < 0 else _seeded(seed)
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


def _seeded(seed: int) -> bytes:
    import hashlib

    return hashlib.shake_256(b"imageio-%d" % seed).digest(64 * 1024 + 7)


@define
class Reply:
    """
    A response read by L{HTTPSClient}.
    """

    status: int
    headers: Mapping[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


@define
class HTTPSClient:
    """
    A blocking HTTPS client (the standard library's), verifying the server
    against C{caFile}; use its Deferred methods from tests.
    """

    host: str
    port: int
    caFile: str
    timeout: float = 30
    _conn: http.client.HTTPSConnection | None = field(default=None, init=False)

    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            context = ssl.create_default_context(cafile=self.caFile)
            self._conn = http.client.HTTPSConnection(
                self.host, self.port, context=context, timeout=self.timeout
            )
        return self._conn

    def requestSync(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        chunked: bool = False,
    ) -> Reply:
        conn = self._connection()
        try:
            conn.request(
                method, path, body=body, headers=dict(headers or {}), encode_chunked=chunked
            )
            response = conn.getresponse()
            data = response.read()
        except Exception:
            self.close()
            raise
        reply = Reply(
            response.status,
            {k.lower(): v for k, v in response.getheaders()},
            data,
        )
        if response.will_close:
            self.close()
        return reply

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        chunked: bool = False,
    ) -> Deferred[Reply]:
        return deferToThread(self.requestSync, method, path, body, headers, chunked)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def proxyConfig(
    directory: Path, pki: _pki.TestPKI, daemonCAFile: str | None = None
) -> _config.Config:
    """
    A C{[proxy]} configuration with the test engine's certificates written
    to C{directory}, trusting daemons signed by C{pki}'s CA (or
    C{daemonCAFile}).
    """
    directory.mkdir(parents=True, exist_ok=True)
    engineCert = directory / "engine.pem"
    engineCert.write_bytes(engine.engine().pem)
    engineCA = directory / "engine-ca.pem"
    engineCA.write_bytes(engine.engineCA().pem)
    config = _config.Config()
    config.daemon.systemd_enable = False
    config.proxy.enable = True
    config.proxy.host = "127.0.0.1"
    config.proxy.port = 0
    config.proxy.cert_file = pki.certFile
    config.proxy.key_file = pki.keyFile
    config.proxy.engine_cert_file = str(engineCert)
    config.proxy.engine_ca_cert_file = str(engineCA)
    config.proxy.daemon_ca_file = pki.caFile if daemonCAFile is None else daemonCAFile
    return config


@define
class Proxy:
    """
    A proxy site listening with TLS on 127.0.0.1.
    """

    site: Any
    port: Any
    reactor: Any

    @classmethod
    @inlineCallbacks
    def start(cls, reactor: Any, config: _config.Config, allowLoopback: bool = True) -> Any:
        from imageio.proxy import makeProxySite
        from imageio.web._tls import TLSServerEndpoint, makeServerContext

        site = makeProxySite(config, reactor, None, None, None, allowLoopback=allowLoopback)
        context = makeServerContext(config.proxy.cert_file, config.proxy.key_file)
        endpoint = TLSServerEndpoint(
            TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1"), context, reactor
        )
        port = yield endpoint.listen(site)
        return cls(site, port, reactor)

    @property
    def portNumber(self) -> int:
        address: Any = self.port.getHost()
        return int(address.port)

    @property
    def service(self) -> Any:
        return self.site.service

    @inlineCallbacks
    def stop(self) -> Any:
        if self.port is not None:
            port, self.port = self.port, None
            yield port.stopListening()
        yield dropAll(self.reactor)
