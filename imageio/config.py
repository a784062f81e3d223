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

import ast
import configparser
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
from attrs import define, field, frozen

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
    #: Threads that read large request bodies on plain sockets while they
    #: arrive fast, instead of the reactor, each up to 8 connections at
    #: once (ours; 0 reads on the reactor).
    body_threads: int = 4
    #: Storage I/O engine (ours): auto (Linux AIO where the kernel allows
    #: it, else the disk-io threads), aio (fail without it) or threads.
    io_engine: str = "auto"
    #: Send large downloads over the local UNIX socket from direct files
    #: with splice(2), file -> pipe -> socket in the kernel (ours).
    splice: bool = True
    #: Seconds before a connection that has sent no complete request is
    #: closed (ours; upstream hard-codes 60).
    request_timeout: int = 60
    #: Seconds a request body gets before its rate is checked; then it must
    #: arrive at body_min_rate bytes a second on average, or the request
    #: gets 408 and the connection closes (ours, like Apache's
    #: mod_reqtimeout; 0 disables the check).
    body_timeout: int = 60
    #: Minimum average rate of a request body after body_timeout, in bytes
    #: a second (0 disables the check).
    body_min_rate: int = 1024
    #: Bytes that transfer buffers (uploads, downloads, checksum blocks)
    #: may hold at once, shared by all connections; work that needs more
    #: waits for buffers (ours; 0 for no limit).
    buffer_memory: int = 512 * MiB


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
    #: Upstream's logging sections as the files wrote them (section ->
    #: option -> text); L{logSettings} reads what we honour.
    logging: dict[str, dict[str, str]] = field(factory=dict)

    def toJSON(self) -> dict[str, dict[str, Any]]:
        """
        @return: The configuration as upstream's C{--show-config} prints it.
        """
        result = attrs.asdict(self)
        result.update(result.pop("logging"))
        return result


#: Upstream sections that configure Python logging. We log through
#: twisted.logger: L{logSettings} honours C{[logger_root] level} and the
#: handler it names (a rotated log file, stderr or stdout).
LOGGING_SECTIONS = frozenset(
    {"loggers", "handlers", "formatters", "logger_root", "handler_logfile", "handler_stderr"}
)


def _isLoggingSection(name: str) -> bool:
    return name in LOGGING_SECTIONS or name.startswith(("formatter_", "handler_", "logger_"))


@frozen
class LogSettings:
    """
    Where and from which level to log, from upstream's logging sections.

    @ivar level: C{[logger_root] level} when a file set it, else C{None}.
    @ivar destination: C{"stdout"}, C{"stderr"} or C{"file"}.
    @ivar path: The log file, for C{"file"}.
    @ivar maxBytes: Rotate the file at this size; 0 never rotates.
    @ivar backupCount: Rotated files kept (C{daemon.log.1} ...).
    """

    level: str | None = None
    destination: str = "stdout"
    path: str = ""
    maxBytes: int = 0
    backupCount: int = 0


#: Upstream's handlers, which its files name without redefining them.
_UPSTREAM_HANDLERS = {
    "logfile": {
        "class": "logging.handlers.RotatingFileHandler",
        "args": "('/var/log/ovirt-imageio/daemon.log',)",
        "kwargs": "{'maxBytes': 20971520, 'backupCount': 10}",
    },
    "stderr": {"class": "logging.StreamHandler", "args": "()"},
}
_FILE_HANDLERS = {
    "logging.FileHandler",
    "FileHandler",
    "logging.handlers.WatchedFileHandler",
    "handlers.WatchedFileHandler",
    "logging.handlers.RotatingFileHandler",
    "handlers.RotatingFileHandler",
}
_STREAM_HANDLERS = {"logging.StreamHandler", "StreamHandler"}
_LEVELS = {
    "notset": "debug",
    "debug": "debug",
    "info": "info",
    "warn": "warn",
    "warning": "warn",
    "error": "error",
    "critical": "critical",
    "fatal": "critical",
}


