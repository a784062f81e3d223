# -*- test-case-name: tests.test_tap -*-
"""
twistd integration: command-line options and the service tree.

C{twistd -n imageio} runs with embedded defaults: a state directory
(systemd's C{RuntimeDirectory}, C{/run/ovirt-imageio} for root, else the XDG
state directory), a self-signed certificate made there on first start,
the control socket there, the images API on port 54322 and the local
abstract socket. C{--config-dir DIR} (C{-c}, C{--conf-dir}) reads
C{DIR/conf.d/*.conf} like upstream ovirt-imageio; root with no option reads
upstream's system directories (L{imageio.config.loadSystem}).

This is the only module that builds endpoints; library code gets the
reactor and pools injected.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.logger import ILogObserver
from twisted.python import usage
from twisted.python.components import Componentized
from twisted.web.resource import Resource

import imageio
import imageio._leanreactor  # noqa: F401  first: the reactor core without pyOpenSSL
from imageio import _log
from imageio import config as _config
from imageio._aio import AIOEngine, AIOService
from imageio._buffers import BufferBudget
from imageio._diskio import DiskIO, DiskIOService, createPool
from imageio._log import Logger
from imageio._twisted_dispatch import LeanDispatchService, wakerClasses
from imageio.backends import BackendContext, BackendOpener, namesListener, readCAFile
from imageio.control import Metrics, controlResource
from imageio.daemon.images import ImagesService, imagesResource
from imageio.tickets import TicketRegistry
from imageio.web import (
    BodyPump,
    BodyPumpService,
    ImageioSite,
    TCPServerEndpoint,
    UNIXServerEndpoint,
    ZeroCopyTCPServer,
    ZeroCopyUNIXServer,
    createBodyPump,
    probeSplice,
)

log = Logger()

#: Connections the kernel queues for each listener before we accept them.
#: Twisted's default of 50 makes a non-blocking connect to a UNIX socket
#: fail with EAGAIN when a burst of clients (many connections per
#: transfer, many transfers) arrives while the reactor is busy, and makes
#: TCP clients wait for a SYN retransmit. Linux caps this at
#: C{net.core.somaxconn} (4096 by default).
LISTEN_BACKLOG = 4096


class Options(usage.Options):
    """
    C{twistd imageio} options.
    """

    synopsis = "[options]"
    longdesc = (
        "Run the imageio daemon (images API, local socket, tickets control API) "
        "and, when [proxy] enable = true, the engine-side proxy."
    )
    optParameters = [
        [
            "config-dir",
            "c",
            None,
            "Read DIR/conf.d/*.conf (upstream ovirt-imageio format). Default: as root, "
            "upstream's /etc/ovirt-imageio/conf.d and vendor conf.d directories; "
            "otherwise the embedded defaults.",
        ],
        ["state-dir", None, None, "Where sockets and the self-signed certificate live."],
        ["ticket", "t", None, "Add the ticket in this JSON file at startup."],
        ["log-level", None, None, "debug, info, warn or error (default: info)."],
    ]
    optFlags = [["show-config", None, "Print the merged configuration as JSON and exit."]]

    def opt_conf_dir(self, value: str) -> None:
        """
        Same as --config-dir (upstream ovirt-imageio's spelling).
        """
        self["config-dir"] = value

    def postOptions(self) -> None:
        warn = not self["show-config"]
        try:
            if self["config-dir"]:
                configDir = Path(self["config-dir"])
                self["config"], self["config-files"] = _config.loadConfigDir(configDir, warn=warn)
            elif isRoot():
                # The system service: read where vdsm and engine-setup write.
                self["config"], self["config-files"] = _config.loadSystem(warn=warn)
            else:
                self["config-files"] = []
                self["config"] = _config.loadDir(None, warn=warn)
        except _config.ConfigError as e:
            # Not a usage error: no usage block, just what is wrong and where.
            # SystemExit also exits non-zero on Twisted before 26.10, which
            # prints a UsageError and exits 0 (systemd takes that for success).
            raise SystemExit(f"imageio: configuration error: {e}") from None
        settings = _config.logSettings(self["config"])
        _log.setDestination(
            settings.destination, settings.path, settings.maxBytes, settings.backupCount
        )
        if settings.level and not self["log-level"]:
            _log.setLevel(settings.level)
        if self["log-level"]:
            try:
                _log.setLevel(self["log-level"])
            except ValueError:
                raise usage.UsageError(f"Unknown log level {self['log-level']!r}") from None
        if self["show-config"]:
            stateDir = Path(self["state-dir"]) if self["state-dir"] else _config.defaultStateDir()
            effective = effectivePaths(self["config"], stateDir)
            effective["config_files"] = [str(f) for f in self["config-files"]]
            print(_config.showConfig(self["config"], effective))
            raise SystemExit(0)


def effectivePaths(config: _config.Config, stateDir: Path) -> dict[str, object]:
    """
    What a daemon with C{config} and C{stateDir} would use, for
    C{--show-config}: the listeners, the certificates and the log.
    """

    def url(scheme: str, host: str, port: int) -> str:
        host = host or "0.0.0.0"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    def unix(path: str) -> str:
        return "@" + path[1:] + " (abstract)" if path.startswith("\0") else path

    selfSigned = str(stateDir / "pki" / "cert.pem"), str(stateDir / "pki" / "key.pem")
    note = " (self-signed, made at first start)"
    result: dict[str, object] = {"state_dir": str(stateDir)}
    control = config.control
    if not control.enable:
        result["control"] = None
    elif control.transport == "tcp":
        host = "127.0.0.1" if control.prefer_ipv4 else "::1"
        result["control"] = url("http", host, control.port)
    else:
        result["control"] = control.socket or str(stateDir / "sock")
    local = config.local
    if not local.enable:
        result["local"] = None
    else:
        result["local"] = unix(local.socket) if local.socket else "random abstract socket"
    remote = config.remote
    scheme = "https" if config.tls.enable else "http"
    result["remote"] = url(scheme, remote.host, remote.port) if remote.enable else None
    if config.tls.enable and remote.enable:
        if config.tls.cert_file:
            result["cert_file"], result["key_file"] = config.tls.cert_file, config.tls.key_file
        else:
            result["cert_file"], result["key_file"] = (f + note for f in selfSigned)
    if config.proxy.enable:
        result["proxy"] = url("https", config.proxy.host, config.proxy.port)
        result["proxy_cert_file"] = (
            config.proxy.cert_file or config.tls.cert_file or selfSigned[0] + note
        )
        result["proxy_key_file"] = config.proxy.key_file or config.tls.key_file or selfSigned[1]
    result["log"] = _log.describeDestination()
    return result


def describeConfigFiles(files: list[Path], explicit: bool) -> str:
    """
    @param explicit: A configuration directory was given.
    @return: The files read, for the start-up log.
    """
    if files:
        return ", ".join(str(f) for f in files)
    if explicit or not isRoot():
        return "embedded defaults"
    return f"embedded defaults (no {_config.ADMIN_CONF_DIR}/conf.d/*.conf)"


def isRoot() -> bool:
    """
    Whether we run as the system service would (root), and so read
    upstream's system configuration directories by default.
    """
    return os.geteuid() == 0


def twistdLogsToStdout(options: Options) -> bool:
    """
    @return: Whether twistd, run with C{options} as its subcommand's, would
        write the log to standard output with an observer of its own (on
        the reactor): C{-n} without C{--logfile} (or with C{-}),
        C{--logger} or C{--syslog}.
    """
    twistd = getattr(options, "parent", None)
    if twistd is None:
        return False
    return (
        bool(twistd.get("nodaemon"))
        and twistd.get("logfile") in (None, "", "-")
        and not twistd.get("logger")
        and not twistd.get("syslog")
    )


def makeService(options: Options) -> IService:
    """
    Called by twistd with the parsed L{Options}.
    """
    from twisted.internet import reactor

    stateDir = Path(options["state-dir"]) if options["state-dir"] else _config.defaultStateDir()
    service = ImageioService(options["config"], reactor, stateDir)
    try:
        service.logObserver = _log.configuredObserver(stdout=twistdLogsToStdout(options))
    except OSError as e:
        raise SystemExit(f"imageio: cannot open the log file: {e}") from None
    # Our log outputs write from a thread; twistd may end the process
    # without atexit once the reactor stopped (it re-raises SIGTERM), so
    # its last lines are written at once from then on.
    reactor.addSystemEventTrigger("after", "shutdown", _log.writeDirectly)
    if service.logObserver is not None and _log.describeDestination() != "stdout":
        # Said where twistd's own observer still prints (the terminal).
        print(f"imageio: logging to {_log.describeDestination()}", file=sys.stderr)
    log.info(
        "Configuration: {files}",
        files=describeConfigFiles(options.get("config-files") or [], bool(options["config-dir"])),
    )
    if options["ticket"]:
        service.loadTicket(Path(options["ticket"]))
    # twistd calls us before it daemonizes: bind now so a bad certificate or
    # a busy port stops "twistd imageio" on the terminal with the reason,
    # instead of in a background process that never reports ready.
    service.listen()
    return service


def _describe(name: str, port: IListeningPort) -> str:
    address: Any = port.getHost()
    if hasattr(address, "port"):
        scheme = "https" if name in ("remote", "proxy") else "http"
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"{name} {scheme}://{host}:{address.port}"
    path = getattr(address, "name", b"")
    if isinstance(path, bytes):
        path = path.decode("utf-8", "surrogateescape")
    return f"{name} unix:{path!r}" if path.startswith("\0") else f"{name} unix:{path}"


def _tcpEndpoint(
    reactor: Any, host: str, port: int, bodyPump: BodyPump | None = None
) -> IStreamServerEndpoint:
    if host == "":
        host = "0.0.0.0"
    return TCPServerEndpoint(
        reactor, port, backlog=LISTEN_BACKLOG, interface=host, bodyPump=bodyPump
    )


def _removeStaleSocket(path: str) -> None:
    """
    Remove a socket file left by a process that died, but never one that
    another process is listening on.
    """
    if path.startswith("\0") or not os.path.exists(path):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise
    finally:
        probe.close()
    raise SystemExit(f"imageio: another process is listening on {path}: is imageio running?")


class ImageioService(MultiService):
    """
    The whole process: disk-io pool and listeners.

    @ivar registry: The tickets of this process.
    @ivar ports: Listening ports by listener name, once started.
    """

    def __init__(
        self,
        config: _config.Config,
        reactor: Any,
        stateDir: Path,
        now: Any = time.monotonic,
    ) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.stateDir = stateDir
        self.ports: dict[str, IListeningPort] = {}
        self.metrics = Metrics()
        self.registry = TicketRegistry(
            now=now,
            scheduler=reactor,
            removeTimeout=config.control.remove_timeout,
            defaultInactivityTimeout=config.daemon.inactivity_timeout,
            urlGuard=self._checkTicketURL,
        )
        self.metrics.addGauge("imageio_tickets", "Tickets registered.", lambda: len(self.registry))
        self.metrics.addGauge(
            "imageio_active_tickets",
            "Tickets with a transfer running.",
            lambda: self.registry.activeCount(),
        )
        self.budget = BufferBudget(config.daemon.buffer_memory)
        self.metrics.addGauge(
            "imageio_buffer_bytes",
            "Bytes held by transfer buffers ([daemon] buffer_memory).",
            lambda: self.budget.used,
        )
        self.metrics.addGauge(
            "imageio_buffer_waiting",
            "Transfers waiting for buffer memory.",
            lambda: self.budget.waiting,
        )
        self.pool = createPool(reactor, config.daemon.io_threads)
        DiskIOService(self.pool).setServiceParent(self)
        self.diskio = DiskIO(self.pool)
        self.bodyPump: BodyPump | None = None
        if config.daemon.body_threads:
            self.bodyPump = pump = createBodyPump(reactor, config.daemon.body_threads)
            BodyPumpService(pump).setServiceParent(self)
            self.metrics.addCounter(
                "imageio_body_pump_bytes",
                "Request body bytes read by the body pump threads ([daemon] body_threads).",
                lambda: pump.bytesRead,
            )
        # After the pool: stopped before it, so AIO in flight completes
        # before backends close their files on the pool.
        self.aio = AIOEngine(reactor)
        AIOService(self.aio, config.daemon.io_engine).setServiceParent(self)
        # Our sockets, the AIO eventfd and the reactor's waker (each disk-io
        # result) without a log context per event.
        lean = (AIOEngine, ZeroCopyTCPServer, ZeroCopyUNIXServer, *wakerClasses(reactor))
        LeanDispatchService(reactor, lean, [self.aio.reapReady]).setServiceParent(self)
        self.metrics.addCounter(
            "imageio_aio_completed",
            "Storage requests completed by Linux AIO.",
            lambda: self.aio.completed,
        )
        self.metrics.addCounter(
            "imageio_log_lines_dropped",
            "Log lines dropped because the log output did not keep up or failed.",
            _log.droppedLines,
        )
        self.metrics.addCounter(
            "imageio_aio_would_block",
            "Linux AIO requests the kernel refused with EAGAIN (done on the disk-io threads).",
            lambda: self.aio.wouldBlock,
        )
        self._listeners: list[tuple[str, IStreamServerEndpoint, ImageioSite]] = []
        self._prepared = False
        self._listened = False

    #: The observer for the log destination the configuration names
    #: (L{imageio._log.configuredObserver}); twistd uses it instead of its
    #: own unless given C{--logger}.
    logObserver: ILogObserver | None = None

    def setServiceParent(self, parent: Any) -> Any:
        if self.logObserver is not None and isinstance(parent, Componentized):
            # twistd's Application: its ILogObserver component is the
            # observer twistd starts logging to.
            parent.setComponent(ILogObserver, self.logObserver)
        return super().setServiceParent(parent)

    def loadTicket(self, path: Path) -> None:
        """
        Add the ticket in C{path} (JSON), as upstream's C{--ticket}.
        """
        try:
            body = json.loads(path.read_text())
            self.registry.add(body)
        except (OSError, ValueError) as e:
            raise SystemExit(f"Cannot load ticket {path}: {e}") from None

    def _checkTicketURL(self, url: str) -> str | None:
        """
        Refuse proxy-mode tickets that name one of our own listeners: they
        would relay to themselves.
        """
        listeners = []
        for name in ("remote", "proxy"):
            port = self.ports.get(name)
            if port is not None:
                address: Any = port.getHost()
                listeners.append((address.host, address.port))
        if self.config.remote.enable and "remote" not in self.ports:
            listeners.append((self.config.remote.host, self.config.remote.port))
        if self.config.proxy.enable and "proxy" not in self.ports:
            listeners.append((self.config.proxy.host, self.config.proxy.port))
        if namesListener(url, listeners):
            return "The URL names this daemon: the ticket would relay to itself"
        return None

    # Composition

    def _prepare(self) -> None:
        if self._prepared:
            return
        self._prepared = True
        config = self.config
        self.stateDir.mkdir(mode=0o700, parents=True, exist_ok=True)
        unixSocket = None
        if config.local.enable:
            unixSocket = config.local.socket or "\0" + str(uuid.uuid4())
        backendCtx = BackendContext(
            reactor=self.reactor,
            diskio=self.diskio,
            aio=None if config.daemon.io_engine == "threads" else self.aio,
            bufferSize=config.backend_file.buffer_size,
            maxConnections=config.daemon.max_connections,
            caFile=config.backend_http.ca_file or config.tls.ca_file,
            extra={
                "nbd": {"bufferSize": config.backend_nbd.buffer_size},
                "http": {"bufferSize": config.backend_http.buffer_size},
            },
        )
        if backendCtx.caFile:
            # Read the CA for proxy-mode tickets now, before the reactor runs,
            # rather than on the reactor thread at the first https: ticket;
            # checked without pyOpenSSL, which only such a ticket loads.
            try:
                readCAFile(backendCtx.caFile)
            except ValueError as e:
                log.warn("https: tickets will fail until fixed: {error}", error=str(e))
        if config.daemon.splice and unixSocket is not None:
            # Asked now, before the reactor runs, not at the first download.
            probeSplice()
        images = ImagesService(
            registry=self.registry,
            opener=BackendOpener(backendCtx),
            clock=self.reactor,
            runInPool=self.diskio.run,
            bufferSize=config.backend_file.buffer_size,
            unixSocket=unixSocket,
            budget=self.budget,
            splice=config.daemon.splice,
        )
        timeout = config.daemon.request_timeout
        if config.remote.enable:
            site = self._site(imagesResource(images, info=True), "remote", timeout)
            # Plain: large bodies may be read by the pump threads.
            pump = None if config.tls.enable else self.bodyPump
            endpoint = _tcpEndpoint(self.reactor, config.remote.host, config.remote.port, pump)
            if config.tls.enable:
                endpoint = self._tlsEndpoint(endpoint)
            self._listeners.append(("remote", endpoint, site))
        if unixSocket is not None:
            _removeStaleSocket(unixSocket)
            site = self._site(imagesResource(images, info=False), "local", timeout)
            endpoint = UNIXServerEndpoint(
                self.reactor, unixSocket, backlog=LISTEN_BACKLOG, bodyPump=self.bodyPump
            )
            self._listeners.append(("local", endpoint, site))
        if config.control.enable:
            site = self._site(controlResource(self.registry, self.metrics), "control", timeout)
            if config.control.transport == "tcp":
                host = "127.0.0.1" if config.control.prefer_ipv4 else "::1"
                endpoint = _tcpEndpoint(self.reactor, host, config.control.port)
            else:
                path = config.control.socket or str(self.stateDir / "sock")
                Path(path).parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                _removeStaleSocket(path)
                endpoint = UNIXServerEndpoint(
                    self.reactor, path, backlog=LISTEN_BACKLOG, mode=0o660
                )
            site.accessLevel = "info"
            self._listeners.append(("control", endpoint, site))
        if config.proxy.enable:
            from imageio.proxy import makeProxySite

            try:
                proxySite = makeProxySite(
                    config, self.reactor, self.registry, self.diskio, self.metrics
                )
            except _config.ConfigError as e:
                raise SystemExit(f"Proxy configuration error: {e}") from None
            endpoint = _tcpEndpoint(self.reactor, config.proxy.host, config.proxy.port)
            endpoint = self._tlsEndpoint(endpoint, config.proxy.cert_file, config.proxy.key_file)
            self._listeners.append(("proxy", endpoint, proxySite))

    def _site(self, resource: Resource, name: str, timeout: float) -> ImageioSite:
        return ImageioSite(
            resource,
            name,
            timeout=timeout,
            reactor=self.reactor,
            metrics=self.metrics,
            bodyTimeout=self.config.daemon.body_timeout,
            bodyMinRate=self.config.daemon.body_min_rate,
        )

    def _tlsEndpoint(
        self, endpoint: IStreamServerEndpoint, certFile: str = "", keyFile: str = ""
    ) -> IStreamServerEndpoint:
        from imageio.web import TLSConfigError, TLSServerEndpoint, makeServerContext

        tls = self.config.tls
        certFile = certFile or tls.cert_file
        keyFile = keyFile or tls.key_file
        if not certFile:
            from imageio import _pki

            certFile, keyFile = _pki.ensureSelfSigned(str(self.stateDir / "pki"))
            log.warn(
                "No [tls] key_file/cert_file configured: using the self-signed "
                "certificate {certFile}",
                certFile=certFile,
            )
        try:
            context = makeServerContext(
                certFile, keyFile, caFile=tls.ca_file, enableTLS11=tls.enable_tls1_1
            )
        except TLSConfigError as e:
            raise SystemExit(f"TLS configuration error: {e}") from None
        return TLSServerEndpoint(endpoint, context, self.reactor, tls.handshake_timeout)

    # IService

    def privilegedStartService(self) -> None:
        self._prepare()
        super().privilegedStartService()

    def listen(self) -> None:
        """
        Prepare and bind every listener now, if not done yet.

        @raise SystemExit: With the reason, when a listener cannot be set up
            (bad certificate, busy port, ...).
        """
        self._prepare()
        if self._listened:
            return
        self._listened = True
        for name, endpoint, site in self._listeners:
            failed: list[Any] = []
            d: Deferred[Any] = endpoint.listen(site)
            d.addCallback(self._listening, name)
            d.addErrback(failed.append)
            if failed:
                # Fail loudly and at once: a daemon without its listeners is
                # useless and systemd should see it die.
                raise SystemExit(f"Cannot listen for {name}: {failed[0].value}")

    def startService(self) -> None:
        self._prepare()
        super().startService()
        self.listen()
        log.info("imageio {version} ready", version=imageio.__version__)
        _notifySystemd(b"READY=1", self.config.daemon.systemd_enable)

    def _listening(self, port: IListeningPort, name: str) -> None:
        self.ports[name] = port
        log.info("Listening: {listener}", listener=_describe(name, port))

    def stopService(self) -> Deferred[Any]:
        log.info("Stopping: canceling transfers and closing listeners")
        _notifySystemd(b"STOPPING=1", self.config.daemon.systemd_enable)
        # Running transfers stop after their current buffer.
        self.registry.removeAll()
        stops = [maybeDeferred(port.stopListening) for port in self.ports.values()]
        self.ports.clear()
        d: Deferred[Any] = DeferredList(stops, consumeErrors=True)
        d.addCallback(lambda _: super(ImageioService, self).stopService())
        return d


def _notifySystemd(message: bytes, enabled: bool) -> None:
    """
    Tell systemd (C{Type=notify}) our state; no-op outside systemd.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not enabled or not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(message)
    except OSError as e:
        print(f"imageio: cannot notify systemd: {e}", file=sys.stderr)
