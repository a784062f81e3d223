# -*- test-case-name: tests.test_config -*-
"""
Configuration: typed options with embedded defaults, loaded from
C{conf.d/*.conf} INI drop-ins.

Sections and option names are upstream ovirt-imageio's, so drop-ins written
for it (vdsm's C{60-vdsm.conf}, engine-setup's C{50-engine.conf}) load
unchanged. Options we do not implement are accepted with a warning; bad
values fail at start with a message naming the file and option.
"""

from __future__ import annotations

import configparser
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
from attrs import define, field

from imageio._log import Logger

log = Logger()

MiB = 1024**2


class ConfigError(Exception):
    """
    The configuration cannot be used; the message says where and why.
    """


@define
class DaemonSection:
    poll_interval: float = 1.0
    max_connections: int = 8
    inactivity_timeout: int = 60
    run_dir: str = ""
    drop_privileges: bool = True
    user_name: str = "ovirtimg"
    group_name: str = "ovirtimg"
    systemd_enable: bool = True
    #: Threads of the disk-io pool (ours).
    io_threads: int = 8
    #: Storage I/O engine (ours): auto (Linux AIO where the kernel allows
    #: it, else the disk-io threads), aio (fail without it) or threads.
    io_engine: str = "auto"
    #: Seconds before a connection that has sent no complete request is
    #: closed (ours; upstream hard-codes 60).
    request_timeout: int = 60


@define
class TLSSection:
    enable: bool = True
    key_file: str = ""
    cert_file: str = ""
    ca_file: str = ""
    enable_tls1_1: bool = False
    #: Seconds a client has to complete the TLS handshake (ours).
    handshake_timeout: int = 10


@define
class RemoteSection:
    enable: bool = True
    host: str = "::"
    port: int = 54322


@define
class LocalSection:
    enable: bool = True
    socket: str = "\0/org/ovirt/imageio"


@define
class ControlSection:
    enable: bool = True
    transport: str = "unix"
    socket: str = ""
    port: int = -1
    prefer_ipv4: bool = True
    remove_timeout: int = 60


@define
class BackendFileSection:
    buffer_size: int = 8 * MiB


@define
class BackendHTTPSection:
    ca_file: str = ""
    buffer_size: int = 8 * MiB


@define
class BackendNBDSection:
    buffer_size: int = 8 * MiB


@define
class ProfileSection:
    filename: str = ""


@define
class ProxySection:
    enable: bool = False
    host: str = "::"
    port: int = 54323
    key_file: str = ""
    cert_file: str = ""
    engine_cert_file: str = ""
    engine_ca_cert_file: str = ""
    daemon_ca_file: str = ""
    allowed_skew_seconds: int = 0
    #: Key shared by proxy replicas to sign session ids (ours).
    session_key_file: str = ""
    #: Relay to daemons on loopback addresses (all-in-one labs only; ours).
    allow_loopback: bool = False


@define
class Config:
    """
    The merged configuration. Attribute names are the INI section names.
    """

    daemon: DaemonSection = field(factory=DaemonSection)
    tls: TLSSection = field(factory=TLSSection)
    remote: RemoteSection = field(factory=RemoteSection)
    local: LocalSection = field(factory=LocalSection)
    control: ControlSection = field(factory=ControlSection)
    backend_file: BackendFileSection = field(factory=BackendFileSection)
    backend_http: BackendHTTPSection = field(factory=BackendHTTPSection)
    backend_nbd: BackendNBDSection = field(factory=BackendNBDSection)
    profile: ProfileSection = field(factory=ProfileSection)
    proxy: ProxySection = field(factory=ProxySection)

    def toJSON(self) -> dict[str, dict[str, Any]]:
        """
        @return: The configuration as upstream's C{--show-config} prints it.
        """
        return attrs.asdict(self)