def logSettings(config: Config, where: dict[tuple[str, str], str] | None = None) -> LogSettings:
    """
    Read upstream's logging sections: C{[logger_root] level}, and the
    first handler of C{[logger_root] handlers} (or C{[handler_logfile]}
    when a file defines it): a file rotated like upstream's
    C{RotatingFileHandler} (20 MiB, 10 files unless C{kwargs} say
    otherwise), or a stream. No logging section: standard output.

    @raise ConfigError: For values we cannot honour, naming the file.
    """
    where = where or {}
    sections = config.logging

    def origin(section: str, option: str) -> str:
        path = where.get((section, option))
        return f"{path}: [{section}] {option}" if path else f"[{section}] {option}"

    level = None
    root = sections.get("logger_root", {})
    if "level" in root:
        level = _LEVELS.get(root["level"].strip().lower())
        if level is None:
            raise ConfigError(
                f"{origin('logger_root', 'level')}: expecting DEBUG, INFO, WARNING, ERROR or "
                f"CRITICAL, got {root['level']!r}"
            )
    if "handlers" in root:
        names = [n.strip() for n in root["handlers"].split(",") if n.strip()]
        name = names[0] if names else ""
    elif "handler_logfile" in sections:
        name = "logfile"
    else:
        return LogSettings(level=level)
    section = f"handler_{name}"
    handler = dict(_UPSTREAM_HANDLERS.get(name, {}))
    handler.update(sections.get(section, {}))
    if not handler:
        raise ConfigError(f"{origin('logger_root', 'handlers')}: no [{section}] section")
    cls = handler.get("class", "").strip()

    def literal(option: str, default: str) -> Any:
        text = handler.get(option, default)
        try:
            return ast.literal_eval(text.strip() or default)
        except (ValueError, SyntaxError):
            raise ConfigError(
                f"{origin(section, option)}: expecting a Python literal, got {text!r}"
            ) from None

    if cls in _STREAM_HANDLERS:
        text = handler.get("args", "()").replace(" ", "")
        stream = "stdout" if "sys.stdout" in text else "stderr"
        return LogSettings(level=level, destination=stream)
    if cls not in _FILE_HANDLERS:
        raise ConfigError(
            f"{origin(section, 'class')}: imageio writes logs to a file "
            "(logging.handlers.RotatingFileHandler, logging.FileHandler) or a stream "
            f"(logging.StreamHandler), got {cls!r}"
        )
    args = literal("args", "()")
    kwargs = literal("kwargs", "{}")
    if not isinstance(args, tuple):
        args = (args,)
    filename = args[0] if args else kwargs.get("filename") if isinstance(kwargs, dict) else None
    if not isinstance(filename, str) or not filename or not isinstance(kwargs, dict):
        raise ConfigError(
            f"{origin(section, 'args')}: expecting the log file name, as in "
            "args = ('/var/log/ovirt-imageio/daemon.log',)"
        )
    rotating = cls.endswith("RotatingFileHandler")
    maxBytes = kwargs.get("maxBytes", args[3] if rotating and len(args) > 3 else 0)
    backupCount = kwargs.get("backupCount", args[4] if rotating and len(args) > 4 else 0)
    if not rotating:
        maxBytes = backupCount = 0
    if type(maxBytes) is not int or type(backupCount) is not int or maxBytes < 0:
        raise ConfigError(f"{origin(section, 'kwargs')}: maxBytes and backupCount must be integers")
    return LogSettings(
        level=level,
        destination="file",
        path=filename,
        maxBytes=maxBytes,
        backupCount=max(0, backupCount),
    )


#: Upstream options we accept but do not act on, with the reason.
IGNORED_OPTIONS = {
    ("daemon", "poll_interval"): "shutdown is event driven",
    ("daemon", "drop_privileges"): "use twistd --uid/--gid or systemd User=",
    ("daemon", "user_name"): "use twistd --uid or systemd User=",
    ("daemon", "group_name"): "use twistd --gid or systemd Group=",
    ("profile", "filename"): "profiling is not implemented",
    ("daemon", "run_dir"): "use --state-dir or systemd RuntimeDirectory=",
}

_TRUE = {"1", "yes", "true", "on"}
_FALSE = {"0", "no", "false", "off"}

