# -*- test-case-name: tests.test_control -*-
"""
Metrics in the Prometheus text format, served on the control socket.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from attrs import define, field
from zope.interface import implementer

from imageio.interfaces import IMetrics

#: Methods counted under their own name; any other becomes C{other}, so a
#: client sending random methods cannot grow the label set. The same set as
#: L{imageio.web.METHODS} (a test holds them equal), spelled out so that
#: C{imageio-ctl} does not import twisted.web.
METHODS = frozenset({"GET", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "HEAD"})

#: Listener names are ours (C{remote}, C{local}, C{control}, C{proxy}...);
#: past this many distinct names, new ones become C{other}.
MAX_LISTENERS = 16


def methodLabel(method: str) -> str:
    """
    @return: C{method} when it is one of L{METHODS}, else C{other}.
    """
    return method if method in METHODS else "other"


def codeLabel(code: int) -> str:
    """
    @return: The status as text when it is a valid HTTP status (100-599),
        else C{other}.
    """
    return str(code) if isinstance(code, int) and 100 <= code <= 599 else "other"


def _number(value: float) -> str:
    """
    @return: C{value} in the text format, exact: a byte count past 10**6
        must not come out rounded as C{2.14748e+09}.
    """
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return repr(value)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in pairs
    )
    return "{" + inner + "}"


@implementer(IMetrics)
@define
class Metrics:
    """
    Counters and gauges of one process.

    @ivar gauges: Callables sampled at render time, by metric name.
    @ivar counters: Running totals sampled at render time, by metric name.
    """

    requests: Counter[tuple[tuple[str, str], ...]] = field(factory=Counter)
    bytesSent: Counter[str] = field(factory=Counter)
    bytesReceived: Counter[str] = field(factory=Counter)
    connections: Counter[str] = field(factory=Counter)
    bodyTimeouts: Counter[str] = field(factory=Counter)
    gauges: dict[str, tuple[str, Callable[[], float]]] = field(factory=dict)
    counters: dict[str, tuple[str, Callable[[], float]]] = field(factory=dict)

    _listeners: set[str] = field(factory=set, init=False)
    # Request counter keys by (listener, method, code) as received, for
    # the usual ones (bounded): one lookup per request.
    _keys: dict[tuple[str, str, int], tuple[tuple[str, str], ...]] = field(factory=dict, init=False)

    def _listener(self, name: str) -> str:
        if name not in self._listeners:
            if len(self._listeners) >= MAX_LISTENERS:
                return "other"
            self._listeners.add(name)
        return name

    def requestDone(self, listener: str, method: str, code: int, sent: int, received: int) -> None:
        """
        Count one answered request. Every label is bounded: unknown methods
        are C{other}, and so are statuses outside 100-599.
        """
        key = self._keys.get((listener, method, code))
        if key is None:
            raw = (listener, method, code)
            listener = self._listener(listener)
            key = (
                ("listener", listener),
                ("method", methodLabel(method)),
                ("code", codeLabel(code)),
            )
            if listener == raw[0] and method in METHODS and len(self._keys) < 4096:
                self._keys[raw] = key
        else:
            listener = key[0][1]
        self.requests[key] += 1
        self.bytesSent[listener] += sent
        self.bytesReceived[listener] += received

    def bodyTimedOut(self, listener: str) -> None:
        self.bodyTimeouts[self._listener(listener)] += 1

    def connectionOpened(self, listener: str) -> None:
        self.connections[self._listener(listener)] += 1

    def connectionClosed(self, listener: str) -> None:
        self.connections[self._listener(listener)] -= 1

    def addGauge(self, name: str, help: str, sample: Callable[[], float]) -> None:
        """
        Report C{sample()}, a value that goes up and down, as C{name}.
        """
        self.gauges[name] = (help, sample)

    def addCounter(self, name: str, help: str, sample: Callable[[], float]) -> None:
        """
        Report C{sample()}, a total that only grows while the process runs,
        as the counter C{name} (so that C{rate()} over it is right).
        """
        self.counters[name] = (help, sample)

    def render(self) -> str:
        lines = [
            "# HELP imageio_requests_total HTTP requests answered.",
            "# TYPE imageio_requests_total counter",
        ]
        for labels, count in sorted(self.requests.items()):
            lines.append(f"imageio_requests_total{_labels(labels)} {count}")
        for name, counter, help in (
            ("imageio_sent_bytes_total", self.bytesSent, "Response body bytes sent."),
            ("imageio_received_bytes_total", self.bytesReceived, "Request body bytes received."),
            ("imageio_open_connections", self.connections, "Client connections open."),
            (
                "imageio_body_timeouts_total",
                self.bodyTimeouts,
                "Requests cut because their body arrived too slowly.",
            ),
        ):
            kind = "gauge" if name == "imageio_open_connections" else "counter"
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            for listener, value in sorted(counter.items()):
                lines.append(f"{name}{_labels((('listener', listener),))} {value}")
        sampled = [
            (name, kind, entry)
            for kind, d in (("gauge", self.gauges), ("counter", self.counters))
            for name, entry in d.items()
        ]
        for name, kind, (help, sample) in sorted(sampled):
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            lines.append(f"{name} {_number(sample())}")
        return "\n".join(lines) + "\n"