#: Upstream sections that configure Python logging; we log through
#: twisted.logger, so these are accepted and ignored.
LOGGING_SECTIONS = frozenset(
    {"loggers", "handlers", "formatters", "logger_root", "handler_logfile", "handler_stderr"}
)

#: Upstream options we accept but do not act on, with the reason.
IGNORED_OPTIONS = {
    ("daemon", "poll_interval"): "shutdown is event driven",
    ("daemon", "drop_privileges"): "use twistd --uid/--gid or systemd User=",
    ("daemon", "user_name"): "use twistd --uid or systemd User=",
    ("daemon", "group_name"): "use twistd --gid or systemd Group=",
    ("profile", "filename"): "profiling is not implemented",
}

_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}

_NON_NEGATIVE = {
    ("daemon", "max_connections"),
    ("daemon", "inactivity_timeout"),
    ("daemon", "io_threads"),
    ("daemon", "request_timeout"),
    ("tls", "handshake_timeout"),
    ("control", "remove_timeout"),
    ("proxy", "allowed_skew_seconds"),
}
_POSITIVE = {
    ("daemon", "max_connections"),
    ("daemon", "io_threads"),
    ("backend_file", "buffer_size"),
    ("backend_http", "buffer_size"),
    ("backend_nbd", "buffer_size"),
}


def _convert(value: str, default: object, where: str) -> object:
    """
    Convert an INI string to the type of C{default}, as upstream does.
    """
    value = value.strip()
    if isinstance(default, bool):
        lowered = value.lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{where}: expecting a boolean (true/false/yes/no/1/0), got {value!r}")
    if isinstance(default, int):
        if not (value.isascii() and value.lstrip("-").isdigit()):
            raise ConfigError(f"{where}: expecting an integer, got {value!r}")
        return int(value)
    if isinstance(default, float):
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{where}: expecting a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ConfigError(f"{where}: expecting a finite number, got {value!r}")
        return number
    # Upstream writes abstract socket names with a JSON-style escape.
    return value.replace("\\u0000", "\0")


def _check(config: Config, where: dict[tuple[str, str], str]) -> None:
    """
    Cross-option validation, naming the file that set the offending value.
    """

    def origin(section: str, option: str) -> str:
        return f"{where.get((section, option), '<default>')}: [{section}] {option}"

    for section, option in _POSITIVE:
        if getattr(getattr(config, section), option) <= 0:
            raise ConfigError(f"{origin(section, option)}: must be positive")
    for section, option in _NON_NEGATIVE:
        if getattr(getattr(config, section), option) < 0:
            raise ConfigError(f"{origin(section, option)}: must not be negative")
    for section in ("remote", "proxy"):
        port = getattr(config, section).port
        if not 0 <= port <= 65535:
            raise ConfigError(f"{origin(section, 'port')}: not a valid port: {port}")
    if config.daemon.io_engine not in ("auto", "aio", "threads"):
        raise ConfigError(
            f"{origin('daemon', 'io_engine')}: expecting 'auto', 'aio' or 'threads', "
            f"got {config.daemon.io_engine!r}"
        )
    if config.control.transport not in ("unix", "tcp"):
        raise ConfigError(
            f"{origin('control', 'transport')}: expecting 'unix' or 'tcp', "
            f"got {config.control.transport!r}"
        )
    if config.control.enable and config.control.transport == "tcp":
        if not 0 < config.control.port <= 65535:
            raise ConfigError(
                f"{origin('control', 'transport')}: [control] port must be set to a port "
                "when [control] transport = tcp"
            )
    if bool(config.tls.key_file) != bool(config.tls.cert_file):
        raise ConfigError(
            f"{origin('tls', 'key_file')}: [tls] key_file and cert_file must be set together"
        )
    if config.proxy.enable and not config.proxy.engine_cert_file:
        raise ConfigError(
            f"{origin('proxy', 'enable')}: [proxy] engine_cert_file is required when "
            "[proxy] enable = true"
        )
    for section, option in (
        ("backend_file", "buffer_size"),
        ("backend_http", "buffer_size"),
        ("backend_nbd", "buffer_size"),
    ):
        size = getattr(getattr(config, section), option)
        if size % 4096 or size > 128 * MiB:
            raise ConfigError(
                f"{origin(section, option)}: must be a multiple of 4096 up to 128 MiB, got {size}"
            )


