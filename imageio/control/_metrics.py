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
    """

    requests: Counter[tuple[tuple[str, str], ...]] = field(factory=Counter)
    bytesSent: Counter[str] = field(factory=Counter)
    bytesReceived: Counter[str] = field(factory=Counter)
    connections: Counter[str] = field(factory=Counter)
    gauges: dict[str, tuple[str, Callable[[], float]]] = field(factory=dict)

    def requestDone(self, listener: str, method: str, code: int, sent: int, received: int) -> None:
        self.requests[(("listener", listener), ("method", method), ("code", str(code)))] += 1
        self.bytesSent[listener] += sent
        self.bytesReceived[listener] += received

    def connectionOpened(self, listener: str) -> None:
        self.connections[listener] += 1

    def connectionClosed(self, listener: str) -> None:
        self.connections[listener] -= 1

    def addGauge(self, name: str, help: str, sample: Callable[[], float]) -> None:
        self.gauges[name] = (help, sample)

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
        ):
            kind = "gauge" if name == "imageio_open_connections" else "counter"
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} {kind}")
            for listener, value in sorted(counter.items()):
                lines.append(f"{name}{_labels((('listener', listener),))} {value}")
        for name, (help, sample) in sorted(self.gauges.items()):
            lines.append(f"# HELP {name} {help}")
            lines.append(f"# TYPE {name} gauge")
            lines.append(f"{name} {sample():g}")
        return "\n".join(lines) + "\n"
