# -*- test-case-name: tests.test_proxy -*-
"""
The engine-side proxy: signed tickets, sessions and a streaming relay to
the host daemons.

L{makeProxySite} builds the C{[proxy]} listener's site; C{imageio.tap}
listens with it.
"""

from imageio.proxy._site import makeProxySite

__all__ = ["makeProxySite"]