def configFiles(configDir: Path) -> list[Path]:
    """
    @return: C{configDir/conf.d/*.conf}, sorted by name: later files override.
    """
    return sorted((configDir / "conf.d").glob("*.conf"), key=lambda p: p.name)


def load(files: Iterable[Path], warn: bool = True) -> Config:
    """
    Merge INI files in order over the embedded defaults.

    @param files: Files to read; later ones override earlier ones.
    @param warn: Log unknown and ignored sections and options.
    @raise ConfigError: For unreadable files, bad syntax or bad values.
    """
    config = Config()
    where: dict[tuple[str, str], str] = {}
    for path in files:
        parser = configparser.RawConfigParser(
            interpolation=None, strict=False, default_section="\0no-default"
        )
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f, source=str(path))
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read: {e}") from None
        except configparser.Error as e:
            raise ConfigError(f"{path}: invalid syntax: {e}") from None
        for sectionName in parser.sections():
            section = getattr(config, sectionName, None) if sectionName != "toJSON" else None
            if section is None:
                if warn:
                    if sectionName in LOGGING_SECTIONS or sectionName.startswith("formatter_"):
                        log.info(
                            "{path}: ignoring logging section [{section}]: "
                            "imageio logs through twisted.logger",
                            path=str(path),
                            section=sectionName,
                        )
                    else:
                        log.warn(
                            "{path}: ignoring unknown section [{section}]",
                            path=str(path),
                            section=sectionName,
                        )
                continue
            names = {a.name for a in attrs.fields(type(section))}
            for option, raw in parser.items(sectionName):
                option = option.lower()
                key = (sectionName, option)
                if option not in names:
                    if warn:
                        log.warn(
                            "{path}: ignoring unknown option [{section}] {option}",
                            path=str(path),
                            section=sectionName,
                            option=option,
                        )
                    continue
                default = getattr(type(section)(), option)
                value = _convert(raw, default, f"{path}: [{sectionName}] {option}")
                setattr(section, option, value)
                where[key] = str(path)
                if warn and key in IGNORED_OPTIONS:
                    log.info(
                        "{path}: [{section}] {option} has no effect: {reason}",
                        path=str(path),
                        section=sectionName,
                        option=option,
                        reason=IGNORED_OPTIONS[key],
                    )
    _check(config, where)
    return config


def loadDir(configDir: Path | None, warn: bool = True) -> Config:
    """
    Load C{configDir/conf.d/*.conf}, or the embedded defaults when
    C{configDir} is C{None}.

    @raise ConfigError: When C{configDir} has no C{conf.d/*.conf} files.
    """
    if configDir is None:
        return load([], warn=warn)
    files = configFiles(configDir)
    if not files:
        raise ConfigError(f"Could not find {configDir / 'conf.d' / '*.conf'}")
    return load(files, warn=warn)


def showConfig(config: Config) -> str:
    """
    @return: The merged configuration as indented JSON, for C{--show-config}.
    """
    return json.dumps(config.toJSON(), indent=4)


def defaultStateDir() -> Path:
    """
    Where an unconfigured daemon keeps its sockets and self-signed
    certificate.

    systemd's C{RuntimeDirectory=} wins; root gets upstream's
    C{/run/ovirt-imageio} so vdsm finds the control socket where it looks;
    anyone else gets the XDG state directory.
    """
    runtime = os.environ.get("RUNTIME_DIRECTORY")
    if runtime:
        return Path(runtime.split(":")[0])
    if os.geteuid() == 0:
        return Path("/run/ovirt-imageio")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "imageio"
