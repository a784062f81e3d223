# -*- test-case-name: tests.test_control -*-
"""
The control side: the tickets API on the control socket, metrics, and
C{imageio-ctl}.

L{controlResource} builds the control socket's resource; L{Metrics} counts
what the listeners report through L{imageio.interfaces.IMetrics}. The
resource (and the web layer under it) is imported on first use, so that
C{imageio-ctl} starts without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imageio.control._metrics import Metrics

if TYPE_CHECKING:
    from imageio.control.tickets import controlResource


def __getattr__(name: str) -> Any:
    if name == "controlResource":
        from imageio.control.tickets import controlResource

        return controlResource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Metrics", "controlResource"]
