# -*- test-case-name: tests.test_control -*-
"""
The control side: the tickets API on the control socket, metrics, and
C{imageio-ctl}.

L{controlResource} builds the control socket's resource; L{Metrics} counts
what the listeners report through L{imageio.interfaces.IMetrics}.
"""

from imageio.control._metrics import Metrics
from imageio.control.tickets import controlResource

__all__ = ["Metrics", "controlResource"]