_NON_NEGATIVE = {
    ("daemon", "max_connections"),
    ("daemon", "inactivity_timeout"),
    ("daemon", "io_threads"),
    ("daemon", "body_threads"),
    ("daemon", "request_timeout"),
    ("daemon", "body_timeout"),
    ("daemon", "body_min_rate"),
    ("daemon", "buffer_memory"),
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
        # A value nobody set is the embedded default: name no file for it.
        path = where.get((section, option))
        return f"{path}: [{section}] {option}" if path else f"[{section}] {option} (default)"

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
        setter = "key_file" if config.tls.key_file else "cert_file"
        raise ConfigError(
            f"{origin('tls', setter)}: [tls] key_file and cert_file must be set together"
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


#: Where upstream's system service reads its configuration: the admin
#: directory (vdsm's C{60-vdsm.conf}, engine-setup's C{50-engine.conf},
#: the admin's C{99-user.conf})...
ADMIN_CONF_DIR = Path("/etc/ovirt-imageio")
#: ...and the vendor directories. Upstream's code and packages use
#: C{/usr/lib/ovirt-imageio}; its comments name C{/var/lib/ovirt-imageio}:
#: both are read.
VENDOR_CONF_DIRS = (Path("/usr/lib/ovirt-imageio"), Path("/var/lib/ovirt-imageio"))


def systemConfigFiles(
    adminDir: Path | None = None, vendorDirs: Iterable[Path] | None = None
) -> list[Path]:
    """
    The drop-ins of a system installation, merged as upstream merges them:
    C{conf.d/*.conf} of the admin and vendor directories sorted by file
    name only, so C{75-vendor.conf} overrides C{50-vdsm.conf} and
    C{99-user.conf} overrides C{75-vendor.conf}. Of two files with the same
    name, the vendor's is read last.

    @param adminDir: Default L{ADMIN_CONF_DIR}.
    @param vendorDirs: Default L{VENDOR_CONF_DIRS}.
    """
    adminDir = ADMIN_CONF_DIR if adminDir is None else adminDir
    vendorDirs = VENDOR_CONF_DIRS if vendorDirs is None else vendorDirs
    files = configFiles(adminDir)
    for vendorDir in vendorDirs:
        files.extend(configFiles(vendorDir))
    # sort() is stable: for equal names the admin file stays first.
    files.sort(key=lambda p: p.name)
    return files


def loadSystem(
    adminDir: Path | None = None, vendorDirs: Iterable[Path] | None = None, warn: bool = True
) -> tuple[Config, list[Path]]:
    """
    Load a system installation's drop-ins (L{systemConfigFiles}), or the
    embedded defaults when there are none.

    @return: The configuration and the files read.
    """
    files = systemConfigFiles(adminDir, vendorDirs)
    return load(files, warn=warn), files


def loadConfigDir(configDir: Path, warn: bool = True) -> tuple[Config, list[Path]]:
    """
    Load C{-c/--config-dir DIR}: C{DIR/conf.d/*.conf}; upstream's admin
    directory (L{ADMIN_CONF_DIR}) always comes with its vendor directories,
    as upstream reads them.

    @return: The configuration and the files read.
    @raise ConfigError: When there is no drop-in to read, as upstream.
    """
    if configDir.resolve() == ADMIN_CONF_DIR.resolve():
        files = systemConfigFiles(configDir)
    else:
        files = configFiles(configDir)
    if not files:
        raise ConfigError(f"Could not find {configDir / 'conf.d' / '*.conf'}")
    return load(files, warn=warn), files


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
            isSection = sectionName not in ("toJSON", "logging")
            section = getattr(config, sectionName, None) if isSection else None
            if section is None:
                if _isLoggingSection(sectionName):
                    options = config.logging.setdefault(sectionName, {})
                    for option, raw in parser.items(sectionName):
                        options[option.lower()] = raw
                        where[(sectionName, option.lower())] = str(path)
                    continue
                if warn:
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
    logSettings(config, where)
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


def showConfig(config: Config, effective: dict[str, object] | None = None) -> str:
    """
    @param effective: What the daemon would actually use (paths it derives,
        files read), shown under C{"effective"}.
    @return: The merged configuration as indented JSON, for C{--show-config},
        with the options accepted for compatibility but without effect
        listed under C{"no_effect"}.
    """
    shown: dict[str, Any] = config.toJSON()
    if effective is not None:
        shown["effective"] = effective
    shown["no_effect"] = {
        f"[{section}] {option}": reason for (section, option), reason in IGNORED_OPTIONS.items()
    }
    return json.dumps(shown, indent=4)


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
